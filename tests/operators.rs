#![allow(missing_docs)] // test-local flows
//! The operator's API, through the public API: parked instances are listed with why they
//! are parked; an operator patches a parked instance's state with a typed closure (a patch
//! that panics writes nothing), rewinds a parked or failed instance to a step of its history
//! (a step outside it is a typed error), and resumes it. Each operation is a step in the
//! instance's history and an event. Resuming a parked call is in tests/sagas.rs (a failed
//! compensation) and tests/kill.rs (a call parked by its `ambiguous = "park"` policy).
//! Bad input: an instance is never reached through another flow type, and an impulse
//! payload that does not decode is a typed error that changes nothing.

use flowwire::prelude::*;
use flowwire::storage::StepInput;
use flowwire::{Error, EventKind};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    n: u32,
    target: u32,
    poisoned: bool,
}

#[flow]
pub struct Counter {
    #[link]
    state: Tally,
}

#[flow]
impl Counter {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        assert!(!self.state.poisoned, "the tally is poisoned");
        if self.state.n > self.state.target {
            return Command::fail("counted past the target");
        }
        if self.state.n == self.state.target {
            return Command::finish();
        }
        Command::wait()
    }

    #[impulse]
    fn add(&mut self, k: u32) {
        self.state.n += k;
    }

    #[impulse]
    fn poison(&mut self) {
        self.state.poisoned = true;
    }
}

async fn engine() -> Engine {
    Engine::builder()
        .in_memory()
        .flow::<Counter>()
        .start()
        .await
        .unwrap()
}

fn tally(target: u32) -> Tally {
    Tally {
        target,
        ..Tally::default()
    }
}

/// Starts an instance, adds 3 (step 2), poisons it (step 3: the wire panics, it is parked).
async fn parked(engine: &Engine, id: &str) -> CounterHandle {
    let h = engine.start::<Counter>(id, tally(10)).await.unwrap();
    h.add(3).await.unwrap();
    h.poison().await.unwrap();
    h
}

async fn steps(engine: &Engine, id: &str) -> usize {
    engine
        .history::<Counter>(id, 0, 100)
        .await
        .unwrap()
        .steps
        .len()
}

#[tokio::test]
async fn parked_instances_are_listed_with_their_reason_in_pages() {
    let engine = engine().await;
    for id in ["c", "a", "b"] {
        parked(&engine, id).await;
    }
    engine.start::<Counter>("live", tally(5)).await.unwrap();

    let first = engine.parked::<Counter>(None, 2).await.unwrap();
    let ids: Vec<&str> = first.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "in id order, at most the limit");
    let rest = engine.parked::<Counter>(Some("b"), 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    let p = &rest[0];
    assert_eq!((p.id.as_str(), p.step, p.call.as_deref()), ("c", 3, None));
    assert!(
        p.reason
            .contains("the wire panicked: the tally is poisoned"),
        "{}",
        p.reason
    );

    let one = engine.parked_instance::<Counter>("a").await.unwrap();
    assert_eq!(one.map(|p| p.step), Some(3));
    assert_eq!(
        engine.parked_instance::<Counter>("live").await.unwrap(),
        None,
        "a live instance is not parked"
    );
    assert!(matches!(
        engine.parked_instance::<Counter>("nobody").await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_patched_instance_stays_parked_until_resumed_then_runs_on() {
    let engine = engine().await;
    let mut events = engine.events();
    let h = parked(&engine, "p").await;

    let step = engine
        .patch::<Counter>("p", |s| s.poisoned = false)
        .await
        .unwrap();
    assert_eq!(step, 4, "the patch is a step of its own");
    assert_eq!(
        h.state().await.unwrap(),
        Tally {
            n: 3,
            target: 10,
            poisoned: false
        }
    );
    assert!(
        engine
            .parked_instance::<Counter>("p")
            .await
            .unwrap()
            .is_some(),
        "a patched instance waits for the operator to resume it"
    );

    assert_eq!(engine.resume::<Counter>("p").await.unwrap(), 5);
    h.add(7).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);

    let history = engine.history::<Counter>("p", 4, 2).await.unwrap();
    let inputs: Vec<_> = history.steps.iter().map(|s| s.input.clone()).collect();
    assert_eq!(inputs, [StepInput::Patch, StepInput::Resume]);
    let mut kinds = Vec::new();
    while let Some(Ok(e)) = events.try_next() {
        kinds.push(e.kind);
    }
    let patched = kinds.iter().position(|k| *k == EventKind::Patched);
    let resumed = kinds.iter().position(|k| *k == EventKind::Resumed);
    assert!(
        patched.is_some() && patched < resumed,
        "patched, then resumed: {kinds:?}"
    );
}

#[tokio::test]
async fn a_patch_that_panics_writes_nothing() {
    let engine = engine().await;
    let h = parked(&engine, "q").await;
    let before = steps(&engine, "q").await;
    let r = engine
        .patch::<Counter>("q", |s| {
            s.n = 99;
            panic!("a bad patch");
        })
        .await;
    let Err(Error::PatchPanicked { message, .. }) = r else {
        panic!("a panicking patch is a typed error: {r:?}")
    };
    assert_eq!(message, "a bad patch");
    assert_eq!(steps(&engine, "q").await, before, "no step was written");
    assert_eq!(h.state().await.unwrap().n, 3, "the state is unchanged");
}

#[tokio::test]
async fn a_rewound_instance_runs_again_from_the_state_of_that_step() {
    let engine = engine().await;
    let h = parked(&engine, "r").await;

    let outside = engine.rewind::<Counter>("r", 42).await;
    let Err(Error::NotInHistory { step, kept, .. }) = outside else {
        panic!("a step outside history is a typed error: {outside:?}")
    };
    assert_eq!((step, kept.as_str()), (42, "steps 1 to 3"));

    engine.rewind::<Counter>("r", 2).await.unwrap();
    assert_eq!(
        h.state().await.unwrap(),
        Tally {
            n: 3,
            target: 10,
            poisoned: false
        },
        "the state right after step 2 (before the poison)"
    );
    let p = engine
        .parked_instance::<Counter>("r")
        .await
        .unwrap()
        .unwrap();
    assert!(p.reason.contains("rewound to step 2"), "{}", p.reason);

    engine.resume::<Counter>("r").await.unwrap();
    h.add(7).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
}

#[tokio::test]
async fn a_failed_instance_can_be_rewound_and_resumed() {
    let engine = engine().await;
    let h = engine.start::<Counter>("f", tally(5)).await.unwrap();
    h.add(9).await.unwrap();
    assert!(matches!(h.finished().await.unwrap(), Ended::Failed { .. }));
    engine.rewind::<Counter>("f", 1).await.unwrap();
    engine.resume::<Counter>("f").await.unwrap();
    h.add(5).await.unwrap();
    assert_eq!(h.finished().await.unwrap(), Ended::Finished);
}

#[tokio::test]
async fn operations_on_instances_that_are_not_parked_are_refused() {
    let engine = engine().await;
    let h = engine.start::<Counter>("w", tally(5)).await.unwrap();
    let r = engine.resume::<Counter>("w").await;
    assert!(
        matches!(
            &r,
            Err(Error::NotParked {
                op: "resume",
                status: "waiting",
                ..
            })
        ),
        "{r:?}"
    );
    let r = engine.patch::<Counter>("w", |s| s.n = 1).await;
    assert!(
        matches!(&r, Err(Error::NotParked { op: "patch", .. })),
        "{r:?}"
    );
    h.add(5).await.unwrap();
    h.finished().await.unwrap();
    let r = engine.rewind::<Counter>("w", 1).await;
    assert!(
        matches!(
            &r,
            Err(Error::NotParked {
                op: "rewind",
                status: "finished",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(matches!(
        engine.resume::<Counter>("nobody").await,
        Err(Error::NotFound { .. })
    ));
}

/// A second flow, registered on no engine here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Other {
    n: u32,
}

#[flow]
pub struct Stranger {
    #[link]
    state: Other,
}

#[flow]
impl Stranger {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.n > 0 {
            Command::finish()
        } else {
            Command::wait()
        }
    }
}

#[tokio::test]
async fn an_instance_is_not_reached_through_another_flow_type() {
    let engine = engine().await;
    engine
        .start::<Counter>("shared-id", tally(5))
        .await
        .unwrap();
    let r = engine.handle::<Stranger>("shared-id").await;
    assert!(
        matches!(&r, Err(Error::UnknownFlow { flow: "Stranger" })),
        "a flow the engine does not run: {:?}",
        r.map(|_| ())
    );

    let both = Engine::builder()
        .in_memory()
        .flow::<Counter>()
        .flow::<Stranger>()
        .start()
        .await
        .unwrap();
    both.start::<Counter>("shared-id", tally(5)).await.unwrap();
    let r = both.handle::<Stranger>("shared-id").await;
    assert!(
        matches!(
            &r,
            Err(Error::NotFound {
                flow: "Stranger",
                ..
            })
        ),
        "ids are per flow: {:?}",
        r.map(|_| ())
    );
}

#[tokio::test]
async fn an_impulse_payload_that_does_not_decode_is_refused_and_changes_nothing() {
    let engine = engine().await;
    let h = engine.start::<Counter>("j", tally(5)).await.unwrap();
    for bad in [
        "{not json",
        r#"{"Subtract": {"k": 1}}"#,
        r#"{"Add": {"k": "three"}}"#,
        r#"{"Add": {}}"#,
    ] {
        let r = h.impulse_json(bad);
        assert!(
            matches!(
                &r,
                Err(Error::BadImpulse {
                    flow: "Counter",
                    ..
                })
            ),
            "{bad}: {:?}",
            r.map(|_| ())
        );
    }
    h.impulse_json(r#"{"Add": {"k": 2}}"#)
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        h.state().await.unwrap().n,
        2,
        "only the good payload applied"
    );
    assert_eq!(steps(&engine, "j").await, 2);
}
