//! A web node's start to a full replay: a broker (`temma broker`, with its snapshot socket)
//! holds N messages; a new `temma serve` process is started, and a browser that was away since
//! the first message reconnects to it with `Last-Event-ID` at once (retrying until the port
//! answers). Measured: from the spawn to the first replayed message and to the last one (all
//! N − 1 messages after the first), each run with a new process.
//!
//! Run: `cargo bench --bench replay` (release build; N = 10000, 10 runs). Options after `--`:
//! `--messages N`, `--runs R`.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

const TEMMA: &str = env!("CARGO_BIN_EXE_temma");

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns temma and waits for a log line containing `needle`; returns the line.
fn spawn(args: &[&str], env: &[(&str, String)], needle: &str) -> (Process, String) {
    let mut command = Command::new(TEMMA);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn temma");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = needle.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&wanted) {
                let _ = tx.send(line);
            } else if line.contains("WARN") || line.contains("ERROR") {
                // What went wrong, next to the bench's own failure.
                eprintln!("temma: {line}");
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("temma {args:?} did not print {needle:?}"));
    (Process(child), line)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn write_config(dir: &Path, messages: usize) -> PathBuf {
    let (pull, publish, snapshot, http) = (free_port(), free_port(), free_port(), free_port());
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    let path = dir.join("etc/temma.toml");
    std::fs::write(
        &path,
        format!(
            r#"[application]
root = "{root}"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:{pull}"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
zmq_client_sub = "zmq://SUB@127.0.0.1:{publish}"
zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:{snapshot}"
zmq_client_snapshot = "zmq://DEALER@127.0.0.1:{snapshot}"
[server]
listen = "127.0.0.1:{http}"
[broker]
embedded = false
snapshot = "zmq_broker_snapshot"
history_size = {messages}
watch = false
[event]
snapshot = "zmq_client_snapshot"
history_size = {messages}
initial_history = 0
[log]
level = "warn,temma::app=info"
"#,
            root = env!("CARGO_MANIFEST_DIR"),
        ),
    )
    .unwrap();
    path
}

fn main() {
    let messages = arg("--messages", 10_000);
    let runs = arg("--runs", 10);
    let dir = std::env::temp_dir().join(format!("temma-replay-bench-{}", std::process::id()));
    let config = write_config(&dir, messages);
    let text = std::fs::read_to_string(&config).unwrap();
    let port = |name: &str| -> String {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line.rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('"')
            .to_owned()
    };
    let (pull, http) = (port("zmq_broker_pull"), port("listen"));
    let config_arg = config.to_str().unwrap().to_owned();
    let (_broker, line) = spawn(&["broker", "-c", &config_arg], &[], "broker running");
    let run: String = line
        .split("run=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let results = runtime.block_on(async {
        // The broker's history: N messages of about 100 bytes.
        let mut push = PushSocket::new();
        push.connect(&format!("tcp://127.0.0.1:{pull}")).await.unwrap();
        for i in 1..=messages {
            let frame = format!(r#"{{"from":"bench","text":"message {i:06} ........................................"}}"#);
            push.send(ZmqMessage::from(frame)).await.unwrap();
        }
        // A first node, to know when the broker holds them all: its replay is complete.
        let mut results = Vec::new();
        for round in 0..=runs {
            let started = Instant::now();
            let (node, _) = spawn(
                &["serve", "-c", &config_arg],
                &[],
                "listening on",
            );
            let listening = started.elapsed();
            let (first, last) =
                replay(&http, &format!("{run}-1"), messages - 1, round == 0).await;
            let first = first + listening;
            let last = last + listening;
            drop(node);
            if round > 0 {
                // Round 0 waits for the broker to hold every message; it is not counted.
                results.push((listening, first, last));
            }
        }
        results
    });
    let _ = std::fs::remove_dir_all(&dir);
    let mut lasts: Vec<Duration> = results.iter().map(|r| r.2).collect();
    let mut firsts: Vec<Duration> = results.iter().map(|r| r.1).collect();
    let mut ups: Vec<Duration> = results.iter().map(|r| r.0).collect();
    lasts.sort();
    firsts.sort();
    ups.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "replay of {} messages from the broker's snapshot by a new web node, {runs} runs (ms):",
        messages - 1
    );
    println!("| from spawn to | median | max |");
    println!("|---|---|---|");
    for (what, values) in [
        ("\"listening on\" logged", &ups),
        ("first replayed message", &firsts),
        ("whole replay received", &lasts),
    ] {
        println!(
            "| {what} | {:.1} | {:.1} |",
            ms(values[values.len() / 2]),
            ms(values[values.len() - 1])
        );
    }
}

/// Connects with `Last-Event-ID` (retrying while the port is not there yet) and reads until
/// `count` messages arrived: times of the first and the last, from the call. `warming`: the
/// broker may still be taking the messages in, so that the node takes part of them live, as a
/// burst, and a client that falls behind it is disconnected (a browser would reconnect and
/// replay): start again then.
async fn replay(
    http: &str,
    last_event_id: &str,
    count: usize,
    warming: bool,
) -> (Duration, Duration) {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        let response = client
            .get(format!("http://127.0.0.1:{http}/event/fetch"))
            .header("Last-Event-ID", last_event_id)
            .send()
            .await;
        let Ok(response) = response else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let mut body = response.bytes_stream();
        let mut seen = 0;
        let mut first = None;
        let mut tail = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.unwrap();
            tail.extend_from_slice(&chunk);
            assert!(
                memchr::memmem::find(&tail, b"event: reset").is_none(),
                "the replay was reset: the snapshot did not fill the node's history"
            );
            seen += memchr::memmem::find_iter(&tail, b"event: msg\n").count();
            let keep = tail.len().saturating_sub(10);
            tail.drain(..keep);
            if seen > 0 && first.is_none() {
                first = Some(started.elapsed());
            }
            if seen >= count {
                return (first.unwrap(), started.elapsed());
            }
        }
        assert!(
            seen == 0 || warming,
            "the stream ended after {seen} of {count} messages"
        );
        // Round 0: the broker may not hold them all yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
