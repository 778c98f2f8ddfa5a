//! [`CallContext`]: what a driver can know about the call it serves.

use std::sync::Arc;

tokio::task_local! {
    static CONTEXT: CallContext;
}

/// The context of the driver call being served: which instance, which step, which attempt.
///
/// Available inside a driver method through [`CallContext::current`]. Pass
/// [`idempotency_key`](CallContext::idempotency_key) to the external service so that a call
/// executed twice (drivers run at least once) has its effect once.
///
/// ```
/// use flowwire::CallContext;
/// // Outside a driver call there is no context.
/// assert!(CallContext::current().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    flow: &'static str,
    instance: Arc<str>,
    seq: u64,
    branch: Option<u32>,
    attempt: u32,
    redelivered: u32,
}

impl CallContext {
    /// The context of the call this task is serving, if it is serving one.
    pub fn current() -> Option<CallContext> {
        CONTEXT.try_with(Clone::clone).ok()
    }

    /// The flow's name.
    pub fn flow(&self) -> &str {
        self.flow
    }

    /// The instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The step that issued the call.
    pub fn step(&self) -> u64 {
        self.seq
    }

    /// The attempt within this delivery, from 1: it grows when an attempt timed out or
    /// panicked and the call's policy retries it.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many times a restart of the engine interrupted this call before this delivery
    /// (0 on the first). Above 0 the call may already have had its effect: pass the
    /// [`idempotency_key`](CallContext::idempotency_key) to the service, or check it.
    /// (Redeliveries do not use up the call's retries: a restart may come before the call
    /// started at all.)
    pub fn redelivered(&self) -> u32 {
        self.redelivered
    }

    /// The index of the fan-out branch this call is (`None` for a drive or a compensation).
    pub fn branch(&self) -> Option<u32> {
        self.branch
    }

    /// `flow/instance/step` (`flow/instance/step.branch` for a fan-out branch): the same
    /// for every execution of this call, across retries and crashes, and different for
    /// every other call.
    pub fn idempotency_key(&self) -> String {
        match self.branch {
            None => format!("{}/{}/{}", self.flow, self.instance, self.seq),
            Some(b) => format!("{}/{}/{}.{b}", self.flow, self.instance, self.seq),
        }
    }

    pub(crate) fn new(
        flow: &'static str,
        instance: Arc<str>,
        seq: u64,
        branch: Option<u32>,
        attempt: u32,
        redelivered: u32,
    ) -> Self {
        Self {
            flow,
            instance,
            seq,
            branch,
            attempt,
            redelivered,
        }
    }

    /// `f`, run with this context as the current one; the context can be taken back out
    /// of the returned future ([`tokio::task::futures::TaskLocalFuture::take_value`]).
    pub(crate) fn scope<F: std::future::Future>(
        self,
        f: F,
    ) -> tokio::task::futures::TaskLocalFuture<CallContext, F> {
        CONTEXT.scope(self, f)
    }

    /// The instance id, given back (the context is done with).
    pub(crate) fn into_instance(self) -> Arc<str> {
        self.instance
    }
}
