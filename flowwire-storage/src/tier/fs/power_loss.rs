//! Power-loss simulation of the file tier: its puts and deletes on a simulated disk that
//! keeps only what a completed sync covered, cut at a random call, then read again.
//!
//! The disk models what POSIX promises and no more. A file's bytes are durable once an
//! `fsync` of the file completes; a directory entry (a new file's name, a rename, a removal,
//! a new directory's name) once an `fsync` of the directory holding it completes, and
//! never through an `fsync` of the file it names. A directory whose own entry did not
//! survive takes everything under it along. At the cut the disk goes dark: the call in
//! progress fails, and so does every call after it. What survives is what the syncs
//! covered, plus either
//! - only a torn prefix of the write the cut interrupted (unsynced changes are lost, the
//!   last write is torn), or
//! - also a random subset, in order, of the changes no sync covered (a disk that persists
//!   some of its cache, in any order).
//!
//! After each cut, every put the tier acknowledged reads back exactly, a key whose last
//! acknowledged call was a delete reads as deleted or as the blob before it (a delete is
//! not made durable: a blob it removed can come back, see below), the calls the cut
//! interrupted read as done or not done, never torn, and the tier takes new puts.
//!
//! Two more tests show the simulation has teeth: a disk that ignores directory syncs, and
//! one that ignores file syncs, each lose an acknowledged put within a few cuts.
//!
//! `FLOWWIRE_POWER_CUTS=N` sets the cuts per model (default 40); the long run:
//! `FLOWWIRE_POWER_CUTS=1000 cargo test --release -p flowwire-storage tier::fs::power_loss`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::files::{Files, NewFile, ReadFile};
use super::{FsTier, WRITE_PIECE};
use crate::fuzz::Rng;
use crate::join::join_all;
use crate::tier::BlobTier;

/// What a directory entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

/// One change to a directory that no sync of it has covered yet.
#[derive(Debug, Clone)]
enum DirOp {
    Link(OsString, Node),
    Unlink(OsString),
    Rename(OsString, OsString),
}

fn apply_dir(entries: &mut BTreeMap<OsString, Node>, op: &DirOp) {
    match op {
        DirOp::Link(name, node) => {
            entries.insert(name.clone(), *node);
        }
        DirOp::Unlink(name) => {
            entries.remove(name);
        }
        DirOp::Rename(from, to) => {
            if let Some(node) = entries.remove(from) {
                entries.insert(to.clone(), node);
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Dir {
    /// What a completed sync of the directory covered.
    durable: BTreeMap<OsString, Node>,
    /// What the process sees.
    current: BTreeMap<OsString, Node>,
    /// Changes since the last sync, in order.
    pending: Vec<DirOp>,
}

fn apply_write(bytes: &mut Vec<u8>, at: u64, data: &[u8]) {
    let at = at as usize;
    if bytes.len() < at + data.len() {
        bytes.resize(at + data.len(), 0);
    }
    bytes[at..at + data.len()].copy_from_slice(data);
}

#[derive(Debug, Clone, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Sim {
    /// Every directory made, by path (the tier never moves or removes one).
    dirs: HashMap<PathBuf, Dir>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Calls that change the disk so far.
    ops: u64,
    /// The call the power goes out on.
    cut_at: Option<u64>,
    dark: bool,
    /// The write the cut interrupted: inode, offset, bytes.
    torn: Option<(u64, u64, Vec<u8>)>,
    /// A disk that lies: directory syncs return at once and persist nothing.
    ignores_dir_syncs: bool,
    /// A disk that lies: file syncs return at once and persist nothing.
    ignores_file_syncs: bool,
}

/// The directory every simulated disk starts with, durable.
const BASE: &str = "/disk";

/// A disk whose power can go out.
#[derive(Debug, Clone)]
struct SimDisk(Arc<Mutex<Sim>>);

fn dark() -> io::Error {
    io::Error::other("the power is out")
}

fn split(path: &Path) -> io::Result<(&Path, OsString)> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name.to_os_string())),
        _ => Err(io::ErrorKind::InvalidInput.into()),
    }
}

impl SimDisk {
    fn new() -> Self {
        let mut sim = Sim::default();
        sim.dirs.insert(PathBuf::from(BASE), Dir::default());
        SimDisk(Arc::new(Mutex::new(sim)))
    }

    fn sim(&self) -> MutexGuard<'_, Sim> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one call; `Err` once the power is out (the counted one included).
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

    /// The directory `dir` and the entry `name` in it as the process sees them.
    fn entry(sim: &Sim, path: &Path) -> io::Result<Option<Node>> {
        let (dir, name) = split(path)?;
        let dir = sim.dirs.get(dir).ok_or(io::ErrorKind::NotFound)?;
        Ok(dir.current.get(&name).copied())
    }

    fn change_dir(sim: &mut Sim, dir: &Path, op: DirOp) {
        let dir = sim.dirs.get_mut(dir).expect("checked by the caller");
        apply_dir(&mut dir.current, &op);
        dir.pending.push(op);
    }

    /// The disk as a killed process leaves it: nothing is lost, the call in progress did
    /// not happen, and the next process finds the disk working.
    fn after_crash(&self) -> SimDisk {
        let sim = self.sim();
        SimDisk(Arc::new(Mutex::new(Sim {
            dirs: sim.dirs.clone(),
            inodes: sim.inodes.clone(),
            next_inode: sim.next_inode,
            ops: sim.ops,
            ..Sim::default()
        })))
    }

    /// The disk as the power cut leaves it (see the module documentation), powered again.
    fn after_cut(&self, rng: &mut Rng, keep_some: bool) -> SimDisk {
        let sim = self.sim();
        let mut inodes = HashMap::new();
        for (id, inode) in &sim.inodes {
            let mut image = inode.durable.clone();
            if keep_some {
                for (at, data) in &inode.pending {
                    if rng.below(2) == 0 {
                        apply_write(&mut image, *at, data);
                    }
                }
            }
            if let Some((torn, at, data)) = &sim.torn
                && torn == id
            {
                let keep = rng.below(data.len() + 1);
                apply_write(&mut image, *at, &data[..keep]);
            }
            let inode = Inode {
                durable: image.clone(),
                current: image,
                pending: Vec::new(),
            };
            inodes.insert(*id, inode);
        }
        let mut entries: HashMap<&Path, BTreeMap<OsString, Node>> = HashMap::new();
        for (path, dir) in &sim.dirs {
            let mut image = dir.durable.clone();
            if keep_some {
                for op in &dir.pending {
                    if rng.below(2) == 0 {
                        apply_dir(&mut image, op);
                    }
                }
            }
            entries.insert(path, image);
        }
        // Only what the surviving entries reach from the base survives.
        let mut dirs = HashMap::new();
        let mut reach = vec![PathBuf::from(BASE)];
        while let Some(path) = reach.pop() {
            let image = entries.remove(path.as_path()).unwrap_or_default();
            for (name, node) in &image {
                if *node == Node::Dir {
                    reach.push(path.join(name));
                }
            }
            let dir = Dir {
                durable: image.clone(),
                current: image,
                pending: Vec::new(),
            };
            dirs.insert(path, dir);
        }
        SimDisk(Arc::new(Mutex::new(Sim {
            dirs,
            inodes,
            next_inode: sim.next_inode,
            ..Sim::default()
        })))
    }
}

impl Files for SimDisk {
    fn is_dir(&self, path: &Path) -> bool {
        self.sim().dirs.contains_key(path)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim();
        if Self::entry(&sim, path)?.is_some() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        Self::step(&mut sim)?;
        let (dir, name) = split(path)?;
        Self::change_dir(&mut sim, dir, DirOp::Link(name, Node::Dir));
        sim.dirs.insert(path.to_path_buf(), Dir::default());
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim();
        if path != Path::new(BASE) && Path::new(BASE).starts_with(path) {
            // Above the simulated disk: always there.
            return Ok(());
        }
        if !sim.dirs.contains_key(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Self::step(&mut sim)?;
        if !sim.ignores_dir_syncs {
            let dir = sim.dirs.get_mut(path).expect("checked above");
            dir.durable.clone_from(&dir.current);
            dir.pending.clear();
        }
        Ok(())
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn NewFile>> {
        let mut sim = self.sim();
        if Self::entry(&sim, path)?.is_some() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        Self::step(&mut sim)?;
        let id = sim.next_inode;
        sim.next_inode += 1;
        sim.inodes.insert(id, Inode::default());
        let (dir, name) = split(path)?;
        Self::change_dir(&mut sim, dir, DirOp::Link(name, Node::File(id)));
        Ok(Box::new(SimFile(self.clone(), id)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut sim = self.sim();
        let ((dir, old), (to_dir, new)) = (split(from)?, split(to)?);
        if dir != to_dir {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if !matches!(Self::entry(&sim, from)?, Some(Node::File(_))) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Self::step(&mut sim)?;
        Self::change_dir(&mut sim, dir, DirOp::Rename(old, new));
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.sim();
        if !matches!(Self::entry(&sim, path)?, Some(Node::File(_))) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Self::step(&mut sim)?;
        let (dir, name) = split(path)?;
        Self::change_dir(&mut sim, dir, DirOp::Unlink(name));
        Ok(())
    }

    fn open(&self, path: &Path) -> io::Result<Option<Box<dyn ReadFile>>> {
        let sim = self.sim();
        match Self::entry(&sim, path) {
            Ok(Some(Node::File(id))) => {
                let bytes = sim.inodes[&id].current.clone();
                Ok(Some(Box::new(Snapshot(bytes))))
            }
            Ok(Some(Node::Dir)) => Err(io::ErrorKind::IsADirectory.into()),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A new file on the simulated disk.
struct SimFile(SimDisk, u64);

impl NewFile for SimFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut sim = self.0.sim();
        if let Err(e) = SimDisk::step(&mut sim) {
            if sim.torn.is_none() && sim.cut_at == Some(sim.ops) {
                let at = sim.inodes[&self.1].current.len() as u64;
                sim.torn = Some((self.1, at, buf.to_vec()));
            }
            return Err(e);
        }
        let inode = sim.inodes.get_mut(&self.1).expect("made by create_new");
        let at = inode.current.len() as u64;
        apply_write(&mut inode.current, at, buf);
        inode.pending.push((at, buf.to_vec()));
        Ok(())
    }

    fn sync_all(&mut self) -> io::Result<()> {
        let mut sim = self.0.sim();
        SimDisk::step(&mut sim)?;
        if !sim.ignores_file_syncs {
            let inode = sim.inodes.get_mut(&self.1).expect("made by create_new");
            inode.durable.clone_from(&inode.current);
            inode.pending.clear();
        }
        Ok(())
    }
}

/// A file's bytes as they were when it was opened.
struct Snapshot(Vec<u8>);

impl ReadFile for Snapshot {
    fn len(&mut self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn read(&mut self, offset: u64, cap: u64) -> io::Result<Vec<u8>> {
        let start = (offset as usize).min(self.0.len());
        let end = start.saturating_add(cap as usize).min(self.0.len());
        Ok(self.0[start..end].to_vec())
    }
}

const KEYS: usize = 6;
const CALLS: usize = 30;

/// One call of the workload.
#[derive(Debug, Clone)]
enum Call {
    Put(usize, Bytes),
    Delete(usize),
}

impl Call {
    fn key(&self) -> usize {
        match self {
            Call::Put(k, _) | Call::Delete(k) => *k,
        }
    }
}

fn key(k: usize) -> String {
    format!("power/i-{k}/{k}.sp-{:016x}", k * 7919)
}

/// The workload of `seed`: puts of fresh bytes (empty, small, and over two write pieces
/// long) and deletes over a few keys, in batches of up to three calls on distinct keys that
/// run at once.
fn workload(seed: u64) -> Vec<Vec<Call>> {
    let mut rng = Rng::new(seed);
    let mut batches = Vec::new();
    let mut left = CALLS;
    while left > 0 {
        let n = (1 + rng.below(3)).min(left);
        left -= n;
        let first = rng.below(KEYS);
        let batch = (0..n)
            .map(|j| {
                let k = (first + j) % KEYS;
                if rng.below(4) == 0 {
                    return Call::Delete(k);
                }
                let len = match rng.below(8) {
                    0 => 0,
                    1 => 2 * WRITE_PIECE + rng.below(1000),
                    _ => 1 + rng.below(3000),
                };
                Call::Put(k, Bytes::from(rng.bytes(len)))
            })
            .collect();
        batches.push(batch);
    }
    batches
}

/// What a key may read as after the cut.
#[derive(Debug, Clone, Default)]
struct Allowed(Vec<Option<Bytes>>);

/// Runs the workload of `seed` on `disk`, through a new handle (as a process does when it
/// starts), until its first failed call; narrows or widens what each key may read as
/// afterwards.
fn run(rt: &tokio::runtime::Runtime, disk: &SimDisk, seed: u64, allowed: &mut [Allowed]) {
    let tier = FsTier::on(Arc::new(disk.clone()), PathBuf::from(BASE).join("tier"));
    for batch in workload(seed) {
        let keys: Vec<String> = batch.iter().map(|call| key(call.key())).collect();
        let results = rt.block_on(join_all(batch.iter().zip(&keys).map(
            |(call, key)| match call {
                Call::Put(_, bytes) => tier.put(key, std::slice::from_ref(bytes)),
                Call::Delete(_) => tier.delete(key),
            },
        )));
        let mut failed = false;
        for (call, result) in batch.iter().zip(results) {
            let (k, after) = match call {
                Call::Put(k, bytes) => (*k, Some(bytes.clone())),
                Call::Delete(k) => (*k, None),
            };
            let was = &mut allowed[k].0;
            match (result.is_ok(), &after) {
                // Acknowledged: a put is the one thing the key may read as.
                (true, Some(_)) => *was = vec![after],
                // An acknowledged delete is not durable: what it removed may come back.
                (true, None) => was.push(None),
                // Interrupted: done or not done.
                (false, _) => {
                    failed = true;
                    was.push(after);
                }
            }
        }
        if failed {
            break;
        }
    }
}

fn nothing_yet() -> Vec<Allowed> {
    vec![Allowed(vec![None]); KEYS]
}

/// How many calls the workload of `seed` makes on a fresh disk.
fn calls_of(rt: &tokio::runtime::Runtime, seed: u64) -> u64 {
    let whole = SimDisk::new();
    run(rt, &whole, seed, &mut nothing_yet());
    whole.sim().ops
}

/// A call to stop at among `total`: one time in four among the first put's calls (which
/// make the 256 fan-out directories), otherwise anywhere.
fn pick(rng: &mut Rng, total: u64) -> u64 {
    match rng.below(4) {
        0 => 1 + rng.below(270) as u64,
        _ => 1 + rng.below(total as usize) as u64,
    }
}

/// Reads every key on the disk as the power cut left it, against what it may read as; then
/// checks the tier takes new puts.
fn check(
    rt: &tokio::runtime::Runtime,
    after: SimDisk,
    allowed: &[Allowed],
    cut: u64,
) -> Result<(), String> {
    let tier = FsTier::on(Arc::new(after), PathBuf::from(BASE).join("tier"));
    for (k, allowed) in allowed.iter().enumerate() {
        let got = rt
            .block_on(tier.get(&key(k), None))
            .map_err(|e| format!("cut {cut}: key {k} does not read: {e}"))?;
        if !allowed.0.contains(&got) {
            return Err(format!(
                "cut {cut}: key {k} reads {:?} bytes, allowed {:?}",
                got.as_ref().map(Bytes::len),
                allowed
                    .0
                    .iter()
                    .map(|a| a.as_ref().map(Bytes::len))
                    .collect::<Vec<_>>()
            ));
        }
    }
    for k in 0..KEYS {
        let fresh = Bytes::from(format!("after the cut {k}"));
        rt.block_on(tier.put(&key(k), std::slice::from_ref(&fresh)))
            .map_err(|e| format!("cut {cut}: key {k} takes no put after the cut: {e}"))?;
        let got = rt
            .block_on(tier.get(&key(k), None))
            .map_err(|e| e.to_string())?;
        if got.as_ref() != Some(&fresh) {
            return Err(format!("cut {cut}: key {k} does not read back its new put"));
        }
    }
    Ok(())
}

/// Cuts the power at a random call of the workload of `seed`, powers the disk on, and says
/// what, if anything, broke the tier's promises.
fn cut_once(
    rt: &tokio::runtime::Runtime,
    seed: u64,
    keep_some: bool,
    lie: impl Fn(&mut Sim),
) -> Result<(), String> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let cut = pick(&mut rng, calls_of(rt, seed));
    let disk = SimDisk::new();
    {
        let mut sim = disk.sim();
        sim.cut_at = Some(cut);
        lie(&mut sim);
    }
    let mut allowed = nothing_yet();
    run(rt, &disk, seed, &mut allowed);
    check(rt, disk.after_cut(&mut rng, keep_some), &allowed, cut)
}

/// Kills the process at a random call of the workload of `seed` (the disk keeps everything
/// the process wrote, synced or not), starts a new one that runs another workload, and
/// cuts the power at a random call of that one.
fn crash_then_cut(rt: &tokio::runtime::Runtime, seed: u64, keep_some: bool) -> Result<(), String> {
    let mut rng = Rng::new(seed ^ 0xc4a5);
    let crash = pick(&mut rng, calls_of(rt, seed));
    let disk = SimDisk::new();
    disk.sim().cut_at = Some(crash);
    let mut allowed = nothing_yet();
    run(rt, &disk, seed, &mut allowed);
    let restarted = disk.after_crash();
    let second = seed.wrapping_add(1 << 32);
    let cut = {
        let mut sim = restarted.sim();
        let cut = sim.ops + 1 + rng.below(150) as u64;
        sim.cut_at = Some(cut);
        cut
    };
    run(rt, &restarted, second, &mut allowed);
    check(rt, restarted.after_cut(&mut rng, keep_some), &allowed, cut)
        .map_err(|e| format!("killed at call {crash}, then {e}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn cuts() -> u64 {
    std::env::var("FLOWWIRE_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

#[test]
fn every_acknowledged_put_survives_a_cut_that_drops_unsynced_changes_and_tears_the_last() {
    let rt = runtime();
    for seed in 0..cuts() {
        if let Err(broken) = cut_once(&rt, seed, false, |_| {}) {
            panic!("seed {seed}: {broken}");
        }
    }
}

#[test]
fn every_acknowledged_put_survives_a_cut_that_keeps_unsynced_changes_at_random() {
    let rt = runtime();
    for seed in 0..cuts() {
        if let Err(broken) = cut_once(&rt, 10_000 + seed, true, |_| {}) {
            panic!("seed {}: {broken}", 10_000 + seed);
        }
    }
}

#[test]
fn a_put_after_a_killed_process_survives_a_later_power_cut() {
    let rt = runtime();
    for seed in 0..cuts() {
        let keep_some = seed % 2 == 1;
        if let Err(broken) = crash_then_cut(&rt, 20_000 + seed, keep_some) {
            panic!("seed {}: {broken}", 20_000 + seed);
        }
    }
}

/// The simulation would catch a put that left out its directory sync.
#[test]
fn a_disk_that_ignores_directory_syncs_loses_acknowledged_puts() {
    let rt = runtime();
    let lost = (0..20)
        .find(|seed| cut_once(&rt, *seed, false, |sim| sim.ignores_dir_syncs = true).is_err());
    assert!(lost.is_some(), "20 cuts found no lost put");
}

/// The simulation would catch a put that renamed its file before syncing it.
#[test]
fn a_disk_that_ignores_file_syncs_loses_acknowledged_puts() {
    let rt = runtime();
    let lost = (0..20)
        .find(|seed| cut_once(&rt, *seed, false, |sim| sim.ignores_file_syncs = true).is_err());
    assert!(lost.is_some(), "20 cuts found no lost put");
}
