//! Connection tests beyond the SMTP/POP3/IMAP probes of [`crate::probe`]:
//!
//! - [`PeriodicTests`]: every `connection_test_interval_seconds`, each device's send profile
//!   (and its fetch profile, when it has one) is tested with the same [`ConnectionTester`] the
//!   on-demand `TestConnection` command uses; the result is stored as the device's
//!   `last_connection_test`, and a failed one makes the device DEGRADED unless mail is flowing
//!   (see [`StatusBook::record_periodic_test`]).
//! - [`test_api`]: the test of a mail API send profile (Microsoft Graph, Gmail API): `dns`,
//!   `tcp`, `tls` (certificate details, as the SMTP probe reports them), `token` (the broker
//!   gives one), then an HTTP request that sends nothing. Gmail: an authenticated
//!   `GET {base}/gmail/v1/users/{address}/profile` — the token itself is checked. Graph: an
//!   unauthenticated `GET {base}/` — reading the mailbox needs `User.Read`/`Mail.Read`, which a
//!   `Mail.Send` token does not carry, so the token is first checked at the first send; the
//!   summary says so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use tokenfleet_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::devices::{DeviceEntry, DeviceRegistry};
use super::status::StatusBook;
use super::tokens::TokenCache;
use crate::probe::{
    Finding, ProbeRun, connect_tcp, inspect_certificate, refine_tls_finding, resolve, tls_handshake,
};
use crate::upstream::Credentials;
use crate::upstream::api::{GMAIL_DEFAULT_BASE, GRAPH_DEFAULT_BASE};
use crate::upstream::tls::TlsSettings;

/// Deadline of one periodic test.
pub const PERIODIC_TEST_TIMEOUT_SECONDS: u32 = 30;

/// Periodic connection tests (see the module documentation).
pub struct PeriodicTests {
    registry: Arc<DeviceRegistry>,
    tokens: Arc<TokenCache>,
    book: Arc<StatusBook>,
    tester: Arc<dyn ConnectionTester>,
    interval: Duration,
    first_run: Duration,
    tick: Duration,
}

impl std::fmt::Debug for PeriodicTests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeriodicTests")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl PeriodicTests {
    /// Tests every device of `registry` every `interval` (the first test of a device after
    /// `min(interval, 30 s)`).
    pub fn new(
        registry: Arc<DeviceRegistry>,
        tokens: Arc<TokenCache>,
        book: Arc<StatusBook>,
        tester: Arc<dyn ConnectionTester>,
        interval: Duration,
    ) -> Self {
        Self {
            registry,
            tokens,
            book,
            tester,
            interval,
            first_run: interval.min(Duration::from_secs(30)),
            tick: Duration::from_secs(1),
        }
    }

    /// Replaces the delay of a device's first test.
    pub fn with_first_run(mut self, first_run: Duration) -> Self {
        self.first_run = first_run;
        self
    }

    /// The targets tested periodically: SEND when the device has a send profile and a fixed
    /// mailbox to send as, FETCH when it has a fetch profile and a mailbox to fetch (a device
    /// whose users sign in at the panel has no token to test with; the fetch job reports a
    /// missing fetch mailbox itself).
    pub fn targets(device: &DeviceEntry) -> Vec<pb::ConnectionTarget> {
        let mut targets = Vec::new();
        if device.spec.smtp.is_some() && device.default_mailbox().is_some() {
            targets.push(pb::ConnectionTarget::Send);
        }
        if device.spec.fetch.is_some() && super::profiles::fetch_mailbox(&device.spec).is_ok() {
            targets.push(pb::ConnectionTarget::Fetch);
        }
        targets
    }

    /// Tests `device` once (every target) and records the results.
    pub async fn test_device(&self, device: &str) {
        let Some(entry) = self.registry.device(device) else {
            return;
        };
        for target in Self::targets(&entry) {
            let command = pb::ConnectionTestCommand {
                device: device.to_owned(),
                target: target as i32,
                timeout_seconds: PERIODIC_TEST_TIMEOUT_SECONDS,
            };
            let result = self.tester.test(&entry, &command, &self.tokens).await;
            let verdict = pb::ConnectionVerdict::try_from(result.verdict).unwrap_or_default();
            if verdict == pb::ConnectionVerdict::Ok {
                tracing::debug!(
                    device,
                    target = target.as_str_name(),
                    "periodic connection test passed"
                );
            } else {
                tracing::warn!(device, target = target.as_str_name(), verdict = verdict.as_str_name(), summary = %result.summary, "periodic connection test failed");
            }
            self.book.record_periodic_test(device, result);
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut due: BTreeMap<String, Instant> = BTreeMap::new();
        let mut running: BTreeMap<String, tokio::task::Id> = BTreeMap::new();
        let mut tasks: JoinSet<String> = JoinSet::new();
        loop {
            if *stop.borrow() {
                tasks.abort_all();
                return;
            }
            let now = Instant::now();
            let set = self.registry.current();
            for name in set.devices.keys() {
                if !due.contains_key(name) {
                    // Spread the first tests of many devices over time (1 s apart).
                    let stagger = Duration::from_secs(due.len() as u64).min(self.interval);
                    due.insert(name.clone(), now + self.first_run + stagger);
                }
            }
            let gone: Vec<String> = due
                .keys()
                .filter(|n| !set.devices.contains_key(*n))
                .cloned()
                .collect();
            for name in gone {
                due.remove(&name);
                self.book.clear_periodic_tests(&name);
            }
            for (name, when) in &due {
                if *when <= now && !running.contains_key(name) {
                    let this = Arc::clone(&self);
                    let device = name.clone();
                    let handle = tasks.spawn(async move {
                        this.test_device(&device).await;
                        device
                    });
                    running.insert(name.clone(), handle.id());
                }
            }
            let wake = due
                .iter()
                .filter(|(n, _)| !running.contains_key(*n))
                .map(|(_, t)| *t)
                .chain([now + self.tick])
                .min()
                .unwrap_or(now + self.tick);
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        // The sender is gone: nobody can stop us any more, so stop now.
                        tasks.abort_all();
                        return;
                    }
                }
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let id = match &done {
                        Ok((id, _)) => *id,
                        Err(error) => error.id(),
                    };
                    let name = running
                        .iter()
                        .find(|(_, task)| **task == id)
                        .map(|(n, _)| n.clone());
                    if let Some(name) = name {
                        running.remove(&name);
                        if let Some(when) = due.get_mut(&name) {
                            *when = Instant::now() + self.interval;
                        }
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// Which mail API a send profile uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailApiKind {
    /// Microsoft Graph `sendMail`.
    Graph,
    /// Gmail API `messages.send`.
    Gmail,
}

impl MailApiKind {
    fn name(self) -> &'static str {
        match self {
            Self::Graph => "Microsoft Graph",
            Self::Gmail => "Gmail API",
        }
    }
}

fn api_finding(summary: String) -> Finding {
    Finding::new(
        pb::ConnectionVerdict::ApiError,
        summary,
        "check the profile's API base URL, the proxy/firewall between the agent and the API, and \
         the API's status page",
    )
}

/// Tests a mail API send profile (see the module documentation). `credentials` is a token of
/// the device's mailbox, or `None` with `no_token_summary` saying why the broker gave none.
pub async fn test_api(
    kind: MailApiKind,
    profile: &pb::SmtpProfile,
    credentials: Option<&Credentials>,
    no_token_summary: &str,
    deadline: Instant,
) -> pb::ConnectionTestResult {
    let default_base = match kind {
        MailApiKind::Graph => GRAPH_DEFAULT_BASE,
        MailApiKind::Gmail => GMAIL_DEFAULT_BASE,
    };
    let base_text = match profile.api_base_url.trim() {
        "" => default_base,
        b => b,
    };
    let base = url::Url::parse(base_text).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some() && !u.cannot_be_a_base()
    });
    let Some(base) = base else {
        let mut run = ProbeRun::new(pb::ConnectionTarget::Send, base_text, deadline);
        let started = Instant::now();
        run.record(
            "http",
            false,
            format!("api_base_url {base_text:?} is not an http(s) URL"),
            started,
        );
        return run.finish(Finding::new(
            pb::ConnectionVerdict::ProtocolError,
            format!("api_base_url {base_text:?} is not an http(s) URL"),
            "correct the device's API base URL in the broker (empty = the provider's public endpoint)",
        ));
    };
    let host = base
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = base.port_or_known_default().unwrap_or(443);
    let endpoint = format!("{host}:{port}");
    let mut run = ProbeRun::new(pb::ConnectionTarget::Send, endpoint.clone(), deadline);
    let tls = super::profiles::tls_settings(profile);
    let step_timeout = match profile.timeout_seconds {
        0 => Duration::from_secs(30),
        s => Duration::from_secs(u64::from(s)),
    };
    let outcome = tokio::time::timeout_at(
        deadline,
        api_steps(
            &mut run,
            kind,
            &base,
            &host,
            port,
            &tls,
            step_timeout,
            credentials,
            no_token_summary,
        ),
    )
    .await;
    match outcome {
        Ok(Ok(summary)) => run.succeed(summary),
        Ok(Err(finding)) => run.finish(finding),
        Err(_) => run.finish(crate::probe::timeout_finding(
            "the connection test",
            &endpoint,
            step_timeout,
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn api_steps(
    run: &mut ProbeRun,
    kind: MailApiKind,
    base: &url::Url,
    host: &str,
    port: u16,
    tls: &TlsSettings,
    step_timeout: Duration,
    credentials: Option<&Credentials>,
    no_token_summary: &str,
) -> Result<String, Finding> {
    let timeout = run.step_timeout(step_timeout);
    let addrs = resolve(run, host, port, timeout).await?;
    let timeout = run.step_timeout(step_timeout);
    let tcp = connect_tcp(run, &addrs, timeout).await?;
    let https = base.scheme() == "https";
    if https {
        let timeout = run.step_timeout(step_timeout);
        match tls_handshake(run, host, tcp, tls, timeout).await {
            // Only the handshake (and the certificate) is wanted from this connection.
            Ok(stream) => drop(stream),
            Err(finding) => {
                let timeout = run.step_timeout(step_timeout);
                let again = connect_tcp(run, &addrs, timeout).await;
                let timeout = run.step_timeout(step_timeout);
                let finding = match again {
                    Ok(fresh) => match inspect_certificate(host, fresh, tls, timeout).await {
                        Some(info) => {
                            let refined = refine_tls_finding(finding, &info, host, tls);
                            run.set_certificate(info);
                            refined
                        }
                        None => finding,
                    },
                    Err(_) => finding,
                };
                return Err(finding);
            }
        }
    } else {
        drop(tcp);
    }
    let started = Instant::now();
    let Some(credentials) = credentials else {
        run.record("token", false, no_token_summary, started);
        return Err(Finding::new(
            pb::ConnectionVerdict::NoToken,
            no_token_summary,
            crate::probe::fetch::NO_TOKEN_FIX,
        ));
    };
    // The agent's own check: no token in clear text to a host that is not loopback.
    if let Err(refusal) = tls.check_token_transport(
        "smtp",
        base.host_str().unwrap_or_default(),
        base.port_or_known_default().unwrap_or(443),
        base.scheme() == "https",
    ) {
        run.record("token", false, refusal.clone(), started);
        return Err(Finding::new(
            pb::ConnectionVerdict::TlsFailed,
            refusal,
            crate::probe::smtp::CLEARTEXT_TOKEN_FIX,
        ));
    }
    run.record(
        "token",
        true,
        format!("token for {}", credentials.username),
        started,
    );
    let client = http_client(tls, run.step_timeout(step_timeout)).map_err(|e| {
        Finding::new(
            pb::ConnectionVerdict::TlsFailed,
            e,
            "correct the TLS settings of the profile",
        )
    })?;
    let started = Instant::now();
    match kind {
        MailApiKind::Gmail => {
            let mut url = base.clone();
            if let Ok(mut path) = url.path_segments_mut() {
                path.pop_if_empty().extend([
                    "gmail",
                    "v1",
                    "users",
                    credentials.username.as_str(),
                    "profile",
                ]);
            }
            let mut bearer =
                HeaderValue::from_str(&format!("Bearer {}", credentials.token.expose())).map_err(
                    |_| api_finding("the token is not a valid HTTP header value".to_owned()),
                )?;
            bearer.set_sensitive(true);
            let answer = client
                .get(url.clone())
                .header(AUTHORIZATION, bearer)
                .send()
                .await;
            let response = answer.map_err(|e| {
                run.record("http", false, format!("GET {url}: {e}"), started);
                api_finding(format!("GET {url} failed: {e}"))
            })?;
            let status = response.status();
            let challenge = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(500).collect();
            let line = format!("GET {} → HTTP {}", url.path(), status.as_u16());
            if status.is_success() {
                let email = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|j| {
                        j.get("emailAddress")
                            .and_then(|e| e.as_str())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| credentials.username.clone());
                run.record("http", true, line, started);
                Ok(format!(
                    "Gmail API reachable and the token is accepted: profile of {email} read (nothing sent)"
                ))
            } else {
                run.record(
                    "http",
                    false,
                    format!("{line}: {}", one_line(&body)),
                    started,
                );
                Err(api_status_finding(kind, status, &challenge, &body))
            }
        }
        MailApiKind::Graph => {
            let url = base.clone();
            let response = client.get(url.clone()).send().await.map_err(|e| {
                run.record("http", false, format!("GET {url}: {e}"), started);
                api_finding(format!("GET {url} failed: {e}"))
            })?;
            let status = response.status();
            run.record(
                "http",
                true,
                format!("GET {} (no token) → HTTP {}", url.path(), status.as_u16()),
                started,
            );
            Ok(format!(
                "Microsoft Graph reachable at {host}:{port} (HTTP {}{}); the broker issued a \
                 token for {}, but this test does not use it: reading the mailbox needs \
                 User.Read/Mail.Read, which a Mail.Send token lacks, so the token is first \
                 checked at the first send",
                status.as_u16(),
                if https {
                    ", TLS verified"
                } else {
                    ", plain HTTP"
                },
                credentials.username
            ))
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn api_status_finding(
    kind: MailApiKind,
    status: StatusCode,
    challenge: &str,
    body: &str,
) -> Finding {
    let mut summary = format!("{} answered HTTP {}", kind.name(), status.as_u16());
    if !challenge.is_empty() {
        summary.push_str(&format!(" (WWW-Authenticate: {challenge})"));
    }
    if !body.is_empty() {
        summary.push_str(&format!(": {}", one_line(body)));
    }
    match status.as_u16() {
        401 => Finding::new(
            pb::ConnectionVerdict::TokenRejected,
            summary,
            "the API refused the token: check the mailbox's grant and scope (Gmail: \
             https://mail.google.com/ or gmail.send plus a read scope; Graph: Mail.Send) and \
             re-consent",
        ),
        403 => Finding::new(
            pb::ConnectionVerdict::ApiError,
            summary,
            "the token lacks a permission for this mailbox: check the scopes granted and, for a \
             service account, its domain-wide delegation",
        ),
        _ => api_finding(summary),
    }
}

fn http_client(tls: &TlsSettings, timeout: Duration) -> Result<reqwest::Client, String> {
    let config = tls.client_config().map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(Arc::unwrap_or_clone(config))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .user_agent(concat!("tokenfleet-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the HTTP client failed: {e}"))
}

/// Runs a connection test for a device (the `TestConnection` command).
#[async_trait::async_trait]
pub trait ConnectionTester: Send + Sync + 'static {
    /// Tests `device` as `command` asks, with tokens from `tokens`.
    async fn test(
        &self,
        device: &DeviceEntry,
        command: &pb::ConnectionTestCommand,
        tokens: &TokenCache,
    ) -> pb::ConnectionTestResult;
}

/// A [`ConnectionTester`] that counts every verdict of the one it wraps (on-demand and periodic
/// tests go through the same tester).
pub struct CountedTests {
    inner: Arc<dyn ConnectionTester>,
    metrics: crate::metrics::AgentMetrics,
}

impl CountedTests {
    /// `inner`, its verdicts counted into `metrics`.
    pub fn wrap(
        inner: Arc<dyn ConnectionTester>,
        metrics: crate::metrics::AgentMetrics,
    ) -> Arc<dyn ConnectionTester> {
        Arc::new(Self { inner, metrics })
    }
}

impl std::fmt::Debug for CountedTests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedTests").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ConnectionTester for CountedTests {
    async fn test(
        &self,
        device: &DeviceEntry,
        command: &pb::ConnectionTestCommand,
        tokens: &TokenCache,
    ) -> pb::ConnectionTestResult {
        let result = self.inner.test(device, command, tokens).await;
        self.metrics.connection_test(
            pb::ConnectionTarget::try_from(command.target).unwrap_or_default(),
            pb::ConnectionVerdict::try_from(result.verdict).unwrap_or_default(),
        );
        result
    }
}

/// The answer to a connection test command while the build has no connection tests.
pub const NO_CONNECTION_TESTS: &str = "connection tests not available in this build";

/// The connection tester of this build: the probes of [`crate::probe`] for SMTP send profiles
/// and POP3/IMAP fetch profiles, and [`test_api`] for Graph/Gmail API send
/// profiles.
pub fn connection_tester() -> Option<Arc<dyn ConnectionTester>> {
    Some(Arc::new(ProbeTester))
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
impl ConnectionTester for ProbeTester {
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
            super::profiles::fetch_mailbox(&device.spec)
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
                match super::profiles::fetch_settings(
                    &device.spec.fetch.clone().unwrap_or_default(),
                ) {
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
                        test_api(
                            MailApiKind::Graph,
                            &profile,
                            credentials.as_ref(),
                            &no_token,
                            deadline,
                        )
                        .await
                    }
                    pb::SendMethod::GmailApi => {
                        test_api(
                            MailApiKind::Gmail,
                            &profile,
                            credentials.as_ref(),
                            &no_token,
                            deadline,
                        )
                        .await
                    }
                    _ => match super::profiles::smtp_settings(&profile) {
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
