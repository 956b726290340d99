//! The two ways an SSE connection is served, and small versions of the load scenarios, so that
//! `temma-load` keeps working (the benchmarks themselves are in `benches/compare.sh`).
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::TestApp;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// temma-load, built by `cargo test` as an example next to the test binaries.
fn load_tool() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    // `cargo test` builds examples; `cargo test --test load` alone does not, and would run an
    // old one: build it once per run (nothing to do after `cargo test`).
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--example", "temma-load"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo");
        assert!(status.success(), "cannot build temma-load");
    });
    profile.join("examples/temma-load")
}

/// Reads from a raw connection until `needle` has arrived; returns everything read.
async fn read_until(socket: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(common::DEADLINE, async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = socket.read(&mut buffer).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in {}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_and_kept_alive_sse_connections_get_the_same_stream() {
    let app = TestApp::start().await;
    app.ready().await;
    // A connection that opens with the SSE request: served directly.
    let mut direct = tokio::net::TcpStream::connect(app.http).await.unwrap();
    direct
        .write_all(b"GET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut direct, ": ok\n\n")
        .await
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(
        head.contains("content-type: text/event-stream\r\n"),
        "{head}"
    );
    assert!(head.contains("x-accel-buffering: no\r\n"), "{head}");
    assert!(head.contains("retry: 2000\n"), "{head}");

    // A kept-alive connection that asked for something else first (hyper answered that):
    // the stream request is taken over by the direct path, and gets the same head.
    let mut kept = tokio::net::TcpStream::connect(app.http).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut kept, "\"status\":\"ok\"").await;
    kept.write_all(b"GET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let taken = read_until(&mut kept, ": ok\n\n").await.to_ascii_lowercase();
    // The stream's head and opening, up to `: ok` (a presence event may follow).
    let opening = |text: &str| {
        let start = text.rfind("http/1.1 200 ok").unwrap();
        let end = start + text[start..].find(": ok\n\n").unwrap();
        text[start..end].to_owned()
    };
    assert_eq!(
        opening(&taken),
        opening(&head),
        "the same head on both paths"
    );
    assert!(!taken.contains("transfer-encoding"), "{taken}");

    assert_eq!(app.post_form("a", "to both").await.status(), 200);
    for socket in [&mut direct, &mut kept] {
        let text = read_until(socket, "to both").await;
        assert!(text.contains("event: msg\ndata: {"), "{text}");
    }
    let metrics = app.app().metrics().clone();
    assert_eq!(metrics.sse_clients.get(), 2);
    drop(direct);
    drop(kept);
    common::eventually("both clients to be gone", || {
        let metrics = metrics.clone();
        async move { (metrics.sse_clients.get() == 0).then_some(()) }
    })
    .await;
    app.stop().await;
}

/// Runs `temma-load --subscribe <app>/event/fetch ARGS --json` off the async runtime; its
/// report.
async fn run_load(app: &TestApp, args: &[&str]) -> Value {
    let mut command = Command::new(load_tool());
    command
        .arg("--subscribe")
        .arg(app.url("/event/fetch"))
        .args(args)
        .arg("--json");
    let output = tokio::task::spawn_blocking(move || command.output().expect("run temma-load"))
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("one JSON report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_scenario_in_small() {
    let app = TestApp::start().await;
    app.ready().await;
    let publish = app.url("/message/broadcast");
    let pid = std::process::id().to_string();
    let report = run_load(
        &app,
        &[
            "--subscribers",
            "20",
            "--publish",
            &publish,
            "--rate",
            "200",
            "--messages",
            "30",
            "--pid",
            &pid,
        ],
    )
    .await;
    assert_eq!(report["connected"], 20, "{report}");
    assert_eq!(report["expected"], 600, "{report}");
    assert_eq!(report["received"], 600, "{report}");
    assert_eq!(report["gaps"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert!(
        report["latency_us"]["p99"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["deliveries_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["rss_kib_connected"].as_u64().unwrap() > 0,
        "{report}"
    );
    // The server's CPU (here the test process, which runs it) per message and per delivery.
    let cpu = &report["server_cpu"];
    assert!(cpu["total_ms"].as_f64().unwrap() > 0.0, "{report}");
    // Each thread's schedstat (ns), or utime + stime when a thread of this test process (other
    // tests run beside it) ended during the run.
    assert!(
        matches!(cpu["measured_by"].as_str(), Some("schedstat" | "ticks")),
        "{report}"
    );
    let per_delivery = cpu["per_delivery_us"].as_f64().unwrap();
    assert!(
        (per_delivery - cpu["total_ms"].as_f64().unwrap() * 1000.0 / 600.0).abs() < 1e-6,
        "{report}"
    );
    assert!(
        (cpu["per_message_us"].as_f64().unwrap() - per_delivery * 20.0).abs() < 1e-3,
        "{report}"
    );
    app.stop().await;
}

/// A child process killed (and reaped) when this goes out of scope, even by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With `--pid`, the report also says what every other process used while the server's CPU was
/// measured: a process that burns a core beside the run shows there, the tool's own time and
/// the server's do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_processes_cpu_is_reported_beside_the_servers() {
    let app = TestApp::start().await;
    app.ready().await;
    let publish = app.url("/message/broadcast");
    let pid = std::process::id().to_string();
    // A neighbour that spins until the run is over (killed when the guard goes, also if the
    // run fails: a failed run must not leave a process burning a core).
    let neighbour = KillOnDrop(
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh"),
    );
    let report = run_load(
        &app,
        &[
            "--subscribers",
            "5",
            "--publish",
            &publish,
            "--rate",
            "20",
            "--messages",
            "20",
            "--pid",
            &pid,
        ],
    )
    .await;
    drop(neighbour);
    assert_eq!(report["received"], 100, "{report}");
    let other = &report["other_cpu"];
    // About a second of publishing: the spinning neighbour had at least a fifth of a core.
    assert!(other["total_ms"].as_f64().unwrap() >= 200.0, "{report}");
    let share = other["share"].as_f64().unwrap();
    assert!(share > 0.0 && share <= 1.0, "{report}");
    app.stop().await;
}

/// `--source`: subscribers open their connections from the given local addresses, in turn (an
/// address the machine does not have fails every one of them, so the option is not ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_from_several_source_addresses() {
    let app = TestApp::start().await;
    app.ready().await;
    let publish = app.url("/message/broadcast");
    let report = run_load(
        &app,
        &[
            "--subscribers",
            "6",
            "--source",
            "127.0.0.2",
            "--source",
            "127.0.0.3",
            "--publish",
            &publish,
            "--messages",
            "5",
        ],
    )
    .await;
    assert_eq!(report["connected"], 6, "{report}");
    assert_eq!(report["received"], 30, "{report}");
    let report = run_load(
        &app,
        &[
            "--subscribers",
            "2",
            "--attempts",
            "1",
            "--source",
            "192.0.2.1",
            "--messages",
            "0",
            "--max-secs",
            "5",
        ],
    )
    .await;
    assert_eq!(report["connected"], 0, "{report}");
    assert_eq!(report["failed"], 2, "{report}");
    assert!(
        report["errors"]
            .as_object()
            .unwrap()
            .keys()
            .any(|error| error.starts_with("connect:")),
        "{report}"
    );
    app.stop().await;
}

/// The rooms scenario (1,000 rooms × 10 subscribers in `benches/compare.sh`), small: each
/// subscriber gets every message of its room and none of another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_scenario_in_small() {
    let app = TestApp::start().await;
    app.ready().await;
    let publish = app.url("/message/broadcast");
    let report = run_load(
        &app,
        &[
            "--subscribers",
            "40",
            "--rooms",
            "10",
            "--publish",
            &publish,
            "--rate",
            "200",
            "--messages",
            "50",
        ],
    )
    .await;
    assert_eq!(report["connected"], 40, "{report}");
    // 50 messages over 10 rooms of 4 subscribers: 5 messages × 4 per room.
    assert_eq!(report["expected"], 200, "{report}");
    assert_eq!(report["received"], 200, "{report}");
    assert_eq!(report["misrouted"], 0, "{report}");
    assert_eq!(report["gaps"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_scenario_in_small() {
    let app = TestApp::start().await;
    let pid = std::process::id().to_string();
    let report = run_load(
        &app,
        &["--subscribers", "100", "--hold-secs", "0.2", "--pid", &pid],
    )
    .await;
    assert_eq!(report["connected"], 100, "{report}");
    assert_eq!(report["messages"], 0, "{report}");
    assert!(report["rss_kib_per_connection"].is_number(), "{report}");
    let metrics = app.app().metrics().clone();
    common::eventually("the tool's connections to close", || {
        let metrics = metrics.clone();
        async move { (metrics.sse_clients.get() == 0).then_some(()) }
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscribers_are_retried_then_counted() {
    let app = TestApp::start_with(|config| config.event.max_clients = 5).await;
    let report = run_load(&app, &["--subscribers", "8", "--attempts", "2"]).await;
    assert_eq!(report["connected"], 5, "{report}");
    assert_eq!(report["failed"], 3, "{report}");
    assert_eq!(report["errors"]["status 503"], 6, "{report}");
    app.stop().await;
}

#[test]
fn the_tool_only_targets_loopback() {
    let output = Command::new(load_tool())
        .args(["--subscribe", "http://example.com/event/fetch"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("only loopback targets"));
}
