//! The SMTP connection test against scripted servers on 127.0.0.1: every verdict a real server
//! can cause (OK with the certificate, refused, untrusted, name mismatch, expired, TLS version,
//! STARTTLS or mechanism missing, 535 5.7.139, 535 5.7.3, no token, silence). The same test
//! against a real Dovecot is in `tests/tests/e2e/agent_smtp_upstream.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::smtp_support::{AuthAnswer, Script, ScriptedSmtp, TestCa, server_config};
use tokenfleet_agent::probe::smtp::{SMTP_AUTH_DISABLED_FIX, TOKEN_REJECTED_FIX, test_send};
use tokenfleet_agent::sasl::AccessToken;
use tokenfleet_agent::upstream::Credentials;
use tokenfleet_agent::upstream::smtp::{Security, SmtpSettings};
use tokenfleet_agent::upstream::tls::{TlsSettings, TlsVersion};
use tokenfleet_proto::v1::{ConnectionTarget, ConnectionTestResult, ConnectionVerdict};
use tokio::time::Instant;

const TOKEN: &str = "tok-probe-smtp-0123456789";

fn creds() -> Credentials {
    Credentials {
        username: "scan@contoso.example".into(),
        token: AccessToken::new(TOKEN),
    }
}

fn settings(host: &str, port: u16, security: Security, ca: Option<&TestCa>) -> SmtpSettings {
    let mut s = SmtpSettings::new(host, port, security);
    s.timeout = Duration::from_secs(5);
    s.tls = TlsSettings {
        extra_ca_pem: ca.map(TestCa::pem),
        no_system_roots: true,
        ..TlsSettings::default()
    };
    s
}

async fn probe(s: &SmtpSettings) -> ConnectionTestResult {
    let result = test_send(
        s,
        Some(&creds()),
        "unused",
        Instant::now() + Duration::from_secs(10),
    )
    .await;
    let text = format!("{result:?}");
    assert!(!text.contains(TOKEN), "token in the result: {text}");
    result
}

fn steps(r: &ConnectionTestResult) -> Vec<(String, bool)> {
    r.steps.iter().map(|s| (s.name.clone(), s.ok)).collect()
}

fn names(list: &[(&str, bool)]) -> Vec<(String, bool)> {
    list.iter().map(|(n, ok)| ((*n).to_owned(), *ok)).collect()
}

#[tokio::test]
async fn ok_over_starttls_reports_every_step_and_the_certificate() {
    let ca = TestCa::new("probe CA");
    let cert = ca.issue(&["127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        starttls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        auth_only_after_tls: true,
        ..Script::default()
    })
    .await;
    let s = settings(
        "127.0.0.1",
        server.addr.port(),
        Security::Starttls,
        Some(&ca),
    );
    let r = probe(&s).await;
    assert_eq!(r.verdict(), ConnectionVerdict::Ok, "{r:?}");
    assert_eq!(r.target(), ConnectionTarget::Send);
    assert_eq!(r.endpoint, format!("127.0.0.1:{}", server.addr.port()));
    assert!(r.fix.is_empty());
    assert!(
        r.summary
            .starts_with("authenticated as scan@contoso.example with XOAUTH2 at 127.0.0.1:")
            && r.summary
                .ends_with("over TLSv1.3: 235 2.7.0 Authentication successful"),
        "{}",
        r.summary
    );
    assert_eq!(
        steps(&r),
        names(&[
            ("dns", true),
            ("tcp", true),
            ("greeting", true),
            ("ehlo", true),
            ("starttls", true),
            ("tls", true),
            ("ehlo", true),
            ("auth", true),
            ("quit", true),
        ])
    );
    let c = r.certificate.as_ref().unwrap();
    assert_eq!(c.subject, "CN=127.0.0.1");
    assert_eq!(c.issuer, "CN=probe CA");
    assert_eq!(c.tls_version, "TLSv1.3");
    assert!(c.cipher_suite.starts_with("TLS13_"), "{}", c.cipher_suite);
    assert_eq!(c.sha256_fingerprint.len(), 64);
    assert!(c.not_before.is_some() && c.not_after.is_some());
    assert!(r.time.is_some());
}

#[tokio::test]
async fn implicit_tls_ok_with_dns_names() {
    let ca = TestCa::new("probe CA");
    let cert = ca.issue(&["localhost", "127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        implicit_tls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        ..Script::default()
    })
    .await;
    let s = settings(
        "127.0.0.1",
        server.addr.port(),
        Security::ImplicitTls,
        Some(&ca),
    );
    let r = probe(&s).await;
    assert_eq!(r.verdict(), ConnectionVerdict::Ok, "{r:?}");
    assert_eq!(r.certificate.as_ref().unwrap().dns_names, ["localhost"]);
    assert_eq!(steps(&r)[2], ("tls".to_owned(), true));
}

#[tokio::test]
async fn closed_port_is_connection_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = probe(&settings("127.0.0.1", port, Security::Starttls, None)).await;
    assert_eq!(r.verdict(), ConnectionVerdict::ConnectionRefused, "{r:?}");
    assert_eq!(r.summary, format!("connection to 127.0.0.1:{port} refused"));
    assert!(r.fix.contains("587"));
    assert_eq!(steps(&r), names(&[("dns", true), ("tcp", false)]));
}

#[tokio::test]
async fn certificate_from_an_unknown_ca_is_untrusted_and_still_shown() {
    let ca = TestCa::new("probe CA");
    let other = TestCa::new("Other Issuing CA");
    let cert = other.issue(&["127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        starttls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        ..Script::default()
    })
    .await;
    let r = probe(&settings(
        "127.0.0.1",
        server.addr.port(),
        Security::Starttls,
        Some(&ca),
    ))
    .await;
    assert_eq!(
        r.verdict(),
        ConnectionVerdict::CertificateUntrusted,
        "{r:?}"
    );
    assert!(
        r.summary.contains("unknown issuer") && r.summary.contains("CN=Other Issuing CA"),
        "{}",
        r.summary
    );
    assert!(r.fix.contains("extra trusted CA"));
    let c = r.certificate.as_ref().unwrap();
    assert_eq!(c.issuer, "CN=Other Issuing CA");
    assert!(
        !r.steps.iter().any(|s| s.name == "auth"),
        "nothing sent after a failed TLS"
    );
}

#[tokio::test]
async fn certificate_for_another_name_is_a_name_mismatch() {
    let ca = TestCa::new("probe CA");
    let cert = ca.issue(&["mail.other.example"]);
    let server = ScriptedSmtp::start(Script {
        implicit_tls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        ..Script::default()
    })
    .await;
    let r = probe(&settings(
        "127.0.0.1",
        server.addr.port(),
        Security::ImplicitTls,
        Some(&ca),
    ))
    .await;
    assert_eq!(
        r.verdict(),
        ConnectionVerdict::CertificateNameMismatch,
        "{r:?}"
    );
    assert!(
        r.summary.contains("not valid for 127.0.0.1") && r.summary.contains("mail.other.example"),
        "{}",
        r.summary
    );
    assert_eq!(
        r.certificate.as_ref().unwrap().dns_names,
        ["mail.other.example"]
    );
}

#[tokio::test]
async fn expired_certificate_says_expired() {
    let ca = TestCa::new("probe CA");
    let cert = ca.issue_with(&["127.0.0.1"], |p| {
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
        p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    });
    let server = ScriptedSmtp::start(Script {
        implicit_tls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        ..Script::default()
    })
    .await;
    let r = probe(&settings(
        "127.0.0.1",
        server.addr.port(),
        Security::ImplicitTls,
        Some(&ca),
    ))
    .await;
    assert_eq!(
        r.verdict(),
        ConnectionVerdict::CertificateUntrusted,
        "{r:?}"
    );
    assert!(
        r.summary.contains("has expired (not after "),
        "{}",
        r.summary
    );
    assert!(r.fix.contains("renew"));
}

#[tokio::test]
async fn tls13_only_server_refuses_a_tls12_client() {
    let ca = TestCa::new("probe CA");
    let cert = ca.issue(&["127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        implicit_tls: Some(server_config(&cert, &[&rustls::version::TLS13])),
        ..Script::default()
    })
    .await;
    let mut s = settings(
        "127.0.0.1",
        server.addr.port(),
        Security::ImplicitTls,
        Some(&ca),
    );
    s.tls.max_version = Some(TlsVersion::Tls12);
    let r = probe(&s).await;
    assert_eq!(r.verdict(), ConnectionVerdict::TlsVersionRefused, "{r:?}");
    assert!(r.summary.contains("(TLSv1.2)"), "{}", r.summary);
    // The look-only handshake (any version) still shows the certificate.
    assert_eq!(r.certificate.as_ref().unwrap().tls_version, "TLSv1.3");
}

#[tokio::test]
async fn starttls_not_offered() {
    let server = ScriptedSmtp::start(Script::default()).await;
    let r = probe(&settings(
        "127.0.0.1",
        server.addr.port(),
        Security::Starttls,
        None,
    ))
    .await;
    assert_eq!(r.verdict(), ConnectionVerdict::TlsFailed, "{r:?}");
    assert!(
        r.summary.contains("does not offer STARTTLS"),
        "{}",
        r.summary
    );
    assert_eq!(steps(&r).last().unwrap(), &("starttls".to_owned(), false));
}

#[tokio::test]
async fn mechanism_not_offered() {
    let server = ScriptedSmtp::start(Script {
        auth_line: "AUTH PLAIN LOGIN".into(),
        ..Script::default()
    })
    .await;
    let r = probe(&settings(
        "127.0.0.1",
        server.addr.port(),
        Security::None,
        None,
    ))
    .await;
    assert_eq!(r.verdict(), ConnectionVerdict::MechanismNotOffered, "{r:?}");
    assert_eq!(
        r.summary,
        "server offers no XOAUTH2/OAUTHBEARER (offers: PLAIN LOGIN)"
    );
}

#[tokio::test]
async fn smtp_auth_disabled_gives_the_exchange_fix() {
    let reply = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.";
    let server = ScriptedSmtp::start(Script {
        auth: AuthAnswer::Reject {
            challenge: None,
            final_reply: reply.into(),
        },
        ..Script::default()
    })
    .await;
    let r = probe(&settings(
        "127.0.0.1",
        server.addr.port(),
        Security::None,
        None,
    ))
    .await;
    assert_eq!(r.verdict(), ConnectionVerdict::SmtpAuthDisabled, "{r:?}");
    assert_eq!(r.summary, reply);
    assert_eq!(r.fix, SMTP_AUTH_DISABLED_FIX);
    assert!(r.fix.contains("Set-CASMailbox") && r.fix.contains("Authenticated SMTP"));
    assert_eq!(steps(&r).last().unwrap(), &("quit".to_owned(), true));
}

#[tokio::test]
async fn rejected_token_names_audience_and_scope() {
    let server = ScriptedSmtp::start(Script {
        auth: AuthAnswer::Reject {
            challenge: None,
            final_reply: "535 5.7.3 Authentication unsuccessful".into(),
        },
        ..Script::default()
    })
    .await;
    let r = probe(&settings(
        "127.0.0.1",
        server.addr.port(),
        Security::None,
        None,
    ))
    .await;
    assert_eq!(r.verdict(), ConnectionVerdict::TokenRejected, "{r:?}");
    assert_eq!(r.summary, "535 5.7.3 Authentication unsuccessful");
    assert_eq!(r.fix, TOKEN_REJECTED_FIX);
}

#[tokio::test]
async fn no_token_runs_the_connection_steps_then_says_why() {
    let server = ScriptedSmtp::start(Script::default()).await;
    let s = settings("127.0.0.1", server.addr.port(), Security::None, None);
    let r = test_send(
        &s,
        None,
        "mailbox scan is REAUTH_REQUIRED: AADSTS700082 refresh token expired",
        Instant::now() + Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.verdict(), ConnectionVerdict::NoToken, "{r:?}");
    assert_eq!(
        r.summary,
        "mailbox scan is REAUTH_REQUIRED: AADSTS700082 refresh token expired"
    );
    assert!(r.fix.contains("consent"));
    assert_eq!(
        steps(&r),
        names(&[
            ("dns", true),
            ("tcp", true),
            ("greeting", true),
            ("ehlo", true),
            ("auth", false),
            ("quit", true),
        ])
    );
}

#[tokio::test]
async fn silent_server_is_a_timeout_within_the_deadline() {
    let server = ScriptedSmtp::start(Script {
        raw_greeting: Some(Vec::new()),
        ..Script::default()
    })
    .await;
    let s = settings("127.0.0.1", server.addr.port(), Security::None, None);
    let started = std::time::Instant::now();
    let r = test_send(
        &s,
        Some(&creds()),
        "",
        Instant::now() + Duration::from_millis(400),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(r.verdict(), ConnectionVerdict::Timeout, "{r:?}");
    assert!(
        r.summary.starts_with("greeting at 127.0.0.1:"),
        "{}",
        r.summary
    );
}
