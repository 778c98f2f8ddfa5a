//! The process the kill tests (tests/kill.rs) kill.
//!
//! `kill_harness timers DATA_DIR N` starts (or resumes) N sleeping flows, waits until all
//! have finished, prints `DONE` and exits 0.
//!
//! `kill_harness chunks DIR N` starts (or resumes) N `KillChunks` flows, each rewriting
//! part of a 2 MiB state 40 times (data under `DIR/data`, chunks under `DIR/chunks`, history
//! kept for one step), waits until all finished with the state their rounds computed, prints
//! `DONE` and exits 0 (`READY` once its engine runs).
//!
//! `kill_harness blobs DIR N` does the same with N `KillBlobs` flows, whose 2 MiB
//! `flowwire::Blob` is kept as it is for four rounds and replaced on the fifth.
//!
//! `kill_harness calls DATA_DIR LEDGER RUN N` starts (or resumes) N flows calling `Mail` and
//! N calling `Vault`; in the run tagged `hang` the drivers hang after noting each call, so
//! the test kills the process with calls in flight. Any other run waits until every mail
//! flow finished and every vault flow is parked, prints `DONE` and exits 0; the run tagged
//! `resume` resumes every parked vault flow (as an operator would) and waits until all
//! finished.
//!
//! `kill_harness trips DATA_DIR LEDGER RUN N` starts (or resumes) N `KillTrip` sagas; in
//! runs tagged `undo-hang…` every compensation hangs after noting its call, so the test
//! kills the process while compensations are in flight. Any other run waits until every
//! trip has failed (its compensations done), prints `DONE` and exits 0.
//!
//! `kill_harness fans DATA_DIR LEDGER RUN N` starts (or resumes) N `KillFan` fan-outs; in
//! runs tagged `fan-hang…` the odd pages hang after noting their call, so the test kills
//! the process with some branches done and others in flight. Any other run waits until
//! every fan-out finished, prints `DONE` and exits 0.
//!
//! `kill_harness broods DATA_DIR LEDGER RUN N` starts (or resumes) N `KillBrood` parents,
//! each running `KillChick` children two at a time; in runs tagged `brood-hang…` the odd
//! children's print hangs after noting its call, so the test kills the process with some
//! children ended and others running. Any other run waits until every parent finished,
//! prints `DONE` and exits 0.
//!
//! `kill_harness cancels DATA_DIR LEDGER RUN N` starts (or resumes) N `KillHold` flows,
//! each of which reserves seats and waits, and cancels each once it waits. In runs tagged
//! `undo-hang…` every release hangs after noting its call, so the test kills the process
//! while the compensations of the cancellations run. Any other run cancels each again (a
//! retried cancellation), waits until every flow ended cancelled, prints `DONE` and exits 0.
//!
//! `kill_harness notes DATA_DIR N` sends N numbers by start-or-impulse, number `i` to
//! instance `notes-{i % 5}` under impulse id `req-{i}`, one after the other, printing `READY`
//! first; the test kills it midway. Run again, it sends all of them again (each is applied,
//! or was already), waits until every instance finished, prints `DONE` and exits 0.
//!
//! `kill_harness retries DATA_DIR LEDGER RUN N` starts (or resumes) N `KillRetry` flows,
//! whose gateway is busy for two attempts of each call. In the run tagged `backoff-kill` it
//! waits until every first attempt failed and its retry was committed, checks that no
//! instance waiting out its backoff is held in memory, prints `BACKING_OFF` and waits to be
//! killed. Any other run waits until every flow finished, prints `DONE` and exits 0.

use std::path::PathBuf;
use std::time::Duration;

use flowwire::{Ended, Engine, Error, Flow};

#[path = "kill_flows.rs"]
mod kill_flows;

use kill_flows::{
    BroodState, CHICKS, ChunkState, FanState, HoldState, KillBrood, KillChick, KillChunks, KillFan,
    KillHold, KillNap, KillNotes, KillPay, KillRetry, KillTrip, Ledger, NapState, NotesState,
    PAGES, PayState, RetryState, SEATS, TripState, pay_id,
};

/// Starts an instance, or reaches it if a killed run started it already.
async fn start_or_reach<F: Flow>(engine: &Engine, id: &str, state: F::State) -> F::Handle {
    match engine.start::<F>(id, state).await {
        Ok(h) => h,
        Err(Error::AlreadyExists { .. }) => engine.handle::<F>(id).await.expect("reachable"),
        Err(e) => panic!("{id}: {e}"),
    }
}

async fn timers(dir: PathBuf, n: u32) {
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillNap>()
        .start()
        .await
        .expect("engine starts");
    println!("READY");
    let mut handles = Vec::new();
    for i in 0..n {
        let state = NapState {
            nap_ms: 100 + u64::from(i * 37 % 400),
            naps_wanted: 3,
            naps: 0,
        };
        handles.push(start_or_reach::<KillNap>(&engine, &format!("nap-{i}"), state).await);
    }
    for (i, h) in handles.iter().enumerate() {
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        assert!(
            matches!(ended, Ok(Ok(Ended::Finished))),
            "nap-{i}: {ended:?}"
        );
        assert_eq!(h.state().await.expect("state").naps, 3, "nap-{i}");
    }
    engine.shutdown().await;
    println!("DONE");
}

async fn calls(dir: PathBuf, ledger: PathBuf, run: String, n: u32) {
    let hang = run == "hang";
    let run_tag = run.clone();
    let driver = Ledger { path: ledger, run };
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillPay>()
        .driver::<kill_flows::VaultProxy, _>(driver.clone())
        .driver::<kill_flows::MailProxy, _>(driver)
        .start()
        .await
        .expect("engine starts");
    let mut handles = Vec::new();
    for money in [false, true] {
        for i in 0..n {
            let state = PayState { money, done: false };
            let h = start_or_reach::<KillPay>(&engine, &pay_id(money, i), state).await;
            handles.push((money, i, h));
        }
    }
    println!("READY");
    if hang {
        std::future::pending::<()>().await;
    }
    if run_tag == "resume" {
        // The operator checked the ledger: every parked transfer is sent again.
        let parked = engine
            .parked::<KillPay>(None, 1_000)
            .await
            .expect("parked list");
        assert_eq!(parked.len(), n as usize, "every transfer is parked");
        for p in parked {
            assert_eq!(p.call.as_deref(), Some("Vault.transfer"), "{p:?}");
            engine
                .resume::<KillPay>(p.id.as_str())
                .await
                .expect("resumed");
        }
        for (_, i, h) in handles {
            let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
            assert!(matches!(ended, Ok(Ok(Ended::Finished))), "{i}: {ended:?}");
        }
        engine.shutdown().await;
        println!("DONE");
        return;
    }
    for (money, i, h) in handles {
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        match (money, ended) {
            (false, Ok(Ok(Ended::Finished))) => {}
            (true, Ok(Err(Error::Quarantined { reason, .. }))) if reason.contains("park") => {}
            (_, other) => panic!("{}: {other:?}", pay_id(money, i)),
        }
    }
    engine.shutdown().await;
    println!("DONE");
}

async fn trips(dir: PathBuf, ledger: PathBuf, run: String, n: u32) {
    let hang = run.starts_with("undo-hang");
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillTrip>()
        .driver::<kill_flows::SeatsProxy, _>(Ledger { path: ledger, run })
        .start()
        .await
        .expect("engine starts");
    let mut handles = Vec::new();
    for i in 0..n {
        let id = format!("trip-{i}");
        handles.push((
            id.clone(),
            start_or_reach::<KillTrip>(&engine, &id, TripState::default()).await,
        ));
    }
    println!("READY");
    if hang {
        std::future::pending::<()>().await;
    }
    for (id, h) in handles {
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        match ended {
            Ok(Ok(Ended::Failed { reason, .. })) if reason == "the trip was called off" => {}
            other => panic!("{id}: {other:?}"),
        }
    }
    engine.shutdown().await;
    println!("DONE");
}

async fn fans(dir: PathBuf, ledger: PathBuf, run: String, n: u32) {
    let hang = run.starts_with("fan-hang");
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillFan>()
        .driver::<kill_flows::PressProxy, _>(Ledger { path: ledger, run })
        .start()
        .await
        .expect("engine starts");
    let mut handles = Vec::new();
    for i in 0..n {
        let id = format!("fan-{i}");
        handles.push((
            id.clone(),
            start_or_reach::<KillFan>(&engine, &id, FanState::default()).await,
        ));
    }
    println!("READY");
    if hang {
        std::future::pending::<()>().await;
    }
    for (id, h) in handles {
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        assert!(matches!(ended, Ok(Ok(Ended::Finished))), "{id}: {ended:?}");
        let mut printed = h.state().await.expect("state").printed;
        printed.sort_unstable();
        assert_eq!(printed, (0..PAGES).collect::<Vec<_>>(), "{id}");
    }
    engine.shutdown().await;
    println!("DONE");
}

async fn broods(dir: PathBuf, ledger: PathBuf, run: String, n: u32) {
    let hang = run.starts_with("brood-hang");
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillBrood>()
        .flow::<KillChick>()
        .driver::<kill_flows::PressProxy, _>(Ledger { path: ledger, run })
        .start()
        .await
        .expect("engine starts");
    let mut handles = Vec::new();
    for i in 0..n {
        let id = format!("brood-{i}");
        let state = BroodState {
            id: id.clone(),
            ..BroodState::default()
        };
        handles.push((
            id.clone(),
            start_or_reach::<KillBrood>(&engine, &id, state).await,
        ));
    }
    println!("READY");
    if hang {
        std::future::pending::<()>().await;
    }
    for (id, h) in handles {
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        assert!(matches!(ended, Ok(Ok(Ended::Finished))), "{id}: {ended:?}");
        let mut hatched = h.state().await.expect("state").hatched;
        hatched.sort_unstable();
        assert_eq!(hatched, (0..CHICKS).collect::<Vec<_>>(), "{id}");
    }
    engine.shutdown().await;
    println!("DONE");
}

async fn cancels(dir: PathBuf, ledger: PathBuf, run: String, n: u32) {
    let hang = run.starts_with("undo-hang");
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillHold>()
        .driver::<kill_flows::SeatsProxy, _>(Ledger { path: ledger, run })
        .start()
        .await
        .expect("engine starts");
    let mut handles = Vec::new();
    for i in 0..n {
        let id = format!("hold-{i}");
        handles.push((
            id.clone(),
            start_or_reach::<KillHold>(&engine, &id, HoldState::default()).await,
        ));
    }
    for (id, h) in &handles {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match h.state().await {
                Ok(s) if s.reserved == SEATS => break,
                // Cancelled by the killed run already: nothing left to wait for.
                Err(Error::Ended { .. }) => break,
                Ok(_) | Err(_) => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id}: never held its seats"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flowwire::Handle::cancel(h, "called off")
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    println!("READY");
    if hang {
        std::future::pending::<()>().await;
    }
    for (id, h) in handles {
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        match ended {
            Ok(Ok(Ended::Cancelled { reason })) if reason == "called off" => {}
            other => panic!("{id}: {other:?}"),
        }
    }
    engine.shutdown().await;
    println!("DONE");
}

async fn notes(dir: PathBuf, n: u32) {
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillNotes>()
        .start()
        .await
        .expect("engine starts");
    println!("READY");
    for i in 0..n {
        let id = format!("notes-{}", i % 5);
        let add = kill_flows::KillNotesImpulse::Add { n: i };
        let sent = engine
            .start_or_impulse::<KillNotes>(id.as_str(), NotesState::default(), add)
            .id(format!("req-{i}"))
            .await;
        match sent {
            Ok(_) | Err(Error::ImpulseAlreadyApplied { .. }) => {}
            Err(e) => panic!("req-{i}: {e}"),
        }
        if i % 50 == 49 {
            println!("SENT {}", i + 1);
        }
    }
    for k in 0..5 {
        let h = engine
            .handle::<KillNotes>(format!("notes-{k}"))
            .await
            .expect("started");
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        assert!(
            matches!(ended, Ok(Ok(Ended::Finished))),
            "notes-{k}: {ended:?}"
        );
    }
    engine.shutdown().await;
    println!("DONE");
}

async fn retries(dir: PathBuf, ledger: PathBuf, run: String, n: u32) {
    let kill_me = run == "backoff-kill";
    let engine = Engine::builder()
        .data_dir(dir)
        .flow::<KillRetry>()
        .driver::<kill_flows::GatewayProxy, _>(Ledger { path: ledger, run })
        .start()
        .await
        .expect("engine starts");
    let mut events = engine.events();
    let mut handles = Vec::new();
    for i in 0..n {
        let id = format!("retry-{i}");
        handles.push((
            id.clone(),
            start_or_reach::<KillRetry>(&engine, &id, RetryState::default()).await,
        ));
    }
    println!("READY");
    if kill_me {
        let mut backing_off = 0;
        while backing_off < n {
            let e = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .expect("every first attempt fails within 10 s")
                .expect("the event stream is open")
                .expect("no events missed");
            if let flowwire::EventKind::Retry { attempt: 1, .. } = e.kind {
                backing_off += 1;
            }
        }
        // Waiting out a backoff, an instance has no call out: it leaves memory.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while engine.resident::<KillRetry>().await.expect("resident") > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "instances waiting out a backoff stayed in memory"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("BACKING_OFF");
        std::future::pending::<()>().await;
    }
    for (id, h) in handles {
        let ended = tokio::time::timeout(Duration::from_mins(1), h.finished()).await;
        assert!(matches!(ended, Ok(Ok(Ended::Finished))), "{id}: {ended:?}");
        assert_eq!(h.state().await.expect("state").charged_on, Some(3), "{id}");
    }
    engine.shutdown().await;
    println!("DONE");
}

/// `chunks DIR N`: N `KillChunks` instances on a file tier with history kept for one step.
async fn chunks(dir: PathBuf, n: u32) {
    large::<KillChunks>(
        &dir,
        n,
        "chunks",
        |i| ChunkState {
            data: kill_flows::chunk_noise(kill_flows::CHUNK_STATE, u64::from(i) + 1).into(),
            round: 0,
        },
        |i, state| state.data == kill_flows::chunk_data(i, kill_flows::CHUNK_ROUNDS),
    )
    .await;
}

/// `blobs DIR N`: N `KillBlobs` instances, as `chunks` runs `KillChunks`.
async fn blobs(dir: PathBuf, n: u32) {
    let rounds = kill_flows::CHUNK_ROUNDS;
    large::<kill_flows::KillBlobs>(
        &dir,
        n,
        "blobs",
        |i| kill_flows::BlobState {
            id: i,
            scan: kill_flows::blob_scan(i, 0),
            ..kill_flows::BlobState::default()
        },
        |i, state| {
            state.scan == kill_flows::blob_scan(i, rounds)
                && state.sum == u64::from(rounds * (rounds + 1) / 2)
        },
    )
    .await;
}

/// Starts (or resumes) N instances `<name>-<i>` of a flow with a large state on a file tier
/// (history kept for one step), waits until each finished with the state `computed` expects,
/// prints `DONE` (`READY` once the engine runs).
async fn large<F: Flow>(
    dir: &std::path::Path,
    n: u32,
    name: &str,
    initial: impl Fn(u32) -> F::State,
    computed: impl Fn(u32, &F::State) -> bool,
) where
    F::Handle: std::ops::Deref<Target = flowwire::Handle<F>>,
{
    let engine = Engine::builder()
        .data_dir(dir.join("data"))
        .storage(kill_flows::chunk_ladder(dir))
        .history(flowwire::storage::Retention::Last(1))
        .flow::<F>()
        .start()
        .await
        .expect("engine starts");
    println!("READY");
    let mut handles = Vec::new();
    for i in 0..n {
        handles.push(start_or_reach::<F>(&engine, &format!("{name}-{i}"), initial(i)).await);
    }
    for (i, h) in (0..n).zip(&handles) {
        let ended = tokio::time::timeout(Duration::from_mins(2), h.finished()).await;
        assert!(
            matches!(ended, Ok(Ok(Ended::Finished))),
            "{name}-{i}: {ended:?}"
        );
        let state = h.state().await.expect("state");
        assert!(
            computed(i, &state),
            "{name}-{i}: the state its rounds computed"
        );
    }
    engine.shutdown().await;
    println!("DONE");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("chunks") if args.len() == 4 => {
            chunks(args[2].clone().into(), args[3].parse().expect("N")).await;
        }
        Some("blobs") if args.len() == 4 => {
            blobs(args[2].clone().into(), args[3].parse().expect("N")).await;
        }
        Some("timers") if args.len() == 4 => {
            timers(args[2].clone().into(), args[3].parse().expect("N")).await;
        }
        Some("calls") if args.len() == 6 => {
            calls(
                args[2].clone().into(),
                args[3].clone().into(),
                args[4].clone(),
                args[5].parse().expect("N"),
            )
            .await;
        }
        Some("trips") if args.len() == 6 => {
            trips(
                args[2].clone().into(),
                args[3].clone().into(),
                args[4].clone(),
                args[5].parse().expect("N"),
            )
            .await;
        }
        Some("fans") if args.len() == 6 => {
            fans(
                args[2].clone().into(),
                args[3].clone().into(),
                args[4].clone(),
                args[5].parse().expect("N"),
            )
            .await;
        }
        Some("broods") if args.len() == 6 => {
            broods(
                args[2].clone().into(),
                args[3].clone().into(),
                args[4].clone(),
                args[5].parse().expect("N"),
            )
            .await;
        }
        Some("cancels") if args.len() == 6 => {
            cancels(
                args[2].clone().into(),
                args[3].clone().into(),
                args[4].clone(),
                args[5].parse().expect("N"),
            )
            .await;
        }
        Some("notes") if args.len() == 4 => {
            notes(args[2].clone().into(), args[3].parse().expect("N")).await;
        }
        Some("retries") if args.len() == 6 => {
            retries(
                args[2].clone().into(),
                args[3].clone().into(),
                args[4].clone(),
                args[5].parse().expect("N"),
            )
            .await;
        }
        _ => {
            eprintln!(
                "usage: kill_harness timers DATA_DIR N | calls DATA_DIR LEDGER RUN N | trips DATA_DIR LEDGER RUN N | fans DATA_DIR LEDGER RUN N | broods DATA_DIR LEDGER RUN N | cancels DATA_DIR LEDGER RUN N | notes DATA_DIR N | retries DATA_DIR LEDGER RUN N"
            );
            std::process::exit(2);
        }
    }
}
