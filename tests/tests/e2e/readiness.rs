//! `/readyz` through the broker's real HTTP listener answers what a load balancer needs: 200 only
//! while the store takes writes — reachable, a master (Redis `ROLE`), with the replicas writes
//! wait for (`min_replicas_acked`) online — and 503 with a short reason otherwise: a Redis server
//! turned into a replica, a replica gone under `min_replicas_acked = 1`, the master gone.

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokenfleet_testkit::broker::{TestBroker, TestOptions, TestStore};
use tokenfleet_testkit::redis::{RedisServer, command};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `GET /readyz` over plain HTTP/1.1; returns status code and body.
async fn readyz(addr: SocketAddr) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `/readyz` until it answers `want`; returns the body. Panics after 15 s.
async fn wait_ready(broker: &TestBroker, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = readyz(broker.http_addr).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} ({body:?}), expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readyz_is_503_while_the_redis_server_is_a_replica() {
    let server = RedisServer::start().await.unwrap();
    let other = RedisServer::start().await.unwrap();
    let broker = TestBroker::start(TestStore::Redis(server.url()))
        .await
        .unwrap();
    assert_eq!(readyz(broker.http_addr).await, (200, "ready\n".to_owned()));

    // Demoted (as Sentinel does to an old master): reachable, answers PING, takes no writes.
    let port = other.port().to_string();
    command(server.port(), &["REPLICAOF", "127.0.0.1", &port])
        .await
        .unwrap();
    let body = wait_ready(&broker, 503).await;
    assert!(body.starts_with("not ready:"), "{body}");
    assert!(body.contains("is a slave, not a master"), "{body}");
    assert_eq!(body.lines().count(), 1, "one short line: {body:?}");

    command(server.port(), &["REPLICAOF", "NO", "ONE"])
        .await
        .unwrap();
    assert_eq!(wait_ready(&broker, 200).await, "ready\n");
    broker.shutdown().await;
}

#[tokio::test]
async fn readyz_needs_the_replicas_writes_wait_for() {
    let master = RedisServer::start().await.unwrap();
    let mut replica = RedisServer::start_replica_of(&master).await.unwrap();
    let broker = TestBroker::start_with(
        TestStore::Redis(master.url()),
        TestOptions {
            redis_min_replicas_acked: Some(1),
            ..TestOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(wait_ready(&broker, 200).await, "ready\n");

    // Without its replica the master still answers, but every write would fail its WAIT.
    replica.kill();
    let body = wait_ready(&broker, 503).await;
    assert!(
        body.contains("0 of the 1 replicas writes wait for (min_replicas_acked) are online"),
        "{body}"
    );

    replica.start_again().await.unwrap();
    assert_eq!(wait_ready(&broker, 200).await, "ready\n");
    broker.shutdown().await;
}

#[tokio::test]
async fn readyz_is_503_within_its_timeout_when_the_master_is_gone() {
    let mut server = RedisServer::start().await.unwrap();
    let broker = TestBroker::start(TestStore::Redis(server.url()))
        .await
        .unwrap();
    assert_eq!(readyz(broker.http_addr).await.0, 200);
    server.kill();
    let started = Instant::now();
    let (status, body) = readyz(broker.http_addr).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready:"), "{body}");
    // READY_TIMEOUT (2 s) bounds the probe, plus a margin for a loaded machine.
    assert!(
        started.elapsed() < tokenfleet_broker::http::READY_TIMEOUT + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    server.start_again().await.unwrap();
    assert_eq!(wait_ready(&broker, 200).await, "ready\n");
    broker.shutdown().await;
}

#[tokio::test]
async fn readyz_commits_a_write_on_the_embedded_store() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    for _ in 0..3 {
        assert_eq!(readyz(broker.http_addr).await, (200, "ready\n".to_owned()));
    }
    broker.shutdown().await;
}
