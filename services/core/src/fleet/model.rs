//! The fleet's domain types: what an agent reports (per device and per report), the commands the
//! broker queues for an agent and the agent's answers, connection tests, the configuration an
//! agent receives and the operator's view of a device's status. No transport: the broker's edge
//! (`tokenfleet_broker::fleet::wire`) converts them to and from the `tokenfleet.v1` messages of
//! the same names, field for field; the store keeps them as JSON ([`super::store`]).
//!
//! Enumerations carry an `Unspecified` value where the wire has one (an agent may leave a field
//! unset); a wire number this broker does not know reads as `Unspecified`.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokenfleet_domain::{
    FetchProfile, MailPurpose, MailboxKind, SenderMode, SmtpProfile, TokenStatus,
};

/// How healthy a device is, as judged from its last status report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceHealth {
    /// Not set by the agent.
    #[default]
    Unspecified,
    /// Mail flows; tokens are usable.
    Ok,
    /// Needs attention, but mail still flows or is only delayed.
    Degraded,
    /// Mail does not flow.
    Failing,
    /// No report within three heartbeats, or no agent assigned.
    Unknown,
}

impl DeviceHealth {
    /// Problems first: FAILING, UNKNOWN, DEGRADED, OK, then UNSPECIFIED.
    pub fn rank(self) -> u8 {
        match self {
            Self::Failing => 0,
            Self::Unknown => 1,
            Self::Degraded => 2,
            Self::Ok => 3,
            Self::Unspecified => 4,
        }
    }

    /// How bad a health is, for "the worse of two" (UNKNOWN ranks between DEGRADED and FAILING).
    pub fn severity(self) -> u8 {
        4 - self.rank()
    }
}

/// The token of one mailbox as an agent sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MailboxTokenView {
    /// Mailbox name.
    pub mailbox: String,
    /// ACTIVE when the agent holds a usable token, else what the broker answered; `None` unset.
    pub status: Option<TokenStatus>,
    /// Expiry of the token the agent holds.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expire_time: Option<OffsetDateTime>,
    /// Last error getting a token (never a token).
    pub error: String,
    /// What the token is for; `None` unset.
    pub purpose: Option<MailPurpose>,
}

/// The outcome of a device's last delivery attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeliveryResult {
    /// When it was attempted.
    #[serde(with = "time::serde::rfc3339::option")]
    pub time: Option<OffsetDateTime>,
    /// Whether the upstream accepted the message.
    pub ok: bool,
    /// The upstream's final reply.
    pub final_reply: String,
    /// The decoded JSON of the server's SASL error challenge; empty when none.
    pub auth_challenge_json: String,
    /// Spool id of the message.
    pub message_id: String,
    /// `delivered`, `retrying`, `dead-lettered`, `waiting-for-token`.
    pub outcome: String,
    /// Mailbox used.
    pub mailbox: String,
}

/// What an agent reports about one device (`DeviceStatus` on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceReport {
    /// Device name.
    pub device: String,
    /// The agent's verdict.
    pub health: DeviceHealth,
    /// One line describing the current problem; empty when healthy.
    pub problem: String,
    /// The tokens the agent holds for the device.
    pub tokens: Vec<MailboxTokenView>,
    /// The last delivery attempt.
    pub last_delivery: Option<DeliveryResult>,
    /// Messages waiting in the spool.
    pub queue_depth: u32,
    /// Age of the oldest queued message, seconds.
    pub oldest_queued_seconds: u64,
    /// Delivered since the spool was created.
    pub delivered_total: u64,
    /// Failed since the spool was created.
    pub failed_total: u64,
    /// Dead-lettered since the spool was created.
    pub dead_lettered_total: u64,
    /// Possibly delivered twice.
    pub duplicates_total: u64,
    /// The last connection test.
    pub last_connection_test: Option<ConnectionTestResult>,
    /// Fetched into the local maildrop.
    pub fetched_total: u64,
    /// Waiting in the local maildrop.
    pub maildrop_depth: u32,
}

/// One status report (heartbeat) of an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// When the agent sent it.
    pub time: Option<OffsetDateTime>,
    /// The agent's software version.
    pub software_version: String,
    /// Increases with every report of one agent process.
    pub sequence: u64,
    /// Revision of the configuration the agent runs.
    pub config_revision: String,
    /// Per device.
    pub devices: Vec<DeviceReport>,
    /// Set when the report answers a command.
    pub command_result: Option<CommandResult>,
}

/// A command from the broker to an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentCommand {
    /// Unique id, echoed in the [`CommandResult`].
    pub id: String,
    /// What to do; `None` when unset.
    pub command: Option<Command>,
}

/// What an [`AgentCommand`] asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Fetch the configuration again and apply it.
    ReloadConfig,
    /// Forget the cached access token of a mailbox (empty: every mailbox).
    DropToken {
        /// Mailbox name; empty = every mailbox.
        mailbox: String,
    },
    /// Run a connection test and answer with its result.
    TestConnection(ConnectionTestCommand),
}

/// A connection test an agent is asked to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionTestCommand {
    /// Device to test.
    pub device: String,
    /// Which connection.
    pub target: ConnectionTarget,
    /// Deadline for the whole test.
    pub timeout_seconds: u32,
}

/// An agent's answer to a command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CommandResult {
    /// The command's id.
    pub command_id: String,
    /// Whether it worked.
    pub ok: bool,
    /// What happened, for commands without a structured result.
    pub detail: String,
    /// The structured result of a connection test.
    pub connection_test: Option<ConnectionTestResult>,
}

/// Which of a device's upstream connections to test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionTarget {
    /// Not set.
    #[default]
    Unspecified,
    /// The send profile.
    Send,
    /// The fetch profile.
    Fetch,
}

/// The verdict of a connection test: the first thing that failed, or OK.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionVerdict {
    #[default]
    Unspecified,
    Ok,
    DnsFailed,
    ConnectionRefused,
    Timeout,
    CertificateNameMismatch,
    CertificateUntrusted,
    TlsVersionRefused,
    TlsFailed,
    NoToken,
    SmtpAuthDisabled,
    TokenRejected,
    MechanismNotOffered,
    ProtocolError,
    AgentUnreachable,
    ApiError,
    DeviceNotLoaded,
}

impl ConnectionVerdict {
    /// The wire name (`CONNECTION_VERDICT_OK`, …), for audit details and logs.
    pub fn wire_name(self) -> &'static str {
        match self {
            Self::Unspecified => "CONNECTION_VERDICT_UNSPECIFIED",
            Self::Ok => "CONNECTION_VERDICT_OK",
            Self::DnsFailed => "CONNECTION_VERDICT_DNS_FAILED",
            Self::ConnectionRefused => "CONNECTION_VERDICT_CONNECTION_REFUSED",
            Self::Timeout => "CONNECTION_VERDICT_TIMEOUT",
            Self::CertificateNameMismatch => "CONNECTION_VERDICT_CERTIFICATE_NAME_MISMATCH",
            Self::CertificateUntrusted => "CONNECTION_VERDICT_CERTIFICATE_UNTRUSTED",
            Self::TlsVersionRefused => "CONNECTION_VERDICT_TLS_VERSION_REFUSED",
            Self::TlsFailed => "CONNECTION_VERDICT_TLS_FAILED",
            Self::NoToken => "CONNECTION_VERDICT_NO_TOKEN",
            Self::SmtpAuthDisabled => "CONNECTION_VERDICT_SMTP_AUTH_DISABLED",
            Self::TokenRejected => "CONNECTION_VERDICT_TOKEN_REJECTED",
            Self::MechanismNotOffered => "CONNECTION_VERDICT_MECHANISM_NOT_OFFERED",
            Self::ProtocolError => "CONNECTION_VERDICT_PROTOCOL_ERROR",
            Self::AgentUnreachable => "CONNECTION_VERDICT_AGENT_UNREACHABLE",
            Self::ApiError => "CONNECTION_VERDICT_API_ERROR",
            Self::DeviceNotLoaded => "CONNECTION_VERDICT_DEVICE_NOT_LOADED",
        }
    }

    /// Every value, in wire order (the wire number is the index).
    pub const ALL: &'static [Self] = &[
        Self::Unspecified,
        Self::Ok,
        Self::DnsFailed,
        Self::ConnectionRefused,
        Self::Timeout,
        Self::CertificateNameMismatch,
        Self::CertificateUntrusted,
        Self::TlsVersionRefused,
        Self::TlsFailed,
        Self::NoToken,
        Self::SmtpAuthDisabled,
        Self::TokenRejected,
        Self::MechanismNotOffered,
        Self::ProtocolError,
        Self::AgentUnreachable,
        Self::ApiError,
        Self::DeviceNotLoaded,
    ];
}

/// One step of a connection test.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionTestStep {
    /// `dns`, `tcp`, `tls`, …
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen (never a token).
    pub detail: String,
    /// How long it took.
    pub duration_ms: u32,
}

/// The server certificate seen during a connection test.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CertificateInfo {
    /// Subject.
    pub subject: String,
    /// Issuer.
    pub issuer: String,
    /// DNS names.
    pub dns_names: Vec<String>,
    /// Valid from.
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_before: Option<OffsetDateTime>,
    /// Valid until.
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_after: Option<OffsetDateTime>,
    /// SHA-256 of the DER certificate, hex.
    pub sha256_fingerprint: String,
    /// Negotiated protocol version.
    pub tls_version: String,
    /// Negotiated cipher suite.
    pub cipher_suite: String,
}

/// The result of a connection test.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionTestResult {
    /// Device tested.
    pub device: String,
    /// Connection tested.
    pub target: ConnectionTarget,
    /// Verdict.
    pub verdict: ConnectionVerdict,
    /// One line: what was found.
    pub summary: String,
    /// What to do about it; empty when OK.
    pub fix: String,
    /// The steps taken.
    pub steps: Vec<ConnectionTestStep>,
    /// The server certificate.
    pub certificate: Option<CertificateInfo>,
    /// When the test ran.
    #[serde(with = "time::serde::rfc3339::option")]
    pub time: Option<OffsetDateTime>,
    /// `host:port` tested.
    pub endpoint: String,
}

/// Everything an agent needs to serve its devices (no refresh token, client secret or local
/// password; the devices' Argon2id password hashes only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Tenant of the agent.
    pub tenant: String,
    /// Name of the agent.
    pub agent: String,
    /// The devices it hosts.
    pub devices: Vec<AgentDevice>,
    /// Changes whenever anything else in the configuration changes ([`super::config::revision`]).
    pub revision: String,
    /// Seconds between the agent's status reports.
    pub heartbeat_seconds: u32,
}

/// A mailbox a device may use, with its address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxRef {
    /// Mailbox name.
    pub name: String,
    /// Its address (empty when the mailbox does not exist).
    pub address: String,
    /// Its kind (`None` when the mailbox does not exist).
    pub kind: Option<MailboxKind>,
}

/// One device as its agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDevice {
    /// Device name.
    pub name: String,
    /// Display name.
    pub display_name: String,
    /// Which sender its mail leaves as.
    pub sender_mode: SenderMode,
    /// The admin mailbox, when it has one.
    pub admin_mailbox: Option<MailboxRef>,
    /// The bulk mailbox, when it has one.
    pub bulk_mailbox: Option<MailboxRef>,
    /// Further mailboxes it may use.
    pub allowed_mailboxes: Vec<MailboxRef>,
    /// The send profile.
    pub smtp: SmtpProfile,
    /// The fetch profile.
    pub fetch: FetchProfile,
    /// Local user name; empty = none.
    pub ingress_username: String,
    /// Argon2id PHC hash of the local password; empty = none.
    pub ingress_password_hash: String,
    /// Sources that may submit without logging in.
    pub ingress_allowed_sources: Vec<String>,
    /// User addresses the device may send as.
    pub ingress_user_addresses: Vec<String>,
}

/// The broker's grant status of one mailbox a device names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetMailboxGrant {
    /// Mailbox name.
    pub mailbox: String,
    /// Its address (empty when it does not exist).
    pub address: String,
    /// The grant's status (`None` when the mailbox does not exist).
    pub status: Option<TokenStatus>,
    /// Why it is not ACTIVE, and the fix; empty when it is.
    pub problem: String,
}

/// The last known status of one device, for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetDeviceStatus {
    /// Tenant.
    pub tenant: String,
    /// Device name.
    pub device: String,
    /// Agent hosting it; empty = none.
    pub agent: String,
    /// Whether the agent has a status stream open to some replica now.
    pub agent_connected: bool,
    /// When the agent last reported the device.
    pub last_report_time: Option<OffsetDateTime>,
    /// The reported health, or UNKNOWN when stale.
    pub health: DeviceHealth,
    /// The current problem.
    pub problem: String,
    /// The device's last report.
    pub status: Option<DeviceReport>,
    /// The agent's software version.
    pub agent_software_version: String,
    /// The broker's grant status of every mailbox the device names.
    pub grants: Vec<FleetMailboxGrant>,
}
