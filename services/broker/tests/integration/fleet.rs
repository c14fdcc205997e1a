//! Fleet status against real brokers (`server::serve` over TLS on 127.0.0.1, embedded store or
//! one real Redis shared by two replicas) and fake agents: tonic clients with enrolled client
//! certificates that call `GetAgentConfig` and hold a `StatusStream`.
//!
//! Covers the agent configuration (content, revision, ReloadConfig after a device change), fleet
//! status (a FAILING report within one heartbeat, UNKNOWN after silence, no agent, tenant
//! isolation), connection tests (answered by the agent, across replicas, agent unreachable,
//! timeout bounds, audit) and the stream's end (revoked agent, replaced by a newer stream).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use tokenfleet_broker::api_keys;
use tokenfleet_broker::fleet::store::{DeviceStatusRecord, device_status_key};
use tokenfleet_domain::{Device, IngressCredentials, MailboxKind, Role, SmtpProfile, TlsMode};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_seal::Secret;
use tokenfleet_store::Precondition;
use tokenfleet_testkit::logs;
use tokenfleet_testkit::redis::RedisServer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{Broker, Launch, eventually, fixed_admin_device, seal_key, send_mailbox};

// ----------------------------------------------------------------------------------------------
// Harness
// ----------------------------------------------------------------------------------------------

const HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNo";

/// Brokers here run with a 1 s heartbeat.
fn heartbeat(raw: &mut tokenfleet_broker::config::RawConfig) {
    raw.agents.heartbeat_seconds = 1;
}

/// This module's helpers on the shared test broker.
trait FleetBroker {
    async fn start() -> Broker;
    async fn on_redis(url: &str, key_file: &Path, admin_key: Option<Secret>) -> Broker;
    async fn key(&self, role: Role, tenant: Option<&str>) -> Secret;
    async fn put_mailbox(&self, tenant: &str, name: &str, kind: MailboxKind);
    async fn put_device(&self, device: &Device);
    async fn fleet(&self, tenant: &str) -> Vec<pb::FleetDeviceStatus>;
    async fn fleet_device(&self, tenant: &str, device: &str) -> pb::FleetDeviceStatus;
    async fn site_a_with_mfp(&self) -> TokenBrokerClient<Channel>;
    async fn agent_present(&self, what: &str);
}

impl FleetBroker for Broker {
    /// A broker over TLS on the embedded store, with tenants `acme` and `beta`.
    async fn start() -> Broker {
        logs::capture();
        let broker = Broker::launch(Launch::tls(), heartbeat).await;
        broker.put_tenant("acme").await;
        broker.put_tenant("beta").await;
        broker
    }

    /// A broker over TLS on Redis at `url` (another replica when one already runs there).
    async fn on_redis(url: &str, key_file: &Path, admin_key: Option<Secret>) -> Broker {
        logs::capture();
        let launch = Launch {
            tls: true,
            redis: Some(url.to_owned()),
            seal_key_file: Some(key_file.to_path_buf()),
            admin_key,
            ..Launch::default()
        };
        Broker::launch(launch, heartbeat).await
    }

    async fn key(&self, role: Role, tenant: Option<&str>) -> Secret {
        let (_, key) = api_keys::create(&self.state, role, tenant, "test")
            .await
            .unwrap();
        logs::secret(key.expose());
        key
    }

    async fn put_mailbox(&self, tenant: &str, name: &str, kind: MailboxKind) {
        let mailbox = send_mailbox(tenant, name, format!("{name}@{tenant}.example"), kind);
        self.records()
            .put(&mailbox, Precondition::Any)
            .await
            .unwrap();
        // Written to the store directly: announced as the Admin API announces its changes, so
        // the replicas drop their configuration snapshots of the tenant.
        tokenfleet_broker::fleet::wake::config_changed(&self.state, tenant).await;
    }

    async fn put_device(&self, device: &Device) {
        self.records().put(device, Precondition::Any).await.unwrap();
        tokenfleet_broker::fleet::wake::config_changed(&self.state, &device.tenant).await;
    }

    async fn fleet(&self, tenant: &str) -> Vec<pb::FleetDeviceStatus> {
        self.admin()
            .get_fleet_status(pb::GetFleetStatusRequest {
                tenant: tenant.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .devices
    }

    async fn fleet_device(&self, tenant: &str, device: &str) -> pb::FleetDeviceStatus {
        self.fleet(tenant)
            .await
            .into_iter()
            .find(|d| d.device == device)
            .unwrap()
    }

    /// Mailbox `scan`, agent `site-a` enrolled and device `mfp` hosted by it, all in `acme`;
    /// returns the agent's client.
    async fn site_a_with_mfp(&self) -> TokenBrokerClient<Channel> {
        self.put_mailbox("acme", "scan", MailboxKind::Admin).await;
        let client = self.agent_client("acme", "site-a").await;
        self.put_device(&device("acme", "mfp", "site-a")).await;
        client
    }

    /// Waits until the fleet status shows the agent of `acme/mfp` connected.
    async fn agent_present(&self, what: &str) {
        eventually(what, Duration::from_secs(2), async || {
            self.fleet_device("acme", "mfp")
                .await
                .agent_connected
                .then_some(())
        })
        .await;
    }
}

fn device(tenant: &str, name: &str, agent: &str) -> Device {
    Device {
        display_name: format!("printer {name}"),
        ..fixed_admin_device(tenant, name, agent)
    }
}

/// A fake agent holding a status stream.
struct FakeAgent {
    reports: mpsc::Sender<pb::AgentReport>,
    commands: tonic::Streaming<pb::AgentCommand>,
    sequence: u64,
}

impl FakeAgent {
    async fn connect(client: &mut TokenBrokerClient<Channel>, first: pb::AgentReport) -> FakeAgent {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let commands = client
            .status_stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        FakeAgent {
            reports: tx,
            commands,
            sequence: 1,
        }
    }

    async fn send(&mut self, mut report: pb::AgentReport) {
        self.sequence += 1;
        report.sequence = self.sequence;
        self.reports.send(report).await.unwrap();
    }

    /// The next command, or what ended the stream, within `within`.
    async fn next(&mut self, within: Duration) -> Result<Option<pb::AgentCommand>, tonic::Status> {
        tokio::time::timeout(within, self.commands.message())
            .await
            .expect("no command or stream end in time")
    }
}

fn report(revision: &str, devices: Vec<pb::DeviceStatus>) -> pb::AgentReport {
    pb::AgentReport {
        time: None,
        software_version: "agent-2.0".into(),
        sequence: 1,
        config_revision: revision.into(),
        devices,
        command_result: None,
    }
}

fn status(device: &str, health: pb::DeviceHealth, problem: &str) -> pb::DeviceStatus {
    pb::DeviceStatus {
        device: device.into(),
        health: health as i32,
        problem: problem.into(),
        queue_depth: 2,
        oldest_queued_seconds: 75,
        ..Default::default()
    }
}

/// Answers every connection test with SMTP_AUTH_DISABLED; other commands with ok.
fn answer_tests(mut agent: FakeAgent) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(command)) = agent.commands.message().await {
            let result = match command.command {
                Some(pb::agent_command::Command::TestConnection(test)) => pb::CommandResult {
                    command_id: command.id,
                    ok: false,
                    detail: String::new(),
                    connection_test: Some(pb::ConnectionTestResult {
                        device: test.device,
                        target: test.target,
                        verdict: pb::ConnectionVerdict::SmtpAuthDisabled as i32,
                        summary: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled".into(),
                        fix: "Set-CASMailbox -SmtpClientAuthenticationDisabled $false".into(),
                        steps: vec![pb::ConnectionTestStep {
                            name: "auth".into(),
                            ok: false,
                            detail: "535 5.7.139".into(),
                            duration_ms: 12,
                        }],
                        endpoint: "smtp.office365.com:587".into(),
                        ..Default::default()
                    }),
                },
                _ => pb::CommandResult {
                    command_id: command.id,
                    ok: true,
                    detail: "done".into(),
                    connection_test: None,
                },
            };
            let mut answer = report("", vec![]);
            answer.command_result = Some(result);
            if agent.reports.send(answer).await.is_err() {
                return;
            }
        }
    })
}

fn test_request(device: &str, timeout: u32) -> pb::TestConnectionRequest {
    pb::TestConnectionRequest {
        tenant: "acme".into(),
        device: device.into(),
        target: pb::ConnectionTarget::Send as i32,
        timeout_seconds: timeout,
    }
}

// ----------------------------------------------------------------------------------------------
// Tests
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn agent_config_lists_the_agents_devices_and_a_change_pushes_reload() {
    let broker = Broker::start().await;
    broker.put_mailbox("acme", "scan", MailboxKind::Admin).await;
    broker.put_mailbox("acme", "bulk", MailboxKind::Bulk).await;
    broker.put_mailbox("acme", "alice", MailboxKind::User).await;
    let mut client = broker.agent_client("acme", "site-a").await;
    broker.agent_client("acme", "site-b").await;

    let mut mfp = device("acme", "mfp", "site-a");
    mfp.bulk_mailbox = "bulk".into();
    mfp.allowed_mailboxes = vec!["alice".into()];
    mfp.smtp = SmtpProfile {
        server: "smtp.office365.com".into(),
        security: TlsMode::Starttls,
        ..SmtpProfile::default()
    };
    mfp.ingress = IngressCredentials {
        username: "scanner".into(),
        password_hash: Some(HASH.into()),
        allowed_sources: vec!["10.0.0.0/24".into()],
        ..IngressCredentials::default()
    };
    broker.put_device(&mfp).await;
    broker
        .put_device(&device("acme", "elsewhere", "site-b"))
        .await;

    let config = client
        .get_agent_config(pb::GetAgentConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (config.tenant.as_str(), config.agent.as_str()),
        ("acme", "site-a")
    );
    assert_eq!(config.heartbeat_seconds, 1);
    assert_eq!(config.revision.len(), 64);
    // The wire configuration carries the revision of the core's configuration it encodes.
    let built = tokenfleet_broker::fleet::config::build(
        &broker.state,
        "acme",
        "site-a",
        config.heartbeat_seconds,
    )
    .await
    .unwrap();
    assert_eq!(built.revision, config.revision);
    assert_eq!(tokenfleet_broker::fleet::revision(&built), config.revision);
    assert_eq!(config.devices.len(), 1, "only the agent's own devices");
    let d = &config.devices[0];
    assert_eq!(d.name, "mfp");
    assert_eq!(d.display_name, "printer mfp");
    assert_eq!(d.sender_mode, pb::SenderMode::FixedAdmin as i32);
    let admin = d.admin_mailbox.as_ref().unwrap();
    assert_eq!(
        (admin.name.as_str(), admin.address.as_str(), admin.kind),
        ("scan", "scan@acme.example", pb::MailboxKind::Admin as i32)
    );
    let bulk = d.bulk_mailbox.as_ref().unwrap();
    assert_eq!(
        (bulk.address.as_str(), bulk.kind),
        ("bulk@acme.example", pb::MailboxKind::Bulk as i32)
    );
    assert_eq!(d.allowed_mailboxes.len(), 1);
    assert_eq!(d.allowed_mailboxes[0].address, "alice@acme.example");
    let smtp = d.smtp.as_ref().unwrap();
    assert_eq!(
        (smtp.server.as_str(), smtp.port),
        ("smtp.office365.com", 587)
    );
    assert_eq!(smtp.method, pb::SendMethod::Smtp as i32);
    assert!(d.fetch.is_none());
    assert_eq!(d.ingress_username, "scanner");
    assert_eq!(d.ingress_password_hash, HASH);
    assert_eq!(d.ingress_allowed_sources, vec!["10.0.0.0/24".to_owned()]);

    // Same content, same revision.
    let again = client
        .get_agent_config(pb::GetAgentConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revision, config.revision);

    // The agent runs the current revision: no reload.
    let mut agent = FakeAgent::connect(&mut client, report(&config.revision, vec![])).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(600), agent.commands.message())
            .await
            .is_err(),
        "no command while the agent runs the current configuration"
    );

    // A device change makes a new revision; a report with the old one gets ReloadConfig (once
    // the stream's cached configuration, at most a second old, has been rebuilt).
    mfp.smtp.port = 2525;
    broker.put_device(&mfp).await;
    let changed = client
        .get_agent_config(pb::GetAgentConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_ne!(changed.revision, config.revision);
    assert_eq!(changed.devices[0].smtp.as_ref().unwrap().port, 2525);
    let deadline = Instant::now() + Duration::from_secs(5);
    let command = loop {
        agent.send(report(&config.revision, vec![])).await;
        match tokio::time::timeout(Duration::from_millis(300), agent.commands.message()).await {
            Ok(message) => break message.unwrap().unwrap(),
            Err(_) => assert!(Instant::now() < deadline, "no ReloadConfig within 5 s"),
        }
    };
    assert!(!command.id.is_empty());
    assert!(matches!(
        command.command,
        Some(pb::agent_command::Command::ReloadConfig(_))
    ));
}

#[tokio::test]
async fn a_failing_report_shows_within_a_heartbeat_and_silence_turns_unknown() {
    let broker = Broker::start().await;
    let mut client = broker.site_a_with_mfp().await;
    broker.put_device(&device("acme", "lobby", "site-a")).await;
    broker.put_device(&device("acme", "orphan", "")).await;

    let sent = Instant::now();
    let mut agent = FakeAgent::connect(
        &mut client,
        report(
            "",
            vec![
                status(
                    "mfp",
                    pb::DeviceHealth::Failing,
                    "535 5.7.139 SMTP AUTH disabled",
                ),
                status("lobby", pb::DeviceHealth::Ok, ""),
                // Not this agent's device: ignored.
                status("intruder", pb::DeviceHealth::Ok, ""),
            ],
        ),
    )
    .await;
    let mfp = eventually("the FAILING report", Duration::from_secs(1), async || {
        let d = broker.fleet_device("acme", "mfp").await;
        (d.health == pb::DeviceHealth::Failing as i32).then_some(d)
    })
    .await;
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "visible within one heartbeat"
    );
    assert_eq!(mfp.problem, "535 5.7.139 SMTP AUTH disabled");
    assert_eq!(mfp.agent, "site-a");
    assert!(mfp.agent_connected);
    assert!(mfp.last_report_time.is_some());
    assert_eq!(mfp.status.as_ref().unwrap().queue_depth, 2);
    assert_eq!(mfp.agent_software_version, "agent-2.0");

    // Problems first: FAILING, UNKNOWN (no agent), then OK.
    let order: Vec<(String, i32)> = broker
        .fleet("")
        .await
        .into_iter()
        .map(|d| (d.device, d.health))
        .collect();
    assert_eq!(
        order,
        vec![
            ("mfp".to_owned(), pb::DeviceHealth::Failing as i32),
            ("orphan".to_owned(), pb::DeviceHealth::Unknown as i32),
            ("lobby".to_owned(), pb::DeviceHealth::Ok as i32),
        ]
    );
    let orphan = broker.fleet_device("acme", "orphan").await;
    assert_eq!(orphan.problem, "no agent assigned");
    assert!(
        broker
            .records()
            .get::<DeviceStatusRecord>(&device_status_key("acme", "intruder"))
            .await
            .unwrap()
            .is_none()
    );
    let seen = broker
        .records()
        .get::<tokenfleet_domain::Agent>(&tokenfleet_broker::records::agent_key("acme", "site-a"))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert!(seen.last_seen.is_some());
    assert_eq!(seen.software_version, "agent-2.0");

    // The agent recovers, then goes silent: after three heartbeats the device is UNKNOWN.
    agent
        .send(report("", vec![status("mfp", pb::DeviceHealth::Ok, "")]))
        .await;
    eventually("the OK report", Duration::from_secs(1), async || {
        let d = broker.fleet_device("acme", "mfp").await;
        (d.health == pb::DeviceHealth::Ok as i32).then_some(())
    })
    .await;
    drop(agent);
    let silent = eventually(
        "UNKNOWN after silence",
        Duration::from_secs(8),
        async || {
            let d = broker.fleet_device("acme", "mfp").await;
            (d.health == pb::DeviceHealth::Unknown as i32).then_some(d)
        },
    )
    .await;
    assert!(
        silent.problem.starts_with("agent \"site-a\" not seen for "),
        "{}",
        silent.problem
    );
    assert!(!silent.agent_connected);
    assert!(silent.status.is_some(), "the last report stays visible");
}

#[tokio::test]
async fn fleet_status_stays_inside_the_callers_tenant() {
    let broker = Broker::start().await;
    broker.put_device(&device("acme", "acme-mfp", "")).await;
    broker.put_device(&device("beta", "beta-mfp", "")).await;
    let beta_admin = broker.key(Role::TenantAdmin, Some("beta")).await;
    let mut beta = broker.admin_with(&beta_admin);

    let seen = beta
        .get_fleet_status(pb::GetFleetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].tenant.as_str(), seen[0].device.as_str()),
        ("beta", "beta-mfp")
    );
    let err = beta
        .get_fleet_status(pb::GetFleetStatusRequest {
            tenant: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = beta
        .test_connection(test_request("acme-mfp", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Fleet-wide callers see both.
    let all = broker.fleet("").await;
    assert_eq!(all.len(), 2);
    let viewer = broker.key(Role::Viewer, None).await;
    let all = broker
        .admin_with(&viewer)
        .get_fleet_status(pb::GetFleetStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(all.len(), 2);
}

#[tokio::test]
async fn a_connection_test_is_answered_by_the_agent_and_audited() {
    let broker = Broker::start().await;
    let mut client = broker.site_a_with_mfp().await;
    let agent = FakeAgent::connect(
        &mut client,
        report("", vec![status("mfp", pb::DeviceHealth::Ok, "")]),
    )
    .await;
    broker.agent_present("the agent's presence").await;
    let answering = answer_tests(agent);

    // A viewer of the tenant may not run tests (the agent would connect with the device's
    // tokens); a tenant admin may.
    let viewer = broker.key(Role::Viewer, Some("acme")).await;
    let err = broker
        .admin_with(&viewer)
        .test_connection(test_request("mfp", 10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let tenant_admin = broker.key(Role::TenantAdmin, Some("acme")).await;
    let started = Instant::now();
    let result = broker
        .admin_with(&tenant_admin)
        .test_connection(test_request("mfp", 10))
        .await
        .unwrap()
        .into_inner();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        result.verdict,
        pb::ConnectionVerdict::SmtpAuthDisabled as i32
    );
    assert_eq!(result.device, "mfp");
    assert_eq!(result.target, pb::ConnectionTarget::Send as i32);
    assert!(result.summary.contains("5.7.139"));
    assert_eq!(result.steps.len(), 1);
    assert!(result.time.is_some());

    let err = broker
        .admin()
        .test_connection(test_request("mfp", 121))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("timeout_seconds:"),
        "{}",
        err.message()
    );
    let err = broker
        .admin()
        .test_connection(test_request("nope", 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let events = broker
        .admin()
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant: "acme".into(),
            page_size: 1000,
            page_token: String::new(),
            kind: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events.iter().any(|e| e.action == "device.test"
            && e.result == "ok"
            && e.target == "tenants/acme/devices/mfp"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.action == "device.test" && e.result == "invalid_argument")
    );
    answering.abort();
}

#[tokio::test]
async fn unreachable_agents_are_reported_within_the_deadline() {
    let broker = Broker::start().await;
    let mut client = broker.site_a_with_mfp().await;
    broker.put_device(&device("acme", "orphan", "")).await;

    // Not connected: answered at once.
    let started = Instant::now();
    let result = broker
        .admin()
        .test_connection(test_request("mfp", 5))
        .await
        .unwrap()
        .into_inner();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        result.verdict,
        pb::ConnectionVerdict::AgentUnreachable as i32
    );
    assert!(
        result.summary.contains("not connected"),
        "{}",
        result.summary
    );

    // No agent assigned: nothing to route to.
    let err = broker
        .admin()
        .test_connection(test_request("orphan", 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("no agent"), "{}", err.message());

    // Connected but silent: unreachable when the deadline passes, not much later.
    let mut agent = FakeAgent::connect(&mut client, report("", vec![])).await;
    broker.agent_present("the agent's presence").await;
    let keep_alive = tokio::spawn(async move {
        // Heartbeats but never an answer.
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            agent.send(report("", vec![])).await;
        }
    });
    let started = Instant::now();
    let result = broker
        .admin()
        .test_connection(test_request("mfp", 2))
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(
        result.verdict,
        pb::ConnectionVerdict::AgentUnreachable as i32
    );
    assert!(
        result.summary.contains("is connected but did not answer"),
        "{}",
        result.summary
    );
    keep_alive.abort();
}

#[tokio::test]
async fn a_revoked_agents_stream_ends_and_a_newer_stream_replaces_an_older_one() {
    let broker = Broker::start().await;
    let mut client = broker.site_a_with_mfp().await;

    let mut first = FakeAgent::connect(&mut client, report("", vec![])).await;
    broker.agent_present("the first stream's presence").await;
    let mut second = FakeAgent::connect(&mut client, report("", vec![])).await;
    let ended = loop {
        match first.next(Duration::from_secs(5)).await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("replaced"),
        "{}",
        status.message()
    );

    broker
        .admin()
        .revoke_agent(pb::RevokeAgentRequest {
            tenant: "acme".into(),
            name: "site-a".into(),
        })
        .await
        .unwrap();
    second.send(report("", vec![])).await;
    let ended = loop {
        match second.next(Duration::from_secs(5)).await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("revoked"), "{}", status.message());
    eventually(
        "the presence marker to go",
        Duration::from_secs(2),
        async || (!broker.fleet_device("acme", "mfp").await.agent_connected).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn a_connection_test_reaches_an_agent_streaming_to_another_replica() {
    let redis = RedisServer::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = seal_key(keys.path());
    let a = Broker::on_redis(&redis.url(), &key_file, None).await;
    a.put_tenant("acme").await;
    a.put_mailbox("acme", "scan", MailboxKind::Admin).await;
    let b = Broker::on_redis(&redis.url(), &key_file, Some(a.admin_key.clone())).await;

    // The agent streams to replica A.
    let mut client = a.agent_client("acme", "site-a").await;
    a.put_device(&device("acme", "mfp", "site-a")).await;
    let agent = FakeAgent::connect(
        &mut client,
        report(
            "",
            vec![status(
                "mfp",
                pb::DeviceHealth::Degraded,
                "queue building up",
            )],
        ),
    )
    .await;
    // Replica B sees the status and the connection.
    let seen = eventually(
        "the status on replica B",
        Duration::from_secs(2),
        async || {
            let d = b.fleet_device("acme", "mfp").await;
            (d.agent_connected && d.health == pb::DeviceHealth::Degraded as i32).then_some(d)
        },
    )
    .await;
    assert_eq!(seen.problem, "queue building up");
    let answering = answer_tests(agent);

    // The test asked on replica B is answered by the agent on replica A.
    let result = b
        .admin()
        .test_connection(test_request("mfp", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        result.verdict,
        pb::ConnectionVerdict::SmtpAuthDisabled as i32
    );
    assert_eq!(result.endpoint, "smtp.office365.com:587");
    answering.abort();
}

/// Only answers to commands the stream sent, while someone waits, are stored: an answer for a
/// command id the agent made up (or one arriving after the waiter gave up) is dropped, so an
/// agent can neither plant results for other tests nor leave records nobody reads.
#[tokio::test]
async fn answers_nobody_waits_for_are_not_stored() {
    use tokenfleet_broker::fleet::store::AGENT_COMMAND_RESULTS;
    use tokenfleet_store::Scope;

    let broker = Broker::start().await;
    let mut client = broker.site_a_with_mfp().await;
    let mut agent = FakeAgent::connect(
        &mut client,
        report("", vec![status("mfp", pb::DeviceHealth::Ok, "")]),
    )
    .await;
    broker.agent_present("the agent's presence").await;
    let results = || async {
        broker
            .state
            .store
            .count(&Scope::Tenant("acme".into()), AGENT_COMMAND_RESULTS)
            .await
            .unwrap()
    };

    // Made-up ids, then a report marked by its problem text so we know it was processed.
    let mut unsolicited = report("", vec![status("mfp", pb::DeviceHealth::Ok, "")]);
    unsolicited.command_result = Some(pb::CommandResult {
        command_id: "1700000000000-00000000deadbeef".into(),
        ok: true,
        detail: "planted".into(),
        connection_test: Some(pb::ConnectionTestResult {
            verdict: pb::ConnectionVerdict::Ok as i32,
            ..Default::default()
        }),
    });
    agent.send(unsolicited).await;
    agent
        .send(report(
            "",
            vec![status("mfp", pb::DeviceHealth::Degraded, "marker")],
        ))
        .await;
    eventually("the marker report", Duration::from_secs(3), async || {
        (broker.fleet_device("acme", "mfp").await.problem == "marker").then_some(())
    })
    .await;
    assert_eq!(results().await, 0, "an unsolicited answer was stored");

    // A real test still gets its answer through (and the record is consumed).
    let answering = answer_tests(agent);
    let result = broker
        .admin()
        .test_connection(test_request("mfp", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        result.verdict,
        pb::ConnectionVerdict::SmtpAuthDisabled as i32
    );
    assert_eq!(results().await, 0);
    answering.abort();
}

/// Queued commands past their expiry, answers nobody waits for any more and statuses of deleted
/// devices are removed by the periodic sweep; live ones stay, and a second sweep finds nothing.
#[tokio::test]
async fn expired_commands_and_unread_answers_are_swept() {
    use tokenfleet_broker::fleet::housekeeping::{self, ANSWER_KEEP, Swept};
    use tokenfleet_broker::fleet::model::{AgentCommand, Command, CommandResult, DeviceReport};
    use tokenfleet_broker::fleet::store::{CommandAnswer, QueuedCommand};
    use tokenfleet_broker::records::Records;
    use tokenfleet_store::Scope;

    let broker = Broker::start().await;
    let now = broker.state.clock.now();
    let records = Records::new(broker.state.store.as_ref());
    let command = |tenant: &str, id: &str, expires| {
        let command = AgentCommand {
            id: id.into(),
            command: Some(Command::ReloadConfig),
        };
        QueuedCommand::new(tenant, "site-a", command, expires)
    };
    let answer = |tenant: &str, id: &str, time| {
        let result = CommandResult {
            command_id: id.into(),
            ..Default::default()
        };
        CommandAnswer::new(tenant, "site-a", result, time)
    };
    let second = time::Duration::seconds(1);
    for queued in [
        command("acme", "1-expired", now - second),
        command("beta", "2-expired", now),
        command("acme", "3-waiting", now + 60 * second),
    ] {
        records.put(&queued, Precondition::Absent).await.unwrap();
    }
    for stored in [
        answer("acme", "4-unread", now - ANSWER_KEEP),
        answer("acme", "5-fresh", now - ANSWER_KEEP + second),
    ] {
        records.put(&stored, Precondition::Absent).await.unwrap();
    }

    // Statuses: one of a device that exists, one of a device deleted since it reported.
    broker.put_device(&device("acme", "mfp", "site-a")).await;
    for name in ["mfp", "gone"] {
        let report = DeviceReport {
            device: name.into(),
            ..Default::default()
        };
        let status = DeviceStatusRecord::new("acme", "site-a", report, now, 30);
        records.put(&status, Precondition::Any).await.unwrap();
    }

    let swept = housekeeping::sweep(&broker.state, now).await.unwrap();
    assert_eq!(
        swept,
        Swept {
            commands: 2,
            answers: 1,
            statuses: 1,
        }
    );
    let statuses: Vec<String> = records
        .list_all::<DeviceStatusRecord>(&Scope::Tenant("acme".into()))
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.value.device)
        .collect();
    assert_eq!(statuses, ["mfp"]);
    let ids = |scope: &str| {
        let scope = Scope::Tenant(scope.into());
        let records = &records;
        async move {
            let mut ids: Vec<String> = records
                .list_all::<QueuedCommand>(&scope)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.value.id)
                .collect();
            ids.extend(
                records
                    .list_all::<CommandAnswer>(&scope)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|a| a.value.id),
            );
            ids
        }
    };
    assert_eq!(ids("acme").await, ["3-waiting", "5-fresh"]);
    assert!(ids("beta").await.is_empty());
    assert_eq!(
        housekeeping::sweep(&broker.state, now).await.unwrap(),
        Swept::default()
    );
}

/// A device created through one replica reaches the agent streaming to another replica at once:
/// the change queues a `ReloadConfig` in the store, the replica holding the stream sends it. A
/// change that leaves the agent's configuration as it is sends nothing.
#[tokio::test]
async fn a_change_on_one_replica_reaches_an_agent_streaming_to_another_at_once() {
    let redis = RedisServer::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = seal_key(keys.path());
    let a = Broker::on_redis(&redis.url(), &key_file, None).await;
    a.put_tenant("acme").await;
    a.put_mailbox("acme", "scan", MailboxKind::Admin).await;
    let b = Broker::on_redis(&redis.url(), &key_file, Some(a.admin_key.clone())).await;
    let mut client = a.agent_client("acme", "site-a").await;
    a.put_device(&device("acme", "mfp", "site-a")).await;
    // The agent runs the current configuration: nothing to push.
    let current = client
        .get_agent_config(pb::GetAgentConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.devices.len(), 1);
    let mut agent = FakeAgent::connect(&mut client, report(&current.revision, vec![])).await;
    a.agent_present("the agent's presence").await;

    // A mailbox no device names: the agent's configuration stays the same, so nothing is sent.
    logs::secret("fleet-app-secret");
    b.admin()
        .create_provider(pb::CreateProviderRequest {
            provider: Some(pb::Provider {
                tenant: "acme".into(),
                name: "m365".into(),
                kind: pb::ProviderKind::Microsoft as i32,
                authority: "organizations".into(),
                client_id: "fleet-app".into(),
                client_secret: "fleet-app-secret".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    b.admin()
        .create_mailbox(pb::CreateMailboxRequest {
            mailbox: Some(pb::Mailbox {
                tenant: "acme".into(),
                name: "unused".into(),
                address: "unused@acme.example".into(),
                provider: "m365".into(),
                grant_type: pb::GrantType::AppOnly as i32,
                kind: pb::MailboxKind::Admin as i32,
                purposes: vec![pb::MailPurpose::Send as i32],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), agent.commands.message())
            .await
            .is_err(),
        "a change that does not touch the agent's configuration sent a command"
    );

    // A device for the agent, created through replica B: ReloadConfig within a second.
    let started = Instant::now();
    b.admin()
        .create_device(pb::CreateDeviceRequest {
            device: Some(pb::Device {
                tenant: "acme".into(),
                name: "mfp2".into(),
                agent: "site-a".into(),
                sender_mode: pb::SenderMode::FixedAdmin as i32,
                admin_mailbox: "scan".into(),
                smtp: Some(pb::SmtpProfile {
                    server: "smtp.office365.com".into(),
                    port: 587,
                    security: pb::TlsMode::Starttls as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let command = agent
        .next(Duration::from_secs(1))
        .await
        .unwrap()
        .expect("a command");
    let took = started.elapsed();
    assert!(
        matches!(
            command.command,
            Some(pb::agent_command::Command::ReloadConfig(_))
        ),
        "{command:?}"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    let reloaded = client
        .get_agent_config(pb::GetAgentConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reloaded.devices.len(), 2);
    assert_ne!(reloaded.revision, current.revision);
}

/// Commands Redis has processed so far (`INFO stats`).
async fn redis_commands(redis: &RedisServer) -> u64 {
    let info = tokenfleet_testkit::redis::command(redis.port(), &["INFO", "stats"])
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_commands_processed")
}

/// Redis commands processed in `window` while nothing but the broker's own background work runs.
async fn commands_in(redis: &RedisServer, window: Duration) -> u64 {
    let before = redis_commands(redis).await;
    tokio::time::sleep(window).await;
    // The INFO call itself counts once.
    redis_commands(redis).await - before - 1
}

/// Commands are pushed (the store's notification channel), not polled: status streams that send
/// no report cost the store nothing between heartbeats, however many agents are connected. Before
/// the push, every stream listed its queued commands 5 times a second (11 Redis operations a
/// second per agent with the presence checks).
#[tokio::test]
async fn idle_status_streams_cost_no_store_operations_between_heartbeats() {
    const AGENTS: usize = 12;
    let redis = RedisServer::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = seal_key(keys.path());
    let a = Broker::on_redis(&redis.url(), &key_file, None).await;
    a.put_tenant("acme").await;
    let mut clients = Vec::new();
    for i in 0..AGENTS {
        clients.push(a.agent_client("acme", &format!("site-{i}")).await);
    }
    let window = Duration::from_secs(3);
    // The replica's own background work (refresh scheduler, sweeps, health) without agents.
    let baseline = commands_in(&redis, window).await;
    let mut agents = Vec::new();
    for client in &mut clients {
        agents.push(FakeAgent::connect(client, report("", vec![])).await);
    }
    // Let the first reports settle (presence, configuration), then measure the idle streams.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_streams = commands_in(&redis, window).await;
    let per_agent_per_second =
        with_streams.saturating_sub(baseline) as f64 / AGENTS as f64 / window.as_secs_f64();
    assert!(
        per_agent_per_second < 0.5,
        "{AGENTS} idle streams: {with_streams} Redis commands in {window:?} against {baseline} \
         without them ({per_agent_per_second:.2} per agent per second)"
    );
    drop(agents);
}

/// A device status stored before the fleet moved into the core (the agent's `DeviceStatus` as
/// base64 of its protobuf encoding) still shows in the fleet status, field for field, until the
/// device's agent reports again.
#[tokio::test]
async fn a_status_stored_in_the_old_wire_form_still_shows() {
    use base64::Engine as _;
    use prost::Message as _;

    let broker = Broker::start().await;
    broker.put_mailbox("acme", "scan", MailboxKind::Admin).await;
    broker.put_device(&device("acme", "mfp", "site-a")).await;
    let mut old = status("mfp", pb::DeviceHealth::Failing, "535 5.7.139");
    old.queue_depth = 4;
    old.delivered_total = 1234;
    let record = DeviceStatusRecord {
        tenant: "acme".into(),
        device: "mfp".into(),
        agent: "site-a".into(),
        report_time: broker.state.clock.now(),
        heartbeat_seconds: 30,
        report: None,
        status: base64::engine::general_purpose::STANDARD.encode(old.encode_to_vec()),
    };
    broker
        .records()
        .put(&record, Precondition::Any)
        .await
        .unwrap();
    let shown = broker.fleet_device("acme", "mfp").await;
    assert_eq!(shown.health, pb::DeviceHealth::Failing as i32);
    assert_eq!(shown.problem, "535 5.7.139");
    assert_eq!(shown.status, Some(old));
}

/// Agents asking for their configuration at once while their tenant's snapshot is cold read the
/// tenant's devices once between them, not once each. At fleet scale (10,000 agents of one
/// tenant connecting, `bench fleet`) every caller reading every device at the same time took the
/// broker to 1.6 GiB and Redis to 65,000 operations a second, and streams broke.
#[tokio::test]
async fn agents_asking_at_once_read_their_tenants_devices_once() {
    const AGENTS: usize = 16;
    const DEVICES: usize = 320;
    let redis = RedisServer::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = seal_key(keys.path());
    let a = Broker::on_redis(&redis.url(), &key_file, None).await;
    a.put_tenant("acme").await;
    a.put_mailbox("acme", "scan", MailboxKind::Admin).await;
    let mut clients = Vec::new();
    for i in 0..AGENTS {
        clients.push(a.agent_client("acme", &format!("site-{i}")).await);
    }
    for d in 0..DEVICES {
        let device = device("acme", &format!("mfp-{d}"), &format!("site-{}", d % AGENTS));
        a.records().put(&device, Precondition::Any).await.unwrap();
    }
    // Drops the snapshot (as a change through the Admin API does) and measures one caller.
    let cold = async || {
        tokenfleet_broker::fleet::wake::config_changed(&a.state, "acme").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cold().await;
    let before = redis_commands(&redis).await;
    let one = clients[0]
        .get_agent_config(pb::GetAgentConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    let one_cost = redis_commands(&redis).await - before - 1;
    assert_eq!(one.devices.len(), DEVICES / AGENTS);
    assert!(
        one_cost >= DEVICES as u64,
        "reading the tenant's devices cost {one_cost} Redis commands, fewer than one per device: \
         this test cannot tell one read from several"
    );

    cold().await;
    let before = redis_commands(&redis).await;
    let answers = futures::future::join_all(
        clients
            .iter_mut()
            .map(|c| c.get_agent_config(pb::GetAgentConfigRequest {})),
    )
    .await;
    let burst_cost = redis_commands(&redis).await - before - 1;
    for answer in answers {
        assert_eq!(answer.unwrap().into_inner().devices.len(), DEVICES / AGENTS);
    }
    assert!(
        burst_cost < 2 * one_cost,
        "{AGENTS} agents at once cost {burst_cost} Redis commands, one alone {one_cost}: \
         each read the tenant's devices"
    );
}
