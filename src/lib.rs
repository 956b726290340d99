//! temma: a config-first real-time chat server (Server-Sent Events over a ZeroMQ broker).
//!
//! A re-implementation of the Temma PHP framework's multi-user chat. Browsers post messages over
//! HTTP; a web node pushes them to a broker over ZeroMQ (PUSH → PULL); the broker stamps each one
//! with an id, runs it through moderation scripts and publishes it (PUB → SUB); every web node
//! fans each published message out to its Server-Sent Events clients.
//!
//! # Layout
//!
//! - [`acks`]: what became of each message a web node sent (its POST waits on it).
//! - [`config`]: `etc/temma.toml` → [`Config`], loaded with figment, validated in one pass.
//! - [`context`]: what components get from the rest of the configuration to build themselves.
//! - [`dsn`]: Temma's ZeroMQ data source names (`zmq://PUSH@127.0.0.1:5000`).
//! - [`snapshot`]: the broker's archive of recent messages and the snapshot protocol web
//!   nodes fill their history with.
//! - [`socket`]: builds zeromq sockets from DSNs (bind, connect with retry).
//! - [`broker`]: the Broker component: PULL → scripts → PUB.
//! - [`script`]: the rhai moderation chain run by the broker, its sandbox and its reloader.
//! - [`hub`]: one SUB socket per web node, the history ring and the in-process fan-out.
//! - [`event`]: the Event controller, `GET /event/fetch` (SSE), on connections hyper serves.
//! - [`direct`]: the accept loop (connection caps, deadlines) and the SSE connections served
//!   straight from the socket.
//! - [`direct_post`]: the plain `POST /message/broadcast` served straight from the socket.
//! - [`message`]: the Message controller, `POST /message/broadcast`, and the PUSH publisher.
//! - [`homepage`]: the Homepage root controller, `GET /`.
//! - [`request`]: who sent a request: the cross-site rule and the client address.
//! - [`session`]: optional signed-cookie sessions (`enableSessions`).
//! - [`metrics`]: the counters every component updates and `GET /metrics` renders.
//! - [`server`]: the HTTP router and server (salvo).
//! - [`app`]: wires the components for `temma serve` and `temma broker`, and shuts them down.
//! - [`error`]: JSON error answers.
//! - [`throttle`]: log lines that outside input can trigger, kept to a bounded rate.
//! - [`uring`]: sends to many sockets in one system call (io_uring), the one `unsafe` module.
//! - [`wire`]: the message format: ids, key names, notices, SSE frames.
#![deny(unsafe_code)]

pub mod acks;
pub mod app;
pub mod broker;
pub mod config;
pub mod console;
pub mod context;
pub mod direct;
pub mod direct_post;
pub mod dsn;
pub mod error;
pub mod event;
pub mod failover;
pub mod homepage;
pub mod hub;
pub mod message;
pub mod metrics;
pub mod request;
pub mod script;
pub mod server;
pub mod session;
pub mod shard;
pub mod snapshot;
pub mod socket;
pub mod throttle;
pub mod uring;
pub mod wire;
pub mod workers;

pub use app::App;
pub use config::Config;
