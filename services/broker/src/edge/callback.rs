//! The browser's end of an auth-code consent: `GET /oauth/callback?code=…&state=…`. Finds the
//! consent by its `state` ([`tokenfleet_core::tokens::consent::read_state_index`]), completes it through the core
//! ([`tokenfleet_core::tokens::consent::complete`]) and answers the person with a small HTML page; the status of a failure
//! comes from the one HTTP map ([`super::http_status`]).

use std::fmt::Write as _;

use tokenfleet_core::state::BrokerState;
use tokenfleet_core::tokens::consent::{
    CALLBACK_ACTOR, ConsentError, audit, complete, read_state_index,
};

/// The answer to a browser at `/oauth/callback`: HTTP status and a small HTML page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackPage {
    /// HTTP status.
    pub status: u16,
    /// The page.
    pub html: String,
}

/// Completes the consent a browser redirect belongs to (found by its `state`), answering with a
/// page for the person. `query` is the raw query string.
pub async fn callback_page(state: &BrokerState, query: Option<&str>) -> CallbackPage {
    let query = query.unwrap_or_default();
    let mut oauth_state = None;
    let mut provider_error = None;
    let mut provider_description = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "state" => oauth_state = Some(v.into_owned()),
            "error" => provider_error = Some(v.into_owned()),
            "error_description" => provider_description = Some(v.into_owned()),
            _ => {}
        }
    }
    let provider_said = provider_error
        .as_ref()
        .map(|e| match &provider_description {
            Some(d) => format!("The identity provider answered `{e}`: {d}"),
            None => format!("The identity provider answered `{e}`."),
        });
    let Some(oauth_state) = oauth_state.filter(|s| !s.is_empty()) else {
        return failure_page(
            400,
            "This address carries no `state` parameter, so it cannot be matched to a consent. Open the authorization URL that `tokenfleetctl mailbox consent` printed.",
            provider_said.as_deref(),
        );
    };
    let index = match read_state_index(state, &oauth_state).await {
        Ok(Some(index)) => index,
        Ok(None) => {
            return failure_page(
                404,
                "No consent is waiting for this sign-in: it was completed already, it expired, or another consent was started after it. Run `tokenfleetctl mailbox consent` again.",
                provider_said.as_deref(),
            );
        }
        Err(error) => {
            tracing::warn!(%error, "oauth callback: reading the consent state failed");
            return failure_page(
                503,
                "The broker could not read its store; reload this page in a moment.",
                None,
            );
        }
    };
    let (tenant, name) = (index.tenant.as_str(), index.mailbox.as_str());
    let input = format!("?{query}");
    match complete(state, tenant, name, &input, CALLBACK_ACTOR).await {
        Ok(done) => {
            let address = done.mailbox.value.address.clone();
            tracing::info!(
                tenant,
                mailbox = name,
                "consent completed through the browser redirect"
            );
            audit(
                state,
                CALLBACK_ACTOR,
                "consent.complete",
                tenant,
                name,
                "ok",
                "authorization code redeemed",
            )
            .await;
            page(
                200,
                "Consent recorded",
                &format!(
                    "<p>Consent recorded for <strong>{}</strong>; you can close this window.</p>",
                    html_escape(&address)
                ),
            )
        }
        Err(e) => {
            let provider_refused = matches!(e, ConsentError::FailedPrecondition(_));
            let err = crate::ops::Error::from(e);
            let status = crate::edge::http_status::http_status(&err);
            let text = match &err {
                crate::ops::Error::Internal { detail, .. } => {
                    tracing::error!(error = %detail, tenant, mailbox = name, "oauth callback failed");
                    "The broker failed internally (details in its log); try again.".to_owned()
                }
                other => other.to_string(),
            };
            if !provider_refused || provider_error.is_none() {
                // Provider errors in the redirect were audited as `consent.failed` already.
                audit(
                    state,
                    CALLBACK_ACTOR,
                    "consent.failed",
                    tenant,
                    name,
                    "failed",
                    &text,
                )
                .await;
            }
            failure_page(status, &text, provider_said.as_deref())
        }
    }
}

fn failure_page(status: u16, text: &str, provider_said: Option<&str>) -> CallbackPage {
    let mut body = format!("<p>{}</p>", html_escape(text));
    if let Some(said) = provider_said {
        let _ = write!(body, "<p>{}</p>", html_escape(said));
    }
    page(status, "Consent not recorded", &body)
}

fn page(status: u16, title: &str, body: &str) -> CallbackPage {
    CallbackPage {
        status,
        html: format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>tokenfleet: {title}</title></head>\n<body><h1>{title}</h1>\n{body}\n</body></html>\n",
        ),
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
    }
}
