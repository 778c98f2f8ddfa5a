//! Planning a command: what the wire's answer asks of the step being built — its status,
//! the call it keeps or sends, a fan-out, a timer — decided from the command and the
//! committed record alone. It touches no instance, runs no user code and reads no clock
//! (the time is the step's, given to the entry point); only the scratch buffers are used,
//! to encode calls. Adding a command kind adds an arm here.

use flowwire_storage::{Fan, LiveRecord, PendingCall, Status, StepOutput, TimeSpec, Timer};

use crate::board::CallSet;
use crate::command::{CommandKind, Join, Wake};
use crate::failure::Failure;
use crate::flow::Flow;

use super::fan::{encode_branch, fan_output, fan_timer, same_fan, top_up};
use super::{Armed, Awaiting, Dispatches, FanArmed, MAX_BRANCHES, Scratch, one};

/// Fan-outs without calls one step may join before the wire is taken to loop.
const EMPTY_JOINS: u32 = 8;

/// What a command asks of the step being built.
// Returned by value once a step and never stored: boxing the large variant would cost the
// core step its zero allocations (tests/allocations.rs asserts them).
#[allow(clippy::large_enum_variant)]
pub(super) enum Plan<F: Flow> {
    /// Write a step with this status and output, keeping or sending this call or fan-out,
    /// arming this timer; the instance then awaits `awaiting` (`None`: what it awaited
    /// stays as it was, for a wait or the end).
    Write {
        status: Status,
        pending: Option<PendingCall>,
        dispatch: Dispatches,
        output: StepOutput,
        timer: Option<Timer>,
        fan: Option<Fan>,
        awaiting: Option<Awaiting<F>>,
    },
    /// The flow fails, with this failure: its compensations run.
    Fail(Failure),
    /// A fan-out without calls: its join continuation runs at once.
    JoinNow(Wake<F>),
    /// The command cannot be carried out: the instance is parked, for this reason.
    Park(String),
}

/// Plans the command `kind` the wire returned for step `seq`, on the committed `record`.
/// `keep_pending`: a call, fan-out or timer the record has in flight and the command asks
/// for again is kept, not sent or armed anew (after an impulse). `joined`: fan-outs
/// without calls joined at once already in this step.
#[inline]
pub(super) fn plan<F: Flow>(
    kind: CommandKind<F>,
    record: &LiveRecord,
    keep_pending: bool,
    seq: u64,
    joined: u32,
    scratch: &mut Scratch,
) -> Plan<F> {
    match kind {
        CommandKind::Drive { call, then, undo } => {
            scratch.call.clear();
            if let Err(e) = call.encode(&mut scratch.call) {
                return Plan::Park(format!("the wire's call could not be encoded: {e}"));
            }
            let (link, method) = (call.link(), call.method());
            let kept = record.pending.as_ref().filter(|p| {
                keep_pending && p.link == link && p.method == method && p.call == scratch.call
            });
            // A kept call waiting out a backoff keeps its timer.
            let timer = kept.and(record.timer);
            let (pending, dispatch) = match kept {
                Some(p) => (p.clone(), Dispatches::new()),
                None => {
                    let p = PendingCall {
                        seq,
                        link,
                        method,
                        call: scratch.arena.take(&mut scratch.call),
                        redelivered: 0,
                        attempts: 0,
                    };
                    (p.clone(), one(p))
                }
            };
            let awaiting = Awaiting::Call(Armed {
                seq: pending.seq,
                then,
                undo,
            });
            let output = StepOutput::Drive {
                call_seq: pending.seq,
                link,
                method,
            };
            Plan::Write {
                status: Status::Running,
                pending: Some(pending),
                dispatch,
                output,
                timer,
                fan: None,
                awaiting: Some(awaiting),
            }
        }
        CommandKind::Fan {
            calls,
            parallel,
            join,
        } => {
            let kept = record.fan.as_ref().filter(|f| {
                keep_pending && record.status == Status::Running && same_fan(f, &calls, &join)
            });
            if let Some(f) = kept {
                let f = f.clone();
                return Plan::Write {
                    status: Status::Running,
                    pending: None,
                    dispatch: Dispatches::new(),
                    output: fan_output(&f),
                    timer: fan_timer(&f),
                    awaiting: Some(Awaiting::Fan(FanArmed { seq: f.seq, join })),
                    fan: Some(f),
                };
            }
            if calls.len() > MAX_BRANCHES {
                return Plan::Park(format!(
                    "the wire returned a fan-out of {} calls; at most {MAX_BRANCHES} are allowed (split the work into several fan-outs)",
                    calls.len()
                ));
            }
            if calls.is_empty() {
                let Join::All { then, .. } = join else {
                    return Plan::Park("the wire returned `first` over a fan-out without calls: there is no outcome to continue with (return another command when there is nothing to race)".to_string());
                };
                if joined >= EMPTY_JOINS {
                    return Plan::Park(format!(
                        "the wire returned a fan-out without calls {EMPTY_JOINS} times in a row: its join continuation must change the state so that the wire moves on"
                    ));
                }
                // Nothing to wait for: join at once.
                return Plan::JoinNow(then);
            }
            let mut branches = Vec::with_capacity(calls.len());
            for (i, (call, undo)) in calls.iter().enumerate() {
                match encode_branch(seq, call, undo.as_ref(), &mut scratch.call) {
                    Ok(b) => branches.push(b),
                    Err(e) => {
                        return Plan::Park(format!(
                            "branch {i} of the wire's fan-out could not be encoded: {e}"
                        ));
                    }
                }
            }
            let mut f = Fan {
                seq,
                first: join.is_first(),
                parallel,
                branches,
            };
            let dispatch = top_up(&mut f);
            Plan::Write {
                status: Status::Running,
                pending: None,
                dispatch,
                output: fan_output(&f),
                timer: None,
                fan: Some(f),
                awaiting: Some(Awaiting::Fan(FanArmed { seq, join })),
            }
        }
        CommandKind::Wait => Plan::Write {
            status: Status::Waiting,
            pending: None,
            dispatch: Dispatches::new(),
            output: StepOutput::Wait,
            timer: None,
            fan: None,
            awaiting: None,
        },
        CommandKind::Timer { spec, wait, wake } => {
            let was = if wait {
                Status::Waiting
            } else {
                Status::Sleeping
            };
            let kept = record
                .timer
                .filter(|t| keep_pending && t.spec == spec && record.status == was);
            let due_ms = match kept {
                Some(t) => t.due_ms,
                None => match spec {
                    TimeSpec::After(ms) => scratch.now_ms.saturating_add(ms),
                    TimeSpec::At(at) => at,
                },
            };
            let output = if wait {
                StepOutput::WaitUntil { due_ms }
            } else {
                StepOutput::Sleep { due_ms }
            };
            Plan::Write {
                status: was,
                pending: None,
                dispatch: Dispatches::new(),
                output,
                timer: Some(Timer { due_ms, spec }),
                fan: None,
                awaiting: Some(Awaiting::Timer { due_ms, wake }),
            }
        }
        CommandKind::Finish => Plan::Write {
            status: Status::Finished,
            pending: None,
            dispatch: Dispatches::new(),
            output: StepOutput::Finish,
            timer: None,
            fan: None,
            awaiting: None,
        },
        CommandKind::Fail(f) => Plan::Fail(f),
    }
}
