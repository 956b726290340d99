//! The Broker component: PULL (bind) → moderation scripts → PUB (bind).
//!
//! Temma's `bin/comma Broker run`, made safe. The broker reads one frame at a time from its PULL
//! socket. Each frame must be one JSON object (Temma's wire format: `{"from": …, "text": …}`);
//! anything else — invalid JSON, another JSON value, a multipart message, a frame over
//! `broker.max_frame_bytes` — is logged, counted and dropped, never published as `null` (Temma's
//! bug). A good message is stamped with a unique `id` (`<run>-<seq>`: the broker's start time in
//! Unix milliseconds, then a sequence number from 1, so ids are unique across restarts and
//! increase within one run) and `time` (Unix milliseconds), run through the script chain, and
//! published as one compact JSON frame: `{"from":…,"text":…,"id":"1764109484123-1","time":…}`.
//!
//! When a script drops a message that carries a web node's `ref`, and `broker.notify_rejections`
//! is on, the broker publishes a rejection instead, so that the sender learns why:
//! `{"reject":"<ref>","reason":"…","status":422}`. Web nodes never show rejections to SSE
//! clients; turn them off for plain Temma peers, which would.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, PullSocket, Socket, SocketRecv, ZmqMessage};

use crate::context::{Context, Root, UnknownDataSource};
use crate::failover::{Beat, Pair, PeerFrame, Role};
use crate::hub::{Known, KnownRef};
use crate::metrics::{DropReason, Metrics, SocketLabels};
use crate::script::{
    Chain, ChainSource, Compiled, OnError, Reload, ReloadHandle, Reloader, ScriptConfig,
    ScriptError, ScriptLimits, ScriptSpec, Verdict, reference_of,
};
use crate::snapshot::{self, Archive, Limits, Reply};
use crate::socket::{self, SocketError};
use crate::wire::{
    CLIENT, Envelope, KEY, Layout, MsgId, PRIVATE_KEYS, REF, ROOM, RoomSpan, STAMPED_KEYS,
    max_published_bytes, new_run, now_ms, plain_str, published, rejection,
};
use crate::workers::{Done, Job, Workers};

/// Default `broker.pull`: Temma's data source name.
pub const DEFAULT_BROKER_PULL: &str = "zmq_broker_pull";
/// Default `broker.pub`.
pub const DEFAULT_BROKER_PUB: &str = "zmq_broker_pub";
/// Default `broker.max_frame_bytes`: frames larger than this are dropped.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// Room for `,"id":"<20 digits>-<20 digits>","time":<20 digits>}`: no reallocation.
const STAMP_BYTES: usize = 96;

/// The stamper writes the frames it makes one after the other into buffers of this size, each
/// frame a shared slice of one: an allocation every hundred frames or so instead of one (or
/// two) a frame. A buffer is freed when its last frame is (PUB writes a frame and drops it
/// within the turn; the archive keeps copies, not slices).
const ARENA_BYTES: usize = 16 * 1024;

/// Default `broker.dedupe_window_secs`.
pub const DEFAULT_DEDUPE_WINDOW_SECS: u64 = 120;
/// Default `broker.dedupe_max_keys`.
pub const DEFAULT_DEDUPE_MAX_KEYS: usize = 100_000;

/// Default `broker.history_size`.
pub const DEFAULT_ARCHIVE_SIZE: usize = 1000;
/// Default `broker.history_bytes`.
pub const DEFAULT_ARCHIVE_BYTES: usize = 64 * 1024 * 1024;
/// Default `broker.history_ttl_secs`.
pub const DEFAULT_ARCHIVE_TTL_SECS: u64 = 3600;

/// The `[broker]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Run the broker inside `temma serve`. Default `true`. `temma broker` ignores it.
    pub embedded: bool,
    /// Where `temma broker` serves `GET /health` and `GET /metrics` (its script counters
    /// among them), e.g. `"127.0.0.1:8001"`. Default: none. With the embedded broker, the web
    /// node's own `/metrics` has them.
    #[serde(deserialize_with = "crate::dsn::optional_listen_address")]
    pub http: Option<std::net::SocketAddr>,
    /// Data source the broker reads from: a PULL bind. Default `"zmq_broker_pull"`.
    pub pull: String,
    /// Data source the broker publishes on: a PUB bind. Default `"zmq_broker_pub"`.
    #[serde(rename = "pub")]
    pub publish: String,
    /// Frames larger than this many bytes are dropped. Default 65536.
    pub max_frame_bytes: usize,
    /// Messages the PUB socket keeps for each subscriber (a web node) that has not taken them
    /// yet (libzmq's `ZMQ_SNDHWM`); past it that subscriber misses messages. A subscriber half
    /// that far behind and still reading has the broker wait for it. Default 100000.
    pub subscriber_queue: usize,
    /// Publish a rejection notice when a script drops a message from a web node, so its sender
    /// gets a 4xx with the reason. Default `true`; turn off when plain Temma peers subscribe.
    pub notify_rejections: bool,
    /// Seconds a published message's idempotency key is remembered: a message sent again with
    /// the same key within this window (a retry after a 503) is not published twice. Default
    /// 120; 0 turns de-duplication off.
    pub dedupe_window_secs: u64,
    /// The most idempotency keys remembered; the oldest are forgotten first. Default 100000.
    pub dedupe_max_keys: usize,
    /// What a failing script does with the message: `"drop"` (default) or `"pass"`.
    pub on_error: OnError,
    /// Reload a script when its file changes (SIGHUP reloads in any case). Default `true`.
    pub watch: bool,
    /// The sandbox limits of every script.
    pub limits: ScriptLimits,
    /// The moderation chain, run in order on every message.
    pub scripts: Vec<ScriptConfig>,
    /// Threads that run the chain, each with its own copy of it (see [`crate::workers`]).
    /// Default 1: the chain runs on the broker's task. More when the chain is the bottleneck
    /// and there are cores to spare: one sender's messages stay in order, and per-sender
    /// script state (a rate limit) stays exact; state shared by all senders is per thread.
    pub script_workers: usize,
    /// Data source of the snapshot socket, a ROUTER bind (e.g. `"zmq_broker_snapshot"` =
    /// `"zmq-bind://ROUTER@127.0.0.1:7000"`): the broker keeps the recent history and web nodes
    /// (`event.snapshot`) fill theirs from it when they start or reconnect, so a restarted node
    /// replays what its browsers missed. Default: none (no history kept here).
    pub snapshot: Option<String>,
    /// Messages kept per room for snapshots. Default 1000 (as `event.history_size`).
    pub history_size: usize,
    /// Bytes of messages kept for snapshots over all rooms; the oldest go first. Default
    /// 67108864 (64 MiB).
    pub history_bytes: usize,
    /// Seconds a message is kept for snapshots. Default 3600 (as `event.history_ttl_secs`).
    pub history_ttl_secs: u64,
    /// Data source of the SUB socket to the other broker of a pair (its `broker.pub`), e.g.
    /// `"zmq_broker_peer"` = `"zmq://SUB@10.0.0.2:5001"`: two brokers, one active, the other a
    /// live copy that takes over when the active one is gone (see the README, "Two brokers").
    /// Needs `broker.snapshot` and `broker.peer_snapshot`. Default: none (one broker).
    pub peer: Option<String>,
    /// Data source of the DEALER socket to the peer's `broker.snapshot`, from which a backup
    /// copies the history and fills what it missed. Default: none.
    pub peer_snapshot: Option<String>,
    /// Milliseconds without a heartbeat (sent every 100) after which a broker of a pair is
    /// taken for gone, by its peer and by web nodes (each heartbeat says it): the failover
    /// time. Default 1000; at least 300. Shorter fails over sooner, also from a broker that
    /// only stalled that long (it then steps down: nothing is lost either way).
    pub peer_timeout_ms: u64,
    /// The chain as validation compiled it, for the start-up that follows.
    #[serde(skip)]
    pub compiled: Compiled,
}

fn default_dedupe_window() -> u64 {
    DEFAULT_DEDUPE_WINDOW_SECS
}

fn default_pull() -> String {
    DEFAULT_BROKER_PULL.to_owned()
}
fn default_max_frame_bytes() -> usize {
    DEFAULT_MAX_FRAME_BYTES
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            embedded: true,
            http: None,
            pull: default_pull(),
            publish: DEFAULT_BROKER_PUB.to_owned(),
            max_frame_bytes: default_max_frame_bytes(),
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            notify_rejections: true,
            dedupe_window_secs: default_dedupe_window(),
            dedupe_max_keys: DEFAULT_DEDUPE_MAX_KEYS,
            on_error: OnError::default(),
            watch: true,
            limits: ScriptLimits::default(),
            scripts: Vec::new(),
            script_workers: 1,
            snapshot: None,
            history_size: DEFAULT_ARCHIVE_SIZE,
            history_bytes: DEFAULT_ARCHIVE_BYTES,
            history_ttl_secs: DEFAULT_ARCHIVE_TTL_SECS,
            peer: None,
            peer_snapshot: None,
            peer_timeout_ms: crate::failover::DEAD_AFTER.as_millis() as u64,
            compiled: Compiled::default(),
        }
    }
}

impl BrokerConfig {
    /// The chain's specs, in order, paths resolved against `root`.
    pub fn script_specs(&self, root: &Root) -> Vec<ScriptSpec> {
        ScriptSpec::chain(&self.scripts, self.limits, self.on_error, root)
    }

    /// Checks the section and compiles the chain (once: the broker built next takes it),
    /// reporting each script that does not compile under its own key.
    pub fn validate(&self, root: &Root, problem: &mut impl FnMut(&str, String)) {
        if self.max_frame_bytes == 0 {
            problem(
                "broker.max_frame_bytes",
                "is 0: must be at least 1".to_owned(),
            );
        }
        if self.subscriber_queue < 2 {
            problem(
                "broker.subscriber_queue",
                format!("is {}: must be at least 2", self.subscriber_queue),
            );
        }
        if self.snapshot.is_some() && self.history_bytes == 0 {
            problem(
                "broker.history_bytes",
                "is 0: must be at least 1 when `broker.snapshot` is set".to_owned(),
            );
        }
        match (&self.peer, &self.peer_snapshot, &self.snapshot) {
            (Some(_), None, _) => problem(
                "broker.peer_snapshot",
                "is not set: a broker with `broker.peer` copies its peer's history from the \
                 peer's `broker.snapshot`; name a DEALER connect to it"
                    .to_owned(),
            ),
            (None, Some(_), _) => problem(
                "broker.peer_snapshot",
                "is set without `broker.peer`: it only serves a pair of brokers".to_owned(),
            ),
            (Some(_), Some(_), None) => problem(
                "broker.snapshot",
                "is not set: a broker with `broker.peer` keeps the history (its peer and the \
                 web nodes fetch it); name a ROUTER bind"
                    .to_owned(),
            ),
            _ => {}
        }
        let min = crate::failover::MIN_DEAD_AFTER.as_millis() as u64;
        if self.peer_timeout_ms < min {
            problem(
                "broker.peer_timeout_ms",
                format!(
                    "is {}: must be at least {min} (three heartbeats, sent every 100 ms)",
                    self.peer_timeout_ms
                ),
            );
        }
        if !(1..=crate::workers::MAX_WORKERS).contains(&self.script_workers) {
            problem(
                "broker.script_workers",
                format!(
                    "is {}: must be from 1 to {}",
                    self.script_workers,
                    crate::workers::MAX_WORKERS
                ),
            );
        }
        crate::script::validate_limits(&self.limits, problem);
        let specs = self.script_specs(root);
        match crate::script::compile(&specs) {
            Ok(scripts) => self.compiled.put(scripts),
            Err(errors) => {
                for (index, error) in errors {
                    // Named by position (the key) and by name (what logs and metrics say).
                    let key = format!("broker.scripts[{index}] ({})", specs[index].name);
                    problem(&key, error.to_string());
                }
            }
        }
    }

    /// Binds PUB first (so nothing read is published into the void), then PULL, with the
    /// chain validation compiled (or compiled now); `source` is where SIGHUP reads the chain
    /// again.
    pub async fn build(
        &self,
        ctx: &mut Context,
        source: Option<ChainSource>,
    ) -> Result<Parts, BrokerError> {
        let specs = self.script_specs(&ctx.root);
        let scripts = match self.compiled.take() {
            Some(scripts) => scripts,
            None => crate::script::compile(&specs)
                .map_err(|mut errors| BrokerError::Script(errors.remove(0).1))?,
        };
        // With workers, one copy of the chain per thread (each runs its scripts' `init()`).
        let (chain, workers, verdicts) = if !scripts.is_empty() && self.script_workers > 1 {
            let mut chains = vec![Chain::new(scripts, ctx.metrics.clone())];
            for _ in 1..self.script_workers {
                let copy = crate::script::compile(&specs)
                    .map_err(|mut errors| BrokerError::Script(errors.remove(0).1))?;
                chains.push(Chain::new(copy, ctx.metrics.clone()));
            }
            let (workers, verdicts) = Workers::start(chains);
            let chain = Chain::new(Vec::new(), ctx.metrics.clone());
            (chain, Some(workers), Some(verdicts))
        } else {
            (Chain::new(scripts, ctx.metrics.clone()), None, None)
        };
        let copies = workers.as_ref().map_or(1, Workers::len);
        let (reloader, reloads, reload) =
            Reloader::new(specs, source, self.watch, ctx.metrics.clone());
        let chain_status = Arc::new(crate::script::ChainStatus::default());
        let reloader = reloader.copies(copies).status(chain_status.clone());
        let limit = self.max_frame_bytes;
        let metrics = ctx.metrics.clone();
        let mut options = socket::options(limit);
        options.send_queue_capacity(Some(self.subscriber_queue));
        let mut publish = PubSocket::with_options(options);
        let pub_events = publish.monitor();
        let dsn = ctx.dsn(&self.publish)?.clone();
        socket::bind(&mut publish, &dsn, &mut ctx.addresses).await?;
        let mut pull = PullSocket::with_options(socket::options(limit));
        let pull_events = pull.monitor();
        let dsn = ctx.dsn(&self.pull)?.clone();
        socket::bind(&mut pull, &dsn, &mut ctx.addresses).await?;
        let counter = |events, key: &str| -> PeerCounter {
            let labels = SocketLabels {
                socket: key.to_owned(),
            };
            let peers = metrics.zmq_peers.get_or_create(&labels).clone();
            let refused = metrics.zmq_refused.get_or_create(&labels).clone();
            Box::new(move |shutdown| {
                Box::pin(socket::count_peers(events, peers, refused, shutdown))
            })
        };
        let mut peer_counters = vec![
            counter(pub_events, "broker.pub"),
            counter(pull_events, "broker.pull"),
        ];
        let mut stamper = Stamper::with_dedupe(
            limit,
            std::time::Duration::from_secs(self.dedupe_window_secs),
            self.dedupe_max_keys,
        );
        // A pair: published frames keep their idempotency key, for the backup.
        stamper.publish_keys = self.peer.is_some();
        let snapshot = match &self.snapshot {
            None => None,
            Some(name) => {
                // A request is one small frame: nothing larger is read.
                let mut router = snapshot::router(4096);
                let events = router.monitor();
                let dsn = ctx.dsn(name)?.clone();
                socket::bind(&mut router, &dsn, &mut ctx.addresses).await?;
                peer_counters.push(counter(events, "broker.snapshot"));
                let archive = Archive::new(Limits {
                    per_room: self.history_size,
                    bytes: self.history_bytes,
                    ttl: std::time::Duration::from_secs(self.history_ttl_secs),
                });
                Some(SnapshotServer {
                    router,
                    archive: Arc::new(Mutex::new(archive)),
                })
            }
        };
        let mut pair_tasks: Vec<PeerCounter> = Vec::new();
        let pair_status = tokio::sync::watch::Sender::new(serde_json::Value::Null);
        let pair = match (&self.peer, &self.peer_snapshot) {
            (Some(peer), Some(peer_snapshot)) => {
                let max = max_published_bytes(limit);
                let sub = ctx.addresses.targets(ctx.dsn(peer)?);
                let dealer = ctx.addresses.targets(ctx.dsn(peer_snapshot)?);
                let (tx, frames) = tokio::sync::mpsc::channel(1024);
                // A broker starts as a backup: it wants every frame of its peer.
                let everything = tokio::sync::watch::Sender::new(true);
                let wants = everything.subscribe();
                pair_tasks.push(Box::new(move |shutdown| {
                    Box::pin(crate::failover::run_peer_sub(sub, max, tx, wants, shutdown))
                }));
                let (request_tx, request_rx) = tokio::sync::mpsc::channel(4);
                let (reply_tx, replies) = tokio::sync::mpsc::channel(16);
                let targets = tokio::sync::watch::Sender::new(dealer);
                pair_tasks.push(Box::new(move |shutdown| {
                    Box::pin(snapshot::run_client(
                        targets.subscribe(),
                        max,
                        request_rx,
                        reply_tx,
                        shutdown,
                    ))
                }));
                metrics.broker_active.set(0);
                Some(PairLink {
                    state: Pair::new(
                        tokio::time::Instant::now(),
                        std::time::Duration::from_millis(self.peer_timeout_ms),
                    ),
                    frames: Some(frames),
                    requests: request_tx,
                    replies: Some(replies),
                    sync: None,
                    asked: 0,
                    status: pair_status.clone(),
                    everything,
                })
            }
            _ => None,
        };
        let paired = pair.is_some();
        let run = stamper.run;
        let relay = Relay {
            pair,
            hub: None,
            publish,
            stamper,
            archive: snapshot.as_ref().map(|server| server.archive.clone()),
            chain,
            workers,
            notify_rejections: self.notify_rejections,
            max_published: max_published_bytes(limit),
            max_subscriber_lag: self.subscriber_queue / 2,
            outbox: Vec::new(),
            batching: false,
            inline_until: 0,
            metrics,
        };
        let broker = Broker {
            relay: Arc::new(tokio::sync::Mutex::new(relay)),
            pull,
            reloads,
            verdicts,
            local: None,
            run,
        };
        let pair_status = paired.then(|| pair_status.subscribe());
        Ok(Parts {
            chain_status,
            broker,
            pair_tasks,
            pair_status,
            reloader,
            reload,
            peer_counters,
            snapshot,
        })
    }
}

/// The running broker: its PULL socket, the other inputs its task waits on, and the [`Relay`]
/// that stamps and publishes.
///
/// The relay is behind a lock: the broker's task holds it while it handles one input (a turn
/// of PULL, a reload, a heartbeat…), and, with the embedded broker serving the web node of its
/// own process, a POST of that node takes it to publish its message on its own task when the
/// relay is free ([`Inline`]).
pub struct Broker {
    relay: Arc<tokio::sync::Mutex<Relay>>,
    pull: PullSocket,
    reloads: tokio::sync::mpsc::Receiver<Reload>,
    /// With `broker.script_workers` > 1: the chain's verdicts.
    verdicts: Option<tokio::sync::mpsc::UnboundedReceiver<Done>>,
    /// The web node of the same process: its frames that did not publish themselves (see
    /// [`Broker::serve_locally`]).
    local: Option<tokio::sync::mpsc::Receiver<crate::wire::Outgoing>>,
    /// The run it starts with.
    run: u64,
}

/// What stamps and publishes: PUB, the stamper, the archive, the chain, the pair's state.
struct Relay {
    /// With `broker.peer`: the pair's state and the channels to the peer's sockets' tasks.
    pair: Option<PairLink>,
    /// The hub of the web node of the same process (`temma serve` with the embedded broker,
    /// its sockets pointed at it): every frame published goes to it too, instead of over
    /// loopback to its SUB socket.
    hub: Option<crate::hub::Hub>,
    publish: PubSocket,
    stamper: Stamper,
    /// What was published, for snapshots (with `broker.snapshot`).
    archive: Option<Arc<Mutex<Archive>>>,
    /// The chain, run on the broker's task (empty without scripts, or with workers).
    chain: Chain,
    /// With `broker.script_workers` > 1: the threads that run the chain.
    workers: Option<Workers>,
    notify_rejections: bool,
    /// The largest frame published; scripts that make a message larger get it dropped.
    max_published: usize,
    /// A subscriber of PUB this many messages behind that still reads is waited for (half
    /// `broker.subscriber_queue`).
    max_subscriber_lag: usize,
    /// While a turn of PULL is relayed (see [`Broker::run`]): what it publishes, handed to
    /// PUB together at the turn's end (zeromq patch 15).
    outbox: Vec<ZmqMessage>,
    batching: bool,
    /// A POST of the web node of this process may publish its message itself ([`Inline`])
    /// while the stamper's sequence number is below this; 0: it may not (scripts to run, a
    /// web node far behind, the broker stopped). The broker's task sets it after each input,
    /// at its next look at the subscribers' queues: a message past it goes through the
    /// broker's task, which looks.
    inline_until: u64,
    metrics: Arc<Metrics>,
}

/// A broker's link to its peer (`broker.peer`).
struct PairLink {
    state: Pair,
    /// From the task that owns the SUB socket to the peer (taken by [`Broker::run`]).
    frames: Option<tokio::sync::mpsc::Receiver<PeerFrame>>,
    /// To and from the task that owns the DEALER socket to the peer's snapshots.
    requests: tokio::sync::mpsc::Sender<snapshot::Request>,
    replies: Option<tokio::sync::mpsc::Receiver<Reply>>,
    /// The peer's snapshot awaited.
    sync: Option<PeerSync>,
    /// Requests sent.
    asked: u64,
    /// What `/health` says of the pair, updated with each heartbeat.
    status: tokio::sync::watch::Sender<serde_json::Value>,
    /// Whether the peer SUB socket takes every frame (a backup) or only heartbeats (active).
    everything: tokio::sync::watch::Sender<bool>,
}

/// Snapshots asked for in a row, each answered by live frames with a gap still, before the
/// gap is taken as it is.
const MAX_SYNC_TRIES: u32 = 3;
/// Live frames kept while the peer's snapshot is awaited, at most (in bytes): past that they
/// are dropped, and the gap they leave fetched next.
const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// A snapshot from the peer awaited.
struct PeerSync {
    n: u64,
    kept: Vec<Bytes>,
    bytes: usize,
    tries: u32,
    deadline: tokio::time::Instant,
}

impl PeerSync {
    fn keep(&mut self, frame: Bytes) {
        if self.bytes + frame.len() <= MAX_KEPT_BYTES {
            self.bytes += frame.len();
            self.kept.push(frame);
        }
    }
}

/// A published message's id and room (as written; `None`: the default room), read at once;
/// `None` for a frame that is not a message.
fn id_and_room(frame: &[u8]) -> Option<(MsgId, Option<String>, Option<String>)> {
    let head = serde_json::from_slice::<Envelope<'_>>(frame).ok()?;
    let id = head.id()?;
    let room = head
        .room
        .map(|raw| plain_str(raw).unwrap_or(raw.get()).to_owned());
    let key = head.key.and_then(plain_str).map(str::to_owned);
    Some((id, room, key))
}

/// A following backup publishes its heartbeat every [`crate::failover::BEAT_INTERVAL`], and
/// once every this many messages it copies (so that the active broker hears how far it holds
/// well within [`crate::failover::MAX_BACKUP_LAG`]).
const BEAT_EVERY: u64 = 4096;

/// Messages the relay reads on from PULL, when they are ready, before it looks at its other
/// inputs again: the zeromq crate's fair queue gives a lone ready peer turns of 64.
const READ_ON: usize = 64;

/// Default `broker.subscriber_queue`: messages the PUB socket keeps for each subscriber (the
/// zeromq crate's own default). A subscriber (a web node) half that far behind that is still
/// taking them has the broker stop reading until it is not: a burst waits for the slowest web
/// node that reads, as a TCP sender waits for its reader, and the senders' queues hold the
/// rest.
pub const DEFAULT_SUBSCRIBER_QUEUE: usize = 100_000;

/// A subscriber whose queue's writer took nothing for this long (gone, or not reading) is not
/// waited for: its queue overflows, and it fetches what it missed (`event.snapshot`) or
/// resets its clients.
pub const SUBSCRIBER_PROGRESS: std::time::Duration = std::time::Duration::from_secs(2);

/// The subscribers' queues are looked at once every this many messages published (or a
/// quarter of the lag waited for, if less), and every [`LAG_RECHECK`] while the broker waits
/// for one.
const LAG_CHECK_EVERY: u64 = 1024;
const LAG_RECHECK: std::time::Duration = std::time::Duration::from_millis(1);

/// What `recv` (a channel's `recv()`) gives, or waits forever without a channel.
async fn recv_some<T>(recv: Option<impl std::future::Future<Output = Option<T>>>) -> Option<T> {
    match recv {
        Some(recv) => recv.await,
        None => std::future::pending().await,
    }
}

/// What [`BrokerConfig::build`] makes: the broker, and the reloader of its scripts with a
/// handle to ask for a reload (SIGHUP).
pub struct Parts {
    pub broker: Broker,
    /// The chain as the console shows it.
    pub chain_status: Arc<crate::script::ChainStatus>,
    /// With `broker.peer`: the tasks that own the sockets to the peer (given the shutdown
    /// token).
    pub pair_tasks: Vec<PeerCounter>,
    /// With `broker.peer`: what this broker is in its pair, for `/health`.
    pub pair_status: Option<tokio::sync::watch::Receiver<serde_json::Value>>,
    pub reloader: Reloader,
    pub reload: ReloadHandle,
    /// Tasks that count the peers of the broker's sockets (`temma_zmq_peers`), given the
    /// shutdown token.
    pub peer_counters: Vec<PeerCounter>,
    /// The snapshot socket and the archive it answers from (with `broker.snapshot`).
    pub snapshot: Option<SnapshotServer>,
}

/// The broker's snapshot socket, bound, and the archive the broker fills.
pub struct SnapshotServer {
    pub router: zeromq::RouterSocket,
    pub archive: Arc<Mutex<Archive>>,
}

impl SnapshotServer {
    /// Answers snapshot requests until shutdown.
    pub async fn run(self, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        snapshot::serve(self.router, self.archive, metrics, shutdown).await;
    }
}

/// Starts a task counting one socket's peers until shutdown.
pub type PeerCounter = Box<
    dyn FnOnce(CancellationToken) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

/// When the broker's task looks at its subscribers' queues ([`Relay::lagging`]).
struct LagCheck {
    /// A web node far behind and still reading: the broker waits for it (the timer, armed
    /// then, looks again).
    lagging: bool,
    every: u64,
    /// At this sequence number.
    next: u64,
}

/// What the broker's task waits for.
enum Input {
    Reload(Reload),
    Verdict(Done),
    Beat,
    Peer(PeerFrame),
    PeerReply(Reply),
    LagRecheck,
    Local(crate::wire::Outgoing),
    Pull(zeromq::ZmqResult<ZmqMessage>),
}

/// A web node's way to the embedded broker of its own process: a POST publishes its message on
/// its own task when the broker's relay is free ([`Inline::desk`]); otherwise its frame goes
/// to the broker's task, in the queue.
#[derive(Clone)]
pub struct Inline(std::sync::Weak<tokio::sync::Mutex<Relay>>);

/// The broker's relay, held by a POST of the web node of its process; see
/// [`Desk::publish`].
pub struct Desk(tokio::sync::OwnedMutexGuard<Relay>);

impl Inline {
    /// The relay, if the broker runs, is not handling an input (a turn of PULL…), and may
    /// publish a POST's message to `room` now: no scripts to run, no web node far behind, not
    /// yet the message at which the broker looks at its subscribers' queues again, a room of
    /// at most one writer shard's worth of clients here (`Hub::is_small_room`). Never waits.
    pub fn desk(&self, room: &str) -> Option<Desk> {
        let relay = self.0.upgrade()?.try_lock_owned().ok()?;
        let free = relay.stamper.seq < relay.inline_until
            && relay
                .hub
                .as_ref()
                .is_some_and(|hub| hub.is_small_room(room));
        free.then_some(Desk(relay))
    }
}

impl Desk {
    /// Publishes a frame the web node of this process wrote (`message::Wire::write`, without
    /// a `ref`: nobody needs to tell this POST), laid out as `layout`: stamped, archived, sent
    /// on PUB and handed to the node's hub, as the broker's task does it. Its id, or, for an
    /// idempotency key published already, that message's id; why it was dropped otherwise
    /// (counted).
    pub fn publish(mut self, frame: &[u8], layout: &Layout) -> Result<MsgId, DropReason> {
        let relay = &mut *self.0;
        let stamped = relay.stamper.stamp_laid_out(frame, layout);
        let outcome = match &stamped {
            Ok(Stamped::Duplicate { id, .. }) => Ok(*id),
            Err(reason) => Err(*reason),
            // Stamped: the id it took.
            Ok(_) => Ok(relay.stamper.last_id()),
        };
        // As the broker's task takes its node's frames (`Relay::local_frame`): a duplicate
        // and a refusal counted, and nothing published for them (no `ref` to tell).
        if let Handled::Publish(out, known) =
            relay.stamped(stamped, frame, VecDeque::with_capacity(1))
        {
            relay.publish(out, known);
            relay.metrics.broker_inline.inc();
        }
        outcome
    }
}

impl Broker {
    /// Serves the web node of this process in the process: what is published is handed to
    /// `hub` too, and the node's POSTs publish on their own task when they can (the
    /// [`Inline`] returned), otherwise through `frames` (the queue its PUSH socket's task
    /// would have read). Other web nodes still use PULL and PUB. Not for a broker of a pair.
    pub fn serve_locally(
        &mut self,
        frames: tokio::sync::mpsc::Receiver<crate::wire::Outgoing>,
        hub: crate::hub::Hub,
    ) -> Inline {
        self.local = Some(frames);
        let mut relay = self
            .relay
            .try_lock()
            .expect("the broker is not running yet");
        relay.metrics.sub_connected.inc();
        relay.hub = Some(hub);
        drop(relay);
        Inline(Arc::downgrade(&self.relay))
    }

    /// This run's id: the first part of every id it stamps (until a takeover starts another).
    pub fn run_id(&self) -> u64 {
        self.run
    }

    /// Relays until `shutdown` fires. A message already read is always published first.
    ///
    /// With `broker.peer`, the same task also reads the peer's frames and snapshot answers, and
    /// publishes the heartbeat (see [`crate::failover`]): all that goes out of PUB goes from
    /// here, in order.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let relay = &self.relay;
        // Registered once: a new `cancelled()` per message would lock the token each time.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut beats = tokio::time::interval(crate::failover::BEAT_INTERVAL);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut local = self.local.take();
        let mut verdicts = self.verdicts.take();
        let lag_timer = tokio::time::sleep(LAG_RECHECK);
        tokio::pin!(lag_timer);
        let (mut peer_frames, mut peer_replies, paired, mut lag, mut hold) = {
            let mut relay = relay.lock().await;
            // The start-up line is the app's ("broker running", or the web node's "listening on").
            tracing::debug!(
                run = relay.stamper.run,
                scripts = relay.chain.len(),
                "broker relaying"
            );
            let pair = relay.pair.as_mut();
            let paired = pair.is_some();
            let pair = pair.map(|pair| (pair.frames.take(), pair.replies.take()));
            let (frames, replies) = pair.unwrap_or_default();
            let every = LAG_CHECK_EVERY
                .min(relay.max_subscriber_lag as u64 / 4)
                .max(1);
            let mut lag = LagCheck {
                lagging: false,
                every,
                next: every,
            };
            let hold = relay.pace(&mut lag, lag_timer.as_mut());
            (frames, replies, paired, lag, hold)
        };
        loop {
            let input = tokio::select! {
                biased;
                () = &mut cancelled => break,
                // Between two messages: none is dropped or reordered by a reload.
                Some(reload) = self.reloads.recv() => Input::Reload(reload),
                // What the chain's workers passed goes out before more is read.
                Some(done) = recv_some(verdicts.as_mut().map(|rx| rx.recv())) => Input::Verdict(done),
                _ = beats.tick(), if paired => Input::Beat,
                Some(frame) = recv_some(peer_frames.as_mut().map(|rx| rx.recv())) => Input::Peer(frame),
                Some(reply) = recv_some(peer_replies.as_mut().map(|rx| rx.recv())) => Input::PeerReply(reply),
                () = &mut lag_timer, if lag.lagging => Input::LagRecheck,
                Some(item) = recv_some(local.as_mut().map(|rx| rx.recv())), if !lag.lagging => Input::Local(item),
                received = self.pull.recv(), if !hold => Input::Pull(received),
            };
            let mut relay = relay.lock().await;
            match input {
                Input::Reload(reload) => match &relay.workers {
                    Some(workers) => workers.reload(reload).await,
                    None => relay.chain.apply(reload),
                },
                Input::Verdict(done) => {
                    if let Some(out) = relay.finish(done) {
                        relay.deliver(out, None).await;
                    }
                }
                Input::Beat => relay.tick().await,
                Input::Peer(frame) => relay.peer_frame(frame).await,
                Input::PeerReply(reply) => relay.snapshot_reply(reply).await,
                Input::LagRecheck => lag.lagging = relay.lagging(lag_timer.as_mut()),
                Input::Local(item) => relay.local_frame(item).await,
                Input::Pull(received) => {
                    // One clock reading for the turn: the messages read together are stamped
                    // with the time they were read (a turn is up to READ_ON messages, tens of
                    // µs); the clock was a sixteenth of the broker's CPU per message when it
                    // only relays.
                    relay.stamper.time = Some(now_ms());
                    // What PULL has ready now is relayed without the other branches' polls
                    // (their wakers and checks were a tenth of the broker's CPU when it only
                    // relays, see BENCHMARKS.md): up to a turn of the crate's fair queue, taken
                    // from memory (`try_recv`, zeromq patch 12), which still spends the task's
                    // cooperative budget; and what the turn publishes goes to PUB at its end,
                    // together (no await in between holds it; nor can a POST of this process
                    // publish meanwhile: the turn holds the relay). Not for a pair (its hold
                    // and heartbeat are checked per message) nor with the chain's workers
                    // (their verdicts go out before more is read).
                    let turn = !paired && verdicts.is_none();
                    relay.batching = turn;
                    relay.relay(received).await;
                    if turn {
                        for _ in 1..READ_ON {
                            match self.pull.try_recv() {
                                Some(received) => relay.relay(received).await,
                                None => break,
                            }
                        }
                    }
                    relay.batching = false;
                    relay.send_outbox();
                    relay.stamper.time = None;
                }
            }
            hold = relay.pace(&mut lag, lag_timer.as_mut());
        }
        relay.lock().await.inline_until = 0;
        tracing::info!("broker stopped");
    }
}

impl Relay {
    /// Whether a subscriber of PUB that is still reading is more than half
    /// `broker.subscriber_queue` behind (zeromq patch 14); if so, `recheck` is armed to look
    /// again in [`LAG_RECHECK`].
    fn lagging(&self, recheck: std::pin::Pin<&mut tokio::time::Sleep>) -> bool {
        let fullest = self.publish.fullest_draining_queue(SUBSCRIBER_PROGRESS);
        let lagging = fullest > self.max_subscriber_lag;
        if lagging {
            recheck.reset(tokio::time::Instant::now() + LAG_RECHECK);
            crate::throttled!(
                tracing::Level::INFO,
                queued = fullest,
                "a subscriber of PUB is far behind: the broker waits for it"
            );
        }
        lagging
    }

    /// One message read from PULL (or the error reading it).
    async fn relay(&mut self, received: zeromq::ZmqResult<ZmqMessage>) {
        let message = match received {
            Ok(message) => message,
            Err(error) => {
                // A peer that breaks the protocol is disconnected by the crate; the others
                // go on.
                crate::throttled!(tracing::Level::WARN, %error, "broker input error; peer dropped");
                return;
            }
        };
        if let Some(pair) = &self.pair
            && pair.state.role == Role::Backup
        {
            if pair.state.may_take_over(tokio::time::Instant::now()) {
                // A web node pushes here: it no longer hears the active broker either.
                self.take_over().await;
            } else {
                self.metrics.dropped(DropReason::Standby);
                return;
            }
        }
        match self.handle(message) {
            Handled::Publish(out, known) => self.deliver(out, known).await,
            Handled::Submit(job) => self.submit(job).await,
            Handled::Nothing => {}
        }
    }

    /// A frame from the web node of this process.
    async fn local_frame(&mut self, item: crate::wire::Outgoing) {
        if tokio::time::Instant::now() >= item.deadline {
            if !item.report {
                self.metrics.dropped(DropReason::Expired);
            }
            return;
        }
        if let Some(sent) = item.sent {
            let _ = sent.send(());
        }
        let handled = match &item.layout {
            // Written by this process's web node: stamped without scanning it again.
            Some(layout) if !self.scripted() => {
                let stamped = self.stamper.stamp_laid_out(&item.frame, layout);
                self.stamped(stamped, &item.frame, VecDeque::with_capacity(1))
            }
            _ => self.handle(ZmqMessage::from(item.frame)),
        };
        match handled {
            Handled::Publish(out, known) => self.publish(out, known),
            Handled::Submit(job) => self.submit(job).await,
            Handled::Nothing => {}
        }
    }

    /// A message for the chain's workers (their verdict comes back on `verdicts`).
    async fn submit(&self, job: Job) {
        if let Some(workers) = &self.workers {
            workers.submit(job).await;
        }
    }

    /// Publishes what [`Broker::handle`] or [`Broker::finish`] made; with a pair, the
    /// heartbeat that says the backup holds it all, when it now does.
    async fn deliver(&mut self, out: ZmqMessage, known: Option<Known>) {
        self.publish(out, known);
        if let Some(pair) = &mut self.pair
            && pair
                .state
                .check_backup(self.stamper.seq, tokio::time::Instant::now())
        {
            self.beat().await;
        }
    }

    /// Publishes a frame the broker made: on PUB, and to the hub of this process.
    /// `known`: what the stamper's fast path knows of the frame, so that the hub of this
    /// process need not read it again.
    fn publish(&mut self, out: ZmqMessage, known: Option<Known>) {
        let frame = self.hub.is_some().then(|| out.get(0).cloned()).flatten();
        self.send(out);
        if let (Some(hub), Some(frame)) = (&self.hub, frame) {
            match known {
                Some(known) => hub.ingest_known(&frame, &known),
                None => hub.ingest(&frame),
            }
        }
    }

    /// Hands a frame to PUB, which does not wait: a subscriber whose queue (the crate's
    /// 100 000 messages) is full misses it. `send_now` (zeromq patch 11): no future a message.
    /// During a turn of PULL, the frame waits in the outbox for the turn's end.
    fn send(&mut self, out: ZmqMessage) {
        if self.batching {
            if self.outbox.capacity() == 0 {
                self.outbox.reserve_exact(READ_ON);
            }
            self.outbox.push(out);
        } else if let Err(error) = self.publish.send_now(out) {
            tracing::error!(%error, "broker could not publish a message");
        }
    }

    /// Hands the frames of a turn to PUB, in order: each subscriber's share of them in one
    /// item of its queue (`send_batch_now`, zeromq patch 15) — a lock, a count, a queue node
    /// and a wake-up of its writer a turn instead of a message. A lone frame (a light load's
    /// turn) goes as [`Broker::send`] sends it, and the outbox keeps its room.
    fn send_outbox(&mut self) {
        let sent = match self.outbox.len() {
            0 => return,
            1 => {
                let out = self.outbox.pop().expect("one frame");
                self.publish.send_now(out)
            }
            _ => self
                .publish
                .send_batch_now(std::mem::take(&mut self.outbox)),
        };
        if let Err(error) = sent {
            tracing::error!(%error, "broker could not publish a message");
        }
    }

    /// Publishes this broker's heartbeat.
    async fn beat(&mut self) {
        let Some(pair) = &self.pair else { return };
        let seq = match pair.state.role {
            Role::Active => self.stamper.seq,
            Role::Backup => {
                let run = pair
                    .state
                    .peer(tokio::time::Instant::now())
                    .and_then(|beat| beat.run.parse().ok());
                run.and_then(|run| self.mark(run)).unwrap_or(0)
            }
        };
        let beat = pair.state.beat(self.stamper.run, seq);
        let now = tokio::time::Instant::now();
        pair.status.send_replace(serde_json::json!({
            "state": beat.state.as_str(),
            "term": beat.term,
            "run": beat.run,
            "seq": beat.seq,
            "backup_confirmed": beat.backup,
            "following": beat.following,
            "peer": pair.state.peer(now).map(|peer| serde_json::json!({
                "state": peer.state.as_str(),
                "term": peer.term,
                "run": peer.run,
            })),
        }));
        self.send(ZmqMessage::from(beat.frame()));
    }

    /// Every [`crate::failover::BEAT_INTERVAL`]: the heartbeat, the backup's state, a snapshot
    /// that took too long.
    async fn tick(&mut self) {
        let now = tokio::time::Instant::now();
        let seq = self.stamper.seq;
        let Some(pair) = &mut self.pair else { return };
        pair.state.check_backup(seq, now);
        self.metrics
            .broker_active
            .set(i64::from(pair.state.role == Role::Active));
        if let Some(sync) = &pair.sync
            && now >= sync.deadline
        {
            tracing::warn!("the peer's snapshot did not come in time; asking again");
            let kept = pair.sync.take().map(|sync| sync.kept).unwrap_or_default();
            self.ask_peer(kept);
        }
        self.beat().await;
    }

    /// Becomes the active broker: a new run (ids never collide with the peer's) and term.
    async fn take_over(&mut self) {
        let Some(pair) = &mut self.pair else { return };
        pair.state.take_over();
        pair.sync = None;
        pair.everything.send_replace(false);
        let term = pair.state.term;
        let archive = self.archive.clone();
        self.stamper.restart(|run| {
            archive
                .as_ref()
                .is_some_and(|archive| crate::error::lock(archive).mark(run).is_some())
        });
        self.metrics.broker_active.set(1);
        self.metrics
            .role_changed(crate::metrics::RoleChange::Active);
        tracing::warn!(
            term,
            run = self.stamper.run,
            "no active broker heard and a web node pushes here: this broker is now the active one"
        );
        self.beat().await;
    }

    /// A frame from the peer's PUB socket.
    async fn peer_frame(&mut self, frame: PeerFrame) {
        let now = tokio::time::Instant::now();
        let run = self.stamper.run;
        let seq = self.stamper.seq;
        let Some(pair) = &mut self.pair else { return };
        let frame = match frame {
            PeerFrame::Connected => {
                if pair.state.role == Role::Backup {
                    self.ask_peer(Vec::new());
                }
                return;
            }
            PeerFrame::Frame(frame) => frame,
        };
        if let Some(beat) = Beat::read(&frame) {
            if pair.state.heard(beat, run, now) {
                self.step_down().await;
                return;
            }
            if pair.state.check_backup(seq, now) {
                self.beat().await;
            }
            return;
        }
        if pair.state.role == Role::Active {
            // The backup's copy of what this broker published: its heartbeat says how far it
            // holds.
            return;
        }
        if let Some(sync) = &mut pair.sync {
            sync.keep(frame);
            return;
        }
        self.copy(vec![frame], 0).await;
    }

    /// Backup: takes the active broker's frames in order into the archive and out on PUB, until
    /// one leaves a gap: then the peer's snapshot is asked for and the rest wait for it. After
    /// [`MAX_SYNC_TRIES`] in a row, the gap is taken as it is.
    async fn copy(&mut self, frames: Vec<Bytes>, tries: u32) {
        let mut frames = frames.into_iter();
        while let Some(frame) = frames.next() {
            let Some((id, room, key)) = id_and_room(&frame) else {
                // Not a message (presence reports, notices for POSTs): passed on.
                if self.pair.as_ref().is_some_and(|pair| pair.state.following) {
                    self.send(ZmqMessage::from(frame));
                }
                continue;
            };
            let next = match self.mark(id.run) {
                Some(mark) if id.seq <= mark => continue,
                Some(mark) => id.seq == mark + 1,
                None => id.seq == 1,
            };
            if !next && tries < MAX_SYNC_TRIES {
                let mut kept = vec![frame];
                kept.extend(frames);
                self.ask_peer(kept);
                if let Some(sync) = self.pair.as_mut().and_then(|pair| pair.sync.as_mut()) {
                    sync.tries = tries + 1;
                }
                return;
            }
            self.keep(id, room.as_deref(), key.as_deref(), frame).await;
        }
    }

    /// The highest sequence number of `run` the archive took.
    fn mark(&self, run: u64) -> Option<u64> {
        self.archive
            .as_ref()
            .and_then(|archive| crate::error::lock(archive).mark(run))
    }

    /// Takes a frame copied from the peer: its key remembered, archived, and, once following,
    /// published (web nodes that read this backup need it).
    async fn keep(&mut self, id: MsgId, room: Option<&str>, key: Option<&str>, frame: Bytes) {
        if let Some(key) = key {
            self.stamper.remember(key, id);
        }
        if let Some(archive) = &self.archive {
            let mut archive = crate::error::lock(archive);
            archive.push(id, room, frame.clone(), tokio::time::Instant::now());
            self.metrics.archive_messages.set(archive.len() as i64);
        }
        if self.pair.as_ref().is_some_and(|pair| pair.state.following) {
            self.send(ZmqMessage::from(frame));
            if id.seq.is_multiple_of(BEAT_EVERY) {
                // Between heartbeats too: the active broker waits for a backup a burst left
                // far behind, for as long as it hears it catch up (`Pair::hold`).
                self.beat().await;
            }
        }
    }

    /// Asks the peer for everything after what the archive holds; `kept`: live frames waiting.
    fn ask_peer(&mut self, kept: Vec<Bytes>) {
        let marks = self
            .archive
            .as_ref()
            .map(|archive| crate::error::lock(archive).marks())
            .unwrap_or_default();
        let Some(pair) = &mut self.pair else { return };
        pair.asked += 1;
        let request = snapshot::Request {
            after: marks.iter().map(MsgId::to_string).collect(),
            n: pair.asked,
        };
        tracing::debug!(n = request.n, after = ?request.after, "asking the peer broker for its history");
        let _ = pair.requests.try_send(request);
        let bytes = kept.iter().map(Bytes::len).sum();
        pair.sync = Some(PeerSync {
            n: pair.asked,
            kept,
            bytes,
            tries: 0,
            deadline: tokio::time::Instant::now() + snapshot::TIMEOUT,
        });
    }

    /// A part of the peer's answer to [`Broker::ask_peer`].
    async fn snapshot_reply(&mut self, reply: Reply) {
        let Some(pair) = &mut self.pair else { return };
        if pair.state.role != Role::Backup
            || pair.sync.as_ref().is_none_or(|sync| sync.n != reply.n())
        {
            return;
        }
        match reply {
            Reply::Head(_, head) => {
                if !head.covered {
                    tracing::warn!(
                        "the peer broker no longer holds all of its history this broker lacks"
                    );
                }
            }
            Reply::Batch(_, frames) => {
                // Holes are other rooms' messages the peer dropped, not gaps.
                for frame in frames {
                    let Some((id, room, key)) = id_and_room(&frame) else {
                        continue;
                    };
                    if self.mark(id.run).is_some_and(|mark| id.seq <= mark) {
                        continue;
                    }
                    self.keep(id, room.as_deref(), key.as_deref(), frame).await;
                }
            }
            Reply::End(_) => {
                let sync = pair.sync.take().expect("waiting");
                if !pair.state.following {
                    tracing::info!("this broker holds its peer's history: it is the backup");
                }
                pair.state.following = true;
                self.copy(sync.kept, sync.tries).await;
            }
        }
    }

    /// Another active broker outranks this one (a split brain healed): it becomes the backup,
    /// forgets its history (what it published alone reached no web node that follows the
    /// other) and copies the other's.
    async fn step_down(&mut self) {
        let Some(pair) = &mut self.pair else { return };
        pair.state.step_down();
        pair.everything.send_replace(true);
        tracing::warn!(
            term = pair.state.term,
            "another broker is active with a higher term: this broker is now its backup"
        );
        self.metrics.broker_active.set(0);
        self.metrics
            .role_changed(crate::metrics::RoleChange::Backup);
        if let Some(archive) = &self.archive {
            crate::error::lock(archive).clear();
        }
        self.ask_peer(Vec::new());
        self.beat().await;
    }

    /// One input message → the frame to publish, if any (with the chain's workers, a message
    /// for the chain is queued and published by [`Broker::finish`]).
    fn handle(&mut self, message: ZmqMessage) -> Handled {
        if message.len() != 1 {
            self.metrics.dropped(DropReason::Multipart);
            crate::throttled!(
                tracing::Level::WARN,
                frames = message.len(),
                "dropped a multipart message; one JSON frame expected"
            );
            return Handled::Nothing;
        }
        // The message's one frame is replaced by what is published (its queue reused: one
        // allocation less a message on the pass-through).
        let mut frames = message.into_vecdeque();
        let frame = frames.pop_front().expect("one frame");
        if frame.starts_with(crate::hub::PRESENCE_PREFIX) {
            // A web node's presence report: for the other web nodes, as it is. Not a message:
            // no id, no scripts, not counted.
            return Handled::Publish(ZmqMessage::from(frame), None);
        }
        let stamped = self.stamper.stamp(&frame, !self.scripted());
        self.stamped(stamped, &frame, frames)
    }

    /// Whether messages go through scripts (on this task or the chain's workers).
    fn scripted(&self) -> bool {
        !self.chain.is_empty() || self.workers.is_some()
    }

    /// What the broker's next wait may take, from where the last input left things: whether
    /// it waits for a web node far behind (looked at once every `lag.every` messages; `timer`
    /// armed to look again), whether PULL waits (that, or a joining backup catching up), and
    /// how far the POSTs of the web node of this process may publish their messages
    /// themselves ([`Inline`]): up to the next look, unless the broker waits (their messages
    /// wait in the queue meanwhile) or runs scripts.
    fn pace(&mut self, lag: &mut LagCheck, timer: std::pin::Pin<&mut tokio::time::Sleep>) -> bool {
        let seq = self.stamper.seq;
        if seq >= lag.next {
            lag.next = seq + lag.every;
            lag.lagging = self.lagging(timer);
        }
        self.inline_until = if lag.lagging || self.scripted() || self.hub.is_none() {
            0
        } else {
            lag.next
        };
        lag.lagging
            || self
                .pair
                .as_mut()
                .is_some_and(|pair| pair.state.hold(seq, tokio::time::Instant::now()))
    }

    /// What to do with what the stamper made of `frame`; `frames`: an empty queue for the
    /// frame to publish.
    fn stamped(
        &mut self,
        stamped: Result<Stamped, DropReason>,
        frame: &[u8],
        mut frames: VecDeque<Bytes>,
    ) -> Handled {
        match stamped {
            // Where the frame's room is, when the stamper saw it (the archive keeps rooms apart).
            Ok(Stamped::Ready(bytes, at)) => {
                let known = self
                    .hub
                    .is_some()
                    .then(|| self.stamper.known(&bytes, &at))
                    .flatten();
                frames.push_back(self.record(bytes, at));
                let out = ZmqMessage::try_from(frames).expect("one frame");
                Handled::Publish(out, known)
            }
            Ok(Stamped::Parsed { map, key }) => {
                // Only a keyed message may turn out a duplicate after the chain.
                let reference = key.as_ref().and_then(|_| reference_of(&map));
                if self.workers.is_some() {
                    return Handled::Submit(Job {
                        map,
                        key,
                        reference,
                    });
                }
                let verdict = self.chain.run(map);
                self.finish(Done {
                    verdict,
                    key,
                    reference,
                })
                .map_or(Handled::Nothing, |out| Handled::Publish(out, None))
            }
            Ok(Stamped::Duplicate { reference, id }) => {
                // Published already (a retry after a late answer): say so, publish nothing.
                self.metrics.dropped(DropReason::Duplicate);
                reference.map_or(Handled::Nothing, |reference| {
                    Handled::Publish(ZmqMessage::from(published(&reference, id)), None)
                })
            }
            Err(reason) => {
                self.metrics.dropped(reason);
                crate::throttled!(
                    tracing::Level::WARN,
                    ?reason,
                    bytes = frame.len(),
                    "dropped an unreadable frame"
                );
                Handled::Nothing
            }
        }
    }

    /// The chain's verdict on a message → the frame to publish (stamped with its id now, so
    /// that ids stay dense in publishing order), or the notice for its sender.
    fn finish(&mut self, done: Done) -> Option<ZmqMessage> {
        let Done {
            verdict,
            key,
            reference,
        } = done;
        if self
            .pair
            .as_ref()
            .is_some_and(|pair| pair.state.role == Role::Backup)
        {
            // Stepped down while the message was in the chain: the active broker decides.
            self.metrics.dropped(DropReason::Standby);
            return None;
        }
        match verdict {
            Verdict::Pass(bytes) if bytes.len() > self.max_published => {
                self.metrics.dropped(DropReason::Oversize);
                self.notify(
                    None,
                    "the message is too large once moderated",
                    413,
                    bytes.len(),
                )
            }
            Verdict::Pass(bytes) => {
                // A retry of it may have been published while it was in a worker's chain.
                if let Some(id) = self.stamper.duplicate(key.as_deref()) {
                    self.metrics.dropped(DropReason::Duplicate);
                    return reference.map(|reference| ZmqMessage::from(published(&reference, id)));
                }
                // A pair's backup learns the key from the frame (see `publish_keys`).
                let bytes = match &key {
                    Some(key) if self.stamper.publish_keys => crate::wire::with_key(&bytes, key),
                    _ => bytes,
                };
                let out = self.stamper.stamp_id(&bytes, key);
                Some(ZmqMessage::from(self.record(out, RoomAt::Unknown)))
            }
            Verdict::Drop {
                reference,
                reason,
                status,
            } => self.notify(reference, &reason, status, 0),
        }
    }

    /// A stamped message: counted, archived (with `broker.snapshot`), ready to publish.
    fn record(&mut self, out: Bytes, room_at: RoomAt) -> Bytes {
        self.metrics.broker_published.inc();
        if let Some(archive) = &self.archive {
            let room = match &room_at {
                RoomAt::Default => None,
                RoomAt::At(range) => std::str::from_utf8(&out[range.clone()]).ok(),
                RoomAt::Unknown => crate::wire::room_of(&out),
            };
            let mut archive = crate::error::lock(archive);
            archive.push(
                MsgId {
                    run: self.stamper.run,
                    seq: self.stamper.seq,
                },
                room,
                // A copy: a slice would keep the stamper's whole buffer (ARENA_BYTES) for as
                // long as the archive keeps the message, outside its byte bound.
                Bytes::copy_from_slice(&out),
                tokio::time::Instant::now(),
            );
            self.metrics.archive_messages.set(archive.len() as i64);
        }
        out
    }

    /// The rejection notice for a dropped message, when its sender can be told.
    fn notify(
        &self,
        reference: Option<String>,
        reason: &str,
        status: u16,
        bytes: usize,
    ) -> Option<ZmqMessage> {
        if bytes > 0 {
            crate::throttled!(
                tracing::Level::WARN,
                bytes,
                "dropped a message that scripts made too large"
            );
        }
        match reference {
            Some(reference) if self.notify_rejections => {
                Some(ZmqMessage::from(rejection(&reference, reason, status)))
            }
            _ => None,
        }
    }
}

/// Where a stamped frame names its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomAt {
    /// It names none: the default room.
    Default,
    /// The room name (a string without escapes) is these bytes of the frame.
    At(std::ops::Range<usize>),
    /// Not looked at: read it from the frame.
    Unknown,
}

/// What the stamper made of a frame.
pub enum Stamped {
    /// Stamped and serialized: publish as is (no scripts to run); where its room is.
    Ready(Bytes, RoomAt),
    /// Parsed and stamped with the time, for the script chain; if the chain passes it,
    /// [`Stamper::stamp_id`] gives it its id (and remembers its idempotency key).
    Parsed { map: rhai::Map, key: Option<String> },
    /// Its idempotency key was published within the window, as `id`: not published again.
    Duplicate {
        reference: Option<String>,
        id: MsgId,
    },
}

/// Idempotency keys of recently published messages, bounded in count and age: a message
/// whose key is here is not published again.
pub struct Recent {
    window: std::time::Duration,
    max: usize,
    ids: HashMap<String, MsgId>,
    order: VecDeque<(std::time::Instant, String)>,
}

impl Recent {
    pub fn new(window: std::time::Duration, max: usize) -> Recent {
        Recent {
            window,
            max,
            ids: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: std::time::Instant) {
        while let Some((at, _)) = self.order.front()
            && now.duration_since(*at) > self.window
        {
            let (_, key) = self.order.pop_front().expect("a front entry");
            self.ids.remove(&key);
        }
    }

    /// The id a key was published as, within the window.
    pub fn get(&mut self, key: &str) -> Option<MsgId> {
        self.expire(std::time::Instant::now());
        self.ids.get(key).copied()
    }

    /// Remembers a published key; past `max` keys the oldest is forgotten.
    pub fn insert(&mut self, key: String, id: MsgId) {
        if self.max == 0 {
            return;
        }
        let now = std::time::Instant::now();
        self.expire(now);
        while self.order.len() >= self.max {
            let (_, old) = self.order.pop_front().expect("a front entry");
            self.ids.remove(&old);
        }
        if self.ids.insert(key.clone(), id).is_none() {
            self.order.push_back((now, key));
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What [`Broker::handle`] made of a message read.
enum Handled {
    /// A frame to publish, with what the stamper knows of it (for the hub of this process).
    Publish(ZmqMessage, Option<Known>),
    /// A message for the chain's workers.
    Submit(Job),
    /// Nothing to publish (dropped and counted, or a duplicate whose sender cannot be told).
    Nothing,
}

/// Checks frames and stamps each good one with the next id and the time.
pub struct Stamper {
    run: u64,
    seq: u64,
    max_frame_bytes: usize,
    recent: Recent,
    /// Where the frames are written (see [`ARENA_BYTES`]).
    arena: BytesMut,
    /// The time (ms) to stamp, when the broker read it once for several messages (a turn of
    /// PULL); `None`: the clock is read for each.
    pub time: Option<u64>,
    /// A broker of a pair: published frames keep the idempotency `key` (after `ref`), so that
    /// the backup learns it; web nodes cut it.
    pub publish_keys: bool,
}

/// Idempotency keys longer than this are ignored.
const MAX_KEY_BYTES: usize = 128;

impl Stamper {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self::with_dedupe(
            max_frame_bytes,
            std::time::Duration::from_secs(DEFAULT_DEDUPE_WINDOW_SECS),
            DEFAULT_DEDUPE_MAX_KEYS,
        )
    }

    /// A stamper that remembers published idempotency keys for `window`, at most `max_keys`.
    pub fn with_dedupe(
        max_frame_bytes: usize,
        window: std::time::Duration,
        max_keys: usize,
    ) -> Self {
        Stamper {
            run: new_run(),
            seq: 0,
            max_frame_bytes,
            recent: Recent::new(window, max_keys),
            arena: BytesMut::new(),
            time: None,
            publish_keys: false,
        }
    }

    /// Remembers that `key` was published as `id` (by the peer of a pair: a backup learns the
    /// keys the active broker published, so that a retry after a takeover is not published
    /// twice).
    pub fn remember(&mut self, key: &str, id: MsgId) {
        if key.len() <= MAX_KEY_BYTES {
            self.recent.insert(key.to_owned(), id);
        }
    }

    /// The id the next published message gets.
    /// A new run (not one `taken` says is known), from sequence number 1.
    pub fn restart(&mut self, taken: impl Fn(u64) -> bool) {
        let mut run = new_run().max(self.run + 1);
        while taken(run) {
            run += 1;
        }
        self.run = run;
        self.seq = 0;
    }

    /// What the hub of this process may take from a frame [`Stamper::stamp`] just made ready,
    /// without reading it again ([`Known`]): its id, its room's place, its leading `ref`.
    /// `None` (the hub reads the frame) when the room was not located, when a `key` member
    /// stays in it (a pair publishes keys), or when a `ref` name appears anywhere but first.
    pub fn known(&self, frame: &[u8], room_at: &RoomAt) -> Option<Known> {
        static REF_NAME: LazyLock<memchr::memmem::Finder<'static>> =
            LazyLock::new(|| memchr::memmem::Finder::new(b"\"ref\""));
        const LEADING_REF: &[u8] = b"{\"ref\":\"";
        if self.publish_keys {
            return None;
        }
        let room = match room_at {
            RoomAt::Default => None,
            RoomAt::At(range) => Some(range.clone()),
            RoomAt::Unknown => return None,
        };
        let reference = match frame.strip_prefix(LEADING_REF) {
            Some(rest) => {
                let end = memchr::memchr2(b'"', b'\\', rest)?;
                let after = LEADING_REF.len() + end + 1;
                if rest[end] != b'"'
                    || frame.get(after) != Some(&b',')
                    || REF_NAME.find(&frame[after..]).is_some()
                {
                    return None;
                }
                Some(KnownRef {
                    value: LEADING_REF.len()..LEADING_REF.len() + end,
                    member: 1..after + 1,
                })
            }
            None if REF_NAME.find(frame).is_some() => return None,
            None => None,
        };
        Some(Known {
            id: MsgId {
                run: self.run,
                seq: self.seq,
            },
            room,
            reference,
        })
    }

    /// The id of the last message stamped.
    pub fn last_id(&self) -> MsgId {
        MsgId {
            run: self.run,
            seq: self.seq,
        }
    }

    fn next_id(&self) -> MsgId {
        MsgId {
            run: self.run,
            seq: self.seq + 1,
        }
    }

    /// Uses up the id the next message gets (published ids are dense within a run, so a web
    /// node that sees a gap knows it missed messages) and remembers its idempotency key.
    pub fn commit(&mut self, key: Option<String>) {
        self.seq += 1;
        if let Some(key) = key {
            self.recent.insert(
                key,
                MsgId {
                    run: self.run,
                    seq: self.seq,
                },
            );
        }
    }

    /// The id under which a key was published, if it was within the window.
    fn duplicate(&mut self, key: Option<&str>) -> Option<MsgId> {
        key.filter(|key| !self.recent.is_empty() && key.len() <= MAX_KEY_BYTES)
            .and_then(|key| self.recent.get(key))
    }

    /// Validates one frame and stamps it with the next id and the time.
    ///
    /// With `ready` (no scripts to run), the result is the serialized frame, built without a
    /// full parse: the fields are copied as raw JSON, the stamp appended, and the id used up.
    /// Otherwise it is the parsed map for the script chain; call [`Stamper::commit`] if the
    /// chain passes it. Either way, the keys only the broker writes are removed from what the
    /// sender sent, and the idempotency key (`key`) and the sender's address (`client`) are
    /// never published; `client` stays in the map for scripts.
    pub fn stamp(&mut self, frame: &[u8], ready: bool) -> Result<Stamped, DropReason> {
        if frame.len() > self.max_frame_bytes {
            return Err(DropReason::Oversize);
        }
        if !ready {
            return self.parse(frame);
        }
        // JSON text is UTF-8 (RFC 8259). serde_json checks the keys and the values the scan
        // reads, not the ones it skips: checked here, once, for the whole frame.
        let Ok(text) = std::str::from_utf8(frame) else {
            return Err(DropReason::InvalidJson);
        };
        self.stamp_laid_out(frame, &scan(text)?)
    }

    /// [`Stamper::stamp`] with no scripts to run, for a frame whose layout is known: the
    /// embedded broker's own web node wrote it (`message::Wire::write`), so it is not scanned
    /// again.
    pub fn stamp_laid_out(&mut self, frame: &[u8], layout: &Layout) -> Result<Stamped, DropReason> {
        if frame.len() > self.max_frame_bytes {
            return Err(DropReason::Oversize);
        }
        // The values inside their quotes: valid UTF-8 wherever the frame is.
        let text = |range: &Option<std::ops::Range<usize>>| {
            range
                .clone()
                .and_then(|range| frame.get(range))
                .and_then(|bytes| std::str::from_utf8(bytes).ok())
        };
        let key = text(&layout.key);
        if let Some(id) = self.duplicate(key) {
            return Ok(Stamped::Duplicate {
                reference: text(&layout.reference).map(str::to_owned),
                id,
            });
        }
        let key = key.map(str::to_owned);
        let mut out = self.take_arena(frame.len() + STAMP_BYTES);
        let room = if layout.plain
            && memchr::memchr2(b'\n', b'\r', frame).is_none()
            && let Some(room) = self.cut_and_copy(frame, layout, &mut out)
        {
            // The common case: a compact object with no key of ours and no duplicate, copied
            // up to its closing brace without its private members; the stamp appended.
            self.write_stamp(&mut out, key);
            Ok(room)
        } else {
            self.rewrite(frame, &mut out, key).map(|()| RoomAt::Unknown)
        };
        if room.is_err() {
            // What a refused frame left is overwritten by the next.
            out.clear();
        }
        let frame = self.give_back_arena(out);
        room.map(|room| Stamped::Ready(frame, room))
    }

    /// The arena (see [`ARENA_BYTES`]), with room for `needed` more bytes; hand it back with
    /// [`Stamper::give_back_arena`].
    fn take_arena(&mut self, needed: usize) -> BytesMut {
        let mut out = std::mem::take(&mut self.arena);
        if out.capacity() < needed {
            // Its earlier frames are theirs: a new buffer (or this one again, when they are
            // all gone).
            out.reserve(needed.max(ARENA_BYTES));
        }
        out
    }

    /// Splits the frame written into the arena off it and keeps the rest for the next frame.
    fn give_back_arena(&mut self, mut out: BytesMut) -> Bytes {
        let frame = out.split().freeze();
        self.arena = out;
        frame
    }

    /// Copies a frame the scan found plain into `out`, up to its closing brace (and a comma
    /// when a member is left), without its private members (`client`; `key` unless it is
    /// published); returns where its room is in `out`. `None` (and `out` left as it is) when
    /// a member to cut is not compact (a space around it): the general path then.
    fn cut_and_copy(&self, frame: &[u8], layout: &Layout, out: &mut BytesMut) -> Option<RoomAt> {
        let end = frame.iter().rposition(|b| *b == b'}')?;
        // Each member to cut, from its key's opening quote to its value's end.
        let span = |member: &std::ops::Range<usize>| (member.start, member.end);
        let key_member = layout.key_member.as_ref().filter(|_| !self.publish_keys);
        let mut cuts = [
            layout.client_member.as_ref().map(span),
            key_member.map(span),
        ];
        cuts.sort_unstable();
        // Where the room's name starts in the frame, then in `out`.
        let room = match &layout.room {
            RoomSpan::Plain(name) => Some(name.start),
            RoomSpan::None | RoomSpan::Other => None,
        };
        let mut room_in_out = None;
        let mut copy = |out: &mut BytesMut, from: usize, to: usize| {
            if let Some(at) = room.filter(|at| (from..to).contains(at)) {
                room_in_out = Some(out.len() + at - from);
            }
            out.extend_from_slice(&frame[from..to]);
        };
        let mut from = 0;
        let mut kept = layout.members;
        for (start, stop) in cuts.into_iter().flatten() {
            if !matches!(frame.get(start.wrapping_sub(1)), Some(b'{' | b','))
                || !matches!(frame.get(stop), Some(b',' | b'}'))
            {
                out.clear();
                return None;
            }
            copy(out, from, start);
            from = stop;
            kept -= 1;
            // The commas around it: one stays between two members, none after `{` or
            // before `}`.
            if frame[stop] == b',' {
                from += 1;
            } else if out.last() == Some(&b',') {
                out.truncate(out.len() - 1);
            }
        }
        copy(out, from, end);
        if kept > 0 {
            out.put_u8(b',');
        }
        Some(match &layout.room {
            RoomSpan::None => RoomAt::Default,
            RoomSpan::Plain(name) => {
                room_in_out.map_or(RoomAt::Unknown, |at| RoomAt::At(at..at + name.len()))
            }
            RoomSpan::Other => RoomAt::Unknown,
        })
    }

    /// The parsed map for the script chain: the broker's keys removed, the idempotency key
    /// taken out, the time stamped (the id is stamped after the chain: [`Stamper::stamp_id`]).
    fn parse(&mut self, frame: &[u8]) -> Result<Stamped, DropReason> {
        let value: rhai::Dynamic =
            serde_json::from_slice(frame).map_err(|_| DropReason::InvalidJson)?;
        let Some(mut map) = value.try_cast::<rhai::Map>() else {
            return Err(DropReason::NotAnObject);
        };
        for key in STAMPED_KEYS {
            map.remove(key);
        }
        let key = map
            .remove(KEY)
            .and_then(|key| key.into_immutable_string().ok())
            .map(|key| key.to_string())
            .filter(|key| key.len() <= MAX_KEY_BYTES);
        if let Some(id) = self.duplicate(key.as_deref()) {
            let reference = reference_of(&map);
            return Ok(Stamped::Duplicate { reference, id });
        }
        map.insert(crate::wire::TIME.into(), (now_ms() as rhai::INT).into());
        Ok(Stamped::Parsed { map, key })
    }

    /// Appends the next id to a frame the chain passed (a compact JSON object) and uses it up.
    /// Ids are stamped after the chain: dense in publishing order, also with several workers.
    pub fn stamp_id(&mut self, frame: &[u8], key: Option<String>) -> Bytes {
        let id = self.next_id();
        self.commit(key);
        let end = frame
            .iter()
            .rposition(|b| *b == b'}')
            .expect("a serialized map ends with `}`");
        let mut out = self.take_arena(frame.len() + STAMP_BYTES);
        out.extend_from_slice(&frame[..end]);
        if end > 1 {
            out.put_u8(b',');
        }
        out.extend_from_slice(b"\"id\":\"");
        crate::wire::write_id(&mut out, id);
        out.extend_from_slice(b"\"}");
        self.give_back_arena(out)
    }

    /// The general path without scripts: the fields copied as raw JSON, without the broker's
    /// keys, the private ones or duplicates (the last of a key wins, as in `JSON.parse`), on
    /// one line, then the stamp.
    fn rewrite(
        &mut self,
        frame: &[u8],
        out: &mut BytesMut,
        key: Option<String>,
    ) -> Result<(), DropReason> {
        let fields = match serde_json::from_slice::<RawFields<'_>>(frame) {
            Ok(fields) => fields.0,
            Err(_) => return Err(DropReason::InvalidJson),
        };
        out.put_u8(b'{');
        let many = fields.len() > 16;
        let seen_later =
            |i: usize, key: &str| -> bool { fields[i + 1..].iter().any(|(other, _)| other == key) };
        let mut later: std::collections::HashSet<&str> = std::collections::HashSet::new();
        // Walk backwards so that, as in JSON.parse, the last of duplicate keys wins; then
        // reverse the kept fields to keep their order.
        let mut kept = Vec::with_capacity(fields.len());
        for (i, (name, value)) in fields.iter().enumerate().rev() {
            let duplicate = if many {
                !later.insert(name.as_ref())
            } else {
                seen_later(i, name)
            };
            let published_key = self.publish_keys && name.as_ref() == KEY;
            if duplicate
                || STAMPED_KEYS.contains(&name.as_ref())
                || (PRIVATE_KEYS.contains(&name.as_ref()) && !published_key)
            {
                continue;
            }
            kept.push((name, value));
        }
        for (name, value) in kept.into_iter().rev() {
            serde_json::to_writer(out.writer(), name.as_ref()).expect("writing to memory");
            out.put_u8(b':');
            // Pretty-printed input is re-serialized compactly: the frame stays one line.
            crate::wire::write_one_line(out, value.get().as_bytes())
                .ok_or(DropReason::InvalidJson)?;
            out.put_u8(b',');
        }
        self.write_stamp(out, key);
        Ok(())
    }

    /// Appends `"id":"<run>-<seq>","time":<ms>}` and uses up the id.
    fn write_stamp(&mut self, out: &mut BytesMut, key: Option<String>) {
        let id = self.next_id();
        self.commit(key);
        out.extend_from_slice(b"\"id\":\"");
        crate::wire::write_id(out, id);
        out.extend_from_slice(b"\",\"time\":");
        let time = self.time.unwrap_or_else(now_ms);
        out.extend_from_slice(itoa::Buffer::new().format(time).as_bytes());
        out.put_u8(b'}');
    }
}

/// What a validating pass over a JSON object found, without keeping anything.
struct Scan<'a> {
    keys: usize,
    /// No key the broker writes (`id`, `time`, `reject`, `published`), no duplicate key, no
    /// escaped key: the frame can be stamped by appending to it, once its private members
    /// (`key`, `client`, below) are cut out.
    plain: bool,
    /// The `ref` and `key` values, when they are strings without escapes.
    reference: Option<&'a str>,
    key: Option<&'a str>,
    /// The `room` value as found (a string without escapes, or anything else).
    room: Option<&'a RawValue>,
    /// The private members, as found in the frame (the key's text, the raw value): what a
    /// web node's every frame holds (`client`, and `key` with an idempotency key).
    key_member: Option<(&'a str, &'a RawValue)>,
    client_member: Option<(&'a str, &'a RawValue)>,
}

/// Validates a frame (JSON text) as one object and finds where its members are, without
/// keeping anything.
pub(crate) fn scan(text: &str) -> Result<Layout, DropReason> {
    match serde_json::from_str::<Scan>(text) {
        Ok(scan) => Ok(scan.layout(text)),
        Err(error) if error.is_data() => Err(DropReason::NotAnObject),
        Err(_) => Err(DropReason::InvalidJson),
    }
}

impl Scan<'_> {
    /// Where what the scan found is in `text`, the frame it scanned.
    fn layout(&self, text: &str) -> Layout {
        let base = text.as_ptr() as usize;
        let within = |part: &str| {
            let start = part.as_ptr() as usize - base;
            start..start + part.len()
        };
        // From the name's opening quote to the value's end.
        let member = |(name, value): (&str, &RawValue)| {
            let value = within(value.get());
            within(name).start - 1..value.end
        };
        Layout {
            members: self.keys,
            plain: self.plain,
            reference: self.reference.map(within),
            key: self.key.map(within),
            room: match self.room {
                None => RoomSpan::None,
                Some(room) => {
                    plain_str(room).map_or(RoomSpan::Other, |name| RoomSpan::Plain(within(name)))
                }
            },
            key_member: self.key_member.map(member),
            client_member: self.client_member.map(member),
        }
    }
}

/// Objects with more keys than this take the general path.
const SCAN_MAX_KEYS: usize = 16;

impl<'de> Deserialize<'de> for Scan<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScanVisitor;
        impl<'de> Visitor<'de> for ScanVisitor {
            type Value = Scan<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen: [&'de str; SCAN_MAX_KEYS] = [""; SCAN_MAX_KEYS];
                let mut scan = Scan {
                    keys: 0,
                    plain: true,
                    reference: None,
                    key: None,
                    room: None,
                    key_member: None,
                    client_member: None,
                };
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match key.0.as_ref() {
                        REF => scan.reference = plain_str(map.next_value::<&'de RawValue>()?),
                        KEY => {
                            let value = map.next_value::<&'de RawValue>()?;
                            scan.key = plain_str(value);
                            if let Cow::Borrowed(name) = key.0 {
                                scan.key_member = Some((name, value));
                            }
                        }
                        CLIENT => {
                            let value = map.next_value::<&'de RawValue>()?;
                            if let Cow::Borrowed(name) = key.0 {
                                scan.client_member = Some((name, value));
                            }
                        }
                        ROOM => {
                            scan.room = Some(map.next_value::<&'de RawValue>()?);
                        }
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                    match key.0 {
                        Cow::Borrowed(key) if scan.plain && scan.keys < SCAN_MAX_KEYS => {
                            if STAMPED_KEYS.contains(&key) || seen[..scan.keys].contains(&key) {
                                scan.plain = false;
                            }
                            seen[scan.keys] = key;
                        }
                        _ => scan.plain = false,
                    }
                    scan.keys += 1;
                }
                Ok(scan)
            }
        }
        deserializer.deserialize_map(ScanVisitor)
    }
}

/// A JSON object read as its keys and raw (unparsed) values, in order.
struct RawFields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    fields.push((key.0, map.next_value::<&'de RawValue>()?));
                }
                Ok(RawFields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A map key borrowed from the input when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Starting the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    DataSource(#[from] UnknownDataSource),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn ready(stamper: &mut Stamper, frame: &[u8]) -> Result<Value, DropReason> {
        match stamper.stamp(frame, true)? {
            Stamped::Ready(bytes, _) => {
                assert!(!bytes.contains(&b'\n'), "published frames are one line");
                Ok(serde_json::from_slice(&bytes).unwrap())
            }
            Stamped::Parsed { .. } | Stamped::Duplicate { .. } => {
                panic!("ready stamping returns bytes")
            }
        }
    }

    #[test]
    fn the_room_is_found_where_the_frame_names_it() {
        let mut stamper = Stamper::new(4096);
        let frame = br#"{"from":"a","room":"blue-room","text":"x"}"#;
        let Ok(Stamped::Ready(bytes, RoomAt::At(range))) = stamper.stamp(frame, true) else {
            panic!("a plain frame with a room");
        };
        assert_eq!(&bytes[range], b"blue-room");
        let Ok(Stamped::Ready(_, at)) = stamper.stamp(br#"{"from":"a","text":"x"}"#, true) else {
            panic!("a plain frame");
        };
        assert_eq!(at, RoomAt::Default);
        // Rewritten frames (a key of the broker's to remove) are read again.
        let Ok(Stamped::Ready(bytes, at)) =
            stamper.stamp(br#"{"id":"x","room":"r","text":"x"}"#, true)
        else {
            panic!("a rewritten frame");
        };
        assert_eq!(at, RoomAt::Unknown);
        assert_eq!(crate::wire::room_of(&bytes), Some("r"));
        let Ok(Stamped::Ready(_, at)) = stamper.stamp(br#"{"room":7,"text":"x"}"#, true) else {
            panic!("a frame with a number for a room");
        };
        assert_eq!(at, RoomAt::Unknown);
    }

    #[test]
    fn stamps_id_and_time_and_keeps_fields() {
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        let before = now_ms();
        let first = ready(
            &mut stamper,
            br#"{"from":"Zo\u00e9","text":"a/b <i>","ref":"n-1"}"#,
        )
        .unwrap();
        let second = ready(&mut stamper, br#"{"from":"b","text":"c"}"#).unwrap();
        assert_eq!(first["from"], "Zoé");
        assert_eq!(first["text"], "a/b <i>");
        assert_eq!(first["ref"], "n-1");
        let id1: MsgId = first["id"].as_str().unwrap().parse().unwrap();
        let id2: MsgId = second["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(id1.run, id2.run);
        assert_eq!((id1.seq, id2.seq), (1, 2));
        assert!(id2.follows(&id1));
        assert!(first["time"].as_u64().unwrap() >= before);
    }

    #[test]
    fn frames_made_one_after_the_other_each_keep_their_own_bytes() {
        // Several of the stamper's buffers (ARENA_BYTES) over, every frame kept alive; frames
        // refused or taking the general path in between; the time read once for them all.
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        stamper.time = Some(1_700_000_000_000);
        let mut kept = Vec::new();
        for i in 0..1000 {
            let frame = match i % 10 {
                3 => format!(r#"{{"text":"{i}","#),
                7 => format!(r#"{{"text":"x","text":"{i}","client":"ip:192.0.2.1"}}"#),
                _ => format!(r#"{{"from":"a","client":"ip:192.0.2.1","text":"{i}"}}"#),
            };
            match stamper.stamp(frame.as_bytes(), true) {
                Ok(Stamped::Ready(bytes, _)) => kept.push((i, bytes)),
                Err(DropReason::InvalidJson) if i % 10 == 3 => {}
                _ => panic!("frame {i}: {frame}"),
            }
        }
        assert_eq!(kept.len(), 900);
        for (seq, (i, bytes)) in kept.iter().enumerate() {
            let value: Value = serde_json::from_slice(bytes).unwrap();
            assert_eq!(value["text"], i.to_string());
            assert_eq!(value["time"], 1_700_000_000_000_u64);
            assert!(value.get("client").is_none());
            let id: MsgId = value["id"].as_str().unwrap().parse().unwrap();
            assert_eq!(id.seq, seq as u64 + 1);
        }
        // Without a time given, the clock is read.
        stamper.time = None;
        let value = ready(&mut stamper, br#"{"text":"now"}"#).unwrap();
        assert!(value["time"].as_u64().unwrap() >= now_ms() - 60_000);
    }

    /// What the general path (without scripts) makes of a frame.
    fn rewritten(stamper: &mut Stamper, frame: &[u8]) -> Stamped {
        let mut out = BytesMut::new();
        stamper.rewrite(frame, &mut out, None).unwrap();
        Stamped::Ready(out.freeze(), RoomAt::Unknown)
    }

    /// The frame as published, without its stamp (`"id":…` to the end), and where the
    /// stamper said its room is.
    fn unstamped(stamped: Stamped) -> (String, RoomAt, Bytes) {
        let Stamped::Ready(bytes, at) = stamped else {
            panic!("ready stamping returns bytes")
        };
        let text = std::str::from_utf8(&bytes).unwrap();
        let cut = text.rfind("\"id\":\"").unwrap();
        (text[..cut].to_owned(), at, bytes)
    }

    #[test]
    fn private_members_are_cut_out_as_the_general_path_leaves_them_out() {
        let frames = [
            // As a web node sends it (`message::Wire`'s order).
            r#"{"ref":"n-1","key":"k1","client":"ip:192.0.2.7","room":"lobby","from":"a","text":"b"}"#,
            r#"{"ref":"n-1","client":"ip:192.0.2.7","from":"a","text":"b"}"#,
            r#"{"client":"ip:192.0.2.7","from":"a","text":"b"}"#,
            r#"{"from":"a","text":"b","client":"ip:192.0.2.7"}"#,
            r#"{"from":"a","client":"x","key":"k"}"#,
            r#"{"client":"x","key":"k","room":"r","from":"a"}"#,
            r#"{"room":"r","client":{"nested":[1,",",{"k":"}"}]},"text":"t,}"}"#,
            r#"{"client":"x"}"#,
            r#"{"key":"k","client":"x"}"#,
            r#"{"client":"x","key":"k"}"#,
            // Not compact around a member to cut: the general path, the same result.
            r#"{"from":"a", "client":"x","text":"b"}"#,
            r#"{ "client" : "x" , "room":"r" }"#,
        ];
        for publish_keys in [false, true] {
            for frame in frames {
                let mut fast = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
                fast.publish_keys = publish_keys;
                let (cut, at, bytes) = unstamped(fast.stamp(frame.as_bytes(), true).unwrap());
                let mut general = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
                general.publish_keys = publish_keys;
                let (rewritten, _, _) = unstamped(rewritten(&mut general, frame.as_bytes()));
                assert_eq!(cut, rewritten, "{frame} (publish_keys: {publish_keys})");
                let value: Value = serde_json::from_slice(&bytes).unwrap();
                assert!(value.get("client").is_none(), "{frame}");
                assert_eq!(
                    value.get("key").is_some(),
                    publish_keys && frame.contains("\"key\"")
                );
                // A compact frame took the fast path (the general one does not say where the
                // room is).
                assert_eq!(
                    matches!(at, RoomAt::Unknown),
                    frame.contains(' '),
                    "{frame} (publish_keys: {publish_keys})"
                );
                // The room, where the stamper says it is.
                if let RoomAt::At(range) = at {
                    assert_eq!(
                        Some(&bytes[range]),
                        value["room"].as_str().map(str::as_bytes)
                    );
                } else if value.get("room").is_some() {
                    assert!(matches!(at, RoomAt::Unknown), "{frame}");
                } else {
                    // The general path does not look: `Unknown` (found again if needed).
                    assert!(matches!(at, RoomAt::Default | RoomAt::Unknown), "{frame}");
                }
            }
        }
    }

    /// `frame` stamped on the fast path and taken by a hub of its own, with what the stamper
    /// knows (`known`) or by reading it: the hub's replay of the frame's room after it, whether
    /// the frame's POST was told, and whether the stamper knew the frame.
    fn taken_by_a_hub(
        frame: &str,
        publish_keys: bool,
        known: bool,
    ) -> Option<(Vec<Bytes>, bool, bool)> {
        let acks = crate::acks::Acks::new();
        let hub = crate::hub::Hub::new(
            crate::hub::test_settings(),
            crate::metrics::Metrics::new(),
            acks.clone(),
        );
        let mut registration =
            acks.register(tokio::time::Instant::now() + std::time::Duration::from_secs(60));
        // Each hub's own secret reference (all of one length) where the frame says REF.
        let frame = frame.replace("REF", &registration.reference);
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        stamper.publish_keys = publish_keys;
        let Ok(Stamped::Ready(bytes, at)) = stamper.stamp(frame.as_bytes(), true) else {
            return None;
        };
        let what = stamper.known(&bytes, &at);
        let knew = what.is_some();
        match what.filter(|_| known) {
            Some(what) => hub.ingest_known(&bytes, &what),
            None => hub.ingest(&bytes),
        }
        let room = serde_json::from_slice::<Value>(&bytes).ok()?["room"]
            .as_str()
            .map(str::to_owned);
        let before = MsgId {
            run: stamper.run,
            seq: 0,
        }
        .to_string();
        let replay = hub
            .subscribe(
                room.as_deref(),
                Some(&before),
                crate::hub::Abort::new(|| {}),
            )
            .map(|subscription| subscription.replay)
            .unwrap_or_default()
            .into_iter()
            .filter(|sse| memchr::memmem::find(sse, b"event: msg\n").is_some())
            .collect();
        let told = registration.outcome.try_recv().is_ok();
        Some((replay, told, knew))
    }

    /// An SSE message's data without what differs between two stampers (`id`, `time`).
    fn message_data(sse: &Bytes) -> Option<Value> {
        let text = String::from_utf8_lossy(sse).into_owned();
        let data = text.split("data: ").nth(1)?;
        let mut value: Value = serde_json::from_str(data.trim()).ok()?;
        let map = value.as_object_mut()?;
        map.remove("time")?;
        map.remove("id")?;
        Some(value)
    }

    #[test]
    fn a_hub_takes_what_the_stamper_knows_as_it_takes_the_frame() {
        let frames = [
            // As a web node sends it.
            r#"{"ref":"REF","key":"k1","client":"ip:192.0.2.7","room":"lobby","from":"a","text":"b"}"#,
            r#"{"ref":"REF","client":"ip:192.0.2.7","from":"a","text":"b"}"#,
            r#"{"ref":"REF","from":"a","text":"\"ref\":x"}"#,
            r#"{"from":"a","text":"b"}"#,
            r#"{"room":"r2","text":"b"}"#,
        ];
        for publish_keys in [false, true] {
            for frame in frames {
                let read = taken_by_a_hub(frame, publish_keys, false).expect("the fast path");
                let known = taken_by_a_hub(frame, publish_keys, true).expect("the fast path");
                // The SSE frames hold each hub's own id: compare them without the reference.
                assert_eq!(read.1, known.1, "{frame}");
                assert_eq!(read.0.len(), known.0.len(), "{frame}");
                assert!(!read.0.is_empty(), "{frame}");
                for (a, b) in read.0.iter().zip(&known.0) {
                    assert_eq!(message_data(a), message_data(b), "{frame}");
                    assert!(
                        !String::from_utf8_lossy(b).contains("\"ref\":\""),
                        "{frame}"
                    );
                }
                if frame.starts_with(r#"{"ref""#) {
                    assert!(read.1, "the POST was told: {frame}");
                }
            }
        }
        // A web node's frame is known (unless a pair publishes its key; a `"ref"` in a text
        // is escaped, not a name); a `ref` not first, or a `"ref"` name further in (in a
        // nested object), is read instead, with the same result.
        assert!(taken_by_a_hub(frames[0], false, true).unwrap().2);
        assert!(!taken_by_a_hub(frames[0], true, true).unwrap().2);
        assert!(taken_by_a_hub(frames[2], false, true).unwrap().2);
        for frame in [
            r#"{"from":"a","ref":"REF"}"#,
            r#"{"ref":"REF","from":"a","x":{"ref":1}}"#,
        ] {
            let known = taken_by_a_hub(frame, false, true).unwrap();
            assert!(!known.2, "{frame}");
            let read = taken_by_a_hub(frame, false, false).unwrap();
            assert_eq!(
                known.0.iter().map(message_data).collect::<Vec<_>>(),
                read.0.iter().map(message_data).collect::<Vec<_>>(),
                "{frame}"
            );
            assert!(known.1, "{frame}");
        }
    }

    proptest::proptest! {
        /// Any object of a few members, `client` and `key` among them or not, in any order,
        /// with or without spaces: the fast path publishes what the general path does.
        #[test]
        fn the_fast_path_publishes_what_the_general_path_does(
            members in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["client", "key", "ref", "room", "from", "text", "x"]),
                    proptest::sample::select(vec![r#""v""#, r#""a,}b""#, "1", "[1,{}]", r#"{"k":"}"}"#, "null"]),
                    proptest::sample::select(vec!["", " "]),
                ),
                0..7,
            ),
            publish_keys: bool,
        ) {
            let mut frame = String::from("{");
            for (i, (name, value, space)) in members.iter().enumerate() {
                if i > 0 {
                    frame.push(',');
                }
                frame.push_str(&format!("{space}\"{name}\":{value}"));
            }
            frame.push('}');
            let mut fast = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
            fast.publish_keys = publish_keys;
            let mut general = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
            general.publish_keys = publish_keys;
            match fast.stamp(frame.as_bytes(), true) {
                Ok(stamped @ Stamped::Ready(..)) => {
                    let (cut, at, bytes) = unstamped(stamped);
                    let (rewritten, _, _) = unstamped(
                        rewritten(&mut general, frame.as_bytes()),
                    );
                    // The same members in the same order (the fast path keeps the sender's
                    // spaces between them, which the general path drops).
                    let members_of = |text: &str| -> Vec<(String, String)> {
                        let object = format!("{}}}", text.trim_end_matches(','));
                        serde_json::from_str::<RawFields<'_>>(&object)
                            .unwrap()
                            .0
                            .into_iter()
                            .map(|(name, value)| (name.into_owned(), value.get().to_owned()))
                            .collect()
                    };
                    proptest::prop_assert_eq!(members_of(&cut), members_of(&rewritten), "{}", frame);
                    let value: Value = serde_json::from_slice(&bytes).unwrap();
                    if let RoomAt::At(range) = at {
                        proptest::prop_assert_eq!(
                            Some(&bytes[range]),
                            value["room"].as_str().map(str::as_bytes)
                        );
                    }
                    // The hub of the process takes it with what the stamper knows as it
                    // takes it by reading it (a `ref` of "REF" is that hub's own reference).
                    let frame = frame.replace(r#""ref":"v""#, r#""ref":"REF""#);
                    if let (Some(read), Some(known)) = (
                        taken_by_a_hub(&frame, publish_keys, false),
                        taken_by_a_hub(&frame, publish_keys, true),
                    ) {
                        proptest::prop_assert_eq!(read.1, known.1, "{}", frame);
                        proptest::prop_assert_eq!(
                            read.0.iter().map(message_data).collect::<Vec<_>>(),
                            known.0.iter().map(message_data).collect::<Vec<_>>(),
                            "{}",
                            frame
                        );
                    }
                }
                // A key given twice may be a duplicate the stamper remembers: not this test's.
                other => proptest::prop_assert!(
                    !matches!(other, Ok(Stamped::Ready(..))),
                    "{}",
                    frame
                ),
            }
        }
    }

    #[test]
    fn a_frame_that_is_not_utf8_is_refused_with_or_without_scripts() {
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        for frame in [
            &b"{\"from\":\"a\",\"text\":\"b\xff\xfe\"}"[..],
            b"{\"from\":\"a\xc3\",\"text\":\"b\"}",
            b"{\"from\":\"a\",\"text\":\"b\",\"extra\":[\"\xed\xa0\x80\"]}",
        ] {
            for ready in [true, false] {
                assert!(
                    matches!(stamper.stamp(frame, ready), Err(DropReason::InvalidJson)),
                    "{frame:?} (ready: {ready})"
                );
            }
        }
        // Nothing used up: the next good frame is the first id.
        let good = ready(&mut stamper, "{\"from\":\"Zoé\",\"text\":\"ü\"}".as_bytes()).unwrap();
        assert_eq!(
            good["id"].as_str().unwrap().parse::<MsgId>().unwrap().seq,
            1
        );
        assert_eq!(good["from"], "Zoé");
    }

    #[test]
    fn sender_cannot_forge_stamped_keys() {
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        let out = ready(
            &mut stamper,
            br#"{"id":"9-9","time":1,"reject":"x","from":"a","text":"b"}"#,
        )
        .unwrap();
        assert_ne!(out["id"], "9-9");
        assert_ne!(out["time"], 1);
        assert!(out.get("reject").is_none());
    }

    #[test]
    fn duplicate_keys_keep_the_last_like_json_parse() {
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        let out = ready(&mut stamper, br#"{"text":"a","from":"x","text":"b"}"#).unwrap();
        assert_eq!(
            out,
            json!({"from":"x","text":"b","id":out["id"],"time":out["time"]})
        );
        // Many fields take the hashed path; same rule.
        let many: String = (0..40).map(|i| format!("\"k{}\":{i},", i % 20)).collect();
        let frame = format!("{{{many}\"z\":1}}");
        let out = ready(&mut stamper, frame.as_bytes()).unwrap();
        assert_eq!(out["k0"], 20);
        assert_eq!(out.as_object().unwrap().len(), 20 + 1 + 2);
    }

    #[test]
    fn pretty_printed_input_is_published_on_one_line() {
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        let out = ready(
            &mut stamper,
            b"{\n  \"from\": \"a\",\r\n  \"tags\": [1,\n 2]\n}",
        )
        .unwrap();
        assert_eq!(out["tags"], json!([1, 2]));
    }

    #[test]
    fn bad_frames_are_refused_with_a_reason() {
        let mut stamper = Stamper::new(16);
        let table: [(&[u8], DropReason); 7] = [
            (b"not json", DropReason::InvalidJson),
            (b"{\"a\":", DropReason::InvalidJson),
            (b"\xff\xfe", DropReason::InvalidJson),
            (b"null", DropReason::NotAnObject),
            (b"[1,2]", DropReason::NotAnObject),
            (b"\"text\"", DropReason::NotAnObject),
            (b"{\"from\":\"aaaaaaaaaaaaa\"}", DropReason::Oversize),
        ];
        for (frame, reason) in table {
            assert_eq!(ready(&mut stamper, frame).err(), Some(reason), "{frame:?}");
        }
        // A refused frame does not use up an id.
        let out = ready(&mut stamper, b"{}").unwrap();
        assert!(out["id"].as_str().unwrap().ends_with("-1"));
    }

    #[test]
    fn parsed_stamping_for_scripts() {
        let text = |map: &rhai::Map, key: &str| map[key].clone().into_string().unwrap();
        let mut stamper = Stamper::new(DEFAULT_MAX_FRAME_BYTES);
        let Ok(Stamped::Parsed { map, .. }) = stamper.stamp(br#"{"from":"a","id":"x"}"#, false)
        else {
            panic!("parsed")
        };
        assert_eq!(text(&map, "from"), "a");
        // The sender's id is gone; the broker's comes after the chain.
        assert!(!map.contains_key("id"));
        assert!(map["time"].is_int());
        assert_eq!(
            stamper.stamp(b"[]", false).err(),
            Some(DropReason::NotAnObject)
        );
        // Ids are used up in publishing order: a message the chain dropped uses none.
        let first = stamper.stamp_id(br#"{"from":"a"}"#, None);
        let first: Value = serde_json::from_slice(&first).unwrap();
        assert!(first["id"].as_str().unwrap().ends_with("-1"), "{first}");
        assert_eq!(first["from"], "a");
        let empty = stamper.stamp_id(b"{}", Some("k".into()));
        let empty: Value = serde_json::from_slice(&empty).unwrap();
        assert!(empty["id"].as_str().unwrap().ends_with("-2"), "{empty}");
        // Its key is remembered under that id.
        assert_eq!(
            stamper.duplicate(Some("k")).map(|id| id.to_string()),
            empty["id"].as_str().map(str::to_owned)
        );
    }
}
