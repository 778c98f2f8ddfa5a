//! Checking an upgrade before a deploy: what the code of this flow version would do with a
//! live instance some version wrote, computed exactly as a loading engine would — the
//! record rebuilt (migrated or parked), then the continuation of what it awaits rederived
//! from the wire — but without writing anything.

use flowwire_storage::{InstanceKey, Record, Status, StepOutput};

use crate::flow::Flow;

use super::{Instance, Scratch, Step};

/// What this flow version would do with a live instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// It loads and goes on.
    Runs,
    /// A newer version wrote it: this version leaves it as it is.
    Newer {
        /// That version.
        written: u32,
    },
    /// It would be parked, for this reason.
    Parks {
        /// The version that wrote it.
        written: u32,
        /// The reason it would be parked with.
        reason: String,
    },
}

/// What flow `F`'s code (this version's) would do with the stored `record` of instance
/// `key`: load it and go on, leave it (a newer version wrote it), or park it, with the
/// reason it would give. Runs the wire (guarded) where a loading engine would: to rederive
/// the continuation of a call, a fan-out or a timer in flight.
pub fn check_upgrade<F: Flow>(key: InstanceKey, record: Record, limit: usize) -> Upgrade {
    let written = record.flow_version;
    if written > F::VERSION {
        return Upgrade::Newer { written };
    }
    let mut scratch = Scratch::default();
    let parks = |step: &Step| Upgrade::Parks {
        written,
        reason: match &step.draft.output {
            StepOutput::Quarantine { reason } => reason.clone(),
            other => format!("{other:?}"),
        },
    };
    match Instance::<F>::recover(key.clone(), record.clone(), 1, limit, 0, &mut scratch) {
        Err(e) if written != F::VERSION => {
            parks(&Instance::<F>::park_unreadable(key, &record, 1, &e, 0))
        }
        Err(e) => Upgrade::Parks {
            written,
            reason: format!("the state does not decode: {e}"),
        },
        Ok((_, Some(step))) => parks(&step),
        Ok((mut inst, None)) => match inst.rederive_awaited(&mut scratch) {
            Ok(()) => Upgrade::Runs,
            Err(reason) => Upgrade::Parks { written, reason },
        },
    }
}

impl<F: Flow> Instance<F> {
    /// Rederives, from the wire, the continuation of what the instance awaits (a call, a
    /// fan-out, a timer), as the first outcome or fire after a restart does: `Err` with the
    /// reason it would be parked for.
    fn rederive_awaited(&mut self, scratch: &mut Scratch) -> Result<(), String> {
        let r = &self.record;
        match r.status {
            // A call of a failing or cancelled instance is a compensation: no wire.
            Status::Running if r.failing.is_none() => {
                if let Some(fan) = r.fan.clone() {
                    self.rederive_fan(&fan).map(drop)
                } else if let Some(pending) = r.pending.clone() {
                    self.rederive(&pending, scratch).map(drop)
                } else {
                    Ok(())
                }
            }
            Status::Sleeping | Status::Waiting => match r.timer {
                Some(timer) => self.rederive_timer(&timer).map(drop),
                // The wire runs afresh on the next impulse: nothing to rederive.
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}
