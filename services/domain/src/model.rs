//! Records as they are kept in the store (serialized as JSON; secrets only as [`Sealed`]).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_seal::Sealed;

/// Generates `as_str`, `parse` and `ALL` for a fieldless enum whose wire names are snake_case.
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The value's name as DESIGN.md spells it.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            /// Parses a name (case-insensitive; `-` and `_` are the same character, on both
            /// sides of the comparison, so `fleet-admin`, `fleet_admin` and `FLEET-ADMIN` all
            /// name [`Role::FleetAdmin`]).
            pub fn parse(text: &str) -> Option<Self> {
                let normal = |s: &str| s.trim().to_ascii_lowercase().replace('-', "_");
                let t = normal(text);
                $(if t == normal($text) { return Some($name::$variant); })+
                None
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum!(
    /// Lifecycle of the grant behind a mailbox.
    TokenStatus {
        /// No grant obtained yet.
        NotRetrieved => "not_retrieved",
        /// Consent started; waiting for a person.
        ConsentPending => "consent_pending",
        /// Usable grant, refreshes succeed.
        Active => "active",
        /// Transient refresh failures; the last access token may still be valid.
        RefreshFailing => "refresh_failing",
        /// Grant is dead; a person must consent again.
        ReauthRequired => "reauth_required",
        /// Disabled by an operator.
        Disabled => "disabled",
    }
);

named_enum!(
    /// Kind of app registration.
    ProviderKind {
        Microsoft => "microsoft",
        Google => "google",
        Generic => "generic",
    }
);

named_enum!(
    /// How a mailbox's tokens are obtained.
    GrantType {
        DelegatedDeviceCode => "delegated_device_code",
        DelegatedAuthCode => "delegated_auth_code",
        AppOnly => "app_only",
        ServiceAccount => "service_account",
    }
);

named_enum!(
    /// Role of a mailbox.
    MailboxKind {
        Admin => "admin",
        Bulk => "bulk",
        User => "user",
    }
);

named_enum!(
    /// What a token is used for.
    MailPurpose {
        Send => "send",
        Pop => "pop",
        Imap => "imap",
    }
);

named_enum!(
    /// Which sender a device's mail leaves as.
    SenderMode {
        FixedAdmin => "fixed_admin",
        Bulk => "bulk",
        LoginUser => "login_user",
        AllowUserChange => "allow_user_change",
    }
);

named_enum!(
    /// Transport security of a mail connection.
    TlsMode {
        Starttls => "starttls",
        ImplicitTls => "implicit_tls",
        None => "none",
    }
);

named_enum!(
    /// How a device's mail leaves the agent.
    SendMethod {
        Smtp => "smtp",
        Graph => "graph",
        GmailApi => "gmail_api",
    }
);

named_enum!(
    /// TLS protocol version.
    TlsVersion {
        V1_2 => "1.2",
        V1_3 => "1.3",
    }
);

named_enum!(
    /// Fetch protocol.
    FetchProtocol {
        Pop3 => "pop3",
        Imap => "imap",
    }
);

named_enum!(
    /// Role of an admin API key.
    Role {
        /// Everything, every tenant.
        FleetAdmin => "fleet-admin",
        /// Everything inside one tenant.
        TenantAdmin => "tenant-admin",
        /// Read only (fleet-wide, or one tenant when bound to it).
        Viewer => "viewer",
    }
);

/// Creation and last-change times, kept on every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamps {
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

impl Stamps {
    /// Both stamps at `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self {
            created: now,
            updated: now,
        }
    }
}

/// One MSP customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    pub display_name: String,
    pub stamps: Stamps,
}

/// Endpoint overrides of a provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProviderEndpoints {
    pub authorize_url: String,
    pub token_url: String,
    pub device_code_url: String,
    pub revoke_url: String,
}

/// An app registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provider {
    pub tenant: String,
    pub name: String,
    pub kind: ProviderKind,
    #[serde(default)]
    pub authority: String,
    pub client_id: String,
    /// Sealed with AAD [`Provider::client_secret_aad`].
    #[serde(default)]
    pub client_secret: Option<Sealed>,
    #[serde(default)]
    pub endpoints: ProviderEndpoints,
    /// Proxy URL without its password (a user name may stay in it).
    #[serde(default)]
    pub http_proxy: String,
    /// The proxy's password, sealed with AAD [`Provider::http_proxy_password_aad`].
    #[serde(default)]
    pub http_proxy_password: Option<Sealed>,
    #[serde(default)]
    pub extra_ca_pem: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Sealed with AAD [`Provider::service_account_key_aad`].
    #[serde(default)]
    pub service_account_key: Option<Sealed>,
    pub stamps: Stamps,
}

impl Provider {
    /// Resource path, also the base of its secrets' associated data.
    pub fn path(tenant: &str, name: &str) -> String {
        format!("tenants/{tenant}/providers/{name}")
    }
    /// Associated data binding a client secret to this provider.
    pub fn client_secret_aad(tenant: &str, name: &str) -> String {
        format!("{}#client_secret", Self::path(tenant, name))
    }
    /// Associated data binding a proxy password to this provider.
    pub fn http_proxy_password_aad(tenant: &str, name: &str) -> String {
        format!("{}#http_proxy_password", Self::path(tenant, name))
    }
    /// Associated data binding a service-account key to this provider.
    pub fn service_account_key_aad(tenant: &str, name: &str) -> String {
        format!("{}#service_account_key", Self::path(tenant, name))
    }
}

/// Why a grant is not usable and what fixes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenError {
    pub code: String,
    pub reason: String,
    pub fix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

/// Public state of a mailbox's grant (no secret material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenState {
    pub status: TokenStatus,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_refresh: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub access_token_expires: Option<OffsetDateTime>,
    #[serde(default)]
    pub last_error: Option<TokenError>,
}

impl Default for TokenState {
    fn default() -> Self {
        Self {
            status: TokenStatus::NotRetrieved,
            last_refresh: None,
            access_token_expires: None,
            last_error: None,
        }
    }
}

/// A mailbox the fleet sends from or fetches from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mailbox {
    pub tenant: String,
    pub name: String,
    pub address: String,
    pub provider: String,
    pub grant_type: GrantType,
    pub kind: MailboxKind,
    pub purposes: Vec<MailPurpose>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub token: TokenState,
    pub stamps: Stamps,
    /// Account expected to sign in at a delegated consent when it is not `address` (e.g. one
    /// with Send As rights); empty = `address`.
    #[serde(default)]
    pub consent_account: String,
}

/// Upstream SMTP settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SmtpProfile {
    pub server: String,
    pub port: u16,
    pub security: TlsMode,
    pub timeout_seconds: u32,
    pub sender_name: String,
    pub sender_address: String,
    pub verify_certificate: bool,
    pub extra_ca_pem: String,
    pub tls_min_version: Option<TlsVersion>,
    pub tls_max_version: Option<TlsVersion>,
    pub method: SendMethod,
    /// Mail API base URL override (GRAPH / GMAIL_API); empty = the public endpoint.
    pub api_base_url: String,
    /// INSECURE: tokens may go without TLS or unverified to a non-loopback host.
    pub insecure_allow_cleartext_tokens: bool,
}

impl Default for SmtpProfile {
    fn default() -> Self {
        Self {
            server: String::new(),
            port: 587,
            security: TlsMode::Starttls,
            timeout_seconds: 60,
            sender_name: String::new(),
            sender_address: String::new(),
            verify_certificate: true,
            extra_ca_pem: String::new(),
            tls_min_version: None,
            tls_max_version: None,
            method: SendMethod::Smtp,
            api_base_url: String::new(),
            insecure_allow_cleartext_tokens: false,
        }
    }
}

/// Upstream fetch settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FetchProfile {
    pub protocol: FetchProtocol,
    pub server: String,
    pub port: u16,
    pub security: TlsMode,
    /// 0 = fetching disabled.
    pub interval_seconds: u32,
    pub verify_certificate: bool,
    pub extra_ca_pem: String,
    pub tls_min_version: Option<TlsVersion>,
    pub tls_max_version: Option<TlsVersion>,
    pub folder: String,
    /// INSECURE: tokens may go without TLS or unverified to a non-loopback host.
    pub insecure_allow_cleartext_tokens: bool,
}

impl Default for FetchProfile {
    fn default() -> Self {
        Self {
            protocol: FetchProtocol::Pop3,
            server: String::new(),
            port: 995,
            security: TlsMode::ImplicitTls,
            interval_seconds: 0,
            verify_certificate: true,
            extra_ca_pem: String::new(),
            tls_min_version: None,
            tls_max_version: None,
            folder: "INBOX".to_owned(),
            insecure_allow_cleartext_tokens: false,
        }
    }
}

/// How a legacy device logs in to the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressCredentials {
    pub username: String,
    /// Password hash (PHC string); never the password.
    pub password_hash: Option<String>,
    pub allowed_sources: Vec<String>,
    /// LOGIN_USER / ALLOW_USER_CHANGE: the user addresses (lower case) the device may send as
    /// and get tokens for; `@domain` = every address of the domain. Empty = none.
    pub user_addresses: Vec<String>,
}

impl IngressCredentials {
    /// Whether the device may send as the user `address` (an entry equal to it, or its
    /// `@domain`; case-insensitive).
    pub fn admits_user(&self, address: &str) -> bool {
        let address = address.trim().to_ascii_lowercase();
        let domain = address.rsplit_once('@').map(|(_, d)| d);
        self.user_addresses.iter().any(|a| {
            *a == address
                || a.strip_prefix('@')
                    .is_some_and(|d| domain.is_some_and(|domain| domain == d))
        })
    }
}

/// A printer or MFD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub tenant: String,
    pub name: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub agent: String,
    pub sender_mode: SenderMode,
    #[serde(default)]
    pub admin_mailbox: String,
    #[serde(default)]
    pub bulk_mailbox: String,
    #[serde(default)]
    pub allowed_mailboxes: Vec<String>,
    #[serde(default)]
    pub smtp: SmtpProfile,
    #[serde(default)]
    pub fetch: FetchProfile,
    #[serde(default)]
    pub ingress: IngressCredentials,
    /// Provider used to create user mailboxes on demand (LOGIN_USER / ALLOW_USER_CHANGE).
    #[serde(default)]
    pub user_provider: String,
    pub stamps: Stamps,
}

impl Device {
    /// Every mailbox name this device refers to.
    pub fn referenced_mailboxes(&self) -> impl Iterator<Item = &str> {
        [self.admin_mailbox.as_str(), self.bulk_mailbox.as_str()]
            .into_iter()
            .chain(self.allowed_mailboxes.iter().map(String::as_str))
            .filter(|m| !m.is_empty())
    }
}

/// An agent at a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub tenant: String,
    pub name: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub certificate_expires: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    #[serde(default)]
    pub software_version: String,
    pub stamps: Stamps,
}

/// An admin API key as stored: only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public id (the part of the key before the secret).
    pub id: String,
    pub role: Role,
    /// Tenant the key is bound to; `None` = fleet-wide.
    pub tenant: Option<String>,
    /// Hex SHA-256 of the whole key string.
    pub hash: String,
    #[serde(default)]
    pub description: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub target: String,
    #[serde(default)]
    pub tenant: String,
    pub result: String,
    #[serde(default)]
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of every `named_enum!` parses from its own name, with `-` and `_` swapped and
    /// in upper case (the parse once normalised only the input, so `fleet-admin` never matched).
    fn parses_every_value<E: Copy + PartialEq + std::fmt::Debug>(
        all: &[E],
        as_str: fn(E) -> &'static str,
        parse: fn(&str) -> Option<E>,
    ) {
        for &value in all {
            let name = as_str(value);
            for text in [
                name.to_owned(),
                name.replace('-', "_"),
                name.replace('_', "-"),
                name.to_ascii_uppercase(),
                format!("  {name} "),
            ] {
                assert_eq!(parse(&text), Some(value), "`{text}`");
            }
        }
        assert_eq!(parse("no-such-value"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn every_named_enum_parses_every_value() {
        parses_every_value(TokenStatus::ALL, TokenStatus::as_str, TokenStatus::parse);
        parses_every_value(ProviderKind::ALL, ProviderKind::as_str, ProviderKind::parse);
        parses_every_value(GrantType::ALL, GrantType::as_str, GrantType::parse);
        parses_every_value(MailboxKind::ALL, MailboxKind::as_str, MailboxKind::parse);
        parses_every_value(MailPurpose::ALL, MailPurpose::as_str, MailPurpose::parse);
        parses_every_value(SenderMode::ALL, SenderMode::as_str, SenderMode::parse);
        parses_every_value(TlsMode::ALL, TlsMode::as_str, TlsMode::parse);
        parses_every_value(SendMethod::ALL, SendMethod::as_str, SendMethod::parse);
        parses_every_value(TlsVersion::ALL, TlsVersion::as_str, TlsVersion::parse);
        parses_every_value(
            FetchProtocol::ALL,
            FetchProtocol::as_str,
            FetchProtocol::parse,
        );
        parses_every_value(Role::ALL, Role::as_str, Role::parse);
        assert_eq!(Role::parse("fleet-admin"), Some(Role::FleetAdmin));
        assert_eq!(Role::parse("tenant_admin"), Some(Role::TenantAdmin));
    }
}
