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
use temma::config::{self, Config};

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
    /// Configuration file [default: etc/temma.toml].
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
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
    /// Run moderation scripts on one message and print what each did, publishing nothing.
    ///
    /// With a configuration (`-c`, or etc/temma.toml when it exists), a script of its chain
    /// runs with its `params`, `[broker.limits]` and `on_error`, as the broker would run it;
    /// without SCRIPT, the whole chain runs in order.
    Script {
        /// The script: a file, or the name of a script of the configuration's chain.
        script: Option<String>,
        /// The message, as JSON.
        #[arg(short, long, default_value = r#"{"from":"alice","text":"hello"}"#)]
        message: String,
        /// Parameters as a JSON object, over the configuration's (`*_file` paths resolve from
        /// the application root, or from here without a configuration).
        #[arg(short, long)]
        params: Option<String>,
        /// Ignore the configuration: default limits, `on_error = "drop"`, only `--params`.
        #[arg(long)]
        no_config: bool,
    },
    /// Print a shell completion script: `temma completions bash > ~/.local/share/bash-completion/completions/temma`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (roff), one per command, into DIR: `temma man /usr/local/share/man/man1`.
    Man {
        /// The folder to write `temma.1`, `temma-serve.1`, … into.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "temma", &mut script);
            return say(String::from_utf8_lossy(script.trim_ascii_end()))
                .err()
                .unwrap_or(ExitCode::SUCCESS);
        }
        Some(Command::Man { dir }) => {
            use clap::CommandFactory;
            return match clap_mangen::generate_to(Cli::command(), dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!(
                        "temma: cannot write the manual pages into `{}`: {error}",
                        dir.display()
                    );
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        _ => {}
    }
    if let Some(Command::Script {
        script,
        message,
        params,
        no_config,
    }) = &cli.command
    {
        let config = if *no_config {
            None
        } else {
            cli.config.clone().or_else(|| {
                let default = PathBuf::from(config::DEFAULT_PATH);
                default.is_file().then_some(default)
            })
        };
        return run_script(script.as_deref(), message, params.as_deref(), config);
    }
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("temma: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Check = command {
        return say(summary(&config)).err().unwrap_or(ExitCode::SUCCESS);
    }
    init_logging(&config);
    let runtime = match config.runtime.build(matches!(command, Command::Broker)) {
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
    signals.wait(&app, &config).await;
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

    /// Waits for SIGTERM or SIGINT. On SIGHUP, reloads the scripts, reads the configuration
    /// file again and, if it is valid, moves a web node's ZeroMQ connections to where it says;
    /// an invalid file is reported as `temma check` would and the running configuration stays.
    async fn wait(mut self, app: &temma::App, running: &Config) {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return,
                _ = self.interrupt.recv() => return,
                _ = self.hangup.recv() => {
                    tracing::info!("SIGHUP: reloading scripts and re-reading {}", running.file.display());
                    app.reload_scripts();
                    let config = match Config::load(&running.file) {
                        Ok(config) => config,
                        Err(error) => {
                            tracing::error!("SIGHUP: {error}\nthe running configuration stays");
                            continue;
                        }
                    };
                    let rewired = tokio::select! {
                        rewired = app.rewire(&config) => rewired,
                        _ = self.terminate.recv() => return,
                        _ = self.interrupt.recv() => return,
                    };
                    for change in &rewired.changed {
                        tracing::info!("SIGHUP: rewired {change}");
                    }
                    let mut restart = rewired.restart;
                    restart.extend(restart_only(running, &config));
                    if !restart.is_empty() {
                        tracing::warn!("SIGHUP: these changes take effect at the next start: {}", restart.join(", "));
                    }
                    if rewired.changed.is_empty() {
                        tracing::info!("SIGHUP: the ZeroMQ connections are unchanged");
                    }
                }
            }
        }
    }
}

/// Keys a running process cannot change: they take a restart.
fn restart_only(running: &Config, new: &Config) -> Vec<String> {
    use temma::config::Role;
    let mut keys = Vec::new();
    if running.server.listen != new.server.listen {
        keys.push("server.listen".to_owned());
    }
    if running.broker.embedded != new.broker.embedded {
        keys.push("broker.embedded".to_owned());
    }
    if running.broker.embedded || new.broker.embedded {
        for role in [Role::BrokerPull, Role::BrokerPub, Role::BrokerSnapshot] {
            let dsn = |config: &Config| {
                (!config.role_name(role).is_empty()).then(|| config.dsn(role).to_string())
            };
            if dsn(running) != dsn(new) {
                keys.push(role.key().to_owned());
            }
        }
    }
    keys
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // salvo announces its listener too: temma's own start-up line says it once, with more;
    // the zeromq crate's `info` lines (a peer gone, a reconnect) say what temma's own lines and
    // gauges say. Both shown when the filter names them.
    let written = format!("{filter}");
    let filter = [
        ("salvo", "salvo_core::server=warn"),
        ("zeromq", "zeromq=warn"),
    ]
    .into_iter()
    .filter(|(named, _)| !written.contains(named))
    .filter_map(|(_, directive)| directive.parse().ok())
    .fold(filter, |filter, quiet| filter.add_directive(quiet));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    temma::throttle::pass_crate_logs();
}

/// `temma script`: scripts run on one message, each one's outcome on stdout, then the message
/// as the broker would publish it. Exit 0 when the scripts ran (whether they passed or dropped
/// the message), 1 when one failed on it, 78 when the configuration or a script cannot be
/// loaded, 2 when the arguments are wrong.
fn run_script(
    wanted: Option<&str>,
    message: &str,
    params: Option<&str>,
    config: Option<PathBuf>,
) -> ExitCode {
    use temma::broker::{Stamped, Stamper};
    use temma::script::{OnError, ScriptLimits, ScriptSpec, Step};
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let usage = |message: String| {
        eprintln!("temma: {message}");
        ExitCode::from(EXIT_USAGE)
    };
    let params: std::collections::BTreeMap<String, serde_json::Value> =
        match params.map(serde_json::from_str).transpose() {
            Ok(params) => params.unwrap_or_default(),
            Err(error) => return usage(format!("--params is not a JSON object: {error}")),
        };
    let config = match config.map(|path| Config::load(&path)).transpose() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("temma: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Said once we know the script is one of the chain's kind, not the access hook.
    let mut note = None;
    let mut specs = match (&config, wanted) {
        (Some(config), wanted) => {
            let chain = config.broker.script_specs(&config.root());
            let file = config.file.display();
            match wanted {
                None if chain.is_empty() => {
                    return usage(format!(
                        "`{file}` has no `[[broker.scripts]]`: name a script file to run"
                    ));
                }
                None => {
                    eprintln!("temma: the chain of `{file}`, in order");
                    chain
                }
                Some(wanted) => match temma::script::find(&chain, wanted) {
                    Some(index) => {
                        eprintln!(
                            "temma: `broker.scripts[{index}] ({})` of `{file}`: its params, [broker.limits] and on_error",
                            chain[index].name
                        );
                        vec![chain[index].clone()]
                    }
                    None => {
                        note = Some(format!(
                            "temma: `{wanted}` is not in the chain of `{file}`: its [broker.limits] and on_error, params from --params only"
                        ));
                        let mut spec = ScriptSpec::standalone(
                            std::path::Path::new(wanted),
                            Default::default(),
                            config.broker.limits,
                        );
                        spec.on_error = config.broker.on_error;
                        vec![spec]
                    }
                },
            }
        }
        (None, Some(wanted)) => vec![ScriptSpec::standalone(
            std::path::Path::new(wanted),
            Default::default(),
            ScriptLimits::default(),
        )],
        (None, None) => {
            return usage(
                "name a script file, or give a configuration (`-c FILE`) whose chain to run"
                    .to_owned(),
            );
        }
    };
    // The access hook: `[access]` named by file or name, or a file that defines its functions.
    let configured = config
        .as_ref()
        .and_then(|config| config.access.spec(&config.root()))
        .filter(|spec| {
            wanted.is_some_and(|w| temma::script::find(std::slice::from_ref(spec), w).is_some())
        });
    let hook = configured.or_else(|| {
        let [spec] = specs.as_slice() else {
            return None;
        };
        let mut hook = spec.clone();
        hook.kind = temma::script::ScriptKind::Access;
        let not_moderation = matches!(
            spec.load(),
            Err(temma::script::ScriptError::NoEntryPoint { .. })
        );
        (not_moderation && hook.load().is_ok()).then_some(hook)
    });
    if let Some(mut spec) = hook {
        spec.params.extend(params);
        let room = config
            .as_ref()
            .map_or("general", |c| c.rooms.default.as_str());
        return run_hook(spec, message, room);
    }
    if let Some(note) = note {
        eprintln!("{note}");
    }
    for spec in &mut specs {
        spec.params.extend(params.clone());
    }
    let mut scripts = match temma::script::compile(&specs) {
        Ok(scripts) => scripts,
        Err(errors) => {
            for (_, error) in errors {
                eprintln!("temma: {error}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let map = match Stamper::new(usize::MAX).stamp(message.as_bytes(), false) {
        Ok(Stamped::Parsed { map, .. }) => map,
        _ => return usage("--message is not a JSON object".to_owned()),
    };
    let (steps, published) = temma::script::trial(&mut scripts, map);
    let chain = steps.len() > 1 || wanted.is_none();
    let mut code = ExitCode::SUCCESS;
    let mut out = Vec::new();
    for (name, step) in steps {
        let line = match step {
            Step::Passed { changed: true } => "passed (changed)".to_owned(),
            Step::Passed { changed: false } => "passed (unchanged)".to_owned(),
            Step::Dropped(None) => "dropped".to_owned(),
            Step::Dropped(Some(rejection)) => {
                format!("rejected ({}): {}", rejection.status, rejection.reason)
            }
            Step::Failed { error, on_error } => {
                code = ExitCode::from(EXIT_FAILURE);
                let then = match on_error {
                    OnError::Drop => "the broker drops the message (on_error = drop)",
                    OnError::Pass => "the broker passes the message on unchanged (on_error = pass)",
                };
                format!("error: {error}\n  {then}")
            }
        };
        if chain {
            out.push(format!("{name}: {line}"));
        } else if published.is_none() || line.starts_with("error") {
            // One script: its outcome is the answer (a pass is said by the message below).
            out.push(line);
        }
    }
    if let Some(map) = published {
        let json = serde_json::to_string(&rhai::Dynamic::from_map(map))
            .unwrap_or_else(|error| format!("(not JSON: {error})"));
        out.push(format!("passed: {json}"));
    }
    if out.is_empty() {
        return code;
    }
    say(out.join("\n")).err().unwrap_or(code)
}

/// `temma script` on the access hook: `message` is the request (`room`, `name` or `from`,
/// `client`, `query`, `headers`, `text`), and each of `on_subscribe` and `on_publish` says
/// whether it lets it through.
fn run_hook(spec: temma::script::ScriptSpec, message: &str, default_room: &str) -> ExitCode {
    use temma::script::{Access, Hook};
    let script = match spec.load() {
        Ok(script) => script,
        Err(error) => {
            eprintln!("temma: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let fields: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(message) {
        Ok(fields) => fields,
        Err(_) => {
            eprintln!("temma: --message is not a JSON object");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let text = |key: &str| fields.get(key).and_then(|v| v.as_str());
    let query: String = fields
        .get("query")
        .and_then(|q| q.as_object())
        .map(|query| {
            let mut encoded = form_urlencoded::Serializer::new(String::new());
            for (key, value) in query {
                encoded.append_pair(key, value.as_str().unwrap_or_default());
            }
            encoded.finish()
        })
        .unwrap_or_default();
    let headers = fields.get("headers").and_then(|h| h.as_object());
    let mut req = Hook::request(
        text("room").unwrap_or(default_room),
        text("name").or_else(|| text("from")),
        text("client").unwrap_or("127.0.0.1"),
        Some(&query),
        |name| {
            headers
                .and_then(|h| h.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        },
    );
    if let Some(message) = text("text") {
        req.insert("text".into(), message.into());
    }
    eprintln!("temma: `{}` is an access hook ([access])", spec.shown);
    let hook = Hook::new(script);
    let out: Vec<String> = [temma::script::ON_SUBSCRIBE, temma::script::ON_PUBLISH]
        .into_iter()
        .map(|function| match hook.check(function, req.clone()) {
            Access::Allow => format!("{function}: allowed"),
            Access::Refuse { status, reason } => {
                format!("{function}: refused ({status}): {reason}")
            }
        })
        .collect();
    say(out.join("\n")).err().unwrap_or(ExitCode::SUCCESS)
}

/// Writes `text` and a newline to standard output. A reader that has gone away (`temma check
/// | grep -q …`, `| head -1`) is not a failure: it has read what it wanted, and the command
/// exits as it would have. Any other write error is said on standard error and fails.
fn say(text: impl std::fmt::Display) -> Result<(), ExitCode> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => {
            eprintln!("temma: cannot write to standard output: {error}");
            Err(ExitCode::from(EXIT_FAILURE))
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
    if let Some(http) = config.broker.http {
        lines.push(format!(
            "  broker http: http://{http}/health, /metrics (`temma broker`)"
        ));
    }
    for role in config.roles() {
        lines.push(format!(
            "  {}: {} = {}",
            role.key(),
            config.role_name(role),
            config.dsn(role)
        ));
    }
    if config.event.failover {
        use temma::config::Role;
        let endpoints = |role: Role| config.dsn(role).endpoints.clone();
        let pushes = endpoints(Role::MessagePush);
        let subs = endpoints(Role::EventSub);
        let snapshots = endpoints(Role::EventSnapshot);
        lines.push(format!(
            "  failover: this node follows {} brokers, pushes to the active one only",
            subs.len()
        ));
        for (i, ((push, sub), snapshot)) in pushes.iter().zip(&subs).zip(&snapshots).enumerate() {
            lines.push(format!(
                "    broker {}: PULL {push}, PUB {sub}, snapshots {snapshot}",
                i + 1
            ));
        }
    }
    if config.broker.peer.is_some() {
        lines.push(format!(
            "  broker pair: reads its peer's PUB at {}, its snapshots at {}; active or backup, \
             decided by heartbeats",
            config.dsn(temma::config::Role::BrokerPeer),
            config.dsn(temma::config::Role::BrokerPeerSnapshot)
        ));
    }
    if config.broker.snapshot.is_some() {
        lines.push(format!(
            "  broker history for snapshots: {} per room, {} bytes, {} s",
            config.broker.history_size, config.broker.history_bytes, config.broker.history_ttl_secs
        ));
    }
    if config.event.snapshot.is_none() {
        lines.push(
            "  event.snapshot: none (a restarted node starts with an empty history)".to_owned(),
        );
    }
    lines.push(format!(
        "  static: {}",
        config.resolve(&config.server.static_dir).display()
    ));
    lines.push(format!(
        "  rooms: default `{}`, at most {} per node{}",
        config.rooms.default,
        config.rooms.max,
        if config.rooms.presence {
            ", presence shared"
        } else {
            ""
        }
    ));
    match config.access.spec(&config.root()) {
        Some(spec) => lines.push(format!(
            "  access hook: {} compiled (on_error = {})",
            spec.file.display(),
            spec.on_error
        )),
        None => lines.push("  access hook: none (every room open)".to_owned()),
    }
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
