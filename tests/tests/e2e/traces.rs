//! OpenTelemetry traces through the real binaries: an OTLP/gRPC receiver in the test (the
//! generated `opentelemetry.proto.collector.trace.v1.TraceService` server of the
//! `opentelemetry-proto` crate, recording every span it is sent), the `tokenfleet-broker` and
//! `tokenfleet-agent` binaries exporting to it, a printer message sent through the agent to
//! Dovecot:
//!
//! - one trace runs from the agent's `deliver` span through its `token_request`, across gRPC
//!   (W3C `traceparent`) into the broker's request span, its `issue_access_token`, the refresh,
//!   the store operations and the identity provider's token endpoint, each parent id the span
//!   above it, and no span attribute names the mailbox;
//! - with `sample_ratio = 0` on both, nothing is exported (the broker follows the agent's
//!   "not sampled" flag);
//! - both binaries default to traces off and refuse bad `[tracing]` values, naming the key.
//!
//! Spans are flushed when the processes stop (SIGTERM), which is part of what is tested.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokenfleet_proto::v1 as pb;
use tokenfleet_testkit::agent_site::{
    AgentSite, DEVICE, MAILBOX, SiteOptions, TENANT, agent_binary, broker_binary, eventually,
};

/// One received span and the `service.name` of its resource.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(show)
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// The in-test OTLP receiver.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(show)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Self::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

/// Lifetime of the access tokens the fake identity provider issues once the site is up.
const TOKEN_LIFETIME: Duration = Duration::from_secs(10);

/// A site whose broker (the binary) and agent export to `collector` with `ratio`. Tokens live
/// [`TOKEN_LIFETIME`] and the site waits until the broker's cached one is past half of it, so
/// the next issuance refreshes it; the agent asks the broker for every delivery (its renewal
/// margin exceeds the lifetime). So the delivery's trace reaches the identity provider. No
/// periodic connection tests: their token requests would fill the agent's cache outside a
/// delivery.
async fn traced_site(collector: SocketAddr, ratio: f64) -> AgentSite {
    let tracing =
        format!("[tracing]\notlp_endpoint = \"http://{collector}\"\nsample_ratio = {ratio:?}\n");
    let site = AgentSite::start(SiteOptions {
        purposes: vec![pb::MailPurpose::Send],
        agent_config: format!(
            "connection_test_interval_seconds = 0\ntoken_renew_margin_seconds = 7200\n{tracing}"
        ),
        broker_config: Some(format!(
            "{tracing}[tokens]\nrefresh_margin_seconds = 1800\n"
        )),
        ..SiteOptions::default()
    })
    .await;
    site.fake.set_access_token_lifetime(TOKEN_LIFETIME);
    site.admin()
        .refresh_now(pb::RefreshNowRequest {
            tenant: TENANT.into(),
            mailbox: MAILBOX.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("refresh now: {s:?}"));
    // An agent's request refreshes once less than half the lifetime is left; the scheduler
    // does at about three quarters. In between, the delivery's issuance calls the provider.
    tokio::time::sleep(TOKEN_LIFETIME * 11 / 20).await;
    site
}

/// Sends one message through the agent, waits for it at Dovecot, then stops the agent and the
/// broker (SIGTERM: both flush their spans on the way out).
async fn deliver_one_and_stop(site: &mut AgentSite) {
    site.print(1, None).await;
    eventually(
        "the message at Dovecot",
        Duration::from_secs(30),
        || async { (site.upstream_count().await >= 1).then_some(()) },
    )
    .await;
    assert_eq!(site.stop_agent(), Some(0), "agent: SIGTERM exits 0");
    site.stop_broker().await;
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_printer_message_to_the_identity_provider() {
    let (receiver, collector) = Receiver::start().await;
    let mut site = traced_site(collector, 1.0).await;
    deliver_one_and_stop(&mut site).await;

    let spans = eventually(
        "the agent's delivered span at the receiver",
        Duration::from_secs(15),
        || async {
            let spans = receiver.spans();
            spans
                .iter()
                .any(|s| {
                    s.span.name == "deliver" && s.attr("result").as_deref() == Some("delivered")
                })
                .then_some(spans)
        },
    )
    .await;
    let summary: Vec<String> = spans
        .iter()
        .map(|s| format!("{}:{}", s.service, s.span.name))
        .collect();
    let deliver = spans
        .iter()
        .find(|s| s.span.name == "deliver" && s.attr("result").as_deref() == Some("delivered"))
        .unwrap();
    assert_eq!(deliver.service, "tokenfleet-agent");
    assert_eq!(deliver.attr("device").as_deref(), Some(DEVICE));
    assert!(
        deliver.span.parent_span_id.is_empty(),
        "a delivery starts its trace"
    );
    let trace = &deliver.span.trace_id;
    let in_trace: Vec<&Received> = spans.iter().filter(|s| &s.span.trace_id == trace).collect();
    let by_id: HashMap<&[u8], &Received> = in_trace
        .iter()
        .map(|s| (s.span.span_id.as_slice(), *s))
        .collect();
    let children = |parent: &Received, name: &str| -> Vec<&Received> {
        in_trace
            .iter()
            .copied()
            .filter(|s| s.span.parent_span_id == parent.span.span_id && s.span.name == name)
            .collect()
    };
    // Whether `span` has `ancestor` above it (following parent ids within the trace).
    let descends = |span: &Received, ancestor: &Received| {
        let mut at = span;
        while let Some(parent) = by_id.get(at.span.parent_span_id.as_slice()) {
            if parent.span.span_id == ancestor.span.span_id {
                return true;
            }
            at = parent;
        }
        false
    };

    let token_request = *children(deliver, "token_request")
        .first()
        .unwrap_or_else(|| panic!("no token_request under deliver: {summary:?}"));
    assert_eq!(token_request.service, "tokenfleet-agent");
    assert_eq!(token_request.attr("result").as_deref(), Some("issued"));
    assert_eq!(token_request.attr("device").as_deref(), Some(DEVICE));

    // Across the process boundary: the broker's request span is the child of the agent's span.
    let request = *children(token_request, "tokenfleet.v1.TokenBroker/IssueAccessToken")
        .first()
        .unwrap_or_else(|| panic!("no broker request span under token_request: {summary:?}"));
    assert_eq!(request.service, "tokenfleet-broker");
    assert_eq!(request.attr("rpc.system").as_deref(), Some("grpc"));
    // SPAN_KIND_SERVER
    assert_eq!(request.span.kind, 2);
    let issuance = in_trace
        .iter()
        .copied()
        .find(|s| s.span.name == "issue_access_token")
        .unwrap_or_else(|| panic!("no issue_access_token span: {summary:?}"));
    assert!(
        descends(issuance, request),
        "issuance under the request span"
    );
    assert_eq!(issuance.service, "tokenfleet-broker");
    assert_eq!(issuance.attr("result").as_deref(), Some("issued"));

    let refresh = in_trace
        .iter()
        .copied()
        .find(|s| s.span.name == "refresh_token" && descends(s, issuance))
        .unwrap_or_else(|| panic!("no refresh_token span under the issuance: {summary:?}"));
    let provider = in_trace
        .iter()
        .copied()
        .find(|s| s.span.name == "provider_request" && descends(s, refresh))
        .unwrap_or_else(|| panic!("no provider_request span under the refresh: {summary:?}"));
    assert!(
        provider
            .attr("url.path")
            .is_some_and(|p| p.ends_with("/oauth2/v2.0/token")),
        "{provider:?}"
    );
    assert_eq!(
        provider.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(provider.span.kind, 3, "SPAN_KIND_CLIENT");
    let store: Vec<&Received> = in_trace
        .iter()
        .copied()
        .filter(|s| s.attr("db.system").as_deref() == Some("embedded") && descends(s, issuance))
        .collect();
    assert!(
        store.iter().any(|s| s.span.name == "get"),
        "store reads under the issuance: {summary:?}"
    );
    assert!(
        store
            .iter()
            .any(|s| s.span.name == "try_lease" && descends(s, refresh)),
        "the refresh lease: {summary:?}"
    );
    assert!(
        store
            .iter()
            .any(|s| s.span.name == "put" && descends(s, refresh)),
        "the refreshed token written: {summary:?}"
    );
    assert!(
        in_trace
            .iter()
            .all(|s| s.span.end_time_unix_nano >= s.span.start_time_unix_nano),
        "ended spans"
    );
    println!(
        "trace {} ({} spans): deliver {} → token_request {} → broker {} → issuance {} → refresh {} → provider {}",
        hex(trace),
        in_trace.len(),
        hex(&deliver.span.span_id),
        hex(&token_request.span.span_id),
        hex(&request.span.span_id),
        hex(&issuance.span.span_id),
        hex(&refresh.span.span_id),
        hex(&provider.span.span_id),
    );

    // No span of the delivery's trace names the mailbox (its name is the address's local part)
    // or an address. (Admin requests' spans name the object they change, mailboxes included.)
    for s in &in_trace {
        for kv in &s.span.attributes {
            let value = kv
                .value
                .as_ref()
                .and_then(|v| v.value.as_ref())
                .map(show)
                .unwrap_or_default();
            assert!(
                !value.contains(MAILBOX) && !value.contains('@'),
                "{}:{} attribute {} = {value}",
                s.service,
                s.span.name,
                kv.key
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_zero_exports_nothing() {
    let (receiver, collector) = Receiver::start().await;
    let mut site = traced_site(collector, 0.0).await;
    deliver_one_and_stop(&mut site).await;
    // Both processes flushed at exit; anything sampled would be here by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    assert!(
        spans.is_empty(),
        "{:?}",
        spans
            .iter()
            .map(|s| format!("{}:{}", s.service, s.span.name))
            .collect::<Vec<_>>()
    );
}

async fn run(binary: std::path::PathBuf, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .env_remove("TOKENFLEET_AGENT_TRACING__OTLP_ENDPOINT")
        .env_remove("TOKENFLEET_TRACING__OTLP_ENDPOINT")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn both_binaries_default_to_traces_off_and_name_bad_tracing_values() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, broker) = tokio::task::spawn_blocking(|| (agent_binary(), broker_binary()))
        .await
        .unwrap();
    let agent_state = dir.path().join("agent");
    let agent_state = agent_state.to_str().unwrap();

    // Off by default: the defaults and the checked configuration say so.
    let (code, out, err) = run(agent.clone(), &["default-config"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[tracing]\notlp_endpoint = \"\""), "{out}");
    let (code, out, err) = run(broker.clone(), &["default-config"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[tracing]"), "{out}");
    assert!(out.contains("otlp_endpoint = \"\""), "{out}");
    let (code, out, err) = run(agent.clone(), &["check-config", "--state-dir", agent_state]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_end().ends_with("traces off"), "{out}");
    let (code, out, err) = run(broker.clone(), &["print-config"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[tracing]"), "{out}");
    assert!(
        out.contains("service_name = \"tokenfleet-broker\""),
        "{out}"
    );

    // On: named in the summary.
    let on = dir.path().join("on.toml");
    std::fs::write(
        &on,
        "[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.25\n",
    )
    .unwrap();
    let on = on.to_str().unwrap();
    let (code, out, err) = run(
        agent.clone(),
        &["check-config", "--config", on, "--state-dir", agent_state],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("traces OTLP to http://127.0.0.1:4317 as tokenfleet-agent, sampling 0.25"),
        "{out}"
    );

    // Bad values: every one named, with the file, exit 64.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[tracing]\notlp_endpoint = \"collector:4317\"\nsample_ratio = 1.5\nservice_name = \"\"\nsampler = \"always\"\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let (code, _, err) = run(
        agent.clone(),
        &["check-config", "--config", bad, "--state-dir", agent_state],
    )
    .await;
    assert_eq!(code, 64, "{err}");
    for want in [
        "tracing.sampler",
        "tracing.otlp_endpoint = \"collector:4317\"",
        "tracing.sample_ratio = 1.5",
        "tracing.service_name",
    ] {
        assert!(err.contains(want), "agent: {want}: {err}");
    }
    let (code, _, err) = run(broker.clone(), &["--config", bad, "print-config"]).await;
    assert_eq!(code, 64, "{err}");
    for want in [
        "sampler",
        "tracing.otlp_endpoint",
        "tracing.sample_ratio",
        "tracing.service_name",
    ] {
        assert!(err.contains(want), "broker: {want}: {err}");
    }
}
