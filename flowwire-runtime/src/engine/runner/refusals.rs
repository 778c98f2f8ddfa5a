//! The errors the runner answers requests with: an instance that is not found, has
//! ended or is parked, an impulse it no longer takes, an operation it refuses.

use std::sync::Arc;

use flowwire_storage::Status;

use crate::core::Refused;
use crate::error::Error;
use crate::flow::Flow;

use super::Runner;

impl<F: Flow> Runner<F> {
    pub(super) fn quarantined(id: &str, reason: String) -> Error {
        Error::Quarantined {
            flow: F::NAME,
            id: id.to_string(),
            reason,
        }
    }

    pub(super) fn probe_panicked(id: &str, reason: String) -> Error {
        Error::ProbePanicked {
            flow: F::NAME,
            id: id.to_string(),
            reason,
        }
    }

    pub(super) fn not_found(id: &str) -> Error {
        Error::NotFound {
            flow: F::NAME,
            id: id.to_string(),
        }
    }

    pub(super) fn codec_error(id: &str, source: flowwire_storage::CodecError) -> Error {
        Error::Codec {
            flow: F::NAME,
            id: id.to_string(),
            what: "the record",
            source,
        }
    }

    /// The answer to an impulse an instance no longer takes: a retry of one it applied
    /// (say the `cancel` that ended it) is told so, as it would be while it ran.
    pub(super) fn refuse(
        &self,
        id: &Arc<str>,
        impulse_id: &Arc<str>,
        refusal: Error,
    ) -> crate::engine::BoxFut<Error> {
        let store = self.store.clone();
        let key = self.key(id);
        let impulse_id = impulse_id.clone();
        let limit = self.limits.store_timeout;
        Box::pin(async move {
            match tokio::time::timeout(limit, store.impulse_applied(&key, &impulse_id)).await {
                Ok(Ok(Some(step))) => Error::ImpulseAlreadyApplied {
                    flow: F::NAME,
                    id: key.id.to_string(),
                    impulse_id: impulse_id.to_string(),
                    step,
                },
                _ => refusal,
            }
        })
    }

    /// Why a request that needs a live instance cannot have one.
    pub(super) fn not_live(id: &str, status: Status) -> Error {
        match status {
            Status::Quarantined { reason } => Self::quarantined(id, reason),
            other => Error::Ended {
                flow: F::NAME,
                id: id.to_string(),
                status: other.name(),
            },
        }
    }

    pub(super) fn refused(id: &Arc<str>, op: &'static str, refused: Refused) -> Error {
        match refused {
            Refused::NotParked(status) => Error::NotParked {
                flow: F::NAME,
                id: id.to_string(),
                op,
                status,
            },
            Refused::PatchPanicked(message) => Error::PatchPanicked {
                flow: F::NAME,
                id: id.to_string(),
                message,
            },
            Refused::State(detail) => Error::Operation {
                flow: F::NAME,
                id: id.to_string(),
                op,
                detail,
            },
        }
    }
}
