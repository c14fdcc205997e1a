//! [`LoginGuard`]: throttling of local logins (SMTP `AUTH`, POP3 `USER`/`PASS`), shared by both
//! listeners so a client cannot switch protocols to get fresh attempts.
//!
//! Failures are counted per source (an IPv4 address or an IPv6 /64, see
//! [`tokenfleet_listen::source_key`]) and per user name, within [`LoginLimits::failure_window`]:
//!
//! * after [`LoginLimits::slowdown_after`] failures the answer to each further failure is
//!   delayed ([`LoginLimits::delay_step`] per failure over the threshold, at most
//!   [`LoginLimits::max_delay`]), which slows guessing from one connection to a crawl;
//! * after [`LoginLimits::lockout_after`] failures the source, or the user name, is locked for
//!   [`LoginLimits::lockout`]: logins are refused without checking the password (no password
//!   hash is computed, so a locked-out attacker costs nothing).
//!
//! The per-user lock would let anyone lock a device out by guessing its user name. A source that
//! logged in successfully as a user within [`LoginLimits::trusted_for`] is therefore exempt from
//! that user's lock (not from its own source lock): the printer that knows its password keeps
//! working while someone elsewhere guesses.
//!
//! State is kept in memory only and bounded: user names are stored as keyed hashes (never the
//! name), and the tables hold at most [`LoginLimits::max_tracked`] entries (expired ones are
//! pruned first, then the oldest unlocked ones).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Settings of the [`LoginGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures (per source or user) after which failure answers are delayed.
    pub slowdown_after: u32,
    /// Delay added per failure over `slowdown_after`.
    pub delay_step: Duration,
    /// Longest delay of one answer.
    pub max_delay: Duration,
    /// Failures (per source or user) within `failure_window` that lock it.
    pub lockout_after: u32,
    /// Window in which failures are counted (restarts after a quiet window).
    pub failure_window: Duration,
    /// How long a lock lasts.
    pub lockout: Duration,
    /// How long a source that logged in as a user stays exempt from that user's lock.
    pub trusted_for: Duration,
    /// Most entries kept per table.
    pub max_tracked: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            slowdown_after: 3,
            delay_step: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            lockout_after: 10,
            failure_window: Duration::from_secs(15 * 60),
            lockout: Duration::from_secs(15 * 60),
            trusted_for: Duration::from_secs(24 * 3600),
            max_tracked: 10_000,
        }
    }
}

/// Whether a login may be tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Check the password.
    Allowed,
    /// Refuse without checking; try again after this long.
    LockedOut {
        /// Time left on the lock.
        retry_after: Duration,
        /// Whether the source (else the user name) is locked.
        source: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Source(IpAddr),
    /// Keyed hash of the user name.
    User(u64),
}

#[derive(Debug, Default)]
struct Tables {
    failures: HashMap<Key, Failures>,
    /// (user hash, source) → trusted until.
    trusted: HashMap<(u64, IpAddr), Instant>,
    /// Sources with a successful login → until when they count as known.
    known: HashMap<IpAddr, Instant>,
}

/// Login throttling for the agent's listeners; see the module documentation.
#[derive(Debug)]
pub struct LoginGuard {
    limits: LoginLimits,
    hasher: RandomState,
    tables: Mutex<Tables>,
}

impl Default for LoginGuard {
    fn default() -> Self {
        Self::new(LoginLimits::default())
    }
}

impl LoginGuard {
    /// A guard with these limits.
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            hasher: RandomState::new(),
            tables: Mutex::new(Tables::default()),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> LoginLimits {
        self.limits
    }

    fn user_key(&self, user: &str) -> u64 {
        self.hasher.hash_one(user.to_lowercase())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `user` may try to log in from `ip` now.
    pub fn check(&self, ip: IpAddr, user: &str) -> Admission {
        let now = Instant::now();
        let source = tokenfleet_listen::source_key(ip);
        let user = self.user_key(user);
        let tables = self.lock();
        let locked = |key: Key| {
            tables
                .failures
                .get(&key)
                .and_then(|f| f.locked_until)
                .filter(|until| *until > now)
                .map(|until| until - now)
        };
        if let Some(retry_after) = locked(Key::Source(source)) {
            return Admission::LockedOut {
                retry_after,
                source: true,
            };
        }
        let trusted = tables
            .trusted
            .get(&(user, source))
            .is_some_and(|until| *until > now);
        if !trusted && let Some(retry_after) = locked(Key::User(user)) {
            return Admission::LockedOut {
                retry_after,
                source: false,
            };
        }
        Admission::Allowed
    }

    /// Whether a login from `ip` succeeded within [`LoginLimits::trusted_for`] (such sources are
    /// exempt from the listeners' total session cap, see [`crate::line_server::SessionLimits`]).
    pub fn known_source(&self, ip: IpAddr) -> bool {
        let source = tokenfleet_listen::source_key(ip);
        self.lock()
            .known
            .get(&source)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Records a failed login; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, user: &str) -> Duration {
        let now = Instant::now();
        let source = tokenfleet_listen::source_key(ip);
        let user = self.user_key(user);
        let limits = self.limits;
        let mut tables = self.lock();
        let mut worst = 0;
        for key in [Key::Source(source), Key::User(user)] {
            if !tables.failures.contains_key(&key) {
                make_room(&mut tables.failures, limits.max_tracked, now);
            }
            let f = tables.failures.entry(key).or_insert(Failures {
                count: 0,
                window_start: now,
                locked_until: None,
            });
            if now.duration_since(f.window_start) > limits.failure_window
                && f.locked_until.is_none_or(|u| u <= now)
            {
                *f = Failures {
                    count: 0,
                    window_start: now,
                    locked_until: None,
                };
            }
            f.count = f.count.saturating_add(1);
            if f.count >= limits.lockout_after && f.locked_until.is_none_or(|u| u <= now) {
                f.locked_until = Some(now + limits.lockout);
                tracing::warn!(
                    source = %source,
                    what = if matches!(key, Key::Source(_)) { "source" } else { "user name" },
                    failures = f.count,
                    lockout_seconds = limits.lockout.as_secs(),
                    "too many failed logins: locked out"
                );
            }
            worst = worst.max(f.count);
        }
        let over = worst.saturating_sub(limits.slowdown_after);
        limits.delay_step.saturating_mul(over).min(limits.max_delay)
    }

    /// Records a successful login: clears the source's failures and trusts it for `user`.
    pub fn succeeded(&self, ip: IpAddr, user: &str) {
        let now = Instant::now();
        let source = tokenfleet_listen::source_key(ip);
        let user = self.user_key(user);
        let limits = self.limits;
        let mut tables = self.lock();
        if let Some(f) = tables.failures.get_mut(&Key::Source(source))
            && f.locked_until.is_none_or(|u| u <= now)
        {
            tables.failures.remove(&Key::Source(source));
        }
        if tables.trusted.len() >= limits.max_tracked {
            tables.trusted.retain(|_, until| *until > now);
            if tables.trusted.len() >= limits.max_tracked {
                tables.trusted.clear();
            }
        }
        tables
            .trusted
            .insert((user, source), now + limits.trusted_for);
        if tables.known.len() >= limits.max_tracked {
            tables.known.retain(|_, until| *until > now);
            if tables.known.len() >= limits.max_tracked {
                tables.known.clear();
            }
        }
        tables.known.insert(source, now + limits.trusted_for);
    }
}

/// Frees one slot in a full table: expired entries first, then the oldest unlocked one.
fn make_room(failures: &mut HashMap<Key, Failures>, max: usize, now: Instant) {
    if failures.len() < max {
        return;
    }
    failures.retain(|_, f| f.locked_until.is_some_and(|u| u > now));
    if failures.len() < max {
        return;
    }
    if let Some(oldest) = failures
        .iter()
        .min_by_key(|(_, f)| f.window_start)
        .map(|(k, _)| *k)
    {
        failures.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LoginLimits {
        LoginLimits {
            slowdown_after: 2,
            delay_step: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
            lockout_after: 4,
            ..LoginLimits::default()
        }
    }

    #[test]
    fn delays_grow_then_the_source_is_locked() {
        let guard = LoginGuard::new(limits());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let delays: Vec<Duration> = (0..4).map(|_| guard.failed(ip, "x")).collect();
        assert_eq!(delays, [0, 0, 100, 200].map(Duration::from_millis).to_vec());
        assert!(matches!(
            guard.check(ip, "other"),
            Admission::LockedOut { source: true, .. }
        ));
        assert_eq!(guard.failed(ip, "x"), Duration::from_millis(250));
    }

    #[test]
    fn a_user_lock_spares_sources_that_logged_in_before() {
        let guard = LoginGuard::new(limits());
        let printer: IpAddr = [10, 0, 0, 7].into();
        guard.succeeded(printer, "mfd");
        for i in 0..4u8 {
            // Four attackers, one failure each: no source lock, but the user name is locked.
            guard.failed(IpAddr::from([192, 0, 2, i]), "MFD");
        }
        assert!(matches!(
            guard.check([192, 0, 2, 9].into(), "mfd"),
            Admission::LockedOut { source: false, .. }
        ));
        assert_eq!(guard.check(printer, "mfd"), Admission::Allowed);
        assert_eq!(
            guard.check([192, 0, 2, 9].into(), "other"),
            Admission::Allowed
        );
    }

    #[test]
    fn tables_stay_bounded() {
        let guard = LoginGuard::new(LoginLimits {
            max_tracked: 50,
            ..limits()
        });
        for i in 0..1000u32 {
            guard.failed(IpAddr::from(i.to_be_bytes()), &format!("user{i}"));
        }
        assert!(guard.lock().failures.len() <= 50);
    }
}
