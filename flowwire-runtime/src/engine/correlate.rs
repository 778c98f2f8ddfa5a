//! Correlation: reach a live instance by the key its flow declares (`#[correlate]`), such
//! as an order id, instead of by its instance id. The store indexes the key each step
//! leaves; an instance leaves the index when it ends.

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
    /// # async fn demo<F: flowwire_runtime::Flow>(engine: flowwire_runtime::Engine) -> flowwire_runtime::Result<()> {
    /// let order = engine.by_key::<F>("order-7").await?; // the flow's typed handle
    /// # let _ = order; Ok(()) }
    /// ```
    pub async fn by_key<F: Flow>(&self, key: &str) -> Result<F::Handle> {
        let id = self.find_by_key::<F>(key).await?;
        self.handle::<F>(id).await
    }

    async fn find_by_key<F: Flow>(&self, key: &str) -> Result<std::sync::Arc<str>> {
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

    /// Applies an impulse to the live instance of flow `F` whose correlation key is `key`
    /// (see [`Engine::by_key`] for the errors). The impulse gets a fresh id; to make a
    /// retried delivery apply once, give it your own id through the handle:
    /// `engine.by_key::<F>(key).await?.impulse(i).id(request_id).await`.
    ///
    /// ```
    /// # async fn demo<F: flowwire_runtime::Flow>(engine: flowwire_runtime::Engine, paid: F::Impulse) -> flowwire_runtime::Result<()>
    /// # where F::Impulse: Sync {
    /// engine.impulse_by_key::<F>("order-7", paid).await?;
    /// # Ok(()) }
    /// ```
    pub async fn impulse_by_key<F: Flow>(&self, key: &str, impulse: F::Impulse) -> Result<()>
    where
        F::Impulse: Sync,
    {
        let id = self.find_by_key::<F>(key).await?;
        self.raw_handle::<F>(id)?.impulse(impulse).await
    }
}
