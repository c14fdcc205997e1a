//! Per-agent token bucket for `IssueAccessToken` (`[agents] issue_rate_per_minute` and
//! `issue_burst`). The buckets live in this process: each broker replica limits on its own, so
//! with N replicas behind a load balancer an agent may get up to N times the rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most agents tracked before idle (full) buckets are dropped.
const MAX_TRACKED: usize = 100_000;

/// A rate: `per_minute` tokens refill per minute, up to `burst` held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained calls per minute; 0 = unlimited.
    pub per_minute: u32,
    /// Calls allowed at once after a quiet period (at least 1).
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// In-process token buckets keyed by agent.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: Rate,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

impl RateLimiter {
    /// Buckets at `rate`.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Takes one token for `key` at `now`: `Ok(())`, or `Err(wait)` until one is available.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.rate.per_minute == 0 {
            return Ok(());
        }
        let per_sec = f64::from(self.rate.per_minute) / 60.0;
        let burst = f64::from(self.rate.burst.max(1));
        // A poisoned lock only means another call panicked mid-update; the map stays usable.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst
            });
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let limiter = RateLimiter::new(Rate {
            per_minute: 60,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", t0).is_ok());
        }
        let wait = limiter.check("a", t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another agent has its own bucket.
        assert!(limiter.check("b", t0).is_ok());
        // One second refills one token.
        assert!(limiter.check("a", t0 + Duration::from_secs(1)).is_ok());
        assert!(limiter.check("a", t0 + Duration::from_secs(1)).is_err());
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(600);
        for _ in 0..3 {
            assert!(limiter.check("a", later).is_ok());
        }
        assert!(limiter.check("a", later).is_err());
    }

    #[test]
    fn zero_is_unlimited() {
        let limiter = RateLimiter::new(Rate {
            per_minute: 0,
            burst: 1,
        });
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(limiter.check("a", t0).is_ok());
        }
    }
}
