use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::codec::{BY_REFERENCE_FROM, encode_rope};
use super::split::split_rope;
use super::{Blob, Piece, Rope};
use crate::chunk::{ChunkSize, Chunked};
use crate::fuzz::Rng;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Doc {
    pub(super) id: u64,
    pub(super) title: String,
    pub(super) scan: Blob,
    pub(super) pages: Vec<Blob>,
    pub(super) note: Option<Blob>,
    pub(super) tail: u32,
}

pub(super) fn doc(rng: &mut Rng) -> Doc {
    Doc {
        id: rng.below(1 << 40) as u64,
        title: "quarterly report".into(),
        scan: Blob::from(rng.bytes(300_000)),
        pages: vec![
            Blob::from(rng.bytes(BY_REFERENCE_FROM)),
            Blob::from(rng.bytes(BY_REFERENCE_FROM - 1)),
            Blob::default(),
            Blob::from(rng.bytes(70_000)),
        ],
        note: Some(Blob::from_static(b"small")),
        tail: 7,
    }
}

fn rope_of<T: Serialize>(value: &T) -> Rope {
    let (mut head, mut cuts) = (Vec::new(), Vec::new());
    encode_rope(value, &mut head, &mut cuts).unwrap();
    Rope::assemble(head.into(), &mut cuts)
}

#[test]
fn a_rope_holds_exactly_the_postcard_encoding_with_large_blobs_by_reference() {
    let mut rng = Rng::new(1);
    let d = doc(&mut rng);
    let rope = rope_of(&d);
    let flat = postcard::to_allocvec(&d).unwrap();
    assert_eq!(&rope.flat()[..], &flat[..]);
    assert_eq!(rope.len(), flat.len());
    assert_eq!(rope, Rope::Flat(flat.into()));
    let Rope::Pieces { pieces, .. } = &rope else {
        panic!("a state with large blobs is in pieces");
    };
    let blobs: Vec<&Blob> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Blob(b) => Some(b),
            Piece::Head(_) => None,
        })
        .collect();
    // The scan and the pages of at least 16 KiB, each the very blob of the state.
    assert_eq!(blobs.len(), 3);
    assert!(blobs[0].same(&d.scan));
    assert!(blobs[1].same(&d.pages[0]));
    assert!(blobs[2].same(&d.pages[3]));
}

#[test]
fn a_state_without_large_blobs_is_one_flat_piece() {
    let rope = rope_of(&(1u8, Blob::from(vec![1u8; 100]), "x"));
    assert!(rope.as_flat().is_some());
}

#[test]
fn blobs_read_as_bytes_and_bytes_read_as_blobs() {
    let v = vec![5u8; 20_000];
    let as_vec = postcard::to_allocvec(&v).unwrap();
    let blob: Blob = postcard::from_bytes(&as_vec).unwrap();
    assert_eq!(&blob[..], &v[..]);
    // Formats that write bytes as a list of numbers.
    let list = serde::de::value::SeqDeserializer::<_, serde::de::value::Error>::new(
        vec![1u8, 2].into_iter(),
    );
    let back = Blob::deserialize(list).unwrap();
    assert_eq!(&back[..], b"\x01\x02");
}

#[test]
fn a_panicking_encode_leaves_no_capture_behind() {
    struct Boom;
    impl Serialize for Boom {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            panic!("boom")
        }
    }
    let big = Blob::from(vec![1u8; BY_REFERENCE_FROM]);
    let r = std::panic::catch_unwind(|| {
        let (mut head, mut cuts) = (Vec::new(), Vec::new());
        let _ = encode_rope(&(big.clone(), Boom), &mut head, &mut cuts);
    });
    assert!(r.is_err());
    // Plain postcard on this thread copies the blob as before.
    let flat = postcard::to_allocvec(&big).unwrap();
    assert_eq!(flat.len(), BY_REFERENCE_FROM + 3);
}

fn bytes_of(
    split: &super::split::RopeSplit,
    written: &std::collections::HashMap<[u8; 32], Bytes>,
) -> Vec<u8> {
    split
        .chunks
        .iter()
        .flat_map(|c| written[&c.hash].iter().copied())
        .collect()
}

fn manifest(split: &super::split::RopeSplit, len: usize) -> Chunked {
    Chunked {
        tier: Arc::from("files"),
        role: 's',
        len: len as u64,
        chunks: split.chunks.clone().into(),
        inline: split.inline.clone().into(),
    }
}

/// No chunks written by a precut.
const NO_PRECUT: Option<&std::collections::HashMap<[u8; 32], crate::chunk::ChunkRef>> = None;

#[test]
fn a_rope_splits_into_chunks_that_add_up_to_its_bytes_and_an_unchanged_blob_writes_none() {
    let mut rng = Rng::new(3);
    let size = ChunkSize::around(16 * 1024);
    let mut d = doc(&mut rng);
    d.scan = Blob::from(rng.bytes(2 * 1024 * 1024));
    let rope = rope_of(&d);
    let Rope::Pieces { pieces, .. } = &rope else {
        panic!("in pieces")
    };
    let first = split_rope(pieces, 1, None, &size, 0, NO_PRECUT);
    let mut written = std::collections::HashMap::new();
    for (bytes, c) in &first.new {
        assert_eq!(*blake3::hash(bytes).as_bytes(), c.hash);
        assert_eq!(crc32fast::hash(bytes), c.crc);
        assert_eq!(c.seq, 1);
        written.insert(c.hash, bytes.clone());
    }
    assert_eq!(bytes_of(&first, &written), rope.flat());
    assert!(first.chunks.len() > 100);

    // The next step changes the id and the tail: only head chunks are new.
    d.id += 1;
    d.tail += 1;
    let next = rope_of(&d);
    let Rope::Pieces { pieces, .. } = &next else {
        panic!("in pieces")
    };
    let prev = manifest(&first, rope.len());
    let second = split_rope(pieces, 2, Some(&prev), &size, 0, NO_PRECUT);
    assert!(
        !second.new.is_empty() && second.new.len() <= 2,
        "{}",
        second.new.len()
    );
    for (bytes, c) in &second.new {
        assert_eq!(c.seq, 2);
        written.insert(c.hash, bytes.clone());
    }
    assert_eq!(bytes_of(&second, &written), next.flat());
    // Every chunk not new keeps the key it was written under.
    let kept = second.chunks.iter().filter(|c| c.seq == 1).count();
    assert_eq!(kept, second.chunks.len() - second.new.len());

    // A blob equal in bytes but built anew cuts the same chunks (its own hashes).
    d.scan = Blob::from(d.scan.bytes().to_vec());
    let again = rope_of(&d);
    let Rope::Pieces { pieces, .. } = &again else {
        panic!("in pieces")
    };
    let third = split_rope(
        pieces,
        3,
        Some(&manifest(&second, next.len())),
        &size,
        0,
        NO_PRECUT,
    );
    assert!(third.new.is_empty());
}

#[test]
fn ropes_compare_by_bytes_whatever_their_cut() {
    let mut rng = Rng::new(4);
    let d = doc(&mut rng);
    let rope = rope_of(&d);
    assert!(rope.same(&rope.clone()));
    let flat = Rope::Flat(rope.flat());
    assert_eq!(rope, flat);
    let mut other = d.clone();
    other.tail += 1;
    assert_ne!(rope, rope_of(&other));
    let mut shorter = d;
    shorter.title.pop();
    assert_ne!(rope, rope_of(&shorter));
    assert_eq!(Rope::default(), Rope::Flat(Bytes::new()));
}

#[test]
fn a_rope_decodes_in_place_with_its_own_blobs() {
    let mut rng = Rng::new(5);
    let d = doc(&mut rng);
    let rope = rope_of(&d);
    let back: Doc = super::read::decode_rope(&rope, usize::MAX).unwrap();
    assert_eq!(back, d);
    assert!(back.scan.same(&d.scan), "the rope's blob, not a copy");
    assert!(back.pages[3].same(&d.pages[3]));
    // Small blobs come from the head bytes.
    assert_eq!(back.pages[1], d.pages[1]);
    // A one-piece rope decodes as the shared buffer does.
    let flat = Rope::Flat(rope.flat());
    let from_flat: Doc = super::read::decode_rope(&flat, usize::MAX).unwrap();
    assert_eq!(from_flat, d);
    // Over the limit: refused before reading.
    assert!(matches!(
        super::read::decode_rope::<Doc>(&rope, 1000),
        Err(crate::error::CodecError::TooLarge { .. })
    ));
}

#[test]
fn a_damaged_rope_is_a_typed_error_never_a_panic() {
    let mut rng = Rng::new(6);
    let d = doc(&mut rng);
    let Rope::Pieces { pieces, .. } = rope_of(&d) else {
        panic!("in pieces")
    };
    // Every prefix of the pieces, each blob missing (its length promises more bytes than
    // the next piece has), and a byte more at the end.
    let mut cases: Vec<Vec<Piece>> = (0..pieces.len()).map(|n| pieces[..n].to_vec()).collect();
    for (i, _) in pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Piece::Blob(_)))
    {
        let mut v = pieces.to_vec();
        v.remove(i);
        cases.push(v);
    }
    let mut longer = pieces.to_vec();
    longer.push(Piece::Head(Bytes::from_static(b"\x00")));
    cases.push(longer);
    for (i, case) in cases.into_iter().enumerate() {
        let len = case.iter().map(|p| p.bytes().len()).sum();
        let rope = Rope::Pieces {
            pieces: case.into(),
            len,
        };
        assert!(
            super::read::decode_rope::<Doc>(&rope, usize::MAX).is_err(),
            "case {i} decoded"
        );
    }
}

#[test]
fn random_pieces_decode_to_an_error_or_a_value_never_a_panic() {
    let mut rng = Rng::new(7);
    let template = rope_of(&doc(&mut rng));
    let Rope::Pieces { pieces, .. } = &template else {
        panic!("in pieces")
    };
    let mut refused = 0;
    for case in 0..2_000 {
        // The real pieces with random bytes flipped, cut short or lengthened, or random
        // pieces altogether.
        let mut v: Vec<Piece> = pieces.to_vec();
        match case % 3 {
            0 => {
                let i = rng.below(v.len());
                if let Piece::Head(h) = &v[i] {
                    let mut b = h.to_vec();
                    let at = rng.below(b.len());
                    b[at] ^= 1 << rng.below(8);
                    v[i] = Piece::Head(b.into());
                }
            }
            1 => {
                let i = rng.below(v.len());
                let b = v[i].bytes();
                let keep = rng.below(b.len() + 1);
                v[i] = Piece::Head(Bytes::copy_from_slice(&b[..keep]));
            }
            _ => {
                v = (0..=rng.below(4))
                    .map(|_| {
                        let n = rng.below(64);
                        if rng.below(2) == 0 {
                            Piece::Head(rng.bytes(n).into())
                        } else {
                            Piece::Blob(Blob::from(rng.bytes(n * 1000)))
                        }
                    })
                    .collect();
            }
        }
        let len = v.iter().map(|p| p.bytes().len()).sum();
        let rope = Rope::Pieces {
            pieces: v.into(),
            len,
        };
        match super::read::decode_rope::<Doc>(&rope, 1 << 20) {
            Ok(_) => {}
            Err(
                crate::error::CodecError::Malformed(_) | crate::error::CodecError::TooLarge { .. },
            ) => {
                refused += 1;
            }
            Err(other) => panic!("case {case}: {other:?}"),
        }
    }
    // Most damage is refused (a flipped bit inside a string or a number may still decode).
    assert!(refused > 1_200, "{refused} of 2,000 refused");
}

/// A state at step `seq`, sealed without a precut: its payload and the keys and bytes of
/// its puts.
fn placed_plainly(
    placement: &crate::Placement,
    key: &crate::InstanceKey,
    seq: u64,
    rope: &Rope,
    prev: Option<(&crate::Payload, Option<&Rope>)>,
) -> (crate::Payload, std::collections::HashMap<String, Vec<u8>>) {
    let mut puts = Vec::new();
    let payload = placement
        .place_state(key, seq, rope, prev, None, &mut puts)
        .unwrap();
    let puts = puts
        .iter()
        .map(|p| (p.key.to_string(), p.parts.concat()))
        .collect();
    (payload, puts)
}

/// The chunks of a manifest without their places (pack and offset): what any split of the
/// same bytes at the same step holds.
fn contents(p: &crate::Payload) -> Vec<(u64, [u8; 32], u32, u32)> {
    let crate::Payload::Chunked(m) = p else {
        panic!("chunked: {p:?}")
    };
    m.chunks
        .iter()
        .map(|c| (c.seq, c.hash, c.len, c.crc))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precut_writes_exactly_the_chunks_the_seal_would_and_the_seal_then_writes_none() {
    use crate::tier::Tier;
    let dir = tempfile::tempdir().unwrap();
    let tier = Tier::fs(dir.path()).named("disk");
    let placement = crate::Ladder::new()
        .default_to(tier.clone())
        .validate(64 * 1024 * 1024)
        .unwrap();
    let key = crate::InstanceKey::new("Doc", "d");
    let mut rng = Rng::new(5);
    let mut d = doc(&mut rng);
    d.scan = Blob::from(rng.bytes(3 * 1024 * 1024));
    // A copy of the state whose blobs are built anew has no cuts: it is sealed plainly.
    let fresh = |d: &Doc| postcard::from_bytes::<Doc>(&postcard::to_allocvec(d).unwrap()).unwrap();
    let Rope::Pieces { pieces, .. } = rope_of(&d) else {
        panic!("in pieces")
    };
    let heads: Vec<Bytes> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Head(h) => Some(h.clone()),
            Piece::Blob(_) => None,
        })
        .collect();

    let rope = rope_of(&d);
    let (unplanned, _) = placed_plainly(&placement, &key, 1, &rope_of(&fresh(&d)), None);
    let plan = placement.precut(&rope, None).expect("a new blob to cut");
    let written = placement.cut_and_put(&key, 1, plan).await.unwrap();
    assert!(
        placement.precut(&rope, None).is_none(),
        "the blob keeps its cuts"
    );
    let mut puts = Vec::new();
    let sealed = placement
        .place_state(&key, 1, &rope, None, Some(&written), &mut puts)
        .unwrap();
    assert_eq!(
        contents(&sealed),
        contents(&unplanned),
        "the same chunks as sealing without a precut"
    );
    assert!(
        written.len() >= 3,
        "{} chunks of 3 MiB written",
        written.len()
    );
    for p in &puts {
        let bytes = p.parts.concat();
        assert!(
            heads.iter().any(|h| bytes.ends_with(h)),
            "only head pieces are left to put: {} is not one",
            p.key
        );
    }
    placement.put_all(&key, &puts).await.unwrap();
    let back = placement.fetch(&key, &sealed).await.unwrap();
    assert!(back == rope.flat(), "the state reads back from its pack");

    // The next step inserts 100 bytes into the blob: chunks the committed manifest holds
    // keep their places and are not written again.
    let mut next = d.clone();
    let old = d.scan.bytes();
    next.scan = Blob::from(
        [
            &old[..1024 * 1024],
            &rng.bytes(100)[..],
            &old[1024 * 1024..],
        ]
        .concat(),
    );
    next.tail += 1;
    let next_rope = rope_of(&next);
    let prev = Some((&sealed, Some(&rope)));
    let (unplanned, _) = placed_plainly(&placement, &key, 2, &rope_of(&fresh(&next)), prev);
    let plan = placement
        .precut(&next_rope, prev)
        .expect("a new blob to cut");
    let written = placement.cut_and_put(&key, 2, plan).await.unwrap();
    let mut puts = Vec::new();
    let next_sealed = placement
        .place_state(
            &key,
            2,
            &next_rope,
            Some((&sealed, Some(&rope))),
            Some(&written),
            &mut puts,
        )
        .unwrap();
    assert_eq!(contents(&next_sealed), contents(&unplanned));
    let (crate::Payload::Chunked(m), crate::Payload::Chunked(before)) = (&next_sealed, &sealed)
    else {
        panic!("chunked")
    };
    let kept: Vec<_> = m.chunks.iter().filter(|c| c.seq == 1).collect();
    assert!(kept.len() >= 2, "{} chunks kept from step 1", kept.len());
    assert!(
        kept.iter().all(|c| before.chunks.contains(c)),
        "a kept chunk keeps its pack and offset"
    );
    assert!(
        written.len() <= 2,
        "{} chunks written for 100 bytes",
        written.len()
    );
    placement.put_all(&key, &puts).await.unwrap();
    let back = placement.fetch(&key, &next_sealed).await.unwrap();
    assert!(back == next_rope.flat(), "the next state reads back");

    // A state that is the committed one is not cut again.
    assert!(
        placement
            .precut(&rope, Some((&sealed, Some(&rope))))
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_head_pieces_live_in_the_manifest_and_read_back_between_the_chunks() {
    use crate::error::BlobError;
    use crate::tier::Tier;
    let dir = tempfile::tempdir().unwrap();
    let placement = crate::Ladder::new()
        .inline_below(4 * 1024)
        .default_to(Tier::fs(dir.path()).named("disk"))
        .validate(64 * 1024 * 1024)
        .unwrap();
    let key = crate::InstanceKey::new("Doc", "d");
    let mut rng = Rng::new(8);
    let mut d = doc(&mut rng);
    d.scan = Blob::from(rng.bytes(3 * 1024 * 1024));
    let rope = rope_of(&d);
    let Rope::Pieces { pieces, .. } = &rope else {
        panic!("in pieces")
    };
    let small_heads: Vec<Bytes> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Head(h) if h.len() < 4 * 1024 => Some(h.clone()),
            _ => None,
        })
        .collect();
    assert!(small_heads.len() >= 2);

    let mut puts = Vec::new();
    let first = placement
        .place_state(&key, 1, &rope, None, None, &mut puts)
        .unwrap();
    let crate::Payload::Chunked(m) = &first else {
        panic!("chunked")
    };
    assert_eq!(&m.inline[..], &small_heads[..], "the small heads, in order");
    assert!(
        puts.iter().all(|p| !small_heads.contains(&p.parts[1])),
        "no file for a small head"
    );
    placement.put_all(&key, &puts).await.unwrap();
    assert_eq!(placement.fetch(&key, &first).await.unwrap(), rope.flat());

    // A step that changes only small fields writes nothing but its record.
    d.id += 1;
    d.tail += 1;
    let next = rope_of(&d);
    let mut puts = Vec::new();
    let second = placement
        .place_state(&key, 2, &next, Some((&first, Some(&rope))), None, &mut puts)
        .unwrap();
    assert!(puts.is_empty(), "{} puts", puts.len());
    assert_ne!(second, first);
    assert_eq!(placement.fetch(&key, &second).await.unwrap(), next.flat());

    // A manifest that does not hold together is a typed error naming it, never bytes.
    let damaged = |change: &dyn Fn(&mut crate::chunk::Chunked)| {
        let crate::Payload::Chunked(mut m) = second.clone() else {
            unreachable!()
        };
        change(&mut m);
        crate::Payload::Chunked(m)
    };
    let flipped = damaged(&|m| {
        let mut body = m.inline[0].to_vec();
        body[0] ^= 1;
        let mut all = m.inline.to_vec();
        all[0] = body.into();
        m.inline = all.into();
    });
    let dropped = damaged(&|m| m.inline = m.inline[1..].to_vec().into());
    for bad in [flipped, dropped] {
        match placement.fetch(&key, &bad).await {
            Err(BlobError::Corrupt { key, detail, .. }) => {
                assert!(key.starts_with("manifest of"), "{key}: {detail}");
            }
            other => panic!("a damaged manifest read as {other:?}"),
        }
    }
}
