//! The broker's integration tests, one test binary with a module per area (one binary links the
//! broker once instead of once per file). The shared harness is `tokenfleet_testkit::harness`,
//! used here as `crate::support`.

use tokenfleet_testkit::harness as support;

mod admin_api;
mod alerts;
mod consent;
mod fleet;
mod identity;
mod runtime;
mod token_lifecycle;
mod user_mailboxes;
