//! History that outlives a web node: the broker keeps the recent messages (`broker.snapshot`,
//! a ROUTER) and web nodes fill their history from it (`event.snapshot`, a DEALER) when they
//! start, when their SUB socket reconnects, and when they notice they missed messages.
//! Real sockets throughout; where a broker must misbehave on purpose (skip a message), the
//! test plays the broker with real ZeroMQ sockets.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Sse, TestApp};
use temma::config::Role;
use temma::{App, Config};
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// A configuration with the snapshot sockets on port 0 (the broker binds, nodes follow).
fn snapshot_config() -> Config {
    let mut config = common::test_config();
    let sources = &mut config.application.data_sources;
    sources.insert(
        "zmq_broker_snapshot".into(),
        "zmq-bind://ROUTER@127.0.0.1:0".parse().unwrap(),
    );
    sources.insert(
        "zmq_client_snapshot".into(),
        "zmq://DEALER@127.0.0.1:0".parse().unwrap(),
    );
    config.broker.snapshot = Some("zmq_broker_snapshot".into());
    config.event.snapshot = Some("zmq_client_snapshot".into());
    config.validate().unwrap();
    config
}

/// A separate broker (as `temma broker` runs it), with its snapshot socket.
async fn start_broker(config: &Config) -> (App, CancellationToken) {
    let shutdown = CancellationToken::new();
    let broker = App::broker(config, shutdown.clone()).await.unwrap();
    (broker, shutdown)
}

fn address(app: &App, config: &Config, role: Role) -> String {
    app.addresses().listening(config.dsn(role))[0]
        .trim_start_matches("tcp://")
        .to_owned()
}

/// A web node on `broker`, with or without a snapshot socket.
async fn node(broker: &App, config: &Config, snapshot: bool) -> TestApp {
    let router = snapshot.then(|| address(broker, config, Role::BrokerSnapshot));
    node_asking(broker, config, router).await
}

/// A web node on `broker` whose snapshot socket (if any) connects to `router`.
async fn node_asking(broker: &App, config: &Config, router: Option<String>) -> TestApp {
    let pull = address(broker, config, Role::BrokerPull);
    let publish = address(broker, config, Role::BrokerPub);
    TestApp::start_with(move |config| {
        config.broker.embedded = false;
        let sources = &mut config.application.data_sources;
        sources.insert(
            "zmq_client_push".into(),
            format!("zmq://PUSH@{pull}").parse().unwrap(),
        );
        sources.insert(
            "zmq_client_sub".into(),
            format!("zmq://SUB@{publish}").parse().unwrap(),
        );
        if let Some(router) = router {
            sources.insert(
                "zmq_client_snapshot".into(),
                format!("zmq://DEALER@{router}").parse().unwrap(),
            );
            config.event.snapshot = Some("zmq_client_snapshot".into());
        }
    })
    .await
}

/// Reads `count` events after the opening, `msg` and `reset` alike.
async fn events(sse: &mut Sse, count: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while out.len() < count {
        let event = sse.next_but_presence().await.expect("stream open");
        match event.event.as_deref() {
            Some("msg") => out.push(("msg".into(), event.json()["text"].as_str().unwrap().into())),
            Some("reset") => out.push(("reset".into(), event.data.clone())),
            _ => {}
        }
    }
    out
}

fn msgs(texts: &[&str]) -> Vec<(String, String)> {
    texts
        .iter()
        .map(|text| ("msg".to_owned(), (*text).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_replays_what_its_browsers_missed() {
    let config = snapshot_config();
    let (broker, broker_stop) = start_broker(&config).await;
    let first = node(&broker, &config, true).await;
    first.ready().await;
    let other = node(&broker, &config, true).await;
    other.ready().await;
    // A browser on the first node sees m1..m3, then its node goes away (a deploy).
    let mut browser = first.sse().await;
    first.post_all(["m1", "m2", "m3"].map(String::from)).await;
    let seen = browser.messages(3).await;
    let last_id = seen[2].id.clone().unwrap();
    drop(browser);
    first.stop().await;
    // Meanwhile the chat goes on through the other node.
    other.post_all(["m4", "m5"].map(String::from)).await;
    // The node comes back empty, fills its history from the broker, and the browser's
    // reconnection with Last-Event-ID gets what it missed: no reset.
    let restarted = node(&broker, &config, true).await;
    let mut browser = Sse::connect(
        &restarted.client,
        &restarted.url("/event/fetch"),
        Some(&last_id),
    )
    .await;
    assert_eq!(events(&mut browser, 2).await, msgs(&["m4", "m5"]));
    // Then the live stream, in order.
    assert_eq!(restarted.post_form("a", "m6").await.status(), 200);
    assert_eq!(events(&mut browser, 1).await, msgs(&["m6"]));
    let metrics = restarted.app().metrics().render();
    assert!(
        metrics.contains("temma_snapshot_syncs_total{result=\"Complete\"} 1"),
        "{metrics}"
    );
    let served = broker.metrics().render();
    assert!(
        served.contains("temma_snapshots_served_total{result=\"Served\"}"),
        "{served}"
    );
    // The same restart without a snapshot socket: the history is gone, the browser is reset.
    let plain = node(&broker, &config, false).await;
    let mut browser = Sse::connect(&plain.client, &plain.url("/event/fetch"), Some(&last_id)).await;
    let first_event = events(&mut browser, 1).await;
    assert_eq!(first_event[0].0, "reset", "{first_event:?}");
    plain.stop().await;
    restarted.stop().await;
    other.stop().await;
    broker_stop.cancel();
    broker.wait().await;
}

/// The test plays a broker that skips a message on PUB (as a broker whose PUB dropped it for a
/// slow subscriber would) and answers snapshots on its ROUTER.
struct FakeBroker {
    publish: PubSocket,
    router: RouterSocket,
    frames: Vec<Bytes>,
}

const RUN: u64 = 1_700_000_000_000;

fn frame(seq: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"from":"b","text":"m{seq}","id":"{RUN}-{seq}","time":1}}"#
    ))
}

impl FakeBroker {
    async fn publish(&mut self, seq: u64, on_pub: bool) {
        self.frames.push(frame(seq));
        if on_pub {
            self.publish
                .send(ZmqMessage::from(frame(seq)))
                .await
                .unwrap();
        }
    }

    /// Answers one snapshot request with everything after the id asked for.
    async fn answer(&mut self) -> serde_json::Value {
        let request = self.router.recv().await.unwrap().into_vec();
        let asked: serde_json::Value = serde_json::from_slice(&request[1]).unwrap();
        // The node's newest id of this run, if it names one.
        let after = asked["after"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|id| id.as_str())
            .find(|id| id.starts_with(&format!("{RUN}-")))
            .map_or(0, |id| {
                id.split('-').nth(1).unwrap().parse::<u64>().unwrap()
            });
        let n = Bytes::from(asked["n"].to_string());
        let part = |kind: &'static str| {
            let mut message = ZmqMessage::from(request[0].clone());
            message.push_back(Bytes::from_static(kind.as_bytes()));
            message.push_back(n.clone());
            message
        };
        let found: Vec<Bytes> = self.frames[after as usize..].to_vec();
        let mut head = part("head");
        head.push_back(Bytes::from(format!(
            r#"{{"run":"{RUN}","covered":true,"held":{}}}"#,
            found.len()
        )));
        self.router.send(head).await.unwrap();
        if !found.is_empty() {
            let mut batch = part("batch");
            for frame in found {
                batch.push_back(frame);
            }
            self.router.send(batch).await.unwrap();
        }
        self.router.send(part("end")).await.unwrap();
        asked
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_missed_on_the_way_is_fetched_not_reset() {
    let mut publish = PubSocket::new();
    let pub_address = publish.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let mut router = RouterSocket::new();
    let router_address = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let mut broker = FakeBroker {
        publish,
        router,
        frames: Vec::new(),
    };
    let pull = common::free_port();
    let app = TestApp::start_with(|config| {
        config.broker.embedded = false;
        let sources = &mut config.application.data_sources;
        sources.insert(
            "zmq_client_push".into(),
            format!("zmq://PUSH@127.0.0.1:{pull}").parse().unwrap(),
        );
        sources.insert(
            "zmq_client_sub".into(),
            format!("zmq://SUB@{}", router_free(&pub_address))
                .parse()
                .unwrap(),
        );
        sources.insert(
            "zmq_client_snapshot".into(),
            format!("zmq://DEALER@{}", router_free(&router_address))
                .parse()
                .unwrap(),
        );
        config.event.snapshot = Some("zmq_client_snapshot".into());
    })
    .await;
    // The node subscribes, then asks for everything (it holds nothing yet).
    let asked = tokio::time::timeout(common::DEADLINE, broker.answer())
        .await
        .unwrap();
    assert_eq!(asked["after"], serde_json::json!([]));
    let mut browser = app.sse().await;
    // The subscription reaches PUB a little after the connection: publish until it shows.
    broker.publish(1, true).await;
    let mut texts = Vec::new();
    let mut seq = 1;
    while texts.is_empty() {
        if let Ok(Some(event)) = browser.next_within(Duration::from_millis(100)).await
            && event.event.as_deref() == Some("msg")
        {
            texts.push(event.json()["text"].as_str().unwrap().to_owned());
        } else {
            seq += 1;
            broker.publish(seq, true).await;
        }
    }
    // Before its first message a node has no newest id: nothing before it counts as missed.
    while let Ok(Some(event)) = browser.next_within(Duration::from_millis(200)).await {
        if event.event.as_deref() == Some("msg") {
            texts.push(event.json()["text"].as_str().unwrap().to_owned());
        }
    }
    let newest = seq;
    // Now one message is lost on the way: the next one shows the gap, the node asks for the
    // messages after its newest, and its clients get both in order, with no reset.
    broker.publish(newest + 1, false).await;
    broker.publish(newest + 2, true).await;
    let asked = tokio::time::timeout(common::DEADLINE, broker.answer())
        .await
        .unwrap();
    assert_eq!(
        asked["after"],
        serde_json::json!([format!("{RUN}-{newest}")])
    );
    let after = events(&mut browser, 2).await;
    assert_eq!(
        after,
        vec![
            ("msg".to_owned(), format!("m{}", newest + 1)),
            ("msg".to_owned(), format!("m{}", newest + 2)),
        ]
    );
    let metrics = app.app().metrics().render();
    // The start-up snapshot and the one that filled the gap.
    assert!(
        metrics.contains("temma_snapshot_syncs_total{result=\"Complete\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("TimedOut"), "{metrics}");
    app.stop().await;
}

fn router_free(address: &str) -> &str {
    address.trim_start_matches("tcp://")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_does_not_answer_delays_nothing_for_long() {
    // A node whose snapshot socket leads nowhere (a plain Temma broker, or none yet) serves
    // after the snapshot timeout, counts the fetch it gave up on, and messages flow as before.
    let config = snapshot_config();
    let (broker, broker_stop) = start_broker(&config).await;
    let nowhere = format!("127.0.0.1:{}", common::free_port());
    let app = node_asking(&broker, &config, Some(nowhere)).await;
    app.ready().await;
    let mut sse = app.sse().await;
    assert_eq!(app.post_form("a", "still here").await.status(), 200);
    assert_eq!(sse.next_message().await.json()["text"], "still here");
    common::eventually("the snapshot counted as timed out", || async {
        common::metric(&app, "temma_snapshot_syncs_total{result=\"TimedOut\"} ")
            .filter(|count| *count == 1.0)
    })
    .await;
    app.stop().await;
    broker_stop.cancel();
    broker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_snapshot_port_is_dropped_and_others_are_served() {
    let config = snapshot_config();
    let (broker, broker_stop) = start_broker(&config).await;
    let router = address(&broker, &config, Role::BrokerSnapshot);
    // Malformed requests, over ZeroMQ and as raw bytes.
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(&format!("tcp://{router}")).await.unwrap();
    for junk in [
        ZmqMessage::from("not json"),
        ZmqMessage::from(r#"{"after":["x-y"],"n":1}"#),
        ZmqMessage::from(r#"{"after":[],"n":1,"extra":true}"#),
        ZmqMessage::try_from(vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]).unwrap(),
    ] {
        dealer.send(junk).await.unwrap();
    }
    let raw = router.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        if let Ok(mut stream) = std::net::TcpStream::connect(raw) {
            let _ = stream.write_all(&[0xff; 4096]);
        }
    });
    // A huge request is refused by the frame limit, before it is read whole.
    let mut big = zeromq::DealerSocket::new();
    big.connect(&format!("tcp://{router}")).await.unwrap();
    let _ = big.send(ZmqMessage::from(vec![b'x'; 1 << 20])).await;
    // A real node is still served.
    let good = node(&broker, &config, true).await;
    good.ready().await;

    common::eventually("a served snapshot", || async {
        broker
            .metrics()
            .render()
            .contains("temma_snapshots_served_total{result=\"Served\"}")
            .then_some(())
    })
    .await;
    let metrics = broker.metrics().render();
    assert!(
        metrics.contains("temma_snapshots_served_total{result=\"Malformed\"} 4"),
        "{metrics}"
    );
    good.stop().await;
    broker_stop.cancel();
    broker.wait().await;
}

#[test]
fn check_shows_the_snapshot_wiring_and_refuses_a_snapshot_with_several_brokers() {
    let dir = common::TempDir::new("snapshot-check");
    let path = common::write_config(
        &dir.0,
        r#"[application.dataSources]
zmq_broker_snapshot = "zmq-bind://ROUTER@127.0.0.1:7100"
zmq_client_snapshot = "zmq://DEALER@127.0.0.1:7101"
[broker]
snapshot = "zmq_broker_snapshot"
[event]
snapshot = "zmq_client_snapshot"
"#,
    );
    let output = common::temma(&["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!("{stdout}{stderr}");
    assert!(output.status.success(), "{all}");
    assert!(
        all.contains("event.snapshot: zmq_client_snapshot = zmq://DEALER@127.0.0.1:7101"),
        "{all}"
    );
    assert!(
        all.contains("broker.snapshot: zmq_broker_snapshot = zmq-bind://ROUTER@127.0.0.1:7100"),
        "{all}"
    );
    // The node would ask a port nothing binds: said, with what would happen.
    assert!(
        all.contains("`event.snapshot` connects to `127.0.0.1:7101`"),
        "{all}"
    );
    assert!(
        all.contains("this node would go on without history from the broker"),
        "{all}"
    );
    // A snapshot follows one broker: a SUB with two endpoints is refused, named.
    let error = Config::from_toml(
        r#"[application.dataSources]
zmq_client_sub = "zmq://SUB@10.0.0.1:6000;10.0.0.2:6000"
zmq_client_snapshot = "zmq://DEALER@10.0.0.1:7000"
[broker]
embedded = false
[event]
snapshot = "zmq_client_snapshot"
"#,
        &common::manifest_dir().join("etc/test.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("`event.snapshot`: needs `event.sub` to connect to one broker"),
        "{error}"
    );
    // A snapshot data source of the wrong type is named too.
    let error = Config::from_toml(
        r#"[application.dataSources]
zmq_client_snapshot = "zmq://SUB@127.0.0.1:7000"
[event]
snapshot = "zmq_client_snapshot"
"#,
        &common::manifest_dir().join("etc/test.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains(
            "is a SUB socket (`zmq://SUB@127.0.0.1:7000`), but this role needs a DEALER socket"
        ),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_broker_no_longer_holds_is_a_reset_not_a_silent_gap() {
    let mut config = snapshot_config();
    config.broker.history_size = 2;
    config.validate().unwrap();
    let (broker, broker_stop) = start_broker(&config).await;
    let first = node(&broker, &config, true).await;
    first.ready().await;
    let other = node(&broker, &config, true).await;
    other.ready().await;
    let mut browser = first.sse().await;
    first.post_all(["m1", "m2"].map(String::from)).await;
    let last_id = browser.messages(2).await[1].id.clone().unwrap();
    drop(browser);
    first.stop().await;
    // Five more while the node is away: the broker keeps only the last two.
    other
        .post_all(["m3", "m4", "m5", "m6", "m7"].map(String::from))
        .await;
    let restarted = node(&broker, &config, true).await;
    let mut browser = Sse::connect(
        &restarted.client,
        &restarted.url("/event/fetch"),
        Some(&last_id),
    )
    .await;
    // Not m6 and m7 as if nothing were missing: a reset first, then what is held.
    let seen = events(&mut browser, 1).await;
    assert_eq!(seen[0].0, "reset", "{seen:?}");
    let metrics = restarted.app().metrics().render();
    // The node's own sync says the broker no longer held everything.
    assert!(
        metrics.contains("temma_snapshot_syncs_total{result=\"Partial\"} 1"),
        "{metrics}"
    );
    restarted.stop().await;
    other.stop().await;
    broker_stop.cancel();
    broker.wait().await;
}

/// How many requests the broker's snapshot socket dropped as malformed so far.
fn malformed(broker: &App) -> usize {
    snapshots(broker, "Malformed")
}

/// How many snapshot requests the broker counted with this `result` so far.
fn snapshots(broker: &App, result: &str) -> usize {
    let line = format!("temma_snapshots_served_total{{result=\"{result}\"}} ");
    common::metric_in(&broker.metrics().render(), &line).map_or(0, |count| count as usize)
}

/// A PUSH socket connected to the broker's PULL socket.
async fn pushing_to(broker: &App, config: &Config) -> zeromq::PushSocket {
    let pull = format!("tcp://{}", address(broker, config, Role::BrokerPull));
    let mut push = zeromq::PushSocket::new();
    push.connect(&pull).await.unwrap();
    push
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_flood_on_the_snapshot_port_does_not_stall_the_broker() {
    // A peer that writes requests faster than the broker reads them (as fast as the kernel
    // takes them) keeps the snapshot socket always ready: on one thread (a one-CPU machine),
    // the task answering it must still let the broker relay messages meanwhile.
    use std::io::Write;
    const FLOOD: usize = 200_000;
    let config = snapshot_config();
    let (broker, broker_stop) = start_broker(&config).await;
    let router = address(&broker, &config, Role::BrokerSnapshot);
    let publish = format!("tcp://{}", address(&broker, &config, Role::BrokerPub));
    let mut push = pushing_to(&broker, &config).await;
    let mut sub = zeromq::SubSocket::new();
    sub.subscribe("").await.unwrap();
    sub.connect(&publish).await.unwrap();
    let probe = |text: &str| ZmqMessage::from(format!(r#"{{"from":"probe","text":"{text}"}}"#));
    let mut probe_comes_back = async |push: &mut zeromq::PushSocket, text: &str| loop {
        push.send(probe(text)).await.unwrap();
        if let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await
        {
            let frame = message.iter().last().unwrap();
            let value: serde_json::Value = serde_json::from_slice(frame).unwrap();
            if value["text"] == text {
                return;
            }
        }
    };
    probe_comes_back(&mut push, "before").await;

    let mut stream = std::net::TcpStream::connect(&router).unwrap();
    stream.write_all(&common::zmtp::greeting()).unwrap();
    stream.write_all(&common::zmtp::ready("DEALER")).unwrap();
    let flood: Vec<u8> = (0..FLOOD).flat_map(|_| common::zmtp::frame(b"x")).collect();
    let writer = std::thread::spawn(move || {
        stream.write_all(&flood).unwrap();
        stream
    });
    while malformed(&broker) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The broker relays a message while the flood is still being read.
    push.send(probe("during")).await.unwrap();
    let message = tokio::time::timeout(common::DEADLINE, sub.recv())
        .await
        .expect("the broker publishes during the flood")
        .unwrap();
    let read = malformed(&broker);
    assert!(
        read < FLOOD,
        "the message came only after the whole flood was read ({read} requests)"
    );
    let frame = message.iter().last().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(frame).unwrap()["text"],
        "during"
    );
    // The connection stays open until the broker has read it all: closing a socket with
    // unread bytes (the broker's greeting, never read here) resets it, and the kernel then
    // drops what it still held unsent, which would cut the flood short.
    let stream = writer.join().unwrap();
    // Every request of the flood was read and counted, none answered.
    common::eventually("the whole flood read", || async {
        (malformed(&broker) == FLOOD).then_some(())
    })
    .await;
    drop(stream);
    broker_stop.cancel();
    broker.wait().await;
}

#[tokio::test]
async fn a_peer_that_asks_and_never_reads_gets_a_bounded_queue_of_answers() {
    // Each answer the broker cannot send is kept until the peer reads it: the zeromq crate
    // queued 100,000 messages per peer, so 30,000 requests of 20 bytes from one peer that read
    // nothing made the broker hold 1 GB. Now a few answers wait for it (`snapshot::SEND_QUEUE`
    // messages, the socket buffers), the answer that does not fit waits and times out, and
    // that is all it holds; the peer's other requests, meanwhile and after, are refused without
    // being answered.
    const REQUESTS: usize = 2_000;
    let (broker, broker_stop, router) = broker_with_history().await;

    let stream = silent_asker(&router, REQUESTS);
    // The answers it does not read fill its queue and its socket: one times out.
    common::eventually("an answer the peer did not take in time", || async {
        (snapshots(&broker, "Failed") > 0).then_some(())
    })
    .await;
    let served = snapshots(&broker, "Served");
    assert!(
        served < REQUESTS / 4,
        "{served} of {REQUESTS} answers were queued for a peer that reads nothing"
    );
    // Every request is accounted for: served, refused, or the one that timed out…
    common::eventually("the peer's requests all accounted for", || async {
        (answered(&broker, &["Served", "Failed", "Refused"]) == REQUESTS).then_some(())
    })
    .await;
    assert_eq!(snapshots(&broker, "Failed"), 1);
    // …and a web node that reads gets its whole snapshot.
    assert_eq!(frames_of_a_snapshot(&router, 1).await, 200);
    drop(stream);
    broker_stop.cancel();
    broker.wait().await;
}

/// A broker (the snapshot configuration) holding 200 messages of about 1 KB in its history,
/// waited for; its stop token and its snapshot socket's address.
async fn broker_with_history() -> (App, CancellationToken, String) {
    let config = snapshot_config();
    let (broker, broker_stop) = start_broker(&config).await;
    let router = address(&broker, &config, Role::BrokerSnapshot);
    let mut push = pushing_to(&broker, &config).await;
    let text = "x".repeat(1000);
    for i in 0..200 {
        let frame = format!(r#"{{"from":"a","text":"{i} {text}"}}"#);
        push.send(ZmqMessage::from(frame)).await.unwrap();
    }
    common::eventually("the history kept", || async {
        let held = broker.metrics().render();
        held.lines()
            .any(|line| line.starts_with("temma_broker_published_total 200"))
            .then_some(())
    })
    .await;
    (broker, broker_stop, router)
}

/// A raw ZMTP peer (a DEALER) on the snapshot socket `router` that writes `requests` snapshot
/// requests and reads nothing (with a small receive buffer: what it does not take stays queued
/// in the broker soon).
fn silent_asker(router: &str, requests: usize) -> std::net::TcpStream {
    use std::io::Write;
    let address: std::net::SocketAddr = router.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&address.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    let mut bytes = common::zmtp::greeting();
    bytes.extend(common::zmtp::ready("DEALER"));
    for n in 0..requests {
        bytes.extend(common::zmtp::frame(
            format!(r#"{{"after":[],"n":{n}}}"#).as_bytes(),
        ));
    }
    stream.write_all(&bytes).unwrap();
    stream
}

#[tokio::test]
async fn past_the_answers_allowed_on_their_way_a_request_is_refused() {
    // 64 peers that read nothing each hold an answer on its way: a 65th request is refused,
    // not answered, until those time out; then a node is served again.
    let (broker, broker_stop, router) = broker_with_history().await;
    const PEERS: usize = 64;
    const REQUESTS: usize = 50;
    let stuck: Vec<std::net::TcpStream> = (0..PEERS)
        .map(|_| silent_asker(&router, REQUESTS))
        .collect();
    // Every request is counted but the one answer per peer still on its way.
    common::eventually("an answer on its way to each peer", || async {
        (answered(&broker, &["Served", "Refused"]) == PEERS * (REQUESTS - 1)).then_some(())
    })
    .await;
    let (served, refused) = (snapshots(&broker, "Served"), snapshots(&broker, "Refused"));
    let late = silent_asker(&router, 1);
    common::eventually("the 65th request counted", || async {
        (snapshots(&broker, "Refused") == refused + 1).then_some(())
    })
    .await;
    assert_eq!(
        snapshots(&broker, "Served"),
        served,
        "the 65th was answered"
    );
    assert_eq!(snapshots(&broker, "Failed"), 0);
    // Once they time out, a node that reads gets its whole snapshot.
    common::eventually("the stuck answers timed out", || async {
        (snapshots(&broker, "Failed") == PEERS).then_some(())
    })
    .await;
    assert_eq!(frames_of_a_snapshot(&router, 1).await, 200);
    drop((stuck, late));
    broker_stop.cancel();
    broker.wait().await;
}

/// The broker's snapshot requests counted under any of `results`.
fn answered(broker: &App, results: &[&str]) -> usize {
    results.iter().map(|result| snapshots(broker, result)).sum()
}

/// Asks the snapshot socket `router` for everything from a new DEALER: how many published
/// frames the whole answer held.
async fn frames_of_a_snapshot(router: &str, n: u64) -> usize {
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(&format!("tcp://{router}")).await.unwrap();
    dealer
        .send(ZmqMessage::from(format!(r#"{{"after":[],"n":{n}}}"#)))
        .await
        .unwrap();
    frames_of_one_answer(&mut dealer).await
}

/// Reads one whole snapshot answer: how many published frames its batches held.
async fn frames_of_one_answer(dealer: &mut zeromq::DealerSocket) -> usize {
    let mut frames = 0;
    loop {
        let reply = tokio::time::timeout(common::DEADLINE, dealer.recv())
            .await
            .expect("the snapshot answered")
            .unwrap();
        match reply.get(0).unwrap().as_ref() {
            b"batch" => frames += reply.len() - 2,
            b"end" => return frames,
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_peer_that_does_not_read_its_answer_holds_up_no_other_node() {
    // The broker answered one request at a time: while a peer that asked and read nothing
    // held the socket (5 s, until its answer timed out), every other node's snapshot waited.
    // Answers now go side by side, each as fast as its node reads (zeromq patch 8,
    // `try_send`): other nodes are served while the stuck answer is still on its way, before
    // it times out (`Failed`).
    let (broker, broker_stop, router) = broker_with_history().await;
    // Two peers that ask again and again and read nothing, until their queues are full and an
    // answer to each waits.
    let stuck: Vec<std::net::TcpStream> = (0..2).map(|_| silent_asker(&router, 2_000)).collect();
    common::eventually("the stuck peers' requests read", || async {
        (answered(&broker, &["Served", "Refused", "Failed"]) >= 4_000 - 2).then_some(())
    })
    .await;
    // Nodes that read get their whole snapshots while both stuck answers are still waiting.
    for n in 0..3 {
        assert_eq!(frames_of_a_snapshot(&router, n).await, 200);
    }
    assert_eq!(
        snapshots(&broker, "Failed"),
        0,
        "the other nodes waited for a stuck answer to time out"
    );
    // Then each stuck answer times out, once per peer.
    common::eventually("the stuck answers timed out", || async {
        (snapshots(&broker, "Failed") == 2).then_some(())
    })
    .await;
    drop(stuck);
    broker_stop.cancel();
    broker.wait().await;
}
