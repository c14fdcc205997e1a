//! Real `tokenfleet-broker` processes for the chaos suite: replicas sharing one Redis store (any
//! mode) and one sealing key, each a child process on its own loopback ports with its own
//! configuration file, stderr in the test log directory. A replica can be killed with SIGKILL
//! (no drain, no lease release: what a crashed node or an OOM kill does) and started again.
//!
//! The fleet-admin API key comes from the binary's own `create-api-key` command, as an operator
//! makes the first one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokenfleet_proto::v1::admin_client::AdminClient;
use tokenfleet_seal::{Keyring, Secret};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Endpoint;

use crate::broker::{BearerAuth, TestAdminClient};

/// Where the replicas keep their state.
#[derive(Debug, Clone)]
pub enum ChaosStore {
    /// Standalone Redis at this URL.
    Standalone(String),
    /// Sentinel mode: these sentinels watching `master`.
    Sentinel {
        /// Sentinel URLs.
        sentinels: Vec<String>,
        /// The master's name.
        master: String,
    },
    /// Redis Cluster seeds, with `min_replicas_acked`.
    Cluster {
        /// Seed node URLs.
        seeds: Vec<String>,
        /// Replicas each write waits for.
        min_replicas_acked: u32,
    },
}

impl ChaosStore {
    fn toml(&self) -> String {
        let urls = |urls: &[String]| {
            urls.iter()
                .map(|u| format!("{u:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            ChaosStore::Standalone(url) => format!("urls = [{url:?}]\n"),
            ChaosStore::Sentinel { sentinels, master } => format!(
                "mode = \"sentinel\"\nurls = [{}]\nsentinel_master = {master:?}\n\
                 connect_timeout_ms = 500\ncommand_timeout_ms = 1000\n",
                urls(sentinels)
            ),
            ChaosStore::Cluster {
                seeds,
                min_replicas_acked,
            } => format!(
                "mode = \"cluster\"\nurls = [{}]\nmin_replicas_acked = {min_replicas_acked}\n\
                 connect_timeout_ms = 500\ncommand_timeout_ms = 1000\n",
                urls(seeds)
            ),
        }
    }
}

/// One replica: a `tokenfleet-broker` child process.
#[derive(Debug)]
pub struct BrokerProcess {
    /// The gRPC listener (plaintext).
    pub grpc: SocketAddr,
    /// The HTTP listener.
    pub http: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl BrokerProcess {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("broker log {}", self.log.display()))?;
        let child = Command::new(crate::agent_site::broker_binary())
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tokenfleet-broker")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the spawned broker is ready; when it could not listen because another test
    /// took one of its ports after they were found free, moves it to new ones and starts it
    /// again (a few times).
    async fn ready_on_free_ports(&mut self) -> Result<()> {
        for _ in 0..PORT_ATTEMPTS {
            match self.wait_ready(Duration::from_secs(30)).await {
                Err(error) if format!("{error:#}").contains("Address already in use") => {
                    let [grpc, http] = crate::ports::free_ports::<2>()?;
                    let config = std::fs::read_to_string(&self.config)?
                        .replace(&self.grpc.to_string(), &format!("127.0.0.1:{grpc}"))
                        .replace(&self.http.to_string(), &format!("127.0.0.1:{http}"));
                    std::fs::write(&self.config, config)?;
                    self.grpc = SocketAddr::from(([127, 0, 0, 1], grpc));
                    self.http = SocketAddr::from(([127, 0, 0, 1], http));
                    self.spawn()?;
                }
                done => return done,
            }
        }
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Waits until `/readyz` answers 200 (fails after `limit`, or when the process exited).
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "tokenfleet-broker exited with {status}; log {}:\n{}",
                    self.log.display(),
                    tail(&self.log)
                );
            }
            if http_get(self.http, "/readyz")
                .await
                .is_ok_and(|(s, _)| s == 200)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "tokenfleet-broker on {} not ready within {limit:?}; log:\n{}",
                    self.http,
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is running (it was never restarted behind the caller's back).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it again on the same configuration and waits until it is ready.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// An Admin client with `key`.
    pub fn admin(&self, key: &Secret) -> TestAdminClient {
        let channel = Endpoint::from_shared(format!("http://{}", self.grpc))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(15))
                    .connect_lazy()
            })
            .unwrap_or_else(|e| panic!("endpoint {}: {e}", self.grpc));
        AdminClient::with_interceptor(channel, BearerAuth::new(key))
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Broker replicas on one store.
#[derive(Debug)]
pub struct BrokerReplicas {
    /// The replicas.
    pub replicas: Vec<BrokerProcess>,
    /// A fleet-admin key.
    pub admin_key: Secret,
    // Last: the directory goes after the processes that use it.
    _dir: tempfile::TempDir,
}

/// Extra configuration of the replicas (TOML lines appended to `[http]` and `[tokens]`).
#[derive(Debug, Clone, Default)]
pub struct ReplicaSettings {
    /// Lines for the `[http]` table after `listen` and `public_url` (empty: every default).
    pub http: String,
    /// Lines for the `[tokens]` table (empty: every default).
    pub tokens: String,
}

impl BrokerReplicas {
    /// Starts `count` replicas on `store` and waits until each is ready.
    pub async fn start(count: usize, store: ChaosStore, settings: ReplicaSettings) -> Result<Self> {
        crate::logs::capture();
        let binary = tokio::task::spawn_blocking(crate::agent_site::broker_binary)
            .await
            .context("building tokenfleet-broker")?;
        let dir = tempfile::Builder::new()
            .prefix("tf-chaos-brokers-")
            .tempdir()
            .context("temp dir")?;
        let key_file = dir.path().join("seal.key");
        let key = Keyring::generate_key_base64().context("sealing key")?;
        crate::logs::secret(&key);
        write_private(&key_file, key.as_bytes())?;
        let run = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut replicas = Vec::with_capacity(count);
        for i in 0..count {
            let [grpc, http] = crate::ports::free_ports::<2>()?;
            let state = dir.path().join(format!("replica-{i}"));
            let config = dir.path().join(format!("broker-{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "state_dir = {state:?}\nshutdown_grace_seconds = 2\n\
                     [grpc]\nlisten = \"127.0.0.1:{grpc}\"\n\
                     [http]\nlisten = \"127.0.0.1:{http}\"\npublic_url = \"http://127.0.0.1:{http}\"\n{}\
                     [store]\nbackend = \"redis\"\n[store.redis]\n{}\
                     [seal]\ncurrent_key_id = \"chaos\"\nkeys = [{{ id = \"chaos\", key_file = {key_file:?} }}]\n\
                     [admin]\nprovider_hosts = [\"127.0.0.1\"]\n\
                     [log]\nlevel = \"info\"\n\
                     [tokens]\n{}",
                    settings.http,
                    store.toml(),
                    settings.tokens
                ),
            )
            .context("writing the broker configuration")?;
            let log = crate::logs::log_dir()
                .join(format!("chaos-broker-{}-{run}-{i}.log", std::process::id()));
            replicas.push(BrokerProcess {
                grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
                http: SocketAddr::from(([127, 0, 0, 1], http)),
                config,
                log,
                child: None,
            });
        }
        // The first key, as an operator makes it: the binary's own command, on the shared store.
        let out = tokio::process::Command::new(&binary)
            .arg("--config")
            .arg(&replicas[0].config)
            .args([
                "create-api-key",
                "--role",
                "fleet-admin",
                "--description",
                "chaos",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .context("tokenfleet-broker create-api-key")?;
        if !out.status.success() {
            bail!(
                "create-api-key failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let admin_key = stdout
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim()
            .to_owned();
        crate::logs::secret(&admin_key);
        for replica in &mut replicas {
            replica.spawn()?;
        }
        for replica in &mut replicas {
            replica.ready_on_free_ports().await?;
        }
        Ok(Self {
            replicas,
            admin_key: Secret::new(admin_key),
            _dir: dir,
        })
    }

    /// An Admin client of replica `i`.
    pub fn admin(&self, i: usize) -> TestAdminClient {
        self.replicas[i].admin(&self.admin_key)
    }
}

/// How often a starting replica moves to new ports when one was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `GET path` over HTTP/1.1 on `addr`; status and body. Gives up after 3 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .context("not an HTTP response")?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .context("no HTTP answer within 3 s")?
}
