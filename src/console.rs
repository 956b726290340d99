//! The operator's console (`[console]`): the node at a glance, live, in the browser.
//!
//! Off by default; when off there is no route and no task. When on:
//!
//! - `GET /console` is the login page until the browser holds a session, then the console
//!   (`static/console/`: plain HTML, CSS and JavaScript, charts on canvas).
//! - `POST /console/login` (form field `token`) compares the token with the one in the
//!   environment variable `console.token_env` in constant time; a match opens a session: a
//!   random id in a cookie (`HttpOnly`, `SameSite=Strict`, `Path=/console`), kept in memory
//!   ([`MAX_SESSIONS`], [`SESSION_TTL`]). Failures are limited per client ([`MAX_FAILURES`] a
//!   minute) and over all clients ([`MAX_FAILURES_ALL`] a minute): `429` past that.
//! - `GET /console/stats` (SSE, with a session): `event: history` with the samples of the last
//!   15 minutes, then `event: stats` once a second. A sample is read from the node's own
//!   metrics (the text `/metrics` serves), its rooms and the other nodes' presence reports,
//!   and `/proc/self` (memory, descriptors). One task samples, whatever the number of consoles
//!   open; each console costs one SSE stream.
//! - `POST /console/logout` ends the session; `GET /console/session` says whether one is live.
//!
//! Every other `/console/…` path is a file of `static/console/`, with a session only.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use salvo::http::StatusCode;
use salvo::http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use salvo::prelude::*;
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::{JsonError, write_json};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::request::TrustedProxy;
use crate::script::{ChainStatus, Step};

/// Default `console.token_env`.
pub const DEFAULT_TOKEN_ENV: &str = "TEMMA_CONSOLE_TOKEN";
/// The shortest token accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 16;
/// One sample a second, kept this many (15 minutes).
pub const HISTORY: usize = 900;
/// Time between two samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Sessions open at once; the oldest is closed past this.
pub const MAX_SESSIONS: usize = 64;
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Failed logins a client may make in [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 5;
/// Failed logins of all clients together in [`FAILURE_WINDOW`].
pub const MAX_FAILURES_ALL: u32 = 30;
/// The window of the failure limits.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// The session cookie.
pub const COOKIE: &str = "temma_console";
/// Clients whose failures are counted at once; past this the oldest windows are forgotten.
const MAX_FAILING_CLIENTS: usize = 10_000;
/// Rooms listed in a sample, the busiest first.
const TOP_ROOMS: usize = 20;

/// The `[console]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve the console at `/console`. Default `false`: no route, no task.
    pub enabled: bool,
    /// The environment variable that holds the console's token (at least 16 characters).
    /// Default `"TEMMA_CONSOLE_TOKEN"`.
    pub token_env: String,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: false,
            token_env: DEFAULT_TOKEN_ENV.to_owned(),
        }
    }
}

impl ConsoleConfig {
    /// With the console on, its token must be set and long enough.
    pub fn validate(&self, problem: &mut impl FnMut(&str, String)) {
        if !self.enabled {
            return;
        }
        match self.token() {
            None => problem(
                "console.token_env",
                format!(
                    "names the environment variable `{}`, which is not set: the console \
                     (`console.enabled = true`) needs its token there, at least \
                     {MIN_TOKEN_CHARS} characters",
                    self.token_env
                ),
            ),
            Some(token) if token.chars().count() < MIN_TOKEN_CHARS => problem(
                "console.token_env",
                format!(
                    "the token in `{}` has {} characters: at least {MIN_TOKEN_CHARS}",
                    self.token_env,
                    token.chars().count()
                ),
            ),
            Some(_) => {}
        }
    }

    /// The token, read from the environment.
    pub fn token(&self) -> Option<String> {
        std::env::var(&self.token_env).ok()
    }
}

/// Sessions and failed logins.
#[derive(Default)]
struct Guard {
    /// Session id → when it ends.
    sessions: HashMap<String, Instant>,
    /// Client → (start of its window, failures in it).
    failures: HashMap<String, (Instant, u32)>,
    /// Failures of all clients: (start of the window, count).
    all: Option<(Instant, u32)>,
}

impl Guard {
    fn limited(&mut self, client: &str, now: Instant) -> bool {
        if self
            .all
            .is_some_and(|(start, count)| now - start < FAILURE_WINDOW && count >= MAX_FAILURES_ALL)
        {
            return true;
        }
        self.failures
            .get(client)
            .is_some_and(|(start, count)| now - *start < FAILURE_WINDOW && *count >= MAX_FAILURES)
    }

    fn failed(&mut self, client: &str, now: Instant) {
        let all = self.all.get_or_insert((now, 0));
        if now - all.0 >= FAILURE_WINDOW {
            *all = (now, 0);
        }
        all.1 += 1;
        if self.failures.len() >= MAX_FAILING_CLIENTS {
            self.failures
                .retain(|_, (start, _)| now - *start < FAILURE_WINDOW);
            if self.failures.len() >= MAX_FAILING_CLIENTS {
                self.failures.clear();
            }
        }
        let entry = self.failures.entry(client.to_owned()).or_insert((now, 0));
        if now - entry.0 >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }

    fn open(&mut self, now: Instant) -> String {
        self.sessions.retain(|_, end| *end > now);
        while self.sessions.len() >= MAX_SESSIONS {
            let oldest = self
                .sessions
                .iter()
                .min_by_key(|(_, end)| **end)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => self.sessions.remove(&id),
                None => break,
            };
        }
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        self.sessions.insert(id.clone(), now + SESSION_TTL);
        id
    }

    fn valid(&self, id: &str, now: Instant) -> bool {
        self.sessions.get(id).is_some_and(|end| *end > now)
    }
}

/// The console of one web node: its token, sessions, and the samples of the last 15 minutes.
pub struct Console {
    token: String,
    dir: PathBuf,
    trusted_proxies: Arc<Vec<TrustedProxy>>,
    guard: Mutex<Guard>,
    samples: Mutex<VecDeque<Arc<str>>>,
    live: broadcast::Sender<Arc<str>>,
    /// With the embedded broker: its chain (what runs, reload errors, trials).
    chain: Option<Arc<ChainStatus>>,
    /// One trial of the chain at a time (each compiles the chain afresh).
    trial: tokio::sync::Semaphore,
}

impl Console {
    /// `dir`: the console's files (`static/console`).
    pub fn new(
        token: String,
        dir: PathBuf,
        trusted_proxies: Arc<Vec<TrustedProxy>>,
        chain: Option<Arc<ChainStatus>>,
    ) -> Console {
        Console {
            token,
            dir,
            trusted_proxies,
            guard: Mutex::new(Guard::default()),
            samples: Mutex::new(VecDeque::with_capacity(HISTORY)),
            live: broadcast::channel(16).0,
            chain,
            trial: tokio::sync::Semaphore::new(1),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, Guard> {
        crate::error::lock(&self.guard)
    }

    /// Whether the request carries a live session.
    fn authorized(&self, req: &Request) -> bool {
        req.cookie(COOKIE)
            .is_some_and(|cookie| self.guard().valid(cookie.value(), Instant::now()))
    }

    /// Samples the node every second until shutdown.
    pub async fn run_sampler(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        hub: Hub,
        brokers: Option<(Arc<crate::failover::Brokers>, Vec<String>)>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        let mut last: Option<(Instant, HashMap<String, f64>)> = None;
        let mut last_sent: HashMap<String, u64> = HashMap::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let values = parse_metrics(&metrics.render());
            let mut sample = sample(
                &values,
                last.as_ref().map(|(at, values)| (now - *at, values)),
                &hub,
                brokers.as_ref(),
                started.elapsed(),
            );
            // Messages per second in each listed room held here.
            let sent = hub.rooms_sent();
            let elapsed = last
                .as_ref()
                .map_or(1.0, |(at, _)| (now - *at).as_secs_f64().max(0.001));
            if let Some(rooms) = sample["top_rooms"].as_array_mut() {
                for room in rooms {
                    let name = room["room"].as_str().unwrap_or_default().to_owned();
                    let rate = match (sent.get(&name), last_sent.get(&name)) {
                        (Some(now), Some(before)) => now.saturating_sub(*before) as f64 / elapsed,
                        _ => 0.0,
                    };
                    room["messages_per_s"] = serde_json::Value::from(rate);
                }
            }
            last_sent = sent;
            sample["chain"] = match &self.chain {
                Some(chain) => serde_json::to_value(chain.scripts()).unwrap_or_default(),
                None => serde_json::Value::Null,
            };
            last = Some((now, values));
            let sample: Arc<str> = Arc::from(sample.to_string());
            {
                let mut samples = crate::error::lock(&self.samples);
                if samples.len() >= HISTORY {
                    samples.pop_front();
                }
                samples.push_back(sample.clone());
            }
            // No console open: nobody listens, nothing is sent.
            let _ = self.live.send(sample);
        }
    }

    /// The history, then each new sample, as SSE frames.
    fn stream(
        &self,
    ) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static
    {
        use futures_util::StreamExt;
        let live = self.live.subscribe();
        let history = {
            let samples = crate::error::lock(&self.samples);
            let mut frame = String::from("event: history\ndata: [");
            for (i, sample) in samples.iter().enumerate() {
                if i > 0 {
                    frame.push(',');
                }
                frame.push_str(sample);
            }
            frame.push_str("]\n\n");
            frame
        };
        let first = futures_util::stream::once(async move { Ok(bytes::Bytes::from(history)) });
        let rest = futures_util::stream::unfold(live, |mut live| async move {
            loop {
                match live.recv().await {
                    Ok(sample) => {
                        let frame = format!("event: stats\ndata: {sample}\n\n");
                        return Some((Ok(bytes::Bytes::from(frame)), live));
                    }
                    // A console too slow for one sample a second misses some: the next comes.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        first.chain(rest)
    }
}

/// `name{labels} value` lines of the Prometheus text format → value by `name{labels}`.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The label `name` of a `metric{…}` key.
fn label<'a>(key: &'a str, name: &str) -> Option<&'a str> {
    let labels = key.split_once('{')?.1.strip_suffix('}')?;
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}

/// Per-second rates of a counter family, by one label: `{label: rate}`.
fn rates(
    values: &HashMap<String, f64>,
    before: Option<(Duration, &HashMap<String, f64>)>,
    metric: &str,
    by: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for key in values.keys() {
        if !key.starts_with(metric) || key.as_bytes().get(metric.len()) != Some(&b'{') {
            continue;
        }
        let Some(name) = label(key, by) else { continue };
        let rate = rate(values, before, key);
        let entry = out
            .entry(name.to_owned())
            .or_insert(serde_json::Value::from(0.0));
        *entry = serde_json::Value::from(entry.as_f64().unwrap_or(0.0) + rate);
    }
    out
}

/// The per-second rate of one counter.
fn rate(
    values: &HashMap<String, f64>,
    before: Option<(Duration, &HashMap<String, f64>)>,
    key: &str,
) -> f64 {
    let now = values.get(key).copied().unwrap_or(0.0);
    match before {
        Some((elapsed, before)) => {
            (now - before.get(key).copied().unwrap_or(0.0)).max(0.0)
                / elapsed.as_secs_f64().max(0.001)
        }
        None => 0.0,
    }
}

/// A quantile (in ms) of the POST → publish latency over the last interval, from the
/// histogram's buckets: the upper bound of the bucket it falls in; `None` without posts.
fn latency_ms(
    values: &HashMap<String, f64>,
    before: Option<(Duration, &HashMap<String, f64>)>,
    quantile: f64,
) -> Option<f64> {
    let metric = "temma_publish_latency_seconds_bucket";
    let mut buckets: Vec<(f64, f64)> = values
        .iter()
        .filter(|(key, _)| key.starts_with(metric))
        .filter_map(|(key, value)| {
            let le = label(key, "le")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let earlier = before
                .and_then(|(_, before)| before.get(key).copied())
                .unwrap_or(0.0);
            Some((bound, value - earlier))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let wanted = total * quantile;
    buckets
        .iter()
        .find(|(_, count)| *count >= wanted)
        .map(|(bound, _)| {
            if bound.is_finite() {
                bound * 1000.0
            } else {
                buckets
                    .iter()
                    .rev()
                    .find(|(b, _)| b.is_finite())
                    .map_or(0.0, |(b, _)| b * 1000.0)
            }
        })
}

/// Resident memory and open descriptors of this process, from `/proc/self` (Linux).
fn process() -> (Option<u64>, Option<u64>) {
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096);
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count() as u64);
    (rss, fds)
}

/// One sample of the node, as the console draws it.
fn sample(
    values: &HashMap<String, f64>,
    before: Option<(Duration, &HashMap<String, f64>)>,
    hub: &Hub,
    brokers: Option<&(Arc<crate::failover::Brokers>, Vec<String>)>,
    uptime: Duration,
) -> serde_json::Value {
    let get = |key: &str| values.get(key).copied().unwrap_or(0.0);
    let (rss, fds) = process();
    let mut rooms = hub.room_counts();
    rooms.truncate(TOP_ROOMS);
    let rooms: Vec<serde_json::Value> = rooms
        .into_iter()
        .map(|(room, count)| serde_json::json!({ "room": room, "clients": count }))
        .collect();
    let nodes: Vec<serde_json::Value> = hub
        .nodes()
        .into_iter()
        .map(|node| {
            serde_json::json!({
                "node": node.node,
                "this": node.this,
                "clients": node.clients,
                "rooms": node.rooms,
                "heard_ms_ago": node.heard.as_millis() as u64,
                "listen": node.info.as_ref().map(|info| info.listen.clone()),
                "version": node.info.as_ref().map(|info| info.version.clone()),
                "uptime_secs": node.info.as_ref().map(|info| info.uptime_secs),
            })
        })
        .collect();
    let mut scripts = serde_json::Map::new();
    for (key, value) in values {
        if !key.starts_with("temma_script_messages_total{") {
            continue;
        }
        let (Some(script), Some(outcome)) = (label(key, "script"), label(key, "outcome")) else {
            continue;
        };
        let per = scripts
            .entry(script.to_owned())
            .or_insert_with(|| serde_json::json!({}));
        per[outcome] = serde_json::json!({
            "total": value,
            "rate": rate(values, before, key),
        });
    }
    serde_json::json!({
        "time": crate::wire::now_ms(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": uptime.as_secs(),
        "published": rate(values, before, "temma_broker_published_total"),
        "received": rate(values, before, "temma_messages_received_total"),
        "delivered": rate(values, before, "temma_messages_delivered_total"),
        "clients": get("temma_sse_clients"),
        "connections": get("temma_connections"),
        "rooms_held": get("temma_rooms"),
        "posts": rates(values, before, "temma_posts_total", "status"),
        "latency_ms": {
            "p50": latency_ms(values, before, 0.5),
            "p99": latency_ms(values, before, 0.99),
        },
        "drops": rates(values, before, "temma_drops_total", "reason"),
        "slow_disconnects": rate(values, before, "temma_slow_consumer_disconnects_total"),
        "write_stalls": rate(values, before, "temma_sse_write_stalls_total"),
        "scripts": scripts,
        "reloads": {
            "ok": get("temma_script_reloads_total{result=\"Ok\"}"),
            "failed": get("temma_script_reloads_total{result=\"Failed\"}"),
        },
        "push_connected": get("temma_push_connected") > 0.0,
        "sub_connected": get("temma_sub_connected") > 0.0,
        "brokers": brokers.map(|(brokers, addresses)| brokers.describe(addresses)),
        "rss_bytes": rss,
        "fds": fds,
        "top_rooms": rooms,
        "nodes": nodes,
    })
}

/// The console's routes, under `/console`: the page, the login and the login page's own
/// files for anyone; everything else behind [`SessionRequired`].
pub fn router(console: Arc<Console>) -> Router {
    let file = || File {
        console: console.clone(),
    };
    Router::with_path("console")
        .get(Page {
            console: console.clone(),
        })
        .push(Router::with_path("login").post(Login {
            console: console.clone(),
        }))
        .push(Router::with_path("logout").post(Logout {
            console: console.clone(),
        }))
        .push(Router::with_path("login.js").get(file()))
        .push(Router::with_path("console.css").get(file()))
        .push(
            Router::new()
                .hoop(SessionRequired {
                    console: console.clone(),
                })
                .push(Router::with_path("stats").get(Stats {
                    console: console.clone(),
                }))
                .push(Router::with_path("session").get(Session))
                .push(Router::with_path("try").post(Try {
                    console: console.clone(),
                }))
                .push(Router::with_path("{file}").get(file())),
        )
}

/// Answers `401` to a request without a live session, and lets the others through.
struct SessionRequired {
    console: Arc<Console>,
}

#[async_trait]
impl Handler for SessionRequired {
    async fn handle(
        &self,
        req: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        if !self.console.authorized(req) {
            ctrl.skip_rest();
            unauthorized(res);
        }
    }
}

fn unauthorized(res: &mut Response) {
    JsonError::new(
        StatusCode::UNAUTHORIZED,
        "the console needs a session: log in at /console",
    )
    .write_to(res);
}

/// Serves a file of the console's folder.
fn serve_file(res: &mut Response, path: &std::path::Path) {
    let Ok(body) = std::fs::read(path) else {
        JsonError::new(StatusCode::NOT_FOUND, "no such file of the console").write_to(res);
        return;
    };
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, salvo::http::HeaderValue::from_static(kind));
    headers.insert(
        CACHE_CONTROL,
        salvo::http::HeaderValue::from_static("no-store"),
    );
    let _ = res.write_body(body);
}

/// `GET /console`: the console with a session, the login page without.
struct Page {
    console: Arc<Console>,
}

#[async_trait]
impl Handler for Page {
    async fn handle(
        &self,
        req: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        let page = if self.console.authorized(req) {
            "index.html"
        } else {
            "login.html"
        };
        serve_file(res, &self.console.dir.join(page));
    }
}

/// `GET /console/{file}`: a file of the console's folder (with a session, but for the login
/// page's own `login.js` and `console.css`).
struct File {
    console: Arc<Console>,
}

#[async_trait]
impl Handler for File {
    async fn handle(
        &self,
        req: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        // The last segment of the path: `{file}`, or the public files' own routes.
        let name = req.uri().path().rsplit('/').next().unwrap_or_default();
        let known = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
            && !name.starts_with('.');
        if !known {
            JsonError::new(StatusCode::NOT_FOUND, "no such file of the console").write_to(res);
            return;
        }
        serve_file(res, &self.console.dir.join(name));
    }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /console/login`: form field `token`.
struct Login {
    console: Arc<Console>,
}

#[async_trait]
impl Handler for Login {
    async fn handle(
        &self,
        req: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        use subtle::ConstantTimeEq;
        ctrl.skip_rest();
        let client = crate::request::client_of(req, &self.console.trusted_proxies);
        let now = Instant::now();
        if self.console.guard().limited(&client, now) {
            res.headers_mut().insert(
                salvo::http::header::RETRY_AFTER,
                salvo::http::HeaderValue::from_static("60"),
            );
            JsonError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many failed logins: at most {MAX_FAILURES} a minute; try again in a minute"
                ),
            )
            .write_to(res);
            return;
        }
        let form = match req.parse_form::<LoginForm>().await {
            Ok(form) => form,
            Err(_) => {
                JsonError::bad_request("send the token as a form field: token=…").write_to(res);
                return;
            }
        };
        let good = bool::from(form.token.as_bytes().ct_eq(self.console.token.as_bytes()));
        if !good {
            self.console.guard().failed(&client, now);
            tracing::warn!(%client, "failed console login");
            JsonError::new(StatusCode::UNAUTHORIZED, "wrong token").write_to(res);
            return;
        }
        let id = self.console.guard().open(now);
        tracing::info!(%client, "console login");
        let cookie = format!(
            "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
            SESSION_TTL.as_secs()
        );
        if let Ok(value) = salvo::http::HeaderValue::from_str(&cookie) {
            res.headers_mut().insert(SET_COOKIE, value);
        }
        write_json(res, &serde_json::json!({ "ok": true }));
    }
}

/// `POST /console/logout`.
struct Logout {
    console: Arc<Console>,
}

#[async_trait]
impl Handler for Logout {
    async fn handle(
        &self,
        req: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        if let Some(cookie) = req.cookie(COOKIE) {
            self.console.guard().sessions.remove(cookie.value());
        }
        res.headers_mut().insert(
            SET_COOKIE,
            salvo::http::HeaderValue::from_static(
                "temma_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
            ),
        );
        write_json(res, &serde_json::json!({ "ok": true }));
    }
}

/// `GET /console/session`: `200` with a live session (`401` without, from
/// [`SessionRequired`]): what the page asks when its stream breaks.
struct Session;

#[async_trait]
impl Handler for Session {
    async fn handle(
        &self,
        _: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        write_json(res, &serde_json::json!({ "ok": true }));
    }
}

/// The most bytes of a message to try.
const MAX_TRIAL_BYTES: usize = 64 * 1024;

/// `POST /console/try`: a message (a JSON object) run through the chain as configured now,
/// compiled afresh, with the same engine and limits as the broker's, published nowhere
/// (what `temma script` does).
struct Try {
    console: Arc<Console>,
}

#[async_trait]
impl Handler for Try {
    async fn handle(
        &self,
        req: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        let Some(chain) = &self.console.chain else {
            JsonError::new(
                StatusCode::NOT_FOUND,
                "the chain runs in `temma broker`, not in this node: try a message there with \
                 `temma script`",
            )
            .write_to(res);
            return;
        };
        let body = match req.payload_with_max_size(MAX_TRIAL_BYTES).await {
            Ok(body) => body.clone(),
            Err(_) => {
                JsonError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a message to try is at most {MAX_TRIAL_BYTES} bytes"),
                )
                .write_to(res);
                return;
            }
        };
        let message = match serde_json::from_slice::<rhai::Dynamic>(&body)
            .ok()
            .and_then(|value| value.try_cast::<rhai::Map>())
        {
            // As the broker hands it to scripts: with the time it was read.
            Some(mut map) => {
                map.insert(
                    crate::wire::TIME.into(),
                    (crate::wire::now_ms() as rhai::INT).into(),
                );
                map
            }
            None => {
                JsonError::bad_request(
                    "the message must be a JSON object, as in {\"from\":\"ann\",\"text\":\"hi\"}",
                )
                .write_to(res);
                return;
            }
        };
        let _one = self.console.trial.acquire().await;
        let chain = chain.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut scripts = chain.compile()?;
            Ok::<_, String>(crate::script::trial(&mut scripts, message))
        })
        .await;
        let (steps, published) = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => {
                JsonError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("the chain does not compile: {error}"),
                )
                .write_to(res);
                return;
            }
            Err(_) => {
                JsonError::new(StatusCode::INTERNAL_SERVER_ERROR, "the trial failed").write_to(res);
                return;
            }
        };
        let steps: Vec<serde_json::Value> = steps
            .into_iter()
            .map(|(script, step)| match step {
                Step::Passed { changed } => serde_json::json!({
                    "script": script, "outcome": "passed", "changed": changed,
                }),
                Step::Dropped(None) => serde_json::json!({
                    "script": script, "outcome": "dropped",
                }),
                Step::Dropped(Some(rejection)) => serde_json::json!({
                    "script": script, "outcome": "rejected",
                    "status": rejection.status, "reason": rejection.reason,
                }),
                Step::Failed { error, on_error } => serde_json::json!({
                    "script": script, "outcome": "failed", "error": error,
                    "on_error": on_error.to_string(),
                }),
            })
            .collect();
        let published = published
            .map(|map| serde_json::to_value(rhai::Dynamic::from_map(map)).unwrap_or_default());
        write_json(
            res,
            &serde_json::json!({ "steps": steps, "published": published }),
        );
    }
}

/// `GET /console/stats`: the samples, as SSE.
struct Stats {
    console: Arc<Console>,
}

#[async_trait]
impl Handler for Stats {
    async fn handle(
        &self,
        _: &mut Request,
        _: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        let headers = res.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            salvo::http::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            CACHE_CONTROL,
            salvo::http::HeaderValue::from_static("no-store"),
        );
        res.stream(self.console.stream());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_are_limited_per_client_and_over_all_clients() {
        let mut guard = Guard::default();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(!guard.limited("ip:198.51.100.1", now));
            guard.failed("ip:198.51.100.1", now);
        }
        assert!(guard.limited("ip:198.51.100.1", now));
        assert!(!guard.limited("ip:198.51.100.2", now), "others are not");
        // Failures spread over many clients: past the overall limit, everyone waits.
        for n in 0..MAX_FAILURES_ALL {
            guard.failed(&format!("ip:203.0.113.{n}"), now);
        }
        assert!(guard.limited("ip:198.51.100.3", now));
        // A minute later, the windows are over.
        let later = now + FAILURE_WINDOW;
        assert!(!guard.limited("ip:198.51.100.1", later));
        assert!(!guard.limited("ip:198.51.100.3", later));
    }

    #[test]
    fn sessions_are_bounded_and_end() {
        let mut guard = Guard::default();
        let now = Instant::now();
        let at = |i: usize| now + Duration::from_millis(i as u64);
        let ids: Vec<String> = (0..=MAX_SESSIONS).map(|i| guard.open(at(i))).collect();
        // One more than the bound: the oldest made way.
        assert_eq!(guard.sessions.len(), MAX_SESSIONS);
        assert!(!guard.valid(&ids[0], at(MAX_SESSIONS)));
        assert!(ids[1..].iter().all(|id| guard.valid(id, at(MAX_SESSIONS))));
        assert!(!guard.valid(&ids[1], at(1) + SESSION_TTL), "a session ends");
        assert!(!guard.valid("forged", now));
    }
}
