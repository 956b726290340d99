//! `etc/temma.toml`: the whole configuration, loaded and validated before anything binds.
//!
//! Loading has two phases, as in Vector's config compiler:
//!
//! 1. **Shape** — figment merges the TOML file with `TEMMA_<SECTION>__<KEY>` environment
//!    overrides (matched case-insensitively) and serde deserializes the result into [`Config`].
//!    Every struct denies unknown keys, so a typo is an error that names the key and its origin.
//! 2. **Meaning** — [`Config::validate`] collects *every* remaining problem (an undefined data
//!    source, a socket type in the wrong role, two binds on one endpoint, a missing folder or
//!    script, a missing session secret…) and reports them all at once.
//!
//! Relative paths (the static folder, scripts, word lists) resolve against the application root,
//! `application.root`, itself relative to the directory of the config file (default `..`: the
//! config lives in `<root>/etc/temma.toml`, as in Temma).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use crate::broker::BrokerConfig;
use crate::context::{Context, Root};
use crate::dsn::{Dsn, Mode, SocketKind};
use crate::event::EventConfig;
use crate::message::MessageConfig;
use crate::server::ServerConfig;

/// Where `temma` looks for its configuration when `-c` is not given.
pub const DEFAULT_PATH: &str = "etc/temma.toml";
/// Prefix of environment overrides: `TEMMA_SERVER__LISTEN=127.0.0.1:9000`.
pub const ENV_PREFIX: &str = "TEMMA_";
/// Separator between the section and the key in an environment override.
pub const ENV_SEPARATOR: &str = "__";
/// Default `application.root`, relative to the config file's directory.
pub const DEFAULT_ROOT: &str = "..";
/// Default `application.sessionName` (Temma's).
pub const DEFAULT_SESSION_NAME: &str = "TemmaSession";
/// Default `application.sessionDuration` in seconds (Temma's: one year).
pub const DEFAULT_SESSION_DURATION_SECS: u64 = 31_536_000;
/// The shortest `application.sessionSecret` accepted, in bytes.
pub const MIN_SESSION_SECRET_BYTES: usize = 64;

/// Default data source names: the four of Temma's chat tutorial.
pub use crate::broker::{DEFAULT_BROKER_PUB, DEFAULT_BROKER_PULL};
pub use crate::event::DEFAULT_CLIENT_SUB;
pub use crate::message::DEFAULT_CLIENT_PUSH;

/// Temma's camelCase keys, so that an environment override (lower-cased by the shell
/// convention) still reaches them: `TEMMA_APPLICATION__ROOTCONTROLLER` → `rootController`.
const CAMEL_CASE_KEYS: &[&str] = &[
    "rootController",
    "enableSessions",
    "dataSources",
    "sessionSecret",
    "sessionName",
    "sessionDuration",
    "sessionSecure",
];

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Temma's `application` section: data sources, root controller, sessions.
    pub application: ApplicationConfig,
    /// The HTTP server.
    pub server: ServerConfig,
    /// The Broker component (PULL → scripts → PUB).
    pub broker: BrokerConfig,
    /// The Message controller (`POST /message/broadcast`).
    pub message: MessageConfig,
    /// The Event controller (`GET /event/fetch`) and the web node's fan-out.
    pub event: EventConfig,
    /// Rooms: the default one, how many a node holds, their idle time and history budget.
    pub rooms: crate::hub::RoomsConfig,
    /// The web node's access hook (`on_subscribe`, `on_publish`).
    pub access: crate::script::AccessConfig,
    /// The operator's console (`/console`).
    pub console: crate::console::ConsoleConfig,
    /// Logging.
    pub log: LogConfig,
    /// The process's async runtime: how many threads run its tasks.
    pub runtime: RuntimeConfig,
    /// The file this configuration was read from (empty for an in-memory configuration).
    #[serde(skip)]
    pub file: PathBuf,
}

pub use crate::homepage::RootController;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[log]` section. `RUST_LOG`, when set, overrides `level`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` (default) or `"json"`.
    pub format: LogFormat,
    /// A tracing filter such as `"info"` or `"temma=debug,info"`. Default `"info"`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: "info".to_owned(),
        }
    }
}

/// The most `runtime.worker_threads` accepts: past a few per CPU, threads only add switches.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The `[runtime]` section: the threads that run every task of the process (HTTP, SSE, the
/// broker; the moderation chain's `broker.script_workers` threads are apart).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; 0 (default): one per CPU for a web node (`temma serve`), one for a
    /// standalone broker (`temma broker`, see [`RuntimeConfig::build`]). Fewer cost less CPU
    /// per message where the machine is shared with other busy processes (BENCHMARKS.md).
    pub worker_threads: usize,
    /// How Linux schedules the process's threads. Default `"batch"`.
    pub scheduling: Scheduling,
    /// Lets the kernel back the heap with transparent huge pages (2 MiB) where the system's THP
    /// setting allows. Default `false`: the process opts out (`PR_SET_THP_DISABLE`), and its
    /// memory grows 4 KiB at a time, since the first touch of a fresh 2 MiB page stops the
    /// thread that made it while the page is zeroed (5 ms on this project's machine, in the
    /// middle of a message's deliveries; BENCHMARKS.md).
    pub huge_pages: bool,
}

/// `runtime.scheduling`: the Linux scheduling policy of every thread of the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// `SCHED_BATCH`: a thread woken on a busy CPU waits for the running one's turn to end
    /// instead of taking the CPU at once. On CPUs shared with other busy processes it costs
    /// less CPU per message at a light load and delivers later with a hundred clients and more
    /// (BENCHMARKS.md, "`[runtime] scheduling = \"normal\"` by default").
    Batch,
    /// `SCHED_OTHER`, the kernel's default for every process: a woken thread (a message to
    /// deliver) takes a CPU as soon as the kernel deems fair.
    #[default]
    Normal,
}

impl Scheduling {
    fn name(self) -> &'static str {
        match self {
            Scheduling::Batch => "batch",
            Scheduling::Normal => "normal",
        }
    }
}

impl RuntimeConfig {
    /// The tokio runtime this section describes. The scheduling policy is set on the calling
    /// thread first: every thread started afterwards (the runtime's, the moderation chain's)
    /// inherits it. A policy the system refuses (a sandbox) is logged, and the process goes on
    /// with the kernel's default.
    ///
    /// `broker`: the runtime of a standalone broker, which runs on one thread unless
    /// `worker_threads` says otherwise. Its relay is one task and the PUB socket's writes run
    /// where it wakes them; a second thread was mostly woken to find nothing to do (12 % more
    /// CPU per message without scripts, BENCHMARKS.md "The broker on one thread").
    pub fn build(&self, broker: bool) -> std::io::Result<tokio::runtime::Runtime> {
        if let Err(error) = set_scheduling(self.scheduling) {
            tracing::warn!(
                scheduling = self.scheduling.name(),
                %error,
                "runtime.scheduling could not be applied; the threads keep the default policy"
            );
        }
        if let Err(error) = set_huge_pages(self.huge_pages) {
            tracing::warn!(
                huge_pages = self.huge_pages,
                %error,
                "runtime.huge_pages could not be applied; the system's setting stays"
            );
        }
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all();
        let threads = match self.worker_threads {
            0 if broker => 1,
            threads => threads,
        };
        if threads > 0 {
            builder.worker_threads(threads);
        }
        builder.build()
    }

    fn validate(&self, problem: &mut impl FnMut(&str, String)) {
        if self.worker_threads > MAX_WORKER_THREADS {
            problem(
                "runtime.worker_threads",
                format!(
                    "{} threads: at most {MAX_WORKER_THREADS} (0 for one per CPU)",
                    self.worker_threads
                ),
            );
        }
    }
}

/// Gives the calling thread `scheduling`'s policy, keeping its nice value. `"normal"` leaves
/// the thread as the system started it.
#[cfg(target_os = "linux")]
fn set_scheduling(scheduling: Scheduling) -> Result<(), String> {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
    };
    if scheduling == Scheduling::Normal {
        return Ok(());
    }
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    // The crate sets a nice value with the policy, from a priority of 0 to 99: the one that
    // maps to the thread's current nice value, which stays as it is.
    let nice = rustix::process::getpriority_process(None).map_err(|e| e.to_string())?;
    let priority = (0..=99u8)
        .filter_map(|p| ThreadPriorityValue::try_from(p).ok())
        .map(ThreadPriority::Crossplatform)
        .find(|p| p.to_posix(policy).ok() == Some(nice))
        .ok_or_else(|| format!("nice value {nice} has no priority"))?;
    thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        priority,
        policy,
    )
    .map_err(|e| format!("{e:?}"))
}

#[cfg(not(target_os = "linux"))]
fn set_scheduling(scheduling: Scheduling) -> Result<(), String> {
    match scheduling {
        Scheduling::Normal => Ok(()),
        Scheduling::Batch => Err("SCHED_BATCH is Linux's".to_owned()),
    }
}

/// Opts the process out of transparent huge pages, or leaves the system's setting
/// (`huge_pages = true`). The flag belongs to the process's memory, not to a thread: pages
/// touched from now on, by any thread, are 4 KiB ones.
#[cfg(target_os = "linux")]
fn set_huge_pages(huge_pages: bool) -> std::io::Result<()> {
    if huge_pages {
        return Ok(());
    }
    rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn set_huge_pages(_huge_pages: bool) -> std::io::Result<()> {
    Ok(())
}

/// Whether the process may have transparent huge pages, as the start-up line reports it:
/// `false` once it opted out (`runtime.huge_pages = false`), or where there are none.
pub fn current_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        rustix::thread::transparent_huge_pages_are_disabled().is_ok_and(|disabled| !disabled)
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// The calling thread's scheduling policy, as the start-up line reports it.
pub fn current_scheduling() -> &'static str {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};
        match thread_priority::thread_schedule_policy() {
            Ok(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch)) => "batch",
            Ok(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other)) => "normal",
            Ok(_) => "other",
            Err(_) => "unknown",
        }
    }
    #[cfg(not(target_os = "linux"))]
    "normal"
}

/// Temma's `[application]` section, with Temma's key names.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplicationConfig {
    /// Base directory for every relative path in the file; itself relative to the config file's
    /// directory. Default `".."`.
    pub root: PathBuf,
    /// The controller that answers `GET /`. Default `"Homepage"` (the only one).
    #[serde(rename = "rootController")]
    pub root_controller: RootController,
    /// Signed-cookie sessions that remember the sender's name. Default `false`.
    #[serde(rename = "enableSessions")]
    pub enable_sessions: bool,
    /// Secret signing the session cookie; required (≥ 64 bytes) when sessions are on. Prefer the
    /// environment: `TEMMA_APPLICATION__SESSIONSECRET`.
    #[serde(rename = "sessionSecret")]
    pub session_secret: Option<String>,
    /// Session cookie name. Default `"TemmaSession"`.
    #[serde(rename = "sessionName")]
    pub session_name: String,
    /// Session lifetime in seconds. Default 31536000 (one year).
    #[serde(rename = "sessionDuration")]
    pub session_duration: u64,
    /// Mark the session cookie `Secure` (HTTPS only). Default `false`.
    #[serde(rename = "sessionSecure")]
    pub session_secure: bool,
    /// Named ZeroMQ sockets as Temma DSNs. The tutorial's four are defined unless the file
    /// (or the environment) defines them otherwise: a table that names only some keeps the
    /// others.
    #[serde(rename = "dataSources", deserialize_with = "over_default_data_sources")]
    pub data_sources: BTreeMap<String, Dsn>,
}

impl Default for ApplicationConfig {
    fn default() -> Self {
        ApplicationConfig {
            root: PathBuf::from(DEFAULT_ROOT),
            root_controller: RootController::default(),
            enable_sessions: false,
            session_secret: None,
            session_name: DEFAULT_SESSION_NAME.to_owned(),
            session_duration: DEFAULT_SESSION_DURATION_SECS,
            session_secure: false,
            data_sources: default_data_sources(),
        }
    }
}

/// The data sources a file gives, over the built-in ones.
fn over_default_data_sources<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, Dsn>, D::Error> {
    let given = BTreeMap::<String, Dsn>::deserialize(deserializer)?;
    let mut sources = default_data_sources();
    sources.extend(given);
    Ok(sources)
}

/// The tutorial's four data sources, all on 127.0.0.1.
pub fn default_data_sources() -> BTreeMap<String, Dsn> {
    [
        (DEFAULT_CLIENT_PUSH, "zmq://PUSH@127.0.0.1:5000"),
        (DEFAULT_BROKER_PULL, "zmq-bind://PULL@127.0.0.1:5000"),
        (DEFAULT_BROKER_PUB, "zmq-bind://PUB@127.0.0.1:6000"),
        (DEFAULT_CLIENT_SUB, "zmq://SUB@127.0.0.1:6000"),
    ]
    .into_iter()
    .map(|(name, dsn)| (name.to_owned(), dsn.parse().expect("built-in DSN")))
    .collect()
}

/// A socket a component uses, named by a config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `message.push`: the web node's PUSH socket to the broker.
    MessagePush,
    /// `event.sub`: the web node's SUB socket from the broker.
    EventSub,
    /// `broker.pull`: the broker's input.
    BrokerPull,
    /// `broker.pub`: the broker's output.
    BrokerPub,
    /// `event.snapshot` (optional): the web node's DEALER socket to the broker's snapshots.
    EventSnapshot,
    /// `broker.snapshot` (optional): the broker's ROUTER socket answering snapshot requests.
    BrokerSnapshot,
    /// `broker.peer` (optional): a broker's SUB socket to the other broker of its pair.
    BrokerPeer,
    /// `broker.peer_snapshot` (optional): a broker's DEALER socket to its peer's snapshots.
    BrokerPeerSnapshot,
}

impl Role {
    /// The roles every configuration has.
    pub const ALL: [Role; 4] = [
        Role::MessagePush,
        Role::EventSub,
        Role::BrokerPull,
        Role::BrokerPub,
    ];
    /// The roles a configuration may leave out.
    pub const OPTIONAL: [Role; 4] = [
        Role::EventSnapshot,
        Role::BrokerSnapshot,
        Role::BrokerPeer,
        Role::BrokerPeerSnapshot,
    ];

    /// The config key naming this role's data source.
    pub fn key(self) -> &'static str {
        match self {
            Role::MessagePush => "message.push",
            Role::EventSub => "event.sub",
            Role::BrokerPull => "broker.pull",
            Role::BrokerPub => "broker.pub",
            Role::EventSnapshot => "event.snapshot",
            Role::BrokerSnapshot => "broker.snapshot",
            Role::BrokerPeer => "broker.peer",
            Role::BrokerPeerSnapshot => "broker.peer_snapshot",
        }
    }

    /// The socket type this role needs.
    pub fn kind(self) -> SocketKind {
        match self {
            Role::MessagePush => SocketKind::Push,
            Role::EventSub => SocketKind::Sub,
            Role::BrokerPull => SocketKind::Pull,
            Role::BrokerPub => SocketKind::Pub,
            Role::EventSnapshot => SocketKind::Dealer,
            Role::BrokerSnapshot => SocketKind::Router,
            Role::BrokerPeer => SocketKind::Sub,
            Role::BrokerPeerSnapshot => SocketKind::Dealer,
        }
    }

    /// Whether this role binds (the broker) or connects (web nodes).
    pub fn mode(self) -> Mode {
        if self.is_broker() {
            Mode::Bind
        } else {
            Mode::Connect
        }
    }

    fn is_broker(self) -> bool {
        matches!(
            self,
            Role::BrokerPull | Role::BrokerPub | Role::BrokerSnapshot
        )
    }

    /// The broker's role a web node's role connects to.
    pub fn peer(self) -> Option<Role> {
        match self {
            Role::MessagePush => Some(Role::BrokerPull),
            Role::EventSub | Role::BrokerPeer => Some(Role::BrokerPub),
            Role::EventSnapshot | Role::BrokerPeerSnapshot => Some(Role::BrokerSnapshot),
            Role::BrokerPull | Role::BrokerPub | Role::BrokerSnapshot => None,
        }
    }
}

/// One thing wrong with a configuration: the key at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `server.listen` (empty when the whole file is at fault).
    pub key: String,
    /// Where the value came from when it is not the file itself (an environment variable).
    pub origin: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.key.is_empty() {
            write!(f, "`{}`", self.key)?;
            if let Some(origin) = &self.origin {
                write!(f, " (from {origin})")?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = if self.file.as_os_str().is_empty() {
            "<inline>".to_owned()
        } else {
            self.file.display().to_string()
        };
        let count = self.problems.len();
        write!(
            f,
            "invalid configuration in `{file}` ({count} problem{}):",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(file: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            problems: vec![Problem {
                key: key.to_owned(),
                origin: None,
                message: message.into(),
            }],
        }
    }
}

impl Config {
    /// Loads `path`, applies `TEMMA_…` environment overrides, and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::one(
                path,
                "",
                format!(
                    "config file `{}` not found (give another with `-c PATH`)",
                    path.display()
                ),
            ));
        }
        let figment = Figment::from(Toml::file_exact(path)).merge(environment());
        Self::extract(figment, path)
    }

    /// Parses a configuration from TOML text, without environment overrides, and validates it.
    ///
    /// `file` stands for the file the text would live in: relative paths resolve from it.
    pub fn from_toml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Self::extract(Figment::from(Toml::string(text)), file)
    }

    fn extract(figment: Figment, file: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(|error| ConfigError {
            file: file.to_owned(),
            problems: error.into_iter().map(figment_problem).collect(),
        })?;
        config.file = file.to_owned();
        config.validate().map_err(|mut error| {
            // A value that an environment variable set: say so, as figment's errors do.
            for problem in &mut error.problems {
                let key = problem.key.split([' ', '[']).next().unwrap_or_default();
                let from_environment = figment
                    .find_metadata(key)
                    .is_some_and(|metadata| metadata.name.contains("environment"));
                if from_environment && problem.origin.is_none() {
                    problem.origin = Some(format!("environment variable {}", env_name(key)));
                }
            }
            error
        })?;
        Ok(config)
    }

    /// The application root: `application.root` resolved against the config file's directory.
    pub fn root(&self) -> Root {
        let base = self
            .file
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Root(base.join(&self.application.root))
    }

    /// A path from the config resolved against [`Config::root`] (absolute paths stay as they are).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.root().resolve(path)
    }

    /// What the components build themselves from.
    pub fn context(&self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Context {
        Context {
            root: self.root(),
            config_file: (!self.file.as_os_str().is_empty()).then(|| self.file.clone()),
            data_sources: self.application.data_sources.clone(),
            addresses: crate::socket::Addresses::default(),
            metrics,
            max_frame_bytes: self.broker.max_frame_bytes,
        }
    }

    /// The session middleware, when sessions are on.
    pub fn sessions(&self) -> Option<salvo::session::SessionHandler<salvo::session::CookieStore>> {
        let application = &self.application;
        application.enable_sessions.then(|| {
            crate::session::build(crate::session::SessionSettings {
                secret: application.session_secret.as_deref().unwrap_or_default(),
                cookie_name: &application.session_name,
                ttl: std::time::Duration::from_secs(application.session_duration),
                secure: application.session_secure,
            })
        })
    }

    /// Connects of this web node that no bind of its embedded broker matches (the broker may
    /// be elsewhere, so these are warnings, not errors): each says what would happen.
    pub fn wiring_warnings(&self) -> Vec<String> {
        use crate::dsn::{Endpoint, Host};
        let mut warnings = Vec::new();
        if !self.broker.embedded {
            return warnings;
        }
        if let Some(http) = self.broker.http {
            warnings.push(format!(
                "`broker.http` (`{http}`) is served by `temma broker` only: with the embedded \
                 broker, `http://{}/metrics` has the broker's counters",
                self.server.listen
            ));
        }
        for (connect, bind, consequence) in [
            (
                Role::MessagePush,
                Role::BrokerPull,
                "every POST would get 503",
            ),
            (
                Role::EventSub,
                Role::BrokerPub,
                "no browser would receive a message",
            ),
            (
                Role::EventSnapshot,
                Role::BrokerSnapshot,
                "this node would go on without history from the broker",
            ),
        ] {
            if self.role_name(connect).is_empty() {
                continue;
            }
            if self.role_name(bind).is_empty() {
                warnings.push(format!(
                    "`{}` is set but the embedded broker has no `{}`: {consequence} unless \
                     another broker answers there",
                    connect.key(),
                    bind.key()
                ));
                continue;
            }
            let binds = &self.dsn(bind).endpoints;
            for endpoint in &self.dsn(connect).endpoints {
                let named = matches!(
                    endpoint,
                    Endpoint::Tcp {
                        host: Host::Name(_),
                        ..
                    }
                );
                if named || endpoint.port() == Some(0) {
                    continue; // a name is resolved later; port 0 follows the bind
                }
                if !binds.iter().any(|b| crate::socket::overlaps(b, endpoint)) {
                    warnings.push(format!(
                        "`{}` connects to `{endpoint}`, which the embedded broker does not bind \
                         (`{}` binds `{}`): {consequence} unless another broker listens there",
                        connect.key(),
                        bind.key(),
                        self.dsn(bind)
                    ));
                }
            }
        }
        warnings
    }

    /// The data source name a role is configured to use (empty: an optional role left out).
    pub fn role_name(&self, role: Role) -> &str {
        match role {
            Role::MessagePush => &self.message.push,
            Role::EventSub => &self.event.sub,
            Role::BrokerPull => &self.broker.pull,
            Role::BrokerPub => &self.broker.publish,
            Role::EventSnapshot => self.event.snapshot.as_deref().unwrap_or_default(),
            Role::BrokerSnapshot => self.broker.snapshot.as_deref().unwrap_or_default(),
            Role::BrokerPeer => self.broker.peer.as_deref().unwrap_or_default(),
            Role::BrokerPeerSnapshot => self.broker.peer_snapshot.as_deref().unwrap_or_default(),
        }
    }

    /// The roles this configuration uses: every required one, and the optional ones set.
    pub fn roles(&self) -> impl Iterator<Item = Role> + '_ {
        Role::ALL.into_iter().chain(
            Role::OPTIONAL
                .into_iter()
                .filter(|role| !self.role_name(*role).is_empty()),
        )
    }

    /// The DSN a role uses. Only call on a validated configuration.
    pub fn dsn(&self, role: Role) -> &Dsn {
        &self.application.data_sources[self.role_name(role)]
    }

    /// Checks everything serde cannot, collecting every problem before failing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_owned(),
                origin: None,
                message,
            })
        };
        self.validate_roles(&mut problem);
        self.validate_binds(&mut problem);
        self.validate_port_zero(&mut problem);
        self.validate_snapshot(&mut problem);
        self.validate_sessions(&mut problem);
        let root = self.root();
        self.server
            .validate(&root, self.application.root_controller, &mut problem);
        self.message.validate(&mut problem);
        self.event.validate(&mut problem);
        self.rooms.validate(&mut problem);
        self.access.validate(&root, &mut problem);
        self.console.validate(&mut problem);
        self.broker.validate(&root, &mut problem);
        self.runtime.validate(&mut problem);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                file: self.file.clone(),
                problems,
            })
        }
    }

    /// Each role names a defined data source of the right type and direction.
    fn validate_roles(&self, problem: &mut impl FnMut(&str, String)) {
        let sources = &self.application.data_sources;
        let defined = || {
            sources
                .keys()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for role in self.roles() {
            let name = self.role_name(role);
            match sources.get(name) {
                None => problem(
                    role.key(),
                    format!(
                        "data source `{name}` is not defined in [application.dataSources] (defined: {})",
                        defined()
                    ),
                ),
                Some(dsn) if dsn.kind != role.kind() => problem(
                    role.key(),
                    format!(
                        "data source `{name}` is a {} socket (`{dsn}`), but this role needs a {} socket",
                        dsn.kind,
                        role.kind()
                    ),
                ),
                Some(dsn) if dsn.mode != role.mode() => problem(
                    role.key(),
                    format!(
                        "data source `{name}` {} (`{dsn}`), but this role must {}",
                        if dsn.mode == Mode::Bind {
                            "binds"
                        } else {
                            "connects"
                        },
                        if role.mode() == Mode::Bind {
                            "bind: write `zmq-bind://`"
                        } else {
                            "connect: write `zmq://`"
                        }
                    ),
                ),
                Some(_) => {}
            }
        }
    }

    /// A snapshot is taken from one broker: the one the SUB socket follows.
    fn validate_snapshot(&self, problem: &mut impl FnMut(&str, String)) {
        let sources = &self.application.data_sources;
        if self.event.failover {
            let count = |name: &str| sources.get(name).map(|dsn| dsn.endpoints.len());
            let subs = count(&self.event.sub);
            if subs.is_some_and(|n| n < 2) {
                problem(
                    "event.failover",
                    format!(
                        "needs `event.sub` to name both brokers' PUB sockets, but `{}` names one endpoint",
                        self.event.sub
                    ),
                );
            }
            let Some(subs) = subs.filter(|n| *n >= 2) else {
                return;
            };
            for (key, name) in [
                ("message.push", Some(self.message.push.as_str())),
                ("event.snapshot", self.event.snapshot.as_deref()),
            ] {
                match name {
                    None => problem(
                        "event.failover",
                        format!(
                            "needs `{key}`: the brokers' snapshot sockets, in the order of `event.sub`"
                        ),
                    ),
                    Some(name) => {
                        if let Some(n) = count(name).filter(|n| *n != subs) {
                            problem(
                                key,
                                format!(
                                    "`{name}` names {n} endpoint{}, but `event.sub` names {subs}: with `event.failover`, \
                                     each lists the brokers in the same order",
                                    if n == 1 { "" } else { "s" }
                                ),
                            );
                        }
                    }
                }
            }
            return;
        }
        if self.event.snapshot.is_some()
            && let Some(sub) = sources.get(&self.event.sub)
            && sub.endpoints.len() != 1
        {
            problem(
                "event.snapshot",
                format!(
                    "needs `event.sub` to connect to one broker, but `{}` (`{sub}`) names {} endpoints",
                    self.event.sub,
                    sub.endpoints.len()
                ),
            );
        }
    }

    /// Two binds of one endpoint.
    fn validate_binds(&self, problem: &mut impl FnMut(&str, String)) {
        let sources = &self.application.data_sources;
        // Two binds of one endpoint in this file would fail at start-up (or, worse, on another
        // machine): report them now. `*:port` overlaps every host on that port. Port 0 never
        // overlaps: the system picks a free port for each bind.
        let binds: Vec<(&String, &crate::dsn::Endpoint)> = sources
            .iter()
            .filter(|(_, dsn)| dsn.mode == Mode::Bind)
            .flat_map(|(name, dsn)| dsn.endpoints.iter().map(move |e| (name, e)))
            .collect();
        for (i, (name, endpoint)) in binds.iter().enumerate() {
            for (other_name, other) in &binds[..i] {
                if crate::socket::overlaps(endpoint, other) {
                    problem(
                        &format!("application.dataSources.{name}"),
                        format!(
                            "binds `{endpoint}`, which data source `{other_name}` already binds (`{other}`)"
                        ),
                    );
                }
            }
        }
    }

    /// A connect to port 0 must follow a bind of the embedded broker.
    fn validate_port_zero(&self, problem: &mut impl FnMut(&str, String)) {
        let sources = &self.application.data_sources;
        // Port 0 in a connect DSN means "the port the embedded broker got for the same endpoint".
        for role in self.roles() {
            let Some(dsn) = sources.get(self.role_name(role)) else {
                continue;
            };
            if dsn.mode != Mode::Connect {
                continue;
            }
            for endpoint in dsn.endpoints.iter().filter(|e| e.port() == Some(0)) {
                let peer = role.peer();
                let follows_embedded_bind = self.broker.embedded
                    && peer.is_some_and(|peer| {
                        sources
                            .get(self.role_name(peer))
                            .is_some_and(|b| b.mode == Mode::Bind && b.endpoints.contains(endpoint))
                    });
                if !follows_embedded_bind {
                    problem(
                        &format!("application.dataSources.{}", self.role_name(role)),
                        format!(
                            "connects to port 0 (`{endpoint}`), which only works when the embedded \
                             broker binds that same endpoint; give a real port"
                        ),
                    );
                }
            }
        }
    }

    /// Sessions need a long enough secret.
    fn validate_sessions(&self, problem: &mut impl FnMut(&str, String)) {
        if self.application.enable_sessions {
            match &self.application.session_secret {
                None => problem(
                    "application.sessionSecret",
                    format!(
                        "is required when `enableSessions` is true: set at least \
                         {MIN_SESSION_SECRET_BYTES} random bytes, preferably through the \
                         environment variable TEMMA_APPLICATION__SESSIONSECRET"
                    ),
                ),
                Some(secret) if secret.len() < MIN_SESSION_SECRET_BYTES => problem(
                    "application.sessionSecret",
                    format!(
                        "is {} bytes long; at least {MIN_SESSION_SECRET_BYTES} are needed to sign \
                         session cookies safely",
                        secret.len()
                    ),
                ),
                Some(_) => {}
            }
            if self.application.session_duration == 0 {
                problem(
                    "application.sessionDuration",
                    "is 0: must be at least 1 second".to_owned(),
                );
            }
        }
    }
}

/// `TEMMA_SECTION__KEY` → `section.key`, with Temma's camelCase keys restored. Only names of
/// that form (with the double underscore) are configuration: `TEMMA_HOME`, or the
/// `TEMMA_PORT` and `TEMMA_SERVICE_HOST` Kubernetes sets for a Service named `temma`, are not.
fn environment() -> Env {
    // `lowercase(false)` must come last: figment's `map` turns lower-casing back on.
    Env::prefixed(ENV_PREFIX)
        .filter(|key| key.as_str().contains(ENV_SEPARATOR))
        .map(|key| env_key(key.as_str()).into())
        .lowercase(false)
}

/// The environment variable that overrides a dotted key: `server.listen` →
/// `TEMMA_SERVER__LISTEN`.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.split('.')
            .collect::<Vec<_>>()
            .join(ENV_SEPARATOR)
            .to_uppercase()
    )
}

/// Maps an environment variable name, prefix removed, to a dotted config key.
fn env_key(name: &str) -> String {
    name.split(ENV_SEPARATOR)
        .map(|part| {
            let lower = part.to_ascii_lowercase();
            CAMEL_CASE_KEYS
                .iter()
                .find(|camel| camel.eq_ignore_ascii_case(&lower))
                .map_or(lower, |camel| (*camel).to_owned())
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Turns one figment error into a [`Problem`] naming the key and, for an environment
/// override, the variable it came from.
fn figment_problem(error: figment::Error) -> Problem {
    let from_environment = error
        .metadata
        .as_ref()
        .is_some_and(|metadata| metadata.name.contains("environment"));
    let origin = from_environment
        .then(|| format!("environment variable {}", env_name(&error.path.join("."))));
    Problem {
        key: key_of(&error.path),
        origin,
        message: kind_message(&error.kind),
    }
}

/// A dotted key with array positions as `[i]`: `broker.scripts[0].file`.
fn key_of(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() && !key.is_empty() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// What serde (through figment) found wrong, said with the value given and what to write.
fn kind_message(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::UnknownField(field, expected) => unknown_key(field, expected),
        Kind::UnknownVariant(given, choices) => {
            let choices: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
            format!("`{given}` is not a choice: write {}", one_of(&choices))
        }
        Kind::InvalidType(actual, expected) => {
            format!("{} is not {}", given(actual), expected_form(expected))
        }
        Kind::InvalidValue(actual, expected) => format!(
            "{} is out of range: write {}",
            given(actual),
            expected_form(expected)
        ),
        Kind::MissingField(field) => format!("`{field}` is missing: it is required here"),
        Kind::Message(text) => toml_message(text).unwrap_or_else(|| text.clone()),
        other => other.to_string(),
    }
}

/// `a`, `a or b`, `a, b or c`.
fn one_of(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// The value a configuration gave, as it would be written in TOML.
fn given(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Str(text) => format!("the string {text:?}"),
        Actual::Unsigned(n) => format!("the number `{n}`"),
        Actual::Signed(n) => format!("the number `{n}`"),
        Actual::Float(n) => format!("the number `{n}`"),
        Actual::Bool(b) => format!("`{b}`"),
        Actual::Seq => "an array".to_owned(),
        Actual::Map => "a table".to_owned(),
        other => other.to_string(),
    }
}

/// What serde expected, in the words of a TOML file.
fn expected_form(expected: &str) -> String {
    match expected {
        "u8" => "a whole number from 0 to 255".to_owned(),
        "u16" => "a whole number from 0 to 65535".to_owned(),
        "u32" => "a whole number from 0 to 4294967295".to_owned(),
        "u64" | "usize" => "a whole number, 0 or more".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" => "`true` or `false`".to_owned(),
        "a string" => "a string (in quotes)".to_owned(),
        "a sequence" => "an array (`[…]`)".to_owned(),
        "a map" => "a table".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other => other.to_owned(),
    }
}

/// A TOML syntax error on one line: `line 3, column 10: invalid string; expected `"`, `'` (in
/// `garbage =`)`, instead of the parser's multi-line drawing.
fn toml_message(text: &str) -> Option<String> {
    let mut lines = text.lines();
    let place = lines
        .next()?
        .strip_prefix("TOML parse error at ")?
        .to_owned();
    let mut source = None;
    let mut message = Vec::new();
    for line in lines {
        match line.split_once('|') {
            Some((number, code)) if !number.trim().is_empty() => {
                source = Some(code.trim().to_owned());
            }
            Some(_) => {}
            None if !line.trim().is_empty() => message.push(line.trim().to_owned()),
            None => {}
        }
    }
    let mut out = format!("{place}: {}", message.join("; "));
    if let Some(source) = source.filter(|source| !source.is_empty()) {
        out.push_str(&format!(" (in `{source}`)"));
    }
    Some(out)
}

/// An unknown key: the closest known one when it is a likely typo, and the keys allowed there.
fn unknown_key(field: &str, expected: &[&str]) -> String {
    let closest = expected
        .iter()
        .map(|known| {
            (
                strsim::jaro_winkler(&field.to_lowercase(), &known.to_lowercase()),
                known,
            )
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, known)| format!("; did you mean `{known}`?"))
        .unwrap_or_default();
    let keys = expected
        .iter()
        .map(|known| format!("`{known}`"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("unknown key `{field}`{closest} (the keys here: {keys})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/temma.toml")
    }

    fn problems(text: &str) -> Vec<Problem> {
        Config::from_toml(text, &shipped_path())
            .expect_err("config should be rejected")
            .problems
    }

    #[test]
    fn shipped_config_validates() {
        let config = Config::load(&shipped_path()).unwrap();
        assert_eq!(config.application.root_controller, RootController::Homepage);
        assert!(!config.application.enable_sessions);
        assert!(config.broker.embedded);
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(
            config.dsn(Role::MessagePush).to_string(),
            "zmq://PUSH@127.0.0.1:5000"
        );
        assert_eq!(
            config.dsn(Role::BrokerPub).to_string(),
            "zmq-bind://PUB@127.0.0.1:6000"
        );
        // The shipped file restates the built-in defaults: they must agree.
        let empty = Config::from_toml("", &shipped_path()).unwrap();
        assert_eq!(
            config.application.data_sources,
            empty.application.data_sources
        );
        assert_eq!(
            format!("{:?}", config.server),
            format!("{:?}", empty.server)
        );
        assert_eq!(
            format!("{:?}", config.message),
            format!("{:?}", empty.message)
        );
        assert_eq!(format!("{:?}", config.event), format!("{:?}", empty.event));
    }

    #[test]
    fn unknown_key_is_named() {
        let found = problems("[server]\nlisten = \"127.0.0.1:8000\"\nlistn = 1\n");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "server.listn");
        assert!(
            found[0].message.starts_with(
                "unknown key `listn`; did you mean `listen`? (the keys here: `listen`, "
            ),
            "{}",
            found[0]
        );
        // Nothing close: no guess, the keys only.
        let found = problems("[event]\nzzz = 1\n");
        assert!(
            found[0]
                .message
                .starts_with("unknown key `zzz` (the keys here: `sub`, "),
            "{}",
            found[0]
        );
        let found = problems("[aplication]\n");
        assert_eq!(found[0].key, "aplication");
    }

    #[test]
    fn error_names_the_file() {
        let error =
            Config::from_toml("[server]\nlistn = 1\n", Path::new("/x/etc/temma.toml")).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("`/x/etc/temma.toml`"), "{text}");
        assert!(text.contains("`server.listn`"), "{text}");
    }

    #[test]
    fn bad_dsn_is_named() {
        let found =
            problems("[application.dataSources]\nzmq_client_push = \"zmq://PUSH@*:5000\"\n");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "application.dataSources.zmq_client_push");
        assert!(found[0].message.contains("only a bind"), "{}", found[0]);
    }

    #[test]
    fn a_subscriber_queue_under_two_is_named() {
        let found = problems("[broker]\nsubscriber_queue = 1\n");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "broker.subscriber_queue");
        assert!(found[0].message.contains("at least 2"), "{}", found[0]);
    }

    #[test]
    fn a_shard_size_out_of_range_is_named() {
        for size in [0, crate::shard::MAX_SHARD_SIZE + 1] {
            let found = problems(&format!("[event]\nshard_size = {size}\n"));
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].key, "event.shard_size");
            assert!(
                found[0].message.contains("must be 1 to 65536"),
                "{}",
                found[0]
            );
        }
    }

    #[test]
    fn unknown_data_source_is_named() {
        let found = problems("[message]\npush = \"nope\"\n");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "message.push");
        assert!(
            found[0].message.contains("`nope` is not defined"),
            "{}",
            found[0]
        );
        assert!(
            found[0].message.contains("`zmq_client_push`"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn wrong_socket_type_for_a_role() {
        let found = problems(
            "[application.dataSources]\n\
             zmq_client_push = \"zmq://PUSH@127.0.0.1:5000\"\n\
             zmq_broker_pull = \"zmq-bind://PUB@127.0.0.1:5000\"\n\
             zmq_broker_pub = \"zmq-bind://PUB@127.0.0.1:6000\"\n\
             zmq_client_sub = \"zmq://SUB@127.0.0.1:6000\"\n",
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "broker.pull");
        assert!(
            found[0].message.contains("needs a PULL socket"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn two_binds_on_one_endpoint() {
        let found = problems(
            "[application.dataSources]\n\
             zmq_client_push = \"zmq://PUSH@127.0.0.1:5000\"\n\
             zmq_broker_pull = \"zmq-bind://PULL@127.0.0.1:5000\"\n\
             zmq_broker_pub = \"zmq-bind://PUB@*:5000\"\n\
             zmq_client_sub = \"zmq://SUB@127.0.0.1:6000\"\n",
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "application.dataSources.zmq_broker_pull");
        assert!(
            found[0].message.contains("`zmq_broker_pub` already binds"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems(
            "[application]\nenableSessions = true\n[message]\npush = \"a\"\n[event]\nsub = \"b\"\n",
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["message.push", "event.sub", "application.sessionSecret"]
        );
    }

    #[test]
    fn short_session_secret_is_refused() {
        let found = problems("[application]\nenableSessions = true\nsessionSecret = \"short\"\n");
        assert_eq!(found[0].key, "application.sessionSecret");
        assert!(found[0].message.contains("5 bytes long"), "{}", found[0]);
        let secret = "s".repeat(MIN_SESSION_SECRET_BYTES);
        let text = format!("[application]\nenableSessions = true\nsessionSecret = \"{secret}\"\n");
        Config::from_toml(&text, &shipped_path()).unwrap();
    }

    #[test]
    fn port_zero_connect_needs_an_embedded_bind() {
        let ok = "[application.dataSources]\n\
                  zmq_client_push = \"zmq://PUSH@127.0.0.1:0\"\n\
                  zmq_broker_pull = \"zmq-bind://PULL@127.0.0.1:0\"\n\
                  zmq_broker_pub = \"zmq-bind://PUB@127.0.0.1:0\"\n\
                  zmq_client_sub = \"zmq://SUB@127.0.0.1:0\"\n";
        Config::from_toml(ok, &shipped_path()).unwrap();
        let found = problems(&format!("{ok}[broker]\nembedded = false\n"));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].message.contains("port 0"), "{}", found[0]);
    }

    #[test]
    fn relative_paths_resolve_against_the_root() {
        let config = Config {
            file: PathBuf::from("/srv/chat/etc/temma.toml"),
            ..Config::default()
        };
        assert_eq!(config.root().path(), Path::new("/srv/chat/etc/.."));
        assert_eq!(
            config.resolve(Path::new("static")),
            Path::new("/srv/chat/etc/../static")
        );
        assert_eq!(
            config.resolve(Path::new("/abs/static")),
            Path::new("/abs/static")
        );
        let config = Config {
            file: PathBuf::from("/srv/chat/temma.toml"),
            application: ApplicationConfig {
                root: PathBuf::from("."),
                ..ApplicationConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(
            config.resolve(Path::new("static")),
            Path::new("/srv/chat/./static")
        );
        // A config given by a bare file name resolves from the working directory.
        let config = Config {
            file: PathBuf::from("temma.toml"),
            ..Config::default()
        };
        assert_eq!(
            config.resolve(Path::new("static")),
            Path::new("./../static")
        );
    }

    #[test]
    fn missing_static_folder_is_named() {
        let found = Config::from_toml("", Path::new("/nonexistent/etc/temma.toml"))
            .unwrap_err()
            .problems;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "server.static_dir");
        assert!(found[0].message.contains("does not exist"), "{}", found[0]);
    }

    #[test]
    fn environment_keys_map_to_temma_names() {
        assert_eq!(
            env_key("APPLICATION__ROOTCONTROLLER"),
            "application.rootController"
        );
        assert_eq!(
            env_key("application__enablesessions"),
            "application.enableSessions"
        );
        assert_eq!(
            env_key("APPLICATION__DATASOURCES__ZMQ_CLIENT_PUSH"),
            "application.dataSources.zmq_client_push"
        );
        assert_eq!(env_key("SERVER__LISTEN"), "server.listen");
    }
}
