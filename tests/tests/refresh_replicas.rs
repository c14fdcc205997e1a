//! One refresh per mailbox across broker replicas: three token services (three replicas, each
//! with its own store connection) on one real `redis-server`, and the fake identity provider
//! over HTTP. 1,000 concurrent requests for 50 mailboxes whose access tokens just expired must
//! cause exactly 50 refreshes, and every caller must get a valid token.

// Test helpers panic on setup failures: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokenfleet_broker::records::Records;
use tokenfleet_broker::state::BrokerState;
use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, grant_key, seal_field};
use tokenfleet_broker::tokens::issue::issue;
use tokenfleet_broker::tokens::lifecycle::{TokenConfig, TokenService};
use tokenfleet_domain::{
    Device, GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind, SenderMode,
    Stamps, SystemClock, Tenant, TokenState, TokenStatus,
};
use tokenfleet_providers::{ProviderClient, ProviderSettings};
use tokenfleet_seal::{Keyring, Secret};
use tokenfleet_store::redis_store::{RedisConfig, RedisStore};
use tokenfleet_store::{Precondition, Store};
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokenfleet_testkit::redis::RedisServer;

const TENANT: &str = "acme";
const PROVIDER: &str = "m365";
const CLIENT_ID: &str = "app-replicas";
const CLIENT_SECRET: &str = "client-secret-replicas";
const ENTRA_TENANT: &str = "contoso.example";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
const REPLICAS: usize = 3;
const MAILBOXES: usize = 50;
const CALLERS: usize = 1000;

fn mailbox_name(i: usize) -> String {
    format!("scan-{i:02}")
}

fn address(i: usize) -> String {
    format!("scan-{i:02}@contoso.example")
}

fn url_param(url: &str, name: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

/// Tenant, provider, 50 mailboxes each with a device that may use it, and a grant obtained
/// through the fake's authorization-code flow whose access token has just expired.
async fn seed(state: &BrokerState, fake: &FakeIdp) {
    let records = Records::new(state.store.as_ref());
    let now = OffsetDateTime::now_utc();
    records
        .put(
            &Tenant {
                name: TENANT.into(),
                display_name: "Acme".into(),
                stamps: Stamps::new(now),
            },
            Precondition::Absent,
        )
        .await
        .unwrap();
    let provider = Provider {
        tenant: TENANT.into(),
        name: PROVIDER.into(),
        kind: ProviderKind::Microsoft,
        authority: ENTRA_TENANT.into(),
        client_id: CLIENT_ID.into(),
        client_secret: Some(
            state
                .keyring
                .seal_secret(
                    &Provider::client_secret_aad(TENANT, PROVIDER),
                    &Secret::new(CLIENT_SECRET),
                )
                .unwrap(),
        ),
        endpoints: fake.microsoft_endpoints(ENTRA_TENANT),
        http_proxy: String::new(),
        http_proxy_password: None,
        extra_ca_pem: String::new(),
        scopes: vec![],
        service_account_key: None,
        stamps: Stamps::new(now),
    };
    records.put(&provider, Precondition::Absent).await.unwrap();
    let client = ProviderClient::new(
        ProviderSettings::from_provider(&provider, Some(Secret::new(CLIENT_SECRET))).unwrap(),
    )
    .unwrap();
    let purposes = [MailPurpose::Send, MailPurpose::Pop];
    let scopes = client
        .scopes_for(GrantType::DelegatedAuthCode, &purposes)
        .unwrap();
    for i in 0..MAILBOXES {
        let name = mailbox_name(i);
        records
            .put(
                &Mailbox {
                    tenant: TENANT.into(),
                    name: name.clone(),
                    address: address(i),
                    provider: PROVIDER.into(),
                    grant_type: GrantType::DelegatedAuthCode,
                    kind: MailboxKind::Bulk,
                    purposes: purposes.to_vec(),
                    disabled: false,
                    token: TokenState::default(),
                    stamps: Stamps::new(now),
                },
                Precondition::Absent,
            )
            .await
            .unwrap();
        records
            .put(
                &Device {
                    tenant: TENANT.into(),
                    name: format!("mfp-{i:02}"),
                    display_name: String::new(),
                    agent: String::new(),
                    sender_mode: SenderMode::Bulk,
                    admin_mailbox: String::new(),
                    bulk_mailbox: name.clone(),
                    allowed_mailboxes: Vec::new(),
                    smtp: Default::default(),
                    fetch: Default::default(),
                    ingress: Default::default(),
                    user_provider: String::new(),
                    stamps: Stamps::new(now),
                },
                Precondition::Absent,
            )
            .await
            .unwrap();

        fake.add_user(&address(i));
        let auth = client
            .authorization_url(&scopes, REDIRECT, "st", None)
            .unwrap();
        let redirect = fake.authorize_url(&auth.url, &address(i)).unwrap();
        let granted = client
            .exchange_code(
                &Secret::new(url_param(&redirect, "code")),
                &auth.pkce_verifier,
                REDIRECT,
            )
            .await
            .unwrap();
        let seal = |field, value: &Secret| {
            seal_field(&state.keyring, TENANT, &name, field, value).unwrap()
        };
        let mut g = GrantRecord::empty(TENANT, &name);
        g.state.status = TokenStatus::Active;
        // Obtained an hour ago; the access token expired a second ago.
        g.state.last_refresh = Some(now - Duration::from_secs(3600));
        g.state.access_token_expires = Some(now - Duration::from_secs(1));
        g.access_token = Some(seal(GrantField::AccessToken, &granted.access_token));
        g.refresh_token = Some(seal(
            GrantField::RefreshToken,
            granted.refresh_token.as_ref().unwrap(),
        ));
        g.scopes = scopes.clone();
        records.put(&g, Precondition::Absent).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_requests_on_three_replicas_refresh_each_mailbox_exactly_once() {
    let redis = RedisServer::start().await.unwrap();
    let fake = FakeIdp::start().await.unwrap();
    fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
    // Slow enough that the callers of one mailbox really overlap with its refresh.
    fake.set_latency(Duration::from_millis(40));

    let key = Keyring::generate_key_base64().unwrap();
    let mut states = Vec::new();
    for _ in 0..REPLICAS {
        // Each replica: its own connection, the same sealing key.
        let store: Arc<dyn Store> = Arc::new(
            RedisStore::connect(&RedisConfig::standalone(redis.url()))
                .await
                .unwrap(),
        );
        states.push(BrokerState {
            store,
            keyring: Arc::new(Keyring::from_base64("k1", [("k1", key.as_str())]).unwrap()),
            clock: Arc::new(SystemClock),
        });
    }
    seed(&states[0], &fake).await;
    assert_eq!(fake.token_requests("refresh_token"), 0);
    let services: Vec<TokenService> = states
        .iter()
        .enumerate()
        .map(|(i, state)| {
            TokenService::new(
                state.clone(),
                TokenConfig {
                    replica_id: format!("replica-{i}"),
                    provider_timeout: Duration::from_secs(10),
                    lease_ttl: Duration::from_secs(20),
                    ..TokenConfig::default()
                },
            )
        })
        .collect();

    let start = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..CALLERS {
        let service = services[i % REPLICAS].clone();
        let start = start.clone();
        let m = i % MAILBOXES;
        callers.spawn(async move {
            start.wait().await;
            let result = if i % 2 == 0 {
                issue(
                    &service,
                    "test:agent",
                    TENANT,
                    &format!("mfp-{m:02}"),
                    &mailbox_name(m),
                    MailPurpose::Send,
                )
                .await
            } else {
                service
                    .access_token(TENANT, &mailbox_name(m), Duration::from_secs(300))
                    .await
            };
            (m, result)
        });
    }
    let mut per_mailbox: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut ok = 0;
    while let Some(done) = callers.join_next().await {
        let (m, result) = done.unwrap();
        let token = result.unwrap_or_else(|e| panic!("caller for {} failed: {e}", mailbox_name(m)));
        assert_eq!(token.sasl_username, address(m));
        assert!(
            token.expires > OffsetDateTime::now_utc() + Duration::from_secs(50 * 60),
            "a fresh token"
        );
        per_mailbox
            .entry(m)
            .or_default()
            .insert(token.access_token.expose().to_owned());
        ok += 1;
    }
    assert_eq!(ok, CALLERS);

    assert_eq!(
        fake.token_requests("refresh_token"),
        MAILBOXES,
        "exactly one refresh per mailbox across all replicas"
    );
    assert_eq!(per_mailbox.len(), MAILBOXES);
    for (m, tokens) in &per_mailbox {
        assert_eq!(
            tokens.len(),
            1,
            "{}: every caller got the one refreshed token",
            mailbox_name(*m)
        );
        let token = tokens.iter().next().unwrap();
        assert!(fake.access_token_is_live(token), "{}", mailbox_name(*m));
    }
    // Each refresh used the refresh token from the consent, and the rotated one is stored.
    let records = Records::new(states[1].store.as_ref());
    for i in 0..MAILBOXES {
        let g = records
            .get::<GrantRecord>(&grant_key(TENANT, &mailbox_name(i)))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert_eq!(g.state.status, TokenStatus::Active);
        assert!(g.fence > 0);
        let stored = tokenfleet_broker::tokens::grant::open_field(
            &states[1].keyring,
            TENANT,
            &mailbox_name(i),
            GrantField::RefreshToken,
            g.refresh_token.as_ref().unwrap(),
        )
        .unwrap();
        assert_eq!(
            fake.live_refresh_tokens(&address(i))
                .last()
                .map(String::as_str),
            Some(stored.expose())
        );
    }
    fake.assert_no_violations().unwrap();
}
