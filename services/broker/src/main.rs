//! `tokenfleet-broker`: tracing → configuration (bad configuration exits 64) → build → serve until
//! SIGTERM/SIGINT → drain. Everything else lives in the library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use tokenfleet_broker::config::{
    ConfigError, DEFAULT_CONFIG_TOML, LogConfig, LogFormat, RawConfig,
};
use tokenfleet_broker::server::{self, ServeError};
use tokenfleet_broker::{api_keys, dev, reseal};
use tokenfleet_domain::Role;
use tokenfleet_seal::{Keyring, Secret};

/// jemalloc instead of glibc's malloc. Measured on the release binary (`bench issuance`, idle
/// 2-core machine, back to back): cached-token issuance 19.7k → 22.7k/s (embedded, 64 in flight),
/// 23.0k → 31.9k (embedded, 256), 13.9k → 21.3k (Redis, 64), 14.9k → 27.6k (Redis, 256): glibc's
/// arena locks, `malloc_consolidate` and futex wake-ups were a quarter of the broker's CPU. With
/// 10,000 connected agents (`bench fleet --replicas 1`) the peak RSS went 493 → 460 MiB.
/// mimalloc, also tried, was as fast but held 654 MiB there, above the 512 MiB ceiling.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// The tokenfleet token broker.
#[derive(Debug, Parser)]
#[command(name = "tokenfleet-broker", version, about)]
struct Cli {
    /// TOML configuration file (overlaid by TOKENFLEET_* environment variables).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(flatten)]
    serve: ServeArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Try things out: generate a sealing key and a bootstrap admin API key in the state directory.
    /// Not for production.
    #[arg(long)]
    dev: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default without a subcommand).
    Serve(ServeArgs),
    /// Print the effective configuration as TOML, secrets redacted, after checking it (exit 64
    /// and every problem when it is not valid).
    PrintConfig,
    /// Check the configuration as `serve` would (every unknown key, ill-typed or invalid value,
    /// unreadable file, with its source) without starting anything: exit 0 when valid, else 64
    /// and every problem. For CI pipelines and before a restart.
    CheckConfig,
    /// Print a commented configuration file holding every default.
    DefaultConfig,
    /// Create an admin API key and print it once on stdout.
    CreateApiKey {
        /// fleet-admin, tenant-admin or viewer.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Tenant the key is limited to (required for tenant-admin).
        #[arg(long)]
        tenant: Option<String>,
        /// What the key is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Re-seal every stored secret with the current sealing key (after a key rotation).
    Reseal,
    /// Print a fresh base64 sealing key.
    GenerateKey,
    /// Print a new random fleet-admin API key without storing it, for `[admin]
    /// bootstrap_key_file` (e.g. a Kubernetes Secret); the broker stores its hash at start.
    GenerateApiKey,
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| {
        let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
        format!(
            "unknown role `{text}` (expected one of: {})",
            names.join(", ")
        )
    })
}

/// What went wrong, and with which exit status.
enum Failure {
    Config(String),
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Self::Config(error.to_string())
    }
}

impl From<ServeError> for Failure {
    fn from(error: ServeError) -> Self {
        match error {
            ServeError::Config(config) => Self::Config(config.to_string()),
            other => Self::Other(other.into()),
        }
    }
}

impl From<dev::DevError> for Failure {
    fn from(error: dev::DevError) -> Self {
        match error {
            dev::DevError::StateDir(serve) => serve.into(),
            other => Self::Other(other.into()),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::Other(error)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.serve.dev && !matches!(cli.command, None | Some(Command::Serve(_))) {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--dev only applies to `serve`",
            )
            .exit();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokenfleet-broker: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(message)) => {
            eprintln!("tokenfleet-broker: {message}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(error)) => {
            eprintln!("tokenfleet-broker: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let config_file = cli.config.as_deref();
    match cli.command {
        None => serve(RawConfig::load(config_file)?, cli.serve.dev).await,
        Some(Command::Serve(args)) => {
            serve(RawConfig::load(config_file)?, cli.serve.dev || args.dev).await
        }
        Some(Command::PrintConfig) => {
            let raw = RawConfig::load(config_file)?;
            raw.validate()?;
            print_stdout(&raw.to_redacted_toml()?)
        }
        Some(Command::CheckConfig) => {
            let config = RawConfig::load(config_file)?.validate()?;
            let keyring = config.require_keyring()?;
            let store = match &config.store {
                tokenfleet_broker::config::StoreConfig::Embedded { path } => {
                    format!("embedded ({})", path.display())
                }
                tokenfleet_broker::config::StoreConfig::Redis(_) => "redis".to_owned(),
            };
            print_stdout(&format!(
                "configuration OK: gRPC on {}, HTTP on {}, store {store}, sealing key {}, traces {}\n",
                config.grpc_listen,
                config.http_listen,
                keyring.current_key_id(),
                config.tracing.describe(),
            ))
        }
        Some(Command::DefaultConfig) => print_stdout(DEFAULT_CONFIG_TOML),
        Some(Command::GenerateKey) => {
            let key = Secret::new(Keyring::generate_key_base64().context("generating a key")?);
            print_stdout(&format!("{}\n", key.expose()))
        }
        Some(Command::GenerateApiKey) => {
            let key = api_keys::generate().context("generating an API key")?;
            print_stdout(&format!("{}\n", key.expose()))
        }
        Some(Command::CreateApiKey {
            role,
            tenant,
            description,
        }) => {
            let config = RawConfig::load(config_file)?.validate()?;
            init_tracing(&config.log)?;
            let state = server::build_state(&config).await?;
            let (api_key, secret) = api_keys::create(&state, role, tenant.as_deref(), description)
                .await
                .context("creating the API key")?;
            tracing::info!(id = %api_key.id, role = %api_key.role, "API key created");
            print_stdout(&format!("{}\n", secret.expose()))
        }
        Some(Command::Reseal) => {
            let config = RawConfig::load(config_file)?.validate()?;
            init_tracing(&config.log)?;
            let state = server::build_state(&config).await?;
            let report = reseal::reseal_all(&state)
                .await
                .context("re-sealing secrets")?;
            print_stdout(&format!("{report}\n"))
        }
    }
}

async fn serve(mut raw: RawConfig, dev_mode: bool) -> Result<(), Failure> {
    if dev_mode {
        eprintln!("{}", dev::BANNER);
        dev::prepare(&mut raw)?;
    }
    let config = raw.validate()?;
    let (otel, traces) =
        tokenfleet_telemetry::otel_layer(&config.tracing, env!("CARGO_PKG_VERSION"))
            .map_err(|e| Failure::Config(format!("configuration: `tracing`: {e}")))?;
    init_tracing_with(&config.log, otel)?;
    if config.tracing.otlp_endpoint.is_some() {
        tracing::info!(traces = %config.tracing.describe(), "OpenTelemetry traces on");
    }
    let served = serve_traced(config, dev_mode).await;
    // Blocking: the last batch goes to the collector (bounded by the export timeout).
    let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    served
}

async fn serve_traced(
    config: tokenfleet_broker::config::BrokerConfig,
    dev_mode: bool,
) -> Result<(), Failure> {
    let shutdown = shutdown_signal().context("installing signal handlers")?;

    let state = server::build_state(&config).await?;
    if let Some(path) = &config.bootstrap_key_file {
        bootstrap_key(&state, path).await?;
    }
    if dev_mode && let Some(key) = dev::bootstrap_admin_key(&state, &config.state_dir).await? {
        let path = config.state_dir.join(dev::ADMIN_KEY_FILE);
        eprintln!(
            "\n{}\n  A fleet-admin API key was created and is printed ONCE on stdout below.\n  \
             It is also in {} (mode 0600).\n{}\n",
            "!".repeat(80),
            path.display(),
            "!".repeat(80)
        );
        print_stdout(&format!("{}\n", key.expose()))?;
    }
    let (grpc, http) = server::bind(&config).await?;
    server::serve(config, state, grpc, http, shutdown).await?;
    Ok(())
}

/// Stores the fleet-admin key in `[admin] bootstrap_key_file` unless it is stored already. A file
/// that cannot be read, a malformed key or a different key under its id stop the broker with a
/// configuration error naming the file (never the key).
async fn bootstrap_key(
    state: &tokenfleet_broker::state::BrokerState,
    path: &std::path::Path,
) -> Result<(), Failure> {
    let bad = |e: &dyn std::fmt::Display| {
        Failure::Config(format!(
            "configuration: `admin.bootstrap_key_file` {}: {e}",
            path.display()
        ))
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
    match api_keys::bootstrap(state, &Secret::new(text)).await {
        Ok(api_keys::Bootstrap::Stored) => {
            tracing::info!(file = %path.display(), "bootstrap fleet-admin key stored");
            Ok(())
        }
        Ok(api_keys::Bootstrap::AlreadyStored) => {
            tracing::info!(file = %path.display(), "bootstrap fleet-admin key already stored");
            Ok(())
        }
        Err(api_keys::BootstrapError::Store(e)) => Err(Failure::Other(
            anyhow::Error::new(e).context("storing the bootstrap API key"),
        )),
        Err(e) => Err(bad(&e)),
    }
}

/// Completes on the first SIGTERM or SIGINT. Handlers are installed right away so a signal that
/// arrives while the broker starts is not lost.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn init_tracing(log: &LogConfig) -> Result<(), Failure> {
    init_tracing_with(log, None)
}

/// Logs to stderr per `[log]`; with `otel`, tokenfleet's spans also go to the OTLP collector
/// (the log filter does not apply to them).
fn init_tracing_with(
    log: &LogConfig,
    otel: Option<tokenfleet_telemetry::OtelLayer>,
) -> Result<(), Failure> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .map_err(|e| Failure::Config(format!("configuration: `log.level`: {e}")))?;
    // Colour only for a person at a terminal, never into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = match log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(lines.with_filter(filter))
        .try_init()
        .map_err(|e| Failure::Other(anyhow::anyhow!("installing the logger: {e}")))
}

fn print_stdout(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    Ok(())
}
