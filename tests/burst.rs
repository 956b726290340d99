//! A burst from the broker is not a slow consumer: a web node that receives thousands of
//! messages at once, on its SUB socket or into its embedded broker, hands them to its clients
//! as it reads them, and every client that keeps reading gets every message. In a test binary
//! of its own, its tests one at a time, so that nothing else competes for the CPU while a
//! burst is read.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{Sse, TestApp};

fn frame(text: &str) -> Vec<u8> {
    common::zmtp::message("burst", text)
}

/// The next `msg` event's text, or `None` when the stream ended or stayed silent.
async fn next_text(sse: &mut Sse) -> Option<String> {
    loop {
        match sse.next_within(common::DEADLINE).await {
            Ok(Some(event)) if event.event.as_deref() == Some("msg") => {
                return Some(event.json()["text"].as_str().unwrap().to_owned());
            }
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

/// The tests of this binary, one at a time: each needs the CPU to itself.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Opens `CLIENTS` SSE clients on `app`, writes a burst of `BURST` messages into the PULL
/// socket at `pull` at once (a raw PUSH peer, as fast as the kernel takes it), and checks that
/// every client gets all of them, in order, and that no client was cut as slow.
async fn burst_reaches_every_client(app: &TestApp, pull: u16) {
    const BURST: usize = 5_000;
    const CLIENTS: usize = 10;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(app.sse().await);
    }
    let mut push = TcpStream::connect(("127.0.0.1", pull)).unwrap();
    push.write_all(&common::zmtp::greeting()).unwrap();
    push.write_all(&common::zmtp::ready("PUSH")).unwrap();
    // The clients hear the broker: a probe reaches the first client.
    loop {
        push.write_all(&frame("probe")).unwrap();
        match tokio::time::timeout(Duration::from_millis(300), next_text(&mut clients[0])).await {
            Ok(Some(text)) if text == "probe" => break,
            _ => {}
        }
    }
    // Every client past the probes (each saw at least one).
    for sse in &mut clients[1..] {
        assert_eq!(next_text(sse).await.as_deref(), Some("probe"));
    }
    let burst: Vec<u8> = (0..BURST).flat_map(|i| frame(&i.to_string())).collect();
    let writer = std::thread::spawn(move || {
        push.write_all(&burst).unwrap();
        push
    });
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut sse| {
            tokio::spawn(async move {
                let mut next = 0;
                while next < BURST {
                    match next_text(&mut sse).await {
                        Some(text) if text == "probe" => continue,
                        Some(text) => {
                            assert_eq!(text, next.to_string(), "in order, none missing");
                            next += 1;
                        }
                        None => break,
                    }
                }
                next
            })
        })
        .collect();
    for (client, reader) in readers.into_iter().enumerate() {
        let got = reader.await.unwrap();
        assert_eq!(
            got, BURST,
            "client {client} got {got} of the burst's {BURST} messages before its stream ended"
        );
    }
    drop(writer.join().unwrap());
    assert_eq!(
        common::metric(app, "temma_slow_consumer_disconnects_total"),
        Some(0.0),
        "no client was cut as slow"
    );
}

/// Through the web node's SUB socket: the broker is another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_the_broker_reaches_every_client_that_keeps_reading() {
    let _serial = SERIAL.lock().await;
    let dir = common::TempDir::new("burst");
    let (path, pull, publish) = common::standalone_broker_config(&dir, "[broker]\nwatch = false\n");
    let mut broker = common::spawn(&["broker", "-c", path.to_str().unwrap()]);
    broker.wait_for_log("broker running");
    let app = TestApp::start_with(|config| {
        let text = format!(
            r#"
[application]
root = "{root}"
[application.dataSources]
zmq_client_push = "zmq://PUSH@127.0.0.1:{pull}"
zmq_client_sub = "zmq://SUB@127.0.0.1:{publish}"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2
[broker]
embedded = false
[event]
initial_history = 0
"#,
            root = common::manifest_dir().display()
        );
        *config = temma::Config::from_toml(&text, &common::manifest_dir().join("etc/test.toml"))
            .expect("burst test config");
    })
    .await;
    app.ready().await;
    burst_reaches_every_client(&app, pull).await;
    app.stop().await;
}

/// From another node into the embedded broker of this one: its relay hands each frame to this
/// node's clients, and yields to let their writers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_into_the_embedded_broker_reaches_every_client_that_keeps_reading() {
    let _serial = SERIAL.lock().await;
    let config = common::test_config();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let pull = app
        .app()
        .addresses()
        .listening(config.dsn(temma::config::Role::BrokerPull))[0]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    burst_reaches_every_client(&app, pull).await;
    app.stop().await;
}

/// Messages of a burst the subscribers of [`queued_broker`] get.
const QUEUED_BURST: usize = 10_000;

/// A standalone broker whose PUB socket keeps 2,000 messages for each subscriber,
/// `subscribers` SUB sockets that hear it (a probe came through to each), and a raw PUSH
/// peer on its PULL socket.
async fn queued_broker(
    dir: &common::TempDir,
    subscribers: usize,
) -> (common::Running, Vec<zeromq::SubSocket>, TcpStream) {
    use zeromq::{Socket, SocketRecv};
    let (path, pull, publish) =
        common::standalone_broker_config(dir, "[broker]\nwatch = false\nsubscriber_queue = 2000\n");
    let mut broker = common::spawn(&["broker", "-c", path.to_str().unwrap()]);
    broker.wait_for_log("broker running");
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let mut sub = zeromq::SubSocket::new();
        sub.connect(&format!("tcp://127.0.0.1:{publish}"))
            .await
            .unwrap();
        sub.subscribe("").await.unwrap();
        subs.push(sub);
    }
    let mut push = TcpStream::connect(("127.0.0.1", pull)).unwrap();
    push.write_all(&common::zmtp::greeting()).unwrap();
    push.write_all(&common::zmtp::ready("PUSH")).unwrap();
    // Each subscribed once a probe comes through.
    for sub in &mut subs {
        loop {
            push.write_all(&frame("probe")).unwrap();
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await {
                break;
            }
        }
    }
    (broker, subs, push)
}

/// Writes [`QUEUED_BURST`] messages of 4 KB into `push` from a thread (the sockets' buffers and
/// a subscriber's own queue hold a few thousand of them, not the whole burst), and checks that
/// `sub` gets every one, in order, sleeping 10 ms after every `pace` messages (`None`: as fast
/// as it can).
async fn burst_reaches(mut push: TcpStream, sub: &mut zeromq::SubSocket, pace: Option<usize>) {
    use zeromq::SocketRecv;
    let padding = "x".repeat(4000);
    let burst: Vec<u8> = (0..QUEUED_BURST)
        .flat_map(|i| {
            long_frame(format!(r#"{{"from":"burst","text":"{i}","pad":"{padding}"}}"#).as_bytes())
        })
        .collect();
    let writer = std::thread::spawn(move || {
        push.write_all(&burst).unwrap();
        push
    });
    let mut next = 0;
    while next < QUEUED_BURST {
        let message = tokio::time::timeout(common::DEADLINE, sub.recv())
            .await
            .unwrap_or_else(|_| panic!("message {next} of the burst did not come"))
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(message.get(0).unwrap()).unwrap();
        let text = json["text"].as_str().unwrap();
        if text == "probe" {
            continue;
        }
        assert_eq!(text, next.to_string(), "in order, none missing");
        next += 1;
        if pace.is_some_and(|pace| next % pace == 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    drop(writer.join().unwrap());
}

/// A long ZMTP frame (over 255 bytes).
fn long_frame(body: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02];
    frame.extend_from_slice(&(body.len() as u64).to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// A web node that reads, however slowly, is waited for: a burst five times as large as the
/// queue the broker's PUB socket keeps for it (`broker.subscriber_queue`, 2,000 here) reaches
/// it whole, in order, while it reads about 2,000 messages (8 MB) a second, slower than the
/// broker publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_reads_slowly_gets_a_burst_larger_than_its_queue() {
    let _serial = SERIAL.lock().await;
    let dir = common::TempDir::new("slow-subscriber");
    let (_broker, mut subs, push) = queued_broker(&dir, 1).await;
    burst_reaches(push, &mut subs[0], Some(20)).await;
}

/// A web node that takes nothing (stopped, or stuck) is not waited for past
/// `broker::SUBSCRIBER_PROGRESS`: another that reads gets a whole burst larger than the queue
/// the broker keeps for each, while the stuck one's overflows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_takes_nothing_holds_the_others_up_only_briefly() {
    let _serial = SERIAL.lock().await;
    let dir = common::TempDir::new("stuck-subscriber");
    let (_broker, mut subs, push) = queued_broker(&dir, 2).await;
    let mut reader = subs.pop().unwrap();
    // The other reads nothing from here on.
    let _stuck = subs.pop().unwrap();
    burst_reaches(push, &mut reader, None).await;
}
