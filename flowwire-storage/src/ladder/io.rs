//! Tier I/O for a record's blobs: writing a step's puts, reading and checking a payload,
//! resolving a placed record into its payloads, deleting garbage.

use bytes::Bytes;

use crate::blob::{self, BlobRef, FrameFault, Payload};
use crate::chunk::{ChunkRef, Chunked};
use crate::error::BlobError;
use crate::record::{InstanceKey, PlacedRecord, Record};
use crate::tier::{BlobTier, TierError};

use super::{Placement, Put};

/// How many chunks of one payload are read at once, at most.
pub(crate) const CHUNK_READS: usize = 16;

/// How many bytes of chunks of one payload are read at once (when a chunk is smaller).
const READ_BYTES: u64 = 8 * 1024 * 1024;

/// How many blobs of one step are written at once, at most.
pub(crate) const PUTS_IN_FLIGHT: usize = 64;

/// How many bytes of blobs of one step are written at once (when the blobs are smaller).
const PUT_BYTES: usize = 32 * 1024 * 1024;

impl Placement {
    /// Writes blobs, 64 (and 32 MiB) at a time (a large payload's chunks are many); the
    /// first failure is returned (the others of its window still finish). On a failure
    /// the blobs already tried are deleted again, best effort: each key is this write's
    /// own (a fresh tag or pack nonce), so no record refers to one, and the step they were
    /// for is not committed; left, they would stay on their tier for good (a step retried
    /// through a tier outage writes new ones each time).
    pub async fn put_all(&self, instance: &InstanceKey, puts: &[Put]) -> Result<(), BlobError> {
        let (tried, result) = Self::put_windows(instance, puts).await;
        if result.is_err() {
            let deletes = puts[..tried].iter().map(|p| p.tier.delete(&p.key));
            let _ = crate::join::join_all(deletes).await;
        }
        result
    }

    /// [`put_all`](Self::put_all)'s writes, with how many of `puts` were tried.
    async fn put_windows(instance: &InstanceKey, puts: &[Put]) -> (usize, Result<(), BlobError>) {
        let mut rest = puts;
        let mut tried = 0;
        while !rest.is_empty() {
            // A window: up to 64 blobs and 32 MiB (at least one blob): a tier may copy a
            // body while it sends it (S3 joins header and body), so a payload of many chunks
            // is not copied whole at once.
            let mut n = 0;
            let mut bytes = 0usize;
            while n < rest.len() && n < PUTS_IN_FLIGHT && (n == 0 || bytes < PUT_BYTES) {
                bytes += rest[n].parts.iter().map(Bytes::len).sum::<usize>();
                n += 1;
            }
            let (window, after) = rest.split_at(n);
            rest = after;
            tried += n;
            let futs = window.iter().map(|p| p.tier.put(&p.key, &p.parts));
            let results = crate::join::join_all(futs).await;
            for (p, r) in window.iter().zip(results) {
                if let Err(source) = r {
                    let e = BlobError::Tier {
                        instance: instance.to_string(),
                        tier: p.tier.name().to_string(),
                        key: p.key.to_string(),
                        source,
                    };
                    return (tried, Err(e));
                }
            }
        }
        (tried, Ok(()))
    }

    /// Reads a payload back, checking it against its reference.
    pub async fn fetch(
        &self,
        instance: &InstanceKey,
        payload: &Payload,
    ) -> Result<Bytes, BlobError> {
        match payload {
            Payload::Inline(b) => Ok(b.clone()),
            Payload::Blob(r) => self.fetch_blob(instance, r).await,
            Payload::Chunked(c) => self.fetch_chunks(instance, c).await,
        }
    }

    /// Reads one blob back, checking it against its reference.
    async fn fetch_blob(&self, instance: &InstanceKey, r: &BlobRef) -> Result<Bytes, BlobError> {
        let names = || (instance.to_string(), r.tier.to_string(), r.key.to_string());
        let Some(tier) = self.by_name.get(&r.tier) else {
            let (instance, tier, key) = names();
            return Err(BlobError::UnknownTier {
                instance,
                tier,
                key,
            });
        };
        let framed_len = blob::header(&r.key, r.len, r.crc).len() as u64 + r.len;
        let got = tier.get(&r.key, Some(framed_len)).await.map_err(|source| {
            let (instance, tier, key) = names();
            BlobError::Tier {
                instance,
                tier,
                key,
                source,
            }
        })?;
        let Some(framed) = got else {
            let (instance, tier, key) = names();
            return Err(BlobError::Missing {
                instance,
                tier,
                key,
            });
        };
        blob::unframe(framed, r).map_err(|fault| {
            let (instance, tier, key) = names();
            match fault {
                FrameFault::Truncated { expected, found } => BlobError::Truncated {
                    instance,
                    tier,
                    key,
                    expected,
                    found,
                },
                FrameFault::Corrupt(detail) => BlobError::Corrupt {
                    instance,
                    tier,
                    key,
                    detail,
                },
            }
        })
    }

    /// Reads a chunked payload back: its chunks, 16 (and 8 MiB) at a time, each checked
    /// against its frame, its CRC-32 and its BLAKE3 hash, into one buffer of the length
    /// the manifest declares (after checking it adds up and is within the decode limit).
    async fn fetch_chunks(&self, instance: &InstanceKey, c: &Chunked) -> Result<Bytes, BlobError> {
        let corrupt = |key: String, detail: String| BlobError::Corrupt {
            instance: instance.to_string(),
            tier: c.tier.to_string(),
            key,
            detail,
        };
        let manifest = || format!("manifest of {} chunks", c.chunks.len());
        let sum: u64 = c.chunks.iter().map(|ch| u64::from(ch.len)).sum();
        if sum != c.len {
            return Err(corrupt(
                manifest(),
                format!("its chunks add up to {sum} bytes, it declares {}", c.len),
            ));
        }
        let len = usize::try_from(c.len)
            .ok()
            .filter(|&l| l <= self.record_limit)
            .ok_or_else(|| {
                corrupt(
                    manifest(),
                    format!(
                        "it declares {} bytes, over the decode limit of {} bytes",
                        c.len, self.record_limit
                    ),
                )
            })?;
        let inline = inline_chunks(c).map_err(|detail| corrupt(manifest(), detail))?;
        let mut inline = inline.iter();
        let mut out = bytes::BytesMut::with_capacity(len);
        let mut rest: &[ChunkRef] = &c.chunks;
        while !rest.is_empty() {
            // A window: up to 16 chunks and 8 MiB (at least one chunk), so what is read but
            // not yet copied stays small next to the payload.
            let mut n = 0;
            let mut bytes = 0u64;
            while n < rest.len() && n < CHUNK_READS && (n == 0 || bytes < READ_BYTES) {
                bytes += u64::from(rest[n].len);
                n += 1;
            }
            let (window, after) = rest.split_at(n);
            rest = after;
            let reads = reads_of(window);
            let futs = reads.iter().map(|r| {
                let fut: crate::join::BoxFuture<'_, Result<Bytes, BlobError>> = match r {
                    Read::Inline => Box::pin(async { Ok(Bytes::new()) }),
                    Read::Own(ch) => {
                        let r = c.blob_of(instance, ch);
                        Box::pin(async move { self.fetch_blob(instance, &r).await })
                    }
                    Read::Run { first, len, .. } => {
                        Box::pin(self.fetch_range(instance, c, first, *len))
                    }
                };
                fut
            });
            let fetched = crate::join::join_all(futs).await;
            let mut window = window.iter();
            for (read, body) in reads.iter().zip(fetched) {
                let body = body?;
                let (key, count) = match read {
                    Read::Inline => {
                        let ch = window.next().expect("one chunk per read");
                        debug_assert!(ch.is_inline());
                        // Checked against the manifest above.
                        out.extend_from_slice(inline.next().expect("one body per inline chunk"));
                        continue;
                    }
                    Read::Own(ch) => (c.key_of(instance, ch), 1),
                    Read::Run { first, count, .. } => (c.key_of(instance, first), *count),
                };
                let mut at = 0usize;
                for _ in 0..count {
                    let ch = window
                        .next()
                        .expect("the chunks of a read are in the window");
                    let part = &body[at..at + ch.len as usize];
                    at += ch.len as usize;
                    if ch.in_pack() && crc32fast::hash(part) != ch.crc {
                        return Err(corrupt(
                            key,
                            format!("the chunk at offset {} fails its CRC-32", ch.at),
                        ));
                    }
                    if blake3::hash(part).as_bytes() != &ch.hash {
                        let at = if ch.in_pack() {
                            format!("the chunk at offset {}", ch.at)
                        } else {
                            "its".into()
                        };
                        return Err(corrupt(
                            key,
                            format!("{at} BLAKE3 hash is not the one the manifest names"),
                        ));
                    }
                    out.extend_from_slice(part);
                }
            }
        }
        Ok(out.freeze())
    }

    /// Reads `len` bytes of the pack of `first` (a chunk of `c`) from where `first` starts:
    /// exactly that many, or a typed error naming the pack.
    async fn fetch_range(
        &self,
        instance: &InstanceKey,
        c: &Chunked,
        first: &ChunkRef,
        len: u64,
    ) -> Result<Bytes, BlobError> {
        let key = c.key_of(instance, first);
        let Some(tier) = self.by_name.get(&c.tier) else {
            return Err(BlobError::UnknownTier {
                instance: instance.to_string(),
                tier: c.tier.to_string(),
                key,
            });
        };
        let got = tier
            .get_range(&key, first.at, len)
            .await
            .map_err(|source| BlobError::Tier {
                instance: instance.to_string(),
                tier: c.tier.to_string(),
                key: key.clone(),
                source,
            })?;
        match got {
            None => Err(BlobError::Missing {
                instance: instance.to_string(),
                tier: c.tier.to_string(),
                key,
            }),
            Some(b) if b.len() as u64 != len => Err(BlobError::Truncated {
                instance: instance.to_string(),
                tier: c.tier.to_string(),
                key,
                expected: first.at + len,
                found: first.at + b.len() as u64,
            }),
            Some(b) => Ok(b),
        }
    }

    /// The record with its payloads read back.
    pub async fn resolve(
        &self,
        instance: &InstanceKey,
        placed: &PlacedRecord,
    ) -> Result<Record, BlobError> {
        let placed = &placed.record;
        let state = self.fetch(instance, &placed.state).await?;
        let pending = match &placed.pending {
            None => None,
            Some(c) => Some(c.with_call(self.fetch(instance, &c.call).await?)),
        };
        Ok(placed.with_payloads(state, pending))
    }

    /// Deletes blobs (after the record that dropped them is committed). Returns the ones
    /// that could not be deleted now (to try again with a later step).
    pub async fn delete_all(&self, blobs: &[BlobRef]) -> Vec<(BlobRef, TierError)> {
        let mut failed = Vec::new();
        let futs = blobs.iter().map(|b| {
            let tier = self.by_name.get(&b.tier).cloned();
            let key = b.key.clone();
            let fut: crate::join::BoxFuture<'static, Result<(), TierError>> =
                Box::pin(async move {
                    match tier {
                        Some(t) => t.delete(&key).await,
                        None => Ok(()),
                    }
                });
            fut
        });
        for (b, r) in blobs.iter().zip(crate::join::join_all(futs).await) {
            if let Err(e) = r {
                failed.push((b.clone(), e));
            }
        }
        failed
    }
}

/// One read of a window of chunks.
enum Read<'a> {
    /// An inline chunk: nothing to read.
    Inline,
    /// A chunk that is a blob of its own.
    Own(&'a ChunkRef),
    /// `count` chunks back to back in one pack, from `first`: `len` bytes.
    Run {
        first: &'a ChunkRef,
        count: usize,
        len: u64,
    },
}

/// The reads of `window`, in order: chunks back to back in one pack are read at once.
fn reads_of(window: &[ChunkRef]) -> Vec<Read<'_>> {
    let mut reads: Vec<Read<'_>> = Vec::with_capacity(window.len());
    for ch in window {
        if ch.is_inline() {
            reads.push(Read::Inline);
            continue;
        }
        if !ch.in_pack() {
            reads.push(Read::Own(ch));
            continue;
        }
        if let Some(Read::Run { first, count, len }) = reads.last_mut()
            && (first.seq, first.pack) == (ch.seq, ch.pack)
            && first.at.checked_add(*len) == Some(ch.at)
        {
            *count += 1;
            *len += u64::from(ch.len);
            continue;
        }
        reads.push(Read::Run {
            first: ch,
            count: 1,
            len: u64::from(ch.len),
        });
    }
    reads
}

/// The bodies of a manifest's inline chunks, checked against their chunks: one body each,
/// of its length, CRC-32 and BLAKE3 hash (the record's checksum covers them already; this
/// catches a manifest that is well formed but does not hold together).
fn inline_chunks(c: &Chunked) -> Result<&[Bytes], String> {
    let named = c.chunks.iter().filter(|ch| ch.is_inline()).count();
    if named != c.inline.len() {
        return Err(format!(
            "it names {named} inline chunks and holds {}",
            c.inline.len()
        ));
    }
    let chunks = c.chunks.iter().filter(|ch| ch.is_inline());
    for (i, (ch, body)) in chunks.zip(c.inline.iter()).enumerate() {
        if body.len() != ch.len as usize
            || crc32fast::hash(body) != ch.crc
            || blake3::hash(body).as_bytes() != &ch.hash
        {
            return Err(format!(
                "its inline chunk {i} does not match its length, CRC-32 or hash"
            ));
        }
    }
    Ok(&c.inline)
}
