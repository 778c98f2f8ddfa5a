//! Cutting a step's new blobs and writing their chunks before the step is sealed, as one
//! pack.
//!
//! Sealing a state that holds a [`Blob`] no earlier step cut (a new blob, or one read back
//! from the store) cuts and hashes the whole blob first, then writes its new chunks: at
//! 2 MiB, 0.85 ms of cutting and hashing and then the write. A [`Precut`] does the work
//! off the runner, and writes the step's new chunks as one pack (one file, one fsync, on
//! a local disk):
//! - when the state shares no chunk with the previous one (a start, a state replaced
//!   whole), the pack is the new blobs' bytes as they are: its write starts at once, while
//!   a blocking thread cuts and hashes them ([`parallel::cut_and_hash`]), and each chunk is
//!   then named by its offset in the pack (a chunk found twice is written twice, once for
//!   each place);
//! - otherwise the blobs are cut and hashed first, and the pack holds the chunks the
//!   previous manifest does not (each once).
//!
//! A blob keeps its cuts (content only, no place), so the seal that follows finds them,
//! and the chunks' places come from [`Written`] (`Placement::seal` takes it). The chunks
//! are exactly those of sealing without a precut: the same cuts (one chunker), the same
//! rule for keeping a chunk (its hash is in the previous manifest).

use bytes::Bytes;
use std::collections::{HashMap, HashSet};

use crate::blob::Payload;
use crate::chunk::{ChunkRef, ChunkSize, pack_key, pack_nonce, parallel, stored_chunks};
use crate::error::{BlobError, TierError};
use crate::record::InstanceKey;
use crate::rope::{Blob, Piece, Rope};
use crate::tier::{BlobTier, Tier};

use super::place::{PACK_MAX, packs};
use super::{Placement, Put};

/// The blobs of a state that its seal would cut and hash first, and what to write them
/// to: see [`Placement::precut`].
#[derive(Debug)]
pub struct Precut {
    tier: Tier,
    size: ChunkSize,
    blobs: Vec<Blob>,
    /// The hashes the previous manifest of the state holds: those chunks keep their places
    /// and are not written again.
    known: HashSet<[u8; 32]>,
}

/// The chunks a [`Precut`] wrote, by hash, each with its step and its place in its pack.
#[derive(Debug, Default)]
pub struct Written(HashMap<[u8; 32], ChunkRef>);

impl Written {
    /// The chunks, by hash.
    pub fn chunks(&self) -> &HashMap<[u8; 32], ChunkRef> {
        &self.0
    }

    /// How many chunks were written.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Placement {
    /// What sealing `state` would cut and hash before writing anything: the blobs of a
    /// state in pieces that is stored as chunks and whose cuts at its tier's chunk size
    /// are not known yet. `None` when there are none, or when the state is the one `prev`
    /// (the committed state payload, and the state it holds when it is in memory) holds:
    /// its seal keeps the payload as it is.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
    /// use flowwire::Blob;
    /// use flowwire::storage::rope::{Rope, codec::encode_rope};
    /// use flowwire::storage::{InstanceKey, Ladder, MIB, Tier};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let placement = Ladder::new().default_to(Tier::fs(dir.path())).validate(64 * MIB)?;
    /// // A state of a few small fields and a 3 MiB blob, encoded as the engine does.
    /// let scan = Blob::from((0..3 * MIB).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>());
    /// let (mut head, mut cuts) = (Vec::new(), Vec::new());
    /// encode_rope(&(42u32, scan, "open"), &mut head, &mut cuts)?;
    /// let state = Rope::assemble(head.into(), &mut cuts);
    ///
    /// let key = InstanceKey::new("Claim", "c-1");
    /// let plan = placement.precut(&state, None).expect("a new blob to cut");
    /// let written = placement.cut_and_put(&key, 1, plan).await?;
    /// assert!(!written.is_empty(), "its chunks are on the tier");
    /// assert!(placement.precut(&state, None).is_none(), "the blob keeps its cuts");
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub fn precut(&self, state: &Rope, prev: Option<(&Payload, Option<&Rope>)>) -> Option<Precut> {
        let Rope::Pieces { pieces, .. } = state else {
            return None;
        };
        if prev.and_then(|(_, r)| r).is_some_and(|r| r.same(state)) {
            return None;
        }
        let tier = self.chunked_state_tier(state.len())?;
        let size = tier.chunk_sizes();
        let blobs: Vec<Blob> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Blob(b) if !b.is_cut(&size) => Some(b.clone()),
                _ => None,
            })
            .collect();
        if blobs.is_empty() {
            return None;
        }
        let prev = prev
            .and_then(|(p, _)| p.chunked())
            .filter(|c| c.tier == *tier.name_arc() && c.role == 's');
        let known = stored_chunks(prev).into_keys().collect();
        Some(Precut {
            tier: tier.clone(),
            size,
            blobs,
            known,
        })
    }

    /// Cuts and hashes the blobs of `plan` for the state of `instance` at step `seq`, and
    /// writes their new chunks durably to the plan's tier as one pack (see the module's
    /// documentation). Each blob keeps its cuts. Dropped before it ends, the pack may stay
    /// (no record refers to it; its key is never written again).
    pub async fn cut_and_put(
        &self,
        instance: &InstanceKey,
        seq: u64,
        plan: Precut,
    ) -> Result<Written, BlobError> {
        let Precut {
            tier,
            size,
            blobs,
            known,
        } = plan;
        let total: u64 = blobs.iter().map(|b| b.len() as u64).sum();
        let failed = |key: String, source: TierError| BlobError::Tier {
            instance: instance.to_string(),
            tier: tier.name().to_string(),
            key,
            source,
        };
        let cut = || cut_all(blobs.clone(), size);
        let cut_failed = |e: String| {
            failed(
                format!("{instance}/{seq}.s (chunks)"),
                TierError::unavailable(tier.name(), format!("cutting failed: {e}")),
            )
        };
        let mut written = Written::default();
        if known.is_empty() && total <= PACK_MAX {
            // Nothing to share: the pack is the blobs as they are, written while they are cut
            // (the write is started first: it is the longer of the two).
            let nonce = pack_nonce();
            let key = pack_key(instance, seq, 's', nonce);
            let parts: Vec<Bytes> = blobs.iter().map(|b| b.bytes().clone()).collect();
            let writing = {
                let (tier, key) = (tier.clone(), key.clone());
                tokio::spawn(async move { tier.put(&key, &parts).await })
            };
            let cuts = cut().await;
            let done = match writing.await {
                Ok(put) => put.map_err(|source| failed(key.clone(), source)),
                Err(e) => Err(failed(
                    key.clone(),
                    TierError::unavailable(tier.name(), format!("writing failed: {e}")),
                )),
            };
            let cuts = match done {
                Ok(()) => cuts.map_err(cut_failed),
                Err(e) => Err(e),
            };
            let cuts = match cuts {
                Ok(cuts) => cuts,
                Err(e) => {
                    // The pack is this write's own and no record will refer to it (see
                    // `put_all`): best effort, it goes (a failed put may have landed).
                    let _ = tier.delete(&key).await;
                    return Err(e);
                }
            };
            let mut base = 0u64;
            for (blob, chunks) in blobs.iter().zip(cuts) {
                let mut at = base;
                for c in &chunks {
                    written.0.entry(c.hash).or_insert(ChunkRef {
                        seq,
                        pack: nonce,
                        at,
                        ..*c
                    });
                    at += u64::from(c.len);
                }
                base += blob.len() as u64;
                blob.keep_cuts(size, chunks);
            }
            return Ok(written);
        }
        let cuts = cut().await.map_err(cut_failed)?;
        let mut new = Vec::new();
        let mut fresh = HashSet::new();
        for (blob, chunks) in blobs.iter().zip(&cuts) {
            let mut at = 0usize;
            for c in chunks {
                if !known.contains(&c.hash) && fresh.insert(c.hash) {
                    let body = blob.bytes().slice(at..at + c.len as usize);
                    new.push((body, ChunkRef { seq, ..*c }));
                }
                at += c.len as usize;
            }
        }
        let mut puts: Vec<Put> = Vec::new();
        let placed = packs(instance, 's', &tier, new.iter().cloned(), &mut puts);
        self.put_all(instance, &puts).await?;
        for (_, c) in new {
            if let Some(&(pack, at)) = placed.get(&c.hash) {
                written.0.insert(c.hash, ChunkRef { pack, at, ..c });
            }
        }
        for (blob, chunks) in blobs.iter().zip(cuts) {
            blob.keep_cuts(size, chunks);
        }
        Ok(written)
    }
}

/// Cuts and hashes `blobs` on a blocking thread.
async fn cut_all(blobs: Vec<Blob>, size: ChunkSize) -> Result<Vec<Vec<ChunkRef>>, String> {
    tokio::task::spawn_blocking(move || {
        blobs
            .iter()
            .map(|b| parallel::cut_and_hash(b.bytes(), &size))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| e.to_string())
}
