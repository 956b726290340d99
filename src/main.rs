//! The `temma` command: parses the CLI, loads the configuration (exiting non-zero before
//! anything binds if it is invalid), starts logging and runs until SIGTERM or Ctrl-C.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use temma::config::{self, Config, Role};
use temma::server::LogFormat;

/// Exit status for an invalid configuration.
const EXIT_CONFIG: u8 = 2;
/// Exit status when start-up or shutdown fails.
const EXIT_FAILURE: u8 = 1;
/// Extra time after the grace period before shutdown is called unclean.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "temma",
    version,
    about = "A config-first real-time chat server (SSE + ZeroMQ)"
)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the web server, and the broker too when `[broker] embedded = true` (the default).
    Serve,
    /// Run the broker alone (Temma's `bin/comma Broker run`).
    Broker,
    /// Validate the configuration exactly as start-up does, without binding anything.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("temma: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Check = command {
        println!("{}", summary(&config));
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("temma: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(run(command, config))
}

async fn run(command: Command, config: Config) -> ExitCode {
    let shutdown = CancellationToken::new();
    let started = match command {
        Command::Broker => temma::App::broker(&config, shutdown.clone()).await,
        _ => temma::App::serve(&config, shutdown.clone()).await,
    };
    let app = match started {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "start-up failed");
            eprintln!("temma: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    let limit = Duration::from_secs(config.server.shutdown_grace_secs) + SHUTDOWN_SLACK;
    match tokio::time::timeout(limit, app.wait()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(_) => {
            tracing::error!(
                seconds = limit.as_secs(),
                "tasks still running after the grace period"
            );
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// What `temma check` prints for a valid configuration.
fn summary(config: &Config) -> String {
    let mut lines = vec![format!(
        "configuration `{}` is valid",
        config.file.display()
    )];
    lines.push(format!("  http: http://{}", config.server.listen));
    lines.push(format!(
        "  broker: {}",
        if config.broker.embedded {
            "embedded in `temma serve`"
        } else {
            "separate (`temma broker`)"
        }
    ));
    for role in Role::ALL {
        lines.push(format!(
            "  {}: {} = {}",
            role.key(),
            config.role_name(role),
            config.dsn(role)
        ));
    }
    lines.push(format!(
        "  static: {}",
        config.resolve(&config.server.static_dir).display()
    ));
    lines.join("\n")
}
