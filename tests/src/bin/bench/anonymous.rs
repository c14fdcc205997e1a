//! The TLS phase of `bench broker-abuse` (`--anonymous-clients`): the broker executable over TLS
//! (the test kit's broker, `grpc_max_anonymous_connections = --anonymous-limit`), its anonymous
//! gRPC slots flooded by clients without a client certificate that each hold a call proving
//! nothing — half of them a `Health/Watch` stream, half a half-open `Enroll` call (headers sent,
//! request never) — from `--anonymous-sources` loopback addresses, each reconnecting as soon as
//! the broker closes it. Meanwhile an API-key client (`Admin/WhoAmI`, what `tokenfleetctl` does
//! first) calls every 250 ms on a new TLS connection. Printed: the flood's connections, how long
//! the broker let them hold their call, and the probes answered; the phase fails when fewer than
//! 90% of the probes were answered. `BENCH_BROKER_BINARY` runs another build.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::broker::{BearerAuth, TestBroker, TestOptions, TestStore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::flood;

/// What the phase floods with and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// Clients holding a call that proves nothing.
    pub clients: u32,
    /// Loopback source addresses they connect from.
    pub sources: u32,
    /// The broker's `grpc_max_anonymous_connections`.
    pub limit: u32,
    /// How long the flood lasts.
    pub seconds: u64,
}

/// A new TLS connection to the broker at `url` without a client certificate, from `source` if
/// given.
async fn anonymous_channel(url: &str, ca_pem: &str, source: Option<IpAddr>) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    Ok(Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .local_address(source)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// `n` clients, the `i`-th from `sources[i % len]`, each holding a call that proves nothing (a
/// `Health/Watch` stream or a half-open `Enroll`) on a new connection, again as soon as the
/// broker ends it, until `stop`: the connections opened, how long each the broker ended had held
/// its call, and how many were still held at the end.
async fn unproven_callers(
    url: String,
    ca_pem: String,
    sources: Vec<IpAddr>,
    n: u32,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<Duration>, u64) {
    let (opened, held) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for i in 0..n as usize {
        let (url, ca_pem, stop) = (url.clone(), ca_pem.clone(), Arc::clone(&stop));
        let (opened, held) = (Arc::clone(&opened), Arc::clone(&held));
        let source = sources.get(i % sources.len().max(1)).copied();
        clients.push(tokio::spawn(async move {
            let mut stayed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok(channel) = anonymous_channel(&url, &ca_pem, source).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let stopped = async {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                tokio::select! {
                    _ = hold_unproven_call(channel, i % 2 == 0) => stayed.push(started.elapsed()),
                    () = stopped => {
                        held.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            stayed
        }));
    }
    let mut stayed = Vec::new();
    for client in clients {
        stayed.extend(client.await.unwrap_or_default());
    }
    (
        opened.load(Ordering::Relaxed),
        stayed,
        held.load(Ordering::Relaxed),
    )
}

/// Holds one call that proves nothing on `channel` until the broker ends it.
async fn hold_unproven_call(channel: Channel, watch: bool) -> Result<()> {
    if watch {
        let mut stream = HealthClient::new(channel)
            .watch(HealthCheckRequest::default())
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        return Ok(());
    }
    tokenfleet_testkit::silent::half_open_enroll(channel).await?;
    Ok(())
}

/// Runs the phase; see the module documentation.
pub async fn run(flood: Flood) -> Result<()> {
    let broker = TestBroker::start_with(
        TestStore::Embedded,
        TestOptions {
            tls: true,
            binary_config: Some(format!(
                "[limits]\ngrpc_max_anonymous_connections = {}\n",
                flood.limit
            )),
            ..TestOptions::default()
        },
    )
    .await?;
    let ca_pem = broker.tls_ca_pem().context("the broker's CA")?;
    let sources: Vec<IpAddr> = (0..flood.sources.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 9, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let callers = {
        let (url, ca_pem, stop, n) = (
            broker.grpc_url(),
            ca_pem.clone(),
            Arc::clone(&stop),
            flood.clients,
        );
        flood::on_a_runtime_of_its_own(unproven_callers(url, ca_pem, sources, n, stop))
    };
    // Let the flood fill the slots before probing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = Arc::new(AtomicBool::new(false));
    let probe = {
        let (url, ca_pem, done) = (broker.grpc_url(), ca_pem.clone(), Arc::clone(&done));
        let auth = BearerAuth::new(&broker.admin_key);
        tokio::spawn(async move {
            flood::probe_every_250_ms(
                done,
                || {
                    let (url, ca_pem, auth) = (url.clone(), ca_pem.clone(), auth.clone());
                    async move {
                        let channel = anonymous_channel(&url, &ca_pem, None).await?;
                        pb::admin_client::AdminClient::with_interceptor(channel, auth)
                            .who_am_i(pb::WhoAmIRequest::default())
                            .await
                            .map_err(|status| {
                                anyhow::anyhow!("{:?}: {}", status.code(), status.message())
                            })?;
                        Ok(())
                    }
                },
                |_| true,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(flood.seconds)).await;
    done.store(true, Ordering::Relaxed);
    let (ok, failures, slowest) = probe.await?;
    stop.store(true, Ordering::Relaxed);
    let (opened, mut stayed, held) = flood::joined(callers).await;
    stayed.sort();
    let probes = ok + failures.len() as u64;
    println!(
        "anonymous gRPC flood over TLS: {} clients from {} addresses holding Health/Watch streams \
         and half-open Enroll calls, grpc_max_anonymous_connections = {}, {} s",
        flood.clients, flood.sources, flood.limit, flood.seconds
    );
    println!(
        "  {} connections opened, {} ended by the broker (their call held p50 {}, max {}), {} still open with their call pending at the end",
        opened,
        stayed.len(),
        flood::quantile(&stayed, 0.5),
        flood::quantile(&stayed, 1.0),
        held
    );
    println!(
        "  Admin/WhoAmI with an API key on a new connection every 250 ms: {ok} of {probes} answered (slowest {:.2} s)",
        slowest.as_secs_f64()
    );
    for f in failures.iter().take(3) {
        println!("  probe failure: {f}");
    }
    println!(
        "bench=broker-abuse phase=anonymous clients={} sources={} limit={} opened={} probes={probes} answered={ok}",
        flood.clients, flood.sources, flood.limit, opened
    );
    drop(broker);
    if (ok as f64) < 0.9 * probes as f64 {
        bail!("API-key clients were kept out: {ok} of {probes} probes answered");
    }
    Ok(())
}
