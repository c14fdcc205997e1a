//! Who signed in at a delegated consent, from the OpenID Connect ID token the token endpoint
//! returns with the tokens when the consent asked for the `openid` scope
//! ([`identity_scopes`]): Microsoft's `preferred_username` (or `upn`/`email`) with `oid` and
//! `tid`, Google's `email` (only when `email_verified`). The broker compares it with the
//! mailbox, so a consent signed in with the wrong account does not bind that account's mail.
//!
//! The ID token is read, not signature-checked: it comes straight from the provider's token
//! endpoint over the HTTPS connection that authenticated the provider, which OpenID Connect Core
//! §3.1.3.7 accepts in place of the signature. Its audience must be this app's client id.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokenfleet_domain::ProviderKind;
use tokenfleet_seal::Secret;

use crate::error::{ErrorClass, ProviderError};

/// OpenID Connect scopes a Microsoft consent adds (they combine with one resource's scopes).
pub const MICROSOFT_IDENTITY_SCOPES: &[&str] = &["openid", "profile", "email"];
/// OpenID Connect scopes a Google consent adds.
pub const GOOGLE_IDENTITY_SCOPES: &[&str] = &["openid", "email"];

/// The scopes that make the provider return an ID token naming the signed-in account; none for
/// generic providers (their ID tokens, if any, follow no known convention).
pub fn identity_scopes(kind: ProviderKind) -> &'static [&'static str] {
    match kind {
        ProviderKind::Microsoft => MICROSOFT_IDENTITY_SCOPES,
        ProviderKind::Google => GOOGLE_IDENTITY_SCOPES,
        ProviderKind::Generic => &[],
    }
}

/// The account an ID token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedInAccount {
    /// The sign-in name: Microsoft `preferred_username` (a UPN, usually the address), Google
    /// `email`.
    pub username: String,
    /// Microsoft `oid` (the account's object id), when present.
    pub object_id: Option<String>,
    /// Microsoft `tid` (the directory the account signed in to), when present.
    pub tenant_id: Option<String>,
}

impl SignedInAccount {
    /// Whether this account is `address` (case-insensitive, as addresses and UPNs are).
    pub fn is(&self, address: &str) -> bool {
        self.username.trim().eq_ignore_ascii_case(address.trim())
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    preferred_username: Option<String>,
    #[serde(default)]
    upn: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    tid: Option<String>,
}

fn invalid(reason: impl Into<String>) -> ProviderError {
    ProviderError::new(
        ErrorClass::InvalidRequest,
        "id_token_invalid",
        reason,
        "check that the app registration may sign users in (OpenID Connect scopes openid, profile, email) and consent again",
    )
}

/// Reads the signed-in account from `id_token` of a `kind` provider whose app is `client_id`.
pub fn signed_in_account(
    kind: ProviderKind,
    id_token: &Secret,
    client_id: &str,
) -> Result<SignedInAccount, ProviderError> {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.algorithms = vec![
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::PS256,
        Algorithm::HS256,
    ];
    validation.insecure_disable_signature_validation();
    // Expiry is the provider's business at issue time (it just issued the token); the broker's
    // clock may be shifted in tests.
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    validation.required_spec_claims.insert("aud".to_owned());
    validation.set_audience(&[client_id]);
    let claims = jsonwebtoken::decode::<Claims>(
        id_token.expose(),
        &DecodingKey::from_secret(&[]),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidAudience
        | jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(_) => invalid(format!(
            "the ID token was not issued to this app (its audience is not client id {client_id})"
        )),
        // Nothing of the token itself goes into the message.
        _ => invalid("the ID token is not a readable JWT"),
    })?
    .claims;
    let username = match kind {
        ProviderKind::Microsoft | ProviderKind::Generic => claims
            .preferred_username
            .or(claims.upn)
            .or(claims.email),
        ProviderKind::Google => {
            let verified = match &claims.email_verified {
                None => true,
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("true"),
                Some(_) => false,
            };
            if !verified {
                return Err(invalid(
                    "the ID token's e-mail address is not verified (email_verified is false)",
                ));
            }
            claims.email
        }
    }
    .filter(|u| !u.trim().is_empty())
    .ok_or_else(|| {
        invalid(match kind {
            ProviderKind::Google => "the ID token names no e-mail address (scope `email` missing?)",
            _ => "the ID token names no account (no preferred_username, upn or email claim; scope `profile` missing?)",
        })
    })?;
    Ok(SignedInAccount {
        username,
        object_id: claims.oid,
        tenant_id: claims.tid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn token(claims: serde_json::Value) -> Secret {
        Secret::new(
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"k"),
            )
            .unwrap(),
        )
    }

    #[test]
    fn microsoft_names_the_preferred_username_and_checks_the_audience() {
        let t = token(serde_json::json!({
            "aud": "app", "preferred_username": "Scan@Contoso.example", "oid": "o1", "tid": "t1"
        }));
        let a = signed_in_account(ProviderKind::Microsoft, &t, "app").unwrap();
        assert!(a.is("scan@contoso.example"));
        assert!(!a.is("other@contoso.example"));
        assert_eq!(a.object_id.as_deref(), Some("o1"));
        assert_eq!(a.tenant_id.as_deref(), Some("t1"));
        let e = signed_in_account(ProviderKind::Microsoft, &t, "another-app").unwrap_err();
        assert!(e.reason.contains("audience"), "{e}");
        let none = token(serde_json::json!({"aud": "app", "oid": "o1"}));
        assert!(signed_in_account(ProviderKind::Microsoft, &none, "app").is_err());
        let garbage = Secret::new("not-a-jwt".to_owned());
        let e = signed_in_account(ProviderKind::Microsoft, &garbage, "app").unwrap_err();
        assert!(!e.reason.contains("not-a-jwt"), "{e}");
    }

    #[test]
    fn google_needs_a_verified_email() {
        let t = token(serde_json::json!({
            "aud": "app", "email": "a@b.example", "email_verified": true
        }));
        assert!(
            signed_in_account(ProviderKind::Google, &t, "app")
                .unwrap()
                .is("a@b.example")
        );
        let unverified = token(serde_json::json!({
            "aud": "app", "email": "a@b.example", "email_verified": false
        }));
        assert!(signed_in_account(ProviderKind::Google, &unverified, "app").is_err());
    }
}
