//! The sender's side of direct handoffs (see `handoff.rs`): a worker's or a caller's
//! connections to the owners it offers outcomes and requests to, one lane per owner, and
//! the offers' answers as each owner's exchange ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flowwire_storage::bus::RedisBus;
use flowwire_storage::codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use super::handoff::{Frame, MAGIC, RETRY, WAIT, lock};

/// At most how many batches of offers a sender has under way at once (a client's
/// requests, a worker's outcomes); more wait in its queue.
pub(super) const UNDER_WAY: usize = 64;

/// Makes room for one more batch among those `under_way`: the finished ones are reaped,
/// and when [`UNDER_WAY`] are still running, the first to end is waited for.
pub(super) async fn make_room(under_way: &mut tokio::task::JoinSet<()>) {
    while under_way.try_join_next().is_some() {}
    if under_way.len() >= UNDER_WAY {
        under_way.join_next().await;
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
    /// the offers made to it: each waits at most [`WAIT`] for the owner's lane, [`WAIT`]
    /// to connect (when the lane has no connection) and [`WAIT`] for the answer.
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
                // A lane left with no connection and no exchange on it goes (so lanes of
                // addresses no longer used do not pile up). One still in use stays: this
                // offer timed out waiting for it behind a slow exchange, which keeps its
                // connection for the next.
                let mut lanes = lock(&self.lanes);
                if lanes
                    .get(&end)
                    .is_some_and(|lane| lane.try_lock().is_ok_and(|conn| conn.is_none()))
                {
                    lanes.remove(&end);
                }
                drop(lanes);
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
