//! The Helm chart in `charts/tokenfleet`, checked with the real `helm` binary: `helm lint
//! --strict`, rendering with the default values and with production-like value sets, the rendered
//! broker configuration parsed by the broker's own configuration loader, every file the
//! configuration names found on a mounted volume, the manifests validated against the Kubernetes
//! API schemas (`kubernetes-validate`), and invalid values refused with a message that names the
//! problem.
//!
//! `helm` and `kubernetes-validate` come from `scripts/test-setup.sh` (`.tools/bin`,
//! `.venv-test/bin`) or from `PATH`. Without them the tests fail when `CI` is set and are skipped
//! with a notice otherwise.
//!
//! Every option is rendered at least once ([`EVERY_OPTION_VALUES`]: the relay agent, autoscaling,
//! NetworkPolicies, listener limits, audit retention, the provider-host allowlist, Redis
//! replication settings), the relay agent's configuration parsed by the agent's own loader, and
//! the chart's README checked against `scripts/chart-readme.py`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Deserialize as _;
use serde_json::Value;
use tokenfleet_broker::config::{RawConfig, StoreBackend};
use tokenfleet_broker::identity::pki;

/// A production-like installation: three replicas on a TLS Redis Cluster with a password, two
/// sealing keys (after a rotation), TLS on gRPC, an own agent CA, a public URL behind an Ingress
/// (whose controller's pods are trusted proxies), alerts by signed webhook and e-mail, token
/// tuning and a ServiceMonitor.
const PRODUCTION_VALUES: &str = r#"
replicaCount: 3
image:
  tag: "1.2.3"
http:
  publicUrl: https://tokenfleet.example.com
  trustedProxies: [10.42.0.0/16, fd00:42::/48]
ingress:
  enabled: true
  className: nginx
  host: tokenfleet.example.com
  tlsSecret: tokenfleet-ingress-tls
alerts:
  webhook:
    url: https://hooks.example.com/tokenfleet
    secretName: alerts-webhook
    secretKey: hmac
  email:
    to: [ops@example.com, oncall@example.com]
    fromMailbox: acme/alerts
    smtpHost: smtp.office365.com
  expiryHorizonHours: 72
tls:
  existingSecret: broker-tls
agents:
  certificateLifetimeSeconds: 86400
  caSecret: agent-ca
tokens:
  leaseTtlSeconds: 90
  schedulerConcurrency: 8
store:
  backend: redis
  redis:
    mode: cluster
    urls:
      - rediss://redis-0.redis:6379
      - rediss://redis-1.redis:6379
      - rediss://redis-2.redis:6379
    username: tokenfleet
    existingSecret: redis-auth
    existingSecretPasswordKey: redis-password
    tls: true
    tlsCaSecret: redis-ca
    keyPrefix: prod
seal:
  existingSecret: broker-seal-keys
  keyIds: [k1, k2]
  currentKeyId: k2
log:
  level: info,tokenfleet_broker=debug
  format: json
serviceMonitor:
  enabled: true
  labels:
    release: prometheus
metrics:
  perTenantLabels: true
  inventoryIntervalSeconds: 120
prometheusRule:
  enabled: true
  labels:
    release: prometheus
  ruleLabels:
    team: printing
  alerts:
    TokenfleetAgentNotSeen:
      threshold: 5
      for: 10m
    TokenfleetRefreshTokenExpiring:
      threshold: 7
    TokenfleetMailboxReauthRequired:
      severity: page
    TokenfleetStoreDown:
      enabled: false
grafanaDashboard:
  enabled: true
  namespace: monitoring
  annotations:
    grafana_folder: Printing
"#;

/// The zero-setup installation: one replica, embedded store on a PersistentVolumeClaim.
const EMBEDDED_VALUES: &str = r#"
replicaCount: 1
store:
  backend: embedded
  embedded:
    persistence:
      size: 2Gi
      storageClass: fast
"#;

/// Every optional part switched on: the cloud-relay agent (with extra agent settings), the
/// autoscaler, NetworkPolicies, listener limits, audit retention, the provider-host allowlist,
/// Redis replication settings, and an existing Secret for the bootstrap admin key.
const EVERY_OPTION_VALUES: &str = r#"
tls:
  existingSecret: broker-tls
relayAgent:
  enabled: true
  image:
    tag: "1.2.3"
  enrollment:
    existingSecret: relay-enrollment
    secretKey: enroll-code
  smtpPort: 25
  pop3Port: 110
  service:
    type: LoadBalancer
    loadBalancerSourceRanges: [192.0.2.0/24]
  metrics:
    port: 9100
    service:
      annotations:
        example.com/scrape: "true"
  settings:
    delivery_concurrency: 8
    ingress_require_tls: false
autoscaling:
  enabled: true
  minReplicas: 3
  maxReplicas: 9
networkPolicy:
  enabled: true
  grpcFrom:
    - ipBlock:
        cidr: 198.51.100.0/24
  httpFrom:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: monitoring
  relayFrom:
    - ipBlock:
        cidr: 192.0.2.0/24
limits:
  grpcMaxConnections: 5000
  httpHeaderReadTimeoutSeconds: 5
audit:
  refusedMaxAgeDays: 7
  issuanceMaxEntries: 50000
admin:
  providerHosts: [idp.example.com, "proxy.example.com:3128"]
  callRatePerMinute: 600
  callBurst: 50
bootstrapAdminKey:
  existingSecret: my-admin-key
  secretKey: api-key
tokens:
  leaseWaitSeconds: 15
  maxUserMailboxesPerDevice: 100
  breakerProbeIntervalMs: 2000
store:
  redis:
    mode: sentinel
    sentinelMaster: mymaster
    urls: [redis://sentinel-0:26379]
    minReplicasAcked: 2
    replicationTimeoutMs: 800
    roleCheckIntervalMs: 500
"#;

const CHART: &str = "charts/tokenfleet";

// ------------------------------------------------------------------------------------------------
// Tools
// ------------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// `name` on `PATH`, else in the workspace's `dir` (where `scripts/test-setup.sh` puts it).
fn find_tool(name: &str, dir: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name));
    let local = std::iter::once(workspace_root().join(dir).join(name));
    on_path.chain(local).find(|candidate| candidate.is_file())
}

/// The real tools the chart is checked with.
struct Tools {
    helm: PathBuf,
    kubernetes_validate: PathBuf,
    /// helm's cache, config and data directories, kept out of the user's home.
    helm_home: tempfile::TempDir,
}

/// The tools, or `None` (after a notice) outside CI when they are not installed.
fn tools() -> Result<Option<Tools>> {
    let helm = find_tool("helm", ".tools/bin");
    let kubernetes_validate = find_tool("kubernetes-validate", ".venv-test/bin");
    let (Some(helm), Some(kubernetes_validate)) = (helm, kubernetes_validate) else {
        let message = "helm or kubernetes-validate not found on PATH, in .tools/bin or in \
                       .venv-test/bin: run scripts/test-setup.sh";
        if std::env::var_os("CI").is_some() {
            bail!("{message}");
        }
        eprintln!("SKIPPED (not in CI): {message}");
        return Ok(None);
    };
    Ok(Some(Tools {
        helm,
        kubernetes_validate,
        helm_home: tempfile::tempdir()?,
    }))
}

impl Tools {
    fn helm(&self, args: &[&str]) -> Result<Output> {
        let home = self.helm_home.path();
        Command::new(&self.helm)
            .args(args)
            .current_dir(workspace_root())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()
            .with_context(|| format!("running {} {}", self.helm.display(), args.join(" ")))
    }

    /// `helm template` with `values` (YAML) on top of the chart's defaults.
    fn template(&self, values: Option<&str>) -> Result<Output> {
        let dir = tempfile::tempdir()?;
        let mut args = vec!["template", "tf", CHART, "--namespace", "printing"];
        let values_file = dir.path().join("values.yaml");
        let values_arg = values_file.display().to_string();
        if let Some(values) = values {
            std::fs::write(&values_file, values)?;
            args.extend(["--values", &values_arg]);
        }
        self.helm(&args)
    }

    /// The rendered manifests, which must render.
    fn render(&self, values: Option<&str>) -> Result<Manifests> {
        let output = self.template(values)?;
        ensure!(
            output.status.success(),
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let yaml = String::from_utf8(output.stdout)?;
        Manifests::parse(&yaml)
    }
}

// ------------------------------------------------------------------------------------------------
// Rendered manifests
// ------------------------------------------------------------------------------------------------

struct Manifests {
    yaml: String,
    docs: Vec<Value>,
}

impl Manifests {
    fn parse(yaml: &str) -> Result<Self> {
        let mut docs = Vec::new();
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let value = Value::deserialize(doc).context("helm template printed invalid YAML")?;
            if !value.is_null() {
                docs.push(value);
            }
        }
        Ok(Self {
            yaml: yaml.to_owned(),
            docs,
        })
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.docs
            .iter()
            .map(|doc| text(doc, "/kind").to_owned())
            .collect()
    }

    /// The resource of `kind` named `name`.
    fn named(&self, kind: &str, name: &str) -> Result<&Value> {
        self.docs
            .iter()
            .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
            .with_context(|| format!("no {kind} named {name}"))
    }

    /// The broker's gRPC Service and its in-cluster HTTP Service.
    fn services(&self) -> Result<(&Value, &Value)> {
        Ok((
            self.named("Service", "tf-tokenfleet-broker")?,
            self.named("Service", "tf-tokenfleet-broker-http")?,
        ))
    }

    fn find(&self, kind: &str) -> Option<&Value> {
        self.docs.iter().find(|doc| doc["kind"] == kind)
    }

    fn one(&self, kind: &str) -> Result<&Value> {
        let found: Vec<_> = self.docs.iter().filter(|doc| doc["kind"] == kind).collect();
        match found.as_slice() {
            [one] => Ok(one),
            other => bail!("expected one {kind}, found {}", other.len()),
        }
    }

    fn deployment(&self) -> Result<&Value> {
        self.named("Deployment", "tf-tokenfleet-broker")
    }

    fn container(&self) -> Result<&Value> {
        let containers = self.deployment()?["spec"]["template"]["spec"]["containers"]
            .as_array()
            .context("Deployment without containers")?;
        containers
            .iter()
            .find(|c| c["name"] == "broker")
            .context("no container named broker")
    }

    /// The broker configuration file from the ConfigMap, as written and as the broker reads it.
    fn broker_config(&self) -> Result<(String, RawConfig)> {
        let text = text(
            self.named("ConfigMap", "tf-tokenfleet-broker")?,
            "/data/broker.toml",
        )
        .to_owned();
        let raw = RawConfig::from_toml_str(&text)
            .with_context(|| format!("the broker rejects the rendered configuration:\n{text}"))?;
        Ok((text, raw))
    }

    /// The volume of the pod named `name`.
    fn volume(&self, name: &str) -> Result<&Value> {
        self.deployment()?["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .context("Deployment without volumes")?
            .iter()
            .find(|v| v["name"] == name)
            .with_context(|| format!("no volume named {name}"))
    }

    /// The volume mount whose directory holds `path`, and the file name relative to it.
    fn mount_for<'a>(&'a self, path: &str) -> Result<(&'a Value, String)> {
        let mounts = self.container()?["volumeMounts"]
            .as_array()
            .context("broker container without volume mounts")?;
        mounts
            .iter()
            .filter_map(|m| {
                let at = m["mountPath"].as_str()?;
                let rest = path.strip_prefix(at)?;
                let rest = if rest.is_empty() {
                    String::new()
                } else if m["subPath"].is_string() {
                    return None;
                } else {
                    rest.strip_prefix('/')?.to_owned()
                };
                Some((m, rest))
            })
            .max_by_key(|(m, _)| m["mountPath"].as_str().map_or(0, str::len))
            .with_context(|| format!("{path} is on no mounted volume"))
    }

    /// Asserts that `path` is a file served from Secret `secret`'s key `key`.
    fn assert_secret_file(&self, path: &str, secret: &str, key: &str) -> Result<()> {
        let (mount, file) = self.mount_for(path)?;
        ensure!(mount["readOnly"] == true, "{path}: mount is not read-only");
        let volume = self.volume(text(mount, "/name"))?;
        ensure!(
            volume["secret"]["secretName"] == secret,
            "{path}: volume {} is not Secret {secret}: {volume}",
            mount["name"]
        );
        let items = volume["secret"]["items"].as_array().context("no items")?;
        ensure!(
            items
                .iter()
                .any(|i| i["key"] == key && i["path"] == file.as_str()),
            "{path}: Secret {secret} key {key} is not projected as {file}: {volume}"
        );
        Ok(())
    }
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The values of every `*_file` key, at any depth.
fn file_paths(config: &Value) -> Vec<String> {
    match config {
        Value::Object(map) => map
            .iter()
            .flat_map(|(key, value)| match value.as_str() {
                Some(path) if key.ends_with("_file") => vec![path.to_owned()],
                _ => file_paths(value),
            })
            .collect(),
        Value::Array(items) => items.iter().flat_map(file_paths).collect(),
        _ => Vec::new(),
    }
}

fn redis_string<'a>(raw: &'a RawConfig, key: &str) -> Option<&'a str> {
    raw.store.redis.as_ref()?.0.get(key)?.as_str()
}

/// The checks every rendering must pass, whatever the values.
fn assert_common_invariants(manifests: &Manifests, grpc_port: u16, http_port: u16) -> Result<()> {
    let deployment = manifests.deployment()?;
    let pod = &deployment["spec"]["template"]["spec"];
    let container = manifests.container()?;
    let (config_text, raw) = manifests.broker_config()?;

    // The configuration file is mounted where the container's arguments point.
    let args: Vec<&str> = container["args"]
        .as_array()
        .context("no args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .context("no --config argument")?;
    let (mount, _) = manifests.mount_for(config_path)?;
    ensure!(manifests.volume(text(mount, "/name"))?["configMap"].is_object());

    // Listeners: all interfaces inside the pod, on the ports the container and Service declare.
    ensure!(
        raw.grpc.listen == format!("0.0.0.0:{grpc_port}"),
        "{config_text}"
    );
    ensure!(
        raw.http.listen == format!("0.0.0.0:{http_port}"),
        "{config_text}"
    );
    let ports = container["ports"].as_array().context("no ports")?;
    let (grpc_service, http_service) = manifests.services()?;
    for (name, port, service) in [
        ("grpc", grpc_port, grpc_service),
        ("http", http_port, http_service),
    ] {
        ensure!(
            ports
                .iter()
                .any(|p| p["name"] == name && p["containerPort"] == u64::from(port)),
            "container port {name} is not {port}: {ports:?}"
        );
        // Each Service routes its one port: remote agents can be given the gRPC Service alone.
        let routed = service["spec"]["ports"].as_array().context("no ports")?;
        ensure!(
            routed.len() == 1 && routed[0]["name"] == name && routed[0]["targetPort"] == name,
            "Service {} does not route {name} alone: {routed:?}",
            service["metadata"]["name"]
        );
    }
    ensure!(
        http_service["spec"]["type"] == "ClusterIP",
        "the HTTP Service (metrics) stays inside the cluster"
    );

    // The bootstrap admin key, when on, is a file from its Secret the configuration names.
    match &raw.admin.bootstrap_key_file {
        Some(file) => {
            let (mount, _) = manifests.mount_for(&file.display().to_string())?;
            let secret = text(
                manifests.volume(text(mount, "/name"))?,
                "/secret/secretName",
            );
            ensure!(!secret.is_empty(), "bootstrap key not from a Secret");
        }
        None => ensure!(manifests.volume("bootstrap-key").is_err()),
    }

    // Probes: liveness /healthz, readiness /readyz, both on the HTTP port.
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &container[probe]["httpGet"];
        ensure!(
            get["path"] == path && get["port"] == "http",
            "{probe}: {get}"
        );
    }

    // Hardening.
    let security = &container["securityContext"];
    ensure!(security["runAsNonRoot"] == true, "{security}");
    ensure!(security["readOnlyRootFilesystem"] == true, "{security}");
    ensure!(security["allowPrivilegeEscalation"] == false, "{security}");
    ensure!(
        security["capabilities"]["drop"] == serde_json::json!(["ALL"]),
        "{security}"
    );
    ensure!(pod["securityContext"]["runAsNonRoot"] == true);
    ensure!(pod["automountServiceAccountToken"] == false);
    ensure!(
        container["resources"]["limits"]["memory"].is_string(),
        "no memory limit"
    );

    // The root filesystem is read-only: the state directory must be a writable volume.
    let state_dir = raw.state_dir.display().to_string();
    let (state_mount, rest) = manifests.mount_for(&state_dir)?;
    ensure!(
        rest.is_empty() && state_mount["readOnly"] != true,
        "state_dir {state_dir} is not a writable mount"
    );

    // Every sealing key the configuration names is a file from the sealing-key Secret, readable
    // by the owner and the pod's group only.
    let seal_volume = manifests.volume("seal-keys")?;
    ensure!(
        seal_volume["secret"]["defaultMode"] == 0o440,
        "{seal_volume}"
    );
    let seal_secret = text(seal_volume, "/secret/secretName").to_owned();
    ensure!(!raw.seal.keys.is_empty(), "no sealing keys configured");
    for key in &raw.seal.keys {
        let file = key
            .key_file
            .as_ref()
            .with_context(|| format!("seal key {} has no key_file", key.id))?;
        manifests.assert_secret_file(&file.display().to_string(), &seal_secret, &key.id)?;
    }
    ensure!(
        raw.seal.current_key_id.as_ref().is_some_and(|id| raw
            .seal
            .keys
            .iter()
            .any(|k| &k.id == id)),
        "current_key_id is not a configured key"
    );

    // Every file the configuration names is on a read-only mounted volume.
    for path in file_paths(&serde_json::to_value(&raw)?) {
        let (mount, _) = manifests.mount_for(&path)?;
        ensure!(mount["readOnly"] == true, "{path} is on a writable mount");
    }

    // Secrets never reach the ConfigMap or environment.
    ensure!(
        !config_text.contains("password ="),
        "a password in the ConfigMap:\n{config_text}"
    );
    let env = container["env"].as_array().cloned().unwrap_or_default();
    ensure!(
        env.iter().all(|e| !text(e, "/name").contains("PASSWORD")),
        "{env:?}"
    );

    // Pods roll when the configuration changes.
    ensure!(
        deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string()
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[test]
fn chart_lints_strictly_with_every_value_set() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    for (name, values) in [
        ("default", None),
        ("production", Some(PRODUCTION_VALUES)),
        ("embedded", Some(EMBEDDED_VALUES)),
        ("every-option", Some(EVERY_OPTION_VALUES)),
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        let file = dir.path().join(format!("{name}.yaml"));
        let file_arg = file.display().to_string();
        if let Some(values) = values {
            std::fs::write(&file, values)?;
            args.extend(["--values", &file_arg]);
        }
        let output = tools.helm(&args)?;
        ensure!(
            output.status.success(),
            "helm lint --strict ({name} values) failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn default_values_render_two_brokers_on_redis() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let manifests = tools.render(None)?;

    let kinds = manifests.kinds();
    let expected: BTreeSet<String> = [
        "ConfigMap",
        "Deployment",
        "Pod",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    .map(String::from)
    .into();
    ensure!(kinds == expected, "rendered kinds: {kinds:?}");

    let deployment = manifests.deployment()?;
    ensure!(
        deployment["spec"]["replicas"] == 2,
        "{}",
        deployment["spec"]
    );
    ensure!(deployment["spec"]["strategy"]["type"] == "RollingUpdate");
    ensure!(
        text(manifests.container()?, "/image") == "tokenfleet/tokenfleet-broker:0.1.0",
        "image defaults to the appVersion"
    );
    assert_common_invariants(&manifests, 50051, 8080)?;

    let (_, raw) = manifests.broker_config()?;
    ensure!(raw.store.backend == StoreBackend::Redis);
    let redis = raw.store.redis.as_ref().context("no [store.redis]")?;
    let redis = redis.to_redis_config()?;
    ensure!(redis.urls == ["redis://redis:6379"], "{:?}", redis.urls);

    // The sealing keys come from `<fullname>-seal`, which the chart does not create.
    ensure!(text(manifests.volume("seal-keys")?, "/secret/secretName") == "tf-tokenfleet-seal");
    // The one Secret the chart makes: the generated bootstrap admin key, kept on uninstall, in
    // the form `tokenfleet-broker generate-api-key` prints, and named by the configuration.
    let secret = manifests.one("Secret")?;
    ensure!(text(secret, "/metadata/name") == "tf-tokenfleet-broker-admin-key");
    ensure!(text(secret, "/metadata/annotations/helm.sh~1resource-policy") == "keep");
    {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.decode(text(secret, "/data/key"))?;
        let key = String::from_utf8(key)?;
        let (id, secret_part) = key
            .strip_prefix("tfk_")
            .and_then(|k| k.split_once('_'))
            .context("not tfk_<id>_<secret>")?;
        ensure!(
            id.len() == 12
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{id}"
        );
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(secret_part)?;
        ensure!(bytes.len() == 32, "the secret is 32 random bytes");
        let again = tools.render(None)?;
        ensure!(
            again.one("Secret")?["data"]["key"] != secret["data"]["key"],
            "each fresh install generates its own key"
        );
    }
    let bootstrap = raw
        .admin
        .bootstrap_key_file
        .as_ref()
        .context("no [admin] bootstrap_key_file")?;
    manifests.assert_secret_file(
        &bootstrap.display().to_string(),
        "tf-tokenfleet-broker-admin-key",
        "key",
    )?;
    // The `helm test` hook asks /readyz through the HTTP Service and opens the gRPC Service.
    let test = manifests.one("Pod")?;
    ensure!(text(test, "/metadata/annotations/helm.sh~1hook") == "test");
    let command = test["spec"]["containers"][0]["command"].to_string();
    ensure!(
        command.contains("http://tf-tokenfleet-broker-http:8080/readyz")
            && command.contains("tf-tokenfleet-broker 50051"),
        "{command}"
    );
    ensure!(manifests.one("PodDisruptionBudget")?["spec"]["maxUnavailable"] == 1);
    ensure!(raw.tls.cert_file.is_none() && raw.agents.ca_cert_file.is_none());
    ensure!(
        raw.alerts.webhook_url.is_none() && raw.alerts.email_to.is_empty(),
        "alerts are off by default"
    );
    ensure!(raw.http.public_url == tokenfleet_broker::config::DEFAULT_PUBLIC_URL);
    Ok(())
}

#[test]
fn ingress_host_becomes_the_public_url() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    for (values, url) in [
        (
            "ingress:\n  enabled: true\n  host: tf.example.com\n  tlsSecret: tf-tls\n",
            "https://tf.example.com",
        ),
        (
            "ingress:\n  enabled: true\n  host: tf.example.com\n",
            "http://tf.example.com",
        ),
        (
            "ingress:\n  enabled: true\n  host: tf.example.com\nhttp:\n  publicUrl: https://other.example.com/\n",
            "https://other.example.com",
        ),
    ] {
        let manifests = tools.render(Some(values))?;
        assert_common_invariants(&manifests, 50051, 8080)?;
        let (_, raw) = manifests.broker_config()?;
        ensure!(
            raw.http.public_url.trim_end_matches('/') == url,
            "{values}: {}",
            raw.http.public_url
        );
        ensure!(manifests.one("Ingress")?["spec"]["rules"][0]["host"] == "tf.example.com");
    }
    Ok(())
}

/// Whether Kubernetes routes `url` by `route` (an Ingress path: `Exact`, or `Prefix` matched
/// element by element, so `/consent` matches `/consent/x` but not `/consentx`).
fn ingress_matches(route: &Value, url: &str) -> bool {
    let path = route["path"].as_str().unwrap_or_default();
    match route["pathType"].as_str() {
        Some("Exact") => url == path,
        Some("Prefix") => {
            let path = path.trim_end_matches('/');
            url == path || url.starts_with(&format!("{path}/"))
        }
        _ => false,
    }
}

/// The Ingress routes the consent callback and the mailbox owners' pages (and the console when
/// `console`) to the broker's HTTP port, and nothing else of it.
fn assert_ingress_routes(ingress: &Value, console: bool) -> Result<()> {
    let routes = ingress["spec"]["rules"][0]["http"]["paths"]
        .as_array()
        .context("no paths")?;
    for route in routes {
        ensure!(
            route["backend"]["service"]["port"]["name"] == "http"
                && route["backend"]["service"]["name"] == "tf-tokenfleet-broker-http",
            "{route}"
        );
    }
    let routed = |url: &str| routes.iter().any(|r| ingress_matches(r, url));
    // The callback, a link's page, its sign-in start and status, and under every prefix the
    // owner's page uses (checked against the real page in `console`) something.
    let mut open = vec![
        tokenfleet_broker::tokens::consent::CALLBACK_PATH,
        "/consent/tfc_abc",
        "/consent/tfc_abc/start",
        "/consent/tfc_abc/status.json",
        "/console/static/console.css",
    ];
    ensure!(
        crate::OWNER_PAGE_PREFIXES
            .iter()
            .all(|p| open.iter().any(|u| u.starts_with(p)))
    );
    let console_pages = ["/console/", "/console/audit", "/console/sign-in"];
    if console {
        open.extend(console_pages);
    }
    for url in &open {
        ensure!(routed(url), "the Ingress does not route {url}: {routes:?}");
    }
    let mut closed = vec![
        "/metrics",
        "/healthz",
        "/readyz",
        "/",
        "/consentx",
        "/oauth/callback/x",
    ];
    if !console {
        closed.extend(console_pages);
    }
    for url in closed {
        ensure!(!routed(url), "the Ingress routes {url}: {routes:?}");
    }
    Ok(())
}

#[test]
fn production_values_render_three_replicas_on_a_tls_redis_cluster() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let manifests = tools.render(Some(PRODUCTION_VALUES))?;

    let deployment = manifests.deployment()?;
    ensure!(
        deployment["spec"]["replicas"] == 3,
        "{}",
        deployment["spec"]
    );
    ensure!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0);
    ensure!(text(manifests.container()?, "/image") == "tokenfleet/tokenfleet-broker:1.2.3");
    assert_common_invariants(&manifests, 50051, 8080)?;

    let (config_text, raw) = manifests.broker_config()?;
    ensure!(raw.store.backend == StoreBackend::Redis);
    ensure!(
        config_text.contains(
            r#"urls = ["rediss://redis-0.redis:6379","rediss://redis-1.redis:6379","rediss://redis-2.redis:6379"]"#
        ),
        "redis URLs missing:\n{config_text}"
    );
    ensure!(redis_string(&raw, "mode") == Some("cluster"));
    ensure!(redis_string(&raw, "username") == Some("tokenfleet"));
    ensure!(redis_string(&raw, "key_prefix") == Some("prod"));
    ensure!(raw.log.level == "info,tokenfleet_broker=debug");

    // The Redis password and CA arrive as files from their Secrets.
    let password_file = redis_string(&raw, "password_file").context("no password_file")?;
    manifests.assert_secret_file(password_file, "redis-auth", "redis-password")?;
    ensure!(manifests.volume("redis-password")?["secret"]["defaultMode"] == 0o440);
    let ca_file = redis_string(&raw, "tls_ca_file").context("no tls_ca_file")?;
    manifests.assert_secret_file(ca_file, "redis-ca", "ca.crt")?;

    // gRPC TLS and the agent CA from their kubernetes.io/tls Secrets.
    ensure!(raw.http.public_url == "https://tokenfleet.example.com");
    ensure!(raw.http.trusted_proxies == ["10.42.0.0/16", "fd00:42::/48"]);
    for (file, key) in [
        (&raw.tls.cert_file, "tls.crt"),
        (&raw.tls.key_file, "tls.key"),
    ] {
        let file = file.as_ref().context("[tls] incomplete")?;
        manifests.assert_secret_file(&file.display().to_string(), "broker-tls", key)?;
    }
    for (file, key) in [
        (&raw.agents.ca_cert_file, "tls.crt"),
        (&raw.agents.ca_key_file, "tls.key"),
    ] {
        let file = file.as_ref().context("[agents] CA incomplete")?;
        manifests.assert_secret_file(&file.display().to_string(), "agent-ca", key)?;
    }
    ensure!(raw.agents.certificate_lifetime_seconds == 86_400);
    ensure!(raw.tokens.lease_ttl_seconds == 90);
    ensure!(raw.tokens.scheduler_concurrency == 8);
    ensure!(
        raw.tokens.provider_timeout_seconds == 30,
        "unset token settings keep the broker's defaults"
    );
    // Alerts: the webhook's HMAC key from its Secret, e-mail settings as given.
    let alerts = &raw.alerts;
    ensure!(alerts.webhook_url.as_deref() == Some("https://hooks.example.com/tokenfleet"));
    let hook_key = alerts
        .webhook_secret_file
        .as_ref()
        .context("no alerts.webhook_secret_file")?;
    manifests.assert_secret_file(&hook_key.display().to_string(), "alerts-webhook", "hmac")?;
    ensure!(manifests.volume("alerts-webhook")?["secret"]["defaultMode"] == 0o440);
    ensure!(alerts.email_to == ["ops@example.com", "oncall@example.com"]);
    ensure!(alerts.email_from_mailbox.as_deref() == Some("acme/alerts"));
    ensure!(alerts.smtp_host.as_deref() == Some("smtp.office365.com"));
    ensure!(alerts.smtp_port == 587 && alerts.expiry_horizon_hours == 72);
    ensure!(
        !config_text.contains("secret =") && !config_text.contains("hmac"),
        "{config_text}"
    );

    // The Ingress exposes what browsers open, on the public host, with TLS: the consent
    // callback and the owners' consent pages, not the metrics, probes or the console.
    let ingress = manifests.one("Ingress")?;
    ensure!(ingress["spec"]["ingressClassName"] == "nginx", "{ingress}");
    ensure!(ingress["spec"]["tls"][0]["secretName"] == "tokenfleet-ingress-tls");
    let rule = &ingress["spec"]["rules"][0];
    ensure!(rule["host"] == "tokenfleet.example.com", "{rule}");
    assert_ingress_routes(ingress, false)?;
    let with_console = PRODUCTION_VALUES.replace(
        "ingress:\n  enabled: true\n",
        "ingress:\n  enabled: true\n  console: true\n",
    );
    ensure!(with_console.contains("console: true"));
    let console_manifests = tools.render(Some(&with_console))?;
    assert_ingress_routes(console_manifests.one("Ingress")?, true)?;

    let grpc_port = &manifests.services()?.0["spec"]["ports"][0];
    ensure!(
        grpc_port["name"] == "grpc" && grpc_port.get("appProtocol").is_none(),
        "TLS gRPC is not h2c: {grpc_port}"
    );

    // Both sealing keys, the newer one current.
    let ids: Vec<&str> = raw.seal.keys.iter().map(|k| k.id.as_str()).collect();
    ensure!(ids == ["k1", "k2"], "{ids:?}");
    ensure!(raw.seal.current_key_id.as_deref() == Some("k2"));
    ensure!(text(manifests.volume("seal-keys")?, "/secret/secretName") == "broker-seal-keys");

    let monitor = manifests.one("ServiceMonitor")?;
    ensure!(monitor["metadata"]["labels"]["release"] == "prometheus");
    // It selects the HTTP Service only (the gRPC Service has no metrics port).
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    let (grpc_service, http_service) = manifests.services()?;
    let selects = |service: &Value| {
        selector.as_object().is_some_and(|m| {
            m.iter()
                .all(|(k, v)| &service["metadata"]["labels"][k] == v)
        })
    };
    ensure!(
        selects(http_service) && !selects(grpc_service),
        "{selector}"
    );
    ensure!(monitor["spec"]["endpoints"][0]["port"] == "http");
    ensure!(monitor["spec"]["endpoints"][0]["path"] == "/metrics");
    // The job the alert rules select: `tokenfleet-broker`, from the Service's label.
    ensure!(monitor["spec"]["jobLabel"] == "tokenfleet.io/job");
    ensure!(http_service["metadata"]["labels"]["tokenfleet.io/job"] == "tokenfleet-broker");
    ensure!(raw.metrics.per_tenant_labels && raw.metrics.inventory_interval_seconds == 120);
    Ok(())
}

/// The alerts of `files/prometheus-rules.yaml`, by name, as `(group, rule)`.
fn rule_file_alerts() -> Result<Vec<(String, Value)>> {
    let source = std::fs::read_to_string(
        workspace_root()
            .join(CHART)
            .join("files/prometheus-rules.yaml"),
    )?;
    let file: Value = serde_norway::from_str(&source)?;
    let mut alerts = Vec::new();
    for group in file["groups"].as_array().context("no groups")? {
        for rule in group["rules"].as_array().context("no rules")? {
            alerts.push((text(group, "/name").to_owned(), rule.clone()));
        }
    }
    Ok(alerts)
}

#[test]
fn prometheus_rule_and_dashboard_come_from_the_chart_files_with_the_overrides() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    // Off by default.
    let defaults = tools.render(None)?;
    for kind in ["PrometheusRule", "ServiceMonitor"] {
        ensure!(defaults.find(kind).is_none(), "{kind} rendered by default");
    }
    ensure!(
        defaults
            .named("ConfigMap", "tf-tokenfleet-dashboard")
            .is_err(),
        "dashboard rendered by default"
    );
    let (_, raw) = defaults.broker_config()?;
    ensure!(!raw.metrics.per_tenant_labels && raw.metrics.inventory_interval_seconds == 30);

    let manifests = tools.render(Some(PRODUCTION_VALUES))?;
    let rule = manifests.one("PrometheusRule")?;
    ensure!(
        rule["metadata"]["labels"]["release"] == "prometheus",
        "{rule}"
    );
    let rendered: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .context("no groups")?
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    let alerts = rule_file_alerts()?;
    // Every alert of the file but the one switched off, in the file's order.
    let names: Vec<&str> = rendered.iter().map(|r| text(r, "/alert")).collect();
    let expected: Vec<&str> = alerts
        .iter()
        .map(|(_, r)| text(r, "/alert"))
        .filter(|n| *n != "TokenfleetStoreDown")
        .collect();
    ensure!(names == expected, "{names:?}");
    let by_name = |name: &str| {
        rendered
            .iter()
            .find(|r| r["alert"] == name)
            .copied()
            .with_context(|| format!("{name} not rendered"))
    };
    let not_seen = by_name("TokenfleetAgentNotSeen")?;
    ensure!(text(not_seen, "/expr").ends_with("> 5"), "{not_seen}");
    ensure!(not_seen["for"] == "10m" && not_seen["labels"]["team"] == "printing");
    ensure!(text(by_name("TokenfleetRefreshTokenExpiring")?, "/expr").ends_with("< 7"));
    let reauth = by_name("TokenfleetMailboxReauthRequired")?;
    ensure!(reauth["labels"]["severity"] == "page", "{reauth}");
    // Untouched alerts are the file's, annotations (with their Prometheus templates) included.
    for (_, original) in &alerts {
        let name = text(original, "/alert");
        if matches!(
            name,
            "TokenfleetAgentNotSeen" | "TokenfleetRefreshTokenExpiring" | "TokenfleetStoreDown"
        ) {
            continue;
        }
        let r = by_name(name)?;
        ensure!(
            r["expr"] == original["expr"] && r["for"] == original["for"],
            "{name}: {r}"
        );
        ensure!(r["annotations"] == original["annotations"], "{name}: {r}");
    }
    // What the operator applies is valid Prometheus rules.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rendered-rules.yaml");
    std::fs::write(&file, serde_json::to_string(&rule["spec"])?)?;
    let promtool = find_tool("promtool", "/usr/bin")
        .context("promtool not found: run scripts/test-setup.sh (Debian package `prometheus`)")?;
    let output = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()?;
    ensure!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // The dashboard: the file as is, for the Grafana sidecar, in the namespace asked for.
    let dashboard = manifests.named("ConfigMap", "tf-tokenfleet-dashboard")?;
    ensure!(dashboard["metadata"]["namespace"] == "monitoring");
    ensure!(dashboard["metadata"]["labels"]["grafana_dashboard"] == "1");
    ensure!(dashboard["metadata"]["annotations"]["grafana_folder"] == "Printing");
    let shipped: Value = serde_json::from_str(text(dashboard, "/data/tokenfleet.json"))?;
    let file: Value = serde_json::from_str(&std::fs::read_to_string(
        workspace_root()
            .join(CHART)
            .join("files/grafana-dashboard.json"),
    )?)?;
    ensure!(
        shipped == file,
        "the ConfigMap's dashboard differs from the file"
    );
    Ok(())
}

#[test]
fn embedded_store_renders_one_replica_on_a_kept_volume() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let manifests = tools.render(Some(EMBEDDED_VALUES))?;

    let deployment = manifests.deployment()?;
    ensure!(deployment["spec"]["replicas"] == 1);
    ensure!(
        deployment["spec"]["strategy"]["type"] == "Recreate",
        "two pods must never open the database file at once"
    );
    assert_common_invariants(&manifests, 50051, 8080)?;

    let (_, raw) = manifests.broker_config()?;
    ensure!(raw.store.backend == StoreBackend::Embedded);
    ensure!(raw.store.redis.is_none());
    let db = raw.embedded_path().display().to_string();
    let (mount, _) = manifests.mount_for(&db)?;
    let volume = manifests.volume(text(mount, "/name"))?;
    let claim = text(volume, "/persistentVolumeClaim/claimName");
    let pvc = manifests.one("PersistentVolumeClaim")?;
    ensure!(text(pvc, "/metadata/name") == claim, "{volume}");
    ensure!(text(pvc, "/spec/resources/requests/storage") == "2Gi");
    ensure!(text(pvc, "/spec/storageClassName") == "fast");
    ensure!(text(pvc, "/metadata/annotations/helm.sh~1resource-policy") == "keep");
    Ok(())
}

/// Sentinel Redis with a password file and tuned token settings.
const SENTINEL_VALUES: &str = r#"
store:
  redis:
    mode: sentinel
    sentinelMaster: mymaster
    urls: [redis://sentinel-0:26379, redis://sentinel-1:26379]
    existingSecret: redis-auth
tokens:
  leaseTtlSeconds: 90
  schedulerConcurrency: 4
"#;

/// Validates the rendered configuration as the broker does when it starts in the pod: absolute
/// paths moved under a temporary root holding the mounted files (sealing keys, Redis password and
/// CA, gRPC server certificate and key, agent CA, webhook HMAC key), generated for real. `edit`
/// changes the configuration text first (to break it on purpose).
fn validate_in_fake_pod(manifests: &Manifests, edit: impl Fn(&str) -> String) -> Result<()> {
    let (text, raw) = manifests.broker_config()?;
    let text = edit(&text);
    let raw = if text == manifests.broker_config()?.0 {
        raw
    } else {
        RawConfig::from_toml_str(&text)?
    };
    let pod = tempfile::tempdir()?;
    let root = pod.path().display().to_string();
    let now = time::OffsetDateTime::now_utc();
    let day = std::time::Duration::from_secs(86_400);
    let ca = pki::generate_ca("helm test CA", now, day)?;
    let server = pki::generate_server_cert(
        &ca.cert_pem,
        &ca.key_pem,
        &["tf-tokenfleet-broker.printing.svc"],
        now,
        day,
    )?;
    let is = |file: &Option<PathBuf>, path: &str| file.as_deref() == Some(Path::new(path));
    for path in file_paths(&serde_json::to_value(&raw)?) {
        let file = PathBuf::from(format!("{root}{path}"));
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let content = if raw.seal.keys.iter().any(|k| is(&k.key_file, &path)) {
            tokenfleet_seal::Keyring::generate_key_base64()?
        } else if is(&raw.tls.cert_file, &path) {
            server.cert_pem.clone()
        } else if is(&raw.tls.key_file, &path) {
            server.key_pem.expose().to_owned()
        } else if is(&raw.agents.ca_cert_file, &path)
            || redis_string(&raw, "tls_ca_file") == Some(path.as_str())
        {
            ca.cert_pem.clone()
        } else if is(&raw.agents.ca_key_file, &path) {
            ca.key_pem.expose().to_owned()
        } else if is(&raw.alerts.webhook_secret_file, &path) {
            "0123456789abcdef0123456789abcdef\n".to_owned()
        } else {
            "not-a-real-password\n".to_owned()
        };
        std::fs::write(file, content)?;
    }
    // Every absolute path in the file is a quoted string starting with "/.
    let moved = text.replace("\"/", &format!("\"{root}/"));
    let config = RawConfig::from_toml_str(&moved)?.validate()?;
    ensure!(config.tls.is_some() == raw.tls.cert_file.is_some());
    ensure!(config.agents.ca.is_some() == raw.agents.ca_cert_file.is_some());
    ensure!(config.alerts.webhook.is_some() == raw.alerts.webhook_url.is_some());
    ensure!(config.alerts.email.is_some() == !raw.alerts.email_to.is_empty());
    Ok(())
}

/// The configuration text unchanged.
fn as_rendered(text: &str) -> String {
    text.to_owned()
}

/// The configuration text without the lines that contain `fragment`.
fn without(fragment: &'static str) -> impl Fn(&str) -> String {
    move |text: &str| {
        text.lines()
            .filter(|line| !line.contains(fragment))
            .map(|line| format!("{line}\n"))
            .collect()
    }
}

#[test]
fn rendered_configuration_passes_the_brokers_start_up_validation() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    for values in [
        None,
        Some(EMBEDDED_VALUES),
        Some(SENTINEL_VALUES),
        Some(PRODUCTION_VALUES),
        Some(EVERY_OPTION_VALUES),
    ] {
        let manifests = tools.render(values)?;
        validate_in_fake_pod(&manifests, as_rendered)
            .with_context(|| format!("values: {}", values.unwrap_or("(defaults)")))?;
    }
    // A value the schema allows but the broker refuses is caught here, not in the pod.
    let manifests = tools.render(Some("tokens:\n  refreshMarginSeconds: 3600\n"))?;
    let error = validate_in_fake_pod(&manifests, as_rendered)
        .err()
        .context("the broker accepted tokens.refresh_margin_seconds = 3600")?;
    ensure!(
        format!("{error:#}").contains("tokens.refresh_margin_seconds"),
        "{error:#}"
    );
    // The fake pod is strict enough to notice a half-configured section: the checks above can
    // fail.
    let manifests = tools.render(Some(PRODUCTION_VALUES))?;
    for (fragment, field) in [
        ("/tls/tls.key\"", "tls.key_file"),
        ("/tls/tls.crt\"", "tls.cert_file"),
        ("/agent-ca/tls.key\"", "agents.ca_key_file"),
        ("webhook_secret_file =", "alerts.webhook_secret_file"),
        ("webhook_url =", "alerts.webhook_url"),
        ("smtp_host =", "alerts.smtp_host"),
    ] {
        let error = validate_in_fake_pod(&manifests, without(fragment))
            .err()
            .with_context(|| format!("the broker accepted the configuration without {fragment}"))?;
        ensure!(
            format!("{error:#}").contains(&format!("`{field}`")),
            "{fragment}: {error:#}"
        );
    }
    Ok(())
}

#[test]
fn rendered_manifests_pass_kubernetes_schema_validation() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    for (name, values) in [
        ("default", None),
        ("production", Some(PRODUCTION_VALUES)),
        ("embedded", Some(EMBEDDED_VALUES)),
        ("every-option", Some(EVERY_OPTION_VALUES)),
    ] {
        let manifests = tools.render(values)?;
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &manifests.yaml)?;
        // The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known.
        for version in ["1.25.0", "1.37.0"] {
            let output = Command::new(&tools.kubernetes_validate)
                .args(["--strict", "--quiet", "--kubernetes-version", version])
                .arg(&file)
                .output()
                .context("running kubernetes-validate")?;
            ensure!(
                output.status.success(),
                "{name} values, Kubernetes {version}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}

#[test]
fn kubernetes_validate_catches_a_broken_manifest() -> Result<()> {
    // The validation above must be able to fail.
    let Some(tools) = tools()? else { return Ok(()) };
    let manifests = tools.render(None)?;
    let broken = manifests.yaml.replacen("replicas: 2", "replicas: two", 1);
    ensure!(broken != manifests.yaml);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, broken)?;
    let output = Command::new(&tools.kubernetes_validate)
        .args(["--strict", "--quiet"])
        .arg(&file)
        .output()?;
    ensure!(!output.status.success());
    ensure!(String::from_utf8_lossy(&output.stdout).contains("spec.replicas"));
    Ok(())
}

#[test]
fn invalid_values_are_refused_with_the_reason() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let cases = [
        (
            "replicaCount: 3\nstore:\n  backend: embedded\n",
            "store.backend=embedded allows exactly one replica",
        ),
        (
            "replicas: 3\n",
            "additional properties 'replicas' not allowed",
        ),
        (
            "store:\n  redis:\n    url: redis://redis:6379\n",
            "additional properties 'url' not allowed",
        ),
        ("store:\n  backend: postgres\n", "/store/backend"),
        ("replicaCount: 0\n", "/replicaCount"),
        (
            "store:\n  redis:\n    mode: sentinel\n",
            "store.redis.sentinelMaster is required",
        ),
        (
            "seal:\n  keyIds: [k1]\n  currentKeyId: k2\n",
            "seal.currentKeyId \"k2\" is not one of seal.keyIds",
        ),
        (
            "store:\n  redis:\n    tls: true\n",
            "must start with rediss:// because store.redis.tls is true",
        ),
        (
            "store:\n  redis:\n    urls: [\"redis://:hunter2@redis:6379\"]\n",
            "put no password in a URL",
        ),
        (
            "tokens:\n  lease_ttl_seconds: 90\n",
            "additional properties 'lease_ttl_seconds' not allowed",
        ),
        (
            "alerts:\n  webhook:\n    url: https://hooks.example.com/x\n",
            "alerts.webhook.secretName is required with alerts.webhook.url",
        ),
        (
            "alerts:\n  webhook:\n    secretName: alerts-webhook\n",
            "alerts.webhook.url is required with alerts.webhook.secretName",
        ),
        (
            "alerts:\n  email:\n    to: [ops@example.com]\n    smtpHost: smtp.example.com\n",
            "alerts.email.fromMailbox (<tenant>/<mailbox>) is required",
        ),
        (
            "alerts:\n  email:\n    to: [ops@example.com]\n    fromMailbox: acme/alerts\n",
            "alerts.email.smtpHost is required",
        ),
        ("alerts:\n  email:\n    to: [ops]\n", "/alerts/email/to/0"),
        (
            "alerts:\n  email:\n    smtpSecurity: tls\n",
            "/alerts/email/smtpSecurity",
        ),
        (
            "alerts:\n  webhook:\n    url: ftp://hooks.example.com\n",
            "/alerts/webhook/url",
        ),
        (
            "alerts:\n  webhookUrl: https://hooks.example.com/x\n",
            "additional properties 'webhookUrl' not allowed",
        ),
        (
            "alerts:\n  timeoutSeconds: 300\n",
            "alerts.redeliverAfterSeconds must be at least 3480",
        ),
        (
            "alerts:\n  retryMinMs: 5000\n  retryMaxMs: 1000\n",
            "alerts.retryMaxMs (1000) must be at least alerts.retryMinMs (5000)",
        ),
        (
            "ingress:\n  enabled: true\n",
            "ingress.host is required with ingress.enabled=true",
        ),
        (
            "ingress:\n  enabled: true\n  console: true\n  host: tf.example.com\n",
            "ingress.console=true needs http.trustedProxies",
        ),
        (
            "tls:\n  certFile: /etc/server.pem\n",
            "additional properties 'certFile' not allowed",
        ),
        (
            "tls:\n  existingSecret: t\nrelayAgent:\n  enabled: true\n",
            "relayAgent.enrollment.existingSecret is required",
        ),
        (
            "relayAgent:\n  enabled: true\n  enrollment:\n    existingSecret: code\n",
            "relayAgent.enabled needs tls.existingSecret",
        ),
        (
            "tls:\n  existingSecret: t\nrelayAgent:\n  enabled: true\n  enrollment:\n    existingSecret: c\n  settings:\n    smtp_listen: 0.0.0.0:25\n",
            "relayAgent.settings.smtp_listen is set by the chart",
        ),
        (
            "tls:\n  existingSecret: t\nrelayAgent:\n  enabled: true\n  enrollment:\n    existingSecret: c\n  metrics:\n    port: 2525\n",
            "relayAgent.metrics.port 2525 is already relayAgent.smtpPort or relayAgent.pop3Port",
        ),
        (
            "relayAgent:\n  metrics:\n    port: 0\n",
            "/relayAgent/metrics/port",
        ),
        (
            "relayAgent:\n  metrics:\n    path: /m\n",
            "additional properties 'path' not allowed",
        ),
        (
            "replicaCount: 1\nstore:\n  backend: embedded\nautoscaling:\n  enabled: true\n",
            "autoscaling.enabled needs store.backend=redis",
        ),
        (
            "autoscaling:\n  enabled: true\n  minReplicas: 5\n  maxReplicas: 3\n",
            "autoscaling.maxReplicas (3) must be at least autoscaling.minReplicas (5)",
        ),
        (
            "limits:\n  grpcMaxStreams: 10\n",
            "additional properties 'grpcMaxStreams' not allowed",
        ),
        (
            "admin:\n  providerHosts: [\"https://idp.example.com\"]\n",
            "/admin/providerHosts/0",
        ),
        (
            "prometheusRule:\n  enabled: true\n  alerts:\n    TokenfleetNoSuchAlert:\n      for: 5m\n",
            "additional properties 'TokenfleetNoSuchAlert' not allowed",
        ),
        (
            "prometheusRule:\n  enabled: true\n  alerts:\n    TokenfleetBrokerDown:\n      threshold: 2\n",
            "prometheusRule.alerts.TokenfleetBrokerDown.threshold: this alert has no threshold",
        ),
        (
            "prometheusRule:\n  alerts:\n    TokenfleetAgentNotSeen:\n      for: soon\n",
            "/prometheusRule/alerts/TokenfleetAgentNotSeen/for",
        ),
        (
            "metrics:\n  inventoryIntervalSeconds: 0\n",
            "/metrics/inventoryIntervalSeconds",
        ),
    ];
    for (values, expected) in cases {
        let output = tools.template(Some(values))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success(),
            "helm template accepted invalid values:\n{values}"
        );
        ensure!(
            stderr.contains(expected),
            "values:\n{values}\nexpected the error to say {expected:?}, helm said:\n{stderr}"
        );
        ensure!(
            !stderr.contains("hunter2"),
            "the error repeats the password: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn every_option_renders_the_relay_agent_autoscaler_and_network_policies() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let manifests = tools.render(Some(EVERY_OPTION_VALUES))?;
    assert_common_invariants(&manifests, 50051, 8080)?;

    // Settings that were only reachable through extraEnv before.
    let (config_text, raw) = manifests.broker_config()?;
    ensure!(raw.limits.grpc_max_connections == 5000, "{config_text}");
    ensure!(
        raw.limits.http_header_read_timeout_seconds == 5,
        "{config_text}"
    );
    ensure!(raw.audit.refused_max_age_days == 7 && raw.audit.issuance_max_entries == 50_000);
    ensure!(raw.admin.provider_hosts == ["idp.example.com", "proxy.example.com:3128"]);
    ensure!(
        (raw.admin.call_rate_per_minute, raw.admin.call_burst) == (600, 50),
        "{config_text}"
    );
    ensure!(raw.tokens.lease_wait_seconds == 15 && raw.tokens.max_user_mailboxes_per_device == 100);
    ensure!(
        raw.tokens.breaker_probe_interval_ms == 2000,
        "{config_text}"
    );
    ensure!(
        config_text.contains("min_replicas_acked = 2")
            && config_text.contains("replication_timeout_ms = 800")
            && config_text.contains("role_check_interval_ms = 500"),
        "{config_text}"
    );
    // The bootstrap key from the operator's own Secret: the chart makes none.
    ensure!(manifests.find("Secret").is_none());
    manifests.assert_secret_file(
        &raw.admin
            .bootstrap_key_file
            .as_ref()
            .context("no bootstrap_key_file")?
            .display()
            .to_string(),
        "my-admin-key",
        "api-key",
    )?;

    // The autoscaler owns the replica count.
    let deployment = manifests.deployment()?;
    ensure!(
        deployment["spec"].get("replicas").is_none(),
        "{}",
        deployment["spec"]
    );
    let hpa = manifests.one("HorizontalPodAutoscaler")?;
    ensure!(hpa["spec"]["scaleTargetRef"]["name"] == "tf-tokenfleet-broker");
    ensure!(hpa["spec"]["minReplicas"] == 3 && hpa["spec"]["maxReplicas"] == 9);

    // NetworkPolicies: gRPC from the agents' range, HTTP from the namespace and monitoring, the
    // relay's mail ports from the site range.
    let broker_policy = manifests.named("NetworkPolicy", "tf-tokenfleet-broker")?;
    let rules = broker_policy["spec"]["ingress"]
        .as_array()
        .context("no rules")?;
    ensure!(rules.len() == 2, "{rules:?}");
    ensure!(rules[0]["ports"][0]["port"] == "grpc");
    ensure!(rules[0]["from"][0]["ipBlock"]["cidr"] == "198.51.100.0/24");
    ensure!(rules[1]["ports"][0]["port"] == "http");
    ensure!(rules[1]["from"].as_array().is_some_and(|f| f.len() == 2));
    let relay_policy = manifests.named("NetworkPolicy", "tf-tokenfleet-relay")?;
    let relay_ports = relay_policy["spec"]["ingress"][0]["ports"].to_string();
    ensure!(
        relay_ports.contains("smtp") && relay_ports.contains("pop3"),
        "{relay_ports}"
    );
    // The relay's metrics port: from the namespace and the monitoring peers, not the sites.
    let metrics_rule = &relay_policy["spec"]["ingress"][1];
    ensure!(
        metrics_rule["ports"][0]["port"] == "metrics",
        "{relay_policy:?}"
    );
    ensure!(metrics_rule["from"][0]["podSelector"].is_object());
    ensure!(metrics_rule["from"][1]["namespaceSelector"].is_object());

    // The relay agent: one pod with its spool on a claim, enrolled once by an init container with
    // the code and the broker's CA from Secrets, its configuration accepted by the agent itself.
    let relay = manifests.named("StatefulSet", "tf-tokenfleet-relay")?;
    ensure!(relay["spec"]["replicas"] == 1);
    let pod = &relay["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    let init_args: Vec<&str> = init["args"]
        .as_array()
        .context("no init args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let arg = |name: &str| {
        init_args
            .windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].to_owned())
            .with_context(|| format!("enroll without {name}: {init_args:?}"))
    };
    ensure!(
        init_args[..2] == ["enroll", "--if-not-enrolled"],
        "{init_args:?}"
    );
    ensure!(arg("--broker")? == "https://tf-tokenfleet-broker.printing.svc:50051");
    let volume_of = |path: &str| -> Result<(String, String)> {
        let mounts = init["volumeMounts"].as_array().context("no mounts")?;
        let mount = mounts
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|at| path.starts_with(&format!("{at}/")))
            })
            .with_context(|| format!("{path} is on no mount of the init container"))?;
        ensure!(mount["readOnly"] == true, "{path}: writable");
        let name = text(mount, "/name");
        let volume = pod["volumes"]
            .as_array()
            .context("no volumes")?
            .iter()
            .find(|v| v["name"] == name)
            .context("mount without volume")?;
        let item = &volume["secret"]["items"][0];
        ensure!(
            path.ends_with(&format!("/{}", text(item, "/path"))),
            "{path}: {volume}"
        );
        Ok((
            text(volume, "/secret/secretName").to_owned(),
            text(item, "/key").to_owned(),
        ))
    };
    ensure!(volume_of(&arg("--code-file")?)? == ("relay-enrollment".into(), "enroll-code".into()));
    ensure!(volume_of(&arg("--ca-file")?)? == ("broker-tls".into(), "ca.crt".into()));
    let agent = &pod["containers"][0];
    ensure!(text(agent, "/image") == "tokenfleet/tokenfleet-agent:1.2.3");
    ensure!(agent["securityContext"]["readOnlyRootFilesystem"] == true);
    let claim = &relay["spec"]["volumeClaimTemplates"][0];
    ensure!(text(claim, "/metadata/name") == "state");
    let state_dir = arg("--state-dir")?;
    for container in [init, agent] {
        ensure!(
            container["volumeMounts"].as_array().is_some_and(|ms| ms
                .iter()
                .any(|m| m["name"] == "state" && m["mountPath"] == state_dir.as_str())),
            "the state directory is not the claim in {}",
            container["name"]
        );
    }
    let config = manifests.named("ConfigMap", "tf-tokenfleet-relay")?;
    let agent_toml = text(config, "/data/agent.toml");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, agent_toml)?;
    let settings = tokenfleet_agent::config::AgentSettings::load(Some(&file), None)
        .map_err(|e| anyhow::anyhow!("the agent rejects the rendered configuration: {}", e.0))?;
    ensure!(settings.state_dir == Path::new(&state_dir));
    ensure!(
        settings.smtp_listen.port() == 25 && settings.pop3_listen.map(|a| a.port()) == Some(110)
    );
    ensure!(settings.delivery_concurrency == 8 && !settings.ingress_require_tls);
    let service = manifests.named("Service", "tf-tokenfleet-relay")?;
    ensure!(service["spec"]["type"] == "LoadBalancer");
    let ports = service["spec"]["ports"].to_string();
    ensure!(
        ports.contains("\"port\":25") && ports.contains("\"port\":110"),
        "{ports}"
    );

    // The metrics listener: on all interfaces of the pod at relayAgent.metrics.port, probed on
    // /healthz, behind a ClusterIP Service of its own (never the devices' LoadBalancer).
    ensure!(
        settings.metrics.listen == Some("0.0.0.0:9100".parse()?),
        "{agent_toml}"
    );
    ensure!(
        !ports.contains("metrics") && !ports.contains("9100"),
        "{ports}"
    );
    let container_ports = agent["ports"].to_string();
    ensure!(
        container_ports.contains("\"name\":\"metrics\"")
            && container_ports.contains("\"containerPort\":9100"),
        "{container_ports}"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        ensure!(
            text(agent, &format!("/{probe}/httpGet/path")) == "/healthz"
                && text(agent, &format!("/{probe}/httpGet/port")) == "metrics",
            "{probe}: {}",
            agent[probe]
        );
    }
    let metrics_service = manifests.named("Service", "tf-tokenfleet-relay-metrics")?;
    ensure!(metrics_service["spec"]["type"] == "ClusterIP");
    ensure!(metrics_service["spec"]["ports"][0]["port"] == 9100);
    ensure!(metrics_service["spec"]["ports"][0]["targetPort"] == "metrics");
    ensure!(metrics_service["metadata"]["annotations"]["example.com/scrape"] == "true");
    ensure!(metrics_service["spec"]["selector"] == relay["spec"]["selector"]["matchLabels"]);
    Ok(())
}

#[test]
fn a_relay_agent_without_metrics_listens_nowhere_else_and_probes_smtp() -> Result<()> {
    let Some(tools) = tools()? else { return Ok(()) };
    let manifests = tools.render(Some(
        "tls:\n  existingSecret: broker-tls\nrelayAgent:\n  enabled: true\n  enrollment:\n    existingSecret: code\n  metrics:\n    enabled: false\n",
    ))?;
    let config = manifests.named("ConfigMap", "tf-tokenfleet-relay")?;
    let agent_toml = text(config, "/data/agent.toml");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, agent_toml)?;
    let settings = tokenfleet_agent::config::AgentSettings::load(Some(&file), None)
        .map_err(|e| anyhow::anyhow!("the agent rejects the rendered configuration: {}", e.0))?;
    ensure!(settings.metrics.listen.is_none(), "{agent_toml}");
    ensure!(
        manifests
            .named("Service", "tf-tokenfleet-relay-metrics")
            .is_err()
    );
    let relay = manifests.named("StatefulSet", "tf-tokenfleet-relay")?;
    let agent = &relay["spec"]["template"]["spec"]["containers"][0];
    ensure!(!agent["ports"].to_string().contains("metrics"));
    for probe in ["readinessProbe", "livenessProbe"] {
        ensure!(
            text(agent, &format!("/{probe}/tcpSocket/port")) == "smtp",
            "{probe}: {}",
            agent[probe]
        );
    }

    // On by default, at 9465.
    let manifests = tools.render(Some(
        "tls:\n  existingSecret: broker-tls\nrelayAgent:\n  enabled: true\n  enrollment:\n    existingSecret: code\n",
    ))?;
    let service = manifests.named("Service", "tf-tokenfleet-relay-metrics")?;
    ensure!(service["spec"]["ports"][0]["port"] == 9465);
    Ok(())
}

#[test]
fn chart_readme_is_generated_from_the_values_comments() -> Result<()> {
    let Some(_tools) = tools()? else {
        return Ok(());
    };
    let python = find_tool("python3", ".venv-test/bin").context("no python3")?;
    let output = Command::new(python)
        .arg(workspace_root().join("scripts/chart-readme.py"))
        .arg("--check")
        .output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let readme = std::fs::read_to_string(workspace_root().join(CHART).join("README.md"))?;
    for key in [
        "relayAgent.enrollment.existingSecret",
        "relayAgent.metrics.port",
        "bootstrapAdminKey.enabled",
        "limits",
    ] {
        ensure!(
            readme.contains(&format!("| `{key}` |")),
            "{key} not in the chart README"
        );
    }
    Ok(())
}
