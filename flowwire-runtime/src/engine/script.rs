//! Scripted drivers, for tests (feature `testing`): a driver whose replies the test gives,
//! in order, per method; calls that come before their reply wait for it. Every call is
//! recorded, decoded, for the test to check.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use serde::Serialize;

use super::Limits;
use super::job::{Job, OutcomeMsg};
use super::queue::{self, Port};
use crate::driver::{Driver, Fault};

/// What a scripted call answers.
#[derive(Debug, Clone)]
enum Answer {
    /// The method's encoded `Result`; `retry`: an `Err` retried under the call's policy.
    Reply { bytes: Bytes, retry: bool },
    /// The call panics (a runtime fault, retried under the call's policy).
    Panic(String),
}

struct State<D: Driver> {
    /// Answers given before their calls, per method index.
    answers: HashMap<u16, VecDeque<Answer>>,
    /// Calls that came before their answers, per method index.
    waiting: HashMap<u16, VecDeque<Job>>,
    /// Every call, in the order it came.
    calls: Vec<D::Call>,
}

/// A driver played by the test: replies are given per method, in order, and every call is
/// recorded. Register it with [`EngineBuilder::script`](crate::EngineBuilder::script)
/// instead of an implementation. A call whose reply is not given yet waits for it (the
/// test may check the call first, then answer it).
///
/// A reply is the method's `Result`. An `Err` is the driver's error: retried under the
/// call's policy, as the default [`Transient`](crate::Transient) says, unless given with
/// [`Script::reply_permanent`].
///
/// ```
/// use flowwire::prelude::*;
/// use flowwire::testing::Script;
///
/// # #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
/// # #[error("declined")]
/// # pub struct Declined;
/// #[driver]
/// pub trait Payment {
///     async fn charge(&self, cents: u64) -> Result<String, Declined>;
/// }
///
/// let payment = Script::<PaymentProxy>::new();
/// payment.reply("charge", Ok::<String, Declined>("ch-1".into()));
/// let builder = Engine::builder().in_memory().script(payment.clone());
/// // ... start a flow that charges, then:
/// // assert!(matches!(payment.calls()[0], PaymentCall::Charge { cents: 995 }));
/// # drop(builder);
/// ```
pub struct Script<D: Driver> {
    state: Arc<Mutex<State<D>>>,
}

impl<D: Driver> Clone for Script<D> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
        }
    }
}

impl<D: Driver> Default for Script<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: Driver> std::fmt::Debug for Script<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Script<{}>", D::META.name)
    }
}

impl<D: Driver> Script<D> {
    /// A script with no replies yet.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                answers: HashMap::new(),
                waiting: HashMap::new(),
                calls: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<D>> {
        // Every critical section is a push or a pop: a panic cannot leave it half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index of `method`; panics, naming the driver's methods, on a name it has not.
    fn method(method: &str) -> u16 {
        let found = D::META.methods.iter().position(|m| m.name == method);
        let Some(i) = found.and_then(|i| u16::try_from(i).ok()) else {
            let names: Vec<&str> = D::META.methods.iter().map(|m| m.name).collect();
            panic!(
                "the driver `{}` has no method `{method}`; its methods: {names:?}",
                D::META.name
            );
        };
        i
    }

    /// Gives the reply of the next call of `method` (its `Result`): the oldest call waiting
    /// for one gets it, or the next call to come. An `Err` is retried under the call's
    /// policy, as a transient driver error. Panics if the driver has no such method or the
    /// reply does not encode.
    pub fn reply<R: Serialize>(&self, method: &str, reply: R) -> &Self {
        self.answer(method, encoded(method, &reply), true)
    }

    /// Gives the reply of the next call of `method`, an `Err` that is not retried (a
    /// permanent error, as a [`Transient`](crate::Transient) implementation would say).
    pub fn reply_permanent<R: Serialize>(&self, method: &str, reply: R) -> &Self {
        self.answer(method, encoded(method, &reply), false)
    }

    /// Makes the next call of `method` panic with `message`: a runtime fault, retried
    /// under the call's policy.
    pub fn panic(&self, method: &str, message: &str) -> &Self {
        let m = Self::method(method);
        self.deliver(m, Answer::Panic(message.to_string()));
        self
    }

    fn answer(&self, method: &str, bytes: Bytes, retry: bool) -> &Self {
        let m = Self::method(method);
        self.deliver(m, Answer::Reply { bytes, retry });
        self
    }

    fn deliver(&self, method: u16, answer: Answer) {
        let job = {
            let mut state = self.lock();
            match state.waiting.get_mut(&method).and_then(VecDeque::pop_front) {
                Some(job) => job,
                None => {
                    state.answers.entry(method).or_default().push_back(answer);
                    return;
                }
            }
        };
        send(job, answer);
    }

    /// Every call the driver received, in order (a retried call once per attempt).
    pub fn calls(&self) -> Vec<D::Call>
    where
        D::Call: Clone,
    {
        self.lock().calls.clone()
    }

    /// How many calls wait for a reply not given yet.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.values().map(VecDeque::len).sum()
    }

    /// A call came: answered now if its reply was given, otherwise it waits.
    fn take(&self, job: Job, limit: usize) {
        let answer = {
            let mut state = self.lock();
            if let Ok(call) = flowwire_storage::codec::decode_raw::<D::Call>(&job.call, limit) {
                state.calls.push(call);
            }
            match state
                .answers
                .get_mut(&job.method)
                .and_then(VecDeque::pop_front)
            {
                Some(answer) => answer,
                None => {
                    state.waiting.entry(job.method).or_default().push_back(job);
                    return;
                }
            }
        };
        send(job, answer);
    }
}

fn encoded<R: Serialize>(method: &str, reply: &R) -> Bytes {
    let mut out = Vec::new();
    if let Err(e) = flowwire_storage::codec::encode_raw(reply, &mut out) {
        panic!("the scripted reply of `{method}` does not encode: {e}");
    }
    Bytes::from(out)
}

/// Answers a job as its worker would have: a failed attempt the policy retries comes with
/// the wait before the next one.
fn send(job: Job, answer: Answer) {
    let attempt = job.attempt.max(1);
    let (result, failed) = match answer {
        Answer::Reply { bytes, retry } => {
            let failed = !flowwire_storage::codec::reply_is_ok(&bytes) && retry;
            (Ok(bytes), failed)
        }
        Answer::Panic(message) => (
            Err(Fault::Panicked {
                attempts: attempt,
                message,
            }),
            true,
        ),
    };
    let retry_ms = if failed {
        job.policy
            .retry_after(attempt)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    } else {
        None
    };
    let _ = job.reply.send(OutcomeMsg {
        id: job.id,
        seq: job.seq,
        branch: job.branch,
        result,
        retry_ms,
        receipt: job.receipt,
        back: None,
    });
}

/// Spawns the task that hands a scripted driver's calls to its script.
pub(super) fn spawn<D: Driver>(script: Script<D>, limits: &Limits) -> Port {
    let (port, jobs) = queue::channel(limits.driver_queue);
    let limit = limits.decode_limit;
    tokio::spawn(async move {
        while let Some(job) = jobs.recv().await {
            script.take(job, limit);
        }
    });
    port
}
