//! A whole agent site for end-to-end tests of `tokenfleet-agent run`: the fake identity provider
//! (one confidential client with an app-only mailbox), a real Dovecot validating XOAUTH2 by
//! introspection at the fake, a TLS broker with tenant, provider, mailbox and one device, and the
//! real agent binary — enrolled, then run as a child process with a local SMTP and POP3 listener
//! and its metrics listener on a free port ([`AgentSite::metrics`]).
//!
//! The site can be disturbed the way the suites need: the agent stopped (SIGTERM), killed
//! (SIGKILL) and started again on the same state directory ([`AgentSite::stop_agent`],
//! [`AgentSite::kill_agent`], [`AgentSite::start_agent`]), the broker stopped
//! ([`AgentSite::stop_broker`]), and the upstream taken away behind a pausable [`TcpRelay`].
//! The printer is Python's `smtplib` ([`AgentSite::start_printer`], [`AgentSite::print`]); what
//! arrived upstream is read back over Dovecot's POP3 with a token of its own
//! ([`AgentSite::upstream_pop3`], [`AgentSite::upstream_count`], [`Pop3Session`]).
//!
//! Also the small helpers the agent suites share: [`eventually`] (polling with a deadline),
//! [`free_port`], [`workspace_binary`] / [`agent_binary`] / [`ctl_binary`] (built once per test
//! process with a plain `cargo build`), [`xoauth2`], [`TestPki`] (a CA of the test and a
//! certificate for `127.0.0.1`), and [`AgentSite::ctl`] to run the real `tokenfleetctl` against
//! the site's broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokenfleet_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::broker::{TestAdminClient, TestBroker, TestOptions, TestStore};
use crate::dovecot::{Dovecot, DovecotFeatures, DovecotOptions, DovecotTls};
use crate::fake_idp::{ClientSpec, FakeIdp};

/// Tenant of the site.
pub const TENANT: &str = "acme";
/// Agent name.
pub const AGENT: &str = "site1";
/// Device name.
pub const DEVICE: &str = "mfp";
/// Mailbox name (app-only, admin kind).
pub const MAILBOX: &str = "scan";
/// Mailbox address (the fake's app-only mailbox, Dovecot's user).
pub const ADDRESS: &str = "scan@contoso.example";
/// Entra tenant segment at the fake.
pub const ENTRA: &str = "contoso-tenant";
/// Client id at the fake.
pub const CLIENT_ID: &str = "agent-site-app";
/// Client secret at the fake.
pub const CLIENT_SECRET: &str = "agent-site-client-secret";
/// The device's local user name.
pub const DEVICE_USER: &str = "mfp-user";
/// The device's local password.
pub const DEVICE_PASSWORD: &str = "printer-local-password-9";
/// Heartbeat of the agent (local override).
pub const HEARTBEAT_SECONDS: u64 = 2;

/// Polls `check` every 100 ms until it returns `Some`, panicking with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the Microsoft provider `name` of `tenant` whose endpoints are the fake identity
/// provider's for the Entra tenant `entra`, with a confidential client.
pub async fn microsoft_provider(
    admin: &mut TestAdminClient,
    fake: &FakeIdp,
    tenant: &str,
    name: &str,
    entra: &str,
    client_id: &str,
    client_secret: &str,
) -> Result<(), tonic::Status> {
    let e = fake.microsoft_endpoints(entra);
    admin
        .create_provider(pb::CreateProviderRequest {
            provider: Some(pb::Provider {
                tenant: tenant.into(),
                name: name.into(),
                kind: pb::ProviderKind::Microsoft as i32,
                authority: entra.into(),
                client_id: client_id.into(),
                client_secret: client_secret.into(),
                endpoints: Some(pb::ProviderEndpoints {
                    authorize_url: e.authorize_url,
                    token_url: e.token_url,
                    device_code_url: e.device_code_url,
                    revoke_url: e.revoke_url,
                }),
                ..Default::default()
            }),
        })
        .await
        .map(drop)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    match crate::ports::free_port() {
        Ok(port) => port,
        Err(e) => panic!("no free loopback port: {e:#}"),
    }
}

/// The one `cargo build` the end-to-end tests run for the binaries they start. Always all of them
/// in one command, so feature unification is the same every time: `scripts/test.sh` runs the same
/// command before the suite, and then the build inside a test finds everything fresh.
pub const E2E_BINARIES_BUILD: [&str; 13] = [
    "build",
    "-p",
    "tokenfleet-agent",
    "--bin",
    "tokenfleet-agent",
    "-p",
    "tokenfleetctl",
    "--bin",
    "tokenfleetctl",
    "-p",
    "tokenfleet-broker",
    "--bin",
    "tokenfleet-broker",
];

/// Builds the end-to-end binaries ([`E2E_BINARIES_BUILD`], once per test process) and returns
/// the path of `bin` next to the test executable (`target/<profile>/<bin>`). `package` must be
/// one of the packages that command builds.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    assert!(
        E2E_BINARIES_BUILD.contains(&package) && E2E_BINARIES_BUILD.contains(&bin),
        "{package}/{bin} is not built by E2E_BINARIES_BUILD"
    );
    static BUILT: OnceLock<Mutex<std::collections::BTreeMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(std::collections::BTreeMap::new()));
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(path) = built.get(bin) {
        return path.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Only the variables a plain `cargo build` sees: what the test runner sets for this process
    // (CARGO_PKG_*, OUT_DIR, …) would change fingerprints and rebuild the world.
    let keep = [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "TMPDIR",
        "RUSTUP_AUTO_INSTALL",
    ];
    // target/debug/deps/<this test> → target/debug/<bin>; a benchmark or chaos binary of this
    // crate (target/<profile>/<bench>) finds it next to itself, built with the same profile.
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => panic!("the test executable's path: {e}"),
    };
    let release = exe
        .parent()
        .is_some_and(|dir| dir.file_name().is_some_and(|n| n == "release"));
    let status = Command::new(cargo)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| keep.contains(&k.as_str())))
        .args(E2E_BINARIES_BUILD)
        .args(release.then_some("--release"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!("building {bin} ({package}) failed: {other:?}"),
    }
    let path = exe
        .parent()
        .and_then(|dir| {
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.parent()
            } else {
                Some(dir)
            }
        })
        .map(|dir| dir.join(bin))
        .unwrap_or_else(|| PathBuf::from(bin));
    assert!(path.is_file(), "{} missing", path.display());
    built.insert(bin.to_owned(), path.clone());
    path
}

/// The agent binary: `TOKENFLEET_TEST_AGENT_BINARY` when set (benchmarks compare another build,
/// e.g. main's), else the one [`E2E_BINARIES_BUILD`] builds.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TOKENFLEET_TEST_AGENT_BINARY") {
        return PathBuf::from(path);
    }
    workspace_binary("tokenfleet-agent", "tokenfleet-agent")
}

/// The `tokenfleetctl` binary.
pub fn ctl_binary() -> PathBuf {
    workspace_binary("tokenfleetctl", "tokenfleetctl")
}

/// The `tokenfleet-broker` binary: `BENCH_BROKER_BINARY` when set (benchmarks compare
/// another build), else the one [`E2E_BINARIES_BUILD`] builds.
pub fn broker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BENCH_BROKER_BINARY") {
        return PathBuf::from(path);
    }
    workspace_binary("tokenfleet-broker", "tokenfleet-broker")
}

/// `tokenfleet-broker --config <config> print-config` with the environment variable `unset`
/// taken out (the suite may set the entry under test): its exit code and stderr.
pub async fn broker_print_config(config: &Path, unset: &str) -> (Option<i32>, String) {
    let broker = match tokio::task::spawn_blocking(broker_binary).await {
        Ok(path) => path,
        Err(e) => panic!("finding the broker binary: {e}"),
    };
    let out = match tokio::process::Command::new(&broker)
        .arg("--config")
        .arg(config)
        .arg("print-config")
        .env_remove(unset)
        .output()
        .await
    {
        Ok(out) => out,
        Err(e) => panic!("running {}: {e}", broker.display()),
    };
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The SASL XOAUTH2 initial response for `user` and `token`.
pub fn xoauth2(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// How long [`Pop3Session`] waits for any one answer.
const READ_DEADLINE: Duration = Duration::from_secs(20);

/// A CA made by one test and a TLS server certificate for `127.0.0.1` it signed (the broker's
/// certificate code: ECDSA P-256, valid for a day). Nobody trusts the CA unless the test hands
/// [`TestPki::ca_pem`] out; both private keys are registered with [`crate::logs::secret`].
#[derive(Clone)]
pub struct TestPki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The server certificate, PEM.
    pub cert_pem: String,
    /// The server certificate's private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

impl TestPki {
    /// A new CA with the common name `ca_name` and a server certificate for `127.0.0.1`.
    pub fn new(ca_name: &str) -> Self {
        use tokenfleet_broker::identity::pki;
        let now = time::OffsetDateTime::now_utc();
        let day = Duration::from_secs(24 * 3600);
        let ca = pki::generate_ca(ca_name, now, day)
            .unwrap_or_else(|e| panic!("test CA `{ca_name}`: {e}"));
        crate::logs::secret(ca.key_pem.expose());
        let server = pki::generate_server_cert(&ca.cert_pem, &ca.key_pem, &["127.0.0.1"], now, day)
            .unwrap_or_else(|e| panic!("server certificate from `{ca_name}`: {e}"));
        crate::logs::secret(server.key_pem.expose());
        Self {
            ca_pem: ca.cert_pem,
            cert_pem: server.cert_pem,
            key_pem: server.key_pem.expose().to_owned(),
        }
    }

    /// Dovecot features serving this certificate (STARTTLS/STLS and the implicit-TLS ports).
    pub fn dovecot_features(&self) -> DovecotFeatures {
        self.dovecot_features_with_min_tls(None)
    }

    /// [`TestPki::dovecot_features`] with Dovecot's `ssl_min_protocol` (e.g. `TLSv1.3`).
    pub fn dovecot_features_with_min_tls(&self, min_protocol: Option<&str>) -> DovecotFeatures {
        DovecotFeatures {
            tls: Some(DovecotTls {
                cert_pem: self.cert_pem.clone(),
                key_pem: self.key_pem.clone(),
                min_protocol: min_protocol.map(str::to_owned),
            }),
            ..DovecotFeatures::default()
        }
    }
}

/// The fake identity provider with an app-only client for `mailbox`, an access token for it
/// from the fake's token endpoint (client credentials; registered as a secret for the log scan),
/// and a Dovecot with `features` validating tokens at the fake's `/introspect`: the upstream of
/// the agent's fetch and send tests.
pub async fn dovecot_with_app_token(
    mailbox: &str,
    features: DovecotFeatures,
) -> (FakeIdp, String, Dovecot) {
    crate::logs::capture();
    let fake = FakeIdp::start()
        .await
        .unwrap_or_else(|e| panic!("starting the fake IdP: {e:#}"));
    let mut spec = ClientSpec::confidential("daemon-app", "daemon-secret");
    spec.app_only_mailbox = Some(mailbox.into());
    fake.register_client(spec);
    let token =
        client_credentials_token(&fake, "organizations", "daemon-app", "daemon-secret").await;
    let dovecot = Dovecot::start_with(
        DovecotOptions {
            introspection_url: fake.introspection_url(),
        },
        features,
    )
    .await
    .unwrap_or_else(|e| panic!("starting Dovecot: {e:#}"));
    (fake, token, dovecot)
}

/// A TCP forwarder from a loopback port of its own to `to` that can be paused: while paused,
/// new connections are accepted and closed at once (before any greeting), as if the server
/// behind it were down; connections forwarded earlier go on. Put it between the agent and an
/// upstream (point the device's profile at [`TcpRelay::addr`]). Stops on drop.
#[derive(Debug)]
pub struct TcpRelay {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpRelay {
    /// Starts forwarding to `to` (not paused).
    pub async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("relay to {to}: binding a loopback port: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("relay to {to}: its own address: {e}"));
        let paused = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&paused);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, paused, task }
    }

    /// The address to connect to instead of the server behind the relay.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Pauses (`true`: the server looks down) or resumes (`false`) forwarding new connections.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A POP3 session for reading a mailbox back: one command at a time, a 20 s deadline on every
/// read, multi-line answers with dot-stuffing undone and CRLFs kept. Panics on anything
/// unexpected (a closed connection, a late answer, a refused login).
#[derive(Debug)]
pub struct Pop3Session {
    reader: BufReader<TcpStream>,
}

impl Pop3Session {
    /// Connects to `addr` and checks the `+OK` greeting.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("POP3 at {addr}: {e}"));
        let mut session = Self {
            reader: BufReader::new(stream),
        };
        let greeting = session.line().await;
        assert!(greeting.starts_with("+OK"), "POP3 greeting: {greeting}");
        session
    }

    /// Connects to `addr` and logs in as `user` with SASL XOAUTH2 and `token`.
    pub async fn login_xoauth2(addr: SocketAddr, user: &str, token: &str) -> Self {
        let mut session = Self::connect(addr).await;
        let cont = session.command("AUTH XOAUTH2").await;
        assert!(
            cont.starts_with('+') && !cont.starts_with("+OK"),
            "AUTH XOAUTH2: {cont}"
        );
        let done = session.command(&xoauth2(user, token)).await;
        assert!(done.starts_with("+OK"), "POP3 login: {done}");
        session
    }

    async fn read_line(&mut self, what: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(READ_DEADLINE, self.reader.read_until(b'\n', &mut buf))
            .await
            .unwrap_or_else(|_| panic!("no POP3 {what} within {READ_DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("reading a POP3 {what}: {e}"));
        assert!(
            n > 0,
            "the POP3 server closed the connection (waiting for a {what})"
        );
        buf
    }

    async fn line(&mut self) -> String {
        let buf = self.read_line("answer").await;
        String::from_utf8_lossy(&buf).trim_end().to_owned()
    }

    async fn send(&mut self, line: &str) {
        self.reader
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("writing to the POP3 server: {e}"));
    }

    /// Sends `line` and returns the one-line answer (line end removed).
    pub async fn command(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await
    }

    /// The number of messages in the maildrop (`STAT`).
    pub async fn count(&mut self) -> usize {
        let stat = self.command("STAT").await;
        assert!(stat.starts_with("+OK"), "STAT: {stat}");
        stat.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("STAT without a count: {stat}"))
    }

    /// The body of the multi-line answer to `command` (`RETR 1`, `TOP 3 0`, …).
    pub async fn multiline(&mut self, command: &str) -> Vec<u8> {
        let first = self.command(command).await;
        assert!(first.starts_with("+OK"), "{command}: {first}");
        let mut out = Vec::new();
        loop {
            let buf = self.read_line("multi-line answer").await;
            if buf == b".\r\n" {
                return out;
            }
            out.extend_from_slice(buf.strip_prefix(b".").unwrap_or(&buf));
        }
    }

    /// Ends the session (`QUIT`; the answer is not waited for).
    pub async fn quit(mut self) {
        self.send("QUIT").await;
    }
}

/// The printer: Python's smtplib, AUTH LOGIN/PLAIN with the device's local password. Message `i`
/// carries `X-Seq: i` (and the attachment as `scan.pdf` when one is given); it is written to
/// `<out_dir>/<i>.eml` before it is sent, and retried (new connection) for up to 90 s until the
/// agent acknowledges it.
const PRINTER_PY: &str = r#"
import smtplib, sys, time, os
from email.message import EmailMessage
from email import policy
port, user, password, to, count, out_dir, attach = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7]
first = int(sys.argv[8]) if len(sys.argv) > 8 else 0
for i in range(first, first + count):
    m = EmailMessage(policy=policy.SMTP)
    m["From"] = "Scanner <scanner@printer.local>"
    m["To"] = to
    m["Subject"] = "Scan %d" % i
    m["X-Seq"] = str(i)
    m.set_content("Scanned document %d.\n.leading dot line\nend\n" % i)
    if attach:
        with open(attach, "rb") as f:
            m.add_attachment(f.read(), maintype="application", subtype="pdf", filename="scan.pdf")
    data = m.as_bytes()
    with open(os.path.join(out_dir, "%d.eml" % i), "wb") as f:
        f.write(data)
    deadline = time.time() + 90
    while True:
        try:
            with smtplib.SMTP("127.0.0.1", int(port), timeout=20) as s:
                s.login(user, password)
                s.sendmail("scanner@printer.local", [to], data)
            break
        except Exception as e:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
"#;

/// A printer run started by [`AgentSite::start_printer`] (killed if dropped unfinished).
#[derive(Debug)]
pub struct PrinterRun {
    child: tokio::process::Child,
    out_dir: PathBuf,
    first: usize,
    count: usize,
    agent_log: PathBuf,
}

impl PrinterRun {
    /// How many messages the printer has composed so far; each is composed just before it is
    /// sent, so all but the last of them were acknowledged.
    pub fn composed(&self) -> usize {
        std::fs::read_dir(&self.out_dir).map_or(0, |d| d.count())
    }

    /// Waits for the printer to finish (it must succeed) and returns the raw messages it sent,
    /// in order.
    pub async fn finish(self) -> Vec<Vec<u8>> {
        let out = self
            .child
            .wait_with_output()
            .await
            .unwrap_or_else(|e| panic!("waiting for the printer: {e}"));
        assert!(
            out.status.success(),
            "the printer (smtplib) failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.agent_log).unwrap_or_default()
        );
        (self.first..self.first + self.count)
            .map(|i| {
                let path = self.out_dir.join(format!("{i}.eml"));
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            })
            .collect()
    }
}

/// What [`AgentSite::start`] sets up.
pub struct SiteOptions {
    /// Dovecot's extras (TLS, mechanisms).
    pub dovecot: DovecotFeatures,
    /// Purposes of the mailbox.
    pub purposes: Vec<pb::MailPurpose>,
    /// The device, given the running Dovecot (its `tenant`, `name`, `agent`, `admin_mailbox`,
    /// `sender_mode` and `ingress` are filled in when empty).
    pub device: Box<dyn FnOnce(&Dovecot) -> pb::Device + Send>,
    /// Extra lines for the agent's configuration file.
    pub agent_config: String,
    /// The agent's local heartbeat override (default [`HEARTBEAT_SECONDS`]).
    pub heartbeat_seconds: u64,
    /// The agent's `RUST_LOG` (default `info,tokenfleet_agent=trace`; benchmarks log less).
    pub log_filter: String,
    /// Run the broker as the `tokenfleet-broker` binary with these TOML tables merged into its
    /// configuration ([`crate::broker::TestOptions::binary_config`]); `None` = in-process.
    pub broker_config: Option<String>,
}

impl std::fmt::Debug for SiteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteOptions")
            .field("dovecot", &self.dovecot)
            .field("purposes", &self.purposes)
            .finish_non_exhaustive()
    }
}

impl Default for SiteOptions {
    fn default() -> Self {
        Self {
            dovecot: DovecotFeatures::default(),
            purposes: vec![
                pb::MailPurpose::Send,
                pb::MailPurpose::Pop,
                pb::MailPurpose::Imap,
            ],
            device: Box::new(|dovecot: &Dovecot| pb::Device {
                smtp: Some(plain_smtp(dovecot.submission_addr())),
                ..Default::default()
            }),
            agent_config: String::new(),
            heartbeat_seconds: HEARTBEAT_SECONDS,
            log_filter: "info,tokenfleet_agent=trace".to_owned(),
            broker_config: None,
        }
    }
}

/// A send profile for a plain-text submission server at `addr`.
pub fn plain_smtp(addr: SocketAddr) -> pb::SmtpProfile {
    pb::SmtpProfile {
        server: "127.0.0.1".into(),
        port: u32::from(addr.port()),
        security: pb::TlsMode::None as i32,
        timeout_seconds: 10,
        method: pb::SendMethod::Smtp as i32,
        ..Default::default()
    }
}

/// A plain-text fetch profile for `addr`, checked every `interval` seconds.
pub fn plain_fetch(
    protocol: pb::FetchProtocol,
    addr: SocketAddr,
    interval: u32,
) -> pb::FetchProfile {
    pb::FetchProfile {
        protocol: protocol as i32,
        server: "127.0.0.1".into(),
        port: u32::from(addr.port()),
        security: pb::TlsMode::None as i32,
        interval_seconds: interval,
        ..Default::default()
    }
}

static NEXT_SITE: AtomicUsize = AtomicUsize::new(0);

/// The running site (see the module documentation). The agent is killed on drop.
pub struct AgentSite {
    /// The fake identity provider.
    pub fake: FakeIdp,
    /// The broker (TLS); `None` once [`AgentSite::stop_broker`] stopped it.
    broker: Option<TestBroker>,
    /// Dovecot.
    pub dovecot: Dovecot,
    /// Temporary directory (configuration, state).
    pub dir: tempfile::TempDir,
    /// The agent's state directory.
    pub state: PathBuf,
    /// The agent's SMTP ingress.
    pub smtp: SocketAddr,
    /// The agent's local POP3 server.
    pub pop3: SocketAddr,
    /// The agent's metrics listener (`/metrics`, `/healthz`).
    pub metrics: SocketAddr,
    /// The agent's log file.
    pub log: PathBuf,
    child: Option<Child>,
    runs: usize,
    log_filter: String,
}

impl std::fmt::Debug for AgentSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSite")
            .field("state", &self.state)
            .field("smtp", &self.smtp)
            .field("pop3", &self.pop3)
            .field("metrics", &self.metrics)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl Drop for AgentSite {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn post_form(url: &str, body: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("writing to {host}: {e}"));
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .unwrap_or_else(|e| panic!("reading from {host}: {e}"));
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// An app-only access token for Exchange Online from `fake`'s token endpoint of `tenant`
/// (client credentials); registered as a secret for the log scan.
async fn client_credentials_token(
    fake: &FakeIdp,
    tenant: &str,
    client_id: &str,
    secret: &str,
) -> String {
    let body = format!(
        "grant_type=client_credentials&client_id={client_id}&client_secret={secret}\
         &scope=https%3A%2F%2Foutlook.office365.com%2F.default"
    );
    let url = format!("{}/{tenant}/oauth2/v2.0/token", fake.base_url());
    let out = post_form(&url, &body).await;
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("token answer {out:?}: {e}"));
    let token = json["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {out}"))
        .to_owned();
    crate::logs::secret(&token);
    token
}

impl AgentSite {
    /// Sets up everything and starts the agent (see the module documentation).
    pub async fn start(options: SiteOptions) -> Self {
        crate::logs::capture();
        let fake = FakeIdp::start()
            .await
            .unwrap_or_else(|e| panic!("fake IdP: {e:#}"));
        let mut spec = ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET);
        spec.app_only_mailbox = Some(ADDRESS.into());
        fake.register_client(spec);
        crate::logs::secret(CLIENT_SECRET);
        let dovecot = Dovecot::start_with(
            DovecotOptions {
                introspection_url: fake.introspection_url(),
            },
            options.dovecot,
        )
        .await
        .unwrap_or_else(|e| panic!("Dovecot: {e:#}"));
        let broker = TestBroker::start_with(
            TestStore::Embedded,
            TestOptions {
                tls: true,
                binary_config: options.broker_config.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("broker: {e:#}"));
        let mut a = broker.admin_client();
        let must = |what: &str, r: Result<_, tonic::Status>| {
            if let Err(status) = r {
                panic!("{what}: {status:?}");
            }
        };
        must(
            "create tenant",
            a.create_tenant(pb::CreateTenantRequest {
                tenant: Some(pb::Tenant {
                    name: TENANT.into(),
                    display_name: "Acme".into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ()),
        );
        must(
            "create provider",
            microsoft_provider(
                &mut a,
                &fake,
                TENANT,
                "m365",
                ENTRA,
                CLIENT_ID,
                CLIENT_SECRET,
            )
            .await,
        );
        must(
            "create mailbox",
            a.create_mailbox(pb::CreateMailboxRequest {
                mailbox: Some(pb::Mailbox {
                    tenant: TENANT.into(),
                    name: MAILBOX.into(),
                    address: ADDRESS.into(),
                    provider: "m365".into(),
                    grant_type: pb::GrantType::AppOnly as i32,
                    kind: pb::MailboxKind::Admin as i32,
                    purposes: options.purposes.iter().map(|p| *p as i32).collect(),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ()),
        );
        must(
            "start consent",
            a.start_consent(pb::StartConsentRequest {
                tenant: TENANT.into(),
                mailbox: MAILBOX.into(),
                redirect_uri: String::new(),
            })
            .await
            .map(|_| ()),
        );
        let code = crate::broker::enrollment_code(&mut a, TENANT, AGENT).await;
        crate::logs::secret(DEVICE_PASSWORD);
        let mut device = (options.device)(&dovecot);
        device.tenant = TENANT.into();
        device.name = DEVICE.into();
        device.agent = AGENT.into();
        if device.sender_mode == 0 {
            device.sender_mode = pb::SenderMode::FixedAdmin as i32;
            device.admin_mailbox = MAILBOX.into();
        }
        if device.ingress.is_none() {
            device.ingress = Some(pb::IngressCredentials {
                username: DEVICE_USER.into(),
                password: DEVICE_PASSWORD.into(),
                ..Default::default()
            });
        }
        must(
            "create device",
            a.create_device(pb::CreateDeviceRequest {
                device: Some(device),
            })
            .await
            .map(|_| ()),
        );

        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let state = dir.path().join("agent");
        let code_file = dir.path().join("code");
        std::fs::write(&code_file, &code).unwrap_or_else(|e| panic!("code file: {e}"));
        let binary = tokio::task::spawn_blocking(agent_binary)
            .await
            .unwrap_or_else(|e| panic!("building the agent: {e}"));
        let out = tokio::process::Command::new(binary)
            .args(["enroll", "--broker", &broker.grpc_url(), "--code-file"])
            .arg(&code_file)
            .arg("--ca-file")
            .arg(broker.tls_ca_file())
            .env("TOKENFLEET_AGENT_STATE_DIR", &state)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running enroll: {e}"));
        assert!(
            out.status.success(),
            "enroll: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Ok(pem) = std::fs::read_to_string(state.join("agent.key")) {
            crate::logs::secret(&pem);
        }
        let [smtp, pop3, metrics] = match crate::ports::free_ports::<3>() {
            Ok(ports) => ports.map(|port| SocketAddr::from(([127, 0, 0, 1], port))),
            Err(e) => panic!("no free loopback ports: {e:#}"),
        };
        let log = crate::logs::log_dir().join(format!(
            "agent-site-{}-{}.log",
            std::process::id(),
            NEXT_SITE.fetch_add(1, Ordering::SeqCst)
        ));
        let config = format!(
            "state_dir = {state:?}\nsmtp_listen = \"{smtp}\"\npop3_listen = \"{pop3}\"\n\
             metrics.listen = \"{metrics}\"\n\
             retry_base_seconds = 1\nretry_max_seconds = 3\nheartbeat_seconds = {}\n\
             shutdown_grace_seconds = 5\n{}",
            options.heartbeat_seconds, options.agent_config
        );
        std::fs::write(dir.path().join("agent.toml"), config)
            .unwrap_or_else(|e| panic!("agent.toml: {e}"));
        let mut site = Self {
            fake,
            broker: Some(broker),
            dovecot,
            dir,
            state,
            smtp,
            pop3,
            metrics,
            log,
            child: None,
            runs: 0,
            log_filter: options.log_filter,
        };
        site.start_agent().await;
        site
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts `tokenfleet-agent run` and waits until it applied its configuration and listens.
    pub async fn start_agent(&mut self) {
        self.runs += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("agent log {}: {e}", self.log.display()));
        let mut child = Command::new(agent_binary())
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .env("RUST_LOG", &self.log_filter)
            .env_remove("TOKENFLEET_AGENT_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting the agent: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the agent exited with {status}:\n{}", self.log_text());
            }
            let applied = self
                .log_text()
                .matches("agent configuration applied")
                .count()
                >= self.runs;
            if applied && TcpStream::connect(self.smtp).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not apply its configuration and listen within 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.child = Some(child);
    }

    /// Freezes (`true`: SIGSTOP) or resumes (`false`: SIGCONT) the running agent process.
    pub fn freeze_agent(&self, frozen: bool) {
        if let Some(child) = &self.child {
            let signal = if frozen { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    /// Process id of the running agent, if any (benchmarks read its `/proc/<pid>/status`).
    pub fn agent_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the agent with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .unwrap_or_else(|e| panic!("killing the agent: {e}"));
            child
                .wait()
                .unwrap_or_else(|e| panic!("reaping the agent: {e}"));
        }
    }

    /// Stops the agent with SIGTERM and returns its exit code (`None` if it was not running or
    /// died of a signal).
    pub fn stop_agent(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for the agent to stop: {e}"))
            .code()
    }

    /// Starts the printer (Python `smtplib`, a new connection per message, each retried for
    /// up to 90 s until acknowledged, message `i` carrying `X-Seq: i`): `count` messages to
    /// [`ADDRESS`] through the agent's SMTP ingress, logging in as [`DEVICE_USER`] with
    /// `password`, each with `attachment` if given.
    pub fn start_printer(
        &self,
        password: &str,
        count: usize,
        attachment: Option<&Path>,
    ) -> PrinterRun {
        self.start_printer_from(password, 0, count, attachment)
    }

    /// [`AgentSite::start_printer`] numbering the messages from `first` (`X-Seq: first` …), so
    /// several runs send distinguishable messages.
    pub fn start_printer_from(
        &self,
        password: &str,
        first: usize,
        count: usize,
        attachment: Option<&Path>,
    ) -> PrinterRun {
        static NEXT_RUN: AtomicUsize = AtomicUsize::new(0);
        let out_dir = self.dir.path().join(format!(
            "printed-{}",
            NEXT_RUN.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("{}: {e}", out_dir.display()));
        let script = self.dir.path().join("printer.py");
        std::fs::write(&script, PRINTER_PY).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        let child = tokio::process::Command::new("python3")
            .arg(&script)
            .arg(self.smtp.port().to_string())
            .arg(DEVICE_USER)
            .arg(password)
            .arg(ADDRESS)
            .arg(count.to_string())
            .arg(&out_dir)
            .arg(attachment.map_or_else(String::new, |p| p.display().to_string()))
            .arg(first.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting python3 (the printer): {e}"));
        PrinterRun {
            child,
            out_dir,
            first,
            count,
            agent_log: self.log.clone(),
        }
    }

    /// Prints `count` messages with the device's password and waits until the agent
    /// acknowledged them all; returns the raw messages sent.
    pub async fn print(&self, count: usize, attachment: Option<&Path>) -> Vec<Vec<u8>> {
        self.start_printer(DEVICE_PASSWORD, count, attachment)
            .finish()
            .await
    }

    /// A POP3 session at Dovecot, logged in to [`ADDRESS`] with a token of its own
    /// ([`AgentSite::reader_token`]): what arrived upstream.
    pub async fn upstream_pop3(&self) -> Pop3Session {
        let token = self.reader_token().await;
        Pop3Session::login_xoauth2(self.dovecot.pop3_addr(), ADDRESS, &token).await
    }

    /// How many messages are in the mailbox at Dovecot.
    pub async fn upstream_count(&self) -> usize {
        let mut pop = self.upstream_pop3().await;
        let n = pop.count().await;
        pop.quit().await;
        n
    }

    /// The broker (panics once [`AgentSite::stop_broker`] stopped it).
    pub fn broker(&self) -> &TestBroker {
        match &self.broker {
            Some(broker) => broker,
            None => panic!("the site's broker was stopped"),
        }
    }

    /// Stops the broker for good (the agent keeps running on what it cached).
    pub async fn stop_broker(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }

    /// An Admin client (fleet admin).
    pub fn admin(&self) -> TestAdminClient {
        self.broker().admin_client()
    }

    /// The device as the broker has it.
    pub async fn device(&self) -> pb::Device {
        match self
            .admin()
            .get_device(pb::GetDeviceRequest {
                tenant: TENANT.into(),
                name: DEVICE.into(),
            })
            .await
        {
            Ok(d) => d.into_inner(),
            Err(status) => panic!("get device: {status:?}"),
        }
    }

    /// Changes the device with `change` and waits until the agent applied the new
    /// configuration (the broker pushes ReloadConfig). The ingress password is write-only on the
    /// wire: `change` sees [`DEVICE_PASSWORD`] and may set another.
    pub async fn update_device(&self, change: impl FnOnce(&mut pb::Device)) {
        let before = self
            .log_text()
            .matches("agent configuration applied")
            .count();
        let mut device = self.device().await;
        if let Some(ingress) = device.ingress.as_mut() {
            ingress.password = DEVICE_PASSWORD.into();
        }
        change(&mut device);
        if let Err(status) = self
            .admin()
            .update_device(pb::UpdateDeviceRequest {
                device: Some(device),
                update_mask: None,
            })
            .await
        {
            panic!("update device: {status:?}");
        }
        eventually(
            "the agent to apply the changed device",
            Duration::from_secs(30),
            || async {
                (self
                    .log_text()
                    .matches("agent configuration applied")
                    .count()
                    > before)
                    .then_some(())
            },
        )
        .await;
    }

    /// The device's fleet status at the broker (`None` if the broker does not answer or was
    /// stopped).
    pub async fn fleet_status(&self) -> Option<pb::FleetDeviceStatus> {
        let answer = self
            .broker
            .as_ref()?
            .admin_client()
            .get_fleet_status(pb::GetFleetStatusRequest {
                tenant: TENANT.into(),
            })
            .await
            .ok()?
            .into_inner();
        answer.devices.into_iter().find(|d| d.device == DEVICE)
    }

    /// An app-only token for [`ADDRESS`] straight from the fake (to read the mailbox upstream).
    pub async fn reader_token(&self) -> String {
        client_credentials_token(&self.fake, ENTRA, CLIENT_ID, CLIENT_SECRET).await
    }

    /// Runs the real `tokenfleetctl` with `args` against the site's broker (fleet-admin key,
    /// the broker's CA); returns (exit code, stdout, stderr).
    pub async fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        self.broker().ctl(args).await
    }
}
