//! The chaos suite, one command (issue 11): every scenario of
//! [`tokenfleet_testkit::chaos::SCENARIOS`] against the real `tokenfleet-broker` and
//! `tokenfleet-agent` executables, real `redis-server`/Sentinel/Cluster processes and Dovecot,
//! all on loopback ports. Not a test (the default suite runs the short version as
//! `tests/tests/e2e/chaos.rs`); run it by hand:
//!
//! ```text
//! cargo run --release -p tokenfleet-testkit --bin chaos -- [--short] [--scenario NAME]... \
//!     [--idp-recovery-bound SECS] [--store-min-replicas-acked N] [--list]
//! ```
//!
//! Without `--scenario` it runs them all, one after another. Each prints one machine-readable
//! line (`chaos scenario=NAME result=pass|FAIL lost=N key=value …`) when it ends; a human table
//! of all of them follows at the end. Exit status: 0 when nothing was lost and no promise broken,
//! 1 otherwise, 2 when a scenario could not run. `--idp-recovery-bound` asserts the
//! identity-provider scenario's recovery time (the short version asserts
//! [`SHORT_IDP_RECOVERY_BOUND`](tokenfleet_testkit::chaos::SHORT_IDP_RECOVERY_BOUND) by default;
//! `0` turns the assertion off). PATH must hold `redis-server`, `redis-cli`, `dovecot` and
//! `python3` (`export PATH="$PWD/.tools/bin:$PWD/.venv-test/bin:$PATH"`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokenfleet_testkit::chaos::{self, Options, SCENARIOS};

/// The chaos suite.
#[derive(Debug, Parser)]
#[command(name = "chaos")]
struct Cli {
    /// The short version: seconds-scale outages, fewer messages.
    #[arg(long)]
    short: bool,
    /// Run only this scenario (repeatable).
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Seconds from the identity provider's recovery to every grant ACTIVE that still pass
    /// (0: measure only).
    #[arg(long, value_name = "SECS")]
    idp_recovery_bound: Option<u64>,
    /// `store-failover`: replicas the probed store's writes wait for (default 1; 0 shows the
    /// store without the wait).
    #[arg(long, value_name = "N")]
    store_min_replicas_acked: Option<u32>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list {
        for (name, what) in SCENARIOS {
            println!("{name:<20} {what}");
        }
        return ExitCode::SUCCESS;
    }
    let mut options = if cli.short {
        Options::short()
    } else {
        Options::long()
    };
    if let Some(bound) = cli.idp_recovery_bound {
        options.idp_recovery_bound = (bound > 0).then(|| Duration::from_secs(bound));
    }
    options.store_min_replicas_acked = cli.store_min_replicas_acked;
    let names: Vec<String> = if cli.scenarios.is_empty() {
        SCENARIOS.iter().map(|(n, _)| (*n).to_owned()).collect()
    } else {
        cli.scenarios.clone()
    };
    for name in &names {
        if !SCENARIOS.iter().any(|(n, _)| n == name) {
            let known: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
            eprintln!(
                "chaos: unknown scenario `{name}` (one of: {})",
                known.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    println!(
        "chaos: {} version, scenarios: {}",
        if options.short { "short" } else { "long" },
        names.join(", ")
    );
    let mut reports = Vec::new();
    let mut could_not_run = false;
    for name in &names {
        println!("chaos: running {name} …");
        match chaos::run(name, &options).await {
            Ok(report) => {
                println!("{}", report.summary_line());
                reports.push(report);
            }
            Err(error) => {
                println!("chaos scenario={name} result=ERROR error={error:#}");
                could_not_run = true;
            }
        }
    }
    println!();
    print!("{}", chaos::table(&reports));
    let lost: usize = reports.iter().map(|r| r.lost).sum();
    let failed = reports.iter().filter(|r| !r.passed()).count();
    println!(
        "chaos: lost in total {lost}; scenarios failed {failed} of {}",
        names.len()
    );
    if failed > 0 {
        ExitCode::from(1)
    } else if could_not_run {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
