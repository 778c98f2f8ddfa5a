//! Small encodings as [`Bytes`] without an allocation each.
//!
//! A step encodes a handful of small payloads (the state, a call, the record, a history
//! entry) and hands each on as `Bytes`. Copying each out of a scratch buffer costs an
//! allocation, and cloning a `Bytes` made from a `Vec` costs another (its first clone moves
//! it behind a shared header). An [`Arena`] carves the payloads out of one shared chunk
//! instead: each is a reference-counted view of the chunk, a clone is a counter increment,
//! and once every view of a chunk is dropped the arena writes over it again. An allocation
//! happens only when the chunk is full while some of its views are still alive.
//!
//! What a view keeps alive is its whole chunk: keep long-lived copies of arena bytes with
//! [`Bytes::copy_from_slice`] (the in-memory store copies what it retains).

use bytes::{Bytes, BytesMut};

/// One writer's source of small `Bytes`.
///
/// ```
/// use flowwire::storage::arena::Arena;
/// let mut arena = Arena::default();
/// let a = arena.copy(b"state");
/// let b = a.clone(); // a counter increment, no allocation
/// assert_eq!(&b[..], b"state");
/// ```
#[derive(Debug, Default)]
pub struct Arena {
    buf: BytesMut,
}

impl Arena {
    /// The size of a chunk.
    pub const CHUNK: usize = 16 * 1024;
    /// Payloads from this size up get an allocation of their own (a large payload would
    /// otherwise keep a chunk to itself, or pin the small ones beside it).
    pub const LARGE: usize = 2 * 1024;

    /// `bytes`, as `Bytes` carved from the current chunk.
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.len() >= Self::LARGE {
            return Bytes::copy_from_slice(bytes);
        }
        if self.buf.capacity() < bytes.len() {
            // Reuses the chunk when no view of it is alive; allocates a new one otherwise.
            self.buf.reserve(Self::CHUNK);
        }
        self.buf.extend_from_slice(bytes);
        self.buf.split().freeze()
    }

    /// Takes `buf`'s contents as `Bytes`, leaving it empty: large payloads are handed over
    /// (no copy; `buf` allocates afresh next time), small ones carved from the arena (`buf`
    /// keeps its capacity).
    pub fn take(&mut self, buf: &mut Vec<u8>) -> Bytes {
        if buf.len() >= Self::LARGE * 32 {
            return Bytes::from(std::mem::take(buf));
        }
        let out = self.copy(buf);
        buf.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Arena;

    #[test]
    fn views_share_a_chunk_and_keep_their_contents_when_it_is_reused() {
        let mut arena = Arena::default();
        let a = arena.copy(b"one");
        let b = arena.copy(b"two");
        assert_eq!((&a[..], &b[..]), (&b"one"[..], &b"two"[..]));
        // Fill past a chunk while `a` is alive: `a` keeps its bytes.
        let filler = vec![7u8; 1000];
        let many: Vec<_> = (0..40).map(|_| arena.copy(&filler)).collect();
        assert_eq!(&a[..], b"one");
        assert!(many.iter().all(|m| m[..] == filler[..]));
    }

    #[test]
    fn large_payloads_are_not_carved_from_the_chunk() {
        let mut arena = Arena::default();
        let big = vec![1u8; Arena::LARGE];
        assert_eq!(arena.copy(&big).len(), Arena::LARGE);
        let mut buf = vec![2u8; Arena::LARGE * 32];
        let taken = arena.take(&mut buf);
        assert_eq!(taken.len(), Arena::LARGE * 32);
        assert!(buf.is_empty());
    }
}
