//! The Event controller, `GET /event/fetch`: Server-Sent Events from the web node's [`Hub`].
//!
//! The status and headers go out at once (Temma sent nothing until the first message), with a
//! `retry:` hint, then any replay, then each message as
//! `id: <id>\nevent: msg\ndata: <one-line JSON>\n\n`. A comment keep-alive (`: keep-alive`) is
//! sent when the stream has been idle for `event.keepalive_secs`. The stream ends when the client
//! goes away, when it falls too far behind (it reconnects and replays), and on shutdown.

use bytes::{Bytes, BytesMut};
use salvo::http::StatusCode;
use salvo::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use salvo::prelude::*;
use serde::Deserialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::config::DEFAULT_CLIENT_SUB;
use crate::error::JsonError;
use crate::hub::{Hub, Item, MAX_CHUNK_BYTES, Subscription};

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

/// `GET /event/fetch`.
pub struct Fetch {
    pub hub: Hub,
}

#[derive(Deserialize)]
struct Query {
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
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
            .or_else(|| {
                req.parse_queries::<Query>()
                    .ok()
                    .and_then(|q| q.last_event_id)
            });
        let subscription = match self
            .hub
            .subscribe(last_event_id.as_deref(), Some(ctrl.conn().clone()))
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

/// The body of one SSE response.
fn stream(
    hub: Hub,
    subscription: Subscription,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    struct State {
        hub: Hub,
        sub: Subscription,
        head: Option<Bytes>,
        done: bool,
    }
    let head = Some(subscription.head.clone());
    let state = State {
        hub,
        sub: subscription,
        head,
        done: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if let Some(head) = state.head.take() {
            return Some((Ok(head), state));
        }
        if state.done || state.hub.is_dropped(&state.sub.slot) {
            return None;
        }
        loop {
            let first = match state.sub.rx.recv().await {
                Ok(item) => item,
                Err(RecvError::Lagged(_)) => {
                    state.hub.lagged(&state.sub.slot);
                    return None;
                }
                Err(RecvError::Closed) => return None,
            };
            let mut taken = 1u64;
            let mut messages = 0u64;
            let mut chunk = Chunk::default();
            chunk.add(&first, &mut state.sub.skip_until, &mut messages);
            // Coalesce what else is already queued into the same write.
            while chunk.len() < MAX_CHUNK_BYTES {
                match state.sub.rx.try_recv() {
                    Ok(item) => {
                        taken += 1;
                        chunk.add(&item, &mut state.sub.skip_until, &mut messages);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Lagged(_)) => {
                        state.hub.lagged(&state.sub.slot);
                        state.done = true;
                        break;
                    }
                    Err(TryRecvError::Closed) => {
                        state.done = true;
                        break;
                    }
                }
            }
            state.hub.consumed(&state.sub.slot, taken);
            if messages > 0 {
                state.hub.metrics().delivered.inc_by(messages);
            }
            if let Some(bytes) = chunk.finish() {
                return Some((Ok(bytes), state));
            }
            if state.done {
                return None;
            }
        }
    })
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
