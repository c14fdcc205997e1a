//! The broker's integration tests, one test binary with a module per area (one binary links the
//! broker once instead of once per file). `support` is the harness they share.

mod admin_api;
mod alerts;
mod consent;
mod fleet;
mod identity;
mod runtime;
mod support;
mod token_lifecycle;
mod token_recovery;
mod user_mailboxes;
