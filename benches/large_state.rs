//! A 256 MiB flow state round-trips through the S3 tier, through the engine: started (its
//! first step encodes the state and uploads it in parts), the engine stopped, a new engine
//! started on the same data (recovery downloads and decodes it), and the state checked.
//! Reports the time of each half and the process's peak resident set size against the
//! state's size (target: peak ≤ 2.5 × state).
//!
//! `cargo bench --bench large_state --features flowwire-suite/s3`
//! (`FLOWWIRE_BENCH_STATE_MIB=64` for another size). Under `cargo test --all-targets` it
//! runs once with an 8 MiB state. Run it alone: the peak is the whole process's. To check
//! the in-process figure from outside, give it a server of its own (`/usr/bin/time` counts
//! child processes, moto included):
//! `FLOWWIRE_S3_ENDPOINT=http://127.0.0.1:5000 /usr/bin/time -v target/release/deps/large_state-* --bench`.

#![allow(missing_docs)] // bench-local flow
// A benchmark measures wall-clock time: that is its point.
#![allow(clippy::disallowed_methods)]

#[path = "../tests/support/servers.rs"]
mod servers;
mod support;

#[cfg(feature = "s3")]
mod run {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use flowwire::Engine;
    use flowwire::prelude::*;
    use flowwire::storage::tier::{S3Config, S3Tier};
    use flowwire::storage::{KIB, Ladder, MIB, Tier};

    use super::servers::S3;
    use super::support::{self, Mode};

    #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    pub struct VaultState {
        blob: Bytes,
    }

    /// Holds a large state and waits.
    #[flow]
    pub struct Vault {
        #[link]
        state: VaultState,
    }

    #[flow]
    impl Vault {
        #[probe]
        fn digest(&self) -> (usize, u64) {
            (self.state.blob.len(), digest(&self.state.blob))
        }
        #[wire]
        fn run(&mut self) -> Command<Self> {
            if self.state.blob.is_empty() {
                return Command::finish();
            }
            Command::wait()
        }
    }

    fn digest(b: &[u8]) -> u64 {
        b.chunks(8).fold(0u64, |acc, c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            acc.rotate_left(5) ^ u64::from_le_bytes(w)
        })
    }

    async fn open(dir: &std::path::Path, config: &S3Config, size: usize) -> Engine {
        Engine::builder()
            .data_dir(dir)
            .storage(
                Ladder::new()
                    .inline_below(16 * KIB)
                    .default_to(Tier::s3(config.clone()).named("s3")),
            )
            .decode_limit(size + MIB)
            .store_timeout(Duration::from_mins(10))
            .request_timeout(Duration::from_mins(10))
            .flow::<Vault>()
            .start()
            .await
            .expect("engine")
    }

    fn mib(n: u64) -> String {
        #[allow(clippy::cast_precision_loss)]
        let v = n as f64 / f64::from(1 << 20);
        format!("{v:.0} MiB")
    }

    pub async fn main(mode: Mode) {
        support::print_machine();
        let mib_env = std::env::var("FLOWWIRE_BENCH_STATE_MIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        let size = match mode {
            Mode::Test => 8 * MIB,
            _ => mib_env.unwrap_or(256) * MIB,
        };
        // An S3 server of the caller's (so that `/usr/bin/time -v` measures this process
        // alone, not moto too), or moto started here.
        let (_server, endpoint) = match std::env::var("FLOWWIRE_S3_ENDPOINT") {
            Ok(endpoint) => (None, endpoint),
            Err(_) => {
                let s3 = S3::start();
                let endpoint = s3.endpoint();
                (Some(s3), endpoint)
            }
        };
        let config = S3Config::new("large")
            .endpoint(&endpoint)
            .path_style(true)
            .credentials("bench", "bench")
            .part_size(8 * MIB);
        S3Tier::new(config.clone())
            .create_bucket_if_missing()
            .await
            .expect("bucket");
        let tmp = tempfile::tempdir().expect("temp dir");

        let engine = open(tmp.path(), &config, size).await;
        let base = support::rss().unwrap_or(0);
        let blob = Bytes::from(
            (0..size)
                .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
                .collect::<Vec<u8>>(),
        );
        let expected = (blob.len(), digest(&blob));
        let t = Instant::now();
        engine
            .start::<Vault>("v", VaultState { blob })
            .await
            .expect("start");
        let stored = t.elapsed();
        engine.shutdown().await;
        drop(engine);

        let t = Instant::now();
        let engine = open(tmp.path(), &config, size).await;
        // A waiting instance is not loaded at recovery: the first probe downloads and
        // decodes its state.
        let vault = engine.handle::<Vault>("v").await.expect("handle");
        let digest = vault.digest().await.expect("probe");
        let loaded = t.elapsed();
        assert_eq!(digest, expected, "state intact");
        engine.shutdown().await;

        let peak = support::peak_rss().unwrap_or(0);
        #[allow(clippy::cast_precision_loss)]
        let ratio = peak as f64 / size as f64;
        println!("state            {}", mib(size as u64));
        println!(
            "start (encode + upload, one durable step)   {:.2} s",
            stored.as_secs_f64()
        );
        println!(
            "restart + first probe (download + decode)   {:.2} s",
            loaded.as_secs_f64()
        );
        println!(
            "RSS before the state {}; peak RSS {} = {ratio:.2} × the state (target ≤ 2.5 ×)",
            mib(base),
            mib(peak)
        );
        if mode != Mode::Test {
            assert!(ratio <= 2.5, "peak RSS {ratio:.2} × the state");
        }
    }
}

fn main() {
    let mode = support::Mode::current();
    #[cfg(feature = "s3")]
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(run::main(mode));
    }
    #[cfg(not(feature = "s3"))]
    {
        let _ = mode;
        println!("large_state needs the S3 tier: --features flowwire-suite/s3");
    }
}
