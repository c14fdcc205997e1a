//! End-to-end checks of the broker runtime through the in-process [`TestBroker`]: the gRPC
//! surface (reflection, health, TokenBroker placeholder), the HTTP surface (health, readiness,
//! metrics), persistence across a restart on the embedded store and on a real Redis server (and,
//! through the broker executable, of acknowledged audit records across a kill), and `grpcurl` as
//! an outside client.

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_proto::v1::{
    CreateTenantRequest, GetTenantRequest, IssueAccessTokenRequest, Tenant,
};
use tokenfleet_testkit::broker::{TestBroker, TestOptions, TestStore, enrollment_code};
use tokenfleet_testkit::silent::{closed_within, connect_silent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// `GET path` over plain HTTP/1.1; returns status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
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

async fn list_services(broker: &TestBroker) -> Vec<String> {
    let mut client = ServerReflectionClient::new(broker.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response: {other:?}"),
    }
}

async fn health(broker: &TestBroker, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(broker.channel());
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("health check of {service:?}: {status}"));
    response.into_inner().status()
}

async fn create_tenant(broker: &TestBroker, name: &str) {
    broker
        .admin_client()
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                name: name.to_owned(),
                display_name: format!("Tenant {name}"),
                ..Tenant::default()
            }),
        })
        .await
        .unwrap_or_else(|status| panic!("creating tenant {name}: {status}"));
}

async fn get_tenant(broker: &TestBroker, name: &str) -> Result<Tenant, tonic::Status> {
    broker
        .admin_client()
        .get_tenant(GetTenantRequest {
            name: name.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn reflection_lists_every_service() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let services = list_services(&broker).await;
    for expected in [
        "tokenfleet.v1.Admin",
        "tokenfleet.v1.TokenBroker",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} missing from {services:?}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_each_service() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    for service in ["", "tokenfleet.v1.Admin", "tokenfleet.v1.TokenBroker"] {
        assert_eq!(
            health(&broker, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let status = HealthClient::new(broker.channel())
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    broker.shutdown().await;
}

#[tokio::test]
async fn http_serves_health_readiness_and_metrics() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    assert_eq!(
        http_get(broker.http_addr, "/healthz").await,
        (200, "ok".to_owned())
    );
    assert_eq!(http_get(broker.http_addr, "/readyz").await.0, 200);

    // One gRPC call of each outcome, then read the counters.
    assert_eq!(health(&broker, "").await, ServingStatus::Serving);
    let denied = TokenBrokerClient::new(broker.channel())
        .issue_access_token(IssueAccessTokenRequest::default())
        .await
        .unwrap_err();
    // Without TLS there are no agents to serve.
    assert_eq!(denied.code(), tonic::Code::FailedPrecondition);
    let (status, metrics) = http_get(broker.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("tokenfleet_build_info{"), "{metrics}");
    assert!(
        metrics.contains(
            r#"tokenfleet_grpc_requests_total{method="/grpc.health.v1.Health/Check",code="OK"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"tokenfleet_grpc_requests_total{method="/tokenfleet.v1.TokenBroker/IssueAccessToken",code="FAILED_PRECONDITION"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("tokenfleet_store_ping_failures_total 0"),
        "{metrics}"
    );
    assert_eq!(http_get(broker.http_addr, "/nope").await.0, 404);
    broker.shutdown().await;
}

#[tokio::test]
async fn token_issuance_needs_tls_and_an_agent_certificate() {
    let request = || IssueAccessTokenRequest {
        device: "printer-1".into(),
        mailbox: "scans".into(),
        purpose: 0,
        user_address: String::new(),
    };
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let status = TokenBrokerClient::new(broker.channel())
        .issue_access_token(request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("[tls]"), "{status}");
    broker.shutdown().await;

    let broker = TestBroker::start_tls(TestStore::Embedded).await.unwrap();
    let status = TokenBrokerClient::new(broker.channel())
        .issue_access_token(request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("client certificate is required"),
        "{status}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn embedded_store_keeps_a_tenant_across_restart() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    create_tenant(&broker, "acme").await;
    let old_grpc = broker.grpc_addr;
    let broker = broker.restart().await;
    assert_ne!(
        broker.grpc_addr, old_grpc,
        "a restarted broker gets new listeners"
    );
    let tenant = get_tenant(&broker, "acme").await.unwrap();
    assert_eq!(tenant.name, "acme");
    assert_eq!(health(&broker, "").await, ServingStatus::Serving);
    broker.shutdown().await;
}

/// What a broker acknowledged is audited durably: tenants created concurrently through the
/// broker executable on its embedded store, the process killed (SIGKILL) right after the last
/// answer, started again: every creation has its audit record. (The store makes each group of
/// audit appends durable through its append journal before answering; the database gets them
/// later, in batches, and syncs only every 500 ms.)
#[tokio::test(flavor = "multi_thread")]
async fn audit_records_acknowledged_before_a_kill_survive_it() {
    let broker = TestBroker::start_with(TestStore::Embedded, TestOptions::binary(""))
        .await
        .unwrap();
    let names: Vec<String> = (0..24).map(|i| format!("crash{i}")).collect();
    futures::future::join_all(names.iter().map(|name| create_tenant(&broker, name))).await;
    let broker = broker.kill_and_restart().await;
    let events = broker
        .admin_client()
        .list_audit_events(tokenfleet_proto::v1::ListAuditEventsRequest {
            kind: "changes".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let audited: std::collections::BTreeSet<String> = events
        .iter()
        .filter(|e| e.action == "tenant.create" && e.result == "ok")
        .map(|e| e.target.clone())
        .collect();
    let expected: std::collections::BTreeSet<String> =
        names.iter().map(|name| format!("tenants/{name}")).collect();
    assert_eq!(audited, expected, "audit after the kill: {events:?}");
    for name in &names {
        assert_eq!(get_tenant(&broker, name).await.unwrap().name, *name);
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn embedded_at_a_directory_is_reused_by_the_next_broker() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let first = TestBroker::start(TestStore::EmbeddedAt(state_dir.clone()))
        .await
        .unwrap();
    create_tenant(&first, "globex").await;
    first.shutdown().await;
    let second = TestBroker::start(TestStore::EmbeddedAt(state_dir))
        .await
        .unwrap();
    assert_eq!(get_tenant(&second, "globex").await.unwrap().name, "globex");
    second.shutdown().await;
}

#[tokio::test]
async fn redis_store_keeps_a_tenant_across_restart() {
    let redis = tokenfleet_testkit::redis::RedisServer::start()
        .await
        .unwrap();
    let broker = TestBroker::start(TestStore::Redis(redis.url()))
        .await
        .unwrap();
    create_tenant(&broker, "initech").await;
    let broker = broker.restart().await;
    assert_eq!(
        get_tenant(&broker, "initech").await.unwrap().name,
        "initech"
    );
    assert_eq!(http_get(broker.http_addr, "/readyz").await.0, 200);
    broker.shutdown().await;
}

#[tokio::test]
async fn redis_cluster_store_keeps_a_tenant_across_restart() {
    let cluster = tokenfleet_testkit::redis::RedisCluster::start()
        .await
        .unwrap();
    let broker = TestBroker::start(TestStore::RedisCluster(cluster.seed_urls()))
        .await
        .unwrap();
    create_tenant(&broker, "umbrella").await;
    let broker = broker.restart().await;
    assert_eq!(
        get_tenant(&broker, "umbrella").await.unwrap().name,
        "umbrella"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn replicas_on_one_redis_share_state() {
    let redis = tokenfleet_testkit::redis::RedisServer::start()
        .await
        .unwrap();
    let first = TestBroker::start(TestStore::Redis(redis.url()))
        .await
        .unwrap();
    let second = first.replica().await.unwrap();
    assert_ne!(first.grpc_addr, second.grpc_addr);
    create_tenant(&first, "hooli").await;
    assert_eq!(get_tenant(&second, "hooli").await.unwrap().name, "hooli");
    assert!(
        TestBroker::start(TestStore::Embedded)
            .await
            .unwrap()
            .replica()
            .await
            .is_err(),
        "the embedded store has one owner"
    );
    second.shutdown().await;
    first.shutdown().await;
}

/// Polls gRPC health of the Admin service until it is `want`.
async fn wait_health(broker: &TestBroker, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = health(broker, "tokenfleet.v1.Admin").await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health still {status:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn redis_outage_turns_health_and_readiness_off_and_back_on() {
    let mut redis = tokenfleet_testkit::redis::RedisServer::start()
        .await
        .unwrap();
    let broker = TestBroker::start(TestStore::Redis(redis.url()))
        .await
        .unwrap();
    assert_eq!(health(&broker, "").await, ServingStatus::Serving);

    redis.stop().await.unwrap();
    wait_health(&broker, ServingStatus::NotServing).await;
    assert_eq!(health(&broker, "").await, ServingStatus::NotServing);
    assert_eq!(http_get(broker.http_addr, "/readyz").await.0, 503);
    assert_eq!(
        http_get(broker.http_addr, "/healthz").await.0,
        200,
        "the process is still up"
    );
    let (_, metrics) = http_get(broker.http_addr, "/metrics").await;
    assert!(metrics.contains("tokenfleet_store_up 0"), "{metrics}");
    assert!(
        !metrics.contains("tokenfleet_store_ping_failures_total 0"),
        "{metrics}"
    );

    redis.start_again().await.unwrap();
    wait_health(&broker, ServingStatus::Serving).await;
    assert_eq!(http_get(broker.http_addr, "/readyz").await.0, 200);
    broker.shutdown().await;
}

#[tokio::test]
async fn grpcurl_lists_the_services() {
    let Some(grpcurl) = find_on_path("grpcurl") else {
        if std::env::var_os("CI").is_some() {
            panic!("grpcurl is not on PATH: run scripts/test-setup.sh");
        }
        eprintln!("NOTICE: grpcurl is not on PATH; skipping (scripts/test-setup.sh installs it)");
        return;
    };
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let output = tokio::process::Command::new(grpcurl)
        .args(["-plaintext", &broker.grpc_addr.to_string(), "list"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "grpcurl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "tokenfleet.v1.Admin",
        "tokenfleet.v1.TokenBroker",
        "grpc.health.v1.Health",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim() == expected),
            "{expected} missing: {stdout}"
        );
    }
    broker.shutdown().await;
}

fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `tokenfleetctl` (the real binary) against the broker: a device profile that would send the
/// OAuth token without TLS, over `http://`, or without certificate verification to a host that
/// is not loopback is refused with the field named; loopback stays allowed; the loudly named
/// `insecure_allow_cleartext_tokens` lets it through, and its use is in the audit entry, the
/// device output and `fleet status`.
#[tokio::test]
async fn cleartext_token_profiles_are_refused_unless_loudly_allowed() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    create_tenant(&broker, "acme").await;
    let ctl = tokio::task::spawn_blocking(tokenfleet_testkit::agent_site::ctl_binary)
        .await
        .unwrap();
    let run = |args: Vec<&str>| {
        let mut cmd = tokio::process::Command::new(&ctl);
        cmd.args(&args)
            .env("TOKENFLEET_BROKER", format!("http://{}", broker.grpc_addr))
            .env("TOKENFLEET_API_KEY", broker.admin_key.expose())
            .env_remove("TOKENFLEET_API_KEY_FILE")
            .env_remove("TOKENFLEET_TENANT")
            .env_remove("TOKENFLEET_CA_FILE")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        async move {
            let out = cmd.output().await.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let create = |name: &'static str, extra: &'static [&'static str]| {
        let mut args = vec![
            "device",
            "create",
            "--tenant",
            "acme",
            "--name",
            name,
            "--sender-mode",
            "login_user",
        ];
        args.extend_from_slice(extra);
        run(args)
    };

    for (name, extra, field) in [
        (
            "plain-lan",
            &["--smtp-server", "mail.lan", "--smtp-security", "none"][..],
            "device.smtp.security",
        ),
        (
            "unverified-lan",
            &[
                "--smtp-server",
                "mail.lan",
                "--smtp-security",
                "starttls",
                "--smtp-skip-certificate-verification",
            ][..],
            "device.smtp.skip_certificate_verification",
        ),
        (
            "http-api",
            &[
                "--smtp-method",
                "graph",
                "--smtp-api-base-url",
                "http://graph.lan/v1.0",
            ][..],
            "device.smtp.api_base_url",
        ),
        (
            "plain-pop",
            &[
                "--fetch-server",
                "pop.lan",
                "--fetch-protocol",
                "pop3",
                "--fetch-security",
                "none",
            ][..],
            "device.fetch.security",
        ),
    ] {
        let (code, stdout, stderr) = create(name, extra).await;
        assert_ne!(code, 0, "{name} was accepted: {stdout}");
        assert!(stderr.contains(field), "{name}: {stderr}");
        assert!(
            stderr.contains("insecure_allow_cleartext_tokens"),
            "{name}: the way out is named: {stderr}"
        );
    }

    // Loopback (a relay on the agent's host) needs no flag.
    let (code, _, stderr) = create(
        "local-relay",
        &["--smtp-server", "127.0.0.1", "--smtp-security", "none"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");

    // The explicit setting: accepted, shown, audited, flagged in fleet status.
    let (code, _, stderr) = create(
        "lab-relay",
        &[
            "--smtp-server",
            "mail.lan",
            "--smtp-security",
            "none",
            "--smtp-insecure-allow-cleartext-tokens",
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = run(vec![
        "device",
        "show",
        "--tenant",
        "acme",
        "--name",
        "lab-relay",
        "-o",
        "json",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        shown["smtp"]["insecure_allow_cleartext_tokens"], true,
        "{shown}"
    );
    let (_, table, _) = run(vec!["device", "list", "--tenant", "acme"]).await;
    let row = table.lines().find(|l| l.contains("lab-relay")).unwrap();
    assert!(row.contains("INSECURE-CLEARTEXT-TOKENS"), "{table}");
    let local = table.lines().find(|l| l.contains("local-relay")).unwrap();
    assert!(!local.contains("INSECURE"), "{table}");

    let (code, stdout, stderr) = run(vec![
        "audit", "--tenant", "acme", "-o", "json", "--limit", "100",
    ])
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("INSECURE: device.smtp.security"),
        "the audit entry names the insecure setting: {stdout}"
    );

    let (code, stdout, stderr) =
        run(vec!["fleet", "status", "--tenant", "acme", "-o", "json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let fleet: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let problem = |device: &str| {
        fleet
            .as_array()
            .and_then(|a| a.iter().find(|d| d["device"] == device))
            .map(|d| d["problem"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("{device} not in fleet status: {fleet}"))
    };
    assert!(problem("lab-relay").contains("INSECURE"), "{fleet}");
    assert!(!problem("local-relay").contains("INSECURE"), "{fleet}");
    broker.shutdown().await;
}

/// A new gRPC connection to the TLS broker whose server certificate `ca_pem` signed, with the
/// client certificate of `agent` if given.
async fn tls_channel(
    broker: &TestBroker,
    ca_pem: &str,
    agent: Option<&tokenfleet_agent::identity::StoredIdentity>,
) -> tonic::transport::Channel {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(agent) = agent {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &agent.cert_pem,
            agent.key_pem.as_bytes(),
        ));
    }
    tonic::transport::Endpoint::from_shared(broker.grpc_url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// A new gRPC connection to the TLS broker without a client certificate, and its health check:
/// the channel (holding its connection) when it was served, else the call's status.
async fn anonymous_health(
    broker: &TestBroker,
    ca_pem: &str,
) -> Result<tonic::transport::Channel, tonic::Status> {
    let channel = tls_channel(broker, ca_pem, None).await;
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    Ok(channel)
}

/// A TLS broker executable with `limits` as its `[limits]` section, tenant `acme`, and agent
/// `site-1` enrolled in it: the broker, the CA of its server certificate (PEM) and the agent's
/// identity (kept in the returned directory).
async fn tls_broker_with_agent(
    limits: &str,
) -> (
    TestBroker,
    String,
    tokenfleet_agent::identity::StoredIdentity,
    tempfile::TempDir,
) {
    let broker = TestBroker::start_with(
        TestStore::Embedded,
        TestOptions {
            tls: true,
            binary_config: Some(format!("[limits]\n{limits}")),
            ..TestOptions::default()
        },
    )
    .await
    .unwrap();
    create_tenant(&broker, "acme").await;
    let code = enrollment_code(&mut broker.admin_client(), "acme", "site-1").await;
    let agent_dir = tempfile::tempdir().unwrap();
    let ca_pem = broker.tls_ca_pem().unwrap();
    let identity = tokenfleet_agent::identity::enroll(
        &broker.grpc_url(),
        &tokenfleet_agent::identity::EnrollmentCode::new(&code),
        Some(ca_pem.clone()),
        agent_dir.path(),
        "test",
    )
    .await
    .unwrap();
    (broker, ca_pem, identity, agent_dir)
}

/// The enrolled agent's call on a new connection with its certificate is served: its
/// certificate is read (the call gets past authentication, as tenant acme's agent, to the
/// missing device).
async fn assert_agent_served(
    broker: &TestBroker,
    ca_pem: &str,
    identity: &tokenfleet_agent::identity::StoredIdentity,
) {
    let agent = tls_channel(broker, ca_pem, Some(identity)).await;
    let status = TokenBrokerClient::new(agent)
        .issue_access_token(IssueAccessTokenRequest {
            device: "printer-1".into(),
            mailbox: "scans".into(),
            purpose: tokenfleet_proto::v1::MailPurpose::Send as i32,
            user_address: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status
            .message()
            .contains("device `printer-1` does not exist in tenant `acme`"),
        "{status}"
    );
}

/// A new gRPC connection to the TLS broker without a client certificate with a call in flight:
/// a `Health/Watch` stream (answered SERVING at once, then only on a change), kept open with
/// its channel; else the call's status.
async fn anonymous_watch(
    broker: &TestBroker,
    ca_pem: &str,
) -> Result<
    (
        tonic::transport::Channel,
        tonic::Streaming<HealthCheckResponse>,
    ),
    tonic::Status,
> {
    let channel = tls_channel(broker, ca_pem, None).await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await?
        .into_inner();
    let first = watch.message().await?.unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    Ok((channel, watch))
}

/// A new gRPC connection to the TLS broker without a client certificate holding a half-open
/// `Enroll` call: its headers are sent, its request message never is. The task ends with the
/// call's error once the broker closes the connection.
async fn half_open_enroll(
    broker: &TestBroker,
    ca_pem: &str,
) -> tokio::task::JoinHandle<tonic::Status> {
    let channel = tls_channel(broker, ca_pem, None).await;
    tokio::spawn(async move {
        match tokenfleet_testkit::silent::half_open_enroll(channel).await {
            Ok(answer) => panic!("a half-open Enroll call was answered: {answer:?}"),
            Err(status) => status,
        }
    })
}

/// Connections without a client certificate are held to `[limits]
/// grpc_max_anonymous_connections`, through the broker executable over TLS. Calls that prove
/// nothing do not hold a slot: with every slot taken by a half-open `Enroll` call or a
/// `Health/Watch` stream, `tokenfleetctl` gets in at once, closing the one that waited longest
/// (the others untouched). Calls whose API key was accepted do: with every slot held by a
/// `tokenfleetctl device test` waiting for the agent, a new connection's call gets
/// RESOURCE_EXHAUSTED naming the limit (also through `tokenfleetctl`), while the agent with its
/// certificate is still served and the tests in flight end with their verdict; once they are
/// done, `tokenfleetctl` gets in again.
#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_certificate_cannot_take_the_agents_slots() {
    const LIMIT: usize = 3;
    let (broker, ca_pem, identity, _agent_dir) =
        tls_broker_with_agent(&format!("grpc_max_anonymous_connections = {LIMIT}\n")).await;
    let (code, _, stderr) = broker
        .ctl(&[
            "device",
            "create",
            "--tenant",
            "acme",
            "--name",
            "mfp-limits",
            "--agent",
            "site-1",
            "--sender-mode",
            "login_user",
        ])
        .await;
    assert_eq!(code, 0, "{stderr}");

    // Every slot taken by a call that proves nothing, the half-open one first: the test's admin
    // channel and the enrollment's connection wait longer, so the new ones close them first.
    let half_open = half_open_enroll(&broker, &ca_pem).await;
    let mut watches = Vec::new();
    for _ in 1..LIMIT {
        watches.push(anonymous_watch(&broker, &ca_pem).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!half_open.is_finished(), "the half-open call ended early");
    // The old rule (any call in flight holds its slot) answered this RESOURCE_EXHAUSTED.
    let (code, stdout, stderr) = broker.ctl(&["tenant", "list"]).await;
    assert_eq!(
        code, 0,
        "calls that prove nothing kept tokenfleetctl out: {stderr}"
    );
    assert!(stdout.contains("acme"), "{stdout}");
    // It closed the one that waited longest, the half-open call, and nothing else.
    let ended = tokio::time::timeout(Duration::from_secs(5), half_open)
        .await
        .expect("the half-open call's connection was not closed")
        .unwrap();
    assert_ne!(ended.code(), tonic::Code::Ok, "{ended}");
    for (n, (_, watch)) in watches.iter_mut().enumerate() {
        let next = tokio::time::timeout(Duration::from_millis(300), watch.message()).await;
        assert!(next.is_err(), "watch {n} ended: {next:?}");
    }

    // The agent's status stream, on its own connection with its certificate; the commands it
    // gets are collected and never answered, so connection tests wait for their deadline.
    let (report, reports) = tokio::sync::mpsc::channel(4);
    report
        .send(tokenfleet_proto::v1::AgentReport {
            time: Some(prost_types::Timestamp {
                seconds: time::OffsetDateTime::now_utc().unix_timestamp(),
                nanos: 0,
            }),
            software_version: "limits-test".into(),
            sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut commands = TokenBrokerClient::new(tls_channel(&broker, &ca_pem, Some(&identity)).await)
        .status_stream(tokio_stream::wrappers::ReceiverStream::new(reports))
        .await
        .unwrap()
        .into_inner();
    let (tests_seen, mut tests_arrived) = tokio::sync::mpsc::unbounded_channel();
    let _reader = tokio::spawn(async move {
        while let Ok(Some(command)) = commands.message().await {
            if let Some(tokenfleet_proto::v1::agent_command::Command::TestConnection(_)) =
                command.command
            {
                let _ = tests_seen.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = broker
            .admin_client()
            .get_fleet_status(tokenfleet_proto::v1::GetFleetStatusRequest {
                tenant: "acme".into(),
            })
            .await;
        if status.is_ok_and(|s| s.into_inner().devices.iter().any(|d| d.agent_connected)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's status stream was not seen"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every slot held by a call whose API key was accepted: three connection tests in flight
    // (closing the two watches and the idle admin channel for their slots).
    let device_test = || {
        broker.ctl(&[
            "device",
            "test",
            "mfp-limits",
            "--tenant",
            "acme",
            "--timeout",
            "6",
        ])
    };
    let over_the_limit = async {
        for n in 0..LIMIT {
            tokio::time::timeout(Duration::from_secs(15), tests_arrived.recv())
                .await
                .unwrap_or_else(|_| panic!("only {n} connection tests reached the agent"));
        }
        // Over the limit with every one serving a proven call: refused, naming the limit.
        let status = anonymous_health(&broker, &ca_pem)
            .await
            .expect_err("a connection over the anonymous limit was served");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        assert!(
            status.message().contains(&format!(
                "without a client certificate are open (limits.grpc_max_anonymous_connections = {LIMIT})"
            )),
            "{status}"
        );
        // tokenfleetctl (an API-key client) says why.
        let (code, _, stderr) = broker.ctl(&["tenant", "list"]).await;
        assert_ne!(code, 0, "{stderr}");
        assert!(
            stderr.contains(
                "resource exhausted: too many gRPC connections without a client certificate are open"
            ),
            "{stderr}"
        );
        // The agent with its certificate is served.
        assert_agent_served(&broker, &ca_pem, &identity).await;
    };
    let (first, second, third, ()) =
        tokio::join!(device_test(), device_test(), device_test(), over_the_limit);
    // The tests in flight were not cut short: each ended with the broker's verdict.
    for (code, stdout, stderr) in [first, second, third] {
        assert!(stdout.contains("verdict:"), "exit {code}: {stdout}{stderr}");
    }
    for (n, (_, watch)) in watches.iter_mut().enumerate() {
        let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
        assert!(
            matches!(next, Ok(Err(_) | Ok(None))),
            "watch {n} was not closed for a connection test: {next:?}"
        );
    }
    // With the tests done, tokenfleetctl gets in again.
    let (code, stdout, stderr) = broker.ctl(&["tenant", "list"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("acme"), "{stdout}");
    // What the anonymous limit closed is counted: the half-open call's connection and the two
    // watch streams' made room, and the health check and tenant list above were refused.
    let text = http_get(broker.http_addr, "/metrics").await.1;
    assert!(
        closed_by_limit(&text, "grpc_anonymous", "made_room") >= 3.0
            && closed_by_limit(&text, "grpc_anonymous", "refused") >= 2.0,
        "{text}"
    );
    broker.shutdown().await;
}

/// `tokenfleet_listener_connections_closed_total` of `listener` for `reason` in a scrape.
fn closed_by_limit(text: &str, listener: &str, reason: &str) -> f64 {
    crate::agent_metrics::must(
        text,
        &format!(
            "tokenfleet_listener_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        ),
    )
}

/// A full gRPC listener makes room for a new connection by closing the one that has waited
/// longest in its TLS handshake: through the broker executable with `grpc_max_connections = 4`,
/// clients that connect and send nothing — six times as many as there are slots — are closed
/// longest-waiting first at once (not after the 10 s handshake timeout), and neither an agent nor
/// `tokenfleetctl` is kept out while the newest of them still wait.
#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_cannot_keep_clients_out() {
    const SLOTS: usize = 4;
    const SILENT: usize = 6 * SLOTS;
    let (broker, ca_pem, identity, _agent_dir) = tls_broker_with_agent(&format!(
        "grpc_max_connections = {SLOTS}\ngrpc_max_anonymous_connections = 3\n"
    ))
    .await;
    let started = Instant::now();
    let mut silent = connect_silent(broker.grpc_addr, SILENT).await;
    // The test's admin channel holds a slot (the enrollment's connection may still hold one):
    // the silent connections share the other two or three, each new one closing the oldest.
    let waiting = SLOTS - 2;
    for (n, stream) in silent.iter_mut().enumerate().take(SILENT - SLOTS + 1) {
        assert!(
            closed_within(stream, Duration::from_secs(3)).await,
            "silent connection {n} of {SILENT} was not closed for a newer one"
        );
    }
    for (n, stream) in silent.iter_mut().enumerate().skip(SILENT - waiting) {
        assert!(
            !closed_within(stream, Duration::from_millis(200)).await,
            "silent connection {n}, one of the newest {waiting}, was closed"
        );
    }
    // Clients that do their handshake get in past the silent ones, each closing the oldest.
    assert_agent_served(&broker, &ca_pem, &identity).await;
    let (code, stdout, stderr) = broker.ctl(&["tenant", "list"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("acme"), "{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the checks outlasted the handshake timeout, so they prove nothing: {:?}",
        started.elapsed()
    );
    // Each silent connection closed for a newer one is counted; none was refused (one waited).
    let text = http_get(broker.http_addr, "/metrics").await.1;
    let made_room = closed_by_limit(&text, "grpc", "made_room");
    assert!(
        made_room >= (SILENT - SLOTS + 1) as f64,
        "{made_room}: {text}"
    );
    assert_eq!(closed_by_limit(&text, "grpc", "refused"), 0.0, "{text}");
    broker.shutdown().await;
}

/// A full HTTP listener makes room for a new connection by closing the one that has waited
/// longest for a request — before its first one or between keep-alive requests: through the
/// broker executable with `http_max_connections = 4`, a keep-alive connection idle after its
/// answer and twelve clients that connect and send nothing are closed longest-waiting first at
/// once (not after the 10 s header timeout), and `/healthz` still answers while the newest wait.
#[tokio::test(flavor = "multi_thread")]
async fn idle_http_connections_cannot_keep_probes_out() {
    const SLOTS: usize = 4;
    const IDLE: usize = 3 * SLOTS;
    let broker = TestBroker::start_with(
        TestStore::Embedded,
        TestOptions {
            binary_config: Some(format!("[limits]\nhttp_max_connections = {SLOTS}\n")),
            ..TestOptions::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    // Served once, then idle on keep-alive.
    let mut kept = tokio::net::TcpStream::connect(broker.http_addr)
        .await
        .unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = kept.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "closed before answering: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let mut idle = connect_silent(broker.http_addr, IDLE).await;
    assert!(
        closed_within(&mut kept, Duration::from_secs(3)).await,
        "the idle keep-alive connection was not closed for a newer one"
    );
    for (n, stream) in idle.iter_mut().enumerate().take(IDLE - SLOTS) {
        assert!(
            closed_within(stream, Duration::from_secs(3)).await,
            "idle connection {n} of {IDLE} was not closed for a newer one"
        );
    }
    for (n, stream) in idle.iter_mut().enumerate().skip(IDLE - 2) {
        assert!(
            !closed_within(stream, Duration::from_millis(200)).await,
            "idle connection {n}, one of the newest two, was closed"
        );
    }
    assert_eq!(http_get(broker.http_addr, "/healthz").await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the checks outlasted the header timeout, so they prove nothing: {:?}",
        started.elapsed()
    );
    // The keep-alive connection and each idle one closed for a newer one are counted.
    let text = http_get(broker.http_addr, "/metrics").await.1;
    let made_room = closed_by_limit(&text, "http", "made_room");
    assert!(
        made_room >= (IDLE - SLOTS + 1) as f64,
        "{made_room}: {text}"
    );
    broker.shutdown().await;
}
