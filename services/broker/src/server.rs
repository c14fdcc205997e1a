//! Serving: opens the store and keyring ([`build_state`]), then runs the gRPC server (Admin,
//! TokenBroker, `grpc.health.v1.Health`, server reflection v1 and v1alpha) and the HTTP server
//! (health, readiness, metrics) on listeners the caller bound, until the shutdown future
//! completes; then drains both, bounded by `shutdown_grace_seconds` ([`run`], [`serve`]).
//! Both listeners apply the `[limits]` of the configuration: connection counts, HTTP/2 stream
//! and header limits, keep-alive, a per-call timeout on gRPC and a header-read timeout on HTTP/1
//! (see [`crate::listener`]).
//!
//! Taking bound listeners and a shutdown future lets tests run the broker in-process on
//! `127.0.0.1:0` and stop it deterministically.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokenfleet_domain::SystemClock;
use tokenfleet_store::Store;
use tokenfleet_store::embedded::EmbeddedStore;
use tokenfleet_store::redis_store::RedisStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{BrokerConfig, ConfigError, StoreConfig};
use crate::http::{HttpState, router};
use crate::listener::{GrpcTls, grpc_incoming, serve_http};
use crate::metrics::{GrpcMetricsLayer, Metrics};
use crate::state::BrokerState;

/// How often the background health check pings the store.
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(3);

/// How long one store ping may take before it counts as failed.
pub const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Names under which gRPC health reports the broker: the whole server and each service.
pub const HEALTH_SERVICES: [&str; 3] = [
    "",
    tokenfleet_proto::v1::admin_server::SERVICE_NAME,
    tokenfleet_proto::v1::token_broker_server::SERVICE_NAME,
];

/// Errors of starting or running the broker.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration does not allow starting (for example no sealing key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("opening the {backend} store: {error}")]
    Store {
        /// Log-safe description of the backend.
        backend: String,
        /// What failed.
        error: tokenfleet_store::StoreError,
    },
    /// The state directory could not be created.
    #[error("state directory {path}: {error}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        error: io::Error,
    },
    /// A listener could not be bound.
    #[error("binding the {listener} listener on {address}: {error}")]
    Bind {
        /// `grpc` or `http`.
        listener: &'static str,
        /// The configured address.
        address: SocketAddr,
        /// What failed.
        error: io::Error,
    },
    /// Reading a listener's address failed.
    #[error("reading the listener address: {0}")]
    ListenerAddress(io::Error),
    /// The reflection service could not be built from the descriptor sets.
    #[error("building the reflection service: {0}")]
    Reflection(String),
    /// TLS could not be set up with the configured certificate.
    #[error("TLS of the gRPC listener: {0}")]
    Tls(String),
    /// The agent CA could not be loaded or created.
    #[error(transparent)]
    Identity(crate::identity::IdentityError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(io::Error),
    /// A server task ended before shutdown was requested (or panicked).
    #[error("{0} server stopped unexpectedly")]
    Stopped(&'static str),
}

/// Creates `path` (and missing parents) with mode 0700 if it does not exist yet.
pub fn ensure_private_dir(path: &Path) -> Result<(), ServeError> {
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|error| ServeError::StateDir {
            path: path.to_path_buf(),
            error,
        })
}

/// Opens the configured store.
pub async fn open_store(config: &BrokerConfig) -> Result<Arc<dyn Store>, ServeError> {
    let backend = config.store.describe();
    let store: Arc<dyn Store> = match &config.store {
        StoreConfig::Embedded { path } => {
            if path.starts_with(&config.state_dir) {
                ensure_private_dir(&config.state_dir)?;
            }
            let store = EmbeddedStore::open(path)
                .await
                .map_err(|error| ServeError::Store { backend, error })?;
            Arc::new(store)
        }
        StoreConfig::Redis(redis) => {
            let store = RedisStore::connect(redis)
                .await
                .map_err(|error| ServeError::Store { backend, error })?;
            Arc::new(store)
        }
    };
    if config.tracing.otlp_endpoint.is_some() {
        let backend = match &config.store {
            StoreConfig::Embedded { .. } => "embedded",
            StoreConfig::Redis(_) => "redis",
        };
        return Ok(crate::tracing_store::traced(store, backend));
    }
    Ok(store)
}

/// Opens the store and takes the keyring: everything the services share. Fails with
/// [`ConfigError::NoSealingKey`] when no sealing key is configured.
pub async fn build_state(config: &BrokerConfig) -> Result<BrokerState, ServeError> {
    let keyring = config.require_keyring()?;
    let store = open_store(config).await?;
    crate::audit::configure(config.audit);
    Ok(BrokerState {
        store,
        keyring,
        clock: Arc::new(SystemClock),
    })
}

/// Binds the configured gRPC and HTTP listeners.
pub async fn bind(config: &BrokerConfig) -> Result<(TcpListener, TcpListener), ServeError> {
    let grpc = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|error| ServeError::Bind {
            listener: "grpc",
            address: config.grpc_listen,
            error,
        })?;
    let http = TcpListener::bind(config.http_listen)
        .await
        .map_err(|error| ServeError::Bind {
            listener: "http",
            address: config.http_listen,
            error,
        })?;
    Ok((grpc, http))
}

/// Builds the state and serves until `shutdown` completes; see [`serve`].
pub async fn run(
    config: BrokerConfig,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let state = build_state(&config).await?;
    serve(config, state, grpc, http, shutdown).await
}

/// Serves gRPC on `grpc` and HTTP on `http` with `state` until `shutdown` completes, then stops
/// accepting, lets in-flight requests finish for up to `config.shutdown_grace` and returns.
/// Returns an error when a server fails before that.
pub async fn serve(
    config: BrokerConfig,
    state: BrokerState,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    // The composition root of the metrics: one registry, whose core handle goes to the token
    // service, the alerter and (here, once) the store decorator every component then uses.
    let metrics = Metrics::with_tenant_labels(config.metrics.per_tenant_labels);
    let state = BrokerState {
        store: tokenfleet_core::metrics::TimedStore::wrap(
            state.store.clone(),
            config.store.backend_label(),
            metrics.core().clone(),
        ),
        ..state
    };
    metrics
        .inventory()
        .set_heartbeat(config.agents.heartbeat_seconds);
    let (grpc_builder, identity, grpc_tls) = grpc_tls(&config, &state).await?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tokenfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tokenfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let grpc_addr = grpc.local_addr().map_err(ServeError::ListenerAddress)?;
    let http_addr = http.local_addr().map_err(ServeError::ListenerAddress)?;

    // One token service per replica: the admin RPCs and the refresh scheduler share its
    // in-process single flight and provider clients.
    let tokens = crate::tokens::lifecycle::TokenService::new(state.clone(), config.tokens.clone())
        .with_metrics(metrics.core().clone());
    // Alerts (when configured) about mailboxes that need a person, delivered in the background.
    let alerter = crate::alerts::Alerter::for_config(&state, &config.alerts)
        .map_err(|e| {
            ServeError::Config(ConfigError::Invalid {
                field: e.field,
                problem: e.problem,
            })
        })?
        .map(|alerter| alerter.with_metrics(metrics.core().clone()));
    let tokens = match &alerter {
        Some(alerter) => tokens.with_alerts(alerter.clone()),
        None => tokens,
    };
    // One admin service for the gRPC API and the web console: the same operations.
    let admin_service = crate::admin::AdminService::new(state.clone())
        .with_consent_settings(crate::admin::ConsentSettings {
            public_url: config.public_url.clone(),
        })
        .with_token_service(tokens.clone())
        .with_provider_policy(config.providers.clone())
        .with_call_rate(config.admin_call_rate);
    let grpc_server = grpc_builder
        // Outermost: the request span (continuing the caller's traceparent) covers the rest.
        .layer(tower::util::option_layer(
            config
                .tracing
                .otlp_endpoint
                .is_some()
                .then_some(tokenfleet_telemetry::GrpcTraceLayer),
        ))
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        // Inside the metrics layer, so they count the rewritten code.
        .layer(crate::malformed::MalformedRequestLayer)
        // Which connections without a client certificate wait (no proven call in flight).
        .layer(crate::listener::AnonymousCallsLayer)
        .add_service(health_service)
        .add_service(tokenfleet_proto::v1::admin_server::AdminServer::new(
            admin_service.clone(),
        ))
        .add_service(
            tokenfleet_proto::v1::token_broker_server::TokenBrokerServer::new(
                crate::token_broker::TokenBrokerService::new(
                    state.clone(),
                    identity,
                    tokens.clone(),
                )
                .with_issue_rate(config.agents.issue_rate)
                .with_auth_failures(admin_service.auth_failures())
                .with_fleet_settings(
                    crate::fleet::FleetSettings::new(config.agents.heartbeat_seconds)
                        .with_shutdown(stop_rx.clone()),
                )
                .with_public_url(config.public_url.clone()),
            ),
        )
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            grpc_incoming(grpc, &config.limits, grpc_tls, &metrics),
            stopped(stop_rx.clone()),
        );

    let http_router = router(HttpState {
        store: state.store.clone(),
        metrics: metrics.clone(),
        broker: state.clone(),
    })
    .merge(crate::console::router(crate::console::ConsoleState::new(
        admin_service,
        metrics.clone(),
    )));
    let http_server = serve_http(
        http,
        http_router,
        config.limits.clone(),
        config.trusted_proxies.clone(),
        metrics.clone(),
        stopped(stop_rx.clone()),
    );

    let mut servers = JoinSet::new();
    servers.spawn(async move { ("gRPC", grpc_server.await.map_err(ServeError::Grpc)) });
    servers.spawn(async move { ("HTTP", http_server.await.map_err(ServeError::Http)) });
    tracing::info!(address = %grpc_addr, "gRPC listening (tokenfleet.v1.Admin, tokenfleet.v1.TokenBroker, health, reflection)");
    tracing::info!(address = %http_addr, "HTTP listening (/healthz, /readyz, /metrics, /oauth/callback, /console/, /consent/)");
    tracing::info!(store = %config.store.describe(), seal_key = %state.keyring.current_key_id(), "broker ready");

    // Every replica polls pending device codes; store leases keep it to one poller per code.
    let mut poller = crate::tokens::device_poller::DevicePoller::new(state.clone());
    if let Some(alerter) = &alerter {
        poller = poller.with_alerts(alerter.clone());
    }
    let poller_task = tokio::spawn(poller.run(stop_rx.clone()));
    let alerts_task = alerter.map(|a| a.spawn_worker(tokens.clone(), stopped(stop_rx.clone())));
    // Every replica refreshes due mailboxes; per-mailbox store leases keep it to one at a time.
    let scheduler_task =
        crate::tokens::scheduler::RefreshScheduler::spawn(tokens, stopped(stop_rx.clone()));
    // Every replica removes agent commands and answers nobody will read (conditional deletes).
    let sweep_task = crate::fleet::housekeeping::spawn(state.clone(), stop_rx.clone());
    // Fleet gauges for /metrics, recomputed in the background (scrapes read the snapshot).
    let inventory_task = crate::inventory::spawn(
        state.clone(),
        metrics.inventory().clone(),
        config.metrics.inventory_interval,
        stop_rx.clone(),
    );
    let health_task = tokio::spawn(watch_store_health(
        state.store.clone(),
        health.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));

    let mut failure = None;
    tokio::select! {
        () = shutdown => {
            tracing::info!(
                grace_seconds = config.shutdown_grace.as_secs(),
                "shutdown requested: draining in-flight requests"
            );
        }
        Some(ended) = servers.join_next() => {
            let error = match flatten(ended) {
                (name, Ok(())) => ServeError::Stopped(name),
                (_, Err(error)) => error,
            };
            tracing::error!(%error, "a server stopped unexpectedly; shutting down");
            failure = Some(error);
        }
    }

    set_health(&health, ServingStatus::NotServing).await;
    // Receivers may all be gone already when both servers ended; nothing to tell then.
    let _ = stop_tx.send(true);
    let drain = async {
        let mut first = None;
        while let Some(ended) = servers.join_next().await {
            if let (_, Err(error)) = flatten(ended) {
                first.get_or_insert(error);
            }
        }
        first
    };
    match tokio::time::timeout(config.shutdown_grace, drain).await {
        Ok(error) => {
            if failure.is_none() {
                failure = error;
            }
        }
        Err(_) => {
            tracing::warn!(
                grace_seconds = config.shutdown_grace.as_secs(),
                "requests still running after the shutdown grace period; closing their connections"
            );
            servers.abort_all();
        }
    }
    health_task.abort();
    poller_task.abort();
    scheduler_task.abort();
    sweep_task.abort();
    inventory_task.abort();
    // Wait until the aborted tasks are gone: they hold the state (and so the store); a caller that
    // reopens the embedded store right after `serve` returns must not find it still open.
    let _ = tokio::join!(
        health_task,
        poller_task,
        scheduler_task,
        sweep_task,
        inventory_task
    );
    if let Some(task) = alerts_task {
        task.abort();
        let _ = task.await;
    }
    match failure {
        Some(error) => Err(error),
        None => {
            tracing::info!("broker stopped");
            Ok(())
        }
    }
}

/// How long a client may take for the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC server builder, the agent identity the `TokenBroker` service works with and the
/// listener's TLS (both `None` without `[tls]`). The TLS handshake is done by the listener
/// ([`grpc_incoming`]), which counts connections without a client certificate. Client
/// certificates are optional at the TLS layer, so admin clients (API keys) need none; when one
/// is presented it must chain to the agent CA, and `TokenBroker` requires one on every call but
/// `Enroll`.
async fn grpc_tls(
    config: &BrokerConfig,
    state: &BrokerState,
) -> Result<
    (
        tonic::transport::Server,
        Option<crate::identity::AgentIdentity>,
        Option<GrpcTls>,
    ),
    ServeError,
> {
    let limits = &config.limits;
    let builder = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.grpc_max_concurrent_streams)
        .http2_max_header_list_size(limits.grpc_max_header_list_bytes)
        .http2_keepalive_interval(Some(limits.grpc_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.grpc_keepalive_timeout))
        .timeout(limits.grpc_request_timeout);
    tracing::info!(
        max_connections = limits.grpc_max_connections,
        max_concurrent_streams = limits.grpc_max_concurrent_streams,
        max_header_list_bytes = limits.grpc_max_header_list_bytes,
        "gRPC listener limits"
    );
    let Some(tls) = &config.tls else {
        tracing::warn!(
            "gRPC without TLS (`[tls]` is not configured): agents cannot enroll or authenticate"
        );
        return Ok((builder, None, None));
    };
    // ring is the only provider compiled in; installing it explicitly keeps that so even if
    // another dependency ever enables a second one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = match &config.agents.ca {
        Some(ca) => ca.clone(),
        None => Arc::new(
            crate::identity::AgentCa::load_or_create(state)
                .await
                .map_err(ServeError::Identity)?,
        ),
    };
    let server_config = grpc_server_config(&tls.certified, &ca)
        .map_err(|e| ServeError::Tls(format!("{} ({e})", tls.cert_file.display())))?;
    tracing::info!(
        certificate = %tls.cert_file.display(),
        agent_ca_expires = %ca.not_after(),
        agent_certificate_lifetime_seconds = config.agents.certificate_lifetime.as_secs(),
        "gRPC TLS on (client certificates of the agent CA accepted)"
    );
    Ok((
        builder,
        Some(crate::identity::AgentIdentity {
            ca,
            certificate_lifetime: config.agents.certificate_lifetime,
        }),
        Some(GrpcTls {
            config: server_config,
            handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
        }),
    ))
}

/// The gRPC listener's rustls configuration: the server's certificate and key (read and checked
/// with the configuration), client certificates optional and, when presented, verified against
/// the agent CA, and HTTP/2 offered by ALPN — what tonic's `ServerTlsConfig` built before the
/// listener did the handshake itself.
fn grpc_server_config(
    certified: &Arc<rustls::sign::CertifiedKey>,
    ca: &crate::identity::AgentCa,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            ca.cert_der().to_vec(),
        ))
        .map_err(|e| format!("the agent CA certificate: {e}"))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("the agent CA as client certificate verifier: {e}"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::clone(
            certified,
        ))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

type ServerEnd = (&'static str, Result<(), ServeError>);

fn flatten(ended: Result<ServerEnd, tokio::task::JoinError>) -> ServerEnd {
    ended.unwrap_or_else(|join| {
        tracing::error!(error = %join, "server task failed");
        ("gRPC or HTTP", Err(ServeError::Stopped("gRPC or HTTP")))
    })
}

/// Completes once the stop flag is set (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_SERVICES {
        health.set_service_status(name, status).await;
    }
}

/// Pings the store every [`HEALTH_CHECK_INTERVAL`] and reports gRPC health accordingly.
async fn watch_store_health(
    store: Arc<dyn Store>,
    health: HealthReporter,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut healthy = true;
    loop {
        let ping = tokio::time::timeout(STORE_PING_TIMEOUT, store.ping()).await;
        let ok = matches!(ping, Ok(Ok(())));
        metrics.store_ping(ok);
        if ok != healthy {
            healthy = ok;
            if ok {
                tracing::info!("store reachable again: health SERVING");
                set_health(&health, ServingStatus::Serving).await;
            } else {
                match ping {
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "store ping failed: health NOT_SERVING")
                    }
                    _ => tracing::warn!("store ping timed out: health NOT_SERVING"),
                }
                set_health(&health, ServingStatus::NotServing).await;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(HEALTH_CHECK_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}
