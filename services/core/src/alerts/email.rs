//! The e-mail channel: a short plain-text mail ("tokenfleet: mailbox X needs consent again") with
//! the reason and the fix, sent with lettre over SMTP (STARTTLS, implicit TLS or plain for a
//! local relay) from a configured mailbox. With `smtp_auth = "xoauth2"` the broker logs in as
//! that mailbox with the access token it holds for it ([`crate::tokens::lifecycle::TokenService::access_token`]), so no
//! password is involved. SMTP 5xx answers are rejections (not retried); everything else is
//! retried with backoff.
//!
//! lettre's XOAUTH2 does not answer the server's error challenge (`334 <base64 JSON>`), so a
//! rejected token shows up as "does not expect a challenge"; that is reported as a token problem.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokenfleet_domain::Mailbox;

use super::{
    AlertEvent, AlertKind, AlertsConfig, Delivery, EmailConfig, SenderTokens, SmtpAuth,
    SmtpSecurity,
};
use crate::records::{Records, mailbox_key};
use crate::state::BrokerState;

/// How long the sender mailbox's access token must still be valid for one SMTP session.
const TOKEN_VALIDITY: Duration = Duration::from_secs(5 * 60);

/// The subject line of an alert mail.
pub fn subject(event: &AlertEvent) -> String {
    match event.kind {
        AlertKind::ReauthRequired => {
            format!("tokenfleet: mailbox {} needs consent again", event.address)
        }
        AlertKind::RefreshTokenExpiring => format!(
            "tokenfleet: the token of mailbox {} expires soon; consent again",
            event.address
        ),
    }
}

/// The plain-text body of an alert mail.
pub fn body(event: &AlertEvent) -> String {
    let mut text = format!(
        "Mailbox:  {} ({}) in tenant {}\nProblem:  {} [{}]\nFix:      {}\n",
        event.mailbox, event.address, event.tenant, event.reason, event.code, event.fix
    );
    if let Some(at) = event.expires_at {
        text.push_str(&format!("Expires:  {}\n", super::rfc3339(at)));
    }
    text.push_str(&format!(
        "\nDetected {} by tokenfleet-broker (alert {}). Printers and scanners using this mailbox \
         cannot send or fetch mail once its token is gone.\n",
        super::rfc3339(event.time),
        event.id
    ));
    text
}

enum Attempt {
    Delivered,
    Rejected(String),
    Retry(String),
}

/// One delivery round: up to `settings.retry.attempts` SMTP sessions.
pub async fn deliver(
    config: &EmailConfig,
    settings: &AlertsConfig,
    tokens: &dyn SenderTokens,
    state: &BrokerState,
    event: &AlertEvent,
) -> Delivery {
    let retry = settings.retry;
    let mut last = String::new();
    for n in 1..=retry.attempts.max(1) {
        match attempt(config, settings.timeout, tokens, state, event).await {
            Attempt::Delivered => return Delivery::Delivered,
            Attempt::Rejected(reason) => return Delivery::Rejected(reason),
            Attempt::Retry(reason) => {
                tracing::debug!(event_id = %event.id, attempt = n, reason, "alert e-mail attempt failed");
                last = reason;
                if n < retry.attempts {
                    tokio::time::sleep(retry.pause(n, None)).await;
                }
            }
        }
    }
    Delivery::Failed(format!("{last} (after {} attempts)", retry.attempts))
}

async fn attempt(
    config: &EmailConfig,
    timeout: Duration,
    tokens: &dyn SenderTokens,
    state: &BrokerState,
    event: &AlertEvent,
) -> Attempt {
    let sender = format!("{}/{}", config.from_tenant, config.from_mailbox);
    let mailbox = match Records::new(state.store.as_ref())
        .get::<Mailbox>(&mailbox_key(&config.from_tenant, &config.from_mailbox))
        .await
    {
        Ok(Some(m)) => m.value,
        Ok(None) => {
            return Attempt::Retry(format!(
                "alerts.email_from_mailbox: mailbox `{sender}` does not exist; create it or fix the setting"
            ));
        }
        Err(e) => return Attempt::Retry(format!("reading mailbox `{sender}`: {e}")),
    };
    let message = match build_message(config, &mailbox.address, event) {
        Ok(m) => m,
        Err(reason) => return Attempt::Rejected(reason),
    };
    let builder = match config.security {
        SmtpSecurity::Starttls => {
            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.host)
        }
        SmtpSecurity::ImplicitTls => AsyncSmtpTransport::<Tokio1Executor>::relay(&config.host),
        SmtpSecurity::None => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
            &config.host,
        )),
    };
    let mut builder = match builder {
        Ok(b) => b.port(config.port).timeout(Some(timeout)),
        Err(e) => return Attempt::Rejected(format!("alerts.smtp_host `{}`: {e}", config.host)),
    };
    if config.auth == SmtpAuth::Xoauth2 {
        let token = match tokens
            .sender_token(&config.from_tenant, &config.from_mailbox, TOKEN_VALIDITY)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                return Attempt::Retry(format!(
                    "no access token for the sender mailbox `{sender}`: {e}"
                ));
            }
        };
        builder = builder
            .credentials(Credentials::new(
                token.username,
                token.access_token.expose().to_owned(),
            ))
            .authentication(vec![Mechanism::Xoauth2]);
    }
    let transport = builder.build();
    let server = format!("{}:{}", config.host, config.port);
    match transport.send(message).await {
        Ok(_) => Attempt::Delivered,
        Err(e) => {
            let text = e.to_string();
            let reason = if text.contains("does not expect a challenge") {
                format!(
                    "{server} rejected the access token of sender mailbox `{sender}` (XOAUTH2); check that authenticated SMTP is allowed for the mailbox and its grant has the send scope"
                )
            } else {
                format!("{server}: {text}")
            };
            if e.is_permanent() {
                Attempt::Rejected(reason)
            } else {
                Attempt::Retry(reason)
            }
        }
    }
}

fn build_message(config: &EmailConfig, from: &str, event: &AlertEvent) -> Result<Message, String> {
    let from = from
        .parse::<lettre::message::Mailbox>()
        .map_err(|e| format!("sender address `{from}`: {e}"))?;
    let mut builder = Message::builder()
        .from(from)
        .subject(subject(event))
        .header(ContentType::TEXT_PLAIN);
    for (i, to) in config.to.iter().enumerate() {
        let to = to
            .parse::<lettre::message::Mailbox>()
            .map_err(|e| format!("alerts.email_to[{i}] `{to}`: {e}"))?;
        builder = builder.to(to);
    }
    builder
        .body(body(event))
        .map_err(|e| format!("building the alert e-mail: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    #[test]
    fn mails_say_what_and_how_to_fix() {
        let now = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let error = tokenfleet_domain::TokenError {
            code: "AADSTS700082".into(),
            reason: "the refresh token expired after 90 days without use".into(),
            fix: "run `tokenfleetctl mailbox consent scan`".into(),
            time: now,
        };
        let e = AlertEvent::reauth_required("acme", "scan", "scan@example.com", &error, now);
        assert_eq!(
            subject(&e),
            "tokenfleet: mailbox scan@example.com needs consent again"
        );
        let text = body(&e);
        assert!(
            text.contains("AADSTS700082") && text.contains("tokenfleetctl mailbox consent scan")
        );
        let config = EmailConfig {
            to: vec!["ops@example.com".into()],
            from_tenant: "acme".into(),
            from_mailbox: "alerts".into(),
            host: "127.0.0.1".into(),
            port: 25,
            security: SmtpSecurity::None,
            auth: SmtpAuth::None,
        };
        assert!(build_message(&config, "alerts@example.com", &e).is_ok());
        assert!(
            build_message(&config, "not an address", &e)
                .unwrap_err()
                .contains("sender address")
        );
    }
}
