//! Console sessions: sign-in with an API key creates a server-side session; the browser holds
//! only a random session id in a `Secure; HttpOnly; SameSite=Strict` cookie (the API key never
//! leaves the sign-in request). Sessions live in this replica's memory, bounded in number,
//! with an idle timeout and an absolute lifetime; every request re-reads the API key record, so
//! a revoked key ends its sessions at once. With several replicas a session is known only to
//! the replica that made it (route the console with sticky sessions, or sign in again).
//!
//! Every POST carries the session's CSRF token (a random value rendered into each form),
//! compared in constant time. The sign-in form itself, before there is a session, is protected
//! the double-submit way: a short-lived pre-session cookie and the same value in the form.
//! Failed sign-ins are limited per source address (an IPv6 /64; behind `[http]
//! trusted_proxies`, the client they name, see [`crate::listener::ClientAddress`]), so one
//! client failing on purpose cannot keep the others out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::authz::Principal;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "tf_console";
/// Name of the sign-in form's double-submit cookie.
pub const SIGNIN_COOKIE: &str = "tf_signin";
/// A session ends after this long without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, whatever happens.
pub const MAX_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// At most this many sessions per replica; the oldest is dropped for a new one.
pub const MAX_SESSIONS: usize = 10_000;
/// Failed sign-ins allowed per source (an IPv4 address, an IPv6 /64) per replica per
/// [`FAILURE_WINDOW`] before sign-in from that source answers 429. Per source, so one client
/// failing on purpose cannot keep everybody else out of the console.
pub const MAX_FAILURES: u32 = 20;
/// Window of [`MAX_FAILURES`].
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Sources whose failures are counted at once; when more fail within a window, the one whose
/// window started first is forgotten (bounded memory whatever the flood).
pub const MAX_FAILING_SOURCES: usize = 10_000;

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who signed in (the API key's id, role and tenant).
    pub principal: Principal,
    /// The per-session CSRF token rendered into forms.
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
}

/// The sessions of this replica, keyed by the SHA-256 of the session id (so a memory dump does
/// not hand out cookies either).
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<String, Session>,
    /// Failed sign-ins per source in its current window: when the window started, how many.
    failures: HashMap<IpAddr, (Instant, u32)>,
}

/// What failed sign-ins are counted by: the source of the address
/// ([`tokenfleet_listen::source_key`]: an IPv6 address's /64); `None` (no address known) is one
/// source.
fn source_of(peer: Option<IpAddr>) -> IpAddr {
    peer.map_or(
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        tokenfleet_listen::source_key,
    )
}

/// 32 random bytes, base64url.
pub fn random_token() -> Option<String> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes))
}

fn hashed(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(id.as_bytes()))
}

/// Constant-time comparison of two tokens.
pub fn same_token(a: &str, b: &str) -> bool {
    !a.is_empty() && a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a session for `principal`; returns the session id for the cookie.
    pub fn create(&self, principal: Principal) -> Option<(String, Session)> {
        let id = random_token()?;
        let csrf = random_token()?;
        let now = Instant::now();
        let session = Session {
            principal,
            csrf,
            created: now,
            last_seen: now,
        };
        let mut inner = self.lock();
        inner.sessions.retain(|_, s| alive(s, now));
        if inner.sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = inner
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
        {
            inner.sessions.remove(&oldest);
        }
        inner.sessions.insert(hashed(&id), session.clone());
        Some((id, session))
    }

    /// The live session with id `id` (touching it), if any.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let key = hashed(id);
        let mut inner = self.lock();
        match inner.sessions.get_mut(&key) {
            Some(s) if alive(s, now) => {
                s.last_seen = now;
                Some(s.clone())
            }
            Some(_) => {
                inner.sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session with id `id`.
    pub fn remove(&self, id: &str) {
        self.lock().sessions.remove(&hashed(id));
    }

    /// Ends every session of API key `key_id` (the key is gone).
    pub fn remove_key(&self, key_id: &str) {
        self.lock()
            .sessions
            .retain(|_, s| s.principal.key_id != key_id);
    }

    /// Whether `peer` may try to sign in: `false` when its source spent its failure budget
    /// ([`MAX_FAILURES`] in the last [`FAILURE_WINDOW`]) on this replica.
    pub fn failure_allowed(&self, peer: Option<IpAddr>) -> bool {
        let now = Instant::now();
        self.lock()
            .failures
            .get(&source_of(peer))
            .is_none_or(|(start, failures)| {
                now.duration_since(*start) >= FAILURE_WINDOW || *failures < MAX_FAILURES
            })
    }

    /// Records a failed sign-in from `peer`.
    pub fn record_failure(&self, peer: Option<IpAddr>) {
        let now = Instant::now();
        let source = source_of(peer);
        let mut inner = self.lock();
        let failures = &mut inner.failures;
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

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last_seen) < IDLE_TIMEOUT && now.duration_since(s.created) < MAX_LIFETIME
}

/// A `Set-Cookie` value: `Secure; HttpOnly; SameSite=Strict; Path=/`, with `max_age` seconds.
pub fn cookie(name: &str, value: &str, max_age: u64) -> String {
    format!("{name}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Strict")
}

/// The value of cookie `name` in a `Cookie` header.
pub fn read_cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfleet_domain::Role;

    #[test]
    fn sessions_are_found_by_id_only_and_end() {
        let sessions = Sessions::default();
        let p = Principal {
            key_id: "k".into(),
            role: Role::Viewer,
            tenant: None,
        };
        let (id, s) = sessions.create(p).unwrap();
        assert_eq!(sessions.get(&id).unwrap().csrf, s.csrf);
        assert!(sessions.get("other").is_none());
        sessions.remove_key("k");
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn failed_sign_ins_are_counted_per_source() {
        let sessions = Sessions::default();
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(sessions.failure_allowed(Some(one)));
            sessions.record_failure(Some(one));
        }
        assert!(!sessions.failure_allowed(Some(one)), "the budget is spent");
        assert!(
            sessions.failure_allowed(Some(other)),
            "another source was refused"
        );
        // The same address written as an IPv4-mapped IPv6 one is the same source.
        assert!(!sessions.failure_allowed(Some("::ffff:192.0.2.1".parse().unwrap())));
        // One IPv6 /64 is one source.
        for _ in 0..MAX_FAILURES {
            sessions.record_failure(Some("2001:db8:1:2::1".parse().unwrap()));
        }
        assert!(!sessions.failure_allowed(Some("2001:db8:1:2:ffff::9".parse().unwrap())));
        assert!(sessions.failure_allowed(Some("2001:db8:1:3::1".parse().unwrap())));
    }

    #[test]
    fn the_failing_sources_kept_are_bounded() {
        let sessions = Sessions::default();
        let first: IpAddr = "10.0.0.0".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            sessions.record_failure(Some(first));
        }
        for n in 1..=MAX_FAILING_SOURCES as u32 {
            sessions.record_failure(Some(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))));
        }
        assert_eq!(sessions.lock().failures.len(), MAX_FAILING_SOURCES);
        assert!(
            sessions.failure_allowed(Some(first)),
            "the source whose window started first was not the one forgotten"
        );
    }

    #[test]
    fn cookies_and_tokens() {
        assert_eq!(
            read_cookie("a=1; tf_console=xyz; b=2", SESSION_COOKIE),
            Some("xyz")
        );
        assert_eq!(read_cookie("a=1", SESSION_COOKIE), None);
        let c = cookie(SESSION_COOKIE, "v", 60);
        for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(flag), "{c}");
        }
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("", ""));
    }
}
