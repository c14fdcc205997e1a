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
