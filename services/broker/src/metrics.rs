//! Prometheus metrics of the broker process (served as text at `GET /metrics`): build info, gRPC
//! requests by method and status code (counted by [`GrpcMetricsLayer`] around every gRPC service),
//! and store ping failures. Labels never carry request data beyond the method name, and only
//! method names the broker actually serves: anything else is counted as `other`.

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
use tower::{Layer, Service};

/// Labels of `tokenfleet_grpc_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    /// Full method path `/package.Service/Method`, or `other`.
    method: String,
    /// gRPC status code name (`OK`, `UNAUTHENTICATED`, …).
    code: String,
}

struct Inner {
    registry: Registry,
    grpc_requests: Family<GrpcLabels, Counter>,
    store_ping_failures: Counter,
    store_up: Gauge,
    known_methods: HashSet<String>,
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
    /// A fresh registry with every broker metric registered.
    pub fn new() -> Self {
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
        Self {
            inner: Arc::new(Inner {
                registry,
                grpc_requests,
                store_ping_failures,
                store_up,
                known_methods: served_methods(),
            }),
        }
    }

    /// The metrics in Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
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
}
