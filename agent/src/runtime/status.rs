//! What the agent knows about each device's health — the last delivery, counters (persisted in
//! the state directory so they survive restarts), and the health verdict built from them, the
//! token cache and the queue — and the [`StatusReporter`] that streams it to the broker.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokenfleet_proto::v1 as pb;
use tokio::sync::Notify;

use super::tokens::{TokenCache, timestamp};

/// Queue age from which a device is DEGRADED.
pub const OLD_QUEUE: Duration = Duration::from_secs(5 * 60);

/// File (in the state directory) holding the counters.
pub const COUNTERS_FILE: &str = "counters.json";

/// How many recently delivered spool ids the counters file remembers (to count a delivery whose
/// process died between removing the entry and counting it exactly once).
pub const RECENT_DELIVERED: usize = 256;

/// The content of [`COUNTERS_FILE`].
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredCounters {
    devices: BTreeMap<String, Counters>,
    #[serde(default)]
    recent_delivered: VecDeque<String>,
}

/// Delivery counters of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Messages the upstream accepted.
    pub delivered: u64,
    /// Failed attempts (each retry counts).
    pub failed: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages possibly delivered twice.
    pub duplicates: u64,
    /// Messages fetched from the upstream mailbox into the local maildrop.
    #[serde(default)]
    pub fetched: u64,
}

/// What happened to one delivery attempt, as the worker records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream accepted the message.
    Delivered,
    /// It will be retried after a transient failure.
    Retrying,
    /// It will be retried, but the upstream rejected the token (even a fresh one).
    RetryingAuthRejected,
    /// It waits for a token (broker unreachable, consent pending, grant dead).
    WaitingForToken,
    /// It was moved to the dead-letter directory.
    DeadLettered,
    /// It waits because the device's configuration does not allow sending (an unusable send
    /// profile, no mailbox to send as).
    Misconfigured,
}

impl Outcome {
    /// The `outcome` text of a [`pb::DeliveryResult`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retrying | Self::RetryingAuthRejected | Self::Misconfigured => "retrying",
            Self::WaitingForToken => "waiting-for-token",
            Self::DeadLettered => "dead-lettered",
        }
    }

    fn health(self) -> pb::DeviceHealth {
        match self {
            Self::Delivered => pb::DeviceHealth::Ok,
            Self::Retrying | Self::WaitingForToken => pb::DeviceHealth::Degraded,
            Self::RetryingAuthRejected | Self::DeadLettered | Self::Misconfigured => {
                pb::DeviceHealth::Failing
            }
        }
    }
}

/// One recorded delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Spool id.
    pub message_id: String,
    /// Mailbox (name or user address) used.
    pub mailbox: String,
    /// What happens next.
    pub outcome: Outcome,
    /// The upstream's final reply, or why nothing was sent.
    pub final_reply: String,
    /// Decoded SASL challenge JSON, if any.
    pub auth_challenge_json: String,
}

#[derive(Debug, Default)]
struct DeviceState {
    last: Option<(SystemTime, Attempt)>,
    /// Health from the last attempt, with its problem text.
    delivery_health: Option<(pb::DeviceHealth, String)>,
    counters: Counters,
    /// The health last computed, to notice changes.
    last_health: Option<pb::DeviceHealth>,
    connection_test: Option<pb::ConnectionTestResult>,
    /// Health from the last fetch run, with its problem text (`None`: no fetch job, or the
    /// last run succeeded).
    fetch_health: Option<(pb::DeviceHealth, String)>,
    /// Whether the last fetch run succeeded (mail flows on the fetch side).
    fetch_ok: bool,
    /// Messages waiting in the local maildrop (set at report time).
    maildrop_depth: u32,
    /// Failed periodic connection tests by target, with their problem text.
    periodic_failures: BTreeMap<i32, String>,
}

impl DeviceState {
    /// The DEGRADED verdict of failed periodic tests, unless mail flows on that side.
    fn periodic_health(&self) -> Option<(pb::DeviceHealth, String)> {
        let sending = self
            .last
            .as_ref()
            .is_some_and(|(_, a)| a.outcome == Outcome::Delivered);
        self.periodic_failures
            .iter()
            .find(|(target, _)| {
                if **target == pb::ConnectionTarget::Fetch as i32 {
                    !self.fetch_ok
                } else {
                    !sending
                }
            })
            .map(|(_, problem)| (pb::DeviceHealth::Degraded, problem.clone()))
    }
}

/// Per-device status, shared by the delivery worker (writes) and the reporter (reads).
#[derive(Debug)]
pub struct StatusBook {
    counters_path: PathBuf,
    devices: Mutex<BTreeMap<String, DeviceState>>,
    recent_delivered: Mutex<VecDeque<String>>,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn severity(h: pb::DeviceHealth) -> u8 {
    match h {
        pb::DeviceHealth::Failing => 3,
        pb::DeviceHealth::Degraded => 2,
        pb::DeviceHealth::Ok => 1,
        pb::DeviceHealth::Unknown | pb::DeviceHealth::Unspecified => 0,
    }
}

/// Health and problem from what the token cache says about a device's mailboxes.
pub fn token_health(views: &[pb::MailboxTokenView]) -> Option<(pb::DeviceHealth, String)> {
    let mut worst: Option<(pb::DeviceHealth, String)> = None;
    for view in views {
        let status = pb::TokenStatus::try_from(view.status).unwrap_or_default();
        let health = match status {
            pb::TokenStatus::ReauthRequired
            | pb::TokenStatus::Disabled
            | pb::TokenStatus::NotRetrieved => pb::DeviceHealth::Failing,
            pb::TokenStatus::ConsentPending | pb::TokenStatus::RefreshFailing => {
                pb::DeviceHealth::Degraded
            }
            // Unspecified with an error: the broker refused the device this token.
            pb::TokenStatus::Unspecified if !view.error.is_empty() => pb::DeviceHealth::Failing,
            _ => continue,
        };
        let problem = format!("mailbox {}: {}", view.mailbox, view.error);
        if worst
            .as_ref()
            .is_none_or(|(h, _)| severity(health) > severity(*h))
        {
            worst = Some((health, problem));
        }
    }
    worst
}

fn worsen(verdict: &mut (pb::DeviceHealth, String), candidate: Option<(pb::DeviceHealth, String)>) {
    if let Some((health, problem)) = candidate
        && severity(health) > severity(verdict.0)
    {
        *verdict = (health, problem);
    }
}

impl StatusBook {
    /// A book whose counters live in `state_dir` (loaded now if present).
    pub fn open(state_dir: &Path) -> Self {
        let counters_path = state_dir.join(COUNTERS_FILE);
        let stored: StoredCounters = std::fs::read(&counters_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let devices = stored
            .devices
            .into_iter()
            .map(|(device, counters)| {
                (
                    device,
                    DeviceState {
                        counters,
                        ..DeviceState::default()
                    },
                )
            })
            .collect();
        Self {
            counters_path,
            devices: Mutex::new(devices),
            recent_delivered: Mutex::new(stored.recent_delivered),
            changed: Notify::new(),
        }
    }

    /// Completes when some device's health may have changed.
    pub async fn health_changed(&self) {
        self.changed.notified().await;
    }

    fn persist(&self, devices: &BTreeMap<String, DeviceState>) {
        let stored = StoredCounters {
            devices: devices
                .iter()
                .map(|(d, s)| (d.clone(), s.counters))
                .collect(),
            recent_delivered: lock(&self.recent_delivered).clone(),
        };
        let Ok(json) = serde_json::to_vec_pretty(&stored) else {
            return;
        };
        // Counters are statistics: rename for atomicity, no fsync (a process kill keeps the
        // page cache; a power loss may lose the last few increments).
        let tmp = self.counters_path.with_extension("json.tmp");
        let written = {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(&json))
                .and_then(|()| std::fs::rename(&tmp, &self.counters_path))
        };
        if let Err(error) = written {
            tracing::warn!(path = %self.counters_path.display(), %error, "saving the delivery counters failed");
        }
    }

    /// Records a delivery attempt; counts it; signals a health change.
    pub fn record(&self, device: &str, now: SystemTime, attempt: Attempt) {
        let mut devices = lock(&self.devices);
        let state = devices.entry(device.to_owned()).or_default();
        match attempt.outcome {
            Outcome::Delivered => {
                state.counters.delivered += 1;
                let mut recent = lock(&self.recent_delivered);
                recent.push_back(attempt.message_id.clone());
                while recent.len() > RECENT_DELIVERED {
                    recent.pop_front();
                }
            }
            Outcome::Retrying | Outcome::RetryingAuthRejected => state.counters.failed += 1,
            Outcome::DeadLettered => {
                state.counters.failed += 1;
                state.counters.dead_lettered += 1;
            }
            Outcome::WaitingForToken | Outcome::Misconfigured => {}
        }
        let health = attempt.outcome.health();
        let problem = match attempt.outcome {
            Outcome::Delivered => String::new(),
            Outcome::DeadLettered => format!(
                "message {} dead-lettered: {}",
                attempt.message_id, attempt.final_reply
            ),
            Outcome::RetryingAuthRejected => format!(
                "upstream rejected the token of {}: {}",
                attempt.mailbox, attempt.final_reply
            ),
            Outcome::Retrying => format!("delivery retrying: {}", attempt.final_reply),
            Outcome::Misconfigured => attempt.final_reply.clone(),
            Outcome::WaitingForToken => {
                format!(
                    "waiting for a token of {}: {}",
                    attempt.mailbox, attempt.final_reply
                )
            }
        };
        state.delivery_health = Some((health, problem));
        let counted = !matches!(
            attempt.outcome,
            Outcome::WaitingForToken | Outcome::Misconfigured
        );
        state.last = Some((now, attempt));
        if counted {
            self.persist(&devices);
        }
        drop(devices);
        self.changed.notify_one();
    }

    /// Start-up: a message of `device` that was removed from the spool after the upstream
    /// accepted it, by a process that died before counting it, is counted now (once).
    pub fn count_unrecorded_delivery(&self, device: &str, message_id: &str) {
        if lock(&self.recent_delivered)
            .iter()
            .any(|id| id == message_id)
        {
            return;
        }
        let mut devices = lock(&self.devices);
        devices
            .entry(device.to_owned())
            .or_default()
            .counters
            .delivered += 1;
        {
            let mut recent = lock(&self.recent_delivered);
            recent.push_back(message_id.to_owned());
            while recent.len() > RECENT_DELIVERED {
                recent.pop_front();
            }
        }
        self.persist(&devices);
    }

    /// Counts `n` possible duplicates of `device`.
    pub fn count_duplicates(&self, device: &str, n: u64) {
        let mut devices = lock(&self.devices);
        devices
            .entry(device.to_owned())
            .or_default()
            .counters
            .duplicates += n;
        self.persist(&devices);
    }

    /// Stores the result of a connection test of `device`.
    pub fn record_connection_test(&self, device: &str, result: pb::ConnectionTestResult) {
        lock(&self.devices)
            .entry(device.to_owned())
            .or_default()
            .connection_test = Some(result);
    }

    /// Records a fetch run of `device`: `fetched` messages stored (counted and persisted), and
    /// the failure as (health, problem), `None` when the run succeeded.
    pub fn record_fetch(
        &self,
        device: &str,
        fetched: u64,
        failure: Option<(pb::DeviceHealth, String)>,
    ) {
        let mut devices = lock(&self.devices);
        let state = devices.entry(device.to_owned()).or_default();
        state.counters.fetched += fetched;
        state.fetch_ok = failure.is_none();
        state.fetch_health = failure;
        if fetched > 0 {
            self.persist(&devices);
        }
        drop(devices);
        self.changed.notify_one();
    }

    /// Forgets the fetch state of `device` (its fetch job was stopped); the counter stays.
    pub fn clear_fetch(&self, device: &str) {
        if let Some(state) = lock(&self.devices).get_mut(device) {
            state.fetch_health = None;
            state.fetch_ok = false;
        }
        self.changed.notify_one();
    }

    /// Sets the number of messages waiting in `device`'s local maildrop.
    pub fn set_maildrop_depth(&self, device: &str, depth: usize) {
        lock(&self.devices)
            .entry(device.to_owned())
            .or_default()
            .maildrop_depth = u32::try_from(depth).unwrap_or(u32::MAX);
    }

    /// Stores the result of a periodic connection test: shown as the last connection test, and
    /// a failure makes the device DEGRADED (with the verdict and summary) unless mail flows on
    /// that side (the last delivery, or the last fetch run, succeeded). A later passing test of
    /// the same target clears it.
    pub fn record_periodic_test(&self, device: &str, result: pb::ConnectionTestResult) {
        let mut devices = lock(&self.devices);
        let state = devices.entry(device.to_owned()).or_default();
        let verdict = pb::ConnectionVerdict::try_from(result.verdict).unwrap_or_default();
        let target = pb::ConnectionTarget::try_from(result.target).unwrap_or_default();
        if verdict == pb::ConnectionVerdict::Ok {
            state.periodic_failures.remove(&result.target);
        } else {
            let side = match target {
                pb::ConnectionTarget::Fetch => "fetch",
                _ => "send",
            };
            state.periodic_failures.insert(
                result.target,
                format!(
                    "periodic connection test of the {side} profile ({}): {}: {}",
                    result.endpoint,
                    verdict
                        .as_str_name()
                        .trim_start_matches("CONNECTION_VERDICT_"),
                    result.summary
                ),
            );
        }
        state.connection_test = Some(result);
        drop(devices);
        self.changed.notify_one();
    }

    /// Forgets the periodic test failures of `device` (it left the configuration).
    pub fn clear_periodic_tests(&self, device: &str) {
        if let Some(state) = lock(&self.devices).get_mut(device) {
            state.periodic_failures.clear();
        }
    }

    /// The counters of `device`.
    pub fn counters(&self, device: &str) -> Counters {
        lock(&self.devices)
            .get(device)
            .map(|s| s.counters)
            .unwrap_or_default()
    }

    /// The last attempt recorded for `device`.
    pub fn last_attempt(&self, device: &str) -> Option<Attempt> {
        lock(&self.devices)
            .get(device)
            .and_then(|s| s.last.as_ref().map(|(_, a)| a.clone()))
    }

    /// The status of `device` now. `queue` is (depth, age of the oldest entry).
    pub fn device_status(
        &self,
        device: &str,
        tokens: &TokenCache,
        queue: (usize, Duration),
        extra_problem: Option<String>,
    ) -> pb::DeviceStatus {
        let views = tokens.views(device);
        let mut devices = lock(&self.devices);
        let state = devices.entry(device.to_owned()).or_default();
        let mut verdict: (pb::DeviceHealth, String) = (pb::DeviceHealth::Ok, String::new());
        worsen(
            &mut verdict,
            extra_problem.map(|p| (pb::DeviceHealth::Failing, p)),
        );
        worsen(&mut verdict, state.delivery_health.clone());
        worsen(&mut verdict, token_health(&views));
        worsen(&mut verdict, state.fetch_health.clone());
        worsen(&mut verdict, state.periodic_health());
        state.last_health = Some(verdict.0);
        if queue.0 > 0 && queue.1 >= OLD_QUEUE {
            worsen(
                &mut verdict,
                Some((
                    pb::DeviceHealth::Degraded,
                    format!(
                        "{} message(s) queued, the oldest for {} s",
                        queue.0,
                        queue.1.as_secs()
                    ),
                )),
            );
        }
        pb::DeviceStatus {
            device: device.to_owned(),
            health: verdict.0 as i32,
            problem: verdict.1,
            tokens: views,
            last_delivery: state.last.as_ref().map(|(time, a)| pb::DeliveryResult {
                time: Some(timestamp(*time)),
                ok: a.outcome == Outcome::Delivered,
                final_reply: a.final_reply.clone(),
                auth_challenge_json: a.auth_challenge_json.clone(),
                message_id: a.message_id.clone(),
                outcome: a.outcome.as_str().to_owned(),
                mailbox: a.mailbox.clone(),
            }),
            queue_depth: u32::try_from(queue.0).unwrap_or(u32::MAX),
            oldest_queued_seconds: queue.1.as_secs(),
            delivered_total: state.counters.delivered,
            failed_total: state.counters.failed,
            dead_lettered_total: state.counters.dead_lettered,
            duplicates_total: state.counters.duplicates,
            last_connection_test: state.connection_test.clone(),
            fetched_total: state.counters.fetched,
            maildrop_depth: state.maildrop_depth,
        }
    }

    /// Whether the health of `device` (without the queue) differs from the last one computed.
    pub fn health_differs(&self, device: &str, tokens: &TokenCache) -> bool {
        let views = tokens.views(device);
        let devices = lock(&self.devices);
        let Some(state) = devices.get(device) else {
            return false;
        };
        let mut health = pb::DeviceHealth::Ok;
        for candidate in [
            state.delivery_health.clone(),
            token_health(&views),
            state.fetch_health.clone(),
            state.periodic_health(),
        ]
        .into_iter()
        .flatten()
        {
            if severity(candidate.0) > severity(health) {
                health = candidate.0;
            }
        }
        state.last_health != Some(health)
    }
}

/// Shared handle to a [`StatusBook`].
pub type SharedStatusBook = Arc<StatusBook>;
