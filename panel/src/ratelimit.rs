//! Fixed-window rate limiting. In-process by default (one panel); with `REDIS_URL` the
//! counters live in Redis and are shared by every replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// Where the counters live.
pub enum Limiter {
    Local(LocalLimiter),
    Redis {
        conn: ConnectionManager,
        script: redis::Script,
        /// Prepended to every key, so several panels (or test runs) can share one Redis.
        prefix: String,
        /// Used while Redis cannot be reached: each replica then limits on its own, which
        /// is looser but never unlimited.
        fallback: LocalLimiter,
    },
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limiter::Local(_) => f.write_str("Limiter::Local"),
            Limiter::Redis { .. } => f.write_str("Limiter::Redis"),
        }
    }
}

// One round trip, atomic: count, start the window on the first hit, report the time left.
const HIT_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {n, ttl}
";

impl Limiter {
    pub fn local() -> Limiter {
        Limiter::Local(LocalLimiter::default())
    }

    pub async fn redis(url: &str, prefix: &str) -> Result<Limiter, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Limiter::Redis {
            conn,
            script: redis::Script::new(HIT_SCRIPT),
            prefix: prefix.to_string(),
            fallback: LocalLimiter::default(),
        })
    }

    pub fn is_redis(&self) -> bool {
        matches!(self, Limiter::Redis { .. })
    }

    /// Counts one request against `key`: at most `limit` per `window`.
    pub async fn hit(&self, key: &str, limit: u32, window: Duration) -> Decision {
        match self {
            Limiter::Local(local) => local.hit(key, limit, window),
            Limiter::Redis {
                conn,
                script,
                prefix,
                fallback,
            } => {
                let mut conn = conn.clone();
                let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
                let counted: Result<(u64, i64), _> = script
                    .key(format!("{prefix}:rl:{key}"))
                    .arg(window_ms)
                    .invoke_async(&mut conn)
                    .await;
                match counted {
                    Ok((count, ttl_ms)) => {
                        let used = u32::try_from(count).unwrap_or(u32::MAX);
                        let reset_after = u64::try_from(ttl_ms).unwrap_or(0).div_ceil(1000).max(1);
                        Decision {
                            allowed: used <= limit,
                            limit,
                            remaining: limit.saturating_sub(used),
                            reset_after,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "redis unreachable; rate limiting in-process");
                        fallback.hit(key, limit, window)
                    }
                }
            }
        }
    }

    /// For `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        match self {
            Limiter::Local(_) => Ok(()),
            Limiter::Redis { conn, .. } => {
                let mut conn = conn.clone();
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }
}

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
