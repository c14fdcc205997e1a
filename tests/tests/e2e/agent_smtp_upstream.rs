//! The agent's SMTP upstream client and SMTP connection test against a real Dovecot submission
//! service validating tokens at the fake identity provider: delivery read back over POP3 byte
//! for byte (dot-stuffing, 8-bit body), a bad token, OAUTHBEARER-only, STARTTLS and implicit TLS
//! with a private CA, an untrusted certificate, and the probe's verdicts (OK with the
//! certificate, TOKEN_REJECTED, TLS_VERSION_REFUSED against a TLS 1.3-only Dovecot).
//! Replies Dovecot cannot produce (Exchange's 535 5.7.139 …) are covered against a scripted
//! server in `agent/tests/{upstream_smtp,probe}.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokenfleet_agent::probe::smtp::{TOKEN_REJECTED_FIX, test_send};
use tokenfleet_agent::sasl::{AccessToken, Mechanism};
use tokenfleet_agent::upstream::smtp::{Security, SmtpDelivery, SmtpSettings};
use tokenfleet_agent::upstream::tls::{TlsSettings, TlsVersion};
use tokenfleet_agent::upstream::{
    Credentials, Delivery, DeliveryError, FailureKind, OutgoingMessage,
};
use tokenfleet_proto::v1::ConnectionVerdict;
use tokenfleet_testkit::agent_site::{TestPki, dovecot_with_app_token};
use tokenfleet_testkit::dovecot::{Dovecot, DovecotFeatures};
use tokenfleet_testkit::fake_idp::FakeIdp;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

const MAILBOX: &str = "printer@contoso.example";
const IO: Duration = Duration::from_secs(15);

/// Headers, a body line starting with `.`, a line that is just `.`, and 8-bit UTF-8.
const MESSAGE: &[u8] = b"From: printer@contoso.example\r\nTo: printer@contoso.example\r\n\
Subject: scan 42\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n\
caf\xc3\xa9 \xe2\x82\xac 8-bit body\r\nlast line\r\n";

/// The fake IdP, an app-only token for [`MAILBOX`] and a Dovecot with `features`.
async fn setup(features: DovecotFeatures) -> (FakeIdp, String, Dovecot) {
    dovecot_with_app_token(MAILBOX, features).await
}

fn settings(addr: SocketAddr, security: Security, ca_pem: Option<&str>) -> SmtpSettings {
    let mut s = SmtpSettings::new("127.0.0.1", addr.port(), security);
    s.timeout = IO;
    s.helo_name = "agent.test".into();
    s.tls = TlsSettings {
        extra_ca_pem: ca_pem.map(str::to_owned),
        no_system_roots: true,
        ..TlsSettings::default()
    };
    s
}

fn creds(token: &str) -> Credentials {
    Credentials {
        username: MAILBOX.into(),
        token: AccessToken::new(token),
    }
}

async fn send(s: SmtpSettings, token: &str) -> Result<String, DeliveryError> {
    let rcpts = vec![MAILBOX.to_owned()];
    SmtpDelivery::new(s)
        .send(
            OutgoingMessage {
                from: MAILBOX,
                rcpts: &rcpts,
                data: MESSAGE,
            },
            &creds(token),
        )
        .await
        .map(|r| r.final_reply)
}

/// One POP3 connection logged in with XOAUTH2.
struct Pop3 {
    r: BufReader<TcpStream>,
}

impl Pop3 {
    async fn login(dovecot: &Dovecot, token: &str) -> Self {
        let mut c = Self {
            r: BufReader::new(TcpStream::connect(dovecot.pop3_addr()).await.unwrap()),
        };
        assert!(c.line().await.starts_with("+OK"));
        // OAUTHBEARER: offered by every Dovecot these tests start.
        let port = dovecot.pop3_addr().port();
        c.send("AUTH OAUTHBEARER").await;
        assert!(c.line().await.starts_with('+'));
        c.send(&B64.encode(format!(
            "n,a={MAILBOX},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01"
        )))
        .await;
        let done = c.line().await;
        assert!(done.starts_with("+OK"), "POP3 login: {done}");
        c
    }

    async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        tokio::time::timeout(IO, self.r.read_until(b'\n', &mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf).trim_end().to_owned()
    }

    async fn send(&mut self, line: &str) {
        self.r
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    async fn count(&mut self) -> usize {
        self.send("STAT").await;
        let stat = self.line().await;
        stat.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// RETR `n`, dot-stuffing undone.
    async fn retr(&mut self, n: usize) -> Vec<u8> {
        self.send(&format!("RETR {n}")).await;
        assert!(self.line().await.starts_with("+OK"));
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            tokio::time::timeout(IO, self.r.read_until(b'\n', &mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(!buf.is_empty(), "closed inside RETR");
            if buf == b".\r\n" {
                return out;
            }
            out.extend_from_slice(buf.strip_prefix(b".").unwrap_or(&buf));
        }
    }
}

/// Waits until the mailbox holds `n` messages; returns them.
async fn read_back(dovecot: &Dovecot, token: &str, n: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + IO;
    loop {
        let mut c = Pop3::login(dovecot, token).await;
        let count = c.count().await;
        if count >= n {
            let mut all = Vec::new();
            for i in 1..=count {
                all.push(c.retr(i).await);
            }
            c.send("QUIT").await;
            return all;
        }
        c.send("QUIT").await;
        assert!(
            Instant::now() < deadline,
            "only {count} of {n} messages arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_delivered(got: &[u8]) {
    assert!(
        got.ends_with(MESSAGE),
        "sent message not found byte-identical at the end of:\n{}",
        String::from_utf8_lossy(got)
    );
}

#[tokio::test]
async fn xoauth2_delivery_reads_back_byte_identical_over_pop3() {
    let (_fake, token, dovecot) = setup(DovecotFeatures::default()).await;
    let reply = send(
        settings(dovecot.submission_addr(), Security::None, None),
        &token,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", dovecot.log()));
    assert!(reply.starts_with("250"), "{reply}");
    let got = read_back(&dovecot, &token, 1).await;
    assert_delivered(&got[0]);
}

#[tokio::test]
async fn bad_token_is_auth_rejected_with_the_challenge_and_the_probe_says_token_rejected() {
    let (_fake, _token, dovecot) = setup(DovecotFeatures::default()).await;
    let s = settings(dovecot.submission_addr(), Security::None, None);
    let err = send(s.clone(), "not-a-token-the-idp-issued")
        .await
        .unwrap_err();
    assert_eq!(err.kind, FailureKind::AuthRejected, "{err:?}");
    assert!(err.final_reply.starts_with("535"), "{}", err.final_reply);
    let json = err.auth_challenge_json.as_deref().unwrap();
    assert!(json.contains("\"status\""), "{json}");

    let r = test_send(
        &s,
        Some(&creds("not-a-token-the-idp-issued")),
        "",
        Instant::now() + IO,
    )
    .await;
    assert_eq!(r.verdict(), ConnectionVerdict::TokenRejected, "{r:?}");
    assert!(
        r.summary.starts_with("535") && r.summary.contains("\"status\""),
        "{}",
        r.summary
    );
    assert_eq!(r.fix, TOKEN_REJECTED_FIX);
}

#[tokio::test]
async fn oauthbearer_only_dovecot() {
    let (_fake, token, dovecot) = setup(DovecotFeatures {
        auth_mechanisms: Some("oauthbearer".into()),
        ..DovecotFeatures::default()
    })
    .await;
    let s = settings(dovecot.submission_addr(), Security::None, None);
    send(s.clone(), &token)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dovecot.log()));
    assert_delivered(&read_back(&dovecot, &token, 1).await[0]);

    let mut xoauth2_only = s;
    xoauth2_only.mechanisms = vec![Mechanism::XOAuth2];
    let err = send(xoauth2_only, &token).await.unwrap_err();
    assert_eq!(
        err.final_reply,
        "server offers no XOAUTH2 (offers: OAUTHBEARER)"
    );
}

#[tokio::test]
async fn starttls_and_implicit_tls_with_a_private_ca() {
    let pki = TestPki::new("tokenfleet test CA");
    let (_fake, token, dovecot) = setup(pki.dovecot_features()).await;
    let ca = Some(pki.ca_pem.as_str());

    send(
        settings(dovecot.submission_addr(), Security::Starttls, ca),
        &token,
    )
    .await
    .unwrap_or_else(|e| panic!("STARTTLS: {e:?}\n{}", dovecot.log()));
    let submissions = dovecot.submissions_addr().unwrap();
    send(settings(submissions, Security::ImplicitTls, ca), &token)
        .await
        .unwrap_or_else(|e| panic!("implicit TLS: {e:?}\n{}", dovecot.log()));
    let got = read_back(&dovecot, &token, 2).await;
    assert_eq!(got.len(), 2);
    for m in &got {
        assert_delivered(m);
    }

    // POP3S and IMAPS (for the fetch side) greet over TLS with the same certificate.
    let tls = TlsSettings {
        extra_ca_pem: Some(pki.ca_pem.clone()),
        no_system_roots: true,
        ..TlsSettings::default()
    };
    for (addr, greeting) in [
        (dovecot.pop3s_addr().unwrap(), "+OK"),
        (dovecot.imaps_addr().unwrap(), "* OK"),
    ] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = tls.connect("127.0.0.1", tcp, IO).await.unwrap();
        let mut line = String::new();
        tokio::time::timeout(IO, BufReader::new(stream).read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert!(line.starts_with(greeting), "{addr}: {line}");
    }

    // Without the CA the certificate is not trusted: nothing is sent.
    let err = send(
        settings(dovecot.submission_addr(), Security::Starttls, None),
        &token,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert!(
        err.final_reply
            .starts_with("tls handshake with 127.0.0.1 failed")
            && err.final_reply.contains("UnknownIssuer"),
        "{}",
        err.final_reply
    );

    // The probe: OK with the certificate details.
    let r = test_send(
        &settings(dovecot.submission_addr(), Security::Starttls, ca),
        Some(&creds(&token)),
        "",
        Instant::now() + IO,
    )
    .await;
    assert_eq!(r.verdict(), ConnectionVerdict::Ok, "{r:?}");
    let names: Vec<&str> = r.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dns", "tcp", "greeting", "ehlo", "starttls", "tls", "ehlo", "auth", "quit"
        ]
    );
    let c = r.certificate.as_ref().unwrap();
    assert_eq!(c.subject, "O=tokenfleet, CN=127.0.0.1");
    assert_eq!(c.issuer, "O=tokenfleet, CN=tokenfleet test CA");
    assert!(c.tls_version.starts_with("TLSv1."), "{c:?}");
    assert!(!c.cipher_suite.is_empty() && c.sha256_fingerprint.len() == 64);

    // Untrusted, and the certificate is still shown.
    let r = test_send(
        &settings(submissions, Security::ImplicitTls, None),
        Some(&creds(&token)),
        "",
        Instant::now() + IO,
    )
    .await;
    assert_eq!(
        r.verdict(),
        ConnectionVerdict::CertificateUntrusted,
        "{r:?}"
    );
    assert_eq!(
        r.certificate.as_ref().unwrap().subject,
        "O=tokenfleet, CN=127.0.0.1"
    );
    assert!(!format!("{r:?}").contains(&token));
}

#[tokio::test]
async fn tls13_only_dovecot_refuses_a_tls12_client() {
    let pki = TestPki::new("tokenfleet test CA");
    let (_fake, token, dovecot) = setup(pki.dovecot_features_with_min_tls(Some("TLSv1.3"))).await;
    let mut s = settings(
        dovecot.submission_addr(),
        Security::Starttls,
        Some(&pki.ca_pem),
    );
    s.tls.max_version = Some(TlsVersion::Tls12);
    let r = test_send(&s, Some(&creds(&token)), "", Instant::now() + IO).await;
    assert_eq!(
        r.verdict(),
        ConnectionVerdict::TlsVersionRefused,
        "{r:?}\n{}",
        dovecot.log()
    );
    assert!(r.summary.contains("TLSv1.2"), "{}", r.summary);
    // The default range (1.2–1.3) works.
    s.tls.max_version = None;
    let r = test_send(&s, Some(&creds(&token)), "", Instant::now() + IO).await;
    assert_eq!(r.verdict(), ConnectionVerdict::Ok, "{r:?}");
    assert_eq!(r.certificate.as_ref().unwrap().tls_version, "TLSv1.3");
}
