//! The tokenfleet fleet agent (being written): enrollment and the client-certificate identity
//! ([`identity`]) so far.
//!
//! Dependency direction: depends only on `tokenfleet-proto` (the wire types) and general crates,
//! never on broker crates.

pub mod identity;
