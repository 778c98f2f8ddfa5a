//! A simulated disk for the file tier's power-loss tests (`power_loss.rs`): it keeps only
//! what a completed sync covered, and models what POSIX promises and no more. A file's
//! bytes are durable once an `fsync` of the file completes; a directory entry (a new file's
//! name, a rename, a removal, a new directory's name) once an `fsync` of the directory
//! holding it completes, and never through an `fsync` of the file it names. A directory
//! whose own entry did not survive takes everything under it along. At the cut the disk
//! goes dark: the call in progress fails, and so does every call after it. What survives
//! is what the syncs covered, plus either
//! - only a torn prefix of the write the cut interrupted (unsynced changes are lost, the
//!   last write is torn), or
//! - also a random subset, in order, of the changes no sync covered (a disk that persists
//!   some of its cache, in any order).
//!
//! A killed process, by contrast, loses nothing: [`SimDisk::after_crash`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::files::{Files, NewFile, ReadFile};
use crate::fuzz::Rng;

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
pub(super) struct Sim {
    /// Every directory made, by path (the tier never moves or removes one).
    dirs: HashMap<PathBuf, Dir>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    /// Calls that change the disk so far.
    pub(super) ops: u64,
    /// The call the power goes out on.
    pub(super) cut_at: Option<u64>,
    dark: bool,
    /// The write the cut interrupted: inode, offset, bytes.
    torn: Option<(u64, u64, Vec<u8>)>,
    /// A disk that lies: directory syncs return at once and persist nothing.
    pub(super) ignores_dir_syncs: bool,
    /// A disk that lies: file syncs return at once and persist nothing.
    pub(super) ignores_file_syncs: bool,
}

/// The directory every simulated disk starts with, durable.
pub(super) const BASE: &str = "/disk";

/// A disk whose power can go out.
#[derive(Debug, Clone)]
pub(super) struct SimDisk(Arc<Mutex<Sim>>);

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
    pub(super) fn new() -> Self {
        let mut sim = Sim::default();
        sim.dirs.insert(PathBuf::from(BASE), Dir::default());
        SimDisk(Arc::new(Mutex::new(sim)))
    }

    pub(super) fn sim(&self) -> MutexGuard<'_, Sim> {
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
    pub(super) fn after_crash(&self) -> SimDisk {
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
    pub(super) fn after_cut(&self, rng: &mut Rng, keep_some: bool) -> SimDisk {
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

    /// The simulated disk keeps no clock: each temp file reads as just written, so no
    /// sweep takes one (the power-loss tests' puts run while their handle sweeps).
    fn temp_files(&self, dir: &Path) -> io::Result<Vec<(PathBuf, Duration)>> {
        let sim = self.sim();
        if sim.dark {
            return Err(dark());
        }
        let dir_entries = &sim.dirs.get(dir).ok_or(io::ErrorKind::NotFound)?.current;
        Ok(dir_entries
            .iter()
            .filter(|(name, node)| {
                matches!(node, Node::File(_)) && name.as_encoded_bytes().contains(&b'+')
            })
            .map(|(name, _)| (dir.join(name), Duration::ZERO))
            .collect())
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
