//! The webhook channel: the event as JSON, POSTed with
//! - `X-Tokenfleet-Signature: sha256=<hex HMAC-SHA256 of the body with the configured key>`,
//! - `X-Tokenfleet-Timestamp: <unix seconds of this attempt>`,
//! - `X-Tokenfleet-Event-Id: <event id>` (the same on every retry: receivers deduplicate by it).
//!
//! reqwest over rustls (ring, system roots), no redirects, no proxy from the environment, a
//! timeout per request. 2xx is delivered; network errors, 408, 429 and 5xx are retried with
//! exponential backoff (at least `Retry-After`, capped); any other status is a rejection and is not
//! retried.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{AlertEvent, Delivery, RetryPolicy, WebhookConfig};

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-tokenfleet-signature";
/// Header carrying the unix time of the attempt.
pub const TIMESTAMP_HEADER: &str = "x-tokenfleet-timestamp";
/// Header carrying the event id.
pub const EVENT_ID_HEADER: &str = "x-tokenfleet-event-id";

/// `sha256=<hex HMAC-SHA256 of body>`: the value of [`SIGNATURE_HEADER`].
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut out = String::from("sha256=");
    // HMAC takes keys of any length, so this cannot fail; if it did, the empty signature
    // would simply not verify.
    if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        mac.update(body);
        for b in mac.finalize().into_bytes() {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// Whether `signature` (the header value) is the HMAC of `body` under `secret`, compared in
/// constant time. For receivers and tests.
pub fn verify(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = decode_hex(hex) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The HTTP client for webhooks.
pub fn build_client(
    timeout: Duration,
) -> Result<reqwest::Client, tokenfleet_domain::ValidationError> {
    use tokenfleet_domain::ValidationError;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ValidationError::new("alerts.webhook_url", format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        // A receiver that redirects is misconfigured or hostile; the signed body goes nowhere else.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .user_agent(concat!("tokenfleet-broker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            ValidationError::new(
                "alerts.webhook_url",
                format!("building the HTTP client failed: {e}"),
            )
        })
}

enum Attempt {
    Delivered,
    Rejected(String),
    Retry(String, Option<Duration>),
}

/// One delivery round: up to `retry.attempts` POSTs.
pub async fn deliver(
    http: &reqwest::Client,
    config: &WebhookConfig,
    retry: &RetryPolicy,
    event: &AlertEvent,
) -> Delivery {
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => return Delivery::Rejected(format!("encoding the event failed: {e}")),
    };
    let signature = sign(config.secret.expose().as_bytes(), &body);
    let mut last = String::new();
    for n in 1..=retry.attempts.max(1) {
        match attempt(http, config, event, &body, &signature).await {
            Attempt::Delivered => return Delivery::Delivered,
            Attempt::Rejected(reason) => return Delivery::Rejected(reason),
            Attempt::Retry(reason, retry_after) => {
                tracing::debug!(event_id = %event.id, attempt = n, reason, "webhook attempt failed");
                last = reason;
                if n < retry.attempts {
                    tokio::time::sleep(retry.pause(n, retry_after)).await;
                }
            }
        }
    }
    Delivery::Failed(format!("{last} (after {} attempts)", retry.attempts))
}

async fn attempt(
    http: &reqwest::Client,
    config: &WebhookConfig,
    event: &AlertEvent,
    body: &[u8],
    signature: &str,
) -> Attempt {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let result = http
        .post(&config.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(EVENT_ID_HEADER, &event.id)
        .body(body.to_vec())
        .send()
        .await;
    let response = match result {
        Ok(r) => r,
        // Without the URL: it may carry a receiver's token in its path or query.
        Err(e) => {
            let what = if e.is_timeout() {
                "no answer in time"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "request failed"
            };
            return Attempt::Retry(format!("webhook: {what} ({})", e.without_url()), None);
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if status.is_success() {
        Attempt::Delivered
    } else if status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
    {
        Attempt::Retry(
            format!("webhook answered HTTP {}", status.as_u16()),
            retry_after,
        )
    } else {
        Attempt::Rejected(format!(
            "webhook answered HTTP {} (not retried: fix the receiver or alerts.webhook_url / alerts.webhook_secret_file)",
            status.as_u16()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_with_the_key_only() {
        let body = br#"{"id":"alert-1"}"#;
        let sig = sign(b"0123456789abcdef-key", body);
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(verify(b"0123456789abcdef-key", body, &sig));
        assert!(!verify(b"another-key-0123456789", body, &sig));
        assert!(!verify(b"0123456789abcdef-key", b"{}", &sig));
        assert!(!verify(b"0123456789abcdef-key", body, "sha256=zz"));
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
