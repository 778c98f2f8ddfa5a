//! The corruption matrix over chunks and manifests.
//!
//! A 3 MiB payload is placed through the ladder as chunks on a real file tier, then damaged:
//! a chunk file flipped or zeroed at many offsets (header and body), truncated, extended,
//! deleted, or replaced by another chunk's file or by a chunk of another instance; and its
//! manifest damaged at every byte of the record that holds it, and rewritten with wrong
//! lengths, hashes or steps under a valid checksum (what a buggy writer could leave).
//!
//! Every case ends with the exact bytes or a typed error naming the instance, the tier and
//! the chunk's key (for the record's bytes, a codec error): never other bytes, never a panic.

use std::path::Path;

use bytes::Bytes;
use flowwire_storage::blob::Payload;
use flowwire_storage::chunk::Chunked;
use flowwire_storage::record::{PlacedRecord, Record, Status};
use flowwire_storage::tier::FsTier;
use flowwire_storage::{BlobError, InstanceKey, Ladder, MIB, Placement, Tier};

fn noise(len: usize, seed: u64) -> Vec<u8> {
    flowwire_storage::fuzz::Rng::new(seed).bytes(len)
}

/// A manifest rewritten to lie about its chunks.
type Lie = fn(&mut Chunked);

/// Chunks of around 128 KiB: a few MiB make enough of them for the matrix.
fn placement(dir: &Path) -> Placement {
    Ladder::new()
        .default_to(Tier::fs(dir).named("disk").chunk_size(128 * 1024))
        .validate(64 * MIB)
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Places `data` as the state of `key` at step `seq` and writes its chunks.
async fn store(p: &Placement, key: &InstanceKey, seq: u64, data: &[u8]) -> Chunked {
    let mut puts = Vec::new();
    let payload = p
        .place(key, seq, 's', Bytes::copy_from_slice(data), None, &mut puts)
        .unwrap();
    p.put_all(key, &puts).await.unwrap();
    match payload {
        Payload::Chunked(c) => c,
        other => panic!("expected chunks, got {other:?}"),
    }
}

/// What a read of a damaged payload may end with; `true` when it was refused.
fn judge(
    case: &str,
    got: Result<Bytes, BlobError>,
    data: &[u8],
    key: &InstanceKey,
    damaged: Option<&str>,
) -> bool {
    match got {
        Ok(bytes) => {
            assert!(bytes == data, "{case}: other bytes were served");
            false
        }
        Err(e) => {
            let (instance, tier, at) = match &e {
                BlobError::Corrupt {
                    instance,
                    tier,
                    key,
                    ..
                }
                | BlobError::Truncated {
                    instance,
                    tier,
                    key,
                    ..
                }
                | BlobError::Missing {
                    instance,
                    tier,
                    key,
                } => (instance, tier, key),
                other => panic!("{case}: an untyped failure: {other:?}"),
            };
            assert_eq!(instance, &key.to_string(), "{case}");
            assert_eq!(tier, "disk", "{case}");
            if let Some(damaged) = damaged {
                assert_eq!(at, damaged, "{case}: the error names the damaged chunk");
            }
            true
        }
    }
}

#[test]
fn every_damage_to_a_chunk_is_refused_naming_it_or_reads_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = placement(dir);
    let fs = FsTier::new(dir);
    let key = InstanceKey::new("Matrix", "a");
    let other = InstanceKey::new("Matrix", "b");
    let data = noise(3 * MIB, 1);
    runtime().block_on(async {
        let manifest = store(&p, &key, 1, &data).await;
        let theirs = store(&p, &other, 1, &noise(3 * MIB, 2)).await;
        let payload = Payload::Chunked(manifest.clone());
        assert!(p.fetch(&key, &payload).await.unwrap() == data);
        let n = manifest.chunks.len();
        assert!(n >= 8, "{n} chunks");
        let (mut cases, mut refused) = (0, 0);
        for (i, chunk) in manifest.chunks.iter().enumerate().step_by(n / 4) {
            let ckey = manifest.key_of(&key, chunk);
            let path = fs.path_of(&ckey);
            let pristine = std::fs::read(&path).unwrap();
            let len = pristine.len();
            let neighbour =
                std::fs::read(fs.path_of(&manifest.key_of(&key, &manifest.chunks[(i + 1) % n])))
                    .unwrap();
            let stranger = std::fs::read(
                fs.path_of(&theirs.key_of(&other, &theirs.chunks[i % theirs.chunks.len()])),
            )
            .unwrap();
            let mut damages: Vec<(String, Option<Vec<u8>>)> = Vec::new();
            for at in (0..len)
                .step_by(len / 24)
                .chain([0, 3, 4, 12, 16, 18, len - 1])
            {
                let mut flipped = pristine.clone();
                flipped[at] ^= 0x40;
                damages.push((format!("flip@{at}"), Some(flipped)));
                let mut zeroed = pristine.clone();
                zeroed[at..(at + 512).min(len)].fill(0);
                damages.push((format!("zero@{at}"), Some(zeroed)));
                damages.push((format!("truncate@{at}"), Some(pristine[..at].to_vec())));
            }
            let mut longer = pristine.clone();
            longer.push(0);
            damages.push(("extended".into(), Some(longer)));
            damages.push(("deleted".into(), None));
            damages.push(("another chunk".into(), Some(neighbour)));
            damages.push(("another instance's chunk".into(), Some(stranger)));
            for (what, bytes) in damages {
                match &bytes {
                    Some(b) => std::fs::write(&path, b).unwrap(),
                    None => std::fs::remove_file(&path).unwrap(),
                }
                let case = format!("chunk {i} {what}");
                if judge(
                    &case,
                    p.fetch(&key, &payload).await,
                    &data,
                    &key,
                    Some(&ckey),
                ) {
                    refused += 1;
                }
                cases += 1;
            }
            std::fs::write(&path, &pristine).unwrap();
        }
        assert!(p.fetch(&key, &payload).await.unwrap() == data);
        // Every damage here changes the file: each must be refused.
        assert_eq!(refused, cases, "every damaged chunk is refused");
        eprintln!("{cases} damaged chunks, each refused naming it");
    });
}

#[test]
fn every_damage_to_a_manifest_is_refused_and_never_serves_other_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = placement(dir);
    let key = InstanceKey::new("Matrix", "m");
    let data = noise(2 * MIB, 3);
    runtime().block_on(async {
        let manifest = store(&p, &key, 4, &data).await;
        let record = |state: Chunked| PlacedRecord {
            record: Record {
                flow_version: 1,
                seq: 4,
                status: Status::Waiting,
                state: Payload::Chunked(state),
                pending: None,
                timer: None,
                compensations: Vec::new(),
                failing: None,
                correlation: None,
                fan: None,
                error: None,
                cancel: None,
            },
            retired: Vec::new(),
            trash: Vec::new(),
        };
        // Damage to the record's bytes: its checksum refuses every flipped byte.
        let mut encoded = Vec::new();
        record(manifest.clone()).encode(&key, &mut encoded).unwrap();
        for at in 0..encoded.len() {
            let mut b = encoded.clone();
            b[at] ^= 0x01;
            assert!(
                PlacedRecord::decode(&b, &key, 64 * MIB).is_err(),
                "a manifest damaged at byte {at} of {} was decoded",
                encoded.len()
            );
        }
        let back = PlacedRecord::decode(&encoded, &key, 64 * MIB).unwrap();
        assert!(p.fetch(&key, &back.record.state).await.unwrap() == data);

        // A manifest that lies under a valid checksum (a buggy writer): refused on read.
        let lies: [(&str, Lie); 6] = [
            ("a longer total", |m| m.len += 1),
            ("a shorter total", |m| m.len -= 1),
            ("a total over the limit", |m| m.len = u64::MAX),
            ("a chunk's hash", |m| {
                let mut c = m.chunks.to_vec();
                c[1].hash[31] ^= 1;
                m.chunks = c.into();
            }),
            ("a chunk's step", |m| {
                let mut c = m.chunks.to_vec();
                c[2].seq += 1;
                m.chunks = c.into();
            }),
            ("a chunk's length", |m| {
                let mut c = m.chunks.to_vec();
                c[0].len -= 1;
                m.len -= 1;
                m.chunks = c.into();
            }),
        ];
        for (what, lie) in lies {
            let mut m = manifest.clone();
            lie(&mut m);
            let mut bytes = Vec::new();
            record(m).encode(&key, &mut bytes).unwrap();
            let r = PlacedRecord::decode(&bytes, &key, 64 * MIB).unwrap();
            let got = p.fetch(&key, &r.record.state).await;
            assert!(judge(what, got, &data, &key, None), "{what}: read back");
        }
    });
}
