//! The log's bytes: where things live, what an entry and a floor slot hold, and the run
//! a log's entries belong to (see the [module](super) documentation for the layout).

/// Marks the start of an entry ("FWL2").
pub(super) const MAGIC: u32 = 0x3246_574c;
/// Marks a floor slot ("FWLS").
pub(super) const SLOT_MAGIC: u32 = 0x534c_5746;
/// Magic, length, batch, salt, CRC.
pub(super) const HEADER: usize = 4 + 4 + 8 + 8 + 4;
/// Batch, inverted salt.
pub(super) const TRAILER: usize = 8 + 8;
/// Magic, salt, first, floor, CRC.
pub(super) const SLOT: usize = 4 + 8 + 8 + 8 + 4;
/// Where the two floor slots live (each on a page of its own).
pub(super) const SLOTS: [u64; 2] = [0, 4096];
/// Where entries start.
pub(crate) const START: u64 = 8192;
/// The log grows by at least this much at a time (zero-filled and synced once).
pub(super) const GROW: u64 = 4 << 20;

/// An entry read back: its batch number and payload.
pub(crate) type Entry = (u64, Vec<u8>);

/// One run of the log: the salt its entries carry and the number of its first batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Random, different for every run.
    pub salt: u64,
    /// The batch the run starts with.
    pub first: u64,
}

impl Run {
    /// A new run starting at batch `first`, with a fresh random salt.
    pub(crate) fn fresh(first: u64) -> Self {
        use std::hash::BuildHasher as _;
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        // std's hasher keys come from the operating system's randomness.
        let salt = std::hash::RandomState::new().hash_one((n, std::process::id(), first));
        Self {
            salt: salt | 1,
            first,
        }
    }
}

pub(super) fn slot_bytes(run: Run, floor: u64) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    slot[4..12].copy_from_slice(&run.salt.to_le_bytes());
    slot[12..20].copy_from_slice(&run.first.to_le_bytes());
    slot[20..28].copy_from_slice(&floor.to_le_bytes());
    let crc = crc32fast::hash(&slot[..28]);
    slot[28..].copy_from_slice(&crc.to_le_bytes());
    slot
}

pub(super) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(super) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}
