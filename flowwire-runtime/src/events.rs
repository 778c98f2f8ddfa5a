//! Lifecycle events: a typed, bounded stream of what the engine did, for dashboards,
//! audit logs and tests.
//!
//! Every event is sent after the step it reports is committed, so a subscriber never sees something the store does not hold. The stream is
//! bounded: a subscriber that falls behind by more than the engine's event capacity does
//! not slow the engine down; it is told how many events it missed and goes on from the
//! oldest one still held. Without subscribers, sending costs a check of the subscriber count.

use std::sync::Arc;

use flowwire_storage::{StepInput, StepOutput};
use serde::Serialize;
use tokio::sync::broadcast;

/// One thing that happened to one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Event {
    /// The flow's name.
    pub flow: &'static str,
    /// The instance id.
    pub id: Arc<str>,
    /// The step the event belongs to (the step that made it happen).
    pub step: u64,
    /// What happened.
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// The instance was started.
    Started,
    /// A driver call was sent (also when it is sent again after a restart).
    Drive {
        /// The driver trait.
        driver: &'static str,
        /// The method.
        method: &'static str,
        /// The step that issued the call (with the instance, the idempotency key).
        call_step: u64,
        /// The fan-out branch it is (`None` for a drive).
        #[serde(skip_serializing_if = "Option::is_none")]
        branch: Option<u32>,
    },
    /// A driver call's outcome was applied.
    Outcome {
        /// The step that issued the call.
        call_step: u64,
        /// The fan-out branch it is (`None` for a drive).
        #[serde(skip_serializing_if = "Option::is_none")]
        branch: Option<u32>,
        /// Whether the driver succeeded (`false` for its error or a runtime fault).
        ok: bool,
    },
    /// An attempt of a driver call failed (the driver's error, a timeout, a panic) and its
    /// policy retries it: the failure and the attempt count are committed, and the next
    /// attempt is sent when a durable timer fires.
    Retry {
        /// The driver trait.
        driver: &'static str,
        /// The method.
        method: &'static str,
        /// The step that issued the call.
        call_step: u64,
        /// The fan-out branch it is (`None` for a drive or a compensation).
        #[serde(skip_serializing_if = "Option::is_none")]
        branch: Option<u32>,
        /// The attempt that failed, from 1.
        attempt: u32,
        /// The runtime's fault (a timeout, a panic), or `None` for the driver's own error
        /// (the step's history entry holds its reply).
        fault: Option<String>,
        /// When the next attempt is due, in milliseconds since the Unix epoch.
        due_ms: u64,
    },
    /// An impulse was applied.
    Impulse {
        /// The impulse method.
        name: String,
    },
    /// The instance sleeps until a time.
    Sleeping {
        /// When it wakes, in milliseconds since the Unix epoch.
        until_ms: u64,
    },
    /// The instance waits for an impulse.
    Waiting {
        /// When the wait times out, if it has a timeout (ms since the Unix epoch).
        until_ms: Option<u64>,
    },
    /// A timer fired: a sleep ended or a wait timed out.
    Woke {
        /// When it was due (ms since the Unix epoch).
        due_ms: u64,
    },
    /// The flow finished.
    Finished,
    /// The flow failed.
    Failed {
        /// Why.
        reason: String,
        /// The typed failure, when the flow failed with one (see `Ended::error`).
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<flowwire_storage::ErrorValue>,
    },
    /// The instance was cancelled and its compensations have run.
    Cancelled {
        /// Why, as the canceller said.
        reason: String,
    },
    /// The late outcome of a call the instance abandoned when it was cancelled arrived: it
    /// is recorded in history, not applied.
    Abandoned {
        /// The step that issued the call.
        call_step: u64,
        /// The fan-out branch it is (`None` for a drive).
        #[serde(skip_serializing_if = "Option::is_none")]
        branch: Option<u32>,
    },
    /// The instance was parked for an operator.
    Quarantined {
        /// Why.
        reason: String,
    },
    /// An operator resumed the parked instance.
    Resumed,
    /// The store failed for good while this instance's step was written (it is damaged,
    /// or it lost its data): what depends on it stopped, and `Engine::health` reports it.
    /// Sent once per runner.
    StoreFailed {
        /// The store's error.
        error: String,
    },
    /// An operator patched the parked instance's state.
    Patched,
    /// An operator rewound the instance to a step of its history (it stays parked).
    Rewound {
        /// That step.
        to: u64,
    },
    /// The flow is failing and sent a compensation (also when it is sent again).
    Compensating {
        /// The driver trait.
        driver: &'static str,
        /// The method.
        method: &'static str,
        /// The step whose drive registered the compensation.
        registered_step: u64,
        /// The step that sent it (with the instance, its idempotency key).
        call_step: u64,
    },
}

/// A subscriber fell behind and these events were dropped for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the subscriber fell behind and missed {count} events")]
pub struct Missed {
    /// How many.
    pub count: u64,
}

/// A subscription to an engine's events: get one from `Engine::events`.
///
/// ```
/// # async fn demo(engine: flowwire::Engine) {
/// let mut events = engine.events();
/// while let Some(event) = events.next().await {
///     match event {
///         Ok(e) => println!("{} {} step {}: {:?}", e.flow, e.id, e.step, e.kind),
///         Err(missed) => eprintln!("{missed}"),
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
}

impl Events {
    pub(crate) fn new(rx: broadcast::Receiver<Event>) -> Self {
        Self { rx }
    }

    /// The next event, or how many this subscriber missed since the last call, or `None`
    /// once the engine has shut down and every held event was read. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<Event, Missed>> {
        match self.rx.recv().await {
            Ok(e) => Some(Ok(e)),
            Err(broadcast::error::RecvError::Lagged(count)) => Some(Err(Missed { count })),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Event, Missed>> {
        match self.rx.try_recv() {
            Ok(e) => Some(Ok(e)),
            Err(broadcast::error::TryRecvError::Lagged(count)) => Some(Err(Missed { count })),
            Err(_) => None,
        }
    }
}

/// The sending side, shared by runners and workers.
#[derive(Debug, Clone)]
pub(crate) struct Emitter {
    tx: broadcast::Sender<Event>,
}

impl Emitter {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    pub(crate) fn subscribe(&self) -> Events {
        Events::new(self.tx.subscribe())
    }

    /// Whether anyone listens: build events only then.
    pub(crate) fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub(crate) fn send(&self, flow: &'static str, id: &Arc<str>, step: u64, kind: EventKind) {
        let _ = self.tx.send(Event {
            flow,
            id: id.clone(),
            step,
            kind,
        });
    }
}

/// A call a committed step sent: `(link, method, call step, fan-out branch)`.
pub(crate) type Sent = (u16, u16, u64, Option<u32>);

/// The events a committed step means, in order, given to `emit`: what came in (a start,
/// an impulse, an outcome, a timer, an operator's action), then what went out (the calls
/// it sent, a sleep or wait, the end, a parking, a compensation). `names` gives a call's
/// driver and method names by link and method. A pure function of the step: the runner
/// calls it after the commit, tests call it alone.
pub(crate) fn of_step(
    input: &StepInput,
    output: &StepOutput,
    sent: impl IntoIterator<Item = Sent>,
    names: impl Fn(u16, u16) -> (&'static str, &'static str),
    mut emit: impl FnMut(EventKind),
) {
    if let StepOutput::Abandoned { call_seq, branch } = output {
        // Not an outcome applied: only the late arrival is reported.
        emit(EventKind::Abandoned {
            call_step: *call_seq,
            branch: *branch,
        });
        return;
    }
    match input {
        StepInput::Start => emit(EventKind::Started),
        StepInput::StartWith { name, .. } => {
            emit(EventKind::Started);
            emit(EventKind::Impulse { name: name.clone() });
        }
        StepInput::Impulse { name, .. } => emit(EventKind::Impulse { name: name.clone() }),
        StepInput::Outcome { call_seq, ok } => emit(EventKind::Outcome {
            call_step: *call_seq,
            branch: None,
            ok: *ok,
        }),
        StepInput::BranchOutcome {
            call_seq,
            branch,
            ok,
        } => emit(EventKind::Outcome {
            call_step: *call_seq,
            branch: Some(*branch),
            ok: *ok,
        }),
        StepInput::Timer { due_ms } => emit(EventKind::Woke { due_ms: *due_ms }),
        StepInput::Resume => emit(EventKind::Resumed),
        StepInput::Patch => emit(EventKind::Patched),
        StepInput::Rewind { to } => emit(EventKind::Rewound { to: *to }),
        _ => {}
    }
    if matches!(input, StepInput::Patch | StepInput::Rewind { .. }) {
        // The instance stays parked: it was reported when it was parked.
        return;
    }
    match output {
        StepOutput::Drive { .. } | StepOutput::Fan { .. } => {
            for (link, method, call_step, branch) in sent {
                let (driver, method) = names(link, method);
                emit(EventKind::Drive {
                    driver,
                    method,
                    call_step,
                    branch,
                });
            }
        }
        StepOutput::Retry {
            call_seq,
            branch,
            link,
            method,
            attempt,
            due_ms,
            fault,
        } => {
            let (driver, method) = names(*link, *method);
            emit(EventKind::Retry {
                driver,
                method,
                call_step: *call_seq,
                branch: *branch,
                attempt: *attempt,
                fault: fault.clone(),
                due_ms: *due_ms,
            });
        }
        StepOutput::Sleep { due_ms } => emit(EventKind::Sleeping { until_ms: *due_ms }),
        StepOutput::Wait => emit(EventKind::Waiting { until_ms: None }),
        StepOutput::WaitUntil { due_ms } => emit(EventKind::Waiting {
            until_ms: Some(*due_ms),
        }),
        StepOutput::Finish => emit(EventKind::Finished),
        StepOutput::Fail { reason, error } => emit(EventKind::Failed {
            reason: reason.clone(),
            error: error.clone(),
        }),
        StepOutput::Cancelled { reason } => emit(EventKind::Cancelled {
            reason: reason.clone(),
        }),
        StepOutput::Abandoned { .. } => {}
        StepOutput::Quarantine { reason } => emit(EventKind::Quarantined {
            reason: reason.clone(),
        }),
        StepOutput::Compensate {
            call_seq,
            registered,
            link,
            method,
        } => {
            // Announced when its call goes out (not when a restart keeps it in flight).
            if sent.into_iter().next().is_some() {
                let (driver, method) = names(*link, *method);
                emit(EventKind::Compensating {
                    driver,
                    method,
                    registered_step: *registered,
                    call_step: *call_seq,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use flowwire_storage::{StepInput, StepOutput};

    use super::{EventKind, of_step};

    fn events(input: &StepInput, output: &StepOutput, sent: &[super::Sent]) -> Vec<EventKind> {
        let mut out = Vec::new();
        of_step(
            input,
            output,
            sent.iter().copied(),
            |_, m| ("Shop", if m == 0 { "reserve" } else { "charge" }),
            |e| out.push(e),
        );
        out
    }

    #[test]
    fn an_outcome_that_sends_a_call_is_the_outcome_then_the_drive() {
        let got = events(
            &StepInput::Outcome {
                call_seq: 1,
                ok: true,
            },
            &StepOutput::Drive {
                call_seq: 2,
                link: 0,
                method: 1,
            },
            &[(0, 1, 2, None)],
        );
        assert_eq!(
            got,
            [
                EventKind::Outcome {
                    call_step: 1,
                    branch: None,
                    ok: true
                },
                EventKind::Drive {
                    driver: "Shop",
                    method: "charge",
                    call_step: 2,
                    branch: None
                },
            ]
        );
    }

    #[test]
    fn a_fan_out_announces_each_branch_sent() {
        let got = events(
            &StepInput::Start,
            &StepOutput::Fan {
                call_seq: 1,
                done: 0,
                branches: 3,
            },
            &[(0, 0, 1, Some(0)), (0, 0, 1, Some(1))],
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(
            got[2],
            EventKind::Drive {
                branch: Some(1),
                ..
            }
        ));
    }

    #[test]
    fn a_patch_is_announced_alone_and_a_kept_compensation_not_at_all() {
        let parked = StepOutput::Quarantine { reason: "r".into() };
        assert_eq!(
            events(&StepInput::Patch, &parked, &[]),
            [EventKind::Patched]
        );
        let kept = StepOutput::Compensate {
            call_seq: 4,
            registered: 1,
            link: 0,
            method: 0,
        };
        assert!(events(&StepInput::Redeliver { call_seq: 4 }, &kept, &[]).is_empty());
    }
}
