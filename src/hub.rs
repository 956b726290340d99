//! The web node's fan-out: one SUB socket per broker endpoint, a history ring, and an in-process
//! broadcast to every SSE client.
//!
//! Temma opened one SUB socket (and one PHP process) per browser. Here each `temma serve` process
//! subscribes once; the SUB task hands every published frame to [`Hub::ingest`], which builds the
//! SSE frame **once** (`id: …\nevent: msg\ndata: <json>\n\n`, a shared [`Bytes`]), appends it to
//! the history and broadcasts it.
//!
//! Queues and their policies:
//! - The broadcast ring holds at least `event.queue` frames. Each client may lag behind the
//!   newest frame by at most `event.queue` frames; a client that falls further behind is
//!   disconnected (its browser reconnects and replays from the history), counted in
//!   `temma_slow_consumer_disconnects_total`, and never slows the others: the ring overwrites.
//!   A client only notices that when it reads again, so a sweep every [`SWEEP_INTERVAL`] also
//!   aborts the connection of any client a full queue behind that has taken nothing for
//!   `event.stall_ms` (it stopped reading).
//! - The history keeps at most `event.history_size` messages, none older than
//!   `event.history_ttl_secs`; older entries are evicted.
//!
//! Rooms: each client follows one room, each published message belongs to one (its `room`, or
//! the default room). The hub keeps, per room, a broadcast ring, a history and the clients'
//! slots, so that a message wakes only the clients of its room. At most `rooms.max` rooms are
//! held; a room with no client and no message for `rooms.idle_secs` is dropped, and past the
//! cap the least recently active room without clients makes way (or, if every room has
//! clients, the new room is refused). All histories together hold at most
//! `rooms.history_bytes`; the oldest message of any room goes first.
//!
//! Replay: a client that reconnects with `Last-Event-ID` (or `?lastEventId=`) gets every message
//! after that id from the history, then the live stream, with no gap and no duplicate — the
//! history append and the broadcast happen under one lock, and subscribing takes the same lock.
//! An id the history cannot cover gets an `event: reset` frame first, never a silent gap.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketEvent, SocketRecv, SubSocket};

use crate::acks::{Ack, Acks};
use crate::failover::Brokers;
use crate::metrics::SnapshotResult;
use crate::metrics::{DropReason, Metrics};
use crate::shard::{Bell, End, Outlet, Shard};
use crate::snapshot::{self, Reply};
use crate::socket;
use crate::wire::{self, Envelope, KEEPALIVE_FRAME, MsgId, plain_str, write_reset};

/// How often the hub looks for clients that stopped draining their queue, while some client has
/// not taken every frame broadcast.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// How often the hub sweeps while every client has taken every frame (keep-alives, expiry): an
/// idle node, or one whose clients take each message at once, wakes once a second, with the
/// presence tick.
pub const QUIET_INTERVAL: Duration = Duration::from_secs(1);
/// How far ahead of this node's newest message (in the same run) a `Last-Event-ID` may be and
/// still be taken as "seen on another node, on its way here"; further ahead is reset.
pub const MAX_AHEAD: u64 = 1024;

/// How often a node tells the others (through the broker) how many clients each of its rooms
/// has, and sends its clients the counts that changed.
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
/// A node not heard from for this long is no longer counted.
pub const PRESENCE_EXPIRY: Duration = Duration::from_secs(3);
/// How a presence report starts on the wire: the broker relays such frames as they are (no
/// id, no scripts), and web nodes read them apart from messages.
pub const PRESENCE_PREFIX: &[u8] = b"{\"presence\":";

/// Other nodes remembered at most (a forged flood of node names stays bounded: a report is at
/// most one frame, `broker.max_frame_bytes`, so what is held is at most this many frames).
const MAX_NODES: usize = 256;
/// Names listed per room in presence reports and frames, at most; and their length.
pub const MAX_NAMES: usize = 100;
const MAX_NAME_CHARS: usize = 64;

pub use crate::shard::{Item, MAX_CHUNK_BYTES};

/// The fan-out hub of one web node. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// This node's name in presence reports, random per process.
    node: String,
    /// How this node's own presence reports start: `{"presence":{"node":"<node>",`.
    report_prefix: Box<[u8]>,
    settings: Settings,
    metrics: Arc<Metrics>,
    acks: Arc<Acks>,
    clients: AtomicUsize,
    next_client: AtomicU64,
    /// `false` until the first snapshot is in (with `event.snapshot`): replays wait for it.
    synced: tokio::sync::watch::Sender<bool>,
    /// When the hub was made: replays wait for the first snapshot at most until
    /// [`snapshot::TIMEOUT`] after it. The once-a-second timers tick on whole seconds after
    /// it, together.
    born: Instant,
    /// Sweeps done, for the tests of their pace.
    #[cfg(test)]
    sweeps: AtomicU64,
}

/// The first whole multiple of `period` after `born` that is later than `now`.
fn next_tick(born: Instant, period: Duration, now: Instant) -> Instant {
    let periods = now.saturating_duration_since(born).as_nanos() / period.as_nanos() + 1;
    born + period * u32::try_from(periods).unwrap_or(u32::MAX)
}

/// How a hub behaves (from the `[event]` section: see [`crate::event::EventConfig`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Frames a client may lag behind.
    pub queue: usize,
    pub max_clients: usize,
    /// Messages kept for replay, and for how long.
    pub history_size: usize,
    pub history_ttl: Duration,
    /// Newest messages a new client gets.
    pub initial_history: usize,
    /// The `retry:` sent to browsers.
    pub retry_ms: u64,
    /// Silence before a keep-alive; zero for none.
    pub keepalive: Duration,
    /// How long a client with a full queue may take nothing before it is cut off.
    pub stall: Duration,
    /// The largest published frame the SUB socket accepts.
    pub max_message_bytes: usize,
    /// The room of a message or a stream that names none.
    pub default_room: Arc<str>,
    /// Rooms held at most.
    pub max_rooms: usize,
    /// How long a room with no client and no message is kept.
    pub room_idle: Duration,
    /// Bytes of history over all rooms.
    pub history_bytes: usize,
    /// Frames a client of a room other than the default one may lag behind.
    pub room_queue: usize,
    /// A writer shard's sends to its clients go in one system call (`event.io_uring`).
    pub batch_sends: bool,
    /// The most clients a writer shard takes (`event.shard_size`).
    pub shard_size: usize,
}

/// The `[rooms]` section.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// The room of a message or a stream that names none (plain Temma peers, old pages).
    /// Default `"general"`.
    pub default: String,
    /// Rooms this node holds, with clients or history; past it the least recently active room
    /// without clients is dropped, and if every room has clients a new one is refused (503).
    /// Default 1000.
    pub max: usize,
    /// Seconds a room with no client and no new message is kept; then its history is dropped.
    /// Default 600.
    pub idle_secs: u64,
    /// Bytes of history this node keeps over all rooms; the oldest messages go first.
    /// Default 67108864 (64 MiB).
    pub history_bytes: usize,
    /// Share each room's client count with the other web nodes through the broker (a small
    /// `{"presence":…}` frame every second while this node has clients), so that browsers see
    /// the count over all nodes. Default `true`; turn off when plain Temma subscribers read the
    /// broker's PUB socket.
    pub presence: bool,
    /// Frames a client of a room other than the default one may lag behind before it is
    /// disconnected (it reconnects and replays). Each room with clients has a ring of this
    /// many frames (about 90 bytes each); the default room's is `event.queue`, for one-room
    /// deployments' fan-out headroom. Default 128.
    pub queue: usize,
}

/// Default `rooms.default`.
pub const DEFAULT_ROOM: &str = "general";
/// Default `rooms.max`.
pub const DEFAULT_MAX_ROOMS: usize = 1000;
/// Default `rooms.idle_secs`.
pub const DEFAULT_ROOM_IDLE_SECS: u64 = 600;
/// Default `rooms.queue`.
pub const DEFAULT_ROOM_QUEUE: usize = 128;
/// Default `rooms.history_bytes`.
pub const DEFAULT_HISTORY_BYTES: usize = 64 * 1024 * 1024;

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            default: DEFAULT_ROOM.to_owned(),
            max: DEFAULT_MAX_ROOMS,
            idle_secs: DEFAULT_ROOM_IDLE_SECS,
            history_bytes: DEFAULT_HISTORY_BYTES,
            presence: true,
            queue: DEFAULT_ROOM_QUEUE,
        }
    }
}

impl RoomsConfig {
    pub fn validate(&self, problem: &mut impl FnMut(&str, String)) {
        match wire::room_name(&self.default) {
            Ok(name) if name != self.default => problem(
                "rooms.default",
                format!("`{}` has capitals: write `{name}`", self.default),
            ),
            Ok(_) => {}
            Err(error) => problem("rooms.default", error),
        }
        for (key, value) in [
            ("rooms.max", self.max),
            ("rooms.history_bytes", self.history_bytes),
            ("rooms.queue", self.queue),
        ] {
            if value == 0 {
                problem(key, "is 0: must be at least 1".to_owned());
            }
        }
    }
}

impl Settings {
    /// Sweeps without progress, with a full queue, before a client is cut off.
    fn stall_sweeps(&self) -> u64 {
        (self.stall.as_millis() as u64)
            .div_ceil(SWEEP_INTERVAL.as_millis() as u64)
            .max(1)
    }
}

struct State {
    /// Set once the hub shut down: no room gets a sender again, and new clients get a closed
    /// receiver.
    closed: bool,
    /// By name. Names come from outside: hashed with ahash, randomly keyed as std's SipHash
    /// (so no one can make names collide) and cheaper (a message looks its room up twice).
    rooms: HashMap<Arc<str>, Room, ahash::RandomState>,
    /// The newest message id received (any room), to detect gaps and ids from the future.
    newest: Option<MsgId>,
    /// The highest sequence number received per broker run, for the runs seen last (a node
    /// may get messages of two runs at once while it moves between brokers): a message at or
    /// below its run's mark is a duplicate, one further than the next leaves a gap.
    marks: VecDeque<MsgId>,
    /// Bytes held by every room's history.
    history_bytes: usize,
    /// What the other web nodes last reported: clients (and names) per room, and when.
    others: HashMap<String, (Instant, HashMap<String, Present>)>,
    /// What the other nodes that announce themselves (`console.enabled`) said of themselves.
    infos: HashMap<String, NodeInfo>,
    /// This node announces itself: its reports go out every second, with clients or not,
    /// and say its version, address and start time.
    announce: Option<(Instant, String)>,
    /// What each room's clients were last told: the count and the names.
    shown: HashMap<Arc<str>, (u64, Vec<String>)>,
    /// Whether the last report of this node named any room (one empty report follows the
    /// last client's departure, then silence).
    reported: bool,
    /// Brings the sweep back from its quiet pace: handed to every room made.
    bell: Arc<Bell>,
}

/// A web node as [`Hub::nodes`] sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Its random id (a new one each start).
    pub node: String,
    /// Whether it is this node.
    pub this: bool,
    /// Its SSE clients.
    pub clients: u64,
    /// Its rooms that have clients.
    pub rooms: usize,
    /// How long ago it reported.
    pub heard: Duration,
    /// What it says of itself, if it announces itself.
    pub info: Option<NodeInfo>,
}

/// What a node that announces itself (`console.enabled`) says in its presence reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub version: String,
    /// Its HTTP address (`server.listen`).
    pub listen: String,
    pub uptime_secs: u64,
}

/// Who is in a room on one node, as presence reports say it: a count, or a count and names.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Present {
    #[default]
    Nobody,
    Count(u64),
    Named {
        count: u64,
        names: Vec<String>,
    },
}

impl Present {
    fn count(&self) -> u64 {
        match self {
            Present::Nobody => 0,
            Present::Count(count) | Present::Named { count, .. } => *count,
        }
    }

    fn names(&self) -> &[String] {
        match self {
            Present::Named { names, .. } => names,
            _ => &[],
        }
    }
}

impl Room {
    /// Who is here on this node.
    fn present(&self) -> Present {
        let mut names: Vec<String> = self
            .slots
            .values()
            .filter_map(|slot| slot.name.as_deref().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names.truncate(MAX_NAMES);
        let count = self.slots.len() as u64;
        if names.is_empty() {
            Present::Count(count)
        } else {
            Present::Named { count, names }
        }
    }
}

/// One room of one node: its ring, its history and its clients.
struct Room {
    /// The ring its clients read: made for the first client, dropped with the last (a ring
    /// costs about 100 bytes per frame of `event.queue`), and on shutdown (receivers then see
    /// `Closed` and their streams end).
    tx: Option<broadcast::Sender<Item>>,
    /// The writer shards of the clients the front door streams (`crate::shard`): made as
    /// they come, dropped with the ring (their tasks end when it closes).
    shards: Vec<Arc<Shard>>,
    history: History,
    /// Frames broadcast so far in this room.
    sent: u64,
    slots: HashMap<u64, Arc<Slot>>,
    /// Slots whose clients read the ring on their own tasks (streams served by hyper): while
    /// there are any, each broadcast rings the bell (they are behind until their tasks run).
    /// The others are written by the shards, which ring it when they leave one behind.
    streams: usize,
    /// When the last frame was broadcast, for keep-alives.
    last_sent: Instant,
    /// When a client or a message last came, for idle eviction.
    last_active: Instant,
    /// Frames each client may lag behind: the ring's size.
    queue: usize,
    bell: Arc<Bell>,
}

impl Room {
    fn new(name: &str, settings: &Settings, now: Instant, bell: Arc<Bell>) -> Room {
        Room {
            queue: if name == &*settings.default_room {
                settings.queue
            } else {
                settings.room_queue
            }
            .max(1),
            tx: None,
            shards: Vec::new(),
            history: History::new(settings.history_size, settings.history_ttl),
            sent: 0,
            slots: HashMap::new(),
            streams: 0,
            last_sent: now,
            last_active: now,
            bell,
        }
    }

    /// Sends a frame to the room's clients (`message`: a chat message, else a keep-alive or
    /// a notice), numbered in the room, and wakes its writer shards.
    fn broadcast(&mut self, id: Option<MsgId>, frame: Bytes, message: bool) {
        let writes = self.broadcast_for(id, frame, message);
        for shard in writes.lone.iter().chain(&writes.late) {
            shard.kick();
        }
    }

    /// [`Room::broadcast`], but a lone writer shard is not woken, nor a shard half a ring
    /// behind: they are returned, for the caller to write once the hub's lock is released
    /// ([`Writes::now`]).
    #[must_use]
    fn broadcast_for(&mut self, id: Option<MsgId>, frame: Bytes, message: bool) -> Writes {
        let Some(tx) = self.tx.as_ref() else {
            return Writes::default();
        };
        let item = Item {
            id,
            frame,
            message,
            seq: self.sent + 1,
        };
        // No receiver is fine: nobody is connected.
        let _ = tx.send(item);
        self.sent += 1;
        if self.streams > 0 {
            self.bell.ring();
        }
        let late = |shard: &Shard| shard.behind(self.sent) > self.queue as u64 / 2;
        let mut writes = Writes::default();
        match self.shards.as_slice() {
            [lone] if !late(lone) => writes.lone = Some(lone.clone()),
            shards => {
                for shard in shards {
                    if late(shard) {
                        writes.late.push(shard.clone());
                    } else {
                        shard.kick();
                    }
                }
            }
        }
        writes
    }

    /// A streamed client left: unless it left the shard it joined already (`left`), takes it
    /// out of the one [`Room::pack`] moved it to; then packs the room.
    fn leave_shard(&mut self, outlet: &Arc<Outlet>, left: bool) {
        if !left {
            for shard in &self.shards {
                if shard.leave(outlet) {
                    break;
                }
            }
        }
        self.pack();
    }

    /// Keeps a room that shrank on as few writer shards as its clients need: an empty shard
    /// is let go (the room keeps one for the next client), and the last shard's clients move
    /// into the others when these have room for all of them (and nothing is in flight:
    /// [`Shard::move_clients_into`]), and it is let go. Each shard let go is a task fewer
    /// woken at each message, and a room back to one shard is written by its broadcaster.
    /// Called under the hub's lock, at each leave and at each sweep (what had to wait for a
    /// pass is done then); it waits for no shard's pass.
    fn pack(&mut self) {
        let mut at = 0;
        while self.shards.len() > 1 && at < self.shards.len() {
            if self.shards[at].is_surely_empty() {
                self.shards.remove(at).retire();
            } else {
                at += 1;
            }
        }
        if let [others @ .., last] = self.shards.as_slice()
            && !others.is_empty()
            && last.move_clients_into(others, self.sent)
            && let Some(last) = self.shards.pop()
        {
            last.retire();
        }
    }

    /// Drops the ring (its receivers see it closed once they have read it) and the writer
    /// shards, woken to end their clients' streams.
    fn close(&mut self) {
        self.tx = None;
        for shard in self.shards.drain(..) {
            shard.kick();
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer shards a broadcaster writes once the hub's lock is released.
#[derive(Default)]
struct Writes {
    /// A room's lone shard, in step: [`Shard::write`].
    lone: Option<Arc<Shard>>,
    /// Shards whose task fell half a ring behind: [`Shard::catch_up`] (rare: a burst that
    /// outran their threads).
    late: Vec<Arc<Shard>>,
}

impl Writes {
    fn now(self) {
        if let Some(shard) = self.lone {
            shard.write();
        }
        for shard in self.late {
            shard.catch_up();
        }
    }
}

/// What the hub knows of one client, for the slow-consumer sweep.
pub struct Slot {
    /// Frames this client has taken from the ring (same count as `State::sent`).
    consumed: AtomicU64,
    /// `consumed` at the previous sweep, and for how many sweeps it has not moved while the
    /// queue was full.
    swept: AtomicU64,
    stalled: AtomicU64,
    abort: Abort,
    dropped: AtomicBool,
    /// The client's name (its session's), for the room's list of who is here.
    name: Option<Arc<str>>,
    /// A client a shard writes to counts what it took there.
    outlet: Option<Arc<Outlet>>,
}

/// How the sweep cuts off a client that stopped reading: whatever serves the connection says
/// how (hyper aborts it; the direct path wakes its task).
#[derive(Clone)]
pub struct Abort(Arc<dyn Fn() + Send + Sync>);

impl Abort {
    pub fn new(abort: impl Fn() + Send + Sync + 'static) -> Abort {
        Abort(Arc::new(abort))
    }

    fn abort(&self) {
        (self.0)()
    }
}

impl Slot {
    /// Frames this client has taken from its room's ring.
    fn consumed(&self) -> u64 {
        match &self.outlet {
            Some(outlet) => outlet.consumed(),
            None => self.consumed.load(Ordering::Relaxed),
        }
    }

    /// Marks the client as disconnected for being slow; `true` the first time only.
    fn drop_slow(&self) -> bool {
        !self.dropped.swap(true, Ordering::AcqRel)
    }

    /// What it counts in its room's [`Room::streams`]: 1 for a stream hyper serves (no
    /// outlet: its task reads the ring), 0 for a client a shard writes to.
    fn streams(&self) -> usize {
        usize::from(self.outlet.is_none())
    }
}

/// Why `subscribe` refused a client (a 503).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("too many SSE clients: this node serves at most {0}")]
    Full(usize),
    #[error(
        "too many rooms: this node holds at most {0} (`rooms.max`) and each has clients; \
         try again later"
    )]
    Rooms(usize),
}

/// A client's subscription: what to send first, then the live receiver.
pub struct Subscription {
    /// What to write first: `retry:` with a comment that opens the stream at once and any
    /// `reset` notice, then the replayed frames — shared with the history, not copied. Written
    /// once and dropped, so what a connection holds does not grow with the history.
    pub replay: Vec<Bytes>,
    pub rx: broadcast::Receiver<Item>,
    /// Skip live messages up to this id (the client already has them).
    pub skip_until: Option<MsgId>,
    pub slot: Arc<Slot>,
    pub guard: ClientGuard,
}

/// A client admitted to its room ([`Hub::enter`]).
struct Entered<T> {
    replay: Vec<Bytes>,
    skip_until: Option<MsgId>,
    slot: Arc<Slot>,
    guard: ClientGuard,
    live: T,
}

/// Releases a client's place when its stream ends.
pub struct ClientGuard {
    shared: Arc<Shared>,
    key: u64,
    /// Its room, once it has one.
    room: Option<Arc<str>>,
    /// Its shard and outlet, for a client a shard writes to.
    shard: Option<(Arc<Shard>, Arc<Outlet>)>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
        // Out of the shard it joined, outside the hub's lock (this may wait for the shard's
        // pass); if the room moved it meanwhile, out of its new shard under the lock.
        let left = match &self.shard {
            Some((shard, outlet)) => shard.leave(outlet),
            None => true,
        };
        if let Some(room) = &self.room {
            // Counted in `temma_sse_clients` once it entered its room.
            self.shared.metrics.sse_clients.dec();
            let mut state = self.shared.lock();
            if let Some(room) = state.rooms.get_mut(room) {
                if let Some(slot) = room.slots.remove(&self.key) {
                    room.streams -= slot.streams();
                }
                if let Some((_, outlet)) = &self.shard {
                    room.leave_shard(outlet, left);
                }
                room.last_active = Instant::now();
                if room.slots.is_empty() {
                    room.close();
                }
            }
        }
    }
}

/// How the presence reports of node `node` start: `{"presence":{"node":"<node>",` (the
/// node first, so that a node knows its own report coming back by its first bytes).
fn report_prefix(node: &str) -> Box<[u8]> {
    let mut prefix = Vec::with_capacity(PRESENCE_PREFIX.len() + node.len() + 12);
    prefix.extend_from_slice(PRESENCE_PREFIX);
    prefix.extend_from_slice(b"{\"node\":\"");
    prefix.extend_from_slice(node.as_bytes());
    prefix.extend_from_slice(b"\",");
    prefix.into()
}

impl Hub {
    pub fn new(settings: Settings, metrics: Arc<Metrics>, acks: Arc<Acks>) -> Hub {
        let node = format!("{:016x}", rand::random::<u64>());
        Hub {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    closed: false,
                    rooms: HashMap::default(),
                    newest: None,
                    marks: VecDeque::new(),
                    history_bytes: 0,
                    others: HashMap::new(),
                    infos: HashMap::new(),
                    announce: None,
                    shown: HashMap::new(),
                    reported: false,
                    bell: Arc::default(),
                }),
                report_prefix: report_prefix(&node),
                node,
                settings,
                metrics,
                acks,
                clients: AtomicUsize::new(0),
                next_client: AtomicU64::new(0),
                synced: tokio::sync::watch::Sender::new(true),
                born: Instant::now(),
                #[cfg(test)]
                sweeps: AtomicU64::new(0),
            }),
        }
    }

    /// Makes replays wait for the first snapshot (call before serving, when the node has a
    /// snapshot socket).
    pub fn expect_snapshot(&self) {
        self.shared.synced.send_replace(false);
    }

    /// Waits until the first snapshot is in, at most until [`snapshot::TIMEOUT`] after the
    /// hub was made (a node whose broker is away serves what it has after that).
    pub async fn synced(&self) {
        let shared = &self.shared;
        if *shared.synced.borrow() {
            return;
        }
        let mut synced = shared.synced.subscribe();
        let _ = tokio::time::timeout_at(
            shared.born + snapshot::TIMEOUT,
            synced.wait_for(|done| *done),
        )
        .await;
    }

    /// The room a stream or message that names none belongs to.
    pub fn default_room(&self) -> &str {
        &self.shared.settings.default_room
    }

    /// The rooms this node holds, with the clients each has here, by name.
    pub fn rooms(&self) -> Vec<(String, usize)> {
        let state = self.shared.lock();
        let mut rooms: Vec<(String, usize)> = state
            .rooms
            .iter()
            .map(|(name, room)| (name.to_string(), room.slots.len()))
            .collect();
        rooms.sort();
        rooms
    }

    /// Makes this node announce itself in its presence reports (every second, with clients
    /// or not): its version, its HTTP address `listen` and how long it has run. What the
    /// console's cluster view lists.
    pub fn announce(&self, listen: String) {
        self.shared.lock().announce = Some((Instant::now(), listen));
    }

    /// This node and the other web nodes heard from (presence reports: every second from a
    /// node that announces itself, else while it has clients), this node first.
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut state = self.shared.lock();
        let now = Instant::now();
        state.expire_others(now);
        let mut nodes = vec![NodeView {
            node: self.shared.node.clone(),
            this: true,
            clients: self.clients() as u64,
            rooms: state.rooms.values().filter(|r| !r.slots.is_empty()).count(),
            heard: Duration::ZERO,
            info: state.own_info(),
        }];
        let mut others: Vec<NodeView> = state
            .others
            .iter()
            .map(|(node, (at, rooms))| NodeView {
                node: node.clone(),
                this: false,
                clients: rooms.values().map(Present::count).sum(),
                rooms: rooms.values().filter(|p| p.count() > 0).count(),
                heard: now.saturating_duration_since(*at),
                info: state.infos.get(node).cloned(),
            })
            .collect();
        others.sort_by(|a, b| a.node.cmp(&b.node));
        nodes.extend(others);
        nodes
    }

    /// Frames broadcast so far in each room this node holds (the console's message rates).
    pub fn rooms_sent(&self) -> HashMap<String, u64> {
        self.shared
            .lock()
            .rooms
            .iter()
            .map(|(name, room)| (name.to_string(), room.sent))
            .collect()
    }

    /// Whether `room` has at most one writer shard's worth of clients (`event.shard_size`;
    /// a room this node does not hold has none): a message to it is written by the task that
    /// broadcasts it, at light loads, and the embedded broker lets a POST publish such a
    /// message on its own task (`broker::Inline`). A larger room's broadcasts are left to the
    /// broker's task: POSTs that published to a room of 1,000 themselves took the fan-out's
    /// p99 at 700 msg/s from 20 to 90 ms (BENCHMARKS.md, "POSTs that publish themselves").
    pub fn is_small_room(&self, room: &str) -> bool {
        let size = self.shared.settings.shard_size;
        // No room holds more clients than the node counts (but for one leaving right now:
        // uncounted just before it leaves its room, it lets a room one over the size pass for
        // small a moment): the light loads this is for look at no room.
        self.clients() <= size
            || self
                .shared
                .lock()
                .rooms
                .get(room)
                .is_none_or(|room| room.slots.len() <= size)
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.shared.clients.load(Ordering::Acquire)
    }

    /// Every room known here or on another node, with the clients it has over all nodes
    /// (`GET /rooms`), busiest first.
    pub fn room_counts(&self) -> Vec<(String, u64)> {
        let mut state = self.shared.lock();
        state.expire_others(Instant::now());
        let mut counts: HashMap<String, u64> = HashMap::new();
        for (name, room) in &state.rooms {
            if !room.slots.is_empty() {
                *counts.entry(name.to_string()).or_default() += room.slots.len() as u64;
            }
        }
        for (_, rooms) in state.others.values() {
            for (name, present) in rooms {
                *counts.entry(name.clone()).or_default() += present.count();
            }
        }
        let mut counts: Vec<(String, u64)> =
            counts.into_iter().filter(|(_, count)| *count > 0).collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts
    }

    /// This node's presence report, `{"presence":{"node":…,"rooms":{"name":clients,…}}}`, for
    /// the other nodes; `None` when there is nothing new to say (no clients now, nor at the
    /// last report).
    pub fn presence_report(&self) -> Option<Bytes> {
        let mut state = self.shared.lock();
        let any = state.rooms.values().any(|room| !room.slots.is_empty());
        if !any && !state.reported && state.announce.is_none() {
            return None;
        }
        state.reported = any;
        drop(state);
        Some(self.presence_vote())
    }

    /// This node's presence report now, even an empty one (with `event.failover`, what a node
    /// pushes while it hears no active broker: the broker that gets it may take over).
    pub fn presence_vote(&self) -> Bytes {
        let state = self.shared.lock();
        let rooms: serde_json::Map<String, serde_json::Value> = state
            .rooms
            .iter()
            .filter(|(_, room)| !room.slots.is_empty())
            .map(|(name, room)| {
                let present = serde_json::to_value(room.present()).unwrap_or_default();
                (name.to_string(), present)
            })
            .collect();
        let info = state.own_info();
        drop(state);
        let mut rest = serde_json::json!({ "rooms": rooms });
        if let Some(info) = info {
            rest["info"] = serde_json::to_value(info).unwrap_or_default();
        }
        // The node first, so that its own echo is known by its first bytes.
        let mut frame = self.shared.report_prefix.to_vec();
        let rest = rest.to_string();
        frame.extend_from_slice(&rest.as_bytes()[1..]);
        frame.push(b'}');
        frame.into()
    }

    /// Every [`PRESENCE_INTERVAL`]: this node's report handed to `send` (when `share`), and
    /// the changed counts sent to clients.
    pub async fn run_presence(
        self,
        share: bool,
        send: impl Fn(Bytes) + Send + 'static,
        shutdown: CancellationToken,
    ) {
        // On whole seconds after the hub was made, as the quiet sweep: an idle node wakes
        // once for both.
        let born = self.shared.born;
        let mut tick = tokio::time::interval_at(
            next_tick(born, PRESENCE_INTERVAL, Instant::now()),
            PRESENCE_INTERVAL,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if share && let Some(report) = self.presence_report() {
                send(report);
            }
            self.presence_tick();
        }
    }

    /// Reads another node's presence report (its own echo is ignored).
    fn ingest_presence(&self, frame: &[u8]) {
        if frame.starts_with(&self.shared.report_prefix) {
            // This node's own report, back from the broker: nothing to parse.
            return;
        }
        #[derive(serde::Deserialize)]
        struct Report {
            presence: Body,
        }
        #[derive(serde::Deserialize)]
        struct Body {
            node: String,
            rooms: HashMap<String, Present>,
            #[serde(default)]
            info: Option<NodeInfo>,
        }
        let Ok(Report { presence }) = serde_json::from_slice::<Report>(frame) else {
            self.shared.metrics.dropped(DropReason::Unreadable);
            return;
        };
        if presence.node == self.shared.node {
            return;
        }
        let mut state = self.shared.lock();
        // Bounded: a report names at most the room cap's worth of rooms.
        let rooms = presence
            .rooms
            .into_iter()
            .filter(|(name, _)| wire::room_name(name).is_ok_and(|folded| folded == *name))
            .take(self.shared.settings.max_rooms)
            .map(|(name, present)| {
                // Bounded whatever a peer sends: names listed, and their length.
                let present = match present {
                    Present::Named { count, mut names } => {
                        names.truncate(MAX_NAMES);
                        for name in &mut names {
                            *name = name.chars().take(MAX_NAME_CHARS).collect();
                        }
                        Present::Named { count, names }
                    }
                    other => other,
                };
                (name, present)
            })
            .collect();
        if state.others.len() < MAX_NODES || state.others.contains_key(&presence.node) {
            if let Some(mut info) = presence.info {
                // Bounded whatever a peer sends.
                info.version = info.version.chars().take(MAX_NAME_CHARS).collect();
                info.listen = info.listen.chars().take(MAX_NAME_CHARS).collect();
                state.infos.insert(presence.node.clone(), info);
            }
            state.others.insert(presence.node, (Instant::now(), rooms));
        }
    }

    /// Sends each room's clients its count over all nodes when it changed since they were
    /// last told (`event: presence`, at most once per [`PRESENCE_INTERVAL`]).
    pub fn presence_tick(&self) {
        let mut state = self.shared.lock();
        state.expire_others(Instant::now());
        let mut totals: HashMap<Arc<str>, (u64, Vec<String>)> = HashMap::new();
        for (name, room) in &state.rooms {
            if !room.slots.is_empty() {
                let present = room.present();
                totals.insert(name.clone(), (present.count(), present.names().to_vec()));
            }
        }
        let State {
            others,
            rooms,
            shown,
            ..
        } = &mut *state;
        for (_, counts) in others.values() {
            for (name, present) in counts {
                if let Some((total, names)) = totals.get_mut(name.as_str()) {
                    *total += present.count();
                    names.extend(present.names().iter().cloned());
                }
            }
        }
        shown.retain(|name, _| totals.contains_key(name));
        for (name, (total, mut names)) in totals {
            names.sort();
            names.dedup();
            names.truncate(MAX_NAMES);
            let now = (total, names);
            if shown.get(&name) == Some(&now) {
                continue;
            }
            if let Some(room) = rooms.get_mut(&name) {
                let data = if now.1.is_empty() {
                    serde_json::json!({ "room": &*name, "count": now.0 })
                } else {
                    serde_json::json!({ "room": &*name, "count": now.0, "names": now.1 })
                };
                let mut frame = BytesMut::with_capacity(64);
                frame.put_slice(b"event: presence\ndata: ");
                frame.put_slice(data.to_string().as_bytes());
                frame.put_slice(b"\n\n");
                room.broadcast(None, frame.freeze(), false);
            }
            shown.insert(name, now);
        }
    }

    /// Registers a client in `room` (a checked name; `None`: the default room).
    /// `last_event_id` is what the browser sent back (header or query); `abort` lets the sweep
    /// cut the connection off if the client stops reading.
    pub fn subscribe(
        &self,
        room: Option<&str>,
        last_event_id: Option<&str>,
        abort: Abort,
    ) -> Result<Subscription, Refused> {
        self.subscribe_named(room, None, last_event_id, abort)
    }

    /// [`Hub::subscribe`] for a client with a name (with sessions on): the room's presence
    /// lists it.
    pub fn subscribe_named(
        &self,
        room: Option<&str>,
        client_name: Option<&str>,
        last_event_id: Option<&str>,
        abort: Abort,
    ) -> Result<Subscription, Refused> {
        let entered = self.enter(
            room,
            client_name,
            last_event_id,
            abort,
            None,
            |room, closed| {
                match room.tx.as_ref() {
                    Some(tx) if !closed => tx.subscribe(),
                    _ => {
                        // Shutting down: a closed receiver ends the stream after the replay.
                        let (tx, rx) = broadcast::channel(1);
                        drop(tx);
                        rx
                    }
                }
            },
        )?;
        let Entered {
            replay,
            skip_until,
            slot,
            guard,
            live: rx,
        } = entered;
        Ok(Subscription {
            replay,
            rx,
            skip_until,
            slot,
            guard,
        })
    }

    /// [`Hub::subscribe_named`] for a client the front door streams itself: its `outlet` gets
    /// the replay (behind what it holds) and joins one of the room's writer shards
    /// ([`crate::shard`]), which writes the live frames. Returns the client's slot (for
    /// [`Hub::lagged`]) and guard.
    pub fn subscribe_outlet(
        &self,
        room: Option<&str>,
        client_name: Option<&str>,
        last_event_id: Option<&str>,
        abort: Abort,
        outlet: &Arc<Outlet>,
    ) -> Result<(Arc<Slot>, ClientGuard), Refused> {
        let metrics = self.shared.metrics.clone();
        let batch = self.shared.settings.batch_sends;
        let size = self.shared.settings.shard_size;
        let entered = self.enter(
            room,
            client_name,
            last_event_id,
            abort,
            Some(outlet),
            |room, closed| {
                let tx = room.tx.as_ref().filter(|_| !closed)?;
                let shard = match room.shards.iter().find(|shard| shard.join(outlet)) {
                    Some(shard) => shard.clone(),
                    None => {
                        let queue = room.queue as u64;
                        let rx = tx.subscribe();
                        let bell = room.bell.clone();
                        let shard = Shard::spawn(rx, room.sent, queue, size, batch, metrics, bell);
                        shard.join(outlet);
                        room.shards.push(shard.clone());
                        shard
                    }
                };
                Some(shard)
            },
        )?;
        let Entered {
            slot,
            mut guard,
            live,
            ..
        } = entered;
        match live {
            Some(shard) => guard.shard = Some((shard, outlet.clone())),
            // Shutting down: the stream ends after the replay.
            None => outlet.end(End::Finished),
        }
        Ok((slot, guard))
    }

    /// Admits a client to its room: its replay, its slot, and what `live` makes under the
    /// hub's lock (a ring receiver, or a shard the outlet joined).
    fn enter<T>(
        &self,
        room: Option<&str>,
        client_name: Option<&str>,
        last_event_id: Option<&str>,
        abort: Abort,
        outlet: Option<&Arc<Outlet>>,
        live: impl FnOnce(&mut Room, bool) -> T,
    ) -> Result<Entered<T>, Refused> {
        let (key, mut guard) = self.admit()?;
        let shared = &self.shared;
        let name: Arc<str> = Arc::from(room.unwrap_or(&shared.settings.default_room));
        let now = Instant::now();
        let mut state = shared.lock();
        let newest = state.newest;
        let closed = state.closed;
        let Some(room) = state.room(&name, &shared.settings, &shared.metrics, now) else {
            drop(state);
            shared.metrics.refused_clients.inc();
            return Err(Refused::Rooms(shared.settings.max_rooms));
        };
        room.history.expire(now);
        room.last_active = now;
        let (mut replay, mut skip_until) = room.replay(&shared.settings, newest, last_event_id);
        if room.tx.is_none() && !closed {
            // Each client may lag `event.queue` frames behind (tokio rounds up to a power of 2).
            room.tx = Some(broadcast::channel(room.queue).0);
        }
        if let Some(outlet) = outlet {
            // Under the lock, as every broadcast: the replay is queued before any live frame.
            outlet.join_at(room.sent, std::mem::take(&mut replay), skip_until.take());
        }
        let live = live(room, closed);
        let slot = Arc::new(Slot {
            consumed: AtomicU64::new(room.sent),
            swept: AtomicU64::new(room.sent),
            stalled: AtomicU64::new(0),
            abort,
            dropped: AtomicBool::new(false),
            name: client_name
                .map(|name| name.chars().take(MAX_NAME_CHARS).collect::<String>())
                .map(Arc::from),
            outlet: outlet.cloned(),
        });
        room.streams += slot.streams();
        room.slots.insert(key, slot.clone());
        // Counted once it is in its room: whoever sees the gauge count it knows that every
        // message published from then on reaches it.
        shared.metrics.sse_clients.inc();
        drop(state);
        guard.room = Some(name);
        Ok(Entered {
            replay,
            skip_until,
            slot,
            guard,
            live,
        })
    }

    /// Takes a place for a new client, or refuses it at `event.max_clients`.
    fn admit(&self) -> Result<(u64, ClientGuard), Refused> {
        let shared = &self.shared;
        let max = shared.settings.max_clients;
        if shared.clients.fetch_add(1, Ordering::AcqRel) >= max {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.refused_clients.inc();
            return Err(Refused::Full(max));
        }
        let key = shared.next_client.fetch_add(1, Ordering::Relaxed);
        let guard = ClientGuard {
            shared: shared.clone(),
            key,
            room: None,
            shard: None,
        };
        Ok((key, guard))
    }

    /// Records that a client took `count` frames from the ring.
    pub fn consumed(&self, slot: &Slot, count: u64) {
        slot.consumed.fetch_add(count, Ordering::Relaxed);
    }

    /// Counts a client dropped for lagging (seen by its own stream), once.
    pub fn lagged(&self, slot: &Slot) {
        if slot.drop_slow() {
            self.shared.metrics.slow_disconnects.inc();
            crate::throttled!(
                tracing::Level::WARN,
                "SSE client fell behind its queue; disconnected"
            );
        }
    }

    /// Whether the sweep disconnected this client.
    pub fn is_dropped(&self, slot: &Slot) -> bool {
        slot.dropped.load(Ordering::Acquire)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Takes one frame published by the broker: a message to fan out, or a notice for this
    /// node's POSTs (a rejection, or "published already" for a retried idempotency key).
    pub fn ingest(&self, frame: &[u8]) {
        self.ingest_as(frame, Source::Live { check: false });
    }

    /// [`Hub::ingest`], saying where the frame comes from. A live frame checked for gaps that
    /// would leave one is not taken: [`Ingested::Gap`] (the SUB task fetches a snapshot).
    fn ingest_as(&self, frame: &[u8], source: Source) -> Ingested {
        if frame.starts_with(crate::failover::BEAT_PREFIX) {
            // A broker's heartbeat (a pair's): for the failover logic, not for clients.
            return Ingested::Taken;
        }
        if frame.starts_with(PRESENCE_PREFIX) {
            self.ingest_presence(frame);
            return Ingested::Taken;
        }
        let shared = &self.shared;
        let head: Envelope<'_> = match serde_json::from_slice(frame) {
            Ok(head) => head,
            Err(error) => {
                shared.metrics.dropped(DropReason::Unreadable);
                crate::throttled!(tracing::Level::WARN, %error, bytes = frame.len(), "dropped a published frame that is not a JSON object");
                return Ingested::Taken;
            }
        };
        if let Some(reference) = head.reject.and_then(plain_str) {
            shared.acks.resolve(
                reference,
                Ack::Rejected {
                    reason: head
                        .reason
                        .unwrap_or_else(|| "rejected by moderation".to_owned()),
                    status: wire::reject_status(head.status),
                },
            );
            return Ingested::Taken;
        }
        if let Some(reference) = head.published.and_then(plain_str) {
            shared.acks.resolve(reference, Ack::Published(head.id()));
            return Ingested::Taken;
        }
        let id = head.id();
        let room = match head.room {
            None => Ok(None),
            Some(raw) => plain_str(raw)
                .ok_or_else(|| format!("`{}` is not a room name", raw.get()))
                .and_then(wire::room_name)
                .map(Some),
        };
        let private = head.reference.is_some() || head.key.is_some();
        let reference = head.reference.and_then(plain_str);
        self.take(
            || wire::write_message(frame, id, private),
            id,
            room,
            reference,
            source,
        )
    }

    /// A message the embedded broker of this process just stamped on its fast path, with
    /// what it knows of it ([`Known`]): taken as [`Hub::ingest`] takes it, without reading
    /// the frame again.
    pub fn ingest_known(&self, frame: &[u8], known: &Known) {
        let room = match &known.room {
            None => Ok(None),
            Some(at) => std::str::from_utf8(&frame[at.clone()])
                .map_err(|_| "a room name that is not UTF-8".to_owned())
                .and_then(wire::room_name)
                .map(Some),
        };
        let reference = known
            .reference
            .as_ref()
            .and_then(|at| std::str::from_utf8(&frame[at.value.clone()]).ok());
        let cut = known.reference.as_ref().map(|at| at.member.clone());
        self.take(
            || wire::write_message_cut(frame, known.id, cut),
            Some(known.id),
            room,
            reference,
            Source::Live { check: false },
        );
    }

    /// What [`Hub::ingest_as`] and [`Hub::ingest_known`] do with a message once read: its
    /// SSE frame (`sse`, made only for a valid room) appended to its room's history and
    /// broadcast, its `ref`'s POST told.
    fn take(
        &self,
        sse: impl FnOnce() -> Bytes,
        id: Option<MsgId>,
        room: Result<Option<String>, String>,
        reference: Option<&str>,
        source: Source,
    ) -> Ingested {
        let shared = &self.shared;
        // The room's lone writer shard (and any fallen behind), written here once the lock is
        // released.
        let mut to_write = Writes::default();
        let appended = match room {
            Ok(room) => {
                let room = room.as_deref().unwrap_or(&shared.settings.default_room);
                shared.lock().append(
                    Some((room, sse())),
                    id,
                    source,
                    &shared.settings,
                    &shared.metrics,
                    &mut to_write,
                )
            }
            Err(error) => {
                // Only a script can do this (web nodes check the room): the message was
                // published, but belongs to no room a client can follow. Its id still counts.
                let appended = shared.lock().append(
                    None,
                    id,
                    source,
                    &shared.settings,
                    &shared.metrics,
                    &mut to_write,
                );
                if appended == Appended::Stored {
                    shared.metrics.dropped(DropReason::Unreadable);
                    crate::throttled!(tracing::Level::WARN, %error, "dropped a published message with an invalid room");
                }
                appended
            }
        };
        // Before its sender is told: the message is on its way to the room's clients.
        to_write.now();
        if appended == Appended::Gap {
            return Ingested::Gap;
        }
        shared.metrics.received.inc();
        if appended == Appended::Duplicate {
            if source != Source::Snapshot {
                shared.metrics.dropped(DropReason::Duplicate);
            }
            return Ingested::Taken;
        }
        if source == Source::Snapshot {
            shared.metrics.snapshot_recovered.inc();
        }
        if let Some(reference) = reference {
            shared.acks.resolve(reference, Ack::Published(id));
        }
        Ingested::Taken
    }

    /// The newest id of each broker run this node has messages of, newest run first.
    pub fn marks(&self) -> Vec<MsgId> {
        self.shared.lock().marks.iter().copied().collect()
    }

    /// A snapshot's head: if the broker no longer holds everything this node lacks, its
    /// clients are told (`event: reset`), as for a gap.
    fn snapshot_head(&self, head: &snapshot::Head) {
        let mut state = self.shared.lock();
        // Messages of this run dropped by the broker that this node never got; or, for a run
        // it never saw, the start of that run (a node that had nothing yet loses nothing).
        if let Some(newest) = state.newest
            && !head.covered
        {
            tracing::warn!(after = %newest, "the broker's snapshot does not reach back to this node's newest message");
            state.lost(newest);
        }
    }

    /// Sends keep-alives, sweeps slow clients, drops idle rooms, and ends every stream on
    /// shutdown.
    ///
    /// While every client has taken every frame, the sweep runs once a [`QUIET_INTERVAL`]
    /// (with the presence tick); a client left behind rings the rooms' [`Bell`], which brings
    /// it back to every [`SWEEP_INTERVAL`] until all have caught up again.
    pub async fn run_timers(self, shutdown: CancellationToken) {
        let settings = &self.shared.settings;
        let keepalive = settings.keepalive;
        let bell = self.shared.lock().bell.clone();
        let born = self.shared.born;
        let mut next = Instant::now() + SWEEP_INTERVAL;
        let mut expire_at = Instant::now() + QUIET_INTERVAL;
        loop {
            let quiet = bell.is_quiet();
            let deadline = if quiet {
                next_tick(born, QUIET_INTERVAL, Instant::now())
            } else {
                next
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => {}
                () = bell.rung(), if quiet => {
                    next = Instant::now() + SWEEP_INTERVAL;
                    continue;
                }
            }
            let now = Instant::now();
            next = now + SWEEP_INTERVAL;
            #[cfg(test)]
            self.shared.sweeps.fetch_add(1, Ordering::Relaxed);
            let mut lagging = false;
            let mut state = self.shared.lock();
            let stall_sweeps = settings.stall_sweeps();
            let metrics = &self.shared.metrics;
            for room in state.rooms.values_mut() {
                if room.slots.is_empty() {
                    continue;
                }
                room.pack();
                if !keepalive.is_zero() && now.duration_since(room.last_sent) >= keepalive {
                    room.broadcast(None, Bytes::from_static(KEEPALIVE_FRAME), false);
                    room.last_sent = now;
                }
                let sent = room.sent;
                let queue = room.queue as u64;
                room.slots.retain(|_, slot| {
                    let consumed = slot.consumed();
                    let behind = sent.saturating_sub(consumed);
                    lagging |= behind > 0;
                    // A full queue and not one frame taken for `stall_sweeps` sweeps in a row:
                    // the connection stopped draining. (A client that lags during a burst but
                    // keeps reading is only cut if the ring overwrites what it has not read.)
                    let moved = consumed != slot.swept.swap(consumed, Ordering::Relaxed);
                    let stalled = if behind >= queue && !moved {
                        slot.stalled.fetch_add(1, Ordering::Relaxed) + 1
                    } else {
                        slot.stalled.store(0, Ordering::Relaxed);
                        0
                    };
                    if stalled >= stall_sweeps {
                        if slot.drop_slow() {
                            metrics.slow_disconnects.inc();
                            crate::throttled!(
                                tracing::Level::WARN,
                                behind,
                                "SSE client stopped reading; connection aborted"
                            );
                        }
                        slot.abort.abort();
                        room.streams -= slot.streams();
                        false
                    } else {
                        true
                    }
                });
            }
            // Once a second: histories past their TTL, and rooms idle past `rooms.idle_secs`
            // (half a sweep early rather than a whole one late).
            if now + SWEEP_INTERVAL / 2 >= expire_at {
                state.expire(now, settings, metrics);
                expire_at = now + QUIET_INTERVAL;
            }
            // Under the lock, as every broadcast: none can come between the look and this.
            if !lagging {
                bell.quieten();
            }
        }
        // Dropping the senders ends every stream once it has sent what it already had.
        let mut state = self.shared.lock();
        state.closed = true;
        for room in state.rooms.values_mut() {
            room.close();
        }
        drop(state);
        tracing::info!("event streams closed");
    }

    /// Owns one SUB socket connected to `address` and feeds the hub until shutdown. Rebuilds the
    /// socket as soon as the broker goes away, retrying every few hundred milliseconds, so that
    /// messages flow again quickly when it is back (the crate's own backoff reaches 30 s).
    ///
    /// With a snapshot `client` (`event.snapshot`), every time the SUB socket connects, and
    /// whenever a live message shows that some were missed, the node asks the broker for
    /// everything after its newest message: live frames that arrive meanwhile are kept, the
    /// snapshot is taken, then the kept frames (what the snapshot had is dropped by id).
    /// Returns the snapshot client when it stops (a rewiring hands it to the next task).
    ///
    /// `strict` (a SUB socket that overlaps the one holding the snapshot client, during a
    /// rewiring): without a client, a message after a gap is dropped, not taken, so that the
    /// snapshot the client's next holder asks for brings it and everything after it.
    pub async fn run_subscriber(
        self,
        address: String,
        mut client: Option<snapshot::Client>,
        strict: bool,
        failover: Option<(usize, Arc<Brokers>)>,
        shutdown: CancellationToken,
    ) -> Option<snapshot::Client> {
        let what = format!("SUB {address}");
        let addresses = [address];
        let mut requests = 0u64;
        // With `event.failover`: whether this socket's broker is the one whose frames are
        // delivered (the others' are read for their heartbeats only).
        let mut source = failover.as_ref().map(|(_, brokers)| brokers.source());
        let standby = |failover: &Option<(usize, Arc<Brokers>)>| {
            failover
                .as_ref()
                .is_some_and(|(index, brokers)| !brokers.is_source(*index))
        };
        loop {
            let make = || {
                let mut socket = SubSocket::with_options(socket::connect_options(
                    self.shared.settings.max_message_bytes,
                ));
                // Subscribing before connecting: the crate sends it on every connection.
                let _ = futures_util::FutureExt::now_or_never(socket.subscribe(""));
                socket
            };
            let Some(mut sub) = socket::connect(make, &addresses, &what, &shutdown).await else {
                return client;
            };
            let mut events = sub.monitor();
            self.shared.metrics.sub_connected.inc();
            // Subscribed: now the snapshot, so that nothing falls between the two.
            let mut sync = client
                .as_ref()
                .filter(|_| !standby(&failover))
                .map(|client| self.ask(client, &mut requests, Vec::new()));
            loop {
                let source_changed = async {
                    match source.as_mut() {
                        Some(source) => source.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let replies = async {
                    match client.as_mut() {
                        Some(client) => client.replies.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let deadline = sync.as_ref().map(|sync| sync.deadline);
                tokio::select! {
                    () = shutdown.cancelled() => {
                        self.shared.metrics.sub_connected.dec();
                        if let Some(waiting) = sync.take() {
                            self.give_up(waiting, "this SUB socket stopped");
                        }
                        return client;
                    }
                    event = futures_util::StreamExt::next(&mut events) => match event {
                        Some(SocketEvent::Disconnected(_)) | None => {
                            tracing::warn!(socket = %what, "broker went away; reconnecting");
                            break;
                        }
                        Some(_) => {}
                    },
                    changed = source_changed => {
                        if !changed {
                            source = None;
                        } else if !standby(&failover)
                            && sync.is_none()
                            && let Some(client) = client.as_ref()
                        {
                            // Now the source: what this broker has that the node lacks.
                            tracing::info!(socket = %what, "delivering this broker's messages");
                            sync = Some(self.ask(client, &mut requests, Vec::new()));
                        }
                    }
                    received = sub.recv() => match received {
                        Ok(message) if message.len() == 1 => {
                            let frame = message.into_vec().pop().expect("one frame");
                            if let Some((index, brokers)) = &failover {
                                if frame.starts_with(crate::failover::BEAT_PREFIX) {
                                    brokers.heard(*index, &frame);
                                    continue;
                                }
                                if !brokers.is_source(*index) {
                                    continue;
                                }
                            }
                            sync = match (sync.take(), client.as_ref()) {
                                (Some(mut waiting), _) => {
                                    if waiting.keep(frame) {
                                        Some(waiting)
                                    } else {
                                        self.give_up(waiting, "too many live messages meanwhile");
                                        None
                                    }
                                }
                                (None, Some(client)) => self.take_live(client, &mut requests, vec![frame], 0),
                                (None, None) => {
                                    if strict
                                        && self.ingest_as(&frame, Source::Live { check: true })
                                            == Ingested::Gap
                                    {
                                        self.shared.metrics.dropped(DropReason::Gap);
                                    } else if !strict {
                                        self.ingest(&frame);
                                    }
                                    None
                                }
                            };
                        }
                        Ok(message) => {
                            self.shared.metrics.dropped(DropReason::Unreadable);
                            crate::throttled!(tracing::Level::WARN, frames = message.len(), "dropped a multipart publication");
                        }
                        Err(error) => {
                            tracing::warn!(socket = %what, %error, "SUB socket failed; reconnecting");
                            break;
                        }
                    },
                    reply = replies => {
                        let Some(reply) = reply else {
                            // The snapshot task ended (shutdown): go on without.
                            client = None;
                            if let Some(waiting) = sync.take() {
                                self.give_up(waiting, "the snapshot socket closed");
                            }
                            continue;
                        };
                        let Some(waiting) = sync.as_mut().filter(|waiting| waiting.n == reply.n()) else {
                            tracing::debug!(n = reply.n(), "ignored the answer to a request given up on");
                            continue;
                        };
                        match reply {
                            Reply::Head(_, head) => {
                                waiting.covered = head.covered;
                                // (A broker that is no longer the source resets nobody.)
                                if !standby(&failover) {
                                    self.snapshot_head(&head);
                                }
                            }
                            Reply::Batch(_, frames) => {
                                // From a broker that stopped being the source meanwhile: not
                                // delivered (it may not be on the other).
                                if !standby(&failover) {
                                    for frame in frames {
                                        self.ingest_as(&frame, Source::Snapshot);
                                    }
                                }
                            }
                            Reply::End(_) => {
                                let done = sync.take().expect("waiting");
                                tracing::debug!(n = done.n, kept = done.kept.len(), "snapshot taken");
                                self.shared.metrics.snapshot_synced(if done.covered {
                                    SnapshotResult::Complete
                                } else {
                                    SnapshotResult::Partial
                                });
                                self.shared.synced.send_replace(true);
                                let client = client.as_ref().expect("a client answered");
                                if !standby(&failover) {
                                    sync = self.take_live(client, &mut requests, done.kept, done.tries + 1);
                                }
                            }
                        }
                    }
                    () = sleep_until_some(deadline) => {
                        if let Some(waiting) = sync.take() {
                            self.give_up(waiting, "no whole answer in time");
                        }
                    }
                }
            }
            self.shared.metrics.sub_connected.dec();
            if let Some(waiting) = sync.take() {
                self.give_up(waiting, "the broker went away");
            }
        }
    }

    /// Asks the broker for everything after this node's newest message; `kept` are live frames
    /// already waiting.
    fn ask(&self, client: &snapshot::Client, requests: &mut u64, kept: Vec<Bytes>) -> Awaited {
        *requests += 1;
        let request = snapshot::Request {
            after: self.marks().iter().map(MsgId::to_string).collect(),
            n: *requests,
        };
        tracing::debug!(n = request.n, after = ?request.after, "asking the broker for a snapshot");
        // A full queue: the request is lost, and the deadline gives up on it.
        let _ = client.requests.try_send(request);
        let bytes = kept.iter().map(Bytes::len).sum();
        Awaited {
            n: *requests,
            kept,
            bytes,
            covered: false,
            tries: 0,
            deadline: Instant::now() + snapshot::TIMEOUT,
        }
    }

    /// Takes live frames in order until one leaves a gap: then a snapshot is asked for, and the
    /// rest wait for it. After [`MAX_SYNC_TRIES`] snapshots in a row, the gap is taken (its
    /// clients get `event: reset`).
    fn take_live(
        &self,
        client: &snapshot::Client,
        requests: &mut u64,
        frames: Vec<Bytes>,
        tries: u32,
    ) -> Option<Awaited> {
        let check = tries < MAX_SYNC_TRIES;
        let mut frames = frames.into_iter();
        while let Some(frame) = frames.next() {
            if self.ingest_as(&frame, Source::Live { check }) == Ingested::Gap {
                let mut kept = vec![frame];
                kept.extend(frames);
                let mut sync = self.ask(client, requests, kept);
                sync.tries = tries;
                return Some(sync);
            }
        }
        None
    }

    /// Goes on without the snapshot: the kept frames are taken as they are (a gap is reset).
    fn give_up(&self, waiting: Awaited, why: &str) {
        tracing::warn!(
            kept = waiting.kept.len(),
            why,
            "went on without the broker's snapshot"
        );
        self.shared
            .metrics
            .snapshot_synced(SnapshotResult::TimedOut);
        self.shared.synced.send_replace(true);
        for frame in waiting.kept {
            self.ingest(&frame);
        }
    }
}

/// Broker runs whose marks a node keeps (two brokers' runs during a move, and the ones
/// before).
const MAX_RUNS: usize = 8;
/// Snapshots asked for in a row, each answered by live frames with a gap still, before the
/// gap is taken as lost.
const MAX_SYNC_TRIES: u32 = 3;
/// Live frames kept while a snapshot is awaited, at most (in bytes); past that the node goes on
/// without it.
const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// A snapshot awaited.
struct Awaited {
    /// The request's number.
    n: u64,
    /// Live frames that arrived meanwhile, in order.
    kept: Vec<Bytes>,
    bytes: usize,
    /// What the head said.
    covered: bool,
    /// Snapshots asked for in a row before this one.
    tries: u32,
    deadline: Instant,
}

impl Awaited {
    /// Keeps a live frame; `false` past [`MAX_KEPT_BYTES`].
    fn keep(&mut self, frame: Bytes) -> bool {
        self.bytes += frame.len();
        self.kept.push(frame);
        self.bytes <= MAX_KEPT_BYTES
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::error::lock(&self.state)
    }
}

/// Where a frame comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The SUB socket; `check`: refuse a frame that leaves a gap (a snapshot can fill it).
    Live { check: bool },
    /// A snapshot: holes are messages the broker dropped, not gaps.
    Snapshot,
}

/// What the embedded broker knows of a message it stamped on its fast path: its id, where
/// its room's name and its `ref` are in the frame. [`Hub::ingest_known`] takes it without
/// reading the frame again. The frame has no `key` member, and no `ref` but the one given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub id: MsgId,
    /// The room's name (a string without escapes); `None`: the default room.
    pub room: Option<std::ops::Range<usize>>,
    /// The `ref` member, the frame's first.
    pub reference: Option<KnownRef>,
}

/// Where a frame's leading `ref` member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownRef {
    /// Its value, between the quotes (no escapes).
    pub value: std::ops::Range<usize>,
    /// The member and its comma: what the SSE frame leaves out.
    pub member: std::ops::Range<usize>,
}

/// What [`Hub::ingest_as`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ingested {
    Taken,
    /// Not taken: it leaves a gap.
    Gap,
}

/// What [`State::append`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Appended {
    Stored,
    /// Already seen: clients have it.
    Duplicate,
    /// Not taken: it would leave a gap (a live frame checked for gaps).
    Gap,
}

impl State {
    /// Whether `id` would leave a gap after the newest message: the next one of a run was
    /// missed (a new run's first message is 1).
    fn would_gap(&self, id: MsgId) -> bool {
        match self.mark(id.run) {
            Some(mark) => id.seq > mark + 1,
            None => self.newest.is_some() && id.seq > 1,
        }
    }

    /// The highest sequence number received in `run`.
    fn mark(&self, run: u64) -> Option<u64> {
        self.marks
            .iter()
            .find(|mark| mark.run == run)
            .map(|mark| mark.seq)
    }

    /// Records `id` as received: its run's mark moves up, and its run becomes the newest.
    fn raise_mark(&mut self, id: MsgId) {
        if let Some(at) = self.marks.iter().position(|mark| mark.run == id.run) {
            let mark = self.marks.remove(at).expect("found");
            self.marks.push_front(MsgId {
                run: id.run,
                seq: mark.seq.max(id.seq),
            });
        } else {
            self.marks.push_front(id);
            self.marks.truncate(MAX_RUNS);
        }
    }

    /// Messages after `newest` were lost, in any room: every room's clients get a reset, and
    /// replays show where.
    fn lost(&mut self, newest: MsgId) {
        for room in self.rooms.values_mut() {
            let last = room
                .history
                .newest()
                .map_or_else(|| newest.to_string(), |id| id.to_string());
            let mut notice = BytesMut::new();
            write_reset(
                &mut notice,
                &last,
                "messages were lost before reaching this server",
            );
            room.broadcast(None, notice.freeze(), false);
            room.history.mark_gap();
        }
    }

    /// What this node says of itself, if it announces itself.
    fn own_info(&self) -> Option<NodeInfo> {
        self.announce.as_ref().map(|(started, listen)| NodeInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            listen: listen.clone(),
            uptime_secs: started.elapsed().as_secs(),
        })
    }

    /// Forgets nodes not heard from for [`PRESENCE_EXPIRY`].
    fn expire_others(&mut self, now: Instant) {
        self.others
            .retain(|_, (heard, _)| now.duration_since(*heard) < PRESENCE_EXPIRY);
        let others = &self.others;
        self.infos.retain(|node, _| others.contains_key(node));
    }

    /// The room `name`, created if needed. At `rooms.max`, the least recently active room
    /// without clients makes way; `None` if every room has clients.
    fn room(
        &mut self,
        name: &str,
        settings: &Settings,
        metrics: &Metrics,
        now: Instant,
    ) -> Option<&mut Room> {
        if !self.rooms.contains_key(name) {
            if self.rooms.len() >= settings.max_rooms {
                let idle = self
                    .rooms
                    .iter()
                    .filter(|(_, room)| room.slots.is_empty())
                    .min_by_key(|(_, room)| room.last_active)
                    .map(|(name, _)| name.clone())?;
                self.remove_room(&idle, metrics);
            }
            // The name is copied once, when the room is made; lookups borrow it.
            self.rooms.insert(
                Arc::from(name),
                Room::new(name, settings, now, self.bell.clone()),
            );
            metrics.rooms.set(self.rooms.len() as i64);
        }
        self.rooms.get_mut(name)
    }

    fn remove_room(&mut self, name: &Arc<str>, metrics: &Metrics) {
        if let Some(room) = self.rooms.remove(name) {
            self.history_bytes -= room.history.bytes();
        }
        metrics.rooms.set(self.rooms.len() as i64);
    }

    /// Appends a published message to its room's history and broadcasts it there, under the
    /// hub's lock (which `subscribe` takes too: a replay then the live stream has no gap and
    /// no duplicate).
    ///
    /// `message` is the room and the SSE frame; `None` for a message no client can follow
    /// (its id still counts). A live frame checked for gaps that would leave one is not taken.
    fn append(
        &mut self,
        message: Option<(&str, Bytes)>,
        id: Option<MsgId>,
        source: Source,
        settings: &Settings,
        metrics: &Metrics,
        to_write: &mut Writes,
    ) -> Appended {
        let now = Instant::now();
        let from_snapshot = source == Source::Snapshot;
        if source == (Source::Live { check: true })
            && let Some(id) = id
            && self.would_gap(id)
        {
            return Appended::Gap;
        }
        if let Some(id) = id {
            match self.mark(id.run) {
                // Within a run: ids are dense and increasing over all rooms. One already
                // seen (a broker that re-sent it, a snapshot overlapping the live stream) is
                // dropped: clients have it.
                Some(mark) if id.seq <= mark => return Appended::Duplicate,
                // A snapshot skips what the broker dropped (its head said if that matters).
                Some(mark) if !from_snapshot && id.seq > mark + 1 => {
                    // This node missed messages on their way from the broker: they may belong
                    // to any room.
                    let missed = id.seq - mark - 1;
                    let after = MsgId {
                        run: id.run,
                        seq: mark,
                    };
                    tracing::warn!(missed, %after, "messages missed between broker and this node");
                    self.lost(after);
                }
                // A run this node joins after its start (a restarted broker, another broker):
                // its first messages came before this node was subscribed. Its clients had
                // another run's messages: they are told, never left with a silent gap.
                None if !from_snapshot && id.seq > 1 => {
                    if let Some(newest) = self.newest {
                        tracing::warn!(
                            missed = id.seq - 1,
                            run = id.run,
                            "a broker run's first messages came before this node subscribed"
                        );
                        self.lost(newest);
                    }
                }
                // The next id, or the first of a run: a new epoch, whatever the numbers (runs
                // are never compared for order).
                _ => {}
            }
            self.raise_mark(id);
            self.newest = Some(id);
        }
        let Some((room, frame)) = message else {
            return Appended::Stored;
        };
        let Some(target) = self.room(room, settings, metrics, now) else {
            // Every room this node holds has clients: this one has none here, so nobody here
            // misses it live; it is only not kept for replay.
            metrics.dropped(DropReason::Rooms);
            return Appended::Stored;
        };
        target.last_active = now;
        target.last_sent = now;
        let before = target.history.bytes();
        if let Some(id) = id {
            target.history.push(id, frame.clone(), now);
        }
        let after = target.history.bytes();
        *to_write = target.broadcast_for(id, frame, true);
        self.history_bytes = self.history_bytes + after - before;
        // The node-wide budget: the oldest message of any room goes first.
        while self.history_bytes > settings.history_bytes {
            let oldest = self
                .rooms
                .values_mut()
                .filter_map(|room| room.history.oldest_at().map(|at| (at, room)))
                .min_by_key(|(at, _)| *at);
            let Some((_, room)) = oldest else { break };
            self.history_bytes -= room.history.pop_oldest();
        }
        Appended::Stored
    }

    /// Drops history past its TTL, and rooms without clients idle past `rooms.idle_secs`.
    fn expire(&mut self, now: Instant, settings: &Settings, metrics: &Metrics) {
        let mut idle = Vec::new();
        let mut bytes = 0;
        for (name, room) in &mut self.rooms {
            room.history.expire(now);
            bytes += room.history.bytes();
            if room.slots.is_empty() && now.duration_since(room.last_active) >= settings.room_idle {
                idle.push(name.clone());
            }
        }
        self.history_bytes = bytes;
        for name in idle {
            self.remove_room(&name, metrics);
        }
    }
}

impl Room {
    /// What a new client gets first: `retry:` and a comment that opens the stream, any `reset`
    /// notice, and the replay for its `Last-Event-ID` (frames shared with the history); and the
    /// id up to which it already has the live stream. `newest` is the newest id of any room.
    fn replay(
        &self,
        settings: &Settings,
        newest: Option<MsgId>,
        last_event_id: Option<&str>,
    ) -> (Vec<Bytes>, Option<MsgId>) {
        let mut opening = BytesMut::with_capacity(64);
        opening.put_slice(b"retry: ");
        opening.put_slice(itoa::Buffer::new().format(settings.retry_ms).as_bytes());
        opening.put_slice(b"\n: ok\n\n");
        let mut replay = Vec::new();
        let mut skip_until = None;
        let requested = last_event_id.map(str::trim).filter(|id| !id.is_empty());
        let reset = match requested.map(|text| text.parse::<MsgId>()) {
            None => None,
            Some(Ok(id)) if self.history.contains(id) => {
                self.history.write_after(id, &mut replay);
                None
            }
            // The client is up to date, or a little ahead of this node (it saw a message on
            // another node that has not reached this one yet): nothing to replay; skip what it
            // already has. Further ahead than that is no id this run will reach soon: reset.
            Some(Ok(id))
                if newest.is_some_and(|newest| {
                    id.run == newest.run && id.seq >= newest.seq && id.seq - newest.seq <= MAX_AHEAD
                }) =>
            {
                skip_until = Some(id);
                None
            }
            Some(Ok(id)) => Some(match newest {
                Some(newest) if id.run == newest.run && id.seq > newest.seq => {
                    "this id is ahead of every message this server has seen"
                }
                Some(newest) if id.run != newest.run && !self.history.knows_run(id.run) => {
                    "this id is from a broker run this server does not know"
                }
                _ => "the history does not reach back to this id",
            }),
            Some(Err(())) => Some("this is not a message id"),
        };
        if let Some(reason) = reset {
            write_reset(&mut opening, requested.unwrap_or_default(), reason);
        }
        if requested.is_none() || reset.is_some() {
            self.history
                .write_last(settings.initial_history, &mut replay);
        }
        // Gap notices inside the replay are written between its frames.
        replay.insert(0, opening.freeze());
        (replay, skip_until)
    }
}

/// The bounded history of one web node: message frames in the order they arrived, oldest
/// first. Ids increase within a run; a new run (a restarted broker) is a new epoch that follows
/// whatever came before, whatever its number.
pub struct History {
    entries: VecDeque<HistoryEntry>,
    max_len: usize,
    max_age: Duration,
    /// Set when messages were lost; the next entry carries it as `gap_before`.
    gap_marker: bool,
    /// Bytes of the frames held.
    bytes: usize,
}

struct HistoryEntry {
    id: MsgId,
    at: Instant,
    frame: Bytes,
    /// Messages were lost just before this one.
    gap_before: bool,
}

impl History {
    pub fn new(max_len: usize, max_age: Duration) -> History {
        History {
            // Grown as messages come: a room that gets few does not hold room for many.
            entries: VecDeque::new(),
            max_len,
            max_age,
            gap_marker: false,
            bytes: 0,
        }
    }

    /// Bytes of the frames held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The newest id held.
    pub fn newest(&self) -> Option<MsgId> {
        self.entries.back().map(|entry| entry.id)
    }

    /// When the oldest entry arrived.
    fn oldest_at(&self) -> Option<Instant> {
        self.entries.front().map(|entry| entry.at)
    }

    /// Drops the oldest entry; the bytes freed.
    fn pop_oldest(&mut self) -> usize {
        let freed = self
            .entries
            .pop_front()
            .map_or(0, |entry| entry.frame.len());
        self.bytes -= freed;
        freed
    }

    /// Appends a message. One that does not follow the newest of its run, or that is held
    /// already, is not stored.
    pub fn push(&mut self, id: MsgId, frame: Bytes, now: Instant) {
        if self.max_len == 0 {
            return;
        }
        if let Some(last) = self.entries.back()
            && (last.id.run == id.run && !id.follows(&last.id)
                || last.id.run != id.run && self.contains(id))
        {
            return;
        }
        if self.entries.len() == self.max_len {
            self.pop_oldest();
        }
        self.bytes += frame.len();
        self.entries.push_back(HistoryEntry {
            id,
            at: now,
            frame,
            gap_before: std::mem::take(&mut self.gap_marker),
        });
        self.expire(now);
    }

    /// Marks that messages were lost before the next one pushed.
    pub fn mark_gap(&mut self) {
        self.gap_marker = true;
    }

    /// Drops entries older than the age limit.
    pub fn expire(&mut self, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|entry| now.duration_since(entry.at) > self.max_age)
        {
            self.pop_oldest();
        }
    }

    /// Where `id` is held. Reconnecting clients ask for recent ids: search from the newest.
    fn position(&self, id: MsgId) -> Option<usize> {
        self.entries.iter().rposition(|entry| entry.id == id)
    }

    pub fn contains(&self, id: MsgId) -> bool {
        self.position(id).is_some()
    }

    /// Whether any message of this run is held.
    pub fn knows_run(&self, run: u64) -> bool {
        self.entries.iter().any(|entry| entry.id.run == run)
    }

    /// Adds every message after `id` (which must be in the history) to `out`.
    pub fn write_after(&self, id: MsgId, out: &mut Vec<Bytes>) {
        let start = self.position(id).map_or(0, |i| i + 1);
        self.write_from(start, out);
    }

    /// Adds the newest `count` messages to `out`.
    pub fn write_last(&self, count: usize, out: &mut Vec<Bytes>) {
        self.write_from(self.entries.len().saturating_sub(count), out);
    }

    fn write_from(&self, start: usize, out: &mut Vec<Bytes>) {
        out.reserve(self.entries.len() - start.min(self.entries.len()));
        for (i, entry) in self.entries.range(start..).enumerate() {
            if entry.gap_before && i > 0 {
                let mut notice = BytesMut::new();
                write_reset(
                    &mut notice,
                    &self.entries[start + i - 1].id.to_string(),
                    "messages were lost before reaching this server",
                );
                out.push(notice.freeze());
            }
            out.push(entry.frame.clone());
        }
    }

    /// The ids held, oldest first.
    #[cfg(test)]
    pub fn ids(&self) -> Vec<MsgId> {
        self.entries.iter().map(|entry| entry.id).collect()
    }
}

/// Settings for the tests of the hub and of what holds one: small queues and rooms.
#[cfg(test)]
pub(crate) fn test_settings() -> Settings {
    Settings {
        queue: 4,
        max_clients: 10,
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        initial_history: 10,
        retry_ms: 2000,
        keepalive: Duration::from_secs(15),
        stall: Duration::from_millis(400),
        max_message_bytes: 1 << 16,
        default_room: Arc::from("general"),
        max_rooms: 4,
        room_idle: Duration::from_secs(60),
        history_bytes: 1 << 20,
        room_queue: 4,
        batch_sends: true,
        shard_size: crate::shard::SHARD_SIZE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A message arrives `gap` ids after the previous one (0: a new broker run).
        Push { gap: u64, after_ms: u64 },
        /// Time passes.
        Wait { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..3, 0u64..50).prop_map(|(gap, after_ms)| Op::Push { gap, after_ms }),
            1 => (0u64..400).prop_map(|ms| Op::Wait { ms }),
        ]
    }

    fn frame(id: MsgId) -> Bytes {
        Bytes::from(format!("id: {id}\n\n"))
    }

    proptest! {
        /// The history keeps exactly the newest `max_len` messages younger than `max_age`,
        /// oldest first, and replays exactly what follows an id it holds.
        #[test]
        fn history_matches_a_model(
            max_len in 1usize..8,
            max_age_ms in 1u64..500,
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let start = Instant::now();
            let max_age = Duration::from_millis(max_age_ms);
            let mut history = History::new(max_len, max_age);
            let mut model: Vec<(MsgId, u64)> = Vec::new();
            let mut now_ms = 0u64;
            // Runs decrease: a broker restarted with its clock stepped back is a new epoch too.
            let mut id = MsgId { run: 1_000_000, seq: 0 };
            for op in ops {
                match op {
                    Op::Push { gap, after_ms } => {
                        now_ms += after_ms;
                        id = if gap == 0 {
                            MsgId { run: id.run - 1, seq: 1 }
                        } else {
                            MsgId { run: id.run, seq: id.seq + gap }
                        };
                        history.push(id, frame(id), start + Duration::from_millis(now_ms));
                        model.push((id, now_ms));
                    }
                    Op::Wait { ms } => {
                        now_ms += ms;
                        history.expire(start + Duration::from_millis(now_ms));
                    }
                }
                // The model: newest max_len, none older than max_age (as of the last expiry,
                // which every push and wait does).
                model.retain(|(_, at)| now_ms - at <= max_age_ms);
                if model.len() > max_len {
                    model.drain(..model.len() - max_len);
                }
                let expected: Vec<MsgId> = model.iter().map(|(id, _)| *id).collect();
                prop_assert_eq!(history.ids(), expected.clone());
                for (i, held) in expected.iter().enumerate() {
                    prop_assert!(history.contains(*held));
                    let mut out = Vec::new();
                    history.write_after(*held, &mut out);
                    let replayed: Vec<u8> = expected[i + 1..].iter().flat_map(|id| frame(*id).to_vec()).collect();
                    prop_assert_eq!(out.concat(), replayed);
                }
                let mut last = Vec::new();
                history.write_last(2, &mut last);
                let newest: Vec<u8> = expected[expected.len().saturating_sub(2)..]
                    .iter()
                    .flat_map(|id| frame(*id).to_vec())
                    .collect();
                prop_assert_eq!(last.concat(), newest);
            }
        }
    }

    use super::test_settings as settings;

    fn hub(settings: Settings) -> Hub {
        Hub::new(settings, Metrics::new(), Acks::new())
    }

    fn message(seq: u64) -> Vec<u8> {
        format!(r#"{{"from":"a","text":"m{seq}","id":"1-{seq}","time":1}}"#).into_bytes()
    }

    #[test]
    fn nodes_announce_themselves_and_what_they_say_is_bounded() {
        let a = hub(settings());
        // Without clients, a node that does not announce itself says nothing.
        assert!(a.presence_report().is_none());
        a.announce("127.0.0.1:8001".into());
        let report = a
            .presence_report()
            .expect("an announcing node always reports");
        let b = hub(settings());
        b.ingest(&report);
        let nodes = b.nodes();
        assert_eq!(nodes.len(), 2);
        assert!(nodes[0].this && nodes[0].info.is_none());
        let info = nodes[1].info.clone().expect("the other's announcement");
        assert_eq!(info.listen, "127.0.0.1:8001");
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        // A forged report: its strings are cut.
        let long = "x".repeat(10_000);
        let forged = format!(
            r#"{{"presence":{{"node":"forged","rooms":{{}},"info":{{"version":"{long}","listen":"{long}","uptime_secs":1}}}}}}"#
        );
        b.ingest(forged.as_bytes());
        let forged = b
            .nodes()
            .into_iter()
            .find(|node| node.node == "forged")
            .and_then(|node| node.info)
            .expect("listed");
        assert!(forged.version.len() <= MAX_NAME_CHARS && forged.listen.len() <= MAX_NAME_CHARS);
    }

    #[test]
    fn a_nodes_own_report_is_known_by_its_first_bytes_and_others_are_read() {
        let a = hub(settings());
        a.announce("127.0.0.1:8001".into());
        let report = a.presence_report().expect("an announcing node reports");
        assert!(
            report.starts_with(&a.shared.report_prefix),
            "the node comes first: {}",
            String::from_utf8_lossy(&report)
        );
        let parsed: serde_json::Value = serde_json::from_slice(&report).expect("JSON");
        assert_eq!(parsed["presence"]["node"], a.shared.node.as_str());
        assert!(parsed["presence"]["rooms"].is_object());
        assert_eq!(parsed["presence"]["info"]["listen"], "127.0.0.1:8001");
        // Its own echo: not another node.
        a.ingest(&report);
        assert_eq!(a.nodes().len(), 1);
        // Its name with the members in another order (an older node's report): not another
        // node either.
        let reordered = format!(
            r#"{{"presence":{{"rooms":{{}},"node":"{}"}}}}"#,
            a.shared.node
        );
        a.ingest(reordered.as_bytes());
        assert_eq!(a.nodes().len(), 1);
        // A node whose name starts with this one's is another node.
        let longer = format!(
            r#"{{"presence":{{"node":"{}0","rooms":{{}}}}}}"#,
            a.shared.node
        );
        a.ingest(longer.as_bytes());
        assert_eq!(a.nodes().len(), 2);
    }

    /// A client one of `hub`'s writer shards streams to, on a real loopback socket (left
    /// non-blocking): `head` is its stream's first bytes, already written by its own task.
    async fn streamed_client(
        hub: &Hub,
        listener: &tokio::net::TcpListener,
        head: &'static [u8],
    ) -> (std::net::TcpStream, Arc<Outlet>, (Arc<Slot>, ClientGuard)) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let outlet = Arc::new(Outlet::new(
            crate::shard::Socket::Owned(server),
            Bytes::from_static(head),
        ));
        let subscribed = hub
            .subscribe_outlet(None, None, None, Abort::new(|| {}), &outlet)
            .unwrap();
        assert_eq!(outlet.write_pending(), crate::shard::Flushed::Empty);
        client.set_nonblocking(true).unwrap();
        (client, outlet, subscribed)
    }

    /// A hub with writer shards of `shard_size` and `clients` streamed clients in its default
    /// room.
    async fn streamed_room(
        shard_size: usize,
        clients: usize,
    ) -> (
        Hub,
        Vec<(std::net::TcpStream, Arc<Outlet>, (Arc<Slot>, ClientGuard))>,
    ) {
        let hub = hub(Settings {
            shard_size,
            ..settings()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut streamed = Vec::new();
        for _ in 0..clients {
            streamed.push(streamed_client(&hub, &listener, b"").await);
        }
        (hub, streamed)
    }

    /// The sequence numbers of the messages (ids `1-N`) in what a client read, in order.
    fn ids(got: &str) -> Vec<u64> {
        got.lines()
            .filter_map(|line| line.strip_prefix("id: 1-"))
            .map(|seq| seq.parse().unwrap())
            .collect()
    }

    /// The writer shards of the hub's only room.
    fn room_shards(hub: &Hub) -> Vec<Arc<Shard>> {
        let state = hub.shared.lock();
        let mut rooms = state.rooms.values();
        let room = rooms.next().expect("a room");
        assert!(rooms.next().is_none(), "one room");
        room.shards.clone()
    }

    /// What a client's socket holds now (loopback: what `send` returned for is readable at
    /// once).
    fn read_now(mut client: &std::net::TcpStream) -> String {
        use std::io::Read;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = Vec::new();
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// A client of a room's lone writer shard, on a real socket: the message is in the
    /// client's socket when `ingest` returns (the broadcaster wrote it; no other task ran on
    /// this one-thread runtime meanwhile); one that follows within `WRITE_GAP` is written by
    /// the shard's task.
    #[tokio::test]
    async fn a_lone_shard_is_written_by_the_broadcaster() {
        let hub = hub(settings());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // The head and the stream's opening, as the client's own task writes them.
        let (client, _outlet, _subscribed) = streamed_client(&hub, &listener, b"head\n").await;
        let opening = read_now(&client);
        assert!(opening.starts_with("head\n"), "{opening:?}");

        hub.ingest(&message(1));
        let written = read_now(&client);
        assert!(
            written.contains("id: 1-1\n") && written.contains("m1"),
            "written before ingest returned: {written:?}"
        );

        // The next one, whoever writes it, arrives in order.
        hub.ingest(&message(2));
        let mut rest = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !rest.contains("m2") {
            assert!(
                std::time::Instant::now() < deadline,
                "the second message arrives"
            );
            // The shard's task, if it is its turn, runs meanwhile.
            tokio::time::sleep(Duration::from_millis(1)).await;
            rest.push_str(&read_now(&client));
        }
        assert!(
            rest.contains("id: 1-2\n") && !rest.contains("m1"),
            "{rest:?}"
        );
    }

    /// A lone shard whose last pass by its broadcaster took long (a large shard) is left to its
    /// task until [`crate::shard::WRITE_SHARE`] times that has gone by: the broadcaster does
    /// not spend more than a share of its time writing, and the task gathers what comes.
    #[tokio::test]
    async fn a_lone_shard_that_took_long_to_write_is_left_to_its_task_for_a_while() {
        let hub = hub(settings());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, _outlet, _subscribed) = streamed_client(&hub, &listener, b"").await;
        hub.ingest(&message(1));
        assert!(
            read_now(&client).contains("m1"),
            "written by the broadcaster"
        );
        let shard = room_shards(&hub)[0].clone();
        // That pass "took" 10 ms: for 40 ms from its start, the task writes.
        shard.pretend_the_last_write_took(Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(5));
        hub.ingest(&message(2));
        assert_eq!(read_now(&client), "", "left to the shard's task");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            read_now(&client).contains("m2"),
            "written by the shard's task"
        );
        std::thread::sleep(Duration::from_millis(40));
        hub.ingest(&message(3));
        assert!(
            read_now(&client).contains("m3"),
            "the broadcaster writes again"
        );
    }

    /// `event.shard_size` clients a shard: seven clients make three shards of three (their
    /// tasks write, woken: nothing is in the sockets when the broadcast returns), or one of
    /// a hundred, which the broadcaster writes itself before it returns.
    #[tokio::test]
    async fn a_room_has_a_shard_per_shard_size_clients() {
        for (size, shards) in [(3, 3), (100, 1)] {
            let (hub, clients) = streamed_room(size, 7).await;
            assert_eq!(room_shards(&hub).len(), shards, "shard_size {size}");
            hub.ingest(&message(1));
            let inline = shards == 1;
            for (client, _, _) in &clients {
                let got = read_now(client);
                assert_eq!(
                    got.contains("m1"),
                    inline,
                    "shard_size {size}: written before the broadcast returned? {got:?}"
                );
            }
            // The shards' tasks write the others.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !inline {
                for (client, _, _) in &clients {
                    assert!(
                        read_now(client).contains("m1"),
                        "written by its shard's task"
                    );
                }
            }
        }
    }

    /// A shard whose last client left is let go, its task ended, while its room has others;
    /// their clients still get every message. The room's only shard stays for the next
    /// client.
    #[tokio::test]
    async fn a_shard_whose_clients_all_left_is_let_go() {
        // Shards of three: clients 0–2, 3–5 and 6–8. The middle one's clients leave (the
        // last one's do not fit in the room the others have: nobody moves).
        let (hub, mut clients) = streamed_room(3, 9).await;
        let shards = room_shards(&hub);
        assert_eq!(shards.len(), 3);
        drop(clients.drain(3..6).collect::<Vec<_>>());
        let left = room_shards(&hub);
        assert_eq!(left.len(), 2);
        assert!(Arc::ptr_eq(&left[0], &shards[0]) && Arc::ptr_eq(&left[1], &shards[2]));
        assert_eq!((shards[0].len(), shards[2].len()), (3, 3));
        // Its task ended and dropped it: only this test holds it now.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&shards[1]) > 1 {
            assert!(
                Instant::now() < deadline,
                "the let-go shard's task still runs"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        hub.ingest(&message(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (client, _, _) in &clients {
            assert_eq!(ids(&read_now(client)), [1], "the other shards still write");
        }
        // With a client the shards do not write (a stream hyper serves) still in the room,
        // its only shard stays when its last client leaves: the next one takes it.
        let _reader = hub.subscribe(None, None, Abort::new(|| {})).unwrap();
        drop(clients);
        let left = room_shards(&hub);
        assert_eq!(left.len(), 1);
        assert!(left[0].is_empty());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _next = streamed_client(&hub, &listener, b"").await;
        assert!(Arc::ptr_eq(&room_shards(&hub)[0], &left[0]) && !left[0].is_empty());
    }

    /// A room that shrank moves its last shard's clients into the others once these have
    /// room for all of them, and lets it go: every client still gets each message once, in
    /// order, a moved client leaves from where it was moved to, and a room back to one shard
    /// is written by its broadcaster. While a shard has not taken what was sent, nothing
    /// moves; the next sweep (or leave) moves them.
    #[tokio::test]
    async fn a_room_that_shrank_moves_its_last_shards_clients_into_the_others() {
        // Shards of three: clients 0–2, 3–5 and 6 (this runtime's one thread runs the shards'
        // tasks only when the test awaits).
        let (hub, clients) = streamed_room(3, 7).await;
        let mut clients: Vec<_> = clients.into_iter().map(Some).collect();
        let shards = room_shards(&hub);
        assert_eq!(shards.len(), 3);
        let deliver = |n| {
            hub.ingest(&message(n));
            tokio::time::sleep(Duration::from_millis(50))
        };
        deliver(1).await;
        // Clients 1 and 2 leave: the first shard has room for client 6, which moves there.
        clients[1] = None;
        clients[2] = None;
        let left = room_shards(&hub);
        assert_eq!(left.len(), 2, "the last shard's client moved");
        assert!(Arc::ptr_eq(&left[0], &shards[0]) && Arc::ptr_eq(&left[1], &shards[1]));
        assert_eq!(
            (shards[0].len(), shards[1].len(), shards[2].len()),
            (2, 3, 0)
        );
        deliver(2).await;
        // A message is in the ring that no shard's task has taken yet when clients 3 and 4
        // leave: nothing moves then.
        hub.ingest(&message(3));
        clients[3] = None;
        clients[4] = None;
        assert_eq!(
            room_shards(&hub).len(),
            2,
            "nothing moves while a frame is in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The next sweep moves client 5 into the first shard: one shard left, which the
        // broadcaster writes before the broadcast returns.
        let shutdown = CancellationToken::new();
        tokio::spawn(hub.clone().run_timers(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while room_shards(&hub).len() > 1 {
            assert!(Instant::now() < deadline, "a sweep moves them");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(Arc::ptr_eq(&room_shards(&hub)[0], &shards[0]));
        assert_eq!(shards[0].len(), 3, "clients 0, 6 and 5");
        hub.ingest(&message(4));
        let mut got: Vec<(usize, String)> = Vec::new();
        for (n, client) in clients.iter().enumerate() {
            if let Some((client, _, _)) = client {
                got.push((n, read_now(client)));
            }
        }
        assert_eq!(got.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [0, 5, 6]);
        for (n, got) in &got {
            assert_eq!(
                ids(got),
                [1, 2, 3, 4],
                "client {n}: each message once, in order"
            );
        }
        // A moved client leaves the shard it was moved to.
        clients[6] = None;
        assert_eq!(shards[0].len(), 2);
        shutdown.cancel();
    }

    /// The shards of a room of several are all woken, and the worker threads write them side
    /// by side: each shard's pass waits here until the other's is under way too (for at most
    /// 10 s). Had the broadcaster woken one and written the other itself, the woken task would
    /// wait in its worker's LIFO slot, which no other worker takes from, until that write was
    /// done: the first pass would wait alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_shards_of_a_room_of_several_are_written_side_by_side() {
        let (hub, clients) = streamed_room(2, 4).await;
        let shards = room_shards(&hub);
        assert_eq!(shards.len(), 2);
        let meeting = Arc::new((std::sync::Mutex::new(0), std::sync::Condvar::new()));
        let met = Arc::new(AtomicU64::new(0));
        for shard in &shards {
            let (meeting, met) = (meeting.clone(), met.clone());
            shard.on_pass(move || {
                let (arrived, all) = &*meeting;
                let mut arrived = arrived.lock().unwrap();
                *arrived += 1;
                all.notify_all();
                let (arrived, wait) = all
                    .wait_timeout_while(arrived, Duration::from_secs(10), |arrived| *arrived < 2)
                    .unwrap();
                drop(arrived);
                if !wait.timed_out() {
                    met.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Broadcast on a worker thread, as the embedded broker's task and the SUB socket's do.
        let broadcaster = hub.clone();
        tokio::spawn(async move { broadcaster.ingest(&message(1)) })
            .await
            .unwrap();
        for (client, _, _) in &clients {
            let mut got = String::new();
            for _ in 0..2000 {
                got += &read_now(client);
                if got.contains("m1") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(got.contains("m1"), "every client is written: {got:?}");
        }
        assert_eq!(
            met.load(Ordering::Relaxed),
            2,
            "both shards' passes were under way at once"
        );
    }

    /// A burst's broadcaster that does not let the shards' tasks run (here: no await, on a
    /// one-thread runtime) would lap them in the ring and every client would be cut; a shard
    /// half a ring behind is caught up by the broadcaster instead. Two shards (neither alone,
    /// so neither written inline otherwise), a ring of 16 frames, 200 messages.
    #[tokio::test]
    async fn a_shard_half_a_ring_behind_is_caught_up_by_the_broadcaster() {
        const SHARD_SIZE: usize = 8;
        let hub = hub(Settings {
            queue: 16,
            max_clients: SHARD_SIZE + 1,
            shard_size: SHARD_SIZE,
            ..settings()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut clients = Vec::new();
        for _ in 0..=SHARD_SIZE {
            // The head, as the client's own task writes it.
            clients.push(streamed_client(&hub, &listener, b"head\n").await);
        }
        const MESSAGES: u64 = 200;
        for seq in 1..=MESSAGES {
            hub.ingest(&message(seq));
        }
        // The shards' tasks run now: what they find in the ring, they write.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (client, outlet, _) in clients {
            assert_eq!(
                outlet.write_pending(),
                crate::shard::Flushed::Empty,
                "the client's stream goes on"
            );
            assert_eq!(
                ids(&read_now(&client)),
                (1..=MESSAGES).collect::<Vec<_>>(),
                "every message, in order"
            );
        }
    }

    /// A hub whose timers run (cancel the token to stop them).
    fn hub_with_timers() -> (Hub, CancellationToken) {
        let hub = hub(settings());
        let shutdown = CancellationToken::new();
        tokio::spawn(hub.clone().run_timers(shutdown.clone()));
        (hub, shutdown)
    }

    /// Timers run on tokio's clock: these tests move it instead of sleeping.
    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_follows_silence() {
        let (hub, shutdown) = hub_with_timers();
        let mut sub = hub.subscribe(None, None, Abort::new(|| {})).unwrap();
        tokio::time::advance(Duration::from_secs(14)).await;
        tokio::task::yield_now().await;
        assert!(sub.rx.try_recv().is_err(), "nothing before 15 s of silence");
        hub.ingest(&message(1));
        assert!(!sub.rx.recv().await.unwrap().frame.starts_with(b":"));
        // 15 s after the message, not after the start.
        tokio::time::advance(Duration::from_secs(14)).await;
        tokio::task::yield_now().await;
        assert!(sub.rx.try_recv().is_err());
        tokio::time::advance(Duration::from_secs(2)).await;
        let item = sub.rx.recv().await.unwrap();
        assert_eq!(&item.frame[..], KEEPALIVE_FRAME);
        shutdown.cancel();
    }

    /// Lets the paused clock run for `time`, 50 ms at a time, the spawned tasks running at each
    /// step.
    async fn run_for(time: Duration) {
        for _ in 0..time.as_millis() / 50 {
            tokio::time::advance(Duration::from_millis(50)).await;
            tokio::task::yield_now().await;
        }
    }

    /// While every client has taken every frame, the sweep runs once a second; a broadcast to
    /// a client that reads the ring on its own task brings it back to every 200 ms until the
    /// client has caught up again.
    #[tokio::test(start_paused = true)]
    async fn an_idle_hub_sweeps_once_a_second_and_a_broadcast_brings_the_pace_back() {
        let (hub, shutdown) = hub_with_timers();
        let mut sub = hub.subscribe(None, None, Abort::new(|| {})).unwrap();
        let sweeps = |hub: &Hub| hub.shared.sweeps.load(Ordering::Relaxed);
        run_for(Duration::from_secs(10)).await;
        let idle = sweeps(&hub);
        assert!((9..=12).contains(&idle), "10 s idle: {idle} sweeps");
        // A message the client has not taken yet: every 200 ms while it lags.
        hub.ingest(&message(1));
        run_for(Duration::from_secs(2)).await;
        let lagging = sweeps(&hub) - idle;
        assert!((9..=11).contains(&lagging), "2 s lagging: {lagging} sweeps");
        // Taken: quiet again after the next sweep.
        while sub.rx.try_recv().is_ok() {
            hub.consumed(&sub.slot, 1);
        }
        run_for(Duration::from_secs(10)).await;
        let quiet = sweeps(&hub) - idle - lagging;
        assert!((9..=13).contains(&quiet), "10 s caught up: {quiet} sweeps");
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn history_entries_expire_after_their_ttl() {
        let hub = hub(settings());
        hub.ingest(&message(1));
        tokio::time::advance(Duration::from_secs(30)).await;
        hub.ingest(&message(2));
        let replayed = |hub: &Hub| {
            let sub = hub.subscribe(None, None, Abort::new(|| {})).unwrap();
            String::from_utf8(sub.replay.concat()).unwrap()
        };
        let both = replayed(&hub);
        assert!(both.contains("\"m1\"") && both.contains("\"m2\""), "{both}");
        tokio::time::advance(Duration::from_secs(31)).await;
        let newer = replayed(&hub);
        assert!(
            !newer.contains("\"m1\"") && newer.contains("\"m2\""),
            "{newer}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_by_the_sweep() {
        stops_reading_after(Duration::ZERO).await;
    }

    /// The same after the sweep slowed to its quiet pace: the burst brings it back at once.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_after_a_quiet_while_is_cut_off_as_fast() {
        stops_reading_after(Duration::from_secs(5)).await;
    }

    /// Two clients, quiet for `idle`, then a burst: one reads it, the other is cut off after
    /// `event.stall_ms` (400 ms: two sweeps with its queue full), not before.
    async fn stops_reading_after(idle: Duration) {
        let (hub, shutdown) = hub_with_timers();
        let aborted = Arc::new(AtomicBool::new(false));
        let _stuck = {
            let aborted = aborted.clone();
            hub.subscribe(
                None,
                None,
                Abort::new(move || aborted.store(true, Ordering::SeqCst)),
            )
            .unwrap()
        };
        let mut reading = hub
            .subscribe(None, None, Abort::new(|| panic!("a reader is never cut")))
            .unwrap();
        run_for(idle).await;
        for seq in 1..=6 {
            hub.ingest(&message(seq));
            // The reading client takes everything.
            while reading.rx.try_recv().is_ok() {
                hub.consumed(&reading.slot, 1);
            }
        }
        tokio::time::advance(Duration::from_millis(200)).await;
        tokio::task::yield_now().await;
        assert!(
            !aborted.load(Ordering::SeqCst),
            "not before `event.stall_ms`"
        );
        for _ in 0..4 {
            tokio::time::advance(SWEEP_INTERVAL).await;
            tokio::task::yield_now().await;
        }
        assert!(
            aborted.load(Ordering::SeqCst),
            "cut off after `event.stall_ms`"
        );
        assert_eq!(hub.metrics().slow_disconnects.get(), 1);
        shutdown.cancel();
    }

    /// Clients whose sockets take every frame at once keep the sweep at its quiet pace: a
    /// message every 100 ms for 10 s wakes it once a second, not every 200 ms (no thread woken
    /// between two messages at a light load). Every message still reaches every client. (A
    /// client that reads the ring on its own task rings at every broadcast while it is in the
    /// room: `an_idle_hub_sweeps_once_a_second_and_a_broadcast_brings_the_pace_back`.)
    #[tokio::test(start_paused = true)]
    async fn streamed_clients_that_take_every_frame_leave_the_sweep_quiet() {
        const MESSAGES: u64 = 100;
        let (hub, clients) = streamed_room(crate::shard::SHARD_SIZE, 3).await;
        // A client whose stream hyper served came and went: the room has none any more.
        drop(hub.subscribe(None, None, Abort::new(|| {})).unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(hub.clone().run_timers(shutdown.clone()));
        let sweeps = |hub: &Hub| hub.shared.sweeps.load(Ordering::Relaxed);
        run_for(Duration::from_secs(2)).await;
        let before = sweeps(&hub);
        let mut got = vec![String::new(); clients.len()];
        for seq in 1..=MESSAGES {
            hub.ingest(&message(seq));
            run_for(Duration::from_millis(100)).await;
            for ((client, _, _), got) in clients.iter().zip(&mut got) {
                got.push_str(&read_now(client));
            }
        }
        let during = sweeps(&hub) - before;
        assert!(
            (9..=12).contains(&during),
            "10 s of messages all taken at once: {during} sweeps"
        );
        for got in got {
            assert_eq!(
                ids(&got),
                (1..=MESSAGES).collect::<Vec<_>>(),
                "every message"
            );
        }
        shutdown.cancel();
    }

    /// A streamed client whose socket stopped taking bytes, with its whole queue waiting in its
    /// outlet, after a quiet while: the pass that left it behind brings the sweep back at once,
    /// and the client is cut off after `event.stall_ms` (400 ms), not a quiet second later. A
    /// client of the same room that reads is not cut.
    #[tokio::test(start_paused = true)]
    async fn a_streamed_client_left_behind_after_a_quiet_while_is_cut_off_as_fast() {
        let (hub, shutdown) = hub_with_timers();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // The stuck client: small socket buffers on both ends, never read.
        let stuck =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        stuck.set_recv_buffer_size(4096).unwrap();
        stuck
            .connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let outlet = Arc::new(Outlet::new(
            crate::shard::Socket::Owned(server),
            Bytes::new(),
        ));
        let aborted = Arc::new(AtomicBool::new(false));
        let abort = {
            let aborted = aborted.clone();
            Abort::new(move || aborted.store(true, Ordering::SeqCst))
        };
        let _subscribed = hub
            .subscribe_outlet(None, None, None, abort, &outlet)
            .unwrap();
        let (reader, _reader_outlet, _reader_subscribed) =
            streamed_client(&hub, &listener, b"").await;
        run_for(Duration::from_secs(5)).await;
        // Large messages until the stuck client's queue (4 frames) waits in its outlet.
        let text = "x".repeat(8000);
        let queue = settings().queue as u64;
        let sent = |hub: &Hub| {
            hub.shared
                .lock()
                .rooms
                .values()
                .map(|room| room.sent)
                .sum::<u64>()
        };
        let mut seq = 0;
        while sent(&hub) - outlet.consumed() < queue {
            seq += 1;
            assert!(seq < 200, "the stuck client's socket fills");
            // The broadcaster writes, not the shard's task (which runs only when this one
            // waits): its last pass was more than `WRITE_GAP` ago and, however long it took
            // on a busy machine, counts as short.
            std::thread::sleep(crate::shard::WRITE_GAP * 2);
            room_shards(&hub)[0].pretend_the_last_write_took(Duration::ZERO);
            hub.ingest(
                format!(r#"{{"from":"a","text":"{text}","id":"1-{seq}","time":1}}"#).as_bytes(),
            );
            // The reader takes it.
            read_now(&reader);
        }
        tokio::time::advance(Duration::from_millis(200)).await;
        tokio::task::yield_now().await;
        assert!(
            !aborted.load(Ordering::SeqCst),
            "not before `event.stall_ms`"
        );
        run_for(Duration::from_millis(400)).await;
        assert!(
            aborted.load(Ordering::SeqCst),
            "cut off after `event.stall_ms`, not at the next quiet sweep"
        );
        assert_eq!(hub.metrics().slow_disconnects.get(), 1);
        drop(stuck);
        shutdown.cancel();
    }

    #[test]
    fn a_gap_is_replayed_as_a_reset() {
        let mut history = History::new(10, Duration::from_secs(60));
        let now = Instant::now();
        let id = |seq| MsgId { run: 1, seq };
        history.push(id(1), frame(id(1)), now);
        history.push(id(2), frame(id(2)), now);
        history.mark_gap();
        history.push(id(5), frame(id(5)), now);
        let mut out = Vec::new();
        history.write_after(id(1), &mut out);
        let text = String::from_utf8(out.concat()).unwrap();
        assert_eq!(
            text,
            "id: 1-2\n\nevent: reset\ndata: {\"lastEventId\":\"1-2\",\"reason\":\"messages were lost before reaching this server\"}\n\nid: 1-5\n\n"
        );
    }
}
