//! Log lines that outside input can trigger once per frame, request or connection, kept to a
//! bounded rate.
//!
//! A peer on the ZeroMQ network that writes junk as fast as the kernel takes it would otherwise
//! get one warning per frame: measured, 1.2 MB of junk made 400,000 lines (45 MB) of log. With
//! [`throttled!`] a call site logs its first occurrence at once, then at most one line per
//! [`INTERVAL`], which says how many like it were not logged since (`suppressed`); the others go
//! to the `debug` level. What was dropped is still counted, one by one, in the metrics.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per call site in this time.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One call site's state: when it may log again, and how many it did not log since.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    next: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            state: Mutex::new(State {
                next: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether this occurrence, at `now`, is logged: `Some(n)` with the number of occurrences
    /// not logged since the last line, or `None` while the interval runs.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match state.next {
            Some(next) if now < next => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.next = Some(now + INTERVAL);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

/// `throttled!(Level::WARN, fields…, "message")`: a `tracing` event at that level, with a
/// `suppressed` field, at most once per [`INTERVAL`] for this call site; at `debug` otherwise.
#[macro_export]
macro_rules! throttled {
    ($level:expr, $($rest:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttle = $crate::throttle::Throttle::new();
        match THROTTLE.admit(::std::time::Instant::now()) {
            Some(suppressed) => ::tracing::event!($level, suppressed, $($rest)+),
            None => ::tracing::debug!($($rest)+),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_one_per_interval_with_the_count_between() {
        let throttle = Throttle::new();
        let start = Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        for i in 1..=1000 {
            assert_eq!(throttle.admit(start + INTERVAL * i / 1001), None);
        }
        assert_eq!(throttle.admit(start + INTERVAL), Some(1000));
        assert_eq!(throttle.admit(start + INTERVAL + INTERVAL / 2), None);
        // After a quiet while, the next one is logged at once.
        assert_eq!(throttle.admit(start + INTERVAL * 5), Some(1));
        assert_eq!(throttle.admit(start + INTERVAL * 5), None);
    }
}
