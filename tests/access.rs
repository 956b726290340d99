//! The web node's access hook (`[access]`) over real sockets: the bundled private rooms, both
//! SSE paths and POSTs, a failing hook, and hot reload.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use common::{Sse, TempDir, TestApp, manifest_dir};

fn private_rooms(config: &mut temma::config::Config) {
    config.access.file = Some(manifest_dir().join("scripts/private_rooms.rhai"));
    config.access.params.insert(
        "rooms".into(),
        serde_json::json!({ "staff": "s3cret", "board": "b0ard" }),
    );
}

async fn post(app: &TestApp, query: &str, room: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url(&format!("/message/broadcast{query}")))
        .form(&[("from", "a"), ("text", "hello"), ("room", room)]);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn error(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

const REFUSED: &str = "room staff is private: it needs its token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_rooms_need_their_token() {
    let app = TestApp::start_with(private_rooms).await;
    app.ready().await;
    // Following: refused without the token, on the direct path and on hyper's.
    let refused = Sse::connect(&app.client, &app.url("/event/fetch?room=staff"), None).await;
    assert_eq!(refused.status, 403);
    let response = app
        .client
        .get(app.url("/event/fetch?room=staff&token=wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await, (403, REFUSED.to_owned()));
    let kept = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    kept.get(app.url("/health")).send().await.unwrap();
    let refused = Sse::connect(&kept, &app.url("/event/fetch?room=staff"), None).await;
    assert_eq!(refused.status, 403, "the hyper path checks too");
    let mut staff = Sse::connect(
        &app.client,
        &app.url("/event/fetch?room=staff&token=s3cret"),
        None,
    )
    .await;
    assert_eq!(staff.status, 200);
    // Another room's token does not open this one.
    let other = Sse::connect(
        &app.client,
        &app.url("/event/fetch?room=staff&token=b0ard"),
        None,
    )
    .await;
    assert_eq!(other.status, 403);

    // Posting: refused without the token; the query or a bearer header carries it.
    assert_eq!(
        error(post(&app, "", "staff", None).await).await,
        (403, REFUSED.to_owned())
    );
    assert_eq!(
        post(&app, "?token=s3cret", "staff", None).await.status(),
        200
    );
    assert_eq!(post(&app, "", "staff", Some("s3cret")).await.status(), 200);
    assert_eq!(staff.texts(2).await, ["hello", "hello"]);
    // Open rooms stay open.
    assert_eq!(post(&app, "", "lobby", None).await.status(), 200);
    let open = Sse::connect(&app.client, &app.url("/event/fetch?room=lobby"), None).await;
    assert_eq!(open.status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hook_fails_closed_and_a_new_version_is_picked_up() {
    let dir = TempDir::new("access-reload");
    let hook = dir.0.join("hook.rhai");
    std::fs::write(
        &hook,
        "fn on_subscribe(req) { if req.room == \"boom\" { throw \"broken\"; } }\n",
    )
    .unwrap();
    let app = TestApp::start_with(|config| {
        config.access.file = Some(hook.clone());
    })
    .await;
    app.ready().await;
    // A hook that throws: refused (on_error = "drop", the default), said plainly.
    let response = app
        .client
        .get(app.url("/event/fetch?room=boom"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error(response).await,
        (403, "access could not be checked".to_owned())
    );
    // Without `on_publish`, posting is not checked.
    assert_eq!(post(&app, "", "boom", None).await.status(), 200);
    let open = Sse::connect(&app.client, &app.url("/event/fetch?room=calm"), None).await;
    assert_eq!(open.status, 200);

    // A new version of the file takes over, with no restart.
    std::fs::write(
        &hook,
        "fn on_subscribe(req) { reject(\"closed for maintenance\", 403) }\n",
    )
    .unwrap();
    common::eventually("the new hook", || async {
        let response = app
            .client
            .get(app.url("/event/fetch?room=calm"))
            .send()
            .await
            .ok()?;
        (response.status() == 403).then_some(())
    })
    .await;
    // A version that does not compile is refused; the previous one keeps running.
    std::fs::write(&hook, "fn on_subscribe(req) { reject( }\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let response = app
        .client
        .get(app.url("/event/fetch?room=calm"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error(response).await,
        (403, "closed for maintenance".to_owned())
    );
    app.stop().await;
}

#[test]
fn a_broken_hook_is_a_configuration_error_with_its_place() {
    let dir = TempDir::new("access-broken");
    let hook = dir.0.join("hook.rhai");
    std::fs::write(&hook, "fn on_subscribe(req) {\n  let x = ;\n}\n").unwrap();
    let path = common::write_config(
        &dir.0,
        &format!("[access]\nfile = \"{}\"\n", hook.display()),
    );
    let output = common::temma(&["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("`access.file (hook)`: {}:2:11:", hook.display())),
        "{stderr}"
    );
    std::fs::write(&hook, "fn on_message(msg) { msg }\n").unwrap();
    let output = common::temma(&["check", "-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("defines no `fn on_subscribe(req)` nor `fn on_publish(req)`"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_tokens_open_one_room_until_they_expire() {
    let secret = "a long random secret";
    let app = TestApp::start_with(|config| {
        config.access.file = Some(manifest_dir().join("scripts/signed_rooms.rhai"));
        config
            .access
            .params
            .insert("secret".into(), serde_json::json!(secret));
    })
    .await;
    app.ready().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |room: &str, expiry: u64| {
        let signature = temma::script::hmac_sha256(secret, &format!("{room}.{expiry}"));
        format!("{expiry}.{signature}")
    };
    let status = |query: String| {
        let client = app.client.clone();
        let url = app.url(&format!("/event/fetch?{query}"));
        async move {
            let response = client.get(url).send().await.unwrap();
            error(response).await
        }
    };
    let valid = token("staff", now + 3600);
    let sse = Sse::connect(
        &app.client,
        &app.url(&format!("/event/fetch?room=staff&token={valid}")),
        None,
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        status(format!("room=board&token={valid}")).await,
        (403, "this token does not open room board".to_owned())
    );
    assert_eq!(
        status(format!("room=staff&token={}", token("staff", now - 10))).await,
        (401, "this token has expired".to_owned())
    );
    assert_eq!(
        status("room=staff".to_owned()).await,
        (401, "room staff needs a token".to_owned())
    );
    assert_eq!(
        status("room=staff&token=garbage".to_owned()).await,
        (401, "this is not a token".to_owned())
    );
    // The open room needs nothing.
    let general = Sse::connect(&app.client, &app.url("/event/fetch"), None).await;
    assert_eq!(general.status, 200);
    // The signature matches the shell recipe of the script's comment (openssl's HMAC).
    assert_eq!(
        temma::script::hmac_sha256("key", "The quick brown fox jumps over the lazy dog"),
        "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    );
    app.stop().await;
}

/// `temma script` runs the access hook too: each function's verdict on a request.
#[test]
fn temma_script_tries_the_access_hook() {
    let run = |message: &str| {
        let output = common::temma(&[
            "script",
            "--no-config",
            "scripts/private_rooms.rhai",
            "-p",
            r#"{"rooms":{"staff":"s3cret"}}"#,
            "-m",
            message,
        ])
        .current_dir(manifest_dir())
        .output()
        .unwrap();
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert_eq!(
        run(r#"{"room":"staff"}"#),
        "on_subscribe: refused (403): room staff is private: it needs its token\non_publish: refused (403): room staff is private: it needs its token\n"
    );
    assert_eq!(
        run(r#"{"room":"staff","query":{"token":"s3cret"}}"#),
        "on_subscribe: allowed\non_publish: allowed\n"
    );
    assert_eq!(
        run(r#"{"room":"staff","headers":{"authorization":"Bearer s3cret"}}"#),
        "on_subscribe: allowed\non_publish: allowed\n"
    );
}
