//! The fetch scheduler: for every device whose fetch profile has an interval, one
//! [`crate::fetch::fetch_once`] run at that interval (the first soon after start or after a
//! configuration change), never two runs of one device at once, with a token (purpose POP or
//! IMAP) of the mailbox the device's sender mode names — the admin mailbox (FIXED_ADMIN, and the
//! user modes when one is set) or the bulk mailbox (BULK).
//!
//! A token the server refuses is dropped and the run repeated once with a fresh one; a second
//! refusal, a transient failure or a missing token backs off (doubling from `retry_base`, never
//! beyond the interval). Every run is recorded in the [`StatusBook`]: messages fetched (counted
//! and persisted), and the last failure as the device's problem — DEGRADED for transient
//! failures, FAILING for a refused or missing token and for unusable profiles — with the
//! server's SASL challenge JSON. Tombstones of collected messages are pruned periodically
//! ([`crate::maildrop::Maildrop::prune_seen`]). The scheduler follows the device registry, so a
//! `ReloadConfig` that adds, removes or changes a device takes effect within one tick.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokenfleet_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::clock::Clock;
use super::devices::{DeviceEntry, DeviceRegistry};
use super::profiles::{fetch_mailbox, fetch_purpose};
use super::status::StatusBook;
use super::tokens::{TokenCache, TokenKey, TokenUnavailable};
use crate::fetch::{FetchError, FetchReport, FetchSettings};
use crate::maildrop::Maildrop;
use crate::metrics::{AgentMetrics, FetchResult};
use crate::upstream::{Credentials, FailureKind};

/// How long tombstones of collected messages are kept (see [`Maildrop::prune_seen`]).
pub const KEEP_TOMBSTONES: Duration = Duration::from_secs(7 * 24 * 3600);

/// One fetch run for one device, and the periodic tombstone pruning: [`MaildropFetcher`] in
/// production, a fake in tests.
#[async_trait::async_trait]
pub trait Fetcher: Send + Sync + 'static {
    /// Fetches `device`'s upstream mailbox once (see [`crate::fetch::fetch_once`]).
    async fn fetch(
        &self,
        settings: &FetchSettings,
        credentials: &Credentials,
        device: &str,
    ) -> Result<FetchReport, FetchError>;

    /// Forgets `device`'s collected messages whose tombstones are older than `cutoff`; returns
    /// how many (best effort: failures are logged).
    async fn prune_seen(&self, device: &str, cutoff: SystemTime) -> usize;
}

/// The production [`Fetcher`]: POP3/IMAP into the agent's maildrop.
#[derive(Debug, Clone)]
pub struct MaildropFetcher {
    maildrop: Maildrop,
}

impl MaildropFetcher {
    /// A fetcher storing into `maildrop` (the one the local POP3 server serves).
    pub fn new(maildrop: Maildrop) -> Self {
        Self { maildrop }
    }
}

#[async_trait::async_trait]
impl Fetcher for MaildropFetcher {
    async fn fetch(
        &self,
        settings: &FetchSettings,
        credentials: &Credentials,
        device: &str,
    ) -> Result<FetchReport, FetchError> {
        crate::fetch::fetch_once(settings, credentials, &self.maildrop, device).await
    }

    async fn prune_seen(&self, device: &str, cutoff: SystemTime) -> usize {
        let maildrop = self.maildrop.clone();
        let name = device.to_owned();
        match tokio::task::spawn_blocking(move || maildrop.prune_seen(&name, cutoff)).await {
            Ok(Ok(n)) => n,
            Ok(Err(error)) => {
                tracing::warn!(device, %error, "pruning the maildrop's tombstones failed");
                0
            }
            Err(error) => {
                tracing::warn!(device, %error, "the maildrop pruning task failed");
                0
            }
        }
    }
}

/// Timing of the [`FetchScheduler`].
#[derive(Debug, Clone)]
pub struct FetchSchedulerSettings {
    /// First backoff after a failed run (doubled per failure, capped at the profile's
    /// interval).
    pub retry_base: Duration,
    /// Delay of a device's first run after start or after its profile changed.
    pub first_run: Duration,
    /// How often the registry is looked at for new, changed or removed devices.
    pub tick: Duration,
    /// How often tombstones are pruned.
    pub prune_every: Duration,
    /// Age of the tombstones that are pruned.
    pub keep_tombstones: Duration,
    /// Fetch runs at once across all devices (the others wait for the next free slot).
    pub max_concurrent: usize,
}

impl Default for FetchSchedulerSettings {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(30),
            first_run: Duration::from_secs(1),
            tick: Duration::from_millis(500),
            prune_every: Duration::from_secs(3600),
            keep_tombstones: KEEP_TOMBSTONES,
            max_concurrent: 8,
        }
    }
}

/// When the next run of a device is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// At the profile's interval (the run succeeded, or retrying sooner cannot help).
    Interval,
    /// After a backoff.
    Backoff,
}

/// What a job was built from: the fetch profile, the sender mode and its mailboxes.
type Fingerprint = (
    Option<pb::FetchProfile>,
    i32,
    Option<pb::MailboxRef>,
    Option<pb::MailboxRef>,
);

#[derive(Debug)]
struct Job {
    /// What the job was built from; a change restarts it.
    fingerprint: Fingerprint,
    interval: Duration,
    next: Instant,
    failures: u32,
    generation: u64,
}

fn fingerprint(spec: &pb::AgentDevice) -> Fingerprint {
    (
        spec.fetch.clone(),
        spec.sender_mode,
        spec.admin_mailbox.clone(),
        spec.bulk_mailbox.clone(),
    )
}

/// The fetch scheduler (see the module documentation).
pub struct FetchScheduler {
    registry: Arc<DeviceRegistry>,
    tokens: Arc<TokenCache>,
    book: Arc<StatusBook>,
    clock: Arc<dyn Clock>,
    fetcher: Arc<dyn Fetcher>,
    settings: FetchSchedulerSettings,
    metrics: AgentMetrics,
}

impl std::fmt::Debug for FetchScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchScheduler")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl FetchScheduler {
    /// A scheduler for the devices of `registry`.
    pub fn new(
        registry: Arc<DeviceRegistry>,
        tokens: Arc<TokenCache>,
        book: Arc<StatusBook>,
        clock: Arc<dyn Clock>,
        fetcher: Arc<dyn Fetcher>,
        settings: FetchSchedulerSettings,
    ) -> Self {
        Self {
            registry,
            tokens,
            book,
            clock,
            fetcher,
            settings,
            metrics: AgentMetrics::default(),
        }
    }

    /// Counts the runs by result (and the messages fetched) into `metrics`.
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The backoff after `failures` failed runs (1 = the first), capped at `interval`.
    pub fn backoff(&self, failures: u32, interval: Duration) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
        self.settings
            .retry_base
            .saturating_mul(factor)
            .min(interval)
    }

    /// Runs until `stop` turns true. A fetch still running then is abandoned: the maildrop is
    /// written before anything is deleted upstream, so an interrupted run loses nothing.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut jobs: BTreeMap<String, Job> = BTreeMap::new();
        let mut running: BTreeMap<String, tokio::task::Id> = BTreeMap::new();
        let mut tasks: JoinSet<(String, u64, Next)> = JoinSet::new();
        let mut generation: u64 = 0;
        let mut next_prune = Instant::now() + self.settings.first_run;
        loop {
            if *stop.borrow() {
                tasks.abort_all();
                return;
            }
            let now = Instant::now();
            self.sync(&mut jobs, &mut generation, now);
            for (name, job) in &jobs {
                if running.len() >= self.settings.max_concurrent.max(1) {
                    break;
                }
                if job.next <= now && !running.contains_key(name) {
                    let Some(device) = self.registry.device(name) else {
                        continue;
                    };
                    let this = Arc::clone(&self);
                    let generation = job.generation;
                    let task_name = name.clone();
                    let handle = tasks.spawn(async move {
                        let next = this.fetch_device(&device).await;
                        (task_name, generation, next)
                    });
                    running.insert(name.clone(), handle.id());
                }
            }
            if next_prune <= now {
                next_prune = now + self.settings.prune_every;
                let cutoff = self
                    .clock
                    .now()
                    .checked_sub(self.settings.keep_tombstones)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                for name in jobs.keys() {
                    let n = self.fetcher.prune_seen(name, cutoff).await;
                    if n > 0 {
                        tracing::info!(device = %name, forgotten = n, "pruned old maildrop tombstones");
                    }
                }
            }
            // At the concurrency limit only a finished run (or the tick) frees a slot.
            let full = running.len() >= self.settings.max_concurrent.max(1);
            let wake = jobs
                .iter()
                .filter(|(name, _)| !full && !running.contains_key(*name))
                .map(|(_, job)| job.next)
                .chain([now + self.settings.tick, next_prune])
                .min()
                .unwrap_or(now + self.settings.tick);
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        // The sender is gone: nobody can stop us any more, so stop now.
                        tasks.abort_all();
                        return;
                    }
                }
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (name, job_generation, next) = match done {
                        Ok((_, outcome)) => outcome,
                        Err(error) => {
                            // A run that panicked: the device is tried again after a backoff.
                            let id = error.id();
                            let Some(name) = running
                                .iter()
                                .find(|(_, task)| **task == id)
                                .map(|(name, _)| name.clone())
                            else {
                                continue;
                            };
                            tracing::error!(device = %name, %error, "a fetch run failed unexpectedly");
                            (name, u64::MAX, Next::Backoff)
                        }
                    };
                    running.remove(&name);
                    if let Some(job) = jobs.get_mut(&name)
                        && (job.generation == job_generation || job_generation == u64::MAX)
                    {
                        let delay = match next {
                            Next::Interval => {
                                job.failures = 0;
                                job.interval
                            }
                            Next::Backoff => {
                                job.failures = job.failures.saturating_add(1);
                                self.backoff(job.failures, job.interval)
                            }
                        };
                        job.next = Instant::now() + delay;
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Follows the registry: new or changed devices get a fresh job (due after `first_run`),
    /// removed ones (or fetching switched off) lose theirs and their fetch problem.
    fn sync(&self, jobs: &mut BTreeMap<String, Job>, generation: &mut u64, now: Instant) {
        let set = self.registry.current();
        let mut wanted = BTreeSet::new();
        for (name, device) in &set.devices {
            let Some(profile) = device.spec.fetch.as_ref() else {
                continue;
            };
            if profile.interval_seconds == 0 {
                continue;
            }
            wanted.insert(name.clone());
            let print = fingerprint(&device.spec);
            if jobs.get(name).is_some_and(|j| j.fingerprint == print) {
                continue;
            }
            *generation += 1;
            tracing::info!(device = %name, interval_s = profile.interval_seconds, "fetch job scheduled");
            jobs.insert(
                name.clone(),
                Job {
                    fingerprint: print,
                    interval: Duration::from_secs(u64::from(profile.interval_seconds)),
                    next: now + self.settings.first_run,
                    failures: 0,
                    generation: *generation,
                },
            );
        }
        let gone: Vec<String> = jobs
            .keys()
            .filter(|n| !wanted.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            tracing::info!(device = %name, "fetch job stopped (device removed or fetching off)");
            jobs.remove(&name);
            self.book.clear_fetch(&name);
        }
    }

    /// One run for `device` (with the one refetch after a refused token); records the outcome
    /// and says when the next is due.
    pub async fn fetch_device(&self, device: &DeviceEntry) -> Next {
        let name = device.spec.name.as_str();
        let profile = device.spec.fetch.clone().unwrap_or_default();
        let settings = match super::profiles::fetch_settings(&profile) {
            Ok(s) => s,
            Err(e) => {
                self.fail(
                    name,
                    0,
                    FetchResult::Misconfigured,
                    pb::DeviceHealth::Failing,
                    format!("fetch profile unusable: {e}"),
                );
                return Next::Interval;
            }
        };
        let mailbox = match fetch_mailbox(&device.spec) {
            Ok(m) => m,
            Err(problem) => {
                self.fail(
                    name,
                    0,
                    FetchResult::Misconfigured,
                    pb::DeviceHealth::Failing,
                    problem,
                );
                return Next::Interval;
            }
        };
        let key = TokenKey {
            device: name.to_owned(),
            mailbox: mailbox.clone(),
            user_address: String::new(),
            purpose: fetch_purpose(&profile),
        };
        let credentials = match self.tokens.credentials(&key).await {
            Ok(c) => c,
            Err(unavailable) => return self.no_token(name, &mailbox, 0, unavailable),
        };
        let mut fetched = 0;
        let mut result = self.fetcher.fetch(&settings, &credentials, name).await;
        if let Err(e) = &result
            && e.kind == FailureKind::AuthRejected
        {
            fetched += e.partial.fetched;
            tracing::info!(device = name, mailbox, reply = %e.final_reply, "the mail server refused the fetch token; fetching a fresh one and retrying once");
            self.tokens.reject(&key, &credentials).await;
            let fresh = match self.tokens.credentials(&key).await {
                Ok(fresh) => fresh,
                Err(unavailable) => return self.no_token(name, &mailbox, fetched, unavailable),
            };
            result = self.fetcher.fetch(&settings, &fresh, name).await;
            if matches!(&result, Err(e) if e.kind == FailureKind::AuthRejected) {
                // Refused twice: the next run (after the backoff) starts with yet another one.
                self.tokens.reject(&key, &fresh).await;
            }
        }
        match result {
            Ok(report) => {
                let fetched = (fetched + report.fetched) as u64;
                self.metrics.fetch_run(FetchResult::Ok, fetched);
                self.book.record_fetch(name, fetched, None);
                Next::Interval
            }
            Err(e) => {
                fetched += e.partial.fetched;
                let endpoint = settings.endpoint();
                let (result, health, next, mut problem) = match e.kind {
                    FailureKind::AuthRejected => (
                        FetchResult::AuthRejected,
                        pb::DeviceHealth::Failing,
                        Next::Backoff,
                        format!(
                            "{endpoint} rejected the token of mailbox {mailbox} for fetching: {}",
                            e.final_reply
                        ),
                    ),
                    FailureKind::Transient => (
                        FetchResult::Transient,
                        pb::DeviceHealth::Degraded,
                        Next::Backoff,
                        format!(
                            "fetching mailbox {mailbox} from {endpoint} failed, retrying: {}",
                            e.final_reply
                        ),
                    ),
                    FailureKind::Permanent => (
                        FetchResult::Permanent,
                        pb::DeviceHealth::Failing,
                        Next::Interval,
                        format!(
                            "fetching mailbox {mailbox} from {endpoint} failed: {}",
                            e.final_reply
                        ),
                    ),
                };
                if let Some(json) = &e.auth_challenge_json {
                    problem.push_str(&format!(" (challenge: {json})"));
                }
                self.fail(name, fetched, result, health, problem);
                next
            }
        }
    }

    fn no_token(
        &self,
        device: &str,
        mailbox: &str,
        fetched: usize,
        unavailable: TokenUnavailable,
    ) -> Next {
        let reason = match unavailable {
            TokenUnavailable::Wait { reason, .. } | TokenUnavailable::Denied(reason) => reason,
        };
        self.fail(
            device,
            fetched,
            FetchResult::NoToken,
            pb::DeviceHealth::Failing,
            format!("no token to fetch mailbox {mailbox}: {reason}"),
        );
        Next::Backoff
    }

    fn fail(
        &self,
        device: &str,
        fetched: usize,
        result: FetchResult,
        health: pb::DeviceHealth,
        problem: String,
    ) {
        tracing::warn!(device, %problem, "fetch run failed");
        self.metrics.fetch_run(result, fetched as u64);
        self.book
            .record_fetch(device, fetched as u64, Some((health, problem)));
    }
}
