//! Retry timing after failed refreshes: exponential backoff with jitter, never sooner than the
//! provider's `Retry-After`, and the random spread that keeps mass consents from refreshing at the
//! same instant.

use std::time::Duration;

/// Longest `Retry-After` honoured; a provider asking for more is waited for this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Exponential backoff bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub min: Duration,
    /// Largest delay (before `Retry-After`, which may exceed it).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(30),
            max: Duration::from_secs(30 * 60),
        }
    }
}

impl Backoff {
    /// The delay before the next attempt after `failures` consecutive failures (1 = the first).
    /// `unit` is a random number in `[0, 1)` ([`unit_random`]); the delay is `min · 2^(failures-1)`
    /// capped at `max`, scaled by a factor in `[0.75, 1.25)` and clamped to `[min, max]`, and at
    /// least `retry_after` (itself capped at [`MAX_RETRY_AFTER`]).
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let base = self
            .min
            .checked_mul(1u32 << exponent)
            .unwrap_or(self.max)
            .min(self.max);
        let factor = 0.75 + 0.5 * unit.clamp(0.0, 1.0);
        let jittered = base.mul_f64(factor).clamp(self.min, self.max.max(self.min));
        match retry_after {
            Some(r) => jittered.max(r.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

/// A random number in `[0, 1)` from the operating system (0.5 if it cannot deliver one: spreading
/// work is best effort).
pub fn unit_random() -> f64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        // 53 random bits: every value exactly representable.
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_bounds() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, None, 0.5), Duration::from_secs(30));
        assert_eq!(b.delay(2, None, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay(3, None, 0.5), Duration::from_secs(120));
        assert_eq!(b.delay(7, None, 0.5), Duration::from_secs(1800));
        assert_eq!(b.delay(200, None, 0.5), Duration::from_secs(1800));
        // Jitter stays inside [min, max].
        for failures in 1..20 {
            for unit in [0.0, 0.3, 0.999] {
                let d = b.delay(failures, None, unit);
                assert!(d >= b.min && d <= b.max, "{failures} {unit}: {d:?}");
            }
        }
        assert!(b.delay(3, None, 0.0) < b.delay(3, None, 0.99));
    }

    #[test]
    fn retry_after_is_a_floor() {
        let b = Backoff::default();
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(600)), 0.5),
            Duration::from_secs(600)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(5)), 0.5),
            Duration::from_secs(30)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(10 * 24 * 3600)), 0.5),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn random_units_are_in_range_and_vary() {
        let values: Vec<f64> = (0..64).map(|_| unit_random()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(values.iter().any(|v| (v - values[0]).abs() > f64::EPSILON));
    }
}
