//! Placing and sealing a step's payloads: which go inline, which to which tier, the blob
//! references the record keeps, and the accounting of blobs a step retires.

use std::sync::Arc;

use bytes::Bytes;

use crate::blob::{self, BlobRef, Payload};
use crate::chunk::{self, Chunked};
use crate::error::BlobError;
use crate::record::{Draft, HistoryEntryRef, InstanceKey, PlacedRecord, Retired, StepWrite};
use crate::rope::{Rope, split::split_rope};

use super::keys::{blob_key, write_tag};
use super::{Placement, Put, Retention, Sealed};

impl Placement {
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

    #[allow(clippy::result_large_err)] // as for `place`
    /// Places a step's payloads and builds its write.
    ///
    /// `prev` is the committed record: its persisted form, and its state when it is the one
    /// that form holds (`None` after a migration changed them in memory: the
    /// state is then placed anew even when the step leaves it as it is). `None` for a start.
    /// `written`: the chunks this step's precut wrote, if it had one. `buf` is a reusable
    /// encode buffer; the record and the history entry are carved from `arena`.
    pub fn seal(
        &self,
        draft: &Draft,
        prev: Option<(&PlacedRecord, Option<&Rope>)>,
        reuse: Option<&super::Reuse<'_>>,
        retention: Retention,
        buf: &mut Vec<u8>,
        arena: &mut crate::arena::Arena,
    ) -> Result<Sealed, BlobError> {
        let written = reuse.and_then(|r| r.written);
        let attempt = reuse.and_then(|r| r.attempt);
        // Borrowed, not cloned: only what the placed record and the write keep is copied
        // (reference counts for payloads).
        let Draft {
            key,
            expect,
            version,
            record,
            impulse,
            input,
            output,
            payload,
            at_ms,
        } = draft;
        let seq = record.seq;
        let mut puts = Vec::new();
        let state = match prev {
            // A chunked state is compared by its split (which keeps every chunk of an
            // unchanged one): comparing it here too would read both states once more.
            Some((p, Some(rope)))
                if same_state(rope, &record.state, p.record.state.chunked().is_none()) =>
            {
                p.record.state.clone()
            }
            // The chunks of a failed attempt of this step cover all of its state (the
            // committed state's chunks it shared included): it is where they are found.
            _ => self.place_state(
                key,
                seq,
                &record.state,
                attempt
                    .map(|a| (&a.state, None))
                    .or_else(|| prev.map(|(p, rope)| (&p.record.state, rope))),
                written,
                &mut puts,
            )?,
        };
        let pending = match &record.pending {
            None => None,
            Some(c) => {
                let kept = prev
                    .and_then(|(p, _)| p.record.pending.as_ref())
                    .filter(|p| p.seq == c.seq)
                    .map(|p| p.call.clone());
                let call = match kept {
                    Some(call) => call,
                    None => self.place(
                        key,
                        c.seq,
                        'c',
                        c.call.clone(),
                        prev.and_then(|(p, _)| p.record.pending.as_ref())
                            .map(|p| (&p.call, None)),
                        &mut puts,
                    )?,
                };
                Some(c.with_call(call))
            }
        };
        let keep_history = retention != Retention::None;
        let payload = match payload {
            Some(b) if keep_history => Some(self.place(
                key,
                seq,
                'i',
                b.clone(),
                attempt.and_then(|a| a.input.as_ref()).map(|p| (p, None)),
                &mut puts,
            )?),
            _ => None,
        };

        // Blob accounting. A call argument no history entry refers to: once the record
        // drops it, it is garbage. A state the previous record referred to and this one does
        // not is retired at this step (the previous step's snapshot shares it); the input's
        // blob only this step's entry refers to.
        // A chunked payload counts each of its chunks: the ones the next payload of its role
        // shares stay, the others are dropped.
        let mut dead: Vec<BlobRef> = Vec::new();
        if let Some((p, _)) = prev
            && let Some(old) = p.record.pending.as_ref()
        {
            dead = old.call.dropped_by(key, pending.as_ref().map(|c| &c.call));
        }
        let mut retired: Vec<Retired> = Vec::new();
        if retention != Retention::All {
            if let Some((p, _)) = prev {
                retired.extend(p.retired.iter().cloned());
                retired.extend(
                    p.record
                        .state
                        .dropped_by(key, Some(&state))
                        .into_iter()
                        .map(|blob| Retired { died: seq, blob }),
                );
            }
            if let Some(p) = &payload {
                retired.extend(p.blobs(key).into_iter().map(|blob| Retired {
                    died: seq + 1,
                    blob,
                }));
            }
        }
        let keep_from = retention.keep_from(seq);
        // Most steps retire nothing: no iterator machinery for them.
        let (gone, kept): (Vec<Retired>, Vec<Retired>) = if retired.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            retired.into_iter().partition(|r| r.died <= keep_from)
        };
        let active = record.has_call_out();
        let parked = matches!(record.status, crate::record::Status::Quarantined { .. });
        let timer = record.timer.map(|t| t.due_ms);
        let correlation: Option<Arc<str>> = record
            .correlation
            .as_deref()
            .filter(|_| !record.status.is_terminal())
            .map(Arc::from);
        let ended_key: Option<Arc<str>> = record
            .correlation
            .as_deref()
            .filter(|_| record.status.is_terminal())
            .map(Arc::from);
        let uncorrelate = prev
            .and_then(|(p, _)| p.record.correlation.as_deref())
            .filter(|old| correlation.as_deref() != Some(*old))
            .map(Arc::from);
        // Built where it stays (a record is several hundred bytes: each move copies it).
        let mut placed = PlacedRecord {
            record: record.with_payloads(state, pending),
            retired: kept,
            trash: if gone.is_empty() {
                dead
            } else {
                dead.into_iter()
                    .chain(gone.into_iter().map(|r| r.blob))
                    .collect()
            },
        };
        placed.record.correlation = correlation.as_deref().map(str::to_owned);
        buf.clear();
        placed.encode(key, buf).map_err(|e| BlobError::Corrupt {
            instance: key.to_string(),
            tier: "record".into(),
            key: key.to_string(),
            detail: e.to_string(),
        })?;
        // The envelope's header is not counted by the decode limit; the payload is.
        let payload_len = buf.len().saturating_sub(crate::codec::HEADER_LEN);
        if payload_len > self.record_limit {
            return Err(BlobError::OverLimit {
                instance: key.to_string(),
                what: "record",
                len: payload_len as u64,
                limit: self.record_limit,
            });
        }
        let record_bytes = arena.copy(buf);
        let history = if keep_history {
            let entry = HistoryEntryRef {
                seq,
                input,
                output,
                version: *version,
                payload: payload.as_ref(),
                state: Some(&placed.record.state),
                at_ms: *at_ms,
            };
            buf.clear();
            entry.encode(key, buf).map_err(|e| BlobError::Corrupt {
                instance: key.to_string(),
                tier: "history".into(),
                key: key.to_string(),
                detail: e.to_string(),
            })?;
            Some((seq, arena.copy(buf)))
        } else {
            None
        };
        let prune_below = match retention {
            Retention::Last(_) if keep_from > 0 => Some(keep_from),
            _ => None,
        };
        Ok(Sealed {
            write: StepWrite {
                key: key.clone(),
                expect: *expect,
                version: *version,
                seq,
                record: record_bytes,
                active,
                parked,
                timer,
                correlation,
                uncorrelate,
                ended_key,
                impulse: impulse.clone(),
                history,
                prune_below,
                fence: None,
                acknowledges: None,
                sends: Vec::new(),
            },
            // Only chunks are ever referred to again (a whole blob's key is the write's own).
            attempt: (placed.record.state.chunked().is_some()
                || payload.as_ref().and_then(Payload::chunked).is_some())
            .then(|| super::Attempt {
                state: placed.record.state.clone(),
                input: payload,
            }),
            placed,
            puts,
        })
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

/// Whether two states hold the same bytes: the same buffer or the same pieces (an
/// unchanged state is shared, not copied) answers without comparing large bytes; otherwise
/// one-piece states are compared if `compare`. (A state in pieces that is not the same is
/// placed again: its split keeps every chunk an unchanged one has.)
fn same_state(a: &Rope, b: &Rope, compare: bool) -> bool {
    a.same(b)
        || (compare
            && match (a, b) {
                (Rope::Flat(x), Rope::Flat(y)) => x == y,
                _ => false,
            })
}
