//! Alerts end to end: the token lifecycle against the fake identity provider over HTTP, on the
//! embedded store and a real `redis-server`, delivering to an in-test webhook receiver on
//! 127.0.0.1:0 (which checks the HMAC) and to a small in-test SMTP receiver (a test double that
//! speaks just enough SMTP: EHLO, AUTH XOAUTH2, MAIL, RCPT, DATA, QUIT, and records what it got).
//!
//! One failing mailbox is one signed webhook delivery, also with more failing refreshes and two
//! replicas on one Redis; 503s are retried; recovery and a new failure alert again; a Google app
//! in "Testing" gets one expiry alert; the e-mail alert goes out with the sender mailbox's token
//! and carries no token.

// Test helpers panic on setup failures: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use time::OffsetDateTime;
use tokenfleet_broker::alerts::webhook::{
    EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify,
};
use tokenfleet_broker::alerts::{
    ALERT_OUTBOX, AlertEvent, AlertKind, AlertRecord, Alerter, AlertsConfig, EmailConfig,
    RetryPolicy, SmtpAuth, SmtpSecurity, WebhookConfig, alert_key,
};
use tokenfleet_broker::records::Records;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, grant_key, seal_field};
use tokenfleet_broker::tokens::lifecycle::{TokenConfig, TokenError, TokenService};
use tokenfleet_broker::tokens::scheduler::schedule_refresh;
use tokenfleet_domain::{
    Clock, GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind, Stamps,
    TokenState, TokenStatus,
};
use tokenfleet_providers::{ProviderClient, ProviderSettings};
use tokenfleet_seal::Secret;
use tokenfleet_store::Precondition;
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

use crate::support::{Backend, IdpEnv, ManualClock, StoreHome, eventually, idp_env};

const TENANT: &str = "acme";
const PROVIDER: &str = "idp";
const CLIENT_ID: &str = "app-alerts";
const CLIENT_SECRET: &str = "client-secret-alerts-do-not-leak";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
const WEBHOOK_SECRET: &str = "webhook-hmac-key-0123456789abcdef";

// ----------------------------------------------------------------------------------------------
// Harness
// ----------------------------------------------------------------------------------------------

/// The shared token settings, refreshing at most every ten days.
fn token_config() -> TokenConfig {
    TokenConfig {
        max_refresh_interval: Duration::from_secs(10 * 24 * 3600),
        ..crate::support::token_config()
    }
}

fn alerts_config(webhook: Option<String>, email: Option<EmailConfig>) -> AlertsConfig {
    AlertsConfig {
        webhook: webhook.map(|url| WebhookConfig {
            url,
            secret: Secret::new(WEBHOOK_SECRET),
        }),
        email,
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            attempts: 4,
            min: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        redeliver_after: Duration::from_secs(60),
        sweep_interval: Duration::from_millis(100),
        ..AlertsConfig::default()
    }
}

/// The shared pieces: store, fake IdP, records. Replicas ([`Replica`]) are built on top.
struct Env {
    fake: FakeIdp,
    state: BrokerState,
    _store: StoreHome,
}

/// One broker replica's token service with its alerter and delivery worker.
struct Replica {
    service: TokenService,
    alerter: Alerter,
}

fn address(name: &str) -> String {
    format!("{name}@contoso.example")
}

impl Env {
    async fn start(
        backend: Backend,
        kind: ProviderKind,
        client: ClientSpec,
        clock: Arc<dyn Clock>,
    ) -> Env {
        let IdpEnv {
            fake, state, home, ..
        } = idp_env(backend, clock, client, TENANT, PROVIDER, kind).await;
        tokenfleet_testkit::logs::secret(WEBHOOK_SECRET);
        Env {
            fake,
            state,
            _store: home,
        }
    }

    fn replica(&self, config: AlertsConfig) -> Replica {
        let alerter = Alerter::new(self.state.clone(), config).unwrap();
        let service =
            TokenService::new(self.state.clone(), token_config()).with_alerts(alerter.clone());
        alerter.spawn_worker(service.clone(), std::future::pending());
        Replica { service, alerter }
    }

    fn records(&self) -> Records<'_> {
        Records::new(self.state.store.as_ref())
    }

    fn now(&self) -> OffsetDateTime {
        self.state.clock.now()
    }

    /// A delegated mailbox whose owner consented through the fake's auth-code path; written
    /// sealed and ACTIVE as a completed consent leaves it (with the refresh token's expiry, when
    /// the provider gave one). Returns the refresh token.
    async fn consented_mailbox(&self, name: &str) -> String {
        let now = self.now();
        self.records()
            .put(
                &Mailbox {
                    consent_account: String::new(),
                    tenant: TENANT.into(),
                    name: name.into(),
                    address: address(name),
                    provider: PROVIDER.into(),
                    grant_type: GrantType::DelegatedAuthCode,
                    kind: MailboxKind::Bulk,
                    purposes: vec![MailPurpose::Send],
                    disabled: false,
                    token: TokenState::default(),
                    stamps: Stamps::new(now),
                },
                Precondition::Absent,
            )
            .await
            .unwrap();
        let user = address(name);
        self.fake.add_user(&user);
        let p = self
            .records()
            .get::<Provider>(&tokenfleet_broker::records::provider_key(TENANT, PROVIDER))
            .await
            .unwrap()
            .unwrap()
            .value;
        let client = ProviderClient::new(
            ProviderSettings::from_provider(&p, Some(Secret::new(CLIENT_SECRET))).unwrap(),
        )
        .unwrap();
        let scopes = client
            .scopes_for(GrantType::DelegatedAuthCode, &[MailPurpose::Send])
            .unwrap();
        let auth = client
            .authorization_url(&scopes, REDIRECT, "st", None)
            .unwrap();
        let redirect = self.fake.authorize_url(&auth.url, &user).unwrap();
        let code = url::Url::parse(&redirect)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        let granted = client
            .exchange_code(&Secret::new(code), &auth.pkce_verifier, REDIRECT)
            .await
            .unwrap();
        let rt = granted.refresh_token.clone().expect("refresh token");
        let seal = |field, value: &Secret| {
            seal_field(&self.state.keyring, TENANT, name, field, value).unwrap()
        };
        let mut g = GrantRecord::empty(TENANT, name);
        g.state.status = TokenStatus::Active;
        g.state.last_refresh = Some(now);
        g.state.access_token_expires = Some(now + granted.expires_in);
        g.access_token = Some(seal(GrantField::AccessToken, &granted.access_token));
        g.refresh_token = Some(seal(GrantField::RefreshToken, &rt));
        g.refresh_token_obtained = Some(now);
        g.refresh_token_expires = granted.refresh_token_expires_in.map(|d| now + d);
        g.scopes = scopes;
        let next = now + granted.expires_in.mul_f64(0.75);
        g.next_refresh = Some(next);
        self.records().put(&g, Precondition::Absent).await.unwrap();
        schedule_refresh(self.state.store.as_ref(), TENANT, name, next)
            .await
            .unwrap();
        rt.expose().to_owned()
    }

    async fn grant(&self, mailbox: &str) -> GrantRecord {
        self.records()
            .get::<GrantRecord>(&grant_key(TENANT, mailbox))
            .await
            .unwrap()
            .unwrap()
            .value
    }

    async fn alert(&self, mailbox: &str, kind: AlertKind) -> Option<AlertRecord> {
        self.records()
            .get::<AlertRecord>(&alert_key(TENANT, mailbox, kind))
            .await
            .unwrap()
            .map(|r| r.value)
    }

    /// Waits until the alert of `kind` for `mailbox` is recorded as delivered everywhere and off
    /// the outbox.
    async fn settled(&self, mailbox: &str, kind: AlertKind) -> AlertRecord {
        eventually(
            "the alert to be delivered",
            Duration::from_secs(10),
            async || {
                let record = self.alert(mailbox, kind).await?;
                let far = OffsetDateTime::now_utc() + Duration::from_secs(3650 * 24 * 3600);
                let outbox = self
                    .state
                    .store
                    .due(
                        ALERT_OUTBOX,
                        tokenfleet_broker::tokens::scheduler::unix_ms(far),
                        100,
                    )
                    .await
                    .unwrap();
                (record.done() && outbox.is_empty()).then_some(record)
            },
        )
        .await
    }
}

// ----------------------------------------------------------------------------------------------
// Webhook receiver (checks nothing itself; records everything)
// ----------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Hook {
    status: u16,
    signature: String,
    timestamp: String,
    event_id: String,
    body: Vec<u8>,
}

impl Hook {
    fn event(&self) -> AlertEvent {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Hook>>>,
    /// Statuses to answer with before answering 200.
    script: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(receiver.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, format!("http://{addr}/hook"))
    }

    fn seen(&self) -> Vec<Hook> {
        self.seen.lock().unwrap().clone()
    }

    /// Successful deliveries.
    fn delivered(&self) -> Vec<Hook> {
        self.seen()
            .into_iter()
            .filter(|h| h.status == 200)
            .collect()
    }

    fn delivered_for(&self, mailbox: &str, kind: AlertKind) -> Vec<AlertEvent> {
        self.delivered()
            .iter()
            .map(Hook::event)
            .filter(|e| e.mailbox == mailbox && e.kind == kind)
            .collect()
    }
}

async fn hook(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let status = r.script.lock().unwrap().pop_front().unwrap_or(200);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    r.seen.lock().unwrap().push(Hook {
        status,
        signature: header(SIGNATURE_HEADER),
        timestamp: header(TIMESTAMP_HEADER),
        event_id: header(EVENT_ID_HEADER),
        body: body.to_vec(),
    });
    StatusCode::from_u16(status).unwrap()
}

/// The signature checks a receiver does, and the event's content.
fn assert_signed(hook: &Hook) {
    assert!(
        verify(WEBHOOK_SECRET.as_bytes(), &hook.body, &hook.signature),
        "signature verifies with the shared key"
    );
    assert!(
        !verify(
            b"some-other-key-0123456789abcdef",
            &hook.body,
            &hook.signature
        ),
        "and fails with any other"
    );
    let event = hook.event();
    assert_eq!(hook.event_id, event.id);
    let ts: i64 = hook.timestamp.parse().unwrap();
    assert!((ts - OffsetDateTime::now_utc().unix_timestamp()).abs() < 300);
    let text = String::from_utf8(hook.body.clone()).unwrap();
    for leak in ["fake-at-", "fake-rt-", CLIENT_SECRET, WEBHOOK_SECRET] {
        assert!(!text.contains(leak), "the alert carries no secret: {text}");
    }
}

/// Raises an alert for an unrelated mailbox and waits for its delivery: everything queued
/// before it on this replica has been tried by then (the receiver's view is final enough to
/// count).
async fn flush(env: &Env, replica: &Replica, receiver: &Receiver, marker: &str) {
    let event = AlertEvent {
        id: format!("alert-marker-{marker}"),
        kind: AlertKind::ReauthRequired,
        tenant: TENANT.into(),
        mailbox: marker.into(),
        address: address(marker),
        code: "marker".into(),
        reason: "marker".into(),
        fix: "none".into(),
        expires_at: None,
        time: env.now(),
    };
    assert!(replica.alerter.raise(event, "marker").await.unwrap());
    eventually("the marker alert", Duration::from_secs(10), async || {
        (!receiver
            .delivered_for(marker, AlertKind::ReauthRequired)
            .is_empty())
        .then_some(())
    })
    .await;
}

// ----------------------------------------------------------------------------------------------
// Webhook
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_failing_mailbox_is_one_signed_webhook_alert() {
    let (receiver, url) = Receiver::start().await;
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET),
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let replica = env.replica(alerts_config(Some(url), None));
    let rt = env.consented_mailbox("scan").await;

    // The grant dies (90 days unused); every later attempt fails too.
    for _ in 0..4 {
        env.fake
            .fail_next_refresh_for_user(&address("scan"), 700082);
    }
    let err = replica
        .service
        .refresh_now(TENANT, "scan")
        .await
        .unwrap_err();
    assert!(matches!(err, TokenError::ReauthRequired { .. }), "{err:?}");
    // More failing refreshes (an operator retrying) and requests: still the same problem.
    for _ in 0..3 {
        assert!(replica.service.refresh_now(TENANT, "scan").await.is_err());
        assert!(
            replica
                .service
                .access_token(TENANT, "scan", Duration::from_secs(60))
                .await
                .is_err()
        );
    }
    assert_eq!(
        env.grant("scan").await.state.status,
        TokenStatus::ReauthRequired
    );

    let record = env.settled("scan", AlertKind::ReauthRequired).await;
    flush(&env, &replica, &receiver, "marker").await;
    let hooks: Vec<Hook> = receiver
        .delivered()
        .into_iter()
        .filter(|h| h.event().mailbox == "scan")
        .collect();
    assert_eq!(hooks.len(), 1, "one problem, one alert: {hooks:?}");
    let hook = &hooks[0];
    assert_signed(hook);
    assert!(!String::from_utf8_lossy(&hook.body).contains(&rt));
    let event = hook.event();
    assert_eq!(event, record.event);
    assert_eq!(event.kind, AlertKind::ReauthRequired);
    assert_eq!(
        (
            event.tenant.as_str(),
            event.mailbox.as_str(),
            event.address.as_str()
        ),
        (TENANT, "scan", address("scan").as_str())
    );
    assert_eq!(event.code, "AADSTS700082");
    assert!(event.reason.contains("90 days"), "{}", event.reason);
    assert!(
        event.fix.contains("tokenfleetctl mailbox consent scan"),
        "{}",
        event.fix
    );
    let json: serde_json::Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(json["kind"], "reauth_required");
}

#[tokio::test]
async fn two_replicas_on_one_redis_send_one_alert() {
    let (receiver, url) = Receiver::start().await;
    let env = Env::start(
        Backend::Redis,
        ProviderKind::Microsoft,
        ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET),
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let a = env.replica(alerts_config(Some(url.clone()), None));
    let b = env.replica(alerts_config(Some(url), None));
    env.consented_mailbox("scan").await;
    for _ in 0..6 {
        env.fake
            .fail_next_refresh_for_user(&address("scan"), 700082);
    }

    // Both replicas hammer the failing mailbox at once.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..6 {
        let service = if i % 2 == 0 {
            a.service.clone()
        } else {
            b.service.clone()
        };
        calls.spawn(async move {
            let _ = service.refresh_now(TENANT, "scan").await;
            let _ = service
                .access_token(TENANT, "scan", Duration::from_secs(60))
                .await;
        });
    }
    while calls.join_next().await.is_some() {}
    assert_eq!(
        env.grant("scan").await.state.status,
        TokenStatus::ReauthRequired
    );

    // Both replicas also raise the same problem directly, concurrently: one wins.
    let grant = env.grant("scan").await;
    let error = grant.state.last_error.clone().unwrap();
    let problem = tokenfleet_broker::alerts::grant_problem(&grant);
    let raise = |alerter: Alerter| {
        let (error, problem, now) = (error.clone(), problem.clone(), env.now());
        async move {
            let event = AlertEvent::reauth_required(TENANT, "scan", &address("scan"), &error, now);
            alerter.raise(event, &problem).await.unwrap()
        }
    };
    let (x, y) = tokio::join!(raise(a.alerter.clone()), raise(b.alerter.clone()));
    assert!(!x && !y, "already raised by the failing refresh");

    // A problem nobody raised yet, raised by both replicas at the same moment: one wins.
    let printer = |alerter: Alerter| {
        let (error, now) = (error.clone(), env.now());
        async move {
            let event =
                AlertEvent::reauth_required(TENANT, "printer", &address("printer"), &error, now);
            alerter.raise(event, "grant-1").await.unwrap()
        }
    };
    let (x, y) = tokio::join!(printer(a.alerter.clone()), printer(b.alerter.clone()));
    assert!(x ^ y, "exactly one replica raises it: {x} {y}");

    env.settled("scan", AlertKind::ReauthRequired).await;
    flush(&env, &a, &receiver, "marker-a").await;
    flush(&env, &b, &receiver, "marker-b").await;
    let alerts = receiver.delivered_for("scan", AlertKind::ReauthRequired);
    assert_eq!(alerts.len(), 1, "two replicas, one alert: {alerts:?}");
    let alerts = receiver.delivered_for("printer", AlertKind::ReauthRequired);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    for hook in receiver.delivered() {
        assert_signed(&hook);
    }
}

#[tokio::test]
async fn a_failing_receiver_gets_the_alert_once_after_retries() {
    let (receiver, url) = Receiver::start().await;
    receiver.script.lock().unwrap().extend([503, 503]);
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET),
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let replica = env.replica(alerts_config(Some(url), None));
    env.consented_mailbox("scan").await;
    env.fake.fail_next_refresh_for_user(&address("scan"), 50173);
    assert!(replica.service.refresh_now(TENANT, "scan").await.is_err());

    let record = env.settled("scan", AlertKind::ReauthRequired).await;
    let seen = receiver.seen();
    assert_eq!(
        seen.iter().map(|h| h.status).collect::<Vec<_>>(),
        vec![503, 503, 200],
        "retried after 503s, delivered once"
    );
    for hook in &seen {
        assert_signed(hook);
        assert_eq!(
            hook.event_id, record.event.id,
            "one event id across retries"
        );
        assert_eq!(hook.body, seen[0].body);
    }
    assert_eq!(record.rounds, 1);
}

#[tokio::test]
async fn recovery_then_a_new_failure_alerts_again() {
    let (receiver, url) = Receiver::start().await;
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET),
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let replica = env.replica(alerts_config(Some(url), None));
    env.consented_mailbox("scan").await;

    // AADSTS53003: blocked by Conditional Access; an admin lifts the block and retries.
    env.fake.fail_next_refresh_for_user(&address("scan"), 53003);
    assert!(replica.service.refresh_now(TENANT, "scan").await.is_err());
    env.settled("scan", AlertKind::ReauthRequired).await;
    replica.service.refresh_now(TENANT, "scan").await.unwrap();
    assert_eq!(env.grant("scan").await.state.status, TokenStatus::Active);
    assert!(
        env.alert("scan", AlertKind::ReauthRequired).await.is_none(),
        "resolved when ACTIVE again"
    );

    env.fake
        .fail_next_refresh_for_user(&address("scan"), 700082);
    assert!(replica.service.refresh_now(TENANT, "scan").await.is_err());
    env.settled("scan", AlertKind::ReauthRequired).await;
    flush(&env, &replica, &receiver, "marker").await;
    let alerts = receiver.delivered_for("scan", AlertKind::ReauthRequired);
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_ne!(alerts[0].id, alerts[1].id);
    assert_eq!(
        alerts.iter().map(|e| e.code.as_str()).collect::<Vec<_>>(),
        ["AADSTS53003", "AADSTS700082"]
    );
}

#[tokio::test]
async fn a_google_testing_app_gets_one_expiry_alert_in_time() {
    let (receiver, url) = Receiver::start().await;
    let clock = ManualClock::new();
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Google,
        ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET).google_testing(),
        clock.clone(),
    )
    .await;
    // Week-long access tokens: left alone, the next refresh would come after the horizon began.
    env.fake
        .set_access_token_lifetime(Duration::from_secs(7 * 24 * 3600));
    let replica = env.replica(alerts_config(Some(url), None));
    env.consented_mailbox("scan").await;
    let consented = env.grant("scan").await;
    let expires = consented
        .refresh_token_expires
        .expect("Google's refresh_token_expires_in is parsed");
    let week = (expires - env.now()).whole_seconds();
    assert!(
        (7 * 24 * 3600 - 60..=7 * 24 * 3600).contains(&week),
        "{week}"
    );

    // Seven days left, horizon 48 h: no alert, but the next refresh is no later than the start
    // of the horizon.
    replica.service.refresh_now(TENANT, "scan").await.unwrap();
    let g = env.grant("scan").await;
    assert_eq!(
        g.refresh_token_expires,
        Some(expires),
        "same refresh token, same expiry"
    );
    let horizon = Duration::from_secs(48 * 3600);
    let next = g.next_refresh.unwrap();
    assert!(next <= expires - horizon, "next {next}, expiry {expires}");
    assert!(
        env.alert("scan", AlertKind::RefreshTokenExpiring)
            .await
            .is_none()
    );

    // Time passes from one scheduled refresh to the next; the one at the start of the horizon
    // (at the latest) raises the alert.
    let mut next = next;
    for round in 0.. {
        assert!(round < 3, "no refresh came at the start of the horizon");
        let by = (next - env.now()).unsigned_abs() + Duration::from_secs(1);
        clock.advance(by);
        env.fake.advance(by);
        replica.service.scheduled_refresh(TENANT, "scan").await;
        if env
            .alert("scan", AlertKind::RefreshTokenExpiring)
            .await
            .is_some()
        {
            assert!(env.now() <= expires - horizon + Duration::from_secs(1));
            break;
        }
        next = env.grant("scan").await.next_refresh.unwrap();
        assert!(next <= expires - horizon, "next {next}, expiry {expires}");
    }
    let record = env.settled("scan", AlertKind::RefreshTokenExpiring).await;
    assert_eq!(record.event.expires_at, Some(expires));

    // Later refreshes within the horizon: the same problem, no second alert.
    for _ in 0..3 {
        clock.advance(Duration::from_secs(3600));
        env.fake.advance(Duration::from_secs(3600));
        replica.service.refresh_now(TENANT, "scan").await.unwrap();
    }
    flush(&env, &replica, &receiver, "marker").await;
    let alerts = receiver.delivered_for("scan", AlertKind::RefreshTokenExpiring);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let event = &alerts[0];
    assert_eq!(event.code, "refresh_token_expiring");
    assert!(
        event.fix.contains("tokenfleetctl mailbox consent scan"),
        "{}",
        event.fix
    );
    assert!(event.reason.contains("7-day"), "{}", event.reason);
    for hook in receiver.delivered() {
        assert_signed(&hook);
    }

    // And when it does expire, the fake says so as Google does: the dead-grant alert follows.
    let left = (expires - env.now()).unsigned_abs() + Duration::from_secs(1);
    clock.advance(left);
    env.fake.advance(left);
    let err = replica
        .service
        .refresh_now(TENANT, "scan")
        .await
        .unwrap_err();
    assert!(matches!(err, TokenError::ReauthRequired { .. }), "{err:?}");
    env.settled("scan", AlertKind::ReauthRequired).await;
}

// ----------------------------------------------------------------------------------------------
// E-mail
// ----------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Mail {
    auth: Option<String>,
    from: String,
    to: Vec<String>,
    data: String,
}

/// A test double that speaks just enough SMTP for one client: greets, advertises `AUTH
/// XOAUTH2`, accepts whatever comes and records it.
#[derive(Clone, Default)]
struct SmtpReceiver {
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpReceiver {
    async fn start() -> (SmtpReceiver, SocketAddr) {
        let receiver = SmtpReceiver::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move { r.session(stream).await });
            }
        });
        (receiver, addr)
    }

    async fn session(&self, stream: tokio::net::TcpStream) -> std::io::Result<()> {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"220 smtp.test ESMTP test double\r\n")
            .await?;
        let mut mail = Mail::default();
        while let Some(line) = lines.next_line().await? {
            let upper = line.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                b"250-smtp.test\r\n250 AUTH XOAUTH2\r\n"
            } else if let Some(payload) = line.strip_prefix("AUTH XOAUTH2 ") {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(payload.trim())
                    .unwrap_or_default();
                mail.auth = Some(String::from_utf8_lossy(&decoded).into_owned());
                b"235 2.7.0 Authentication successful\r\n"
            } else if upper.starts_with("MAIL FROM:") {
                mail.from = line[10..].trim().to_owned();
                b"250 2.1.0 OK\r\n"
            } else if upper.starts_with("RCPT TO:") {
                mail.to.push(line[8..].trim().to_owned());
                b"250 2.1.5 OK\r\n"
            } else if upper == "DATA" {
                write.write_all(b"354 go ahead\r\n").await?;
                while let Some(l) = lines.next_line().await? {
                    if l == "." {
                        break;
                    }
                    mail.data.push_str(&l);
                    mail.data.push('\n');
                }
                self.mails.lock().unwrap().push(std::mem::take(&mut mail));
                b"250 2.0.0 queued\r\n"
            } else if upper == "QUIT" {
                write.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            } else if upper == "RSET" || upper == "NOOP" {
                b"250 OK\r\n"
            } else {
                b"502 5.5.2 not implemented\r\n"
            };
            write.write_all(reply).await?;
        }
        Ok(())
    }

    fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn the_e_mail_alert_is_sent_with_the_sender_mailboxs_token() {
    let (smtp, smtp_addr) = SmtpReceiver::start().await;
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET),
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let email = EmailConfig {
        to: vec!["ops@msp.example".into(), "oncall@msp.example".into()],
        from_tenant: TENANT.into(),
        from_mailbox: "alerts".into(),
        host: smtp_addr.ip().to_string(),
        port: smtp_addr.port(),
        security: SmtpSecurity::None,
        auth: SmtpAuth::Xoauth2,
    };
    let replica = env.replica(alerts_config(None, Some(email)));
    env.consented_mailbox("alerts").await;
    let rt = env.consented_mailbox("scan").await;
    env.fake
        .fail_next_refresh_for_user(&address("scan"), 700082);
    assert!(replica.service.refresh_now(TENANT, "scan").await.is_err());

    let record = env.settled("scan", AlertKind::ReauthRequired).await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = &mails[0];

    // Logged in as the sender mailbox with its live access token (XOAUTH2).
    let auth = mail.auth.clone().expect("AUTH XOAUTH2");
    let token = auth
        .strip_prefix(&format!("user={}\x01auth=Bearer ", address("alerts")))
        .and_then(|rest| rest.strip_suffix("\x01\x01"))
        .unwrap_or_else(|| panic!("XOAUTH2 payload: {auth:?}"));
    assert!(env.fake.access_token_is_live(token));

    assert_eq!(mail.from, format!("<{}>", address("alerts")));
    assert_eq!(mail.to, ["<ops@msp.example>", "<oncall@msp.example>"]);
    // The body is quoted-printable (long lines): undo the soft line breaks.
    let data = &mail.data.replace("=\n", "");
    assert!(
        data.contains("Subject: tokenfleet: mailbox scan@contoso.example needs consent again"),
        "{data}"
    );
    assert!(data.contains("AADSTS700082"), "{data}");
    assert!(
        data.contains("tokenfleetctl mailbox consent scan"),
        "{data}"
    );
    assert!(data.contains(&record.event.id), "{data}");
    for leak in [token, rt.as_str(), "fake-at-", "fake-rt-", CLIENT_SECRET] {
        assert!(!data.contains(leak), "the mail carries no token: {data}");
    }
}
