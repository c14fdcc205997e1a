//! End-to-end: the real `tokenfleetctl` binary against an in-process broker (embedded store and a
//! real `redis-server`), on 127.0.0.1 only.

use std::net::TcpListener;
use std::path::Path;
use std::process::Output;

use serde_json::{Value, json};
use tokenfleet_domain::Role;
use tokenfleet_seal::Secret;
use tokenfleet_testkit::broker::{TestBroker, TestStore};
use tokenfleet_testkit::redis::RedisServer;

const CLIENT_SECRET: &str = "client-s3cret-value";
const INGRESS_PASSWORD: &str = "ingress-pa55word";

/// One run of the binary.
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
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success; stderr: {}", self.stderr);
        self
    }
}

/// Runs `tokenfleetctl` with a clean environment except for the broker URL and API key.
async fn ctl_at(url: &str, key: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfleetctl"));
    cmd.args(args)
        .env("TOKENFLEET_BROKER", url)
        .env_remove("TOKENFLEET_API_KEY")
        .env_remove("TOKENFLEET_API_KEY_FILE")
        .env_remove("TOKENFLEET_TENANT")
        .env_remove("TOKENFLEET_CA_FILE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(key) = key {
        cmd.env("TOKENFLEET_API_KEY", key);
    }
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

async fn ctl(broker: &TestBroker, key: &Secret, args: &[&str]) -> Run {
    ctl_at(
        &format!("http://{}", broker.grpc_addr),
        Some(key.expose()),
        args,
    )
    .await
}

async fn admin(broker: &TestBroker, args: &[&str]) -> Run {
    ctl(broker, &broker.admin_key, args).await
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    if let Err(e) = std::fs::write(&path, content) {
        panic!("writing {}: {e}", path.display());
    }
    path.display().to_string()
}

/// Creates a tenant, provider, agent, mailbox and device through the CLI.
async fn create_fleet(broker: &TestBroker, dir: &Path) {
    tokenfleet_testkit::logs::secret(CLIENT_SECRET);
    tokenfleet_testkit::logs::secret(INGRESS_PASSWORD);
    let secret_file = write(dir, "client-secret", &format!("{CLIENT_SECRET}\n"));
    let password_file = write(dir, "ingress-password", &format!("{INGRESS_PASSWORD}\n"));

    let tenant = admin(
        broker,
        &[
            "tenant",
            "create",
            "--name",
            "acme",
            "--display-name",
            "Acme Corp",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert_eq!(tenant.json()["name"], "acme");

    let provider = admin(
        broker,
        &[
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
            "--token-url",
            "http://127.0.0.1:9/token",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert!(!provider.stdout.contains(CLIENT_SECRET));
    assert_eq!(provider.json()["client_secret_set"], true);

    admin(
        broker,
        &[
            "agent",
            "create",
            "--tenant",
            "acme",
            "--name",
            "site-a",
            "--display-name",
            "Head office",
        ],
    )
    .await
    .ok();

    admin(
        broker,
        &[
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
            "--purpose",
            "pop",
        ],
    )
    .await
    .ok();

    let device = admin(
        broker,
        &[
            "device",
            "create",
            "--tenant",
            "acme",
            "--name",
            "mfp-1",
            "--display-name",
            "2nd floor MFP",
            "--sender-mode",
            "bulk",
            "--bulk-mailbox",
            "scan",
            "--agent",
            "site-a",
            "--smtp-server",
            "smtp.office365.com",
            "--smtp-port",
            "587",
            "--smtp-security",
            "starttls",
            "--ingress-username",
            "mfp1",
            "--ingress-password-file",
            &password_file,
            "--allowed-source",
            "192.168.1.20/32",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert!(!device.stdout.contains(INGRESS_PASSWORD));
}

/// Lists everything as JSON.
async fn list_all(broker: &TestBroker) -> Vec<Value> {
    let mut lists = Vec::new();
    lists.push(
        admin(broker, &["tenant", "list", "-o", "json"])
            .await
            .ok()
            .json(),
    );
    for resource in ["provider", "mailbox", "device", "agent"] {
        let run = admin(
            broker,
            &[resource, "list", "--tenant", "acme", "-o", "json"],
        )
        .await
        .ok();
        lists.push(run.json());
    }
    lists
}

fn check_listed(lists: &[Value]) {
    let [tenants, providers, mailboxes, devices, agents] = lists else {
        panic!("five lists expected");
    };
    assert_eq!(tenants.as_array().map(Vec::len), Some(1), "{tenants}");
    assert_eq!(tenants[0]["display_name"], "Acme Corp");
    assert!(tenants[0]["version"].as_u64().is_some_and(|v| v > 0));

    let p = &providers[0];
    assert_eq!(p["kind"], "microsoft");
    assert_eq!(p["authority"], "organizations");
    assert_eq!(p["client_id"], "11111111-2222-3333-4444-555555555555");
    assert_eq!(p["client_secret_set"], true);
    assert_eq!(p["endpoints"]["token_url"], "http://127.0.0.1:9/token");
    assert!(p.get("client_secret").is_none());

    let m = &mailboxes[0];
    assert_eq!(m["address"], "scan@acme.example");
    assert_eq!(m["provider"], "m365");
    assert_eq!(m["grant_type"], "delegated_device_code");
    assert_eq!(m["kind"], "bulk");
    assert_eq!(m["purposes"], json!(["send", "pop"]));
    let created = m["create_time"].as_str().unwrap_or_default();
    assert!(
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "create_time is RFC 3339: {created}"
    );

    let d = &devices[0];
    assert_eq!(d["display_name"], "2nd floor MFP");
    assert_eq!(d["sender_mode"], "bulk");
    assert_eq!(d["bulk_mailbox"], "scan");
    assert_eq!(d["agent"], "site-a");
    assert_eq!(d["smtp"]["server"], "smtp.office365.com");
    assert_eq!(d["ingress"]["username"], "mfp1");
    assert_eq!(d["ingress"]["password_set"], true);
    assert_eq!(d["ingress"]["allowed_sources"], json!(["192.168.1.20/32"]));

    assert_eq!(agents[0]["name"], "site-a");
    assert_eq!(agents[0]["display_name"], "Head office");
}

/// Create, list, update and survive a restart on `store`.
async fn fleet_survives_restart(store: TestStore) {
    let broker = match TestBroker::start(store).await {
        Ok(b) => b,
        Err(e) => panic!("starting the broker: {e:#}"),
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temp dir: {e}"),
    };
    create_fleet(&broker, dir.path()).await;
    let before = list_all(&broker).await;
    check_listed(&before);
    assert_eq!(before[2][0]["token"]["status"], "not_retrieved");
    assert_eq!(before[2][0]["token"]["last_error"], Value::Null);
    assert_eq!(before[3][0]["smtp"]["security"], "starttls");
    assert_eq!(before[3][0]["smtp"]["port"], 587);

    // A partial profile update keeps the rest of the profile.
    let updated = admin(
        &broker,
        &[
            "device",
            "update",
            "--tenant",
            "acme",
            "--name",
            "mfp-1",
            "--smtp-port",
            "465",
            "--smtp-security",
            "implicit_tls",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(updated["smtp"]["port"], 465);
    assert_eq!(updated["smtp"]["security"], "implicit_tls");
    assert_eq!(updated["smtp"]["server"], "smtp.office365.com");
    assert_eq!(updated["ingress"]["password_set"], true);
    assert!(updated["version"].as_u64() > before[3][0]["version"].as_u64());

    // A conditional update with a stale version is refused and changes nothing.
    let stale = before[2][0]["version"]
        .as_u64()
        .unwrap_or_default()
        .to_string();
    admin(
        &broker,
        &[
            "mailbox",
            "update",
            "--tenant",
            "acme",
            "--name",
            "scan",
            "--disabled",
        ],
    )
    .await
    .ok();
    let refused = admin(
        &broker,
        &[
            "mailbox",
            "update",
            "--tenant",
            "acme",
            "--name",
            "scan",
            "--disabled=false",
            "--version",
            &stale,
        ],
    )
    .await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.starts_with("error: aborted: "),
        "{}",
        refused.stderr
    );

    let table = admin(&broker, &["mailbox", "list", "--tenant", "acme"])
        .await
        .ok();
    assert!(
        table.stdout.contains("scan@acme.example"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("TOKEN"), "{}", table.stdout);

    let broker = broker.restart().await;
    let after = list_all(&broker).await;
    check_listed(&after);
    assert_eq!(after[0], before[0], "tenants unchanged across the restart");
    assert_eq!(
        after[1], before[1],
        "providers unchanged across the restart"
    );
    assert_eq!(after[4], before[4], "agents unchanged across the restart");
    assert_eq!(after[2][0]["disabled"], true);
    assert_eq!(after[2][0]["token"]["status"], "disabled");
    assert_eq!(after[3][0]["smtp"]["port"], 465);
    assert_eq!(after[3][0]["smtp"]["security"], "implicit_tls");

    // Secrets survived too (sealed in the store), still never shown.
    let shown = admin(
        &broker,
        &["provider", "show", "--tenant", "acme", "--name", "m365"],
    )
    .await
    .ok();
    assert!(
        shown.stdout.contains("client_secret_set"),
        "{}",
        shown.stdout
    );
    assert!(!shown.stdout.contains(CLIENT_SECRET));

    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_survives_restart_on_the_embedded_store() {
    fleet_survives_restart(TestStore::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_survives_restart_on_redis() {
    let redis = match RedisServer::start().await {
        Ok(r) => r,
        Err(e) => panic!("starting redis-server: {e:#}"),
    };
    fleet_survives_restart(TestStore::Redis(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_name_the_field_and_exit_1() {
    let broker = match TestBroker::start(TestStore::Embedded).await {
        Ok(b) => b,
        Err(e) => panic!("starting the broker: {e:#}"),
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temp dir: {e}"),
    };
    create_fleet(&broker, dir.path()).await;
    let run = admin(
        &broker,
        &[
            "mailbox",
            "create",
            "--tenant",
            "acme",
            "--name",
            "bad",
            "--address",
            "x",
            "--provider",
            "m365",
            "--grant-type",
            "delegated_device_code",
            "--kind",
            "bulk",
            "--purpose",
            "send",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .starts_with("error: invalid argument: mailbox.address"),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.trim_end().lines().count(),
        1,
        "one line: {}",
        run.stderr
    );
    assert!(run.stdout.is_empty());

    let run = admin(&broker, &["tenant", "show", "--name", "nope"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.starts_with("error: not found: "),
        "{}",
        run.stderr
    );

    // Usage problems are exit 2 and never reach the broker.
    let run = admin(
        &broker,
        &["device", "update", "--tenant", "acme", "--name", "mfp-1"],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.starts_with("error: nothing to update"),
        "{}",
        run.stderr
    );
    let run = admin(
        &broker,
        &[
            "device",
            "create",
            "--tenant",
            "acme",
            "--name",
            "x",
            "--sender-mode",
            "admin",
        ],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("fixed_admin"), "{}", run.stderr);

    // Deleting in dependency order works; the audit log saw it all.
    for (resource, name) in [
        ("device", "mfp-1"),
        ("mailbox", "scan"),
        ("agent", "site-a"),
    ] {
        let run = admin(
            &broker,
            &[resource, "delete", "--tenant", "acme", "--name", name],
        )
        .await
        .ok();
        assert_eq!(run.stdout.trim(), format!("deleted {resource} acme/{name}"));
    }
    let devices = admin(
        &broker,
        &["device", "list", "--tenant", "acme", "-o", "json"],
    )
    .await
    .ok();
    assert_eq!(devices.json(), json!([]));
    let audit = admin(
        &broker,
        &["audit", "--tenant", "acme", "-o", "json", "--limit", "100"],
    )
    .await
    .ok()
    .json();
    let actions: Vec<&str> = audit
        .as_array()
        .map(|events| events.iter().filter_map(|e| e["action"].as_str()).collect())
        .unwrap_or_default();
    for action in [
        "provider.create",
        "mailbox.create",
        "device.create",
        "device.delete",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_roles() {
    let broker = match TestBroker::start(TestStore::Embedded).await {
        Ok(b) => b,
        Err(e) => panic!("starting the broker: {e:#}"),
    };
    let viewer = broker.create_key(Role::Viewer, None).await;

    let me = ctl(&broker, &viewer, &["whoami", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(me["role"], "viewer");

    let run = ctl(&broker, &viewer, &["tenant", "create", "--name", "acme"]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.starts_with("error: permission denied"),
        "{}",
        run.stderr
    );
    // A viewer may read.
    let tenants = ctl(&broker, &viewer, &["tenant", "list", "-o", "json"])
        .await
        .ok();
    assert_eq!(tenants.json(), json!([]));

    let url = format!("http://{}", broker.grpc_addr);
    let run = ctl_at(&url, Some("tfk_unknown.key"), &["whoami"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.starts_with("error: unauthenticated"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("tfk_unknown.key"), "{}", run.stderr);

    let run = ctl_at(&url, None, &["whoami"]).await;
    assert_eq!(run.code, 2);
    assert_eq!(
        run.stderr.trim_end(),
        "error: no API key: set TOKENFLEET_API_KEY or --api-key-file"
    );

    // The key can come from a file too.
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temp dir: {e}"),
    };
    let key_file = write(
        dir.path(),
        "key",
        &format!("{}\n", broker.admin_key.expose()),
    );
    let me = ctl_at(
        &url,
        None,
        &["--api-key-file", &key_file, "whoami", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(me["role"], "fleet-admin");

    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_exits_69_with_a_readable_message() {
    // A port that was free a moment ago and has nobody listening now.
    let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("binding: {e}"),
    };
    let url = format!("http://127.0.0.1:{port}");
    let run = ctl_at(&url, Some("tfk_some.key"), &["tenant", "list"]).await;
    assert_eq!(run.code, 69, "{}", run.stderr);
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "error: cannot reach broker at {url} (connection refused) — is it running? set \
             --broker or TOKENFLEET_BROKER"
        )
    );
}

#[tokio::test]
async fn completions_mention_the_binary() {
    let run = ctl_at("http://127.0.0.1:1", None, &["completions", "bash"])
        .await
        .ok();
    assert!(run.stdout.contains("tokenfleetctl"), "{}", run.stdout);
    assert!(run.stdout.contains("mailbox"), "{}", run.stdout);
    let run = ctl_at("http://127.0.0.1:1", None, &["completions", "tcsh"]).await;
    assert_eq!(run.code, 2);
}
