//! The tier conformance suite: public async cases every [`BlobTier`] must pass.
//!
//! Each case takes a tier as `&dyn BlobTier` and a key prefix unique to the run (so cases
//! can share one server), and panics with a message naming the broken rule.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use flowwire::storage::tier::{MemoryTier, conformance};
//! conformance::run_all(&MemoryTier::new(), "doc", conformance::SIZES_QUICK).await;
//! # });
//! ```

use bytes::Bytes;

use super::{BlobTier, TierError, TierExt};

/// 1 MB, as the ladder's thresholds count it.
const MB: usize = 1_000_000;

/// The sizes every tier must round-trip: empty, one byte, both sides of 4 KiB and of 1 MB,
/// and 64 MB.
pub const SIZES: &[usize] = &[0, 1, 4095, 4096, 4097, MB - 1, MB, MB + 1, 64 * MB];

/// [`SIZES`] without the 64 MB case, for doc tests and quick runs.
pub const SIZES_QUICK: &[usize] = &[0, 1, 4095, 4096, 4097, MB - 1, MB, MB + 1];

/// A deterministic, position-dependent byte pattern: a misplaced or repeated chunk shows.
pub fn pattern(len: usize, seed: u8) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push((x >> 24) as u8);
    }
    Bytes::from(v)
}

/// Runs every case with keys under `prefix` and the given sizes.
pub async fn run_all(tier: &dyn BlobTier, prefix: &str, sizes: &[usize]) {
    every_size_round_trips(tier, prefix, sizes).await;
    a_missing_key_reads_as_none(tier, prefix).await;
    a_put_replaces_the_blob(tier, prefix).await;
    delete_removes_and_is_idempotent(tier, prefix).await;
    parts_are_stored_as_their_concatenation(tier, prefix).await;
    keys_that_share_a_prefix_are_distinct(tier, prefix).await;
    every_instance_id_has_a_blob_of_its_own(tier, prefix).await;
    bad_keys_are_refused_before_any_io(tier).await;
    concurrent_puts_of_distinct_keys_all_land(tier, prefix).await;
    a_range_reads_those_bytes_and_stops_at_the_end(tier, prefix).await;
}

/// A ranged read gives exactly the bytes asked for, fewer where the blob ends first, none
/// from past its end, and `None` for a missing key.
pub async fn a_range_reads_those_bytes_and_stops_at_the_end(tier: &dyn BlobTier, prefix: &str) {
    let key = format!("{prefix}/range");
    let data = pattern(300_000, 7);
    tier.put_bytes(&key, data.clone()).await.expect("put");
    for (offset, len) in [
        (0u64, 300_000u64),
        (0, 1),
        (1, 10),
        (131_072, 65_536),
        (299_999, 1),
        (299_990, 100),
        (300_000, 5),
        (400_000, 5),
        (5, 0),
        (0, u64::MAX),
        (u64::MAX - 1, 2),
    ] {
        let got = tier
            .get_range(&key, offset, len)
            .await
            .unwrap_or_else(|e| panic!("range {offset}+{len} failed: {e}"))
            .unwrap_or_else(|| panic!("range {offset}+{len} of a stored blob read as none"));
        let (start, end) = super::clamp(data.len(), offset, len);
        assert!(
            got == data.slice(start..end),
            "range {offset}+{len}: {} bytes read, {} expected",
            got.len(),
            end - start
        );
    }
    let missing = format!("{prefix}/range-missing");
    assert!(
        tier.get_range(&missing, 0, 10)
            .await
            .expect("range of a missing key")
            .is_none(),
        "a range of a missing key reads as none"
    );
    tier.delete(&key).await.expect("delete");
}

/// Every size in `sizes` is stored and read back byte for byte, then deleted.
pub async fn every_size_round_trips(tier: &dyn BlobTier, prefix: &str, sizes: &[usize]) {
    for (i, &n) in sizes.iter().enumerate() {
        let key = format!("{prefix}/size-{n}");
        let data = pattern(n, i as u8);
        tier.put_bytes(&key, data.clone())
            .await
            .unwrap_or_else(|e| panic!("put of {n} bytes failed: {e}"));
        let got = tier
            .get(&key, Some(n as u64))
            .await
            .unwrap_or_else(|e| panic!("get of {n} bytes failed: {e}"))
            .unwrap_or_else(|| panic!("a blob of {n} bytes was put but reads as absent"));
        assert_eq!(
            got.len(),
            n,
            "a blob of {n} bytes read back with the wrong length"
        );
        assert!(
            got == data,
            "a blob of {n} bytes read back with different bytes"
        );
        let mut buf = vec![7u8; 3];
        assert!(tier.get_into(&key, &mut buf).await.unwrap());
        assert!(buf == data, "get_into of {n} bytes differs");
        tier.delete(&key).await.unwrap();
    }
}

/// Reading a key that was never written is `Ok(None)`, not an error.
pub async fn a_missing_key_reads_as_none(tier: &dyn BlobTier, prefix: &str) {
    let key = format!("{prefix}/never-written");
    assert_eq!(tier.get(&key, None).await.unwrap(), None);
    assert!(!tier.exists(&key).await.unwrap());
}

/// A second put of a key replaces the first blob entirely (also a longer one by a shorter).
pub async fn a_put_replaces_the_blob(tier: &dyn BlobTier, prefix: &str) {
    let key = format!("{prefix}/replace");
    tier.put_bytes(&key, pattern(10_000, 1)).await.unwrap();
    tier.put_bytes(&key, Bytes::from_static(b"short"))
        .await
        .unwrap();
    assert_eq!(
        tier.get(&key, None).await.unwrap().as_deref(),
        Some(&b"short"[..]),
        "a put must replace the whole blob, not overwrite its start"
    );
    tier.delete(&key).await.unwrap();
}

/// Delete removes a blob; deleting it again (or a key never written) succeeds.
pub async fn delete_removes_and_is_idempotent(tier: &dyn BlobTier, prefix: &str) {
    let key = format!("{prefix}/delete");
    tier.put_bytes(&key, Bytes::from_static(b"x"))
        .await
        .unwrap();
    tier.delete(&key).await.unwrap();
    assert_eq!(
        tier.get(&key, None).await.unwrap(),
        None,
        "deleted blob still reads"
    );
    tier.delete(&key)
        .await
        .expect("a second delete must succeed");
    tier.delete(&format!("{prefix}/never"))
        .await
        .expect("deleting a key never written must succeed");
}

/// A put of several parts stores their concatenation.
pub async fn parts_are_stored_as_their_concatenation(tier: &dyn BlobTier, prefix: &str) {
    let key = format!("{prefix}/parts");
    let parts = [
        Bytes::from_static(b"head-"),
        Bytes::new(),
        pattern(5000, 3),
        Bytes::from_static(b"-tail"),
    ];
    tier.put(&key, &parts).await.unwrap();
    let want: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
    let got = tier.get(&key, None).await.unwrap().expect("present");
    assert!(got[..] == want[..], "parts were not concatenated in order");
    tier.delete(&key).await.unwrap();
}

/// Instance ids a user may pick: path separators, dot segments, control bytes, unicode,
/// the empty id and a 1 MB id.
pub fn awkward_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        ".",
        "..",
        "...",
        ".hidden",
        "../x",
        "a/..",
        "/",
        "//",
        "a/b",
        "\0",
        "nul\0byte",
        "\n",
        "line\nbreak",
        "ü",
        "日本語",
        "~",
        "%2E",
        "%",
        "",
        " ",
        "white space",
    ]
    .map(String::from)
    .to_vec();
    ids.extend(["x".repeat(120), "x".repeat(121), "y".repeat(1 << 20)]);
    ids
}

/// The blob keys the ladder makes for every id of [`awkward_ids`] are accepted by the
/// tier, and each id's blob is its own.
pub async fn every_instance_id_has_a_blob_of_its_own(tier: &dyn BlobTier, prefix: &str) {
    let ids = awkward_ids();
    let keys: Vec<String> = ids
        .iter()
        .map(|id| {
            let key = crate::record::InstanceKey::new(prefix, id.as_str());
            crate::ladder::blob_key(&key, 1, 's', 7)
        })
        .collect();
    for (i, key) in keys.iter().enumerate() {
        tier.put_bytes(key, pattern(64, i as u8))
            .await
            .unwrap_or_else(|e| panic!("the blob of id {:.40?} was refused: {e}", ids[i]));
    }
    for (i, key) in keys.iter().enumerate() {
        let got = tier.get(key, None).await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&pattern(64, i as u8)[..]),
            "the blob of id {:.40?} is not its own",
            ids[i]
        );
        tier.delete(key).await.unwrap();
    }
}

/// `a/b` and `a/bc` and `a/b/c` are three different blobs.
pub async fn keys_that_share_a_prefix_are_distinct(tier: &dyn BlobTier, prefix: &str) {
    let keys = [
        format!("{prefix}/k/b"),
        format!("{prefix}/k/bc"),
        format!("{prefix}/k/b.c"),
        format!("{prefix}/k/b%2Fc"),
    ];
    for (i, k) in keys.iter().enumerate() {
        tier.put_bytes(k, Bytes::from(vec![i as u8; i + 1]))
            .await
            .unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        let got = tier.get(k, None).await.unwrap().expect("present");
        assert_eq!(
            &got[..],
            &vec![i as u8; i + 1][..],
            "key {k} read another blob"
        );
        tier.delete(k).await.unwrap();
    }
}

/// Empty, traversing or oversized keys are [`TierError::InvalidKey`].
pub async fn bad_keys_are_refused_before_any_io(tier: &dyn BlobTier) {
    for bad in ["", "../escape", "/abs", "a//b", "white space"] {
        let r = tier.put_bytes(bad, Bytes::from_static(b"x")).await;
        assert!(
            matches!(r, Err(TierError::InvalidKey { .. })),
            "put of key {bad:?} gave {r:?}, not InvalidKey"
        );
        let r = tier.get(bad, None).await;
        assert!(
            matches!(r, Err(TierError::InvalidKey { .. })),
            "get of {bad:?}: {r:?}"
        );
    }
}

/// Many puts in flight at once all land.
pub async fn concurrent_puts_of_distinct_keys_all_land(tier: &dyn BlobTier, prefix: &str) {
    let keys: Vec<String> = (0..16).map(|i| format!("{prefix}/many/{i}")).collect();
    let puts = keys
        .iter()
        .enumerate()
        .map(|(i, k)| tier.put_bytes(k, pattern(3000 + i, i as u8)));
    for r in crate::join::join_all(puts).await {
        r.unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        let got = tier.get(k, None).await.unwrap().expect("present");
        assert!(
            got == pattern(3000 + i, i as u8),
            "concurrent put {k} lost or mixed"
        );
        tier.delete(k).await.unwrap();
    }
}
