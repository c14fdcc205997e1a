//! Recovery from identity-provider trouble, against the fake identity provider over HTTP: the
//! per-provider breaker (during an outage the provider sees one probe per interval; when a probe
//! gets an answer every held grant is refreshed within seconds, spread out; a long `Retry-After`
//! holds the probes back), and rotated refresh tokens (persisted before any caller gets the new
//! access token; a refresh token refused because another writer already rotated it is retried
//! once with the stored one, against a fake with single-use refresh tokens and RFC 9700 reuse
//! detection).

// Test helpers panic on setup failures: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenfleet_broker::edge::grpc_status::ToStatus as _;

use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, grant_key};
use tokenfleet_broker::tokens::lifecycle::TokenError;
use tokenfleet_broker::tokens::scheduler::RefreshScheduler;
use tokenfleet_domain::{Clock, GrantType, MailPurpose, ProviderKind, TokenStatus};
use tokenfleet_seal::Secret;
use tokenfleet_store::Precondition;
use tokenfleet_testkit::fake_idp::{ClientSpec, RefreshRotation};

use crate::support::{Backend, ManualClock, eventually};
use crate::token_lifecycle::{CLIENT_ID, CLIENT_SECRET, Env, TENANT};

/// Most refreshes the test configuration runs at once (`support::token_config`): the calls
/// already in flight when a breaker opens.
const CONCURRENCY: usize = 8;

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("scan{i:02}")).collect()
}

async fn statuses(env: &Env, names: &[String]) -> Vec<TokenStatus> {
    let mut all = Vec::new();
    for n in names {
        all.push(env.grant(n).await.state.status);
    }
    all
}

/// Lets the scheduler (a 20 ms tick) look several times at the current (manual) time.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn an_outage_costs_one_probe_per_interval_and_recovery_refreshes_every_grant_within_seconds()
{
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    let grants = names(12);
    for n in &grants {
        env.consented_mailbox(n).await;
    }
    let start = clock.now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = RefreshScheduler::spawn(env.service.clone(), async {
        let _ = stopped.await;
    });

    // The provider goes down; every grant comes due (refreshes at 75 % of the hour).
    env.fake.set_outage(true);
    clock.set(start + Duration::from_secs(46 * 60));
    eventually(
        "every grant REFRESH_FAILING",
        Duration::from_secs(10),
        async || {
            statuses(&env, &grants)
                .await
                .iter()
                .all(|s| *s == TokenStatus::RefreshFailing)
                .then_some(())
        },
    )
    .await;
    settle().await;
    let opening = env.refreshes().len();
    assert!(
        (2..=CONCURRENCY).contains(&opening),
        "the breaker opens after two failures; only calls already in flight get through: {opening}"
    );
    // Held grants say why, and that they will be refreshed once the provider answers.
    let held = env.grant(&grants[11]).await;
    let e = held.state.last_error.as_ref().unwrap();
    assert_eq!(e.code, "http_503");
    assert!(
        e.reason.contains("paused") || e.reason.contains("unavailable"),
        "{}",
        e.reason
    );

    // Open: one probe per 5 s interval, whatever the schedule does meanwhile.
    let mut calls = opening;
    for step in 0..6 {
        clock.advance(Duration::from_secs(2));
        settle().await;
        assert_eq!(
            env.refreshes().len(),
            calls,
            "step {step}: no probe before the interval"
        );
        clock.advance(Duration::from_secs(3));
        eventually("the probe", Duration::from_secs(5), async || {
            (env.refreshes().len() > calls).then_some(())
        })
        .await;
        settle().await;
        assert_eq!(
            env.refreshes().len(),
            calls + 1,
            "step {step}: exactly one probe"
        );
        calls += 1;
    }

    // Tokens run out; devices ask for every mailbox: still one probe per interval, and each
    // device gets REFRESH_FAILING (UNAVAILABLE) at once instead of a call of its own.
    clock.set(start + Duration::from_secs(61 * 60));
    eventually("the probe", Duration::from_secs(5), async || {
        (env.refreshes().len() > calls).then_some(())
    })
    .await;
    settle().await;
    calls += 1;
    for n in &grants {
        let err = env
            .service
            .access_token(TENANT, n, Duration::from_secs(300))
            .await
            .unwrap_err();
        assert!(matches!(err, TokenError::RefreshFailing { .. }), "{err:?}");
    }
    settle().await;
    assert_eq!(
        env.refreshes().len(),
        calls,
        "devices do not reach the provider while its breaker is open"
    );
    let outage_calls = calls;

    // The provider is back. The next probe gets a token; every held grant is refreshed at
    // once, spread over the release window, without waiting for its backoff.
    env.fake.set_outage(false);
    clock.advance(Duration::from_secs(5));
    let recovered = Instant::now();
    eventually(
        "every grant ACTIVE after the recovery",
        Duration::from_secs(10),
        async || {
            statuses(&env, &grants)
                .await
                .iter()
                .all(|s| *s == TokenStatus::Active)
                .then_some(())
        },
    )
    .await;
    let took = recovered.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    settle().await;
    let recovery: Vec<_> = env
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token") && r.status == 200)
        .collect();
    assert_eq!(recovery.len(), grants.len(), "one refresh per grant");
    assert_eq!(env.refreshes().len(), outage_calls + grants.len());
    // Spread, not a thundering herd: the released refreshes arrive over more than a second.
    let first = recovery.iter().map(|r| r.time).min().unwrap();
    let last = recovery.iter().map(|r| r.time).max().unwrap();
    assert!(
        last - first > time::Duration::milliseconds(1000),
        "released over {}",
        last - first
    );
    for n in &grants {
        let g = env.grant(n).await;
        assert!(g.state.last_error.is_none());
        assert_eq!(g.consecutive_failures, 0);
        assert!(g.state.access_token_expires.unwrap() > clock.now());
    }
    println!(
        "breaker: {} grants, {} provider calls during the outage ({:.2} per grant), all ACTIVE {:?} after the first successful probe",
        grants.len(),
        outage_calls,
        outage_calls as f64 / grants.len() as f64,
        took
    );
    let _ = stop.send(());
    scheduler.await.unwrap();
    env.fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn the_breaker_honours_a_long_retry_after() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    let grants = names(4);
    for n in &grants {
        env.consented_mailbox(n).await;
    }
    let start = clock.now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = RefreshScheduler::spawn(env.service.clone(), async {
        let _ = stopped.await;
    });
    env.fake.set_outage(true);
    env.fake.set_outage_retry_after(Some(1200));
    clock.set(start + Duration::from_secs(46 * 60));
    let opened = clock.now();
    eventually(
        "every grant REFRESH_FAILING",
        Duration::from_secs(10),
        async || {
            statuses(&env, &grants)
                .await
                .iter()
                .all(|s| *s == TokenStatus::RefreshFailing)
                .then_some(())
        },
    )
    .await;
    settle().await;
    let calls = env.refreshes().len();
    // Nobody calls before Retry-After (20 minutes): not the probe, not the schedule, not a
    // device whose token has run out (the tokens expire 14 minutes in).
    for at in [5u64, 60, 600, 900, 1199] {
        clock.set(opened + Duration::from_secs(at));
        for n in &grants {
            let _ = env
                .service
                .access_token(TENANT, n, Duration::from_secs(300))
                .await;
        }
        settle().await;
        assert_eq!(
            env.refreshes().len(),
            calls,
            "{at} s into Retry-After: 1200"
        );
    }
    // At 1200 s the probe goes (and, still failing, defers the next by Retry-After again).
    clock.set(opened + Duration::from_secs(1200));
    eventually("the probe", Duration::from_secs(5), async || {
        (env.refreshes().len() > calls).then_some(())
    })
    .await;
    settle().await;
    assert_eq!(env.refreshes().len(), calls + 1);
    clock.set(opened + Duration::from_secs(1210));
    settle().await;
    assert_eq!(env.refreshes().len(), calls + 1, "Retry-After again");
    let _ = stop.send(());
    scheduler.await.unwrap();
}

/// A device whose token has run out while the breaker is open becomes the probe when one is due;
/// a second device arriving while that probe is at the provider waits for its outcome (bounded)
/// instead of failing or calling, and gets a token once the probe closes the breaker.
#[tokio::test]
async fn devices_become_or_wait_for_the_probe() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Embedded, ProviderKind::Microsoft, clock.clone()).await;
    let grants = names(2);
    for n in &grants {
        env.consented_mailbox(n).await;
    }
    // Two failures open the breaker (an operator's RefreshNow counts like any call).
    env.fake.set_outage(true);
    for n in &grants {
        let err = env.service.refresh_now(TENANT, n).await.unwrap_err();
        assert!(matches!(err, TokenError::RefreshFailing { .. }), "{err:?}");
    }
    assert!(env.service.breakers().status().iter().any(|b| b.open));
    // An hour later the tokens have run out; the provider is back.
    clock.advance(Duration::from_secs(61 * 60));
    env.fake.set_outage(false);
    env.fake.hold_next_token_requests(1);
    let service = env.service.clone();
    let (a, b) = (grants[0].clone(), grants[1].clone());
    let probe = tokio::spawn(async move {
        service
            .access_token(TENANT, &a, Duration::from_secs(300))
            .await
    });
    eventually(
        "the probe at the provider",
        Duration::from_secs(5),
        async || (env.fake.held_requests() == 1).then_some(()),
    )
    .await;
    let service = env.service.clone();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let r = service
            .access_token(TENANT, &b, Duration::from_secs(300))
            .await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the second device waits for the probe"
    );
    assert_eq!(env.refreshes().len(), 2, "and does not call meanwhile");
    env.fake.release_held();
    probe
        .await
        .unwrap()
        .expect("the probe's device gets a token");
    let (r, waited) = waiter.await.unwrap();
    r.expect("the waiting device gets a token once the breaker closes");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // One call each: the probe, then the waiting device's refresh (the release joined it).
    settle().await;
    assert_eq!(env.refreshes().len(), 4);
    assert!(env.service.breakers().status().iter().all(|b| !b.open));
    for n in &grants {
        assert_eq!(env.grant(n).await.state.status, TokenStatus::Active);
    }
}

// ----------------------------------------------------------------------------------------------
// Rotated refresh tokens
// ----------------------------------------------------------------------------------------------

/// Registers the test app again with `rotation`.
fn rotate_with(env: &Env, rotation: RefreshRotation) {
    let mut client = ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET);
    client.consented_scopes = vec![tokenfleet_providers::MS_GRAPH_MAIL_SEND.to_owned()];
    client.refresh_rotation = rotation;
    env.fake.register_client(client);
}

#[tokio::test]
async fn no_caller_gets_an_access_token_whose_rotated_refresh_token_is_not_stored() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Redis, ProviderKind::Microsoft, clock.clone()).await;
    rotate_with(&env, RefreshRotation::SingleUseRevokeOnReuse);
    let rt0 = env.consented_mailbox("scan").await;
    let port = env.store.redis.as_ref().unwrap().port();

    // Rotation through the broker: every rotated token is stored before the next use, so
    // single-use tokens are never presented twice.
    for _ in 0..3 {
        env.service.refresh_now(TENANT, "scan").await.unwrap();
    }
    let stored = env.open(&env.grant("scan").await, GrantField::RefreshToken);
    assert_eq!(
        env.fake.live_refresh_tokens(&Env::address("scan")).last(),
        Some(&stored)
    );
    assert_ne!(stored, rt0);

    // Twenty devices need a fresh token; while the one refresh is at the provider, the store
    // starts refusing writes (as a master without its replicas does: NOREPLICAS). The provider
    // rotates, but the new refresh token cannot be persisted: no device gets the new access
    // token.
    clock.advance(Duration::from_secs(56 * 60));
    let before = env.refreshes().len();
    env.fake.hold_next_token_requests(1);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let service = env.service.clone();
        calls.spawn(async move {
            service
                .access_token(TENANT, "scan", Duration::from_secs(300))
                .await
        });
    }
    eventually(
        "the refresh at the provider",
        Duration::from_secs(5),
        async || (env.fake.held_requests() == 1).then_some(()),
    )
    .await;
    tokenfleet_testkit::redis::command(port, &["CONFIG", "SET", "min-replicas-to-write", "1"])
        .await
        .unwrap();
    env.fake.release_held();
    while let Some(r) = calls.join_next().await {
        let r = r.unwrap();
        let err = r.expect_err("no token without its refresh token stored");
        assert_eq!(err.to_status().code(), tonic::Code::Unavailable, "{err:?}");
    }
    assert_eq!(env.refreshes().len(), before + 1, "one refresh for all");
    tokenfleet_testkit::redis::command(port, &["CONFIG", "SET", "min-replicas-to-write", "0"])
        .await
        .unwrap();
    // The stored refresh token is the one before the lost rotation; the provider has spent
    // it. With reuse detection the grant is gone, and the broker says so instead of retrying
    // a token that cannot work.
    let g = env.grant("scan").await;
    assert_eq!(env.open(&g, GrantField::RefreshToken), stored);
    // (The failed refresh could not release its lease either; it lapses within the TTL.)
    let err = eventually(
        "the lease to lapse",
        Duration::from_secs(30),
        async || match env.service.refresh_now(TENANT, "scan").await {
            Err(TokenError::Busy { .. }) => None,
            other => Some(other),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TokenError::ReauthRequired { .. }), "{err:?}");
    assert_eq!(env.fake.refresh_token_reuses(), 1);
}

/// Starts a refresh through the broker whose request the fake holds, lets "another replica"
/// rotate the same refresh token at the provider and store the result, then lets the held
/// request go on. Returns the broker's outcome.
async fn refresh_overtaken_by_another_writer(
    env: &Env,
    rotation: RefreshRotation,
) -> Result<String, TokenError> {
    rotate_with(env, rotation);
    let rt0 = env.consented_mailbox("scan").await;
    env.fake.hold_next_token_requests(1);
    let service = env.service.clone();
    let refresh = tokio::spawn(async move { service.refresh_now(TENANT, "scan").await });
    eventually(
        "the broker's request at the provider",
        Duration::from_secs(5),
        async || (env.fake.held_requests() == 1).then_some(()),
    )
    .await;

    // The other writer redeems the same refresh token and stores the rotated one.
    let client = env.provider_client().await;
    let scopes = client
        .scopes_for(
            GrantType::DelegatedAuthCode,
            &[MailPurpose::Send, MailPurpose::Pop],
        )
        .unwrap();
    let other = client
        .refresh(&Secret::new(rt0.clone()), &scopes)
        .await
        .unwrap();
    let rt1 = other.refresh_token.unwrap();
    let stored = env
        .records()
        .get::<GrantRecord>(&grant_key(TENANT, "scan"))
        .await
        .unwrap()
        .unwrap();
    let mut g = stored.value.clone();
    g.refresh_token = Some(env.seal("scan", GrantField::RefreshToken, &rt1));
    env.records()
        .put(&g, Precondition::Version(stored.version))
        .await
        .unwrap();

    env.fake.release_held();
    let result = refresh.await.unwrap();
    // The broker presented the spent token once, then the stored one once.
    assert_eq!(
        env.refreshes(),
        vec![rt0.clone(), rt0, rt1.expose().to_owned()]
    );
    assert_eq!(env.fake.refresh_token_reuses(), 1);
    result.map(|t| t.access_token.expose().to_owned())
}

#[tokio::test]
async fn a_refresh_token_spent_by_another_writer_is_retried_once_with_the_stored_one() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let token = refresh_overtaken_by_another_writer(&env, RefreshRotation::SingleUse)
        .await
        .expect("recovered with the stored refresh token");
    let g = env.grant("scan").await;
    assert_eq!(g.state.status, TokenStatus::Active);
    assert_eq!(env.open(&g, GrantField::AccessToken), token);
    assert!(env.fake.access_token_is_live(&token));
    // The newest rotation is what is stored.
    assert_eq!(
        env.fake.live_refresh_tokens(&Env::address("scan")).last(),
        Some(&env.open(&g, GrantField::RefreshToken))
    );
    env.fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn a_provider_that_revokes_on_reuse_ends_in_reauth_after_one_retry() {
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    let err = refresh_overtaken_by_another_writer(&env, RefreshRotation::SingleUseRevokeOnReuse)
        .await
        .unwrap_err();
    let TokenError::ReauthRequired { error, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(error.code, "AADSTS50173", "the grant was revoked on reuse");
    assert_eq!(
        env.grant("scan").await.state.status,
        TokenStatus::ReauthRequired
    );
}

// ----------------------------------------------------------------------------------------------
// Measurement in real time with the default settings
// ----------------------------------------------------------------------------------------------

/// 50 grants with 30-second access tokens under the broker's default `[tokens]` settings (a
/// scheduler look every 2 s, 30 s provider timeout, breaker after 2 failures, a probe every 5 s,
/// releases spread over 3 s); the provider answers 503 for 30 s, then hangs for 30 s. Prints the
/// provider calls per grant during the outage and the time from the provider's recovery to every
/// grant ACTIVE. About 75 s of real time:
/// `cargo nextest run -p tokenfleet-broker --test integration token_recovery::measure --run-ignored all --no-capture`
#[tokio::test]
#[ignore = "real-time measurement (about 75 s); run by command, see the README"]
async fn measure_outage_recovery_with_default_settings() {
    measure_outage(true).await;
}

/// The same with 60 s of 503 and no hang: no probe is at the provider when it recovers, so the
/// recovery waits for the next probe (at most one probe interval).
#[tokio::test]
#[ignore = "real-time measurement (about 75 s); run by command, see the README"]
async fn measure_outage_recovery_503_only_with_default_settings() {
    measure_outage(false).await;
}

async fn measure_outage(hang: bool) {
    use tokenfleet_broker::tokens::lifecycle::{TokenConfig, TokenService};
    let env = Env::start(
        Backend::Embedded,
        ProviderKind::Microsoft,
        Arc::new(tokenfleet_domain::SystemClock),
    )
    .await;
    env.fake.set_access_token_lifetime(Duration::from_secs(30));
    let grants = names(50);
    for n in &grants {
        env.consented_mailbox(n).await;
    }
    let service = TokenService::new(env.state.clone(), TokenConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = RefreshScheduler::spawn(service.clone(), async {
        let _ = stopped.await;
    });
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 30 s of 503, then 30 s of hanging (or 30 s more of 503).
    let before = env.refreshes().len();
    env.fake.set_outage(true);
    tokio::time::sleep(Duration::from_secs(30)).await;
    if hang {
        env.fake.set_hang(true);
        env.fake.set_outage(false);
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let answered_503 = env.refreshes().len() - before;
    let hung = env.fake.held_total();
    let failing = statuses(&env, &grants)
        .await
        .iter()
        .filter(|s| **s == TokenStatus::RefreshFailing)
        .count();
    let recovered = Instant::now();
    env.fake.set_hang(false);
    env.fake.set_outage(false);
    eventually(
        "every grant ACTIVE after the recovery",
        Duration::from_secs(60),
        async || {
            statuses(&env, &grants)
                .await
                .iter()
                .all(|s| *s == TokenStatus::Active)
                .then_some(())
        },
    )
    .await;
    let took = recovered.elapsed();
    let calls = answered_503 + hung;
    println!(
        "default settings, 50 grants, 30 s access tokens, {}: {failing} grants REFRESH_FAILING at the end of the outage; {calls} provider calls during the outage ({answered_503} answered 503, {hung} hung) = {:.2} per grant; every grant ACTIVE {:.1} s after the provider's recovery",
        if hang {
            "30 s of 503 then 30 s hanging"
        } else {
            "60 s of 503"
        },
        calls as f64 / grants.len() as f64,
        took.as_secs_f64()
    );
    assert!(failing > 40, "the outage outlasted the tokens: {failing}");
    // At most one probe interval (5 s) plus the release spread (3 s), with slack.
    assert!(took < Duration::from_secs(15), "{took:?}");
    // One probe per 5 s over 60 s, plus the calls in flight when the breaker opened.
    assert!(calls <= 12 + 16 + 2, "{calls}");
    let _ = stop.send(());
    scheduler.await.unwrap();
}

/// A store that refuses writes for a moment (a failover, a slot migration) while the provider
/// rotates the refresh token: the write is retried until the store takes it, so the rotated token
/// is kept, every device gets its access token, and no spent token is ever presented again.
#[tokio::test]
async fn a_store_that_refuses_writes_for_a_moment_does_not_lose_the_rotated_refresh_token() {
    let clock = ManualClock::new();
    let env = Env::start(Backend::Redis, ProviderKind::Microsoft, clock.clone()).await;
    rotate_with(&env, RefreshRotation::SingleUseRevokeOnReuse);
    env.consented_mailbox("scan").await;
    let port = env.store.redis.as_ref().unwrap().port();
    env.service.refresh_now(TENANT, "scan").await.unwrap();

    clock.advance(Duration::from_secs(56 * 60));
    let before = env.refreshes().len();
    env.fake.hold_next_token_requests(1);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let service = env.service.clone();
        calls.spawn(async move {
            service
                .access_token(TENANT, "scan", Duration::from_secs(300))
                .await
        });
    }
    eventually(
        "the refresh at the provider",
        Duration::from_secs(5),
        async || (env.fake.held_requests() == 1).then_some(()),
    )
    .await;
    tokenfleet_testkit::redis::command(port, &["CONFIG", "SET", "min-replicas-to-write", "1"])
        .await
        .unwrap();
    env.fake.release_held();
    // The provider has answered (and rotated) and the write is being refused; then the store
    // takes writes again, well within the retry window.
    eventually(
        "the provider's answer",
        Duration::from_secs(5),
        async || (env.refreshes().len() == before + 1).then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokenfleet_testkit::redis::command(port, &["CONFIG", "SET", "min-replicas-to-write", "0"])
        .await
        .unwrap();
    while let Some(r) = calls.join_next().await {
        r.unwrap()
            .expect("the token, once its rotated refresh token is stored");
    }
    assert_eq!(env.refreshes().len(), before + 1, "one refresh for all");
    let stored = env.open(&env.grant("scan").await, GrantField::RefreshToken);
    assert_eq!(
        env.fake.live_refresh_tokens(&Env::address("scan")).last(),
        Some(&stored),
        "the stored refresh token is the one the provider rotated to"
    );
    // The next refresh presents it, and it works.
    clock.advance(Duration::from_secs(56 * 60));
    env.service.refresh_now(TENANT, "scan").await.unwrap();
    assert_eq!(env.fake.refresh_token_reuses(), 0);
}
