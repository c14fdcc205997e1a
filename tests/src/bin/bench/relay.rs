//! Relay benchmark (issue 15, target 2): scans from printers that open one SMTP session per
//! message and log in with `AUTH PLAIN` every time, relayed by three implementations to the same
//! STARTTLS upstream in the same run:
//!
//! * `tokenfleet`: the real `tokenfleet-agent run` executable, enrolled at a TLS broker (the
//!   end-to-end suites' [`AgentSite`]), its device sending as an app-only mailbox whose token
//!   comes from the fake identity provider, over STARTTLS + XOAUTH2;
//! * `postfix`: Debian's Postfix as a store-and-forward relay — its own instance (`postfix -c DIR
//!   start`, own config dir and queue, `inet_interfaces = loopback-only`, no system service),
//!   Cyrus SASL `AUTH PLAIN` from a sasldb file for the printers, relaying with STARTTLS and
//!   `AUTH PLAIN` to the upstream; Debian's defaults otherwise, except `smtpd_peername_lookup =
//!   no` (the printers' loopback addresses have no names: a reverse lookup would only wait for a
//!   resolver that is not there);
//! * `emailproxy` (PyPI, `--no-gui`): an account with the client-credentials flow at the same
//!   fake identity provider, STARTTLS + XOAUTH2 upstream.
//!
//! Not part of any test suite. Install the baselines once with `scripts/bench-setup.sh`, build
//! the agent in release and run (the broker and the bench itself may stay in the dev profile:
//! the broker only hands out a token now and then, and this client is not the bottleneck):
//!
//! ```text
//! bash scripts/bench-setup.sh
//! cargo build --release -p tokenfleet-agent --bin tokenfleet-agent
//! TOKENFLEET_TEST_AGENT_BINARY=$PWD/target/release/tokenfleet-agent \
//!   cargo run -p tokenfleet-testkit --bin bench -- relay
//! # one scenario, one implementation, and a perf profile of the agent during its runs:
//! ... --bin bench -- relay --scenarios 1MiB-auth --impls tokenfleet,postfix --perf-dir /tmp/prof
//! ```
//!
//! The upstream is a sink in this process: STARTTLS (a certificate from a CA of the run, which
//! every relay is told to trust), then `AUTH XOAUTH2` (validated by RFC 7662 introspection at the
//! fake identity provider, like the test kit's Dovecot; a refused token gets the error challenge
//! and `535 5.7.3`) or `AUTH PLAIN` with the Postfix relay's own account; `PIPELINING`, `SIZE`,
//! `8BITMIME`, `RSET`. It counts every message by its `X-Bench-Id` header: a message counts once
//! when its `250` is sent after the end of `DATA`; one seen twice is a duplicate.
//!
//! The load: `--concurrency` printers (each from its own loopback address 127.0.1.x, as printers
//! on a LAN are), each looping: connect, `EHLO`, `AUTH PLAIN`, `MAIL`, `RCPT`, `DATA` with one
//! message (`1MiB-auth`: a 1 MiB scan, a base64 attachment; `1KiB-auth`: a 1 KiB note), `QUIT` —
//! until `--messages-1mib` / `--messages-1kib` messages were acknowledged with `250`. A `4xx`
//! reply makes the printer try that message again (counted).
//!
//! Figures, one `key=value` line each: `msgs_per_s` is the end-to-end rate: messages divided by
//! the time from the start of the load until the sink holds every one of them; `accept_per_s` is
//! the rate of `250`s at the relay; `pss_mib` the relay's peak proportional set size during the
//! run (`Pss` of `/proc/PID/smaps_rollup`, sampled every 50 ms, summed over the relay's
//! processes: the agent; Postfix's master and all its children; emailproxy's Python process).
//! Then one line per baseline with `ratio` (tokenfleet's rate over the baseline's), the target,
//! the PSS ratio against Postfix (target ≤ 1/3) and the documented ceiling (`--ceiling-mib`,
//! README "Relay benchmark"). The process exits non-zero when a message was lost or duplicated,
//! a run timed out, or (with `--enforce`) a target or the ceiling was missed.
//!
//! `--perf-dir DIR`: `perf record -g -p <agent pid>` runs during each tokenfleet run and writes
//! `DIR/perf-<scenario>.data` (read it with `perf report -i …`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Parser;
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::agent_site::{
    ADDRESS, AgentSite, CLIENT_ID, CLIENT_SECRET, DEVICE_PASSWORD, DEVICE_USER, ENTRA, SiteOptions,
    TestPki,
};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Longest wait for any one reply.
const IO: Duration = Duration::from_secs(120);
/// The Postfix relay's account at the sink.
const RELAY_USER: &str = "postfix-relay";
/// Its password.
const RELAY_PASSWORD: &str = "postfix-relay-password-7";
/// The printers' account at the Postfix instance (Cyrus sasldb).
const POSTFIX_PRINTER: &str = "printer";
/// Its password.
const POSTFIX_PRINTER_PASSWORD: &str = "printer-password-3";
/// Postfix's host name (also the sasldb realm).
const POSTFIX_HOST: &str = "bench-postfix.localdomain";

/// Relay benchmark (see the file header).
#[derive(Debug, Parser)]

pub struct Args {
    /// Printers sending at once (one session per message each).
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// Messages of the 1 MiB scenario per implementation.
    #[arg(long, default_value_t = 400)]
    messages_1mib: usize,
    /// Messages of the 1 KiB scenario per implementation.
    #[arg(long, default_value_t = 2000)]
    messages_1kib: usize,
    /// Scenarios to run: 1MiB-auth, 1KiB-auth.
    #[arg(long, value_delimiter = ',', default_value = "1MiB-auth,1KiB-auth")]
    scenarios: Vec<String>,
    /// Implementations to run: tokenfleet, postfix, emailproxy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tokenfleet,postfix,emailproxy"
    )]
    impls: Vec<String>,
    /// The agent's documented peak-PSS ceiling under this load (MiB).
    #[arg(long, default_value_t = 96)]
    ceiling_mib: u64,
    /// Exit non-zero when a target or the ceiling is missed.
    #[arg(long)]
    enforce: bool,
    /// Record `perf record -g` profiles of the agent into this directory.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Longest time one run may take (seconds).
    #[arg(long, default_value_t = 300)]
    run_timeout_secs: u64,
    /// The emailproxy virtual environment (default: `.venv-bench` of the workspace).
    #[arg(long)]
    emailproxy_venv: Option<PathBuf>,
}

// ------------------------------------------------------------------------------------------------
// The upstream sink

/// What the sink received.
#[derive(Default)]
struct SinkState {
    /// Ids (`<run>-<seq>`) of accepted messages.
    seen: Mutex<HashSet<String>>,
    duplicates: AtomicU64,
    /// Messages without an `X-Bench-Id`.
    anonymous: AtomicU64,
    sessions: AtomicU64,
    logins: AtomicU64,
    refused_logins: AtomicU64,
    /// Tokens introspection found active, with their user.
    valid_tokens: Mutex<BTreeMap<String, String>>,
    introspection_url: String,
}

impl SinkState {
    fn delivered(&self, run: &str) -> usize {
        let prefix = format!("{run}-");
        self.seen
            .lock()
            .map(|s| s.iter().filter(|id| id.starts_with(&prefix)).count())
            .unwrap_or(0)
    }
}

/// Starts the sink on `127.0.0.1:port`.
async fn start_sink(
    pki: &TestPki,
    introspection_url: String,
    port: u16,
) -> Result<(SocketAddr, Arc<SinkState>)> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem)?;
    std::fs::write(&key, &pki.key_pem)?;
    let tls = tokenfleet_agent::ingress::IngressTls::from_pem_files(&cert, &key)
        .map_err(|e| anyhow!("sink TLS: {e}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(SinkState {
        introspection_url,
        ..SinkState::default()
    });
    let st = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (st, acceptor) = (Arc::clone(&st), acceptor.clone());
            tokio::spawn(async move {
                st.sessions.fetch_add(1, Ordering::Relaxed);
                let mut io = BufReader::with_capacity(64 * 1024, tcp);
                if io
                    .get_mut()
                    .write_all(b"220 sink.bench ESMTP\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                if let Ok(true) = sink_session(&mut io, false, &st).await {
                    let tcp = io.into_inner();
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut io = BufReader::with_capacity(64 * 1024, tls);
                    let _ = sink_session(&mut io, true, &st).await;
                }
            });
        }
    });
    // The certificate files are read; the directory may go.
    drop(dir);
    Ok((addr, state))
}

async fn read_line<S: AsyncRead + Unpin>(io: &mut BufReader<S>, buf: &mut Vec<u8>) -> Result<bool> {
    buf.clear();
    let n = io.read_until(b'\n', buf).await?;
    Ok(n > 0)
}

/// One sink session (plain or after STARTTLS). `Ok(true)`: the client asked for STARTTLS.
async fn sink_session<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    tls: bool,
    st: &SinkState,
) -> Result<bool> {
    let mut line = Vec::with_capacity(1024);
    let mut authed = false;
    let mut in_mail = false;
    loop {
        if !read_line(io, &mut line).await? {
            return Ok(false);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        let upper = text.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            let mut r = String::from(
                "250-sink.bench\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n",
            );
            if tls {
                r.push_str("250-AUTH PLAIN XOAUTH2\r\n");
            } else {
                r.push_str("250-STARTTLS\r\n");
            }
            r.push_str("250 ENHANCEDSTATUSCODES");
            r
        } else if upper == "STARTTLS" {
            if tls {
                "503 5.5.1 TLS already active".into()
            } else {
                io.get_mut()
                    .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                    .await?;
                io.get_mut().flush().await?;
                return Ok(true);
            }
        } else if let Some(rest) = upper.strip_prefix("AUTH ") {
            if !tls {
                "538 5.7.11 Encryption required".into()
            } else {
                let mut parts = text[5..].split_whitespace();
                let mechanism = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = parts.next();
                let initial = match parts.next() {
                    Some(i) => i.to_owned(),
                    None => {
                        io.get_mut().write_all(b"334 \r\n").await?;
                        io.get_mut().flush().await?;
                        if !read_line(io, &mut line).await? {
                            return Ok(false);
                        }
                        String::from_utf8_lossy(&line).trim().to_owned()
                    }
                };
                let ok = match mechanism.as_str() {
                    "PLAIN" => B64.decode(initial.as_bytes()).is_ok_and(|raw| {
                        raw == format!("\0{RELAY_USER}\0{RELAY_PASSWORD}").as_bytes()
                    }),
                    "XOAUTH2" => xoauth2_valid(st, &initial).await,
                    _ => false,
                };
                if ok {
                    authed = true;
                    st.logins.fetch_add(1, Ordering::Relaxed);
                    "235 2.7.0 Authentication successful".into()
                } else {
                    st.refused_logins.fetch_add(1, Ordering::Relaxed);
                    if mechanism == "XOAUTH2" {
                        let json = B64.encode(br#"{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/SMTP.Send"}"#);
                        io.get_mut()
                            .write_all(format!("334 {json}\r\n").as_bytes())
                            .await?;
                        io.get_mut().flush().await?;
                        if !read_line(io, &mut line).await? {
                            return Ok(false);
                        }
                    }
                    "535 5.7.3 Authentication unsuccessful".into()
                }
            }
        } else if upper.starts_with("MAIL FROM:") {
            if !authed {
                "530 5.7.0 Authentication required".into()
            } else {
                in_mail = true;
                "250 2.1.0 Ok".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            if in_mail {
                "250 2.1.5 Ok".into()
            } else {
                "503 5.5.1 Need MAIL".into()
            }
        } else if upper == "DATA" {
            if !in_mail {
                "503 5.5.1 Need MAIL".into()
            } else {
                io.get_mut().write_all(b"354 Go ahead\r\n").await?;
                io.get_mut().flush().await?;
                let mut id = None;
                let mut in_header = true;
                loop {
                    if !read_line(io, &mut line).await? {
                        return Ok(false);
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    if in_header {
                        if line == b"\r\n" || line == b"\n" {
                            in_header = false;
                        } else if line.len() > 12
                            && line[..12].eq_ignore_ascii_case(b"X-Bench-Id: ")
                        {
                            id = Some(String::from_utf8_lossy(&line[12..]).trim().to_owned());
                        }
                    }
                }
                in_mail = false;
                match id {
                    Some(id) => {
                        let fresh = st.seen.lock().map(|mut s| s.insert(id)).unwrap_or(false);
                        if !fresh {
                            st.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => {
                        st.anonymous.fetch_add(1, Ordering::Relaxed);
                    }
                }
                "250 2.0.0 Ok: queued".into()
            }
        } else if upper == "RSET" {
            in_mail = false;
            "250 2.0.0 Ok".into()
        } else if upper == "NOOP" {
            "250 2.0.0 Ok".into()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            io.get_mut().flush().await?;
            return Ok(false);
        } else {
            "502 5.5.2 Command not recognized".into()
        };
        io.get_mut()
            .write_all(format!("{reply}\r\n").as_bytes())
            .await?;
        // Pipelined commands: answer the whole group at once.
        if io.buffer().is_empty() {
            io.get_mut().flush().await?;
        }
    }
}

/// XOAUTH2: `user=<address>\x01auth=Bearer <token>\x01\x01`; the token must be active at the fake
/// (introspection, cached per token) and issued for that user.
async fn xoauth2_valid(st: &SinkState, initial: &str) -> bool {
    let Ok(raw) = B64.decode(initial.as_bytes()) else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw);
    let mut user = None;
    let mut token = None;
    for part in text.split('\x01') {
        if let Some(u) = part.strip_prefix("user=") {
            user = Some(u.to_owned());
        } else if let Some(t) = part.strip_prefix("auth=Bearer ") {
            token = Some(t.to_owned());
        }
    }
    let (Some(user), Some(token)) = (user, token) else {
        return false;
    };
    if let Some(known) = st
        .valid_tokens
        .lock()
        .ok()
        .and_then(|v| v.get(&token).cloned())
    {
        return known.eq_ignore_ascii_case(&user);
    }
    let body = format!(
        "token={}",
        url::form_urlencoded::byte_serialize(token.as_bytes()).collect::<String>()
    );
    let Ok(answer) = post_form(&st.introspection_url, &body).await else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&answer) else {
        return false;
    };
    let active = json["active"].as_bool().unwrap_or(false);
    let username = json["username"].as_str().unwrap_or_default().to_owned();
    if active && let Ok(mut v) = st.valid_tokens.lock() {
        v.insert(token, username.clone());
    }
    active && username.eq_ignore_ascii_case(&user)
}

async fn post_form(url: &str, body: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = TcpStream::connect(host).await?;
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

// ------------------------------------------------------------------------------------------------
// The printers

/// A relay under test, as the printers see it.
struct Relay {
    name: &'static str,
    addr: SocketAddr,
    user: String,
    password: String,
    /// The processes whose PSS counts.
    pids: Arc<dyn Fn() -> Vec<u32> + Send + Sync>,
}

struct Printer {
    io: BufReader<TcpStream>,
}

impl Printer {
    async fn connect(source: [u8; 4], to: SocketAddr) -> Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let tcp = tokio::time::timeout(IO, socket.connect(to)).await??;
        let _ = tcp.set_nodelay(true);
        Ok(Self {
            io: BufReader::new(tcp),
        })
    }

    async fn reply(&mut self) -> Result<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(IO, self.io.read_line(&mut line)).await??;
            if n == 0 {
                bail!("connection closed (after {text:?})");
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((code, text));
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> Result<(u16, String)> {
        self.io
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.reply().await
    }
}

/// Sends one message in its own session. `Ok(None)`: acknowledged; `Ok(Some(reply))`: a
/// temporary refusal (the printer tries again).
async fn print_one(
    relay: &Relay,
    source: [u8; 4],
    id: &str,
    body: &[u8],
) -> Result<Option<String>> {
    let mut p = Printer::connect(source, relay.addr).await?;
    let expect = |what: &str, (code, text): (u16, String), want: u16| -> Result<Option<String>> {
        if code == want {
            Ok(None)
        } else if (400..500).contains(&code) {
            Ok(Some(format!("{what}: {}", text.trim())))
        } else {
            bail!("{} {what}: {}", relay.name, text.trim())
        }
    };
    if let Some(t) = expect("greeting", p.reply().await?, 220)? {
        return Ok(Some(t));
    }
    if let Some(t) = expect("EHLO", p.cmd("EHLO printer.lan").await?, 250)? {
        return Ok(Some(t));
    }
    let plain = B64.encode(format!("\0{}\0{}", relay.user, relay.password));
    if let Some(t) = expect("AUTH", p.cmd(&format!("AUTH PLAIN {plain}")).await?, 235)? {
        return Ok(Some(t));
    }
    if let Some(t) = expect(
        "MAIL",
        p.cmd("MAIL FROM:<scanner@printers.lan>").await?,
        250,
    )? {
        return Ok(Some(t));
    }
    if let Some(t) = expect(
        "RCPT",
        p.cmd("RCPT TO:<archive@contoso.example>").await?,
        250,
    )? {
        return Ok(Some(t));
    }
    if let Some(t) = expect("DATA", p.cmd("DATA").await?, 354)? {
        return Ok(Some(t));
    }
    let header = format!(
        "From: Scanner <scanner@printers.lan>\r\nTo: <archive@contoso.example>\r\n\
         Subject: Scan {id}\r\nX-Bench-Id: {id}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
         Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    );
    let w = p.io.get_mut();
    w.write_all(header.as_bytes()).await?;
    w.write_all(body).await?;
    w.write_all(b"--b1--\r\n.\r\n").await?;
    let done = expect("end of DATA", p.reply().await?, 250)?;
    let _ = p.cmd("QUIT").await;
    Ok(done)
}

/// `size` bytes of base64 lines (76 characters + CRLF): the attachment of a scan.
fn attachment(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 80);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    while out.len() < size {
        for _ in 0..76 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.push(alphabet[(seed % 64) as usize]);
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

// ------------------------------------------------------------------------------------------------
// PSS

/// `Pss` of a process in KiB (0 when it is gone).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `root` and all its descendants.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some(after) = stat.rsplit_once(')').map(|(_, a)| a.to_owned())
                && let Some(ppid) = after
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u32>().ok())
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

// ------------------------------------------------------------------------------------------------
// One run

#[derive(Debug, Clone, Copy)]
struct Figures {
    /// Messages that reached the upstream (all of them unless the run timed out).
    messages: usize,
    /// Whether every message arrived before the run's time was up.
    complete: bool,
    msgs_per_s: f64,
    accept_per_s: f64,
    pss_mib: f64,
    retries: u64,
}

async fn run_load(
    relay: &Relay,
    sink: &Arc<SinkState>,
    run: &str,
    messages: usize,
    size: usize,
    concurrency: usize,
    timeout: Duration,
) -> Result<Figures> {
    let body = Arc::new(attachment(size));
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let last_ack = Arc::new(Mutex::new(None::<Instant>));
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        // The process list is taken again at every sample: Postfix starts and ends processes.
        let pids = Arc::clone(&relay.pids);
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                let kib: u64 = pids().iter().map(|p| pss_kib(*p)).sum();
                peak.fetch_max(kib, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started = Instant::now();
    let deadline = started + timeout;
    let mut printers = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let (next, retries, last_ack, body, acked_count) = (
            Arc::clone(&next),
            Arc::clone(&retries),
            Arc::clone(&last_ack),
            Arc::clone(&body),
            Arc::clone(&acked_count),
        );
        // The tasks are 'static: each gets its own copy of what it needs of the relay.
        let (addr, user, password, name) = (
            relay.addr,
            relay.user.clone(),
            relay.password.clone(),
            relay.name,
        );
        let run = run.to_owned();
        printers.spawn(async move {
            let me = Relay {
                name,
                addr,
                user,
                password,
                pids: Arc::new(Vec::new),
            };
            let source = [127, 0, 1, u8::try_from(i % 250 + 1).unwrap_or(1)];
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= messages {
                    return Ok::<(), anyhow::Error>(());
                }
                let id = format!("{run}-{seq}");
                loop {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        // Time is up: the run is reported as incomplete.
                        return Ok(());
                    };
                    let tried = tokio::time::timeout(left, print_one(&me, source, &id, &body))
                        .await
                        .unwrap_or_else(|_| Ok(Some("the run's time is up".to_owned())));
                    match tried {
                        Ok(None) => break,
                        Ok(Some(_temporary)) => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => {
                            // A connection reset under load: the message was not acknowledged,
                            // so it is sent again (as a printer would).
                            retries.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "printer session failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                acked_count.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut l) = last_ack.lock() {
                    *l = Some(Instant::now());
                }
            }
        });
    }
    let mut failure = None;
    while let Some(done) = printers.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(anyhow!("printer task: {e}")),
        }
    }
    let acked = last_ack
        .lock()
        .ok()
        .and_then(|l| *l)
        .unwrap_or_else(Instant::now);
    let mut end = deadline;
    let mut complete = false;
    if failure.is_none() {
        while Instant::now() < deadline {
            if sink.delivered(run) >= messages {
                end = Instant::now();
                complete = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    if let Some(e) = failure {
        return Err(e);
    }
    let delivered = sink.delivered(run);
    if !complete {
        eprintln!(
            "bench-relay: {}: only {delivered} of {messages} messages reached the upstream within {timeout:?}",
            relay.name
        );
    }
    let acknowledged = acked_count.load(Ordering::Relaxed);
    let secs = |t: Instant| t.duration_since(started).as_secs_f64().max(1e-9);
    Ok(Figures {
        messages: delivered,
        complete,
        msgs_per_s: delivered as f64 / secs(end),
        accept_per_s: acknowledged as f64 / secs(acked),
        pss_mib: peak.load(Ordering::Relaxed) as f64 / 1024.0,
        retries: retries.load(Ordering::Relaxed),
    })
}

// ------------------------------------------------------------------------------------------------
// The baselines

/// A Postfix instance of its own; stopped on drop.
struct Postfix {
    conf: PathBuf,
    queue: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Postfix {
    fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.queue.join("pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

fn postfix_uid() -> Result<u32> {
    let out = Command::new("id").args(["-u", "postfix"]).output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("no `postfix` user: run scripts/bench-setup.sh")
}

async fn start_postfix(port: u16, sink: SocketAddr, ca_pem: &str) -> Result<Postfix> {
    let dir = tempfile::Builder::new()
        .prefix("tf-bench-postfix-")
        .tempdir()?;
    let d = dir.path();
    let (conf, queue, data) = (d.join("conf"), d.join("queue"), d.join("data"));
    let sasl = conf.join("sasl");
    for p in [&conf, &queue, &data, &sasl] {
        std::fs::create_dir_all(p)?;
    }
    let uid = postfix_uid()?;
    std::os::unix::fs::chown(&data, Some(uid), None)?;
    std::fs::write(conf.join("ca.pem"), ca_pem)?;
    let main_cf = format!(
        "compatibility_level = 3.6\n\
         queue_directory = {queue}\n\
         data_directory = {data}\n\
         mail_owner = postfix\n\
         setgid_group = postdrop\n\
         inet_interfaces = loopback-only\n\
         inet_protocols = ipv4\n\
         myhostname = {POSTFIX_HOST}\n\
         mydestination =\n\
         local_transport = error:local delivery is off\n\
         relayhost = [127.0.0.1]:{sink_port}\n\
         mynetworks = 127.0.0.0/8\n\
         smtpd_peername_lookup = no\n\
         smtpd_sasl_auth_enable = yes\n\
         smtpd_sasl_type = cyrus\n\
         smtpd_sasl_path = smtpd\n\
         smtpd_relay_restrictions = permit_sasl_authenticated, reject\n\
         smtp_tls_security_level = encrypt\n\
         smtp_tls_CAfile = {conf}/ca.pem\n\
         smtp_sasl_auth_enable = yes\n\
         smtp_sasl_password_maps = static:{RELAY_USER}:{RELAY_PASSWORD}\n\
         smtp_sasl_security_options = noanonymous\n\
         smtp_sasl_tls_security_options = noanonymous\n\
         smtp_sasl_mechanism_filter = plain\n\
         maillog_file = {d}/maillog\n\
         maillog_file_prefixes = {d}\n",
        queue = queue.display(),
        data = data.display(),
        conf = conf.display(),
        d = d.display(),
        sink_port = sink.port(),
    );
    std::fs::write(conf.join("main.cf"), main_cf)?;
    // Debian's master.cf without chroot (the queue is not under /var/spool/postfix).
    let master_cf = format!(
        "127.0.0.1:{port} inet n - n - - smtpd\n\
         pickup    unix  n       -       n       60      1       pickup\n\
         cleanup   unix  n       -       n       -       0       cleanup\n\
         qmgr      unix  n       -       n       300     1       qmgr\n\
         tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n\
         rewrite   unix  -       -       n       -       -       trivial-rewrite\n\
         bounce    unix  -       -       n       -       0       bounce\n\
         defer     unix  -       -       n       -       0       bounce\n\
         trace     unix  -       -       n       -       0       bounce\n\
         verify    unix  -       -       n       -       1       verify\n\
         flush     unix  n       -       n       1000?   0       flush\n\
         proxymap  unix  -       -       n       -       -       proxymap\n\
         smtp      unix  -       -       n       -       -       smtp\n\
         relay     unix  -       -       n       -       -       smtp\n\
         showq     unix  n       -       n       -       -       showq\n\
         error     unix  -       -       n       -       -       error\n\
         retry     unix  -       -       n       -       -       error\n\
         discard   unix  -       -       n       -       -       discard\n\
         anvil     unix  -       -       n       -       1       anvil\n\
         scache    unix  -       -       n       -       1       scache\n\
         postlog   unix-dgram n  -       n       -       1       postlogd\n"
    );
    std::fs::write(conf.join("master.cf"), master_cf)?;
    // Debian's Postfix reads Cyrus' smtpd.conf from <config dir>/sasl.
    std::fs::write(
        sasl.join("smtpd.conf"),
        format!(
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {}\nmech_list: PLAIN LOGIN\n",
            sasl.join("sasldb2").display()
        ),
    )?;
    let mut child = Command::new("saslpasswd2")
        .args(["-p", "-c", "-f"])
        .arg(sasl.join("sasldb2"))
        .args(["-u", POSTFIX_HOST, POSTFIX_PRINTER])
        .stdin(Stdio::piped())
        .spawn()
        .context("saslpasswd2 (sasl2-bin): run scripts/bench-setup.sh")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin.write_all(POSTFIX_PRINTER_PASSWORD.as_bytes())?;
    }
    if !child.wait()?.success() {
        bail!("saslpasswd2 failed");
    }
    std::os::unix::fs::chown(&sasl, Some(uid), None)?;
    std::os::unix::fs::chown(sasl.join("sasldb2"), Some(uid), None)?;
    let out = Command::new("postfix")
        .arg("-c")
        .arg(&conf)
        .arg("start")
        .output()
        .context("postfix: run scripts/bench-setup.sh")?;
    let maillog = d.join("maillog");
    let postfix = Postfix {
        conf,
        queue,
        _dir: dir,
    };
    if !out.status.success() {
        bail!(
            "postfix start: {}{}; log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&maillog).unwrap_or_default()
        );
    }
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), "postfix").await?;
    Ok(postfix)
}

/// emailproxy, killed on drop.
struct EmailProxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for EmailProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_emailproxy(
    venv: &Path,
    port: u16,
    sink: SocketAddr,
    ca_pem: &str,
    token_url: &str,
) -> Result<EmailProxy> {
    let dir = tempfile::Builder::new()
        .prefix("tf-bench-emailproxy-")
        .tempdir()?;
    let d = dir.path();
    std::fs::write(d.join("ca.pem"), ca_pem)?;
    let config = format!(
        "[SMTP-{port}]\n\
         server_address = 127.0.0.1\n\
         server_port = {sink_port}\n\
         server_starttls = True\n\
         local_address = 127.0.0.1\n\n\
         [{ADDRESS}]\n\
         token_url = {token_url}\n\
         oauth2_scope = https://outlook.office365.com/.default\n\
         oauth2_flow = client_credentials\n\
         client_id = {CLIENT_ID}\n\
         client_secret = {CLIENT_SECRET}\n",
        sink_port = sink.port()
    );
    std::fs::write(d.join("emailproxy.config"), config)?;
    // Outside the temporary directory, so it stays for reading after the run.
    let log_path =
        std::env::temp_dir().join(format!("bench-relay-emailproxy-{}.log", std::process::id()));
    eprintln!("bench-relay: emailproxy logs to {}", log_path.display());
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(venv.join("bin/emailproxy"))
        .arg("--no-gui")
        .arg("--config-file")
        .arg(d.join("emailproxy.config"))
        .arg("--cache-store")
        .arg(d.join("cache.json"))
        .env("SSL_CERT_FILE", d.join("ca.pem"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "{}/bin/emailproxy: run scripts/bench-setup.sh",
                venv.display()
            )
        })?;
    let proxy = EmailProxy { child, _dir: dir };
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)), "emailproxy").await?;
    Ok(proxy)
}

async fn wait_listening(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} does not listen on {addr} after 30 s")
}

fn free_port() -> Result<u16> {
    tokenfleet_testkit::ports::free_port()
}

// ------------------------------------------------------------------------------------------------

pub async fn run(args: Args) -> Result<bool> {
    if args.concurrency == 0 || args.concurrency > 250 {
        bail!("--concurrency must be 1 to 250 (one loopback source address each)");
    }
    for s in &args.scenarios {
        if s != "1MiB-auth" && s != "1KiB-auth" {
            bail!("unknown scenario {s:?}: expected 1MiB-auth or 1KiB-auth");
        }
    }
    for i in &args.impls {
        if !["tokenfleet", "postfix", "emailproxy"].contains(&i.as_str()) {
            bail!("unknown implementation {i:?}: expected tokenfleet, postfix or emailproxy");
        }
    }
    let wants = |name: &str| args.impls.iter().any(|i| i == name);
    let pki = TestPki::new("bench-relay upstream CA");

    // tokenfleet: the agent site; its fake identity provider also answers the sink's
    // introspection and emailproxy's token requests. The sink needs the fake's introspection URL
    // and the site the sink's address: the sink's port is picked first, the sink started after.
    let sink_listener_port = free_port()?;
    let ca = pki.ca_pem.clone();
    let site = AgentSite::start(SiteOptions {
        device: Box::new(move |_| pb::Device {
            smtp: Some(pb::SmtpProfile {
                server: "127.0.0.1".into(),
                port: u32::from(sink_listener_port),
                security: pb::TlsMode::Starttls as i32,
                timeout_seconds: 60,
                extra_ca_pem: ca,
                method: pb::SendMethod::Smtp as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        agent_config: String::new(),
        log_filter: "info".into(),
        ..SiteOptions::default()
    })
    .await;
    let (sink_addr, sink) =
        start_sink(&pki, site.fake.introspection_url(), sink_listener_port).await?;
    let agent_pid = site.agent_pid().context("the agent is not running")?;

    let mut relays: Vec<Relay> = Vec::new();
    if wants("tokenfleet") {
        relays.push(Relay {
            name: "tokenfleet",
            addr: site.smtp,
            user: DEVICE_USER.into(),
            password: DEVICE_PASSWORD.into(),
            pids: Arc::new(move || vec![agent_pid]),
        });
    }
    let mut _postfix = None;
    if wants("postfix") {
        let port = free_port()?;
        let pf = start_postfix(port, sink_addr, &pki.ca_pem).await?;
        let master = pf.master_pid().context("postfix master pid")?;
        _postfix = Some(pf);
        relays.push(Relay {
            name: "postfix",
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            user: POSTFIX_PRINTER.into(),
            password: POSTFIX_PRINTER_PASSWORD.into(),
            pids: Arc::new(move || process_tree(master)),
        });
    }
    let mut _emailproxy = None;
    if wants("emailproxy") {
        let venv = args.emailproxy_venv.clone().unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv-bench"))
        });
        let port = free_port()?;
        let token_url = site.fake.microsoft_endpoints(ENTRA).token_url;
        let ep = start_emailproxy(&venv, port, sink_addr, &pki.ca_pem, &token_url).await?;
        let pid = ep.child.id();
        _emailproxy = Some(ep);
        relays.push(Relay {
            name: "emailproxy",
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            user: ADDRESS.into(),
            password: "any-local-password".into(),
            pids: Arc::new(move || vec![pid]),
        });
    }

    let machine = machine();
    println!(
        "bench=relay machine=\"{machine}\" concurrency={} sink={sink_addr}",
        args.concurrency
    );
    let mut ok = true;
    let mut results: BTreeMap<(String, &'static str), Figures> = BTreeMap::new();
    for scenario in &args.scenarios {
        let (messages, size) = if scenario == "1MiB-auth" {
            (args.messages_1mib, 1 << 20)
        } else {
            (args.messages_1kib, 1024)
        };
        for relay in &relays {
            let run_id = format!("{}-{}", relay.name, scenario);
            let perf = match (&args.perf_dir, relay.name) {
                (Some(dir), "tokenfleet") => Some(start_perf(dir, scenario, agent_pid)?),
                _ => None,
            };
            let figures = run_load(
                relay,
                &sink,
                &run_id,
                messages,
                size,
                args.concurrency,
                Duration::from_secs(args.run_timeout_secs),
            )
            .await;
            if let Some(perf) = perf {
                stop_perf(perf);
            }
            let figures = figures.with_context(|| run_id.clone())?;
            println!(
                "bench=relay scenario={scenario} impl={} msgs={} complete={} msgs_per_s={:.1} accept_per_s={:.1} pss_mib={:.1} retries={}",
                relay.name,
                figures.messages,
                figures.complete,
                figures.msgs_per_s,
                figures.accept_per_s,
                figures.pss_mib,
                figures.retries
            );
            if relay.name == "tokenfleet" && !figures.complete {
                ok = false;
            }
            results.insert((scenario.clone(), relay.name), figures);
        }
        if let Some(tf) = results.get(&(scenario.clone(), "tokenfleet")).copied() {
            let postfix_pss = results
                .get(&(scenario.clone(), "postfix"))
                .map(|f| f.pss_mib);
            for (baseline, target) in [("postfix", 1.5), ("emailproxy", 5.0)] {
                let Some(b) = results.get(&(scenario.clone(), baseline)) else {
                    continue;
                };
                let ratio = tf.msgs_per_s / b.msgs_per_s;
                let met = ratio >= target;
                ok &= met || !args.enforce;
                println!(
                    "bench=relay scenario={scenario} impl=tokenfleet msgs_per_s={:.1} baseline={baseline} baseline_msgs_per_s={:.1} ratio={ratio:.2} target={target} met={met}",
                    tf.msgs_per_s, b.msgs_per_s
                );
                crate::figure(&crate::Figure {
                    scenario: &format!("relay-{scenario}"),
                    figure: "msgs_per_s",
                    unit: "msg/s",
                    value: tf.msgs_per_s,
                    baseline,
                    baseline_value: b.msgs_per_s,
                    target: &format!(">= {target}x"),
                    met: Some(met),
                });
            }
            if let Some(pss) = postfix_pss {
                let ratio = tf.pss_mib / pss;
                let met = ratio <= 1.0 / 3.0;
                ok &= met || !args.enforce;
                println!(
                    "bench=relay scenario={scenario} impl=tokenfleet pss_mib={:.1} baseline=postfix baseline_pss_mib={pss:.1} pss_ratio={ratio:.2} target=0.33 met={met}",
                    tf.pss_mib
                );
                crate::figure(&crate::Figure {
                    scenario: &format!("relay-{scenario}"),
                    figure: "peak_pss",
                    unit: "MiB",
                    value: tf.pss_mib,
                    baseline: "postfix",
                    baseline_value: pss,
                    target: "<= 0.33x",
                    met: Some(met),
                });
            }
            let under = tf.pss_mib <= args.ceiling_mib as f64;
            ok &= under || !args.enforce;
            println!(
                "bench=relay scenario={scenario} impl=tokenfleet pss_mib={:.1} ceiling_mib={} met={under}",
                tf.pss_mib, args.ceiling_mib
            );
            crate::figure(&crate::Figure {
                scenario: &format!("relay-{scenario}"),
                figure: "peak_pss",
                unit: "MiB",
                value: tf.pss_mib,
                baseline: "ceiling",
                baseline_value: args.ceiling_mib as f64,
                target: "<= 1x (documented ceiling)",
                met: Some(under),
            });
        }
    }
    let dups = sink.duplicates.load(Ordering::Relaxed);
    let anonymous = sink.anonymous.load(Ordering::Relaxed);
    println!(
        "bench=relay upstream_sessions={} upstream_logins={} refused_logins={} duplicates={dups} without_id={anonymous}",
        sink.sessions.load(Ordering::Relaxed),
        sink.logins.load(Ordering::Relaxed),
        sink.refused_logins.load(Ordering::Relaxed),
    );
    if dups > 0 || anonymous > 0 {
        eprintln!(
            "bench-relay: {dups} duplicate(s) and {anonymous} message(s) without an id reached the upstream"
        );
        ok = false;
    }
    drop(site);
    Ok(ok)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!("{cores} cores {cpu}, {} GiB", mem / (1024 * 1024))
}

fn start_perf(dir: &Path, scenario: &str, pid: u32) -> Result<Child> {
    std::fs::create_dir_all(dir)?;
    Command::new("perf")
        .args(["record", "-g", "-F", "499", "-p", &pid.to_string(), "-o"])
        .arg(dir.join(format!("perf-{scenario}.data")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf (linux-perf): run scripts/bench-setup.sh")
}

fn stop_perf(mut perf: Child) {
    // SIGINT makes perf write its file and exit.
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
}
