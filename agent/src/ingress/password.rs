//! [`PasswordChecker`]: verification of the devices' local passwords (argon2 PHC hashes made by
//! the broker) with a bounded memory footprint.
//!
//! One argon2id check with the broker's parameters fills ~19 MiB. Run unbounded on the blocking
//! pool, 150 parallel wrong-password logins took the agent to 1.9 GB; and glibc keeps freed
//! blocks of that size in each thread's arena. So:
//!
//! * at most [`PasswordSettings::concurrency`] checks run at once (a semaphore; others wait):
//!   the hashing memory is at most `concurrency × m_cost`, whatever the load;
//! * each check's memory is given back to the system when it ends: it is allocated with a
//!   capacity above glibc's largest dynamic mmap threshold ([`MMAP_BLOCKS`], 33 MiB of address
//!   space, of which only `m_cost` is touched), so glibc serves it with `mmap` and returns it
//!   with `munmap` instead of keeping it in an arena (a 19 MiB block freed once would raise the
//!   threshold to 19 MiB, and every later block would stay resident). With the verified-login
//!   cache, a site whose printers log in per scan pays one check per period, and the agent's
//!   resident size between checks is its idle size, not idle + 19 MiB;
//! * a hash asking for more than [`PasswordSettings::max_memory_kib`] is refused (a mistaken or
//!   hostile PHC string cannot make the agent allocate gigabytes);
//! * a verified credential is remembered for [`PasswordSettings::cache_for`] as an HMAC-SHA256
//!   of (user, hash, password) with a random per-process key — never the password — filed under
//!   an HMAC of the user name and compared in constant time, so a printer that logs in for every
//!   scan costs one hash per period, not one per message. Failures are not cached. The cache is
//!   emptied when the device table changes ([`PasswordChecker::forget_all`]);
//! * concurrent logins with the same credentials that miss the cache wait for the one check
//!   already running for them (single flight) instead of hashing too: twenty printers of one
//!   site logging in at once cost one hash, not twenty.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

// tokio's clock: tests run the cache's expiry on paused time.
use tokio::time::Instant;

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
    /// parameters); 0 = one per core.
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
            concurrency: 0,
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
    permits: Arc<Semaphore>,
    cache_key: [u8; 32],
    /// HMAC(user) → (HMAC(user, hash, password), valid until).
    cache: Mutex<HashMap<[u8; 32], Remembered>>,
    /// Checks running, by credential HMAC: later callers wait on the cell.
    in_flight: Mutex<HashMap<[u8; 32], InFlight>>,
    /// Argon2 computations started (tests and metrics).
    hashes: AtomicU64,
    /// Argon2 computations running now, and the most ever at once.
    running: AtomicUsize,
    peak_running: AtomicUsize,
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

/// A remembered login: the HMAC of its credentials and until when it holds.
type Remembered = ([u8; 32], Instant);

/// The answer of a check in progress, which concurrent callers with the same credentials await.
type InFlight = Arc<tokio::sync::OnceCell<bool>>;

/// A caller's part in a check in progress: its entry in `in_flight` is removed when the caller is
/// done or dropped (unless a newer check took the entry's place).
struct LeavingFlight<'a> {
    checker: &'a PasswordChecker,
    id: [u8; 32],
    cell: InFlight,
}

impl Drop for LeavingFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = self
            .checker
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if in_flight
            .get(&self.id)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell))
        {
            in_flight.remove(&self.id);
        }
    }
}

impl PasswordChecker {
    /// A checker with these settings (a `concurrency` of 0 is taken as 1).
    pub fn new(settings: PasswordSettings) -> Self {
        let mut cache_key = [0u8; 32];
        // Without randomness the cache stays off (a fixed key would make entries guessable).
        let cache_ok = getrandom::fill(&mut cache_key).is_ok();
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let settings = PasswordSettings {
            concurrency: if settings.concurrency == 0 {
                cores
            } else {
                settings.concurrency
            },
            cache_for: if cache_ok {
                settings.cache_for
            } else {
                Duration::ZERO
            },
            ..settings
        };
        Self {
            permits: Arc::new(Semaphore::new(settings.concurrency)),
            settings,
            cache_key,
            cache: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            hashes: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            peak_running: AtomicUsize::new(0),
        }
    }

    /// Checks at once (the semaphore's size: [`PasswordSettings::concurrency`], 0 = cores).
    pub fn concurrency(&self) -> usize {
        self.settings.concurrency
    }

    /// Argon2 computations started since the checker was made.
    pub fn hashes(&self) -> u64 {
        self.hashes.load(Ordering::Relaxed)
    }

    /// The most argon2 computations that ever ran at once.
    pub fn peak_concurrent_hashes(&self) -> usize {
        self.peak_running.load(Ordering::Relaxed)
    }

    /// Forgets every remembered login: the next login of each device is checked against its
    /// (possibly new) hash. Called when the device table changes.
    pub fn forget_all(&self) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn user_id(&self, user: &str) -> [u8; 32] {
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.cache_key) else {
            return [0; 32];
        };
        mac.update(b"user\0");
        mac.update(user.as_bytes());
        mac.finalize().into_bytes().into()
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

    fn cached(&self, user: &[u8; 32], id: &[u8; 32]) -> bool {
        if self.settings.cache_for.is_zero() {
            return false;
        }
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(user).is_some_and(|(known, until)| {
            *until > Instant::now() && bool::from(known.as_slice().ct_eq(id.as_slice()))
        })
    }

    fn remember(&self, user: [u8; 32], id: [u8; 32]) {
        if self.settings.cache_for.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.settings.cache_entries {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= self.settings.cache_entries {
                cache.clear();
            }
        }
        cache.insert(user, (id, now + self.settings.cache_for));
    }

    /// Whether `password` matches the PHC string `phc` stored for `user`. Waits for a free slot
    /// when [`PasswordSettings::concurrency`] checks are running.
    pub async fn verify(self: &Arc<Self>, user: &str, password: Password, phc: &str) -> bool {
        let id = self.cache_id(user, phc, &password);
        let user_id = self.user_id(user);
        if self.cached(&user_id, &id) {
            return true;
        }
        // Single flight: one check per credential at a time; the others wait for its answer.
        let cell = Arc::clone(
            self.in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(id)
                .or_default(),
        );
        // The entry goes when this caller is done, or dropped (its session closed).
        let _leaving = LeavingFlight {
            checker: self,
            id,
            cell: Arc::clone(&cell),
        };
        *cell
            .get_or_init(|| async move {
                // A check that finished between the cache look-up and here answered it.
                if self.cached(&user_id, &id) {
                    return true;
                }
                let ok = self.check(password, phc).await;
                if ok {
                    self.remember(user_id, id);
                }
                ok
            })
            .await
    }

    /// One argon2 check, within the concurrency bound. The slot is held by the computation, not
    /// by this future: a caller that goes away (its session closed) does not free it while the
    /// hash still runs.
    async fn check(self: &Arc<Self>, password: Password, phc: &str) -> bool {
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            return false;
        };
        let this = Arc::clone(self);
        let phc = phc.to_owned();
        self.hashes.fetch_add(1, Ordering::Relaxed);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_running.fetch_max(now, Ordering::SeqCst);
        let checked = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut block = Vec::new();
            // Dropped (unmapped) when the check ends; see the module documentation.
            let checked = verify_in(
                &mut block,
                password.expose().as_bytes(),
                &phc,
                this.settings,
            );
            this.running.fetch_sub(1, Ordering::SeqCst);
            checked
        })
        .await;
        match checked {
            Ok(Ok(true)) => true,
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

/// Blocks (1 KiB each) of address space reserved for one check: above glibc's
/// `DEFAULT_MMAP_THRESHOLD_MAX` (32 MiB on 64-bit systems), so the allocation is always mapped
/// and unmapped on its own and never moves the dynamic mmap threshold.
pub const MMAP_BLOCKS: usize = 33 * 1024;

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
        // Capacity beyond what is used is address space only: never touched, never resident.
        memory.reserve_exact(blocks.max(MMAP_BLOCKS) - memory.len());
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
    async fn verifies_and_caches_only_successes() {
        let checker = Arc::new(PasswordChecker::default());
        let hash = phc("right");
        assert!(checker.verify("u", Password::new("right"), &hash).await);
        assert!(!checker.verify("u", Password::new("wrong"), &hash).await);
        assert!(!checker.verify("v", Password::new("wrong"), &hash).await);
        assert_eq!(checker.cache.lock().map(|c| c.len()).unwrap_or(0), 1);
        // The cache hit needs the same user, hash and password.
        assert!(checker.verify("u", Password::new("right"), &hash).await);
        assert!(
            !checker
                .verify("u", Password::new("right"), &phc("other"))
                .await
        );
    }

    /// A cheap hash (1 MiB, one pass) so the concurrency tests run many checks quickly.
    fn cheap_phc(password: &str) -> String {
        let params = Params::new(1024, 1, 1, None).unwrap_or_default();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .unwrap_or_default()
    }

    fn uncached(concurrency: usize) -> Arc<PasswordChecker> {
        Arc::new(PasswordChecker::new(PasswordSettings {
            concurrency,
            cache_for: Duration::ZERO,
            ..PasswordSettings::default()
        }))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_hashing_is_bounded_by_the_semaphore() {
        let checker = uncached(2);
        let mut checks = tokio::task::JoinSet::new();
        for i in 0..12 {
            let checker = Arc::clone(&checker);
            // Distinct credentials: no single flight, every check hashes.
            let hash = cheap_phc(&format!("pw{i}"));
            checks.spawn(async move {
                checker
                    .verify(&format!("u{i}"), Password::new(format!("pw{i}")), &hash)
                    .await
            });
        }
        while let Some(ok) = checks.join_next().await {
            assert!(matches!(ok, Ok(true)));
        }
        assert_eq!(checker.hashes(), 12);
        assert!(
            checker.peak_concurrent_hashes() <= 2,
            "{}",
            checker.peak_concurrent_hashes()
        );
    }

    /// Callers that go away mid-check (their session closed for a new connection) free neither
    /// the hashing slot nor leave their single-flight entry behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn callers_dropped_mid_check_keep_the_bound_and_leave_nothing_behind() {
        let checker = uncached(2);
        // The default cost (19 MiB, two passes): long enough to drop callers while it runs.
        let hashes: Vec<String> = (0..8).map(|i| phc(&format!("pw{i}"))).collect();
        let mut dropped = Vec::new();
        for (i, hash) in hashes.iter().enumerate() {
            let (checker, hash) = (Arc::clone(&checker), hash.clone());
            dropped.push(tokio::spawn(async move {
                checker
                    .verify(&format!("u{i}"), Password::new(format!("pw{i}")), &hash)
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        for task in &dropped {
            task.abort();
        }
        // More callers right away: the aborted callers' hashes still hold their slots.
        let mut checks = tokio::task::JoinSet::new();
        for i in 0..4 {
            let checker = Arc::clone(&checker);
            let hash = cheap_phc(&format!("again{i}"));
            checks.spawn(async move {
                checker
                    .verify(&format!("w{i}"), Password::new(format!("again{i}")), &hash)
                    .await
            });
        }
        while let Some(ok) = checks.join_next().await {
            assert!(matches!(ok, Ok(true)));
        }
        assert!(
            checker.peak_concurrent_hashes() <= 2,
            "{} hashes ran at once",
            checker.peak_concurrent_hashes()
        );
        let left = checker
            .in_flight
            .lock()
            .map(|f| f.len())
            .unwrap_or(usize::MAX);
        assert_eq!(left, 0, "single-flight entries left behind");
    }

    #[test]
    fn the_default_concurrency_is_one_check_per_core() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(PasswordChecker::default().concurrency(), cores);
        assert_eq!(uncached(3).concurrency(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn simultaneous_logins_with_the_same_credentials_hash_once() {
        let checker = Arc::new(PasswordChecker::default());
        let hash = cheap_phc("right");
        let mut logins = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (checker, hash) = (Arc::clone(&checker), hash.clone());
            logins.spawn(async move {
                checker
                    .verify("printer", Password::new("right"), &hash)
                    .await
            });
        }
        while let Some(ok) = logins.join_next().await {
            assert!(matches!(ok, Ok(true)));
        }
        assert_eq!(checker.hashes(), 1);
        // A wrong password is still checked (and not cached).
        assert!(
            !checker
                .verify("printer", Password::new("wrong"), &hash)
                .await
        );
        assert!(
            !checker
                .verify("printer", Password::new("wrong"), &hash)
                .await
        );
        assert_eq!(checker.hashes(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_remembered_login_expires_and_is_forgotten_on_a_table_change() {
        let checker = Arc::new(PasswordChecker::new(PasswordSettings {
            cache_for: Duration::from_secs(60),
            ..PasswordSettings::default()
        }));
        let hash = cheap_phc("right");
        let login = || checker.verify("printer", Password::new("right"), &hash);
        assert!(login().await);
        assert!(login().await);
        assert_eq!(checker.hashes(), 1, "the second login is remembered");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(login().await);
        assert_eq!(checker.hashes(), 1, "still within the period");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(login().await);
        assert_eq!(checker.hashes(), 2, "expired: checked again");
        checker.forget_all();
        assert!(login().await);
        assert_eq!(checker.hashes(), 3, "forgotten: checked again");
        // Another password for the same user never matches the remembered one.
        assert!(
            !checker
                .verify("printer", Password::new("other"), &hash)
                .await
        );
        assert_eq!(checker.hashes(), 4);
    }

    #[test]
    fn refuses_a_hash_over_the_memory_limit() {
        let hash = "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY";
        let err = verify_in(&mut Vec::new(), b"x", hash, PasswordSettings::default())
            .expect_err("over the limit");
        assert!(err.contains("memory cost"), "{err}");
    }
}
