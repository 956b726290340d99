//! `POST /message/broadcast` served straight from the socket, as [`crate::direct`] serves the
//! SSE streams: the accept loop's connection task reads the head, the body, publishes through
//! the same [`Broadcast`] salvo's handler uses, and writes the answer, then reads the next
//! request on the connection (keep-alive).
//!
//! About a fifth of a POST's CPU was hyper's and salvo's (their request and header maps, the
//! router, the body channel, timers); this path parses with `httparse` and answers with one
//! `write`.
//!
//! Only the plain case is served here: HTTP/1.1, a `Content-Length` body within
//! `message.max_body_bytes`, no `Transfer-Encoding`, `Expect`, `Upgrade` or `Connection` other
//! than `keep-alive`, sessions off (`enableSessions`) and no `server.cors_origins` (salvo's
//! middleware answers those). Anything else, and any later request on the connection that is
//! neither this nor a lone `GET /event/fetch`, is handed to hyper with the bytes already read,
//! so that every answer hyper gives stays as it was.
//!
//! The answer is the one salvo's handler gives, header for header. Limits: the body must arrive
//! within `server.body_timeout_secs` (else `408` and the connection closes; a body the client
//! cut short by ending its side gets a `400` that says how much came), each answer's
//! write within `server.write_stall_timeout_secs`, and the next request head within
//! `server.head_timeout_secs` of the last answer (else the connection closes, as hyper closes
//! an idle keep-alive connection).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use salvo::http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::error::JsonError;
use crate::message::{Broadcast, MESSAGE_ID_HEADER, Posted};
use crate::metrics::DirectRequest;
use crate::request::{Head, visible_ascii};
use crate::script::HOOK_HEADERS;

/// The path this serves.
pub const BROADCAST_PATH: &str = "/message/broadcast";

/// The headers the POST handler reads (and the access hook's, [`HOOK_HEADERS`]).
const HANDLER_HEADERS: [&str; 6] = [
    "content-type",
    "host",
    "origin",
    "sec-fetch-site",
    "idempotency-key",
    "x-forwarded-for",
];

/// What a direct POST needs from its head (owned: the head's buffer is reused).
#[derive(Debug)]
pub struct PostRequest {
    peer: SocketAddr,
    query: Option<String>,
    /// The body's length.
    pub content_length: usize,
    /// The first value of each header read that is present (`None`: not visible ASCII).
    headers: Vec<(&'static str, Option<String>)>,
}

impl PostRequest {
    /// `Some(Ok)` for a `POST /message/broadcast` the direct path serves (see the module
    /// documentation), `Some(Err)` for one whose `Content-Length` is not one number (the
    /// `400`'s message); `max_body` is `message.max_body_bytes`.
    pub fn from_head(
        request: &httparse::Request<'_, '_>,
        peer: SocketAddr,
        max_body: usize,
    ) -> Option<Result<PostRequest, String>> {
        if request.method != Some("POST") || request.version != Some(1) {
            return None;
        }
        let (path, query) = crate::request::path_and_query(request.path?);
        if path != BROADCAST_PATH {
            return None;
        }
        let mut content_length = None;
        let mut headers: Vec<(&'static str, Option<String>)> = Vec::new();
        for header in request.headers.iter() {
            let name = header.name;
            let is = |known: &str| name.eq_ignore_ascii_case(known);
            if is("content-length") {
                let digits = header.value;
                if content_length.is_some()
                    || digits.is_empty()
                    || !digits.iter().all(u8::is_ascii_digit)
                {
                    return Some(Err(
                        "`Content-Length` must be given once, as a decimal number".to_owned(),
                    ));
                }
                // Past `usize`: too long anyway (hyper says so with a 413).
                content_length = Some(
                    std::str::from_utf8(digits)
                        .ok()
                        .and_then(|digits| digits.parse::<usize>().ok())
                        .unwrap_or(usize::MAX),
                );
            } else if is("transfer-encoding") || is("expect") || is("upgrade") {
                return None;
            } else if is("connection") {
                if !header.value.eq_ignore_ascii_case(b"keep-alive") {
                    return None;
                }
            } else if let Some(known) = HANDLER_HEADERS
                .iter()
                .chain(HOOK_HEADERS.iter())
                .find(|known| is(known))
                && !headers.iter().any(|(seen, _)| seen == known)
            {
                headers.push((known, visible_ascii(header.value).map(str::to_owned)));
            }
        }
        Some(Ok(PostRequest {
            peer,
            query: query.map(str::to_owned),
            content_length: content_length.filter(|&length| length <= max_body)?,
            headers,
        }))
    }
}

impl Head for PostRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(known, _)| *known == name)
            .and_then(|(_, value)| value.as_deref())
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|(known, _)| *known == name)
    }

    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    fn peer(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }
}

/// What becomes of the connection after an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    KeepAlive,
    Close,
}

/// Serves one POST whose head was read (and taken out of `buffer`, which holds what came after
/// it): reads the body, publishes, answers.
pub async fn serve(
    socket: &mut TcpStream,
    buffer: &mut BytesMut,
    request: PostRequest,
    broadcast: &Broadcast,
    write_stall: Duration,
    shutdown: &CancellationToken,
) -> After {
    broadcast.metrics.direct(DirectRequest::Post);
    let length = request.content_length;
    if buffer.len() < length {
        buffer.reserve(length - buffer.len());
        let deadline = tokio::time::Instant::now() + broadcast.body_timeout;
        while buffer.len() < length {
            let read = tokio::select! {
                () = shutdown.cancelled() => return After::Close,
                read = tokio::time::timeout_at(deadline, socket.read_buf(buffer)) => read,
            };
            match read {
                Ok(Ok(0)) => {
                    // The client ended its side before the whole body: it may still read.
                    let ended = Err(JsonError::bad_request(format!(
                        "the body ended after {} of its {length} bytes (`Content-Length`)",
                        buffer.len()
                    )));
                    answer(socket, broadcast, ended, write_stall, true).await;
                    return After::Close;
                }
                Ok(Err(_)) => return After::Close,
                Ok(Ok(_)) => {}
                Err(_) => {
                    let timed_out = Err(broadcast.body_timed_out());
                    answer(socket, broadcast, timed_out, write_stall, true).await;
                    return After::Close;
                }
            }
        }
    }
    let body = buffer.split_to(length).freeze();
    let posted = match broadcast.sender(&request) {
        Ok(sender) => broadcast.post(&request, sender, body, || None).await,
        Err(refused) => Err(refused),
    };
    answer(socket, broadcast, posted, write_stall, false).await
}

/// Writes the answer salvo's handler would give, and counts it; with `close` (a `408`, a body
/// cut short), says so and the connection closes.
async fn answer(
    socket: &mut TcpStream,
    broadcast: &Broadcast,
    posted: Posted,
    write_stall: Duration,
    close: bool,
) -> After {
    let (status, id, body) = match posted {
        Ok((id, _)) => (StatusCode::OK, id, b"true".to_vec()),
        Err(error) => (
            error.status,
            None,
            crate::error::error_body(&error.message).into_bytes(),
        ),
    };
    broadcast.count(status);
    // Written in place, without `fmt`: formatting this, the client's address and a form's
    // error texts was a fifth of a direct POST's instructions (BENCHMARKS.md).
    let mut response = Vec::with_capacity(192 + body.len());
    let mut number = itoa::Buffer::new();
    response.extend_from_slice(b"HTTP/1.1 ");
    response.extend_from_slice(number.format(status.as_u16()).as_bytes());
    response.push(b' ');
    response.extend_from_slice(crate::error::reason_phrase(status.as_u16()).as_bytes());
    response.extend_from_slice(b"\r\n");
    if let Some(id) = id {
        response.extend_from_slice(MESSAGE_ID_HEADER.as_bytes());
        response.extend_from_slice(b": ");
        crate::wire::write_id(&mut response, id);
        response.extend_from_slice(b"\r\n");
    }
    response.extend_from_slice(
        b"content-type: application/json\r\ncache-control: no-store\r\ncontent-length: ",
    );
    response.extend_from_slice(number.format(body.len()).as_bytes());
    response.extend_from_slice(b"\r\n");
    if close {
        response.extend_from_slice(b"connection: close\r\n");
    }
    response.extend_from_slice(b"date: ");
    http_date(&mut response);
    response.extend_from_slice(b"\r\n\r\n");
    response.extend_from_slice(&body);
    match tokio::time::timeout(write_stall, socket.write_all(&response)).await {
        Ok(Ok(())) if !close => After::KeepAlive,
        _ => After::Close,
    }
}

/// Appends the `Date` header's value for now, formatted once a second per thread (as hyper
/// caches it).
fn http_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::HttpDate::from(now).to_string();
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_is_now_in_the_http_format() {
        let mut first = Vec::new();
        http_date(&mut first);
        let text = std::str::from_utf8(&first).expect("ASCII");
        let date = httpdate::parse_http_date(text).expect("an HTTP date");
        let now = std::time::SystemTime::now();
        let off = now.duration_since(date).unwrap_or_else(|e| e.duration());
        assert!(off < Duration::from_secs(2), "{text} is {off:?} from now");
        // Cached within the second, renewed after it.
        std::thread::sleep(Duration::from_millis(1100));
        let mut later = Vec::new();
        http_date(&mut later);
        assert_ne!(first, later);
        assert!(
            httpdate::parse_http_date(std::str::from_utf8(&later).expect("ASCII"))
                .expect("an HTTP date")
                > date
        );
    }
}
