//! `tokenfleet-agent run` end to end: the real agent binary (enrolled at a TLS broker, then run as
//! a child process), Python `smtplib` as the printer, a real Dovecot submission server validating
//! XOAUTH2 by introspection at the fake identity provider, and the message read back over POP3
//! (the site is [`AgentSite`]):
//!
//! - a message with an attachment arrives byte-identical (body and attachment);
//! - a token Dovecot refuses: the device's status carries Dovecot's JSON challenge and the 535;
//! - SIGKILL during a burst of 200 → after a restart every message is delivered; copies beyond
//!   one per message only as the agent counted them (plus one the printer resent because the kill
//!   cut off its `250`);
//! - the upstream unreachable for 30 s → messages queue, then go out;
//! - the broker stopped → sending continues with the cached token;
//! - the broker's fleet status shows a failing device within one heartbeat.
//!
//! The agent binary is built by the first test that needs it (`cargo build -p tokenfleet-agent`).
//! Slow ones (the burst, the 30 s outage) take 30–50 s each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::agent_site::{
    ADDRESS, AgentSite, DEVICE, DEVICE_PASSWORD, DEVICE_USER, HEARTBEAT_SECONDS, Pop3Session,
    SiteOptions, TENANT, TcpRelay, eventually, plain_smtp,
};

/// The site of this suite: a send-only mailbox, four deliveries at a time.
async fn site() -> AgentSite {
    AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send],
        agent_config: "delivery_concurrency = 4\n".into(),
        ..SiteOptions::default()
    })
    .await
}

/// The body (everything after the header section) of a message.
fn body(message: &[u8]) -> &[u8] {
    let at = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header/body separator");
    &message[at + 4..]
}

fn header<'a>(message: &'a [u8], name: &str) -> Option<&'a str> {
    let head = std::str::from_utf8(&message[..message.len() - body(message).len()]).ok()?;
    head.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn attachment_file(dir: &Path) -> PathBuf {
    // Binary content with every byte value, CRs and LFs, and lines that start with dots once
    // base64 is undone.
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(48 * 1024).collect();
    bytes.extend_from_slice(b"\r\n.\r\n..\r\n");
    let path = dir.join("scan.pdf");
    std::fs::write(&path, bytes).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printer_message_reaches_dovecot_byte_identical() {
    let mut site = site().await;
    let attach = attachment_file(site.dir.path());
    let sent = site.print(1, Some(&attach)).await;

    eventually(
        "the message at Dovecot",
        Duration::from_secs(30),
        || async { (site.upstream_count().await >= 1).then_some(()) },
    )
    .await;
    let mut pop = site.upstream_pop3().await;
    let received = pop.multiline("RETR 1").await;
    assert_eq!(
        body(&received),
        body(&sent[0]),
        "body and attachment byte-identical"
    );
    assert_eq!(header(&received, "X-Seq"), Some("0"));
    let from = header(&received, "From").unwrap();
    assert!(from.contains(ADDRESS), "sent as the admin mailbox: {from}");

    let status = eventually(
        "a status report with the delivery",
        Duration::from_secs(20),
        || async {
            let s = site.fleet_status().await?;
            let d = s.status.clone()?;
            (d.delivered_total >= 1).then_some(s)
        },
    )
    .await;
    let device = status.status.unwrap();
    assert_eq!(status.health, pb::DeviceHealth::Ok as i32, "{device:?}");
    let last = device.last_delivery.unwrap();
    assert!(last.ok && last.outcome == "delivered", "{last:?}");
    assert!(last.final_reply.starts_with("250"), "{last:?}");
    assert_eq!(device.queue_depth, 0);

    // The agent's own POP3 server lets the device in with its local password (its maildrop is
    // empty: nothing was fetched).
    let mut local = Pop3Session::connect(site.pop3).await;
    for (send, want) in [
        (format!("USER {DEVICE_USER}"), "+OK"),
        (format!("PASS {DEVICE_PASSWORD}"), "+OK"),
        ("STAT".to_owned(), "+OK 0 0"),
    ] {
        let line = local.command(&send).await;
        assert!(line.starts_with(want), "{line}");
    }

    assert_eq!(site.stop_agent(), Some(0), "SIGTERM exits 0");
    let log = site.log_text();
    assert!(log.contains("message delivered"), "{log}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&site.state), 0o700);
    assert_eq!(mode(&site.state.join("agent-config.pb")), 0o600);
    assert_eq!(mode(&site.state.join("counters.json")), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_reports_dovecots_challenge_and_535_within_a_heartbeat() {
    let site = site().await;
    // The fake's clock jumps past the lifetime of every token issued so far: introspection now
    // calls the token the broker holds (and hands out) inactive.
    site.fake.advance(Duration::from_secs(3 * 3600));
    let sent_at = Instant::now();
    site.print(1, None).await;

    let status = eventually(
        "the failing device in the fleet status",
        Duration::from_secs(30),
        || async {
            let s = site.fleet_status().await?;
            (s.health == pb::DeviceHealth::Failing as i32).then_some(s)
        },
    )
    .await;
    let took = sent_at.elapsed();
    let device = status.status.clone().unwrap();
    let last = device.last_delivery.clone().unwrap();
    assert!(!last.ok);
    assert!(last.final_reply.starts_with("535"), "{last:?}");
    let challenge: serde_json::Value = serde_json::from_str(&last.auth_challenge_json)
        .unwrap_or_else(|e| panic!("challenge JSON {:?}: {e}", last.auth_challenge_json));
    assert_eq!(challenge["status"], "401", "{challenge}");
    assert_eq!(last.outcome, "retrying");
    assert!(device.problem.contains("535"), "{}", device.problem);
    assert_eq!(device.queue_depth, 1, "kept for retry");
    // Delivery attempts (two logins ≈ 1 s) plus one heartbeat, with slack for a loaded machine.
    assert!(
        took < Duration::from_secs(HEARTBEAT_SECONDS + 8),
        "failing reported after {took:?}"
    );
    assert_eq!(site.upstream_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_of_200_loses_nothing() {
    let mut site = site().await;
    let burst = site.start_printer(DEVICE_PASSWORD, 200, None);
    // Kill once a fair part of the burst was acknowledged and deliveries are running.
    eventually(
        "40 messages written by the printer",
        Duration::from_secs(60),
        || async { (burst.composed() >= 40).then_some(()) },
    )
    .await;
    site.kill_agent();
    tokio::time::sleep(Duration::from_millis(300)).await;
    site.start_agent().await;
    burst.finish().await;

    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        let last = site.fleet_status().await.and_then(|s| s.status);
        if let Some(s) = &last
            && s.queue_depth == 0
            && s.delivered_total >= 200
        {
            break s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered: {last:?}, {} at Dovecot",
            site.upstream_count().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let total = site.upstream_count().await;
    // Every message at least once.
    let mut pop = site.upstream_pop3().await;
    let mut seen = vec![0usize; 200];
    for i in 1..=total {
        let head = pop.multiline(&format!("TOP {i} 0")).await;
        let seq: usize = header(&[head.as_slice(), b"\r\n"].concat(), "X-Seq")
            .unwrap()
            .parse()
            .unwrap();
        seen[seq] += 1;
    }
    let missing: Vec<usize> = (0..200).filter(|i| seen[*i] == 0).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let extra = total - 200;
    // Copies only where the agent counted a possible duplicate, plus at most one the printer
    // resent because the kill cut off the `250` of a message already spooled.
    assert!(
        extra as u64 <= status.duplicates_total + 1,
        "{extra} extra copies, {} counted",
        status.duplicates_total
    );
    eprintln!(
        "burst: {total} at Dovecot, {} counted duplicates, {} delivered by the agent",
        status.duplicates_total, status.delivered_total
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_for_30_s_queues_then_delivers() {
    let site = site().await;
    // The agent reaches Dovecot's submission port only through the relay.
    let relay = TcpRelay::start(site.dovecot.submission_addr()).await;
    site.update_device(|d| d.smtp = Some(plain_smtp(relay.addr())))
        .await;
    relay.pause(true);
    site.print(3, None).await;

    let status = eventually(
        "the queue in the fleet status",
        Duration::from_secs(20),
        || async {
            let s = site.fleet_status().await?;
            let d = s.status.clone()?;
            (d.queue_depth == 3 && s.health == pb::DeviceHealth::Degraded as i32).then_some(d)
        },
    )
    .await;
    assert_eq!(status.last_delivery.unwrap().outcome, "retrying");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(site.upstream_count().await, 0);

    relay.pause(false);
    eventually("3 messages at Dovecot", Duration::from_secs(30), || async {
        (site.upstream_count().await == 3).then_some(())
    })
    .await;
    eventually(
        "an OK device with an empty queue",
        Duration::from_secs(20),
        || async {
            let s = site.fleet_status().await?;
            let d = s.status.clone()?;
            (d.queue_depth == 0 && s.health == pb::DeviceHealth::Ok as i32).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_stopped_mail_still_goes_out_on_the_cached_token() {
    let mut site = site().await;
    site.print(1, None).await;
    eventually(
        "the first message at Dovecot",
        Duration::from_secs(30),
        || async { (site.upstream_count().await == 1).then_some(()) },
    )
    .await;
    site.stop_broker().await;
    site.print(2, None).await;
    eventually(
        "two more messages at Dovecot",
        Duration::from_secs(30),
        || async { (site.upstream_count().await == 3).then_some(()) },
    )
    .await;
    let log = site.log_text();
    assert!(log.contains("the status stream failed"), "{log}");
    assert!(
        !log.contains("getting an access token from the broker failed"),
        "the cached token was enough: {log}"
    );

    // Restarted while the broker is still away: the cached configuration serves the devices;
    // without a token the message waits in the queue.
    assert_eq!(site.stop_agent(), Some(0));
    site.start_agent().await;
    assert!(
        site.log_text()
            .contains("using the configuration cached in the state directory"),
        "{}",
        site.log_text()
    );
    site.print(1, None).await;
    let report = site.state.join("last-report.txt");
    eventually(
        "a report with a message waiting for a token",
        Duration::from_secs(20),
        || async {
            let text = std::fs::read_to_string(&report).unwrap_or_default();
            (text.contains("\"waiting-for-token\"") && text.contains("queue_depth: 1"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(site.upstream_count().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_device_reaches_the_running_agent() {
    let site = site().await;
    const NEW_PASSWORD: &str = "printer-local-password-8";
    tokenfleet_testkit::logs::secret(NEW_PASSWORD);
    // The broker sees the old revision in the next report and sends ReloadConfig; this waits
    // until the agent applied it.
    site.update_device(|d| d.ingress.as_mut().unwrap().password = NEW_PASSWORD.into())
        .await;
    site.start_printer(NEW_PASSWORD, 1, None).finish().await;
    eventually(
        "the message at Dovecot",
        Duration::from_secs(30),
        || async { (site.upstream_count().await == 1).then_some(()) },
    )
    .await;
    assert!(
        site.log_text().contains("command answered"),
        "{}",
        site.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_test_runs_on_the_agent_against_dovecot() {
    let site = site().await;
    let result = site
        .admin()
        .test_connection(pb::TestConnectionRequest {
            tenant: TENANT.into(),
            device: DEVICE.into(),
            target: pb::ConnectionTarget::Send as i32,
            timeout_seconds: 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        result.verdict,
        pb::ConnectionVerdict::Ok as i32,
        "{result:#?}\n{}",
        site.log_text()
    );
    assert_eq!(result.device, DEVICE);
    assert_eq!(
        result.endpoint,
        format!("127.0.0.1:{}", site.dovecot.submission_addr().port())
    );
    assert!(
        result.steps.iter().any(|s| s.name == "auth" && s.ok),
        "{result:#?}"
    );
}

/// A TCP connection from the loopback address `source` to `addr`, and the server's first line.
async fn greeting_from(
    source: [u8; 4],
    addr: std::net::SocketAddr,
) -> (tokio::io::BufReader<tokio::net::TcpStream>, String) {
    use tokio::io::AsyncBufReadExt as _;
    let stream = tokenfleet_testkit::silent::connect_from(source.into(), addr)
        .await
        .unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut line))
        .await
        .expect("a first line within 20 s")
        .unwrap();
    (reader, line)
}

/// Sends `line` and reads one reply line.
async fn command(reader: &mut tokio::io::BufReader<tokio::net::TcpStream>, line: &str) -> String {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    reader
        .get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    loop {
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut l))
            .await
            .expect("a reply within 20 s")
            .unwrap();
        reply.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return reply;
        }
    }
}

/// The real agent under a small-scale attack, with small `[ingress_limits]`: 50 idle
/// connections from ten sources fill the session cap (over it each new one closes the one that
/// has waited longest without logging in), a device logging in from an address the agent has not
/// seen still gets in, and the printer — known from its earlier login — passes the cap; then 20
/// wrong-password logins from one source are slowed and locked out (without further password
/// checks) and the printer is still served. Every message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_caps_and_login_lockout_hold_while_the_printer_is_served() {
    let site = AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send],
        agent_config: "[ingress_limits]\nmax_sessions = 40\nmax_sessions_per_source = 5\n\
                       login_slowdown_after = 2\nlogin_max_delay_seconds = 1\n\
                       login_lockout_after = 5\nidle_timeout_seconds = 60\n"
            .into(),
        ..SiteOptions::default()
    })
    .await;
    site.print(1, None).await;

    // 50 idle connections from 127.0.1.1–10 (five each, the per-source cap): the first 40 fill
    // the session cap, and each of the next ten closes the one that has waited longest without
    // logging in (`421 4.3.2`) and takes its slot.
    let mut idle = Vec::new();
    for i in 0..50u8 {
        let (c, line) = greeting_from([127, 0, 1, 1 + i % 10], site.smtp).await;
        assert!(line.starts_with("220 "), "idle connection {i}: {line}");
        idle.push(c);
    }
    for (i, c) in idle.iter_mut().enumerate().take(10) {
        let line = next_line(c).await;
        assert!(
            line.starts_with("421 4.3.2") && line.contains("has not logged in"),
            "idle connection {i}: {line}"
        );
    }
    // A device that never logged in from its address (127.0.4.1) gets in all the same: it
    // closes the next idle one, logs in with its password and sends a message.
    let (mut c, line) = greeting_from([127, 0, 4, 1], site.smtp).await;
    assert!(line.starts_with("220 "), "{line}");
    assert!(next_line(&mut idle[10]).await.starts_with("421 4.3.2"));
    assert!(command(&mut c, "EHLO printer-2").await.starts_with("250"));
    let login = format!("AUTH PLAIN {}", base64_plain(DEVICE_USER, DEVICE_PASSWORD));
    let reply = command(&mut c, &login).await;
    assert!(reply.starts_with("235 "), "{reply}");
    for (line, code) in [
        ("MAIL FROM:<scanner@printer.local>".to_owned(), "250"),
        (format!("RCPT TO:<{ADDRESS}>"), "250"),
        ("DATA".to_owned(), "354"),
        (
            format!(
                "From: scanner@printer.local\r\nTo: {ADDRESS}\r\nSubject: from a new address\r\n\r\nscan\r\n."
            ),
            "250",
        ),
    ] {
        let reply = command(&mut c, &line).await;
        assert!(reply.starts_with(code), "{line:?}: {reply}");
    }
    // The printer known from its earlier login passes the cap without closing anyone.
    site.print(1, None).await;
    eventually(
        "the three messages delivered",
        Duration::from_secs(30),
        || async { (site.upstream_count().await >= 3).then_some(()) },
    )
    .await;
    let untouched = futures::future::join_all(idle[11..].iter_mut().map(|c| async {
        tokio::time::timeout(Duration::from_millis(200), next_line(c))
            .await
            .is_err()
    }))
    .await;
    assert!(
        untouched.iter().all(|quiet| *quiet),
        "a newer idle connection was closed: {untouched:?}"
    );
    drop(idle);

    // 20 wrong passwords for the device's user name from 127.0.2.1.
    let wrong = format!(
        "AUTH PLAIN {}",
        base64_plain(DEVICE_USER, "not-the-password")
    );
    let (mut refused_535, mut locked_421) = (0, 0);
    for _ in 0..20 {
        let (mut c, line) = greeting_from([127, 0, 2, 1], site.smtp).await;
        assert!(line.starts_with("220 "), "{line}");
        command(&mut c, "EHLO attacker").await;
        let reply = command(&mut c, &wrong).await;
        if reply.starts_with("535 5.7.8") {
            refused_535 += 1;
        } else if reply.starts_with("421 4.7.0") && reply.contains("try again in") {
            locked_421 += 1;
        } else {
            panic!("unexpected reply to a wrong password: {reply}");
        }
    }
    assert_eq!((refused_535, locked_421), (5, 15));
    assert!(
        site.log_text()
            .contains("too many failed logins: locked out")
    );
    // The printer (known from its login) is still served although its user name is locked out
    // for everyone else.
    site.print(1, None).await;
    eventually(
        "the fourth message delivered",
        Duration::from_secs(30),
        || async { (site.upstream_count().await >= 4).then_some(()) },
    )
    .await;
}

/// The next line from the server.
async fn next_line(reader: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> String {
    use tokio::io::AsyncBufReadExt as _;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut line))
        .await
        .expect("a line within 20 s")
        .unwrap();
    line
}

fn base64_plain(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// Ingress settings that would open the agent are refused by the broker through the real CLI,
/// naming the field: a source range of the whole internet, and a second device on the same
/// agent with the same login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sources_and_shared_logins_are_refused_naming_the_field() {
    let site = site().await;
    for range in ["0.0.0.0/0", "::/0", "128.0.0.0/1"] {
        let (code, _, err) = site
            .ctl(&[
                "device",
                "update",
                "--tenant",
                TENANT,
                "--name",
                DEVICE,
                "--allowed-source",
                range,
            ])
            .await;
        assert_ne!(code, 0, "{range} accepted");
        assert!(
            err.contains("device.ingress.allowed_sources[0]") && err.contains("too wide"),
            "{range}: {err}"
        );
    }
    let (code, _, err) = site
        .ctl(&[
            "device",
            "create",
            "--tenant",
            TENANT,
            "--name",
            "mfp-2",
            "--agent",
            "site1",
            "--sender-mode",
            "fixed_admin",
            "--admin-mailbox",
            "scan",
            "--ingress-username",
            &DEVICE_USER.to_uppercase(),
        ])
        .await;
    assert_ne!(code, 0, "a second device with the same login was created");
    assert!(
        err.contains("device.ingress.username") && err.contains(DEVICE),
        "{err}"
    );
    // A range of the LAN is fine.
    let (code, _, err) = site
        .ctl(&[
            "device",
            "update",
            "--tenant",
            TENANT,
            "--name",
            DEVICE,
            "--allowed-source",
            "10.0.0.0/8",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
}

/// Sender binding through the real agent: a `login_user` device configured (at the broker) with
/// one user address may send as that user; a message whose `From:` names another user of the
/// tenant is refused with `553 5.7.1` naming the login and the address, and nothing is queued
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_user_device_sends_only_as_its_configured_users() {
    let site = AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send],
        device: Box::new(|dovecot| pb::Device {
            sender_mode: pb::SenderMode::LoginUser as i32,
            smtp: Some(plain_smtp(dovecot.submission_addr())),
            ingress: Some(pb::IngressCredentials {
                username: DEVICE_USER.into(),
                password: DEVICE_PASSWORD.into(),
                user_addresses: vec!["alice@contoso.example".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..SiteOptions::default()
    })
    .await;
    let send = |from: &'static str| {
        let addr = site.smtp;
        async move {
            let (mut c, line) = greeting_from([127, 0, 0, 1], addr).await;
            assert!(line.starts_with("220 "), "{line}");
            command(&mut c, "EHLO mfp").await;
            let auth = command(
                &mut c,
                &format!("AUTH PLAIN {}", base64_plain(DEVICE_USER, DEVICE_PASSWORD)),
            )
            .await;
            assert!(auth.starts_with("235"), "{auth}");
            assert!(
                command(&mut c, "MAIL FROM:<mfp@printer.lan>")
                    .await
                    .starts_with("250")
            );
            assert!(
                command(&mut c, "RCPT TO:<bob@fabrikam.example>")
                    .await
                    .starts_with("250")
            );
            assert!(command(&mut c, "DATA").await.starts_with("354"));
            command(
                &mut c,
                &format!("From: {from}\r\nSubject: scan\r\n\r\nscanned page\r\n."),
            )
            .await
        }
    };
    let reply = send("The CEO <ceo@contoso.example>").await;
    assert!(
        reply.starts_with(&format!(
            "553 5.7.1 Sender <ceo@contoso.example> is not an address login \"{DEVICE_USER}\" (device \"{DEVICE}\") may send as"
        )),
        "{reply}"
    );
    let reply = send("Alice <Alice@Contoso.example>").await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert!(site.log_text().contains("message refused"));
}
