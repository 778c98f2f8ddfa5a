//! A store layer's reads and operator writes, forwarded to the store it wraps: a test
//! layer writes `forward_to_inner!();` in its `InstanceStore` impl and implements only
//! what it changes (`commit`, and `fault` if it has one).

/// Forwards every `InstanceStore` method but `commit` and `fault` to `self.inner` (among
/// them whether it computes checksums on read: a layer hands its writes on unchanged).
macro_rules! forward_to_inner {
    () => {
        fn checksums_on_read(&self) -> bool {
            self.inner.checksums_on_read()
        }
        fn load<'a>(
            &'a self,
            key: &'a ::flowwire::storage::InstanceKey,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<Option<::flowwire::storage::Stored>, ::flowwire::storage::StoreError>,
        > {
            self.inner.load(key)
        }
        fn active<'a>(
            &'a self,
            flow: &'a str,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<::flowwire::storage::store::ActiveList, ::flowwire::storage::StoreError>,
        > {
            self.inner.active(flow)
        }
        fn records<'a>(
            &'a self,
            flow: &'a str,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<::flowwire::storage::store::ActiveList, ::flowwire::storage::StoreError>,
        > {
            self.inner.records(flow)
        }
        fn history<'a>(
            &'a self,
            key: &'a ::flowwire::storage::InstanceKey,
            from: u64,
            limit: usize,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<Vec<(u64, ::bytes::Bytes)>, ::flowwire::storage::StoreError>,
        > {
            self.inner.history(key, from, limit)
        }
        fn impulse_applied<'a>(
            &'a self,
            key: &'a ::flowwire::storage::InstanceKey,
            impulse_id: &'a str,
        ) -> ::flowwire::storage::BoxFuture<'a, Result<Option<u64>, ::flowwire::storage::StoreError>>
        {
            self.inner.impulse_applied(key, impulse_id)
        }
        fn due<'a>(
            &'a self,
            flow: &'a str,
            until_ms: u64,
            limit: usize,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<::flowwire::storage::store::DueList, ::flowwire::storage::StoreError>,
        > {
            self.inner.due(flow, until_ms, limit)
        }
        fn retime<'a>(
            &'a self,
            key: &'a ::flowwire::storage::InstanceKey,
            stale: u64,
            actual: Option<u64>,
        ) -> ::flowwire::storage::BoxFuture<'a, Result<(), ::flowwire::storage::StoreError>> {
            self.inner.retime(key, stale, actual)
        }
        fn parked<'a>(
            &'a self,
            flow: &'a str,
            after: Option<&'a str>,
            limit: usize,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<Vec<::std::sync::Arc<str>>, ::flowwire::storage::StoreError>,
        > {
            self.inner.parked(flow, after, limit)
        }
        fn correlated<'a>(
            &'a self,
            flow: &'a str,
            key: &'a str,
            limit: usize,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<Vec<::std::sync::Arc<str>>, ::flowwire::storage::StoreError>,
        > {
            self.inner.correlated(flow, key, limit)
        }
        fn ended_with_key<'a>(
            &'a self,
            flow: &'a str,
            key: &'a str,
            limit: usize,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<Vec<::std::sync::Arc<str>>, ::flowwire::storage::StoreError>,
        > {
            self.inner.ended_with_key(flow, key, limit)
        }
        fn mark_damaged<'a>(
            &'a self,
            key: &'a ::flowwire::storage::InstanceKey,
            reason: Option<&'a str>,
        ) -> ::flowwire::storage::BoxFuture<'a, Result<(), ::flowwire::storage::StoreError>> {
            self.inner.mark_damaged(key, reason)
        }
        fn damaged<'a>(
            &'a self,
            flow: &'a str,
            after: Option<&'a str>,
            limit: usize,
        ) -> ::flowwire::storage::BoxFuture<
            'a,
            Result<::flowwire::storage::store::DamagedList, ::flowwire::storage::StoreError>,
        > {
            self.inner.damaged(flow, after, limit)
        }
        fn delete<'a>(
            &'a self,
            key: &'a ::flowwire::storage::InstanceKey,
        ) -> ::flowwire::storage::BoxFuture<'a, Result<(), ::flowwire::storage::StoreError>> {
            self.inner.delete(key)
        }
    };
}
