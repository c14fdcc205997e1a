//! The chaos suite (issue 11: "nothing acknowledged is ever lost, and service returns when the
//! provider does"): scenarios that break one real component at a time under load and report what
//! was lost — the answer must be nothing — with the figures that show how the rest coped.
//!
//! Everything runs as it does in production: `tokenfleet-broker` replicas are child processes of
//! the real binary ([`brokers`]), the agent is the real `tokenfleet-agent` relaying to a real
//! Dovecot ([`crate::agent_site`]), Redis, Sentinel and Cluster are real `redis-server`
//! processes ([`crate::redis`]), the identity provider is the fake ([`crate::fake_idp`]), all on
//! loopback ports. Faults are what operators meet: SIGKILL of a process, `SENTINEL FAILOVER`,
//! `CLUSTER FAILOVER`, a slot migrated between masters, an upstream answering 421/451 or gone,
//! an identity provider answering 503 and then hanging.
//!
//! One command runs it (`src/bin/chaos.rs`), each scenario also a test of the end-to-end suite
//! with [`Options::short`] (seconds-scale outages, fewer messages). [`SCENARIOS`] lists them.

pub mod agent;
pub mod brokers;
pub mod fixture;
pub mod scenarios;

use std::fmt::Write as _;
use std::time::Duration;

/// How long and how hard the scenarios push.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds-scale outages and fewer messages (the default suite's version).
    pub short: bool,
    /// The identity-provider outage: the longest time from the provider's recovery to every grant
    /// usable again that passes (`None`: only measured, not asserted).
    pub idp_recovery_bound: Option<Duration>,
    /// `store-failover`: `min_replicas_acked` of the probed store (`None`: 1, the Sentinel
    /// default, also set for the Cluster); 0 shows what the store did before it waited.
    pub store_min_replicas_acked: Option<u32>,
}

impl Options {
    /// The short version, with the recovery bound the default suite asserts.
    pub fn short() -> Self {
        Self {
            short: true,
            idp_recovery_bound: Some(SHORT_IDP_RECOVERY_BOUND),
            store_min_replicas_acked: None,
        }
    }

    /// The long version (ten-minute identity-provider outage, minute-long upstream outage).
    pub fn long() -> Self {
        Self {
            short: false,
            idp_recovery_bound: None,
            store_min_replicas_acked: None,
        }
    }

    /// `short` seconds in the short version, `long` otherwise.
    pub fn secs(&self, short: u64, long: u64) -> Duration {
        Duration::from_secs(if self.short { short } else { long })
    }

    /// `short` in the short version, `long` otherwise.
    pub fn count(&self, short: usize, long: usize) -> usize {
        if self.short { short } else { long }
    }
}

/// What the short version asserts for the identity-provider outage: every grant usable (ACTIVE
/// with an access token that has not expired) within this long after the provider answers again.
/// The short outage (15 s of 503, 15 s hanging) outlasts the 20-s access tokens, so every grant
/// needs a refresh after it. With the default backoff (first retry 30 s after a failure, doubling,
/// with jitter) a grant that failed during the outage is retried within about a minute of the
/// recovery; with a per-provider breaker it is seconds. The bound leaves room for two backoff
/// steps on a loaded machine.
pub const SHORT_IDP_RECOVERY_BOUND: Duration = Duration::from_secs(150);

/// The scenarios: name and what it does.
pub const SCENARIOS: [(&str, &str); 8] = [
    (
        "redis-restart",
        "two broker processes on standalone Redis (AOF): Redis SIGKILLed and restarted under \
         write and refresh load",
    ),
    (
        "sentinel-failover",
        "two broker processes on Sentinel (master + replica, min_replicas_acked 1): SENTINEL \
         FAILOVER, then the new master SIGKILLed, under write and refresh load",
    ),
    (
        "store-failover",
        "the store alone (chaos-store): Sentinel and Cluster masters failed over (forced and \
         SIGKILL) under a write loop",
    ),
    (
        "cluster-migration",
        "two broker processes on a Redis Cluster with replicas (min_replicas_acked 1): the \
         tenant's slot migrated to another master, then CLUSTER FAILOVER of its new master, \
         under write and refresh load",
    ),
    (
        "replica-kill",
        "two broker processes: one SIGKILLed while it polls device codes, and one while it \
         holds a refresh lease with the provider's answer in flight",
    ),
    (
        "agent-kill",
        "the agent SIGKILLed again and again during bursts of printer mail",
    ),
    (
        "upstream-faults",
        "the upstream answering 421 and 451, then gone, while the printer sends",
    ),
    (
        "idp-outage",
        "the identity provider answering 503, then hanging, while grants come due; default \
         settings",
    ),
];

/// What one scenario saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Acknowledged things that are gone (writes, messages, grants): must be 0.
    pub lost: usize,
    /// What was lost (the first few).
    pub lost_items: Vec<String>,
    /// Other promises broken (a bound exceeded, a grant dead): must be empty.
    pub failures: Vec<String>,
    /// Figures, in order: name and value.
    pub figures: Vec<(String, String)>,
}

impl Report {
    fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            ..Self::default()
        }
    }

    /// Adds a figure.
    pub fn figure(&mut self, name: &str, value: impl std::fmt::Display) {
        self.figures.push((name.to_owned(), value.to_string()));
    }

    /// Records lost items.
    pub fn lose(&mut self, items: impl IntoIterator<Item = String>) {
        for item in items {
            self.lost += 1;
            if self.lost_items.len() < 10 {
                self.lost_items.push(item);
            }
        }
    }

    /// Records a broken promise.
    pub fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }

    /// Nothing lost, nothing broken.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.failures.is_empty()
    }

    /// One machine-readable line: `chaos scenario=… result=pass|FAIL lost=N key=value …`
    /// (values without spaces: spaces become `_`).
    pub fn summary_line(&self) -> String {
        let mut line = format!(
            "chaos scenario={} result={} lost={}",
            self.scenario,
            if self.passed() { "pass" } else { "FAIL" },
            self.lost
        );
        for (name, value) in &self.figures {
            let _ = write!(line, " {}={}", name, value.replace(' ', "_"));
        }
        if !self.failures.is_empty() {
            let _ = write!(line, " failures={}", self.failures.len());
        }
        line
    }
}

/// The human table of several reports: one block per scenario.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    let width = reports
        .iter()
        .flat_map(|r| r.figures.iter().map(|(n, _)| n.len()))
        .max()
        .unwrap_or(10)
        .max(10);
    for report in reports {
        let _ = writeln!(
            out,
            "{:<20} {}  lost {}",
            report.scenario,
            if report.passed() { "PASS" } else { "FAIL" },
            report.lost
        );
        for (name, value) in &report.figures {
            let _ = writeln!(out, "    {name:<width$}  {value}");
        }
        for item in &report.lost_items {
            let _ = writeln!(out, "    LOST: {item}");
        }
        for failure in &report.failures {
            let _ = writeln!(out, "    FAILED: {failure}");
        }
    }
    out
}

/// Runs the scenario `name`. An error means the scenario could not run (setup failed), not that
/// something was lost.
pub async fn run(name: &str, options: &Options) -> anyhow::Result<Report> {
    let mut report = Report::new(name);
    let started = std::time::Instant::now();
    match name {
        "redis-restart" => scenarios::redis_restart(options, &mut report).await?,
        "sentinel-failover" => scenarios::sentinel_failover(options, &mut report).await?,
        "store-failover" => scenarios::store_failover(options, &mut report).await?,
        "cluster-migration" => scenarios::cluster_migration(options, &mut report).await?,
        "replica-kill" => scenarios::replica_kill(options, &mut report).await?,
        "agent-kill" => agent::agent_kill(options, &mut report).await?,
        "upstream-faults" => agent::upstream_faults(options, &mut report).await?,
        "idp-outage" => scenarios::idp_outage(options, &mut report).await?,
        other => {
            let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
            anyhow::bail!("unknown scenario `{other}` (one of: {})", names.join(", "));
        }
    }
    report.figure("scenario_seconds", started.elapsed().as_secs());
    Ok(report)
}

/// `1.234s`.
pub fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}
