//! One refresh per mailbox across broker replicas: three token services (three replicas, each
//! with its own store connection) on one real `redis-server`, and the fake identity provider
//! over HTTP. 1,000 concurrent requests for 50 mailboxes whose access tokens just expired must
//! cause exactly 50 refreshes, and every caller must get a valid token.
//!
//! A replica killed while it holds a mailbox's refresh lease (its provider call hanging) must not
//! block the mailbox for long: the survivor's `RefreshNow` and token issuance answer UNAVAILABLE
//! within a bounded wait while the lease is held, and the mailbox is refreshable through the
//! survivor within seconds of the death (the lease is short and only lives while renewed).

// Test helpers panic on setup failures: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokenfleet_broker::edge::grpc_status::ToStatus as _;

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
                    consent_account: String::new(),
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

/// A replica's state on its own Redis connection (made on the current runtime).
async fn replica_state(redis_url: &str, key: &str) -> BrokerState {
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&RedisConfig::standalone(redis_url.to_owned()))
            .await
            .unwrap(),
    );
    BrokerState {
        store,
        keyring: Arc::new(Keyring::from_base64("k1", [("k1", key)]).unwrap()),
        clock: Arc::new(SystemClock),
    }
}

/// What a client of the survivor sees: its own deadline on every call.
const CLIENT_DEADLINE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_while_refreshing_frees_the_mailbox_within_seconds() {
    let redis = RedisServer::start().await.unwrap();
    let fake = FakeIdp::start().await.unwrap();
    fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
    let key = Keyring::generate_key_base64().unwrap();
    let redis_url = redis.url().to_owned();

    // Replica B (the survivor) lives on the test's runtime; replica A on its own runtime, so
    // shutting that runtime down kills everything A does (its refresh, its lease renewals), as
    // a SIGKILL would. Both use the broker's default token settings.
    let b_state = replica_state(&redis_url, &key).await;
    seed(&b_state, &fake).await;
    let b = TokenService::new(
        b_state.clone(),
        TokenConfig {
            replica_id: "replica-b".into(),
            ..TokenConfig::default()
        },
    );
    let mailbox = mailbox_name(0);
    let a_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // A starts a forced refresh; the provider takes the request (and rotates the refresh token)
    // but its answer hangs, so A sits in the provider call holding the lease.
    fake.set_latency(Duration::from_secs(3600));
    let (url, k, m) = (redis_url.clone(), key.clone(), mailbox.clone());
    let a_refresh = a_runtime.spawn(async move {
        let a = TokenService::new(
            replica_state(&url, &k).await,
            TokenConfig {
                replica_id: "replica-a".into(),
                ..TokenConfig::default()
            },
        );
        a.refresh_now(TENANT, &m).await
    });
    let asked = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.token_requests("refresh_token") == 0 {
        assert!(
            tokio::time::Instant::now() < asked,
            "replica A never called the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // While A (alive) holds the lease: RefreshNow and agent issuance on B answer UNAVAILABLE
    // with retry advice within a bounded wait, well before the client's deadline.
    let held_since = std::time::Instant::now();
    let (forced, issued) = tokio::join!(
        tokio::time::timeout(CLIENT_DEADLINE, b.refresh_now(TENANT, &mailbox)),
        tokio::time::timeout(
            CLIENT_DEADLINE,
            issue(
                &b,
                "test:agent",
                TENANT,
                "mfp-00",
                &mailbox,
                MailPurpose::Send
            )
        ),
    );
    let waited = held_since.elapsed();
    for (what, answer) in [("RefreshNow", forced), ("issuance", issued)] {
        let answer = answer.unwrap_or_else(|_| {
            panic!(
                "{what} on replica B hung past the client's {CLIENT_DEADLINE:?} deadline while replica A held the lease"
            )
        });
        let error = answer.expect_err("A still holds the lease");
        let status = error.to_status();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{what}: {error}");
        assert!(
            status.message().contains("retry"),
            "{what}: retry advice in {:?}",
            status.message()
        );
    }
    println!("while replica A held the lease, replica B answered UNAVAILABLE after {waited:?}");
    assert_eq!(
        fake.token_requests("refresh_token"),
        1,
        "B never calls the provider while A holds the lease"
    );

    // Kill A mid-refresh; the provider answers promptly again.
    a_runtime.shutdown_background();
    let killed = std::time::Instant::now();
    fake.set_latency(Duration::ZERO);
    assert!(a_refresh.await.is_err(), "A's refresh died with it");

    // B's RefreshNow: every answer within the client's deadline (UNAVAILABLE while the dead
    // replica's lease lingers), success within seconds of the death.
    let refreshed = loop {
        let called = std::time::Instant::now();
        let answer = tokio::time::timeout(CLIENT_DEADLINE, b.refresh_now(TENANT, &mailbox))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "RefreshNow on replica B hung past the client's {CLIENT_DEADLINE:?} deadline ({:?} after A died)",
                    killed.elapsed()
                )
            });
        match answer {
            Ok(token) => break token,
            Err(error) => {
                assert_eq!(
                    error.to_status().code(),
                    tonic::Code::Unavailable,
                    "{error}"
                );
                println!(
                    "RefreshNow on B: UNAVAILABLE after {:?} ({:?} after A died)",
                    called.elapsed(),
                    killed.elapsed()
                );
                assert!(
                    killed.elapsed() < Duration::from_secs(30),
                    "the dead replica's lease still blocks the mailbox {:?} after its death",
                    killed.elapsed()
                );
            }
        }
    };
    let recovered = killed.elapsed();
    println!("mailbox refreshed through replica B {recovered:?} after replica A died");
    assert!(
        recovered < Duration::from_secs(8),
        "refreshable through the survivor {recovered:?} after the holder died (want a few seconds)"
    );
    assert_eq!(refreshed.sasl_username, address(0));
    assert!(fake.access_token_is_live(refreshed.access_token.expose()));
    assert_eq!(fake.token_requests("refresh_token"), 2);

    // The survivor's result is stored under a newer fence than the dead holder's lease, with a
    // refresh token the provider still honours; issuance through B works again.
    let records = Records::new(b_state.store.as_ref());
    let g = records
        .get::<GrantRecord>(&grant_key(TENANT, &mailbox))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(g.state.status, TokenStatus::Active);
    assert!(g.fence >= 2, "fence {} after a second tenure", g.fence);
    let stored = tokenfleet_broker::tokens::grant::open_field(
        &b_state.keyring,
        TENANT,
        &mailbox,
        GrantField::RefreshToken,
        g.refresh_token.as_ref().unwrap(),
    )
    .unwrap();
    assert!(
        fake.live_refresh_tokens(&address(0))
            .iter()
            .any(|t| t == stored.expose())
    );
    let token = issue(
        &b,
        "test:agent",
        TENANT,
        "mfp-00",
        &mailbox,
        MailPurpose::Send,
    )
    .await
    .unwrap();
    assert_eq!(token.access_token.expose(), refreshed.access_token.expose());
    fake.assert_no_violations().unwrap();
}
