//! Continuations and their erasure: the types of what a wire hands the runtime to run
//! later, and the erasing of their result types, so that every drive of a flow fits one
//! type ([`Then`], and [`UndoWith`] for compensations built from a reply): the only
//! `unsafe` in the runtime. A leaf of the command module.
//!
//! # Safety invariant
//! A [`Then`] holds a function pointer `raw` whose real type is `Continuation<F, R>` or
//! `Each<F, R>`, stored as `fn()`, and the monomorphized `run::<F, R>` or `run_each::<F, R>`
//! that transmutes it back. Both fields are written together, by [`Then::new`] and
//! [`Then::each`] only, and never changed after: `raw` is therefore only ever called as the
//! type it was made from. An [`UndoWith`] pairs an `UndoFrom<R, C, U>` with
//! `run_undo::<F, R, C, U>` the same way, in [`UndoWith::new`] only. Transmuting between
//! function pointer types of the same size is sound; calling through the wrong type would
//! not be, and this pairing is what rules it out.

#![allow(unsafe_code)]

use crate::board::Board;
use crate::driver::{Call, DriveError, Fault, Reply};
use crate::failure::Failure;

/// The outcome a continuation receives for a call returning `R`.
pub type Outcome<R> = Result<<R as Reply>::Ok, DriveError<<R as Reply>::Err>>;

/// A continuation: a non-capturing closure or a plain `fn`.
pub type Continuation<F, R> = fn(&mut F, Outcome<R>) -> Result<(), Failure>;

/// A compensation built from the reply of the call it undoes ([`Drive::compensate_with`](super::Drive::compensate_with)):
/// a non-capturing closure or a plain `fn` from the call's `Ok` value to the undoing call.
pub type UndoFrom<R, C, U> = fn(&<R as Reply>::Ok) -> Call<C, U>;

/// A branch's continuation: the flow, the branch's index (its position in the fan-out) and
/// its outcome. A non-capturing closure or a plain `fn`.
pub type Each<F, R> = fn(&mut F, usize, Outcome<R>) -> Result<(), Failure>;

/// What reached the continuation: the encoded reply or the runtime's fault.
pub(crate) enum Delivered<'a> {
    Reply(&'a bytes::Bytes),
    Fault(&'a Fault),
}

/// What running a continuation produced, besides a changed state.
pub(crate) enum ThenError {
    /// The continuation returned `Err`: the flow fails.
    Failed(Failure),
    /// The reply did not decode as the method's result type.
    Decode(String),
}

/// A continuation with its result type erased, so every drive of a flow fits one type.
#[allow(clippy::type_complexity)] // a fn pointer signature, named once here
pub(crate) struct Then<F> {
    raw: fn(),
    run: fn(fn(), &mut F, Delivered<'_>, usize, usize) -> Result<(), ThenError>,
}

/// A compensation built from a reply ([`UndoFrom`](super::UndoFrom)), with its types erased, so every drive
/// of a flow fits one type.
#[allow(clippy::type_complexity)] // a fn pointer signature, named once here
pub(crate) struct UndoWith<F: Board> {
    raw: fn(),
    run: fn(fn(), &[u8], usize) -> Result<Option<F::Call>, String>,
}

impl<F: Board> Clone for UndoWith<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Board> Copy for UndoWith<F> {}

impl<F> Clone for Then<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Then<F> {}

impl<F: Board> Then<F> {
    pub(crate) fn new<R: Reply>(k: Continuation<F, R>) -> Self {
        // SAFETY: transmuting between function pointer types is sound; `raw` is only
        // ever called after `run::<F, R>` transmutes it back to this exact type.
        let raw = unsafe { std::mem::transmute::<Continuation<F, R>, fn()>(k) };
        Self {
            raw,
            run: run::<F, R>,
        }
    }

    pub(crate) fn each<R: Reply>(k: Each<F, R>) -> Self {
        // SAFETY: as in `new`; `raw` is only called by `run_each::<F, R>`.
        let raw = unsafe { std::mem::transmute::<Each<F, R>, fn()>(k) };
        Self {
            raw,
            run: run_each::<F, R>,
        }
    }

    /// Runs the continuation; `branch` is the fan-out branch's index (ignored by a
    /// drive's continuation).
    pub(crate) fn call(
        self,
        flow: &mut F,
        delivered: Delivered<'_>,
        limit: usize,
        branch: usize,
    ) -> Result<(), ThenError> {
        (self.run)(self.raw, flow, delivered, limit, branch)
    }
}

fn run<F: Board, R: Reply>(
    raw: fn(),
    flow: &mut F,
    delivered: Delivered<'_>,
    limit: usize,
    _branch: usize,
) -> Result<(), ThenError> {
    // SAFETY: `raw` was made from a `Continuation<F, R>` in `Then::new::<R>`, which is
    // the only place that pairs it with `run::<F, R>`.
    let k = unsafe { std::mem::transmute::<fn(), Continuation<F, R>>(raw) };
    let outcome = outcome::<R>(delivered, limit)?;
    k(flow, outcome).map_err(ThenError::Failed)
}

fn run_each<F: Board, R: Reply>(
    raw: fn(),
    flow: &mut F,
    delivered: Delivered<'_>,
    limit: usize,
    branch: usize,
) -> Result<(), ThenError> {
    // SAFETY: `raw` was made from an `Each<F, R>` in `Then::each::<R>`, the only place
    // that pairs it with `run_each::<F, R>`.
    let k = unsafe { std::mem::transmute::<fn(), Each<F, R>>(raw) };
    let outcome = outcome::<R>(delivered, limit)?;
    k(flow, branch, outcome).map_err(ThenError::Failed)
}

fn outcome<R: Reply>(delivered: Delivered<'_>, limit: usize) -> Result<Outcome<R>, ThenError> {
    Ok(match delivered {
        // A large `Blob` in the reply is a slice of the reply's buffer, not a copy.
        Delivered::Reply(bytes) => {
            match flowwire_storage::rope::codec::decode_shared::<R>(bytes, limit) {
                Ok(reply) => reply.into_result().map_err(DriveError::Driver),
                Err(e) => return Err(ThenError::Decode(e.to_string())),
            }
        }
        Delivered::Fault(fault) => Err(DriveError::Runtime(fault.clone())),
    })
}

impl<F: Board> UndoWith<F> {
    pub(crate) fn new<R: Reply, C, U: Reply>(k: UndoFrom<R, C, U>) -> Self
    where
        F::Call: From<C>,
    {
        // SAFETY: as in `Then::new`; `raw` is only called by `run_undo::<F, R, C, U>`.
        let raw = unsafe { std::mem::transmute::<UndoFrom<R, C, U>, fn()>(k) };
        Self {
            raw,
            run: run_undo::<F, R, C, U>,
        }
    }

    /// Builds the compensating call from the encoded reply of the call it undoes: `None`
    /// when the reply is the driver's error (nothing to undo); `Err` when it does not
    /// decode as the method's result type.
    pub(crate) fn build(self, reply: &[u8], limit: usize) -> Result<Option<F::Call>, String> {
        (self.run)(self.raw, reply, limit)
    }
}

fn run_undo<F: Board, R: Reply, C, U: Reply>(
    raw: fn(),
    reply: &[u8],
    limit: usize,
) -> Result<Option<F::Call>, String>
where
    F::Call: From<C>,
{
    // SAFETY: `raw` was made from an `UndoFrom<R, C, U>` in `UndoWith::new`, the only
    // place that pairs it with `run_undo::<F, R, C, U>`.
    let k = unsafe { std::mem::transmute::<fn(), UndoFrom<R, C, U>>(raw) };
    let reply =
        flowwire_storage::codec::decode_raw::<R>(reply, limit).map_err(|e| e.to_string())?;
    Ok(match reply.into_result() {
        Ok(value) => Some(F::Call::from(k(&value).into_call())),
        Err(_) => None,
    })
}
