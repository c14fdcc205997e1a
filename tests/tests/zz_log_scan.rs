//! No secret is ever logged: every line the whole test suite logged at TRACE (see
//! `tokenfleet_testkit::logs`) is searched for every secret the tests created — API keys, client
//! secrets, access and refresh tokens, device and authorization codes, assertions, private keys.
//!
//! It reads what the other tests left behind, so it runs after them, on its own:
//! `scripts/test.sh` clears `target/test-logs`, runs the suite, then this binary. The nextest
//! profiles leave it out by default (`.config/nextest.toml`); run it by hand with
//! `cargo nextest run -p tokenfleet-testkit --profile log-scan`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aho_corasick::AhoCorasick;
use base64::Engine as _;
use tokenfleet_testkit::logs;

/// Fewer log files than this means the capture broke (the suite starts far more test servers).
const MIN_LOG_FILES: usize = 20;
/// Fewer secrets than this means the registration broke.
const MIN_SECRETS: usize = 50;
/// Lines of a multi-line secret (a PEM body) at least this long are secrets on their own: a key
/// logged with escaped newlines (`Debug`, JSON) shows them, never the whole PEM.
const MIN_SECRET_LINE: usize = 16;
/// Findings shown in the failure message.
const SHOWN: usize = 20;

fn files_with_extension(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

/// Every registered secret, and the long lines of multi-line ones.
fn needles(dir: &Path) -> (usize, Vec<String>) {
    let mut secrets = BTreeSet::new();
    for file in files_with_extension(dir, "secrets") {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(line)
                .unwrap_or_else(|e| panic!("{}:{}: not base64: {e}", file.display(), n + 1));
            secrets.insert(String::from_utf8(bytes).unwrap());
        }
    }
    let count = secrets.len();
    let mut needles = secrets.clone();
    for secret in secrets.iter().filter(|s| s.contains('\n')) {
        needles.extend(
            secret
                .lines()
                .map(str::trim)
                .filter(|line| line.len() >= MIN_SECRET_LINE && !line.starts_with("-----"))
                .map(str::to_owned),
        );
    }
    (count, needles.into_iter().collect())
}

/// A secret shown in a failure: enough to tell which kind it is, not the whole value.
fn hint(secret: &str) -> String {
    let start: String = secret.chars().take(10).collect();
    format!("{start:?}… ({} chars)", secret.chars().count())
}

#[test]
fn no_secret_appears_in_any_test_log() {
    let dir = logs::log_dir();
    let run_first = format!(
        "no test logs in {}: this test scans what the rest of the suite logged, so run the \
         whole suite first — `bash scripts/test.sh` does (clears the logs, runs every test, then \
         this scan)",
        dir.display()
    );
    assert!(dir.is_dir(), "{run_first}");
    let log_files = files_with_extension(&dir, "log");
    assert!(
        log_files.len() >= MIN_LOG_FILES,
        "{} log files (expected at least {MIN_LOG_FILES}); {run_first}",
        log_files.len()
    );

    let (secret_count, needles) = needles(&dir);
    assert!(
        secret_count >= MIN_SECRETS,
        "only {secret_count} secrets registered (expected at least {MIN_SECRETS}): \
         tokenfleet_testkit::logs::secret is not being called"
    );
    let matcher = AhoCorasick::new(&needles).unwrap();

    let (mut lines, mut bytes, mut trace_lines, mut own_lines) = (0usize, 0usize, 0usize, 0usize);
    let mut findings = Vec::new();
    let mut finding_count = 0usize;
    for file in &log_files {
        let content = std::fs::read(file).unwrap();
        bytes += content.len();
        // Searched as a whole, so a secret spanning lines is found too; reported by line.
        let line_starts: Vec<usize> = std::iter::once(0)
            .chain(
                content
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        for line in content.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            lines += 1;
            let text = String::from_utf8_lossy(line);
            trace_lines += usize::from(text.contains(" TRACE "));
            own_lines += usize::from(text.contains(" tokenfleet_"));
        }
        for found in matcher.find_iter(&content) {
            finding_count += 1;
            if findings.len() < SHOWN {
                let line_no = line_starts.partition_point(|start| *start <= found.start());
                let start = line_starts[line_no - 1];
                let end = content[found.end()..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(content.len(), |p| found.end() + p);
                let line = format!(
                    "{}[SECRET]{}",
                    String::from_utf8_lossy(&content[start..found.start()]),
                    String::from_utf8_lossy(&content[found.end()..end])
                );
                findings.push(format!(
                    "{}:{line_no}: {} in: {line}",
                    file.display(),
                    hint(&needles[found.pattern().as_usize()])
                ));
            }
        }
    }

    println!(
        "scanned {} log files, {lines} lines ({bytes} bytes; {trace_lines} at TRACE, \
         {own_lines} from tokenfleet_* targets) for {secret_count} secrets ({} search strings)",
        log_files.len(),
        needles.len()
    );
    assert!(
        findings.is_empty(),
        "{finding_count} secret(s) found in test logs (first {}):\n{}",
        findings.len(),
        findings.join("\n")
    );
    assert!(
        trace_lines > 0,
        "no TRACE lines in the test logs: the capture is not at TRACE level"
    );
    assert!(
        own_lines > 0,
        "no lines from tokenfleet_* targets in the test logs: the broker's logs are not captured"
    );
}
