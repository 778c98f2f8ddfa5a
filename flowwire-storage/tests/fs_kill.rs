//! The file tier under a real kill: a child process puts 16 MiB blobs one after another and
//! is killed (SIGKILL) in the middle of one. Every put it acknowledged reads back exactly,
//! no blob is torn, and what the interrupted put left is a temp file that a later handle's
//! sweep recognises and removes (once it is old enough; the test ages it by setting its
//! time, not by waiting an hour).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::tier::{BlobTier, FsTier};

#[path = "support/child.rs"]
mod child;

const CHILD: &str = "FLOWWIRE_FS_KILL_CHILD";
const BLOB: usize = 16 << 20;

/// The bytes of the `n`th blob: a pattern no other blob shares.
fn blob(n: u64) -> Bytes {
    let mut rng = flowwire_storage::fuzz::Rng::new(n + 1);
    rng.bytes(BLOB).into()
}

fn key(n: u64) -> String {
    format!("order/o-{n}/1.sp")
}

/// In the child process: puts blobs until killed, printing each acknowledged one.
#[test]
fn child_puts_until_killed() {
    let Ok(dir) = std::env::var(CHILD) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tier = FsTier::new(dir);
        for n in 0.. {
            tier.put(&key(n), &[blob(n)]).await.unwrap();
            println!("ack {n}");
        }
    });
}

/// The temp files under `root`.
fn temps(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for fan in std::fs::read_dir(root).unwrap() {
        let fan = fan.unwrap().path();
        if !fan.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&fan).unwrap() {
            let f = f.unwrap().path();
            if f.file_name().unwrap().to_string_lossy().contains('+') {
                out.push(f);
            }
        }
    }
    out
}

/// Runs a child that puts blobs into `root` and kills it once `acks` puts were acknowledged
/// and a temp file of the next one is on disk; returns how many were acknowledged.
fn kill_mid_put(root: &Path, acks: u64) -> u64 {
    let mut child = child::Acking::spawn("child_puts_until_killed", &[(CHILD, root.as_os_str())]);
    child.until_acked(acks);
    // The next put's temp file: killed while it is being written (bounded wait).
    for _ in 0..2_000 {
        if !temps(root).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_killed_midway_leaves_every_acknowledged_blob_whole_and_a_temp_file_the_sweep_removes()
 {
    // A kill can land after the rename (no temp file left): up to a few tries.
    for attempt in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let acked = kill_mid_put(dir.path(), 3);
        assert!(acked >= 3, "the child acknowledged {acked} puts");

        let tier = FsTier::new(dir.path());
        for n in 0..acked {
            let got = tier.get(&key(n), None).await.unwrap();
            assert!(
                got.as_deref() == Some(&blob(n)[..]),
                "acknowledged put {n} reads back exactly"
            );
        }
        // The interrupted put: its blob is whole or absent, never torn.
        if let Some(got) = tier.get(&key(acked), None).await.unwrap() {
            assert!(got == blob(acked), "the interrupted put is whole or absent");
        }

        let left = temps(dir.path());
        if left.is_empty() {
            eprintln!("attempt {attempt}: the kill landed after the rename; again");
            continue;
        }
        // Too recent to be taken for a crashed put's...
        assert_eq!(tier.sweep_strays().await.unwrap(), 0);
        // ...until it has gone unwritten for `STRAY_AFTER`.
        for t in &left {
            std::fs::File::options()
                .write(true)
                .open(t)
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + Duration::from_hours(24))
                .unwrap();
        }
        assert_eq!(tier.sweep_strays().await.unwrap(), left.len());
        assert!(temps(dir.path()).is_empty(), "no temp file is left");
        for n in 0..acked {
            assert!(tier.get(&key(n), None).await.unwrap().as_deref() == Some(&blob(n)[..]));
        }
        return;
    }
    panic!("five kills all landed after a rename");
}
