//! Agent enrollment end to end: the agent's identity library (`tokenfleet_agent::identity`)
//! against a broker serving TLS ([`TestBroker::start_tls`]).
//!
//! - What the broker receives at enrollment and renewal is recorded byte for byte (a recording
//!   `TokenBroker` in front of the broker's own service) and holds no private key material.
//! - Reused and expired codes are refused.
//! - With certificate lifetimes of seconds, the agent keeps calling successfully across several
//!   expiries because it renews at two thirds of each lifetime; an expired certificate is refused.
//! - A revoked agent is refused on its next call, without a broker restart, also when the
//!   revocation is made through another replica.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt as _;
use prost::Message as _;
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokenfleet_agent::identity::{self, EnrollmentCode, IdentityError, StoredIdentity};
use tokenfleet_broker::identity::{AgentCa, AgentIdentity, codes};
use tokenfleet_broker::records::Records;
use tokenfleet_broker::tokens::lifecycle::{TokenConfig, TokenService};
use tokenfleet_domain::{Device, GrantType, MailPurpose, Mailbox, MailboxKind, SenderMode, Stamps};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_store::Precondition;
use tokenfleet_testkit::broker::{TestBroker, TestOptions, TestStore};
use tonic::Code;
use tonic::codegen::{BoxFuture, Bytes, Service, http};
use tonic::transport::{Certificate, Channel, Identity, ServerTlsConfig};

const VERSION: &str = "e2e-1.0";

async fn tls_broker(lifetime: Option<Duration>) -> TestBroker {
    tls_broker_on(TestStore::Embedded, lifetime).await
}

/// [`tls_broker`] on `store`.
async fn tls_broker_on(store: TestStore, lifetime: Option<Duration>) -> TestBroker {
    let broker = TestBroker::start_with(
        store,
        TestOptions {
            tls: true,
            agent_certificate_lifetime: lifetime,
            ..TestOptions::default()
        },
    )
    .await
    .unwrap();
    broker
        .admin_client()
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: "acme".into(),
                display_name: "ACME".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    broker
}

async fn enrollment_code(broker: &TestBroker, agent: &str) -> EnrollmentCode {
    let created = broker
        .admin_client()
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            tenant: "acme".into(),
            agent: agent.into(),
            display_name: format!("site {agent}"),
            ttl_seconds: 600,
            re_enroll: false,
        })
        .await
        .unwrap()
        .into_inner();
    tokenfleet_testkit::logs::secret(&created.code);
    EnrollmentCode::new(&created.code)
}

/// Registers the agent's current private key (in `state_dir`) as a secret the logs must not show.
fn register_agent_key(state_dir: &Path) {
    if let Ok(pem) = std::fs::read_to_string(state_dir.join(identity::KEY_FILE)) {
        tokenfleet_testkit::logs::secret(&pem);
    }
}

/// Stores device `mfp` of `acme`, hosted by `agent`, whose sender mode allows mailbox `scan`.
async fn hosted_device(broker: &TestBroker, agent: &str) {
    let now = OffsetDateTime::now_utc();
    let records = Records::new(broker.state().store.as_ref());
    let device = Device {
        tenant: "acme".into(),
        name: "mfp".into(),
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
        stamps: Stamps::new(now),
    };
    let mailbox = Mailbox {
        consent_account: String::new(),
        tenant: "acme".into(),
        name: "scan".into(),
        address: "scan@example.com".into(),
        provider: "m365".into(),
        grant_type: GrantType::DelegatedDeviceCode,
        kind: MailboxKind::Admin,
        purposes: vec![MailPurpose::Send],
        disabled: false,
        token: Default::default(),
        stamps: Stamps::new(now),
    };
    records.put(&device, Precondition::Any).await.unwrap();
    records.put(&mailbox, Precondition::Any).await.unwrap();
}

/// One authenticated call with `identity`: the token for `mfp`/`scan`. An authenticated agent
/// that hosts the device gets as far as the missing grant (FAILED_PRECONDITION); anything else
/// is returned as the error.
async fn call(identity: &StoredIdentity) -> Result<(), tonic::Status> {
    let result = TokenBrokerClient::new(identity.channel().unwrap())
        .issue_access_token(pb::IssueAccessTokenRequest {
            device: "mfp".into(),
            mailbox: "scan".into(),
            purpose: pb::MailPurpose::Send as i32,
            ..Default::default()
        })
        .await;
    match result {
        Err(status) if status.code() == Code::FailedPrecondition => Ok(()),
        Err(status) => Err(status),
        Ok(_) => panic!("a token was issued although no grant exists"),
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ----------------------------------------------------------------------------------------------
// A recording TokenBroker: keeps every request (headers and body bytes as received), then hands
// it to the broker's own service.
// ----------------------------------------------------------------------------------------------

/// One received request: the path and headers as text, and the body bytes.
type Request = (String, Vec<u8>);

#[derive(Debug, Clone, Default)]
struct Received(Arc<Mutex<Vec<Request>>>);

impl Received {
    fn all(&self) -> Vec<Request> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Recording<S> {
    inner: S,
    received: Received,
}

impl<S> tonic::server::NamedService for Recording<S> {
    const NAME: &'static str = tokenfleet_proto::v1::token_broker_server::SERVICE_NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for Recording<S>
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        let received = self.received.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes: Bytes = body
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .unwrap_or_default();
            let headers = format!("{} {:?}", parts.uri.path(), parts.headers);
            received.0.lock().unwrap().push((headers, bytes.to_vec()));
            let body = tonic::body::Body::new(http_body_util::Full::new(bytes));
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// Serves the broker's `TokenBroker` behind a [`Recording`] on a new TLS listener with the
/// broker's own server certificate and agent CA; returns its URL and what it receives.
async fn recording_broker(broker: &TestBroker) -> (String, Received, tokio::task::JoinHandle<()>) {
    let state = broker.state().clone();
    let ca = Arc::new(AgentCa::load_or_create(&state).await.unwrap());
    let identity = AgentIdentity {
        ca: ca.clone(),
        certificate_lifetime: Duration::from_secs(600),
    };
    let service = tokenfleet_broker::token_broker::token_broker_server(
        state.clone(),
        Some(identity),
        TokenService::new(state, TokenConfig::default()),
    );
    let received = Received::default();
    let (cert, key) = broker.tls_server_files();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()))
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recording = Recording {
        inner: service,
        received: received.clone(),
    };
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(recording)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("https://{addr}"), received, task)
}

/// The secret parts of a PKCS#8 EC key PEM: the whole DER, its PEM body, and the 32-byte scalar
/// (the first OCTET STRING of length 32).
fn secret_forms(key_pem: &str) -> Vec<Vec<u8>> {
    let pkcs8 = KeyPair::from_pem(key_pem).unwrap().serialize_der();
    let at = pkcs8.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
    let scalar = pkcs8[at..at + 32].to_vec();
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    vec![
        pkcs8,
        scalar,
        body.into_bytes(),
        key_pem.as_bytes().to_vec(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ----------------------------------------------------------------------------------------------
// Tests
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_agent_enrolls_and_renews_without_ever_sending_its_private_key() {
    let broker = tls_broker(None).await;
    let (url, received, server) = recording_broker(&broker).await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("agent");
    let code = enrollment_code(&broker, "site-a").await;

    let enrolled = identity::enroll(&url, &code, broker.tls_ca_pem(), &state_dir, VERSION)
        .await
        .unwrap();
    assert_eq!(
        (enrolled.info.tenant.as_str(), enrolled.info.agent.as_str()),
        ("acme", "site-a")
    );
    assert_eq!(mode(&state_dir), 0o700);
    assert_eq!(mode(&state_dir.join(identity::KEY_FILE)), 0o600);
    let key_pem = std::fs::read_to_string(state_dir.join(identity::KEY_FILE)).unwrap();
    register_agent_key(&state_dir);

    let renewed = identity::renew(&state_dir, VERSION).await.unwrap();
    assert!(renewed.not_after >= enrolled.not_after);
    let new_key_pem = std::fs::read_to_string(state_dir.join(identity::KEY_FILE)).unwrap();
    register_agent_key(&state_dir);
    assert_ne!(new_key_pem, key_pem, "renewal uses a new key");

    let requests = received.all();
    let paths: Vec<&str> = requests
        .iter()
        .map(|(h, _)| h.split(' ').next().unwrap_or_default())
        .collect();
    assert_eq!(
        paths,
        [
            "/tokenfleet.v1.TokenBroker/Enroll",
            "/tokenfleet.v1.TokenBroker/Renew"
        ]
    );
    for (headers, body) in &requests {
        for secret in secret_forms(&key_pem)
            .into_iter()
            .chain(secret_forms(&new_key_pem))
        {
            assert!(!contains(body, &secret), "a private key was sent");
            assert!(
                !contains(headers.as_bytes(), &secret),
                "a private key was sent"
            );
        }
    }

    // The enrollment request is exactly code + CSR + version (re-encoding it gives the same bytes:
    // no hidden extra fields), and the CSR carries the agent's public key.
    let (_, body) = &requests[0];
    assert_eq!(body[0], 0, "uncompressed gRPC frame");
    let message = &body[5..];
    let request = pb::EnrollRequest::decode(message).unwrap();
    assert_eq!(request.encode_to_vec(), message);
    assert_eq!(request.code, code.expose());
    assert_eq!(request.software_version, VERSION);
    let (_, csr) = <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(&request.csr_der).unwrap();
    csr.verify_signature().unwrap();
    assert_eq!(
        csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .as_ref(),
        KeyPair::from_pem(&key_pem).unwrap().public_key_raw()
    );
    let agent = broker
        .admin_client()
        .get_agent(pb::GetAgentRequest {
            tenant: "acme".into(),
            name: "site-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agent.software_version, VERSION);
    assert!(agent.certificate_expire_time.is_some() && agent.last_seen_time.is_some());
    server.abort();
}

#[tokio::test]
async fn reused_and_expired_codes_are_refused() {
    let broker = tls_broker(None).await;
    let dir = tempfile::tempdir().unwrap();
    let code = enrollment_code(&broker, "site-a").await;
    let url = broker.grpc_url();
    identity::enroll(
        &url,
        &code,
        broker.tls_ca_pem(),
        &dir.path().join("a"),
        VERSION,
    )
    .await
    .unwrap();

    let reused = identity::enroll(
        &url,
        &code,
        broker.tls_ca_pem(),
        &dir.path().join("b"),
        VERSION,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            reused,
            IdentityError::Refused {
                code: Code::Unauthenticated,
                ..
            }
        ),
        "{reused}"
    );
    assert!(!dir.path().join("b").join(identity::KEY_FILE).exists());

    // A code whose lifetime is over (created already expired).
    enrollment_code(&broker, "site-b").await;
    let site_b = Records::new(broker.state().store.as_ref())
        .get::<tokenfleet_domain::Agent>(&tokenfleet_broker::records::agent_key("acme", "site-b"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let (expired, _) = codes::create(broker.state(), &site_b, Duration::ZERO, false, "test")
        .await
        .unwrap();
    let err = identity::enroll(
        &url,
        &EnrollmentCode::new(expired.expose()),
        broker.tls_ca_pem(),
        &dir.path().join("c"),
        VERSION,
    )
    .await
    .unwrap_err();
    match err {
        IdentityError::Refused { code, message } => {
            assert_eq!(code, Code::Unauthenticated);
            assert!(message.contains("expired"), "{message}");
        }
        other => panic!("{other}"),
    }

    // The broker's certificate is checked: without its CA the agent does not talk to it.
    let err = identity::enroll(
        &url,
        &enrollment_code(&broker, "site-c").await,
        Some(std::fs::read_to_string(dir.path().join("a").join(identity::CHAIN_FILE)).unwrap()),
        &dir.path().join("d"),
        VERSION,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, IdentityError::Connect { .. }), "{err}");
}

// Multi-threaded, so the renewer is not queued behind the calls; a 9 s lifetime leaves the
// renewal 3 s before expiry (with 6 s, a loaded 2-core machine once let a certificate expire
// before its renewal reached the broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_at_two_thirds_keeps_the_agent_working_across_expiry() {
    const LIFETIME: i64 = 9;
    let lifetime = Duration::from_secs(LIFETIME as u64);
    let broker = tls_broker(Some(lifetime)).await;
    hosted_device(&broker, "site-a").await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("agent");
    let first = identity::enroll(
        &broker.grpc_url(),
        &enrollment_code(&broker, "site-a").await,
        broker.tls_ca_pem(),
        &state_dir,
        VERSION,
    )
    .await
    .unwrap();
    register_agent_key(&state_dir);
    assert_eq!(
        (first.not_after - first.not_before).whole_seconds(),
        LIFETIME,
        "the configured lifetime (no backdating beyond whole seconds)"
    );
    call(&first).await.unwrap();

    let current = Arc::new(Mutex::new(first.clone()));
    let renewals = Arc::new(Mutex::new(Vec::new()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let renewer = {
        let current = current.clone();
        let renewals = renewals.clone();
        let state_dir = state_dir.clone();
        let key_dir = state_dir.clone();
        tokio::spawn(async move {
            identity::keep_renewed(
                &state_dir,
                VERSION,
                move |renewed| {
                    register_agent_key(&key_dir);
                    renewals.lock().unwrap().push(OffsetDateTime::now_utc());
                    *current.lock().unwrap() = renewed.clone();
                },
                async {
                    let _ = stopped.await;
                },
            )
            .await
        })
    };

    // Keep calling with whatever identity the agent holds until two full lifetimes beyond the
    // first certificate's expiry have passed.
    let until = first.not_after + time::Duration::seconds(2 * LIFETIME);
    while OffsetDateTime::now_utc() < until {
        let identity = current.lock().unwrap().clone();
        if let Err(status) = call(&identity).await {
            panic!(
                "call failed at {} with the certificate valid until {}: {status:?}",
                OffsetDateTime::now_utc(),
                identity.not_after
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = stop.send(());
    renewer.await.unwrap().unwrap();

    let renewals = renewals.lock().unwrap().clone();
    assert!(renewals.len() >= 3, "renewed {} times", renewals.len());
    // Each renewal came at about two thirds of the lifetime, well before expiry.
    let first_renewal = renewals[0];
    let at = (first_renewal - first.not_before).as_seconds_f64();
    let two_thirds = LIFETIME as f64 * 2.0 / 3.0;
    assert!(
        (two_thirds - 1.0..LIFETIME as f64 - 0.1).contains(&at),
        "first renewal {at} s into the lifetime"
    );

    // The first certificate has expired and is refused now.
    assert!(OffsetDateTime::now_utc() > first.not_after);
    let err = call(&first).await.unwrap_err();
    assert!(
        std::error::Error::source(&err).is_some() || err.code() == Code::Unauthenticated,
        "{err:?}"
    );
    // The stored identity is the latest one and still good.
    let stored = identity::load(&state_dir).unwrap();
    assert!(stored.not_after > OffsetDateTime::now_utc());
    call(&stored).await.unwrap();
}

#[tokio::test]
async fn a_revoked_agent_is_refused_on_its_next_call() {
    let broker = tls_broker(None).await;
    hosted_device(&broker, "site-a").await;
    let dir = tempfile::tempdir().unwrap();
    let enrolled = identity::enroll(
        &broker.grpc_url(),
        &enrollment_code(&broker, "site-a").await,
        broker.tls_ca_pem(),
        dir.path(),
        VERSION,
    )
    .await
    .unwrap();
    register_agent_key(dir.path());
    let channel: Channel = enrolled.channel().unwrap();
    let mut client = TokenBrokerClient::new(channel);
    let before = client.issue_access_token(scan_request()).await.unwrap_err();
    assert_eq!(before.code(), Code::FailedPrecondition, "{before:?}");

    revoke_site_a(&broker).await;

    // The same connection, the next call.
    assert_revoked(&mut client, dir.path()).await;
    let listed = broker
        .admin_client()
        .list_agents(pb::ListAgentsRequest {
            tenant: "acme".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .agents
            .iter()
            .any(|a| a.name == "site-a" && a.revoked)
    );
}

/// Each replica keeps the records an agent's calls read between calls, while their tenant's
/// records do not change (the scope's generation in Redis). A revocation made through another
/// replica reaches that memory: after two calls answered from the same records, the next call
/// on the same connection is refused, as is the agent's renewal.
#[tokio::test]
async fn a_revocation_through_another_replica_is_refused_on_the_next_call() {
    let redis = tokenfleet_testkit::redis::RedisServer::start()
        .await
        .unwrap();
    let first = tls_broker_on(TestStore::Redis(redis.url()), None).await;
    let second = first.replica().await.unwrap();
    hosted_device(&first, "site-a").await;
    let dir = tempfile::tempdir().unwrap();
    let enrolled = identity::enroll(
        &first.grpc_url(),
        &enrollment_code(&first, "site-a").await,
        first.tls_ca_pem(),
        dir.path(),
        VERSION,
    )
    .await
    .unwrap();
    register_agent_key(dir.path());
    let mut client = TokenBrokerClient::new(enrolled.channel().unwrap());
    // No consent yet: the calls get as far as the grant, twice from the same records.
    for _ in 0..2 {
        let before = client.issue_access_token(scan_request()).await.unwrap_err();
        assert_eq!(before.code(), Code::FailedPrecondition, "{before:?}");
    }
    revoke_site_a(&second).await;
    assert_revoked(&mut client, dir.path()).await;
}

/// Revokes agent `site-a` of `acme` through `broker`'s admin API.
async fn revoke_site_a(broker: &TestBroker) {
    broker
        .admin_client()
        .revoke_agent(pb::RevokeAgentRequest {
            tenant: "acme".into(),
            name: "site-a".into(),
        })
        .await
        .unwrap();
}

/// The next issuance on `client`'s connection and the renewal of the identity in `state_dir`
/// are refused as revoked.
async fn assert_revoked(client: &mut TokenBrokerClient<Channel>, state_dir: &Path) {
    let after = client.issue_access_token(scan_request()).await.unwrap_err();
    assert_eq!(after.code(), Code::PermissionDenied, "{after:?}");
    assert!(after.message().contains("revoked"), "{}", after.message());
    let err = identity::renew(state_dir, VERSION).await.unwrap_err();
    assert!(
        matches!(
            err,
            IdentityError::Refused {
                code: Code::PermissionDenied,
                ..
            }
        ),
        "{err}"
    );
}

/// An issuance for device `mfp` and mailbox `scan` (see [`hosted_device`]).
fn scan_request() -> pb::IssueAccessTokenRequest {
    pb::IssueAccessTokenRequest {
        device: "mfp".into(),
        mailbox: "scan".into(),
        purpose: pb::MailPurpose::Send as i32,
        ..Default::default()
    }
}

// ----------------------------------------------------------------------------------------------
// Leftover codes, through the real binaries: `tokenfleetctl agent enroll-code` and
// `tokenfleet-agent enroll`.
// ----------------------------------------------------------------------------------------------

/// `tokenfleetctl agent enroll-code <agent> --tenant acme [extra]`: the code, or the failure.
async fn ctl_code(broker: &TestBroker, agent: &str, extra: &[&str]) -> Result<String, String> {
    let mut args = vec![
        "-o",
        "json",
        "agent",
        "enroll-code",
        "--name",
        agent,
        "--tenant",
        "acme",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = broker.ctl(&args).await;
    if code != 0 {
        return Err(format!("exit {code}: {stderr}"));
    }
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let code = json["code"].as_str().unwrap().to_owned();
    tokenfleet_testkit::logs::secret(&code);
    Ok(code)
}

/// `tokenfleet-agent enroll` with `code` into `state_dir`: Ok, or the agent's stderr.
async fn agent_enroll(broker: &TestBroker, code: &str, state_dir: &Path) -> Result<(), String> {
    agent_enroll_with(broker, code, state_dir, &[])
        .await
        .map(drop)
}

/// [`agent_enroll`] with `extra` arguments: the agent's stdout, or its stderr.
async fn agent_enroll_with(
    broker: &TestBroker,
    code: &str,
    state_dir: &Path,
    extra: &[&str],
) -> Result<String, String> {
    let binary = tokio::task::spawn_blocking(tokenfleet_testkit::agent_site::agent_binary)
        .await
        .unwrap();
    let code_file = state_dir.with_extension("code");
    std::fs::write(&code_file, code).unwrap();
    let out = tokio::process::Command::new(binary)
        .args(["enroll", "--broker", &broker.grpc_url(), "--code-file"])
        .arg(&code_file)
        .arg("--ca-file")
        .arg(broker.tls_ca_file())
        .args(extra)
        .env("TOKENFLEET_AGENT_STATE_DIR", state_dir)
        .output()
        .await
        .unwrap();
    register_agent_key(state_dir);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_codes_do_not_take_over_agents_through_ctl_and_agent() {
    let broker = tls_broker(None).await;
    let dir = tempfile::tempdir().unwrap();

    // Two codes for one agent: only the newer one works.
    let older = ctl_code(&broker, "site-a", &[]).await.unwrap();
    let newer = ctl_code(&broker, "site-a", &[]).await.unwrap();
    let err = agent_enroll(&broker, &older, &dir.path().join("older"))
        .await
        .unwrap_err();
    assert!(err.contains("replaced by a newer code"), "{err}");
    agent_enroll(&broker, &newer, &dir.path().join("running"))
        .await
        .unwrap();
    let running = identity::load(&dir.path().join("running")).unwrap();
    hosted_device(&broker, "site-a").await;
    call(&running).await.unwrap();

    // An init step that runs before every start: `--if-not-enrolled` leaves the identity alone
    // (the used code would fail), and enrolls where there is none yet.
    let cert_before = std::fs::read(dir.path().join("running").join(identity::CERT_FILE)).unwrap();
    let stdout = agent_enroll_with(
        &broker,
        &newer,
        &dir.path().join("running"),
        &["--if-not-enrolled"],
    )
    .await
    .unwrap();
    assert!(stdout.starts_with("already enrolled"), "{stdout}");
    assert_eq!(
        std::fs::read(dir.path().join("running").join(identity::CERT_FILE)).unwrap(),
        cert_before
    );
    let err = agent_enroll_with(
        &broker,
        &newer,
        &dir.path().join("fresh"),
        &["--if-not-enrolled"],
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("used already"),
        "a fresh directory still needs a valid code: {err}"
    );

    // The agent runs with a current certificate: a plain code is refused, naming the option.
    let err = ctl_code(&broker, "site-a", &[]).await.unwrap_err();
    assert!(
        err.contains("holds a current certificate") && err.contains("--re-enroll"),
        "{err}"
    );
    call(&running).await.unwrap();
    // An explicit re-enroll code replaces the running agent's certificate.
    let re_enroll = ctl_code(&broker, "site-a", &["--re-enroll"]).await.unwrap();
    agent_enroll(&broker, &re_enroll, &dir.path().join("rebuilt"))
        .await
        .unwrap();
    let rebuilt = identity::load(&dir.path().join("rebuilt")).unwrap();
    call(&rebuilt).await.unwrap();
    assert_eq!(
        call(&running).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // It worked once.
    assert!(
        agent_enroll(&broker, &re_enroll, &dir.path().join("again"))
            .await
            .unwrap_err()
            .contains("used already")
    );

    // A code made before the agent was deleted and re-created does not enroll the new one.
    let stale = ctl_code(&broker, "site-b", &[]).await.unwrap();
    let (code, _, stderr) = broker
        .ctl(&[
            "agent", "delete", "--name", "site-b", "--tenant", "acme", "--yes",
        ])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = broker
        .ctl(&["agent", "create", "--name", "site-b", "--tenant", "acme"])
        .await;
    assert_eq!(code, 0, "{stderr}");
    let err = agent_enroll(&broker, &stale, &dir.path().join("stale"))
        .await
        .unwrap_err();
    assert!(err.contains("unknown, has been used already"), "{err}");
    assert!(!dir.path().join("stale").join(identity::KEY_FILE).exists());
}
