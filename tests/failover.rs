//! Two brokers, one active: SIGKILL the active one at a random moment while 100 messages a
//! second are posted through two web nodes, three rounds (each time the killed broker is
//! started again and rejoins as the backup), then the backup once. Every message that got a `200` is seen exactly once
//! by every SSE client on both nodes, all clients see the same order, no client is told
//! `reset`, and no web node is restarted.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Running, Seen, TempDir, browser, free_port, temma, write_config};
use tokio_util::sync::CancellationToken;

/// One broker of the pair: its ports and configuration file.
struct BrokerSpec {
    pull: u16,
    publish: u16,
    snapshot: u16,
    http: u16,
    config: PathBuf,
}

fn broker_config(dir: &Path, me: (u16, u16, u16, u16), peer: (u16, u16)) -> PathBuf {
    let (pull, publish, snapshot, http) = me;
    let (peer_pub, peer_snapshot) = peer;
    write_config(
        dir,
        &format!(
            r#"[application.dataSources]
zmq_broker_pull = "zmq-bind://PULL@127.0.0.1:{pull}"
zmq_broker_pub = "zmq-bind://PUB@127.0.0.1:{publish}"
zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:{snapshot}"
zmq_broker_peer = "zmq://SUB@127.0.0.1:{peer_pub}"
zmq_broker_peer_snapshot = "zmq://DEALER@127.0.0.1:{peer_snapshot}"
[broker]
embedded = false
http = "127.0.0.1:{http}"
snapshot = "zmq_broker_snapshot"
peer = "zmq_broker_peer"
peer_snapshot = "zmq_broker_peer_snapshot"
"#
        ),
    )
}

/// Two brokers as a pair (ports the system picked) and the web nodes' configuration, which
/// lists both (each node's `server.listen` comes from its environment).
fn pair_configs(dir: &TempDir) -> ([BrokerSpec; 2], PathBuf) {
    let ports = || (free_port(), free_port(), free_port(), free_port());
    let (p1, p2) = (ports(), ports());
    let spec = |me: (u16, u16, u16, u16), peer: (u16, u16, u16, u16), name: &str| BrokerSpec {
        pull: me.0,
        publish: me.1,
        snapshot: me.2,
        http: me.3,
        config: broker_config(&dir.0.join(name), me, (peer.1, peer.2)),
    };
    let brokers = [spec(p1, p2, "b1"), spec(p2, p1, "b2")];
    let [b1, b2] = &brokers;
    let web = write_config(
        &dir.0.join("web"),
        &format!(
            r#"[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:{};127.0.0.1:{}"
zmq_client_sub = "zmq://SUB@127.0.0.1:{};127.0.0.1:{}"
zmq_client_snapshot = "zmq://DEALER@127.0.0.1:{};127.0.0.1:{}"
[server]
shutdown_grace_secs = 1
[broker]
embedded = false
[event]
snapshot = "zmq_client_snapshot"
failover = true
initial_history = 0
"#,
            b1.pull, b2.pull, b1.publish, b2.publish, b1.snapshot, b2.snapshot
        ),
    );
    (brokers, web)
}

fn start_broker(spec: &BrokerSpec) -> Running {
    let mut broker = common::spawn(&["broker", "-c", spec.config.to_str().unwrap()]);
    broker.wait_for_log("broker running");
    broker
}

fn spawn_node(config: &Path, http: u16) -> Running {
    let mut command = temma(&["serve", "-c", config.to_str().unwrap()]);
    command.env("TEMMA_SERVER__LISTEN", format!("127.0.0.1:{http}"));
    let mut node = common::run_command(&mut command);
    node.wait_for_log("listening on http://");
    node
}

async fn health(client: &reqwest::Client, http: u16) -> Option<serde_json::Value> {
    client
        .get(format!("http://127.0.0.1:{http}/health"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The broker that says it is active with a backup confirmed, by place (0, 1).
async fn paired(client: &reqwest::Client, brokers: &[BrokerSpec]) -> Option<usize> {
    for (i, spec) in brokers.iter().enumerate() {
        let Some(health) = health(client, spec.http).await else {
            continue;
        };
        let pair = &health["pair"];
        if pair["state"] == "active" && pair["backup_confirmed"] == true {
            return Some(i);
        }
    }
    None
}

/// A number from the clock, for the moment of a kill.
fn jitter(max_ms: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(nanos % max_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_broker_loses_no_message_that_got_a_200() {
    let dir = TempDir::new("failover");
    let (brokers, web) = pair_configs(&dir);
    let [b1, b2] = &brokers;
    let (http_a, http_b) = (free_port(), free_port());
    let mut running = [Some(start_broker(b1)), Some(start_broker(b2))];
    let node_a = spawn_node(&web, http_a);
    let node_b = spawn_node(&web, http_b);
    let nodes = [http_a, http_b];
    let client = reqwest::Client::new();
    // The pair forms: one broker takes over on the nodes' first pushes, the other follows.
    common::eventually("a broker active with a confirmed backup", || {
        paired(&client, &brokers)
    })
    .await;

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

    // 100 messages a second, through both nodes in turn, each post on its own (a slow answer
    // does not slow the stream); what got a 200 is remembered, and every other status.
    let posted = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let stop_posting = CancellationToken::new();
    let poster = {
        let posted = posted.clone();
        let statuses = statuses.clone();
        let stop = stop_posting.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0u64;
            let mut posts = tokio::task::JoinSet::new();
            while !stop.is_cancelled() {
                tick.tick().await;
                i += 1;
                let text = format!("p{i}");
                let url = format!(
                    "http://127.0.0.1:{}/message/broadcast",
                    nodes[(i % 2) as usize]
                );
                let (client, posted, statuses) = (client.clone(), posted.clone(), statuses.clone());
                posts.spawn(async move {
                    let sent = Instant::now();
                    let answer = client
                        .post(&url)
                        .form(&[("from", "poster"), ("text", &text)])
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    let status = answer.map_or(0, |answer| answer.status().as_u16());
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                    if status == 200 {
                        posted.lock().unwrap().push((text, sent));
                    }
                });
                while posts.try_join_next().is_some() {}
            }
            while posts.join_next().await.is_some() {}
        })
    };

    let mut resumed = Vec::new();
    for round in 1..=3 {
        tokio::time::sleep(Duration::from_millis(500) + jitter(1000)).await;
        let active = paired(&client, &brokers).await.expect("a confirmed pair");
        let other = 1 - active;
        // SIGKILL: no goodbye, whatever it was doing.
        let killed_at = Instant::now();
        running[active].take().unwrap().signal("KILL");
        // The other one takes over; the first message posted after the kill that a browser
        // sees says when the flow resumed.
        common::eventually("the backup took over", || async {
            let health = health(&client, brokers[other].http).await?;
            (health["pair"]["state"] == "active").then_some(())
        })
        .await;
        let first_after = common::eventually("a message posted after the kill seen", || async {
            let posted = posted.lock().unwrap();
            let after: HashSet<&String> = posted
                .iter()
                .filter(|(_, sent)| *sent > killed_at)
                .map(|(text, _)| text)
                .collect();
            let seen = clients[0].0.lock().unwrap();
            seen.messages
                .iter()
                .any(|(_, text)| after.contains(text))
                .then(Instant::now)
        })
        .await;
        resumed.push(first_after.duration_since(killed_at));
        // The killed broker comes back and rejoins as the backup.
        running[active] = Some(tokio::task::block_in_place(|| {
            start_broker(&brokers[active])
        }));
        let now_active =
            common::eventually("the pair formed again", || paired(&client, &brokers)).await;
        assert_eq!(
            now_active, other,
            "round {round}: the rejoined broker is the backup"
        );
    }

    // Then the backup dies: nodes deliver the active broker's own stream again (the messages
    // they had left to the backup's copies are fetched from its snapshot), and it rejoins.
    tokio::time::sleep(Duration::from_millis(300) + jitter(700)).await;
    let active = paired(&client, &brokers).await.expect("a confirmed pair");
    let backup = 1 - active;
    let killed_at = Instant::now();
    running[backup].take().unwrap().signal("KILL");
    common::eventually("the active broker says it has no backup", || async {
        let health = health(&client, brokers[active].http).await?;
        (health["pair"]["state"] == "active" && health["pair"]["backup_confirmed"] == false)
            .then_some(())
    })
    .await;
    common::eventually("a message posted after the backup's death seen", || async {
        let posted = posted.lock().unwrap();
        let after: HashSet<&String> = posted
            .iter()
            .filter(|(_, sent)| *sent > killed_at)
            .map(|(text, _)| text)
            .collect();
        let seen = clients[1].0.lock().unwrap();
        seen.messages
            .iter()
            .any(|(_, text)| after.contains(text))
            .then_some(())
    })
    .await;
    running[backup] = Some(tokio::task::block_in_place(|| {
        start_broker(&brokers[backup])
    }));
    let still_active =
        common::eventually("the pair formed again", || paired(&client, &brokers)).await;
    assert_eq!(
        still_active, active,
        "the backup's death changed nothing else"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Stop posting, let the last messages arrive, then stop the browsers.
    stop_posting.cancel();
    poster.await.unwrap();
    let posted: Vec<String> = posted
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| t.clone())
        .collect();
    let statuses = statuses.lock().unwrap().clone();
    assert!(
        posted.len() >= 300,
        "too few messages got a 200: {statuses:?}"
    );
    assert!(
        statuses.keys().all(|status| [200, 503].contains(status)),
        "posts got only 200 or 503: {statuses:?}"
    );
    let wanted: HashSet<&String> = posted.iter().collect();
    let missing = |clients: &[(Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>)]| {
        clients
            .iter()
            .map(|(seen, _)| {
                let seen = seen.lock().unwrap();
                let texts: HashSet<&String> = seen.messages.iter().map(|(_, t)| t).collect();
                let mut missing: Vec<String> = wanted
                    .iter()
                    .filter(|text| !texts.contains(*text))
                    .map(|text| text.to_string())
                    .collect();
                missing.sort();
                missing
            })
            .collect::<Vec<_>>()
    };
    let waiting = Instant::now();
    while missing(&clients).iter().any(|m| !m.is_empty()) {
        assert!(
            waiting.elapsed() < common::DEADLINE,
            "messages that got a 200 missing, per client: {:?}",
            missing(&clients)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let mut orders = Vec::new();
    for (i, (seen, task)) in clients.into_iter().enumerate() {
        task.abort();
        let _ = task.await;
        let seen = seen.lock().unwrap();
        assert!(
            seen.resets.is_empty(),
            "client {i} was reset: {:?}",
            seen.resets
        );
        let mut texts = HashSet::new();
        for (_, text) in &seen.messages {
            assert!(texts.insert(text.clone()), "client {i} saw {text} twice");
        }
        // Every client saw the messages that got a 200 in one order.
        let order: Vec<String> = seen
            .messages
            .iter()
            .map(|(_, text)| text.clone())
            .filter(|text| wanted.contains(text))
            .collect();
        orders.push(order);
        // No web node restarted: each browser kept its one stream.
        assert_eq!(seen.connections, 1, "client {i} reconnected");
    }
    for (i, order) in orders.iter().enumerate().skip(1) {
        assert!(
            *order == orders[0],
            "client {i} saw another order than client 0"
        );
    }
    // The nodes counted the failovers.
    for http in nodes {
        let health = health(&client, http).await.unwrap();
        assert_eq!(health["failovers"], 3, "{health}");
        assert!(health["active_broker"].is_string(), "{health}");
    }
    eprintln!(
        "{} messages got a 200 ({statuses:?}); all seen once, in one order, by 6 browsers; \
         flow resumed {resumed:?} after each kill",
        posted.len()
    );
    drop((node_a, node_b));
}

/// A post with an idempotency key got its `200` from the active broker; that broker dies; the
/// same post sent again (a page retrying, through the other web node) is answered as the first
/// one was — same message id — and not published twice: the backup learned the key from the
/// frames it copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_takeover_is_not_published_twice() {
    let dir = TempDir::new("failover-key");
    let (brokers, web) = pair_configs(&dir);
    let [b1, b2] = &brokers;
    let (http_a, http_b) = (free_port(), free_port());
    let mut running = [Some(start_broker(b1)), Some(start_broker(b2))];
    let _a = spawn_node(&web, http_a);
    let _b = spawn_node(&web, http_b);
    let client = reqwest::Client::new();
    let active = common::eventually("a confirmed pair", || paired(&client, &brokers)).await;
    let stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let reading = tokio::spawn(browser(
        format!("http://127.0.0.1:{http_b}/event/fetch"),
        seen.clone(),
        stop.clone(),
    ));
    common::eventually("the browser connected", || async {
        (seen.lock().unwrap().connections > 0).then_some(())
    })
    .await;
    let post = |http: u16, text: &'static str, key: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut request = client
                .post(format!("http://127.0.0.1:{http}/message/broadcast"))
                .form(&[("from", "me"), ("text", text)])
                .timeout(Duration::from_secs(5));
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            let response = request.send().await.ok()?;
            let id = response
                .headers()
                .get("x-message-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (response.status() == 200).then_some(id?)
        }
    };
    let first = post(http_a, "once", Some("retry-key-1"))
        .await
        .expect("a 200");
    // A 200 means the backup holds it; then the active broker dies.
    running[active].take().unwrap().signal("KILL");
    common::eventually("the backup took over", || async {
        let health = health(&client, brokers[1 - active].http).await?;
        (health["pair"]["state"] == "active").then_some(())
    })
    .await;
    // The page retries, through the other node: the answer names the first message.
    let again = common::eventually("the retry answered", || {
        post(http_b, "once", Some("retry-key-1"))
    })
    .await;
    assert_eq!(
        again, first,
        "the retry is the message published before the takeover"
    );
    // Something after it, to know the browser has everything.
    post(http_a, "after", None).await.expect("a 200");
    common::eventually("the browser saw the last message", || async {
        let seen = seen.lock().unwrap();
        seen.messages
            .iter()
            .any(|(_, text)| text == "after")
            .then_some(())
    })
    .await;
    stop.cancel();
    let _ = reading.await;
    let seen = seen.lock().unwrap();
    let once: Vec<&(String, String)> = seen.messages.iter().filter(|(_, t)| t == "once").collect();
    assert_eq!(once.len(), 1, "seen: {:?}", seen.messages);
    assert_eq!(once[0].0, first);
}

/// `temma check` on a pair: the wiring printout names both brokers (a web node's) and the
/// peer (a broker's); a half-configured pair is refused with the key at fault.
#[test]
fn check_prints_both_brokers_and_refuses_half_a_pair() {
    let dir = TempDir::new("failover-check");
    let check = |name: &str, body: &str| -> (bool, String) {
        let path = write_config(&dir.0.join(name), body);
        let output = temma(&["check", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + String::from_utf8_lossy(&output.stderr).as_ref();
        (output.status.success(), text)
    };
    let web = r#"[application.dataSources]
zmq_client_push = "zmq://PUSH@10.0.0.1:5000;10.0.0.2:5000"
zmq_client_sub = "zmq://SUB@10.0.0.1:6000;10.0.0.2:6000"
zmq_client_snapshot = "zmq://DEALER@10.0.0.1:7000;10.0.0.2:7000"
[broker]
embedded = false
[event]
snapshot = "zmq_client_snapshot"
failover = true
"#;
    let (ok, text) = check("web", web);
    assert!(ok, "{text}");
    for line in [
        "failover: this node follows 2 brokers, pushes to the active one only",
        "broker 1: PULL 10.0.0.1:5000, PUB 10.0.0.1:6000, snapshots 10.0.0.1:7000",
        "broker 2: PULL 10.0.0.2:5000, PUB 10.0.0.2:6000, snapshots 10.0.0.2:7000",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    let broker = r#"[application.dataSources]
zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:7000"
zmq_broker_peer = "zmq://SUB@10.0.0.2:6000"
zmq_broker_peer_snapshot = "zmq://DEALER@10.0.0.2:7000"
[broker]
snapshot = "zmq_broker_snapshot"
peer = "zmq_broker_peer"
peer_snapshot = "zmq_broker_peer_snapshot"
"#;
    let (ok, text) = check("broker", broker);
    assert!(ok, "{text}");
    assert!(
        text.contains("broker pair: reads its peer's PUB at zmq://SUB@10.0.0.2:6000, its snapshots at zmq://DEALER@10.0.0.2:7000"),
        "{text}"
    );
    for (body, problem) in [
        (
            web.replace("10.0.0.1:6000;10.0.0.2:6000", "10.0.0.1:6000"),
            "`event.failover`: needs `event.sub` to name both brokers' PUB sockets, but `zmq_client_sub` names one endpoint",
        ),
        (
            web.replace("10.0.0.1:5000;10.0.0.2:5000", "10.0.0.1:5000"),
            "`message.push`: `zmq_client_push` names 1 endpoint, but `event.sub` names 2: with `event.failover`, each lists the brokers in the same order",
        ),
        (
            web.replace("snapshot = \"zmq_client_snapshot\"\n", ""),
            "`event.failover`: needs `event.snapshot`: the brokers' snapshot sockets, in the order of `event.sub`",
        ),
        (
            broker.replace("peer_snapshot = \"zmq_broker_peer_snapshot\"\n", ""),
            "`broker.peer_snapshot`: is not set: a broker with `broker.peer` copies its peer's history",
        ),
        (
            broker.replace("snapshot = \"zmq_broker_snapshot\"\npeer", "peer"),
            "`broker.snapshot`: is not set: a broker with `broker.peer` keeps the history",
        ),
        (
            broker.replace("peer = \"zmq_broker_peer\"\n", ""),
            "`broker.peer_snapshot`: is set without `broker.peer`",
        ),
        (
            format!("{broker}peer_timeout_ms = 100\n"),
            "`broker.peer_timeout_ms`: is 100: must be at least 300 (three heartbeats, sent every 100 ms)",
        ),
    ] {
        let (ok, text) = check("bad", &body);
        assert!(!ok, "accepted:\n{body}");
        assert!(text.contains(problem), "no {problem:?} in:\n{text}");
    }
}

/// A web node in failover mode matches brokers by their place in the lists: SIGHUP (`rewire`)
/// does not move them, it says a restart is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_names_a_restart_for_a_pairs_lists() {
    let lists = |second: u16| {
        let mut config = common::test_config();
        config.broker.embedded = false;
        let sources = &mut config.application.data_sources;
        for (name, kind, port) in [
            ("zmq_client_push", "PUSH", 5000),
            ("zmq_client_sub", "SUB", 6000),
            ("zmq_client_snapshot", "DEALER", 7000),
        ] {
            sources.insert(
                name.into(),
                format!(
                    "zmq://{kind}@127.0.0.1:{};127.0.0.1:{}",
                    free_port(),
                    second + port
                )
                .parse()
                .unwrap(),
            );
        }
        config.event.snapshot = Some("zmq_client_snapshot".into());
        config.event.failover = true;
        config.validate().unwrap();
        config
    };
    let config = lists(10);
    let node = common::TestApp::start_config(&config).await;
    let mut moved = config.clone();
    moved.application.data_sources = lists(20).application.data_sources;
    let rewired = node.app().rewire(&moved).await;
    assert!(rewired.changed.is_empty(), "{rewired:?}");
    assert!(
        rewired
            .restart
            .iter()
            .any(|r| r.starts_with("event.failover")),
        "{rewired:?}"
    );
    // The same lists: nothing to say.
    let rewired = node.app().rewire(&config).await;
    assert!(
        rewired.changed.is_empty() && rewired.restart.is_empty(),
        "{rewired:?}"
    );
    node.stop().await;
}
