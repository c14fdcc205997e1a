//! Benchmark of agents holding status streams at fleet scale (issue 15, target 3, and target 5's
//! "broker RSS per connected agent"). Not part of any test suite; run it by hand, in release:
//!
//! ```text
//! cargo build --release -p tokenfleet-broker -p tokenfleet-testkit --bin tokenfleet-broker --bin bench
//! ulimit -n 20000        # the bench and the brokers it starts hold one socket per agent
//! target/release/bench fleet                          # 10,000 agents; 1 broker, then 3 replicas
//! target/release/bench fleet --agents 1000 --replicas 1
//! ```
//!
//! For each `--replicas` R (default 1, then 3) it starts its own `redis-server` (test kit) and R
//! release `tokenfleet-broker serve --dev` child processes on that one Redis, each on its own
//! loopback port (replicas 2.. get copies of the first one's sealing key and dev CA, so every
//! replica's server certificate chains to the same CA). `[limits] grpc_max_connections` is
//! raised above the agent count (the default, 10,000, would refuse the 10,000th agent and the
//! operator's own connection). Through the Admin API it creates a tenant, a Microsoft provider on
//! the in-process fake identity provider, a mailbox, and for each of `--agents` N agents an
//! enrollment code and `--devices-per-agent` devices (no ingress password: the devices accept
//! their printer by source address, so setup does not spend 19 MiB of argon2 per device); each
//! agent enrolls through the real `TokenBroker.Enroll` RPC with a key pair of its own (the agent
//! library's `identity::enroll`), concurrently; the time is printed.
//!
//! Measured, per replica, from outside (`/proc/PID/status` VmRSS sampled every 2 s,
//! `/proc/PID/smaps_rollup` Pss at the end, utime+stime deltas of `/proc/PID/stat` for CPU, Redis
//! `INFO stats` total_commands_processed deltas for ops/s):
//!
//! 1. the baseline: the same brokers, after setup, with 0 agents connected (`--idle-seconds`);
//! 2. N agents connected, each on its own mTLS connection holding its `StatusStream` (agent i on
//!    replica i mod R), in steady state over `--measure-seconds` (default 70: more than two
//!    30 s heartbeats) after all are connected;
//! 3. command latency: `Admin.TestConnection` for `--commands` K agents sampled across the fleet,
//!    one after another as an operator would, through replica 0 (so with R > 1 most commands
//!    cross replicas through the store's notification channel): the time from the Admin call to
//!    the command arriving on the agent's stream;
//! 4. with R > 1: the last replica is killed (SIGKILL), and the time until every agent that was on
//!    it holds a stream again on another replica is measured; then K commands to moved agents.
//!
//! The simulated agent behaves like the real one (`agent/src/runtime/reporter.rs`): it fetches
//! `GetAgentConfig` once at start, opens `StatusStream` with a report first (configuration
//! revision, one `DeviceStatus` per device), then reports every heartbeat (from the
//! configuration); a `ReloadConfig` makes it fetch the configuration again and answer with a
//! report carrying the result; a `TestConnection` is answered with a report carrying an OK
//! result at once (no upstream is contacted: the round trip through the broker is measured).
//! When the stream fails it waits the real agent's `reconnect_delay` (0.5–1 s at first, doubling)
//! and connects to the next replica's address.
//!
//! The client is built not to be the bottleneck: one task per agent on a runtime of
//! `--client-threads` (default 2) threads, the broker CA parsed once, connections spread over
//! `--source-addresses` loopback source addresses (127.0.0.1, .2, ...) so ephemeral ports do not
//! run out; the bench's own CPU and RSS are printed next to the broker's. RLIMIT_NOFILE is not
//! raised here (no libc dependency for one call): the bench reads its soft limit from
//! `/proc/self/limits` and refuses to start when it is below what the run needs, naming
//! `ulimit -n`; the brokers inherit it.
//!
//! Printed: `bench=fleet ...` detail lines, and `figure` lines (scenario `fleet-rR`): RSS and CPU
//! per replica against the idle broker of the same run (target: ≤ 512 MiB, < 25% of a core),
//! RSS per connected agent (target 5: stated), command latency p99 (ceiling 1 s) and the
//! failover time (ceiling 10 s). With `--perf-pause SECS` it prints the brokers' pids and waits
//! before the measured window (to attach `perf record -g -p PID`). Only loopback is contacted.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokenfleet_agent::identity::EnrollmentCode;

use crate::issuance::BrokerProcess;
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_testkit::broker::TestAdminClient;
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokenfleet_testkit::redis::RedisServer;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const TENANT: &str = "fleet";
const MAILBOX: &str = "scan";
const ADDRESS: &str = "scan@contoso.example";
const CLIENT_ID: &str = "bench-fleet-app";
const CLIENT_SECRET: &str = "bench-fleet-client-secret";
/// Target ceilings of issue 15, target 3.
const RSS_CEILING_MIB: f64 = 512.0;
const CPU_CEILING_PCT: f64 = 25.0;
const COMMAND_CEILING_S: f64 = 1.0;
const FAILOVER_CEILING_S: f64 = 10.0;

#[derive(Debug, Parser)]
#[command(
    about = "Agents holding status streams at fleet scale: broker RSS, CPU, command push, failover"
)]
pub struct Args {
    /// Agents, each with its own identity, certificate and mTLS connection.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Devices hosted by each agent (one `DeviceStatus` each in every report).
    #[arg(long, default_value_t = 1)]
    devices_per_agent: usize,
    /// Broker replicas on one Redis (repeat or comma-separate for several runs).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 3])]
    replicas: Vec<usize>,
    /// Seconds between reports (the broker's `[agents] heartbeat_seconds`).
    #[arg(long, default_value_t = 30)]
    heartbeat: u32,
    /// Measured seconds of the idle baseline (0 agents connected).
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// Measured seconds in steady state with every agent connected.
    #[arg(long, default_value_t = 70)]
    measure_seconds: u64,
    /// Commands (connection tests) whose delivery time is measured.
    #[arg(long, default_value_t = 100)]
    commands: usize,
    /// Loopback source addresses the agents' connections are spread over (127.0.0.1, .2, ...).
    #[arg(long, default_value_t = 4)]
    source_addresses: u8,
    /// Enrollments in flight during setup.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// Connections being opened at once while the agents connect.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Worker threads of the bench's runtime (every agent task runs on them).
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// The broker binary (default: `tokenfleet-broker` next to this executable).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// Print the brokers' pids and wait this many seconds before the measured window.
    #[arg(long, default_value_t = 0)]
    perf_pause: u64,
}

// ---------------------------------------------------------------------------------------------
// Broker processes

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let path = if key == "Pss:" {
        format!("/proc/{pid}/smaps_rollup")
    } else {
        format!("/proc/{pid}/status")
    };
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn redis_commands(port: u16) -> Result<u64> {
    let info = tokenfleet_testkit::redis::command(port, &["INFO", "stats"]).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO stats without total_commands_processed")
}

fn open_files_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// What one process used over a window.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_mean_mib: f64,
    rss_max_mib: f64,
    pss_mib: f64,
    cpu_pct: f64,
}

/// Samples `pids` (and this process) for `seconds`; also Redis ops/s over the window.
async fn measure(pids: &[u32], redis_port: u16, seconds: u64) -> Result<(Vec<Usage>, Usage, f64)> {
    let own = std::process::id();
    let all: Vec<u32> = pids.iter().copied().chain([own]).collect();
    let ticks0: Vec<u64> = all
        .iter()
        .map(|&p| crate::cpu_ticks(p).unwrap_or(0))
        .collect();
    let ops0 = redis_commands(redis_port).await?;
    let started = Instant::now();
    let mut sums = vec![0u64; all.len()];
    let mut maxes = vec![0u64; all.len()];
    let mut samples = 0u64;
    let end = started + Duration::from_secs(seconds.max(1));
    while Instant::now() < end {
        for (i, &p) in all.iter().enumerate() {
            let rss = status_kib(p, "VmRSS:").unwrap_or(0);
            sums[i] += rss;
            maxes[i] = maxes[i].max(rss);
        }
        samples += 1;
        tokio::time::sleep(
            Duration::from_secs(2).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ops1 = redis_commands(redis_port).await?;
    let hz = crate::clock_ticks();
    let mut usages: Vec<Usage> = all
        .iter()
        .enumerate()
        .map(|(i, &p)| Usage {
            rss_mean_mib: sums[i] as f64 / samples.max(1) as f64 / 1024.0,
            rss_max_mib: maxes[i] as f64 / 1024.0,
            pss_mib: status_kib(p, "Pss:").unwrap_or(0) as f64 / 1024.0,
            cpu_pct: (crate::cpu_ticks(p).unwrap_or(0).saturating_sub(ticks0[i])) as f64
                / hz
                / elapsed
                * 100.0,
        })
        .collect();
    let bench = usages.pop().unwrap_or_default();
    Ok((usages, bench, (ops1 - ops0) as f64 / elapsed))
}

// ---------------------------------------------------------------------------------------------
// The simulated agents

/// One enrolled agent and what the bench observes of it.
struct Agent {
    name: String,
    devices: Vec<String>,
    tls: ClientTlsConfig,
    /// Replica whose stream it holds, `usize::MAX` while it holds none.
    replica: AtomicUsize,
    /// Since when it holds its current stream (nanoseconds since [`Shared::epoch`]).
    opened_at: AtomicU64,
    /// When the last connection test arrived (nanoseconds since [`Shared::epoch`], 0 = none).
    test_arrived: AtomicU64,
    /// Streams opened in total.
    streams: AtomicU64,
}

struct Shared {
    urls: Vec<String>,
    agents: Vec<Agent>,
    epoch: Instant,
    heartbeat: Duration,
    sources: u8,
    /// Limits the connections being opened at once.
    opening: Semaphore,
    reloads: AtomicU64,
    failures: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Why held streams ended, with how often.
    breaks: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn holding(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.replica.load(Ordering::Relaxed) != usize::MAX)
            .count()
    }

    fn holding_on(&self, replica: usize) -> usize {
        self.agents
            .iter()
            .filter(|a| a.replica.load(Ordering::Relaxed) == replica)
            .count()
    }

    fn note_break(&self, why: String) {
        let why: String = why.chars().take(100).collect();
        *self
            .breaks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(why)
            .or_default() += 1;
    }

    fn breaks(&self) -> String {
        let breaks = self
            .breaks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        breaks
            .iter()
            .map(|(why, n)| format!("{n}x {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn note_error(&self, error: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(error);
    }
}

fn report(
    agent: &Agent,
    revision: &str,
    sequence: &mut u64,
    result: Option<pb::CommandResult>,
) -> pb::AgentReport {
    *sequence += 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pb::AgentReport {
        time: Some(prost_types::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(0),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
        }),
        software_version: "bench-fleet".into(),
        sequence: *sequence,
        config_revision: revision.to_owned(),
        devices: agent
            .devices
            .iter()
            .map(|d| pb::DeviceStatus {
                device: d.clone(),
                health: pb::DeviceHealth::Ok as i32,
                ..Default::default()
            })
            .collect(),
        command_result: result,
    }
}

/// How one stream ended.
enum Ended {
    /// Never opened (connect, config or StatusStream failed).
    NotOpened(String),
    /// Opened, then broken or closed (by the broker, or the broker went away): why.
    Broken(String),
    Stopped,
}

/// The agent's life: connect, hold the stream, reconnect to the next address when it fails.
async fn agent_loop(shared: Arc<Shared>, index: usize, mut stop: watch::Receiver<bool>) {
    let agent = &shared.agents[index];
    let mut replica = index % shared.urls.len();
    let mut revision = String::new();
    let mut sequence = 0u64;
    let mut failures = 0u32;
    loop {
        let ended = session(
            &shared,
            index,
            replica,
            &mut revision,
            &mut sequence,
            &mut stop,
        )
        .await;
        agent.replica.store(usize::MAX, Ordering::Relaxed);
        match ended {
            Ended::Stopped => return,
            Ended::Broken(why) => {
                failures = 0;
                shared.note_break(why);
            }
            Ended::NotOpened(error) => shared.note_error(format!("{}: {error}", agent.name)),
        }
        let wait = tokenfleet_agent::runtime::reporter::reconnect_delay(failures);
        failures = failures.saturating_add(1);
        replica = (replica + 1) % shared.urls.len();
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn session(
    shared: &Shared,
    index: usize,
    replica: usize,
    revision: &mut String,
    sequence: &mut u64,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let agent = &shared.agents[index];
    let opening = shared.opening.acquire().await;
    let source = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + u8::try_from(index % usize::from(shared.sources.max(1))).unwrap_or(0),
    ));
    let endpoint = match Endpoint::from_shared(shared.urls[replica].clone())
        .and_then(|e| e.tls_config(agent.tls.clone()))
    {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(10))
            .local_address(Some(source)),
        Err(e) => return Ended::NotOpened(e.to_string()),
    };
    let channel = tokio::select! {
        _ = stop.changed() => return Ended::Stopped,
        c = endpoint.connect() => match c {
            Ok(c) => c,
            Err(e) => return Ended::NotOpened(format!("connect: {e:?}")),
        },
    };
    let mut client = TokenBrokerClient::new(channel);
    if revision.is_empty() {
        match client
            .get_agent_config(pb::GetAgentConfigRequest::default())
            .await
        {
            Ok(config) => *revision = config.into_inner().revision,
            Err(e) => return Ended::NotOpened(format!("GetAgentConfig: {}", e.message())),
        }
    }
    let (tx, rx) = mpsc::channel::<pb::AgentReport>(16);
    let _ = tx.send(report(agent, revision, sequence, None)).await;
    let mut commands = match client.status_stream(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => return Ended::NotOpened(format!("StatusStream: {}", e.message())),
    };
    drop(opening);
    agent.opened_at.store(shared.now_ns(), Ordering::Relaxed);
    agent.streams.fetch_add(1, Ordering::Relaxed);
    agent.replica.store(replica, Ordering::Relaxed);
    let mut next = tokio::time::Instant::now() + shared.heartbeat;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ended::Stopped,
            () = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + shared.heartbeat;
                if tx.send(report(agent, revision, sequence, None)).await.is_err() {
                    return Ended::Broken("report channel closed".into());
                }
            }
            message = commands.message() => match message {
                Ok(Some(command)) => {
                    let result = match command.command {
                        Some(pb::agent_command::Command::TestConnection(test)) => {
                            agent.test_arrived.store(shared.now_ns(), Ordering::Relaxed);
                            pb::CommandResult {
                                command_id: command.id,
                                ok: true,
                                detail: String::new(),
                                connection_test: Some(pb::ConnectionTestResult {
                                    device: test.device,
                                    target: test.target,
                                    verdict: pb::ConnectionVerdict::Ok as i32,
                                    summary: "bench: not contacted".into(),
                                    ..Default::default()
                                }),
                            }
                        }
                        Some(pb::agent_command::Command::ReloadConfig(_)) => {
                            shared.reloads.fetch_add(1, Ordering::Relaxed);
                            let fetched = client
                                .get_agent_config(pb::GetAgentConfigRequest::default())
                                .await;
                            let ok = match fetched {
                                Ok(config) => {
                                    *revision = config.into_inner().revision;
                                    true
                                }
                                Err(_) => false,
                            };
                            pb::CommandResult { command_id: command.id, ok, ..Default::default() }
                        }
                        _ => pb::CommandResult {
                            command_id: command.id,
                            ok: true,
                            ..Default::default()
                        },
                    };
                    if tx.send(report(agent, revision, sequence, Some(result))).await.is_err() {
                        return Ended::Broken("report channel closed".into());
                    }
                }
                Ok(None) => return Ended::Broken("closed by the broker".into()),
                Err(status) => {
                    return Ended::Broken(format!("{:?}: {}", status.code(), status.message()));
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Setup

async fn provision_tenant(admin: &mut TestAdminClient, fake: &FakeIdp) -> Result<()> {
    crate::issuance::tenant_with_mailbox(
        admin,
        fake,
        TENANT,
        "Fleet bench",
        CLIENT_ID,
        CLIENT_SECRET,
    )
    .await
}

/// Agent record (enrollment code), devices, and enrollment of agent `name` through `url`.
async fn provision_agent(
    mut admin: TestAdminClient,
    url: String,
    ca_pem: String,
    dir: PathBuf,
    name: String,
    devices: Vec<String>,
) -> Result<(String, String)> {
    let code = admin
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            tenant: TENANT.into(),
            agent: name.clone(),
            display_name: String::new(),
            ttl_seconds: 3600,
            re_enroll: false,
        })
        .await
        .with_context(|| format!("enrollment code for {name}"))?
        .into_inner()
        .code;
    for device in &devices {
        admin
            .create_device(pb::CreateDeviceRequest {
                device: Some(pb::Device {
                    tenant: TENANT.into(),
                    name: device.clone(),
                    agent: name.clone(),
                    sender_mode: pb::SenderMode::FixedAdmin as i32,
                    admin_mailbox: MAILBOX.into(),
                    ingress: Some(pb::IngressCredentials {
                        allowed_sources: vec!["192.168.1.20/32".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
            .await
            .with_context(|| format!("device {device}"))?;
    }
    let identity = tokenfleet_agent::identity::enroll(
        &url,
        &EnrollmentCode::new(&code),
        Some(ca_pem),
        &dir.join(&name),
        "bench-fleet",
    )
    .await
    .map_err(|e| anyhow::anyhow!("enroll {name}: {e}"))?;
    Ok((identity.cert_pem, identity.key_pem.as_str().to_owned()))
}

// ---------------------------------------------------------------------------------------------
// The run

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Connection tests for `agents` through `admin`, one after another; delivery times in seconds.
async fn command_latencies(
    shared: &Shared,
    admin: &mut TestAdminClient,
    agents: &[usize],
) -> Vec<f64> {
    let mut latencies = Vec::new();
    for &i in agents {
        let agent = &shared.agents[i];
        agent.test_arrived.store(0, Ordering::Relaxed);
        let sent = shared.now_ns();
        let answer = admin
            .test_connection(pb::TestConnectionRequest {
                tenant: TENANT.into(),
                device: agent.devices[0].clone(),
                target: pb::ConnectionTarget::Send as i32,
                timeout_seconds: 10,
            })
            .await;
        let arrived = agent.test_arrived.load(Ordering::Relaxed);
        let delivered =
            matches!(&answer, Ok(a) if a.get_ref().verdict == pb::ConnectionVerdict::Ok as i32);
        if arrived == 0 || !delivered {
            // Not delivered: counts as never (the percentiles show it).
            let why = match answer {
                Ok(a) => a.into_inner().summary,
                Err(status) => status.message().to_owned(),
            };
            println!(
                "# the connection test of {} did not reach it: {why}",
                agent.name
            );
            latencies.push(f64::INFINITY);
            continue;
        }
        latencies.push(arrived.saturating_sub(sent) as f64 / 1e9);
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn print_latencies(scenario: &str, replicas: usize, what: &str, latencies: &[f64]) {
    println!(
        "bench=fleet replicas={replicas} {what}_commands={} undelivered={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        latencies.len(),
        latencies.iter().filter(|l| l.is_infinite()).count(),
        pct(latencies, 50.0) * 1000.0,
        pct(latencies, 99.0) * 1000.0,
        latencies.last().copied().unwrap_or(f64::NAN) * 1000.0
    );
    crate::figure(&crate::Figure {
        scenario,
        figure: &format!("{what}-command-p99"),
        unit: "ms",
        value: pct(latencies, 99.0) * 1000.0,
        baseline: "ceiling",
        baseline_value: COMMAND_CEILING_S * 1000.0,
        target: "< 1 s",
        met: Some(pct(latencies, 99.0) < COMMAND_CEILING_S),
    });
}

async fn run_replicas(args: &Args, bin: &Path, fake: &FakeIdp, replicas: usize) -> Result<()> {
    let scenario = format!("fleet-r{replicas}");
    let n = args.agents;
    let redis = RedisServer::start().await.context("redis-server")?;
    // The default of 10,000 connections would refuse the last agent.
    let sections = format!(
        "[agents]\nheartbeat_seconds = {}\n[limits]\ngrpc_max_connections = {}\n[admin]\ncall_rate_per_minute = 0\n{}",
        args.heartbeat,
        args.agents + 1000,
        crate::issuance::redis_toml(&redis)
    );
    let mut brokers = vec![BrokerProcess::start_with(bin, &sections, None)?];
    let mut admins = vec![brokers[0].admin().await?];
    for _ in 1..replicas {
        let seed = brokers[0].data_dir();
        let mut broker = BrokerProcess::start_with(bin, &sections, Some(&seed))?;
        admins.push(broker.admin().await?);
        brokers.push(broker);
    }
    let ca_pem = std::fs::read_to_string(brokers[0].data_dir().join("dev-ca.pem"))?;
    let urls: Vec<String> = brokers.iter().map(|b| b.grpc.clone()).collect();
    println!(
        "bench=fleet replicas={replicas} agents={n} devices_per_agent={} heartbeat_s={} broker_pids={}",
        args.devices_per_agent,
        args.heartbeat,
        brokers
            .iter()
            .map(|b| b.pid.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );

    // Setup: tenant, then agents concurrently (agent i enrolls through replica i mod R).
    provision_tenant(&mut admins[0], fake).await?;
    let setup_started = Instant::now();
    let identities_dir = tempfile::tempdir()?;
    let names: Vec<String> = (0..n).map(|i| format!("a{i:05}")).collect();
    let mut identities: Vec<Option<(String, String)>> = vec![None; n];
    let limit = Arc::new(Semaphore::new(args.enroll_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let permit = limit.clone().acquire_owned().await?;
        let devices = (0..args.devices_per_agent)
            .map(|d| format!("{name}-d{d}"))
            .collect();
        let fut = provision_agent(
            admins[i % replicas].clone(),
            urls[i % replicas].clone(),
            ca_pem.clone(),
            identities_dir.path().to_path_buf(),
            name.clone(),
            devices,
        );
        tasks.spawn(async move {
            let r = fut.await;
            drop(permit);
            (i, r)
        });
        while let Some(done) = tasks.try_join_next() {
            let (i, r) = done?;
            identities[i] = Some(r?);
        }
        if (i + 1) % 2000 == 0 {
            println!(
                "# enrolled {} agents in {:.0} s",
                i + 1,
                setup_started.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (i, r) = done?;
        identities[i] = Some(r?);
    }
    let setup = setup_started.elapsed().as_secs_f64();
    println!(
        "bench=fleet replicas={replicas} setup_agents={n} setup_s={setup:.1} enrolled_per_s={:.0} (enrollment code, {} device(s) and Enroll per agent, {} in flight)",
        n as f64 / setup,
        args.devices_per_agent,
        args.enroll_concurrency
    );

    let ca = Certificate::from_pem(&ca_pem);
    let base_tls = ClientTlsConfig::new()
        .ca_certificate(ca)
        .domain_name("localhost");
    let agents: Vec<Agent> = names
        .iter()
        .zip(identities)
        .map(|(name, id)| {
            let (cert, key) = id.unwrap_or_default();
            Agent {
                name: name.clone(),
                devices: (0..args.devices_per_agent)
                    .map(|d| format!("{name}-d{d}"))
                    .collect(),
                tls: base_tls.clone().identity(Identity::from_pem(cert, key)),
                replica: AtomicUsize::new(usize::MAX),
                opened_at: AtomicU64::new(0),
                test_arrived: AtomicU64::new(0),
                streams: AtomicU64::new(0),
            }
        })
        .collect();

    // Baseline: the same brokers with no agent connected.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pids: Vec<u32> = brokers.iter().map(|b| b.pid).collect();
    let (idle, _, idle_ops) = measure(&pids, redis.port(), args.idle_seconds).await?;
    for (r, u) in idle.iter().enumerate() {
        println!(
            "bench=fleet replicas={replicas} replica={r} phase=idle agents=0 rss_mib={:.1} rss_max_mib={:.1} pss_mib={:.1} cpu_pct={:.2}",
            u.rss_mean_mib, u.rss_max_mib, u.pss_mib, u.cpu_pct
        );
    }
    println!("bench=fleet replicas={replicas} phase=idle redis_ops_per_s={idle_ops:.0}");

    // Connect every agent.
    let shared = Arc::new(Shared {
        urls: urls.clone(),
        agents,
        epoch: Instant::now(),
        heartbeat: Duration::from_secs(u64::from(args.heartbeat)),
        sources: args.source_addresses,
        opening: Semaphore::new(args.connect_concurrency.max(1)),
        reloads: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        first_error: Mutex::new(None),
        breaks: Mutex::new(std::collections::BTreeMap::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_started = Instant::now();
    let mut agent_tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        agent_tasks.spawn(agent_loop(shared.clone(), i, stop_rx.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let holding = shared.holding();
        if holding == n {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{holding} of {n} agents hold a stream after 600 s; first error: {:?}",
                shared
                    .first_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect = connect_started.elapsed().as_secs_f64();
    println!(
        "bench=fleet replicas={replicas} connected={n} connect_s={connect:.1} failed_attempts={} first_error={:?}",
        shared.failures.load(Ordering::Relaxed),
        shared
            .first_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
            .unwrap_or_default()
    );

    // Steady state: a few seconds for the connect burst's reports to settle, then the window.
    tokio::time::sleep(Duration::from_secs(5)).await;
    if args.perf_pause > 0 {
        println!("# broker pids {pids:?}: attach perf now");
        tokio::time::sleep(Duration::from_secs(args.perf_pause)).await;
    }
    let streams_before: u64 = shared
        .agents
        .iter()
        .map(|a| a.streams.load(Ordering::Relaxed))
        .sum();
    let (busy, bench_usage, busy_ops) = measure(&pids, redis.port(), args.measure_seconds).await?;
    let streams_after: u64 = shared
        .agents
        .iter()
        .map(|a| a.streams.load(Ordering::Relaxed))
        .sum();
    for (r, (u, i)) in busy.iter().zip(&idle).enumerate() {
        let held = shared.holding_on(r);
        let per_agent_kib = (u.rss_mean_mib - i.rss_mean_mib) * 1024.0 / held.max(1) as f64;
        println!(
            "bench=fleet replicas={replicas} replica={r} phase=steady agents={held} rss_mib={:.1} rss_max_mib={:.1} pss_mib={:.1} cpu_pct={:.2} idle_rss_mib={:.1} idle_cpu_pct={:.2} rss_per_agent_kib={per_agent_kib:.1}",
            u.rss_mean_mib, u.rss_max_mib, u.pss_mib, u.cpu_pct, i.rss_mean_mib, i.cpu_pct
        );
        let suffix = if replicas == 1 {
            String::new()
        } else {
            format!("-replica{r}")
        };
        crate::figure(&crate::Figure {
            scenario: &scenario,
            figure: &format!("rss{suffix}"),
            unit: "MiB",
            value: u.rss_max_mib,
            baseline: "idle-broker",
            baseline_value: i.rss_mean_mib,
            target: "<= 512 MiB",
            met: Some(u.rss_max_mib <= RSS_CEILING_MIB),
        });
        crate::figure(&crate::Figure {
            scenario: &scenario,
            figure: &format!("cpu{suffix}"),
            unit: "%core",
            value: u.cpu_pct,
            baseline: "idle-broker",
            baseline_value: i.cpu_pct,
            target: "< 25% of a core",
            met: Some(u.cpu_pct < CPU_CEILING_PCT),
        });
        crate::figure(&crate::Figure {
            scenario: &scenario,
            figure: &format!("rss-per-agent{suffix}"),
            unit: "KiB",
            value: per_agent_kib,
            baseline: "ceiling",
            baseline_value: RSS_CEILING_MIB * 1024.0 / held.max(1) as f64,
            target: "stated (target 5)",
            met: None,
        });
    }
    println!(
        "bench=fleet replicas={replicas} phase=steady streams_broken={:?}",
        shared.breaks()
    );
    println!(
        "bench=fleet replicas={replicas} phase=steady redis_ops_per_s={busy_ops:.0} idle_redis_ops_per_s={idle_ops:.0} redis_ops_per_agent_s={:.3} reconnects_in_window={} reloads={} bench_cpu_pct={:.1} bench_rss_mib={:.0}",
        (busy_ops - idle_ops) / n as f64,
        streams_after - streams_before,
        shared.reloads.load(Ordering::Relaxed),
        bench_usage.cpu_pct,
        bench_usage.rss_max_mib
    );

    for (r, broker) in brokers.iter().enumerate() {
        let log =
            std::fs::read_to_string(broker.state.path().join("broker.log")).unwrap_or_default();
        let warnings = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count();
        println!(
            "# replica {r}: {warnings} warning/error lines in its log; last lines:\n{}",
            broker.log_tail()
        );
    }
    // Command push: K agents sampled across the fleet, through replica 0.
    let k = args.commands.min(n).max(1);
    let sample: Vec<usize> = (0..k).map(|j| j * n / k).collect();
    let latencies = command_latencies(&shared, &mut admins[0], &sample).await;
    print_latencies(&scenario, replicas, "steady", &latencies);

    if replicas > 1 {
        let victim = replicas - 1;
        let moved: Vec<usize> = (0..n)
            .filter(|&i| shared.agents[i].replica.load(Ordering::Relaxed) == victim)
            .collect();
        let killed_at = shared.now_ns();
        brokers[victim].kill();
        let deadline = Instant::now() + Duration::from_secs(120);
        let back = loop {
            let back = moved
                .iter()
                .filter(|&&i| {
                    let a = &shared.agents[i];
                    let r = a.replica.load(Ordering::Relaxed);
                    r != usize::MAX
                        && r != victim
                        && a.opened_at.load(Ordering::Relaxed) > killed_at
                })
                .count();
            if back == moved.len() || Instant::now() > deadline {
                break back;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut times: Vec<f64> = moved
            .iter()
            .map(|&i| {
                shared.agents[i]
                    .opened_at
                    .load(Ordering::Relaxed)
                    .saturating_sub(killed_at) as f64
                    / 1e9
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let all_back = times.last().copied().unwrap_or(f64::NAN);
        println!(
            "bench=fleet replicas={replicas} failover_killed=replica{victim} agents_on_it={} back={back} p50_s={:.2} p99_s={:.2} all_back_s={all_back:.2} per_survivor={}",
            moved.len(),
            pct(&times, 50.0),
            pct(&times, 99.0),
            (0..replicas)
                .filter(|&r| r != victim)
                .map(|r| shared.holding_on(r).to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        crate::figure(&crate::Figure {
            scenario: &scenario,
            figure: "failover-all-back",
            unit: "s",
            value: all_back,
            baseline: "ceiling",
            baseline_value: FAILOVER_CEILING_S,
            target: "<= 10 s",
            met: Some(back == moved.len() && all_back <= FAILOVER_CEILING_S),
        });
        if back < moved.len() {
            bail!(
                "{} of {} agents of the killed replica came back within 120 s",
                back,
                moved.len()
            );
        }
        let k = k.min(moved.len());
        let sample: Vec<usize> = (0..k).map(|j| moved[j * moved.len() / k]).collect();
        let latencies = command_latencies(&shared, &mut admins[0], &sample).await;
        print_latencies(&scenario, replicas, "moved", &latencies);
    }

    let _ = stop_tx.send(true);
    while agent_tasks.join_next().await.is_some() {}
    drop(admins);
    drop(brokers);
    drop(redis);
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    let bin = match &args.broker_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable directory")?
            .join("tokenfleet-broker"),
    };
    if !bin.is_file() {
        bail!(
            "{} missing: cargo build --release -p tokenfleet-broker --bin tokenfleet-broker",
            bin.display()
        );
    }
    // One socket per agent here and in the brokers (which inherit the limit), plus the rest.
    let needed = args.agents as u64 + 1024;
    match open_files_limit() {
        Some(limit) if limit < needed => bail!(
            "open files limit {limit} is below the {needed} this run needs: `ulimit -n {needed}` (or higher) first"
        ),
        limit => println!("# open files limit: {limit:?} (needed {needed})"),
    }
    let fake = FakeIdp::start().await.context("fake IdP")?;
    fake.register_client({
        let mut spec = ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET);
        spec.app_only_mailbox = Some(ADDRESS.into());
        spec
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "bench=fleet machine_cpus={} loadavg=\"{}\"",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    for &replicas in &args.replicas {
        if replicas == 0 {
            bail!("--replicas: at least 1");
        }
        run_replicas(&args, &bin, &fake, replicas).await?;
    }
    Ok(())
}
