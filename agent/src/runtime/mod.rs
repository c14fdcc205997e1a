//! `tokenfleet-agent run`: the running agent. Ties the pieces together —
//!
//! - [`broker`]: the mTLS link to the broker (configuration, tokens, status stream), with the
//!   client certificate renewed in the background;
//! - [`devices`]: the device configuration from the broker, each device's upstream and its
//!   ingress credentials;
//! - [`tokens`]: the in-memory token cache;
//! - [`worker`]: the delivery worker draining the spool;
//! - [`fetcher`]: the fetch jobs filling the local maildrop from each device's upstream mailbox;
//! - [`probing`]: periodic connection tests, and the test of mail API send profiles;
//! - [`status`] and [`reporter`]: per-device health and the status stream;
//! - [`wiring`]: the places where separately built pieces (upstreams, connection tests, the local
//!   POP3 server) are plugged in.

pub mod broker;
pub mod devices;
pub mod fetcher;
pub mod probing;
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

use anyhow::Context as _;
use tokenfleet_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::config::AgentSettings;
use crate::identity;
use crate::ingress::IngressServer;
use crate::spool::Spool;
use broker::BrokerLink;
use devices::{DeviceEntry, DeviceRegistry, FleetIngress, UpstreamDeliveries};
use status::StatusBook;
use tokens::{TokenCache, timestamp};
use worker::{DeliveryWorker, WorkerSettings};

/// The source of "now" (a fixed or stepped clock in tests).
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// File (in the state directory) with the last status report, as text, for operators and tests.
pub const LAST_REPORT_FILE: &str = "last-report.txt";

/// Runs a connection test for a device (the `TestConnection` command).
#[async_trait::async_trait]
pub trait ConnectionTester: Send + Sync + 'static {
    /// Tests `device` as `command` asks, with tokens from `tokens`.
    async fn test(
        &self,
        device: &DeviceEntry,
        command: &pb::ConnectionTestCommand,
        tokens: &TokenCache,
    ) -> pb::ConnectionTestResult;
}

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
    sequence: AtomicU64,
}

impl std::fmt::Debug for AgentRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRuntime")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

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
                    (None, _) => result.detail = wiring::NO_CONNECTION_TESTS.to_owned(),
                    (Some(_), None) => {
                        result.detail =
                            format!("device `{}` is not hosted by this agent", test.device)
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

/// Runs the agent until `shutdown` completes: ingress, delivery worker, status stream, token and
/// certificate renewal. Returns when the ingress stopped and running deliveries finished (or the
/// grace period ended).
pub async fn run(
    settings: AgentSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    identity::ensure_private_dir(&settings.state_dir)?;
    let stored = identity::load(&settings.state_dir)?;
    let link = Arc::new(BrokerLink::new(
        &stored,
        settings.broker_url.clone(),
        &settings.state_dir,
    )?);
    let spool_dir = settings.spool_dir.clone();
    let spool_limits = settings.ingress_limits.spool;
    let spool = Arc::new(
        tokio::task::spawn_blocking(move || Spool::open_with(spool_dir, spool_limits))
            .await
            .context("opening the spool")??,
    );
    let recovery = spool.recovery();
    tracing::info!(
        spool = %settings.spool_dir.display(),
        queued = recovery.queued,
        removed_unacknowledged = recovery.removed_temp + recovery.removed_orphans,
        "spool opened"
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let maildrop = wiring::open_maildrop(&settings.state_dir).await?;
    let book = Arc::new(StatusBook::open(&settings.state_dir));
    let tokens = Arc::new(TokenCache::new(
        Arc::clone(&link) as Arc<dyn tokens::TokenSource>,
        Arc::clone(&clock),
        settings.token_renew_margin,
    ));
    let wake = Arc::new(Notify::new());
    let registry = Arc::new(DeviceRegistry::new(Arc::new(UpstreamDeliveries)));
    let ingress = Arc::new(FleetIngress::with_passwords(
        Arc::clone(&spool),
        Arc::clone(&wake),
        Arc::new(crate::ingress::PasswordChecker::new(
            settings.ingress_limits.passwords,
        )),
    ));
    let rt = Arc::new(AgentRuntime {
        settings: settings.clone(),
        spool: Arc::clone(&spool),
        registry: Arc::clone(&registry),
        ingress: Arc::clone(&ingress),
        tokens: Arc::clone(&tokens),
        book: Arc::clone(&book),
        link: Arc::clone(&link),
        tester: wiring::connection_tester(),
        maildrop: Some(maildrop.clone()),
        sequence: AtomicU64::new(0),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let have_config = match tokio::time::timeout(Duration::from_secs(15), link.fetch_config()).await
    {
        Ok(Ok(config)) => {
            rt.apply_config(config);
            true
        }
        failed => {
            let why = match failed {
                Ok(Err(status)) => broker::status_text(&status),
                _ => "no answer within 15 s".to_owned(),
            };
            match broker::load_cached_config(&settings.state_dir) {
                Some(config) => {
                    tracing::warn!(error = %why, revision = %config.revision, "the broker is unreachable; using the configuration cached in the state directory");
                    rt.apply_config(config);
                }
                None => {
                    tracing::warn!(error = %why, "the broker is unreachable and no configuration is cached; waiting for the broker (devices are refused until then)");
                }
            }
            false
        }
    };
    if !have_config {
        let rt = Arc::clone(&rt);
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let mut attempt = 0;
            loop {
                let wait = reporter::reconnect_delay(attempt);
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                match rt.reload().await {
                    Ok(detail) => {
                        tracing::info!(%detail, "configuration fetched from the broker");
                        return;
                    }
                    Err(detail) => tracing::debug!(%detail, "configuration still unavailable"),
                }
                attempt += 1;
            }
        });
    }

    let worker = Arc::new(DeliveryWorker::new(
        Arc::clone(&spool),
        &settings.spool_dir,
        Arc::clone(&registry),
        Arc::clone(&tokens),
        Arc::clone(&book),
        Arc::clone(&clock),
        WorkerSettings {
            concurrency: settings.delivery_concurrency,
            retry_base: settings.retry_base,
            retry_max: settings.retry_max,
            max_attempts: settings.max_attempts,
            max_age: settings.max_age,
            bounce: settings.bounce,
            poll_interval: Duration::from_millis(500),
        },
        Arc::clone(&wake),
    ));
    match worker.recover_markers() {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            count = n,
            "messages were being sent when the agent stopped; counted as possible duplicates"
        ),
        Err(error) => tracing::warn!(%error, "reading the sending markers failed"),
    }

    let ingress_config = wiring::ingress_config(&settings)?;
    let pop3_config = wiring::pop3_limits(wiring::pop3_config(&ingress_config), &settings);
    let listener = TcpListener::bind(settings.smtp_listen)
        .await
        .with_context(|| format!("smtp_listen {}: cannot listen", settings.smtp_listen))?;
    tracing::info!(smtp = %settings.smtp_listen, "SMTP ingress listening");
    {
        let ingress = Arc::clone(&ingress);
        let config = ingress_config;
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(error) = IngressServer::serve(listener, config, ingress, stopped).await {
                tracing::error!(%error, "the SMTP ingress failed");
            }
        });
    }
    if let Some(addr) = settings.pop3_listen {
        wiring::start_pop3(
            addr,
            pop3_config,
            &rt,
            maildrop.clone(),
            stop_rx.clone(),
            &mut tasks,
        )
        .await?;
    }
    {
        let scheduler = Arc::new(fetcher::FetchScheduler::new(
            Arc::clone(&registry),
            Arc::clone(&tokens),
            Arc::clone(&book),
            Arc::clone(&clock),
            Arc::new(fetcher::MaildropFetcher::new(maildrop.clone())),
            fetcher::FetchSchedulerSettings {
                retry_base: settings.retry_base,
                ..fetcher::FetchSchedulerSettings::default()
            },
        ));
        tasks.spawn(scheduler.run(stop_rx.clone()));
    }
    if let (Some(interval), Some(tester)) = (settings.connection_test_interval, rt.tester.clone()) {
        let periodic = Arc::new(probing::PeriodicTests::new(
            Arc::clone(&registry),
            Arc::clone(&tokens),
            Arc::clone(&book),
            tester,
            interval,
        ));
        tasks.spawn(periodic.run(stop_rx.clone()));
    }
    let worker_task = {
        let mut stop = stop_rx.clone();
        let grace = settings.shutdown_grace;
        tokio::spawn(async move {
            worker
                .run(
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                    grace,
                )
                .await;
        })
    };
    tasks.spawn(reporter::report_status(Arc::clone(&rt), stop_rx.clone()));
    {
        let tokens = Arc::clone(&tokens);
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => tokens.renew_due().await,
                }
            }
        });
    }
    {
        let link = Arc::clone(&link);
        let state_dir = settings.state_dir.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(error) =
                identity::keep_renewed(&state_dir, VERSION, |id| link.set_identity(id), stopped)
                    .await
            {
                tracing::error!(%error, "the agent certificate can no longer be renewed");
            }
        });
    }

    shutdown.await;
    tracing::info!("stopping: no new messages accepted; finishing running deliveries");
    let _ = stop_tx.send(true);
    let _ = worker_task.await;
    // Everything else stops promptly on the signal; do not wait past the grace period.
    let _ = tokio::time::timeout(settings.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}
