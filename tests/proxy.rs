//! temma behind Debian's nginx, with the shipped `etc/nginx/temma-locations.conf` included as
//! docs/deploy.md says: an SSE frame passes through unbuffered, a reconnection with
//! `Last-Event-ID` replays through the proxy, and POSTs, the page and `/metrics` (refused from
//! elsewhere than the proxy host) behave.
//!
//! Needs the `nginx` binary: `.ci/run` installs it and runs this suite with `--ignored`
//! (`cargo test --test proxy -- --ignored`).
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sse, TempDir, TestApp, free_port, manifest_dir};

/// nginx in the foreground with a config of its own, stopped on drop.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nginx(dir: &TempDir, upstream: u16, listen: u16, tls: u16) -> Nginx {
    let locations = manifest_dir().join("etc/nginx/temma-locations.conf");
    let prefix = dir.0.display();
    // A self-signed certificate for the HTTP/2 server (browsers speak HTTP/2 over TLS only).
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(dir.0.join("key.pem"))
        .arg("-out")
        .arg(dir.0.join("cert.pem"))
        .output()
        .expect("openssl is installed");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let config = format!(
        r#"daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream temma {{
        server 127.0.0.1:{upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{listen};
        server_name localhost;
        include {locations};
    }}
    # As etc/nginx/temma.conf: TLS and HTTP/2.
    server {{
        listen 127.0.0.1:{tls} ssl http2;
        server_name localhost;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        include {locations};
    }}
}}
"#,
        locations = locations.display()
    );
    let path = dir.0.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let check = Command::new("nginx")
        .args([
            "-t",
            "-p",
            &prefix.to_string(),
            "-c",
            path.to_str().unwrap(),
        ])
        .output()
        .expect("nginx is installed (.ci/run installs it)");
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new("nginx")
        .args(["-p", &prefix.to_string(), "-c", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Nginx(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nginx: .ci/run installs it and runs this with --ignored"]
async fn sse_through_nginx_is_unbuffered_and_replays() {
    let app = TestApp::start().await;
    app.ready().await;
    let dir = TempDir::new("nginx");
    let (listen, tls) = (free_port(), free_port());
    let _nginx = start_nginx(&dir, app.http.port(), listen, tls);
    let proxy = format!("http://127.0.0.1:{listen}");
    let client = reqwest::Client::new();
    common::eventually("nginx answering", || async {
        let response = client.get(format!("{proxy}/health")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;

    let mut sse = Sse::connect(&client, &format!("{proxy}/event/fetch"), None).await;
    // Each frame's way from the POST to the reader through nginx, a few times. A buffering
    // proxy holds a small frame until its buffer fills (4–8 KiB) or the stream ends: seconds,
    // or never.
    let mut slowest = Duration::ZERO;
    let mut last_id = String::new();
    for i in 0..5 {
        let text = format!("through nginx {i}");
        let sent = Instant::now();
        let answer = client
            .post(format!("{proxy}/message/broadcast"))
            .form(&[("from", "proxy"), ("text", text.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let event = sse.next_message().await;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(event.json()["text"], text);
        last_id = event.id.clone().unwrap();
        if i == 1 {
            // Remember where the browser was; it reconnects from here below.
            last_id = event.id.clone().unwrap();
            drop(std::mem::replace(
                &mut sse,
                Sse::connect(&client, &format!("{proxy}/event/fetch"), None).await,
            ));
            let reconnect_from = last_id.clone();
            // Two more while that browser is away.
            for text in ["missed 1", "missed 2"] {
                let answer = client
                    .post(format!("{proxy}/message/broadcast"))
                    .form(&[("from", "proxy"), ("text", text)])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 200);
            }
            let mut back = Sse::connect(
                &client,
                &format!("{proxy}/event/fetch"),
                Some(&reconnect_from),
            )
            .await;
            assert_eq!(back.texts(2).await, ["missed 1", "missed 2"]);
            // The other stream got them live.
            assert_eq!(sse.texts(2).await, ["missed 1", "missed 2"]);
        }
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a frame took {slowest:?} through nginx: is it buffering?"
    );
    assert!(!last_id.is_empty());

    // Over TLS and HTTP/2, as browsers reach it: the stream is HTTP/2 and frames arrive.
    let mut curl = Command::new("curl")
        .args(["-sk", "--http2", "-N", "--max-time", "5"])
        .args(["-w", "\nHTTP version %{http_version}\n"])
        .arg(format!("https://localhost:{tls}/event/fetch"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is installed");
    // curl connects at its own pace: post a few, one after another.
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = client
            .post(format!("{proxy}/message/broadcast"))
            .form(&[
                ("from", "proxy"),
                ("text", format!("over http2 {i}").as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let output = tokio::task::spawn_blocking(move || {
        let _ = curl.wait();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut curl.stdout.take().unwrap(), &mut text).unwrap();
        text
    })
    .await
    .unwrap();
    assert!(output.contains("HTTP version 2"), "{output}");
    assert!(output.contains("\"text\":\"over http2 9\""), "{output}");

    // The page comes through; /metrics is for the proxy host only (allowed here, as the test
    // runs on it) and says where the POSTs came from.
    let page = client.get(format!("{proxy}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let metrics = client.get(format!("{proxy}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    // A bad POST still gets temma's JSON error through the proxy.
    let bad = client
        .post(format!("{proxy}/message/broadcast"))
        .form(&[("from", "proxy")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("text"), "{body}");
    app.stop().await;
}
