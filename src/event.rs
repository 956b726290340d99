//! The Event controller, `GET /event/fetch`: Server-Sent Events from the web node's [`Hub`].
//!
//! The status and headers go out at once (Temma sent nothing until the first message), with a
//! `retry:` hint, then any replay, then each message as
//! `id: <id>\nevent: msg\ndata: <one-line JSON>\n\n`. A comment keep-alive (`: keep-alive`) is
//! sent when the stream has been idle for `event.keepalive_secs`. The stream ends when the client
//! goes away, when it falls too far behind (it reconnects and replays), and on shutdown.
//!
//! Two ways in, one behaviour: a connection whose first request is `GET /event/fetch` is served
//! by [`serve_direct`] straight from the socket (the accept loop in [`crate::server`] sends it
//! here); the same request later on a kept-alive connection reaches [`Fetch`] through salvo.
//! Both read the hub the same way.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use salvo::http::StatusCode;
use salvo::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use salvo::prelude::*;
use serde::Deserialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::config::DEFAULT_CLIENT_SUB;
use crate::error::JsonError;
use crate::hub::{Abort, Hub, Item, MAX_CHUNK_BYTES, Subscription};

/// Default `event.keepalive_secs`.
pub const DEFAULT_KEEPALIVE_SECS: u64 = 15;
/// Default `event.retry_ms`: how soon browsers reconnect after the stream ends.
pub const DEFAULT_RETRY_MS: u64 = 2000;
/// Default `event.queue`: how many frames a client may lag behind before it is disconnected.
pub const DEFAULT_QUEUE: usize = 1024;
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
#[serde(deny_unknown_fields)]
pub struct EventConfig {
    /// Data source of the SUB socket from the broker. Default `"zmq_client_sub"`.
    #[serde(default = "default_sub")]
    pub sub: String,
    /// Seconds of silence before a keep-alive comment; 0 turns them off. Default 15.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u64,
    /// The `retry:` sent to browsers, in milliseconds. Default 2000.
    #[serde(default = "default_retry")]
    pub retry_ms: u64,
    /// Frames a client may lag behind; past that it is disconnected. Default 1024.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Milliseconds a client with a full queue may take nothing before it is disconnected (it
    /// stopped reading). Default 2000.
    #[serde(default = "default_stall")]
    pub stall_ms: u64,
    /// SSE connections this node accepts; more get 503. Default 10000.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Messages kept for replay; 0 turns replay off. Default 1000.
    #[serde(default = "default_history_size")]
    pub history_size: usize,
    /// Seconds a message stays in the history. Default 3600.
    #[serde(default = "default_history_ttl")]
    pub history_ttl_secs: u64,
    /// Newest messages sent to a client that connects without `Last-Event-ID`. Default 50.
    #[serde(default = "default_initial_history")]
    pub initial_history: usize,
}

fn default_sub() -> String {
    DEFAULT_CLIENT_SUB.to_owned()
}
fn default_keepalive() -> u64 {
    DEFAULT_KEEPALIVE_SECS
}
fn default_retry() -> u64 {
    DEFAULT_RETRY_MS
}
fn default_queue() -> usize {
    DEFAULT_QUEUE
}
fn default_stall() -> u64 {
    DEFAULT_STALL_MS
}
fn default_max_clients() -> usize {
    DEFAULT_MAX_CLIENTS
}
fn default_history_size() -> usize {
    DEFAULT_HISTORY_SIZE
}
fn default_history_ttl() -> u64 {
    DEFAULT_HISTORY_TTL_SECS
}
fn default_initial_history() -> usize {
    DEFAULT_INITIAL_HISTORY
}

impl Default for EventConfig {
    fn default() -> Self {
        EventConfig {
            sub: default_sub(),
            keepalive_secs: default_keepalive(),
            retry_ms: default_retry(),
            queue: default_queue(),
            stall_ms: default_stall(),
            max_clients: default_max_clients(),
            history_size: default_history_size(),
            history_ttl_secs: default_history_ttl(),
            initial_history: default_initial_history(),
        }
    }
}

impl EventConfig {
    pub(crate) fn validate(&self, problem: &mut impl FnMut(&str, String)) {
        if self.queue == 0 {
            problem("event.queue", "must be at least 1".to_owned());
        }
        if self.max_clients == 0 {
            problem("event.max_clients", "must be at least 1".to_owned());
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

/// `GET /event/fetch` on a connection hyper serves (one that carried another request first).
/// A connection whose first request is this one is served by [`serve_direct`] instead.
pub struct Fetch {
    pub hub: Hub,
}

/// The `lastEventId` query parameter, if any.
fn query_last_event_id(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "lastEventId")
        .map(|(_, value)| value.into_owned())
}

#[async_trait]
impl Handler for Fetch {
    async fn handle(
        &self,
        req: &mut Request,
        _depot: &mut Depot,
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
        let subscription = match self
            .hub
            .subscribe(last_event_id.as_deref(), Abort::Conn(ctrl.conn().clone()))
        {
            Ok(subscription) => subscription,
            Err(full) => {
                JsonError::new(StatusCode::SERVICE_UNAVAILABLE, full.to_string()).write_to(res);
                return;
            }
        };
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        res.status_code(StatusCode::OK);
        res.stream(stream(self.hub.clone(), subscription));
    }
}

/// The body of one SSE response served by hyper.
fn stream(
    hub: Hub,
    subscription: Subscription,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    let head = Some(subscription.head.clone());
    let reader = Reader {
        hub,
        sub: subscription,
        done: false,
    };
    futures_util::stream::unfold((reader, head), |(mut reader, head)| async move {
        if let Some(head) = head {
            return Some((Ok(head), (reader, None)));
        }
        let chunk = reader.next_chunk().await?;
        Some((Ok(chunk), (reader, None)))
    })
}

/// Takes a client's frames from the hub, a write's worth at a time.
struct Reader {
    hub: Hub,
    sub: Subscription,
    done: bool,
}

impl Reader {
    /// The next bytes to write: every frame already queued for this client (up to
    /// [`MAX_CHUNK_BYTES`]), waiting for one if none is. `None` when the stream must end: the
    /// server shuts down, or the client fell too far behind (it reconnects and replays).
    async fn next_chunk(&mut self) -> Option<Bytes> {
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

/// What the direct path needs from a parsed `GET /event/fetch`.
#[derive(Debug, Default)]
pub struct SseRequest {
    pub last_event_id: Option<String>,
    pub origin: Option<String>,
}

impl SseRequest {
    /// Reads a parsed request head: `Some` if it is `GET /event/fetch` (any query).
    pub fn from_head(request: &httparse::Request<'_, '_>) -> Option<SseRequest> {
        if request.method != Some("GET") {
            return None;
        }
        let target = request.path?;
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        if path != FETCH_PATH {
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
            last_event_id: header("last-event-id").or_else(|| query.and_then(query_last_event_id)),
            origin: header("origin"),
        })
    }
}

/// The SSE route.
pub const FETCH_PATH: &str = "/event/fetch";

/// Serves an SSE connection whose first request is `GET /event/fetch`, without hyper: a
/// response head, then the frames written straight to the socket, the body delimited by the
/// end of the connection (`Connection: close`). Per connection this keeps a task, the socket and
/// the client's place in the hub — a few KB instead of hyper's two 8 KB buffers — and one
/// `write` per frame (or per batch of frames for a client that lags).
pub async fn serve_direct(
    mut socket: tokio::net::TcpStream,
    request: SseRequest,
    hub: Hub,
    cors: Option<String>,
) {
    use tokio::io::AsyncWriteExt;
    let abort = Arc::new(tokio::sync::Notify::new());
    let subscription = match hub.subscribe(
        request.last_event_id.as_deref(),
        Abort::Notify(abort.clone()),
    ) {
        Ok(subscription) => subscription,
        Err(full) => {
            let body = serde_json::json!({ "error": full.to_string() }).to_string();
            let head = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
                 Cache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            return;
        }
    };
    let mut head = Vec::with_capacity(256 + subscription.head.len());
    head.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
          X-Accel-Buffering: no\r\nConnection: close\r\n",
    );
    if let Some(origin) = cors {
        head.extend_from_slice(b"Access-Control-Allow-Origin: ");
        head.extend_from_slice(origin.as_bytes());
        head.extend_from_slice(b"\r\nVary: Origin\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(&subscription.head);
    let mut reader = Reader {
        hub,
        sub: subscription,
        done: false,
    };
    let aborted = abort.notified();
    tokio::pin!(aborted);
    if socket.write_all(&head).await.is_err() {
        return;
    }
    drop(head);
    let mut probe = [0u8; 16];
    loop {
        let chunk = tokio::select! {
            () = &mut aborted => return,
            chunk = reader.next_chunk() => chunk,
            // The client never sends anything: readable means it closed (or misbehaves).
            readable = socket.readable() => {
                if readable.is_err() {
                    return;
                }
                match socket.try_read(&mut probe) {
                    Ok(0) => return,
                    Ok(_) => continue,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
        };
        let Some(chunk) = chunk else {
            // Shutdown or too far behind: end the response, the browser reconnects.
            let _ = socket.shutdown().await;
            return;
        };
        tokio::select! {
            () = &mut aborted => return,
            written = socket.write_all(&chunk) => if written.is_err() { return },
        }
    }
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
        skip_until: &mut Option<crate::broker::MsgId>,
        messages: &mut u64,
    ) {
        if let (Some(limit), Some(id)) = (*skip_until, item.id) {
            if id <= limit {
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
