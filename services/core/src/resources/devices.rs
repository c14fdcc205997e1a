//! Devices as a [`Resource`], in domain types: callers send a [`DeviceInput`] (the fields as
//! given, enum values possibly unset, the ingress password in clear) and get back the [`Device`]
//! record with its version ([`Versioned`]; the password hash shown as `[redacted]`). A
//! device's agent, mailboxes and user provider must exist in its tenant, and its ingress user
//! name must be unique on its agent. The ingress password is stored only as an Argon2id hash
//! (PHC string), kept by updates that do not name it. Agents of the tenant learn about every
//! change.

use tokenfleet_domain::{
    self as dom, Agent, Device, MAX_TEXT_LEN, Mailbox, Provider, Stamps, Valid, ValidationError,
};
use tokenfleet_listen::{MIN_IPV4_PREFIX, MIN_IPV6_PREFIX, NetworkError, parse_network};
use tokenfleet_seal::Secret;
use tokenfleet_store::{RecordKey, Scope};

use super::fields::{MAX_SECONDS, list_len, seconds, tls_range};
use crate::authz::Principal;
use crate::fleet::exposure::{
    check_token_exposure, cleartext_token_warnings, fetch_exposure, smtp_exposure,
};
use crate::ops::Error;
use crate::ops::choice::Choice;
use crate::ops::mask::{FieldTable, SecretChange, UpdateMask, secret_change};
use crate::ops::names::shown;
use crate::ops::resource::{Resource, resource_names};
use crate::ops::stored::records;
use crate::records::{Versioned, agent_key, device_key, mailbox_key, provider_key};
use crate::state::BrokerState;

/// Most mailboxes a device may list as allowed.
const MAX_ALLOWED_MAILBOXES: usize = 100;
/// Most ingress source ranges.
const MAX_SOURCES: usize = 100;
/// Longest device ingress password.
const MAX_PASSWORD_LEN: usize = 1024;

/// The fields of a device as update masks name them (the Admin API's field names).
/// `ingress.password` may be named alone to set or (empty) clear only the password.
pub const FIELDS: FieldTable = FieldTable {
    resource: "device",
    mutable: &[
        "display_name",
        "agent",
        "sender_mode",
        "admin_mailbox",
        "bulk_mailbox",
        "allowed_mailboxes",
        "smtp",
        "fetch",
        "ingress",
        "ingress.password",
        "user_provider",
    ],
    immutable: &["tenant", "name"],
    output_only: &[
        "ingress.password_set",
        "create_time",
        "update_time",
        "version",
    ],
};

/// A device as a caller sent it, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInput {
    /// Version the change is conditional on (0: unconditional).
    pub version: u64,
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Display name.
    pub display_name: String,
    /// The agent hosting the device (empty: none yet).
    pub agent: String,
    /// Which sender the device's mail leaves as.
    pub sender_mode: Choice<dom::SenderMode>,
    /// Mailbox of `fixed_admin`.
    pub admin_mailbox: String,
    /// Mailbox of `bulk`.
    pub bulk_mailbox: String,
    /// Mailboxes the device may use.
    pub allowed_mailboxes: Vec<String>,
    /// Send profile; `None`: none.
    pub smtp: Option<SmtpInput>,
    /// Fetch profile; `None`: none.
    pub fetch: Option<FetchInput>,
    /// Local ingress credentials; `None`: none.
    pub ingress: Option<IngressInput>,
    /// Provider of per-user mailboxes (empty: none).
    pub user_provider: String,
}

/// A send profile as sent. A port of 0 means the default of the security mode; a timeout of 0
/// the default timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmtpInput {
    /// SMTP server host.
    pub server: String,
    /// Port (0: default).
    pub port: u32,
    /// Transport security.
    pub security: Choice<dom::TlsMode>,
    /// Timeout, seconds (0: default).
    pub timeout_seconds: u32,
    /// Sender display name.
    pub sender_name: String,
    /// Sender address.
    pub sender_address: String,
    /// Whether the server certificate is verified.
    pub verify_certificate: bool,
    /// Extra trusted CA (PEM).
    pub extra_ca_pem: String,
    /// Lowest TLS version.
    pub tls_min_version: Choice<dom::TlsVersion>,
    /// Highest TLS version.
    pub tls_max_version: Choice<dom::TlsVersion>,
    /// SMTP or a mail API (unset: SMTP).
    pub method: Choice<dom::SendMethod>,
    /// Mail API base URL override.
    pub api_base_url: String,
    /// Allows sending tokens without TLS to a non-loopback host.
    pub insecure_allow_cleartext_tokens: bool,
}

/// A fetch profile as sent. A port of 0 means the default of the protocol and security mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchInput {
    /// POP3 or IMAP.
    pub protocol: Choice<dom::FetchProtocol>,
    /// Server host.
    pub server: String,
    /// Port (0: default).
    pub port: u32,
    /// Transport security.
    pub security: Choice<dom::TlsMode>,
    /// Interval, seconds (0: fetching disabled).
    pub interval_seconds: u32,
    /// Whether the server certificate is verified.
    pub verify_certificate: bool,
    /// Extra trusted CA (PEM).
    pub extra_ca_pem: String,
    /// Lowest TLS version.
    pub tls_min_version: Choice<dom::TlsVersion>,
    /// Highest TLS version.
    pub tls_max_version: Choice<dom::TlsVersion>,
    /// IMAP folder (empty: INBOX).
    pub folder: String,
    /// Allows sending tokens without TLS to a non-loopback host.
    pub insecure_allow_cleartext_tokens: bool,
}

/// Local ingress credentials as sent; the password in clear (empty: none given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressInput {
    /// SMTP/POP3 user name the device logs in with.
    pub username: String,
    /// Password (input only; stored as a hash).
    pub password: Secret,
    /// Source ranges (CIDR) the device connects from.
    pub allowed_sources: Vec<String>,
    /// Addresses (or `@domain`s) of the device's users.
    pub user_addresses: Vec<String>,
}

fn smtp_from_input(s: Option<&SmtpInput>) -> Valid<dom::SmtpProfile> {
    let Some(s) = s else {
        return Ok(dom::SmtpProfile::default());
    };
    let method = s
        .method
        .optional("device.smtp.method")?
        .unwrap_or(dom::SendMethod::Smtp);
    // A mail API needs no SMTP server; its TLS settings (CA, versions, verification) still apply.
    let api = method != dom::SendMethod::Smtp;
    if !(api && s.server.is_empty()) {
        dom::host("device.smtp.server", &s.server)?;
    }
    let security = match s.security.optional("device.smtp.security")? {
        Some(mode) => mode,
        None if api => dom::TlsMode::ImplicitTls,
        None => Choice::Unset.required("device.smtp.security")?,
    };
    let port = match s.port {
        0 => match security {
            dom::TlsMode::Starttls => 587,
            dom::TlsMode::ImplicitTls => 465,
            dom::TlsMode::None => 25,
        },
        p => dom::port("device.smtp.port", p)?,
    };
    let timeout_seconds = seconds("device.smtp.timeout_seconds", s.timeout_seconds, 60, 1)?;
    dom::text("device.smtp.sender_name", &s.sender_name, MAX_TEXT_LEN)?;
    if !s.sender_address.is_empty() {
        dom::email("device.smtp.sender_address", &s.sender_address)?;
    }
    dom::pem("device.smtp.extra_ca_pem", &s.extra_ca_pem)?;
    let (tls_min_version, tls_max_version) =
        tls_range("device.smtp", s.tls_min_version, s.tls_max_version)?;
    if !s.api_base_url.is_empty() {
        dom::url("device.smtp.api_base_url", &s.api_base_url, false)?;
    }
    let profile = dom::SmtpProfile {
        server: s.server.clone(),
        port,
        security,
        timeout_seconds,
        sender_name: s.sender_name.clone(),
        sender_address: s.sender_address.clone(),
        verify_certificate: s.verify_certificate,
        extra_ca_pem: s.extra_ca_pem.clone(),
        tls_min_version,
        tls_max_version,
        method,
        api_base_url: s.api_base_url.clone(),
        insecure_allow_cleartext_tokens: s.insecure_allow_cleartext_tokens,
    };
    check_token_exposure(
        "smtp",
        smtp_exposure(&profile),
        profile.insecure_allow_cleartext_tokens,
    )?;
    Ok(profile)
}

fn fetch_from_input(f: Option<&FetchInput>) -> Valid<dom::FetchProfile> {
    let Some(f) = f else {
        return Ok(dom::FetchProfile::default());
    };
    let protocol = f.protocol.required("device.fetch.protocol")?;
    dom::host("device.fetch.server", &f.server)?;
    let security = f.security.required("device.fetch.security")?;
    let port = match f.port {
        0 => match (protocol, security) {
            (dom::FetchProtocol::Pop3, dom::TlsMode::ImplicitTls) => 995,
            (dom::FetchProtocol::Pop3, _) => 110,
            (dom::FetchProtocol::Imap, dom::TlsMode::ImplicitTls) => 993,
            (dom::FetchProtocol::Imap, _) => 143,
        },
        p => dom::port("device.fetch.port", p)?,
    };
    if f.interval_seconds != 0 && !(10..=MAX_SECONDS).contains(&f.interval_seconds) {
        return Err(ValidationError::new(
            "device.fetch.interval_seconds",
            format!(
                "must be 0 (fetching disabled) or 10-{MAX_SECONDS} seconds, got {}",
                f.interval_seconds
            ),
        ));
    }
    dom::pem("device.fetch.extra_ca_pem", &f.extra_ca_pem)?;
    let (tls_min_version, tls_max_version) =
        tls_range("device.fetch", f.tls_min_version, f.tls_max_version)?;
    let folder = if f.folder.is_empty() {
        "INBOX".to_owned()
    } else {
        dom::text("device.fetch.folder", &f.folder, MAX_TEXT_LEN)?;
        f.folder.clone()
    };
    let profile = dom::FetchProfile {
        protocol,
        server: f.server.clone(),
        port,
        security,
        interval_seconds: f.interval_seconds,
        verify_certificate: f.verify_certificate,
        extra_ca_pem: f.extra_ca_pem.clone(),
        tls_min_version,
        tls_max_version,
        folder,
        insecure_allow_cleartext_tokens: f.insecure_allow_cleartext_tokens,
    };
    check_token_exposure(
        "fetch",
        fetch_exposure(&profile),
        profile.insecure_allow_cleartext_tokens,
    )?;
    Ok(profile)
}

/// Most user addresses of one device.
const MAX_USER_ADDRESSES: usize = 1000;
/// A source range no wider than /[`MIN_IPV4_PREFIX`] (IPv4) or /[`MIN_IPV6_PREFIX`] (IPv6):
/// anything wider, such as `0.0.0.0/0` or `::/0`, would let the whole internet send as the device
/// (an open relay when the agent listens publicly). The rule is [`parse_network`]'s, the one the
/// agent reads the same ranges with and the broker its trusted proxies; the text already passed
/// `dom::cidr`, which named any text that is not an address or range.
fn source_width(field: &str, source: &str) -> Valid {
    let Err(NetworkError::TooWide(_)) = parse_network(source) else {
        return Ok(());
    };
    let (min, family) = if source.contains(':') {
        (MIN_IPV6_PREFIX, "IPv6")
    } else {
        (MIN_IPV4_PREFIX, "IPv4")
    };
    Err(ValidationError::new(
        field,
        format!(
            "`{source}` is too wide: it would let any host send as the device (an open relay if the agent is reachable); an {family} range must be /{min} or narrower — list the devices' addresses or their LAN range"
        ),
    ))
}

/// A user address entry: `local@domain`, or `@domain` for every address of the domain; kept in
/// lower case.
fn user_address(field: &str, value: &str) -> Result<String, ValidationError> {
    let value = value.trim().to_ascii_lowercase();
    match value.strip_prefix('@') {
        Some(domain) => {
            dom::email(field, &format!("user@{domain}")).map_err(|_| {
                ValidationError::new(
                    field,
                    format!(
                        "`{}` is not an address (jane@contoso.com) or a domain (@contoso.com)",
                        value
                            .chars()
                            .filter(|c| !c.is_control())
                            .take(100)
                            .collect::<String>()
                    ),
                )
            })?;
        }
        None => dom::email(field, &value)?,
    }
    Ok(value)
}

fn ingress_from_input(
    i: Option<&IngressInput>,
) -> Valid<(dom::IngressCredentials, Option<Secret>)> {
    let Some(i) = i else {
        return Ok((dom::IngressCredentials::default(), None));
    };
    dom::text("device.ingress.username", &i.username, MAX_TEXT_LEN)?;
    if i.username
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ValidationError::new(
            "device.ingress.username",
            "must not contain spaces or control characters",
        ));
    }
    if i.password.expose().len() > MAX_PASSWORD_LEN {
        return Err(ValidationError::new(
            "device.ingress.password",
            format!("must be at most {MAX_PASSWORD_LEN} bytes"),
        ));
    }
    list_len(
        "device.ingress.allowed_sources",
        i.allowed_sources.len(),
        MAX_SOURCES,
    )?;
    for (n, source) in i.allowed_sources.iter().enumerate() {
        let field = format!("device.ingress.allowed_sources[{n}]");
        dom::cidr(&field, source)?;
        source_width(&field, source)?;
    }
    list_len(
        "device.ingress.user_addresses",
        i.user_addresses.len(),
        MAX_USER_ADDRESSES,
    )?;
    let mut user_addresses = Vec::with_capacity(i.user_addresses.len());
    for (n, a) in i.user_addresses.iter().enumerate() {
        let a = user_address(&format!("device.ingress.user_addresses[{n}]"), a)?;
        if !user_addresses.contains(&a) {
            user_addresses.push(a);
        }
    }
    Ok((
        dom::IngressCredentials {
            username: i.username.clone(),
            password_hash: None,
            allowed_sources: i.allowed_sources.clone(),
            user_addresses,
        },
        (!i.password.is_empty()).then(|| i.password.clone()),
    ))
}

/// A validated device record from what a caller sent, and the ingress password if one was given (the
/// record's `password_hash` is `None`). Mailbox and agent references are checked for form only.
pub fn from_input(d: &DeviceInput, stamps: Stamps) -> Valid<(dom::Device, Option<Secret>)> {
    dom::name("device.tenant", &d.tenant)?;
    dom::name("device.name", &d.name)?;
    dom::text("device.display_name", &d.display_name, MAX_TEXT_LEN)?;
    dom::optional_name("device.agent", &d.agent)?;
    let sender_mode = d.sender_mode.required("device.sender_mode")?;
    dom::optional_name("device.admin_mailbox", &d.admin_mailbox)?;
    dom::optional_name("device.bulk_mailbox", &d.bulk_mailbox)?;
    list_len(
        "device.allowed_mailboxes",
        d.allowed_mailboxes.len(),
        MAX_ALLOWED_MAILBOXES,
    )?;
    let mut allowed: Vec<String> = Vec::new();
    for (i, m) in d.allowed_mailboxes.iter().enumerate() {
        dom::name(&format!("device.allowed_mailboxes[{i}]"), m)?;
        if !allowed.contains(m) {
            allowed.push(m.clone());
        }
    }
    match sender_mode {
        dom::SenderMode::FixedAdmin if d.admin_mailbox.is_empty() => {
            return Err(ValidationError::new(
                "device.admin_mailbox",
                "must be set when sender_mode is fixed_admin",
            ));
        }
        dom::SenderMode::Bulk if d.bulk_mailbox.is_empty() => {
            return Err(ValidationError::new(
                "device.bulk_mailbox",
                "must be set when sender_mode is bulk",
            ));
        }
        _ => {}
    }
    dom::optional_name("device.user_provider", &d.user_provider)?;
    let smtp = smtp_from_input(d.smtp.as_ref())?;
    let fetch = fetch_from_input(d.fetch.as_ref())?;
    let (ingress, password) = ingress_from_input(d.ingress.as_ref())?;
    Ok((
        dom::Device {
            tenant: d.tenant.clone(),
            name: d.name.clone(),
            display_name: d.display_name.clone(),
            agent: d.agent.clone(),
            sender_mode,
            admin_mailbox: d.admin_mailbox.clone(),
            bulk_mailbox: d.bulk_mailbox.clone(),
            allowed_mailboxes: allowed,
            smtp,
            fetch,
            ingress,
            user_provider: d.user_provider.clone(),
            stamps,
        },
        password,
    ))
}

/// A device with an ingress password must have an ingress user name.
pub fn check_device_ingress(d: &dom::Device) -> Valid {
    if d.ingress.password_hash.is_some() && d.ingress.username.is_empty() {
        return Err(ValidationError::new(
            "device.ingress.username",
            "must not be empty when a password is set",
        ));
    }
    Ok(())
}

/// The input form of a stored send profile (`None` for an unset one).
fn smtp_to_input(s: &dom::SmtpProfile) -> Option<SmtpInput> {
    if s.server.is_empty() && s.method == dom::SendMethod::Smtp {
        return None;
    }
    Some(SmtpInput {
        server: s.server.clone(),
        port: u32::from(s.port),
        security: s.security.into(),
        timeout_seconds: s.timeout_seconds,
        sender_name: s.sender_name.clone(),
        sender_address: s.sender_address.clone(),
        verify_certificate: s.verify_certificate,
        extra_ca_pem: s.extra_ca_pem.clone(),
        tls_min_version: s.tls_min_version.map_or(Choice::Unset, Choice::Is),
        tls_max_version: s.tls_max_version.map_or(Choice::Unset, Choice::Is),
        method: s.method.into(),
        api_base_url: s.api_base_url.clone(),
        insecure_allow_cleartext_tokens: s.insecure_allow_cleartext_tokens,
    })
}

/// The input form of a stored fetch profile (`None` when the device fetches nothing).
fn fetch_to_input(f: &dom::FetchProfile) -> Option<FetchInput> {
    if f.server.is_empty() {
        return None;
    }
    Some(FetchInput {
        protocol: f.protocol.into(),
        server: f.server.clone(),
        port: u32::from(f.port),
        security: f.security.into(),
        interval_seconds: f.interval_seconds,
        verify_certificate: f.verify_certificate,
        extra_ca_pem: f.extra_ca_pem.clone(),
        tls_min_version: f.tls_min_version.map_or(Choice::Unset, Choice::Is),
        tls_max_version: f.tls_max_version.map_or(Choice::Unset, Choice::Is),
        folder: f.folder.clone(),
        insecure_allow_cleartext_tokens: f.insecure_allow_cleartext_tokens,
    })
}

/// The input form of stored ingress credentials (no password: only its hash is stored).
fn ingress_to_input(i: &dom::IngressCredentials) -> Option<IngressInput> {
    if *i == dom::IngressCredentials::default() {
        return None;
    }
    Some(IngressInput {
        username: i.username.clone(),
        password: Secret::default(),
        allowed_sources: i.allowed_sources.clone(),
        user_addresses: i.user_addresses.clone(),
    })
}

/// The device resource.
#[derive(Debug, Clone, Copy, Default)]
pub struct Devices;

/// An update's ingress password: what changes, and its hash once computed (reused by retries).
#[derive(Debug, Default)]
pub struct PasswordPlan {
    change: SecretChange,
    hash: Option<String>,
}

/// Argon2id hash (PHC string) of an ingress password, computed off the async runtime.
async fn hash_password(password: Secret) -> Result<String, Error> {
    let hashed = tokio::task::spawn_blocking(move || {
        use argon2::password_hash::PasswordHasher as _;
        argon2::Argon2::default()
            .hash_password(password.expose().as_bytes())
            .map(|h| h.to_string())
    })
    .await;
    let failure = |e: &dyn std::fmt::Display| {
        Error::internal(
            "internal error while hashing the password",
            format_args!("hashing an ingress password failed: {e}"),
        )
    };
    match hashed {
        Ok(Ok(phc)) => Ok(phc),
        Ok(Err(e)) => Err(failure(&e)),
        Err(e) => Err(failure(&e)),
    }
}

/// Whether the record `key` exists; FAILED_PRECONDITION on `field` otherwise.
async fn require<T: crate::records::StoredRecord>(
    state: &BrokerState,
    (tenant, key): (&str, RecordKey),
    field: &str,
    what: &str,
) -> Result<(), Error> {
    if records(state).get::<T>(&key).await?.is_none() {
        return Err(Error::precondition(
            field,
            format!("no {what} in tenant `{tenant}`; create it first"),
        ));
    }
    Ok(())
}

/// The agent, every mailbox and the user provider the device names exist in its tenant.
async fn check_references(state: &BrokerState, d: &Device) -> Result<(), Error> {
    let t = d.tenant.as_str();
    if !d.agent.is_empty() {
        let what = format!("agent `{}`", d.agent);
        require::<Agent>(state, (t, agent_key(t, &d.agent)), "device.agent", &what).await?;
    }
    if !d.user_provider.is_empty() {
        let what = format!("provider `{}`", d.user_provider);
        let key = (t, provider_key(t, &d.user_provider));
        require::<Provider>(state, key, "device.user_provider", &what).await?;
    }
    let named = [
        ("device.admin_mailbox".to_owned(), d.admin_mailbox.as_str()),
        ("device.bulk_mailbox".to_owned(), d.bulk_mailbox.as_str()),
    ]
    .into_iter()
    .chain(
        d.allowed_mailboxes
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("device.allowed_mailboxes[{i}]"), m.as_str())),
    );
    for (field, mailbox) in named.filter(|(_, m)| !m.is_empty()) {
        let what = format!("mailbox `{mailbox}`");
        require::<Mailbox>(state, (t, mailbox_key(t, mailbox)), &field, &what).await?;
    }
    Ok(())
}

/// The device's ingress user name is not the login of another device on the same agent (the
/// agent could not tell which device logged in; it refuses such a configuration too). Compared
/// without regard to case. Two concurrent writes can still both pass; the agent then refuses
/// the login of both devices until one is changed.
async fn check_unique_login(state: &BrokerState, d: &Device) -> Result<(), Error> {
    if d.agent.is_empty() || d.ingress.username.is_empty() {
        return Ok(());
    }
    let devices = records(state)
        .list_all::<Device>(&Scope::Tenant(d.tenant.clone()))
        .await?;
    if let Some(other) = devices.iter().map(|v| &v.value).find(|o| {
        o.name != d.name
            && o.agent == d.agent
            && o.ingress.username.eq_ignore_ascii_case(&d.ingress.username)
    }) {
        return Err(Error::precondition(
            "device.ingress.username",
            format!(
                "`{}` is already the ingress login of device `{}` on agent `{}`; each device of an agent needs its own user name",
                shown(&d.ingress.username),
                other.name,
                d.agent
            ),
        ));
    }
    Ok(())
}

/// The checks every written device passes, after its password hash is in place (a placeholder
/// until it is computed).
async fn check_device(state: &BrokerState, d: &Device) -> Result<(), Error> {
    check_device_ingress(d)?;
    check_references(state, d).await?;
    check_unique_login(state, d).await
}

impl Resource for Devices {
    type Output = Versioned<Device>;
    type Extra = Option<Secret>;
    type Plan = PasswordPlan;
    resource_names!(scoped "device" in "devices": Device, input DeviceInput, key device_key);
    fn to_input(d: &Device, version: u64) -> DeviceInput {
        DeviceInput {
            version,
            tenant: d.tenant.clone(),
            name: d.name.clone(),
            display_name: d.display_name.clone(),
            agent: d.agent.clone(),
            sender_mode: d.sender_mode.into(),
            admin_mailbox: d.admin_mailbox.clone(),
            bulk_mailbox: d.bulk_mailbox.clone(),
            allowed_mailboxes: d.allowed_mailboxes.clone(),
            smtp: smtp_to_input(&d.smtp),
            fetch: fetch_to_input(&d.fetch),
            ingress: ingress_to_input(&d.ingress),
            user_provider: d.user_provider.clone(),
        }
    }
    /// The record without its password hash: [`dom::REDACTED`] says one is set.
    fn output(record: &Device, version: u64) -> Versioned<Device> {
        let mut value = record.clone();
        if value.ingress.password_hash.is_some() {
            value.ingress.password_hash = Some(dom::REDACTED.to_owned());
        }
        Versioned { version, value }
    }
    fn from_input(input: &DeviceInput, stamps: Stamps) -> Valid<(Device, Option<Secret>)> {
        from_input(input, stamps)
    }
    /// Copies the fields `mask` selects (the password is handled by [`secret_change`]).
    fn merge(dst: &mut DeviceInput, src: &DeviceInput, mask: &UpdateMask) {
        for path in FIELDS.mutable.iter().filter(|p| mask.includes(p)) {
            match *path {
                "display_name" => dst.display_name.clone_from(&src.display_name),
                "agent" => dst.agent.clone_from(&src.agent),
                "sender_mode" => dst.sender_mode = src.sender_mode,
                "admin_mailbox" => dst.admin_mailbox.clone_from(&src.admin_mailbox),
                "bulk_mailbox" => dst.bulk_mailbox.clone_from(&src.bulk_mailbox),
                "allowed_mailboxes" => dst.allowed_mailboxes.clone_from(&src.allowed_mailboxes),
                "smtp" => dst.smtp.clone_from(&src.smtp),
                "fetch" => dst.fetch.clone_from(&src.fetch),
                "user_provider" => dst.user_provider.clone_from(&src.user_provider),
                // The password stays for validation; whether it applies is decided apart.
                "ingress" => dst.ingress = Some(src.ingress.clone().unwrap_or_default()),
                "ingress.password" => {
                    let password = src
                        .ingress
                        .as_ref()
                        .map(|i| i.password.clone())
                        .unwrap_or_default();
                    dst.ingress.get_or_insert_with(Default::default).password = password;
                }
                _ => {}
            }
        }
    }

    fn check_new(
        &self,
        _: &Principal,
        device: &mut Device,
        password: &Option<Secret>,
    ) -> Result<(), Error> {
        if password.is_some() {
            // Placeholder so the user-name check sees a password; replaced by the hash below.
            device.ingress.password_hash = Some(String::new());
        }
        Ok(check_device_ingress(device)?)
    }

    /// Insecure token transport allowed by the profile is written into the audit entry.
    async fn prepare_new(
        &self,
        state: &BrokerState,
        device: &mut Device,
        password: Option<Secret>,
    ) -> Result<String, Error> {
        check_references(state, device).await?;
        check_unique_login(state, device).await?;
        if let Some(password) = password {
            device.ingress.password_hash = Some(hash_password(password).await?);
        }
        Ok(cleartext_token_warnings(device).join("; "))
    }

    /// `ingress.password` named alone sets or (empty) clears only the password; a whole
    /// `ingress` with a password replaces it.
    fn plan_update(
        &self,
        _: &BrokerState,
        input: &DeviceInput,
        mask: &UpdateMask,
    ) -> Result<PasswordPlan, Error> {
        let password = input
            .ingress
            .as_ref()
            .map(|i| i.password.expose())
            .unwrap_or_default();
        let change = if mask.names("ingress.password") {
            secret_change(mask, "ingress.password", password)
        } else if mask.includes("ingress") && !password.is_empty() {
            SecretChange::Set(Secret::new(password))
        } else {
            SecretChange::Keep
        };
        Ok(PasswordPlan { change, hash: None })
    }

    async fn prepare_update(
        &self,
        state: &BrokerState,
        _: &Principal,
        plan: &mut PasswordPlan,
        old: &Device,
        next: &mut Device,
        _: Option<Secret>,
    ) -> Result<(), Error> {
        next.ingress.password_hash = match &plan.change {
            SecretChange::Keep => old.ingress.password_hash.clone(),
            SecretChange::Clear => None,
            SecretChange::Set(_) => Some(String::new()),
        };
        check_device(state, next).await?;
        if let SecretChange::Set(p) = &plan.change {
            // Hashed once, after validation, and reused if the write must be retried.
            if plan.hash.is_none() {
                plan.hash = Some(hash_password(p.clone()).await?);
            }
            next.ingress.password_hash.clone_from(&plan.hash);
        }
        Ok(())
    }

    async fn updated(
        &self,
        _: &BrokerState,
        plan: PasswordPlan,
        next: &Device,
        version: u64,
        mask: &UpdateMask,
    ) -> Result<(Versioned<Device>, String), Error> {
        let mut detail = format!("fields: {}", mask.describe());
        match plan.change {
            SecretChange::Keep => {}
            SecretChange::Clear => detail.push_str("; ingress password cleared"),
            SecretChange::Set(_) => detail.push_str("; ingress password replaced"),
        }
        for warning in cleartext_token_warnings(next) {
            detail.push_str("; ");
            detail.push_str(&warning);
        }
        Ok((Self::output(next, version), detail))
    }

    async fn changed(&self, state: &BrokerState, tenant: &str) {
        crate::fleet::config_changed(state, tenant).await;
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use tokenfleet_domain::Role;

    use super::*;
    use crate::ops::resource;
    use crate::testing::{principal, put_tenant, state};

    fn input(name: &str, username: &str, password: &str) -> DeviceInput {
        DeviceInput {
            tenant: "acme".into(),
            name: name.into(),
            sender_mode: Choice::Is(dom::SenderMode::LoginUser),
            ingress: Some(IngressInput {
                username: username.into(),
                password: Secret::new(password),
                allowed_sources: vec!["192.168.1.0/24".into()],
                user_addresses: Vec::new(),
            }),
            ..DeviceInput::default()
        }
    }

    /// The ingress password is hashed (Argon2id), never shown, kept by updates that do not name
    /// it and cleared by one that names it empty; validation and authorization are the core's.
    #[tokio::test]
    async fn device_passwords_are_hashed_kept_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        put_tenant(&state, "acme").await;
        let admin = principal(Role::TenantAdmin, Some("acme"));

        let created = resource::create(&Devices, &state, &admin, input("mfp", "printer", "pw"))
            .await
            .unwrap();
        assert_eq!(
            created.value.ingress.password_hash.as_deref(),
            Some(dom::REDACTED)
        );
        let stored = records(&state)
            .get::<Device>(&device_key("acme", "mfp"))
            .await
            .unwrap()
            .unwrap();
        let hash = stored.value.ingress.password_hash.clone().unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");

        // Only the display name: the hash stays.
        let mask = UpdateMask::parse(&FIELDS, &["display_name".to_owned()]);
        let mut rename = input("mfp", "", "");
        rename.display_name = "2nd floor".into();
        rename.sender_mode = Choice::Unset;
        let updated = resource::update(&Devices, &state, &admin, rename, mask)
            .await
            .unwrap();
        assert_eq!(updated.value.display_name, "2nd floor");
        let stored = records(&state)
            .get::<Device>(&device_key("acme", "mfp"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.value.ingress.password_hash.as_deref(),
            Some(hash.as_str())
        );

        // `ingress.password` named with an empty value clears it.
        let mask = UpdateMask::parse(&FIELDS, &["ingress.password".to_owned()]);
        let cleared = resource::update(&Devices, &state, &admin, input("mfp", "", ""), mask)
            .await
            .unwrap();
        assert_eq!(cleared.value.ingress.password_hash, None);
        assert_eq!(cleared.value.ingress.username, "printer");

        // A password without a user name, an unknown sender mode, a viewer writing.
        let err = resource::create(&Devices, &state, &admin, input("x", "", "pw"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("device.ingress.username: "),
            "{err}"
        );
        let mut bad = input("x", "u", "");
        bad.sender_mode = Choice::Unknown(9);
        let err = resource::create(&Devices, &state, &admin, bad)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "device.sender_mode: unknown value 9");
        let viewer = principal(Role::Viewer, Some("acme"));
        let err = resource::create(&Devices, &state, &viewer, input("y", "u", ""))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        // A mailbox that does not exist.
        let mut fixed = input("z", "u", "");
        fixed.sender_mode = Choice::Is(dom::SenderMode::FixedAdmin);
        fixed.admin_mailbox = "scan".into();
        let err = resource::create(&Devices, &state, &admin, fixed)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert!(err.to_string().contains("no mailbox `scan`"), "{err}");
    }

    /// A stored record's input form validates back to the same record.
    #[test]
    fn input_form_round_trips() {
        let (device, _) = from_input(
            &input("mfp", "printer", ""),
            Stamps::new(OffsetDateTime::UNIX_EPOCH),
        )
        .unwrap();
        let again = from_input(&Devices::to_input(&device, 1), device.stamps)
            .unwrap()
            .0;
        assert_eq!(again, device);
    }

    /// Ingress source ranges wider than /8 (IPv4) or /16 (IPv6) are refused, naming the entry.
    #[test]
    fn source_ranges_wider_than_the_rule_are_refused() {
        for ok in ["192.168.1.20", "10.0.0.0/8", "fd00::/16", "fd00::7"] {
            source_width("f", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (wide, family) in [
            ("0.0.0.0/0", "IPv4 range must be /8"),
            ("10.0.0.0/7", "IPv4 range must be /8"),
            ("::/0", "IPv6 range must be /16"),
            ("fd00::/15", "IPv6 range must be /16"),
        ] {
            let e = source_width("device.ingress.allowed_sources[2]", wide)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("allowed_sources[2]")
                    && e.contains(wide)
                    && e.contains("too wide")
                    && e.contains(family),
                "{e}"
            );
        }
    }
}
