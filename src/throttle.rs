//! Log lines that outside input can trigger once per frame, request or connection, kept to a
//! bounded rate.
//!
//! A peer on the ZeroMQ network that writes junk as fast as the kernel takes it would otherwise
//! get one warning per frame: measured, 1.2 MB of junk made 400,000 lines (45 MB) of log. With
//! [`throttled!`] a call site logs its first occurrence at once, then at most one line per
//! [`INTERVAL`], which says how many like it were not logged (`suppressed`) in how many seconds
//! since the line before (`suppressed_secs`); the others go to the `debug` level. What was dropped is still counted, one by one, in the metrics. The
//! zeromq crate's own lines come in through [`CrateLog`], throttled the same way.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per call site in this time.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One call site's state: when it last logged, and how many it did not log since.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

/// What a logged line says of the ones before it that were not logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suppressed {
    /// How many were not logged…
    pub count: u64,
    /// …in this many seconds since the line before (0 for the first line).
    pub secs: u64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            state: Mutex::new(State::new()),
        }
    }

    /// Whether this occurrence, at `now`, is logged: `Some` with what was not logged since the
    /// last line, or `None` while the interval runs.
    pub fn admit(&self, now: Instant) -> Option<Suppressed> {
        crate::error::lock(&self.state).admit(now)
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

impl State {
    const fn new() -> State {
        State {
            last: None,
            suppressed: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Option<Suppressed> {
        match self.last {
            Some(last) if now < last + INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                let secs = self
                    .last
                    .map_or(0, |last| now.saturating_duration_since(last).as_secs());
                self.last = Some(now);
                Some(Suppressed {
                    count: std::mem::take(&mut self.suppressed),
                    secs,
                })
            }
        }
    }
}

/// `throttled!(Level::WARN, fields…, "message")`: a `tracing` event at that level, with the
/// fields `suppressed` and `suppressed_secs` ([`Suppressed`]), at most once per [`INTERVAL`] for
/// this call site; at `debug` otherwise.
#[macro_export]
macro_rules! throttled {
    ($level:expr, $($rest:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new();
        match THROTTLE.admit(::std::time::Instant::now()) {
            Some(suppressed) => ::tracing::event!(
                $level,
                suppressed = suppressed.count,
                suppressed_secs = suppressed.secs,
                $($rest)+
            ),
            None => ::tracing::debug!($($rest)+),
        }
    }};
}

/// The zeromq crate's own lines (it logs with the `log` crate) in temma's log, at `info` and
/// above: what it says of a peer it cut off (`went past 64 subscriptions`), of a frame it could
/// not use, of a send that failed. Their target is `zeromq` (`RUST_LOG=zeromq=warn` filters
/// them), and each line names the crate's module in `origin`; they are
/// throttled like temma's own, one throttle per call site in the crate (its module and line:
/// the crate has a few dozen; past [`CrateLog::MAX_THROTTLES`], the others share the last).
#[derive(Debug)]
pub struct CrateLog {
    throttles: Mutex<Vec<(String, Option<u32>, State)>>,
}

impl CrateLog {
    pub const MAX_THROTTLES: usize = 128;

    pub const fn new() -> CrateLog {
        CrateLog {
            throttles: Mutex::new(Vec::new()),
        }
    }

    /// Whether a line from `module`'s `line` is logged at `now` (as [`Throttle::admit`]).
    pub fn admit(&self, module: &str, line: Option<u32>, now: Instant) -> Option<Suppressed> {
        let mut throttles = crate::error::lock(&self.throttles);
        let found = throttles
            .iter()
            .position(|(name, at, _)| *at == line && name == module);
        let index = match found {
            Some(index) => index,
            None if throttles.len() < CrateLog::MAX_THROTTLES => {
                throttles.push((module.to_owned(), line, State::new()));
                throttles.len() - 1
            }
            None => throttles.len() - 1,
        };
        throttles[index].2.admit(now)
    }
}

impl Default for CrateLog {
    fn default() -> CrateLog {
        CrateLog::new()
    }
}

impl log::Log for CrateLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = record.level();
        if level > log::Level::Info {
            return;
        }
        let origin = record.target();
        let text = record.args();
        let Some(Suppressed { count, secs }) = self.admit(origin, record.line(), Instant::now())
        else {
            tracing::debug!(target: "zeromq", origin, "{text}");
            return;
        };
        match level {
            log::Level::Error => {
                tracing::error!(target: "zeromq", suppressed = count, suppressed_secs = secs, origin, "{text}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "zeromq", suppressed = count, suppressed_secs = secs, origin, "{text}")
            }
            _ => {
                tracing::info!(target: "zeromq", suppressed = count, suppressed_secs = secs, origin, "{text}")
            }
        }
    }

    fn flush(&self) {}
}

/// Installs a [`CrateLog`] as the process's `log` logger (once; later calls change nothing).
pub fn pass_crate_logs() {
    static LOGGER: CrateLog = CrateLog::new();
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(count: u64, secs: u64) -> Option<Suppressed> {
        Some(Suppressed { count, secs })
    }

    #[test]
    fn the_first_is_logged_then_one_per_interval_with_the_count_between() {
        let throttle = Throttle::new();
        let start = Instant::now();
        assert_eq!(throttle.admit(start), said(0, 0));
        for i in 1..=1000 {
            assert_eq!(throttle.admit(start + INTERVAL * i / 1001), None);
        }
        assert_eq!(throttle.admit(start + INTERVAL), said(1000, 10));
        assert_eq!(throttle.admit(start + INTERVAL + INTERVAL / 2), None);
        // After a quiet while, the next one is logged at once, and says over how long.
        assert_eq!(throttle.admit(start + INTERVAL * 50), said(1, 490));
        assert_eq!(throttle.admit(start + INTERVAL * 50), None);
    }

    #[test]
    fn the_crate_s_lines_are_throttled_per_call_site() {
        let crate_log = CrateLog::new();
        let now = Instant::now();
        assert_eq!(crate_log.admit("zeromq::pub", Some(152), now), said(0, 0));
        assert_eq!(crate_log.admit("zeromq::pub", Some(152), now), None);
        // Another line, of the same module or another, is not held back by that flood.
        assert_eq!(crate_log.admit("zeromq::pub", Some(173), now), said(0, 0));
        assert_eq!(crate_log.admit("zeromq::sub", Some(152), now), said(0, 0));
        let later = now + INTERVAL;
        assert_eq!(
            crate_log.admit("zeromq::pub", Some(152), later),
            said(1, 10)
        );
        // Past the bound, the other call sites share the last throttle.
        for line in 3..CrateLog::MAX_THROTTLES as u32 {
            assert_eq!(
                crate_log.admit("zeromq::codec", Some(line), now),
                said(0, 0)
            );
        }
        assert_eq!(crate_log.admit("zeromq::codec", None, now), None);
        assert_eq!(crate_log.admit("one more", Some(1), now), None);
    }
}
