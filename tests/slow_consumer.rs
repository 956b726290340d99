//! A client that stops reading among 100 that keep up: it is cut off, counted, and slows
//! nobody. In a test binary of its own, so that no other test competes for the CPU while 100
//! readers keep pace.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{DEADLINE, TestApp};
use temma::config::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_cut_off_and_slows_nobody() {
    let config = {
        let mut config = common::test_config();
        config.event.queue = 128;
        config.server.socket_send_buffer_bytes = 64 * 1024;
        config.event.max_clients = 200;
        config
    };
    let app = TestApp::start_config(&config).await;
    app.ready().await;

    // The slow client: a raw connection with a small receive buffer that reads the headers
    // and then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(app.http).await.unwrap();

    slow.write_all(b"GET /event/fetch HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 512];
    let n = slow.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));

    // The others: raw connections too, reading as fast as they can and noting the `"n"` of each
    // message (cheap, so that the readers keep up even on a busy machine).
    let mut readers = Vec::new();
    for _ in 0..100 {
        let mut reader = tokio::net::TcpStream::connect(app.http).await.unwrap();
        reader
            .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        readers.push(reader);
    }
    // Each reader is subscribed once its response head came: only then does it get every
    // message from the first (there is no replay here, `event.initial_history` is 0), however
    // late the node took its request on a busy machine.
    for reader in &mut readers {
        let (head, _) = common::read_head(reader).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // Enough to fill the slow client's socket buffers (64 KB asked on the server's side), then
    // its queue (128 frames of 4 KB), then to go on for longer than `event.stall_ms`. Every
    // other client gets all of it, at a pace a chat could have.
    let count = 450;
    let address = app
        .app()
        .addresses()
        .listening(config.dsn(Role::BrokerPull))[0]
        .clone();
    let mut push = PushSocket::new();
    push.connect(&address).await.unwrap();
    let text = "x".repeat(4000);
    let consumers: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move { common::numbers_after(&mut reader, b"\"n\":", count).await })
        })
        .collect();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for n in 0..count {
        pace.tick().await;
        push.send(ZmqMessage::from(format!(
            r#"{{"from":"flood","text":"{text}","n":{n}}}"#
        )))
        .await
        .unwrap();
    }
    for consumer in consumers {
        let got = consumer.await.unwrap();
        assert_eq!(
            got,
            (0..count).collect::<Vec<_>>(),
            "every message, in order"
        );
    }
    let metrics = app.app().metrics().clone();
    common::eventually("the slow client to be cut off", || {
        let metrics = metrics.clone();
        async move { (metrics.slow_disconnects.get() == 1).then_some(()) }
    })
    .await;
    // Its connection is closed: reading drains what was buffered, then ends.
    let mut sink = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match slow.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow connection was closed");
    // The readers are gone too (their tasks ended): every place is free again.
    common::eventually("every client's place to be released", || {
        let metrics = metrics.clone();
        async move { (metrics.sse_clients.get() == 0).then_some(()) }
    })
    .await;
    app.stop().await;
}
