//! The agent scenarios of the chaos suite: the real `tokenfleet-agent` between the printer
//! (Python `smtplib`) and a real Dovecot ([`AgentSite`]), disturbed while the printer sends.
//!
//! Every message the agent acknowledged (`250` after `DATA`) must arrive at Dovecot, with body
//! and attachment byte-identical to what the printer sent; copies beyond one are counted (the
//! agent delivers at least once: a kill between the upstream's `250` and the spool's removal
//! sends a message again).
//!
//! [`FaultyUpstream`] sits between the agent and Dovecot's submission port and answers what a
//! struggling mail server answers: `421` at the greeting, `451` to `MAIL FROM`, or nothing at
//! all (connections closed at once).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{Options, Report, secs};
use crate::agent_site::{AgentSite, DEVICE_PASSWORD, SiteOptions, plain_smtp};

/// The header/body split of a raw message.
fn split(message: &[u8]) -> (&[u8], &[u8]) {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) => (&message[..at + 2], &message[at + 4..]),
        None => (message, &[]),
    }
}

/// The value of header `name` (first occurrence).
fn header(message: &[u8], name: &str) -> Option<String> {
    let (head, _) = split(message);
    let head = String::from_utf8_lossy(head);
    head.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// A PDF-ish attachment with every byte value and dot-leading lines once decoded.
fn attachment(dir: &std::path::Path) -> Result<PathBuf> {
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(16 * 1024).collect();
    bytes.extend_from_slice(b"\r\n.\r\n..\r\n");
    let path = dir.join("chaos-scan.pdf");
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// Compares what Dovecot holds with what the printer had acknowledged: every `X-Seq` at least
/// once with its body byte-identical. Adds the figures (copies beyond one are duplicates).
async fn check_delivered(
    site: &AgentSite,
    sent: &BTreeMap<usize, Vec<u8>>,
    report: &mut Report,
    limit: Duration,
) -> Result<()> {
    // Wait until every acknowledged X-Seq is there (a count is not enough: duplicates).
    let started = Instant::now();
    loop {
        let mut pop = site.upstream_pop3().await;
        let count = pop.count().await;
        let mut seen = std::collections::BTreeSet::new();
        for i in 1..=count {
            let head = pop.multiline(&format!("TOP {i} 0")).await;
            if let Some(seq) = header(&head, "X-Seq").and_then(|s| s.parse::<usize>().ok()) {
                seen.insert(seq);
            }
        }
        pop.quit().await;
        if sent.keys().all(|seq| seen.contains(seq)) || started.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.figure("delivered_in", secs(started.elapsed()));
    let mut pop = site.upstream_pop3().await;
    let count = pop.count().await;
    let mut copies: BTreeMap<usize, usize> = BTreeMap::new();
    let mut altered = Vec::new();
    for i in 1..=count {
        let received = pop.multiline(&format!("RETR {i}")).await;
        let Some(seq) = header(&received, "X-Seq").and_then(|s| s.parse::<usize>().ok()) else {
            altered.push(format!("message {i} at Dovecot has no X-Seq"));
            continue;
        };
        *copies.entry(seq).or_default() += 1;
        if let Some(original) = sent.get(&seq)
            && split(&received).1 != split(original).1
        {
            altered.push(format!("message X-Seq {seq}: body not byte-identical"));
        }
    }
    pop.quit().await;
    let missing: Vec<String> = sent
        .keys()
        .filter(|seq| !copies.contains_key(seq))
        .map(|seq| format!("acknowledged message X-Seq {seq} never arrived"))
        .collect();
    let extra: usize = copies.values().map(|c| c.saturating_sub(1)).sum();
    report.figure("acknowledged", sent.len());
    report.figure("at_dovecot", count);
    report.figure("duplicates", extra);
    report.figure("altered", altered.len());
    report.lose(missing);
    report.lose(altered);
    Ok(())
}

/// `agent-kill`.
pub async fn agent_kill(o: &Options, report: &mut Report) -> Result<()> {
    let mut site = AgentSite::start(SiteOptions::default()).await;
    let attach = attachment(site.dir.path())?;
    let bursts = o.count(3, 10);
    let per_burst = o.count(20, 100);
    let mut sent = BTreeMap::new();
    let mut kills = 0;
    for burst in 0..bursts {
        let first = burst * per_burst;
        let printer = site.start_printer_from(DEVICE_PASSWORD, first, per_burst, Some(&attach));
        // Kill the agent mid-burst (once a few messages are in), start it again on the same
        // spool; the printer retries what was cut off.
        let wait_for = per_burst / 3 + burst % 3;
        let deadline = Instant::now() + Duration::from_secs(60);
        while printer.composed() < wait_for && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        site.kill_agent();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        site.start_agent().await;
        for (i, message) in printer.finish().await.into_iter().enumerate() {
            sent.insert(first + i, message);
        }
    }
    report.figure("kills", kills);
    check_delivered(&site, &sent, report, o.secs(60, 180)).await
}

/// What [`FaultyUpstream`] does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UpstreamMode {
    /// Forwards to the server.
    Pass = 0,
    /// Greets with `421 4.3.2` and closes.
    Greeting421 = 1,
    /// Forwards, but answers `MAIL FROM` itself with `451 4.3.0` (and does not forward it).
    Mail451 = 2,
    /// Accepts and closes at once (the server is gone).
    Down = 3,
}

/// A relay in front of an SMTP server that fails the way [`UpstreamMode`] says; see the module
/// documentation. Stops on drop.
#[derive(Debug)]
pub struct FaultyUpstream {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultyUpstream {
    /// Starts relaying to `to` in [`UpstreamMode::Pass`].
    pub async fn start(to: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(UpstreamMode::Pass as u8));
        let flag = Arc::clone(&mode);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mode = flag.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = serve(inbound, to, mode).await;
                });
            }
        });
        Ok(Self { addr, mode, task })
    }

    /// Where the agent should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How new connections are treated from now on.
    pub fn set(&self, mode: UpstreamMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut inbound: TcpStream, to: SocketAddr, mode: u8) -> std::io::Result<()> {
    if mode == UpstreamMode::Down as u8 {
        return Ok(());
    }
    if mode == UpstreamMode::Greeting421 as u8 {
        inbound
            .write_all(b"421 4.3.2 Service not available, closing transmission channel\r\n")
            .await?;
        return inbound.shutdown().await;
    }
    let mut outbound = TcpStream::connect(to).await?;
    if mode == UpstreamMode::Pass as u8 {
        tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
        return Ok(());
    }
    // 451 to MAIL FROM: client lines are read one by one (the agent does not pipeline).
    let (client_read, client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    let to_client = {
        let client_write = Arc::clone(&client_write);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut buf = vec![0u8; 8192];
            loop {
                let n = server_read.read(&mut buf).await?;
                if n == 0 {
                    return std::io::Result::Ok(());
                }
                client_write.lock().await.write_all(&buf[..n]).await?;
            }
        })
    };
    let mut lines = BufReader::new(client_read);
    let mut line = Vec::new();
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        if line.len() >= 10 && line[..10].eq_ignore_ascii_case(b"MAIL FROM:") {
            // Answered here, never forwarded; the upstream connection is dropped.
            to_client.abort();
            drop(server_write);
            let mut client = client_write.lock().await;
            client
                .write_all(b"451 4.3.0 Temporary failure, try again later\r\n")
                .await?;
            // Whatever follows (RSET, QUIT) gets a 421 and the connection closes.
            line.clear();
            let _ = lines.read_until(b'\n', &mut line).await;
            let _ = client
                .write_all(b"421 4.3.0 Closing transmission channel\r\n")
                .await;
            return Ok(());
        }
        server_write.write_all(&line).await?;
    }
    to_client.abort();
    Ok(())
}

/// `upstream-faults`.
pub async fn upstream_faults(o: &Options, report: &mut Report) -> Result<()> {
    let site = AgentSite::start(SiteOptions::default()).await;
    let upstream = FaultyUpstream::start(site.dovecot.submission_addr()).await?;
    site.update_device(|d| d.smtp = Some(plain_smtp(upstream.addr())))
        .await;
    let attach = attachment(site.dir.path())?;
    let per_phase = o.count(5, 30);
    let mut sent = BTreeMap::new();
    let mut first = 0;
    for (mode, lasts) in [
        (UpstreamMode::Greeting421, o.secs(4, 30)),
        (UpstreamMode::Mail451, o.secs(4, 30)),
        (UpstreamMode::Down, o.secs(6, 60)),
    ] {
        upstream.set(mode);
        let started = Instant::now();
        let printed = site
            .start_printer_from(DEVICE_PASSWORD, first, per_phase, Some(&attach))
            .finish()
            .await;
        for (i, message) in printed.into_iter().enumerate() {
            sent.insert(first + i, message);
        }
        first += per_phase;
        let rest = lasts.saturating_sub(started.elapsed());
        tokio::time::sleep(rest).await;
        // Nothing may have got through while the upstream refused.
        let through = site.upstream_count().await;
        report.figure(&format!("at_dovecot_after_{mode:?}"), through);
        if through > 0 {
            report.fail(format!(
                "{through} messages arrived while the upstream answered {mode:?}"
            ));
        }
        report.figure(&format!("{mode:?}_lasted"), secs(lasts));
    }
    let status = site.fleet_status().await.and_then(|s| s.status);
    report.figure(
        "queue_before_recovery",
        status.map_or_else(|| "unknown".to_owned(), |s| s.queue_depth.to_string()),
    );
    upstream.set(UpstreamMode::Pass);
    check_delivered(&site, &sent, report, o.secs(90, 300)).await
}
