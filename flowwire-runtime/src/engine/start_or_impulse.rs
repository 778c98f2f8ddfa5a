//! Start-or-impulse (Temporal's signal-with-start): deliver an impulse to an instance
//! whether or not it exists yet, in one atomic step.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use super::Engine;
use super::msg::Msg;
use crate::error::Result;
use crate::flow::Flow;

impl Engine {
    /// Applies `impulse` to the live instance `id` of flow `F`; or, when no instance has
    /// that id, starts one from `state` with the impulse applied before its wire first runs.
    /// Either way it is one atomic step, and the impulse is applied once: give it an id
    /// with [`StartOrImpulse::id`] and a retried delivery (after a timeout, a restart, from
    /// another process) is told [`Error::ImpulseAlreadyApplied`](crate::Error::ImpulseAlreadyApplied)
    /// and changes nothing. An instance that has ended is refused
    /// ([`Error::Ended`](crate::Error::Ended)), as for any impulse.
    ///
    /// The history's first step of an instance started this way is
    /// `StepInput::StartWith` (with the impulse's id and name) instead of `Start`.
    ///
    /// ```
    /// use flowwire::prelude::*;
    ///
    /// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    /// pub struct Cart {
    ///     items: Vec<String>,
    ///     checked_out: bool,
    /// }
    ///
    /// #[flow]
    /// pub struct Shopping {
    ///     #[link]
    ///     state: Cart,
    /// }
    ///
    /// #[flow]
    /// impl Shopping {
    ///     #[wire]
    ///     fn run(&mut self) -> Command<Self> {
    ///         if self.state.checked_out { Command::finish() } else { Command::wait() }
    ///     }
    ///
    ///     #[impulse]
    ///     fn add(&mut self, item: String) {
    ///         self.state.items.push(item);
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> flowwire::Result<()> {
    /// let engine = Engine::builder().in_memory().flow::<Shopping>().start().await?;
    /// // The first item starts the cart; the second goes to the live one.
    /// for (n, item) in ["tea", "milk"].into_iter().enumerate() {
    ///     let add = ShoppingImpulse::Add { item: item.into() };
    ///     engine
    ///         .start_or_impulse::<Shopping>("cart-ann", Cart::default(), add)
    ///         .id(format!("req-{n}"))
    ///         .await?;
    /// }
    /// let cart = engine.handle::<Shopping>("cart-ann").await?;
    /// assert_eq!(cart.state().await?.items, ["tea", "milk"]);
    /// # Ok(()) }
    /// ```
    pub fn start_or_impulse<F: Flow>(
        &self,
        id: impl Into<Arc<str>>,
        state: F::State,
        impulse: F::Impulse,
    ) -> StartOrImpulse<'_, F> {
        StartOrImpulse {
            engine: self,
            id: id.into(),
            state,
            impulse,
            impulse_id: None,
        }
    }
}

/// A start-or-impulse on its way: `.await` it for the instance's handle; set the impulse's
/// id first with [`id`](StartOrImpulse::id) to make retries safe.
#[must_use = "a start-or-impulse is sent when it is awaited"]
pub struct StartOrImpulse<'a, F: Flow> {
    engine: &'a Engine,
    id: Arc<str>,
    state: F::State,
    impulse: F::Impulse,
    impulse_id: Option<Arc<str>>,
}

impl<F: Flow> StartOrImpulse<'_, F> {
    /// Sets the impulse id (for example the id of the request that caused it).
    pub fn id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.impulse_id = Some(id.into());
        self
    }
}

impl<'a, F: Flow> IntoFuture for StartOrImpulse<'a, F>
where
    F::Impulse: Sync,
    F::State: Sync,
{
    type Output = Result<F::Handle>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<F::Handle>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let impulse_id = self.impulse_id.unwrap_or_else(crate::handle::generated_id);
            let handle = self.engine.raw_handle::<F>(self.id)?;
            let id: Arc<str> = handle.id().into();
            let (state, impulse) = (self.state, self.impulse);
            handle
                .request("start or impulse", |reply| Msg::StartOrImpulse {
                    id,
                    state,
                    impulse_id,
                    impulse,
                    reply,
                    via: None,
                })
                .await?;
            Ok(F::Handle::from(handle))
        })
    }
}
