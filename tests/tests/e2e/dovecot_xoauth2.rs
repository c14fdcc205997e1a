//! A real Dovecot validating XOAUTH2 by introspection at the fake identity provider: IMAP, POP3
//! (Exchange style: `AUTH XOAUTH2`, `+`, payload), submission relayed through the test kit's
//! SMTP→LMTP bridge and read back over POP3 byte for byte, and LMTP injection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokenfleet_testkit::dovecot::{Dovecot, DovecotOptions};
use tokenfleet_testkit::fake_idp::{ClientSpec, Endpoint, FakeIdp};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MAILBOX: &str = "printer@contoso.example";
const IO: Duration = Duration::from_secs(15);

/// The fake IdP, an app-only access token for [`MAILBOX`] (client credentials) and a Dovecot
/// validating tokens at the fake's `/introspect`.
async fn setup() -> (FakeIdp, String, Dovecot) {
    let fake = FakeIdp::start().await.unwrap();
    let mut spec = ClientSpec::confidential("daemon-app", "daemon-secret");
    spec.app_only_mailbox = Some(MAILBOX.into());
    fake.register_client(spec);
    let (status, body) = post_form(
        &format!("{}/organizations/oauth2/v2.0/token", fake.base_url()),
        "grant_type=client_credentials&client_id=daemon-app&client_secret=daemon-secret\
         &scope=https%3A%2F%2Foutlook.office365.com%2F.default",
    )
    .await;
    assert_eq!(status, 200, "token request failed: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = json["access_token"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let dovecot = Dovecot::start(DovecotOptions {
        introspection_url: fake.introspection_url(),
    })
    .await
    .unwrap();
    eprintln!("dovecot up in {:?}", started.elapsed());
    (fake, token, dovecot)
}

fn xoauth2(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// A minimal HTTP/1.1 form POST, so the test does not need another HTTP client.
async fn post_form(url: &str, body: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).await.unwrap();
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out.split_once("\r\n\r\n").unwrap().1.to_owned())
}

/// One line-oriented mail protocol connection (IMAP, POP3, SMTP).
struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            r: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    /// One line, without its CRLF.
    async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(IO, self.r.read_until(b'\n', &mut buf))
            .await
            .expect("server answered within the deadline")
            .unwrap();
        assert!(n > 0, "server closed the connection");
        String::from_utf8(buf).unwrap().trim_end().to_owned()
    }

    async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).await.unwrap();
    }

    /// IMAP: lines until the tagged reply; returns (untagged lines, tagged line).
    async fn imap(&mut self, tag: &str, command: &str) -> (Vec<String>, String) {
        self.send(&format!("{tag} {command}")).await;
        self.imap_until(tag).await
    }

    async fn imap_until(&mut self, tag: &str) -> (Vec<String>, String) {
        let mut untagged = Vec::new();
        loop {
            let l = self.line().await;
            if l.starts_with(&format!("{tag} ")) {
                return (untagged, l);
            }
            untagged.push(l);
        }
    }

    /// SMTP: a (possibly multi-line) reply; returns its last line.
    async fn smtp_reply(&mut self) -> String {
        loop {
            let l = self.line().await;
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return l;
            }
        }
    }

    /// POP3 multi-line body after `+OK`: the bytes with dot-stuffing undone, CRLFs kept.
    async fn pop3_multiline(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let n = tokio::time::timeout(IO, self.r.read_until(b'\n', &mut buf))
                .await
                .expect("POP3 body within the deadline")
                .unwrap();
            assert!(
                n > 0,
                "server closed the connection inside a multi-line reply"
            );
            if buf == b".\r\n" {
                return out;
            }
            let line = buf.strip_prefix(b".").unwrap_or(&buf);
            out.extend_from_slice(line);
        }
    }
}

/// A POP3 session logged in with XOAUTH2, Exchange style: `AUTH XOAUTH2`, wait for `+`, then the
/// payload on its own line.
async fn pop3_login(dovecot: &Dovecot, token: &str) -> Conn {
    let mut c = Conn::connect(dovecot.pop3_addr()).await;
    assert!(c.line().await.starts_with("+OK"));
    c.send("AUTH XOAUTH2").await;
    let cont = c.line().await;
    assert!(cont.starts_with('+') && !cont.starts_with("+OK"), "{cont}");
    c.send(&xoauth2(MAILBOX, token)).await;
    let done = c.line().await;
    assert!(
        done.starts_with("+OK"),
        "POP3 login: {done}\n{}",
        dovecot.log()
    );
    c
}

async fn pop3_stat(c: &mut Conn) -> (usize, usize) {
    c.send("STAT").await;
    let stat = c.line().await;
    let mut f = stat.split_whitespace();
    assert_eq!(f.next(), Some("+OK"), "{stat}");
    let n = f.next().unwrap().parse().unwrap();
    let size = f.next().unwrap().parse().unwrap();
    (n, size)
}

#[tokio::test]
async fn imap_xoauth2_with_a_valid_token_logs_in_and_selects_the_inbox() {
    let (fake, token, dovecot) = setup().await;
    dovecot
        .deliver(MAILBOX, b"Subject: waiting\r\n\r\nalready here\r\n")
        .await
        .unwrap();

    let mut c = Conn::connect(dovecot.imap_addr()).await;
    let greeting = c.line().await;
    assert!(greeting.contains("AUTH=XOAUTH2"), "{greeting}");
    let (_, done) = c
        .imap(
            "a1",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(MAILBOX, &token)),
        )
        .await;
    assert!(done.starts_with("a1 OK"), "{done}\n{}", dovecot.log());
    let (untagged, done) = c.imap("a2", "SELECT INBOX").await;
    assert!(done.starts_with("a2 OK"), "{done}");
    assert!(untagged.iter().any(|l| l == "* 1 EXISTS"), "{untagged:?}");
    c.imap("a3", "LOGOUT").await;

    // Dovecot asked the fake, and the fake answered for a token it issued.
    let introspections = fake.requests_to(Endpoint::Introspect);
    assert_eq!(introspections.len(), 1, "{introspections:?}");
    assert_eq!(introspections[0].status, 200);
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn imap_xoauth2_with_a_garbage_token_gets_a_json_challenge_then_no() {
    let (fake, _token, dovecot) = setup().await;
    let mut c = Conn::connect(dovecot.imap_addr()).await;
    c.line().await;
    c.send(&format!(
        "a1 AUTHENTICATE XOAUTH2 {}",
        xoauth2(MAILBOX, "not-a-token")
    ))
    .await;
    let challenge = c.line().await;
    let b64 = challenge
        .strip_prefix("+ ")
        .unwrap_or_else(|| panic!("expected a `+ <base64>` challenge, got {challenge:?}"));
    let json: serde_json::Value = serde_json::from_slice(&B64.decode(b64).unwrap()).unwrap();
    assert_eq!(json["status"], "401", "{json}");
    // XOAUTH2: an empty line acknowledges the challenge; then the final failure arrives.
    c.send("").await;
    let (_, done) = c.imap_until("a1").await;
    assert!(done.starts_with("a1 NO"), "{done}");
    let introspections = fake.requests_to(Endpoint::Introspect);
    assert_eq!(introspections.len(), 1, "{introspections:?}");
    assert_eq!(introspections[0].param("token"), Some("not-a-token"));
    eprintln!("challenge JSON: {json}; final reply: {done}");
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn a_live_token_for_microsoft_graph_is_refused_like_exchange_refuses_it() {
    // Same app, same mailbox, a live token — but for the Graph resource, not the mail protocols.
    let (fake, mail_token, dovecot) = setup().await;
    let (status, body) = post_form(
        &format!("{}/organizations/oauth2/v2.0/token", fake.base_url()),
        "grant_type=client_credentials&client_id=daemon-app&client_secret=daemon-secret\
         &scope=https%3A%2F%2Fgraph.microsoft.com%2F.default",
    )
    .await;
    assert_eq!(status, 200, "token request failed: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let graph_token = json["access_token"].as_str().unwrap().to_owned();
    assert!(fake.access_token_is_live(&graph_token));

    let mut c = Conn::connect(dovecot.imap_addr()).await;
    c.line().await;
    c.send(&format!(
        "a1 AUTHENTICATE XOAUTH2 {}",
        xoauth2(MAILBOX, &graph_token)
    ))
    .await;
    let challenge = c.line().await;
    assert!(challenge.starts_with("+ "), "{challenge}");
    c.send("").await;
    let (_, done) = c.imap_until("a1").await;
    assert!(done.starts_with("a1 NO"), "a Graph token logged in: {done}");

    // Dovecot asked as a resource server for the mail audiences; the fake saw the Graph audience.
    let introspections = fake.requests_to(Endpoint::Introspect);
    assert_eq!(introspections.len(), 1, "{introspections:?}");
    let audiences: Vec<&str> = introspections[0]
        .query
        .iter()
        .filter(|(k, _)| k == "audience")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        audiences,
        tokenfleet_testkit::dovecot::MAIL_AUDIENCES.to_vec(),
        "Dovecot names the audiences it accepts"
    );

    // The mail protocols' token of the same app still logs in.
    let mut c = Conn::connect(dovecot.imap_addr()).await;
    c.line().await;
    let (_, done) = c
        .imap(
            "b1",
            &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(MAILBOX, &mail_token)),
        )
        .await;
    assert!(done.starts_with("b1 OK"), "{done}\n{}", dovecot.log());
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn pop3_xoauth2_exchange_style_logs_in() {
    let (fake, token, dovecot) = setup().await;
    let mut c = pop3_login(&dovecot, &token).await;
    assert_eq!(pop3_stat(&mut c).await, (0, 0));
    c.send("QUIT").await;
    assert!(c.line().await.starts_with("+OK"));
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn lmtp_delivery_shows_up_in_pop3_stat() {
    let (_fake, token, dovecot) = setup().await;
    let message = b"From: a@contoso.example\r\nSubject: injected\r\n\r\n.leading dot\r\nbody\r\n";
    dovecot.deliver(MAILBOX, message).await.unwrap();
    let mut c = pop3_login(&dovecot, &token).await;
    let (n, size) = pop3_stat(&mut c).await;
    assert_eq!(n, 1, "{}", dovecot.log());
    assert!(size > message.len(), "Dovecot adds headers: {size}");
    c.send("RETR 1").await;
    assert!(c.line().await.starts_with("+OK"));
    let got = c.pop3_multiline().await;
    assert!(got.ends_with(message), "{}", String::from_utf8_lossy(&got));
}

/// A message with a base64 attachment and a body line starting with `.` (dot-stuffing).
fn message_with_attachment() -> Vec<u8> {
    let attachment: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let encoded = B64.encode(&attachment);
    let mut m = format!(
        "From: {MAILBOX}\r\nTo: {MAILBOX}\r\nSubject: scan 0042\r\nMessage-ID: <scan-0042@contoso.example>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour scan is attached.\r\n.a line that starts with a dot\r\n..and two\r\n\r\n\
         --b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n"
    );
    for chunk in encoded.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(chunk).unwrap());
        m.push_str("\r\n");
    }
    m.push_str("--b1--\r\n");
    m.into_bytes()
}

fn dot_stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out
}

#[tokio::test]
async fn submission_xoauth2_relays_and_pop3_reads_it_back_byte_identical() {
    let (fake, token, dovecot) = setup().await;
    let mut c = Conn::connect(dovecot.submission_addr()).await;
    assert!(c.line().await.starts_with("220"));
    c.send("EHLO printer.lan").await;
    assert!(c.smtp_reply().await.starts_with("250"));
    c.send(&format!("AUTH XOAUTH2 {}", xoauth2(MAILBOX, &token)))
        .await;
    let auth = c.smtp_reply().await;
    assert!(auth.starts_with("235"), "{auth}\n{}", dovecot.log());
    c.send(&format!("MAIL FROM:<{MAILBOX}>")).await;
    let r = c.smtp_reply().await;
    assert!(r.starts_with("250"), "{r}");
    c.send(&format!("RCPT TO:<{MAILBOX}>")).await;
    let r = c.smtp_reply().await;
    assert!(r.starts_with("250"), "{r}");
    c.send("DATA").await;
    let r = c.smtp_reply().await;
    assert!(r.starts_with("354"), "{r}");
    let message = message_with_attachment();
    c.send_raw(&dot_stuff(&message)).await;
    c.send(".").await;
    let r = c.smtp_reply().await;
    assert!(r.starts_with("250"), "{r}\n{}", dovecot.log());
    c.send("QUIT").await;
    c.smtp_reply().await;

    // The relay answered 250 only after LMTP saved the message, so it is there now.
    let mut p = pop3_login(&dovecot, &token).await;
    assert_eq!(pop3_stat(&mut p).await.0, 1, "{}", dovecot.log());
    p.send("RETR 1").await;
    assert!(p.line().await.starts_with("+OK"));
    let got = p.pop3_multiline().await;
    // What we compare: the retrieved message (POP3 dot-stuffing undone) ends with exactly the
    // bytes sent after DATA (before dot-stuffing), and everything before them is header lines
    // the delivery path prepended: Return-Path, Delivered-To and a Received (LMTP), and a
    // Received (ESMTPA) from submission, with their folded continuation lines. Nothing else.
    assert!(
        got.ends_with(&message),
        "sent message not found byte-identical at the end of:\n{}",
        String::from_utf8_lossy(&got)
    );
    let added = std::str::from_utf8(&got[..got.len() - message.len()]).unwrap();
    eprintln!("headers added on delivery:\n{added}");
    assert!(added.starts_with("Return-Path: <"), "{added}");
    assert!(
        added.contains(&format!("Delivered-To: {MAILBOX}\r\n")),
        "{added}"
    );
    for line in added.split_terminator("\r\n") {
        let folded = line.starts_with([' ', '\t']);
        let name = line.split(':').next().unwrap_or_default();
        assert!(
            folded || ["Return-Path", "Delivered-To", "Received"].contains(&name),
            "unexpected added header line {line:?}"
        );
    }
    let received: Vec<&str> = added
        .split_terminator("\r\n")
        .filter(|l| !l.starts_with([' ', '\t']))
        .filter(|l| l.starts_with("Received:"))
        .collect();
    assert_eq!(received.len(), 2, "{added}");
    assert!(added.contains("with ESMTPA"), "through submission: {added}");
    assert!(added.contains("with LMTP"), "through the bridge: {added}");
    p.send("QUIT").await;
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn imap_oauthbearer_with_a_valid_token_logs_in() {
    let (fake, token, dovecot) = setup().await;
    let addr = dovecot.imap_addr();
    let payload = B64.encode(format!(
        "n,a={MAILBOX},\x01host=127.0.0.1\x01port={}\x01auth=Bearer {token}\x01\x01",
        addr.port()
    ));
    let mut c = Conn::connect(addr).await;
    c.line().await;
    let (_, done) = c
        .imap("a1", &format!("AUTHENTICATE OAUTHBEARER {payload}"))
        .await;
    assert!(done.starts_with("a1 OK"), "{done}\n{}", dovecot.log());
    let (_, done) = c.imap("a2", "SELECT INBOX").await;
    assert!(done.starts_with("a2 OK"), "{done}");
    fake.assert_no_violations().unwrap();
}

#[tokio::test]
async fn submission_xoauth2_with_a_garbage_token_gets_334_json_then_535() {
    let (_fake, _token, dovecot) = setup().await;
    let mut c = Conn::connect(dovecot.submission_addr()).await;
    assert!(c.line().await.starts_with("220"));
    c.send("EHLO printer.lan").await;
    let ehlo = c.smtp_reply().await;
    assert!(ehlo.starts_with("250"), "{ehlo}");
    c.send(&format!("AUTH XOAUTH2 {}", xoauth2(MAILBOX, "not-a-token")))
        .await;
    let challenge = c.smtp_reply().await;
    let b64 = challenge
        .strip_prefix("334 ")
        .unwrap_or_else(|| panic!("expected `334 <base64>`, got {challenge:?}"));
    let json: serde_json::Value = serde_json::from_slice(&B64.decode(b64).unwrap()).unwrap();
    assert_eq!(json["status"], "401", "{json}");
    c.send("").await;
    let done = c.smtp_reply().await;
    assert!(done.starts_with("535"), "{done}");
}

#[tokio::test]
async fn a_non_loopback_introspection_url_is_refused_by_name() {
    let err = Dovecot::start(DovecotOptions {
        introspection_url: "https://idp.example/introspect".into(),
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("introspection_url"),
        "the error names the field: {err}"
    );
}
