//! The HTTP side: the `[server]` section, the router, and the salvo server.
//!
//! Routes follow Temma's `/controller/action` convention:
//!
//! | route                      | component                                   |
//! |----------------------------|---------------------------------------------|
//! | `GET /`                    | the root controller ([`crate::homepage`])   |
//! | `POST /message/broadcast`  | [`crate::message`]                          |
//! | `GET /event/fetch`         | [`crate::event`] (SSE)                      |
//! | `GET /health`              | liveness and ZeroMQ connection state        |
//! | `GET /metrics`             | Prometheus text format ([`crate::metrics`]) |
//! | `GET /rooms`               | rooms with their client counts, all nodes   |
//! | `/console`, `/console/…`   | the operator's console ([`crate::console`]) |
//! | `GET /<file>`              | files of the static folder                  |
//!
//! Anything else gets a JSON 404 (or 405 for a known route and the wrong method).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use salvo::catcher::Catcher;
use salvo::conn::tcp::TcpCoupler;
use salvo::conn::{Accepted, Acceptor, Holding, StraightStream};
use salvo::fuse::{ArcFusePolicy, FuseAction, FuseConfig, FuseInfo, TransProto};
use salvo::http::StatusCode;
use salvo::http::Version;
use salvo::http::uri::Scheme;
use salvo::prelude::*;
use salvo::serve_static::StaticDir;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::context::Root;
use crate::direct::{Conn, Front};
use crate::error::{JsonError, write_json};
use crate::event::Fetch;
use crate::homepage::{Homepage, INDEX, RootController};
use crate::hub::Hub;
use crate::message::Broadcast;
use crate::metrics::Metrics;

/// Default `server.listen`: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Default `server.static_dir`, relative to the application root.
pub const DEFAULT_STATIC_DIR: &str = "static";
/// Default `server.shutdown_grace_secs`.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 5;
/// The most hyper buffers for one connection.
pub const HTTP_BUFFER_BYTES: usize = 64 * 1024;
/// Default `server.write_stall_timeout_secs`.
pub const DEFAULT_WRITE_STALL_TIMEOUT_SECS: u64 = 30;
/// Default `server.head_timeout_secs`.
pub const DEFAULT_HEAD_TIMEOUT_SECS: u64 = 10;
/// Default `server.body_timeout_secs`.
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 10;
/// Default `server.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Default `server.max_pending_heads`.
pub const DEFAULT_MAX_PENDING_HEADS: usize = 1024;

/// The `[server]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port of the HTTP server: `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`
    /// (127.0.0.1) or `*:PORT` (every interface). Default `"127.0.0.1:8000"`.
    #[serde(deserialize_with = "crate::dsn::listen_address")]
    pub listen: SocketAddr,
    /// Folder of `index.html`, `chat.js` and other static files, relative to the application
    /// root. Default `"static"`.
    pub static_dir: PathBuf,
    /// Seconds that open requests get to finish on shutdown. Default 5.
    pub shutdown_grace_secs: u64,
    /// Seconds a write to a client may stay blocked before the connection is closed (a client
    /// that stopped reading). Default 30.
    pub write_stall_timeout_secs: u64,
    /// Seconds a request head may take to arrive, whole (not per read); also how long a
    /// kept-alive connection may wait for its next request. Default 10.
    pub head_timeout_secs: u64,
    /// Seconds a POST body may take to arrive, whole; then 408. Default 10.
    pub body_timeout_secs: u64,
    /// Open HTTP connections (SSE streams included); a new one past this gets a 503 and is
    /// closed. Lowered at start to fit the process's descriptor limit. Default 16384.
    pub max_connections: usize,
    /// Connections still sending their first request head; past this a new one gets a 503.
    /// Default 1024.
    pub max_pending_heads: usize,
    /// Kernel send buffer of each HTTP connection, in bytes; 0 (default) leaves it to the
    /// system's autotuning (up to several MB per connection). A bound caps the kernel memory an
    /// SSE client that stops reading can hold, and lets its queue fill (and the client be cut
    /// off) sooner.
    pub socket_send_buffer_bytes: u32,
    /// Origins allowed to call temma from another site (CORS), e.g.
    /// `["https://chat.example.com"]`, or `["*"]` for any. Default `[]`: CORS off, browsers
    /// only allow the page temma serves itself.
    pub cors_origins: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` header names the client (addresses or networks,
    /// e.g. `["127.0.0.1"]` behind a local nginx). Default `[]`: the client is the peer.
    pub trusted_proxies: Vec<crate::request::TrustedProxy>,
}

fn default_static_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATIC_DIR)
}
fn default_write_stall() -> u64 {
    DEFAULT_WRITE_STALL_TIMEOUT_SECS
}
fn default_body_timeout() -> u64 {
    DEFAULT_BODY_TIMEOUT_SECS
}
fn default_max_pending_heads() -> usize {
    DEFAULT_MAX_PENDING_HEADS
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            static_dir: default_static_dir(),
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            write_stall_timeout_secs: default_write_stall(),
            head_timeout_secs: DEFAULT_HEAD_TIMEOUT_SECS,
            body_timeout_secs: default_body_timeout(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_heads: default_max_pending_heads(),
            socket_send_buffer_bytes: 0,
            cors_origins: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// The front door: connection limits and the direct SSE path, for this hub.
    pub fn front(
        &self,
        hub: Hub,
        session_cookie: Option<String>,
        broadcast: Arc<Broadcast>,
    ) -> Arc<Front> {
        Front::new(
            hub,
            crate::direct::Limits {
                max_connections: crate::direct::fit_max_connections(self.max_connections),
                max_pending_heads: self.max_pending_heads,
                head_timeout: Duration::from_secs(self.head_timeout_secs),
                write_stall: Duration::from_secs(self.write_stall_timeout_secs),
            },
            session_cookie,
            broadcast,
        )
    }

    pub fn validate(
        &self,
        root: &Root,
        root_controller: RootController,
        problem: &mut impl FnMut(&str, String),
    ) {
        let dir = root.resolve(&self.static_dir);
        if !dir.is_dir() {
            problem(
                "server.static_dir",
                format!(
                    "folder `{}` does not exist (looked for `{}`; relative paths start at the \
                     application root `{}`)",
                    self.static_dir.display(),
                    dir.display(),
                    root.path().display()
                ),
            );
        } else if root_controller == RootController::Homepage && !dir.join(INDEX).is_file() {
            problem(
                "server.static_dir",
                format!(
                    "folder `{}` has no `{INDEX}`, which the Homepage root controller serves",
                    dir.display()
                ),
            );
        }
        for (i, origin) in self.cors_origins.iter().enumerate() {
            if !valid_origin(origin) {
                problem(
                    &format!("server.cors_origins[{i}]"),
                    format!(
                        "`{origin}` is not an origin: write `*`, or a scheme, host and optional \
                         port such as `https://chat.example.com` or `http://localhost:3000`"
                    ),
                );
            }
        }
        for (key, value) in [
            (
                "server.write_stall_timeout_secs",
                self.write_stall_timeout_secs,
            ),
            ("server.head_timeout_secs", self.head_timeout_secs),
            ("server.body_timeout_secs", self.body_timeout_secs),
            ("server.max_connections", self.max_connections as u64),
            ("server.max_pending_heads", self.max_pending_heads as u64),
        ] {
            if value == 0 {
                problem(key, "is 0: must be at least 1".to_owned());
            }
        }
    }
}

/// `*`, or `http(s)://host[:port]` with nothing after.
fn valid_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// The CORS middleware for `server.cors_origins`, if any are allowed.
fn cors(origins: &[String]) -> Option<salvo::cors::CorsHandler> {
    use salvo::cors::{AllowOrigin, Any, Cors};
    use salvo::http::Method;
    if origins.is_empty() {
        return None;
    }
    let allow: AllowOrigin = if origins.iter().any(|o| o == "*") {
        Any.into()
    } else {
        origins
            .iter()
            .filter_map(|o| salvo::http::HeaderValue::from_str(o).ok())
            .collect::<Vec<_>>()
            .into()
    };
    Some(
        Cors::new()
            .allow_origin(allow)
            .allow_methods(vec![Method::GET, Method::POST])
            .allow_headers(vec!["content-type", "last-event-id", "idempotency-key"])
            .expose_headers(vec![crate::message::MESSAGE_ID_HEADER])
            .max_age(3600)
            .into_handler(),
    )
}

/// Everything the router serves.
pub struct Routes {
    pub static_dir: PathBuf,
    pub root: RootController,
    pub broadcast: Arc<Broadcast>,
    pub hub: Hub,
    pub front: Arc<Front>,
    pub metrics: Arc<Metrics>,
    pub sessions: Option<salvo::session::SessionHandler<salvo::session::CookieStore>>,
    /// The same sessions, read by `GET /event/fetch` for the room's list of names.
    pub fetch_sessions: Option<salvo::session::SessionHandler<salvo::session::CookieStore>>,
    pub cors_origins: Vec<String>,
    /// With `event.failover`: the node's view of the two brokers, and their SUB addresses.
    pub brokers: Option<(Arc<crate::failover::Brokers>, Vec<String>)>,
    /// With `console.enabled`: the operator's console.
    pub console: Option<Arc<crate::console::Console>>,
}

/// Builds the router (also used by tests in-process).
pub fn router(routes: Routes) -> Service {
    let Routes {
        static_dir,
        root,
        broadcast,
        hub,
        front,
        metrics,
        sessions,
        fetch_sessions,
        cors_origins,
        brokers,
        console,
    } = routes;
    let root_handler = || match root {
        RootController::Homepage => Homepage {
            index: static_dir.join(INDEX),
        },
    };
    let static_files = || {
        StaticDir::new([static_dir.clone()])
            .include_dot_files(false)
            .auto_list(false)
    };
    // With sessions, the stream reads (never writes) the session for the room's names.
    let mut fetch = Router::with_path(crate::event::FETCH_PATH.trim_start_matches('/'));
    if let Some(sessions) = fetch_sessions {
        fetch = fetch.hoop(sessions);
    }
    let fetch = fetch
        .get(Fetch {
            hub: hub.clone(),
            front: front.clone(),
            access: front.access.clone(),
        })
        .goal(MethodNotAllowed { allow: "GET" });
    let hub_rooms = hub.clone();
    let limits = (
        broadcast.config.max_text_chars,
        broadcast.config.max_from_chars,
    );
    let mut message = Router::with_path(crate::direct_post::BROADCAST_PATH.trim_start_matches('/'));
    if let Some(sessions) = sessions {
        message = message.hoop(sessions);
    }
    let message = message
        .post(crate::message::BroadcastHandler(broadcast))
        .goal(MethodNotAllowed { allow: "POST" });
    // HEAD is answered like GET, without the body (hyper drops it).
    let mut router = Router::new();
    if let Some(console) = console {
        router = router.push(crate::console::router(console));
    }
    let router = router
        .get(root_handler())
        .head(root_handler())
        .push(message)
        .push(fetch)
        .push(Router::with_path("health").get(Health {
            hub,
            metrics: metrics.clone(),
            brokers,
        }))
        .push(Router::with_path("metrics").get(MetricsPage { metrics }))
        .push(Router::with_path("rooms").get(RoomList {
            hub: hub_rooms,
            limits,
        }))
        .push(
            Router::with_path("{**path}")
                .get(static_files())
                .head(static_files()),
        );
    let mut service = Service::new(router).catcher(Catcher::default().hoop(crate::error::catcher));
    // On the service, not the router: preflight requests match no route.
    if let Some(cors) = cors(&cors_origins) {
        service = service.hoop(cors);
    }
    service
}

/// A known route asked with the wrong method: 405 with `Allow`.
struct MethodNotAllowed {
    allow: &'static str,
}

#[async_trait]
impl Handler for MethodNotAllowed {
    async fn handle(
        &self,
        req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        res.headers_mut().insert(
            salvo::http::header::ALLOW,
            salvo::http::HeaderValue::from_static(self.allow),
        );
        JsonError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method {} is not allowed on `{}`; use {}",
                req.method(),
                req.uri().path(),
                self.allow
            ),
        )
        .write_to(res);
    }
}

/// `GET /health`: 200 when this node's ZeroMQ sockets are connected, 503 otherwise; the body
/// says which.
struct Health {
    hub: Hub,
    metrics: Arc<Metrics>,
    brokers: Option<(Arc<crate::failover::Brokers>, Vec<String>)>,
}

#[async_trait]
impl Handler for Health {
    async fn handle(
        &self,
        _req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        let push = self.metrics.push_connected.get() > 0;
        let sub = self.metrics.sub_connected.get() > 0;
        let mut ok = push && sub;
        let mut body = serde_json::json!({
            "push_connected": push,
            "sub_connected": sub,
            "sse_clients": self.hub.clients(),
        });
        if let Some((brokers, addresses)) = &self.brokers {
            let active = brokers.active();
            // No active broker: posts wait, then get 503.
            ok &= active.is_some();
            body["brokers"] = brokers.describe(addresses);
            body["active_broker"] = active.map_or(serde_json::Value::Null, |active| {
                serde_json::Value::from(addresses[active].clone())
            });
            body["failovers"] = serde_json::Value::from(self.metrics.failovers.get());
        }
        body["status"] = serde_json::Value::from(if ok { "ok" } else { "degraded" });
        res.status_code(if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        });
        write_json(res, &body);
    }
}

/// `GET /rooms`: every room with clients on any node, busiest first, with its count over all
/// nodes; and the default room.
struct RoomList {
    hub: Hub,
    /// `message.max_text_chars` and `message.max_from_chars`, for the page's counters.
    limits: (usize, usize),
}

#[async_trait]
impl Handler for RoomList {
    async fn handle(
        &self,
        _req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        let rooms: Vec<serde_json::Value> = self
            .hub
            .room_counts()
            .into_iter()
            .map(|(room, count)| serde_json::json!({ "room": room, "count": count }))
            .collect();
        res.headers_mut().insert(
            salvo::http::header::CACHE_CONTROL,
            salvo::http::HeaderValue::from_static("no-store"),
        );
        write_json(
            res,
            &serde_json::json!({
                "default": self.hub.default_room(),
                "rooms": rooms,
                "limits": { "text": self.limits.0, "from": self.limits.1 },
            }),
        );
    }
}

/// `GET /metrics`.
struct MetricsPage {
    metrics: Arc<Metrics>,
}

#[async_trait]
impl Handler for MetricsPage {
    async fn handle(
        &self,
        _req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        res.headers_mut().insert(
            salvo::http::header::CONTENT_TYPE,
            salvo::http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        let _ = res.write_body(self.metrics.render());
    }
}

/// The HTTP side of a standalone broker (`broker.http`): `GET /health` and `GET /metrics`, a
/// JSON 404 for anything else.
pub fn broker_router(
    metrics: Arc<Metrics>,
    scripts: Vec<String>,
    pair: Option<tokio::sync::watch::Receiver<serde_json::Value>>,
) -> Service {
    let router = Router::new()
        .push(Router::with_path("health").get(BrokerHealth {
            metrics: metrics.clone(),
            scripts: Arc::new(scripts),
            pair,
        }))
        .push(Router::with_path("metrics").get(MetricsPage { metrics }));
    Service::new(router).catcher(Catcher::default().hoop(crate::error::catcher))
}

/// Serves a small status service (a standalone broker's `broker.http`) on a bound listener
/// until `shutdown` fires; a request head must arrive within `head_timeout`.
pub async fn serve_status(
    listener: tokio::net::TcpListener,
    service: Service,
    head_timeout: Duration,
    shutdown: CancellationToken,
) {
    let acceptor = match salvo::conn::tcp::TcpAcceptor::try_from(listener) {
        Ok(acceptor) => acceptor,
        Err(error) => {
            tracing::error!(%error, "cannot serve the broker's HTTP address");
            return;
        }
    };
    let fuse = FuseConfig::default()
        .with_http1_header_timeout(head_timeout)
        .with_write_stall_timeout(head_timeout);
    let mut server = Server::new(acceptor).fuse_config(fuse);
    // As the web node's: a client that shut its side down after its request gets its answer.
    server.http1_mut().half_close(true);
    let handle = server.handle();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.stop_graceful(Duration::from_secs(1));
    });
    if let Err(error) = server.try_serve(service).await {
        tracing::error!(%error, "the broker's HTTP server failed");
    }
}

/// A standalone broker's `GET /health`: always 200 while it runs (its sockets are bound), with
/// its peers, what it published and its scripts.
struct BrokerHealth {
    metrics: Arc<Metrics>,
    scripts: Arc<Vec<String>>,
    /// With `broker.peer`: active or backup, and the peer as heard.
    pair: Option<tokio::sync::watch::Receiver<serde_json::Value>>,
}

#[async_trait]
impl Handler for BrokerHealth {
    async fn handle(
        &self,
        _req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        let peers = |socket: &str| {
            self.metrics
                .zmq_peers
                .get_or_create(&crate::metrics::SocketLabels {
                    socket: socket.to_owned(),
                })
                .get()
        };
        write_json(
            res,
            &serde_json::json!({
                "status": "ok",
                "role": "broker",
                "version": env!("CARGO_PKG_VERSION"),
                "pull_peers": peers("broker.pull"),
                "pub_peers": peers("broker.pub"),
                "published": self.metrics.broker_published.get(),
                "scripts": *self.scripts,
                "pair": self.pair.as_ref().map(|pair| pair.borrow().clone()),
            }),
        );
    }
}

/// Binds the HTTP listener, with the configured socket options.
pub fn bind(config: &ServerConfig) -> std::io::Result<tokio::net::TcpListener> {
    let address = config.listen;
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted connections inherit TCP_NODELAY from the listener on Linux. Without it, Nagle's
    // algorithm holds a small SSE frame back until the previous one is acknowledged, and the
    // client's delayed ACK turns that into up to 40 ms of latency.
    socket.set_nodelay(true)?;
    if config.socket_send_buffer_bytes > 0 {
        // Set on the listener: accepted connections inherit it.
        socket.set_send_buffer_size(config.socket_send_buffer_bytes)?;
    }
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Connections waiting to be accepted.
pub const LISTEN_BACKLOG: u32 = 1024;
/// Connections waiting between the accept loop and the HTTP server.
const HANDOFF_QUEUE: usize = 1024;

/// Serves `service` on an already bound listener until `shutdown` fires, then lets open
/// requests finish for up to `server.shutdown_grace_secs`.
///
/// [`crate::direct::accept_loop`] takes every connection: it serves a connection that opens
/// with `GET /event/fetch` itself, and hands any other, with the bytes already read, to salvo
/// — which also serves an SSE request that comes later on a kept-alive connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Service,
    config: ServerConfig,
    front: Arc<Front>,
    tasks: tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) {
    let local_addr = match listener.local_addr() {
        Ok(address) => address,
        Err(error) => {
            tracing::error!(%error, "cannot serve HTTP");
            return;
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF_QUEUE);
    tasks.spawn(crate::direct::accept_loop(
        listener,
        tx,
        front,
        tasks.clone(),
        shutdown.clone(),
    ));
    let acceptor = HandOff {
        rx,
        holdings: vec![Holding {
            local_addr: local_addr.into(),
            http_versions: vec![Version::HTTP_11],
            http_scheme: Scheme::HTTP,
        }],
    };
    // The head timeout applies to every later request of a kept-alive connection too (and so
    // bounds how long one may sit idle between requests).
    let fuse = FuseConfig::default()
        .with_http1_header_timeout(Duration::from_secs(config.head_timeout_secs))
        .with_write_stall_timeout(Duration::from_secs(config.write_stall_timeout_secs));
    let mut server = Server::new(acceptor).fuse_config(fuse);
    // hyper buffers up to ~400 KB per connection by default; SSE frames are small, and a
    // smaller buffer means a client that stops reading is noticed sooner (its queue fills).
    server.http1_mut().max_buf_size(HTTP_BUFFER_BYTES);
    // A client may shut its side down once its request is sent (`nc -N`, health checkers):
    // it still gets its answer. (hyper then no longer reads during a response to see a client
    // leave; the one long response, an SSE stream, watches its socket itself.)
    server.http1_mut().half_close(true);
    let handle = server.handle();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.stop_graceful(grace);
    });
    if let Err(error) = server.try_serve(service).await {
        tracing::error!(%error, "HTTP server failed");
    }
}

/// Feeds salvo the connections the accept loop hands on.
struct HandOff {
    rx: tokio::sync::mpsc::Receiver<(Conn, std::net::SocketAddr)>,
    holdings: Vec<Holding>,
}

impl Acceptor for HandOff {
    type Coupler = TcpCoupler<Self::Stream>;
    type Stream = StraightStream<Conn>;

    fn holdings(&self) -> &[Holding] {
        &self.holdings
    }

    async fn accept(
        &mut self,
        fuse_policy: Option<ArcFusePolicy>,
    ) -> std::io::Result<Accepted<Self::Coupler, Self::Stream>> {
        loop {
            let Some((stream, peer)) = self.rx.recv().await else {
                // The accept loop ended (shutdown): nothing more will come.
                return std::future::pending().await;
            };
            let local_addr = self.holdings[0].local_addr.clone();
            let conn_ctrl = ConnCtrl::new();
            let (fuse_config, observer) = match &fuse_policy {
                Some(policy) => {
                    let info = FuseInfo {
                        trans_proto: TransProto::Tcp,
                        remote_addr: peer.into(),
                        local_addr: local_addr.clone(),
                    };
                    match policy.decide(&info).await {
                        FuseAction::Accept(config) => {
                            (Some(config), policy.observe(&info, &conn_ctrl))
                        }
                        FuseAction::Reject => continue,
                    }
                }
                None => (None, None),
            };
            return Ok(Accepted {
                coupler: TcpCoupler::new(),
                stream: StraightStream::new(stream, fuse_config, conn_ctrl.clone(), observer),
                fuse_config,
                conn_ctrl,
                remote_addr: peer.into(),
                local_addr,
                http_scheme: Scheme::HTTP,
            });
        }
    }
}
