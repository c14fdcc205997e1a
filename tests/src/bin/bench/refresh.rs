//! Benchmark of the refresh schedule at fleet scale (token-lifecycle issue: "spreading work so it
//! scales to 100,000 mailboxes"). Not part of any test suite; run it by hand:
//!
//! ```text
//! cargo run --release -p tokenfleet-testkit --bin bench -- refresh --mailboxes 100000 --store embedded
//! cargo run --release -p tokenfleet-testkit --bin bench -- refresh --mailboxes 100000 --store redis
//! ```
//!
//! With `--store redis` it starts its own `redis-server` on a free loopback port (stopped on exit);
//! with `--store embedded` it opens a redb file in a temporary directory. Phases, each stopped at
//! its own deadline (`--phase-secs`):
//!
//! 1. Schedules N mailboxes (`<tenant>/<mailbox>` in the `refresh` schedule) as if all N had
//!    obtained a 1 h access token at the same instant (the worst case: a bulk onboarding), each at
//!    the due time the broker's own [`next_refresh_at`] picks (with its jitter). Reports the time
//!    to write the entries, entries/s, and how the due times spread: the most entries due in any
//!    1-second and any 1-minute bucket, against N in one instant without jitter. Also shows the
//!    spread after two more refresh generations (computed in memory with the same function).
//! 2. Latency of `due(now, 256)` (what every scheduler poll does) with the N entries present,
//!    p50/p99/max over `--queries` queries, for a `now` at which every entry is due and for one
//!    at which none is.
//!
//! 3. With `--e2e M` (M > 0): an end-to-end run on a fresh `redis-server` and the in-process fake
//!    identity provider. M mailboxes get sealed grants obtained from the fake (authorization-code
//!    flow) whose access tokens have just expired, all due on the schedule; then 1 and then 3
//!    [`RefreshScheduler`] replicas (each a `TokenService` with its own store connection, default
//!    scheduler settings) refresh everything that is due. Reports refreshes/s, whether every
//!    mailbox was refreshed exactly once (the fake's token-endpoint records: M `refresh_token`
//!    requests, M distinct refresh tokens) and this process's RSS (which includes the fake).
//!
//! ```text
//! cargo run --release -p tokenfleet-testkit --bin bench -- refresh --mailboxes 100000 --store redis --e2e 2000
//! ```
//!
//! 4. At scale (issue 15 target 4; `--scale N`, default 100,000, 0 skips it): N mailboxes
//!    whose access tokens were all obtained at one instant, refreshed by `--replicas` (3)
//!    [`RefreshScheduler`]s, each a `TokenService` with its own connection to one fresh
//!    `redis-server`, against the fake provider answering after `--latency-ms` (200). The grants
//!    come from the fake (authorization-code flow) and are written as a consent leaves them:
//!    obtained at `t0`, access token valid until `t0 + L`, due when the broker's own
//!    [`next_refresh_at`] says (65–85 % of L, jittered). Time is compressed, and exactly so:
//!    `--lifetime-secs` L is 900 s instead of the real 3,600 (4×: due window, expiry and the
//!    rate needed all scaled by 4), and `t0` is back-dated so the first refresh comes due
//!    `--lead-secs` after seeding (the 65 % of L in which nothing is due is skipped). The
//!    schedulers run until every mailbox is refreshed or 15 s past the expiry; then every grant
//!    is read back: refreshed before expiry means a `last_refresh` after `t0` and not after
//!    `t0 + L`, and a new token valid past `t0 + L`. Reported for the adaptive limit
//!    (`--ceiling` per replica) and then, on a fresh Redis and fake, for the old fixed limit
//!    (`--baseline-fixed`, 16): mailboxes refreshed in time, the margin (expiry minus the latest
//!    refresh), refreshes/s, the peak limit and peak refreshes in flight, and from the fake's
//!    per-grant counters the most `refresh_token` requests any grant received (must be 1).
//!
//! ```text
//! target/release/bench refresh --mailboxes 1000 --scale 100000
//! ```
//!
//! Only 127.0.0.1 is contacted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use time::OffsetDateTime;
use tokenfleet_broker::tokens::backoff::unit_random;
use tokenfleet_broker::tokens::scheduler::{
    REFRESH_SCHEDULE, member, next_refresh_at, schedule_refresh, unix_ms,
};
use tokenfleet_store::Store;
use tokenfleet_store::embedded::EmbeddedStore;
use tokenfleet_store::redis_store::{RedisConfig, RedisStore};
use tokenfleet_testkit::redis::RedisServer;

/// Access-token lifetime the benchmark assumes (Entra ID and Google issue 1 h tokens).
const LIFETIME: Duration = Duration::from_secs(3600);
/// Longest interval between refreshes of a delegated grant (the broker's default).
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Tenant every benchmark mailbox belongs to.
const TENANT: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Embedded,
    Redis,
}

/// Refresh-schedule benchmark (see the file header).
#[derive(Debug, Parser)]

pub struct Args {
    /// Mailboxes to schedule.
    #[arg(long, default_value_t = 100_000)]
    mailboxes: usize,
    /// Store backend.
    #[arg(long, value_enum, default_value = "embedded")]
    store: Backend,
    /// Schedule writes in flight at once in phase 1.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// `due` queries in phase 2.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Batch size of each `due` query.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Mailboxes of the end-to-end phase (0 skips it).
    #[arg(long, default_value_t = 0)]
    e2e: usize,
    /// Deadline of each phase in seconds; a phase stops early and reports what it did.
    #[arg(long, default_value_t = 300)]
    phase_secs: u64,
    /// Mailboxes of the at-scale phase (issue 15 target 4; 0 skips it): all obtained at one
    /// instant, refreshed by `--replicas` schedulers on one Redis against a provider
    /// `--latency-ms` away, with the adaptive limit and then with the old fixed 16.
    #[arg(long, default_value_t = 100_000)]
    scale: usize,
    /// Scheduler replicas of the at-scale phase.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// The fake provider's answer latency in the at-scale phase (milliseconds).
    #[arg(long, default_value_t = 200)]
    latency_ms: u64,
    /// Access-token lifetime of the at-scale phase (seconds). Real providers issue 1 h tokens;
    /// the default 900 compresses time 4× (every due time and the expiry 4× closer to when
    /// the tokens were obtained, so 4× the refresh rate is needed) so a phase fits in minutes.
    #[arg(long, default_value_t = 900)]
    lifetime_secs: u64,
    /// Seconds from the end of seeding to the first due refresh (the idle time before it,
    /// 65 % of the lifetime, is skipped by back-dating when the tokens were obtained).
    #[arg(long, default_value_t = 30)]
    lead_secs: u64,
    /// Ceiling of the adaptive limit per replica (`tokens.scheduler_concurrency`).
    #[arg(long, default_value_t = tokenfleet_broker::tokens::scheduler::DEFAULT_CONCURRENCY_CEILING)]
    ceiling: usize,
    /// The baseline's fixed limit per replica (the scheduler before it adapted); 0 skips the
    /// baseline.
    #[arg(long, default_value_t = 16)]
    baseline_fixed: usize,
}

#[tokio::main]
pub async fn run(args: Args) -> Result<()> {
    if args.mailboxes == 0 {
        bail!("--mailboxes must be at least 1");
    }
    if args.batch == 0 || args.queries == 0 || args.concurrency == 0 {
        bail!("--batch, --queries and --concurrency must be at least 1");
    }
    let deadline = Duration::from_secs(args.phase_secs.max(1));

    // Keep whichever owns the data alive until the end.
    let dir = tempfile::Builder::new()
        .prefix("tf-bench-")
        .tempdir()
        .context("creating temp dir")?;
    let mut redis = None;
    let store: Arc<dyn Store> = match args.store {
        Backend::Embedded => Arc::new(
            EmbeddedStore::open(dir.path().join("bench.redb"))
                .await
                .context("opening embedded store")?,
        ),
        Backend::Redis => {
            let server = RedisServer::start()
                .await
                .context("starting redis-server")?;
            let store = RedisStore::connect(&RedisConfig::standalone(server.url()))
                .await
                .context("connecting to redis")?;
            redis = Some(server);
            Arc::new(store)
        }
    };

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
    row("store", format!("{:?}", args.store).to_lowercase());
    row("mailboxes", args.mailboxes.to_string());
    row("cpus", cpus().to_string());
    row("rss at start", rss());

    // Phase 1: due times, as the broker computes them, for a burst of N consents at `t0`.
    let t0 = OffsetDateTime::now_utc();
    let due: Vec<OffsetDateTime> = (0..args.mailboxes)
        .map(|_| next_refresh_at(t0, LIFETIME, true, MAX_INTERVAL, unit_random()))
        .collect();
    let due = Arc::new(due);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (store, due, next) = (store.clone(), due.clone(), next.clone());
        workers.spawn(async move {
            let mut written = 0usize;
            loop {
                if started.elapsed() > deadline {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(at) = due.get(i) else { break };
                schedule_refresh(store.as_ref(), TENANT, &format!("mbx{i:06}"), *at).await?;
                written += 1;
            }
            anyhow::Ok(written)
        });
    }
    let mut written = 0;
    while let Some(done) = workers.join_next().await {
        written += done.context("schedule worker")??;
    }
    let took = started.elapsed();
    row("1 schedule: entries written", written.to_string());
    row("1 schedule: time", format!("{:.2} s", took.as_secs_f64()));
    row(
        "1 schedule: entries/s",
        format!("{:.0}", written as f64 / took.as_secs_f64().max(1e-9)),
    );
    if written < args.mailboxes {
        row(
            "1 schedule: NOTE",
            format!("stopped at the {} s deadline", deadline.as_secs()),
        );
    }
    let ms: Vec<i64> = due.iter().map(|t| unix_ms(*t) - unix_ms(t0)).collect();
    let (lo, hi) = (
        ms.iter().min().copied().unwrap_or(0),
        ms.iter().max().copied().unwrap_or(0),
    );
    row(
        "1 spread: due window after burst",
        format!(
            "{:.1} .. {:.1} min after the burst",
            lo as f64 / 60_000.0,
            hi as f64 / 60_000.0
        ),
    );
    row(
        "1 spread: without jitter",
        format!("{} due in one instant", args.mailboxes),
    );
    row(
        "1 spread: max due in any 1 s",
        max_bucket(&ms, 1_000).to_string(),
    );
    row(
        "1 spread: max due in any 1 min",
        max_bucket(&ms, 60_000).to_string(),
    );
    // Two more refresh generations, each refreshed exactly at its due time.
    let mut gen_ms = ms.clone();
    for _ in 0..2 {
        gen_ms = gen_ms
            .iter()
            .map(|m| {
                let at = t0 + Duration::from_millis(u64::try_from(*m).unwrap_or(0));
                unix_ms(next_refresh_at(
                    at,
                    LIFETIME,
                    true,
                    MAX_INTERVAL,
                    unit_random(),
                )) - unix_ms(t0)
            })
            .collect();
    }
    row(
        "1 spread: 3rd generation, max in 1 s / 1 min",
        format!(
            "{} / {}",
            max_bucket(&gen_ms, 1_000),
            max_bucket(&gen_ms, 60_000)
        ),
    );
    row("rss after schedule", rss());

    // Phase 2: `due` latency with the entries present.
    let all_due = unix_ms(t0) + 2 * 3600 * 1000;
    let none_due = unix_ms(t0);
    for (label, now) in [("all due", all_due), ("none due", none_due)] {
        let mut lat = Vec::with_capacity(args.queries);
        let mut returned = 0;
        let started = Instant::now();
        for _ in 0..args.queries {
            if started.elapsed() > deadline {
                break;
            }
            let q = Instant::now();
            let got = store.due(REFRESH_SCHEDULE, now, args.batch).await?;
            lat.push(q.elapsed());
            returned = got.len();
        }
        lat.sort();
        row(
            &format!("2 due({label}, {}): queries", args.batch),
            format!("{} (each returned {returned})", lat.len()),
        );
        row(
            &format!("2 due({label}, {}): p50 / p99 / max", args.batch),
            format!(
                "{} / {} / {}",
                fmt_dur(pct(&lat, 50)),
                fmt_dur(pct(&lat, 99)),
                fmt_dur(lat.last().copied().unwrap_or_default())
            ),
        );
    }
    // The scheduler's claim: one entry pushed a lease into the future, one due query after it.
    let claim = member(TENANT, "mbx000000");
    let q = Instant::now();
    store
        .schedule(REFRESH_SCHEDULE, &claim, all_due + 60_000)
        .await?;
    row("2 one claim (schedule) write", fmt_dur(q.elapsed()));
    row("rss at end", rss());

    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("\nbench-refresh results");
    println!("{}", "-".repeat(width + 40));
    for (k, v) in &rows {
        println!("{k:<width$}  {v}");
    }
    println!("{}", "-".repeat(width + 40));

    drop(store);
    if let Some(mut server) = redis {
        server.stop().await?;
    }
    drop(dir);

    if args.scale > 0 {
        scale::bench(&args).await?;
    }

    if args.e2e > 0 {
        let mut rows = Vec::new();
        for replicas in [1, 3] {
            rows.extend(e2e::run(args.e2e, replicas, deadline).await?);
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        println!("\nbench-refresh end-to-end ({} mailboxes, redis)", args.e2e);
        println!("{}", "-".repeat(width + 40));
        for (k, v) in &rows {
            println!("{k:<width$}  {v}");
        }
        println!("{}", "-".repeat(width + 40));
    }
    Ok(())
}

/// Phase 3: real refreshes by `RefreshScheduler` replicas.
pub(crate) mod e2e {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use time::OffsetDateTime;
    use tokenfleet_broker::records::Records;
    use tokenfleet_broker::state::BrokerState;
    use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, seal_field};
    use tokenfleet_broker::tokens::lifecycle::{TokenConfig, TokenService};
    use tokenfleet_broker::tokens::scheduler::{RefreshScheduler, schedule_refresh};
    use tokenfleet_domain::{
        GrantType, MailPurpose, Mailbox, MailboxKind, Provider, ProviderKind, Stamps, SystemClock,
        Tenant, TokenState, TokenStatus,
    };
    use tokenfleet_providers::{ProviderClient, ProviderSettings};
    use tokenfleet_seal::{Keyring, Secret};
    use tokenfleet_store::redis_store::{RedisConfig, RedisStore};
    use tokenfleet_store::{Precondition, Scope, Store};
    use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
    use tokenfleet_testkit::redis::RedisServer;

    pub const TENANT: &str = "bench";
    const PROVIDER: &str = "m365";
    pub const CLIENT_ID: &str = "app-bench";
    pub const CLIENT_SECRET: &str = "client-secret-bench";
    const ENTRA_TENANT: &str = "contoso.example";
    const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
    const SEED_WORKERS: usize = 16;

    fn address(i: usize) -> String {
        format!("mbx{i:06}@contoso.example")
    }

    fn url_param(url: &str, name: &str) -> Result<String> {
        url::Url::parse(url)?
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .with_context(|| format!("no {name} in the fake's redirect"))
    }

    /// When the seeded grants' tokens were obtained and when each comes due.
    pub trait Timing: Send + Sync + 'static {
        /// Called once, after the fake handed out every grant and before any grant is written:
        /// the instant every access token was obtained, and their lifetime.
        fn obtained(&self) -> (OffsetDateTime, Duration);
        /// When mailbox `i`'s refresh is due (grant `next_refresh` and schedule entry).
        fn due(&self, i: usize, obtained: OffsetDateTime) -> OffsetDateTime;
    }

    /// The original end-to-end case: every access token expired a second ago, all due now.
    struct AllExpired;

    impl Timing for AllExpired {
        fn obtained(&self) -> (OffsetDateTime, Duration) {
            (
                OffsetDateTime::now_utc() - Duration::from_secs(3600),
                Duration::from_secs(3599),
            )
        }
        fn due(&self, _: usize, obtained: OffsetDateTime) -> OffsetDateTime {
            obtained + Duration::from_secs(3599)
        }
    }

    /// Tenant, provider, `n` mailboxes with grants obtained from the fake (authorization-code
    /// flow), written as [`Timing`] says, each on the refresh schedule. Returns the instant the
    /// tokens were obtained.
    pub async fn seed(
        state: &BrokerState,
        fake: &Arc<FakeIdp>,
        n: usize,
        timing: Arc<dyn Timing>,
    ) -> Result<(OffsetDateTime, Duration)> {
        let records = Records::new(state.store.as_ref());
        let now = OffsetDateTime::now_utc();
        let tenant = Tenant {
            name: TENANT.into(),
            display_name: "Bench".into(),
            stamps: Stamps::new(now),
        };
        records.put(&tenant, Precondition::Absent).await?;
        let provider = Provider {
            tenant: TENANT.into(),
            name: PROVIDER.into(),
            kind: ProviderKind::Microsoft,
            authority: ENTRA_TENANT.into(),
            client_id: CLIENT_ID.into(),
            client_secret: Some(state.keyring.seal_secret(
                &Provider::client_secret_aad(TENANT, PROVIDER),
                &Secret::new(CLIENT_SECRET),
            )?),
            endpoints: fake.microsoft_endpoints(ENTRA_TENANT),
            http_proxy: String::new(),
            http_proxy_password: None,
            extra_ca_pem: String::new(),
            scopes: vec![],
            service_account_key: None,
            stamps: Stamps::new(now),
        };
        records.put(&provider, Precondition::Absent).await?;
        let client = Arc::new(ProviderClient::new(ProviderSettings::from_provider(
            &provider,
            Some(Secret::new(CLIENT_SECRET)),
        )?)?);
        let purposes = [MailPurpose::Send, MailPurpose::Pop];
        let scopes = client.scopes_for(GrantType::DelegatedAuthCode, &purposes)?;
        // Pass 1: mailboxes, and a grant from the fake for each (the slow part).
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..SEED_WORKERS {
            let (state, fake, client, scopes, next) = (
                state.clone(),
                fake.clone(),
                client.clone(),
                scopes.clone(),
                next.clone(),
            );
            workers.spawn(async move {
                let records = Records::new(state.store.as_ref());
                let mut got = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(got);
                    }
                    let name = format!("mbx{i:06}");
                    let mailbox = Mailbox {
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
                    };
                    records.put(&mailbox, Precondition::Absent).await?;
                    fake.add_user(&address(i));
                    let auth = client.authorization_url(&scopes, REDIRECT, "st", None)?;
                    let redirect = fake.authorize_url(&auth.url, &address(i))?;
                    let granted = client
                        .exchange_code(
                            &Secret::new(url_param(&redirect, "code")?),
                            &auth.pkce_verifier,
                            REDIRECT,
                        )
                        .await?;
                    let refresh = granted
                        .refresh_token
                        .clone()
                        .context("the fake issued no refresh token")?;
                    got.push((i, granted.access_token, refresh));
                }
            });
        }
        let mut granted = Vec::with_capacity(n);
        while let Some(done) = workers.join_next().await {
            granted.extend(done.context("seed worker")??);
        }
        // Pass 2: the grants as the broker writes them after a consent, all obtained at one
        // instant, each on the schedule at its due time.
        let (obtained, lifetime) = timing.obtained();
        let granted = Arc::new(std::sync::Mutex::new(granted));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..SEED_WORKERS {
            let (state, scopes, granted, timing) = (
                state.clone(),
                scopes.clone(),
                granted.clone(),
                timing.clone(),
            );
            workers.spawn(async move {
                let records = Records::new(state.store.as_ref());
                loop {
                    let next = granted.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some((i, access, refresh)) = next else {
                        return anyhow::Ok(());
                    };
                    let name = format!("mbx{i:06}");
                    let seal = |field, value: &Secret| {
                        seal_field(&state.keyring, TENANT, &name, field, value)
                    };
                    let due = timing.due(i, obtained);
                    let mut g = GrantRecord::empty(TENANT, &name);
                    g.state.status = TokenStatus::Active;
                    g.state.last_refresh = Some(obtained);
                    g.state.access_token_expires = Some(obtained + lifetime);
                    g.access_token = Some(seal(GrantField::AccessToken, &access)?);
                    g.refresh_token = Some(seal(GrantField::RefreshToken, &refresh)?);
                    g.refresh_token_obtained = Some(obtained);
                    g.scopes = scopes.clone();
                    g.next_refresh = Some(due);
                    records.put(&g, Precondition::Absent).await?;
                    schedule_refresh(state.store.as_ref(), TENANT, &name, due).await?;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.context("seed worker")??;
        }
        Ok((obtained, lifetime))
    }

    /// Every grant of the bench tenant, read back from the store.
    pub async fn grants(state: &BrokerState) -> Result<Vec<GrantRecord>> {
        let records = Records::new(state.store.as_ref());
        let scope = Scope::Tenant(TENANT.into());
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = records
                .list::<GrantRecord>(&scope, after.as_deref(), 500)
                .await?;
            let full = page.len() == 500;
            after = page.last().map(|g| g.value.mailbox.clone());
            all.extend(page.into_iter().map(|g| g.value));
            if !full {
                return Ok(all);
            }
        }
    }

    /// One run with `replicas` schedulers; returns table rows.
    pub async fn run(
        n: usize,
        replicas: usize,
        deadline: Duration,
    ) -> Result<Vec<(String, String)>> {
        let redis = RedisServer::start()
            .await
            .context("starting redis-server")?;
        let fake = Arc::new(FakeIdp::start().await.context("starting the fake IdP")?);
        fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
        let key = Keyring::generate_key_base64()?;
        let mut states = Vec::new();
        for _ in 0..replicas {
            let store: Arc<dyn Store> =
                Arc::new(RedisStore::connect(&RedisConfig::standalone(redis.url())).await?);
            states.push(BrokerState {
                store,
                keyring: Arc::new(Keyring::from_base64("k1", [("k1", key.as_str())])?),
                clock: Arc::new(SystemClock),
            });
        }
        let seeding = Instant::now();
        seed(&states[0], &fake, n, Arc::new(AllExpired)).await?;
        let seed_took = seeding.elapsed();
        let before = fake.token_requests("refresh_token");
        if before != 0 {
            bail!("{before} refreshes before the schedulers started");
        }

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let mut handles = Vec::new();
        for (i, state) in states.iter().enumerate() {
            let service = TokenService::new(
                state.clone(),
                TokenConfig {
                    replica_id: format!("replica-{i}"),
                    provider_timeout: Duration::from_secs(10),
                    lease_ttl: Duration::from_secs(20),
                    ..TokenConfig::default()
                },
            );
            let mut stopped = stopped.clone();
            handles.push(RefreshScheduler::spawn(service, async move {
                let _ = stopped.wait_for(|s| *s).await;
            }));
        }
        let mut done = 0;
        while started.elapsed() < deadline {
            done = fake.token_requests("refresh_token");
            if done >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = started.elapsed();
        // A little longer: a duplicate refresh would show up here.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = stop.send(true);
        for handle in handles {
            let _ = handle.await;
        }
        let total = fake.token_requests("refresh_token");
        let per_grant = fake.refresh_requests_per_grant();
        let once = per_grant.iter().filter(|&&c| c == 1).count();
        let label = |what: &str| format!("3 e2e {replicas} replica(s): {what}");
        let mut rows = vec![
            (
                label("seeding grants"),
                format!("{:.2} s", seed_took.as_secs_f64()),
            ),
            (
                label("refreshed"),
                format!("{done} of {n} in {:.2} s", took.as_secs_f64()),
            ),
            (
                label("refreshes/s"),
                format!("{:.0}", done as f64 / took.as_secs_f64().max(1e-9)),
            ),
            (
                label("exactly once"),
                format!(
                    "{} ({total} refresh requests, {once} of {} grants refreshed once, most for one grant {})",
                    if total == n && once == n { "yes" } else { "NO" },
                    per_grant.len(),
                    per_grant.iter().max().copied().unwrap_or(0)
                ),
            ),
            (label("process RSS (incl. fake IdP)"), super::rss()),
        ];
        if done < n {
            rows.push((
                label("NOTE"),
                format!("stopped at the {} s deadline", deadline.as_secs()),
            ));
        }
        drop(states);
        drop(fake);
        drop(redis);
        Ok(rows)
    }
}

/// Issue 15 target 4: refresh at scale against a slow provider, adaptive against fixed.
mod scale {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use time::OffsetDateTime;
    use tokenfleet_broker::state::BrokerState;
    use tokenfleet_broker::tokens::backoff::unit_random;
    use tokenfleet_broker::tokens::lifecycle::{TokenConfig, TokenService};
    use tokenfleet_broker::tokens::scheduler::{
        ConcurrencyController, RefreshScheduler, SchedulerConfig, next_refresh_at,
    };
    use tokenfleet_domain::SystemClock;
    use tokenfleet_seal::Keyring;
    use tokenfleet_store::Store;
    use tokenfleet_store::redis_store::{RedisConfig, RedisStore};
    use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
    use tokenfleet_testkit::redis::RedisServer;

    use super::e2e::{self, CLIENT_ID, CLIENT_SECRET, Timing};
    use super::{LIFETIME, MAX_INTERVAL};

    /// All tokens obtained at one instant, back-dated so the first refresh comes due `lead`
    /// after seeding; each due when the broker's own [`next_refresh_at`] says.
    struct Burst {
        lifetime: Duration,
        lead: Duration,
    }

    impl Timing for Burst {
        fn obtained(&self) -> (OffsetDateTime, Duration) {
            let first_due = self.lifetime.mul_f64(0.65);
            (
                OffsetDateTime::now_utc() + self.lead - first_due,
                self.lifetime,
            )
        }
        fn due(&self, _: usize, obtained: OffsetDateTime) -> OffsetDateTime {
            next_refresh_at(obtained, self.lifetime, true, MAX_INTERVAL, unit_random())
        }
    }

    /// What one phase measured.
    #[derive(Debug, Default)]
    struct Phase {
        label: String,
        n: usize,
        seed_secs: f64,
        /// Refresh requests the provider answered.
        refreshed: usize,
        /// Mailboxes whose grant holds a token obtained after the burst and before the old one
        /// expired.
        in_time: usize,
        /// Expiry minus the latest refresh (seconds); when some were not refreshed in time,
        /// projected at the phase's rate (negative: that late).
        margin_s: f64,
        margin_projected: bool,
        /// First due refresh to the latest refresh (seconds).
        run_secs: f64,
        rate: f64,
        peak_limit: usize,
        peak_in_flight_total: usize,
        peak_in_flight_replica: usize,
        provider_failing: usize,
        /// Scheduled refreshes started, all replicas (above `n`: a mailbox taken by two).
        started: usize,
        per_grant_max: usize,
        grants_over_once: usize,
        stopped_at_cap: bool,
        rss: String,
    }

    async fn phase(args: &super::Args, fixed: Option<usize>) -> Result<Phase> {
        let n = args.scale;
        let lifetime = Duration::from_secs(args.lifetime_secs.max(60));
        let latency = Duration::from_millis(args.latency_ms);
        let label = match fixed {
            Some(f) => format!("fixed-{f}"),
            None => "adaptive".to_owned(),
        };
        let redis = RedisServer::start()
            .await
            .context("starting redis-server")?;
        let fake = Arc::new(FakeIdp::start().await.context("starting the fake IdP")?);
        fake.set_recording(false);
        fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
        let key = Keyring::generate_key_base64()?;
        let mut states = Vec::new();
        for _ in 0..args.replicas.max(1) {
            let store: Arc<dyn Store> =
                Arc::new(RedisStore::connect(&RedisConfig::standalone(redis.url())).await?);
            states.push(BrokerState {
                store,
                keyring: Arc::new(Keyring::from_base64("k1", [("k1", key.as_str())])?),
                clock: Arc::new(SystemClock),
            });
        }
        let seeding = Instant::now();
        let timing = Arc::new(Burst {
            lifetime,
            lead: Duration::from_secs(args.lead_secs),
        });
        let (obtained, lifetime) = e2e::seed(&states[0], &fake, n, timing).await?;
        let seed_secs = seeding.elapsed().as_secs_f64();
        let expiry = obtained + lifetime;
        let first_due = obtained + lifetime.mul_f64(0.65);
        // From here on the provider answers after `latency`, with tokens of the same lifetime.
        fake.set_latency(latency);
        fake.set_access_token_lifetime(lifetime);
        println!(
            "bench=refresh-scale phase={label} seeded={n} seed_s={seed_secs:.1} first_due_in_s={:.1} expiry_in_s={:.1}",
            (first_due - OffsetDateTime::now_utc()).as_seconds_f64(),
            (expiry - OffsetDateTime::now_utc()).as_seconds_f64()
        );

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut handles = Vec::new();
        let mut stats = Vec::new();
        for (i, state) in states.iter().enumerate() {
            let service = TokenService::new(
                state.clone(),
                TokenConfig {
                    replica_id: format!("replica-{i}"),
                    scheduler: SchedulerConfig {
                        concurrency: fixed.unwrap_or(args.ceiling),
                        ..SchedulerConfig::default()
                    },
                    ..TokenConfig::default()
                },
            );
            let controller = match fixed {
                Some(f) => ConcurrencyController::fixed(f),
                None => ConcurrencyController::adaptive(args.ceiling),
            };
            let mut stopped = stopped.clone();
            let (handle, stat) = RefreshScheduler::spawn_with(
                service,
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
                controller,
            );
            handles.push(handle);
            stats.push(stat);
        }
        // Until every mailbox is refreshed, or (the baseline) a little past the expiry.
        let cap = expiry + Duration::from_secs(15);
        let mut peak_total = 0;
        let mut refreshed;
        let mut stopped_at_cap = false;
        let mut last_print = Instant::now();
        loop {
            refreshed = fake.token_requests("refresh_token");
            let total: usize = stats
                .iter()
                .map(|s| s.in_flight.load(Ordering::Relaxed))
                .sum();
            peak_total = peak_total.max(total);
            if refreshed >= n {
                break;
            }
            let now = OffsetDateTime::now_utc();
            if now > cap {
                stopped_at_cap = true;
                break;
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                last_print = Instant::now();
                let limits: Vec<String> = stats
                    .iter()
                    .map(|s| s.limit.load(Ordering::Relaxed).to_string())
                    .collect();
                let latencies: Vec<String> = stats
                    .iter()
                    .map(|s| s.latency_ms.load(Ordering::Relaxed).to_string())
                    .collect();
                let started: usize = stats
                    .iter()
                    .map(|s| s.started.load(Ordering::Relaxed))
                    .sum();
                println!(
                    "bench=refresh-scale phase={label} progress refreshed={refreshed} started={started} in_flight={total} limits={} refresh_ms={} to_expiry_s={:.0}",
                    limits.join("/"),
                    latencies.join("/"),
                    (expiry - now).as_seconds_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let the answers in flight be written.
        tokio::time::sleep(latency + Duration::from_secs(2)).await;
        let _ = stop.send(true);
        for handle in handles {
            let _ = handle.await;
        }
        let grants = e2e::grants(&states[0]).await?;
        let mut in_time = 0;
        let mut latest: Option<OffsetDateTime> = None;
        for g in &grants {
            let Some(at) = g.state.last_refresh.filter(|at| *at > obtained) else {
                continue;
            };
            latest = Some(latest.map_or(at, |l| l.max(at)));
            if at <= expiry && g.state.access_token_expires.is_some_and(|e| e > expiry) {
                in_time += 1;
            }
        }
        let end = latest.unwrap_or(first_due);
        let run_secs = (end - first_due).as_seconds_f64().max(1e-3);
        let rate = refreshed as f64 / run_secs;
        let margin_projected = in_time < n;
        let margin_s = if margin_projected {
            // Not all in time: where the last one would have come at this phase's rate.
            (expiry - first_due).as_seconds_f64() - n as f64 / rate.max(1e-9)
        } else {
            (expiry - end).as_seconds_f64()
        };
        let per_grant = fake.refresh_requests_per_grant();
        let phase = Phase {
            label,
            n,
            seed_secs,
            refreshed,
            in_time,
            margin_s,
            margin_projected,
            run_secs,
            rate,
            peak_limit: stats
                .iter()
                .map(|s| s.peak_limit.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
            peak_in_flight_total: peak_total,
            peak_in_flight_replica: stats
                .iter()
                .map(|s| s.peak_in_flight.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0),
            provider_failing: stats
                .iter()
                .map(|s| s.provider_failing.load(Ordering::Relaxed))
                .sum(),
            started: stats
                .iter()
                .map(|s| s.started.load(Ordering::Relaxed))
                .sum(),
            per_grant_max: per_grant.iter().max().copied().unwrap_or(0),
            grants_over_once: per_grant.iter().filter(|&&c| c > 1).count(),
            stopped_at_cap,
            rss: super::rss(),
        };
        drop(states);
        drop(fake);
        drop(redis);
        Ok(phase)
    }

    fn print(p: &Phase, args: &super::Args) {
        println!(
            "bench=refresh-scale phase={} mailboxes={} replicas={} latency_ms={} lifetime_s={} seed_s={:.1} refresh_requests={} refreshed_before_expiry={} missed={} margin_s={:.1} margin_projected={} run_s={:.1} refreshes_per_s={:.0} peak_limit_per_replica={} peak_in_flight_replica={} peak_in_flight_total={} provider_failing={} scheduled_refreshes_started={} refresh_requests_per_grant_max={} grants_refreshed_more_than_once={} stopped_at_cap={} process_rss=\"{}\"",
            p.label,
            p.n,
            args.replicas,
            args.latency_ms,
            args.lifetime_secs,
            p.seed_secs,
            p.refreshed,
            p.in_time,
            p.n - p.in_time,
            p.margin_s,
            p.margin_projected,
            p.run_secs,
            p.rate,
            p.peak_limit,
            p.peak_in_flight_replica,
            p.peak_in_flight_total,
            p.provider_failing,
            p.started,
            p.per_grant_max,
            p.grants_over_once,
            p.stopped_at_cap,
            p.rss
        );
    }

    pub async fn bench(args: &super::Args) -> Result<()> {
        println!(
            "bench=refresh-scale mailboxes={} replicas={} latency_ms={} lifetime_s={} real_lifetime_s={} time_compression={:.1}x ceiling={} baseline_fixed={}",
            args.scale,
            args.replicas,
            args.latency_ms,
            args.lifetime_secs,
            LIFETIME.as_secs(),
            LIFETIME.as_secs_f64() / args.lifetime_secs.max(60) as f64,
            args.ceiling,
            args.baseline_fixed
        );
        let adaptive = phase(args, None).await?;
        print(&adaptive, args);
        let baseline = if args.baseline_fixed > 0 {
            let b = phase(args, Some(args.baseline_fixed)).await?;
            print(&b, args);
            Some(b)
        } else {
            None
        };
        let scenario = "refresh-scale";
        let base = |f: fn(&Phase) -> f64| baseline.as_ref().map_or(f64::NAN, f);
        let base_name = format!("fixed-{}", args.baseline_fixed);
        crate::figure(&crate::Figure {
            scenario,
            figure: "mailboxes_expired_before_refresh",
            unit: "mailboxes",
            value: (adaptive.n - adaptive.in_time) as f64,
            baseline: &base_name,
            baseline_value: base(|b| (b.n - b.in_time) as f64),
            target: "0 (every mailbox refreshed before its token expires)",
            met: Some(adaptive.in_time == adaptive.n),
        });
        crate::figure(&crate::Figure {
            scenario,
            figure: "margin_before_expiry",
            unit: "s",
            value: adaptive.margin_s,
            baseline: &base_name,
            baseline_value: base(|b| b.margin_s),
            target: "> 0",
            met: Some(adaptive.margin_s > 0.0 && adaptive.in_time == adaptive.n),
        });
        crate::figure(&crate::Figure {
            scenario,
            figure: "refresh_requests_per_grant_max",
            unit: "requests",
            value: adaptive.per_grant_max as f64,
            baseline: "ceiling",
            baseline_value: 1.0,
            target: "<= 1 per grant",
            met: Some(
                adaptive.per_grant_max <= 1
                    && baseline.as_ref().is_none_or(|b| b.per_grant_max <= 1),
            ),
        });
        crate::figure(&crate::Figure {
            scenario,
            figure: "refresh_rate",
            unit: "refreshes/s",
            value: adaptive.rate,
            baseline: &base_name,
            baseline_value: base(|b| b.rate),
            target: "keeps up with what is due",
            met: Some(adaptive.in_time == adaptive.n),
        });
        crate::figure(&crate::Figure {
            scenario,
            figure: "peak_concurrency_per_replica",
            unit: "in flight",
            value: adaptive.peak_limit as f64,
            baseline: &base_name,
            baseline_value: args.baseline_fixed as f64,
            target: "adapts to provider latency (not a fixed 16)",
            met: Some(adaptive.peak_limit > args.baseline_fixed),
        });
        Ok(())
    }
}

/// Most values (ms offsets) falling in any window of `width` ms (sliding, not aligned).
fn max_bucket(ms: &[i64], width: i64) -> usize {
    let mut sorted = ms.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= width {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * p / 100).min(sorted.len() - 1)]
}

fn fmt_dur(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// This process's resident set size from /proc/self/status.
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.trim_start_matches("VmRSS:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
