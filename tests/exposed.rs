//! Safe to expose: one regression test per attack of the adversarial run (the ZeroMQ front
//! door is in `front_door.rs`), each over real sockets against a running server.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Sse, TempDir, TestApp, eventually, ports_config, spawn};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or resets) the connection; `None` if it is still open after
/// `limit`. Returns what was read.
async fn read_until_closed(socket: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    tokio::time::timeout(limit, async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| seen)
}

/// Reads until `needle` has arrived; returns everything read.
async fn read_until(socket: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    let needle = needle.as_bytes();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let n = socket.read(&mut buffer).await.unwrap();
            assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(needle));
            // Only the new bytes (and what a needle could straddle) need searching.
            let from = seen.len().saturating_sub(needle.len());
            seen.extend_from_slice(&buffer[..n]);
            if memchr::memmem::find(&seen[from..], needle).is_some() {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no {:?} in {}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&seen)
        )
    });
    String::from_utf8_lossy(&seen).into_owned()
}

/// Opens an SSE stream on a raw connection: as its first request (served directly), or after
/// a `GET /health` on the same connection (`kept_alive`: served by hyper). Reads until `until`.
async fn open_sse(address: std::net::SocketAddr, kept_alive: bool, until: &str) -> TcpStream {
    let mut socket = TcpStream::connect(address).await.unwrap();
    if kept_alive {
        socket
            .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut socket, "\"status\"").await;
    }
    socket
        .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut socket, until).await;
    socket
}

async fn sse_request(app: &TestApp) -> TcpStream {
    let mut socket = TcpStream::connect(app.http).await.unwrap();
    socket
        .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    socket
}

fn metric(app: &TestApp, line_start: &str) -> f64 {
    common::metric(app, line_start).unwrap_or(0.0)
}

async fn clients_drop_to(app: &TestApp, count: i64) {
    let metrics = app.app().metrics().clone();
    eventually(&format!("{count} SSE clients"), || {
        let metrics = metrics.clone();
        async move { (metrics.sse_clients.get() == count).then_some(()) }
    })
    .await;
}

fn json_post(app: &TestApp, body: Value) -> reqwest::RequestBuilder {
    app.client
        .post(app.url("/message/broadcast"))
        .header("content-type", "application/json")
        .body(body.to_string())
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

// 2. An idle SSE client's memory does not depend on the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_cost_the_same_whatever_the_history_holds() {
    let dir = TempDir::new("memory");
    let (path, port) = ports_config(&dir, true);
    let extra = "history_size = 50\ninitial_history = 50\n";
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("initial_history = 0\n", extra);
    std::fs::write(&path, text).unwrap();
    let mut server = spawn(&["serve", "-c", path.to_str().unwrap()]);
    server.wait_for_log("listening on http://");
    let pid = server.0.id();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    // 50 messages of 2,000 emoji: 8 KB each, 400 KB of history.
    let big = "😀".repeat(1990);
    eventually("the first message published", || async {
        let response = client
            .post(format!("{url}/message/broadcast"))
            .json(&serde_json::json!({"from": "fill", "text": "first"}))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    for i in 0..49 {
        let response = client
            .post(format!("{url}/message/broadcast"))
            .json(&serde_json::json!({"from": "fill", "text": format!("{i} {big}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Each client gets the whole replay (the newest message ends it), then stays idle.
    let open = |kept_alive: bool| open_sse(address, kept_alive, "\"text\":\"48 ");
    // Warm the allocator and the runtime first.
    let mut sockets = Vec::new();
    for _ in 0..100 {
        sockets.push(open(false).await);
    }
    let before = rss_kib(pid);
    for batch in 0..20 {
        let opened = futures_util::future::join_all((0..100).map(|_| open(false))).await;
        sockets.extend(opened);
        let _ = batch;
    }
    let direct_kib = (rss_kib(pid) - before.min(rss_kib(pid))) as f64 / 2000.0;
    assert!(
        direct_kib < 16.0,
        "{direct_kib:.1} KiB per idle client on the direct path"
    );
    // Served by hyper (a connection that asked for something else first): hyper's own
    // buffers, but no replay kept.
    let before = rss_kib(pid);
    for _ in 0..200 {
        sockets.push(open(true).await);
    }
    let hyper_kib = (rss_kib(pid) - before.min(rss_kib(pid))) as f64 / 200.0;
    assert!(
        hyper_kib < 64.0,
        "{hyper_kib:.1} KiB per idle client on the hyper path (the replay is 400 KB)"
    );
    eprintln!("KiB per idle client: direct {direct_kib:.2}, hyper {hyper_kib:.2}");
    drop(sockets);
}

/// An SSE client with a 1 KiB receive window that never reads.
async fn never_reading(app: &TestApp) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let mut stream = socket.connect(app.http).await.unwrap();
    stream
        .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    stream
}

// 3. A client that never reads its first write is cut off, frees its place, and does not hold
// shutdown up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_its_place_freed() {
    let app = TestApp::start_with(|config| {
        config.server.socket_send_buffer_bytes = 4096;
        config.server.write_stall_timeout_secs = 1;
        config.event.history_size = 50;
        config.event.initial_history = 50;
        config.event.max_clients = 3;
    })
    .await;
    app.ready().await;
    let big = "x".repeat(1900);
    for i in 0..50 {
        assert_eq!(
            app.post_form("fill", &format!("{i} {big}")).await.status(),
            200
        );
    }
    // Three clients with a tiny receive window that never read.
    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(never_reading(&app).await);
    }
    eventually("the stuck clients cut off", || async {
        (metric(&app, "temma_sse_write_stalls_total") >= 3.0).then_some(())
    })
    .await;
    clients_drop_to(&app, 0).await;
    // Their places are free again.
    let sse = app.sse().await;
    assert_eq!(sse.status, 200);
    drop(sse);
    // Stuck again, then shutdown: the server stops at once, not after a grace period.
    let mut stuck_again = Vec::new();
    for _ in 0..2 {
        stuck_again.push(never_reading(&app).await);
    }
    clients_drop_to(&app, 2).await;
    let started = Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop((stuck, stuck_again));
}

// 4. Slow heads and bodies: one deadline for the whole of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_bodies_are_cut_at_their_deadline() {
    let app = TestApp::start_with(|config| {
        config.server.head_timeout_secs = 1;
        config.server.body_timeout_secs = 1;
    })
    .await;
    app.ready().await;
    // A head that trickles one byte every 300 ms: under a per-read timeout it would live
    // forever.
    let started = Instant::now();
    let mut trickle = TcpStream::connect(app.http).await.unwrap();
    let head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_at = None;
    for byte in head {
        if trickle.write_all(&[*byte]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), trickle.read(&mut probe)).await
        {
            let answer = String::from_utf8_lossy(&probe[..n]).into_owned();
            assert!(answer.contains("408") || n == 0, "{answer}");
            closed_at = Some(started.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("the trickling head was cut off");
    assert!(closed_at < Duration::from_millis(2500), "{closed_at:?}");
    assert!(
        metric(
            &app,
            "temma_connections_refused_total{reason=\"HeadTimeout\"}"
        ) >= 1.0
    );

    // A POST whose body never comes, and a chunked body at one byte every 300 ms.
    for (head, trickle_body) in [
        (
            "POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n",
            false,
        ),
        (
            "POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
        ),
    ] {
        let started = Instant::now();
        let mut socket = TcpStream::connect(app.http).await.unwrap();
        socket.write_all(head.as_bytes()).await.unwrap();
        let answer = if trickle_body {
            let mut answer = String::new();
            for _ in 0..20 {
                if socket.write_all(b"1\r\na\r\n").await.is_err() {
                    break;
                }
                let mut probe = [0u8; 1024];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(300), socket.read(&mut probe)).await
                {
                    answer = String::from_utf8_lossy(&probe[..n]).into_owned();
                    break;
                }
            }
            answer
        } else {
            read_until(&mut socket, "}").await
        };
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("did not arrive within 1 s"), "{answer}");
        assert!(started.elapsed() < Duration::from_millis(2500));
    }

    // A kept-alive connection that never sends its next request is closed too.
    let mut idle = TcpStream::connect(app.http).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut idle, "\"status\"").await;
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(4))
            .await
            .is_some(),
        "an idle kept-alive connection is closed after the head timeout"
    );
    app.stop().await;
}

// 5. Connection caps, in the process and at the descriptor limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_caps_get_a_quick_503() {
    let app = TestApp::start_with(|config| {
        config.server.max_pending_heads = 4;
        config.server.max_connections = 8;
    })
    .await;
    app.ready().await;
    let mut sse = app.sse().await;
    let pending = || metric(&app, "temma_pending_heads ");
    // Four connections that send nothing fill the pending-head cap.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(app.http).await.unwrap());
    }
    eventually("four pending heads", || async {
        (pending() == 4.0).then_some(())
    })
    .await;
    let mut refused = TcpStream::connect(app.http).await.unwrap();
    let answer = read_until_closed(&mut refused, Duration::from_secs(2))
        .await
        .expect("refused at once");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("still sending their request"), "{answer}");
    drop(silent);
    eventually("the silent connections gone", || async {
        (pending() == 0.0).then_some(())
    })
    .await;
    // Open SSE streams until `max_connections` refuses one.
    let mut streams = Vec::new();
    let answer = loop {
        assert!(streams.len() < 8, "max_connections never refused");
        let mut socket = sse_request(&app).await;
        let head = read_until_closed(&mut socket, Duration::from_millis(300)).await;
        match head {
            Some(answer) => break String::from_utf8_lossy(&answer).into_owned(),
            None => streams.push(socket),
        }
    };
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(metric(&app, "temma_connections "), 8.0);
    assert!(answer.contains("too many connections"), "{answer}");
    assert!(
        metric(
            &app,
            "temma_connections_refused_total{reason=\"MaxConnections\"}"
        ) >= 1.0
    );
    // The clients already connected are served all along.
    let poster = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    drop(streams.pop());
    eventually("a place for the POST", || async {
        let response = poster
            .post(app.url("/message/broadcast"))
            .form(&[("from", "a"), ("text", "served")])
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert_eq!(sse.next_message().await.json()["text"], "served");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_is_met_calmly() {
    let dir = TempDir::new("descriptors");
    let (path, port) = ports_config(&dir, true);
    // A low descriptor limit: `server.max_connections` (default 16384) is fitted to it.
    let mut server = common::spawn_shell(&format!(
        "ulimit -n 320 && exec {} serve -c {}",
        common::TEMMA,
        path.display()
    ));
    let lowered = server.wait_for_log("lowered to fit the descriptor limit");
    assert!(lowered.contains("used=64"), "{lowered}");
    server.wait_for_log("listening on http://");
    let pid = server.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually("the web node ready", || async {
        let response = client
            .post(format!("{base}/message/broadcast"))
            .form(&[("from", "a"), ("text", "warm-up")])
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let mut sse = Sse::connect(&client, &format!("{base}/event/fetch"), None).await;
    // Far more connections than the process may hold.
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..400 {
        if let Ok(socket) = TcpStream::connect(address).await {
            held.push(socket);
        }
    }
    let cpu_before = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_secs(pid) - cpu_before;
    assert!(cpu < 0.5, "{cpu:.2} s of CPU in 2 s while flooded");
    // The stream already open still works, and service resumes once the flood lets go.
    drop(held);
    eventually("service back after the flood", || async {
        let response = client
            .post(format!("{base}/message/broadcast"))
            .form(&[("from", "a"), ("text", "after the flood")])
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    loop {
        if sse.next_message().await.json()["text"] == "after the flood" {
            break;
        }
    }
}

// 6. Bytes after the SSE request close the connection instead of burning a core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_the_sse_request_close_the_connection() {
    let app = TestApp::start().await;
    app.ready().await;
    for kept_alive in [false, true] {
        let mut socket = open_sse(app.http, kept_alive, ": ok").await;
        let junk = vec![b'x'; 64 * 1024];
        let started = Instant::now();
        let mut closed = false;
        while started.elapsed() < Duration::from_secs(5) {
            if socket.write_all(&junk).await.is_err() {
                closed = true;
                break;
            }
            let mut probe = [0u8; 1024];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(50), socket.read(&mut probe)).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "kept alive: {kept_alive}");
    }
    clients_drop_to(&app, 0).await;
    app.stop().await;
}

// 7. Cross-site form posts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_are_refused_unless_listed() {
    for cors in [vec![], vec!["https://chat.example".to_owned()]] {
        let listed = !cors.is_empty();
        let app = TestApp::start_with(move |config| config.server.cors_origins = cors).await;
        app.ready().await;
        let post = |headers: &[(&str, &str)]| {
            let mut request = app
                .client
                .post(app.url("/message/broadcast"))
                .form(&[("from", "a"), ("text", "b")]);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.send()
        };
        let evil = post(&[("origin", "http://evil.example")]).await.unwrap();
        assert_eq!(evil.status(), 403);
        let error: Value = evil.json().await.unwrap();
        assert!(
            error["error"]
                .as_str()
                .unwrap()
                .contains("origin `http://evil.example` may not post here"),
            "{error}"
        );
        let cross = post(&[
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ])
        .await
        .unwrap();
        assert_eq!(cross.status(), 403);
        let own = format!("http://{}", app.http);
        assert_eq!(post(&[("origin", &own)]).await.unwrap().status(), 200);
        assert_eq!(
            post(&[("origin", &own), ("sec-fetch-site", "same-origin")])
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(post(&[]).await.unwrap().status(), 200, "not a browser");
        let from_listed = post(&[
            ("origin", "https://chat.example"),
            ("sec-fetch-site", "cross-site"),
        ])
        .await
        .unwrap();
        assert_eq!(from_listed.status(), if listed { 200 } else { 403 });
        app.stop().await;
    }
}

// 8. Forged acknowledgements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_secret_and_only_the_broker_writes_notices() {
    let dir = TempDir::new("forged");
    let sets_reject = dir.0.join("sets_reject.rhai");
    std::fs::write(
        &sets_reject,
        "fn on_message(msg) { if msg.text == \"set\" { msg.reject = msg.ref; msg.published = \"x\"; msg.client = \"ip:1.2.3.4\"; } msg }\n",
    )
    .unwrap();
    let commands = common::manifest_dir().join("scripts/commands.rhai");
    let config = {
        let mut config = common::test_config();
        for file in [commands, sets_reject] {
            config.broker.scripts.push(temma::script::ScriptConfig {
                file,
                params: Default::default(),
                name: None,
                on_error: None,
            });
        }
        config.validate().unwrap();
        config
    };
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let mut sse = app.sse().await;
    // A script that sets the notice keys does not turn a message into a refusal.
    assert_eq!(app.post_form("a", "set").await.status(), 200);
    let event = sse.next_message().await;
    for key in ["reject", "published", "ref", "client"] {
        assert!(event.json().get(key).is_none(), "{key} in {}", event.data);
    }
    // An attacker on the ZeroMQ network sees published references (SUB on the broker's PUB)
    // and pushes refusals for what it guesses the next ones are.
    let publish = app
        .app()
        .addresses()
        .listening(config.dsn(temma::config::Role::BrokerPub))[0]
        .clone();
    let pull = app
        .app()
        .addresses()
        .listening(config.dsn(temma::config::Role::BrokerPull))[0]
        .clone();
    use zeromq::{Socket, SocketRecv, SocketSend};
    let mut spy = zeromq::SubSocket::new();
    spy.subscribe("").await.unwrap();
    spy.connect(&publish).await.unwrap();
    let mut forger = zeromq::PushSocket::new();
    forger.connect(&pull).await.unwrap();
    let started = Instant::now();
    let observed = loop {
        assert!(
            started.elapsed() < DEADLINE,
            "no reference seen on the PUB socket"
        );
        let _ = app.post_form("victim", "seen").await;
        let Ok(Ok(frame)) = tokio::time::timeout(Duration::from_millis(200), spy.recv()).await
        else {
            continue;
        };
        let value: Value = serde_json::from_slice(frame.get(0).unwrap()).unwrap();
        if let Some(reference) = value["ref"].as_str() {
            break reference.to_owned();
        }
    };
    let (node, secret) = observed.rsplit_once('-').unwrap();
    let secret = u128::from_str_radix(secret, 16).unwrap();
    let victims = {
        let client = app.client.clone();
        let url = app.url("/message/broadcast");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..40 {
                let response = client
                    .post(&url)
                    .form(&[("from", format!("victim{i}")), ("text", format!("v{i}"))])
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        })
    };
    for step in 1..=200u128 {
        let guess = format!("{node}-{:032x}", secret.wrapping_add(step));
        let frame = serde_json::json!({"ref": guess, "from": "x", "text": "/bogus"}).to_string();
        forger.send(frame.into()).await.unwrap();
    }
    let statuses = victims.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // And no SSE frame carries a reference, on either path.
    assert!(!String::from_utf8_lossy(&sse.raw).contains("\"ref\""));
    app.stop().await;
}

// 9. A retry after a 503 with the same key is not published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_is_published_once() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    let keyed = |key: &str, text: &str| {
        app.client
            .post(app.url("/message/broadcast"))
            .header("idempotency-key", key)
            .form(&[("from", "a"), ("text", text)])
            .send()
    };
    assert_eq!(keyed("k-1", "once").await.unwrap().status(), 200);
    assert_eq!(keyed("k-1", "once").await.unwrap().status(), 200);
    let as_field = json_post(
        &app,
        serde_json::json!({"from":"a","text":"once","key":"k-1"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(as_field.status(), 200);
    assert_eq!(keyed("k-2", "twice").await.unwrap().status(), 200);
    assert_eq!(sse.texts(2).await, ["once", "twice"]);
    let conflict = app
        .client
        .post(app.url("/message/broadcast"))
        .header("idempotency-key", "k-3")
        .form(&[("from", "a"), ("text", "b"), ("key", "k-4")])
        .send()
        .await
        .unwrap();
    assert_eq!(conflict.status(), 400);
    let bad = keyed("not a key!", "x").await.unwrap();
    assert_eq!(bad.status(), 400);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_publish_then_a_retry_makes_one_message() {
    let dir = TempDir::new("late");
    let (path, _) = ports_config(&dir, false);
    let mut broker = spawn(&["broker", "-c", path.to_str().unwrap()]);
    broker.wait_for_log("broker running");
    let mut config = temma::Config::load(&path).unwrap();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.message.publish_timeout_ms = 400;
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    let mut sse = app.sse().await;
    let keyed = || {
        app.client
            .post(app.url("/message/broadcast"))
            .header("idempotency-key", "late-1")
            .form(&[("from", "a"), ("text", "late")])
            .send()
    };
    broker.signal("STOP");
    let first = keyed().await.unwrap();
    assert_eq!(first.status(), 503);
    let error: Value = first.json().await.unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("may still appear"),
        "{error}"
    );
    broker.signal("CONT");
    assert_eq!(sse.texts(1).await, ["late"], "published late");
    assert_eq!(
        keyed().await.unwrap().status(),
        200,
        "the retry is confirmed"
    );
    assert_eq!(app.post_form("a", "next").await.status(), 200);
    assert_eq!(sse.texts(1).await, ["next"], "and not published twice");
    app.stop().await;
}

// 10. Run ids are epochs: compared for equality, never for order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_run_with_a_lower_number_is_a_new_epoch() {
    let port = common::free_port();
    let mut fake = {
        use zeromq::Socket;
        let mut socket = zeromq::PubSocket::new();
        socket
            .bind(&format!("tcp://127.0.0.1:{port}"))
            .await
            .unwrap();
        socket
    };
    let app = TestApp::start_with(move |config| {
        config.application.data_sources.insert(
            "zmq_client_sub".into(),
            format!("zmq://SUB@127.0.0.1:{port}").parse().unwrap(),
        );
    })
    .await;
    let mut live = app.sse().await;
    use zeromq::SocketSend;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "the web node never subscribed"
        );
        let probe = serde_json::json!({"from": "p", "text": "probe"}).to_string();
        fake.send(probe.into()).await.unwrap();
        if let Ok(Some(event)) = live.next_within(Duration::from_millis(100)).await
            && event.event.as_deref() == Some("msg")
        {
            break;
        }
    }
    let frame = |id: &str| {
        serde_json::json!({"from": "b", "text": id, "id": id, "time": 1})
            .to_string()
            .into()
    };
    for id in ["2000-1", "2000-2", "2000-3", "1000-1", "1000-2", "1000-3"] {
        fake.send(frame(id)).await.unwrap();
    }
    let mut texts = Vec::new();
    while texts.len() < 6 {
        let event = live.next_message().await;
        if event.json()["text"] != "probe" {
            texts.push(event.json()["text"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        texts,
        ["2000-1", "2000-2", "2000-3", "1000-1", "1000-2", "1000-3"]
    );
    let url = app.url("/event/fetch");
    let resume = |id: &'static str| Sse::connect(&app.client, &url, Some(id));
    let mut back = resume("1000-1").await;
    assert_eq!(
        back.texts(2).await,
        ["1000-2", "1000-3"],
        "the new epoch is replayed"
    );
    let mut across = resume("2000-2").await;
    assert_eq!(
        across.texts(4).await,
        ["2000-3", "1000-1", "1000-2", "1000-3"],
        "across epochs"
    );
    for (id, reason) in [
        ("5-1", "does not know"),
        ("1000-99999", "ahead of every message"),
        ("garbage", "not a message id"),
    ] {
        let mut reset = resume(id).await;
        let first = loop {
            let event = reset.next().await.unwrap();
            if event.event.is_some() {
                break event;
            }
        };
        assert_eq!(first.event.as_deref(), Some("reset"), "{id}");
        assert!(first.data.contains(reason), "{id}: {}", first.data);
    }
    // Up to date: nothing replayed, the next live message arrives.
    let mut current = resume("1000-3").await;
    fake.send(frame("1000-4")).await.unwrap();
    assert_eq!(current.texts(1).await, ["1000-4"]);
    app.stop().await;
}

// 11. Ghost subscriptions on connections hyper serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_ends_its_subscription_on_both_paths() {
    let app = TestApp::start_with(|config| {
        config.event.keepalive_secs = 0;
        config.event.max_clients = 5;
    })
    .await;
    app.ready().await;
    for round in 0..3 {
        // Pipelined between two other requests (the last stays in hyper's buffer, so hyper
        // never reads the socket again), then closed.
        for _ in 0..5 {
            let mut socket = TcpStream::connect(app.http).await.unwrap();
            socket
                .write_all(
                    b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n",
                )
                .await
                .unwrap();
            if round == 0 {
                read_until(&mut socket, ": ok").await;
            }
            drop(socket);
        }
        clients_drop_to(&app, 0).await;
    }
    // Kept alive, then the SSE request, then closed.
    for _ in 0..5 {
        drop(open_sse(app.http, true, ": ok").await);
    }
    clients_drop_to(&app, 0).await;
    // Every place is free.
    let mut full = Vec::new();
    for _ in 0..5 {
        let sse = app.sse().await;
        assert_eq!(sse.status, 200);
        full.push(sse);
    }
    app.stop().await;
}

// 12. Lookalike names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_characters_cannot_fake_a_name_or_a_message() {
    let app = TestApp::start().await;
    app.ready().await;
    for (from, text, needle) in [
        ("victim_alice\u{200B}", "hi", "invisible character U+200B"),
        ("\u{202E}ecila", "hi", "U+202E"),
        ("alice", "\u{200B}", "`text` has nothing visible"),
        ("alice", "\u{2800}\u{3164}", "nothing visible"),
    ] {
        let response = app.post_form(from, text).await;
        assert_eq!(response.status(), 400, "{from:?} {text:?}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains(needle), "{error}");
    }
    app.stop().await;
}

// 13. HEAD, and a health page that notices a dead broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_and_health_after_the_broker_dies() {
    let dir = TempDir::new("health");
    let (path, _) = ports_config(&dir, false);
    let mut broker = spawn(&["broker", "-c", path.to_str().unwrap()]);
    broker.wait_for_log("broker running");
    let mut config = temma::Config::load(&path).unwrap();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    let app = TestApp::start_config(&config).await;
    app.ready().await;
    for path in ["/", "/chat.js"] {
        let response = app.client.head(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().contains_key("content-type"), "{path}");
        assert!(response.bytes().await.unwrap().is_empty(), "{path}");
    }
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    broker.signal("KILL");
    let body = eventually("/health to see the broker gone", || async {
        let response = app.client.get(app.url("/health")).send().await.ok()?;
        let status = response.status();
        let body: Value = response.json().await.ok()?;
        (status == 503 && body["push_connected"] == false).then_some(body)
    })
    .await;
    assert_eq!(body["status"], "degraded");
    app.stop().await;
}

/// A client may shut its sending side down once its request is sent (`nc -N`, some health
/// checkers): every route still answers it, whichever path serves it (the front door's own,
/// or hyper's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_its_answer() {
    let app = TestApp::start().await;
    app.ready().await;
    let body = "from=ann&text=half";
    let requests = [
        (
            "GET / HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
            "HTTP/1.1 200",
            "<html",
        ),
        ("GET / HTTP/1.0\r\n\r\n".to_owned(), "HTTP/1.0 200", "<html"),
        (
            "GET /chat.js HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
            "HTTP/1.1 200",
            "EventSource",
        ),
        (
            "GET /nothing HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
            "HTTP/1.1 404",
            "\"error\"",
        ),
        (
            "GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
            "HTTP/1.1 200",
            "\"status\"",
        ),
        (
            format!(
                "POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: \
                 application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            "HTTP/1.1 200",
            "x-message-id",
        ),
        (
            // A request hyper serves, then the POST: the second answer comes too.
            format!(
                "GET /health HTTP/1.1\r\nHost: t\r\n\r\nPOST /message/broadcast HTTP/1.1\r\n\
                 Host: t\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            "HTTP/1.1 200",
            "x-message-id",
        ),
    ];
    for (request, status, in_answer) in requests {
        let mut socket = TcpStream::connect(app.http).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        socket.shutdown().await.unwrap();
        let answer = read_until_closed(&mut socket, DEADLINE)
            .await
            .unwrap_or_else(|| panic!("{request:?}: the connection stays open"));
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with(status), "{request:?}: {answer}");
        assert!(answer.contains(in_answer), "{request:?}: {answer}");
    }
    // An SSE request then a half-close: answered, then ended, as a client that closed (an
    // event stream's client never half-closes; its end of input is its leaving), and its place
    // freed.
    let mut sse = TcpStream::connect(app.http).await.unwrap();
    sse.write_all(b"GET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    sse.shutdown().await.unwrap();
    let answer = read_until_closed(&mut sse, DEADLINE)
        .await
        .expect("the stream ends");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("text/event-stream"), "{answer}");
    clients_drop_to(&app, 0).await;
    app.stop().await;
}
