//! Rewiring without a restart: on SIGHUP a web node reads its configuration again and moves its
//! ZeroMQ connections (`message.push`, `event.sub`, `event.snapshot`) to where it now says,
//! without closing an SSE client or losing a message that got a `200`; an invalid file is
//! refused with `temma check`'s words and the running configuration stays.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::TestApp;
use temma::config::Role;
use temma::{App, Config};
use tokio_util::sync::CancellationToken;

/// A separate broker on ports the system picks, with a snapshot socket.
async fn broker() -> (App, Config, CancellationToken) {
    let mut config = common::test_config();
    config.application.data_sources.insert(
        "zmq_broker_snapshot".into(),
        "zmq-bind://ROUTER@127.0.0.1:0".parse().unwrap(),
    );
    config.broker.snapshot = Some("zmq_broker_snapshot".into());
    config.validate().unwrap();
    let shutdown = CancellationToken::new();
    let app = App::broker(&config, shutdown.clone()).await.unwrap();
    (app, config, shutdown)
}

fn address(app: &App, config: &Config, role: Role) -> String {
    app.addresses().listening(config.dsn(role))[0]
        .trim_start_matches("tcp://")
        .to_owned()
}

/// A web node's configuration: PUSH to `push`, SUB to every broker of `subs`, and a snapshot
/// socket to `snapshot`'s broker when given.
fn wired(
    push: (&App, &Config),
    subs: &[(&App, &Config)],
    snapshot: Option<(&App, &Config)>,
) -> Config {
    let mut config = common::test_config();
    config.broker.embedded = false;
    let sources = &mut config.application.data_sources;
    sources.insert(
        "zmq_client_push".into(),
        format!("zmq://PUSH@{}", address(push.0, push.1, Role::BrokerPull))
            .parse()
            .unwrap(),
    );
    let subs: Vec<String> = subs
        .iter()
        .map(|(app, config)| address(app, config, Role::BrokerPub))
        .collect();
    sources.insert(
        "zmq_client_sub".into(),
        format!("zmq://SUB@{}", subs.join(";")).parse().unwrap(),
    );
    if let Some((app, broker)) = snapshot {
        sources.insert(
            "zmq_client_snapshot".into(),
            format!(
                "zmq://DEALER@{}",
                address(app, broker, Role::BrokerSnapshot)
            )
            .parse()
            .unwrap(),
        );
        config.event.snapshot = Some("zmq_client_snapshot".into());
    }
    config.validate().unwrap();
    config
}

/// Posts a numbered message every 20 ms until stopped; the texts that got a 200.
fn poster(app: &TestApp, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<String>> {
    let client = app.client.clone();
    let url = app.url("/message/broadcast");
    tokio::spawn(async move {
        let mut ok = Vec::new();
        let mut i = 0;
        while !stop.is_cancelled() {
            i += 1;
            let text = format!("r{i}");
            let answer = client
                .post(&url)
                .form(&[("from", "poster"), ("text", text.as_str())])
                .send()
                .await
                .unwrap();
            if answer.status() == 200 {
                ok.push(text);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ok
    })
}

/// Reads one SSE stream until `stop`: the texts, in order; fails if the stream ends.
fn reader(app: &TestApp, stop: CancellationToken) -> tokio::task::JoinHandle<Vec<String>> {
    let client = app.client.clone();
    let url = app.url("/event/fetch");
    tokio::spawn(async move {
        let mut texts = Vec::new();
        let mut sse = common::Sse::connect(&client, &url, None).await;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                event = sse.next() => {
                    let event = event.expect("the SSE stream stayed open through the rewiring");
                    match event.event.as_deref() {
                        Some("msg") => texts.push(event.json()["text"].as_str().unwrap().to_owned()),
                        Some("reset") => panic!("a reset: {}", event.data),
                        _ => {}
                    }
                }
            }
        }
        texts
    })
}

async fn check(posted: Vec<String>, seen: Vec<String>) {
    assert!(posted.len() > 20, "{} posts got a 200", posted.len());
    let mut once = HashSet::new();
    for text in &seen {
        assert!(once.insert(text), "{text} seen twice");
    }
    for text in &posted {
        assert!(
            once.contains(text),
            "{text} got a 200 and was never seen; seen: {seen:?}; posted: {posted:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_moves_to_another_broker_without_closing_a_stream() {
    let (first, first_config, first_stop) = broker().await;
    let (second, second_config, second_stop) = broker().await;
    let a = (&first, &first_config);
    let b = (&second, &second_config);
    let node = TestApp::start_config(&wired(a, &[a], None)).await;
    node.ready().await;
    let stop = CancellationToken::new();
    let stop_reading = CancellationToken::new();
    let reading = reader(&node, stop_reading.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let posting = poster(&node, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An added broker endpoint: SUB from both, PUSH to the new one.
    let rewired = node.app().rewire(&wired(b, &[a, b], None)).await;
    assert_eq!(rewired.changed.len(), 2, "{rewired:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The old one removed.
    let rewired = node.app().rewire(&wired(b, &[b], None)).await;
    assert_eq!(rewired.changed.len(), 1, "{rewired:?}");
    assert!(rewired.changed[0].starts_with("event.sub"), "{rewired:?}");
    // What the first broker was still given before the move may still be on its way through
    // it (on a busy machine, past 300 ms): its count once it holds still.
    let published_by_first = {
        let start = std::time::Instant::now();
        let mut last = first.metrics().broker_published.get();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = first.metrics().broker_published.get();
            if now == last {
                break now;
            }
            assert!(
                start.elapsed() < common::DEADLINE,
                "the first broker never settles"
            );
            last = now;
        }
    };
    // Posting goes on through the second broker: at least ten of them (however slow the
    // machine), then it stops.
    common::eventually("the second broker published ten", || async {
        (second.metrics().broker_published.get() > 10).then_some(())
    })
    .await;
    stop.cancel();
    let posted = posting.await.unwrap();
    // Let the last ones arrive, then compare.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_reading.cancel();
    let seen = reading.await.unwrap();
    check(posted, seen).await;
    // Everything after the move went through the second broker.
    assert_eq!(first.metrics().broker_published.get(), published_by_first);
    // The same configuration again: nothing moves.
    let rewired = node.app().rewire(&wired(b, &[b], None)).await;
    assert!(rewired.changed.is_empty(), "{rewired:?}");
    node.stop().await;
    for (app, stop) in [(first, first_stop), (second, second_stop)] {
        stop.cancel();
        app.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_snapshots_the_move_fills_what_the_switch_missed() {
    let (first, first_config, first_stop) = broker().await;
    let (second, second_config, second_stop) = broker().await;
    let a = (&first, &first_config);
    let b = (&second, &second_config);
    let node = TestApp::start_config(&wired(a, &[a], Some(a))).await;
    node.ready().await;
    let stop = CancellationToken::new();
    let stop_reading = CancellationToken::new();
    let reading = reader(&node, stop_reading.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let posting = poster(&node, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rewired = node.app().rewire(&wired(b, &[b], Some(b))).await;
    assert_eq!(rewired.changed.len(), 3, "{rewired:?}");
    assert!(rewired.restart.is_empty(), "{rewired:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let posted = posting.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_reading.cancel();
    let seen = reading.await.unwrap();
    check(posted, seen).await;
    node.stop().await;
    for (app, stop) in [(first, first_stop), (second, second_stop)] {
        stop.cancel();
        app.wait().await;
    }
}

/// Without snapshots, a node moved to a broker that already published messages of its run
/// cannot get those: its clients are told (`event: reset`), and what follows is delivered. Never
/// a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_snapshots_joining_a_run_mid_way_is_a_reset_not_a_silent_gap() {
    use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};
    let (first, first_config, first_stop) = broker().await;
    let (second, second_config, second_stop) = broker().await;
    let a = (&first, &first_config);
    let b = (&second, &second_config);
    // The second broker's run is three messages in before the node joins it.
    let mut push = PushSocket::new();
    push.connect(&format!(
        "tcp://{}",
        address(&second, &second_config, Role::BrokerPull)
    ))
    .await
    .unwrap();
    for i in 0..3 {
        let frame = format!(r#"{{"from":"elsewhere","text":"before {i}"}}"#);
        push.send(ZmqMessage::from(frame)).await.unwrap();
    }
    common::eventually("the second broker published three", || async {
        (second.metrics().broker_published.get() >= 3).then_some(())
    })
    .await;
    let node = TestApp::start_config(&wired(a, &[a], None)).await;
    node.ready().await;
    let mut sse = node.sse().await;
    assert_eq!(node.post_form("me", "on the first").await.status(), 200);
    assert_eq!(sse.next_message().await.json()["text"], "on the first");
    let rewired = node.app().rewire(&wired(b, &[b], None)).await;
    assert_eq!(rewired.changed.len(), 2, "{rewired:?}");
    // The first post through the second broker is its fourth message: the node never had
    // 1 to 3.
    common::eventually("a post through the second broker", || async {
        let response = node.post_form("me", "on the second").await;
        (response.status() == 200).then_some(())
    })
    .await;
    let mut reset = None;
    let message = loop {
        let event = sse
            .next_but_presence()
            .await
            .expect("the stream stays open");
        match event.event.as_deref() {
            Some("reset") => reset = Some(event.data.clone()),
            Some("msg") => break event,
            _ => {}
        }
    };
    assert!(reset.is_some(), "no reset before {:?}", message.data);
    assert_eq!(message.json()["text"], "on the second");
    assert!(
        message.id.as_deref().is_some_and(|id| !id.ends_with("-1")),
        "{:?}",
        message.id
    );
    node.stop().await;
    for (app, stop) in [(first, first_stop), (second, second_stop)] {
        stop.cancel();
        app.wait().await;
    }
}

#[test]
fn sighup_with_an_invalid_file_keeps_the_running_configuration() {
    let dir = common::TempDir::new("rewire-invalid");
    let (path, http) = common::ports_config(&dir, true);
    let mut app = common::spawn(&["serve", "-c", path.to_str().unwrap()]);
    app.wait_for_log("listening on http://");
    let good = std::fs::read_to_string(&path).unwrap();
    let bad = good.replace("initial_history = 0", "initial_history = 0\nqueue = 0")
        + "[message]\npush = \"nowhere\"\n";
    std::fs::write(&path, bad).unwrap();
    app.signal("HUP");
    // The same words as `temma check`, each problem with its key.
    app.wait_for_log("`message.push`: data source `nowhere` is not defined");
    app.wait_for_log("`event.queue`: is 0: must be at least 1");
    app.wait_for_log("the running configuration stays");
    // Still serving, still wired.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        common::eventually("a POST answered 200 after the bad SIGHUP", || async {
            let answer = client
                .post(format!("http://127.0.0.1:{http}/message/broadcast"))
                .form(&[("from", "a"), ("text", "still here")])
                .send()
                .await
                .ok()?;
            (answer.status() == 200).then_some(())
        })
        .await;
    });
    // A valid file that changes the HTTP address: said to take a restart.
    std::fs::write(
        &path,
        good.replace(&format!("127.0.0.1:{http}"), "127.0.0.1:1"),
    )
    .unwrap();
    app.signal("HUP");
    app.wait_for_log("take effect at the next start: server.listen");
    app.signal("TERM");
    assert!(app.wait_exit(Duration::from_secs(10)).success());
}
