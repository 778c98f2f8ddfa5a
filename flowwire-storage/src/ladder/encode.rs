//! A sealed step's record and history entry, encoded into the arena: the record from the
//! live one when every payload stays inline, from its placed form otherwise.

use bytes::Bytes;

use crate::error::BlobError;
use crate::record::{Draft, HistoryEntryRef, LiveRecord, PayloadRef, PlacedRecord};

use super::Placement;

/// A step's record and history entry (its number and bytes), encoded.
pub(super) type Encoded = (Bytes, Option<(u64, Bytes)>);

/// The record a step writes: the live one (every payload inline), or its placed form.
#[derive(Clone, Copy)]
pub(super) enum Written<'a> {
    Inline(&'a LiveRecord),
    Placed(&'a PlacedRecord),
}

impl Placement {
    #[allow(clippy::result_large_err)] // as for `place`
    /// A step's record and, when history is kept, its history entry (its input's payload
    /// `payload`, the state it leaves `state`), encoded into `arena`.
    pub(super) fn encode_step(
        &self,
        draft: &Draft,
        record: Written<'_>,
        payload: Option<PayloadRef<'_>>,
        state: PayloadRef<'_>,
        keep_history: bool,
        (buf, arena): (&mut Vec<u8>, &mut crate::arena::Arena),
    ) -> Result<Encoded, BlobError> {
        let Draft {
            key,
            version,
            input,
            output,
            at_ms,
            ..
        } = draft;
        let seq = draft.record.seq;
        // A value this build cannot encode (its error, for the value named `tier`).
        // (Nothing is allocated unless it fails: this runs every step.)
        let corrupt = |tier: &'static str| {
            move |e: crate::CodecError| BlobError::Corrupt {
                instance: key.to_string(),
                tier: tier.into(),
                key: key.to_string(),
                detail: e.to_string(),
            }
        };
        buf.clear();
        match record {
            Written::Inline(live) => live.encode_inline(key, buf, self.checksums()),
            Written::Placed(placed) => placed.encode_with(key, buf, self.checksums()),
        }
        .map_err(corrupt("record"))?;
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
        if !keep_history {
            return Ok((record_bytes, None));
        }
        let entry = HistoryEntryRef {
            seq,
            input,
            output,
            version: *version,
            payload,
            state: Some(state),
            at_ms: *at_ms,
        };
        buf.clear();
        entry
            .encode_with(key, buf, self.checksums())
            .map_err(corrupt("history"))?;
        Ok((record_bytes, Some((seq, arena.copy(buf)))))
    }
}
