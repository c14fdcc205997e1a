//! Prometheus metrics of the broker process, served at `GET /metrics`: OpenMetrics text when the
//! `Accept` header asks for `application/openmetrics-text`, the Prometheus text format (0.0.4)
//! otherwise ([`Metrics::encode_for`]).
//!
//! - here: build info, gRPC requests by method and status code (counted by [`GrpcMetricsLayer`]
//!   around every gRPC service), connections the listeners' limits closed ([`LimitCounters`]),
//!   console sign-ins by result, store health checks, and process metrics read from
//!   `/proc/self` at scrape time ([`ProcessCollector`]);
//! - the core's series (refreshes, issuances, alerts, store latency), counted where the events
//!   happen through the [`CoreMetrics`] handle this registry owns ([`Metrics::core`]);
//! - the fleet gauges ([`crate::inventory`]), from a background sweep.
//!
//! Labels never carry request data beyond the method name, and only method names the broker
//! actually serves: anything else is counted as `other`. Tenant names appear only with
//! `[metrics] per_tenant_labels = true`; mailbox names never.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use prost::Message as _;
use tokenfleet_core::metrics::CoreMetrics;
use tower::{Layer, Service};

use crate::inventory::InventoryGauges;

/// Labels of `tokenfleet_grpc_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    /// Full method path `/package.Service/Method`, or `other`.
    method: String,
    /// gRPC status code name (`OK`, `UNAUTHENTICATED`, …).
    code: String,
}

/// Labels of `tokenfleet_listener_connections_closed_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    /// `grpc`, `grpc_anonymous` or `http`.
    listener: String,
    /// `made_room` or `refused`.
    reason: String,
}

/// The limits whose closed connections are counted, as the `listener` label: the gRPC
/// listener's connections, those of them without a client certificate, the HTTP listener's.
pub const LIMITED_LISTENERS: [&str; 3] = ["grpc", "grpc_anonymous", "http"];

/// What one listener limit closed (`tokenfleet_listener_connections_closed_total`), counted by
/// the listener ([`crate::listener`]); clones count into the same series.
#[derive(Debug, Clone, Default)]
pub struct LimitCounters {
    /// Connections that waited unserved and were closed to make room for a new one.
    pub made_room: Counter,
    /// New connections closed at once because every slot was serving one.
    pub refused: Counter,
}

/// Labels of `tokenfleet_console_sign_ins_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignInLabels {
    result: &'static str,
}

/// How a console sign-in ended (the `result` label of `tokenfleet_console_sign_ins_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignIn {
    /// Signed in.
    Ok,
    /// The key was wrong or revoked.
    Unauthenticated,
    /// Refused unchecked: too many failures from the client's address.
    RateLimited,
    /// The form's CSRF token did not match.
    CsrfFailed,
}

impl SignIn {
    /// Every result (each series exists from the start).
    pub const ALL: [Self; 4] = [
        Self::Ok,
        Self::Unauthenticated,
        Self::RateLimited,
        Self::CsrfFailed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Unauthenticated => "unauthenticated",
            Self::RateLimited => "rate_limited",
            Self::CsrfFailed => "csrf_failed",
        }
    }
}

struct Inner {
    registry: Registry,
    grpc_requests: Family<GrpcLabels, Counter>,
    listener_closed: Family<ClosedLabels, Counter>,
    sign_ins: Family<SignInLabels, Counter>,
    store_ping_failures: Counter,
    store_up: Gauge,
    known_methods: HashSet<String>,
    core: CoreMetrics,
    inventory: InventoryGauges,
}

/// The broker's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every broker metric registered, without tenant labels.
    pub fn new() -> Self {
        Self::with_tenant_labels(false)
    }

    /// A fresh registry with every broker metric registered; `per_tenant` adds a `tenant` label
    /// to the token, alert and fleet series (`[metrics] per_tenant_labels`).
    pub fn with_tenant_labels(per_tenant: bool) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "tokenfleet_build",
            "Build information of the running broker",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("component", "broker".to_owned()),
            ]),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "tokenfleet_grpc_requests",
            "gRPC requests handled, by method and status code",
            grpc_requests.clone(),
        );
        let listener_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "tokenfleet_listener_connections_closed",
            "Connections a listener's limit closed: `made_room` (waited unserved, closed for a \
             new connection) or `refused` (new, closed because every slot was serving one)",
            listener_closed.clone(),
        );
        for listener in LIMITED_LISTENERS {
            for reason in ["made_room", "refused"] {
                // Every series from the start, so rates and alerts see the first event.
                let _ = listener_closed.get_or_create(&ClosedLabels {
                    listener: listener.to_owned(),
                    reason: reason.to_owned(),
                });
            }
        }
        let sign_ins = Family::<SignInLabels, Counter>::default();
        registry.register(
            "tokenfleet_console_sign_ins",
            "Console sign-ins by result: ok, unauthenticated (wrong or revoked key), rate_limited \
             (too many failures from the client's address), csrf_failed",
            sign_ins.clone(),
        );
        for result in SignIn::ALL {
            let _ = sign_ins.get_or_create(&SignInLabels {
                result: result.as_str(),
            });
        }
        let store_ping_failures = Counter::default();
        registry.register(
            "tokenfleet_store_ping_failures",
            "Store health checks that failed",
            store_ping_failures.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "tokenfleet_store_up",
            "1 when the last store health check succeeded, 0 otherwise",
            store_up.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        let core = CoreMetrics::new(per_tenant);
        core.register(&mut registry);
        let inventory = InventoryGauges::new(per_tenant);
        inventory.register(&mut registry);
        Self {
            inner: Arc::new(Inner {
                registry,
                grpc_requests,
                listener_closed,
                sign_ins,
                store_ping_failures,
                store_up,
                known_methods: served_methods(),
                core,
                inventory,
            }),
        }
    }

    /// The core's handle: hand it to the token service, the alerter and the store decorator.
    pub fn core(&self) -> &CoreMetrics {
        &self.inner.core
    }

    /// The fleet gauges the inventory sweep sets.
    pub fn inventory(&self) -> &InventoryGauges {
        &self.inner.inventory
    }

    /// The metrics in OpenMetrics text format (ends with `# EOF`).
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
    }

    /// The body and content type for a scrape with this `Accept` header: OpenMetrics when it
    /// names `application/openmetrics-text`, else the Prometheus text format 0.0.4.
    pub fn encode_for(&self, accept: Option<&str>) -> Result<(String, &'static str), fmt::Error> {
        let text = self.encode()?;
        if accept.is_some_and(wants_openmetrics) {
            Ok((text, OPENMETRICS_CONTENT_TYPE))
        } else {
            Ok((to_prometheus_text(&text), PROMETHEUS_CONTENT_TYPE))
        }
    }

    /// The counters of the limit `listener` (one of [`LIMITED_LISTENERS`]).
    pub fn limit_counters(&self, listener: &str) -> LimitCounters {
        let counter = |reason: &str| {
            self.inner
                .listener_closed
                .get_or_create(&ClosedLabels {
                    listener: listener.to_owned(),
                    reason: reason.to_owned(),
                })
                .clone()
        };
        LimitCounters {
            made_room: counter("made_room"),
            refused: counter("refused"),
        }
    }

    /// Counts one console sign-in with its `result`.
    pub fn sign_in(&self, result: SignIn) {
        self.inner
            .sign_ins
            .get_or_create(&SignInLabels {
                result: result.as_str(),
            })
            .inc();
    }

    /// Records a store health check result.
    pub fn store_ping(&self, ok: bool) {
        if ok {
            self.inner.store_up.set(1);
        } else {
            self.inner.store_up.set(0);
            self.inner.store_ping_failures.inc();
        }
    }

    /// Counts one finished gRPC request.
    fn grpc_request(&self, method: &MethodLabel, code: &str) {
        self.inner
            .grpc_requests
            .get_or_create(&GrpcLabels {
                method: method.0.clone(),
                code: code.to_owned(),
            })
            .inc();
    }

    fn method_label(&self, path: &str) -> MethodLabel {
        if self.inner.known_methods.contains(path) {
            MethodLabel(path.to_owned())
        } else {
            MethodLabel("other".to_owned())
        }
    }
}

/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header lists OpenMetrics text with a non-zero quality.
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text format 0.0.4, which the
/// crate does not produce: a counter family `x` is declared as `x_total` (its only sample
/// name), `info` families become gauges named `x_info`, `unknown` becomes `untyped`, and
/// `# UNIT`/`# EOF` lines go (0.0.4 has neither). Samples are the same in both formats (the
/// registry records no exemplars and no `_created` samples).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((_, help)) = pending_help.take() {
                out.push_str(&format!("# HELP {name} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Process metrics of this process from `/proc/self` (Linux), read at each scrape:
/// `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
/// `process_open_fds`, `process_max_fds`, `process_start_time_seconds` (the names the Prometheus
/// client libraries use). Hand-written because prometheus-client ships no process collector.
/// Values that cannot be read (another OS) are left out.
#[derive(Debug)]
pub struct ProcessCollector;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// What [`ProcessCollector`] reads.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, bytes.
    pub resident_bytes: Option<i64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<i64>,
    /// Open file descriptors.
    pub open_fds: Option<i64>,
    /// The soft limit of open file descriptors.
    pub max_fds: Option<i64>,
    /// Start time, unix seconds.
    pub start_time: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self`.
    pub fn read() -> Self {
        let mut stats = Self::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces) in parentheses.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                // rest[0] is field 3 (state): utime = 14, stime = 15, starttime = 22, vsize = 23.
                let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
                if let (Some(u), Some(s)) = (field(14), field(15)) {
                    stats.cpu_seconds = Some((u + s) / USER_HZ);
                }
                stats.virtual_bytes = field(23).map(|v| v as i64);
                if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                    stats.start_time = Some(boot + start / USER_HZ);
                }
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            stats.resident_bytes = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
                .map(|kb| kb * 1024);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            stats.open_fds = i64::try_from(dir.count()).ok();
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            stats.max_fds = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok());
        }
        stats
    }
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let stats = ProcessStats::read();
        if let Some(cpu) = stats.cpu_seconds {
            let metric = ConstCounter::new(cpu);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                metric.metric_type(),
            )?;
            metric.encode(m)?;
        }
        let gauges: [(&str, &str, Option<i64>); 4] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stats.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stats.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                stats.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                stats.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let metric = ConstGauge::new(v);
                let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
                metric.encode(m)?;
            }
        }
        if let Some(start) = stats.start_time {
            let metric = ConstGauge::new(start);
            let m = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                None,
                metric.metric_type(),
            )?;
            metric.encode(m)?;
        }
        Ok(())
    }
}

/// Every `/package.Service/Method` path of the services the broker serves.
fn served_methods() -> HashSet<String> {
    let sets: [&[u8]; 4] = [
        tokenfleet_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashSet::new();
    for encoded in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    methods.insert(format!(
                        "/{package}.{service_name}/{}",
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
    }
    methods
}

/// The canonical name of a numeric gRPC status code.
fn code_name(code: &[u8]) -> &'static str {
    match code {
        b"0" => "OK",
        b"1" => "CANCELLED",
        b"2" => "UNKNOWN",
        b"3" => "INVALID_ARGUMENT",
        b"4" => "DEADLINE_EXCEEDED",
        b"5" => "NOT_FOUND",
        b"6" => "ALREADY_EXISTS",
        b"7" => "PERMISSION_DENIED",
        b"8" => "RESOURCE_EXHAUSTED",
        b"9" => "FAILED_PRECONDITION",
        b"10" => "ABORTED",
        b"11" => "OUT_OF_RANGE",
        b"12" => "UNIMPLEMENTED",
        b"13" => "INTERNAL",
        b"14" => "UNAVAILABLE",
        b"15" => "DATA_LOSS",
        b"16" => "UNAUTHENTICATED",
        _ => "INVALID_CODE",
    }
}

#[derive(Debug, Clone)]
struct MethodLabel(String);

/// Counts one request exactly once: when its status is known, or as `CANCELLED` when the response
/// is dropped before that.
#[derive(Debug)]
struct Recorder {
    metrics: Metrics,
    method: MethodLabel,
    done: bool,
}

impl Recorder {
    fn record(&mut self, code: &str) {
        if !self.done {
            self.done = true;
            self.metrics.grpc_request(&self.method, code);
        }
    }

    fn record_status_header(&mut self, headers: &::http::HeaderMap) -> bool {
        match headers.get("grpc-status") {
            Some(code) => {
                self.record(code_name(code.as_bytes()));
                true
            }
            None => false,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record("CANCELLED");
    }
}

/// Tower layer that counts gRPC requests by method and status code.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
}

impl GrpcMetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, ReqBody, ResBody> Service<::http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<::http::Request<ReqBody>, Response = ::http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = ::http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ::http::Request<ReqBody>) -> Self::Future {
        let mut recorder = Recorder {
            method: self.metrics.method_label(request.uri().path()),
            metrics: self.metrics.clone(),
            done: false,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    // Trailers-only responses (most errors) carry the status in the headers.
                    recorder.record_status_header(response.headers());
                    Ok(response.map(|inner| MetricsBody { inner, recorder }))
                }
                Err(error) => {
                    recorder.record("UNKNOWN");
                    Err(error)
                }
            }
        })
    }
}

/// Response body that records the status from the trailers.
#[derive(Debug)]
pub struct MetricsBody<B> {
    inner: B,
    recorder: Recorder,
}

impl<B> Body for MetricsBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.recorder.record_status_header(trailers);
                }
            }
            Poll::Ready(Some(Err(_))) => this.recorder.record("UNKNOWN"),
            Poll::Ready(None) => this.recorder.record("UNKNOWN"),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_become_labels() {
        let metrics = Metrics::new();
        assert_eq!(
            metrics.method_label("/tokenfleet.v1.Admin/CreateTenant").0,
            "/tokenfleet.v1.Admin/CreateTenant"
        );
        assert_eq!(
            metrics.method_label("/grpc.health.v1.Health/Check").0,
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(metrics.method_label("/evil/../x").0, "other");
    }

    #[test]
    fn encodes_counts_and_build_info() {
        let metrics = Metrics::new();
        let method = metrics.method_label("/tokenfleet.v1.Admin/WhoAmI");
        metrics.grpc_request(&method, "OK");
        metrics.store_ping(false);
        let text = metrics.encode().unwrap();
        assert!(text.contains("tokenfleet_build_info{"), "{text}");
        assert!(
            text.contains(
                r#"tokenfleet_grpc_requests_total{method="/tokenfleet.v1.Admin/WhoAmI",code="OK"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("tokenfleet_store_ping_failures_total 1"),
            "{text}"
        );
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let metrics = Metrics::new();
        let method = metrics.method_label("/tokenfleet.v1.Admin/WhoAmI");
        metrics.grpc_request(&method, "OK");
        let (om, ct) = metrics
            .encode_for(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            ))
            .unwrap();
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(
            om.contains("# TYPE tokenfleet_grpc_requests counter"),
            "{om}"
        );
        assert!(om.contains("# TYPE tokenfleet_build info"), "{om}");
        for accept in [
            None,
            Some("text/plain"),
            Some("application/openmetrics-text;q=0"),
        ] {
            let (text, ct) = metrics.encode_for(accept).unwrap();
            assert_eq!(ct, PROMETHEUS_CONTENT_TYPE, "{accept:?}");
            assert!(!text.contains("# EOF"), "{text}");
            assert!(
                text.contains("# TYPE tokenfleet_grpc_requests_total counter"),
                "{text}"
            );
            assert!(
                text.contains("# TYPE tokenfleet_build_info gauge"),
                "{text}"
            );
            assert!(
                text.contains(r#"tokenfleet_grpc_requests_total{method="/tokenfleet.v1.Admin/WhoAmI",code="OK"} 1"#),
                "{text}"
            );
        }
    }

    #[test]
    fn process_metrics_come_from_proc() {
        let stats = ProcessStats::read();
        assert!(stats.cpu_seconds.is_some_and(|c| c >= 0.0), "{stats:?}");
        assert!(
            stats.resident_bytes.is_some_and(|r| r > 1024 * 1024),
            "{stats:?}"
        );
        assert!(stats.open_fds.is_some_and(|n| n >= 3), "{stats:?}");
        assert!(stats.max_fds.is_some_and(|n| n >= 64), "{stats:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            stats
                .start_time
                .is_some_and(|t| t <= now + 1.0 && t > now - 86400.0 * 365.0),
            "{stats:?}"
        );
        let text = Metrics::new().encode().unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} missing: {text}");
        }
    }
}
