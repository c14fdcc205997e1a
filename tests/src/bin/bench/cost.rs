//! Cost per mailbox (issue 15 target 5): cached-token issuance latency with 1,000 and with
//! 100,000 active mailboxes in the broker's store, in one run, and the broker's RSS per idle
//! mailbox. Not part of any test suite; run it by hand:
//!
//! ```text
//! cargo build --release -p tokenfleet-broker -p tokenfleet-testkit --bin tokenfleet-broker --bin bench
//! target/release/bench cost                          # 1,000 then 100,000 mailboxes
//! target/release/bench cost --mailboxes 1000,10000   # smaller
//! ```
//!
//! It starts the release `tokenfleet-broker serve --dev` on its own `redis-server` with a
//! sealing key of its own (so this process can seal grants as the broker does), provisions the
//! issuance scenario's tenant, provider, consented app-only mailbox, device and enrolled agent
//! through the Admin API ([`crate::issuance::provision`]), and opens the agent's mTLS
//! connections once. Then for each `--mailboxes` count in turn (the first is the baseline) it:
//!
//! 1. adds mailboxes until the tenant holds that many idle ones besides the issuance mailbox,
//!    written straight to Redis as the broker writes them after a consent (mailbox record with
//!    an active token state; grant record with sealed access and refresh tokens, active, next
//!    refresh 39–51 min ahead by the broker's own [`next_refresh_at`]; an entry on the refresh
//!    schedule) — the Admin API would take the same records one round trip each;
//! 2. lets the broker run `--settle-secs` (its scheduler polls the schedule; nothing is due);
//! 3. measures cached-token `IssueAccessToken` for the issuance mailbox over the same
//!    connections ([`crate::issuance::phase`], `--inflight` calls in flight for `--seconds`);
//! 4. lets it settle again and reads the broker's RSS (`/proc/PID/status`) and Redis's
//!    `used_memory`.
//!
//! Printed: one `bench=cost mailboxes=N ...` line per count, then figures: issuance p50 and p99
//! at the last count against the first (target: flat, ≤ 1.2×), and the broker's RSS per idle
//! mailbox = (RSS_last − RSS_first) / (N_last − N_first), stated with Redis's bytes per mailbox
//! from the same run as its baseline. Only 127.0.0.1 is contacted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use time::OffsetDateTime;
use tokenfleet_broker::records::Records;
use tokenfleet_broker::tokens::backoff::unit_random;
use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, seal_field};
use tokenfleet_broker::tokens::scheduler::{next_refresh_at, schedule_refresh};
use tokenfleet_domain::{
    GrantType, MailPurpose, Mailbox, MailboxKind, Stamps, TokenState, TokenStatus,
};
use tokenfleet_seal::{Keyring, Secret};
use tokenfleet_store::Precondition;
use tokenfleet_store::redis_store::{RedisConfig, RedisStore};
use tokenfleet_testkit::redis::{RedisServer, command};

use crate::issuance::{self, BrokerProcess, Call};

/// Access-token lifetime the seeded grants were issued with.
const LIFETIME: Duration = Duration::from_secs(3600);
/// The broker's default longest interval between refreshes of a delegated grant.
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Store writes in flight while seeding.
const SEED_WORKERS: usize = 32;
/// The sealing key id this scenario configures.
const KEY_ID: &str = "k1";

#[derive(Debug, Parser)]
#[command(about = "Issuance latency and broker RSS with 1,000 and 100,000 mailboxes")]
pub struct Args {
    /// Idle mailboxes in the store at each step, ascending (the first is the baseline).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 100_000])]
    mailboxes: Vec<usize>,
    /// Issuance calls in flight.
    #[arg(long, default_value_t = 64)]
    inflight: u32,
    /// mTLS HTTP/2 connections (opened once, used at every step).
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Measured seconds of issuance per step (after one second of warm-up).
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Seconds the broker runs idle before issuance and before its RSS is read.
    #[arg(long, default_value_t = 6)]
    settle_secs: u64,
    /// The broker binary (default: `tokenfleet-broker` next to this executable).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
struct Step {
    mailboxes: usize,
    seed_secs: f64,
    issue: issuance::Figure,
    rss_kib: u64,
    redis_bytes: u64,
}

#[tokio::main]
pub async fn run(args: Args) -> Result<()> {
    if args.mailboxes.is_empty() || args.mailboxes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--mailboxes must be ascending counts");
    }
    let bin = issuance::broker_bin(args.broker_bin.as_deref())?;
    let fake = issuance::fake_idp().await?;
    let redis = RedisServer::start().await.context("redis-server")?;
    let dir = tempfile::tempdir().context("temp dir")?;
    let key = Keyring::generate_key_base64()?;
    let key_file = dir.path().join("seal.key");
    std::fs::write(&key_file, &key).context("seal.key")?;
    let toml = format!(
        "{}[seal]\ncurrent_key_id = {KEY_ID:?}\nkeys = [{{ id = {KEY_ID:?}, key_file = {:?} }}]\n",
        issuance::redis_toml(&redis),
        key_file
    );
    let mut broker = BrokerProcess::start(&bin, &toml)?;
    let mut admin = broker.admin().await?;
    let identity = issuance::provision(&broker, &mut admin, &fake).await?;
    let channels = issuance::connections(&broker, &identity, args.connections).await?;
    issuance::one_call(Call::Issue, &channels[0])
        .await
        .context("first issuance")?;
    let store = Arc::new(
        RedisStore::connect(&RedisConfig::standalone(redis.url()))
            .await
            .context("connecting to redis")?,
    );
    let keyring = Arc::new(Keyring::from_base64(KEY_ID, [(KEY_ID, key.as_str())])?);
    println!(
        "# machine: {} cpus, {}; load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        issuance::cpu_model(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let mut steps: Vec<Step> = Vec::new();
    let mut seeded = 0;
    let settle = Duration::from_secs(args.settle_secs);
    for &count in &args.mailboxes {
        let started = Instant::now();
        seed(&store, &keyring, seeded, count).await?;
        let seed_secs = started.elapsed().as_secs_f64();
        seeded = count;
        tokio::time::sleep(settle).await;
        let issue = issuance::phase(Call::Issue, &channels, args.inflight, args.seconds).await?;
        tokio::time::sleep(settle).await;
        let rss_kib = rss_kib(broker.pid).context("the broker's RSS")?;
        let redis_bytes = redis_used_memory(&redis).await?;
        let step = Step {
            mailboxes: count,
            seed_secs,
            issue,
            rss_kib,
            redis_bytes,
        };
        println!(
            "bench=cost mailboxes={count} seed_s={seed_secs:.1} inflight={} issue_rps={:.0} issue_p50_ms={} issue_p99_ms={} broker_rss_kib={rss_kib} redis_used_memory={redis_bytes}",
            args.inflight,
            issue.rps,
            issuance::ms(issue.p50),
            issuance::ms(issue.p99)
        );
        steps.push(step);
    }
    if let (Some(first), Some(last)) = (steps.first(), steps.last())
        && steps.len() > 1
    {
        figures(first, last);
    }
    drop(channels);
    drop(broker);
    drop(redis);
    Ok(())
}

fn figures(first: &Step, last: &Step) {
    let scenario = format!("cost-{}-vs-{}", last.mailboxes, first.mailboxes);
    let baseline = format!("{}-mailboxes", first.mailboxes);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (name, value, base) in [
        ("issuance_p50", ms(last.issue.p50), ms(first.issue.p50)),
        ("issuance_p99", ms(last.issue.p99), ms(first.issue.p99)),
    ] {
        crate::figure(&crate::Figure {
            scenario: &scenario,
            figure: name,
            unit: "ms",
            value,
            baseline: &baseline,
            baseline_value: base,
            target: "flat (<= 1.2x)",
            met: Some(value <= 1.2 * base),
        });
    }
    let added = (last.mailboxes - first.mailboxes) as f64;
    let rss_per = (last.rss_kib as f64 - first.rss_kib as f64) * 1024.0 / added;
    let redis_per = (last.redis_bytes as f64 - first.redis_bytes as f64) / added;
    println!(
        "bench=cost broker_rss_bytes_per_idle_mailbox={rss_per:.0} redis_bytes_per_mailbox={redis_per:.0} mailboxes_added={added:.0} seed_s={:.1}",
        last.seed_secs
    );
    crate::figure(&crate::Figure {
        scenario: &scenario,
        figure: "broker_rss_per_idle_mailbox",
        unit: "bytes",
        value: rss_per,
        baseline: "redis-bytes-per-mailbox",
        baseline_value: redis_per,
        target: "stated",
        met: None,
    });
}

/// Adds idle mailboxes `from..to` (`idle000000`, …) with active grants, as a consent leaves them.
async fn seed(
    store: &Arc<RedisStore>,
    keyring: &Arc<Keyring>,
    from: usize,
    to: usize,
) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(from));
    let now = OffsetDateTime::now_utc();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..SEED_WORKERS {
        let (store, keyring, next) = (store.clone(), keyring.clone(), next.clone());
        workers.spawn(async move {
            let records = Records::new(store.as_ref());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return anyhow::Ok(());
                }
                let name = format!("idle{i:06}");
                let due = next_refresh_at(now, LIFETIME, true, MAX_INTERVAL, unit_random());
                let token = TokenState {
                    status: TokenStatus::Active,
                    last_refresh: Some(now),
                    access_token_expires: Some(now + LIFETIME),
                    ..TokenState::default()
                };
                let mailbox = Mailbox {
                    consent_account: String::new(),
                    tenant: issuance::TENANT.into(),
                    name: name.clone(),
                    address: format!("{name}@contoso.example"),
                    provider: "m365".into(),
                    grant_type: GrantType::DelegatedAuthCode,
                    kind: MailboxKind::Bulk,
                    purposes: vec![MailPurpose::Send, MailPurpose::Pop],
                    disabled: false,
                    token: token.clone(),
                    stamps: Stamps::new(now),
                };
                records.put(&mailbox, Precondition::Absent).await?;
                // Tokens of the real size (Entra access tokens are JWTs of ~1.5–2.5 KiB, refresh
                // tokens ~1 KiB); random, never presented to anyone.
                let access = Secret::new(filler("at", i, 1800));
                let refresh = Secret::new(filler("rt", i, 1000));
                let seal = |field, value: &Secret| {
                    seal_field(&keyring, issuance::TENANT, &name, field, value)
                };
                let mut g = GrantRecord::empty(issuance::TENANT, &name);
                g.state = token;
                g.access_token = Some(seal(GrantField::AccessToken, &access)?);
                g.refresh_token = Some(seal(GrantField::RefreshToken, &refresh)?);
                g.refresh_token_obtained = Some(now);
                g.scopes = vec![
                    "https://outlook.office.com/SMTP.Send".into(),
                    "https://outlook.office.com/POP.AccessAsUser.All".into(),
                    "offline_access".into(),
                ];
                g.next_refresh = Some(due);
                records.put(&g, Precondition::Absent).await?;
                schedule_refresh(store.as_ref(), issuance::TENANT, &name, due).await?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("seed worker")??;
    }
    Ok(())
}

/// A random token-shaped string of `len` characters.
fn filler(kind: &str, i: usize, len: usize) -> String {
    let mut s = format!("bench-{kind}-{i}-");
    while s.len() < len {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(len);
    s
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Redis's `used_memory` (bytes).
async fn redis_used_memory(redis: &RedisServer) -> Result<u64> {
    let info = command(redis.port(), &["INFO", "memory"]).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no used_memory in INFO")
}
