//! Large payloads as content-defined chunks, addressed by their content and stored in
//! packs.
//!
//! A payload at or above the ladder's chunking threshold is cut into chunks by their content
//! ([`cdc`]; the tier's [`ChunkSize`]: around 512 KiB on local tiers, 4 MiB on S3), and the
//! payload becomes a manifest, [`Chunked`]: for each chunk its BLAKE3 hash, length, CRC-32,
//! the step that first wrote it, and its place. The new chunks of a payload at a step are
//! written back to back as one blob, the step's *pack*, on the tier the payload's whole size
//! selects, under
//!
//! ```text
//! flow/id/<step that wrote it>.<role>p-<64-bit nonce, hex>
//! ```
//!
//! and a chunk's place is its pack's nonce and its offset there (a run of chunks of one
//! pack is read with one ranged read). One blob, created and fsynced once, costs less than
//! one per chunk, and a new blob's bytes can be written as they are while they are being
//! cut (`Placement::cut_and_put`). The nonce is fresh for every pack written, so "a
//! committed key is never written with other bytes" holds by construction (a retried step
//! writes a new pack; a stale writer writes another key). Every chunk is checked against
//! its length, CRC-32 and BLAKE3 hash, which its manifest holds, on every read: bytes that
//! are not the chunk's are refused whatever blob they come from.
//!
//! Records of formats 8 and 9 stored each chunk as a framed blob of its own, under
//! `flow/id/<step>.<role>k-<first 128 bits of its BLAKE3, hex>` ([`chunk_key`]); their
//! chunks have the place [`OWN`] and are read as they were.
//!
//! # What a step writes
//! The state of a step is split against the previous record's ([`split`]): the unchanged
//! prefix and suffix are found by comparing bytes, the chunks inside them are the previous
//! ones, and only the changed middle is cut and hashed again, until a cut falls on an old
//! boundary. A new chunk whose hash the previous manifest holds keeps its place. So a step
//! that changes a few bytes of a 32 MiB state writes a pack of one or two chunks and a
//! manifest of about 11 KiB, and history snapshots share every chunk they have in common.
//!
//! # Why the writing step is in the key
//! Packs are collected like blobs (the record's `retired` and `trash`): a pack is dropped
//! once the payload that replaces one referring to it refers to none of its chunks
//! ([`Chunked::dropped_by`]). Chunks are only shared with the previous record's payload of
//! the same role, so every pack is live for one unbroken run of steps: once dropped it is
//! never referred to again, and a delete still in flight can never remove a pack a later
//! step wrote (content that comes back is written to that step's own pack).

pub mod cdc;
pub mod parallel;

pub use self::cdc::ChunkSize;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::record::InstanceKey;

/// The step of an inline chunk: one whose bytes the manifest holds ([`Chunked::inline`])
/// instead of a blob. No step has this number (steps count up from 0 by one).
pub const INLINE: u64 = u64::MAX;

/// The pack of a chunk that is a blob of its own (records of formats 8 and 9 wrote only
/// those): its key names its content ([`chunk_key`]).
pub const OWN: u64 = 0;

/// One chunk of a [`Chunked`] payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Its BLAKE3 hash (checked on every read).
    pub hash: [u8; 32],
    /// The step that wrote it (part of its key), or [`INLINE`].
    pub seq: u64,
    /// Its length in bytes.
    pub len: u32,
    /// Its CRC-32 (checked on every read).
    pub crc: u32,
    /// The pack holding it: the nonce in the key of the blob its step wrote the new chunks
    /// of the payload into ([`pack_key`]), or [`OWN`] for a chunk stored as a blob of its own.
    pub pack: u64,
    /// Where its bytes start in its pack (0 for a chunk of its own).
    pub at: u64,
}

/// A chunk as records of formats 8 and 9 store it (each chunk a blob of its own).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct ChunkRefV8 {
    pub hash: [u8; 32],
    pub seq: u64,
    pub len: u32,
    pub crc: u32,
}

impl From<ChunkRefV8> for ChunkRef {
    fn from(c: ChunkRefV8) -> ChunkRef {
        ChunkRef {
            hash: c.hash,
            seq: c.seq,
            len: c.len,
            crc: c.crc,
            pack: OWN,
            at: 0,
        }
    }
}

impl ChunkRef {
    /// The chunk of `body` (step 0, not placed in any pack yet): what a cut knows.
    pub fn of(body: &[u8]) -> ChunkRef {
        ChunkRef {
            hash: *blake3::hash(body).as_bytes(),
            seq: 0,
            len: u32::try_from(body.len()).expect("a chunk is at most 64 MiB"),
            crc: crc32fast::hash(body),
            pack: OWN,
            at: 0,
        }
    }

    /// The chunk as formats 8 and 9 store it (for a chunk that is a blob of its own: its
    /// place is not kept).
    pub(crate) fn v8(&self) -> ChunkRefV8 {
        ChunkRefV8 {
            hash: self.hash,
            seq: self.seq,
            len: self.len,
            crc: self.crc,
        }
    }

    /// The blob holding it: its pack's `(step, nonce)`, or its own `(step, hash)`.
    fn home(&self) -> (u64, u64, Option<[u8; 32]>) {
        if self.pack == OWN {
            (self.seq, OWN, Some(self.hash))
        } else {
            (self.seq, self.pack, None)
        }
    }
}

/// A fresh pack nonce: never [`OWN`], and (64 random-looking bits seeded per process,
/// a counter under them) never the same twice in a process and as good as never across
/// processes for the same instance and step, so a pack key is written once.
pub fn pack_nonce() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let nonce = SEED.get_or_init(std::hash::RandomState::new).hash_one(n);
    if nonce == OWN { 1 } else { nonce }
}

/// The key of a pack: `flow/id/seq.<role>p-<nonce, 16 hex digits>`.
pub fn pack_key(instance: &InstanceKey, seq: u64, role: char, nonce: u64) -> String {
    let mut key = String::with_capacity(instance.flow.len() + 200);
    instance.write_prefix(&mut key);
    let _ = write!(key, "/{seq}.{role}p-{nonce:016x}");
    key
}

/// A payload stored as content-defined chunks: its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunked {
    /// The tier holding the chunks.
    pub tier: Arc<str>,
    /// The role of the payload (`s` state, `c` call, `i` input): its chunks' namespace.
    pub role: char,
    /// The payload's length (the sum of the chunks').
    pub len: u64,
    /// The chunks, in order (a chunk may appear more than once).
    pub chunks: Arc<[ChunkRef]>,
    /// The bytes of the inline chunks (those whose step is [`INLINE`]), one for each in
    /// the order they appear in `chunks`: the small pieces of a state between its large
    /// blobs, kept in the record instead of a file each. Empty for a manifest written
    /// before record format 9.
    pub inline: Arc<[Bytes]>,
}

impl ChunkRef {
    /// Whether the manifest holds this chunk's bytes (no blob holds them).
    pub fn is_inline(&self) -> bool {
        self.seq == INLINE
    }

    /// Whether it is stored in a pack (with other chunks of its step).
    pub fn in_pack(&self) -> bool {
        self.pack != OWN
    }
}

impl Chunked {
    /// The key of the blob holding `chunk` of this payload of `instance`: its pack, or its
    /// own.
    pub fn key_of(&self, instance: &InstanceKey, chunk: &ChunkRef) -> String {
        if chunk.in_pack() {
            pack_key(instance, chunk.seq, self.role, chunk.pack)
        } else {
            chunk_key(instance, chunk.seq, self.role, &chunk.hash)
        }
    }

    /// One chunk of each blob the payload's chunks are stored in (a pack, or a chunk's
    /// own), in order of first appearance (inline chunks are not: the record holds them).
    pub fn distinct(&self) -> impl Iterator<Item = &ChunkRef> {
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        self.chunks
            .iter()
            .filter(move |c| !c.is_inline() && seen.insert(c.home()))
    }

    /// The blobs of this payload that `other` (a payload of the same instance) does not
    /// refer to, one chunk of each: what a record that replaces `self` by `other` stops
    /// referring to. A pack is kept while `other` refers to any chunk in it. (Their blob
    /// references: `Payload::dropped_by`.)
    pub fn dropped_by<'a>(&'a self, other: Option<&Chunked>) -> impl Iterator<Item = &'a ChunkRef> {
        let kept: std::collections::HashSet<(u64, u64, Option<[u8; 32]>)> = match other {
            Some(o) if o.tier == self.tier && o.role == self.role => {
                o.chunks.iter().map(ChunkRef::home).collect()
            }
            _ => std::collections::HashSet::default(),
        };
        self.distinct().filter(move |c| !kept.contains(&c.home()))
    }

    /// Whether every chunk is inline or a blob of its own: the manifest is stored as
    /// formats 8 and 9 store it.
    pub(crate) fn without_packs(&self) -> bool {
        self.chunks.iter().all(|c| !c.in_pack())
    }
}

/// The key of a chunk: `flow/id/seq.<role>k-<hex of the hash's first 16 bytes>`.
pub fn chunk_key(instance: &InstanceKey, seq: u64, role: char, hash: &[u8; 32]) -> String {
    let mut key = String::with_capacity(instance.flow.len() + 200);
    instance.write_prefix(&mut key);
    let _ = write!(key, "/{seq}.{role}k-");
    for b in &hash[..16] {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// A payload split: its chunks, and those of them that must be written (each once, with
/// its byte range in the payload).
#[derive(Debug)]
pub struct Split {
    /// The manifest's chunks.
    pub chunks: Vec<ChunkRef>,
    /// The chunks to write.
    pub new: Vec<(Range<usize>, ChunkRef)>,
}

/// Splits `bytes`, written at step `seq`, into chunks of `size`, sharing what it can with
/// `prev` (the previous payload of the same role on the same tier, with its bytes when they
/// are known).
pub fn split(
    bytes: &[u8],
    seq: u64,
    prev: Option<(&Chunked, Option<&Bytes>)>,
    size: &ChunkSize,
) -> Split {
    let known = stored_chunks(prev.map(|(m, _)| m));
    let mut out = Split {
        chunks: Vec::with_capacity(bytes.len() / size.avg() + 2),
        new: Vec::new(),
    };
    let mut written: HashMap<[u8; 32], ChunkRef> = HashMap::new();
    let mut fresh = |range: Range<usize>, out: &mut Split| {
        let body = &bytes[range.clone()];
        let hash = *blake3::hash(body).as_bytes();
        let chunk = match known.get(&hash).or_else(|| written.get(&hash)) {
            Some(c) => *c,
            None => {
                let c = ChunkRef {
                    hash,
                    seq,
                    len: u32::try_from(body.len()).expect("a chunk is at most 64 MiB"),
                    crc: crc32fast::hash(body),
                    pack: OWN,
                    at: 0,
                };
                written.insert(hash, c);
                out.new.push((range, c));
                c
            }
        };
        out.chunks.push(chunk);
    };

    // With the previous bytes: keep the chunks of the unchanged prefix, cut the middle, and
    // rejoin the old chunks at the first cut on an old boundary in the unchanged suffix.
    let mut start = 0;
    let mut tail: &[ChunkRef] = &[];
    let mut rejoin: Vec<(usize, usize)> = Vec::new(); // (new offset, index of the next old chunk)
    if let Some((m, Some(old))) = prev
        && m.len == old.len() as u64
        && m.inline.is_empty()
    {
        let prefix = common_prefix(old, bytes);
        let room = old.len().min(bytes.len()) - prefix;
        let suffix = common_suffix(old, bytes, room);
        let mut end = 0usize;
        let last = m.chunks.len().saturating_sub(1);
        for (i, c) in m.chunks.iter().enumerate() {
            end += c.len as usize;
            if i == last {
                break; // cut by the end of the data, not by its content
            }
            if end <= prefix {
                out.chunks.push(*c);
                start = end;
            } else if end >= old.len() - suffix {
                // The old chunks after `end` lie in the unchanged suffix.
                rejoin.push((end + bytes.len() - old.len(), i + 1));
            }
        }
        tail = &m.chunks;
    }
    let mut at = start;
    loop {
        if let Ok(i) = rejoin.binary_search_by_key(&at, |r| r.0) {
            out.chunks.extend_from_slice(&tail[rejoin[i].1..]);
            break;
        }
        if at >= bytes.len() {
            break;
        }
        let len = cdc::cut(&bytes[at..], size);
        fresh(at..at + len, &mut out);
        at += len;
    }
    out
}

/// The chunks of `prev` stored in blobs, by hash: a new chunk with one of these hashes
/// keeps its key (an inline chunk's bytes are in `prev`'s record only, never shared).
pub(crate) fn stored_chunks(prev: Option<&Chunked>) -> HashMap<[u8; 32], ChunkRef> {
    prev.map(|m| {
        m.chunks
            .iter()
            .filter(|c| !c.is_inline())
            .map(|c| (c.hash, *c))
            .collect()
    })
    .unwrap_or_default()
}

/// How many leading bytes `a` and `b` share.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// How many trailing bytes `a` and `b` share, at most `room`.
fn common_suffix(a: &[u8], b: &[u8], room: usize) -> usize {
    const BLOCK: usize = 4096;
    let (la, lb) = (a.len(), b.len());
    let mut i = 0;
    while i + BLOCK <= room && a[la - i - BLOCK..la - i] == b[lb - i - BLOCK..lb - i] {
        i += BLOCK;
    }
    while i < room && a[la - i - 1] == b[lb - i - 1] {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests;
