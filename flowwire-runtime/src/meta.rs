//! Static metadata the macros generate: flows, their links, impulses and probes, and the
//! drivers with their methods. All of it is `'static` data that serializes to JSON.
//!
//! ```
//! use flowwire::{Ambiguous, ArgMeta, DriverMeta, MethodMeta, Policy};
//! static PAYMENT: DriverMeta = DriverMeta {
//!     name: "Payment",
//!     policy: Policy { timeout_ms: Some(30_000), retries: Some(5), ..Policy::NONE },
//!     methods: &[MethodMeta {
//!         name: "charge",
//!         args: &[ArgMeta { name: "cents", ty: "u64" }],
//!         result: "Result<ChargeId, PaymentError>",
//!         policy: Policy { ambiguous: Some(Ambiguous::Park), ..Policy::NONE },
//!     }],
//! };
//! assert_eq!(PAYMENT.methods[0].name, "charge");
//! assert_eq!(PAYMENT.policy.timeout_ms, Some(30_000));
//! ```

use serde::Serialize;

/// A named, typed argument.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ArgMeta {
    /// Its name.
    pub name: &'static str,
    /// Its type, as written.
    pub ty: &'static str,
}

/// What to do with a call that was in flight when the engine stopped: it may or may not
/// have run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ambiguous {
    /// Send it again (with the same idempotency key). The default.
    Retry,
    /// Park the instance for an operator, who checks the outside service and then resumes
    /// (the call is sent again) or rewinds it. For drivers that move money and have no
    /// idempotency key.
    Park,
}

/// The retry policy of a driver or one of its methods, as declared with
/// `#[driver(timeout = "30s", retries = 5, backoff = "100ms", max_backoff = "10s",
/// ambiguous = "park")]`. Unset fields fall back: method, then trait, then the engine's
/// defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Per-attempt timeout, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Attempts after the first, when an attempt times out or panics.
    pub retries: Option<u32>,
    /// The first backoff before a retry, in milliseconds; it doubles at each retry.
    pub backoff_ms: Option<u64>,
    /// The cap of the backoff, in milliseconds.
    pub max_backoff_ms: Option<u64>,
    /// What a restart does with the call in flight.
    pub ambiguous: Option<Ambiguous>,
}

impl Policy {
    /// Nothing declared.
    pub const NONE: Policy = Policy {
        timeout_ms: None,
        retries: None,
        backoff_ms: None,
        max_backoff_ms: None,
        ambiguous: None,
    };

    /// The built-in defaults, under every engine's own: 30 s per attempt, 3 retries, backoff
    /// from 50 ms to 5 s, calls in flight at a restart sent again.
    pub const DEFAULT: Policy = Policy {
        timeout_ms: Some(30_000),
        retries: Some(3),
        backoff_ms: Some(50),
        max_backoff_ms: Some(5_000),
        ambiguous: Some(Ambiguous::Retry),
    };

    /// This policy with the unset fields taken from `fallback`.
    #[must_use]
    pub const fn or(self, fallback: Policy) -> Policy {
        macro_rules! pick {
            ($f:ident) => {
                match self.$f {
                    Some(v) => Some(v),
                    None => fallback.$f,
                }
            };
        }
        Policy {
            timeout_ms: pick!(timeout_ms),
            retries: pick!(retries),
            backoff_ms: pick!(backoff_ms),
            max_backoff_ms: pick!(max_backoff_ms),
            ambiguous: pick!(ambiguous),
        }
    }
}

/// A method of a driver.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MethodMeta {
    /// Its name.
    pub name: &'static str,
    /// Its arguments (without `&self`).
    pub args: &'static [ArgMeta],
    /// Its result type, as written.
    pub result: &'static str,
    /// Its own policy, from `#[driver(..)]` on the method.
    pub policy: Policy,
}

/// A driver trait.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DriverMeta {
    /// The trait's name.
    pub name: &'static str,
    /// The trait's policy, from `#[driver(..)]` on the trait.
    pub policy: Policy,
    /// Its methods, in declaration order (the order of the call enum's discriminants).
    pub methods: &'static [MethodMeta],
}

/// A driver linked into a flow.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LinkMeta {
    /// The field's name.
    pub field: &'static str,
    /// The driver.
    pub driver: &'static DriverMeta,
}

/// An impulse of a flow.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ImpulseMeta {
    /// Its name.
    pub name: &'static str,
    /// Its arguments.
    pub args: &'static [ArgMeta],
}

/// A probe of a flow.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProbeMeta {
    /// Its name.
    pub name: &'static str,
    /// Its arguments.
    pub args: &'static [ArgMeta],
    /// Its result type, as written.
    pub result: &'static str,
}

/// A flow: what `#[flow]` knows about it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FlowMeta {
    /// The flow's name (its type's name unless renamed with `#[flow(name = "..")]`).
    pub name: &'static str,
    /// Its version, from `#[flow(version = N)]` (1 by default).
    pub version: u32,
    /// Its state type, as written.
    pub state: &'static str,
    /// Its wire method.
    pub wire: &'static str,
    /// Its linked drivers, in field order.
    pub links: &'static [LinkMeta],
    /// Its impulses.
    pub impulses: &'static [ImpulseMeta],
    /// Its probes.
    pub probes: &'static [ProbeMeta],
    /// Its `#[correlate]` method, if it declares a correlation key.
    pub correlation: Option<&'static str>,
}
