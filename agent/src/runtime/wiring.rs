//! Where the runtime meets the pieces written alongside it: the upstream constructors per send
//! method, the connection test, and the local POP3 server. Each function is the one place to
//! change when such a piece lands.

use std::sync::Arc;

use tokenfleet_proto::v1 as pb;

use std::time::Duration;

use crate::fetch::{FetchProtocol, FetchSettings};
use crate::upstream::Delivery;
use crate::upstream::api::{ApiSettings, GmailDelivery, GraphDelivery};
use crate::upstream::smtp::{Security, SmtpDelivery, SmtpSettings};
use crate::upstream::tls::{TlsSettings, TlsVersion};

/// TLS settings of a send profile.
pub fn tls_settings(profile: &pb::SmtpProfile) -> TlsSettings {
    let version = |v: i32| match pb::TlsVersion::try_from(v).unwrap_or_default() {
        pb::TlsVersion::Unspecified => None,
        pb::TlsVersion::TlsVersion12 => Some(TlsVersion::Tls12),
        pb::TlsVersion::TlsVersion13 => Some(TlsVersion::Tls13),
    };
    TlsSettings {
        skip_verification: profile.skip_certificate_verification,
        extra_ca_pem: (!profile.extra_ca_pem.trim().is_empty())
            .then(|| profile.extra_ca_pem.clone()),
        min_version: version(profile.tls_min_version),
        max_version: version(profile.tls_max_version),
        no_system_roots: false,
        allow_cleartext_tokens: profile.insecure_allow_cleartext_tokens,
    }
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

fn api_settings(profile: &pb::SmtpProfile) -> ApiSettings {
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

/// The answer to a connection test command while the build has no connection tests.
pub const NO_CONNECTION_TESTS: &str = "connection tests not available in this build";

/// The connection tester of this build: the probes of [`crate::probe`] for SMTP send profiles
/// and POP3/IMAP fetch profiles, and [`super::probing::test_api`] for Graph/Gmail API send
/// profiles.
pub fn connection_tester() -> Option<Arc<dyn super::ConnectionTester>> {
    Some(Arc::new(ProbeTester))
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
    let version = |v: i32| match pb::TlsVersion::try_from(v).unwrap_or_default() {
        pb::TlsVersion::Unspecified => None,
        pb::TlsVersion::TlsVersion12 => Some(TlsVersion::Tls12),
        pb::TlsVersion::TlsVersion13 => Some(TlsVersion::Tls13),
    };
    settings.tls = TlsSettings {
        skip_verification: profile.skip_certificate_verification,
        extra_ca_pem: (!profile.extra_ca_pem.trim().is_empty())
            .then(|| profile.extra_ca_pem.clone()),
        min_version: version(profile.tls_min_version),
        max_version: version(profile.tls_max_version),
        no_system_roots: false,
        allow_cleartext_tokens: profile.insecure_allow_cleartext_tokens,
    };
    if !profile.folder.trim().is_empty() {
        settings.folder = profile.folder.trim().to_owned();
    }
    Ok(settings)
}

/// Runs [`crate::probe`] for the `TestConnection` command.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTester;

fn unusable(target: pb::ConnectionTarget, summary: String) -> pb::ConnectionTestResult {
    let mut result = pb::ConnectionTestResult {
        verdict: pb::ConnectionVerdict::ProtocolError as i32,
        summary,
        fix: "correct the device's profile in the broker".to_owned(),
        time: Some(super::tokens::timestamp(std::time::SystemTime::now())),
        ..Default::default()
    };
    result.set_target(target);
    result
}

#[async_trait::async_trait]
impl super::ConnectionTester for ProbeTester {
    async fn test(
        &self,
        device: &super::devices::DeviceEntry,
        command: &pb::ConnectionTestCommand,
        tokens: &super::tokens::TokenCache,
    ) -> pb::ConnectionTestResult {
        let seconds = match command.timeout_seconds {
            0 => 30,
            s => s.min(120),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(seconds));
        let target = pb::ConnectionTarget::try_from(command.target).unwrap_or_default();
        let purpose = if target == pb::ConnectionTarget::Fetch {
            match pb::FetchProtocol::try_from(
                device.spec.fetch.clone().unwrap_or_default().protocol,
            ) {
                Ok(pb::FetchProtocol::Imap) => pb::MailPurpose::Imap,
                _ => pb::MailPurpose::Pop,
            }
        } else {
            pb::MailPurpose::Send
        };
        // The fetch test uses the mailbox the fetch job empties; the send test the sender's.
        let mailbox = if target == pb::ConnectionTarget::Fetch {
            super::fetcher::fetch_mailbox(&device.spec)
        } else {
            device.default_mailbox().map(str::to_owned).ok_or_else(|| {
                "the device's sender mode has no fixed mailbox (the user signs in at the device)"
                    .to_owned()
            })
        };
        let credentials = match mailbox {
            Ok(mailbox) => {
                let key = super::tokens::TokenKey {
                    device: device.spec.name.clone(),
                    mailbox: mailbox.to_owned(),
                    user_address: String::new(),
                    purpose,
                };
                tokens.credentials(&key).await.map_err(|e| match e {
                    super::tokens::TokenUnavailable::Wait { reason, .. }
                    | super::tokens::TokenUnavailable::Denied(reason) => reason,
                })
            }
            Err(why) => Err(why),
        };
        let (credentials, no_token) = match credentials {
            Ok(c) => (Some(c), String::new()),
            Err(reason) => (None, reason),
        };
        let mut result = match target {
            pb::ConnectionTarget::Fetch => {
                match fetch_settings(&device.spec.fetch.clone().unwrap_or_default()) {
                    Ok(settings) => {
                        crate::probe::fetch::test_fetch(
                            &settings,
                            credentials.as_ref(),
                            &no_token,
                            deadline,
                        )
                        .await
                    }
                    Err(e) => unusable(target, e),
                }
            }
            _ => {
                let profile = device.spec.smtp.clone().unwrap_or_default();
                match pb::SendMethod::try_from(profile.method).unwrap_or_default() {
                    pb::SendMethod::Graph => {
                        super::probing::test_api(
                            super::probing::MailApiKind::Graph,
                            &profile,
                            credentials.as_ref(),
                            &no_token,
                            deadline,
                        )
                        .await
                    }
                    pb::SendMethod::GmailApi => {
                        super::probing::test_api(
                            super::probing::MailApiKind::Gmail,
                            &profile,
                            credentials.as_ref(),
                            &no_token,
                            deadline,
                        )
                        .await
                    }
                    _ => match smtp_settings(&profile) {
                        Ok(settings) => {
                            crate::probe::smtp::test_send(
                                &settings,
                                credentials.as_ref(),
                                &no_token,
                                deadline,
                            )
                            .await
                        }
                        Err(e) => unusable(pb::ConnectionTarget::Send, e),
                    },
                }
            }
        };
        result.device = device.spec.name.clone();
        result
    }
}

/// Ingress settings from the local configuration: STARTTLS with `ingress_tls_cert_file` /
/// `ingress_tls_key_file` when both are set, required before AUTH and MAIL with
/// `ingress_require_tls`; sessions, timeouts, message memory and login throttling from
/// `[ingress_limits]`.
pub fn ingress_config(
    settings: &crate::config::AgentSettings,
) -> anyhow::Result<crate::ingress::IngressConfig> {
    let limits = &settings.ingress_limits;
    let mut config = crate::ingress::IngressConfig {
        limits: limits.sessions,
        command_timeout: limits.idle_timeout,
        message_memory: limits.message_memory,
        max_message_size: limits.max_message_size,
        login_guard: Arc::new(crate::ingress::LoginGuard::new(limits.logins)),
        ..crate::ingress::IngressConfig::default()
    };
    if let Some((cert, key)) = &settings.ingress_tls {
        config.tls = Some(
            crate::ingress::IngressTls::from_pem_files(cert, key).map_err(|e| {
                anyhow::anyhow!(
                    "ingress_tls_cert_file {} / ingress_tls_key_file {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
        );
    }
    config.require_tls = settings.ingress_require_tls;
    Ok(config)
}

/// The local POP3 server follows the SMTP ingress: the same certificate for `STLS`, the same
/// rule on whether devices must start TLS before they log in, the same session caps, and the
/// same [`crate::ingress::LoginGuard`] (failures on one count on the other). Its idle timeout is
/// the default (600 s, RFC 1939's minimum autologout) until [`pop3_limits`] sets it.
pub fn pop3_config(
    ingress: &crate::ingress::IngressConfig,
) -> crate::pop3_server::Pop3ServerConfig {
    crate::pop3_server::Pop3ServerConfig {
        hostname: ingress.hostname.clone(),
        tls: ingress
            .tls
            .as_ref()
            .map(crate::ingress::IngressTls::server_config),
        require_tls: ingress.require_tls,
        limits: ingress.limits,
        login_guard: Arc::clone(&ingress.login_guard),
        ..crate::pop3_server::Pop3ServerConfig::default()
    }
}

/// The POP3 settings of `[ingress_limits]` applied to `config` (the idle timeout).
pub fn pop3_limits(
    mut config: crate::pop3_server::Pop3ServerConfig,
    settings: &crate::config::AgentSettings,
) -> crate::pop3_server::Pop3ServerConfig {
    config.command_timeout = settings.ingress_limits.pop3_idle_timeout;
    config
}

/// Directory (in the state directory) of the maildrop the local POP3 server serves.
pub const MAILDROP_DIR: &str = "maildrop";

/// Opens the maildrop (`<state_dir>/maildrop`) the fetch jobs fill and the local POP3 server
/// serves.
pub async fn open_maildrop(
    state_dir: &std::path::Path,
) -> anyhow::Result<crate::maildrop::Maildrop> {
    let dir = state_dir.join(MAILDROP_DIR);
    let root = dir.clone();
    tokio::task::spawn_blocking(move || crate::maildrop::Maildrop::open(root))
        .await
        .map_err(|e| anyhow::anyhow!("opening the maildrop: {e}"))?
        .map_err(|e| anyhow::anyhow!("maildrop {}: {e}", dir.display()))
}

/// The local POP3 server: devices fetch the mail the fetch jobs stored in `maildrop`, logging in
/// with their local credentials. Stops when `stop` turns true. (The fetch jobs that fill the
/// maildrop are started separately, see [`super::fetcher`].)
pub async fn start_pop3(
    addr: std::net::SocketAddr,
    config: crate::pop3_server::Pop3ServerConfig,
    runtime: &Arc<super::AgentRuntime>,
    maildrop: crate::maildrop::Maildrop,
    mut stop: tokio::sync::watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("pop3_listen {addr}: cannot listen: {e}"))?;
    tracing::info!(pop3 = %addr, "POP3 server listening");
    let auth = Arc::clone(&runtime.ingress);
    tasks.spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(error) = crate::pop3_server::Pop3Server::serve(
            listener,
            config,
            auth,
            Arc::new(maildrop),
            stopped,
        )
        .await
        {
            tracing::error!(%error, "the POP3 server failed");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pop3_server_follows_the_ingress_tls_settings() {
        let plain = crate::ingress::IngressConfig::default();
        let pop3 = pop3_config(&plain);
        assert!(pop3.tls.is_none());
        assert!(!pop3.require_tls);

        let Ok(tls) = crate::ingress::IngressTls::self_signed(&["127.0.0.1".to_owned()]) else {
            panic!("self-signed certificate");
        };
        let strict = crate::ingress::IngressConfig {
            tls: Some(tls.clone()),
            require_tls: true,
            ..crate::ingress::IngressConfig::default()
        };
        let pop3 = pop3_config(&strict);
        assert!(pop3.require_tls);
        let Some(config) = pop3.tls else {
            panic!("no STLS configuration")
        };
        // The very same rustls configuration (certificate) as the SMTP ingress.
        assert!(Arc::ptr_eq(&config, &tls.server_config()));
    }
}
