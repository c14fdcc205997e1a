//! W3C trace context over gRPC: the agent's calls carry the current span as `traceparent` (and
//! `tracestate`) metadata ([`traced_request`]), and the broker's gRPC server continues the
//! caller's trace ([`GrpcTraceLayer`]), so one trace runs from the printer's message through
//! the broker to the identity provider. Without an exporter there is no span context, and
//! nothing is sent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// `message` as a request whose metadata carries the current span's context.
pub fn traced_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject_current(request.metadata_mut());
    request
}

/// Writes the current span's context into `metadata` (nothing when no span is recorded).
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Around the gRPC routes: one `grpc_request` server span per call, named after the method
/// (`tokenfleet.v1.TokenBroker/IssueAccessToken`), child of the caller's `traceparent` when
/// there is a valid one. Health checks and reflection get no span (probes would fill a
/// collector with them).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTraceService { inner }
    }
}

/// The service [`GrpcTraceLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct GrpcTraceService<S> {
    inner: S,
}

fn untraced(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcTraceService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if untraced(path) {
            return Box::pin(self.inner.call(request));
        }
        let name = path.trim_start_matches('/').to_owned();
        let span = tracing::info_span!(
            "grpc_request",
            otel.name = %name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.method = %name,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        if parent.span().span_context().is_valid() {
            // Before the span is first entered: its context is built then, with this parent.
            let _ = span.set_parent(parent);
        }
        let future = span.in_scope(|| self.inner.call(request));
        let recorder = span.clone();
        Box::pin(
            async move {
                let response = future.await;
                if let Ok(response) = &response {
                    // A call that fails before its first message answers in the headers
                    // (trailers-only); a streamed answer's status comes later and is not seen.
                    if let Some(code) = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                    {
                        recorder.record("rpc.grpc.status_code", code);
                        if code != 0 {
                            recorder.record("otel.status_code", "ERROR");
                        }
                    }
                }
                response
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_injected_without_a_recorded_span() {
        let request = traced_request(());
        assert!(request.metadata().get("traceparent").is_none());
    }

    #[test]
    fn traceparent_is_read_from_headers() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn probes_are_not_traced() {
        assert!(untraced("/grpc.health.v1.Health/Check"));
        assert!(untraced(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!untraced("/tokenfleet.v1.TokenBroker/IssueAccessToken"));
    }
}
