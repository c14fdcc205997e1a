//! The per-provider circuit breaker: while an identity provider's token endpoint fails
//! transiently (network errors, timeouts, HTTP 5xx and 429), grants of that endpoint stop calling
//! it one by one; one probe goes through every [`BreakerConfig::probe_interval`] (never before the
//! provider's `Retry-After`), and when a probe gets an answer the breaker closes and every grant
//! it held back is released for refresh at once, spread over [`BreakerConfig::release_spread`]
//! with bounded concurrency.
//!
//! Keyed by token endpoint URL (every provider record and tenant that shares an authority shares
//! a breaker). The state is per process: with N broker replicas each opens its own breaker after
//! its own failures, so during an outage the provider sees at most N probes per probe interval
//! (plus the requests that were already in flight when each breaker opened), and each replica
//! releases the grants it held when its own probe succeeds.
//!
//! Only transient failures count. A dead grant (`invalid_grant`), a broken app registration or a
//! refused request is an answer: the endpoint is up, so it closes the breaker like a success.
//! The breaker opens after [`BreakerConfig::failures`] consecutive transient failures with no
//! answer in between (two by default: one grant's stray 503 does not hold the others back, and a
//! grant that fails alone keeps its own backoff).
//!
//! No I/O here: the caller passes the time and runs the refreshes; [`Breakers`] only decides.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_providers::{ErrorClass, ProviderError};

use super::backoff::MAX_RETRY_AFTER;

/// A grant: (tenant, mailbox).
pub type GrantId = (String, String);

/// Breaker settings (`[tokens] breaker_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive transient failures of one endpoint (any grants, no answer in between) that
    /// open its breaker; 0 = no breaker (every grant backs off on its own).
    pub failures: u32,
    /// While open, one probe at most this often (and never before a `Retry-After`).
    pub probe_interval: Duration,
    /// Grants released when the breaker closes start their refresh at a random moment within
    /// this window.
    pub release_spread: Duration,
    /// Most released refreshes running at once on this replica.
    pub release_concurrency: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 2,
            probe_interval: Duration::from_secs(5),
            release_spread: Duration::from_secs(3),
            release_concurrency: 8,
        }
    }
}

/// What a grant about to call the provider may do.
#[derive(Debug)]
pub enum Admission {
    /// The breaker is closed: call, and report the outcome on the ticket.
    Call(Ticket),
    /// The breaker is open and a probe is due: this call is the probe; report its outcome.
    Probe(Ticket),
    /// The breaker is open: do not call the provider now.
    Held(Held),
}

/// Why a grant is held back, for its status record.
#[derive(Debug, Clone)]
pub struct Held {
    /// The last transient failure of the endpoint.
    pub error: ProviderError,
    /// When the breaker opened.
    pub since: OffsetDateTime,
    /// When the next probe may go.
    pub next_probe: OffsetDateTime,
    /// Whether a probe is at the provider right now.
    pub probe_in_flight: bool,
}

/// How a provider call ended, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered (a token, or an error that is not transient).
    Answered,
    /// A transient failure, with the provider's `Retry-After` if it sent one.
    Transient(Option<Duration>),
}

impl Outcome {
    /// The breaker's view of a provider call's result.
    pub fn of<T>(result: &Result<T, ProviderError>) -> Self {
        match result {
            Err(e) if e.class == ErrorClass::Transient => Self::Transient(e.retry_after),
            _ => Self::Answered,
        }
    }
}

/// A permit to call the provider; its outcome must be reported ([`Ticket::report`]). Dropped
/// unreported (the call was cancelled), it only frees the probe slot.
#[derive(Debug)]
pub struct Ticket {
    breakers: Arc<Breakers>,
    endpoint: String,
    probe: bool,
    reported: bool,
}

impl Ticket {
    /// Whether this call is the breaker's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports how the call ended for `grant`. Returns the grants to release when this answer
    /// closed an open breaker (never `grant` itself).
    pub fn report(
        mut self,
        now: OffsetDateTime,
        grant: &GrantId,
        outcome: Outcome,
        error: Option<&ProviderError>,
    ) -> Vec<GrantId> {
        self.reported = true;
        self.breakers
            .report(&self.endpoint, self.probe, now, grant, outcome, error)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            let mut endpoints = self.breakers.lock();
            if let Some(open) = endpoints
                .get_mut(&self.endpoint)
                .and_then(|e| e.open.as_mut())
            {
                open.probes_in_flight = open.probes_in_flight.saturating_sub(1);
            }
            drop(endpoints);
            self.breakers.notify();
        }
    }
}

#[derive(Debug)]
struct Open {
    since: OffsetDateTime,
    next_probe: OffsetDateTime,
    probes_in_flight: u32,
    error: ProviderError,
}

#[derive(Debug, Default)]
struct EndpointState {
    /// Consecutive transient failures since the last answer.
    failures: u32,
    /// Grants that failed since the last answer, held back once the breaker opens.
    waiting: VecDeque<GrantId>,
    waiting_set: HashSet<GrantId>,
    open: Option<Open>,
}

impl EndpointState {
    fn add_waiting(&mut self, grant: &GrantId) {
        if self.waiting_set.insert(grant.clone()) {
            self.waiting.push_back(grant.clone());
        }
    }

    fn remove_waiting(&mut self, grant: &GrantId) {
        if self.waiting_set.remove(grant) {
            self.waiting.retain(|g| g != grant);
        }
    }
}

/// One endpoint's breaker as reported (logs, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerStatus {
    /// The token endpoint.
    pub endpoint: String,
    /// Whether the breaker is open.
    pub open: bool,
    /// Grants held back.
    pub waiting: usize,
    /// When the next probe may go (open breakers).
    pub next_probe: Option<OffsetDateTime>,
}

/// The breakers of every token endpoint this process calls. Shared (`Arc`).
#[derive(Debug)]
pub struct Breakers {
    config: BreakerConfig,
    endpoints: Mutex<HashMap<String, EndpointState>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Breakers {
    /// Breakers with these settings.
    pub fn new(config: BreakerConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            endpoints: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, EndpointState>> {
        // Every update leaves the map consistent; a panicking holder does not corrupt it.
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// May a grant of `endpoint` call the provider at `now`?
    pub fn admit(self: &Arc<Self>, endpoint: &str, now: OffsetDateTime) -> Admission {
        let ticket = |probe| Ticket {
            breakers: self.clone(),
            endpoint: endpoint.to_owned(),
            probe,
            reported: false,
        };
        if self.config.failures == 0 {
            return Admission::Call(ticket(false));
        }
        let mut endpoints = self.lock();
        let Some(open) = endpoints.get_mut(endpoint).and_then(|e| e.open.as_mut()) else {
            return Admission::Call(ticket(false));
        };
        if now >= open.next_probe {
            // This call is the probe; the next one may go one interval later, whether or not
            // this one has ended (a hanging probe does not stop probing).
            open.next_probe = now + self.config.probe_interval;
            open.probes_in_flight += 1;
            return Admission::Probe(ticket(true));
        }
        Admission::Held(Held {
            error: open.error.clone(),
            since: open.since,
            next_probe: open.next_probe,
            probe_in_flight: open.probes_in_flight > 0,
        })
    }

    /// A ticket for a call that goes whatever the breaker's state (an operator's `RefreshNow`);
    /// its answer counts like any other.
    pub fn unconditional(self: &Arc<Self>, endpoint: &str) -> Ticket {
        Ticket {
            breakers: self.clone(),
            endpoint: endpoint.to_owned(),
            probe: false,
            reported: false,
        }
    }

    /// Notes that `grant` was held back (it is released when the breaker closes).
    pub fn hold(&self, endpoint: &str, grant: &GrantId) {
        if let Some(state) = self.lock().get_mut(endpoint) {
            state.add_waiting(grant);
        }
    }

    /// Forgets a held grant (it no longer needs the provider: dead, deleted, refreshed).
    pub fn forget(&self, grant: &GrantId) {
        for state in self.lock().values_mut() {
            state.remove_waiting(grant);
        }
    }

    fn report(
        &self,
        endpoint: &str,
        probe: bool,
        now: OffsetDateTime,
        grant: &GrantId,
        outcome: Outcome,
        error: Option<&ProviderError>,
    ) -> Vec<GrantId> {
        let mut endpoints = self.lock();
        let state = endpoints.entry(endpoint.to_owned()).or_default();
        if probe && let Some(open) = state.open.as_mut() {
            open.probes_in_flight = open.probes_in_flight.saturating_sub(1);
        }
        let released = match outcome {
            Outcome::Answered => {
                state.failures = 0;
                state.remove_waiting(grant);
                let was_open = state.open.take().is_some();
                let waiting: Vec<GrantId> = state.waiting.drain(..).collect();
                state.waiting_set.clear();
                // Grants that failed while it was closed keep their own backoff (one grant's
                // blip is not an outage); an outage's held grants all go now.
                if was_open { waiting } else { Vec::new() }
            }
            Outcome::Transient(retry_after) => {
                state.failures = state.failures.saturating_add(1);
                state.add_waiting(grant);
                let not_before = now + retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
                let error = error.cloned().unwrap_or_else(|| {
                    ProviderError::new(
                        ErrorClass::Transient,
                        "transient",
                        "the identity provider failed transiently",
                        "nothing to do; tokenfleet retries when the provider is back",
                    )
                });
                match state.open.as_mut() {
                    Some(open) => {
                        open.next_probe = open.next_probe.max(not_before);
                        open.error = error;
                    }
                    None if state.failures >= self.config.failures => {
                        state.open = Some(Open {
                            since: now,
                            next_probe: not_before.max(now + self.config.probe_interval),
                            probes_in_flight: 0,
                            error,
                        });
                    }
                    None => {}
                }
                Vec::new()
            }
        };
        drop(endpoints);
        self.notify();
        released
    }

    /// For every open breaker whose probe is due at `now` and that holds grants, one held grant
    /// to refresh as the probe (taken off the waiting list, so consecutive probes try different
    /// grants; it is put back if it is held or fails again).
    pub fn due_probes(&self, now: OffsetDateTime) -> Vec<GrantId> {
        let mut endpoints = self.lock();
        let mut due = Vec::new();
        for state in endpoints.values_mut() {
            let ready = state.open.as_ref().is_some_and(|o| now >= o.next_probe);
            if ready && let Some(grant) = state.waiting.pop_front() {
                state.waiting_set.remove(&grant);
                due.push(grant);
            }
        }
        due
    }

    /// Waits until a probe outcome (or any other change) is reported, at most `bound`.
    pub async fn changed_within(&self, bound: Duration) {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(bound, rx.changed()).await;
    }

    /// Every breaker's state.
    pub fn status(&self) -> Vec<BreakerStatus> {
        let mut all: Vec<BreakerStatus> = self
            .lock()
            .iter()
            .map(|(endpoint, s)| BreakerStatus {
                endpoint: endpoint.clone(),
                open: s.open.is_some(),
                waiting: s.waiting.len(),
                next_probe: s.open.as_ref().map(|o| o.next_probe),
            })
            .collect();
        all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        all
    }
}

/// The pause before the `index`-th of `count` released grants starts: spread evenly over
/// `spread` with jitter (`unit` in `[0, 1)`), so a recovery is not a thundering herd.
pub fn release_delay(spread: Duration, index: usize, count: usize, unit: f64) -> Duration {
    if count == 0 || spread.is_zero() {
        return Duration::ZERO;
    }
    let slot = spread.div_f64(count as f64);
    (slot.mul_f64(index as f64) + slot.mul_f64(unit.clamp(0.0, 1.0))).min(spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "http://127.0.0.1:9/t/oauth2/v2.0/token";

    fn t0() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn g(n: &str) -> GrantId {
        ("acme".to_owned(), n.to_owned())
    }

    fn transient(retry_after: Option<u64>) -> ProviderError {
        let mut e = ProviderError::new(ErrorClass::Transient, "http_503", "unavailable", "wait");
        e.retry_after = retry_after.map(Duration::from_secs);
        e
    }

    fn fail(b: &Arc<Breakers>, at: OffsetDateTime, grant: &str, retry_after: Option<u64>) {
        let e = transient(retry_after);
        let ticket = match b.admit(EP, at) {
            Admission::Call(t) | Admission::Probe(t) => t,
            Admission::Held(_) => panic!("held"),
        };
        assert!(
            ticket
                .report(at, &g(grant), Outcome::of::<()>(&Err(e.clone())), Some(&e))
                .is_empty()
        );
    }

    fn ticket(a: Admission) -> Ticket {
        match a {
            Admission::Call(t) | Admission::Probe(t) => t,
            Admission::Held(h) => panic!("held until {}", h.next_probe),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_holds_until_the_probe() {
        let b = Breakers::new(BreakerConfig::default());
        fail(&b, t0(), "a", None);
        // One failure: still closed (a stray 503 holds nobody back).
        assert!(matches!(b.admit(EP, t0()), Admission::Call(_)));
        fail(&b, t0(), "b", None);
        let Admission::Held(held) = b.admit(EP, t0() + Duration::from_secs(1)) else {
            panic!("open after two failures");
        };
        assert_eq!(held.next_probe, t0() + Duration::from_secs(5));
        assert!(!held.probe_in_flight);
        b.hold(EP, &g("c"));
        // The probe is due after the interval; only one caller gets it.
        let probe = b.admit(EP, t0() + Duration::from_secs(5));
        assert!(matches!(probe, Admission::Probe(_)));
        let Admission::Held(h) = b.admit(EP, t0() + Duration::from_secs(5)) else {
            panic!("second caller must be held");
        };
        assert!(h.probe_in_flight);
        assert_eq!(h.next_probe, t0() + Duration::from_secs(10));
        // The probe gets an answer: closed, every held grant released (not the probe's own).
        let released = ticket(probe).report(
            t0() + Duration::from_secs(6),
            &g("b"),
            Outcome::Answered,
            None,
        );
        let mut released = released;
        released.sort();
        assert_eq!(released, vec![g("a"), g("c")]);
        assert!(matches!(b.admit(EP, t0()), Admission::Call(_)));
        assert!(b.status().iter().all(|s| !s.open && s.waiting == 0));
    }

    #[test]
    fn a_failed_probe_keeps_it_open_and_retry_after_defers_the_next() {
        let b = Breakers::new(BreakerConfig::default());
        fail(&b, t0(), "a", None);
        fail(&b, t0(), "b", Some(600));
        // Retry-After: 600 → no probe before it.
        for s in [5, 60, 599] {
            assert!(
                matches!(
                    b.admit(EP, t0() + Duration::from_secs(s)),
                    Admission::Held(_)
                ),
                "{s}"
            );
        }
        let at = t0() + Duration::from_secs(600);
        let probe = ticket(b.admit(EP, at));
        assert!(probe.is_probe());
        let e = transient(None);
        assert!(
            probe
                .report(at, &g("a"), Outcome::Transient(None), Some(&e))
                .is_empty()
        );
        // Next probe one interval after the previous one started.
        assert!(matches!(
            b.admit(EP, at + Duration::from_secs(4)),
            Admission::Held(_)
        ));
        assert!(matches!(
            b.admit(EP, at + Duration::from_secs(5)),
            Admission::Probe(_)
        ));
    }

    #[test]
    fn a_hanging_probe_does_not_stop_probing_and_a_dropped_one_frees_its_slot() {
        let b = Breakers::new(BreakerConfig::default());
        fail(&b, t0(), "a", None);
        fail(&b, t0(), "b", None);
        let hanging = b.admit(EP, t0() + Duration::from_secs(5));
        assert!(matches!(hanging, Admission::Probe(_)));
        // Ten seconds in, the first probe still hangs; a second one may go.
        assert!(matches!(
            b.admit(EP, t0() + Duration::from_secs(10)),
            Admission::Probe(_)
        ));
        drop(hanging);
        let Admission::Held(h) = b.admit(EP, t0() + Duration::from_secs(11)) else {
            panic!()
        };
        assert!(!h.probe_in_flight, "both probe tickets are gone");
    }

    #[test]
    fn answers_that_are_not_transient_close_it_and_reset_the_count() {
        let b = Breakers::new(BreakerConfig::default());
        fail(&b, t0(), "a", None);
        // invalid_grant for another grant: the endpoint answers.
        let t = ticket(b.admit(EP, t0()));
        let dead = ProviderError::new(ErrorClass::GrantDead, "invalid_grant", "dead", "consent");
        assert_eq!(Outcome::of::<()>(&Err(dead)), Outcome::Answered);
        // Closed-state failures are not released (they keep their own backoff).
        assert!(t.report(t0(), &g("x"), Outcome::Answered, None).is_empty());
        fail(&b, t0(), "c", None);
        assert!(
            matches!(b.admit(EP, t0()), Admission::Call(_)),
            "count restarted"
        );
    }

    #[test]
    fn probes_rotate_over_held_grants() {
        let b = Breakers::new(BreakerConfig::default());
        fail(&b, t0(), "a", None);
        fail(&b, t0(), "b", None);
        b.hold(EP, &g("c"));
        assert!(b.due_probes(t0()).is_empty(), "not due yet");
        let at = t0() + Duration::from_secs(5);
        assert_eq!(b.due_probes(at), vec![g("a")]);
        // `a` is probed (and fails again): it goes to the back.
        let t = ticket(b.admit(EP, at));
        t.report(at, &g("a"), Outcome::Transient(None), None);
        let at = at + Duration::from_secs(5);
        assert_eq!(b.due_probes(at), vec![g("b")]);
        b.forget(&g("c"));
        assert_eq!(b.status()[0].waiting, 1);
    }

    #[test]
    fn zero_failures_means_no_breaker() {
        let b = Breakers::new(BreakerConfig {
            failures: 0,
            ..BreakerConfig::default()
        });
        for n in ["a", "b", "c", "d"] {
            fail(&b, t0(), n, None);
        }
        assert!(matches!(b.admit(EP, t0()), Admission::Call(_)));
    }

    #[test]
    fn releases_are_spread_over_the_window() {
        let spread = Duration::from_secs(3);
        let delays: Vec<Duration> = (0..100)
            .map(|i| release_delay(spread, i, 100, 0.5))
            .collect();
        assert!(delays.iter().all(|d| *d <= spread));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert!(delays[99] > Duration::from_millis(2900));
        assert_eq!(release_delay(spread, 0, 0, 0.5), Duration::ZERO);
    }
}
