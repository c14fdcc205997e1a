//! Fleet-wide gauges (mailboxes by token status, consents pending, the earliest refresh-token
//! expiry, agents enrolled/connected and their last-seen age, per-agent queue depth and dead
//! letters), computed by a background sweep every `[metrics] inventory_interval_seconds` and
//! served from that snapshot: a scrape never touches the store.
//!
//! Why a cached sweep and not counts kept current on transitions: the numbers are fleet-wide,
//! and transitions happen on every replica (and some without an event at all: a presence record
//! or a device report simply ages out). Per-replica transition counters would each see a part;
//! reading the records is the only source every replica agrees on. The cost is one paged read of
//! the tenants' mailbox, grant, agent, presence and device-status collections per interval per
//! replica (at 100,000 mailboxes, ~200 list calls of 500 records each); raise the interval for
//! larger fleets. `tokenfleet_inventory_last_success_timestamp_seconds` shows how old the snapshot
//! is, so an alert can tell a stale snapshot from a healthy fleet.
//!
//! Series about agents are named `tokenfleet_fleet_…` (what the broker knows of them), apart from
//! the `tokenfleet_agent_…` series each agent serves itself.
//!
//! Labels: `status` (token status), `agent` (an agent name: agents are the MSP's own sites, a
//! bounded set the MSP names, not customer data), and `tenant` only when
//! `[metrics] per_tenant_labels` is on. No mailbox name is ever a label.

use std::collections::HashMap;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokenfleet_domain::{Agent, Mailbox, Tenant, TokenStatus};
use tokenfleet_store::{Scope, StoreResult};
use tokio::sync::watch;

use crate::fleet::store::{AgentPresence, DeviceStatusRecord};
use crate::records::Records;
use crate::state::BrokerState;
use crate::tokens::grant::GrantRecord;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The gauges the sweep sets. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InventoryGauges {
    per_tenant: bool,
    mailboxes: Family<Labels, Gauge>,
    consents_pending: Family<Labels, Gauge>,
    earliest_expiry: Family<Labels, FloatGauge>,
    agents_enrolled: Family<Labels, Gauge>,
    agents_connected: Family<Labels, Gauge>,
    agent_last_seen_age: Family<Labels, FloatGauge>,
    agent_last_seen_age_max: FloatGauge,
    agent_queue_depth: Family<Labels, Gauge>,
    agent_oldest_queued: Family<Labels, Gauge>,
    agent_dead_letters: Family<Labels, Gauge>,
    heartbeat_seconds: Gauge,
    last_success: FloatGauge,
    sweep_seconds: FloatGauge,
    sweep_failures: prometheus_client::metrics::counter::Counter,
}

impl InventoryGauges {
    /// Fresh gauges; `per_tenant` adds a `tenant` label to the fleet series.
    pub fn new(per_tenant: bool) -> Self {
        Self {
            per_tenant,
            mailboxes: Family::default(),
            consents_pending: Family::default(),
            earliest_expiry: Family::default(),
            agents_enrolled: Family::default(),
            agents_connected: Family::default(),
            agent_last_seen_age: Family::default(),
            agent_last_seen_age_max: FloatGauge::default(),
            agent_queue_depth: Family::default(),
            agent_oldest_queued: Family::default(),
            agent_dead_letters: Family::default(),
            heartbeat_seconds: Gauge::default(),
            last_success: FloatGauge::default(),
            sweep_seconds: FloatGauge::default(),
            sweep_failures: Default::default(),
        }
    }

    /// Registers every gauge into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tokenfleet_mailboxes",
            "Mailboxes by token status (DISABLED for disabled mailboxes)",
            self.mailboxes.clone(),
        );
        registry.register(
            "tokenfleet_consents_pending",
            "Consents started and waiting for a person (device code or consent link)",
            self.consents_pending.clone(),
        );
        registry.register(
            "tokenfleet_refresh_token_earliest_expiry_timestamp_seconds",
            "Earliest known refresh-token expiry among grants that are not dead (unix seconds); absent when no grant reports one",
            self.earliest_expiry.clone(),
        );
        registry.register(
            "tokenfleet_fleet_agents_enrolled",
            "Enrolled agents that are not revoked",
            self.agents_enrolled.clone(),
        );
        registry.register(
            "tokenfleet_fleet_agents_connected",
            "Agents with an open status stream (presence records younger than three heartbeats)",
            self.agents_connected.clone(),
        );
        registry.register(
            "tokenfleet_fleet_agent_last_seen_age_seconds",
            "Seconds since each enrolled agent last reported (since enrollment when it never did), by agent",
            self.agent_last_seen_age.clone(),
        );
        registry.register(
            "tokenfleet_fleet_agents_last_seen_age_max_seconds",
            "The oldest last-seen age among enrolled agents (0 without agents)",
            self.agent_last_seen_age_max.clone(),
        );
        registry.register(
            "tokenfleet_fleet_agent_queue_depth",
            "Messages waiting in an agent's spool, summed over its devices, from its last report",
            self.agent_queue_depth.clone(),
        );
        registry.register(
            "tokenfleet_fleet_agent_oldest_queued_seconds",
            "Age of the oldest queued message among an agent's devices, from its last report",
            self.agent_oldest_queued.clone(),
        );
        registry.register(
            "tokenfleet_fleet_agent_dead_letters",
            "Messages an agent dead-lettered since its spool was created, summed over its devices, from its last report",
            self.agent_dead_letters.clone(),
        );
        registry.register(
            "tokenfleet_fleet_heartbeat_seconds",
            "Configured seconds between agent status reports ([agents] heartbeat_seconds)",
            self.heartbeat_seconds.clone(),
        );
        registry.register(
            "tokenfleet_inventory_last_success_timestamp_seconds",
            "When the fleet gauges were last computed (unix seconds)",
            self.last_success.clone(),
        );
        registry.register(
            "tokenfleet_inventory_duration_seconds",
            "How long the last computation of the fleet gauges took",
            self.sweep_seconds.clone(),
        );
        registry.register(
            "tokenfleet_inventory_failures",
            "Computations of the fleet gauges that failed (store errors)",
            self.sweep_failures.clone(),
        );
    }

    /// Sets the configured heartbeat.
    pub fn set_heartbeat(&self, seconds: u32) {
        self.heartbeat_seconds.set(i64::from(seconds));
    }

    fn with_tenant(&self, tenant: &str, mut labels: Labels) -> Labels {
        if self.per_tenant {
            labels.push(("tenant", tenant.to_owned()));
        }
        labels
    }

    fn publish(&self, snapshot: Snapshot) {
        // Replace whole families, so labels that disappeared (a removed agent) go away.
        self.mailboxes.clear();
        self.consents_pending.clear();
        self.earliest_expiry.clear();
        self.agents_enrolled.clear();
        self.agents_connected.clear();
        self.agent_last_seen_age.clear();
        self.agent_queue_depth.clear();
        self.agent_oldest_queued.clear();
        self.agent_dead_letters.clear();
        for (labels, n) in snapshot.mailboxes {
            self.mailboxes.get_or_create(&labels).set(n);
        }
        for (labels, n) in snapshot.consents_pending {
            self.consents_pending.get_or_create(&labels).set(n);
        }
        for (labels, t) in snapshot.earliest_expiry {
            self.earliest_expiry.get_or_create(&labels).set(t);
        }
        for (labels, n) in snapshot.agents_enrolled {
            self.agents_enrolled.get_or_create(&labels).set(n);
        }
        for (labels, n) in snapshot.agents_connected {
            self.agents_connected.get_or_create(&labels).set(n);
        }
        let mut oldest = 0.0_f64;
        for (labels, age) in snapshot.last_seen_age {
            oldest = oldest.max(age);
            self.agent_last_seen_age.get_or_create(&labels).set(age);
        }
        self.agent_last_seen_age_max.set(oldest);
        for (labels, q) in snapshot.queues {
            self.agent_queue_depth.get_or_create(&labels).set(q.depth);
            self.agent_oldest_queued
                .get_or_create(&labels)
                .set(q.oldest_seconds);
            self.agent_dead_letters
                .get_or_create(&labels)
                .set(q.dead_letters);
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Queue {
    depth: i64,
    oldest_seconds: i64,
    dead_letters: i64,
}

/// One computation's values.
#[derive(Debug, Default)]
struct Snapshot {
    mailboxes: HashMap<Labels, i64>,
    consents_pending: HashMap<Labels, i64>,
    earliest_expiry: HashMap<Labels, f64>,
    agents_enrolled: HashMap<Labels, i64>,
    agents_connected: HashMap<Labels, i64>,
    last_seen_age: HashMap<Labels, f64>,
    queues: HashMap<Labels, Queue>,
}

fn seconds(t: OffsetDateTime) -> f64 {
    t.unix_timestamp_nanos() as f64 / 1e9
}

/// Reads the store once and computes every fleet gauge.
async fn compute(state: &BrokerState, gauges: &InventoryGauges) -> StoreResult<Snapshot> {
    let records = Records::new(state.store.as_ref());
    let now = state.clock.now();
    let mut s = Snapshot::default();
    // Every status is present (0 included), so an alert on a status is never "no data".
    let fleet_labels = |tenant: &str| gauges.with_tenant(tenant, Vec::new());
    let tenants = records.list_all::<Tenant>(&Scope::Global).await?;
    if !gauges.per_tenant {
        for status in TokenStatus::ALL {
            s.mailboxes
                .insert(vec![("status", status_label(*status))], 0);
        }
        s.consents_pending.insert(Vec::new(), 0);
        s.agents_enrolled.insert(Vec::new(), 0);
        s.agents_connected.insert(Vec::new(), 0);
    }
    for tenant in tenants {
        let tenant = tenant.value.name;
        let scope = Scope::Tenant(tenant.clone());
        if gauges.per_tenant {
            for status in TokenStatus::ALL {
                s.mailboxes.insert(
                    gauges.with_tenant(&tenant, vec![("status", status_label(*status))]),
                    0,
                );
            }
            s.consents_pending.insert(fleet_labels(&tenant), 0);
            s.agents_enrolled.insert(fleet_labels(&tenant), 0);
            s.agents_connected.insert(fleet_labels(&tenant), 0);
        }
        let grants: HashMap<String, GrantRecord> = records
            .list_all::<GrantRecord>(&scope)
            .await?
            .into_iter()
            .map(|g| (g.value.mailbox.clone(), g.value))
            .collect();
        for mailbox in records.list_all::<Mailbox>(&scope).await? {
            let m = mailbox.value;
            let grant = grants.get(&m.name);
            let status = if m.disabled {
                TokenStatus::Disabled
            } else {
                grant.map_or(m.token.status, |g| g.state.status)
            };
            *s.mailboxes
                .entry(gauges.with_tenant(&tenant, vec![("status", status_label(status))]))
                .or_default() += 1;
            let Some(g) = grant else { continue };
            if g.pending.is_some() {
                *s.consents_pending.entry(fleet_labels(&tenant)).or_default() += 1;
            }
            if let Some(expires) = g.refresh_token_expires
                && !m.disabled
                && status != TokenStatus::ReauthRequired
            {
                let t = seconds(expires);
                s.earliest_expiry
                    .entry(fleet_labels(&tenant))
                    .and_modify(|e| *e = e.min(t))
                    .or_insert(t);
            }
        }
        let presence: HashMap<String, AgentPresence> = records
            .list_all::<AgentPresence>(&scope)
            .await?
            .into_iter()
            .map(|p| (p.value.agent.clone(), p.value))
            .collect();
        for agent in records.list_all::<Agent>(&scope).await? {
            let a = agent.value;
            if a.revoked {
                continue;
            }
            *s.agents_enrolled.entry(fleet_labels(&tenant)).or_default() += 1;
            let live = presence.get(&a.name).filter(|p| p.live(now));
            if live.is_some() {
                *s.agents_connected.entry(fleet_labels(&tenant)).or_default() += 1;
            }
            let last = [a.last_seen, presence.get(&a.name).map(|p| p.last_report)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(a.stamps.created);
            let age = (now - last).as_seconds_f64().max(0.0);
            s.last_seen_age.insert(
                gauges.with_tenant(&tenant, vec![("agent", a.name.clone())]),
                age,
            );
            // Every enrolled agent has its queue series (0 until it reports).
            s.queues
                .entry(gauges.with_tenant(&tenant, vec![("agent", a.name.clone())]))
                .or_default();
        }
        for report in records.list_all::<DeviceStatusRecord>(&scope).await? {
            let r = report.value;
            let Ok(status) = r.decode_status() else {
                continue;
            };
            let Some(q) = s
                .queues
                .get_mut(&gauges.with_tenant(&tenant, vec![("agent", r.agent.clone())]))
            else {
                // A report of a device whose agent is gone or revoked.
                continue;
            };
            q.depth += i64::from(status.queue_depth);
            q.oldest_seconds = q
                .oldest_seconds
                .max(i64::try_from(status.oldest_queued_seconds).unwrap_or(i64::MAX));
            q.dead_letters = q
                .dead_letters
                .saturating_add(i64::try_from(status.dead_lettered_total).unwrap_or(i64::MAX));
        }
    }
    Ok(s)
}

/// The label value of a token status: its name as every surface shows it (`REAUTH_REQUIRED`).
pub fn status_label(status: TokenStatus) -> String {
    status.as_str().to_ascii_uppercase()
}

/// Computes the gauges every `interval` until `stop` is set.
pub fn spawn(
    state: BrokerState,
    gauges: InventoryGauges,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let started = std::time::Instant::now();
            match compute(&state, &gauges).await {
                Ok(snapshot) => {
                    gauges.publish(snapshot);
                    gauges.sweep_seconds.set(started.elapsed().as_secs_f64());
                    gauges.last_success.set(seconds(state.clock.now()));
                }
                Err(error) => {
                    gauges.sweep_failures.inc();
                    tracing::warn!(%error, "computing the fleet metrics failed; keeping the last values");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    })
}
