#![allow(missing_docs)] // test-local flows
//! Large states as content-defined chunks, through the public API and with real kills.
//!
//! * A step that changes a few hundred bytes of a 4 MiB state writes the one to three
//!   chunks around the change, not the state; history shares every other chunk; a restart
//!   reads the state back whole.
//! * With history kept for one step, the chunks no record or kept entry refers to any more
//!   are swept: the tier holds exactly the current state's chunks.
//! * A damaged, truncated, missing or swapped chunk is a typed error naming instance, tier
//!   and key — never another state's bytes.
//! * Killed again and again while steps write and sweep chunks, the engine ends every flow
//!   with exactly the state its steps computed, and the tier holds no chunk a record needs
//!   that is missing (the sweep never deletes a chunk a later step wrote again).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use flowwire::prelude::*;
use flowwire::storage::{BlobError, InstanceKey, Ladder, MIB, RedbStore, Retention, Tier};
use flowwire::{Engine, Error};

#[path = "harness/kill_flows.rs"]
mod kill_flows;
#[path = "support/process.rs"]
mod process;

use kill_flows::{CHUNK_ROUNDS, ChunkState, KillChunks, chunk_data, chunk_noise, fnv};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct QuiltState {
    data: Bytes,
}

/// Holds a large state; each `patch` overwrites a few bytes of it.
#[flow]
pub struct Quilt {
    #[link]
    state: QuiltState,
}

#[flow]
impl Quilt {
    #[impulse]
    fn patch(&mut self, at: u32, len: u32, byte: u8) {
        let mut data = self.state.data.to_vec();
        let at = at as usize;
        data[at..at + len as usize].fill(byte);
        self.state.data = data.into();
    }

    #[probe]
    fn digest(&self) -> (usize, u64) {
        (self.state.data.len(), fnv(&self.state.data))
    }

    #[allow(clippy::unused_self)] // the wire's signature is fixed; this flow only waits
    #[wire]
    fn run(&mut self) -> Command<Self> {
        Command::wait()
    }
}

fn ladder(dir: &Path) -> Ladder {
    Ladder::new().default_to(Tier::fs(dir.join("disk")).named("disk"))
}

async fn engine(dir: &Path, retention: Retention) -> Engine {
    Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .history(retention)
        .flow::<Quilt>()
        .start()
        .await
        .unwrap()
}

#[path = "support/blob_files.rs"]
mod blob_files;
use blob_files::{blob_paths as chunk_files, referenced, unreferenced};

/// Waits (bounded) until the tier holds `n` chunk files: sweeps run after the commit, off
/// the runner.
async fn expect_files(dir: &Path, n: usize) {
    for _ in 0..300 {
        if chunk_files(&dir.join("disk")).len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "expected {n} chunk files, found {}",
        chunk_files(&dir.join("disk")).len()
    );
}

const STATE: usize = 4 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_to_a_large_state_writes_only_the_chunks_around_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir, Retention::All).await;
    let data = Bytes::from(chunk_noise(STATE, 3));
    let quilt = engine
        .start::<Quilt>("q", QuiltState { data: data.clone() })
        .await
        .unwrap();
    let first = chunk_files(&dir.join("disk")).len();
    let layout = engine.layout::<Quilt>("q", 10).await.unwrap();
    assert_eq!(
        layout.state.bytes,
        STATE as u64 + 4,
        "the encoded state: length and bytes"
    );
    assert_eq!(
        (layout.state.blobs, first),
        (1, 1),
        "the first step writes the state's chunks as one pack"
    );
    let chunks = layout.state.chunks;
    assert!((4..=16).contains(&chunks), "{chunks} chunks for 4 MiB");
    assert_eq!(
        std::fs::metadata(&chunk_files(&dir.join("disk"))[0])
            .unwrap()
            .len(),
        STATE as u64 + 4,
        "each chunk once, back to back"
    );

    let mut expect = data.to_vec();
    for (i, at) in [5_000u32, 1_500_000, 4_000_000].into_iter().enumerate() {
        let before = chunk_files(&dir.join("disk"));
        quilt.patch(at, 500, i as u8).await.unwrap();
        expect[at as usize..at as usize + 500].fill(i as u8);
        let new: Vec<_> = chunk_files(&dir.join("disk"))
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        assert_eq!(new.len(), 1, "a step writes one pack");
        let written = std::fs::metadata(&new[0]).unwrap().len();
        // The chunk or two around the change (512 KiB on average), not the state.
        assert!(
            written <= STATE as u64 / 4,
            "a 500-byte change wrote {written} bytes"
        );
    }
    assert_eq!(quilt.digest().await.unwrap(), (STATE, fnv(&expect)));
    engine.shutdown().await;
    drop(engine);

    let engine = self::engine(dir, Retention::All).await;
    let quilt = engine.handle::<Quilt>("q").await.unwrap();
    assert_eq!(
        quilt.digest().await.unwrap(),
        (STATE, fnv(&expect)),
        "a restart reads the state back from its chunks"
    );
    // Every snapshot is kept, and each one reads back: the first from the first step's
    // chunks, though three steps changed parts of them since.
    let first_state = engine.state_at::<Quilt>("q", 1).await.unwrap();
    assert_eq!(first_state.data, data);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_no_record_or_kept_history_refers_to_are_swept() {
    for retention in [Retention::Last(1), Retention::None] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let engine = self::engine(dir, retention).await;
        let quilt = engine
            .start::<Quilt>(
                "s",
                QuiltState {
                    data: chunk_noise(STATE, 9).into(),
                },
            )
            .await
            .unwrap();
        for i in 0..8u32 {
            quilt.patch(i * 500_000, 300, 1).await.unwrap();
        }
        let layout = engine.layout::<Quilt>("s", 10).await.unwrap();
        // Random bytes: every chunk of the state is distinct, and the packs holding them
        // are all that is kept.
        expect_files(dir, layout.state.blobs).await;
        engine.shutdown().await;
    }
}

/// The keys of the chunks an instance's record and history refer to, read from the store.
/// The instance, tier and key a blob error names, when it is the error damage `name` must
/// give.
fn named<'e>(name: &str, e: &'e BlobError) -> Option<(&'e String, &'e String, &'e String)> {
    match (name, e) {
        (
            "corrupt" | "swapped",
            BlobError::Corrupt {
                instance,
                tier,
                key,
                ..
            },
        )
        | (
            "truncated",
            BlobError::Truncated {
                instance,
                tier,
                key,
                ..
            },
        )
        | (
            "missing",
            BlobError::Missing {
                instance,
                tier,
                key,
            },
        ) => Some((instance, tier, key)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_a_typed_error_naming_instance_tier_and_key() {
    type Damage = fn(&Path, &Path);
    let cases: [(&str, Damage); 4] = [
        ("corrupt", |p, _| {
            let mut b = std::fs::read(p).unwrap();
            let at = b.len() - 1_000;
            b[at] ^= 0x10;
            std::fs::write(p, b).unwrap();
        }),
        ("truncated", |p, _| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() - 1]).unwrap();
        }),
        ("missing", |p, _| std::fs::remove_file(p).unwrap()),
        ("swapped", |p, other| {
            std::fs::copy(other, p).map(drop).unwrap();
        }),
    ];
    for (name, damage) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let engine = self::engine(dir, Retention::None).await;
        for (id, seed) in [("d", 4), ("e", 5)] {
            engine
                .start::<Quilt>(
                    id,
                    QuiltState {
                        data: chunk_noise(STATE, seed).into(),
                    },
                )
                .await
                .unwrap();
        }
        engine.shutdown().await;
        drop(engine);
        // The pack of `d`'s state, and one of another instance's to swap in.
        let files = chunk_files(&dir.join("disk"));
        let of = |id: &str| {
            files
                .iter()
                .find(|f| f.to_string_lossy().contains(&format!("Quilt@{id}@")))
                .unwrap_or_else(|| panic!("a pack of {id} in {files:?}"))
        };
        damage(of("d"), of("e"));

        let engine = self::engine(dir, Retention::None).await;
        let err = match engine.handle::<Quilt>("d").await {
            Err(e) => e,
            Ok(h) => h.digest().await.unwrap_err(),
        };
        let Error::Blob(blob) = &err else {
            panic!("{name}: expected a blob error, got {err:?}");
        };
        let Some((instance, tier, key)) = named(name, blob) else {
            panic!("{name}: {blob:?}");
        };
        assert_eq!((instance.as_str(), tier.as_str()), ("Quilt/d", "disk"));
        assert!(
            key.starts_with("Quilt/d/") && key.contains(".sp-"),
            "{name}: {key}"
        );
        assert!(err.to_string().contains(key.as_str()), "{err}");
        engine.shutdown().await;
    }
}

const KILLS: u64 = 10;
const FLOWS: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_steps_write_and_sweep_chunks_every_state_reads_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Kill at varying points of the rounds: while chunks are written, committed, swept.
    let flows = FLOWS.to_string();
    let out = process::kill_at_each(
        &["chunks", dir.to_str().unwrap(), &flows],
        (0..KILLS).map(|k| Duration::from_millis(30 + k * 47 % 300)),
    );
    assert!(out.contains("DONE"), "{out}");

    // Every flow ended with exactly the state its rounds computed (the harness checked it
    // too), read back from chunks every one of which is on disk and intact.
    let engine = Engine::builder()
        .data_dir(dir.join("data"))
        .storage(kill_flows::chunk_ladder(dir))
        .history(Retention::Last(1))
        .flow::<KillChunks>()
        .start()
        .await
        .unwrap();
    for i in 0..FLOWS {
        let state: ChunkState = engine
            .handle::<KillChunks>(format!("chunks-{i}"))
            .await
            .unwrap()
            .state()
            .await
            .unwrap();
        assert_eq!(state.round, CHUNK_ROUNDS);
        assert!(state.data == chunk_data(i, CHUNK_ROUNDS), "chunks-{i}");
    }
    engine.shutdown().await;
    drop(engine);

    // The sweep kept up: what is on disk beyond the chunks the records and kept history
    // refer to is at most what a kill can strand (the deletes of the steps committed just
    // before it).
    let store = RedbStore::open(dir.join("data").join("instances.redb")).unwrap();
    let mut wanted = Vec::new();
    for i in 0..FLOWS {
        let key = InstanceKey::new("KillChunks", format!("chunks-{i}"));
        wanted.extend(referenced(&store, &key).await);
    }
    let stranded = unreferenced(&dir.join("chunks"), &wanted);
    let bound = (KILLS as usize) * FLOWS as usize * 4;
    assert!(
        stranded <= bound,
        "{stranded} unreferenced chunk files (bound {bound}); without the sweep every round would leave one"
    );
}
