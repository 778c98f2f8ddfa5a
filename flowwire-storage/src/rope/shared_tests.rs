//! Decoding that shares its buffer (`codec::decode_shared`): blobs are slices of the
//! buffer decoded, nested shared decodes each share their own, and nothing is left behind
//! by a decode that panics.

use bytes::Bytes;
use serde::Deserialize;

use super::Blob;
use super::codec::decode_shared;
use super::tests::{Doc, doc};
use crate::fuzz::Rng;

#[test]
fn a_blob_decoded_from_a_shared_buffer_is_a_slice_of_it() {
    let mut rng = Rng::new(2);
    let d = doc(&mut rng);
    let bytes = Bytes::from(postcard::to_allocvec(&d).unwrap());
    let back: Doc = decode_shared(&bytes, usize::MAX).unwrap();
    assert_eq!(back, d);
    let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
    assert!(range.contains(&(back.scan.as_ptr() as usize)));
    assert!(range.contains(&(back.pages[3].as_ptr() as usize)));
    // Outside a shared decode, a copy.
    let copied: Doc = crate::codec::decode_raw(&bytes, usize::MAX).unwrap();
    assert!(!range.contains(&(copied.scan.as_ptr() as usize)));
    assert_eq!(copied, d);
}

/// A value that, while it is decoded, decodes a `Doc` of its own from another buffer (a
/// shared decode inside a shared decode), or panics.
struct Inner {
    doc: Doc,
    scan: Blob,
}

/// The outer value: a blob, the nested decode, then a blob of the outer buffer again.
#[derive(Deserialize)]
struct Outer(Inner, Blob);

thread_local! {
    static INNER: std::cell::RefCell<Option<Bytes>> = const { std::cell::RefCell::new(None) };
}

impl<'de> Deserialize<'de> for Inner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let scan = Blob::deserialize(d)?;
        let Some(inner) = INNER.with(|i| i.borrow().clone()) else {
            panic!("no inner buffer");
        };
        let doc = decode_shared(&inner, usize::MAX).map_err(serde::de::Error::custom)?;
        Ok(Inner { doc, scan })
    }
}

#[test]
fn a_shared_decode_nested_in_another_shares_each_buffer_and_puts_the_outer_one_back() {
    let mut rng = Rng::new(5);
    let inner_doc = doc(&mut rng);
    let inner = Bytes::from(postcard::to_allocvec(&inner_doc).unwrap());
    let outer_scan = Blob::from(rng.bytes(50_000));
    INNER.with(|i| *i.borrow_mut() = Some(inner.clone()));
    let both =
        Bytes::from(postcard::to_allocvec(&(outer_scan.clone(), outer_scan.clone())).unwrap());
    let back: Outer = decode_shared(&both, usize::MAX).unwrap();
    let within = |b: &Bytes, p: &Blob| {
        (b.as_ptr() as usize..b.as_ptr() as usize + b.len()).contains(&(p.as_ptr() as usize))
    };
    assert_eq!(back.0.doc, inner_doc);
    assert!(
        within(&inner, &back.0.doc.scan),
        "the nested decode shares its buffer"
    );
    assert!(
        within(&both, &back.0.scan),
        "the outer blob before it shares the outer one"
    );
    assert!(
        within(&both, &back.1),
        "and so does the one after it: the outer buffer is back"
    );
    assert_eq!(&back.1[..], &outer_scan[..]);
    INNER.with(|i| *i.borrow_mut() = None);
}

#[test]
fn a_shared_decode_that_panics_leaves_no_buffer_behind() {
    let scan = Blob::from(vec![3u8; 40_000]);
    let bytes = Bytes::from(postcard::to_allocvec(&(scan.clone(), 0u8)).unwrap());
    let r = std::panic::catch_unwind(|| {
        // No inner buffer set: `Inner` panics halfway through the shared decode.
        let _: Result<Inner, _> = decode_shared(&bytes, usize::MAX);
    });
    assert!(r.is_err());
    drop(bytes);
    // A plain decode on this thread copies, and reads nothing of the dropped buffer.
    let again = postcard::to_allocvec(&scan).unwrap();
    let copied: Blob = crate::codec::decode_raw(&again, usize::MAX).unwrap();
    let range = again.as_ptr() as usize..again.as_ptr() as usize + again.len();
    assert!(!range.contains(&(copied.as_ptr() as usize)));
    assert_eq!(copied, scan);
}
