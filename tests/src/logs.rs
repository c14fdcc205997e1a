//! Every log line of the test suite, kept on disk, and every secret the tests made, so one last
//! test (`tests/tests/zz_log_scan.rs`) can prove no secret was ever logged.
//!
//! [`capture`] installs (once per process) a global `tracing` subscriber at TRACE for every
//! target, also taking `log` records, that writes plain-text lines to
//! `<dir>/<pid>-<test name>.log`. [`secret`] appends a value the tests created (API key, client
//! secret, access or refresh token, device or authorization code, private key) to
//! `<dir>/<pid>.secrets`, one base64 line each (PEM keys span lines). `<dir>` is
//! [`log_dir`]: `$TOKENFLEET_TEST_LOG_DIR`, else `target/test-logs` in the workspace.
//!
//! The test servers ([`crate::broker::TestBroker`], [`crate::fake_idp::FakeIdp`],
//! [`crate::redis::RedisServer`]) call [`capture`] when they start and register what they hand
//! out; harnesses that make their own secrets call [`secret`] themselves. A process that already
//! has a global subscriber keeps it (and is not captured). Failing to write is never a test
//! failure here: the scan's own checks (enough files, lines and secrets) catch a capture that
//! stopped working.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use base64::Engine as _;

/// Overrides where logs and secrets go (default: `target/test-logs` in the workspace).
pub const LOG_DIR_ENV: &str = "TOKENFLEET_TEST_LOG_DIR";
/// Values shorter than this are not registered: they would match by chance (and no real
/// credential is this short).
pub const MIN_SECRET_LEN: usize = 8;

/// The directory logs and secrets are written to.
pub fn log_dir() -> PathBuf {
    match std::env::var_os(LOG_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-logs")),
    }
}

/// Installs the capturing subscriber unless this process already has one. Cheap after the first
/// call.
pub fn capture() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = log_dir();
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        let name = format!("{}-{}.log", std::process::id(), file_safe(&test_name()));
        let Ok(file) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
        else {
            return;
        };
        // Everything, our crates and every dependency, at TRACE: the requirement is that no
        // secret appears at any level.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(Mutex::new(file))
            .try_init();
    });
}

/// Registers `value` as a secret that must never be logged (ignored if shorter than
/// [`MIN_SECRET_LEN`]).
pub fn secret(value: &str) {
    static FILE: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    if value.chars().count() < MIN_SECRET_LEN {
        return;
    }
    let file = FILE.get_or_init(|| {
        let dir = log_dir();
        std::fs::create_dir_all(&dir).ok()?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.secrets", std::process::id())))
            .ok()
            .map(Mutex::new)
    });
    if let Some(file) = file {
        let mut line = base64::engine::general_purpose::STANDARD.encode(value);
        line.push('\n');
        let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = file.write_all(line.as_bytes());
    }
}

/// The running test's name: nextest's `NEXTEST_TEST_NAME`, else the thread's name (libtest
/// names test threads after their test), else `process`.
fn test_name() -> String {
    std::env::var("NEXTEST_TEST_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::thread::current()
                .name()
                .filter(|name| *name != "main")
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "process".to_owned())
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect()
}
