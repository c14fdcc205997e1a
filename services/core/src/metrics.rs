//! The core's instrumentation: one handle ([`CoreMetrics`]) the composition root creates,
//! registers into its Prometheus registry and hands to the token service, the alerter and the
//! store decorator ([`TimedStore`]), so counts are taken where the events happen.
//!
//! Series (Prometheus naming; `tenant` is added to the first five only when
//! `[metrics] per_tenant_labels` is on — tenant and mailbox names are customer data and unbounded,
//! so by default no label carries them, and no label ever carries a mailbox):
//! - `tokenfleet_token_refreshes_total{provider_kind, result}`: calls to a provider's token
//!   endpoint for a grant (refresh, client credentials, JWT bearer), `result` = `ok` or the
//!   provider error class (`transient`, `grant_dead`, `app_misconfigured`, `invalid_request`, …).
//! - `tokenfleet_token_refresh_duration_seconds{provider_kind}`: their latency.
//! - `tokenfleet_token_issuances_total{result}` and `tokenfleet_token_issuance_duration_seconds`:
//!   access-token requests of agents (and admins), `result` as in the audit log (`ok`,
//!   `consent_required`, `denied`, `failed_precondition`, …).
//! - `tokenfleet_alerts_raised_total{kind}`: operator alerts raised (`reauth_required`,
//!   `refresh_token_expiring`), once per problem across replicas.
//! - `tokenfleet_alert_deliveries_total{channel, result}`: webhook/e-mail delivery rounds (each
//!   up to `alerts.retry_attempts` tries), `result` = `delivered`, `rejected` (the receiver
//!   refused; not retried) or `failed` (retried by a later round).
//! - `tokenfleet_store_operation_duration_seconds{backend, operation}` and
//!   `tokenfleet_store_operation_errors_total{backend, operation}` (from [`TimedStore`]).
//!
//! prometheus-client is not a transport (it only formats text); the broker serves it.

use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokenfleet_store::{
    Lease, Notice, Precondition, Record, RecordKey, Scope, ScopeRead, Store, StoreResult,
    StreamEntry,
};

/// A label set: fixed keys, plus `tenant` when per-tenant labels are on.
pub type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Provider token requests take from milliseconds to the provider timeout (30 s default).
fn provider_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// Store calls: sub-millisecond (embedded, local Redis) to the command timeout.
fn store_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
    ])
}

struct Inner {
    per_tenant: bool,
    refreshes: Family<Labels, Counter>,
    refresh_seconds: HistogramFamily,
    issuances: Family<Labels, Counter>,
    issuance_seconds: HistogramFamily,
    alerts_raised: Family<Labels, Counter>,
    alert_deliveries: Family<Labels, Counter>,
    store_seconds: HistogramFamily,
    store_errors: Family<Labels, Counter>,
    /// The issuance series by result, when they carry no tenant label (a fixed, small set):
    /// looked up by the `&'static str` itself instead of building and hashing a label set on
    /// every issuance.
    issuance_series: RwLock<Vec<(&'static str, Counter, Histogram)>>,
}

/// The core's metrics handle. Cheap to clone; a handle that was never registered counts into
/// nothing anyone reads (what tests that do not look at metrics get by default).
#[derive(Clone)]
pub struct CoreMetrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for CoreMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreMetrics")
            .field("per_tenant", &self.inner.per_tenant)
            .finish_non_exhaustive()
    }
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self::new(false)
    }
}

impl CoreMetrics {
    /// A fresh handle; `per_tenant` adds a `tenant` label to the token and alert series.
    pub fn new(per_tenant: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                per_tenant,
                refreshes: Family::default(),
                refresh_seconds: Family::new_with_constructor(provider_histogram),
                issuances: Family::default(),
                issuance_seconds: Family::new_with_constructor(provider_histogram),
                alerts_raised: Family::default(),
                alert_deliveries: Family::default(),
                store_seconds: Family::new_with_constructor(store_histogram),
                store_errors: Family::default(),
                issuance_series: RwLock::new(Vec::new()),
            }),
        }
    }

    /// Registers every series into `registry` (names without the `_total` suffix, which the
    /// encoder adds to counters).
    pub fn register(&self, registry: &mut Registry) {
        let i = &self.inner;
        registry.register(
            "tokenfleet_token_refreshes",
            "Token requests to providers for stored grants (refresh, client credentials, JWT bearer), by provider kind and result",
            i.refreshes.clone(),
        );
        registry.register(
            "tokenfleet_token_refresh_duration_seconds",
            "Latency of token requests to providers for stored grants",
            i.refresh_seconds.clone(),
        );
        registry.register(
            "tokenfleet_token_issuances",
            "Access-token requests answered, by result",
            i.issuances.clone(),
        );
        registry.register(
            "tokenfleet_token_issuance_duration_seconds",
            "Latency of access-token requests, by result",
            i.issuance_seconds.clone(),
        );
        registry.register(
            "tokenfleet_alerts_raised",
            "Operator alerts raised (once per problem across replicas), by kind",
            i.alerts_raised.clone(),
        );
        registry.register(
            "tokenfleet_alert_deliveries",
            "Alert delivery rounds, by channel (webhook, email) and result (delivered, rejected, failed)",
            i.alert_deliveries.clone(),
        );
        registry.register(
            "tokenfleet_store_operation_duration_seconds",
            "Latency of store operations, by backend and operation",
            i.store_seconds.clone(),
        );
        registry.register(
            "tokenfleet_store_operation_errors",
            "Store operations that failed (backend unreachable, corrupt data; not precondition misses), by backend and operation",
            i.store_errors.clone(),
        );
    }

    /// Whether series carry a `tenant` label.
    pub fn per_tenant(&self) -> bool {
        self.inner.per_tenant
    }

    fn labels(&self, tenant: &str, fixed: &[(&'static str, &str)]) -> Labels {
        let mut labels: Labels = fixed.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        if self.inner.per_tenant {
            labels.push(("tenant", tenant.to_owned()));
        }
        labels
    }

    /// One provider token request for a grant of `tenant`.
    pub fn refresh(&self, tenant: &str, provider_kind: &str, result: &str, elapsed: Duration) {
        let i = &self.inner;
        i.refreshes
            .get_or_create(&self.labels(
                tenant,
                &[("provider_kind", provider_kind), ("result", result)],
            ))
            .inc();
        i.refresh_seconds
            .get_or_create(&self.labels(tenant, &[("provider_kind", provider_kind)]))
            .observe(elapsed.as_secs_f64());
    }

    /// One answered access-token request.
    pub fn issuance(&self, tenant: &str, result: &'static str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let i = &self.inner;
        if i.per_tenant {
            let labels = self.labels(tenant, &[("result", result)]);
            i.issuances.get_or_create(&labels).inc();
            i.issuance_seconds.get_or_create(&labels).observe(seconds);
            return;
        }
        let count = |series: &[(&'static str, Counter, Histogram)]| {
            let found = series.iter().find(|(r, _, _)| *r == result);
            if let Some((_, count, latency)) = found {
                count.inc();
                latency.observe(seconds);
            }
            found.is_some()
        };
        if count(
            &i.issuance_series
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            return;
        }
        let mut series = i
            .issuance_series
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !count(&series) {
            let labels = self.labels(tenant, &[("result", result)]);
            let made = (
                result,
                i.issuances.get_or_create(&labels).clone(),
                i.issuance_seconds.get_or_create(&labels).clone(),
            );
            made.1.inc();
            made.2.observe(seconds);
            series.push(made);
        }
    }

    /// One alert raised.
    pub fn alert_raised(&self, tenant: &str, kind: &str) {
        self.inner
            .alerts_raised
            .get_or_create(&self.labels(tenant, &[("kind", kind)]))
            .inc();
    }

    /// One delivery round of an alert over `channel` (`webhook`, `email`).
    pub fn alert_delivery(&self, channel: &str, result: &str) {
        self.inner
            .alert_deliveries
            .get_or_create(&vec![
                ("channel", channel.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    /// One store call's latency series (the error count is taken on the rare failure only).
    fn store_seconds(&self, backend: &'static str, operation: &'static str) -> Histogram {
        self.inner
            .store_seconds
            .get_or_create(&store_labels(backend, operation))
            .clone()
    }

    fn store_error(&self, backend: &'static str, operation: &'static str) {
        self.inner
            .store_errors
            .get_or_create(&store_labels(backend, operation))
            .inc();
    }
}

fn store_labels(backend: &'static str, operation: &'static str) -> Labels {
    vec![
        ("backend", backend.to_owned()),
        ("operation", operation.to_owned()),
    ]
}

/// Declares [`Op`] from one list: each variant with its `operation` label value.
macro_rules! operations {
    ($($op:ident => $name:literal),* $(,)?) => {
        /// The store operations [`TimedStore`] times.
        #[derive(Debug, Clone, Copy)]
        enum Op {
            $($op),*
        }

        impl Op {
            /// Every operation, in declaration order (each one's index is `op as usize`).
            const ALL: &[Op] = &[$(Op::$op),*];
            const COUNT: usize = Op::ALL.len();

            /// The `operation` label value.
            fn name(self) -> &'static str {
                match self {
                    $(Op::$op => $name),*
                }
            }
        }
    };
}

operations! {
    Get => "get",
    Put => "put",
    Delete => "delete",
    List => "list",
    Count => "count",
    Append => "append",
    TrimStream => "trim_stream",
    ReadBack => "read_back",
    TryLease => "try_lease",
    ReleaseLease => "release_lease",
    RenewLease => "renew_lease",
    Schedule => "schedule",
    Unschedule => "unschedule",
    Due => "due",
    Ping => "ping",
    Ready => "ready",
    GetMany => "get_many",
    GetManySince => "get_many_since",
    Publish => "publish",
}

/// A [`Store`] that times every call of the store it wraps into
/// `tokenfleet_store_operation_duration_seconds{backend, operation}`. The composition root wraps
/// the store once; everything above sees only the decorated one.
#[derive(Debug)]
pub struct TimedStore {
    inner: Arc<dyn Store>,
    backend: &'static str,
    metrics: CoreMetrics,
    /// Each operation's latency series, made on its first call (so `/metrics` shows only the
    /// operations that ran) and then observed without building a label set per call.
    seconds: [OnceLock<Histogram>; Op::COUNT],
}

impl TimedStore {
    /// Wraps `inner`, whose backend is `backend` (`embedded`, `redis`).
    pub fn wrap(
        inner: Arc<dyn Store>,
        backend: &'static str,
        metrics: CoreMetrics,
    ) -> Arc<dyn Store> {
        Arc::new(Self {
            inner,
            backend,
            metrics,
            seconds: std::array::from_fn(|_| OnceLock::new()),
        })
    }

    fn record<T>(&self, operation: Op, started: Instant, result: &StoreResult<T>) {
        use tokenfleet_store::StoreError as E;
        let seconds = started.elapsed().as_secs_f64();
        self.seconds[operation as usize]
            .get_or_init(|| self.metrics.store_seconds(self.backend, operation.name()))
            .observe(seconds);
        // Precondition misses are answers, not store failures.
        if matches!(result, Err(E::Unavailable(_) | E::Corrupt { .. })) {
            self.metrics.store_error(self.backend, operation.name());
        }
    }
}

macro_rules! timed {
    ($self:ident, $op:expr, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        $self.record($op, started, &result);
        result
    }};
}

#[async_trait]
impl Store for TimedStore {
    async fn get(&self, key: &RecordKey) -> StoreResult<Option<Record>> {
        timed!(self, Op::Get, self.inner.get(key))
    }
    async fn put(&self, key: &RecordKey, data: Vec<u8>, pre: Precondition) -> StoreResult<u64> {
        timed!(self, Op::Put, self.inner.put(key, data, pre))
    }
    async fn delete(&self, key: &RecordKey, pre: Precondition) -> StoreResult<bool> {
        timed!(self, Op::Delete, self.inner.delete(key, pre))
    }
    async fn list(
        &self,
        scope: &Scope,
        collection: &'static str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Record)>> {
        timed!(
            self,
            Op::List,
            self.inner.list(scope, collection, start_after, limit)
        )
    }
    async fn count(&self, scope: &Scope, collection: &'static str) -> StoreResult<u64> {
        timed!(self, Op::Count, self.inner.count(scope, collection))
    }
    async fn append(
        &self,
        scope: &Scope,
        stream: &'static str,
        data: Vec<u8>,
        max_len: usize,
    ) -> StoreResult<String> {
        timed!(
            self,
            Op::Append,
            self.inner.append(scope, stream, data, max_len)
        )
    }
    async fn trim_stream(
        &self,
        scope: &Scope,
        stream: &'static str,
        before_ms: u64,
    ) -> StoreResult<u64> {
        timed!(
            self,
            Op::TrimStream,
            self.inner.trim_stream(scope, stream, before_ms)
        )
    }
    async fn read_back(
        &self,
        scope: &Scope,
        stream: &'static str,
        before: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StreamEntry>> {
        timed!(
            self,
            Op::ReadBack,
            self.inner.read_back(scope, stream, before, limit)
        )
    }
    async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<Lease>> {
        timed!(self, Op::TryLease, self.inner.try_lease(name, owner, ttl))
    }
    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<bool> {
        timed!(
            self,
            Op::ReleaseLease,
            self.inner.release_lease(name, owner)
        )
    }
    async fn renew_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        timed!(
            self,
            Op::RenewLease,
            self.inner.renew_lease(name, owner, ttl)
        )
    }
    async fn schedule(&self, name: &'static str, member: &str, due_ms: i64) -> StoreResult<()> {
        timed!(
            self,
            Op::Schedule,
            self.inner.schedule(name, member, due_ms)
        )
    }
    async fn unschedule(&self, name: &'static str, member: &str) -> StoreResult<()> {
        timed!(self, Op::Unschedule, self.inner.unschedule(name, member))
    }
    async fn due(
        &self,
        name: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<(String, i64)>> {
        timed!(self, Op::Due, self.inner.due(name, now_ms, limit))
    }
    async fn ping(&self) -> StoreResult<()> {
        timed!(self, Op::Ping, self.inner.ping())
    }
    async fn ready(&self) -> StoreResult<()> {
        timed!(self, Op::Ready, self.inner.ready())
    }
    async fn get_many(&self, keys: &[RecordKey]) -> StoreResult<Vec<Option<Record>>> {
        timed!(self, Op::GetMany, self.inner.get_many(keys))
    }
    async fn get_many_since(
        &self,
        scope: &Scope,
        keys: &[RecordKey],
        known: Option<u64>,
    ) -> StoreResult<ScopeRead> {
        timed!(
            self,
            Op::GetManySince,
            self.inner.get_many_since(scope, keys, known)
        )
    }
    async fn publish(&self, channel: &'static str, message: &str) -> StoreResult<()> {
        timed!(self, Op::Publish, self.inner.publish(channel, message))
    }
    /// A subscription is one long-lived call, not an operation to time.
    fn subscribe(&self, channel: &'static str) -> tokio::sync::mpsc::Receiver<Notice> {
        self.inner.subscribe(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: &CoreMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn no_tenant_label_unless_turned_on() {
        let off = CoreMetrics::new(false);
        off.refresh("acme", "microsoft", "ok", Duration::from_millis(20));
        off.issuance("acme", "ok", Duration::from_millis(2));
        off.alert_raised("acme", "reauth_required");
        let t = text(&off);
        assert!(
            t.contains(
                r#"tokenfleet_token_refreshes_total{provider_kind="microsoft",result="ok"} 1"#
            ),
            "{t}"
        );
        assert!(!t.contains("acme"), "{t}");

        let on = CoreMetrics::new(true);
        on.refresh("acme", "google", "transient", Duration::from_millis(20));
        let t = text(&on);
        assert!(
            t.contains(
                r#"tokenfleet_token_refreshes_total{provider_kind="google",result="transient",tenant="acme"} 1"#
            ),
            "{t}"
        );
    }

    #[tokio::test]
    async fn the_timed_store_counts_calls_and_failures_by_operation() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(
            tokenfleet_store::embedded::EmbeddedStore::open(&dir.path().join("s.redb"))
                .await
                .unwrap(),
        );
        let metrics = CoreMetrics::new(false);
        let store = TimedStore::wrap(inner, "embedded", metrics.clone());
        let key = RecordKey::global("x", "1");
        store
            .put(&key, b"v".to_vec(), Precondition::Absent)
            .await
            .unwrap();
        // A precondition miss is an answer, not a failure.
        assert!(
            store
                .put(&key, b"v".to_vec(), Precondition::Absent)
                .await
                .is_err()
        );
        store.get(&key).await.unwrap();
        let t = text(&metrics);
        assert!(
            t.contains(r#"tokenfleet_store_operation_duration_seconds_count{backend="embedded",operation="put"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"tokenfleet_store_operation_duration_seconds_count{backend="embedded",operation="get"} 1"#),
            "{t}"
        );
        assert!(
            !t.contains("tokenfleet_store_operation_errors_total{"),
            "{t}"
        );
    }

    /// The issuance series kept by result count each result apart (and carry the tenant when
    /// per-tenant labels are on, where nothing is kept).
    #[test]
    fn issuances_count_by_result_in_both_label_modes() {
        for per_tenant in [false, true] {
            let m = CoreMetrics::new(per_tenant);
            m.issuance("acme", "ok", Duration::from_millis(2));
            m.issuance("acme", "denied", Duration::from_millis(2));
            m.issuance("acme", "ok", Duration::from_millis(2));
            m.issuance("beta", "ok", Duration::from_millis(2));
            let t = text(&m);
            let expected: &[&str] = if per_tenant {
                &[
                    r#"tokenfleet_token_issuances_total{result="ok",tenant="acme"} 2"#,
                    r#"tokenfleet_token_issuances_total{result="ok",tenant="beta"} 1"#,
                    r#"tokenfleet_token_issuances_total{result="denied",tenant="acme"} 1"#,
                    r#"tokenfleet_token_issuance_duration_seconds_count{result="ok",tenant="acme"} 2"#,
                ]
            } else {
                &[
                    r#"tokenfleet_token_issuances_total{result="ok"} 3"#,
                    r#"tokenfleet_token_issuances_total{result="denied"} 1"#,
                    r#"tokenfleet_token_issuance_duration_seconds_count{result="ok"} 3"#,
                    r#"tokenfleet_token_issuance_duration_seconds_count{result="denied"} 1"#,
                ]
            };
            for line in expected {
                assert!(
                    t.contains(line),
                    "per_tenant={per_tenant}: {line} missing in {t}"
                );
            }
        }
    }

    /// Every timed operation has its own label value and its own slot.
    #[test]
    fn operation_names_are_distinct() {
        let names: std::collections::HashSet<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        assert_eq!(names.len(), Op::COUNT);
        assert!(Op::ALL.iter().enumerate().all(|(i, op)| *op as usize == i));
    }
}
