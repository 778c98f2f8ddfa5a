//! Blob keys: where a payload of one write of one instance lives on its tier, unique per
//! write (a 64-bit tag), with ids escaped or hashed to fit every tier's rules.

use std::fmt::Write as _;

use crate::record::InstanceKey;

/// A unique tag for each blob written by this process: a random 64-bit start (drawn
/// once per process from the operating system's randomness, through std's hasher keys)
/// stepped by an odd constant, so no two writes of one process share a tag and two
/// processes share one with probability 2⁻⁶⁴ per pair.
pub(crate) fn write_tag() -> u64 {
    use std::hash::BuildHasher as _;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static START: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| std::hash::RandomState::new().hash_one(std::process::id()));
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    start.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The key of a blob of `role` written at step `seq` of an instance, tagged with `tag`:
/// `flow/id/seq.role-tag`.
///
/// Keys are collision-free by construction: the id is percent-escaped (ids longer than
/// 120 escaped bytes, and the empty id, are named by 128 bits of their BLAKE3 hash and
/// their length, after a `~` no escaped id starts with), and every write has its own tag,
/// so a key a committed record refers to is never written again with other bytes — not
/// by a refused duplicate start, nor by a retried step.
pub fn blob_key(instance: &InstanceKey, seq: u64, role: char, tag: u64) -> String {
    let mut key = String::with_capacity(instance.flow.len() + 170);
    instance.write_prefix(&mut key);
    let _ = write!(key, "/{seq}.{role}-{tag:016x}");
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_ids_and_hash_long_ones() {
        let k = InstanceKey::new("Order", "o 1/ü");
        assert_eq!(
            blob_key(&k, 3, 's', 0xff),
            "Order/o%201%2F%C3%BC/3.s-00000000000000ff"
        );
        crate::tier::check_key(&blob_key(&k, 3, 's', 0)).unwrap();
        let long = InstanceKey::new("Order", "x".repeat(500));
        let key = blob_key(&long, 7, 'c', u64::MAX);
        assert!(key.len() < 80, "{key}");
        crate::tier::check_key(&key).unwrap();
        let empty = InstanceKey::new("Order", "");
        crate::tier::check_key(&blob_key(&empty, 1, 's', 1)).unwrap();
    }

    #[test]
    fn every_id_makes_a_valid_key_of_its_own() {
        let mut seen = std::collections::HashSet::new();
        for id in crate::tier::conformance::awkward_ids() {
            let key = blob_key(&InstanceKey::new("F", id.as_str()), 1, 's', 0);
            crate::tier::check_key(&key).unwrap_or_else(|e| panic!("{id:.40?}: {e}"));
            assert!(seen.insert(key.clone()), "{id:.40?} shares {key}");
        }
    }

    #[test]
    fn ids_that_collide_under_64_bit_fnv_get_keys_of_their_own() {
        // Two 126-byte ids with the same 64-bit FNV-1a hash (16 hex digits found by a rho
        // search in a few minutes, then a common suffix), which the keys of earlier
        // versions shared.
        let (a, b) = ("5cdc38da781222ad", "48cab85938350e17");
        let fnv = |s: &str| {
            s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        };
        let (a, b) = (
            format!("{a}{}", "s".repeat(110)),
            format!("{b}{}", "s".repeat(110)),
        );
        assert_eq!((a.len(), fnv(&a)), (b.len(), fnv(&b)), "the twins collide");
        let key = |id: &str| blob_key(&InstanceKey::new("F", id), 1, 's', 0);
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn each_write_gets_its_own_tag() {
        let tags: std::collections::HashSet<u64> = (0..10_000).map(|_| write_tag()).collect();
        assert_eq!(tags.len(), 10_000);
    }
}
