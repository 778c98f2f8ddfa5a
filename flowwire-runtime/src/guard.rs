//! Running user code that may panic: a wire, a continuation, an impulse, a probe, a
//! migration, a patch, a driver. A panic there is the user's bug, never the engine's: it
//! is caught here — the one place the runtime catches panics — and turned into a reason an
//! operator can read.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::task::Poll;

/// Runs user code; a panic comes back as its message.
///
/// `AssertUnwindSafe` is sound here because every caller drops or rebuilds what the code
/// touched when it panicked: the core parks the instance with its *committed* state (the
/// flow is rebuilt from the record), a probe runs on a flow nobody else sees, a patch on
/// a state that is thrown away.
pub(crate) fn guard<T>(user: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(user)).map_err(|p| panic_message(&*p))
}

/// Polls a future of user code (a driver call), turning a panic into its message; no
/// allocation, no extra task. The future is dropped after a panic, never polled again.
pub(crate) async fn guard_future<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    let mut fut = pin!(fut);
    std::future::poll_fn(move |cx| match guard(|| fut.as_mut().poll(cx)) {
        Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
        Ok(Poll::Pending) => Poll::Pending,
        Err(message) => Poll::Ready(Err(message)),
    })
    .await
}

/// The message a panic carried (`panic!("…")` with a literal or a formatted string).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{guard, panic_message};

    #[test]
    fn a_panic_message_is_read_from_either_string_payload() {
        let literal = std::panic::catch_unwind(|| panic!("literal")).unwrap_err();
        assert_eq!(panic_message(&*literal), "literal");
        let n = 7;
        let formatted = std::panic::catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(panic_message(&*formatted), "formatted 7");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(&*other), "a non-string panic payload");
    }

    #[test]
    fn guarded_code_gives_its_value_or_its_panic_message() {
        assert_eq!(guard(|| 7), Ok(7));
        assert_eq!(guard(|| -> u8 { panic!("torn") }), Err("torn".to_string()));
    }
}
