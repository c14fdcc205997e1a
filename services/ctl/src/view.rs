//! The stable JSON shape of every object `tokenfleetctl -o json` prints, built from the wire
//! messages.
//!
//! Rules (documented in the README for scripts): field names are the proto field names; enums are
//! the lower-case value names (`delegated_device_code`, `starttls`, `1.2`; `unspecified` when
//! unset); timestamps are RFC 3339 strings in UTC or `null` when unset; nested messages are
//! objects, or `null` when the broker sent none; secrets never appear, only `*_set` flags.

use prost_types::Timestamp;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokenfleet_proto::v1 as pb;

use crate::enums::{
    fetch_protocol_name, grant_type_name, mail_purpose_name, mailbox_kind_name, provider_kind_name,
    send_method_name, sender_mode_name, tls_mode_name, tls_version_name, token_status_name,
};

/// A wire timestamp as a date-time, if it is set and in range.
pub fn datetime(ts: Option<&Timestamp>) -> Option<OffsetDateTime> {
    let ts = ts?;
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// A wire timestamp as RFC 3339, `None` when unset.
pub fn rfc3339(ts: Option<&Timestamp>) -> Option<String> {
    datetime(ts).and_then(|t| t.format(&Rfc3339).ok())
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantView {
    pub name: String,
    pub display_name: String,
    pub create_time: Option<String>,
    pub update_time: Option<String>,
    pub version: u64,
}

impl From<&pb::Tenant> for TenantView {
    fn from(t: &pb::Tenant) -> Self {
        Self {
            name: t.name.clone(),
            display_name: t.display_name.clone(),
            create_time: rfc3339(t.create_time.as_ref()),
            update_time: rfc3339(t.update_time.as_ref()),
            version: t.version,
        }
    }
}

/// Endpoint overrides of a provider.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointsView {
    pub authorize_url: String,
    pub token_url: String,
    pub device_code_url: String,
    pub revoke_url: String,
}

/// TLS settings of a provider.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderTlsView {
    pub extra_ca_pem: String,
}

/// A provider (app registration). Secrets appear only as `*_set` flags.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderView {
    pub tenant: String,
    pub name: String,
    pub kind: String,
    pub authority: String,
    pub client_id: String,
    pub client_secret_set: bool,
    pub service_account_key_set: bool,
    pub endpoints: Option<EndpointsView>,
    pub http_proxy: String,
    pub tls: Option<ProviderTlsView>,
    pub scopes: Vec<String>,
    pub create_time: Option<String>,
    pub update_time: Option<String>,
    pub version: u64,
}

impl From<&pb::Provider> for ProviderView {
    fn from(p: &pb::Provider) -> Self {
        Self {
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            kind: provider_kind_name(p.kind),
            authority: p.authority.clone(),
            client_id: p.client_id.clone(),
            client_secret_set: p.client_secret_set,
            service_account_key_set: p.service_account_key_set,
            endpoints: p.endpoints.as_ref().map(|e| EndpointsView {
                authorize_url: e.authorize_url.clone(),
                token_url: e.token_url.clone(),
                device_code_url: e.device_code_url.clone(),
                revoke_url: e.revoke_url.clone(),
            }),
            http_proxy: p.http_proxy.clone(),
            tls: p.tls.as_ref().map(|t| ProviderTlsView {
                extra_ca_pem: t.extra_ca_pem.clone(),
            }),
            scopes: p.scopes.clone(),
            create_time: rfc3339(p.create_time.as_ref()),
            update_time: rfc3339(p.update_time.as_ref()),
            version: p.version,
        }
    }
}

/// Why a grant is not usable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenErrorView {
    pub code: String,
    pub reason: String,
    pub fix: String,
    pub time: Option<String>,
}

/// A device-code consent waiting for a person.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceCodeChallengeView {
    pub user_code: String,
    pub verification_uri: String,
    pub expire_time: Option<String>,
    pub message: String,
    pub interval_seconds: u32,
}

/// State of the grant behind a mailbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenStateView {
    pub status: String,
    pub last_refresh_time: Option<String>,
    pub access_token_expire_time: Option<String>,
    pub last_error: Option<TokenErrorView>,
    pub pending_device_code: Option<DeviceCodeChallengeView>,
    pub refresh_token_expire_time: Option<String>,
    pub next_refresh_time: Option<String>,
    pub consecutive_failures: u32,
    pub clock_skew_seconds: i64,
}

/// A mailbox, with its token state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MailboxView {
    pub tenant: String,
    pub name: String,
    pub address: String,
    pub provider: String,
    pub grant_type: String,
    pub kind: String,
    pub purposes: Vec<String>,
    pub disabled: bool,
    pub token: TokenStateView,
    pub create_time: Option<String>,
    pub update_time: Option<String>,
    pub version: u64,
    /// Account expected to sign in at consent; empty = the address.
    pub consent_account: String,
}

impl From<&pb::Mailbox> for MailboxView {
    fn from(m: &pb::Mailbox) -> Self {
        let token = m.token.clone().unwrap_or_default();
        Self {
            tenant: m.tenant.clone(),
            name: m.name.clone(),
            address: m.address.clone(),
            provider: m.provider.clone(),
            grant_type: grant_type_name(m.grant_type),
            kind: mailbox_kind_name(m.kind),
            purposes: m.purposes.iter().map(|p| mail_purpose_name(*p)).collect(),
            disabled: m.disabled,
            token: TokenStateView {
                status: token_status_name(token.status),
                last_refresh_time: rfc3339(token.last_refresh_time.as_ref()),
                access_token_expire_time: rfc3339(token.access_token_expire_time.as_ref()),
                last_error: token.last_error.as_ref().map(|e| TokenErrorView {
                    code: e.code.clone(),
                    reason: e.reason.clone(),
                    fix: e.fix.clone(),
                    time: rfc3339(e.time.as_ref()),
                }),
                pending_device_code: token.pending_device_code.as_ref().map(|c| {
                    DeviceCodeChallengeView {
                        user_code: c.user_code.clone(),
                        verification_uri: c.verification_uri.clone(),
                        expire_time: rfc3339(c.expire_time.as_ref()),
                        message: c.message.clone(),
                        interval_seconds: c.interval_seconds,
                    }
                }),
                refresh_token_expire_time: rfc3339(token.refresh_token_expire_time.as_ref()),
                next_refresh_time: rfc3339(token.next_refresh_time.as_ref()),
                consecutive_failures: token.consecutive_failures,
                clock_skew_seconds: token.clock_skew_seconds,
            },
            create_time: rfc3339(m.create_time.as_ref()),
            update_time: rfc3339(m.update_time.as_ref()),
            version: m.version,
            consent_account: m.consent_account.clone(),
        }
    }
}

/// Upstream SMTP settings of a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmtpView {
    pub server: String,
    pub port: u32,
    pub security: String,
    pub timeout_seconds: u32,
    pub sender_name: String,
    pub sender_address: String,
    pub skip_certificate_verification: bool,
    pub extra_ca_pem: String,
    pub tls_min_version: String,
    pub tls_max_version: String,
    pub method: String,
    pub api_base_url: String,
    /// INSECURE when true: tokens may leave without TLS or unverified.
    pub insecure_allow_cleartext_tokens: bool,
}

/// Upstream fetch settings of a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FetchView {
    pub protocol: String,
    pub server: String,
    pub port: u32,
    pub security: String,
    pub interval_seconds: u32,
    pub skip_certificate_verification: bool,
    pub extra_ca_pem: String,
    pub tls_min_version: String,
    pub tls_max_version: String,
    pub folder: String,
    /// INSECURE when true: tokens may leave without TLS or unverified.
    pub insecure_allow_cleartext_tokens: bool,
}

/// Local ingress credentials of a device (the password only as `password_set`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IngressView {
    pub username: String,
    pub password_set: bool,
    pub allowed_sources: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_addresses: Vec<String>,
}

/// A device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    pub tenant: String,
    pub name: String,
    pub display_name: String,
    pub agent: String,
    pub sender_mode: String,
    pub admin_mailbox: String,
    pub bulk_mailbox: String,
    pub allowed_mailboxes: Vec<String>,
    pub smtp: Option<SmtpView>,
    pub fetch: Option<FetchView>,
    pub ingress: Option<IngressView>,
    pub user_provider: String,
    pub create_time: Option<String>,
    pub update_time: Option<String>,
    pub version: u64,
}

impl From<&pb::Device> for DeviceView {
    fn from(d: &pb::Device) -> Self {
        Self {
            tenant: d.tenant.clone(),
            name: d.name.clone(),
            display_name: d.display_name.clone(),
            agent: d.agent.clone(),
            sender_mode: sender_mode_name(d.sender_mode),
            admin_mailbox: d.admin_mailbox.clone(),
            bulk_mailbox: d.bulk_mailbox.clone(),
            allowed_mailboxes: d.allowed_mailboxes.clone(),
            smtp: d.smtp.as_ref().map(|s| SmtpView {
                server: s.server.clone(),
                port: s.port,
                security: tls_mode_name(s.security),
                timeout_seconds: s.timeout_seconds,
                sender_name: s.sender_name.clone(),
                sender_address: s.sender_address.clone(),
                skip_certificate_verification: s.skip_certificate_verification,
                extra_ca_pem: s.extra_ca_pem.clone(),
                tls_min_version: tls_version_name(s.tls_min_version),
                tls_max_version: tls_version_name(s.tls_max_version),
                method: send_method_name(s.method),
                api_base_url: s.api_base_url.clone(),
                insecure_allow_cleartext_tokens: s.insecure_allow_cleartext_tokens,
            }),
            fetch: d.fetch.as_ref().map(|f| FetchView {
                protocol: fetch_protocol_name(f.protocol),
                server: f.server.clone(),
                port: f.port,
                security: tls_mode_name(f.security),
                interval_seconds: f.interval_seconds,
                skip_certificate_verification: f.skip_certificate_verification,
                extra_ca_pem: f.extra_ca_pem.clone(),
                tls_min_version: tls_version_name(f.tls_min_version),
                tls_max_version: tls_version_name(f.tls_max_version),
                folder: f.folder.clone(),
                insecure_allow_cleartext_tokens: f.insecure_allow_cleartext_tokens,
            }),
            ingress: d.ingress.as_ref().map(|i| IngressView {
                username: i.username.clone(),
                password_set: i.password_set,
                allowed_sources: i.allowed_sources.clone(),
                user_addresses: i.user_addresses.clone(),
            }),
            user_provider: d.user_provider.clone(),
            create_time: rfc3339(d.create_time.as_ref()),
            update_time: rfc3339(d.update_time.as_ref()),
            version: d.version,
        }
    }
}

/// An agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentView {
    pub tenant: String,
    pub name: String,
    pub display_name: String,
    pub revoked: bool,
    pub certificate_expire_time: Option<String>,
    pub last_seen_time: Option<String>,
    pub software_version: String,
    pub create_time: Option<String>,
    pub update_time: Option<String>,
    pub version: u64,
}

impl From<&pb::Agent> for AgentView {
    fn from(a: &pb::Agent) -> Self {
        Self {
            tenant: a.tenant.clone(),
            name: a.name.clone(),
            display_name: a.display_name.clone(),
            revoked: a.revoked,
            certificate_expire_time: rfc3339(a.certificate_expire_time.as_ref()),
            last_seen_time: rfc3339(a.last_seen_time.as_ref()),
            software_version: a.software_version.clone(),
            create_time: rfc3339(a.create_time.as_ref()),
            update_time: rfc3339(a.update_time.as_ref()),
            version: a.version,
        }
    }
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEventView {
    pub id: String,
    pub time: Option<String>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub tenant: String,
    pub result: String,
    pub detail: String,
}

impl From<&pb::AuditEvent> for AuditEventView {
    fn from(e: &pb::AuditEvent) -> Self {
        Self {
            id: e.id.clone(),
            time: rfc3339(e.time.as_ref()),
            actor: e.actor.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            tenant: e.tenant.clone(),
            result: e.result.clone(),
            detail: e.detail.clone(),
        }
    }
}

/// An admin API key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKeyView {
    pub id: String,
    pub role: String,
    pub tenant: String,
    pub description: String,
    pub create_time: Option<String>,
}

impl From<&pb::ApiKey> for ApiKeyView {
    fn from(k: &pb::ApiKey) -> Self {
        Self {
            id: k.id.clone(),
            role: k.role.clone(),
            tenant: k.tenant.clone(),
            description: k.description.clone(),
            create_time: rfc3339(k.create_time.as_ref()),
        }
    }
}

/// A key just created: the key itself (shown this once) and its record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreatedApiKeyView {
    /// The key (`tfk_<id>_<secret>`); the broker keeps only its hash.
    pub key: String,
    #[serde(flatten)]
    pub api_key: ApiKeyView,
}

/// A consent link as listed (never its token).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConsentLinkView {
    pub id: String,
    pub tenant: String,
    pub mailbox: String,
    /// `pending`, `used`, `revoked` or `expired`.
    pub state: String,
    pub created_by: String,
    pub create_time: Option<String>,
    pub expire_time: Option<String>,
    pub use_time: Option<String>,
}

impl From<&pb::ConsentLink> for ConsentLinkView {
    fn from(l: &pb::ConsentLink) -> Self {
        Self {
            id: l.id.clone(),
            tenant: l.tenant.clone(),
            mailbox: l.mailbox.clone(),
            state: l.state.clone(),
            created_by: l.created_by.clone(),
            create_time: rfc3339(l.create_time.as_ref()),
            expire_time: rfc3339(l.expire_time.as_ref()),
            use_time: rfc3339(l.use_time.as_ref()),
        }
    }
}

/// A link just created: its address (shown this once) and its record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreatedConsentLinkView {
    /// The address to send to the mailbox's owner; the broker keeps only its hash.
    pub url: String,
    #[serde(flatten)]
    pub link: ConsentLinkView,
}

/// The caller's identity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WhoAmIView {
    pub key_id: String,
    pub role: String,
    pub tenant: String,
}

impl From<&pb::WhoAmIResponse> for WhoAmIView {
    fn from(w: &pb::WhoAmIResponse) -> Self {
        Self {
            key_id: w.key_id.clone(),
            role: w.role.clone(),
            tenant: w.tenant.clone(),
        }
    }
}

/// Result of a delete.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeletedView {
    /// Always true (a failed delete is an error, not this object).
    pub deleted: bool,
    /// Resource kind: `tenant`, `provider`, `mailbox`, `device` or `agent`.
    pub kind: &'static str,
    /// Tenant of the object; absent for tenants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn mailbox_json_has_enum_names_and_rfc3339_times() {
        let mailbox = pb::Mailbox {
            tenant: "acme".into(),
            name: "scan".into(),
            address: "scan@acme.example".into(),
            provider: "m365".into(),
            grant_type: pb::GrantType::DelegatedDeviceCode as i32,
            kind: pb::MailboxKind::Bulk as i32,
            purposes: vec![pb::MailPurpose::Send as i32, pb::MailPurpose::Pop as i32],
            disabled: false,
            consent_account: String::new(),
            token: Some(pb::TokenState {
                status: pb::TokenStatus::ReauthRequired as i32,
                last_refresh_time: ts(1_700_000_000),
                access_token_expire_time: None,
                last_error: Some(pb::TokenError {
                    code: "invalid_grant".into(),
                    reason: "refresh token expired".into(),
                    fix: "consent again".into(),
                    time: ts(1_700_000_100),
                }),
                consecutive_failures: 2,
                ..Default::default()
            }),
            create_time: ts(0),
            update_time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 500_000_000,
            }),
            version: 3,
        };
        let value = serde_json::to_value(MailboxView::from(&mailbox)).ok();
        assert_eq!(
            value,
            Some(json!({
                "tenant": "acme",
                "name": "scan",
                "address": "scan@acme.example",
                "provider": "m365",
                "grant_type": "delegated_device_code",
                "kind": "bulk",
                "purposes": ["send", "pop"],
                "disabled": false,
                "consent_account": "",
                "token": {
                    "status": "reauth_required",
                    "last_refresh_time": "2023-11-14T22:13:20Z",
                    "access_token_expire_time": null,
                    "last_error": {
                        "code": "invalid_grant",
                        "reason": "refresh token expired",
                        "fix": "consent again",
                        "time": "2023-11-14T22:15:00Z"
                    },
                    "pending_device_code": null,
                    "refresh_token_expire_time": null,
                    "next_refresh_time": null,
                    "consecutive_failures": 2,
                    "clock_skew_seconds": 0
                },
                "create_time": "1970-01-01T00:00:00Z",
                "update_time": "2023-11-14T22:13:20.5Z",
                "version": 3
            }))
        );
    }

    #[test]
    fn provider_json_never_carries_secrets() {
        let provider = pb::Provider {
            tenant: "acme".into(),
            name: "m365".into(),
            kind: pb::ProviderKind::Microsoft as i32,
            authority: "organizations".into(),
            client_id: "client-1".into(),
            // The broker never returns these; if one ever did, the CLI still would not print it.
            client_secret: "s3cret".into(),
            client_secret_set: true,
            service_account_key: "{\"private_key\":\"k\"}".into(),
            scopes: vec!["a".into()],
            ..Default::default()
        };
        let text = serde_json::to_string(&ProviderView::from(&provider)).unwrap_or_default();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!text.contains("private_key"), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(value["kind"], "microsoft");
        assert_eq!(value["client_secret_set"], true);
        assert_eq!(value["service_account_key_set"], false);
        assert_eq!(value["endpoints"], serde_json::Value::Null);
        assert_eq!(value["create_time"], serde_json::Value::Null);
        assert_eq!(value["scopes"], json!(["a"]));
    }

    #[test]
    fn device_json_shape() {
        let device = pb::Device {
            tenant: "acme".into(),
            name: "mfp-1".into(),
            sender_mode: pb::SenderMode::Bulk as i32,
            bulk_mailbox: "scan".into(),
            smtp: Some(pb::SmtpProfile {
                server: "smtp.office365.com".into(),
                port: 587,
                security: pb::TlsMode::Starttls as i32,
                tls_min_version: pb::TlsVersion::TlsVersion12 as i32,
                ..Default::default()
            }),
            ingress: Some(pb::IngressCredentials {
                username: "mfp1".into(),
                password: "pw".into(),
                password_set: true,
                allowed_sources: vec!["192.168.1.20/32".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = serde_json::to_value(DeviceView::from(&device)).unwrap_or_default();
        assert_eq!(value["sender_mode"], "bulk");
        assert_eq!(value["smtp"]["security"], "starttls");
        assert_eq!(value["smtp"]["port"], 587);
        assert_eq!(value["smtp"]["tls_min_version"], "1.2");
        assert_eq!(value["smtp"]["tls_max_version"], "unspecified");
        assert_eq!(value["fetch"], serde_json::Value::Null);
        assert_eq!(
            value["ingress"],
            json!({"username": "mfp1", "password_set": true, "allowed_sources": ["192.168.1.20/32"]})
        );
        assert!(!value.to_string().contains("\"pw\""));
    }

    #[test]
    fn out_of_range_timestamps_are_null() {
        assert_eq!(
            rfc3339(Some(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            })),
            None
        );
        assert_eq!(rfc3339(None), None);
    }
}
