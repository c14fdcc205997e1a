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
mod e2e {
    use std::collections::HashSet;
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
    use tokenfleet_store::{Precondition, Store};
    use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
    use tokenfleet_testkit::redis::RedisServer;

    const TENANT: &str = "bench";
    const PROVIDER: &str = "m365";
    const CLIENT_ID: &str = "app-bench";
    const CLIENT_SECRET: &str = "client-secret-bench";
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

    /// Tenant, provider, `n` mailboxes with grants whose access tokens expired a second ago, each
    /// due on the refresh schedule now.
    async fn seed(state: &BrokerState, fake: &Arc<FakeIdp>, n: usize) -> Result<()> {
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
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
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
                    let seal = |field, value: &Secret| {
                        seal_field(&state.keyring, TENANT, &name, field, value)
                    };
                    let mut g = GrantRecord::empty(TENANT, &name);
                    g.state.status = TokenStatus::Active;
                    g.state.last_refresh = Some(now - Duration::from_secs(3600));
                    g.state.access_token_expires = Some(now - Duration::from_secs(1));
                    g.access_token = Some(seal(GrantField::AccessToken, &granted.access_token)?);
                    let refresh = granted
                        .refresh_token
                        .as_ref()
                        .context("the fake issued no refresh token")?;
                    g.refresh_token = Some(seal(GrantField::RefreshToken, refresh)?);
                    g.scopes = scopes.clone();
                    g.next_refresh = Some(now - Duration::from_secs(1));
                    records.put(&g, Precondition::Absent).await?;
                    schedule_refresh(
                        state.store.as_ref(),
                        TENANT,
                        &name,
                        now - Duration::from_secs(1),
                    )
                    .await?;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.context("seed worker")??;
        }
        Ok(())
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
        seed(&states[0], &fake, n).await?;
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
        let distinct: HashSet<String> = fake
            .requests()
            .iter()
            .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
            .filter_map(|r| {
                r.form
                    .iter()
                    .find(|(k, _)| k == "refresh_token")
                    .map(|(_, v)| v.clone())
            })
            .collect();
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
                    "{} ({total} refresh requests, {} distinct refresh tokens)",
                    if total == n && distinct.len() == n {
                        "yes"
                    } else {
                        "NO"
                    },
                    distinct.len()
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
