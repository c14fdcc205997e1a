//! SASL, sans-IO: the client payloads for OAuth 2.0 bearer tokens — XOAUTH2 (Google/Microsoft)
//! and OAUTHBEARER (RFC 7628) — with their parsers ([`parse_xoauth2`], [`parse_oauthbearer`], so
//! the payloads round-trip under fuzzing), the decoding of the JSON error challenge a server
//! sends for a bad token, and the server side of the ingress's `AUTH PLAIN`/`LOGIN`
//! ([`decode_response`], [`parse_plain`]). Bytes in, typed values out; the SMTP, POP3 and IMAP
//! loops do the exchanges.
//!
//! Hand-written: the payloads are one `format!` each, and no SASL crate answers the XOAUTH2
//! error challenge the way Microsoft requires (an empty response, then the final failure).
//!
//! Tokens are only ever held in [`AccessToken`], whose `Debug`/`Display` print `[redacted]`; the
//! payloads that embed them are returned as [`SaslPayload`], redacted the same way.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// An OAuth access token held in memory. Never printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone)]
pub struct AccessToken(Zeroizing<String>);

impl AccessToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Zeroizing::new(token.into()))
    }

    /// The token itself, for putting on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

impl fmt::Display for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A base64 SASL initial response that carries a token. Redacted like [`AccessToken`].
#[derive(Clone, PartialEq, Eq)]
pub struct SaslPayload(Zeroizing<String>);

impl SaslPayload {
    /// The base64 text to send after `AUTH <mechanism>` (or on its own line after `+`/`334`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SaslPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SaslPayload([redacted])")
    }
}

/// The XOAUTH2 initial response: base64 of `user=<user>\x01auth=Bearer <token>\x01\x01`.
pub fn xoauth2_payload(user: &str, token: &AccessToken) -> SaslPayload {
    let raw = Zeroizing::new(format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ));
    SaslPayload(Zeroizing::new(STANDARD.encode(raw.as_bytes())))
}

/// The OAUTHBEARER (RFC 7628) initial response: base64 of
/// `n,a=<user>,\x01host=<host>\x01port=<port>\x01auth=Bearer <token>\x01\x01`.
///
/// `,` and `=` in the user name are escaped as `=2C` and `=3D` (RFC 5801 `saslname`).
pub fn oauthbearer_payload(user: &str, host: &str, port: u16, token: &AccessToken) -> SaslPayload {
    let user = user.replace('=', "=3D").replace(',', "=2C");
    let raw = Zeroizing::new(format!(
        "n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ));
    SaslPayload(Zeroizing::new(STANDARD.encode(raw.as_bytes())))
}

/// What a client answers to an error challenge before the server sends its final failure: an
/// empty line for XOAUTH2, `\x01` (base64 `AQ==`) for OAUTHBEARER.
pub fn challenge_answer(mechanism: Mechanism) -> &'static str {
    match mechanism {
        Mechanism::XOAuth2 => "",
        Mechanism::OAuthBearer => "AQ==",
    }
}

/// A SASL mechanism that carries an OAuth bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `XOAUTH2` (Google and Microsoft).
    XOAuth2,
    /// `OAUTHBEARER` (RFC 7628).
    OAuthBearer,
}

impl Mechanism {
    /// The mechanism name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::XOAuth2 => "XOAUTH2",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// Decodes the error challenge a server sends after a rejected token (the text after `334 ` in
/// SMTP, after `+ ` in POP3/IMAP): base64 of a JSON object such as
/// `{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`.
///
/// Returns `None` when the text is not base64 or not a JSON object, so a caller can still report
/// the raw text.
pub fn decode_error_challenge(challenge: &str) -> Option<serde_json::Value> {
    let bytes = STANDARD.decode(challenge.trim()).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.is_object().then_some(value)
}

/// Why a SASL response from a client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslError {
    /// The client sent `*`.
    Cancelled,
    /// Not base64.
    InvalidBase64,
    /// A `PLAIN` response without exactly three NUL-separated parts.
    InvalidPlain,
}

impl SaslError {
    /// The SMTP reply for this error.
    pub fn smtp_reply(self) -> &'static str {
        match self {
            Self::Cancelled => "501 5.0.0 Authentication cancelled",
            Self::InvalidBase64 => "501 5.5.2 Invalid base64 data",
            Self::InvalidPlain => "501 5.5.2 Invalid PLAIN response",
        }
    }
}

/// Decodes one client response line (RFC 4954): `*` cancels, `=` is the empty response,
/// anything else must be base64 (surrounding whitespace ignored).
pub fn decode_response(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    let text = line.trim_ascii();
    if text == b"*" {
        return Err(SaslError::Cancelled);
    }
    if text == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(text).map_err(|_| SaslError::InvalidBase64)
}

/// The parts of a `PLAIN` response (RFC 4616): `authzid NUL authcid NUL password`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plain<'a> {
    /// The authorization identity (usually empty).
    pub authzid: &'a [u8],
    /// The user name.
    pub user: &'a [u8],
    /// The password.
    pub password: &'a [u8],
}

/// Splits a decoded `PLAIN` response.
pub fn parse_plain(bytes: &[u8]) -> Result<Plain<'_>, SaslError> {
    let mut parts = bytes.split(|&b| b == 0);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(authzid), Some(user), Some(password), None) => Ok(Plain {
            authzid,
            user,
            password,
        }),
        _ => Err(SaslError::InvalidPlain),
    }
}

/// The user and token of a decoded XOAUTH2 payload (`user=<u>\x01auth=Bearer <t>\x01\x01`).
pub fn parse_xoauth2(raw: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(raw).ok()?;
    let rest = text.strip_suffix("\x01\x01")?;
    let (user, auth) = rest.split_once('\x01')?;
    let user = user.strip_prefix("user=")?;
    let token = auth.strip_prefix("auth=Bearer ")?;
    (!token.contains('\x01')).then_some((user, token))
}

/// The user, host, port and token of a decoded OAUTHBEARER payload (RFC 7628), the user name
/// unescaped (`=2C` → `,`, `=3D` → `=`).
pub fn parse_oauthbearer(raw: &[u8]) -> Option<(String, &str, u16, &str)> {
    let text = std::str::from_utf8(raw).ok()?;
    let rest = text.strip_prefix("n,a=")?;
    let (user, rest) = rest.split_once(",\x01")?;
    let rest = rest.strip_suffix("\x01\x01")?;
    let mut fields = rest.split('\x01');
    let host = fields.next()?.strip_prefix("host=")?;
    let port = fields.next()?.strip_prefix("port=")?.parse().ok()?;
    let token = fields.next()?.strip_prefix("auth=Bearer ")?;
    if fields.next().is_some() || user.contains(',') {
        return None;
    }
    Some((
        user.replace("=2C", ",").replace("=3D", "="),
        host,
        port,
        token,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(p: &SaslPayload) -> String {
        String::from_utf8(STANDARD.decode(p.expose()).unwrap()).unwrap()
    }

    #[test]
    fn xoauth2_has_the_documented_format() {
        let p = xoauth2_payload("scan@example.com", &AccessToken::new("ya29.tok"));
        assert_eq!(
            decode(&p),
            "user=scan@example.com\x01auth=Bearer ya29.tok\x01\x01"
        );
        // The example from Google's XOAUTH2 documentation.
        let p = xoauth2_payload(
            "someuser@example.com",
            &AccessToken::new("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"),
        );
        assert_eq!(
            p.expose(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn oauthbearer_has_the_rfc7628_format() {
        let p = oauthbearer_payload(
            "user@example.com",
            "server.example.com",
            143,
            &AccessToken::new("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="),
        );
        assert_eq!(
            decode(&p),
            "n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        let p = oauthbearer_payload("a,b=c", "h", 1, &AccessToken::new("t"));
        assert!(decode(&p).starts_with("n,a=a=2Cb=3Dc,\x01"));
    }

    #[test]
    fn error_challenge_is_decoded() {
        let json = r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#;
        let v = decode_error_challenge(&STANDARD.encode(json)).unwrap();
        assert_eq!(v["status"], "401");
        assert_eq!(v["schemes"], "bearer");
        assert_eq!(v["scope"], "https://mail.google.com/");
        assert!(decode_error_challenge("not base64!").is_none());
        assert!(decode_error_challenge(&STANDARD.encode("plain text")).is_none());
        assert!(decode_error_challenge(&STANDARD.encode("[1]")).is_none());
        assert_eq!(challenge_answer(Mechanism::OAuthBearer), "AQ==");
        assert_eq!(challenge_answer(Mechanism::XOAuth2), "");
        assert_eq!(Mechanism::XOAuth2.as_str(), "XOAUTH2");
    }

    #[test]
    fn secrets_are_redacted() {
        let t = AccessToken::new("very-secret-token");
        let p = xoauth2_payload("u@example.com", &t);
        for s in [format!("{t:?}"), format!("{t}"), format!("{p:?}")] {
            assert!(!s.contains("very-secret"), "{s}");
            assert!(s.contains("[redacted]"));
        }
    }
}
