//! Agent identity against a real broker (`server::serve` over TLS on 127.0.0.1, embedded store):
//! enrollment codes (once, expiry, concurrency), who may call `TokenBroker` (no certificate,
//! another CA, an expired certificate, revoked, superseded), renewal, the device-host check of
//! `IssueAccessToken`, the Admin API over TLS without a client certificate, audit entries, and
//! that no secret reaches the log at trace level. The issuance fast path keeps the per-call
//! checks: a cached-token issuance is refused on the next call after revocation or
//! re-enrollment, and concurrent issuances (embedded store and Redis) are each audited.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rcgen::KeyPair;
use time::OffsetDateTime;
use tokenfleet_broker::identity::{AgentCa, AgentId};
use tokenfleet_broker::records::Records;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_domain::{Mailbox, MailboxKind};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_seal::Keyring;
use tokenfleet_store::Precondition;
use tokenfleet_store::embedded::EmbeddedStore;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{
    Broker, HeldWrites, Launch, ShiftedClock, csr, fixed_admin_device, send_mailbox,
};

// ----------------------------------------------------------------------------------------------
// Harness
// ----------------------------------------------------------------------------------------------

/// Everything logged by this test binary, at trace level.
fn log_capture() -> Arc<Mutex<Vec<u8>>> {
    static CAPTURE: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let buffer = Arc::new(Mutex::new(Vec::new()));
            let sink = buffer.clone();
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || LogSink(sink.clone()))
                .try_init();
            buffer
        })
        .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Asserts that none of `secrets` appears in anything logged so far (and that something was).
fn assert_not_logged(secrets: &[&str]) {
    let log = String::from_utf8_lossy(&log_capture().lock().unwrap()).into_owned();
    assert!(log.contains("TRACE"), "trace logging is on");
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(!log.contains(secret), "a secret was logged: {secret}");
    }
}

/// This module's helpers on the shared test broker.
trait IdentityBroker {
    async fn start(tls: bool, lifetime: Option<Duration>) -> Broker;
    fn broker_client(&self, channel: Channel) -> TokenBrokerClient<Channel>;
    async fn put_device(&self, tenant: &str, name: &str, agent: &str);
    async fn audit(&self, tenant: &str) -> Vec<pb::AuditEvent>;
    async fn agent(&self, tenant: &str, name: &str) -> pb::Agent;
}

impl IdentityBroker for Broker {
    /// A broker (over TLS when `tls`) with tenants `acme` and `other`, logging into
    /// [`log_capture`]; agent certificates live `lifetime` when given.
    async fn start(tls: bool, lifetime: Option<Duration>) -> Broker {
        log_capture();
        let launch = Launch {
            tls,
            ..Launch::default()
        };
        let broker = Broker::launch(launch, |raw| {
            if let Some(lifetime) = lifetime {
                raw.agents.certificate_lifetime_seconds = lifetime.as_secs();
            }
        })
        .await;
        broker.put_tenant("acme").await;
        broker.put_tenant("other").await;
        broker
    }

    fn broker_client(&self, channel: Channel) -> TokenBrokerClient<Channel> {
        TokenBrokerClient::new(channel)
    }

    /// Stores device `name` of `tenant`, hosted by `agent`, sender mode fixed_admin with the
    /// admin mailbox `scan` (created too; no grant).
    async fn put_device(&self, tenant: &str, name: &str, agent: &str) {
        let records = self.records();
        records
            .put(&fixed_admin_device(tenant, name, agent), Precondition::Any)
            .await
            .unwrap();
        records
            .put(&mailbox(tenant, "scan"), Precondition::Any)
            .await
            .unwrap();
    }

    async fn audit(&self, tenant: &str) -> Vec<pb::AuditEvent> {
        self.admin()
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant: tenant.to_owned(),
                page_size: 1000,
                page_token: String::new(),
                kind: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .events
    }

    async fn agent(&self, tenant: &str, name: &str) -> pb::Agent {
        self.admin()
            .get_agent(pb::GetAgentRequest {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

fn mailbox(tenant: &str, name: &str) -> Mailbox {
    send_mailbox(
        tenant,
        name,
        format!("{name}@example.com"),
        MailboxKind::Admin,
    )
}

async fn renew(
    client: &mut TokenBrokerClient<Channel>,
) -> Result<pb::AgentCertificate, tonic::Status> {
    client
        .renew(pb::RenewRequest {
            csr_der: csr(&KeyPair::generate().unwrap()),
            software_version: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn issue_request(device: &str, mailbox: &str) -> pb::IssueAccessTokenRequest {
    pb::IssueAccessTokenRequest {
        device: device.to_owned(),
        mailbox: mailbox.to_owned(),
        purpose: pb::MailPurpose::Send as i32,
        user_address: String::new(),
    }
}

/// A refused call: a status from the broker, or a failed TLS handshake (transport error).
fn refused_by_tls_or(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || matches!(status.code(), Code::Unavailable | Code::Unknown)
}

// ----------------------------------------------------------------------------------------------
// Tests
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_enrollment_code_issues_one_certificate_for_its_agent() {
    let broker = Broker::start(true, None).await;
    // The Admin API works over TLS with an API key and no client certificate.
    let created = broker
        .admin()
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            tenant: "acme".into(),
            agent: "site-a".into(),
            display_name: "Head office".into(),
            ttl_seconds: 600,
            re_enroll: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.code.starts_with("tfe_"));
    let agent = created.agent.unwrap();
    assert_eq!(agent.display_name, "Head office");
    assert!(agent.certificate_expire_time.is_none());

    let key = KeyPair::generate().unwrap();
    let cert = broker
        .broker_client(broker.anonymous())
        .enroll(pb::EnrollRequest {
            code: format!("{}\n", created.code),
            csr_der: csr(&key),
            software_version: "1.2.3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cert.tenant.as_str(), cert.agent.as_str()),
        ("acme", "site-a")
    );
    assert_eq!(
        cert.identity_uri,
        "spiffe://tokenfleet/tenants/acme/agents/site-a"
    );
    assert!(cert.ca_chain_pem.contains("BEGIN CERTIFICATE"));
    let lifetime = cert.expire_time.unwrap().seconds - cert.not_before.unwrap().seconds;
    assert!(
        (7 * 24 * 3600..=7 * 24 * 3600 + 60).contains(&lifetime),
        "{lifetime}"
    );

    // The certificate authenticates the agent.
    let mut client = broker.broker_client(broker.with_certificate(&cert.certificate_pem, &key));
    let renewed = renew(&mut client).await.unwrap();
    assert_eq!(renewed.identity_uri, cert.identity_uri);

    // A code works once.
    let again = broker
        .broker_client(broker.anonymous())
        .enroll(pb::EnrollRequest {
            code: created.code.clone(),
            csr_der: csr(&KeyPair::generate().unwrap()),
            software_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Unauthenticated);
    assert!(
        again.message().contains("used already"),
        "{}",
        again.message()
    );

    let record = broker.agent("acme", "site-a").await;
    assert!(record.certificate_expire_time.is_some());
    assert!(record.last_seen_time.is_some());
    assert_eq!(record.software_version, "1.2.3");

    let events = broker.audit("acme").await;
    for action in [
        "agent.enrollment_code.create",
        "agent.enroll",
        "agent.renew",
    ] {
        let event = events
            .iter()
            .find(|e| e.action == action)
            .unwrap_or_else(|| panic!("no {action} in {events:#?}"));
        assert_eq!(event.result, "ok", "{event:?}");
        assert_eq!(event.target, "tenants/acme/agents/site-a");
    }
    assert!(
        events
            .iter()
            .any(|e| e.action == "agent.enroll" && e.actor == "agent:acme/site-a")
    );
    let audit_text = format!("{events:?}");
    assert!(!audit_text.contains(&created.code));
    assert_not_logged(&[
        &created.code,
        broker.admin_key.expose(),
        &key.serialize_pem(),
    ]);
}

#[tokio::test]
async fn expired_garbage_and_bad_requests_do_not_enroll() {
    let broker = Broker::start(true, None).await;
    let code = broker.enrollment_code("acme", "site-a").await;
    let mut client = broker.broker_client(broker.anonymous());

    // A bad CSR is refused without spending the code.
    let bad = client
        .enroll(pb::EnrollRequest {
            code: code.clone(),
            csr_der: b"not a csr".to_vec(),
            software_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("csr_der:"), "{}", bad.message());

    // Unknown codes.
    for garbage in ["", "tfe_0000000000000000000000000000000000000000", "hello"] {
        let err = client
            .enroll(pb::EnrollRequest {
                code: garbage.into(),
                csr_der: csr(&KeyPair::generate().unwrap()),
                software_version: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{garbage}");
    }

    // After its TTL (default one hour) the code is refused.
    broker.clock.advance(Duration::from_secs(3601));
    let expired = client
        .enroll(pb::EnrollRequest {
            code: code.clone(),
            csr_der: csr(&KeyPair::generate().unwrap()),
            software_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );
    assert!(
        broker
            .agent("acme", "site-a")
            .await
            .certificate_expire_time
            .is_none()
    );

    // Bad TTLs are refused with the field named.
    let err = broker
        .admin()
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            tenant: "acme".into(),
            agent: "site-b".into(),
            display_name: String::new(),
            ttl_seconds: 5,
            re_enroll: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("ttl_seconds:"),
        "{}",
        err.message()
    );
    assert_not_logged(&[&code]);
}

#[tokio::test]
async fn of_concurrent_enrollments_with_one_code_exactly_one_wins() {
    let broker = Broker::start(true, None).await;
    let code = broker.enrollment_code("acme", "site-a").await;
    let attempts = (0..8).map(|_| {
        let mut client = broker.broker_client(broker.anonymous());
        let code = code.clone();
        async move {
            client
                .enroll(pb::EnrollRequest {
                    code,
                    csr_der: csr(&KeyPair::generate().unwrap()),
                    software_version: String::new(),
                })
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for lost in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(lost.code(), Code::Unauthenticated, "{lost:?}");
    }
}

#[tokio::test]
async fn callers_without_a_valid_certificate_are_refused() {
    let broker = Broker::start(true, None).await;
    let (_key, _cert) = broker.enroll("acme", "site-a").await;

    // No certificate.
    let mut anonymous = broker.broker_client(broker.anonymous());
    let err = anonymous
        .issue_access_token(issue_request("mfp", "scan"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("client certificate is required"),
        "{}",
        err.message()
    );
    assert_eq!(
        renew(&mut anonymous).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // A certificate naming the same agent, from another CA.
    let other = tokenfleet_broker::identity::pki::generate_ca(
        "not the broker",
        OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let other_ca = AgentCa::from_pem(&other.cert_pem, &other.key_pem).unwrap();
    let id = AgentId::new("acme", "site-a").unwrap();
    let key = KeyPair::generate().unwrap();
    let forged = other_ca
        .issue(
            &csr(&key),
            &id,
            OffsetDateTime::now_utc(),
            Duration::from_secs(600),
        )
        .unwrap();
    let err = broker
        .broker_client(broker.with_certificate(&forged.cert_pem, &key))
        .issue_access_token(issue_request("mfp", "scan"))
        .await
        .unwrap_err();
    assert!(refused_by_tls_or(&err), "{err:?}");

    // A certificate of the broker's own CA that has expired.
    let ca = AgentCa::load_or_create(&broker.state).await.unwrap();
    let key = KeyPair::generate().unwrap();
    let expired = ca
        .issue(
            &csr(&key),
            &id,
            OffsetDateTime::now_utc() - time::Duration::hours(2),
            Duration::from_secs(600),
        )
        .unwrap();
    let err = broker
        .broker_client(broker.with_certificate(&expired.cert_pem, &key))
        .issue_access_token(issue_request("mfp", "scan"))
        .await
        .unwrap_err();
    assert!(refused_by_tls_or(&err), "{err:?}");

    // Anything else the CA signed for the agent but never handed out is not a current
    // certificate of the agent.
    let key = KeyPair::generate().unwrap();
    let unknown = ca
        .issue(
            &csr(&key),
            &id,
            OffsetDateTime::now_utc(),
            Duration::from_secs(600),
        )
        .unwrap();
    let err = broker
        .broker_client(broker.with_certificate(&unknown.cert_pem, &key))
        .issue_access_token(issue_request("mfp", "scan"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("replaced"), "{}", err.message());

    // The Admin API still works on a TLS connection without a client certificate.
    broker.admin().who_am_i(pb::WhoAmIRequest {}).await.unwrap();
}

#[tokio::test]
async fn a_revoked_agent_is_refused_on_its_next_call_without_restart() {
    let broker = Broker::start(true, None).await;
    let (key, cert) = broker.enroll("acme", "site-a").await;
    let mut client = broker.broker_client(broker.with_certificate(&cert.certificate_pem, &key));
    renew(&mut client).await.unwrap();

    let revoked = broker
        .admin()
        .revoke_agent(pb::RevokeAgentRequest {
            tenant: "acme".into(),
            name: "site-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);

    // Same connection, next call: refused.
    let err = renew(&mut client).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("revoked"), "{}", err.message());
    let err = client
        .issue_access_token(issue_request("mfp", "scan"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Revocation is final for the name.
    let err = broker
        .admin()
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            tenant: "acme".into(),
            agent: "site-a".into(),
            display_name: String::new(),
            ttl_seconds: 0,
            re_enroll: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let events = broker.audit("acme").await;
    assert!(
        events
            .iter()
            .any(|e| e.action == "agent.revoke" && e.result == "ok")
    );
    assert!(events.iter().any(|e| e.action == "token.issue"
        && e.actor == "agent:acme/site-a"
        && e.result == "permission_denied"));
}

/// Whether `client`'s certificate authenticates: asks for the token of `mfp-a` (hosted by
/// `acme/site-a`, mailbox `scan`), which an authenticated agent gets as far as the missing grant
/// (FAILED_PRECONDITION).
async fn authenticates(client: &mut TokenBrokerClient<Channel>) -> Result<(), tonic::Status> {
    let err = client
        .issue_access_token(issue_request("mfp-a", "scan"))
        .await
        .unwrap_err();
    if err.code() == Code::FailedPrecondition {
        Ok(())
    } else {
        Err(err)
    }
}

/// A certificate that expires while its connection stays open is refused on that connection's
/// next call: the TLS handshake verified it once, and each call checks its validity period
/// against the broker's clock (what the broker keeps of a certificate per DER does not keep it
/// valid). The connection is the same one throughout: a new handshake with the expired
/// certificate would fail in TLS, not with the broker's UNAUTHENTICATED naming the expiry.
#[tokio::test]
async fn a_certificate_expiring_on_an_open_connection_is_refused_on_its_next_call() {
    let broker = Broker::start(true, Some(Duration::from_secs(5))).await;
    broker.put_device("acme", "mfp-a", "site-a").await;
    let (key, cert) = broker.enroll("acme", "site-a").await;
    let mut client = broker.broker_client(broker.with_certificate(&cert.certificate_pem, &key));
    authenticates(&mut client).await.unwrap();
    authenticates(&mut client).await.unwrap();
    let expires = cert.expire_time.expect("the certificate's expiry").seconds;
    // Validity is checked in whole seconds (`now > not_after`): wait until two seconds past it.
    let wait = expires + 2 - OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (1..=8).contains(&wait),
        "a 5 s certificate expires in {wait} s"
    );
    tokio::time::sleep(Duration::from_secs(wait.unsigned_abs())).await;
    let err = authenticates(&mut client).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());
    // Renewal on the same connection is refused the same way: an expired agent enrolls again.
    let err = renew(&mut client).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn renewal_keeps_the_last_certificate_and_re_enrollment_retires_all() {
    let broker = Broker::start(true, None).await;
    let (key1, cert1) = broker.enroll("acme", "site-a").await;
    broker.put_device("acme", "mfp-a", "site-a").await;
    let mut first = broker.broker_client(broker.with_certificate(&cert1.certificate_pem, &key1));
    authenticates(&mut first).await.unwrap();
    let key2 = KeyPair::generate().unwrap();
    let cert2 = first
        .renew(pb::RenewRequest {
            csr_der: csr(&key2),
            software_version: "2.0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut second = broker.broker_client(broker.with_certificate(&cert2.certificate_pem, &key2));
    // Both the renewed-from and the new certificate work...
    authenticates(&mut first).await.unwrap();
    authenticates(&mut second).await.unwrap();
    assert_eq!(broker.agent("acme", "site-a").await.software_version, "2.0");
    // ...until the next renewal, which keeps only the one it was made with.
    renew(&mut second).await.unwrap();
    let mut stale = broker.broker_client(broker.with_certificate(&cert1.certificate_pem, &key1));
    let err = authenticates(&mut stale).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("replaced"), "{}", err.message());
    authenticates(&mut second).await.unwrap();

    // Enrolling again (with a re-enroll code) retires every older certificate.
    let (key4, cert4) = broker.enroll_with("acme", "site-a", true).await;
    let err = authenticates(&mut second).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut newest = broker.broker_client(broker.with_certificate(&cert4.certificate_pem, &key4));
    authenticates(&mut newest).await.unwrap();
}

#[tokio::test]
async fn issuance_needs_the_agent_to_host_the_device_in_its_own_tenant() {
    let broker = Broker::start(true, None).await;
    let (key_a, cert_a) = broker.enroll("acme", "site-a").await;
    broker.enroll("acme", "site-b").await;
    broker.enroll("other", "site-a").await;
    broker.put_device("acme", "mfp-a", "site-a").await;
    broker.put_device("acme", "mfp-b", "site-b").await;
    broker.put_device("other", "mfp-x", "site-a").await;
    Records::new(broker.state.store.as_ref())
        .put(&mailbox("acme", "ceo"), Precondition::Any)
        .await
        .unwrap();
    let mut a = broker.broker_client(broker.with_certificate(&cert_a.certificate_pem, &key_a));

    // Its own device and the mailbox its sender mode allows: authorized; no grant exists yet, so
    // the answer is FAILED_PRECONDITION from the token lifecycle.
    let err = a
        .issue_access_token(issue_request("mfp-a", "scan"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // A device hosted by another agent.
    let err = a
        .issue_access_token(issue_request("mfp-b", "scan"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("not hosted by agent `acme/site-a`"),
        "{}",
        err.message()
    );

    // A mailbox the sender mode does not allow.
    let err = a
        .issue_access_token(issue_request("mfp-a", "ceo"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Another tenant's device (hosted there by an agent of the same name): not visible.
    let err = a
        .issue_access_token(issue_request("mfp-x", "scan"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let events: Vec<_> = broker
        .audit("acme")
        .await
        .into_iter()
        .filter(|e| e.action == "token.issue")
        .collect();
    assert_eq!(events.len(), 4, "{events:#?}");
    assert!(events.iter().all(|e| e.actor == "agent:acme/site-a"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.result == "permission_denied")
            .count(),
        3
    );
    assert!(
        broker
            .audit("other")
            .await
            .iter()
            .all(|e| e.action != "token.issue")
    );
}

#[tokio::test]
async fn a_broker_without_tls_refuses_agents() {
    let broker = Broker::start(false, None).await;
    let err = broker
        .broker_client(broker.anonymous())
        .enroll(pb::EnrollRequest {
            code: "tfe_0000000000000000000000000000000000000000".into(),
            csr_der: csr(&KeyPair::generate().unwrap()),
            software_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("[tls]"), "{}", err.message());
}

#[tokio::test]
async fn the_agent_ca_survives_a_sealing_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<EmbeddedStore> = Arc::new(
        EmbeddedStore::open(dir.path().join("store.redb"))
            .await
            .unwrap(),
    );
    let (k1, k2) = (
        Keyring::generate_key_base64().unwrap(),
        Keyring::generate_key_base64().unwrap(),
    );
    let state = |current: &str, keys: &[(&str, &str)]| BrokerState {
        store: store.clone(),
        keyring: Arc::new(Keyring::from_base64(current, keys.iter().copied()).unwrap()),
        clock: Arc::new(ShiftedClock::default()),
    };
    let old = state("k1", &[("k1", &k1)]);
    let ca = AgentCa::load_or_create(&old).await.unwrap();
    // Loading again gives the same CA.
    let again = AgentCa::load_or_create(&old).await.unwrap();
    assert_eq!(ca.cert_pem(), again.cert_pem());

    let rotated = state("k2", &[("k1", &k1), ("k2", &k2)]);
    let report = tokenfleet_broker::reseal::reseal_all(&rotated)
        .await
        .unwrap();
    assert_eq!((report.examined, report.resealed), (1, 1));
    let only_new = state("k2", &[("k2", &k2)]);
    let reloaded = AgentCa::load_or_create(&only_new).await.unwrap();
    assert_eq!(reloaded.cert_pem(), ca.cert_pem());
    let report = tokenfleet_broker::reseal::reseal_all(&only_new)
        .await
        .unwrap();
    assert_eq!((report.examined, report.resealed), (1, 0));
}

/// Enrolls with `code` and a new key; the broker's answer.
async fn enroll_with_code(
    broker: &Broker,
    code: &str,
) -> Result<pb::AgentCertificate, tonic::Status> {
    broker
        .broker_client(broker.anonymous())
        .enroll(pb::EnrollRequest {
            code: code.to_owned(),
            csr_der: csr(&KeyPair::generate().unwrap()),
            software_version: "1.0".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn leftover_codes_cannot_take_an_agent_over() {
    let broker = Broker::start(true, None).await;
    // One live code per agent: a newer code replaces the older one.
    let first = broker.enrollment_code("acme", "site-a").await;
    let second = broker.enrollment_code("acme", "site-a").await;
    let err = enroll_with_code(&broker, &first).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("replaced by a newer code"),
        "{}",
        err.message()
    );
    enroll_with_code(&broker, &second).await.unwrap();

    // The agent holds a current certificate now: a plain code is refused, naming --re-enroll.
    let err = broker
        .admin()
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            tenant: "acme".into(),
            agent: "site-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("--re-enroll"), "{}", err.message());
    // A re-enroll code works, once; a plain code made before it is void.
    let re_enroll = broker.enrollment_code_with("acme", "site-a", true).await;
    enroll_with_code(&broker, &re_enroll).await.unwrap();
    assert_eq!(
        enroll_with_code(&broker, &re_enroll)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // A code does not survive deleting and re-creating its agent.
    let stale = broker.enrollment_code("acme", "site-b").await;
    let fresh_for_b = broker.enrollment_code("acme", "site-c").await;
    broker
        .admin()
        .delete_agent(pb::DeleteAgentRequest {
            tenant: "acme".into(),
            name: "site-b".into(),
            version: 0,
        })
        .await
        .unwrap();
    broker
        .admin()
        .create_agent(pb::CreateAgentRequest {
            agent: Some(pb::Agent {
                tenant: "acme".into(),
                name: "site-b".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let err = enroll_with_code(&broker, &stale).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Nor does it when the record is replaced behind the admin API's back (same name, new
    // creation time): the code is bound to the record it was made for.
    let bound = broker.enrollment_code("acme", "site-b").await;
    let records = broker.records();
    let key = tokenfleet_broker::records::agent_key("acme", "site-b");
    let mut agent = records
        .get::<tokenfleet_domain::Agent>(&key)
        .await
        .unwrap()
        .unwrap()
        .value;
    agent.stamps.created += time::Duration::seconds(1);
    records.put(&agent, Precondition::Any).await.unwrap();
    let err = enroll_with_code(&broker, &bound).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("re-created"), "{}", err.message());
    // Other agents' codes are untouched by all this.
    enroll_with_code(&broker, &fresh_for_b).await.unwrap();
}

// ----------------------------------------------------------------------------------------------
// The issuance fast path (issue 15): one store read per call, the handshake's verification
// trusted, audit appends committed in groups. Each guarantee still holds per call.
// ----------------------------------------------------------------------------------------------

/// A grant of `tenant`/`mailbox` holding a cached access token `token` valid for an hour.
async fn put_cached_grant(state: &BrokerState, tenant: &str, mailbox: &str, token: &str) {
    use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, seal_field};
    let seal = |field, value: &str| {
        seal_field(
            &state.keyring,
            tenant,
            mailbox,
            field,
            &tokenfleet_seal::Secret::new(value),
        )
        .unwrap()
    };
    let now = state.clock.now();
    let mut g = GrantRecord::empty(tenant, mailbox);
    g.refresh_token = Some(seal(GrantField::RefreshToken, "made-up-refresh-token"));
    g.access_token = Some(seal(GrantField::AccessToken, token));
    g.refresh_token_obtained = Some(now);
    g.state.status = tokenfleet_domain::TokenStatus::Active;
    g.state.last_refresh = Some(now);
    g.state.access_token_expires = Some(now + time::Duration::hours(1));
    Records::new(state.store.as_ref())
        .put(&g, Precondition::Any)
        .await
        .unwrap();
}

/// Asks for the token of `mfp-a`/`scan` and checks it is the cached one.
async fn issues_cached(client: &mut TokenBrokerClient<Channel>) -> Result<(), tonic::Status> {
    let answer = client
        .issue_access_token(issue_request("mfp-a", "scan"))
        .await?
        .into_inner();
    assert_eq!(answer.access_token, "cached-access-token");
    Ok(())
}

#[tokio::test]
async fn with_a_cached_token_revocation_and_re_enrollment_still_refuse_the_next_call() {
    let broker = Broker::start(true, None).await;
    let (key1, cert1) = broker.enroll("acme", "site-a").await;
    broker.put_device("acme", "mfp-a", "site-a").await;
    put_cached_grant(&broker.state, "acme", "scan", "cached-access-token").await;
    let mut first = broker.broker_client(broker.with_certificate(&cert1.certificate_pem, &key1));
    issues_cached(&mut first).await.unwrap();
    issues_cached(&mut first).await.unwrap();

    // Re-enrollment: the open connection with the old certificate is refused on its next call.
    let (key2, cert2) = broker.enroll_with("acme", "site-a", true).await;
    let err = issues_cached(&mut first).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("replaced"), "{}", err.message());
    let mut second = broker.broker_client(broker.with_certificate(&cert2.certificate_pem, &key2));
    issues_cached(&mut second).await.unwrap();

    // Revocation: the next call on the same connection is refused, and audited.
    broker
        .admin()
        .revoke_agent(pb::RevokeAgentRequest {
            tenant: "acme".into(),
            name: "site-a".into(),
        })
        .await
        .unwrap();
    let err = issues_cached(&mut second).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("revoked"), "{}", err.message());
    let refused = broker
        .audit("acme")
        .await
        .into_iter()
        .filter(|e| e.action == "token.issue" && e.result == "permission_denied")
        .count();
    assert_eq!(
        refused, 2,
        "the superseded and the revoked call are audited"
    );
}

/// The broker keeps an agent's records, and the token it opened, between calls only while the
/// tenant's records are unchanged: a new token stored for the mailbox (as a refresh on another
/// replica would store it) and the device moved to another agent reach the very next call.
#[tokio::test]
async fn a_changed_token_or_device_reaches_the_next_call() {
    let broker = Broker::start(true, None).await;
    let (key, cert) = broker.enroll("acme", "site-a").await;
    broker.put_device("acme", "mfp-a", "site-a").await;
    put_cached_grant(&broker.state, "acme", "scan", "cached-access-token").await;
    let mut client = broker.broker_client(broker.with_certificate(&cert.certificate_pem, &key));
    issues_cached(&mut client).await.unwrap();
    issues_cached(&mut client).await.unwrap();

    put_cached_grant(&broker.state, "acme", "scan", "refreshed-access-token").await;
    let answer = client
        .issue_access_token(issue_request("mfp-a", "scan"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.access_token, "refreshed-access-token",
        "the token stored after the kept snapshot is the one issued"
    );

    broker.put_device("acme", "mfp-a", "site-b").await;
    let err = client
        .issue_access_token(issue_request("mfp-a", "scan"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// `calls` concurrent issuances over `connections` connections of one agent: every one is
/// answered with the cached token, and every answered one has its audit record (the embedded
/// store commits concurrent appends in groups, each durable before its calls are answered).
async fn concurrent_issuances_are_all_audited(broker: &Broker) {
    const CALLS: usize = 300;
    const CONNECTIONS: usize = 4;
    let (key, cert) = broker.enroll("acme", "site-a").await;
    broker.put_device("acme", "mfp-a", "site-a").await;
    put_cached_grant(&broker.state, "acme", "scan", "cached-access-token").await;
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| broker.broker_client(broker.with_certificate(&cert.certificate_pem, &key)))
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let mut client = clients[i % CONNECTIONS].clone();
        calls.spawn(async move { issues_cached(&mut client).await });
    }
    let mut answered = 0;
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
        answered += 1;
    }
    assert_eq!(answered, CALLS);
    let mut audited = 0;
    let mut page_token = String::new();
    loop {
        let page = broker
            .admin()
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant: "acme".into(),
                page_size: 1000,
                page_token,
                kind: "issuance".into(),
            })
            .await
            .unwrap()
            .into_inner();
        audited += page
            .events
            .iter()
            .filter(|e| {
                e.action == "token.issue" && e.result == "ok" && e.actor == "agent:acme/site-a"
            })
            .count();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        audited, CALLS,
        "every answered issuance has its audit record"
    );
}

#[tokio::test]
async fn concurrent_issuances_are_each_audited_on_the_embedded_store() {
    log_capture();
    let broker = Broker::launch(Launch::tls(), |raw| raw.agents.issue_rate_per_minute = 0).await;
    broker.put_tenant("acme").await;
    concurrent_issuances_are_all_audited(&broker).await;
}

#[tokio::test]
async fn concurrent_issuances_are_each_audited_on_redis() {
    log_capture();
    let redis = tokenfleet_testkit::redis::RedisServer::start()
        .await
        .unwrap();
    let broker = Broker::launch(
        Launch {
            redis: Some(redis.url()),
            ..Launch::tls()
        },
        |raw| raw.agents.issue_rate_per_minute = 0,
    )
    .await;
    broker.put_tenant("acme").await;
    concurrent_issuances_are_all_audited(&broker).await;
}

/// An enrollment proves its call once its one-time code is redeemed: through the real server
/// over TLS with `grpc_max_anonymous_connections = 2`, an `Enroll` held while its certificate is
/// written (after the redemption) keeps its connection while three new connections without a
/// certificate arrive — each of them closes the one that waited longest instead — and ends with
/// its certificate. Closing it there would have spent the code for nothing (the old rule closed
/// it: the call failed and the code was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_past_its_code_is_not_closed_for_new_connections() {
    log_capture();
    let (wrap, held) = HeldWrites::holding(tokenfleet_broker::identity::AGENT_CERTIFICATES);
    let launch = Launch {
        tls: true,
        wrap_store: Some(wrap),
        ..Launch::default()
    };
    let broker = Broker::launch(launch, |raw| {
        raw.limits.grpc_max_anonymous_connections = 2;
    })
    .await;
    broker.put_tenant("acme").await;
    let code = broker.enrollment_code("acme", "site-a").await;
    let key = KeyPair::generate().unwrap();
    let channel = broker.connected_anonymous().await.unwrap();
    let enrolling = tokio::spawn(async move {
        TokenBrokerClient::new(channel)
            .enroll(pb::EnrollRequest {
                code,
                csr_der: csr(&key),
                software_version: "1.2.3".into(),
            })
            .await
    });
    tokio::time::timeout(Duration::from_secs(20), held.reached())
        .await
        .expect("the enrollment reached the write of its certificate");
    // Three newcomers: over the limit, each closes the connection that waited longest.
    let mut newcomers = Vec::new();
    for _ in 0..3 {
        newcomers.push(broker.connected_anonymous().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held.release();
    let answer = tokio::time::timeout(Duration::from_secs(20), enrolling)
        .await
        .expect("the enrollment answered")
        .unwrap();
    let certificate = answer
        .expect("the enrollment was cut off after its code was redeemed")
        .into_inner();
    assert!(
        certificate.certificate_pem.contains("BEGIN CERTIFICATE"),
        "{certificate:?}"
    );
    // The pressure was real: each newcomer finished its handshake.
    for (n, newcomer) in newcomers.iter().enumerate() {
        assert!(newcomer.is_ok(), "newcomer {n}: {newcomer:?}");
    }
}
