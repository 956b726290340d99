//! Wiring: what `temma serve` and `temma broker` start, in which order, and how they stop.
//!
//! Start-up binds everything first (broker sockets, then the HTTP listener) and only then
//! spawns the tasks, so that a bind failure ends start-up before anything runs. Connecting
//! sockets (PUSH, SUB) connect in their own tasks: `connect()` in the zeromq crate blocks until
//! the peer is there, and a web node must serve (and answer 503) while the broker is away.
//!
//! Shutdown: one [`CancellationToken`] reaches every task. The HTTP server stops accepting and
//! gives open requests `server.shutdown_grace_secs`; the hub ends every SSE stream; the broker
//! publishes the message in hand and stops; [`App::wait`] returns when all tasks are done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::Acks;
use crate::broker::BrokerError;
use crate::config::{Config, Role};
use crate::context::{Context, UnknownDataSource};
use crate::message::Broadcast;
use crate::metrics::Metrics;
use crate::script::{ChainSource, ReloadHandle};
use crate::server::{self, Routes};
use crate::socket::{Addresses, SocketError};

/// Starting failed before anything ran.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(
        "cannot listen on http://{address}: {source}{}",
        if source.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "; another process holds this address: stop it, or set `{key}` ({}) to a free one",
                crate::config::env_name(key)
            )
        } else {
            String::new()
        }
    )]
    Http {
        /// The configuration key of the address.
        key: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    DataSource(#[from] UnknownDataSource),
}

/// A running temma process: its tasks and what tests need to reach it.
pub struct App {
    http: Option<SocketAddr>,
    addresses: Addresses,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    /// The long-lived tasks, so that a panic in one reaches [`App::wait`].
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// What SIGHUP reloads: the broker's chain, the access hook.
    reload: Vec<ReloadHandle>,
    /// The broker's run id, when this process runs one.
    run: Option<u64>,
    /// With `broker.peer`: what the broker is in its pair.
    pair_status: Option<tokio::sync::watch::Receiver<serde_json::Value>>,
    /// With the embedded broker: its chain, as the console shows it.
    chain_status: Option<Arc<crate::script::ChainStatus>>,
    /// A web node's connections, which SIGHUP may move.
    wiring: Option<tokio::sync::Mutex<Wiring>>,
}

/// What [`App::rewire`] did.
#[derive(Debug, Default)]
pub struct Rewired {
    /// Each connection moved, with its new addresses.
    pub changed: Vec<String>,
    /// Changes that take a restart.
    pub restart: Vec<String>,
}

/// A web node's ZeroMQ connections and how to move them.
struct Wiring {
    hub: crate::hub::Hub,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    push: tokio::sync::watch::Sender<Vec<String>>,
    snapshot: Option<tokio::sync::watch::Sender<Vec<String>>>,
    subs: Vec<SubTask>,
    /// With `event.failover`: the node's view of the two brokers.
    failover: Option<Arc<crate::failover::Brokers>>,
    /// The embedded broker serves this node in the process (no PUSH or SUB socket to move):
    /// the `message.push` and `event.sub` data sources it started with.
    local: Option<[String; 2]>,
}

/// One SUB socket's task.
struct SubTask {
    address: String,
    stop: CancellationToken,
    /// Gives the snapshot client back when the task stops.
    handle: tokio::task::JoinHandle<Option<crate::snapshot::Client>>,
}

/// How long a new SUB socket gets to connect before the one it replaces closes anyway.
const REWIRE_CONNECT: Duration = Duration::from_secs(5);

impl Wiring {
    fn start_sub(
        &mut self,
        address: String,
        client: Option<crate::snapshot::Client>,
        strict: bool,
    ) {
        let stop = self.shutdown.child_token();
        // With `event.failover`, the SUB sockets are started once, in the brokers' order.
        let failover = self
            .failover
            .as_ref()
            .map(|brokers| (self.subs.len(), brokers.clone()));
        let handle = self.tracker.spawn(self.hub.clone().run_subscriber(
            address.clone(),
            client,
            strict,
            failover,
            stop.clone(),
        ));
        self.subs.push(SubTask {
            address,
            stop,
            handle,
        });
    }

    /// Replaces the SUB sockets with sockets to `addresses` (and moves the snapshot socket to
    /// `snapshot`, when given).
    ///
    /// The new sockets first; the old ones close once those are connected and had a moment
    /// (their subscription reaches the broker): a message published in between comes on both
    /// or on one, and the hub drops a second copy by id. With a snapshot socket (one SUB
    /// socket, which holds the snapshot client), the new SUB socket overlaps the old one
    /// without it; then the client moves, and a SUB socket holding it replaces the overlapping
    /// one: it asks at once for what came after the node's newest message of that broker.
    async fn move_subs(
        &mut self,
        addresses: Vec<String>,
        snapshot: Option<Vec<String>>,
        metrics: &Metrics,
    ) {
        let (kept, removed): (Vec<SubTask>, Vec<SubTask>) = std::mem::take(&mut self.subs)
            .into_iter()
            .partition(|sub| addresses.contains(&sub.address));
        let added: Vec<String> = addresses
            .into_iter()
            .filter(|address| !kept.iter().any(|sub| &sub.address == address))
            .collect();
        self.subs = kept;
        let wanted = metrics.sub_connected.get() + added.len() as i64;
        // With a snapshot socket, the overlapping one leaves what follows a gap to the
        // snapshot its replacement asks for.
        let strict = self.snapshot.is_some();
        for address in &added {
            self.start_sub(address.clone(), None, strict);
        }
        let _ = tokio::time::timeout(REWIRE_CONNECT, async {
            while metrics.sub_connected.get() < wanted {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tokio::time::sleep(crate::message::REWIRE_LINGER).await;
        let mut client = None;
        for sub in removed {
            sub.stop.cancel();
            client = client.or(sub.handle.await.ok().flatten());
        }
        if let (Some(targets), Some(snapshot)) = (&self.snapshot, snapshot) {
            targets.send_replace(snapshot);
        }
        if let Some(client) = client
            && let Some(overlapping) = self.subs.pop()
        {
            overlapping.stop.cancel();
            let _ = overlapping.handle.await;
            self.start_sub(overlapping.address, Some(client), false);
        }
    }
}

/// Whether every address the `connect` role's data source reaches is one the embedded broker
/// bound for `bind` (port 0 follows the bind).
fn points_at(ctx: &Context, config: &Config, connect: Role, bind: Role) -> bool {
    let bound = ctx.addresses.listening(config.dsn(bind));
    let targets = ctx.addresses.targets(config.dsn(connect));
    !targets.is_empty() && targets.iter().all(|target| bound.contains(target))
}

/// With `event.failover`: points the PUSH socket at the broker the node pushes to (the active
/// one, or the one that may take over), until shutdown.
async fn follow_target(
    brokers: Arc<crate::failover::Brokers>,
    pushes: Vec<String>,
    push: tokio::sync::watch::Sender<Vec<String>>,
    shutdown: CancellationToken,
) {
    let mut target = brokers.target();
    loop {
        let index = *target.borrow_and_update();
        if let Some(address) = pushes.get(index) {
            push.send_if_modified(|current| {
                let changed = current.as_slice() != std::slice::from_ref(address);
                if changed {
                    tracing::info!(%address, "pushing to this broker");
                    *current = vec![address.clone()];
                }
                changed
            });
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = target.changed() => if changed.is_err() { return },
        }
    }
}

/// With `event.failover`: while no active broker is heard, pushes this node's presence report
/// every [`crate::failover::BEAT_INTERVAL`] to the broker it targets, so that a backup can take
/// over even when nothing is posted.
async fn vote(
    brokers: Arc<crate::failover::Brokers>,
    send: impl Fn() + Send + 'static,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(crate::failover::BEAT_INTERVAL * 2);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if brokers.active().is_none() {
            send();
        }
    }
}

/// Where SIGHUP reads the script chain again: the configuration file.
fn chain_source(ctx: &Context) -> Option<ChainSource> {
    let file = ctx.config_file.clone()?;
    Some(Box::new(move || {
        let config = Config::load(&file).map_err(|error| error.to_string())?;
        let specs = config.broker.script_specs(&config.root());
        Ok((specs, config.broker.compiled.take()))
    }))
}

/// The chain's scripts by name, in order, for start-up lines and health.
fn script_names(config: &Config) -> Vec<String> {
    config
        .broker
        .script_specs(&config.root())
        .into_iter()
        .map(|spec| spec.name)
        .collect()
}

impl App {
    /// `temma serve`: the web node, plus the broker when `broker.embedded` is on.
    pub async fn serve(config: &Config, shutdown: CancellationToken) -> Result<App, StartError> {
        let mut app = App::new();
        let mut ctx = config.context(app.metrics.clone());
        let embedded = if config.broker.embedded {
            Some(Self::bind_broker(config, &mut ctx).await?)
        } else {
            None
        };
        let address = config.server.listen;
        let key = "server.listen";
        let failed = |source| StartError::Http {
            key,
            address,
            source,
        };
        let listener = server::bind(&config.server).map_err(failed)?;
        let http = listener.local_addr().map_err(failed)?;

        let acks = Acks::new();
        let hub = config.event.build(&ctx, acks.clone(), &config.rooms);
        let (mut publisher, push_task) = config.message.build(&ctx, acks)?;
        let push_targets = push_task.addresses.clone();
        if config.event.failover {
            // One broker at a time: the first until the heartbeats say which is active.
            push_targets.send_modify(|targets| targets.truncate(1));
        }
        // The embedded broker, and this node's sockets point at it: no loopback hop.
        let local = embedded.is_some()
            && config.broker.peer.is_none()
            && !config.event.failover
            && points_at(&ctx, config, Role::MessagePush, Role::BrokerPull)
            && points_at(&ctx, config, Role::EventSub, Role::BrokerPub);
        let mut push_task = Some(push_task);
        if let Some(mut parts) = embedded {
            if local && let Some(task) = push_task.take() {
                publisher.serve_inline(parts.broker.serve_locally(task.into_queue(), hub.clone()));
            }
            app.spawn_broker(parts, &shutdown);
        }
        if let Some(task) = push_task {
            app.spawn(task.run(shutdown.clone()));
        }
        let mut wiring = Wiring {
            hub: hub.clone(),
            shutdown: shutdown.clone(),
            tracker: app.tracker.clone(),
            push: push_targets,
            snapshot: None,
            subs: Vec::new(),
            failover: None,
            local: None,
        };
        let subs = config.event.sub_addresses(&ctx)?;
        let snapshots = config.event.snapshot_addresses(&ctx)?;
        let max_published = crate::wire::max_published_bytes(ctx.max_frame_bytes);
        let dsns =
            |c: &Config| [Role::MessagePush, Role::EventSub].map(|role| c.dsn(role).to_string());
        wiring.local = local.then(|| dsns(config));
        if local {
            // The broker hands this node what it publishes: no SUB socket, nothing to sync.
        } else if config.event.failover {
            // Validated: as many snapshot and push endpoints as SUB ones, in the same order.
            let pushes = ctx.addresses.targets(config.dsn(Role::MessagePush));
            let brokers = Arc::new(crate::failover::Brokers::new(
                subs.len(),
                app.metrics.clone(),
            ));
            app.spawn(brokers.clone().run(shutdown.clone()));
            app.spawn(follow_target(
                brokers.clone(),
                pushes,
                wiring.push.clone(),
                shutdown.clone(),
            ));
            let (votes, hub_votes) = (publisher.clone(), hub.clone());
            app.spawn(vote(
                brokers.clone(),
                move || votes.send_report(hub_votes.presence_vote()),
                shutdown.clone(),
            ));
            wiring.failover = Some(brokers);
            hub.expect_snapshot();
            let snapshots = snapshots.unwrap_or_default();
            for (address, snapshot) in subs.into_iter().zip(snapshots) {
                let (client, task, _) =
                    crate::snapshot::client(vec![snapshot], max_published, shutdown.clone());
                app.spawn(task);
                wiring.start_sub(address, Some(client), false);
            }
        } else {
            let mut snapshot = None;
            if let Some(addresses) = snapshots {
                let (client, task, targets) =
                    crate::snapshot::client(addresses, max_published, shutdown.clone());
                app.spawn(task);
                hub.expect_snapshot();
                snapshot = Some(client);
                wiring.snapshot = Some(targets);
            }
            for address in subs {
                // Validation allows a snapshot with one SUB address only.
                wiring.start_sub(address, snapshot.take(), false);
            }
        }
        let brokers = wiring.failover.clone().map(|brokers| {
            let addresses = wiring.subs.iter().map(|sub| sub.address.clone()).collect();
            (brokers, addresses)
        });
        app.spawn(hub.clone().run_timers(shutdown.clone()));
        let reports = publisher.clone();
        app.spawn(hub.clone().run_presence(
            config.rooms.presence,
            move |report| reports.send_report(report),
            shutdown.clone(),
        ));

        // The console: no route and no task unless it is on.
        let console = match (config.console.enabled, config.console.token()) {
            (true, Some(token)) => {
                // Nodes with the console on announce themselves to each other.
                hub.announce(http.to_string());
                let console = Arc::new(crate::console::Console::new(
                    token,
                    config.resolve(&config.server.static_dir).join("console"),
                    Arc::new(config.server.trusted_proxies.clone()),
                    app.chain_status.clone(),
                ));
                app.spawn(console.clone().run_sampler(
                    app.metrics.clone(),
                    hub.clone(),
                    brokers.clone(),
                    shutdown.clone(),
                ));
                Some(console)
            }
            _ => None,
        };
        let access = app.start_access(config, &shutdown);
        let broadcast = Arc::new(Broadcast {
            config: config.message.clone(),
            publisher,
            metrics: app.metrics.clone(),
            sessions: config.application.enable_sessions,
            cors_origins: Arc::new(config.server.cors_origins.clone()),
            trusted_proxies: Arc::new(config.server.trusted_proxies.clone()),
            body_timeout: Duration::from_secs(config.server.body_timeout_secs),
            default_room: Arc::from(config.rooms.default.as_str()),
            access,
        });
        let front = config.server.front(
            hub.clone(),
            config
                .application
                .enable_sessions
                .then(|| config.application.session_name.clone()),
            broadcast.clone(),
        );
        let service = server::router(Routes {
            static_dir: config.resolve(&config.server.static_dir),
            root: config.application.root_controller,
            broadcast,
            hub,
            front: front.clone(),
            metrics: app.metrics.clone(),
            sessions: config.sessions(),
            fetch_sessions: config.sessions(),
            cors_origins: config.server.cors_origins.clone(),
            brokers,
            console,
        });
        let tracker = app.tracker.clone();
        app.spawn(server::serve(
            listener,
            service,
            config.server.clone(),
            front,
            tracker,
            shutdown.clone(),
        ));
        let scripts = script_names(config);
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %config.file.display(),
            broker = if config.broker.embedded { "embedded" } else { "separate (`temma broker`)" },
            scripts = ?scripts,
            access = %config
                .access
                .spec(&config.root())
                .map_or_else(|| "none".to_owned(), |spec| spec.name),
            default_room = %config.rooms.default,
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            scheduling = crate::config::current_scheduling(),
            huge_pages = crate::config::current_huge_pages(),
            "listening on http://{http}"
        );
        app.http = Some(http);
        app.addresses = ctx.addresses;
        app.wiring = Some(tokio::sync::Mutex::new(wiring));
        app.tracker.close();
        Ok(app)
    }

    /// Moves the web node's ZeroMQ connections to where `config` says (SIGHUP, after the file
    /// was read and validated): `message.push`, `event.sub` and `event.snapshot` addresses.
    /// No SSE client is closed: a new SUB socket is connected (and given a moment) before a
    /// removed one closes, or, with a snapshot socket, the new one fills what the switch
    /// missed; the old PUSH socket stays open a moment for what it holds. Returns what changed,
    /// and what needs a restart to change.
    pub async fn rewire(&self, config: &Config) -> Rewired {
        let mut rewired = Rewired::default();
        let Some(wiring) = &self.wiring else {
            return rewired;
        };
        let mut wiring = wiring.lock().await;
        if let Some(started) = &wiring.local {
            // Served by the embedded broker in the process: its sockets move with a restart.
            let now = [Role::MessagePush, Role::EventSub].map(|role| config.dsn(role).to_string());
            if &now != started {
                rewired.restart.push(
                    "message.push and event.sub (this node is served by its embedded broker in the process)"
                        .to_owned(),
                );
            }
            return rewired;
        }
        if wiring.failover.is_some() || config.event.failover {
            // A pair's lists are paired by place: moved by a restart (one node at a time).
            let subs: Vec<String> = wiring.subs.iter().map(|sub| sub.address.clone()).collect();
            let new_subs = self.addresses.targets(config.dsn(Role::EventSub));
            if wiring.failover.is_some() != config.event.failover || subs != new_subs {
                rewired.restart.push(
                    "event.failover and the brokers it lists (message.push, event.sub, event.snapshot)"
                        .to_owned(),
                );
            }
            return rewired;
        }
        let snapshot = config
            .event
            .snapshot
            .as_ref()
            .map(|_| self.addresses.targets(config.dsn(Role::EventSnapshot)));
        // The snapshot socket moves with the SUB socket it serves (after it).
        let mut snapshot_to = None;
        match (&wiring.snapshot, snapshot) {
            (Some(targets), Some(snapshot)) => {
                if *targets.borrow() != snapshot {
                    rewired
                        .changed
                        .push(format!("event.snapshot → {}", snapshot.join(", ")));
                    snapshot_to = Some(snapshot);
                }
            }
            (None, None) => {}
            _ => rewired
                .restart
                .push("event.snapshot (turned on or off)".to_owned()),
        }
        let subs = self.addresses.targets(config.dsn(Role::EventSub));
        let current: Vec<String> = wiring.subs.iter().map(|sub| sub.address.clone()).collect();
        if current != subs {
            rewired
                .changed
                .push(format!("event.sub → {}", subs.join(", ")));
            wiring.move_subs(subs, snapshot_to, &self.metrics).await;
        } else if let (Some(targets), Some(snapshot)) = (&wiring.snapshot, snapshot_to) {
            targets.send_replace(snapshot);
        }
        // The PUSH socket moves last: by then this node hears the new broker, so its own
        // messages come back to it.
        let push = self.addresses.targets(config.dsn(Role::MessagePush));
        if *wiring.push.borrow() != push {
            rewired
                .changed
                .push(format!("message.push → {}", push.join(", ")));
            wiring.push.send_replace(push);
        }
        rewired
    }

    /// `temma broker`: the broker alone.
    pub async fn broker(config: &Config, shutdown: CancellationToken) -> Result<App, StartError> {
        let mut app = App::new();
        let mut ctx = config.context(app.metrics.clone());
        app.start_broker(config, &mut ctx, &shutdown).await?;
        let scripts = script_names(config);
        if let Some(address) = config.broker.http {
            let failed = |source| StartError::Http {
                key: "broker.http",
                address,
                source,
            };
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(failed)?;
            let http = listener.local_addr().map_err(failed)?;
            let service = server::broker_router(
                app.metrics.clone(),
                scripts.clone(),
                app.pair_status.clone(),
            );
            app.spawn(server::serve_status(
                listener,
                service,
                Duration::from_secs(config.server.head_timeout_secs),
                shutdown.clone(),
            ));
            app.http = Some(http);
        }
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %config.file.display(),
            run = app.run.unwrap_or_default(),
            pull = %config.dsn(crate::config::Role::BrokerPull),
            publish = %config.dsn(crate::config::Role::BrokerPub),
            snapshot = %config
                .broker
                .snapshot
                .as_ref()
                .map_or_else(|| "none".to_owned(), |_| config.dsn(crate::config::Role::BrokerSnapshot).to_string()),
            scripts = ?scripts,
            http = %app.http.map_or_else(|| "none (set `broker.http`)".to_owned(), |a| format!("http://{a}/health, /metrics")),
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            scheduling = crate::config::current_scheduling(),
            huge_pages = crate::config::current_huge_pages(),
            "broker running"
        );
        app.addresses = ctx.addresses;
        app.tracker.close();
        Ok(app)
    }

    fn new() -> App {
        App {
            http: None,
            addresses: Addresses::default(),
            metrics: Metrics::new(),
            tracker: TaskTracker::new(),
            handles: Vec::new(),
            wiring: None,
            reload: Vec::new(),
            run: None,
            pair_status: None,
            chain_status: None,
        }
    }

    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.handles.push(self.tracker.spawn(task));
    }

    async fn start_broker(
        &mut self,
        config: &Config,
        ctx: &mut Context,
        shutdown: &CancellationToken,
    ) -> Result<(), StartError> {
        let parts = Self::bind_broker(config, ctx).await?;
        self.spawn_broker(parts, shutdown);
        Ok(())
    }

    /// Builds the broker, its sockets bound (nothing runs yet).
    async fn bind_broker(
        config: &Config,
        ctx: &mut Context,
    ) -> Result<crate::broker::Parts, StartError> {
        let source = chain_source(ctx);
        Ok(config.broker.build(ctx, source).await?)
    }

    /// Starts the broker's tasks.
    fn spawn_broker(&mut self, parts: crate::broker::Parts, shutdown: &CancellationToken) {
        for task in parts.peer_counters.into_iter().chain(parts.pair_tasks) {
            self.spawn(task(shutdown.clone()));
        }
        self.run = Some(parts.broker.run_id());
        self.pair_status = parts.pair_status;
        self.chain_status = Some(parts.chain_status);
        if let Some(server) = parts.snapshot {
            self.spawn(server.run(self.metrics.clone(), shutdown.clone()));
        }
        self.spawn(parts.broker.run(shutdown.clone()));
        self.spawn(parts.reloader.run(shutdown.clone()));
        self.reload.push(parts.reload);
    }

    /// The access hook, if the configuration has one, and the tasks that reload it (on file
    /// change, and from the configuration file on SIGHUP).
    fn start_access(
        &mut self,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> Option<crate::script::Hook> {
        let root = config.root();
        let spec = config.access.spec(&root)?;
        let script = match config.access.compiled.take().and_then(|mut s| s.pop()) {
            Some(script) => script,
            // Validated already: a failure now (the file changed since) is logged, and the
            // node runs without the hook rather than open nothing.
            None => match spec.load() {
                Ok(script) => script,
                Err(error) => {
                    tracing::error!(%error, "the access hook cannot be loaded; every request is refused");
                    return Some(crate::script::Hook::refusing());
                }
            },
        };
        let hook = crate::script::Hook::new(script);
        let file = config.file.clone();
        let source: Option<ChainSource> = (!file.as_os_str().is_empty()).then(|| {
            Box::new(move || {
                let config = Config::load(&file).map_err(|error| error.to_string())?;
                let spec = config.access.spec(&config.root());
                let compiled = config.access.compiled.take();
                Ok((spec.into_iter().collect(), compiled))
            }) as ChainSource
        });
        let (reloader, reloads, handle) = crate::script::Reloader::new(
            vec![spec],
            source,
            config.broker.watch,
            self.metrics.clone(),
        );
        self.spawn(reloader.run(shutdown.clone()));
        self.spawn(hook.clone().follow(reloads, shutdown.clone()));
        self.reload.push(handle);
        Some(hook)
    }

    /// The HTTP address actually bound (port 0 resolved): `server.listen` for `temma serve`,
    /// `broker.http` for `temma broker`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// Where the ZeroMQ sockets this process bound actually listen.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Asks the broker to reload its scripts (and its chain from the config file), as SIGHUP
    /// does. Does nothing in a web node without an embedded broker.
    pub fn reload_scripts(&self) {
        for reload in &self.reload {
            reload.reload();
        }
    }

    /// Waits until every task has finished (after shutdown). A panic in one of the
    /// long-lived tasks is raised again here.
    pub async fn wait(self) {
        self.tracker.wait().await;
        for handle in self.handles {
            if let Err(error) = handle.await
                && error.is_panic()
            {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }
}
