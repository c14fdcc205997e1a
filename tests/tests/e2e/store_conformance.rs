//! The store conformance suite on every backend: the embedded file, a standalone redis-server, a
//! three-master Redis Cluster and a Sentinel-watched master; plus persistence and reconnection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenfleet_store::embedded::EmbeddedStore;
use tokenfleet_store::redis_store::{RedisConfig, RedisStore};
use tokenfleet_store::{
    Precondition, RecordKey, Scope, Store, StoreConfig, StoreError, conformance,
};
use tokenfleet_testkit::redis::{RedisCluster, RedisSentinel, RedisServer};

#[tokio::test(flavor = "multi_thread")]
async fn embedded_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("data/store.redb"))
        .await
        .unwrap();
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_standalone_conformance() {
    let server = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(&RedisConfig::standalone(server.url()))
        .await
        .unwrap();
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_conformance() {
    let cluster = RedisCluster::start().await.unwrap();
    let store = RedisStore::connect(&RedisConfig::cluster(cluster.seed_urls()))
        .await
        .unwrap();
    conformance::run_all(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_sentinel_conformance() {
    // A replica too: in sentinel mode every write waits for one (`min_replicas_acked`).
    let master = RedisServer::start().await.unwrap();
    let _replica = RedisServer::start_replica_of(&master).await.unwrap();
    let sentinel = RedisSentinel::start_watching(&master, "tfmaster", 5000, 1)
        .await
        .unwrap();
    let config = RedisConfig::sentinel(vec![sentinel.url()], sentinel.master_name());
    let store = RedisStore::connect(&config).await.unwrap();
    conformance::run_all(Arc::new(store)).await;
}

/// Concurrent audit appends with a replica to wait for share their `WAIT`s: each stream's
/// pending appends go in one pipeline with one `WAIT` (group commit), every append still answered
/// only after the replica confirmed it, each with its own id, none lost.
#[tokio::test(flavor = "multi_thread")]
async fn redis_concurrent_appends_share_their_replication_waits() {
    let master = RedisServer::start().await.unwrap();
    let replica = RedisServer::start_replica_of(&master).await.unwrap();
    let mut config = RedisConfig::standalone(master.url());
    config.min_replicas_acked = Some(1);
    let store = Arc::new(RedisStore::connect(&config).await.unwrap());
    let scope = Scope::Tenant("acme".into());
    let appends: u64 = 400;
    let tasks: Vec<_> = (0..appends)
        .map(|i| {
            let store = Arc::clone(&store);
            let scope = scope.clone();
            tokio::spawn(async move {
                store
                    .append(&scope, "audit", format!("record {i}").into_bytes(), 10_000)
                    .await
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap().expect("append acknowledged"));
    }
    assert_eq!(ids.len() as u64, appends, "every append got its own id");
    let back = store
        .read_back(&scope, "audit", None, appends as usize + 10)
        .await
        .unwrap();
    assert_eq!(back.len() as u64, appends, "every record is in the stream");
    // The replica holds them all: they were confirmed before being acknowledged.
    let keys = tokenfleet_testkit::redis::command(master.port(), &["KEYS", "*audit*"])
        .await
        .unwrap();
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys.len(), 1, "one audit stream: {keys:?}");
    let on_replica = tokenfleet_testkit::redis::command(replica.port(), &["XLEN", keys[0]])
        .await
        .unwrap();
    assert_eq!(on_replica.trim(), appends.to_string(), "replica's XLEN");
    let stats = tokenfleet_testkit::redis::command(master.port(), &["INFO", "commandstats"])
        .await
        .unwrap();
    let waits = command_calls(&stats, "wait");
    let xadds = command_calls(&stats, "xadd");
    assert_eq!(xadds, appends, "INFO commandstats: {stats}");
    assert!(
        waits >= 1 && waits < appends / 2,
        "{waits} WAITs for {appends} concurrent appends: they were not grouped"
    );
}

/// `calls=` of `cmdstat_NAME` in `INFO commandstats` (0 when absent).
fn command_calls(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("cmdstat_{name}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_data_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let key = RecordKey::tenant("acme", "mailbox", "m1");
    let config: StoreConfig =
        serde_json::from_value(serde_json::json!({ "embedded": { "path": path } })).unwrap();
    let lease_fence;
    {
        let store = tokenfleet_store::connect(&config).await.unwrap();
        store
            .put(&key, vec![0, 159, 146, 150], Precondition::Absent)
            .await
            .unwrap();
        store
            .put(&key, vec![1, 2, 3], Precondition::Version(1))
            .await
            .unwrap();
        store
            .append(&Scope::Global, "audit", b"first".to_vec(), 100)
            .await
            .unwrap();
        let lease = store
            .try_lease("refresh:m1", "replica-a", Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        lease_fence = lease.fence;
        store.schedule("refresh", "acme/m1", 42).await.unwrap();
        store.schedule("refresh", "acme/m2", 7).await.unwrap();
        store.schedule("refresh", "acme/m1", 50).await.unwrap();
        // Dropping the last handle closes the file.
    }
    let store = tokenfleet_store::connect(&config).await.unwrap();
    let rec = store.get(&key).await.unwrap().expect("record after reopen");
    assert_eq!((rec.version, rec.data), (2, vec![1, 2, 3]));
    let listed = store
        .list(&Scope::Tenant("acme".into()), "mailbox", None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let second = store
        .append(&Scope::Global, "audit", b"second".to_vec(), 100)
        .await
        .unwrap();
    let back = store
        .read_back(&Scope::Global, "audit", None, 10)
        .await
        .unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].id, second, "stream ids keep growing after reopen");
    assert_eq!(back[1].data, b"first");
    assert_eq!(
        store.due("refresh", 100, 10).await.unwrap(),
        [("acme/m2".to_owned(), 7), ("acme/m1".to_owned(), 50)],
        "schedule after reopen"
    );
    // Fences keep growing across restarts too.
    let deadline = Instant::now() + Duration::from_secs(5);
    let lease = loop {
        if let Some(l) = store
            .try_lease("refresh:m1", "replica-b", Duration::from_secs(10))
            .await
            .unwrap()
        {
            break l;
        }
        assert!(Instant::now() < deadline, "1 ms lease never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(lease.fence > lease_fence);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_store_reconnects_after_server_restart() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
        .await
        .unwrap();
    let mut config = RedisConfig::standalone(server.url());
    config.connect_timeout_ms = 300;
    config.command_timeout_ms = 500;
    let store = RedisStore::connect(&config).await.unwrap();
    let key = RecordKey::tenant("acme", "mailbox", "m1");
    store
        .put(&key, b"before".to_vec(), Precondition::Absent)
        .await
        .unwrap();

    server.stop().await.unwrap();
    let started = Instant::now();
    match store.get(&key).await {
        Err(StoreError::Unavailable(msg)) => {
            assert!(
                msg.contains(&server.port().to_string()),
                "names the server: {msg}"
            );
        }
        other => panic!("expected Unavailable while redis is down, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "Unavailable took {:?}",
        started.elapsed()
    );
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));

    server.start_again().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.get(&key).await {
            Ok(rec) => {
                let rec = rec.expect("record kept by the AOF across the restart");
                assert_eq!(rec.data, b"before");
                break;
            }
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("store did not recover after the restart: {e}"),
        }
    }
    store
        .put(&key, b"after".to_vec(), Precondition::Version(1))
        .await
        .unwrap();
    store.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_keys_of_one_tenant_share_a_hash_slot() {
    // The layout the scripts rely on in Cluster: one hash tag per scope (the scope's generation,
    // which every record write changes in the same script, included).
    let server = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(&RedisConfig::standalone(server.url()))
        .await
        .unwrap();
    store
        .put(
            &RecordKey::tenant("acme", "mailbox", "m1"),
            b"x".to_vec(),
            Precondition::Absent,
        )
        .await
        .unwrap();
    store
        .append(&Scope::Tenant("acme".into()), "audit", b"e".to_vec(), 10)
        .await
        .unwrap();
    let keys = tokenfleet_testkit::redis::command(server.port(), &["KEYS", "tf:*"])
        .await
        .unwrap();
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "tf:{t:acme}:gen",
            "tf:{t:acme}:idx:mailbox",
            "tf:{t:acme}:rec:mailbox:m1",
            "tf:{t:acme}:stream:audit"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_schedule_is_one_sorted_set() {
    // One key per schedule (one Cluster slot), scored by due time, members as given.
    let server = RedisServer::start().await.unwrap();
    let store = RedisStore::connect(&RedisConfig::standalone(server.url()))
        .await
        .unwrap();
    store.schedule("refresh", "acme/m1", 1234).await.unwrap();
    store.schedule("refresh", "beta/m{2}", 99).await.unwrap();
    store.schedule("refresh", "acme/m1", 1500).await.unwrap();
    let port = server.port();
    let keys = tokenfleet_testkit::redis::command(port, &["KEYS", "tf:*"])
        .await
        .unwrap();
    assert_eq!(keys.trim(), "tf:{sched:refresh}");
    let kind = tokenfleet_testkit::redis::command(port, &["TYPE", "tf:{sched:refresh}"])
        .await
        .unwrap();
    assert_eq!(kind.trim(), "zset");
    let range = tokenfleet_testkit::redis::command(
        port,
        &["ZRANGE", "tf:{sched:refresh}", "0", "-1", "WITHSCORES"],
    )
    .await
    .unwrap();
    assert_eq!(
        range.lines().collect::<Vec<_>>(),
        ["beta/m{2}", "99", "acme/m1", "1500"]
    );
}

/// Checks a write-loss probe: nothing acknowledged is missing, every failed call failed as
/// "unavailable" (retry later) rather than otherwise, and the store recovered.
fn assert_nothing_lost(what: &str, report: &tokenfleet_testkit::redis::WriteLossReport) {
    println!("{what}: {report}");
    assert!(
        report.missing.is_empty(),
        "{what}: {} acknowledged writes lost in the failover: {:?}",
        report.missing.len(),
        &report.missing[..report.missing.len().min(20)]
    );
    assert!(
        report.other_errors.is_empty(),
        "{what}: failed calls must fail as unavailable: {:?}",
        report.other_errors
    );
    assert!(
        report.acked_after_failover > 0,
        "{what}: no write was acknowledged after the failover: {report}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_sentinel_forced_failover_loses_no_acknowledged_write() {
    use tokenfleet_testkit::redis::{Failover, sentinel_write_loss_probe};
    let report = sentinel_write_loss_probe(Failover::Forced, Duration::from_millis(500), |_| {})
        .await
        .unwrap();
    assert_nothing_lost("SENTINEL FAILOVER", &report);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_sentinel_master_kill_loses_no_acknowledged_write() {
    use tokenfleet_testkit::redis::{Failover, sentinel_write_loss_probe};
    let report = sentinel_write_loss_probe(Failover::Kill, Duration::from_millis(500), |_| {})
        .await
        .unwrap();
    assert_nothing_lost("master SIGKILL", &report);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_failover_loses_no_acknowledged_write() {
    use tokenfleet_testkit::redis::{Failover, cluster_write_loss_probe};
    let report = cluster_write_loss_probe(Failover::Forced, Duration::from_millis(500), |c| {
        c.min_replicas_acked = Some(1);
    })
    .await
    .unwrap();
    assert_nothing_lost("CLUSTER FAILOVER", &report);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_master_kill_loses_no_acknowledged_write() {
    use tokenfleet_testkit::redis::{Failover, cluster_write_loss_probe};
    let report = cluster_write_loss_probe(Failover::Kill, Duration::from_millis(500), |c| {
        c.min_replicas_acked = Some(1);
    })
    .await
    .unwrap();
    assert_nothing_lost("cluster master SIGKILL", &report);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_sentinel_store_follows_switch_master_at_once() {
    // Without the replication wait and with the periodic ROLE check out of the way, only
    // Sentinel's `+switch-master` announcement can move the store off the old master, which keeps
    // accepting writes for about 10 s after a forced failover.
    let master = RedisServer::start().await.unwrap();
    let _replica = RedisServer::start_replica_of(&master).await.unwrap();
    let sentinel = RedisSentinel::start_watching(&master, "tfswitch", 1000, 1)
        .await
        .unwrap();
    let mut config = RedisConfig::sentinel(vec![sentinel.url()], sentinel.master_name());
    config.min_replicas_acked = Some(0);
    config.role_check_interval_ms = 600_000;
    let store = RedisStore::connect(&config).await.unwrap();
    let key = RecordKey::tenant("acme", "mailbox", "before");
    store
        .put(&key, b"x".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    // Let the subscriptions settle before the failover.
    tokio::time::sleep(Duration::from_millis(500)).await;

    sentinel.failover().await.unwrap();
    let switched = Instant::now();
    let new_port = loop {
        let port = sentinel.master_port().await.unwrap();
        if port != master.port() {
            break port;
        }
        assert!(switched.elapsed() < Duration::from_secs(15), "no failover");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("after{n}");
        let key = RecordKey::tenant("acme", "mailbox", &id);
        if store
            .put(&key, b"x".to_vec(), Precondition::Absent)
            .await
            .is_ok()
        {
            let on_new = tokenfleet_testkit::redis::command(
                new_port,
                &["HEXISTS", &format!("tf:{{t:acme}}:rec:mailbox:{id}"), "v"],
            )
            .await
            .unwrap();
            if on_new == "1" {
                break;
            }
        }
        assert!(
            switched.elapsed() < Duration::from_secs(5),
            "writes still went to the old master {:?} after the failover; the old master still \
             says {}",
            switched.elapsed(),
            master.role().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        master.role().await,
        "master",
        "the old master was not demoted yet"
    );
}
