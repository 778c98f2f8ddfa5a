//! The versioned envelope around every persisted value.
//!
//! ```text
//! 0..2   magic  b"FW"
//! 2      codec  1 = postcard
//! 3      kind   what the payload is (record, history entry, …)
//! 4..6   format version of that kind, little endian
//! 6..10  payload length, little endian
//! 10..14 CRC-32, little endian
//! 14..   payload
//! ```
//!
//! The CRC covers the payload. A value that belongs to one instance (a record, a history
//! entry) is written with [`encode_owned`] from record format 6 and history format 5 on:
//! its CRC then also covers the header before it and the instance's identity (flow and id,
//! each with its length), which are not stored. A record read under another instance's key,
//! or with a changed header byte, fails its checksum ([`open_owned`]): a store never serves
//! one instance's record as another's.
//!
//! Decoding checks every header field before it looks at the payload, and refuses a
//! declared length above the caller's limit or beyond the bytes present: a corrupt or
//! hostile value cannot make the process allocate unbounded memory. postcard itself caps
//! pre-allocation by the bytes it has, so lengths inside the payload are not trusted either.
//!
//! ```
//! use flowwire::storage::codec::{self, Kind};
//!
//! let mut buf = Vec::new();
//! codec::encode(Kind::State, &(7u32, "seven"), &mut buf)?;
//! let back: (u32, String) = codec::decode(Kind::State, &buf, 1024)?;
//! assert_eq!(back, (7, "seven".to_string()));
//! # Ok::<(), flowwire::storage::CodecError>(())
//! ```

mod checksum;
mod tail;
pub use checksum::{Checksums, stamp_owned};
use checksum::{binds, checksum};
pub(crate) use tail::{append_postcard, push_small};

use serde::{Deserialize, Serialize};

use crate::error::CodecError;
use crate::key::InstanceKey;

const MAGIC: [u8; 2] = *b"FW";
const CODEC_POSTCARD: u8 = 1;
/// Size of the envelope header in bytes.
pub const HEADER_LEN: usize = 14;
/// The decode limit used when none is configured: 64 MiB.
pub const DEFAULT_DECODE_LIMIT: usize = 64 << 20;

/// What a persisted value is; each kind evolves its own format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// An instance record.
    Record,
    /// A history entry.
    History,
    /// A flow state on its own.
    State,
}

impl Kind {
    const fn tag(self) -> u8 {
        match self {
            Kind::Record => 1,
            Kind::History => 2,
            Kind::State => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Kind> {
        match tag {
            1 => Some(Kind::Record),
            2 => Some(Kind::History),
            3 => Some(Kind::State),
            _ => None,
        }
    }

    /// The name used in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Record => "record",
            Kind::History => "history entry",
            Kind::State => "state",
        }
    }

    /// The first format version of this kind whose checksum binds the owner's identity and
    /// the header (`None`: the kind has no owner).
    const fn owned_since(self) -> Option<u16> {
        match self {
            Kind::Record => Some(6),
            Kind::History => Some(5),
            Kind::State => None,
        }
    }

    /// The newest format version of this kind that this build writes and reads.
    pub const fn current_version(self) -> u16 {
        match self {
            // Records and history entries: 1 = payloads always inline (flowwire 0.1 before the
            // ladder), 2 = payloads placed on the ladder, 3 = timers, redelivery counts and
            // compensations in records, step times in history; 4 (records only) = the
            // failure a compensating flow ends with, and its correlation key; 5 (records) = the
            // fan-out in flight, 4 (history) = fan-out inputs and outputs; 6 (records) and 5
            // (history) = the instance's identity and the header bound into the checksum;
            // 7 (records) and 6 (history) = retries (attempt counts of calls and branches,
            // retry steps) and typed failures; 8 (records) and 7 (history) = payloads may be
            // manifests of chunks (a build that does not know them refuses the record as of an
            // unknown format instead of failing to decode it); 9 (records) and 8 (history) =
            // manifests may hold small chunks inline; 10 (records) and 9 (history) = chunks
            // may be in packs. All are read.
            Kind::Record => 10,
            Kind::History => 9,
            Kind::State => 1,
        }
    }
}

/// Appends `value` to `out` inside an envelope of the given kind.
///
/// `out` is not cleared: callers reuse one buffer and clear it themselves.
pub fn encode<T: Serialize + ?Sized>(
    kind: Kind,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_with_version(kind, kind.current_version(), value, out)
}

/// Like [`encode`], with an explicit format version (for tests of version handling and for
/// migrations that must write an older format).
pub fn encode_with_version<T: Serialize + ?Sized>(
    kind: Kind,
    version: u16,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_inner(kind, version, None, value, out)
}

/// Appends `value`, which belongs to the instance `owner`, to `out` inside an envelope of
/// the given kind whose checksum binds the owner and the header.
///
/// ```
/// use flowwire::storage::codec::{self, Kind};
/// use flowwire::storage::record::InstanceKey;
///
/// let (a, b) = (InstanceKey::new("Order", "a"), InstanceKey::new("Order", "b"));
/// let mut buf = Vec::new();
/// codec::encode_owned(Kind::Record, &a, &7u32, &mut buf)?;
/// assert_eq!(codec::open_owned(Kind::Record, &buf, &a, 1024)?.0, Kind::Record.current_version());
/// // Read as another instance's, it fails its checksum.
/// assert!(codec::open_owned(Kind::Record, &buf, &b, 1024).is_err());
/// # Ok::<(), flowwire::storage::CodecError>(())
/// ```
pub fn encode_owned<T: Serialize + ?Sized>(
    kind: Kind,
    owner: &InstanceKey,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_inner(kind, kind.current_version(), Some(owner), value, out)
}

/// Like [`encode_owned`], with an explicit format version (for tests of version handling).
pub fn encode_owned_with_version<T: Serialize + ?Sized>(
    kind: Kind,
    version: u16,
    owner: &InstanceKey,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    encode_inner(kind, version, Some(owner), value, out)
}

fn encode_inner<T: Serialize + ?Sized>(
    kind: Kind,
    version: u16,
    owner: Option<&InstanceKey>,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    enveloped(kind, version, owner, out, Checksums::Written, |out| {
        append_postcard(value, out)
    })
}

/// Encodes what `body` writes (a value's postcard bytes) in an envelope of the current
/// format of `kind`, bound to `owner`: for the values every step encodes, written
/// without serde (`record/direct.rs`), byte for byte as [`encode_owned`] writes them
/// (with `Checksums::OnRead`, but for the checksum, left for [`stamp_owned`]).
pub(crate) fn encode_owned_by(
    kind: Kind,
    owner: &InstanceKey,
    out: &mut Vec<u8>,
    checksums: Checksums,
    body: impl FnOnce(&mut Vec<u8>) -> postcard::Result<()>,
) -> Result<(), CodecError> {
    enveloped(
        kind,
        kind.current_version(),
        Some(owner),
        out,
        checksums,
        body,
    )
}

fn enveloped(
    kind: Kind,
    version: u16,
    owner: Option<&InstanceKey>,
    out: &mut Vec<u8>,
    checksums: Checksums,
    body: impl FnOnce(&mut Vec<u8>) -> postcard::Result<()>,
) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(CODEC_POSTCARD);
    out.push(kind.tag());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    if let Err(e) = body(out) {
        return Err(CodecError::Encode(e.to_string()));
    }
    let payload_len = out.len() - start - HEADER_LEN;
    let len = u32::try_from(payload_len).map_err(|_| CodecError::TooLarge {
        size: payload_len,
        limit: u32::MAX as usize,
    })?;
    out[start + 6..start + 10].copy_from_slice(&len.to_le_bytes());
    if checksums == Checksums::Written {
        let crc = checksum(
            &out[start..start + 10],
            binds(kind, version, owner),
            &out[start + HEADER_LEN..],
        );
        out[start + 10..start + 14].copy_from_slice(&crc.to_le_bytes());
    }
    Ok(())
}

/// Checks the envelope around `bytes` and returns its payload.
///
/// Fails with a typed error for a missing magic, an unknown codec or kind, a newer format
/// version, a length above `limit` or beyond the bytes present, or a checksum mismatch.
pub fn open(kind: Kind, bytes: &[u8], limit: usize) -> Result<&[u8], CodecError> {
    open_versioned(kind, bytes, limit).map(|(_, payload)| payload)
}

/// Like [`open`], also returning the envelope's format version (for readers of older
/// formats).
pub fn open_versioned(kind: Kind, bytes: &[u8], limit: usize) -> Result<(u16, &[u8]), CodecError> {
    open_inner(kind, bytes, None, limit)
}

/// Checks the envelope around `bytes`, a value of the instance `owner` (see
/// [`encode_owned`]), and returns its format version and payload. Formats written before
/// the owner was bound are checked as they were written.
pub fn open_owned<'b>(
    kind: Kind,
    bytes: &'b [u8],
    owner: &InstanceKey,
    limit: usize,
) -> Result<(u16, &'b [u8]), CodecError> {
    open_inner(kind, bytes, Some(owner), limit)
}

fn open_inner<'b>(
    kind: Kind,
    bytes: &'b [u8],
    owner: Option<&InstanceKey>,
    limit: usize,
) -> Result<(u16, &'b [u8]), CodecError> {
    let version = header(kind, bytes, limit)?;
    let payload = &bytes[HEADER_LEN..];
    let stored = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    let computed = checksum(&bytes[..10], binds(kind, version, owner), payload);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok((version, payload))
}

/// Checks every field of the envelope header of `bytes` but its checksum, as a value of
/// `kind` of at most `limit` bytes; its format version.
fn header(kind: Kind, bytes: &[u8], limit: usize) -> Result<u16, CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Truncated {
            needed: HEADER_LEN,
            available: bytes.len(),
        });
    }
    let magic = [bytes[0], bytes[1]];
    if magic != MAGIC {
        return Err(CodecError::BadMagic { found: magic });
    }
    if bytes[2] != CODEC_POSTCARD {
        return Err(CodecError::UnknownCodec(bytes[2]));
    }
    let found = Kind::from_tag(bytes[3]).ok_or_else(|| CodecError::WrongKind {
        expected: kind.name(),
        found: "unknown",
    })?;
    if found != kind {
        return Err(CodecError::WrongKind {
            expected: kind.name(),
            found: found.name(),
        });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version == 0 || version > kind.current_version() {
        return Err(CodecError::UnknownFormat {
            kind: kind.name(),
            found: version,
            supported: kind.current_version(),
        });
    }
    let len = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    if len > limit {
        return Err(CodecError::TooLarge { size: len, limit });
    }
    let available = bytes.len() - HEADER_LEN;
    if len != available {
        return Err(CodecError::Truncated {
            needed: len,
            available,
        });
    }
    Ok(version)
}

/// Decodes a value of the given kind from its envelope, refusing payloads above `limit`.
pub fn decode<'de, T: Deserialize<'de>>(
    kind: Kind,
    bytes: &'de [u8],
    limit: usize,
) -> Result<T, CodecError> {
    decode_raw(open(kind, bytes, limit)?, limit)
}

/// Encodes a value without an envelope (for payloads nested in an enveloped record, and
/// for values in transit between an instance and its drivers).
pub fn encode_raw<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    postcard::serialize_with_flavor(value, tail::Tail(out))
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a value written by [`encode_raw`]; the whole input must be consumed.
pub fn decode_raw<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
    limit: usize,
) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(CodecError::Malformed(format!(
            "{} trailing bytes after the value",
            rest.len()
        ))),
        Err(e) => Err(CodecError::Malformed(e.to_string())),
    }
}

/// Whether an encoded driver reply (a `Result<T, E>` encoded with postcard) is `Ok`.
///
/// Postcard writes an enum's variant index first, as a varint: `Ok` is 0, `Err` is 1. This
/// is what lets the runtime tell a compensation's success without knowing its types.
///
/// ```
/// use flowwire::storage::codec::{encode_raw, reply_is_ok};
/// let mut buf = Vec::new();
/// encode_raw(&Ok::<u32, String>(7), &mut buf).unwrap();
/// assert!(reply_is_ok(&buf));
/// buf.clear();
/// encode_raw(&Err::<u32, String>("no".into()), &mut buf).unwrap();
/// assert!(!reply_is_ok(&buf));
/// assert!(!reply_is_ok(&[]));
/// ```
pub fn reply_is_ok(bytes: &[u8]) -> bool {
    bytes.first() == Some(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut buf = Vec::new();
        encode(Kind::Record, &(1u64, vec![1u8, 2, 3], "x"), &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trips_a_value() {
        let buf = sample();
        let v: (u64, Vec<u8>, String) = decode(Kind::Record, &buf, 1024).unwrap();
        assert_eq!(v, (1, vec![1, 2, 3], "x".into()));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let buf = sample();
        for cut in 0..buf.len() {
            let err =
                decode::<(u64, Vec<u8>, String)>(Kind::Record, &buf[..cut], 1024).unwrap_err();
            assert!(
                matches!(err, CodecError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_flipped_payload_bit_is_caught_by_the_checksum() {
        let buf = sample();
        for i in HEADER_LEN..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[i] ^= 1 << bit;
                let err = decode::<(u64, Vec<u8>, String)>(Kind::Record, &bad, 1024).unwrap_err();
                assert!(matches!(err, CodecError::Checksum { .. }), "{err}");
            }
        }
    }

    #[test]
    fn an_owned_checksum_covers_the_header_the_owner_and_the_payload_in_order() {
        // The stored checksums stay what they were: the CRC of the header's first ten
        // bytes, each of the owner's names after its length, then the payload, however
        // long the names (the short ones are hashed from one buffer).
        let head = [7u8; 10];
        let payload = b"the payload";
        for id_len in [0, 1, 200, 229, 230, 231, 4_000] {
            let owner = InstanceKey::new("Order", "x".repeat(id_len));
            let mut reference = crc32fast::Hasher::new();
            reference.update(&head);
            for part in [&*owner.flow, &*owner.id] {
                reference.update(&(part.len() as u64).to_le_bytes());
                reference.update(part.as_bytes());
            }
            reference.update(payload);
            assert_eq!(
                checksum(&head, Some(&owner), payload),
                reference.finalize(),
                "id of {id_len} bytes"
            );
        }
    }

    #[test]
    fn an_owned_checksum_is_the_same_whether_the_payload_fits_beside_the_owner_or_not() {
        // Short values are hashed in one update with the header and the owner: the bytes
        // hashed, and so the checksum, must not depend on where the payload was put.
        let head = [3u8; 10];
        let owner = InstanceKey::new("Order", "order-17");
        let prefix = head.len() + 16 + owner.flow.len() + owner.id.len();
        for len in [
            0,
            1,
            60,
            255 - prefix,
            256 - prefix,
            257 - prefix,
            1_000,
            70_000,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut reference = crc32fast::Hasher::new();
            reference.update(&head);
            for part in [&*owner.flow, &*owner.id] {
                reference.update(&(part.len() as u64).to_le_bytes());
                reference.update(part.as_bytes());
            }
            reference.update(&payload);
            assert_eq!(
                checksum(&head, Some(&owner), &payload),
                reference.finalize(),
                "payload of {len} bytes"
            );
            assert_eq!(
                checksum(&head, None, &payload),
                crc32fast::hash(&payload),
                "unowned, {len} bytes"
            );
        }
    }

    #[test]
    fn a_newer_format_version_is_refused_by_name() {
        let mut buf = Vec::new();
        encode_with_version(Kind::Record, 99, &1u8, &mut buf).unwrap();
        let err = decode::<u8>(Kind::Record, &buf, 1024).unwrap_err();
        assert_eq!(
            err,
            CodecError::UnknownFormat {
                kind: "record",
                found: 99,
                supported: Kind::Record.current_version()
            }
        );
        assert!(
            err.to_string()
                .contains("unknown format version 99 for record")
        );
    }

    #[test]
    fn a_declared_length_above_the_limit_is_refused_before_reading() {
        let mut buf = Vec::new();
        encode(Kind::State, &vec![0u8; 100], &mut buf).unwrap();
        let err = decode::<Vec<u8>>(Kind::State, &buf, 50).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::TooLarge {
                    size: 101,
                    limit: 50
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_hostile_inner_length_cannot_allocate() {
        // A payload claiming a 2^60-element vector: postcard must fail on the missing bytes.
        let mut payload = Vec::new();
        encode_raw(&(1u64 << 60), &mut payload).unwrap();
        let err = decode_raw::<Vec<u64>>(&payload, 1024).unwrap_err();
        assert!(matches!(err, CodecError::Malformed(_)), "{err}");
    }

    #[test]
    fn wrong_kind_and_magic_are_named() {
        let buf = sample();
        let err = decode::<u8>(Kind::History, &buf, 1024).unwrap_err();
        assert_eq!(
            err,
            CodecError::WrongKind {
                expected: "history entry",
                found: "record"
            }
        );
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode::<u8>(Kind::Record, &bad, 1024),
            Err(CodecError::BadMagic { .. })
        ));
    }
}
