//! The device profiles of the broker's configuration (`pb::SmtpProfile`, `pb::FetchProfile`,
//! `pb::AgentDevice`) turned into the settings of the pieces that use them: upstream SMTP and
//! mail API settings and [`Delivery`]s, fetch settings, TLS settings, and which mailbox and
//! token purpose a fetch job uses. Pure conversions, no I/O, no runtime state: the device
//! registry, the fetch scheduler, the connection tests and the composition root
//! ([`super::wiring`]) all call these, and this module calls none of them. Errors name the
//! profile field that is wrong.

use std::sync::Arc;
use std::time::Duration;

use tokenfleet_proto::v1 as pb;

use crate::fetch::{FetchProtocol, FetchSettings};
use crate::upstream::Delivery;
use crate::upstream::api::{ApiSettings, GmailDelivery, GraphDelivery};
use crate::upstream::smtp::{Security, SmtpDelivery, SmtpSettings};
use crate::upstream::tls::{TlsSettings, TlsVersion};

/// The upstream of a send profile: SMTP submission by default, Microsoft Graph or the Gmail API
/// per `smtp.method`.
pub fn delivery(profile: &pb::SmtpProfile) -> Result<Arc<dyn Delivery>, String> {
    match pb::SendMethod::try_from(profile.method).unwrap_or_default() {
        pb::SendMethod::Unspecified | pb::SendMethod::Smtp => smtp_delivery(profile),
        pb::SendMethod::Graph => graph_delivery(profile),
        pb::SendMethod::GmailApi => gmail_delivery(profile),
    }
}

fn tls_version(v: i32) -> Option<TlsVersion> {
    match pb::TlsVersion::try_from(v).unwrap_or_default() {
        pb::TlsVersion::Unspecified => None,
        pb::TlsVersion::TlsVersion12 => Some(TlsVersion::Tls12),
        pb::TlsVersion::TlsVersion13 => Some(TlsVersion::Tls13),
    }
}

/// The TLS fields both profile kinds carry.
fn tls(
    skip_verification: bool,
    extra_ca_pem: &str,
    min: i32,
    max: i32,
    allow_cleartext_tokens: bool,
) -> TlsSettings {
    TlsSettings {
        skip_verification,
        extra_ca_pem: (!extra_ca_pem.trim().is_empty()).then(|| extra_ca_pem.to_owned()),
        min_version: tls_version(min),
        max_version: tls_version(max),
        no_system_roots: false,
        allow_cleartext_tokens,
    }
}

/// TLS settings of a send profile.
pub fn tls_settings(profile: &pb::SmtpProfile) -> TlsSettings {
    tls(
        profile.skip_certificate_verification,
        &profile.extra_ca_pem,
        profile.tls_min_version,
        profile.tls_max_version,
        profile.insecure_allow_cleartext_tokens,
    )
}

/// Upstream SMTP settings from a device's send profile (`smtp.server`, `port`, `security`,
/// `timeout_seconds`, TLS fields); the error names the field.
pub fn smtp_settings(profile: &pb::SmtpProfile) -> Result<SmtpSettings, String> {
    if profile.server.trim().is_empty() {
        return Err("smtp.server: not set".to_owned());
    }
    let port = u16::try_from(profile.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("smtp.port {}: must be 1-65535", profile.port))?;
    // Unset security: what the port conventionally means.
    let mut settings = SmtpSettings::new(
        profile.server.trim(),
        port,
        security(profile.security, port, 465),
    );
    if profile.timeout_seconds > 0 {
        settings.timeout = Duration::from_secs(u64::from(profile.timeout_seconds));
    }
    settings.tls = tls_settings(profile);
    Ok(settings)
}

/// SMTP submission for a device's send profile.
pub fn smtp_delivery(profile: &pb::SmtpProfile) -> Result<Arc<dyn Delivery>, String> {
    Ok(Arc::new(SmtpDelivery::new(smtp_settings(profile)?)))
}

/// Mail API settings of a send profile (base URL, TLS, timeout).
pub fn api_settings(profile: &pb::SmtpProfile) -> ApiSettings {
    ApiSettings {
        base_url: (!profile.api_base_url.trim().is_empty()).then(|| profile.api_base_url.clone()),
        tls: tls_settings(profile),
        timeout: (profile.timeout_seconds > 0)
            .then(|| Duration::from_secs(u64::from(profile.timeout_seconds))),
    }
}

/// Microsoft Graph `sendMail` for a device's send profile.
pub fn graph_delivery(profile: &pb::SmtpProfile) -> Result<Arc<dyn Delivery>, String> {
    GraphDelivery::new(&api_settings(profile))
        .map(|d| Arc::new(d) as Arc<dyn Delivery>)
        .map_err(|e| format!("smtp.method GRAPH: {e}"))
}

/// Gmail API `messages.send` for a device's send profile.
pub fn gmail_delivery(profile: &pb::SmtpProfile) -> Result<Arc<dyn Delivery>, String> {
    GmailDelivery::new(&api_settings(profile))
        .map(|d| Arc::new(d) as Arc<dyn Delivery>)
        .map_err(|e| format!("smtp.method GMAIL_API: {e}"))
}

fn security(mode: i32, port: u16, implicit_port: u16) -> Security {
    match pb::TlsMode::try_from(mode).unwrap_or_default() {
        pb::TlsMode::Starttls => Security::Starttls,
        pb::TlsMode::ImplicitTls => Security::ImplicitTls,
        pb::TlsMode::None => Security::None,
        pb::TlsMode::Unspecified if port == implicit_port => Security::ImplicitTls,
        pb::TlsMode::Unspecified => Security::Starttls,
    }
}

/// Fetch settings from a device's fetch profile; the error names the field.
pub fn fetch_settings(profile: &pb::FetchProfile) -> Result<FetchSettings, String> {
    if profile.server.trim().is_empty() {
        return Err("fetch.server: not set".to_owned());
    }
    let port = u16::try_from(profile.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("fetch.port {}: must be 1-65535", profile.port))?;
    let (protocol, implicit) =
        match pb::FetchProtocol::try_from(profile.protocol).unwrap_or_default() {
            pb::FetchProtocol::Imap => (FetchProtocol::Imap, 993),
            pb::FetchProtocol::Pop3 => (FetchProtocol::Pop3, 995),
            pb::FetchProtocol::Unspecified => {
                return Err("fetch.protocol: not set (POP3 or IMAP)".to_owned());
            }
        };
    let mut settings = FetchSettings::new(
        protocol,
        profile.server.trim(),
        port,
        security(profile.security, port, implicit),
    );
    settings.tls = tls(
        profile.skip_certificate_verification,
        &profile.extra_ca_pem,
        profile.tls_min_version,
        profile.tls_max_version,
        profile.insecure_allow_cleartext_tokens,
    );
    if !profile.folder.trim().is_empty() {
        settings.folder = profile.folder.trim().to_owned();
    }
    Ok(settings)
}

/// The mailbox whose upstream a device's fetch job empties, or why there is none.
pub fn fetch_mailbox(spec: &pb::AgentDevice) -> Result<String, String> {
    fn pick(m: &Option<pb::MailboxRef>) -> Option<String> {
        m.as_ref().map(|m| m.name.clone()).filter(|n| !n.is_empty())
    }
    let mode = pb::SenderMode::try_from(spec.sender_mode).unwrap_or_default();
    let picked = match mode {
        pb::SenderMode::Bulk => pick(&spec.bulk_mailbox),
        _ => pick(&spec.admin_mailbox),
    };
    picked.ok_or_else(|| match mode {
        pb::SenderMode::Bulk => {
            "fetching: sender mode BULK but the device names no bulk mailbox".to_owned()
        }
        pb::SenderMode::FixedAdmin => {
            "fetching: sender mode FIXED_ADMIN but the device names no admin mailbox".to_owned()
        }
        other => format!(
            "fetching skipped: sender mode {} signs users in at the device, so there is no fixed \
             mailbox to fetch; set the device's admin mailbox to fetch that one",
            other.as_str_name()
        ),
    })
}

/// The token purpose of a fetch profile.
pub fn fetch_purpose(profile: &pb::FetchProfile) -> pb::MailPurpose {
    match pb::FetchProtocol::try_from(profile.protocol).unwrap_or_default() {
        pb::FetchProtocol::Imap => pb::MailPurpose::Imap,
        _ => pb::MailPurpose::Pop,
    }
}
