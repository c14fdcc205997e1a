//! `mailbox consent|delete-token|refresh`: obtaining, dropping and refreshing a mailbox's grant.
//!
//! `consent` starts the flow the mailbox's grant type uses and shows the person what to do: the
//! user code and verification URL (with a terminal QR code of the URL) for a device code, the
//! authorization URL for a browser sign-in. Then it watches the mailbox (`GetMailbox`) until the
//! broker reports the outcome, printing progress on standard error, and ends with one status
//! line. Exit 0 only when the mailbox is ACTIVE. With `-o json` the challenge and the final
//! status are printed as one JSON object per line.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use clap::Args;
use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;
use serde::Serialize;
use tokenfleet_proto::v1 as pb;
use tonic::Code;

use super::Ctx;
use crate::args::{ConfirmArg, ScopedName};
use crate::enums::token_status_name;
use crate::error::CtlError;
use crate::output::OutputFormat;
use crate::view::{MailboxView, datetime};

/// How often the mailbox is read while waiting.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How long to wait when neither `--wait-timeout` nor an expiry says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(15 * 60);
/// Extra time after the code's expiry for the broker's last poll to land.
const EXPIRY_SLACK: Duration = Duration::from_secs(30);

/// `mailbox consent NAME`
#[derive(Debug, Clone, Args)]
pub struct ConsentArgs {
    #[command(flatten)]
    pub id: ScopedName,
    /// Finish a browser (auth-code) consent: the code, or the whole address the browser ended on
    /// (`-` reads it from standard input).
    #[arg(long, value_name = "CODE_OR_URL")]
    pub code: Option<String>,
    /// Print what to do and return at once; the broker finishes the consent in the background.
    #[arg(long, conflicts_with = "code")]
    pub no_wait: bool,
    /// Stop waiting after this many seconds (default: until the code or sign-in expires).
    #[arg(
        long,
        value_name = "SECONDS",
        conflicts_with_all = ["code", "no_wait"],
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub wait_timeout: Option<u64>,
    /// Browser consent: redirect URI registered for the app (default: the broker's
    /// `<public_url>/oauth/callback`).
    #[arg(long, value_name = "URL", conflicts_with = "code")]
    pub redirect_uri: Option<String>,
    /// Do not print a QR code of the verification URL.
    #[arg(long)]
    pub no_qr: bool,
}

/// `mailbox delete-token NAME`
#[derive(Debug, Clone, Args)]
pub struct DeleteTokenArgs {
    #[command(flatten)]
    pub id: ScopedName,
    #[command(flatten)]
    pub confirm: ConfirmArg,
}

/// `mailbox delete-token`: wipes the stored tokens (revoking them where the provider can).
pub(super) async fn run_delete_token(args: DeleteTokenArgs, ctx: &Ctx) -> Result<(), CtlError> {
    let tenant = ctx.tenant(args.id.tenant)?;
    let what = format!("delete the tokens of mailbox {tenant}/{}", args.id.name);
    ctx.confirm(&what, args.confirm.yes)?;
    let req = pb::DeleteTokenRequest {
        tenant,
        mailbox: args.id.name,
    };
    let m = ctx
        .call(|mut c| async move { c.delete_token(req).await })
        .await?;
    ctx.printer.object(&MailboxView::from(&m))
}

/// `mailbox refresh`: refreshes the access token now.
pub(super) async fn run_refresh(target: ScopedName, ctx: &Ctx) -> Result<(), CtlError> {
    let req = pb::RefreshNowRequest {
        tenant: ctx.tenant(target.tenant)?,
        mailbox: target.name,
    };
    let m = ctx
        .call(|mut c| async move { c.refresh_now(req).await })
        .await?;
    ctx.printer.object(&MailboxView::from(&m))?;
    refresh_outcome(&m)
}

/// Ok when the refresh left the mailbox ACTIVE; otherwise an error (non-zero exit) saying what
/// the status is, why, and the fix: a refresh that failed must not look like a success.
fn refresh_outcome(m: &pb::Mailbox) -> Result<(), CtlError> {
    let token = m.token.clone().unwrap_or_default();
    if token.status == pb::TokenStatus::Active as i32 {
        return Ok(());
    }
    let status = token_status_name(token.status).to_ascii_uppercase();
    Err(not_active(
        format!(
            "the refresh of mailbox {} did not succeed: {status}",
            m.name
        ),
        token.last_error.as_ref(),
    ))
}

/// The error of a command whose mailbox did not end ACTIVE: `message`, then the reason, the
/// provider's code and the fix of the grant's last error.
fn not_active(mut message: String, error: Option<&pb::TokenError>) -> CtlError {
    if let Some(e) = error {
        message.push_str(&format!(": {}", e.reason));
        if !e.code.is_empty() {
            message.push_str(&format!(" [{}]", e.code));
        }
        if !e.fix.is_empty() {
            message.push_str(&format!("; fix: {}", e.fix));
        }
    }
    CtlError::Api {
        code: Code::FailedPrecondition,
        message,
    }
}

/// `mailbox consent`.
pub(super) async fn run_consent(mut args: ConsentArgs, ctx: &Ctx) -> Result<(), CtlError> {
    let json = ctx.printer.format() == OutputFormat::Json;
    args.id.tenant = ctx.tenant(args.id.tenant)?;
    if let Some(code) = args.code {
        let code = if code == "-" {
            read_stdin_line()?
        } else {
            code
        };
        if code.trim().is_empty() {
            return Err(CtlError::usage(
                "--code is empty: give the code or the whole address the browser ended on",
            ));
        }
        let req = pb::CompleteConsentRequest {
            tenant: args.id.tenant,
            mailbox: args.id.name,
            code,
        };
        let m = ctx
            .call(|mut c| async move { c.complete_consent(req).await })
            .await?;
        return finish(&m, json);
    }

    let req = pb::StartConsentRequest {
        tenant: args.id.tenant.clone(),
        mailbox: args.id.name.clone(),
        redirect_uri: args.redirect_uri.clone().unwrap_or_default(),
    };
    let started = ctx
        .call(|mut c| async move { c.start_consent(req).await })
        .await?;
    let mailbox = started.mailbox.unwrap_or_default();
    use pb::start_consent_response::Challenge;
    let expires = match &started.challenge {
        None => return finish(&mailbox, json),
        Some(Challenge::DeviceCode(dc)) => {
            show_device_code(&mailbox, dc, json, !args.no_qr)?;
            datetime(dc.expire_time.as_ref())
        }
        Some(Challenge::Authorization(a)) => {
            show_authorization(&mailbox, a, json)?;
            datetime(a.expire_time.as_ref())
        }
    };
    if args.no_wait {
        return Ok(());
    }
    let limit = match args.wait_timeout {
        Some(seconds) => Duration::from_secs(seconds),
        None => expires
            .map(|e| {
                let left = e - time::OffsetDateTime::now_utc();
                Duration::try_from(left).unwrap_or_default() + EXPIRY_SLACK
            })
            .unwrap_or(DEFAULT_WAIT),
    };
    let m = watch(ctx, &args.id.tenant, &args.id.name, limit).await?;
    finish(&m, json)
}

/// A wire timestamp as RFC 3339 to the second (for people and for `-o json`).
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = datetime(ts)?.replace_nanosecond(0).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn read_stdin_line() -> Result<String, CtlError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CtlError::usage(format!("reading the code from standard input: {e}")))?;
    Ok(line.trim().to_owned())
}

/// The challenge as `-o json` prints it (one line).
#[derive(Debug, Serialize)]
struct ChallengeView<'a> {
    tenant: &'a str,
    mailbox: &'a str,
    address: &'a str,
    /// `device_code` or `authorization`.
    challenge: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification_uri: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect_uri: Option<&'a str>,
    expire_time: Option<String>,
}

fn show_device_code(
    m: &pb::Mailbox,
    dc: &pb::DeviceCodeChallenge,
    json: bool,
    qr: bool,
) -> Result<(), CtlError> {
    if json {
        return print_json_line(&ChallengeView {
            tenant: &m.tenant,
            mailbox: &m.name,
            address: &m.address,
            challenge: "device_code",
            user_code: Some(&dc.user_code),
            verification_uri: Some(&dc.verification_uri),
            message: Some(&dc.message),
            interval_seconds: Some(dc.interval_seconds),
            authorization_url: None,
            redirect_uri: None,
            expire_time: rfc3339(dc.expire_time.as_ref()),
        });
    }
    let mut text = format!(
        "Sign in as {} to give tokenfleet access to the mailbox:\n\n  open  {}\n  code  {}\n",
        m.address, dc.verification_uri, dc.user_code
    );
    if let Some(expires) = rfc3339(dc.expire_time.as_ref()) {
        text.push_str(&format!("\nThe code expires at {expires}.\n"));
    }
    if !dc.message.is_empty() {
        text.push_str(&format!("Provider's instructions: {}\n", dc.message));
    }
    if qr && let Some(code) = qr_text(&dc.verification_uri) {
        text.push('\n');
        text.push_str(&code);
        text.push('\n');
    }
    write_out(&text)
}

fn show_authorization(
    m: &pb::Mailbox,
    a: &pb::AuthorizationChallenge,
    json: bool,
) -> Result<(), CtlError> {
    if json {
        return print_json_line(&ChallengeView {
            tenant: &m.tenant,
            mailbox: &m.name,
            address: &m.address,
            challenge: "authorization",
            user_code: None,
            verification_uri: None,
            message: None,
            interval_seconds: None,
            authorization_url: Some(&a.authorization_url),
            redirect_uri: Some(&a.redirect_uri),
            expire_time: rfc3339(a.expire_time.as_ref()),
        });
    }
    let mut text = format!(
        "Open this address in a browser and sign in as {}:\n\n  {}\n\nThe browser is sent back to {}; if that page cannot be reached, copy the address the browser ended on and run\n\n  tokenfleetctl mailbox consent {} --tenant {} --code '<address>'\n",
        m.address, a.authorization_url, a.redirect_uri, m.name, m.tenant
    );
    if let Some(expires) = rfc3339(a.expire_time.as_ref()) {
        text.push_str(&format!("\nThe sign-in must be finished by {expires}.\n"));
    }
    write_out(&text)
}

/// A QR code of `url` drawn with Unicode half blocks (light modules drawn, for dark terminals).
pub fn qr_text(url: &str) -> Option<String> {
    let code = QrCode::new(url.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// Reads the mailbox until it leaves CONSENT_PENDING or `limit` has passed; shows progress on
/// standard error.
async fn watch(
    ctx: &Ctx,
    tenant: &str,
    name: &str,
    limit: Duration,
) -> Result<pb::Mailbox, CtlError> {
    let started = Instant::now();
    let mut progress = Progress::new();
    loop {
        let req = pb::GetMailboxRequest {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
        };
        let m = ctx
            .call(|mut c| async move { c.get_mailbox(req).await })
            .await?;
        let status = m.token.as_ref().map(|t| t.status).unwrap_or_default();
        if status != pb::TokenStatus::ConsentPending as i32 {
            progress.done();
            return Ok(m);
        }
        let elapsed = started.elapsed();
        if elapsed >= limit {
            progress.done();
            return Err(CtlError::Api {
                code: Code::DeadlineExceeded,
                message: format!(
                    "mailbox {name} is still waiting for the sign-in after {}s; the broker keeps going until the code expires (check with `tokenfleetctl mailbox show --tenant {tenant} --name {name}`)",
                    elapsed.as_secs()
                ),
            });
        }
        progress.tick(elapsed);
        tokio::time::sleep(WATCH_EVERY.min(limit - elapsed)).await;
    }
}

/// Progress on standard error: an elapsed-time line on a terminal, dots otherwise.
struct Progress {
    terminal: bool,
    shown: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    fn tick(&mut self, elapsed: Duration) {
        let mut err = std::io::stderr().lock();
        let secs = elapsed.as_secs();
        // Progress is best effort: a closed standard error must not fail the command.
        let _ = if self.terminal {
            write!(
                err,
                "\rwaiting for the sign-in… {}:{:02} elapsed",
                secs / 60,
                secs % 60
            )
        } else if self.shown {
            write!(err, ".")
        } else {
            write!(err, "waiting for the sign-in")
        };
        let _ = err.flush();
        self.shown = true;
    }

    fn done(&mut self) {
        if self.shown {
            let _ = writeln!(std::io::stderr());
            self.shown = false;
        }
    }
}

/// The final status as `-o json` prints it (one line).
#[derive(Debug, Serialize)]
struct OutcomeView {
    tenant: String,
    mailbox: String,
    address: String,
    status: String,
    fix: Option<String>,
    reason: Option<String>,
}

/// Prints the final status line; success only when the mailbox is ACTIVE.
fn finish(m: &pb::Mailbox, json: bool) -> Result<(), CtlError> {
    let token = m.token.clone().unwrap_or_default();
    let status = token_status_name(token.status).to_ascii_uppercase();
    let error = token.last_error.as_ref();
    if json {
        print_json_line(&OutcomeView {
            tenant: m.tenant.clone(),
            mailbox: m.name.clone(),
            address: m.address.clone(),
            status: status.clone(),
            reason: error.map(|e| e.reason.clone()),
            fix: error.map(|e| e.fix.clone()),
        })?;
    } else {
        write_out(&format!(
            "mailbox {} ({}, tenant {}): {status}\n",
            m.name, m.address, m.tenant
        ))?;
    }
    if token.status == pb::TokenStatus::Active as i32 {
        return Ok(());
    }
    Err(not_active(format!("mailbox {} is {status}", m.name), error))
}

fn print_json_line<T: Serialize>(value: &T) -> Result<(), CtlError> {
    let text = serde_json::to_string(value)
        .map_err(|e| CtlError::Output(format!("encoding JSON: {e}")))?;
    write_out(&format!("{text}\n"))
}

fn write_out(text: &str) -> Result<(), CtlError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CtlError::Output(format!("writing to standard output: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::commands::mailbox::MailboxCommand;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<MailboxCommand, clap::Error> {
        let cli = Cli::try_parse_from(
            ["tokenfleetctl", "mailbox"]
                .into_iter()
                .chain(args.iter().copied()),
        )?;
        match cli.command {
            Command::Mailbox(cmd) => Ok(cmd),
            other => panic!("not a mailbox command: {other:?}"),
        }
    }

    #[test]
    fn consent_takes_the_mailbox_as_argument() {
        let Ok(MailboxCommand::Consent(args)) =
            parse(&["consent", "scan", "--tenant", "acme", "--no-wait"])
        else {
            panic!("expected consent");
        };
        assert_eq!(args.id.name, "scan");
        assert_eq!(args.id.tenant, "acme");
        assert!(args.no_wait);
        assert!(args.code.is_none());
        let Ok(MailboxCommand::Consent(args)) = parse(&[
            "consent",
            "scan",
            "--tenant",
            "acme",
            "--code",
            "https://b.example/cb?code=x&state=y",
        ]) else {
            panic!("expected consent");
        };
        assert_eq!(
            args.code.as_deref(),
            Some("https://b.example/cb?code=x&state=y")
        );
    }

    #[test]
    fn contradictory_consent_flags_are_refused() {
        for args in [
            &[
                "consent",
                "scan",
                "--tenant",
                "a",
                "--code",
                "c",
                "--no-wait",
            ][..],
            &[
                "consent",
                "scan",
                "--tenant",
                "a",
                "--code",
                "c",
                "--wait-timeout",
                "5",
            ][..],
            &["consent", "--tenant", "a"][..],
        ] {
            assert!(parse(args).is_err(), "{args:?} should not parse");
        }
    }

    #[test]
    fn delete_token_and_refresh_parse() {
        assert!(matches!(
            parse(&["delete-token", "scan", "--tenant", "acme"]),
            Ok(MailboxCommand::DeleteToken(DeleteTokenArgs { id, .. })) if id.name == "scan" && id.tenant == "acme"
        ));
        assert!(matches!(
            parse(&["refresh", "scan", "--tenant", "acme"]),
            Ok(MailboxCommand::Refresh(_))
        ));
    }

    #[test]
    fn qr_codes_render_as_text() {
        let qr = qr_text("https://microsoft.com/devicelogin").unwrap();
        assert!(qr.lines().count() > 10);
        assert!(qr.contains('█') || qr.contains('▀') || qr.contains('▄'));
    }
}
