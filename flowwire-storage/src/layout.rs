//! Where an instance's payloads live: the operator's view of the ladder.
//!
//! [`Layout::read`] reads an instance's record and the first entries of its history from
//! the store — envelopes only, no blob is fetched — and reports, for each payload, its tier,
//! its size and its key there.

use std::fmt;
use std::sync::Arc;

use crate::blob::Payload;
use crate::error::{CodecError, StoreError};
use crate::record::{HistoryEntry, InstanceKey, PlacedRecord, Status, StepInput, StepOutput};
use crate::store::InstanceStore;

/// One payload's place: its tier (`inline` when it lives in the record), size and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The tier's name, or `inline`.
    pub tier: Arc<str>,
    /// The payload's length in bytes.
    pub bytes: u64,
    /// The blob's key on its tier (`None` when inline; for a chunked payload, the blob of
    /// its first chunk that is not inline).
    pub key: Option<Arc<str>>,
    /// How many chunks hold it (0 unless it is chunked).
    pub chunks: usize,
    /// How many blobs on its tier hold those chunks: packs, or chunks of their own (0
    /// unless it is chunked).
    pub blobs: usize,
}

impl Piece {
    /// The place of a persisted payload.
    ///
    /// ```
    /// use flowwire::storage::layout::Piece;
    /// use flowwire::storage::Payload;
    /// use flowwire::storage::record::InstanceKey;
    /// let key = InstanceKey::new("Order", "o-1");
    /// let piece = Piece::of(&key, &Payload::Inline(bytes::Bytes::from_static(b"abc")));
    /// assert_eq!(piece.to_string(), "inline, 3 B");
    /// ```
    pub fn of(instance: &InstanceKey, payload: &Payload) -> Piece {
        match payload {
            Payload::Inline(b) => Piece {
                tier: "inline".into(),
                bytes: b.len() as u64,
                key: None,
                chunks: 0,
                blobs: 0,
            },
            Payload::Blob(r) => Piece {
                tier: r.tier.clone(),
                bytes: r.len,
                key: Some(r.key.clone()),
                chunks: 0,
                blobs: 0,
            },
            Payload::Chunked(c) => Piece {
                tier: c.tier.clone(),
                bytes: c.len,
                key: c
                    .chunks
                    .iter()
                    .find(|ch| !ch.is_inline())
                    .map(|first| c.key_of(instance, first).into()),
                chunks: c.chunks.len(),
                blobs: c.distinct().count(),
            },
        }
    }

    /// Whether the payload lives in the record itself.
    pub fn is_inline(&self) -> bool {
        self.key.is_none()
    }
}

/// Bytes for humans: `512 B`, `64.0 KiB`, `8.3 MiB`, `1.2 GiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss)] // a display figure
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

impl fmt::Display for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            None => write!(f, "inline, {}", human(self.bytes)),
            Some(key) if self.chunks > 0 => write!(
                f,
                "tier `{}`, {} in {} chunks from `{key}`",
                self.tier,
                human(self.bytes),
                self.chunks
            ),
            Some(key) => write!(f, "tier `{}`, {} at `{key}`", self.tier, human(self.bytes)),
        }
    }
}

/// The places of one history entry's payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLayout {
    /// The step's number.
    pub seq: u64,
    /// What came in.
    pub input: StepInput,
    /// What went out.
    pub output: StepOutput,
    /// What came with the input (the encoded impulse or the driver's reply).
    pub payload: Option<Piece>,
    /// The state snapshot after the step (`None` when history keeps no snapshot).
    pub state: Option<Piece>,
}

/// The places of an instance's payloads: its record and the history entries read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The instance.
    pub instance: InstanceKey,
    /// Where it stands.
    pub status: Status,
    /// Steps taken.
    pub seq: u64,
    /// The current state.
    pub state: Piece,
    /// The argument of the call in flight.
    pub call: Option<Piece>,
    /// The first history entries kept, oldest first.
    pub steps: Vec<StepLayout>,
}

impl Layout {
    /// Reads the layout of an instance: its record and up to `history` entries of its
    /// history, from the first kept. `Ok(None)` when the store has no such instance.
    /// `limit` bounds every decoded value.
    ///
    /// The record and the history are two reads: a step committed between them shows in
    /// the history but not in the record.
    pub async fn read(
        store: &dyn InstanceStore,
        key: &InstanceKey,
        history: usize,
        limit: usize,
    ) -> Result<Option<Layout>, StoreError> {
        let decode_error = |what: &'static str, source: CodecError| StoreError::Decode {
            flow: key.flow.to_string(),
            id: key.id.to_string(),
            what,
            source,
        };
        let Some(stored) = store.load(key).await? else {
            return Ok(None);
        };
        let record = PlacedRecord::decode(&stored.bytes, key, limit)
            .map_err(|e| decode_error("the record", e))?;
        let mut steps = Vec::new();
        if history > 0 {
            for (_, bytes) in store.history(key, 0, history).await? {
                let e = HistoryEntry::decode(&bytes, key, limit)
                    .map_err(|e| decode_error("a history entry", e))?;
                steps.push(StepLayout {
                    seq: e.seq,
                    input: e.input,
                    output: e.output,
                    payload: e.payload.as_ref().map(|p| Piece::of(key, p)),
                    state: e.state.as_ref().map(|p| Piece::of(key, p)),
                });
            }
        }
        Ok(Some(Layout {
            instance: key.clone(),
            status: record.record.status,
            seq: record.record.seq,
            state: Piece::of(key, &record.record.state),
            call: record
                .record
                .pending
                .as_ref()
                .map(|p| Piece::of(key, &p.call)),
            steps,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobRef;

    #[test]
    fn pieces_read_for_humans() {
        let blob = Payload::Blob(BlobRef {
            tier: "nvme".into(),
            key: "Order/o-1/3.s".into(),
            len: 3 * 1024 * 1024 + 512 * 1024,
            crc: 0,
        });
        let key = InstanceKey::new("Order", "o-1");
        assert_eq!(
            Piece::of(&key, &blob).to_string(),
            "tier `nvme`, 3.5 MiB at `Order/o-1/3.s`"
        );
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(64 * 1024), "64.0 KiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
        assert_eq!(human(u64::MAX), "17179869184.0 GiB");
    }
}
