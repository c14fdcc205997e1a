//! Failed authentications per source address, one budget per replica shared by the console's
//! sign-in, the Admin API (a wrong or missing API key) and agent enrollment (a code that is not
//! valid): a source (an IPv4 address, an IPv6 /64; behind the console's
//! `[http] trusted_proxies`, the client they name) that failed [`MAX_FAILURES`] times within
//! [`FAILURE_WINDOW`] is refused before its key is even looked up, so one client guessing keys
//! (or sending a wrong one in a loop) costs neither store reads nor a log line per attempt,
//! and cannot keep the other sources out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failed authentications allowed per source per [`FAILURE_WINDOW`] before that source is
/// refused (console: 429; Admin API: `RESOURCE_EXHAUSTED`).
pub const MAX_FAILURES: u32 = 20;
/// Window of [`MAX_FAILURES`].
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Sources whose failures are counted at once; when more fail within a window, the one whose
/// window started first is forgotten (bounded memory whatever the flood).
pub const MAX_FAILING_SOURCES: usize = 10_000;

/// The answer to a source over its budget, `wait` before its window ends.
pub fn refused(wait: Duration) -> crate::ops::Error {
    crate::ops::Error::exhausted_for(
        "too many failed authentications from your address in the last minute",
        wait,
    )
}

/// The failure budget of each source on this replica. Cheap to clone (one shared map).
#[derive(Debug, Clone, Default)]
pub struct AuthFailures {
    /// Per source in its current window: when the window started, how many failures.
    by_source: Arc<Mutex<HashMap<IpAddr, (Instant, u32)>>>,
}

/// What failures are counted by: the source of the address ([`tokenfleet_listen::source_key`]:
/// an IPv6 address's /64); `None` (no address known) is one source.
fn source_of(peer: Option<IpAddr>) -> IpAddr {
    peer.map_or(
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        tokenfleet_listen::source_key,
    )
}

impl AuthFailures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (Instant, u32)>> {
        self.by_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Ok` when `peer` may try to authenticate; else how long until its window ends.
    pub fn check(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        match self.lock().get(&source_of(peer)) {
            Some((start, failures))
                if now.duration_since(*start) < FAILURE_WINDOW && *failures >= MAX_FAILURES =>
            {
                Err(FAILURE_WINDOW.saturating_sub(now.duration_since(*start)))
            }
            _ => Ok(()),
        }
    }

    /// Records a failed authentication from `peer`.
    pub fn record(&self, peer: Option<IpAddr>) {
        let now = Instant::now();
        let source = source_of(peer);
        let mut failures = self.lock();
        if !failures.contains_key(&source) && failures.len() >= MAX_FAILING_SOURCES {
            failures.retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
            if failures.len() >= MAX_FAILING_SOURCES
                && let Some(first) = failures
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(source, _)| *source)
            {
                failures.remove(&first);
            }
        }
        let entry = failures.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_per_source() {
        let failures = AuthFailures::default();
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(failures.check(Some(one)).is_ok());
            failures.record(Some(one));
        }
        let wait = failures.check(Some(one)).expect_err("the budget is spent");
        assert!(wait <= FAILURE_WINDOW && wait > Duration::ZERO, "{wait:?}");
        assert!(
            failures.check(Some(other)).is_ok(),
            "another source was refused"
        );
        // The same address written as an IPv4-mapped IPv6 one is the same source.
        assert!(
            failures
                .check(Some("::ffff:192.0.2.1".parse().unwrap()))
                .is_err()
        );
        // One IPv6 /64 is one source.
        for _ in 0..MAX_FAILURES {
            failures.record(Some("2001:db8:1:2::1".parse().unwrap()));
        }
        assert!(
            failures
                .check(Some("2001:db8:1:2:ffff::9".parse().unwrap()))
                .is_err()
        );
        assert!(
            failures
                .check(Some("2001:db8:1:3::1".parse().unwrap()))
                .is_ok()
        );
    }

    #[test]
    fn the_failing_sources_kept_are_bounded() {
        let failures = AuthFailures::default();
        let first: IpAddr = "10.0.0.0".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            failures.record(Some(first));
        }
        for n in 1..=MAX_FAILING_SOURCES as u32 {
            failures.record(Some(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))));
        }
        assert_eq!(failures.lock().len(), MAX_FAILING_SOURCES);
        assert!(
            failures.check(Some(first)).is_ok(),
            "the source whose window started first was not the one forgotten"
        );
    }
}
