//! A parent's children when it unwinds: each child still running, and not detached, gets a
//! cancelling call at the top of the compensation stack, so it is cancelled (durably, once)
//! before the parent's own compensations run.

use flowwire_storage::{BranchState, Compensation, Status};

use crate::child::{CANCEL, CHILD_LINK, ChildOp, START};
use crate::flow::Flow;

use super::fan::branch_out;
use super::{Dispatches, Instance, Outgoing};

impl<F: Flow> Instance<F> {
    /// The child calls in flight (starts and cancels), to send again to this process's
    /// child service after a clean handover of the shard: unlike driver calls, they do not
    /// wait on the bus.
    pub fn child_calls(&self) -> Dispatches {
        let mut out = Dispatches::new();
        if let Some(p) = &self.record.pending
            && p.link == CHILD_LINK
            && !self.record.status.is_terminal()
        {
            out.push(Outgoing {
                call: p.clone(),
                branch: None,
            });
        }
        if let Some(fan) = &self.record.fan {
            for (i, b) in fan.in_flight() {
                if let (CHILD_LINK, BranchState::Sent { redelivered }) = (b.link, b.state) {
                    out.push(branch_out(fan.seq, i, b, redelivered));
                }
            }
        }
        out
    }

    /// The compensations that cancel the children the instance has running, for a parent
    /// that starts to unwind (fails or is cancelled) for `reason`: none while it already
    /// compensates, and none for the child whose outcome is being applied (it has ended).
    pub(super) fn child_cancels(&self, reason: &str) -> Vec<Compensation> {
        if !matches!(
            self.record.status,
            Status::Running | Status::Waiting | Status::Sleeping
        ) {
            return Vec::new();
        }
        let why = format!("its parent `{}/{}` stopped: {reason}", F::NAME, self.key.id);
        let mut running = Vec::new();
        if let Some(p) = &self.record.pending
            && self.delivered != Some((p.seq, None))
        {
            running.push((p.seq, p.link, p.method, &p.call));
        }
        if let Some(fan) = &self.record.fan {
            running.extend(
                fan.in_flight()
                    .filter(|(i, _)| self.delivered != Some((fan.seq, Some(*i))))
                    .map(|(_, b)| (fan.seq, b.link, b.method, &b.call)),
            );
        }
        running
            .into_iter()
            .filter(|(_, link, method, _)| *link == CHILD_LINK && *method == START)
            .filter_map(|(seq, _, _, call)| {
                // The record's own call decoded when it was written; one that does not now
                // has nothing this could cancel by name.
                let op = ChildOp::decode(call, self.limit).ok()?.cancel_for(&why)?;
                let call = op.encode().ok()?;
                Some(Compensation {
                    seq,
                    link: CHILD_LINK,
                    method: CANCEL,
                    call: call.into(),
                })
            })
            .collect()
    }
}
