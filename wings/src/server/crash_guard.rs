//! The crash guard's policy: when to restart a server that exited unexpectedly, and when to
//! give up. Pure logic over timestamps, so it is tested without Docker.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::CrashGuardConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a crash (a clean exit when those are not counted): stay offline.
    Ignore,
    /// Restart after this delay.
    RestartAfter(Duration),
    /// Too many crashes inside the window: stop trying.
    GiveUp,
}

#[derive(Debug, Default)]
pub struct CrashGuard {
    recent: VecDeque<Instant>,
}

impl CrashGuard {
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.recent.len()).unwrap_or(u32::MAX)
    }

    /// Records an unexpected exit at `now` and decides what to do.
    pub fn on_exit(
        &mut self,
        config: &CrashGuardConfig,
        exit_code: i64,
        oom_killed: bool,
        now: Instant,
    ) -> Verdict {
        if !config.enabled || (exit_code == 0 && !oom_killed && !config.clean_exit_is_crash) {
            return Verdict::Ignore;
        }
        let window = Duration::from_secs(config.window_secs);
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let attempt = self.attempts();
        if attempt > config.max_attempts {
            return Verdict::GiveUp;
        }
        let factor = 1u64.checked_shl(attempt.saturating_sub(1)).unwrap_or(u64::MAX);
        let delay = config
            .initial_backoff_ms
            .saturating_mul(factor)
            .min(config.max_backoff_ms);
        Verdict::RestartAfter(Duration::from_millis(delay))
    }

    /// A deliberate start or restart forgives earlier crashes.
    pub fn reset(&mut self) {
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_exponentially_then_gives_up() {
        let config = CrashGuardConfig {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 250,
            ..Default::default()
        };
        let mut guard = CrashGuard::default();
        let t = Instant::now();
        assert_eq!(
            guard.on_exit(&config, 1, false, t),
            Verdict::RestartAfter(Duration::from_millis(100))
        );
        assert_eq!(
            guard.on_exit(&config, 1, false, t),
            Verdict::RestartAfter(Duration::from_millis(200))
        );
        assert_eq!(
            guard.on_exit(&config, 1, true, t),
            Verdict::RestartAfter(Duration::from_millis(250))
        );
        assert_eq!(guard.on_exit(&config, 1, false, t), Verdict::GiveUp);
    }

    #[test]
    fn old_crashes_leave_the_window() {
        let config = CrashGuardConfig {
            max_attempts: 1,
            window_secs: 10,
            ..Default::default()
        };
        let mut guard = CrashGuard::default();
        let t = Instant::now();
        assert!(matches!(
            guard.on_exit(&config, 1, false, t),
            Verdict::RestartAfter(_)
        ));
        assert!(matches!(
            guard.on_exit(&config, 1, false, t + Duration::from_secs(11)),
            Verdict::RestartAfter(_)
        ));
        assert_eq!(
            guard.on_exit(&config, 1, false, t + Duration::from_secs(12)),
            Verdict::GiveUp
        );
    }

    #[test]
    fn clean_exits_can_be_ignored() {
        let config = CrashGuardConfig {
            clean_exit_is_crash: false,
            ..Default::default()
        };
        let mut guard = CrashGuard::default();
        assert_eq!(guard.on_exit(&config, 0, false, Instant::now()), Verdict::Ignore);
        assert!(matches!(
            guard.on_exit(&config, 0, true, Instant::now()),
            Verdict::RestartAfter(_)
        ));
    }
}
