//! [`Handle`]: a client's grip on one instance.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::Rope;
use tokio::sync::{mpsc, oneshot};

pub use crate::ended::Ended;
use crate::engine::msg::Msg;
use crate::error::{Error, Result};
use crate::impulse::Impulses;

/// A handle to one instance of flow `F`: send impulses, read probes, wait for the end.
///
/// Get one from `Engine::start` or `Engine::handle`; users normally hold the flow's
/// generated handle (`OrderCircuitHandle`), which has a typed method per impulse and probe
/// and dereferences to this one. Cloning is cheap.
pub struct Handle<F: Impulses> {
    id: Arc<str>,
    tx: mpsc::Sender<Msg<F>>,
    timeout: Duration,
    /// The engine's decode limit (largest state decoded).
    limit: usize,
    /// Reads of the instance once it has ended, straight from the store (an embedded
    /// engine's handles): `None` where the runner answers everything.
    direct: Option<Direct<F>>,
}

/// A handle's way to the store for an instance that has ended or is parked, and whether
/// it is known to have (shared by the handle's clones).
struct Direct<F: Impulses> {
    reads: Arc<dyn SettledReads<F>>,
    settled: Arc<AtomicBool>,
    /// The final state of an instance this handle saw finish or be cancelled (an end no
    /// operator undoes), as the runner gave it with the end.
    last: Arc<std::sync::Mutex<Option<Rope>>>,
}

impl<F: Impulses> Clone for Direct<F> {
    fn clone(&self) -> Self {
        Self {
            reads: self.reads.clone(),
            settled: self.settled.clone(),
            last: self.last.clone(),
        }
    }
}

impl<F: Impulses> Clone for Handle<F> {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            tx: self.tx.clone(),
            timeout: self.timeout,
            limit: self.limit,
            direct: self.direct.clone(),
        }
    }
}

impl<F: Impulses> std::fmt::Debug for Handle<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handle<{}>({:?})", F::NAME, self.id)
    }
}

impl<F: Impulses> Handle<F> {
    pub(crate) fn new(
        id: Arc<str>,
        tx: mpsc::Sender<Msg<F>>,
        timeout: Duration,
        limit: usize,
    ) -> Self {
        Self {
            id,
            tx,
            timeout,
            limit,
            direct: None,
        }
    }

    /// Reads the instance from the store once it is known to have ended (`settled`: known
    /// now).
    pub(crate) fn with_direct_reads(
        mut self,
        reads: Arc<dyn SettledReads<F>>,
        settled: bool,
    ) -> Self {
        self.direct = Some(Direct {
            reads,
            settled: Arc::new(AtomicBool::new(settled)),
            last: Arc::default(),
        });
        self
    }

    /// The instance's record, read from the store, when this handle knows it ended and it
    /// still has (a parked one resumed since is live: `None`, the runner answers).
    async fn settled(&self) -> Option<flowwire_storage::Record> {
        let direct = self.direct.as_ref()?;
        if !direct.settled.load(Ordering::Relaxed) {
            return None;
        }
        direct.reads.settled(self.id.clone()).await
    }

    /// Notes that the instance has ended, with its final state when the end gave it: later
    /// reads use that state, or go to the store.
    fn ended(&self, state: Option<Rope>) {
        let Some(direct) = &self.direct else {
            return;
        };
        direct.settled.store(true, Ordering::Relaxed);
        if let Some(state) = state {
            // A small state (or piece) is a view of the runner's shared buffer: keep a copy
            // of its own.
            let state = state.detached();
            *direct
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(state);
        }
    }

    /// The final state this handle was given with the instance's end, if any.
    fn last_state(&self) -> Option<(Rope, &Arc<dyn SettledReads<F>>)> {
        let direct = self.direct.as_ref()?;
        let last = direct
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        Some((last, &direct.reads))
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) async fn request<T>(
        &self,
        op: &'static str,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Msg<F>,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let msg = make(tx);
        let fut = async {
            self.tx.send(msg).await.map_err(|_| Error::Shutdown)?;
            rx.await.map_err(|_| Error::Shutdown)?
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| Error::Timeout {
                op,
                after: self.timeout,
            })?
    }

    /// Waits until the instance finishes or fails.
    ///
    /// A flow may run for months, so this wait has no timeout of its own: wrap it in
    /// `tokio::time::timeout` to bound it. Dropping the future only stops waiting.
    /// A quarantined instance is reported as [`Error::Quarantined`] at once.
    pub async fn finished(&self) -> Result<Ended> {
        if let Some(record) = self.settled().await
            && let Some(ended) = Ended::of(&record)
        {
            // Kept like an end the runner gives: later reads need neither it nor the store.
            if let Some(direct) = &self.direct
                && ended.state_is_final()
            {
                self.ended(direct.reads.state(&self.id, &record).ok().map(Rope::from));
            }
            return Ok(ended);
        }
        let (tx, rx) = oneshot::channel();
        let msg = Msg::Finished {
            id: self.id.clone(),
            reply: tx,
        };
        tokio::time::timeout(self.timeout, self.tx.send(msg))
            .await
            .map_err(|_| Error::Timeout {
                op: "finished",
                after: self.timeout,
            })?
            .map_err(|_| Error::Shutdown)?;
        let (ended, state) = rx.await.map_err(|_| Error::Shutdown)??;
        self.ended(state);
        Ok(ended)
    }

    /// Cancels the instance: whatever it waits for — a driver call, a fan-out, a sleep, a
    /// wait for an impulse, a retry's backoff — is abandoned, the compensations its drives
    /// registered run (last first, each to success, as when it fails), and it ends as
    /// [`Ended::Cancelled`] with `reason`. A call in flight is not interrupted at its
    /// driver; its late outcome is recorded in history and never applied.
    ///
    /// Applied once: cancelling again (after a restart, from another process) returns
    /// `Ok` and changes nothing. [`Error::Ended`] if the instance finished or failed, or
    /// is compensating a failure; [`Error::Quarantined`] if it is parked. Returns once the
    /// cancellation is committed; wait for the compensations with [`Handle::finished`].
    ///
    /// A flow with an impulse named `cancel` has a typed handle whose `cancel` method
    /// sends that impulse; reach this one with `Handle::cancel(&handle, reason)` or
    /// [`Engine::cancel`](crate::Engine::cancel).
    ///
    /// ```
    /// # async fn demo(h: flowwire::Handle<impl flowwire::Flow>) -> flowwire::Result<()> {
    /// h.cancel("the customer called it off").await?;
    /// assert!(matches!(h.finished().await?, flowwire::Ended::Cancelled { .. }));
    /// # Ok(()) }
    /// ```
    pub async fn cancel(&self, reason: impl Into<String>) -> Result<()> {
        let id = self.id.clone();
        let reason = reason.into();
        self.request("cancel", |reply| Msg::Cancel {
            id,
            reason,
            reply,
            via: None,
        })
        .await
    }

    /// The last persisted state.
    pub async fn state(&self) -> Result<F::State> {
        let bytes = self.state_bytes().await?;
        self.decode(&bytes)
    }

    /// Runs a read-only function on the flow as of its last persisted state; generated
    /// probe methods call this.
    ///
    /// It runs in the engine, on the flow it holds in memory when the instance is loaded
    /// (no copy of the state, however large), or on the blocking pool on a state decoded
    /// from the store when the instance has ended or is parked. A probe that panics is
    /// [`Error::ProbePanicked`]; the instance is unaffected.
    pub async fn probe<T, P>(&self, f: P) -> Result<T>
    where
        T: Send + 'static,
        P: FnOnce(&F) -> T + Send + 'static,
    {
        // Off the runner, on an ended instance: its final state, or its record in the store.
        let settled = match self.last_state() {
            Some((state, reads)) => Some((state, reads.clone())),
            None => match (self.settled().await, &self.direct) {
                (Some(record), Some(direct)) => Some((
                    direct.reads.state(&self.id, &record)?.into(),
                    direct.reads.clone(),
                )),
                _ => None,
            },
        };
        if let Some((state, reads)) = settled {
            // Decoded and run on the blocking pool: a state may be large.
            let id = self.id.clone();
            let run = tokio::task::spawn_blocking(move || {
                let flow = reads.flow(&id, &state)?;
                crate::guard::guard(|| f(&flow)).map_err(|reason| Error::ProbePanicked {
                    flow: F::NAME,
                    id: id.to_string(),
                    reason,
                })
            });
            return tokio::time::timeout(self.timeout, run)
                .await
                .map_err(|_| Error::Timeout {
                    op: "probe",
                    after: self.timeout,
                })?
                .map_err(|_| Error::Shutdown)?;
        }
        let (tx, rx) = oneshot::channel();
        let ask: Box<dyn FnOnce(&F) + Send> = Box::new(move |flow: &F| {
            let _ = tx.send(f(flow));
        });
        let id = self.id.clone();
        self.request("probe", |reply| Msg::Probe { id, ask, reply })
            .await?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Sends an impulse; await the returned request to have it applied (durably) once.
    pub fn impulse(&self, impulse: F::Impulse) -> ImpulseRequest<'_, F> {
        ImpulseRequest {
            handle: self,
            impulse,
            id: None,
        }
    }

    /// An impulse given as JSON (from an HTTP request or a queue), decoded as the flow's
    /// impulse enum — `{"Approve": {"by": "ann"}}` — then sent like [`Handle::impulse`].
    ///
    /// A payload that does not decode (malformed, an unknown impulse, a missing or
    /// mistyped argument, larger than the engine's decode limit) is [`Error::BadImpulse`],
    /// and nothing is sent.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(h: flowwire::Handle<F>) -> flowwire::Result<()>
    /// # where F::Impulse: Sync {
    /// h.impulse_json(r#"{"Approve": {"by": "ann"}}"#)?.id("req-17").await?;
    /// # Ok(()) }
    /// ```
    pub fn impulse_json(&self, json: &str) -> Result<ImpulseRequest<'_, F>> {
        let bad = |detail: String| Error::BadImpulse {
            flow: F::NAME,
            id: self.id.to_string(),
            detail,
        };
        if json.len() > self.limit {
            return Err(bad(format!(
                "{} bytes, above the decode limit of {} bytes",
                json.len(),
                self.limit
            )));
        }
        let impulse: F::Impulse = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        Ok(self.impulse(impulse))
    }

    async fn state_bytes(&self) -> Result<Rope> {
        if let Some((state, _)) = self.last_state() {
            return Ok(state);
        }
        if let (Some(record), Some(direct)) = (self.settled().await, &self.direct) {
            return direct.reads.state(&self.id, &record).map(Rope::from);
        }
        let id = self.id.clone();
        self.request("state", |reply| Msg::State { id, reply })
            .await
    }

    fn decode(&self, state: &Rope) -> Result<F::State> {
        // Large blobs in the state share the buffer it was read into (or are the engine's
        // own blobs).
        flowwire_storage::rope::read::decode_rope(state, self.limit).map_err(|source| {
            Error::Codec {
                flow: F::NAME,
                id: self.id.to_string(),
                what: "the state",
                source,
            }
        })
    }
}

pub(crate) type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a handle needs to read a settled instance of `F` without the runner.
pub(crate) trait SettledReads<F: Impulses>: Send + Sync {
    /// The record of `id` with its payloads, if it has ended or is parked; `None` when it
    /// is live, not in the store, or cannot be read here (then the runner answers, with
    /// its full handling of damaged records and shutdowns).
    fn settled(&self, id: Arc<str>) -> BoxFut<Option<flowwire_storage::Record>>;
    /// Its state as this version of the flow reads it, encoded.
    fn state(&self, id: &str, record: &flowwire_storage::Record) -> Result<Bytes>;
    /// The flow built on a state of this version, for a probe.
    fn flow(&self, id: &str, state: &Rope) -> Result<F>;
}

/// An impulse on its way: `.await` it to apply it; set its id first with
/// [`id`](ImpulseRequest::id) to make retries safe.
///
/// Without an id, a fresh one is generated, so awaiting the same impulse twice applies it
/// twice. With an id, an instance applies the id once: a second delivery is reported as
/// [`Error::ImpulseAlreadyApplied`] and changes nothing.
#[must_use = "an impulse is sent when it is awaited"]
pub struct ImpulseRequest<'a, F: Impulses> {
    handle: &'a Handle<F>,
    impulse: F::Impulse,
    id: Option<Arc<str>>,
}

impl<F: Impulses> ImpulseRequest<'_, F> {
    /// Sets the impulse id (for example the id of the request that caused it).
    pub fn id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.id = Some(id.into());
        self
    }
}

pub(crate) fn generated_id() -> Arc<str> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("fw-{:x}-{n:x}", crate::clock::unix_nanos()).into()
}

impl<'a, F: Impulses> IntoFuture for ImpulseRequest<'a, F>
where
    F::Impulse: Sync,
{
    type Output = Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let impulse_id = self.id.unwrap_or_else(generated_id);
            let id = self.handle.id.clone();
            let impulse = self.impulse;
            self.handle
                .request("impulse", |reply| Msg::Impulse {
                    id,
                    impulse_id,
                    impulse,
                    reply,
                    via: None,
                })
                .await
        })
    }
}
