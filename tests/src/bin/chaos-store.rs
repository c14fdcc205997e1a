//! The store's failover chaos run (issue 11: "nothing acknowledged is ever lost"), longer than the
//! default suite's version. Not part of any test suite; run it by hand:
//!
//! ```text
//! cargo run -p tokenfleet-testkit --bin chaos-store -- [rounds] [settle-secs] [min-replicas-acked]
//! ```
//!
//! Each round runs four scenarios, each on fresh Redis processes on loopback ports with a writer
//! going through the Redis store: a master, one replica and a sentinel (Sentinel mode), failed
//! over with `SENTINEL FAILOVER` and with SIGKILL (see
//! [`sentinel_write_loss_probe`](tokenfleet_testkit::redis::sentinel_write_loss_probe)); and a
//! three-master Cluster with a replica each, failed over with `CLUSTER FAILOVER` and with SIGKILL
//! ([`cluster_write_loss_probe`](tokenfleet_testkit::redis::cluster_write_loss_probe)). It prints
//! what each scenario acknowledged, what failed (as "unavailable", so the caller retries) and what
//! was acknowledged but lost; it exits 1 if anything acknowledged was lost. `min-replicas-acked 0`
//! shows what the store did before it waited for replicas.

use std::process::ExitCode;
use std::time::Duration;

use tokenfleet_testkit::redis::{Failover, cluster_write_loss_probe, sentinel_write_loss_probe};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| -> u64 {
        args.get(i)
            .map(|a| a.parse().unwrap_or(default))
            .unwrap_or(default)
    };
    let rounds = num(0, 3);
    let settle = Duration::from_secs(num(1, 5));
    let replicas = u32::try_from(num(2, 1)).unwrap_or(1);
    let mut lost = 0;
    for round in 1..=rounds {
        for (mode, how) in [
            ("sentinel", Failover::Forced),
            ("sentinel", Failover::Kill),
            ("cluster", Failover::Forced),
            ("cluster", Failover::Kill),
        ] {
            let tune = |c: &mut tokenfleet_store::redis_store::RedisConfig| {
                c.min_replicas_acked = Some(replicas);
            };
            let result = if mode == "sentinel" {
                sentinel_write_loss_probe(how, settle, tune).await
            } else {
                cluster_write_loss_probe(how, settle, tune).await
            };
            match result {
                Ok(report) => {
                    println!(
                        "round {round} {mode} {how:?} (min_replicas_acked {replicas}): {report}"
                    );
                    lost += report.missing.len();
                }
                Err(e) => {
                    eprintln!("round {round} {mode} {how:?}: probe failed: {e:#}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    println!("acknowledged writes lost in total: {lost}");
    if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
