//! The process the crash test kills: an engine over N order flows on a data directory.
//!
//! `crash_harness DATA_DIR LEDGER FLOWS RUN_TAG` starts (or resumes) every order, sends each
//! its approval impulse with a fixed id, waits for all to finish, prints `DONE` and exits 0.

use std::path::PathBuf;
use std::time::Duration;

use flowwire::Engine;

#[path = "order.rs"]
mod order;

use order::{CrashOrder, CrashState, Ledger, order_id};

async fn drive_one(engine: Engine, n: u32) -> Result<(), String> {
    let id = order_id(n);
    let state = CrashState {
        n,
        ..CrashState::default()
    };
    let handle = match engine.start::<CrashOrder>(id.as_str(), state).await {
        Ok(h) => h,
        Err(flowwire::Error::AlreadyExists { .. }) => engine
            .handle::<CrashOrder>(id.as_str())
            .await
            .map_err(|e| e.to_string())?,
        Err(e) => return Err(e.to_string()),
    };
    match handle.approve().id(format!("approve-{n}")).await {
        Ok(())
        | Err(flowwire::Error::ImpulseAlreadyApplied { .. } | flowwire::Error::Ended { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    match tokio::time::timeout(Duration::from_mins(2), handle.finished()).await {
        Ok(Ok(flowwire::Ended::Finished)) => Ok(()),
        other => Err(format!("{id}: {other:?}")),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: crash_harness DATA_DIR LEDGER FLOWS RUN_TAG");
        std::process::exit(2);
    }
    let flows: u32 = args[3].parse().expect("FLOWS is a number");
    let engine = Engine::builder()
        .data_dir(PathBuf::from(&args[1]))
        .flow::<CrashOrder>()
        .driver(Ledger {
            path: PathBuf::from(&args[2]),
            run: args[4].clone(),
        })
        .driver_concurrency(2)
        .start()
        .await
        .expect("engine starts");
    println!("READY");
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..flows {
        tasks.spawn(drive_one(engine.clone(), n));
    }
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        if let Err(e) | Ok(Err(e)) = r.map_err(|e| e.to_string()) {
            eprintln!("flow failed: {e}");
            failed += 1;
        }
    }
    engine.shutdown().await;
    if failed > 0 {
        eprintln!("{failed} flows failed");
        std::process::exit(1);
    }
    println!("DONE");
}
