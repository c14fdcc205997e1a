//! The exporter: a batch of finished spans goes to the OTLP/gRPC collector in the background
//! (the SDK's batch processor thread; the tonic channel runs on the caller's tokio runtime), and
//! [`TracesGuard::shutdown`] sends what is left before the process exits.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::Layer as _;
use tracing_subscriber::registry::Registry;

use crate::settings::TracingSettings;

/// How long one export may take before it is given up (and retried by the SDK).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `tracing` layer that turns spans into OpenTelemetry spans. It goes first on the
/// registry (`registry().with(layer)`), so per-layer filters of the log output do not hide
/// spans from it, nor it spans from the logs.
pub type OtelLayer = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;

/// Why the exporter could not be built.
#[derive(Debug)]
pub struct ExportError(String);

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "setting up the OTLP exporter: {}", self.0)
    }
}

impl std::error::Error for ExportError {}

/// Keeps the tracer provider; [`TracesGuard::shutdown`] (or dropping it) flushes the spans not
/// sent yet and stops the exporter. Both block until the collector answered or the export
/// timed out: call them off the async runtime's workers (`spawn_blocking`, or after
/// `block_on` returned).
#[derive(Debug, Default)]
pub struct TracesGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracesGuard {
    /// Sends the spans still buffered and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing the last spans to the OTLP collector failed");
        }
    }
}

impl Drop for TracesGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Only tokenfleet's own spans at `info` or above become OpenTelemetry spans: library spans
/// (hyper, h2, tower) would drown them, and log events are not exported at all (they may name
/// addresses that traces must not carry; logs have their own pipeline).
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span()
        && meta.target().starts_with("tokenfleet")
        && *meta.level() <= tracing::Level::INFO
}

/// The layer and its guard for `settings`: `(None, inert guard)` when traces are off. Must run
/// inside a tokio runtime (the gRPC channel is created on it, and connects lazily: a collector
/// that is down costs dropped spans, never a failed start).
pub fn otel_layer(
    settings: &TracingSettings,
    version: &str,
) -> Result<(Option<OtelLayer>, TracesGuard), ExportError> {
    let Some(endpoint) = &settings.otlp_endpoint else {
        return Ok((None, TracesGuard::default()));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| ExportError(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            version.to_owned(),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(settings.service_name.clone());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_filter(tracing_subscriber::filter::filter_fn(exported))
        .boxed();
    Ok((
        Some(layer),
        TracesGuard {
            provider: Some(provider),
        },
    ))
}
