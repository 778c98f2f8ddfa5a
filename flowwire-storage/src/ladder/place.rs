//! Placing a step's payloads on the ladder: which go inline, which to which tier (whole
//! or in content-defined chunks, packed), and the puts that write them before the commit.

use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{self, BlobRef, Payload};
use crate::chunk::{self, Chunked};
use crate::error::BlobError;
use crate::record::InstanceKey;
use crate::rope::{Rope, split::split_rope};

use super::keys::{blob_key, write_tag};
use super::{Placement, Put};

impl Placement {
    /// Whether [`place`](Self::place) keeps a payload of `len` bytes inline (and refuses
    /// none of that size).
    ///
    /// ```
    /// use flowwire::storage::Ladder;
    /// let placement = Ladder::inline_only().validate(1 << 20).expect("a valid ladder");
    /// assert!(placement.stays_inline(100));
    /// assert!(!placement.stays_inline(1 << 20)); // refused: over half the record limit
    /// ```
    pub fn stays_inline(&self, len: usize) -> bool {
        self.tier_for(len).is_none() && len <= self.record_limit / 2
    }

    #[allow(clippy::result_large_err)]
    /// Places one payload: inline, a put of a framed blob under `flow/id/seq.role-tag`, or,
    /// from the chunking threshold up, content-defined chunks (the puts of those `prev`,
    /// the payload of the same role in the previous record, does not already hold).
    pub fn place(
        &self,
        instance: &InstanceKey,
        seq: u64,
        role: char,
        bytes: Bytes,
        prev: Option<(&Payload, Option<&Bytes>)>,
        puts: &mut Vec<Put>,
    ) -> Result<Payload, BlobError> {
        // What the engine could not read back is never written: the write limit is the
        // decode limit.
        if bytes.len() > self.record_limit {
            return Err(BlobError::OverLimit {
                instance: instance.to_string(),
                what: role_name(role),
                len: bytes.len() as u64,
                limit: self.record_limit,
            });
        }
        let Some(tier) = self.tier_for(bytes.len()) else {
            if bytes.len() > self.record_limit / 2 {
                return Err(BlobError::TooLarge {
                    instance: instance.to_string(),
                    len: bytes.len() as u64,
                    limit: self.record_limit,
                });
            }
            return Ok(Payload::Inline(bytes));
        };
        if bytes.len() >= self.chunk_from {
            return Ok(Self::place_chunks(
                instance, seq, role, &bytes, tier, prev, puts,
            ));
        }
        let key: Arc<str> = blob_key(instance, seq, role, write_tag()).into();
        let len = bytes.len() as u64;
        let crc = crc32fast::hash(&bytes);
        puts.push(Put {
            tier: tier.clone(),
            key: key.clone(),
            parts: vec![blob::header(&key, len, crc), bytes],
        });
        Ok(Payload::Blob(BlobRef {
            tier: tier.name_arc().clone(),
            key,
            len,
            crc,
        }))
    }

    #[allow(clippy::result_large_err)] // as for `place`
    /// Places a state: as [`place`](Self::place) does its bytes, but a state in pieces
    /// (large blobs by reference) that is chunked is split piece by piece, so an unchanged
    /// blob is neither copied, compared nor hashed ([`split_rope`]). The chunks `written`
    /// holds (this step's precut wrote them) keep the places it gave them.
    pub fn place_state(
        &self,
        instance: &InstanceKey,
        seq: u64,
        rope: &Rope,
        prev: Option<(&Payload, Option<&Rope>)>,
        written: Option<&super::Written>,
        puts: &mut Vec<Put>,
    ) -> Result<Payload, BlobError> {
        let prev_flat = prev.map(|(p, r)| (p, r.and_then(Rope::as_flat)));
        let pieces = match rope {
            Rope::Flat(bytes) => {
                return self.place(instance, seq, 's', bytes.clone(), prev_flat, puts);
            }
            Rope::Pieces { pieces, .. } => pieces,
        };
        let Some(tier) = self.chunked_state_tier(rope.len()) else {
            // Inline, one blob, or refused: as contiguous bytes.
            return self.place(instance, seq, 's', rope.flat(), prev_flat, puts);
        };
        let prev = prev
            .and_then(|(p, _)| p.chunked())
            .filter(|c| c.tier == *tier.name_arc() && c.role == 's');
        let split = split_rope(
            pieces,
            seq,
            prev,
            &tier.chunk_sizes(),
            self.inline_below,
            written.map(super::Written::chunks),
        );
        Ok(chunked(
            instance,
            's',
            tier,
            rope.len(),
            prev,
            (split.chunks, split.inline),
            split.new,
            puts,
        ))
    }

    /// The tier a state of `len` bytes in pieces is stored on as chunks, if it is.
    pub(super) fn chunked_state_tier(&self, len: usize) -> Option<&crate::tier::Tier> {
        self.tier_for(len)
            .filter(|_| len >= self.chunk_from && len <= self.record_limit)
    }

    /// Splits a payload into chunks on `tier`, with a put for each one not already stored.
    fn place_chunks(
        instance: &InstanceKey,
        seq: u64,
        role: char,
        bytes: &Bytes,
        tier: &crate::tier::Tier,
        prev: Option<(&Payload, Option<&Bytes>)>,
        puts: &mut Vec<Put>,
    ) -> Payload {
        let prev = prev.and_then(|(p, b)| {
            p.chunked()
                .filter(|c| c.tier == *tier.name_arc() && c.role == role)
                .map(|c| (c, b))
        });
        let split = chunk::split(bytes, seq, prev, &tier.chunk_sizes());
        let new = split
            .new
            .into_iter()
            .map(|(range, c)| (bytes.slice(range), c));
        chunked(
            instance,
            role,
            tier,
            bytes.len(),
            prev.map(|(old, _)| old),
            (split.chunks, Vec::new()),
            new,
            puts,
        )
    }
}

/// The manifest of a payload of `len` bytes split into `chunks`, with one put of a pack
/// that holds every chunk of `new` back to back (each chunk then names the pack and where
/// in it it starts); the previous manifest `prev` itself when nothing changed (nothing for
/// the collector to do then).
#[allow(clippy::too_many_arguments)]
fn chunked(
    instance: &InstanceKey,
    role: char,
    tier: &crate::tier::Tier,
    len: usize,
    prev: Option<&Chunked>,
    (mut chunks, inline): (Vec<chunk::ChunkRef>, Vec<Bytes>),
    new: impl IntoIterator<Item = (Bytes, chunk::ChunkRef)>,
    puts: &mut Vec<Put>,
) -> Payload {
    let mut new = new.into_iter().peekable();
    // Equal chunk lists hold equal inline bytes: an inline chunk carries its hash.
    if let Some(old) = prev
        && new.peek().is_none()
        && old.len == len as u64
        && *old.chunks == *chunks
    {
        return Payload::Chunked(old.clone());
    }
    let placed = packs(instance, role, tier, new, puts);
    // The new chunks are the ones no pack holds yet (a chunk of the previous manifest
    // with the same hash is never new).
    for c in chunks.iter_mut().filter(|_| !placed.is_empty()) {
        if !c.is_inline()
            && !c.in_pack()
            && let Some(&(pack, at)) = placed.get(&c.hash)
        {
            c.pack = pack;
            c.at = at;
        }
    }
    Payload::Chunked(Chunked {
        tier: tier.name_arc().clone(),
        role,
        len: len as u64,
        chunks: chunks.into(),
        inline: inline.into(),
    })
}

/// The most bytes of chunks one pack holds (a tier may cap a blob's size: Redis at 512 MB).
pub(super) const PACK_MAX: u64 = 64 * 1024 * 1024;

/// Puts the chunks of `new` (each once) into packs of the step of their chunks, back to
/// back, a new pack from [`PACK_MAX`] bytes on; returns where each went, by hash: its
/// pack's nonce and its offset there.
pub(super) fn packs(
    instance: &InstanceKey,
    role: char,
    tier: &crate::tier::Tier,
    new: impl IntoIterator<Item = (Bytes, chunk::ChunkRef)>,
    puts: &mut Vec<Put>,
) -> std::collections::HashMap<[u8; 32], (u64, u64)> {
    let mut placed = std::collections::HashMap::new();
    let mut open: Option<(u64, u64, Vec<Bytes>)> = None; // (step, nonce, parts)
    let mut at = 0u64;
    let close = |open: Option<(u64, u64, Vec<Bytes>)>, puts: &mut Vec<Put>| {
        if let Some((seq, nonce, parts)) = open {
            puts.push(Put {
                tier: tier.clone(),
                key: chunk::pack_key(instance, seq, role, nonce).into(),
                parts,
            });
        }
    };
    for (bytes, c) in new {
        let len = bytes.len() as u64;
        let full = open.as_ref().is_some_and(|(seq, _, parts)| {
            *seq != c.seq || (!parts.is_empty() && at + len > PACK_MAX)
        });
        if full {
            close(open.take(), puts);
        }
        let (_, nonce, parts) = open.get_or_insert_with(|| {
            at = 0;
            (c.seq, chunk::pack_nonce(), Vec::new())
        });
        placed.insert(c.hash, (*nonce, at));
        at += len;
        parts.push(bytes);
    }
    close(open, puts);
    placed
}

/// What a blob role holds, for people.
fn role_name(role: char) -> &'static str {
    match role {
        's' => "state",
        'c' => "driver call",
        'i' => "input (impulse or driver reply)",
        _ => "payload",
    }
}
