//! OpenTelemetry traces for the tokenfleet broker and agent, off unless `[tracing]
//! otlp_endpoint` is set:
//!
//! - [`settings`]: the `[tracing]` section (`otlp_endpoint`, `sample_ratio`, `service_name`),
//!   checked with every problem named by its key;
//! - [`export`]: the `tracing` layer that makes tokenfleet's `info` spans OpenTelemetry spans,
//!   sent in batches over OTLP/gRPC, with parent-based ratio sampling; its guard flushes at exit;
//! - [`propagation`]: W3C `traceparent` in gRPC metadata, injected by the agent's client and
//!   extracted by a tower layer around the broker's gRPC routes.
//!
//! Spans are made with plain `tracing` everywhere else (the transport-free core included); only
//! the binaries' crates depend on this one. Span fields never hold secrets, tokens or mail
//! addresses, and log events are not exported.
//!
//! Dependency direction: a leaf, depending on no tokenfleet crate; the broker and the agent
//! depend on it.

pub mod export;
pub mod propagation;
pub mod settings;

pub use export::{ExportError, OtelLayer, TracesGuard, otel_layer};
pub use propagation::{GrpcTraceLayer, inject_current, traced_request};
pub use settings::{Problem, Program, RawTracing, TracingSettings};
