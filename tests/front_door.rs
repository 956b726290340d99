//! The broker's ZeroMQ ports as an attacker sees them: raw TCP that speaks just enough ZMTP to
//! announce a huge frame, peers that never finish their handshake, random bytes and frame
//! headers, peers that flood (messages, subscriptions). The process must live (in-process: an allocation failure would abort this test
//! binary), disconnect the offender, count it, and keep relaying for everyone else.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::zmtp::{greeting, ready};
use common::{Sse, TestApp};
use temma::config::Role;

/// A long frame header announcing `length` bytes.
fn long_header(length: u64) -> Vec<u8> {
    let mut header = vec![0x02];
    header.extend_from_slice(&length.to_be_bytes());
    header
}

fn tcp_address(app: &TestApp, config: &temma::Config, role: Role) -> String {
    app.app().addresses().listening(config.dsn(role))[0]
        .trim_start_matches("tcp://")
        .to_owned()
}

/// Completes the handshake as `socket_type`, sends `then`, and returns how the connection
/// ended: `true` when the server closed it within the deadline.
fn closed_after(address: &str, socket_type: &str, then: &[u8]) -> bool {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    stream.write_all(&greeting()).unwrap();
    stream.write_all(&ready(socket_type)).unwrap();
    let _ = stream.write_all(then);
    let deadline = Instant::now() + common::DEADLINE;
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

async fn relays(app: &TestApp, sse: &mut Sse, text: &str) {
    assert_eq!(app.post_form("check", text).await.status(), 200, "{text}");
    assert_eq!(sse.next_message().await.json()["text"], text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_header_claiming_petabytes_disconnects_the_peer_only() {
    let config = common::test_config();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let mut sse = app.sse().await;
    let pull = tcp_address(&app, &config, Role::BrokerPull);
    let publish = tcp_address(&app, &config, Role::BrokerPub);
    for (address, socket_type, claim) in [
        (&pull, "PUSH", 1u64 << 47),
        (&pull, "PUSH", 1u64 << 36),
        (&pull, "PUSH", 300 << 20),
        // Just over `broker.max_frame_bytes`.
        (&pull, "PUSH", 64 * 1024 + 1),
        (&publish, "SUB", 1u64 << 47),
    ] {
        let (address, socket_type) = (address.clone(), socket_type.to_owned());
        let closed = tokio::task::spawn_blocking(move || {
            closed_after(&address, &socket_type, &long_header(claim))
        })
        .await
        .unwrap();
        assert!(closed, "a {claim}-byte claim is cut off at once");
        relays(&app, &mut sse, &format!("after a {claim}-byte claim")).await;
    }
    // The peers are gone: none remain (the web node of this process is served by its embedded
    // broker in the process, without sockets).
    common::eventually("peers counted back down", || async {
        let pull = common::metric(&app, "temma_zmq_peers{socket=\"broker.pull\"}")?;
        let publish = common::metric(&app, "temma_zmq_peers{socket=\"broker.pub\"}")?;
        (pull == 0.0 && publish == 0.0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_completes_its_handshake_is_dropped_and_counted() {
    let config = common::test_config();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let pull = tcp_address(&app, &config, Role::BrokerPull);
    // Eight silent connections, and eight that stop after the greeting.
    let idle: Vec<TcpStream> = (0..16)
        .map(|i| {
            let mut stream = TcpStream::connect(&pull).unwrap();
            if i % 2 == 1 {
                stream.write_all(&greeting()).unwrap();
            }
            stream
        })
        .collect();
    let started = Instant::now();
    let all_closed = tokio::task::spawn_blocking(move || {
        idle.into_iter().all(|mut stream| {
            stream
                .set_read_timeout(Some(temma::socket::HANDSHAKE_TIMEOUT * 2))
                .unwrap();
            let mut buffer = [0u8; 256];
            loop {
                match stream.read(&mut buffer) {
                    Ok(0) => return true,
                    Ok(_) => continue, // the server's own greeting
                    Err(error) => return error.kind() == std::io::ErrorKind::ConnectionReset,
                }
            }
        })
    })
    .await
    .unwrap();
    assert!(all_closed, "every idle peer was disconnected");
    assert!(started.elapsed() >= temma::socket::HANDSHAKE_TIMEOUT - Duration::from_secs(1));
    // The count follows the close: the socket's monitor reports it a moment later.
    common::eventually("16 peers counted as refused", || async {
        let refused = common::metric(
            &app,
            "temma_zmq_peers_refused_total{socket=\"broker.pull\"}",
        )?;
        (refused == 16.0).then_some(())
    })
    .await;
    let mut sse = app.sse().await;
    relays(&app, &mut sse, "still relaying").await;
    app.stop().await;
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    /// What one hostile peer sends.
    #[derive(Debug, Clone)]
    enum Input {
        /// Bytes from the first one.
        Raw(Vec<u8>),
        /// A valid handshake, then random frame headers with random bodies.
        Frames(Vec<(u8, u64, Vec<u8>)>),
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Input::Raw),
            proptest::collection::vec(
                (
                    any::<u8>(),
                    prop_oneof![0u64..300, any::<u64>()],
                    proptest::collection::vec(any::<u8>(), 0..64)
                ),
                1..6
            )
            .prop_map(Input::Frames),
        ]
    }

    fn send(address: &str, input: &Input) {
        // Bounded waits: a broker that stops accepting fails the test instead of hanging it.
        let address: std::net::SocketAddr = address.parse().unwrap();
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(2)) else {
            return;
        };
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let bytes = match input {
            Input::Raw(bytes) => bytes.clone(),
            Input::Frames(frames) => {
                let mut bytes = greeting();
                bytes.extend_from_slice(&ready("PUSH"));
                for (flags, length, body) in frames {
                    bytes.push(*flags);
                    if flags & 0x02 != 0 {
                        bytes.extend_from_slice(&length.to_be_bytes());
                    } else {
                        bytes.push(*length as u8);
                    }
                    bytes.extend_from_slice(body);
                }
                bytes
            }
        };
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let _ = stream.read(&mut [0u8; 256]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_bytes_and_frame_headers_never_stop_the_broker() {
        let config = common::test_config();
        let app = TestApp::start_config(&config).await;
        app.ready().await;
        let mut sse = app.sse().await;
        let pull = tcp_address(&app, &config, Role::BrokerPull);
        let inputs: Vec<Input> = {
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            (0..200)
                .map(|_| input().new_tree(&mut runner).unwrap().current())
                .collect()
        };
        for chunk in inputs.chunks(50) {
            let chunk = chunk.to_vec();
            let address = pull.clone();
            let sent = tokio::task::spawn_blocking(move || {
                for input in &chunk {
                    send(&address, input);
                }
            });
            tokio::time::timeout(common::DEADLINE * 3, sent)
                .await
                .expect("the broker's PULL port kept accepting hostile peers")
                .unwrap();
            tokio::time::timeout(
                common::DEADLINE,
                relays(&app, &mut sse, "between hostile peers"),
            )
            .await
            .expect("a message relayed between hostile peers");
        }
        app.stop().await;
    }
}

/// Two peers flooding the broker's PULL socket at once are read in turns, each in its order,
/// nothing lost: neither waits for the other's flood to end. The peers write raw ZMTP as fast
/// as the kernel takes it, so a flood's socket is never empty; the second starts while the
/// broker is busy with the first. It takes the relay's yield (`consume_budget` in
/// `Broker::run`: the runtime must look at the second socket at all) and a fair queue that reads on from a peer
/// only while it is the only one ready (vendor/zeromq/PATCHES.md, 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_flooding_peers_are_read_in_turns() {
    use zeromq::{Socket, SocketRecv, SubSocket};
    const EACH: usize = 20_000;
    let config = common::test_config();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let pull = tcp_address(&app, &config, Role::BrokerPull);
    let publish = format!("tcp://{}", tcp_address(&app, &config, Role::BrokerPub));
    let mut sub = SubSocket::new();
    sub.subscribe("").await.unwrap();
    sub.connect(&publish).await.unwrap();
    let frame = |peer: usize, text: &str| common::zmtp::message(&format!("flood{peer}"), text);
    let mut peers: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = TcpStream::connect(&pull).unwrap();
            stream.write_all(&greeting()).unwrap();
            stream.write_all(&ready("PUSH")).unwrap();
            stream
        })
        .collect();
    // The subscription reached the PUB socket: a probe comes back.
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "no probe came back");
        peers[0].write_all(&frame(0, "probe")).unwrap();
        match tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            Ok(Ok(message)) if text_of(&message) == "probe" => break,
            _ => {}
        }
    }
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {}
    let floods: Vec<Vec<u8>> = (0..2)
        .map(|peer| {
            (0..EACH)
                .flat_map(|i| frame(peer, &format!("{peer} {i}")))
                .collect()
        })
        .collect();
    // The first floods; the second starts once the broker is busy with the first (it must
    // then notice the second socket's readiness while it always has a message to read).
    let mut writers = Vec::new();
    let mut floods = peers.into_iter().zip(floods);
    let mut write = |(mut stream, bytes): (TcpStream, Vec<u8>)| {
        writers.push(std::thread::spawn(move || {
            stream.write_all(&bytes).unwrap();
            stream
        }));
    };
    write(floods.next().unwrap());
    // What the broker publishes, in its order.
    let mut senders = Vec::new();
    let mut next = [0usize; 2];
    while senders.len() < 2 * EACH {
        if senders.len() == 100 {
            write(floods.next().unwrap());
        }
        let message = tokio::time::timeout(common::DEADLINE, sub.recv())
            .await
            .expect("the broker keeps publishing")
            .unwrap();
        let text = text_of(&message);
        let (peer, i) = text.split_once(' ').expect("a flood message");
        let (peer, i): (usize, usize) = (peer.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[peer], "peer {peer}'s messages in order, none lost");
        next[peer] += 1;
        senders.push(peer);
    }
    for writer in writers {
        drop(writer.join().unwrap());
    }
    // The second was heard soon after it started writing, and from then on in turns while
    // both had some to come: a peer read to its end before the other would be a run of
    // ≈ EACH. Turns are at most 64 messages while the other peer is ready (tested one by one
    // in the crate, `fair_queue.rs`).
    let first_of = |peer: usize| senders.iter().position(|&p| p == peer).unwrap();
    let last_of = |peer: usize| senders.iter().rposition(|&p| p == peer).unwrap();
    let (both_from, both_until) = (first_of(0).max(first_of(1)), last_of(0).min(last_of(1)));
    assert!(
        both_from <= EACH / 4,
        "the second peer was first heard after {both_from} of the first's messages"
    );
    let longest = senders[both_from..=both_until]
        .chunk_by(|a, b| a == b)
        .map(<[usize]>::len)
        .max()
        .unwrap();
    assert!(
        longest <= EACH / 10,
        "one peer had {longest} messages in a row while the other waited"
    );
    app.stop().await;
}

/// A SUB socket on the broker's PUB, subscribed to everything, that has seen a message come.
async fn subscriber(app: &TestApp, publish: &str) -> zeromq::SubSocket {
    use zeromq::{Socket, SocketRecv};
    let mut sub = zeromq::SubSocket::new();
    sub.subscribe("").await.unwrap();
    sub.connect(&format!("tcp://{publish}")).await.unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "no message came on the PUB socket"
        );
        assert_eq!(app.post_form("probe", "probe").await.status(), 200);
        if let Ok(received) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            received.unwrap();
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await
            {
            }
            return sub;
        }
    }
}

/// The text of a published message (empty when it has none).
fn text_of(message: &zeromq::ZmqMessage) -> String {
    let frame = message.iter().last().expect("a frame");
    let value: serde_json::Value = serde_json::from_slice(frame).expect("JSON");
    value["text"].as_str().unwrap_or_default().to_owned()
}

/// The text of the next message published on `sub`.
async fn next_text(sub: &mut zeromq::SubSocket) -> String {
    use zeromq::SocketRecv;
    let message = tokio::time::timeout(common::DEADLINE, sub.recv())
        .await
        .expect("a message published")
        .unwrap();
    text_of(&message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_subscribes_without_end_is_disconnected() {
    // Each subscription was kept (and compared with every message published) until
    // cancelled: 2,000,000 of them took 100 MB and cut the broker's rate from 280,000 to 168
    // messages a second. Past temma::socket::MAX_SUBSCRIPTIONS, the peer is cut off.
    let config = common::test_config();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let publish = tcp_address(&app, &config, Role::BrokerPub);
    let mut sub = subscriber(&app, &publish).await;
    let flood: Vec<u8> = (0..100_000)
        .flat_map(|i| common::zmtp::subscription(true, &format!("{i:08}")))
        .collect();
    let address = publish.clone();
    let closed = tokio::task::spawn_blocking(move || closed_after(&address, "SUB", &flood))
        .await
        .unwrap();
    assert!(closed, "a peer subscribing without end is cut off");
    // A peer at the limit keeps its place.
    let mut at_limit = TcpStream::connect(&publish).unwrap();
    at_limit.write_all(&greeting()).unwrap();
    at_limit.write_all(&ready("SUB")).unwrap();
    for i in 0..temma::socket::MAX_SUBSCRIPTIONS - 1 {
        at_limit
            .write_all(&common::zmtp::subscription(true, &format!("{i}")))
            .unwrap();
    }
    at_limit
        .write_all(&common::zmtp::subscription(true, ""))
        .unwrap();
    // Others are served as before, and the peer at the limit too (once its subscriptions
    // are read: until then it gets nothing).
    assert_eq!(app.post_form("check", "after").await.status(), 200);
    assert_eq!(next_text(&mut sub).await, "after");
    at_limit
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + common::DEADLINE;
    let mut buffer = [0u8; 4096];
    let mut read = Vec::new();
    while !read.windows(5).any(|w| w == b"after") {
        assert!(
            Instant::now() < deadline,
            "the peer at the limit got nothing"
        );
        assert_eq!(app.post_form("check", "after").await.status(), 200);
        match at_limit.read(&mut buffer) {
            Ok(n) => {
                assert!(n > 0, "the peer at the limit was disconnected");
                read.extend_from_slice(&buffer[..n]);
            }
            Err(error) => assert!(
                matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "the peer at the limit was disconnected: {error}"
            ),
        }
    }
    common::eventually("one peer cut, the others kept", || async {
        let publish = common::metric(&app, "temma_zmq_peers{socket=\"broker.pub\"}")?;
        (publish == 2.0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_flood_of_subscriptions_does_not_stall_the_broker() {
    // A peer that subscribes and cancels faster than the PUB socket reads (staying under the
    // limit) keeps the crate's task that reads it always busy: on one thread (a one-CPU
    // machine), the broker must still publish meanwhile.
    let config = common::test_config();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let publish = tcp_address(&app, &config, Role::BrokerPub);
    let mut sub = subscriber(&app, &publish).await;
    let mut stream = TcpStream::connect(&publish).unwrap();
    stream.set_write_timeout(Some(common::DEADLINE)).unwrap();
    stream.write_all(&greeting()).unwrap();
    stream.write_all(&ready("SUB")).unwrap();
    // About 24 MB: far more than the kernel buffers, so the writer is still writing while
    // the broker reads.
    let pair = [
        common::zmtp::subscription(true, "flood"),
        common::zmtp::subscription(false, "flood"),
    ]
    .concat();
    let chunk = pair.repeat(20_000);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..100 {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    // Once the flood is being read, a message is published before it ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(app.post_form("check", "during").await.status(), 200);
    assert_eq!(next_text(&mut sub).await, "during");
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "the message came only once the whole flood was written"
    );
    writer.join().unwrap();
    app.stop().await;
}
