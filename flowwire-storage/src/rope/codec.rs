//! Encoding a value into a [`Rope`](super::Rope) and decoding one that shares its buffer.
//!
//! Both work through postcard unchanged, with two thread-local hand-overs:
//! - while [`encode_rope`] runs, a large [`Blob`] being serialized offers itself; postcard
//!   then writes its length and hands its bytes to the output flavor, which, seeing the
//!   very bytes offered (same address, same length), records a cut instead of copying them;
//! - while [`decode_shared`] runs, a [`Blob`] decoded from bytes borrowed out of the shared
//!   buffer takes a slice of that buffer instead of a copy.
//!
//! A `Blob` serialized or deserialized anywhere else is plain bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::CodecError;

use super::field::{self, Blob, Restore};

pub use super::field::BY_REFERENCE_FROM;

/// Where the bytes of a blob left out of an encoding go: at `at` in the head buffer.
pub type Cut = (usize, Blob);

/// Encodes `value` with postcard into `head`, leaving out the bytes of each large [`Blob`]
/// and noting where they go in `cuts` (in order). `head` with each blob's bytes inserted
/// at its cut is exactly `postcard`'s encoding of `value`.
///
/// ```
/// use flowwire::Blob;
/// use flowwire::storage::rope::codec::encode_rope;
///
/// let big = Blob::from(vec![9u8; 100_000]);
/// let (mut head, mut cuts) = (Vec::new(), Vec::new());
/// encode_rope(&(5u8, big.clone(), 6u8), &mut head, &mut cuts).unwrap();
/// assert_eq!(head.len(), 1 + 3 + 1); // 5, the length as a varint, 6
/// assert_eq!(cuts.len(), 1);
/// assert_eq!(cuts[0].0, 4);
/// assert!(cuts[0].1.same(&big));
/// ```
pub fn encode_rope<T: Serialize + ?Sized>(
    value: &T,
    head: &mut Vec<u8>,
    cuts: &mut Vec<Cut>,
) -> Result<(), CodecError> {
    let was = field::capture(true);
    let _restore = Restore(move || field::end_capture(was));
    postcard::serialize_with_flavor(value, RopeFlavor { head, cuts })
        .map_err(|e| CodecError::Encode(e.to_string()))
}

struct RopeFlavor<'a> {
    head: &'a mut Vec<u8>,
    cuts: &'a mut Vec<Cut>,
}

impl postcard::ser_flavors::Flavor for RopeFlavor<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.head.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // The offered blob's own bytes (its length, before them, is written through here
        // too): a cut, not a copy.
        if let Some(blob) = field::take_offered(data) {
            self.cuts.push((self.head.len(), blob));
            return Ok(());
        }
        crate::codec::push_small(self.head, data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Decodes a value written by postcard from `bytes`, the whole input, within `limit`; each
/// [`Blob`] in it is a slice of `bytes`, not a copy.
///
/// ```
/// use flowwire::Blob;
/// use flowwire::storage::rope::codec::decode_shared;
///
/// let bytes = bytes::Bytes::from(postcard::to_allocvec(&Blob::from(vec![1u8; 5])).unwrap());
/// let blob: Blob = decode_shared(&bytes, 1 << 20).unwrap();
/// assert_eq!(blob.as_ptr(), bytes[1..].as_ptr()); // shared, not copied
/// ```
pub fn decode_shared<T: for<'de> Deserialize<'de>>(
    bytes: &Bytes,
    limit: usize,
) -> Result<T, CodecError> {
    field::sharing(bytes, || crate::codec::decode_raw(bytes, limit))
}
