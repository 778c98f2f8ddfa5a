#![allow(missing_docs)] // test-local flows and drivers
//! What the engine promises about acknowledged data, tried from outside through the public
//! API as an attacker of a storage engine would: a refused start never touches the instance
//! that holds the id, awkward ids work on every rung of the ladder, and a write the engine
//! could not read back is refused before anything is stored.
//!
//! (Long because it is the integrity promise list of docs/architecture.md, one test per
//! promise, kept in the order the list gives; the matrices and the fuzzing live in
//! flowwire-storage's own tests.)

use std::path::Path;

use flowwire::prelude::*;
use flowwire::storage::{KIB, Ladder, MB, RedbStore, StoreError, Tier};
use flowwire::{Engine, Error};

#[path = "support/faulty.rs"]
mod faulty;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxState {
    data: Vec<u8>,
    done: bool,
}

/// Holds bytes until told to finish; waits (so it is not resident) in between.
#[flow]
pub struct Vault {
    #[link]
    state: BoxState,
}

#[flow]
impl Vault {
    #[impulse]
    fn fill(&mut self, len: u32, byte: u8) {
        self.state.data = vec![byte; len as usize];
    }
    #[impulse]
    fn close(&mut self) {
        self.state.done = true;
    }
    #[probe]
    fn data(&self) -> Vec<u8> {
        self.state.data.clone()
    }
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        Command::wait()
    }
}

fn ladder(dir: &Path) -> Ladder {
    Ladder::new()
        .inline_below(4 * KIB)
        .below(MB, Tier::fs(dir.join("fast")).named("fast"))
        .default_to(Tier::fs(dir.join("slow")).named("slow"))
}

async fn engine(dir: &Path) -> Engine {
    Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .flow::<Vault>()
        .start()
        .await
        .unwrap()
}

fn state(len: usize, byte: u8) -> BoxState {
    BoxState {
        data: vec![byte; len],
        done: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_duplicate_start_leaves_the_existing_instance_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    // Large states, on both tiers; the instances wait, so they are not resident.
    for (id, len) in [("fast", 100_000), ("slow", 2_000_000)] {
        engine.start::<Vault>(id, state(len, 1)).await.unwrap();
        for other in [state(len, 2), state(len / 2, 3), state(10, 4)] {
            let err = engine.start::<Vault>(id, other).await.unwrap_err();
            assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        }
        let vault = engine.handle::<Vault>(id).await.unwrap();
        assert_eq!(vault.data().await.unwrap(), vec![1; len], "{id}");
    }
    engine.shutdown().await;

    // Also after a restart, and in history.
    let engine = self::engine(dir).await;
    for (id, len) in [("fast", 100_000), ("slow", 2_000_000)] {
        let vault = engine.handle::<Vault>(id).await.unwrap();
        assert_eq!(vault.data().await.unwrap(), vec![1; len], "{id}");
        let first: BoxState = engine.state_at::<Vault>(id, 1).await.unwrap();
        assert_eq!(first, state(len, 1), "{id} at its first step");
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_ids_work_inline_and_on_every_tier_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ids = flowwire::storage::tier::conformance::awkward_ids();
    let engine = self::engine(dir).await;
    for (i, id) in ids.iter().enumerate() {
        let vault = engine
            .start::<Vault>(id.as_str(), state(10, i as u8))
            .await
            .unwrap_or_else(|e| panic!("{id:.40?}: {e}"));
        // Inline, then on `fast`, then on `slow`.
        for len in [100_000, 1_500_000] {
            vault.fill(len, i as u8).await.unwrap();
        }
    }
    engine.shutdown().await;

    let engine = self::engine(dir).await;
    for (i, id) in ids.iter().enumerate() {
        let vault = engine.handle::<Vault>(id.as_str()).await.unwrap();
        assert_eq!(
            vault.data().await.unwrap(),
            vec![i as u8; 1_500_000],
            "{id:.40?}"
        );
        for (step, len) in [(1, 10), (2, 100_000)] {
            let then: BoxState = engine.state_at::<Vault>(id.as_str(), step).await.unwrap();
            assert_eq!(then.data, vec![i as u8; len], "{id:.40?} at step {step}");
        }
        vault.close().await.unwrap();
    }
    engine.shutdown().await;
}

async fn engine_with_limit(dir: &Path, limit: usize) -> Engine {
    Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .decode_limit(limit)
        .flow::<Vault>()
        .start()
        .await
        .unwrap()
}

#[path = "support/blob_files.rs"]
mod blob_files;
use blob_files::blob_files;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_over_the_decode_limit_is_refused_before_anything_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let limit = 2 * MB;
    let engine = engine_with_limit(dir, limit).await;

    // A start whose state the engine could not read back.
    let err = engine
        .start::<Vault>("big", state(3 * MB, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { what: "state", size, limit: l } if size > 3 * MB as u64 && l == limit),
        "{err}"
    );
    assert!(matches!(
        engine.handle::<Vault>("big").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        blob_files(&dir.join("fast")) + blob_files(&dir.join("slow")),
        0
    );

    // An impulse that would grow the state past it: refused, the state as it was.
    let vault = engine.start::<Vault>("v", state(MB, 2)).await.unwrap();
    let err = vault.fill(3 * MB as u32, 3).await.unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { what: "state", .. }),
        "{err}"
    );
    assert_eq!(vault.data().await.unwrap(), vec![2; MB]);
    // Under the limit it still applies.
    vault.fill(MB as u32 + 1, 4).await.unwrap();
    engine.shutdown().await;

    let engine = engine_with_limit(dir, limit).await;
    let vault = engine.handle::<Vault>("v").await.unwrap();
    assert_eq!(vault.data().await.unwrap(), vec![4; MB + 1]);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_stored_under_another_instances_key_is_refused_not_served() {
    use flowwire::storage::{Expect, InstanceKey, InstanceStore, MemoryStore, StepWrite};
    use std::sync::Arc;

    let store = Arc::new(MemoryStore::new());
    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Vault>()
        .start()
        .await
        .unwrap();
    engine.start::<Vault>("a", state(10, 1)).await.unwrap();
    engine.start::<Vault>("b", state(10, 2)).await.unwrap();
    engine.shutdown().await;

    // Put a's record under a new key, as a damaged index or a flipped key bit would.
    let a = store
        .load(&InstanceKey::new("Vault", "a"))
        .await
        .unwrap()
        .unwrap();
    let results = store
        .commit(vec![StepWrite {
            key: InstanceKey::new("Vault", "c"),
            expect: Expect::Absent,
            version: a.version,
            seq: 1,
            record: a.bytes.clone(),
            active: false,
            parked: false,
            timer: None,
            correlation: None,
            uncorrelate: None,
            ended_key: None,
            impulse: None,
            history: None,
            prune_below: None,
            fence: None,
            acknowledges: None,
            sends: Vec::new(),
            checksums: flowwire::storage::codec::Checksums::Written,
        }])
        .await
        .unwrap();
    assert_eq!(results.len(), 1);

    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Vault>()
        .start()
        .await
        .unwrap();
    let err = match engine.handle::<Vault>("c").await {
        Ok(c) => c.data().await.unwrap_err(),
        Err(e) => e,
    };
    assert!(err.to_string().contains("another instance's key"), "{err}");
    // The instances themselves are untouched.
    let a = engine.handle::<Vault>("a").await.unwrap();
    assert_eq!(a.data().await.unwrap(), vec![1; 10]);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_ids_that_collide_under_a_64_bit_hash_keep_their_own_state() {
    // 126-byte ids with the same 64-bit FNV-1a hash, which blob keys used to share.
    let twins = ["5cdc38da781222ad", "48cab85938350e17"].map(|p| format!("{p}{}", "s".repeat(110)));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    for (i, id) in twins.iter().enumerate() {
        engine
            .start::<Vault>(id.as_str(), state(100_000, i as u8 + 1))
            .await
            .unwrap();
    }
    for (i, id) in twins.iter().enumerate() {
        let vault = engine.handle::<Vault>(id.as_str()).await.unwrap();
        assert_eq!(vault.data().await.unwrap(), vec![i as u8 + 1; 100_000]);
    }
    engine.shutdown().await;
}

/// Echoes a number after a pause the test controls (a call in flight when the store fails).
#[driver(timeout = "10s")]
pub trait Echo {
    async fn echo(&self, n: u32) -> Result<u32, String>;
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct CallState {
    asked: bool,
    got: Option<u32>,
}

#[flow]
pub struct Caller {
    #[link]
    state: CallState,
    #[link]
    echo: impl Echo,
}

#[flow]
impl Caller {
    #[impulse]
    fn ask(&mut self) {
        self.state.asked = true;
    }
    #[wire]
    fn run(&mut self) -> Command<Self> {
        match (self.state.asked, self.state.got) {
            (false, _) => Command::wait(),
            (true, None) => Command::drive(self.echo.echo(7)).then(|f, r| {
                f.state.got = Some(r.unwrap_or(0));
                Ok(())
            }),
            (true, Some(_)) => Command::finish(),
        }
    }
}

#[derive(Clone)]
struct SlowEcho(std::sync::Arc<tokio::sync::Notify>);

#[driver]
impl Echo for SlowEcho {
    async fn echo(&self, n: u32) -> Result<u32, String> {
        self.0.notified().await;
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_store_failure_stops_the_work_and_health_reports_it() {
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    let store = faulty::Faulty::new(RedbStore::open(tmp.path().join("instances.redb")).unwrap());
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Caller>()
        .driver(SlowEcho(release.clone()))
        .start()
        .await
        .unwrap();
    let waiting = engine
        .start::<Caller>("w", CallState::default())
        .await
        .unwrap();
    let calling = engine
        .start::<Caller>("c", CallState::default())
        .await
        .unwrap();
    calling.ask().await.unwrap();
    assert!(engine.health().await.ok());

    // The store stops for good (as redb does after a failed write, or a panic on a damaged
    // page): every commit fails with a permanent error.
    let stopped = StoreError::Stopped {
        path: tmp.path().join("instances.redb"),
        detail: "a write failed half way".into(),
    };
    store.fail_with(Some(stopped));
    let err = waiting.ask().await.unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Stopped { .. })),
        "{err}"
    );
    assert!(!err.is_transient());
    let health = engine.health().await;
    assert_eq!(health.store_state, "failed", "{health:?}");
    assert!(!health.ok());

    // The call in flight lands: its step fails, and is not retried for ever.
    let before = store.commits();
    release.notify_one();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let tried = store.commits() - before;
    assert!(tried <= 1, "the outcome's step was tried {tried} times");
    engine.shutdown().await;
}

/// A commit that timed out on the engine's side but was applied (the reply was lost, as
/// when a Redis answers after the client's timeout): the engine does not know whether its
/// step is stored, so it reads the instance back from the store. The call that step put
/// in flight is then sent, and the flow finishes without another input (issue 23, item 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_commit_reply_was_lost_still_sends_its_call() {
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    let store = faulty::Faulty::new(RedbStore::open(tmp.path().join("instances.redb")).unwrap());
    let counted = Counted::default();
    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Caller>()
        .driver(counted.clone())
        .start()
        .await
        .unwrap();
    let caller = engine
        .start::<Caller>("lost-reply", CallState::default())
        .await
        .unwrap();
    store.lose_next_reply(StoreError::Timeout(Duration::from_secs(10)));
    let asked = caller.ask().id("ask-1").await;
    assert!(
        matches!(asked, Err(Error::Store(StoreError::Timeout(_)))),
        "{asked:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), caller.finished())
        .await
        .expect("the call of the step that landed is sent, and the flow finishes")
        .unwrap();
    assert!(matches!(ended, flowwire::Ended::Finished), "{ended:?}");
    assert_eq!(counted.runs(), vec![1], "the call ran once");
    // The caller's retry is told its impulse was applied.
    let again = caller.ask().id("ask-1").await;
    assert!(
        matches!(again, Err(Error::ImpulseAlreadyApplied { .. })),
        "{again:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_refuses_to_start_on_a_damaged_store_file_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    for i in 0..50 {
        engine
            .start::<Vault>(format!("v{i}"), state(100, 1))
            .await
            .unwrap();
    }
    engine.shutdown().await;
    drop(engine);
    // Zero every page but the first: the B-tree is gone.
    let file = dir.join("data").join("instances.redb");
    let len = std::fs::metadata(&file).unwrap().len() as usize;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[4096..len].fill(0);
    std::fs::write(&file, bytes).unwrap();
    let err = Engine::builder()
        .data_dir(dir.join("data"))
        .storage(ladder(dir))
        .flow::<Vault>()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Store(StoreError::Corrupted { path, .. }) if *path == file),
        "{err}"
    );
}

/// A tmpfs of `mb` megabytes mounted for the test, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mb: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed ({status}): this test needs root, as ./scripts/test has"
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with a file until writing fails; returns the file.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_the_store_and_it_recovers_by_itself_when_space_is_freed() {
    use std::time::Duration;
    let disk = SmallDisk::mount(32);
    let data = disk.path().join("data");
    let open = || async {
        Engine::builder()
            .data_dir(&data)
            .storage(Ladder::inline_only())
            .flow::<Vault>()
            .start()
            .await
            .unwrap()
    };
    let engine = open().await;
    let filler = disk.fill();
    // Start instances until the disk refuses: what was acknowledged before must survive.
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..20_000u32 {
        match engine
            .start::<Vault>(format!("v{i}"), state(8 * KIB, i as u8))
            .await
        {
            Ok(_) => acked.push(i),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("a full disk refuses a write");
    assert!(err.is_transient(), "a full disk is transient: {err}");
    let health = engine.health().await;
    assert_eq!(health.store_state, "degraded", "{health:?}");

    // Space is freed: the store takes writes again, by itself.
    std::fs::remove_file(&filler).unwrap();
    let mut recovered = false;
    for attempt in 0..100 {
        if engine
            .start::<Vault>(format!("after{attempt}"), state(8 * KIB, 1))
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the store did not recover after space was freed");
    assert!(engine.health().await.ok());
    engine.shutdown().await;
    drop(engine);

    let engine = open().await;
    for i in acked {
        let vault = engine.handle::<Vault>(format!("v{i}")).await.unwrap();
        assert_eq!(vault.data().await.unwrap(), vec![i as u8; 8 * KIB], "v{i}");
    }
    engine.shutdown().await;
}

/// Counts the runs of each call (by idempotency key) and takes a while to answer.
#[derive(Clone, Default)]
struct Counted(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>);

impl Counted {
    fn started(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn runs(&self) -> Vec<u32> {
        self.0.lock().unwrap().values().copied().collect()
    }
}

#[driver]
impl Echo for Counted {
    async fn echo(&self, n: u32) -> Result<u32, String> {
        let key = CallContext::current().expect("a call").idempotency_key();
        *self.0.lock().unwrap().entry(key).or_default() += 1;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_lets_the_calls_in_flight_finish_and_runs_none_again() {
    let tmp = tempfile::tempdir().unwrap();
    let counted = Counted::default();
    let open = || async {
        Engine::builder()
            .data_dir(tmp.path().join("data"))
            .flow::<Caller>()
            .driver(counted.clone())
            .start()
            .await
            .unwrap()
    };
    let engine = open().await;
    for i in 0..10 {
        let c = engine
            .start::<Caller>(format!("c{i}"), CallState::default())
            .await
            .unwrap();
        c.ask().await.unwrap();
    }
    // Every call is running when the engine is asked to stop.
    while counted.started() < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    engine.shutdown().await;
    drop(engine);

    let engine = open().await;
    for i in 0..10 {
        let c = engine.handle::<Caller>(format!("c{i}")).await.unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), c.finished())
            .await
            .expect("the flow finishes")
            .unwrap();
        assert!(matches!(ended, flowwire::Ended::Finished), "{ended:?}");
    }
    assert_eq!(counted.runs(), vec![1; 10], "each call ran once");
    engine.shutdown().await;
}

#[cfg(feature = "redis")]
#[path = "support/servers.rs"]
mod servers;

/// A Redis holding data written with the older key layout (each instance's keys tagged
/// with its id, before commits were fenced per shard) is refused with a typed, permanent
/// error at start: its instances would otherwise look absent.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_written_with_the_older_key_layout_is_refused() {
    use flowwire::storage::store::RedisStore;

    let redis = servers::Redis::start();
    // What a store of the older layout wrote at its first use: a bare 64-bit token.
    redis.cli(&["SET", "old:epoch", "00c0ffee00c0ffee"]);
    let started = Engine::builder()
        .store(RedisStore::open(&redis.url(), "old").unwrap())
        .flow::<Caller>()
        .driver(SlowEcho(std::sync::Arc::default()))
        .start()
        .await;
    let Err(Error::Store(e)) = started else {
        panic!(
            "started on data of another layout: {:?}",
            started.map(|_| ())
        );
    };
    assert!(matches!(e, StoreError::Incompatible { .. }), "{e:?}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("older key layout"), "{e}");
}

/// A Redis restarted without persistence while flows wait on their calls: the engine
/// notices that the store lost its data, says so in `health()` and as an event, and fails
/// the waiters with a typed error instead of letting them hang.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_redis_is_noticed_reported_and_fails_the_waiters() {
    use std::time::Duration;

    use flowwire::EventKind;
    use flowwire::storage::store::RedisStore;

    let mut redis = servers::Redis::start();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let engine = Engine::builder()
        .store(RedisStore::open(&redis.url(), "wiped").unwrap())
        .flow::<Caller>()
        .driver(SlowEcho(release.clone()))
        .start()
        .await
        .unwrap();
    let mut events = engine.events();
    let mut waiters = Vec::new();
    for i in 0..5 {
        let c = engine
            .start::<Caller>(format!("c{i}"), CallState::default())
            .await
            .unwrap();
        c.ask().await.unwrap();
        waiters.push(tokio::spawn(async move { c.finished().await }));
    }
    assert!(engine.health().await.ok());

    // The server comes back empty; then the calls answer.
    redis.kill();
    redis.restart();
    release.notify_waiters();

    for w in waiters {
        let ended = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("a waiter is answered, not left hanging")
            .unwrap();
        assert!(
            matches!(ended, Err(Error::Store(StoreError::Lost { .. }))),
            "{ended:?}"
        );
    }
    let health = engine.health().await;
    assert_eq!(health.store_state, "failed", "{health:?}");
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(e)) = events.next().await
                && matches!(e.kind, EventKind::StoreFailed { .. })
            {
                return e;
            }
        }
    })
    .await
    .expect("a store-failed event");
    assert!(
        matches!(seen.kind, EventKind::StoreFailed { error } if error.contains("lost its data"))
    );
    // A waiter that comes later is answered at once.
    let late = engine.handle::<Caller>("c0").await;
    let late = match late {
        Ok(c) => c.finished().await,
        Err(e) => Err(e),
    };
    assert!(late.is_err(), "{late:?}");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_instance_is_listed_for_an_operator_who_can_replace_its_state_or_delete_it() {
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let engine = self::engine(dir).await;
    for id in ["a", "b"] {
        engine.start::<Vault>(id, state(100_000, 1)).await.unwrap();
    }
    engine.start::<Vault>("fine", state(10, 2)).await.unwrap();
    engine.shutdown().await;
    drop(engine);
    // The `fast` tier loses its blobs: the states of `a` and `b`.
    std::fs::remove_dir_all(dir.join("fast")).unwrap();

    let engine = self::engine(dir).await;
    for id in ["a", "b"] {
        let err = match engine.handle::<Vault>(id).await {
            Ok(vault) => vault.data().await.unwrap_err(),
            Err(e) => e,
        };
        assert!(matches!(err, Error::Blob(_)), "{id}: {err}");
    }
    // Both are listed, with what is wrong and what to do (the mark is written off the
    // runner: wait for it, bounded).
    let mut listed = Vec::new();
    for _ in 0..200 {
        listed = engine.parked::<Vault>(None, 10).await.unwrap();
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ids: Vec<&str> = listed.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "{listed:?}");
    for p in &listed {
        assert!(p.reason.starts_with("damaged: "), "{}", p.reason);
        assert!(p.reason.contains("is missing"), "{}", p.reason);
        assert!(
            p.reason.contains("replace_state") && p.reason.contains("delete"),
            "{}",
            p.reason
        );
    }

    // A new state for `a`: parked for the operator, who resumes it.
    engine
        .replace_state::<Vault>("a", state(20, 7))
        .await
        .unwrap();
    let parked = engine.parked::<Vault>(None, 10).await.unwrap();
    let a = parked.iter().find(|p| p.id == "a").expect("a is parked");
    assert!(a.reason.contains("replaced by an operator"), "{}", a.reason);
    engine.resume::<Vault>("a").await.unwrap();
    let vault = engine.handle::<Vault>("a").await.unwrap();
    assert_eq!(vault.data().await.unwrap(), vec![7; 20]);
    vault.close().await.unwrap();

    // `b` is removed; a live instance is not.
    engine.delete::<Vault>("b").await.unwrap();
    assert!(matches!(
        engine.handle::<Vault>("b").await,
        Err(Error::NotFound { .. })
    ));
    assert!(engine.parked::<Vault>(None, 10).await.unwrap().is_empty());
    let refused = engine.delete::<Vault>("fine").await.unwrap_err();
    assert!(matches!(refused, Error::NotParked { .. }), "{refused}");
    let refused = engine
        .replace_state::<Vault>("fine", state(1, 1))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::NotParked { .. }), "{refused}");
    engine.shutdown().await;
}
