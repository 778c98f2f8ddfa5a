//! The client side of the multi-process tests on tickets (`tests/scale_kill.rs`,
//! `tests/nemesis.rs`): open a ticket through failures, and check a finished one.

#![allow(dead_code)]

use std::time::Duration;

use flowwire::storage::store::RedisStore;
use flowwire::storage::{InstanceKey, StepInput};
use flowwire::{Ended, Engine, Error};

use super::scale_flows::{Ticket, TicketState};

/// Starts a ticket and confirms it, trying again through kills and the Redis restart (the
/// same ids each time: a start applies once, the confirmation too).
pub async fn open(client: Engine, id: String) {
    for attempt in 0.. {
        let state = TicketState {
            id: id.clone(),
            ..TicketState::default()
        };
        match client.start::<Ticket>(id.as_str(), state).await {
            Ok(_) | Err(Error::AlreadyExists { .. }) => break,
            Err(e) => {
                assert!(attempt < 600, "{id}: not started: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for attempt in 0.. {
        let sent = match client.handle::<Ticket>(id.as_str()).await {
            Ok(h) => h.confirm().id(format!("{id}/confirm")).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) | Err(Error::ImpulseAlreadyApplied { .. }) => break,
            Err(e) => {
                assert!(attempt < 600, "{id}: not confirmed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Tries a read again while it fails for a transient reason (bounded).
pub async fn retry<T>(mut read: impl AsyncFnMut() -> flowwire::Result<T>) -> T {
    for _ in 0..50 {
        match read().await {
            Ok(v) => return v,
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("a read kept failing");
}

/// Checks a ticket as every multi-process test requires it: it finished; its confirmation
/// applied once (its state counts applications) and its history holds one impulse step
/// and one outcome step per call; no step was written twice and no write carried a lower
/// fencing token than the one before it (the store's write audit).
pub async fn check(client: &Engine, store: &RedisStore, id: &str) {
    // The first request on a connection to the restarted Redis may fail once.
    let h = retry(async || client.handle::<Ticket>(id).await).await;
    let Ok(ended) = tokio::time::timeout(Duration::from_mins(2), h.finished()).await else {
        // Say where it stopped: the history it has, and what the store holds for it.
        let history = client.history::<Ticket>(id, 0, 100).await;
        let writes = store.writes(&InstanceKey::new("Ticket", id)).await;
        panic!("{id} did not finish\nhistory: {history:?}\nwrites: {writes:?}");
    };
    let ended = ended.unwrap();
    assert_eq!(ended, Ended::Finished, "{id}");
    let state = retry(async || h.state().await).await;
    assert_eq!(state.confirmed, 1, "{id}: the confirmation applied once");
    assert!(state.charged, "{id}");
    let history = retry(async || client.history::<Ticket>(id, 0, 100).await).await;
    let impulses = history
        .steps
        .iter()
        .filter(|s| matches!(s.input, StepInput::Impulse { .. }))
        .count();
    assert_eq!(impulses, 1, "{id}: {history:?}");
    let mut outcomes: Vec<u64> = history
        .steps
        .iter()
        .filter_map(|s| match s.input {
            StepInput::Outcome { call_seq, .. } => Some(call_seq),
            _ => None,
        })
        .collect();
    let all = outcomes.len();
    outcomes.dedup();
    assert_eq!(all, 2, "{id}: two calls, two outcomes: {history:?}");
    assert_eq!(outcomes.len(), 2, "{id}: an outcome applied twice");
    let writes = store.writes(&InstanceKey::new("Ticket", id)).await.unwrap();
    for pair in writes.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "{id}: a step written twice: {writes:?}"
        );
        assert!(
            pair[0].1 <= pair[1].1,
            "{id}: a token went back: {writes:?}"
        );
    }
}
