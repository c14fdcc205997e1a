//! What the abuse benchmarks share: a sustained flood of connections that send nothing, an HTTP
//! health probe on a new connection, and a probe loop that counts the answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokenfleet_testkit::silent::connect_from;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `n` connections to `target` that send nothing, the `i`-th from `sources[i % len]`, each
/// opened again as soon as the server closes it, until `stop`: how many were opened, and how long
/// each the server closed had stayed.
pub async fn silent_clients(
    target: SocketAddr,
    sources: &[IpAddr],
    n: u32,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<Duration>) {
    let mut tasks = Vec::new();
    for i in 0..n as usize {
        let stop = Arc::clone(&stop);
        let source = sources.get(i % sources.len().max(1)).copied();
        tasks.push(tokio::spawn(async move {
            let (mut opened, mut closed) = (0u64, Vec::new());
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let connected = match source {
                    Some(source) => connect_from(source, target).await,
                    None => TcpStream::connect(target).await,
                };
                let Ok(mut s) = connected else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                opened += 1;
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                        Err(_) => {}
                        Ok(Ok(1..)) => {}
                        Ok(_) => {
                            closed.push(started.elapsed());
                            break;
                        }
                    }
                }
            }
            (opened, closed)
        }));
    }
    let (mut opened, mut closed) = (0, Vec::new());
    for task in tasks {
        if let Ok((o, c)) = task.await {
            opened += o;
            closed.extend(c);
        }
    }
    (opened, closed)
}

/// `GET /healthz` on a new connection to `target`: the status code.
pub async fn http_health(target: SocketAddr) -> Result<u16> {
    let exchange = async {
        let mut s = TcpStream::connect(target).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        let status = String::from_utf8_lossy(&answer)
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .context("not an HTTP answer")?;
        anyhow::Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .context("no answer within 2 s")?
}

/// Calls `probe` every 250 ms until `done`: how many answered as `good` says, the other
/// answers, and the slowest.
pub async fn probe_every_250_ms<T, F, P>(
    done: Arc<AtomicBool>,
    probe: P,
    good: fn(&T) -> bool,
) -> (u64, Vec<String>, Duration)
where
    T: std::fmt::Debug,
    F: std::future::Future<Output = Result<T>>,
    P: Fn() -> F,
{
    let (mut ok, mut other, mut slowest) = (0u64, Vec::new(), Duration::ZERO);
    while !done.load(Ordering::Relaxed) {
        let started = Instant::now();
        match probe().await {
            Ok(answer) if good(&answer) => ok += 1,
            Ok(answer) => other.push(format!("{answer:?}")),
            Err(e) => other.push(format!("{e:#}")),
        }
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (ok, other, slowest)
}

/// The `p` quantile of sorted durations, in seconds ("-" when there are none).
pub fn quantile(sorted: &[Duration], p: f64) -> String {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
}

/// Runs `attack` on a runtime of its own on another thread, as if on other hosts: a probe in
/// this process is not queued behind its tasks. Join it with [`joined`].
pub fn on_a_runtime_of_its_own<F>(attack: F) -> std::thread::JoinHandle<std::io::Result<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|attackers| attackers.block_on(attack))
    })
}

/// What an attack started by [`on_a_runtime_of_its_own`] returned (the default if its runtime
/// could not be built or it panicked).
pub async fn joined<T: Default + Send + 'static>(
    attack: std::thread::JoinHandle<std::io::Result<T>>,
) -> T {
    tokio::task::spawn_blocking(move || attack.join())
        .await
        .ok()
        .and_then(|joined| joined.ok())
        .and_then(|built| built.ok())
        .unwrap_or_default()
}
