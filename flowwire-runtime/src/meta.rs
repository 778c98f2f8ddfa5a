//! Static metadata the macros generate: flows, their links, impulses and probes, and the
//! drivers with their methods. All of it is `'static` data that serializes to JSON.
//!
//! ```
//! use flowwire_runtime::{DriverMeta, MethodMeta, ArgMeta};
//! static PAYMENT: DriverMeta = DriverMeta {
//!     name: "Payment",
//!     timeout_ms: Some(30_000),
//!     retries: Some(5),
//!     methods: &[MethodMeta {
//!         name: "charge",
//!         args: &[ArgMeta { name: "cents", ty: "u64" }],
//!         result: "Result<ChargeId, PaymentError>",
//!     }],
//! };
//! assert_eq!(PAYMENT.methods[0].name, "charge");
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

/// A method of a driver.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MethodMeta {
    /// Its name.
    pub name: &'static str,
    /// Its arguments (without `&self`).
    pub args: &'static [ArgMeta],
    /// Its result type, as written.
    pub result: &'static str,
}

/// A driver trait.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DriverMeta {
    /// The trait's name.
    pub name: &'static str,
    /// Per-attempt timeout from `#[driver(timeout = ..)]`, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Retries after a timed-out or panicking attempt, from `#[driver(retries = ..)]`.
    pub retries: Option<u32>,
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
}
