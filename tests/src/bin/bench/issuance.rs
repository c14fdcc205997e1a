//! Benchmark of cached-token issuance over mTLS against the transport's own floor (issue 15,
//! target 1). Not part of any test suite; run it by hand:
//!
//! ```text
//! cargo build --release -p tokenfleet-broker --bin tokenfleet-broker   # the broker it starts
//! cargo run --release -p tokenfleet-testkit --bin bench -- issuance
//! cargo run --release -p tokenfleet-testkit --bin bench -- issuance --store redis --inflight 64
//! cargo run --release -p tokenfleet-testkit --bin bench -- issuance --broker-bin /path/to/tokenfleet-broker
//! ```
//!
//! For each store (`--store embedded`, `redis` or `both`, the default) it starts the release
//! `tokenfleet-broker serve --dev` as a child process on loopback ports (TLS on the gRPC
//! listener with the dev CA; Redis: its own `redis-server` from the test kit on a free port),
//! with the per-agent issue rate limit off (`issue_rate_per_minute = 0`: the bucket would
//! otherwise be what is measured). Through the Admin API it creates a tenant, a Microsoft
//! provider pointing at the in-process fake identity provider, an app-only mailbox whose consent
//! it completes (so the broker holds a cached access token), a device hosted by an agent, and
//! an enrollment code; the agent is enrolled with the agent library (key pair and CSR here, the
//! certificate from the broker).
//!
//! Then, for each `--inflight` N (default 64 and 256), over `--connections` mTLS HTTP/2
//! connections opened once with the agent's certificate (the same connections for both
//! phases), N tasks each call in a loop for `--seconds`, after a warm-up:
//!
//! 1. `grpc.health.v1.Health/Check` (the baseline: TLS, HTTP/2 and gRPC framing, no work);
//! 2. `tokenfleet.v1.TokenBroker/IssueAccessToken` for the device's mailbox (cached token).
//!
//! The two phases alternate `--rounds` times (health, issue, health, issue, ...) and each
//! figure is over all rounds of its phase (calls over measured time; percentiles of every
//! measured latency): a virtual machine whose speed drifts over a minute slows both alike,
//! where one phase each compared whichever half of the minute was faster. Every issuance must
//! succeed; a failed call aborts the run. Printed, one line per figure:
//!
//! ```text
//! bench=issuance store=embedded inflight=64 round=1 ratio_rps=..
//! bench=issuance store=embedded inflight=64 impl=health rps=.. p50_ms=.. p99_ms=..
//! bench=issuance store=embedded inflight=64 impl=issue rps=.. p50_ms=.. p99_ms=..
//! bench=issuance store=embedded inflight=64 ratio_rps=.. ratio_p99=..
//! ```
//!
//! and, after the runs, `audit_records=..` per store: the `token.issue` audit records the broker
//! holds against the issuances answered (each answered issuance must have its record). With
//! `--perf-pause SECS` it prints the broker's pid and waits that long before each issuance phase
//! so `perf record -g -p PID` can be attached. Only 127.0.0.1 is contacted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use tokenfleet_agent::identity::{EnrollmentCode, StoredIdentity};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::admin_client::AdminClient;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_seal::Secret;
use tokenfleet_testkit::agent_site::microsoft_provider;
use tokenfleet_testkit::broker::{BearerAuth, TestAdminClient};
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokenfleet_testkit::redis::RedisServer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub(crate) const TENANT: &str = "bench";
const AGENT: &str = "site1";
const DEVICE: &str = "mfp";
pub(crate) const MAILBOX: &str = "scan";
pub(crate) const ADDRESS: &str = "scan@contoso.example";
const ENTRA: &str = "contoso-tenant";
pub(crate) const CLIENT_ID: &str = "bench-issuance-app";
pub(crate) const CLIENT_SECRET: &str = "bench-issuance-client-secret";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreArg {
    Embedded,
    Redis,
    Both,
}

#[derive(Debug, Parser)]
#[command(
    about = "Cached-token IssueAccessToken over mTLS against Health/Check on the same connections"
)]
pub struct Args {
    /// Which store the broker runs on.
    #[arg(long, value_enum, default_value_t = StoreArg::Both)]
    store: StoreArg,
    /// Requests in flight (repeat the flag for several runs).
    #[arg(long, default_values_t = [64u32, 256])]
    inflight: Vec<u32>,
    /// mTLS HTTP/2 connections the requests are spread over (opened once, used by both phases).
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Measured seconds per phase and round (after one second of warm-up).
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// How many times the health and the issuance phases alternate.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// The broker binary (default: `tokenfleet-broker` next to this executable).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// Print the broker's pid and wait this many seconds before each issuance phase (to attach
    /// `perf record -g -p PID`).
    #[arg(long, default_value_t = 0)]
    perf_pause: u64,
}

/// A release broker child process (`serve --dev` on free loopback ports), shared by every
/// scenario that starts one; killed on drop.
pub(crate) struct BrokerProcess {
    child: Option<Child>,
    pub(crate) pid: u32,
    pub(crate) grpc: String,
    pub(crate) state: tempfile::TempDir,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl BrokerProcess {
    /// The issuance scenarios' broker: issue rate limit off and room for every issuance's audit
    /// record; `store_toml` (the `[store]` section) is appended.
    pub(crate) fn start(bin: &Path, store_toml: &str) -> Result<Self> {
        Self::start_with(
            bin,
            &format!(
                "[agents]\nissue_rate_per_minute = 0\n[audit]\nissuance_max_entries = 10000000\n{store_toml}"
            ),
            None,
        )
    }

    /// Starts `bin serve --dev` with `sections` (TOML tables: the store and whatever a scenario
    /// sets) after the listeners; `seed` (another replica's data directory) gives this one the
    /// same sealing key, dev CA and admin key.
    pub(crate) fn start_with(bin: &Path, sections: &str, seed: Option<&Path>) -> Result<Self> {
        let state = tempfile::tempdir().context("temp dir")?;
        let data = state.path().join("data");
        if let Some(seed) = seed {
            std::fs::create_dir(&data).context("data dir")?;
            std::fs::set_permissions(
                &data,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
            )?;
            for file in ["seal.key", "dev-ca.pem", "dev-ca.key", "admin.key"] {
                std::fs::copy(seed.join(file), data.join(file))
                    .with_context(|| format!("copying {file}"))?;
            }
        }
        let [grpc, http] = tokenfleet_testkit::ports::free_ports::<2>()?;
        let config = format!(
            "state_dir = {data:?}\n[grpc]\nlisten = \"127.0.0.1:{grpc}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             public_url = \"http://127.0.0.1:{http}\"\n[log]\nlevel = \"warn\"\n{sections}"
        );
        let config_path = state.path().join("broker.toml");
        std::fs::write(&config_path, config).context("broker.toml")?;
        let log = std::fs::File::create(state.path().join("broker.log")).context("broker.log")?;
        let mut command = Command::new(bin);
        // The broker reads every `TOKENFLEET_*` variable as configuration and refuses the ones
        // it does not know; the bench's own (`TOKENFLEET_TEST_AGENT_BINARY`, ...) are not its.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TOKENFLEET_") {
                command.env_remove(name);
            }
        }
        let child = command
            .arg("--config")
            .arg(&config_path)
            .args(["serve", "--dev"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            pid: child.id(),
            child: Some(child),
            grpc: format!("https://127.0.0.1:{grpc}"),
            state,
        })
    }

    /// Kills the broker with SIGKILL (no chance to clean up) and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.state.path().join("data")
    }

    pub(crate) fn data(&self, file: &str) -> PathBuf {
        self.data_dir().join(file)
    }

    pub(crate) fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.state.path().join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub(crate) fn ca_pem(&self) -> Result<String> {
        std::fs::read_to_string(self.data("dev-ca.pem")).context("dev-ca.pem")
    }

    /// Waits until the admin key exists and the broker answers an Admin call with it.
    pub(crate) async fn admin(&mut self) -> Result<TestAdminClient> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("broker exited ({status}):\n{}", self.log_tail());
            }
            if let (Ok(key), Ok(ca)) = (
                std::fs::read_to_string(self.data("admin.key")),
                self.ca_pem(),
            ) {
                let channel = tls_endpoint(
                    &self.grpc,
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca)),
                )?
                .connect()
                .await;
                if let Ok(channel) = channel {
                    let key = Secret::new(key.trim().to_owned());
                    let mut admin = AdminClient::with_interceptor(channel, BearerAuth::new(&key));
                    if admin
                        .list_tenants(pb::ListTenantsRequest::default())
                        .await
                        .is_ok()
                    {
                        return Ok(admin);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("broker not ready within 60 s:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn tls_endpoint(url: &str, tls: ClientTlsConfig) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .tls_config(tls.domain_name("localhost"))?
        .connect_timeout(Duration::from_secs(5)))
}

/// The tenant `tenant` with a Microsoft provider `m365` (app `client_id`) at the fake identity
/// provider and the app-only mailbox `scan` (`MAILBOX`, `ADDRESS`) that sends through it.
pub(crate) async fn tenant_with_mailbox(
    admin: &mut TestAdminClient,
    fake: &FakeIdp,
    tenant: &str,
    display_name: &str,
    client_id: &str,
    client_secret: &str,
) -> Result<()> {
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: tenant.into(),
                display_name: display_name.into(),
                ..Default::default()
            }),
        })
        .await
        .context("create tenant")?;
    microsoft_provider(admin, fake, tenant, "m365", ENTRA, client_id, client_secret)
        .await
        .context("create provider")?;
    admin
        .create_mailbox(pb::CreateMailboxRequest {
            mailbox: Some(pb::Mailbox {
                tenant: tenant.into(),
                name: MAILBOX.into(),
                address: ADDRESS.into(),
                provider: "m365".into(),
                grant_type: pb::GrantType::AppOnly as i32,
                kind: pb::MailboxKind::Admin as i32,
                purposes: vec![pb::MailPurpose::Send as i32],
                ..Default::default()
            }),
        })
        .await
        .context("create mailbox")?;
    Ok(())
}

/// Sets up tenant, provider, consented mailbox, device and agent; returns the agent identity.
pub(crate) async fn provision(
    broker: &BrokerProcess,
    admin: &mut TestAdminClient,
    fake: &FakeIdp,
) -> Result<StoredIdentity> {
    tenant_with_mailbox(admin, fake, TENANT, "Bench", CLIENT_ID, CLIENT_SECRET).await?;
    admin
        .start_consent(pb::StartConsentRequest {
            tenant: TENANT.into(),
            mailbox: MAILBOX.into(),
            redirect_uri: String::new(),
        })
        .await
        .context("consent")?;
    let code = admin
        .create_enrollment_code(pb::CreateEnrollmentCodeRequest {
            tenant: TENANT.into(),
            agent: AGENT.into(),
            display_name: "bench site".into(),
            ttl_seconds: 600,
            re_enroll: false,
        })
        .await
        .context("enrollment code")?
        .into_inner()
        .code;
    admin
        .create_device(pb::CreateDeviceRequest {
            device: Some(pb::Device {
                tenant: TENANT.into(),
                name: DEVICE.into(),
                agent: AGENT.into(),
                sender_mode: pb::SenderMode::FixedAdmin as i32,
                admin_mailbox: MAILBOX.into(),
                ingress: Some(pb::IngressCredentials {
                    username: "printer".into(),
                    password: "bench-printer-password".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .context("create device")?;
    let agent_state = broker.state.path().join("agent");
    let identity = tokenfleet_agent::identity::enroll(
        &broker.grpc,
        &EnrollmentCode::new(&code),
        Some(broker.ca_pem()?),
        &agent_state,
        "bench",
    )
    .await
    .map_err(|e| anyhow::anyhow!("enroll: {e}"))?;
    Ok(identity)
}

/// `count` separate mTLS connections with the agent's certificate.
pub(crate) async fn connections(
    broker: &BrokerProcess,
    identity: &StoredIdentity,
    count: u32,
) -> Result<Vec<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(broker.ca_pem()?))
        .identity(Identity::from_pem(
            &identity.cert_pem,
            identity.key_pem.as_bytes(),
        ));
    let mut channels = Vec::new();
    for _ in 0..count.max(1) {
        channels.push(tls_endpoint(&broker.grpc, tls.clone())?.connect().await?);
    }
    Ok(channels)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Health,
    Issue,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Health => "health",
            Call::Issue => "issue",
        }
    }
}

pub(crate) async fn one_call(call: Call, channel: &Channel) -> Result<()> {
    match call {
        Call::Health => {
            HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
        }
        Call::Issue => {
            let answer = TokenBrokerClient::new(channel.clone())
                .issue_access_token(pb::IssueAccessTokenRequest {
                    device: DEVICE.into(),
                    mailbox: MAILBOX.into(),
                    purpose: pb::MailPurpose::Send as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if answer.access_token.is_empty() {
                bail!("IssueAccessToken answered without a token");
            }
        }
    }
    Ok(())
}

/// What one phase measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figure {
    pub(crate) rps: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) calls: u64,
    /// Every call answered during the phase, warm-up and cut-off included (what the processes'
    /// CPU time over the phase is divided by).
    pub(crate) all_calls: u64,
}

/// What one or more phases of one call measured, before it is summed up as a [`Figure`].
#[derive(Debug, Default)]
pub(crate) struct Measured {
    /// The latency of every call in the measured part.
    latencies: Vec<Duration>,
    /// The measured part's length.
    elapsed: Duration,
    /// Every call answered, warm-up and cut-off included.
    all_calls: u64,
}

impl Measured {
    fn add(&mut self, other: Measured) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
        self.all_calls += other.all_calls;
    }

    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn figure(mut self) -> Figure {
        let rps = self.rps();
        let all = &mut self.latencies;
        all.sort_unstable();
        let pct = |p: usize| {
            all.get((all.len() * p / 100).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Figure {
            rps,
            p50: pct(50),
            p99: pct(99),
            calls: all.len() as u64,
            all_calls: self.all_calls,
        }
    }
}

/// N tasks calling `call` in a loop over `channels` for warm-up + `seconds`; latencies of the
/// measured part only.
pub(crate) async fn phase(
    call: Call,
    channels: &[Channel],
    inflight: u32,
    seconds: u64,
) -> Result<Figure> {
    Ok(measure(call, channels, inflight, seconds).await?.figure())
}

/// [`phase`] before it is summed up.
async fn measure(
    call: Call,
    channels: &[Channel],
    inflight: u32,
    seconds: u64,
) -> Result<Measured> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..inflight {
        let channel = channels[i as usize % channels.len()].clone();
        let (measuring, stop, failed, answered) = (
            measuring.clone(),
            stop.clone(),
            failed.clone(),
            answered.clone(),
        );
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut first_error = None;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = one_call(call, &channel).await;
                let took = started.elapsed();
                if let Err(e) = result {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                    break;
                }
                answered.fetch_add(1, Ordering::Relaxed);
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    latencies.push(took);
                }
            }
            (latencies, first_error)
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (latencies, error) = joined?;
        if let Some(e) = error {
            bail!("{} call failed: {e:#}", call.name());
        }
        all.extend(latencies);
    }
    Ok(Measured {
        latencies: all,
        elapsed,
        all_calls: answered.load(Ordering::Relaxed),
    })
}

/// CPU time per answered call over one phase, from `/proc/<pid>/stat` (clock ticks: 10 ms
/// each, so a phase of several seconds on two cores resolves better than 1%). Less disturbed by
/// a noisy machine than the throughput ratio: it says what a call costs, not how the scheduler
/// shared the cores.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PhaseCpu {
    pub(crate) broker_us: f64,
    pub(crate) client_us: f64,
}

/// One call's phases over the rounds, and the broker's and this process's CPU time in them.
#[derive(Debug, Default)]
struct Costed {
    measured: Measured,
    broker_ticks: u64,
    client_ticks: u64,
}

impl Costed {
    /// The figure over every round, and the CPU time per answered call.
    fn figure(self) -> (Figure, PhaseCpu) {
        let hz = crate::clock_ticks();
        let figure = self.measured.figure();
        let per_call = |ticks: u64| ticks as f64 / hz * 1e6 / figure.all_calls.max(1) as f64;
        let cpu = PhaseCpu {
            broker_us: per_call(self.broker_ticks),
            client_us: per_call(self.client_ticks),
        };
        (figure, cpu)
    }
}

/// [`measure`] adding to `costed`, with the broker's (`broker_pid`) and this process's CPU time.
async fn costed_phase(
    costed: &mut Costed,
    call: Call,
    channels: &[Channel],
    inflight: u32,
    seconds: u64,
    broker_pid: u32,
) -> Result<f64> {
    let me = std::process::id();
    let ticks = |pid| crate::cpu_ticks(pid).context("reading /proc/<pid>/stat");
    let (broker0, client0) = (ticks(broker_pid)?, ticks(me)?);
    let measured = measure(call, channels, inflight, seconds).await?;
    let (broker1, client1) = (ticks(broker_pid)?, ticks(me)?);
    costed.broker_ticks += broker1.saturating_sub(broker0);
    costed.client_ticks += client1.saturating_sub(client0);
    let rps = measured.rps();
    costed.measured.add(measured);
    Ok(rps)
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn run_store(args: &Args, bin: &Path, store: &str, fake: &FakeIdp) -> Result<()> {
    let mut redis = None;
    let store_toml = if store == "redis" {
        let server = RedisServer::start().await.context("redis-server")?;
        let toml = redis_toml(&server);
        redis = Some(server);
        toml
    } else {
        "[store]\nbackend = \"embedded\"\n".to_owned()
    };
    let mut broker = BrokerProcess::start(bin, &store_toml)?;
    let mut admin = broker.admin().await?;
    let identity = provision(&broker, &mut admin, fake).await?;
    let channels = connections(&broker, &identity, args.connections).await?;
    // One issuance first: the token is fetched from the fake and cached.
    one_call(Call::Issue, &channels[0])
        .await
        .context("first issuance")?;
    let mut issued = 1u64;
    for &inflight in &args.inflight {
        let (mut health, mut issue) = (Costed::default(), Costed::default());
        for round in 1..=args.rounds {
            let (seconds, pid) = (args.seconds, broker.pid);
            let base =
                costed_phase(&mut health, Call::Health, &channels, inflight, seconds, pid).await?;
            if args.perf_pause > 0 {
                println!("# broker pid {} — attach perf now", broker.pid);
                tokio::time::sleep(Duration::from_secs(args.perf_pause)).await;
            }
            let rps =
                costed_phase(&mut issue, Call::Issue, &channels, inflight, seconds, pid).await?;
            println!(
                "bench=issuance store={store} inflight={inflight} round={round} ratio_rps={:.2}",
                rps / base.max(1e-9)
            );
        }
        let ((health, health_cpu), (issue, issue_cpu)) = (health.figure(), issue.figure());
        // The warm-up second's and the cut-off calls are answered too: count them from the
        // audit log rather than from the measured ones.
        issued += issue.calls;
        for (name, f) in [("health", health), ("issue", issue)] {
            println!(
                "bench=issuance store={store} inflight={inflight} impl={name} rps={:.0} p50_ms={} p99_ms={}",
                f.rps,
                ms(f.p50),
                ms(f.p99)
            );
        }
        println!(
            "bench=issuance store={store} inflight={inflight} ratio_rps={:.2} ratio_p99={:.2}",
            issue.rps / health.rps,
            issue.p99.as_secs_f64() / health.p99.as_secs_f64().max(1e-9)
        );
        for (name, cpu) in [("health", health_cpu), ("issue", issue_cpu)] {
            println!(
                "bench=issuance store={store} inflight={inflight} impl={name} \
                 broker_cpu_us_per_call={:.1} client_cpu_us_per_call={:.1}",
                cpu.broker_us, cpu.client_us
            );
        }
        let scenario = format!("issuance-{store}-{inflight}");
        crate::figure(&crate::Figure {
            scenario: &scenario,
            figure: "throughput",
            unit: "req/s",
            value: issue.rps,
            baseline: "health-check",
            baseline_value: health.rps,
            target: ">= 0.8x",
            met: Some(issue.rps >= 0.8 * health.rps),
        });
        crate::figure(&crate::Figure {
            scenario: &scenario,
            figure: "p99",
            unit: "ms",
            value: issue.p99.as_secs_f64() * 1000.0,
            baseline: "health-check",
            baseline_value: health.p99.as_secs_f64() * 1000.0,
            target: "<= 1.5x",
            met: Some(issue.p99.as_secs_f64() <= 1.5 * health.p99.as_secs_f64()),
        });
    }
    let audited = count_issue_audits(&mut admin).await?;
    println!(
        "bench=issuance store={store} audit_records={audited} issued_at_least={issued} audit_complete={}",
        audited >= issued
    );
    if audited < issued {
        bail!("{store}: {audited} token.issue audit records for at least {issued} issuances");
    }
    drop(broker);
    drop(redis);
    Ok(())
}

/// Counts the tenant's `token.issue` audit records through the Admin API.
async fn count_issue_audits(admin: &mut TestAdminClient) -> Result<u64> {
    let mut count = 0u64;
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant: TENANT.into(),
                page_size: 1000,
                page_token: page_token.clone(),
                kind: "issuance".into(),
            })
            .await
            .context("list audit events")?
            .into_inner();
        count += page
            .events
            .iter()
            .filter(|e| e.action == "token.issue" && e.result == "ok")
            .count() as u64;
        if page.next_page_token.is_empty() {
            return Ok(count);
        }
        page_token = page.next_page_token;
    }
}

/// The broker's `[store]` section for a Redis server.
pub(crate) fn redis_toml(server: &RedisServer) -> String {
    format!(
        "[store]\nbackend = \"redis\"\n[store.redis]\nurls = [{:?}]\n",
        server.url()
    )
}

/// `--broker-bin`, else `tokenfleet-broker` next to this executable; it must exist.
pub(crate) fn broker_bin(given: Option<&Path>) -> Result<PathBuf> {
    let bin = match given {
        Some(bin) => bin.to_owned(),
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
    Ok(bin)
}

/// The fake identity provider with the app [`provision`] consents for.
pub(crate) async fn fake_idp() -> Result<FakeIdp> {
    let fake = FakeIdp::start().await.context("fake IdP")?;
    fake.register_client({
        let mut spec = ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET);
        spec.app_only_mailbox = Some(ADDRESS.into());
        spec
    });
    Ok(fake)
}

#[tokio::main]
pub async fn run(args: Args) -> Result<()> {
    let bin = broker_bin(args.broker_bin.as_deref())?;
    let fake = fake_idp().await?;
    println!(
        "# machine: {} cpus, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let stores: &[&str] = match args.store {
        StoreArg::Embedded => &["embedded"],
        StoreArg::Redis => &["redis"],
        StoreArg::Both => &["embedded", "redis"],
    };
    for store in stores {
        run_store(&args, &bin, store, &fake).await?;
    }
    Ok(())
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into())
}
