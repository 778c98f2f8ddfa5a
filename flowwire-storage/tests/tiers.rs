//! The tier conformance suite on every tier — memory, embedded (redb), fs, Redis and S3 —
//! with the sizes the ladder cares about: 0 B, 1 B, 4095, 4096, 4097, 1 MB − 1, 1 MB,
//! 1 MB + 1 and 64 MB. Redis (one server, and a three-master Redis Cluster) and S3 are real
//! servers started by this test binary.

use bytes::Bytes;
use flowwire_storage::tier::{BlobTier, EmbeddedTier, FsTier, MemoryTier, conformance};

#[cfg(any(feature = "redis", feature = "s3"))]
#[path = "../../tests/support/servers.rs"]
mod servers;

/// A tier that serves ranges and nothing whole: a handle over it must pass a ranged read
/// through, not read the whole blob (a pack of 32 MiB read whole for each run of its chunks
/// made a step four times slower before `Tier` passed `get_range` on).
struct RangesOnly(MemoryTier);

impl BlobTier for RangesOnly {
    fn put<'a>(
        &'a self,
        key: &'a str,
        parts: &'a [bytes::Bytes],
    ) -> flowwire_storage::join::BoxFuture<'a, Result<(), flowwire_storage::tier::TierError>> {
        self.0.put(key, parts)
    }
    fn get<'a>(
        &'a self,
        _key: &'a str,
        _expect: Option<u64>,
    ) -> flowwire_storage::join::BoxFuture<
        'a,
        Result<Option<bytes::Bytes>, flowwire_storage::tier::TierError>,
    > {
        Box::pin(async { panic!("a whole read where a range was asked for") })
    }
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> flowwire_storage::join::BoxFuture<
        'a,
        Result<Option<bytes::Bytes>, flowwire_storage::tier::TierError>,
    > {
        self.0.get_range(key, offset, len)
    }
    fn delete<'a>(
        &'a self,
        key: &'a str,
    ) -> flowwire_storage::join::BoxFuture<'a, Result<(), flowwire_storage::tier::TierError>> {
        self.0.delete(key)
    }
    fn is_shared(&self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tier_handle_passes_every_method_on_to_its_backend() {
    use flowwire_storage::tier::{Tier, TierExt};
    let tier = Tier::custom("ranges", RangesOnly(MemoryTier::new()));
    tier.put_bytes("k/1", bytes::Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    let got = tier.get_range("k/1", 3, 4).await.unwrap().unwrap();
    assert_eq!(&got[..], b"3456");
    tier.delete("k/1").await.unwrap();
    assert!(tier.get_range("k/1", 0, 1).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_memory_tier_conforms() {
    conformance::run_all(&MemoryTier::new(), "mem", conformance::SIZES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_tier_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let tier = EmbeddedTier::new(dir.path().join("blobs.redb"));
    conformance::run_all(&tier, "emb", conformance::SIZES).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fs_tier_conforms_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let tier = FsTier::new(dir.path());
    conformance::run_all(&tier, "fs", conformance::SIZES).await;
    let mut left = Vec::new();
    for fan in std::fs::read_dir(dir.path()).unwrap() {
        for f in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            left.push(f.unwrap().file_name());
        }
    }
    assert!(
        left.is_empty(),
        "files left behind after every delete: {left:?}"
    );
}

/// Before temp names left the key alphabet, a put of `k` wrote its temp file at the name of
/// the key `k.tmp.<pid>.<n>` when both fell in one fan-out directory: it emptied that blob
/// and renamed it away, losing an acknowledged put of another key.
#[tokio::test(flavor = "multi_thread")]
async fn a_put_never_writes_into_the_file_of_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let fan = |key: &str| crc32fast::hash(key.as_bytes()) & 0xff;
    let (key, neighbour) = (0..100_000)
        .map(|i| (format!("k{i}"), format!("k{i}.tmp.{pid}.0")))
        .find(|(k, n)| fan(k) == fan(n))
        .expect("one pair in 256 shares a fan-out directory");
    FsTier::new(dir.path())
        .put(&neighbour, &[Bytes::from_static(b"the neighbour's")])
        .await
        .unwrap();
    // A fresh handle numbers its puts from 0 again, as a restarted process does.
    let tier = FsTier::new(dir.path());
    tier.put(&key, &[Bytes::from_static(b"mine")])
        .await
        .unwrap();
    assert_eq!(
        tier.get(&neighbour, None).await.unwrap().as_deref(),
        Some(&b"the neighbour's"[..])
    );
    assert_eq!(
        tier.get(&key, None).await.unwrap().as_deref(),
        Some(&b"mine"[..])
    );
    assert!(
        flowwire_storage::tier::check_key("k0+0000000000000000").is_err(),
        "a temp name is never a key"
    );
}

/// A put that a crash cuts short leaves its temp file (`<name>+<16 hex digits>`). A later
/// handle sweeps it once it has gone unwritten for `FsTier::STRAY_AFTER`: when asked, and by
/// itself after its first put. A temp file written since (a put that may be in progress)
/// and a file that is not a temp file stay, and so do the blobs.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_handle_sweeps_the_temp_files_of_puts_a_crash_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    // What a crashed process left, laid out by hand: a handle that puts sweeps by itself.
    let layout = FsTier::new(dir.path());
    let kept = layout.path_of("order/o-1/1.s");
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    std::fs::write(&kept, b"kept").unwrap();
    let fan = layout
        .path_of("order/o-1/2.s")
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::create_dir_all(&fan).unwrap();
    let file = |suffix: &str| fan.join(format!("order@o-1@2.s{suffix}"));
    // Written long ago (a file's time is set, not the clock read).
    let leftover = |path: &std::path::Path| {
        std::fs::write(path, b"half a blob").unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_hours(24))
            .unwrap();
    };
    let (stale, recent, other) = (
        file("+0123456789abcdef"),
        file("+fedcba9876543210"),
        file("+not-a-temp-file"),
    );
    leftover(&stale);
    leftover(&other);
    std::fs::write(&recent, b"a put in progress").unwrap();

    let later = FsTier::new(dir.path());
    assert_eq!(later.sweep_strays().await.unwrap(), 1);
    assert!(!stale.exists(), "the crashed put's temp file is swept");
    assert!(recent.exists(), "a temp file written within the hour stays");
    assert!(other.exists(), "a file that is not a temp file stays");
    assert_eq!(
        later.get("order/o-1/1.s", None).await.unwrap().as_deref(),
        Some(&b"kept"[..])
    );
    assert_eq!(
        later.sweep_strays().await.unwrap(),
        0,
        "a second sweep finds none"
    );

    // A handle sweeps by itself, in the background, after its first put.
    leftover(&stale);
    let third = FsTier::new(dir.path());
    third
        .put("order/o-2/1.s", &[Bytes::from_static(b"new")])
        .await
        .unwrap();
    let mut polls = 0;
    while stale.exists() {
        polls += 1;
        assert!(polls < 400, "the first put's sweep did not run within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(recent.exists() && other.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fs_tier_reports_an_unwritable_root_as_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let tier = FsTier::new(&file);
    let err = tier
        .put("k", &[bytes::Bytes::from_static(b"v")])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tier `fs`"), "{err}");
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::OnceLock;

    use flowwire_storage::store::{RedisStore, conformance as store_conformance};
    use flowwire_storage::tier::{RedisTier, conformance};

    use super::servers::{Redis, RedisCluster};

    fn server() -> &'static Redis {
        static SERVER: OnceLock<Redis> = OnceLock::new();
        SERVER.get_or_init(Redis::start)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_redis_tier_conforms() {
        let tier = RedisTier::open(&server().url(), "fwtest").unwrap();
        conformance::run_all(&tier, "redis", conformance::SIZES).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_redis_store_conforms() {
        let url = server().url();
        let n = std::sync::atomic::AtomicU32::new(0);
        store_conformance::run_all(|| {
            let prefix = format!(
                "conf{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            Box::new(RedisStore::open(&url, &prefix).unwrap())
        })
        .await;
    }

    fn cluster() -> &'static RedisCluster {
        static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
        CLUSTER.get_or_init(RedisCluster::start)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_redis_store_conforms_on_a_three_master_cluster() {
        let urls = cluster().urls();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let n = std::sync::atomic::AtomicU32::new(0);
        store_conformance::run_all(|| {
            let prefix = format!(
                "cconf{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            // Four shards: the indexes are per shard, and flow-wide reads merge them.
            Box::new(RedisStore::cluster(&urls, &prefix).unwrap().with_shards(4))
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_redis_tier_conforms_on_a_three_master_cluster() {
        let urls = cluster().urls();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let tier = RedisTier::cluster(&urls, "fwctest").unwrap();
        conformance::run_all(&tier, "redis-cluster", conformance::SIZES).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_cluster_that_lost_its_script_cache_still_commits() {
        let urls = cluster().urls();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let before = RedisStore::cluster(&urls, "noscript-a").unwrap();
        store_conformance::create_then_compare_and_swap(&before).await;
        cluster().flush_scripts();
        let after = RedisStore::cluster(&urls, "noscript-b").unwrap();
        store_conformance::create_then_compare_and_swap(&after).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_cluster_without_nodes_is_refused() {
        let err = RedisStore::cluster(&[], "fw").unwrap_err();
        assert!(err.to_string().contains("at least one node"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_prefix_with_a_hash_tag_is_refused() {
        let err = RedisStore::open(&server().url(), "a{b}").unwrap_err();
        assert!(err.to_string().contains("hash tags"), "{err}");
    }
}

#[cfg(feature = "s3")]
mod s3 {
    use std::sync::OnceLock;

    use flowwire_storage::tier::{BlobTier, S3Config, S3Tier, TierError, conformance};

    use super::servers::S3;

    fn server() -> &'static S3 {
        static SERVER: OnceLock<S3> = OnceLock::new();
        SERVER.get_or_init(S3::start)
    }

    fn config(bucket: &str) -> S3Config {
        S3Config::new(bucket)
            .endpoint(&server().endpoint())
            .path_style(true)
            .credentials("test", "test")
            .prefix("fw")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_s3_tier_conforms_with_single_and_multipart_uploads() {
        // 5 MiB parts: the 64 MB case is a 13-part multipart upload.
        let tier = S3Tier::new(config("conformance").part_size(5 << 20));
        tier.create_bucket_if_missing().await.unwrap();
        conformance::run_all(&tier, "s3", conformance::SIZES).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_missing_bucket_is_a_rejection_not_a_retry() {
        let tier = S3Tier::new(config("no-such-bucket").max_attempts(1));
        let err = tier.get("k", None).await.unwrap_err();
        assert!(matches!(err, TierError::Rejected { .. }), "{err:?}");
    }
}
