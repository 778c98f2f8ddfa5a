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

use std::cell::{Cell, RefCell};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::CodecError;

use super::field::Blob;

/// Blobs smaller than this are copied into the encoding: a reference to them would cost
/// more than their bytes.
pub const BY_REFERENCE_FROM: usize = 16 * 1024;

thread_local! {
    /// Whether an [`encode_rope`] runs on this thread.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The blob whose bytes the flavor is about to be handed.
    static OFFERED: RefCell<Option<Blob>> = const { RefCell::new(None) };
    /// Where the offered blob's bytes are (address, length; 0 for none): the flavor's test
    /// on every write it is handed, cheaper than looking at `OFFERED`.
    static OFFERED_AT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// The buffer a [`decode_shared`] decodes from.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Called by `Blob::serialize` before it hands its bytes to the serializer.
pub(super) fn offer(blob: &Blob) {
    if blob.len() >= BY_REFERENCE_FROM && CAPTURING.with(Cell::get) {
        OFFERED_AT.with(|at| at.set((blob.as_ptr() as usize, blob.len())));
        OFFERED.with(|o| *o.borrow_mut() = Some(blob.clone()));
    }
}

/// A slice of the buffer a [`decode_shared`] decodes, if `v` lies within it.
pub(super) fn shared_slice(v: &[u8]) -> Option<Bytes> {
    SOURCE.with(|s| {
        let s = s.borrow();
        let src = s.as_ref()?;
        let (start, end) = (src.as_ptr() as usize, src.as_ptr() as usize + src.len());
        let at = v.as_ptr() as usize;
        (at >= start && at + v.len() <= end && !v.is_empty()).then(|| src.slice_ref(v))
    })
}

/// Restores a thread-local on drop (a panicking `Serialize` leaves nothing behind).
struct Restore<F: FnMut()>(F);

impl<F: FnMut()> Drop for Restore<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

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
    let was = CAPTURING.with(|c| c.replace(true));
    let _restore = Restore(move || {
        CAPTURING.with(|c| c.set(was));
        // An offer no write took (a blob serialized through something that copied it).
        if OFFERED_AT.with(|at| at.replace((0, 0))) != (0, 0) {
            OFFERED.with(|o| o.borrow_mut().take());
        }
    });
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
        if OFFERED_AT.with(Cell::get) == (data.as_ptr() as usize, data.len())
            && let Some(blob) = OFFERED.with(|o| o.borrow_mut().take())
        {
            OFFERED_AT.with(|at| at.set((0, 0)));
            self.cuts.push((self.head.len(), blob));
            return Ok(());
        }
        self.head.extend_from_slice(data);
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
    let mut was = SOURCE.with(|s| s.replace(Some(bytes.clone())));
    let _restore = Restore(move || SOURCE.with(|s| *s.borrow_mut() = was.take()));
    crate::codec::decode_raw(bytes, limit)
}
