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
//! client failing on purpose cannot keep the others out: the budget of
//! [`crate::auth_failures`], shared with the Admin API's failed authentications.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::auth_failures::AuthFailures;
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
    /// Failed sign-ins per source (shared with the Admin API).
    failures: AuthFailures,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<String, Session>,
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

    /// Sessions whose failed sign-ins count in `failures` (the Admin API's budget).
    pub fn with_failures(failures: AuthFailures) -> Self {
        Self {
            inner: Arc::default(),
            failures,
        }
    }

    /// Whether `peer` may try to sign in: `false` when its source spent its failure budget
    /// ([`crate::auth_failures::MAX_FAILURES`] in the last minute) on this replica.
    pub fn failure_allowed(&self, peer: Option<IpAddr>) -> bool {
        self.failures.check(peer).is_ok()
    }

    /// Records a failed sign-in from `peer`.
    pub fn record_failure(&self, peer: Option<IpAddr>) {
        self.failures.record(peer);
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
