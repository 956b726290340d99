//! The `temma` binary as a black box: every exit path, and web node and broker as two processes.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    DEADLINE, Sse, TempDir, broker_then_web, free_port, manifest_dir, ports_config, spawn,
    spawn_shell, temma, write_config,
};

#[test]
fn check_accepts_the_shipped_config() {
    let output = temma(&[
        "check",
        "-c",
        manifest_dir().join("etc/temma.toml").to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("http://127.0.0.1:8000"), "{stdout}");
    assert!(
        stdout.contains("\n  rooms: default `general`, at most 1000 per node, presence shared\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\n  access hook: none (every room open)\n"),
        "{stdout}"
    );
}

/// `temma check` on a config made of `body`: the exit code and stderr.
fn check(dir: &TempDir, body: &str) -> (Option<i32>, String, std::path::PathBuf) {
    let path = write_config(&dir.0, body);
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr, path)
}

#[test]
fn check_refuses_a_bad_config_naming_key_and_file() {
    let dir = TempDir::new("check-bad");
    let (code, stderr, path) = check(&dir, "[server]\nlistn = \"127.0.0.1:1\"\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("`server.listn`"), "{stderr}");
    assert!(
        stderr.contains("unknown key `listn`; did you mean `listen`?"),
        "{stderr}"
    );

    let (code, stderr, _) = check(
        &dir,
        "[application.dataSources]\nzmq_client_sub = \"zmq://SUB@*:6000\"\n",
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("`application.dataSources.zmq_client_sub`"),
        "{stderr}"
    );
    assert!(stderr.contains("only a bind"), "{stderr}");

    // Semantic problems are all listed together.
    let (code, stderr, _) = check(
        &dir,
        "[message]\npush = \"nope\"\n[event]\nsub = \"zmq_client_push\"\n",
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("2 problems"), "{stderr}");
    assert!(stderr.contains("`message.push`"), "{stderr}");
    assert!(stderr.contains("`event.sub`"), "{stderr}");
}

#[test]
fn missing_config_file_is_an_error() {
    let output = temma(&["check", "-c", "/nonexistent/temma.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not found"));
}

#[test]
fn environment_overrides_the_file() {
    let path = manifest_dir().join("etc/temma.toml");
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .env("TEMMA_SERVER__LISTEN", "127.0.0.1:9123")
        .env(
            "TEMMA_APPLICATION__DATASOURCES__ZMQ_CLIENT_SUB",
            "zmq://SUB@127.0.0.1:7000",
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("http://127.0.0.1:9123"), "{stdout}");
    assert!(stdout.contains("zmq://SUB@127.0.0.1:7000"), "{stdout}");

    // A bad value from the environment names the key and the variable.
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .env("TEMMA_APPLICATION__ROOTCONTROLLER", "Nope")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`application.rootController`"), "{stderr}");
    assert!(
        stderr.contains("TEMMA_APPLICATION__ROOTCONTROLLER"),
        "{stderr}"
    );
}

#[test]
fn only_section_key_variables_are_configuration() {
    let path = manifest_dir().join("etc/temma.toml");
    // What a shell or Kubernetes (a Service named `temma`) may set: not configuration.
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .env("TEMMA_HOME", "/opt/temma")
        .env("TEMMA_PORT", "tcp://10.0.0.7:80")
        .env("TEMMA_SERVICE_HOST", "10.0.0.7")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    // A misspelt key of the configuration's form is still an error, naming the variable.
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .env("TEMMA_SERVER__LISTN", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`server.listn`"), "{stderr}");
    assert!(stderr.contains("TEMMA_SERVER__LISTN"), "{stderr}");
}

#[test]
fn check_warns_about_a_connect_the_embedded_broker_does_not_bind() {
    let dir = TempDir::new("wiring");
    let (code, _, path) = check(
        &dir,
        "[application.dataSources]\nzmq_client_push = \"zmq://PUSH@127.0.0.1:5001\"\n\
         zmq_broker_pull = \"zmq-bind://PULL@127.0.0.1:5000\"\n\
         zmq_broker_pub = \"zmq-bind://PUB@*:6000\"\n\
         zmq_client_sub = \"zmq://SUB@127.0.0.1:6000\"\n",
    );
    assert_eq!(code, Some(0));
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(
            "warning: `message.push` connects to `127.0.0.1:5001`, which the embedded broker does not bind"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("every POST would get 503"), "{stdout}");
    assert_eq!(
        stdout.matches("warning").count(),
        1,
        "the SUB matches `*:6000`: {stdout}"
    );
}

/// Linux's scheduling policies, as `/proc/…/stat` gives them.
const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// A process's or thread's name, nice value and scheduling policy: fields 2, 19 and 41 of its
/// `stat` file at `path`.
fn name_nice_policy(path: &str) -> (String, i32, u32) {
    let stat = std::fs::read_to_string(path).unwrap();
    let name = stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()].to_owned();
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    (name, rest[16].parse().unwrap(), rest[38].parse().unwrap())
}

/// `[runtime] worker_threads` sets how many threads run the process's tasks, for a web node and
/// a standalone broker (each says how many at start); 0 is one per CPU for a web node, one for a
/// standalone broker; too many is refused before anything binds, naming the key and the file.
#[test]
fn runtime_worker_threads_sets_the_threads_that_run_tasks() {
    let dir = TempDir::new("worker-threads");
    let threads_in = |line: &str| -> usize {
        let at = line
            .find("worker_threads=")
            .expect("worker_threads in the start-up line")
            + 15;
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().expect("a number of threads")
    };
    for threads in [1, 3] {
        let (path, _) = ports_config(&dir, true);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            format!("{text}[runtime]\nworker_threads = {threads}\n"),
        )
        .unwrap();
        let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
        let line = web.wait_for_log("listening on http://");
        assert_eq!(threads_in(&line), threads, "{line}");
    }
    let cpus = std::thread::available_parallelism().unwrap().get();
    let (path, _) = ports_config(&dir, true);
    let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
    let line = web.wait_for_log("listening on http://");
    assert_eq!(threads_in(&line), cpus, "one per CPU by default: {line}");

    let broker_dir = TempDir::new("worker-threads-broker");
    let (path, _, _) =
        common::standalone_broker_config(&broker_dir, "[runtime]\nworker_threads = 2\n");
    let mut broker = spawn(&["broker", "-c", path.to_str().unwrap()]);
    let line = broker.wait_for_log("broker running");
    assert_eq!(threads_in(&line), 2, "{line}");
    // A standalone broker's threads have `runtime.scheduling`'s default too.
    assert!(line.contains("scheduling=\"normal\""), "{line}");
    let (_, _, policy) = name_nice_policy(&format!("/proc/{}/stat", broker.0.id()));
    assert_eq!(policy, SCHED_OTHER, "SCHED_OTHER");
    drop(broker);
    // By default, a standalone broker runs on one thread, whatever the CPUs.
    let (path, _, _) = common::standalone_broker_config(&broker_dir, "");
    let mut broker = spawn(&["broker", "-c", path.to_str().unwrap()]);
    let line = broker.wait_for_log("broker running");
    assert_eq!(threads_in(&line), 1, "one thread by default: {line}");
    let tasks = std::fs::read_dir(format!("/proc/{}/task", broker.0.id()))
        .unwrap()
        .filter_map(|task| {
            let path = task.unwrap().path().join("stat");
            Some(name_nice_policy(path.to_str()?).0)
        })
        .filter(|name| name.starts_with("tokio-rt-worker"))
        .count();
    assert_eq!(tasks, 1, "one runtime worker thread");

    let (code, stderr, path) = check(&dir, "[runtime]\nworker_threads = 5000\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("`runtime.worker_threads`"), "{stderr}");
    assert!(stderr.contains("at most 1024"), "{stderr}");
}

/// `[runtime] scheduling`: with `"batch"` every thread of the process (the main thread, the
/// runtime's workers, the moderation chain's) runs under Linux's `SCHED_BATCH`, keeping the nice
/// value it was started with, and the start-up line says so; `"normal"`, the default, leaves
/// them under the system's default, `SCHED_OTHER`.
#[cfg(target_os = "linux")]
#[test]
fn runtime_scheduling_sets_every_threads_policy() {
    // Each thread's name, nice value and policy.
    let threads = |pid: u32| -> Vec<(String, i32, u32)> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|task| name_nice_policy(task.unwrap().path().join("stat").to_str().unwrap()))
            .collect()
    };
    let dir = TempDir::new("scheduling");
    // A chain on two threads of its own.
    let chain = format!(
        "script_workers = 2\n[[broker.scripts]]\nfile = \"{}/scripts/trim.rhai\"\nparams = {{ max_chars = 100 }}\n",
        env!("CARGO_MANIFEST_DIR")
    );
    for (runtime, nice, policy, said) in [
        (
            "[runtime]\nscheduling = \"batch\"\n",
            3,
            SCHED_BATCH,
            "scheduling=\"batch\"",
        ),
        ("", 0, SCHED_OTHER, "scheduling=\"normal\""),
    ] {
        let (path, _) = ports_config(&dir, true);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("embedded = true\n", &format!("embedded = true\n{chain}"));
        std::fs::write(&path, format!("{text}{runtime}")).unwrap();
        let mut web = spawn_shell(&format!(
            "exec nice -n {nice} {} serve -c {}",
            env!("CARGO_BIN_EXE_temma"),
            path.display()
        ));
        let line = web.wait_for_log("listening on http://");
        assert!(line.contains(said), "{line}");
        let threads = threads(web.0.id());
        let named = |prefix: &str| threads.iter().filter(|t| t.0.starts_with(prefix)).count();
        assert!(named("tokio-rt-worker") >= 1, "{threads:?}");
        assert_eq!(named("temma-script-"), 2, "{threads:?}");
        assert!(
            threads.iter().all(|t| t.1 == nice && t.2 == policy),
            "{threads:?}"
        );
    }
}

/// Whether a process may have transparent huge pages: `THP_enabled` of its `/proc/PID/status`
/// (0 once it opted out with `PR_SET_THP_DISABLE`).
fn thp_enabled(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("THP_enabled in /proc/PID/status");
    line.split_whitespace().nth(1) == Some("1")
}

/// `[runtime] huge_pages`: by default a web node and a standalone broker opt out of
/// transparent huge pages and say so at start; `true` leaves the system's setting.
#[cfg(target_os = "linux")]
#[test]
fn runtime_huge_pages_opts_the_process_out_by_default() {
    // The setting is inherited: the default below would pass in a runner that had opted out.
    assert!(
        thp_enabled(std::process::id()),
        "the test runner itself has THP off"
    );
    let dir = TempDir::new("huge-pages");
    for (runtime, enabled) in [("", false), ("[runtime]\nhuge_pages = true\n", true)] {
        let (path, _) = ports_config(&dir, true);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}{runtime}")).unwrap();
        let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
        let line = web.wait_for_log("listening on http://");
        assert!(line.contains(&format!("huge_pages={enabled}")), "{line}");
        assert_eq!(thp_enabled(web.0.id()), enabled, "{runtime:?}");
    }
    let broker_dir = TempDir::new("huge-pages-broker");
    let (path, _, _) = common::standalone_broker_config(&broker_dir, "");
    let mut broker = spawn(&["broker", "-c", path.to_str().unwrap()]);
    let line = broker.wait_for_log("broker running");
    assert!(line.contains("huge_pages=false"), "{line}");
    assert!(!thp_enabled(broker.0.id()));
}

#[test]
fn start_up_says_once_what_runs() {
    let dir = TempDir::new("start-up");
    let (path, _) = ports_config(&dir, true);
    let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
    let line = web.wait_for_log("listening on http://");
    assert!(
        line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            || line.contains(&format!("version={}", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
    assert!(line.contains("temma.toml"), "{line}");
    assert!(
        line.contains("broker=\"embedded\"") || line.contains("broker=embedded"),
        "{line}"
    );
    assert!(
        line.contains("access=none") && line.contains("default_room=general"),
        "{line}"
    );
    web.signal("TERM");
    assert!(web.wait_exit(DEADLINE).success());
    let rest: Vec<String> = web.1.try_iter().collect();
    assert!(
        rest.iter().all(|l| !l.contains("listening")),
        "listening said once: {rest:?}"
    );
}

#[test]
fn a_missing_script_is_reported_where_it_was_looked_for_and_by_name() {
    let dir = TempDir::new("missing-script");
    let (code, stderr, _) = check(
        &dir,
        "[[broker.scripts]]\nfile = \"scripts/nope.rhai\"\non_error = \"Drop\"\n",
    );
    assert_eq!(code, Some(78));
    assert!(stderr.contains("`broker.scripts[0] (nope)`"), "{stderr}");
    let resolved = manifest_dir().join("scripts/nope.rhai");
    assert!(
        stderr.contains(&format!("(looked for `{}`)", resolved.display())),
        "{stderr}"
    );
    let (code, stderr, _) = check(&dir, "[broker]\non_error = \"maybe\"\n");
    assert_eq!(code, Some(78));
    assert!(
        stderr.contains("`maybe` is not a choice: write \"drop\" or \"pass\""),
        "{stderr}"
    );
}

#[test]
fn listen_addresses_say_the_forms() {
    let dir = TempDir::new("listen");
    let (code, stderr, _) = check(&dir, "[server]\nlisten = \"localhost:28000\"\n");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr, _) = check(&dir, "[server]\nlisten = \"example:80\"\n");
    assert_eq!(code, Some(78));
    assert!(
        stderr.contains("`example:80` is not an address to listen on: write IP:PORT"),
        "{stderr}"
    );
}

#[test]
fn serve_with_a_bad_config_exits_before_binding() {
    let dir = TempDir::new("serve-bad");
    let http = free_port();
    let path = write_config(
        &dir.0,
        &format!("[server]\nlisten = \"127.0.0.1:{http}\"\n[message]\nqueue = 0\n"),
    );
    let output = temma(&["serve", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("`message.queue`"));
    // Nothing was bound: the port is still free.
    std::net::TcpListener::bind(("127.0.0.1", http)).expect("port left free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_web_node_as_two_processes() {
    let dir = TempDir::new("two-processes");
    let (path, http) = ports_config(&dir, false);
    // The standalone broker serves /health and /metrics on `broker.http`, scripts counted.
    let broker_http = free_port();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[broker]\nembedded = false\n",
        &format!("[broker]\nembedded = false\nhttp = \"localhost:{broker_http}\"\n"),
    ) + "[[broker.scripts]]\nfile = \"scripts/trim.rhai\"\n";
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap();
    let mut broker = spawn(&["broker", "-c", path]);
    let started = broker.wait_for_log("broker running");
    assert!(
        started.contains(&format!(
            "http=http://127.0.0.1:{broker_http}/health, /metrics"
        )) && started.contains("scripts=[\"trim\"]"),
        "{started}"
    );
    let mut web = spawn(&["serve", "-c", path]);
    web.wait_for_log("listening on http://");

    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}");
    common::eventually("the web node to publish through the broker", || {
        let client = client.clone();
        let url = url.clone();
        async move {
            let response = client
                .post(format!("{url}/message/broadcast"))
                .form(&[("from", "warm"), ("text", "up")])
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        }
    })
    .await;
    let mut sse = Sse::connect(&client, &format!("{url}/event/fetch"), None).await;
    let response = client
        .post(format!("{url}/message/broadcast"))
        .form(&[("from", "alice"), ("text", "across processes")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let event = sse.next_message().await;
    assert_eq!(event.json()["text"], "across processes");
    assert!(event.id.is_some());

    let status = format!("http://127.0.0.1:{broker_http}");
    let health = client.get(format!("{status}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let health: serde_json::Value = health.json().await.unwrap();
    assert_eq!(health["role"], "broker");
    assert_eq!(health["scripts"], serde_json::json!(["trim"]));
    assert_eq!(health["pull_peers"], 1, "{health}");
    assert_eq!(health["pub_peers"], 1, "{health}");
    assert!(health["published"].as_u64().unwrap() >= 2, "{health}");
    // A client that shuts its side down once its request is sent still gets its answer.
    {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", broker_http)).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        raw.write_all(
            b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /nothing HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"role\":\"broker\""), "{answer}");
        assert!(answer.contains("HTTP/1.1 404"), "{answer}");
    }
    let metrics = client
        .get(format!("{status}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let passed = metrics
        .lines()
        .find(|line| {
            line.starts_with(r#"temma_script_messages_total{script="trim",outcome="Passed"}"#)
        })
        .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(passed.is_some_and(|n| n >= 2), "{metrics}");
    let missing = client
        .get(format!("{status}/message/broadcast"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.text().await.unwrap().contains("\"error\""));

    broker.signal("TERM");
    assert!(broker.wait_exit(DEADLINE).success());
    web.signal("TERM");
    assert!(web.wait_exit(DEADLINE).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_sse_clients_exits_zero_quickly() {
    let dir = TempDir::new("sigterm");
    let (path, http) = ports_config(&dir, true);
    let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
    web.wait_for_log("listening on http://");
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/event/fetch");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut sse = Sse::connect(&client, &url, None).await;
        assert!(sse.next().await.is_some());
        clients.push(sse);
    }
    let start = Instant::now();
    web.signal("TERM");
    let status = tokio::task::spawn_blocking(move || web.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    for sse in &mut clients {
        // Every stream ended cleanly.
        while let Some(event) = sse.next().await {
            assert_ne!(event.event.as_deref(), Some("msg"));
        }
    }
}

#[test]
fn bind_conflict_fails_start_up_with_a_clear_error() {
    let dir = TempDir::new("bind-conflict");
    let (path, _) = ports_config(&dir, true);
    let text = std::fs::read_to_string(&path).unwrap();
    // Occupy a port (held from the start: no other test can take it in between) and make it
    // the broker's PULL port.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let pull: u16 = text
        .split("zmq-bind://PULL@127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    std::fs::write(
        &path,
        text.replace(
            &format!("127.0.0.1:{pull}\""),
            &format!("127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let output = temma(&["serve", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot bind `127.0.0.1:{port}`")),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("cannot bind").count(),
        1,
        "said once: {stderr}"
    );
}

#[test]
fn http_port_in_use_names_the_key_once() {
    let dir = TempDir::new("http-conflict");
    let (path, port) = ports_config(&dir, true);
    let _holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let output = temma(&["serve", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("set `server.listen` (TEMMA_SERVER__LISTEN) to a free one"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("cannot listen").count(),
        1,
        "said once: {stderr}"
    );
}

/// `broker.http`: its value checked like `server.listen`, a warning when the broker is
/// embedded (only `temma broker` serves it), and a port in use named by its key.
#[test]
fn the_broker_http_address_is_checked_and_named() {
    let dir = TempDir::new("broker-http");
    let (path, http) = ports_config(&dir, true);
    let base = std::fs::read_to_string(&path).unwrap();
    let with = |embedded: bool, value: &str| {
        let text = base.replace(
            "[broker]\nembedded = true\n",
            &format!("[broker]\nembedded = {embedded}\nhttp = \"{value}\"\n"),
        );
        std::fs::write(&path, text).unwrap();
    };
    let port = free_port();
    with(true, &format!("127.0.0.1:{port}"));
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "  warning: `broker.http` (`127.0.0.1:{port}`) is served by `temma broker` only: with the embedded broker, `http://127.0.0.1:{http}/metrics` has the broker's counters\n"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "  broker http: http://127.0.0.1:{port}/health, /metrics (`temma broker`)\n"
        )),
        "{stdout}"
    );

    with(false, "nowhere");
    let output = temma(&["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`broker.http`: `nowhere` is not an address to listen on: write IP:PORT"),
        "{stderr}"
    );

    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    with(false, &taken.to_string());
    let output = temma(&["broker", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot listen on http://{taken}: Address already in use (os error 98); another process holds this address: stop it, or set `broker.http` (TEMMA_BROKER__HTTP) to a free one"
        )),
        "{stderr}"
    );
}

/// Shell completions and manual pages describe every command.
#[test]
fn completions_and_manual_pages_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let output = temma(&["completions", shell]).output().unwrap();
        assert!(output.status.success(), "{shell}: {output:?}");
        let script = String::from_utf8_lossy(&output.stdout);
        for command in ["serve", "broker", "check", "script", "no-config"] {
            assert!(script.contains(command), "{shell} lacks {command}");
        }
    }
    let dir = TempDir::new("man");
    let output = temma(&["man", dir.0.to_str().unwrap()]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    for page in [
        "temma.1",
        "temma-serve.1",
        "temma-broker.1",
        "temma-check.1",
        "temma-script.1",
    ] {
        let text = std::fs::read_to_string(dir.0.join(page)).unwrap();
        assert!(text.contains(".TH temma"), "{page}: {text}");
    }
    let script = std::fs::read_to_string(dir.0.join("temma-script.1")).unwrap();
    assert!(script.contains("no\\-config"), "{script}");
}

/// A reader that stops early (`temma check | grep -q …`, `| head -1`) gets what it read, and
/// the command exits as it would have: no panic on the closed pipe, no other exit code (a
/// `set -o pipefail` script failed on it in CI).
#[test]
fn commands_that_print_exit_quietly_into_a_closed_pipe() {
    let shipped = manifest_dir().join("etc/temma.toml");
    let damn = r#"{"from":"a","text":"damn"}"#;
    for args in [
        &["check", "-c", shipped.to_str().unwrap()][..],
        &["completions", "bash"],
        &["script", "-c", shipped.to_str().unwrap(), "-m", damn],
        &[
            "script",
            "-c",
            shipped.to_str().unwrap(),
            "profanity",
            "-m",
            damn,
        ],
    ] {
        // The read end is closed before the command starts: its first write meets EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = temma(args)
            .current_dir(manifest_dir())
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn check_reports_a_script_syntax_error_with_file_line_and_column() {
    let dir = TempDir::new("check-script");
    let script = dir.0.join("broken.rhai");
    std::fs::write(&script, "fn on_message(msg) {\n  msg.text = ;\n  msg\n}\n").unwrap();
    let (code, stderr, _) = check(
        &dir,
        &format!("[[broker.scripts]]\nfile = \"{}\"\n", script.display()),
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("`broker.scripts[0] (broken)`"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:14:", script.display())),
        "{stderr}"
    );
}

#[test]
fn script_command_shows_each_outcome() {
    let scripts = manifest_dir().join("scripts");
    let run = |file: &str, message: &str, params: &str| {
        let output = temma(&[
            "script",
            scripts.join(file).to_str().unwrap(),
            "--message",
            message,
            "--params",
            params,
        ])
        .current_dir(manifest_dir())
        .output()
        .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, out) = run("commands.rhai", r#"{"from":"a","text":"/me waves"}"#, "{}");
    assert_eq!(code, Some(0));
    assert!(out.starts_with("passed: {"), "{out}");
    assert!(
        out.contains(r#""kind":"action""#) && out.contains(r#""text":"waves""#),
        "{out}"
    );
    let (code, out) = run("trim.rhai", r#"{"from":"a","text":"  "}"#, "{}");
    assert_eq!((code, out.trim()), (Some(0), "dropped"));
    let (code, out) = run(
        "ratelimit.rhai",
        r#"{"from":"a","text":"x"}"#,
        r#"{"max":0}"#,
    );
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("rejected (429): too many messages"),
        "{out}"
    );
    let (code, out) = run(
        "profanity.rhai",
        r#"{"from":"a","text":"damn"}"#,
        r#"{"words_file":"scripts/words.txt"}"#,
    );
    assert_eq!(code, Some(0));
    assert!(out.contains(r#""text":"****""#), "{out}");

    let dir = TempDir::new("script-command");
    let failing = dir.0.join("fail.rhai");
    std::fs::write(&failing, "fn on_message(msg) { throw \"no\" }").unwrap();
    let output = temma(&["script", "--no-config", failing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "error: {}:1:22: no\n  the broker drops the message (on_error = drop)\n",
            failing.display()
        )
    );
    let output = temma(&["script", failing.to_str().unwrap(), "-m", "[1]"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// `temma script` with a configuration: a script of the chain (by file or by name) runs with
/// the entry's params, limits and on_error; without a script, the whole chain runs.
#[test]
fn script_command_uses_the_configuration() {
    let shipped = manifest_dir().join("etc/temma.toml");
    let run = |args: &[&str]| {
        let output = temma(args).current_dir(manifest_dir()).output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let damn = r#"{"from":"a","text":"damn"}"#;
    // The issue's command: the word list of the config's entry is used.
    let (code, out, err) = run(&[
        "script",
        "-c",
        shipped.to_str().unwrap(),
        "scripts/profanity.rhai",
        "-m",
        damn,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with(r#"passed: {"from":"a","text":"#), "{out}");
    assert!(out.contains(r#""text":"****""#), "{out}");
    assert!(
        err.contains(&format!(
            "temma: `broker.scripts[3] (profanity)` of `{}`: its params, [broker.limits] and on_error",
            shipped.display()
        )),
        "{err}"
    );
    // By name, with the default configuration found from the working directory.
    let (code, out, _) = run(&["script", "profanity", "-m", damn]);
    assert_eq!(code, Some(0));
    assert!(out.contains(r#""text":"****""#), "{out}");
    // --params go over the entry's.
    let (code, out, _) = run(&["script", "profanity", "-m", damn, "-p", r#"{"mask":"x"}"#]);
    assert_eq!(code, Some(0));
    assert!(out.contains(r#""text":"xxxx""#), "{out}");
    // The whole chain, each script's step, then what would be published.
    let (code, out, _) = run(&["script", "-m", r#"{"from":"a","text":"  /me says damn  "}"#]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "ratelimit: passed (unchanged)",
            "trim: passed (changed)",
            "commands: passed (changed)",
            "profanity: passed (changed)",
        ],
        "{out}"
    );
    assert!(
        lines[4].contains(r#""kind":"action","text":"says ****""#),
        "{out}"
    );
    let (code, out, _) = run(&[
        "script",
        "-m",
        r#"{"from":"a","text":"x"}"#,
        "-p",
        r#"{"max":0}"#,
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out,
        "ratelimit: rejected (429): too many messages: at most 0 every 10 seconds\n"
    );

    // Without its word list, the shipped profanity script refuses to load: no false "passed".
    let (code, out, err) = run(&[
        "script",
        "--no-config",
        "scripts/profanity.rhai",
        "-m",
        damn,
    ]);
    assert_eq!((code, out.as_str()), (Some(78), ""), "{err}");
    assert!(
        err.contains(
            "temma: `fn init()` failed at scripts/profanity.rhai:10:9: no words to mask: set `params.words_file` (a file, one word per line)"
        ),
        "{err}"
    );
}

/// A limit that stops a script is named with its key and value, and where it stopped.
#[test]
fn script_limits_are_named_with_the_line() {
    let dir = TempDir::new("script-limits");
    let config = write_config(
        &dir.0,
        "[broker.limits]\nmax_operations = 1000\nmax_ms = 60000\nmax_call_depth = 8\nmax_string_size = 100\n\n[broker]\non_error = \"pass\"\n",
    );
    let script = |name: &str, body: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, body).unwrap();
        let output = temma(&[
            "script",
            "-c",
            config.to_str().unwrap(),
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            path.display().to_string(),
        )
    };
    let (code, out, file) = script(
        "loop.rhai",
        "fn on_message(msg) {\n    let n = 0;\n    loop {\n        n += 1;\n    }\n}\n",
    );
    assert_eq!(code, Some(1));
    assert!(
        out.starts_with(&format!(
            "error: {file}:4:11: stopped after too many operations (`broker.limits.max_operations` = 1000)\n"
        )),
        "{out}"
    );
    // on_error comes from the configuration: the message passes, unchanged.
    assert!(
        out.contains("  the broker passes the message on unchanged (on_error = pass)\npassed: {"),
        "{out}"
    );
    let (_, out, file) = script(
        "deep.rhai",
        "fn down(n) {\n    down(n + 1)\n}\nfn on_message(msg) {\n    down(0);\n    msg\n}\n",
    );
    assert!(
        out.starts_with(&format!(
            "error: {file}:2:5: stopped: function calls nested too deep (`broker.limits.max_call_depth` = 8)\n"
        )),
        "{out}"
    );
    let (_, out, file) = script(
        "big.rhai",
        "fn on_message(msg) {\n    let s = \"0123456789\";\n    for i in 0..5 { s += s; }\n    msg\n}\n",
    );
    assert!(out.starts_with(&format!("error: {file}:3:")), "{out}");
    assert!(
        out.contains(": stopped: a string grew too large (`broker.limits.max_string_size` = 100)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_errors_are_logged_and_sighup_reloads_the_chain() {
    let dir = TempDir::new("sighup");
    let script = dir.0.join("tag.rhai");
    std::fs::write(&script, "fn on_message(msg) { msg.tag = \"one\"; msg }\n").unwrap();
    let (path, http) = ports_config(&dir, true);
    let base = std::fs::read_to_string(&path).unwrap();
    let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
    web.wait_for_log("listening on http://");

    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}");
    let publish = |text: &'static str| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/message/broadcast"))
                .form(&[("from", "a"), ("text", text)])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    common::eventually("the chat to be ready", || async {
        (publish("warm").await == 200).then_some(())
    })
    .await;
    let mut sse = Sse::connect(&client, &format!("{url}/event/fetch"), None).await;

    // No script yet. Add one to the chain in the config file, then SIGHUP.
    std::fs::write(
        &path,
        format!(
            "{base}\n[[broker.scripts]]\nfile = \"{}\"\n",
            script.display()
        ),
    )
    .unwrap();
    web.signal("HUP");
    web.wait_for_log("script chain reloaded");
    assert_eq!(publish("after hup").await, 200);
    let event = sse.next_message().await.json();
    assert_eq!(
        (event["text"].as_str(), event["tag"].as_str()),
        (Some("after hup"), Some("one"))
    );

    // A broken edit is logged with file, line and column; the old version keeps running.
    std::fs::write(&script, "fn on_message(msg) {\n  msg.tag = ;\n}\n").unwrap();
    let line = web.wait_for_log("script not reloaded");
    assert!(
        line.contains(&format!("{}:2:13", script.display())),
        "{line}"
    );
    assert_eq!(publish("still").await, 200);
    assert_eq!(sse.next_message().await.json()["tag"], "one");

    web.signal("TERM");
    assert!(web.wait_exit(DEADLINE).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_while_the_web_node_runs() {
    let dir = TempDir::new("broker-restart");
    let (path, http) = ports_config(&dir, false);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("[event]\n", "[event]\nkeepalive_secs = 1\n"),
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let (mut broker, mut web) = broker_then_web(path);

    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}");
    let post = |text: &str| {
        let request = client
            .post(format!("{url}/message/broadcast"))
            .form(&[("from", "a"), ("text", text)]);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    common::eventually("the chat to work", || async {
        (post("warm-up").await == 200).then_some(())
    })
    .await;
    let mut sse = Sse::connect(&client, &format!("{url}/event/fetch"), None).await;
    assert_eq!(post("before").await, 200);
    assert_eq!(sse.next_message().await.json()["text"], "before");

    broker.0.kill().unwrap();
    broker.0.wait().unwrap();
    // POSTs answer 503 within the publish timeout (1 s) instead of hanging or saying `true`.
    let started = Instant::now();
    assert_eq!(post("while down").await, 503);
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(1500), "503 after {waited:?}");
    // The SSE client stays connected: keep-alives go on.
    let keepalive = sse.next_but_presence().await.expect("still connected");
    assert_eq!(keepalive.comments, ["keep-alive"]);
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);

    let mut broker = spawn(&["broker", "-c", path]);
    broker.wait_for_log("broker running");
    let restarted = Instant::now();
    common::eventually("messages to flow again", || async {
        (post("after").await == 200).then_some(())
    })
    .await;
    let took = restarted.elapsed();
    println!("messages flow again {took:?} after the broker restarted");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The stream carries the new broker's messages, and never the refused one.
    loop {
        let event = sse.next_message().await.json();
        assert_ne!(event["text"], "while down");
        if event["text"] == "after" {
            break;
        }
    }
    web.signal("TERM");
    assert!(web.wait_exit(DEADLINE).success());
    broker.signal("TERM");
    assert!(broker.wait_exit(DEADLINE).success());
}

#[test]
fn json_logs_on_request() {
    let dir = TempDir::new("json-logs");
    let (path, _) = ports_config(&dir, true);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n[log]\nformat = \"json\"\n")).unwrap();
    let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
    let line = web.wait_for_log("listening on http://");
    let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(value["level"], "INFO");
    assert!(
        value["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with("listening on http://")
    );
    web.signal("TERM");
    assert!(web.wait_exit(DEADLINE).success());
}

/// A peer that writes junk as fast as the kernel takes it gets a line or two in the broker's
/// log, not one per frame (it once made 400,000 lines, 45 MB, of 1.2 MB of junk): each frame is
/// still counted in the metrics, and the broker goes on.
#[tokio::test]
async fn a_flood_of_junk_frames_is_logged_in_a_few_lines() {
    use std::io::Write;
    let dir = TempDir::new("junk-log");
    let broker_http = free_port();
    let (path, pull, _) = common::standalone_broker_config(
        &dir,
        &format!("[broker]\nhttp = \"127.0.0.1:{broker_http}\"\n"),
    );
    let mut broker = spawn(&["broker", "-c", path.to_str().unwrap()]);
    broker.wait_for_log("broker running");

    const FRAMES: usize = 20_000;
    let mut flood = common::zmtp::greeting();
    flood.extend(common::zmtp::ready("PUSH"));
    for _ in 0..FRAMES {
        flood.extend(common::zmtp::frame(b"junk"));
    }
    let mut peer = std::net::TcpStream::connect(("127.0.0.1", pull)).unwrap();
    peer.write_all(&flood).unwrap();

    let client = reqwest::Client::new();
    let metrics = format!("http://127.0.0.1:{broker_http}/metrics");
    common::eventually("the broker to count every junk frame", || {
        let client = client.clone();
        let metrics = metrics.clone();
        async move {
            let text = client.get(&metrics).send().await.ok()?.text().await.ok()?;
            let dropped = common::metric_in(&text, r#"temma_drops_total{reason="InvalidJson"}"#)?;
            (dropped == FRAMES as f64).then_some(())
        }
    })
    .await;
    // Every line the broker wrote so far (the reader thread is a pipe behind at most).
    std::thread::sleep(Duration::from_millis(200));
    let lines: Vec<String> = broker.1.try_iter().collect();
    let junk: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("dropped an unreadable frame"))
        .collect();
    assert!(
        !junk.is_empty() && junk.len() <= 2,
        "{} lines about {FRAMES} junk frames: {:?}",
        junk.len(),
        &junk[..junk.len().min(5)]
    );
    assert!(
        junk[0].contains("suppressed=0 suppressed_secs=0"),
        "{}",
        junk[0]
    );
    assert!(
        lines.len() < 20,
        "{} log lines in all: {:?}",
        lines.len(),
        &lines[..lines.len().min(20)]
    );
    let health = client
        .get(format!("http://127.0.0.1:{broker_http}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

/// A standalone broker (`RUST_LOG` as given, if any), and its PUB port.
fn broker_for_the_crate_log(name: &str, rust_log: Option<&str>) -> (TempDir, common::Running, u16) {
    let dir = TempDir::new(name);
    let (path, _, publish) = common::standalone_broker_config(&dir, "");
    let mut command = temma(&["broker", "-c", path.to_str().unwrap()]);
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    let mut broker = common::run_command(&mut command);
    broker.wait_for_log("broker running");
    (dir, broker, publish)
}

/// A raw peer on the PUB port that writes `junk` frames the crate cannot use, then subscribes
/// past the limit.
fn oversubscribe(publish: u16, junk: usize) -> std::net::TcpStream {
    use std::io::Write;
    let mut flood = common::zmtp::greeting();
    flood.extend(common::zmtp::ready("SUB"));
    for _ in 0..junk {
        flood.extend(common::zmtp::frame(&[7])); // neither a subscription nor a cancel
    }
    for _ in 0..100 {
        flood.extend(common::zmtp::subscription(true, "x"));
    }
    let mut peer = std::net::TcpStream::connect(("127.0.0.1", publish)).unwrap();
    peer.write_all(&flood).unwrap();
    peer
}

/// The zeromq crate's own warnings reach temma's log, throttled per call site: a peer writing
/// junk on the PUB socket gets a line or two, and the line saying that a peer went past the
/// subscription limit is not lost among them.
#[test]
fn the_zeromq_crate_s_warnings_are_logged_throttled() {
    let (_dir, mut broker, publish) = broker_for_the_crate_log("crate-log", None);
    let _peer = oversubscribe(publish, 20_000);
    let (cut, before) = broker.wait_for_log_after("subscriptions; disconnecting it");
    assert!(
        cut.contains("WARN zeromq:")
            && cut.contains("origin=\"zeromq::")
            && cut.contains("went past 64 subscriptions"),
        "{cut}"
    );
    let junk = before
        .iter()
        .filter(|line| line.contains("unexpected first byte"))
        .count();
    assert!(
        (1..=2).contains(&junk),
        "{junk} lines about 20,000 junk frames: {before:?}"
    );
    // Its `info` lines are off unless the filter names the crate (next test).
    broker.signal("TERM");
    assert!(broker.wait_exit(common::DEADLINE).success());
    let rest: Vec<String> = broker.1.iter().collect();
    assert!(
        !rest.iter().any(|line| line.contains("Client disconnected")),
        "{rest:?}"
    );
}

/// `RUST_LOG` filters the crate's lines by their target, `zeromq`: `zeromq=info` shows its
/// `info` lines too (a peer gone), `zeromq=error` not even its warnings.
#[test]
fn rust_log_filters_the_zeromq_crate_s_lines() {
    let (_dir, mut broker, publish) =
        broker_for_the_crate_log("crate-log-info", Some("info,zeromq=info"));
    let _peer = oversubscribe(publish, 0);
    let cut = broker.wait_for_log("subscriptions; disconnecting it");
    assert!(cut.contains("WARN zeromq:"), "{cut}");
    let gone = broker.wait_for_log("Client disconnected");
    assert!(gone.contains("INFO zeromq:"), "{gone}");

    let (_dir, mut broker, publish) =
        broker_for_the_crate_log("crate-log-error", Some("info,zeromq=error"));
    let mut peer = oversubscribe(publish, 0);
    // The peer is cut off: its socket reads the end.
    peer.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let _ = std::io::Read::read_to_end(&mut peer, &mut Vec::new());
    broker.signal("TERM");
    assert!(broker.wait_exit(common::DEADLINE).success());
    // Every line it wrote is in the channel once it has exited and its stderr is closed.
    let rest: Vec<String> = broker.1.iter().collect();
    assert!(
        rest.iter().any(|line| line.contains("INFO temma")),
        "temma's own info lines are kept: {rest:?}"
    );
    assert!(
        !rest.iter().any(|line| line.contains(" zeromq:")),
        "no line of the crate's under `error`: {rest:?}"
    );
}
