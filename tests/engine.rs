#![allow(missing_docs)] // test-local flows and drivers
//! The engine's contract, through the public API: the loop, impulses exactly once, probes
//! from persisted state, quarantine of panicking wires, failures, and every bad input as a
//! typed error; start-or-impulse.
//!
//! (Over 600 lines: one test per clause of the contract, sharing the flows and drivers;
//! split in files, each would copy them.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::{
    Expect, InstanceKey, InstanceStore, MemoryStore, StepInput, StepWrite, codec,
};
use flowwire::{Error, Flow};

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("no seats left")]
pub struct NoSeats;

#[driver(timeout = "2s", retries = 1)]
pub trait Clerk {
    async fn book(&self, seats: u32) -> Result<u32, NoSeats>;
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TripState {
    seats: Option<u32>,
    booked: Option<u32>,
    boom: bool,
    notes: Vec<String>,
}

#[flow(version = 3)]
pub struct Trip {
    #[link]
    state: TripState,
    #[link]
    clerk: impl Clerk,
}

#[flow]
impl Trip {
    #[impulse]
    fn want(&mut self, seats: u32) {
        self.state.seats = Some(seats);
    }

    #[impulse]
    fn note(&mut self, text: String) {
        self.state.notes.push(text);
    }

    #[impulse]
    fn explode(&mut self) {
        self.state.boom = true;
    }

    #[probe]
    fn booked(&self) -> Option<u32> {
        self.state.booked
    }

    #[probe]
    fn notes(&self) -> usize {
        self.state.notes.len()
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        assert!(!self.state.boom, "the wire hit a bug");
        match (self.state.seats, self.state.booked) {
            (None, _) => Command::wait(),
            (Some(n), None) => Command::drive(self.clerk.book(n)).then(|f, r| {
                f.state.booked = Some(r?);
                Ok(())
            }),
            (Some(_), Some(_)) if self.state.notes.is_empty() => Command::wait(),
            _ => Command::finish(),
        }
    }
}

/// Books seats; zero seats is refused; records every idempotency key it sees.
#[derive(Clone, Default)]
struct Desk {
    calls: Arc<AtomicU32>,
    keys: Arc<std::sync::Mutex<Vec<String>>>,
}

#[driver]
impl Clerk for Desk {
    async fn book(&self, seats: u32) -> Result<u32, NoSeats> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let ctx = CallContext::current().expect("a driver call has a context");
        self.keys.lock().unwrap().push(ctx.idempotency_key());
        if seats == 0 {
            Err(NoSeats)
        } else {
            Ok(seats * 100)
        }
    }
}

async fn engine_with(desk: Desk) -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<Trip>()
        .driver(desk)
        .request_timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap()
}

/// Waits (polling the probe, at most 10 s) until the booking outcome is persisted.
async fn booked(h: &TripHandle) -> u32 {
    for _ in 0..2_000 {
        if let Some(seats) = h.booked().await.unwrap() {
            return seats;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the booking was not persisted within 10 s");
}

async fn finished(h: &TripHandle) -> Ended {
    tokio::time::timeout(Duration::from_secs(10), h.finished())
        .await
        .expect("ends in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_waits_drives_and_finishes_with_probes_from_persisted_state() {
    let desk = Desk::default();
    let engine = engine_with(desk.clone()).await;
    let trip = engine
        .start::<Trip>("t-1", TripState::default())
        .await
        .unwrap();
    assert_eq!(
        trip.booked().await.unwrap(),
        None,
        "a started flow waits for `want`"
    );
    trip.want(2).await.unwrap();
    assert_eq!(booked(&trip).await, 200);
    trip.note("window seat".into()).await.unwrap();
    assert_eq!(finished(&trip).await, Ended::Finished);
    assert_eq!(
        trip.notes().await.unwrap(),
        1,
        "probes answer for ended instances too"
    );
    assert_eq!(desk.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        *desk.keys.lock().unwrap(),
        vec!["Trip/t-1/2".to_string()],
        "key = flow/instance/step"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impulse_id_is_applied_once_and_a_reuse_is_named() {
    let engine = engine_with(Desk::default()).await;
    let trip = engine
        .start::<Trip>("t-2", TripState::default())
        .await
        .unwrap();
    trip.note("a".into()).id("n-1").await.unwrap();
    let err = trip.note("a".into()).id("n-1").await.unwrap_err();
    assert!(
        matches!(&err, Error::ImpulseAlreadyApplied { impulse_id, step: 2, .. } if impulse_id == "n-1"),
        "{err}"
    );
    trip.note("b".into()).await.unwrap();
    trip.note("b".into()).await.unwrap();
    assert_eq!(
        trip.notes().await.unwrap(),
        3,
        "impulses without an id are distinct"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_the_impulse_that_ended_an_instance_is_named_as_applied() {
    let engine = engine_with(Desk::default()).await;
    let trip = engine
        .start::<Trip>("t-9", TripState::default())
        .await
        .unwrap();
    trip.want(2).id("w-1").await.unwrap();
    booked(&trip).await;
    // The note is the last input the flow waits for: it finishes.
    trip.note("done".into()).id("n-1").await.unwrap();
    assert_eq!(finished(&trip).await, Ended::Finished);
    // The client did not hear the first answer and sends the same request again.
    let err = trip.note("done".into()).id("n-1").await.unwrap_err();
    assert!(
        matches!(&err, Error::ImpulseAlreadyApplied { impulse_id, .. } if impulse_id == "n-1"),
        "{err}"
    );
    // A new impulse is refused: the instance has ended.
    let err = trip.note("late".into()).id("n-2").await.unwrap_err();
    assert!(matches!(err, Error::Ended { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_typed_errors() {
    let engine = engine_with(Desk::default()).await;
    let err = engine.handle::<Trip>("nobody").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { flow: "Trip", .. }), "{err}");

    let trip = engine
        .start::<Trip>("t-3", TripState::default())
        .await
        .unwrap();
    let err = engine
        .start::<Trip>("t-3", TripState::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    assert!(
        err.to_string().contains("engine.handle"),
        "the message says what to do: {err}"
    );

    trip.want(1).await.unwrap();
    trip.note("x".into()).await.unwrap();
    assert_eq!(finished(&trip).await, Ended::Finished);
    let err = trip.note("late".into()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Ended {
                status: "finished",
                ..
            }
        ),
        "{err}"
    );
    let err = engine
        .start::<Trip>("t-3", TripState::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::AlreadyExists { .. }),
        "an ended id stays taken: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_error_reaches_the_continuation_and_fails_the_flow() {
    let engine = engine_with(Desk::default()).await;
    let trip = engine
        .start::<Trip>("t-4", TripState::default())
        .await
        .unwrap();
    trip.want(0).await.unwrap();
    let ended = finished(&trip).await;
    assert!(
        matches!(&ended, Ended::Failed { reason, .. } if reason == "driver error: no seats left"),
        "{ended:?}"
    );
    assert!(
        ended.error::<NoSeats>().is_some(),
        "the driver's error is kept, typed: {ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_wire_parks_its_instance_and_the_engine_keeps_running() {
    let engine = engine_with(Desk::default()).await;
    let bad = engine
        .start::<Trip>("bad", TripState::default())
        .await
        .unwrap();
    let good = engine
        .start::<Trip>("good", TripState::default())
        .await
        .unwrap();
    bad.explode().await.unwrap();
    let err = bad.finished().await.unwrap_err();
    assert!(
        matches!(&err, Error::Quarantined { reason, .. } if reason.contains("the wire hit a bug")),
        "{err}"
    );
    let err = bad.note("x".into()).await.unwrap_err();
    assert!(matches!(err, Error::Quarantined { .. }), "{err}");
    assert!(
        !bad.state().await.unwrap().boom,
        "the parked state is the last committed one"
    );
    good.want(1).await.unwrap();
    good.note("ok".into()).await.unwrap();
    assert_eq!(finished(&good).await, Ended::Finished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_resumes_instances_from_its_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let desk = Desk::default();
    {
        let engine = Engine::builder()
            .data_dir(dir.path())
            .flow::<Trip>()
            .driver(desk.clone())
            .start()
            .await
            .unwrap();
        let trip = engine
            .start::<Trip>("r-1", TripState::default())
            .await
            .unwrap();
        trip.want(3).await.unwrap();
        booked(&trip).await;
        engine.shutdown().await;
    }
    let engine = Engine::builder()
        .data_dir(dir.path())
        .flow::<Trip>()
        .driver(desk.clone())
        .start()
        .await
        .unwrap();
    let trip = engine.handle::<Trip>("r-1").await.unwrap();
    assert_eq!(
        trip.booked().await.unwrap(),
        Some(300),
        "state survives the restart"
    );
    trip.note("after restart".into()).await.unwrap();
    assert_eq!(finished(&trip).await, Ended::Finished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn building_an_engine_names_what_is_missing() {
    let err = Engine::builder().flow::<Trip>().start().await.unwrap_err();
    assert!(matches!(err, Error::NoStore), "{err}");
    let err = Engine::builder()
        .in_memory()
        .flow::<Trip>()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingDriver {
                flow: "Trip",
                field: "clerk",
                driver: "Clerk"
            }
        ),
        "{err}"
    );
    let err = Engine::builder()
        .in_memory()
        .flow::<Trip>()
        .flow::<Trip>()
        .driver(Desk::default())
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateFlow { .. }), "{err}");
    let engine = engine_with(Desk::default()).await;
    let err = engine.start::<Other>("x", ()).await.unwrap_err();
    assert!(matches!(err, Error::UnknownFlow { flow: "Other" }), "{err}");
}

#[flow]
pub struct Other {
    #[link]
    state: (),
}

#[flow]
impl Other {
    #[wire]
    #[allow(clippy::unused_self)] // the wire's signature is fixed; this flow ends at once
    fn run(&mut self) -> Command<Self> {
        Command::finish()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_an_unknown_format_version_is_a_typed_error_and_is_kept() {
    let store = Arc::new(MemoryStore::new());
    let key = InstanceKey::new("Trip", "future");
    let mut bytes = Vec::new();
    codec::encode_with_version(codec::Kind::Record, 99, &"from the future", &mut bytes).unwrap();
    store
        .commit(vec![StepWrite {
            key: key.clone(),
            expect: Expect::Absent,
            version: 1,
            record: bytes.clone().into(),
            active: true,
            parked: false,
            timer: None,
            correlation: None,
            uncorrelate: None,
            ended_key: None,
            impulse: None,
            history: None,
            seq: 1,
            prune_below: None,
            fence: None,
            acknowledges: None,
            sends: Vec::new(),
            checksums: flowwire::storage::codec::Checksums::Written,
        }])
        .await
        .unwrap();
    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Trip>()
        .driver(Desk::default())
        .start()
        .await
        .unwrap();
    let err = engine.handle::<Trip>("future").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown format version 99 for record"),
        "the error names the version: {err}"
    );
    let kept = store.load(&key).await.unwrap().unwrap();
    assert_eq!(&kept.bytes[..], &bytes[..], "nothing stored is lost");
    // A record from a newer flowwire is not damaged: it is not marked for an operator
    // (the mark would be written off the runner: give it the time it would take).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        store.damaged("Trip", None, 10).await.unwrap().is_empty(),
        "a newer format is not damage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_file_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("instances.redb"), vec![0x5A; 8192]).unwrap();
    let err = Engine::builder()
        .data_dir(dir.path())
        .flow::<Trip>()
        .driver(Desk::default())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("corrupted"), "{err}");
}

#[test]
fn the_flow_metadata_serializes_to_json() {
    let meta = serde_json::to_value(<Trip as Flow>::META).unwrap();
    assert_eq!(meta["name"], "Trip");
    assert_eq!(meta["version"], 3);
    assert_eq!(meta["state"], "TripState");
    assert_eq!(meta["wire"], "run");
    assert_eq!(meta["impulses"][0]["name"], "want");
    assert_eq!(meta["impulses"][0]["args"][0]["ty"], "u32");
    assert_eq!(meta["probes"][0]["result"], "Option<u32>");
    let clerk = &meta["links"][0]["driver"];
    assert_eq!(meta["links"][0]["field"], "clerk");
    assert_eq!(clerk["name"], "Clerk");
    assert_eq!(clerk["policy"]["timeout_ms"], 2000);
    assert_eq!(clerk["policy"]["retries"], 1);
    assert_eq!(clerk["methods"][0]["result"], "Result<u32, NoSeats>");
}

/// The record as flowwire 0.1 wrote it.
#[derive(Serialize)]
struct RecordV1 {
    flow_version: u32,
    seq: u64,
    status: flowwire::storage::Status,
    state: bytes::Bytes,
    pending: Option<()>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_of_another_flow_version_is_never_run() {
    let store = Arc::new(MemoryStore::new());
    let engine = Engine::builder()
        .store(store.clone())
        .flow::<Trip>()
        .driver(Desk::default())
        .start()
        .await
        .unwrap();
    // Another writer adds a live instance written by version 2 after this engine started.
    let mut state = Vec::new();
    codec::encode_raw(&TripState::default(), &mut state).unwrap();
    let record = RecordV1 {
        flow_version: 2,
        seq: 1,
        status: flowwire::storage::Status::Waiting,
        state: state.into(),
        pending: None,
    };
    // Written in record format 1 (flowwire 0.1, before the ladder): still read.
    let mut bytes = Vec::new();
    codec::encode_with_version(codec::Kind::Record, 1, &record, &mut bytes).unwrap();
    store
        .commit(vec![StepWrite {
            key: InstanceKey::new("Trip", "old"),
            expect: Expect::Absent,
            version: 1,
            record: bytes.into(),
            active: true,
            parked: false,
            timer: None,
            correlation: None,
            uncorrelate: None,
            ended_key: None,
            impulse: None,
            history: None,
            seq: 1,
            prune_below: None,
            fence: None,
            acknowledges: None,
            sends: Vec::new(),
            checksums: flowwire::storage::codec::Checksums::Written,
        }])
        .await
        .unwrap();
    let trip = engine.handle::<Trip>("old").await.unwrap();
    let err = trip.want(1).await.unwrap_err();
    assert!(
        matches!(&err, Error::Quarantined { reason, .. }
            if reason.contains("version 2") && reason.contains("version 3")),
        "the error names both versions: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_probe_is_a_typed_error_and_the_instance_goes_on() {
    let engine = engine_with(Desk::default()).await;
    let trip = engine
        .start::<Trip>("t-probe", TripState::default())
        .await
        .unwrap();
    let boom = |_: &Trip| -> u32 { panic!("boom") };
    // On the instance in memory, then on the state read back after it ended.
    let err = trip.probe(boom).await.unwrap_err();
    assert!(
        matches!(&err, Error::ProbePanicked { flow: "Trip", reason, .. } if reason == "boom"),
        "{err}"
    );
    trip.want(1).await.unwrap();
    trip.note("aisle".into()).await.unwrap();
    assert_eq!(finished(&trip).await, Ended::Finished);
    let err = trip.probe(boom).await.unwrap_err();
    assert!(matches!(err, Error::ProbePanicked { .. }), "{err}");
    assert_eq!(trip.notes().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_or_impulse_starts_a_missing_instance_with_the_impulse_in_one_step() {
    let desk = Desk::default();
    let engine = engine_with(desk.clone()).await;
    let trip = engine
        .start_or_impulse::<Trip>(
            "t-soi",
            TripState::default(),
            TripImpulse::Want { seats: 2 },
        )
        .id("req-1")
        .await
        .unwrap();
    assert_eq!(
        booked(&trip).await,
        200,
        "the wire ran with the impulse applied"
    );
    let page = engine.history::<Trip>("t-soi", 0, 10).await.unwrap();
    assert_eq!(
        page.steps[0].input,
        StepInput::StartWith {
            id: "req-1".into(),
            name: "want".into()
        },
        "one step: the start with the impulse"
    );
    // Delivered again (a retry after a lost reply): the instance exists, the id is known.
    let again = engine
        .start_or_impulse::<Trip>(
            "t-soi",
            TripState::default(),
            TripImpulse::Want { seats: 9 },
        )
        .id("req-1")
        .await;
    assert!(
        matches!(again, Err(Error::ImpulseAlreadyApplied { .. })),
        "{again:?}"
    );
    // A new impulse goes to the live instance.
    engine
        .start_or_impulse::<Trip>(
            "t-soi",
            TripState::default(),
            TripImpulse::Note { text: "hi".into() },
        )
        .id("req-2")
        .await
        .unwrap();
    assert_eq!(finished(&trip).await, Ended::Finished);
    let page = engine.history::<Trip>("t-soi", 0, 10).await.unwrap();
    let starts = page
        .steps
        .iter()
        .filter(|s| matches!(s.input, StepInput::Start | StepInput::StartWith { .. }))
        .count();
    assert_eq!(starts, 1);
    assert_eq!(desk.calls.load(Ordering::SeqCst), 1, "booked once");
    // An ended instance takes no impulse, whichever way it comes.
    let ended = engine
        .start_or_impulse::<Trip>(
            "t-soi",
            TripState::default(),
            TripImpulse::Note {
                text: "late".into(),
            },
        )
        .await;
    assert!(matches!(ended, Err(Error::Ended { .. })), "{ended:?}");
}
