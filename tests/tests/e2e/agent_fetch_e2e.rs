//! Fetching end to end: the real agent binary (enrolled at a TLS broker) with a device whose
//! fetch profile points at a real Dovecot — first over POP3, then (the device changed at the
//! broker, pushed to the running agent) over IMAP. A message delivered into Dovecot reaches the
//! agent's local POP3 server, where Python's `poplib`, logging in as the device with its local
//! credentials, retrieves the same bytes; the upstream copy is gone; the broker's fleet status
//! shows `fetched_total` and the maildrop depth within a heartbeat or two.
//!
//! (That nothing is lost or duplicated when the agent dies between storing and deleting is
//! shown in `agent_fetch.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::agent_site::{
    ADDRESS, AgentSite, DEVICE_PASSWORD, DEVICE_USER, HEARTBEAT_SECONDS, SiteOptions, eventually,
    plain_fetch, plain_smtp, xoauth2,
};
use tokenfleet_testkit::dovecot::Dovecot;

/// The device (or an upstream reader): `poplib` against a POP3 server. Mode `local` logs in
/// with USER/PASS, `xoauth2` with AUTH XOAUTH2 (the password argument is the base64 response).
/// Writes every message to `<out_dir>/<n>.eml` (CRLF line ends, dot-stuffing undone), deletes
/// them if asked, prints the count.
const POP_PY: &str = r#"
import poplib, sys, os
mode, port, user, secret, out_dir, dele = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1"
p = poplib.POP3("127.0.0.1", port, timeout=20)
if mode == "local":
    p.user(user)
    p.pass_(secret)
else:
    p._shortcmd("AUTH XOAUTH2")
    p._shortcmd(secret)
count, _ = p.stat()
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    with open(os.path.join(out_dir, "%d.eml" % (i - 1)), "wb") as f:
        f.write(b"\r\n".join(lines) + b"\r\n")
    if dele:
        p.dele(i)
p.quit()
print(count)
"#;

/// Runs [`POP_PY`]; returns the messages, or the error it printed.
async fn try_pop(
    site: &AgentSite,
    mode: &str,
    port: u16,
    secret: &str,
    delete: bool,
) -> Result<Vec<Vec<u8>>, String> {
    let out = tempfile::tempdir_in(site.dir.path()).unwrap();
    let script = site.dir.path().join("pop.py");
    std::fs::write(&script, POP_PY).unwrap();
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(mode)
        .arg(port.to_string())
        .arg(DEVICE_USER)
        .arg(secret)
        .arg(out.path())
        .arg(if delete { "1" } else { "0" })
        .output()
        .await
        .unwrap();
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    let count: usize = String::from_utf8_lossy(&run.stdout).trim().parse().unwrap();
    Ok((0..count)
        .map(|i| std::fs::read(out.path().join(format!("{i}.eml"))).unwrap())
        .collect())
}

/// What the device collects from the agent.
async fn collect(site: &AgentSite, delete: bool) -> Vec<Vec<u8>> {
    match try_pop(site, "local", site.pop3.port(), DEVICE_PASSWORD, delete).await {
        Ok(messages) => messages,
        Err(e) => panic!(
            "the device's POP3 session failed: {e}\nagent log:\n{}",
            site.log_text()
        ),
    }
}

/// Waits until the device collects something from the agent (without deleting it).
async fn collect_some(site: &AgentSite, what: &str) -> Vec<Vec<u8>> {
    eventually(what, Duration::from_secs(30), || async {
        let messages = collect(site, false).await;
        (!messages.is_empty()).then_some(messages)
    })
    .await
}

/// Waits until the upstream mailbox is empty (read over Dovecot's POP3 with a token of its
/// own; a session refused because the agent's fetch holds the mailbox is tried again).
async fn upstream_emptied(site: &AgentSite) {
    let token = site.reader_token().await;
    let response = xoauth2(ADDRESS, &token);
    let port = site.dovecot.pop3_addr().port();
    eventually(
        "the upstream mailbox empty",
        Duration::from_secs(20),
        || async {
            try_pop(site, "xoauth2", port, &response, false)
                .await
                .ok()
                .filter(Vec::is_empty)
                .map(|_| ())
        },
    )
    .await;
}

fn fax(n: u32) -> Vec<u8> {
    format!(
        "From: Fax Gateway <fax@partner.example>\r\nTo: {ADDRESS}\r\nSubject: Fax {n}\r\n\
         Message-ID: <fax-{n}@partner.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nPage {n}.\r\n.a line with a leading dot\r\n\
         ..and two\r\n\r\nend of fax {n}\r\n"
    )
    .into_bytes()
}

async fn status_where(
    site: &AgentSite,
    what: &str,
    check: impl Fn(&pb::DeviceStatus) -> bool,
) -> pb::DeviceStatus {
    eventually(
        what,
        Duration::from_secs(4 * HEARTBEAT_SECONDS + 6),
        || async {
            let status = site.fleet_status().await?.status?;
            check(&status).then_some(status)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_delivered_upstream_reaches_the_device_over_pop3_then_imap() {
    let site = AgentSite::start(SiteOptions {
        device: Box::new(|dovecot: &Dovecot| pb::Device {
            smtp: Some(plain_smtp(dovecot.submission_addr())),
            fetch: Some(plain_fetch(
                pb::FetchProtocol::Pop3,
                dovecot.pop3_addr(),
                10,
            )),
            ..Default::default()
        }),
        ..SiteOptions::default()
    })
    .await;

    // POP3 upstream.
    let first = fax(1);
    site.dovecot.deliver(ADDRESS, &first).await.unwrap();
    let collected = collect_some(&site, "the fax in the agent's maildrop").await;
    assert_eq!(collected.len(), 1);
    assert!(
        collected[0].ends_with(&first),
        "the device got other bytes than were delivered:\n{}",
        String::from_utf8_lossy(&collected[0])
    );
    upstream_emptied(&site).await;
    status_where(&site, "fetched_total in the fleet status", |s| {
        s.fetched_total >= 1 && s.maildrop_depth == 1 && s.health == pb::DeviceHealth::Ok as i32
    })
    .await;

    // The device deletes what it collected; the depth follows.
    let again = collect(&site, true).await;
    assert_eq!(again, collected, "the same bytes on a second RETR");
    status_where(&site, "an empty maildrop in the fleet status", |s| {
        s.maildrop_depth == 0
    })
    .await;
    assert!(collect(&site, false).await.is_empty());

    // The device now fetches over IMAP: the change reaches the running agent.
    let imap = site.dovecot.imap_addr();
    site.update_device(|d| {
        d.fetch = Some(plain_fetch(pb::FetchProtocol::Imap, imap, 10));
    })
    .await;
    let second = fax(2);
    site.dovecot.deliver(ADDRESS, &second).await.unwrap();
    let collected = collect_some(&site, "the second fax (IMAP) in the agent's maildrop").await;
    assert_eq!(collected.len(), 1);
    assert!(
        collected[0].ends_with(&second),
        "{}",
        String::from_utf8_lossy(&collected[0])
    );
    upstream_emptied(&site).await;
    status_where(&site, "fetched_total 2", |s| {
        s.fetched_total >= 2 && s.health == pb::DeviceHealth::Ok as i32
    })
    .await;
    assert!(
        site.log_text().contains("fetch run done"),
        "{}",
        site.log_text()
    );
}
