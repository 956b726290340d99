//! Moderation scripts: a chain of rhai scripts the broker runs on every message between PULL
//! and PUB.
//!
//! # The contract (see `scripts/README.md`)
//!
//! A script defines `fn on_message(msg)`. `msg` is a map: `from`, `text`, `time` and any
//! other field the message carries. The function returns:
//! - the map, changed or not: the message goes on to the next script, then is published;
//! - `()`: the message is dropped;
//! - `reject(reason)` or `reject(reason, status)`: dropped, and the sender gets `status` (a
//!   4xx, default 422) with `reason`.
//!
//! Throwing (or hitting a limit) is an error, handled by the script's `on_error`: `"drop"`
//! (the default: moderation that fails open lets abuse through) or `"pass"`.
//!
//! Inside a script, `params` is the script's parameters (read-only), and `this` is the
//! script's own state: a map that persists from one message to the next (fresh on reload).
//! An optional `fn init()` runs once when the script is loaded, to prepare `this`.
//! Functions: `now_ms()`, `log_debug(text)`, `log_info(text)`, `log_warn(text)`, `reject(…)`,
//! and native helpers for what would be slow in a script: `word_set(array)` with
//! `mask_words(text, set, mask)` (whole words, case-insensitive) and
//! `msg.mask_words(fields, set, mask)` (in place, on several fields), `clip(text, max_chars)`,
//! and `rate_limiter(max, window_ms, max_keys)` with `limiter.allow(key)`.
//!
//! A parameter whose name ends in `_file` names a file (relative to the application root);
//! temma reads it and gives the script its lines (trimmed, blank lines and `#` comments
//! skipped) as an array under the name without the suffix: `words_file` → `params.words`.
//!
//! # Sandbox
//!
//! [`engine`] is the one place an [`Engine`] is configured: limits on operations, string,
//! array and map sizes, call and expression depth, a wall-clock limit per call, no `eval`, no
//! module imports. rhai itself has no file, network or process access.
//!
//! # Reload
//!
//! Scripts compile once. A [`Reloader`] watches the script files (and their `_file`
//! parameters) and recompiles on change, and everything on SIGHUP; the broker swaps the new
//! version in between two messages, so none is dropped or reordered. A version that does not
//! compile is refused (the error names file, line and column) and the previous one keeps
//! running.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use rhai::{AST, CallFnOptions, Dynamic, Engine, Map, Scope};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::Root;
use crate::metrics::{Metrics, ReloadLabels, ReloadResult, ScriptLabels, ScriptOutcome};
use crate::wire::DEFAULT_REJECT_STATUS;

/// Default `broker.limits.max_operations` per call.
pub const DEFAULT_MAX_OPERATIONS: u64 = 100_000;
/// Default `broker.limits.max_string_size` (bytes).
pub const DEFAULT_MAX_STRING_SIZE: usize = 64 * 1024;
/// Default `broker.limits.max_array_size`.
pub const DEFAULT_MAX_ARRAY_SIZE: usize = 10_000;
/// Default `broker.limits.max_map_size`.
pub const DEFAULT_MAX_MAP_SIZE: usize = 10_000;
/// Default `broker.limits.max_call_depth`.
pub const DEFAULT_MAX_CALL_DEPTH: usize = 32;
/// Default `broker.limits.max_expr_depth`.
pub const DEFAULT_MAX_EXPR_DEPTH: usize = 64;
/// Default `broker.limits.max_ms`: wall-clock time one call may take.
pub const DEFAULT_MAX_MS: u64 = 50;
/// Changes to watched files closer together than this are handled as one.
pub const RELOAD_DEBOUNCE: Duration = Duration::from_millis(100);
/// Reloads waiting for the broker to swap them in.
pub const RELOAD_QUEUE: usize = 8;
/// The function every script defines.
pub const ENTRY_POINT: &str = "on_message";
/// The optional set-up function.
pub const INIT: &str = "init";
/// The access hook's function for a stream (`GET /event/fetch`).
pub const ON_SUBSCRIBE: &str = "on_subscribe";
/// The access hook's function for a message (`POST /message/broadcast`).
pub const ON_PUBLISH: &str = "on_publish";

/// What a script is for, and so which functions it must define.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    /// A script of the broker's chain: `fn on_message(msg)`.
    Moderation,
    /// The web node's access hook: `fn on_subscribe(req)` and/or `fn on_publish(req)`.
    Access,
}

/// What to do with a message when a script fails on it: `"drop"` or `"pass"`, in any case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum OnError {
    /// Pass the message on unchanged (fail open).
    Pass,
    /// Drop it; the sender gets a 422 (fail closed, the default).
    #[default]
    Drop,
}

impl TryFrom<String> for OnError {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        match text.to_ascii_lowercase().as_str() {
            "drop" => Ok(OnError::Drop),
            "pass" => Ok(OnError::Pass),
            _ => Err(format!(
                "`{text}` is not a choice: write \"drop\" or \"pass\""
            )),
        }
    }
}

impl std::fmt::Display for OnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnError::Drop => "drop",
            OnError::Pass => "pass",
        })
    }
}

/// One `[[broker.scripts]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptConfig {
    /// The script file, relative to the application root (required).
    pub file: PathBuf,
    /// Parameters, read in the script as `params`. `*_file` keys name files to read.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Name in logs and metrics. Default: the file name without extension.
    #[serde(default)]
    pub name: Option<String>,
    /// Overrides `broker.on_error` for this script.
    #[serde(default)]
    pub on_error: Option<OnError>,
}

/// `[broker.limits]`: the sandbox of every script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptLimits {
    /// Operations one call may run. Default 100000.
    pub max_operations: u64,
    /// Longest string, in bytes. Default 65536.
    pub max_string_size: usize,
    /// Largest array. Default 10000.
    pub max_array_size: usize,
    /// Largest map. Default 10000.
    pub max_map_size: usize,
    /// Deepest function call nesting. Default 32.
    pub max_call_depth: usize,
    /// Deepest expression nesting. Default 64.
    pub max_expr_depth: usize,
    /// Milliseconds one call may run. Default 50.
    pub max_ms: u64,
}

fn default_max_string_size() -> usize {
    DEFAULT_MAX_STRING_SIZE
}
fn default_max_map_size() -> usize {
    DEFAULT_MAX_MAP_SIZE
}
fn default_max_expr_depth() -> usize {
    DEFAULT_MAX_EXPR_DEPTH
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            max_operations: DEFAULT_MAX_OPERATIONS,
            max_string_size: default_max_string_size(),
            max_array_size: DEFAULT_MAX_ARRAY_SIZE,
            max_map_size: default_max_map_size(),
            max_call_depth: DEFAULT_MAX_CALL_DEPTH,
            max_expr_depth: default_max_expr_depth(),
            max_ms: DEFAULT_MAX_MS,
        }
    }
}

/// A script that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read script `{file}` (looked for `{resolved}`): {message}")]
    Read {
        file: String,
        resolved: String,
        message: String,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Compile {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("script `{file}` defines no {expected}")]
    NoEntryPoint { file: String, expected: String },
    #[error("script `{file}`, parameter `{key}`: {message}")]
    Param {
        file: String,
        key: String,
        message: String,
    },
    /// `message` starts with the file and position ([`describe`]).
    #[error("`fn {INIT}()` failed at {message}")]
    Init { file: String, message: String },
}

/// What one script made of one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    Pass(Map),
    Drop(Option<Rejection>),
}

/// A script's `reject(reason, status)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub status: u16,
}

/// Measures each call for the wall-clock limit.
struct Clock {
    base: Instant,
    start: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Clock {
            base: Instant::now(),
            start: AtomicU64::new(0),
        }
    }
    fn restart(&self) {
        self.start
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn elapsed(&self) -> Duration {
        let now = self.base.elapsed().as_nanos() as u64;
        Duration::from_nanos(now.saturating_sub(self.start.load(Ordering::Relaxed)))
    }
}

/// A configured engine and the clock its wall-clock limit reads.
pub struct Sandbox {
    pub engine: Engine,
    clock: Arc<Clock>,
}

/// Configures a sandboxed engine for one script: the only place an [`Engine`] is set up.
///
/// `params` is what the script reads as `params`; `name` labels its log lines.
pub fn engine(limits: &ScriptLimits, params: Dynamic, name: &str) -> Sandbox {
    let mut engine = Engine::new();
    engine.set_max_operations(limits.max_operations);
    engine.set_max_string_size(limits.max_string_size);
    engine.set_max_array_size(limits.max_array_size);
    engine.set_max_map_size(limits.max_map_size);
    engine.set_max_call_levels(limits.max_call_depth);
    engine.set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth);
    engine.set_max_modules(0);
    // Interning saves memory for scripts that build many equal strings; here it cost 17% of
    // the time of a chain call (BENCHMARKS.md).
    engine.set_max_strings_interned(0);
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.disable_symbol("eval");
    engine.disable_symbol("import");
    // `Full` would call functions with constant arguments at compile time (a `log_warn`
    // in a branch would log at load): `Simple` only folds what has no side effect.
    engine.set_optimization_level(rhai::OptimizationLevel::Simple);
    engine.set_fail_on_invalid_map_property(false);

    let clock = Arc::new(Clock::new());
    let max = Duration::from_millis(limits.max_ms);
    {
        let clock = clock.clone();
        engine.on_progress(move |operations| {
            if operations % 1024 == 0 && clock.elapsed() > max {
                Some(format!("script ran longer than {} ms", max.as_millis()).into())
            } else {
                None
            }
        });
    }

    let params = params.into_shared();
    #[allow(deprecated)] // `on_var` is stable in practice; rhai marks it as volatile.
    engine.on_var(move |variable, _, _| Ok((variable == "params").then(|| params.clone())));
    register_logging(&mut engine, Arc::from(name));
    register_helpers(&mut engine);
    Sandbox { engine, clock }
}

/// `print`, `debug`, `log_debug`, `log_info`, `log_warn`: temma's log, tagged with the script.
fn register_logging(engine: &mut Engine, label: Arc<str>) {
    {
        let label = label.clone();
        engine.on_print(move |text| tracing::info!(script = %label, "{text}"));
    }
    {
        let label = label.clone();
        engine.on_debug(
            move |text, _, position| tracing::debug!(script = %label, %position, "{text}"),
        );
    }
    {
        let label = label.clone();
        engine.register_fn(
            "log_debug",
            move |text: &str| tracing::debug!(script = %label, "{text}"),
        );
    }
    {
        let label = label.clone();
        engine.register_fn(
            "log_info",
            move |text: &str| tracing::info!(script = %label, "{text}"),
        );
    }
    engine.register_fn(
        "log_warn",
        move |text: &str| tracing::warn!(script = %label, "{text}"),
    );
}

/// `now_ms`, `reject`, and the native helpers: word sets and rate limiters.
fn register_helpers(engine: &mut Engine) {
    engine.register_fn("now_ms", || crate::wire::now_ms() as rhai::INT);
    engine.register_type_with_name::<Rejection>("Rejection");
    engine.register_fn("reject", |reason: &str| Rejection {
        reason: reason.to_owned(),
        status: DEFAULT_REJECT_STATUS,
    });
    engine.register_fn("reject", |reason: &str, status: rhai::INT| Rejection {
        reason: reason.to_owned(),
        status: crate::wire::reject_status(Some(status)),
    });
    engine.register_type_with_name::<WordSet>("WordSet");
    engine.register_fn("word_set", WordSet::new);
    engine.register_fn("contains", |set: &mut WordSet, word: &str| {
        set.contains(word)
    });
    engine.register_fn("mask_words", |text: &str, words: WordSet, mask: &str| {
        mask_words(text, &words, mask)
    });
    engine.register_fn(
        "mask_words",
        |map: &mut Map, fields: rhai::Array, words: WordSet, mask: &str| {
            mask_fields(map, &fields, &words, mask)
        },
    );
    engine.register_fn("clip", |text: &str, max_chars: rhai::INT| {
        clip(text, usize::try_from(max_chars).unwrap_or(0))
    });
    engine.register_fn("hmac_sha256", hmac_sha256);
    engine.register_fn("same", |a: &str, b: &str| {
        use subtle::ConstantTimeEq;
        bool::from(a.as_bytes().ct_eq(b.as_bytes()))
    });
    engine.register_type_with_name::<RateLimiter>("RateLimiter");
    engine.register_fn("rate_limiter", RateLimiter::new);
    engine.register_fn("allow", |limiter: &mut RateLimiter, key: Dynamic| {
        let now = crate::wire::now_ms() as rhai::INT;
        match key.read_lock::<rhai::ImmutableString>() {
            Some(key) => limiter.allow(&key, now),
            None => limiter.allow(&key.to_string(), now),
        }
    });
}

/// `hmac_sha256(secret, text)`: the HMAC-SHA256 of `text` under `secret`, in lower-case hex,
/// for scripts that check signed tokens (compare with `same(a, b)`, in constant time).
pub fn hmac_sha256(secret: &str, text: &str) -> String {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new(); // HMAC takes a key of any length: not reached
    };
    mac.update(text.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A set of words for [`mask_words`], built once (`word_set(params.words)` in `init`): sharing
/// it costs nothing, and a lookup is one hash whatever the size of the list.
#[derive(Debug, Clone, Default)]
pub struct WordSet(Arc<std::collections::HashSet<String>>);

impl WordSet {
    /// The words of an array, lower-cased; what is not a string is skipped.
    pub fn new(words: rhai::Array) -> WordSet {
        WordSet(Arc::new(
            words
                .into_iter()
                .filter_map(|word| word.into_string().ok())
                .map(|word| word.to_lowercase())
                .collect(),
        ))
    }

    pub fn contains(&self, word: &str) -> bool {
        if word.chars().any(char::is_uppercase) {
            self.0.contains(&word.to_lowercase())
        } else {
            self.0.contains(word)
        }
    }
}

/// Counts events per key in fixed windows, for rate limits kept in a script's `this`:
/// `rate_limiter(max, window_ms, max_keys)`, then `limiter.allow(key)`.
///
/// Memory is bounded: past `max_keys` keys, keys whose window is over are forgotten, and if
/// every key is still active the counts start afresh (logged).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    max: rhai::INT,
    window_ms: rhai::INT,
    max_keys: usize,
    windows: std::collections::HashMap<String, (rhai::INT, rhai::INT)>,
}

impl RateLimiter {
    pub fn new(max: rhai::INT, window_ms: rhai::INT, max_keys: rhai::INT) -> RateLimiter {
        RateLimiter {
            max: max.max(0),
            window_ms: window_ms.max(0),
            max_keys: usize::try_from(max_keys).unwrap_or(0).max(1),
            windows: std::collections::HashMap::new(),
        }
    }

    /// Whether `key` may have one more event at `now_ms`; counts it if so.
    pub fn allow(&mut self, key: &str, now_ms: rhai::INT) -> bool {
        if let Some((start, count)) = self.windows.get_mut(key) {
            if now_ms - *start >= self.window_ms {
                *start = now_ms;
                *count = 0;
            }
            if *count >= self.max {
                return false;
            }
            *count += 1;
            return true;
        }
        if self.windows.len() >= self.max_keys {
            let window = self.window_ms;
            self.windows
                .retain(|_, (start, _)| now_ms - *start < window);
            if self.windows.len() >= self.max_keys {
                tracing::warn!(
                    keys = self.windows.len(),
                    "rate limiter full of active keys; counts reset"
                );
                self.windows.clear();
            }
        }
        if self.max == 0 {
            return false;
        }
        self.windows.insert(key.to_owned(), (now_ms, 1));
        true
    }
}

/// Replaces every character of each whole word found in `words` with the first character of
/// `mask`. Words are runs of letters, digits and apostrophes; matching is case-insensitive.
pub fn mask_words(text: &str, words: &WordSet, mask: &str) -> String {
    let mask = mask.chars().next().unwrap_or('*');
    let mut out = String::with_capacity(text.len());
    let mut word_start: Option<usize> = None;
    let flush = |out: &mut String, word: &str| {
        if words.contains(word) {
            out.extend(std::iter::repeat_n(mask, word.chars().count()));
        } else {
            out.push_str(word);
        }
    };
    for (i, c) in text.char_indices() {
        let in_word = c.is_alphanumeric() || c == '\'';
        match (in_word, word_start) {
            (true, None) => word_start = Some(i),
            (false, Some(start)) => {
                flush(&mut out, &text[start..i]);
                word_start = None;
                out.push(c);
            }
            (false, None) => out.push(c),
            (true, Some(_)) => {}
        }
    }
    if let Some(start) = word_start {
        flush(&mut out, &text[start..]);
    }
    out
}

/// `msg.mask_words(fields, words, mask)`: [`mask_words`] on each of `fields` of the message
/// that is a string, in place; other fields, and fields that are not strings, are left alone.
pub fn mask_fields(map: &mut Map, fields: &[Dynamic], words: &WordSet, mask: &str) {
    for field in fields {
        let Some(name) = field.read_lock::<rhai::ImmutableString>() else {
            continue;
        };
        let Some(value) = map.get_mut(name.as_str()) else {
            continue;
        };
        let masked = match value.read_lock::<rhai::ImmutableString>() {
            Some(text) => mask_words(&text, words, mask),
            None => continue,
        };
        *value = masked.into();
    }
}

/// `clip(text, max_chars)`: the text trimmed, and if it is still longer than `max_chars`
/// characters, cut to `max_chars - 1` and ended with "…" (so `max_chars` in all).
pub fn clip(text: &str, max_chars: usize) -> String {
    let text = text.trim();
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some(_) => {
            let keep = max_chars.saturating_sub(1);
            let end = text.char_indices().nth(keep).map_or(text.len(), |(i, _)| i);
            let mut out = String::with_capacity(end + 3);
            out.push_str(&text[..end]);
            if max_chars > 0 {
                out.push('…');
            }
            out
        }
    }
}

/// A compiled script with its engine and state.
pub struct Script {
    pub name: String,
    pub file: PathBuf,
    /// Every file the script depends on (itself and its `_file` parameters), for the watcher.
    pub files: Vec<PathBuf>,
    engine: Engine,
    ast: AST,
    state: Dynamic,
    scope: Scope<'static>,
    clock: Arc<Clock>,
    /// What the chain does with a message this script fails on.
    pub on_error: OnError,
    /// The sandbox it runs in, to name a limit that stops it.
    limits: ScriptLimits,
    /// How the file is named in the configuration, for error messages.
    shown: String,
}

/// A script's failure, told as an operator needs it: where (`file:line:column`, the innermost
/// position rhai knows), in which function when it is not the entry point, and, when one of
/// `[broker.limits]` stopped it, which one with its value.
pub fn describe(error: &rhai::EvalAltResult, limits: &ScriptLimits, file: &str) -> String {
    use rhai::EvalAltResult as E;
    let mut inner = error;
    let mut position = error.position();
    let mut function = None;
    while let E::ErrorInFunctionCall(name, _, nested, at) = inner {
        if !at.is_none() {
            position = *at;
        }
        function = Some(name.as_str());
        inner = nested;
    }
    if !inner.position().is_none() {
        position = inner.position();
    }
    let limit =
        |key: &str, value: &dyn std::fmt::Display| format!("(`broker.limits.{key}` = {value})");
    let what = match inner {
        E::ErrorTooManyOperations(..) => format!(
            "stopped after too many operations {}",
            limit("max_operations", &limits.max_operations)
        ),
        E::ErrorTerminated(..) => format!(
            "stopped: ran longer than {} ms {}",
            limits.max_ms,
            limit("max_ms", &limits.max_ms)
        ),
        E::ErrorStackOverflow(..) => format!(
            "stopped: function calls nested too deep {}",
            limit("max_call_depth", &limits.max_call_depth)
        ),
        E::ErrorDataTooLarge(what, ..) => {
            let (noun, key, value) = match what.as_str() {
                "Length of string" => ("a string", "max_string_size", limits.max_string_size),
                "Size of object map" => ("a map", "max_map_size", limits.max_map_size),
                _ => ("an array", "max_array_size", limits.max_array_size),
            };
            format!("stopped: {noun} grew too large {}", limit(key, &value))
        }
        // A script's own `throw "…"`: its words, as written.
        E::ErrorRuntime(value, ..) if !value.is_unit() => value.to_string(),
        other => {
            // rhai's text ends with " (line L, position C)": said once, in front.
            let text = other.to_string();
            let suffix = format!(" ({})", other.position());
            text.strip_suffix(&suffix).unwrap_or(&text).to_owned()
        }
    };
    let place = match (position.line(), position.position()) {
        (Some(line), Some(column)) => format!("{file}:{line}:{column}"),
        (Some(line), None) => format!("{file}:{line}"),
        _ => file.to_owned(),
    };
    match function {
        Some(function) => format!("{place}: {what} (in `fn {function}`)"),
        None => format!("{place}: {what}"),
    }
}

/// A script's name when its entry gives none: the file name without extension.
fn name_of(file: &Path) -> String {
    file.file_stem().map_or_else(
        || file.display().to_string(),
        |stem| stem.to_string_lossy().into_owned(),
    )
}

/// Everything needed to (re)load one script.
#[derive(Debug, Clone)]
pub struct ScriptSpec {
    pub name: String,
    /// Resolved path of the script.
    pub file: PathBuf,
    /// How the file is named in the config, for error messages.
    pub shown: String,
    pub params: BTreeMap<String, serde_json::Value>,
    /// Where `_file` parameters resolve from.
    pub root: PathBuf,
    pub limits: ScriptLimits,
    pub on_error: OnError,
    pub kind: ScriptKind,
}

impl ScriptSpec {
    /// The specs of a chain, in order: `[[broker.scripts]]` entries with the broker's limits
    /// and default `on_error`, paths resolved against `root`.
    pub fn chain(
        entries: &[ScriptConfig],
        limits: ScriptLimits,
        on_error: OnError,
        root: &Root,
    ) -> Vec<ScriptSpec> {
        entries
            .iter()
            .map(|entry| ScriptSpec {
                name: entry.name.clone().unwrap_or_else(|| name_of(&entry.file)),
                file: root.resolve(&entry.file),
                shown: entry.file.display().to_string(),
                params: entry.params.clone(),
                root: root.path().to_owned(),
                limits,
                on_error: entry.on_error.unwrap_or(on_error),
                kind: ScriptKind::Moderation,
            })
            .collect()
    }

    /// A spec for one file outside any configuration (`temma script`).
    pub fn standalone(
        file: &Path,
        params: BTreeMap<String, serde_json::Value>,
        limits: ScriptLimits,
    ) -> ScriptSpec {
        ScriptSpec {
            name: name_of(file),
            file: file.to_owned(),
            shown: file.display().to_string(),
            params,
            root: PathBuf::from("."),
            limits,
            on_error: OnError::Drop,
            kind: ScriptKind::Moderation,
        }
    }

    /// Where a `_file` parameter's path points (relative to the application root).
    fn param_path(&self, path: &str) -> PathBuf {
        Root(self.root.clone()).resolve(Path::new(path))
    }

    /// Every file the script depends on: itself and its `_file` parameters.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.file.clone()];
        for (key, value) in &self.params {
            if key.ends_with("_file")
                && let serde_json::Value::String(path) = value
            {
                files.push(self.param_path(path));
            }
        }
        files
    }

    /// The script's `params`, with each `_file` parameter's lines (trimmed, blank lines and
    /// `#` comments skipped) under the name without the suffix; and the files read.
    fn read_params(&self) -> Result<(Map, Vec<PathBuf>), ScriptError> {
        let shown = &self.shown;
        let mut files = vec![self.file.clone()];
        let mut params = Map::new();
        for (key, value) in &self.params {
            let problem = |message: String| ScriptError::Param {
                file: shown.clone(),
                key: key.clone(),
                message,
            };
            if let Some(base) = key.strip_suffix("_file") {
                let serde_json::Value::String(path) = value else {
                    return Err(problem("must be a file path (a string)".into()));
                };
                let written = path;
                let path = self.param_path(path);
                let text = std::fs::read_to_string(&path).map_err(|error| {
                    problem(format!(
                        "cannot read `{written}` (looked for `{}`): {error}",
                        path.display()
                    ))
                })?;
                let lines: rhai::Array = text
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with('#'))
                    .map(|line| Dynamic::from(line.to_owned()))
                    .collect();
                params.insert(base.into(), lines.into());
                files.push(path);
            }
            let value =
                rhai::serde::to_dynamic(value).map_err(|error| problem(error.to_string()))?;
            params.insert(key.as_str().into(), value);
        }
        Ok((params, files))
    }

    /// Reads, compiles and initializes the script.
    pub fn load(&self) -> Result<Script, ScriptError> {
        let shown = self.shown.clone();
        let source = std::fs::read_to_string(&self.file).map_err(|error| ScriptError::Read {
            file: shown.clone(),
            resolved: self.file.display().to_string(),
            message: error.to_string(),
        })?;
        let (params, files) = self.read_params()?;
        let Sandbox { engine, clock } = engine(&self.limits, params.into(), &self.name);
        let mut ast = engine.compile(&source).map_err(|error| {
            let position = error.position();
            ScriptError::Compile {
                file: shown.clone(),
                line: position.line().unwrap_or(0),
                column: position.position().unwrap_or(0),
                message: error.err_type().to_string(),
            }
        })?;
        ast.set_source(shown.as_str());
        let (entry_points, expected): (&[&str], &str) = match self.kind {
            ScriptKind::Moderation => (&[ENTRY_POINT], "`fn on_message(msg)`"),
            ScriptKind::Access => (
                &[ON_SUBSCRIBE, ON_PUBLISH],
                "`fn on_subscribe(req)` nor `fn on_publish(req)`",
            ),
        };
        if !ast
            .iter_functions()
            .any(|f| entry_points.contains(&f.name) && f.params.len() == 1)
        {
            return Err(ScriptError::NoEntryPoint {
                file: shown,
                expected: expected.to_owned(),
            });
        }
        let mut script = Script {
            name: self.name.clone(),
            file: self.file.clone(),
            files,
            engine,
            ast,
            state: Map::new().into(),
            scope: Scope::new(),
            clock,
            on_error: self.on_error,
            limits: self.limits,
            shown: shown.clone(),
        };
        if script
            .ast
            .iter_functions()
            .any(|f| f.name == INIT && f.params.is_empty())
        {
            let _ = script.call(INIT, ()).map_err(|error| ScriptError::Init {
                file: shown,
                message: error,
            })?;
        }
        Ok(script)
    }
}

impl Script {
    fn call(&mut self, function: &str, args: impl rhai::FuncArgs) -> Result<Dynamic, String> {
        self.clock.restart();
        let options = CallFnOptions::new()
            .eval_ast(false)
            .rewind_scope(true)
            .bind_this_ptr(&mut self.state);
        self.engine
            .call_fn_with_options::<Dynamic>(options, &mut self.scope, &self.ast, function, args)
            .map_err(|error| describe(&error, &self.limits, &self.shown))
    }

    /// Runs `on_message` on one message.
    pub fn run(&mut self, message: Map) -> Result<Outcome, String> {
        let result = self.call(ENTRY_POINT, (Dynamic::from_map(message),))?;
        if result.is_map() {
            return Ok(Outcome::Pass(result.cast::<Map>()));
        }
        if result.is_unit() {
            return Ok(Outcome::Drop(None));
        }
        if result.is::<Rejection>() {
            return Ok(Outcome::Drop(Some(result.cast::<Rejection>())));
        }
        Err(format!(
            "{}: `{ENTRY_POINT}` returned {}, not a map, `()` or `reject(…)`",
            self.shown,
            result.type_name()
        ))
    }
}

/// What one script did in a [`trial`] run.
#[derive(Debug)]
pub enum Step {
    /// Passed the message on, changed or not.
    Passed { changed: bool },
    /// Dropped it, with the script's `reject(…)` if it gave one.
    Dropped(Option<Rejection>),
    /// Failed on it; `on_error` says what the broker then does.
    Failed { error: String, on_error: OnError },
}

/// Runs `message` through `scripts` in order as the broker's chain would, publishing nothing
/// (`temma script`): what each script did, and the message as it would be published, or `None`
/// when a script dropped it.
pub fn trial(scripts: &mut [Script], mut message: Map) -> (Vec<(String, Step)>, Option<Map>) {
    let json = |map: &Map| serde_json::to_string(&Dynamic::from_map(map.clone())).ok();
    let mut steps = Vec::with_capacity(scripts.len());
    for script in scripts {
        let before = json(&message);
        let step = match script.run(message.clone()) {
            Ok(Outcome::Pass(out)) => {
                let changed = json(&out) != before;
                message = out;
                Step::Passed { changed }
            }
            Ok(Outcome::Drop(rejection)) => Step::Dropped(rejection),
            Err(error) => Step::Failed {
                error,
                on_error: script.on_error,
            },
        };
        let stop = matches!(
            step,
            Step::Dropped(_)
                | Step::Failed {
                    on_error: OnError::Drop,
                    ..
                }
        );
        steps.push((script.name.clone(), step));
        if stop {
            return (steps, None);
        }
    }
    (steps, Some(message))
}

/// Which spec of a chain `wanted` names: a script's name, or its file (as written in the
/// configuration, or any path to the same file).
pub fn find(specs: &[ScriptSpec], wanted: &str) -> Option<usize> {
    specs
        .iter()
        .position(|spec| spec.name == wanted || spec.shown == wanted)
        .or_else(|| {
            let path = Path::new(wanted);
            specs
                .iter()
                .position(|spec| path.is_file() && same_file(&spec.file, path))
        })
}

/// The verdict of the whole chain on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Publish these bytes.
    Pass(Bytes),
    /// Do not publish. `reference` is the sender's `ref`, to notify it.
    Drop {
        reference: Option<String>,
        reason: String,
        status: u16,
    },
}

struct ChainEntry {
    script: Script,
    on_error: OnError,
    passed: Counter,
    dropped: Counter,
    refused: Counter,
    errored: Counter,
}

impl ChainEntry {
    fn new(script: Script, metrics: &Metrics) -> ChainEntry {
        let counter = |outcome| {
            metrics
                .scripts
                .get_or_create(&ScriptLabels {
                    script: script.name.clone(),
                    outcome,
                })
                .clone()
        };
        ChainEntry {
            on_error: script.on_error,
            passed: counter(ScriptOutcome::Passed),
            dropped: counter(ScriptOutcome::Dropped),
            refused: counter(ScriptOutcome::Refused),
            errored: counter(ScriptOutcome::Errored),
            script,
        }
    }
}

/// A new version of the chain, or of one of its scripts, ready to swap in: compiled once per
/// copy of the chain (`broker.script_workers`; one for the access hook).
pub enum Reload {
    One { index: usize, scripts: Vec<Script> },
    All(Vec<Vec<Script>>),
}

impl Reload {
    /// One reload per copy of the chain.
    pub fn split(self) -> Vec<Reload> {
        match self {
            Reload::One { index, scripts } => scripts
                .into_iter()
                .map(|script| Reload::One {
                    index,
                    scripts: vec![script],
                })
                .collect(),
            Reload::All(chains) => chains
                .into_iter()
                .map(|chain| Reload::All(vec![chain]))
                .collect(),
        }
    }

    /// The first script of the first copy: the access hook's script.
    fn first(self) -> Option<Script> {
        match self {
            Reload::One { scripts, .. } => scripts.into_iter().next(),
            Reload::All(chains) => chains.into_iter().next()?.into_iter().next(),
        }
    }
}

/// The chain of scripts the broker runs, in order.
pub struct Chain {
    entries: Vec<ChainEntry>,
    metrics: Arc<Metrics>,
}

/// Keys the broker owns: a script may read them but its changes are undone (and one it adds
/// is removed): the id and time, the web node's reference, the client, and the keys of the
/// broker's notices (a script that set `reject` would make web nodes take a published message
/// for a refusal).
const OWNED_KEYS: [&str; 6] = [
    crate::wire::ID,
    crate::wire::TIME,
    crate::wire::REF,
    crate::wire::CLIENT,
    crate::wire::REJECT,
    crate::wire::PUBLISHED,
];

/// Compiles every script of a chain, in order, collecting every failure with its index.
pub fn compile(specs: &[ScriptSpec]) -> Result<Vec<Script>, Vec<(usize, ScriptError)>> {
    let mut scripts = Vec::with_capacity(specs.len());
    let mut errors = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        match spec.load() {
            Ok(script) => scripts.push(script),
            Err(error) => errors.push((index, error)),
        }
    }
    if errors.is_empty() {
        Ok(scripts)
    } else {
        Err(errors)
    }
}

/// A chain compiled while the configuration was validated, kept for the start-up (or reload)
/// that follows, so that every script compiles (and runs its `init()`) once. Cloning shares it.
#[derive(Clone, Default)]
pub struct Compiled(Arc<std::sync::Mutex<Option<Vec<Script>>>>);

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compiled")
    }
}

impl PartialEq for Compiled {
    /// Compiled scripts are not configuration: any two are alike.
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Compiled {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Script>>> {
        crate::error::lock(&self.0)
    }

    pub fn put(&self, scripts: Vec<Script>) {
        *self.lock() = Some(scripts);
    }

    /// The scripts compiled by the last validation, once.
    pub fn take(&self) -> Option<Vec<Script>> {
        self.lock().take()
    }
}

impl Chain {
    /// The chain of compiled scripts, in order.
    pub fn new(scripts: Vec<Script>, metrics: Arc<Metrics>) -> Chain {
        let entries = scripts
            .into_iter()
            .map(|script| ChainEntry::new(script, &metrics))
            .collect();
        Chain { entries, metrics }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Swaps in a reloaded script or chain.
    pub fn apply(&mut self, reload: Reload) {
        match reload {
            Reload::One { index, scripts } => {
                if let (Some(entry), Some(script)) =
                    (self.entries.get_mut(index), scripts.into_iter().next())
                {
                    tracing::info!(script = %script.name, "script reloaded");
                    *entry = ChainEntry::new(script, &self.metrics);
                }
            }
            Reload::All(chains) => {
                let scripts = chains.into_iter().next().unwrap_or_default();
                tracing::info!(scripts = scripts.len(), "script chain reloaded");
                self.entries = scripts
                    .into_iter()
                    .map(|script| ChainEntry::new(script, &self.metrics))
                    .collect();
            }
        }
    }

    /// Runs the message through every script. `message` already carries the broker's `time`;
    /// whatever the scripts do, the published message keeps it and its `ref`, and gets no `id`
    /// (the broker stamps it after the chain).
    pub fn run(&mut self, mut message: Map) -> Verdict {
        // Kept aside without an allocation: three values, restored after the chain.
        let owned = OWNED_KEYS.map(|key| (key, message.get(key).cloned()));
        let reference = reference_of(&message);
        for entry in &mut self.entries {
            // Only a fail-open script needs the message as it was before it ran.
            let input = (entry.on_error == OnError::Pass).then(|| message.clone());
            match entry.script.run(message) {
                Ok(Outcome::Pass(out)) => {
                    entry.passed.inc();
                    message = out;
                }
                Ok(Outcome::Drop(rejection)) => {
                    match rejection {
                        Some(_) => entry.refused.inc(),
                        None => entry.dropped.inc(),
                    };
                    self.metrics.dropped(crate::metrics::DropReason::Script);
                    let (reason, status) = match rejection {
                        Some(Rejection { reason, status }) => (reason, status),
                        None => (
                            format!("message refused by moderation ({})", entry.script.name),
                            DEFAULT_REJECT_STATUS,
                        ),
                    };
                    return Verdict::Drop {
                        reference,
                        reason,
                        status,
                    };
                }
                Err(error) => {
                    entry.errored.inc();
                    tracing::warn!(script = %entry.script.name, %error, on_error = ?entry.on_error, "script failed on a message");
                    match entry.on_error {
                        OnError::Pass => message = input.expect("kept for fail-open scripts"),
                        OnError::Drop => {
                            self.metrics
                                .dropped(crate::metrics::DropReason::ScriptError);
                            return Verdict::Drop {
                                reference,
                                reason: "the message could not be checked by moderation".into(),
                                status: DEFAULT_REJECT_STATUS,
                            };
                        }
                    }
                }
            }
        }
        Verdict::Pass(publishable(message, owned))
    }
}

/// The sending web node's reference (`ref`) of a parsed message, to tell it what became of it.
pub fn reference_of(message: &Map) -> Option<String> {
    message.get(crate::wire::REF).and_then(|r| {
        r.read_lock::<rhai::ImmutableString>()
            .map(|r| r.to_string())
    })
}

/// The frame to publish once the chain passed a message: the keys the broker owns put back as
/// they were before the scripts, the client removed (for scripts only), `ref` first so that web
/// nodes cut it without parsing.
fn publishable(mut message: Map, owned: [(&str, Option<Dynamic>); 6]) -> Bytes {
    for (key, value) in owned {
        match value {
            Some(value) => message.insert(key.into(), value),
            None => message.remove(key),
        };
    }
    message.remove(crate::wire::CLIENT);
    let reference = message.remove(crate::wire::REF);
    let body =
        serde_json::to_vec(&Dynamic::from_map(message)).expect("a rhai map serializes to JSON");
    let Some(reference) = reference else {
        return body.into();
    };
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(b"{\"ref\":");
    serde_json::to_writer(&mut out, &reference).expect("a rhai value serializes to JSON");
    if body.len() > 2 {
        out.push(b',');
    }
    out.extend_from_slice(&body[1..]);
    out.into()
}

/// What the console shows of the broker's chain: each script in order, when its running
/// version was loaded, and the last error a reload met (file, line and column); and the specs,
/// to try a message on the chain as it is configured now.
#[derive(Default)]
pub struct ChainStatus(std::sync::Mutex<(Vec<ScriptSpec>, Vec<ScriptState>)>);

/// One script of the chain, as [`ChainStatus`] keeps it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScriptState {
    pub name: String,
    pub file: String,
    /// When the running version was loaded (Unix ms).
    pub loaded_ms: u64,
    /// The last failed reload's error, and when (Unix ms); cleared by a good reload.
    pub error: Option<String>,
    pub error_ms: Option<u64>,
}

impl ChainStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<ScriptSpec>, Vec<ScriptState>)> {
        crate::error::lock(&self.0)
    }

    /// The whole chain loaded now.
    pub fn loaded(&self, specs: &[ScriptSpec]) {
        let now = crate::wire::now_ms();
        *self.lock() = (
            specs.to_vec(),
            specs
                .iter()
                .map(|spec| ScriptState {
                    name: spec.name.clone(),
                    file: spec.shown.clone(),
                    loaded_ms: now,
                    error: None,
                    error_ms: None,
                })
                .collect(),
        );
    }

    /// One script reloaded now.
    pub fn reloaded(&self, index: usize) {
        if let Some(state) = self.lock().1.get_mut(index) {
            state.loaded_ms = crate::wire::now_ms();
            state.error = None;
            state.error_ms = None;
        }
    }

    /// A reload failed: of one script (`Some(index)`), or of the configuration.
    pub fn failed(&self, index: Option<usize>, error: String) {
        let mut status = self.lock();
        let now = Some(crate::wire::now_ms());
        let states = &mut status.1;
        match index.and_then(|index| states.get_mut(index)) {
            Some(state) => {
                state.error = Some(error);
                state.error_ms = now;
            }
            None => {
                for state in states.iter_mut() {
                    state.error = Some(error.clone());
                    state.error_ms = now;
                }
            }
        }
    }

    /// The scripts in order.
    pub fn scripts(&self) -> Vec<ScriptState> {
        self.lock().1.clone()
    }

    /// The chain as configured now, compiled afresh (for a trial run).
    pub fn compile(&self) -> Result<Vec<Script>, String> {
        let specs = self.lock().0.clone();
        compile(&specs).map_err(|errors| {
            errors
                .into_iter()
                .map(|(_, error)| error.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// Recompiles scripts when their files change or on request (SIGHUP), and hands the new
/// versions to the broker.
pub struct Reloader {
    specs: Vec<ScriptSpec>,
    source: Option<ChainSource>,
    watch: bool,
    tx: mpsc::Sender<Reload>,
    requests: mpsc::Receiver<()>,
    metrics: Arc<Metrics>,
    /// How many copies of each script a reload compiles (one per worker thread).
    copies: usize,
    /// What the console shows of the chain.
    status: Arc<ChainStatus>,
    /// A hash of each watched file's content as the running versions read it (about: read
    /// again just after they compiled): a file that changed before its watch began sends no
    /// event, and is reloaded when the watch begins.
    seen: HashMap<PathBuf, u64>,
}

/// A hash of a file's content (`None`: it cannot be read).
fn fingerprint(file: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(file).ok()?;
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

/// [`fingerprint`] of every file of `specs`.
fn fingerprints(specs: &[ScriptSpec]) -> HashMap<PathBuf, u64> {
    specs
        .iter()
        .flat_map(ScriptSpec::files)
        .filter_map(|file| Some((file.clone(), fingerprint(&file)?)))
        .collect()
}

/// Asks the reloader to reload everything (what SIGHUP does).
#[derive(Clone)]
pub struct ReloadHandle(mpsc::Sender<()>);

impl ReloadHandle {
    pub fn reload(&self) {
        let _ = self.0.try_send(());
    }
}

/// Where a full reload (SIGHUP) finds the chain: the configuration file read again, so that
/// scripts added to or removed from the chain take effect. It answers the specs and, when
/// reading the file compiled them already, the compiled scripts; or the problems found.
pub type ChainSource =
    Box<dyn Fn() -> Result<(Vec<ScriptSpec>, Option<Vec<Script>>), String> + Send + Sync>;

impl Reloader {
    /// A reloader for `specs`, plus the receiving end the broker polls and a handle for
    /// SIGHUP. Without a `source`, SIGHUP recompiles the same specs.
    pub fn new(
        specs: Vec<ScriptSpec>,
        source: Option<ChainSource>,
        watch: bool,
        metrics: Arc<Metrics>,
    ) -> (Reloader, mpsc::Receiver<Reload>, ReloadHandle) {
        let (tx, rx) = mpsc::channel(RELOAD_QUEUE);
        let (request_tx, requests) = mpsc::channel(1);
        let seen = if watch {
            fingerprints(&specs)
        } else {
            HashMap::new()
        };
        (
            Reloader {
                seen,
                specs,
                source,
                watch,
                tx,
                requests,
                metrics,
                copies: 1,
                status: Arc::default(),
            },
            rx,
            ReloadHandle(request_tx),
        )
    }

    /// Compiles `copies` of each script on a reload: one per copy of the chain.
    pub fn copies(mut self, copies: usize) -> Reloader {
        self.copies = copies.max(1);
        self
    }

    /// Keeps `status` up to date with each reload.
    pub fn status(mut self, status: Arc<ChainStatus>) -> Reloader {
        status.loaded(&self.specs);
        self.status = status;
        self
    }

    fn count(&self, result: ReloadResult) {
        self.metrics
            .script_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Watches files and waits for requests until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let (events_tx, mut events) = mpsc::channel::<PathBuf>(64);
            let _watcher = self.watch(events_tx);
            // An edit made before the watch began sends no event: reload what changed.
            let missed = self.changed_unseen();
            if !missed.is_empty() {
                self.reload_changed(&missed).await;
            }
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    request = self.requests.recv() => {
                        if request.is_none() {
                            return;
                        }
                        if self.reload_all().await {
                            break; // The files to watch may have changed.
                        }
                    }
                    Some(path) = events.recv() => {
                        let mut changed = vec![path];
                        // Editors write in several steps: wait for the burst to end.
                        tokio::time::sleep(RELOAD_DEBOUNCE).await;
                        while let Ok(path) = events.try_recv() {
                            changed.push(path);
                        }
                        self.reload_changed(&changed).await;
                    }
                }
            }
        }
    }

    /// The watched files whose content is not what the running versions read.
    fn changed_unseen(&self) -> Vec<PathBuf> {
        if !self.watch {
            return Vec::new();
        }
        self.specs
            .iter()
            .flat_map(ScriptSpec::files)
            .filter(|file| fingerprint(file) != self.seen.get(file).copied())
            .collect()
    }

    fn watch(&self, tx: mpsc::Sender<PathBuf>) -> Option<notify::RecommendedWatcher> {
        use notify::{RecursiveMode, Watcher};
        if !self.watch {
            return None;
        }
        let watched: Vec<PathBuf> = self.specs.iter().flat_map(ScriptSpec::files).collect();
        if watched.is_empty() {
            return None;
        }
        let files = watched.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            for path in event.paths {
                if files.iter().any(|file| same_file(file, &path)) {
                    let _ = tx.try_send(path);
                }
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "cannot watch script files; reload with SIGHUP");
                return None;
            }
        };
        // Watch the folders: editors replace files, which ends a watch on the file itself.
        let mut dirs: Vec<PathBuf> = watched
            .iter()
            .filter_map(|file| file.parent().map(Path::to_owned))
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::warn!(%error, dir = %dir.display(), "cannot watch a script folder");
            }
        }
        Some(watcher)
    }

    async fn reload_changed(&mut self, changed: &[PathBuf]) {
        for (index, spec) in self.specs.iter().enumerate() {
            if !spec
                .files()
                .iter()
                .any(|file| changed.iter().any(|c| same_file(file, c)))
            {
                continue;
            }
            if self.watch {
                for file in spec.files() {
                    if let Some(hash) = fingerprint(&file) {
                        self.seen.insert(file, hash);
                    }
                }
            }
            match (0..self.copies).map(|_| spec.load()).collect() {
                Ok(scripts) => {
                    self.count(ReloadResult::Ok);
                    self.status.reloaded(index);
                    let _ = self.tx.send(Reload::One { index, scripts }).await;
                }
                Err(error) => {
                    self.count(ReloadResult::Failed);
                    self.status.failed(Some(index), error.to_string());
                    tracing::error!(%error, "script not reloaded; the previous version keeps running");
                }
            }
        }
    }

    /// Reloads the whole chain (re-reading the configuration file, if any). Returns whether
    /// the chain was replaced.
    async fn reload_all(&mut self) -> bool {
        let (specs, compiled) = match &self.source {
            Some(source) => match source() {
                Ok(loaded) => loaded,
                Err(error) => {
                    self.count(ReloadResult::Failed);
                    self.status.failed(None, error.clone());
                    tracing::error!(%error, "configuration not reloaded; the scripts keep running");
                    return false;
                }
            },
            None => (self.specs.clone(), None),
        };
        let copies = compiled
            .map_or_else(|| compile(&specs), Ok)
            .and_then(|first| {
                let mut copies = vec![first];
                for _ in 1..self.copies {
                    copies.push(compile(&specs)?);
                }
                Ok(copies)
            });
        let chains = match copies {
            Ok(chains) => chains,
            Err(errors) => {
                self.count(ReloadResult::Failed);
                for (index, error) in errors {
                    tracing::error!(%error, "script chain not reloaded; the previous one keeps running");
                    self.status.failed(Some(index), error.to_string());
                }
                return false;
            }
        };
        self.count(ReloadResult::Ok);
        self.status.loaded(&specs);
        if self.watch {
            self.seen = fingerprints(&specs);
        }
        self.specs = specs;
        let _ = self.tx.send(Reload::All(chains)).await;
        true
    }
}

/// Whether two paths name the same file (the watcher reports canonical paths).
fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => {
            a.file_name() == b.file_name()
                && a.parent().and_then(|p| p.canonicalize().ok())
                    == b.parent().and_then(|p| p.canonicalize().ok())
        }
    }
}

/// Checks the sandbox limits; compiling the chain is [`compile`].
pub fn validate_limits(limits: &ScriptLimits, problem: &mut impl FnMut(&str, String)) {
    for (key, zero) in [
        ("broker.limits.max_operations", limits.max_operations == 0),
        ("broker.limits.max_string_size", limits.max_string_size == 0),
        ("broker.limits.max_array_size", limits.max_array_size == 0),
        ("broker.limits.max_map_size", limits.max_map_size == 0),
        ("broker.limits.max_call_depth", limits.max_call_depth == 0),
        ("broker.limits.max_expr_depth", limits.max_expr_depth == 0),
        ("broker.limits.max_ms", limits.max_ms == 0),
    ] {
        if zero {
            problem(key, "is 0: must be at least 1".to_owned());
        }
    }
}

/// The `[access]` section: the web node's access hook.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// The hook script, relative to the application root; none by default (everyone may
    /// follow and post in every room).
    pub file: Option<PathBuf>,
    /// Parameters, read in the script as `params`. `*_file` keys name files to read.
    pub params: BTreeMap<String, serde_json::Value>,
    /// What a failing hook does: `"drop"` (default: refuse, 403) or `"pass"` (allow).
    pub on_error: OnError,
    /// The sandbox limits of the hook (the same keys as `[broker.limits]`).
    pub limits: ScriptLimits,
    /// The hook as validation compiled it, for the start-up that follows.
    #[serde(skip)]
    pub compiled: Compiled,
}

impl AccessConfig {
    /// The hook's spec, if one is configured.
    pub fn spec(&self, root: &Root) -> Option<ScriptSpec> {
        let file = self.file.as_ref()?;
        Some(ScriptSpec {
            name: name_of(file),
            file: root.resolve(file),
            shown: file.display().to_string(),
            params: self.params.clone(),
            root: root.path().to_owned(),
            limits: self.limits,
            on_error: self.on_error,
            kind: ScriptKind::Access,
        })
    }

    /// Checks the section and compiles the hook (once: the web node built next takes it).
    pub fn validate(&self, root: &Root, problem: &mut impl FnMut(&str, String)) {
        let mut limits = |key: &str, message: String| {
            problem(&key.replace("broker.limits", "access.limits"), message)
        };
        validate_limits(&self.limits, &mut limits);
        if let Some(spec) = self.spec(root) {
            match spec.load() {
                Ok(script) => self.compiled.put(vec![script]),
                Err(error) => problem(&format!("access.file ({})", spec.name), error.to_string()),
            }
        }
    }
}

/// What the access hook decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Allow,
    /// Refused: a 4xx with the reason.
    Refuse {
        status: u16,
        reason: String,
    },
}

/// The web node's access hook: one script, shared by every request (one call at a time; a
/// call is a few microseconds), swapped whole when it is reloaded.
#[derive(Clone)]
pub struct Hook {
    script: Arc<std::sync::Mutex<Option<Script>>>,
    /// Set when the configured hook could not be loaded at start.
    refuse_all: bool,
}

/// The header names the hook sees (others, cookies among them, are not given to it).
pub const HOOK_HEADERS: [&str; 4] = ["authorization", "origin", "referer", "user-agent"];
/// Query parameters given to the hook at most, and the longest value.
const HOOK_MAX_QUERY: usize = 32;
const HOOK_MAX_VALUE: usize = 1024;

impl Hook {
    pub fn new(script: Script) -> Hook {
        Hook {
            script: Arc::new(std::sync::Mutex::new(Some(script))),
            refuse_all: false,
        }
    }

    /// A hook that refuses everything: the configured one could not be loaded (fail closed).
    pub fn refusing() -> Hook {
        Hook {
            script: Arc::new(std::sync::Mutex::new(None)),
            refuse_all: true,
        }
    }

    /// The request as the hook reads it: `room`, `name` (or `()`), `client`, `query` (a map of
    /// the query string's parameters) and `headers` (the [`HOOK_HEADERS`] present, lower-case
    /// names), plus `extra` (e.g. `text` for a message).
    pub fn request(
        room: &str,
        name: Option<&str>,
        client: &str,
        query: Option<&str>,
        header: impl Fn(&str) -> Option<String>,
    ) -> Map {
        let mut req = Map::new();
        req.insert("room".into(), room.into());
        req.insert(
            "name".into(),
            name.map_or(Dynamic::UNIT, |name| name.to_owned().into()),
        );
        req.insert("client".into(), client.into());
        let mut params = Map::new();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .filter(|(_, value)| value.len() <= HOOK_MAX_VALUE)
            .take(HOOK_MAX_QUERY)
        {
            params
                .entry(key.as_ref().into())
                .or_insert_with(|| value.into_owned().into());
        }
        req.insert("query".into(), params.into());
        let mut headers = Map::new();
        for name in HOOK_HEADERS {
            if let Some(value) = header(name).filter(|value| value.len() <= HOOK_MAX_VALUE) {
                headers.insert(name.into(), value.into());
            }
        }
        req.insert("headers".into(), headers.into());
        req
    }

    /// Runs `function` (`on_subscribe` or `on_publish`) on a request. A hook that does not
    /// define it allows everything.
    pub fn check(&self, function: &str, req: Map) -> Access {
        let mut guard = crate::error::lock(&self.script);
        let Some(script) = guard.as_mut() else {
            return if self.refuse_all {
                Access::Refuse {
                    status: 403,
                    reason: "access could not be checked".to_owned(),
                }
            } else {
                Access::Allow
            };
        };
        if !script
            .ast
            .iter_functions()
            .any(|f| f.name == function && f.params.len() == 1)
        {
            return Access::Allow;
        }
        let outcome = script
            .call(function, (Dynamic::from_map(req),))
            .and_then(|value| {
                if value.is_unit() || value.as_bool() == Ok(true) {
                    Ok(Access::Allow)
                } else if value.as_bool() == Ok(false) {
                    Ok(Access::Refuse {
                        status: 403,
                        reason: "not allowed".to_owned(),
                    })
                } else if value.is::<Rejection>() {
                    let Rejection { reason, status } = value.cast::<Rejection>();
                    Ok(Access::Refuse { status, reason })
                } else {
                    Err(format!(
                        "{}: `{function}` returned {}, not `()`, `true`, `false` or `reject(…)`",
                        script.shown,
                        value.type_name()
                    ))
                }
            });
        match outcome {
            Ok(access) => access,
            Err(error) => {
                tracing::warn!(script = %script.name, %error, on_error = %script.on_error, "the access hook failed");
                match script.on_error {
                    OnError::Pass => Access::Allow,
                    OnError::Drop => Access::Refuse {
                        status: 403,
                        reason: "access could not be checked".to_owned(),
                    },
                }
            }
        }
    }

    /// Takes reloaded versions of the hook from its [`Reloader`] until shutdown. A reload that
    /// brings no script (the hook was removed from the configuration) allows everything.
    pub async fn follow(self, mut reloads: mpsc::Receiver<Reload>, shutdown: CancellationToken) {
        loop {
            let reload = tokio::select! {
                () = shutdown.cancelled() => return,
                reload = reloads.recv() => match reload {
                    Some(reload) => reload,
                    None => return,
                },
            };
            let script = reload.first();
            tracing::info!(hook = script.is_some(), "access hook reloaded");
            *crate::error::lock(&self.script) = script;
        }
    }
}
