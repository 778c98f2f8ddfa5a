//! An instance's history in the in-memory store: its entries back to back in one buffer,
//! and the stamping of values given without their checksums (see the parent module).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::codec::{self, Checksums, Kind};
use crate::record::InstanceKey;

/// An instance's history entries, back to back in one buffer.
#[derive(Debug, Default)]
pub(super) struct History {
    bytes: Vec<u8>,
    /// Where the first entry kept starts in `bytes` (pruned ones are before it).
    start: usize,
    /// Each entry's step and where it ends in `bytes`, oldest first.
    ends: VecDeque<(u64, usize)>,
    /// Whether the entries kept were given with their checksums left for the store to
    /// compute (all of them, or none: see [`History::push`]).
    on_read: bool,
}

impl History {
    /// Appends the entry of step `seq` of instance `key`, given with its checksum
    /// computed or not as `checksums` says. The entries kept are all of one kind: an entry
    /// of the other kind has the ones without a checksum stamped here (only an instance
    /// whose steps come from more than one writer sees this).
    pub(super) fn push(&mut self, key: &InstanceKey, seq: u64, entry: &[u8], checksums: Checksums) {
        let on_read = checksums == Checksums::OnRead;
        if self.ends.is_empty() {
            self.on_read = on_read;
        } else if self.on_read && !on_read {
            self.stamp_all(key);
        }
        let begin = self.bytes.len();
        self.bytes.extend_from_slice(entry);
        self.ends.push_back((seq, self.bytes.len()));
        if on_read && !self.on_read {
            stamp(Kind::History, &mut self.bytes[begin..], key);
        }
    }

    /// Stamps every entry kept, which were all given without their checksums.
    fn stamp_all(&mut self, key: &InstanceKey) {
        let mut begin = self.start;
        for &(_, end) in &self.ends {
            stamp(Kind::History, &mut self.bytes[begin..end], key);
            begin = end;
        }
        self.on_read = false;
    }

    /// Drops the entries of steps below `below`; the buffer is compacted once most of it
    /// is dropped entries (amortized: each byte moves at most once per halving).
    pub(super) fn prune(&mut self, below: u64) {
        while let Some(&(seq, end)) = self.ends.front() {
            if seq >= below {
                break;
            }
            self.start = end;
            self.ends.pop_front();
        }
        if self.start > 0 && self.start * 2 >= self.bytes.len() {
            let gone = self.start;
            self.bytes.drain(..gone);
            for (_, end) in &mut self.ends {
                *end -= gone;
            }
            self.start = 0;
        }
    }

    /// The entries of steps from `from` on, at most `limit`, of instance `key`, each with
    /// its checksum.
    pub(super) fn read(&self, key: &InstanceKey, from: u64, limit: usize) -> Vec<(u64, Bytes)> {
        let first = self.ends.partition_point(|(seq, _)| *seq < from);
        let mut begin = match first.checked_sub(1) {
            Some(i) => self.ends[i].1,
            None => self.start,
        };
        self.ends
            .iter()
            .skip(first)
            .take(limit)
            .map(|&(seq, end)| {
                let entry = stamped(Kind::History, &self.bytes[begin..end], self.on_read, key);
                begin = end;
                (seq, entry)
            })
            .collect()
    }
}

/// A copy of `bytes`, a value of `kind` of instance `key`, stamped with its checksum when
/// it was given without one (`on_read`).
pub(super) fn stamped(kind: Kind, bytes: &[u8], on_read: bool, key: &InstanceKey) -> Bytes {
    if !on_read {
        return Bytes::copy_from_slice(bytes);
    }
    let mut copy = bytes.to_vec();
    stamp(kind, &mut copy, key);
    Bytes::from(copy)
}

/// Stamps `bytes`, a value of `kind` of instance `key` given without its checksum. Bytes
/// that are no envelope of `kind` (never sealed by the engine) are left as they are: a
/// reader refuses them, as it would have.
fn stamp(kind: Kind, bytes: &mut [u8], key: &InstanceKey) {
    if let Err(e) = codec::stamp_owned(kind, bytes, key) {
        tracing::warn!(instance = %key, error = %e, "a value given without its checksum is not an envelope");
    }
}

#[cfg(test)]
mod tests {
    use super::History;
    use crate::codec::Checksums;
    use crate::record::InstanceKey;

    #[test]
    fn history_reads_from_a_step_and_prunes_without_losing_later_entries() {
        let mut h = History::default();
        let key = InstanceKey::new("Order", "order-1");
        for seq in 1..=6u64 {
            h.push(
                &key,
                seq,
                format!("entry-{seq}").as_bytes(),
                Checksums::Written,
            );
        }
        let read = |h: &History, from, limit| {
            h.read(&key, from, limit)
                .into_iter()
                .map(|(s, b)| (s, String::from_utf8(b.to_vec()).unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            read(&h, 3, 2),
            vec![(3, "entry-3".to_owned()), (4, "entry-4".to_owned())]
        );
        h.prune(5); // compacts: 4 of 6 entries gone
        assert_eq!(h.start, 0);
        assert_eq!(
            read(&h, 0, 10),
            vec![(5, "entry-5".to_owned()), (6, "entry-6".to_owned())]
        );
        h.push(&key, 7, b"entry-7", Checksums::Written);
        assert_eq!(read(&h, 6, 10).len(), 2);
        assert_eq!(read(&h, 8, 10), vec![]);
    }
}
