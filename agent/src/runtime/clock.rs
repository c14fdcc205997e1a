//! The source of "now" for the runtime's schedules (token renewal, retries, fetch intervals):
//! the system clock in production, a fixed or stepped one in tests.

use std::time::SystemTime;

/// The source of "now" (a fixed or stepped clock in tests).
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
