//! The Homepage root controller: `GET /` serves `index.html` from the static folder.
//!
//! Temma's tutorial rendered `homepage.tpl` (its `_view('homepage.tpl')` was a bug: it names a
//! view class, not a template). Here the page is a static file read at each request, so an edit
//! shows on reload, sent with `Content-Type: text/html; charset=utf-8` and no caching.

use std::path::PathBuf;

use salvo::http::StatusCode;
use salvo::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use salvo::prelude::*;

use crate::error::JsonError;

/// The controllers `application.rootController` may name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum RootController {
    /// Serves `index.html` from the static folder.
    #[default]
    Homepage,
}

/// The page the root controller serves, inside the static folder.
pub const INDEX: &str = "index.html";

/// `GET /`.
pub struct Homepage {
    /// Absolute or root-relative path of `index.html`.
    pub index: PathBuf,
}

#[async_trait]
impl Handler for Homepage {
    async fn handle(
        &self,
        _req: &mut Request,
        _depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.skip_rest();
        match tokio::fs::read(&self.index).await {
            Ok(page) => {
                let headers = res.headers_mut();
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                res.status_code(StatusCode::OK);
                let _ = res.write_body(page);
            }
            Err(error) => {
                tracing::error!(path = %self.index.display(), %error, "cannot read the home page");
                JsonError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the home page `{INDEX}` cannot be read"),
                )
                .write_to(res);
            }
        }
    }
}
