//! `temma-load`: a load tool for any Server-Sent Events server (temma, Nchan, Pushpin…).
//!
//! It opens `--subscribers` SSE connections to `--subscribe` (ramped, retrying a refused one
//! like a browser does), then POSTs `--messages` messages to `--publish` at `--rate` msgs/s,
//! each carrying a marker `load-<seq>-<µs>` (its sequence number and send time) wherever the
//! body template says `{seq}` and `{ts}`. Every subscriber finds the marker in each event it
//! receives, whatever the server wraps around it, and the tool reports:
//!
//! - subscribers connected; deliveries expected and received; gaps and duplicates per client;
//! - deliveries/s sustained (from the first send to the last receipt);
//! - latency from publish to receipt, p50/p95/p99/max (HdrHistogram);
//! - with `--pid`, the server's RSS before and after connecting, and per connection; and its
//!   CPU time (each thread's on-CPU time, `/proc/PID/task/TID/schedstat`) from the first POST
//!   to the end of the drain, per message and per delivery: on a machine whose cores the tool
//!   shares, the server's CPU is the latency the clients pay; and what every other process
//!   used meanwhile (a neighbour's burst is latency the server did not cause).
//!
//! Loopback targets only; every phase has a count and a time limit. `--json` prints one JSON
//! object. `--hold-secs` keeps the connections open that long before publishing (idle tests).
//! `--after-request /` opens each stream on a kept-alive connection after another request, as
//! a browser's `EventSource` does after the page.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "temma-load",
    version,
    about = "Load tool for Server-Sent Events servers"
)]
struct Args {
    /// SSE URL to subscribe to (http, loopback only).
    #[arg(long)]
    subscribe: String,
    /// Number of SSE connections.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000)]
    ramp: u32,
    /// Attempts per subscriber before giving up (non-200 answers or errors).
    #[arg(long, default_value_t = 5)]
    attempts: u32,
    /// URL to POST messages to (http, loopback only). Without it, nothing is published.
    #[arg(long)]
    publish: Option<String>,
    /// Body template: `{seq}` and `{ts}` are replaced by the sequence number and send time.
    #[arg(long, default_value = "from=load&text=load-{seq}-{ts}")]
    body: String,
    /// Content type of the body.
    #[arg(long, default_value = "application/x-www-form-urlencoded")]
    content_type: String,
    /// Messages per second, all publishers together, evenly spaced (the publishers take turns).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Messages to publish.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Concurrent publishers (connections); default: one per 20 msg/s (up to 256), so that a
    /// slow answer does not hold the rate back.
    #[arg(long)]
    publishers: Option<usize>,
    /// Seconds to keep the connections open (after connecting, before publishing).
    #[arg(long, default_value_t = 0.0)]
    hold_secs: f64,
    /// How long to wait for the last deliveries after the last message was sent, in ms.
    #[arg(long, default_value_t = 3000)]
    drain_ms: u64,
    /// Hard limit on the whole run, in seconds.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
    /// Server process ids whose RSS to report (repeatable).
    #[arg(long)]
    pid: Vec<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Spread the load over this many rooms (`r0`, `r1`…): subscriber `i` follows room
    /// `r{i % N}` (`room=` is added to `--subscribe`), message `seq` goes to room `r{seq % N}`
    /// (`{room}` in `--body`, or `&room=…` added to a form body), and every delivery is checked
    /// to be of its subscriber's room. 0: no rooms.
    #[arg(long, default_value_t = 0)]
    rooms: usize,
    /// Publish nothing: expect `--messages` messages published by another process (another
    /// `temma-load` with `--publish`, on this machine: markers carry wall-clock send times),
    /// and wait for them (after the first, until `--drain-ms` passes with nothing new). For runs
    /// that spread subscribers over several processes and servers.
    #[arg(long)]
    external: bool,
    /// Local addresses to open subscribers from (repeatable; subscriber `i` binds to source
    /// `i % N`, any port). On loopback, 127.0.0.0/8 is all the machine's: each address has its
    /// own ephemeral ports, so more than one address gets past the ≈ 28 000 ports of one, and
    /// keeps the kernel's port search short (it scans the range when it is nearly full).
    #[arg(long)]
    source: Vec<std::net::IpAddr>,
    /// Before its stream request, each subscriber asks for this path on the same connection
    /// and reads the answer (as a browser's `EventSource` reuses the connection that fetched
    /// the page): e.g. `--after-request /`.
    #[arg(long)]
    after_request: Option<String>,
}

impl Args {
    /// The room of a subscriber or a message (`None` without `--rooms`).
    fn room(&self, n: u64) -> Option<u64> {
        (self.rooms > 0).then(|| n % self.rooms as u64)
    }
}

/// Histograms are sharded so that subscribers rarely contend for one.
const SHARDS: usize = 32;
/// Highest latency recorded, in µs (60 s); above is clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

struct Shared {
    connected: AtomicUsize,
    failed: AtomicUsize,
    received: AtomicU64,
    duplicates: AtomicU64,
    /// Messages the publish endpoint accepted (2xx).
    published: AtomicU64,
    first_send_us: AtomicU64,
    last_send_us: AtomicU64,
    last_receive_us: AtomicU64,
    stop: AtomicBool,
    /// With `--rooms`: messages accepted and subscribers connected, per room; deliveries of a
    /// message to a subscriber of another room.
    published_rooms: Vec<AtomicU64>,
    connected_rooms: Vec<AtomicU64>,
    misrouted: AtomicU64,
    latencies: Vec<std::sync::Mutex<Histogram<u64>>>,
    /// Time from sending a POST to its answer.
    posts: std::sync::Mutex<Histogram<u64>>,
    statuses: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Shared {
    /// Microseconds since the Unix epoch: markers carry it, so that a message published by
    /// another process (`--external`) is timed as well.
    fn now_us(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }

    /// Deliveries expected: every accepted message by every subscriber (of its room).
    fn expected(&self, connected: usize) -> u64 {
        if self.published_rooms.is_empty() {
            return self.published.load(Ordering::Relaxed) * connected as u64;
        }
        self.published_rooms
            .iter()
            .zip(&self.connected_rooms)
            .map(|(published, connected)| {
                published.load(Ordering::Relaxed) * connected.load(Ordering::Relaxed)
            })
            .sum()
    }
}

fn loopback(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("`{url}`: only http:// URLs are supported"));
    }
    match uri.host() {
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1") => Ok(uri),
        _ => Err(format!(
            "`{url}`: only loopback targets (127.0.0.1, localhost, [::1])"
        )),
    }
}

fn authority(uri: &hyper::Uri) -> String {
    let host = uri.host().unwrap_or("127.0.0.1");
    let port = uri.port_u16().unwrap_or(80);
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Finds every `load-<seq>-<ts>` marker in `data`.
fn markers(data: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    memchr::memmem::find_iter(data, b"load-").filter_map(move |at| {
        let rest = &data[at + 5..];
        let seq_end = rest.iter().position(|b| !b.is_ascii_digit())?;
        if seq_end == 0 || rest.get(seq_end) != Some(&b'-') {
            return None;
        }
        let ts_part = &rest[seq_end + 1..];
        let ts_end = ts_part
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(ts_part.len());
        if ts_end == 0 {
            return None;
        }
        let seq = std::str::from_utf8(&rest[..seq_end]).ok()?.parse().ok()?;
        let ts = std::str::from_utf8(&ts_part[..ts_end]).ok()?.parse().ok()?;
        Some((seq, ts))
    })
}

/// One SSE subscriber: connect (retrying), then read events until told to stop.
///
/// A plain socket read by this one task: the response head is parsed with `httparse`, a
/// chunked body is unframed with `httparse::parse_chunk_size`, and markers are found in the
/// data. (A full HTTP client costs a second task and a channel hop per event, which would
/// measure the tool more than the server.)
async fn subscriber(id: usize, uri: hyper::Uri, args: Arc<Args>, shared: Arc<Shared>) {
    let room = args.room(id as u64);
    let uri = match room {
        Some(room) => {
            let target = uri.path_and_query().map_or("/", |p| p.as_str());
            let separator = if target.contains('?') { '&' } else { '?' };
            format!("http://{}{target}{separator}room=r{room}", authority(&uri))
                .parse()
                .expect("a valid URI")
        }
        None => uri,
    };
    let Some((mut socket, mut buffer, chunked)) = connect(id, &uri, &args, &shared).await else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    shared.connected.fetch_add(1, Ordering::Relaxed);
    if let Some(room) = room {
        shared.connected_rooms[room as usize].fetch_add(1, Ordering::Relaxed);
    }
    let shard = &shared.latencies[id % SHARDS];
    let mut seen = Seen::new(args.messages);
    let mut data: Vec<u8> = Vec::with_capacity(4096);
    let mut body = Body {
        chunked,
        chunk_left: 0,
    };
    let mut batch: Vec<u64> = Vec::with_capacity(64);
    loop {
        if body.unframe(&mut buffer, &mut data).is_none() {
            return;
        }
        let now = shared.now_us();
        if let Some(end) = memchr::memmem::rfind(&data, b"\n\n") {
            let complete = end + 2;
            let mut got = 0u64;
            for (seq, ts) in markers(&data[..complete]) {
                if room.is_some() && args.room(seq) != room {
                    shared.misrouted.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if seen.insert(seq) {
                    got += 1;
                    if args.external {
                        // The publisher is elsewhere: the first send time comes with the marker.
                        shared.first_send_us.fetch_min(ts, Ordering::Relaxed);
                    }
                    batch.push(now.saturating_sub(ts).min(MAX_LATENCY_US));
                } else {
                    shared.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            data.drain(..complete);
            if got > 0 {
                shared.received.fetch_add(got, Ordering::Relaxed);
                shared.last_receive_us.fetch_max(now, Ordering::Relaxed);
                let mut histogram = shard.lock().unwrap_or_else(|p| p.into_inner());
                for latency in batch.drain(..) {
                    let _ = histogram.record(latency.max(1));
                }
            }
        }
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        use tokio::io::AsyncReadExt;
        let mut scratch = [0u8; 8192];
        match socket.read(&mut scratch).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buffer.extend_from_slice(&scratch[..n]),
        }
    }
}

/// Opens the stream, retrying refusals with a backoff as a browser does.
async fn connect(
    id: usize,
    uri: &hyper::Uri,
    args: &Args,
    shared: &Shared,
) -> Option<(TcpStream, Vec<u8>, bool)> {
    let source = (!args.source.is_empty()).then(|| args.source[id % args.source.len()]);
    for attempt in 0..args.attempts {
        if shared.stop.load(Ordering::Relaxed) {
            return None;
        }
        match open_stream(uri, source, args.after_request.as_deref()).await {
            Ok(stream) => return Some(stream),
            Err(error) => {
                count_status(shared, error);
                let backoff = Duration::from_millis(100 << attempt.min(5));
                tokio::time::sleep(backoff).await;
            }
        }
    }
    None
}

/// A response body: chunked (hyper) or delimited by the end of the connection (temma's direct
/// path, Nchan, Pushpin).
struct Body {
    chunked: bool,
    /// Bytes left in the current chunk, with its CRLF.
    chunk_left: usize,
}

impl Body {
    /// Moves the body bytes of `buffer` to `data`; `None` on a malformed chunk.
    fn unframe(&mut self, buffer: &mut Vec<u8>, data: &mut Vec<u8>) -> Option<()> {
        if !self.chunked {
            data.extend_from_slice(buffer);
            buffer.clear();
            return Some(());
        }
        loop {
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(buffer.len());
                data.extend_from_slice(&buffer[..take]);
                buffer.drain(..take);
                self.chunk_left -= take;
                if self.chunk_left > 0 {
                    return Some(());
                }
            }
            // The CRLF after a chunk's data, then the next size line.
            if buffer.starts_with(b"\r\n") {
                buffer.drain(..2);
            }
            match httparse::parse_chunk_size(buffer) {
                Ok(httparse::Status::Complete((used, 0))) => {
                    buffer.drain(..used);
                    return Some(());
                }
                Ok(httparse::Status::Complete((used, size))) => {
                    buffer.drain(..used);
                    self.chunk_left = size as usize + 2; // data and its CRLF
                }
                Ok(httparse::Status::Partial) => return Some(()),
                Err(_) => return None,
            }
        }
    }
}

/// Which sequence numbers a subscriber has seen (a bitset: publishers may race, so messages
/// can arrive out of order).
struct Seen {
    bits: Vec<u64>,
}

impl Seen {
    fn new(messages: u64) -> Seen {
        Seen {
            bits: vec![0; messages.div_ceil(64) as usize],
        }
    }

    /// `true` the first time `seq` is seen.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let Some(slot) = self.bits.get_mut(word) else {
            return true; // Beyond the run: count it, it cannot be checked.
        };
        if *slot & (1 << bit) != 0 {
            return false;
        }
        *slot |= 1 << bit;
        true
    }
}

/// A response head as read: its status, its `Content-Length` and whether its body is chunked,
/// and the bytes read after it.
struct Head {
    status: u16,
    length: Option<usize>,
    chunked: bool,
    rest: Vec<u8>,
}

/// Reads what the socket has into `buffer`; `Err` names why not (an error kind, `closed`).
async fn read_more(
    socket: &mut TcpStream,
    buffer: &mut Vec<u8>,
    closed: &str,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut scratch = [0u8; 4096];
    let n = socket
        .read(&mut scratch)
        .await
        .map_err(|e| format!("read: {}", e.kind()))?;
    if n == 0 {
        return Err(closed.into());
    }
    buffer.extend_from_slice(&scratch[..n]);
    Ok(())
}

/// Writes `request` and reads up to the end of the response head. `Err` names why not (an
/// error kind, `closed`) for the report.
async fn exchange(socket: &mut TcpStream, request: &str, closed: &str) -> Result<Head, String> {
    use tokio::io::AsyncWriteExt;
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let mut buffer = Vec::with_capacity(1024);
    loop {
        read_more(socket, &mut buffer, closed).await?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buffer) {
            Ok(httparse::Status::Complete(end)) => {
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                };
                let head = Head {
                    status: response.code.unwrap_or(0),
                    length: header("content-length").and_then(|v| v.trim().parse().ok()),
                    chunked: header("transfer-encoding").is_some_and(|v| v.contains("chunked")),
                    rest: buffer.split_off(end),
                };
                return Ok(head);
            }
            Ok(httparse::Status::Partial) if buffer.len() < 64 * 1024 => continue,
            _ => return Err("malformed response head".into()),
        }
    }
}

/// Asks for `path` on the connection and reads the answer whole (it must have a
/// `Content-Length`), so that the stream request comes next on a kept-alive connection.
async fn first_request(socket: &mut TcpStream, path: &str, host: &str) -> Result<(), String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let head = exchange(socket, &request, "closed after the first request").await?;
    let length = head
        .length
        .ok_or("the first answer has no Content-Length")?;
    let mut body = head.rest;
    while body.len() < length {
        read_more(socket, &mut body, "closed after the first request").await?;
    }
    if body.len() != length {
        return Err("bytes after the first answer".into());
    }
    Ok(())
}

/// Opens one SSE stream: the socket, what was read after the head, and whether the body is
/// chunked. `Err` names why not (a status or an error kind) for the report.
async fn open_stream(
    uri: &hyper::Uri,
    source: Option<std::net::IpAddr>,
    after_request: Option<&str>,
) -> Result<(TcpStream, Vec<u8>, bool), String> {
    let mut socket = match source {
        None => TcpStream::connect(authority(uri)).await,
        Some(source) => connect_from(source, &authority(uri)).await,
    }
    .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = socket.set_nodelay(true);
    if let Some(path) = after_request {
        first_request(&mut socket, path, &authority(uri)).await?;
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        uri.path_and_query().map_or("/", |p| p.as_str()),
        authority(uri)
    );
    let head = exchange(&mut socket, &request, "closed before the response head").await?;
    if head.status != 200 {
        return Err(format!("status {}", head.status));
    }
    Ok((socket, head.rest, head.chunked))
}

/// Connects to `target` from `source` (any port of it).
async fn connect_from(source: std::net::IpAddr, target: &str) -> std::io::Result<TcpStream> {
    let target = tokio::net::lookup_host(target)
        .await?
        .find(|address| address.is_ipv4() == source.is_ipv4())
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrNotAvailable))?;
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// When the `sent`-th message of the `index`-th of `count` publishers is due, counted from
/// their start: the publishers take turns (the `index`-th starts `index / rate` seconds after
/// the first, then each sends every `count / rate`), so that together they send one message
/// every `1 / rate` seconds, not `count` at once every `count / rate`.
fn due_after(index: usize, count: usize, rate: f64, sent: u64) -> Duration {
    Duration::from_secs_f64((index as f64 + sent as f64 * count as f64) / rate)
}

/// One publisher (the `index`-th of `count`): POSTs its share of the messages at its share of
/// the rate, its turns between the others'.
async fn publisher(
    index: usize,
    count: usize,
    uri: hyper::Uri,
    args: Arc<Args>,
    shared: Arc<Shared>,
    next: Arc<AtomicU64>,
    deadline: Instant,
) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= args.messages || Instant::now() >= deadline {
            break;
        }
        let due = started + due_after(index, count, args.rate, sent);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        sent += 1;
        let ts = shared.now_us();
        let _ = shared.first_send_us.compare_exchange(
            u64::MAX,
            ts,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        shared.last_send_us.fetch_max(ts, Ordering::Relaxed);
        let mut body = args
            .body
            .replace("{seq}", &seq.to_string())
            .replace("{ts}", &ts.to_string());
        let room = args.room(seq);
        if let Some(room) = room {
            if body.contains("{room}") {
                body = body.replace("{room}", &format!("r{room}"));
            } else {
                body.push_str(&format!("&room=r{room}"));
            }
        }
        let body = Bytes::from(body);
        let outcome = post(&mut sender, &uri, &args.content_type, body).await;
        match outcome {
            Ok(status) if (200..300).contains(&status) => {
                shared.published.fetch_add(1, Ordering::Relaxed);
                if let Some(room) = room {
                    shared.published_rooms[room as usize].fetch_add(1, Ordering::Relaxed);
                }
                let took = shared.now_us().saturating_sub(ts).clamp(1, MAX_LATENCY_US);
                let _ = shared
                    .posts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(took);
            }
            Ok(status) => count_status(&shared, format!("publish status {status}")),
            Err(error) => count_status(&shared, error),
        }
    }
}

/// One POST on the publisher's connection. A server may close the connection after an
/// answer: open another and send again (once) when the request could not even be sent.
async fn post(
    sender: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    uri: &hyper::Uri,
    content_type: &str,
    body: Bytes,
) -> Result<u16, String> {
    let mut outcome = Err("not sent".to_owned());
    for _ in 0..2 {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            *sender = connect_publisher(uri).await.ok();
        }
        let Some(connection) = sender.as_mut() else {
            return Err("publish connect failed".into());
        };
        if connection.ready().await.is_err() {
            *sender = None;
            continue;
        }
        let request = Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", authority(uri))
            .header("content-type", content_type)
            .body(Full::new(body.clone()))
            .expect("valid request");
        match connection.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                return Ok(status);
            }
            Err(error) if error.is_canceled() => {
                *sender = None;
                outcome = Err(format!("publish error: {error}"));
            }
            Err(error) => {
                *sender = None;
                return Err(format!("publish error: {error}"));
            }
        }
    }
    outcome
}

fn count_status(shared: &Shared, key: String) {
    *shared
        .statuses
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_default() += 1;
}

async fn connect_publisher(
    uri: &hyper::Uri,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(authority(uri))
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Resident memory of the given processes, in KiB.
fn rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// CPU time (user + system) the `--pid` processes have used so far, in µs: field 14 and 15 of
/// `/proc/PID/stat`, in clock ticks. Each process's threads are included.
fn cpu_us(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    let ticks_per_s = rustix::param::clock_ticks_per_second().max(1);
    let mut ticks = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name, which may hold spaces, in parentheses.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): utime is field 14, stime 15.
        ticks += fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    }
    Some(ticks * 1_000_000 / ticks_per_s)
}

/// On-CPU time of each thread of the `--pid` processes so far, in ns, by (pid, tid): the first
/// field of `/proc/PID/task/TID/schedstat`. Exact, where utime + stime count 10 ms ticks: at 200
/// messages a run, a tick is 50 µs per message.
fn cpu_ns_per_thread(pids: &[u32]) -> Option<std::collections::HashMap<(u32, u32), u64>> {
    let mut threads = std::collections::HashMap::new();
    for &pid in pids {
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let tid_path = entry.ok()?.path();
            let tid: u32 = tid_path.file_name()?.to_str()?.parse().ok()?;
            // A thread that ended between the listing and the read counts as gone.
            let Ok(stat) = std::fs::read_to_string(tid_path.join("schedstat")) else {
                continue;
            };
            threads.insert((pid, tid), stat.split_whitespace().next()?.parse().ok()?);
        }
    }
    Some(threads)
}

/// What the server spent between two readings: exact (schedstat) when every thread of the first
/// reading is still there at the second; otherwise (a thread ended, taking its time with it)
/// utime + stime, which keeps ended threads' time.
struct CpuReading {
    threads: Option<std::collections::HashMap<(u32, u32), u64>>,
    ticks_us: Option<u64>,
}

impl CpuReading {
    fn now(pids: &[u32]) -> CpuReading {
        CpuReading {
            threads: cpu_ns_per_thread(pids),
            ticks_us: cpu_us(pids),
        }
    }

    /// µs used since `before`, and how it was measured.
    fn since(&self, before: &CpuReading) -> Option<(u64, &'static str)> {
        if let (Some(then), Some(now)) = (&before.threads, &self.threads)
            && then.keys().all(|thread| now.contains_key(thread))
        {
            let ns: u64 = now
                .iter()
                .map(|(thread, &ns)| ns.saturating_sub(then.get(thread).copied().unwrap_or(0)))
                .sum();
            return Some((ns / 1000, "schedstat"));
        }
        let used = self.ticks_us?.saturating_sub(before.ticks_us?);
        Some((used, "ticks"))
    }
}

/// CPU time (in ticks) the whole machine has used, every process's, ended ones included (user,
/// nice, system, irq and softirq of `/proc/stat`: what the kernel also charges to processes'
/// utime + stime), less this tool's and the `--pid` servers' own (`/proc/PID/stat`).
fn others_cpu_ticks(servers: &[u32]) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal…
    let machine =
        fields.first()? + fields.get(1)? + fields.get(2)? + fields.get(5)? + fields.get(6)?;
    let ticks_per_s = rustix::param::clock_ticks_per_second().max(1);
    let mut ours: Vec<u32> = servers.to_vec();
    ours.push(std::process::id());
    let ours_us = cpu_us(&ours)?;
    Some(machine.saturating_sub(ours_us * ticks_per_s / 1_000_000))
}

/// The CPU time every other process on the machine used while the server's was measured: on
/// a machine the load shares, another process's burst (a peer still draining the previous
/// run, a build) is latency the measured server did not cause.
#[derive(serde::Serialize, Default)]
struct OtherCpu {
    total_ms: f64,
    /// `total_ms` over the machine's CPU time in that window (wall time × CPUs).
    share: f64,
}

/// The server's CPU time over the publishing phase, and per message and per delivery.
#[derive(serde::Serialize, Default)]
struct Cpu {
    /// On-CPU time of the `--pid` processes from the first POST to the end of the drain.
    total_ms: f64,
    per_message_us: f64,
    per_delivery_us: f64,
    /// `schedstat` (exact, ns) or `ticks` (utime + stime, 10 ms steps: a thread ended).
    measured_by: &'static str,
}

#[derive(serde::Serialize)]
struct Report {
    subscribers: usize,
    connected: usize,
    failed: usize,
    messages: u64,
    /// Messages the publish endpoint accepted (2xx): each one is expected by every subscriber.
    accepted: u64,
    expected: u64,
    received: u64,
    delivered_ratio: f64,
    gaps: u64,
    duplicates: u64,
    /// With `--rooms`: how many, and deliveries of a message to a subscriber of another room.
    rooms: usize,
    misrouted: u64,
    deliveries_per_s: f64,
    /// Messages actually sent per second (below `--rate` when the server slows publishers).
    published_per_s: f64,
    latency_us: Latency,
    /// From sending a POST to its answer (for temma: until the broker published it).
    post_latency_us: Latency,
    rss_kib_before: Option<u64>,
    rss_kib_connected: Option<u64>,
    /// After the messages were delivered (the history and rooms they left behind).
    rss_kib_after: Option<u64>,
    /// With `--pid`, the server's CPU time while publishing and delivering.
    server_cpu: Option<Cpu>,
    /// With `--pid`, what every other process used in the same window (this tool excepted).
    other_cpu: Option<OtherCpu>,
    rss_kib_per_connection: Option<f64>,
    errors: std::collections::BTreeMap<String, u64>,
    seconds: f64,
}

#[derive(serde::Serialize, Default)]
struct Latency {
    p50: u64,
    p95: u64,
    p99: u64,
    max: u64,
    mean: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        if histogram.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: histogram.value_at_quantile(0.50),
            p95: histogram.value_at_quantile(0.95),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
            mean: histogram.mean(),
        }
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.p50 as f64 / 1000.0,
            self.p95 as f64 / 1000.0,
            self.p99 as f64 / 1000.0,
            self.max as f64 / 1000.0
        )
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let subscribe = match loopback(&args.subscribe) {
        Ok(uri) => uri,
        Err(error) => {
            eprintln!("temma-load: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let publish = match args.publish.as_deref().map(loopback).transpose() {
        Ok(uri) => uri,
        Err(error) => {
            eprintln!("temma-load: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.rate <= 0.0 || !args.rate.is_finite() {
        eprintln!("temma-load: --rate must be positive");
        return std::process::ExitCode::from(2);
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let report = runtime.block_on(run(Arc::new(args.clone()), subscribe, publish));
    runtime.shutdown_timeout(Duration::from_millis(100));
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("JSON"));
    } else {
        print_text(&report);
    }
    std::process::ExitCode::SUCCESS
}

async fn run(args: Arc<Args>, subscribe: hyper::Uri, publish: Option<hyper::Uri>) -> Report {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_secs);
    let shared = new_shared(args.rooms);
    let rss_before = rss_kib(&args.pid);
    let tasks = ramp_up(&args, &subscribe, &shared).await;
    // Wait until every subscriber connected or gave up.
    while shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)
        < args.subscribers
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the servers settle (and the opening bytes arrive) before measuring memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_kib(&args.pid);
    if args.hold_secs > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
    }
    let connected = shared.connected.load(Ordering::Relaxed);
    let cpu_before = (!args.pid.is_empty()).then(|| CpuReading::now(&args.pid));
    let others_before = (!args.pid.is_empty())
        .then(|| others_cpu_ticks(&args.pid).map(|ticks| (ticks, Instant::now())))
        .flatten();
    let messages = match publish {
        Some(publish) => publish_all(&args, publish, &shared, connected, deadline).await,
        None if args.external => {
            // Someone else publishes them all: each is expected by every subscriber here.
            shared.published.store(args.messages, Ordering::Relaxed);
            let expected = shared.expected(connected);
            let mut last = 0;
            let mut quiet_since: Option<Instant> = None;
            while Instant::now() < deadline {
                let now = shared.received.load(Ordering::Relaxed);
                if now >= expected {
                    break;
                }
                if now != last {
                    last = now;
                    quiet_since = Some(Instant::now());
                } else if quiet_since
                    .is_some_and(|at| at.elapsed() >= Duration::from_millis(args.drain_ms))
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            args.messages
        }
        None => 0,
    };
    let cpu_used = cpu_before.and_then(|before| CpuReading::now(&args.pid).since(&before));
    let other_cpu = others_before.and_then(|(before, at)| {
        let ticks = others_cpu_ticks(&args.pid)?.saturating_sub(before);
        let us = ticks * 1_000_000 / rustix::param::clock_ticks_per_second().max(1);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some(OtherCpu {
            total_ms: us as f64 / 1000.0,
            share: us as f64 / (at.elapsed().as_micros().max(1) as f64 * cpus as f64),
        })
    });
    shared.stop.store(true, Ordering::Relaxed);
    for task in &tasks {
        task.abort();
    }
    let mut report = report(
        &args,
        &shared,
        started,
        connected,
        messages,
        (rss_before, rss_connected),
    );
    report.server_cpu = cpu_used.map(|(us, measured_by)| Cpu {
        total_ms: us as f64 / 1000.0,
        per_message_us: us as f64 / report.accepted.max(1) as f64,
        per_delivery_us: us as f64 / report.received.max(1) as f64,
        measured_by,
    });
    report.other_cpu = other_cpu;
    report
}

/// The counters every task updates.
fn new_shared(rooms: usize) -> Arc<Shared> {
    Arc::new(Shared {
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        published: AtomicU64::new(0),
        first_send_us: AtomicU64::new(u64::MAX),
        last_send_us: AtomicU64::new(0),
        last_receive_us: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        published_rooms: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
        connected_rooms: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
        misrouted: AtomicU64::new(0),
        latencies: (0..SHARDS)
            .map(|_| {
                std::sync::Mutex::new(
                    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("histogram bounds"),
                )
            })
            .collect(),
        statuses: Default::default(),
        posts: std::sync::Mutex::new(
            Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("histogram bounds"),
        ),
    })
}

/// Opens the subscribers, `--ramp` a second.
async fn ramp_up(
    args: &Arc<Args>,
    subscribe: &hyper::Uri,
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::with_capacity(args.subscribers);
    let per_tick = (args.ramp as usize / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for id in 0..args.subscribers {
        if id % per_tick == 0 {
            tick.tick().await;
        }
        tasks.push(tokio::spawn(subscriber(
            id,
            subscribe.clone(),
            args.clone(),
            shared.clone(),
        )));
    }
    tasks
}

/// Publishes `--messages` at `--rate`, then drains: until everything arrived, or the drain
/// time passed with nothing new. Returns how many messages were to be sent.
async fn publish_all(
    args: &Arc<Args>,
    publish: hyper::Uri,
    shared: &Arc<Shared>,
    connected: usize,
    deadline: Instant,
) -> u64 {
    {
        let count = args
            .publishers
            .unwrap_or_else(|| ((args.rate / 20.0).ceil() as usize).clamp(1, 256));
        let next = Arc::new(AtomicU64::new(0));
        let publishers: Vec<_> = (0..count)
            .map(|index| {
                tokio::spawn(publisher(
                    index,
                    count,
                    publish.clone(),
                    args.clone(),
                    shared.clone(),
                    next.clone(),
                    deadline,
                ))
            })
            .collect();
        for publisher in publishers {
            let _ = publisher.await;
        }
        // Drain: until everything arrived, or the drain time passed with nothing new.
        // Only what the publish endpoint accepted is expected.
        let expected = shared.expected(connected);
        let mut last = shared.received.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline {
            let now = shared.received.load(Ordering::Relaxed);
            if now >= expected {
                break;
            }
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(args.drain_ms) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    args.messages
}

/// The report, from the counters.
fn report(
    args: &Args,
    shared: &Shared,
    started: Instant,
    connected: usize,
    messages: u64,
    (rss_before, rss_connected): (Option<u64>, Option<u64>),
) -> Report {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).expect("bounds");
    for shard in &shared.latencies {
        histogram
            .add(&*shard.lock().unwrap_or_else(|p| p.into_inner()))
            .expect("same bounds");
    }
    let received = shared.received.load(Ordering::Relaxed);
    let accepted = shared.published.load(Ordering::Relaxed);
    let expected = shared.expected(connected);
    let first = shared.first_send_us.load(Ordering::Relaxed);
    let last = shared.last_receive_us.load(Ordering::Relaxed);
    let window = if first != u64::MAX && last > first {
        (last - first) as f64 / 1e6
    } else {
        0.0
    };
    let latency = Latency::of(&histogram);
    let post_latency = Latency::of(&shared.posts.lock().unwrap_or_else(|p| p.into_inner()));
    Report {
        subscribers: args.subscribers,
        connected,
        failed: shared.failed.load(Ordering::Relaxed),
        messages,
        accepted,
        expected,
        received,
        delivered_ratio: if expected > 0 {
            received as f64 / expected as f64
        } else {
            0.0
        },
        // Messages count once per subscriber however often they came: what is missing is a gap.
        gaps: expected.saturating_sub(received),
        duplicates: shared.duplicates.load(Ordering::Relaxed),
        rooms: args.rooms,
        misrouted: shared.misrouted.load(Ordering::Relaxed),
        deliveries_per_s: if window > 0.0 {
            received as f64 / window
        } else {
            0.0
        },
        published_per_s: {
            let last_send = shared.last_send_us.load(Ordering::Relaxed);
            if first != u64::MAX && last_send > first && messages > 1 {
                (messages - 1) as f64 * 1e6 / (last_send - first) as f64
            } else {
                0.0
            }
        },
        latency_us: latency,
        post_latency_us: post_latency,
        rss_kib_before: rss_before,
        rss_kib_connected: rss_connected,
        rss_kib_after: rss_kib(&args.pid),
        server_cpu: None,
        other_cpu: None,
        rss_kib_per_connection: match (rss_before, rss_connected) {
            (Some(before), Some(after)) if connected > 0 => {
                Some((after as f64 - before as f64) / connected as f64)
            }
            _ => None,
        },
        errors: shared
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Whether the run spread its load over rooms.
fn args_rooms(report: &Report) -> bool {
    report.rooms > 0
}

fn print_text(report: &Report) {
    println!(
        "subscribers: {} connected of {} ({} failed)",
        report.connected, report.subscribers, report.failed
    );
    if report.messages > 0 {
        println!(
            "messages: {} sent, {} accepted by the publish endpoint",
            report.messages, report.accepted
        );
        println!(
            "deliveries: {} of {} expected ({:.2} %), {} gaps, {} duplicates",
            report.received,
            report.expected,
            report.delivered_ratio * 100.0,
            report.gaps,
            report.duplicates
        );
        if args_rooms(report) {
            println!(
                "rooms: {} deliveries to a subscriber of another room",
                report.misrouted
            );
        }
        println!(
            "throughput: {:.0} deliveries/s, {:.0} messages/s published",
            report.deliveries_per_s, report.published_per_s
        );
        println!("latency: {}", report.latency_us.text());
        println!("POST answered: {}", report.post_latency_us.text());
    }
    if let (Some(before), Some(after)) = (report.rss_kib_before, report.rss_kib_connected) {
        println!(
            "server RSS: {before} KiB before, {after} KiB connected, {:.1} KiB per connection",
            report.rss_kib_per_connection.unwrap_or(0.0)
        );
        if let Some(after) = report.rss_kib_after {
            println!("server RSS after the messages: {after} KiB");
        }
    }
    if let Some(cpu) = &report.server_cpu {
        println!(
            "server CPU: {:.1} ms, {:.1} µs per message, {:.2} µs per delivery ({})",
            cpu.total_ms, cpu.per_message_us, cpu.per_delivery_us, cpu.measured_by
        );
    }
    if let Some(other) = &report.other_cpu {
        println!(
            "other processes' CPU meanwhile: {:.1} ms ({:.1} % of the machine)",
            other.total_ms,
            other.share * 100.0
        );
    }
    for (error, count) in &report.errors {
        println!("error: {error} ×{count}");
    }
    println!("took {:.1} s", report.seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_any_wrapping() {
        let temma =
            b"id: 1-1\nevent: msg\ndata: {\"from\":\"load\",\"text\":\"load-7-123456\"}\n\n";
        assert_eq!(markers(temma).collect::<Vec<_>>(), [(7, 123456)]);
        let nchan = b"id: 1:0\ndata: from=load&text=load-8-99\n\n";
        assert_eq!(markers(nchan).collect::<Vec<_>>(), [(8, 99)]);
        assert_eq!(markers(b"load-x-1 load-1- load--2").count(), 0);
        assert_eq!(markers(b"load-1-2 load-3-4").count(), 2);
    }

    #[test]
    fn publishers_take_turns_at_the_rate_of_all() {
        // Three publishers at 50 msg/s together: one message every 20 ms, in turn.
        let mut schedule: Vec<(u128, usize)> = (0..3)
            .flat_map(|index| {
                (0..4).map(move |sent| (due_after(index, 3, 50.0, sent).as_micros(), index))
            })
            .collect();
        schedule.sort();
        let times: Vec<u128> = schedule.iter().map(|(at, _)| *at).collect();
        assert_eq!(times, (0..12).map(|k| k * 20_000).collect::<Vec<_>>());
        let turns: Vec<usize> = schedule.iter().map(|(_, index)| *index).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]);
        // One publisher: every 1 / rate.
        assert_eq!(due_after(0, 1, 20.0, 3), Duration::from_millis(150));
    }

    #[test]
    fn only_loopback_targets() {
        assert!(loopback("http://127.0.0.1:8000/event/fetch").is_ok());
        assert!(loopback("http://localhost/x").is_ok());
        assert!(loopback("http://[::1]:8000/x").is_ok());
        assert!(loopback("http://example.com/x").is_err());
        assert!(loopback("https://127.0.0.1/x").is_err());
    }
}
