//! Benchmark of the broker's listener limits under pre-authentication abuse (issue 10 item 6). Not
//! part of any test suite; run it by hand against the real broker binary:
//!
//! ```text
//! cargo build --release -p tokenfleet-broker -p tokenfleet-testkit --bin tokenfleet-broker --bin bench
//! target/release/bench broker-abuse                       # 20,000 streams + 500 slow clients
//! target/release/bench broker-abuse --broker-bin /path/to/other/tokenfleet-broker
//! ```
//!
//! It starts `tokenfleet-broker serve` (plaintext gRPC, embedded store, default `[limits]` unless
//! `--limits` adds lines) as a child process on loopback ports, waits for gRPC health SERVING,
//! records the idle RSS (baseline), then attacks for `--hold-seconds`, all at once:
//!
//! * `--streams` half-open HTTP/2 streams over `--connections` gRPC connections with the `h2`
//!   crate: HEADERS of a `grpc.health.v1.Health/Check` call without END_STREAM, never any DATA.
//!   The client obeys the server's SETTINGS, so it opens at most the advertised
//!   `max_concurrent_streams` per connection; the rest wait (a stream that cannot be opened
//!   within 2 s counts as held back by the server's limit);
//! * the same number of streams on one more connection written as raw frames that ignore the
//!   SETTINGS (what a hostile client does): counted are the streams the server refuses
//!   (`RST_STREAM REFUSED_STREAM`) and the calls it ends itself (its request timeout);
//! * `--slow-clients` HTTP/1.1 clients on the HTTP listener, each sending a request header one
//!   line per second and never finishing it; counted is when the broker disconnects each;
//! * `--silent-clients` connections to the HTTP listener that send nothing at all, each opened
//!   again as soon as the broker closes it (a sustained flood; default none); counted are the
//!   connections opened and how long the broker let them stay.
//!
//! Meanwhile one probe calls `grpc.health.v1.Health/Check` and another `GET /healthz` on the
//! HTTP listener, each every 250 ms on a new connection, and the broker's `VmRSS`/`VmHWM` (from
//! `/proc/<pid>/status`) are sampled every 100 ms. Printed: baseline, peak during and RSS after
//! the attack (the attack's connections closed, 3 s later), the probes' answers, and what the
//! limits did. Exits non-zero if any gRPC probe did not answer SERVING or any HTTP probe not
//! `200`.
//!
//! Then, unless `--anonymous-clients 0`, the TLS phase of [`crate::anonymous`]: the anonymous
//! gRPC slots flooded with calls that prove nothing while an API-key client probes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::flood;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Debug, Parser)]
#[command(about = "The broker under half-open HTTP/2 streams and slow HTTP clients")]
pub struct Args {
    /// Half-open HTTP/2 streams to attempt with the `h2` client (and again as raw frames).
    #[arg(long, default_value_t = 20_000)]
    streams: u32,
    /// gRPC connections the `h2` client spreads its streams over.
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// Slow HTTP/1.1 clients on the HTTP listener.
    #[arg(long, default_value_t = 500)]
    slow_clients: u32,
    /// Connections to the HTTP listener that send nothing, each reopened when closed.
    #[arg(long, default_value_t = 0)]
    silent_clients: u32,
    /// How long the attack lasts, in seconds.
    #[arg(long, default_value_t = 20)]
    hold_seconds: u64,
    /// The broker binary (default: `tokenfleet-broker` next to this executable).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// Extra lines for the broker's `[limits]` section (e.g. `grpc_max_concurrent_streams = 50`).
    #[arg(long, default_value = "")]
    limits: String,
    /// Then, over TLS: clients without a certificate each holding a call that proves nothing
    /// (`Health/Watch`, half-open `Enroll`), reconnecting when closed, while an API-key client
    /// probes (0: skip this phase; its broker is the test kit's, `BENCH_BROKER_BINARY`
    /// for another build).
    #[arg(long, default_value_t = 200)]
    anonymous_clients: u32,
    /// Loopback addresses those clients connect from.
    #[arg(long, default_value_t = 50)]
    anonymous_sources: u32,
    /// The TLS broker's `grpc_max_anonymous_connections`.
    #[arg(long, default_value_t = 64)]
    anonymous_limit: u32,
    /// How long that flood lasts, in seconds.
    #[arg(long, default_value_t = 10)]
    anonymous_seconds: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn health(port: u16) -> Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(answer.into_inner().status())
}

fn write_config(dir: &Path, grpc: u16, http: u16, limits: &str) -> Result<PathBuf> {
    let key = tokenfleet_seal::Keyring::generate_key_base64()?;
    let key_file = dir.join("seal.key");
    std::fs::write(&key_file, key)?;
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[grpc]\nlisten = \"127.0.0.1:{grpc}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [log]\nlevel = \"warn\"\n[seal]\nkeys = [{{ id = \"k1\", key_file = {key_file:?} }}]\n\
             [limits]\n{}\n",
            dir.join("state"),
            limits.replace("\\n", "\n")
        ),
    )?;
    Ok(config)
}

/// The `h2` client's half-open streams: `(requests issued, streams the server lets be open at
/// once on each connection)`; the client queues the rest locally. The connections and streams
/// stay open until `stop`.
async fn polite_streams(
    port: u16,
    total: u32,
    connections: u32,
    stop: Arc<AtomicBool>,
) -> (u32, u32) {
    let per_connection = total.div_ceil(connections.max(1));
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
                return (0, per_connection);
            };
            let Ok((send, connection)) = h2::client::Builder::new()
                .handshake::<_, &'static [u8]>(tcp)
                .await
            else {
                return (0, per_connection);
            };
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            // Wait for the server's SETTINGS (until then the client assumes no stream limit).
            for _ in 0..40 {
                if send.current_max_send_streams() != usize::MAX {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // What the server allows, read at the end even if the last `ready` timed out with
            // the handle.
            let watcher = send.clone();
            let mut held = Vec::new();
            let mut opened = 0u32;
            // One handle throughout: `ready` waits while its last stream cannot be opened yet
            // (the server's limit is reached); a fresh clone would not wait.
            let mut sender = Some(send);
            for _ in 0..per_connection {
                let Some(handle) = sender.take() else {
                    break;
                };
                let ready = tokio::time::timeout(Duration::from_secs(2), handle.ready()).await;
                let Ok(Ok(mut ready)) = ready else {
                    break;
                };
                let request = axum::http::Request::post(format!(
                    "http://127.0.0.1:{port}/grpc.health.v1.Health/Check"
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap_or_default();
                match ready.send_request(request, false) {
                    Ok(stream) => {
                        held.push(stream);
                        opened += 1;
                    }
                    Err(_) => break,
                }
                sender = Some(ready);
            }
            let allowed = watcher.current_max_send_streams();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(held);
            driver.abort();
            (opened, u32::try_from(allowed).unwrap_or(u32::MAX))
        }));
    }
    let mut totals = (0, 0);
    for task in tasks {
        if let Ok((opened, allowed)) = task.await {
            totals.0 += opened;
            totals.1 += allowed.min(opened);
        }
    }
    totals
}

/// `n` streams as raw frames on one connection, ignoring the server's SETTINGS:
/// `(refused with REFUSED_STREAM, answered by the server, advertised max streams)`.
async fn hostile_streams(
    port: u16,
    n: u32,
    stop: Arc<AtomicBool>,
) -> Result<(u64, u64, Option<u32>)> {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    fn string(out: &mut Vec<u8>, s: &str) {
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    let mut block = vec![0x83, 0x86, 0x04];
    string(&mut block, "/grpc.health.v1.Health/Check");
    block.push(0x01);
    string(&mut block, "127.0.0.1");
    block.extend_from_slice(&[0x0f, 0x10]);
    string(&mut block, "application/grpc");
    block.push(0x00);
    string(&mut block, "te");
    string(&mut block, "trailers");

    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        for i in 0..n {
            out.extend(frame(0x1, 0x4, 2 * i + 1, &block));
            if out.len() > 64 * 1024 {
                if wr.write_all(&out).await.is_err() {
                    return wr;
                }
                out.clear();
            }
        }
        let _ = wr.write_all(&out).await;
        wr
    });
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut refused, mut answered, mut advertised) = (0u64, 0u64, None);
    while !stop.load(Ordering::Relaxed) {
        let read = tokio::time::timeout(Duration::from_millis(200), rd.read(&mut chunk)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(len)) => buf.extend_from_slice(&chunk[..len]),
            Err(_) => continue,
        }
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            if buf.len() < at + 9 + len {
                break;
            }
            let (kind, flags) = (buf[at + 3], buf[at + 4]);
            let payload = &buf[at + 9..at + 9 + len];
            match kind {
                0x3 if payload == [0, 0, 0, 7] => refused += 1,
                0x1 => answered += 1,
                0x4 if flags & 1 == 0 => {
                    advertised = payload.chunks_exact(6).find_map(|p| {
                        (u16::from_be_bytes([p[0], p[1]]) == 3)
                            .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
                    });
                }
                _ => {}
            }
            at += 9 + len;
        }
        buf.drain(..at);
    }
    writer.abort();
    Ok((refused, answered, advertised))
}

/// `n` slow HTTP/1.1 clients: each sends a request line and then one header line per second,
/// never the blank line. Returns when each was disconnected (`None`: still connected at `stop`).
async fn slow_clients(port: u16, n: u32, stop: Arc<AtomicBool>) -> Vec<Option<Duration>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
                return Some(Duration::ZERO);
            };
            if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .await
                .is_err()
            {
                return Some(started.elapsed());
            }
            let mut i = 0u64;
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                // Anything read (EOF, an error, a 408) means the broker is done with us.
                if tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
                    .await
                    .is_ok()
                {
                    return Some(started.elapsed());
                }
                i += 1;
                if s.write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return Some(started.elapsed());
                }
            }
            None
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap_or(None));
    }
    out
}

#[tokio::main]
pub async fn run(args: Args) -> Result<()> {
    let broker_bin = match &args.broker_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("tokenfleet-broker"))
            .context("the directory of this executable")?,
    };
    if !broker_bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p tokenfleet-broker) or pass --broker-bin",
            broker_bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let [grpc, http] = tokenfleet_testkit::ports::free_ports::<2>()?;
    let http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    let config = write_config(dir.path(), grpc, http, &args.limits)?;
    let mut child = tokio::process::Command::new(&broker_bin)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", broker_bin.display()))?;
    let pid = child.id().context("broker pid")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(health(grpc).await, Ok(ServingStatus::Serving)) {
        if Instant::now() > deadline {
            bail!("the broker never answered SERVING");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = memory(pid).context("reading the broker's /proc status")?;
    println!(
        "broker {} (pid {pid}), gRPC 127.0.0.1:{grpc}, HTTP 127.0.0.1:{http}",
        broker_bin.display()
    );
    println!(
        "baseline (idle, SERVING):  VmRSS {}  VmHWM {}",
        mib(baseline.rss_kib),
        mib(baseline.hwm_kib)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let done_sampling = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(baseline.rss_kib));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak_rss), Arc::clone(&done_sampling));
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(m) = memory(pid) {
                    peak.fetch_max(m.rss_kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let probe = tokio::spawn(flood::probe_every_250_ms(
        Arc::clone(&done_sampling),
        move || health(grpc),
        |status| *status == ServingStatus::Serving,
    ));
    let http_probe = tokio::spawn(flood::probe_every_250_ms(
        Arc::clone(&done_sampling),
        move || flood::http_health(http_addr),
        |status| *status == 200,
    ));

    let started = Instant::now();
    println!(
        "attack: {} h2 streams over {} connection(s) + {} raw streams ignoring SETTINGS + {} slow HTTP/1 clients + {} silent HTTP clients, {} s",
        args.streams,
        args.connections,
        args.streams,
        args.slow_clients,
        args.silent_clients,
        args.hold_seconds
    );
    let polite = tokio::spawn(polite_streams(
        grpc,
        args.streams,
        args.connections,
        Arc::clone(&stop),
    ));
    let hostile = tokio::spawn(hostile_streams(grpc, args.streams, Arc::clone(&stop)));
    let slow = tokio::spawn(slow_clients(http, args.slow_clients, Arc::clone(&stop)));
    let silent = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            flood::silent_clients(http_addr, &[], args.silent_clients, stop).await
        })
    };
    tokio::time::sleep(Duration::from_secs(args.hold_seconds)).await;
    let during = memory(pid).unwrap_or_default();
    stop.store(true, Ordering::Relaxed);
    let (opened, open_at_broker) = polite.await.unwrap_or((0, 0));
    let (refused, answered, advertised) = hostile.await?.unwrap_or((0, 0, None));
    let slow = slow.await.unwrap_or_default();
    let (silent_opened, mut silent_closed) = silent.await.unwrap_or_default();
    let attack = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = memory(pid).unwrap_or_default();
    done_sampling.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let (serving, failed, slowest) = probe.await.unwrap_or_default();
    let (http_ok, http_failed, http_slowest) = http_probe.await.unwrap_or_default();

    let mut cut: Vec<Duration> = slow.iter().flatten().copied().collect();
    cut.sort();
    silent_closed.sort();
    let pct = flood::quantile;
    println!("advertised SETTINGS_MAX_CONCURRENT_STREAMS: {advertised:?}");
    println!(
        "h2 client (obeys SETTINGS): {opened} half-open requests issued; the broker lets {open_at_broker} be open at once, the client queues the rest"
    );
    println!(
        "raw client (ignores SETTINGS): {refused} streams refused (REFUSED_STREAM), {answered} answered by the broker (request timeout)"
    );
    println!(
        "slow HTTP/1 clients: {} of {} disconnected by the broker (p50 {}, max {}), {} still connected after {:.0} s",
        cut.len(),
        slow.len(),
        pct(&cut, 0.5),
        pct(&cut, 1.0),
        slow.len() - cut.len(),
        attack.as_secs_f64()
    );
    if args.silent_clients > 0 {
        println!(
            "silent HTTP clients: {silent_opened} connections opened by {}, {} closed by the broker (stayed p50 {}, max {})",
            args.silent_clients,
            silent_closed.len(),
            pct(&silent_closed, 0.5),
            pct(&silent_closed, 1.0)
        );
    }
    println!(
        "broker memory: baseline VmRSS {} | during (end of attack) VmRSS {} | peak sampled VmRSS {} | VmHWM {} | after VmRSS {}",
        mib(baseline.rss_kib),
        mib(during.rss_kib),
        mib(peak_rss.load(Ordering::Relaxed)),
        mib(after.hwm_kib),
        mib(after.rss_kib)
    );
    println!(
        "health probes (new connection every 250 ms): {serving} SERVING, {} failed, slowest {:.0} ms",
        failed.len(),
        slowest.as_secs_f64() * 1000.0
    );
    for f in failed.iter().take(5) {
        println!("  probe failure: {f}");
    }
    println!(
        "HTTP probes (GET /healthz, new connection every 250 ms): {http_ok} answered 200, {} failed, slowest {:.0} ms",
        http_failed.len(),
        http_slowest.as_secs_f64() * 1000.0
    );
    for f in http_failed.iter().take(5) {
        println!("  HTTP probe failure: {f}");
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    if !failed.is_empty() || serving == 0 {
        bail!("health was not SERVING throughout the attack");
    }
    if !http_failed.is_empty() || http_ok == 0 {
        bail!("/healthz did not answer 200 throughout the attack");
    }
    if args.anonymous_clients > 0 {
        crate::anonymous::run(crate::anonymous::Flood {
            clients: args.anonymous_clients,
            sources: args.anonymous_sources,
            limit: args.anonymous_limit,
            seconds: args.anonymous_seconds,
        })
        .await?;
    }
    Ok(())
}
