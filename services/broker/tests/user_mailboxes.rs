//! Issuance limits for agents and user mailboxes: the per-agent `IssueAccessToken` rate limit
//! over a real broker (`server::serve` over TLS on 127.0.0.1, embedded store), and the deletion
//! of idle user tokens by the refresh scheduler's per-mailbox step, under a controlled clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use time::OffsetDateTime;
use tokenfleet_broker::api_keys;
use tokenfleet_broker::config::RawConfig;
use tokenfleet_broker::records::Records;
use tokenfleet_broker::server;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, grant_key, seal_field};
use tokenfleet_broker::tokens::lifecycle::{IDLE_DELETE_ACTION, TokenConfig, TokenService};
use tokenfleet_domain::{
    Clock, Device, GrantType, MailPurpose, Mailbox, MailboxKind, Role, SenderMode, Stamps, Tenant,
    TokenStatus,
};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::admin_client::AdminClient;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_seal::{Keyring, Secret};
use tokenfleet_store::embedded::EmbeddedStore;
use tokenfleet_store::{Precondition, Scope};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

// ----------------------------------------------------------------------------------------------
// Harness
// ----------------------------------------------------------------------------------------------

/// The system clock moved by an offset the test sets.
#[derive(Debug, Default)]
struct ShiftedClock(AtomicI64);

impl ShiftedClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs() as i64, Ordering::SeqCst);
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + time::Duration::seconds(self.0.load(Ordering::SeqCst))
    }
}

#[derive(Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

fn state_in(dir: &std::path::Path, clock: Arc<ShiftedClock>) -> impl Future<Output = BrokerState> {
    let path = dir.join("store.redb");
    async move {
        let key = Keyring::generate_key_base64().unwrap();
        BrokerState {
            store: Arc::new(EmbeddedStore::open(path).await.unwrap()),
            keyring: Arc::new(Keyring::from_base64("k1", [("k1", key.as_str())]).unwrap()),
            clock,
        }
    }
}

async fn put_tenant(state: &BrokerState, name: &str) {
    let tenant = Tenant {
        name: name.to_owned(),
        display_name: name.to_owned(),
        stamps: Stamps::new(OffsetDateTime::now_utc()),
    };
    Records::new(state.store.as_ref())
        .put(&tenant, Precondition::Any)
        .await
        .unwrap();
}

/// A broker serving over TLS on 127.0.0.1; stopped on drop.
struct Broker {
    state: BrokerState,
    addr: SocketAddr,
    server_ca: String,
    admin_key: Secret,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
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
    async fn start(edit: impl FnOnce(&mut RawConfig)) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = RawConfig {
            state_dir: dir.path().to_path_buf(),
            shutdown_grace_seconds: 1,
            ..RawConfig::default()
        };
        let (cert, key) = tokenfleet_broker::dev::ensure_dev_tls(dir.path()).unwrap();
        raw.tls.cert_file = Some(cert);
        raw.tls.key_file = Some(key);
        edit(&mut raw);
        let config = raw.validate().unwrap();
        let state = state_in(dir.path(), Arc::new(ShiftedClock::default())).await;
        let (_, admin_key) = api_keys::create(&state, Role::FleetAdmin, None, "test".to_owned())
            .await
            .unwrap();
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
        let server_ca =
            std::fs::read_to_string(dir.path().join(tokenfleet_broker::dev::DEV_CA_CERT_FILE))
                .unwrap();
        let broker = Broker {
            state,
            addr,
            server_ca,
            admin_key,
            stop: Some(stop),
            task,
            _dir: dir,
        };
        put_tenant(&broker.state, "acme").await;
        broker
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .timeout(Duration::from_secs(20))
    }

    fn anonymous(&self) -> Channel {
        self.endpoint()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(self.server_ca.clone())),
            )
            .unwrap()
            .connect_lazy()
    }

    fn with_certificate(&self, cert_pem: &str, key: &KeyPair) -> Channel {
        self.endpoint()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(self.server_ca.clone()))
                    .identity(Identity::from_pem(cert_pem, key.serialize_pem())),
            )
            .unwrap()
            .connect_lazy()
    }

    fn admin(&self) -> Admin {
        let mut value: MetadataValue<_> = format!("Bearer {}", self.admin_key.expose())
            .parse()
            .unwrap();
        value.set_sensitive(true);
        AdminClient::with_interceptor(self.anonymous(), Bearer(value))
    }

    /// Enrolls `agent` of `acme` and returns a client that presents its new certificate.
    async fn enrolled(&self, agent: &str) -> TokenBrokerClient<Channel> {
        let code = self
            .admin()
            .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
                tenant: "acme".to_owned(),
                agent: agent.to_owned(),
                display_name: format!("site {agent}"),
                ttl_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .code;
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        let cert = TokenBrokerClient::new(self.anonymous())
            .enroll(pb::EnrollRequest {
                code,
                csr_der: csr,
                software_version: "1.2.3".into(),
            })
            .await
            .unwrap()
            .into_inner();
        TokenBrokerClient::new(self.with_certificate(&cert.certificate_pem, &key))
    }

    /// Device `name` hosted by `agent`, fixed_admin with admin mailbox `scan` (no grant).
    async fn put_device(&self, name: &str, agent: &str) {
        let records = Records::new(self.state.store.as_ref());
        let device = Device {
            tenant: "acme".into(),
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
            stamps: Stamps::new(OffsetDateTime::now_utc()),
        };
        records.put(&device, Precondition::Any).await.unwrap();
        records
            .put(&mailbox("scan", MailboxKind::Admin), Precondition::Any)
            .await
            .unwrap();
    }
}

fn mailbox(name: &str, kind: MailboxKind) -> Mailbox {
    Mailbox {
        tenant: "acme".into(),
        name: name.into(),
        address: format!("{name}@example.com"),
        provider: "m365".into(),
        grant_type: GrantType::DelegatedDeviceCode,
        kind,
        purposes: vec![MailPurpose::Send],
        disabled: false,
        token: Default::default(),
        stamps: Stamps::new(OffsetDateTime::now_utc()),
    }
}

fn issue_request(device: &str) -> pb::IssueAccessTokenRequest {
    pb::IssueAccessTokenRequest {
        device: device.to_owned(),
        mailbox: "scan".to_owned(),
        purpose: pb::MailPurpose::Send as i32,
    }
}

// ----------------------------------------------------------------------------------------------
// Tests
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn issue_access_token_is_rate_limited_per_agent() {
    let broker = Broker::start(|raw| {
        raw.agents.issue_rate_per_minute = 1;
        raw.agents.issue_burst = 2;
    })
    .await;
    let mut a = broker.enrolled("site-a").await;
    let mut b = broker.enrolled("site-b").await;
    broker.put_device("mfp-a", "site-a").await;
    broker.put_device("mfp-b", "site-b").await;

    // The burst: authorized, and as far as the missing grant.
    for _ in 0..2 {
        let err = a
            .issue_access_token(issue_request("mfp-a"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    // Over the rate: RESOURCE_EXHAUSTED with a retry hint (one token a minute).
    let err = a
        .issue_access_token(issue_request("mfp-a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("retry after"), "{}", err.message());
    let retry: f64 = err
        .metadata()
        .get("retry-after")
        .expect("a retry-after entry")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1.0..=60.0).contains(&retry), "{retry}");

    // Another agent has its own bucket.
    let err = b
        .issue_access_token(issue_request("mfp-b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[test]
fn the_rate_limit_is_configurable_and_checked() {
    let raw = RawConfig::default();
    assert_eq!(raw.agents.issue_rate_per_minute, 600);
    assert_eq!(raw.tokens.user_token_idle_days, 30);
    let mut bad = RawConfig::default();
    bad.agents.issue_burst = 0;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("agents.issue_burst"), "{err}");
}

/// A grant with (sealed, made-up) tokens obtained now.
async fn put_grant(state: &BrokerState, name: &str) {
    let seal = |field, value: &str| {
        seal_field(&state.keyring, "acme", name, field, &Secret::new(value)).unwrap()
    };
    let now = state.clock.now();
    let mut g = GrantRecord::empty("acme", name);
    g.refresh_token = Some(seal(GrantField::RefreshToken, "made-up-refresh-token"));
    g.access_token = Some(seal(GrantField::AccessToken, "made-up-access-token"));
    g.refresh_token_obtained = Some(now);
    g.state.status = TokenStatus::Active;
    g.state.last_refresh = Some(now);
    g.state.access_token_expires = Some(now + time::Duration::hours(1));
    Records::new(state.store.as_ref())
        .put(&g, Precondition::Any)
        .await
        .unwrap();
}

async fn grant(state: &BrokerState, name: &str) -> GrantRecord {
    Records::new(state.store.as_ref())
        .get::<GrantRecord>(&grant_key("acme", name))
        .await
        .unwrap()
        .unwrap()
        .value
}

#[tokio::test]
async fn idle_user_tokens_are_deleted_instead_of_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ShiftedClock::default());
    let state = state_in(dir.path(), clock.clone()).await;
    put_tenant(&state, "acme").await;
    let records = Records::new(state.store.as_ref());
    for (name, kind) in [
        ("user-alice", MailboxKind::User),
        ("scan", MailboxKind::Admin),
    ] {
        records
            .put(&mailbox(name, kind), Precondition::Any)
            .await
            .unwrap();
        put_grant(&state, name).await;
    }
    let config = TokenConfig {
        user_token_idle: Some(Duration::from_secs(30 * 86_400)),
        ..TokenConfig::default()
    };
    let service = TokenService::new(state.clone(), config);
    let day = Duration::from_secs(86_400);

    // Day 10: an agent gets a token (recorded as the last issuance).
    clock.advance(10 * day);
    service.record_issued("acme", "user-alice").await.unwrap();
    let issued = grant(&state, "user-alice").await.last_issued.unwrap();
    assert!((issued - clock.now()).abs() < time::Duration::minutes(1));

    // Day 35: 25 days since the issuance, not idle yet: not deleted (the refresh itself fails,
    // the provider does not exist, which is beside the point).
    clock.advance(25 * day);
    assert!(!service.delete_if_idle("acme", "user-alice").await.unwrap());
    service.scheduled_refresh("acme", "user-alice").await;
    assert!(grant(&state, "user-alice").await.refresh_token.is_some());

    // Day 41: 31 idle days: the scheduler deletes the user token; the admin one stays.
    clock.advance(6 * day);
    service.scheduled_refresh("acme", "user-alice").await;
    service.scheduled_refresh("acme", "scan").await;
    let wiped = grant(&state, "user-alice").await;
    assert!(wiped.refresh_token.is_none() && wiped.access_token.is_none());
    assert_eq!(wiped.state.status, TokenStatus::NotRetrieved);
    let reason = wiped.state.last_error.unwrap().reason;
    assert!(reason.contains("deleted after 30 idle days"), "{reason}");
    assert!(grant(&state, "scan").await.refresh_token.is_some());

    let events = tokenfleet_broker::audit::list(&state, &Scope::Tenant("acme".into()), None, 100)
        .await
        .unwrap();
    let deletions: Vec<_> = events
        .iter()
        .filter(|(_, e)| e.action == IDLE_DELETE_ACTION)
        .collect();
    assert_eq!(deletions.len(), 1, "{events:?}");
    assert_eq!(deletions[0].1.target, "tenants/acme/mailboxes/user-alice");
    assert!(deletions[0].1.detail.contains("30 idle days"));
    // Nothing more to delete.
    assert!(!service.delete_if_idle("acme", "user-alice").await.unwrap());
}
