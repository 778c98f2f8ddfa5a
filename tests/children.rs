#![allow(missing_docs)] // test-local flows and drivers
//! Child flows, through the public API: `Command::child::<G>(id, state)` starts another
//! flow's instance and waits, durably, for its end; a fan-out of `ChildStart`s runs children
//! under `.parallel(n)`. The parent receives how the child ended (finished, failed with its
//! typed failure, or cancelled) and its last state. A child's id names it: a parent attaches
//! to an instance that exists, so a restart never starts a child twice. A parent that is
//! cancelled or fails cancels its running children first, unless they are detached. The
//! crash tests (real kills of either side) are in tests/kill.rs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowwire::prelude::*;
use flowwire::storage::StepInput;
use flowwire::{ChildError, ChildStart, Error};

#[path = "../examples/backfill.rs"]
mod backfill;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ShipError {
    #[error("a parcel of {0} kg is too heavy")]
    TooHeavy(u32),
}

#[driver]
pub trait Depot {
    async fn pack(&self, parcel: String) -> Result<u32, ShipError>;
    async fn unpack(&self, crate_no: u32) -> Result<(), ShipError>;
}

#[derive(Clone, Default)]
pub struct Yard {
    log: Arc<Mutex<Vec<String>>>,
}

impl Yard {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[driver]
impl Depot for Yard {
    async fn pack(&self, parcel: String) -> Result<u32, ShipError> {
        self.log.lock().unwrap().push(format!("pack({parcel})"));
        Ok(u32::try_from(parcel.len()).unwrap_or(0))
    }
    async fn unpack(&self, crate_no: u32) -> Result<(), ShipError> {
        self.log.lock().unwrap().push(format!("unpack({crate_no})"));
        Ok(())
    }
}

/// A child: packs its parcel (undone by `unpack`), waits for `go` when told to, then
/// labels it, or fails when it is too heavy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Parcel {
    name: String,
    weight: u32,
    wait: bool,
    go: bool,
    packed: Option<u32>,
    label: Option<String>,
}

fn parcel(name: &str, weight: u32, wait: bool) -> Parcel {
    Parcel {
        name: name.into(),
        weight,
        wait,
        ..Parcel::default()
    }
}

#[flow]
pub struct Ship {
    #[link]
    state: Parcel,
    #[link]
    depot: impl Depot,
}

#[flow]
impl Ship {
    #[impulse]
    fn go(&mut self) {
        self.state.go = true;
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.packed.is_none() {
            return Command::drive(self.depot.pack(self.state.name.clone()))
                .compensate_with(|n| DepotProxy.unpack(*n))
                .then(|f, r| {
                    f.state.packed = Some(r?);
                    Ok(())
                });
        }
        if self.state.wait && !self.state.go {
            return Command::wait();
        }
        if self.state.weight > 30 {
            return Command::fail_with(ShipError::TooHeavy(self.state.weight));
        }
        self.state.label = Some(format!("{}: {} kg", self.state.name, self.state.weight));
        Command::finish()
    }
}

/// A parent: ships its parcels as children, `parallel` at a time (one parcel: with
/// `Command::child`), and records how each ended; `give_up` fails it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Order {
    id: String,
    parcels: Vec<Parcel>,
    detached: Vec<bool>,
    parallel: usize,
    give_up: bool,
    ends: Vec<(usize, String)>,
    labels: Vec<String>,
    errors: Vec<ShipError>,
    refused: Option<String>,
    done: bool,
}

fn order(id: &str, parcels: Vec<Parcel>) -> Order {
    Order {
        id: id.into(),
        detached: vec![false; parcels.len()],
        parcels,
        parallel: 8,
        ..Order::default()
    }
}

#[flow]
pub struct Shop {
    #[link]
    state: Order,
}

fn ended_name(e: &Ended) -> String {
    match e {
        Ended::Finished => "finished".into(),
        Ended::Failed { reason, .. } => format!("failed: {reason}"),
        Ended::Cancelled { reason } => format!("cancelled: {reason}"),
    }
}

#[allow(clippy::unnecessary_wraps)] // a branch continuation's signature
fn note(
    f: &mut Shop,
    i: usize,
    child: Result<flowwire::Child<Parcel>, DriveError<ChildError>>,
) -> Result<(), Failure> {
    match child {
        Ok(child) => {
            f.state.ends.push((i, ended_name(&child.ended)));
            f.state.errors.extend(child.ended.error::<ShipError>());
            f.state.labels.extend(child.state.label);
        }
        Err(e) => f.state.refused = Some(e.to_string()),
    }
    Ok(())
}

#[flow]
impl Shop {
    #[impulse]
    fn give_up(&mut self) {
        self.state.give_up = true;
    }

    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.give_up {
            return Command::fail("the customer gave up");
        }
        if self.state.done {
            return Command::finish();
        }
        let id = self.state.id.clone();
        if let [one] = &self.state.parcels[..] {
            return Command::child::<Ship>(format!("{id}-0"), one.clone()).then(|f, child| {
                note(f, 0, child)?;
                f.state.done = true;
                Ok(())
            });
        }
        let children = self.state.parcels.iter().enumerate().map(|(i, p)| {
            let child = ChildStart::<Ship>::new(format!("{id}-{i}"), p.clone());
            if self.state.detached[i] {
                child.detached()
            } else {
                child
            }
        });
        Command::fan_out(children)
            .parallel(self.state.parallel)
            .all(note, |f| {
                f.state.done = true;
                Ok(())
            })
    }
}

async fn engine(yard: &Yard) -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<Shop>()
        .flow::<Ship>()
        .driver(yard.clone())
        .start()
        .await
        .unwrap()
}

/// Waits until child `id` exists and has packed its parcel (it then waits for `go`).
async fn until_waiting(engine: &Engine, id: &str) -> ShipHandle {
    for _ in 0..2_000 {
        if let Ok(h) = engine.handle::<Ship>(id).await
            && h.state().await.unwrap().packed.is_some()
        {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("child {id} never came to wait");
}

async fn finished(h: &ShopHandle) -> Ended {
    tokio::time::timeout(Duration::from_secs(20), h.finished())
        .await
        .expect("the parent ends")
        .unwrap()
}

/// How many steps of an instance's history started it.
async fn starts(engine: &Engine, id: &str) -> usize {
    let page = engine.history::<Ship>(id, 0, 100).await.unwrap();
    page.steps
        .iter()
        .filter(|s| matches!(s.input, StepInput::Start | StepInput::StartWith { .. }))
        .count()
}

#[tokio::test]
async fn a_parent_gets_its_childs_end_and_last_state() {
    let yard = Yard::default();
    let engine = engine(&yard).await;
    let h = engine
        .start::<Shop>("o1", order("o1", vec![parcel("books", 12, false)]))
        .await
        .unwrap();
    assert_eq!(finished(&h).await, Ended::Finished);
    let s = h.state().await.unwrap();
    assert_eq!(s.ends, vec![(0, "finished".to_string())]);
    assert_eq!(s.labels, vec!["books: 12 kg".to_string()]);
    let child = engine.handle::<Ship>("o1-0").await.unwrap();
    assert_eq!(child.finished().await.unwrap(), Ended::Finished);
    assert_eq!(yard.log(), vec!["pack(books)".to_string()]);
}

#[tokio::test]
async fn a_childs_typed_failure_reaches_its_parent() {
    let yard = Yard::default();
    let engine = engine(&yard).await;
    let h = engine
        .start::<Shop>("o2", order("o2", vec![parcel("piano", 200, false)]))
        .await
        .unwrap();
    assert_eq!(finished(&h).await, Ended::Finished);
    let s = h.state().await.unwrap();
    assert_eq!(s.errors, vec![ShipError::TooHeavy(200)]);
    assert_eq!(
        s.ends,
        vec![(0, "failed: a parcel of 200 kg is too heavy".to_string())]
    );
    // The child ran its own compensation before it ended.
    assert_eq!(yard.log(), vec!["pack(piano)", "unpack(5)"]);
}

#[tokio::test]
async fn a_child_cancelled_on_its_own_ends_its_parents_wait_as_cancelled() {
    let yard = Yard::default();
    let engine = engine(&yard).await;
    let h = engine
        .start::<Shop>("o3", order("o3", vec![parcel("lamp", 3, true)]))
        .await
        .unwrap();
    until_waiting(&engine, "o3-0").await;
    engine
        .cancel::<Ship>("o3-0", "the lamp broke")
        .await
        .unwrap();
    assert_eq!(finished(&h).await, Ended::Finished);
    let s = h.state().await.unwrap();
    assert_eq!(s.ends, vec![(0, "cancelled: the lamp broke".to_string())]);
}

#[tokio::test]
async fn a_parent_attaches_to_a_child_that_exists_instead_of_starting_another() {
    let yard = Yard::default();
    let engine = engine(&yard).await;
    // Started before the parent, with another state.
    let early = engine
        .start::<Ship>("o4-0", parcel("early", 7, true))
        .await
        .unwrap();
    until_waiting(&engine, "o4-0").await;
    let h = engine
        .start::<Shop>("o4", order("o4", vec![parcel("late", 9, false)]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    early.go().await.unwrap();
    assert_eq!(finished(&h).await, Ended::Finished);
    assert_eq!(h.state().await.unwrap().labels, vec!["early: 7 kg"]);
    assert_eq!(starts(&engine, "o4-0").await, 1);
    assert_eq!(yard.log(), vec!["pack(early)"]);
}

#[tokio::test]
async fn a_fan_out_of_children_runs_at_most_parallel_at_once_and_joins_them_all() {
    let yard = Yard::default();
    let engine = engine(&yard).await;
    let mut o = order(
        "o5",
        (0..5).map(|i| parcel(&format!("p{i}"), 1, true)).collect(),
    );
    o.parallel = 2;
    let h = engine.start::<Shop>("o5", o).await.unwrap();
    for i in 0..5 {
        let child = until_waiting(&engine, &format!("o5-{i}")).await;
        // At most two children run: the next one is not started before one ends.
        let next = i + 2;
        if next < 5 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(
                matches!(
                    engine.handle::<Ship>(format!("o5-{next}")).await,
                    Err(Error::NotFound { .. })
                ),
                "child {next} started while children {i} and {} run",
                i + 1
            );
        }
        child.go().await.unwrap();
    }
    assert_eq!(finished(&h).await, Ended::Finished);
    let s = h.state().await.unwrap();
    let mut ends: Vec<usize> = s.ends.iter().map(|(i, _)| *i).collect();
    ends.sort_unstable();
    assert_eq!(ends, vec![0, 1, 2, 3, 4]);
    assert!(s.ends.iter().all(|(_, e)| e == "finished"));
}

#[tokio::test]
async fn cancelling_a_parent_cancels_its_children_first_but_not_a_detached_one() {
    let yard = Yard::default();
    let engine = engine(&yard).await;
    let mut o = order(
        "o6",
        (0..3).map(|i| parcel(&format!("p{i}"), 1, true)).collect(),
    );
    o.detached[2] = true;
    let h = engine.start::<Shop>("o6", o).await.unwrap();
    for i in 0..3 {
        until_waiting(&engine, &format!("o6-{i}")).await;
    }
    h.cancel("the order was withdrawn").await.unwrap();
    assert_eq!(
        finished(&h).await,
        Ended::Cancelled {
            reason: "the order was withdrawn".into()
        }
    );
    for i in 0..2 {
        let child = engine.handle::<Ship>(format!("o6-{i}")).await.unwrap();
        let Ended::Cancelled { reason } = child.finished().await.unwrap() else {
            panic!("child {i} was not cancelled");
        };
        assert!(
            reason.contains("Shop/o6") && reason.contains("the order was withdrawn"),
            "{reason}"
        );
    }
    // Each cancelled child ran its own compensation.
    let log = yard.log();
    assert!(log.contains(&"unpack(2)".to_string()), "{log:?}");
    assert_eq!(log.iter().filter(|l| l.starts_with("unpack")).count(), 2);
    // The detached child runs on, and finishes when told.
    let detached = engine.handle::<Ship>("o6-2").await.unwrap();
    detached.go().await.unwrap();
    assert_eq!(detached.finished().await.unwrap(), Ended::Finished);
    // The parent's cancellation was applied once: cancelling again writes nothing.
    let before = engine
        .history::<Shop>("o6", 0, 100)
        .await
        .unwrap()
        .steps
        .len();
    h.cancel("again").await.unwrap();
    let after = engine
        .history::<Shop>("o6", 0, 100)
        .await
        .unwrap()
        .steps
        .len();
    assert_eq!(before, after);
}

#[tokio::test]
async fn a_parent_that_fails_cancels_its_running_child() {
    let yard = Yard::default();
    let engine = engine(&yard).await;
    let h = engine
        .start::<Shop>("o7", order("o7", vec![parcel("vase", 2, true)]))
        .await
        .unwrap();
    until_waiting(&engine, "o7-0").await;
    h.give_up().await.unwrap();
    let Ended::Failed { reason, .. } = finished(&h).await else {
        panic!("the parent did not fail");
    };
    assert_eq!(reason, "the customer gave up");
    let child = engine.handle::<Ship>("o7-0").await.unwrap();
    let Ended::Cancelled { reason } = child.finished().await.unwrap() else {
        panic!("the child was not cancelled");
    };
    assert!(
        reason.contains("it failed: the customer gave up"),
        "{reason}"
    );
    assert_eq!(yard.log(), vec!["pack(vase)", "unpack(4)"]);
}

#[tokio::test]
async fn a_child_flow_the_engine_does_not_run_is_a_typed_error_for_the_parent() {
    let engine = Engine::builder()
        .in_memory()
        .flow::<Shop>()
        .start()
        .await
        .unwrap();
    let h = engine
        .start::<Shop>("o8", order("o8", vec![parcel("x", 1, false)]))
        .await
        .unwrap();
    assert_eq!(finished(&h).await, Ended::Finished);
    let refused = h.state().await.unwrap().refused.unwrap();
    assert!(
        refused.contains("flow `Ship` is not registered on this engine"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_parent_and_its_child_survive_a_restart_and_the_child_starts_once() {
    let dir = tempfile::tempdir().unwrap();
    let yard = Yard::default();
    let open = || {
        Engine::builder()
            .data_dir(dir.path())
            .flow::<Shop>()
            .flow::<Ship>()
            .driver(yard.clone())
            .start()
    };
    let engine = open().await.unwrap();
    engine
        .start::<Shop>("o9", order("o9", vec![parcel("desk", 20, true)]))
        .await
        .unwrap();
    until_waiting(&engine, "o9-0").await;
    engine.shutdown().await;
    drop(engine);

    let engine = open().await.unwrap();
    let child = engine.handle::<Ship>("o9-0").await.unwrap();
    child.go().await.unwrap();
    let h = engine.handle::<Shop>("o9").await.unwrap();
    assert_eq!(finished(&h).await, Ended::Finished);
    assert_eq!(h.state().await.unwrap().labels, vec!["desk: 20 kg"]);
    assert_eq!(starts(&engine, "o9-0").await, 1);
    // The parent's call was sent again after the restart: it attached to the child.
    let page = engine.history::<Shop>("o9", 0, 100).await.unwrap();
    assert!(
        page.steps
            .iter()
            .any(|s| matches!(s.input, StepInput::Redeliver { .. })),
        "{:?}",
        page.steps
    );
    engine.shutdown().await;
}

#[test]
fn the_backfill_example_copies_its_partitions_and_cancels_its_children() {
    backfill::main().unwrap();
}
