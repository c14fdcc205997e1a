//! `bench`: every benchmark of issue 15 (and the abuse benchmarks) behind one command. Not part
//! of any test suite; run it by hand, in release:
//!
//! ```text
//! cargo build --release -p tokenfleet-broker -p tokenfleet-agent -p tokenfleet-testkit \
//!   --bin tokenfleet-broker --bin tokenfleet-agent --bin bench
//! target/release/bench all --out target/bench/figures.txt    # every scenario with its baseline
//! python3 scripts/bench-table.py target/bench/figures.txt     # the README's benchmark table
//! target/release/bench issuance --store redis                # one scenario; --help for each
//! ```
//!
//! Each scenario measures its baseline in the same run and prints one machine-readable line per
//! figure (`bench=SCENARIO key=value ...`). The figures a target is about are also printed in one
//! shared shape by [`figure`] (`bench=SCENARIO figure=NAME ... ratio=.. target=".." met=..`);
//! `scripts/bench-table.py` turns those lines into the README's table.
//!
//! One binary rather than one per scenario: CI builds every binary of the workspace
//! (`--all-targets`), and each is a link of the whole test kit.

mod agent;
mod agent_abuse;
mod anonymous;
mod broker_abuse;
mod cost;
mod fleet;
mod flood;
mod issuance;
mod refresh;
mod relay;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "tokenfleet benchmarks, each against its baseline in the same run"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Every target scenario of issue 15 in turn (issuance, relay, refresh, fleet, cost), with
    /// default
    /// options; the figure lines also go to `--out`.
    All(AllArgs),
    /// Cached-token IssueAccessToken over mTLS against Health/Check (target 1).
    Issuance(issuance::Args),
    /// Printers' scans relayed by the agent, Postfix and emailproxy (target 2).
    Relay(relay::Args),
    /// The refresh schedule at fleet scale (target 4).
    Refresh(refresh::Args),
    /// Agents holding status streams at fleet scale: RSS, CPU, command push, failover (target 3).
    Fleet(fleet::Args),
    /// Issuance latency and broker RSS with 1,000 and 100,000 mailboxes (target 5).
    Cost(cost::Args),
    /// The agent's mail path in one process.
    Agent(agent::Args),
    /// The agent under idle floods and wrong-password storms.
    AgentAbuse(agent_abuse::Args),
    /// The broker under half-open HTTP/2 streams and slow HTTP clients.
    BrokerAbuse(broker_abuse::Args),
}

#[derive(Debug, clap::Args)]
struct AllArgs {
    /// File the `bench=` lines of every scenario are written to (for scripts/bench-table.py).
    #[arg(long, default_value = "target/bench/figures.txt")]
    out: PathBuf,
    /// Scenarios to run, in order.
    #[arg(long, value_delimiter = ',', default_values_t = ["issuance".to_owned(), "relay".to_owned(), "refresh".to_owned(), "fleet".to_owned(), "cost".to_owned()])]
    only: Vec<String>,
}

fn main() -> ExitCode {
    log_to_stderr();
    match Cli::parse().scenario {
        Scenario::All(args) => all(&args),
        Scenario::Issuance(args) => done(issuance::run(args)),
        Scenario::Relay(args) => match in_runtime(relay::run(args)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => done(Err(e)),
        },
        Scenario::Refresh(args) => done(refresh::run(args)),
        Scenario::Fleet(args) => done(fleet::run(args)),
        Scenario::Cost(args) => done(cost::run(args)),
        Scenario::Agent(args) => done(in_runtime(agent::run(args))),
        Scenario::AgentAbuse(args) => done(agent_abuse::run(args)),
        Scenario::BrokerAbuse(args) => done(broker_abuse::run(args)),
    }
}

/// Every scenario logs warnings and errors to stderr (RUST_LOG overrides). Installed first, in
/// every bench process (`bench all` runs each scenario as a child): otherwise the test kit's
/// servers install the suite's TRACE capture, which slows the measured path down and writes
/// gigabytes to `target/test-logs` for the log scan to read.
fn log_to_stderr() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a scenario's future on a multi-threaded tokio runtime.
fn in_runtime<T>(
    scenario: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Runtime::new()
        .map_err(|e| anyhow::anyhow!("starting the tokio runtime: {e}"))?
        .block_on(scenario)
}

fn done(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One figure a target is about, in the shape `scripts/bench-table.py` reads: the figure's name,
/// its value and unit, the baseline's name and value from the same run (or a ceiling), the ratio,
/// the target as written in the issue and whether this run met it.
#[derive(Debug)]
pub struct Figure<'a> {
    pub scenario: &'a str,
    pub figure: &'a str,
    pub unit: &'a str,
    pub value: f64,
    /// `postfix`, `health`, `ceiling`, ... and its value measured in the same run.
    pub baseline: &'a str,
    pub baseline_value: f64,
    pub target: &'a str,
    /// Whether this run met the target; `None` for a figure the issue asks to be stated only.
    pub met: Option<bool>,
}

/// Prints `figure` as one `bench=` line (see [`Figure`]).
pub fn figure(f: &Figure<'_>) {
    let ratio = if f.baseline_value == 0.0 {
        f64::NAN
    } else {
        f.value / f.baseline_value
    };
    println!(
        "bench={} figure={} unit={} value={:.3} baseline={} baseline_value={:.3} ratio={:.3} target=\"{}\" met={}",
        f.scenario,
        f.figure,
        f.unit,
        f.value,
        f.baseline,
        f.baseline_value,
        ratio,
        f.target.replace('"', "'"),
        f.met
            .map_or("stated", |met| if met { "true" } else { "false" })
    );
}

/// What the machine is, for the table's "machine" column.
fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let load = load1().map(|l| format!("{l:.2}")).unwrap_or_default();
    format!(
        "bench=machine cores={cores} mem_gib={mem_gib:.0} load1={load} cpu=\"{}\"",
        cpu.replace('"', "'")
    )
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), the unit of [`cpu_ticks`].
pub(crate) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime field 14, stime field 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The one-minute load average.
fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Says so on stderr when other work ran on the machine in the last minute: the baselines share
/// the cores with it too, and a busy machine slows the cheap baseline (the health check above
/// all) more than tokenfleet's own work, so the same-run ratios look better than they are (runs
/// at load 4-19 reported issuance at 0.8-0.99x where an idle machine gives 0.3x).
fn warn_if_busy() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(load) = load1().filter(|&load| load >= 1.0) {
        eprintln!(
            "bench all: WARNING: the one-minute load average is {load:.2} on {cores} cores: \
             other work is running or just ran; its figures hide tokenfleet's own cost \
             (issuance most). Quote figures only from a run on an idle machine."
        );
    }
}

/// Runs each scenario as a child process of this executable (one clean process, its own
/// runtime and memory, per scenario), echoes its output and keeps its `bench=` lines.
fn all(args: &AllArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("bench all: this executable's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        eprintln!("bench all: creating {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let mut out = match std::fs::File::create(&args.out) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bench all: creating {}: {e}", args.out.display());
            return ExitCode::FAILURE;
        }
    };
    let machine = machine_line();
    println!("{machine}");
    let _ = writeln!(out, "{machine}");
    warn_if_busy();
    let mut failed = Vec::new();
    for scenario in &args.only {
        println!("\n### bench {scenario}");
        let child = Command::new(&exe)
            .arg(scenario)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bench all: starting {scenario}: {e}");
                failed.push(scenario.clone());
                continue;
            }
        };
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("{line}");
                if line.starts_with("bench=") {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        match child.wait() {
            Ok(status) if status.success() => {}
            Ok(status) => {
                eprintln!("bench all: {scenario} ended with {status}");
                failed.push(scenario.clone());
            }
            Err(e) => {
                eprintln!("bench all: waiting for {scenario}: {e}");
                failed.push(scenario.clone());
            }
        }
    }
    println!("\nbench all: figures in {}", args.out.display());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("bench all: failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}
