//! A rolling restart loses nothing: a broker and two web nodes as separate processes (with the
//! snapshot sockets), SSE clients that reconnect with `Last-Event-ID` as browsers do spread over
//! both nodes, messages posted at 100 msg/s through both; node A then node B get SIGTERM and
//! a new process each. Every message that got a `200` is seen exactly once, in order, by every
//! client, and no client is ever told `reset`.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Running, Seen, TempDir, browser, free_port, temma, write_config};
use tokio_util::sync::CancellationToken;

fn spawn_node(config: &Path, http: u16) -> Running {
    let mut command = temma(&["serve", "-c", config.to_str().unwrap()]);
    command.env("TEMMA_SERVER__LISTEN", format!("127.0.0.1:{http}"));
    let mut node = common::run_command(&mut command);
    node.wait_for_log("listening on http://");
    node
}

/// SIGTERM, then the exit, then a new process on the same port.
fn restart(node: &mut Running, config: &Path, http: u16) {
    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    *node = spawn_node(config, http);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_both_nodes_loses_nothing() {
    let dir = TempDir::new("rolling");
    let (pull, publish, snapshot) = (free_port(), free_port(), free_port());
    let (http_a, http_b) = (free_port(), free_port());
    let config = write_config(
        &dir.0,
        &format!(
            r#"[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:{pull}"
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
zmq_client_sub = "zmq://SUB@127.0.0.1:{publish}"
zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:{snapshot}"
zmq_client_snapshot = "zmq://DEALER@127.0.0.1:{snapshot}"
[server]
listen = "127.0.0.1:{http_a}"
shutdown_grace_secs = 1
[broker]
embedded = false
snapshot = "zmq_broker_snapshot"
[event]
snapshot = "zmq_client_snapshot"
initial_history = 0
"#
        ),
    );
    let mut broker = common::spawn(&["broker", "-c", config.to_str().unwrap()]);
    broker.wait_for_log("broker running");
    let mut node_a = spawn_node(&config, http_a);
    let mut node_b = spawn_node(&config, http_b);
    let nodes = [http_a, http_b];

    // Three browsers on each node.
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for i in 0..6 {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let url = format!("http://127.0.0.1:{}/event/fetch", nodes[i % 2]);
        clients.push((seen.clone(), tokio::spawn(browser(url, seen, stop.clone()))));
    }
    common::eventually("every browser connected", || async {
        clients
            .iter()
            .all(|(seen, _)| seen.lock().unwrap().connections > 0)
            .then_some(())
    })
    .await;

    // 100 messages a second, through both nodes in turn; what got a 200 is remembered.
    let posted = Arc::new(Mutex::new(Vec::<String>::new()));
    let poster = {
        let posted = posted.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                i += 1;
                let text = format!("p{i}");
                let url = format!(
                    "http://127.0.0.1:{}/message/broadcast",
                    nodes[(i % 2) as usize]
                );
                let answer = client
                    .post(&url)
                    .form(&[("from", "poster"), ("text", &text)])
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                if answer.is_ok_and(|answer| answer.status() == 200) {
                    posted.lock().unwrap().push(text);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| restart(&mut node_a, &config, http_a));
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| restart(&mut node_b, &config, http_b));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Stop posting, let the last messages arrive, then stop the browsers.
    let started = Instant::now();
    let posts_at_end = {
        poster.abort();
        let _ = poster.await;
        posted.lock().unwrap().clone()
    };
    assert!(
        posts_at_end.len() >= 200,
        "too few messages got a 200: {}",
        posts_at_end.len()
    );
    common::eventually("every browser has every message", || async {
        let wanted: HashSet<&String> = posts_at_end.iter().collect();
        clients
            .iter()
            .all(|(seen, _)| {
                let seen = seen.lock().unwrap();
                let texts: HashSet<&String> = seen.messages.iter().map(|(_, t)| t).collect();
                wanted.is_subset(&texts)
            })
            .then_some(())
    })
    .await;
    let waited = started.elapsed();
    stop.cancel();
    for (i, (seen, task)) in clients.into_iter().enumerate() {
        let _ = task.await;
        let seen = seen.lock().unwrap();
        assert!(
            seen.resets.is_empty(),
            "client {i} was reset: {:?}",
            seen.resets
        );
        // Exactly once: no text twice.
        let mut texts = HashSet::new();
        for (_, text) in &seen.messages {
            assert!(texts.insert(text), "client {i} saw {text} twice");
        }
        // In order: ids increase (one broker run).
        let seqs: Vec<u64> = seen
            .messages
            .iter()
            .map(|(id, _)| id.split('-').nth(1).unwrap().parse().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|pair| pair[0] < pair[1]),
            "client {i} saw ids out of order"
        );
        // Each restart ended its node's streams: the browsers of both nodes reconnected.
        assert!(
            seen.connections >= 2,
            "client {i}: {} connections",
            seen.connections
        );
    }
    eprintln!(
        "{} messages got a 200; all seen by 6 browsers across two restarts ({waited:?} after the last post)",
        posts_at_end.len()
    );
    drop((node_a, node_b));
    broker.signal("TERM");
    broker.wait_exit(Duration::from_secs(10));
}
