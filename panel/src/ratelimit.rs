//! Fixed-window rate limiting. In-process by default (one panel); the Redis store, when
//! configured, shares the counters between replicas.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The outcome of one counted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window resets.
    pub reset_after: u64,
}

#[derive(Debug, Default)]
pub struct LocalLimiter {
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl LocalLimiter {
    /// Counts one request against `key`: at most `limit` per `window`.
    pub fn hit(&self, key: &str, limit: u32, window: Duration) -> Decision {
        let now = Instant::now();
        // A poisoned lock only means another thread panicked mid-update; the counts are
        // still usable.
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() > 100_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = windows.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        let reset_after = window
            .saturating_sub(now.duration_since(entry.0))
            .as_secs()
            .max(1);
        if entry.1 >= limit {
            return Decision {
                allowed: false,
                limit,
                remaining: 0,
                reset_after,
            };
        }
        entry.1 += 1;
        Decision {
            allowed: true,
            limit,
            remaining: limit - entry.1,
            reset_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_refuses_past_the_limit() {
        let l = LocalLimiter::default();
        let w = Duration::from_secs(60);
        assert_eq!(l.hit("a", 2, w).remaining, 1);
        assert_eq!(l.hit("a", 2, w).remaining, 0);
        let third = l.hit("a", 2, w);
        assert!(!third.allowed);
        assert!(third.reset_after >= 1 && third.reset_after <= 60);
        assert!(l.hit("b", 2, w).allowed, "other keys are unaffected");
    }

    #[test]
    fn a_new_window_starts_afresh() {
        let l = LocalLimiter::default();
        let w = Duration::from_millis(1);
        assert!(l.hit("a", 1, w).allowed);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Poll rather than sleep a guessed amount: the window is 1 ms.
        while !l.hit("a", 1, w).allowed {
            assert!(Instant::now() < deadline, "the window never reset");
            std::thread::yield_now();
        }
    }
}
