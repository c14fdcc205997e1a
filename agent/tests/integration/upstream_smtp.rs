//! The SMTP upstream client against a scripted submission server on 127.0.0.1: STARTTLS and
//! implicit TLS with a private CA, AUTH in one line and in two steps, the error challenge,
//! Exchange's `535 5.7.139`, partial recipient refusal, hostile and silent servers. The same
//! client against a real Dovecot is in `tests/tests/e2e/agent_smtp_upstream.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::smtp_support::{AuthAnswer, Script, ScriptedSmtp, TestCa, server_config};
use base64::Engine as _;
use tokenfleet_agent::sasl::{AccessToken, Mechanism};
use tokenfleet_agent::upstream::smtp::{Security, SmtpDelivery, SmtpSettings};
use tokenfleet_agent::upstream::tls::TlsSettings;
use tokenfleet_agent::upstream::{
    Credentials, Delivery, DeliveryError, DeliveryReceipt, FailureKind, OutgoingMessage,
};

const TOKEN: &str = "tok-upstream-smtp-0123456789";
const FROM: &str = "scan@contoso.example";

fn creds(token: &str) -> Credentials {
    Credentials {
        username: FROM.into(),
        token: AccessToken::new(token),
    }
}

fn settings(port: u16, security: Security, ca: Option<&TestCa>) -> SmtpSettings {
    let mut s = SmtpSettings::new("127.0.0.1", port, security);
    s.timeout = Duration::from_secs(5);
    s.helo_name = "agent.test".into();
    s.tls = TlsSettings {
        extra_ca_pem: ca.map(TestCa::pem),
        no_system_roots: true,
        ..TlsSettings::default()
    };
    s
}

const MESSAGE: &[u8] = b"From: scan@contoso.example\r\nTo: a@example.net\r\nSubject: scan\r\n\r\n\
.leading dot line\r\n..two dots\r\n.\r\nbody with 8-bit \xc3\xa9\xe2\x82\xac\r\n";

async fn send(
    s: SmtpSettings,
    rcpts: &[&str],
    token: &str,
) -> Result<DeliveryReceipt, DeliveryError> {
    let rcpts: Vec<String> = rcpts.iter().map(|r| (*r).to_owned()).collect();
    let delivery = SmtpDelivery::new(s);
    delivery
        .send(
            OutgoingMessage {
                from: FROM,
                rcpts: &rcpts,
                data: MESSAGE,
            },
            &creds(token),
        )
        .await
}

fn assert_no_token(text: &str) {
    assert!(!text.contains(TOKEN), "token leaked: {text}");
    let payload = base64::engine::general_purpose::STANDARD
        .encode(format!("user={FROM}\x01auth=Bearer {TOKEN}\x01\x01"));
    assert!(!text.contains(&payload), "payload leaked: {text}");
}

#[tokio::test]
async fn starttls_with_a_private_ca_delivers_byte_for_byte() {
    let ca = TestCa::new("test CA");
    let cert = ca.issue(&["127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        starttls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        auth_only_after_tls: true,
        ..Script::default()
    })
    .await;
    let receipt = send(
        settings(server.addr.port(), Security::Starttls, Some(&ca)),
        &["a@example.net"],
        TOKEN,
    )
    .await
    .unwrap();
    assert_eq!(receipt.final_reply, "250 2.0.0 queued as SCRIPTED1");
    let seen = &server.wait_sessions(1).await[0];
    assert!(seen.tls);
    assert_eq!(
        seen.data, MESSAGE,
        "dot-stuffing undone gives the same bytes"
    );
    let mail = seen.mail_from.as_deref().unwrap();
    assert_eq!(
        mail,
        format!("MAIL FROM:<{FROM}> SIZE={} BODY=8BITMIME", MESSAGE.len())
    );
    let verbs: Vec<&str> = seen.commands.iter().map(String::as_str).collect();
    assert_eq!(
        verbs,
        [
            "EHLO agent.test",
            "STARTTLS",
            "EHLO agent.test",
            "AUTH XOAUTH2 <initial response>",
            mail,
            "RCPT TO:<a@example.net>",
            "DATA",
            "QUIT"
        ]
    );
}

#[tokio::test]
async fn implicit_tls_and_a_long_token_uses_the_two_step_auth() {
    let ca = TestCa::new("test CA");
    let cert = ca.issue(&["127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        implicit_tls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        ..Script::default()
    })
    .await;
    // An Exchange-sized token: the AUTH line would exceed 512 octets.
    let long = format!("eyJ0eXAiOiJKV1Qi.{}", "x".repeat(2500));
    send(
        settings(server.addr.port(), Security::ImplicitTls, Some(&ca)),
        &["a@example.net"],
        &long,
    )
    .await
    .unwrap();
    let seen = &server.wait_sessions(1).await[0];
    assert!(seen.tls);
    assert!(
        seen.commands.contains(&"AUTH XOAUTH2".to_owned()),
        "{:?}",
        seen.commands
    );
    assert_eq!(seen.data, MESSAGE);
}

#[tokio::test]
async fn oauthbearer_is_used_when_it_is_the_only_mechanism() {
    let server = ScriptedSmtp::start(Script {
        auth_line: "AUTH PLAIN OAUTHBEARER".into(),
        ..Script::default()
    })
    .await;
    send(
        settings(server.addr.port(), Security::None, None),
        &["a@example.net"],
        TOKEN,
    )
    .await
    .unwrap();
    assert!(
        server.wait_sessions(1).await[0]
            .commands
            .contains(&"AUTH OAUTHBEARER <initial response>".to_owned())
    );
}

#[tokio::test]
async fn mechanism_preference_is_honoured() {
    let server = ScriptedSmtp::start(Script::default()).await;
    let mut s = settings(server.addr.port(), Security::None, None);
    s.mechanisms = vec![Mechanism::OAuthBearer, Mechanism::XOAuth2];
    send(s, &["a@example.net"], TOKEN).await.unwrap();
    assert!(
        server.wait_sessions(1).await[0]
            .commands
            .contains(&"AUTH OAUTHBEARER <initial response>".to_owned())
    );
}

#[tokio::test]
async fn no_oauth_mechanism_fails_clearly() {
    let server = ScriptedSmtp::start(Script {
        auth_line: "AUTH PLAIN LOGIN".into(),
        ..Script::default()
    })
    .await;
    let err = send(
        settings(server.addr.port(), Security::None, None),
        &["a@example.net"],
        TOKEN,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert_eq!(
        err.final_reply,
        "server offers no XOAUTH2/OAUTHBEARER (offers: PLAIN LOGIN)"
    );
}

#[tokio::test]
async fn starttls_not_offered_stops_before_auth() {
    let server = ScriptedSmtp::start(Script::default()).await;
    let err = send(
        settings(server.addr.port(), Security::Starttls, None),
        &["a@example.net"],
        TOKEN,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert!(
        err.final_reply.contains("does not offer STARTTLS"),
        "{}",
        err.final_reply
    );
    // No AUTH went out in clear.
    let seen = server.wait_sessions(1).await;
    assert_eq!(seen.len(), 1);
    assert!(
        seen.iter()
            .all(|s| !s.commands.iter().any(|c| c.starts_with("AUTH")))
    );
}

#[tokio::test]
async fn rejected_token_answers_the_challenge_and_reports_both() {
    let json =
        r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/SMTP.Send"}"#;
    let server = ScriptedSmtp::start(Script {
        auth: AuthAnswer::Reject {
            challenge: Some(base64::engine::general_purpose::STANDARD.encode(json)),
            final_reply: "535 5.7.3 Authentication unsuccessful".into(),
        },
        ..Script::default()
    })
    .await;
    let err = send(
        settings(server.addr.port(), Security::None, None),
        &["a@example.net"],
        TOKEN,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::AuthRejected);
    assert!(
        err.final_reply
            .starts_with("535 5.7.3 Authentication unsuccessful")
    );
    let challenge: serde_json::Value =
        serde_json::from_str(err.auth_challenge_json.as_deref().unwrap()).unwrap();
    assert_eq!(challenge["status"], "401");
    assert!(
        server.wait_sessions(1).await[0]
            .commands
            .contains(&"challenge answer \"\"".to_owned()),
        "XOAUTH2 answers the challenge with an empty line"
    );
    assert_no_token(&format!("{err:?} {err}"));
}

#[tokio::test]
async fn smtp_auth_disabled_keeps_the_message_queued() {
    let reply = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.";
    let server = ScriptedSmtp::start(Script {
        auth: AuthAnswer::Reject {
            challenge: None,
            final_reply: reply.into(),
        },
        ..Script::default()
    })
    .await;
    let err = send(
        settings(server.addr.port(), Security::None, None),
        &["a@example.net"],
        TOKEN,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.kind,
        FailureKind::Transient,
        "a new token would not help"
    );
    assert!(err.final_reply.starts_with(reply), "{}", err.final_reply);
}

#[tokio::test]
async fn some_recipients_refused_are_reported_in_the_receipt() {
    let server = ScriptedSmtp::start(Script {
        refuse_rcpts: vec![(
            "gone@example.net".into(),
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound".into(),
        )],
        ..Script::default()
    })
    .await;
    let receipt = send(
        settings(server.addr.port(), Security::None, None),
        &["a@example.net", "gone@example.net", "b@example.net"],
        TOKEN,
    )
    .await
    .unwrap();
    assert_eq!(
        receipt.final_reply,
        "250 2.0.0 queued as SCRIPTED1; refused recipients: <gone@example.net>: 550 5.1.10 RESOLVER.ADR.RecipientNotFound"
    );
    assert_eq!(
        server.wait_sessions(1).await[0].rcpts,
        ["a@example.net", "b@example.net"]
    );
}

#[tokio::test]
async fn all_recipients_refused_is_permanent_and_4xx_is_transient() {
    let server = ScriptedSmtp::start(Script {
        refuse_rcpts: vec![
            ("gone@example.net".into(), "550 5.1.1 no such user".into()),
            ("busy@example.net".into(), "452 4.2.2 mailbox full".into()),
        ],
        ..Script::default()
    })
    .await;
    let port = server.addr.port();
    let err = send(
        settings(port, Security::None, None),
        &["gone@example.net"],
        TOKEN,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::Permanent);
    assert!(
        err.final_reply.contains("550 5.1.1 no such user"),
        "{}",
        err.final_reply
    );
    let err = send(
        settings(port, Security::None, None),
        &["a@example.net", "busy@example.net"],
        TOKEN,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert!(
        err.final_reply.starts_with("452 4.2.2"),
        "{}",
        err.final_reply
    );
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_error() {
    let ca = TestCa::new("test CA");
    let other = TestCa::new("other CA");
    let cert = other.issue(&["127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        starttls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        ..Script::default()
    })
    .await;
    let err = send(
        settings(server.addr.port(), Security::Starttls, Some(&ca)),
        &["a@example.net"],
        TOKEN,
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
}

#[tokio::test]
async fn hostile_and_silent_servers_fail_transiently_without_panic() {
    for (raw, expect) in [
        (vec![b'2'; 200_000], "longer than 8192 octets"),
        (b"220-ok\r\n".repeat(1000), "longer than 256 lines"),
        (
            b"HTTP/1.1 400 Bad Request\r\n".to_vec(),
            "not an SMTP reply line",
        ),
        (
            b"554 5.3.2 no service for you\r\n".to_vec(),
            "greeting refused",
        ),
        (Vec::new(), "no answer within"),
    ] {
        let server = ScriptedSmtp::start(Script {
            raw_greeting: Some(raw),
            ..Script::default()
        })
        .await;
        let mut s = settings(server.addr.port(), Security::None, None);
        s.timeout = Duration::from_millis(300);
        let err = send(s, &["a@example.net"], TOKEN).await.unwrap_err();
        assert_eq!(err.kind, FailureKind::Transient);
        assert!(
            err.final_reply.contains(expect),
            "{expect}: {}",
            err.final_reply
        );
    }
}

#[tokio::test]
async fn connection_refused_is_transient_and_nothing_leaks() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = settings(port, Security::Starttls, None);
    let delivery = SmtpDelivery::new(s);
    assert_no_token(&format!("{delivery:?} {:?}", creds(TOKEN)));
    let err = send(
        settings(port, Security::Starttls, None),
        &["a@example.net"],
        TOKEN,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind, FailureKind::Transient);
    assert!(
        err.final_reply
            .starts_with(&format!("connecting to 127.0.0.1:{port}:")),
        "{}",
        err.final_reply
    );
}

async fn send_with(delivery: &SmtpDelivery, token: &str) -> Result<DeliveryReceipt, DeliveryError> {
    let rcpts = vec!["a@example.net".to_owned()];
    delivery
        .send(
            OutgoingMessage {
                from: FROM,
                rcpts: &rcpts,
                data: MESSAGE,
            },
            &creds(token),
        )
        .await
}

/// Several messages of one mailbox go over one session (one TLS handshake and AUTH), with RSET
/// between them and RSET/MAIL/RCPT in one write where PIPELINING is offered; dropping the
/// delivery ends the session with QUIT.
#[tokio::test]
async fn messages_of_one_mailbox_reuse_the_session_with_pipelining() {
    let ca = TestCa::new("test CA");
    let cert = ca.issue(&["127.0.0.1"]);
    let server = ScriptedSmtp::start(Script {
        starttls: Some(server_config(&cert, rustls::DEFAULT_VERSIONS)),
        auth_only_after_tls: true,
        extra_ehlo: vec!["PIPELINING".into(), "SIZE 10485760".into()],
        ..Script::default()
    })
    .await;
    let delivery = SmtpDelivery::new(settings(server.addr.port(), Security::Starttls, Some(&ca)));
    for _ in 0..3 {
        send_with(&delivery, TOKEN).await.unwrap();
    }
    assert_eq!(
        delivery.session_counts(),
        (1, 2),
        "one session opened, reused twice"
    );
    drop(delivery);
    let sessions = server.wait_sessions(1).await;
    assert_eq!(sessions.len(), 1);
    let seen = &sessions[0];
    assert_eq!(seen.messages, 3);
    assert_eq!(seen.data, [MESSAGE, MESSAGE, MESSAGE].concat());
    let verbs: Vec<&str> = seen
        .commands
        .iter()
        .map(|c| c.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        verbs,
        [
            "EHLO agent.test",
            "STARTTLS",
            "EHLO agent.test",
            "AUTH XOAUTH2 <initial response>",
            "MAIL FROM",
            "RCPT TO",
            "DATA",
            "RSET",
            "MAIL FROM",
            "RCPT TO",
            "DATA",
            "RSET",
            "MAIL FROM",
            "RCPT TO",
            "DATA",
            "QUIT"
        ]
    );
    assert!(seen.pipelined_groups >= 3, "{}", seen.pipelined_groups);
}

/// Without PIPELINING the commands go one at a time; a new token opens a new session (a session
/// is only reused by messages with the token it authenticated with).
#[tokio::test]
async fn no_pipelining_unless_offered_and_a_new_token_gets_a_new_session() {
    let server = ScriptedSmtp::start(Script::default()).await;
    let delivery = SmtpDelivery::new(settings(server.addr.port(), Security::None, None));
    send_with(&delivery, TOKEN).await.unwrap();
    send_with(&delivery, TOKEN).await.unwrap();
    send_with(&delivery, "tok-upstream-smtp-rotated-987654")
        .await
        .unwrap();
    assert_eq!(delivery.session_counts(), (2, 1));
    drop(delivery);
    let sessions = server.wait_sessions(2).await;
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions.iter().map(|s| s.messages).sum::<usize>(), 3);
    assert!(sessions.iter().all(|s| s.pipelined_groups == 0));
}

/// A reused session the server dropped while it was idle: the message goes over a fresh
/// session at once, exactly once.
#[tokio::test]
async fn a_session_closed_while_idle_is_replaced_without_losing_the_message() {
    let server = ScriptedSmtp::start(Script {
        close_after_messages: Some(1),
        extra_ehlo: vec!["PIPELINING".into()],
        ..Script::default()
    })
    .await;
    let delivery = SmtpDelivery::new(settings(server.addr.port(), Security::None, None));
    send_with(&delivery, TOKEN).await.unwrap();
    // Let the server's close arrive.
    server.wait_sessions(1).await;
    send_with(&delivery, TOKEN).await.unwrap();
    send_with(&delivery, TOKEN).await.unwrap();
    assert_eq!(delivery.session_counts(), (3, 0));
    drop(delivery);
    let sessions = server.wait_sessions(3).await;
    assert_eq!(sessions.iter().map(|s| s.messages).sum::<usize>(), 3);
}

/// Exchange Online hosts carry the per-mailbox limit of 30 messages a minute; others none.
#[test]
fn exchange_online_has_a_per_mailbox_rate_limit() {
    use tokenfleet_agent::upstream::messages_per_minute_for;
    assert_eq!(
        SmtpSettings::new("smtp.office365.com", 587, Security::Starttls).messages_per_minute,
        Some(30)
    );
    assert_eq!(messages_per_minute_for("SMTP.Office365.com."), Some(30));
    assert_eq!(messages_per_minute_for("outlook.office365.us"), Some(30));
    assert_eq!(messages_per_minute_for("smtp.gmail.com"), None);
    assert_eq!(messages_per_minute_for("notoffice365.com"), None);
    assert_eq!(messages_per_minute_for("127.0.0.1"), None);
}
