//! The refresh scheduler: a background task on every replica that refreshes mailboxes before
//! their access tokens expire.
//!
//! Every grant that can be refreshed has an entry in the store schedule [`REFRESH_SCHEDULE`]
//! (member `<tenant>/<mailbox>`, due time in unix ms). Every few seconds each replica asks the
//! store for the entries that are due ([`tokenfleet_store::Store::due`]: an index lookup, never a
//! scan of all mailboxes), pushes each one a lease-length into the future (so a replica that dies
//! mid-refresh does not strand it, and the next poll does not hand it out again), and refreshes
//! it with bounded concurrency. The per-mailbox store lease keeps two replicas from refreshing the
//! same mailbox; the refresh writes the next due time ([`next_refresh_at`]): about 75 % into the
//! new access token's lifetime, spread with jitter so a burst of consents does not come due at
//! one instant, and for delegated grants at least every [`super::lifecycle::TokenConfig::max_refresh_interval`]
//! (24 h by default) so an idle refresh token never dies of inactivity.
//!
//! The grant record's `next_refresh` is the truth; the schedule is an index of it. A replica that
//! finds an entry due whose grant says "later" re-schedules it to the grant's time. A one-time
//! sweep at start-up ([`reconcile`], at most once per [`RECONCILE_EVERY`] across all replicas)
//! re-indexes grants that have no entry, e.g. written by an older broker.
//!
//! How many refreshes a replica runs at once is not fixed: a [`ConcurrencyController`] adapts it
//! to the provider. Refresh throughput is concurrency ÷ provider latency (Little's law), so a
//! fixed limit of 16 refreshes 80 mailboxes a second at 200 ms of provider latency whatever is
//! due. The controller (AIMD with a slow start, as TCP's congestion window) grows the limit while
//! due work waits for a slot — by one per successful refresh, i.e. doubling per provider round
//! trip, until the provider first pushes back, then by about one per round trip — so the refreshes
//! in flight reach what the due work needs at the measured latency; it halves the limit, once per
//! round trip, when the provider throttles or fails transiently (429, 5xx, timeouts, an open
//! breaker). `tokens.scheduler_concurrency` is its ceiling. A poll takes only as many due entries
//! as there are free slots (picked at random among the earliest few times that many, so replicas
//! polling together mostly pick different ones), claims each with a store lease on the entry (a
//! conditional write: of two replicas that picked the same entry one starts it, the other moves
//! on) held until the refresh ends, and polls again as soon as a slot frees while more is due.
//!
//! The controller is written here rather than taken from a crate: the adaptive limiters published
//! (AIMD/Vegas/gradient layers for tower or reqwest) treat a rising latency as overload and
//! shrink, while here latency is the provider's and a long one is exactly when more must be in
//! flight; and the signal that must shrink it is the outcome of a whole refresh (a breaker that
//! holds a grant back never sends an HTTP request such a layer could see).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_domain::{Tenant, TokenStatus};
use tokenfleet_store::{Precondition, RecordKey, Scope, Store, StoreResult};
use tokio::task::{JoinHandle, JoinSet};

use super::backoff::unit_random;
use super::grant::GrantRecord;
use super::lifecycle::TokenService;
use crate::records::Records;
pub use crate::schedule::{parse_member, unix_ms};

/// Name of the store schedule of refreshes.
pub const REFRESH_SCHEDULE: &str = "refresh";

/// Shortest wait between two refreshes of one mailbox, whatever the token lifetime says.
pub const MIN_REFRESH_WAIT: Duration = Duration::from_secs(5);

/// How often the start-up sweep ([`reconcile`]) runs at most, across all replicas.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Window over which grants the sweep finds without a due time are spread.
const RECONCILE_SPREAD: Duration = Duration::from_secs(10 * 60);

/// Lease that lets one replica run the sweep.
const RECONCILE_LEASE: &str = "refresh-reconcile";
/// Global record remembering when the sweep last ran.
const RECONCILE_MARKER: &str = "token-sweep";
/// Page size of the sweep.
const SWEEP_PAGE: usize = 500;

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// How often to ask the store for due refreshes.
    pub interval: Duration,
    /// Most due entries taken per poll.
    pub batch: usize,
    /// Ceiling of the refreshes running at once on this replica; the [`ConcurrencyController`]
    /// adapts the actual limit below it.
    pub concurrency: usize,
}

/// Default ceiling of concurrent refreshes per replica.
pub const DEFAULT_CONCURRENCY_CEILING: usize = 128;

/// The limit the controller starts at (or the ceiling, if lower).
pub const INITIAL_CONCURRENCY: usize = 8;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            batch: 256,
            concurrency: DEFAULT_CONCURRENCY_CEILING,
        }
    }
}

/// What became of one scheduled refresh, as the concurrency controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The grant has a fresh token (from the provider, or another replica's answer).
    Refreshed,
    /// The provider failed transiently (429, 5xx, timeout, network) or its breaker is open.
    ProviderFailing,
    /// Anything else (nothing to refresh, a dead grant, a store problem): no signal.
    Other,
}

/// The adaptive limit on refreshes in flight (see the module documentation). Pure state: the
/// scheduler tells it what happened, it answers [`Self::limit`]; time comes in as arguments so
/// it can be tested without clocks.
#[derive(Debug, Clone)]
pub struct ConcurrencyController {
    limit: f64,
    min: usize,
    max: usize,
    /// Grow by one per success (doubling per round trip) until the provider first pushes back.
    slow_start: bool,
    /// Smoothed duration of refreshes that succeeded.
    latency: Option<Duration>,
    last_decrease: Option<Instant>,
    peak: usize,
}

impl ConcurrencyController {
    /// Weight of a new latency sample in the moving average.
    const SMOOTHING: f64 = 0.2;
    /// Factor of a decrease on throttling.
    const DECREASE: f64 = 0.5;
    /// Round trip assumed before any refresh has succeeded.
    const DEFAULT_LATENCY: Duration = Duration::from_millis(500);

    /// An adaptive limit within `[min, max]` starting at `initial`.
    pub fn new(initial: usize, min: usize, max: usize) -> Self {
        let max = max.max(1);
        let min = min.clamp(1, max);
        let initial = initial.clamp(min, max);
        Self {
            limit: initial as f64,
            min,
            max,
            slow_start: true,
            latency: None,
            last_decrease: None,
            peak: initial,
        }
    }

    /// The scheduler's default: start at [`INITIAL_CONCURRENCY`], never below 1, at most
    /// `ceiling`.
    pub fn adaptive(ceiling: usize) -> Self {
        Self::new(INITIAL_CONCURRENCY, 1, ceiling)
    }

    /// A limit that never moves (what the scheduler did before; benchmarks' baseline).
    pub fn fixed(limit: usize) -> Self {
        Self::new(limit, limit, limit)
    }

    /// Refreshes that may run at once now.
    pub fn limit(&self) -> usize {
        (self.limit.floor() as usize).clamp(self.min, self.max)
    }

    /// The highest limit reached so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// The smoothed duration of successful refreshes, once there was one.
    pub fn latency(&self) -> Option<Duration> {
        self.latency
    }

    fn set(&mut self, limit: f64) {
        self.limit = limit.clamp(self.min as f64, self.max as f64);
        self.peak = self.peak.max(self.limit());
    }

    /// A refresh ended (`outcome`, after `took`); `backlog`: due work was waiting for a slot
    /// when it ended (only then does the limit grow: a limit nobody needs proves nothing).
    pub fn on_done(
        &mut self,
        outcome: RefreshOutcome,
        took: Duration,
        backlog: bool,
        now: Instant,
    ) {
        match outcome {
            RefreshOutcome::Refreshed => {
                self.latency = Some(match self.latency {
                    None => took,
                    Some(avg) => avg.mul_f64(1.0 - Self::SMOOTHING) + took.mul_f64(Self::SMOOTHING),
                });
                if backlog {
                    let step = if self.slow_start {
                        1.0
                    } else {
                        1.0 / self.limit.max(1.0)
                    };
                    self.set(self.limit + step);
                }
            }
            RefreshOutcome::ProviderFailing => {
                // Once per round trip: the refreshes already in flight when the provider pushed
                // back fail together, and that is one signal, not many.
                let round_trip = self.latency.unwrap_or(Self::DEFAULT_LATENCY);
                if self
                    .last_decrease
                    .is_none_or(|at| now.saturating_duration_since(at) >= round_trip)
                {
                    self.slow_start = false;
                    self.last_decrease = Some(now);
                    self.set((self.limit * Self::DECREASE).floor());
                }
            }
            RefreshOutcome::Other => {}
        }
    }
}

/// What a running scheduler shows of itself (for benchmarks and logs).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// The controller's current limit.
    pub limit: AtomicUsize,
    /// The highest limit it reached.
    pub peak_limit: AtomicUsize,
    /// Refreshes running now.
    pub in_flight: AtomicUsize,
    /// The most refreshes that ran at once.
    pub peak_in_flight: AtomicUsize,
    /// Refreshes whose provider failed transiently.
    pub provider_failing: AtomicUsize,
    /// Scheduled refreshes started (a mailbox another replica refreshed meanwhile counts too).
    pub started: AtomicUsize,
    /// The controller's smoothed refresh duration, in milliseconds.
    pub latency_ms: AtomicUsize,
}

/// The schedule member of a mailbox: `<tenant>/<mailbox>` (names never contain `/`).
pub fn member(tenant: &str, mailbox: &str) -> String {
    format!("{tenant}/{mailbox}")
}

/// Puts the refresh of a mailbox on the schedule at `at` (replacing an earlier entry). Whoever
/// makes a grant refreshable (a completed consent) calls this with the grant's `next_refresh`.
pub async fn schedule_refresh(
    store: &dyn Store,
    tenant: &str,
    mailbox: &str,
    at: OffsetDateTime,
) -> StoreResult<()> {
    store
        .schedule(REFRESH_SCHEDULE, &member(tenant, mailbox), unix_ms(at))
        .await
}

/// Takes a mailbox off the refresh schedule.
pub async fn unschedule_refresh(store: &dyn Store, tenant: &str, mailbox: &str) -> StoreResult<()> {
    store
        .unschedule(REFRESH_SCHEDULE, &member(tenant, mailbox))
        .await
}

/// When to refresh next after a successful refresh at `now` that yielded a token valid for
/// `lifetime`.
///
/// 65–85 % into the lifetime (`unit` in `[0, 1)` picks where: [`unit_random`] in production),
/// so tokens are renewed well before they expire and refreshes of grants obtained together
/// drift apart. Delegated grants are refreshed at least every `max_interval` (90–100 % of it), so
/// their refresh tokens are used often enough not to expire from inactivity. Never sooner than
/// [`MIN_REFRESH_WAIT`].
pub fn next_refresh_at(
    now: OffsetDateTime,
    lifetime: Duration,
    delegated: bool,
    max_interval: Duration,
    unit: f64,
) -> OffsetDateTime {
    let unit = unit.clamp(0.0, 1.0);
    let mut wait = lifetime.mul_f64(0.65 + 0.20 * unit);
    if delegated {
        wait = wait.min(max_interval.mul_f64(0.90 + 0.10 * unit));
    }
    now + wait.max(MIN_REFRESH_WAIT)
}

/// The background task. See the module documentation.
#[derive(Debug)]
pub struct RefreshScheduler;

impl RefreshScheduler {
    /// Starts the scheduler on `service`; it stops when `shutdown` completes (refreshes already
    /// running finish on their own).
    pub fn spawn(
        service: TokenService,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let controller = ConcurrencyController::adaptive(service.config().scheduler.concurrency);
        Self::spawn_with(service, shutdown, controller).0
    }

    /// [`Self::spawn`] with a given controller (e.g. [`ConcurrencyController::fixed`]), and what
    /// it shows of itself while it runs.
    pub fn spawn_with(
        service: TokenService,
        shutdown: impl Future<Output = ()> + Send + 'static,
        controller: ConcurrencyController,
    ) -> (JoinHandle<()>, Arc<SchedulerStats>) {
        let stats = Arc::new(SchedulerStats::default());
        let handle = tokio::spawn(run(service, shutdown, controller, stats.clone()));
        (handle, stats)
    }
}

type Done = (String, RefreshOutcome, Duration);

/// Feeds a finished refresh to the controller and the stats.
fn finished(
    done: Result<Done, tokio::task::JoinError>,
    backlog: bool,
    in_flight: &mut HashSet<String>,
    controller: &mut ConcurrencyController,
    stats: &SchedulerStats,
) {
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    let Ok((member, outcome, took)) = done else {
        return;
    };
    in_flight.remove(&member);
    if outcome == RefreshOutcome::ProviderFailing {
        stats.provider_failing.fetch_add(1, Ordering::Relaxed);
    }
    controller.on_done(outcome, took, backlog, Instant::now());
    if let Some(latency) = controller.latency() {
        stats
            .latency_ms
            .store(latency.as_millis() as usize, Ordering::Relaxed);
    }
    stats.limit.store(controller.limit(), Ordering::Relaxed);
    stats.peak_limit.store(controller.peak(), Ordering::Relaxed);
}

async fn run(
    service: TokenService,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut controller: ConcurrencyController,
    stats: Arc<SchedulerStats>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let config = service.config().scheduler.clone();
    let store = service.state().store.clone();
    // A claimed entry is not taken again before its refresh could have finished: one provider
    // call plus a lease TTL (the lease itself is short and renewed while the refresh runs).
    let claim_for = service.config().provider_timeout + service.config().lease_ttl;
    let owner = format!("{}:{}", service.config().replica_id, uuid::Uuid::new_v4());
    stats.limit.store(controller.limit(), Ordering::Relaxed);
    stats.peak_limit.store(controller.peak(), Ordering::Relaxed);
    let mut running: JoinSet<Done> = JoinSet::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut store_down = false;

    {
        let sweep = reconcile(&service);
        tokio::select! {
            () = &mut shutdown => return,
            result = sweep => if let Err(error) = result {
                tracing::warn!(%error, "refresh schedule sweep failed; grants are still refreshed on demand");
            },
        }
    }
    tracing::info!(
        interval_ms = config.interval.as_millis() as u64,
        concurrency_ceiling = config.concurrency,
        concurrency = controller.limit(),
        "refresh scheduler running"
    );

    let mut again_now = false;
    'polls: loop {
        if !again_now {
            // Until the next poll, refreshes that end are counted at once (not at the poll):
            // a finished refresh must not look like a busy slot.
            loop {
                tokio::select! {
                    () = &mut shutdown => break 'polls,
                    _ = ticker.tick() => break,
                    Some(done) = running.join_next(), if !running.is_empty() => {
                        finished(done, false, &mut in_flight, &mut controller, &stats);
                    }
                }
            }
        } else if running.len() >= controller.limit() {
            // The last poll left due work behind and every slot is taken: the work waits for a
            // slot (what lets the controller grow the limit).
            tokio::select! {
                () = &mut shutdown => break,
                done = running.join_next() => if let Some(done) = done {
                    finished(done, true, &mut in_flight, &mut controller, &stats);
                },
            }
        }
        let backlog = again_now;
        again_now = false;
        while let Some(done) = running.try_join_next() {
            finished(done, backlog, &mut in_flight, &mut controller, &stats);
        }
        let free = controller.limit().saturating_sub(running.len());
        if free == 0 {
            again_now = backlog;
            continue;
        }
        let now = service.state().clock.now();
        // Open provider breakers whose probe is due send one held grant to the provider.
        service.start_due_probes();
        // Only as many as can start now: the rest stays on the schedule for whichever replica
        // has a slot first (a claimed entry is pushed ahead, so the next poll skips it). Picked
        // at random among a few times as many of the earliest, so replicas polling at the same
        // moment mostly claim different ones.
        let want = free.min(config.batch.max(1));
        let fetch = (want * 4).min(config.batch.max(1)).max(want);
        let due = match store.due(REFRESH_SCHEDULE, unix_ms(now), fetch).await {
            Ok(due) => {
                if store_down {
                    tracing::info!("refresh scheduler reaches the store again");
                    store_down = false;
                }
                due
            }
            Err(error) => {
                if !store_down {
                    tracing::warn!(%error, "refresh scheduler cannot read the schedule; retrying");
                    store_down = true;
                }
                continue;
            }
        };
        let full = due.len() > want || due.len() >= fetch;
        let mut due: Vec<String> = due
            .into_iter()
            .map(|(entry, _)| entry)
            .filter(|entry| !in_flight.contains(entry))
            .collect();
        shuffle(&mut due);
        due.truncate(want);
        let mut claimed_any = false;
        for entry in due {
            let Some((tenant, mailbox)) = parse_member(&entry) else {
                tracing::warn!(member = %entry, "dropping a malformed refresh schedule entry");
                let _ = store.unschedule(REFRESH_SCHEDULE, &entry).await;
                continue;
            };
            let (tenant, mailbox) = (tenant.to_owned(), mailbox.to_owned());
            // Claim, in one conditional write: a replica that polled the same entry a moment
            // earlier holds it, and this one goes on to the next.
            let claim = claim_name(&entry);
            match store.try_lease(&claim, &owner, claim_for).await {
                Ok(Some(_)) => {}
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, "cannot claim a due refresh; retrying later");
                    break;
                }
            }
            // Nobody (here or elsewhere) polls it again before the refresh could be done.
            if let Err(error) = store
                .schedule(REFRESH_SCHEDULE, &entry, unix_ms(now + claim_for))
                .await
            {
                tracing::warn!(%error, "cannot claim a due refresh; retrying later");
                let _ = store.release_lease(&claim, &owner).await;
                break;
            }
            claimed_any = true;
            in_flight.insert(entry.clone());
            stats.started.fetch_add(1, Ordering::Relaxed);
            let running_now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            stats
                .peak_in_flight
                .fetch_max(running_now, Ordering::Relaxed);
            let (service, owner) = (service.clone(), owner.clone());
            running.spawn(async move {
                let started = Instant::now();
                let outcome = service.scheduled_refresh(&tenant, &mailbox).await;
                let took = started.elapsed();
                let _ = service.state().store.release_lease(&claim, &owner).await;
                (entry, outcome, took)
            });
        }
        stats.limit.store(controller.limit(), Ordering::Relaxed);
        stats.peak_limit.store(controller.peak(), Ordering::Relaxed);
        // More is due than there were slots: poll again as soon as one frees.
        again_now = full && claimed_any;
    }
    drain(running).await;
}

/// The store lease a replica holds on a schedule entry while it refreshes that mailbox.
fn claim_name(member: &str) -> String {
    format!("refresh-claim/{member}")
}

/// Fisher–Yates with the scheduler's jitter source.
fn shuffle(entries: &mut [String]) {
    for i in (1..entries.len()).rev() {
        let j = ((unit_random() * (i + 1) as f64) as usize).min(i);
        entries.swap(i, j);
    }
}

/// Lets running refreshes finish (they hold leases), bounded.
async fn drain(mut running: JoinSet<Done>) {
    let wait = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .is_err()
    {
        tracing::info!("refresh scheduler stopped with refreshes still running");
    }
    tracing::info!("refresh scheduler stopped");
}

/// When the start-up sweep last ran.
#[derive(Debug, Serialize, Deserialize)]
struct SweepMarker {
    #[serde(with = "time::serde::rfc3339")]
    last: OffsetDateTime,
}

/// Re-indexes every refreshable grant on the schedule, on one replica, at most once per
/// [`RECONCILE_EVERY`]. Returns how many entries it wrote (0 when it did not run).
pub async fn reconcile(service: &TokenService) -> StoreResult<u64> {
    let state = service.state();
    let store = state.store.as_ref();
    let owner = format!("{}:{}", service.config().replica_id, uuid::Uuid::new_v4());
    let Some(_lease) = store
        .try_lease(RECONCILE_LEASE, &owner, Duration::from_secs(600))
        .await?
    else {
        return Ok(0);
    };
    let result = sweep(service).await;
    let _ = store.release_lease(RECONCILE_LEASE, &owner).await;
    result
}

async fn sweep(service: &TokenService) -> StoreResult<u64> {
    let state = service.state();
    let store = state.store.as_ref();
    let marker_key = RecordKey::global(RECONCILE_MARKER, "refresh");
    let now = state.clock.now();
    if let Some(record) = store.get(&marker_key).await?
        && let Ok(marker) = serde_json::from_slice::<SweepMarker>(&record.data)
        && now - marker.last < RECONCILE_EVERY
    {
        return Ok(0);
    }
    let records = Records::new(store);
    let mut written = 0u64;
    let mut tenants_after: Option<String> = None;
    loop {
        let tenants = records
            .list::<Tenant>(&Scope::Global, tenants_after.as_deref(), SWEEP_PAGE)
            .await?;
        for tenant in &tenants {
            let scope = Scope::Tenant(tenant.value.name.clone());
            let mut after: Option<String> = None;
            loop {
                let grants = records
                    .list::<GrantRecord>(&scope, after.as_deref(), SWEEP_PAGE)
                    .await?;
                for g in &grants {
                    let g = &g.value;
                    if !matches!(
                        g.state.status,
                        TokenStatus::Active | TokenStatus::RefreshFailing
                    ) {
                        continue;
                    }
                    let at = g
                        .next_refresh
                        .unwrap_or_else(|| now + RECONCILE_SPREAD.mul_f64(unit_random()));
                    schedule_refresh(store, &g.tenant, &g.mailbox, at).await?;
                    written += 1;
                }
                after = grants.last().map(|g| g.value.mailbox.clone());
                if grants.len() < SWEEP_PAGE {
                    break;
                }
            }
        }
        tenants_after = tenants.last().map(|t| t.value.name.clone());
        if tenants.len() < SWEEP_PAGE {
            break;
        }
    }
    let marker = serde_json::to_vec(&SweepMarker { last: now }).unwrap_or_default();
    store.put(&marker_key, marker, Precondition::Any).await?;
    if written > 0 {
        tracing::info!(
            entries = written,
            "refresh schedule sweep re-indexed refreshable grants"
        );
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t0() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn refresh_comes_at_about_three_quarters_of_the_lifetime() {
        for unit in [0.0, 0.25, 0.5, 0.75, 0.999] {
            let at = next_refresh_at(t0(), HOUR, true, DAY, unit);
            let wait = at - t0();
            assert!(
                wait >= HOUR.mul_f64(0.65) && wait <= HOUR.mul_f64(0.85),
                "{wait}"
            );
            assert!(at < t0() + HOUR, "refresh must come before expiry");
        }
        assert_eq!(
            next_refresh_at(t0(), HOUR, false, DAY, 0.5) - t0(),
            HOUR.mul_f64(0.75)
        );
    }

    #[test]
    fn delegated_grants_are_refreshed_at_least_daily() {
        // A provider handing out week-long access tokens: delegated grants still refresh within
        // 24 h (the refresh token must be used), app-only ones need not.
        let week = 7 * DAY;
        for unit in [0.0, 0.5, 0.999] {
            let delegated = next_refresh_at(t0(), week, true, DAY, unit);
            assert!(delegated - t0() <= DAY, "{unit}: {}", delegated - t0());
            assert!(delegated - t0() >= DAY.mul_f64(0.9));
            let app = next_refresh_at(t0(), week, false, DAY, unit);
            assert!(app - t0() > 4 * DAY);
        }
        // Simulate a year of an idle delegated grant refreshed only by the scheduler: no gap
        // between two refreshes exceeds 24 h.
        let mut now = t0();
        let mut max_gap = Duration::ZERO;
        for i in 0..400 {
            let next = next_refresh_at(now, week, true, DAY, (i % 10) as f64 / 10.0);
            max_gap = max_gap.max((next - now).unsigned_abs());
            now = next;
        }
        assert!(max_gap <= DAY, "{max_gap:?}");
    }

    #[test]
    fn short_or_zero_lifetimes_do_not_spin() {
        assert_eq!(
            next_refresh_at(t0(), Duration::ZERO, true, DAY, 0.5) - t0(),
            MIN_REFRESH_WAIT
        );
    }

    #[test]
    fn jitter_spreads_a_burst_of_consents() {
        // 1,000 grants obtained in the same second come due over minutes, not at one instant.
        let times: Vec<OffsetDateTime> = (0..1000)
            .map(|_| next_refresh_at(t0(), HOUR, true, DAY, unit_random()))
            .collect();
        let min = times.iter().min().copied().unwrap_or(t0());
        let max = times.iter().max().copied().unwrap_or(t0());
        assert!(max - min > time::Duration::minutes(5), "{}", max - min);
        let mut per_second = std::collections::HashMap::new();
        for t in &times {
            *per_second.entry(t.unix_timestamp()).or_insert(0) += 1;
        }
        assert!(per_second.values().all(|&n| n < 20), "{per_second:?}");
    }

    const RTT: Duration = Duration::from_millis(200);

    #[test]
    fn the_limit_grows_while_due_work_waits_at_a_slow_provider() {
        let mut c = ConcurrencyController::adaptive(512);
        let now = Instant::now();
        assert_eq!(c.limit(), INITIAL_CONCURRENCY);
        // 200 ms per refresh and work always waiting: slow start doubles per round of successes.
        let mut rounds = 0;
        while c.limit() < 256 && rounds < 20 {
            for _ in 0..c.limit() {
                c.on_done(RefreshOutcome::Refreshed, RTT, true, now);
            }
            rounds += 1;
        }
        assert!(c.limit() >= 256, "{} after {rounds} rounds", c.limit());
        assert!(rounds <= 6, "{rounds} rounds to reach {}", c.limit());
        assert!(
            c.latency()
                .is_some_and(|l| l.abs_diff(RTT) < Duration::from_micros(1))
        );
        assert_eq!(c.peak(), c.limit());
    }

    #[test]
    fn the_limit_does_not_grow_without_waiting_work() {
        let mut c = ConcurrencyController::adaptive(512);
        let now = Instant::now();
        for _ in 0..1000 {
            c.on_done(RefreshOutcome::Refreshed, RTT, false, now);
        }
        assert_eq!(c.limit(), INITIAL_CONCURRENCY);
    }

    #[test]
    fn throttling_halves_the_limit_once_per_round_trip() {
        let mut c = ConcurrencyController::new(64, 1, 512);
        let now = Instant::now();
        c.on_done(RefreshOutcome::Refreshed, RTT, false, now);
        // The refreshes in flight when the provider answered 429 fail together: one decrease.
        for _ in 0..20 {
            c.on_done(RefreshOutcome::ProviderFailing, RTT, true, now);
        }
        assert_eq!(c.limit(), 32);
        // A round trip later it is a new signal.
        c.on_done(RefreshOutcome::ProviderFailing, RTT, true, now + RTT);
        assert_eq!(c.limit(), 16);
        // After the first push back it grows by about one per round trip, not by doubling.
        for _ in 0..20 {
            c.on_done(RefreshOutcome::Refreshed, RTT, true, now + 4 * RTT);
        }
        assert_eq!(c.limit(), 17);
        assert_eq!(c.peak(), 64);
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let now = Instant::now();
        let mut c = ConcurrencyController::new(4, 2, 20);
        for _ in 0..10_000 {
            c.on_done(RefreshOutcome::Refreshed, RTT, true, now);
        }
        assert_eq!(c.limit(), 20);
        for i in 0..100u32 {
            c.on_done(
                RefreshOutcome::ProviderFailing,
                RTT,
                true,
                now + RTT * (i + 1),
            );
        }
        assert_eq!(c.limit(), 2);
        // Outcomes without a signal move nothing.
        c.on_done(RefreshOutcome::Other, Duration::from_secs(30), true, now);
        assert_eq!(c.limit(), 2);
        assert!(
            c.latency()
                .is_some_and(|l| l.abs_diff(RTT) < Duration::from_micros(1))
        );
        // A fixed limit never moves; a ceiling below the initial limit wins.
        let mut f = ConcurrencyController::fixed(16);
        for _ in 0..100 {
            f.on_done(RefreshOutcome::Refreshed, RTT, true, now);
        }
        f.on_done(RefreshOutcome::ProviderFailing, RTT, true, now);
        assert_eq!((f.limit(), f.peak()), (16, 16));
        assert_eq!(ConcurrencyController::adaptive(3).limit(), 3);
        assert_eq!(ConcurrencyController::adaptive(0).limit(), 1);
    }

    #[test]
    fn shuffling_keeps_every_entry() {
        let mut entries: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        shuffle(&mut entries);
        let mut sorted = entries.clone();
        sorted.sort_by_key(|e| e.parse::<u32>().unwrap_or(0));
        assert_eq!(sorted, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
    }

    #[test]
    fn members_round_trip() {
        assert_eq!(member("acme", "scan"), "acme/scan");
        assert_eq!(parse_member("acme/scan"), Some(("acme", "scan")));
        for bad in ["acme", "/scan", "acme/", "a/b/c"] {
            assert_eq!(parse_member(bad), None, "{bad}");
        }
        assert_eq!(unix_ms(t0()), 1_700_000_000_000);
    }
}
