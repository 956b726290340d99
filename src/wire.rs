//! The message format: what travels between web nodes, the broker and browsers, defined once.
//!
//! - **Ids** ([`MsgId`]): `<run>-<seq>`, given by the broker. A run is an epoch, compared only
//!   for equality; within a run sequence numbers are dense and increasing.
//! - **Frames on ZeroMQ**: one JSON object per frame. A web node sends
//!   `{"ref":…,"key":…,"client":…,"from":…,"text":…}` (`ref` first); the broker publishes
//!   the message with `id` and `time`, `ref` kept first, `key` and `client` removed. Keys only
//!   the broker writes ([`STAMPED_KEYS`]) are removed from what anyone sends it.
//! - **Notices** the broker publishes for a web node's POSTs: a refusal
//!   `{"reject":ref,"reason":…,"status":4xx}` ([`rejection`]) and "published already"
//!   `{"published":ref,"id":…}` ([`published`]); [`Envelope`] reads them.
//! - **SSE frames** to browsers: `id: <id>\nevent: msg\ndata: <one-line JSON without ref>\n\n`
//!   ([`write_message`]), `event: reset` notices ([`write_reset`]) and the keep-alive comment.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A message id: the broker run and the sequence number within the run, printed and parsed as
/// `<run>-<seq>`.
///
/// A run is an epoch: its number (the broker's start time in Unix ms, for readability) is only
/// ever compared for equality, never for order, so a broker restarted with a clock stepped back,
/// or on another host, starts a new epoch like any other. Within a run, sequence numbers are
/// dense and increasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsgId {
    pub run: u64,
    pub seq: u64,
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.run, self.seq)
    }
}

impl FromStr for MsgId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (run, seq) = s.split_once('-').ok_or(())?;
        // Decimal digits only (no sign), one to twenty of them, within `u64`: one pass.
        let digits = |part: &str| {
            if part.is_empty() || part.len() > 20 {
                return Err(());
            }
            part.bytes().try_fold(0u64, |value, b| {
                let digit = b.wrapping_sub(b'0');
                if digit > 9 {
                    return Err(());
                }
                value
                    .checked_mul(10)
                    .and_then(|value| value.checked_add(u64::from(digit)))
                    .ok_or(())
            })
        };
        Ok(MsgId {
            run: digits(run)?,
            seq: digits(seq)?,
        })
    }
}

impl MsgId {
    /// Whether `self` comes after `other` in the same run; ids of different runs are unordered.
    pub fn follows(&self, other: &MsgId) -> bool {
        self.run == other.run && self.seq > other.seq
    }
}

/// A new run number (see [`MsgId`]), unique per broker start: the start's Unix time in
/// milliseconds, then six random digits, so that brokers started in the same millisecond (on
/// one machine or several) do not share a run: a web node moved from one to the other would
/// take the second's messages for the first's (a silent gap, or messages dropped as
/// duplicates). Within one process runs only ever increase.
pub fn new_run() -> u64 {
    use rand::RngExt;
    /// The last run given in this process.
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let candidate = now_ms() * RUN_RANDOM_SPAN + rand::rng().random_range(0..RUN_RANDOM_SPAN);
    let mut run = candidate;
    // Always `Ok`: the update never declines.
    let _ = LAST.fetch_update(
        std::sync::atomic::Ordering::AcqRel,
        std::sync::atomic::Ordering::Acquire,
        |last| {
            run = candidate.max(last + 1);
            Some(run)
        },
    );
    run
}

/// The random part of a run: its last six decimal digits.
const RUN_RANDOM_SPAN: u64 = 1_000_000;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Keys only the broker writes (the message's id and time; the keys of its notices): a
/// sender's own values are removed, and scripts cannot set them.
pub const STAMPED_KEYS: [&str; 4] = [ID, TIME, REJECT, PUBLISHED];
/// A message's id.
pub const ID: &str = "id";
/// When the broker published it, Unix ms.
pub const TIME: &str = "time";
/// A refusal notice's key: the refused message's `ref`.
pub const REJECT: &str = "reject";
/// A "published already" notice's key: the repeated message's `ref`.
pub const PUBLISHED: &str = "published";
/// The web node's reference of a message, echoed back so it can answer the POST.
pub const REF: &str = "ref";
/// A message's idempotency key: read by the broker, never published.
pub const KEY: &str = "key";
/// Who sent the message, as the web node saw it (`ip:…`): scripts read it (the rate limit keys
/// on it), nobody can change it, and it is never published.
pub const CLIENT: &str = "client";
/// The room a message belongs to. Web nodes always set it (the default room when the sender
/// named none); a message without one (from a plain Temma peer) is in the default room.
pub const ROOM: &str = "room";
/// The longest room name.
pub const MAX_ROOM_CHARS: usize = 64;

/// A room name as given (form field, query parameter, `msg.room`), checked and case-folded:
/// 1 to 64 of `a-z`, `0-9`, `_` and `-`, capitals folded to lower case. The error says the
/// rule.
pub fn room_name(text: &str) -> Result<String, String> {
    let valid = (1..=MAX_ROOM_CHARS).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{}` is not a room name: a room is 1 to {MAX_ROOM_CHARS} of a-z, 0-9, `_` and `-` \
             (capitals are folded to lower case)",
            text.chars().take(80).collect::<String>().escape_default()
        ))
    }
}

/// Keys a web node sends the broker that are never published.
pub const PRIVATE_KEYS: [&str; 2] = [KEY, CLIENT];
/// Status sent with a refusal that names none.
pub const DEFAULT_REJECT_STATUS: u16 = 422;

/// A refusal's status: a 4xx, or [`DEFAULT_REJECT_STATUS`].
pub fn reject_status(status: Option<i64>) -> u16 {
    status
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (400..500).contains(s))
        .unwrap_or(DEFAULT_REJECT_STATUS)
}

/// How much larger than `broker.max_frame_bytes` a published frame may be (the stamp, what
/// scripts add). Web nodes accept published frames up to [`max_published_bytes`]; the broker
/// drops a message that scripts made larger.
pub const PUBLISH_HEADROOM: usize = 4096;

/// The largest frame the broker publishes (and a web node's SUB accepts).
pub fn max_published_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_add(PUBLISH_HEADROOM)
}

/// The rejection notice a web node turns into a 4xx for the sender.
pub fn rejection(reference: &str, reason: &str, status: u16) -> Bytes {
    serde_json::to_vec(&serde_json::json!({
        "reject": reference,
        "reason": reason,
        "status": status,
    }))
    .expect("serializing a JSON value cannot fail")
    .into()
}

/// The notice for a message whose idempotency key was already published: its sender gets a
/// `200`, and nothing is published twice.
pub fn published(reference: &str, id: MsgId) -> Bytes {
    serde_json::to_vec(&serde_json::json!({
        "published": reference,
        "id": id.to_string(),
    }))
    .expect("serializing a JSON value cannot fail")
    .into()
}

/// The contents of a JSON string with no escapes (ids, refs and keys never have any).
pub fn plain_str(raw: &RawValue) -> Option<&str> {
    let text = raw.get().strip_prefix('"')?.strip_suffix('"')?;
    (!text.contains(['\\', '"'])).then_some(text)
}

/// The fields of a published frame a web node reads; the rest stays as it is.
#[derive(Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    #[serde(rename = "ref", borrow, default)]
    pub reference: Option<&'a RawValue>,
    /// The idempotency key: in published frames only between the brokers of a pair (a backup
    /// learns the keys its peer published); web nodes never show it.
    #[serde(borrow, default)]
    pub key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub reject: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub published: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub room: Option<&'a RawValue>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub status: Option<i64>,
}

impl Envelope<'_> {
    /// The message id, when it is one.
    pub fn id(&self) -> Option<MsgId> {
        self.id.and_then(plain_str).and_then(|s| s.parse().ok())
    }
}

/// The `room` a published frame names, as written (`None`: the default room). A name with
/// escapes or not a string is kept as its raw JSON: web nodes drop such a message anyway.
pub fn room_of(frame: &[u8]) -> Option<&str> {
    #[derive(Deserialize)]
    struct Room<'a> {
        #[serde(borrow, default)]
        room: Option<&'a RawValue>,
    }
    let room = serde_json::from_slice::<Room<'_>>(frame).ok()?.room?;
    Some(plain_str(room).unwrap_or(room.get()))
}

/// Where a web node's frame holds what the broker looks for, as byte ranges of the frame: what
/// the broker's validating scan finds in a frame from PULL, or what a web node knows of a frame
/// it wrote (`message::Wire::write`), so that the embedded broker stamps its own node's frames
/// without reading them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// How many members the object has.
    pub members: usize,
    /// No key the broker writes ([`STAMPED_KEYS`]), no key twice, no escaped key: the frame
    /// can be stamped by appending to it, once its private members are cut out.
    pub plain: bool,
    /// The `ref` and `key` values, inside their quotes, when they are strings without escapes.
    pub reference: Option<std::ops::Range<usize>>,
    pub key: Option<std::ops::Range<usize>>,
    pub room: RoomSpan,
    /// The private members (`key`, `client`), from the name's opening quote to the value's
    /// end.
    pub key_member: Option<std::ops::Range<usize>>,
    pub client_member: Option<std::ops::Range<usize>>,
}

/// Where a frame's `room` is ([`Layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomSpan {
    /// It names none.
    None,
    /// A string without escapes: its contents.
    Plain(std::ops::Range<usize>),
    /// Anything else (web nodes drop such a message).
    Other,
}

/// A frame a web node hands to the broker: to its PUSH socket's task, or (the embedded broker,
/// which the node's sockets would only reach over loopback) straight to the broker's task.
#[derive(Debug)]
pub struct Outgoing {
    pub frame: Bytes,
    /// Where the frame's members are, when the node wrote it (a message, not a presence
    /// report): the embedded broker trusts it instead of scanning the frame.
    pub layout: Option<Layout>,
    /// The POST gives up then: a frame still unsent is dropped, not sent late.
    pub deadline: tokio::time::Instant,
    /// A presence report: not a message (not counted when it expires unsent).
    pub report: bool,
    /// With `message.confirm = false`: told once the broker (or ZeroMQ) took the message.
    pub sent: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Writes `id` as `<run>-<seq>` without allocating.
///
/// A run's number has 19 digits and stays the same for millions of ids: each thread keeps the
/// digits of the last run it wrote (with their `-`), and only the sequence number is formatted
/// (the broker's stamp, a node's SSE frame and a POST's answer each write an id per message).
pub fn write_id(out: &mut impl BufMut, id: MsgId) {
    RUN_DIGITS.with(|cached| {
        let mut run = cached.get();
        if run.run != id.run || run.len == 0 {
            let mut number = itoa::Buffer::new();
            let digits = number.format(id.run).as_bytes();
            run.digits[..digits.len()].copy_from_slice(digits);
            run.digits[digits.len()] = b'-';
            run.len = digits.len() as u8 + 1;
            run.run = id.run;
            cached.set(run);
        }
        out.put_slice(&run.digits[..usize::from(run.len)]);
    });
    out.put_slice(itoa::Buffer::new().format(id.seq).as_bytes());
}

/// The digits of a run and the `-` after them, as [`write_id`] last wrote them on a thread.
#[derive(Clone, Copy)]
struct RunDigits {
    run: u64,
    /// `u64::MAX` has 20 digits; then the `-`.
    digits: [u8; 21],
    /// 0 until the first id.
    len: u8,
}

thread_local! {
    static RUN_DIGITS: std::cell::Cell<RunDigits> = const {
        std::cell::Cell::new(RunDigits { run: 0, digits: [0; 21], len: 0 })
    };
}

/// Writes a JSON value on one line: as it is when it holds no line break, else re-serialized
/// compactly (pretty-printed input). `None` if it is not valid JSON.
pub fn write_one_line(out: &mut impl BufMut, json: &[u8]) -> Option<()> {
    if memchr::memchr2(b'\n', b'\r', json).is_none() {
        out.put_slice(json);
        return Some(());
    }
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    out.put_slice(&serde_json::to_vec(&value).expect("serializing a JSON value"));
    Some(())
}

/// Builds the SSE frame of a published message: `id:` (when it has one), `event: msg`, and the
/// message as one data line without the web node's `ref` and the idempotency `key` (internal:
/// never sent to browsers; `private`: the frame has one of them). The broker writes them first
/// (`ref`, then `key`), which are cut without parsing; anything else is re-serialized.
pub fn write_message(frame: &[u8], id: Option<MsgId>, private: bool) -> Bytes {
    message_frame(id, frame.len(), |sse| {
        let one_line = memchr::memchr2(b'\n', b'\r', frame).is_none();
        if !private && one_line {
            sse.put_slice(frame);
        } else if let Some(rest) = one_line.then(|| after_leading_private(frame)).flatten() {
            sse.put_u8(b'{');
            sse.put_slice(rest);
        } else {
            let mut value: serde_json::Value =
                serde_json::from_slice(frame).expect("parsed as an object before");
            if let Some(map) = value.as_object_mut() {
                map.remove(REF);
                map.remove(KEY);
            }
            sse.put_slice(&serde_json::to_vec(&value).expect("serializing a JSON value"));
        }
    })
}

/// An SSE `msg` frame: the `id:` line (with an id), the event, then `data: `, what `data`
/// writes (one line of about `len` bytes) and the blank line.
fn message_frame(id: Option<MsgId>, len: usize, data: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut sse = BytesMut::with_capacity(len + 64);
    if let Some(id) = id {
        sse.put_slice(b"id: ");
        write_id(&mut sse, id);
        sse.put_u8(b'\n');
    }
    sse.put_slice(b"event: msg\ndata: ");
    data(&mut sse);
    sse.put_slice(b"\n\n");
    sse.freeze()
}

/// [`write_message`] for a frame whose only private member, if any, is at `cut` (the member
/// and its comma, as the embedded broker found it): the SSE frame without it, no search.
pub fn write_message_cut(frame: &[u8], id: MsgId, cut: Option<std::ops::Range<usize>>) -> Bytes {
    if memchr::memchr2(b'\n', b'\r', frame).is_some() {
        return write_message(frame, Some(id), cut.is_some());
    }
    message_frame(Some(id), frame.len(), |sse| match cut {
        Some(cut) => {
            sse.put_slice(&frame[..cut.start]);
            sse.put_slice(&frame[cut.end..]);
        }
        None => sse.put_slice(frame),
    })
}

/// For a frame that starts `{"ref":"<no escapes>",` and/or `"key":"<no escapes>",` (in that
/// order), what follows them (or `}` when they are the only keys); `None` when anything else
/// comes first or a `ref` or `key` follows (the caller then parses).
fn after_leading_private(frame: &[u8]) -> Option<&[u8]> {
    let mut rest = frame.strip_prefix(b"{")?;
    for name in [&b"\"ref\":\""[..], &b"\"key\":\""[..]] {
        let Some(value) = rest.strip_prefix(name) else {
            continue;
        };
        let end = memchr::memchr2(b'"', b'\\', value)?;
        if value[end] != b'"' {
            return None;
        }
        rest = match value.get(end + 1)? {
            b',' => &value[end + 2..],
            b'}' => &value[end + 1..],
            _ => return None,
        };
    }
    // Built once: a finder made per call costs more than the search (this is per message).
    static REF_KEY: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"ref\":"));
    static KEY_KEY: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"key\":"));
    if rest.len() == frame.len() - 1 || REF_KEY.find(rest).is_some() || KEY_KEY.find(rest).is_some()
    {
        // Nothing cut, or one of them further in (a frame not written by the broker's rules).
        return None;
    }
    Some(rest)
}

/// `frame` (a published message, `ref` first if it has one) with `"key":<key>` after its `ref`:
/// how the active broker of a pair tells its backup the key a message was published under.
pub fn with_key(frame: &[u8], key: &str) -> Bytes {
    let mut out = Vec::with_capacity(frame.len() + key.len() + 16);
    let after_ref = frame
        .strip_prefix(b"{\"ref\":\"")
        .and_then(|value| {
            let end = memchr::memchr2(b'"', b'\\', value)?;
            (value[end] == b'"').then_some(frame.len() - value.len() + end + 1)
        })
        .unwrap_or(1);
    out.extend_from_slice(&frame[..after_ref]);
    if after_ref > 1 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"key\":");
    serde_json::to_writer(&mut out, key).expect("a string serializes");
    let rest = &frame[after_ref..];
    let rest = rest.strip_prefix(b",").unwrap_or(rest);
    if rest != b"}" {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    out.into()
}

/// The keep-alive comment sent to every client when the stream has been idle.
pub const KEEPALIVE_FRAME: &[u8] = b": keep-alive\n\n";

/// Appends an `event: reset` frame: the client missed messages the server cannot replay.
pub fn write_reset(out: &mut BytesMut, last_event_id: &str, reason: &str) {
    out.put_slice(b"event: reset\ndata: ");
    let data = serde_json::json!({ "lastEventId": last_event_id, "reason": reason });
    out.put_slice(&serde_json::to_vec(&data).expect("serializing a JSON value"));
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn ids_of_runs_that_take_turns_are_written_whole() {
        // The thread's cached run digits must never leak into another run's id.
        // Run 0 first: the cache's empty state must not pass for it.
        let ids = [
            MsgId { run: 0, seq: 0 },
            MsgId {
                run: 1_795_865_318_470_188_431,
                seq: 1,
            },
            MsgId {
                run: 1_795_865_318_470_188_432,
                seq: 42,
            },
            MsgId {
                run: 1_795_865_318_470_188_431,
                seq: 2,
            },
            MsgId {
                run: u64::MAX,
                seq: u64::MAX,
            },
            MsgId {
                run: 7,
                seq: 1_000_000,
            },
            MsgId { run: 0, seq: 3 },
        ];
        for id in ids {
            let mut out = Vec::new();
            write_id(&mut out, id);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("{}-{}", id.run, id.seq)
            );
            assert_eq!(id.to_string().parse::<MsgId>().unwrap(), id);
        }
    }

    #[test]
    fn runs_are_unique_even_when_brokers_start_in_the_same_millisecond() {
        let runs: Vec<u64> = (0..10_000).map(|_| new_run()).collect();
        let unique: std::collections::HashSet<u64> = runs.iter().copied().collect();
        assert_eq!(unique.len(), runs.len(), "a run was given twice");
        assert!(
            runs.windows(2).all(|pair| pair[1] > pair[0]),
            "runs only increase"
        );
        // Readable: the start's milliseconds, then the random digits; an id still parses.
        let run = runs[0];
        let ms = run / RUN_RANDOM_SPAN;
        assert!(now_ms().abs_diff(ms) < 60_000, "{run}");
        let id = MsgId { run, seq: 7 };
        assert_eq!(id.to_string().parse::<MsgId>(), Ok(id));
    }

    #[test]
    fn msg_id_parses_and_orders() {
        let id: MsgId = "1764109484123-42".parse().unwrap();
        assert_eq!(
            id,
            MsgId {
                run: 1764109484123,
                seq: 42
            }
        );
        assert_eq!(id.to_string(), "1764109484123-42");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-+2",
            "1-2-3",
            "1 -2",
            "99999999999999999999999-1",
            "18446744073709551616-1",
            "1-18446744073709551616",
        ] {
            assert!(bad.parse::<MsgId>().is_err(), "{bad}");
        }
        let largest: MsgId = "18446744073709551615-0".parse().unwrap();
        assert_eq!(largest.run, u64::MAX);
        let older: MsgId = "1-99".parse().unwrap();
        let other_run: MsgId = "2-100".parse().unwrap();
        assert!(
            !other_run.follows(&older) && !older.follows(&other_run),
            "runs are unordered"
        );
        assert!("1-100".parse::<MsgId>().unwrap().follows(&older));
    }

    #[test]
    fn rejection_frame() {
        let frame = rejection("n-1", "too many messages", 429);
        let value: Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(
            value,
            json!({"reject":"n-1","reason":"too many messages","status":429})
        );
    }

    #[test]
    fn sse_frames_never_carry_the_reference() {
        let text = |frame: Bytes| String::from_utf8(frame.to_vec()).unwrap();
        let id = MsgId { run: 7, seq: 3 };
        // Cut without parsing when `ref` comes first.
        assert_eq!(
            text(write_message(
                br#"{"ref":"n-1","from":"a"}"#,
                Some(id),
                true
            )),
            "id: 7-3\nevent: msg\ndata: {\"from\":\"a\"}\n\n"
        );
        assert_eq!(
            text(write_message(br#"{"ref":"n-1"}"#, None, true)),
            "event: msg\ndata: {}\n\n"
        );
        // Anywhere else, or pretty-printed: re-serialized without it, on one line.
        assert_eq!(
            text(write_message(
                b"{\"from\":\"a\",\n\"ref\":\"n-1\"}",
                None,
                true
            )),
            "event: msg\ndata: {\"from\":\"a\"}\n\n"
        );
        assert_eq!(
            text(write_message(br#"{"from":"a"}"#, None, false)),
            "event: msg\ndata: {\"from\":\"a\"}\n\n"
        );
        // Nor the idempotency key (a pair's frames carry it after `ref`).
        for frame in [
            &br#"{"ref":"n-1","key":"k-1","from":"a"}"#[..],
            br#"{"key":"k-1","from":"a"}"#,
            br#"{"from":"a","key":"k-1"}"#,
            br#"{"key":"k-1","ref":"n-1","from":"a"}"#,
        ] {
            assert_eq!(
                text(write_message(frame, None, true)),
                "event: msg\ndata: {\"from\":\"a\"}\n\n",
                "{}",
                String::from_utf8_lossy(frame)
            );
        }
        // A text that merely mentions them is left alone.
        assert_eq!(
            text(write_message(
                br#"{"ref":"n-1","text":"\"key\": x"}"#,
                None,
                true
            )),
            "event: msg\ndata: {\"text\":\"\\\"key\\\": x\"}\n\n"
        );
    }

    #[test]
    fn a_key_goes_after_the_reference() {
        let text = |frame: Bytes| String::from_utf8(frame.to_vec()).unwrap();
        assert_eq!(
            text(with_key(br#"{"ref":"n-1","from":"a"}"#, "k")),
            r#"{"ref":"n-1","key":"k","from":"a"}"#
        );
        assert_eq!(
            text(with_key(br#"{"from":"a"}"#, "k\"")),
            r#"{"key":"k\"","from":"a"}"#
        );
        assert_eq!(
            text(with_key(br#"{"ref":"n-1"}"#, "k")),
            r#"{"ref":"n-1","key":"k"}"#
        );
        assert_eq!(text(with_key(b"{}", "k")), r#"{"key":"k"}"#);
    }

    #[test]
    fn room_names_follow_the_rule() {
        assert_eq!(room_name("General").unwrap(), "general");
        assert_eq!(room_name("a-b_9").unwrap(), "a-b_9");
        assert_eq!(room_name(&"x".repeat(64)).unwrap().len(), 64);
        for bad in ["", "a b", "é", "a/b", "a.b", &"x".repeat(65)] {
            let error = room_name(bad).unwrap_err();
            assert!(
                error.contains("is not a room name: a room is 1 to 64 of a-z"),
                "{error}"
            );
        }
    }

    #[test]
    fn refusal_statuses_are_4xx() {
        assert_eq!(reject_status(Some(429)), 429);
        assert_eq!(reject_status(Some(200)), DEFAULT_REJECT_STATUS);
        assert_eq!(reject_status(Some(-1)), DEFAULT_REJECT_STATUS);
        assert_eq!(reject_status(None), DEFAULT_REJECT_STATUS);
    }
}
