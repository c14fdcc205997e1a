//! Short runs of every fuzz target of `agent/src/fuzz.rs` (the agent's protocol parsers): each
//! seed of `agent/tests/fuzz/corpus/<target>/` and each past failure of
//! `agent/tests/fuzz/regressions/<target>/` must pass, then the target is fuzzed for a few
//! seconds from a seed that changes every run (printed, so a failure can be replayed with the
//! long-run command's `--seed`). Longer runs: `cargo run --release -p tokenfleet-testkit --bin
//! fuzz -- --target NAME --secs N`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokenfleet_agent::fuzz::{self, Budget};

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz")
        .join(kind)
        .join(target)
}

fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir(kind, target)) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), bytes))
        })
        .collect();
    out.sort();
    out
}

fn short_run(name: &str) {
    let Some(target) = fuzz::target(name) else {
        panic!("no fuzz target {name}");
    };
    let seeds = inputs("corpus", name);
    assert!(!seeds.is_empty(), "target {name} has no seed corpus");
    let quiet = fuzz::quiet_panics();
    for (kind, list) in [
        ("corpus", &seeds),
        ("regressions", &inputs("regressions", name)),
    ] {
        for (file, input) in list {
            if let Err(message) = fuzz::run_one(target, input) {
                drop(quiet);
                panic!("{name}: {kind}/{file} fails: {message}");
            }
        }
    }
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let corpus: Vec<Vec<u8>> = seeds.into_iter().map(|(_, b)| b).collect();
    let report = fuzz::fuzz(
        target,
        &corpus,
        Budget {
            time: Duration::from_secs(3),
            seed,
            ..Budget::default()
        },
    );
    drop(quiet);
    eprintln!(
        "{name}: {} inputs in {:?}, {} behaviours, seed {seed}",
        report.executions, report.elapsed, report.signatures
    );
    if let Some(crash) = report.crashes.first() {
        panic!(
            "{name} failed on input {:?}: {} (seed {seed}; replay with the fuzz command's --seed)",
            String::from_utf8_lossy(&crash.input),
            crash.message
        );
    }
    // The driver really explores: far more inputs than seeds (a debug build on a busy 2-core
    // machine still runs thousands), and more than one behaviour.
    assert!(
        report.executions > 200,
        "{name}: only {} inputs",
        report.executions
    );
    assert!(report.signatures > 1, "{name}: one behaviour only");
}

#[test]
fn every_target_has_a_short_run_here() {
    let mut names: Vec<&str> = fuzz::TARGETS.iter().map(|t| t.name).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "header",
            "imap_response",
            "pop3_command",
            "pop3_response",
            "sasl",
            "smtp_command",
            "smtp_data",
            "smtp_reply"
        ]
    );
}

#[test]
fn smtp_command() {
    short_run("smtp_command");
}

#[test]
fn smtp_data() {
    short_run("smtp_data");
}

#[test]
fn smtp_reply() {
    short_run("smtp_reply");
}

#[test]
fn imap_response() {
    short_run("imap_response");
}

#[test]
fn pop3_command() {
    short_run("pop3_command");
}

#[test]
fn pop3_response() {
    short_run("pop3_response");
}

#[test]
fn header() {
    short_run("header");
}

#[test]
fn sasl() {
    short_run("sasl");
}

/// A property failure is caught and reported with its input, not lost: the driver's own check.
#[test]
fn a_failing_property_is_reported_with_its_input() {
    fn fails_on_dot(input: &[u8]) -> u64 {
        assert!(!input.contains(&b'.'), "a dot");
        input.len() as u64
    }
    let target = fuzz::Target {
        name: "self_check",
        about: "fails on a dot",
        run: fails_on_dot,
        dictionary: &[b"."],
    };
    let _quiet = fuzz::quiet_panics();
    let report = fuzz::fuzz(
        &target,
        &[b"abc".to_vec()],
        Budget {
            time: Duration::from_secs(2),
            ..Budget::default()
        },
    );
    let Some(crash) = report.crashes.first() else {
        panic!(
            "the driver never inserted a dot in {} inputs",
            report.executions
        );
    };
    assert!(crash.input.contains(&b'.'));
    assert!(crash.message.contains("a dot"), "{}", crash.message);
}
