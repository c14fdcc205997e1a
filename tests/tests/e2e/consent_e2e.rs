//! Consent end to end: the Admin API of an in-process broker (its background device-code poller,
//! its `/oauth/callback` on the HTTP listener) against the fake identity provider, and two
//! pollers sharing a real `redis-server` where the first dies mid-poll.

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokenfleet_broker::config::RedisSection;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::consent::{self, Challenge};
use tokenfleet_broker::tokens::device_poller::{DevicePoller, PollOutcome, PollerSettings};
use tokenfleet_domain::{
    GrantType as DomGrantType, MailPurpose as DomMailPurpose, Mailbox,
    MailboxKind as DomMailboxKind, Provider, ProviderKind as DomProviderKind, Stamps, SystemClock,
    Tenant, TokenStatus as DomTokenStatus,
};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Keyring;
use tokenfleet_store::Precondition;
use tokenfleet_store::redis_store::RedisStore;
use tokenfleet_testkit::broker::{TestAdminClient, TestBroker, TestStore};
use tokenfleet_testkit::fake_idp::{ClientSpec, Endpoint, FakeIdp};
use tokenfleet_testkit::redis::RedisServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TENANT: &str = "acme";
const ENTRA: &str = "contoso.example";
const USER: &str = "scanner@contoso.example";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "s3cret-client-value";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Polls `check` until it returns `Some`, failing after `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path_and_query` over plain HTTP/1.1; returns status code and body.
async fn http_get(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn fake_with_user(fake: &FakeIdp) {
    fake.add_user(USER);
    fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
}

/// Tenant `acme`, provider `m365` on the fake, and mailboxes through the Admin API.
async fn setup(admin: &mut TestAdminClient, fake: &FakeIdp, mailboxes: &[(&str, pb::GrantType)]) {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: TENANT.into(),
                display_name: "Acme".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let e = fake.microsoft_endpoints(ENTRA);
    admin
        .create_provider(pb::CreateProviderRequest {
            provider: Some(pb::Provider {
                tenant: TENANT.into(),
                name: "m365".into(),
                kind: pb::ProviderKind::Microsoft as i32,
                authority: ENTRA.into(),
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                endpoints: Some(pb::ProviderEndpoints {
                    authorize_url: e.authorize_url,
                    token_url: e.token_url,
                    device_code_url: e.device_code_url,
                    revoke_url: e.revoke_url,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for (name, grant_type) in mailboxes {
        admin
            .create_mailbox(pb::CreateMailboxRequest {
                mailbox: Some(pb::Mailbox {
                    tenant: TENANT.into(),
                    name: (*name).into(),
                    address: USER.into(),
                    provider: "m365".into(),
                    grant_type: *grant_type as i32,
                    kind: pb::MailboxKind::Bulk as i32,
                    purposes: vec![pb::MailPurpose::Send as i32],
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
}

async fn token_state(admin: &mut TestAdminClient, name: &str) -> pb::TokenState {
    admin
        .get_mailbox(pb::GetMailboxRequest {
            tenant: TENANT.into(),
            name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap_or_default()
}

async fn audit_actions(admin: &mut TestAdminClient) -> Vec<(String, String, String)> {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant: TENANT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| (e.action, e.result, e.actor))
        .collect()
}

#[tokio::test]
async fn device_code_consent_through_the_admin_api_and_the_background_poller() {
    let fake = FakeIdp::start().await.unwrap();
    fake_with_user(&fake);
    fake.set_device_interval(1);
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let mut admin = broker.admin_client();
    setup(
        &mut admin,
        &fake,
        &[("scan", pb::GrantType::DelegatedDeviceCode)],
    )
    .await;

    let started = admin
        .start_consent(pb::StartConsentRequest {
            tenant: TENANT.into(),
            mailbox: "scan".into(),
            redirect_uri: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::start_consent_response::Challenge::DeviceCode(challenge)) = started.challenge
    else {
        panic!("expected a device code challenge: {started:?}");
    };
    assert_eq!(challenge.verification_uri, fake.device_login_url());
    assert_eq!(challenge.interval_seconds, 1);
    assert!(challenge.message.contains(&challenge.user_code));
    assert_eq!(
        started.mailbox.unwrap().token.unwrap().status,
        pb::TokenStatus::ConsentPending as i32
    );

    // GetMailbox shows the pending code while the broker polls.
    let token = token_state(&mut admin, "scan").await;
    assert_eq!(token.status, pb::TokenStatus::ConsentPending as i32);
    assert_eq!(
        token.pending_device_code.unwrap().user_code,
        challenge.user_code
    );
    eventually("the first poll", Duration::from_secs(10), || async {
        (fake.token_requests(DEVICE_GRANT) > 0).then_some(())
    })
    .await;
    fake.approve_device_code(&challenge.user_code, USER)
        .unwrap();
    let token = eventually(
        "the mailbox to become ACTIVE",
        Duration::from_secs(15),
        || {
            let mut admin = admin.clone();
            async move {
                let token = token_state(&mut admin, "scan").await;
                (token.status == pb::TokenStatus::Active as i32).then_some(token)
            }
        },
    )
    .await;
    assert!(token.pending_device_code.is_none());
    assert!(token.access_token_expire_time.is_some());
    assert!(token.next_refresh_time.is_some());
    let successes = fake
        .requests_to(Endpoint::MicrosoftToken)
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some(DEVICE_GRANT) && r.status == 200)
        .count();
    assert_eq!(successes, 1);

    // The poller audits right after writing the grant.
    let audit = eventually(
        "the consent.complete audit event",
        Duration::from_secs(5),
        || {
            let mut admin = admin.clone();
            async move {
                let audit = audit_actions(&mut admin).await;
                audit
                    .iter()
                    .any(|(a, r, actor)| {
                        a == "consent.complete" && r == "ok" && actor.starts_with("broker:")
                    })
                    .then_some(audit)
            }
        },
    )
    .await;
    assert!(
        audit
            .iter()
            .any(|(a, r, _)| a == "consent.start" && r == "ok"),
        "{audit:?}"
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn auth_code_consent_through_the_http_callback_and_pasted_urls() {
    let fake = FakeIdp::start().await.unwrap();
    fake_with_user(&fake);
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let mut admin = broker.admin_client();
    setup(
        &mut admin,
        &fake,
        &[
            ("scan", pb::GrantType::DelegatedAuthCode),
            ("fax", pb::GrantType::DelegatedAuthCode),
        ],
    )
    .await;
    let callback = format!("http://{}/oauth/callback", broker.http_addr);
    let starter = admin.clone();
    let start = move |name: &'static str| {
        let mut admin = starter.clone();
        let callback = callback.clone();
        async move {
            let started = admin
                .start_consent(pb::StartConsentRequest {
                    tenant: TENANT.into(),
                    mailbox: name.into(),
                    redirect_uri: callback.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let Some(pb::start_consent_response::Challenge::Authorization(a)) = started.challenge
            else {
                panic!("expected an authorization challenge: {started:?}");
            };
            assert_eq!(a.redirect_uri, callback);
            a
        }
    };

    // The browser comes back to the broker's callback.
    let a = start("scan").await;
    let redirected = fake.authorize_url(&a.authorization_url, USER).unwrap();
    let path = redirected
        .strip_prefix(&format!("http://{}", broker.http_addr))
        .unwrap();
    let (status, page) = http_get(broker.http_addr, path).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(&format!(
            "Consent recorded for <strong>{USER}</strong>; you can close this window"
        )),
        "{page}"
    );
    assert_eq!(
        token_state(&mut admin, "scan").await.status,
        pb::TokenStatus::Active as i32
    );
    // The same redirect again: nothing waits for it any more.
    let (status, page) = http_get(broker.http_addr, path).await;
    assert_eq!(status, 404, "{page}");

    // A pasted redirect URL of another attempt is refused; the right one completes the consent.
    let a = start("fax").await;
    let redirected = fake.authorize_url(&a.authorization_url, USER).unwrap();
    let forged = redirected.replace(&format!("state={}", a.state), "state=not-this-one");
    let err = admin
        .complete_consent(pb::CompleteConsentRequest {
            tenant: TENANT.into(),
            mailbox: "fax".into(),
            code: forged,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("state does not match the consent that was started; start again"),
        "{}",
        err.message()
    );
    let m = admin
        .complete_consent(pb::CompleteConsentRequest {
            tenant: TENANT.into(),
            mailbox: "fax".into(),
            code: redirected,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.token.unwrap().status, pb::TokenStatus::Active as i32);
    assert_eq!(fake.live_refresh_tokens(USER).len(), 2);

    // A viewer may not start consents; the refusal is audited.
    let viewer = broker
        .create_key(tokenfleet_domain::Role::Viewer, None)
        .await;
    let err = broker
        .client_with_key(&viewer)
        .start_consent(pb::StartConsentRequest {
            tenant: TENANT.into(),
            mailbox: "fax".into(),
            redirect_uri: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let audit = audit_actions(&mut admin).await;
    assert!(
        audit.iter().any(|(a, r, actor)| a == "consent.complete"
            && r == "ok"
            && actor.starts_with("browser:")),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|(a, r, _)| a == "consent.complete" && r == "invalid_argument"),
        "{audit:?}"
    );
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn app_only_mailboxes_get_their_token_without_a_person() {
    let fake = FakeIdp::start().await.unwrap();
    fake_with_user(&fake);
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let mut admin = broker.admin_client();
    setup(&mut admin, &fake, &[("relay", pb::GrantType::AppOnly)]).await;
    let started = admin
        .start_consent(pb::StartConsentRequest {
            tenant: TENANT.into(),
            mailbox: "relay".into(),
            redirect_uri: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(started.challenge.is_none());
    assert_eq!(
        started.mailbox.unwrap().token.unwrap().status,
        pb::TokenStatus::Active as i32
    );
    assert_eq!(fake.token_requests("client_credentials"), 1);
    assert!(fake.pending_device_codes().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Two replicas on one Redis: the one polling dies, the other finishes the consent.

async fn redis_state(url: &str, key: &str) -> BrokerState {
    let config = RedisSection::standalone(url).to_redis_config().unwrap();
    let store = RedisStore::connect(&config).await.unwrap();
    BrokerState {
        store: Arc::new(store),
        keyring: Arc::new(Keyring::from_base64("k1", [("k1", key)]).unwrap()),
        clock: Arc::new(SystemClock),
    }
}

#[tokio::test]
async fn a_replica_killed_mid_poll_leaves_the_consent_to_another_replica() {
    let redis = RedisServer::start().await.unwrap();
    let fake = FakeIdp::start().await.unwrap();
    fake_with_user(&fake);
    fake.set_device_interval(1);
    let key = Keyring::generate_key_base64().unwrap();
    // Two replicas: separate store connections, the same sealing key.
    let a = redis_state(&redis.url(), &key).await;
    let b = redis_state(&redis.url(), &key).await;

    let records = tokenfleet_broker::records::Records::new(a.store.as_ref());
    let now = a.clock.now();
    records
        .put(
            &Tenant {
                name: TENANT.into(),
                display_name: String::new(),
                stamps: Stamps::new(now),
            },
            Precondition::Absent,
        )
        .await
        .unwrap();
    let e = fake.microsoft_endpoints(ENTRA);
    records
        .put(
            &Provider {
                tenant: TENANT.into(),
                name: "m365".into(),
                kind: DomProviderKind::Microsoft,
                authority: ENTRA.into(),
                client_id: CLIENT_ID.into(),
                client_secret: None,
                endpoints: e,
                http_proxy: String::new(),
                http_proxy_password: None,
                extra_ca_pem: String::new(),
                scopes: vec![],
                service_account_key: None,
                stamps: Stamps::new(now),
            },
            Precondition::Absent,
        )
        .await
        .unwrap();
    records
        .put(
            &Mailbox {
                consent_account: String::new(),
                tenant: TENANT.into(),
                name: "scan".into(),
                address: USER.into(),
                provider: "m365".into(),
                grant_type: DomGrantType::DelegatedDeviceCode,
                kind: DomMailboxKind::Bulk,
                purposes: vec![DomMailPurpose::Send],
                disabled: false,
                token: Default::default(),
                stamps: Stamps::new(now),
            },
            Precondition::Absent,
        )
        .await
        .unwrap();

    let started = consent::start(&a, TENANT, "scan", None, "http://unused")
        .await
        .unwrap();
    let Challenge::DeviceCode { user_code, .. } = started.challenge else {
        panic!("expected a device code");
    };
    let lease_ttl = Duration::from_secs(3);
    let settings = PollerSettings {
        tick: Duration::from_millis(100),
        lease_ttl,
        batch: 10,
    };

    // Replica A polls; the fake answers slowly, so A is caught waiting for the answer.
    fake.set_latency(Duration::from_secs(30));
    let poller_a = DevicePoller::new(a.clone()).with_settings(settings);
    let (_stop_a, stop_rx) = tokio::sync::watch::channel(false);
    let task_a = tokio::spawn(poller_a.run(stop_rx));
    eventually(
        "replica A's poll to reach the provider",
        Duration::from_secs(10),
        || async { (fake.token_requests(DEVICE_GRANT) == 1).then_some(()) },
    )
    .await;
    let killed_at = Instant::now();
    task_a.abort();
    let _ = task_a.await;
    fake.set_latency(Duration::ZERO);
    fake.approve_device_code(&user_code, USER).unwrap();

    // Replica B finds the mailbox due but leased, until A's lease expires.
    let poller_b = DevicePoller::new(b.clone()).with_settings(settings);
    let saw_lease = AtomicBool::new(false);
    let granted_at = eventually(
        "replica B to finish the consent",
        Duration::from_secs(20),
        || {
            let poller_b = poller_b.clone();
            let saw_lease = &saw_lease;
            async move {
                for (_, outcome) in poller_b.run_once().await.unwrap() {
                    match outcome {
                        PollOutcome::Leased => saw_lease.store(true, Ordering::SeqCst),
                        PollOutcome::Granted => return Some(Instant::now()),
                        other => panic!("unexpected outcome {other:?}"),
                    }
                }
                None
            }
        },
    )
    .await;
    assert!(
        saw_lease.load(Ordering::SeqCst),
        "replica B never found A's lease"
    );
    assert!(
        granted_at.duration_since(killed_at) < lease_ttl + Duration::from_secs(5),
        "took over only after {:?}",
        granted_at.duration_since(killed_at)
    );
    let grant = consent::load_grant(&b, TENANT, "scan").await.unwrap().grant;
    assert_eq!(grant.state.status, DomTokenStatus::Active);
    assert!(grant.refresh_token.is_some());
    // Exactly one successful token exchange: A's poll got "pending", B's got the tokens.
    let device_polls: Vec<u16> = fake
        .requests_to(Endpoint::MicrosoftToken)
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some(DEVICE_GRANT))
        .map(|r| r.status)
        .collect();
    assert_eq!(
        device_polls.iter().filter(|s| **s == 200).count(),
        1,
        "{device_polls:?}"
    );
    assert_eq!(device_polls.first(), Some(&400), "{device_polls:?}");
    assert_eq!(fake.live_refresh_tokens(USER).len(), 1);
    // Nothing left to poll.
    assert!(
        b.store
            .due(consent::CONSENT_POLL_SCHEDULE, i64::MAX / 4, 10)
            .await
            .unwrap()
            .is_empty()
    );
}
