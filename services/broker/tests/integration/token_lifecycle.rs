//! The token lifecycle against the fake identity provider over HTTP, on the embedded store and a
//! real `redis-server`: rotation, error classification and status transitions, backoff and
//! recovery, the refresh scheduler with a controlled clock, secrets at rest, disabled mailboxes,
//! issuance checks, token deletion with and without revocation, and the token admin RPCs.

// Test helpers panic on setup failures: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenfleet_broker::edge::grpc_status::ToStatus as _;

use time::OffsetDateTime;
use tokenfleet_broker::admin::AdminService;
use tokenfleet_broker::api_keys;
use tokenfleet_broker::records::{Records, mailbox_key};
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::grant::{
    GrantField, GrantRecord, grant_key, open_field, seal_field,
};
use tokenfleet_broker::tokens::issue::issue;
use tokenfleet_broker::tokens::lifecycle::{Revocation, TokenError, TokenService};
use tokenfleet_broker::tokens::scheduler::{
    REFRESH_SCHEDULE, RefreshScheduler, member, schedule_refresh, unix_ms,
};
use tokenfleet_domain::{
    Clock, Device, GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind, Role,
    SenderMode, Stamps, TokenState, TokenStatus,
};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::admin_server::AdminServer;
use tokenfleet_providers::{ProviderClient, ProviderSettings};
use tokenfleet_seal::{Keyring, Secret};
use tokenfleet_store::{Precondition, Scope};
use tokenfleet_testkit::fake_idp::{ClientSpec, Endpoint, FakeIdp, ScriptedResponse};

use crate::support::{
    Admin, Backend, IdpEnv, ManualClock, StoreHome, eventually, idp_env, serve_plaintext,
    token_config,
};

pub(crate) const TENANT: &str = "acme";
pub(crate) const PROVIDER: &str = "m365";
pub(crate) const CLIENT_ID: &str = "app-lifecycle";
pub(crate) const CLIENT_SECRET: &str = "client-secret-lifecycle-do-not-leak";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";

// ----------------------------------------------------------------------------------------------
// Harness
// ----------------------------------------------------------------------------------------------

pub(crate) struct Env {
    pub(crate) fake: FakeIdp,
    pub(crate) state: BrokerState,
    pub(crate) service: TokenService,
    kind: ProviderKind,
    /// The sealing key (`k1`), base64.
    key: String,
    pub(crate) store: StoreHome,
}

impl Env {
    pub(crate) async fn start(backend: Backend, kind: ProviderKind, clock: Arc<dyn Clock>) -> Env {
        let mut client = ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET);
        // An admin consented the app for Graph's Mail.Send tenant-wide (static permission).
        client.consented_scopes = vec![tokenfleet_providers::MS_GRAPH_MAIL_SEND.to_owned()];
        let IdpEnv {
            fake,
            state,
            key,
            home,
        } = idp_env(backend, clock, client, TENANT, PROVIDER, kind).await;
        let service = TokenService::new(state.clone(), token_config());
        Env {
            fake,
            state,
            service,
            kind,
            key,
            store: home,
        }
    }

    pub(crate) fn records(&self) -> Records<'_> {
        Records::new(self.state.store.as_ref())
    }

    pub(crate) fn now(&self) -> OffsetDateTime {
        self.state.clock.now()
    }

    pub(crate) fn address(name: &str) -> String {
        format!("{name}@contoso.example")
    }

    pub(crate) async fn add_mailbox(&self, name: &str, grant_type: GrantType) {
        self.records()
            .put(
                &Mailbox {
                    consent_account: String::new(),
                    tenant: TENANT.into(),
                    name: name.into(),
                    address: Self::address(name),
                    provider: PROVIDER.into(),
                    grant_type,
                    kind: MailboxKind::Bulk,
                    purposes: vec![MailPurpose::Send, MailPurpose::Pop],
                    disabled: false,
                    token: TokenState::default(),
                    stamps: Stamps::new(self.now()),
                },
                Precondition::Absent,
            )
            .await
            .unwrap();
    }

    pub(crate) async fn provider_client(&self) -> ProviderClient {
        let p = self
            .records()
            .get::<Provider>(&tokenfleet_broker::records::provider_key(TENANT, PROVIDER))
            .await
            .unwrap()
            .unwrap()
            .value;
        ProviderClient::new(
            ProviderSettings::from_provider(&p, Some(Secret::new(CLIENT_SECRET))).unwrap(),
        )
        .unwrap()
    }

    /// A delegated mailbox whose owner consented through the fake's auth-code path; the grant is
    /// written sealed and ACTIVE, as a completed consent leaves it. Returns the refresh token.
    pub(crate) async fn consented_mailbox(&self, name: &str) -> String {
        self.add_mailbox(name, GrantType::DelegatedAuthCode).await;
        let user = Self::address(name);
        self.fake.add_user(&user);
        let client = self.provider_client().await;
        let scopes = client
            .scopes_for(
                GrantType::DelegatedAuthCode,
                &[MailPurpose::Send, MailPurpose::Pop],
            )
            .unwrap();
        let auth = client
            .authorization_url(&scopes, REDIRECT, "st", None)
            .unwrap();
        let redirect = self.fake.authorize_url(&auth.url, &user).unwrap();
        let code = url_param(&redirect, "code");
        let granted = client
            .exchange_code(&Secret::new(code), &auth.pkce_verifier, REDIRECT)
            .await
            .unwrap();
        let rt = granted.refresh_token.clone().expect("refresh token");
        let now = self.now();
        let mut g = GrantRecord::empty(TENANT, name);
        g.state.status = TokenStatus::Active;
        g.state.last_refresh = Some(now);
        g.state.access_token_expires = Some(now + granted.expires_in);
        g.access_token = Some(self.seal(name, GrantField::AccessToken, &granted.access_token));
        g.refresh_token = Some(self.seal(name, GrantField::RefreshToken, &rt));
        g.refresh_token_obtained = Some(now);
        g.scopes = scopes;
        let next = now + granted.expires_in.mul_f64(0.75);
        g.next_refresh = Some(next);
        self.records().put(&g, Precondition::Absent).await.unwrap();
        schedule_refresh(self.state.store.as_ref(), TENANT, name, next)
            .await
            .unwrap();
        rt.expose().to_owned()
    }

    pub(crate) fn seal(
        &self,
        mailbox: &str,
        field: GrantField,
        value: &Secret,
    ) -> tokenfleet_seal::Sealed {
        seal_field(&self.state.keyring, TENANT, mailbox, field, value).unwrap()
    }

    pub(crate) async fn grant(&self, mailbox: &str) -> GrantRecord {
        self.records()
            .get::<GrantRecord>(&grant_key(TENANT, mailbox))
            .await
            .unwrap()
            .expect("grant record")
            .value
    }

    pub(crate) fn open(&self, g: &GrantRecord, field: GrantField) -> String {
        let sealed = match field {
            GrantField::RefreshToken => g.refresh_token.as_ref(),
            GrantField::AccessToken => g.access_token.as_ref(),
            _ => None,
        }
        .expect("sealed field");
        open_field(&self.state.keyring, TENANT, &g.mailbox, field, sealed)
            .unwrap()
            .expose()
            .to_owned()
    }

    /// Schedule entries due at or before `at` (unix ms).
    pub(crate) async fn due_at(&self, at: OffsetDateTime) -> Vec<(String, i64)> {
        self.state
            .store
            .due(REFRESH_SCHEDULE, unix_ms(at), 1000)
            .await
            .unwrap()
    }

    pub(crate) async fn scheduled_time(&self, mailbox: &str) -> Option<i64> {
        let far = OffsetDateTime::now_utc() + Duration::from_secs(3650 * 24 * 3600);
        self.due_at(far)
            .await
            .into_iter()
            .find(|(m, _)| *m == member(TENANT, mailbox))
            .map(|(_, t)| t)
    }

    /// Refresh requests the fake saw, with the refresh token each carried.
    pub(crate) fn refreshes(&self) -> Vec<String> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
            .map(|r| r.param("refresh_token").unwrap_or_default().to_owned())
            .collect()
    }
}

fn url_param(url: &str, name: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

// ----------------------------------------------------------------------------------------------
// Rotation
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn rotated_refresh_tokens_are_persisted_and_kept_when_none_comes_back() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let rt0 = env.consented_mailbox("scan").await;

    // Rotation: the fake answers with a new refresh token, which replaces the old one.
    let before = env.grant("scan").await;
    let token = env.service.refresh_now(TENANT, "scan").await.unwrap();
    assert_eq!(env.refreshes(), vec![rt0.clone()]);
    let g = env.grant("scan").await;
    let rt1 = env.open(&g, GrantField::RefreshToken);
    assert_ne!(rt1, rt0, "the rotated refresh token is stored");
    assert_eq!(
        env.fake.live_refresh_tokens(&Env::address("scan")).last(),
        Some(&rt1)
    );
    assert_eq!(
        env.open(&g, GrantField::AccessToken),
        token.access_token.expose()
    );
    assert!(env.fake.access_token_is_live(token.access_token.expose()));
    assert_eq!(token.sasl_username, Env::address("scan"));
    assert_eq!(g.state.status, TokenStatus::Active);
    assert!(g.refresh_token_obtained >= before.refresh_token_obtained);
    assert!(g.fence > 0, "written under a lease");

    // RFC 6749 §6: a response without refresh_token keeps the old one…
    env.fake.omit_refresh_token_next(1);
    env.service.refresh_now(TENANT, "scan").await.unwrap();
    let g = env.grant("scan").await;
    assert_eq!(
        env.open(&g, GrantField::RefreshToken),
        rt1,
        "old refresh token kept"
    );
    // …and the next refresh uses it.
    env.service.refresh_now(TENANT, "scan").await.unwrap();
    assert_eq!(env.refreshes(), vec![rt0, rt1.clone(), rt1.clone()]);
    let rt3 = env.open(&env.grant("scan").await, GrantField::RefreshToken);
    assert_ne!(rt3, rt1);
    env.fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn cached_tokens_are_served_until_the_margin_then_refreshed_once() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    env.consented_mailbox("scan").await;
    let first = env
        .service
        .access_token(TENANT, "scan", Duration::from_secs(300))
        .await
        .unwrap();
    assert!(
        env.refreshes().is_empty(),
        "a fresh cached token needs no provider call"
    );

    // 56 minutes later the token has less than the 5 minute margin left.
    clock.advance(Duration::from_secs(56 * 60));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let service = env.service.clone();
        calls.spawn(async move {
            service
                .access_token(TENANT, "scan", Duration::from_secs(300))
                .await
        });
    }
    let mut tokens = std::collections::HashSet::new();
    while let Some(r) = calls.join_next().await {
        tokens.insert(r.unwrap().unwrap().access_token.expose().to_owned());
    }
    assert_eq!(env.refreshes().len(), 1, "twenty callers, one refresh");
    assert_eq!(tokens.len(), 1);
    assert!(!tokens.contains(first.access_token.expose()));
}

// ----------------------------------------------------------------------------------------------
// Error classification and status transitions
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_dead_grant_needs_a_new_consent_with_reason_and_fix() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    env.consented_mailbox("scan").await;
    env.fake
        .fail_next_refresh_for_user(&Env::address("scan"), 700082);
    clock.advance(Duration::from_secs(3600));

    let err = env
        .service
        .access_token(TENANT, "scan", Duration::from_secs(300))
        .await
        .unwrap_err();
    let TokenError::ReauthRequired { error, .. } = &err else {
        panic!("expected REAUTH_REQUIRED, got {err:?}");
    };
    assert_eq!(error.code, "AADSTS700082");
    assert!(
        error.reason.contains("90 days without use"),
        "{}",
        error.reason
    );
    assert!(
        error.fix.contains("tokenfleetctl mailbox consent scan"),
        "{}",
        error.fix
    );
    assert_eq!(err.to_status().code(), tonic::Code::FailedPrecondition);

    let g = env.grant("scan").await;
    assert_eq!(g.state.status, TokenStatus::ReauthRequired);
    assert_eq!(g.state.last_error.as_ref().unwrap().code, "AADSTS700082");
    assert_eq!(g.consecutive_failures, 1);
    assert_eq!(g.next_refresh, None);
    assert_eq!(
        env.scheduled_time("scan").await,
        None,
        "a dead grant is not retried"
    );

    // Nobody calls the provider for it again until someone consents.
    let refreshes = env.refreshes().len();
    for _ in 0..3 {
        assert!(matches!(
            env.service
                .access_token(TENANT, "scan", Duration::from_secs(60))
                .await,
            Err(TokenError::ReauthRequired { .. })
        ));
    }
    assert_eq!(env.refreshes().len(), refreshes);
}

#[tokio::test]
async fn outages_mean_refresh_failing_with_backoff_and_recovery_never_reauth() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Redis, ProviderKind::Microsoft, clock.clone()).await;
    env.consented_mailbox("scan").await;

    // Every state the grant passes through is observed.
    let seen = Arc::new(Mutex::new(Vec::<TokenStatus>::new()));
    let watcher = {
        let (state, seen) = (env.state.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                if let Some(g) = Records::new(state.store.as_ref())
                    .get::<GrantRecord>(&grant_key(TENANT, "scan"))
                    .await
                    .unwrap()
                {
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&g.value.state.status) {
                        seen.push(g.value.state.status);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = RefreshScheduler::spawn(env.service.clone(), async {
        let _ = stopped.await;
    });

    env.fake.set_outage(true);
    env.fake.set_outage_retry_after(Some(120));
    // The scheduled refresh comes due; every attempt meets a 503 with Retry-After: 120.
    let mut last_failures = 0;
    for round in 1..=3u32 {
        let due = env.grant("scan").await.next_refresh.unwrap();
        clock.set(due + Duration::from_millis(1));
        let g = eventually("a failed attempt", Duration::from_secs(10), async || {
            let g = env.grant("scan").await;
            (g.consecutive_failures > last_failures).then_some(g)
        })
        .await;
        last_failures = g.consecutive_failures;
        assert_eq!(g.consecutive_failures, round);
        assert_eq!(g.state.status, TokenStatus::RefreshFailing);
        let e = g.state.last_error.as_ref().unwrap();
        assert_eq!(e.code, "http_503");
        assert!(e.reason.contains("unavailable"), "{}", e.reason);
        let next = g.next_refresh.unwrap();
        let wait = next - clock.now();
        assert!(
            wait >= time::Duration::seconds(119),
            "Retry-After honoured: {wait}"
        );
        // The backoff is on the schedule (eventually: written right after the record).
        eventually(
            "the retry on the schedule",
            Duration::from_secs(5),
            async || (env.scheduled_time("scan").await == Some(unix_ms(next))).then_some(()),
        )
        .await;
    }
    // While failing, the last good token is still handed out as long as it is valid.
    let failing = env.grant("scan").await;
    assert!(failing.state.access_token_expires.unwrap() > clock.now());

    // Without Retry-After the delay grows exponentially from 30 s.
    env.fake.set_outage_retry_after(None);
    let due = env.grant("scan").await.next_refresh.unwrap();
    clock.set(due + Duration::from_millis(1));
    let g = eventually("a fourth failure", Duration::from_secs(10), async || {
        let g = env.grant("scan").await;
        (g.consecutive_failures == 4).then_some(g)
    })
    .await;
    let wait = g.next_refresh.unwrap() - clock.now();
    assert!(
        wait >= time::Duration::seconds(180),
        "30 s · 2^3 with jitter: {wait}"
    );

    // Recovery: ACTIVE again, failures reset, next refresh at ~75 % of the lifetime.
    env.fake.set_outage(false);
    clock.set(g.next_refresh.unwrap() + Duration::from_millis(1));
    let g = eventually("recovery", Duration::from_secs(10), async || {
        let g = env.grant("scan").await;
        (g.state.status == TokenStatus::Active && g.consecutive_failures == 0).then_some(g)
    })
    .await;
    assert!(g.state.last_error.is_none());
    let wait = g.next_refresh.unwrap() - clock.now();
    assert!(
        wait > time::Duration::minutes(35) && wait < time::Duration::minutes(52),
        "{wait}"
    );

    let _ = stop.send(());
    scheduler.await.unwrap();
    eventually(
        "the watcher to see the recovery",
        Duration::from_secs(5),
        async || (seen.lock().unwrap().last() == Some(&TokenStatus::Active)).then_some(()),
    )
    .await;
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.contains(&TokenStatus::ReauthRequired),
        "transient failures must never look like a dead grant: {seen:?}"
    );
    assert_eq!(
        seen,
        vec![
            TokenStatus::Active,
            TokenStatus::RefreshFailing,
            TokenStatus::Active
        ]
    );
}

#[tokio::test]
async fn an_app_registration_problem_is_refresh_failing_with_the_app_fix() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    env.consented_mailbox("scan").await;
    env.fake
        .fail_next_refresh_for_user(&Env::address("scan"), 7000222);
    let err = env.service.refresh_now(TENANT, "scan").await.unwrap_err();
    let TokenError::RefreshFailing {
        error, retry_at, ..
    } = &err
    else {
        panic!("expected REFRESH_FAILING, got {err:?}");
    };
    assert_eq!(error.code, "AADSTS7000222");
    assert!(
        error.reason.contains("client secret has expired"),
        "{}",
        error.reason
    );
    assert!(
        error.fix.contains("tokenfleetctl provider update"),
        "{}",
        error.fix
    );
    assert!(retry_at.is_some());
    assert_eq!(
        env.grant("scan").await.state.status,
        TokenStatus::RefreshFailing
    );
}

#[tokio::test]
async fn clock_skew_is_recorded() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    env.consented_mailbox("scan").await;
    env.fake.advance(Duration::from_secs(150));
    env.service.refresh_now(TENANT, "scan").await.unwrap();
    let skew = env.grant("scan").await.clock_skew_secs;
    assert!((145..=155).contains(&skew), "{skew}");
    env.fake.advance(Duration::ZERO);
}

// ----------------------------------------------------------------------------------------------
// Scheduler
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_scheduler_refreshes_before_expiry() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Redis, ProviderKind::Microsoft, clock.clone()).await;
    env.consented_mailbox("scan").await;
    env.consented_mailbox("fax").await;
    let start = clock.now();
    let old = env.grant("scan").await;
    let old_expiry = old.state.access_token_expires.unwrap();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = RefreshScheduler::spawn(env.service.clone(), async {
        let _ = stopped.await;
    });

    // Nothing is due at 60 % of the lifetime.
    clock.set(start + Duration::from_secs(36 * 60));
    assert!(env.due_at(clock.now()).await.is_empty());

    // At 90 % both are due and get refreshed, before the old token expires.
    clock.set(start + Duration::from_secs(54 * 60));
    eventually("both refreshed", Duration::from_secs(10), async || {
        (env.refreshes().len() == 2).then_some(())
    })
    .await;
    let g = eventually("the new grant", Duration::from_secs(5), async || {
        let g = env.grant("scan").await;
        (g.state.access_token_expires > Some(old_expiry)).then_some(g)
    })
    .await;
    assert!(
        g.state.last_refresh.unwrap() < old_expiry,
        "refreshed before expiry"
    );
    let next = g.next_refresh.unwrap() - clock.now();
    assert!(
        next >= time::Duration::minutes(38) && next <= time::Duration::minutes(51),
        "{next}"
    );
    assert_eq!(
        env.scheduled_time("scan").await,
        Some(unix_ms(g.next_refresh.unwrap()))
    );

    // A long-lived delegated token is still refreshed within 24 h.
    env.fake
        .set_access_token_lifetime(Duration::from_secs(7 * 24 * 3600));
    env.service.refresh_now(TENANT, "fax").await.unwrap();
    let g = env.grant("fax").await;
    let next = g.next_refresh.unwrap() - clock.now();
    assert!(
        next <= time::Duration::hours(24) && next >= time::Duration::hours(21),
        "{next}"
    );

    let _ = stop.send(());
    scheduler.await.unwrap();
    env.fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn replicas_find_grants_missing_from_the_schedule_at_start() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    env.consented_mailbox("scan").await;
    env.state
        .store
        .unschedule(REFRESH_SCHEDULE, &member(TENANT, "scan"))
        .await
        .unwrap();
    let written = tokenfleet_broker::tokens::scheduler::reconcile(&env.service)
        .await
        .unwrap();
    assert_eq!(written, 1);
    let g = env.grant("scan").await;
    assert_eq!(
        env.scheduled_time("scan").await,
        Some(unix_ms(g.next_refresh.unwrap()))
    );
    // At most once a day across all replicas.
    assert_eq!(
        tokenfleet_broker::tokens::scheduler::reconcile(&env.service)
            .await
            .unwrap(),
        0
    );
}

// ----------------------------------------------------------------------------------------------
// Secrets at rest
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn no_token_is_stored_in_plaintext_and_sealed_tokens_do_not_move() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let mut secrets = vec![
        env.consented_mailbox("scan").await,
        env.consented_mailbox("fax").await,
    ];
    for _ in 0..2 {
        for m in ["scan", "fax"] {
            let t = env.service.refresh_now(TENANT, m).await.unwrap();
            secrets.push(t.access_token.expose().to_owned());
        }
    }
    for m in ["scan", "fax"] {
        let g = env.grant(m).await;
        secrets.push(env.open(&g, GrantField::RefreshToken));
        secrets.push(env.open(&g, GrantField::AccessToken));
        secrets.extend(env.fake.live_refresh_tokens(&Env::address(m)));
    }
    secrets.push(CLIENT_SECRET.to_owned());
    secrets.sort();
    secrets.dedup();
    assert!(secrets.len() >= 10, "{}", secrets.len());

    // Every record of the tenant, the audit streams, and the database file itself.
    let scope = Scope::Tenant(TENANT.into());
    let mut raw: Vec<Vec<u8>> = Vec::new();
    for collection in ["provider", "mailbox", "device", "agent", "grant"] {
        for (_, record) in env
            .state
            .store
            .list(&scope, collection, None, 1000)
            .await
            .unwrap()
        {
            raw.push(record.data);
        }
    }
    for s in [&scope, &Scope::Global] {
        for kind in tokenfleet_broker::audit::AuditKind::ALL {
            for e in env
                .state
                .store
                .read_back(s, kind.stream(), None, 1000)
                .await
                .unwrap()
            {
                raw.push(e.data);
            }
        }
    }
    assert!(
        raw.iter()
            .any(|r| r.windows(5).any(|w| w == b"grant" || w == b"scan@"))
    );
    let file = std::fs::read(env.store.dir.as_ref().unwrap().path().join("store.redb")).unwrap();
    raw.push(file);
    for secret in &secrets {
        for bytes in &raw {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret is stored in plaintext"
            );
        }
    }

    // A sealed refresh token copied onto another mailbox's grant does not open there.
    let scan = env.grant("scan").await;
    let stored = env
        .records()
        .get::<GrantRecord>(&grant_key(TENANT, "fax"))
        .await
        .unwrap()
        .unwrap();
    let mut fax = stored.value.clone();
    fax.refresh_token = scan.refresh_token.clone();
    assert!(
        open_field(
            &env.state.keyring,
            TENANT,
            "fax",
            GrantField::RefreshToken,
            fax.refresh_token.as_ref().unwrap()
        )
        .is_err()
    );
    // Nor as another field of the same mailbox.
    assert!(
        open_field(
            &env.state.keyring,
            TENANT,
            "scan",
            GrantField::AccessToken,
            scan.refresh_token.as_ref().unwrap()
        )
        .is_err()
    );
    // The lifecycle refuses it without calling the provider or leaking anything.
    env.records()
        .put(&fax, Precondition::Version(stored.version))
        .await
        .unwrap();
    let before = env.refreshes().len();
    let err = env.service.refresh_now(TENANT, "fax").await.unwrap_err();
    assert!(matches!(err, TokenError::Internal(_)), "{err:?}");
    assert_eq!(env.refreshes().len(), before);
    for secret in &secrets {
        assert!(!format!("{err} {err:?}").contains(secret.as_str()));
    }
}

// ----------------------------------------------------------------------------------------------
// Disabled mailboxes, issuance
// ----------------------------------------------------------------------------------------------

async fn set_disabled(env: &Env, mailbox: &str, disabled: bool) {
    let stored = env
        .records()
        .get::<Mailbox>(&mailbox_key(TENANT, mailbox))
        .await
        .unwrap()
        .unwrap();
    let mut m = stored.value;
    m.disabled = disabled;
    env.records()
        .put(&m, Precondition::Version(stored.version))
        .await
        .unwrap();
}

async fn add_device(env: &Env, name: &str, mode: SenderMode, mailboxes: &[&str]) {
    env.records()
        .put(
            &Device {
                tenant: TENANT.into(),
                name: name.into(),
                display_name: String::new(),
                agent: String::new(),
                sender_mode: mode,
                admin_mailbox: if mode == SenderMode::FixedAdmin {
                    mailboxes[0].into()
                } else {
                    String::new()
                },
                bulk_mailbox: if mode == SenderMode::Bulk {
                    mailboxes[0].into()
                } else {
                    String::new()
                },
                allowed_mailboxes: if matches!(
                    mode,
                    SenderMode::LoginUser | SenderMode::AllowUserChange
                ) {
                    mailboxes.iter().map(|m| (*m).to_owned()).collect()
                } else {
                    Vec::new()
                },
                smtp: Default::default(),
                fetch: Default::default(),
                ingress: Default::default(),
                user_provider: String::new(),
                stamps: Stamps::new(env.now()),
            },
            Precondition::Absent,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_disabled_mailbox_is_neither_refreshed_nor_issued() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    env.consented_mailbox("scan").await;
    add_device(&env, "mfp", SenderMode::Bulk, &["scan"]).await;
    set_disabled(&env, "scan", true).await;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = RefreshScheduler::spawn(env.service.clone(), async {
        let _ = stopped.await;
    });
    // The refresh comes due: the scheduler looks, calls nobody, and looks again in an hour.
    clock.advance(Duration::from_secs(3000));
    let later = eventually(
        "the disabled mailbox put back",
        Duration::from_secs(10),
        async || {
            env.scheduled_time("scan")
                .await
                .filter(|t| *t >= unix_ms(clock.now() + Duration::from_secs(3500)))
        },
    )
    .await;
    assert!(later <= unix_ms(clock.now() + Duration::from_secs(3600)));
    assert!(env.refreshes().is_empty());

    for result in [
        env.service
            .access_token(TENANT, "scan", Duration::from_secs(1))
            .await,
        env.service.refresh_now(TENANT, "scan").await,
        issue(
            &env.service,
            "test",
            TENANT,
            "mfp",
            "scan",
            MailPurpose::Send,
        )
        .await,
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, TokenError::Disabled { .. }), "{err:?}");
        assert_eq!(err.to_status().code(), tonic::Code::FailedPrecondition);
    }
    assert!(env.refreshes().is_empty());

    // Enabled again: tokens flow (the old one expired meanwhile, so one refresh).
    set_disabled(&env, "scan", false).await;
    clock.advance(Duration::from_secs(3600));
    issue(
        &env.service,
        "test",
        TENANT,
        "mfp",
        "scan",
        MailPurpose::Send,
    )
    .await
    .unwrap();
    assert_eq!(env.refreshes().len(), 1);
    let _ = stop.send(());
    scheduler.await.unwrap();
}

#[tokio::test]
async fn issuance_follows_sender_modes_and_purposes_and_is_audited() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    for m in ["admin", "bulk", "alice"] {
        env.consented_mailbox(m).await;
    }
    add_device(&env, "fixed", SenderMode::FixedAdmin, &["admin"]).await;
    add_device(&env, "bulky", SenderMode::Bulk, &["bulk"]).await;
    add_device(&env, "login", SenderMode::LoginUser, &["alice"]).await;

    let ok = issue(
        &env.service,
        "apikey:k1",
        TENANT,
        "fixed",
        "admin",
        MailPurpose::Send,
    )
    .await
    .unwrap();
    assert_eq!(ok.sasl_username, Env::address("admin"));
    assert!(env.fake.access_token_is_live(ok.access_token.expose()));
    assert!(ok.expires > OffsetDateTime::now_utc() + Duration::from_secs(3000));
    issue(
        &env.service,
        "apikey:k1",
        TENANT,
        "bulky",
        "bulk",
        MailPurpose::Pop,
    )
    .await
    .unwrap();
    issue(
        &env.service,
        "apikey:k1",
        TENANT,
        "login",
        "alice",
        MailPurpose::Send,
    )
    .await
    .unwrap();

    let refused = [
        (
            "fixed",
            "bulk",
            MailPurpose::Send,
            "may use only its admin mailbox `admin`",
        ),
        (
            "bulky",
            "admin",
            MailPurpose::Send,
            "may use only its bulk mailbox `bulk`",
        ),
        (
            "login",
            "bulk",
            MailPurpose::Send,
            "allowed mailboxes [alice]",
        ),
        (
            "ghost",
            "admin",
            MailPurpose::Send,
            "device `ghost` does not exist",
        ),
        ("fixed", "admin", MailPurpose::Imap, "not set up for imap"),
    ];
    for (device, mailbox, purpose, needle) in refused {
        let err = issue(&env.service, "apikey:k1", TENANT, device, mailbox, purpose)
            .await
            .unwrap_err();
        assert!(matches!(err, TokenError::Denied(_)), "{err:?}");
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(err.to_status().code(), tonic::Code::PermissionDenied);
    }

    // Issuances have their own audit stream.
    let events = env
        .state
        .store
        .read_back(
            &Scope::Tenant(TENANT.into()),
            tokenfleet_broker::audit::ISSUANCE_STREAM,
            None,
            100,
        )
        .await
        .unwrap();
    let issued: Vec<tokenfleet_domain::AuditEvent> = events
        .iter()
        .map(|e| serde_json::from_slice(&e.data).unwrap())
        .filter(|e: &tokenfleet_domain::AuditEvent| e.action == "token.issue")
        .collect();
    assert_eq!(issued.len(), 8);
    assert_eq!(issued.iter().filter(|e| e.result == "ok").count(), 3);
    assert_eq!(
        issued
            .iter()
            .filter(|e| e.result == "permission_denied")
            .count(),
        5
    );
    let e = issued
        .iter()
        .find(|e| e.result == "ok" && e.target.ends_with("/admin"))
        .unwrap();
    assert_eq!(e.actor, "apikey:k1");
    assert!(
        e.detail.contains("device `fixed`") && e.detail.contains("purpose send"),
        "{}",
        e.detail
    );
    let raw: Vec<u8> = events.iter().flat_map(|e| e.data.clone()).collect();
    assert!(
        !raw.windows(ok.access_token.expose().len())
            .any(|w| w == ok.access_token.expose().as_bytes())
    );
}

// ----------------------------------------------------------------------------------------------
// Other grant types
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn app_only_grants_are_renewed_with_client_credentials() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    env.add_mailbox("relay", GrantType::AppOnly).await;
    let mut g = GrantRecord::empty(TENANT, "relay");
    g.state.status = TokenStatus::Active;
    g.state.last_refresh = Some(clock.now() - Duration::from_secs(3600));
    g.state.access_token_expires = Some(clock.now() - Duration::from_secs(1));
    g.access_token = Some(env.seal("relay", GrantField::AccessToken, &Secret::new("expired-at")));
    env.records().put(&g, Precondition::Absent).await.unwrap();

    let t = env
        .service
        .access_token(TENANT, "relay", Duration::from_secs(300))
        .await
        .unwrap();
    assert!(env.fake.access_token_is_live(t.access_token.expose()));
    assert_eq!(env.fake.token_requests("client_credentials"), 1);
    let g = env.grant("relay").await;
    assert_eq!(g.state.status, TokenStatus::Active);
    assert!(
        g.refresh_token.is_none(),
        "app-only grants have no refresh token"
    );
    let scope = env.fake.requests_to(Endpoint::MicrosoftToken)[0]
        .param("scope")
        .unwrap()
        .to_owned();
    assert_eq!(scope, "https://outlook.office365.com/.default");
}

/// One grant, a token per resource: a device that sends with Graph gets a token whose audience is
/// Graph (delegated: the refresh token redeemed for `Mail.Send`, its rotation persisted;
/// app-only: client credentials for Graph's `.default`), cached apart from the mail protocols'
/// token, which keeps its own audience.
#[tokio::test]
async fn graph_tokens_are_minted_per_resource_from_one_grant_and_cached_apart() {
    use tokenfleet_providers::TokenResource;
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    let rt0 = env.consented_mailbox("scan").await;
    let want = Duration::from_secs(300);

    let mail = env
        .service
        .access_token(TENANT, "scan", want)
        .await
        .unwrap();
    assert_eq!(
        env.fake
            .token_audience(mail.access_token.expose())
            .as_deref(),
        Some("https://outlook.office.com")
    );
    assert!(env.refreshes().is_empty());

    let graph = env
        .service
        .access_token_for(TENANT, "scan", TokenResource::MicrosoftGraph, want)
        .await
        .unwrap();
    assert_eq!(
        env.fake
            .token_audience(graph.access_token.expose())
            .as_deref(),
        Some("https://graph.microsoft.com"),
        "a token for Graph, not for Exchange Online"
    );
    assert_eq!(graph.sasl_username, Env::address("scan"));
    assert_eq!(
        env.refreshes(),
        vec![rt0.clone()],
        "the one refresh token redeemed"
    );
    let scope = env
        .fake
        .requests_to(Endpoint::MicrosoftToken)
        .last()
        .and_then(|r| r.param("scope").map(str::to_owned))
        .unwrap();
    assert_eq!(
        scope,
        "https://graph.microsoft.com/Mail.Send offline_access"
    );
    // The rotated refresh token is the grant's now.
    let g = env.grant("scan").await;
    let rt1 = env.open(&g, GrantField::RefreshToken);
    assert_ne!(rt1, rt0);
    assert_eq!(g.state.status, TokenStatus::Active);
    assert!(g.resource_tokens.contains_key("graph"), "{g:?}");

    // Cached per resource: no provider call for either, and each keeps its own token.
    let again = env
        .service
        .access_token_for(TENANT, "scan", TokenResource::MicrosoftGraph, want)
        .await
        .unwrap();
    assert_eq!(again.access_token.expose(), graph.access_token.expose());
    let mail_again = env
        .service
        .access_token(TENANT, "scan", want)
        .await
        .unwrap();
    assert_eq!(mail_again.access_token.expose(), mail.access_token.expose());
    assert_eq!(env.refreshes().len(), 1);

    // Issuance picks the resource from the device's send method.
    add_device(&env, "mfp-smtp", SenderMode::FixedAdmin, &["scan"]).await;
    add_device(&env, "mfp-graph", SenderMode::FixedAdmin, &["scan"]).await;
    let stored = env
        .records()
        .get::<Device>(&tokenfleet_broker::records::device_key(TENANT, "mfp-graph"))
        .await
        .unwrap()
        .unwrap();
    let mut d = stored.value;
    d.smtp.method = tokenfleet_domain::SendMethod::Graph;
    env.records()
        .put(&d, Precondition::Version(stored.version))
        .await
        .unwrap();
    let via_graph = issue(
        &env.service,
        "agent:t",
        TENANT,
        "mfp-graph",
        "scan",
        MailPurpose::Send,
    )
    .await
    .unwrap();
    assert_eq!(via_graph.access_token.expose(), graph.access_token.expose());
    let via_smtp = issue(
        &env.service,
        "agent:t",
        TENANT,
        "mfp-smtp",
        "scan",
        MailPurpose::Send,
    )
    .await
    .unwrap();
    assert_eq!(via_smtp.access_token.expose(), mail.access_token.expose());
    // Fetching with a Graph device still uses the mail protocols.
    let pop = issue(
        &env.service,
        "agent:t",
        TENANT,
        "mfp-graph",
        "scan",
        MailPurpose::Pop,
    )
    .await
    .unwrap();
    assert_eq!(pop.access_token.expose(), mail.access_token.expose());

    // App-only: client credentials for Graph's `.default`.
    env.add_mailbox("relay", GrantType::AppOnly).await;
    let mut g = GrantRecord::empty(TENANT, "relay");
    g.state.status = TokenStatus::Active;
    env.records().put(&g, Precondition::Absent).await.unwrap();
    let app = env
        .service
        .access_token_for(TENANT, "relay", TokenResource::MicrosoftGraph, want)
        .await
        .unwrap();
    assert_eq!(
        env.fake
            .token_audience(app.access_token.expose())
            .as_deref(),
        Some("https://graph.microsoft.com")
    );
    let scope = env
        .fake
        .requests_to(Endpoint::MicrosoftToken)
        .last()
        .and_then(|r| r.param("scope").map(str::to_owned))
        .unwrap();
    assert_eq!(scope, "https://graph.microsoft.com/.default");

    env.fake.assert_no_violations().unwrap();
}

// ----------------------------------------------------------------------------------------------
// Token deletion
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn deleting_a_google_token_revokes_it_and_wipes_everything() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Google,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let rt = env.consented_mailbox("scan").await;
    assert_eq!(env.kind, ProviderKind::Google);
    let outcome = env.service.delete_token(TENANT, "scan").await.unwrap();
    assert_eq!(outcome, Revocation::Revoked);
    let revokes = env.fake.requests_to(Endpoint::GoogleRevoke);
    assert_eq!(revokes.len(), 1);
    assert_eq!(revokes[0].param("token"), Some(rt.as_str()));
    assert!(
        env.fake
            .live_refresh_tokens(&Env::address("scan"))
            .is_empty()
    );

    let g = env.grant("scan").await;
    assert_eq!(g.state.status, TokenStatus::NotRetrieved);
    assert!(g.refresh_token.is_none() && g.access_token.is_none() && g.pending.is_none());
    assert!(g.state.last_error.is_none());
    assert_eq!(env.scheduled_time("scan").await, None);
    assert!(matches!(
        env.service
            .access_token(TENANT, "scan", Duration::from_secs(1))
            .await,
        Err(TokenError::NotRetrieved { .. })
    ));

    // A failing revocation is reported, and the tokens are wiped anyway.
    env.consented_mailbox("fax").await;
    env.fake
        .script(Endpoint::GoogleRevoke, ScriptedResponse::status(503));
    let outcome = env.service.delete_token(TENANT, "fax").await.unwrap();
    assert!(
        matches!(&outcome, Revocation::Failed { code, .. } if code == "http_503"),
        "{outcome:?}"
    );
    let g = env.grant("fax").await;
    assert!(g.refresh_token.is_none() && g.access_token.is_none());
    assert_eq!(g.state.status, TokenStatus::NotRetrieved);
    let e = g.state.last_error.unwrap();
    assert!(
        e.reason.contains("wiped") && e.reason.contains("revoking"),
        "{}",
        e.reason
    );
}

#[tokio::test]
async fn deleting_a_microsoft_token_wipes_it_without_revocation() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    env.consented_mailbox("scan").await;
    let outcome = env.service.delete_token(TENANT, "scan").await.unwrap();
    let Revocation::Unsupported { fix } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(fix.contains("Revoke sessions"), "{fix}");
    assert!(env.fake.requests_to(Endpoint::GoogleRevoke).is_empty());
    let g = env.grant("scan").await;
    assert!(g.refresh_token.is_none() && g.access_token.is_none());
    assert_eq!(g.state.status, TokenStatus::NotRetrieved);
    assert_eq!(
        env.service.delete_token(TENANT, "scan").await.unwrap(),
        Revocation::NothingStored
    );
    env.fake.assert_no_violations().unwrap();
}

// ----------------------------------------------------------------------------------------------
// Admin RPCs
// ----------------------------------------------------------------------------------------------

async fn admin_client(env: &Env, role: Role) -> (Admin, tokio::sync::oneshot::Sender<()>) {
    let service = AdminServer::new(
        AdminService::new(env.state.clone()).with_token_service(env.service.clone()),
    );
    let (addr, tx, _) = serve_plaintext(tonic::service::Routes::new(service)).await;
    let tenant = (role != Role::FleetAdmin).then_some(TENANT);
    let (_, key) = api_keys::create(&env.state, role, tenant, "test")
        .await
        .unwrap();
    tokenfleet_testkit::logs::secret(key.expose());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    (
        crate::support::admin_client(channel, Some(key.expose())),
        tx,
    )
}

#[tokio::test]
async fn admin_rpcs_show_refresh_and_delete_tokens() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    env.consented_mailbox("scan").await;
    env.add_mailbox("fresh", GrantType::DelegatedDeviceCode)
        .await;
    let (mut admin, _stop) = admin_client(&env, Role::TenantAdmin).await;

    let m = admin
        .get_mailbox(pb::GetMailboxRequest {
            tenant: TENANT.into(),
            name: "scan".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let token = m.token.unwrap();
    assert_eq!(token.status, pb::TokenStatus::Active as i32);
    assert!(token.access_token_expire_time.is_some() && token.next_refresh_time.is_some());
    assert!(token.last_refresh_time.is_some());

    // RefreshNow: a provider failure comes back as the mailbox's state, not as an error.
    env.fake.set_outage(true);
    let m = admin
        .refresh_now(pb::RefreshNowRequest {
            tenant: TENANT.into(),
            mailbox: "scan".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let token = m.token.unwrap();
    assert_eq!(token.status, pb::TokenStatus::RefreshFailing as i32);
    assert_eq!(token.consecutive_failures, 1);
    let e = token.last_error.unwrap();
    assert_eq!(e.code, "http_503");
    assert!(!e.fix.is_empty());
    env.fake.set_outage(false);
    let m = admin
        .refresh_now(pb::RefreshNowRequest {
            tenant: TENANT.into(),
            mailbox: "scan".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.token.unwrap().status, pb::TokenStatus::Active as i32);

    // ListMailboxes shows each mailbox's grant state.
    let list = admin
        .list_mailboxes(pb::ListMailboxesRequest {
            tenant: TENANT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let statuses: Vec<(String, i32)> = list
        .mailboxs
        .iter()
        .map(|m| (m.name.clone(), m.token.as_ref().unwrap().status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("fresh".to_owned(), pb::TokenStatus::NotRetrieved as i32),
            ("scan".to_owned(), pb::TokenStatus::Active as i32)
        ]
    );

    // RefreshNow on a mailbox without a grant says what to do.
    let err = admin
        .refresh_now(pb::RefreshNowRequest {
            tenant: TENANT.into(),
            mailbox: "fresh".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("tokenfleetctl mailbox consent fresh"),
        "{}",
        err.message()
    );

    // DeleteToken.
    let m = admin
        .delete_token(pb::DeleteTokenRequest {
            tenant: TENANT.into(),
            mailbox: "scan".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        m.token.unwrap().status,
        pb::TokenStatus::NotRetrieved as i32
    );
    assert!(env.grant("scan").await.refresh_token.is_none());

    // Viewers may look but not refresh or delete; other tenants are not reachable.
    let (mut viewer, _stop2) = admin_client(&env, Role::Viewer).await;
    let err = viewer
        .refresh_now(pb::RefreshNowRequest {
            tenant: TENANT.into(),
            mailbox: "scan".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = admin
        .delete_token(pb::DeleteTokenRequest {
            tenant: "other".into(),
            mailbox: "scan".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = admin
        .delete_token(pb::DeleteTokenRequest {
            tenant: TENANT.into(),
            mailbox: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Every token RPC is audited.
    // (All audit streams: changes, refusals and issuances.)
    let events: Vec<tokenfleet_domain::AuditEvent> =
        tokenfleet_broker::audit::list(&env.state, &Scope::Tenant(TENANT.into()), None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
    let actions: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.action.as_str(), e.result.as_str()))
        .collect();
    assert!(
        actions.contains(&("mailbox.delete_token", "ok")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("mailbox.refresh_now", "ok")),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("mailbox.refresh_now", "failed_precondition")),
        "{actions:?}"
    );
    let deleted = events
        .iter()
        .find(|e| e.action == "mailbox.delete_token" && e.result == "ok")
        .unwrap();
    assert!(
        deleted.detail.contains("no revocation endpoint"),
        "{}",
        deleted.detail
    );
}

// ----------------------------------------------------------------------------------------------
// On-demand requests during backoff; writes racing with consents
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn on_demand_requests_honour_the_backoff() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    env.consented_mailbox("scan").await;
    env.fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::status(429).retry_after(600),
    );
    // 50 minutes in: refresh attempt meets 429; the still-valid token is handed out.
    clock.advance(Duration::from_secs(56 * 60));
    let t = env
        .service
        .access_token(TENANT, "scan", Duration::from_secs(300))
        .await
        .unwrap();
    assert!(t.expires > clock.now());
    assert_eq!(env.refreshes().len(), 1);
    let g = env.grant("scan").await;
    assert_eq!(g.state.status, TokenStatus::RefreshFailing);
    assert_eq!(g.state.last_error.as_ref().unwrap().code, "http_429");
    assert!(g.next_refresh.unwrap() - clock.now() >= time::Duration::seconds(600));

    // Later requests during the backoff do not call the provider: the old token while it
    // lasts, then the recorded error.
    for _ in 0..5 {
        env.service
            .access_token(TENANT, "scan", Duration::from_secs(300))
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs(5 * 60));
    let err = env
        .service
        .access_token(TENANT, "scan", Duration::from_secs(300))
        .await
        .unwrap_err();
    let TokenError::RefreshFailing { retry_at, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*retry_at, g.next_refresh);
    assert_eq!(
        env.refreshes().len(),
        1,
        "no provider call while backing off"
    );

    // After the backoff, the next request refreshes.
    clock.set(g.next_refresh.unwrap() + Duration::from_secs(1));
    env.service
        .access_token(TENANT, "scan", Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(env.refreshes().len(), 2);
    assert_eq!(env.grant("scan").await.state.status, TokenStatus::Active);
}

/// Starts a refresh whose provider answer is held back, and returns once the fake has it.
async fn slow_refresh(
    env: &Env,
    rotated: &str,
) -> tokio::task::JoinHandle<Result<tokenfleet_broker::tokens::lifecycle::IssuedToken, TokenError>>
{
    env.fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::json(
            200,
            serde_json::json!({
                "token_type": "Bearer",
                "access_token": "at-from-the-slow-refresh",
                "refresh_token": rotated,
                "expires_in": 3599,
            }),
        )
        .delay(Duration::from_millis(300)),
    );
    let before = env.refreshes().len();
    let service = env.service.clone();
    let task = tokio::spawn(async move { service.refresh_now(TENANT, "scan").await });
    eventually(
        "the refresh at the provider",
        Duration::from_secs(5),
        async || (env.refreshes().len() > before).then_some(()),
    )
    .await;
    task
}

#[tokio::test]
async fn a_refresh_racing_a_consent_keeps_the_rotated_token_or_yields_to_a_new_grant() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    env.consented_mailbox("scan").await;

    // A re-consent starts while the refresh is at the provider: the rotated refresh token is
    // still stored, and the record stays CONSENT_PENDING.
    let refresh = slow_refresh(&env, "rt-rotated-during-consent").await;
    let stored = env
        .records()
        .get::<GrantRecord>(&grant_key(TENANT, "scan"))
        .await
        .unwrap()
        .unwrap();
    let mut g = stored.value.clone();
    g.state.status = TokenStatus::ConsentPending;
    env.records()
        .put(&g, Precondition::Version(stored.version))
        .await
        .unwrap();
    let token = refresh.await.unwrap().unwrap();
    assert_eq!(token.access_token.expose(), "at-from-the-slow-refresh");
    let g = env.grant("scan").await;
    assert_eq!(
        env.open(&g, GrantField::RefreshToken),
        "rt-rotated-during-consent"
    );
    assert_eq!(g.state.status, TokenStatus::ConsentPending);
    // While the consent is pending, the valid token of the earlier grant is still handed out.
    let t = env
        .service
        .access_token(TENANT, "scan", Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(t.access_token.expose(), "at-from-the-slow-refresh");

    // The consent completes (new credentials) while another refresh is at the provider: the
    // new grant wins and the refresh's outcome is dropped.
    let mut g = env.grant("scan").await;
    g.state.status = TokenStatus::Active;
    let v = env
        .records()
        .get::<GrantRecord>(&grant_key(TENANT, "scan"))
        .await
        .unwrap()
        .unwrap()
        .version;
    env.records()
        .put(&g, Precondition::Version(v))
        .await
        .unwrap();
    let refresh = slow_refresh(&env, "rt-stale").await;
    let stored = env
        .records()
        .get::<GrantRecord>(&grant_key(TENANT, "scan"))
        .await
        .unwrap()
        .unwrap();
    let mut g = stored.value.clone();
    g.refresh_token = Some(env.seal(
        "scan",
        GrantField::RefreshToken,
        &Secret::new("rt-from-the-new-consent"),
    ));
    env.records()
        .put(&g, Precondition::Version(stored.version))
        .await
        .unwrap();
    let err = refresh.await.unwrap().unwrap_err();
    assert!(matches!(err, TokenError::Changed { .. }), "{err:?}");
    let g = env.grant("scan").await;
    assert_eq!(
        env.open(&g, GrantField::RefreshToken),
        "rt-from-the-new-consent"
    );
}

/// The refresh lease is short but renewed while its holder works: a provider call lasting
/// several lease TTLs keeps the lease, so another replica neither calls the provider nor takes
/// over; that replica's callers get UNAVAILABLE with retry advice after the bounded wait instead
/// of hanging; and once the holder is done the mailbox is free again at once.
#[tokio::test]
async fn a_slow_refresh_renews_its_short_lease_and_waiters_get_unavailable_in_bounded_time() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    env.consented_mailbox("scan").await;
    let short = |replica: &str| tokenfleet_broker::tokens::lifecycle::TokenConfig {
        replica_id: replica.into(),
        // A provider call may outlast the lease by far.
        provider_timeout: Duration::from_secs(20),
        lease_ttl: Duration::from_secs(2),
        lease_wait: Duration::from_secs(1),
        ..token_config()
    };
    let holder = TokenService::new(env.state.clone(), short("holder"));
    let other = TokenService::new(env.state.clone(), short("other"));
    env.fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::json(
            200,
            serde_json::json!({
                "token_type": "Bearer",
                "access_token": "at-from-the-slow-refresh",
                "refresh_token": "rt-from-the-slow-refresh",
                "expires_in": 3599,
            }),
        )
        // Three lease TTLs.
        .delay(Duration::from_secs(6)),
    );
    let started = tokio::time::Instant::now();
    let slow = tokio::spawn(async move { holder.refresh_now(TENANT, "scan").await });
    eventually(
        "the refresh at the provider",
        Duration::from_secs(5),
        async || (env.refreshes().len() == 1).then_some(()),
    )
    .await;
    // Past the first TTL (the lease lives on renewals only), the other replica still finds it
    // held: each of its calls answers UNAVAILABLE after about the 1 s wait.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while started.elapsed() < Duration::from_millis(5000) {
        let asked = tokio::time::Instant::now();
        let err = other.refresh_now(TENANT, "scan").await.unwrap_err();
        let waited = asked.elapsed();
        assert!(matches!(err, TokenError::Busy { .. }), "{err:?}");
        let status = err.to_status();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("retry in a few seconds"),
            "{status:?}"
        );
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
            "bounded wait took {waited:?}"
        );
    }
    assert_eq!(env.refreshes().len(), 1, "nobody else called the provider");
    let token = slow.await.unwrap().unwrap();
    assert_eq!(token.access_token.expose(), "at-from-the-slow-refresh");
    let g = env.grant("scan").await;
    assert_eq!(
        env.open(&g, GrantField::RefreshToken),
        "rt-from-the-slow-refresh",
        "the slow holder's rotated refresh token is stored: its lease never lapsed"
    );
    // Released on completion: the other replica refreshes at once.
    env.fake.script(
        Endpoint::MicrosoftToken,
        ScriptedResponse::json(
            200,
            serde_json::json!({
                "token_type": "Bearer",
                "access_token": "at-from-the-other-replica",
                "refresh_token": "rt-from-the-other-replica",
                "expires_in": 3599,
            }),
        ),
    );
    let asked = tokio::time::Instant::now();
    other.refresh_now(TENANT, "scan").await.unwrap();
    assert!(asked.elapsed() < Duration::from_secs(1));
    assert_eq!(env.refreshes().len(), 2);
    assert!(env.grant("scan").await.fence > g.fence);
}

// ----------------------------------------------------------------------------------------------
// Key rotation
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn reseal_moves_grant_secrets_to_the_new_key() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let rt = env.consented_mailbox("scan").await;
    let at = env.open(&env.grant("scan").await, GrantField::AccessToken);

    let k2 = Keyring::generate_key_base64().unwrap();
    let rotated = BrokerState {
        keyring: Arc::new(
            Keyring::from_base64("k2", [("k1", env.key.as_str()), ("k2", k2.as_str())]).unwrap(),
        ),
        ..env.state.clone()
    };
    let report = tokenfleet_broker::reseal::reseal_all(&rotated)
        .await
        .unwrap();
    // The provider's client secret, the grant's refresh and access token.
    assert_eq!((report.examined, report.resealed), (3, 3));
    let again = tokenfleet_broker::reseal::reseal_all(&rotated)
        .await
        .unwrap();
    assert_eq!((again.examined, again.resealed), (3, 0));

    // Only the new key is needed now, and the lifecycle still refreshes with it.
    let only_k2 = BrokerState {
        keyring: Arc::new(Keyring::from_base64("k2", [("k2", k2.as_str())]).unwrap()),
        ..env.state.clone()
    };
    let g = env.grant("scan").await;
    let open = |field, sealed: &tokenfleet_seal::Sealed| {
        open_field(&only_k2.keyring, TENANT, "scan", field, sealed)
            .unwrap()
            .expose()
            .to_owned()
    };
    assert_eq!(
        open(GrantField::RefreshToken, g.refresh_token.as_ref().unwrap()),
        rt
    );
    assert_eq!(
        open(GrantField::AccessToken, g.access_token.as_ref().unwrap()),
        at
    );
    let service = TokenService::new(only_k2, token_config());
    service.refresh_now(TENANT, "scan").await.unwrap();
    assert_eq!(env.refreshes(), vec![rt]);
}
