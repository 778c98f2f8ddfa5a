//! Cutting a step's new blobs and writing their chunks before the step is sealed, each
//! chunk written while the rest are still being cut.
//!
//! Sealing a state that holds a [`Blob`] no earlier step cut (a new blob, or one read back
//! from the store) cuts and hashes the whole blob first, then writes its new chunks: at
//! 2 MiB, 2.5 ms of cutting on the runner's thread and then 2 ms of writes. A
//! [`Precut`] does the same work off the runner, as a pipeline: a blocking thread finds
//! the cuts (a large blob's second half on another thread meanwhile:
//! [`parallel::cut_each`]); each chunk is hashed and, when new, written as soon as it is
//! cut. The blob
//! keeps its cuts, so the seal that follows finds them and only leaves out the puts of
//! the chunks written here ([`Sealed::skip_written`]). The chunks, their keys and what
//! is written are exactly those of sealing without a precut: the same cuts (one
//! chunker), the same rule for keeping a key (the hash is in the previous manifest), the
//! same key for a new chunk (`chunk_key` at the step's sequence number).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::blob::{self, Payload};
use crate::chunk::{ChunkRef, ChunkSize, chunk_key, parallel, stored_chunks};
use crate::error::{BlobError, TierError};
use crate::record::InstanceKey;
use crate::rope::{Blob, Piece, Rope};
use crate::tier::{BlobTier, Tier};

use super::{Placement, Sealed};

/// Chunks hashed or written at once, per blob: enough to keep both cores and the disk's
/// queue busy, few enough that a 1 GiB blob does not start 2,000 writes.
const IN_FLIGHT: usize = 16;

/// The blobs of a state that its seal would cut and hash first, and what to write them
/// to: see [`Placement::precut`].
#[derive(Debug)]
pub struct Precut {
    tier: Tier,
    size: ChunkSize,
    blobs: Vec<Blob>,
    /// The hashes the previous manifest of the state holds: those chunks keep their keys
    /// and are not written again.
    known: HashSet<[u8; 32]>,
}

/// The keys of the chunks a [`Precut`] wrote.
#[derive(Debug, Default)]
pub struct Written(HashSet<Arc<str>>);

impl Written {
    /// Whether the chunk under `key` was written.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains(key)
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

impl Sealed {
    /// Leaves out the puts of the chunks a precut already wrote.
    pub fn skip_written(&mut self, written: &Written) {
        if !written.is_empty() {
            self.puts.retain(|p| !written.contains(&p.key));
        }
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

    /// Cuts and hashes the blobs of `plan` for the state of `instance` at step `seq`,
    /// writing each new chunk durably to the plan's tier while the rest are cut. Each
    /// blob keeps its cuts. Dropped before it ends, the chunks written so far stay (no
    /// record refers to them; their keys are the step's own).
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
        let seen = Arc::new(Mutex::new(known));
        let mut written = Written::default();
        for blob in blobs {
            let chunks = cut_blob(instance, seq, &tier, size, &blob, &seen, &mut written).await?;
            blob.keep_cuts(size, chunks);
        }
        Ok(written)
    }
}

/// One blob through the pipeline: its chunks, in order.
async fn cut_blob(
    instance: &InstanceKey,
    seq: u64,
    tier: &Tier,
    size: ChunkSize,
    blob: &Blob,
    seen: &Arc<Mutex<HashSet<[u8; 32]>>>,
    written: &mut Written,
) -> Result<Vec<ChunkRef>, BlobError> {
    let failed = |detail: String| BlobError::Tier {
        instance: instance.to_string(),
        tier: tier.name().to_string(),
        key: format!("{instance}/{seq}.s (chunks)"),
        source: TierError::unavailable(tier.name(), detail),
    };
    let (tx, mut cuts) = tokio::sync::mpsc::unbounded_channel::<(usize, usize)>();
    let data = blob.bytes().clone();
    // The cuts go out as they are found; the cutter stops once nobody listens.
    let cutter = tokio::task::spawn_blocking(move || {
        parallel::cut_each(&data, &size, |at, len| tx.send((at, len)).is_ok());
    });
    let mut chunks = Vec::with_capacity(blob.len() / size.avg().max(1) + 1);
    let mut flying = VecDeque::with_capacity(IN_FLIGHT);
    loop {
        let next = if flying.len() < IN_FLIGHT {
            cuts.recv().await
        } else {
            None
        };
        let Some((at, len)) = next else {
            let Some(task) = flying.pop_front() else {
                break;
            };
            let (chunk, key) = finish(task, &failed).await?;
            chunks.push(chunk);
            written.0.extend(key);
            continue;
        };
        let body = blob.bytes().slice(at..at + len);
        flying.push_back(tokio::spawn(chunk(
            instance.clone(),
            seq,
            tier.clone(),
            body,
            seen.clone(),
        )));
    }
    cutter
        .await
        .map_err(|e| failed(format!("cutting failed: {e}")))?;
    Ok(chunks)
}

type ChunkTask = tokio::task::JoinHandle<Result<(ChunkRef, Option<Arc<str>>), BlobError>>;

/// Waits for one chunk's task.
async fn finish(
    task: ChunkTask,
    failed: &impl Fn(String) -> BlobError,
) -> Result<(ChunkRef, Option<Arc<str>>), BlobError> {
    task.await
        .map_err(|e| failed(format!("a chunk's task failed: {e}")))?
}

/// Hashes one chunk and, when no earlier chunk has its hash, writes it. The chunk's step
/// is left 0, as in a blob's cuts.
async fn chunk(
    instance: InstanceKey,
    seq: u64,
    tier: Tier,
    body: Bytes,
    seen: Arc<Mutex<HashSet<[u8; 32]>>>,
) -> Result<(ChunkRef, Option<Arc<str>>), BlobError> {
    let hashed = body.clone();
    let c = tokio::task::spawn_blocking(move || ChunkRef {
        hash: *blake3::hash(&hashed).as_bytes(),
        seq: 0,
        len: u32::try_from(hashed.len()).expect("a chunk is at most 64 MiB"),
        crc: crc32fast::hash(&hashed),
    })
    .await
    .map_err(|e| BlobError::Tier {
        instance: instance.to_string(),
        tier: tier.name().to_string(),
        key: format!("{instance}/{seq}.s (a chunk)"),
        source: TierError::unavailable(tier.name(), format!("hashing failed: {e}")),
    })?;
    let new = seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(c.hash);
    if !new {
        return Ok((c, None));
    }
    let key: Arc<str> = chunk_key(&instance, seq, 's', &c.hash).into();
    let parts = [blob::header(&key, u64::from(c.len), c.crc), body];
    tier.put(&key, &parts)
        .await
        .map_err(|source| BlobError::Tier {
            instance: instance.to_string(),
            tier: tier.name().to_string(),
            key: key.to_string(),
            source,
        })?;
    Ok((c, Some(key)))
}
