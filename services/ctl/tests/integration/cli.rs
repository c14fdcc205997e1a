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
pub(super) struct Run {
    pub(super) code: i32,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Run {
    pub(super) fn json(&self) -> Value {
        match serde_json::from_str(&self.stdout) {
            Ok(v) => v,
            Err(e) => panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            ),
        }
    }

    #[track_caller]
    pub(super) fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success; stderr: {}", self.stderr);
        self
    }
}

/// Runs `tokenfleetctl` with a clean environment except for the broker URL and API key.
pub(super) async fn ctl_at(url: &str, key: Option<&str>, args: &[&str]) -> Run {
    ctl_env(Some(url), key, &[], args).await
}

/// Runs `tokenfleetctl` with a clean environment, the broker URL and API key when given, and
/// `env` on top.
pub(super) async fn ctl_env(
    url: Option<&str>,
    key: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfleetctl"));
    cmd.args(args)
        .env_remove("TOKENFLEET_BROKER")
        .env_remove("TOKENFLEET_API_KEY")
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
    if let Some(url) = url {
        cmd.env("TOKENFLEET_BROKER", url);
    }
    if let Some(key) = key {
        cmd.env("TOKENFLEET_API_KEY", key);
    }
    cmd.envs(env.iter().copied());
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

pub(super) async fn ctl(broker: &TestBroker, key: &Secret, args: &[&str]) -> Run {
    ctl_at(
        &format!("http://{}", broker.grpc_addr),
        Some(key.expose()),
        args,
    )
    .await
}

pub(super) async fn admin(broker: &TestBroker, args: &[&str]) -> Run {
    ctl(broker, &broker.admin_key, args).await
}

pub(super) fn write(dir: &Path, name: &str, content: &str) -> String {
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
            &[
                resource, "delete", "--tenant", "acme", "--name", name, "--yes",
            ],
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
        "error: no API key: set TOKENFLEET_API_KEY, --api-key-file or a context's key file"
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

/// Variables set but empty (as deployment templates leave them) count as not set: before,
/// clap took `TOKENFLEET_CA_FILE=""` for `--ca-file` given without a value and refused the
/// command, and `TOKENFLEETCTL_CONTEXT=""` named a context "".
#[tokio::test]
async fn empty_variables_count_as_unset() {
    let run = ctl_env(
        Some("https://127.0.0.1:1"),
        Some("tfk_some.key"),
        &[("TOKENFLEET_CA_FILE", ""), ("TOKENFLEETCTL_CONTEXT", "")],
        &["tenant", "list"],
    )
    .await;
    assert_eq!(run.code, 69, "{}", run.stderr);
    assert!(run.stderr.contains("cannot reach broker"), "{}", run.stderr);
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

/// Issue 10: API keys through the CLI, provider re-pointing, proxy passwords and the audit
/// streams, all through the real `tokenfleetctl` binary against a running broker.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod keys_providers_audit {
    use std::time::Duration;

    use serde_json::Value;
    use tokenfleet_broker::audit::{AuditRetention, Retention};
    use tokenfleet_broker::records::{Records, provider_key};
    use tokenfleet_broker::tokens::grant::{GrantField, GrantRecord, grant_key, seal_field};
    use tokenfleet_domain::{Provider, Role, TokenStatus};
    use tokenfleet_proto::v1 as pb;
    use tokenfleet_seal::Secret;
    use tokenfleet_store::Precondition;
    use tokenfleet_testkit::broker::{TestBroker, TestStore};

    use super::{CLIENT_SECRET, admin, create_fleet, ctl, write};

    async fn broker() -> TestBroker {
        TestBroker::start(TestStore::Embedded).await.unwrap()
    }

    async fn tenant(broker: &TestBroker, name: &str) {
        admin(broker, &["tenant", "create", "--name", name])
            .await
            .ok();
    }

    fn audit_events(run: super::Run) -> Vec<Value> {
        run.ok().json().as_array().cloned().unwrap_or_default()
    }

    /// Every role through `api-key create` (both spellings where they differ), list without
    /// secrets, the limits of a tenant admin and a viewer, revocation effective on the next call,
    /// and the audit trail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_keys_are_created_listed_and_revoked_through_the_cli() {
        let broker = broker().await;
        tenant(&broker, "acme").await;
        tenant(&broker, "beta").await;

        let mut made = Vec::new();
        for (role, canonical, tenant) in [
            ("fleet-admin", "fleet-admin", None),
            ("fleet_admin", "fleet-admin", None),
            ("tenant-admin", "tenant-admin", Some("acme")),
            ("tenant_admin", "tenant-admin", Some("beta")),
            ("viewer", "viewer", Some("acme")),
            ("viewer", "viewer", None),
        ] {
            let mut args = vec!["api-key", "create", "--role", role, "-o", "json"];
            if let Some(t) = tenant {
                args.extend(["--tenant", t]);
            }
            let run = admin(&broker, &args).await.ok();
            assert!(run.stderr.contains("shown this once"), "{}", run.stderr);
            let json = run.json();
            assert_eq!(json["role"], canonical, "{json}");
            assert_eq!(json["tenant"], tenant.unwrap_or(""), "{json}");
            let key = json["key"].as_str().unwrap().to_owned();
            assert!(key.starts_with(&format!("tfk_{}_", json["id"].as_str().unwrap())));
            tokenfleet_testkit::logs::secret(&key);
            let key = Secret::new(key);
            let me = ctl(&broker, &key, &["whoami", "-o", "json"])
                .await
                .ok()
                .json();
            assert_eq!(me["role"], canonical);
            made.push((
                json["id"].as_str().unwrap().to_owned(),
                canonical,
                tenant,
                key,
            ));
        }

        // The list names every key and shows none.
        let listed = admin(&broker, &["api-key", "list", "-o", "json"])
            .await
            .ok();
        for (id, _, _, key) in &made {
            assert!(listed.stdout.contains(id.as_str()), "{}", listed.stdout);
            assert!(!listed.stdout.contains(key.expose()));
        }
        assert!(
            listed
                .json()
                .as_array()
                .unwrap()
                .iter()
                .all(|k| k.get("key").is_none())
        );

        // A tenant admin: keys of its own tenant up to its own role, nothing else.
        let acme_admin = &made[2].3;
        let run = ctl(
            &broker,
            acme_admin,
            &[
                "api-key", "create", "--role", "viewer", "--tenant", "acme", "-o", "json",
            ],
        )
        .await
        .ok();
        let acme_viewer = Secret::new(run.json()["key"].as_str().unwrap().to_owned());
        tokenfleet_testkit::logs::secret(acme_viewer.expose());
        let acme_viewer_id = run.json()["id"].as_str().unwrap().to_owned();
        for args in [
            vec!["api-key", "create", "--role", "fleet-admin"],
            vec!["api-key", "create", "--role", "viewer"],
            vec![
                "api-key",
                "create",
                "--role",
                "tenant-admin",
                "--tenant",
                "beta",
            ],
        ] {
            let run = ctl(&broker, acme_admin, &args).await;
            assert_eq!(run.code, 1, "{args:?}: {}", run.stderr);
            assert!(run.stderr.contains("permission denied"), "{}", run.stderr);
        }
        let own = ctl(&broker, acme_admin, &["api-key", "list", "-o", "json"])
            .await
            .ok()
            .json();
        let tenants: Vec<&str> = own
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["tenant"].as_str().unwrap())
            .collect();
        assert!(
            !tenants.is_empty() && tenants.iter().all(|t| *t == "acme"),
            "{own}"
        );
        // Another tenant's key is out of reach (and looks like no key at all).
        let beta_admin_id = made[3].0.clone();
        let run = ctl(
            &broker,
            acme_admin,
            &["api-key", "revoke", "--id", &beta_admin_id, "--yes"],
        )
        .await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("not found"), "{}", run.stderr);
        // A viewer manages no keys.
        let run = ctl(&broker, &acme_viewer, &["api-key", "list"]).await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("permission denied"), "{}", run.stderr);

        // Revoked: the very next call fails.
        ctl(&broker, &acme_viewer, &["whoami"]).await.ok();
        ctl(
            &broker,
            acme_admin,
            &["api-key", "revoke", "--id", &acme_viewer_id, "-y"],
        )
        .await
        .ok();
        let run = ctl(&broker, &acme_viewer, &["whoami"]).await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("unauthenticated"), "{}", run.stderr);

        // Audited in the tenant's log, as changes.
        let events = audit_events(
            admin(
                &broker,
                &[
                    "audit", "--tenant", "acme", "--kind", "changes", "-o", "json",
                ],
            )
            .await,
        );
        let actions: Vec<&str> = events
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert!(actions.contains(&"apikey.create"), "{actions:?}");
        assert!(actions.contains(&"apikey.revoke"), "{actions:?}");
        let text = serde_json::to_string(&events).unwrap();
        for (_, _, _, key) in &made {
            assert!(!text.contains(key.expose()));
        }
        broker.shutdown().await;
    }

    /// A tenant admin cannot send the stored secrets elsewhere: foreign hosts and extra CAs need
    /// a fleet admin; re-pointing needs the client secret again and discards the grant, so a
    /// refresh afterwards reaches nobody. The audit entry names the old and the new host.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn re_pointing_a_provider_needs_its_secret_again_and_drops_its_grants() {
        let broker = broker().await;
        let dir = tempfile::tempdir().unwrap();
        create_fleet(&broker, dir.path()).await;
        let state = broker.state();
        // The grant a completed consent leaves behind.
        const REFRESH_TOKEN: &str = "planted-refresh-token-value";
        tokenfleet_testkit::logs::secret(REFRESH_TOKEN);
        let mut grant = GrantRecord::empty("acme", "scan");
        grant.refresh_token = Some(
            seal_field(
                &state.keyring,
                "acme",
                "scan",
                GrantField::RefreshToken,
                &Secret::new(REFRESH_TOKEN),
            )
            .unwrap(),
        );
        grant.state.status = TokenStatus::Active;
        Records::new(state.store.as_ref())
            .put(&grant, Precondition::Any)
            .await
            .unwrap();

        // The host a rogue admin would point at: it counts every connection.
        let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let trap_addr = trap.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = connections.clone();
        let trap_task = tokio::spawn(async move {
            while trap.accept().await.is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });

        let ta = broker.create_key(Role::TenantAdmin, Some("acme")).await;
        let secret_file = write(dir.path(), "new-secret", "a-new-client-secret\n");
        tokenfleet_testkit::logs::secret("a-new-client-secret");
        let update = |extra: &[&str]| {
            let mut args = vec!["provider", "update", "--tenant", "acme", "--name", "m365"];
            args.extend_from_slice(extra);
            args.into_iter().map(str::to_owned).collect::<Vec<String>>()
        };
        let run_as = |key: &Secret, args: Vec<String>| {
            let key = key.clone();
            let broker = &broker;
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ctl(broker, &key, &args).await
            }
        };

        // A host outside the well-known ones and the allowlist: fleet-admin only.
        let run = run_as(
            &ta,
            update(&[
                "--token-url",
                "https://evil.example/token",
                "--client-secret-file",
                &secret_file,
            ]),
        )
        .await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("permission denied"), "{}", run.stderr);
        assert!(run.stderr.contains("evil.example"), "{}", run.stderr);
        assert!(run.stderr.contains("fleet-admin"), "{}", run.stderr);
        // The same holds for a new provider.
        let run = ctl(
            &broker,
            &ta,
            &[
                "provider",
                "create",
                "--tenant",
                "acme",
                "--name",
                "rogue",
                "--kind",
                "microsoft",
                "--client-id",
                "client-1",
                "--token-url",
                "https://evil.example/token",
            ],
        )
        .await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("permission denied"), "{}", run.stderr);
        // An extra trusted CA: fleet-admin only.
        let ca_dir = tempfile::tempdir().unwrap();
        tokenfleet_broker::dev::ensure_dev_tls(ca_dir.path()).unwrap();
        let ca = ca_dir
            .path()
            .join(tokenfleet_broker::dev::DEV_CA_CERT_FILE)
            .display()
            .to_string();
        let run = run_as(
            &ta,
            update(&["--extra-ca-file", &ca, "--client-secret-file", &secret_file]),
        )
        .await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("permission denied"), "{}", run.stderr);
        assert!(run.stderr.contains("extra_ca_pem"), "{}", run.stderr);

        // An allowed host, but without the secret: refused, nothing changes.
        let new_url = format!("http://{trap_addr}/token");
        let run = run_as(&ta, update(&["--token-url", &new_url])).await;
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("client_secret"), "{}", run.stderr);
        let shown = admin(
            &broker,
            &[
                "mailbox", "show", "--tenant", "acme", "--name", "scan", "-o", "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(shown["token"]["status"], "active", "{shown}");

        // With the secret given again: re-pointed, and the grant is gone.
        let run = run_as(
            &ta,
            update(&[
                "--token-url",
                &new_url,
                "--client-secret-file",
                &secret_file,
                "-o",
                "json",
            ]),
        )
        .await
        .ok();
        assert_eq!(run.json()["endpoints"]["token_url"], new_url.as_str());
        let shown = admin(
            &broker,
            &[
                "mailbox", "show", "--tenant", "acme", "--name", "scan", "-o", "json",
            ],
        )
        .await
        .ok()
        .json();
        assert_eq!(shown["token"]["status"], "not_retrieved", "{shown}");
        let stored = Records::new(state.store.as_ref())
            .get::<GrantRecord>(&grant_key("acme", "scan"))
            .await
            .unwrap();
        assert!(stored.is_none_or(|g| g.value.refresh_token.is_none()));
        // A refresh now has nothing to send, and the new host hears nothing.
        let _ = admin(&broker, &["mailbox", "refresh", "scan", "--tenant", "acme"]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);
        trap_task.abort();

        // The audit entry names both hosts and the discarded grant.
        let events = audit_events(
            admin(
                &broker,
                &[
                    "audit", "--tenant", "acme", "--kind", "changes", "-o", "json",
                ],
            )
            .await,
        );
        let moved = events
            .iter()
            .find(|e| e["action"] == "provider.update")
            .unwrap_or_else(|| panic!("no provider.update in {events:?}"));
        let detail = moved["detail"].as_str().unwrap();
        assert!(detail.contains("127.0.0.1:9"), "{detail}");
        assert!(detail.contains(&trap_addr.to_string()), "{detail}");
        assert!(detail.contains("`scan`"), "{detail}");
        assert!(!detail.contains(CLIENT_SECRET) && !detail.contains(REFRESH_TOKEN));

        // A fleet admin may point anywhere (still with the secret).
        admin(
            &broker,
            &update(&[
                "--token-url",
                "https://login.example.net/token",
                "--client-secret-file",
                &secret_file,
            ])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        )
        .await
        .ok();
        broker.shutdown().await;
    }

    /// A proxy password never appears in output or in the stored record (it is sealed), and
    /// survives updates of other fields.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_passwords_are_sealed_and_never_shown() {
        const PROXY_PASSWORD: &str = "Pr0xy-Pa55word";
        tokenfleet_testkit::logs::secret(PROXY_PASSWORD);
        let broker = broker().await;
        tenant(&broker, "acme").await;
        let proxy = format!("http://proxyuser:{PROXY_PASSWORD}@127.0.0.1:3128");
        let created = admin(
            &broker,
            &[
                "provider",
                "create",
                "--tenant",
                "acme",
                "--name",
                "m365",
                "--kind",
                "microsoft",
                "--client-id",
                "11111111-2222-3333-4444-555555555555",
                "--http-proxy",
                &proxy,
                "-o",
                "json",
            ],
        )
        .await
        .ok();
        assert!(
            !created.stdout.contains(PROXY_PASSWORD),
            "{}",
            created.stdout
        );
        assert_eq!(
            created.json()["http_proxy"],
            "http://proxyuser:[redacted]@127.0.0.1:3128"
        );
        for args in [
            vec!["provider", "show", "--tenant", "acme", "--name", "m365"],
            vec![
                "provider", "show", "--tenant", "acme", "--name", "m365", "-o", "json",
            ],
            vec!["provider", "list", "--tenant", "acme"],
            vec!["audit", "--tenant", "acme", "-o", "json"],
        ] {
            let run = admin(&broker, &args).await.ok();
            assert!(
                !run.stdout.contains(PROXY_PASSWORD),
                "{args:?}: {}",
                run.stdout
            );
        }
        let viewer = broker.create_key(Role::Viewer, Some("acme")).await;
        let run = ctl(
            &broker,
            &viewer,
            &[
                "provider", "show", "--tenant", "acme", "--name", "m365", "-o", "json",
            ],
        )
        .await
        .ok();
        assert!(!run.stdout.contains(PROXY_PASSWORD), "{}", run.stdout);

        let stored = || async {
            let record = broker
                .state()
                .store
                .get(&provider_key("acme", "m365"))
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&record.data).into_owned();
            let provider: Provider = serde_json::from_slice(&record.data).unwrap();
            (text, provider)
        };
        let (text, provider) = stored().await;
        assert!(!text.contains(PROXY_PASSWORD), "stored in clear: {text}");
        assert_eq!(provider.http_proxy, "http://proxyuser@127.0.0.1:3128");
        let opened = tokenfleet_broker::records::open_http_proxy_password(
            &broker.state().keyring,
            &provider,
        )
        .unwrap()
        .unwrap();
        assert_eq!(opened.expose(), PROXY_PASSWORD);

        // Changing another field keeps the sealed password; giving the shown URL back too.
        admin(
            &broker,
            &[
                "provider",
                "update",
                "--tenant",
                "acme",
                "--name",
                "m365",
                "--client-id",
                "22222222-2222-3333-4444-555555555555",
            ],
        )
        .await
        .ok();
        admin(
            &broker,
            &[
                "provider",
                "update",
                "--tenant",
                "acme",
                "--name",
                "m365",
                "--http-proxy",
                "http://proxyuser:[redacted]@127.0.0.1:3128",
            ],
        )
        .await
        .ok();
        let (text, provider) = stored().await;
        assert!(!text.contains(PROXY_PASSWORD));
        assert!(provider.http_proxy_password.is_some());
        assert!(!text.contains("[redacted]"), "{text}");
        broker.shutdown().await;
    }

    /// Refused calls go to their own bounded stream: however many a read-only key makes, the
    /// tenant's changes stay. Retention by count and by age per kind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_calls_never_evict_changes() {
        let broker = broker().await;
        // Small bounds so the test floods them quickly (the defaults are documented in README).
        tokenfleet_broker::audit::configure(AuditRetention {
            changes: Retention {
                max_entries: 50,
                max_age: None,
            },
            refused: Retention {
                max_entries: 20,
                max_age: None,
            },
            ..AuditRetention::DEFAULT
        });
        tenant(&broker, "acme").await;
        admin(
            &broker,
            &[
                "provider",
                "create",
                "--tenant",
                "acme",
                "--name",
                "m365",
                "--kind",
                "microsoft",
                "--client-id",
                "11111111-2222-3333-4444-555555555555",
            ],
        )
        .await
        .ok();
        let viewer = broker.create_key(Role::Viewer, Some("acme")).await;
        // 200 refused attempts, 10 times the bound of refusals and 4 times that of changes.
        let mut client = broker.client_with_key(&viewer);
        for i in 0..200 {
            let err = client
                .delete_provider(pb::DeleteProviderRequest {
                    tenant: "acme".into(),
                    name: format!("p{i}"),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
        }
        // Some through the binary too.
        for _ in 0..3 {
            let run = ctl(
                &broker,
                &viewer,
                &[
                    "provider", "delete", "--tenant", "acme", "--name", "m365", "--yes",
                ],
            )
            .await;
            assert_eq!(run.code, 1, "{}", run.stderr);
        }

        let changes = audit_events(
            admin(
                &broker,
                &[
                    "audit", "--tenant", "acme", "--kind", "changes", "--limit", "1000", "-o",
                    "json",
                ],
            )
            .await,
        );
        assert!(
            changes
                .iter()
                .any(|e| e["action"] == "provider.create" && e["result"] == "ok"),
            "{changes:?}"
        );
        assert!(changes.iter().all(|e| e["result"] == "ok"));
        let refused = audit_events(
            admin(
                &broker,
                &[
                    "audit", "--tenant", "acme", "--kind", "refused", "--limit", "1000", "-o",
                    "json",
                ],
            )
            .await,
        );
        assert_eq!(refused.len(), 20, "the refusals' own bound");
        assert!(refused.iter().all(|e| e["result"] == "permission_denied"));
        // All kinds merged, newest first, over several pages.
        let all = audit_events(
            admin(
                &broker,
                &[
                    "audit",
                    "--tenant",
                    "acme",
                    "--page-size",
                    "7",
                    "--limit",
                    "1000",
                    "-o",
                    "json",
                ],
            )
            .await,
        );
        assert_eq!(all.len(), changes.len() + refused.len());
        let times: Vec<&str> = all.iter().map(|e| e["time"].as_str().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
        // Ids are ordered per stream (two streams may hold the same id); with the result they
        // identify an event here.
        let mut ids: Vec<String> = all
            .iter()
            .map(|e| format!("{}/{}", e["id"].as_str().unwrap(), e["result"]))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len(), "no event twice");
        // The viewer may read its tenant's log, and sees the same.
        let seen = audit_events(
            ctl(
                &broker,
                &viewer,
                &[
                    "audit", "--tenant", "acme", "--kind", "changes", "-o", "json",
                ],
            )
            .await,
        );
        assert!(seen.iter().any(|e| e["action"] == "provider.create"));

        // Age: refusals older than the bound go at the next append.
        tokenfleet_broker::audit::configure(AuditRetention {
            refused: Retention {
                max_entries: 20,
                max_age: Some(Duration::from_millis(500)),
            },
            ..AuditRetention::DEFAULT
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let run = ctl(
            &broker,
            &viewer,
            &[
                "provider", "delete", "--tenant", "acme", "--name", "m365", "--yes",
            ],
        )
        .await;
        assert_eq!(run.code, 1);
        let refused = audit_events(
            admin(
                &broker,
                &[
                    "audit", "--tenant", "acme", "--kind", "refused", "-o", "json",
                ],
            )
            .await,
        );
        assert_eq!(refused.len(), 1, "{refused:?}");
        let still = audit_events(
            admin(
                &broker,
                &[
                    "audit", "--tenant", "acme", "--kind", "changes", "-o", "json",
                ],
            )
            .await,
        );
        assert!(still.iter().any(|e| e["action"] == "provider.create"));
        tokenfleet_broker::audit::configure(AuditRetention::DEFAULT);
        broker.shutdown().await;
    }
}

/// Every value of every enum flag of `tokenfleetctl`, through the binary against a broker: each
/// is accepted and comes back in the JSON output under the same name. The values exercised are
/// checked against the `[possible values: …]` the binary's help lists, so a new value without a
/// case here fails the test.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod every_enum_value {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;
    use tokenfleet_testkit::broker::{TestBroker, TestStore};

    use super::{admin, ctl_at};

    /// `flag → possible values` from `tokenfleetctl <command…> --help`.
    async fn possible_values(command: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        let mut args = command.to_vec();
        // `-h`: the short help lists `[possible values: …]` on the flag's line.
        args.push("-h");
        let help = ctl_at("http://127.0.0.1:9", None, &args).await.ok().stdout;
        let mut out = BTreeMap::new();
        let mut flag = String::new();
        for line in help.lines() {
            let t = line.trim();
            // `--flag <V>` or `-o, --output <FORMAT>`
            if t.starts_with('-')
                && let Some((_, rest)) = t.split_once("--")
            {
                flag = rest
                    .split([' ', '=', '<', '['])
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            if let Some(values) = t
                .split_once("[possible values: ")
                .map(|(_, v)| v.trim_end_matches(']'))
            {
                let set: BTreeSet<String> = values.split(", ").map(str::to_owned).collect();
                // Booleans (`--smtp-skip-certificate-verification[=BOOL]`) are not enums.
                if set != BTreeSet::from(["false".to_owned(), "true".to_owned()]) {
                    out.insert(flag.clone(), set);
                }
            }
        }
        out
    }

    fn used(seen: &mut BTreeMap<String, BTreeSet<String>>, flag: &str, value: &str) {
        seen.entry(flag.to_owned())
            .or_default()
            .insert(value.to_owned());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_enum_flag_value_round_trips_through_the_binary() {
        let broker = TestBroker::start(TestStore::Embedded).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        admin(&broker, &["tenant", "create", "--name", "acme"])
            .await
            .ok();
        let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();

        // provider --kind (with the credentials app_only and service_account mailboxes need)
        let secret = super::write(dir.path(), "secret", "enum-test-client-secret\n");
        tokenfleet_testkit::logs::secret("enum-test-client-secret");
        let sa_key = super::write(
            dir.path(),
            "sa.json",
            &serde_json::json!({
                "client_email": "printer@acme.iam.gserviceaccount.com",
                "private_key": "not-checked-until-used",
            })
            .to_string(),
        );
        for (name, kind, extra) in [
            (
                "ms",
                "microsoft",
                vec!["--client-secret-file", secret.as_str()],
            ),
            (
                "goog",
                "google",
                vec!["--service-account-key-file", sa_key.as_str()],
            ),
            (
                "gen",
                "generic",
                vec![
                    "--authorize-url",
                    "https://idp.example/authorize",
                    "--token-url",
                    "https://idp.example/token",
                    "--scope",
                    "mail",
                ],
            ),
        ] {
            let mut args = vec![
                "provider",
                "create",
                "--tenant",
                "acme",
                "--name",
                name,
                "--kind",
                kind,
                "--client-id",
                "client-1",
                "-o",
                "json",
            ];
            args.extend(extra);
            let json = admin(&broker, &args).await.ok().json();
            assert_eq!(json["kind"], kind);
            used(&mut seen, "kind", kind);
        }

        // mailbox --grant-type, --kind, --purpose
        for (name, provider, grant, kind, purposes) in [
            (
                "m-dc",
                "ms",
                "delegated_device_code",
                "admin",
                vec!["send", "pop", "imap"],
            ),
            ("m-ac", "goog", "delegated_auth_code", "bulk", vec!["send"]),
            ("m-app", "ms", "app_only", "user", vec!["send"]),
            ("m-sa", "goog", "service_account", "bulk", vec!["send"]),
        ] {
            let address = format!("{name}@acme.example");
            let mut args = vec![
                "mailbox",
                "create",
                "--tenant",
                "acme",
                "--name",
                name,
                "--address",
                &address,
                "--provider",
                provider,
                "--grant-type",
                grant,
                "--kind",
                kind,
                "-o",
                "json",
            ];
            for p in &purposes {
                args.extend(["--purpose", p]);
            }
            let json = admin(&broker, &args).await.ok().json();
            assert_eq!(json["grant_type"], grant);
            assert_eq!(json["kind"], kind);
            assert_eq!(json["purposes"], Value::from(purposes.clone()));
            used(&mut seen, "grant-type", grant);
            used(&mut seen, "kind", kind);
            for p in purposes {
                used(&mut seen, "purpose", p);
            }
        }

        // device --sender-mode, --smtp-security, --smtp-method, --smtp-tls-*-version,
        // --fetch-protocol, --fetch-security, --fetch-tls-*-version
        let cases = [
            (
                "d1",
                "fixed_admin",
                "starttls",
                "smtp",
                "1.2",
                "1.3",
                "pop3",
                "implicit_tls",
            ),
            (
                "d2",
                "bulk",
                "implicit_tls",
                "graph",
                "1.3",
                "1.3",
                "imap",
                "starttls",
            ),
            (
                "d3",
                "login_user",
                "none",
                "smtp",
                "1.2",
                "1.2",
                "pop3",
                "none",
            ),
            (
                "d4",
                "allow_user_change",
                "starttls",
                "gmail_api",
                "1.2",
                "1.3",
                "imap",
                "implicit_tls",
            ),
        ];
        for (name, mode, security, method, min, max, protocol, fetch_security) in cases {
            let mailbox_flag = match mode {
                "fixed_admin" => vec!["--admin-mailbox", "m-dc"],
                "bulk" => vec![
                    "--bulk-mailbox",
                    if method == "graph" { "m-dc" } else { "m-ac" },
                ],
                _ => vec![
                    "--user-provider",
                    if method == "gmail_api" { "goog" } else { "ms" },
                ],
            };
            let mut args = vec![
                "device",
                "create",
                "--tenant",
                "acme",
                "--name",
                name,
                "--sender-mode",
                mode,
                "--smtp-server",
                "127.0.0.1",
                "--smtp-port",
                "2525",
                "--smtp-security",
                security,
                "--smtp-method",
                method,
                "--smtp-tls-min-version",
                min,
                "--smtp-tls-max-version",
                max,
                "--fetch-protocol",
                protocol,
                "--fetch-server",
                "127.0.0.1",
                "--fetch-port",
                "1110",
                "--fetch-security",
                fetch_security,
                "--fetch-tls-min-version",
                min,
                "--fetch-tls-max-version",
                max,
                "-o",
                "json",
            ];
            args.extend(mailbox_flag);
            if mode == "allow_user_change" {
                args.extend(["--allowed-mailbox", "m-ac"]);
            }
            let run = admin(&broker, &args).await;
            assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
            let json = run.json();
            assert_eq!(json["sender_mode"], mode);
            assert_eq!(json["smtp"]["security"], security);
            assert_eq!(json["smtp"]["method"], method);
            assert_eq!(json["smtp"]["tls_min_version"], min);
            assert_eq!(json["smtp"]["tls_max_version"], max);
            assert_eq!(json["fetch"]["protocol"], protocol);
            assert_eq!(json["fetch"]["security"], fetch_security);
            used(&mut seen, "sender-mode", mode);
            used(&mut seen, "smtp-security", security);
            used(&mut seen, "smtp-method", method);
            used(&mut seen, "smtp-tls-min-version", min);
            used(&mut seen, "smtp-tls-max-version", max);
            used(&mut seen, "fetch-protocol", protocol);
            used(&mut seen, "fetch-security", fetch_security);
            used(&mut seen, "fetch-tls-min-version", min);
            used(&mut seen, "fetch-tls-max-version", max);
        }

        // api-key --role (with the tenant it needs)
        for (role, tenant) in [
            ("fleet-admin", None),
            ("tenant-admin", Some("acme")),
            ("viewer", None),
        ] {
            let mut args = vec!["api-key", "create", "--role", role, "-o", "json"];
            if let Some(t) = tenant {
                args.extend(["--tenant", t]);
            }
            let run = admin(&broker, &args).await.ok();
            let json = run.json();
            tokenfleet_testkit::logs::secret(json["key"].as_str().unwrap());
            assert_eq!(json["role"], role);
            used(&mut seen, "role", role);
        }

        // audit --kind, and the output format itself
        for kind in ["changes", "refused", "issuance", "all"] {
            admin(
                &broker,
                &["audit", "--tenant", "acme", "--kind", kind, "-o", "json"],
            )
            .await
            .ok();
            used(&mut seen, "kind", kind);
        }
        let key_id = admin(&broker, &["whoami", "-o", "json"]).await.ok().json()["key_id"].clone();
        for output in ["table", "wide", "json", "yaml", "name"] {
            let run = admin(&broker, &["whoami", "-o", output]).await.ok();
            let role = match output {
                "json" => run.json()["role"].clone(),
                "yaml" => serde_norway::from_str::<Value>(&run.stdout).unwrap()["role"].clone(),
                "name" => {
                    assert_eq!(Value::from(run.stdout.trim_end()), key_id);
                    Value::from("fleet-admin")
                }
                _ => Value::from(if run.stdout.contains("fleet-admin") {
                    "fleet-admin"
                } else {
                    "?"
                }),
            };
            assert_eq!(role, "fleet-admin", "-o {output}: {}", run.stdout);
            used(&mut seen, "output", output);
        }

        // mailbox list --status: every value filters (only mailboxes in that state come back).
        for status in [
            "not_retrieved",
            "consent_pending",
            "active",
            "refresh_failing",
            "reauth_required",
            "disabled",
        ] {
            let run = admin(
                &broker,
                &[
                    "mailbox", "list", "--tenant", "acme", "--status", status, "-o", "json",
                ],
            )
            .await
            .ok();
            for m in run.json().as_array().unwrap() {
                assert_eq!(m["token"]["status"], status);
            }
            used(&mut seen, "status", status);
        }

        // Every value the binary's help offers was exercised.
        let mut offered: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for command in [
            vec!["provider", "create"],
            vec!["mailbox", "create"],
            vec!["device", "create"],
            vec!["api-key", "create"],
            vec!["audit"],
            vec!["mailbox", "list"],
        ] {
            for (flag, values) in possible_values(&command).await {
                offered.entry(flag).or_default().extend(values);
            }
        }
        for flag in [
            "kind",
            "grant-type",
            "purpose",
            "sender-mode",
            "smtp-security",
            "smtp-method",
            "smtp-tls-min-version",
            "fetch-protocol",
            "fetch-security",
            "role",
            "output",
        ] {
            assert!(
                offered.contains_key(flag),
                "--{flag} not found in help: {offered:?}"
            );
        }
        for (flag, values) in &offered {
            let exercised = seen.get(flag).cloned().unwrap_or_default();
            let missing: Vec<&String> = values.difference(&exercised).collect();
            assert!(
                missing.is_empty(),
                "--{flag}: values never exercised: {missing:?}"
            );
        }
        let _ = dir;
        broker.shutdown().await;
    }
}
