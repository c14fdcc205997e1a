//! The broker and store scenarios of the chaos suite (see [`super::SCENARIOS`]): Redis killed
//! and restarted, Sentinel failover, the store's own failover probes, a Cluster slot migration
//! and failover, broker replicas killed, the identity provider down.
//!
//! The broker scenarios drive [`Load`] through two replicas: a writer per replica creating one
//! mailbox after another (`CreateMailbox`, a store write the broker acknowledges), and a
//! refresher per replica calling `RefreshNow` round-robin on delegated grants (each a rotation
//! of the refresh token at the fake identity provider). Afterwards every acknowledged mailbox
//! must exist, every grant must be ACTIVE, and no refresh token may have been presented to the
//! provider again after it had answered it (a lost rotation).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tokenfleet_proto::v1 as pb;
use tokio::task::JoinHandle;

use super::brokers::{BrokerReplicas, ChaosStore, ReplicaSettings, http_get};
use super::fixture::{self, Outcomes, TENANT};
use super::{Options, Report, secs};
use crate::broker::TestAdminClient;
use crate::fake_idp::FakeIdp;
use crate::redis::{
    Failover, RedisCluster, RedisSentinel, RedisServer, cluster_write_loss_probe, command,
    demoted_and_resynced, sentinel_write_loss_probe,
};

/// How long a load call may take before the client gives up (counted as `CLIENT_TIMEOUT`).
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// `prefix-00`, `prefix-01`, …
fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

/// Write and refresh load through the replicas; see the module documentation.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<(Vec<String>, Outcomes)>>,
    refreshers: Vec<JoinHandle<(Outcomes, Duration)>>,
}

/// What a [`Load`] did.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Mailboxes whose creation was acknowledged.
    pub acked: Vec<String>,
    /// CreateMailbox outcomes.
    pub writes: Outcomes,
    /// RefreshNow outcomes.
    pub refreshes: Outcomes,
    /// The slowest RefreshNow answer.
    pub refresh_max: Duration,
}

impl Load {
    /// Starts a writer and a refresher on each client.
    pub fn start(clients: Vec<TestAdminClient>, grants: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        let mut refreshers = Vec::new();
        for (r, client) in clients.into_iter().enumerate() {
            let mut admin = client.clone();
            let flag = Arc::clone(&stop);
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut outcomes = Outcomes::default();
                let mut n = 0;
                while !flag.load(Ordering::Relaxed) {
                    n += 1;
                    let name = format!("w{r}-{n:06}");
                    let request = fixture::mailbox(&name, pb::GrantType::AppOnly);
                    match tokio::time::timeout(CALL_DEADLINE, admin.create_mailbox(request)).await {
                        Ok(result) => {
                            outcomes.add(&result);
                            match result {
                                Ok(_) => acked.push(name),
                                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        }
                        Err(_) => {
                            *outcomes.0.entry("CLIENT_TIMEOUT".into()).or_default() += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (acked, outcomes)
            }));
            let mut admin = client;
            let flag = Arc::clone(&stop);
            let grants = grants.clone();
            refreshers.push(tokio::spawn(async move {
                let mut outcomes = Outcomes::default();
                let mut slowest = Duration::ZERO;
                let mut i = r;
                while !flag.load(Ordering::Relaxed) && !grants.is_empty() {
                    let mailbox = grants[i % grants.len()].clone();
                    i += 1;
                    let started = Instant::now();
                    let call = admin.refresh_now(pb::RefreshNowRequest {
                        tenant: TENANT.into(),
                        mailbox,
                    });
                    match tokio::time::timeout(CALL_DEADLINE, call).await {
                        Ok(result) => outcomes.add(&result),
                        Err(_) => {
                            *outcomes.0.entry("CLIENT_TIMEOUT".into()).or_default() += 1;
                        }
                    }
                    slowest = slowest.max(started.elapsed());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (outcomes, slowest)
            }));
        }
        Self {
            stop,
            writers,
            refreshers,
        }
    }

    /// Stops the load and collects what it did.
    pub async fn finish(self) -> Result<LoadResult> {
        self.stop.store(true, Ordering::Relaxed);
        let mut result = LoadResult::default();
        for writer in self.writers {
            let (acked, outcomes) = writer.await.context("writer task")?;
            result.acked.extend(acked);
            result.writes.merge(&outcomes);
        }
        for refresher in self.refreshers {
            let (outcomes, slowest) = refresher.await.context("refresher task")?;
            result.refreshes.merge(&outcomes);
            result.refresh_max = result.refresh_max.max(slowest);
        }
        Ok(result)
    }
}

/// Every mailbox of the tenant, listed through `admin` (retried while the store recovers).
async fn listed_mailboxes(admin: &mut TestAdminClient) -> Result<HashSet<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    'attempt: loop {
        let mut names = HashSet::new();
        let mut token = String::new();
        loop {
            let page = admin
                .list_mailboxes(pb::ListMailboxesRequest {
                    tenant: TENANT.into(),
                    page_size: 1000,
                    page_token: token.clone(),
                })
                .await;
            match page {
                Ok(page) => {
                    let page = page.into_inner();
                    names.extend(page.mailboxs.into_iter().map(|m| m.name));
                    if page.next_page_token.is_empty() {
                        return Ok(names);
                    }
                    token = page.next_page_token;
                }
                Err(status) if Instant::now() < deadline => {
                    tracing::debug!(?status, "listing mailboxes: retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'attempt;
                }
                Err(status) => return Err(anyhow!("listing mailboxes: {status}")),
            }
        }
    }
}

/// Checks a finished load: acknowledged mailboxes that are gone are lost; every grant must be
/// ACTIVE; refresh tokens presented twice are lost rotations. Adds the figures.
async fn settle_load(
    report: &mut Report,
    load: LoadResult,
    admin: &mut TestAdminClient,
    fake: &FakeIdp,
    grants: &[String],
) -> Result<()> {
    let present = listed_mailboxes(admin).await?;
    let missing: Vec<String> = load
        .acked
        .iter()
        .filter(|name| !present.contains(*name))
        .map(|name| format!("acknowledged CreateMailbox {name} is gone"))
        .collect();
    report.figure("writes_acked", load.acked.len());
    report.figure("writes_missing", missing.len());
    report.figure("writes_failed", load.writes.failed());
    report.figure("write_outcomes", &load.writes);
    report.lose(missing);
    report.figure("refreshes", &load.refreshes);
    report.figure("refresh_slowest", secs(load.refresh_max));
    if load.writes.failed_otherwise() > 0 {
        report.fail(format!(
            "{} writes failed with a code other than UNAVAILABLE ({})",
            load.writes.failed_otherwise(),
            load.writes
        ));
    }
    if load.refreshes.0.contains_key("CLIENT_TIMEOUT") {
        report.fail(format!(
            "RefreshNow hung past the client's {}s deadline",
            CALL_DEADLINE.as_secs()
        ));
    }
    let twice = fixture::refresh_tokens_presented_twice(fake);
    report.figure("refresh_tokens_presented_twice", twice);
    report.lose((0..twice).map(|_| "a rotated refresh token was lost".to_owned()));
    match fixture::wait_all_active(admin, grants, Duration::from_secs(30)).await {
        Ok(_) => report.figure(
            "grants_active",
            format!("{}/{}", grants.len(), grants.len()),
        ),
        Err(e) => report.fail(format!("grants after the fault: {e}")),
    }
    Ok(())
}

/// Sets up tenant, provider and `n` delegated grants (consented at the fake) through `admin`.
async fn grants(admin: &mut TestAdminClient, fake: &FakeIdp, n: usize) -> Result<Vec<String>> {
    fixture::tenant_and_provider(admin, fake).await?;
    let grants = names("g", n);
    let codes = fixture::start_consents(admin, &grants).await?;
    fixture::approve(fake, &codes)?;
    fixture::wait_all_active(admin, &grants, Duration::from_secs(60)).await?;
    Ok(grants)
}

/// Time until a write through each replica is acknowledged again (the longest), and until each
/// `/readyz` answers 200.
async fn recovery(brokers: &BrokerReplicas, since: Instant) -> Result<(Duration, Duration)> {
    let mut write = Duration::ZERO;
    let mut ready = Duration::ZERO;
    for (i, replica) in brokers.replicas.iter().enumerate() {
        let mut admin = brokers.admin(i);
        let mut n = 0;
        loop {
            n += 1;
            let request = fixture::mailbox(&format!("probe{i}-{n:05}"), pb::GrantType::AppOnly);
            if admin.create_mailbox(request).await.is_ok() {
                break;
            }
            if since.elapsed() > Duration::from_secs(120) {
                return Err(anyhow!("replica {i} took no write within 120 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        write = write.max(since.elapsed());
        while !http_get(replica.http, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 200)
        {
            if since.elapsed() > Duration::from_secs(120) {
                return Err(anyhow!("replica {i} not ready within 120 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ready = ready.max(since.elapsed());
    }
    Ok((write, ready))
}

/// `redis-restart`.
pub async fn redis_restart(o: &Options, report: &mut Report) -> Result<()> {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes"]).await?;
    let fake = fixture::fake_idp().await?;
    let mut brokers = BrokerReplicas::start(
        2,
        ChaosStore::Standalone(redis.url()),
        ReplicaSettings::default(),
    )
    .await?;
    let mut admin = brokers.admin(0);
    let grants = grants(&mut admin, &fake, o.count(4, 20)).await?;
    let pids: Vec<Option<u32>> = brokers.replicas.iter().map(|r| r.pid()).collect();

    let load = Load::start(vec![brokers.admin(0), brokers.admin(1)], grants.clone());
    tokio::time::sleep(o.secs(2, 10)).await;
    redis.kill();
    let down = o.secs(1, 5);
    tokio::time::sleep(down).await;
    redis.start_again().await?;
    let back = Instant::now();
    let (write, ready) = recovery(&brokers, back).await?;
    tokio::time::sleep(o.secs(3, 15)).await;
    let load = load.finish().await?;

    report.figure("redis_down", secs(down));
    report.figure("first_write_after_restart", secs(write));
    report.figure("ready_after_restart", secs(ready));
    settle_load(report, load, &mut admin, &fake, &grants).await?;
    let mut restarted = 0;
    for (replica, pid) in brokers.replicas.iter_mut().zip(&pids) {
        if !replica.is_running() || replica.pid() != *pid {
            restarted += 1;
        }
    }
    report.figure("broker_restarts", restarted);
    if restarted > 0 {
        report.fail(format!("{restarted} broker replicas stopped"));
    }
    Ok(())
}

/// Waits until `sentinel` names a master other than `old`; returns how long that took.
async fn new_master(sentinel: &RedisSentinel, old: u16) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if sentinel.master_port().await.is_ok_and(|p| p != old) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(40) {
            return Err(anyhow!("sentinel named no new master within 40 s"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `sentinel-failover`.
pub async fn sentinel_failover(o: &Options, report: &mut Report) -> Result<()> {
    const NAME: &str = "tfchaos";
    let master = RedisServer::start().await?;
    let replica = RedisServer::start_replica_of(&master).await?;
    let sentinel = RedisSentinel::start_watching(&master, NAME, 1000, 1).await?;
    let mut servers = [master, replica];
    let fake = fixture::fake_idp().await?;
    let brokers = BrokerReplicas::start(
        2,
        ChaosStore::Sentinel {
            sentinels: vec![sentinel.url()],
            master: NAME.into(),
        },
        ReplicaSettings::default(),
    )
    .await?;
    let mut admin = brokers.admin(0);
    let grants = grants(&mut admin, &fake, o.count(4, 20)).await?;
    let load = Load::start(vec![brokers.admin(0), brokers.admin(1)], grants.clone());
    tokio::time::sleep(o.secs(2, 10)).await;

    // Forced failover: the old master keeps running (and, for clients still connected, taking
    // writes) until Sentinel demotes it.
    let first = sentinel.master_port().await?;
    sentinel.failover().await?;
    let promoted = new_master(&sentinel, first).await?;
    demoted_and_resynced(first).await?;
    tokio::time::sleep(o.secs(2, 10)).await;

    // The new master killed.
    let second = sentinel.master_port().await?;
    servers
        .iter_mut()
        .find(|s| s.port() == second)
        .ok_or_else(|| anyhow!("no server on port {second}"))?
        .kill();
    let promoted_after_kill = new_master(&sentinel, second).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    servers
        .iter_mut()
        .find(|s| s.port() == second)
        .ok_or_else(|| anyhow!("no server on port {second}"))?
        .start_again()
        .await?;
    demoted_and_resynced(second).await?;
    tokio::time::sleep(o.secs(2, 10)).await;
    let load = load.finish().await?;

    report.figure("forced_failover_promoted_in", secs(promoted));
    report.figure("kill_promoted_in", secs(promoted_after_kill));
    settle_load(report, load, &mut admin, &fake, &grants).await
}

/// `store-failover`: the store's own probes (what `chaos-store` ran).
pub async fn store_failover(o: &Options, report: &mut Report) -> Result<()> {
    let settle = o.secs(1, 5);
    let rounds = o.count(1, 2);
    for round in 1..=rounds {
        for (mode, how) in [
            ("sentinel", Failover::Forced),
            ("sentinel", Failover::Kill),
            ("cluster", Failover::Forced),
            ("cluster", Failover::Kill),
        ] {
            let replicas = o.store_min_replicas_acked.unwrap_or(1);
            let tune = |c: &mut tokenfleet_store::redis_store::RedisConfig| {
                c.min_replicas_acked = Some(replicas);
            };
            let result = if mode == "sentinel" {
                sentinel_write_loss_probe(how, settle, tune).await
            } else {
                cluster_write_loss_probe(how, settle, tune).await
            };
            let result = result.with_context(|| format!("{mode} {how:?} probe"))?;
            let label = format!("r{round}_{mode}_{how:?}_acked{replicas}").to_lowercase();
            report.figure(
                &label,
                format!(
                    "acked {} (after failover {}), unavailable {}, other {}, missing {}, \
                     longest outage {}",
                    result.acked,
                    result.acked_after_failover,
                    result.unavailable,
                    result.other_errors.len(),
                    result.missing.len(),
                    secs(result.longest_outage)
                ),
            );
            report.lose(
                result
                    .missing
                    .iter()
                    .map(|id| format!("{mode} {how:?}: acknowledged write {id} is gone")),
            );
            if !result.other_errors.is_empty() {
                report.fail(format!(
                    "{mode} {how:?}: {} writes failed other than unavailable: {:?}",
                    result.other_errors.len(),
                    result.other_errors.first()
                ));
            }
        }
    }
    Ok(())
}

/// `cluster-migration`.
pub async fn cluster_migration(o: &Options, report: &mut Report) -> Result<()> {
    let cluster = RedisCluster::start_with_replicas(1000).await?;
    let fake = fixture::fake_idp().await?;
    let brokers = BrokerReplicas::start(
        2,
        ChaosStore::Cluster {
            seeds: cluster.seed_urls(),
            min_replicas_acked: 1,
        },
        ReplicaSettings::default(),
    )
    .await?;
    let mut admin = brokers.admin(0);
    let grants = grants(&mut admin, &fake, o.count(4, 20)).await?;
    let load = Load::start(vec![brokers.admin(0), brokers.admin(1)], grants.clone());
    tokio::time::sleep(o.secs(2, 10)).await;

    // The tenant's slot (every key of the tenant carries its hash tag) to another master.
    let tenant_key = format!("tf:{{t:{TENANT}}}:idx:mailbox");
    let (from, _) = cluster.master_of(&tenant_key).await?;
    let to = cluster
        .masters()
        .await?
        .into_iter()
        .map(|(port, _)| port)
        .find(|port| *port != from)
        .ok_or_else(|| anyhow!("no second master"))?;
    let started = Instant::now();
    let moved = cluster
        .migrate_slot(
            &tenant_key,
            to,
            10,
            Duration::from_millis(if o.short { 100 } else { 300 }),
        )
        .await?;
    report.figure("slot_keys_migrated", moved);
    report.figure("migration_took", secs(started.elapsed()));
    tokio::time::sleep(o.secs(2, 10)).await;

    // Then its new master fails over to its replica.
    let (master, master_id) = cluster.master_of(&tenant_key).await?;
    let replica = cluster.replica_of(&master_id).await?;
    command(replica, &["CLUSTER", "FAILOVER"]).await?;
    let started = Instant::now();
    loop {
        if cluster
            .master_of(&tenant_key)
            .await
            .is_ok_and(|(p, _)| p != master)
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(anyhow!("CLUSTER FAILOVER did not complete within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    report.figure("failover_took", secs(started.elapsed()));
    demoted_and_resynced(master).await?;
    tokio::time::sleep(o.secs(2, 10)).await;
    let load = load.finish().await?;
    settle_load(report, load, &mut admin, &fake, &grants).await
}

/// `replica-kill`.
pub async fn replica_kill(o: &Options, report: &mut Report) -> Result<()> {
    let redis = RedisServer::start().await?;
    let fake = fixture::fake_idp().await?;
    let mut brokers = BrokerReplicas::start(
        2,
        ChaosStore::Standalone(redis.url()),
        ReplicaSettings::default(),
    )
    .await?;
    let mut survivor = brokers.admin(1);
    fixture::tenant_and_provider(&mut survivor, &fake).await?;

    // 1. Killed while polling device codes: both replicas poll (a lease per code); the survivor
    // must finish every consent the person approves.
    let pending = names("dc", o.count(6, 30));
    let codes = fixture::start_consents(&mut survivor, &pending).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    brokers.replicas[0].kill();
    let killed = Instant::now();
    fixture::approve(&fake, &codes)?;
    match fixture::wait_all_active(&mut survivor, &pending, Duration::from_secs(90)).await {
        Ok(_) => {
            report.figure(
                "consents_finished_by_survivor",
                format!("{}/{}", pending.len(), pending.len()),
            );
            report.figure("consents_done_after_kill", secs(killed.elapsed()));
        }
        Err(e) => {
            let seen = fixture::statuses(&mut survivor, &pending).await;
            let unfinished = seen
                .iter()
                .filter(|(_, s)| **s != Some(pb::TokenStatus::Active))
                .map(|(name, s)| format!("approved consent {name} not finished ({s:?})"));
            report.lose(unfinished);
            report.fail(format!("device-code polling after the kill: {e}"));
        }
    }

    // 2. Killed while it holds a refresh lease, the provider's answer in flight.
    brokers.replicas[0].restart().await?;
    let mailbox = pending[0].clone();
    fake.set_latency(Duration::from_secs(8));
    let mut victim = brokers.admin(0);
    let request = pb::RefreshNowRequest {
        tenant: TENANT.into(),
        mailbox: mailbox.clone(),
    };
    let in_flight = tokio::spawn(async move { victim.refresh_now(request).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    brokers.replicas[0].kill();
    let killed = Instant::now();
    let _ = in_flight.await;
    fake.set_latency(Duration::ZERO);
    let mut calls = Outcomes::default();
    let mut slowest = Duration::ZERO;
    let refreshed = loop {
        let started = Instant::now();
        let call = survivor.refresh_now(pb::RefreshNowRequest {
            tenant: TENANT.into(),
            mailbox: mailbox.clone(),
        });
        let answer = tokio::time::timeout(CALL_DEADLINE, call).await;
        slowest = slowest.max(started.elapsed());
        match answer {
            Ok(result) => {
                calls.add(&result);
                if result.is_ok() {
                    break Some(killed.elapsed());
                }
            }
            Err(_) => *calls.0.entry("CLIENT_TIMEOUT".into()).or_default() += 1,
        }
        if killed.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    report.figure("refresh_now_calls_after_kill", &calls);
    report.figure("refresh_now_slowest", secs(slowest));
    match refreshed {
        Some(after) => {
            report.figure("refreshable_via_survivor_after", secs(after));
            if after > Duration::from_secs(15) {
                report.fail(format!(
                    "the mailbox was refreshable again only {} after the kill",
                    secs(after)
                ));
            }
        }
        None => report.fail("the mailbox was not refreshable through the survivor within 60 s"),
    }
    if calls.0.contains_key("CLIENT_TIMEOUT") {
        report.fail(format!(
            "RefreshNow hung past the client's {}s deadline",
            CALL_DEADLINE.as_secs()
        ));
    }
    let twice = fixture::refresh_tokens_presented_twice(&fake);
    report.figure("refresh_tokens_presented_twice", twice);
    // The rotation the dead replica received and never stored is the one loss a kill can
    // cause here; the provider keeps older refresh tokens valid (Microsoft does), so the grant
    // lives on: counted as a figure, and the grant must be ACTIVE.
    match fixture::wait_all_active(&mut survivor, &pending, Duration::from_secs(30)).await {
        Ok(_) => report.figure(
            "grants_active",
            format!("{}/{}", pending.len(), pending.len()),
        ),
        Err(e) => report.fail(format!("grants after the kill: {e}")),
    }
    Ok(())
}

/// `idp-outage`.
pub async fn idp_outage(o: &Options, report: &mut Report) -> Result<()> {
    let redis = RedisServer::start().await?;
    let fake = fixture::fake_idp().await?;
    // Short access tokens, so every grant comes due during the outage (refreshes at ~75 % of
    // the lifetime); everything else at the broker's defaults.
    let lifetime = o.secs(20, 90);
    fake.set_access_token_lifetime(lifetime);
    let brokers = BrokerReplicas::start(
        2,
        ChaosStore::Standalone(redis.url()),
        ReplicaSettings::default(),
    )
    .await?;
    let mut admin = brokers.admin(0);
    let n = o.count(6, 50);
    let grants = grants(&mut admin, &fake, n).await?;
    report.figure("grants", n);
    report.figure("access_token_lifetime", secs(lifetime));

    // Refresh calls the provider processed, plus token requests it held unanswered while it
    // hung (the fake records a request when it processes it; a hung one that its client gave up
    // on is processed late, when the hang ends, and then counted again below).
    let refreshes =
        |fake: &FakeIdp| fake.token_requests(fixture::REFRESH_GRANT) + fake.held_total();
    let before = refreshes(&fake);
    let outage_started = Instant::now();
    // Longer than the access tokens live: at the recovery every grant needs a refresh.
    let answering_503 = o.secs(15, 300);
    let hanging = o.secs(15, 300);
    fake.set_outage(true);
    tokio::time::sleep(answering_503).await;
    fake.set_outage(false);
    fake.set_hang(true);
    tokio::time::sleep(hanging).await;
    let during = refreshes(&fake) - before;
    let seen = fixture::statuses(&mut admin, &grants).await;
    fake.set_hang(false);
    let recovered = Instant::now();
    report.figure("outage_503", secs(answering_503));
    report.figure("outage_hang", secs(hanging));
    report.figure(
        "statuses_at_recovery",
        fixture::count_statuses(&seen).replace(' ', "_"),
    );
    report.figure("provider_refresh_calls_during_outage", during);
    report.figure(
        "provider_calls_per_grant_during_outage",
        format!("{:.2}", during as f64 / n as f64),
    );

    report.figure(
        "usable_at_recovery",
        fixture::usable(&mut admin, &grants).await,
    );

    // Every grant usable again (ACTIVE with a live access token): measured until 40 minutes
    // (the default backoff's ceiling is 30), asserted against the bound when one is set.
    let limit = Duration::from_secs(40 * 60);
    let mut reauth = HashSet::new();
    let all_active = loop {
        let seen = fixture::statuses(&mut admin, &grants).await;
        for (name, status) in &seen {
            if *status == Some(pb::TokenStatus::ReauthRequired) {
                reauth.insert(name.clone());
            }
        }
        if seen.values().all(|s| *s == Some(pb::TokenStatus::Active))
            && fixture::usable(&mut admin, &grants).await == grants.len()
        {
            break Some(recovered.elapsed());
        }
        if recovered.elapsed() > limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    report.figure("outage_total", secs(recovered - outage_started));
    report.figure(
        "provider_calls_after_recovery",
        refreshes(&fake) - before - during,
    );
    if !reauth.is_empty() {
        report.lose(
            reauth
                .iter()
                .map(|name| format!("grant {name} became REAUTH_REQUIRED")),
        );
    }
    match all_active {
        Some(took) => {
            report.figure("all_usable_after_recovery", secs(took));
            if let Some(bound) = o.idp_recovery_bound
                && took > bound
            {
                report.fail(format!(
                    "every grant usable only {} after the provider's recovery (bound {})",
                    secs(took),
                    secs(bound)
                ));
            }
        }
        None => report.fail(format!(
            "not every grant usable within {} of the recovery",
            secs(limit)
        )),
    }
    Ok(())
}
