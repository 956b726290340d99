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
    /// Web node: a message for a new room while every room held (`rooms.max`) has clients:
    /// delivered to nobody here, not kept for replay.
    Rooms,
    /// Web node: a message after a gap that a SUB socket without the snapshot client (the
    /// new one, while a rewiring moves the client) leaves to the snapshot that follows.
    Gap,
    /// Broker: a message pushed to the backup broker while the active one is alive (its POST
    /// gets a 503; the web node pushes to the active broker).
    Standby,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: DropReason,
}

/// What a script did with one message.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ScriptOutcome {
    Passed,
    /// Dropped silently (the script returned `()`).
    Dropped,
    /// Refused with `reject(…)`: the sender was told why.
    Refused,
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
    /// Its request was not HTTP (a `400`, then closed).
    Malformed,
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

/// What became of a snapshot request (broker side) or a snapshot sync (web node side).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum SnapshotResult {
    /// Broker: answered in full.
    Served,
    /// Broker: not a request (dropped).
    Malformed,
    /// Broker: the node went away or did not read its answer in time.
    Failed,
    /// Broker: not answered: the node did not take its last answer (its requests are ignored
    /// for a while), asked again while its last answer was still on its way, or as many
    /// answers as allowed were on their way.
    Refused,
    /// Web node: the snapshot was taken, and it covered what the node lacked.
    Complete,
    /// Web node: taken, but the broker no longer held all the node lacked (clients got a
    /// reset).
    Partial,
    /// Web node: no whole answer in time (or too many live frames meanwhile): the node went on
    /// without it.
    TimedOut,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SnapshotLabels {
    pub result: SnapshotResult,
}

/// The answer a POST got.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PostLabels {
    pub status: u16,
}

/// Which request the direct path (not hyper) served.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectLabels {
    pub request: DirectRequest,
}

/// A request the direct path serves.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum DirectRequest {
    /// `GET /event/fetch`.
    Stream,
    /// `POST /message/broadcast`.
    Post,
    /// `GET /event/fetch` on a connection hyper served first (a browser's `EventSource` on the
    /// connection that fetched the page), taken over from hyper.
    TakenStream,
}

/// Seconds from a POST to its publication, in buckets from 0.1 ms to about 3 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Every metric of one process.
pub struct Metrics {
    registry: Registry,
    /// SSE clients connected now (counted once subscribed to their room).
    pub sse_clients: Gauge,
    /// Rooms this web node holds now.
    pub rooms: Gauge,
    /// Messages the broker published.
    pub broker_published: Counter,
    /// Of those, messages of the web node of the same process that its POSTs published on
    /// their own task (the embedded broker's relay was free: no hand-off to its task).
    pub broker_inline: Counter,
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
    /// Requests the direct path served (the rest went to hyper), by request.
    pub direct_requests: Family<DirectLabels, Counter>,
    /// The counters of `direct_requests` and of `posts` with status 200, held apart: counted
    /// per request without the family's lock and hashing.
    direct_posts: Counter,
    direct_streams: Counter,
    taken_streams: Counter,
    posts_ok: Counter,
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
    pub snapshots_served: Family<SnapshotLabels, Counter>,
    pub snapshot_syncs: Family<SnapshotLabels, Counter>,
    pub snapshot_recovered: Counter,
    pub archive_messages: Gauge,
    /// Broker with `broker.peer`: 1 while it is the active broker, 0 while it is the backup.
    pub broker_active: Gauge,
    /// Broker with `broker.peer`: times it became the active broker (takeovers), or stepped
    /// down.
    pub broker_role_changes: Family<RoleLabels, Counter>,
    /// Web node with `event.failover`: times the active broker changed.
    pub failovers: Counter,
    /// Web node with `event.failover`: the active broker's place in the lists (0, 1), -1 while
    /// none is heard.
    pub active_broker: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub to: RoleChange,
}

/// What a broker with a peer became.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RoleChange {
    Active,
    Backup,
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
        /// Registers a metric and keeps a handle on it (metrics are shared handles).
        fn register<M: prometheus_client::registry::Metric + Clone>(
            registry: &mut Registry,
            name: &str,
            help: &str,
            metric: M,
        ) -> M {
            registry.register(name, help, metric.clone());
            metric
        }
        let mut registry = Registry::with_prefix("temma");
        let direct_requests = Family::<DirectLabels, Counter>::default();
        let direct = |request| {
            direct_requests
                .get_or_create(&DirectLabels { request })
                .clone()
        };
        let (direct_posts, direct_streams, taken_streams) = (
            direct(DirectRequest::Post),
            direct(DirectRequest::Stream),
            direct(DirectRequest::TakenStream),
        );
        let posts = Family::<PostLabels, Counter>::default();
        let posts_ok = posts.get_or_create(&PostLabels { status: 200 }).clone();
        Metrics {
            direct_posts,
            direct_streams,
            taken_streams,
            posts_ok,
            sse_clients: register(
                &mut registry,
                "sse_clients",
                "SSE clients connected now, each counted once subscribed to its room",
                Gauge::default(),
            ),
            rooms: register(
                &mut registry,
                "rooms",
                "Rooms this web node holds (with clients or history)",
                Gauge::default(),
            ),
            broker_published: register(
                &mut registry,
                "broker_published",
                "Messages the broker published",
                Counter::default(),
            ),
            broker_inline: register(
                &mut registry,
                "broker_published_inline",
                "Messages of this web node that its POSTs published themselves, on the embedded broker's relay",
                Counter::default(),
            ),
            received: register(
                &mut registry,
                "messages_received",
                "Messages this web node received from the broker",
                Counter::default(),
            ),
            delivered: register(
                &mut registry,
                "messages_delivered",
                "Message frames written to SSE clients",
                Counter::default(),
            ),
            drops: register(
                &mut registry,
                "drops",
                "Messages or frames dropped, by reason",
                Family::<DropLabels, Counter>::default(),
            ),
            scripts: register(
                &mut registry,
                "script_messages",
                "Messages each moderation script passed, dropped or errored on",
                Family::<ScriptLabels, Counter>::default(),
            ),
            slow_disconnects: register(
                &mut registry,
                "slow_consumer_disconnects",
                "SSE clients disconnected because their queue was full",
                Counter::default(),
            ),
            refused_clients: register(
                &mut registry,
                "sse_refused",
                "SSE connections refused at event.max_clients",
                Counter::default(),
            ),
            posts: register(
                &mut registry,
                "posts",
                "POST /message/broadcast answers by status",
                posts,
            ),
            direct_requests: register(
                &mut registry,
                "direct_requests",
                "Requests served by the direct path, without hyper and salvo",
                direct_requests,
            ),
            publish_latency: register(
                &mut registry,
                "publish_latency_seconds",
                "Seconds from a POST to its publication by the broker",
                Histogram::new(LATENCY_BUCKETS),
            ),
            push_connected: register(
                &mut registry,
                "push_connected",
                "Whether the PUSH socket to the broker is connected",
                Gauge::default(),
            ),
            sub_connected: register(
                &mut registry,
                "sub_connected",
                "SUB sockets connected to a broker",
                Gauge::default(),
            ),
            script_reloads: register(
                &mut registry,
                "script_reloads",
                "Script reloads by result",
                Family::<ReloadLabels, Counter>::default(),
            ),
            zmq_peers: register(
                &mut registry,
                "zmq_peers",
                "Peers connected to each bound ZeroMQ socket",
                Family::<SocketLabels, Gauge>::default(),
            ),
            zmq_refused: register(
                &mut registry,
                "zmq_peers_refused",
                "Peers of a bound ZeroMQ socket dropped before or during their handshake",
                Family::<SocketLabels, Counter>::default(),
            ),
            connections: register(
                &mut registry,
                "connections",
                "HTTP connections open now",
                Gauge::default(),
            ),
            pending_heads: register(
                &mut registry,
                "pending_heads",
                "HTTP connections still sending their first request head",
                Gauge::default(),
            ),
            connections_refused: register(
                &mut registry,
                "connections_refused",
                "HTTP connections refused or closed early, by reason",
                Family::<RefusalLabels, Counter>::default(),
            ),
            write_stalls: register(
                &mut registry,
                "sse_write_stalls",
                "SSE connections closed because a write made no progress in time",
                Counter::default(),
            ),
            snapshots_served: register(
                &mut registry,
                "snapshots_served",
                "Broker: snapshot requests from web nodes, by result",
                Family::<SnapshotLabels, Counter>::default(),
            ),
            snapshot_syncs: register(
                &mut registry,
                "snapshot_syncs",
                "Web node: history fetched from the broker's snapshot, by result",
                Family::<SnapshotLabels, Counter>::default(),
            ),
            snapshot_recovered: register(
                &mut registry,
                "snapshot_recovered_messages",
                "Web node: messages taken from snapshots that it did not hold yet",
                Counter::default(),
            ),
            archive_messages: register(
                &mut registry,
                "archive_messages",
                "Broker: messages held for snapshots",
                Gauge::default(),
            ),
            broker_active: register(
                &mut registry,
                "broker_active",
                "Whether this broker is the active one of its pair (1) or the backup (0)",
                Gauge::default(),
            ),
            broker_role_changes: register(
                &mut registry,
                "broker_role_changes",
                "Times this broker became active (took over) or stepped down to backup",
                Family::<RoleLabels, Counter>::default(),
            ),
            failovers: register(
                &mut registry,
                "failovers",
                "Times the active broker changed, as this web node saw it",
                Counter::default(),
            ),
            active_broker: register(
                &mut registry,
                "active_broker",
                "The active broker's place in the broker lists (-1: none heard)",
                Gauge::default(),
            ),
            registry,
        }
    }
}

impl Metrics {
    /// Counts a request the direct path served.
    pub fn direct(&self, request: DirectRequest) {
        match request {
            DirectRequest::Post => self.direct_posts.inc(),
            DirectRequest::Stream => self.direct_streams.inc(),
            DirectRequest::TakenStream => self.taken_streams.inc(),
        };
    }

    /// Counts a POST's answer by its status.
    pub fn post_answered(&self, status: u16) {
        if status == 200 {
            self.posts_ok.inc();
        } else {
            self.posts.get_or_create(&PostLabels { status }).inc();
        }
    }

    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one snapshot request the broker handled.
    pub fn snapshot_served(&self, result: SnapshotResult) {
        self.snapshots_served
            .get_or_create(&SnapshotLabels { result })
            .inc();
    }

    /// Counts one snapshot sync of a web node.
    pub fn role_changed(&self, to: RoleChange) {
        self.broker_role_changes
            .get_or_create(&RoleLabels { to })
            .inc();
    }

    pub fn snapshot_synced(&self, result: SnapshotResult) {
        self.snapshot_syncs
            .get_or_create(&SnapshotLabels { result })
            .inc();
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
