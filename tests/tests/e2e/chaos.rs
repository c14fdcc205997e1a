//! The chaos suite's short version (seconds-scale outages, fewer messages; see
//! `tokenfleet_testkit::chaos` and `cargo run --release -p tokenfleet-testkit --bin chaos`): one
//! test per scenario, each failing when anything acknowledged was lost or a promise was broken,
//! with the scenario's summary line and table on stderr. The scenarios that start several
//! Redis processes at once (Sentinel, Cluster) are in nextest's `heavy` group.

use tokenfleet_testkit::chaos::{self, Options};

async fn scenario(name: &str) {
    tokenfleet_testkit::logs::capture();
    let report = chaos::run(name, &Options::short())
        .await
        .unwrap_or_else(|e| panic!("chaos scenario {name} could not run: {e:#}"));
    eprintln!("{}", report.summary_line());
    eprint!("{}", chaos::table(std::slice::from_ref(&report)));
    assert!(
        report.passed(),
        "chaos scenario {name}:\n{}",
        chaos::table(std::slice::from_ref(&report))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_restart() {
    scenario("redis-restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sentinel_failover() {
    scenario("sentinel-failover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cluster_migration() {
    scenario("cluster-migration").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_replica_kill() {
    scenario("replica-kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_agent_kill() {
    scenario("agent-kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_upstream_faults() {
    scenario("upstream-faults").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_idp_outage() {
    scenario("idp-outage").await;
}
