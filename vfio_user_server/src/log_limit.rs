//! Warnings about what a guest or a client does, at most a few a second
//! from each place that logs them: a guest that posts bad requests in a
//! loop must not fill the host's log. Use [`warn_limited!`](crate::warn_limited).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines logged per second from one place; the rest are counted.
pub const LINES_PER_SECOND: u64 = 10;

/// The rate limit of one place that logs: the second it counts in (since
/// the process's first use), the lines logged in it, the lines dropped
/// since the last one logged.
#[derive(Debug, Default)]
pub struct RateLimit {
    second: AtomicU64,
    lines: AtomicU64,
    dropped: AtomicU64,
}

impl RateLimit {
    /// A limit with nothing logged yet.
    pub const fn new() -> Self {
        RateLimit {
            second: AtomicU64::new(0),
            lines: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now, and if so how many were dropped
    /// before it.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(seconds())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.lines.store(0, Ordering::Relaxed);
        }
        if self.lines.fetch_add(1, Ordering::Relaxed) < LINES_PER_SECOND {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Whole seconds since the first call (1 for the first second, so that a
/// fresh [`RateLimit`] starts a new one).
fn seconds() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + 1
}

/// `log::warn!`, at most [`LINES_PER_SECOND`] lines a second from this
/// call site; the first line after some were dropped says how many.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::RateLimit = $crate::log_limit::RateLimit::new();
        match LIMIT.allow() {
            Some(0) => log::warn!($($arg)+),
            Some(dropped) => log::warn!(
                "{} ({dropped} more like it not logged)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_a_second_then_a_count() {
        let limit = RateLimit::new();
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(limit.allow_at(5), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(limit.allow_at(5), None);
        }
        // The next second: the first line says how many were dropped.
        assert_eq!(limit.allow_at(6), Some(25));
        assert_eq!(limit.allow_at(6), Some(0));
    }
}
