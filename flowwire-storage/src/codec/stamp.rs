//! Checksums computed when a value leaves its store instead of when it is encoded.
//!
//! A store that keeps what it is given in this process's memory has nothing at rest for a
//! checksum to guard: the owner of every value is the map slot it sits in, and its bytes
//! never cross a disk or a network until it hands them out. For such a store
//! ([`InstanceStore::checksums_on_read`](crate::InstanceStore::checksums_on_read)), a step's
//! record and history entry are encoded with [`Checksums::OnRead`]: the envelope is the
//! one [`encode_owned`](super::encode_owned) writes but for its checksum, left zero, and
//! the store stamps it with [`stamp_owned`] when it hands the value out. Until then the
//! value fails its checksum: given to anything else, it is refused, never misread.

use super::{CodecError, HEADER_LEN, Kind, binds, checksum, header};
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
