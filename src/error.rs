//! JSON error answers: every 4xx and 5xx temma sends is `{"error": "…"}` saying what was wrong;
//! and [`lock`], how temma survives a panic while a lock was held.

use salvo::http::StatusCode;
use salvo::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use salvo::prelude::*;

/// An HTTP error with a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub status: StatusCode,
    pub message: String,
}

impl JsonError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        JsonError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Writes the status and the JSON body.
    pub fn write_to(&self, res: &mut Response) {
        res.status_code(self.status);
        write_body(res, error_body(&self.message).into_bytes());
    }
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.message)
    }
}

impl Scribe for JsonError {
    fn render(self, res: &mut Response) {
        self.write_to(res);
    }
}

/// The body of every JSON error: `{"error": message}`.
pub fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The reason phrase of a status (a hook may answer with any 4xx): `Refused` for one without.
pub fn reason_phrase(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("Refused")
}

/// Writes a JSON body with `Content-Type: application/json` and no caching.
pub fn write_json(res: &mut Response, value: &serde_json::Value) {
    write_body(
        res,
        serde_json::to_vec(value).expect("serializing a JSON value cannot fail"),
    );
}

/// Writes a body that is JSON already, with `Content-Type: application/json` and no caching.
fn write_body(res: &mut Response, body: Vec<u8>) {
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Replacing the body cannot fail for a byte vector.
    let _ = res.write_body(body);
}

/// Turns every error status left without a body (unknown route, wrong method, missing static
/// file) into a JSON error, so that no HTML error page is ever sent.
#[handler]
pub async fn catcher(req: &Request, res: &mut Response, ctrl: &mut FlowCtrl) {
    let status = res.status_code.unwrap_or(StatusCode::NOT_FOUND);
    if !status.is_client_error() && !status.is_server_error() {
        return;
    }
    let message = match status {
        StatusCode::NOT_FOUND => format!("no route for `{}`", req.uri().path()),
        StatusCode::METHOD_NOT_ALLOWED => {
            format!(
                "method {} is not allowed on `{}`",
                req.method(),
                req.uri().path()
            )
        }
        other => other
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    JsonError::new(status, message).write_to(res);
    ctrl.skip_rest();
}

/// Locks a mutex even if a thread panicked while holding it: every lock in temma guards state
/// that a panic cannot leave half-updated in a way that matters more than losing the process,
/// so the others keep serving.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
