//! Writer shards (`src/shard.rs`): the SSE clients the front door streams are written to by a
//! few tasks per room, and those it takes over from hyper (a stream requested on a kept-alive
//! connection). Real server on port 0, raw TCP clients.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::TestApp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw SSE client: the request sent as the connection's first bytes (the direct path).
async fn subscribe(app: &TestApp, recv_buffer: Option<u32>) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut stream = socket.connect(app.http).await.unwrap();
    stream
        .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    stream
}

/// Reads until `count` messages came (or the stream ends) and returns the number each text
/// starts with.
async fn read_numbers(stream: &mut TcpStream, count: usize) -> Vec<usize> {
    common::numbers_after(stream, b"\"text\":\"", count).await
}

/// Posts `text` (as JSON) and checks it was published.
async fn post(app: &TestApp, text: String) {
    post_with(&app.client, app, text).await;
}

/// [`post`] through `client`.
async fn post_with(client: &reqwest::Client, app: &TestApp, text: String) {
    let response = client
        .post(app.url("/message/broadcast"))
        .json(&serde_json::json!({"from": "a", "text": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Waits until the node counts `clients` SSE clients.
async fn clients_connected(app: &TestApp, clients: f64) {
    common::eventually("every client connected", || async {
        (common::metric(app, "temma_sse_clients ") == Some(clients)).then_some(())
    })
    .await;
}

/// Clients a writer shard takes here (`event.shard_size`): three shards with a few clients.
const SHARD_SIZE: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_across_several_shards_get_every_message_in_order() {
    // A shard's sends in one system call (io_uring, where the kernel allows) or one by one.
    for io_uring in [true, false] {
        several_shards(io_uring).await;
    }
}

async fn several_shards(io_uring: bool) {
    let app = TestApp::start_with(|config| {
        config.event.max_clients = 1000;
        config.event.io_uring = io_uring;
        config.event.shard_size = SHARD_SIZE;
    })
    .await;
    app.ready().await;
    // Three shards: two full, one not.
    let count = 2 * SHARD_SIZE + 10;
    let mut clients = Vec::new();
    for _ in 0..count {
        clients.push(subscribe(&app, None).await);
    }
    clients_connected(&app, count as f64).await;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { read_numbers(&mut client, 30).await }))
        .collect();
    for n in 0..30 {
        post(&app, format!("{n}")).await;
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap(), (0..30).collect::<Vec<_>>());
    }
    // Each message was delivered once per client, counted once (a shard counts its pass's
    // deliveries once their sends are done, which a client may see first).
    let delivered = || common::metric(&app, "temma_messages_delivered_total ").unwrap();
    common::eventually("every delivery counted", || async {
        (delivered() >= (30 * count) as f64).then_some(())
    })
    .await;
    assert_eq!(delivered(), (30 * count) as f64);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pauses_then_reads_on_loses_nothing_and_holds_nobody_up() {
    for io_uring in [true, false] {
        pause_then_read(io_uring).await;
    }
}

async fn pause_then_read(io_uring: bool) {
    let app = TestApp::start_with(|config| {
        config.event.io_uring = io_uring;
        config.event.queue = 1024;
        config.server.socket_send_buffer_bytes = 16 * 1024;
    })
    .await;
    app.ready().await;
    // The paused client: a small receive buffer, nothing read for a while.
    let mut paused = subscribe(&app, Some(4096)).await;
    let mut fast = subscribe(&app, None).await;
    clients_connected(&app, 2.0).await;
    // 300 messages of 0.6 KB: far more than both sockets' buffers hold, far less than the queue.
    let count = 300;
    let text = "x".repeat(500);
    let fast_reader = tokio::spawn(async move { read_numbers(&mut fast, count).await });
    for n in 0..count {
        post(&app, format!("{n} {text}")).await;
    }
    // The other client had everything while this one read nothing.
    assert_eq!(
        fast_reader.await.unwrap(),
        (0..count).collect::<Vec<_>>(),
        "the reading client is not held up"
    );
    // What the paused client's socket could not take waits for it, in order.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read_numbers(&mut paused, count).await,
        (0..count).collect::<Vec<_>>(),
        "every message, in order, once"
    );
    assert_eq!(
        common::metric(&app, "temma_slow_consumer_disconnects_total "),
        Some(0.0)
    );
    // It is still subscribed: the next message comes.
    post(&app, format!("{count}")).await;
    assert_eq!(read_numbers(&mut paused, 1).await, vec![count]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ahead_of_the_node_gets_only_what_it_lacks() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut watcher = subscribe(&app, None).await;
    clients_connected(&app, 1.0).await;
    post(&app, "0".to_owned()).await;
    // The first message's id: `<run>-<seq>`.
    let mut head = Vec::new();
    while !head.windows(2).any(|w| w == b"\n\n") || memchr::memmem::find(&head, b"id: ").is_none() {
        let mut buffer = [0u8; 4096];
        let n = watcher.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the stream goes on");
        head.extend_from_slice(&buffer[..n]);
    }
    let at = memchr::memmem::find(&head, b"id: ").unwrap() + 4;
    let line = &head[at..at + head[at..].iter().position(|&b| b == b'\n').unwrap()];
    let (run, seq) = std::str::from_utf8(line).unwrap().rsplit_once('-').unwrap();
    let seq: u64 = seq.parse().unwrap();
    // A client that saw two messages more than this node has (on another node, say).
    let mut ahead = tokio::net::TcpStream::connect(app.http).await.unwrap();
    let request = format!(
        "GET /event/fetch HTTP/1.1\r\nHost: test\r\nLast-Event-ID: {run}-{}\r\n\r\n",
        seq + 2
    );
    ahead.write_all(request.as_bytes()).await.unwrap();
    clients_connected(&app, 2.0).await;
    for n in 1..=4 {
        post(&app, format!("{n}")).await;
    }
    // Messages 1 and 2 are the two it has: it gets 3 and 4, once each.
    assert_eq!(read_numbers(&mut ahead, 2).await, vec![3, 4]);
    assert_eq!(read_numbers(&mut watcher, 4).await, vec![1, 2, 3, 4]);
    app.stop().await;
}

/// A browser's `EventSource` reuses the kept-alive connection that fetched the page: hyper
/// serves the first request, and the stream request that follows is taken over by the direct
/// path, whose shard writes the frames as they are (no chunked encoding). The client's
/// closing ends it, and shutdown ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_kept_alive_connection_is_taken_over_by_the_writer_shards() {
    let app = TestApp::start().await;
    app.ready().await;
    let connections = || common::metric(&app, "temma_connections ").unwrap();
    let mut browser = TcpStream::connect(app.http).await.unwrap();
    browser
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let (head, mut body) = common::read_head(&mut browser).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .expect("a page of known length")
        .parse()
        .unwrap();
    while body.len() < length {
        let mut buffer = [0u8; 4096];
        let n = browser.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the page came whole");
        body.extend_from_slice(&buffer[..n]);
    }
    // The same connection, kept alive: the stream.
    browser
        .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = common::read_head(&mut browser).await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{head}");
    assert!(lower.contains("content-type: text/event-stream"), "{head}");
    assert!(
        !lower.contains("transfer-encoding"),
        "written as it is: {head}"
    );
    clients_connected(&app, 1.0).await;
    assert_eq!(
        common::metric(&app, "temma_direct_requests_total{request=\"TakenStream\"}"),
        Some(1.0)
    );
    // The POSTs on connections of their own, closed after them, so that the count goes back
    // to what it was: none of them closes while the stream's close is awaited below.
    let open = connections();
    let poster = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for n in 0..3 {
        post_with(&poster, &app, n.to_string()).await;
    }
    drop(poster);
    assert_eq!(read_numbers(&mut browser, 3).await, vec![0, 1, 2]);
    common::eventually("the POSTs' connections closed", || async {
        (connections() == open).then_some(())
    })
    .await;
    // The client closes: the stream ends, and so does the connection's count.
    drop(browser);
    clients_connected(&app, 0.0).await;
    common::eventually("the connection no longer counted", || async {
        (connections() == open - 1.0).then_some(())
    })
    .await;

    // Another, open when the server shuts down: the stream ends cleanly after what it had.
    let mut browser = stream_after_a_request(&app).await;
    common::read_head(&mut browser).await;
    clients_connected(&app, 1.0).await;
    post(&app, "7".to_owned()).await;
    app.stop().await;
    let mut rest = Vec::new();
    tokio::time::timeout(common::DEADLINE, browser.read_to_end(&mut rest))
        .await
        .expect("the stream ends with the server")
        .unwrap();
    assert!(
        memchr::memmem::find(&rest, b"\"text\":\"7\"").is_some(),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}

/// A connection that asks for `/health` (hyper answers it), then for the stream on the same
/// connection, kept alive (the front door takes it over): the stream's answer is left to read.
async fn stream_after_a_request(app: &TestApp) -> TcpStream {
    let mut browser = TcpStream::connect(app.http).await.unwrap();
    browser
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = common::read_head(&mut browser).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    browser
        .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    browser
}

/// A stream refused once the front door took it over from hyper (the clients' cap, checked
/// as the client joins its room) gets its `503` and the reason on that connection, then the
/// end of it; so does one that opened with its request. The place it did not take stays free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_after_a_request_or_as_the_first_gets_its_503() {
    let app = TestApp::start_with(|config| config.event.max_clients = 1).await;
    app.ready().await;
    let mut first = subscribe(&app, None).await;
    clients_connected(&app, 1.0).await;

    // Taken over from hyper after a first request, then refused.
    let mut browser = stream_after_a_request(&app).await;
    // As the first request: refused the same way.
    let mut direct = subscribe(&app, None).await;
    for refused in [&mut browser, &mut direct] {
        let mut answer = Vec::new();
        tokio::time::timeout(common::DEADLINE, refused.read_to_end(&mut answer))
            .await
            .expect("the refusal ends the connection")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        let body: serde_json::Value =
            serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let reason = body["error"].as_str().unwrap();
        assert!(reason.contains("at most 1"), "{reason}");
    }
    // The client that holds the place still gets what is published.
    post(&app, "5".to_owned()).await;
    assert_eq!(read_numbers(&mut first, 1).await, vec![5]);
    clients_connected(&app, 1.0).await;
    app.stop().await;
}
