//! Outcomes and requests handed to their shard's owner directly, over a TCP connection
//! from the worker or the caller to the owner's process (one Redis server).
//!
//! Handed over on pub/sub, an outcome crosses the server: the worker's `PUBLISH` lands in a
//! turn of the server's loop, and Redis delivers it only after that turn's `fdatasync` —
//! a wait on the disk for a message that needs no durability. A workflow of two calls
//! waits for two such turns. Sent directly, it waits for none. A request (a start, an
//! impulse, a cancellation) appended to the shard's request stream waits for one turn
//! too, and needs no durability either: its caller hears nothing before the step that
//! applies it is committed.
//!
//! * **The owner's side ([`Inbox`]).** Each orchestrator process listens on one address
//!   (`Shared::direct_handoffs`, loopback by default). A shard's pump routes the outcomes
//!   that name its handoff channel to its runner and the requests that name its request
//!   stream to its feed, and advertises the address under both names
//!   (`RedisBus::advertise`): the shard's next owner overwrites them.
//! * **The sender's side (`outlet.rs`).** For each frame's channel, a worker (or a
//!   caller) looks up the address once (then keeps it), connects, checks the greeting (a
//!   magic and the node the address was advertised with), and sends its frames; the owner
//!   answers each with whether it routes that channel. Each owner's connection is a lane
//!   of its own, and each owner's answers are given as its exchange ends: an owner that
//!   does not answer holds up only what is offered to it.
//! * **Fallbacks.** An outcome the owner did not take — the shard moved on, the address is
//!   stale or unreachable, the answer did not come within a second — is published as
//!   before; one nobody received is written to the shard's outcome stream, and one no
//!   commit settles within a second too (`workers.rs`). An outcome that arrives twice is
//!   applied once, by its step. A request the owner did not take is appended to the
//!   request stream (`client.rs`); one it took while its runner was stopping is appended
//!   there by the owner (`feed.rs`). A request applied twice is applied once, by its id
//!   (a start, an impulse) or its effect (a cancellation). One an owner took and died
//!   with before its step was committed is lost, as one sent to any server that dies is:
//!   its caller times out, having been told nothing, and may ask again.
//!
//! Frames are length-prefixed (`u32`, little-endian) and bounded by the decode limit: a
//! longer one closes the connection. Anything that can reach the address can offer
//! outcomes for calls in flight and requests, as anything that can reach Redis can
//! publish or append them: bind it where only the deployment's processes reach it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use flowwire_storage::codec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::messages::{Handoff, Request};
use crate::engine::outcomes::OutcomeTx;

/// What an owner's process says first on every connection, before its node's name.
pub(super) const MAGIC: &[u8; 8] = b"fwdirect";

/// How long a connection, a greeting, a frame or the answers to a batch may take.
pub(super) const WAIT: Duration = Duration::from_secs(1);

/// How long a channel with no usable address is published on before it is looked up again.
pub(super) const RETRY: Duration = Duration::from_secs(1);

/// The most connections an owner serves at once (a worker keeps one per owner): past it,
/// a new one is closed at once, and its worker publishes.
const CONNECTIONS_MAX: usize = 1024;

/// An outcome or a request on its way to the owner of `channel`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Frame {
    /// Which runner it is for: an outcome names the shard's handoff channel, a request the
    /// shard's request stream.
    pub(super) channel: String,
    /// The encoded [`Handoff`] (an outcome) or [`Request`].
    pub(super) handoff: Bytes,
}

/// What takes the requests handed over for a shard: the request as it decoded, and as it
/// came (to pass it on to the stream if the shard's runner has stopped).
pub(crate) type TakeRequest = Arc<dyn Fn(Request, Bytes) + Send + Sync>;

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An orchestrator process's listener for outcomes (see the module docs).
pub(crate) struct Inbox {
    /// What is advertised: the address, `|`, the node's name.
    endpoint: String,
    node: Arc<str>,
    limit: usize,
    routes: Mutex<HashMap<String, OutcomeTx>>,
    /// Per shard's request stream, what takes the requests handed over for it.
    requests: Mutex<HashMap<String, TakeRequest>>,
}

impl Inbox {
    /// Listens on `bind` (port 0: any free one). Fails if it cannot, or if `bind`'s IP is
    /// unspecified (`0.0.0.0`): workers need an address they can reach.
    pub(crate) async fn bind(
        bind: SocketAddr,
        node: Arc<str>,
        limit: usize,
    ) -> std::io::Result<(Arc<Inbox>, tokio::task::JoinHandle<()>)> {
        if bind.ip().is_unspecified() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{bind} is no address a worker can reach; bind a specific one"),
            ));
        }
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let inbox = Arc::new(Inbox {
            endpoint: format!("{addr}|{node}"),
            node,
            limit,
            routes: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(accept(listener, Arc::downgrade(&inbox)));
        Ok((inbox, task))
    }

    /// What a shard's pump advertises under its handoff channel.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Routes the outcomes offered for `channel` to `outcomes` until the guard is dropped.
    pub(crate) fn route(self: &Arc<Self>, channel: String, outcomes: OutcomeTx) -> Route {
        lock(&self.routes).insert(channel.clone(), outcomes.clone());
        Route {
            inbox: self.clone(),
            channel,
            outcomes,
        }
    }

    /// Routes the requests offered for `stream` (a shard's request stream) to `take`
    /// until the guard is dropped.
    pub(crate) fn route_requests(
        self: &Arc<Self>,
        stream: String,
        take: TakeRequest,
    ) -> RequestRoute {
        lock(&self.requests).insert(stream.clone(), take.clone());
        RequestRoute {
            inbox: self.clone(),
            stream,
            take,
        }
    }

    /// Hands one frame's outcome to its runner, or its request to its shard's feed;
    /// whether it was routed.
    fn take(&self, frame: &[u8]) -> bool {
        let f = match codec::decode_raw::<Frame>(frame, self.limit) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "frame offered directly does not decode; left to its sender");
                return false;
            }
        };
        {
            // An outcome is sent under the lock, as found: no copy of its runner's sender.
            let routes = lock(&self.routes);
            if let Some(tx) = routes.get(&f.channel) {
                return match Handoff::open(&f.handoff, self.limit) {
                    Ok(o) => tx.send(o).is_ok(),
                    Err(e) => {
                        tracing::warn!(error = %e, "outcome offered directly does not decode; left to its worker");
                        false
                    }
                };
            }
        }
        // A request's feed is called outside the lock (it spawns the request's task).
        let Some(take) = lock(&self.requests).get(&f.channel).cloned() else {
            return false;
        };
        match codec::decode_raw::<Request>(&f.handoff, self.limit) {
            Ok(request) => {
                take(request, f.handoff);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "request offered directly does not decode; left to its caller");
                false
            }
        }
    }
}

/// A shard's route in the [`Inbox`]; removed when dropped (unless a later one replaced it).
pub(crate) struct Route {
    inbox: Arc<Inbox>,
    channel: String,
    outcomes: OutcomeTx,
}

impl Drop for Route {
    fn drop(&mut self) {
        let mut routes = lock(&self.inbox.routes);
        if routes
            .get(&self.channel)
            .is_some_and(|tx| tx.same_channel(&self.outcomes))
        {
            routes.remove(&self.channel);
        }
    }
}

/// A shard's request route in the [`Inbox`]; removed when dropped (unless a later one
/// replaced it).
pub(crate) struct RequestRoute {
    inbox: Arc<Inbox>,
    stream: String,
    take: TakeRequest,
}

impl Drop for RequestRoute {
    fn drop(&mut self) {
        let mut requests = lock(&self.inbox.requests);
        if requests
            .get(&self.stream)
            .is_some_and(|t| Arc::ptr_eq(t, &self.take))
        {
            requests.remove(&self.stream);
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, inbox: Weak<Inbox>) {
    let open = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = listener.accept().await;
        let Some(inbox) = inbox.upgrade() else {
            return;
        };
        match accepted {
            Ok((sock, peer)) => {
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, max = CONNECTIONS_MAX, "direct handoff connection refused: too many open");
                    continue;
                };
                let _ = sock.set_nodelay(true);
                tokio::spawn(async move {
                    serve(sock, inbox).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "direct handoff connection not accepted");
                drop(inbox);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one worker's connection until it closes (or sends what is not a frame).
async fn serve(sock: TcpStream, inbox: Arc<Inbox>) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&u16::try_from(inbox.node.len()).unwrap_or(0).to_le_bytes());
    hello.extend_from_slice(inbox.node.as_bytes());
    if w.write_all(&hello).await.is_err() {
        return;
    }
    let mut answers = Vec::new();
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
        if len > inbox.limit {
            tracing::warn!(
                len,
                limit = inbox.limit,
                "direct handoff frame over the decode limit; connection closed"
            );
            return;
        }
        frame.resize(len, 0);
        match tokio::time::timeout(WAIT, r.read_exact(&mut frame)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        answers.push(u8::from(inbox.take(&frame)));
        // One write for all the frames that came together.
        if r.buffer().is_empty() {
            if w.write_all(&answers).await.is_err() {
                return;
            }
            answers.clear();
        }
    }
}
