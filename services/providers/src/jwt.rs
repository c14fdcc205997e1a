//! Google service-account keys and the RS256 assertion of the JWT bearer grant (RFC 7523), which
//! the `oauth2` crate does not implement.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_seal::Secret;

use crate::error::{ErrorClass, ProviderError};

/// Longest assertion lifetime Google accepts.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// `grant_type` of the JWT bearer grant.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The parts of a Google service-account JSON key file tokenfleet uses.
#[derive(Clone, Deserialize)]
pub struct ServiceAccountKey {
    /// Service-account e-mail: the assertion's `iss`.
    pub client_email: String,
    /// PEM private key (PKCS#8).
    private_key: Secret,
    /// Id of the key, sent as the JWT `kid`.
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// Token endpoint named in the file.
    #[serde(default)]
    pub token_uri: Option<String>,
    /// OAuth client id of the service account (what an admin authorizes for domain-wide delegation).
    #[serde(default)]
    pub client_id: Option<String>,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

fn bad_key(problem: impl Into<String>) -> ProviderError {
    ProviderError::new(
        ErrorClass::AppMisconfigured,
        "invalid_service_account_key",
        format!("service-account key: {}", problem.into()),
        "store the JSON key file downloaded from the Google Cloud console (IAM → Service accounts → Keys) with `tokenfleetctl provider update`",
    )
}

impl ServiceAccountKey {
    /// Parses the JSON key file. Errors name the field at fault and never echo the key.
    pub fn parse(json: &Secret) -> Result<Self, ProviderError> {
        // serde_json's messages may quote values; report only line and column.
        let key: Self = serde_json::from_str(json.expose()).map_err(|e| {
            if e.is_data() {
                bad_key(format!(
                    "a required field is missing or has the wrong type (client_email, private_key) near line {} column {}",
                    e.line(),
                    e.column()
                ))
            } else {
                bad_key(format!("not valid JSON (line {} column {})", e.line(), e.column()))
            }
        })?;
        if !key.client_email.contains('@') {
            return Err(bad_key("client_email is not an e-mail address"));
        }
        if !key.private_key.expose().contains("PRIVATE KEY-----") {
            return Err(bad_key("private_key is not a PEM private key"));
        }
        Ok(key)
    }

    /// Signs an RS256 assertion for `subject` (the mailbox), valid for [`MAX_ASSERTION_LIFETIME`].
    pub fn assertion(
        &self,
        subject: &str,
        scopes: &[String],
        audience: &str,
        now: OffsetDateTime,
    ) -> Result<Secret, ProviderError> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(self.private_key.expose().as_bytes())
            .map_err(|e| bad_key(format!("private_key is not a usable RSA key ({e})")))?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = self.private_key_id.clone();
        let iat = now.unix_timestamp();
        let claims = Claims {
            iss: &self.client_email,
            sub: subject,
            scope: scopes.join(" "),
            aud: audience,
            iat,
            exp: iat + MAX_ASSERTION_LIFETIME.as_secs() as i64,
        };
        jsonwebtoken::encode(&header, &claims, &key)
            .map(Secret::new)
            .map_err(|e| bad_key(format!("signing the assertion failed ({e})")))
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    scope: String,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_field_and_hide_the_key() {
        let e = ServiceAccountKey::parse(&Secret::new(
            r#"{"private_key":"-----BEGIN PRIVATE KEY----- abc"}"#,
        ))
        .unwrap_err();
        assert!(e.reason.contains("client_email"), "{e}");
        assert!(!e.to_string().contains("abc"), "{e}");
        let e = ServiceAccountKey::parse(&Secret::new(
            r#"{"client_email":"a@b.c","private_key":"nope"}"#,
        ))
        .unwrap_err();
        assert!(e.reason.contains("private_key"), "{e}");
        let e = ServiceAccountKey::parse(&Secret::new("{not json")).unwrap_err();
        assert!(e.reason.contains("not valid JSON"), "{e}");
        assert_eq!(e.class, ErrorClass::AppMisconfigured);
    }

    #[test]
    fn debug_hides_the_private_key() {
        let k = ServiceAccountKey::parse(&Secret::new(
            r#"{"client_email":"sa@p.iam.example","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}"#,
        ))
        .unwrap();
        assert!(!format!("{k:?}").contains("AAAA"));
        // A key that does not decode is reported without its content.
        let e = k
            .assertion("u@d.example", &[], "aud", OffsetDateTime::UNIX_EPOCH)
            .unwrap_err();
        assert!(!e.to_string().contains("AAAA"), "{e}");
    }
}
