//! The agent's composition root: [`run`] builds every part of a running agent from the local
//! settings — identity and broker link, spool, maildrop, token cache, status book, device
//! registry, ingress (SMTP and POP3), delivery worker, fetch scheduler, connection tests, status
//! stream, certificate renewal, the metrics listener — wires them together, starts them, and
//! stops them in order. The one [`AgentMetrics`] handle is made here and given to every part
//! that counts something; [`Health`] learns here which listeners are up. Nothing else in the
//! crate uses this module; the parts it assembles know nothing of it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use super::broker::{self, BrokerLink};
use super::clock::{Clock, SystemClock};
use super::devices::{DeviceRegistry, FleetIngress, UpstreamDeliveries};
use super::fetcher;
use super::probing;
use super::reporter;
use super::status::StatusBook;
use super::tokens::{self, TokenCache};
use super::worker::{DeliveryWorker, WorkerSettings};
use super::{AgentRuntime, VERSION};
use crate::config::AgentSettings;
use crate::identity;
use crate::ingress::IngressServer;
use crate::metrics::{AgentMetrics, Health};
use crate::spool::Spool;

/// The connection tester, re-exported where it used to live.
pub use super::probing::ProbeTester;

/// Ingress settings from the local configuration: STARTTLS with `ingress_tls_cert_file` /
/// `ingress_tls_key_file` when both are set, required before AUTH and MAIL with
/// `ingress_require_tls`; sessions, timeouts, message memory and login throttling from
/// `[ingress_limits]`.
pub fn ingress_config(
    settings: &crate::config::AgentSettings,
) -> anyhow::Result<crate::ingress::IngressConfig> {
    let limits = &settings.ingress_limits;
    let mut config = crate::ingress::IngressConfig {
        limits: limits.sessions,
        command_timeout: limits.idle_timeout,
        message_memory: limits.message_memory,
        max_message_size: limits.max_message_size,
        login_guard: Arc::new(crate::ingress::LoginGuard::new(limits.logins)),
        ..crate::ingress::IngressConfig::default()
    };
    if let Some((cert, key)) = &settings.ingress_tls {
        config.tls = Some(
            crate::ingress::IngressTls::from_pem_files(cert, key).map_err(|e| {
                anyhow::anyhow!(
                    "ingress_tls_cert_file {} / ingress_tls_key_file {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
        );
    }
    config.require_tls = settings.ingress_require_tls;
    Ok(config)
}

/// The local POP3 server follows the SMTP ingress: the same certificate for `STLS`, the same
/// rule on whether devices must start TLS before they log in, the same session caps, the
/// same [`crate::ingress::LoginGuard`] (failures on one count on the other) and metrics. Its
/// idle timeout is the default (600 s, RFC 1939's minimum autologout) until [`pop3_limits`]
/// sets it.
pub fn pop3_config(
    ingress: &crate::ingress::IngressConfig,
) -> crate::pop3_server::Pop3ServerConfig {
    crate::pop3_server::Pop3ServerConfig {
        hostname: ingress.hostname.clone(),
        tls: ingress
            .tls
            .as_ref()
            .map(crate::ingress::IngressTls::server_config),
        require_tls: ingress.require_tls,
        limits: ingress.limits,
        login_guard: Arc::clone(&ingress.login_guard),
        metrics: ingress.metrics.clone(),
        ..crate::pop3_server::Pop3ServerConfig::default()
    }
}

/// The POP3 settings of `[ingress_limits]` applied to `config` (the idle timeout).
pub fn pop3_limits(
    mut config: crate::pop3_server::Pop3ServerConfig,
    settings: &crate::config::AgentSettings,
) -> crate::pop3_server::Pop3ServerConfig {
    config.command_timeout = settings.ingress_limits.pop3_idle_timeout;
    config
}

/// Directory (in the state directory) of the maildrop the local POP3 server serves.
pub const MAILDROP_DIR: &str = "maildrop";

/// Opens the maildrop (`<state_dir>/maildrop`) the fetch jobs fill and the local POP3 server
/// serves.
pub async fn open_maildrop(
    state_dir: &std::path::Path,
) -> anyhow::Result<crate::maildrop::Maildrop> {
    let dir = state_dir.join(MAILDROP_DIR);
    let root = dir.clone();
    tokio::task::spawn_blocking(move || crate::maildrop::Maildrop::open(root))
        .await
        .map_err(|e| anyhow::anyhow!("opening the maildrop: {e}"))?
        .map_err(|e| anyhow::anyhow!("maildrop {}: {e}", dir.display()))
}

/// Name of the SMTP ingress in `/healthz` answers.
const SMTP_LISTENER: &str = "SMTP ingress";
/// Name of the local POP3 server in `/healthz` answers.
const POP3_LISTENER: &str = "POP3 server";

/// The local POP3 server: devices fetch the mail the fetch jobs stored in `maildrop`, logging in
/// with their local credentials. Stops when `stop` turns true; `health` learns when it listens
/// and when it stopped. (The fetch jobs that fill the maildrop are started separately, see
/// [`super::fetcher`].)
pub async fn start_pop3(
    addr: std::net::SocketAddr,
    config: crate::pop3_server::Pop3ServerConfig,
    runtime: &Arc<AgentRuntime>,
    maildrop: crate::maildrop::Maildrop,
    mut stop: tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
    health: &Health,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("pop3_listen {addr}: cannot listen: {e}"))?;
    tracing::info!(pop3 = %addr, "POP3 server listening");
    health.listener_up(POP3_LISTENER);
    let auth = Arc::clone(&runtime.ingress);
    let health = health.clone();
    tasks.spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let result = crate::pop3_server::Pop3Server::serve(
            listener,
            config,
            auth,
            Arc::new(maildrop),
            stopped,
        )
        .await;
        health.listener_failed(POP3_LISTENER, ended(result));
    });
    Ok(())
}

/// What `/healthz` says of a listener whose serve loop returned `result`.
fn ended(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "stopped".to_owned(),
        Err(error) => {
            tracing::error!(%error, "a listener failed");
            format!("stopped: {error}")
        }
    }
}

/// Binds the metrics listener (`[metrics] listen`, if set) and serves `/metrics` and `/healthz`
/// on it until `stop` turns true.
async fn start_metrics(
    settings: &AgentSettings,
    metrics: &AgentMetrics,
    health: &Health,
    mut stop: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let Some(addr) = settings.metrics.listen else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics.listen {addr}: cannot listen"))?;
    tracing::info!(metrics = %addr, "metrics listening (GET /metrics, GET /healthz)");
    let (limits, metrics, health) = (settings.metrics.limits, metrics.clone(), health.clone());
    tasks.spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(error) =
            crate::metrics::server::serve(listener, limits, metrics, health, stopped).await
        {
            tracing::error!(%error, "the metrics listener failed");
        }
    });
    Ok(())
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
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let metrics = AgentMetrics::new(Some(Arc::clone(&spool)));
    let health = Health::new(&settings.spool_dir);
    health.expect_listener(SMTP_LISTENER);
    if settings.pop3_listen.is_some() {
        health.expect_listener(POP3_LISTENER);
    }
    // First, so /healthz tells why the agent is not ready while it waits for the broker.
    start_metrics(&settings, &metrics, &health, stop_rx.clone(), &mut tasks).await?;

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let maildrop = open_maildrop(&settings.state_dir).await?;
    let book = Arc::new(StatusBook::open(&settings.state_dir));
    let tokens = Arc::new(
        TokenCache::new(
            Arc::clone(&link) as Arc<dyn tokens::TokenSource>,
            Arc::clone(&clock),
            settings.token_renew_margin,
        )
        .with_metrics(metrics.clone()),
    );
    let wake = Arc::new(Notify::new());
    let registry = Arc::new(DeviceRegistry::new(Arc::new(UpstreamDeliveries)));
    let ingress = Arc::new(
        FleetIngress::with_passwords(
            Arc::clone(&spool),
            Arc::clone(&wake),
            Arc::new(crate::ingress::PasswordChecker::new(
                settings.ingress_limits.passwords,
            )),
        )
        .with_metrics(metrics.clone()),
    );
    let rt = Arc::new(AgentRuntime {
        settings: settings.clone(),
        spool: Arc::clone(&spool),
        registry: Arc::clone(&registry),
        ingress: Arc::clone(&ingress),
        tokens: Arc::clone(&tokens),
        book: Arc::clone(&book),
        link: Arc::clone(&link),
        tester: probing::connection_tester()
            .map(|tester| probing::CountedTests::wrap(tester, metrics.clone())),
        maildrop: Some(maildrop.clone()),
        metrics: metrics.clone(),
        sequence: AtomicU64::new(0),
    });

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

    let worker = Arc::new(
        DeliveryWorker::new(
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
        )
        .with_metrics(metrics.clone()),
    );
    match worker.recover_markers() {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            count = n,
            "messages were being sent when the agent stopped; counted as possible duplicates"
        ),
        Err(error) => tracing::warn!(%error, "reading the sending markers failed"),
    }

    let ingress_config = crate::ingress::IngressConfig {
        metrics: metrics.clone(),
        ..ingress_config(&settings)?
    };
    let pop3_config = pop3_limits(pop3_config(&ingress_config), &settings);
    let listener = TcpListener::bind(settings.smtp_listen)
        .await
        .with_context(|| format!("smtp_listen {}: cannot listen", settings.smtp_listen))?;
    tracing::info!(smtp = %settings.smtp_listen, "SMTP ingress listening");
    health.listener_up(SMTP_LISTENER);
    {
        let ingress = Arc::clone(&ingress);
        let config = ingress_config;
        let mut stop = stop_rx.clone();
        let health = health.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let result = IngressServer::serve(listener, config, ingress, stopped).await;
            health.listener_failed(SMTP_LISTENER, ended(result));
        });
    }
    if let Some(addr) = settings.pop3_listen {
        start_pop3(
            addr,
            pop3_config,
            &rt,
            maildrop.clone(),
            stop_rx.clone(),
            &mut tasks,
            &health,
        )
        .await?;
    }
    {
        let scheduler = Arc::new(
            fetcher::FetchScheduler::new(
                Arc::clone(&registry),
                Arc::clone(&tokens),
                Arc::clone(&book),
                Arc::clone(&clock),
                Arc::new(fetcher::MaildropFetcher::new(maildrop.clone())),
                fetcher::FetchSchedulerSettings {
                    retry_base: settings.retry_base,
                    ..fetcher::FetchSchedulerSettings::default()
                },
            )
            .with_metrics(metrics.clone()),
        );
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
    health.stopping();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pop3_server_follows_the_ingress_tls_settings() {
        let plain = crate::ingress::IngressConfig::default();
        let pop3 = pop3_config(&plain);
        assert!(pop3.tls.is_none());
        assert!(!pop3.require_tls);

        let Ok(tls) = crate::ingress::IngressTls::self_signed(&["127.0.0.1".to_owned()]) else {
            panic!("self-signed certificate");
        };
        let strict = crate::ingress::IngressConfig {
            tls: Some(tls.clone()),
            require_tls: true,
            ..crate::ingress::IngressConfig::default()
        };
        let pop3 = pop3_config(&strict);
        assert!(pop3.require_tls);
        let Some(config) = pop3.tls else {
            panic!("no STLS configuration")
        };
        // The very same rustls configuration (certificate) as the SMTP ingress.
        assert!(Arc::ptr_eq(&config, &tls.server_config()));
    }
}
