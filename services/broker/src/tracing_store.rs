//! A [`Store`] decorator that puts one `store` span around every operation, so a trace shows
//! each read, write, lease and schedule call of a request with its backend and latency. Only
//! the operation, the collection (or stream/schedule name) and the backend are recorded: record
//! ids and lease names carry mailbox addresses, and record bytes hold sealed secrets.
//!
//! Calls outside any span (the health pinger, the schedulers' polling) get no span of their own:
//! every 3 s ping would otherwise start a trace.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokenfleet_store::{
    Lease, Notice, Precondition, Record, RecordKey, Scope, ScopeRead, Store, StoreResult,
    StreamEntry,
};
use tracing::Instrument as _;

/// `inner` with a span per operation; `backend` is `embedded` or `redis`.
pub fn traced(inner: Arc<dyn Store>, backend: &'static str) -> Arc<dyn Store> {
    Arc::new(TracingStore { inner, backend })
}

/// See the module documentation.
#[derive(Debug)]
pub struct TracingStore {
    inner: Arc<dyn Store>,
    backend: &'static str,
}

impl TracingStore {
    async fn run<T>(
        &self,
        operation: &'static str,
        collection: &'static str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if tracing::Span::current().is_none() {
            return call.await;
        }
        let span = tracing::info_span!(
            "store",
            otel.name = operation,
            db.system = self.backend,
            db.operation = operation,
            db.collection = collection,
            otel.status_code = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let result = call.instrument(span.clone()).await;
        if let Err(error) = &result {
            span.record("otel.status_code", "ERROR");
            span.record("error", error_kind(error));
        }
        result
    }
}

/// The kind of a store error, never its text (which names keys).
fn error_kind(error: &tokenfleet_store::StoreError) -> &'static str {
    use tokenfleet_store::StoreError as E;
    match error {
        E::AlreadyExists(_) => "already_exists",
        E::NotFound(_) => "not_found",
        E::Conflict { .. } => "conflict",
        E::Unavailable(_) => "unavailable",
        E::Corrupt { .. } => "corrupt",
        E::Config(_) => "config",
    }
}

#[async_trait]
impl Store for TracingStore {
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<Record>>> {
        let collection = keys.first().map_or("", |k| k.collection);
        self.run("get_many", collection, self.inner.get_many(keys))
            .await
    }

    async fn get_many_since(
        &self,
        scope: &Scope,
        keys: &[RecordKey],
        known: Option<u64>,
    ) -> StoreResult<ScopeRead> {
        let collection = keys.first().map_or("", |k| k.collection);
        self.run(
            "get_many_since",
            collection,
            self.inner.get_many_since(scope, keys, known),
        )
        .await
    }

    async fn publish(&self, channel: &'static str, message: &str) -> StoreResult<()> {
        self.run("publish", channel, self.inner.publish(channel, message))
            .await
    }

    /// A subscription is one long-lived call, not an operation with a span.
    fn subscribe(&self, channel: &'static str) -> tokio::sync::mpsc::Receiver<Notice> {
        self.inner.subscribe(channel)
    }

    async fn get(&self, key: &RecordKey) -> StoreResult<Option<Record>> {
        self.run("get", key.collection, self.inner.get(key)).await
    }

    async fn put(&self, key: &RecordKey, data: Vec<u8>, pre: Precondition) -> StoreResult<u64> {
        self.run("put", key.collection, self.inner.put(key, data, pre))
            .await
    }

    async fn delete(&self, key: &RecordKey, pre: Precondition) -> StoreResult<bool> {
        self.run("delete", key.collection, self.inner.delete(key, pre))
            .await
    }

    async fn list(
        &self,
        scope: &Scope,
        collection: &'static str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Record)>> {
        self.run(
            "list",
            collection,
            self.inner.list(scope, collection, start_after, limit),
        )
        .await
    }

    async fn count(&self, scope: &Scope, collection: &'static str) -> StoreResult<u64> {
        self.run("count", collection, self.inner.count(scope, collection))
            .await
    }

    async fn append(
        &self,
        scope: &Scope,
        stream: &'static str,
        data: Vec<u8>,
        max_len: usize,
    ) -> StoreResult<String> {
        self.run(
            "append",
            stream,
            self.inner.append(scope, stream, data, max_len),
        )
        .await
    }

    async fn trim_stream(
        &self,
        scope: &Scope,
        stream: &'static str,
        before_ms: u64,
    ) -> StoreResult<u64> {
        self.run(
            "trim_stream",
            stream,
            self.inner.trim_stream(scope, stream, before_ms),
        )
        .await
    }

    async fn read_back(
        &self,
        scope: &Scope,
        stream: &'static str,
        before: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StreamEntry>> {
        self.run(
            "read_back",
            stream,
            self.inner.read_back(scope, stream, before, limit),
        )
        .await
    }

    async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<Lease>> {
        self.run("try_lease", "lease", self.inner.try_lease(name, owner, ttl))
            .await
    }

    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<bool> {
        self.run(
            "release_lease",
            "lease",
            self.inner.release_lease(name, owner),
        )
        .await
    }

    async fn renew_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        self.run(
            "renew_lease",
            "lease",
            self.inner.renew_lease(name, owner, ttl),
        )
        .await
    }

    async fn schedule(&self, name: &'static str, member: &str, due_ms: i64) -> StoreResult<()> {
        self.run("schedule", name, self.inner.schedule(name, member, due_ms))
            .await
    }

    async fn unschedule(&self, name: &'static str, member: &str) -> StoreResult<()> {
        self.run("unschedule", name, self.inner.unschedule(name, member))
            .await
    }

    async fn due(
        &self,
        name: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<(String, i64)>> {
        self.run("due", name, self.inner.due(name, now_ms, limit))
            .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.run("ping", "", self.inner.ping()).await
    }

    async fn ready(&self) -> StoreResult<()> {
        self.run("ready", "", self.inner.ready()).await
    }
}
