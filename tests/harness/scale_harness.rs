//! A process of the multi-process crash test (`tests/scale_kill.rs`), killed at random.
//!
//! `scale_harness orchestrator|worker REDIS_URL PREFIX NAME [bench]` joins the deployment
//! in that role, prints `READY`, and runs until it is killed; an orchestrator then prints
//! its leases as they change (`LEASE …` lines, for the partition checker of
//! `tests/nemesis.rs`). With `bench`, it runs the multi-process bench's flow
//! (`benches/scale.rs`) instead of the crash test's. Also run by `tests/nemesis.rs` and
//! `tests/partitions.rs`.

use flowwire::{Engine, Error};

#[path = "scale_flows.rs"]
mod scale_flows;

#[path = "log.rs"]
mod log;

use scale_flows::{FrontDesk, Hopper, Relay, Ticket, bench_shared, shared};

// One thread per process: an orchestrator's or a worker's tasks then never wake one
// another across threads. On two cores, beside Redis and the client, that cost an
// orchestrator 16 % and a worker 14 % more CPU per workflow on a two-thread runtime
// (benches/scale.rs, its per-process columns; see docs/architecture.md). A machine with
// cores to spare runs more processes rather than more threads in one.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let (role, url, prefix, name, bench) = match args.as_slice() {
        [_, role, url, prefix, name] => (role, url, prefix, name, false),
        [_, role, url, prefix, name, b] if b == "bench" => (role, url, prefix, name, true),
        _ => {
            eprintln!("usage: scale_harness orchestrator|worker REDIS_URL PREFIX NAME [bench]");
            std::process::exit(2);
        }
    };
    if role != "orchestrator" && role != "worker" {
        eprintln!("unknown role {role:?}");
        std::process::exit(2);
    }
    log::install();
    // A name per incarnation: a restarted process is a new member.
    let node = format!("{name}-{}", std::process::id());
    // Redis may be restarting: try again for a while.
    let mut tries = 0;
    let engine = loop {
        match builder(role, url, prefix, &node, bench).start().await {
            Ok(e) => break e,
            Err(e) if tries < 100 => {
                tries += 1;
                eprintln!("not started yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    println!("READY");
    if role == "orchestrator" && !bench {
        log_leases(&engine).await;
    }
    std::future::pending::<()>().await;
    Ok(())
}

fn builder(
    role: &str,
    url: &str,
    prefix: &str,
    node: &str,
    bench: bool,
) -> flowwire::EngineBuilder {
    if bench {
        let builder = Engine::builder().shared(bench_shared(url, prefix, Some(node)));
        return if role == "orchestrator" {
            builder.flow::<Relay>().orchestrator()
        } else {
            builder.driver(Hopper).worker()
        };
    }
    let builder = Engine::builder().shared(shared(url, prefix, Some(node)));
    if role == "orchestrator" {
        builder.flow::<Ticket>().orchestrator()
    } else {
        builder.driver(FrontDesk).worker()
    }
}

/// Prints every lease this orchestrator holds, whenever its span changes, as
/// `LEASE <flow> <shard> <token> <since ms> <until ms>` (wall clock, ms since the Unix
/// epoch): the partition checker (`tests/nemesis.rs`) proves from these lines that no two
/// processes held one shard at once. The last line of a token is its whole span (renewals
/// extend it; giving the shard back ends it).
async fn log_leases(engine: &Engine) {
    use std::collections::BTreeMap;
    use std::io::Write as _;
    let mut shown: BTreeMap<(String, u16, u64), u64> = BTreeMap::new();
    loop {
        for l in engine.leases() {
            let key = (l.flow.to_string(), l.shard, l.token);
            if shown.get(&key) != Some(&l.until_unix_ms) {
                let line = format!(
                    "LEASE {} {} {} {} {}",
                    l.flow, l.shard, l.token, l.since_unix_ms, l.until_unix_ms
                );
                // Nobody reads the lines any more: stop writing them.
                if writeln!(std::io::stdout(), "{line}").is_err() {
                    return;
                }
                shown.insert(key, l.until_unix_ms);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
