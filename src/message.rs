//! The Message controller, `POST /message/broadcast`, and the web node's PUSH publisher.
//!
//! A POST carries `from` and `text` as `application/x-www-form-urlencoded`,
//! `multipart/form-data` or JSON. Temma answered `true` to everything; temma answers:
//!
//! - `200` with body `true` once the broker has **published** the message (with
//!   `message.confirm = true`, the default): the node tags each message with a reference
//!   (`ref`), and the answer waits until that message comes back on the node's own SUB socket.
//! - `4xx` with `{"error": …}` for bad input (each case says what was wrong), or when a
//!   moderation script refused the message (`422`, or the script's status such as `429`).
//! - `503` when the message could not be published within `message.publish_timeout_ms`
//!   (broker down, queue full, shutting down). A POST never hangs.
//!
//! One task owns the PUSH socket ([`PushTask::run`]); requests reach it through a bounded
//! queue (`message.queue`; when full a request waits until its deadline, then gets `503`).
//! The zeromq crate's PUSH never recovers once its broker restarted (`ReturnToSender` forever),
//! so the task rebuilds the socket when the broker goes away and resends the returned message.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use salvo::http::StatusCode;
use salvo::prelude::*;
use salvo::session::SessionDepotExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeromq::{PushSocket, Socket, SocketEvent, SocketSend, ZmqError, ZmqMessage};

use crate::acks::{Ack, Acks};
use crate::context::{Context, UnknownDataSource};
use crate::error::{JsonError, write_json};
use crate::metrics::{DropReason, Metrics};
use crate::request::{Head, TrustedProxy};
use crate::socket;

/// Default `message.push`: Temma's data source name.
pub const DEFAULT_CLIENT_PUSH: &str = "zmq_client_push";
/// Default `message.max_from_chars`.
pub const DEFAULT_MAX_FROM_CHARS: usize = 64;
/// Default `message.max_text_chars`.
pub const DEFAULT_MAX_TEXT_CHARS: usize = 2000;
/// Default `message.max_body_bytes`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;
/// Default `message.publish_timeout_ms`.
pub const DEFAULT_PUBLISH_TIMEOUT_MS: u64 = 1000;
/// Default `message.queue`.
pub const DEFAULT_PUSH_QUEUE: usize = 1024;
/// The response header of a `200` that carries the published message's id.
pub const MESSAGE_ID_HEADER: &str = "x-message-id";
/// The session key remembering the sender's name.
pub use crate::session::SESSION_FROM;

/// The `[message]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessageConfig {
    /// Data source of the PUSH socket to the broker. Default `"zmq_client_push"`.
    pub push: String,
    /// Longest sender name, in characters. Default 64.
    pub max_from_chars: usize,
    /// Longest message text, in characters. Default 2000.
    pub max_text_chars: usize,
    /// Largest request body, in bytes; larger gets 413. Default 16384.
    pub max_body_bytes: usize,
    /// How long a POST may wait for its message to be published; then 503. Default 1000.
    pub publish_timeout_ms: u64,
    /// Answer 200 only once the broker published the message (`true`, default), or as soon as
    /// ZeroMQ took it (`false`, Temma's behaviour, for brokers that do not echo `ref`).
    pub confirm: bool,
    /// Messages waiting for the PUSH socket. Default 1024.
    pub queue: usize,
}

fn default_max_from() -> usize {
    DEFAULT_MAX_FROM_CHARS
}
fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_confirm() -> bool {
    true
}

impl Default for MessageConfig {
    fn default() -> Self {
        MessageConfig {
            push: DEFAULT_CLIENT_PUSH.to_owned(),
            max_from_chars: default_max_from(),
            max_text_chars: DEFAULT_MAX_TEXT_CHARS,
            max_body_bytes: default_max_body(),
            publish_timeout_ms: DEFAULT_PUBLISH_TIMEOUT_MS,
            confirm: default_confirm(),
            queue: DEFAULT_PUSH_QUEUE,
        }
    }
}

impl MessageConfig {
    /// The publisher POSTs hand their messages to, and the task that owns the PUSH socket.
    pub fn build(
        &self,
        ctx: &Context,
        acks: Arc<Acks>,
    ) -> Result<(Publisher, PushTask), UnknownDataSource> {
        let addresses = ctx.addresses.targets(ctx.dsn(&self.push)?);
        Ok(Publisher::new(
            self,
            addresses,
            ctx.max_frame_bytes,
            acks,
            ctx.metrics.clone(),
        ))
    }

    pub fn validate(&self, problem: &mut impl FnMut(&str, String)) {
        for (key, value) in [
            ("message.max_from_chars", self.max_from_chars),
            ("message.max_text_chars", self.max_text_chars),
            ("message.max_body_bytes", self.max_body_bytes),
            ("message.queue", self.queue),
        ] {
            if value == 0 {
                problem(key, "is 0: must be at least 1".to_owned());
            }
        }
        if self.publish_timeout_ms == 0 {
            problem(
                "message.publish_timeout_ms",
                "is 0: must be at least 1".to_owned(),
            );
        }
    }
}

/// A message as a web node sends it to the broker. `ref` comes first: the broker keeps it
/// there, and web nodes cut it from the frame they send browsers without parsing it.
struct Wire<'a> {
    reference: Option<&'a str>,
    key: Option<&'a str>,
    client: &'a str,
    room: Option<&'a str>,
    from: &'a str,
    text: &'a str,
}

impl Wire<'_> {
    /// The frame, `{"ref":…,"key":…,"client":…,"room":…,"from":…,"text":…}` (compact, members
    /// without a value left out), and where its members are, known from writing it: what the
    /// broker's scan would find in it (a test compares them).
    fn write(&self) -> (Vec<u8>, Layout) {
        let members = [
            (crate::wire::REF, self.reference),
            (crate::wire::KEY, self.key),
            (crate::wire::CLIENT, Some(self.client)),
            (crate::wire::ROOM, self.room),
            ("from", Some(self.from)),
            ("text", Some(self.text)),
        ];
        let length: usize = members
            .iter()
            .map(|(name, value)| name.len() + value.map_or(0, str::len) + 6)
            .sum();
        let mut out = Vec::with_capacity(length + 2);
        let mut layout = Layout {
            members: 0,
            plain: true,
            reference: None,
            key: None,
            room: RoomSpan::None,
            key_member: None,
            client_member: None,
        };
        out.push(b'{');
        for (name, value) in members {
            let Some(value) = value else { continue };
            if layout.members > 0 {
                out.push(b',');
            }
            layout.members += 1;
            let start = out.len();
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            let quoted = out.len();
            // What JSON escapes (RFC 8259: `"`, `\`, control characters), looked for in one
            // pass without branching on each byte; most values have none.
            let escaped = value.bytes().fold(false, |any, b| {
                any | (b < 0x20) | (b == b'"') | (b == b'\\')
            });
            if escaped {
                serde_json::to_writer(&mut out, value).expect("a string serializes");
            } else {
                out.push(b'"');
                out.extend_from_slice(value.as_bytes());
                out.push(b'"');
            }
            let end = out.len();
            let plain = (!escaped).then_some(quoted + 1..end - 1);
            match name {
                crate::wire::REF => layout.reference = plain,
                crate::wire::KEY => {
                    layout.key = plain;
                    layout.key_member = Some(start..end);
                }
                crate::wire::CLIENT => layout.client_member = Some(start..end),
                crate::wire::ROOM => {
                    layout.room = plain.map_or(RoomSpan::Other, RoomSpan::Plain);
                }
                _ => {}
            }
        }
        out.push(b'}');
        (out, layout)
    }
}

/// Why a message could not be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// The broker could not be reached or did not answer in time: 503.
    Unavailable(String),
    /// A moderation script refused the message.
    Rejected { reason: String, status: u16 },
}

use crate::wire::{Layout, Outgoing, RoomSpan};

/// Hands messages to the PUSH task and waits for their outcome.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Outgoing>,
    acks: Arc<Acks>,
    timeout: Duration,
    confirm: bool,
    /// The embedded broker of this process, when it serves this node (the queue then goes
    /// to its task, not to a PUSH socket): a POST publishes on its own task when it can.
    inline: Option<crate::broker::Inline>,
    /// `broker.max_frame_bytes`: a larger frame is refused here (a broker would drop it, and
    /// disconnect the PUSH socket that sent it).
    max_frame_bytes: usize,
}

/// The PUSH socket's owner; see [`PushTask::run`].
pub struct PushTask {
    rx: mpsc::Receiver<Outgoing>,
    /// Where the PUSH socket connects; a new value (SIGHUP) moves it there.
    pub addresses: tokio::sync::watch::Sender<Vec<String>>,
    /// The most a peer may send (a PULL sends nothing).
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Publisher {
    pub fn new(
        config: &MessageConfig,
        addresses: Vec<String>,
        max_message_bytes: usize,
        acks: Arc<Acks>,
        metrics: Arc<Metrics>,
    ) -> (Publisher, PushTask) {
        let (tx, rx) = mpsc::channel(config.queue);
        (
            Publisher {
                tx,
                acks,
                timeout: Duration::from_millis(config.publish_timeout_ms),
                confirm: config.confirm,
                inline: None,
                max_frame_bytes: max_message_bytes,
            },
            PushTask {
                rx,
                addresses: tokio::sync::watch::Sender::new(addresses),
                max_message_bytes,
                metrics,
            },
        )
    }

    /// Publishes through the embedded broker of this process, which serves this node's queue
    /// ([`crate::broker::Broker::serve_locally`]): on the POST's own task when its relay is free.
    pub fn serve_inline(&mut self, inline: crate::broker::Inline) {
        self.inline = Some(inline);
    }

    /// Publishes one message and waits for its outcome, at most `publish_timeout_ms`: its id
    /// once published (`None` with `confirm = false`: ZeroMQ took it, nobody said its id).
    pub async fn publish(
        &self,
        message: &Checked,
        client: &str,
    ) -> Result<Option<crate::wire::MsgId>, PublishError> {
        // The frame for the broker, tagged with `reference` (the POST's, when it waits for it).
        let write = |reference: Option<&str>| {
            let wire = Wire {
                reference,
                key: message.key.as_deref(),
                client,
                room: message.room.as_deref(),
                from: &message.from,
                text: &message.text,
            };
            let (frame, layout) = wire.write();
            self.fits(&frame).map(|()| (frame, layout))
        };
        // The embedded broker's relay, free, and no earlier message waiting for it in the
        // queue: published here and now (no hand-off to the broker's task, no reference to
        // wait on: the relay says the id).
        if self.tx.capacity() == self.tx.max_capacity()
            && let Some(inline) = &self.inline
            && let Some(room) = &message.room
            && let Some(desk) = inline.desk(room)
        {
            let (frame, layout) = write(None)?;
            return match desk.publish(&frame, &layout) {
                Ok(id) => Ok(self.confirm.then_some(id)),
                Err(reason) => Err(PublishError::Unavailable(format!(
                    "the broker dropped the message ({reason:?})"
                ))),
            };
        }
        let deadline = Instant::now() + self.timeout;
        let ms = self.timeout.as_millis();
        // Sent to the broker, not confirmed: it may still be published later.
        let unconfirmed = |what: &str| {
            PublishError::Unavailable(format!(
                "{what} within {ms} ms: the message may still appear; to retry without \
                 sending it twice, send it again with the same `Idempotency-Key`"
            ))
        };
        let shutting_down = || PublishError::Unavailable("the server is shutting down".into());
        // Confirming: wait for the message to come back published. Otherwise: wait for ZeroMQ
        // to take it.
        let mut pending = None;
        let mut taken = None;
        let sent = if self.confirm {
            pending = Some(self.acks.register(deadline));
            None
        } else {
            let (tx, rx) = oneshot::channel();
            taken = Some(rx);
            Some(tx)
        };
        let (frame, layout) = write(pending.as_ref().map(|r| r.reference.as_str()))?;
        let outgoing = Outgoing {
            frame: frame.into(),
            layout: Some(layout),
            deadline,
            report: false,
            sent,
        };
        match tokio::time::timeout_at(deadline, self.tx.send(outgoing)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(shutting_down()),
            Err(_) => {
                return Err(PublishError::Unavailable(format!(
                    "the server is busy: the queue to the broker did not free up within {ms} \
                     ms; the message was not sent, try again"
                )));
            }
        }
        if let Some(mut registration) = pending {
            // No timer of its own: the acks' deadline task answers `Expired` at the deadline.
            match (&mut registration.outcome).await {
                Ok(Ack::Published(id)) => Ok(id),
                Ok(Ack::Rejected { reason, status }) => {
                    Err(PublishError::Rejected { reason, status })
                }
                Ok(Ack::Expired) => Err(unconfirmed("the broker did not confirm the message")),
                Err(_) => Err(shutting_down()),
            }
        } else {
            let taken = taken.expect("created when not confirming");
            match tokio::time::timeout_at(deadline, taken).await {
                Ok(Ok(())) => Ok(None),
                Ok(Err(_)) | Err(_) => Err(unconfirmed("the broker could not be reached")),
            }
        }
    }
}

impl Publisher {
    /// A `413` for a frame larger than the broker takes.
    fn fits(&self, frame: &[u8]) -> Result<(), PublishError> {
        if frame.len() <= self.max_frame_bytes {
            return Ok(());
        }
        Err(PublishError::Rejected {
            reason: format!(
                "the message is {} bytes as the broker gets it, over the {} it takes \
                 (`broker.max_frame_bytes`): send a shorter text",
                frame.len(),
                self.max_frame_bytes
            ),
            status: 413,
        })
    }

    /// Queues a presence report for the broker, if there is room: a report that cannot go now
    /// is replaced by the next one.
    pub fn send_report(&self, frame: Bytes) {
        let _ = self.tx.try_send(Outgoing {
            frame,
            layout: None,
            deadline: Instant::now() + crate::hub::PRESENCE_INTERVAL,
            report: true,
            sent: None,
        });
    }
}

impl PushTask {
    /// The queue of frames for the broker, for a broker that takes them itself (the embedded
    /// one, in the same process): no PUSH socket, no loopback hop.
    pub fn into_queue(self) -> mpsc::Receiver<Outgoing> {
        self.metrics.push_connected.set(1);
        self.rx
    }

    /// Owns the PUSH socket until shutdown: connects (retrying), sends what requests queue,
    /// and rebuilds the socket whenever the broker goes away, resending the message in hand.
    /// Messages whose request already gave up (deadline passed) are dropped, not sent late.
    ///
    /// A new address list (`addresses`, on SIGHUP) makes it connect there; the old socket is
    /// kept a moment so that what it holds is still sent.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut in_hand: Option<Outgoing> = None;
        let mut targets = self.addresses.subscribe();
        loop {
            let limit = self.max_message_bytes;
            let make = || PushSocket::with_options(socket::connect_options(limit));
            let addresses = targets.borrow_and_update().clone();
            let connected = tokio::select! {
                connected = socket::connect(make, &addresses, "PUSH", &shutdown) => connected,
                // Rewired while still connecting: connect to the new addresses instead.
                // (A closed channel: no rewiring will come; the branch is disabled.)
            Ok(()) = targets.changed() => continue,
            };
            let Some(mut push) = connected else {
                return;
            };
            let mut events = push.monitor();
            self.metrics.push_connected.set(1);
            let mut rewired = false;
            loop {
                let item = match in_hand.take() {
                    Some(item) => item,
                    None => tokio::select! {
                        () = shutdown.cancelled() => {
                            self.metrics.push_connected.set(0);
                            return;
                        }
                        changed = targets.changed() => {
                            if changed.is_ok() {
                                tracing::info!(addresses = ?*targets.borrow(), "PUSH socket rewired");
                                // What the old socket still holds goes out before it closes.
                                tokio::spawn(async move {
                                    tokio::time::sleep(REWIRE_LINGER).await;
                                    drop(push);
                                });
                                rewired = true;
                                break;
                            }
                            continue;
                        }
                        event = futures_util::StreamExt::next(&mut events) => match event {
                            Some(SocketEvent::Disconnected(_)) | None => break,
                            Some(_) => continue,
                        },
                        item = self.rx.recv() => match item {
                            Some(item) => item,
                            None => return,
                        },
                    },
                };
                if Instant::now() >= item.deadline {
                    if !item.report {
                        self.metrics.dropped(DropReason::Expired);
                    }
                    continue;
                }
                match push.send(ZmqMessage::from(item.frame.clone())).await {
                    Ok(()) => {
                        if let Some(sent) = item.sent {
                            let _ = sent.send(());
                        }
                    }
                    Err(error) => {
                        if !matches!(error, ZmqError::ReturnToSender { .. }) {
                            tracing::warn!(%error, "PUSH socket failed");
                        }
                        in_hand = Some(item);
                        break;
                    }
                }
            }
            self.metrics.push_connected.set(0);
            if !rewired {
                tracing::warn!("broker went away; reconnecting the PUSH socket");
            }
        }
    }
}

/// How long a socket replaced by a rewiring stays open, for what it still holds.
pub const REWIRE_LINGER: Duration = Duration::from_secs(1);

/// The two fields of a chat message, as sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fields {
    pub from: Option<String>,
    pub text: Option<String>,
    /// The idempotency key, when given as a field rather than a header.
    pub key: Option<String>,
    /// The room, when given.
    pub room: Option<String>,
}

impl Fields {
    fn set(&mut self, name: &str, value: String) -> Result<(), JsonError> {
        let slot = match name {
            "from" => &mut self.from,
            "text" => &mut self.text,
            "key" => &mut self.key,
            "room" => &mut self.room,
            other => {
                return Err(JsonError::bad_request(format!(
                    "unknown field `{}`; a message has `from`, `text`, and optionally `room` and `key`",
                    other.escape_default()
                )));
            }
        };
        if slot.is_some() {
            return Err(JsonError::bad_request(format!(
                "field `{name}` is given more than once"
            )));
        }
        *slot = Some(value);
        Ok(())
    }
}

/// Reads the fields of a request body according to its content type.
pub async fn parse_body(content_type: Option<&str>, body: Bytes) -> Result<Fields, JsonError> {
    let unsupported = || {
        JsonError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported content type `{}`; send application/x-www-form-urlencoded, \
                 multipart/form-data or application/json",
                content_type.unwrap_or("(none)")
            ),
        )
    };
    // The two a chat client sends, as they come without parameters: known without parsing.
    if let Some(ct) = content_type {
        if ct.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return parse_urlencoded(&body);
        }
        if ct.eq_ignore_ascii_case("application/json") {
            return parse_json(&body);
        }
    }
    let Some(mime) = content_type.and_then(|ct| ct.parse::<mime::Mime>().ok()) else {
        return Err(unsupported());
    };
    match (mime.type_(), mime.subtype()) {
        (mime::APPLICATION, mime::WWW_FORM_URLENCODED) => parse_urlencoded(&body),
        (mime::APPLICATION, mime::JSON) => parse_json(&body),
        (mime::MULTIPART, mime::FORM_DATA) => {
            let boundary = multra::parse_boundary(content_type.unwrap_or_default())
                .map_err(|_| JsonError::bad_request("multipart body without a boundary"))?;
            parse_multipart(body, boundary).await
        }
        _ => Err(unsupported()),
    }
}

/// `bytes` as text; `what` names them in the error (made only then: a form's every field
/// passes here).
fn utf8(bytes: Cow<'_, [u8]>, what: impl FnOnce() -> String) -> Result<Cow<'_, str>, JsonError> {
    let text = match bytes {
        Cow::Borrowed(bytes) => std::str::from_utf8(bytes).map(Cow::Borrowed).ok(),
        Cow::Owned(bytes) => String::from_utf8(bytes).map(Cow::Owned).ok(),
    };
    text.ok_or_else(|| JsonError::bad_request(format!("{} is not valid UTF-8", what())))
}

/// A name or value of a form body, decoded (`+` is a space, `%XX` a byte): as it is, without
/// a copy, when there is nothing to decode.
fn decode_form(part: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr2(b'+', b'%', part).is_none() {
        return Cow::Borrowed(part);
    }
    let plus: Vec<u8> = part
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    // Without a `%`, the bytes as they are: no second buffer grown byte by byte.
    match Cow::from(percent_encoding::percent_decode(&plus)) {
        Cow::Borrowed(_) => Cow::Owned(plus),
        Cow::Owned(decoded) => Cow::Owned(decoded),
    }
}

fn parse_urlencoded(body: &[u8]) -> Result<Fields, JsonError> {
    let mut fields = Fields::default();
    for pair in body.split(|b| *b == b'&').filter(|pair| !pair.is_empty()) {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = utf8(decode_form(name), || "a field name".to_owned())?;
        let value = utf8(decode_form(value), || {
            format!("field `{}`", name.escape_default())
        })?
        .into_owned();
        if name.ends_with("[]") {
            return Err(JsonError::bad_request(format!(
                "field `{}` is an array; `from` and `text` are single values",
                name.escape_default()
            )));
        }
        fields.set(&name, value)?;
    }
    Ok(fields)
}

fn parse_json(body: &[u8]) -> Result<Fields, JsonError> {
    // Read the members in order, each kept: serde_json's map would keep the last of a key given
    // twice without a word, and a key given twice is refused like in a form.
    let Members(members) = serde_json::from_slice(body).map_err(|error| {
        if error.is_data() {
            JsonError::bad_request(
                "the JSON body must be an object: {\"from\": \"…\", \"text\": \"…\"}",
            )
        } else {
            JsonError::bad_request(format!("the body is not valid JSON: {error}"))
        }
    })?;
    let mut fields = Fields::default();
    for (name, value) in members {
        match value {
            serde_json::Value::String(value) => fields.set(&name, value)?,
            serde_json::Value::Null
                if matches!(name.as_str(), "from" | "text" | "key" | "room") => {}
            other => {
                fields.set(&name, String::new())?;
                return Err(JsonError::bad_request(format!(
                    "field `{name}` must be a string, not {}",
                    match other {
                        serde_json::Value::Array(_) => "an array",
                        serde_json::Value::Object(_) => "an object",
                        serde_json::Value::Number(_) => "a number",
                        serde_json::Value::Bool(_) => "a boolean",
                        _ => "null",
                    }
                )));
            }
        }
    }
    Ok(fields)
}

/// A JSON object's members in order, duplicates included.
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> serde::de::Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(2);
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

async fn parse_multipart(body: Bytes, boundary: String) -> Result<Fields, JsonError> {
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multra::Multipart::new(stream, boundary);
    let mut fields = Fields::default();
    let malformed =
        |error: multra::Error| JsonError::bad_request(format!("malformed multipart body: {error}"));
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        if field.file_name().is_some() {
            return Err(JsonError::bad_request(format!(
                "field `{}` is a file upload; send text fields",
                name.escape_default()
            )));
        }
        if name.ends_with("[]") {
            return Err(JsonError::bad_request(format!(
                "field `{}` is an array; `from` and `text` are single values",
                name.escape_default()
            )));
        }
        let bytes = field.bytes().await.map_err(malformed)?;
        let value = utf8(Cow::Borrowed(&bytes), || {
            format!("field `{}`", name.escape_default())
        })?
        .into_owned();
        fields.set(&name, value)?;
    }
    Ok(fields)
}

/// A message ready to publish: both fields trimmed, present and within limits.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub from: String,
    pub text: String,
    /// The client's idempotency key, if it sent one.
    pub key: Option<String>,
    /// The room, checked and case-folded; `None` when the sender named none.
    pub room: Option<String>,
}

/// The longest idempotency key.
pub const MAX_KEY_CHARS: usize = 64;

/// Applies the rules for both fields and the idempotency key.
///
/// - Both are trimmed; a missing or blank one is refused (Temma's `"0"` quirk is not kept).
/// - `from` may hold no control character at all (a name is one line), no format or other
///   invisible character (zero-width spaces and joiners, bidirectional controls, fillers: a
///   name that looks like another must be another), and no whitespace but the space.
/// - `text` may hold line feeds and tabs (multi-line messages); CR LF and lone CR become LF;
///   any other control character (NUL, ESC, …) is refused, and so is a text with nothing
///   visible (only invisible characters and spaces). SSE frames cannot be split either way:
///   the JSON data line escapes every control character.
/// - Lengths are counted in characters, after trimming.
/// - The key, if any, is 1 to 64 of `A-Z a-z 0-9 . _ : -` (a UUID fits).
pub fn check(fields: Fields, config: &MessageConfig) -> Result<Checked, JsonError> {
    let from = check_field("from", fields.from, config.max_from_chars, false)?;
    let text = check_field("text", fields.text, config.max_text_chars, true)?;
    let key = fields.key.map(|key| check_key(&key)).transpose()?;
    let room = fields
        .room
        .map(|room| crate::wire::room_name(room.trim()).map_err(JsonError::bad_request))
        .transpose()?;
    Ok(Checked {
        from,
        text,
        key,
        room,
    })
}

/// Checks an idempotency key.
pub fn check_key(key: &str) -> Result<String, JsonError> {
    let valid = (1..=MAX_KEY_CHARS).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        Ok(key.to_owned())
    } else {
        Err(JsonError::bad_request(format!(
            "the idempotency key must be 1 to {MAX_KEY_CHARS} of A-Z, a-z, 0-9, `.`, `_`, `:` \
             and `-` (a UUID fits)"
        )))
    }
}

/// Code points that show nothing: Unicode's Default_Ignorable_Code_Point (zero-width spaces
/// and joiners, bidirectional controls, variation selectors, fillers, tags…, from
/// DerivedCoreProperties.txt, Unicode 16), plus the Braille blank, which renders as a space.
const INVISIBLE: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{034F}', '\u{034F}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180B}', '\u{180F}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{206F}'),
    ('\u{2800}', '\u{2800}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FE00}', '\u{FE0F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFA0}', '\u{FFA0}'),
    ('\u{FFF0}', '\u{FFF8}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0000}', '\u{E0FFF}'),
];

/// Whether a character shows nothing (see [`INVISIBLE`]).
pub fn is_invisible(c: char) -> bool {
    INVISIBLE
        .iter()
        .any(|(low, high)| (*low..=*high).contains(&c))
}

fn check_field(
    name: &str,
    value: Option<String>,
    max_chars: usize,
    multiline: bool,
) -> Result<String, JsonError> {
    let Some(value) = value else {
        return Err(JsonError::bad_request(format!("field `{name}` is missing")));
    };
    let mut value = if multiline && value.contains('\r') {
        value.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        value
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(JsonError::bad_request(format!("field `{name}` is blank")));
    }
    let start = trimmed.as_ptr() as usize - value.as_ptr() as usize;
    let end = start + trimmed.len();
    // Printable ASCII (most names and messages): no control character, nothing invisible,
    // something visible (trimmed, it starts with one), a character a byte. One pass over the
    // bytes, without branching on each.
    let printable = trimmed
        .bytes()
        .fold(true, |all, b| all & (b' '..=b'~').contains(&b));
    if !printable {
        check_characters(name, trimmed, multiline)?;
    }
    let chars = if printable {
        trimmed.len()
    } else {
        trimmed.chars().count()
    };
    if chars > max_chars {
        return Err(JsonError::bad_request(format!(
            "`{name}` is too long: {chars} of {max_chars} characters"
        )));
    }
    // Trimmed in place: no copy.
    value.truncate(end);
    value.drain(..start);
    Ok(value)
}

/// The checks of a field's characters beyond printable ASCII: control characters (line feeds
/// and tabs allowed in `multiline` fields), invisible ones in single-line fields, something
/// visible.
fn check_characters(name: &str, value: &str, multiline: bool) -> Result<(), JsonError> {
    if let Some(c) = value
        .chars()
        .find(|c| c.is_control() && !(multiline && (*c == '\n' || *c == '\t')))
    {
        return Err(JsonError::bad_request(format!(
            "field `{name}` contains the control character U+{:04X}{}",
            c as u32,
            if multiline {
                "; only line feeds and tabs are allowed"
            } else {
                ""
            }
        )));
    }
    if !multiline
        && let Some(c) = value
            .chars()
            .find(|c| is_invisible(*c) || (c.is_whitespace() && *c != ' '))
    {
        return Err(JsonError::bad_request(format!(
            "field `{name}` contains the invisible character U+{:04X}; a name may hold \
             visible characters and spaces only",
            c as u32
        )));
    }
    if value.chars().all(|c| c.is_whitespace() || is_invisible(c)) {
        return Err(JsonError::bad_request(format!(
            "field `{name}` has nothing visible in it"
        )));
    }
    Ok(())
}

/// `POST /message/broadcast`.
pub struct Broadcast {
    pub config: MessageConfig,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    pub sessions: bool,
    /// `server.cors_origins`: the other sites allowed to post.
    pub cors_origins: Arc<Vec<String>>,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Arc<Vec<TrustedProxy>>,
    /// `server.body_timeout_secs`.
    pub body_timeout: Duration,
    /// `rooms.default`: the room of a message that names none.
    pub default_room: Arc<str>,
    /// The access hook, if any: `on_publish` runs before a message is sent to the broker.
    pub access: Option<crate::script::Hook>,
}

/// The outcome of a POST: the published id (`None` with `message.confirm = false`) and the
/// sender's name, or the error to answer.
pub type Posted = Result<(Option<crate::wire::MsgId>, String), JsonError>;

impl Broadcast {
    /// Who sends: refuses a cross-site browser request, and reads the client address and the
    /// `Idempotency-Key` header.
    pub fn sender(&self, req: &(impl Head + ?Sized)) -> Result<Sender, JsonError> {
        crate::request::check_origin(
            req.header("sec-fetch-site"),
            req.header("origin"),
            req.header("host"),
            &self.cors_origins,
        )
        .map_err(|refused| JsonError::new(StatusCode::FORBIDDEN, refused.0))?;
        // Present but not visible ASCII: refused as an empty key would be.
        let key = req
            .has_header("idempotency-key")
            .then(|| check_key(req.header("idempotency-key").unwrap_or_default()))
            .transpose()?;
        Ok(Sender {
            client: crate::request::client_of(req, &self.trusted_proxies),
            key,
        })
    }

    /// Reads, checks and publishes a POST's body (whole, read by the caller), for `sender`;
    /// `session_from` is the name the session remembers, for a POST that gives none.
    pub async fn post(
        &self,
        req: &(impl Head + ?Sized),
        sender: Sender,
        body: Bytes,
        session_from: impl FnOnce() -> Option<String>,
    ) -> Posted {
        let mut fields = parse_body(req.header("content-type"), body).await?;
        if self.sessions && fields.from.as_deref().is_none_or(|f| f.trim().is_empty()) {
            fields.from = session_from();
        }
        let mut checked = check(fields, &self.config)?;
        // Always named for the broker: scripts read `msg.room` whatever the sender gave.
        checked
            .room
            .get_or_insert_with(|| self.default_room.to_string());
        match (&checked.key, sender.key) {
            (Some(field), Some(header)) if *field != header => {
                return Err(JsonError::bad_request(
                    "the `Idempotency-Key` header and the `key` field differ; send one",
                ));
            }
            (None, Some(header)) => checked.key = Some(header),
            _ => {}
        }
        if let Some(hook) = &self.access {
            crate::event::check_access(
                hook,
                crate::script::ON_PUBLISH,
                checked.room.as_deref().unwrap_or(&self.default_room),
                Some(&checked.from),
                &sender.client,
                req,
                Some(&checked.text),
            )?;
        }
        let started = std::time::Instant::now();
        match self.publisher.publish(&checked, &sender.client).await {
            Ok(id) => {
                self.metrics
                    .publish_latency
                    .observe(started.elapsed().as_secs_f64());
                Ok((id, checked.from))
            }
            Err(PublishError::Unavailable(message)) => {
                Err(JsonError::new(StatusCode::SERVICE_UNAVAILABLE, message))
            }
            Err(PublishError::Rejected { reason, status }) => Err(JsonError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
                reason,
            )),
        }
    }

    /// Counts an answer by its status.
    pub fn count(&self, status: StatusCode) {
        self.metrics.post_answered(status.as_u16());
    }

    /// The answer to a body that did not arrive within `server.body_timeout_secs`.
    pub fn body_timed_out(&self) -> JsonError {
        JsonError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} s",
                self.body_timeout.as_secs()
            ),
        )
    }

    /// Everything a POST salvo serves needs: the sender, the body, the session.
    async fn answer(&self, req: &mut Request, depot: &mut Depot) -> Posted {
        let sender = self.sender(req)?;
        let body = self.body(req).await?;
        let session_from = || depot.session().and_then(|s| s.get::<String>(SESSION_FROM));
        let (id, from) = self.post(req, sender, body, session_from).await?;
        if self.sessions
            && let Some(session) = depot.session_mut()
        {
            let _ = session.insert(SESSION_FROM, &from);
        }
        Ok((id, from))
    }

    /// The whole body, within `server.body_timeout_secs` and `message.max_body_bytes`.
    async fn body(&self, req: &mut Request) -> Result<Bytes, JsonError> {
        let read = req.payload_with_max_size(self.config.max_body_bytes);
        match tokio::time::timeout(self.body_timeout, read).await {
            Err(_) => Err(self.body_timed_out()),
            Ok(Ok(body)) => Ok(body.clone()),
            Ok(Err(salvo::http::ParseError::PayloadTooLarge)) => Err(JsonError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than {} bytes",
                    self.config.max_body_bytes
                ),
            )),
            Ok(Err(error)) if ended_early(&error) => Err(JsonError::bad_request(format!(
                "the request ended before its body was complete{}",
                req.header::<u64>("content-length")
                    .map(|length| format!(" ({length} bytes announced)"))
                    .unwrap_or_default()
            ))),
            Ok(Err(error)) => Err(JsonError::bad_request(format!(
                "cannot read the body: {error}"
            ))),
        }
    }
}

/// Whether reading a body failed because the client ended its side before the body was
/// complete: hyper's end of input before the announced length (an `UnexpectedEof` in the
/// error's chain) or its incomplete message.
fn ended_early(error: &salvo::http::ParseError) -> bool {
    use salvo::http::ParseError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = match error {
        ParseError::Other(error) => Some(error.as_ref()),
        ParseError::Hyper(error) => Some(error),
        ParseError::Io(error) => Some(error),
        _ => None,
    };
    while let Some(error) = source {
        let early = error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::UnexpectedEof)
            || error
                .downcast_ref::<salvo::hyper::Error>()
                .is_some_and(salvo::hyper::Error::is_incomplete_message);
        if early {
            return true;
        }
        source = error.source();
    }
    false
}

/// Who sends a POST: the client (as scripts see it) and its `Idempotency-Key` header.
pub struct Sender {
    pub client: String,
    pub key: Option<String>,
}

/// `POST /message/broadcast` as salvo serves it (with sessions, CORS, or a request the direct
/// path leaves to hyper).
pub struct BroadcastHandler(pub Arc<Broadcast>);

#[async_trait]
impl Handler for BroadcastHandler {
    async fn handle(
        &self,
        req: &mut Request,
        depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        let status = match self.0.answer(req, depot).await {
            Ok((id, _)) => {
                res.status_code(StatusCode::OK);
                // The published id, so that a page can tell its own message among the stream's
                // (the body stays Temma's `true`).
                if let Some(value) =
                    id.and_then(|id| salvo::http::HeaderValue::from_str(&id.to_string()).ok())
                {
                    res.headers_mut().insert(MESSAGE_ID_HEADER, value);
                }
                write_json(res, &serde_json::Value::Bool(true));
                StatusCode::OK
            }
            Err(error) => {
                error.write_to(res);
                error.status
            }
        };
        self.0.count(status);
        ctrl.skip_rest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<Fields, JsonError> {
        parse_urlencoded(body.as_bytes())
    }

    fn fields(from: &str, text: &str) -> Fields {
        Fields {
            from: Some(from.into()),
            text: Some(text.into()),
            key: None,
            room: None,
        }
    }

    /// A map serialized with its members in the given order (as the frame's derived
    /// serialization was).
    struct InOrder<'a>(Vec<(&'a str, &'a str)>);

    impl serde::Serialize for InOrder<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().copied())
        }
    }

    #[test]
    fn a_frame_the_node_writes_is_laid_out_as_the_broker_scan_finds_it() {
        use crate::broker::{Stamped, Stamper};
        let texts = [
            "hello",
            "say \"hi\"",
            "back\\slash",
            "two\nlines",
            "tab\there",
            "bell\u{7}del\u{7f}",
            "unit\u{1f}separator",
            "Zoé ünïcode 🎉",
            "</script>",
        ];
        let reference = "0123456789abcdef-00112233445566778899aabbccddeeff";
        for reference in [None, Some(reference)] {
            for key in [None, Some("k-1"), Some("odd\"key")] {
                for room in [None, Some("lobby"), Some("r\\oom")] {
                    for text in texts {
                        let wire = Wire {
                            reference,
                            key,
                            client: "ip:192.0.2.7",
                            room,
                            from: "Zoé",
                            text,
                        };
                        let (frame, layout) = wire.write();
                        let shown = String::from_utf8_lossy(&frame).into_owned();
                        // What serde_json writes, byte for byte.
                        let members = [
                            ("ref", reference),
                            ("key", key),
                            ("client", Some("ip:192.0.2.7")),
                            ("room", room),
                            ("from", Some("Zoé")),
                            ("text", Some(text)),
                        ];
                        let expected = InOrder(
                            members
                                .into_iter()
                                .filter_map(|(name, value)| Some((name, value?)))
                                .collect(),
                        );
                        assert_eq!(shown, serde_json::to_string(&expected).unwrap());
                        // What the broker's scan finds in it.
                        let text = std::str::from_utf8(&frame).unwrap();
                        assert_eq!(crate::broker::scan(text), Ok(layout.clone()), "{shown}");
                        // And so stamped alike, with the layout or scanned.
                        let stamp = |laid_out: bool| {
                            let mut stamper = Stamper::new(1 << 20);
                            let stamped = if laid_out {
                                stamper.stamp_laid_out(&frame, &layout)
                            } else {
                                stamper.stamp(&frame, true)
                            };
                            let Ok(Stamped::Ready(bytes, at)) = stamped else {
                                panic!("{shown} not stamped");
                            };
                            let bytes = String::from_utf8(bytes.to_vec()).unwrap();
                            let cut = bytes.rfind("\"id\":\"").unwrap();
                            (bytes[..cut].to_owned(), at)
                        };
                        assert_eq!(stamp(true), stamp(false), "{shown}");
                    }
                }
            }
        }
    }

    #[test]
    fn urlencoded_forms() {
        assert_eq!(
            form("from=Zo%C3%A9&text=a+b%26c").unwrap(),
            fields("Zoé", "a b&c")
        );
        assert_eq!(form("text=hi").unwrap().from, None);
        // No escape (`+` only), and `%` not followed by two hex digits: kept as it is.
        assert_eq!(
            form("from=a+b&text=50%25+%zz%4").unwrap(),
            fields("a b", "50% %zz%4")
        );
        assert_eq!(form("from=a+b&text=%zz").unwrap(), fields("a b", "%zz"));
        assert!(
            form("from=a&from=b")
                .unwrap_err()
                .message
                .contains("more than once")
        );
        assert!(
            form("from[]=a&text=b")
                .unwrap_err()
                .message
                .contains("is an array")
        );
        assert!(
            form("from=%FF&text=b")
                .unwrap_err()
                .message
                .contains("not valid UTF-8")
        );
        assert!(
            form("colour=red")
                .unwrap_err()
                .message
                .contains("unknown field `colour`")
        );
    }

    #[test]
    fn json_bodies() {
        assert_eq!(
            parse_json(br#"{"from":"a","text":"b"}"#).unwrap(),
            fields("a", "b")
        );
        for (body, expected) in [
            (&br#"["a"]"#[..], "must be an object"),
            (br#""a""#, "must be an object"),
            (
                br#"{"from":["a"],"text":"b"}"#,
                "`from` must be a string, not an array",
            ),
            (
                br#"{"from":"a","text":5}"#,
                "`text` must be a string, not a number",
            ),
            (br#"{"from":"a","#, "not valid JSON"),
            (b"{\"from\":\"\xff\"}", "not valid JSON"),
            (br#"{"from":"a","extra":"b"}"#, "unknown field `extra`"),
        ] {
            let error = parse_json(body).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert!(
                error.message.contains(expected),
                "{}: {}",
                String::from_utf8_lossy(body),
                error.message
            );
        }
        let error = parse_json(br#"{"from":"a","text":"b","from":"c"}"#).unwrap_err();
        assert!(
            error
                .message
                .contains("field `from` is given more than once"),
            "{}",
            error.message
        );
        assert!(parse_json(br#"{"from":"a","text":"b"}"#).is_ok());
    }

    #[tokio::test]
    async fn content_types() {
        let body = Bytes::from_static(b"from=a&text=b");
        assert_eq!(
            parse_body(
                Some("application/x-www-form-urlencoded; charset=UTF-8"),
                body.clone()
            )
            .await
            .unwrap(),
            fields("a", "b")
        );
        // Without parameters, in any case: the same as parsed.
        for ct in [
            "application/x-www-form-urlencoded",
            "Application/X-WWW-Form-URLEncoded",
        ] {
            assert_eq!(
                parse_body(Some(ct), body.clone()).await.unwrap(),
                fields("a", "b"),
                "{ct}"
            );
        }
        for ct in [
            "application/json",
            "APPLICATION/JSON",
            "application/json; charset=utf-8",
        ] {
            assert_eq!(
                parse_body(Some(ct), Bytes::from_static(br#"{"from":"a","text":"b"}"#))
                    .await
                    .unwrap(),
                fields("a", "b"),
                "{ct}"
            );
        }
        for ct in [
            None,
            Some("application/x-www-form-urlencoded-not"),
            Some("application/jsonx"),
            Some("text/plain"),
            Some("application/xml"),
            Some("garbage"),
        ] {
            let error = parse_body(ct, body.clone()).await.unwrap_err();
            assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        }
        let multipart = "--XX\r\nContent-Disposition: form-data; name=\"from\"\r\n\r\nZoé\r\n\
                         --XX\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhello\r\n--XX--\r\n";
        assert_eq!(
            parse_body(
                Some("multipart/form-data; boundary=XX"),
                Bytes::from(multipart)
            )
            .await
            .unwrap(),
            fields("Zoé", "hello")
        );
        let upload = "--XX\r\nContent-Disposition: form-data; name=\"text\"; filename=\"a.txt\"\r\n\r\nhi\r\n--XX--\r\n";
        let error = parse_body(
            Some("multipart/form-data; boundary=XX"),
            Bytes::from(upload),
        )
        .await
        .unwrap_err();
        assert!(error.message.contains("file upload"), "{}", error.message);
        let error = parse_body(Some("multipart/form-data"), Bytes::from(upload))
            .await
            .unwrap_err();
        assert!(error.message.contains("boundary"), "{}", error.message);
    }

    #[test]
    fn field_rules() {
        let config = MessageConfig {
            max_from_chars: 5,
            max_text_chars: 10,
            ..MessageConfig::default()
        };
        let ok = |from: &str, text: &str| check(fields(from, text), &config).unwrap();
        let err = |fields: Fields| check(fields, &config).unwrap_err().message;
        assert_eq!(
            ok("  Zoé ", " hi "),
            Checked {
                from: "Zoé".into(),
                text: "hi".into(),
                key: None,
                room: None,
            }
        );
        assert_eq!(
            ok("0", "0"),
            Checked {
                from: "0".into(),
                text: "0".into(),
                key: None,
                room: None,
            }
        );
        assert_eq!(ok("a", "x\r\ny\rz\tw").text, "x\ny\nz\tw");
        assert!(
            err(Fields {
                from: None,
                text: Some("x".into()),
                key: None,
                room: None,
            })
            .contains("`from` is missing")
        );
        assert!(err(fields("a", "   ")).contains("`text` is blank"));
        // Trimmed; DEL is a control character too (past printable ASCII).
        assert_eq!(ok("  a b \t", " x y\n").from, "a b");
        assert_eq!(ok("  a b \t", " x y\n").text, "x y");
        assert_eq!(ok("abcde", "x").from, "abcde");
        assert!(err(fields("a\u{7f}", "x")).contains("control character U+007F"));
        assert!(err(fields("a\nb", "x")).contains("`from` contains the control character U+000A"));
        assert!(err(fields("a", "x\0y")).contains("U+0000; only line feeds and tabs"));
        assert!(err(fields("a", "x\u{1b}[31m")).contains("U+001B"));
        assert!(err(fields("abcdef", "x")).contains("`from` is too long: 6 of 5 characters"));
        assert!(
            err(fields("éééé", "0123456789x")).contains("`text` is too long: 11 of 10 characters")
        );
        // Characters, not bytes: 5 two-byte characters fit.
        assert_eq!(ok("ééééé", "x").from, "ééééé");
        // Lookalike names: invisible characters and odd spaces are refused in `from`.
        assert!(err(fields("ali\u{200B}", "x")).contains("invisible character U+200B"));
        assert!(err(fields("al\u{202E}i", "x")).contains("U+202E"));
        assert!(err(fields("a\u{00A0}b", "x")).contains("U+00A0"));
        assert!(err(fields("\u{3164}", "x")).contains("U+3164"));
        assert_eq!(ok("Zoé B", "x").from, "Zoé B");
        // A text needs something visible; emoji sequences keep their joiners.
        assert!(err(fields("a", "\u{200B}\u{200B}")).contains("`text` has nothing visible"));
        assert!(err(fields("a", "\u{2800}")).contains("nothing visible"));
        assert_eq!(ok("a", "👩\u{200D}💻").text, "👩\u{200D}💻");
        // Idempotency keys.
        let with_key = |key: &str| {
            check(
                Fields {
                    key: Some(key.into()),
                    ..fields("a", "b")
                },
                &config,
            )
        };
        assert_eq!(
            with_key("0b5d-uuid:1.2_3").unwrap().key.as_deref(),
            Some("0b5d-uuid:1.2_3")
        );
        assert!(with_key("").is_err());
        assert!(with_key("a b").is_err());
        assert!(with_key(&"k".repeat(65)).is_err());
    }

    proptest::proptest! {
        /// Form and JSON decoding never panic, and every refusal is a 4xx.
        #[test]
        fn decoding_arbitrary_bodies_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            for result in [parse_urlencoded(&body), parse_json(&body)] {
                if let Err(error) = result {
                    proptest::prop_assert!(error.status.is_client_error());
                }
            }
        }
    }
}
