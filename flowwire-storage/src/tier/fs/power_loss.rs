//! Power-loss simulation of the file tier: its puts and deletes on a simulated disk
//! (`sim.rs`) that keeps only what a completed sync covered, cut at a random call, then
//! read again.
//!
//! After each cut, every put the tier acknowledged reads back exactly, a key whose last
//! acknowledged call was a delete reads as deleted, the calls the cut interrupted read as
//! done or not done, never torn, and the tier takes new puts. The same
//! holds when a process is killed first (the disk keeps all it wrote) and the power goes
//! out under the next one.
//!
//! Three more tests show the simulation has teeth: a disk that ignores directory syncs, and
//! one that ignores file syncs, each lose an acknowledged put within a few cuts, and a
//! disk that ignores directory syncs brings an acknowledged delete's blob back.
//!
//! `FLOWWIRE_POWER_CUTS=N` sets the cuts per model (default 40); the long run:
//! `FLOWWIRE_POWER_CUTS=1000 cargo test --release -p flowwire-storage tier::fs::power_loss`.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::sim::{BASE, Sim, SimDisk};
use super::{FsTier, WRITE_PIECE};
use crate::fuzz::Rng;
use crate::join::join_all;
use crate::tier::BlobTier;

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
                // Acknowledged: a put, or a delete's absence, is the one thing the key
                // may read as.
                (true, _) => *was = vec![after],
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

/// A delete the tier acknowledged stays done after a power cut that drops every unsynced
/// change. On a disk that ignores directory syncs, from the delete on, the blob comes back:
/// what a delete without its directory sync did before, and what the cuts above would see.
#[test]
fn an_acknowledged_delete_survives_a_power_cut() {
    let rt = runtime();
    for lying in [false, true] {
        let disk = SimDisk::new();
        let tier = FsTier::on(Arc::new(disk.clone()), PathBuf::from(BASE).join("tier"));
        let blob = Bytes::from_static(b"kept until deleted");
        rt.block_on(tier.put(&key(0), std::slice::from_ref(&blob)))
            .expect("put");
        disk.sim().ignores_dir_syncs = lying;
        rt.block_on(tier.delete(&key(0))).expect("delete");
        let after = disk.after_cut(&mut Rng::new(7), false);
        let tier = FsTier::on(Arc::new(after), PathBuf::from(BASE).join("tier"));
        let got = rt.block_on(tier.get(&key(0), None)).expect("get");
        if lying {
            assert_eq!(got, Some(blob), "an unsynced delete is undone by the cut");
        } else {
            assert_eq!(got, None, "an acknowledged delete survives the cut");
        }
    }
}
