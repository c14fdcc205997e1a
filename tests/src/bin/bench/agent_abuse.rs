//! Benchmark of the agent's listener limits under abuse: the real `tokenfleet-agent run`
//! executable (enrolled at a TLS broker, delivering to a real Dovecot through the fake identity
//! provider — the [`AgentSite`] of the end-to-end suites) with its default `[ingress_limits]`,
//! attacked over loopback, while a printer keeps sending. Not part of any test suite; run it by
//! hand (in the dev profile: it starts the agent binary the end-to-end tests build, see
//! [`tokenfleet_testkit::agent_site::workspace_binary`]; dependencies such as argon2 are
//! optimized there):
//!
//! ```text
//! cargo run -p tokenfleet-testkit --bin bench -- agent-abuse
//! cargo run -p tokenfleet-testkit --bin bench -- agent-abuse --no-lockout
//! # the same attack on another build of the agent (e.g. main's, before the limits):
//! TOKENFLEET_TEST_AGENT_BINARY=/path/to/tokenfleet-agent cargo run -p tokenfleet-testkit --bin bench -- agent-abuse
//! ```
//!
//! Phases, each from its own loopback source addresses (the agent counts sessions per source):
//!
//! 1. baseline: the printer (Python `smtplib` from 127.0.0.1, logging in with the device's local
//!    password) sends one message; the agent's idle RSS is read from `/proc/<pid>/status`;
//! 2. `--wrong-logins` (150) parallel connections, one per source `127.4.x.y`, each sending
//!    `AUTH PLAIN` with the device's user name and a wrong password, `--rounds` times per
//!    connection (new connection when the agent closes one), while the printer sends a message;
//! 3. `--idle` (2000) connections from 200 sources `127.5.x.y` that send nothing and are held
//!    open (over `max_sessions` each new one closes the one that has waited longest without
//!    logging in), while the printer sends a message.
//! 4. `--metrics-silent` (200) connections to the metrics listener from `--metrics-sources` (50)
//!    sources `127.6.x.y` that send nothing, each opened again as soon as the agent closes it,
//!    for `--metrics-seconds` (10), while `GET /healthz` is probed every 250 ms on a new
//!    connection from 127.0.0.1 (the listener's 16 slots are full throughout: each new
//!    connection closes the one that has waited longest for a request).
//!
//! The agent's RSS is sampled every 10 ms throughout (`VmRSS`), and its `VmHWM` read at the end.
//! Printed: idle RSS, peak RSS per phase, `VmHWM`, the documented ceiling
//! (`--ceiling-mib`, README "Agent listener limits and sender binding"), the replies the
//! attackers got (535 / 421 locked / refused at connect), how many idle connections were
//! accepted, and how long the printer's messages took. `--no-lockout` raises the lockout and
//! slowdown thresholds out of reach, so every wrong password costs a password check: it shows
//! the bound on concurrent hashing alone. Exits non-zero when the peak exceeds the ceiling or a
//! printer message was not acknowledged and delivered, or fewer than 90% of the `/healthz`
//! probes of phase 4 answered 200.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use base64::Engine as _;
use clap::Parser;
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::agent_site::{AgentSite, DEVICE_USER, SiteOptions, eventually};

use tokenfleet_testkit::silent::connect_from;

use crate::flood;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Agent listener abuse benchmark (see the file header).
#[derive(Debug, Parser)]

pub struct Args {
    /// Parallel wrong-password connections (one source address each).
    #[arg(long, default_value_t = 150)]
    wrong_logins: usize,
    /// Wrong passwords each of them sends.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Idle connections opened and held.
    #[arg(long, default_value_t = 2000)]
    idle: usize,
    /// Source addresses the idle connections come from.
    #[arg(long, default_value_t = 200)]
    idle_sources: usize,
    /// The documented memory ceiling of the agent with default limits, in MiB.
    #[arg(long, default_value_t = 160)]
    ceiling_mib: u64,
    /// Lockout and slowdown out of reach: every wrong password is checked.
    #[arg(long)]
    no_lockout: bool,
    /// Connections to the metrics listener that send nothing, each opened again as soon as the
    /// agent closes it (0: no metrics phase).
    #[arg(long, default_value_t = 200)]
    metrics_silent: u32,
    /// Source addresses they come from.
    #[arg(long, default_value_t = 50)]
    metrics_sources: usize,
    /// How long the metrics flood lasts, in seconds.
    #[arg(long, default_value_t = 10)]
    metrics_seconds: u64,
}

/// A field of `/proc/<pid>/status` in KiB ("VmRSS:  1234 kB").
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Samples the agent's RSS every 10 ms while `run` is set; the peak is in `peak`.
fn sample_rss(pid: u32, peak: Arc<AtomicU64>, run: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while run.load(Ordering::Relaxed) {
            if let Some(rss) = status_kib(pid, "VmRSS") {
                peak.fetch_max(rss, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

async fn line(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut reply = String::new();
    loop {
        let mut l = String::new();
        match tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut l)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
        reply.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return Some(reply);
        }
    }
}

async fn say(reader: &mut BufReader<TcpStream>, text: &str) -> Option<String> {
    reader
        .get_mut()
        .write_all(format!("{text}\r\n").as_bytes())
        .await
        .ok()?;
    line(reader).await
}

#[derive(Default)]
struct Outcomes {
    refused_535: AtomicUsize,
    locked_421: AtomicUsize,
    /// Closed for a newer connection before its login was answered (`421 4.3.2`).
    closed_for_newer: AtomicUsize,
    busy_at_connect: AtomicUsize,
    other: AtomicUsize,
}

/// One attacker: `rounds` wrong passwords for the device's user name from `source`.
async fn attacker(source: [u8; 4], addr: SocketAddr, rounds: usize, out: Arc<Outcomes>) {
    let wrong = format!(
        "AUTH PLAIN {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("\0{DEVICE_USER}\0wrong-{}", source[3]))
    );
    let mut done = 0;
    while done < rounds {
        let Ok(stream) = connect_from(source.into(), addr).await else {
            out.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut c = BufReader::new(stream);
        match line(&mut c).await {
            Some(g) if g.starts_with("220") => {}
            Some(g) if g.starts_with("421") => {
                out.busy_at_connect.fetch_add(1, Ordering::Relaxed);
                done += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            _ => {
                out.other.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if say(&mut c, "EHLO attacker").await.is_none() {
            return;
        }
        while done < rounds {
            done += 1;
            match say(&mut c, &wrong).await {
                Some(r) if r.starts_with("535") => {
                    out.refused_535.fetch_add(1, Ordering::Relaxed);
                }
                Some(r) if r.starts_with("421 4.3.2") => {
                    out.closed_for_newer.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(r) if r.starts_with("421") => {
                    out.locked_421.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ => {
                    out.other.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// The printer sends one message; returns how long until it was acknowledged.
async fn print_one(site: &AgentSite) -> Duration {
    let started = Instant::now();
    site.print(1, None).await;
    started.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
pub async fn run(args: Args) -> Result<()> {
    let mut agent_config = String::new();
    if args.no_lockout {
        agent_config.push_str(
            "[ingress_limits]\nlogin_slowdown_after = 1000000\nlogin_lockout_after = 1000000\n",
        );
    }
    let site = AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send],
        agent_config,
        ..SiteOptions::default()
    })
    .await;
    let Some(pid) = site.agent_pid() else {
        bail!("the agent is not running");
    };

    // 1. Baseline.
    let first = print_one(&site).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = status_kib(pid, "VmRSS").unwrap_or(0);
    println!(
        "agent pid {pid}; defaults of [ingress_limits]{}",
        if args.no_lockout {
            " with lockout and slowdown disabled"
        } else {
            ""
        }
    );
    println!(
        "baseline: first message acknowledged in {first:?}; idle RSS {}",
        mib(idle_rss)
    );

    let run = Arc::new(AtomicBool::new(true));
    let peak_login = Arc::new(AtomicU64::new(idle_rss));
    let sampler = sample_rss(pid, Arc::clone(&peak_login), Arc::clone(&run));

    // 2. Wrong-password storm.
    let out = Arc::new(Outcomes::default());
    let started = Instant::now();
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..args.wrong_logins {
        let source = [127, 4, (i / 250) as u8, (i % 250 + 1) as u8];
        attackers.spawn(attacker(source, site.smtp, args.rounds, Arc::clone(&out)));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during_logins = print_one(&site).await;
    while attackers.join_next().await.is_some() {}
    let storm = started.elapsed();
    run.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let login_peak = peak_login.load(Ordering::Relaxed);
    println!(
        "wrong-password storm: {} connections x {} attempts in {storm:?}: 535 {} / locked 421 {} / closed for a newer connection (421 4.3.2) {} / refused at connect {} / closed without a reply or other {}; printer acknowledged in {during_logins:?}; peak RSS {}",
        args.wrong_logins,
        args.rounds,
        out.refused_535.load(Ordering::Relaxed),
        out.locked_421.load(Ordering::Relaxed),
        out.closed_for_newer.load(Ordering::Relaxed),
        out.busy_at_connect.load(Ordering::Relaxed),
        out.other.load(Ordering::Relaxed),
        mib(login_peak)
    );

    // 3. Idle flood.
    let run = Arc::new(AtomicBool::new(true));
    let peak_idle = Arc::new(AtomicU64::new(0));
    let sampler = sample_rss(pid, Arc::clone(&peak_idle), Arc::clone(&run));
    let mut held = Vec::new();
    let (mut accepted, mut refused, mut failed) = (0usize, 0usize, 0usize);
    for i in 0..args.idle {
        let s = i % args.idle_sources.max(1);
        let source = [127, 5, (s / 250) as u8, (s % 250 + 1) as u8];
        match connect_from(source.into(), site.smtp).await {
            Ok(stream) => {
                let mut c = BufReader::new(stream);
                match line(&mut c).await {
                    Some(g) if g.starts_with("220") => {
                        accepted += 1;
                        held.push(c);
                    }
                    Some(g) if g.starts_with("421") => refused += 1,
                    _ => failed += 1,
                }
            }
            Err(_) => failed += 1,
        }
    }
    let during_idle = print_one(&site).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let idle_peak = peak_idle.load(Ordering::Relaxed);
    // Greeted, then closed for a newer connection (`421 4.3.2`), or still open.
    let closed_for_newer = futures::future::join_all(held.iter_mut().map(|c| async move {
        tokio::time::timeout(Duration::from_millis(100), line(c))
            .await
            .ok()
            .flatten()
            .is_some_and(|l| l.starts_with("421 4.3.2"))
    }))
    .await
    .into_iter()
    .filter(|closed| *closed)
    .count();
    println!(
        "idle flood: {} connections from {} sources: greeted {accepted} ({closed_for_newer} of them closed for a newer one with 421 4.3.2, {} still open) / refused at connect with 421 {refused} / failed {failed}; printer acknowledged in {during_idle:?}; peak RSS {}",
        args.idle,
        args.idle_sources,
        accepted - closed_for_newer,
        mib(idle_peak)
    );
    drop(held);

    // 4. Metrics flood.
    let run = Arc::new(AtomicBool::new(true));
    let peak_metrics = Arc::new(AtomicU64::new(0));
    let sampler = sample_rss(pid, Arc::clone(&peak_metrics), Arc::clone(&run));
    let probes = metrics_flood(&site, &args).await;
    run.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let metrics_peak = peak_metrics.load(Ordering::Relaxed);
    if args.metrics_silent > 0 {
        println!("metrics flood: peak RSS {}", mib(metrics_peak));
    }

    eventually(
        "the printer's three messages delivered",
        Duration::from_secs(60),
        || async { (site.upstream_count().await >= 3).then_some(()) },
    )
    .await;
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
    // The kernel updates VmHWM lazily; a sample can be a little higher.
    let peak = login_peak.max(idle_peak).max(metrics_peak).max(hwm);
    let ceiling = args.ceiling_mib * 1024;
    println!(
        "agent RSS: idle {} -> peak {} (sampled VmRSS and VmHWM {}); ceiling {} MiB: {}",
        mib(idle_rss),
        mib(peak),
        mib(hwm),
        args.ceiling_mib,
        if peak <= ceiling { "under" } else { "OVER" }
    );
    println!("printer: 3 messages acknowledged and delivered to Dovecot during the attacks");
    if peak > ceiling {
        bail!("the agent's peak RSS {} exceeds the ceiling", mib(peak));
    }
    probes
}

/// Phase 4: `--metrics-silent` connections to the metrics listener from `--metrics-sources`
/// addresses `127.6.x.y` that send nothing, each opened again as soon as the agent closes it, for
/// `--metrics-seconds`, while `GET /healthz` is probed every 250 ms on a new connection from
/// 127.0.0.1. An error when a probe was not answered 200.
async fn metrics_flood(site: &AgentSite, args: &Args) -> Result<()> {
    if args.metrics_silent == 0 {
        return Ok(());
    }
    let target = site.metrics;
    let sources: Vec<IpAddr> = (0..args.metrics_sources.max(1))
        .map(|s| IpAddr::from([127, 6, (s / 250) as u8, (s % 250 + 1) as u8]))
        .collect();
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let probe = tokio::spawn(flood::probe_every_250_ms(
        Arc::clone(&done),
        move || flood::http_health(target),
        |status| *status == 200,
    ));
    let silent = {
        let (stop, n) = (Arc::clone(&stop), args.metrics_silent);
        flood::on_a_runtime_of_its_own(async move {
            flood::silent_clients(target, &sources, n, stop).await
        })
    };
    tokio::time::sleep(Duration::from_secs(args.metrics_seconds)).await;
    stop.store(true, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let (opened, mut closed) = flood::joined(silent).await;
    closed.sort();
    let (ok, failed, slowest) = probe.await.unwrap_or_default();
    println!(
        "metrics flood: {} silent connections from {} sources for {} s: {opened} opened, {} closed by the agent (stayed p50 {}, max {}); /healthz probes (new connection every 250 ms from 127.0.0.1): {ok} answered 200, {} failed, slowest {:.0} ms",
        args.metrics_silent,
        args.metrics_sources.max(1),
        args.metrics_seconds,
        closed.len(),
        flood::quantile(&closed, 0.5),
        flood::quantile(&closed, 1.0),
        failed.len(),
        slowest.as_secs_f64() * 1000.0
    );
    for f in failed.iter().take(5) {
        println!("  probe failure: {f}");
    }
    // A probe can lose the race with the flood: its connection is the newest waiting one until
    // the agent reads its request, and 16 newer connections in that moment close it.
    let answered = ok as f64 / (ok as f64 + failed.len() as f64).max(1.0);
    if answered < 0.9 {
        bail!(
            "the agent's /healthz answered {:.0}% of the probes 200 during the metrics flood (under 90%)",
            answered * 100.0
        );
    }
    Ok(())
}
