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
//! * **The sender's side ([`Outlet`]).** For each frame's channel, a worker (or a caller)
//!   looks up the address once (then keeps it), connects, checks the greeting (a magic
//!   and the node the address was advertised with), and sends its frames; the owner
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
use flowwire_storage::bus::RedisBus;
use flowwire_storage::codec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use super::messages::{Handoff, Request};
use crate::engine::outcomes::OutcomeTx;

/// What an owner's process says first on every connection, before its node's name.
const MAGIC: &[u8; 8] = b"fwdirect";

/// How long a connection, a greeting, a frame or the answers to a batch may take.
const WAIT: Duration = Duration::from_secs(1);

/// How long a channel with no usable address is published on before it is looked up again.
const RETRY: Duration = Duration::from_secs(1);

/// The most connections an owner serves at once (a worker keeps one per owner): past it,
/// a new one is closed at once, and its worker publishes.
const CONNECTIONS_MAX: usize = 1024;

/// An outcome or a request on its way to the owner of `channel`.
#[derive(Debug, Serialize, Deserialize)]
struct Frame {
    /// Which runner it is for: an outcome names the shard's handoff channel, a request the
    /// shard's request stream.
    channel: String,
    /// The encoded [`Handoff`] (an outcome) or [`Request`].
    handoff: Bytes,
}

/// What takes the requests handed over for a shard: the request as it decoded, and as it
/// came (to pass it on to the stream if the shard's runner has stopped).
pub(crate) type TakeRequest = Arc<dyn Fn(Request, Bytes) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

/// A worker's connections to the owners it hands outcomes to (see the module docs).
pub(crate) struct Outlet {
    bus: RedisBus,
    limit: usize,
    /// Per handoff channel, the owner's endpoint as advertised, or until when to publish.
    ends: Mutex<HashMap<String, End>>,
    /// Per endpoint, the connection to it (see [`Lane`]).
    lanes: Mutex<HashMap<String, Lane>>,
    /// The endpoints whose failure was logged as a warning (later ones are logged at
    /// debug level: a worker that cannot reach an owner would otherwise warn every second).
    warned: Mutex<std::collections::HashSet<String>>,
}

#[derive(Clone)]
enum End {
    At(String),
    Publish(Instant),
}

struct Conn {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
}

/// One owner's connection: one exchange at a time on it (its answers come back in the
/// order of its frames), while exchanges with other owners go on beside it. The
/// connection is out of its lane while in use, so an exchange cut short (its offer
/// cancelled) drops it rather than leave it for the next one out of step.
type Lane = Arc<tokio::sync::Mutex<Option<Conn>>>;

impl Outlet {
    pub(crate) fn new(bus: RedisBus, limit: usize) -> Outlet {
        Outlet {
            bus,
            limit,
            ends: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
            warned: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Offers each `(channel, encoded Handoff)` to the channel's owner directly; says per
    /// offer whether the owner took it (`false`: publish it).
    pub(crate) async fn offer(&self, offers: &[(String, Bytes)]) -> Vec<bool> {
        let mut took = vec![false; offers.len()];
        self.offer_each(offers, |i, t| took[i] = t).await;
        took
    }

    /// As [`offer`](Self::offer), with each offer's answer given to `answer` (its index,
    /// whether the owner took it) as soon as its owner's exchange ends: an owner slow to
    /// answer (a paused process, one gone without closing its connections) holds up only
    /// the offers made to it, for at most [`WAIT`] on its connection and [`WAIT`] for it.
    /// Every offer is answered once, also when this future is dropped part way (then with
    /// `false` for those not answered yet).
    pub(crate) async fn offer_each(
        &self,
        offers: &[(String, Bytes)],
        answer: impl FnMut(usize, bool),
    ) {
        let mut answer = AnswerOnce::new(offers.len(), answer);
        self.resolve(offers).await;
        // The offers by endpoint, in order.
        let mut by_end: Vec<(String, Vec<usize>)> = Vec::new();
        {
            let ends = lock(&self.ends);
            for (i, (channel, _)) in offers.iter().enumerate() {
                let Some(End::At(end)) = ends.get(channel) else {
                    continue;
                };
                match by_end.iter_mut().find(|(e, _)| e == end) {
                    Some((_, is)) => is.push(i),
                    None => by_end.push((end.clone(), vec![i])),
                }
            }
        }
        let mut sends = Vec::with_capacity(by_end.len());
        for (end, is) in by_end {
            let (frames, is) = frames_of(offers, &is);
            if is.is_empty() {
                continue;
            }
            let (lane, limit) = (self.lane(&end), self.limit);
            sends.push(async move {
                let answered = on_lane(&lane, &end, limit, &frames, is.len()).await;
                (end, is, answered)
            });
        }
        if sends.len() == 1 {
            // One owner (the common case): on this task.
            if let Some(sent) = sends.pop() {
                self.answered(offers, &mut answer, sent.await);
            }
        } else {
            // Each owner's exchange on its own task, answered as it ends.
            let mut exchanges = tokio::task::JoinSet::new();
            for sent in sends {
                exchanges.spawn(sent);
            }
            while let Some(joined) = exchanges.join_next().await {
                // A panicked exchange's offers stay untaken: published.
                if let Ok(done) = joined {
                    self.answered(offers, &mut answer, done);
                }
            }
        }
        // The offers no owner is known for, and those that did not encode: published.
    }

    /// The lane of `end`, made on first use.
    fn lane(&self, end: &str) -> Lane {
        let mut lanes = lock(&self.lanes);
        if let Some(lane) = lanes.get(end) {
            return lane.clone();
        }
        let lane = Lane::default();
        lanes.insert(end.to_string(), lane.clone());
        lane
    }

    /// Looks up, in one round trip, the channels with no endpoint known yet.
    async fn resolve(&self, offers: &[(String, Bytes)]) {
        let now = Instant::now();
        let mut unknown: Vec<String> = Vec::new();
        {
            let ends = lock(&self.ends);
            for (channel, _) in offers {
                let known = match ends.get(channel) {
                    Some(End::At(_)) => true,
                    Some(End::Publish(until)) => *until > now,
                    None => false,
                };
                if !known && !unknown.contains(channel) {
                    unknown.push(channel.clone());
                }
            }
        }
        if unknown.is_empty() {
            return;
        }
        let found = match tokio::time::timeout(WAIT, self.bus.endpoints(&unknown)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "owners' addresses not read; outcomes published");
                vec![None; unknown.len()]
            }
            Err(_) => vec![None; unknown.len()],
        };
        let mut ends = lock(&self.ends);
        for (channel, end) in unknown.into_iter().zip(found) {
            let end = end.map_or(End::Publish(now + RETRY), End::At);
            ends.insert(channel, end);
        }
    }

    /// Takes in one owner's answers (or why there are none).
    fn answered(
        &self,
        offers: &[(String, Bytes)],
        answer: &mut AnswerOnce<impl FnMut(usize, bool)>,
        (end, is, answered): Answered,
    ) {
        match answered {
            Ok(answers) => {
                let mut moved = Vec::new();
                for (&i, &a) in is.iter().zip(&answers) {
                    answer.give(i, a == 1);
                    if a != 1 {
                        moved.push(i);
                    }
                }
                // The shards that moved on: their owners are looked up again next time.
                let mut ends = lock(&self.ends);
                for i in moved {
                    ends.remove(&offers[i].0);
                }
            }
            Err(e) => {
                self.failed(&end, &e);
                // Its connection is gone; a new owner at this address gets a lane afresh
                // (so lanes of addresses no longer used do not pile up).
                lock(&self.lanes).remove(&end);
                let until = Instant::now() + RETRY;
                let mut ends = lock(&self.ends);
                for &i in &is {
                    ends.insert(offers[i].0.clone(), End::Publish(until));
                }
            }
        }
    }

    /// Logs that `end` could not be reached: as a warning the first time.
    fn failed(&self, end: &str, e: &std::io::Error) {
        let first = {
            let mut warned = lock(&self.warned);
            if warned.len() >= 1024 {
                warned.clear();
            }
            warned.insert(end.to_string())
        };
        if first {
            tracing::warn!(endpoint = %end, error = %e, "outcomes and requests cannot be sent to their owner directly; they go through Redis instead (give the orchestrator an address this process reaches: `Shared::direct_handoffs`)");
        } else {
            tracing::debug!(endpoint = %end, error = %e, "not offered directly; sent through Redis");
        }
    }
}

/// One owner's exchange: its endpoint, the offers sent to it, and the answer to each (or
/// why there are none).
type Answered = (String, Vec<usize>, std::io::Result<Vec<u8>>);

/// Gives each offer's answer once; those not given by the time it is dropped are given
/// `false` then (published).
struct AnswerOnce<A: FnMut(usize, bool)> {
    given: Vec<bool>,
    answer: A,
}

impl<A: FnMut(usize, bool)> AnswerOnce<A> {
    fn new(n: usize, answer: A) -> Self {
        Self {
            given: vec![false; n],
            answer,
        }
    }

    fn give(&mut self, i: usize, took: bool) {
        if let Some(given) = self.given.get_mut(i)
            && !std::mem::replace(given, true)
        {
            (self.answer)(i, took);
        }
    }
}

impl<A: FnMut(usize, bool)> Drop for AnswerOnce<A> {
    fn drop(&mut self) {
        for i in 0..self.given.len() {
            self.give(i, false);
        }
    }
}

/// An exchange on `end`'s lane: it waits for the exchange before it there (at most
/// [`WAIT`]: an owner that does not answer holds its lane that long), then sends
/// `frames` on the lane's connection, opening one if there is none.
async fn on_lane(
    lane: &Lane,
    end: &str,
    limit: usize,
    frames: &[u8],
    count: usize,
) -> std::io::Result<Vec<u8>> {
    let Ok(mut held) = tokio::time::timeout(WAIT, lane.lock()).await else {
        return Err(std::io::ErrorKind::TimedOut.into());
    };
    let (conn, answers) = exchange(held.take(), end, limit, frames, count).await?;
    *held = Some(conn);
    Ok(answers)
}

/// The frames of the offers `is`, and which of them are in (an offer that does not encode
/// is left out, and published).
fn frames_of(offers: &[(String, Bytes)], is: &[usize]) -> (Vec<u8>, Vec<usize>) {
    let mut frames = Vec::new();
    let mut included = Vec::with_capacity(is.len());
    for &i in is {
        let (channel, handoff) = &offers[i];
        let frame = Frame {
            channel: channel.clone(),
            handoff: handoff.clone(),
        };
        let at = frames.len();
        frames.extend_from_slice(&[0; 4]);
        let encoded = codec::encode_raw(&frame, &mut frames).ok();
        let Some(len) = encoded.and_then(|()| u32::try_from(frames.len() - at - 4).ok()) else {
            frames.truncate(at);
            continue;
        };
        frames[at..at + 4].copy_from_slice(&len.to_le_bytes());
        included.push(i);
    }
    (frames, included)
}

/// Sends `frames` (`count` of them) on `conn` (opened to `end` if `None`); the connection
/// and the owner's answer to each.
async fn exchange(
    conn: Option<Conn>,
    end: &str,
    limit: usize,
    frames: &[u8],
    count: usize,
) -> std::io::Result<(Conn, Vec<u8>)> {
    let mut conn = match conn {
        Some(c) => c,
        None => connect(end, limit).await?,
    };
    let mut answers = vec![0u8; count];
    let sent = async {
        conn.w.write_all(frames).await?;
        conn.r.read_exact(&mut answers).await?;
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(WAIT, sent).await {
        Ok(Ok(())) => Ok((conn, answers)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Connects to an advertised endpoint (`address|node`) and checks its greeting.
async fn connect(end: &str, limit: usize) -> std::io::Result<Conn> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let (addr, node) = end
        .split_once('|')
        .ok_or_else(|| bad("an endpoint is an address, '|' and a node's name"))?;
    let greeted = async {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let (mut r, w) = sock.into_split();
        let mut head = [0u8; 10];
        r.read_exact(&mut head).await?;
        if head[..8] != MAGIC[..] {
            return Err(bad("not an owner's direct handoff listener"));
        }
        let len = usize::from(u16::from_le_bytes([head[8], head[9]]));
        if len > limit {
            return Err(bad("a node's name over the decode limit"));
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name).await?;
        if name != node.as_bytes() {
            return Err(bad("another node listens at the address advertised"));
        }
        Ok(Conn { r, w })
    };
    match tokio::time::timeout(WAIT, greeted).await {
        Ok(c) => c,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}
