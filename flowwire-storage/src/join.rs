//! The crate's async plumbing, low in it: the boxed future every trait object returns,
//! and a tiny `join_all` that polls futures concurrently on the current task (the crate
//! does not pull in a futures library for one function).

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future: the stores and tiers are used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs all futures concurrently on the current task; results in input order.
pub async fn join_all<T>(futs: impl IntoIterator<Item = BoxFuture<'_, T>>) -> Vec<T> {
    let mut futs: Vec<_> = futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future completed"))
        .collect()
}
