//! The SMTP send-profile test: `dns`, `tcp`, `tls` (implicit TLS) or `greeting`, `ehlo`,
//! `starttls`, `tls`, `ehlo` (STARTTLS), then `auth` with a fresh token and `quit`. Nothing is
//! sent: the test stops after AUTH.

use std::time::Duration;

use tokenfleet_proto::v1::{ConnectionTarget, ConnectionTestResult, ConnectionVerdict};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{
    Finding, ProbeRun, classify_tls_error, connect_tcp, no_token_finding, protocol_finding,
    refine_tls_finding, resolve, timeout_finding, tls_handshake,
};
use crate::upstream::Credentials;
use crate::upstream::smtp::{
    Capabilities, Reply, Security, SmtpConnection, SmtpError, SmtpSettings,
};

/// The fix for `535 5.7.139` (Exchange Online: SMTP AUTH disabled).
pub const SMTP_AUTH_DISABLED_FIX: &str = "enable Authenticated SMTP for the mailbox: \
    `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false` in Exchange \
    Online PowerShell, or Microsoft 365 admin center → Users → the user → Mail → Manage email \
    apps → Authenticated SMTP; if it is disabled for the whole tenant, also \
    `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`";

/// The fix for a rejected token (`535 5.7.3` and other AUTH refusals).
pub const TOKEN_REJECTED_FIX: &str = "token audience or scope: the mailbox's token must be for \
    https://outlook.office.com/SMTP.Send (delegated) or the app needs SMTP.SendAsApp; re-consent";

pub use super::NO_TOKEN_FIX;

/// The fix when a profile would send the token in clear text (or unverified) to a LAN host.
pub const CLEARTEXT_TOKEN_FIX: &str = "set the profile's security to starttls or implicit_tls \
    with certificate verification on (a private CA goes in extra_ca_pem); only for a trusted \
    relay, set insecure_allow_cleartext_tokens on the profile (audited and shown in fleet status)";

/// Tests the send profile `settings`: connects, secures, and authenticates with `credentials`
/// (a fresh token for the mailbox), all before `deadline`. With `credentials` `None` (the broker
/// gave no token) the connection steps still run and the verdict is NO_TOKEN with
/// `no_token_summary` (the broker's reason) — unless a connection step failed first.
///
/// The result's `device` is left empty for the caller to fill in.
pub async fn test_send(
    settings: &SmtpSettings,
    credentials: Option<&Credentials>,
    no_token_summary: &str,
    deadline: Instant,
) -> ConnectionTestResult {
    let started = Instant::now();
    let endpoint = settings.endpoint();
    let mut run = ProbeRun::new(ConnectionTarget::Send, endpoint.clone(), deadline);
    let outcome = tokio::time::timeout_at(
        deadline,
        steps(&mut run, settings, credentials, no_token_summary),
    )
    .await;
    match outcome {
        Ok(Ok(summary)) => run.succeed(summary),
        Ok(Err(finding)) => run.finish(finding),
        Err(_) => {
            let after = started.elapsed();
            run.finish(timeout_finding("the connection test", &endpoint, after))
        }
    }
}

/// Runs one SMTP step (`$call` on `$conn`) with the step timeout and records it; returns its
/// value or the finding from the enclosing function.
macro_rules! step {
    ($run:expr, $conn:ident, $s:expr, $name:expr, $call:expr, $detail:expr) => {
        probe_step!($run, $conn, $s.timeout, $name, $call, $detail, smtp_finding)
    };
}

async fn steps(
    run: &mut ProbeRun,
    s: &SmtpSettings,
    credentials: Option<&Credentials>,
    no_token_summary: &str,
) -> Result<String, Finding> {
    let endpoint = s.endpoint();
    let addrs = resolve(run, &s.host, s.port, run.step_timeout(s.timeout)).await?;
    let tcp = connect_tcp(run, &addrs, run.step_timeout(s.timeout)).await?;
    let peer_addr = tcp.peer_addr().ok();
    let mut tls_version = None;

    let mut conn = match s.security {
        Security::ImplicitTls => {
            match tls_handshake(run, &s.host, tcp, &s.tls, run.step_timeout(s.timeout)).await {
                Ok(tls) => {
                    tls_version = Some(tls.get_ref().1.protocol_version());
                    SmtpConnection::new(tls, endpoint.clone(), run.step_timeout(s.timeout))
                }
                Err(finding) => return Err(with_certificate(run, s, peer_addr, finding).await),
            }
        }
        Security::Starttls | Security::None => {
            SmtpConnection::new(tcp, endpoint.clone(), run.step_timeout(s.timeout))
        }
    };

    step!(run, conn, s, "greeting", conn.greeting(), Reply::to_string);
    let mut caps = step!(run, conn, s, "ehlo", conn.ehlo(&s.helo_name), ehlo_detail);

    if s.security == Security::Starttls {
        conn.set_timeout(run.step_timeout(s.timeout));
        let started = Instant::now();
        let io = match conn.starttls(&caps).await {
            Ok(io) => {
                run.record("starttls", true, "220: ready to start TLS", started);
                io
            }
            Err(e) => {
                run.record("starttls", false, e.to_string(), started);
                return Err(smtp_finding(e));
            }
        };
        let tls = match tls_handshake(run, &s.host, io, &s.tls, run.step_timeout(s.timeout)).await {
            Ok(tls) => tls,
            Err(finding) => return Err(with_certificate(run, s, peer_addr, finding).await),
        };
        tls_version = Some(tls.get_ref().1.protocol_version());
        conn = SmtpConnection::new(tls, endpoint.clone(), run.step_timeout(s.timeout));
        caps = step!(run, conn, s, "ehlo", conn.ehlo(&s.helo_name), ehlo_detail);
    }

    let started = Instant::now();
    let Some(credentials) = credentials else {
        run.record("auth", false, "no token from the broker", started);
        quit(run, &mut conn).await;
        return Err(no_token_finding(no_token_summary));
    };
    // The agent's own check: no token in clear text to a host that is not loopback.
    if let Err(refusal) =
        s.tls
            .check_token_transport("smtp", &s.host, s.port, s.security != Security::None)
    {
        run.record("auth", false, refusal.clone(), started);
        quit(run, &mut conn).await;
        return Err(smtp_finding(SmtpError::CleartextToken(refusal)));
    }
    conn.set_timeout(run.step_timeout(s.timeout));
    let auth = conn
        .authenticate(&caps, &s.mechanisms, credentials, &s.host, s.port)
        .await;
    let (mechanism, reply) = match auth {
        Ok(ok) => ok,
        Err(e) => {
            run.record("auth", false, e.to_string(), started);
            quit(run, &mut conn).await;
            return Err(smtp_finding(e));
        }
    };
    run.record(
        "auth",
        true,
        format!(
            "{} as {}: {reply}",
            mechanism.as_str(),
            credentials.username
        ),
        started,
    );
    quit(run, &mut conn).await;
    let security = match (s.security, tls_version.flatten()) {
        (Security::None, _) => "without TLS".to_owned(),
        (_, Some(v)) => format!("over {}", super::version_name(v)),
        (_, None) => "over TLS".to_owned(),
    };
    Ok(format!(
        "authenticated as {} with {} at {endpoint} {security}: {reply}",
        credentials.username,
        mechanism.as_str()
    ))
}

fn ehlo_detail(caps: &Capabilities) -> String {
    caps.lines.join(", ")
}

/// Step `quit`, best effort.
async fn quit(run: &mut ProbeRun, conn: &mut SmtpConnection) {
    run.quit(|timeout| {
        conn.set_timeout(timeout);
        async move {
            let reply = conn.quit().await?;
            Ok::<_, SmtpError>((reply.code == 221, reply.to_string()))
        }
    })
    .await;
}

/// After a failed verified handshake: reconnects, re-does the plain-text part (STARTTLS) and
/// reads the certificate with verification off, for the report. Nothing is sent over TLS.
async fn with_certificate(
    run: &mut ProbeRun,
    s: &SmtpSettings,
    peer: Option<std::net::SocketAddr>,
    finding: Finding,
) -> Finding {
    let starttls = |tcp: TcpStream, timeout: Duration| async move {
        let mut conn = SmtpConnection::new(tcp, s.endpoint(), timeout);
        conn.greeting().await.ok()?;
        let caps = conn.ehlo(&s.helo_name).await.ok()?;
        conn.starttls(&caps).await.ok()
    };
    let refine = |finding, info: &_| refine_tls_finding(finding, info, &s.host, &s.tls);
    super::with_certificate(
        run, peer, finding, s.security, &s.host, &s.tls, s.timeout, starttls, refine,
    )
    .await
}

/// The finding for an SMTP-level failure.
pub fn smtp_finding(e: SmtpError) -> Finding {
    match e {
        SmtpError::Timeout { what, peer, after } => timeout_finding(&what, &peer, after),
        SmtpError::Tls(tls) => classify_tls_error("the server", &tls, &Default::default()),
        SmtpError::CleartextToken(reason) => {
            Finding::new(ConnectionVerdict::TlsFailed, reason, CLEARTEXT_TOKEN_FIX)
        }
        SmtpError::StartTlsNotOffered { .. } => Finding::new(
            ConnectionVerdict::TlsFailed,
            e.to_string(),
            "use implicit TLS (usually port 465) if the server offers it, or the server's \
             submission port with STARTTLS (Exchange Online: smtp.office365.com:587); choose \
             security `none` only on a trusted network",
        ),
        SmtpError::NoMechanism { .. } => Finding::new(
            ConnectionVerdict::MechanismNotOffered,
            e.to_string(),
            "the server must offer AUTH XOAUTH2 or OAUTHBEARER: Exchange Online \
             smtp.office365.com:587 with STARTTLS, Gmail smtp.gmail.com:587 or 465 (many servers \
             offer AUTH only after STARTTLS)",
        ),
        SmtpError::AuthFailed {
            ref reply,
            ref challenge_json,
            ..
        } => {
            let mut summary = reply.to_string();
            if let Some(json) = challenge_json {
                summary.push_str(&format!(" (challenge: {json})"));
            }
            if reply.enhanced_code() == Some("5.7.139") {
                Finding::new(
                    ConnectionVerdict::SmtpAuthDisabled,
                    summary,
                    SMTP_AUTH_DISABLED_FIX,
                )
            } else if reply.is_transient() {
                Finding::new(
                    ConnectionVerdict::ProtocolError,
                    summary,
                    "a temporary failure at the server: run the test again later",
                )
            } else {
                Finding::new(
                    ConnectionVerdict::TokenRejected,
                    summary,
                    TOKEN_REJECTED_FIX,
                )
            }
        }
        SmtpError::Connect { .. }
        | SmtpError::Io { .. }
        | SmtpError::Protocol { .. }
        | SmtpError::Refused { .. } => protocol_finding(e.to_string()),
    }
}
