//! Rooms end to end, over real sockets: a stream follows one room, a POST names one, each room
//! has its own history and replay, scripts read and refuse by room, and a node holds a bounded
//! number of rooms.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Sse, TempDir, TestApp, metric};

async fn post(app: &TestApp, room: Option<&str>, text: &str) -> reqwest::Response {
    let mut form = vec![("from", "a"), ("text", text)];
    if let Some(room) = room {
        form.push(("room", room));
    }
    app.client
        .post(app.url("/message/broadcast"))
        .form(&form)
        .send()
        .await
        .unwrap()
}

async fn sse(app: &TestApp, room: Option<&str>, last_event_id: Option<&str>) -> Sse {
    let url = match room {
        Some(room) => app.url(&format!("/event/fetch?room={room}")),
        None => app.url("/event/fetch"),
    };
    Sse::connect(&app.client, &url, last_event_id).await
}

/// Nothing more arrives on `sse` for a while (but keep-alives).
async fn silent(sse: &mut Sse) {
    loop {
        match sse.next_within(Duration::from_millis(300)).await {
            Err(()) => return,
            Ok(Some(event)) if event.event.as_deref() != Some("msg") => {}
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stream_gets_its_room_only() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut a1 = sse(&app, Some("alpha"), None).await;
    let mut a2 = sse(&app, Some("ALPHA"), None).await; // names are case-folded
    let mut b = sse(&app, Some("beta"), None).await;
    let mut general = sse(&app, None, None).await;
    let mut general_named = sse(&app, Some("general"), None).await;
    // The same request on a kept-alive connection is served by hyper, not the direct path.
    let kept = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    assert_eq!(
        kept.get(app.url("/health")).send().await.unwrap().status(),
        200
    );
    let mut b_hyper = Sse::connect(&kept, &app.url("/event/fetch?room=beta"), None).await;

    let response = post(&app, Some("alpha"), "to alpha").await;
    assert_eq!(response.status(), 200);
    // The 200 says the published id, so that a page can tell its own message.
    let id = response.headers()["x-message-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(post(&app, Some("Beta"), "to beta").await.status(), 200);
    assert_eq!(post(&app, None, "to everyone here").await.status(), 200);

    for stream in [&mut a1, &mut a2] {
        let event = stream.next_message().await;
        assert_eq!(event.id.as_deref(), Some(id.as_str()));
        assert_eq!(event.json()["text"], "to alpha");
        assert_eq!(event.json()["room"], "alpha");
        silent(stream).await;
    }
    for stream in [&mut b, &mut b_hyper] {
        let event = stream.next_message().await;
        assert_eq!(event.json()["text"], "to beta");
        assert_eq!(event.json()["room"], "beta");
        silent(stream).await;
    }
    for stream in [&mut general, &mut general_named] {
        let event = stream.next_message().await;
        assert_eq!(event.json()["text"], "to everyone here");
        assert_eq!(event.json()["room"], "general");
        silent(stream).await;
    }
    let mut rooms = app.app().metrics().render();
    rooms.retain(|c| c != '\r');
    assert!(rooms.contains("temma_rooms 3"), "{rooms}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_room_name_is_a_400_that_says_the_rule() {
    let app = TestApp::start().await;
    let rule = "is not a room name: a room is 1 to 64 of a-z, 0-9, `_` and `-` (capitals are folded to lower case)";
    for bad in ["a%20b", "caf%C3%A9", "", &"x".repeat(65)] {
        let sse = sse(&app, Some(bad), None).await;
        assert_eq!(sse.status, 400, "{bad}");
        let response = app
            .client
            .get(app.url(&format!("/event/fetch?room={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains(rule),
            "{bad}: {body}"
        );
    }
    let response = post(&app, Some("no spaces"), "x").await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["error"],
        format!("`no spaces` {rule}"),
        "the value and the rule"
    );
    let response = app
        .client
        .post(app.url("/message/broadcast"))
        .json(&serde_json::json!({"from": "a", "text": "x", "room": "a/b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_per_room_and_loses_nothing() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut alpha = sse(&app, Some("alpha"), None).await;
    for i in 0..3 {
        assert_eq!(
            post(&app, Some("alpha"), &format!("a{i}")).await.status(),
            200
        );
        assert_eq!(
            post(&app, Some("beta"), &format!("b{i}")).await.status(),
            200
        );
    }
    let seen = alpha.messages(3).await;
    let last = seen.last().unwrap().id.clone().unwrap();
    drop(alpha);
    // While the client is away, both rooms go on.
    for i in 3..6 {
        assert_eq!(
            post(&app, Some("beta"), &format!("b{i}")).await.status(),
            200
        );
        assert_eq!(
            post(&app, Some("alpha"), &format!("a{i}")).await.status(),
            200
        );
    }
    let mut back = sse(&app, Some("alpha"), Some(&last)).await;
    let mut texts = Vec::new();
    loop {
        let event = back.next().await.unwrap();
        assert_ne!(event.event.as_deref(), Some("reset"), "{event:?}");
        if event.event.as_deref() == Some("msg") {
            texts.push(event.json()["text"].as_str().unwrap().to_owned());
            if texts.len() == 3 {
                break;
            }
        }
    }
    assert_eq!(texts, ["a3", "a4", "a5"]);
    silent(&mut back).await;
    // The live stream follows the replay in the same room.
    assert_eq!(post(&app, Some("alpha"), "a6").await.status(), 200);
    assert_eq!(back.texts(1).await, ["a6"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_cap_is_kept_and_said() {
    let app = TestApp::start_with(|config| config.rooms.max = 2).await;
    app.ready().await; // the warm-up message opens `general`
    let _alpha = sse(&app, Some("alpha"), None).await;
    // `general` has no client: it makes way for `alpha`. Now both rooms held have clients.
    let _beta = sse(&app, Some("beta"), None).await;
    let refused = sse(&app, Some("gamma"), None).await;
    assert_eq!(refused.status, 503);
    let response = app
        .client
        .get(app.url("/event/fetch?room=gamma"))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["error"],
        "too many rooms: this node holds at most 2 (`rooms.max`) and each has clients; try again later"
    );
    // A message to a room this node cannot hold is still published (others may hold it).
    assert_eq!(post(&app, Some("gamma"), "x").await.status(), 200);
    assert_eq!(
        metric(&app, "temma_drops_total{reason=\"Rooms\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&app, "temma_rooms "), Some(2.0));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_read_the_room_and_refuse_by_room() {
    let dir = TempDir::new("room-script");
    let script = dir.0.join("rooms.rhai");
    std::fs::write(
        &script,
        r#"fn on_message(msg) {
    if msg.room == "announcements" {
        return reject("only moderators post in " + msg.room, 403);
    }
    if msg.room == "shout" {
        msg.text = to_upper(msg.text);
    }
    msg
}
"#,
    )
    .unwrap();
    let app = TestApp::start_with(|config| {
        config.broker.scripts = vec![temma::script::ScriptConfig {
            file: script.clone(),
            params: Default::default(),
            name: None,
            on_error: None,
        }];
    })
    .await;
    app.ready().await;
    let mut shout = sse(&app, Some("shout"), None).await;
    let refused = post(&app, Some("announcements"), "hello").await;
    assert_eq!(refused.status(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "only moderators post in announcements");
    assert_eq!(post(&app, Some("shout"), "hello").await.status(), 200);
    assert_eq!(shout.texts(1).await, ["HELLO"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_share_one_byte_budget() {
    // Room for about four messages over all rooms.
    let app = TestApp::start_with(|config| {
        config.rooms.history_bytes = 600;
        config.event.initial_history = 50;
    })
    .await;
    app.ready().await;
    for i in 0..6 {
        let room = if i % 2 == 0 { "alpha" } else { "beta" };
        assert_eq!(post(&app, Some(room), &format!("m{i}")).await.status(), 200);
    }
    let mut alpha = sse(&app, Some("alpha"), None).await;
    let mut beta = sse(&app, Some("beta"), None).await;
    let mut kept = Vec::new();
    for stream in [&mut alpha, &mut beta] {
        while let Ok(Some(event)) = stream.next_within(Duration::from_millis(300)).await {
            if event.event.as_deref() == Some("msg") {
                kept.push(event.json()["text"].as_str().unwrap().to_owned());
            }
        }
    }
    kept.sort();
    // The oldest went first, whatever their room; the newest are kept.
    assert!(kept.len() >= 2 && kept.len() <= 5, "{kept:?}");
    assert!(kept.contains(&"m5".to_owned()) && kept.contains(&"m4".to_owned()));
    assert!(!kept.contains(&"m0".to_owned()), "{kept:?}");
    app.stop().await;
}

/// The next `presence` event's count.
async fn next_count(sse: &mut Sse) -> u64 {
    loop {
        let event = sse.next().await.expect("stream open");
        if event.event.as_deref() == Some("presence") {
            return event.json()["count"].as_u64().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_clients_over_every_node() {
    let one = TestApp::start().await;
    one.ready().await;
    let two = common::second_node(&one).await;
    two.ready().await;

    let mut first = sse(&one, Some("lobby"), None).await;
    assert_eq!(next_count(&mut first).await, 1);
    let mut elsewhere = sse(&one, Some("other"), None).await;
    let second = sse(&two, Some("lobby"), None).await;
    // The node-one client learns of the node-two client within a few seconds.
    assert_eq!(next_count(&mut first).await, 2);
    assert_eq!(
        next_count(&mut elsewhere).await,
        1,
        "another room's count is its own"
    );
    let rooms: serde_json::Value = two
        .client
        .get(two.url("/rooms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        rooms,
        serde_json::json!({
            "default": "general",
            "rooms": [{"room": "lobby", "count": 2}, {"room": "other", "count": 1}],
            "limits": {"text": 2000, "from": 64},
        })
    );
    // A client leaves: the count goes down on the other node.
    drop(second);
    assert_eq!(next_count(&mut first).await, 1);
    // A node that dies stops being counted within a few seconds.
    let mut third = sse(&two, Some("lobby"), None).await;
    assert_eq!(next_count(&mut first).await, 2);
    assert_eq!(next_count(&mut third).await, 2);
    let started = std::time::Instant::now();
    two.stop().await;
    assert_eq!(next_count(&mut first).await, 1);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    one.stop().await;
}

/// The next `presence` event's data.
async fn next_presence(sse: &mut Sse) -> serde_json::Value {
    loop {
        let event = sse.next().await.expect("stream open");
        if event.event.as_deref() == Some("presence") {
            return event.json();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sessions_presence_lists_the_names() {
    let app = TestApp::start_with(|config| {
        config.application.enable_sessions = true;
        config.application.session_secret = Some("k".repeat(64));
    })
    .await;
    app.ready().await;
    // Each person posts once (the session remembers the name), then follows the room.
    let person = |name: &'static str| {
        let app = &app;
        async move {
            let client = reqwest::Client::builder()
                .cookie_store(true)
                .build()
                .unwrap();
            let response = client
                .post(app.url("/message/broadcast"))
                .form(&[("from", name), ("text", "hi"), ("room", "lobby")])
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let sse = Sse::connect(&client, &app.url("/event/fetch?room=lobby"), None).await;
            assert_eq!(sse.status, 200);
            // The stream reads the session, never writes it.
            assert!(sse.headers.get("set-cookie").is_none());
            sse
        }
    };
    let mut ann = person("Ann").await;
    assert_eq!(
        next_presence(&mut ann).await,
        serde_json::json!({"room": "lobby", "count": 1, "names": ["Ann"]})
    );
    let _ben = person("Ben").await;
    assert_eq!(
        next_presence(&mut ann).await,
        serde_json::json!({"room": "lobby", "count": 2, "names": ["Ann", "Ben"]})
    );
    // Someone without a session is counted, not named.
    let _anonymous = sse(&app, Some("lobby"), None).await;
    assert_eq!(
        next_presence(&mut ann).await,
        serde_json::json!({"room": "lobby", "count": 3, "names": ["Ann", "Ben"]})
    );
    app.stop().await;
}

/// Presence reports forged on the broker's PULL socket (anyone who can reach it can send
/// them): what a node remembers stays bounded, bad names and frames are dropped, and the node
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_presence_stays_bounded() {
    use zeromq::{Socket, SocketSend};
    let app = TestApp::start().await;
    app.ready().await;
    let config = common::test_config();
    let pull = app
        .app()
        .addresses()
        .listening(config.dsn(temma::config::Role::BrokerPull))[0]
        .clone();
    let mut forger = zeromq::PushSocket::new();
    forger.connect(&pull).await.unwrap();
    let long_name = "N".repeat(500);
    for node in 0..400 {
        let report = serde_json::json!({"presence": {
            "node": format!("forged-{node}"),
            "rooms": {
                "lobby": {"count": 1, "names": [long_name]},
                "Bad Name": 5,
                "../etc": 7,
            },
        }});
        forger
            .send(zeromq::ZmqMessage::from(report.to_string()))
            .await
            .unwrap();
    }
    forger
        .send(zeromq::ZmqMessage::from("{\"presence\": not json"))
        .await
        .unwrap();
    let rooms = common::eventually("the forged reports to arrive", || async {
        let rooms: serde_json::Value = app
            .client
            .get(app.url("/rooms"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (rooms["rooms"][0]["count"] == 256).then_some(rooms)
    })
    .await;
    // 256 nodes at most, and only rooms with valid names.
    assert_eq!(
        rooms["rooms"],
        serde_json::json!([{"room": "lobby", "count": 256}]),
        "{rooms}"
    );
    // A local client sees the names cut to 64 characters, listed once.
    let mut lobby = sse(&app, Some("lobby"), None).await;
    let presence = next_presence(&mut lobby).await;
    assert_eq!(presence["count"], 257);
    assert_eq!(presence["names"], serde_json::json!(["N".repeat(64)]));
    assert!(metric(&app, "temma_drops_total{reason=\"Unreadable\"}").unwrap_or(0.0) >= 1.0);
    // Still serving: a message goes through.
    assert_eq!(post(&app, Some("lobby"), "still here").await.status(), 200);
    assert_eq!(lobby.texts(1).await, ["still here"]);
    app.stop().await;
}

/// A room's history that no longer reaches back to a client's last id says so with
/// `event: reset`, then the room's newest messages; other rooms' traffic does not push a
/// room's own messages out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_history_cannot_cover_an_id_resets() {
    let app = TestApp::start_with(|config| {
        config.event.history_size = 2;
        config.event.initial_history = 2;
    })
    .await;
    app.ready().await;
    let mut alpha = sse(&app, Some("alpha"), None).await;
    assert_eq!(post(&app, Some("alpha"), "a0").await.status(), 200);
    let first = alpha.next_message().await.id.unwrap();
    drop(alpha);
    // Busy elsewhere: alpha's history (2 per room) keeps a0.
    for i in 0..5 {
        assert_eq!(
            post(&app, Some("beta"), &format!("b{i}")).await.status(),
            200
        );
    }
    let mut back = sse(&app, Some("alpha"), Some(&first)).await;
    assert_eq!(post(&app, Some("alpha"), "a1").await.status(), 200);
    // The opening, then a1: no reset on the way.
    loop {
        let event = back.next_but_presence().await.unwrap();
        assert_ne!(event.event.as_deref(), Some("reset"), "{event:?}");
        if event.event.as_deref() == Some("msg") {
            assert_eq!(event.json()["text"], "a1");
            break;
        }
    }
    drop(back);
    // Now alpha's own messages push a0 out: a reset, then the newest two.
    for i in 2..5 {
        assert_eq!(
            post(&app, Some("alpha"), &format!("a{i}")).await.status(),
            200
        );
    }
    let mut late = sse(&app, Some("alpha"), Some(&first)).await;
    let opening = late.next().await.unwrap();
    assert!(opening.retry.is_some());
    let reset = late.next().await.unwrap();
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert_eq!(reset.json()["lastEventId"], first.as_str());
    assert_eq!(late.texts(2).await, ["a3", "a4"]);
    app.stop().await;
}
