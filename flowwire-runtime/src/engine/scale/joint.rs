//! One stream reader for all the shards an orchestrator process holds (one Redis server).
//!
//! Each shard has its own request and outcome streams. Read apart, every shard's pump
//! keeps a blocked `XREADGROUP` on a connection of its own: a start request wakes its
//! shard's reader, which gets a reply written, reads again and blocks again — per request,
//! a command, a socket write and a socket read on the server, and a wake-up of this
//! process. The [`Joint`] reads the streams of every shard joined to it in one
//! `XREADGROUP` on one connection and hands each entry to its shard's feed, so a turn of
//! the server costs one reply however many shards it woke. (On a cluster the shards'
//! streams are in different slots, which one command cannot read: each shard reads its
//! own there.)
//!
//! A shard's streams are read only while the shard is [active](Joined::activate): a pump
//! first claims what was left pending on its streams, then activates; after a failed read
//! (whose entries may be delivered to this consumer yet never received) it deactivates,
//! [waits](Joined::settle) until no read that included its streams is in flight, claims
//! again and activates again. An entry is thus either on the pending list a claim
//! reads, or new to a read of an active shard: none sits on this consumer's pending list
//! unseen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use flowwire_storage::bus::{Entry, RedisBus};
use tokio::sync::{Notify, watch};

use flowwire_storage::bus::ORCHESTRATORS as GROUP;

/// Entries taken from a stream at once (by a read or a claim).
pub(crate) const PAGE: usize = 256;

/// How long one read blocks on the server: a shard activated meanwhile is read from the
/// next read on (and an idle process reads ten times a second).
const BLOCK: Duration = Duration::from_millis(100);

/// The longest a shard waits for the read on its way before it claims (see
/// [`Joined::settle`]).
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// Hands a shard's entries to its feed (the entry's `stream`: 0 requests, 1 outcomes).
pub(super) type Take = Arc<dyn Fn(Entry) + Send + Sync>;

/// The shards joined to one reader (see the module docs).
pub(crate) struct Joint {
    bus: RedisBus,
    node: Arc<str>,
    state: Mutex<State>,
    /// Wakes an idle read loop when a shard is activated.
    changed: Notify,
    /// Counts the reads done (a read's entries all handed over or dropped).
    reads: watch::Sender<u64>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    members: Vec<Member>,
    /// Whether the read loop runs (it ends when no shard is joined).
    running: bool,
    /// Whether a read is on its way.
    reading: bool,
}

struct Member {
    id: u64,
    streams: [String; 2],
    take: Take,
    active: bool,
    /// Told when a read failed while the member was active: it must claim again.
    reclaim: Arc<Notify>,
}

impl Joint {
    pub(crate) fn new(bus: RedisBus, node: Arc<str>) -> Arc<Joint> {
        Arc::new(Joint {
            bus,
            node,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            reads: watch::Sender::new(0),
            next_id: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Joins a shard's `streams` (requests, outcomes), inactive: nothing is read for it
    /// before [`Joined::activate`].
    pub(super) fn join(self: &Arc<Self>, streams: [String; 2], take: Take) -> Joined {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let reclaim = Arc::new(Notify::new());
        let mut state = self.state();
        state.members.push(Member {
            id,
            streams,
            take,
            active: false,
            reclaim: reclaim.clone(),
        });
        if !state.running {
            state.running = true;
            tokio::spawn(read_loop(Arc::downgrade(self)));
        }
        Joined {
            joint: self.clone(),
            id,
            reclaim,
        }
    }

    /// What the next read covers: the active members' streams, and for each stream read,
    /// its member and its index there. `None` once no shard is joined (the loop ends).
    fn next_read(&self) -> Option<Plan> {
        let mut state = self.state();
        if state.members.is_empty() {
            state.running = false;
            state.reading = false;
            return None;
        }
        let plan = Plan::of(&state.members);
        state.reading = !plan.streams.is_empty();
        Some(plan)
    }

    /// Marks the read done, handing its entries to the members still active.
    fn done(&self, plan: &Plan, entries: Vec<Entry>) {
        let takes: Vec<Option<Take>> = {
            let mut state = self.state();
            state.reading = false;
            plan.members
                .iter()
                .map(|id| {
                    state
                        .members
                        .iter()
                        .find(|m| m.id == *id && m.active)
                        .map(|m| m.take.clone())
                })
                .collect()
        };
        for mut e in entries {
            let Some(&(member, local)) = plan.targets.get(e.stream) else {
                continue;
            };
            // A shard that left or stopped meanwhile: its entry stays pending, for the
            // claim of its next reader.
            if let Some(Some(take)) = takes.get(member) {
                e.stream = local;
                take(e);
            }
        }
        self.reads.send_modify(|n| *n += 1);
    }

    /// A read failed: every shard it covered claims its pending entries again.
    fn failed(&self, plan: &Plan) {
        let mut state = self.state();
        state.reading = false;
        for m in state
            .members
            .iter_mut()
            .filter(|m| plan.members.contains(&m.id))
        {
            m.active = false;
            m.reclaim.notify_one();
        }
        drop(state);
        self.reads.send_modify(|n| *n += 1);
    }
}

/// The streams of one read and where their entries go.
struct Plan {
    streams: Vec<String>,
    /// Per stream read: the index of its member in `members`, and its index there.
    targets: Vec<(usize, usize)>,
    /// The ids of the members read.
    members: Vec<u64>,
}

impl Plan {
    fn of(members: &[Member]) -> Plan {
        let mut plan = Plan {
            streams: Vec::new(),
            targets: Vec::new(),
            members: Vec::new(),
        };
        for m in members.iter().filter(|m| m.active) {
            let at = plan.members.len();
            plan.members.push(m.id);
            for (local, s) in m.streams.iter().enumerate() {
                plan.streams.push(s.clone());
                plan.targets.push((at, local));
            }
        }
        plan
    }
}

/// Reads the active shards' streams while any shard is joined.
async fn read_loop(joint: Weak<Joint>) {
    let mut reader = None;
    let mut failures = 0u32;
    loop {
        let Some(j) = joint.upgrade() else {
            return;
        };
        let Some(plan) = j.next_read() else {
            return;
        };
        if plan.streams.is_empty() {
            // Nothing active: wait for an activation (or look again shortly: the last
            // member may leave without one).
            let _ = tokio::time::timeout(BLOCK, j.changed.notified()).await;
            continue;
        }
        let r = match reader.as_mut() {
            Some(r) => r,
            None => match j.bus.reader().await {
                Ok(r) => reader.insert(r),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "shard streams not readable yet");
                    // Nothing was read: the plan's shards keep their place.
                    j.done(&plan, Vec::new());
                    drop(j);
                    tokio::time::sleep(super::pause(failures)).await;
                    continue;
                }
            },
        };
        match r.read(&plan.streams, GROUP, &j.node, PAGE, BLOCK).await {
            Ok(entries) => {
                failures = 0;
                j.done(&plan, entries);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "shard streams not readable; their pending entries are claimed again");
                reader = None;
                j.failed(&plan);
                drop(j);
                tokio::time::sleep(super::pause(failures)).await;
            }
        }
    }
}

/// A shard's place in the [`Joint`]; leaves it when dropped.
pub(super) struct Joined {
    joint: Arc<Joint>,
    id: u64,
    reclaim: Arc<Notify>,
}

impl Joined {
    /// Reads the shard's new entries from the next read on (after its pending ones were
    /// claimed).
    pub(super) fn activate(&self) {
        let mut state = self.joint.state();
        if let Some(m) = state.members.iter_mut().find(|m| m.id == self.id) {
            m.active = true;
        }
        drop(state);
        self.joint.changed.notify_one();
    }

    /// Stops reading the shard's streams (before its pending entries are claimed again).
    pub(super) fn deactivate(&self) {
        let mut state = self.joint.state();
        if let Some(m) = state.members.iter_mut().find(|m| m.id == self.id) {
            m.active = false;
        }
    }

    /// Waits until the read on its way, if any, is done: every entry a read delivered for
    /// the shard's streams is then handed over or on the pending list. Call it
    /// deactivated. (Any read, not only one that covered this member: one of an earlier
    /// member for the same streams — this process held the shard before — counts too.)
    pub(super) async fn settle(&self) {
        let mut reads = self.joint.reads.subscribe();
        let seen = *reads.borrow_and_update();
        if self.joint.state().reading {
            // A read ends within its block time plus the connection's response timeout;
            // this bound only keeps a stopped read loop from holding the shard forever.
            let waited = tokio::time::timeout(SETTLE_MAX, reads.wait_for(|n| *n != seen)).await;
            if waited.is_err() {
                tracing::warn!(
                    "the joint read did not end in time; pending entries claimed regardless"
                );
            }
        }
    }

    /// Resolves when a read covering the shard failed (the shard is then inactive).
    pub(super) async fn must_reclaim(&self) {
        self.reclaim.notified().await;
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.joint.state().members.retain(|m| m.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, shard: u16, active: bool) -> Member {
        Member {
            id,
            streams: [format!("req:{shard}"), format!("out:{shard}")],
            take: Arc::new(|_| {}),
            active,
            reclaim: Arc::new(Notify::new()),
        }
    }

    #[test]
    fn a_read_covers_the_active_shards_streams_and_maps_each_back() {
        let members = [member(7, 0, true), member(8, 1, false), member(9, 2, true)];
        let plan = Plan::of(&members);
        assert_eq!(plan.streams, ["req:0", "out:0", "req:2", "out:2"]);
        assert_eq!(plan.members, [7, 9]);
        assert_eq!(plan.targets, [(0, 0), (0, 1), (1, 0), (1, 1)]);
    }

    #[test]
    fn no_active_shard_reads_nothing() {
        let plan = Plan::of(&[member(1, 0, false)]);
        assert!(plan.streams.is_empty() && plan.members.is_empty());
    }
}
