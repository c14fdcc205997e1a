//! `fleet status` (every device's last reported health, problems first) and `device test` (a
//! connection test run by the device's agent).
//!
//! JSON shapes follow [`crate::view`]'s rules: proto field names, lower-case enum value names
//! without their prefix, RFC 3339 timestamps or `null`. `fleet status -o json` prints an array of
//! devices (like every list); `device test -o json` prints the result object.
//!
//! Exit codes: `device test` exits 0 only when the verdict is `ok`, 1 for any other verdict (the
//! result is printed either way), like a refused request.

use std::fmt::Write as _;
use std::io::IsTerminal as _;

use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;
use time::OffsetDateTime;
use tokenfleet_proto::v1 as pb;

use super::Ctx;
use crate::args::ScopedName;
use crate::error::CtlError;
use crate::output::{Listed, OutputFormat, Printer};
use crate::view::{datetime, rfc3339};

/// Longest connection test the broker runs (`TestConnectionRequest.timeout_seconds`).
pub const MAX_TEST_SECONDS: u64 = 120;
/// Time the call to the broker gets beyond the test's own deadline.
const CALL_MARGIN_SECONDS: u64 = 15;

/// `fleet …`
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Health of every device you may see, problems first (FAILING, UNKNOWN, DEGRADED, OK).
    Status {
        /// Only this tenant (default: every tenant the API key may see).
        #[arg(long, value_name = "TENANT")]
        tenant: Option<String>,
        /// Show the status again every --interval seconds until interrupted (Ctrl-C).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Seconds between two renderings of --watch.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 2,
            requires = "watch",
            value_parser = clap::value_parser!(u64).range(1..=3600)
        )]
        interval: u64,
    },
}

/// `device test`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "The global --timeout is the test's deadline here (1-120 seconds, \
default 30). Exit code 0 when the verdict is ok, 1 otherwise."
)]
pub struct DeviceTestArgs {
    #[command(flatten)]
    pub id: ScopedName,
    /// Which upstream connection to test.
    #[arg(long, value_enum, default_value_t = TestTarget::Send)]
    pub target: TestTarget,
}

/// `--target`
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TestTarget {
    /// The send profile (SMTP submission or mail API).
    Send,
    /// The fetch profile (POP3/IMAP).
    Fetch,
}

impl TestTarget {
    fn wire(self) -> pb::ConnectionTarget {
        match self {
            TestTarget::Send => pb::ConnectionTarget::Send,
            TestTarget::Fetch => pb::ConnectionTarget::Fetch,
        }
    }
}

/// Runs `fleet …`.
pub async fn run(cmd: FleetCommand, ctx: &Ctx) -> Result<(), CtlError> {
    match cmd {
        FleetCommand::Status {
            tenant,
            watch,
            interval,
        } => {
            let tenant = tenant.unwrap_or_default();
            if !watch {
                return show_status(ctx, &tenant).await;
            }
            // Until interrupted: Ctrl-C ends the process like any other command.
            let every = std::time::Duration::from_secs(interval);
            let on_terminal = std::io::stdout().is_terminal();
            loop {
                let now = OffsetDateTime::now_utc()
                    .replace_nanosecond(0)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                let header = format!("Every {interval}s: fleet status at {now} (Ctrl-C to stop)");
                if !ctx.printer.format().is_structured() {
                    // A terminal is redrawn in place; a pipe gets one block after the other.
                    let clear = if on_terminal { "\x1b[H\x1b[2J" } else { "" };
                    Printer::raw(format!("{clear}{header}\n").as_bytes())?;
                }
                show_status(ctx, &tenant).await?;
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// One rendering of `fleet status`.
async fn show_status(ctx: &Ctx, tenant: &str) -> Result<(), CtlError> {
    let req = pb::GetFleetStatusRequest {
        tenant: tenant.to_owned(),
    };
    let response = ctx
        .call(|mut c| async move { c.get_fleet_status(req).await })
        .await?;
    let now = OffsetDateTime::now_utc();
    let views: Vec<FleetDeviceView> = response
        .devices
        .iter()
        .map(|d| FleetDeviceView::new(d, now))
        .collect();
    ctx.printer.list_across_tenants(&views)
}

/// Runs `device test`.
pub(super) async fn run_test(mut args: DeviceTestArgs, ctx: &Ctx) -> Result<(), CtlError> {
    args.id.tenant = ctx.tenant(args.id.tenant)?;
    let req = test_request(&args, ctx.settings.timeout)?;
    // The test may take its whole deadline; the call needs a little longer than that.
    let mut settings = ctx.settings.clone();
    settings.timeout += CALL_MARGIN_SECONDS;
    let broker = ctx.connect(&settings).await?;
    let result = broker
        .call(|mut c| async move { c.test_connection(req).await })
        .await?;
    let view = ConnectionTestView::from(&result);
    match ctx.printer.format() {
        OutputFormat::Table | OutputFormat::Wide => Printer::raw(render_test(&view).as_bytes())?,
        _ => ctx.printer.object(&view)?,
    }
    verdict_exit(&view)
}

/// The request for `args`; `--timeout` above the broker's limit is a usage error.
fn test_request(
    args: &DeviceTestArgs,
    timeout: u64,
) -> Result<pb::TestConnectionRequest, CtlError> {
    if !(1..=MAX_TEST_SECONDS).contains(&timeout) {
        return Err(CtlError::usage(format!(
            "--timeout {timeout}: a connection test takes at most {MAX_TEST_SECONDS} seconds"
        )));
    }
    Ok(pb::TestConnectionRequest {
        tenant: args.id.tenant.clone(),
        device: args.id.name.clone(),
        target: args.target.wire() as i32,
        // In range: checked above.
        timeout_seconds: u32::try_from(timeout).unwrap_or(30),
    })
}

/// Ok for the verdict `ok`; otherwise an error (exit code 1) naming the verdict.
fn verdict_exit(view: &ConnectionTestView) -> Result<(), CtlError> {
    if view.verdict == "ok" {
        return Ok(());
    }
    Err(CtlError::Api {
        code: tonic::Code::FailedPrecondition,
        message: format!(
            "connection test of device `{}` failed: {}",
            view.device, view.verdict
        ),
    })
}

/// Output name of a wire enum value: the value name without `prefix`, lower-case.
fn wire_name(name: Option<&'static str>, prefix: &str) -> String {
    match name {
        Some(full) => full
            .strip_prefix(prefix)
            .unwrap_or(full)
            .to_ascii_lowercase(),
        None => "unknown".to_owned(),
    }
}

fn health_name(value: i32) -> String {
    wire_name(
        pb::DeviceHealth::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "DEVICE_HEALTH_",
    )
}

fn verdict_name(value: i32) -> String {
    wire_name(
        pb::ConnectionVerdict::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "CONNECTION_VERDICT_",
    )
}

fn target_name(value: i32) -> String {
    wire_name(
        pb::ConnectionTarget::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "CONNECTION_TARGET_",
    )
}

fn token_status_name(value: i32) -> String {
    wire_name(
        pb::TokenStatus::try_from(value)
            .ok()
            .map(|v| v.as_str_name()),
        "TOKEN_STATUS_",
    )
}

/// `45s`, `4m 10s`, `3h 5m`, `2d 4h`.
fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

// ---------------------------------------------------------------------------------------------
// Views

/// One device of `fleet status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetDeviceView {
    pub tenant: String,
    pub device: String,
    pub agent: String,
    pub agent_connected: bool,
    pub last_report_time: Option<String>,
    pub health: String,
    pub problem: String,
    pub status: Option<DeviceStatusView>,
    pub agent_software_version: String,
    /// The broker's own status of each mailbox's grant (what health and problem go by).
    pub grants: Vec<MailboxGrantView>,
    /// Seconds since the last report when it was printed (not in the API; `null` if never).
    #[serde(skip)]
    report_age: Option<i64>,
}

impl FleetDeviceView {
    fn new(d: &pb::FleetDeviceStatus, now: OffsetDateTime) -> Self {
        Self {
            tenant: d.tenant.clone(),
            device: d.device.clone(),
            agent: d.agent.clone(),
            agent_connected: d.agent_connected,
            last_report_time: rfc3339(d.last_report_time.as_ref()),
            health: health_name(d.health),
            problem: d.problem.clone(),
            status: d.status.as_ref().map(DeviceStatusView::from),
            agent_software_version: d.agent_software_version.clone(),
            grants: d.grants.iter().map(MailboxGrantView::from).collect(),
            report_age: datetime(d.last_report_time.as_ref()).map(|t| (now - t).whole_seconds()),
        }
    }
}

impl Listed for FleetDeviceView {
    fn name(&self) -> String {
        self.device.clone()
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
    const PLURAL: &'static str = "devices";
    fn columns() -> &'static [&'static str] {
        &[
            "DEVICE",
            "AGENT",
            "HEALTH",
            "QUEUE",
            "OLDEST",
            "LAST-REPORT",
            "PROBLEM",
        ]
    }
    fn row(&self) -> Vec<String> {
        let dash = || "-".to_owned();
        let agent = match (self.agent.as_str(), self.agent_connected) {
            ("", _) => dash(),
            (a, true) => a.to_owned(),
            (a, false) => format!("{a} (offline)"),
        };
        let (queue, oldest) = match &self.status {
            Some(s) => (
                s.queue_depth.to_string(),
                if s.oldest_queued_seconds == 0 {
                    dash()
                } else {
                    age(i64::try_from(s.oldest_queued_seconds).unwrap_or(i64::MAX))
                },
            ),
            None => (dash(), dash()),
        };
        vec![
            self.device.clone(),
            agent,
            self.health.to_ascii_uppercase(),
            queue,
            oldest,
            self.report_age
                .map_or_else(|| "never".to_owned(), |s| format!("{} ago", age(s))),
            if self.problem.is_empty() {
                dash()
            } else {
                self.problem.clone()
            },
        ]
    }
}

/// What an agent reported about one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatusView {
    pub device: String,
    pub health: String,
    pub problem: String,
    pub tokens: Vec<MailboxTokenView>,
    pub last_delivery: Option<DeliveryView>,
    pub queue_depth: u32,
    pub oldest_queued_seconds: u64,
    pub delivered_total: u64,
    pub failed_total: u64,
    pub dead_lettered_total: u64,
    pub duplicates_total: u64,
    pub last_connection_test: Option<ConnectionTestView>,
    pub fetched_total: u64,
    pub maildrop_depth: u32,
}

impl From<&pb::DeviceStatus> for DeviceStatusView {
    fn from(s: &pb::DeviceStatus) -> Self {
        Self {
            device: s.device.clone(),
            health: health_name(s.health),
            problem: s.problem.clone(),
            tokens: s.tokens.iter().map(MailboxTokenView::from).collect(),
            last_delivery: s.last_delivery.as_ref().map(DeliveryView::from),
            queue_depth: s.queue_depth,
            oldest_queued_seconds: s.oldest_queued_seconds,
            delivered_total: s.delivered_total,
            failed_total: s.failed_total,
            dead_lettered_total: s.dead_lettered_total,
            duplicates_total: s.duplicates_total,
            last_connection_test: s
                .last_connection_test
                .as_ref()
                .map(ConnectionTestView::from),
            fetched_total: s.fetched_total,
            maildrop_depth: s.maildrop_depth,
        }
    }
}

/// A mailbox token as the agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MailboxTokenView {
    pub mailbox: String,
    /// What the token is for (`send`, `pop`, `imap`): the agent keeps one per mailbox and purpose.
    pub purpose: String,
    pub status: String,
    pub expire_time: Option<String>,
    pub error: String,
}

impl From<&pb::MailboxTokenView> for MailboxTokenView {
    fn from(t: &pb::MailboxTokenView) -> Self {
        Self {
            mailbox: t.mailbox.clone(),
            purpose: wire_name(
                pb::MailPurpose::try_from(t.purpose)
                    .ok()
                    .map(|v| v.as_str_name()),
                "MAIL_PURPOSE_",
            ),
            status: token_status_name(t.status),
            expire_time: rfc3339(t.expire_time.as_ref()),
            error: t.error.clone(),
        }
    }
}

/// A mailbox's grant as the broker holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MailboxGrantView {
    pub mailbox: String,
    pub address: String,
    pub status: String,
    pub problem: String,
}

impl From<&pb::FleetMailboxGrant> for MailboxGrantView {
    fn from(g: &pb::FleetMailboxGrant) -> Self {
        Self {
            mailbox: g.mailbox.clone(),
            address: g.address.clone(),
            status: token_status_name(g.status),
            problem: g.problem.clone(),
        }
    }
}

/// The last delivery attempt of a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryView {
    pub time: Option<String>,
    pub ok: bool,
    pub final_reply: String,
    pub auth_challenge_json: String,
    pub message_id: String,
    pub outcome: String,
    pub mailbox: String,
}

impl From<&pb::DeliveryResult> for DeliveryView {
    fn from(d: &pb::DeliveryResult) -> Self {
        Self {
            time: rfc3339(d.time.as_ref()),
            ok: d.ok,
            final_reply: d.final_reply.clone(),
            auth_challenge_json: d.auth_challenge_json.clone(),
            message_id: d.message_id.clone(),
            outcome: d.outcome.clone(),
            mailbox: d.mailbox.clone(),
        }
    }
}

/// A connection test result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionTestView {
    pub device: String,
    pub target: String,
    pub verdict: String,
    pub summary: String,
    pub fix: String,
    pub steps: Vec<TestStepView>,
    pub certificate: Option<CertificateView>,
    pub time: Option<String>,
    pub endpoint: String,
}

impl From<&pb::ConnectionTestResult> for ConnectionTestView {
    fn from(r: &pb::ConnectionTestResult) -> Self {
        Self {
            device: r.device.clone(),
            target: target_name(r.target),
            verdict: verdict_name(r.verdict),
            summary: r.summary.clone(),
            fix: r.fix.clone(),
            steps: r.steps.iter().map(TestStepView::from).collect(),
            certificate: r.certificate.as_ref().map(CertificateView::from),
            time: rfc3339(r.time.as_ref()),
            endpoint: r.endpoint.clone(),
        }
    }
}

/// One step of a connection test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestStepView {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub duration_ms: u32,
}

impl From<&pb::ConnectionTestStep> for TestStepView {
    fn from(s: &pb::ConnectionTestStep) -> Self {
        Self {
            name: s.name.clone(),
            ok: s.ok,
            detail: s.detail.clone(),
            duration_ms: s.duration_ms,
        }
    }
}

/// The server certificate seen by a connection test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertificateView {
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub sha256_fingerprint: String,
    pub tls_version: String,
    pub cipher_suite: String,
}

impl From<&pb::CertificateInfo> for CertificateView {
    fn from(c: &pb::CertificateInfo) -> Self {
        Self {
            subject: c.subject.clone(),
            issuer: c.issuer.clone(),
            dns_names: c.dns_names.clone(),
            not_before: rfc3339(c.not_before.as_ref()),
            not_after: rfc3339(c.not_after.as_ref()),
            sha256_fingerprint: c.sha256_fingerprint.clone(),
            tls_version: c.tls_version.clone(),
            cipher_suite: c.cipher_suite.clone(),
        }
    }
}

/// The human-readable result of `device test`.
fn render_test(view: &ConnectionTestView) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: &str| {
        if !value.is_empty() {
            let _ = writeln!(out, "{label:<12} {value}");
        }
    };
    line("verdict:", &view.verdict.to_ascii_uppercase());
    line("device:", &view.device);
    line("target:", &view.target);
    line("endpoint:", &view.endpoint);
    line("summary:", &view.summary);
    line("fix:", &view.fix);
    line("time:", view.time.as_deref().unwrap_or(""));
    if !view.steps.is_empty() {
        let mut table = Table::new();
        table
            .load_preset(presets::UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(["STEP", "OK", "MS", "DETAIL"]);
        for s in &view.steps {
            table.add_row([
                s.name.clone(),
                if s.ok { "yes" } else { "no" }.to_owned(),
                s.duration_ms.to_string(),
                s.detail.clone(),
            ]);
        }
        let _ = writeln!(out, "steps:\n{table}");
    }
    if let Some(c) = &view.certificate {
        let _ = writeln!(out, "certificate:");
        let mut cert = |label: &str, value: &str| {
            if !value.is_empty() {
                let _ = writeln!(out, "  {label:<12} {value}");
            }
        };
        cert("subject:", &c.subject);
        cert("issuer:", &c.issuer);
        cert("dns names:", &c.dns_names.join(", "));
        cert("not before:", c.not_before.as_deref().unwrap_or(""));
        cert("not after:", c.not_after.as_deref().unwrap_or(""));
        cert("sha256:", &c.sha256_fingerprint);
        cert("tls:", &c.tls_version);
        cert("cipher:", &c.cipher_suite);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(verdict: pb::ConnectionVerdict) -> pb::ConnectionTestResult {
        pb::ConnectionTestResult {
            device: "mfp".into(),
            target: pb::ConnectionTarget::Send as i32,
            verdict: verdict as i32,
            summary: "535 5.7.139 SmtpClientAuthentication is disabled".into(),
            fix: "Set-CASMailbox -SmtpClientAuthenticationDisabled $false".into(),
            steps: vec![pb::ConnectionTestStep {
                name: "auth".into(),
                ok: false,
                detail: "535 5.7.139".into(),
                duration_ms: 12,
            }],
            certificate: Some(pb::CertificateInfo {
                subject: "CN=outlook.office365.com".into(),
                dns_names: vec!["smtp.office365.com".into()],
                tls_version: "TLSv1.3".into(),
                ..Default::default()
            }),
            time: None,
            endpoint: "smtp.office365.com:587".into(),
        }
    }

    #[test]
    fn a_test_result_reads_well_and_only_ok_exits_zero() {
        let failed = ConnectionTestView::from(&result(pb::ConnectionVerdict::SmtpAuthDisabled));
        assert_eq!(failed.verdict, "smtp_auth_disabled");
        assert_eq!(failed.target, "send");
        let text = render_test(&failed);
        assert!(
            text.starts_with("verdict:     SMTP_AUTH_DISABLED\n"),
            "{text}"
        );
        for part in [
            "5.7.139",
            "Set-CASMailbox",
            "auth",
            "TLSv1.3",
            "smtp.office365.com:587",
        ] {
            assert!(text.contains(part), "{part} missing in {text}");
        }
        let err = verdict_exit(&failed).unwrap_err();
        assert_eq!(err.exit_code(), crate::error::EXIT_API);
        assert!(err.to_string().contains("smtp_auth_disabled"));

        let ok = ConnectionTestView::from(&result(pb::ConnectionVerdict::Ok));
        assert!(verdict_exit(&ok).is_ok());
    }

    #[test]
    fn test_timeouts_are_checked_locally() {
        let args = DeviceTestArgs {
            id: ScopedName {
                tenant: "acme".into(),
                name: "mfp".into(),
            },
            target: TestTarget::Fetch,
        };
        let req = test_request(&args, 30).unwrap();
        assert_eq!(req.timeout_seconds, 30);
        assert_eq!(req.target, pb::ConnectionTarget::Fetch as i32);
        let err = test_request(&args, 121).unwrap_err();
        assert_eq!(err.exit_code(), crate::error::EXIT_USAGE);
        assert!(err.to_string().contains("--timeout 121"));
    }

    #[test]
    fn fleet_rows_show_problems_and_ages() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1);
        let d = pb::FleetDeviceStatus {
            tenant: "acme".into(),
            device: "mfp".into(),
            agent: "site-a".into(),
            agent_connected: false,
            last_report_time: Some(prost_types::Timestamp {
                seconds: 3600 - 250,
                nanos: 0,
            }),
            health: pb::DeviceHealth::Unknown as i32,
            problem: "agent \"site-a\" not seen for 4m 10s".into(),
            status: Some(pb::DeviceStatus {
                queue_depth: 3,
                oldest_queued_seconds: 75,
                ..Default::default()
            }),
            agent_software_version: "1.0".into(),
            grants: Vec::new(),
        };
        let view = FleetDeviceView::new(&d, now);
        assert_eq!(
            view.row(),
            vec![
                "mfp",
                "site-a (offline)",
                "UNKNOWN",
                "3",
                "1m 15s",
                "4m 10s ago",
                "agent \"site-a\" not seen for 4m 10s",
            ]
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["health"], "unknown");
        assert_eq!(json["status"]["queue_depth"], 3);
        assert!(json.get("report_age").is_none());
    }
}
