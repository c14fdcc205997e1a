//! The broker's `/metrics` after real traffic, and the chart's alerts and dashboard against it.
//!
//! One `tokenfleet-broker` process (`--dev`: embedded store, generated TLS; fleet gauges every
//! second; alerts to a webhook receiver in this test) and the fake identity provider. Through the
//! real sockets: three device-code consents, a refresh that succeeds, one that fails transiently
//! (HTTP 503), one that hits a dead grant (AADSTS70008 → REAUTH_REQUIRED, which raises an alert
//! the webhook receives), a consent left pending, an agent enrolled with the agent's own
//! identity library that gets a token for one device and is refused one for another, and its
//! status stream reporting a device with a queued and a dead-lettered message. Then `/metrics` is
//! scraped in both formats and the series and values are asserted.
//!
//! The same scrapes (one before the traffic, one after) become promtool `input_series`, and
//! `promtool test rules` evaluates `charts/tokenfleet/files/prometheus-rules.yaml` on them: the
//! REAUTH_REQUIRED mailbox, the dead letter and the queued message fire their alerts; the store,
//! the broker and the webhook, all healthy, fire none. The chart's own promtool tests and the
//! Grafana dashboard (every metric a panel queries is one the broker declares or one the agent
//! serves) are checked here too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokenfleet_agent::identity::{self, EnrollmentCode};
use tokenfleet_proto::v1 as pb;
use tokenfleet_proto::v1::admin_client::AdminClient;
use tokenfleet_proto::v1::token_broker_client::TokenBrokerClient;
use tokenfleet_seal::Secret;
use tokenfleet_testkit::agent_site::{broker_binary, eventually, microsoft_provider, plain_smtp};
use tokenfleet_testkit::broker::{BearerAuth, TestAdminClient};
use tokenfleet_testkit::fake_idp::{ClientSpec, Endpoint, FakeIdp, ScriptedResponse};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint as GrpcEndpoint};

const TENANT: &str = "acme";
const ENTRA: &str = "contoso-obs";
const CLIENT_ID: &str = "observability-app";
const CLIENT_SECRET: &str = "observability-client-secret";
const AGENT: &str = "site1";
const DEVICE_PASSWORD: &str = "printer-local-password-obs";
const WEBHOOK_SECRET: &str = "observability-webhook-hmac-key";

fn chart_file(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/tokenfleet/files"
    ))
    .join(name)
}

// ----------------------------------------------------------------------------------------------
// The broker process
// ----------------------------------------------------------------------------------------------

struct BrokerProcess {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BrokerProcess {
    async fn start(dir: &Path, webhook: SocketAddr) -> Self {
        let [grpc_port, http_port] = tokenfleet_testkit::ports::free_ports::<2>().unwrap();
        let grpc = SocketAddr::from(([127, 0, 0, 1], grpc_port));
        let http = SocketAddr::from(([127, 0, 0, 1], http_port));
        let state_dir = dir.join("state");
        let secret_file = dir.join("webhook.key");
        std::fs::write(&secret_file, WEBHOOK_SECRET).unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let config = format!(
            "state_dir = {state_dir:?}\n\
             [grpc]\nlisten = \"{grpc}\"\n\
             [http]\nlisten = \"{http}\"\npublic_url = \"http://{http}\"\n\
             [metrics]\ninventory_interval_seconds = 1\n\
             [agents]\nheartbeat_seconds = 5\n\
             [tokens]\nbreaker_failures = 0\nbackoff_min_seconds = 3600\nbackoff_max_seconds = 7200\n\
             [alerts]\nwebhook_url = \"http://{webhook}/hook\"\nwebhook_secret_file = {secret_file:?}\n\
             retry_attempts = 1\n"
        );
        let config_file = dir.join("broker.toml");
        std::fs::write(&config_file, config).unwrap();
        let log = tokenfleet_testkit::logs::log_dir()
            .join(format!("observability-broker-{}.log", std::process::id()));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let stderr = std::fs::File::create(&log).unwrap();
        let binary = tokio::task::spawn_blocking(broker_binary).await.unwrap();
        let child = Command::new(binary)
            .arg("--dev")
            .arg("--config")
            .arg(&config_file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut broker = Self {
            child,
            grpc,
            http,
            state_dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("the broker exited with {status}:\n{}", broker.log_text());
            }
            if http_get(http, "/readyz", None)
                .await
                .is_some_and(|r| r.status == 200)
                && broker.state_dir.join("admin.key").is_file()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the broker was not ready within 60 s:\n{}",
                broker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        broker
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("dev-ca.pem")).unwrap()
    }

    fn admin(&self) -> TestAdminClient {
        let key = std::fs::read_to_string(self.state_dir.join("admin.key")).unwrap();
        let key = key.trim();
        tokenfleet_testkit::logs::secret(key);
        let channel = GrpcEndpoint::from_shared(format!("https://{}", self.grpc))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.ca_pem())))
            .unwrap()
            .connect_lazy();
        AdminClient::with_interceptor(channel, BearerAuth::new(&Secret::new(key.to_owned())))
    }

    fn url(&self) -> String {
        format!("https://{}", self.grpc)
    }
}

// ----------------------------------------------------------------------------------------------
// HTTP: scrapes and the webhook receiver
// ----------------------------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    content_type: String,
    body: String,
}

async fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Option<HttpResponse> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Some(HttpResponse {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// Answers every request with 204 and counts them.
async fn webhook_receiver() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the header, then the body by its length.
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    (addr, count)
}

// ----------------------------------------------------------------------------------------------
// Exposition text
// ----------------------------------------------------------------------------------------------

/// One sample: metric name, labels in their printed order, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn key(&self) -> (String, Vec<(String, String)>) {
        (self.name.clone(), self.labels.clone())
    }
}

/// Parses the samples of a Prometheus/OpenMetrics text body (no exemplars, no timestamps).
fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                (name.to_owned(), parse_labels(body))
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(body: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return labels;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "label {key} is not quoted in {body}"
        );
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    value.push('\\');
                    value.extend(chars.next());
                }
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// The value of the sample `name` with exactly `labels` (in any order), if present.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeSet<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels.iter().cloned().collect::<BTreeSet<_>>() == want)
        .map(|s| s.value)
}

#[track_caller]
fn expect(samples: &[Sample], name: &str, labels: &[(&str, &str)], expected: f64) {
    let got = value(samples, name, labels);
    assert_eq!(
        got,
        Some(expected),
        "{name}{labels:?}; the broker's {name} samples: {:?}",
        samples
            .iter()
            .filter(|s| s.name == name)
            .collect::<Vec<_>>()
    );
}

/// Every sample name a family declared in a Prometheus text body stands for (so families that
/// have no sample yet count too): `# TYPE x histogram` declares `x_bucket`, `x_sum`, `x_count`.
fn declared_names(prometheus_text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in prometheus_text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

// ----------------------------------------------------------------------------------------------
// PromQL metric names (for the dashboard and the rules)
// ----------------------------------------------------------------------------------------------

const PROMQL_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    // Aggregation operators (their grouping may come before the parenthesis).
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// The metric names a PromQL expression selects: identifiers that are not functions (followed by
/// `(`), keywords, label names (inside `{…}` or a `by (…)` list), durations or Grafana variables.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    // Drop string literals, label matchers and range selectors.
    let mut cleaned = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_string = false;
    let mut prev = ' ';
    for c in expr.chars() {
        if in_string {
            if c == '"' && prev != '\\' {
                in_string = false;
            }
        } else {
            match c {
                '"' => in_string = true,
                '{' => depth_brace += 1,
                '}' => depth_brace -= 1,
                '[' => depth_bracket += 1,
                ']' => depth_bracket -= 1,
                _ if depth_brace == 0 && depth_bracket == 0 => cleaned.push(c),
                _ => {}
            }
        }
        prev = c;
    }
    // Drop grouping lists: `by (a, b)`, `without (…)`, `on (…)`, `ignoring (…)`, `group_left (…)`.
    let mut names = BTreeSet::new();
    let tokens: Vec<(String, char)> = {
        let mut tokens = Vec::new();
        let chars: Vec<char> = cleaned.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':' | '$'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                tokens.push((word, chars.get(j).copied().unwrap_or(' ')));
            } else {
                if c.is_ascii_digit() {
                    // A number (or a duration like 5m / 1e3): skip it whole.
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                        i += 1;
                    }
                    continue;
                }
                if !c.is_whitespace() {
                    tokens.push((c.to_string(), ' '));
                }
                i += 1;
            }
        }
        tokens
    };
    let mut skip_list = false;
    let mut last_word = String::new();
    for (token, next) in tokens {
        if skip_list {
            if token == ")" {
                skip_list = false;
                last_word = token;
            }
            continue;
        }
        if token == "(" && PROMQL_WORDS[..6].contains(&last_word.as_str()) {
            skip_list = true;
            continue;
        }
        last_word.clone_from(&token);
        let first = token.chars().next().unwrap_or(' ');
        if !(first.is_ascii_alphabetic() || first == '_' || first == ':') {
            continue;
        }
        if next == '(' || PROMQL_WORDS.contains(&token.to_ascii_lowercase().as_str()) {
            continue;
        }
        names.insert(token);
    }
    names
}

/// The series the agent serves on its own `/metrics` (the agent's README section lists them),
/// for the dashboard check here: `agent_metrics` checks the list against a real agent's scrape.
pub(crate) const AGENT_SERIES: &[&str] = &[
    "tokenfleet_agent_build_info",
    "tokenfleet_agent_messages_accepted_total",
    "tokenfleet_agent_messages_delivered_total",
    "tokenfleet_agent_messages_deferred_total",
    "tokenfleet_agent_messages_dead_lettered_total",
    "tokenfleet_agent_fetch_runs_total",
    "tokenfleet_agent_fetched_messages_total",
    "tokenfleet_agent_token_requests_total",
    "tokenfleet_agent_connection_tests_total",
    "tokenfleet_agent_ingress_logins_total",
    "tokenfleet_agent_connections_closed_total",
    "tokenfleet_agent_queued_messages",
    "tokenfleet_agent_oldest_queued_message_age_seconds",
    "tokenfleet_agent_queued_message_bytes",
    "tokenfleet_agent_spool_quota_bytes",
    "tokenfleet_agent_spool_disk_usage_bytes",
    "tokenfleet_agent_dead_letter_messages",
];

// ----------------------------------------------------------------------------------------------
// promtool
// ----------------------------------------------------------------------------------------------

fn promtool() -> PathBuf {
    let path = PathBuf::from("/usr/bin/promtool");
    assert!(
        path.is_file() || which("promtool").is_some(),
        "promtool is missing: run scripts/test-setup.sh (Debian package `prometheus`)"
    );
    which("promtool").unwrap_or(path)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn run_promtool_test(file: &Path) -> (bool, String) {
    let out = Command::new(promtool())
        .args(["test", "rules"])
        .arg(file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The rules file as JSON.
fn rules() -> serde_json::Value {
    serde_norway::from_str(&std::fs::read_to_string(chart_file("prometheus-rules.yaml")).unwrap())
        .unwrap()
}

/// The alert `name` as promtool expects it: labels (with the rule's severity) and the rule's
/// annotations rendered for `labels` and `value`.
fn expected_alert(
    rules: &serde_json::Value,
    name: &str,
    labels: &[(&str, &str)],
    value: &str,
) -> serde_json::Value {
    let rule = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .find(|r| r["alert"] == name)
        .unwrap_or_else(|| panic!("no alert {name} in the rules"));
    let mut exp_labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    exp_labels.insert(
        "severity".into(),
        rule["labels"]["severity"].as_str().unwrap().to_owned(),
    );
    let mut annotations = BTreeMap::new();
    for (k, v) in rule["annotations"].as_object().unwrap() {
        let mut text = v.as_str().unwrap().replace("{{ $value }}", value);
        for (label, label_value) in labels {
            text = text.replace(&format!("{{{{ $labels.{label} }}}}"), label_value);
        }
        assert!(!text.contains("{{"), "{name}: unrendered annotation {text}");
        annotations.insert(k.clone(), text);
    }
    serde_json::json!({"exp_labels": exp_labels, "exp_annotations": annotations})
}

/// promtool `input_series` from a scrape before and one after the traffic: ten minutes of the
/// values before (counters that did not exist yet count as 0, other series are absent), then
/// fifty minutes of the values after, one sample a minute. Plus `up` = 1 for the broker.
fn input_series(before: &[Sample], after: &[Sample]) -> Vec<serde_json::Value> {
    let earlier: BTreeMap<_, f64> = before.iter().map(|s| (s.key(), s.value)).collect();
    let mut series = vec![serde_json::json!({
        "series": "up{job=\"tokenfleet-broker\",instance=\"broker-1\"}",
        "values": "1x60",
    })];
    for s in after {
        if !s.value.is_finite() {
            continue;
        }
        let counter_like = ["_total", "_count", "_sum", "_bucket"]
            .iter()
            .any(|suffix| s.name.ends_with(suffix));
        let first = match earlier.get(&s.key()) {
            Some(v) => format!("{v}"),
            None if counter_like => "0".to_owned(),
            None => "_".to_owned(),
        };
        let mut labels = vec![
            "job=\"tokenfleet-broker\"".to_owned(),
            "instance=\"broker-1\"".to_owned(),
        ];
        labels.extend(s.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")));
        series.push(serde_json::json!({
            "series": format!("{}{{{}}}", s.name, labels.join(",")),
            "values": format!("{first}x10 {}x50", s.value),
        }));
    }
    series
}

// ----------------------------------------------------------------------------------------------
// The traffic
// ----------------------------------------------------------------------------------------------

async fn mailbox_status(admin: &mut TestAdminClient, name: &str) -> i32 {
    admin
        .get_mailbox(pb::GetMailboxRequest {
            tenant: TENANT.into(),
            name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap_or_default()
        .status
}

async fn create_mailbox(admin: &mut TestAdminClient, name: &str, address: &str) {
    admin
        .create_mailbox(pb::CreateMailboxRequest {
            mailbox: Some(pb::Mailbox {
                tenant: TENANT.into(),
                name: name.into(),
                address: address.into(),
                provider: "m365".into(),
                grant_type: pb::GrantType::DelegatedDeviceCode as i32,
                kind: pb::MailboxKind::Admin as i32,
                purposes: vec![pb::MailPurpose::Send as i32],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// Starts a device-code consent and returns the user code.
async fn start_consent(admin: &mut TestAdminClient, name: &str) -> String {
    let started = admin
        .start_consent(pb::StartConsentRequest {
            tenant: TENANT.into(),
            mailbox: name.into(),
            redirect_uri: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    match started.challenge {
        Some(pb::start_consent_response::Challenge::DeviceCode(c)) => c.user_code,
        other => panic!("expected a device code for {name}: {other:?}"),
    }
}

async fn consent(admin: &mut TestAdminClient, fake: &FakeIdp, name: &str, user: &str) {
    let code = start_consent(admin, name).await;
    fake.approve_device_code(&code, user).unwrap();
    eventually(
        &format!("{name} to become ACTIVE"),
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                (mailbox_status(&mut admin, name).await == pb::TokenStatus::Active as i32)
                    .then_some(())
            }
        },
    )
    .await;
}

async fn create_device(admin: &mut TestAdminClient, name: &str, mailbox: &str) {
    admin
        .create_device(pb::CreateDeviceRequest {
            device: Some(pb::Device {
                tenant: TENANT.into(),
                name: name.into(),
                agent: AGENT.into(),
                sender_mode: pb::SenderMode::FixedAdmin as i32,
                admin_mailbox: mailbox.into(),
                smtp: Some(plain_smtp(SocketAddr::from(([127, 0, 0, 1], 2525)))),
                ingress: Some(pb::IngressCredentials {
                    username: format!("{name}-user"),
                    password: DEVICE_PASSWORD.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|s| panic!("device {name}: {s:?}"));
}

async fn scrape(broker: &BrokerProcess, accept: Option<&str>) -> HttpResponse {
    let response = http_get(broker.http, "/metrics", accept)
        .await
        .expect("/metrics answers");
    assert_eq!(response.status, 200, "{}", response.body);
    response
}

#[tokio::test]
async fn metrics_after_real_traffic_and_the_alerts_they_fire() {
    tokenfleet_testkit::logs::capture();
    for secret in [CLIENT_SECRET, DEVICE_PASSWORD, WEBHOOK_SECRET] {
        tokenfleet_testkit::logs::secret(secret);
    }
    let fake = FakeIdp::start().await.unwrap();
    fake.register_client(ClientSpec::confidential(CLIENT_ID, CLIENT_SECRET));
    fake.set_device_interval(1);
    let users = [
        ("ok", "ok@contoso.example"),
        ("flaky", "flaky@contoso.example"),
        ("dead", "dead@contoso.example"),
        ("waiting", "waiting@contoso.example"),
    ];
    for (_, user) in users {
        fake.add_user(user);
    }
    let (webhook, webhook_hits) = webhook_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), webhook).await;
    let mut admin = broker.admin();

    // Setup: tenant, provider, mailboxes, an enrolled agent hosting two devices.
    admin
        .create_tenant(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                name: TENANT.into(),
                display_name: "Acme".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    microsoft_provider(
        &mut admin,
        &fake,
        TENANT,
        "m365",
        ENTRA,
        CLIENT_ID,
        CLIENT_SECRET,
    )
    .await
    .unwrap();
    for (name, user) in users {
        create_mailbox(&mut admin, name, user).await;
    }
    let code = tokenfleet_testkit::broker::enrollment_code(&mut admin, TENANT, AGENT).await;
    let agent_dir = dir.path().join("agent");
    let agent = identity::enroll(
        &broker.url(),
        &EnrollmentCode::new(&code),
        Some(broker.ca_pem()),
        &agent_dir,
        "observability-1.0",
    )
    .await
    .unwrap();
    if let Ok(pem) = std::fs::read_to_string(agent_dir.join(identity::KEY_FILE)) {
        tokenfleet_testkit::logs::secret(&pem);
    }
    create_device(&mut admin, "mfp", "ok").await;
    create_device(&mut admin, "mfp-dead", "dead").await;

    // The scrape before the traffic: the fleet gauges know the agent (queue series at 0).
    let before = eventually(
        "the fleet gauges to show the enrolled agent",
        Duration::from_secs(20),
        || async {
            let samples = parse_samples(&scrape(&broker, None).await.body);
            (value(&samples, "tokenfleet_fleet_agents_enrolled", &[]) == Some(1.0)
                && value(
                    &samples,
                    "tokenfleet_fleet_agent_queue_depth",
                    &[("agent", AGENT)],
                ) == Some(0.0))
            .then_some(samples)
        },
    )
    .await;
    expect(
        &before,
        "tokenfleet_mailboxes",
        &[("status", "NOT_RETRIEVED")],
        4.0,
    );
    expect(
        &before,
        "tokenfleet_mailboxes",
        &[("status", "REAUTH_REQUIRED")],
        0.0,
    );

    // Consents: three completed, one left pending.
    for (name, user) in &users[..3] {
        consent(&mut admin, &fake, name, user).await;
    }
    start_consent(&mut admin, "waiting").await;

    // A refresh that succeeds, one that fails transiently, one that finds the grant dead.
    let refresh_admin = admin.clone();
    let refresh = move |name: &'static str| {
        let mut admin = refresh_admin.clone();
        async move {
            admin
                .refresh_now(pb::RefreshNowRequest {
                    tenant: TENANT.into(),
                    mailbox: name.into(),
                })
                .await
        }
    };
    refresh("ok").await.unwrap();
    fake.fail_next_refresh_for_user("dead@contoso.example", 70008);
    let _ = refresh("dead").await;
    assert_eq!(
        mailbox_status(&mut admin, "dead").await,
        pb::TokenStatus::ReauthRequired as i32
    );
    // From here on every refresh answers 503: the broker retries a failing grant on its own
    // schedule, and each retry must fail too for the mailbox to stay REFRESH_FAILING.
    for _ in 0..200 {
        fake.script(
            Endpoint::MicrosoftToken,
            ScriptedResponse::status(503).for_grant_type("refresh_token"),
        );
    }
    let _ = refresh("flaky").await;
    assert_eq!(
        mailbox_status(&mut admin, "flaky").await,
        pb::TokenStatus::RefreshFailing as i32
    );

    // The agent: one token issued, one refused (its device's mailbox has a dead grant).
    let mut token_broker = TokenBrokerClient::new(agent.channel().unwrap());
    let issued = token_broker
        .issue_access_token(pb::IssueAccessTokenRequest {
            device: "mfp".into(),
            mailbox: "ok".into(),
            purpose: pb::MailPurpose::Send as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokenfleet_testkit::logs::secret(&issued.access_token);
    let refused = token_broker
        .issue_access_token(pb::IssueAccessTokenRequest {
            device: "mfp-dead".into(),
            mailbox: "dead".into(),
            purpose: pb::MailPurpose::Send as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );

    // Its status stream: one device with a queued and a dead-lettered message. The stream stays
    // open (the agent is connected) until the end of the test.
    let (reports, rx) = tokio::sync::mpsc::channel(4);
    reports
        .send(pb::AgentReport {
            time: Some(prost_types::Timestamp {
                seconds: time::OffsetDateTime::now_utc().unix_timestamp(),
                nanos: 0,
            }),
            software_version: "observability-1.0".into(),
            sequence: 1,
            devices: vec![pb::DeviceStatus {
                device: "mfp".into(),
                health: pb::DeviceHealth::Degraded as i32,
                problem: "one message dead-lettered".into(),
                queue_depth: 1,
                oldest_queued_seconds: 42,
                delivered_total: 3,
                dead_lettered_total: 1,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut commands = TokenBrokerClient::new(agent.channel().unwrap())
        .status_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let _stream_reader =
        tokio::spawn(async move { while let Ok(Some(_)) = commands.message().await {} });

    // The scrape after the traffic, once the fleet gauges and the alert delivery caught up.
    let after = eventually(
        "the fleet gauges and the alert delivery to catch up",
        Duration::from_secs(30),
        || async {
            let samples = parse_samples(&scrape(&broker, None).await.body);
            let caught_up = value(
                &samples,
                "tokenfleet_fleet_agent_queue_depth",
                &[("agent", AGENT)],
            ) == Some(1.0)
                && value(&samples, "tokenfleet_fleet_agents_connected", &[]) == Some(1.0)
                && value(
                    &samples,
                    "tokenfleet_mailboxes",
                    &[("status", "REAUTH_REQUIRED")],
                ) == Some(1.0)
                && value(
                    &samples,
                    "tokenfleet_alert_deliveries_total",
                    &[("channel", "webhook"), ("result", "delivered")],
                ) == Some(1.0);
            caught_up.then_some(samples)
        },
    )
    .await;
    assert_eq!(webhook_hits.load(Ordering::SeqCst), 1);

    // Token lifecycle: the refreshes counted are the ones the identity provider answered.
    let refresh_answers = |status: u16| {
        fake.requests_to(Endpoint::MicrosoftToken)
            .iter()
            .filter(|r| r.grant_type.as_deref() == Some("refresh_token") && r.status == status)
            .count() as f64
    };
    let (ok, transient, dead) = (
        refresh_answers(200),
        refresh_answers(503),
        refresh_answers(400),
    );
    assert!(
        ok == 1.0 && transient >= 1.0 && dead == 1.0,
        "{ok} {transient} {dead}"
    );
    let ms = [("provider_kind", "microsoft")];
    expect(
        &after,
        "tokenfleet_token_refreshes_total",
        &[ms[0], ("result", "ok")],
        ok,
    );
    // Retries of the failing grant go on meanwhile: the scrape saw at most what the fake
    // answered by now.
    let transient_scraped = value(
        &after,
        "tokenfleet_token_refreshes_total",
        &[ms[0], ("result", "transient")],
    )
    .unwrap_or_default();
    assert!(
        (1.0..=transient).contains(&transient_scraped),
        "{transient_scraped} transient refreshes counted, the fake answered {transient} with 503"
    );
    let transient = transient_scraped;
    expect(
        &after,
        "tokenfleet_token_refreshes_total",
        &[ms[0], ("result", "grant_dead")],
        1.0,
    );
    expect(
        &after,
        "tokenfleet_token_refresh_duration_seconds_count",
        &ms,
        ok + transient + 1.0,
    );
    assert!(value(&after, "tokenfleet_token_refresh_duration_seconds_sum", &ms).unwrap() > 0.0);
    expect(
        &after,
        "tokenfleet_token_refresh_duration_seconds_bucket",
        &[ms[0], ("le", "+Inf")],
        ok + transient + 1.0,
    );
    for (status, n) in [
        ("ACTIVE", 1.0),
        ("REFRESH_FAILING", 1.0),
        ("REAUTH_REQUIRED", 1.0),
        ("CONSENT_PENDING", 1.0),
        ("NOT_RETRIEVED", 0.0),
        ("DISABLED", 0.0),
    ] {
        expect(&after, "tokenfleet_mailboxes", &[("status", status)], n);
    }
    expect(&after, "tokenfleet_consents_pending", &[], 1.0);
    // Issuance.
    expect(
        &after,
        "tokenfleet_token_issuances_total",
        &[("result", "ok")],
        1.0,
    );
    expect(
        &after,
        "tokenfleet_token_issuances_total",
        &[("result", "failed_precondition")],
        1.0,
    );
    expect(
        &after,
        "tokenfleet_token_issuance_duration_seconds_count",
        &[("result", "ok")],
        1.0,
    );
    expect(
        &after,
        "tokenfleet_grpc_requests_total",
        &[
            ("method", "/tokenfleet.v1.TokenBroker/IssueAccessToken"),
            ("code", "OK"),
        ],
        1.0,
    );
    // Agents.
    expect(&after, "tokenfleet_fleet_agents_enrolled", &[], 1.0);
    expect(&after, "tokenfleet_fleet_agents_connected", &[], 1.0);
    expect(
        &after,
        "tokenfleet_fleet_agent_queue_depth",
        &[("agent", AGENT)],
        1.0,
    );
    expect(
        &after,
        "tokenfleet_fleet_agent_oldest_queued_seconds",
        &[("agent", AGENT)],
        42.0,
    );
    expect(
        &after,
        "tokenfleet_fleet_agent_dead_letters",
        &[("agent", AGENT)],
        1.0,
    );
    expect(&after, "tokenfleet_fleet_heartbeat_seconds", &[], 5.0);
    let age = value(
        &after,
        "tokenfleet_fleet_agent_last_seen_age_seconds",
        &[("agent", AGENT)],
    )
    .unwrap();
    assert!((0.0..10.0).contains(&age), "last seen {age} s ago");
    // Alerts.
    expect(
        &after,
        "tokenfleet_alerts_raised_total",
        &[("kind", "reauth_required")],
        1.0,
    );
    // Store latency by backend and operation, store health, process.
    for operation in ["get", "put", "list", "try_lease"] {
        let n = value(
            &after,
            "tokenfleet_store_operation_duration_seconds_count",
            &[("backend", "embedded"), ("operation", operation)],
        )
        .unwrap_or_else(|| panic!("no store {operation} timings"));
        assert!(n >= 1.0, "{operation}: {n}");
    }
    expect(&after, "tokenfleet_store_up", &[], 1.0);
    assert!(value(&after, "process_cpu_seconds_total", &[]).unwrap() > 0.0);
    assert!(value(&after, "process_resident_memory_bytes", &[]).unwrap() > 1_000_000.0);
    assert!(value(&after, "process_open_fds", &[]).unwrap() >= 5.0);
    assert!(
        value(
            &after,
            "tokenfleet_inventory_last_success_timestamp_seconds",
            &[]
        )
        .unwrap()
            > 1.7e9
    );
    // No tenant, mailbox or address in any label (per-tenant labels are off by default).
    let text = scrape(&broker, None).await;
    for private in ["acme", "contoso", "mfp", "waiting@", "tenant=", "mailbox="] {
        assert!(
            !text.body.contains(private),
            "{private} appears in /metrics:\n{}",
            text.body
        );
    }

    // Both formats by Accept.
    assert!(
        text.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        text.content_type
    );
    assert!(!text.body.contains("# EOF"));
    assert!(
        text.body
            .contains("# TYPE tokenfleet_token_refreshes_total counter")
    );
    let om = scrape(&broker, Some("application/openmetrics-text; version=1.0.0")).await;
    assert!(
        om.content_type.starts_with("application/openmetrics-text"),
        "{}",
        om.content_type
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(
        om.body
            .contains("# TYPE tokenfleet_token_refreshes counter")
    );
    let om_samples = parse_samples(&om.body);
    expect(
        &om_samples,
        "tokenfleet_mailboxes",
        &[("status", "REAUTH_REQUIRED")],
        1.0,
    );
    expect(
        &om_samples,
        "tokenfleet_token_refreshes_total",
        &[ms[0], ("result", "grant_dead")],
        1.0,
    );

    // The dashboard queries only what the broker declares or the agent serves.
    let declared = declared_names(&text.body);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_file("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut queried = BTreeSet::new();
    for expr in &exprs {
        queried.extend(promql_metric_names(expr));
    }
    let unknown: Vec<_> = queried
        .iter()
        .filter(|n| !declared.contains(*n) && !AGENT_SERIES.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries unknown series {unknown:?} (declared: {declared:?})"
    );
    // …and the alert rules likewise (`up` is Prometheus's own).
    let rules = rules();
    let mut rule_names = BTreeSet::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            rule_names.extend(promql_metric_names(rule["expr"].as_str().unwrap()));
        }
    }
    let unknown: Vec<_> = rule_names
        .iter()
        .filter(|n| !declared.contains(*n) && n.as_str() != "up")
        .collect();
    assert!(
        unknown.is_empty(),
        "alert rules use unknown series {unknown:?}"
    );

    // The alerts on these values: promtool on the scrapes.
    let job = ("job", "tokenfleet-broker");
    let test = serde_json::json!({
        "rule_files": [chart_file("prometheus-rules.yaml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": input_series(&before, &after),
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "TokenfleetMailboxReauthRequired", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "TokenfleetMailboxReauthRequired", "exp_alerts": [
                    expected_alert(&rules, "TokenfleetMailboxReauthRequired", &[job, ("status", "REAUTH_REQUIRED")], "1"),
                ]},
                {"eval_time": "5m", "alertname": "TokenfleetAgentDeadLetters", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "TokenfleetAgentDeadLetters", "exp_alerts": [
                    expected_alert(&rules, "TokenfleetAgentDeadLetters", &[job, ("agent", AGENT)], ""),
                ]},
                {"eval_time": "55m", "alertname": "TokenfleetAgentQueueBacklog", "exp_alerts": [
                    expected_alert(&rules, "TokenfleetAgentQueueBacklog", &[job, ("agent", AGENT)], ""),
                ]},
                {"eval_time": "55m", "alertname": "TokenfleetRefreshFailing", "exp_alerts": [
                    expected_alert(&rules, "TokenfleetRefreshFailing", &[job, ("status", "REFRESH_FAILING")], "1"),
                ]},
                // Healthy: the agent reports, the store and broker are up, the webhook delivered,
                // the fleet gauges are fresh.
                {"eval_time": "55m", "alertname": "TokenfleetAgentNotSeen", "exp_alerts": []},
                {"eval_time": "55m", "alertname": "TokenfleetStoreDown", "exp_alerts": []},
                {"eval_time": "55m", "alertname": "TokenfleetBrokerDown", "exp_alerts": []},
                {"eval_time": "55m", "alertname": "TokenfleetBrokerAbsent", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "TokenfleetAlertDeliveriesFailing", "exp_alerts": []},
                // No listener turned anyone away, nobody guessed console keys.
                {"eval_time": "55m", "alertname": "TokenfleetListenerRefusingConnections", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "TokenfleetConsoleSignInGuessing", "exp_alerts": []},
            ],
        }],
    });
    let test_file = dir.path().join("scraped.test.yaml");
    std::fs::write(&test_file, serde_json::to_string_pretty(&test).unwrap()).unwrap();
    let (ok, output) = run_promtool_test(&test_file);
    assert!(ok, "promtool on the scraped series:\n{output}");

    // A test that can fail: the same series claiming the REAUTH_REQUIRED alert does not fire.
    let mut wrong = test.clone();
    wrong["tests"][0]["alert_rule_test"][1]["exp_alerts"] = serde_json::json!([]);
    std::fs::write(&test_file, serde_json::to_string_pretty(&wrong).unwrap()).unwrap();
    let (ok, output) = run_promtool_test(&test_file);
    assert!(
        !ok && output.contains("TokenfleetMailboxReauthRequired"),
        "{output}"
    );

    drop(reports);
    assert!(
        !broker.log_text().contains(CLIENT_SECRET),
        "the broker logged a secret"
    );
}

fn collect_exprs(panels: &serde_json::Value, out: &mut Vec<String>) {
    for panel in panels.as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(expr.to_owned());
            }
        }
        collect_exprs(&panel["panels"], out);
    }
}

#[test]
fn the_charts_promtool_tests_pass() {
    let (ok, output) = run_promtool_test(&chart_file("prometheus-rules.test.yaml"));
    assert!(ok, "{output}");
    // Every alert of the rules file has a test there.
    let tests = std::fs::read_to_string(chart_file("prometheus-rules.test.yaml")).unwrap();
    for group in rules()["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has no promtool test"
            );
        }
    }
}

#[test]
fn promql_names_are_told_from_functions_labels_and_keywords() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (le, provider_kind) (rate(tokenfleet_token_refresh_duration_seconds_bucket{job="x",a=~"b|c"}[$__rate_interval]))) / on() group_left() max(tokenfleet_fleet_heartbeat_seconds) > 3"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "tokenfleet_fleet_heartbeat_seconds",
            "tokenfleet_token_refresh_duration_seconds_bucket"
        ]
    );
    let names = promql_metric_names("time() - max without (instance, pod) (up == 1) and absent(x)");
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["up", "x"]);
}
