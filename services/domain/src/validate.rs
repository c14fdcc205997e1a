//! Input validation. Every error names the field at fault, so every surface can say exactly what is
//! wrong (`mailbox.address: ...`).

use std::fmt;

/// A rejected input: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// Dotted field path, e.g. `device.smtp.port`.
    pub field: String,
    /// What is wrong, in plain words.
    pub problem: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl ValidationError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Result of a validation step.
pub type Valid<T = ()> = Result<T, ValidationError>;

/// Longest resource name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest display name / free text.
pub const MAX_TEXT_LEN: usize = 200;
/// Longest URL.
pub const MAX_URL_LEN: usize = 2048;
/// Longest PEM blob.
pub const MAX_PEM_LEN: usize = 64 * 1024;
/// Longest secret (client secrets, service-account JSON keys).
pub const MAX_SECRET_LEN: usize = 16 * 1024;

/// A resource name: 1-63 characters `[a-z0-9-]`, starting with a letter or digit, not ending in `-`.
pub fn name(field: &str, value: &str) -> Valid {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "must be at most {MAX_NAME_LEN} characters, got {}",
                value.len()
            ),
        ));
    }
    let bytes = value.as_bytes();
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err(ValidationError::new(
            field,
            format!("`{}` may contain only a-z, 0-9 and -", printable(value)),
        ));
    }
    if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err(ValidationError::new(
            field,
            format!("`{value}` must not start or end with -"),
        ));
    }
    Ok(())
}

/// Optional reference to another resource: empty, or a valid name.
pub fn optional_name(field: &str, value: &str) -> Valid {
    if value.is_empty() {
        Ok(())
    } else {
        name(field, value)
    }
}

/// Free text up to `max` characters with no control characters.
pub fn text(field: &str, value: &str, max: usize) -> Valid {
    let len = value.chars().count();
    if len > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} characters, got {len}"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Required free text.
pub fn required_text(field: &str, value: &str, max: usize) -> Valid {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    text(field, value, max)
}

/// An e-mail address (`local@domain`, RFC 5321 lengths, no spaces or angle brackets).
pub fn email(field: &str, value: &str) -> Valid {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > 254 {
        return Err(ValidationError::new(
            field,
            format!("must be at most 254 characters, got {}", value.len()),
        ));
    }
    let bad = || {
        ValidationError::new(
            field,
            format!(
                "`{}` is not an e-mail address (local@domain)",
                printable(value)
            ),
        )
    };
    let (local, domain) = value.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.len() > 64
        || domain.is_empty()
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
    {
        return Err(bad());
    }
    if value.chars().any(|c| {
        c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '(' | ')' | ',' | ';' | '"')
    }) {
        return Err(bad());
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad());
    }
    Ok(())
}

/// An absolute `http`/`https` URL, or empty when `required` is false.
pub fn url(field: &str, value: &str, required: bool) -> Valid {
    if value.is_empty() {
        return if required {
            Err(ValidationError::new(field, "must not be empty"))
        } else {
            Ok(())
        };
    }
    if value.len() > MAX_URL_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_URL_LEN} characters"),
        ));
    }
    // Error messages show the URL without any password it carries.
    let shown = redact_url_password(value);
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| {
            ValidationError::new(
                field,
                format!(
                    "`{}` must start with https:// or http://",
                    printable(&shown)
                ),
            )
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::new(
            field,
            format!("`{}` is not a valid URL", printable(&shown)),
        ));
    }
    Ok(())
}

/// A host name or IP literal for a mail server (required).
pub fn host(field: &str, value: &str) -> Valid {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > 253
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'))
    {
        return Err(ValidationError::new(
            field,
            format!("`{}` is not a host name or IP address", printable(value)),
        ));
    }
    Ok(())
}

/// A TCP port 1-65535 from a wire `u32`.
pub fn port(field: &str, value: u32) -> Valid<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ValidationError::new(
            field,
            format!("must be a port between 1 and 65535, got {value}"),
        )),
    }
}

/// PEM text: empty, or at least one `-----BEGIN` block, bounded in size.
pub fn pem(field: &str, value: &str) -> Valid {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > MAX_PEM_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_PEM_LEN} bytes"),
        ));
    }
    if !value.contains("-----BEGIN ") {
        return Err(ValidationError::new(
            field,
            "is not PEM (no -----BEGIN line)",
        ));
    }
    Ok(())
}

/// An IPv4/IPv6 address or CIDR range.
pub fn cidr(field: &str, value: &str) -> Valid {
    let (addr, prefix) = match value.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (value, None),
    };
    let ip: std::net::IpAddr = addr.parse().map_err(|_| {
        ValidationError::new(
            field,
            format!("`{}` is not an IP address or CIDR range", printable(value)),
        )
    })?;
    if let Some(p) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match p.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => {
                return Err(ValidationError::new(
                    field,
                    format!("prefix length in `{value}` must be 0-{max}"),
                ));
            }
        }
    }
    Ok(())
}

/// A secret's size bound (the value itself is never echoed).
pub fn secret_len(field: &str, value: &str) -> Valid {
    if value.len() > MAX_SECRET_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_SECRET_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Shortens and escapes a value for an error message.
/// What replaces a secret in output.
pub const REDACTED: &str = "[redacted]";

/// Splits `scheme://user:password@host…` into the URL without the password
/// (`scheme://user@host…`) and the password; URLs without a password come back unchanged.
/// Works on the text (no normalisation), so what is kept is exactly what was given.
pub fn split_url_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &authority[..at];
    let Some((user, password)) = userinfo.split_once(':') else {
        return (url.to_owned(), None);
    };
    let kept = format!("{scheme}://{user}@{}", &rest[at + 1..]);
    (kept, Some(password.to_owned()))
}

/// The URL with its password (if any) replaced by [`REDACTED`]: `http://u:[redacted]@proxy:3128`.
pub fn redact_url_password(url: &str) -> String {
    match split_url_password(url) {
        (kept, Some(_)) => with_url_password(&kept, REDACTED),
        (kept, None) => kept,
    }
}

/// Puts `password` into a URL that carries a user name but no password
/// (`http://u@host` → `http://u:password@host`); a URL without a user name gets `:password`
/// as the whole user information.
pub fn with_url_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}:{password}{}", &rest[..at], &rest[at..]),
        None => format!("{scheme}://:{password}@{rest}"),
    }
}

fn printable(value: &str) -> String {
    let mut s: String = value
        .chars()
        .take(80)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > 80 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_split_and_redact() {
        assert_eq!(
            split_url_password("http://user:pa:ss@proxy.example:3128/x"),
            (
                "http://user@proxy.example:3128/x".to_owned(),
                Some("pa:ss".to_owned())
            )
        );
        assert_eq!(
            split_url_password("http://proxy.example:3128"),
            ("http://proxy.example:3128".to_owned(), None)
        );
        assert_eq!(
            split_url_password("http://user@proxy.example"),
            ("http://user@proxy.example".to_owned(), None)
        );
        assert_eq!(
            redact_url_password("https://u:secret@p.example/a@b"),
            "https://u:[redacted]@p.example/a@b"
        );
        assert_eq!(
            with_url_password("http://u@p.example:1", "pw"),
            "http://u:pw@p.example:1"
        );
        let err = url("f", "ftp://u:topsecret@x", false).unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }

    #[test]
    fn names() {
        assert!(name("n", "acme-01").is_ok());
        assert_eq!(
            name("tenant.name", "").unwrap_err().to_string(),
            "tenant.name: must not be empty"
        );
        assert!(name("n", "Acme").unwrap_err().problem.contains("a-z"));
        assert!(name("n", "-a").is_err());
        assert!(name("n", "a-").is_err());
        assert!(
            name("n", &"a".repeat(64))
                .unwrap_err()
                .problem
                .contains("63")
        );
        assert!(name("n", "a b").is_err());
    }

    #[test]
    fn emails() {
        assert!(email("a", "scan@contoso.com").is_ok());
        for bad in [
            "",
            "scan",
            "@contoso.com",
            "scan@",
            "scan@contoso",
            "a b@c.com",
            "<a@b.com>",
            "a@b..com",
            "a@b.com\r\nX: y",
        ] {
            let err = email("mailbox.address", bad).unwrap_err();
            assert_eq!(err.field, "mailbox.address", "{bad}");
        }
    }

    #[test]
    fn urls_ports_cidrs_pem() {
        assert!(url("u", "https://login.example/x", true).is_ok());
        assert!(url("u", "", false).is_ok());
        assert!(url("u", "", true).is_err());
        assert!(url("u", "ftp://x", true).is_err());
        assert!(url("u", "https://", true).is_err());
        assert_eq!(port("p", 587).unwrap(), 587);
        assert!(port("p", 0).is_err());
        assert!(port("p", 70000).unwrap_err().problem.contains("70000"));
        assert!(cidr("c", "192.168.1.0/24").is_ok());
        assert!(cidr("c", "::1").is_ok());
        assert!(cidr("c", "10.0.0.0/33").is_err());
        assert!(cidr("c", "printer").is_err());
        assert!(pem("p", "").is_ok());
        assert!(pem("p", "garbage").is_err());
    }

    #[test]
    fn text_limits() {
        assert!(text("t", &"é".repeat(200), MAX_TEXT_LEN).is_ok());
        assert!(text("t", &"é".repeat(201), MAX_TEXT_LEN).is_err());
        assert!(text("t", "a\u{0}b", MAX_TEXT_LEN).is_err());
        assert!(required_text("t", "  ", 10).is_err());
    }
}
