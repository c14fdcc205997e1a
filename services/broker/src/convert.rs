//! Conversion between the wire messages (`tokenfleet_proto::v1`) and the domain values of the
//! core (`tokenfleet_domain` records, the core's resource inputs and views), and the
//! `update_mask` paths of the `Update*` RPCs.
//!
//! Pure functions, no I/O, and no validation beyond reading the wire: what a caller sent becomes
//! the core's input form as is (enum numbers as [`Choice`], secrets in clear), and the core's
//! resources ([`tokenfleet_core::resources`]) validate it after authorizing the caller, naming
//! the field at fault as the API spells it (`device.smtp.port`, `mailbox.purposes[1]`). The
//! `*_from_proto` functions are that conversion followed by the core's validation, for tests.
//!
//! Secrets appear on the way out only as `*_set` flags (`[redacted]` in a proxy URL).

use prost_types::{FieldMask, Timestamp};
use time::OffsetDateTime;
pub use tokenfleet_core::fleet::exposure::{cleartext_token_warnings, is_loopback_host};
use tokenfleet_core::ops::choice::Choice;
pub use tokenfleet_core::ops::mask::{FieldTable, SecretChange, UpdateMask, secret_change};
use tokenfleet_core::records::Versioned;
use tokenfleet_core::resources::devices::{DeviceInput, FetchInput, IngressInput, SmtpInput};
pub use tokenfleet_core::resources::mailboxes::check_grant_fits;
use tokenfleet_core::resources::mailboxes::{MailboxInput, MailboxView};
pub use tokenfleet_core::resources::providers::ProviderSecrets;
use tokenfleet_core::resources::providers::{ProviderInput, ProviderView, shown_proxy};
use tokenfleet_domain::{self as dom, Stamps, Valid, ValidationError};
use tokenfleet_proto::v1 as pb;
use tokenfleet_seal::Secret;

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

/// Generates `<name>_choice(i32) -> Choice<domain>` (the value as sent, for the core to
/// validate), `<name>_in(field, i32) -> Valid<Option<domain>>` (UNSPECIFIED = `None`, unknown
/// numbers rejected) and `<name>_out(domain) -> i32`.
macro_rules! wire_enum {
    ($choice_fn:ident, $in_fn:ident, $out_fn:ident, $pb:ident, $dom:ident, { $($pbv:ident <=> $domv:ident),+ $(,)? }) => {
        #[doc = concat!("Reads a wire `", stringify!($pb), "` as sent.")]
        pub fn $choice_fn(value: i32) -> Choice<dom::$dom> {
            match pb::$pb::try_from(value) {
                Ok(pb::$pb::Unspecified) => Choice::Unset,
                $(Ok(pb::$pb::$pbv) => Choice::Is(dom::$dom::$domv),)+
                Err(_) => Choice::Unknown(value),
            }
        }
        #[doc = concat!("Reads a wire `", stringify!($pb), "`; UNSPECIFIED is `None`.")]
        pub fn $in_fn(field: &str, value: i32) -> Valid<Option<dom::$dom>> {
            $choice_fn(value).optional(field)
        }
        #[doc = concat!("Writes a wire `", stringify!($pb), "`.")]
        pub fn $out_fn(value: dom::$dom) -> i32 {
            match value {
                $(dom::$dom::$domv => pb::$pb::$pbv as i32,)+
            }
        }
    };
}

wire_enum!(token_status_choice, token_status_in, token_status_out, TokenStatus, TokenStatus, {
    NotRetrieved <=> NotRetrieved,
    ConsentPending <=> ConsentPending,
    Active <=> Active,
    RefreshFailing <=> RefreshFailing,
    ReauthRequired <=> ReauthRequired,
    Disabled <=> Disabled,
});
wire_enum!(provider_kind_choice, provider_kind_in, provider_kind_out, ProviderKind, ProviderKind, {
    Microsoft <=> Microsoft,
    Google <=> Google,
    Generic <=> Generic,
});
wire_enum!(grant_type_choice, grant_type_in, grant_type_out, GrantType, GrantType, {
    DelegatedDeviceCode <=> DelegatedDeviceCode,
    DelegatedAuthCode <=> DelegatedAuthCode,
    AppOnly <=> AppOnly,
    ServiceAccount <=> ServiceAccount,
});
wire_enum!(mailbox_kind_choice, mailbox_kind_in, mailbox_kind_out, MailboxKind, MailboxKind, {
    Admin <=> Admin,
    Bulk <=> Bulk,
    User <=> User,
});
wire_enum!(mail_purpose_choice, mail_purpose_in, mail_purpose_out, MailPurpose, MailPurpose, {
    Send <=> Send,
    Pop <=> Pop,
    Imap <=> Imap,
});
wire_enum!(sender_mode_choice, sender_mode_in, sender_mode_out, SenderMode, SenderMode, {
    FixedAdmin <=> FixedAdmin,
    Bulk <=> Bulk,
    LoginUser <=> LoginUser,
    AllowUserChange <=> AllowUserChange,
});
wire_enum!(tls_mode_choice, tls_mode_in, tls_mode_out, TlsMode, TlsMode, {
    Starttls <=> Starttls,
    ImplicitTls <=> ImplicitTls,
    None <=> None,
});
wire_enum!(tls_version_choice, tls_version_in, tls_version_out, TlsVersion, TlsVersion, {
    TlsVersion12 <=> V1_2,
    TlsVersion13 <=> V1_3,
});
wire_enum!(send_method_choice, send_method_in, send_method_out, SendMethod, SendMethod, {
    Smtp <=> Smtp,
    Graph <=> Graph,
    GmailApi <=> GmailApi,
});
wire_enum!(fetch_protocol_choice, fetch_protocol_in, fetch_protocol_out, FetchProtocol, FetchProtocol, {
    Pop3 <=> Pop3,
    Imap <=> Imap,
});

// ---------------------------------------------------------------------------------------------
// Update masks

/// Fields of `Tenant` (the core's tenant resource holds the table).
pub use tokenfleet_core::resources::tenants::FIELDS as TENANT_FIELDS;

/// Fields of `Provider` (the core's provider resource holds the table).
pub use tokenfleet_core::resources::providers::FIELDS as PROVIDER_FIELDS;

/// Fields of `Mailbox` (the core's mailbox resource holds the table).
pub use tokenfleet_core::resources::mailboxes::FIELDS as MAILBOX_FIELDS;

/// Fields of `Device` (the core's device resource holds the table).
pub use tokenfleet_core::resources::devices::FIELDS as DEVICE_FIELDS;

/// Fields of `Agent` (the core's agent resource holds the table).
pub use tokenfleet_core::resources::agents::FIELDS as AGENT_FIELDS;

/// Checks the paths of a request's `update_mask` against `table` (no mask: every field).
pub fn update_mask(table: &FieldTable, mask: Option<&FieldMask>) -> Valid<UpdateMask> {
    UpdateMask::parse(table, mask.map(|m| m.paths.as_slice()).unwrap_or_default())
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

/// A tenant as a caller sent it, before validation (the core's tenant resource validates it):
/// the name, display name and version.
pub fn tenant_in(t: &pb::Tenant) -> Versioned<dom::Tenant> {
    Versioned {
        version: t.version,
        value: dom::Tenant {
            name: t.name.clone(),
            display_name: t.display_name.clone(),
            stamps: Stamps::new(OffsetDateTime::UNIX_EPOCH),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Provider

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
        http_proxy: shown_proxy(p),
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

/// A provider as a caller sent it, before validation (the core's provider resource validates
/// it; the `*_set` flags are output only and not read).
pub fn provider_in(p: &pb::Provider) -> ProviderInput {
    let e = p.endpoints.clone().unwrap_or_default();
    ProviderInput {
        version: p.version,
        tenant: p.tenant.clone(),
        name: p.name.clone(),
        kind: provider_kind_choice(p.kind),
        authority: p.authority.clone(),
        client_id: p.client_id.clone(),
        client_secret: Secret::new(p.client_secret.as_str()),
        endpoints: dom::ProviderEndpoints {
            authorize_url: e.authorize_url,
            token_url: e.token_url,
            device_code_url: e.device_code_url,
            revoke_url: e.revoke_url,
        },
        http_proxy: p.http_proxy.clone(),
        extra_ca_pem: p
            .tls
            .as_ref()
            .map(|t| t.extra_ca_pem.clone())
            .unwrap_or_default(),
        scopes: p.scopes.clone(),
        service_account_key: Secret::new(p.service_account_key.as_str()),
    }
}

/// Validated domain provider from the wire. Secrets come back separately, unsealed; the record's
/// sealed fields are `None`.
pub fn provider_from_proto(
    p: &pb::Provider,
    stamps: Stamps,
) -> Valid<(dom::Provider, ProviderSecrets)> {
    tokenfleet_core::resources::providers::from_input(&provider_in(p), stamps)
}

/// Wire form of a provider as reads show it (no secrets, which `*_set` flags say are stored).
pub fn provider_view_to_proto(view: &ProviderView) -> pb::Provider {
    pb::Provider {
        client_secret_set: view.client_secret_set,
        service_account_key_set: view.service_account_key_set,
        ..provider_to_proto(&view.provider, view.version)
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

/// A mailbox as a caller sent it, before validation (the core's mailbox resource validates it).
pub fn mailbox_in(m: &pb::Mailbox) -> MailboxInput {
    MailboxInput {
        version: m.version,
        tenant: m.tenant.clone(),
        name: m.name.clone(),
        address: m.address.clone(),
        provider: m.provider.clone(),
        grant_type: grant_type_choice(m.grant_type),
        kind: mailbox_kind_choice(m.kind),
        purposes: m.purposes.iter().map(|p| mail_purpose_choice(*p)).collect(),
        disabled: m.disabled,
        consent_account: m.consent_account.clone(),
    }
}

/// Validated domain mailbox from the wire; the token state starts as NOT_RETRIEVED.
pub fn mailbox_from_proto(m: &pb::Mailbox, stamps: Stamps) -> Valid<dom::Mailbox> {
    tokenfleet_core::resources::mailboxes::from_input(&mailbox_in(m), stamps)
}

/// Wire form of a mailbox as reads show it: its token state, and what its grant record adds.
pub fn mailbox_view_to_proto(view: &MailboxView) -> pb::Mailbox {
    let mut out = mailbox_to_proto(&view.mailbox, view.version);
    let (Some(g), Some(token)) = (&view.grant, out.token.as_mut()) else {
        return out;
    };
    token.pending_device_code = g
        .pending_device_code
        .as_ref()
        .map(|p| pb::DeviceCodeChallenge {
            user_code: p.user_code.clone(),
            verification_uri: p.verification_uri.clone(),
            expire_time: Some(timestamp(p.expires)),
            message: p.message.clone(),
            interval_seconds: u32::try_from(p.interval_secs).unwrap_or(u32::MAX),
        });
    token.refresh_token_expire_time = opt_timestamp(g.refresh_token_expires);
    token.next_refresh_time = opt_timestamp(g.next_refresh);
    token.consecutive_failures = g.consecutive_failures;
    token.clock_skew_seconds = g.clock_skew_secs;
    out
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

/// A send profile as a caller sent it (`None` for an absent or empty one).
fn smtp_in(s: Option<&pb::SmtpProfile>) -> Option<SmtpInput> {
    let s = s.filter(|s| **s != pb::SmtpProfile::default())?;
    Some(SmtpInput {
        server: s.server.clone(),
        port: s.port,
        security: tls_mode_choice(s.security),
        timeout_seconds: s.timeout_seconds,
        sender_name: s.sender_name.clone(),
        sender_address: s.sender_address.clone(),
        verify_certificate: !s.skip_certificate_verification,
        extra_ca_pem: s.extra_ca_pem.clone(),
        tls_min_version: tls_version_choice(s.tls_min_version),
        tls_max_version: tls_version_choice(s.tls_max_version),
        method: send_method_choice(s.method),
        api_base_url: s.api_base_url.clone(),
        insecure_allow_cleartext_tokens: s.insecure_allow_cleartext_tokens,
    })
}

/// A fetch profile as a caller sent it (`None` for an absent or empty one).
fn fetch_in(f: Option<&pb::FetchProfile>) -> Option<FetchInput> {
    let f = f.filter(|f| **f != pb::FetchProfile::default())?;
    Some(FetchInput {
        protocol: fetch_protocol_choice(f.protocol),
        server: f.server.clone(),
        port: f.port,
        security: tls_mode_choice(f.security),
        interval_seconds: f.interval_seconds,
        verify_certificate: !f.skip_certificate_verification,
        extra_ca_pem: f.extra_ca_pem.clone(),
        tls_min_version: tls_version_choice(f.tls_min_version),
        tls_max_version: tls_version_choice(f.tls_max_version),
        folder: f.folder.clone(),
        insecure_allow_cleartext_tokens: f.insecure_allow_cleartext_tokens,
    })
}

/// A device as a caller sent it, before validation (the core's device resource validates it;
/// `ingress.password_set` is output only and not read).
pub fn device_in(d: &pb::Device) -> DeviceInput {
    DeviceInput {
        version: d.version,
        tenant: d.tenant.clone(),
        name: d.name.clone(),
        display_name: d.display_name.clone(),
        agent: d.agent.clone(),
        sender_mode: sender_mode_choice(d.sender_mode),
        admin_mailbox: d.admin_mailbox.clone(),
        bulk_mailbox: d.bulk_mailbox.clone(),
        allowed_mailboxes: d.allowed_mailboxes.clone(),
        smtp: smtp_in(d.smtp.as_ref()),
        fetch: fetch_in(d.fetch.as_ref()),
        ingress: d.ingress.as_ref().map(|i| IngressInput {
            username: i.username.clone(),
            password: Secret::new(i.password.as_str()),
            allowed_sources: i.allowed_sources.clone(),
            user_addresses: i.user_addresses.clone(),
        }),
        user_provider: d.user_provider.clone(),
    }
}

/// Validated domain device from the wire, and the ingress password if one was given (the
/// record's `password_hash` is `None`). Mailbox and agent references are checked for form only.
pub fn device_from_proto(d: &pb::Device, stamps: Stamps) -> Valid<(dom::Device, Option<Secret>)> {
    tokenfleet_core::resources::devices::from_input(&device_in(d), stamps)
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
}
