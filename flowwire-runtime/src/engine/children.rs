//! The engine's own worker for child flows: runners hand it the calls on the child link
//! ([`CHILD_LINK`](crate::child::CHILD_LINK)) as they hand driver calls to a pool, and it
//! answers them the same way, with an outcome to the parent's runner.
//!
//! * A start starts the child by its id, or attaches to it when the id exists (after a
//!   restart, the child the parent started before), then waits for its end and answers
//!   with how it ended and its last state.
//! * A cancel (a parent's compensation for a child still running) cancels the child, and
//!   answers once the cancellation is committed (or the child had ended, or never
//!   started).
//!
//! Nothing here is durable, and nothing needs to be: the call is in the parent's record,
//! and a restart sends it again. Errors a retry may cure (a timeout, a store outage) are
//! retried with a backoff; a child parked for an operator is waited for; errors that
//! cannot be cured are the call's answer ([`ChildError`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::child::{Child, ChildError, ChildOp, ChildReply};
use crate::engine::job::{Job, OutcomeMsg};
use crate::error::{Error, Result};
use crate::flow::Flow;

use super::{Engine, Inner};

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where runners send their child calls. Cheap to clone.
#[derive(Clone)]
pub(crate) struct ChildPort {
    tx: mpsc::UnboundedSender<Job>,
}

impl ChildPort {
    /// A port and the jobs it receives, for [`serve`].
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Hands a child call to the service (dropped when the engine is stopping: the call
    /// stays in the parent's record and is sent again after the restart).
    pub(crate) fn send(&self, job: Job) {
        let _ = self.tx.send(job);
    }
}

/// One flow's operations as a child, with its type erased: registered for every flow, so
/// that a parent's call names its child's flow by name only.
#[derive(Clone, Copy)]
pub(crate) struct Kin {
    /// Starts instance `id` from a state written by the given version, or finds it.
    start: fn(Engine, Arc<str>, u32, Bytes) -> BoxFut<Result<()>>,
    /// Waits for instance `id`'s end; answers with the encoded [`ChildReply`].
    end: fn(Engine, Arc<str>) -> BoxFut<Result<Bytes>>,
    /// Cancels instance `id`.
    cancel: fn(Engine, Arc<str>, String) -> BoxFut<Result<()>>,
}

impl Kin {
    /// Flow `G`'s operations.
    pub(crate) fn of<G: Flow>() -> Kin {
        Kin {
            start: |e, id, v, s| Box::pin(start::<G>(e, id, v, s)),
            end: |e, id| Box::pin(end::<G>(e, id)),
            cancel: |e, id, r| Box::pin(cancel::<G>(e, id, r)),
        }
    }
}

async fn start<G: Flow>(engine: Engine, id: Arc<str>, written: u32, state: Bytes) -> Result<()> {
    match engine.handle::<G>(id.clone()).await {
        Ok(_) => return Ok(()),
        Err(Error::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    let limit = engine.inner.limits.decode_limit;
    let state = crate::core::decode_written::<G>(&state, written, limit)
        .map_err(|e| super::state_read_error::<G>(&id, e))?;
    match engine.start::<G>(id, state).await {
        Ok(_) | Err(Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn end<G: Flow>(engine: Engine, id: Arc<str>) -> Result<Bytes> {
    engine.handle::<G>(id.clone()).await?;
    let handle = engine.raw_handle::<G>(id.clone())?;
    // The wait may last months: it must not keep the engine alive.
    drop(engine);
    let ended = handle.finished().await?;
    let state = handle.state().await?;
    let reply: ChildReply<G> = Ok(Child {
        id: id.to_string(),
        ended,
        state,
    });
    encode(&reply)
}

async fn cancel<G: Flow>(engine: Engine, id: Arc<str>, reason: String) -> Result<()> {
    match engine.cancel::<G>(id, reason).await {
        // Ended before, or never started: nothing runs that the parent would leave behind.
        Ok(()) | Err(Error::Ended { .. } | Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Bytes> {
    let mut out = Vec::new();
    flowwire_storage::codec::encode_raw(value, &mut out).map_err(|source| Error::Codec {
        flow: "child",
        id: String::new(),
        what: "a child's reply",
        source,
    })?;
    Ok(Bytes::from(out))
}

/// What to do after an operation on a child failed.
enum Next {
    /// Try again after a pause (a timeout, a store outage, a parked child).
    Again,
    /// The engine is stopping: drop the call (it is sent again after the restart).
    Stop,
    /// Answer the call with this error.
    Answer(ChildError),
}

fn next(flow: &str, id: &str, e: &Error) -> Next {
    match e {
        Error::Shutdown => Next::Stop,
        Error::UnknownFlow { .. } => Next::Answer(ChildError::NotRegistered {
            flow: flow.to_string(),
        }),
        Error::NewerVersion { .. } | Error::NoMigration { .. } | Error::Codec { .. } => {
            Next::Answer(ChildError::Unreadable {
                flow: flow.to_string(),
                id: id.to_string(),
                reason: e.to_string(),
            })
        }
        _ => Next::Again,
    }
}

/// The pause before attempt `n + 1` of an operation on a child: 100 ms doubling to 30 s.
fn pause(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(9)).min(30_000))
}

/// Serves the child calls of an engine's runners until the engine stops. `kin` is every
/// registered flow's operations, by name.
pub(super) fn serve(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    engine: Weak<Inner>,
    kin: HashMap<&'static str, Kin>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // The task following each child, by (flow, id): a cancel waits for the start of
        // the same child to be sent or dropped, so that a cancel never overtakes it.
        let mut following = Followers(HashMap::new());
        let mut following_cap = 64;
        let following = &mut following.0;
        while let Some(job) = jobs.recv().await {
            let op = match ChildOp::decode(&job.call, usize::MAX) {
                Ok(op) => op,
                Err(e) => {
                    tracing::error!(flow = job.flow, id = %job.id, step = job.seq, error = %e, "a child call does not decode");
                    continue;
                }
            };
            if following.len() >= following_cap {
                following.retain(|_, t| !t.is_finished());
                following_cap = (following.len() * 2).max(64);
            }
            match op {
                ChildOp::Start {
                    flow,
                    version,
                    id,
                    state,
                    ..
                } => {
                    let key = (flow.clone(), id.clone());
                    let task = tokio::spawn(follow(
                        job,
                        kin.get(flow.as_str()).copied(),
                        engine.clone(),
                        flow,
                        id.into(),
                        version,
                        state,
                    ));
                    if let Some(older) = following.insert(key, task) {
                        // The same child's start, sent again: one follower answers.
                        older.abort();
                    }
                }
                ChildOp::Cancel { flow, id, reason } => {
                    let before = following.remove(&(flow.clone(), id.clone()));
                    tokio::spawn(stop(
                        job,
                        kin.get(flow.as_str()).copied(),
                        engine.clone(),
                        before,
                        flow,
                        id.into(),
                        reason,
                    ));
                }
            }
        }
    })
}

/// The followers of children, by (flow, id); each is aborted when the service stops (at
/// the engine's shutdown).
struct Followers(HashMap<(String, String), JoinHandle<()>>);

impl Drop for Followers {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

fn answer(job: &Job, result: Bytes) {
    let _ = job.reply.send(OutcomeMsg {
        id: job.id.clone(),
        seq: job.seq,
        branch: job.branch,
        result: Ok(result),
        retry_ms: None,
        receipt: None,
        back: None,
    });
}

/// Answers a call with `error`. An `Err` encodes the same whatever the `Ok` type (postcard
/// writes the variant, then the error), so `T` may be any type.
fn refuse<T: serde::Serialize>(job: &Job, error: ChildError) {
    let reply: std::result::Result<T, ChildError> = Err(error);
    match encode(&reply) {
        Ok(bytes) => answer(job, bytes),
        Err(e) => tracing::error!(error = %e, "a child's refusal could not be encoded"),
    }
}

/// Starts (or finds) a child, waits for its end, and answers the parent's call.
async fn follow(
    job: Job,
    kin: Option<Kin>,
    engine: Weak<Inner>,
    flow: String,
    id: Arc<str>,
    version: u32,
    state: Bytes,
) {
    let Some(kin) = kin else {
        return refuse::<()>(&job, ChildError::NotRegistered { flow });
    };
    let mut failures = 0u32;
    loop {
        let Some(inner) = engine.upgrade() else {
            return;
        };
        match (kin.start)(Engine { inner }, id.clone(), version, state.clone()).await {
            Ok(()) => break,
            Err(e) => match next(&flow, &id, &e) {
                Next::Stop => return,
                Next::Answer(refusal) => return refuse::<()>(&job, refusal),
                Next::Again => {
                    tracing::warn!(flow = job.flow, id = %job.id, child = %id, error = %e, "child not started yet; trying again");
                    tokio::time::sleep(pause(failures)).await;
                    failures = failures.saturating_add(1);
                }
            },
        }
    }
    failures = 0;
    loop {
        let Some(inner) = engine.upgrade() else {
            return;
        };
        match (kin.end)(Engine { inner }, id.clone()).await {
            Ok(reply) => return answer(&job, reply),
            Err(e) => match next(&flow, &id, &e) {
                Next::Stop => return,
                Next::Answer(refusal) => return refuse::<()>(&job, refusal),
                Next::Again => {
                    // A parked child is waited for: an operator resumes or rewinds it.
                    tracing::debug!(flow = job.flow, id = %job.id, child = %id, error = %e, "child not ended; waiting again");
                    tokio::time::sleep(pause(failures)).await;
                    failures = failures.saturating_add(1);
                }
            },
        }
    }
}

/// Cancels a child (after its start, if one is being sent, was sent or dropped) and
/// answers the parent's compensation.
async fn stop(
    job: Job,
    kin: Option<Kin>,
    engine: Weak<Inner>,
    before: Option<JoinHandle<()>>,
    flow: String,
    id: Arc<str>,
    reason: String,
) {
    if let Some(before) = before {
        before.abort();
        let _ = before.await;
    }
    let Some(kin) = kin else {
        return refuse::<()>(&job, ChildError::NotRegistered { flow });
    };
    let mut failures = 0u32;
    loop {
        let Some(inner) = engine.upgrade() else {
            return;
        };
        match (kin.cancel)(Engine { inner }, id.clone(), reason.clone()).await {
            Ok(()) => {
                return match encode(&Ok::<(), ChildError>(())) {
                    Ok(bytes) => answer(&job, bytes),
                    Err(e) => tracing::error!(error = %e, "a child's cancel could not be answered"),
                };
            }
            Err(Error::Quarantined { reason: why, .. }) => {
                return refuse::<()>(
                    &job,
                    ChildError::Parked {
                        flow,
                        id: id.to_string(),
                        reason: why,
                    },
                );
            }
            Err(e) => match next(&flow, &id, &e) {
                Next::Stop => return,
                Next::Answer(refusal) => return refuse::<()>(&job, refusal),
                Next::Again => {
                    tracing::warn!(flow = job.flow, id = %job.id, child = %id, error = %e, "child not cancelled yet; trying again");
                    tokio::time::sleep(pause(failures)).await;
                    failures = failures.saturating_add(1);
                }
            },
        }
    }
}
