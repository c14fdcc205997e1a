//! The delivery worker: takes due entries from the spool, N at a time, gets a token for the
//! mailbox the message is sent as, hands the message to the device's [`Delivery`], and settles
//! the entry: complete, retry later (exponential backoff with jitter), or dead-letter.
//!
//! Provider limits: where the upstream has a per-mailbox sending limit
//! ([`Delivery::messages_per_minute`]; Exchange Online's 30 messages a minute), a message that
//! would exceed it is deferred — postponed in memory to when the mailbox has room
//! ([`MailboxRate`]), no attempt counted, nothing dropped — and delivered then.
//!
//! Delivery is at least once: an entry leaves the spool only after the upstream accepted it, so
//! an agent that stops (or crashes) between the upstream's acceptance and the removal sends
//! that message again at its next start. Possible duplicates are counted, never hidden: the
//! sending journal (`sending/journal` next to the spool's own directories, [`SendingJournal`])
//! records each message while it is with the upstream — a line when the send starts, one when
//! it ends, appended to one file. An entry the journal shows as being sent at start-up whose
//! entry is still queued means the agent died mid-send — the upstream may have accepted the
//! message, which is sent again: counted as a possible duplicate. `complete` failing after
//! acceptance counts too. One whose entry is gone means the process died after removing a
//! delivered entry: it is counted as delivered unless the counters already hold its id. Marker
//! files `sending/<id>` (holding the device name) left by an agent from before the journal are
//! read the same way.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokenfleet_proto::v1 as pb;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::clock::Clock;
use super::devices::{DeviceEntry, DeviceRegistry};
use super::mailbox_rate::MailboxRate;
use super::status::{Attempt, Outcome, StatusBook};
use super::tokens::{TokenCache, TokenKey, TokenUnavailable};
use crate::metrics::{AgentMetrics, DeadLetter, Deferral};
use crate::spool::{self, EntryMeta, Spool, SpoolError, SpoolId};
use crate::upstream::{Credentials, Delivery, DeliveryError, FailureKind, OutgoingMessage};

/// Directory (inside the spool directory) of the sending journal.
pub const SENDING_DIR: &str = "sending";

/// The sending journal's file in [`SENDING_DIR`].
pub const SENDING_JOURNAL: &str = "journal";

/// The journal is rewritten with only the sends still running when it grows past this.
const JOURNAL_COMPACT_BYTES: u64 = 64 * 1024;

/// Which messages are with the upstream, on disk, for counting possible duplicates after the
/// agent died (see the module documentation). One file, appended to: `+<id> <device>` when a
/// send starts, `-<id>` when it ended; emptied whenever no send is running and rewritten with
/// the running ones when it grows past 64 KiB. Not fsynced, as the marker files it replaces
/// (one created and removed per message, two inode changes) were not: it survives the agent's
/// process dying, which is what it is for, not necessarily a power loss (after which possible
/// duplicates may go uncounted; none is lost either way).
#[derive(Debug)]
pub struct SendingJournal {
    dir: PathBuf,
    state: Mutex<JournalState>,
}

#[derive(Debug, Default)]
struct JournalState {
    file: Option<std::fs::File>,
    len: u64,
    running: std::collections::HashMap<SpoolId, String>,
}

impl SendingJournal {
    /// The journal in `dir` (created when first written).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            state: Mutex::new(JournalState::default()),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(SENDING_JOURNAL)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JournalState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn open_append(&self) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(&self.dir)?;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(self.path())
    }

    fn append(&self, state: &mut JournalState, line: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        if state.file.is_none() {
            let file = self.open_append()?;
            state.len = file.metadata()?.len();
            state.file = Some(file);
        }
        if let Some(file) = state.file.as_mut() {
            // One write: a line is whole in the file even if the process dies right after.
            file.write_all(line.as_bytes())?;
            state.len += line.len() as u64;
        }
        Ok(())
    }

    /// A send of `id` (from `device`) starts.
    pub fn started(&self, id: &SpoolId, device: &str) -> std::io::Result<()> {
        let device = device.replace(['\r', '\n'], " ");
        let mut state = self.lock();
        let line = format!("+{id} {device}\n");
        state.running.insert(id.clone(), device);
        self.append(&mut state, &line)
    }

    /// The send of `id` ended (delivered and removed, or settled otherwise).
    pub fn ended(&self, id: &SpoolId) -> std::io::Result<()> {
        let mut state = self.lock();
        state.running.remove(id);
        if state.running.is_empty()
            && state.len > 0
            && let Some(file) = state.file.as_ref()
        {
            // Nothing is being sent: nothing to remember.
            file.set_len(0)?;
            state.len = 0;
            return Ok(());
        }
        self.append(&mut state, &format!("-{id}\n"))?;
        if state.len > JOURNAL_COMPACT_BYTES {
            self.compact(&mut state)?;
        }
        Ok(())
    }

    /// Rewrites the journal with the running sends only (a new file renamed over it).
    fn compact(&self, state: &mut JournalState) -> std::io::Result<()> {
        let text: String = state
            .running
            .iter()
            .map(|(id, device)| format!("+{id} {device}\n"))
            .collect();
        let tmp = self.dir.join(format!("{SENDING_JOURNAL}.tmp"));
        std::fs::write(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, self.path())?;
        state.file = None;
        state.len = 0;
        Ok(())
    }

    /// Start-up: the sends that were running when the agent stopped (id, device), from the
    /// journal and from marker files of an agent from before it; then clears both.
    pub fn recover(&self) -> std::io::Result<Vec<(SpoolId, String)>> {
        std::fs::create_dir_all(&self.dir)?;
        let mut running: std::collections::BTreeMap<SpoolId, String> = Default::default();
        match std::fs::read_to_string(self.path()) {
            Ok(text) => {
                for line in text.lines() {
                    if let Some(rest) = line.strip_prefix('+') {
                        let (id, device) = rest.split_once(' ').unwrap_or((rest, ""));
                        if let Ok(id) = SpoolId::parse(id) {
                            running.insert(id, device.to_owned());
                        }
                    } else if let Some(id) = line.strip_prefix('-')
                        && let Ok(id) = SpoolId::parse(id)
                    {
                        running.remove(&id);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            // A marker file of the previous layout.
            if let Ok(id) = SpoolId::parse(name) {
                let device = std::fs::read_to_string(&path).unwrap_or_default();
                running.insert(id, device);
                let _ = std::fs::remove_file(&path);
            }
        }
        let mut state = self.lock();
        state.file = None;
        state.len = 0;
        match std::fs::remove_file(self.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(running.into_iter().collect())
    }
}

/// Longest wait between tries while a message waits for a token.
pub const TOKEN_WAIT_MAX: Duration = Duration::from_secs(60);

/// Retry and concurrency policy of the worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Deliveries at once.
    pub concurrency: usize,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Attempts before dead-lettering (`None` = no limit).
    pub max_attempts: Option<u32>,
    /// Age before dead-lettering.
    pub max_age: Duration,
    /// Send a delivery status notification to the sender of a dead-lettered message.
    pub bounce: bool,
    /// How often the spool is looked at when nothing wakes the worker.
    pub poll_interval: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 16,
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            max_attempts: None,
            max_age: Duration::from_secs(5 * 24 * 3600),
            bounce: false,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// A jitter source in `[0, 1)` (fixed in tests).
pub type Jitter = Arc<dyn Fn() -> f64 + Send + Sync>;

/// The delivery worker.
pub struct DeliveryWorker {
    spool: Arc<Spool>,
    journal: SendingJournal,
    registry: Arc<DeviceRegistry>,
    tokens: Arc<TokenCache>,
    book: Arc<StatusBook>,
    clock: Arc<dyn Clock>,
    settings: WorkerSettings,
    jitter: Jitter,
    wake: Arc<Notify>,
    in_flight: Mutex<HashSet<SpoolId>>,
    /// Entries whose delivery ended since the current spool scan began. A scan lists the spool
    /// (slowly, from disk) while deliveries finish: an entry delivered and removed from
    /// `in_flight` during the scan may still be in its result and must not be started again.
    settled_since_scan: Mutex<HashSet<SpoolId>>,
    metrics: AgentMetrics,
    /// Recent sends per mailbox, for upstreams with a per-mailbox limit.
    rate: Mutex<MailboxRate>,
}

impl std::fmt::Debug for DeliveryWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryWorker")
            .field("journal", &self.journal.dir)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    spool: &Arc<Spool>,
    f: impl FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    let spool = Arc::clone(spool);
    tokio::task::spawn_blocking(move || f(&spool))
        .await
        .unwrap_or_else(|e| {
            Err(SpoolError::Io {
                path: PathBuf::from("spool task"),
                error: std::io::Error::other(e.to_string()),
            })
        })
}

/// What a delivery run decided, for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The entry.
    pub id: SpoolId,
    /// What happened.
    pub outcome: Outcome,
    /// The final reply or reason.
    pub detail: String,
}

impl DeliveryWorker {
    /// A worker over `spool` (whose directory is `spool_dir`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spool: Arc<Spool>,
        spool_dir: &std::path::Path,
        registry: Arc<DeviceRegistry>,
        tokens: Arc<TokenCache>,
        book: Arc<StatusBook>,
        clock: Arc<dyn Clock>,
        settings: WorkerSettings,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            spool,
            journal: SendingJournal::new(spool_dir.join(SENDING_DIR)),
            registry,
            tokens,
            book,
            clock,
            settings,
            jitter: Arc::new(spool::random_jitter),
            wake,
            in_flight: Mutex::new(HashSet::new()),
            settled_since_scan: Mutex::new(HashSet::new()),
            metrics: AgentMetrics::default(),
            rate: Mutex::new(MailboxRate::new()),
        }
    }

    /// Counts deliveries, deferrals and dead letters into `metrics`.
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Replaces the jitter source (tests pass a constant).
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Start-up: counts the entries that were being sent when the agent stopped as possible
    /// duplicates (per device) and clears the sending journal (and any marker files of an
    /// agent from before it). Returns how many were counted.
    pub fn recover_markers(&self) -> std::io::Result<u64> {
        let mut counted = 0;
        for (id, device) in self.journal.recover()? {
            match self.spool.entry(&id) {
                Ok(meta) => {
                    tracing::warn!(id = %id, device = %meta.envelope.device, "the agent stopped while this message was being sent; it is sent again and may arrive twice");
                    self.book.count_duplicates(&meta.envelope.device, 1);
                    counted += 1;
                }
                Err(SpoolError::NotFound(_)) => {
                    // Delivered and removed, but perhaps not counted: the journal holds the
                    // device.
                    if !device.is_empty() {
                        self.book.count_unrecorded_delivery(&device, id.as_str());
                    }
                }
                Err(_) => {}
            }
        }
        Ok(counted)
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<SpoolId>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_settled(&self) -> std::sync::MutexGuard<'_, HashSet<SpoolId>> {
        self.settled_since_scan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Entries due now and not being delivered, at most `wanted` of them (reading only that
    /// many sidecars beyond the ones in flight, however deep the queue is).
    async fn due(&self, wanted: usize) -> Vec<EntryMeta> {
        let now = self.clock.now();
        // Whatever settles from here on may still show up in this scan's result.
        self.lock_settled().clear();
        let limit = wanted.saturating_add(self.lock_in_flight().len());
        match blocking(&self.spool, move |s| s.due_up_to(now, limit)).await {
            Ok(due) => {
                let in_flight = self.lock_in_flight();
                let settled = self.lock_settled();
                due.into_iter()
                    .filter(|m| !in_flight.contains(&m.id) && !settled.contains(&m.id))
                    .collect()
            }
            Err(error) => {
                tracing::error!(%error, "reading the spool failed");
                Vec::new()
            }
        }
    }

    /// Delivers every entry due now (at most `concurrency` at once) and waits for them.
    pub async fn run_once(self: &Arc<Self>) -> Vec<Settled> {
        let mut running = JoinSet::new();
        let mut settled = Vec::new();
        for meta in self.due(usize::MAX).await {
            while running.len() >= self.settings.concurrency {
                if let Some(Ok(s)) = running.join_next().await {
                    settled.push(s);
                }
            }
            self.lock_in_flight().insert(meta.id.clone());
            let worker = Arc::clone(self);
            running.spawn(async move { worker.deliver_entry(meta).await });
        }
        while let Some(done) = running.join_next().await {
            if let Ok(s) = done {
                settled.push(s);
            }
        }
        settled
    }

    /// Delivers until `shutdown` completes; then waits up to `grace` for running deliveries.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>, grace: Duration) {
        let mut running: JoinSet<Settled> = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            if running.len() < self.settings.concurrency {
                let free = self.settings.concurrency - running.len();
                for meta in self.due(free).await {
                    if running.len() >= self.settings.concurrency {
                        break;
                    }
                    self.lock_in_flight().insert(meta.id.clone());
                    let worker = Arc::clone(&self);
                    running.spawn(async move { worker.deliver_entry(meta).await });
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval) => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        if !running.is_empty() {
            tracing::info!(
                running = running.len(),
                "waiting for running deliveries before stopping"
            );
            let drained = tokio::time::timeout(grace, async {
                while running.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    aborted = running.len(),
                    "deliveries still running at the end of the shutdown grace period were stopped; they are retried at the next start"
                );
                running.shutdown().await;
            }
        }
    }

    async fn deliver_entry(self: Arc<Self>, meta: EntryMeta) -> Settled {
        let id = meta.id.clone();
        // One trace per delivery attempt: device, spool id and attempt, then the outcome; no
        // addresses (sender, recipients, mailbox).
        let span = tracing::info_span!(
            "deliver",
            device = %meta.envelope.device,
            message = %meta.id,
            attempt = meta.attempts + 1,
            result = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let settled = tracing::Instrument::instrument(self.deliver(meta), span.clone()).await;
        span.record("result", settled.outcome.as_str());
        if settled.outcome != Outcome::Delivered {
            span.record("otel.status_code", "ERROR");
        }
        // Into `settled_since_scan` before leaving `in_flight`, so no scan sees it in neither.
        self.lock_settled().insert(id.clone());
        self.lock_in_flight().remove(&id);
        settled
    }

    fn delay(&self, attempts: u32, at_least: Option<Duration>) -> Duration {
        let d = spool::backoff(
            attempts,
            self.settings.retry_base,
            self.settings.retry_max,
            (self.jitter)(),
        );
        at_least.map_or(d, |min| d.max(min))
    }

    async fn retry_later(&self, meta: &EntryMeta, kind: Deferral, reason: &str, delay: Duration) {
        let next = self.clock.now() + delay;
        let id = meta.id.clone();
        let reason = reason.to_owned();
        match blocking(&self.spool, move |s| s.retry_later(&id, &reason, next)).await {
            Ok(_) => self.metrics.message_deferred(kind),
            Err(error) => {
                tracing::error!(id = %meta.id, %error, "recording a retry in the spool failed");
            }
        }
    }

    async fn dead_letter(&self, meta: &EntryMeta, kind: DeadLetter, reason: &str) {
        let id = meta.id.clone();
        let why = reason.to_owned();
        match blocking(&self.spool, move |s| s.dead_letter(&id, &why)).await {
            Ok(()) => self.metrics.message_dead_lettered(kind),
            Err(error) => tracing::error!(id = %meta.id, %error, "dead-lettering failed"),
        }
        tracing::warn!(id = %meta.id, device = %meta.envelope.device, reason, "message dead-lettered");
    }

    fn record(
        &self,
        meta: &EntryMeta,
        mailbox: &str,
        outcome: Outcome,
        reply: &str,
        challenge: &str,
    ) -> Settled {
        self.book.record(
            &meta.envelope.device,
            self.clock.now(),
            Attempt {
                message_id: meta.id.to_string(),
                mailbox: mailbox.to_owned(),
                outcome,
                final_reply: reply.to_owned(),
                auth_challenge_json: challenge.to_owned(),
            },
        );
        Settled {
            id: meta.id.clone(),
            outcome,
            detail: reply.to_owned(),
        }
    }

    async fn deliver(&self, meta: EntryMeta) -> Settled {
        let now = self.clock.now();
        let device_name = meta.envelope.device.clone();
        let Some(device) = self.registry.device(&device_name) else {
            // Kept, never dropped: the device may come back, or the operator takes the message.
            let reason = format!(
                "device `{device_name}` is not in this agent's configuration; the message is kept in the spool"
            );
            self.retry_later(
                &meta,
                Deferral::UnknownDevice,
                &reason,
                self.settings.retry_max,
            )
            .await;
            return Settled {
                id: meta.id.clone(),
                outcome: Outcome::Retrying,
                detail: reason,
            };
        };
        let age = now.duration_since(meta.accepted_at()).unwrap_or_default();
        let too_many = self
            .settings
            .max_attempts
            .is_some_and(|max| meta.attempts >= max);
        if age >= self.settings.max_age || too_many {
            let reason = format!(
                "not delivered after {} attempt(s) in {} s; last error: {}",
                meta.attempts,
                age.as_secs(),
                meta.last_error.as_deref().unwrap_or("none")
            );
            self.dead_letter(&meta, DeadLetter::Expired, &reason).await;
            return self.record(&meta, "", Outcome::DeadLettered, &reason, "");
        }
        let delivery = match &device.delivery {
            Ok(d) => Arc::clone(d),
            Err(why) => {
                let reason = format!("device `{device_name}` has no usable upstream: {why}");
                self.retry_later(
                    &meta,
                    Deferral::Misconfigured,
                    &reason,
                    self.delay(meta.attempts, None),
                )
                .await;
                return self.record(&meta, "", Outcome::Misconfigured, &reason, "");
            }
        };
        let Some(key) = token_key(&meta, &device) else {
            let reason =
                format!("device `{device_name}`: its sender mode names no mailbox to send as");
            self.retry_later(
                &meta,
                Deferral::Misconfigured,
                &reason,
                self.delay(meta.attempts, None).min(TOKEN_WAIT_MAX),
            )
            .await;
            return self.record(&meta, "", Outcome::Misconfigured, &reason, "");
        };
        let mailbox = key.shown_mailbox().to_owned();
        let credentials = match self.tokens.credentials(&key).await {
            Ok(c) => c,
            Err(unavailable) => return self.no_token(&meta, &mailbox, unavailable).await,
        };
        if let Some(limit) = delivery.messages_per_minute() {
            let now = self.clock.now();
            let admitted = {
                let mut rate = self
                    .rate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                rate.prune(now);
                rate.admit(&credentials.username, limit, now)
            };
            if let Err(when) = admitted {
                // Deferred, not failed: no attempt counted, nothing recorded; due again when the
                // mailbox has room.
                self.spool.postpone(&meta.id, when);
                let detail = format!(
                    "deferred: mailbox {} sent {limit} messages in the last minute (the upstream's limit)",
                    credentials.username
                );
                tracing::debug!(id = %meta.id, device = %device_name, wait_ms = when.duration_since(now).unwrap_or_default().as_millis() as u64, "{detail}");
                return Settled {
                    id: meta.id.clone(),
                    outcome: Outcome::Retrying,
                    detail,
                };
            }
        }
        let id = meta.id.clone();
        let data = match blocking(&self.spool, move |s| s.message(&id)).await {
            Ok(data) => data,
            Err(error) => {
                tracing::error!(id = %meta.id, %error, "reading a queued message failed");
                return Settled {
                    id: meta.id.clone(),
                    outcome: Outcome::Retrying,
                    detail: error.to_string(),
                };
            }
        };
        if let Err(error) = self.journal.started(&meta.id, &meta.envelope.device) {
            tracing::warn!(%error, "writing the sending journal failed");
        }
        let settled = self
            .send_with_retry(&meta, &key, &mailbox, delivery.as_ref(), credentials, &data)
            .await;
        if let Err(error) = self.journal.ended(&meta.id) {
            tracing::warn!(%error, "writing the sending journal failed");
        }
        settled
    }

    async fn send_with_retry(
        &self,
        meta: &EntryMeta,
        key: &TokenKey,
        mailbox: &str,
        delivery: &dyn Delivery,
        credentials: Credentials,
        data: &[u8],
    ) -> Settled {
        let message = OutgoingMessage {
            from: &meta.envelope.from,
            rcpts: &meta.envelope.rcpts,
            data,
        };
        let mut result = delivery.send(message, &credentials).await;
        if let Err(e) = &result
            && e.kind == FailureKind::AuthRejected
        {
            tracing::info!(id = %meta.id, mailbox, reply = %e.final_reply, "upstream rejected the token; fetching a fresh one and retrying once");
            self.tokens.reject(key, &credentials).await;
            match self.tokens.credentials(key).await {
                Ok(fresh) => result = delivery.send(message, &fresh).await,
                Err(unavailable) => return self.no_token(meta, mailbox, unavailable).await,
            }
        }
        match result {
            Ok(receipt) => {
                self.metrics.message_delivered();
                let id = meta.id.clone();
                if let Err(error) = blocking(&self.spool, move |s| s.complete(&id)).await {
                    tracing::error!(id = %meta.id, %error, "removing a delivered message from the spool failed; it may be delivered twice");
                    self.book.count_duplicates(&meta.envelope.device, 1);
                }
                tracing::info!(id = %meta.id, device = %meta.envelope.device, mailbox, reply = %receipt.final_reply, "message delivered");
                self.record(meta, mailbox, Outcome::Delivered, &receipt.final_reply, "")
            }
            Err(error) => self.failed(meta, mailbox, delivery, &error).await,
        }
    }

    async fn failed(
        &self,
        meta: &EntryMeta,
        mailbox: &str,
        delivery: &dyn Delivery,
        error: &DeliveryError,
    ) -> Settled {
        let challenge = error.auth_challenge_json.clone().unwrap_or_default();
        match error.kind {
            FailureKind::Transient | FailureKind::AuthRejected => {
                let delay = self.delay(meta.attempts, error.retry_after);
                tracing::warn!(id = %meta.id, device = %meta.envelope.device, mailbox, reply = %error.final_reply, retry_in_s = delay.as_secs(), "delivery failed; retrying later");
                let (kind, outcome) = if error.kind == FailureKind::AuthRejected {
                    (Deferral::AuthRejected, Outcome::RetryingAuthRejected)
                } else {
                    (Deferral::Upstream, Outcome::Retrying)
                };
                self.retry_later(meta, kind, &error.final_reply, delay)
                    .await;
                self.record(meta, mailbox, outcome, &error.final_reply, &challenge)
            }
            FailureKind::Permanent => {
                self.dead_letter(meta, DeadLetter::Permanent, &error.final_reply)
                    .await;
                if self.settings.bounce {
                    self.bounce(meta, mailbox, delivery, &error.final_reply)
                        .await;
                }
                self.record(
                    meta,
                    mailbox,
                    Outcome::DeadLettered,
                    &error.final_reply,
                    &challenge,
                )
            }
        }
    }

    async fn no_token(
        &self,
        meta: &EntryMeta,
        mailbox: &str,
        unavailable: TokenUnavailable,
    ) -> Settled {
        match unavailable {
            TokenUnavailable::Wait {
                reason,
                retry_after,
                ..
            } => {
                let delay = self
                    .delay(meta.attempts, None)
                    .min(TOKEN_WAIT_MAX)
                    .max(retry_after.unwrap_or_default());
                self.retry_later(meta, Deferral::NoToken, &reason, delay)
                    .await;
                self.record(meta, mailbox, Outcome::WaitingForToken, &reason, "")
            }
            TokenUnavailable::Denied(reason) => {
                let reason = format!("the broker refused a token for mailbox {mailbox}: {reason}");
                self.dead_letter(meta, DeadLetter::TokenDenied, &reason)
                    .await;
                self.record(meta, mailbox, Outcome::DeadLettered, &reason, "")
            }
        }
    }

    /// Best effort: a short delivery status notification to the envelope sender, sent as the
    /// same mailbox through the same upstream. Never queued, never bounced itself.
    async fn bounce(&self, meta: &EntryMeta, mailbox: &str, delivery: &dyn Delivery, reason: &str) {
        if meta.envelope.from.is_empty() {
            return;
        }
        let Some(device) = self.registry.device(&meta.envelope.device) else {
            return;
        };
        let Some(key) = token_key(meta, &device) else {
            return;
        };
        let Ok(credentials) = self.tokens.credentials(&key).await else {
            return;
        };
        let text = dsn(
            &credentials.username,
            &meta.envelope.from,
            &meta.envelope.rcpts,
            reason,
            &meta.id,
        );
        let rcpts = vec![meta.envelope.from.clone()];
        let message = OutgoingMessage {
            from: &credentials.username,
            rcpts: &rcpts,
            data: text.as_bytes(),
        };
        match delivery.send(message, &credentials).await {
            Ok(_) => {
                tracing::info!(id = %meta.id, mailbox, to = %meta.envelope.from, "bounce sent")
            }
            Err(error) => {
                tracing::warn!(id = %meta.id, mailbox, reply = %error.final_reply, "sending the bounce failed")
            }
        }
    }
}

/// The token a message needs: the mailbox the ingress chose, the signed-in user's address, or
/// the device's sender-mode default.
pub fn token_key(meta: &EntryMeta, device: &DeviceEntry) -> Option<TokenKey> {
    let envelope = &meta.envelope;
    let mailbox = if !envelope.mailbox.is_empty() {
        envelope.mailbox.clone()
    } else if !envelope.user_address.is_empty() {
        String::new()
    } else {
        device.default_mailbox()?.to_owned()
    };
    Some(TokenKey {
        device: envelope.device.clone(),
        mailbox,
        user_address: envelope.user_address.clone(),
        purpose: pb::MailPurpose::Send,
    })
}

fn dsn(from: &str, to: &str, rcpts: &[String], reason: &str, id: &SpoolId) -> String {
    let date = httpdate::fmt_http_date(SystemTime::now());
    let reason = reason.replace(['\r', '\n'], " ");
    format!(
        "From: Mail Delivery System <{from}>\r\nTo: <{to}>\r\nSubject: Undeliverable: message {id}\r\n\
         Date: {date}\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n\
         Your message could not be delivered to {} and was not sent.\r\n\r\n\
         Reason: {reason}\r\n",
        rcpts.join(", ")
    )
}
