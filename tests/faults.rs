//! Nothing lost, nothing stuck: bad input, replay, garbage on the broker's port, connection
//! limits and metrics (slow consumers: `slow_consumer.rs`) — each over real sockets against a running app.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Sse, TestApp};
use serde_json::Value;
use temma::config::Role;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = response.json().await.expect("JSON error body");
    (
        status,
        body["error"].as_str().expect("an error message").to_owned(),
    )
}

/// Checks that a good message still goes through after each bad one.
async fn still_works(app: &TestApp, sse: &mut Sse, text: &str) {
    assert_eq!(app.post_form("check", text).await.status(), 200);
    assert_eq!(sse.next_message().await.json()["text"], text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_a_clear_error_and_affects_nothing_else() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    let form = "application/x-www-form-urlencoded";
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "from too long",
            form,
            format!("from={}&text=x", "a".repeat(65)).into_bytes(),
            400,
            "`from` is too long: 65 of 64 characters",
        ),
        (
            "text too long",
            form,
            format!("from=a&text={}", "é".repeat(2001)).into_bytes(),
            400,
            "`text` is too long: 2001 of 2000 characters",
        ),
        (
            "body too large",
            form,
            format!("from=a&text={}", "x".repeat(20_000)).into_bytes(),
            413,
            "larger than 16384 bytes",
        ),
        (
            "invalid UTF-8 in a form",
            form,
            b"from=a&text=%FF%FE".to_vec(),
            400,
            "field `text` is not valid UTF-8",
        ),
        (
            "invalid UTF-8 in JSON",
            "application/json",
            b"{\"from\":\"a\",\"text\":\"\xff\"}".to_vec(),
            400,
            "not valid JSON",
        ),
        (
            "unsupported content type",
            "text/plain",
            b"from=a&text=b".to_vec(),
            415,
            "unsupported content type `text/plain`",
        ),
        (
            "a field twice",
            form,
            b"from=a&text=b&text=c".to_vec(),
            400,
            "field `text` is given more than once",
        ),
        (
            "a field twice in JSON",
            "application/json",
            br#"{"from":"a","text":"b","text":"c"}"#.to_vec(),
            400,
            "field `text` is given more than once",
        ),
        (
            "a field as an array",
            form,
            b"from=a&text[]=b".to_vec(),
            400,
            "field `text[]` is an array",
        ),
        (
            "a JSON array field",
            "application/json",
            br#"{"from":"a","text":["b"]}"#.to_vec(),
            400,
            "field `text` must be a string, not an array",
        ),
        (
            "JSON that is not an object",
            "application/json",
            br#"["a","b"]"#.to_vec(),
            400,
            "must be an object",
        ),
        (
            "JSON null",
            "application/json",
            b"null".to_vec(),
            400,
            "must be an object",
        ),
        (
            "broken JSON",
            "application/json",
            br#"{"from":"a","text":"#.to_vec(),
            400,
            "not valid JSON",
        ),
        (
            "NUL in the text",
            form,
            b"from=a&text=x%00y".to_vec(),
            400,
            "control character U+0000",
        ),
        (
            "LF in the name",
            form,
            b"from=a%0Ab&text=x".to_vec(),
            400,
            "`from` contains the control character U+000A",
        ),
        (
            "CR in the name",
            form,
            b"from=a%0Db&text=x".to_vec(),
            400,
            "`from` contains the control character U+000D",
        ),
        (
            "an unknown field",
            form,
            b"from=a&text=b&colour=red".to_vec(),
            400,
            "unknown field `colour`",
        ),
    ];
    for (what, content_type, body, status, needle) in cases {
        let (got, message) = error_of(app.post_raw(content_type, body).await).await;
        assert_eq!(got, status, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
        still_works(&app, &mut sse, &format!("after {what}")).await;
    }
    // No content type at all.
    let response = app
        .client
        .post(app.url("/message/broadcast"))
        .body("from=a&text=b")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await.0, 415);
    // A multi-line text is fine, with CR LF made LF; the SSE data stays one line.
    assert_eq!(app.post_form("a", "one\r\ntwo").await.status(), 200);
    let event = sse.next_message().await;
    assert_eq!(event.json()["text"], "one\ntwo");
    assert!(!event.data.contains('\n'));
    app.stop().await;
}

#[tokio::test]
async fn sse_connections_beyond_the_maximum_get_503() {
    let app = TestApp::start_with(|config| config.event.max_clients = 3).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let sse = app.sse().await;
        assert_eq!(sse.status, 200);
        open.push(sse);
    }
    let refused = app
        .client
        .get(app.url("/event/fetch"))
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(refused).await;
    assert_eq!(status, 503);
    assert!(message.contains("at most 3"), "{message}");
    let metrics = app.app().metrics().render();
    assert!(metrics.contains("temma_sse_refused_total 1"), "{metrics}");
    // A place frees up when a client leaves.
    drop(open.pop());
    common::eventually("a freed place", || async {
        let response = app.client.get(app.url("/event/fetch")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    app.stop().await;
}

/// A PUSH socket straight into the broker's PULL port.
async fn broker_push(app: &TestApp, config: &temma::Config) -> PushSocket {
    let address = app
        .app()
        .addresses()
        .listening(config.dsn(Role::BrokerPull))[0]
        .clone();
    let mut push = PushSocket::new();
    push.connect(&address).await.unwrap();
    push
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_broker_port_is_counted_and_dropped() {
    let config = common::test_config();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let mut sse = app.sse().await;
    let mut push = broker_push(&app, &config).await;
    let garbage: Vec<ZmqMessage> = vec![
        ZmqMessage::from("not json"),
        ZmqMessage::from("[1,2,3]"),
        ZmqMessage::from("null"),
        ZmqMessage::try_from(vec![
            bytes::Bytes::from_static(b"{\"from\":\"a\""),
            bytes::Bytes::from_static(b",\"text\":\"b\"}"),
        ])
        .unwrap(),
        ZmqMessage::from(vec![0xff, 0xfe, 0x00]),
        // A JSON object but not UTF-8, in a value the broker's scan does not read.
        ZmqMessage::from(b"{\"from\":\"a\",\"text\":\"b\xff\"}".to_vec()),
    ];
    for message in garbage {
        push.send(message).await.unwrap();
    }
    // Raw bytes that are not even ZMTP, on the same port.
    let address = app
        .app()
        .addresses()
        .listening(config.dsn(Role::BrokerPull))[0]
        .clone();
    let tcp = address.trim_start_matches("tcp://").to_owned();
    std::thread::spawn(move || {
        if let Ok(mut stream) = std::net::TcpStream::connect(tcp) {
            let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage");
            let _ = stream.read(&mut [0u8; 64]);
        }
    });
    // The broker lives: a good message sent after all that arrives.
    push.send(ZmqMessage::from(r#"{"from":"zmq","text":"after garbage"}"#))
        .await
        .unwrap();
    let event = sse.next_message().await;
    assert_eq!(
        event.json()["text"],
        "after garbage",
        "nothing published in between"
    );
    still_works(&app, &mut sse, "web still fine").await;
    let metrics = app.app().metrics().clone();
    use temma::metrics::DropReason::*;
    assert_eq!(metrics.drops(InvalidJson), 3);
    assert_eq!(metrics.drops(NotAnObject), 2);
    assert_eq!(metrics.drops(Multipart), 1);
    // A frame over `broker.max_frame_bytes` disconnects its sender before it is read whole
    // (tests/front_door.rs); it never reaches the stamper.
    assert_eq!(metrics.drops(Oversize), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_a_disconnect_has_no_gap_and_no_duplicate() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    app.post_all((0..5).map(|i| format!("before {i}"))).await;
    let seen = sse.messages(5).await;
    let last_id = seen[4].id.clone().unwrap();
    drop(sse);
    // Missed while away.
    app.post_all((0..7).map(|i| format!("missed {i}"))).await;
    let mut back = Sse::connect(&app.client, &app.url("/event/fetch"), Some(&last_id)).await;
    let posting = app.post_in_background((0..5).map(|i| format!("live {i}")).collect());
    let texts = back.texts(12).await;
    posting.await.unwrap();
    let expected: Vec<String> = (0..7)
        .map(|i| format!("missed {i}"))
        .chain((0..5).map(|i| format!("live {i}")))
        .collect();
    assert_eq!(texts, expected);
    // Nothing more: no duplicate (a keep-alive is the only thing that may follow).
    match back.next_within(Duration::from_millis(300)).await {
        Err(()) => {}
        Ok(Some(event)) => assert_ne!(event.event.as_deref(), Some("msg"), "{event:?}"),
        Ok(None) => panic!("the stream ended"),
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_through_the_query_parameter_and_for_new_clients() {
    let app = TestApp::start_with(|config| config.event.initial_history = 3).await;
    app.ready().await;
    let mut sse = app.sse().await;
    app.post_all((0..6).map(|i| format!("m{i}"))).await;
    let seen = sse.messages(7).await; // the warm-up, then m0..m5 (initial history)
    let id_of_m2 = seen
        .iter()
        .find(|e| e.json()["text"] == "m2")
        .unwrap()
        .id
        .clone()
        .unwrap();
    // `?lastEventId=` for a first connection, which cannot set the header.
    let url = app.url(&format!("/event/fetch?lastEventId={id_of_m2}"));
    let mut resumed = Sse::connect(&app.client, &url, None).await;
    assert_eq!(resumed.texts(3).await, ["m3", "m4", "m5"]);
    // A newcomer gets the last three for context.
    let mut newcomer = app.sse().await;
    assert_eq!(newcomer.texts(3).await, ["m3", "m4", "m5"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_older_than_the_history_gets_a_reset() {
    let app = TestApp::start_with(|config| {
        config.event.history_size = 3;
        config.event.initial_history = 2;
    })
    .await;
    app.ready().await;
    let mut sse = app.sse().await;
    app.post_all((0..6).map(|i| format!("m{i}"))).await;
    let seen = sse.messages(7).await;
    let old_id = seen[1].id.clone().unwrap(); // m0: evicted from a history of 3
    for last in [old_id.as_str(), "garbage", "1-1"] {
        let mut back = Sse::connect(&app.client, &app.url("/event/fetch"), Some(last)).await;
        let opening = back.next().await.unwrap();
        assert!(opening.retry.is_some());
        let reset = back.next().await.unwrap();
        assert_eq!(reset.event.as_deref(), Some("reset"), "{last}");
        assert_eq!(reset.json()["lastEventId"], last);
        assert!(
            reset.id.is_none(),
            "a reset does not move the client's last id"
        );
        // Then the newest messages for context.
        assert_eq!(back.texts(2).await, ["m4", "m5"]);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_works_across_web_nodes() {
    // One broker, two web nodes: a browser that reconnects to the other node resumes there.
    let node_a = TestApp::start().await;
    let node_b = common::second_node(&node_a).await;
    node_a.ready().await;
    node_b.ready().await;

    let mut on_a = node_a.sse().await;
    let mut on_b = node_b.sse().await;
    assert_eq!(node_a.post_form("a", "first").await.status(), 200);
    // A warm-up published by the other node may still be on its way to either stream.
    async fn next_first(sse: &mut Sse) -> common::Event {
        loop {
            let event = sse.next_message().await;
            if event.json()["text"] == "first" {
                return event;
            }
        }
    }
    let first = next_first(&mut on_a).await;
    assert_eq!(
        next_first(&mut on_b).await.id,
        first.id,
        "same id on both nodes"
    );
    drop(on_a);
    for text in ["second", "third"] {
        assert_eq!(node_b.post_form("b", text).await.status(), 200);
    }
    let mut moved = Sse::connect(
        &node_b.client,
        &node_b.url("/event/fetch"),
        first.id.as_deref(),
    )
    .await;
    assert_eq!(moved.texts(2).await, ["second", "third"]);
    node_b.stop().await;
    node_a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_when_messages_flow() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    app.post_all((0..3).map(|i| format!("m{i}"))).await;
    sse.messages(3).await;
    assert_eq!(app.post_form("", "x").await.status(), 400);
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert!(value("temma_broker_published_total") >= 4.0);
    assert!(value("temma_messages_received_total") >= 4.0);
    assert!(value("temma_messages_delivered_total") >= 3.0);
    assert_eq!(value("temma_sse_clients"), 1.0);
    assert!(value("temma_posts_total{status=\"200\"}") >= 4.0);
    assert_eq!(value("temma_posts_total{status=\"400\"}"), 1.0);
    assert!(value("temma_publish_latency_seconds_count") >= 4.0);
    assert_eq!(value("temma_push_connected"), 1.0);
    assert_eq!(value("temma_sub_connected"), 1.0);
    let health: Value = app
        .client
        .get(app.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["sse_clients"], 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_a_foreign_broker_gaps_and_plain_temma_messages() {
    use zeromq::PubSocket;
    // This test is the broker: a PUB socket the web node subscribes to.
    let mut publisher = PubSocket::new();
    let endpoint = publisher.bind("tcp://127.0.0.1:0").await.unwrap();
    let app = TestApp::start_with(|config| {
        config.broker.embedded = false;
        let sub = endpoint.to_string().replace("tcp://", "zmq://SUB@");
        config
            .application
            .data_sources
            .insert("zmq_client_sub".into(), sub.parse().unwrap());
        let push = format!("zmq://PUSH@127.0.0.1:{}", common::free_port());
        config
            .application
            .data_sources
            .insert("zmq_client_push".into(), push.parse().unwrap());
    })
    .await;
    let mut sse = app.sse().await;
    // Wait until the web node's subscription reached this PUB.
    loop {
        publisher
            .send(ZmqMessage::from(
                r#"{"from":"t","text":"warm-up","id":"5-1"}"#,
            ))
            .await
            .unwrap();
        if let Ok(Some(event)) = sse.next_within(Duration::from_millis(100)).await
            && event.event.as_deref() == Some("msg")
        {
            break;
        }
    }
    let frames = [
        r#"{"from":"a","text":"two","id":"5-2"}"#,
        "{\n  \"from\": \"a\",\n  \"text\": \"pretty\",\n  \"id\": \"5-3\"\n}",
        "not json at all",
        r#"{"from":"temma-php","text":"no id"}"#,
        r#"{"from":"a","text":"after a gap","id":"5-7"}"#,
    ];
    for frame in frames {
        publisher.send(ZmqMessage::from(frame)).await.unwrap();
    }
    let mut events = Vec::new();
    while events.len() < 5 {
        // Presence counts come once a second whatever the traffic: not what this test reads.
        let event = sse.next_but_presence().await.expect("open");
        if event.event.is_some() {
            events.push(event);
        }
    }
    assert_eq!(events[0].json()["text"], "two", "{:?}", events[0]);
    assert_eq!(events[0].id.as_deref(), Some("5-2"));
    assert_eq!(
        events[1].json()["text"],
        "pretty",
        "re-serialized on one line"
    );
    assert_eq!(events[2].json()["text"], "no id");
    assert_eq!(events[2].id, None, "a message without an id has no id line");
    assert_eq!(
        events[3].event.as_deref(),
        Some("reset"),
        "ids 5-4 to 5-6 never arrived"
    );
    assert_eq!(events[3].json()["lastEventId"], "5-3");
    assert_eq!(events[4].json()["text"], "after a gap");
    let metrics = app.app().metrics().clone();
    assert_eq!(metrics.drops(temma::metrics::DropReason::Unreadable), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_up_to_date_client_gets_no_reset_even_without_history() {
    let app = TestApp::start_with(|config| config.event.history_size = 0).await;
    app.ready().await;
    let mut sse = app.sse().await;
    app.post_all(["only".to_owned()]).await;
    let last = sse.next_message().await.id.unwrap();
    let mut back = Sse::connect(&app.client, &app.url("/event/fetch"), Some(&last)).await;
    assert!(back.next().await.unwrap().retry.is_some());
    app.post_all(["next".to_owned()]).await;
    let event = loop {
        let event = back.next().await.expect("open");
        assert_ne!(event.event.as_deref(), Some("reset"), "{event:?}");
        if event.event.as_deref() == Some("msg") {
            break event;
        }
    };
    assert_eq!(
        event.json()["text"],
        "next",
        "nothing replayed, nothing skipped"
    );
    app.stop().await;
}
