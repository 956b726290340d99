//! What a component needs from the rest of the configuration to validate and build itself,
//! so that components never import [`crate::config`] (which assembles them).
//!
//! - [`Root`]: where relative paths start (`application.root`, resolved).
//! - [`Context`]: what [`crate::app`] hands every `XConfig::build`: the root, the named data
//!   sources, the addresses the embedded broker bound, the process's metrics, and the limits
//!   every ZeroMQ socket shares.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dsn::Dsn;
use crate::metrics::Metrics;
use crate::socket::Addresses;

/// The application root: relative paths in the configuration resolve against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root(pub PathBuf);

impl Root {
    /// `path` resolved against the root (an absolute path stays as it is).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.0.join(path)
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Why a component could not find its data source (the configuration was validated, so this
/// only happens to a hand-made [`Context`]).
#[derive(Debug, thiserror::Error)]
#[error("data source `{0}` is not defined")]
pub struct UnknownDataSource(pub String);

/// What every component's `build` gets.
pub struct Context {
    pub root: Root,
    /// The configuration file, re-read when the scripts reload (`None` in memory).
    pub config_file: Option<PathBuf>,
    pub data_sources: BTreeMap<String, Dsn>,
    /// Where the sockets bound so far listen (a connect to port 0 follows them).
    pub addresses: Addresses,
    pub metrics: Arc<Metrics>,
    /// `broker.max_frame_bytes`: the largest frame any ZeroMQ peer may send.
    pub max_frame_bytes: usize,
}

impl Context {
    /// The data source a component names.
    pub fn dsn(&self, name: &str) -> Result<&Dsn, UnknownDataSource> {
        self.data_sources
            .get(name)
            .ok_or_else(|| UnknownDataSource(name.to_owned()))
    }
}
