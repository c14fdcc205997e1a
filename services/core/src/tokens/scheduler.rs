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

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_domain::{Tenant, TokenStatus};
use tokenfleet_store::{Precondition, RecordKey, Scope, Store, StoreResult};
use tokio::sync::Semaphore;
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
    /// Most refreshes running at once on this replica.
    pub concurrency: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            batch: 256,
            concurrency: 16,
        }
    }
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
        tokio::spawn(run(service, shutdown))
    }
}

async fn run(service: TokenService, shutdown: impl Future<Output = ()> + Send + 'static) {
    let mut shutdown = std::pin::pin!(shutdown);
    let config = service.config().scheduler.clone();
    let store = service.state().store.clone();
    // A claimed entry is not taken again before its refresh could have finished: one provider
    // call plus a lease TTL (the lease itself is short and renewed while the refresh runs).
    let claim_for = service.config().provider_timeout + service.config().lease_ttl;
    let semaphore = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut running: JoinSet<String> = JoinSet::new();
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
        concurrency = config.concurrency,
        "refresh scheduler running"
    );

    let mut again_now = false;
    loop {
        if !again_now {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {}
            }
        }
        again_now = false;
        while let Some(done) = running.try_join_next() {
            if let Ok(member) = done {
                in_flight.remove(&member);
            }
        }
        let now = service.state().clock.now();
        // Open provider breakers whose probe is due send one held grant to the provider.
        service.start_due_probes();
        let due = match store
            .due(REFRESH_SCHEDULE, unix_ms(now), config.batch.max(1))
            .await
        {
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
        let full = due.len() >= config.batch.max(1);
        let mut claimed_any = false;
        for (entry, _) in due {
            if in_flight.contains(&entry) {
                continue;
            }
            let Some((tenant, mailbox)) = parse_member(&entry) else {
                tracing::warn!(member = %entry, "dropping a malformed refresh schedule entry");
                let _ = store.unschedule(REFRESH_SCHEDULE, &entry).await;
                continue;
            };
            let (tenant, mailbox) = (tenant.to_owned(), mailbox.to_owned());
            // Claim: nobody (here or elsewhere) takes it again before the refresh could be done.
            if let Err(error) = store
                .schedule(REFRESH_SCHEDULE, &entry, unix_ms(now + claim_for))
                .await
            {
                tracing::warn!(%error, "cannot claim a due refresh; retrying later");
                break;
            }
            let permit = tokio::select! {
                () = &mut shutdown => return drain(running).await,
                permit = semaphore.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            claimed_any = true;
            in_flight.insert(entry.clone());
            let service = service.clone();
            running.spawn(async move {
                service.scheduled_refresh(&tenant, &mailbox).await;
                drop(permit);
                entry
            });
        }
        again_now = full && claimed_any;
    }
    drain(running).await;
}

/// Lets running refreshes finish (they hold leases), bounded.
async fn drain(mut running: JoinSet<String>) {
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
