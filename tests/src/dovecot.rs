//! A real Dovecot 2.3 (IMAP, POP3, submission, LMTP) for mail tests, validating XOAUTH2 and
//! OAUTHBEARER tokens by RFC 7662 introspection at the fake identity provider — for the mail
//! protocols' audiences only ([`MAIL_AUDIENCES`]), so a Microsoft Graph token is refused.
//!
//! [`Dovecot::start`] writes its own `dovecot.conf` in a temporary directory (base, state, log
//! and mail all inside it), runs `dovecot -F -c <conf>` with listeners on free 127.0.0.1 ports and
//! kills it when dropped (also when the test panics). Submission relays to a small SMTP→LMTP
//! bridge inside the test kit (Dovecot cannot relay straight to its own LMTP), so a message sent
//! through submission can be read back over POP3 or IMAP. `scripts/test-setup.sh` installs the
//! Debian packages.
//!
//! Plain text by default. [`Dovecot::start_with`] adds [`DovecotFeatures`]: the SASL mechanisms
//! offered, and TLS ([`DovecotTls`]: `ssl = yes` with a given certificate, STARTTLS/STLS on the
//! plain listeners and implicit-TLS listeners for IMAPS, POP3S and submission). Failed logins answer without Dovecot's 2 s `auth_failure_delay` and
//! without the anvil penalty, but still cost about 0.5 s each. Run as root, mail processes use the
//! `dovecot` user; run unprivileged, every process runs as the current user (no chroots).

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::ports::free_ports;

const DOVECOT_BIN: &str = "dovecot";
const START_DEADLINE: Duration = Duration::from_secs(20);
const IO_DEADLINE: Duration = Duration::from_secs(20);
/// Attempts at finding ports that are still free when Dovecot binds them.
const PORT_ATTEMPTS: usize = 5;

/// What the Dovecot under test is configured with.
#[derive(Debug, Clone, Default)]
pub struct DovecotOptions {
    /// RFC 7662 endpoint the `oauth2` passdb posts tokens to (`introspection_mode = post`), for
    /// example [`crate::fake_idp::FakeIdp::introspection_url`]. Must be a loopback `http://` URL.
    pub introspection_url: String,
}

/// What [`Dovecot::start_with`] adds to [`DovecotOptions`] (a separate struct so that existing
/// `DovecotOptions { .. }` literals stay valid). The default adds nothing.
#[derive(Debug, Clone, Default)]
pub struct DovecotFeatures {
    /// `auth_mechanisms` (space separated, e.g. `oauthbearer`); `None` = `xoauth2 oauthbearer`.
    pub auth_mechanisms: Option<String>,
    /// Serve TLS with this certificate; `None` = no TLS at all (`ssl = no`).
    pub tls: Option<DovecotTls>,
}

/// TLS for the Dovecot under test.
#[derive(Clone)]
pub struct DovecotTls {
    /// Server certificate chain, PEM (leaf first).
    pub cert_pem: String,
    /// The certificate's private key, PEM.
    pub key_pem: String,
    /// `ssl_min_protocol`, e.g. `TLSv1.3`; `None` = Dovecot's default (TLSv1.2).
    pub min_protocol: Option<String>,
}

impl std::fmt::Debug for DovecotTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DovecotTls")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"[redacted]")
            .field("min_protocol", &self.min_protocol)
            .finish()
    }
}

/// The running Dovecot. Stops (and its temporary directory goes) when dropped.
#[derive(Debug)]
pub struct Dovecot {
    dir: TempDir,
    child: Option<Child>,
    imap: SocketAddr,
    pop3: SocketAddr,
    submission: SocketAddr,
    lmtp: SocketAddr,
    relay: SocketAddr,
    /// Implicit-TLS listeners (only with [`DovecotFeatures::tls`]).
    imaps: Option<SocketAddr>,
    pop3s: Option<SocketAddr>,
    submissions: Option<SocketAddr>,
    features: DovecotFeatures,
    bridge: JoinHandle<()>,
    /// Where the bridge delivers: this launch's LMTP listener.
    bridge_target: Arc<Mutex<SocketAddr>>,
}

/// The uid/gid that owns the mail homes, and (when not root) the user Dovecot runs its
/// internal and login processes as.
struct MailOwner {
    uid: u32,
    gid: u32,
    /// `Some(name)` when running unprivileged: every Dovecot process runs as this user.
    unprivileged_user: Option<String>,
    /// The name of `gid` (used when running unprivileged).
    group_name: Option<String>,
}

fn missing_binary() -> anyhow::Error {
    anyhow!(
        "`{DOVECOT_BIN}` was not found on PATH: the mail tests need Dovecot 2.3 (dovecot-core, \
         dovecot-imapd, dovecot-pop3d, dovecot-submissiond, dovecot-lmtpd); run \
         scripts/test-setup.sh to install the test dependencies"
    )
}

/// `(uid, gid)` of `user` from `/etc/passwd`.
fn passwd_entry_by_name(user: &str) -> Result<Option<(u32, u32)>> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == user {
            let uid = f[2].parse().context("uid in /etc/passwd")?;
            let gid = f[3].parse().context("gid in /etc/passwd")?;
            return Ok(Some((uid, gid)));
        }
    }
    Ok(None)
}

/// The name of `uid` from `/etc/passwd`.
fn passwd_name_by_uid(uid: u32) -> Result<Option<String>> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    Ok(passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_owned())
    }))
}

/// The name of `gid` from `/etc/group`.
fn group_name_by_gid(gid: u32) -> Result<Option<String>> {
    let groups = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    Ok(groups.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(gid)).then(|| f[0].to_owned())
    }))
}

fn mail_owner() -> Result<MailOwner> {
    // The owner of /proc/self is this process's effective uid/gid.
    let me = std::fs::metadata("/proc/self").context("reading /proc/self")?;
    if me.uid() == 0 {
        let (uid, gid) = passwd_entry_by_name("dovecot")?.ok_or_else(|| {
            anyhow!(
                "there is no `dovecot` user: install the Dovecot packages with \
                 scripts/test-setup.sh"
            )
        })?;
        Ok(MailOwner {
            uid,
            gid,
            unprivileged_user: None,
            group_name: None,
        })
    } else {
        let name = passwd_name_by_uid(me.uid())?
            .ok_or_else(|| anyhow!("uid {} has no /etc/passwd entry", me.uid()))?;
        Ok(MailOwner {
            uid: me.uid(),
            gid: me.gid(),
            unprivileged_user: Some(name),
            group_name: group_name_by_gid(me.gid())?,
        })
    }
}

/// Ports of one launch attempt.
struct Ports {
    imap: u16,
    pop3: u16,
    submission: u16,
    lmtp: u16,
    /// Implicit-TLS ports; 0 = no listener.
    imaps: u16,
    pop3s: u16,
    submissions: u16,
}

fn config(
    dir: &Path,
    owner: &MailOwner,
    ports: &Ports,
    relay: SocketAddr,
    features: &DovecotFeatures,
) -> String {
    let d = dir.display();
    let uid = owner.uid;
    let gid = owner.gid;
    let (imap, pop3, submission, lmtp) = (ports.imap, ports.pop3, ports.submission, ports.lmtp);
    let relay_port = relay.port();
    let (imaps, pop3s) = (ports.imaps, ports.pop3s);
    let mechanisms = features
        .auth_mechanisms
        .as_deref()
        .unwrap_or("xoauth2 oauthbearer");
    let ssl = match &features.tls {
        None => "ssl = no".to_owned(),
        Some(tls) => {
            let mut lines =
                format!("ssl = yes\nssl_cert = <{d}/tls-cert.pem\nssl_key = <{d}/tls-key.pem");
            if let Some(min) = &tls.min_protocol {
                lines.push_str(&format!("\nssl_min_protocol = {min}"));
            }
            lines
        }
    };
    let submissions = if ports.submissions == 0 {
        String::new()
    } else {
        format!(
            "  inet_listener submissions {{\n    address = 127.0.0.1\n    port = {}\n    ssl = yes\n  }}\n",
            ports.submissions
        )
    };
    let tls_listener = |name: &str, port: u16| {
        if port == 0 {
            format!("  inet_listener {name} {{\n    port = 0\n  }}")
        } else {
            format!(
                "  inet_listener {name} {{\n    address = 127.0.0.1\n    port = {port}\n    ssl = yes\n  }}"
            )
        }
    };
    let imaps_listener = tls_listener("imaps", imaps);
    let pop3s_listener = tls_listener("pop3s", pop3s);
    let unprivileged = match &owner.unprivileged_user {
        Some(user) => {
            let mut lines =
                format!("default_internal_user = {user}\ndefault_login_user = {user}\n");
            if let Some(group) = &owner.group_name {
                lines.push_str(&format!("default_internal_group = {group}\n"));
            }
            lines
        }
        None => String::new(),
    };
    format!(
        r#"# Written by tokenfleet-testkit for one test; not a production configuration.
protocols = imap pop3 submission lmtp
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_verbose = yes
# Failed logins answer at once (default 2 s), so failure tests stay fast.
auth_failure_delay = 0
hostname = tokenfleet-test
postmaster_address = postmaster@tokenfleet.test
mail_location = maildir:{d}/home/%u/Maildir
first_valid_uid = 1
first_valid_gid = 1
{unprivileged}
passdb {{
  driver = oauth2
  args = {d}/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={d}/home/%u allow_all_users=yes
}}

# No chroot anywhere: a chroot needs root, and these run unprivileged too.
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
{imaps_listener}
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
{pop3s_listener}
}}
service submission-login {{
  chroot =
  inet_listener submission {{
    address = 127.0.0.1
    port = {submission}
  }}
{submissions}}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
}}
# No 4 s penalty after failed logins (each failure still costs ~0.5 s).
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}
submission_relay_trusted = yes
"#
    )
}

/// The audiences (`aud`) Dovecot accepts, as a mail server for Exchange Online and Gmail: the
/// mail protocols' resources. A token for Microsoft Graph (or any other API) is refused at login,
/// as Exchange Online refuses it (`535 5.7.3`). Dovecot names them to the identity provider's
/// introspection as a resource server (`?audience=…`), which answers `active: false` otherwise.
pub const MAIL_AUDIENCES: [&str; 3] = [
    "https://outlook.office.com",
    "https://outlook.office365.com",
    "https://mail.google.com",
];

fn oauth2_args(options: &DovecotOptions) -> String {
    let audiences: Vec<String> = MAIL_AUDIENCES
        .iter()
        .map(|a| format!("audience={a}"))
        .collect();
    format!(
        "introspection_mode = post\n\
         introspection_url = {}?{}\n\
         username_attribute = username\n\
         active_attribute = active\n\
         active_value = true\n",
        options.introspection_url,
        audiences.join("&")
    )
}

fn validate(options: &DovecotOptions) -> Result<()> {
    let url = &options.introspection_url;
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("DovecotOptions.introspection_url must be an http:// loopback URL, got {url:?}");
    };
    if !rest.starts_with("127.0.0.1:") || url.chars().any(char::is_whitespace) {
        bail!("DovecotOptions.introspection_url must point at 127.0.0.1, got {url:?}");
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Dovecot {
    /// Starts Dovecot and the SMTP→LMTP bridge; returns once IMAP, POP3, submission and LMTP
    /// all answer their greetings.
    pub async fn start(options: DovecotOptions) -> Result<Self> {
        Self::start_with(options, DovecotFeatures::default()).await
    }

    /// [`Dovecot::start`] with `features` (mechanisms, TLS). With TLS, the implicit-TLS
    /// listeners are bound too ([`Dovecot::imaps_addr`], [`Dovecot::pop3s_addr`],
    /// [`Dovecot::submissions_addr`]) and the plain ones offer STARTTLS/STLS.
    pub async fn start_with(options: DovecotOptions, features: DovecotFeatures) -> Result<Self> {
        validate(&options)?;
        let owner = mail_owner()?;
        let dir = tempfile::Builder::new()
            .prefix("tf-dovecot-")
            .tempdir()
            .context("creating Dovecot's temporary directory")?;
        // Mail processes run as the mail owner and must reach the homes below.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .context("chmod 755 Dovecot's temporary directory")?;
        let home = dir.path().join("home");
        std::fs::create_dir(&home).context("creating the mail home directory")?;
        std::os::unix::fs::chown(&home, Some(owner.uid), Some(owner.gid))
            .with_context(|| format!("chown {} to uid {}", home.display(), owner.uid))?;
        std::fs::write(
            dir.path().join("dovecot-oauth2.conf.ext"),
            oauth2_args(&options),
        )
        .context("writing the oauth2 passdb args file")?;
        if let Some(tls) = &features.tls {
            std::fs::write(dir.path().join("tls-cert.pem"), &tls.cert_pem)
                .context("writing Dovecot's TLS certificate")?;
            let key = dir.path().join("tls-key.pem");
            std::fs::write(&key, &tls.key_pem).context("writing Dovecot's TLS key")?;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .context("chmod 600 Dovecot's TLS key")?;
        }

        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the SMTP→LMTP bridge on 127.0.0.1:0")?;
        let relay = listener.local_addr()?;
        // Placeholders until `launch` sets this attempt's ports.
        let lmtp = relay;
        let bridge_target = Arc::new(Mutex::new(lmtp));
        let bridge = tokio::spawn(bridge::serve(listener, bridge_target.clone()));
        let mut me = Self {
            dir,
            child: None,
            imap: lmtp,
            pop3: lmtp,
            submission: lmtp,
            lmtp,
            relay,
            imaps: None,
            pop3s: None,
            submissions: None,
            features,
            bridge,
            bridge_target,
        };
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            // All ports of one attempt come from one call, so they are distinct.
            let [imap, pop3, submission, lmtp, imaps, pop3s, submissions] = free_ports::<7>()?;
            let tls = me.features.tls.is_some();
            let ports = Ports {
                imap,
                pop3,
                submission,
                lmtp,
                imaps: if tls { imaps } else { 0 },
                pop3s: if tls { pop3s } else { 0 },
                submissions: if tls { submissions } else { 0 },
            };
            match me.launch(&owner, &ports).await {
                Ok(()) => return Ok(me),
                Err(e) if me.lost_port_race() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no launch attempted"))
            .context(format!(
                "Dovecot lost the race for free ports {PORT_ATTEMPTS} times"
            )))
    }

    async fn launch(&mut self, owner: &MailOwner, ports: &Ports) -> Result<()> {
        self.kill();
        let _ = std::fs::remove_file(self.log_path());
        let _ = std::fs::remove_file(self.stderr_path());
        let lmtp = SocketAddr::from(([127, 0, 0, 1], ports.lmtp));
        // The bridge must deliver to this launch's LMTP port.
        *self
            .bridge_target
            .lock()
            .map_err(|_| anyhow!("bridge target lock poisoned"))? = lmtp;
        self.lmtp = lmtp;
        self.imap = SocketAddr::from(([127, 0, 0, 1], ports.imap));
        self.pop3 = SocketAddr::from(([127, 0, 0, 1], ports.pop3));
        self.submission = SocketAddr::from(([127, 0, 0, 1], ports.submission));
        let tls_addr = |port: u16| (port != 0).then(|| SocketAddr::from(([127, 0, 0, 1], port)));
        self.imaps = tls_addr(ports.imaps);
        self.pop3s = tls_addr(ports.pop3s);
        self.submissions = tls_addr(ports.submissions);

        let conf = self.dir.path().join("dovecot.conf");
        std::fs::write(
            &conf,
            config(self.dir.path(), owner, ports, self.relay, &self.features),
        )
        .context("writing dovecot.conf")?;
        let stderr =
            std::fs::File::create(self.stderr_path()).context("creating dovecot.stderr")?;
        let child = Command::new(DOVECOT_BIN)
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    missing_binary()
                } else {
                    anyhow!(e).context("starting dovecot")
                }
            })?;
        self.child = Some(child);

        let end = Instant::now() + START_DEADLINE;
        let checks = [
            ("IMAP", self.imap, "* OK"),
            ("POP3", self.pop3, "+OK"),
            ("submission", self.submission, "220 "),
            ("LMTP", self.lmtp, "220 "),
        ];
        for (what, addr, expect) in checks {
            loop {
                if let Some(c) = self.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    self.child = None;
                    bail!(
                        "dovecot exited with {status} (config rejected?); stderr:\n{}\nlog:\n{}",
                        tail(&self.stderr_path(), 20),
                        tail(&self.log_path(), 20)
                    );
                }
                match greeting(addr).await {
                    Ok(line) if line.starts_with(expect) => break,
                    Ok(line) => {
                        self.kill();
                        bail!(
                            "Dovecot {what} on {addr} greeted with {line:?}, expected {expect:?}"
                        );
                    }
                    Err(_) if Instant::now() < end => {
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    Err(e) => {
                        self.kill();
                        return Err(e.context(format!(
                            "Dovecot {what} on {addr} did not greet within {START_DEADLINE:?}; \
                             stderr:\n{}\nlog:\n{}",
                            tail(&self.stderr_path(), 20),
                            tail(&self.log_path(), 20)
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn lost_port_race(&self) -> bool {
        let log = format!(
            "{}{}",
            std::fs::read_to_string(self.log_path()).unwrap_or_default(),
            std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
        );
        // A port taken by another process between choosing and binding.
        log.contains("Address already in use")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("dovecot.log")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("dovecot.stderr")
    }

    /// IMAP listener (no TLS).
    pub fn imap_addr(&self) -> SocketAddr {
        self.imap
    }

    /// POP3 listener (no TLS).
    pub fn pop3_addr(&self) -> SocketAddr {
        self.pop3
    }

    /// Submission (SMTP with AUTH) listener (no TLS); it relays to the SMTP→LMTP bridge.
    pub fn submission_addr(&self) -> SocketAddr {
        self.submission
    }

    /// IMAPS listener (implicit TLS); `None` without [`DovecotFeatures::tls`].
    pub fn imaps_addr(&self) -> Option<SocketAddr> {
        self.imaps
    }

    /// POP3S listener (implicit TLS); `None` without [`DovecotFeatures::tls`].
    pub fn pop3s_addr(&self) -> Option<SocketAddr> {
        self.pop3s
    }

    /// Submission over implicit TLS (the port-465 style); `None` without
    /// [`DovecotFeatures::tls`]. With TLS the plain [`Dovecot::submission_addr`] offers
    /// STARTTLS.
    pub fn submissions_addr(&self) -> Option<SocketAddr> {
        self.submissions
    }

    /// Dovecot's LMTP listener.
    pub fn lmtp_addr(&self) -> SocketAddr {
        self.lmtp
    }

    /// The SMTP→LMTP bridge submission relays to.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }

    /// Delivers `raw_message` (CRLF line ends; LF is converted) to `to`'s INBOX over LMTP.
    /// Dovecot adds `Return-Path`, `Delivered-To` and `Received` headers on top.
    pub async fn deliver(&self, to: &str, raw_message: &[u8]) -> Result<()> {
        let data = bridge::dot_stuff(raw_message);
        bridge::lmtp_deliver(
            self.lmtp,
            "MAIL FROM:<test@tokenfleet.test>",
            &[format!("RCPT TO:<{to}>")],
            &data,
        )
        .await
        .map_err(|e| anyhow!("LMTP delivery to {to}: {e}"))
    }

    /// The Dovecot log (and anything it wrote to stderr), for failure messages.
    pub fn log(&self) -> String {
        let mut out = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
        if !stderr.is_empty() {
            out.push_str("--- stderr ---\n");
            out.push_str(&stderr);
        }
        out
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.kill();
        self.bridge.abort();
    }
}

/// Reads the first line a server sends.
async fn greeting(addr: SocketAddr) -> Result<String> {
    let read = async {
        let stream = TcpStream::connect(addr).await?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        if line.is_empty() {
            bail!("connection closed before the greeting");
        }
        Ok(line.trim_end().to_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| anyhow!("no greeting from {addr} within 2 s"))?
}

/// Just enough SMTP (server side) and LMTP (client side) to carry what Dovecot's submission
/// service relays into Dovecot's LMTP.
mod bridge {
    use super::*;

    type Lines = BufReader<TcpStream>;

    /// Accepts SMTP connections until aborted.
    pub(super) async fn serve(listener: TcpListener, target: Arc<Mutex<SocketAddr>>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(lmtp) = target.lock().map(|t| *t) else {
                return;
            };
            tokio::spawn(async move {
                if let Err(e) = session(stream, lmtp).await {
                    tracing::warn!(error = %e, "SMTP→LMTP bridge session failed");
                }
            });
        }
    }

    async fn read_line(r: &mut Lines, buf: &mut Vec<u8>) -> Result<bool> {
        buf.clear();
        let n = tokio::time::timeout(IO_DEADLINE, r.read_until(b'\n', buf))
            .await
            .map_err(|_| anyhow!("read timed out"))??;
        Ok(n > 0)
    }

    async fn session(stream: TcpStream, lmtp: SocketAddr) -> Result<()> {
        let mut r = BufReader::new(stream);
        r.get_mut()
            .write_all(b"220 tokenfleet-bridge ESMTP\r\n")
            .await?;
        let mut mail: Option<String> = None;
        let mut rcpts: Vec<String> = Vec::new();
        let mut line = Vec::new();
        while read_line(&mut r, &mut line).await? {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            let verb = text
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            let reply: String = match verb.as_str() {
                "EHLO" => "250-tokenfleet-bridge\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES".into(),
                "HELO" => "250 tokenfleet-bridge".into(),
                "MAIL" => {
                    mail = Some(text);
                    rcpts.clear();
                    "250 2.1.0 OK".into()
                }
                "RCPT" if mail.is_some() => {
                    rcpts.push(text);
                    "250 2.1.5 OK".into()
                }
                "RCPT" => "503 5.5.1 MAIL first".into(),
                "DATA" if rcpts.is_empty() => "554 5.5.1 no valid recipients".into(),
                "DATA" => {
                    r.get_mut().write_all(b"354 go ahead\r\n").await?;
                    let mut data = Vec::new();
                    loop {
                        if !read_line(&mut r, &mut line).await? {
                            bail!("connection closed inside DATA");
                        }
                        if line == b".\r\n" || line == b".\n" {
                            break;
                        }
                        data.extend_from_slice(&line);
                    }
                    let from = mail.take().unwrap_or_default();
                    let to = std::mem::take(&mut rcpts);
                    match lmtp_deliver(lmtp, &from, &to, &data).await {
                        Ok(()) => "250 2.0.0 delivered over LMTP".into(),
                        Err(e) => {
                            tracing::warn!(error = %e, "SMTP→LMTP bridge: LMTP refused a message");
                            format!("451 4.3.0 LMTP refused: {}", e.replace(['\r', '\n'], " "))
                        }
                    }
                }
                "RSET" => {
                    mail = None;
                    rcpts.clear();
                    "250 2.0.0 OK".into()
                }
                "NOOP" => "250 2.0.0 OK".into(),
                "QUIT" => {
                    r.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
                    return Ok(());
                }
                _ => "502 5.5.2 command not implemented".into(),
            };
            r.get_mut()
                .write_all(format!("{reply}\r\n").as_bytes())
                .await?;
        }
        Ok(())
    }

    /// Reads one (possibly multi-line) SMTP/LMTP reply.
    async fn reply(r: &mut Lines) -> Result<String> {
        let mut all = String::new();
        let mut line = Vec::new();
        loop {
            if !read_line(r, &mut line).await? {
                bail!("LMTP closed the connection (so far: {all:?})");
            }
            let text = String::from_utf8_lossy(&line);
            all.push_str(&text);
            if text.len() < 4 || text.as_bytes()[3] != b'-' {
                return Ok(all.trim_end().to_owned());
            }
        }
    }

    async fn expect(r: &mut Lines, code: char, what: &str) -> std::result::Result<(), String> {
        let got = reply(r).await.map_err(|e| format!("{what}: {e}"))?;
        if got.starts_with(code) {
            Ok(())
        } else {
            Err(format!("{what}: {got}"))
        }
    }

    /// `data` is the dot-stuffed message without the final `.` line.
    pub(super) async fn lmtp_deliver(
        lmtp: SocketAddr,
        mail_from: &str,
        rcpt_to: &[String],
        data: &[u8],
    ) -> std::result::Result<(), String> {
        let stream = TcpStream::connect(lmtp)
            .await
            .map_err(|e| format!("connecting to LMTP {lmtp}: {e}"))?;
        let mut r = BufReader::new(stream);
        let io = |e: std::io::Error| format!("LMTP write: {e}");
        expect(&mut r, '2', "LMTP greeting").await?;
        r.get_mut()
            .write_all(b"LHLO tokenfleet-bridge\r\n")
            .await
            .map_err(io)?;
        expect(&mut r, '2', "LHLO").await?;
        r.get_mut()
            .write_all(format!("{mail_from}\r\n").as_bytes())
            .await
            .map_err(io)?;
        expect(&mut r, '2', mail_from).await?;
        for rcpt in rcpt_to {
            r.get_mut()
                .write_all(format!("{rcpt}\r\n").as_bytes())
                .await
                .map_err(io)?;
            expect(&mut r, '2', rcpt).await?;
        }
        r.get_mut().write_all(b"DATA\r\n").await.map_err(io)?;
        expect(&mut r, '3', "DATA").await?;
        r.get_mut().write_all(data).await.map_err(io)?;
        if !data.is_empty() && !data.ends_with(b"\n") {
            r.get_mut().write_all(b"\r\n").await.map_err(io)?;
        }
        r.get_mut().write_all(b".\r\n").await.map_err(io)?;
        // LMTP answers once per recipient.
        for rcpt in rcpt_to {
            expect(&mut r, '2', &format!("delivery ({rcpt})")).await?;
        }
        let _ = r.get_mut().write_all(b"QUIT\r\n").await;
        Ok(())
    }

    /// CRLF line ends and a leading `.` doubled on every line (RFC 5321 §4.5.2).
    pub(super) fn dot_stuff(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut at_line_start = true;
        let mut prev = 0u8;
        for &b in raw {
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            if b == b'\n' && prev != b'\r' {
                out.push(b'\r');
            }
            out.push(b);
            at_line_start = b == b'\n';
            prev = b;
        }
        out
    }
}
