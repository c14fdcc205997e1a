//! [`MailboxRate`]: how the delivery worker keeps each mailbox under its upstream's sending limit
//! (Exchange Online: 30 messages a minute per mailbox, [`crate::upstream::messages_per_minute_for`]).
//!
//! A sliding window, not a token bucket: a message may start when fewer than `limit` messages
//! of the same mailbox started in the 60 seconds before it, so no 60-second window ever holds
//! more than `limit` — a bucket of `limit` tokens refilled at `limit` a minute would let `2 ×
//! limit` through in the first minute. A message that does not fit is not sent and not failed:
//! the worker postpones it (in memory, no attempt counted) to the moment a slot frees up, and it
//! is delivered then. Nothing is dropped; a queue of 300 scans for one mailbox drains in ten
//! minutes instead of tripping the provider's limit. Pure (the caller passes the time), so the
//! tests drive it with fixed instants.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

/// The window the limit counts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Start times of recent messages, per mailbox.
#[derive(Debug, Default)]
pub struct MailboxRate {
    started: HashMap<String, VecDeque<SystemTime>>,
}

impl MailboxRate {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a message of `mailbox` may start at `now` under `limit` messages a minute: `Ok`
    /// (and it counts from now on) or `Err(when)` the earliest time it may. A limit of 0 is taken
    /// as 1.
    pub fn admit(&mut self, mailbox: &str, limit: u32, now: SystemTime) -> Result<(), SystemTime> {
        let limit = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
        let started = self.started.entry(mailbox.to_owned()).or_default();
        while started
            .front()
            .is_some_and(|t| now.duration_since(*t).is_ok_and(|age| age >= WINDOW))
        {
            started.pop_front();
        }
        if started.len() < limit {
            started.push_back(now);
            return Ok(());
        }
        // The oldest start in the window leaves it WINDOW after it began.
        let oldest = started.front().copied().unwrap_or(now);
        Err(oldest + WINDOW)
    }

    /// Forgets mailboxes with nothing in the window at `now` (keeps the map small).
    pub fn prune(&mut self, now: SystemTime) {
        self.started.retain(|_, started| {
            started
                .back()
                .is_some_and(|t| now.duration_since(*t).map_or(true, |age| age < WINDOW))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_secs_f64(secs)
    }

    #[test]
    fn no_sixty_second_window_holds_more_than_the_limit() {
        let mut rate = MailboxRate::new();
        for i in 0..30 {
            assert_eq!(
                rate.admit("scan@contoso.example", 30, at(f64::from(i) * 0.1)),
                Ok(())
            );
        }
        // The 31st waits until the first leaves the window.
        assert_eq!(
            rate.admit("scan@contoso.example", 30, at(3.0)),
            Err(at(60.0))
        );
        assert_eq!(
            rate.admit("scan@contoso.example", 30, at(59.9)),
            Err(at(60.0))
        );
        assert_eq!(rate.admit("scan@contoso.example", 30, at(60.0)), Ok(()));
        // Then one more each time an earlier one leaves.
        assert_eq!(
            rate.admit("scan@contoso.example", 30, at(60.05)),
            Err(at(60.1))
        );
        assert_eq!(rate.admit("scan@contoso.example", 30, at(60.1)), Ok(()));
    }

    #[test]
    fn mailboxes_are_counted_apart() {
        let mut rate = MailboxRate::new();
        assert_eq!(rate.admit("a@x.example", 1, at(0.0)), Ok(()));
        assert_eq!(rate.admit("b@x.example", 1, at(0.0)), Ok(()));
        assert_eq!(rate.admit("a@x.example", 1, at(1.0)), Err(at(60.0)));
        rate.prune(at(61.0));
        assert!(rate.started.is_empty());
        assert_eq!(
            rate.admit("a@x.example", 0, at(61.0)),
            Ok(()),
            "0 is taken as 1"
        );
        assert_eq!(rate.admit("a@x.example", 0, at(62.0)), Err(at(121.0)));
    }

    #[test]
    fn simulated_hours_of_a_busy_mailbox_stay_under_the_limit() {
        // A mailbox with an endless queue, the worker retrying each deferred message exactly
        // when told: every 60 s window holds at most 30 starts, and the rate is the limit.
        let mut rate = MailboxRate::new();
        let mut starts = Vec::new();
        let mut now = at(0.0);
        while starts.len() < 3000 {
            match rate.admit("m", 30, now) {
                Ok(()) => starts.push(now),
                Err(when) => now = when,
            }
        }
        for (i, t) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .take_while(|u| u.duration_since(*t).is_ok_and(|d| d < WINDOW))
                .count();
            assert!(
                in_window <= 30,
                "{in_window} starts within 60 s of start {i}"
            );
        }
        let span = starts[2999].duration_since(starts[0]).unwrap_or_default();
        assert!(span >= Duration::from_secs(99 * 60), "{span:?}");
    }
}
