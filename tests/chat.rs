//! The default chat end to end, over real sockets: HTTP on port 0, ZeroMQ on system-picked
//! ports, SSE read by a real HTTP client.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Sse, TestApp};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_receive_a_hundred_messages_in_order() {
    let app = TestApp::start().await;
    app.ready().await;

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut sse = app.sse().await;
        // Status and headers arrive before any message is posted.
        assert_eq!(sse.status, 200);
        assert_eq!(sse.headers["content-type"], "text/event-stream");
        assert_eq!(sse.headers["cache-control"], "no-cache");
        assert_eq!(sse.headers["x-accel-buffering"], "no");
        let opening = sse.next().await.expect("opening block");
        assert_eq!(opening.retry.as_deref(), Some("2000"));
        assert_eq!(opening.event, None);
        clients.push(sse);
    }

    let multipart = |i: usize| {
        reqwest::multipart::Form::new()
            .text("from", format!("sender{}", i % 7))
            .text("text", format!("message {i}"))
    };
    for i in 0..100 {
        let response = match i % 3 {
            0 => {
                app.post_form(&format!("sender{}", i % 7), &format!("message {i}"))
                    .await
            }
            1 => app
                .client
                .post(app.url("/message/broadcast"))
                .json(&json!({"from": format!("sender{}", i % 7), "text": format!("message {i}")}))
                .send()
                .await
                .unwrap(),
            _ => app
                .client
                .post(app.url("/message/broadcast"))
                .multipart(multipart(i))
                .send()
                .await
                .unwrap(),
        };
        assert_eq!(response.status(), 200, "message {i}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        assert_eq!(response.text().await.unwrap(), "true");
    }

    for sse in &mut clients {
        let events = sse.messages(100).await;
        let mut previous: Option<temma::wire::MsgId> = None;
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event.event.as_deref(), Some("msg"));
            let id = event.id.clone().expect("every message has an id");
            let body = event.json();
            assert_eq!(body["from"], format!("sender{}", i % 7));
            assert_eq!(body["text"], format!("message {i}"));
            assert_eq!(body["id"], id, "the id line matches the JSON id");
            assert!(body["time"].is_u64());
            let id: temma::wire::MsgId = id.parse().unwrap();
            assert!(previous.is_none_or(|p| id.follows(&p)), "ids increase");
            previous = Some(id);
        }
    }
    // Each message was serialized once per node and delivered to each of the three clients.
    let metrics = app.app().metrics().clone();
    assert!(metrics.delivered.get() >= 300);
    app.stop().await;
}

/// A node's own POSTs publish on their own task while the embedded broker's relay is free
/// (`temma_broker_published_inline_total`); another node's come through PULL, in the broker's
/// turns. Both nodes see one order: ids dense, each node's messages in the order it sent them,
/// the same on both (what the broker sent on PUB is what it gave its own node's hub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_posts_and_another_nodes_keep_one_order_on_every_node() {
    const EACH: usize = 200;
    let first = TestApp::start().await;
    first.ready().await;
    let second = common::second_node(&first).await;
    second.ready().await;
    let mut on_first = first.sse().await;
    let mut on_second = second.sse().await;
    let texts = |node: &str| (0..EACH).map(|i| format!("{node} {i}")).collect::<Vec<_>>();
    let posting = [
        first.post_in_background(texts("first")),
        second.post_in_background(texts("second")),
    ];
    for posted in posting {
        posted.await.unwrap();
    }
    let seen = |events: Vec<common::Event>| {
        events
            .iter()
            .map(|event| {
                let id: temma::wire::MsgId = event.id.as_deref().unwrap().parse().unwrap();
                (id, event.json()["text"].as_str().unwrap().to_owned())
            })
            .collect::<Vec<_>>()
    };
    let on_first = seen(on_first.messages(2 * EACH).await);
    let on_second = seen(on_second.messages(2 * EACH).await);
    assert_eq!(on_first, on_second, "one order on both nodes");
    for pair in on_first.windows(2) {
        let ((a, _), (b, _)) = (&pair[0], &pair[1]);
        assert_eq!((b.run, b.seq), (a.run, a.seq + 1), "dense ids: {pair:?}");
    }
    for node in ["first", "second"] {
        let sent: Vec<_> = on_first
            .iter()
            .filter_map(|(_, text)| text.strip_prefix(node))
            .collect();
        let expected: Vec<_> = (0..EACH).map(|i| format!(" {i}")).collect();
        assert_eq!(sent, expected, "{node}'s messages in the order sent");
    }
    let inline = first.app().metrics().broker_inline.get();
    assert!(inline > 0, "the first node's POSTs published themselves");
    assert_eq!(second.app().metrics().broker_inline.get(), 0);
    second.stop().await;
    first.stop().await;
}

/// A message to a room of more than one writer shard's worth of clients goes through the
/// broker's task (its broadcast wakes the shards); one to a smaller room publishes itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_messages_to_small_rooms_publish_themselves() {
    let app = TestApp::start_with(|config| config.event.shard_size = 2).await;
    app.ready().await;
    let inline = || app.app().metrics().broker_inline.get();
    let mut crowd = Vec::new();
    for _ in 0..3 {
        crowd.push(app.sse().await);
    }
    common::eventually("three clients in the room", || async {
        (app.app().metrics().sse_clients.get() == 3).then_some(())
    })
    .await;
    let before = inline();
    app.post_all((0..5).map(|i| format!("to the crowd {i}")))
        .await;
    assert_eq!(inline(), before, "through the broker's task");
    for sse in &mut crowd {
        let texts = sse.texts(5).await;
        assert_eq!(
            texts,
            (0..5)
                .map(|i| format!("to the crowd {i}"))
                .collect::<Vec<_>>()
        );
    }
    let mut quiet = Sse::connect(&app.client, &app.url("/event/fetch?room=quiet"), None).await;
    for i in 0..5 {
        let response = app
            .client
            .post(app.url("/message/broadcast"))
            .form(&[
                ("from", "a"),
                ("text", &format!("quiet {i}")),
                ("room", "quiet"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        quiet.texts(5).await,
        (0..5).map(|i| format!("quiet {i}")).collect::<Vec<_>>()
    );
    assert!(
        inline() > before,
        "a room of one client: published by the POSTs"
    );
    app.stop().await;
}

/// A message whose frame would be larger than the broker takes gets a `413` that says so, at
/// once, whether the POST publishes it itself or hands it to the broker's task (with scripts):
/// never a frame the broker drops, nor a wait for the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_brokers_frame_limit_is_a_413_at_once() {
    for scripted in [false, true] {
        let app = TestApp::start_with(|config| {
            config.broker.max_frame_bytes = 512;
            config.message.publish_timeout_ms = 60_000;
            if scripted {
                config.broker.scripts.push(temma::script::ScriptConfig {
                    file: common::manifest_dir().join("scripts/trim.rhai"),
                    params: Default::default(),
                    name: None,
                    on_error: None,
                });
            }
        })
        .await;
        app.ready().await;
        // Far past the wait below: an answer at the deadline would fail it.
        let response = tokio::time::timeout(common::DEADLINE, app.post_form("a", &"x".repeat(600)))
            .await
            .expect("an answer before the deadline");
        assert_eq!(response.status(), 413, "scripted: {scripted}");
        let body: serde_json::Value = response.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("`broker.max_frame_bytes`"), "{error}");
        assert_eq!(app.post_form("a", &"x".repeat(300)).await.status(), 200);
        let metrics = app.app().metrics().render();
        let inline = common::metric_in(&metrics, "temma_broker_published_inline_total").unwrap();
        assert_eq!(inline > 0.0, !scripted, "{metrics}");
        app.stop().await;
    }
}

#[tokio::test]
async fn blank_and_missing_fields_are_refused_with_a_reason() {
    let app = TestApp::start().await;
    for (body, field) in [
        ("from=&text=hi", "`from` is blank"),
        ("from=%20%20&text=hi", "`from` is blank"),
        ("from=a&text=%09", "`text` is blank"),
        ("text=hi", "`from` is missing"),
        ("from=a", "`text` is missing"),
        ("", "`from` is missing"),
    ] {
        let response = app
            .post_raw("application/x-www-form-urlencoded", body.to_owned())
            .await;
        assert_eq!(response.status(), 400, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(field),
            "{body}: {error}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn homepage_static_files_and_unknown_routes() {
    let app = TestApp::start().await;
    let home = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(home.status(), 200);
    assert_eq!(home.headers()["content-type"], "text/html; charset=utf-8");
    let page = home.text().await.unwrap();
    for needle in [
        "id=\"from\"",
        "id=\"text\"",
        "id=\"liste\"",
        "src=\"/chat.js\"",
    ] {
        assert!(page.contains(needle), "index.html has {needle}");
    }
    let script = app.client.get(app.url("/chat.js")).send().await.unwrap();
    assert_eq!(script.status(), 200);
    assert!(
        script
            .text()
            .await
            .unwrap()
            .contains("new EventSource(streamUrl())")
    );

    for path in ["/nope", "/message/unknown", "/chat.jss", "/../etc/passwd"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let error: serde_json::Value = response.json().await.unwrap();
        assert!(error["error"].is_string(), "{path}: {error}");
    }
    let wrong = app
        .client
        .get(app.url("/message/broadcast"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "POST");
    let error: serde_json::Value = wrong.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("use POST"));
    app.stop().await;
}

#[tokio::test]
async fn no_cookie_is_ever_set_without_sessions() {
    let app = TestApp::start().await;
    app.ready().await;
    for response in [
        app.client.get(app.url("/")).send().await.unwrap(),
        app.post_form("a", "b").await,
    ] {
        assert!(response.headers().get("set-cookie").is_none());
    }
    app.stop().await;
}

#[tokio::test]
async fn sessions_remember_the_sender() {
    let app = TestApp::start_with(|config| {
        config.application.enable_sessions = true;
        config.application.session_secret = Some("k".repeat(64));
    })
    .await;
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    // Warm up with the cookie-less client so the session client's first POST sets the name.
    app.ready().await;
    let mut sse = app.sse().await;

    let first = client
        .post(app.url("/message/broadcast"))
        .form(&[("from", "Zoé"), ("text", "first")])
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let cookie = first.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("TemmaSession="), "{cookie}");
    assert!(cookie.to_lowercase().contains("httponly"), "{cookie}");

    let second = client
        .post(app.url("/message/broadcast"))
        .form(&[("text", "second")])
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200, "{:?}", second.text().await);
    let events = sse.messages(2).await;
    assert_eq!(events[1].json()["from"], "Zoé");
    assert_eq!(events[1].json()["text"], "second");

    // Another client without the cookie still has to say who it is.
    let anonymous = app
        .client
        .post(app.url("/message/broadcast"))
        .form(&[("text", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 400);

    // The SSE stream never touches the session: it sets no cookie and does not wait for POSTs.
    assert!(sse.headers.get("set-cookie").is_none());
    app.stop().await;
}

#[tokio::test]
async fn post_without_a_broker_answers_503_in_bounded_time() {
    let app = TestApp::start_with(|config| {
        // A web node whose broker is not running: connect to ports where nothing listens.
        config.broker.embedded = false;
        let port = common::free_port();
        for (name, dsn) in [
            ("zmq_client_push", format!("zmq://PUSH@127.0.0.1:{port}")),
            (
                "zmq_client_sub",
                format!("zmq://SUB@127.0.0.1:{}", port + 1),
            ),
        ] {
            config
                .application
                .data_sources
                .insert(name.into(), dsn.parse().unwrap());
        }
        config.message.publish_timeout_ms = 300;
    })
    .await;
    let started = Instant::now();
    let response = app.post_form("a", "b").await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 503);
    let error: serde_json::Value = response.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("300 ms"),
        "{error}"
    );
    assert!(elapsed < Duration::from_secs(2), "answered in {elapsed:?}");
    // The SSE stream still opens at once.
    let mut sse = app.sse().await;
    assert_eq!(sse.status, 200);
    assert!(sse.next().await.unwrap().retry.is_some());
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    app.stop().await;
}

#[tokio::test]
async fn messages_are_json_escaped_and_cannot_split_frames() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    let text = "line one\nline two\n\nevent: msg\ndata: forged\n<script>alert(1)</script>";
    assert_eq!(app.post_form("Zoé", text).await.status(), 200);
    let event = sse.next_message().await;
    assert_eq!(event.json()["text"], text);
    assert_eq!(event.json()["from"], "Zoé");
    // One data line, whatever the text holds.
    assert!(!event.data.contains('\n'));
    app.stop().await;
}

#[tokio::test]
async fn sse_ends_on_shutdown() {
    let app = TestApp::start().await;
    let mut sse: Sse = app.sse().await;
    assert!(sse.next().await.is_some());
    app.shutdown.cancel();
    // The stream ends (None) instead of hanging.
    loop {
        match sse.next().await {
            None => break,
            Some(event) => assert_ne!(event.event.as_deref(), Some("msg")),
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn idle_streams_get_keep_alive_comments() {
    let app = TestApp::start_with(|config| config.event.keepalive_secs = 1).await;
    let mut sse = app.sse().await;
    let opening = sse.next().await.unwrap();
    assert_eq!(opening.comments, ["ok"]);
    let started = Instant::now();
    let keepalive = sse.next_but_presence().await.unwrap();
    assert_eq!(keepalive.comments, ["keep-alive"]);
    assert_eq!(keepalive.event, None);
    assert!(started.elapsed() < Duration::from_secs(3));
    app.stop().await;
}

#[tokio::test]
async fn cors_is_off_by_default_and_allows_only_listed_origins() {
    let app = TestApp::start().await;
    let response = app
        .client
        .get(app.url("/event/fetch"))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    app.stop().await;

    let app = TestApp::start_with(|config| {
        config.server.cors_origins = vec!["https://chat.example.com".into()];
    })
    .await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/message/broadcast"))
        .header("origin", "https://chat.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );
    let methods = preflight.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let other = app
        .client
        .get(app.url("/health"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    app.stop().await;

    let mut config = common::test_config();
    config.server.cors_origins = vec!["chat.example.com".into()];
    let problems = config.validate().unwrap_err().problems;
    assert_eq!(problems[0].key, "server.cors_origins[0]");
}
