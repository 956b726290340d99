//! Optional signed-cookie sessions (`application.enableSessions`).
//!
//! The session lives entirely in a signed cookie (salvo's `CookieStore`): no server-side store,
//! no lock, so it can never serialize or block requests — Temma's PHP file sessions deadlocked
//! the never-ending SSE request. `POST /message/broadcast` uses it to remember the sender's
//! name, and `GET /event/fetch` reads it (never writes it) to list who is in the room; with
//! sessions off no cookie is ever set.

use std::time::Duration;

/// The session key remembering the sender's name (set by a POST, read by the SSE stream for
/// the room's list of who is here).
pub const SESSION_FROM: &str = "from";

use salvo::session::{CookieStore, SessionHandler};

/// The session settings of Temma's `[application]` section.
pub struct SessionSettings<'a> {
    pub secret: &'a str,
    pub cookie_name: &'a str,
    pub ttl: Duration,
    pub secure: bool,
}

/// Builds the session middleware.
///
/// The configuration was validated: the secret is long enough.
pub fn build(settings: SessionSettings<'_>) -> SessionHandler<CookieStore> {
    SessionHandler::builder(CookieStore::new(), settings.secret.as_bytes())
        .cookie_name(settings.cookie_name.to_owned())
        .session_ttl(Some(settings.ttl))
        .secure_cookie(settings.secure)
        .save_unchanged(false)
        .build()
        .expect("a validated secret of 64 bytes or more builds a session handler")
}
