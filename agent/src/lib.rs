//! The tokenfleet fleet agent (being written): enrollment and the client-certificate identity
//! ([`identity`]), the durable [`spool`], the legacy SMTP [`ingress`] and the OAuth [`sasl`]
//! payloads so far.
//!
//! Dependency direction: depends only on `tokenfleet-proto` (the wire types) and general crates,
//! never on broker crates.

pub mod identity;
pub mod ingress;
pub mod sasl;
pub mod spool;
