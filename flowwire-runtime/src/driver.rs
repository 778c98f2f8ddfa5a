//! Drivers: the traits `#[driver]` implements, the typed [`Call`] a proxy builds, and the
//! errors a continuation can receive.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::meta::DriverMeta;

/// A typed driver call: built by a driver proxy, run by nothing until a wire returns it in
/// `Command::drive(call).then(..)`.
///
/// `C` is the driver's call enum (e.g. `PaymentCall`), `R` the method's result type.
/// Building one moves the arguments into the enum and allocates nothing.
#[must_use = "a call does nothing by itself: return `Command::drive(call).then(..)` from the wire"]
pub struct Call<C, R> {
    call: C,
    _reply: PhantomData<fn() -> R>,
}

impl<C, R> Call<C, R> {
    #[doc(hidden)]
    pub const fn new(call: C) -> Self {
        Self {
            call,
            _reply: PhantomData,
        }
    }

    /// The call enum value.
    pub fn as_call(&self) -> &C {
        &self.call
    }

    pub(crate) fn into_call(self) -> C {
        self.call
    }
}

impl<C: fmt::Debug, R> fmt::Debug for Call<C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Call").field(&self.call).finish()
    }
}

/// The result type of a driver method: a `Result<T, E>` whose both sides cross the wire.
#[diagnostic::on_unimplemented(
    message = "driver methods return `Result<T, E>` with serializable `T` and `E`; `{Self}` is not one",
    label = "return `Result<T, E>` here",
    note = "both `T` and `E` must implement `Serialize` and `Deserialize`"
)]
pub trait Reply: Serialize + DeserializeOwned + Send + 'static {
    /// The success value.
    type Ok;
    /// The driver's own error.
    type Err;
    /// Splits the reply.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
}

impl<T, E> Reply for Result<T, E>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Serialize + DeserializeOwned + Send + 'static,
{
    type Ok = T;
    type Err = E;
    fn into_result(self) -> Result<T, E> {
        self
    }
}

/// Why the runtime, not the driver, ended a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Fault {
    /// The last attempt timed out (and so did every one before it that was retried).
    #[error("the driver call timed out after {timeout_ms} ms, {attempts} attempt(s)")]
    TimedOut {
        /// Attempts made.
        attempts: u32,
        /// The per-attempt timeout.
        timeout_ms: u64,
    },
    /// The driver panicked on the last attempt.
    #[error("the driver panicked after {attempts} attempt(s): {message}")]
    Panicked {
        /// Attempts made.
        attempts: u32,
        /// The panic message.
        message: String,
    },
    /// The call or its reply could not be encoded or decoded (a version skew between the
    /// flow and its driver).
    #[error("the call could not cross to or from the driver: {0}")]
    Codec(String),
}

/// What a continuation receives when a call did not succeed. `?` on it fails the flow
/// with a typed [`Failure`](crate::Failure) that keeps the error's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveError<E> {
    /// The driver returned its own error.
    Driver(E),
    /// The runtime gave up on the call (timeouts, panics).
    Runtime(Fault),
}

impl<E: fmt::Display> fmt::Display for DriveError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriveError::Driver(e) => write!(f, "driver error: {e}"),
            DriveError::Runtime(e) => e.fmt(f),
        }
    }
}

// `DriveError` does not implement `std::error::Error`, on purpose: `?` on it converts
// into a typed `Failure` (its value kept), which the blanket `From<E: Error>` (message
// only) would otherwise overlap.

/// Whether a driver's own error is worth another attempt.
///
/// A driver method's `Err` is retried under the call's policy (`#[driver(retries = ..,
/// backoff = ..)]`), each wait a durable timer, like a timeout or a panic. An error type
/// that implements `Transient` decides per value: an error for which
/// [`is_transient`](Transient::is_transient) returns `false` is permanent and reaches the
/// continuation at once. An error type that does not implement it is always transient.
///
/// Why a trait on the error type: whether trying again can help is a property of the
/// error's value (a declined card against a gateway that is down), and the error type is
/// where its author already says what each value means. One `impl` covers every method that
/// returns the type, signatures and continuations stay as they are, and the check costs a
/// match. An attribute on the method could not look at the value; a wrapper type would
/// change every signature and every continuation's `?`.
///
/// ```
/// use flowwire::prelude::*;
///
/// #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
/// pub enum PaymentError {
///     #[error("the card was declined")]
///     Declined,
///     #[error("the gateway is unavailable")]
///     Unavailable,
/// }
///
/// // A declined card stays declined: the continuation sees it at once. `Unavailable` is
/// // retried (3 times, from 200 ms) before the continuation sees it.
/// impl flowwire::Transient for PaymentError {
///     fn is_transient(&self) -> bool {
///         !matches!(self, PaymentError::Declined)
///     }
/// }
///
/// #[driver(retries = 3, backoff = "200ms")]
/// pub trait Payment {
///     async fn charge(&self, cents: u64) -> Result<String, PaymentError>;
/// }
/// # fn main() {}
/// ```
pub trait Transient {
    /// Whether another attempt may succeed (`true` unless overridden).
    fn is_transient(&self) -> bool {
        true
    }
}

/// How one attempt of a driver call ended, as the driver's dispatch reports it beside the
/// encoded reply.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The method returned `Ok`.
    Ok,
    /// The method returned `Err`; `transient` says whether another attempt may succeed.
    Err {
        /// See [`Transient`].
        transient: bool,
    },
}

/// Classifies a driver method's reply by its error's [`Transient`] implementation, falling
/// back to "transient" for error types without one. `#[driver]` calls
/// `(&&&Classify(&reply)).verdict()` on the concrete reply type, so method resolution picks
/// the most specific of the three `verdict` methods (autoref specialization).
#[doc(hidden)]
pub struct Classify<'a, R>(pub &'a R);

#[doc(hidden)]
pub mod classify {
    use super::{Classify, Transient, Verdict};

    /// The error type implements [`Transient`]: it decides.
    pub trait ByTrait {
        fn verdict(&self) -> Verdict;
    }
    impl<T, E: Transient> ByTrait for &&Classify<'_, Result<T, E>> {
        #[inline]
        fn verdict(&self) -> Verdict {
            match self.0 {
                Ok(_) => Verdict::Ok,
                Err(e) => Verdict::Err {
                    transient: e.is_transient(),
                },
            }
        }
    }

    /// Any other error type: transient.
    pub trait ByResult {
        fn verdict(&self) -> Verdict;
    }
    impl<T, E> ByResult for &Classify<'_, Result<T, E>> {
        #[inline]
        fn verdict(&self) -> Verdict {
            match self.0 {
                Ok(_) => Verdict::Ok,
                Err(_) => Verdict::Err { transient: true },
            }
        }
    }

    /// Not a `Result` at all: `assert_reply` has reported it already; this keeps the
    /// expansion to that one error.
    pub trait ByAny {
        fn verdict(&self) -> Verdict;
    }
    impl<R> ByAny for Classify<'_, R> {
        #[inline]
        fn verdict(&self) -> Verdict {
            Verdict::Ok
        }
    }
}

/// The call enum of a driver (`PaymentCall`): knows which method it calls.
pub trait DriverCall: Serialize + DeserializeOwned + Send + 'static {
    /// The method's index in declaration order.
    fn method(&self) -> u16;
}

/// A driver proxy (`PaymentProxy`), generated by `#[driver]`: zero-sized, `Copy`, builds calls.
pub trait Driver: Copy + Default + Send + Sync + 'static {
    /// Its call enum.
    type Call: DriverCall;
    /// Its metadata.
    const META: DriverMeta;
}

/// Dispatches the calls of a driver to an implementation `S` of its trait; `#[driver]`
/// implements it on the proxy for every `S` that implements the trait, so
/// `engine.driver(my_impl)` is all a user writes.
#[diagnostic::on_unimplemented(
    message = "`{S}` does not implement the driver trait of `{Self}`",
    note = "implement the driver trait for `{S}`; it must also be `Send + Sync + 'static`"
)]
pub trait Dispatch<S>: Driver {
    /// Runs one call on `svc`, encodes its reply (the method's `Result`) into `out`, and
    /// says whether it is an error worth another attempt.
    fn dispatch<'a>(
        svc: &'a S,
        call: Self::Call,
        out: &'a mut Vec<u8>,
    ) -> impl Future<Output = Result<Verdict, flowwire_storage::CodecError>> + Send + 'a;
}

/// Marks `Self` as an implementation of the driver `D`; `#[driver]` on an
/// `impl Trait for Type` block writes it, so the engine builder can tell which driver a value
/// serves from its type alone.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not marked as a driver implementation",
    label = "add `#[driver]` to the `impl DriverTrait for {Self}` block",
    note = "`#[driver]` on the impl block tells the engine which driver this type serves"
)]
pub trait Implements<D: Driver> {}
