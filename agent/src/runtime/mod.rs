//! `tokenfleet-agent run`: the running agent — the shared state of a running agent
//! ([`AgentRuntime`]: configuration, commands from the broker, status reports) and its parts, in
//! dependency order (each uses only those above it):
//!
//! - [`clock`]: the source of "now";
//! - [`profiles`]: the broker's device profiles turned into settings and upstreams (pure);
//! - [`tokens`]: the in-memory token cache; [`broker`]: the mTLS link to the broker
//!   (configuration, tokens, status stream), with the client certificate renewed in the
//!   background; [`status`]: per-device health;
//! - [`devices`]: the device configuration from the broker, each device's upstream and its
//!   ingress credentials;
//! - [`worker`]: the delivery worker draining the spool; [`fetcher`]: the fetch jobs filling the
//!   local maildrop from each device's upstream mailbox; [`probing`]: connection tests (the
//!   `TestConnection` command and periodic tests);
//! - [`reporter`]: the status stream;
//! - [`wiring`]: the composition root — builds every part from the local settings, starts the
//!   listeners and tasks ([`wiring::run`]), and is used by nothing else in the crate.

pub mod broker;
pub mod clock;
pub mod devices;
pub mod fetcher;
pub mod mailbox_rate;
pub mod probing;
pub mod profiles;
pub mod reporter;
pub mod status;
pub mod tokens;
pub mod wiring;
pub mod worker;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokenfleet_proto::v1 as pb;

use crate::config::AgentSettings;
use crate::spool::Spool;
use broker::BrokerLink;
use devices::{DeviceRegistry, FleetIngress};
use status::StatusBook;
use tokens::{TokenCache, timestamp};

pub use clock::{Clock, SystemClock};
pub use probing::ConnectionTester;

/// File (in the state directory) with the last status report, as text, for operators and tests.
pub const LAST_REPORT_FILE: &str = "last-report.txt";

/// The shared parts of a running agent.
pub struct AgentRuntime {
    /// Local configuration.
    pub settings: AgentSettings,
    /// The spool.
    pub spool: Arc<Spool>,
    /// Devices from the broker.
    pub registry: Arc<DeviceRegistry>,
    /// The ingress handler.
    pub ingress: Arc<FleetIngress>,
    /// Tokens.
    pub tokens: Arc<TokenCache>,
    /// Per-device status.
    pub book: Arc<StatusBook>,
    /// The broker.
    pub link: Arc<BrokerLink>,
    /// Connection tests, when this build has them.
    pub tester: Option<Arc<dyn ConnectionTester>>,
    /// The local maildrop (for the depth in status reports).
    pub maildrop: Option<crate::maildrop::Maildrop>,
    /// The agent's metrics (the tester counts its own verdicts; this counts the others).
    pub metrics: crate::metrics::AgentMetrics,
    /// Numbers the status reports.
    pub(crate) sequence: AtomicU64,
}

impl std::fmt::Debug for AgentRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRuntime")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

impl AgentRuntime {
    /// Installs a configuration from the broker (or the cache): devices, upstreams, ingress.
    pub fn apply_config(&self, config: pb::AgentConfig) {
        let problems = self.ingress.apply(&config.devices);
        for (device, problem) in problems {
            tracing::warn!(%device, %problem, "ignoring a bad ingress setting");
        }
        let revision = config.revision.clone();
        let count = config.devices.len();
        for (device, why) in self.registry.apply(config) {
            tracing::warn!(%device, reason = %why, "device has no usable upstream; its mail stays queued");
        }
        tracing::info!(%revision, devices = count, "agent configuration applied");
    }

    /// Fetches and applies the configuration; the answer describes what happened.
    pub async fn reload(&self) -> Result<String, String> {
        match self.link.fetch_config().await {
            Ok(config) => {
                let detail = format!(
                    "configuration revision {} applied ({} device(s))",
                    config.revision,
                    config.devices.len()
                );
                self.apply_config(config);
                Ok(detail)
            }
            Err(status) => Err(format!(
                "fetching the configuration failed: {}",
                broker::status_text(&status)
            )),
        }
    }

    /// Seconds between reports: the local override, else the broker's, else 30 s.
    pub fn heartbeat(&self) -> Duration {
        self.settings.heartbeat.unwrap_or_else(|| {
            match self.registry.current().config.heartbeat_seconds {
                0 => reporter::DEFAULT_HEARTBEAT,
                s => Duration::from_secs(u64::from(s)),
            }
        })
    }

    /// Whether any configured device's health differs from the last report.
    pub fn health_changed(&self) -> bool {
        self.registry
            .current()
            .devices
            .keys()
            .any(|d| self.book.health_differs(d, &self.tokens))
    }

    /// Answers a command from the broker.
    pub async fn handle_command(&self, command: pb::AgentCommand) -> pb::CommandResult {
        use pb::agent_command::Command;
        let mut result = pb::CommandResult {
            command_id: command.id.clone(),
            ..Default::default()
        };
        match command.command {
            Some(Command::ReloadConfig(_)) => match self.reload().await {
                Ok(detail) => {
                    result.ok = true;
                    result.detail = detail;
                }
                Err(detail) => result.detail = detail,
            },
            Some(Command::DropToken(drop)) => {
                let n = self.tokens.drop_mailbox(&drop.mailbox);
                result.ok = true;
                result.detail = if drop.mailbox.is_empty() {
                    format!("dropped {n} cached token(s)")
                } else {
                    format!("dropped {n} cached token(s) of mailbox {}", drop.mailbox)
                };
            }
            Some(Command::TestConnection(test)) => {
                match (&self.tester, self.registry.device(&test.device)) {
                    (None, _) => result.detail = probing::NO_CONNECTION_TESTS.to_owned(),
                    (Some(_), None) => {
                        // A verdict of its own: the device may be new or just moved here, and
                        // the configuration with it has not been applied yet.
                        let summary = format!(
                            "device `{}` is not in the configuration this agent runs (revision {})",
                            test.device,
                            self.registry.current().config.revision
                        );
                        result.detail.clone_from(&summary);
                        self.metrics.connection_test(
                            pb::ConnectionTarget::try_from(test.target).unwrap_or_default(),
                            pb::ConnectionVerdict::DeviceNotLoaded,
                        );
                        result.connection_test = Some(pb::ConnectionTestResult {
                            device: test.device.clone(),
                            target: test.target,
                            verdict: pb::ConnectionVerdict::DeviceNotLoaded as i32,
                            summary,
                            fix: "check that the device names this agent; the broker sends changes to a connected agent within a second, so retry the test".to_owned(),
                            time: Some(timestamp(SystemTime::now())),
                            ..Default::default()
                        });
                    }
                    (Some(tester), Some(device)) => {
                        let outcome = tester.test(&device, &test, &self.tokens).await;
                        self.book
                            .record_connection_test(&test.device, outcome.clone());
                        result.ok = outcome.verdict == pb::ConnectionVerdict::Ok as i32;
                        result.detail = outcome.summary.clone();
                        result.connection_test = Some(outcome);
                    }
                }
            }
            None => result.detail = "unknown command (newer broker?)".to_owned(),
        }
        tracing::info!(id = %result.command_id, ok = result.ok, detail = %result.detail, "command answered");
        result
    }

    /// A status report of every device now (also written to [`LAST_REPORT_FILE`]).
    pub async fn report(&self, command_result: Option<pb::CommandResult>) -> pb::AgentReport {
        let now = SystemTime::now();
        let spool = Arc::clone(&self.spool);
        let set = self.registry.current();
        let maildrop = self.maildrop.clone();
        let names: Vec<String> = set.devices.keys().cloned().collect();
        let (queues, depths) = tokio::task::spawn_blocking(move || {
            let depths: Vec<(String, usize)> = maildrop
                .map(|m| {
                    names
                        .iter()
                        .filter_map(|n| m.stat(n).ok().map(|(count, _)| (n.clone(), count)))
                        .collect()
                })
                .unwrap_or_default();
            (queue_by_device(&spool, now), depths)
        })
        .await
        .unwrap_or_default();
        for (name, depth) in depths {
            self.book.set_maildrop_depth(&name, depth);
        }
        let mut devices = Vec::new();
        for name in set.devices.keys() {
            let queue = queues.get(name).copied().unwrap_or_default();
            devices.push(self.book.device_status(name, &self.tokens, queue, None));
        }
        for (name, queue) in &queues {
            if !set.devices.contains_key(name) {
                let problem = format!(
                    "device `{name}` is not in this agent's configuration; {} message(s) kept in the spool",
                    queue.0
                );
                devices.push(
                    self.book
                        .device_status(name, &self.tokens, *queue, Some(problem)),
                );
            }
        }
        let report = pb::AgentReport {
            time: Some(timestamp(now)),
            software_version: VERSION.to_owned(),
            sequence: self.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            config_revision: set.config.revision.clone(),
            devices,
            command_result,
        };
        let path = self.settings.state_dir.join(LAST_REPORT_FILE);
        if let Err(error) = write_private(&path, format!("{report:#?}\n").as_bytes()) {
            tracing::debug!(%error, "writing the last report file failed");
        }
        report
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Queue depth and oldest age per device (from the spool's in-memory index).
pub fn queue_by_device(spool: &Spool, now: SystemTime) -> BTreeMap<String, (usize, Duration)> {
    spool.queue_by_device(now)
}
