//! Consent flows (`tokens::consent`, `tokens::device_poller`) against the fake identity provider
//! over HTTP, with the embedded store and an injected clock that the tests move by hand (the
//! fake's clock is moved along with it).

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_broker::admin::mailbox_with_grant;
use tokenfleet_broker::audit;
use tokenfleet_broker::records::Records;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::consent::{
    self, CONSENT_POLL_SCHEDULE, CONSENT_STATES, Challenge, ConsentError, REFRESH_SCHEDULE,
};
use tokenfleet_broker::tokens::device_poller::{DevicePoller, PollOutcome};
use tokenfleet_broker::tokens::grant::{
    GrantField, GrantRecord, PendingConsent, open_field, seal_field,
};
use tokenfleet_domain::{
    Clock, GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind, Stamps,
    TokenStatus,
};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Secret;
use tokenfleet_store::{Precondition, RecordKey, Scope};
use tokenfleet_testkit::fake_idp::{ClientSpec, Endpoint, FakeIdp, ScriptedResponse};

use crate::support::{Backend, ManualClock, StoreHome, fake_provider, open_state, put_tenant};

const TENANT: &str = "acme";
const USER: &str = "scanner@contoso.example";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "s3cret-client-value";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
const SERVICE_ACCOUNT: &str = "relay@acme-project.iam.gserviceaccount.com";

struct Env {
    fake: FakeIdp,
    clock: Arc<ManualClock>,
    state: BrokerState,
    _store: StoreHome,
}

impl Env {
    async fn new() -> Env {
        let fake = FakeIdp::start().await.unwrap();
        fake.add_user(USER);
        fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
        let clock = ManualClock::new();
        let (state, _key, store) = open_state(Backend::Embedded, clock.clone()).await;
        put_tenant(&state, TENANT, "Acme").await;
        let env = Env {
            fake,
            clock,
            state,
            _store: store,
        };
        env.add_provider("m365", ProviderKind::Microsoft).await;
        env.add_provider("gws", ProviderKind::Google).await;
        env
    }

    fn records(&self) -> Records<'_> {
        Records::new(self.state.store.as_ref())
    }

    /// Moves the broker's and the fake's clocks together.
    fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.fake.advance(by);
    }

    async fn add_provider(&self, name: &str, kind: ProviderKind) {
        let client = ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET);
        let mut provider = fake_provider(&self.state, &self.fake, &client, TENANT, name, kind);
        if kind == ProviderKind::Google {
            provider.service_account_key = Some(
                self.state
                    .keyring
                    .seal_secret(
                        &Provider::service_account_key_aad(TENANT, name),
                        &Secret::new(self.fake.service_account_json(SERVICE_ACCOUNT)),
                    )
                    .unwrap(),
            );
        }
        self.records()
            .put(&provider, Precondition::Absent)
            .await
            .unwrap();
    }

    async fn add_mailbox(&self, name: &str, provider: &str, grant_type: GrantType) {
        let mailbox = Mailbox {
            consent_account: String::new(),
            tenant: TENANT.into(),
            name: name.into(),
            address: USER.into(),
            provider: provider.into(),
            grant_type,
            kind: MailboxKind::Bulk,
            purposes: vec![MailPurpose::Send, MailPurpose::Pop],
            disabled: false,
            token: Default::default(),
            stamps: Stamps::new(self.clock.now()),
        };
        self.records()
            .put(&mailbox, Precondition::Absent)
            .await
            .unwrap();
    }

    async fn grant(&self, mailbox: &str) -> GrantRecord {
        consent::load_grant(&self.state, TENANT, mailbox)
            .await
            .unwrap()
            .grant
    }

    async fn due(&self, schedule: &'static str) -> Vec<(String, i64)> {
        self.state
            .store
            .due(schedule, i64::MAX / 4, 100)
            .await
            .unwrap()
    }

    async fn audit_actions(&self) -> Vec<(String, String)> {
        audit::list(&self.state, &Scope::Tenant(TENANT.into()), None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, e)| (e.action, e.result))
            .collect()
    }

    fn open(&self, mailbox: &str, field: GrantField, sealed: &tokenfleet_seal::Sealed) -> String {
        open_field(&self.state.keyring, TENANT, mailbox, field, sealed)
            .unwrap()
            .expose()
            .to_owned()
    }

    /// Starts a device-code consent and returns the user code.
    async fn start_device(&self, mailbox: &str) -> String {
        let started = consent::start(&self.state, TENANT, mailbox, None, "http://unused")
            .await
            .unwrap();
        match started.challenge {
            Challenge::DeviceCode { user_code, .. } => user_code,
            other => panic!("expected a device code, got {other:?}"),
        }
    }

    /// Starts an auth-code consent and returns (authorization URL, state).
    async fn start_auth(&self, mailbox: &str) -> (String, String) {
        let started = consent::start(
            &self.state,
            TENANT,
            mailbox,
            Some(REDIRECT),
            "http://unused",
        )
        .await
        .unwrap();
        match started.challenge {
            Challenge::Authorization {
                url,
                state,
                redirect_uri,
                ..
            } => {
                assert_eq!(redirect_uri, REDIRECT);
                (url, state)
            }
            other => panic!("expected an authorization URL, got {other:?}"),
        }
    }
}

/// One round of `poller`; the outcome for the only due mailbox, if any.
async fn round(poller: &DevicePoller) -> Option<PollOutcome> {
    let mut outcomes = poller.run_once().await.unwrap();
    assert!(outcomes.len() <= 1, "{outcomes:?}");
    outcomes.pop().map(|(_, o)| o)
}

fn successful_device_exchanges(fake: &FakeIdp) -> usize {
    fake.requests_to(Endpoint::MicrosoftToken)
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some(DEVICE_GRANT) && r.status == 200)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Device code

#[tokio::test]
async fn device_code_consent_succeeds_and_hands_over_to_refresh() {
    let env = Env::new().await;
    env.add_mailbox("scan", "m365", GrantType::DelegatedDeviceCode)
        .await;
    let user_code = env.start_device("scan").await;

    // The device authorization asked for the delegated scopes, offline_access included.
    let start = env.fake.requests_to(Endpoint::MicrosoftDeviceCode);
    let scope = start[0].param("scope").unwrap().to_owned();
    assert!(scope.contains("offline_access"), "{scope}");
    assert!(scope.contains("SMTP.Send"), "{scope}");

    let grant = env.grant("scan").await;
    assert_eq!(grant.state.status, TokenStatus::ConsentPending);
    let Some(PendingConsent::DeviceCode {
        device_code,
        user_code: stored_code,
        interval_secs,
        next_poll,
        ..
    }) = &grant.pending
    else {
        panic!("no pending device code: {grant:?}");
    };
    assert_eq!(stored_code, &user_code);
    assert_eq!(*interval_secs, 5);
    // Sealed: the stored form is not the device code, and opens only for this mailbox.
    let raw = serde_json::to_string(&grant).unwrap();
    let plain = env.open("scan", GrantField::DeviceCode, device_code);
    assert!(plain.starts_with("fake-dc-"));
    assert!(!raw.contains(&plain));
    assert!(
        open_field(
            &env.state.keyring,
            TENANT,
            "other",
            GrantField::DeviceCode,
            device_code
        )
        .is_err()
    );
    assert_eq!(
        env.due(CONSENT_POLL_SCHEDULE).await,
        vec![("acme/scan".to_owned(), consent::unix_ms(*next_poll))]
    );

    // What GetMailbox shows while waiting.
    let mailbox = env
        .records()
        .get::<Mailbox>(&tokenfleet_broker::records::mailbox_key(TENANT, "scan"))
        .await
        .unwrap()
        .unwrap();
    let shown = mailbox_with_grant(&mailbox.value, mailbox.version, Some(&grant));
    let token = shown.token.unwrap();
    assert_eq!(token.status, pb::TokenStatus::ConsentPending as i32);
    let pending = token.pending_device_code.unwrap();
    assert_eq!(pending.user_code, user_code);
    assert_eq!(pending.interval_seconds, 5);
    assert!(pending.verification_uri.ends_with("/devicelogin"));

    let poller = DevicePoller::new(env.state.clone());
    // Nothing is due before the interval has passed: the provider is not asked.
    assert_eq!(round(&poller).await, None);
    env.advance(Duration::from_secs(5));
    assert!(matches!(
        round(&poller).await,
        Some(PollOutcome::Pending { .. })
    ));
    env.fake.approve_device_code(&user_code, USER).unwrap();
    env.advance(Duration::from_secs(4));
    assert_eq!(round(&poller).await, None, "polled before the interval");
    env.advance(Duration::from_secs(1));
    assert_eq!(round(&poller).await, Some(PollOutcome::Granted));

    let grant = env.grant("scan").await;
    assert_eq!(grant.state.status, TokenStatus::Active);
    assert!(grant.pending.is_none());
    assert!(grant.state.last_error.is_none());
    let refresh = env.open(
        "scan",
        GrantField::RefreshToken,
        grant.refresh_token.as_ref().unwrap(),
    );
    assert_eq!(env.fake.live_refresh_tokens(USER), vec![refresh.clone()]);
    let access = env.open(
        "scan",
        GrantField::AccessToken,
        grant.access_token.as_ref().unwrap(),
    );
    assert!(env.fake.access_token_is_live(&access));
    let raw = serde_json::to_string(&grant).unwrap();
    assert!(!raw.contains(&refresh) && !raw.contains(&access));
    let now = env.clock.now();
    assert_eq!(grant.state.last_refresh, Some(now));
    assert_eq!(
        grant.state.access_token_expires,
        Some(now + Duration::from_secs(3599))
    );
    // First refresh at ~75 % (65-85 %) of the lifetime, on the `refresh` schedule; polling is
    // over.
    let next = grant.next_refresh.unwrap();
    let lifetime = Duration::from_secs(3599);
    assert!(
        next >= now + lifetime.mul_f64(0.65) && next <= now + lifetime.mul_f64(0.85),
        "{next} is not 65-85 % into the token's lifetime from {now}"
    );
    assert_eq!(
        env.due(REFRESH_SCHEDULE).await,
        vec![("acme/scan".to_owned(), consent::unix_ms(next))]
    );
    assert!(env.due(CONSENT_POLL_SCHEDULE).await.is_empty());
    assert_eq!(successful_device_exchanges(&env.fake), 1);
    assert!(
        env.audit_actions()
            .await
            .contains(&("consent.complete".to_owned(), "ok".to_owned()))
    );
    // Nothing more to do.
    env.advance(Duration::from_secs(60));
    assert_eq!(round(&poller).await, None);
    env.fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn slow_down_adds_five_seconds_to_every_later_poll_even_across_restarts() {
    let env = Env::new().await;
    env.add_mailbox("scan", "m365", GrantType::DelegatedDeviceCode)
        .await;
    let _user_code = env.start_device("scan").await;
    let slow = || {
        ScriptedResponse::microsoft_error(
            400,
            "slow_down",
            70016,
            "Polling too frequently; slow down.",
        )
        .for_grant_type(DEVICE_GRANT)
    };
    // Second and third polls are told to slow down.
    let started = env.clock.now();
    let mut polled_at = Vec::new();
    let mut poller = DevicePoller::new(env.state.clone());
    let mut scripted = false;
    for second in 1..=60 {
        env.advance(Duration::from_secs(1));
        if polled_at.len() == 1 && !scripted {
            env.fake.script(Endpoint::MicrosoftToken, slow());
            env.fake.script(Endpoint::MicrosoftToken, slow());
            scripted = true;
        }
        if second == 30 {
            // A restart (or another replica): the grown interval lives in the store.
            poller = DevicePoller::new(env.state.clone());
        }
        match round(&poller).await {
            None => {}
            Some(PollOutcome::Pending { .. } | PollOutcome::SlowDown { .. }) => {
                polled_at.push((env.clock.now() - started).whole_seconds());
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    let gaps: Vec<i64> = polled_at.windows(2).map(|w| w[1] - w[0]).collect();
    // 5 s, then slow_down → 10 s, slow_down → 15 s, and 15 s from then on.
    assert_eq!(polled_at[0], 5, "{polled_at:?}");
    assert_eq!(gaps, vec![5, 10, 15, 15], "{polled_at:?}");
    let Some(PendingConsent::DeviceCode { interval_secs, .. }) = env.grant("scan").await.pending
    else {
        panic!("consent no longer pending");
    };
    assert_eq!(interval_secs, 15);
    // The fake saw the same spacing on its own clock.
    let times: Vec<OffsetDateTime> = env
        .fake
        .requests_to(Endpoint::MicrosoftToken)
        .iter()
        .map(|r| r.time)
        .collect();
    for (w, gap) in times.windows(2).zip(&gaps) {
        assert!((w[1] - w[0]).whole_seconds() >= *gap, "{times:?}");
    }
    env.fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn an_expired_code_ends_the_consent_with_the_reason_and_the_fix() {
    let env = Env::new().await;
    env.fake.set_device_code_lifetime(Duration::from_secs(20));
    env.add_mailbox("scan", "m365", GrantType::DelegatedDeviceCode)
        .await;
    env.start_device("scan").await;
    let poller = DevicePoller::new(env.state.clone());
    let mut last = None;
    for _ in 0..6 {
        env.advance(Duration::from_secs(5));
        if let Some(outcome) = round(&poller).await {
            last = Some(outcome);
        }
    }
    assert_eq!(
        last,
        Some(PollOutcome::Failed {
            status: TokenStatus::NotRetrieved,
            code: "AADSTS70019".into()
        })
    );
    let grant = env.grant("scan").await;
    assert_eq!(grant.state.status, TokenStatus::NotRetrieved);
    assert!(grant.pending.is_none());
    let error = grant.state.last_error.unwrap();
    assert_eq!(error.reason, "the code expired before anyone entered it");
    assert_eq!(
        error.fix,
        "run `tokenfleetctl mailbox consent scan --tenant acme` again"
    );
    assert!(env.due(CONSENT_POLL_SCHEDULE).await.is_empty());
    assert!(
        env.audit_actions()
            .await
            .contains(&("consent.failed".to_owned(), "failed".to_owned()))
    );
}

#[tokio::test]
async fn a_declined_consent_ends_and_an_earlier_grant_needs_reauth() {
    let env = Env::new().await;
    env.add_mailbox("scan", "m365", GrantType::DelegatedDeviceCode)
        .await;
    let poller = DevicePoller::new(env.state.clone());

    // A first consent succeeds.
    let code = env.start_device("scan").await;
    env.fake.approve_device_code(&code, USER).unwrap();
    env.advance(Duration::from_secs(5));
    assert_eq!(round(&poller).await, Some(PollOutcome::Granted));

    // A second one is declined: the earlier grant was being replaced → REAUTH_REQUIRED.
    let code = env.start_device("scan").await;
    assert_eq!(
        env.grant("scan").await.state.status,
        TokenStatus::ConsentPending
    );
    env.fake.decline_device_code(&code).unwrap();
    env.advance(Duration::from_secs(5));
    let outcome = round(&poller).await;
    assert!(
        matches!(
            &outcome,
            Some(PollOutcome::Failed {
                status: TokenStatus::ReauthRequired,
                ..
            })
        ),
        "{outcome:?}"
    );
    let grant = env.grant("scan").await;
    let error = grant.state.last_error.unwrap();
    assert!(error.reason.contains("declined"), "{}", error.reason);
    assert!(error.fix.contains("tokenfleetctl mailbox consent scan"));
    assert!(env.due(CONSENT_POLL_SCHEDULE).await.is_empty());
}

#[tokio::test]
async fn an_outage_keeps_the_consent_pending_and_backs_off() {
    let env = Env::new().await;
    env.add_mailbox("scan", "m365", GrantType::DelegatedDeviceCode)
        .await;
    let code = env.start_device("scan").await;
    let poller = DevicePoller::new(env.state.clone());
    env.fake.set_outage(true);
    env.advance(Duration::from_secs(5));
    let Some(PollOutcome::Retry { next_poll }) = round(&poller).await else {
        panic!("expected a retry");
    };
    assert_eq!(next_poll, env.clock.now() + Duration::from_secs(10));
    let grant = env.grant("scan").await;
    assert_eq!(grant.state.status, TokenStatus::ConsentPending);
    assert_eq!(grant.consecutive_failures, 1);
    env.fake.set_outage(false);
    env.fake.approve_device_code(&code, USER).unwrap();
    env.advance(Duration::from_secs(9));
    assert_eq!(round(&poller).await, None);
    env.advance(Duration::from_secs(1));
    assert_eq!(round(&poller).await, Some(PollOutcome::Granted));
    assert_eq!(env.grant("scan").await.consecutive_failures, 0);
}

#[tokio::test]
async fn google_refuses_the_device_flow_with_an_explanation() {
    let env = Env::new().await;
    // Written directly: the admin API already refuses this combination.
    env.add_mailbox("gmail", "gws", GrantType::DelegatedDeviceCode)
        .await;
    let err = consent::start(&env.state, TENANT, "gmail", None, "http://unused")
        .await
        .unwrap_err();
    let ConsentError::FailedPrecondition(message) = err else {
        panic!("expected FailedPrecondition, got {err:?}");
    };
    assert!(message.contains("Google"), "{message}");
    assert!(message.contains("device"), "{message}");
    assert!(env.fake.requests().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Authorization code + PKCE

#[tokio::test]
async fn a_pasted_redirect_url_completes_an_auth_code_consent() {
    let env = Env::new().await;
    env.add_mailbox("scan", "m365", GrantType::DelegatedAuthCode)
        .await;
    let (url, state) = env.start_auth("scan").await;
    let parsed = url::Url::parse(&url).unwrap();
    let q = |n: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(q("state").as_deref(), Some(state.as_str()));
    assert_eq!(q("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(q("redirect_uri").as_deref(), Some(REDIRECT));
    assert!(q("scope").unwrap().contains("offline_access"));
    let grant = env.grant("scan").await;
    assert_eq!(grant.state.status, TokenStatus::ConsentPending);
    assert!(matches!(
        grant.pending,
        Some(PendingConsent::AuthCode { .. })
    ));
    let index = env
        .state
        .store
        .get(&RecordKey::global(CONSENT_STATES, &state))
        .await
        .unwrap();
    assert!(index.is_some());

    let redirected = env.fake.authorize_url(&url, USER).unwrap();
    assert!(redirected.starts_with(REDIRECT));

    // A redirect of another attempt (other state) is refused and changes nothing.
    let forged = redirected.replace(&format!("state={state}"), "state=someone-elses");
    let err = consent::complete(&env.state, TENANT, "scan", &forged, "test")
        .await
        .unwrap_err();
    let ConsentError::InvalidArgument(message) = err else {
        panic!("expected InvalidArgument, got {err:?}");
    };
    assert!(
        message.contains("state does not match the consent that was started; start again"),
        "{message}"
    );
    assert_eq!(
        env.grant("scan").await.state.status,
        TokenStatus::ConsentPending
    );

    let done = consent::complete(&env.state, TENANT, "scan", &redirected, "test")
        .await
        .unwrap();
    assert_eq!(done.grant.state.status, TokenStatus::Active);
    let grant = env.grant("scan").await;
    assert_eq!(grant.state.status, TokenStatus::Active);
    assert!(grant.pending.is_none());
    let refresh = env.open(
        "scan",
        GrantField::RefreshToken,
        grant.refresh_token.as_ref().unwrap(),
    );
    assert_eq!(env.fake.live_refresh_tokens(USER), vec![refresh]);
    assert_eq!(env.due(REFRESH_SCHEDULE).await.len(), 1);
    // The state index is used up.
    let index = env
        .state
        .store
        .get(&RecordKey::global(CONSENT_STATES, &state))
        .await
        .unwrap();
    assert!(index.is_none());
    // The exchange carried the verifier whose S256 is the challenge of the URL.
    let exchange = env
        .fake
        .requests_to(Endpoint::MicrosoftToken)
        .into_iter()
        .find(|r| r.grant_type.as_deref() == Some("authorization_code"))
        .unwrap();
    assert!(exchange.param("code_verifier").unwrap().len() >= 43);
    // Completing again: nothing pending any more.
    let err = consent::complete(&env.state, TENANT, "scan", &redirected, "test")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConsentError::FailedPrecondition(_)),
        "{err:?}"
    );
    env.fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn the_fake_rejects_a_wrong_pkce_verifier_and_the_consent_stays_pending() {
    let env = Env::new().await;
    env.add_mailbox("scan", "m365", GrantType::DelegatedAuthCode)
        .await;
    let (url, _state) = env.start_auth("scan").await;
    // Swap the stored verifier for another one.
    let stored = consent::load_grant(&env.state, TENANT, "scan")
        .await
        .unwrap();
    let mut grant = stored.grant.clone();
    let Some(PendingConsent::AuthCode { pkce_verifier, .. }) = &mut grant.pending else {
        panic!("no pending auth code");
    };
    *pkce_verifier = seal_field(
        &env.state.keyring,
        TENANT,
        "scan",
        GrantField::PkceVerifier,
        &Secret::new("x".repeat(64)),
    )
    .unwrap();
    consent::save_grant(&env.state, stored.version, &grant)
        .await
        .unwrap();

    let redirected = env.fake.authorize_url(&url, USER).unwrap();
    let code = url::Url::parse(&redirected)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    // A bare code (no state to check) goes straight to the exchange.
    let err = consent::complete(&env.state, TENANT, "scan", &code, "test")
        .await
        .unwrap_err();
    let ConsentError::FailedPrecondition(message) = err else {
        panic!("expected FailedPrecondition, got {err:?}");
    };
    assert!(message.contains("PKCE"), "{message}");
    let exchange = env
        .fake
        .requests_to(Endpoint::MicrosoftToken)
        .into_iter()
        .find(|r| r.grant_type.as_deref() == Some("authorization_code"))
        .unwrap();
    assert_eq!(exchange.status, 400);
    assert_eq!(
        env.grant("scan").await.state.status,
        TokenStatus::ConsentPending
    );
    assert!(env.fake.live_refresh_tokens(USER).is_empty());
}

#[tokio::test]
async fn the_callback_page_completes_the_consent_and_escapes_errors() {
    let env = Env::new().await;
    env.add_mailbox("scan", "m365", GrantType::DelegatedAuthCode)
        .await;
    let (url, state) = env.start_auth("scan").await;
    let redirected = env.fake.authorize_url(&url, USER).unwrap();
    let query = url::Url::parse(&redirected)
        .unwrap()
        .query()
        .unwrap()
        .to_owned();
    let page = tokenfleet_broker::edge::callback::callback_page(&env.state, Some(&query)).await;
    assert_eq!(page.status, 200, "{}", page.html);
    assert!(
        page.html.contains(&format!(
            "Consent recorded for <strong>{USER}</strong>; you can close this window"
        )),
        "{}",
        page.html
    );
    assert_eq!(env.grant("scan").await.state.status, TokenStatus::Active);
    // Used up: the same redirect again finds nothing.
    let page = tokenfleet_broker::edge::callback::callback_page(&env.state, Some(&query)).await;
    assert_eq!(page.status, 404);
    assert!(!page.html.contains(&state));

    // A provider error in the redirect ends the consent and is shown escaped.
    let (_url, state) = env.start_auth("scan").await;
    let query = format!(
        "error=access_denied&error_description=%3Cscript%3Ealert(1)%3C%2Fscript%3E&state={state}"
    );
    let page = tokenfleet_broker::edge::callback::callback_page(&env.state, Some(&query)).await;
    assert_eq!(page.status, 409, "{}", page.html);
    assert!(!page.html.contains("<script>"), "{}", page.html);
    assert!(
        page.html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.html
    );
    assert!(page.html.contains("access_denied"), "{}", page.html);
    let grant = env.grant("scan").await;
    assert_eq!(grant.state.status, TokenStatus::ReauthRequired);
    assert!(grant.pending.is_none());
    assert!(
        env.audit_actions()
            .await
            .contains(&("consent.failed".to_owned(), "failed".to_owned()))
    );

    // No state at all.
    let page = tokenfleet_broker::edge::callback::callback_page(&env.state, Some("code=abc")).await;
    assert_eq!(page.status, 400);
}

// ---------------------------------------------------------------------------------------------
// No person involved

#[tokio::test]
async fn client_credentials_and_jwt_bearer_obtain_tokens_at_once() {
    let env = Env::new().await;
    env.add_mailbox("relay", "m365", GrantType::AppOnly).await;
    env.add_mailbox("gmail", "gws", GrantType::ServiceAccount)
        .await;

    let started = consent::start(&env.state, TENANT, "relay", None, "http://unused")
        .await
        .unwrap();
    assert_eq!(started.challenge, Challenge::None);
    let grant = env.grant("relay").await;
    assert_eq!(grant.state.status, TokenStatus::Active);
    assert!(grant.refresh_token.is_none());
    let access = env.open(
        "relay",
        GrantField::AccessToken,
        grant.access_token.as_ref().unwrap(),
    );
    assert!(env.fake.access_token_is_live(&access));
    assert_eq!(env.fake.token_requests("client_credentials"), 1);
    let cc = env
        .fake
        .requests_to(Endpoint::MicrosoftToken)
        .pop()
        .unwrap();
    assert_eq!(
        cc.param("scope"),
        Some("https://outlook.office365.com/.default")
    );

    let started = consent::start(&env.state, TENANT, "gmail", None, "http://unused")
        .await
        .unwrap();
    assert_eq!(started.challenge, Challenge::None);
    let grant = env.grant("gmail").await;
    assert_eq!(grant.state.status, TokenStatus::Active);
    let access = env.open(
        "gmail",
        GrantField::AccessToken,
        grant.access_token.as_ref().unwrap(),
    );
    assert!(env.fake.access_token_is_live(&access));
    assert_eq!(
        env.fake
            .token_requests("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        1
    );
    let due: Vec<String> = env
        .due(REFRESH_SCHEDULE)
        .await
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    assert_eq!(due.len(), 2, "{due:?}");
    assert!(env.fake.pending_device_codes().is_empty());
    env.fake.assert_no_violations().unwrap();
}

/// Google: the ID token's verified `email` must be the mailbox; another account's consent ends
/// the attempt with `account_mismatch`, audited, and stores no token; the mailbox's own account
/// then succeeds.
#[tokio::test]
async fn a_google_consent_by_another_account_is_refused_and_stores_nothing() {
    let env = Env::new().await;
    let other = "intruder@contoso.example";
    env.fake.add_user(other);
    env.add_mailbox("gmail", "gws", GrantType::DelegatedAuthCode)
        .await;
    let (url, _) = env.start_auth("gmail").await;
    assert!(url.contains("openid") && url.contains("email"), "{url}");
    let redirected = env.fake.authorize_url(&url, other).unwrap();
    let err = consent::complete(&env.state, TENANT, "gmail", &redirected, "test")
        .await
        .unwrap_err();
    let ConsentError::FailedPrecondition(message) = err else {
        panic!("expected FailedPrecondition, got {err:?}");
    };
    assert!(
        message.contains(&format!("the sign-in was made as {other}"))
            && message.contains(USER)
            && message.contains("--consent-account"),
        "{message}"
    );
    let grant = env.grant("gmail").await;
    assert_eq!(grant.state.status, TokenStatus::NotRetrieved);
    assert!(grant.access_token.is_none() && grant.refresh_token.is_none());
    assert!(grant.pending.is_none());
    assert_eq!(grant.state.last_error.unwrap().code, "account_mismatch");
    // The wrong account's grant does not linger at the provider: revoked (Google has an endpoint).
    assert_eq!(env.fake.requests_to(Endpoint::GoogleRevoke).len(), 1);
    assert!(env.fake.live_refresh_tokens(other).is_empty());

    // The mailbox's own account binds.
    let (url, _) = env.start_auth("gmail").await;
    let redirected = env.fake.authorize_url(&url, USER).unwrap();
    consent::complete(&env.state, TENANT, "gmail", &redirected, "test")
        .await
        .unwrap();
    assert_eq!(env.grant("gmail").await.state.status, TokenStatus::Active);
}
