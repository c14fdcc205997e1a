//! The tokenfleet broker: the only holder of provider credentials and refresh tokens. Serves the
//! operator-facing `Admin` API and the agent-facing `TokenBroker` API on one gRPC listener (plus
//! health and reflection), and health/metrics on an HTTP listener.
//!
//! Dependency direction: proto, domain, seal and store are below this crate; only binaries
//! (`tokenfleet-broker`) and the test kit depend on it.

pub mod state;

// Operations without a transport (the one error type, the resource kit, audited changes) and
// the edges that map them to gRPC and HTTP.
pub mod edge;
pub mod ops;

// Admin API (CRUD, validation, conversion, authorization, audit, API keys).
pub mod admin;
pub mod api_keys;
pub mod audit;
pub mod authz;
pub mod convert;
pub mod records;
pub mod reseal;

// Runtime (configuration, gRPC + HTTP serving, dev mode).
pub mod config;
pub mod dev;
pub mod http;
pub mod listener;
pub mod malformed;
pub mod metrics;
pub mod server;

// Agent-facing API and agent identity (CA, enrollment, client certificates).
pub mod identity;
pub mod rate_limit;
pub mod token_broker;

// Fleet status, agent configuration and commands (status streams, connection tests).
pub mod fleet;

pub mod tokens;

// Operator alerts (REAUTH_REQUIRED, expiring refresh tokens): signed webhooks and e-mail.
pub mod alerts;
