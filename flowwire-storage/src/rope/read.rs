//! Decoding a value straight from a [`Rope`]'s pieces, with no contiguous copy: each large
//! [`Blob`](crate::Blob) of the value is the very blob of the rope (its chunk list kept).

use postcard::de_flavors::Flavor;
use serde::Deserialize;

use crate::error::CodecError;

use super::codec::decode_shared;
use super::field::share_rope_blobs;
use super::{Piece, Rope};

/// Decodes a value written by postcard from `rope`, the whole of it, within `limit`. A
/// one-piece rope is decoded as [`decode_shared`] does; a rope in pieces is read piece by
/// piece, and each blob the encoding left out is the rope's blob itself.
///
/// ```
/// use flowwire::Blob;
/// use flowwire::storage::rope::{Rope, codec::encode_rope, read::decode_rope};
///
/// let scan = Blob::from(vec![1u8; 100_000]);
/// let (mut head, mut cuts) = (Vec::new(), Vec::new());
/// encode_rope(&(7u32, scan.clone()), &mut head, &mut cuts).unwrap();
/// let rope = Rope::assemble(head.into(), &mut cuts);
/// let (n, back): (u32, Blob) = decode_rope(&rope, 1 << 20).unwrap();
/// assert_eq!(n, 7);
/// assert!(back.same(&scan)); // not a copy: the very blob
/// ```
pub fn decode_rope<T: for<'de> Deserialize<'de>>(
    rope: &Rope,
    limit: usize,
) -> Result<T, CodecError> {
    let pieces = match rope {
        Rope::Flat(bytes) => return decode_shared(bytes, limit),
        Rope::Pieces { pieces, .. } => pieces,
    };
    if rope.len() > limit {
        return Err(CodecError::TooLarge {
            size: rope.len(),
            limit,
        });
    }
    let was = share_rope_blobs(
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Blob(b) => Some(b.clone()),
                Piece::Head(_) => None,
            })
            .collect(),
    );
    let value = (|| {
        let mut de = postcard::Deserializer::from_flavor(Reader {
            pieces,
            at: 0,
            off: 0,
        });
        let value = T::deserialize(&mut de).map_err(|e| CodecError::Malformed(e.to_string()))?;
        match de.finalize() {
            Ok(0) => Ok(value),
            Ok(rest) => Err(CodecError::Malformed(format!(
                "{rest} trailing bytes after the value"
            ))),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        }
    })();
    share_rope_blobs(was);
    value
}

/// Reads the pieces in order. A read never spans two pieces: a rope's pieces meet only
/// where a blob's bytes begin or end, and postcard reads a blob's bytes in one take.
struct Reader<'de> {
    pieces: &'de [Piece],
    /// The piece being read, and the offset in it.
    at: usize,
    off: usize,
}

impl<'de> Reader<'de> {
    /// The rest of the current piece (moving past pieces read to their end).
    fn current(&mut self) -> &'de [u8] {
        let pieces: &'de [Piece] = self.pieces;
        while let Some(p) = pieces.get(self.at) {
            let bytes = p.bytes();
            if self.off < bytes.len() {
                return &bytes[self.off..];
            }
            self.at += 1;
            self.off = 0;
        }
        &[]
    }
}

impl<'de> Flavor<'de> for Reader<'de> {
    type Remainder = usize;
    type Source = &'de [Piece];

    fn pop(&mut self) -> postcard::Result<u8> {
        let rest = self.current();
        let b = *rest
            .first()
            .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
        self.off += 1;
        Ok(b)
    }

    fn try_take_n(&mut self, ct: usize) -> postcard::Result<&'de [u8]> {
        if ct == 0 {
            return Ok(&[]);
        }
        let rest = self.current();
        if rest.len() < ct {
            // Past the end, or across pieces: not what `encode_rope` writes.
            return Err(postcard::Error::DeserializeUnexpectedEnd);
        }
        self.off += ct;
        Ok(&rest[..ct])
    }

    fn finalize(mut self) -> postcard::Result<usize> {
        let mut rest = self.current().len();
        rest += self
            .pieces
            .get(self.at + 1..)
            .map_or(0, |p| p.iter().map(|p| p.bytes().len()).sum());
        Ok(rest)
    }
}
