//! A flow's encoded state as a rope: its bytes in pieces, with each large [`Blob`] field
//! referred to rather than copied.
//!
//! The engine encodes a state with [`codec::encode_rope`]: the head buffer holds everything
//! but the blobs' bytes, and [`Rope::assemble`] makes the rope of head pieces and blobs.
//! The rope's bytes, one piece after another, are exactly the state's postcard encoding,
//! so what is stored and read back is unchanged; only the cost of a step is. A state
//! without large blobs is one piece ([`Rope::Flat`]) and costs no allocation beyond its
//! bytes.
//!
//! Where a step places a rope large enough to be chunked, each blob's chunks are cut and
//! hashed once per blob ([`Blob`] keeps them) and only the head pieces are cut each time:
//! a step that leaves a 32 MiB blob as it is writes, hashes and compares none of it
//! ([`split`]).

pub mod codec;
mod field;
pub mod read;
pub mod split;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

pub use self::field::Blob;

/// One piece of a [`Rope`].
#[derive(Debug, Clone)]
pub enum Piece {
    /// Encoded bytes.
    Head(Bytes),
    /// A blob's bytes, by reference.
    Blob(Blob),
}

impl Piece {
    /// The piece's bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Piece::Head(b) => b,
            Piece::Blob(b) => b,
        }
    }
}

/// An encoded value in pieces: what the engine keeps as a step's state.
///
/// ```
/// use flowwire::Blob;
/// use flowwire::storage::rope::{Rope, codec::encode_rope};
///
/// let big = Blob::from(vec![3u8; 64 * 1024]);
/// let value = ("order-1".to_string(), big);
/// let (mut head, mut cuts) = (Vec::new(), Vec::new());
/// encode_rope(&value, &mut head, &mut cuts).unwrap();
/// let rope = Rope::assemble(head.into(), &mut cuts);
/// assert_eq!(rope.flat(), postcard::to_allocvec(&value).unwrap());
/// assert!(rope.as_flat().is_none()); // in pieces: the blob was not copied
/// ```
#[derive(Debug, Clone)]
pub enum Rope {
    /// One piece: a state with no large blob.
    Flat(Bytes),
    /// Head pieces and blobs, in order.
    Pieces {
        /// The pieces.
        pieces: Arc<[Piece]>,
        /// Their total length.
        len: usize,
    },
}

impl Default for Rope {
    fn default() -> Rope {
        Rope::Flat(Bytes::new())
    }
}

impl From<Bytes> for Rope {
    fn from(bytes: Bytes) -> Rope {
        Rope::Flat(bytes)
    }
}

impl Rope {
    /// The rope of `head` with each cut's blob inserted at its offset (cuts in order, as
    /// [`codec::encode_rope`] gives them; `cuts` is left empty for reuse).
    ///
    /// # Panics
    /// If the cuts are out of order or past the end of `head` (they come from
    /// [`codec::encode_rope`], which never gives such).
    pub fn assemble(head: Bytes, cuts: &mut Vec<codec::Cut>) -> Rope {
        if cuts.is_empty() {
            return Rope::Flat(head);
        }
        let mut pieces = Vec::with_capacity(cuts.len() * 2 + 1);
        let mut len = head.len();
        let mut from = 0;
        for (at, blob) in cuts.drain(..) {
            if at > from {
                pieces.push(Piece::Head(head.slice(from..at)));
            }
            len += blob.len();
            pieces.push(Piece::Blob(blob));
            from = at;
        }
        if from < head.len() {
            pieces.push(Piece::Head(head.slice(from..)));
        }
        Rope::Pieces {
            pieces: pieces.into(),
            len,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Rope::Flat(b) => b.len(),
            Rope::Pieces { len, .. } => *len,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its bytes when it is one piece.
    pub fn as_flat(&self) -> Option<&Bytes> {
        match self {
            Rope::Flat(b) => Some(b),
            Rope::Pieces { .. } => None,
        }
    }

    /// Its pieces' bytes, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let (flat, pieces): (Option<&[u8]>, &[Piece]) = match self {
            Rope::Flat(b) => (Some(b), &[]),
            Rope::Pieces { pieces, .. } => (None, pieces),
        };
        flat.into_iter().chain(pieces.iter().map(Piece::bytes))
    }

    /// Its bytes in one buffer: shared when it is one piece, copied otherwise (for the
    /// readers that need them contiguous: decoding, migrations, the final state).
    pub fn flat(&self) -> Bytes {
        match self {
            Rope::Flat(b) => b.clone(),
            Rope::Pieces { len, .. } => {
                let mut out = BytesMut::with_capacity(*len);
                for s in self.slices() {
                    out.extend_from_slice(s);
                }
                out.freeze()
            }
        }
    }

    /// The same rope with small pieces copied into buffers of their own: what a reader
    /// keeps after the engine's buffer it was carved from moves on (a large piece is
    /// shared as it is).
    #[must_use]
    pub fn detached(&self) -> Rope {
        let own = |b: &Bytes| {
            if b.len() < crate::arena::Arena::LARGE {
                Bytes::copy_from_slice(b)
            } else {
                b.clone()
            }
        };
        match self {
            Rope::Flat(b) => Rope::Flat(own(b)),
            Rope::Pieces { pieces, len } => Rope::Pieces {
                pieces: pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Head(h) => Piece::Head(own(h)),
                        Piece::Blob(b) => Piece::Blob(b.clone()),
                    })
                    .collect(),
                len: *len,
            },
        }
    }

    /// Whether `self` and `other` are known to hold the same bytes without comparing large
    /// ones: the same buffer, or pieces whose heads are equal and whose blobs are the same
    /// blobs. `false` says nothing.
    pub fn same(&self, other: &Rope) -> bool {
        match (self, other) {
            (Rope::Flat(a), Rope::Flat(b)) => a.as_ptr() == b.as_ptr() && a.len() == b.len(),
            (Rope::Pieces { pieces: a, len: la }, Rope::Pieces { pieces: b, len: lb }) => {
                la == lb
                    && a.len() == b.len()
                    && a.iter().zip(b.iter()).all(|pair| match pair {
                        (Piece::Head(x), Piece::Head(y)) => x == y,
                        (Piece::Blob(x), Piece::Blob(y)) => x.same(y),
                        _ => false,
                    })
            }
            _ => false,
        }
    }
}

impl PartialEq for Rope {
    /// Byte equality (comparing the pieces' bytes, whatever their cut).
    fn eq(&self, other: &Rope) -> bool {
        if self.len() != other.len() {
            return false;
        }
        if self.same(other) {
            return true;
        }
        let (mut a, mut b) = (self.slices(), other.slices());
        let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
        loop {
            if x.is_empty() {
                match a.next() {
                    Some(s) => x = s,
                    None => return y.is_empty() && b.all(<[u8]>::is_empty),
                }
                continue;
            }
            if y.is_empty() {
                match b.next() {
                    Some(s) => y = s,
                    None => return false,
                }
                continue;
            }
            let n = x.len().min(y.len());
            if x[..n] != y[..n] {
                return false;
            }
            (x, y) = (&x[n..], &y[n..]);
        }
    }
}

impl Eq for Rope {}

#[cfg(test)]
mod shared_tests;
#[cfg(test)]
mod tests;
