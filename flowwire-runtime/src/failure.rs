//! [`Failure`]: why a flow failed, for people and, when typed, for programs.

use std::fmt;

use bytes::Bytes;
use flowwire_storage::ErrorValue;
use serde::Serialize;

use crate::driver::DriveError;

/// Why a continuation (or a wire, through `Command::fail`) failed the flow: a message, and
/// possibly a typed value the caller gets back with [`Ended::error`](crate::Ended::error).
///
/// Any error type converts into it with `?`, like `anyhow::Error`, as a message. A driver's
/// error ([`DriveError`]) converts into a typed failure: the driver's own error value (or
/// the runtime's [`Fault`](crate::Fault)) is kept with its type's name, so a caller can tell
/// a declined card from a timeout without reading strings. [`Failure::typed`] makes one
/// from any serializable error.
///
/// ```
/// use flowwire::Failure;
/// # #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
/// # pub enum SignupError { EmailTaken }
/// # impl std::fmt::Display for SignupError {
/// #     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("the email is taken") }
/// # }
/// fn parse(s: &str) -> Result<u32, Failure> {
///     Ok(s.parse::<u32>()?)
/// }
/// assert!(parse("x").unwrap_err().to_string().contains("invalid digit"));
/// assert_eq!(Failure::msg("out of stock").to_string(), "out of stock");
///
/// let taken = Failure::typed(&SignupError::EmailTaken);
/// assert_eq!(taken.to_string(), "the email is taken");
/// assert!(taken.error().is_some_and(|e| e.type_name.ends_with("SignupError")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    message: String,
    error: Option<ErrorValue>,
}

impl Failure {
    /// A failure with the given message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            error: None,
        }
    }

    /// A typed failure: the message is the error's `Display`; the value is stored with the
    /// failure, named by its type, for [`Ended::error`](crate::Ended::error). An error that
    /// does not encode keeps its message alone.
    pub fn typed<E: Serialize + fmt::Display + ?Sized>(error: &E) -> Self {
        Self {
            message: error.to_string(),
            error: error_value(error),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The typed value, if the failure carries one.
    pub fn error(&self) -> Option<&ErrorValue> {
        self.error.as_ref()
    }

    pub(crate) fn into_parts(self) -> (String, Option<ErrorValue>) {
        (self.message, self.error)
    }

    pub(crate) fn from_parts(message: String, error: Option<ErrorValue>) -> Self {
        Self { message, error }
    }
}

/// `error` encoded with postcard and named by its type; `None` if it does not encode.
fn error_value<E: Serialize + ?Sized>(error: &E) -> Option<ErrorValue> {
    let mut out = Vec::new();
    flowwire_storage::codec::encode_raw(error, &mut out).ok()?;
    Some(ErrorValue {
        type_name: std::any::type_name::<E>().to_string(),
        value: Bytes::from(out),
    })
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self {
            message,
            error: None,
        }
    }
}

/// A call's failure fails the flow with it, typed: the driver's own error value (type `E`),
/// or the runtime's [`Fault`](crate::Fault).
impl<E: Serialize + fmt::Display> From<DriveError<E>> for Failure {
    fn from(e: DriveError<E>) -> Self {
        let error = match &e {
            DriveError::Driver(d) => error_value(d),
            DriveError::Runtime(f) => error_value(f),
        };
        Self {
            message: e.to_string(),
            error,
        }
    }
}
