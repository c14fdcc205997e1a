//! The broker's operations layer, without a transport: what the Admin gRPC service, the HTTP
//! listener and the agent-facing service share. It holds the one error type ([`Error`]), the
//! kit every operation uses (names for messages and audit targets, paging, reading and writing
//! versioned records with the errors a caller sees, audited changes), the generic resource
//! operations (create/get/list/update/delete with versions, references, server-owned fields and
//! audit, see [`resource`]), enum values as callers sent them ([`choice`]) and the provider
//! policy.
//!
//! Dependency direction: `ops` uses the domain, store, seal and `crate::{records, audit, authz,
//! state}`; the edges (the broker's gRPC services and HTTP listener) use it, never the reverse —
//! this crate has no transport at all (see the crate header).

pub mod change;
pub mod choice;
pub mod error;
pub mod mask;
pub mod names;
pub mod paging;
pub mod provider_policy;
pub mod resource;
pub mod stored;

pub use error::{Error, Result};
