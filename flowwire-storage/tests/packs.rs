//! Packs across an upgrade: a payload whose chunks a build before record format 10 wrote
//! (each chunk a framed blob of its own) is changed by this build. The chunks it keeps keep
//! their own blobs, the new ones go into the step's pack, the state reads back whole from
//! both, and what the change drops is exactly the own chunks it no longer refers to.

use bytes::Bytes;
use flowwire_storage::blob::{Payload, header};
use flowwire_storage::chunk::{ChunkRef, Chunked, cdc, chunk_key};
use flowwire_storage::tier::{BlobTier, FsTier};
use flowwire_storage::{InstanceKey, Ladder, MIB, Tier};

fn noise(len: usize, seed: u64) -> Vec<u8> {
    flowwire_storage::fuzz::Rng::new(seed).bytes(len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_written_before_packs_keeps_its_chunks_and_adds_a_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = cdc::ChunkSize::around(128 * 1024);
    let p = Ladder::new()
        .default_to(Tier::fs(dir).named("disk").chunk_size(128 * 1024))
        .validate(64 * MIB)
        .unwrap();
    let fs = FsTier::new(dir);
    let key = InstanceKey::new("Upgrade", "u");

    // Step 1, as format 9 wrote it: each chunk a framed blob under its content key.
    let old = noise(3 * MIB, 1);
    let mut chunks = Vec::new();
    let mut at = 0;
    for len in cdc::lengths(&old, &size) {
        let c = ChunkRef {
            seq: 1,
            ..ChunkRef::of(&old[at..at + len])
        };
        let ck = chunk_key(&key, 1, 's', &c.hash);
        let body = Bytes::copy_from_slice(&old[at..at + len]);
        fs.put(&ck, &[header(&ck, len as u64, c.crc), body])
            .await
            .unwrap();
        chunks.push(c);
        at += len;
    }
    let before = Payload::Chunked(Chunked {
        tier: "disk".into(),
        role: 's',
        len: old.len() as u64,
        chunks: chunks.clone().into(),
        inline: std::sync::Arc::default(),
    });
    assert!(p.fetch(&key, &before).await.unwrap() == old[..]);

    // Step 2, by this build: 1,000 bytes in the middle change.
    let mut new = old.clone();
    new[1_500_000..1_501_000].copy_from_slice(&noise(1_000, 2));
    let mut puts = Vec::new();
    let old_bytes = Bytes::from(old.clone());
    let after = p
        .place(
            &key,
            2,
            's',
            Bytes::from(new.clone()),
            Some((&before, Some(&old_bytes))),
            &mut puts,
        )
        .unwrap();
    assert_eq!(puts.len(), 1, "the new chunks are one pack: {puts:?}");
    assert!(puts[0].key.contains("/2.sp-"), "{}", puts[0].key);
    p.put_all(&key, &puts).await.unwrap();

    let Payload::Chunked(m) = &after else {
        panic!("chunked: {after:?}")
    };
    let (kept, packed): (Vec<&ChunkRef>, Vec<&ChunkRef>) =
        m.chunks.iter().partition(|c| !c.in_pack());
    assert!(
        kept.iter().all(|c| c.seq == 1 && chunks.contains(c)),
        "a kept chunk keeps its own blob"
    );
    assert!(
        kept.len() + 4 >= chunks.len(),
        "{} of {} chunks kept",
        kept.len(),
        chunks.len()
    );
    assert!(
        (1..=3).contains(&packed.len()),
        "{} chunks written for 1,000 bytes",
        packed.len()
    );
    assert!(packed.iter().all(|c| c.seq == 2));
    assert!(p.fetch(&key, &after).await.unwrap() == new[..]);

    // The state's bytes in step 1's chunks are still what its history reads.
    assert!(p.fetch(&key, &before).await.unwrap() == old[..]);
    // What step 2 stops referring to: the own chunks it replaced, each by its own key.
    let dropped = before.dropped_by(&key, Some(&after));
    assert_eq!(dropped.len(), chunks.len() - kept.len());
    for b in &dropped {
        assert!(b.key.contains("/1.sk-"), "{}", b.key);
        assert!(
            !kept
                .iter()
                .any(|c| chunk_key(&key, 1, 's', &c.hash) == *b.key),
            "a kept chunk is not dropped: {}",
            b.key
        );
    }
    // And what a step 3 that replaces it all drops: the pack, once, and every kept chunk.
    let third = Payload::Inline(Bytes::from_static(b"small again"));
    let dropped = after.dropped_by(&key, Some(&third));
    let packs: Vec<_> = dropped.iter().filter(|b| b.key.contains(".sp-")).collect();
    assert_eq!(packs.len(), 1, "{dropped:?}");
    assert_eq!(dropped.len(), kept.len() + 1);
}
