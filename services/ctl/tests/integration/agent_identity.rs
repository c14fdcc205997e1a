//! End-to-end: `tokenfleetctl agent enroll-code|revoke|list|show` and the CA of an `https://`
//! broker (`--ca-file`, or the dev CA found through `TOKENFLEET_STATE_DIR`), against an
//! in-process broker serving TLS on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::Value;
use tokenfleet_testkit::broker::{TestBroker, TestStore};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        serde_json::from_str(&self.stdout).unwrap()
    }
}

/// Runs `tokenfleetctl` in `cwd` with only the given variables about the broker.
async fn ctl(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfleetctl"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("TOKENFLEET_API_KEY_FILE")
        .env_remove("TOKENFLEET_TENANT")
        .env_remove("TOKENFLEET_CA_FILE")
        // No operator config file of this machine: contexts only where a test writes one.
        .env(
            "TOKENFLEETCTL_CONFIG",
            "/nonexistent/tokenfleetctl/config.yaml",
        )
        .env_remove("TOKENFLEETCTL_CONTEXT")
        .env_remove("TOKENFLEET_STATE_DIR")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn enroll_codes_and_revocation_from_the_cli() {
    let broker = TestBroker::start_tls(TestStore::Embedded).await.unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let url = broker.grpc_url();
    let ca = broker.tls_ca_file();
    let env = [
        ("TOKENFLEET_BROKER", url.as_str()),
        ("TOKENFLEET_API_KEY", broker.admin_key.expose()),
        ("TOKENFLEET_CA_FILE", ca.to_str().unwrap()),
    ];
    ctl(
        cwd.path(),
        &env,
        &["tenant", "create", "--name", "acme", "-o", "json"],
    )
    .await
    .json();

    let created = ctl(
        cwd.path(),
        &env,
        &[
            "agent",
            "enroll-code",
            "--tenant",
            "acme",
            "--name",
            "site-a",
            "--display-name",
            "Head office",
            "--ttl",
            "15m",
            "-o",
            "json",
        ],
    )
    .await;
    let view = created.json();
    let code = view["code"].as_str().unwrap().to_owned();
    assert!(code.starts_with("tfe_"), "{view}");
    assert!(view["expire_time"].is_string(), "{view}");
    assert!(
        view["enroll_command"]
            .as_str()
            .unwrap()
            .contains(&format!("--broker {url} --code {code}")),
        "{view}"
    );
    assert!(!created.stderr.contains(&code));

    let listed = ctl(
        cwd.path(),
        &env,
        &["agent", "list", "--tenant", "acme", "-o", "json"],
    )
    .await
    .json();
    assert_eq!(listed[0]["name"], "site-a");
    assert_eq!(listed[0]["display_name"], "Head office");
    assert_eq!(listed[0]["revoked"], false);

    let bad = ctl(
        cwd.path(),
        &env,
        &[
            "agent",
            "enroll-code",
            "--tenant",
            "acme",
            "--name",
            "site-b",
            "--ttl",
            "2d",
        ],
    )
    .await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("--ttl"), "{}", bad.stderr);

    let revoked = ctl(
        cwd.path(),
        &env,
        &[
            "agent", "revoke", "--tenant", "acme", "--name", "site-a", "-o", "json", "--yes",
        ],
    )
    .await
    .json();
    assert_eq!(revoked["revoked"], true);
    let table = ctl(cwd.path(), &env, &["agent", "list", "--tenant", "acme"]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.contains("REVOKED"), "{}", table.stdout);

    let refused = ctl(
        cwd.path(),
        &env,
        &[
            "agent",
            "enroll-code",
            "--tenant",
            "acme",
            "--name",
            "site-a",
        ],
    )
    .await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("revoked"), "{}", refused.stderr);
}

#[tokio::test]
async fn a_local_dev_brokers_ca_is_found_without_ca_file() {
    let broker = TestBroker::start_tls(TestStore::Embedded).await.unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let url = broker.grpc_url();
    let state_dir = broker.state_dir.to_str().unwrap().to_owned();
    let base = [
        ("TOKENFLEET_BROKER", url.as_str()),
        ("TOKENFLEET_API_KEY", broker.admin_key.expose()),
    ];

    // No CA anywhere: the broker's certificate is not trusted.
    let untrusted = ctl(cwd.path(), &base, &["whoami", "-o", "json"]).await;
    assert_eq!(untrusted.code, 69, "{}", untrusted.stderr);

    // The dev CA in the broker's state directory.
    let mut env = base.to_vec();
    env.push(("TOKENFLEET_STATE_DIR", state_dir.as_str()));
    let who = ctl(cwd.path(), &env, &["whoami", "-o", "json"])
        .await
        .json();
    assert_eq!(who["role"], "fleet-admin");

    // ./tokenfleet-data/dev-ca.pem, where a `serve --dev` started here keeps it.
    std::fs::create_dir(cwd.path().join("tokenfleet-data")).unwrap();
    std::fs::copy(
        broker.tls_ca_file(),
        cwd.path().join("tokenfleet-data").join("dev-ca.pem"),
    )
    .unwrap();
    let who = ctl(cwd.path(), &base, &["whoami", "-o", "json"])
        .await
        .json();
    assert_eq!(who["role"], "fleet-admin");
}
