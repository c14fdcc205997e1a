//! Benchmark of the fleet agent's mail path: SMTP ingress → durable spool → delivery worker →
//! XOAUTH2 submission. Not part of any test suite; run it by hand, in release:
//!
//! ```text
//! cargo run --release -p tokenfleet-testkit --bin bench -- agent --messages 2000
//! cargo run --release -p tokenfleet-testkit --bin bench -- agent --mode ingress-only
//! cargo run --release -p tokenfleet-testkit --bin bench -- agent --size 1048576 --messages 200
//! ```
//!
//! Everything runs in this one process on 127.0.0.1, except Dovecot (`dovecot` must be on
//! `PATH` or in `/usr/sbin`):
//!
//! * the fake identity provider, which issues an app-only token for the benchmark mailbox and
//!   answers Dovecot's token introspection;
//! * a real Dovecot whose submission service (no TLS) validates XOAUTH2 at the fake and delivers
//!   into the mailbox;
//! * the agent's mail path from the `tokenfleet-agent` library: [`Spool`], [`IngressServer`] with
//!   [`FleetIngress`] (one device, argon2-hashed local credentials, sender mode FIXED_ADMIN), and
//!   the production [`DeliveryWorker`] with [`UpstreamDeliveries`] pointing at Dovecot's
//!   submission and a token source handing out the fake's token (no broker);
//! * a load generator: `--concurrency` SMTP client connections, each logging in once with
//!   `AUTH PLAIN` (one argon2 verification per connection) and sending many messages with `RSET`
//!   between them, until `--messages` messages of about `--size` bytes (a multipart message with
//!   a base64 attachment) are acknowledged.
//!
//! Figures: ingress acceptance rate (start of the load until the last `250` after `DATA`, which
//! the ingress sends only after the spool fsync), acknowledgement latency (end of `DATA` → `250`)
//! p50/p95/p99/max, end-to-end delivery rate (until the spool is empty; the mailbox is then read
//! over POP3 and must hold every message exactly once), peak RSS of this process (`VmHWM`; Dovecot
//! is a separate process and not included) and the spool's peak size on disk (sampled every
//! 250 ms, and once when the load ends). `--mode ingress-only` runs no delivery worker (and no
//! Dovecot): the spool must hold every message at the end. The process exits non-zero when a message was lost, duplicated,
//! refused or dead-lettered.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Parser, ValueEnum};
use tokenfleet_agent::ingress::{IngressConfig, IngressServer};
use tokenfleet_agent::runtime::devices::{DeviceRegistry, FleetIngress, UpstreamDeliveries};
use tokenfleet_agent::runtime::status::StatusBook;
use tokenfleet_agent::runtime::tokens::{
    IssuedToken, TokenAnswer, TokenCache, TokenFailure, TokenKey, TokenSource,
};
use tokenfleet_agent::runtime::worker::{DeliveryWorker, WorkerSettings};
use tokenfleet_agent::runtime::{Clock, SystemClock};
use tokenfleet_agent::sasl::AccessToken;
use tokenfleet_agent::spool::Spool;
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::dovecot::{Dovecot, DovecotOptions};
use tokenfleet_testkit::fake_idp::{ClientSpec, FakeIdp};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The mailbox every message is sent as and delivered to.
const MAILBOX: &str = "printer@contoso.example";
/// Name of the mailbox in the agent configuration.
const MAILBOX_NAME: &str = "bench-box";
/// The benchmark device (also its ingress user name).
const DEVICE: &str = "bench-mfp";
/// Longest wait for any one reply.
const IO: Duration = Duration::from_secs(120);
/// Header carrying the message's sequence number (for the duplicate check).
const SEQ_HEADER: &str = "X-Bench-Seq";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Ingress, spool and delivery to Dovecot.
    Full,
    /// Ingress and spool only (no delivery worker, no Dovecot).
    IngressOnly,
}

/// Agent mail-path benchmark (see the file header).
#[derive(Debug, Parser)]

pub struct Args {
    /// Messages to send.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Approximate size of each message in bytes (headers included).
    #[arg(long, default_value_t = 20 * 1024)]
    size: usize,
    /// Concurrent SMTP client connections to the ingress.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Deliveries the worker runs at once (the agent's `concurrency` setting).
    #[arg(long, default_value_t = WorkerSettings::default().concurrency)]
    delivery_concurrency: usize,
    /// What runs.
    #[arg(long, value_enum, default_value = "full")]
    mode: Mode,
    /// Give up (and fail) when the run has not finished after this many seconds.
    #[arg(long, default_value_t = 1800)]
    deadline_secs: u64,
}

/// The broker stand-in: the fake identity provider's token for every request.
struct BenchTokens {
    token: AccessToken,
}

#[async_trait::async_trait]
impl TokenSource for BenchTokens {
    async fn issue(&self, key: &TokenKey) -> Result<TokenAnswer, TokenFailure> {
        Ok(TokenAnswer::Token(IssuedToken {
            token: self.token.clone(),
            // The fake's tokens live 3599 s; the run is far shorter.
            expires: SystemTime::now() + Duration::from_secs(3000),
            sasl_username: MAILBOX.to_owned(),
            mailbox: key.mailbox.clone(),
        }))
    }
}

/// What one SMTP client connection measured.
#[derive(Default)]
struct ClientReport {
    login: Duration,
    acks: Vec<Duration>,
    last_ack: Option<Instant>,
}

/// The upstream side of a full run.
struct Upstream {
    _idp: FakeIdp,
    dovecot: Dovecot,
    token: AccessToken,
}

pub async fn run(args: Args) -> Result<()> {
    if args.messages == 0 || args.concurrency == 0 || args.delivery_concurrency == 0 {
        bail!("--messages, --concurrency and --delivery-concurrency must be at least 1");
    }
    if args.size < 1024 {
        bail!("--size must be at least 1024 bytes");
    }
    let deadline = Instant::now() + Duration::from_secs(args.deadline_secs.max(1));
    let dir = tempfile::Builder::new()
        .prefix("tf-bench-agent-")
        .tempdir()
        .context("creating temp dir")?;
    let spool_dir = dir.path().join("spool");
    let spool = Arc::new(Spool::open(&spool_dir).context("opening the spool")?);

    let upstream = match args.mode {
        Mode::Full => Some(start_upstream().await?),
        Mode::IngressOnly => None,
    };

    // The device: local credentials for the ingress, FIXED_ADMIN as the benchmark mailbox,
    // submission to Dovecot without TLS.
    let password = uuid::Uuid::new_v4().simple().to_string();
    let hash = {
        let password = password.clone();
        tokio::task::spawn_blocking(move || {
            use argon2::password_hash::PasswordHasher as _;
            argon2::Argon2::default()
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| anyhow!("hashing the device password: {e}"))
        })
        .await??
    };
    let submission_port = upstream
        .as_ref()
        .map_or(9, |u| u.dovecot.submission_addr().port());
    let device = pb::AgentDevice {
        name: DEVICE.into(),
        sender_mode: pb::SenderMode::FixedAdmin as i32,
        admin_mailbox: Some(pb::MailboxRef {
            name: MAILBOX_NAME.into(),
            address: MAILBOX.into(),
            kind: pb::MailboxKind::Admin as i32,
        }),
        ingress_username: DEVICE.into(),
        ingress_password_hash: hash,
        smtp: Some(pb::SmtpProfile {
            method: pb::SendMethod::Smtp as i32,
            server: "127.0.0.1".into(),
            port: u32::from(submission_port),
            security: pb::TlsMode::None as i32,
            timeout_seconds: 60,
            ..Default::default()
        }),
        ..Default::default()
    };

    let wake = Arc::new(tokio::sync::Notify::new());
    let ingress = Arc::new(FleetIngress::new(Arc::clone(&spool), Arc::clone(&wake)));
    let problems = ingress.apply(std::slice::from_ref(&device));
    if !problems.is_empty() {
        bail!("the ingress refused the benchmark device: {problems:?}");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the ingress listener")?;
    let ingress_addr = listener.local_addr()?;
    let ingress_task = tokio::spawn(IngressServer::serve(
        listener,
        IngressConfig {
            hostname: "bench-agent".into(),
            ..IngressConfig::default()
        },
        Arc::clone(&ingress),
        stopped(stop_rx.clone()),
    ));

    let mut worker_task = None;
    if let Some(up) = &upstream {
        let registry = Arc::new(DeviceRegistry::new(Arc::new(UpstreamDeliveries)));
        let broken = registry.apply(pb::AgentConfig {
            tenant: "bench".into(),
            agent: "bench-agent".into(),
            devices: vec![device.clone()],
            revision: "r1".into(),
            heartbeat_seconds: 30,
        });
        if !broken.is_empty() {
            bail!("no upstream for the benchmark device: {broken:?}");
        }
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let tokens = Arc::new(TokenCache::new(
            Arc::new(BenchTokens {
                token: up.token.clone(),
            }),
            Arc::clone(&clock),
            Duration::from_secs(300),
        ));
        let worker = Arc::new(DeliveryWorker::new(
            Arc::clone(&spool),
            &spool_dir,
            registry,
            tokens,
            Arc::new(StatusBook::open(dir.path())),
            clock,
            WorkerSettings {
                concurrency: args.delivery_concurrency,
                // A transient failure should show up as a retry, not stall the run for 30 s.
                retry_base: Duration::from_secs(1),
                retry_max: Duration::from_secs(5),
                ..WorkerSettings::default()
            },
            Arc::clone(&wake),
        ));
        // As the agent does at start: creates the in-flight marker directory.
        worker
            .recover_markers()
            .context("preparing the delivery worker's markers")?;
        worker_task = Some(tokio::spawn(
            worker.run(stopped(stop_rx.clone()), Duration::from_secs(30)),
        ));
    }

    // Spool size on disk, sampled until the end.
    let peak_alloc = Arc::new(AtomicU64::new(0));
    let peak_len = Arc::new(AtomicU64::new(0));
    let peak_depth = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak_alloc, peak_len, peak_depth) = (
            Arc::clone(&peak_alloc),
            Arc::clone(&peak_len),
            Arc::clone(&peak_depth),
        );
        let spool_dir = spool_dir.clone();
        let spool = Arc::clone(&spool);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let (dir, spool) = (spool_dir.clone(), Arc::clone(&spool));
                if let Ok((alloc, len, depth)) = tokio::task::spawn_blocking(move || {
                    let (alloc, len) = disk_usage(&dir);
                    (alloc, len, spool.queued().map_or(0, |q| q.len() as u64))
                })
                .await
                {
                    peak_alloc.fetch_max(alloc, Ordering::Relaxed);
                    peak_len.fetch_max(len, Ordering::Relaxed);
                    peak_depth.fetch_max(depth, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
    };

    // The load.
    let body = Arc::new(attachment_body(args.size));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (body, next, password) = (Arc::clone(&body), Arc::clone(&next), password.clone());
        let total = args.messages;
        clients.spawn(async move { client(ingress_addr, &password, total, &next, &body).await });
    }
    let mut acks = Vec::with_capacity(args.messages);
    let mut logins = Vec::new();
    let mut last_ack = started;
    let mut failures = Vec::new();
    while let Some(done) = clients.join_next().await {
        match done {
            Ok(Ok(r)) => {
                logins.push(r.login);
                acks.extend(r.acks);
                last_ack = last_ack.max(r.last_ack.unwrap_or(started));
            }
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(format!("client task: {e}")),
        }
    }
    let ingress_took = last_ack.duration_since(started);
    let accepted = acks.len();
    // The spool at its fullest in ingress-only mode: now.
    {
        let dir = spool_dir.clone();
        let (alloc, len) = tokio::task::spawn_blocking(move || disk_usage(&dir)).await?;
        peak_alloc.fetch_max(alloc, Ordering::Relaxed);
        peak_len.fetch_max(len, Ordering::Relaxed);
    }

    // Delivery: until the spool is empty, then count what Dovecot has.
    let mut problems: Vec<String> = failures;
    let mut delivered = None;
    let mut e2e_took = None;
    let mut dead = 0;
    if let Some(up) = &upstream {
        loop {
            let s = Arc::clone(&spool);
            let (queued, dead_now) = tokio::task::spawn_blocking(move || {
                Ok::<_, anyhow::Error>((s.queued()?.len(), s.dead()?.len()))
            })
            .await??;
            dead = dead_now;
            if queued == 0 {
                e2e_took = Some(started.elapsed());
                break;
            }
            if Instant::now() > deadline {
                problems.push(format!(
                    "deadline: {queued} messages still queued after {} s",
                    args.deadline_secs
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if dead > 0 {
            problems.push(format!("{dead} messages dead-lettered"));
        }
        delivered = Some(
            mailbox_contents(up)
                .await
                .with_context(|| format!("reading the mailbox over POP3\n{}", up.dovecot.log()))?,
        );
    }

    let _ = stop_tx.send(true);
    if let Some(w) = worker_task {
        let _ = w.await;
    }
    let _ = ingress_task.await;
    let _ = sampler.await;
    let queued_at_end = {
        let s = Arc::clone(&spool);
        tokio::task::spawn_blocking(move || s.queued().map(|q| q.len()))
            .await?
            .context("listing the spool")?
    };

    // Verdicts.
    if accepted != args.messages {
        problems.push(format!(
            "{} of {} messages acknowledged by the ingress",
            accepted, args.messages
        ));
    }
    let mut duplicates = 0;
    if let Some(d) = &delivered {
        duplicates = d.duplicates;
        if d.count != args.messages {
            problems.push(format!(
                "Dovecot holds {} messages, expected {}",
                d.count, args.messages
            ));
        }
        if d.missing > 0 {
            problems.push(format!("{} sequence numbers missing in Dovecot", d.missing));
        }
        if d.duplicates > 0 {
            problems.push(format!("{} duplicates in Dovecot", d.duplicates));
        }
    } else if queued_at_end != accepted {
        problems.push(format!(
            "the spool holds {queued_at_end} messages, {accepted} were acknowledged"
        ));
    }

    acks.sort_unstable();
    logins.sort_unstable();
    let msg_bytes = message(0, &body).len();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
    row(
        "mode",
        match args.mode {
            Mode::Full => "full (ingress → spool → worker → Dovecot submission)".into(),
            Mode::IngressOnly => "ingress-only (no delivery worker)".into(),
        },
    );
    row("messages", args.messages.to_string());
    row(
        "message size",
        format!("{msg_bytes} bytes ({:.1} KiB)", msg_bytes as f64 / 1024.0),
    );
    row("client connections", args.concurrency.to_string());
    if upstream.is_some() {
        row(
            "delivery concurrency",
            args.delivery_concurrency.to_string(),
        );
    }
    row("cpus", cpus().to_string());
    row(
        "AUTH PLAIN (argon2) p50 / max",
        format!(
            "{} / {}",
            fmt_ms(pct(&logins, 50)),
            fmt_ms(pct(&logins, 100))
        ),
    );
    row("ingress: acknowledged (250)", accepted.to_string());
    row("ingress: time to last 250", fmt_s(ingress_took));
    row(
        "ingress: acceptance rate",
        format!(
            "{:.1} msg/s ({:.2} MiB/s)",
            rate(accepted, ingress_took),
            rate(accepted, ingress_took) * msg_bytes as f64 / (1024.0 * 1024.0)
        ),
    );
    row(
        "ack latency p50 / p95 / p99 / max",
        format!(
            "{} / {} / {} / {}",
            fmt_ms(pct(&acks, 50)),
            fmt_ms(pct(&acks, 95)),
            fmt_ms(pct(&acks, 99)),
            fmt_ms(pct(&acks, 100))
        ),
    );
    if let (Some(d), Some(took)) = (&delivered, e2e_took) {
        row("delivery: time until spool empty", fmt_s(took));
        row(
            "delivery: end-to-end rate",
            format!("{:.1} msg/s", rate(d.count.min(args.messages), took)),
        );
        row(
            "delivery: in Dovecot / distinct / expected",
            format!("{} / {} / {}", d.count, d.distinct, args.messages),
        );
        row("delivery: duplicates", d.duplicates.to_string());
        row("delivery: dead-lettered", dead.to_string());
    } else if upstream.is_some() {
        row("delivery", "did not finish".into());
    } else {
        row("spool: entries at end", queued_at_end.to_string());
    }
    row(
        "spool: peak queue depth (sampled)",
        peak_depth
            .load(Ordering::Relaxed)
            .max(queued_at_end as u64)
            .to_string(),
    );
    row(
        "spool: peak disk use (allocated / bytes)",
        format!(
            "{} / {}",
            fmt_mib(peak_alloc.load(Ordering::Relaxed)),
            fmt_mib(peak_len.load(Ordering::Relaxed))
        ),
    );
    row(
        "peak RSS of this process (VmHWM)",
        proc_status("VmHWM").unwrap_or_else(|| "unknown".into()),
    );

    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("\nbench-agent results");
    println!("{}", "-".repeat(width + 50));
    for (k, v) in &rows {
        println!("{k:<width$}  {v}");
    }
    println!("{}", "-".repeat(width + 50));
    let summary = format!(
        "{} x {} B, {} conn: ingress {:.0} msg/s (ack p99 {}){}, missing {}, duplicates {}",
        args.messages,
        msg_bytes,
        args.concurrency,
        rate(accepted, ingress_took),
        fmt_ms(pct(&acks, 99)),
        match e2e_took {
            Some(t) => format!(", end-to-end {:.0} msg/s", rate(args.messages, t)),
            None => String::new(),
        },
        missing(args.messages, accepted, delivered.as_ref(), queued_at_end),
        duplicates,
    );
    drop(upstream);
    drop(dir);
    if problems.is_empty() {
        println!("OK: {summary}");
        Ok(())
    } else {
        println!("FAILED: {summary}");
        for p in &problems {
            println!("  - {p}");
        }
        bail!("{} problem(s); see above", problems.len())
    }
}

/// Messages not where they should be at the end: not in Dovecot (full) or not in the spool
/// (ingress-only).
fn missing(expected: usize, accepted: usize, d: Option<&Mailbox>, queued: usize) -> usize {
    match d {
        Some(d) => expected.saturating_sub(d.distinct),
        None => expected.saturating_sub(accepted.min(queued)),
    }
}

/// The fake identity provider with an app-only token for [`MAILBOX`], and Dovecot validating
/// tokens at it.
async fn start_upstream() -> Result<Upstream> {
    let idp = FakeIdp::start()
        .await
        .context("starting the fake identity provider")?;
    let mut spec = ClientSpec::confidential("bench-app", "bench-app-secret");
    spec.app_only_mailbox = Some(MAILBOX.into());
    idp.register_client(spec);
    let body = post_form(
        &format!("{}/organizations/oauth2/v2.0/token", idp.base_url()),
        "grant_type=client_credentials&client_id=bench-app&client_secret=bench-app-secret\
         &scope=https%3A%2F%2Foutlook.office365.com%2F.default",
    )
    .await
    .context("obtaining a token from the fake identity provider")?;
    let json: serde_json::Value =
        serde_json::from_str(&body).context("the fake's token answer is not JSON")?;
    let token = json["access_token"]
        .as_str()
        .ok_or_else(|| anyhow!("the fake's token answer has no access_token"))?;
    let token = AccessToken::new(token);
    tokenfleet_testkit::logs::secret(token.expose());
    let dovecot = Dovecot::start(DovecotOptions {
        introspection_url: idp.introspection_url(),
    })
    .await
    .context("starting Dovecot (is `dovecot` on PATH or in /usr/sbin?)")?;
    Ok(Upstream {
        _idp: idp,
        dovecot,
        token,
    })
}

/// POSTs a form to a loopback `http://` URL; the body of a 200 answer.
async fn post_form(url: &str, body: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: not http://"))?;
    let (host, path) = rest
        .split_once('/')
        .ok_or_else(|| anyhow!("{url}: no path"))?;
    let mut s = TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(IO, s.read_to_string(&mut out))
        .await
        .map_err(|_| anyhow!("{url}: no answer"))??;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{url}: malformed HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{url}: {status}");
    }
    Ok(body.to_owned())
}

/// The part of every message after its headers: a short text part and an attachment-like
/// base64 part, `size` bytes in all with the headers (roughly).
fn attachment_body(size: usize) -> Vec<u8> {
    const HEAD: &[u8] = b"--bench-boundary\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\
Scanned document attached.\r\n\r\n--bench-boundary\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\n\
Content-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n";
    const TAIL: &[u8] = b"--bench-boundary--\r\n";
    let headers = message_headers(0).len();
    let room = size.saturating_sub(headers + HEAD.len() + TAIL.len());
    // 57 raw bytes make one 76-character line plus CRLF.
    let raw_len = room / 78 * 57;
    // Not compressible, like a scan: xorshift bytes.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let raw: Vec<u8> = (0..raw_len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let mut out = HEAD.to_vec();
    for chunk in raw.chunks(57) {
        out.extend_from_slice(B64.encode(chunk).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(TAIL);
    out
}

fn message_headers(seq: usize) -> String {
    format!(
        "From: \"Scanner\" <scanner@bench.test>\r\nTo: <{MAILBOX}>\r\nSubject: Scan {seq:06}\r\n\
         Message-ID: <bench-{seq:06}@bench.test>\r\n{SEQ_HEADER}: {seq:06}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"bench-boundary\"\r\n\r\n"
    )
}

/// Message `seq` as sent in `DATA` (no line of it starts with a dot, so nothing to stuff).
fn message(seq: usize, body: &[u8]) -> Vec<u8> {
    let mut m = message_headers(seq).into_bytes();
    m.extend_from_slice(body);
    m
}

/// A minimal SMTP client connection.
struct Smtp {
    r: BufReader<TcpStream>,
}

impl Smtp {
    async fn reply(&mut self) -> Result<String> {
        let mut all = String::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(IO, self.r.read_until(b'\n', &mut line))
                .await
                .map_err(|_| anyhow!("no SMTP reply within {} s", IO.as_secs()))??;
            if n == 0 {
                bail!("the ingress closed the connection (after {all:?})");
            }
            let text = String::from_utf8_lossy(&line);
            all.push_str(&text);
            if text.len() < 4 || text.as_bytes()[3] != b'-' {
                return Ok(all.trim_end().to_owned());
            }
        }
    }

    async fn send(&mut self, line: &str) -> Result<()> {
        self.r
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .context("writing to the ingress")
    }

    /// Sends `line` (if any) and expects a reply starting with `code`.
    async fn expect(&mut self, line: &str, code: &str, what: &str) -> Result<String> {
        if !line.is_empty() {
            self.send(line).await?;
        }
        let reply = self.reply().await?;
        if !reply.starts_with(code) {
            bail!("{what}: expected {code}, got {reply:?}");
        }
        Ok(reply)
    }
}

/// One client connection: log in once, then send messages while there are any left.
async fn client(
    addr: SocketAddr,
    password: &str,
    total: usize,
    next: &AtomicUsize,
    body: &[u8],
) -> Result<ClientReport> {
    let mut report = ClientReport::default();
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the ingress at {addr}"))?;
    stream.set_nodelay(true)?;
    let mut c = Smtp {
        r: BufReader::new(stream),
    };
    c.expect("", "220", "greeting").await?;
    c.expect("EHLO bench-client", "250", "EHLO").await?;
    let login = Instant::now();
    let plain = B64.encode(format!("\0{DEVICE}\0{password}"));
    c.expect(&format!("AUTH PLAIN {plain}"), "235", "AUTH PLAIN")
        .await?;
    report.login = login.elapsed();
    let mut first = true;
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= total {
            break;
        }
        if !first {
            c.expect("RSET", "250", "RSET").await?;
        }
        first = false;
        c.expect("MAIL FROM:<scanner@bench.test>", "250", "MAIL FROM")
            .await?;
        c.expect(&format!("RCPT TO:<{MAILBOX}>"), "250", "RCPT TO")
            .await?;
        c.expect("DATA", "354", "DATA").await?;
        let w = c.r.get_mut();
        w.write_all(message_headers(seq).as_bytes()).await?;
        w.write_all(body).await?;
        w.write_all(b".\r\n").await?;
        w.flush().await?;
        let sent = Instant::now();
        c.expect("", "250", &format!("end of DATA (message {seq})"))
            .await?;
        let acked = Instant::now();
        report.acks.push(acked.duration_since(sent));
        report.last_ack = Some(acked);
    }
    let _ = c.send("QUIT").await;
    Ok(report)
}

/// What the benchmark mailbox holds.
struct Mailbox {
    count: usize,
    distinct: usize,
    duplicates: usize,
    missing: usize,
}

/// Logs in over POP3 (OAUTHBEARER) and reads every message's sequence header with `TOP n 0`.
async fn mailbox_contents(up: &Upstream) -> Result<Mailbox> {
    let addr = up.dovecot.pop3_addr();
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to POP3 at {addr}"))?;
    let mut c = Smtp {
        r: BufReader::new(stream),
    };
    let greeting = pop3_line(&mut c).await?;
    if !greeting.starts_with("+OK") {
        bail!("POP3 greeting: {greeting}");
    }
    c.send("AUTH OAUTHBEARER").await?;
    let go = pop3_line(&mut c).await?;
    if !go.starts_with('+') {
        bail!("POP3 AUTH OAUTHBEARER: {go}");
    }
    c.send(&B64.encode(format!(
        "n,a={MAILBOX},\x01host=127.0.0.1\x01port={}\x01auth=Bearer {}\x01\x01",
        addr.port(),
        up.token.expose()
    )))
    .await?;
    let done = pop3_line(&mut c).await?;
    if !done.starts_with("+OK") {
        bail!("POP3 login: {done}");
    }
    c.send("STAT").await?;
    let stat = pop3_line(&mut c).await?;
    let count: usize = stat
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("POP3 STAT: {stat}"))?;
    let mut seen = vec![0u32; 0];
    for n in 1..=count {
        c.send(&format!("TOP {n} 0")).await?;
        let ok = pop3_line(&mut c).await?;
        if !ok.starts_with("+OK") {
            bail!("POP3 TOP {n}: {ok}");
        }
        let mut seq = None;
        loop {
            let line = pop3_line(&mut c).await?;
            if line == "." {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case(SEQ_HEADER)
            {
                seq = value.trim().parse::<usize>().ok();
            }
        }
        let seq = seq.ok_or_else(|| anyhow!("message {n} in Dovecot has no {SEQ_HEADER}"))?;
        if seen.len() <= seq {
            seen.resize(seq + 1, 0);
        }
        seen[seq] += 1;
    }
    let _ = c.send("QUIT").await;
    let distinct = seen.iter().filter(|n| **n > 0).count();
    Ok(Mailbox {
        count,
        distinct,
        duplicates: count - distinct,
        missing: seen.iter().filter(|n| **n == 0).count(),
    })
}

async fn pop3_line(c: &mut Smtp) -> Result<String> {
    let mut line = Vec::new();
    let n = tokio::time::timeout(IO, c.r.read_until(b'\n', &mut line))
        .await
        .map_err(|_| anyhow!("no POP3 answer within {} s", IO.as_secs()))??;
    if n == 0 {
        bail!("POP3 server closed the connection");
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// (allocated bytes, file bytes) under `dir`, like `du` and `du --apparent-size`.
fn disk_usage(dir: &Path) -> (u64, u64) {
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    let (mut alloc, mut len) = (0u64, 0u64);
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                alloc += meta.blocks() * 512;
                len += meta.len();
            }
        }
    }
    (alloc, len)
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * p / 100).min(sorted.len() - 1)]
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn fmt_s(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn fmt_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A field of /proc/self/status (e.g. `VmHWM`), as written there ("123456 kB").
fn proc_status(field: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
