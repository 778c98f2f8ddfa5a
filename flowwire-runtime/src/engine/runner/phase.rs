//! [`Phase`]: where a resident instance stands in the runner's pipeline.

/// Where a resident instance stands in the runner's pipeline. Each carries the number of
/// the last batch that took a message for it (at most one message per instance a batch):
/// read against the runner's `round` (the batch being built) and `flight_round` (the one
/// being written), it says whether the instance is in the batch being built, in the one
/// being written, or committed — without a pass over the instances when a batch is sent.
/// An instance that is not resident is either being read (`Runner::loading`) or stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Its last step is in batch `round` (being built, being written, or committed).
    Batched { round: u64 },
    /// Its last step's blobs are being written on a task of their own (it took its message
    /// for batch `round`); the step joins the batch being built when they land, and
    /// inputs that would write wait in the slot's `held` until then.
    Uploading { round: u64 },
}

impl Phase {
    /// The last batch that took a message for the instance.
    pub(super) fn round(self) -> u64 {
        match self {
            Phase::Batched { round } | Phase::Uploading { round } => round,
        }
    }

    pub(super) fn uploading(self) -> bool {
        matches!(self, Phase::Uploading { .. })
    }

    /// The same phase, having taken a message for batch `round` (a probe is taken while
    /// an upload runs: the instance stays uploading).
    pub(super) fn taken_for(self, round: u64) -> Phase {
        match self {
            Phase::Batched { .. } => Phase::Batched { round },
            Phase::Uploading { .. } => Phase::Uploading { round },
        }
    }
}
