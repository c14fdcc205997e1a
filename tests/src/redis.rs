//! Real Redis servers for tests: a standalone [`RedisServer`] (optionally a replica of another,
//! [`RedisServer::start_replica_of`]), a three-master [`RedisCluster`] and a [`RedisSentinel`]
//! watching a master (and discovering its replicas, so it can fail over), each on free 127.0.0.1
//! ports in its own temporary directory, killed when dropped (also when the test panics).
//!
//! [`sentinel_write_loss_probe`] and [`cluster_write_loss_probe`] fail a master over under write
//! load through the store and count acknowledged writes that are gone afterwards (issue 11).
//!
//! They run the `redis-server` and `redis-cli` found on `PATH`; `scripts/test-setup.sh` installs
//! them.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::ports::free_port;

const SERVER_BIN: &str = "redis-server";
const CLI_BIN: &str = "redis-cli";
const START_DEADLINE: Duration = Duration::from_secs(15);
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);
/// Attempts at finding a port that is still free when redis binds it.
const PORT_ATTEMPTS: usize = 8;

fn missing_binary(bin: &str) -> anyhow::Error {
    anyhow!(
        "`{bin}` was not found on PATH: the Redis tests need Redis 7 (`redis-server` and \
         `redis-cli`); run scripts/test-setup.sh to install the test dependencies"
    )
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free port whose cluster bus port (port + 10000) is free too (and, like the port, below the
/// ephemeral range: see [`crate::ports`]).
fn free_cluster_port() -> Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        let bus = port.checked_add(10_000);
        if let Some(bus) = bus
            && bus < crate::ports::ephemeral_start()
            && port_is_free(bus)
        {
            return Ok(port);
        }
    }
    bail!("no free loopback port p with p+10000 free and below the ephemeral range after 100 tries")
}

/// Sends one command to 127.0.0.1:`port` over RESP and returns the reply as text: simple and
/// bulk strings as they are, integers in decimal, arrays one item per line. Error replies become
/// `Err`. Gives up after 5 s.
pub async fn command(port: u16, args: &[&str]) -> Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(req.as_bytes()).await?;
        let mut reader = BufReader::new(stream);
        read_reply(&mut reader).await
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow!("no reply from 127.0.0.1:{port} within 5 s"))?
}

fn read_reply(
    reader: &mut BufReader<TcpStream>,
) -> Pin<Box<dyn Future<Output = Result<String>> + Send + '_>> {
    Box::pin(async move {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            bail!("connection closed before a reply");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line
            .split_at_checked(1)
            .ok_or_else(|| anyhow!("empty reply"))?;
        match kind {
            "+" | ":" => Ok(rest.to_owned()),
            "-" => bail!("redis error: {rest}"),
            "$" => {
                let len: i64 = rest.parse().context("bulk length")?;
                if len < 0 {
                    return Ok(String::new());
                }
                let mut buf = vec![0u8; usize::try_from(len)? + 2];
                reader.read_exact(&mut buf).await?;
                buf.truncate(buf.len() - 2);
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
            "*" => {
                let n: i64 = rest.parse().context("array length")?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(read_reply(reader).await?);
                }
                Ok(items.join("\n"))
            }
            other => bail!("unexpected reply type `{other}`"),
        }
    })
}

/// Polls `check` every 25 ms until it says `true`, failing after `deadline` with the last error.
async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let end = Instant::now() + deadline;
    let mut last = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() >= end {
            return Err(match last {
                Some(e) => e.context(format!("{what}: not reached within {deadline:?}")),
                None => anyhow!("{what}: not reached within {deadline:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Fails if the child has exited (with the tail of its log).
fn check_alive(child: &mut Option<Child>, log: &Path, what: &str) -> Result<()> {
    if let Some(c) = child.as_mut()
        && let Some(status) = c.try_wait()?
    {
        bail!("{what} exited with {status}; log:\n{}", tail(log));
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// One `redis-server` process on 127.0.0.1, with its own directory.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a throwaway server: no RDB snapshots, no AOF.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `redis-server` arguments appended (later ones win), e.g.
    /// `["--appendonly", "yes", "--appendfsync", "always"]` for persistence tests.
    pub async fn start_with(args: &[&str]) -> Result<Self> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Self::launch("tf-redis-", free_port, |_| args.clone()).await
    }

    /// Starts a replica of `master` and waits until its replication link is up (the initial sync
    /// is done).
    pub async fn start_replica_of(master: &RedisServer) -> Result<Self> {
        let port = master.port().to_string();
        let replica = Self::start_with(&["--replicaof", "127.0.0.1", &port]).await?;
        let own = replica.port();
        wait_until(START_DEADLINE, "replica link up", || async move {
            Ok(command(own, &["INFO", "replication"])
                .await?
                .contains("master_link_status:up"))
        })
        .await
        .with_context(|| format!("replica 127.0.0.1:{own} of 127.0.0.1:{port}"))?;
        Ok(replica)
    }

    /// The first line of `ROLE`: `master`, `slave` or `sentinel` (empty while it does not answer).
    pub async fn role(&self) -> String {
        command(self.port, &["ROLE"])
            .await
            .map(|r| r.lines().next().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }

    /// Starts redis-server in a fresh directory on a port from `pick`, retrying with another port
    /// when it lost the race for the port.
    async fn launch(
        prefix: &str,
        pick: fn() -> Result<u16>,
        make_args: impl Fn(&Path) -> Vec<String>,
    ) -> Result<Self> {
        crate::logs::capture();
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .context("creating redis temp dir")?;
            let args = make_args(dir.path());
            let mut server = Self {
                port: pick()?,
                dir,
                args,
                child: None,
            };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(e) if server.lost_port_race() => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "redis-server could not bind a free port in {PORT_ATTEMPTS} tries"
            )))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn lost_port_race(&self) -> bool {
        std::fs::read_to_string(self.log_path())
            .map(|log| log.contains("Address already in use"))
            .unwrap_or(false)
    }

    /// Launches redis-server on `self.port` and waits until it answers PING.
    async fn spawn(&mut self) -> Result<()> {
        // A fresh log per launch, so a bind failure is judged on this launch only.
        let _ = std::fs::remove_file(self.log_path());
        let mut cmd = Command::new(SERVER_BIN);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--protected-mode", "yes"])
            .args(["--daemonize", "no"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.args);
        self.child = Some(spawn_quiet(&mut cmd, "redis-server")?);
        let port = self.port;
        let log = self.log_path();
        let end = Instant::now() + START_DEADLINE;
        loop {
            if let Err(e) = check_alive(&mut self.child, &log, "redis-server") {
                self.kill();
                return Err(e.context(format!("redis-server on 127.0.0.1:{port}")));
            }
            if command(port, &["PING"]).await.is_ok_and(|r| r == "PONG") {
                return Ok(());
            }
            if Instant::now() >= end {
                self.kill();
                bail!(
                    "redis-server on 127.0.0.1:{port} did not answer PING within \
                     {START_DEADLINE:?}; log:\n{}",
                    tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its working directory (AOF/RDB files, `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the process at once (like a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Shuts the server down cleanly (`SHUTDOWN`, so an AOF is flushed) and waits for the process
    /// to exit; kills it and fails if it has not exited within the deadline.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SHUTDOWN closes the connection instead of answering.
        let _ = command(self.port, &["SHUTDOWN"]).await;
        let end = Instant::now() + START_DEADLINE;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "redis-server on port {} ignored SHUTDOWN; killed",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the server again on the same port and directory (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)).
    pub async fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("redis-server on port {} is still running", self.port);
        }
        self.spawn().await
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_quiet(cmd: &mut Command, what: &str) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                missing_binary(SERVER_BIN)
            } else {
                anyhow!(e).context(format!("starting {what}"))
            }
        })
}

/// A Redis Cluster of three masters on 127.0.0.1, without replicas ([`start`](Self::start)) or
/// with one each ([`start_with_replicas`](Self::start_with_replicas)).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create` and
    /// waits until every node reports `cluster_state:ok`.
    pub async fn start() -> Result<Self> {
        Self::launch(0, 5000).await
    }

    /// Three masters with one replica each (six servers), a node declared failed after
    /// `node_timeout_ms` without an answer; waits until every replica's link is up.
    pub async fn start_with_replicas(node_timeout_ms: u64) -> Result<Self> {
        Self::launch(1, node_timeout_ms).await
    }

    async fn launch(replicas: usize, node_timeout_ms: u64) -> Result<Self> {
        let count = 3 * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let node = RedisServer::launch("tf-redis-cluster-", free_cluster_port, |dir| {
                vec![
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-config-file".to_owned(),
                    dir.join("nodes.conf").display().to_string(),
                    "--cluster-node-timeout".to_owned(),
                    node_timeout_ms.to_string(),
                ]
            })
            .await?;
            nodes.push(node);
        }
        let cluster = Self { nodes };
        cluster.create(replicas).await?;
        Ok(cluster)
    }

    async fn create(&self, replicas: usize) -> Result<()> {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = tokio::process::Command::new(CLI_BIN)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(CLUSTER_DEADLINE, output)
            .await
            .map_err(|_| anyhow!("redis-cli --cluster create took over {CLUSTER_DEADLINE:?}"))?
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    missing_binary(CLI_BIN)
                } else {
                    anyhow!(e).context("running redis-cli --cluster create")
                }
            })?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create {} failed ({}):\n{}{}",
                addrs.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        for node in &self.nodes {
            let port = node.port();
            let known = known.as_str();
            wait_until(CLUSTER_DEADLINE, "cluster_state:ok", || async move {
                let info = command(port, &["CLUSTER", "INFO"]).await?;
                let replication = command(port, &["INFO", "replication"]).await?;
                Ok(info.contains("cluster_state:ok")
                    && info.contains(known)
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up")))
            })
            .await
            .with_context(|| format!("cluster node 127.0.0.1:{port}"))?;
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes (masters first as created; roles change with failovers).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node on `port`, to kill or restart it.
    pub fn node_mut(&mut self, port: u16) -> Option<&mut RedisServer> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }

    /// `CLUSTER NODES` as some node that answers sees it.
    async fn topology(&self) -> Result<Vec<ClusterNode>> {
        let mut last = anyhow!("no cluster node");
        for node in &self.nodes {
            match command(node.port(), &["CLUSTER", "NODES"]).await {
                Ok(text) => return Ok(text.lines().filter_map(ClusterNode::parse).collect()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Port and node id of the master that serves `key`'s slot now (as a live node sees it).
    pub async fn master_of(&self, key: &str) -> Result<(u16, String)> {
        let mut last = anyhow!("no cluster node");
        let mut slot = None;
        for node in &self.nodes {
            match command(node.port(), &["CLUSTER", "KEYSLOT", key]).await {
                Ok(s) => {
                    slot = Some(s.parse::<u16>().context("CLUSTER KEYSLOT")?);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let slot = slot.ok_or(last)?;
        self.topology()
            .await?
            .into_iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|r| r.contains(&slot)))
            .map(|n| (n.port, n.id))
            .ok_or_else(|| anyhow!("no live master serves slot {slot}"))
    }

    /// Port and node id of every live master that serves slots.
    pub async fn masters(&self) -> Result<Vec<(u16, String)>> {
        Ok(self
            .topology()
            .await?
            .into_iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .map(|n| (n.port, n.id))
            .collect())
    }

    /// Migrates the slot of `key` to the master on `to_port`, as `redis-cli --cluster reshard`
    /// does: `CLUSTER SETSLOT … IMPORTING` on the target, `MIGRATING` on the source, `MIGRATE` of
    /// the slot's keys `batch` at a time with `pause` between batches (clients meanwhile get
    /// `ASK` and `TRYAGAIN`), then `SETSLOT … NODE` on the target, the source and every other
    /// master. Returns how many keys moved.
    pub async fn migrate_slot(
        &self,
        key: &str,
        to_port: u16,
        batch: usize,
        pause: Duration,
    ) -> Result<usize> {
        let (from_port, from_id) = self.master_of(key).await?;
        if from_port == to_port {
            bail!("the slot of {key} is already on 127.0.0.1:{to_port}");
        }
        let slot = command(from_port, &["CLUSTER", "KEYSLOT", key]).await?;
        let to_id = command(to_port, &["CLUSTER", "MYID"]).await?;
        command(
            to_port,
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id],
        )
        .await?;
        command(
            from_port,
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id],
        )
        .await?;
        let to = to_port.to_string();
        let count = batch.to_string();
        let mut moved = 0;
        loop {
            let keys = command(from_port, &["CLUSTER", "GETKEYSINSLOT", &slot, &count]).await?;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            command(from_port, &args)
                .await
                .with_context(|| format!("MIGRATE of {} keys", keys.len()))?;
            moved += keys.len();
            tokio::time::sleep(pause).await;
        }
        let mut order = vec![to_port, from_port];
        for (port, _) in self.masters().await? {
            if !order.contains(&port) {
                order.push(port);
            }
        }
        for port in order {
            command(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).await?;
        }
        Ok(moved)
    }

    /// Port of a replica of the master with node id `master_id`.
    pub async fn replica_of(&self, master_id: &str) -> Result<u16> {
        self.topology()
            .await?
            .into_iter()
            .find(|n| !n.master && !n.failed && n.master_id == master_id)
            .map(|n| n.port)
            .ok_or_else(|| anyhow!("no live replica of cluster node {master_id}"))
    }
}

/// One line of `CLUSTER NODES`.
struct ClusterNode {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    master_id: String,
    slots: Vec<std::ops::RangeInclusive<u16>>,
}

impl ClusterNode {
    /// `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = fields
            .get(1)?
            .split('@')
            .next()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()?;
        let flags = fields.get(2)?;
        let slots = fields
            .iter()
            .skip(8)
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                None => s.parse().ok().map(|n| n..=n),
            })
            .collect();
        Some(Self {
            id: (*fields.first()?).to_owned(),
            port,
            master: flags.contains("master"),
            failed: flags.contains("fail"),
            master_id: (*fields.get(3)?).to_owned(),
            slots,
        })
    }
}

/// A Redis Sentinel watching one [`RedisServer`] as master `master_name`.
#[derive(Debug)]
pub struct RedisSentinel {
    server: RedisServer,
    master_name: String,
}

impl RedisSentinel {
    /// Starts a sentinel (quorum 1, master down after 5 s) for `master` under the name
    /// `master_name` and waits until it reports the master's address.
    pub async fn start(master: &RedisServer, master_name: &str) -> Result<Self> {
        Self::start_watching(master, master_name, 5000, 0).await
    }

    /// Like [`start`](Self::start), declaring the master down after `down_after_ms` without an
    /// answer, and waiting until the sentinel has discovered `replicas` replicas of it (so it can
    /// fail over to them).
    pub async fn start_watching(
        master: &RedisServer,
        master_name: &str,
        down_after_ms: u64,
        replicas: usize,
    ) -> Result<Self> {
        let sentinel = Self::launch(master, master_name, down_after_ms).await?;
        let port = sentinel.server.port();
        let name = master_name.to_owned();
        wait_until(
            Duration::from_secs(30),
            "sentinel discovers the replicas",
            || {
                let name = name.clone();
                async move {
                    let listed = command(port, &["SENTINEL", "replicas", &name]).await?;
                    // Each replica is a list of field/value lines; healthy ones have flags `slave`.
                    Ok(listed.lines().filter(|l| *l == "slave").count() >= replicas)
                }
            },
        )
        .await?;
        Ok(sentinel)
    }

    async fn launch(master: &RedisServer, master_name: &str, down_after_ms: u64) -> Result<Self> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("tf-redis-sentinel-")
                .tempdir()
                .context("creating sentinel temp dir")?;
            let port = free_port()?;
            // Sentinel rewrites its config file, so it must be a writable file of its own.
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                     sentinel monitor {master_name} 127.0.0.1 {} 1\n\
                     sentinel down-after-milliseconds {master_name} {down_after_ms}\n\
                     sentinel failover-timeout {master_name} 10000\n",
                    dir.path().display(),
                    dir.path().join("redis.log").display(),
                    master.port()
                ),
            )
            .context("writing sentinel.conf")?;
            let mut server = RedisServer {
                port,
                dir,
                args: Vec::new(),
                child: None,
            };
            server.child = Some(spawn_quiet(
                Command::new(SERVER_BIN).arg(&conf).arg("--sentinel"),
                "redis sentinel",
            )?);
            let log = server.log_path();
            let expected = format!("127.0.0.1\n{}", master.port());
            let end = Instant::now() + START_DEADLINE;
            let ready = loop {
                if let Err(e) = check_alive(&mut server.child, &log, "sentinel") {
                    break Err(e);
                }
                let answer =
                    command(port, &["SENTINEL", "get-master-addr-by-name", master_name]).await;
                if answer.is_ok_and(|r| r == expected) {
                    break Ok(());
                }
                if Instant::now() >= end {
                    break Err(anyhow!(
                        "sentinel did not report master {master_name} within {START_DEADLINE:?}; \
                         log:\n{}",
                        tail(&log)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            match ready {
                Ok(()) => {
                    return Ok(Self {
                        server,
                        master_name: master_name.to_owned(),
                    });
                }
                Err(e) if server.lost_port_race() => last_err = Some(e),
                Err(e) => return Err(e.context(format!("sentinel on 127.0.0.1:{port}"))),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context("sentinel could not bind a free port"))
    }

    /// `redis://127.0.0.1:<port>` of the sentinel.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The master name it watches.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The port of the master as the sentinel reports it now.
    pub async fn master_port(&self) -> Result<u16> {
        let addr = command(
            self.server.port(),
            &["SENTINEL", "get-master-addr-by-name", &self.master_name],
        )
        .await?;
        addr.lines()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("sentinel answered get-master-addr-by-name with `{addr}`"))
    }

    /// `SENTINEL FAILOVER`: promotes a replica without waiting for the master to fail.
    pub async fn failover(&self) -> Result<()> {
        command(
            self.server.port(),
            &["SENTINEL", "FAILOVER", &self.master_name],
        )
        .await
        .map(drop)
    }
}

/// How a failover probe makes the master go away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// `SENTINEL FAILOVER`: a replica is promoted while the old master keeps running (and keeps
    /// accepting writes from clients still connected to it) until Sentinel demotes it.
    Forced,
    /// SIGKILL of the master (writes it took that its replica had not received yet are gone);
    /// it is started again (empty, as a supervisor would)
    /// once Sentinel has promoted the replica, and Sentinel turns it into a replica of the new
    /// master.
    Kill,
}

/// What a write-loss probe saw: every write the store acknowledged must be on the master that
/// Sentinel names afterwards.
#[derive(Debug, Default)]
pub struct WriteLossReport {
    /// Writes the store acknowledged.
    pub acked: usize,
    /// Writes that failed with [`StoreError::Unavailable`](tokenfleet_store::StoreError) (the
    /// caller was told to retry: not acknowledged, so not lost).
    pub unavailable: usize,
    /// Writes that failed with any other error (should be none).
    pub other_errors: Vec<String>,
    /// Acknowledged writes missing from the final master (must be none).
    pub missing: Vec<String>,
    /// Longest run of consecutive failed writes, in time.
    pub longest_outage: Duration,
    /// Writes acknowledged after the failover began.
    pub acked_after_failover: usize,
    /// Median latency of an acknowledged write.
    pub ack_latency_p50: Duration,
    /// Largest latency of an acknowledged write.
    pub ack_latency_max: Duration,
}

impl std::fmt::Display for WriteLossReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acknowledged {} (after the failover began: {}), failed unavailable {}, failed \
             otherwise {}, acknowledged but missing afterwards {}, longest outage {:?}, ack \
             latency p50 {:?} max {:?}",
            self.acked,
            self.acked_after_failover,
            self.unavailable,
            self.other_errors.len(),
            self.missing.len(),
            self.longest_outage,
            self.ack_latency_p50,
            self.ack_latency_max,
        )
    }
}

/// A task creating one record after another through the store API (`put` with
/// `Precondition::Absent` in tenant `probe`, collection `probe`), recording what was acknowledged.
struct ProbeWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failover_at: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<(WriteLossReport, Vec<String>)>,
}

/// The index of the probe's records, in the store's key layout (default prefix).
const PROBE_INDEX: &str = "tf:{t:probe}:idx:probe";

impl ProbeWriter {
    fn start(store: impl tokenfleet_store::Store) -> Self {
        use std::sync::atomic::Ordering;
        use tokenfleet_store::{Precondition, RecordKey, StoreError};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failover_at: std::sync::Arc<std::sync::Mutex<Option<Instant>>> = Default::default();
        let task = {
            let stop = std::sync::Arc::clone(&stop);
            let failover_at = std::sync::Arc::clone(&failover_at);
            tokio::spawn(async move {
                let mut report = WriteLossReport::default();
                let mut acked_ids = Vec::new();
                let mut latencies = Vec::new();
                let mut outage_since: Option<Instant> = None;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let id = format!("w{i:07}");
                    let key = RecordKey::tenant("probe", "probe", &id);
                    let started = Instant::now();
                    match store
                        .put(&key, id.clone().into_bytes(), Precondition::Absent)
                        .await
                    {
                        Ok(_) => {
                            latencies.push(started.elapsed());
                            if let Some(since) = outage_since.take() {
                                report.longest_outage = report.longest_outage.max(since.elapsed());
                            }
                            if failover_at.lock().ok().and_then(|t| *t).is_some() {
                                report.acked_after_failover += 1;
                            }
                            acked_ids.push(id);
                        }
                        Err(e) => {
                            outage_since.get_or_insert(started);
                            match e {
                                StoreError::Unavailable(_) => report.unavailable += 1,
                                other => report.other_errors.push(other.to_string()),
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if let Some(since) = outage_since {
                    report.longest_outage = report.longest_outage.max(since.elapsed());
                }
                latencies.sort_unstable();
                report.ack_latency_p50 = latencies
                    .get(latencies.len() / 2)
                    .copied()
                    .unwrap_or_default();
                report.ack_latency_max = latencies.last().copied().unwrap_or_default();
                report.acked = acked_ids.len();
                (report, acked_ids)
            })
        };
        Self {
            stop,
            failover_at,
            task,
        }
    }

    /// From now on, acknowledged writes count as "after the failover began".
    fn failover_begins(&self) {
        if let Ok(mut at) = self.failover_at.lock() {
            *at = Some(Instant::now());
        }
    }

    /// Stops the writer and checks its acknowledged ids against the index on `master_port`.
    async fn finish(self, master_port: u16) -> Result<WriteLossReport> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut report, acked_ids) = self.task.await.context("writer task")?;
        let role = command(master_port, &["ROLE"]).await?;
        if !role.starts_with("master") {
            bail!("127.0.0.1:{master_port}, taken for the master, reports role `{role}`");
        }
        let present = command(master_port, &["ZRANGE", PROBE_INDEX, "0", "-1"]).await?;
        let present: std::collections::HashSet<&str> = present.lines().collect();
        report.missing = acked_ids
            .into_iter()
            .filter(|id| !present.contains(id.as_str()))
            .collect();
        Ok(report)
    }
}

/// Waits until the server on `port` is a replica with a live link to its master: a demoted old
/// master has then thrown away whatever only it held.
pub async fn demoted_and_resynced(port: u16) -> Result<()> {
    wait_until(
        Duration::from_secs(40),
        "old master demoted and resynced",
        || async move {
            let info = command(port, &["INFO", "replication"]).await?;
            Ok(info.contains("role:slave") && info.contains("master_link_status:up"))
        },
    )
    .await
}

/// Runs a Sentinel failover under write load and counts acknowledged writes that are gone.
///
/// Starts a master, one replica and a sentinel (master down after 1 s); a writer task creates one
/// record after another through the store API (`put` with `Precondition::Absent`) via a
/// [`RedisStore`](tokenfleet_store::redis_store::RedisStore) that `tune` may adjust; after about
/// a second the master goes away as `how` says. The probe waits until the old master has been
/// demoted and has resynchronised from the new one (which is when writes only it held are
/// discarded), lets the writer go on for `settle`, then looks every acknowledged record up on the
/// master Sentinel names.
pub async fn sentinel_write_loss_probe(
    how: Failover,
    settle: Duration,
    tune: impl FnOnce(&mut tokenfleet_store::redis_store::RedisConfig),
) -> Result<WriteLossReport> {
    use tokenfleet_store::redis_store::{RedisConfig, RedisStore};

    const NAME: &str = "tfprobe";
    let mut master = RedisServer::start().await?;
    let _replica = RedisServer::start_replica_of(&master).await?;
    let sentinel = RedisSentinel::start_watching(&master, NAME, 1000, 1).await?;
    let old_port = master.port();

    let mut config = RedisConfig::sentinel(vec![sentinel.url()], NAME);
    config.connect_timeout_ms = 500;
    config.command_timeout_ms = 1000;
    tune(&mut config);
    let store = RedisStore::connect(&config)
        .await
        .map_err(|e| anyhow!("connecting the store: {e}"))?;
    let writer = ProbeWriter::start(store);

    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.failover_begins();
    match how {
        Failover::Forced => sentinel.failover().await?,
        Failover::Kill => master.kill(),
    }
    let s = &sentinel;
    wait_until(
        Duration::from_secs(30),
        "sentinel names a new master",
        || async move { Ok(s.master_port().await? != old_port) },
    )
    .await?;
    if how == Failover::Kill {
        tokio::time::sleep(Duration::from_millis(500)).await;
        master.start_again().await?;
    }
    demoted_and_resynced(old_port).await?;
    tokio::time::sleep(settle).await;
    writer.finish(sentinel.master_port().await?).await
}

/// [`sentinel_write_loss_probe`] for a Redis Cluster of three masters with a replica each (node
/// timeout 1 s): `Forced` is `CLUSTER FAILOVER` on the replica of the master serving the probe's
/// records, `Kill` a SIGKILL of that master (started again, empty, after its replica took over).
pub async fn cluster_write_loss_probe(
    how: Failover,
    settle: Duration,
    tune: impl FnOnce(&mut tokenfleet_store::redis_store::RedisConfig),
) -> Result<WriteLossReport> {
    use tokenfleet_store::redis_store::{RedisConfig, RedisStore};

    let mut cluster = RedisCluster::start_with_replicas(1000).await?;
    let (old_port, old_id) = cluster.master_of(PROBE_INDEX).await?;
    let mut config = RedisConfig::cluster(cluster.seed_urls());
    config.connect_timeout_ms = 500;
    config.command_timeout_ms = 1000;
    tune(&mut config);
    let store = RedisStore::connect(&config)
        .await
        .map_err(|e| anyhow!("connecting the store: {e}"))?;
    let writer = ProbeWriter::start(store);

    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.failover_begins();
    match how {
        Failover::Forced => {
            let replica = cluster.replica_of(&old_id).await?;
            command(replica, &["CLUSTER", "FAILOVER"]).await?;
        }
        Failover::Kill => cluster
            .node_mut(old_port)
            .ok_or_else(|| anyhow!("no node on port {old_port}"))?
            .kill(),
    }
    let c = &cluster;
    wait_until(
        Duration::from_secs(30),
        "the cluster names a new master for the probe's slot",
        || async move { Ok(c.master_of(PROBE_INDEX).await?.0 != old_port) },
    )
    .await?;
    if how == Failover::Kill {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster
            .node_mut(old_port)
            .ok_or_else(|| anyhow!("no node on port {old_port}"))?
            .start_again()
            .await?;
    }
    demoted_and_resynced(old_port).await?;
    tokio::time::sleep(settle).await;
    writer.finish(cluster.master_of(PROBE_INDEX).await?.0).await
}
