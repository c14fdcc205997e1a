//! The admin resources, domain-typed end to end: the [`crate::ops::resource`] operations
//! instantiated per resource with what callers send (domain values as given, not yet validated:
//! the record itself for agents and tenants, an input form for mailboxes, devices and providers,
//! whose enum values may be unset and whose secrets are in clear) and what they get back (domain
//! records with their store version; views without secrets). Every front end — the broker's gRPC
//! service, the web console — calls the same operation with domain values and converts only at
//! its own edge. All five resources live here: [`tenants`], [`providers`], [`mailboxes`],
//! [`devices`], [`agents`]. Authorization, validation, references, server-owned fields, secret
//! handling and audit are the core's.
//!
//! A mailbox as every surface shows it — the record with its grant record's token state — is
//! one form, [`mailboxes::MailboxView`]; operations that have already authorized their caller
//! read it with [`mailboxes::read`] (the token operations of [`crate::tokens::operator`] answer
//! with it).

pub mod agents;
pub mod devices;
mod fields;
pub mod mailboxes;
pub mod providers;
pub mod tenants;

pub use agents::Agents;
pub use devices::Devices;
pub use mailboxes::Mailboxes;
pub use providers::Providers;
pub use tenants::Tenants;
