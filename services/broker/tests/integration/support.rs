//! The harness the broker's integration tests share (`crate::support`): services driven directly
//! and the real server. Its test types get inherent methods in the test modules, so it lives in
//! this binary rather than in `tokenfleet-testkit`, which provides the rest (the fake identity
//! provider, Redis, the log capture).
//!
//! - clocks the tests move: [`ManualClock`] (stands still), [`ShiftedClock`] (the system clock
//!   plus an offset);
//! - [`eventually`]: polling with a deadline instead of sleeps;
//! - [`Bearer`] and [`admin_client`]: Admin API clients with an API key;
//! - [`open_state`]: a broker state on the embedded store or a real Redis, for tests that drive
//!   the services directly; [`fake_provider`] and [`idp_env`]: the fake identity provider with a
//!   tenant's provider pointing at it;
//! - [`Broker`]: the real server (`server::serve`) on 127.0.0.1, over TLS with the dev CA, with
//!   [`Broker::enroll`] / [`Broker::agent_client`] for agents with client certificates.

// Every module uses a subset of the harness; a failed step panics with the reason.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use tempfile::TempDir;
use time::OffsetDateTime;
use tokenfleet_broker::api_keys;
use tokenfleet_broker::config::{RawConfig, RedisSection, SealKeySource, StoreBackend};
use tokenfleet_broker::records::Records;
use tokenfleet_broker::server;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::lifecycle::TokenConfig;
use tokenfleet_broker::tokens::scheduler::SchedulerConfig;
use tokenfleet_domain::{
    Clock, Device, GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind, Role,
    SenderMode, Stamps, Tenant,
};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::admin_client::AdminClient;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_seal::{Keyring, Secret};
use tokenfleet_store::embedded::EmbeddedStore;
use tokenfleet_store::redis_store::{RedisConfig, RedisStore};
use tokenfleet_store::{Precondition, Store};
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokenfleet_testkit::logs;
use tokenfleet_testkit::redis::RedisServer;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::{Interceptor, Routes};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server};

// ----------------------------------------------------------------------------------------------
// Clocks and polling
// ----------------------------------------------------------------------------------------------

/// A clock that stands still until the test moves it.
#[derive(Debug)]
pub struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    /// Starts at the current time.
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(OffsetDateTime::now_utc())))
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }

    pub fn set(&self, to: OffsetDateTime) {
        *self.0.lock().unwrap() = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// The system clock moved by an offset the test sets.
#[derive(Debug, Default)]
pub struct ShiftedClock(AtomicI64);

impl ShiftedClock {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs() as i64, Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + time::Duration::seconds(self.0.load(Ordering::SeqCst))
    }
}

/// Polls `check` every 10 ms until it returns `Some`, failing after `within`.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ----------------------------------------------------------------------------------------------
// Admin API clients
// ----------------------------------------------------------------------------------------------

/// Adds `authorization: Bearer <key>` to every call (nothing without a key).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(key: Option<&str>) -> Bearer {
        Bearer(key.map(|key| {
            let mut value: MetadataValue<Ascii> = format!("Bearer {key}").parse().unwrap();
            value.set_sensitive(true);
            value
        }))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An Admin API client that sends an API key.
pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

/// An Admin API client on `channel` sending `key` (nothing when `None`).
pub fn admin_client(channel: Channel, key: Option<&str>) -> Admin {
    AdminClient::with_interceptor(channel, Bearer::new(key))
}

/// Serves `routes` (gRPC in plaintext, nothing else) on 127.0.0.1:0 until the returned sender
/// fires or is dropped; returns the address, the sender and the server's task.
pub async fn serve_plaintext(
    routes: Routes,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    (addr, stop, task)
}

// ----------------------------------------------------------------------------------------------
// State, store and the fake identity provider
// ----------------------------------------------------------------------------------------------

/// Token settings for tests: 5 s provider timeout, 10 s leases, a refresh scheduler that looks
/// every 20 ms.
pub fn token_config() -> TokenConfig {
    TokenConfig {
        provider_timeout: Duration::from_secs(5),
        lease_ttl: Duration::from_secs(10),
        scheduler: SchedulerConfig {
            interval: Duration::from_millis(20),
            batch: 64,
            concurrency: 8,
        },
        ..TokenConfig::default()
    }
}

/// Where a test store lives.
pub enum Backend {
    /// The embedded store in a temporary directory.
    Embedded,
    /// A real `redis-server` started for the test.
    Redis,
}

/// What keeps a test store alive: its directory (embedded) or its Redis server.
pub struct StoreHome {
    pub dir: Option<TempDir>,
    pub redis: Option<RedisServer>,
}

/// The keyring with the one sealing key `k1` (base64 `key`).
pub fn keyring(key: &str) -> Keyring {
    Keyring::from_base64("k1", [("k1", key)]).unwrap()
}

/// A broker state on `backend` with a new sealing key `k1` and `clock`; returns the state, the
/// key (base64) and what keeps the store alive.
pub async fn open_state(
    backend: Backend,
    clock: Arc<dyn Clock>,
) -> (BrokerState, String, StoreHome) {
    let (store, home): (Arc<dyn Store>, _) = match backend {
        Backend::Embedded => {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(dir.path().join("store.redb"))
                .await
                .unwrap();
            let home = StoreHome {
                dir: Some(dir),
                redis: None,
            };
            (Arc::new(store), home)
        }
        Backend::Redis => {
            let redis = RedisServer::start().await.unwrap();
            let store = RedisStore::connect(&RedisConfig::standalone(redis.url()))
                .await
                .unwrap();
            let home = StoreHome {
                dir: None,
                redis: Some(redis),
            };
            (Arc::new(store), home)
        }
    };
    let key = Keyring::generate_key_base64().unwrap();
    let state = BrokerState {
        store,
        keyring: Arc::new(keyring(&key)),
        clock,
    };
    (state, key, home)
}

/// Stores tenant `name` (display name `display_name`).
pub async fn put_tenant(state: &BrokerState, name: &str, display_name: &str) {
    let tenant = Tenant {
        name: name.to_owned(),
        display_name: display_name.to_owned(),
        stamps: Stamps::new(state.clock.now()),
    };
    Records::new(state.store.as_ref())
        .put(&tenant, Precondition::Any)
        .await
        .unwrap();
}

/// The Entra tenant the fake identity provider's Microsoft endpoints are for.
pub const ENTRA_TENANT: &str = "contoso.example";

/// Provider `name` of `tenant` for the app `client`, pointing at `fake`: Microsoft endpoints
/// under [`ENTRA_TENANT`] unless `kind` is Google; the client secret sealed with the state's
/// keyring (and registered as a secret the logs must not show); no service-account key.
pub fn fake_provider(
    state: &BrokerState,
    fake: &FakeIdp,
    client: &ClientSpec,
    tenant: &str,
    name: &str,
    kind: ProviderKind,
) -> Provider {
    let endpoints = match kind {
        ProviderKind::Google => fake.google_endpoints(),
        _ => fake.microsoft_endpoints(ENTRA_TENANT),
    };
    let client_secret = client.client_secret.as_deref().map(|secret| {
        logs::secret(secret);
        state
            .keyring
            .seal_secret(
                &Provider::client_secret_aad(tenant, name),
                &Secret::new(secret),
            )
            .unwrap()
    });
    Provider {
        tenant: tenant.into(),
        name: name.into(),
        kind,
        authority: if kind == ProviderKind::Microsoft {
            ENTRA_TENANT.into()
        } else {
            String::new()
        },
        client_id: client.client_id.clone(),
        client_secret,
        endpoints,
        http_proxy: String::new(),
        http_proxy_password: None,
        extra_ca_pem: String::new(),
        scopes: vec![],
        service_account_key: None,
        stamps: Stamps::new(state.clock.now()),
    }
}

/// What the token tests start from: a state on a store, the fake identity provider knowing one
/// app, and one tenant whose one provider is that app at the fake.
pub struct IdpEnv {
    pub fake: FakeIdp,
    pub state: BrokerState,
    /// The sealing key `k1`, base64.
    pub key: String,
    pub home: StoreHome,
}

/// Starts an [`IdpEnv`] on `backend` with `clock`: the fake knows `client`; tenant `tenant`
/// (display name "Acme") has provider `provider` of `kind` for it. Captures the logs.
pub async fn idp_env(
    backend: Backend,
    clock: Arc<dyn Clock>,
    client: ClientSpec,
    tenant: &str,
    provider: &str,
    kind: ProviderKind,
) -> IdpEnv {
    // Every log line is scanned for secrets at the end of the suite.
    logs::capture();
    let (state, key, home) = open_state(backend, clock).await;
    let fake = FakeIdp::start().await.unwrap();
    let provider = fake_provider(&state, &fake, &client, tenant, provider, kind);
    fake.register_client(client);
    put_tenant(&state, tenant, "Acme").await;
    Records::new(state.store.as_ref())
        .put(&provider, Precondition::Absent)
        .await
        .unwrap();
    IdpEnv {
        fake,
        state,
        key,
        home,
    }
}

// ----------------------------------------------------------------------------------------------
// The real broker
// ----------------------------------------------------------------------------------------------

/// The sealing key file in `dir` (made, and registered as a secret, the first time).
pub fn seal_key(dir: &Path) -> PathBuf {
    let path = dir.join("seal.key");
    if !path.exists() {
        let key = Keyring::generate_key_base64().unwrap();
        logs::secret(&key);
        std::fs::write(&path, key).unwrap();
    }
    path
}

/// How a [`Broker`] is started (the default: plaintext, embedded store, new keys).
#[derive(Default)]
pub struct Launch {
    /// Serve gRPC over TLS with a dev CA made in the state directory (agents need it).
    pub tls: bool,
    /// The Redis URL of the store; the embedded store in the state directory when `None`.
    pub redis: Option<String>,
    /// The sealing key file (replicas share one); a new key in the state directory when `None`.
    pub seal_key_file: Option<PathBuf>,
    /// The fleet-admin API key (a replica takes the first one's); a new one when `None`.
    pub admin_key: Option<Secret>,
    /// Wraps the store the broker serves with (a test's decorator); as built when `None`.
    pub wrap_store: Option<WrapStore>,
}

/// A decorator around the store a [`Broker`] serves with ([`Launch::wrap_store`]).
pub type WrapStore = Box<dyn FnOnce(Arc<dyn Store>) -> Arc<dyn Store>>;

impl Launch {
    /// Over TLS, on the embedded store, with new keys.
    pub fn tls() -> Launch {
        Launch {
            tls: true,
            ..Launch::default()
        }
    }
}

/// The real broker (`server::serve`) on 127.0.0.1 ports in this test's runtime, on a
/// [`ShiftedClock`]; stopped on drop.
pub struct Broker {
    pub state: BrokerState,
    /// The broker's clock (the system clock until the test moves it).
    pub clock: Arc<ShiftedClock>,
    pub addr: SocketAddr,
    /// The dev CA's certificate (PEM); empty when the broker serves plaintext.
    pub server_ca: String,
    /// A fleet-admin API key.
    pub admin_key: Secret,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

impl Broker {
    /// Starts a broker as `launch` says, with `edit` applied to its configuration last. Does not
    /// install a log subscriber: the caller decides which (see `tokenfleet_testkit::logs`).
    pub async fn launch(launch: Launch, edit: impl FnOnce(&mut RawConfig)) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let key_file = launch.seal_key_file.unwrap_or_else(|| seal_key(dir.path()));
        let mut raw = RawConfig {
            state_dir: dir.path().to_path_buf(),
            shutdown_grace_seconds: 1,
            ..RawConfig::default()
        };
        raw.seal.current_key_id = Some("test".to_owned());
        raw.seal.keys = vec![SealKeySource {
            id: "test".to_owned(),
            key_file: Some(key_file),
            key_env: None,
        }];
        if let Some(url) = &launch.redis {
            raw.store.backend = StoreBackend::Redis;
            raw.store.redis = Some(RedisSection::standalone(url));
        } else {
            raw.store.backend = StoreBackend::Embedded;
        }
        if launch.tls {
            let (cert, key) = tokenfleet_broker::dev::ensure_dev_tls(dir.path()).unwrap();
            for file in [
                &key,
                &dir.path().join(tokenfleet_broker::dev::DEV_CA_KEY_FILE),
            ] {
                if let Ok(pem) = std::fs::read_to_string(file) {
                    logs::secret(&pem);
                }
            }
            raw.tls.cert_file = Some(cert);
            raw.tls.key_file = Some(key);
        }
        edit(&mut raw);
        let config = raw.validate().unwrap();
        let mut state = server::build_state(&config).await.unwrap();
        if let Some(wrap) = launch.wrap_store {
            state.store = wrap(Arc::clone(&state.store));
        }
        let clock = Arc::new(ShiftedClock::default());
        state.clock = clock.clone();
        let admin_key = match launch.admin_key {
            Some(key) => key,
            None => {
                let (_, key) = api_keys::create(&state, Role::FleetAdmin, None, "test")
                    .await
                    .unwrap();
                logs::secret(key.expose());
                key
            }
        };
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = state.clone();
        let task = tokio::spawn(async move {
            server::serve(config, serving, grpc, http, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let server_ca = if launch.tls {
            std::fs::read_to_string(dir.path().join(tokenfleet_broker::dev::DEV_CA_CERT_FILE))
                .unwrap()
        } else {
            String::new()
        };
        Broker {
            state,
            clock,
            addr,
            server_ca,
            admin_key,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    fn endpoint(&self) -> Endpoint {
        if self.server_ca.is_empty() {
            return Endpoint::from_shared(format!("http://{}", self.addr)).unwrap();
        }
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .timeout(Duration::from_secs(20))
    }

    /// A channel without a client certificate (TLS when the broker serves TLS).
    pub fn anonymous(&self) -> Channel {
        let mut endpoint = self.endpoint();
        if !self.server_ca.is_empty() {
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(self.server_ca.clone())),
                )
                .unwrap();
        }
        endpoint.connect_lazy()
    }

    /// Like [`Broker::anonymous`], connected now (TCP, TLS and HTTP/2 handshakes done), or the
    /// error that ended the connection.
    pub async fn connected_anonymous(&self) -> Result<Channel, tonic::transport::Error> {
        self.endpoint()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(self.server_ca.clone())),
            )?
            .connect()
            .await
    }

    /// A TLS channel that presents `cert_pem` with `key`.
    pub fn with_certificate(&self, cert_pem: &str, key: &KeyPair) -> Channel {
        self.endpoint()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(self.server_ca.clone()))
                    .identity(Identity::from_pem(cert_pem, key.serialize_pem())),
            )
            .unwrap()
            .connect_lazy()
    }

    /// An Admin API client with `key`, without a client certificate.
    pub fn admin_with(&self, key: &Secret) -> Admin {
        admin_client(self.anonymous(), Some(key.expose()))
    }

    /// An Admin API client with the fleet-admin key.
    pub fn admin(&self) -> Admin {
        self.admin_with(&self.admin_key)
    }

    pub fn records(&self) -> Records<'_> {
        Records::new(self.state.store.as_ref())
    }

    /// Stores tenant `name`.
    pub async fn put_tenant(&self, name: &str) {
        put_tenant(&self.state, name, name).await;
    }

    /// A new enrollment code for `agent` of `tenant` (display name "site <agent>").
    pub async fn enrollment_code(&self, tenant: &str, agent: &str) -> String {
        self.enrollment_code_with(tenant, agent, false).await
    }

    /// A new enrollment code for `agent` of `tenant`; a re-enroll code if `re_enroll`.
    pub async fn enrollment_code_with(&self, tenant: &str, agent: &str, re_enroll: bool) -> String {
        let code = self
            .admin()
            .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
                tenant: tenant.to_owned(),
                agent: agent.to_owned(),
                display_name: format!("site {agent}"),
                ttl_seconds: 0,
                re_enroll,
            })
            .await
            .unwrap()
            .into_inner()
            .code;
        logs::secret(&code);
        code
    }

    /// Enrolls `agent` of `tenant` with a new key; returns the key and the certificate.
    pub async fn enroll(&self, tenant: &str, agent: &str) -> (KeyPair, pb::AgentCertificate) {
        self.enroll_with(tenant, agent, false).await
    }

    /// Enrolls `agent` of `tenant` with a new key and a code made with `re_enroll`.
    pub async fn enroll_with(
        &self,
        tenant: &str,
        agent: &str,
        re_enroll: bool,
    ) -> (KeyPair, pb::AgentCertificate) {
        let code = self.enrollment_code_with(tenant, agent, re_enroll).await;
        let key = KeyPair::generate().unwrap();
        logs::secret(&key.serialize_pem());
        let cert = TokenBrokerClient::new(self.anonymous())
            .enroll(pb::EnrollRequest {
                code,
                csr_der: csr(&key),
                software_version: "1.2.3".into(),
            })
            .await
            .unwrap()
            .into_inner();
        (key, cert)
    }

    /// Enrolls `agent` of `tenant`; returns a TokenBroker client that presents its certificate.
    pub async fn agent_client(&self, tenant: &str, agent: &str) -> TokenBrokerClient<Channel> {
        let (key, cert) = self.enroll(tenant, agent).await;
        TokenBrokerClient::new(self.with_certificate(&cert.certificate_pem, &key))
    }
}

/// A certificate signing request (DER) for `key`.
pub fn csr(key: &KeyPair) -> Vec<u8> {
    CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

/// Device `name` of `tenant` hosted by `agent` (may be empty): sender mode fixed_admin with the
/// admin mailbox `scan`, nothing else set.
pub fn fixed_admin_device(tenant: &str, name: &str, agent: &str) -> Device {
    Device {
        tenant: tenant.into(),
        name: name.into(),
        display_name: String::new(),
        agent: agent.into(),
        sender_mode: SenderMode::FixedAdmin,
        admin_mailbox: "scan".into(),
        bulk_mailbox: String::new(),
        allowed_mailboxes: Vec::new(),
        smtp: Default::default(),
        fetch: Default::default(),
        ingress: Default::default(),
        user_provider: String::new(),
        stamps: Stamps::new(OffsetDateTime::now_utc()),
    }
}

/// Mailbox `name` of `tenant` at `address`: provider `m365`, device-code grant, for sending; no
/// grant yet.
pub fn send_mailbox(tenant: &str, name: &str, address: String, kind: MailboxKind) -> Mailbox {
    Mailbox {
        consent_account: String::new(),
        tenant: tenant.into(),
        name: name.into(),
        address,
        provider: "m365".into(),
        grant_type: GrantType::DelegatedDeviceCode,
        kind,
        purposes: vec![MailPurpose::Send],
        disabled: false,
        token: Default::default(),
        stamps: Stamps::new(OffsetDateTime::now_utc()),
    }
}

/// A store that holds every `put` into one collection until the test lets it go: the test
/// learns when a call has got that far ([`HeldWrites::reached`]) and decides when it goes on
/// ([`HeldWrites::release`]). Everything else passes straight through.
pub struct HeldWrites {
    inner: Arc<dyn Store>,
    collection: &'static str,
    reached: Arc<tokio::sync::Notify>,
    released: Arc<tokio::sync::Semaphore>,
}

/// The test's side of a [`HeldWrites`] store.
#[derive(Clone)]
pub struct HeldWritesControl {
    reached: Arc<tokio::sync::Notify>,
    released: Arc<tokio::sync::Semaphore>,
}

impl HeldWrites {
    /// The decorator for [`Launch::wrap_store`] holding the puts into `collection`, and its
    /// control.
    pub fn holding(collection: &'static str) -> (WrapStore, HeldWritesControl) {
        let control = HeldWritesControl {
            reached: Arc::new(tokio::sync::Notify::new()),
            released: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let (reached, released) = (Arc::clone(&control.reached), Arc::clone(&control.released));
        let wrap: WrapStore = Box::new(move |inner: Arc<dyn Store>| -> Arc<dyn Store> {
            Arc::new(HeldWrites {
                inner,
                collection,
                reached,
                released,
            })
        });
        (wrap, control)
    }
}

impl HeldWritesControl {
    /// Completes when a put into the collection is being held.
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    /// Lets every held put (and every later one) go on.
    pub fn release(&self) {
        self.released
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }
}

impl std::fmt::Debug for HeldWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldWrites")
            .field("collection", &self.collection)
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl Store for HeldWrites {
    async fn get_many(
        &self,
        keys: &[tokenfleet_store::RecordKey],
    ) -> tokenfleet_store::StoreResult<Vec<Option<tokenfleet_store::Record>>> {
        self.inner.get_many(keys).await
    }

    async fn get_many_since(
        &self,
        scope: &tokenfleet_store::Scope,
        keys: &[tokenfleet_store::RecordKey],
        known: Option<u64>,
    ) -> tokenfleet_store::StoreResult<tokenfleet_store::ScopeRead> {
        self.inner.get_many_since(scope, keys, known).await
    }

    async fn publish(
        &self,
        channel: &'static str,
        message: &str,
    ) -> tokenfleet_store::StoreResult<()> {
        self.inner.publish(channel, message).await
    }

    fn subscribe(
        &self,
        channel: &'static str,
    ) -> tokio::sync::mpsc::Receiver<tokenfleet_store::Notice> {
        self.inner.subscribe(channel)
    }

    async fn get(
        &self,
        key: &tokenfleet_store::RecordKey,
    ) -> tokenfleet_store::StoreResult<Option<tokenfleet_store::Record>> {
        self.inner.get(key).await
    }

    async fn put(
        &self,
        key: &tokenfleet_store::RecordKey,
        data: Vec<u8>,
        pre: Precondition,
    ) -> tokenfleet_store::StoreResult<u64> {
        if key.collection == self.collection {
            self.reached.notify_one();
            let _permit = self.released.acquire().await;
        }
        self.inner.put(key, data, pre).await
    }

    async fn delete(
        &self,
        key: &tokenfleet_store::RecordKey,
        pre: Precondition,
    ) -> tokenfleet_store::StoreResult<bool> {
        self.inner.delete(key, pre).await
    }

    async fn list(
        &self,
        scope: &tokenfleet_store::Scope,
        collection: &'static str,
        start_after: Option<&str>,
        limit: usize,
    ) -> tokenfleet_store::StoreResult<Vec<(String, tokenfleet_store::Record)>> {
        self.inner.list(scope, collection, start_after, limit).await
    }

    async fn count(
        &self,
        scope: &tokenfleet_store::Scope,
        collection: &'static str,
    ) -> tokenfleet_store::StoreResult<u64> {
        self.inner.count(scope, collection).await
    }

    async fn append(
        &self,
        scope: &tokenfleet_store::Scope,
        stream: &'static str,
        data: Vec<u8>,
        max_len: usize,
    ) -> tokenfleet_store::StoreResult<String> {
        self.inner.append(scope, stream, data, max_len).await
    }

    async fn trim_stream(
        &self,
        scope: &tokenfleet_store::Scope,
        stream: &'static str,
        before_ms: u64,
    ) -> tokenfleet_store::StoreResult<u64> {
        self.inner.trim_stream(scope, stream, before_ms).await
    }

    async fn read_back(
        &self,
        scope: &tokenfleet_store::Scope,
        stream: &'static str,
        before: Option<&str>,
        limit: usize,
    ) -> tokenfleet_store::StoreResult<Vec<tokenfleet_store::StreamEntry>> {
        self.inner.read_back(scope, stream, before, limit).await
    }

    async fn try_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> tokenfleet_store::StoreResult<Option<tokenfleet_store::Lease>> {
        self.inner.try_lease(name, owner, ttl).await
    }

    async fn release_lease(&self, name: &str, owner: &str) -> tokenfleet_store::StoreResult<bool> {
        self.inner.release_lease(name, owner).await
    }

    async fn renew_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> tokenfleet_store::StoreResult<bool> {
        self.inner.renew_lease(name, owner, ttl).await
    }

    async fn schedule(
        &self,
        name: &'static str,
        member: &str,
        due_ms: i64,
    ) -> tokenfleet_store::StoreResult<()> {
        self.inner.schedule(name, member, due_ms).await
    }

    async fn unschedule(
        &self,
        name: &'static str,
        member: &str,
    ) -> tokenfleet_store::StoreResult<()> {
        self.inner.unschedule(name, member).await
    }

    async fn due(
        &self,
        name: &'static str,
        now_ms: i64,
        limit: usize,
    ) -> tokenfleet_store::StoreResult<Vec<(String, i64)>> {
        self.inner.due(name, now_ms, limit).await
    }

    async fn ping(&self) -> tokenfleet_store::StoreResult<()> {
        self.inner.ping().await
    }

    async fn ready(&self) -> tokenfleet_store::StoreResult<()> {
        self.inner.ready().await
    }
}
