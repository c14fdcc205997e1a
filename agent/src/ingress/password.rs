//! [`PasswordChecker`]: verification of the devices' local passwords (argon2 PHC hashes made by
//! the broker) with a bounded memory footprint.
//!
//! One argon2id check with the broker's parameters fills ~19 MiB. Run unbounded on the blocking
//! pool, 150 parallel wrong-password logins took the agent to 1.9 GB; and glibc keeps freed
//! blocks of that size in each thread's arena. So:
//!
//! * at most [`PasswordSettings::concurrency`] checks run at once (a semaphore; others wait),
//!   each in a memory block taken from a pool of at most that many blocks that are allocated once
//!   and reused, never freed — the hashing memory is `concurrency × m_cost`, whatever the load
//!   (and stays allocated after the first logins: a fixed cost instead of allocator churn);
//! * a hash asking for more than [`PasswordSettings::max_memory_kib`] is refused (a mistaken or
//!   hostile PHC string cannot make the agent allocate gigabytes);
//! * a verified credential is remembered for [`PasswordSettings::cache_for`] under an HMAC-SHA256
//!   of (user, hash, password) with a random per-process key — never the password — so a printer
//!   that logs in for every scan costs one hash per period, not one per message. Failures are not
//!   cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;

/// A password received in `AUTH`. `Debug` prints `[redacted]`.
#[derive(Clone)]
pub struct Password(zeroize::Zeroizing<String>);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Self(zeroize::Zeroizing::new(password.into()))
    }

    /// The password itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password([redacted])")
    }
}

/// Settings of the [`PasswordChecker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordSettings {
    /// Password checks running at once (each holds `m_cost` KiB, ~19 MiB with the broker's
    /// parameters).
    pub concurrency: usize,
    /// Largest argon2 memory cost (KiB) accepted in a stored hash.
    pub max_memory_kib: u32,
    /// How long a verified credential is remembered; zero = not at all.
    pub cache_for: Duration,
    /// Most credentials remembered.
    pub cache_entries: usize,
}

impl Default for PasswordSettings {
    fn default() -> Self {
        Self {
            concurrency: 2,
            max_memory_kib: 64 * 1024,
            cache_for: Duration::from_secs(300),
            cache_entries: 1024,
        }
    }
}

/// Verifies local passwords; see the module documentation. Shared by every device table the
/// agent installs (an `Arc`), so its limits hold across configuration changes.
pub struct PasswordChecker {
    settings: PasswordSettings,
    permits: Semaphore,
    memory: Mutex<Vec<Vec<Block>>>,
    cache_key: [u8; 32],
    cache: Mutex<HashMap<[u8; 32], Instant>>,
}

impl std::fmt::Debug for PasswordChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordChecker")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Default for PasswordChecker {
    fn default() -> Self {
        Self::new(PasswordSettings::default())
    }
}

type HmacSha256 = Hmac<Sha256>;

impl PasswordChecker {
    /// A checker with these settings (a `concurrency` of 0 is taken as 1).
    pub fn new(settings: PasswordSettings) -> Self {
        let mut cache_key = [0u8; 32];
        // Without randomness the cache stays off (a fixed key would make entries guessable).
        let cache_ok = getrandom::fill(&mut cache_key).is_ok();
        let settings = PasswordSettings {
            concurrency: settings.concurrency.max(1),
            cache_for: if cache_ok {
                settings.cache_for
            } else {
                Duration::ZERO
            },
            ..settings
        };
        Self {
            permits: Semaphore::new(settings.concurrency),
            memory: Mutex::new(Vec::new()),
            settings,
            cache_key,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache_id(&self, user: &str, phc: &str, password: &Password) -> [u8; 32] {
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.cache_key) else {
            return [0; 32];
        };
        for part in [
            user.as_bytes(),
            phc.as_bytes(),
            password.expose().as_bytes(),
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn cached(&self, id: &[u8; 32]) -> bool {
        if self.settings.cache_for.is_zero() {
            return false;
        }
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(id).is_some_and(|until| *until > Instant::now())
    }

    fn remember(&self, id: [u8; 32]) {
        if self.settings.cache_for.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.settings.cache_entries {
            cache.retain(|_, until| *until > now);
            if cache.len() >= self.settings.cache_entries {
                cache.clear();
            }
        }
        cache.insert(id, now + self.settings.cache_for);
    }

    /// Whether `password` matches the PHC string `phc` stored for `user`. Waits for a free slot
    /// when [`PasswordSettings::concurrency`] checks are running.
    pub async fn verify(self: &Arc<Self>, user: &str, password: Password, phc: &str) -> bool {
        let id = self.cache_id(user, phc, &password);
        if self.cached(&id) {
            return true;
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let this = Arc::clone(self);
        let phc = phc.to_owned();
        let checked = tokio::task::spawn_blocking(move || {
            let mut block = this
                .memory
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()
                .unwrap_or_default();
            let result = verify_in(
                &mut block,
                password.expose().as_bytes(),
                &phc,
                this.settings,
            );
            this.memory
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(block);
            result
        })
        .await;
        match checked {
            Ok(Ok(true)) => {
                self.remember(id);
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(problem)) => {
                tracing::error!(%problem, "the stored ingress password hash cannot be used");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "password check task failed");
                false
            }
        }
    }
}

/// Checks `password` against `phc` using `memory` (grown to the hash's memory cost if needed,
/// then kept for the next check).
fn verify_in(
    memory: &mut Vec<Block>,
    password: &[u8],
    phc: &str,
    settings: PasswordSettings,
) -> Result<bool, String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    let params = Params::try_from(&hash).map_err(|e| format!("argon2 parameters: {e}"))?;
    if params.m_cost() > settings.max_memory_kib {
        return Err(format!(
            "memory cost {} KiB is over the limit of {} KiB",
            params.m_cost(),
            settings.max_memory_kib
        ));
    }
    let algorithm = Algorithm::try_from(hash.algorithm.as_str())
        .map_err(|e| format!("algorithm {}: {e}", hash.algorithm.as_str()))?;
    let version = match hash.version {
        Some(v) => Version::try_from(v).map_err(|e| format!("version {v}: {e}"))?,
        None => Version::default(),
    };
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return Err("the hash has no salt or no output".to_owned());
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
        .map_err(|e| format!("argon2: {e}"))?;
    Ok(bool::from(out.as_slice().ct_eq(expected.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher as _;

    fn phc(password: &str) -> String {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn verifies_with_reused_memory_and_caches_only_successes() {
        let checker = Arc::new(PasswordChecker::default());
        let hash = phc("right");
        assert!(checker.verify("u", Password::new("right"), &hash).await);
        assert!(!checker.verify("u", Password::new("wrong"), &hash).await);
        assert!(!checker.verify("v", Password::new("wrong"), &hash).await);
        // One block in the pool, reused for every check.
        assert_eq!(checker.memory.lock().map(|m| m.len()).unwrap_or(0), 1);
        assert_eq!(checker.cache.lock().map(|c| c.len()).unwrap_or(0), 1);
        // The cache hit needs the same user, hash and password.
        assert!(checker.verify("u", Password::new("right"), &hash).await);
        assert!(
            !checker
                .verify("u", Password::new("right"), &phc("other"))
                .await
        );
    }

    #[test]
    fn refuses_a_hash_over_the_memory_limit() {
        let hash = "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY";
        let err = verify_in(&mut Vec::new(), b"x", hash, PasswordSettings::default())
            .expect_err("over the limit");
        assert!(err.contains("memory cost"), "{err}");
    }
}
