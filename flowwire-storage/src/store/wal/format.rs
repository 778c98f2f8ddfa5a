//! The log's bytes: where things live, what an entry and a floor slot hold, and the run
//! a log's entries belong to (see the [module](super) documentation for the layout).

/// Marks an entry of the third format ("FWL3"): its copy is kept (see [`copy_at`]).
pub(super) const MAGIC: u32 = 0x3346_574c;
/// Marks an entry of the second format ("FWL2"): no copy. Still read, so a log a crash
/// left behind before an upgrade is recovered.
pub(super) const MAGIC_V2: u32 = 0x3246_574c;
/// Marks a slot of the third format ("FWS3"): the floor, and where the slot's batch and
/// its copy lie.
pub(super) const SLOT_MAGIC: u32 = 0x3353_5746;
/// Marks a floor slot of the second format ("FWLS").
pub(super) const SLOT_MAGIC_V2: u32 = 0x534c_5746;
/// Magic, length, batch, salt, CRC.
pub(super) const HEADER: usize = 4 + 4 + 8 + 8 + 4;
/// Batch, inverted salt.
pub(super) const TRAILER: usize = 8 + 8;
/// Third format: magic, salt, first, floor, batch, offset, size, CRC.
pub(super) const SLOT: usize = 4 + 8 * 6 + 4;
/// Second format: magic, salt, first, floor, CRC.
pub(super) const SLOT_V2: usize = 4 + 8 + 8 + 8 + 4;
/// A page: the unit a zeroed or lost block of the disk takes away.
pub(super) const PAGE: u64 = 4096;
/// Where the two slots live, each on a page of its own.
pub(super) const SLOTS: [u64; 2] = [0, PAGE];
/// An entry up to this size (header and trailer included) keeps its copy in its slot's
/// page, right after the slot; a larger one keeps it in the entry area (see [`copy_at`]).
pub(super) const INLINE_COPY: u64 = PAGE - SLOT as u64;
/// Where entries start.
pub(crate) const START: u64 = 2 * PAGE;
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

/// Where the entry of batch `batch` lies: `size` bytes (header and trailer included)
/// from offset `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Placed {
    pub batch: u64,
    pub at: u64,
    pub size: u64,
}

/// What a valid slot says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    /// The run it belongs to.
    pub run: Run,
    /// The last batch acknowledged before the slot's own.
    pub floor: u64,
    /// The slot's own batch, whose copy the slot keeps (third format only).
    pub placed: Option<Placed>,
}

/// The slot of a third-format append: its run, its floor, and where its batch lies.
pub(super) fn slot_bytes(run: Run, floor: u64, placed: Placed) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
    let fields = [
        run.salt,
        run.first,
        floor,
        placed.batch,
        placed.at,
        placed.size,
    ];
    for (i, field) in fields.into_iter().enumerate() {
        slot[4 + 8 * i..12 + 8 * i].copy_from_slice(&field.to_le_bytes());
    }
    let crc = crc32fast::hash(&slot[..SLOT - 4]);
    slot[SLOT - 4..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// Reads a slot of either format from the bytes at a slot's offset (at least [`SLOT`] of
/// them, or fewer at the end of a file): `None` when it is torn, damaged or absent.
pub(super) fn parse_slot(bytes: &[u8]) -> Option<Slot> {
    let crc_ok =
        |n: usize| bytes.len() >= n && le32(&bytes[n - 4..]) == crc32fast::hash(&bytes[..n - 4]);
    let run = |b: &[u8]| Run {
        salt: le64(&b[4..]),
        first: le64(&b[12..]),
    };
    match bytes.get(..4).map(le32) {
        Some(SLOT_MAGIC) if crc_ok(SLOT) => Some(Slot {
            run: run(bytes),
            floor: le64(&bytes[20..]),
            placed: Some(Placed {
                batch: le64(&bytes[28..]),
                at: le64(&bytes[36..]),
                size: le64(&bytes[44..]),
            }),
        }),
        Some(SLOT_MAGIC_V2) if crc_ok(SLOT_V2) => Some(Slot {
            run: run(bytes),
            floor: le64(&bytes[20..]),
            placed: None,
        }),
        _ => None,
    }
}

/// Where the copy of a third-format entry lies: in the page of its slot, right after the
/// slot, if it fits; otherwise in the entry area, from the first page boundary after the
/// entry. Either way no page and no run of fewer than [`INLINE_COPY`] bytes holds part
/// of both the entry's trailer and its copy's, so one damaged block cannot take both.
/// `None` for a placement past the end of any file (read from a damaged slot).
pub(super) fn copy_at(placed: Placed) -> Option<u64> {
    if placed.size <= INLINE_COPY {
        Some(SLOTS[(placed.batch % 2) as usize] + SLOT as u64)
    } else {
        placed
            .at
            .checked_add(placed.size)?
            .checked_next_multiple_of(PAGE)
    }
}

/// Where the entry after a third-format one starts: after it, or after its copy when the
/// copy is in the entry area. `None` past the end of any file.
pub(super) fn after(placed: Placed) -> Option<u64> {
    if placed.size <= INLINE_COPY {
        placed.at.checked_add(placed.size)
    } else {
        copy_at(placed)?.checked_add(placed.size)
    }
}

pub(super) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(super) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}
