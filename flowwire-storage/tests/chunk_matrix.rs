//! The corruption matrix over chunks and manifests.
//!
//! A 3 MiB payload is placed through the ladder as chunks on a real file tier (one pack
//! for the step), then damaged: the pack flipped or zeroed at many offsets (and at every
//! chunk's first and last byte), truncated, extended, deleted, or replaced by another
//! instance's pack or another step's; a manifest of chunks stored as blobs of their own
//! (as records of formats 8 and 9 wrote them) likewise, each chunk file also swapped for
//! another; and a manifest damaged at every byte of the record that holds it, and
//! rewritten with wrong lengths, hashes or steps under a valid checksum (what a buggy
//! writer could leave).
//!
//! Every case ends with the exact bytes or a typed error naming the instance, the tier and
//! the pack's or chunk's key (for the record's bytes, a codec error): never other bytes,
//! never a panic.

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

/// Damages of the blob at `path` (pristine bytes `pristine`) to try, with `others`: whole
/// blobs of other chunks, packs or instances to put in its place.
fn damages(pristine: &[u8], others: &[(&str, Vec<u8>)]) -> Vec<(String, Option<Vec<u8>>)> {
    let len = pristine.len();
    let mut out: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for at in (0..len)
        .step_by((len / 48).max(1))
        .chain([0, 3, 4, 12, 16, 18, len - 1])
    {
        let mut flipped = pristine.to_vec();
        flipped[at] ^= 0x40;
        out.push((format!("flip@{at}"), Some(flipped)));
        let mut zeroed = pristine.to_vec();
        zeroed[at..(at + 512).min(len)].fill(0);
        out.push((format!("zero@{at}"), Some(zeroed)));
        out.push((format!("truncate@{at}"), Some(pristine[..at].to_vec())));
    }
    let mut longer = pristine.to_vec();
    longer.push(0);
    out.push(("extended".into(), Some(longer)));
    out.push(("deleted".into(), None));
    for (what, bytes) in others {
        out.push(((*what).to_string(), Some(bytes.clone())));
    }
    out
}

/// Applies each damage to the file at `path` in turn, reading the payload back after each:
/// returns how many cases there were and how many were refused.
async fn try_damages(
    p: &Placement,
    key: &InstanceKey,
    payload: &Payload,
    data: &[u8],
    (path, blob_key): (&Path, &str),
    damages: Vec<(String, Option<Vec<u8>>)>,
) -> (usize, usize) {
    let pristine = std::fs::read(path).unwrap();
    let (mut cases, mut refused) = (0, 0);
    for (what, bytes) in damages {
        match &bytes {
            Some(b) => std::fs::write(path, b).unwrap(),
            None => std::fs::remove_file(path).unwrap(),
        }
        let case = format!("{blob_key} {what}");
        if judge(
            &case,
            p.fetch(key, payload).await,
            data,
            key,
            Some(blob_key),
        ) {
            refused += 1;
        }
        cases += 1;
    }
    std::fs::write(path, &pristine).unwrap();
    (cases, refused)
}

#[test]
fn every_damage_to_a_pack_is_refused_naming_it_or_reads_back_exactly() {
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
        // The same instance's pack of another step, holding other bytes.
        let later = store(&p, &key, 2, &noise(3 * MIB, 3)).await;
        let payload = Payload::Chunked(manifest.clone());
        assert!(p.fetch(&key, &payload).await.unwrap() == data);
        let n = manifest.chunks.len();
        assert!(n >= 8, "{n} chunks");
        let packs: Vec<_> = manifest.distinct().collect();
        assert_eq!(packs.len(), 1, "a step writes its new chunks as one pack");
        let pack = manifest.key_of(&key, packs[0]);
        let path = fs.path_of(&pack);
        let pristine = std::fs::read(&path).unwrap();
        assert_eq!(
            pristine.len(),
            data.len(),
            "the pack is the chunks, back to back"
        );
        let read = |m: &Chunked, k: &InstanceKey| {
            std::fs::read(fs.path_of(&m.key_of(k, &m.chunks[0]))).unwrap()
        };
        let mut cases = damages(
            &pristine,
            &[
                ("another instance's pack", read(&theirs, &other)),
                ("another step's pack", read(&later, &key)),
            ],
        );
        // And at each chunk's first and last byte.
        for c in manifest.chunks.iter() {
            for at in [c.at, c.at + u64::from(c.len) - 1] {
                let mut flipped = pristine.clone();
                flipped[at as usize] ^= 1;
                cases.push((format!("flip@{at} (a chunk's edge)"), Some(flipped)));
            }
        }
        let (cases, refused) = try_damages(&p, &key, &payload, &data, (&path, &pack), cases).await;
        assert!(p.fetch(&key, &payload).await.unwrap() == data);
        // Every damage but one changes bytes a chunk holds: each of those is refused. A byte
        // appended past the last chunk changes none (and reads back exactly, as `judge`
        // checked).
        assert_eq!(
            refused,
            cases - 1,
            "every damage to a chunk's bytes is refused"
        );
        eprintln!("{cases} damaged packs, {refused} refused naming the pack");
    });
}

#[test]
fn every_damage_to_a_chunk_of_its_own_is_refused_naming_it_or_reads_back_exactly() {
    // Records of formats 8 and 9 stored each chunk as a framed blob of its own, under a key
    // naming its content; such a manifest still reads, and every damage to one is refused.
    use flowwire_storage::blob::header;
    use flowwire_storage::chunk::{ChunkRef, cdc, chunk_key};
    use flowwire_storage::tier::BlobTier;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = placement(dir);
    let fs = FsTier::new(dir);
    let key = InstanceKey::new("Matrix", "own");
    let other = InstanceKey::new("Matrix", "own-b");
    let data = noise(3 * MIB, 4);
    let size = cdc::ChunkSize::around(128 * 1024);
    runtime().block_on(async {
        let own = |k: &InstanceKey, bytes: &[u8]| {
            let mut chunks = Vec::new();
            let mut at = 0;
            for len in cdc::lengths(bytes, &size) {
                chunks.push((
                    at,
                    ChunkRef {
                        seq: 1,
                        ..ChunkRef::of(&bytes[at..at + len])
                    },
                ));
                at += len;
            }
            let manifest = Chunked {
                tier: "disk".into(),
                role: 's',
                len: bytes.len() as u64,
                chunks: chunks.iter().map(|(_, c)| *c).collect(),
                inline: std::sync::Arc::default(),
            };
            (manifest, chunks, k.clone())
        };
        let mut written = Vec::new();
        for (bytes, k) in [(&data[..], &key), (&noise(3 * MIB, 5)[..], &other)] {
            let (m, chunks, k) = own(k, bytes);
            for (at, c) in &chunks {
                let ck = chunk_key(&k, c.seq, 's', &c.hash);
                let body = Bytes::copy_from_slice(&bytes[*at..*at + c.len as usize]);
                let parts = [header(&ck, u64::from(c.len), c.crc), body];
                fs.put(&ck, &parts).await.unwrap();
            }
            written.push(m);
        }
        let (manifest, theirs) = (&written[0], &written[1]);
        let payload = Payload::Chunked(manifest.clone());
        assert!(p.fetch(&key, &payload).await.unwrap() == data);
        let n = manifest.chunks.len();
        assert!(n >= 8, "{n} chunks");
        let (mut cases, mut refused) = (0, 0);
        for (i, chunk) in manifest.chunks.iter().enumerate().step_by(n / 4) {
            let ckey = manifest.key_of(&key, chunk);
            let path = fs.path_of(&ckey);
            let pristine = std::fs::read(&path).unwrap();
            let neighbour =
                std::fs::read(fs.path_of(&manifest.key_of(&key, &manifest.chunks[(i + 1) % n])))
                    .unwrap();
            let stranger = std::fs::read(
                fs.path_of(&theirs.key_of(&other, &theirs.chunks[i % theirs.chunks.len()])),
            )
            .unwrap();
            let (c, r) = try_damages(
                &p,
                &key,
                &payload,
                &data,
                (&path, &ckey),
                damages(
                    &pristine,
                    &[
                        ("another chunk", neighbour),
                        ("another instance's chunk", stranger),
                    ],
                ),
            )
            .await;
            cases += c;
            refused += r;
        }
        assert!(p.fetch(&key, &payload).await.unwrap() == data);
        // Every damage here changes the framed file: each must be refused.
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
