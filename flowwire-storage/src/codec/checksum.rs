//! The envelope's CRC-32: what it covers ([`checksum`], binding the owner from the formats
//! that do, [`binds`]), and checksums computed when a value leaves its store instead of
//! when it is encoded.
//!
//! A store that keeps what it is given in this process's memory has nothing at rest for a
//! checksum to guard: the owner of every value is the map slot it sits in, and its bytes
//! never cross a disk or a network until it hands them out. For such a store
//! ([`InstanceStore::checksums_on_read`](crate::InstanceStore::checksums_on_read)), a step's
//! record and history entry are encoded with [`Checksums::OnRead`]: the envelope is the
//! one [`encode_owned`](super::encode_owned) writes but for its checksum, left zero, and
//! the store stamps it with [`stamp_owned`] when it hands the value out. Until then the
//! value fails its checksum: given to anything else, it is refused, never misread.

use super::{CodecError, HEADER_LEN, Kind, header};
use crate::key::InstanceKey;

/// When the checksum of an instance's value is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksums {
    /// When the value is encoded: what every store is given unless it asks otherwise.
    #[default]
    Written,
    /// When the store hands the value out ([`stamp_owned`]); the envelope is written with
    /// zeros in its place. Only for a store whose
    /// [`checksums_on_read`](crate::InstanceStore::checksums_on_read) is true.
    OnRead,
}

/// Writes the checksum of `bytes`, a value of `kind` that belongs to `owner`, encoded with
/// [`Checksums::OnRead`]: afterwards it is, byte for byte, what
/// [`encode_owned`](super::encode_owned) writes.
///
/// Fails, leaving `bytes` as they are, when they are not an envelope of `kind` (the header
/// is checked as [`open_owned`](super::open_owned) checks it).
///
/// ```
/// use flowwire::storage::codec::{self, Checksums, Kind};
/// use flowwire::storage::Payload;
/// use flowwire::storage::record::{InstanceKey, PlacedRecord, Record};
///
/// let key = InstanceKey::new("Order", "order-1");
/// let state = Payload::Inline(b"state".as_slice().into());
/// let placed = PlacedRecord { record: Record::unwritten(1, state), retired: Vec::new(), trash: Vec::new() };
/// let mut now = Vec::new();
/// placed.encode(&key, &mut now)?;
/// let mut later = Vec::new();
/// placed.encode_with(&key, &mut later, Checksums::OnRead)?;
/// // Until it is stamped, it is refused.
/// assert!(PlacedRecord::decode(&later, &key, 1 << 20).is_err());
/// codec::stamp_owned(Kind::Record, &mut later, &key)?;
/// assert_eq!(later, now);
/// # Ok::<(), flowwire::storage::CodecError>(())
/// ```
pub fn stamp_owned(kind: Kind, bytes: &mut [u8], owner: &InstanceKey) -> Result<(), CodecError> {
    let version = header(kind, bytes, usize::MAX)?;
    let crc = checksum(
        &bytes[..10],
        binds(kind, version, Some(owner)),
        &bytes[HEADER_LEN..],
    );
    bytes[10..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The owner a checksum binds: `owner`, from the first format of `kind` that binds one.
pub(super) fn binds(kind: Kind, version: u16, owner: Option<&InstanceKey>) -> Option<&InstanceKey> {
    owner.filter(|_| kind.owned_since().is_some_and(|v| version >= v))
}

/// The CRC of an envelope: of the payload alone, or, for an owned value, of the header's
/// first ten bytes, the owner's identity and the payload.
pub(super) fn checksum(head: &[u8], owner: Option<&InstanceKey>, payload: &[u8]) -> u32 {
    let mut crc = hasher();
    let Some(owner) = owner else {
        crc.update(payload);
        return crc.finalize();
    };
    // The same bytes as updating part by part, in one update when they fit on the stack
    // (the payload too, when it fits with them): each update has a fixed cost, and two
    // values are encoded a step, six parts each.
    let (flow, id) = (owner.flow.as_bytes(), owner.id.as_bytes());
    let mut joined = [0u8; 256];
    let n = head.len() + 16 + flow.len() + id.len();
    let with_payload = n + payload.len();
    let (parts, rest): (usize, &[u8]) = if with_payload <= joined.len() {
        (with_payload, &[])
    } else {
        (n, payload)
    };
    if let Some(buf) = joined.get_mut(..parts) {
        // Part by part; each length is copied as the eight bytes it is (a copy of a slice
        // whose length is known only here is a call of `memcpy`).
        let mut at = head.len();
        buf[..at].copy_from_slice(head);
        for part in [flow, id] {
            buf[at..at + 8].copy_from_slice(&(part.len() as u64).to_le_bytes());
            at += 8;
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        if rest.is_empty() {
            buf[at..].copy_from_slice(payload);
        }
        crc.update(buf);
        if !rest.is_empty() {
            crc.update(rest);
        }
    } else {
        crc.update(head);
        for part in [flow, id] {
            crc.update(&(part.len() as u64).to_le_bytes());
            crc.update(part);
        }
        crc.update(payload);
    }
    crc.finalize()
}

/// A CRC-32 hasher, cloned from one made once: making one asks which instructions the CPU
/// has, each time.
fn hasher() -> crc32fast::Hasher {
    static MADE: std::sync::OnceLock<crc32fast::Hasher> = std::sync::OnceLock::new();
    MADE.get_or_init(crc32fast::Hasher::new).clone()
}
