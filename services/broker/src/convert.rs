//! Conversion between the wire messages (`tokenfleet_proto::v1`) and the domain records
//! (`tokenfleet_domain`), with the validation every admin RPC applies to its input, and the
//! `update_mask` handling of the `Update*` RPCs.
//!
//! Pure functions, no I/O: checks that need the store (does the referenced provider exist?) live
//! in [`crate::admin`]. Every error names the field at fault as the API spells it
//! (`device.smtp.port`, `mailbox.purposes[1]`).
//!
//! Input-only secrets are returned separately from the domain record ([`ProviderSecrets`], the
//! device password), so sealing and hashing happen in one place and a record never holds
//! plaintext.

use prost_types::{FieldMask, Timestamp};
use time::OffsetDateTime;
use tokenfleet_core::fleet::exposure::{check_token_exposure, fetch_exposure, smtp_exposure};
pub use tokenfleet_core::fleet::exposure::{cleartext_token_warnings, is_loopback_host};
pub use tokenfleet_core::ops::mask::{FieldTable, UpdateMask};
use tokenfleet_core::records::Versioned;
use tokenfleet_domain::{self as dom, MAX_TEXT_LEN, Stamps, Valid, ValidationError};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Secret;

/// Most scopes a provider may list.
const MAX_SCOPES: usize = 50;
/// Most mailboxes a device may list as allowed.
const MAX_ALLOWED_MAILBOXES: usize = 100;
/// Most ingress source ranges.
const MAX_SOURCES: usize = 100;
/// Longest device ingress password.
const MAX_PASSWORD_LEN: usize = 1024;
/// Longest SMTP/fetch timeout or interval, seconds.
const MAX_SECONDS: u32 = 86_400;

/// A wire timestamp.
pub fn timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

fn opt_timestamp(t: Option<OffsetDateTime>) -> Option<Timestamp> {
    t.map(timestamp)
}

/// A required enum value: `None` (UNSPECIFIED) is an error naming `field`.
pub fn required<T>(field: &str, value: Option<T>) -> Valid<T> {
    value.ok_or_else(|| ValidationError::new(field, "must be set (UNSPECIFIED is not a value)"))
}

/// Generates `<name>_in(field, i32) -> Valid<Option<domain>>` (UNSPECIFIED = `None`, unknown
/// numbers rejected) and `<name>_out(domain) -> i32`.
macro_rules! wire_enum {
    ($in_fn:ident, $out_fn:ident, $pb:ident, $dom:ident, { $($pbv:ident <=> $domv:ident),+ $(,)? }) => {
        #[doc = concat!("Reads a wire `", stringify!($pb), "`; UNSPECIFIED is `None`.")]
        pub fn $in_fn(field: &str, value: i32) -> Valid<Option<dom::$dom>> {
            match pb::$pb::try_from(value) {
                Ok(pb::$pb::Unspecified) => Ok(None),
                $(Ok(pb::$pb::$pbv) => Ok(Some(dom::$dom::$domv)),)+
                Err(_) => Err(ValidationError::new(field, format!("unknown value {value}"))),
            }
        }
        #[doc = concat!("Writes a wire `", stringify!($pb), "`.")]
        pub fn $out_fn(value: dom::$dom) -> i32 {
            match value {
                $(dom::$dom::$domv => pb::$pb::$pbv as i32,)+
            }
        }
    };
}

wire_enum!(token_status_in, token_status_out, TokenStatus, TokenStatus, {
    NotRetrieved <=> NotRetrieved,
    ConsentPending <=> ConsentPending,
    Active <=> Active,
    RefreshFailing <=> RefreshFailing,
    ReauthRequired <=> ReauthRequired,
    Disabled <=> Disabled,
});
wire_enum!(provider_kind_in, provider_kind_out, ProviderKind, ProviderKind, {
    Microsoft <=> Microsoft,
    Google <=> Google,
    Generic <=> Generic,
});
wire_enum!(grant_type_in, grant_type_out, GrantType, GrantType, {
    DelegatedDeviceCode <=> DelegatedDeviceCode,
    DelegatedAuthCode <=> DelegatedAuthCode,
    AppOnly <=> AppOnly,
    ServiceAccount <=> ServiceAccount,
});
wire_enum!(mailbox_kind_in, mailbox_kind_out, MailboxKind, MailboxKind, {
    Admin <=> Admin,
    Bulk <=> Bulk,
    User <=> User,
});
wire_enum!(mail_purpose_in, mail_purpose_out, MailPurpose, MailPurpose, {
    Send <=> Send,
    Pop <=> Pop,
    Imap <=> Imap,
});
wire_enum!(sender_mode_in, sender_mode_out, SenderMode, SenderMode, {
    FixedAdmin <=> FixedAdmin,
    Bulk <=> Bulk,
    LoginUser <=> LoginUser,
    AllowUserChange <=> AllowUserChange,
});
wire_enum!(tls_mode_in, tls_mode_out, TlsMode, TlsMode, {
    Starttls <=> Starttls,
    ImplicitTls <=> ImplicitTls,
    None <=> None,
});
wire_enum!(tls_version_in, tls_version_out, TlsVersion, TlsVersion, {
    TlsVersion12 <=> V1_2,
    TlsVersion13 <=> V1_3,
});
wire_enum!(send_method_in, send_method_out, SendMethod, SendMethod, {
    Smtp <=> Smtp,
    Graph <=> Graph,
    GmailApi <=> GmailApi,
});
wire_enum!(fetch_protocol_in, fetch_protocol_out, FetchProtocol, FetchProtocol, {
    Pop3 <=> Pop3,
    Imap <=> Imap,
});

// ---------------------------------------------------------------------------------------------
// Update masks

/// Fields of `Tenant`.
pub const TENANT_FIELDS: FieldTable = FieldTable {
    resource: "tenant",
    mutable: &["display_name"],
    immutable: &["name"],
    output_only: &["create_time", "update_time", "version"],
};

/// Fields of `Provider`. The kind is immutable: mailboxes' grant types were checked against it.
pub const PROVIDER_FIELDS: FieldTable = FieldTable {
    resource: "provider",
    mutable: &[
        "authority",
        "client_id",
        "client_secret",
        "endpoints",
        "http_proxy",
        "tls",
        "scopes",
        "service_account_key",
    ],
    immutable: &["tenant", "name", "kind"],
    output_only: &[
        "client_secret_set",
        "service_account_key_set",
        "create_time",
        "update_time",
        "version",
    ],
};

/// Fields of `Mailbox`.
pub const MAILBOX_FIELDS: FieldTable = FieldTable {
    resource: "mailbox",
    mutable: &[
        "address",
        "provider",
        "grant_type",
        "kind",
        "purposes",
        "disabled",
        "consent_account",
    ],
    immutable: &["tenant", "name"],
    output_only: &["token", "create_time", "update_time", "version"],
};

/// Fields of `Device`. `ingress.password` may be named alone to set or (empty) clear only the
/// password.
pub const DEVICE_FIELDS: FieldTable = FieldTable {
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

/// Fields of `Agent` (the core's agent resource holds the table).
pub use tokenfleet_core::resources::agents::FIELDS as AGENT_FIELDS;

/// Checks the paths of a request's `update_mask` against `table` (no mask: every field).
pub fn update_mask(table: &FieldTable, mask: Option<&FieldMask>) -> Valid<UpdateMask> {
    UpdateMask::parse(table, mask.map(|m| m.paths.as_slice()).unwrap_or_default())
}

/// What an update does to an input-only secret.
#[derive(Debug, Default)]
pub enum SecretChange {
    /// Keep the stored value.
    #[default]
    Keep,
    /// Remove the stored value.
    Clear,
    /// Replace it.
    Set(Secret),
}

/// An input-only secret changes when the mask names it (empty value = clear), or with an empty
/// mask when a non-empty value is given.
pub fn secret_change(mask: &UpdateMask, path: &str, value: &str) -> SecretChange {
    if mask.names(path) {
        if value.is_empty() {
            SecretChange::Clear
        } else {
            SecretChange::Set(Secret::new(value))
        }
    } else if mask.includes(path) && !value.is_empty() {
        SecretChange::Set(Secret::new(value))
    } else {
        SecretChange::Keep
    }
}

// ---------------------------------------------------------------------------------------------
// Shared validators

fn list_len(field: &str, len: usize, max: usize) -> Valid {
    if len > max {
        return Err(ValidationError::new(
            field,
            format!("at most {max} entries, got {len}"),
        ));
    }
    Ok(())
}

/// A TLS version range; min must not exceed max.
fn tls_range(
    prefix: &str,
    min: i32,
    max: i32,
) -> Valid<(Option<dom::TlsVersion>, Option<dom::TlsVersion>)> {
    let lo = tls_version_in(&format!("{prefix}.tls_min_version"), min)?;
    let hi = tls_version_in(&format!("{prefix}.tls_max_version"), max)?;
    if let (Some(lo), Some(hi)) = (lo, hi)
        && lo == dom::TlsVersion::V1_3
        && hi == dom::TlsVersion::V1_2
    {
        return Err(ValidationError::new(
            format!("{prefix}.tls_max_version"),
            "must not be lower than tls_min_version",
        ));
    }
    Ok((lo, hi))
}

fn seconds(field: &str, value: u32, default: u32, min: u32) -> Valid<u32> {
    match value {
        0 => Ok(default),
        v if v < min || v > MAX_SECONDS => Err(ValidationError::new(
            field,
            format!("must be {min}-{MAX_SECONDS} seconds (0 = default), got {v}"),
        )),
        v => Ok(v),
    }
}

// ---------------------------------------------------------------------------------------------
// Tenant

/// Wire form of a tenant.
pub fn tenant_to_proto(t: &dom::Tenant, version: u64) -> pb::Tenant {
    pb::Tenant {
        name: t.name.clone(),
        display_name: t.display_name.clone(),
        create_time: Some(timestamp(t.stamps.created)),
        update_time: Some(timestamp(t.stamps.updated)),
        version,
    }
}

/// Validated domain tenant from the wire (output-only fields ignored).
pub fn tenant_from_proto(t: &pb::Tenant, stamps: Stamps) -> Valid<dom::Tenant> {
    dom::name("tenant.name", &t.name)?;
    dom::text("tenant.display_name", &t.display_name, MAX_TEXT_LEN)?;
    Ok(dom::Tenant {
        name: t.name.clone(),
        display_name: t.display_name.clone(),
        stamps,
    })
}

/// Copies the fields `mask` selects from `src` onto `dst`.
pub fn merge_tenant(dst: &mut pb::Tenant, src: &pb::Tenant, mask: &UpdateMask) {
    if mask.includes("display_name") {
        dst.display_name.clone_from(&src.display_name);
    }
}

// ---------------------------------------------------------------------------------------------
// Provider

/// Secrets given with a provider (non-empty inputs only).
#[derive(Debug, Default)]
pub struct ProviderSecrets {
    /// `client_secret`.
    pub client_secret: Option<Secret>,
    /// `service_account_key`.
    pub service_account_key: Option<Secret>,
    /// The password inside `http_proxy` (`http://user:password@host`), taken out of the URL.
    pub http_proxy_password: Option<Secret>,
}

/// Wire form of a provider; secrets appear only as `*_set` flags.
pub fn provider_to_proto(p: &dom::Provider, version: u64) -> pb::Provider {
    pb::Provider {
        tenant: p.tenant.clone(),
        name: p.name.clone(),
        kind: provider_kind_out(p.kind),
        authority: p.authority.clone(),
        client_id: p.client_id.clone(),
        client_secret: String::new(),
        client_secret_set: p.client_secret.is_some(),
        endpoints: Some(pb::ProviderEndpoints {
            authorize_url: p.endpoints.authorize_url.clone(),
            token_url: p.endpoints.token_url.clone(),
            device_code_url: p.endpoints.device_code_url.clone(),
            revoke_url: p.endpoints.revoke_url.clone(),
        }),
        // Never the password: `http://user:[redacted]@proxy:3128` says one is stored.
        http_proxy: match &p.http_proxy_password {
            Some(_) if !p.http_proxy.is_empty() => {
                dom::with_url_password(&dom::split_url_password(&p.http_proxy).0, dom::REDACTED)
            }
            _ => dom::redact_url_password(&p.http_proxy),
        },
        tls: Some(pb::ProviderTls {
            extra_ca_pem: p.extra_ca_pem.clone(),
        }),
        scopes: p.scopes.clone(),
        service_account_key: String::new(),
        service_account_key_set: p.service_account_key.is_some(),
        create_time: Some(timestamp(p.stamps.created)),
        update_time: Some(timestamp(p.stamps.updated)),
        version,
    }
}

/// An Entra authority segment: `organizations`, `common`, `consumers`, a tenant id or a domain.
fn authority(field: &str, value: &str) -> Valid {
    if value.len() > 253
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        let shown: String = value
            .chars()
            .take(80)
            .flat_map(char::escape_debug)
            .collect();
        return Err(ValidationError::new(
            field,
            format!(
                "`{shown}` is not an Entra tenant segment (organizations, common, consumers, a tenant id or a domain)"
            ),
        ));
    }
    Ok(())
}

/// An OAuth scope token (RFC 6749 §3.3: printable ASCII without space, `"` or `\`).
fn scope(field: &str, value: &str) -> Valid {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > 512 {
        return Err(ValidationError::new(
            field,
            "must be at most 512 characters",
        ));
    }
    if !value
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
    {
        return Err(ValidationError::new(
            field,
            "may contain only printable ASCII without spaces, quotes or backslashes (give one scope per entry)",
        ));
    }
    Ok(())
}

/// A Google service-account key: the JSON key file's contents. The value is never echoed.
fn service_account_key(field: &str, value: &str) -> Valid {
    dom::secret_len(field, value)?;
    let parsed: serde_json::Value = serde_json::from_str(value)
        .map_err(|_| ValidationError::new(field, "is not JSON (give the key file's contents)"))?;
    let text = |name: &str| {
        parsed
            .get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    };
    if text("client_email").is_empty() || text("private_key").is_empty() {
        return Err(ValidationError::new(
            field,
            "is not a service-account key file (needs `client_email` and `private_key`)",
        ));
    }
    Ok(())
}

/// Validated domain provider from the wire. Secrets come back separately, unsealed; the record's
/// sealed fields are `None`.
pub fn provider_from_proto(
    p: &pb::Provider,
    stamps: Stamps,
) -> Valid<(dom::Provider, ProviderSecrets)> {
    dom::name("provider.tenant", &p.tenant)?;
    dom::name("provider.name", &p.name)?;
    let kind = required("provider.kind", provider_kind_in("provider.kind", p.kind)?)?;
    let authority_value = match kind {
        dom::ProviderKind::Microsoft if p.authority.is_empty() => "organizations".to_owned(),
        dom::ProviderKind::Microsoft => {
            authority("provider.authority", &p.authority)?;
            p.authority.clone()
        }
        // Other kinds do not use an authority segment.
        _ => String::new(),
    };
    dom::required_text("provider.client_id", &p.client_id, MAX_TEXT_LEN)?;
    if p.client_id.chars().any(char::is_whitespace) {
        return Err(ValidationError::new(
            "provider.client_id",
            "must not contain spaces",
        ));
    }
    dom::secret_len("provider.client_secret", &p.client_secret)?;
    let e = p.endpoints.clone().unwrap_or_default();
    let generic = kind == dom::ProviderKind::Generic;
    dom::url(
        "provider.endpoints.authorize_url",
        &e.authorize_url,
        generic,
    )?;
    dom::url("provider.endpoints.token_url", &e.token_url, generic)?;
    dom::url(
        "provider.endpoints.device_code_url",
        &e.device_code_url,
        false,
    )?;
    dom::url("provider.endpoints.revoke_url", &e.revoke_url, false)?;
    dom::url("provider.http_proxy", &p.http_proxy, false)?;
    let extra_ca_pem = p
        .tls
        .as_ref()
        .map(|t| t.extra_ca_pem.clone())
        .unwrap_or_default();
    dom::pem("provider.tls.extra_ca_pem", &extra_ca_pem)?;
    list_len("provider.scopes", p.scopes.len(), MAX_SCOPES)?;
    for (i, s) in p.scopes.iter().enumerate() {
        scope(&format!("provider.scopes[{i}]"), s)?;
    }
    if !p.service_account_key.is_empty() {
        if kind != dom::ProviderKind::Google {
            return Err(ValidationError::new(
                "provider.service_account_key",
                format!("only google providers use a service-account key, this one is {kind}"),
            ));
        }
        service_account_key("provider.service_account_key", &p.service_account_key)?;
    }
    let nonempty = |s: &str| (!s.is_empty()).then(|| Secret::new(s));
    // A proxy password is kept apart from the URL and sealed like the other secrets.
    let (proxy_url, proxy_password) = dom::split_url_password(&p.http_proxy);
    Ok((
        dom::Provider {
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            kind,
            authority: authority_value,
            client_id: p.client_id.clone(),
            client_secret: None,
            endpoints: dom::ProviderEndpoints {
                authorize_url: e.authorize_url,
                token_url: e.token_url,
                device_code_url: e.device_code_url,
                revoke_url: e.revoke_url,
            },
            http_proxy: proxy_url,
            http_proxy_password: None,
            extra_ca_pem,
            scopes: p.scopes.clone(),
            service_account_key: None,
            stamps,
        },
        ProviderSecrets {
            client_secret: nonempty(&p.client_secret),
            service_account_key: nonempty(&p.service_account_key),
            http_proxy_password: proxy_password.as_deref().and_then(nonempty),
        },
    ))
}

/// Copies the fields `mask` selects from `src` onto `dst`.
pub fn merge_provider(dst: &mut pb::Provider, src: &pb::Provider, mask: &UpdateMask) {
    for path in PROVIDER_FIELDS.mutable.iter().filter(|p| mask.includes(p)) {
        match *path {
            "authority" => dst.authority.clone_from(&src.authority),
            "client_id" => dst.client_id.clone_from(&src.client_id),
            "client_secret" => dst.client_secret.clone_from(&src.client_secret),
            "endpoints" => dst.endpoints.clone_from(&src.endpoints),
            "http_proxy" => dst.http_proxy.clone_from(&src.http_proxy),
            "tls" => dst.tls.clone_from(&src.tls),
            "scopes" => dst.scopes.clone_from(&src.scopes),
            "service_account_key" => dst.service_account_key.clone_from(&src.service_account_key),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mailbox

/// Wire form of a mailbox. A disabled mailbox shows status DISABLED whatever its grant's state.
pub fn mailbox_to_proto(m: &dom::Mailbox, version: u64) -> pb::Mailbox {
    let status = if m.disabled {
        dom::TokenStatus::Disabled
    } else {
        m.token.status
    };
    pb::Mailbox {
        tenant: m.tenant.clone(),
        name: m.name.clone(),
        address: m.address.clone(),
        provider: m.provider.clone(),
        grant_type: grant_type_out(m.grant_type),
        kind: mailbox_kind_out(m.kind),
        purposes: m.purposes.iter().map(|p| mail_purpose_out(*p)).collect(),
        disabled: m.disabled,
        token: Some(pb::TokenState {
            status: token_status_out(status),
            last_refresh_time: opt_timestamp(m.token.last_refresh),
            access_token_expire_time: opt_timestamp(m.token.access_token_expires),
            last_error: m.token.last_error.as_ref().map(|e| pb::TokenError {
                code: e.code.clone(),
                reason: e.reason.clone(),
                fix: e.fix.clone(),
                time: Some(timestamp(e.time)),
            }),
            ..Default::default()
        }),
        create_time: Some(timestamp(m.stamps.created)),
        update_time: Some(timestamp(m.stamps.updated)),
        version,
        consent_account: m.consent_account.clone(),
    }
}

/// Validated domain mailbox from the wire; the token state starts as NOT_RETRIEVED.
pub fn mailbox_from_proto(m: &pb::Mailbox, stamps: Stamps) -> Valid<dom::Mailbox> {
    dom::name("mailbox.tenant", &m.tenant)?;
    dom::name("mailbox.name", &m.name)?;
    dom::email("mailbox.address", &m.address)?;
    dom::name("mailbox.provider", &m.provider)?;
    let grant_type = required(
        "mailbox.grant_type",
        grant_type_in("mailbox.grant_type", m.grant_type)?,
    )?;
    let kind = required("mailbox.kind", mailbox_kind_in("mailbox.kind", m.kind)?)?;
    if m.purposes.is_empty() {
        return Err(ValidationError::new(
            "mailbox.purposes",
            "must name at least one purpose",
        ));
    }
    let mut purposes = Vec::new();
    for (i, raw) in m.purposes.iter().enumerate() {
        let field = format!("mailbox.purposes[{i}]");
        let purpose = required(&field, mail_purpose_in(&field, *raw)?)?;
        if !purposes.contains(&purpose) {
            purposes.push(purpose);
        }
    }
    Ok(dom::Mailbox {
        tenant: m.tenant.clone(),
        name: m.name.clone(),
        address: m.address.clone(),
        provider: m.provider.clone(),
        grant_type,
        kind,
        purposes,
        disabled: m.disabled,
        token: dom::TokenState::default(),
        stamps,
        consent_account: consent_account(&m.consent_account, grant_type)?,
    })
}

/// `mailbox.consent_account`: empty, or an e-mail address (compared case-insensitively), and
/// only for grant types where a person signs in.
fn consent_account(raw: &str, grant_type: dom::GrantType) -> Valid<String> {
    let account = raw.trim();
    if account.is_empty() {
        return Ok(String::new());
    }
    dom::email("mailbox.consent_account", account)?;
    if !matches!(
        grant_type,
        dom::GrantType::DelegatedDeviceCode | dom::GrantType::DelegatedAuthCode
    ) {
        return Err(ValidationError::new(
            "mailbox.consent_account",
            "only delegated mailboxes (delegated_device_code, delegated_auth_code) have a person signing in; leave it empty for app_only and service_account",
        ));
    }
    Ok(account.to_owned())
}

/// Whether a provider of `kind` can obtain tokens with `grant`. The error names
/// `mailbox.grant_type` and says what to use instead.
pub fn check_grant_fits(kind: dom::ProviderKind, grant: dom::GrantType) -> Valid {
    use dom::{GrantType as G, ProviderKind as K};
    let problem = match (grant, kind) {
        (G::DelegatedDeviceCode, K::Google) => {
            "Google does not allow the device authorization flow for Gmail scopes; use delegated_auth_code (browser consent) or service_account (Workspace domain-wide delegation)"
        }
        (G::AppOnly, K::Google | K::Generic) => {
            "app_only (client credentials for SMTP.SendAsApp / POP.AccessAsApp) exists only for microsoft providers; for google use service_account"
        }
        (G::ServiceAccount, K::Microsoft | K::Generic) => {
            "service_account (JWT bearer with domain-wide delegation) exists only for google providers; for microsoft use app_only"
        }
        _ => return Ok(()),
    };
    Err(ValidationError::new(
        "mailbox.grant_type",
        format!("{problem} (provider kind is {kind}, grant type {grant})"),
    ))
}

/// Copies the fields `mask` selects from `src` onto `dst`.
pub fn merge_mailbox(dst: &mut pb::Mailbox, src: &pb::Mailbox, mask: &UpdateMask) {
    for path in MAILBOX_FIELDS.mutable.iter().filter(|p| mask.includes(p)) {
        match *path {
            "address" => dst.address.clone_from(&src.address),
            "provider" => dst.provider.clone_from(&src.provider),
            "grant_type" => dst.grant_type = src.grant_type,
            "kind" => dst.kind = src.kind,
            "purposes" => dst.purposes.clone_from(&src.purposes),
            "disabled" => dst.disabled = src.disabled,
            "consent_account" => dst.consent_account.clone_from(&src.consent_account),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Device

/// The wire send profile (`None` for an unset SMTP profile).
pub fn smtp_to_proto(s: &dom::SmtpProfile) -> Option<pb::SmtpProfile> {
    if s.server.is_empty() && s.method == dom::SendMethod::Smtp {
        return None;
    }
    Some(pb::SmtpProfile {
        server: s.server.clone(),
        port: u32::from(s.port),
        security: tls_mode_out(s.security),
        timeout_seconds: s.timeout_seconds,
        sender_name: s.sender_name.clone(),
        sender_address: s.sender_address.clone(),
        skip_certificate_verification: !s.verify_certificate,
        extra_ca_pem: s.extra_ca_pem.clone(),
        tls_min_version: s.tls_min_version.map(tls_version_out).unwrap_or_default(),
        tls_max_version: s.tls_max_version.map(tls_version_out).unwrap_or_default(),
        method: send_method_out(s.method),
        api_base_url: s.api_base_url.clone(),
        insecure_allow_cleartext_tokens: s.insecure_allow_cleartext_tokens,
    })
}

fn smtp_from_proto(s: Option<&pb::SmtpProfile>) -> Valid<dom::SmtpProfile> {
    let Some(s) = s.filter(|s| **s != pb::SmtpProfile::default()) else {
        return Ok(dom::SmtpProfile::default());
    };
    let method = send_method_in("device.smtp.method", s.method)?.unwrap_or(dom::SendMethod::Smtp);
    // A mail API needs no SMTP server; its TLS settings (CA, versions, verification) still apply.
    let api = method != dom::SendMethod::Smtp;
    if !(api && s.server.is_empty()) {
        dom::host("device.smtp.server", &s.server)?;
    }
    let security = match tls_mode_in("device.smtp.security", s.security)? {
        Some(mode) => mode,
        None if api => dom::TlsMode::ImplicitTls,
        None => required("device.smtp.security", None)?,
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
        verify_certificate: !s.skip_certificate_verification,
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

/// The wire fetch profile (`None` when the device fetches nothing).
pub fn fetch_to_proto(f: &dom::FetchProfile) -> Option<pb::FetchProfile> {
    if f.server.is_empty() {
        return None;
    }
    Some(pb::FetchProfile {
        protocol: fetch_protocol_out(f.protocol),
        server: f.server.clone(),
        port: u32::from(f.port),
        security: tls_mode_out(f.security),
        interval_seconds: f.interval_seconds,
        skip_certificate_verification: !f.verify_certificate,
        extra_ca_pem: f.extra_ca_pem.clone(),
        tls_min_version: f.tls_min_version.map(tls_version_out).unwrap_or_default(),
        tls_max_version: f.tls_max_version.map(tls_version_out).unwrap_or_default(),
        folder: f.folder.clone(),
        insecure_allow_cleartext_tokens: f.insecure_allow_cleartext_tokens,
    })
}

fn fetch_from_proto(f: Option<&pb::FetchProfile>) -> Valid<dom::FetchProfile> {
    let Some(f) = f.filter(|f| **f != pb::FetchProfile::default()) else {
        return Ok(dom::FetchProfile::default());
    };
    let protocol = required(
        "device.fetch.protocol",
        fetch_protocol_in("device.fetch.protocol", f.protocol)?,
    )?;
    dom::host("device.fetch.server", &f.server)?;
    let security = required(
        "device.fetch.security",
        tls_mode_in("device.fetch.security", f.security)?,
    )?;
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
        verify_certificate: !f.skip_certificate_verification,
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

fn ingress_to_proto(i: &dom::IngressCredentials) -> Option<pb::IngressCredentials> {
    if *i == dom::IngressCredentials::default() {
        return None;
    }
    Some(pb::IngressCredentials {
        username: i.username.clone(),
        password: String::new(),
        password_set: i.password_hash.is_some(),
        allowed_sources: i.allowed_sources.clone(),
        user_addresses: i.user_addresses.clone(),
    })
}

/// Most user addresses of one device.
const MAX_USER_ADDRESSES: usize = 1000;
/// Shortest prefix of an ingress source range (IPv4, IPv6): anything wider, such as
/// `0.0.0.0/0` or `::/0`, would let the whole internet send as the device (an open relay when
/// the agent listens publicly). The agent refuses the same ranges.
const MIN_SOURCE_PREFIX: (u8, u8) = (8, 16);

/// A source range no wider than [`MIN_SOURCE_PREFIX`] (the text already passed `dom::cidr`).
fn source_width(field: &str, source: &str) -> Valid {
    let Some((addr, prefix)) = source.split_once('/') else {
        return Ok(());
    };
    let (Ok(ip), Ok(prefix)) = (addr.parse::<std::net::IpAddr>(), prefix.parse::<u8>()) else {
        return Ok(());
    };
    let (min, family) = if ip.is_ipv4() {
        (MIN_SOURCE_PREFIX.0, "IPv4")
    } else {
        (MIN_SOURCE_PREFIX.1, "IPv6")
    };
    if prefix < min {
        return Err(ValidationError::new(
            field,
            format!(
                "`{source}` is too wide: it would let any host send as the device (an open relay if the agent is reachable); an {family} range must be /{min} or narrower — list the devices' addresses or their LAN range"
            ),
        ));
    }
    Ok(())
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

fn ingress_from_proto(
    i: Option<&pb::IngressCredentials>,
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
    if i.password.len() > MAX_PASSWORD_LEN {
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
        (!i.password.is_empty()).then(|| Secret::new(i.password.as_str())),
    ))
}

/// Wire form of a device; the ingress password appears only as `password_set`.
pub fn device_to_proto(d: &dom::Device, version: u64) -> pb::Device {
    pb::Device {
        tenant: d.tenant.clone(),
        name: d.name.clone(),
        display_name: d.display_name.clone(),
        agent: d.agent.clone(),
        sender_mode: sender_mode_out(d.sender_mode),
        admin_mailbox: d.admin_mailbox.clone(),
        bulk_mailbox: d.bulk_mailbox.clone(),
        allowed_mailboxes: d.allowed_mailboxes.clone(),
        smtp: smtp_to_proto(&d.smtp),
        fetch: fetch_to_proto(&d.fetch),
        ingress: ingress_to_proto(&d.ingress),
        create_time: Some(timestamp(d.stamps.created)),
        update_time: Some(timestamp(d.stamps.updated)),
        version,
        user_provider: d.user_provider.clone(),
    }
}

/// Validated domain device from the wire, and the ingress password if one was given (the
/// record's `password_hash` is `None`). Mailbox and agent references are checked for form only.
pub fn device_from_proto(d: &pb::Device, stamps: Stamps) -> Valid<(dom::Device, Option<Secret>)> {
    dom::name("device.tenant", &d.tenant)?;
    dom::name("device.name", &d.name)?;
    dom::text("device.display_name", &d.display_name, MAX_TEXT_LEN)?;
    dom::optional_name("device.agent", &d.agent)?;
    let sender_mode = required(
        "device.sender_mode",
        sender_mode_in("device.sender_mode", d.sender_mode)?,
    )?;
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
    let smtp = smtp_from_proto(d.smtp.as_ref())?;
    let fetch = fetch_from_proto(d.fetch.as_ref())?;
    let (ingress, password) = ingress_from_proto(d.ingress.as_ref())?;
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

/// Copies the fields `mask` selects from `src` onto `dst` (the password is handled by
/// [`secret_change`]).
pub fn merge_device(dst: &mut pb::Device, src: &pb::Device, mask: &UpdateMask) {
    for path in DEVICE_FIELDS.mutable.iter().filter(|p| mask.includes(p)) {
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
            "ingress" => {
                let mut ingress = src.ingress.clone().unwrap_or_default();
                // Keep the password field for validation; whether it applies is decided apart.
                ingress.password_set = false;
                dst.ingress = Some(ingress);
            }
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

// ---------------------------------------------------------------------------------------------
// Agent

/// Wire form of an agent.
pub fn agent_to_proto(a: &dom::Agent, version: u64) -> pb::Agent {
    pb::Agent {
        tenant: a.tenant.clone(),
        name: a.name.clone(),
        display_name: a.display_name.clone(),
        revoked: a.revoked,
        certificate_expire_time: opt_timestamp(a.certificate_expires),
        last_seen_time: opt_timestamp(a.last_seen),
        software_version: a.software_version.clone(),
        create_time: Some(timestamp(a.stamps.created)),
        update_time: Some(timestamp(a.stamps.updated)),
        version,
    }
}

/// An agent as a caller sent it, before validation: the fields a caller sets (tenant, name,
/// display name) and the version; the broker's own fields start empty
/// ([`tokenfleet_core::resources::agents`] validates it and keeps the stored ones on updates).
pub fn agent_in(a: &pb::Agent) -> Versioned<dom::Agent> {
    Versioned {
        version: a.version,
        value: dom::Agent {
            tenant: a.tenant.clone(),
            name: a.name.clone(),
            display_name: a.display_name.clone(),
            revoked: false,
            certificate_expires: None,
            last_seen: None,
            software_version: String::new(),
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        },
    }
}

/// Validated domain agent from the wire (output-only fields start empty).
pub fn agent_from_proto(a: &pb::Agent, stamps: Stamps) -> Valid<dom::Agent> {
    tokenfleet_core::resources::agents::from_input(&agent_in(a).value, stamps)
}

// ---------------------------------------------------------------------------------------------
// Audit

/// Wire form of an audit entry.
pub fn audit_event_to_proto(id: &str, e: &dom::AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        id: id.to_owned(),
        time: Some(timestamp(e.time)),
        actor: e.actor.clone(),
        action: e.action.clone(),
        target: e.target.clone(),
        tenant: e.tenant.clone(),
        result: e.result.clone(),
        detail: e.detail.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn stamps() -> Stamps {
        Stamps::new(datetime!(2026-03-01 12:00:00.5 UTC))
    }

    fn provider() -> pb::Provider {
        pb::Provider {
            tenant: "acme".into(),
            name: "m365".into(),
            kind: pb::ProviderKind::Microsoft as i32,
            client_id: "11111111-2222-3333-4444-555555555555".into(),
            client_secret: "s3cret".into(),
            ..Default::default()
        }
    }

    fn device() -> pb::Device {
        pb::Device {
            tenant: "acme".into(),
            name: "mfp-1".into(),
            display_name: "2nd floor".into(),
            agent: "site-a".into(),
            sender_mode: pb::SenderMode::FixedAdmin as i32,
            admin_mailbox: "scan".into(),
            bulk_mailbox: String::new(),
            allowed_mailboxes: vec!["a".into(), "b".into()],
            user_provider: String::new(),
            smtp: Some(pb::SmtpProfile {
                server: "smtp.office365.com".into(),
                port: 587,
                security: pb::TlsMode::Starttls as i32,
                timeout_seconds: 30,
                sender_name: "Scanner".into(),
                sender_address: "scan@acme.example".into(),
                skip_certificate_verification: false,
                extra_ca_pem: String::new(),
                tls_min_version: pb::TlsVersion::TlsVersion12 as i32,
                tls_max_version: pb::TlsVersion::TlsVersion13 as i32,
                method: pb::SendMethod::Smtp as i32,
                api_base_url: String::new(),
                insecure_allow_cleartext_tokens: false,
            }),
            fetch: Some(pb::FetchProfile {
                protocol: pb::FetchProtocol::Imap as i32,
                server: "outlook.office365.com".into(),
                port: 993,
                security: pb::TlsMode::ImplicitTls as i32,
                interval_seconds: 60,
                skip_certificate_verification: true,
                extra_ca_pem: String::new(),
                tls_min_version: 0,
                tls_max_version: 0,
                folder: "Fax".into(),
                // Verification is off (above) for a host that is not loopback.
                insecure_allow_cleartext_tokens: true,
            }),
            ingress: Some(pb::IngressCredentials {
                username: "printer".into(),
                password: String::new(),
                password_set: false,
                allowed_sources: vec!["192.168.1.0/24".into()],
                user_addresses: Vec::new(),
            }),
            create_time: Some(timestamp(stamps().created)),
            update_time: Some(timestamp(stamps().updated)),
            version: 3,
        }
    }

    #[test]
    fn enums_reject_unknown_values_and_map_unspecified_to_none() {
        let err = grant_type_in("mailbox.grant_type", 42).unwrap_err();
        assert_eq!(err.to_string(), "mailbox.grant_type: unknown value 42");
        assert_eq!(grant_type_in("g", 0).unwrap(), None);
        for g in dom::GrantType::ALL {
            assert_eq!(grant_type_in("g", grant_type_out(*g)).unwrap(), Some(*g));
        }
        for v in dom::TlsVersion::ALL {
            assert_eq!(tls_version_in("t", tls_version_out(*v)).unwrap(), Some(*v));
        }
        let err = required(
            "provider.kind",
            provider_kind_in("provider.kind", 0).unwrap(),
        )
        .unwrap_err();
        assert_eq!(err.field, "provider.kind");
    }

    #[test]
    fn provider_validation_names_fields() {
        let (p, secrets) = provider_from_proto(&provider(), stamps()).unwrap();
        assert_eq!(p.authority, "organizations");
        assert!(
            p.client_secret.is_none(),
            "secrets never land in the record unsealed"
        );
        assert_eq!(secrets.client_secret.unwrap().expose(), "s3cret");

        let mut bad = provider();
        bad.client_id.clear();
        assert_eq!(
            provider_from_proto(&bad, stamps()).unwrap_err().to_string(),
            "provider.client_id: must not be empty"
        );
        let mut bad = provider();
        bad.kind = pb::ProviderKind::Generic as i32;
        assert_eq!(
            provider_from_proto(&bad, stamps()).unwrap_err().field,
            "provider.endpoints.authorize_url"
        );
        let mut bad = provider();
        bad.service_account_key = "{}".into();
        assert_eq!(
            provider_from_proto(&bad, stamps()).unwrap_err().field,
            "provider.service_account_key"
        );
        let mut bad = provider();
        bad.kind = pb::ProviderKind::Google as i32;
        bad.service_account_key = "{\"private_key\":\"-----BEGIN PRIVATE KEY-----XYZ\"}".into();
        let err = provider_from_proto(&bad, stamps()).unwrap_err();
        assert!(err.problem.contains("client_email"), "{err}");
        assert!(!err.to_string().contains("XYZ"), "secret echoed: {err}");
        let mut bad = provider();
        bad.scopes = vec!["a b".into()];
        assert_eq!(
            provider_from_proto(&bad, stamps()).unwrap_err().field,
            "provider.scopes[0]"
        );
        let mut bad = provider();
        bad.authority = "x/y".into();
        assert_eq!(
            provider_from_proto(&bad, stamps()).unwrap_err().field,
            "provider.authority"
        );
        let mut bad = provider();
        bad.client_secret = "x".repeat(dom::MAX_SECRET_LEN + 1);
        assert_eq!(
            provider_from_proto(&bad, stamps()).unwrap_err().field,
            "provider.client_secret"
        );
    }

    #[test]
    fn provider_round_trips_without_secrets() {
        let mut input = provider();
        input.endpoints = Some(pb::ProviderEndpoints {
            token_url: "https://login.example/token".into(),
            ..Default::default()
        });
        input.scopes = vec!["offline_access".into()];
        let (p, _) = provider_from_proto(&input, stamps()).unwrap();
        let out = provider_to_proto(&p, 7);
        assert!(out.client_secret.is_empty());
        assert!(!out.client_secret_set);
        assert_eq!(out.version, 7);
        let (again, secrets) = provider_from_proto(&out, stamps()).unwrap();
        assert_eq!(again, p);
        assert!(secrets.client_secret.is_none());
    }

    #[test]
    fn mailbox_validation() {
        let good = pb::Mailbox {
            tenant: "acme".into(),
            name: "scan".into(),
            address: "scan@acme.example".into(),
            provider: "m365".into(),
            grant_type: pb::GrantType::DelegatedDeviceCode as i32,
            kind: pb::MailboxKind::Admin as i32,
            purposes: vec![1, 2, 1],
            ..Default::default()
        };
        let m = mailbox_from_proto(&good, stamps()).unwrap();
        assert_eq!(
            m.purposes,
            vec![dom::MailPurpose::Send, dom::MailPurpose::Pop]
        );
        assert_eq!(
            mailbox_from_proto(&mailbox_to_proto(&m, 1), stamps()).unwrap(),
            m
        );

        let mut bad = good.clone();
        bad.address = "scan at acme".into();
        assert_eq!(
            mailbox_from_proto(&bad, stamps()).unwrap_err().field,
            "mailbox.address"
        );
        let mut bad = good.clone();
        bad.grant_type = 42;
        assert_eq!(
            mailbox_from_proto(&bad, stamps()).unwrap_err().to_string(),
            "mailbox.grant_type: unknown value 42"
        );
        let mut bad = good.clone();
        bad.purposes = vec![1, 0];
        assert_eq!(
            mailbox_from_proto(&bad, stamps()).unwrap_err().field,
            "mailbox.purposes[1]"
        );
        let mut bad = good;
        bad.purposes.clear();
        assert_eq!(
            mailbox_from_proto(&bad, stamps()).unwrap_err().field,
            "mailbox.purposes"
        );
    }

    #[test]
    fn grant_types_fit_provider_kinds() {
        use dom::{GrantType as G, ProviderKind as K};
        let err = check_grant_fits(K::Google, G::DelegatedDeviceCode).unwrap_err();
        assert_eq!(err.field, "mailbox.grant_type");
        assert!(
            err.problem.contains("Google does not allow the device"),
            "{err}"
        );
        assert!(check_grant_fits(K::Microsoft, G::DelegatedDeviceCode).is_ok());
        assert!(check_grant_fits(K::Generic, G::DelegatedDeviceCode).is_ok());
        assert!(check_grant_fits(K::Microsoft, G::AppOnly).is_ok());
        assert!(check_grant_fits(K::Google, G::AppOnly).is_err());
        assert!(check_grant_fits(K::Google, G::ServiceAccount).is_ok());
        assert!(check_grant_fits(K::Microsoft, G::ServiceAccount).is_err());
        for k in K::ALL {
            assert!(check_grant_fits(*k, G::DelegatedAuthCode).is_ok());
        }
    }

    #[test]
    fn device_round_trips_and_validates() {
        let (d, password) = device_from_proto(&device(), stamps()).unwrap();
        assert!(password.is_none());
        assert!(!d.fetch.verify_certificate);
        let out = device_to_proto(&d, 3);
        assert_eq!(out, device());
        let (again, _) = device_from_proto(&out, stamps()).unwrap();
        assert_eq!(again, d);

        // A device without profiles.
        let mut bare = device();
        bare.smtp = None;
        bare.fetch = None;
        bare.ingress = None;
        let (d, _) = device_from_proto(&bare, stamps()).unwrap();
        let out = device_to_proto(&d, 3);
        assert!(out.smtp.is_none() && out.fetch.is_none() && out.ingress.is_none());

        type Case = (fn(&mut pb::Device), &'static str);
        let cases: Vec<Case> = vec![
            (|d| d.admin_mailbox.clear(), "device.admin_mailbox"),
            (|d| d.sender_mode = 9, "device.sender_mode"),
            (|d| d.display_name = "x".repeat(201), "device.display_name"),
            (
                |d| d.allowed_mailboxes[1] = "Bad Name".into(),
                "device.allowed_mailboxes[1]",
            ),
            (
                |d| d.smtp.as_mut().unwrap().port = 70000,
                "device.smtp.port",
            ),
            (
                |d| d.smtp.as_mut().unwrap().security = 0,
                "device.smtp.security",
            ),
            (
                |d| d.smtp.as_mut().unwrap().server.clear(),
                "device.smtp.server",
            ),
            (
                |d| {
                    let smtp = d.smtp.as_mut().unwrap();
                    smtp.tls_min_version = pb::TlsVersion::TlsVersion13 as i32;
                    smtp.tls_max_version = pb::TlsVersion::TlsVersion12 as i32;
                },
                "device.smtp.tls_max_version",
            ),
            (
                |d| d.fetch.as_mut().unwrap().interval_seconds = 5,
                "device.fetch.interval_seconds",
            ),
            (
                |d| d.fetch.as_mut().unwrap().protocol = 0,
                "device.fetch.protocol",
            ),
            (
                |d| {
                    d.ingress
                        .as_mut()
                        .unwrap()
                        .allowed_sources
                        .push("printer".into())
                },
                "device.ingress.allowed_sources[1]",
            ),
            (
                |d| {
                    d.ingress
                        .as_mut()
                        .unwrap()
                        .allowed_sources
                        .push("0.0.0.0/0".into())
                },
                "device.ingress.allowed_sources[1]",
            ),
            (
                |d| {
                    d.ingress
                        .as_mut()
                        .unwrap()
                        .allowed_sources
                        .push("::/0".into())
                },
                "device.ingress.allowed_sources[1]",
            ),
            (
                |d| {
                    d.ingress
                        .as_mut()
                        .unwrap()
                        .user_addresses
                        .push("not-an-address".into())
                },
                "device.ingress.user_addresses[0]",
            ),
        ];
        for (mutate, field) in cases {
            let mut bad = device();
            mutate(&mut bad);
            assert_eq!(device_from_proto(&bad, stamps()).unwrap_err().field, field);
        }
        let mut bulk = device();
        bulk.sender_mode = pb::SenderMode::Bulk as i32;
        assert_eq!(
            device_from_proto(&bulk, stamps()).unwrap_err().field,
            "device.bulk_mailbox"
        );
    }

    #[test]
    fn default_ports_follow_security() {
        let mut d = device();
        let smtp = d.smtp.as_mut().unwrap();
        smtp.port = 0;
        smtp.security = pb::TlsMode::ImplicitTls as i32;
        let fetch = d.fetch.as_mut().unwrap();
        fetch.port = 0;
        fetch.protocol = pb::FetchProtocol::Pop3 as i32;
        fetch.folder.clear();
        let (d, _) = device_from_proto(&d, stamps()).unwrap();
        assert_eq!(d.smtp.port, 465);
        assert_eq!(d.fetch.port, 995);
        assert_eq!(d.fetch.folder, "INBOX");
    }

    #[test]
    fn mail_api_profiles_need_no_smtp_server() {
        let mut d = device();
        d.smtp = Some(pb::SmtpProfile {
            method: pb::SendMethod::Graph as i32,
            api_base_url: "http://127.0.0.1:9/v1.0".into(),
            ..Default::default()
        });
        let (dom_device, _) = device_from_proto(&d, stamps()).unwrap();
        assert_eq!(dom_device.smtp.method, dom::SendMethod::Graph);
        let back = device_to_proto(&dom_device, 1).smtp.unwrap();
        assert_eq!(back.method, pb::SendMethod::Graph as i32);
        assert_eq!(back.api_base_url, "http://127.0.0.1:9/v1.0");
        // SMTP still needs its server, and a bad API URL is named.
        d.smtp = Some(pb::SmtpProfile {
            method: pb::SendMethod::Smtp as i32,
            security: pb::TlsMode::Starttls as i32,
            ..Default::default()
        });
        let err = device_from_proto(&d, stamps()).unwrap_err().to_string();
        assert!(err.starts_with("device.smtp.server"), "{err}");
        d.smtp = Some(pb::SmtpProfile {
            method: pb::SendMethod::GmailApi as i32,
            api_base_url: "ftp://x".into(),
            ..Default::default()
        });
        let err = device_from_proto(&d, stamps()).unwrap_err().to_string();
        assert!(err.starts_with("device.smtp.api_base_url"), "{err}");
    }

    #[test]
    fn cleartext_tokens_are_refused_except_to_loopback_or_when_allowed() {
        let with_smtp = |change: &dyn Fn(&mut pb::SmtpProfile)| {
            let mut d = device();
            change(d.smtp.as_mut().unwrap());
            device_from_proto(&d, stamps())
        };
        let with_fetch = |change: &dyn Fn(&mut pb::FetchProfile)| {
            let mut d = device();
            change(d.fetch.as_mut().unwrap());
            device_from_proto(&d, stamps())
        };
        // No TLS to a LAN host: refused, naming the field and the way out.
        let e = with_smtp(&|s| s.security = pb::TlsMode::None as i32).unwrap_err();
        assert_eq!(e.field, "device.smtp.security", "{e}");
        assert!(e.problem.contains("in clear text"), "{e}");
        assert!(
            e.problem
                .contains("device.smtp.insecure_allow_cleartext_tokens"),
            "{e}"
        );
        let e = with_fetch(&|f| {
            f.insecure_allow_cleartext_tokens = false;
            f.skip_certificate_verification = false;
            f.security = pb::TlsMode::None as i32;
        })
        .unwrap_err();
        assert_eq!(e.field, "device.fetch.security", "{e}");
        // Certificate verification off to a LAN host: refused.
        let e = with_smtp(&|s| s.skip_certificate_verification = true).unwrap_err();
        assert_eq!(e.field, "device.smtp.skip_certificate_verification", "{e}");
        // A Bearer token over http:// to any host but loopback: refused.
        let e = with_smtp(&|s| {
            s.method = pb::SendMethod::Graph as i32;
            s.api_base_url = "http://graph.lan/v1.0".into();
        })
        .unwrap_err();
        assert_eq!(e.field, "device.smtp.api_base_url", "{e}");
        // Loopback stays allowed, without the flag.
        for host in ["127.0.0.1", "localhost", "::1"] {
            let (d, _) = with_smtp(&|s| {
                s.server = host.into();
                s.security = pb::TlsMode::None as i32;
                s.skip_certificate_verification = true;
            })
            .unwrap();
            // (The fixture's fetch profile is the insecure one.)
            let warnings = cleartext_token_warnings(&d);
            assert!(
                warnings.iter().all(|w| !w.contains("device.smtp")),
                "{warnings:?}"
            );
        }
        with_smtp(&|s| {
            s.method = pb::SendMethod::Graph as i32;
            s.api_base_url = "http://127.0.0.1:8080/v1.0".into();
        })
        .unwrap();
        // The explicit, loudly named setting allows it, and says so for the audit and output.
        let (d, _) = with_smtp(&|s| {
            s.security = pb::TlsMode::None as i32;
            s.insecure_allow_cleartext_tokens = true;
        })
        .unwrap();
        assert!(d.smtp.insecure_allow_cleartext_tokens);
        let warnings = cleartext_token_warnings(&d);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("INSECURE: device.smtp.security"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].starts_with("INSECURE: device.fetch.skip_certificate_verification"),
            "{warnings:?}"
        );
        assert!(
            device_to_proto(&d, 1)
                .smtp
                .unwrap()
                .insecure_allow_cleartext_tokens
        );
    }

    #[test]
    fn update_masks() {
        assert_eq!(
            update_mask(&PROVIDER_FIELDS, None).unwrap(),
            UpdateMask::All
        );
        let mask = |paths: &[&str]| FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        };
        let m = update_mask(&PROVIDER_FIELDS, Some(&mask(&["clientId", "scopes"]))).unwrap();
        assert!(m.names("client_id") && m.includes("scopes") && !m.includes("authority"));
        for (path, needle) in [
            ("name", "immutable"),
            ("kind", "immutable"),
            ("client_secret_set", "output only"),
            ("bogus", "unknown provider field"),
            ("endpoints.token_url", "name the whole field `endpoints`"),
        ] {
            let err = update_mask(&PROVIDER_FIELDS, Some(&mask(&[path]))).unwrap_err();
            assert_eq!(err.field, "update_mask");
            assert!(err.problem.contains(needle), "{path}: {err}");
        }
        let m = update_mask(&DEVICE_FIELDS, Some(&mask(&["ingress.password"]))).unwrap();
        assert!(m.names("ingress.password") && !m.includes("ingress"));
    }

    #[test]
    fn secret_changes_follow_the_mask() {
        let all = UpdateMask::All;
        assert!(matches!(
            secret_change(&all, "client_secret", ""),
            SecretChange::Keep
        ));
        assert!(matches!(
            secret_change(&all, "client_secret", "x"),
            SecretChange::Set(_)
        ));
        let named = UpdateMask::Paths(["client_secret"].into_iter().collect());
        assert!(matches!(
            secret_change(&named, "client_secret", ""),
            SecretChange::Clear
        ));
        let other = UpdateMask::Paths(["client_id"].into_iter().collect());
        assert!(matches!(
            secret_change(&other, "client_secret", "x"),
            SecretChange::Keep
        ));
    }

    #[test]
    fn merge_copies_only_masked_fields() {
        let (stored, _) = provider_from_proto(&provider(), stamps()).unwrap();
        let mut base = provider_to_proto(&stored, 1);
        let mut input = provider();
        input.client_id = "new-id".into();
        input.http_proxy = "http://proxy.example:3128".into();
        let mask = UpdateMask::Paths(["client_id"].into_iter().collect());
        merge_provider(&mut base, &input, &mask);
        assert_eq!(base.client_id, "new-id");
        assert!(base.http_proxy.is_empty());
        assert!(base.client_secret.is_empty());
    }
}
