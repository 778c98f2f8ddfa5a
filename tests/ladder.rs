#![allow(missing_docs)] // test-local flows and drivers
//! The engine on the storage ladder, through the public API: payloads climb and descend
//! the tiers as they grow and shrink, old blobs are collected once no record or kept history
//! refers to them, call arguments and replies ride the ladder too, a restart reads large
//! states back from their tier, and a damaged blob is a typed error naming instance, tier
//! and key.

use std::path::Path;
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::layout::Layout;
use flowwire::storage::{BlobError, KIB, Ladder, MB, Retention, Tier};
use flowwire::{Engine, Error};

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("refused")]
pub struct Refused;

#[driver(timeout = "10s")]
pub trait Archive {
    async fn mirror(&self, data: Vec<u8>) -> Result<Vec<u8>, Refused>;
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct AlbumState {
    data: Vec<u8>,
    mirror: bool,
    done: bool,
}

#[flow]
pub struct Album {
    #[link]
    state: AlbumState,
    #[link]
    archive: impl Archive,
}

fn pattern(len: u32) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[flow]
impl Album {
    #[impulse]
    fn resize(&mut self, len: u32) {
        self.state.data = pattern(len);
    }
    #[impulse]
    fn mirror(&mut self) {
        self.state.mirror = true;
    }
    #[impulse]
    fn close(&mut self) {
        self.state.done = true;
    }
    #[probe]
    fn size(&self) -> usize {
        self.state.data.len()
    }
    #[probe]
    fn intact(&self) -> bool {
        let n = self.state.data.len();
        self.state.data == pattern(n as u32)
            || self.state.data.iter().rev().copied().eq(pattern(n as u32))
    }
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        if self.state.mirror {
            return Command::drive(self.archive.mirror(self.state.data.clone())).then(|f, r| {
                f.state.data = r?;
                f.state.mirror = false;
                Ok(())
            });
        }
        Command::wait()
    }
}

/// Returns the data reversed.
#[derive(Clone, Default)]
struct Reverser;

#[driver]
impl Archive for Reverser {
    async fn mirror(&self, mut data: Vec<u8>) -> Result<Vec<u8>, Refused> {
        data.reverse();
        Ok(data)
    }
}

/// Every payload one blob: these tests follow whole blobs up and down the ladder (large
/// states as chunks are tests/chunks.rs).
fn ladder(dir: &Path) -> Ladder {
    Ladder::new()
        .chunk_from(usize::MAX)
        .inline_below(4 * KIB)
        .below(MB, Tier::fs(dir.join("fast")).named("fast"))
        .default_to(Tier::fs(dir.join("slow")).named("slow"))
}

async fn engine(dir: &Path, retention: Retention) -> Engine {
    Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .history(retention)
        .flow::<Album>()
        .driver(Reverser)
        .start()
        .await
        .unwrap()
}

#[path = "support/blob_files.rs"]
mod blob_files;
use blob_files::blob_files as blobs;

/// Waits (bounded) until the tier directories hold the expected counts; deletion of
/// unreferenced blobs runs after the commit, off the runner.
async fn expect_blobs(dir: &Path, fast: usize, slow: usize) {
    for _ in 0..200 {
        if (blobs(&dir.join("fast")), blobs(&dir.join("slow"))) == (fast, slow) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "expected {fast} blobs on `fast` and {slow} on `slow`, found {} and {}",
        blobs(&dir.join("fast")),
        blobs(&dir.join("slow"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_climbs_and_descends_the_ladder_and_old_blobs_are_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir, Retention::Last(2)).await;
    let album = engine
        .start::<Album>("a1", AlbumState::default())
        .await
        .unwrap();
    album.resize(100).await.unwrap();
    expect_blobs(dir, 0, 0).await;
    album.resize(100_000).await.unwrap();
    expect_blobs(dir, 1, 0).await;
    assert_eq!(album.size().await.unwrap(), 100_000);
    album.resize(2_000_000).await.unwrap();
    // The 100 KB state is still in the kept history (last 2 steps): not collected yet.
    expect_blobs(dir, 1, 1).await;
    assert_eq!(album.size().await.unwrap(), 2_000_000);
    album.resize(10).await.unwrap();
    expect_blobs(dir, 0, 1).await;
    album.resize(20).await.unwrap();
    // No record and no kept history entry refers to either blob any more.
    expect_blobs(dir, 0, 0).await;
    assert_eq!(album.size().await.unwrap(), 20);
    let layout = engine.layout::<Album>("a1", 100).await.unwrap();
    assert!(layout.state.is_inline());
    assert_eq!(layout.steps.len(), 2, "Last(2) keeps two entries");
    assert!(referenced(&layout, "fast").is_empty() && referenced(&layout, "slow").is_empty());
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_history_a_replaced_blob_goes_at_once_and_with_all_history_none_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir, Retention::None).await;
    let album = engine
        .start::<Album>("n", AlbumState::default())
        .await
        .unwrap();
    album.resize(100_000).await.unwrap();
    expect_blobs(dir, 1, 0).await;
    album.resize(200_000).await.unwrap();
    expect_blobs(dir, 1, 0).await;
    album.resize(1).await.unwrap();
    expect_blobs(dir, 0, 0).await;
    engine.shutdown().await;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir, Retention::All).await;
    let album = engine
        .start::<Album>("k", AlbumState::default())
        .await
        .unwrap();
    album.resize(100_000).await.unwrap();
    album.resize(200_000).await.unwrap();
    album.resize(1).await.unwrap();
    // Every snapshot stays for time travel.
    expect_blobs(dir, 2, 0).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_arguments_and_replies_ride_the_ladder_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir, Retention::All).await;
    let album = engine
        .start::<Album>("m", AlbumState::default())
        .await
        .unwrap();
    album.resize(3_000_000).await.unwrap();
    album.mirror().await.unwrap();
    for _ in 0..500 {
        if album.intact().await.unwrap() && blobs(&dir.join("slow")) == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // On `slow`: the 3 MB state after `resize`, the state after `mirror` (the flag
    // changed), the reply (history) and the mirrored state. The call's argument went when
    // the reply's step dropped it: no history entry refers to a call argument.
    let layout = engine.layout::<Album>("m", 100).await.unwrap();
    assert!(layout.call.is_none());
    let on_slow = referenced(&layout, "slow");
    assert_eq!(on_slow.len(), 4, "{on_slow:?}");
    assert!(
        on_slow
            .iter()
            .all(|k| k.rsplit_once('.').map(|(_, role)| role) != Some("c")),
        "{on_slow:?}"
    );
    assert_eq!(
        blobs(&dir.join("slow")),
        4,
        "exactly the referenced blobs are on disk"
    );
    engine.shutdown().await;

    let engine = self::engine(dir, Retention::All).await;
    let album = engine.handle::<Album>("m").await.unwrap();
    assert_eq!(album.size().await.unwrap(), 3_000_000);
    assert!(
        album.intact().await.unwrap(),
        "the state read back from its blob is intact"
    );
    album.close().await.unwrap();
    engine.shutdown().await;
}

/// The distinct blob keys on `tier` that an instance's record and kept history refer to.
fn referenced(layout: &Layout, tier: &str) -> std::collections::BTreeSet<String> {
    std::iter::once(&layout.state)
        .chain(&layout.call)
        .chain(
            layout
                .steps
                .iter()
                .flat_map(|s| s.payload.iter().chain(&s.state)),
        )
        .filter(|p| &*p.tier == tier)
        .filter_map(|p| p.key.as_deref().map(str::to_string))
        .collect()
}

/// The single blob file of a tier.
fn only_blob(tier: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(tier)
        .unwrap()
        .flat_map(|f| std::fs::read_dir(f.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_is_a_typed_error_naming_instance_tier_and_key() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 3] = [
        ("corrupt", |p| {
            let mut b = std::fs::read(p).unwrap();
            let last = b.len() - 1;
            b[last] ^= 0xff;
            std::fs::write(p, b).unwrap();
        }),
        ("truncated", |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() / 2]).unwrap();
        }),
        ("missing", |p| std::fs::remove_file(p).unwrap()),
    ];
    for (name, damage) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let engine = self::engine(dir, Retention::None).await;
        let album = engine
            .start::<Album>("d1", AlbumState::default())
            .await
            .unwrap();
        album.resize(50_000).await.unwrap();
        engine.shutdown().await;
        drop(engine);
        damage(&only_blob(&dir.join("fast")));

        // The engine starts (the damaged instance is left untouched, others would run) …
        let engine = self::engine(dir, Retention::None).await;
        let err = match engine.handle::<Album>("d1").await {
            Err(e) => e,
            Ok(h) => h.size().await.unwrap_err(),
        };
        // … and reaching the instance names what is wrong and where.
        let Error::Blob(blob) = &err else {
            panic!("{name}: expected a blob error, got {err:?}");
        };
        match (name, &**blob) {
            (
                "corrupt",
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
            ) => {
                assert_eq!(instance, "Album/d1");
                assert_eq!(tier, "fast");
                assert!(key.starts_with("Album/d1/"), "{key}");
            }
            other => panic!("{name}: wrong error {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("Album/d1") && text.contains("`fast`"),
            "{text}"
        );
        assert!(!blob.is_transient(), "{name} is not retried");
        engine.shutdown().await;
    }
}
