//! Broker throughput: PUSH → broker (PULL → scripts → PUB) → SUB on loopback, 100-byte
//! messages, one producer and one consumer, order checked on every message.
//!
//! Run: `cargo bench --bench broker` (release build). The broker under test runs as its own
//! process, as in production: `temma broker` with a generated config, and, in the same run,
//! the libzmq reference: pyzmq's `zmq.proxy(PULL, PUB)` (skipped with a note when pyzmq is
//! not installed: `pip install pyzmq`). Producer and consumer are this process, on two threads,
//! using the zeromq crate as temma's web nodes do.
//!
//! Options after `--`: `--messages N` (default 1000000 without scripts, a fifth of it with
//! scripts), `--only NAME` (per-script, libzmq-proxy, none, crate-relay, trivial,
//! default-chain, chain-workers, pair), `--workers N` (threads of `chain-workers`),
//! `--rounds N` (the pass-through scenarios — `libzmq-proxy`, `none`, `crate-relay` — N times
//! each, taking turns, so that the machine's slow and quick phases fall on all of them alike;
//! each round is a line, with its `round`; default 1),
//! `--json` (one JSON object per line instead of the table), `--script FILE [--params JSON]`
//! (time your own script in `per-script`), `--web-frames` (each message as a web node sends
//! it: a `ref` and the sender's `client` first, 160 bytes in all).
//!
//! Each broker's CPU time (utime + stime of its processes, from `/proc`, Linux only) is read
//! before and after the messages and reported per message (`cpu_us_per_msg`): on two cores
//! shared with the producer and consumer, a broker's rate is what its CPU per message leaves.
//!
//! Scenarios:
//! - `per-script`: each bundled script alone, called in-process: µs and allocations per call;
//! - `libzmq-proxy`: the reference, C libzmq's proxy;
//! - `none`: temma's broker without scripts (the frame is stamped without a full parse);
//! - `crate-relay`: the zeromq crate alone, no temma: a PULL → PUB loop (`recv`, `send`) on a
//!   tokio runtime with a worker per core, in its own process (this binary, `--relay`). What
//!   any broker built on the crate spends at least: the wall under `none`;
//! - `trivial`: one script, `fn on_message(msg) { msg }`;
//! - `default-chain`: the chain of `etc/temma.toml` (rate limit, trim, commands, profanity),
//!   with the rate limit raised so that every message goes through all four scripts;
//! - `chain-workers`: the same chain on `broker.script_workers` threads (as many as cores, or
//!   `--workers N`); order checked per sender (1000 of them), which is what workers keep;
//! - `pair`: two brokers without scripts (`broker.peer`): pushed into the active one, read
//!   from the backup's PUB socket (its copies), as web nodes in failover mode read them.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zeromq::{PushSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const MESSAGE_BYTES: usize = 100;
/// Senders the messages come from (each message's `from`).
const SENDERS: usize = 1000;
const TEMMA: &str = env!("CARGO_BIN_EXE_temma");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `--web-frames`: each message as a web node sends it, with a `ref` and the sender's
/// `client` address (which the broker does not publish).
static WEB_FRAMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A 100-byte message whose text starts with its sequence number (160 bytes with
/// `--web-frames`: a `ref` and a `client` first).
fn frame(seq: usize, sender: usize) -> Vec<u8> {
    let web = WEB_FRAMES.load(std::sync::atomic::Ordering::Relaxed);
    let (mut text, size) = if web {
        let head = format!(
            r#"{{"ref":"bench-{seq:032x}","client":"ip:192.0.2.{}","from":"user{sender:04}","text":"{seq:010} "#,
            sender % 250
        );
        (head.into_bytes(), MESSAGE_BYTES + 60)
    } else {
        let head = format!(r#"{{"from":"user{sender:04}","text":"{seq:010} "#);
        (head.into_bytes(), MESSAGE_BYTES)
    };
    while text.len() < size - 2 {
        text.push(b'x');
    }
    text.extend_from_slice(b"\"}");
    text
}

fn text_seq(frame: &[u8]) -> Option<usize> {
    let at = memchr::memmem::find(frame, b"\"text\":\"")? + 8;
    std::str::from_utf8(frame.get(at..at + 10)?)
        .ok()?
        .parse()
        .ok()
}

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

/// A broker process under test, killed on drop (with `others`: the rest of a pair).
struct BrokerProcess {
    child: Child,
    pull: String,
    publish: String,
    others: Vec<Child>,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.others.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (20 s at most) for `child` to print a line containing `needle` on stderr and returns
/// that line; otherwise says what it printed instead and whether it exited.
fn wait_for_line(child: &mut Child, needle: &str) -> Result<String, String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = needle.to_owned();
    std::thread::spawn(move || {
        let mut found = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Before the line: every line, for the error; after it: read and dropped.
            if !found {
                found = line.contains(&wanted);
                let _ = tx.send((found, line));
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut printed = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((true, line)) => return Ok(line),
            Ok((false, line)) => printed.push(line),
            Err(_) => break,
        }
    }
    let status = match child.try_wait() {
        Ok(Some(status)) => format!("it exited ({status})"),
        _ => "it still runs".to_owned(),
    };
    Err(format!(
        "it did not print {needle:?} within 20 s; {status}; its stderr:\n{}",
        printed.join("\n")
    ))
}

/// `temma broker -c config`, once it says it runs.
fn broker_process(config: &Path) -> Child {
    let mut child = Command::new(TEMMA)
        .args(["broker", "-c", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn temma broker");
    if let Err(e) = wait_for_line(&mut child, "broker running") {
        panic!("temma broker: {e}");
    }
    child
}

fn temma_broker(dir: &Path, scripts: &str) -> BrokerProcess {
    let (pull, publish) = (free_port(), free_port());
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    let config = dir.join("etc/temma.toml");
    std::fs::write(
        &config,
        format!(
            r#"[application]
root = "{root}"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:{pull}"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
zmq_client_sub = "zmq://SUB@127.0.0.1:{publish}"
[broker]
watch = false
{scripts}
[log]
level = "warn,temma::app=info"
"#,
            root = root().display()
        ),
    )
    .unwrap();
    let child = broker_process(&config);
    BrokerProcess {
        child,
        pull: format!("tcp://127.0.0.1:{pull}"),
        publish: format!("tcp://127.0.0.1:{publish}"),
        others: Vec::new(),
    }
}

/// Two brokers as a pair, no scripts, histories large enough for `count` messages; once the
/// first is active and the second follows, a process whose `pull` is the active broker's and
/// whose `publish` is the backup's.
fn temma_pair(dir: &Path, count: usize) -> BrokerProcess {
    let ports: Vec<[u16; 3]> = (0..2)
        .map(|_| [free_port(), free_port(), free_port()])
        .collect();
    let mut children = Vec::new();
    for me in 0..2 {
        let [pull, publish, snapshot] = ports[me];
        let [_, peer_pub, peer_snapshot] = ports[1 - me];
        let config = dir.join(format!("b{me}/etc/temma.toml"));
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(
            &config,
            format!(
                r#"[application]
root = "{root}"
[application.dataSources]
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:{snapshot}"
zmq_broker_peer = "zmq://SUB@127.0.0.1:{peer_pub}"
zmq_broker_peer_snapshot = "zmq://DEALER@127.0.0.1:{peer_snapshot}"
[broker]
watch = false
snapshot = "zmq_broker_snapshot"
peer = "zmq_broker_peer"
peer_snapshot = "zmq_broker_peer_snapshot"
history_size = {count}
[log]
level = "warn,temma::app=info"
"#,
                root = root().display()
            ),
        )
        .unwrap();
        children.push(broker_process(&config));
    }
    let pull = format!("tcp://127.0.0.1:{}", ports[0][0]);
    let publish = format!("tcp://127.0.0.1:{}", ports[1][1]);
    // Push to the first until a copy comes out of the second: it took over (a push after a
    // second without an active peer), the second follows it.
    runtime().block_on(async {
        let mut sub = SubSocket::new();
        sub.subscribe("").await.unwrap();
        sub.connect(&publish).await.unwrap();
        let mut push = PushSocket::new();
        push.connect(&pull).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "the pair did not form");
            let frame = br#"{"from":"bench","text":"pairing"}"#.to_vec();
            push.send(ZmqMessage::from(frame)).await.unwrap();
            let copied = tokio::time::timeout(Duration::from_millis(100), async {
                loop {
                    let message = sub.recv().await.unwrap();
                    let frame = message.get(0).unwrap();
                    if memchr::memmem::find(frame, b"pairing").is_some() {
                        return;
                    }
                }
            })
            .await;
            if copied.is_ok() {
                break;
            }
        }
    });
    let mut children = children.into_iter();
    BrokerProcess {
        child: children.next().unwrap(),
        pull,
        publish,
        others: children.collect(),
    }
}

const PROXY: &str = r#"
import sys, zmq
ctx = zmq.Context()
# Ports chosen by the kernel as the sockets bind: no window for another process to take them.
front = ctx.socket(zmq.PULL); front.bind("tcp://127.0.0.1:*")
back = ctx.socket(zmq.PUB); back.bind("tcp://127.0.0.1:*")
print("proxy started", front.LAST_ENDPOINT.decode(), back.LAST_ENDPOINT.decode(),
      file=sys.stderr, flush=True)
zmq.proxy(front, back)
"#;

/// pyzmq's `zmq.proxy(PULL, PUB)`, or why it cannot run here.
fn libzmq_proxy() -> Result<BrokerProcess, String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import zmq"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("pyzmq is not installed (pip install pyzmq)".into());
    }
    let mut child = Command::new(python)
        .arg("-c")
        .arg(PROXY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let started = wait_for_line(&mut child, "proxy started").and_then(|line| {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [.., pull, publish] if pull.starts_with("tcp://") => {
                Ok((pull.to_owned(), publish.to_owned()))
            }
            _ => Err(format!("it printed no endpoints: {line:?}")),
        }
    });
    match started {
        Ok((pull, publish)) => Ok(BrokerProcess {
            child,
            pull,
            publish,
            others: Vec::new(),
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// A bare PULL → PUB relay on the zeromq crate, no temma: this binary run with `--relay`.
fn crate_relay() -> BrokerProcess {
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .arg("--relay")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the relay");
    let line = wait_for_line(&mut child, "relay started").unwrap_or_else(|e| panic!("relay: {e}"));
    let [.., pull, publish] = line.split_whitespace().collect::<Vec<_>>()[..] else {
        panic!("relay: no endpoints in {line:?}");
    };
    BrokerProcess {
        pull: pull.to_owned(),
        publish: publish.to_owned(),
        child,
        others: Vec::new(),
    }
}

/// `--relay`: what the zeromq crate does with nothing around it — every message read from PULL
/// is sent on PUB, on a tokio runtime with a worker per core (as `temma broker`).
fn relay_main() {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let mut pull = zeromq::PullSocket::new();
            let mut publish = zeromq::PubSocket::new();
            let pull_at = pull.bind("tcp://127.0.0.1:0").await.expect("PULL binds");
            let publish_at = publish.bind("tcp://127.0.0.1:0").await.expect("PUB binds");
            eprintln!("relay started {pull_at} {publish_at}");
            while let Ok(message) = pull.recv().await {
                if publish.send(message).await.is_err() {
                    break;
                }
            }
        });
}

/// CPU time (s) the processes have spent so far: the run time of each of their threads
/// (`/proc/PID/task/*/schedstat`, nanoseconds); `None` where there is no such file.
fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    let mut nanos = 0u64;
    for pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            nanos += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(nanos as f64 / 1e9)
}

impl BrokerProcess {
    fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.child)
            .chain(self.others.iter())
            .map(Child::id)
            .collect()
    }
}

struct Outcome {
    sent: usize,
    received: usize,
    in_order: bool,
    seconds: f64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        if self.received == 0 {
            return 0.0;
        }
        self.received as f64 / self.seconds
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Drives `count` messages through a broker: producer and consumer each on its own thread,
/// each with its own socket (the zeromq crate's sockets live on the runtime that made them).
/// Pushes `count` frames from 1000 senders and reads them back; `per_sender`: order is checked
/// per sender (what the chain's workers keep), else over all messages.
fn drive(broker: &BrokerProcess, count: usize, per_sender: bool) -> Outcome {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let ready = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let publish = broker.publish.clone();
    let consumer = {
        let ready = ready.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut sub = SubSocket::new();
                sub.subscribe("").await.unwrap();
                sub.connect(&publish).await.expect("SUB connects");
                let mut received = 0usize;
                let mut in_order = true;
                let mut last: Option<usize> = None;
                let mut last_of = std::collections::HashMap::new();
                let mut end = Instant::now();
                // Messages lost stop the wait 3 s after the last one came (20 s for the first):
                // frames that are not messages (warm-ups, a pair's heartbeats every second) do
                // not extend it, or a lost message would keep the bench waiting for ever (it
                // once held a whole `compare.sh` run).
                let mut progress = Instant::now();
                while received < count {
                    let wait = if ready.load(Ordering::Acquire) { 3 } else { 20 };
                    let left = (progress + Duration::from_secs(wait))
                        .saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, sub.recv()).await {
                        Ok(Ok(message)) => {
                            let Some(seq) = message.get(0).and_then(|f| text_seq(f)) else {
                                // A warm-up frame: the PUB knows our subscription.
                                if !ready.swap(true, Ordering::AcqRel) {
                                    progress = Instant::now();
                                }
                                continue;
                            };
                            progress = Instant::now();
                            let last = if per_sender {
                                last_of.entry(seq % SENDERS).or_insert(None)
                            } else {
                                &mut last
                            };
                            if last.is_some_and(|l| seq <= l) {
                                in_order = false;
                            }
                            *last = Some(seq);
                            received += 1;
                            end = Instant::now();
                        }
                        _ => break, // Messages were lost: stop waiting.
                    }
                }
                done.store(true, Ordering::Release);
                (received, in_order, end)
            })
        })
    };
    let frames: Vec<Vec<u8>> = (0..count).map(|seq| frame(seq, seq % SENDERS)).collect();
    let pull = broker.pull.clone();
    let producer = std::thread::spawn(move || {
        runtime().block_on(async move {
            let mut push = PushSocket::new();
            push.connect(&pull).await.expect("PUSH connects");
            let warm_up = br#"{"from":"bench","text":"warm-up"}"#.to_vec();
            // Until the consumer hears a warm-up, or gives up (then nothing is sent, and the
            // scenario reports what it received: none, instead of waiting for ever).
            while !ready.load(Ordering::Acquire) {
                if done.load(Ordering::Acquire) {
                    return Instant::now();
                }
                // A send that cannot go (a broker that does not read) must not hold the
                // producer past the consumer giving up: it once hung a whole bench run.
                let send = push.send(ZmqMessage::from(warm_up.clone()));
                if let Ok(sent) = tokio::time::timeout(Duration::from_millis(500), send).await {
                    sent.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Let the last warm-up frames through before the clock starts.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let start = Instant::now();
            for frame in frames {
                let send = push.send(ZmqMessage::from(frame));
                match tokio::time::timeout(Duration::from_secs(5), send).await {
                    Ok(sent) => sent.unwrap(),
                    // The broker stopped reading: the consumer reports what it received.
                    Err(_) if done.load(Ordering::Acquire) => break,
                    Err(_) => {}
                }
            }
            // Keep the socket open until everything is through: closing it drops what it
            // still queues.
            while !done.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            start
        })
    });
    let (received, in_order, end) = consumer.join().unwrap();
    let start = producer.join().unwrap();
    Outcome {
        sent: count,
        received,
        in_order,
        seconds: end.duration_since(start).as_secs_f64(),
    }
}

/// Time per call of each bundled script alone (or of `extra`: a file and its JSON params),
/// without sockets.
fn per_script(calls: usize, json: bool, extra: Option<(String, String)>) {
    use temma::broker::{Stamped, Stamper};
    use temma::script::{ScriptLimits, ScriptSpec};
    let table: [(&str, serde_json::Value); 4] = [
        (
            "ratelimit.rhai",
            serde_json::json!({"max": 1_000_000_000, "window_secs": 10}),
        ),
        ("trim.rhai", serde_json::json!({"max_chars": 2000})),
        ("commands.rhai", serde_json::json!({})),
        (
            "profanity.rhai",
            serde_json::json!({"words_file": "scripts/words.txt"}),
        ),
    ];
    if !json {
        println!("{:<22} {:>10} {:>12}", "script alone", "calls", "µs/call");
    }
    let mut stamper = Stamper::new(usize::MAX);
    let table: Vec<(PathBuf, serde_json::Value)> = match extra {
        Some((file, params)) => vec![(
            PathBuf::from(file),
            serde_json::from_str(&params).expect("--params is a JSON object"),
        )],
        None => table
            .into_iter()
            .map(|(file, params)| (root().join("scripts").join(file), params))
            .collect(),
    };
    for (path, params) in table {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut spec = ScriptSpec::standalone(
            &path,
            serde_json::from_value(params).unwrap(),
            ScriptLimits::default(),
        );
        spec.root = root();
        let mut script = spec.load().expect("bundled script loads");
        let messages: Vec<_> = (0..calls)
            .map(|i| match stamper.stamp(&frame(i, i % 1000), false) {
                Ok(Stamped::Parsed { map, .. }) => map,
                _ => unreachable!(),
            })
            .collect();
        let start = Instant::now();
        for message in messages {
            script.run(message).expect("script passes");
        }
        let micros = start.elapsed().as_secs_f64() * 1e6 / calls as f64;
        if json {
            println!(
                r#"{{"scenario":"per-script","script":"{file}","calls":{calls},"us_per_call":{micros:.3}}}"#
            );
        } else {
            println!("{file:<22} {calls:>10} {micros:>12.2}");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let messages: Option<usize> = value("--messages").and_then(|v| v.parse().ok());
    let only = value("--only");
    let json = args.iter().any(|a| a == "--json");
    if args.iter().any(|a| a == "--web-frames") {
        WEB_FRAMES.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let base = messages.unwrap_or(1_000_000);
    let with_scripts = messages.unwrap_or(base / 5);

    // `--pull ADDR --pub ADDR`: drive a broker started by hand (for profiling it).
    if args.iter().any(|a| a == "--relay") {
        relay_main();
        return;
    }
    if let (Some(pull), Some(publish)) = (value("--pull"), value("--pub")) {
        let child = Command::new("true").spawn().expect("placeholder process");
        let broker = BrokerProcess {
            child,
            pull,
            publish,
            others: Vec::new(),
        };
        let result = drive(&broker, base, false);
        println!(
            "external: sent {} received {} in order {} msgs/s {:.0}",
            result.sent,
            result.received,
            result.in_order,
            result.rate()
        );
        return;
    }
    if wanted("per-script") {
        let extra =
            value("--script").map(|file| (file, value("--params").unwrap_or_else(|| "{}".into())));
        per_script(with_scripts.min(100_000), json, extra);
    }
    let dir = std::env::temp_dir().join(format!("temma-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trivial = dir.join("trivial.rhai");
    std::fs::write(&trivial, "fn on_message(msg) { msg }\n").unwrap();
    // As many workers as cores, unless `--workers N`.
    let workers: usize = value("--workers")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let default_chain = r#"
[[broker.scripts]]
file = "scripts/ratelimit.rhai"
params = { max = 1000000000, window_secs = 10 }
[[broker.scripts]]
file = "scripts/trim.rhai"
params = { max_chars = 2000 }
[[broker.scripts]]
file = "scripts/commands.rhai"
[[broker.scripts]]
file = "scripts/profanity.rhai"
params = { words_file = "scripts/words.txt", mask = "*" }
"#
    .to_owned();
    let rounds: usize = value("--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    // A scenario: its name, the broker's scripts (`None`: not temma), its messages.
    type Scenario<'a> = (&'a str, Option<String>, usize);
    let pass_through: Vec<Scenario> = vec![
        ("libzmq-proxy", None, base),
        ("none", Some(String::new()), base),
        ("crate-relay", None, base),
    ];
    let mut scenarios: Vec<(usize, Scenario)> = (1..=rounds)
        .flat_map(|round| pass_through.iter().cloned().map(move |s| (round, s)))
        .collect();
    let others: Vec<Scenario> = vec![
        (
            "trivial",
            Some(format!(
                "[[broker.scripts]]\nfile = \"{}\"\n",
                trivial.display()
            )),
            with_scripts,
        ),
        ("default-chain", Some(default_chain.clone()), with_scripts),
        (
            "chain-workers",
            Some(format!("script_workers = {workers}\n{default_chain}")),
            with_scripts,
        ),
        ("pair", Some(String::new()), base),
    ];
    scenarios.extend(others.into_iter().map(|s| (1, s)));
    if !json {
        println!(
            "broker: PUSH → broker → SUB, {MESSAGE_BYTES}-byte messages, loopback, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<15} {:>10} {:>10} {:>9} {:>12} {:>12}",
            "broker", "sent", "received", "in order", "msgs/s", "CPU µs/msg"
        );
    }
    for (round, (name, scripts, count)) in scenarios {
        if !wanted(name) {
            continue;
        }
        let broker = match &scripts {
            Some(_) if name == "pair" => temma_pair(&dir.join(name), count),
            Some(scripts) => temma_broker(&dir.join(name), scripts),
            None if name == "crate-relay" => crate_relay(),
            // A third party's reference, not temma: if it cannot run here, say why and go on.
            None => match libzmq_proxy() {
                Ok(proxy) => proxy,
                Err(e) => {
                    eprintln!("libzmq-proxy: skipped: {e}");
                    continue;
                }
            },
        };
        let cpu_before = cpu_seconds(&broker.pids());
        let result = drive(&broker, count, name == "chain-workers");
        // Per message sent (what a lossy broker drops cost it a read).
        let cpu_us = cpu_before
            .zip(cpu_seconds(&broker.pids()))
            .map(|(before, after)| (after - before) * 1e6 / result.sent as f64);
        drop(broker);
        if json {
            let cpu = cpu_us.map_or("null".to_owned(), |us| format!("{us:.3}"));
            println!(
                r#"{{"scenario":"{name}","round":{round},"sent":{},"received":{},"in_order":{},"msgs_per_s":{:.0},"cpu_us_per_msg":{cpu}}}"#,
                result.sent,
                result.received,
                result.in_order,
                result.rate()
            );
        } else {
            println!(
                "{:<15} {:>10} {:>10} {:>9} {:>12.0} {:>12}",
                name,
                result.sent,
                result.received,
                if result.in_order { "yes" } else { "NO" },
                result.rate(),
                cpu_us.map_or("-".to_owned(), |us| format!("{us:.2}"))
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
