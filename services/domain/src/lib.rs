//! The tokenfleet domain model: tenants, providers, mailboxes, devices, agents, API keys, audit
//! events, token status, and the validation rules every surface applies.
//!
//! Dependency direction: depends only on `tokenfleet-seal` (for the sealed-secret envelope type).
//! No I/O, no Redis, tonic or HTTP: the store, the broker and the CLI depend on this crate.

mod model;
mod validate;

pub use model::*;
pub use validate::*;

use time::OffsetDateTime;

/// Source of the current time. Injected everywhere time matters, so expiry and refresh logic is
/// tested with controlled time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now, in UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}
