#![allow(missing_docs)] // test-local flows
//! Large fields of a state as `flowwire::Blob`: kept by reference, stored as the chunks of
//! any large state, and written once.
//!
//! * A step that leaves a 4 MiB blob as it is writes no chunk: the small fields around it
//!   live in the manifest, and the blob's chunks keep the key of the step that first wrote
//!   them; after a restart (the blob read back from its chunks), still none.
//! * A step that replaces the blob writes the new blob's chunks.
//! * A new blob its tier cannot take fails its step (a start takes no id) and changes
//!   nothing: the instance goes on from its last state once the tier is back.
//! * What is stored is the state's usual encoding: a `Blob` field reads back as the
//!   `Bytes` a flow declared before, and every snapshot reads back.
//! * Killed again and again while steps keep, replace and sweep blobs, the engine ends
//!   every flow with exactly the state its steps computed, every chunk a record refers to
//!   on disk.
//! * A finished flow's state reads back whole, before and after a restart (from its
//!   chunks, into a new buffer).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use flowwire::prelude::*;
use flowwire::storage::record::PlacedRecord;
use flowwire::storage::{InstanceKey, InstanceStore, Ladder, MIB, Payload, RedbStore, Tier};
use flowwire::{Blob, Engine};

#[path = "support/blob_files.rs"]
mod blob_files;
#[path = "harness/kill_flows.rs"]
mod kill_flows;
#[path = "support/process.rs"]
mod process;

use blob_files::{blob_paths as chunk_files, referenced, unreferenced};
use kill_flows::{BlobState, CHUNK_ROUNDS, KillBlobs, blob_scan, chunk_noise, fnv};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LedgerState {
    scan: Blob,
    stamps: Vec<u32>,
    closed: bool,
}

/// Holds a large scan and a list of stamps; stamping changes a few bytes after the scan.
#[flow]
pub struct Ledger {
    #[link]
    state: LedgerState,
}

#[flow]
impl Ledger {
    #[impulse]
    fn stamp(&mut self, n: u32) {
        self.state.stamps.push(n);
    }

    #[impulse]
    fn close(&mut self) {
        self.state.closed = true;
    }

    #[impulse]
    fn rescan(&mut self, seed: u64) {
        self.state.scan = Blob::from(chunk_noise(self.state.scan.len(), seed));
    }

    #[probe]
    fn digest(&self) -> (u64, Vec<u32>) {
        (fnv(&self.state.scan), self.state.stamps.clone())
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.closed {
            return Command::finish();
        }
        Command::wait()
    }
}

/// The same flow as it was declared before its scan became a `Blob`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LedgerBytes {
    scan: Bytes,
    stamps: Vec<u32>,
    closed: bool,
}

async fn engine(dir: &Path) -> Engine {
    Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .flow::<Ledger>()
        .start()
        .await
        .unwrap()
}

fn ladder(dir: &Path) -> Ladder {
    Ladder::new().default_to(Tier::fs(dir.join("disk")).named("disk"))
}

fn store(dir: &Path) -> RedbStore {
    RedbStore::open(dir.join("data").join("instances.redb")).unwrap()
}

/// The stored state's manifest: each chunk in a pack, its hash with the step that wrote
/// it, and how many small pieces it holds inline (read with the engine shut down).
async fn manifest(dir: &Path) -> (Vec<(u64, [u8; 32])>, usize) {
    let key = InstanceKey::new("Ledger", "l");
    let stored = store(dir).load(&key).await.unwrap().unwrap();
    let record = PlacedRecord::decode(&stored.bytes, &key, 64 * MIB).unwrap();
    match &record.record.state {
        Payload::Chunked(c) => (
            c.chunks
                .iter()
                .filter(|c| !c.is_inline())
                .map(|c| (c.seq, c.hash))
                .collect(),
            c.inline.len(),
        ),
        other => panic!("a 4 MiB state is chunked, not {other:?}"),
    }
}

const SCAN: usize = 4 * MIB;

fn files(dir: &Path) -> usize {
    chunk_files(&dir.join("disk")).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_keeps_a_large_blob_writes_none_of_its_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    let scan = chunk_noise(SCAN, 11);
    engine
        .start::<Ledger>(
            "l",
            LedgerState {
                scan: Blob::from(scan.clone()),
                stamps: Vec::new(),
                closed: false,
            },
        )
        .await
        .unwrap();
    let first = files(dir);
    assert_eq!(first, 1, "the start writes the blob's chunks as one pack");
    engine.shutdown().await;
    drop(engine);
    let at_start = manifest(dir).await;
    let chunks = at_start.0.len();
    assert!((4..=16).contains(&chunks), "{chunks} chunks for 4 MiB");

    let engine = self::engine(dir).await;
    let ledger = engine.handle::<Ledger>("l").await.unwrap();
    let mut stamps = Vec::new();
    for n in 0..5u32 {
        let before = files(dir);
        ledger.stamp(n).await.unwrap();
        stamps.push(n);
        assert_eq!(
            files(dir),
            before,
            "a stamp writes no chunk: the small fields around the blob live in the manifest"
        );
    }
    assert_eq!(ledger.digest().await.unwrap(), (fnv(&scan), stamps.clone()));
    engine.shutdown().await;
    drop(engine);
    let now = manifest(dir).await;
    assert_eq!(
        now.0, at_start.0,
        "the blob's chunks keep the keys the first step wrote them under"
    );
    assert!(now.0.iter().all(|(seq, _)| *seq == 1));
    assert_eq!(
        (at_start.1, now.1),
        (2, 2),
        "the blob's length before it and the fields after it, inline"
    );

    // A new blob: its chunks are written.
    let engine = self::engine(dir).await;
    let ledger = engine.handle::<Ledger>("l").await.unwrap();
    let before = files(dir);
    ledger.rescan(12).await.unwrap();
    assert_eq!(
        files(dir) - before,
        first,
        "a new scan writes its own chunks and nothing else"
    );
    let rescanned = chunk_noise(SCAN, 12);
    assert_eq!(
        ledger.digest().await.unwrap(),
        (fnv(&rescanned), stamps.clone())
    );
    let then: LedgerState = engine.state_at::<Ledger>("l", 1).await.unwrap();
    assert_eq!(&then.scan[..], &scan[..], "every snapshot reads back");
    engine.shutdown().await;
    drop(engine);

    // Stored as bytes are: the state reads as the flow declared it with `Bytes`.
    let key = InstanceKey::new("Ledger", "l");
    let stored = store(dir).load(&key).await.unwrap().unwrap();
    let placed = PlacedRecord::decode(&stored.bytes, &key, 64 * MIB).unwrap();
    let placement = ladder(dir).validate(64 * MIB).unwrap();
    let record = placement.resolve(&key, &placed).await.unwrap();
    let as_bytes: LedgerBytes = postcard::from_bytes(&record.state).unwrap();
    assert_eq!(&as_bytes.scan[..], &rescanned[..]);
    assert_eq!(as_bytes.stamps, stamps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_blob_its_tier_cannot_take_fails_its_step_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    let ledger_state = |seed| LedgerState {
        scan: Blob::from(chunk_noise(SCAN, seed)),
        stamps: Vec::new(),
        closed: false,
    };
    let ledger = engine.start::<Ledger>("l", ledger_state(21)).await.unwrap();
    // The tier's directory is gone, a file in its place: every write to it fails.
    let disk = dir.join("disk");
    std::fs::rename(&disk, dir.join("away")).unwrap();
    std::fs::write(&disk, b"not a directory").unwrap();

    let err = ledger.rescan(22).await.unwrap_err();
    assert!(err.to_string().contains("tier `disk`"), "{err}");
    let err = engine
        .start::<Ledger>("m", ledger_state(23))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tier `disk`"), "{err}");
    assert!(
        matches!(
            engine.handle::<Ledger>("m").await,
            Err(flowwire::Error::NotFound { .. })
        ),
        "a start whose blob could not be written takes no id"
    );

    // With the tier back, the instance is as it was and takes steps; the id is free.
    std::fs::remove_file(&disk).unwrap();
    std::fs::rename(dir.join("away"), &disk).unwrap();
    ledger.stamp(1).await.unwrap();
    assert_eq!(
        ledger.digest().await.unwrap(),
        (fnv(&chunk_noise(SCAN, 21)), vec![1])
    );
    let m = engine.start::<Ledger>("m", ledger_state(23)).await.unwrap();
    assert_eq!(m.digest().await.unwrap().0, fnv(&chunk_noise(SCAN, 23)));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_flow_reads_its_blob_back_whole_before_and_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    let scan = Blob::from(chunk_noise(SCAN, 21));
    let ledger = engine
        .start::<Ledger>(
            "l",
            LedgerState {
                scan: scan.clone(),
                ..LedgerState::default()
            },
        )
        .await
        .unwrap();
    ledger.stamp(1).await.unwrap();
    ledger.close().await.unwrap();
    assert_eq!(ledger.finished().await.unwrap(), flowwire::Ended::Finished);
    let state = ledger.state().await.unwrap();
    assert_eq!(state.stamps, vec![1]);
    assert_eq!(state.scan, scan);
    engine.shutdown().await;
    drop(engine);

    // From the store after a restart: read back from its chunks, equal in bytes.
    let engine = self::engine(dir).await;
    let state = engine
        .handle::<Ledger>("l")
        .await
        .unwrap()
        .state()
        .await
        .unwrap();
    assert_eq!(state.scan, scan);
    assert!(!state.scan.same(&scan));
    engine.shutdown().await;
}

const KILLS: u64 = 10;
const FLOWS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_steps_keep_replace_and_sweep_blobs_every_state_reads_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Kill at varying points: while a blob's chunks are written, a step commits, the
    // sweep deletes a replaced blob's chunks.
    let flows = FLOWS.to_string();
    let out = process::kill_at_each(
        &["blobs", dir.to_str().unwrap(), &flows],
        (0..KILLS).map(|k| Duration::from_millis(30 + k * 53 % 300)),
    );
    assert!(out.contains("DONE"), "{out}");

    let engine = Engine::builder()
        .data_dir(dir.join("data"))
        .storage(kill_flows::chunk_ladder(dir))
        .history(flowwire::storage::Retention::Last(1))
        .flow::<KillBlobs>()
        .start()
        .await
        .unwrap();
    for i in 0..FLOWS {
        let state: BlobState = engine
            .handle::<KillBlobs>(format!("blobs-{i}"))
            .await
            .unwrap()
            .state()
            .await
            .unwrap();
        assert_eq!(state.round, CHUNK_ROUNDS);
        assert_eq!(state.sum, u64::from(CHUNK_ROUNDS * (CHUNK_ROUNDS + 1) / 2));
        assert!(state.scan == blob_scan(i, CHUNK_ROUNDS), "blobs-{i}");
    }
    engine.shutdown().await;
    drop(engine);

    // Every chunk the records and kept history refer to is on disk; what else is there is
    // at most what the kills can strand.
    let store = RedbStore::open(dir.join("data").join("instances.redb")).unwrap();
    let mut wanted = Vec::new();
    for i in 0..FLOWS {
        let key = InstanceKey::new("KillBlobs", format!("blobs-{i}"));
        wanted.extend(referenced(&store, &key).await);
    }
    // A kill can strand a step's new chunks and the deletes of the steps committed just
    // before it: 11 measured. Without the sweep, about 270 (each flow writes some 77 chunk
    // files: a head piece each round, four chunks for each of its nine blobs).
    let stranded = unreferenced(&dir.join("chunks"), &wanted);
    let bound = (KILLS as usize) * FLOWS as usize * 3;
    eprintln!("{stranded} unreferenced chunk files after {KILLS} kills (bound {bound})");
    assert!(
        stranded <= bound,
        "{stranded} unreferenced chunk files (bound {bound}); the sweep fell behind"
    );
}
