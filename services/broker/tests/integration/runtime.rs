//! The broker's runtime: configuration layering and checks (in-process), and the real
//! `tokenfleet-broker` binary (refusing to start without a key, `--dev`, health, SIGTERM drain,
//! one-shot commands).

// Helpers outside #[test] functions panic on failure too, which is what a test wants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tokenfleet_broker::config::{
    DEFAULT_CONFIG_TOML, LogFormat, RawConfig, StoreBackend, StoreConfig,
};
use tokenfleet_seal::Keyring;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BIN: &str = env!("CARGO_BIN_EXE_tokenfleet-broker");

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The binary with a clean environment (no stray `TOKENFLEET_*` from the caller).
fn broker() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TOKENFLEET_") {
            command.env_remove(name);
        }
    }
    command.kill_on_drop(true);
    command
}

async fn run(command: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("command finished in time")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A port for a broker that is started twice on it: below the ephemeral range, so no client
/// socket can hold it in between (see `tokenfleet_testkit::ports`).
fn free_port() -> u16 {
    tokenfleet_testkit::ports::free_port().unwrap()
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("child still running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("broker exited in time")
        .unwrap()
}

async fn read_all(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> String {
    let mut out = String::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_string(&mut out).await.unwrap();
    }
    out
}

/// Polls gRPC health on `port` until SERVING or the deadline, over TLS with the server
/// certificate checked against `ca_file` (the `--dev` broker serves TLS with its generated CA).
async fn wait_serving_tls(port: u16, ca_file: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = async {
            let pem = std::fs::read(ca_file).ok()?;
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
                    .ok()?
                    .tls_config(
                        tonic::transport::ClientTlsConfig::new()
                            .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                    )
                    .ok()?;
            let channel = endpoint.connect().await.ok()?;
            let mut client = HealthClient::new(channel);
            let response = client
                .check(HealthCheckRequest {
                    service: "tokenfleet.v1.Admin".to_owned(),
                })
                .await
                .ok()?;
            Some(response.into_inner().status())
        }
        .await;
        if status == Some(ServingStatus::Serving) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "broker on port {port} never SERVING (last: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----------------------------------------------------------------------------------------------
// Configuration, in-process
// ----------------------------------------------------------------------------------------------

#[test]
fn defaults_are_documented_values() {
    let raw = RawConfig::default();
    assert_eq!(raw.grpc.listen, "127.0.0.1:50051");
    assert_eq!(raw.http.listen, "127.0.0.1:8080");
    assert_eq!(raw.state_dir, PathBuf::from("./tokenfleet-data"));
    assert_eq!(raw.store.backend, StoreBackend::Embedded);
    assert_eq!(raw.shutdown_grace_seconds, 20);
    assert_eq!(raw.log.format, LogFormat::Text);
    let config = raw.validate().unwrap();
    match &config.store {
        StoreConfig::Embedded { path } => {
            assert_eq!(path, &PathBuf::from("./tokenfleet-data/tokenfleet.redb"))
        }
        other => panic!("{other:?}"),
    }
    assert!(config.keyring.is_none());
    assert!(
        config
            .require_keyring()
            .unwrap_err()
            .to_string()
            .contains("generate-key")
    );
}

#[test]
fn file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "broker.toml",
        "shutdown_grace_seconds = 3\n[grpc]\nlisten = \"127.0.0.1:6000\"\n[log]\nformat = \"json\"\n",
    );
    let raw = RawConfig::load(Some(&file)).unwrap();
    assert_eq!(raw.grpc.listen, "127.0.0.1:6000");
    assert_eq!(
        raw.http.listen, "127.0.0.1:8080",
        "untouched keys keep their defaults"
    );
    assert_eq!(raw.shutdown_grace_seconds, 3);
    assert_eq!(raw.log.format, LogFormat::Json);
    assert_eq!(raw.log.level, "info");
}

#[test]
fn unknown_toml_keys_are_rejected_by_name() {
    let err = RawConfig::from_toml_str("[grpc]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`grpc.lisen`"), "{err}");
    assert!(
        err.contains("listen"),
        "the message lists the valid keys: {err}"
    );

    let err = RawConfig::from_toml_str("stat_dir = \"/tmp\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`stat_dir`"), "{err}");

    let err = RawConfig::from_toml_str("[seal]\nkeys = [{ id = \"a\", keyfile = \"/k\" }]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("keyfile"), "{err}");

    let err = RawConfig::from_toml_str(
        "[store]\nbackend = \"redis\"\n[store.redis]\nurls = [\"redis://127.0.0.1:1\"]\npasword = \"x\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`store.redis.pasword`"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad.toml", "[http]\nport = 80\n");
    let err = RawConfig::load(Some(&file)).unwrap_err().to_string();
    assert!(err.contains("`http.port`"), "{err}");
    assert!(
        err.contains("bad.toml"),
        "the message names the file: {err}"
    );
}

#[test]
fn bad_values_name_the_field() {
    let cases = [
        ("[grpc]\nlisten = \"localhost\"\n", "grpc.listen"),
        ("[http]\nlisten = \"127.0.0.1:x\"\n", "http.listen"),
        ("[store]\nbackend = \"postgres\"\n", "store.backend"),
        ("[store]\nbackend = \"redis\"\n", "store.redis"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[seal]\nkeys = [{ id = \"a\" }]\n", "seal.keys[0]"),
        (
            "[seal]\nkeys = [{ id = \"a\", key_file = \"/nonexistent/k\" }]\n",
            "seal.keys[0].key_file",
        ),
        ("[seal]\ncurrent_key_id = \"a\"\n", "seal.current_key_id"),
        ("shutdown_grace_seconds = -1\n", "shutdown_grace_seconds"),
    ];
    for (toml, field) in cases {
        let err = RawConfig::from_toml_str(toml)
            .and_then(|raw| raw.validate())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{toml:?} → {err}");
    }
}

#[test]
fn secrets_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keyring::generate_key_base64().unwrap();
    let key_file = write(dir.path(), "seal.key", &format!("{key}\n"));
    let password_file = write(dir.path(), "redis.password", "s3cr3t-pw\n");
    let toml = format!(
        "[seal]\nkeys = [{{ id = \"k1\", key_file = {key_file:?} }}]\n\
         [store]\nbackend = \"redis\"\n[store.redis]\nurls = [\"redis://127.0.0.1:6379\"]\npassword_file = {password_file:?}\n"
    );
    let config = RawConfig::from_toml_str(&toml).unwrap().validate().unwrap();
    let keyring = config.require_keyring().unwrap();
    assert_eq!(keyring.current_key_id(), "k1");
    let sealed = keyring.seal("r", b"x").unwrap();
    assert_eq!(keyring.open("r", &sealed).unwrap().as_slice(), b"x");
    match &config.store {
        StoreConfig::Redis(redis) => {
            assert_eq!(redis.password.as_deref(), Some("s3cr3t-pw"));
        }
        other => panic!("{other:?}"),
    }
    let debug = format!("{config:?}");
    assert!(
        !debug.contains("s3cr3t-pw") && !debug.contains(&key),
        "{debug}"
    );

    // A key that is not 32 bytes of base64 is named.
    let short = write(dir.path(), "short.key", "AAAA\n");
    let err = RawConfig::from_toml_str(&format!(
        "[seal]\nkeys = [{{ id = \"k1\", key_file = {short:?} }}]\n"
    ))
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("seal") && err.contains("32 bytes"), "{err}");
}

#[test]
fn print_config_redacts_secrets() {
    let raw = RawConfig::from_toml_str(
        "[store]\nbackend = \"redis\"\n[store.redis]\nurls = [\"redis://app:url-pw@127.0.0.1:6379\"]\npassword = \"inline-pw\"\n",
    )
    .unwrap();
    let printed = raw.to_redacted_toml().unwrap();
    assert!(!printed.contains("url-pw"), "{printed}");
    assert!(!printed.contains("inline-pw"), "{printed}");
    assert!(printed.contains("[redacted]"), "{printed}");
    assert!(
        printed.contains("redis://app:[redacted]@127.0.0.1:6379"),
        "{printed}"
    );
    let debug = format!("{raw:?}");
    assert!(
        !debug.contains("inline-pw") && !debug.contains("url-pw"),
        "{debug}"
    );
}

#[test]
fn default_config_parses_back_to_the_defaults() {
    let parsed = RawConfig::from_toml_str(DEFAULT_CONFIG_TOML).unwrap();
    assert_eq!(parsed, RawConfig::default());
    // Every commented-out example parses too (and is therefore a real key).
    let uncommented: String = DEFAULT_CONFIG_TOML
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || rest.starts_with("  {")
                    || rest.starts_with(']')
                    || rest.contains(" = ") =>
            {
                rest.to_owned()
            }
            _ => line.to_owned(),
        })
        .filter(|line| !line.starts_with("keys = []"))
        .collect::<Vec<_>>()
        .join("\n");
    RawConfig::from_toml_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n---\n{uncommented}"));
}

// ----------------------------------------------------------------------------------------------
// The binary
// ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn env_overrides_file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "broker.toml",
        "[grpc]\nlisten = \"127.0.0.1:6000\"\n[http]\nlisten = \"127.0.0.1:6001\"\n",
    );
    let out = run(broker()
        .arg("print-config")
        .arg("--config")
        .arg(&file)
        .env("TOKENFLEET_GRPC__LISTEN", "127.0.0.1:7000")
        .env("TOKENFLEET_SHUTDOWN_GRACE_SECONDS", "7"))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = RawConfig::from_toml_str(&text(&out.stdout)).unwrap();
    assert_eq!(printed.grpc.listen, "127.0.0.1:7000", "env beats file");
    assert_eq!(printed.http.listen, "127.0.0.1:6001", "file beats default");
    assert_eq!(printed.shutdown_grace_seconds, 7);
    assert_eq!(printed.log.level, "info", "default");
    assert_eq!(
        printed.store.embedded.path,
        Some(PathBuf::from("./tokenfleet-data/tokenfleet.redb")),
        "computed defaults are shown"
    );
}

#[tokio::test]
async fn unknown_env_keys_are_rejected_by_name() {
    let out = run(broker()
        .arg("print-config")
        .env("TOKENFLEET_GRPC__LISEN", "x"))
    .await;
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(err.contains("`grpc.lisen`"), "{err}");
    assert!(err.contains("TOKENFLEET_GRPC__LISEN"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let out = run(broker()
        .arg("print-config")
        .env("TOKENFLEET_STATEDIR", "/x"))
    .await;
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("`statedir`"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn bad_value_in_env_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(broker()
        .arg("serve")
        .env("TOKENFLEET_STATE_DIR", dir.path())
        .env("TOKENFLEET_GRPC__LISTEN", "nonsense"))
    .await;
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(err.contains("grpc.listen"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[tokio::test]
async fn refuses_to_start_without_a_sealing_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(broker().env("TOKENFLEET_STATE_DIR", dir.path().join("state"))).await;
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(err.contains("seal.keys"), "{err}");
    assert!(err.contains("tokenfleet-broker generate-key >"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert!(err.contains("key_file"), "{err}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn default_config_command_parses_back() {
    let out = run(broker().arg("default-config")).await;
    assert!(out.status.success());
    let parsed = RawConfig::from_toml_str(&text(&out.stdout)).unwrap();
    assert_eq!(parsed, RawConfig::default());
}

#[tokio::test]
async fn print_config_command_redacts_secrets() {
    let out = run(broker()
        .arg("print-config")
        .env("TOKENFLEET_STORE__BACKEND", "redis")
        .env(
            "TOKENFLEET_STORE__REDIS__URLS",
            "[\"redis://:envpw@127.0.0.1:6379\"]",
        )
        .env("TOKENFLEET_STORE__REDIS__PASSWORD", "hunter2"))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        !printed.contains("hunter2") && !printed.contains("envpw"),
        "{printed}"
    );
    assert!(printed.contains("password = \"[redacted]\""), "{printed}");
}

#[tokio::test]
async fn generate_key_prints_a_usable_key() {
    let out = run(broker().arg("generate-key")).await;
    assert!(out.status.success());
    let key = text(&out.stdout);
    assert_eq!(key.lines().count(), 1);
    Keyring::from_base64("k", [("k", key.trim())]).unwrap();
}

#[tokio::test]
async fn dev_mode_creates_keys_once_serves_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let grpc_port = free_port();

    let start = || {
        let mut command = broker();
        command
            .args(["serve", "--dev"])
            .env("TOKENFLEET_STATE_DIR", &state_dir)
            .env("TOKENFLEET_GRPC__LISTEN", format!("127.0.0.1:{grpc_port}"))
            .env("TOKENFLEET_HTTP__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command.spawn().unwrap()
    };

    // First start: keys are generated, the API key is printed once.
    let mut child = start();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut key_line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut key_line))
        .await
        .expect("the API key is printed")
        .unwrap();
    let api_key = key_line.trim().to_owned();
    assert!(!api_key.is_empty());
    wait_serving_tls(grpc_port, &state_dir.join("dev-ca.pem")).await;

    assert_eq!(mode(&state_dir), 0o700);
    assert_eq!(mode(&state_dir.join("seal.key")), 0o600);
    assert_eq!(mode(&state_dir.join("admin.key")), 0o600);
    assert_eq!(mode(&state_dir.join("dev-ca.key")), 0o600);
    assert_eq!(mode(&state_dir.join("server.key")), 0o600);
    let admin_key_file = std::fs::read_to_string(state_dir.join("admin.key")).unwrap();
    assert_eq!(admin_key_file.trim(), api_key);
    let seal_key = std::fs::read_to_string(state_dir.join("seal.key")).unwrap();

    sigterm(&child);
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(0), "SIGTERM drains and exits 0");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "", "nothing but the key on stdout");
    let stderr = read_all(child.stderr.take()).await;
    assert!(stderr.contains("DEV MODE"), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{grpc_port}")),
        "bound address logged: {stderr}"
    );
    assert!(stderr.contains("HTTP listening"), "{stderr}");
    assert!(
        !stderr.contains(&api_key),
        "the key is not logged: {stderr}"
    );

    // Second start: same keys, no new API key printed, still says it is dev mode.
    let mut child = start();
    wait_serving_tls(grpc_port, &state_dir.join("dev-ca.pem")).await;
    sigterm(&child);
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        read_all(child.stdout.take()).await,
        "",
        "no new key on the second start"
    );
    assert!(read_all(child.stderr.take()).await.contains("DEV MODE"));
    assert_eq!(
        std::fs::read_to_string(state_dir.join("seal.key")).unwrap(),
        seal_key
    );
    assert_eq!(
        std::fs::read_to_string(state_dir.join("admin.key")).unwrap(),
        admin_key_file
    );
}

#[tokio::test]
async fn create_api_key_prints_only_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keyring::generate_key_base64().unwrap();
    let key_file = write(dir.path(), "seal.key", &key);
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "state_dir = {:?}\n[seal]\nkeys = [{{ id = \"k1\", key_file = {key_file:?} }}]\n",
            dir.path().join("state")
        ),
    );
    let out = run(broker()
        .args([
            "create-api-key",
            "--role",
            "viewer",
            "--description",
            "dashboards",
            "--config",
        ])
        .arg(&config))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        !text(&out.stderr).contains(stdout.trim()),
        "the key is not logged"
    );

    let out = run(broker()
        .args(["create-api-key", "--role", "admin", "--config"])
        .arg(&config))
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("fleet-admin"),
        "{}",
        text(&out.stderr)
    );
}

/// Every role, in every spelling an operator types, through the real binary: each run prints a
/// key that authenticates with the role (and tenant) asked for. `tenant-admin` and `fleet-admin`
/// failed before the role parse normalised both sides of its comparison.
#[tokio::test]
async fn create_api_key_accepts_every_role() {
    use tokenfleet_domain::Role;
    let dir = tempfile::tempdir().unwrap();
    let key = Keyring::generate_key_base64().unwrap();
    let key_file = write(dir.path(), "seal.key", &key);
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "state_dir = {:?}\n[seal]\nkeys = [{{ id = \"k1\", key_file = {key_file:?} }}]\n",
            dir.path().join("state")
        ),
    );
    // The key's tenant must exist: create it in the store first (the broker is not running).
    {
        let cfg = RawConfig::load(Some(config.as_path()))
            .unwrap()
            .validate()
            .unwrap();
        let state = tokenfleet_broker::server::build_state(&cfg).await.unwrap();
        let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
        tokenfleet_broker::records::Records::new(state.store.as_ref())
            .put(
                &tokenfleet_domain::Tenant {
                    name: "acme".into(),
                    display_name: "Acme".into(),
                    stamps: tokenfleet_domain::Stamps::new(now),
                },
                tokenfleet_store::Precondition::Absent,
            )
            .await
            .unwrap();
    }
    let mut created = Vec::new();
    for role in Role::ALL {
        let tenant = (*role != Role::FleetAdmin).then_some("acme");
        let name = role.as_str();
        for spelling in [
            name.to_owned(),
            name.replace('-', "_"),
            name.to_ascii_uppercase(),
        ] {
            let mut command = broker();
            command.args(["create-api-key", "--role", &spelling, "--config"]);
            command.arg(&config);
            if let Some(t) = tenant {
                command.args(["--tenant", t]);
            }
            let out = run(&mut command).await;
            assert!(
                out.status.success(),
                "--role {spelling}: {}",
                text(&out.stderr)
            );
            let printed = text(&out.stdout).trim().to_owned();
            assert!(printed.starts_with("tfk_"), "--role {spelling}: {printed}");
            created.push((*role, tenant, printed));
        }
    }
    let cfg = RawConfig::load(Some(config.as_path()))
        .unwrap()
        .validate()
        .unwrap();
    let state = tokenfleet_broker::server::build_state(&cfg).await.unwrap();
    for (role, tenant, key) in created {
        let principal = tokenfleet_broker::api_keys::authenticate(&state, &key)
            .await
            .unwrap();
        assert_eq!(principal.role, role);
        assert_eq!(principal.tenant.as_deref(), tenant);
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The README's quick start: `tokenfleet-broker serve --dev` on a fresh state directory, then
/// grpcurl with the dev CA lists the services and the health check answers SERVING.
#[tokio::test]
async fn readme_quick_start_is_discoverable_with_grpcurl() {
    let Some(grpcurl) = find_on_path("grpcurl") else {
        if std::env::var_os("CI").is_some() {
            panic!("grpcurl is not on PATH: run scripts/test-setup.sh");
        }
        eprintln!("NOTICE: grpcurl is not on PATH; skipping (scripts/test-setup.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let grpc_port = free_port();
    let mut child = broker()
        .args(["serve", "--dev"])
        .current_dir(dir.path())
        .env("TOKENFLEET_GRPC__LISTEN", format!("127.0.0.1:{grpc_port}"))
        .env("TOKENFLEET_HTTP__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The README's default state directory, relative to where the broker runs.
    let ca = dir.path().join("tokenfleet-data").join("dev-ca.pem");
    wait_serving_tls(grpc_port, &ca).await;

    let grpcurl_run = |args: Vec<String>| {
        let grpcurl = grpcurl.clone();
        async move {
            let output = tokio::process::Command::new(grpcurl)
                .args(args)
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "grpcurl failed: {}",
                text(&output.stderr)
            );
            text(&output.stdout)
        }
    };
    let common = |extra: &[&str]| {
        let mut args = vec![
            "-cacert".to_owned(),
            ca.display().to_string(),
            "-authority".to_owned(),
            "localhost".to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let target = format!("127.0.0.1:{grpc_port}");
    let listed = grpcurl_run(common(&[&target, "list"])).await;
    for expected in [
        "tokenfleet.v1.Admin",
        "tokenfleet.v1.TokenBroker",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.lines().any(|l| l.trim() == expected),
            "{expected} missing: {listed}"
        );
    }
    let health = grpcurl_run(common(&[&target, "grpc.health.v1.Health/Check"])).await;
    assert!(health.contains("\"SERVING\""), "{health}");

    sigterm(&child);
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

// ----------------------------------------------------------------------------------------------
// Listener limits ([limits]), through the real binary and raw sockets
// ----------------------------------------------------------------------------------------------

/// Raw HTTP/2 (prior knowledge, cleartext) so the test can do what an attacker does: ignore the
/// server's SETTINGS and open more streams than allowed, never sending a request body.
mod raw_h2 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 127);
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }

    /// HPACK of a gRPC health check request, literals without indexing (no dynamic table).
    pub fn health_check_headers() -> Vec<u8> {
        let mut h = vec![0x83, 0x86]; // :method POST, :scheme http
        h.push(0x04); // :path
        string(&mut h, "/grpc.health.v1.Health/Check");
        h.push(0x01); // :authority
        string(&mut h, "127.0.0.1");
        h.extend_from_slice(&[0x0f, 0x10]); // content-type (static index 31)
        string(&mut h, "application/grpc");
        h.push(0x00); // te (new name)
        string(&mut h, "te");
        string(&mut h, "trailers");
        h
    }

    /// The frames the server sends within `wait`: `(type, flags, stream, payload)`.
    pub async fn read_frames(
        s: &mut TcpStream,
        wait: std::time::Duration,
    ) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut buf = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let mut frames = Vec::new();
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            if buf.len() < at + 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                & 0x7fff_ffff;
            frames.push((
                buf[at + 3],
                buf[at + 4],
                stream,
                buf[at + 9..at + 9 + len].to_vec(),
            ));
            at += 9 + len;
        }
        frames
    }

    /// Opens `n` streams (ids 1, 3, …) with HEADERS but no END_STREAM and no data.
    pub async fn open_half_open_streams(s: &mut TcpStream, n: u32) {
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        let block = health_check_headers();
        for i in 0..n {
            out.extend(frame(HEADERS, 0x4, 2 * i + 1, &block));
        }
        s.write_all(&out).await.unwrap();
    }

    /// The value of `id` in a SETTINGS payload.
    pub fn setting(payload: &[u8], id: u16) -> Option<u32> {
        payload.chunks_exact(6).find_map(|p| {
            (u16::from_be_bytes([p[0], p[1]]) == id)
                .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
        })
    }
}

/// Starts the real broker (plaintext gRPC, embedded store) with `limits` as its `[limits]`
/// section; returns the child and the gRPC and HTTP ports once gRPC health is SERVING.
async fn broker_with_limits(dir: &Path, limits: &str) -> (Child, u16, u16) {
    let key = Keyring::generate_key_base64().unwrap();
    let key_file = write(dir, "seal.key", &key);
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let [grpc, http] = tokenfleet_testkit::ports::free_ports::<2>().unwrap();
    let config = write(
        dir,
        "broker.toml",
        &format!(
            "state_dir = {:?}\n[grpc]\nlisten = \"127.0.0.1:{grpc}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [seal]\nkeys = [{{ id = \"k1\", key_file = {key_file:?} }}]\n[limits]\n{limits}\n",
            dir.join("state")
        ),
    );
    let child = broker()
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(grpc).await != Some(ServingStatus::Serving) {
        assert!(Instant::now() < deadline, "broker never SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, grpc, http)
}

/// gRPC health of the whole server over plaintext, on a new connection.
async fn health(port: u16) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status())
}

#[tokio::test]
async fn grpc_advertises_and_enforces_the_stream_limit_and_ends_half_open_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, grpc, _) = broker_with_limits(
        dir.path(),
        "grpc_max_concurrent_streams = 5\ngrpc_request_timeout_seconds = 2",
    )
    .await;

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", grpc))
        .await
        .unwrap();
    raw_h2::open_half_open_streams(&mut s, 12).await;
    let frames = raw_h2::read_frames(&mut s, Duration::from_secs(4)).await;

    // Advertised: the server's first SETTINGS carry the limits.
    let settings = frames
        .iter()
        .find(|(kind, flags, _, _)| *kind == raw_h2::SETTINGS && flags & 0x1 == 0)
        .expect("the server sent SETTINGS");
    assert_eq!(
        raw_h2::setting(&settings.3, raw_h2::SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(5),
        "max concurrent streams advertised"
    );
    assert_eq!(
        raw_h2::setting(&settings.3, raw_h2::SETTINGS_MAX_HEADER_LIST_SIZE),
        Some(16 * 1024),
        "header list size advertised"
    );
    // Enforced: the 7 streams over the limit are refused at once.
    let refused: Vec<u32> = frames
        .iter()
        .filter(|(kind, _, _, p)| {
            *kind == raw_h2::RST_STREAM
                && p.len() == 4
                && u32::from_be_bytes([p[0], p[1], p[2], p[3]]) == raw_h2::REFUSED_STREAM
        })
        .map(|(_, _, stream, _)| *stream)
        .collect();
    assert_eq!(
        refused.len(),
        7,
        "streams refused: {refused:?} (frames {frames:?})"
    );
    // The 5 accepted half-open calls are answered (timed out) within the request timeout
    // instead of being held forever.
    let answered: std::collections::BTreeSet<u32> = frames
        .iter()
        .filter(|(kind, _, stream, _)| *kind == raw_h2::HEADERS && !refused.contains(stream))
        .map(|(_, _, stream, _)| *stream)
        .collect();
    assert_eq!(answered.len(), 5, "half-open calls ended: {answered:?}");
    assert!(
        !frames.iter().any(|(kind, ..)| *kind == raw_h2::GOAWAY),
        "the connection itself stays up"
    );
    // Others are still served meanwhile.
    assert_eq!(health(grpc).await, Some(ServingStatus::Serving));

    drop(s);
    sigterm(&child);
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

#[tokio::test]
async fn http_disconnects_slow_header_clients_and_caps_connections() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let (mut child, grpc, http) = broker_with_limits(
        dir.path(),
        "http_header_read_timeout_seconds = 1\nhttp_max_connections = 3",
    )
    .await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", http));

    // A client sending its header a line every 300 ms is cut off after about 1 s.
    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let cut = async {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow
                .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
                Ok(Ok(_)) | Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
        panic!("a slow-header client was never disconnected");
    };
    cut.await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "disconnected after {took:?}, expected about 1 s"
    );

    // Three idle connections hold every slot: a fourth closes the one idle longest for its slot
    // and is answered (over the limit it used to be closed at once, unanswered).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect().await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = connect().await.unwrap();
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), fourth.read_to_string(&mut answer))
        .await
        .expect("the fourth connection was answered")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // gRPC is another listener: unaffected.
    assert_eq!(health(grpc).await, Some(ServingStatus::Serving));

    // Once the idle ones are timed out, requests are served again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(held);
    let mut ok = connect().await.unwrap();
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), ok.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    sigterm(&child);
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

/// `[admin] bootstrap_key_file` through the real binary on the embedded store (which a second
/// process cannot open while the broker runs): `generate-api-key` prints a key without storing
/// it; the broker stores it at start, it authenticates as fleet-admin, a restart keeps it (and
/// does not store it twice), and a malformed key or a different key under the same id stop the
/// broker with exit 64 naming the file and never the key.
#[tokio::test]
async fn bootstrap_key_file_gives_the_first_admin_key_on_the_embedded_store() {
    use tokenfleet_proto::v1::ListApiKeysRequest;
    let dir = tempfile::tempdir().unwrap();
    let out = run(broker().arg("generate-api-key")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_owned();
    assert!(
        key.starts_with("tfk_") && key.len() == 4 + 12 + 1 + 43,
        "{key}"
    );
    let key_file = write(dir.path(), "bootstrap.key", &format!("{key}\n"));
    let admin_section = format!("\n[admin]\nbootstrap_key_file = {key_file:?}\n");

    for round in 0..2 {
        let (mut child, grpc, _http) = broker_with_limits(dir.path(), &admin_section).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let keys = crate::support::admin_client(channel.clone(), Some(&key))
            .list_api_keys(ListApiKeysRequest::default())
            .await
            .unwrap_or_else(|e| panic!("round {round}: the bootstrap key is refused: {e}"))
            .into_inner()
            .api_keys;
        assert_eq!(keys.len(), 1, "round {round}: stored once: {keys:?}");
        assert_eq!(keys[0].id, key[4..16]);
        assert_eq!(keys[0].role, "fleet-admin");
        let other = crate::support::admin_client(channel, Some(&format!("{}x", &key[..60])))
            .list_api_keys(ListApiKeysRequest::default())
            .await
            .unwrap_err();
        assert_eq!(other.code(), tonic::Code::Unauthenticated);
        sigterm(&child);
        assert!(wait_exit(&mut child).await.success());
        let stderr = read_all(child.stderr.take()).await;
        assert!(
            !stderr.contains(&key[16..]),
            "the key's secret is never logged"
        );
    }

    // A different key under the same id, then a malformed key: exit 64, the file named.
    let secret_b = &key[17..];
    let mut other_secret: Vec<u8> = secret_b.bytes().collect();
    other_secret[0] = if other_secret[0] == b'A' { b'B' } else { b'A' };
    let conflicting = format!("{}{}", &key[..17], String::from_utf8(other_secret).unwrap());
    for (content, expect) in [
        (conflicting.as_str(), "a different key with id"),
        ("tfk_not-a-key", "not an API key"),
    ] {
        std::fs::write(&key_file, content).unwrap();
        let out = run(broker()
            .args(["serve", "--config"])
            .arg(dir.path().join("broker.toml")))
        .await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("admin.bootstrap_key_file"), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
        assert!(
            !stderr.contains(content),
            "the key is never printed: {stderr}"
        );
    }
}

/// `check-config` through the real binary: every unknown key, ill-typed value and invalid value at
/// once (schema problems and the invalid values of what did parse, in one run), each naming its
/// key and its source (the file, or the environment variable), exit 64; a
/// valid configuration exits 0 with a summary. `print-config` checks before it prints.
#[tokio::test]
async fn check_config_reports_every_problem_at_once_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "state_dir = {:?}\nshutdown_grace_secs = 5\n[grpc]\nlisten = \"nope\"\nlisen = \"x\"\n\
             [http]\nlisten = 8080\n[tokens]\nlease_ttl_seconds = \"soon\"\n\
             [seal]\nkeys = [{{ id = \"k1\", key_file = {:?} }}]\n",
            dir.path().join("state"),
            dir.path().join("missing.key"),
        ),
    );
    let out = run(broker()
        .args(["check-config", "--config"])
        .arg(&config)
        .env("TOKENFLEET_LIMITS__GRPC_MAX_STREAMS", "5"))
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let file = config.display().to_string();
    for expected in [
        "unknown key `shutdown_grace_secs` (expected one of: ".to_owned(),
        format!("unknown key `grpc.lisen` (expected one of: listen) (in {file})"),
        format!(
            "`http.listen`: invalid type: found signed int `8080`, expected a string (in {file})"
        ),
        "`tokens.lease_ttl_seconds`: invalid type: found a string (4 characters), expected u64"
            .to_owned(),
        "unknown key `limits.grpc_max_streams`".to_owned(),
        "(from environment variable TOKENFLEET_LIMITS__GRPC_MAX_STREAMS)".to_owned(),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    // The values that did parse are checked in the same run.
    assert!(
        stderr.contains("`grpc.listen`: `nope` is not a socket address"),
        "{stderr}"
    );
    assert!(stderr.contains("`seal.keys[0].key_file`"), "{stderr}");
    assert!(stderr.contains("7 problems"), "{stderr}");
    assert!(
        !stderr.contains("soon"),
        "text values are not repeated: {stderr}"
    );

    // A secret in the wrong place (a sealing key where the list of keys belongs) is named by its
    // key and source, never shown.
    let out = run(broker()
        .args(["check-config", "--config"])
        .arg(&config)
        .env(
            "TOKENFLEET_SEAL__KEYS",
            "c2VjcmV0LXNlYWxpbmcta2V5LW1hdGVyaWFs",
        ))
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("`seal.keys`: invalid type: found a string (36 characters)")
            && stderr.contains("(from environment variable TOKENFLEET_SEAL__KEYS)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("c2VjcmV0"),
        "the value is never shown: {stderr}"
    );

    // With the schema right, the invalid values are all reported too.
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "state_dir = {:?}\n[grpc]\nlisten = \"nope\"\n[http]\nlisten = \"127.0.0.1:1\"\n\
             [log]\nlevel = \"=\"\n[seal]\nkeys = [{{ id = \"k1\", key_file = {:?} }}]\n",
            dir.path().join("state"),
            dir.path().join("missing.key"),
        ),
    );
    for command in ["check-config", "print-config"] {
        let out = run(broker().arg(command).arg("--config").arg(&config)).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{command}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{command} printed a configuration it refuses"
        );
        for expected in [
            "3 problems",
            "`grpc.listen`: `nope` is not a socket address",
            "`log.level`: `=` is not a log filter",
            "`seal.keys[0].key_file`",
        ] {
            assert!(
                stderr.contains(expected),
                "{command}: missing {expected:?} in:\n{stderr}"
            );
        }
    }

    // A valid configuration.
    let key_file = write(
        dir.path(),
        "seal.key",
        &Keyring::generate_key_base64().unwrap(),
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "state_dir = {:?}\n[seal]\nkeys = [{{ id = \"k1\", key_file = {key_file:?} }}]\n",
            dir.path().join("state"),
        ),
    );
    let out = run(broker().args(["check-config", "--config"]).arg(&config)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("configuration OK: gRPC on 127.0.0.1:50051"),
        "{stdout}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "check-config starts nothing and writes nothing"
    );
}
