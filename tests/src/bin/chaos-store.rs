//! The store's failover chaos run (issue 11: "nothing acknowledged is ever lost"), longer than the
//! default suite's version. Not part of any test suite; run it by hand:
//!
//! ```text
//! cargo run -p tokenfleet-testkit --bin chaos-store -- [rounds] [settle-secs] [min-replicas-acked]
//! ```
//!
//! Each round starts a fresh Redis master, one replica and a sentinel on loopback ports, runs a
//! writer through the Redis store (Sentinel mode) and fails the master over twice: once with
//! `SENTINEL FAILOVER`, once with SIGKILL (see
//! [`sentinel_write_loss_probe`](tokenfleet_testkit::redis::sentinel_write_loss_probe)). It prints
//! what each scenario acknowledged, what failed (as "unavailable", so the caller retries) and what
//! was acknowledged but lost; it exits 1 if anything acknowledged was lost. `min-replicas-acked 0`
//! shows what the store did before it waited for replicas.

use std::process::ExitCode;
use std::time::Duration;

use tokenfleet_testkit::redis::{Failover, sentinel_write_loss_probe};

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
        for how in [Failover::Forced, Failover::Kill] {
            let result = sentinel_write_loss_probe(how, settle, |c| {
                c.min_replicas_acked = Some(replicas);
            })
            .await;
            match result {
                Ok(report) => {
                    println!("round {round} {how:?} (min_replicas_acked {replicas}): {report}");
                    lost += report.missing.len();
                }
                Err(e) => {
                    eprintln!("round {round} {how:?}: probe failed: {e:#}");
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
