//! [`Ended`]: how an instance ended, as `finished()` reports it.

use flowwire_storage::ErrorValue;
use serde::de::DeserializeOwned;

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ended {
    /// The wire returned `Command::finish()`.
    Finished,
    /// The wire returned `Command::fail(..)`, or a continuation returned `Err`.
    Failed {
        /// Why, for people.
        reason: String,
        /// The typed failure, when the flow failed with one: a driver's error that a
        /// continuation passed on with `?`, or a [`Failure::typed`](crate::Failure::typed).
        /// Read it with [`Ended::error`].
        error: Option<ErrorValue>,
    },
    /// The instance was cancelled (`Handle::cancel`, `Engine::cancel`) and its
    /// compensations have run.
    Cancelled {
        /// Why, as the canceller said.
        reason: String,
    },
}

impl Ended {
    /// Whether the state the instance ended with is final: it finished or was cancelled.
    /// A failed instance can still be rewound by an operator.
    pub(crate) fn state_is_final(&self) -> bool {
        matches!(self, Ended::Finished | Ended::Cancelled { .. })
    }

    /// How the instance of `record` ended, if it has.
    pub(crate) fn of<P, S>(record: &flowwire_storage::Record<P, S>) -> Option<Ended> {
        use flowwire_storage::Status;
        match &record.status {
            Status::Finished => Some(Ended::Finished),
            Status::Failed { reason } => Some(Ended::Failed {
                reason: reason.clone(),
                error: record.error.clone(),
            }),
            Status::Cancelled { reason } => Some(Ended::Cancelled {
                reason: reason.clone(),
            }),
            _ => None,
        }
    }

    /// The typed failure as an `E`, if the flow failed with a value of that type (its
    /// type's name is checked before its bytes are decoded, so another type's value is
    /// never misread as an `E`).
    ///
    /// ```
    /// # async fn demo(h: flowwire::Handle<impl flowwire::Flow>) -> flowwire::Result<()> {
    /// # #[derive(Debug, serde::Deserialize)] enum PaymentError { Declined, Busy }
    /// let status = match h.finished().await? {
    ///     flowwire::Ended::Finished => 200,
    ///     ended => match ended.error::<PaymentError>() {
    ///         Some(PaymentError::Declined) => 402,
    ///         _ => 500,
    ///     },
    /// };
    /// # let _ = status; Ok(()) }
    /// ```
    pub fn error<E: DeserializeOwned>(&self) -> Option<E> {
        let Ended::Failed {
            error: Some(error), ..
        } = self
        else {
            return None;
        };
        if error.type_name != std::any::type_name::<E>() {
            return None;
        }
        flowwire_storage::codec::decode_raw(&error.value, error.value.len()).ok()
    }
}
