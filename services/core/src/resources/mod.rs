//! Admin resources whose operations are domain-typed end to end: the [`crate::ops::resource`]
//! operations instantiated with the domain record (and its store version) as the front end's
//! form, so every front end — the broker's gRPC service, the web console — calls the same
//! operation with domain values and converts only at its own edge. Agents are the first
//! ([`agents`]); tenants, providers, mailboxes and devices are still described in the broker
//! (`tokenfleet_broker::admin`) with the protobuf messages as their form.

pub mod agents;

pub use agents::Agents;
