//! Failed-login limits: a fixed window per key (an IP address, a user name). Past the limit
//! the key is refused until its window ends. Memory is bounded: at most `MAX_KEYS` keys are
//! tracked, expired ones are dropped first, and a full table stops tracking new keys (the
//! per-IP connection cap still holds then).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_KEYS: usize = 65_536;

#[derive(Debug)]
pub struct FailureLimiter<K> {
    limit: u32,
    window: Duration,
    entries: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Eq + Hash + Clone> FailureLimiter<K> {
    pub fn new(limit: u32, window: Duration) -> Self {
        FailureLimiter {
            limit,
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` has used up its failures in the current window.
    pub fn is_blocked(&self, key: &K) -> bool {
        self.is_blocked_at(key, Instant::now())
    }

    pub fn is_blocked_at(&self, key: &K, now: Instant) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .is_some_and(|(start, count)| now.duration_since(*start) < self.window && *count >= self.limit)
    }

    /// Counts one failure for `key`.
    pub fn fail(&self, key: &K) {
        self.fail_at(key, Instant::now());
    }

    pub fn fail_at(&self, key: &K, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !entries.contains_key(key) && entries.len() >= MAX_KEYS {
            entries.retain(|_, (start, _)| now.duration_since(*start) < self.window);
            if entries.len() >= MAX_KEYS {
                tracing::warn!("SFTP failed-login table is full; not tracking a new key");
                return;
            }
        }
        let entry = entries.entry(key.clone()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..2 {
            limiter.fail_at(&"a", t0);
        }
        assert!(!limiter.is_blocked_at(&"a", t0));
        limiter.fail_at(&"a", t0);
        assert!(limiter.is_blocked_at(&"a", t0 + Duration::from_secs(59)));
        assert!(!limiter.is_blocked_at(&"b", t0), "other keys are unaffected");
        assert!(!limiter.is_blocked_at(&"a", t0 + Duration::from_secs(60)));
        // A failure after the window starts a new one.
        limiter.fail_at(&"a", t0 + Duration::from_secs(61));
        assert!(!limiter.is_blocked_at(&"a", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn the_table_is_bounded() {
        let limiter = FailureLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 10 {
            limiter.fail_at(&i, t0);
        }
        assert_eq!(limiter.entries.lock().unwrap().len(), MAX_KEYS);
        // Once the old entries expire, new keys are tracked again.
        limiter.fail_at(&usize::MAX, t0 + Duration::from_secs(61));
        assert!(limiter.is_blocked_at(&usize::MAX, t0 + Duration::from_secs(61)));
    }
}
