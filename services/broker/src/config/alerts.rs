//! `[alerts]`: where the broker reports mailboxes that need a person (REAUTH_REQUIRED, a refresh
//! token about to expire): a signed webhook and/or e-mail. The raw section and its validation
//! into [`AlertsConfig`]; the webhook's HMAC key is read from `webhook_secret_file`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokenfleet_seal::Secret;

use super::error::ConfigError;
use crate::alerts::{
    AlertsConfig, EmailConfig, RetryPolicy, SmtpAuth, SmtpSecurity, WebhookConfig,
    check_webhook_url,
};

/// `[alerts]`. Alerts are off unless `webhook_url` or `email_to` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsSection {
    /// URL the alert events are POSTed to as JSON (`https://…`; `http://` only for loopback
    /// hosts). Redirects are not followed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// File holding the HMAC-SHA256 key (any text, at least 16 bytes; mode 0600). Every
    /// request carries `X-Tokenfleet-Signature: sha256=<hex HMAC of the body>`. Required with
    /// `webhook_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Addresses alert e-mails go to; empty = no e-mail.
    pub email_to: Vec<String>,
    /// `<tenant>/<mailbox>`: the mailbox alert e-mails are sent from (its address is the
    /// sender; with `smtp_auth = "xoauth2"` the broker logs in with that mailbox's own token).
    /// Required with `email_to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_from_mailbox: Option<String>,
    /// SMTP submission server (e.g. `smtp.office365.com`). Required with `email_to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_host: Option<String>,
    /// SMTP port (587 for STARTTLS, 465 for implicit TLS).
    pub smtp_port: u16,
    /// `starttls`, `implicit_tls` or `none` (plaintext: only for a relay on the same host).
    pub smtp_security: SmtpSecurity,
    /// `xoauth2` (the sender mailbox's access token) or `none` (an open local relay).
    pub smtp_auth: SmtpAuth,
    /// Alert when a mailbox's refresh token expires within this many hours (Google apps in
    /// "Testing" publishing status get 7-day refresh tokens).
    pub expiry_horizon_hours: u64,
    /// Timeout of one webhook request or SMTP session, in seconds.
    pub timeout_seconds: u64,
    /// Attempts per delivery round (network errors, 5xx, 429 and SMTP 4xx are retried; other
    /// 4xx and SMTP 5xx are not).
    pub retry_attempts: u32,
    /// Pause after the first failed attempt, in milliseconds; doubles per attempt.
    pub retry_min_ms: u64,
    /// Longest pause between attempts, in milliseconds (a longer `Retry-After` is capped to it).
    pub retry_max_ms: u64,
    /// An alert not delivered after a round (or whose replica died) is tried again this many
    /// seconds later by any replica, for up to a day.
    pub redeliver_after_seconds: u64,
}

impl Default for AlertsSection {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_secret_file: None,
            email_to: Vec::new(),
            email_from_mailbox: None,
            smtp_host: None,
            smtp_port: 587,
            smtp_security: SmtpSecurity::Starttls,
            smtp_auth: SmtpAuth::Xoauth2,
            expiry_horizon_hours: 48,
            timeout_seconds: 10,
            retry_attempts: 5,
            retry_min_ms: 1000,
            retry_max_ms: 60_000,
            redeliver_after_seconds: 600,
        }
    }
}

impl AlertsSection {
    /// The validated settings (the error names the `alerts.*` field at fault); reads the webhook
    /// key.
    pub fn to_config(&self) -> Result<AlertsConfig, ConfigError> {
        let webhook = match (&self.webhook_url, &self.webhook_secret_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "alerts.webhook_secret_file",
                    "missing: `alerts.webhook_url` needs a file with the HMAC key that signs every request",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "alerts.webhook_url",
                    "missing: `alerts.webhook_secret_file` is set but there is no URL to send to",
                ));
            }
            (Some(url), Some(file)) => {
                let url = check_webhook_url(url)
                    .map_err(|problem| ConfigError::invalid("alerts.webhook_url", problem))?;
                let field = "alerts.webhook_secret_file";
                let text = std::fs::read_to_string(file).map_err(|e| {
                    ConfigError::invalid(field, format!("reading {}: {e}", file.display()))
                })?;
                let key = text.trim_end_matches(['\r', '\n']);
                if key.len() < 16 {
                    return Err(ConfigError::invalid(
                        field,
                        format!(
                            "{} holds a key shorter than 16 bytes; use e.g. `openssl rand -hex 32`",
                            file.display()
                        ),
                    ));
                }
                Some(WebhookConfig {
                    url,
                    secret: Secret::new(key),
                })
            }
        };
        let email = if self.email_to.is_empty() {
            None
        } else {
            for (i, to) in self.email_to.iter().enumerate() {
                tokenfleet_domain::email(&format!("alerts.email_to[{i}]"), to)
                    .map_err(|e| ConfigError::invalid(e.field, e.problem))?;
            }
            let from = self.email_from_mailbox.as_deref().ok_or_else(|| {
                ConfigError::invalid(
                    "alerts.email_from_mailbox",
                    "missing: `alerts.email_to` needs the `<tenant>/<mailbox>` alerts are sent from",
                )
            })?;
            let (tenant, mailbox) = from.split_once('/').ok_or_else(|| {
                ConfigError::invalid(
                    "alerts.email_from_mailbox",
                    format!("`{from}` is not `<tenant>/<mailbox>`"),
                )
            })?;
            for (what, name) in [("tenant", tenant), ("mailbox", mailbox)] {
                tokenfleet_domain::name(what, name).map_err(|e| {
                    ConfigError::invalid("alerts.email_from_mailbox", e.to_string())
                })?;
            }
            let host = self
                .smtp_host
                .as_deref()
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "alerts.smtp_host",
                        "missing: `alerts.email_to` needs the SMTP submission server",
                    )
                })?;
            tokenfleet_domain::host("alerts.smtp_host", host)
                .map_err(|e| ConfigError::invalid(e.field, e.problem))?;
            if self.smtp_port == 0 {
                return Err(ConfigError::invalid("alerts.smtp_port", "must not be 0"));
            }
            Some(EmailConfig {
                to: self.email_to.clone(),
                from_tenant: tenant.to_owned(),
                from_mailbox: mailbox.to_owned(),
                host: host.to_owned(),
                port: self.smtp_port,
                security: self.smtp_security,
                auth: self.smtp_auth,
            })
        };
        if self.expiry_horizon_hours == 0 || self.expiry_horizon_hours > 24 * 90 {
            return Err(ConfigError::invalid(
                "alerts.expiry_horizon_hours",
                "must be between 1 and 2160 (90 days)",
            ));
        }
        if self.timeout_seconds == 0 || self.timeout_seconds > 300 {
            return Err(ConfigError::invalid(
                "alerts.timeout_seconds",
                "must be between 1 and 300",
            ));
        }
        if self.retry_attempts == 0 || self.retry_attempts > 20 {
            return Err(ConfigError::invalid(
                "alerts.retry_attempts",
                "must be between 1 and 20",
            ));
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            return Err(ConfigError::invalid(
                "alerts.retry_max_ms",
                "retry_min_ms must be positive and retry_max_ms at least as large",
            ));
        }
        let retry = RetryPolicy {
            attempts: self.retry_attempts,
            min: Duration::from_millis(self.retry_min_ms),
            max: Duration::from_millis(self.retry_max_ms),
        };
        let timeout = Duration::from_secs(self.timeout_seconds);
        let redeliver_after = Duration::from_secs(self.redeliver_after_seconds);
        // A round (every attempt timing out, every pause at its longest, both channels) must
        // finish before another replica may take the alert over.
        let round = (timeout * retry.attempts + retry.max * (retry.attempts - 1)) * 2;
        if redeliver_after < round {
            return Err(ConfigError::invalid(
                "alerts.redeliver_after_seconds",
                format!(
                    "must be at least {} s: a delivery round (retry_attempts × timeout_seconds plus the pauses, for webhook and e-mail) must end before another replica takes the alert over",
                    round.as_secs()
                ),
            ));
        }
        Ok(AlertsConfig {
            webhook,
            email,
            expiry_horizon: Duration::from_secs(self.expiry_horizon_hours * 3600),
            timeout,
            retry,
            redeliver_after,
            ..AlertsConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(result: Result<AlertsConfig, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_off() {
        let config = AlertsSection::default().to_config().unwrap();
        assert!(!config.enabled());
        assert_eq!(config.expiry_horizon, Duration::from_secs(48 * 3600));
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("hook.key");
        std::fs::write(&key, "0123456789abcdef0123\n").unwrap();
        let short = dir.path().join("short.key");
        std::fs::write(&short, "short").unwrap();

        let webhook = |url: &str, file: Option<&std::path::Path>| AlertsSection {
            webhook_url: Some(url.to_owned()),
            webhook_secret_file: file.map(Into::into),
            ..AlertsSection::default()
        };
        let ok = webhook("https://hooks.example.com/x", Some(&key))
            .to_config()
            .unwrap();
        let hook = ok.webhook.unwrap();
        assert_eq!(hook.secret.expose(), "0123456789abcdef0123");
        assert!(!format!("{hook:?}").contains("0123456789abcdef0123"));
        assert_eq!(
            field(webhook("https://hooks.example.com/x", None).to_config()),
            "alerts.webhook_secret_file"
        );
        assert_eq!(
            field(webhook("http://hooks.example.com/x", Some(&key)).to_config()),
            "alerts.webhook_url"
        );
        assert_eq!(
            field(webhook("https://hooks.example.com/x", Some(&short)).to_config()),
            "alerts.webhook_secret_file"
        );

        let email = |from: Option<&str>, host: Option<&str>| AlertsSection {
            email_to: vec!["ops@example.com".into()],
            email_from_mailbox: from.map(Into::into),
            smtp_host: host.map(Into::into),
            ..AlertsSection::default()
        };
        let ok = email(Some("acme/alerts"), Some("smtp.example.com"))
            .to_config()
            .unwrap();
        let mail = ok.email.unwrap();
        assert_eq!(
            (mail.from_tenant.as_str(), mail.from_mailbox.as_str()),
            ("acme", "alerts")
        );
        assert_eq!(
            field(email(None, Some("smtp.example.com")).to_config()),
            "alerts.email_from_mailbox"
        );
        assert_eq!(
            field(email(Some("alerts"), Some("smtp.example.com")).to_config()),
            "alerts.email_from_mailbox"
        );
        assert_eq!(
            field(email(Some("acme/alerts"), None).to_config()),
            "alerts.smtp_host"
        );
        let mut bad_to = email(Some("acme/alerts"), Some("smtp.example.com"));
        bad_to.email_to.push("not-an-address".into());
        assert_eq!(field(bad_to.to_config()), "alerts.email_to[1]");
        let too_soon = AlertsSection {
            redeliver_after_seconds: 10,
            ..AlertsSection::default()
        };
        assert_eq!(
            field(too_soon.to_config()),
            "alerts.redeliver_after_seconds"
        );
    }
}
