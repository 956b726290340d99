//! The `temma` command: parses the CLI, loads the configuration (exiting non-zero before
//! anything binds if it is invalid), starts logging and runs until SIGTERM or Ctrl-C.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc: measurably faster than the system allocator for the many small buffers of
/// message relaying (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use temma::config::LogFormat;
use temma::config::{self, Config, Role};

/// Exit status for an invalid configuration: EX_CONFIG from sysexits.h (clap's usage errors
/// exit 2).
const EXIT_CONFIG: u8 = 78;
/// Exit status for bad arguments (clap's own).
const EXIT_USAGE: u8 = 2;
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
    /// Validate the configuration (scripts included) exactly as start-up does, binding nothing.
    Check,
    /// Run one moderation script on one message and print the outcome.
    Script {
        /// The script file.
        file: PathBuf,
        /// The message, as JSON.
        #[arg(short, long, default_value = r#"{"from":"alice","text":"hello"}"#)]
        message: String,
        /// The script's parameters, as a JSON object (`*_file` paths resolve from here).
        #[arg(short, long, default_value = "{}")]
        params: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Script {
        file,
        message,
        params,
    }) = &cli.command
    {
        return run_script(file, message, params);
    }
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
    // Listen for signals before anything starts: a SIGTERM that arrives during start-up is
    // then a clean shutdown, not the default action (killed).
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("temma: cannot listen for signals: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let started = match command {
        Command::Broker => {
            if config.broker.embedded {
                tracing::warn!(
                    "`[broker] embedded = true` in this configuration: a `temma serve` started from it will run its own broker on the same ports and fail to bind; set `embedded = false` (TEMMA_BROKER__EMBEDDED=false) for the web nodes"
                );
            }
            temma::App::broker(&config, shutdown.clone()).await
        }
        _ => temma::App::serve(&config, shutdown.clone()).await,
    };
    let app = match started {
        Ok(app) => app,
        Err(error) => {
            // Logged once: the log goes to stderr too.
            tracing::error!("start-up failed: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    signals.wait(&app).await;
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

/// SIGTERM, SIGINT and SIGHUP, registered once at start.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; on SIGHUP, reloads the moderation scripts and goes on
    /// waiting.
    async fn wait(mut self, app: &temma::App) {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return,
                _ = self.interrupt.recv() => return,
                _ = self.hangup.recv() => {
                    tracing::info!("SIGHUP: reloading scripts");
                    app.reload_scripts();
                }
            }
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // salvo announces its listener too: temma's own start-up line says it once, with more.
    let filter = match "salvo_core::server=warn".parse() {
        Ok(quiet) if !format!("{filter}").contains("salvo") => filter.add_directive(quiet),
        _ => filter,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// `temma script`: one script, one message, the outcome on stdout. Exit 0 when the script
/// ran (whether it passed or dropped the message), 1 when it failed on the message, 78 when it
/// cannot be loaded, 2 when the arguments are not JSON.
fn run_script(file: &std::path::Path, message: &str, params: &str) -> ExitCode {
    use temma::broker::{Stamped, Stamper};
    use temma::script::{Outcome, ScriptLimits, ScriptSpec};
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let params = match serde_json::from_str(params) {
        Ok(params) => params,
        Err(error) => {
            eprintln!("temma: --params is not a JSON object: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let spec = ScriptSpec::standalone(file, params, ScriptLimits::default());
    let mut script = match spec.load() {
        Ok(script) => script,
        Err(error) => {
            eprintln!("temma: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let map = match Stamper::new(usize::MAX).stamp(message.as_bytes(), false) {
        Ok(Stamped::Parsed { map, .. }) => map,
        _ => {
            eprintln!("temma: --message is not a JSON object");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match script.run(map) {
        Ok(Outcome::Pass(map)) => {
            let json = serde_json::to_string(&rhai::Dynamic::from_map(map))
                .unwrap_or_else(|error| format!("(not JSON: {error})"));
            println!("passed: {json}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Drop(None)) => {
            println!("dropped");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Drop(Some(rejection))) => {
            println!("rejected ({}): {}", rejection.status, rejection.reason);
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("error: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// What `temma check` prints for a valid configuration.
fn summary(config: &Config) -> String {
    let mut lines = vec![format!(
        "configuration `{}` is valid",
        config.file.display()
    )];
    for warning in config.wiring_warnings() {
        lines.push(format!("  warning: {warning}"));
    }
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
    let scripts = config.broker.script_specs(&config.root());
    if scripts.is_empty() {
        lines.push("  scripts: none".to_owned());
    }
    for spec in scripts {
        lines.push(format!(
            "  script {}: {} compiled (on_error = {})",
            spec.name,
            spec.file.display(),
            spec.on_error
        ));
    }
    lines.join("\n")
}
