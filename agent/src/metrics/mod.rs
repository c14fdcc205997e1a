//! The agent's Prometheus metrics and its health, served on a listener of their own
//! (`[metrics] listen`, see [`server`]): `GET /metrics` and `GET /healthz`.
//!
//! [`AgentMetrics`] is one handle (cheap to clone) that the composition root
//! (`runtime::wiring`) creates and hands to the parts where things happen: the ingress counts a
//! message once it is fsynced in the spool, the delivery worker counts deliveries, deferrals and
//! dead letters, the fetch scheduler its runs, the token cache its requests to the broker, the
//! connection tester its verdicts, the SMTP and POP3 servers their logins, and every listener
//! (`line_server`) the connections its limits closed. What is a state rather than an event —
//! queue depth and age, spool disk use, the process's CPU, memory and file descriptors — is read
//! when scraped.
//!
//! Names follow Prometheus conventions (`tokenfleet_agent_…_total`, `_seconds`, `_bytes`; the
//! process series use the names every Prometheus client library uses, `process_…`). Labels
//! are only ever one of a fixed, small set of values (`kind`, `result`, `target`, `verdict`):
//! never a tenant, mailbox, device or address, so the agent's series stay as few as its code
//! paths.
//!
//! Depends on [`crate::spool`] (read at scrape time), [`crate::line_server`] (what its caps
//! close) and general crates; nothing here knows the runtime that feeds it.

mod exposition;
mod health;
mod process;
pub mod server;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokenfleet_proto::v1 as pb;

use crate::line_server;
use crate::spool::Spool;

pub use exposition::Format;
pub use health::Health;
pub use server::MetricsLimits;

/// An enum whose variants are the only values a label may take.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value (each series exists from the start, at 0).
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }
    };
}

label_values! {
    /// Why a message was put back in the queue with a later attempt time.
    Deferral {
        /// The upstream answered 4xx, or could not be reached.
        Upstream => "upstream",
        /// The upstream refused the token (twice: the second after a fresh one).
        AuthRejected => "auth_rejected",
        /// The broker gave no token yet (consent pending, refresh failing, broker unreachable).
        NoToken => "no_token",
        /// The device's send profile or sender mode is unusable.
        Misconfigured => "misconfigured",
        /// The device is not in the configuration the agent runs.
        UnknownDevice => "unknown_device",
    }
}

label_values! {
    /// Why a message was dead-lettered.
    DeadLetter {
        /// The upstream refused it for good (5xx).
        Permanent => "permanent",
        /// Too old, or too many attempts.
        Expired => "expired",
        /// The broker will never give this device a token for the mailbox.
        TokenDenied => "token_denied",
    }
}

label_values! {
    /// How one fetch run of a device ended.
    FetchResult {
        /// Fetched (possibly nothing).
        Ok => "ok",
        /// Network error or a temporary server answer: retried after a backoff.
        Transient => "transient",
        /// The server refused the token (twice).
        AuthRejected => "auth_rejected",
        /// The server refused for good.
        Permanent => "permanent",
        /// The broker gave no token.
        NoToken => "no_token",
        /// The fetch profile or the mailbox to fetch is unusable.
        Misconfigured => "misconfigured",
    }
}

label_values! {
    /// The broker's answer to a token request (`IssueAccessToken`).
    TokenResult {
        /// A token.
        Ok => "ok",
        /// A person must consent first.
        ConsentRequired => "consent_required",
        /// The broker could not be reached.
        Unreachable => "unreachable",
        /// The broker could not refresh the token just now.
        RefreshFailing => "refresh_failing",
        /// The mailbox has no usable grant (re-consent needed, disabled, …).
        NoGrant => "no_grant",
        /// The device may never have this token.
        Denied => "denied",
        /// The agent asked too often.
        RateLimited => "rate_limited",
    }
}

label_values! {
    /// A listener whose limits close connections (the `listener` label).
    Listener {
        /// The SMTP ingress.
        Smtp => "smtp",
        /// The POP3 server.
        Pop3 => "pop3",
        /// The metrics listener.
        Metrics => "metrics",
    }
}

/// The `reason` label of a connection a listener's caps closed.
fn closed_reason(closed: line_server::Closed) -> &'static str {
    match closed {
        line_server::Closed::MadeRoom => "made_room",
        line_server::Closed::Refused(line_server::Refusal::Total) => "refused",
        line_server::Closed::Refused(line_server::Refusal::PerSource) => "refused_per_source",
    }
}

label_values! {
    /// How a device's login to the SMTP ingress or the POP3 server ended (the `result` label).
    Login {
        /// Accepted.
        Ok => "ok",
        /// Wrong user name or password.
        Failed => "failed",
        /// Refused unchecked: the source or the user name is locked out after failures.
        LockedOut => "locked_out",
    }
}

label_values! {
    /// A server devices log in to (the `protocol` label).
    LoginProtocol {
        /// SMTP `AUTH`.
        Smtp => "smtp",
        /// POP3 `USER`/`PASS` or `AUTH`.
        Pop3 => "pop3",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabels {
    protocol: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TestLabels {
    target: &'static str,
    verdict: &'static str,
}

struct Inner {
    registry: Registry,
    accepted: Counter,
    delivered: Counter,
    deferred: Family<KindLabel, Counter>,
    dead_lettered: Family<KindLabel, Counter>,
    fetch_runs: Family<ResultLabel, Counter>,
    fetched: Counter,
    token_requests: Family<ResultLabel, Counter>,
    connection_tests: Family<TestLabels, Counter>,
    connections_closed: Family<ClosedLabels, Counter>,
    logins: Family<LoginLabels, Counter>,
}

/// The agent's metrics (see the module documentation). Cheap to clone: clones count into the
/// same series.
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    /// Metrics without a spool (its series are left out); what parts built without the
    /// composition root count into, which nobody reads.
    fn default() -> Self {
        Self::new(None)
    }
}

/// Builds a family whose label values are `values`, each series created at 0.
fn family<L, V>(values: &[V], label: impl Fn(V) -> L) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + fmt::Debug + Send + Sync + 'static,
    V: Copy,
{
    let family = Family::<L, Counter>::default();
    for value in values {
        drop(family.get_or_create(&label(*value)));
    }
    family
}

/// Builds a family with two labels whose values are `firsts` and `seconds`, every combination
/// created at 0.
fn pairs<L, A, B>(firsts: &[A], seconds: &[B], label: impl Fn(A, B) -> L) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + fmt::Debug + Send + Sync + 'static,
    A: Copy,
    B: Copy,
{
    let family = Family::<L, Counter>::default();
    for first in firsts {
        for second in seconds {
            drop(family.get_or_create(&label(*first, *second)));
        }
    }
    family
}

impl AgentMetrics {
    /// Every series registered; the queue and disk series read `spool` when scraped.
    pub fn new(spool: Option<Arc<Spool>>) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "tokenfleet_agent_build",
            "Version of the running agent",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let accepted = Counter::default();
        registry.register(
            "tokenfleet_agent_messages_accepted",
            "Messages accepted from devices (in the spool and fsynced before the 250 reply)",
            accepted.clone(),
        );
        let delivered = Counter::default();
        registry.register(
            "tokenfleet_agent_messages_delivered",
            "Messages the upstream accepted",
            delivered.clone(),
        );
        let deferred = family(Deferral::ALL, |d| KindLabel { kind: d.as_str() });
        registry.register(
            "tokenfleet_agent_messages_deferred",
            "Delivery attempts that ended with a retry scheduled, by kind",
            deferred.clone(),
        );
        let dead_lettered = family(DeadLetter::ALL, |d| KindLabel { kind: d.as_str() });
        registry.register(
            "tokenfleet_agent_messages_dead_lettered",
            "Messages moved to the dead letters, by kind",
            dead_lettered.clone(),
        );
        let fetch_runs = family(FetchResult::ALL, |r| ResultLabel { result: r.as_str() });
        registry.register(
            "tokenfleet_agent_fetch_runs",
            "Fetch runs (POP3/IMAP into the local maildrop), by result",
            fetch_runs.clone(),
        );
        let fetched = Counter::default();
        registry.register(
            "tokenfleet_agent_fetched_messages",
            "Messages fetched into the local maildrop",
            fetched.clone(),
        );
        let token_requests = family(TokenResult::ALL, |r| ResultLabel { result: r.as_str() });
        registry.register(
            "tokenfleet_agent_token_requests",
            "Access-token requests to the broker, by result",
            token_requests.clone(),
        );
        let connection_tests = Family::<TestLabels, Counter>::default();
        registry.register(
            "tokenfleet_agent_connection_tests",
            "Connection tests (on demand and periodic), by target and verdict",
            connection_tests.clone(),
        );
        let connections_closed = pairs(Listener::ALL, &line_server::Closed::ALL, |l, c| {
            ClosedLabels {
                listener: l.as_str(),
                reason: closed_reason(c),
            }
        });
        registry.register(
            "tokenfleet_agent_connections_closed",
            "Connections a listener's limits closed, by listener and reason (made_room: waited \
             unserved and closed for a new one; refused: new, every slot serving; \
             refused_per_source: new, over its address's cap)",
            connections_closed.clone(),
        );
        let logins = pairs(LoginProtocol::ALL, Login::ALL, |p, r| LoginLabels {
            protocol: p.as_str(),
            result: r.as_str(),
        });
        registry.register(
            "tokenfleet_agent_ingress_logins",
            "Device logins to the SMTP ingress and the POP3 server, by protocol and result",
            logins.clone(),
        );
        if let Some(spool) = spool {
            registry.register_collector(Box::new(SpoolCollector { spool }));
        }
        registry.register_collector(Box::new(process::ProcessCollector));
        Self {
            inner: Arc::new(Inner {
                registry,
                accepted,
                delivered,
                deferred,
                dead_lettered,
                fetch_runs,
                fetched,
                token_requests,
                connection_tests,
                connections_closed,
                logins,
            }),
        }
    }

    /// Every series in `format`. Reads the spool directory and `/proc`: call it from blocking
    /// code.
    pub fn encode(&self, format: Format) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(match format {
            Format::OpenMetrics => text,
            Format::Prometheus => exposition::prometheus_text(&text),
        })
    }

    /// A message is in the spool (fsynced); the device is told `250`.
    pub fn message_accepted(&self) {
        self.inner.accepted.inc();
    }

    /// The upstream accepted a message.
    pub fn message_delivered(&self) {
        self.inner.delivered.inc();
    }

    /// A message's next attempt was scheduled.
    pub fn message_deferred(&self, kind: Deferral) {
        self.inner
            .deferred
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// A message was dead-lettered.
    pub fn message_dead_lettered(&self, kind: DeadLetter) {
        self.inner
            .dead_lettered
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// A fetch run ended with `result` after storing `fetched` messages.
    pub fn fetch_run(&self, result: FetchResult, fetched: u64) {
        self.inner
            .fetch_runs
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
        self.inner.fetched.inc_by(fetched);
    }

    /// What a [`crate::line_server::Gate`] of `listener` tells of the connections it closed,
    /// counted here.
    pub fn closed_by(&self, listener: Listener) -> Box<dyn Fn(line_server::Closed) + Send + Sync> {
        let metrics = self.clone();
        Box::new(move |closed| {
            metrics
                .inner
                .connections_closed
                .get_or_create(&ClosedLabels {
                    listener: listener.as_str(),
                    reason: closed_reason(closed),
                })
                .inc();
        })
    }

    /// A device's login over `protocol` ended with `result`.
    pub fn login(&self, protocol: LoginProtocol, result: Login) {
        self.inner
            .logins
            .get_or_create(&LoginLabels {
                protocol: protocol.as_str(),
                result: result.as_str(),
            })
            .inc();
    }

    /// The broker answered a token request with `result`.
    pub fn token_request(&self, result: TokenResult) {
        self.inner
            .token_requests
            .get_or_create(&ResultLabel {
                result: result.as_str(),
            })
            .inc();
    }

    /// A connection test of `target` ended with `verdict`.
    pub fn connection_test(&self, target: pb::ConnectionTarget, verdict: pb::ConnectionVerdict) {
        let target = match target {
            pb::ConnectionTarget::Send => "send",
            pb::ConnectionTarget::Fetch => "fetch",
            pb::ConnectionTarget::Unspecified => "unspecified",
        };
        self.inner
            .connection_tests
            .get_or_create(&TestLabels {
                target,
                verdict: verdict_label(verdict),
            })
            .inc();
    }
}

/// `CONNECTION_VERDICT_TOKEN_REJECTED` → `token_rejected`: one of the enum's few names.
fn verdict_label(verdict: pb::ConnectionVerdict) -> &'static str {
    use pb::ConnectionVerdict as V;
    match verdict {
        V::Unspecified => "unspecified",
        V::Ok => "ok",
        V::DnsFailed => "dns_failed",
        V::ConnectionRefused => "connection_refused",
        V::Timeout => "timeout",
        V::CertificateNameMismatch => "certificate_name_mismatch",
        V::CertificateUntrusted => "certificate_untrusted",
        V::TlsVersionRefused => "tls_version_refused",
        V::TlsFailed => "tls_failed",
        V::NoToken => "no_token",
        V::SmtpAuthDisabled => "smtp_auth_disabled",
        V::TokenRejected => "token_rejected",
        V::MechanismNotOffered => "mechanism_not_offered",
        V::ProtocolError => "protocol_error",
        V::AgentUnreachable => "agent_unreachable",
        V::ApiError => "api_error",
        V::DeviceNotLoaded => "device_not_loaded",
    }
}

/// Writes one gauge or counter family without labels.
pub(crate) fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: Sample,
) -> fmt::Result {
    match value {
        Sample::Gauge(v) => {
            let gauge = ConstGauge::new(v);
            let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
            gauge.encode(metric)
        }
        Sample::GaugeInt(v) => {
            let gauge = ConstGauge::new(v);
            let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
            gauge.encode(metric)
        }
        Sample::Counter(v) => {
            let counter = ConstCounter::new(v);
            let metric = encoder.encode_descriptor(name, help, unit, counter.metric_type())?;
            counter.encode(metric)
        }
    }
}

/// A value read at scrape time.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sample {
    /// A gauge with a fractional value.
    Gauge(f64),
    /// A whole-number gauge.
    GaugeInt(i64),
    /// A counter with a fractional value (CPU seconds).
    Counter(f64),
}

/// The queue and the spool directory, read when scraped.
#[derive(Debug)]
struct SpoolCollector {
    spool: Arc<Spool>,
}

fn int(v: impl TryInto<i64>) -> Sample {
    Sample::GaugeInt(v.try_into().unwrap_or(i64::MAX))
}

impl Collector for SpoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let queues = self.spool.queue_by_device(SystemTime::now());
        let depth: usize = queues.values().map(|(n, _)| n).sum();
        let oldest = queues
            .values()
            .map(|(_, age)| *age)
            .max()
            .unwrap_or_default();
        encode_one(
            &mut encoder,
            "tokenfleet_agent_queued_messages",
            "Messages in the spool waiting for delivery.",
            None,
            int(depth),
        )?;
        encode_one(
            &mut encoder,
            "tokenfleet_agent_oldest_queued_message_age",
            "Age of the oldest message waiting for delivery (0 when none waits).",
            Some(&Unit::Seconds),
            Sample::Gauge(oldest.as_secs_f64()),
        )?;
        encode_one(
            &mut encoder,
            "tokenfleet_agent_queued_message",
            "Bytes of the messages waiting for delivery (what the spool quota counts).",
            Some(&Unit::Bytes),
            int(self.spool.queued_bytes()),
        )?;
        encode_one(
            &mut encoder,
            "tokenfleet_agent_spool_quota",
            "Spool quota (ingress_limits.spool_max_bytes): devices get 452 beyond it.",
            Some(&Unit::Bytes),
            int(self.spool.limits().max_bytes),
        )?;
        match self.spool.disk_usage() {
            Ok(usage) => {
                encode_one(
                    &mut encoder,
                    "tokenfleet_agent_spool_disk_usage",
                    "Disk space used by the spool directory (queue, dead letters, partial writes).",
                    Some(&Unit::Bytes),
                    int(usage.bytes),
                )?;
                encode_one(
                    &mut encoder,
                    "tokenfleet_agent_dead_letter_messages",
                    "Dead-lettered messages kept in the spool for the operator.",
                    None,
                    int(usage.dead_messages),
                )?;
            }
            Err(error) => {
                tracing::warn!(%error, "reading the spool's disk use for /metrics failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_exist_at_zero_and_count() {
        let metrics = AgentMetrics::default();
        let text = metrics.encode(Format::OpenMetrics).unwrap();
        assert!(
            text.contains("tokenfleet_agent_messages_deferred_total{kind=\"upstream\"} 0"),
            "{text}"
        );
        assert!(text.contains("tokenfleet_agent_messages_accepted_total 0"));
        metrics.message_deferred(Deferral::Upstream);
        metrics.message_deferred(Deferral::Upstream);
        metrics.fetch_run(FetchResult::Ok, 3);
        metrics.connection_test(
            pb::ConnectionTarget::Send,
            pb::ConnectionVerdict::TokenRejected,
        );
        let text = metrics.encode(Format::OpenMetrics).unwrap();
        for line in [
            "tokenfleet_agent_messages_deferred_total{kind=\"upstream\"} 2",
            "tokenfleet_agent_fetch_runs_total{result=\"ok\"} 1",
            "tokenfleet_agent_fetched_messages_total 3",
            "tokenfleet_agent_connection_tests_total{target=\"send\",verdict=\"token_rejected\"} 1",
            "# TYPE tokenfleet_agent_build info",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn spool_series_follow_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let metrics = AgentMetrics::new(Some(Arc::clone(&spool)));
        let envelope = crate::spool::Envelope {
            device: "mfp".into(),
            from: "a@b.example".into(),
            rcpts: vec!["c@d.example".into()],
            mailbox: String::new(),
            user_address: String::new(),
        };
        spool.accept(&envelope, &[b'x'; 5000]).unwrap();
        let text = metrics.encode(Format::Prometheus).unwrap();
        assert!(
            text.contains("tokenfleet_agent_queued_messages 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tokenfleet_agent_queued_message_bytes 5000\n"),
            "{text}"
        );
        let usage = text
            .lines()
            .find_map(|l| l.strip_prefix("tokenfleet_agent_spool_disk_usage_bytes "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap();
        assert!(usage >= 5000, "{text}");
    }
}
