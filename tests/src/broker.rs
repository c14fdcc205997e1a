//! An in-process broker for tests.
//!
//! [`TestBroker::start`] runs the real broker (`tokenfleet_broker::server::serve`) inside the
//! test's tokio runtime, on `127.0.0.1:0` listeners, with a freshly generated sealing key kept in
//! its state directory and a fleet-admin API key ([`TestBroker::admin_key`]):
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use tokenfleet_testkit::broker::{TestBroker, TestStore};
//! use tokenfleet_proto::v1::{ListTenantsRequest};
//!
//! let broker = TestBroker::start(TestStore::Embedded).await?;
//! let mut admin = broker.admin_client();
//! admin.list_tenants(ListTenantsRequest::default()).await?;
//! let broker = broker.restart().await; // same store, same key, new ports
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The broker stops when the [`TestBroker`] is dropped (abruptly); [`TestBroker::shutdown`] stops
//! it gracefully and waits, which a test needs before opening the same embedded store again.
//!
//! [`TestBroker::start_tls`] (or [`TestBroker::start_with`]) serves gRPC over TLS with a local CA
//! and a server certificate for `127.0.0.1`/`localhost` generated in the state directory (as
//! `--dev` does), so agents can enroll and call `TokenBroker` with client certificates;
//! [`TestBroker::grpc_url`] and [`TestBroker::tls_ca_pem`] are what a client needs.
//!
//! With [`TestOptions::binary_config`] the broker is the real `tokenfleet-broker` binary instead
//! (a child process with the same configuration plus the given tables, its stderr in the test
//! log directory), stopped with SIGTERM by [`TestBroker::shutdown`]; the store then belongs to
//! the process, so [`TestBroker::state`] and [`TestBroker::create_key`] are not available.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokenfleet_broker::api_keys;
use tokenfleet_broker::config::{RawConfig, RedisSection, SealKeySource, StoreBackend};
use tokenfleet_broker::server::{self, ServeError};
use tokenfleet_broker::state::BrokerState;
use tokenfleet_domain::Role;
use tokenfleet_proto::v1::admin_client::AdminClient;
use tokenfleet_seal::{Keyring, Secret};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Name of the sealing key file the test broker keeps in its state directory.
pub const SEAL_KEY_FILE: &str = "seal.key";

/// Where a [`TestBroker`] keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestStore {
    /// The embedded store in a fresh temporary state directory (deleted when the broker is
    /// dropped; kept across [`TestBroker::restart`]).
    Embedded,
    /// The embedded store in this state directory (created if missing, never deleted). A sealing
    /// key already there is reused, so brokers started one after another share their secrets.
    EmbeddedAt(PathBuf),
    /// A standalone Redis server at this `redis://` URL (e.g. from
    /// [`crate::redis::RedisServer`]).
    Redis(String),
    /// A Redis Cluster reached through these seed node URLs.
    RedisCluster(Vec<String>),
}

/// How a [`TestBroker`] runs beyond its store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestOptions {
    /// Serve gRPC over TLS (generated local CA and server certificate in the state directory).
    pub tls: bool,
    /// Lifetime of agent certificates (`[agents] certificate_lifetime_seconds`); `None` = the
    /// default (7 days).
    pub agent_certificate_lifetime: Option<Duration>,
    /// `min_replicas_acked` of the Redis store (`None` = the store's default for its mode).
    pub redis_min_replicas_acked: Option<u32>,
    /// Run the `tokenfleet-broker` binary as a child process, with these TOML tables merged into
    /// its configuration (`"[tracing]\notlp_endpoint = …"`); `None` = in this process.
    pub binary_config: Option<String>,
}

impl TestOptions {
    /// The `tokenfleet-broker` binary as a child process with `config` (TOML tables, may be
    /// empty) merged into its configuration; plaintext gRPC.
    pub fn binary(config: impl Into<String>) -> Self {
        Self {
            binary_config: Some(config.into()),
            ..Self::default()
        }
    }
}

/// A client of the `Admin` service that sends an API key with every call.
pub type TestAdminClient = AdminClient<InterceptedService<Channel, BearerAuth>>;

/// A new enrollment code (valid 10 minutes) for agent `agent` of `tenant`, registered with the
/// log scan as a secret ([`crate::logs::secret`]). Panics if the broker refuses it.
pub async fn enrollment_code(admin: &mut TestAdminClient, tenant: &str, agent: &str) -> String {
    let code = admin
        .create_enrollment_code(tokenfleet_proto::v1::CreateEnrollmentCodeRequest {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
            display_name: format!("agent {agent}"),
            ttl_seconds: 600,
            re_enroll: false,
        })
        .await
        .unwrap_or_else(|status| panic!("enrollment code for {tenant}/{agent}: {status}"))
        .into_inner()
        .code;
    crate::logs::secret(&code);
    code
}

/// Interceptor adding `authorization: Bearer <API key>` to every request.
#[derive(Clone)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    /// Sends `key` as a bearer token.
    pub fn new(key: &Secret) -> Self {
        let header = MetadataValue::try_from(format!("Bearer {}", key.expose()))
            .ok()
            .map(|mut value| {
                value.set_sensitive(true);
                value
            });
        Self { header }
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerAuth([redacted])")
    }
}

impl Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let header = self.header.clone().ok_or_else(|| {
            tonic::Status::invalid_argument("test API key is not valid ASCII metadata")
        })?;
        request.metadata_mut().insert("authorization", header);
        Ok(request)
    }
}

/// The running broker: a server task (and the state it shares with the test), or a process.
enum Running {
    InProcess {
        state: BrokerState,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), ServeError>>,
    },
    Process {
        child: std::process::Child,
        log: PathBuf,
    },
}

/// How often a starting broker binary moves to new ports when one was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

static NEXT_PROCESS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `raw` as TOML with the tables of `extra` merged in (keys of `extra` win).
fn merged_toml(raw: &RawConfig, extra: &str) -> anyhow::Result<String> {
    let mut table = toml::Table::try_from(raw).context("rendering the test configuration")?;
    let extra: toml::Table = extra.parse().context("TestOptions::binary_config")?;
    for (key, value) in extra {
        match (table.get_mut(&key), value) {
            (Some(toml::Value::Table(have)), toml::Value::Table(more)) => have.extend(more),
            (_, value) => {
                table.insert(key, value);
            }
        }
    }
    toml::to_string(&table).context("rendering the test configuration")
}

/// A broker running in this process. See the module documentation.
pub struct TestBroker {
    /// Address of the gRPC listener (Admin, TokenBroker, health, reflection).
    pub grpc_addr: SocketAddr,
    /// Address of the HTTP listener (`/healthz`, `/readyz`, `/metrics`).
    pub http_addr: SocketAddr,
    /// A fleet-admin API key.
    pub admin_key: Secret,
    /// The broker's state directory (sealing key, embedded database).
    pub state_dir: PathBuf,
    store: TestStore,
    options: TestOptions,
    channel: Channel,
    running: Option<Running>,
    // Last field: the directory goes after everything that may still use it.
    temp_dir: Option<tempfile::TempDir>,
}

impl fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestBroker")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("state_dir", &self.state_dir)
            .field("store", &self.store)
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl TestBroker {
    /// Starts a broker on `store` with a new fleet-admin API key.
    pub async fn start(store: TestStore) -> anyhow::Result<TestBroker> {
        Self::start_with(store, TestOptions::default()).await
    }

    /// Starts a broker on `store` that serves gRPC over TLS; see [`TestBroker::start_with`].
    pub async fn start_tls(store: TestStore) -> anyhow::Result<TestBroker> {
        Self::start_with(
            store,
            TestOptions {
                tls: true,
                ..TestOptions::default()
            },
        )
        .await
    }

    /// Starts a broker on `store` with `options`.
    pub async fn start_with(store: TestStore, options: TestOptions) -> anyhow::Result<TestBroker> {
        crate::logs::capture();
        let (temp_dir, state_dir) = match &store {
            TestStore::EmbeddedAt(dir) => (None, dir.clone()),
            TestStore::Embedded | TestStore::Redis(_) | TestStore::RedisCluster(_) => {
                let temp = tempfile::Builder::new()
                    .prefix("tokenfleet-broker-")
                    .tempdir()
                    .context("creating the test broker's state directory")?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        Self::launch(store, temp_dir, state_dir, None, options).await
    }

    /// The gRPC URL: `https://127.0.0.1:<port>` with TLS, else `http://127.0.0.1:<port>`.
    pub fn grpc_url(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc_addr)
    }

    /// The CA (PEM) that signed the broker's TLS server certificate; `None` without TLS.
    pub fn tls_ca_pem(&self) -> Option<String> {
        self.options
            .tls
            .then(|| std::fs::read_to_string(self.tls_ca_file()).ok())
            .flatten()
    }

    /// Path of the CA file that signed the broker's TLS server certificate (exists with TLS).
    pub fn tls_ca_file(&self) -> PathBuf {
        self.state_dir
            .join(tokenfleet_broker::dev::DEV_CA_CERT_FILE)
    }

    /// Paths of the broker's TLS server certificate and key (exist with TLS).
    pub fn tls_server_files(&self) -> (PathBuf, PathBuf) {
        (
            self.state_dir
                .join(tokenfleet_broker::dev::SERVER_CERT_FILE),
            self.state_dir.join(tokenfleet_broker::dev::SERVER_KEY_FILE),
        )
    }

    /// Stops the broker gracefully and starts it again on the same store with the same sealing
    /// key and admin key. The new broker listens on new ports (read `grpc_addr`/`http_addr` and
    /// make new clients). Panics if the broker fails to stop or start.
    pub async fn restart(mut self) -> TestBroker {
        if let Err(error) = self.stop().await {
            panic!("test broker failed while stopping for a restart: {error:#}");
        }
        let store = self.store.clone();
        let state_dir = self.state_dir.clone();
        let admin_key = self.admin_key.clone();
        let options = self.options.clone();
        let temp_dir = self.temp_dir.take();
        drop(self);
        match Self::launch(store, temp_dir, state_dir, Some(admin_key), options).await {
            Ok(broker) => broker,
            Err(error) => panic!("test broker failed to start again: {error:#}"),
        }
    }

    /// Kills the broker process (SIGKILL: no shutdown, no destructor, nothing it kept in memory
    /// reaches the disk) and starts it again on the same store, like [`TestBroker::restart`].
    /// Only for a broker run as a binary ([`TestOptions::binary_config`]).
    pub async fn kill_and_restart(mut self) -> TestBroker {
        match self.running.take() {
            Some(Running::Process { mut child, .. }) => {
                if let Err(error) = child.kill() {
                    panic!("killing tokenfleet-broker: {error}");
                }
                match tokio::task::spawn_blocking(move || child.wait()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => panic!("waiting for the killed broker: {error}"),
                    Err(error) => panic!("waiting for the killed broker: {error}"),
                }
            }
            _ => panic!("kill_and_restart needs a broker run as a binary (binary_config)"),
        }
        self.restart().await
    }

    /// Starts a second broker on the same Redis store with the same sealing key (another replica),
    /// with its own ports and the same admin key. Not possible with the embedded store (one
    /// process owns the file).
    pub async fn replica(&self) -> anyhow::Result<TestBroker> {
        if matches!(self.store, TestStore::Embedded | TestStore::EmbeddedAt(_)) {
            anyhow::bail!("replicas need a Redis store: the embedded store has one owner");
        }
        let temp = tempfile::Builder::new()
            .prefix("tokenfleet-broker-replica-")
            .tempdir()
            .context("creating the replica's state directory")?;
        std::fs::copy(
            self.state_dir.join(SEAL_KEY_FILE),
            temp.path().join(SEAL_KEY_FILE),
        )
        .context("copying the sealing key")?;
        let dir = temp.path().to_path_buf();
        Self::launch(
            self.store.clone(),
            Some(temp),
            dir,
            Some(self.admin_key.clone()),
            self.options.clone(),
        )
        .await
    }

    /// An `Admin` client that authenticates with [`TestBroker::admin_key`] (fleet-admin).
    pub fn admin_client(&self) -> TestAdminClient {
        self.client_with_key(&self.admin_key)
    }

    /// An `Admin` client that authenticates with `key`.
    pub fn client_with_key(&self, key: &Secret) -> TestAdminClient {
        AdminClient::with_interceptor(self.channel.clone(), BearerAuth::new(key))
    }

    /// Runs `tokenfleetctl` with `args` against this broker (its fleet-admin key and, with TLS,
    /// its CA): exit code, stdout, stderr. Panics if the binary cannot be run.
    pub async fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        self.ctl_with_key(self.admin_key.expose(), args).await
    }

    /// Runs `tokenfleetctl` with `args` against this broker as the API key `key`: exit code,
    /// stdout, stderr. Panics if the binary cannot be run.
    pub async fn ctl_with_key(&self, key: &str, args: &[&str]) -> (i32, String, String) {
        let binary = tokio::task::spawn_blocking(crate::agent_site::ctl_binary)
            .await
            .unwrap_or_else(|e| panic!("finding tokenfleetctl: {e}"));
        let out = tokio::process::Command::new(binary)
            .args(args)
            .env("TOKENFLEET_BROKER", self.grpc_url())
            .env("TOKENFLEET_API_KEY", key)
            .env("TOKENFLEET_CA_FILE", self.tls_ca_file())
            .env_remove("TOKENFLEET_API_KEY_FILE")
            .env_remove("TOKENFLEET_TENANT")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running tokenfleetctl: {e}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A plain channel to the gRPC listener (for health, reflection, `TokenBroker` clients).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Creates an API key directly in the store (as `tokenfleet-broker create-api-key` does).
    /// Panics if that fails.
    pub async fn create_key(&self, role: Role, tenant: Option<&str>) -> Secret {
        let Some(Running::InProcess { state, .. }) = &self.running else {
            panic!("create_key on a stopped test broker, or one running as a process");
        };
        match api_keys::create(state, role, tenant, format!("test {role} key")).await {
            Ok((_, secret)) => {
                crate::logs::secret(secret.expose());
                secret
            }
            Err(error) => panic!("creating a {role} API key (tenant {tenant:?}): {error}"),
        }
    }

    /// The state the broker serves from (store, keyring, clock), for tests that look behind the API.
    pub fn state(&self) -> &BrokerState {
        match &self.running {
            Some(Running::InProcess { state, .. }) => state,
            _ => panic!("state() on a stopped test broker, or one running as a process"),
        }
    }

    /// Stops the broker gracefully and waits until it has. Panics if the broker failed.
    pub async fn shutdown(mut self) {
        if let Err(error) = self.stop().await {
            panic!("test broker failed: {error:#}");
        }
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let (state, stop, task) = match running {
            Running::InProcess { state, stop, task } => (state, stop, task),
            Running::Process { mut child, log } => {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let status = tokio::task::spawn_blocking(move || child.wait())
                    .await
                    .context("waiting for tokenfleet-broker")??;
                anyhow::ensure!(
                    status.success(),
                    "tokenfleet-broker exited with {status}; log {}",
                    log.display()
                );
                return Ok(());
            }
        };
        // The server may already have ended (and dropped the receiver); its result says why.
        let _ = stop.send(());
        let result = task.await.context("test broker task panicked")?;
        drop(state);
        result.context("test broker")
    }

    /// Runs the broker binary on `raw` (plus `extra`) on free loopback ports (new ones when
    /// another test took one meanwhile); returns when its gRPC port accepts connections (it
    /// binds after opening the store and the CA).
    async fn spawn_binary(
        mut raw: RawConfig,
        extra: &str,
        state_dir: &Path,
    ) -> anyhow::Result<(Running, SocketAddr, SocketAddr)> {
        let binary = tokio::task::spawn_blocking(crate::agent_site::broker_binary).await?;
        // The ports were free when found; another test may take one before the broker binds it.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let [grpc_port, http_port] = crate::ports::free_ports::<2>()?;
            let grpc_addr = SocketAddr::from(([127, 0, 0, 1], grpc_port));
            let http_addr = SocketAddr::from(([127, 0, 0, 1], http_port));
            raw.grpc.listen = grpc_addr.to_string();
            raw.http.listen = http_addr.to_string();
            let config = state_dir.join("broker.toml");
            std::fs::write(&config, merged_toml(&raw, extra)?)
                .with_context(|| format!("writing {}", config.display()))?;
            let log = crate::logs::log_dir().join(format!(
                "broker-binary-{}-{}.log",
                std::process::id(),
                NEXT_PROCESS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            let stderr = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let mut child = std::process::Command::new(&binary)
                .arg("--config")
                .arg(&config)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(stderr)
                .spawn()
                .context("starting tokenfleet-broker")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut exited = None;
            while tokio::net::TcpStream::connect(grpc_addr).await.is_err() {
                if let Some(status) = child.try_wait()? {
                    exited = Some(status);
                    break;
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "tokenfleet-broker not listening within 30 s; log {}",
                    log.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let Some(status) = exited else {
                return Ok((Running::Process { child, log }, grpc_addr, http_addr));
            };
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if !(text.contains("Address already in use") && attempts < PORT_ATTEMPTS) {
                anyhow::bail!("tokenfleet-broker exited with {status}: {text}");
            }
        }
    }

    async fn launch(
        store: TestStore,
        temp_dir: Option<tempfile::TempDir>,
        state_dir: PathBuf,
        admin_key: Option<Secret>,
        options: TestOptions,
    ) -> anyhow::Result<TestBroker> {
        server::ensure_private_dir(&state_dir)?;
        let key_file = ensure_seal_key(&state_dir)?;

        let mut raw = RawConfig {
            state_dir: state_dir.clone(),
            shutdown_grace_seconds: 5,
            ..RawConfig::default()
        };
        // The fake identity provider and the fake mail APIs run on loopback: tenant-admin keys of
        // the tests may point providers there (`[admin] provider_hosts`).
        raw.admin.provider_hosts = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        raw.seal.current_key_id = Some("test".to_owned());
        raw.seal.keys = vec![SealKeySource {
            id: "test".to_owned(),
            key_file: Some(key_file),
            key_env: None,
        }];
        match &store {
            TestStore::Embedded | TestStore::EmbeddedAt(_) => {
                raw.store.backend = StoreBackend::Embedded;
            }
            TestStore::Redis(url) => {
                raw.store.backend = StoreBackend::Redis;
                raw.store.redis = Some(RedisSection::standalone(url));
            }
            TestStore::RedisCluster(seeds) => {
                raw.store.backend = StoreBackend::Redis;
                raw.store.redis = Some(RedisSection::cluster(seeds));
            }
        }
        if let (Some(replicas), Some(redis)) =
            (options.redis_min_replicas_acked, raw.store.redis.as_mut())
        {
            redis
                .0
                .insert("min_replicas_acked".into(), i64::from(replicas).into());
        }
        if options.tls {
            let (cert, key) = tokenfleet_broker::dev::ensure_dev_tls(&state_dir)
                .context("generating the test broker's TLS certificate")?;
            // The TLS and CA private keys must stay out of the logs too.
            for file in [
                &key,
                &state_dir.join(tokenfleet_broker::dev::DEV_CA_KEY_FILE),
            ] {
                if let Ok(pem) = std::fs::read_to_string(file) {
                    crate::logs::secret(&pem);
                }
            }
            raw.tls.cert_file = Some(cert);
            raw.tls.key_file = Some(key);
        }
        if let Some(lifetime) = options.agent_certificate_lifetime {
            raw.agents.certificate_lifetime_seconds = lifetime.as_secs();
        }
        let config = raw.validate().context("test broker configuration")?;
        let state = server::build_state(&config)
            .await
            .context("opening the test broker's store")?;
        let admin_key = match admin_key {
            Some(key) => key,
            None => {
                api_keys::create(
                    &state,
                    Role::FleetAdmin,
                    None,
                    "test broker admin".to_owned(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("creating the test admin key: {e}"))?
                .1
            }
        };
        crate::logs::secret(admin_key.expose());

        let (running, grpc_addr, http_addr) = match &options.binary_config {
            Some(extra) => {
                // The process opens the store itself (the embedded file has one owner).
                drop(state);
                Self::spawn_binary(raw, extra, &state_dir).await?
            }
            None => {
                let grpc = TcpListener::bind("127.0.0.1:0").await?;
                let http = TcpListener::bind("127.0.0.1:0").await?;
                let grpc_addr = grpc.local_addr()?;
                let http_addr = http.local_addr()?;
                let (stop, stopped) = oneshot::channel::<()>();
                let task = tokio::spawn(server::serve(config, state.clone(), grpc, http, async {
                    // A dropped sender (TestBroker dropped) stops the broker too.
                    let _ = stopped.await;
                }));
                (
                    Running::InProcess { state, stop, task },
                    grpc_addr,
                    http_addr,
                )
            }
        };
        let channel = if options.tls {
            let ca =
                std::fs::read_to_string(state_dir.join(tokenfleet_broker::dev::DEV_CA_CERT_FILE))
                    .context("reading the test broker's CA")?;
            Endpoint::from_shared(format!("https://{grpc_addr}"))?
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?
                .connect_lazy()
        } else {
            Endpoint::from_shared(format!("http://{grpc_addr}"))?.connect_lazy()
        };
        Ok(TestBroker {
            grpc_addr,
            http_addr,
            admin_key,
            state_dir,
            store,
            options,
            channel,
            running: Some(running),
            temp_dir,
        })
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        match self.running.take() {
            Some(Running::InProcess { stop, task, .. }) => {
                // Not awaited: stop accepting right away and cut open connections.
                let _ = stop.send(());
                task.abort();
            }
            Some(Running::Process { mut child, .. }) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => {}
        }
    }
}

/// Reuses `<dir>/seal.key` or writes a new one (mode 0600); returns its path.
fn ensure_seal_key(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(SEAL_KEY_FILE);
    if path.exists() {
        return Ok(path);
    }
    let key = Secret::new(Keyring::generate_key_base64()?);
    crate::logs::secret(key.expose());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(key.expose().as_bytes())?;
    Ok(path)
}
