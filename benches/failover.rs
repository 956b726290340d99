//! Failover time: two brokers (`broker.peer`) and a web node (`event.failover`) as separate
//! processes, 100 messages a second posted through the node, a browser reading SSE. Each round
//! SIGKILLs the active broker at a random moment and measures the time from the kill to the
//! first message the browser gets that the other broker stamped (a message of its new run);
//! then the killed broker is started again and rejoins as the backup.
//!
//! Run: `cargo bench --bench failover` (release build; 10 rounds). Options after `--`:
//! `--rounds R`, `--timeout-ms T` (`broker.peer_timeout_ms`, default 1000).
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

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

/// Spawns temma and waits for a log line containing `needle`.
fn spawn(args: &[&str], needle: &str) -> Process {
    let mut child = Command::new(TEMMA)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn temma");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = needle.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&wanted) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("temma {args:?} did not print {needle:?}"));
    Process(child)
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name).join("etc/temma.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let text = format!(
        "[application]\nroot = \"{}\"\n{body}\n[log]\nlevel = \"warn,temma::app=info\"\n",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn pair_state(client: &reqwest::Client, http: u16) -> Option<serde_json::Value> {
    let health: serde_json::Value = client
        .get(format!("http://127.0.0.1:{http}/health"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(health["pair"].clone())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map_or(10, |v| v.parse().expect("a number"));
    let timeout_ms: u64 = args
        .iter()
        .position(|a| a == "--timeout-ms")
        .and_then(|i| args.get(i + 1))
        .map_or(1000, |v| v.parse().expect("a number"));
    let dir = std::env::temp_dir().join(format!("temma-failover-bench-{}", std::process::id()));
    // pull, pub, snapshot, http of each broker.
    let ports: Vec<[u16; 4]> = (0..2)
        .map(|_| [free_port(), free_port(), free_port(), free_port()])
        .collect();
    let configs: Vec<PathBuf> = (0..2)
        .map(|me| {
            let [pull, publish, snapshot, http] = ports[me];
            let [_, peer_pub, peer_snapshot, _] = ports[1 - me];
            write(
                &dir,
                &format!("b{me}"),
                &format!(
                    r#"[application.dataSources]
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:{snapshot}"
zmq_broker_peer = "zmq://SUB@127.0.0.1:{peer_pub}"
zmq_broker_peer_snapshot = "zmq://DEALER@127.0.0.1:{peer_snapshot}"
[broker]
http = "127.0.0.1:{http}"
watch = false
snapshot = "zmq_broker_snapshot"
peer = "zmq_broker_peer"
peer_snapshot = "zmq_broker_peer_snapshot"
peer_timeout_ms = {timeout_ms}"#
                ),
            )
        })
        .collect();
    let web_http = free_port();
    let [a, b] = [ports[0], ports[1]];
    let web = write(
        &dir,
        "web",
        &format!(
            r#"[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:{};127.0.0.1:{}"
zmq_client_sub = "zmq://SUB@127.0.0.1:{};127.0.0.1:{}"
zmq_client_snapshot = "zmq://DEALER@127.0.0.1:{};127.0.0.1:{}"
[server]
listen = "127.0.0.1:{web_http}"
[broker]
embedded = false
[event]
snapshot = "zmq_client_snapshot"
failover = true
initial_history = 0"#,
            a[0], b[0], a[1], b[1], a[2], b[2]
        ),
    );
    let start_broker = |me: usize| {
        spawn(
            &["broker", "-c", configs[me].to_str().unwrap()],
            "broker running",
        )
    };
    let mut brokers = [Some(start_broker(0)), Some(start_broker(1))];
    let _node = spawn(&["serve", "-c", web.to_str().unwrap()], "listening on");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let results = runtime.block_on(async {
        let client = reqwest::Client::new();
        // The browser: the run of each message it gets, with the time.
        let seen: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        {
            let seen = seen.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let response = client
                    .get(format!("http://127.0.0.1:{web_http}/event/fetch"))
                    .send()
                    .await
                    .unwrap();
                let mut body = response.bytes_stream();
                let mut buffer = String::new();
                while let Some(Ok(chunk)) = body.next().await {
                    buffer.push_str(std::str::from_utf8(&chunk).unwrap());
                    while let Some(end) = buffer.find("\n\n") {
                        let frame: String = buffer.drain(..end + 2).collect();
                        if let Some(id) = frame.lines().find_map(|l| l.strip_prefix("id: "))
                            && frame.contains("event: msg")
                        {
                            let run = id.split('-').next().unwrap().to_owned();
                            seen.lock().unwrap().push((run, Instant::now()));
                        }
                    }
                }
            });
        }
        // The pair forms before anything is posted (posts before that would only wait).
        while !matches!(pair_state(&client, ports[0][3]).await, Some(p) if p["backup_confirmed"] == true)
            && !matches!(pair_state(&client, ports[1][3]).await, Some(p) if p["backup_confirmed"] == true)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 100 messages a second, each post on its own.
        let statuses: Arc<Mutex<std::collections::BTreeMap<u16, usize>>> = Arc::default();
        {
            let client = client.clone();
            let statuses = statuses.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                for i in 0u64.. {
                    tick.tick().await;
                    let (client, statuses) = (client.clone(), statuses.clone());
                    tokio::spawn(async move {
                        let status = client
                            .post(format!("http://127.0.0.1:{web_http}/message/broadcast"))
                            .form(&[("from", "bench"), ("text", &format!("m{i}"))])
                            .timeout(Duration::from_secs(5))
                            .send()
                            .await
                            .map_or(0, |r| r.status().as_u16());
                        *statuses.lock().unwrap().entry(status).or_default() += 1;
                    });
                }
            });
        }
        let mut results = Vec::new();
        for round in 0..rounds {
            // The pair formed (first round: from scratch; then: the killed one rejoined).
            let (active, run) = loop {
                let mut found = None;
                for (me, port) in ports.iter().enumerate() {
                    if let Some(pair) = pair_state(&client, port[3]).await
                        && pair["state"] == "active"
                        && pair["backup_confirmed"] == true
                    {
                        found = Some((me, pair["run"].as_str().unwrap().to_owned()));
                    }
                }
                if let Some(found) = found {
                    break found;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64;
            tokio::time::sleep(Duration::from_millis(300 + nanos % 700)).await;
            let before = statuses.lock().unwrap().clone();
            let killed = Instant::now();
            brokers[active].take().unwrap().0.kill().unwrap();
            // The first message stamped by the other broker (another run than the killed one).
            let first = loop {
                let found = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(r, at)| *at > killed && *r != run)
                    .map(|(_, at)| *at);
                if let Some(at) = found {
                    break at;
                }
                assert!(killed.elapsed() < Duration::from_secs(20), "round {round}: no takeover");
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            results.push(first.duration_since(killed));
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let after = statuses.lock().unwrap().clone();
            let unavailable = after.get(&503).unwrap_or(&0) - before.get(&503).unwrap_or(&0);
            eprintln!(
                "round {}: {:.0} ms, {unavailable} posts answered 503",
                round + 1,
                results[round].as_secs_f64() * 1000.0
            );
            brokers[active] = Some(tokio::task::block_in_place(|| start_broker(active)));
        }
        let statuses = statuses.lock().unwrap().clone();
        (results, statuses)
    });
    let (mut results, statuses) = results;
    drop(brokers);
    let _ = std::fs::remove_dir_all(&dir);
    results.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "failover: SIGKILL of the active broker → first message delivered through the other, {rounds} rounds, 100 msg/s posted, peer_timeout_ms = {timeout_ms}"
    );
    println!("| median | max | POST answers over the run |");
    println!("|---|---|---|");
    println!(
        "| {:.0} ms | {:.0} ms | {statuses:?} |",
        ms(results[results.len() / 2]),
        ms(results[results.len() - 1])
    );
}
