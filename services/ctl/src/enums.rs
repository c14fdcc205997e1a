//! Enum values as the operator types them (the lower-case names DESIGN.md uses) and their mapping
//! to and from the wire enums of `tokenfleet.v1`.

use tokenfleet_proto::v1 as pb;

/// Declares a `clap::ValueEnum` whose values are the lower-case names, mapped onto a proto enum.
macro_rules! cli_enum {
    (
        $(#[$m:meta])*
        $name:ident => $proto:ident {
            $( $(#[$vm:meta])* $variant:ident = $text:literal => $pv:ident ),+ $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
        pub enum $name {
            $( $(#[$vm])* #[value(name = $text)] $variant ),+
        }

        impl $name {
            /// The wire value.
            pub fn to_proto(self) -> i32 {
                match self {
                    $( $name::$variant => pb::$proto::$pv as i32 ),+
                }
            }
        }
    };
}

cli_enum!(
    /// Token status of a mailbox, as `mailbox list --status` filters by it.
    TokenStatus => TokenStatus {
        /// No grant has been obtained yet.
        NotRetrieved = "not_retrieved" => NotRetrieved,
        /// A consent was started; waiting for a person.
        ConsentPending = "consent_pending" => ConsentPending,
        /// A usable grant exists and refreshes succeed.
        Active = "active" => Active,
        /// Refreshes fail for transient reasons.
        RefreshFailing = "refresh_failing" => RefreshFailing,
        /// The grant is dead; a person must consent again.
        ReauthRequired = "reauth_required" => ReauthRequired,
        /// An operator disabled the mailbox.
        Disabled = "disabled" => Disabled,
    }
);

cli_enum!(
    /// Kind of app registration.
    ProviderKind => ProviderKind {
        /// Microsoft Entra ID / Exchange Online.
        Microsoft = "microsoft" => Microsoft,
        /// Google Workspace / Gmail.
        Google = "google" => Google,
        /// Any OAuth 2.0 server with explicitly configured endpoints.
        Generic = "generic" => Generic,
    }
);

cli_enum!(
    /// How a mailbox's tokens are obtained.
    GrantType => GrantType {
        /// Microsoft device code flow: a person enters a user code.
        DelegatedDeviceCode = "delegated_device_code" => DelegatedDeviceCode,
        /// Authorization code with PKCE (browser redirect or pasted code).
        DelegatedAuthCode = "delegated_auth_code" => DelegatedAuthCode,
        /// Microsoft client credentials (SMTP.SendAsApp, POP.AccessAsApp).
        AppOnly = "app_only" => AppOnly,
        /// Google service account with domain-wide delegation.
        ServiceAccount = "service_account" => ServiceAccount,
    }
);

cli_enum!(
    /// Role of a mailbox.
    MailboxKind => MailboxKind {
        /// The administrator's mailbox of a device.
        Admin = "admin" => Admin,
        /// A fixed sender shared by many devices.
        Bulk = "bulk" => Bulk,
        /// A per-user mailbox.
        User = "user" => User,
    }
);

cli_enum!(
    /// What a mailbox's tokens are used for.
    MailPurpose => MailPurpose {
        /// SMTP submission.
        Send = "send" => Send,
        /// POP3 fetch.
        Pop = "pop" => Pop,
        /// IMAP fetch.
        Imap = "imap" => Imap,
    }
);

cli_enum!(
    /// Which sender a device's mail leaves as.
    SenderMode => SenderMode {
        /// Always the device's admin mailbox.
        FixedAdmin = "fixed_admin" => FixedAdmin,
        /// Always the configured bulk sender.
        Bulk = "bulk" => Bulk,
        /// The mailbox of the user signed in at the device.
        LoginUser = "login_user" => LoginUser,
        /// The signed-in user's mailbox; the user may pick another allowed one.
        AllowUserChange = "allow_user_change" => AllowUserChange,
    }
);

cli_enum!(
    /// Transport security of a mail connection.
    TlsMode => TlsMode {
        /// Plain connection upgraded with STARTTLS/STLS (required).
        Starttls = "starttls" => Starttls,
        /// TLS from the first byte (465, 995, 993).
        ImplicitTls = "implicit_tls" => ImplicitTls,
        /// No TLS (LAN or test servers only).
        None = "none" => None,
    }
);

cli_enum!(
    /// How a device's mail leaves the agent.
    SendMethod => SendMethod {
        /// SMTP submission with XOAUTH2.
        Smtp = "smtp" => Smtp,
        /// Microsoft Graph sendMail (tenants with SMTP AUTH off).
        Graph = "graph" => Graph,
        /// Gmail API messages.send.
        GmailApi = "gmail_api" => GmailApi,
    }
);

cli_enum!(
    /// TLS protocol version.
    TlsVersion => TlsVersion {
        /// TLS 1.2.
        V1_2 = "1.2" => TlsVersion12,
        /// TLS 1.3.
        V1_3 = "1.3" => TlsVersion13,
    }
);

cli_enum!(
    /// Fetch protocol.
    FetchProtocol => FetchProtocol {
        /// POP3.
        Pop3 = "pop3" => Pop3,
        /// IMAP.
        Imap = "imap" => Imap,
    }
);

/// Role of an admin API key (sent as its name; `_` works as well as `-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApiKeyRole {
    /// Everything, every tenant.
    #[value(name = "fleet-admin", alias = "fleet_admin")]
    FleetAdmin,
    /// Everything inside one tenant.
    #[value(name = "tenant-admin", alias = "tenant_admin")]
    TenantAdmin,
    /// Read only (fleet-wide, or one tenant when bound to it).
    #[value(name = "viewer")]
    Viewer,
}

impl ApiKeyRole {
    /// The name the API takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FleetAdmin => "fleet-admin",
            Self::TenantAdmin => "tenant-admin",
            Self::Viewer => "viewer",
        }
    }
}

/// Which audit records to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditKind {
    /// Changes that took effect.
    Changes,
    /// Refused or failed attempts.
    Refused,
    /// Access tokens issued to agents.
    Issuance,
    /// Everything, merged newest first.
    All,
}

impl AuditKind {
    /// The name the API takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Changes => "changes",
            Self::Refused => "refused",
            Self::Issuance => "issuance",
            Self::All => "all",
        }
    }
}

/// Output name of a wire enum value: the proto value name without the enum prefix, lower-case
/// (`GRANT_TYPE_APP_ONLY` → `app_only`); `unspecified` for 0 and `unknown` for a value this CLI
/// does not know (a newer broker).
fn wire_name(proto_name: Option<&'static str>, prefix: &str) -> String {
    match proto_name {
        Some(full) => full
            .strip_prefix(prefix)
            .unwrap_or(full)
            .to_ascii_lowercase(),
        None => "unknown".to_owned(),
    }
}

/// Output name of a `TokenStatus`.
pub fn token_status_name(value: i32) -> String {
    wire_name(
        pb::TokenStatus::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "TOKEN_STATUS_",
    )
}

/// Output name of a `ProviderKind`.
pub fn provider_kind_name(value: i32) -> String {
    wire_name(
        pb::ProviderKind::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "PROVIDER_KIND_",
    )
}

/// Output name of a `GrantType`.
pub fn grant_type_name(value: i32) -> String {
    wire_name(
        pb::GrantType::try_from(value).ok().map(|v| v.as_str_name()),
        "GRANT_TYPE_",
    )
}

/// Output name of a `MailboxKind`.
pub fn mailbox_kind_name(value: i32) -> String {
    wire_name(
        pb::MailboxKind::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "MAILBOX_KIND_",
    )
}

/// Output name of a `MailPurpose`.
pub fn mail_purpose_name(value: i32) -> String {
    wire_name(
        pb::MailPurpose::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "MAIL_PURPOSE_",
    )
}

/// Output name of a `SenderMode`.
pub fn sender_mode_name(value: i32) -> String {
    wire_name(
        pb::SenderMode::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "SENDER_MODE_",
    )
}

/// Output name of a `TlsMode`.
pub fn tls_mode_name(value: i32) -> String {
    wire_name(
        pb::TlsMode::try_from(value).ok().map(|v| v.as_str_name()),
        "TLS_MODE_",
    )
}

/// Output name of a `SendMethod`.
pub fn send_method_name(value: i32) -> String {
    wire_name(
        pb::SendMethod::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "SEND_METHOD_",
    )
}

/// Output name of a `TlsVersion` (`1.2`, `1.3`, as the input flags take it).
pub fn tls_version_name(value: i32) -> String {
    wire_name(
        pb::TlsVersion::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "TLS_VERSION_",
    )
    .replace('_', ".")
}

/// Output name of a `FetchProtocol`.
pub fn fetch_protocol_name(value: i32) -> String {
    wire_name(
        pb::FetchProtocol::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "FETCH_PROTOCOL_",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// Every input value maps to the wire value of the same name, and the output name of that
    /// wire value is the input name again: what `-o json` prints can be fed back as a flag.
    fn round_trips<E: ValueEnum + Copy>(to_proto: fn(E) -> i32, name_of: fn(i32) -> String) {
        for value in E::value_variants() {
            let input = value
                .to_possible_value()
                .map(|p| p.get_name().to_owned())
                .unwrap_or_default();
            assert_eq!(name_of(to_proto(*value)), input);
        }
    }

    #[test]
    fn input_names_round_trip_through_the_wire() {
        round_trips(ProviderKind::to_proto, provider_kind_name);
        round_trips(GrantType::to_proto, grant_type_name);
        round_trips(MailboxKind::to_proto, mailbox_kind_name);
        round_trips(MailPurpose::to_proto, mail_purpose_name);
        round_trips(SenderMode::to_proto, sender_mode_name);
        round_trips(TlsMode::to_proto, tls_mode_name);
        round_trips(TlsVersion::to_proto, tls_version_name);
        round_trips(FetchProtocol::to_proto, fetch_protocol_name);
    }

    #[test]
    fn every_wire_value_has_an_input_name() {
        // Counts exclude UNSPECIFIED; a new proto value without a CLI name fails here.
        assert_eq!(ProviderKind::value_variants().len(), 3);
        assert_eq!(GrantType::value_variants().len(), 4);
        assert_eq!(MailboxKind::value_variants().len(), 3);
        assert_eq!(MailPurpose::value_variants().len(), 3);
        assert_eq!(SenderMode::value_variants().len(), 4);
        assert_eq!(TlsMode::value_variants().len(), 3);
        assert_eq!(TlsVersion::value_variants().len(), 2);
        assert_eq!(FetchProtocol::value_variants().len(), 2);
        assert!(pb::GrantType::try_from(5).is_err());
        assert!(pb::SenderMode::try_from(5).is_err());
        assert!(pb::TlsMode::try_from(4).is_err());
    }

    #[test]
    fn unspecified_and_unknown_values_have_names() {
        assert_eq!(grant_type_name(0), "unspecified");
        assert_eq!(grant_type_name(99), "unknown");
        assert_eq!(token_status_name(5), "reauth_required");
        assert_eq!(tls_version_name(0), "unspecified");
    }
}
