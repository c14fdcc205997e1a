//! The tokenfleet broker: the only holder of provider credentials and refresh tokens. Serves the
//! operator-facing `Admin` API and the agent-facing `TokenBroker` API on one gRPC listener (plus
//! health and reflection), and health/metrics on an HTTP listener.
//!
//! Dependency direction: `tokenfleet-core` (the operations: resources, token lifecycle,
//! consent, agent identity, alerts, audit) and proto, domain, seal and store are below this
//! crate; only binaries (`tokenfleet-broker`) and the test kit depend on it. This crate is the
//! edge: the gRPC services ([`admin`], [`token_broker`], [`fleet`]), the HTTP listener and the
//! web console ([`console`]) decode a request, call one of the core's operations, and encode its
//! result ([`convert`] holds the wire conversions; the console renders domain values); the core's
//! one error type maps to gRPC and HTTP statuses once each ([`edge`]). The core's modules are
//! re-exported under their own names, so `tokenfleet_broker::tokens` is `tokenfleet_core::tokens`.

pub use tokenfleet_core::{
    alerts, api_keys, audit, authz, consent_links, identity, ops, rate_limit, records, reseal,
    state, tokens,
};

// The edges that map the core's errors to gRPC and HTTP.
pub mod edge;

pub mod auth_failures;

// Admin API (the gRPC service, the resources' wire conversions).
pub mod admin;
pub mod convert;

// Runtime (configuration, gRPC + HTTP serving, dev mode).
pub mod config;
pub mod dev;
pub mod http;
pub mod inventory;
pub mod listener;
pub mod malformed;
pub mod metrics;
pub mod server;

// Agent-facing API (the TokenBroker gRPC service).
pub mod token_broker;
pub mod tracing_store;

// The web console and the consent-link pages on the HTTP listener.
pub mod console;

// The fleet's edge: agent configuration and status streams on the wire, fleet status and
// connection tests (the state and operations are `tokenfleet_core::fleet`).
pub mod fleet;
