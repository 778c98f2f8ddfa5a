//! The corruption matrix: damage of many kinds at many offsets of both files of the
//! embedded store — `instances.redb` and its log `instances.redb.log` — after a clean stop,
//! after a SIGKILL of a real process that was committing, and after a SIGKILL of one that
//! had its last batch acknowledged and wrote nothing more. The log's tail (the end of its
//! last entry, where damage looks most like a torn write) is damaged in every run, on top
//! of the spread of offsets.
//!
//! Every case must end one of two ways: the store opens and every acknowledged step reads
//! back intact (a damaged record may be refused on read, never served as another's), or
//! opening refuses with `StoreError::Corrupted` naming one of the two files. Never a silent
//! loss, never another instance's data, never a panic, never a hang.
//!
//! `FLOWWIRE_CORRUPTION_CASES=N` sets the cases per damage kind and file (default 24; the
//! long run in docs/architecture.md uses 400).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::codec::{self, Kind};
use flowwire_storage::{Expect, InstanceKey, InstanceStore, RedbStore, StepWrite, StoreError};

#[path = "support/child.rs"]
mod child;

const INSTANCES: u64 = 40;
const BATCHES: u64 = 150;
const CHILD: &str = "FLOWWIRE_CORRUPTION_CHILD";
/// Set for a child that stops committing after `BATCHES` acknowledged batches.
const IDLE: &str = "FLOWWIRE_CORRUPTION_IDLE";

/// The steps of batch `b`: two instances, each one version further, with a record of a
/// size that varies, bound to its key, and an impulse id.
fn batch(b: u64, versions: &mut BTreeMap<u64, u64>) -> Vec<StepWrite> {
    (0..2)
        .map(|j| {
            let i = (b * 2 + j) % INSTANCES;
            let version = versions.entry(i).or_insert(0);
            *version += 1;
            let key = key(i);
            StepWrite {
                expect: if *version == 1 {
                    Expect::Absent
                } else {
                    Expect::Version(*version - 1)
                },
                version: *version,
                seq: *version,
                record: record(&key, *version),
                active: (*version).is_multiple_of(3),
                parked: false,
                timer: Some(1_000 * b),
                correlation: None,
                uncorrelate: None,
                ended_key: None,
                impulse: Some(format!("imp-{b}-{j}").into()),
                history: None,
                prune_below: None,
                fence: None,
                acknowledges: None,
                sends: Vec::new(),
                checksums: flowwire_storage::codec::Checksums::Written,
                key,
            }
        })
        .collect()
}

fn key(i: u64) -> InstanceKey {
    InstanceKey::new("Matrix", format!("i{i}"))
}

fn body(key: &InstanceKey, version: u64) -> Vec<u8> {
    let len = 40 + (version as usize * 37 + key.id.len() * 11) % 600;
    (0..len).map(|n| (n as u64 ^ version) as u8).collect()
}

fn record(key: &InstanceKey, version: u64) -> Bytes {
    let mut buf = Vec::new();
    codec::encode_owned(Kind::Record, key, &(version, body(key, version)), &mut buf).unwrap();
    Bytes::from(buf)
}

/// What the first `acked` batches leave: each instance's version, and the impulse ids.
fn expected(acked: u64) -> (BTreeMap<u64, u64>, Vec<(u64, String)>) {
    let mut versions = BTreeMap::new();
    let mut impulses = Vec::new();
    for b in 0..acked {
        for (j, s) in batch(b, &mut versions).into_iter().enumerate() {
            let i = (b * 2 + j as u64) % INSTANCES;
            impulses.push((i, s.impulse.unwrap().to_string()));
        }
    }
    (versions, impulses)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// In the child process: commits batches until killed, printing each acknowledged one.
#[test]
fn child_commits_until_killed() {
    let Ok(dir) = std::env::var(CHILD) else {
        return;
    };
    runtime().block_on(async {
        let store = RedbStore::open(Path::new(&dir).join("instances.redb")).unwrap();
        let mut versions = BTreeMap::new();
        let idle = std::env::var(IDLE).is_ok();
        for b in 0.. {
            store.commit(batch(b, &mut versions)).await.unwrap();
            println!("ack {b}");
            if idle && b + 1 == BATCHES {
                // Killed while idle: the last entry of the log is acknowledged, and no
                // later one covers it.
                std::future::pending::<()>().await;
            }
        }
    });
}

/// A store after `BATCHES` batches and a clean stop.
fn clean_baseline(dir: &Path) -> u64 {
    runtime().block_on(async {
        let store = RedbStore::open(dir.join("instances.redb")).unwrap();
        let mut versions = BTreeMap::new();
        for b in 0..BATCHES {
            store.commit(batch(b, &mut versions)).await.unwrap();
        }
    });
    BATCHES
}

/// A store whose writer was killed (SIGKILL) after at least `BATCHES` acknowledged batches
/// (exactly that many, and idle since, if `idle`); returns how many were acknowledged.
fn killed_baseline(dir: &Path, idle: bool) -> u64 {
    let mut env = vec![(CHILD, dir.as_os_str())];
    if idle {
        env.push((IDLE, std::ffi::OsStr::new("1")));
    }
    let mut child = child::Acking::spawn("child_commits_until_killed", &env);
    child.until_acked(BATCHES);
    // Acknowledgements printed before the kill landed count too.
    let acked = child.kill();
    assert!(acked >= BATCHES, "the child acknowledged {acked} batches");
    acked
}

type MakeDamage = fn(u64) -> Damage;

#[derive(Debug, Clone, Copy)]
enum Damage {
    BitFlip(u64),
    Flip64(u64),
    ZeroPage(u64),
    Truncate(u64),
}

/// The part of a file worth damaging: up to a page past its last non-zero byte (the log
/// is zero-filled megabytes ahead of its entries).
fn span(file: &Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1) as u64;
    (used + 4096).min(bytes.len() as u64).max(1)
}

impl Damage {
    fn apply(self, file: &Path, span: u64) {
        let mut bytes = std::fs::read(file).unwrap();
        let len = span.min(bytes.len() as u64);
        match self {
            Damage::BitFlip(at) => bytes[(at % len) as usize] ^= 1 << (at % 8),
            Damage::Flip64(at) => {
                let at = (at % len) as usize;
                for (n, b) in bytes[at..(at + 64).min(len as usize)]
                    .iter_mut()
                    .enumerate()
                {
                    *b ^= 0xa5 ^ n as u8;
                }
            }
            Damage::ZeroPage(page) => {
                let at = ((page % (len / 4096 + 1)) * 4096) as usize;
                let end = (at + 4096).min(len as usize);
                bytes[at..end].fill(0);
            }
            Damage::Truncate(at) => bytes.truncate((at % len) as usize),
        }
        std::fs::write(file, bytes).unwrap();
    }
}

/// How a case ended.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Ending {
    /// Opened; every acknowledged step read back intact.
    Intact,
    /// Opened; a damaged record was refused when read (never served).
    RefusedOnRead,
    /// Opening refused with `Corrupted` naming the store file.
    RefusedStore,
    /// Opening refused with `Corrupted` naming the log.
    RefusedLog,
}

/// Opens the damaged copy and checks it; `Err` is a broken promise.
fn check(dir: &Path, acked: u64) -> Result<Ending, String> {
    let path = dir.join("instances.redb");
    let store = match RedbStore::open(&path) {
        Ok(store) => store,
        Err(StoreError::Corrupted { path: named, .. }) if named == path => {
            return Ok(Ending::RefusedStore);
        }
        Err(StoreError::Corrupted { path: named, .. }) if named == RedbStore::log_path(&path) => {
            return Ok(Ending::RefusedLog);
        }
        Err(other) => return Err(format!("opening failed with another error: {other}")),
    };
    let (versions, impulses) = expected(acked);
    runtime().block_on(async {
        let mut refused = false;
        for (&i, &version) in &versions {
            let key = key(i);
            match store.load(&key).await {
                Err(StoreError::Corrupted { .. }) => refused = true,
                Err(other) => return Err(format!("{key}: read failed with {other}")),
                Ok(None) => return Err(format!("{key}: acknowledged, but missing")),
                Ok(Some(stored)) => {
                    let Ok((_, payload)) =
                        codec::open_owned(Kind::Record, &stored.bytes, &key, 1 << 20)
                    else {
                        refused = true;
                        continue;
                    };
                    let value: (u64, Vec<u8>) = codec::decode_raw(payload, 1 << 20)
                        .map_err(|e| format!("{key}: a checked record does not decode: {e}"))?;
                    // A newer version than acknowledged is a batch the kill cut short
                    // after its sync: it was durable, just not yet acknowledged.
                    if value.0 < version || value.1 != body(&key, value.0) {
                        return Err(format!(
                            "{key}: holds version {} where {version} was acknowledged",
                            value.0
                        ));
                    }
                }
            }
        }
        for (i, impulse) in &impulses {
            match store.impulse_applied(&key(*i), impulse).await {
                Ok(Some(_)) => {}
                Err(StoreError::Corrupted { .. }) => refused = true,
                Ok(None) => return Err(format!("{}: impulse {impulse} forgotten", key(*i))),
                Err(other) => return Err(format!("impulse read failed with {other}")),
            }
        }
        Ok(if refused {
            Ending::RefusedOnRead
        } else {
            Ending::Intact
        })
    })
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A deterministic spread of offsets.
fn offsets(n: u64, seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed | 1;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

fn run_matrix(name: &str, baseline: &Path, acked: u64) -> BTreeMap<(String, Ending), usize> {
    let cases: u64 = std::env::var("FLOWWIRE_CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut counts = BTreeMap::new();
    let mut broken = Vec::new();
    for file in ["instances.redb", "instances.redb.log"] {
        let span = span(&baseline.join(file));
        let kinds: [(&str, MakeDamage); 4] = [
            ("bit flip", Damage::BitFlip),
            ("64-byte flip", Damage::Flip64),
            ("zeroed page", Damage::ZeroPage),
            ("truncation", Damage::Truncate),
        ];
        // Damage aimed at the end of the log's last entry (its trailer and the bytes
        // before it), beside the spread: each kind that many bytes before the end, a
        // zeroed page at the page that holds them (its argument is a page, not an offset).
        let used = span.saturating_sub(4096);
        let aimed = |make: MakeDamage| -> Vec<Damage> {
            if file != "instances.redb.log" {
                return Vec::new();
            }
            [1, 8, 17, 40, 64, 100]
                .into_iter()
                .map(|back| {
                    let at = used.saturating_sub(back);
                    match make(at) {
                        Damage::ZeroPage(_) => Damage::ZeroPage(at / 4096),
                        damage => damage,
                    }
                })
                .collect()
        };
        for (k, (kind, make)) in kinds.into_iter().enumerate() {
            let spread = offsets(cases, 0x9e37_79b9 + k as u64 * 7919 + file.len() as u64);
            for damage in spread.map(make).chain(aimed(make)) {
                let tmp = tempfile::tempdir().unwrap();
                copy_dir(baseline, tmp.path());
                damage.apply(&tmp.path().join(file), span);
                let (tx, rx) = mpsc::channel();
                let dir: PathBuf = tmp.path().to_path_buf();
                std::thread::spawn(move || {
                    let r = std::panic::catch_unwind(|| check(&dir, acked))
                        .unwrap_or_else(|_| Err("panicked".into()));
                    let _ = tx.send(r);
                });
                let r = rx
                    .recv_timeout(Duration::from_mins(1))
                    .unwrap_or_else(|_| Err("hung".into()));
                match r {
                    Ok(ending) => {
                        *counts
                            .entry((format!("{file} {kind}"), ending))
                            .or_insert(0) += 1;
                    }
                    Err(why) => broken.push(format!("{name}: {file}: {damage:?}: {why}")),
                }
            }
        }
    }
    for ((case, ending), n) in &counts {
        println!("{name}: {case}: {ending:?} × {n}");
    }
    assert!(broken.is_empty(), "broken promises:\n{}", broken.join("\n"));
    counts
}

#[test]
fn every_damage_after_a_clean_stop_opens_intact_or_is_refused_naming_the_file() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let acked = clean_baseline(dir.path());
    run_matrix("clean stop", dir.path(), acked);
}

#[test]
fn every_damage_after_a_kill_opens_intact_or_is_refused_naming_the_file() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let acked = killed_baseline(dir.path(), false);
    let counts = run_matrix("kill", dir.path(), acked);
    // The log mattered: some damage to it was refused.
    assert!(
        counts
            .keys()
            .any(|(case, ending)| case.contains(".log") && *ending == Ending::RefusedLog),
        "no damage of the log was refused after a kill: {counts:?}"
    );
}

#[test]
fn every_damage_after_a_kill_while_idle_opens_intact_or_is_refused_naming_the_file() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let acked = killed_baseline(dir.path(), true);
    assert_eq!(acked, BATCHES);
    let counts = run_matrix("kill while idle", dir.path(), acked);
    // Damage at the end of the last acknowledged entry was read from its copy.
    assert!(
        counts
            .keys()
            .any(|(case, ending)| case.contains(".log") && *ending == Ending::Intact),
        "no damage of the log opened intact: {counts:?}"
    );
}
