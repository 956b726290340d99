//! The counters every component updates, rendered by `GET /metrics` in Prometheus text format.
//!
//! One [`Metrics`] per process, created by [`crate::App`] and shared (`Arc`) with each component:
//! no global registry, so several apps in one test process keep separate counts. The metric
//! types come from `prometheus-client`; each is a few atomics.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Why a message or frame was dropped.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum DropReason {
    /// Broker: a frame that is not valid JSON.
    InvalidJson,
    /// Broker: valid JSON that is not an object.
    NotAnObject,
    /// Broker: a message of more than one frame.
    Multipart,
    /// Broker: a frame over `broker.max_frame_bytes`.
    Oversize,
    /// Broker: a moderation script dropped it.
    Script,
    /// Broker: a moderation script failed and `on_error = "drop"`.
    ScriptError,
    /// Web node: a published frame the node could not read.
    Unreadable,
    /// Web node: a POST whose deadline passed before the message reached the broker.
    Expired,
    /// Web node: a message whose id it already has.
    Duplicate,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: DropReason,
}

/// What a script did with one message.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ScriptOutcome {
    Passed,
    Dropped,
    Errored,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScriptLabels {
    pub script: String,
    pub outcome: ScriptOutcome,
}

/// Why the front door refused a connection.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ConnectionRefusal {
    /// `server.max_connections` were open.
    MaxConnections,
    /// `server.max_pending_heads` were still sending their head.
    MaxPendingHeads,
    /// Its head did not arrive within `server.head_timeout_secs`.
    HeadTimeout,
    /// The process was out of file descriptors.
    Descriptors,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: ConnectionRefusal,
}

/// A ZeroMQ socket, by the config key of its role (`broker.pull`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    pub socket: String,
}

/// The answer a POST got.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PostLabels {
    pub status: u16,
}

/// Seconds from a POST to its publication, in buckets from 0.1 ms to about 3 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every metric of one process.
pub struct Metrics {
    registry: Registry,
    /// SSE clients connected now.
    pub sse_clients: Gauge,
    /// Messages the broker published.
    pub broker_published: Counter,
    /// Messages this web node received from the broker.
    pub received: Counter,
    /// SSE message frames written to clients (one per message per client).
    pub delivered: Counter,
    /// Messages or frames dropped, by reason.
    pub drops: Family<DropLabels, Counter>,
    /// Script outcomes, by script and outcome.
    pub scripts: Family<ScriptLabels, Counter>,
    /// SSE clients disconnected because they fell behind.
    pub slow_disconnects: Counter,
    /// SSE connections refused because `event.max_clients` was reached.
    pub refused_clients: Counter,
    /// POST answers by status.
    pub posts: Family<PostLabels, Counter>,
    /// Seconds from a POST to its publication by the broker.
    pub publish_latency: Histogram,
    /// Whether this node's PUSH socket is connected (1) or not (0).
    pub push_connected: Gauge,
    /// How many of this node's SUB sockets are connected.
    pub sub_connected: Gauge,
    /// Script reloads, successful or not.
    pub script_reloads: Family<ReloadLabels, Counter>,
    /// Peers connected to each bound ZeroMQ socket.
    pub zmq_peers: Family<SocketLabels, Gauge>,
    /// Peers of a bound ZeroMQ socket dropped before or during their handshake.
    pub zmq_refused: Family<SocketLabels, Counter>,
    /// HTTP connections open now.
    pub connections: Gauge,
    /// HTTP connections still sending their first request head.
    pub pending_heads: Gauge,
    /// HTTP connections refused or closed early, by reason.
    pub connections_refused: Family<RefusalLabels, Counter>,
    /// SSE connections closed because a write made no progress in time.
    pub write_stalls: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ReloadResult {
    Ok,
    Failed,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("temma");
        let sse_clients = Gauge::default();
        registry.register(
            "sse_clients",
            "SSE clients connected now",
            sse_clients.clone(),
        );
        let broker_published = Counter::default();
        registry.register(
            "broker_published",
            "Messages the broker published",
            broker_published.clone(),
        );
        let received = Counter::default();
        registry.register(
            "messages_received",
            "Messages this web node received from the broker",
            received.clone(),
        );
        let delivered = Counter::default();
        registry.register(
            "messages_delivered",
            "Message frames written to SSE clients",
            delivered.clone(),
        );
        let drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "drops",
            "Messages or frames dropped, by reason",
            drops.clone(),
        );
        let scripts = Family::<ScriptLabels, Counter>::default();
        registry.register(
            "script_messages",
            "Messages each moderation script passed, dropped or errored on",
            scripts.clone(),
        );
        let slow_disconnects = Counter::default();
        registry.register(
            "slow_consumer_disconnects",
            "SSE clients disconnected because their queue was full",
            slow_disconnects.clone(),
        );
        let refused_clients = Counter::default();
        registry.register(
            "sse_refused",
            "SSE connections refused at event.max_clients",
            refused_clients.clone(),
        );
        let posts = Family::<PostLabels, Counter>::default();
        registry.register(
            "posts",
            "POST /message/broadcast answers by status",
            posts.clone(),
        );
        let publish_latency = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "publish_latency_seconds",
            "Seconds from a POST to its publication by the broker",
            publish_latency.clone(),
        );
        let push_connected = Gauge::default();
        registry.register(
            "push_connected",
            "Whether the PUSH socket to the broker is connected",
            push_connected.clone(),
        );
        let sub_connected = Gauge::default();
        registry.register(
            "sub_connected",
            "SUB sockets connected to a broker",
            sub_connected.clone(),
        );
        let script_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "script_reloads",
            "Script reloads by result",
            script_reloads.clone(),
        );
        let zmq_peers = Family::<SocketLabels, Gauge>::default();
        registry.register(
            "zmq_peers",
            "Peers connected to each bound ZeroMQ socket",
            zmq_peers.clone(),
        );
        let zmq_refused = Family::<SocketLabels, Counter>::default();
        registry.register(
            "zmq_peers_refused",
            "Peers of a bound ZeroMQ socket dropped before or during their handshake",
            zmq_refused.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "HTTP connections open now",
            connections.clone(),
        );
        let pending_heads = Gauge::default();
        registry.register(
            "pending_heads",
            "HTTP connections still sending their first request head",
            pending_heads.clone(),
        );
        let connections_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "HTTP connections refused or closed early, by reason",
            connections_refused.clone(),
        );
        let write_stalls = Counter::default();
        registry.register(
            "sse_write_stalls",
            "SSE connections closed because a write made no progress in time",
            write_stalls.clone(),
        );
        Metrics {
            registry,
            connections,
            pending_heads,
            connections_refused,
            write_stalls,
            zmq_peers,
            zmq_refused,
            sse_clients,
            broker_published,
            received,
            delivered,
            drops,
            scripts,
            slow_disconnects,
            refused_clients,
            posts,
            publish_latency,
            push_connected,
            sub_connected,
            script_reloads,
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one dropped message.
    pub fn dropped(&self, reason: DropReason) {
        self.drops.get_or_create(&DropLabels { reason }).inc();
    }

    /// Counts one refused connection.
    pub fn refused_connection(&self, reason: ConnectionRefusal) {
        self.connections_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// The current count of drops for one reason.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get_or_create(&DropLabels { reason }).get()
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_that_moved() {
        let metrics = Metrics::new();
        metrics.dropped(DropReason::InvalidJson);
        metrics.dropped(DropReason::InvalidJson);
        metrics.received.inc();
        let text = metrics.render();
        assert!(
            text.contains("temma_drops_total{reason=\"InvalidJson\"} 2"),
            "{text}"
        );
        assert!(text.contains("temma_messages_received_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(metrics.drops(DropReason::InvalidJson), 2);
    }
}
