//! End-to-end: `tokenfleetctl fleet status` and `tokenfleetctl device test`, the real binary
//! against an in-process broker (embedded store) on 127.0.0.1. No agent is connected here (the
//! broker's own tests in services/broker/tests/integration/fleet.rs stream from fake agents), so devices are
//! UNKNOWN and tests answer AGENT_UNREACHABLE.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use tokenfleet_domain::Role;
use tokenfleet_seal::Secret;
use tokenfleet_testkit::broker::{TestBroker, TestStore};

const CLIENT_SECRET: &str = "fleet-client-s3cret";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        match serde_json::from_str(&self.stdout) {
            Ok(v) => v,
            Err(e) => panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            ),
        }
    }

    #[track_caller]
    fn code(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

async fn ctl(broker: &TestBroker, key: &Secret, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfleetctl"));
    cmd.args(args)
        .env("TOKENFLEET_BROKER", format!("http://{}", broker.grpc_addr))
        .env("TOKENFLEET_API_KEY", key.expose())
        .env_remove("TOKENFLEET_API_KEY_FILE")
        .env_remove("TOKENFLEET_TENANT")
        .env_remove("TOKENFLEET_CA_FILE")
        // No operator config file of this machine: contexts only where a test writes one.
        .env(
            "TOKENFLEETCTL_CONFIG",
            "/nonexistent/tokenfleetctl/config.yaml",
        )
        .env_remove("TOKENFLEETCTL_CONTEXT")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let Output {
        status,
        stdout,
        stderr,
    } = match cmd.output().await {
        Ok(output) => output,
        Err(e) => panic!("running tokenfleetctl: {e}"),
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

async fn admin(broker: &TestBroker, args: &[&str]) -> Run {
    ctl(broker, &broker.admin_key, args).await
}

/// Tenants `acme` (agent `site-a`, mailbox `scan`, devices `mfp` on site-a and `orphan` without
/// agent) and `beta` (empty).
async fn fleet(broker: &TestBroker, dir: &Path) {
    tokenfleet_testkit::logs::secret(CLIENT_SECRET);
    let secret_file = dir.join("client-secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let secret_file = secret_file.display().to_string();
    for args in [
        vec!["tenant", "create", "--name", "acme"],
        vec!["tenant", "create", "--name", "beta"],
        vec![
            "provider",
            "create",
            "--tenant",
            "acme",
            "--name",
            "m365",
            "--kind",
            "microsoft",
            "--authority",
            "organizations",
            "--client-id",
            "11111111-2222-3333-4444-555555555555",
            "--client-secret-file",
            &secret_file,
        ],
        vec!["agent", "create", "--tenant", "acme", "--name", "site-a"],
        vec![
            "mailbox",
            "create",
            "--tenant",
            "acme",
            "--name",
            "scan",
            "--address",
            "scan@acme.example",
            "--provider",
            "m365",
            "--grant-type",
            "delegated_device_code",
            "--kind",
            "bulk",
            "--purpose",
            "send",
        ],
        vec![
            "device",
            "create",
            "--tenant",
            "acme",
            "--name",
            "mfp",
            "--sender-mode",
            "bulk",
            "--bulk-mailbox",
            "scan",
            "--agent",
            "site-a",
            "--smtp-server",
            "smtp.office365.com",
            "--smtp-security",
            "starttls",
        ],
        vec![
            "device",
            "create",
            "--tenant",
            "acme",
            "--name",
            "orphan",
            "--sender-mode",
            "bulk",
            "--bulk-mailbox",
            "scan",
        ],
    ] {
        admin(broker, &args).await.code(0);
    }
}

#[tokio::test]
async fn fleet_status_prints_a_table_and_json_within_the_callers_tenants() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    fleet(&broker, dir.path()).await;

    let table = admin(&broker, &["fleet", "status"]).await.code(0);
    let header = table.stdout.lines().nth(1).unwrap_or_default();
    let columns: Vec<&str> = header
        .split(['│', '┆'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        columns,
        [
            "TENANT",
            "DEVICE",
            "AGENT",
            "HEALTH",
            "QUEUE",
            "OLDEST",
            "LAST-REPORT",
            "PROBLEM"
        ],
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("site-a (offline)"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("UNKNOWN"), "{}", table.stdout);
    assert!(
        table.stdout.contains("no agent assigned"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("never"), "{}", table.stdout);

    let json = admin(
        &broker,
        &["fleet", "status", "--tenant", "acme", "-o", "json"],
    )
    .await
    .code(0)
    .json();
    let devices = json.as_array().unwrap();
    assert_eq!(devices.len(), 2, "{json}");
    assert_eq!(devices[0]["device"], "mfp");
    assert_eq!(devices[0]["agent"], "site-a");
    assert_eq!(devices[0]["agent_connected"], false);
    assert_eq!(devices[0]["health"], "unknown");
    assert_eq!(devices[0]["problem"], "agent \"site-a\" has never reported");
    assert!(devices[0]["last_report_time"].is_null());
    assert!(devices[0]["status"].is_null());
    assert_eq!(devices[1]["device"], "orphan");
    assert_eq!(devices[1]["problem"], "no agent assigned");

    // A tenant admin of beta sees nothing of acme.
    let beta = broker.create_key(Role::TenantAdmin, Some("beta")).await;
    let own = ctl(&broker, &beta, &["fleet", "status"]).await.code(0);
    assert_eq!(own.stdout.trim(), "no devices");
    let refused = ctl(&broker, &beta, &["fleet", "status", "--tenant", "acme"])
        .await
        .code(1);
    assert!(
        refused.stderr.contains("permission denied"),
        "{}",
        refused.stderr
    );
}

#[tokio::test]
async fn device_test_prints_the_verdict_and_exits_1_unless_ok() {
    let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    fleet(&broker, dir.path()).await;

    let text = admin(&broker, &["device", "test", "mfp", "--tenant", "acme"])
        .await
        .code(1);
    assert!(
        text.stdout.starts_with("verdict:     AGENT_UNREACHABLE\n"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("not connected"), "{}", text.stdout);
    assert!(text.stdout.contains("fix:"), "{}", text.stdout);
    assert!(text.stderr.contains("agent_unreachable"), "{}", text.stderr);

    // A viewer may not test (the agent would connect upstream with the device's tokens).
    let viewer = broker.create_key(Role::Viewer, Some("acme")).await;
    let refused = ctl(
        &broker,
        &viewer,
        &[
            "device",
            "test",
            "mfp",
            "--tenant",
            "acme",
            "--timeout",
            "5",
        ],
    )
    .await
    .code(1);
    assert!(refused.stderr.contains("read-only"), "{}", refused.stderr);
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    // A tenant admin may; JSON carries the whole result.
    let tenant_admin = broker.create_key(Role::TenantAdmin, Some("acme")).await;
    let json = ctl(
        &broker,
        &tenant_admin,
        &[
            "device",
            "test",
            "mfp",
            "--tenant",
            "acme",
            "--timeout",
            "5",
            "-o",
            "json",
        ],
    )
    .await
    .code(1)
    .json();
    assert_eq!(json["verdict"], "agent_unreachable");
    assert_eq!(json["target"], "send");
    assert_eq!(json["device"], "mfp");
    assert!(json["steps"].as_array().unwrap().is_empty());

    let too_long = admin(
        &broker,
        &[
            "device",
            "test",
            "mfp",
            "--tenant",
            "acme",
            "--timeout",
            "121",
        ],
    )
    .await
    .code(2);
    assert!(
        too_long.stderr.contains("--timeout 121"),
        "{}",
        too_long.stderr
    );

    let no_agent = admin(&broker, &["device", "test", "orphan", "--tenant", "acme"])
        .await
        .code(1);
    assert!(no_agent.stderr.contains("no agent"), "{}", no_agent.stderr);
    let no_fetch = admin(
        &broker,
        &[
            "device", "test", "mfp", "--tenant", "acme", "--target", "fetch",
        ],
    )
    .await
    .code(1);
    assert!(
        no_fetch.stderr.contains("fetch profile"),
        "{}",
        no_fetch.stderr
    );
    let missing = admin(&broker, &["device", "test", "nope", "--tenant", "acme"])
        .await
        .code(1);
    assert!(missing.stderr.contains("not found"), "{}", missing.stderr);
}
