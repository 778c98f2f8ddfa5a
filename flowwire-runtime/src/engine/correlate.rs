//! Correlation: reach a live instance by the key its flow declares (`#[correlate]`), such
//! as an order id, instead of by its instance id. The store indexes the key each step
//! leaves; an instance leaves that index when it ends, and enters the index of the ended
//! instances by key (until it is deleted), which a retried impulse consults to learn it
//! was applied.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use flowwire_storage::InstanceKey;

use super::Engine;
use crate::error::{Error, Result};
use crate::flow::Flow;

/// Instance ids named in an [`Error::KeyAmbiguous`].
const SHOWN: usize = 10;

impl Engine {
    /// The live instance of flow `F` whose correlation key is `key`.
    ///
    /// [`Error::NoInstanceForKey`] when no live instance has it (none started, or they
    /// ended); [`Error::KeyAmbiguous`] when several do, naming them.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// let order = engine.by_key::<F>("order-7").await?; // the flow's typed handle
    /// # let _ = order; Ok(()) }
    /// ```
    pub async fn by_key<F: Flow>(&self, key: &str) -> Result<F::Handle> {
        let id = self.find_by_key::<F>(key).await?;
        self.handle::<F>(id).await
    }

    async fn find_by_key<F: Flow>(&self, key: &str) -> Result<Arc<str>> {
        self.sender::<F>()?;
        let store = self.store_for_reads()?;
        let ids = self.timed(store.correlated(F::NAME, key, SHOWN)).await?;
        match &ids[..] {
            [] => Err(Error::NoInstanceForKey {
                flow: F::NAME,
                key: key.to_string(),
            }),
            [id] => Ok(id.clone()),
            several => Err(Error::KeyAmbiguous {
                flow: F::NAME,
                key: key.to_string(),
                ids: several.iter().map(ToString::to_string).collect(),
            }),
        }
    }

    /// Cancels the live instance of flow `F` whose correlation key is `key` (see
    /// [`Engine::by_key`] for the errors, and [`Handle::cancel`](crate::Handle::cancel) for
    /// what cancelling does). Once it is cancelled it no longer has the key:
    /// [`Error::NoInstanceForKey`] then means no live instance is left to cancel.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine) -> flowwire::Result<()> {
    /// engine.cancel_by_key::<F>("order-7", "fraud suspected").await?;
    /// # Ok(()) }
    /// ```
    pub async fn cancel_by_key<F: Flow>(&self, key: &str, reason: impl Into<String>) -> Result<()> {
        let id = self.find_by_key::<F>(key).await?;
        self.cancel::<F>(id, reason).await
    }

    /// Applies an impulse to the live instance of flow `F` whose correlation key is `key`
    /// (see [`Engine::by_key`] for the errors). Without an id the impulse gets a fresh one;
    /// give it yours with [`KeyedImpulse::id`] (the id of the request that caused it) to
    /// make a retried delivery safe: a retry after the impulse was applied — even after it
    /// ended the instance, so that no live instance has the key any more — is told so
    /// ([`Error::ImpulseAlreadyApplied`]) and changes nothing.
    ///
    /// ```
    /// # async fn demo<F: flowwire::Flow>(engine: flowwire::Engine, paid: F::Impulse) -> flowwire::Result<()>
    /// # where F::Impulse: Sync {
    /// use flowwire::Error;
    /// match engine.impulse_by_key::<F>("order-7", paid).id("payment-991").await {
    ///     Ok(()) | Err(Error::ImpulseAlreadyApplied { .. }) => {} // applied, once
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn impulse_by_key<F: Flow>(&self, key: &str, impulse: F::Impulse) -> KeyedImpulse<'_, F> {
        KeyedImpulse {
            engine: self,
            key: key.to_string(),
            impulse,
            id: None,
        }
    }

    /// The step at which one of the instances of `F` that ended carrying `key` applied
    /// `impulse_id`, if one did.
    async fn applied_before_end<F: Flow>(
        &self,
        key: &str,
        impulse_id: &str,
    ) -> Result<Option<(Arc<str>, u64)>> {
        let store = self.store_for_reads()?;
        let ended = self
            .timed(store.ended_with_key(F::NAME, key, SHOWN))
            .await?;
        for id in ended {
            let instance =
                InstanceKey::new(flowwire_storage::FlowName::from_static(F::NAME), id.clone());
            if let Some(step) = self
                .timed(store.impulse_applied(&instance, impulse_id))
                .await?
            {
                return Ok(Some((id, step)));
            }
        }
        Ok(None)
    }
}

/// An impulse sent by correlation key ([`Engine::impulse_by_key`]): `.await` it to apply
/// it; set its id first with [`id`](KeyedImpulse::id) to make retries safe.
#[must_use = "an impulse is sent when it is awaited"]
pub struct KeyedImpulse<'a, F: Flow> {
    engine: &'a Engine,
    key: String,
    impulse: F::Impulse,
    id: Option<Arc<str>>,
}

impl<F: Flow> KeyedImpulse<'_, F> {
    /// Sets the impulse id (for example the id of the request that caused it).
    pub fn id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.id = Some(id.into());
        self
    }
}

impl<'a, F: Flow> IntoFuture for KeyedImpulse<'a, F>
where
    F::Impulse: Sync,
{
    type Output = Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let KeyedImpulse {
                engine,
                key,
                impulse,
                id: impulse_id,
            } = self;
            // A retry of an impulse that ended its instance: the key may be free, or taken
            // by a newer instance that must not get the impulse.
            if let Some(impulse_id) = &impulse_id
                && let Some((id, step)) = engine.applied_before_end::<F>(&key, impulse_id).await?
            {
                return Err(Error::ImpulseAlreadyApplied {
                    flow: F::NAME,
                    id: id.to_string(),
                    impulse_id: impulse_id.to_string(),
                    step,
                });
            }
            let id = engine.find_by_key::<F>(&key).await?;
            let handle = engine.raw_handle::<F>(id)?;
            let request = handle.impulse(impulse);
            match impulse_id {
                Some(impulse_id) => request.id(impulse_id).await,
                None => request.await,
            }
        })
    }
}
