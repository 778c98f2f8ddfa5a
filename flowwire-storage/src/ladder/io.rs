//! Tier I/O for a record's blobs: writing a step's puts, reading and checking a payload,
//! resolving a placed record into its payloads, deleting garbage.

use bytes::Bytes;

use crate::blob::{self, BlobRef, FrameFault, Payload};
use crate::error::BlobError;
use crate::record::{InstanceKey, PlacedRecord, Record};
use crate::tier::{BlobTier, TierError};

use super::{Placement, Put};

impl Placement {
    /// Writes blobs, all at once; the first failure is returned (the others still finish).
    pub async fn put_all(&self, instance: &InstanceKey, puts: &[Put]) -> Result<(), BlobError> {
        let futs = puts.iter().map(|p| p.tier.put(&p.key, &p.parts));
        let results = crate::join::join_all(futs).await;
        for (p, r) in puts.iter().zip(results) {
            r.map_err(|source| BlobError::Tier {
                instance: instance.to_string(),
                tier: p.tier.name().to_string(),
                key: p.key.to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Reads a payload back, checking it against its reference.
    pub async fn fetch(
        &self,
        instance: &InstanceKey,
        payload: &Payload,
    ) -> Result<Bytes, BlobError> {
        let r = match payload {
            Payload::Inline(b) => return Ok(b.clone()),
            Payload::Blob(r) => r,
        };
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
