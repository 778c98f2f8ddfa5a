#![allow(missing_docs)]
//! The multi-process crash test: three orchestrator and three worker processes
//! (`scale_harness`) on one Redis with its append-only file on; this test process is the
//! client. While it starts 5,000 tickets and confirms each one (`FLOWWIRE_SCALE_FLOWS`
//! changes the count), the test kills a random harness process with SIGKILL and starts it
//! again, 30 times, and kills and restarts Redis once half-way. At the end:
//!
//! * every ticket finished (no call was lost: each needed both of its calls' outcomes);
//! * each ticket's confirmation was applied once (its state counts applications) and its
//!   history holds one impulse step and at most one outcome step per call;
//! * no step was written twice and no write carried a lower fencing token than the one
//!   before it (the store's write audit, per instance).
#![cfg(feature = "redis")]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flowwire::Engine;
use tokio::sync::Semaphore;

#[path = "support/servers.rs"]
mod servers;

#[path = "harness/scale_flows.rs"]
mod scale_flows;

#[path = "harness/tickets.rs"]
mod tickets;

use scale_flows::{Ticket, shared};
use tickets::open;

const KILLS: usize = 30;
const PREFIX: &str = "scalekill";

fn flows() -> usize {
    std::env::var("FLOWWIRE_SCALE_FLOWS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000)
}

struct Proc {
    role: &'static str,
    name: String,
    child: Child,
}

fn spawn(url: &str, role: &'static str, name: &str) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_scale_harness"))
        .args([role, url, PREFIX, name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the harness starts");
    Proc {
        role,
        name: name.to_string(),
        child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_orchestrators_and_three_workers_survive_kills_and_a_redis_restart() {
    let mut redis = servers::Redis::start_durable();
    let url = redis.url();
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..3 {
        procs.push(spawn(&url, "orchestrator", &format!("orch-{i}")));
        procs.push(spawn(&url, "worker", &format!("worker-{i}")));
    }
    let client = Engine::builder()
        .shared(shared(&url, PREFIX, None))
        .flow::<Ticket>()
        .client()
        .request_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("the client joins");

    let n = flows();
    let ids: Vec<String> = (0..n).map(|i| format!("t-{i}")).collect();
    let feeder = {
        let client = client.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(64));
            let mut tasks = Vec::with_capacity(ids.len());
            for id in ids {
                let permit = slots.clone().acquire_owned().await.expect("open");
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    open(client, id).await;
                    drop(permit);
                }));
            }
            for t in tasks {
                t.await.expect("a ticket opened");
            }
        })
    };

    // The killer: a random process every 250 ms, and Redis once half-way.
    let mut seed = std::process::id() | 1;
    let mut kills = 0;
    let mut killed_by_role = [0usize; 2];
    while kills < KILLS {
        tokio::time::sleep(Duration::from_millis(250)).await;
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let i = (seed as usize) % procs.len();
        let p = &mut procs[i];
        p.child.kill().expect("SIGKILL");
        p.child.wait().expect("reaped");
        killed_by_role[usize::from(p.role == "worker")] += 1;
        let (role, name) = (p.role, p.name.clone());
        procs[i] = spawn(&url, role, &name);
        kills += 1;
        if kills == KILLS / 2 {
            redis.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis.restart();
        }
    }
    tokio::time::timeout(Duration::from_mins(10), feeder)
        .await
        .expect("every ticket opened within 10 minutes")
        .expect("the feeder");

    let store = shared(&url, PREFIX, None).store();
    for id in &ids {
        tickets::check(&client, &store, id).await;
    }
    println!(
        "{n} tickets finished; {kills} kills ({} orchestrators, {} workers) and one Redis restart",
        killed_by_role[0], killed_by_role[1]
    );
    client.shutdown().await;
    for mut p in procs {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
}
