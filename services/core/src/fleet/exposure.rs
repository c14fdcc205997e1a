//! How a device's send and fetch profiles would carry the OAuth access token: in clear text or
//! to an unverified certificate, to a host that is not loopback. The admin API refuses such a
//! profile unless it explicitly allows it (`insecure_allow_cleartext_tokens`, checked by the
//! broker's conversions), and every surface that shows the device says so
//! ([`cleartext_token_warnings`]: audit entries, the fleet status). Pure functions.

use tokenfleet_domain::{self as dom, Valid, ValidationError};

/// Whether `host` is this machine (`localhost`, 127.0.0.0/8, `::1`): a token sent there in clear
/// text does not cross a network.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How a profile would carry the access token to `host`, when that exposes it: `Some((field,
/// problem))` for no TLS (`cleartext_field`, e.g. `security none` or an `http://` URL) or TLS
/// without certificate verification, to a host that is not loopback.
fn token_exposure(
    section: &str,
    host: &str,
    cleartext_field: Option<&str>,
    skip_verification: bool,
) -> Option<(String, String)> {
    if is_loopback_host(host) {
        return None;
    }
    if let Some(field) = cleartext_field {
        return Some((
            format!("device.{section}.{field}"),
            format!("would send the OAuth access token in clear text to `{host}`"),
        ));
    }
    skip_verification.then(|| {
        (
            format!("device.{section}.skip_certificate_verification"),
            format!(
                "would send the OAuth access token to `{host}` without checking who holds its certificate"
            ),
        )
    })
}

/// Refuses an exposure (see `token_exposure`) unless the profile explicitly allows it.
pub fn check_token_exposure(
    section: &str,
    exposure: Option<(String, String)>,
    allowed: bool,
) -> Valid {
    match exposure {
        Some((field, problem)) if !allowed => Err(ValidationError::new(
            field,
            format!(
                "{problem}; use TLS with verification (security starttls or implicit_tls, an \
                 https:// URL, a private CA in extra_ca_pem), or for a relay on a trusted network \
                 set device.{section}.insecure_allow_cleartext_tokens (audited)"
            ),
        )),
        _ => Ok(()),
    }
}

/// How the send profile carries the token, when that exposes it (see `token_exposure`).
pub fn smtp_exposure(s: &dom::SmtpProfile) -> Option<(String, String)> {
    if s.method == dom::SendMethod::Smtp {
        let cleartext = (s.security == dom::TlsMode::None).then_some("security");
        return token_exposure("smtp", &s.server, cleartext, !s.verify_certificate);
    }
    let base = match (s.api_base_url.as_str(), s.method) {
        ("", dom::SendMethod::Graph) => "https://graph.microsoft.com/v1.0",
        ("", _) => "https://gmail.googleapis.com",
        (url, _) => url,
    };
    let url = url::Url::parse(base).ok()?;
    let cleartext = (url.scheme() == "http").then_some("api_base_url");
    token_exposure(
        "smtp",
        url.host_str().unwrap_or_default(),
        cleartext,
        !s.verify_certificate,
    )
}

/// How the fetch profile carries the token, when that exposes it (see `token_exposure`).
pub fn fetch_exposure(f: &dom::FetchProfile) -> Option<(String, String)> {
    if f.server.is_empty() {
        return None;
    }
    let cleartext = (f.security == dom::TlsMode::None).then_some("security");
    token_exposure("fetch", &f.server, cleartext, !f.verify_certificate)
}

/// The insecure settings a device uses, one line each (`device.smtp.security would send …
/// (allowed by insecure_allow_cleartext_tokens)`), for audit entries and warnings on every
/// surface. Empty for a device that sends tokens only over verified TLS or to loopback.
pub fn cleartext_token_warnings(d: &dom::Device) -> Vec<String> {
    [
        (
            smtp_exposure(&d.smtp),
            d.smtp.insecure_allow_cleartext_tokens,
        ),
        (
            fetch_exposure(&d.fetch),
            d.fetch.insecure_allow_cleartext_tokens,
        ),
    ]
    .into_iter()
    .filter_map(|(exposure, allowed)| {
        let (field, problem) = exposure?;
        allowed.then(|| format!("INSECURE: {field} {problem} (insecure_allow_cleartext_tokens)"))
    })
    .collect()
}
