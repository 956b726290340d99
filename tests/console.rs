//! The operator's console (`[console]`) on the real binary: off by default, the token login
//! (wrong tokens limited, the session cookie's flags), the live stats stream, logout.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TempDir, ports_config, run_command, spawn, temma};
use serde_json::Value;

const TOKEN: &str = "a-console-token-of-some-length";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Reads SSE frames until one of `event`, within the deadline; its data as JSON.
async fn next_event(response: &mut reqwest::Response, buffer: &mut String, event: &str) -> Value {
    let start = Instant::now();
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let name = frame
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("message");
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            if name == event {
                return serde_json::from_str(data).unwrap();
            }
            continue;
        }
        let left = Duration::from_secs(10).saturating_sub(start.elapsed());
        let chunk = tokio::time::timeout(left, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no `{event}` event in time"))
            .unwrap()
            .expect("the stream stays open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn the_console_is_off_by_default() {
    let dir = TempDir::new("console-off");
    let (path, http) = ports_config(&dir, true);
    let mut web = spawn(&["serve", "-c", path.to_str().unwrap()]);
    web.wait_for_log("listening on http://");
    let client = client();
    for path in ["/console/stats", "/console/session"] {
        let response = client
            .get(format!("http://127.0.0.1:{http}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let response = client
        .post(format!("http://127.0.0.1:{http}/console/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), 200);
}

#[tokio::test]
async fn login_session_stats_and_logout() {
    let dir = TempDir::new("console-on");
    let (path, http) = ports_config(&dir, true);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(
        "[console]\nenabled = true\n[[broker.scripts]]\nfile = \"scripts/commands.rhai\"\n",
    );
    text = text.replace(
        "shutdown_grace_secs = 2\n",
        "shutdown_grace_secs = 2\ntrusted_proxies = [\"127.0.0.1\"]\n",
    );
    std::fs::write(&path, text).unwrap();
    let mut command = temma(&["serve", "-c", path.to_str().unwrap()]);
    command.env("TEMMA_CONSOLE_TOKEN", TOKEN);
    let mut web = run_command(&mut command);
    web.wait_for_log("listening on http://");
    let base = format!("http://127.0.0.1:{http}");
    let client = client();

    // Without a session: the login page, and nothing else but its own files.
    let page = client.get(format!("{base}/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains(r#"<form id="login">"#));
    for path in [
        "/console/stats",
        "/console/console.js",
        "/console/index.html",
    ] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("log in"), "{body}");
    }
    let login_js = client
        .get(format!("{base}/console/login.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(login_js.status(), 200);

    // Wrong tokens: 401, then 429 for that client (even with the right token), not others.
    let login = |client_ip: &'static str, token: &'static str| {
        client
            .post(format!("{base}/console/login"))
            .header("x-forwarded-for", client_ip)
            .form(&[("token", token)])
            .send()
    };
    for _ in 0..5 {
        let response = login("198.51.100.1", "guess-guess-guess").await.unwrap();
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "wrong token");
    }
    let limited = login("198.51.100.1", TOKEN).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));

    // The right token from another client: a session cookie, HttpOnly and SameSite=Strict.
    let response = login("198.51.100.2", TOKEN).await.unwrap();
    assert_eq!(response.status(), 200);
    let cookie = response
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is a session id, not the token"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let get = |path: &str| {
        client
            .get(format!("{base}{path}"))
            .header("cookie", session.clone())
            .send()
    };
    let page = get("/console").await.unwrap().text().await.unwrap();
    assert!(page.contains(r#"id="charts""#));
    assert_eq!(get("/console/session").await.unwrap().status(), 200);
    assert_eq!(get("/console/console.js").await.unwrap().status(), 200);
    // A path out of the folder is no file of the console.
    assert_eq!(
        get("/console/..%2Fetc%2Fpasswd").await.unwrap().status(),
        404
    );

    // The stream: the history first, then a sample a second, which sees a post.
    let mut stream = get("/console/stats").await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut buffer = String::new();
    let history = next_event(&mut stream, &mut buffer, "history").await;
    assert!(history.is_array());
    let first = next_event(&mut stream, &mut buffer, "stats").await;
    for key in [
        "published",
        "delivered",
        "clients",
        "posts",
        "latency_ms",
        "drops",
        "scripts",
        "rss_bytes",
        "fds",
        "nodes",
        "top_rooms",
    ] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }
    assert!(first["rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(first["nodes"][0]["this"], true);
    let posted = client
        .post(format!("{base}/message/broadcast"))
        .form(&[("from", "ann"), ("text", "hello")])
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    let start = Instant::now();
    loop {
        let sample = next_event(&mut stream, &mut buffer, "stats").await;
        if sample["posts"]["200"].as_f64().unwrap_or(0.0) > 0.0
            && sample["published"].as_f64().unwrap() > 0.0
        {
            assert!(sample["latency_ms"]["p50"].as_f64().is_some(), "{sample}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{sample}");
    }

    // The chain: in the samples, and a message tried on it, published nowhere.
    assert_eq!(first["chain"][0]["name"], "commands", "{first}");
    assert_eq!(first["chain"][0]["file"], "scripts/commands.rhai");
    let tried: Value = client
        .post(format!("{base}/console/try"))
        .header("cookie", session.clone())
        .body(r#"{"from":"ann","text":"/me waves"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tried["steps"][0]["script"], "commands", "{tried}");
    assert_eq!(tried["steps"][0]["outcome"], "passed");
    assert_eq!(tried["steps"][0]["changed"], true);
    assert_eq!(tried["published"]["kind"], "action");
    assert_eq!(tried["published"]["text"], "waves");
    let refused = client
        .post(format!("{base}/console/try"))
        .header("cookie", session.clone())
        .body(r#"{"from":"ann","text":"/dance"}"#)
        .send()
        .await
        .unwrap();
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["steps"][0]["outcome"], "rejected", "{refused}");
    assert_eq!(refused["steps"][0]["status"], 400);
    assert!(refused["published"].is_null());
    let bad = client
        .post(format!("{base}/console/try"))
        .header("cookie", session.clone())
        .body("[1, 2]")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let anonymous = client
        .post(format!("{base}/console/try"))
        .body(r#"{"text":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    // Logout ends the session.
    let out = client
        .post(format!("{base}/console/logout"))
        .header("cookie", session.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200);
    assert_eq!(get("/console/session").await.unwrap().status(), 401);
    assert_eq!(get("/console/stats").await.unwrap().status(), 401);
}
