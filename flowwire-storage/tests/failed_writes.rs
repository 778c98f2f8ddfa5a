//! A step's writes that fail leave nothing behind: when one blob of a step cannot be
//! written, the blobs the step wrote before it are deleted again. Their keys are the
//! write's own (a fresh tag or pack nonce), so no record refers to them, and left they
//! would stay for good: a step retried through a tier outage would leave some each time.

use bytes::Bytes;
use flowwire_storage::ladder::Put;
use flowwire_storage::tier::{BlobTier, Tier};
use flowwire_storage::{InstanceKey, Ladder, MIB};

/// Every file under the tier's root.
fn files(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(root).unwrap() {
        let fan = fan.unwrap();
        if fan.file_type().unwrap().is_dir() {
            for f in std::fs::read_dir(fan.path()).unwrap() {
                out.push(f.unwrap().file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blobs_a_step_wrote_before_a_failed_one_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("disk");
    let tier = Tier::fs(&root).named("disk");
    let placement = Ladder::new()
        .default_to(tier.clone())
        .validate(64 * MIB)
        .unwrap();
    let instance = InstanceKey::new("Claim", "c-1");
    tier.put(
        "warm/up",
        &[Bytes::from_static(b"made the fan-out directories")],
    )
    .await
    .unwrap();

    // One fan-out directory becomes a file: a put whose key lands there fails with the
    // disk's own error. 100 puts, the 81st there: the first window of 64 is written
    // whole before the second one fails.
    let blocked = root.join("2a");
    std::fs::remove_dir(&blocked).unwrap();
    std::fs::write(&blocked, b"not a directory").unwrap();
    let fan = |key: &str| crc32fast::hash(key.as_bytes()) & 0xff;
    let mut keys = (0u64..100_000)
        .map(|i| format!("Claim/c-1/{i}.sp-{i:016x}"))
        .filter(|k| fan(k) != 0x2a)
        .take(99)
        .collect::<Vec<_>>();
    let failing = (0u64..100_000)
        .map(|i| format!("Claim/c-1/9{i}.sp-{i:016x}"))
        .find(|k| fan(k) == 0x2a)
        .unwrap();
    keys.insert(80, failing.clone());
    let puts: Vec<Put> = keys
        .iter()
        .map(|k| Put {
            tier: tier.clone(),
            key: k.as_str().into(),
            parts: vec![Bytes::from(format!("the bytes of {k}"))],
        })
        .collect();

    let err = placement.put_all(&instance, &puts).await.unwrap_err();
    assert!(err.to_string().contains(&failing), "{err}");
    for k in keys.iter().filter(|k| **k != failing) {
        assert_eq!(
            tier.get(k, None).await.unwrap(),
            None,
            "{k} was left behind"
        );
    }
    assert_eq!(files(&root), vec!["warm@up".to_string()]);

    // With the directory back, the same puts are all written.
    std::fs::remove_file(&blocked).unwrap();
    std::fs::create_dir(&blocked).unwrap();
    placement.put_all(&instance, &puts).await.unwrap();
    for k in &keys {
        assert_eq!(
            tier.get(k, None).await.unwrap(),
            Some(Bytes::from(format!("the bytes of {k}")))
        );
    }
}
