//! Starts and stops a real temma app for tests: HTTP on 127.0.0.1:0, ZeroMQ on ports the system
//! picks, and an SSE reader over a real HTTP connection. Never sleeps to wait for readiness:
//! every wait polls with a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use temma::{App, Config};
use tokio_util::sync::CancellationToken;

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A configuration for tests: the repository's static folder, every ZeroMQ port picked by the
/// system, no initial history (tests count messages), the embedded broker.
pub fn test_config() -> Config {
    let text = format!(
        r#"
[application]
root = "{root}"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:0"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:0"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:0"
zmq_client_sub = "zmq://SUB@127.0.0.1:0"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2
[event]
initial_history = 0
"#,
        root = manifest_dir().display()
    );
    Config::from_toml(&text, &manifest_dir().join("etc/test.toml")).expect("test config")
}

pub struct TestApp {
    pub http: SocketAddr,
    pub shutdown: CancellationToken,
    pub client: reqwest::Client,
    app: Option<App>,
}

impl TestApp {
    /// Starts with the test configuration.
    pub async fn start() -> TestApp {
        Self::start_with(|_| {}).await
    }

    /// Starts with the test configuration changed by `change` (then validated again).
    pub async fn start_with(change: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = test_config();
        change(&mut config);
        config.validate().expect("changed test config is valid");
        Self::start_config(&config).await
    }

    pub async fn start_config(config: &Config) -> TestApp {
        let shutdown = CancellationToken::new();
        let app = App::serve(config, shutdown.clone())
            .await
            .expect("app starts");
        let http = app.http_addr().expect("serve binds HTTP");
        TestApp {
            http,
            shutdown,
            client: reqwest::Client::new(),
            app: Some(app),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("running")
    }

    /// Waits until both ZeroMQ sockets are connected and a message makes the full round trip
    /// (the broker's PUB knows the subscription). The warm-up message is published: tests that
    /// count messages connect their clients after this, with no initial history.
    pub async fn ready(&self) {
        let start = Instant::now();
        loop {
            let response = self
                .client
                .post(self.url("/message/broadcast"))
                .form(&[("from", "warm-up"), ("text", "warm-up")])
                .send()
                .await
                .expect("POST");
            if response.status() == 200 {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "app not ready: {}",
                response.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Posts a form.
    pub async fn post_form(&self, from: &str, text: &str) -> reqwest::Response {
        self.client
            .post(self.url("/message/broadcast"))
            .form(&[("from", from), ("text", text)])
            .send()
            .await
            .expect("POST")
    }

    /// Posts raw bytes with a content type.
    pub async fn post_raw(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url("/message/broadcast"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    /// Posts each text (as sender `a`) and checks it was published.
    pub async fn post_all(&self, texts: impl IntoIterator<Item = String>) {
        for text in texts {
            let status = self.post_form("a", &text).await.status();
            assert_eq!(status, 200, "{text}");
        }
    }

    /// Posts each text in the background, in order, checking each was published.
    pub fn post_in_background(&self, texts: Vec<String>) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let url = self.url("/message/broadcast");
        tokio::spawn(async move {
            for text in texts {
                let response = client
                    .post(&url)
                    .form(&[("from", "a"), ("text", &text)])
                    .send()
                    .await
                    .expect("POST");
                assert_eq!(response.status(), 200, "{text}");
            }
        })
    }

    pub async fn sse(&self) -> Sse {
        Sse::connect(&self.client, &self.url("/event/fetch"), None).await
    }

    /// Stops the app and waits for every task, failing if that takes too long.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let app = self.app.take().expect("running");
        tokio::time::timeout(DEADLINE, app.wait())
            .await
            .expect("app stops in time");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The value of the first `/metrics` line that starts with `line_start`.
pub fn metric(app: &TestApp, line_start: &str) -> Option<f64> {
    metric_in(&app.app().metrics().render(), line_start)
}

/// Reads a response head (up to its blank line) from `stream`, and what came after it.
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    loop {
        if let Some(end) = memchr::memmem::find(&bytes, b"\r\n\r\n") {
            let rest = bytes.split_off(end + 4);
            return (String::from_utf8(bytes).unwrap(), rest);
        }
        let mut buffer = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "the connection ended before a response head");
        bytes.extend_from_slice(&buffer[..n]);
    }
}

/// Reads a raw SSE stream until `count` numbers that follow `marker` (a field's opening, such
/// as `"n":`) came, and returns them in order: fewer if the stream ends first; a read that
/// waits past [`DEADLINE`] fails the test. Cheap, so that many readers keep up at once.
pub async fn numbers_after(
    stream: &mut tokio::net::TcpStream,
    marker: &[u8],
    count: usize,
) -> Vec<usize> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::with_capacity(count);
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    while seen.len() < count {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
            .await
            .expect("the stream goes on")
            .unwrap();
        if n == 0 {
            break; // Closed: the caller's assertion says what was missed.
        }
        pending.extend_from_slice(&buffer[..n]);
        let mut used = 0;
        while let Some(at) = memchr::memmem::find(&pending[used..], marker) {
            let start = used + at + marker.len();
            let Some(len) = pending[start..].iter().position(|b| !b.is_ascii_digit()) else {
                break; // The number is not complete yet.
            };
            let number = std::str::from_utf8(&pending[start..start + len]).unwrap();
            seen.push(number.parse::<usize>().unwrap());
            used = start + len;
        }
        pending.drain(..used);
    }
    seen
}

/// The value of the first line of a `/metrics` text that starts with `line_start`.
pub fn metric_in(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// One SSE event as read off the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    /// Comment lines (`: …`), without the colon.
    pub comments: Vec<String>,
    /// The `retry:` value, if any.
    pub retry: Option<String>,
}

impl Event {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// A minimal SSE reader over a real HTTP response (tests only).
pub struct Sse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
    /// Every byte received, for tests that check framing.
    pub raw: Vec<u8>,
}

impl Sse {
    pub async fn connect(client: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Sse {
        let mut request = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = tokio::time::timeout(DEADLINE, request.send())
            .await
            .expect("SSE headers arrive without waiting for a message")
            .expect("GET /event/fetch");
        Sse {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            stream: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// The next complete event (including comment-only and retry-only blocks), or `None` when
    /// the stream ends. Fails after [`DEADLINE`].
    pub async fn next(&mut self) -> Option<Event> {
        self.next_within(DEADLINE)
            .await
            .expect("an SSE event in time")
    }

    /// Like [`Sse::next`], but `Err(())` when nothing complete arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Option<Event>, ()> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = find_blank_line(&self.buffer) {
                let block: Vec<u8> = self.buffer.drain(..end.1).collect();
                return Ok(Some(parse_block(&block[..end.0])));
            }
            match tokio::time::timeout_at(until, self.stream.next()).await {
                Err(_) => return Err(()),
                Ok(None) => return Ok(None),
                Ok(Some(Err(_))) => return Ok(None),
                Ok(Some(Ok(bytes))) => {
                    self.raw.extend_from_slice(&bytes);
                    self.buffer.extend_from_slice(&bytes);
                }
            }
        }
    }

    /// The next event that is not a presence count (`event: presence`).
    pub async fn next_but_presence(&mut self) -> Option<Event> {
        loop {
            let event = self.next().await?;
            if event.event.as_deref() != Some("presence") {
                return Some(event);
            }
        }
    }

    /// The next `msg` event, skipping comments, keep-alives and the opening block.
    pub async fn next_message(&mut self) -> Event {
        loop {
            let event = self.next().await.expect("stream still open");
            if event.event.as_deref() == Some("msg") {
                return event;
            }
        }
    }

    /// The `text` of the next `count` messages.
    pub async fn texts(&mut self, count: usize) -> Vec<String> {
        self.messages(count)
            .await
            .iter()
            .map(|event| event.json()["text"].as_str().expect("a text").to_owned())
            .collect()
    }

    /// Reads `count` `msg` events.
    pub async fn messages(&mut self, count: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            out.push(self.next_message().await);
        }
        out
    }
}

fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2))
}

fn parse_block(block: &[u8]) -> Event {
    let text = std::str::from_utf8(block).expect("SSE is UTF-8");
    let mut event = Event::default();
    let mut data = Vec::new();
    for line in text.split('\n') {
        if let Some(comment) = line.strip_prefix(':') {
            event.comments.push(comment.trim().to_owned());
        } else if let Some(value) = line.strip_prefix("id: ") {
            event.id = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("event: ") {
            event.event = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("data: ") {
            data.push(value);
        } else if let Some(value) = line.strip_prefix("retry: ") {
            event.retry = Some(value.to_owned());
        } else {
            panic!("unexpected SSE line {line:?}");
        }
    }
    event.data = data.join("\n");
    event
}

/// A second web node on the first one's broker.
pub async fn second_node(first: &TestApp) -> TestApp {
    use temma::config::Role;
    let config = test_config();
    let pull = first
        .app()
        .addresses()
        .listening(config.dsn(Role::BrokerPull))[0]
        .clone();
    let publish = first
        .app()
        .addresses()
        .listening(config.dsn(Role::BrokerPub))[0]
        .clone();
    TestApp::start_with(move |config| {
        config.broker.embedded = false;
        for (name, dsn) in [
            (
                "zmq_client_push",
                format!("zmq://PUSH@{}", pull.trim_start_matches("tcp://")),
            ),
            (
                "zmq_client_sub",
                format!("zmq://SUB@{}", publish.trim_start_matches("tcp://")),
            ),
        ] {
            config
                .application
                .data_sources
                .insert(name.into(), dsn.parse().unwrap());
        }
    })
    .await
}

/// A TCP port free right now (bound, read, released), for tests that run separate processes.
pub fn free_port() -> u16 {
    // The kernel may hand the port it just freed out again: two calls for one configuration
    // (PULL and PUB) then named the same port. A port is given once per test process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes a config file for a separate process into `dir`, with the repository as root.
pub fn write_config(dir: &Path, body: &str) -> PathBuf {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let path = etc.join("temma.toml");
    let text = format!(
        "[application]\nroot = \"{}\"\n{body}",
        manifest_dir().display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("temma-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("mkdir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// The `temma` binary as a child process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const TEMMA: &str = env!("CARGO_BIN_EXE_temma");

pub fn temma(args: &[&str]) -> Command {
    let mut command = Command::new(TEMMA);
    command.args(args).env_remove("RUST_LOG");
    // Environment overrides from the test runner's own environment must not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("TEMMA_") {
            command.env_remove(key);
        }
    }
    command
}

/// Whether every thread of process `pid` is stopped (`T` in `/proc/PID/task/*/stat`).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}

/// A child process killed when the test ends, however it ends, with its log lines.
pub struct Running(pub Child, pub std::sync::mpsc::Receiver<String>);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Reads log lines (stderr) until one contains `needle`; returns that line.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        self.wait_for_log_after(needle).0
    }

    /// Reads log lines (stderr) until one contains `needle`; returns that line and the lines
    /// read before it.
    pub fn wait_for_log_after(&self, needle: &str) -> (String, Vec<String>) {
        let start = Instant::now();
        let mut before = Vec::new();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            let line = self.1.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no log line containing {needle:?} in time; before it: {before:?}")
            });
            if line.contains(needle) {
                return (line, before);
            }
            before.push(line);
        }
    }

    /// Sends the signal `name`; `STOP` returns once every thread of the process has stopped
    /// (`kill` only queues it: a thread running on another CPU goes on until it is told, and
    /// went on long enough to publish a message a test sent right after).
    pub fn signal(&self, name: &str) {
        let pid = self.0.id();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        if name == "STOP" {
            let start = Instant::now();
            while !all_stopped(pid) {
                assert!(start.elapsed() < DEADLINE, "process {pid} did not stop");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Waits for the exit status, failing after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "process did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn spawn(args: &[&str]) -> Running {
    let mut command = temma(args);
    run(&mut command)
}

/// A shell command line (to set limits with `ulimit` first), with the same environment
/// cleaning as [`temma`].
pub fn spawn_shell(line: &str) -> Running {
    let mut command = Command::new("sh");
    command.args(["-c", line]).env_remove("RUST_LOG");
    for (key, _) in std::env::vars() {
        if key.starts_with("TEMMA_") {
            command.env_remove(key);
        }
    }
    run(&mut command)
}

/// Runs a prepared command (its environment set) as a [`Running`].
pub fn run_command(command: &mut Command) -> Running {
    run(command)
}

fn run(command: &mut Command) -> Running {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn temma");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Running(child, rx)
}

/// A configuration for `temma broker` alone: PULL and PUB bound on free ports of 127.0.0.1,
/// then `extra` (TOML). Returns its path and the two ports.
pub fn standalone_broker_config(dir: &TempDir, extra: &str) -> (PathBuf, u16, u16) {
    let (pull, publish) = (free_port(), free_port());
    let path = write_config(
        &dir.0,
        &format!(
            r#"[application.dataSources]
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
{extra}"#
        ),
    );
    (path, pull, publish)
}

/// `temma broker`, then `temma serve`, from one config; each waited for.
pub fn broker_then_web(path: &str) -> (Running, Running) {
    let mut broker = spawn(&["broker", "-c", path]);
    broker.wait_for_log("broker running");
    let mut web = spawn(&["serve", "-c", path]);
    web.wait_for_log("listening on http://");
    (broker, web)
}

pub fn ports_config(dir: &TempDir, embedded: bool) -> (std::path::PathBuf, u16) {
    let (pull, publish, http) = (free_port(), free_port(), free_port());
    let path = write_config(
        &dir.0,
        &format!(
            r#"[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:{pull}"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
zmq_client_sub = "zmq://SUB@127.0.0.1:{publish}"
[server]
listen = "127.0.0.1:{http}"
shutdown_grace_secs = 2
[broker]
embedded = {embedded}
[event]
initial_history = 0
"#
        ),
    );
    (path, http)
}

// Browsers as separate SSE clients.

/// What one client saw: every event, in order.
#[derive(Default)]
pub struct Seen {
    /// `(id, text)` of each `msg`.
    pub messages: Vec<(String, String)>,
    pub resets: Vec<String>,
    pub connections: usize,
}

/// An SSE client that behaves like a browser's `EventSource`: it reconnects after the stream
/// ends (or the server is away), sending the last id it saw.
pub async fn browser(
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    stop: CancellationToken,
) {
    let client = reqwest::Client::new();
    let mut last_id: Option<String> = None;
    while !stop.is_cancelled() {
        let mut request = client.get(&url);
        if let Some(id) = &last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = tokio::select! {
            () = stop.cancelled() => return,
            response = request.send() => response,
        };
        let Ok(response) = response.and_then(|r| r.error_for_status()) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        seen.lock().unwrap().connections += 1;
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        loop {
            let chunk = tokio::select! {
                () = stop.cancelled() => return,
                chunk = body.next() => chunk,
            };
            let Some(Ok(chunk)) = chunk else { break };
            buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in frame.lines() {
                    if let Some(value) = line.strip_prefix("id: ") {
                        id = Some(value.to_owned());
                    } else if let Some(value) = line.strip_prefix("event: ") {
                        event = Some(value.to_owned());
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data.push_str(value);
                    }
                }
                match event.as_deref() {
                    Some("msg") => {
                        let json: serde_json::Value = serde_json::from_str(&data).unwrap();
                        let text = json["text"].as_str().unwrap().to_owned();
                        let id = id.clone().expect("a message has an id");
                        last_id = Some(id.clone());
                        seen.lock().unwrap().messages.push((id, text));
                    }
                    Some("reset") => seen.lock().unwrap().resets.push(data),
                    _ => {}
                }
            }
        }
        // The stream ended (the node is stopping): reconnect soon, as `retry:` asks.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raw ZMTP 3.0, for peers that write bytes themselves: hostile ones, or floods written as fast
/// as the kernel takes them.
pub mod zmtp {
    /// A greeting with the NULL mechanism (64 bytes).
    pub fn greeting() -> Vec<u8> {
        let mut bytes = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0];
        let mut mechanism = b"NULL".to_vec();
        mechanism.resize(20, 0);
        bytes.extend_from_slice(&mechanism);
        bytes.push(0); // as-server
        bytes.resize(64, 0);
        bytes
    }

    /// A READY command announcing `socket_type`.
    pub fn ready(socket_type: &str) -> Vec<u8> {
        let mut body = vec![5];
        body.extend_from_slice(b"READY");
        body.push(11);
        body.extend_from_slice(b"Socket-Type");
        body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
        body.extend_from_slice(socket_type.as_bytes());
        let mut frame = vec![0x04, body.len() as u8];
        frame.extend_from_slice(&body);
        frame
    }

    /// A one-frame message `{"from":FROM,"text":TEXT}` (short frame: under 256 bytes).
    pub fn message(from: &str, text: &str) -> Vec<u8> {
        frame(format!(r#"{{"from":"{from}","text":"{text}"}}"#).as_bytes())
    }

    /// A one-frame message of `body` (short frame: under 256 bytes).
    pub fn frame(body: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x00, u8::try_from(body.len()).expect("a short frame")];
        frame.extend_from_slice(body);
        frame
    }

    /// A subscription (`subscribe`) or its cancel to a PUB socket, as a ZMTP 3.0 SUB sends it.
    pub fn subscription(subscribe: bool, prefix: &str) -> Vec<u8> {
        frame(&[&[u8::from(subscribe)], prefix.as_bytes()].concat())
    }
}
