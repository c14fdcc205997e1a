//! Issuance limits for agents and user mailboxes: the per-agent `IssueAccessToken` rate limit
//! over a real broker (`server::serve` over TLS on 127.0.0.1, embedded store), and the deletion
//! of idle user tokens by the refresh scheduler's per-mailbox step, under a controlled clock.
//!
//! User mailboxes of `login_user` / `allow_user_change` devices over the same real broker, with
//! the fake identity provider: created on demand by `user_address` (exactly once under
//! concurrency), answered with "consent required" (device code for Microsoft, authorization URL
//! for Google) until the person consents, then a token; the sender-mode refusals; every outcome
//! audited.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokenfleet_broker::config::RawConfig;
use tokenfleet_broker::records::Records;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::consent;
use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, grant_key, seal_field};
use tokenfleet_broker::tokens::issue::{
    CONSENT_REQUIRED_RESULT, ISSUE_ACTION, MAILBOX_CREATE_ACTION, MAILBOX_UPDATE_ACTION,
    user_mailbox_name,
};
use tokenfleet_broker::tokens::lifecycle::{IDLE_DELETE_ACTION, TokenConfig, TokenService};
use tokenfleet_domain::{
    AuditEvent, Clock, Device, GrantType, MailPurpose, Mailbox, MailboxKind, ProviderKind,
    SenderMode, TokenStatus,
};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, Scope};
use tokenfleet_testkit::fake_idp::{ClientSpec, Endpoint as IdpEndpoint, FakeIdp};
use tonic::Code;

use crate::support::{
    Backend, Broker, Launch, ShiftedClock, fake_provider, fixed_admin_device, send_mailbox,
};

// ----------------------------------------------------------------------------------------------
// Harness
// ----------------------------------------------------------------------------------------------

/// This module's helpers on the shared test broker.
trait UserMailboxBroker {
    async fn start(edit: impl FnOnce(&mut RawConfig)) -> Broker;
    async fn put_device(&self, name: &str, agent: &str);
}

impl UserMailboxBroker for Broker {
    /// A broker over TLS with tenant `acme`, `edit` applied to its configuration.
    async fn start(edit: impl FnOnce(&mut RawConfig)) -> Broker {
        tokenfleet_testkit::logs::capture();
        let broker = Broker::launch(Launch::tls(), edit).await;
        broker.put_tenant("acme").await;
        broker
    }

    /// Device `name` hosted by `agent`, fixed_admin with admin mailbox `scan` (no grant).
    async fn put_device(&self, name: &str, agent: &str) {
        let records = Records::new(self.state.store.as_ref());
        let device = fixed_admin_device("acme", name, agent);
        records.put(&device, Precondition::Any).await.unwrap();
        records
            .put(&mailbox("scan", MailboxKind::Admin), Precondition::Any)
            .await
            .unwrap();
    }
}

fn mailbox(name: &str, kind: MailboxKind) -> Mailbox {
    send_mailbox("acme", name, format!("{name}@example.com"), kind)
}

fn issue_request(device: &str) -> pb::IssueAccessTokenRequest {
    pb::IssueAccessTokenRequest {
        device: device.to_owned(),
        mailbox: "scan".to_owned(),
        purpose: pb::MailPurpose::Send as i32,
        ..Default::default()
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
    let mut a = broker.agent_client("acme", "site-a").await;
    let mut b = broker.agent_client("acme", "site-b").await;
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
    let clock = Arc::new(ShiftedClock::default());
    let (state, _key, _store) = crate::support::open_state(Backend::Embedded, clock.clone()).await;
    crate::support::put_tenant(&state, "acme", "acme").await;
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

// ----------------------------------------------------------------------------------------------
// User mailboxes
// ----------------------------------------------------------------------------------------------

const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "user-mailboxes-client-secret";
const ALICE: &str = "alice.smith@contoso.example";
const BOB: &str = "bob@contoso.example";

/// The fake identity provider with the users and the app, and providers `m365` (Microsoft) and
/// `gws` (Google) in tenant `acme` pointing at it.
async fn idp(broker: &Broker) -> FakeIdp {
    let fake = FakeIdp::start().await.unwrap();
    for user in [ALICE, BOB] {
        fake.add_user(user);
    }
    let client = ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET);
    fake.set_device_interval(1);
    for (name, kind) in [
        ("m365", ProviderKind::Microsoft),
        ("gws", ProviderKind::Google),
    ] {
        let provider = fake_provider(&broker.state, &fake, &client, "acme", name, kind);
        broker
            .records()
            .put(&provider, Precondition::Absent)
            .await
            .unwrap();
    }
    fake.register_client(client);
    fake
}

/// Device `name` hosted by `agent` in `mode` with user provider `provider` (may be empty),
/// admin mailbox `scan` and allowed mailbox `shared` (both exist, without grants).
async fn put_user_device(
    broker: &Broker,
    name: &str,
    agent: &str,
    mode: SenderMode,
    provider: &str,
) {
    broker.put_device(name, agent).await;
    let records = Records::new(broker.state.store.as_ref());
    records
        .put(&mailbox("shared", MailboxKind::Bulk), Precondition::Any)
        .await
        .unwrap();
    let key = tokenfleet_broker::records::device_key("acme", name);
    let mut device = records.get::<Device>(&key).await.unwrap().unwrap().value;
    device.sender_mode = mode;
    device.user_provider = provider.to_owned();
    device.allowed_mailboxes = vec!["shared".into()];
    device.ingress.user_addresses = vec![ALICE.into(), "@contoso.example".into()];
    records.put(&device, Precondition::Any).await.unwrap();
}

/// Sets the user addresses of device `name`.
async fn set_user_addresses(broker: &Broker, name: &str, addresses: &[&str]) {
    let records = Records::new(broker.state.store.as_ref());
    let key = tokenfleet_broker::records::device_key("acme", name);
    let mut device = records.get::<Device>(&key).await.unwrap().unwrap().value;
    device.ingress.user_addresses = addresses.iter().map(|a| (*a).to_owned()).collect();
    records.put(&device, Precondition::Any).await.unwrap();
}

fn user_request(device: &str, user: &str) -> pb::IssueAccessTokenRequest {
    pb::IssueAccessTokenRequest {
        device: device.to_owned(),
        mailbox: String::new(),
        purpose: pb::MailPurpose::Send as i32,
        user_address: user.to_owned(),
    }
}

/// The user mailboxes of `acme`.
async fn user_mailboxes(state: &BrokerState) -> Vec<Mailbox> {
    Records::new(state.store.as_ref())
        .list_all::<Mailbox>(&Scope::Tenant("acme".into()))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.value)
        .filter(|m| m.kind == MailboxKind::User)
        .collect()
}

async fn audit_events(state: &BrokerState) -> Vec<AuditEvent> {
    tokenfleet_broker::audit::list(state, &Scope::Tenant("acme".into()), None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

/// Issuance audit results for mailbox target `mailbox`, oldest first.
async fn issue_results(state: &BrokerState, mailbox: &str) -> Vec<String> {
    let target = format!("tenants/acme/mailboxes/{mailbox}");
    let mut results: Vec<(OffsetDateTime, String)> = audit_events(state)
        .await
        .into_iter()
        .filter(|e| e.action == ISSUE_ACTION && e.target == target)
        .map(|e| (e.time, e.result))
        .collect();
    results.sort();
    results.into_iter().map(|(_, r)| r).collect()
}

/// Waits (with a deadline) until the mailbox's grant is ACTIVE.
async fn wait_active(state: &BrokerState, mailbox: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let grant = consent::load_grant(state, "acme", mailbox)
            .await
            .unwrap()
            .grant;
        if grant.state.status == TokenStatus::Active {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the grant of {mailbox} did not become active: {:?}",
            grant.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token_of(response: &pb::IssueAccessTokenResponse) -> &str {
    assert!(
        response.consent_required.is_none(),
        "expected a token, got consent_required"
    );
    assert!(!response.access_token.is_empty());
    tokenfleet_testkit::logs::secret(&response.access_token);
    &response.access_token
}

#[tokio::test]
async fn a_user_mailbox_is_created_on_demand_and_consented_by_device_code() {
    let broker = Broker::start(|_| {}).await;
    let fake = idp(&broker).await;
    let mut agent = broker.agent_client("acme", "site-a").await;
    put_user_device(&broker, "kiosk", "site-a", SenderMode::LoginUser, "m365").await;
    let name = user_mailbox_name(ALICE);

    // First request: the mailbox is created and a device-code consent started.
    let first = agent
        .issue_access_token(user_request("kiosk", ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.mailbox, name);
    assert!(first.access_token.is_empty() && first.expire_time.is_none());
    let consent = first.consent_required.clone().expect("consent_required");
    assert_eq!(consent.mailbox, name);
    assert!(!consent.user_code.is_empty());
    assert!(consent.verification_uri.starts_with("http"), "{consent:?}");
    assert!(!consent.message.is_empty());
    assert!(consent.authorization_url.is_empty());
    let expires = consent.expire_time.unwrap();
    assert!(expires.seconds > OffsetDateTime::now_utc().unix_timestamp());

    let mailboxes = user_mailboxes(&broker.state).await;
    assert_eq!(mailboxes.len(), 1, "{mailboxes:?}");
    let m = &mailboxes[0];
    assert_eq!(
        (m.name.as_str(), m.address.as_str(), m.provider.as_str()),
        (name.as_str(), ALICE, "m365")
    );
    assert_eq!(m.grant_type, GrantType::DelegatedDeviceCode);
    assert_eq!(m.purposes, vec![MailPurpose::Send]);

    // Second request: the same pending code; one start at the provider, still one mailbox.
    let second = agent
        .issue_access_token(user_request("kiosk", ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.consent_required, first.consent_required);
    assert_eq!(fake.requests_to(IdpEndpoint::MicrosoftDeviceCode).len(), 1);
    assert_eq!(user_mailboxes(&broker.state).await.len(), 1);
    // Naming the user's own mailbox is the same request.
    let mut named = user_request("kiosk", ALICE);
    named.mailbox = name.clone();
    let third = agent.issue_access_token(named).await.unwrap().into_inner();
    assert_eq!(third.consent_required, first.consent_required);

    // The person signs in; the broker's poller stores the grant; the next request gets a token.
    fake.approve_device_code(&consent.user_code, ALICE).unwrap();
    wait_active(&broker.state, &name).await;
    let issued = agent
        .issue_access_token(user_request("kiosk", ALICE))
        .await
        .unwrap()
        .into_inner();
    token_of(&issued);
    assert_eq!(issued.sasl_username, ALICE);
    assert_eq!(issued.mailbox, name);
    assert!(issued.expire_time.is_some());

    // A new purpose is added to the mailbox; the grant lacks its scope, so the person consents
    // again (a new code), this time for both.
    let mut fetch = user_request("kiosk", ALICE);
    fetch.purpose = pb::MailPurpose::Pop as i32;
    let again = agent.issue_access_token(fetch).await.unwrap().into_inner();
    let renewed = again
        .consent_required
        .expect("consent_required for the new purpose");
    assert_ne!(renewed.user_code, consent.user_code);
    assert_eq!(
        user_mailboxes(&broker.state).await[0].purposes,
        vec![MailPurpose::Send, MailPurpose::Pop]
    );
    let scope = fake.requests_to(IdpEndpoint::MicrosoftDeviceCode)[1]
        .param("scope")
        .unwrap()
        .to_owned();
    assert!(
        scope.contains("SMTP.Send") && scope.contains("POP.AccessAsUser.All"),
        "{scope}"
    );

    // Audited: one creation by the agent, then consent_required ×3 and ok.
    let events = audit_events(&broker.state).await;
    let created: Vec<_> = events
        .iter()
        .filter(|e| e.action == MAILBOX_CREATE_ACTION)
        .collect();
    assert_eq!(created.len(), 1, "{events:?}");
    assert_eq!(created[0].actor, "agent:acme/site-a");
    assert_eq!(created[0].target, format!("tenants/acme/mailboxes/{name}"));
    assert_eq!(
        issue_results(&broker.state, &name).await,
        vec![
            CONSENT_REQUIRED_RESULT,
            CONSENT_REQUIRED_RESULT,
            CONSENT_REQUIRED_RESULT,
            "ok",
            CONSENT_REQUIRED_RESULT
        ]
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == MAILBOX_UPDATE_ACTION && e.detail.contains("pop"))
            .count(),
        1,
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .filter(|e| e.action == ISSUE_ACTION)
            .all(|e| e.actor == "agent:acme/site-a" && e.detail.contains("device `kiosk`")),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_google_user_mailbox_answers_with_an_authorization_url() {
    let broker = Broker::start(|_| {}).await;
    let fake = idp(&broker).await;
    let mut agent = broker.agent_client("acme", "site-a").await;
    put_user_device(&broker, "mfp", "site-a", SenderMode::AllowUserChange, "gws").await;
    let name = user_mailbox_name(BOB);

    let first = agent
        .issue_access_token(user_request("mfp", BOB))
        .await
        .unwrap()
        .into_inner();
    let consent = first.consent_required.clone().expect("consent_required");
    assert_eq!(first.mailbox, name);
    assert!(consent.user_code.is_empty() && consent.verification_uri.is_empty());
    let url = consent.authorization_url.clone();
    assert!(url.starts_with(&fake.google_authorize_url()), "{url}");
    assert!(url.contains("code_challenge="), "{url}");
    let m = &user_mailboxes(&broker.state).await[0];
    assert_eq!(m.grant_type, GrantType::DelegatedAuthCode);
    assert_eq!(m.provider, "gws");

    // Pending: the same URL again.
    let second = agent
        .issue_access_token(user_request("mfp", BOB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.consent_required.unwrap().authorization_url, url);

    // allow_user_change: another allowed mailbox by name is that mailbox (no grant yet: refused
    // as before, not a consent); a mailbox outside the device's list is denied.
    let mut other = user_request("mfp", BOB);
    other.mailbox = "shared".into();
    let err = agent.issue_access_token(other).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("shared"), "{}", err.message());
    let mut other = user_request("mfp", BOB);
    other.mailbox = "elsewhere".into();
    let err = agent.issue_access_token(other).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The person consents in the browser; the redirect completes the consent.
    let redirect = fake.authorize_url(&url, BOB).unwrap();
    consent::complete(&broker.state, "acme", &name, &redirect, "test")
        .await
        .unwrap();
    let issued = agent
        .issue_access_token(user_request("mfp", BOB))
        .await
        .unwrap()
        .into_inner();
    token_of(&issued);
    assert_eq!(issued.sasl_username, BOB);
    assert_eq!(
        issue_results(&broker.state, &name).await,
        vec![CONSENT_REQUIRED_RESULT, CONSENT_REQUIRED_RESULT, "ok"]
    );
    assert_eq!(
        issue_results(&broker.state, "shared").await,
        vec!["failed_precondition"]
    );
    assert_eq!(
        issue_results(&broker.state, "elsewhere").await,
        vec!["permission_denied"]
    );
}

#[tokio::test]
async fn concurrent_first_requests_create_one_mailbox_and_one_consent() {
    let broker = Broker::start(|_| {}).await;
    let fake = idp(&broker).await;
    let agent = broker.agent_client("acme", "site-a").await;
    put_user_device(&broker, "kiosk", "site-a", SenderMode::LoginUser, "m365").await;

    let calls = (0..20).map(|_| {
        let mut agent = agent.clone();
        async move {
            agent
                .issue_access_token(user_request("kiosk", ALICE))
                .await
                .unwrap()
                .into_inner()
        }
    });
    let answers = futures::future::join_all(calls).await;
    let codes: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|a| {
            a.consent_required
                .as_ref()
                .expect("consent_required")
                .user_code
                .clone()
        })
        .collect();
    assert_eq!(codes.len(), 1, "{codes:?}");
    assert_eq!(user_mailboxes(&broker.state).await.len(), 1);
    assert_eq!(fake.requests_to(IdpEndpoint::MicrosoftDeviceCode).len(), 1);
    let events = audit_events(&broker.state).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == MAILBOX_CREATE_ACTION)
            .count(),
        1
    );
    assert_eq!(
        issue_results(&broker.state, &user_mailbox_name(ALICE)).await,
        vec![CONSENT_REQUIRED_RESULT; 20]
    );
}

#[tokio::test]
async fn sender_modes_limit_user_addresses() {
    let broker = Broker::start(|_| {}).await;
    let _fake = idp(&broker).await;
    let mut agent = broker.agent_client("acme", "site-a").await;
    broker.put_device("fixed", "site-a").await;
    put_user_device(&broker, "kiosk", "site-a", SenderMode::LoginUser, "m365").await;
    put_user_device(&broker, "bare", "site-a", SenderMode::LoginUser, "").await;
    put_user_device(&broker, "gone", "site-a", SenderMode::LoginUser, "m365").await;
    let name = user_mailbox_name(ALICE);

    // fixed_admin with a user address: refused, naming the mode.
    let err = agent
        .issue_access_token(user_request("fixed", ALICE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("fixed_admin"), "{}", err.message());

    // login_user naming another mailbox than the user's own: refused.
    let mut other = user_request("kiosk", ALICE);
    other.mailbox = "scan".into();
    let err = agent.issue_access_token(other).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains(&name), "{}", err.message());

    // No user provider: FAILED_PRECONDITION naming device.user_provider.
    let err = agent
        .issue_access_token(user_request("bare", BOB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("device.user_provider"),
        "{}",
        err.message()
    );

    // Not an address: INVALID_ARGUMENT naming user_address.
    let err = agent
        .issue_access_token(user_request("kiosk", "not an address"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("user_address"), "{}", err.message());

    // A device hosted by another agent: refused before anything is created.
    broker.agent_client("acme", "site-b").await;
    put_user_device(&broker, "theirs", "site-b", SenderMode::LoginUser, "m365").await;
    let err = agent
        .issue_access_token(user_request("theirs", BOB))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(user_mailboxes(&broker.state).await.is_empty());

    // Every refusal is audited.
    let events = audit_events(&broker.state).await;
    let results: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.action == ISSUE_ACTION)
        .map(|e| (e.result.clone(), e.detail.clone()))
        .collect();
    for (device, result) in [
        ("fixed", "permission_denied"),
        ("kiosk", "permission_denied"),
        ("bare", "failed_precondition"),
        ("kiosk", "invalid_argument"),
        ("theirs", "permission_denied"),
    ] {
        assert!(
            results
                .iter()
                .any(|(r, d)| r == result && d.contains(&format!("device `{device}`"))),
            "no {result} for {device}: {results:?}"
        );
    }
}

#[tokio::test]
async fn user_providers_are_checked_references() {
    let broker = Broker::start(|_| {}).await;
    let _fake = idp(&broker).await;
    let mut admin = broker.admin();
    let device = |provider: &str| pb::Device {
        tenant: "acme".into(),
        name: "kiosk".into(),
        sender_mode: pb::SenderMode::LoginUser as i32,
        user_provider: provider.into(),
        ..Default::default()
    };
    let err = admin
        .create_device(pb::CreateDeviceRequest {
            device: Some(device("nope")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("device.user_provider"),
        "{}",
        err.message()
    );
    admin
        .create_device(pb::CreateDeviceRequest {
            device: Some(device("m365")),
        })
        .await
        .unwrap();
    let err = admin
        .delete_provider(pb::DeleteProviderRequest {
            tenant: "acme".into(),
            name: "m365".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("kiosk"), "{}", err.message());
}

/// A `login_user` device gets only the users its ingress user addresses admit (the message's
/// `From:` is not proof of who signed in), and on-demand user mailboxes are limited per device
/// and per tenant; over the real broker's TokenBroker API.
#[tokio::test]
async fn user_tokens_are_bound_to_the_device_addresses_and_limited() {
    let broker = Broker::start(|raw| {
        raw.tokens.max_user_mailboxes_per_device = 2;
        raw.tokens.max_user_mailboxes_per_tenant = 3;
    })
    .await;
    let fake = idp(&broker).await;
    for user in [
        "carol@contoso.example",
        "dan@contoso.example",
        "erin@fabrikam.example",
        "ceo@contoso.example",
    ] {
        fake.add_user(user);
    }
    let mut agent = broker.agent_client("acme", "site-a").await;
    put_user_device(&broker, "kiosk", "site-a", SenderMode::LoginUser, "m365").await;
    set_user_addresses(&broker, "kiosk", &[ALICE, BOB, "carol@contoso.example"]).await;

    // The CEO consented somewhere in the tenant; the kiosk may not ask for the CEO's token.
    let err = agent
        .issue_access_token(user_request("kiosk", "ceo@contoso.example"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("device `kiosk` may not send as user `ceo@contoso.example`")
            && err.message().contains("ingress user addresses"),
        "{}",
        err.message()
    );
    assert!(user_mailboxes(&broker.state).await.is_empty());

    // Listed users get their mailbox (consent required first), up to two for this device.
    for user in [ALICE, BOB] {
        let answer = agent
            .issue_access_token(user_request("kiosk", user))
            .await
            .unwrap()
            .into_inner();
        assert!(answer.access_token.is_empty(), "{answer:?}");
    }
    let err = agent
        .issue_access_token(user_request("kiosk", "carol@contoso.example"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("max_user_mailboxes_per_device"),
        "{}",
        err.message()
    );
    // Existing user mailboxes keep working at the limit.
    agent
        .issue_access_token(user_request("kiosk", ALICE))
        .await
        .unwrap();

    // A second device: the tenant limit (3) stops the fourth user mailbox.
    put_user_device(&broker, "lobby", "site-a", SenderMode::LoginUser, "m365").await;
    set_user_addresses(
        &broker,
        "lobby",
        &["@fabrikam.example", "dan@contoso.example"],
    )
    .await;
    agent
        .issue_access_token(user_request("lobby", "erin@fabrikam.example"))
        .await
        .unwrap();
    let err = agent
        .issue_access_token(user_request("lobby", "dan@contoso.example"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("max_user_mailboxes_per_tenant"),
        "{}",
        err.message()
    );
    assert_eq!(user_mailboxes(&broker.state).await.len(), 3);
}
