//! Power-loss simulation: the embedded store on a simulated disk that keeps only what a
//! completed sync covered, cut at a random write or sync, then opened again.
//!
//! The disk holds both files (the redb file, through redb's `StorageBackend`, and the log,
//! through [`LogFile`]) and counts their writes and syncs together. At the cut the disk
//! goes dark: the write or sync in progress fails, and so does everything after. What
//! survives is, per file, what the last completed sync covered, plus either
//! - nothing else but a torn prefix of the write the cut interrupted (the model of the
//!   issue: unsynced writes are lost, the last one is torn), or
//! - also a random subset of the writes no sync covered (a disk that persists some of its
//!   cache in any order).
//!
//! After each cut the store must open, hold every acknowledged step, serve no record under
//! another key, and hold no instance half-applied.
//!
//! `FLOWWIRE_POWER_CUTS=N` sets the cuts per model (default 40); the long run:
//! `FLOWWIRE_POWER_CUTS=1000 cargo test --release -p flowwire-storage power_loss`.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::RedbStore;
use crate::codec::{self, Kind};
use crate::fuzz::Rng;
use crate::record::{Expect, InstanceKey, StepWrite};
use crate::store::InstanceStore;
use crate::store::disk::{Disk, LogFile};

/// One change to a file that no sync has covered yet.
#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct SimFile {
    /// What a completed sync covered.
    durable: Vec<u8>,
    /// What the process sees.
    current: Vec<u8>,
    /// Changes since the last sync, in order.
    pending: Vec<Op>,
}

fn apply(bytes: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(at, data) => {
            let at = *at as usize;
            if bytes.len() < at + data.len() {
                bytes.resize(at + data.len(), 0);
            }
            bytes[at..at + data.len()].copy_from_slice(data);
        }
        Op::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

#[derive(Debug, Default)]
struct Sim {
    files: HashMap<PathBuf, SimFile>,
    /// Writes and syncs so far.
    ops: u64,
    /// The operation the power goes out on.
    cut_at: Option<u64>,
    dark: bool,
    /// Files whose space ran out: their writes, length changes and syncs fail (the process
    /// lives on).
    full: Vec<PathBuf>,
    /// The write the cut interrupted.
    torn: Option<(PathBuf, u64, Vec<u8>)>,
}

/// A disk whose power can go out.
#[derive(Debug, Clone, Default)]
struct SimDisk(Arc<Mutex<Sim>>);

fn dark() -> io::Error {
    io::Error::other("the power is out")
}

impl SimDisk {
    fn cut_at(op: u64) -> Self {
        let disk = SimDisk::default();
        disk.sim().cut_at = Some(op);
        disk
    }

    fn sim(&self) -> std::sync::MutexGuard<'_, Sim> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one operation; `Err` once the power is out (the counted one included).
    fn step(sim: &mut Sim) -> io::Result<()> {
        if sim.dark {
            return Err(dark());
        }
        sim.ops += 1;
        if sim.cut_at == Some(sim.ops) {
            sim.dark = true;
            return Err(dark());
        }
        Ok(())
    }

    fn write(&self, path: &Path, at: u64, data: &[u8]) -> io::Result<()> {
        let mut sim = self.sim();
        if sim.full.iter().any(|f| f == path) {
            return Err(io::ErrorKind::StorageFull.into());
        }
        if let Err(e) = Self::step(&mut sim) {
            if sim.torn.is_none() && sim.cut_at == Some(sim.ops) {
                sim.torn = Some((path.to_path_buf(), at, data.to_vec()));
            }
            return Err(e);
        }
        let file = sim.files.entry(path.to_path_buf()).or_default();
        let op = Op::Write(at, data.to_vec());
        apply(&mut file.current, &op);
        file.pending.push(op);
        Ok(())
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut sim = self.sim();
        if sim.full.iter().any(|f| f == path) {
            return Err(io::ErrorKind::StorageFull.into());
        }
        Self::step(&mut sim)?;
        let file = sim.files.entry(path.to_path_buf()).or_default();
        let op = Op::SetLen(len);
        apply(&mut file.current, &op);
        file.pending.push(op);
        Ok(())
    }

    fn sync(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim();
        if sim.full.iter().any(|f| f == path) {
            // Delayed allocation: a full disk can fail the sync of writes it had taken.
            return Err(io::ErrorKind::StorageFull.into());
        }
        Self::step(&mut sim)?;
        let file = sim.files.entry(path.to_path_buf()).or_default();
        file.durable.clone_from(&file.current);
        file.pending.clear();
        Ok(())
    }

    fn read(&self, path: &Path, at: u64, out: &mut [u8]) -> io::Result<()> {
        let sim = self.sim();
        let file = sim.files.get(path).ok_or(io::ErrorKind::NotFound)?;
        let at = usize::try_from(at).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = file
            .current
            .get(at..at + out.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let sim = self.sim();
        let file = sim.files.get(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(file.current.len() as u64)
    }

    /// The disk as the power cut leaves it (see the module documentation), powered again.
    fn after_cut(&self, rng: &mut Rng, keep_some: bool) -> SimDisk {
        let sim = self.sim();
        let mut files = HashMap::new();
        for (path, file) in &sim.files {
            let mut image = file.durable.clone();
            if keep_some {
                for op in &file.pending {
                    if rng.below(2) == 0 {
                        apply(&mut image, op);
                    }
                }
            }
            if let Some((torn, at, data)) = &sim.torn
                && torn == path
            {
                let keep = rng.below(data.len() + 1);
                apply(&mut image, &Op::Write(*at, data[..keep].to_vec()));
            }
            files.insert(
                path.clone(),
                SimFile {
                    durable: image.clone(),
                    current: image,
                    pending: Vec::new(),
                },
            );
        }
        SimDisk(Arc::new(Mutex::new(Sim {
            files,
            ..Sim::default()
        })))
    }
}

#[derive(Debug)]
struct SimBackend(SimDisk, PathBuf);

impl redb::StorageBackend for SimBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.len(&self.1)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(&self.1, offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(&self.1, len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync(&self.1)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(&self.1, offset, data)
    }
}

impl LogFile for SimBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.len(&self.1)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read(&self.1, offset, buf)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write(&self.1, offset, buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync(&self.1)
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync(&self.1)
    }
}

impl Disk for SimDisk {
    fn store_backend(&self, path: &Path) -> io::Result<Option<Box<dyn redb::StorageBackend>>> {
        self.sim().files.entry(path.to_path_buf()).or_default();
        Ok(Some(Box::new(SimBackend(self.clone(), path.to_path_buf()))))
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.sim().files.contains_key(path))
    }
    fn open_log(&self, path: &Path, create: bool) -> io::Result<Box<dyn LogFile>> {
        let mut sim = self.sim();
        if create {
            if sim.dark {
                return Err(dark());
            }
            // A created file's name is durable at once (the real disk syncs its directory).
            sim.files.insert(path.to_path_buf(), SimFile::default());
        } else if !sim.files.contains_key(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(Box::new(SimBackend(self.clone(), path.to_path_buf())))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut sim = self.sim();
        Self::step(&mut sim)?;
        let file = sim.files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        // A rename is a metadata change: the file's synced bytes go with it.
        sim.files.insert(to.to_path_buf(), file);
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim();
        Self::step(&mut sim)?;
        sim.files.remove(path);
        Ok(())
    }
}

const INSTANCES: u64 = 12;
const BATCHES: u64 = 30;

fn key(i: u64) -> InstanceKey {
    InstanceKey::new("Power", format!("i{i}"))
}

/// The steps of batch `b`, and which (instance, version) each writes.
fn batch(b: u64, versions: &mut BTreeMap<u64, u64>) -> Vec<StepWrite> {
    (0..2)
        .map(|j| {
            let i = (b * 2 + j + b / 3) % INSTANCES;
            let version = versions.entry(i).or_insert(0);
            *version += 1;
            let key = key(i);
            let mut record = Vec::new();
            let body = vec![(b ^ i) as u8; 30 + (b as usize * 53) % 700];
            codec::encode_owned(Kind::Record, &key, &(*version, b, body), &mut record).unwrap();
            StepWrite {
                expect: if *version == 1 {
                    Expect::Absent
                } else {
                    Expect::Version(*version - 1)
                },
                version: *version,
                seq: *version,
                record: Bytes::from(record),
                active: false,
                parked: false,
                timer: None,
                correlation: None,
                uncorrelate: None,
                ended_key: None,
                impulse: Some(format!("imp-{i}-{version}").into()),
                history: Some((*version, Bytes::from(format!("h{b}")))),
                prune_below: None,
                fence: None,
                acknowledges: None,
                sends: Vec::new(),
                checksums: crate::codec::Checksums::Written,
                key,
            }
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const PATH: &str = "/sim/instances.redb";

/// Opens the store on `disk`, commits batches until one fails, and returns how many were
/// acknowledged (each reopen starts the numbering of batches where the last left off).
fn write_until_cut(rt: &tokio::runtime::Runtime, disk: &SimDisk) -> u64 {
    // A checkpoint every 4 batches, so cuts also land in checkpoints and new runs.
    let Ok(store) = RedbStore::open_on(Arc::new(disk.clone()), Path::new(PATH), 1 << 20, 4) else {
        return 0;
    };
    let mut versions = BTreeMap::new();
    let mut acked = 0;
    rt.block_on(async {
        for b in 0..BATCHES {
            if store.commit(batch(b, &mut versions)).await.is_err() {
                break;
            }
            acked = b + 1;
        }
    });
    acked
}

/// Checks the store after the cut: every acknowledged step, nothing half-applied.
fn check(rt: &tokio::runtime::Runtime, store: &RedbStore, acked: u64) -> Result<(), String> {
    // The versions after `acked` batches, and after one more (durable, not acknowledged).
    let mut at_acked = BTreeMap::new();
    for b in 0..acked {
        batch(b, &mut at_acked);
    }
    let mut at_most = at_acked.clone();
    batch(acked, &mut at_most);
    rt.block_on(async {
        for i in 0..INSTANCES {
            let key = key(i);
            let want = at_acked.get(&i).copied().unwrap_or(0);
            let most = at_most.get(&i).copied().unwrap_or(0);
            let stored = store
                .load(&key)
                .await
                .map_err(|e| format!("{key}: {e}"))?;
            let version = match stored {
                None => 0,
                Some(s) => {
                    let (_, payload) = codec::open_owned(Kind::Record, &s.bytes, &key, 1 << 20)
                        .map_err(|e| format!("{key}: its record does not check: {e}"))?;
                    let (v, _, _): (u64, u64, Vec<u8>) = codec::decode_raw(payload, 1 << 20)
                        .map_err(|e| format!("{key}: {e}"))?;
                    if v != s.version {
                        return Err(format!("{key}: record {v} stored as version {}", s.version));
                    }
                    v
                }
            };
            if version < want || version > most {
                return Err(format!(
                    "{key}: version {version}, where {want} was acknowledged (at most {most})"
                ));
            }
            // Half-applied: every step's impulse id and history entry with its record.
            for v in 1..=most {
                let applied = store
                    .impulse_applied(&key, &format!("imp-{i}-{v}"))
                    .await
                    .map_err(|e| format!("{key}: {e}"))?
                    .is_some();
                if applied != (v <= version) {
                    return Err(format!(
                        "{key}: version {version}, but the impulse of version {v} applied: {applied}"
                    ));
                }
            }
            let history = store
                .history(&key, 0, 1_000)
                .await
                .map_err(|e| format!("{key}: {e}"))?;
            if history.len() as u64 != version {
                return Err(format!(
                    "{key}: version {version} with {} history entries",
                    history.len()
                ));
            }
        }
        Ok(())
    })
}

fn cuts() -> u64 {
    std::env::var("FLOWWIRE_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

fn power_cuts(keep_some: bool) {
    let rt = runtime();
    // How many writes and syncs a whole run makes, to place the cuts over all of it.
    let full = SimDisk::default();
    assert_eq!(write_until_cut(&rt, &full), BATCHES);
    let total = full.sim().ops;
    let mut failures = Vec::new();
    let mut rng = Rng::new(if keep_some { 2 } else { 1 });
    for n in 0..cuts() {
        let cut = 1 + rng.bits() % total;
        let disk = SimDisk::cut_at(cut);
        let acked = write_until_cut(&rt, &disk);
        let after = disk.after_cut(&mut rng, keep_some);
        let outcome = match RedbStore::open_on(Arc::new(after.clone()), Path::new(PATH), 1 << 20, 4)
        {
            Err(e) => Err(format!("refused after a power cut: {e}")),
            Ok(store) => check(&rt, &store, acked).and_then(|()| {
                // And it goes on: the next batch commits, and it opens again.
                drop(store);
                RedbStore::open_on(Arc::new(after), Path::new(PATH), 1 << 20, 4)
                    .map(drop)
                    .map_err(|e| format!("second open: {e}"))
            }),
        };
        if let Err(why) = outcome {
            failures.push(format!(
                "cut {n} at operation {cut} of {total} ({acked} acknowledged): {why}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn power_loss_drops_unsynced_writes_and_tears_the_last() {
    power_cuts(false);
}

#[test]
fn power_loss_keeps_any_subset_of_unsynced_writes_and_tears_the_last() {
    power_cuts(true);
}

/// A disk that fills up under the log, then under the redb file across checkpoints, and
/// is freed again: commits fail meanwhile (transient), and the store recovers by itself —
/// opening its database again when a failed write stopped it — with nothing acknowledged
/// lost.
#[test]
fn a_full_disk_under_either_file_stops_nothing_for_good() {
    let rt = runtime();
    let disk = SimDisk::default();
    let store = RedbStore::open_on(Arc::new(disk.clone()), Path::new(PATH), 1 << 20, 4).unwrap();
    let mut versions = BTreeMap::new();
    let mut acked = 0;
    let mut failed = 0;
    rt.block_on(async {
        let log = RedbStore::log_path(Path::new(PATH));
        for b in 0..BATCHES + 12 {
            // The log's space runs out, then the store file's (across checkpoints, which
            // come every 4 batches), each for a stretch.
            disk.sim().full = match b {
                6..9 => vec![log.clone()],
                12..22 => vec![PathBuf::from(PATH)],
                _ => Vec::new(),
            };
            let steps = batch(acked, &mut versions.clone());
            match store.commit(steps).await {
                Ok(_) => {
                    batch(acked, &mut versions);
                    acked += 1;
                }
                Err(e) => {
                    assert!(e.is_transient(), "batch {b}: {e}");
                    failed += 1;
                }
            }
        }
    });
    assert!(failed > 0, "the full disk failed no commit");
    assert!(
        acked >= BATCHES - 8,
        "only {acked} batches after the disk was freed"
    );
    assert!(store.fault().is_none(), "{:?}", store.fault());
    check(&rt, &store, acked).unwrap();
    drop(store);
    let store = RedbStore::open_on(Arc::new(disk), Path::new(PATH), 1 << 20, 4).unwrap();
    check(&rt, &store, acked).unwrap();
}
