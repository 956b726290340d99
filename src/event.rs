//! The Event controller, `GET /event/fetch`: Server-Sent Events from the web node's [`Hub`].
//!
//! The status and headers go out at once (Temma sent nothing until the first message), with a
//! `retry:` hint, then any replay, then each message as
//! `id: <id>\nevent: msg\ndata: <one-line JSON>\n\n`. A comment keep-alive (`: keep-alive`) is
//! sent when the stream has been idle for `event.keepalive_secs`. The stream ends when the client
//! goes away, when it falls too far behind (it reconnects and replays), and on shutdown.
//!
//! Two ways in, one behaviour: a connection whose first request is `GET /event/fetch` is served
//! by [`crate::direct`] straight from the socket; the same request later on a kept-alive
//! connection reaches [`Fetch`] through salvo, which makes the checks and has the direct path
//! take the connection over (or, where it cannot, streams the response itself with a
//! [`Reader`]). Both read the hub the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};

use bytes::{Bytes, BytesMut};
use salvo::http::header::{CONNECTION, HeaderValue, ORIGIN};
use salvo::http::{StatusCode, Version};
use salvo::prelude::*;
use serde::Deserialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::context::{Context, UnknownDataSource};
use crate::error::JsonError;
use crate::hub::{Abort, Hub, Item, MAX_CHUNK_BYTES, Settings, Subscription};
use crate::request::peer_of;

/// Default `event.sub`: Temma's data source name.
pub const DEFAULT_CLIENT_SUB: &str = "zmq_client_sub";
/// Default `event.keepalive_secs`.
pub const DEFAULT_KEEPALIVE_SECS: u64 = 15;
/// Default `event.retry_ms`: how soon browsers reconnect after the stream ends.
pub const DEFAULT_RETRY_MS: u64 = 2000;
/// Default `event.queue`: how many frames a client may lag behind before it is disconnected.
pub const DEFAULT_CLIENT_QUEUE: usize = 1024;
/// Default `event.stall_ms`.
pub const DEFAULT_STALL_MS: u64 = 2000;
/// Default `event.max_clients`.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Default `event.history_size`.
pub const DEFAULT_HISTORY_SIZE: usize = 1000;
/// Default `event.history_ttl_secs`.
pub const DEFAULT_HISTORY_TTL_SECS: u64 = 3600;
/// Default `event.initial_history`: messages a new client gets on connect.
pub const DEFAULT_INITIAL_HISTORY: usize = 50;

/// The `[event]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventConfig {
    /// Data source of the SUB socket from the broker. Default `"zmq_client_sub"`.
    pub sub: String,
    /// Seconds of silence before a keep-alive comment; 0 turns them off. Default 15.
    pub keepalive_secs: u64,
    /// The `retry:` sent to browsers, in milliseconds. Default 2000.
    pub retry_ms: u64,
    /// Frames a client may lag behind; past that it is disconnected. Default 1024. (In rooms
    /// other than the default one: `rooms.queue`.)
    pub queue: usize,
    /// Milliseconds a client with a full queue may take nothing before it is disconnected (it
    /// stopped reading). Default 2000.
    pub stall_ms: u64,
    /// SSE connections this node accepts; more get 503. Default 10000.
    pub max_clients: usize,
    /// Messages kept per room for replay; 0 turns replay off. Default 1000.
    pub history_size: usize,
    /// Seconds a message stays in the history. Default 3600.
    pub history_ttl_secs: u64,
    /// Newest messages sent to a client that connects without `Last-Event-ID`. Default 50.
    pub initial_history: usize,
    /// Data source of the snapshot socket, a DEALER connect to the broker's `broker.snapshot`
    /// (e.g. `"zmq_client_snapshot"` = `"zmq://DEALER@127.0.0.1:7000"`): when it starts and
    /// whenever its SUB reconnects or misses messages, this node fills its history from the
    /// broker's before it serves replays. Default: none (a restarted node starts empty).
    pub snapshot: Option<String>,
    /// Two brokers, one active (see the README, "Two brokers"): `message.push`, `event.sub`
    /// and `event.snapshot` each list the brokers' endpoints in the same order; this node
    /// pushes to the active one only and delivers what both hold. Default `false`.
    pub failover: bool,
    /// A writer shard's sends to its clients go to the kernel in one system call (io_uring)
    /// where the kernel allows, instead of one `send` each: on CPUs shared with the clients,
    /// each `send` that wakes a reader may switch to it when it returns. `false`: one `send`
    /// each. Default `true`.
    pub io_uring: bool,
    /// The most SSE clients of a room one writer shard (one task) writes to, 1 to 65536. More
    /// clients a shard: fewer tasks woken a message and less CPU a delivery; fewer: a room's
    /// writes spread over more worker threads. A room with one shard is written by the task
    /// that brought the message, without a wake-up, at light loads; a room of several has them
    /// written side by side by the worker threads. Default 256.
    pub shard_size: usize,
}

fn default_keepalive() -> u64 {
    DEFAULT_KEEPALIVE_SECS
}
fn default_queue() -> usize {
    DEFAULT_CLIENT_QUEUE
}
fn default_max_clients() -> usize {
    DEFAULT_MAX_CLIENTS
}
fn default_history_ttl() -> u64 {
    DEFAULT_HISTORY_TTL_SECS
}

impl Default for EventConfig {
    fn default() -> Self {
        EventConfig {
            sub: DEFAULT_CLIENT_SUB.to_owned(),
            keepalive_secs: default_keepalive(),
            retry_ms: DEFAULT_RETRY_MS,
            queue: default_queue(),
            stall_ms: DEFAULT_STALL_MS,
            max_clients: default_max_clients(),
            history_size: DEFAULT_HISTORY_SIZE,
            history_ttl_secs: default_history_ttl(),
            initial_history: DEFAULT_INITIAL_HISTORY,
            snapshot: None,
            failover: false,
            io_uring: true,
            shard_size: crate::shard::SHARD_SIZE,
        }
    }
}

impl EventConfig {
    /// The web node's hub: its fan-out, history and SUB socket settings.
    pub fn build(
        &self,
        ctx: &Context,
        acks: Arc<crate::acks::Acks>,
        rooms: &crate::hub::RoomsConfig,
    ) -> Hub {
        let settings = Settings {
            queue: self.queue,
            max_clients: self.max_clients,
            history_size: self.history_size,
            history_ttl: std::time::Duration::from_secs(self.history_ttl_secs),
            initial_history: self.initial_history,
            retry_ms: self.retry_ms,
            keepalive: std::time::Duration::from_secs(self.keepalive_secs),
            stall: std::time::Duration::from_millis(self.stall_ms),
            max_message_bytes: crate::wire::max_published_bytes(ctx.max_frame_bytes),
            default_room: Arc::from(rooms.default.as_str()),
            max_rooms: rooms.max,
            room_idle: std::time::Duration::from_secs(rooms.idle_secs),
            history_bytes: rooms.history_bytes,
            room_queue: rooms.queue,
            batch_sends: self.io_uring,
            shard_size: self.shard_size,
        };
        Hub::new(settings, ctx.metrics.clone(), acks)
    }

    /// Where the hub's SUB sockets connect (a port 0 follows the embedded broker's bind).
    pub fn sub_addresses(&self, ctx: &Context) -> Result<Vec<String>, UnknownDataSource> {
        Ok(ctx.addresses.targets(ctx.dsn(&self.sub)?))
    }

    /// Where the snapshot socket connects, when there is one.
    pub fn snapshot_addresses(
        &self,
        ctx: &Context,
    ) -> Result<Option<Vec<String>>, UnknownDataSource> {
        match &self.snapshot {
            None => Ok(None),
            Some(name) => Ok(Some(ctx.addresses.targets(ctx.dsn(name)?))),
        }
    }

    pub fn validate(&self, problem: &mut impl FnMut(&str, String)) {
        if self.queue == 0 {
            problem("event.queue", "is 0: must be at least 1".to_owned());
        }
        if self.max_clients == 0 {
            problem("event.max_clients", "is 0: must be at least 1".to_owned());
        }
        if !(1..=crate::shard::MAX_SHARD_SIZE).contains(&self.shard_size) {
            problem(
                "event.shard_size",
                format!(
                    "is {}: must be 1 to {}",
                    self.shard_size,
                    crate::shard::MAX_SHARD_SIZE
                ),
            );
        }
        if self.initial_history > self.history_size {
            problem(
                "event.initial_history",
                format!(
                    "is {}, more than `event.history_size` ({}) keeps",
                    self.initial_history, self.history_size
                ),
            );
        }
    }
}

/// `GET /event/fetch` on a connection hyper serves (one that carried another request first,
/// as a browser's `EventSource` on the connection that fetched the page). A connection whose
/// first request is this one is served by [`crate::direct`]; this handler makes the checks
/// (with sessions, it reads the client's name) and then has the direct path take the
/// connection over too ([`FrontDoor::take_over`]), so that its frames go out through the
/// room's writer shards. Only where it cannot (hyper still writing an earlier response to a
/// client that pipelines) does hyper stream the response.
pub struct Fetch {
    pub hub: Hub,
    /// The front door: it takes the connection over, or gives its socket, so that a stream
    /// hyper serves ends when the client closes (hyper does not read while it streams).
    pub front: Arc<dyn FrontDoor>,
    /// The access hook, if any: `on_subscribe` runs before the stream opens.
    pub access: Option<crate::script::Hook>,
}

/// What an SSE request asked for, checked: the room, the client's name (with sessions on,
/// the room's presence lists it), where to resume, and the `Origin` it came from (CORS).
pub struct Opened {
    pub room: Option<String>,
    pub name: Option<String>,
    pub last_event_id: Option<String>,
    pub origin: Option<String>,
}

/// The front door ([`crate::direct::Front`]), as the stream handler hyper runs sees it.
pub trait FrontDoor: Send + Sync {
    /// Takes over the connection of `peer` and streams on it, in a task of its own; `false`
    /// when it cannot (then hyper streams the response).
    fn take_over(self: Arc<Self>, peer: SocketAddr, opened: Opened) -> bool;
    /// The socket of `peer`'s connection, for a stream hyper serves to watch.
    fn socket(&self, peer: SocketAddr) -> Option<Arc<tokio::net::TcpStream>>;
}

/// The `lastEventId` query parameter, if any.
pub fn query_last_event_id(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "lastEventId")
        .map(|(_, value)| value.into_owned())
}

/// Runs the access hook's `function` on a request: `Err` is the refusal to send.
/// `client` is who sends it; `text` is the message's, for `on_publish`.
pub fn check_access(
    hook: &crate::script::Hook,
    function: &str,
    room: &str,
    name: Option<&str>,
    client: &str,
    req: &(impl crate::request::Head + ?Sized),
    text: Option<&str>,
) -> Result<(), JsonError> {
    let mut hook_req = crate::script::Hook::request(room, name, client, req.query(), |header| {
        req.header(header).map(str::to_owned)
    });
    if let Some(text) = text {
        hook_req.insert("text".into(), text.into());
    }
    match hook.check(function, hook_req) {
        crate::script::Access::Allow => Ok(()),
        crate::script::Access::Refuse { status, reason } => Err(JsonError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
            reason,
        )),
    }
}

/// The `room` query parameter, checked: `Ok(None)` when absent (the default room).
pub fn query_room(query: Option<&str>) -> Result<Option<String>, String> {
    let Some(query) = query else {
        return Ok(None);
    };
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "room")
        .map(|(_, value)| crate::wire::room_name(&value))
        .transpose()
}

#[async_trait]
impl Handler for Fetch {
    async fn handle(
        &self,
        req: &mut Request,
        depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        // The browser sends `Last-Event-ID` when it reconnects; a first connection can only
        // use the query string.
        let last_event_id = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().query().and_then(query_last_event_id));
        let room = match query_room(req.uri().query()) {
            Ok(room) => room,
            Err(error) => {
                JsonError::bad_request(error).write_to(res);
                return;
            }
        };
        if let Some(hook) = &self.access
            && let Err(refused) = check_access(
                hook,
                crate::script::ON_SUBSCRIBE,
                room.as_deref().unwrap_or(self.hub.default_room()),
                None,
                &peer_of(req)
                    .map(|peer| peer.ip().to_string())
                    .unwrap_or_default(),
                req,
                None,
            )
        {
            refused.write_to(res);
            return;
        }
        let name = depot
            .session()
            .and_then(|session| session.get::<String>(crate::session::SESSION_FROM));
        self.hub.synced().await;
        let peer = peer_of(req);
        if matches!(req.version(), Version::HTTP_10 | Version::HTTP_11)
            && let Some(peer) = peer
        {
            let opened = Opened {
                room: room.clone(),
                name: name.clone(),
                last_event_id: last_event_id.clone(),
                origin: req
                    .headers()
                    .get(ORIGIN)
                    .and_then(|origin| origin.to_str().ok())
                    .map(str::to_owned),
            };
            if self.front.clone().take_over(peer, opened) {
                // What hyper writes now goes nowhere, and it lets the connection go.
                res.status_code(StatusCode::OK);
                return;
            }
        }
        let subscription = match self.hub.subscribe_named(
            room.as_deref(),
            name.as_deref(),
            last_event_id.as_deref(),
            {
                let conn = ctrl.conn().clone();
                Abort::new(move || conn.abort())
            },
        ) {
            Ok(subscription) => subscription,
            Err(refused) => {
                JsonError::new(StatusCode::SERVICE_UNAVAILABLE, refused.to_string()).write_to(res);
                return;
            }
        };
        let socket = peer.and_then(|peer| self.front.socket(peer));
        let headers = res.headers_mut();
        for (name, value) in SSE_HEADERS {
            headers.insert(name, HeaderValue::from_static(value));
        }
        // The stream never ends by itself: nothing pipelined after it would be served.
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        res.status_code(StatusCode::OK);
        res.stream(stream(self.hub.clone(), subscription, socket));
    }
}

/// The body of one SSE response served by hyper.
fn stream(
    hub: Hub,
    subscription: Subscription,
    socket: Option<Arc<tokio::net::TcpStream>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    let mut subscription = subscription;
    // The replay goes out frame by frame (hyper gathers them into few writes) and is dropped
    // as it goes: nothing of it stays with the connection.
    let replay = std::mem::take(&mut subscription.replay).into_iter();
    let reader = Reader::new(hub, subscription);
    futures_util::stream::unfold(
        (reader, replay, socket),
        |(mut reader, mut replay, socket)| async move {
            if let Some(frame) = replay.next() {
                return Some((Ok(frame), (reader, replay, socket)));
            }
            let chunk = match &socket {
                Some(socket) => tokio::select! {
                    // The client closed (or sent more): end the stream and the connection.
                    () = closed(socket) => None,
                    chunk = reader.next_chunk() => chunk,
                },
                None => reader.next_chunk().await,
            }?;
            Some((Ok(chunk), (reader, replay, socket)))
        },
    )
}

/// Takes a client's frames from the hub, a write's worth at a time.
pub struct Reader {
    hub: Hub,
    sub: Subscription,
    done: bool,
}

impl Reader {
    /// A reader for a subscription whose replay was taken out.
    pub fn new(hub: Hub, sub: Subscription) -> Reader {
        Reader {
            hub,
            sub,
            done: false,
        }
    }

    /// The next bytes to write: every frame already queued for this client (up to
    /// [`MAX_CHUNK_BYTES`]), waiting for one if none is. `None` when the stream must end: the
    /// server shuts down, or the client fell too far behind (it reconnects and replays).
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done || self.hub.is_dropped(&self.sub.slot) {
            return None;
        }
        loop {
            let first = match self.sub.rx.recv().await {
                Ok(item) => item,
                Err(RecvError::Lagged(_)) => {
                    self.hub.lagged(&self.sub.slot);
                    return None;
                }
                Err(RecvError::Closed) => return None,
            };
            let mut taken = 1u64;
            let mut messages = 0u64;
            let mut chunk = Chunk::default();
            chunk.add(&first, &mut self.sub.skip_until, &mut messages);
            // Coalesce what else is already queued into the same write.
            while chunk.len() < MAX_CHUNK_BYTES {
                match self.sub.rx.try_recv() {
                    Ok(item) => {
                        taken += 1;
                        chunk.add(&item, &mut self.sub.skip_until, &mut messages);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Lagged(_)) => {
                        self.hub.lagged(&self.sub.slot);
                        self.done = true;
                        break;
                    }
                    Err(TryRecvError::Closed) => {
                        self.done = true;
                        break;
                    }
                }
            }
            self.hub.consumed(&self.sub.slot, taken);
            if messages > 0 {
                self.hub.metrics().delivered.inc_by(messages);
            }
            if let Some(bytes) = chunk.finish() {
                return Some(bytes);
            }
            if self.done {
                return None;
            }
        }
    }
}

/// Resolves when the client of an SSE stream is gone: it closed (EOF: browsers never
/// half-close an event stream), reset, or sent anything at all (an SSE client sends nothing
/// after its request; what it sends is not read, so the connection is closed rather than
/// spinning on it).
pub async fn closed(socket: &tokio::net::TcpStream) {
    std::future::poll_fn(|cx| poll_closed(socket, cx)).await
}

/// [`closed`] as a poll function.
pub fn poll_closed(socket: &tokio::net::TcpStream, cx: &mut TaskContext<'_>) -> Poll<()> {
    let mut probe = [0u8; 64];
    loop {
        if ready!(socket.poll_read_ready(cx)).is_err() {
            return Poll::Ready(());
        }
        match socket.try_read(&mut probe) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            _ => return Poll::Ready(()),
        }
    }
}

/// The SSE route.
pub const FETCH_PATH: &str = "/event/fetch";

/// The headers of an SSE response, on both paths.
pub const SSE_HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    // Tells nginx not to buffer the stream.
    ("x-accel-buffering", "no"),
];

/// The whole response head the direct path writes: status, [`SSE_HEADERS`], the CORS header
/// when the origin is allowed, and `Connection: close` (the body ends with the connection).
pub fn response_head(cors: Option<&str>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (name, value) in SSE_HEADERS {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(origin) = cors {
        head.extend_from_slice(b"access-control-allow-origin: ");
        head.extend_from_slice(origin.as_bytes());
        head.extend_from_slice(b"\r\nvary: Origin\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

/// Frames gathered for one write: the first is shared as is, more are copied together.
#[derive(Default)]
struct Chunk {
    single: Option<Bytes>,
    many: Option<BytesMut>,
}
impl Chunk {
    fn add(
        &mut self,
        item: &Item,
        skip_until: &mut Option<crate::wire::MsgId>,
        messages: &mut u64,
    ) {
        if let (Some(limit), Some(id)) = (*skip_until, item.id) {
            // The client has this one already (same run, not after what it saw).
            if id.run == limit.run && !id.follows(&limit) {
                return;
            }
            *skip_until = None;
        }
        if item.message {
            *messages += 1;
        }
        match (&mut self.single, &mut self.many) {
            (None, None) => self.single = Some(item.frame.clone()),
            (Some(first), None) => {
                let mut many = BytesMut::with_capacity(first.len() + item.frame.len() * 4);
                many.extend_from_slice(first);
                many.extend_from_slice(&item.frame);
                self.single = None;
                self.many = Some(many);
            }
            (_, Some(many)) => many.extend_from_slice(&item.frame),
        }
    }

    fn len(&self) -> usize {
        self.single.as_ref().map_or(0, Bytes::len) + self.many.as_ref().map_or(0, BytesMut::len)
    }

    fn finish(self) -> Option<Bytes> {
        self.single.or(self.many.map(BytesMut::freeze))
    }
}
