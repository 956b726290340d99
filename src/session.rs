//! Optional signed-cookie sessions (`application.enableSessions`).
//!
//! The session lives entirely in a signed cookie (salvo's `CookieStore`): no server-side store,
//! no lock, so it can never serialize or block requests — Temma's PHP file sessions deadlocked
//! the never-ending SSE request. Only `POST /message/broadcast` uses it, to remember the
//! sender's name; with sessions off no cookie is ever set.

use std::time::Duration;

use salvo::session::{CookieStore, SessionHandler};

use crate::config::ApplicationConfig;

/// Builds the session middleware, or `None` when sessions are off.
///
/// The configuration was validated: the secret is present and long enough.
pub fn build(config: &ApplicationConfig) -> Option<SessionHandler<CookieStore>> {
    if !config.enable_sessions {
        return None;
    }
    let secret = config.session_secret.as_deref().unwrap_or_default();
    let handler = SessionHandler::builder(CookieStore::new(), secret.as_bytes())
        .cookie_name(config.session_name.clone())
        .session_ttl(Some(Duration::from_secs(config.session_duration)))
        .secure_cookie(config.session_secure)
        .save_unchanged(false)
        .build()
        .expect("a validated secret of 64 bytes or more builds a session handler");
    Some(handler)
}
