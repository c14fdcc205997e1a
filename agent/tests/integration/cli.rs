//! The `tokenfleet-agent` binary's command line, without a broker: clear errors for bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn agent(args: &[&str], state_dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenfleet-agent"))
        .args(args)
        .env("TOKENFLEET_AGENT_STATE_DIR", state_dir)
        .env_remove("TOKENFLEET_BROKER")
        .env_remove("TOKENFLEET_ENROLLMENT_CODE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn enrollment_needs_an_https_broker_and_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = agent(
        &[
            "enroll",
            "--broker",
            "http://127.0.0.1:9",
            "--code",
            "tfe_secretcode",
        ],
        dir.path(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("https://"), "{stderr}");
    assert!(
        !stderr.contains("tfe_secretcode"),
        "the code is not echoed: {stderr}"
    );

    let (code, _, stderr) = agent(&["enroll", "--broker", "https://127.0.0.1:9"], dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--code"), "{stderr}");

    let (code, _, stderr) = agent(
        &[
            "enroll",
            "--broker",
            "https://127.0.0.1:9",
            "--code",
            "x",
            "--ca-file",
            "/nonexistent/ca.pem",
        ],
        dir.path(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--ca-file /nonexistent/ca.pem"), "{stderr}");
}

#[test]
fn an_agent_that_is_not_enrolled_says_so() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["status", "renew"] {
        let (code, _, stderr) = agent(&[command], &dir.path().join("agent"));
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("not enrolled"), "{command}: {stderr}");
    }
}

/// `default-config`, `check-config` and `print-config` through the binary: the defaults check
/// clean; every problem of a bad file and environment is reported at once with its source (exit
/// 64, nothing printed); `print-config` shows the effective values; `[log] format = "json"` makes
/// every log line a JSON object.
#[test]
fn configuration_commands_report_every_problem_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let (code, defaults, stderr) = agent(&["default-config"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, &defaults).unwrap();
    let path = file.to_str().unwrap();
    let (code, stdout, stderr) = agent(&["check-config", "--config", path], dir.path());
    assert_eq!(code, 0, "the printed defaults check clean: {stderr}");
    assert!(
        stdout.starts_with("configuration OK: SMTP on 127.0.0.1:2525"),
        "{stdout}"
    );

    std::fs::write(
        &file,
        "smtp_listen = \"nope\"\ndelivery_concurency = 3\n[log]\nformat = \"xml\"\n\
         [ingress_limits]\nmax_sessions = \"many\"\n",
    )
    .unwrap();
    for command in ["check-config", "print-config", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tokenfleet-agent"))
            .args([command, "--config", path])
            .env("TOKENFLEET_AGENT_STATE_DIR", dir.path())
            .env("TOKENFLEET_AGENT_RETRY_BASE_SECONDS", "0")
            .env("TOKENFLEET_AGENT_BOUNCE", "maybe")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{command}: {stderr}");
        assert!(out.stdout.is_empty(), "{command} printed something");
        for expected in [
            "6 problems".to_owned(),
            "unknown key `delivery_concurency` (expected one of: ".to_owned(),
            format!("`ingress_limits.max_sessions`: invalid type: found a string (4 characters), expected u32 (in {path})"),
            "`bounce`: invalid type: found a string (5 characters), expected a boolean (from environment variable TOKENFLEET_AGENT_BOUNCE)".to_owned(),
            "smtp_listen = \"nope\": not an address like 127.0.0.1:2525".to_owned(),
            "retry_base_seconds: must be at least 1 (from environment variable TOKENFLEET_AGENT_RETRY_BASE_SECONDS)".to_owned(),
            format!("log.format = \"xml\": must be \"text\" or \"json\" (in {path})"),
        ] {
            assert!(stderr.contains(&expected), "{command}: missing {expected:?} in:\n{stderr}");
        }
    }

    // The effective configuration, environment included.
    std::fs::write(&file, "[log]\nformat = \"json\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenfleet-agent"))
        .args(["print-config", "--config", path])
        .env("TOKENFLEET_AGENT_STATE_DIR", dir.path())
        .env("TOKENFLEET_AGENT_DELIVERY_CONCURRENCY", "7")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("delivery_concurrency = 7"), "{printed}");
    assert!(printed.contains("format = \"json\""), "{printed}");

    // JSON log lines (the agent is not enrolled, so it stops after its first line).
    let (code, _, stderr) = agent(&["run", "--config", path], dir.path());
    assert_eq!(code, 1, "{stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    let line: serde_json::Value = serde_json::from_str(first)
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {first}"));
    assert_eq!(
        line["fields"]["message"], "tokenfleet-agent starting",
        "{line}"
    );
    assert_eq!(line["level"], "INFO");
}

/// `[metrics]` through the binary: on loopback by default, off with `listen = ""` from the
/// environment, its problems named with their source, and `print-config` shows the section.
#[test]
fn the_metrics_listener_is_configured_and_checked_like_every_other_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "[metrics]\nlisten = \"127.0.0.1:9555\"\nmax_request_header_bytes = 100\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let run = |command: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenfleet-agent"));
        cmd.args([command, "--config", path])
            .env("TOKENFLEET_AGENT_STATE_DIR", dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, stderr) = run(
        "check-config",
        &[("TOKENFLEET_AGENT_METRICS__LISTEN", "lan")],
    );
    assert_eq!(code, 64, "{stderr}");
    for expected in [
        format!("metrics.max_request_header_bytes = 100: must be 8192 to 1048576 (in {path})"),
        "metrics.listen = \"lan\": not an address like 127.0.0.1:9465".to_owned(),
        "(from environment variable TOKENFLEET_AGENT_METRICS__LISTEN)".to_owned(),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    std::fs::write(&file, "[metrics]\nlisten = \"127.0.0.1:9555\"\n").unwrap();
    let (code, stdout, stderr) = run("check-config", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(", metrics on 127.0.0.1:9555,"), "{stdout}");
    let (code, stdout, stderr) = run("check-config", &[("TOKENFLEET_AGENT_METRICS__LISTEN", "")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(", metrics off,"), "{stdout}");
    let (code, stdout, stderr) = run("print-config", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("[metrics]\nlisten = \"127.0.0.1:9555\"\nmax_connections = 16\n"),
        "{stdout}"
    );
}
