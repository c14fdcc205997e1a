//! The tokenfleet fleet agent (being written): enrollment and the client-certificate identity
//! ([`identity`]), the durable [`spool`], the legacy SMTP [`ingress`] and the OAuth [`sasl`]
//! payloads so far.
//!
//! Dependency direction: depends only on `tokenfleet-proto` (the wire types) and general crates,
//! never on broker crates.

pub mod config;
mod durable;
pub mod fetch;
pub mod fuzz;
pub mod identity;
pub mod ingress;
mod line_server;
pub mod maildrop;
pub mod pop3_server;
pub mod probe;
pub mod runtime;
pub mod sasl;
pub mod spool;
pub mod upstream;
pub mod wire;
