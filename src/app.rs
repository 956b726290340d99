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

use crate::broker::Broker;
use crate::config::{Config, Role};
use crate::direct::{Front, Limits};
use crate::hub::Hub;
use crate::message::{Acks, Broadcast, Publisher};
use crate::metrics::Metrics;
use crate::script::ReloadHandle;
use crate::server::{self, Routes};
use crate::socket::{Bound, SocketError};

/// Starting failed before anything ran.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot listen on http://{address}: {source}")]
    Http {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] crate::broker::StartError),
}

/// A running temma process: its tasks and what tests need to reach it.
pub struct App {
    http: Option<SocketAddr>,
    bound: Bound,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    reload: Option<ReloadHandle>,
}

impl App {
    /// `temma serve`: the web node, plus the broker when `broker.embedded` is on.
    pub async fn serve(config: &Config, shutdown: CancellationToken) -> Result<App, StartError> {
        let metrics = Metrics::new();
        let tracker = TaskTracker::new();
        let mut bound = Bound::default();
        let mut reload = None;
        if config.broker.embedded {
            let broker = Broker::bind(config, &mut bound, metrics.clone()).await?;
            for counter in broker.peer_counters {
                tracker.spawn(counter(shutdown.clone()));
            }
            tracker.spawn(broker.broker.run(shutdown.clone()));
            tracker.spawn(broker.reloader.run(shutdown.clone()));
            reload = Some(broker.reload);
        }
        let address = config.server.listen;
        let listener =
            server::bind(&config.server).map_err(|source| StartError::Http { address, source })?;
        let http = listener
            .local_addr()
            .map_err(|source| StartError::Http { address, source })?;

        let acks = Acks::new();
        let max_published = crate::wire::max_published_bytes(config.broker.max_frame_bytes);
        let hub = Hub::new(&config.event, max_published, metrics.clone(), acks.clone());
        let (publisher, push_task) = Publisher::new(
            &config.message,
            bound.addresses(config.dsn(Role::MessagePush)),
            config.broker.max_frame_bytes,
            acks,
            metrics.clone(),
        );
        tracker.spawn(push_task.run(shutdown.clone()));
        for address in bound.addresses(config.dsn(Role::EventSub)) {
            tracker.spawn(hub.clone().run_subscriber(address, shutdown.clone()));
        }
        tracker.spawn(hub.clone().run_timers(shutdown.clone()));

        let front = Front::new(
            hub.clone(),
            config.server.cors_origins.clone(),
            Limits {
                max_connections: crate::direct::fit_max_connections(config.server.max_connections),
                max_pending_heads: config.server.max_pending_heads,
                head_timeout: Duration::from_secs(config.server.head_timeout_secs),
                write_stall: Duration::from_secs(config.server.write_stall_timeout_secs),
            },
            metrics.clone(),
        );
        let service = server::router(Routes {
            static_dir: config.resolve(&config.server.static_dir),
            root: config.application.root_controller,
            broadcast: Broadcast {
                config: config.message.clone(),
                publisher,
                metrics: metrics.clone(),
                sessions: config.application.enable_sessions,
                cors_origins: Arc::new(config.server.cors_origins.clone()),
                trusted_proxies: Arc::new(config.server.trusted_proxies.clone()),
                body_timeout: Duration::from_secs(config.server.body_timeout_secs),
            },
            hub,
            front: front.clone(),
            metrics: metrics.clone(),
            sessions: crate::session::build(&config.application),
            cors_origins: config.server.cors_origins.clone(),
        });
        tracker.spawn(server::serve(
            listener,
            service,
            config.server.clone(),
            front,
            tracker.clone(),
            shutdown.clone(),
        ));
        tracing::info!(address = %http, "listening on http://{http}");
        tracker.close();
        Ok(App {
            http: Some(http),
            bound,
            metrics,
            tracker,
            reload,
        })
    }

    /// `temma broker`: the broker alone.
    pub async fn broker(config: &Config, shutdown: CancellationToken) -> Result<App, StartError> {
        let metrics = Metrics::new();
        let tracker = TaskTracker::new();
        let mut bound = Bound::default();
        let broker = Broker::bind(config, &mut bound, metrics.clone()).await?;
        for counter in broker.peer_counters {
            tracker.spawn(counter(shutdown.clone()));
        }
        tracker.spawn(broker.broker.run(shutdown.clone()));
        tracker.spawn(broker.reloader.run(shutdown));
        tracker.close();
        Ok(App {
            http: None,
            bound,
            metrics,
            tracker,
            reload: Some(broker.reload),
        })
    }

    /// The HTTP address actually bound (port 0 resolved), for `temma serve`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// Where the ZeroMQ sockets this process bound actually listen.
    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Asks the broker to reload its scripts (and its chain from the config file), as SIGHUP
    /// does. Does nothing in a web node without an embedded broker.
    pub fn reload_scripts(&self) {
        if let Some(reload) = &self.reload {
            reload.reload();
        }
    }

    /// Waits until every task has finished (after shutdown).
    pub async fn wait(self) {
        self.tracker.wait().await;
    }
}
