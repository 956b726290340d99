//! `POST /message/broadcast` served without hyper (`src/direct_post.rs`): the same answers as
//! salvo's handler, keep-alive and pipelined requests, the hand-off of anything else to hyper,
//! and hostile connections — over real sockets against a running server.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, TestApp, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lower-case names, in order.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_str())
    }

    /// The headers that do not change from one answer to the next, sorted.
    fn stable_headers(&self) -> Vec<(String, String)> {
        let mut headers: Vec<_> = self
            .headers
            .iter()
            .filter(|(name, _)| name != "date")
            .map(|(name, value)| {
                let value = if name == "x-message-id" {
                    "(an id)".to_owned()
                } else {
                    value.clone()
                };
                (name.clone(), value)
            })
            .collect();
        headers.sort();
        headers
    }
}

/// A POST whose body stops after 10 of the 100 bytes it announces.
const CUT_BODY: &[u8] = b"POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nfrom=ann&t";

/// A raw HTTP/1.1 connection that reads answers one after the other.
struct Conn {
    read: Answers,
    write: tokio::net::tcp::OwnedWriteHalf,
}

/// The reading half of a [`Conn`].
struct Answers {
    socket: tokio::net::tcp::OwnedReadHalf,
    buffer: Vec<u8>,
}

impl Conn {
    /// A connection that sends `bytes`, then shuts its sending side down, and the answer it
    /// gets.
    async fn half_closed(app: &TestApp, bytes: &[u8]) -> (Conn, Answer) {
        let mut conn = Conn::open(app).await;
        conn.send(bytes).await;
        conn.write.shutdown().await.unwrap();
        let answer = conn.answer().await.unwrap();
        (conn, answer)
    }

    async fn open(app: &TestApp) -> Conn {
        let (read, write) = TcpStream::connect(app.http).await.unwrap().into_split();
        Conn {
            read: Answers {
                socket: read,
                buffer: Vec::new(),
            },
            write,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
    }

    async fn answer(&mut self) -> Option<Answer> {
        self.read.next().await
    }

    async fn closed_within(&mut self, limit: Duration) -> bool {
        self.read.closed_within(limit).await
    }
}

impl Answers {
    /// The next whole answer (its body sized by `Content-Length`); `None` if the connection
    /// closes first.
    async fn next(&mut self) -> Option<Answer> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(answer) = self.parse() {
                    return Some(answer);
                }
                let mut chunk = [0u8; 16 * 1024];
                match self.socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("an answer in time")
    }

    fn parse(&mut self) -> Option<Answer> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = response.parse(&self.buffer).unwrap() else {
            return None;
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .map(|(_, value)| value.parse().unwrap())
            .unwrap_or(0);
        if self.buffer.len() < head + length {
            return None;
        }
        let status = response.code.unwrap();
        let body = String::from_utf8_lossy(&self.buffer[head..head + length]).into_owned();
        self.buffer.drain(..head + length);
        Some(Answer {
            status,
            headers,
            body,
        })
    }

    /// Whether the server closes the connection within `limit` (what arrives meanwhile is
    /// kept for [`Answers::next`]).
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 4096];
        tokio::time::timeout(limit, async {
            loop {
                match self.socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .is_ok()
    }
}

/// A `POST /message/broadcast` with a `Content-Length` body (what the direct path serves).
fn plain(content_type: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The same POST with a chunked body (what the direct path leaves to hyper).
fn chunked(content_type: &str, headers: &str, body: &str) -> Vec<u8> {
    let mut bytes = format!(
        "POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n{headers}Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    if !body.is_empty() {
        bytes.extend_from_slice(format!("{:x}\r\n{body}\r\n", body.len()).as_bytes());
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

fn direct_posts(app: &TestApp) -> f64 {
    metric(app, "temma_direct_requests_total{request=\"Post\"}").unwrap_or(0.0)
}

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_path_answers_as_salvo_does() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    let cases: [(&str, &str, &str, u16); 9] = [
        (FORM, "", "from=ann&text=hello", 200),
        (JSON, "", r#"{"from":"bob","text":"json"}"#, 200),
        (FORM, "Idempotency-Key: k-1\r\n", "from=cy&text=keyed", 200),
        (FORM, "", "from=ann", 400),
        (FORM, "", "from=ann&text=x&colour=red", 400),
        (JSON, "", "{not json", 400),
        ("text/plain", "", "from=ann&text=x", 415),
        (FORM, "Idempotency-Key: \r\n", "from=ann&text=x", 400),
        (
            FORM,
            "Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\n",
            "from=ann&text=x",
            403,
        ),
    ];
    let before = direct_posts(&app);
    let mut published = 0;
    for (content_type, headers, body, status) in cases {
        let mut direct = Conn::open(&app).await;
        direct.send(&plain(content_type, headers, body)).await;
        let direct = direct.answer().await.unwrap();
        let mut hyper = Conn::open(&app).await;
        hyper.send(&chunked(content_type, headers, body)).await;
        let hyper = hyper.answer().await.unwrap();
        assert_eq!(direct.status, status, "{body}: {direct:?}");
        assert_eq!(hyper.status, status, "{body}: {hyper:?}");
        assert_eq!(direct.stable_headers(), hyper.stable_headers(), "{body}");
        assert!(direct.header("date").is_some(), "{direct:?}");
        // The keyed message is published once: the second answer names the first's id.
        if headers.starts_with("Idempotency-Key: k") {
            assert_eq!(direct.header("x-message-id"), hyper.header("x-message-id"));
            published += 1;
        } else if status == 200 {
            assert_ne!(direct.header("x-message-id"), hyper.header("x-message-id"));
            published += 2;
        } else {
            assert_eq!(direct.body, hyper.body, "{body}");
            assert!(direct.body.starts_with("{\"error\":"), "{}", direct.body);
        }
    }
    assert_eq!(direct_posts(&app) - before, cases.len() as f64);
    // Both paths published: every message arrives, in the order sent.
    let texts = sse.texts(published).await;
    assert_eq!(texts, ["hello", "hello", "json", "json", "keyed"]);
    // Answers are counted alike on both paths.
    assert!(
        metric(&app, "temma_posts_total{status=\"400\"}").unwrap() >= 8.0,
        "{}",
        app.app().metrics().render()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_served_in_turn_then_handed_to_hyper() {
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    // Three POSTs and a GET written at once (pipelined), the first body split from its head.
    let mut conn = Conn::open(&app).await;
    let first = plain(FORM, "", "from=ann&text=one");
    let (head, body) = first.split_at(first.len() - 5);
    conn.send(head).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut rest = body.to_vec();
    rest.extend(plain(JSON, "", r#"{"from":"ann","text":"two"}"#));
    rest.extend(plain(FORM, "", "from=ann&text=three"));
    rest.extend(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    conn.send(&rest).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let answer = conn.answer().await.unwrap();
        assert_eq!((answer.status, answer.body.as_str()), (200, "true"));
        ids.push(answer.header("x-message-id").unwrap().to_owned());
    }
    let health = conn.answer().await.unwrap();
    assert_eq!(health.status, 200);
    assert!(health.body.contains("\"status\""), "{}", health.body);
    // Hyper has the connection now, and serves what comes next on it.
    conn.send(&plain(FORM, "", "from=ann&text=four")).await;
    assert_eq!(conn.answer().await.unwrap().status, 200);
    let messages = sse.messages(4).await;
    let texts: Vec<_> = messages.iter().map(|m| m.json()["text"].clone()).collect();
    assert_eq!(texts, ["one", "two", "three", "four"]);
    let sent: Vec<_> = messages.iter().map(|m| m.id.clone().unwrap()).collect();
    assert_eq!(sent[..3], ids[..]);

    // A POST, then a stream on the same connection: served directly too.
    let streams = metric(&app, "temma_direct_requests_total{request=\"Stream\"}").unwrap();
    let mut conn = Conn::open(&app).await;
    conn.send(&plain(FORM, "", "from=ann&text=five")).await;
    assert_eq!(conn.answer().await.unwrap().status, 200);
    conn.send(b"GET /event/fetch HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    // The stream's head (no length: the answer ends at its head).
    let head = conn.answer().await.unwrap();
    assert_eq!(head.status, 200, "{head:?}");
    assert!(
        head.header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{head:?}"
    );
    assert_eq!(
        metric(&app, "temma_direct_requests_total{request=\"Stream\"}").unwrap(),
        streams + 1.0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_kept_alive_connection_reads_every_head_wherever_its_buffer_has_got_to() {
    // One connection, POSTs one after another: the buffer's room is used up from the front,
    // and before each head is read what is left is moved back to the front of the allocation
    // (with part of a head in it when the head came in two writes).
    let app = TestApp::start().await;
    app.ready().await;
    let mut sse = app.sse().await;
    let before = direct_posts(&app);
    let mut conn = Conn::open(&app).await;
    let mut ids = Vec::new();
    const POSTS: usize = 24;
    for n in 0..POSTS {
        // Heads of five lengths: the room runs out at a different place each time.
        let padding = "X-Pad: padding\r\n".repeat(n % 5);
        let request = plain(FORM, &padding, &format!("from=ann&text=m{n}"));
        if n % 3 == 0 {
            let (start, end) = request.split_at(request.len() / 2);
            conn.send(start).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            conn.send(end).await;
        } else {
            conn.send(&request).await;
        }
        let answer = conn.answer().await.unwrap();
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, "true"),
            "POST {n}"
        );
        ids.push(answer.header("x-message-id").unwrap().to_owned());
    }
    assert_eq!(
        direct_posts(&app),
        before + POSTS as f64,
        "all served directly"
    );
    let messages = sse.messages(POSTS).await;
    let texts: Vec<_> = messages.iter().map(|m| m.json()["text"].clone()).collect();
    let expected: Vec<_> = (0..POSTS)
        .map(|n| serde_json::json!(format!("m{n}")))
        .collect();
    assert_eq!(texts, expected);
    let sent: Vec<_> = messages.iter().map(|m| m.id.clone().unwrap()).collect();
    assert_eq!(sent, ids);
    app.stop().await;
}

/// The head deadline runs from each answer: a kept-alive connection that keeps posting, each
/// request well within the deadline, stays open past it (the connection's one timer is pushed
/// back at each request), and is closed once it falls idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_that_keeps_posting_outlives_the_head_deadline() {
    let app = TestApp::start_with(|config| config.server.head_timeout_secs = 1).await;
    app.ready().await;
    let mut sse = app.sse().await;
    let mut conn = Conn::open(&app).await;
    let started = std::time::Instant::now();
    for n in 0..7 {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        conn.send(&plain(FORM, "", &format!("from=ann&text=busy+{n}")))
            .await;
        let answer = conn.answer().await;
        assert_eq!(answer.map(|answer| answer.status), Some(200), "POST {n}");
    }
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "the POSTs spanned more than twice the head deadline"
    );
    let texts = sse.texts(7).await;
    assert_eq!(
        texts,
        (0..7).map(|n| format!("busy {n}")).collect::<Vec<_>>()
    );
    assert!(
        conn.closed_within(Duration::from_secs(4)).await,
        "idle: closed"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_posts_get_their_answer_and_others_are_served() {
    let app = TestApp::start_with(|config| {
        config.server.head_timeout_secs = 1;
        config.server.body_timeout_secs = 1;
        config.message.max_body_bytes = 1024;
    })
    .await;
    app.ready().await;
    let mut sse = app.sse().await;

    // A body that trickles: 408 at the body's deadline, and the connection closes.
    let started = Instant::now();
    let Conn {
        read: mut answers,
        write: mut writer,
    } = Conn::open(&app).await;
    writer
        .write_all(b"POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nfrom=")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    let answer = answers.next().await.unwrap();
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(
        answer.body.contains("did not arrive within 1 s"),
        "{answer:?}"
    );
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(answers.closed_within(Duration::from_secs(2)).await);
    assert!(started.elapsed() < Duration::from_secs(4));
    trickle.abort();

    // Bodies past `message.max_body_bytes`, lengths that are not one number, junk after a
    // POST: hyper answers each, as before.
    let too_long = "x".repeat(2000);
    for (request, status) in [
        (plain(FORM, "", &too_long), 413),
        (
            b"POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Length: 4x\r\n\r\nabcd".to_vec(),
            400,
        ),
        (
            b"POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd".to_vec(),
            400,
        ),
    ] {
        let mut conn = Conn::open(&app).await;
        conn.send(&request).await;
        let answer = conn.answer().await.unwrap();
        assert_eq!(answer.status, status, "{answer:?}");
        assert!(answer.body.starts_with("{\"error\":"), "{answer:?}");
    }
    let mut conn = Conn::open(&app).await;
    let mut request = plain(FORM, "", "from=ann&text=before junk");
    request.extend_from_slice(b"\x00\x01 not http at all\r\n\r\n");
    conn.send(&request).await;
    assert_eq!(conn.answer().await.unwrap().status, 200);
    let junk = conn.answer().await.unwrap();
    assert_eq!(junk.status, 400, "{junk:?}");
    assert!(junk.body.contains("not HTTP/1.x"), "{junk:?}");
    assert!(conn.closed_within(Duration::from_secs(2)).await);
    // A TLS handshake on the plain port, as a first request: the same answer.
    let mut tls = Conn::open(&app).await;
    tls.send(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
        .await;
    let answer = tls.answer().await.unwrap();
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("not HTTP/1.x"), "{answer:?}");
    assert!(tls.closed_within(Duration::from_secs(2)).await);
    // A client that ends its side in the middle of a head, or of a body, is told what was
    // missing (it may still read), and the connection closes.
    let (mut cut, answer) = Conn::half_closed(
        &app,
        b"POST /message/broadcast HTTP/1.1\r\nHost: t\r\nContent-Le",
    )
    .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer.body.contains("ended before its head was complete"),
        "{answer:?}"
    );
    assert!(cut.closed_within(Duration::from_secs(2)).await);
    let (mut cut, answer) = Conn::half_closed(&app, CUT_BODY).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer
            .body
            .contains("the body ended after 10 of its 100 bytes"),
        "{answer:?}"
    );
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(cut.closed_within(Duration::from_secs(2)).await);
    assert_eq!(
        metric(
            &app,
            "temma_connections_refused_total{reason=\"Malformed\"}"
        ),
        Some(5.0)
    );

    // A thousand POSTs in one write: answered in order, none lost (read while writing: the
    // server answers as the requests come).
    let Conn {
        read: mut answers,
        write: mut writer,
    } = Conn::open(&app).await;
    let mut burst = Vec::new();
    for n in 0..1000 {
        burst.extend(plain(FORM, "", &format!("from=ann&text=burst {n}")));
    }
    let (written, statuses) = tokio::join!(writer.write_all(&burst), async {
        let mut statuses = Vec::new();
        for _ in 0..1000 {
            statuses.push(answers.next().await.map(|answer| answer.status));
        }
        statuses
    });
    written.unwrap();
    assert!(
        statuses.iter().all(|status| *status == Some(200)),
        "{statuses:?}"
    );

    // A kept-alive connection that stays idle after a direct POST is closed at the head
    // deadline.
    let mut idle = Conn::open(&app).await;
    idle.send(&plain(FORM, "", "from=ann&text=idle")).await;
    assert_eq!(idle.answer().await.unwrap().status, 200);
    assert!(idle.closed_within(Duration::from_secs(4)).await);

    // Meanwhile the stream had everything, in order.
    let texts = sse.texts(1002).await;
    assert_eq!(texts[0], "before junk");
    for (n, text) in texts[1..1001].iter().enumerate() {
        assert_eq!(*text, format!("burst {n}"));
    }
    assert_eq!(texts[1001], "idle");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_cors_leave_posts_to_salvo() {
    for sessions in [true, false] {
        let app = TestApp::start_with(|config| {
            if sessions {
                config.application.enable_sessions = true;
                config.application.session_secret = Some("k".repeat(64));
            } else {
                config.server.cors_origins = vec!["https://chat.example".to_owned()];
            }
        })
        .await;
        app.ready().await;
        let mut conn = Conn::open(&app).await;
        conn.send(&plain(FORM, "", "from=ann&text=x")).await;
        let answer = conn.answer().await.unwrap();
        assert_eq!(answer.status, 200);
        if sessions {
            assert!(answer.header("set-cookie").is_some(), "{answer:?}");
        } else {
            assert!(answer.header("vary").is_some(), "{answer:?}");
        }
        // A client that ends its side once its POST is sent gets its answer; one that ends it
        // in the middle of the body is told so, as on the direct path.
        let (mut done, answer) =
            Conn::half_closed(&app, &plain(FORM, "", "from=ann&text=half-closed")).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(done.closed_within(Duration::from_secs(2)).await);
        let (mut cut, answer) = Conn::half_closed(&app, CUT_BODY).await;
        assert_eq!(answer.status, 400, "{answer:?}");
        assert!(
            answer
                .body
                .contains("the request ended before its body was complete (100 bytes announced)"),
            "{answer:?}"
        );
        assert!(cut.closed_within(Duration::from_secs(2)).await);
        assert_eq!(direct_posts(&app), 0.0, "sessions: {sessions}");
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_hook_reads_the_same_request_on_both_paths() {
    let app = TestApp::start_with(|config| {
        config.access.file = Some(common::manifest_dir().join("scripts/private_rooms.rhai"));
        config
            .access
            .params
            .insert("rooms".into(), serde_json::json!({ "staff": "s3cret" }));
    })
    .await;
    app.ready().await;
    let body = "from=ann&text=hello&room=staff";
    let before = direct_posts(&app);
    for (headers, query, status) in [
        ("", "", 403),
        ("Authorization: Bearer s3cret\r\n", "", 200),
        ("", "?token=s3cret", 200),
        ("Authorization: Bearer wrong\r\n", "", 403),
    ] {
        let mut answers = Vec::new();
        for request in [plain(FORM, headers, body), chunked(FORM, headers, body)] {
            // The query goes after the path.
            let request = String::from_utf8(request).unwrap().replacen(
                " HTTP/1.1",
                &format!("{query} HTTP/1.1"),
                1,
            );
            let mut conn = Conn::open(&app).await;
            conn.send(request.as_bytes()).await;
            answers.push(conn.answer().await.unwrap());
        }
        for answer in &answers {
            assert_eq!(answer.status, status, "{headers}{query}: {answer:?}");
        }
        if status != 200 {
            assert_eq!(answers[0].body, answers[1].body);
            assert!(answers[0].body.contains("private"), "{:?}", answers[0]);
        }
    }
    assert_eq!(direct_posts(&app) - before, 4.0, "one of each pair");
    app.stop().await;
}
