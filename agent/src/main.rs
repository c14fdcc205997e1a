//! `tokenfleet-agent`: enrollment, certificate renewal and `run` (the running agent). Thin: parsing, logging, and the
//! library's [`tokenfleet_agent::identity`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokenfleet_agent::identity::{self, EnrollmentCode};

/// The tokenfleet fleet agent.
#[derive(Debug, Parser)]
#[command(name = "tokenfleet-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct StateDir {
    /// Directory for the agent's key, certificate and state (created with mode 0700).
    #[arg(
        long,
        env = "TOKENFLEET_AGENT_STATE_DIR",
        default_value = "./tokenfleet-agent-data",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll with the broker: generate a key pair here (it never leaves this machine), send a
    /// certificate request with the one-time code, store the certificate the broker issues.
    Enroll {
        /// The broker's gRPC URL, e.g. https://broker.example.com:50051.
        #[arg(long, env = "TOKENFLEET_BROKER", value_name = "URL")]
        broker: String,
        /// The one-time enrollment code (`tokenfleetctl agent enroll-code`).
        #[arg(
            long,
            env = "TOKENFLEET_ENROLLMENT_CODE",
            value_name = "CODE",
            hide_env_values = true,
            required_unless_present = "code_file"
        )]
        code: Option<String>,
        /// File holding the enrollment code (keeps it out of the process list).
        #[arg(long, value_name = "PATH", conflicts_with = "code")]
        code_file: Option<PathBuf>,
        /// CA certificate (PEM) to check the broker's certificate against instead of the system
        /// roots; kept in the state directory for later calls.
        #[arg(long, value_name = "PATH")]
        ca_file: Option<PathBuf>,
        /// Do nothing (exit 0) when the state directory already holds this agent's identity:
        /// for an init step that runs before every start (a container, a unit's ExecStartPre),
        /// where the one-time code works only the first time.
        #[arg(long)]
        if_not_enrolled: bool,
        #[command(flatten)]
        state: StateDir,
    },
    /// Renew the client certificate now (with a new key pair); with --watch, keep it renewed at
    /// two thirds of each certificate's lifetime until stopped.
    Renew {
        /// Keep renewing until SIGTERM/SIGINT.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        state: StateDir,
    },
    /// Run the agent: SMTP ingress for the devices, durable spool, delivery upstream with
    /// tokens from the broker, status stream; until SIGTERM/SIGINT.
    Run {
        /// Local configuration file (TOML); TOKENFLEET_AGENT_* variables override it.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// State directory (overrides `state_dir` of the file and the environment).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print a commented configuration file holding every default.
    DefaultConfig,
    /// Print the effective configuration (defaults, the file, the environment) as TOML, after
    /// checking it: exit 64 and every problem when it is not valid.
    PrintConfig {
        /// Local configuration file (TOML).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// State directory (overrides `state_dir` of the file and the environment).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Check the configuration as `run` would, without starting anything: exit 0 with a
    /// summary, or 64 and every problem (for CI pipelines).
    CheckConfig {
        /// Local configuration file (TOML).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// State directory (overrides `state_dir` of the file and the environment).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show the agent's identity and certificate expiry.
    Status {
        #[command(flatten)]
        state: StateDir,
    },
}

use tokenfleet_agent::config::LogFormat;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Run { config, state_dir } => {
            return run_agent(config.as_deref(), state_dir.as_deref());
        }
        Command::DefaultConfig => {
            print!("{}", tokenfleet_agent::config::DEFAULT_CONFIG_TOML);
            return ExitCode::SUCCESS;
        }
        Command::PrintConfig { config, state_dir } | Command::CheckConfig { config, state_dir } => {
            return config_command(&cli.command, config.as_deref(), state_dir.as_deref());
        }
        _ => init_tracing("info", LogFormat::Text),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokenfleet-agent: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenfleet-agent: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr with `level` (`RUST_LOG` wins when set) in `format`.
fn init_tracing(level: &str, format: LogFormat) {
    init_tracing_with(level, format, None);
}

/// [`init_tracing`], and with `otel` the agent's spans also go to the OTLP collector (the log
/// filter does not apply to them).
fn init_tracing_with(
    level: &str,
    format: LogFormat,
    otel: Option<tokenfleet_telemetry::OtelLayer>,
) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only for a person at a terminal, never into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = match format {
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
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(lines.with_filter(filter))
        .try_init();
}

/// `print-config` and `check-config`: the checked configuration, or exit 64 with every problem.
fn config_command(
    command: &Command,
    config: Option<&std::path::Path>,
    state_dir: Option<&std::path::Path>,
) -> ExitCode {
    use tokenfleet_agent::config::{AgentSettings, RawAgentConfig};
    let settings = match AgentSettings::load(config, state_dir) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("tokenfleet-agent: error: {error}");
            return ExitCode::from(64);
        }
    };
    if let Command::CheckConfig { .. } = command {
        println!(
            "configuration OK: SMTP on {}, POP3 {}, state in {}, spool in {}, metrics {}, traces {}",
            settings.smtp_listen,
            settings
                .pop3_listen
                .map_or_else(|| "off".to_owned(), |a| format!("on {a}")),
            settings.state_dir.display(),
            settings.spool_dir.display(),
            settings
                .metrics
                .listen
                .map_or_else(|| "off".to_owned(), |a| format!("on {a}")),
            settings.tracing.describe(),
        );
        return ExitCode::SUCCESS;
    }
    match RawAgentConfig::load_raw(config, state_dir).and_then(|raw| raw.to_toml()) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tokenfleet-agent: error: {error}");
            ExitCode::from(64)
        }
    }
}

/// `run`: bad configuration exits 64 (EX_USAGE), other failures 1, a clean stop 0.
fn run_agent(config: Option<&std::path::Path>, state_dir: Option<&std::path::Path>) -> ExitCode {
    let settings = match tokenfleet_agent::config::AgentSettings::load(config, state_dir) {
        Ok(settings) => settings,
        Err(error) => {
            init_tracing("info", LogFormat::Text);
            eprintln!("tokenfleet-agent: error: {error}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tokenfleet-agent: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The exporter's gRPC channel lives on this runtime.
    let exporter = {
        let _runtime = runtime.enter();
        tokenfleet_telemetry::otel_layer(&settings.tracing, VERSION)
    };
    let (otel, traces) = match exporter {
        Ok(built) => built,
        Err(error) => {
            init_tracing("info", LogFormat::Text);
            eprintln!("tokenfleet-agent: error: configuration: tracing: {error}");
            return ExitCode::from(64);
        }
    };
    init_tracing_with(&settings.log_level, settings.log_format, otel);
    tracing::info!(
        version = VERSION,
        smtp = %settings.smtp_listen,
        state_dir = %settings.state_dir.display(),
        traces = %settings.tracing.describe(),
        "tokenfleet-agent starting"
    );
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        tokenfleet_agent::runtime::wiring::run(settings, shutdown).await
    });
    // The runtime still runs (its worker threads): the last spans go out over its channel.
    traces.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tokenfleet-agent: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn describe(identity: &identity::StoredIdentity) -> String {
    format!(
        "agent {}/{} at {}\ncertificate valid until {}, renewal due {}",
        identity.info.tenant,
        identity.info.agent,
        identity.info.broker_url,
        identity.not_after,
        identity.renewal_time()
    )
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Enroll {
            broker,
            code,
            code_file,
            ca_file,
            if_not_enrolled,
            state,
        } => {
            if if_not_enrolled && let Ok(existing) = identity::load(&state.state_dir) {
                println!("already enrolled {}", describe(&existing));
                return Ok(());
            }
            let code = match (code, code_file) {
                (Some(code), _) => EnrollmentCode::new(&code),
                (None, Some(path)) => EnrollmentCode::new(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("reading --code-file {}", path.display()))?,
                ),
                (None, None) => anyhow::bail!("give --code or --code-file"),
            };
            let ca = ca_file
                .map(|path| {
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading --ca-file {}", path.display()))
                })
                .transpose()?;
            let enrolled = identity::enroll(&broker, &code, ca, &state.state_dir, VERSION).await?;
            println!("enrolled {}", describe(&enrolled));
            Ok(())
        }
        Command::Renew { watch, state } => {
            let renewed = identity::renew(&state.state_dir, VERSION).await?;
            println!("renewed {}", describe(&renewed));
            if watch {
                identity::keep_renewed(&state.state_dir, VERSION, |_| {}, shutdown_signal()?)
                    .await?;
            }
            Ok(())
        }
        Command::Run { .. }
        | Command::DefaultConfig
        | Command::PrintConfig { .. }
        | Command::CheckConfig { .. } => anyhow::bail!("started by main"),
        Command::Status { state } => {
            let current = identity::load(&state.state_dir)?;
            println!("{}", describe(&current));
            Ok(())
        }
    }
}

fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing signal handlers")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing signal handlers")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
