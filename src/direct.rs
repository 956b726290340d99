//! Every HTTP connection before hyper sees it, and the SSE connections hyper never sees.
//!
//! One accept loop takes every connection. It holds the caps (`server.max_connections` open,
//! `server.max_pending_heads` still sending their first request head: past either, a new
//! connection gets a `503` and is closed at once) and survives descriptor exhaustion calmly: it
//! keeps one descriptor in reserve, and when `accept()` fails for lack of descriptors it gives
//! the reserve up to accept the waiting connection and close it, then takes it back, pausing
//! between attempts instead of spinning.
//!
//! Each connection's first request head must arrive whole within `server.head_timeout_secs`
//! (one deadline for the whole head, not per read). A connection that opens with
//! `GET /event/fetch` (nothing pipelined after it) is served here, straight from the socket: a
//! response head and the replay, then the frames, which its room's writer shard writes
//! ([`crate::shard`]; this task writes what the shard leaves when the socket is full), each
//! write that waits bounded by `server.write_stall_timeout_secs`, and the connection closed as
//! soon as the client closes,
//! sends anything more, stops reading (the hub's sweep aborts it), or the server shuts down.
//! A plain `POST /message/broadcast` is served here too ([`crate::direct_post`]), and the
//! connection's next request read (within `server.head_timeout_secs` of the answer). Bytes that
//! are not an HTTP/1.x request get a `400` and the connection closes. Any other request, and
//! the rest of its connection, is handed to hyper with the bytes already read ([`Conn`]).
//!
//! Per idle SSE client this keeps a task, the socket and the client's place in the hub: a few
//! KiB, none of it growing with the history (the replay is written from the history's own
//! frames and dropped).

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::direct_post::{After, PostRequest};
use crate::event::{self, Opened};
use crate::hub::{Abort, Hub};
use crate::message::Broadcast;
use crate::metrics::{ConnectionRefusal, DirectRequest, Metrics};
use crate::script::{Access, Hook};
use crate::shard::{End, Flushed, Outlet, Socket};

/// The longest request head read before a connection is handed on.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The least room a connection's buffer has before a head is read into it.
const HEAD_READ_ROOM: usize = 512;

/// How long the accept loop pauses when it cannot accept (out of descriptors).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Descriptors kept free for everything that is not a client connection (ZeroMQ, files,
/// scripts' reloads) when `server.max_connections` is fitted to the process's limit.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// The limits of the HTTP front door.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending_heads: usize,
    pub head_timeout: Duration,
    pub write_stall: Duration,
}

/// What the accept loop shares with every connection. `cors_origins`, `metrics` and `access`
/// are the [`Broadcast`]'s own (one configuration for both direct paths).
pub struct Front {
    pub hub: Hub,
    pub cors_origins: Arc<Vec<String>>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// The access hook, if any: `on_subscribe` runs before a stream opens.
    pub access: Option<Hook>,
    /// With sessions on, the session cookie's name: a stream request that carries it goes to
    /// salvo (which reads the session for the room's list of names) instead of the direct
    /// path.
    pub session_cookie: Option<String>,
    /// `POST /message/broadcast`, which the direct path serves without sessions and CORS.
    pub broadcast: Arc<Broadcast>,
    /// The sockets of connections hyper serves, by peer address, so that an SSE request on
    /// one of them can be taken over ([`Front::take_over`]), or its response watch for the
    /// client closing (hyper does not read while it streams).
    sockets: Mutex<HashMap<SocketAddr, HyperConn>>,
    /// Cancelled when the accept loop stops (shutdown): streams taken over from hyper watch it.
    shutdown: CancellationToken,
    /// The accept loop's tasks (set when it starts): streams taken over from hyper run there.
    tasks: std::sync::OnceLock<TaskTracker>,
}

impl Front {
    /// Whether a request's `Cookie` header carries the session cookie (sessions on).
    fn has_session(&self, cookie: Option<&str>) -> bool {
        let (Some(name), Some(cookie)) = (&self.session_cookie, cookie) else {
            return false;
        };
        cookie.split(';').any(|pair| {
            pair.trim_start()
                .split_once('=')
                .is_some_and(|(key, _)| key == name)
        })
    }

    pub fn new(
        hub: Hub,
        limits: Limits,
        session_cookie: Option<String>,
        broadcast: Arc<Broadcast>,
    ) -> Arc<Front> {
        Arc::new(Front {
            hub,
            cors_origins: broadcast.cors_origins.clone(),
            limits,
            metrics: broadcast.metrics.clone(),
            access: broadcast.access.clone(),
            session_cookie,
            broadcast,
            sockets: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: std::sync::OnceLock::new(),
        })
    }

    /// The socket of a connection hyper serves, for an SSE response to watch.
    pub fn socket(&self, peer: SocketAddr) -> Option<Arc<TcpStream>> {
        self.lock_sockets()
            .get(&peer)
            .and_then(|(socket, _)| socket.upgrade())
    }

    /// Takes over, for the direct path, the connection hyper serves an SSE request on (a
    /// browser's `EventSource` on the kept-alive connection that fetched the page). `None`:
    /// not a connection of the accept loop, or hyper has bytes of an earlier response still to
    /// write (the client pipelined); hyper then streams the response itself.
    fn take_over(&self, peer: SocketAddr) -> Option<Taken> {
        let sockets = self.lock_sockets();
        let (socket, handover) = sockets.get(&peer)?;
        let (socket, handover) = (socket.upgrade()?, handover.upgrade()?);
        // hyper is not writing now: the request's handler, which calls this, runs in the
        // connection's task.
        if handover.blocked.load(Ordering::Acquire) || handover.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Taken { socket, handover })
    }

    fn lock_sockets(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, HyperConn>> {
        crate::error::lock(&self.sockets)
    }

    fn refuse(&self, reason: ConnectionRefusal) {
        self.metrics.refused_connection(reason);
    }
}

/// A connection hyper serves, in the front door's registry: its socket (while open) and what
/// lets the direct path take it over.
type HyperConn = (Weak<TcpStream>, Weak<Handover>);

/// Counts a connection as open until dropped.
pub struct Open {
    front: Arc<Front>,
    peer: SocketAddr,
    registered: bool,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.front.metrics.connections.dec();
        if self.registered {
            let mut sockets = self.front.lock_sockets();
            if sockets
                .get(&self.peer)
                .is_some_and(|(socket, _)| socket.strong_count() == 0)
            {
                sockets.remove(&self.peer);
            }
        }
    }
}

/// Counts a connection whose first head is not read yet.
struct Pending<'a>(&'a Front);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.metrics.pending_heads.dec();
    }
}

/// Accepts connections until shutdown; see the module documentation.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    handoff: tokio::sync::mpsc::Sender<(Conn, SocketAddr)>,
    front: Arc<Front>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let _ = front.tasks.set(tasks.clone());
    let mut reserve = std::fs::File::open("/dev/null").ok();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => {
                front.shutdown.cancel();
                return;
            }
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                let exhausted = matches!(error.raw_os_error(), Some(23 | 24)); // ENFILE, EMFILE
                // Logged calmly: the first at once, then a line at most every 10 s.
                if exhausted {
                    crate::throttled!(tracing::Level::ERROR, %error, "out of file descriptors: refusing connections; raise `ulimit -n` or lower `server.max_connections`");
                } else {
                    crate::throttled!(tracing::Level::WARN, %error, "cannot accept a connection");
                }
                if exhausted && reserve.take().is_some() {
                    // Give the reserve up to take the waiting connection off the backlog and
                    // close it: its client gets an answer (a reset) instead of a hang.
                    if let Ok((socket, _)) = listener.accept().await {
                        drop(socket);
                        front.refuse(ConnectionRefusal::Descriptors);
                    }
                    reserve = std::fs::File::open("/dev/null").ok();
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        if reserve.is_none() {
            reserve = std::fs::File::open("/dev/null").ok();
        }
        let Some(open) = admit(&front, &socket, peer) else {
            continue;
        };
        tasks.spawn(serve_connection(
            socket,
            peer,
            open,
            handoff.clone(),
            shutdown.clone(),
        ));
    }
}

/// Counts a new connection in, or answers it `503` past `server.max_connections` or
/// `server.max_pending_heads`.
fn admit(front: &Arc<Front>, socket: &TcpStream, peer: SocketAddr) -> Option<Open> {
    let limits = &front.limits;
    let metrics = &front.metrics;
    let refusal = if !take_place(&metrics.connections, limits.max_connections) {
        (
            ConnectionRefusal::MaxConnections,
            format!(
                "too many connections: this server holds at most {}",
                limits.max_connections
            ),
        )
    } else {
        let open = Open {
            front: front.clone(),
            peer,
            registered: false,
        };
        if take_place(&metrics.pending_heads, limits.max_pending_heads) {
            return Some(open);
        }
        (
            ConnectionRefusal::MaxPendingHeads,
            format!(
                "too many connections still sending their request: at most {}",
                limits.max_pending_heads
            ),
        )
    };
    front.refuse(refusal.0);
    refuse_now(socket, &refusal.1);
    None
}

/// Counts one more in `gauge` if it holds fewer than `max`: the gauges are the counts the caps
/// are checked against, not copies of them.
fn take_place(gauge: &prometheus_client::metrics::gauge::Gauge, max: usize) -> bool {
    if gauge.inc() >= max as i64 {
        gauge.dec();
        false
    } else {
        true
    }
}

/// Answers `503` with a JSON error on a connection that will not be served, without waiting:
/// a new socket's send buffer takes a short answer at once, or the client gets nothing.
fn refuse_now(socket: &TcpStream, message: &str) {
    let response = error_response(503, "Service Unavailable", message);
    let _ = socket.try_write(&response);
}

/// A complete `Connection: close` JSON error response.
pub fn error_response(status: u16, reason: &str, message: &str) -> Vec<u8> {
    let body = crate::error::error_body(message);
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads more of a request head, unless `deadline` fires first (`Err`) or the server shuts
/// down (`None`). The read is polled before the deadline, as `timeout_at` polls them: a head
/// that came in time is served.
async fn read_before(
    socket: &mut TcpStream,
    buffer: &mut BytesMut,
    deadline: Pin<&mut tokio::time::Sleep>,
    shutdown: &CancellationToken,
) -> Option<Result<std::io::Result<usize>, ()>> {
    use tokio::io::AsyncReadExt;
    tokio::select! {
        biased;
        () = shutdown.cancelled() => None,
        read = socket.read_buf(buffer) => Some(Ok(read)),
        () = deadline => Some(Err(())),
    }
}

/// Reads a connection's requests and decides who serves them: the first head must arrive
/// whole within one deadline; a lone `GET /event/fetch` is served here to the end of the
/// connection, a plain `POST /message/broadcast` here too ([`crate::direct_post`]) and the next
/// request read after it; anything else goes to hyper with the bytes already read.
async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    mut open: Open,
    handoff: tokio::sync::mpsc::Sender<(Conn, SocketAddr)>,
    shutdown: CancellationToken,
) {
    let front = open.front.clone();
    // Counted while the first head is read; a keep-alive connection waiting for its next
    // request is not pending (its client has been served).
    let mut pending = Some(Pending(&front));
    let mut socket = socket;
    let mut buffer = BytesMut::with_capacity(1024);
    // The head deadline of a keep-alive connection's next requests, after a direct POST: one
    // timer for the connection, pushed back at each request (a later deadline costs tokio one
    // atomic update, where a new timer goes into its wheel and out again each time); boxed,
    // so that a stream's connection task does not carry it.
    let mut next_head: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let deadline = tokio::time::Instant::now() + front.limits.head_timeout;
        if let Some(sleep) = next_head.as_mut() {
            sleep.as_mut().reset(deadline);
        }
        let head = loop {
            // What is already buffered first: a request pipelined after the last one.
            if !buffer.is_empty()
                && let Some(head) = parse_head(&buffer, peer, &front)
            {
                break head;
            }
            // Room for a head in one read: the requests before leave only the end of the
            // allocation (28 bytes after six 166-byte POSTs), and `read_buf` reads no more than
            // the room there is: a head in two reads, a system call more. Reserving moves what
            // is left to the front of the allocation when it fits there (no new one).
            buffer.reserve(HEAD_READ_ROOM);
            // The connection's timer after a direct POST; before, one for this read.
            let read = match next_head.as_mut() {
                Some(sleep) => {
                    read_before(&mut socket, &mut buffer, sleep.as_mut(), &shutdown).await
                }
                None => {
                    let sleep = std::pin::pin!(tokio::time::sleep_until(deadline));
                    read_before(&mut socket, &mut buffer, sleep, &shutdown).await
                }
            };
            let Some(read) = read else { return };
            match read {
                Ok(Ok(0)) if !buffer.is_empty() => {
                    // The client ended its side in the middle of a head: it may still read.
                    front.refuse(ConnectionRefusal::Malformed);
                    let _ = socket.try_write(&error_response(
                        400,
                        "Bad Request",
                        "the request ended before its head was complete",
                    ));
                    return;
                }
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Err(_) => {
                    if pending.is_some() {
                        front.refuse(ConnectionRefusal::HeadTimeout);
                    }
                    if !buffer.is_empty() {
                        let _ = socket.try_write(&error_response(
                            408,
                            "Request Timeout",
                            "the request head did not arrive in time",
                        ));
                    }
                    return;
                }
                Ok(Ok(_)) => {}
            }
        };
        match head {
            Head::Stream(sse) => {
                drop(pending);
                drop(buffer);
                front.metrics.direct(DirectRequest::Stream);
                serve_sse(socket, peer, sse, &front, &shutdown).await;
                drop(open);
                return;
            }
            Head::Post(post, head_length) => {
                pending = None;
                bytes::Buf::advance(&mut buffer, head_length);
                // Boxed: a POST's state (the publish, its deadline) would otherwise take room in
                // every connection's task, idle SSE clients' among them.
                let after = Box::pin(crate::direct_post::serve(
                    &mut socket,
                    &mut buffer,
                    post,
                    &front.broadcast,
                    front.limits.write_stall,
                    &shutdown,
                ))
                .await;
                if after == After::Close {
                    return;
                }
                next_head
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(front.limits.head_timeout)));
                // A small buffer again for an idle keep-alive connection.
                if buffer.is_empty() && buffer.capacity() > 1024 {
                    buffer = BytesMut::with_capacity(1024);
                }
            }
            Head::Malformed(refused) => {
                front.refuse(ConnectionRefusal::Malformed);
                let answer = error_response(400, "Bad Request", &refused);
                let _ = tokio::time::timeout(
                    front.limits.write_stall,
                    tokio::io::AsyncWriteExt::write_all(&mut socket, &answer),
                )
                .await;
                return;
            }
            Head::Other => break,
        }
    }
    drop(pending);
    let socket = Arc::new(socket);
    open.registered = true;
    let handover = Arc::new(Handover::new(open));
    front
        .lock_sockets()
        .insert(peer, (Arc::downgrade(&socket), Arc::downgrade(&handover)));
    let conn = Conn {
        prefix: buffer.freeze(),
        socket,
        handover,
    };
    let _ = handoff.send((conn, peer)).await;
}

/// Parses a request head: who serves it, or `None` while more bytes are needed. Its own
/// function: the header array (1.5 KiB) is never held across an await, so it takes no room in
/// the connection task's future.
fn parse_head(buffer: &[u8], peer: SocketAddr, front: &Front) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => {
            // Only a lone GET (nothing pipelined after it) is streamed directly.
            if length == buffer.len()
                && let Some(sse) = SseRequest::from_head(&request)
                && !front.has_session(sse.cookie.as_deref())
            {
                return Some(Head::Stream(sse));
            }
            if front.session_cookie.is_none() && front.cors_origins.is_empty() {
                match PostRequest::from_head(&request, peer, front.broadcast.config.max_body_bytes)
                {
                    Some(Ok(post)) => return Some(Head::Post(post, length)),
                    Some(Err(refused)) => return Some(Head::Malformed(refused)),
                    None => {}
                }
            }
            Some(Head::Other)
        }
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD_BYTES => None,
        // Past this path's header slots (hyper takes more) or too long: hyper answers it.
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => Some(Head::Other),
        Err(error) => Some(Head::Malformed(format!(
            "the request is not HTTP/1.x: {error}"
        ))),
    }
}

/// Who serves a request, by its head.
enum Head {
    /// A stream the direct path serves.
    Stream(SseRequest),
    /// A POST the direct path serves, and the head's length.
    Post(PostRequest, usize),
    /// Not a request: the `400`'s message.
    Malformed(String),
    /// For salvo (or past saving: hyper answers it).
    Other,
}

/// What the direct path needs from a parsed `GET /event/fetch`.
#[derive(Debug)]
pub struct SseRequest {
    /// The `room` parameter, checked (`Err`: the rule it breaks, a 400).
    pub room: Result<Option<String>, String>,
    pub last_event_id: Option<String>,
    pub origin: Option<String>,
    /// The query string, and the headers the access hook may read.
    pub query: Option<String>,
    pub hook_headers: Vec<(&'static str, String)>,
    /// The `Cookie` header.
    pub cookie: Option<String>,
}

impl SseRequest {
    /// Reads a parsed request head: `Some` if it is `GET /event/fetch` (any query).
    pub fn from_head(request: &httparse::Request<'_, '_>) -> Option<SseRequest> {
        if request.method != Some("GET") {
            return None;
        }
        let (path, query) = crate::request::path_and_query(request.path?);
        if path != event::FETCH_PATH {
            return None;
        }
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::to_owned)
        };
        Some(SseRequest {
            room: event::query_room(query),
            last_event_id: header("last-event-id")
                .or_else(|| query.and_then(event::query_last_event_id)),
            origin: header("origin"),
            query: query.map(str::to_owned),
            cookie: header("cookie"),
            hook_headers: crate::script::HOOK_HEADERS
                .iter()
                .filter_map(|name| Some((*name, header(name)?)))
                .collect(),
        })
    }
}

/// Why a direct SSE connection ended early.
enum Ended {
    /// The client closed, sent something, or a write failed.
    Gone,
    /// A write made no progress for `server.write_stall_timeout_secs`.
    Stalled,
    /// The hub's sweep cut off a client that stopped reading.
    Aborted,
    /// The server shuts down.
    Shutdown,
    /// The hub ended the stream (shutdown).
    Finished,
    /// The client fell a whole queue behind.
    Lagged,
}

/// Serves an SSE connection whose first request is `GET /event/fetch`; see the module
/// documentation.
async fn serve_sse(
    socket: TcpStream,
    peer: SocketAddr,
    request: SseRequest,
    front: &Front,
    shutdown: &CancellationToken,
) {
    let abort = Arc::new(tokio::sync::Notify::new());
    // The stream's outlet owns the socket: its descriptor is then where the shard's write
    // looks first (see `Outlet`).
    let socket = Socket::Owned(socket);
    let stall = front.limits.write_stall;
    // Registered once: a new `cancelled()` per wake-up would lock the shared token each time,
    // for every client.
    let aborted = abort.notified();
    let cancelled = shutdown.cancelled();
    tokio::pin!(aborted, cancelled);
    let mut stop = Stop { aborted, cancelled };
    // Checked in a plain function: nothing of the request but what it asks for is held on.
    let opened = match check(front, peer, request) {
        Ok(opened) => opened,
        Err(refusal) => {
            refuse(socket, refusal, stall, &mut stop).await;
            return;
        }
    };
    // A node just started fills its history from the broker first (`event.snapshot`).
    front.hub.synced().await;
    // The client's shard writes its frames, this task what the shard leaves when the socket
    // is full. Dropping the guard then takes the client out of its shard and frees its place;
    // dropping the outlet closes the socket.
    match subscribe(front, socket, opened, &abort) {
        Ok((outlet, slot, _guard)) => {
            let ended = stream(&outlet, stall, &mut stop).await;
            after_stream(front, &outlet, &slot, ended);
        }
        Err((outlet, refusal)) => refuse_on(&outlet, refusal, stall, &mut stop).await,
    }
}

/// A stream request checked: its room's name, and the access hook's `on_subscribe`; `Err`:
/// the refusal to answer.
fn check(front: &Front, peer: SocketAddr, request: SseRequest) -> Result<Opened, Vec<u8>> {
    let room = request
        .room
        .map_err(|error| error_response(400, "Bad Request", &error))?;
    if let Some(hook) = &front.access {
        let req = Hook::request(
            room.as_deref().unwrap_or(front.hub.default_room()),
            None,
            &peer.ip().to_string(),
            request.query.as_deref(),
            |name| {
                request
                    .hook_headers
                    .iter()
                    .find(|(known, _)| *known == name)
                    .map(|(_, value)| value.clone())
            },
        );
        if let Access::Refuse { status, reason } = hook.check(crate::script::ON_SUBSCRIBE, req) {
            return Err(error_response(
                status,
                crate::error::reason_phrase(status),
                &reason,
            ));
        }
    }
    Ok(Opened {
        room,
        name: None,
        last_event_id: request.last_event_id,
        origin: request.origin,
    })
}

/// Streams an SSE response on a connection taken over from hyper ([`Front::take_over`]), as
/// [`serve_sse`] does on a connection that opened with the request; salvo's handler made the
/// checks (the room, the access hook, the session's name, the snapshot).
async fn serve_taken(front: Arc<Front>, taken: Taken, opened: Opened) {
    let front = &*front;
    front.metrics.direct(DirectRequest::TakenStream);
    let abort = Arc::new(tokio::sync::Notify::new());
    let aborted = abort.notified();
    let cancelled = front.shutdown.cancelled();
    tokio::pin!(aborted, cancelled);
    let mut stop = Stop { aborted, cancelled };
    let stall = front.limits.write_stall;
    // As in `serve_sse`.
    // The handover stays held (the connection counted open) until the stream ends.
    let Taken { socket, handover } = taken;
    match subscribe(front, Socket::Shared(socket), opened, &abort) {
        Ok((outlet, slot, _guard)) => {
            let ended = stream(&outlet, stall, &mut stop).await;
            after_stream(front, &outlet, &slot, ended);
        }
        Err((outlet, refusal)) => refuse_on(&outlet, refusal, stall, &mut stop).await,
    }
    handover.release();
}

impl event::FrontDoor for Front {
    fn take_over(self: Arc<Self>, peer: SocketAddr, opened: Opened) -> bool {
        // The connections' tasks: shutdown waits for the stream's last frames.
        let Some(tasks) = self.tasks.get().cloned() else {
            return false;
        };
        let Some(taken) = Front::take_over(&self, peer) else {
            return false;
        };
        tasks.spawn(serve_taken(self, taken, opened));
        true
    }

    fn socket(&self, peer: SocketAddr) -> Option<Arc<TcpStream>> {
        Front::socket(self, peer)
    }
}

/// A client's outlet, slot and guard, or its outlet and the refusal to answer.
type Subscribed =
    Result<(Arc<Outlet>, Arc<crate::hub::Slot>, crate::hub::ClientGuard), (Arc<Outlet>, Vec<u8>)>;

/// The client's outlet, with the response head, subscribed to its room (the replay queued
/// behind the head, the live frames from a writer shard); `Err`: the outlet and the `503` to
/// answer on it.
fn subscribe(
    front: &Front,
    socket: Socket,
    opened: Opened,
    abort: &Arc<tokio::sync::Notify>,
) -> Subscribed {
    let cors = opened
        .origin
        .as_deref()
        .and_then(|origin| crate::request::allowed_origin(&front.cors_origins, origin));
    let outlet = Arc::new(Outlet::new(
        socket,
        event::response_head(cors.as_deref()).into(),
    ));
    let subscribed = front.hub.subscribe_outlet(
        opened.room.as_deref(),
        opened.name.as_deref(),
        opened.last_event_id.as_deref(),
        {
            let abort = abort.clone();
            Abort::new(move || abort.notify_one())
        },
        &outlet,
    );
    match subscribed {
        Ok((slot, guard)) => Ok((outlet, slot, guard)),
        Err(refused) => {
            let answer = error_response(503, "Service Unavailable", &refused.to_string());
            Err((outlet, answer))
        }
    }
}

/// What a stream's end leaves to do: count a stalled write; end the stream cleanly when the
/// hub ended it (shutdown, or the client fell too far behind: the browser reconnects).
fn after_stream(front: &Front, outlet: &Outlet, slot: &crate::hub::Slot, ended: Ended) {
    match ended {
        Ended::Stalled => {
            front.hub.metrics().write_stalls.inc();
            tracing::debug!("SSE write stalled; connection closed");
        }
        Ended::Lagged => {
            front.hub.lagged(slot);
            finish(outlet.socket());
        }
        Ended::Finished => finish(outlet.socket()),
        Ended::Gone | Ended::Aborted | Ended::Shutdown => {}
    }
}

/// Writes a refusal (within the stall deadline, watching for shutdown), then the connection
/// closes.
async fn refuse(socket: Socket, answer: Vec<u8>, stall: Duration, stop: &mut Stop<'_, '_>) {
    refuse_on(&Outlet::new(socket, Bytes::new()), answer, stall, stop).await;
}

/// [`refuse`] on a stream's outlet, made before the refusal: the answer replaces what it held.
async fn refuse_on(outlet: &Outlet, answer: Vec<u8>, stall: Duration, stop: &mut Stop<'_, '_>) {
    outlet.answer_instead(answer.into());
    let _ = stream(outlet, stall, stop).await;
}

/// Closes the write side of a stream that ended cleanly (`shutdown(2)`, which does not
/// wait): the client sees the end of the stream after what was written.
fn finish(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
}

/// Writes what the client's outlet holds whenever its shard leaves something there, until
/// something ends the stream. The shard writes everything else itself.
async fn stream(outlet: &Outlet, stall: Duration, stop: &mut Stop<'_, '_>) -> Ended {
    loop {
        match outlet.write_pending() {
            // The wake-up first: one that brings bytes polls nothing else. Shutdown is not
            // watched here but by the hub, which ends every stream then, after what it has
            // queued for it (`Finished`: the client is told cleanly).
            Flushed::Empty => tokio::select! {
                biased;
                () = outlet.woken() => {}
                () = stop.aborted.as_mut() => return Ended::Aborted,
                () = event::closed(outlet.socket()) => return Ended::Gone,
            },
            Flushed::Blocked => {
                let writable = tokio::select! {
                    () = stop.aborted.as_mut() => return Ended::Aborted,
                    () = stop.cancelled.as_mut() => return Ended::Shutdown,
                    writable = tokio::time::timeout(stall, outlet.socket().writable()) => writable,
                };
                match writable {
                    Err(_) => return Ended::Stalled,
                    Ok(Err(_)) => return Ended::Gone,
                    Ok(Ok(())) => {}
                }
            }
            Flushed::Ended(End::Finished) => return Ended::Finished,
            Flushed::Ended(End::Overflowed) => return Ended::Lagged,
            Flushed::Ended(End::Gone) => return Ended::Gone,
        }
    }
}

/// What ends a direct SSE connection from outside: the sweep's abort and shutdown.
struct Stop<'a, 'b> {
    aborted: Pin<&'b mut tokio::sync::futures::Notified<'a>>,
    cancelled: Pin<&'b mut tokio_util::sync::WaitForCancellationFuture<'a>>,
}

/// A connection hyper serves, as the direct path may take it over for an SSE stream
/// ([`Front::take_over`]): hyper's reads then see the end of the connection, its writes (the
/// answer its handler gives) go nowhere, and its shutdown leaves the socket to the stream.
/// hyper then lets the connection go, with its buffers; the stream's task keeps the socket.
struct Handover {
    taken: AtomicBool,
    /// hyper's last write did not complete: its buffer still holds bytes of a response, and
    /// the connection is not taken.
    blocked: AtomicBool,
    /// hyper's task, when its read waits for the socket: the stream's task, which also waits
    /// for the socket to be readable (the client leaving), takes tokio's one reader slot of
    /// a shared socket from it, so hyper is woken by hand when the stream ends
    /// ([`Handover::release`]) to see the end of the connection and let it go.
    reader: Mutex<Option<std::task::Waker>>,
    /// The connection counts as open while hyper or the stream has it.
    _open: Open,
}

impl Handover {
    fn new(open: Open) -> Handover {
        Handover {
            taken: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            reader: Mutex::new(None),
            _open: open,
        }
    }

    /// The stream on a taken connection ended: hyper's task, if it waits to read, is woken
    /// (its reads see the end; it drops its share of the connection).
    fn release(&self) {
        if let Some(reader) = crate::error::lock(&self.reader).take() {
            reader.wake();
        }
    }
}

/// A connection the direct path took over from hyper.
struct Taken {
    socket: Arc<TcpStream>,
    handover: Arc<Handover>,
}

/// A connection handed to hyper: the bytes the accept loop already read come first. The socket
/// is shared with [`Front`]'s registry (readiness-based I/O on `&TcpStream`), so that an SSE
/// request on it can be taken over, or its response watch it for the client closing.
pub struct Conn {
    prefix: Bytes,
    socket: Arc<TcpStream>,
    handover: Arc<Handover>,
}

impl Conn {
    fn taken(&self) -> bool {
        self.handover.taken.load(Ordering::Acquire)
    }

    /// A write on the socket, noting whether it had to wait (`blocked`).
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        write: impl Fn(&TcpStream) -> std::io::Result<usize>,
    ) -> Poll<std::io::Result<usize>> {
        loop {
            if self.socket.poll_write_ready(cx)?.is_pending() {
                self.handover.blocked.store(true, Ordering::Release);
                return Poll::Pending;
            }
            match write(&self.socket) {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                result => {
                    self.handover.blocked.store(false, Ordering::Release);
                    return Poll::Ready(result);
                }
            }
        }
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.taken() {
            // The stream has the socket: hyper sees the end of the connection.
            return Poll::Ready(Ok(()));
        }
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Poll::Ready(ready) = self.socket.poll_read_ready(cx) {
                ready?;
            } else {
                // Remembered for `Handover::release`, then the flag looked at again: a stream
                // that ended meanwhile finds the waker, or this sees it taken.
                *crate::error::lock(&self.handover.reader) = Some(cx.waker().clone());
                if self.taken() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
            let unfilled = buf.initialize_unfilled();
            match self.socket.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.taken() {
            return Poll::Ready(Ok(buf.len()));
        }
        self.poll_write_with(cx, |socket| socket.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.taken() {
            return Poll::Ready(Ok(bufs.iter().map(|buf| buf.len()).sum()));
        }
        self.poll_write_with(cx, |socket| socket.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.taken() {
            // The stream ends the connection its way (cleanly after a last frame, or not).
            return Poll::Ready(Ok(()));
        }
        let result = socket2::SockRef::from(&*self.socket).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match result {
            Err(error) if error.kind() == std::io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

/// The soft limit on open descriptors, raised to the hard limit when it is lower; `None` where
/// it cannot be read.
pub fn descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    limit.current
}

/// `server.max_connections` fitted to the descriptors this process may open.
pub fn fit_max_connections(configured: usize) -> usize {
    match descriptor_limit() {
        Some(limit) => {
            let usable = limit.saturating_sub(RESERVED_DESCRIPTORS).max(16) as usize;
            if usable < configured {
                tracing::warn!(
                    configured,
                    used = usable,
                    descriptors = limit,
                    "`server.max_connections` lowered to fit the descriptor limit (`ulimit -n`)"
                );
                usable
            } else {
                configured
            }
        }
        None => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The front door of a node with default settings and no broker (nothing is sent).
    fn front() -> Arc<Front> {
        let metrics = Metrics::new();
        let acks = crate::acks::Acks::new();
        let hub = Hub::new(crate::hub::test_settings(), metrics.clone(), acks.clone());
        let config = crate::message::MessageConfig::default();
        let (publisher, _push) =
            crate::message::Publisher::new(&config, Vec::new(), 1 << 16, acks, metrics.clone());
        let broadcast = Arc::new(Broadcast {
            config,
            publisher,
            metrics: metrics.clone(),
            sessions: false,
            cors_origins: Arc::new(Vec::new()),
            trusted_proxies: Arc::new(Vec::new()),
            body_timeout: Duration::from_secs(10),
            default_room: Arc::from("general"),
            access: None,
        });
        let limits = Limits {
            max_connections: 16,
            max_pending_heads: 16,
            head_timeout: Duration::from_secs(10),
            write_stall: Duration::from_secs(10),
        };
        Front::new(hub, limits, None, broadcast)
    }

    /// Every idle SSE client holds its connection's task: what that task's future carries
    /// across an await is memory per client. A POST's state (the publish, its deadline) is
    /// boxed for that reason: unboxed it took 1 KiB more per idle client (BENCHMARKS.md).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let ((socket, peer), _client) =
            tokio::join!(async { listener.accept().await.unwrap() }, async {
                client.await.unwrap()
            });
        let front = front();
        let open = Open {
            front: front.clone(),
            peer,
            registered: false,
        };
        let (handoff, _handed) = tokio::sync::mpsc::channel(1);
        let task = serve_connection(socket, peer, open, handoff, CancellationToken::new());
        let size = std::mem::size_of_val(&task);
        assert!(size <= MAX_TASK_BYTES, "{size} bytes");
    }

    /// A loopback connection handed to hyper, as the accept loop hands it (registered with
    /// `front`): the client's side, the peer, the shared socket, its handover, hyper's `Conn`.
    async fn handed_to_hyper(
        front: &Arc<Front>,
    ) -> (TcpStream, SocketAddr, Arc<TcpStream>, Arc<Handover>, Conn) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let ((socket, peer), client) =
            tokio::join!(async { listener.accept().await.unwrap() }, async {
                client.await.unwrap()
            });
        let socket = Arc::new(socket);
        let handover = Arc::new(Handover::new(Open {
            front: front.clone(),
            peer,
            registered: true,
        }));
        front
            .lock_sockets()
            .insert(peer, (Arc::downgrade(&socket), Arc::downgrade(&handover)));
        let conn = Conn {
            prefix: Bytes::new(),
            socket: socket.clone(),
            handover: handover.clone(),
        };
        (client, peer, socket, handover, conn)
    }

    /// A connection hyper serves is taken over once, and not while hyper's last write waits
    /// (bytes of an earlier answer are still in its buffer); once taken, hyper's writes go
    /// nowhere, its reads see the end and its shutdown leaves the socket open for the stream.
    #[tokio::test]
    async fn a_connection_is_taken_over_once_and_not_while_hyper_still_writes() {
        use futures_util::FutureExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let front = front();
        let (mut client, peer, socket, handover, mut conn) = handed_to_hyper(&front).await;
        // hyper writes an answer the client does not read, until the socket is full.
        let mut written = 0;
        while let Some(result) = conn.write(&[b'x'; 1 << 16]).now_or_never() {
            written += result.unwrap();
        }
        assert!(
            front.take_over(peer).is_none(),
            "taken while hyper still writes"
        );
        // The client reads it all; hyper's write completes.
        let mut sink = vec![0u8; 1 << 16];
        let mut read = 0;
        while read < written {
            read += client.read(&mut sink).await.unwrap();
        }
        conn.write_all(b"end").await.unwrap();
        let mut end = [0u8; 3];
        client.read_exact(&mut end).await.unwrap();
        let taken = front
            .take_over(peer)
            .expect("taken once hyper wrote everything");
        assert!(front.take_over(peer).is_none(), "taken twice");
        // hyper's side now.
        conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert_eq!(conn.read(&mut end).await.unwrap(), 0, "hyper sees the end");
        conn.shutdown().await.unwrap();
        drop(conn);
        // The stream's side: only its bytes reach the client, on a socket still open.
        taken.socket.writable().await.unwrap();
        taken.socket.try_write(b"data: 1\n\n").unwrap();
        drop((taken, socket, handover));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"data: 1\n\n");
        // Both let the connection go: it is no longer counted, nor in the registry.
        assert!(front.lock_sockets().get(&peer).is_none());
    }

    /// hyper waiting to read a connection that is then taken: the stream's task takes
    /// tokio's one reader slot of the shared socket (its watch for the client leaving), so
    /// only `Handover::release`, when the stream ends, wakes hyper to see the end.
    #[tokio::test]
    async fn hyper_waiting_to_read_a_taken_connection_is_woken_when_the_stream_ends() {
        use std::sync::atomic::AtomicUsize;
        use std::task::Wake;
        use tokio::io::AsyncRead;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let front = front();
        let (_client, peer, _socket, _handover, mut conn) = handed_to_hyper(&front).await;
        let hyper = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(hyper.clone());
        let mut cx = Context::from_waker(&waker);
        let mut space = [0u8; 16];
        let mut buf = tokio::io::ReadBuf::new(&mut space);
        // hyper waits to read (the client sends nothing).
        assert!(
            Pin::new(&mut conn)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );
        let taken = front.take_over(peer).expect("taken");
        // The stream's watch for the client leaving takes the socket's reader slot.
        let stream = Arc::new(Count(AtomicUsize::new(0)));
        let stream_waker = std::task::Waker::from(stream);
        assert!(
            crate::event::poll_closed(&taken.socket, &mut Context::from_waker(&stream_waker))
                .is_pending()
        );
        assert_eq!(hyper.0.load(Ordering::SeqCst), 0);
        // The stream ends: hyper is woken, and sees the end of the connection.
        taken.handover.release();
        assert_eq!(hyper.0.load(Ordering::SeqCst), 1, "hyper woken");
        assert!(matches!(
            Pin::new(&mut conn).poll_read(&mut cx, &mut buf),
            Poll::Ready(Ok(()))
        ));
        assert!(buf.filled().is_empty(), "the end of the connection");
    }

    /// 1.6 KiB now (1.8 KiB before the request was checked in a plain function; debug and
    /// release builds alike), 2.7 KiB with the POST's state unboxed.
    const MAX_TASK_BYTES: usize = 2048;
}
