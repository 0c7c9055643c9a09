//! The crash guard's policy: when to restart a server that exited unexpectedly, and when to
//! give up. Pure logic over timestamps, so it is tested without Docker.
//!
//! Exits are wall-clock Unix milliseconds, kept in the server's record, so a wings restart in
//! the middle of a crash loop does not forgive the crashes before it.

use std::collections::VecDeque;
use std::time::Duration;

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
    recent: VecDeque<u64>,
}

impl CrashGuard {
    /// A guard that remembers the exits recorded before (Unix milliseconds).
    pub fn from_history(exits_ms: &[u64]) -> CrashGuard {
        CrashGuard {
            recent: exits_ms.iter().copied().collect(),
        }
    }

    /// The exits inside the window, to be saved with the record.
    pub fn history(&self) -> Vec<u64> {
        self.recent.iter().copied().collect()
    }

    pub fn attempts(&self) -> u32 {
        u32::try_from(self.recent.len()).unwrap_or(u32::MAX)
    }

    /// Records an unexpected exit at `now` and decides what to do.
    pub fn on_exit(
        &mut self,
        config: &CrashGuardConfig,
        exit_code: i64,
        oom_killed: bool,
        now_ms: u64,
    ) -> Verdict {
        if !config.enabled || (exit_code == 0 && !oom_killed && !config.clean_exit_is_crash) {
            return Verdict::Ignore;
        }
        let window_ms = config.window_secs.saturating_mul(1000);
        while self
            .recent
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) > window_ms)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now_ms);
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
        let t = 1_000_000;
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
        let t = 1_000_000;
        assert!(matches!(
            guard.on_exit(&config, 1, false, t),
            Verdict::RestartAfter(_)
        ));
        assert!(matches!(
            guard.on_exit(&config, 1, false, t + 11_000),
            Verdict::RestartAfter(_)
        ));
        // Remembered across a restart of wings.
        let mut guard = CrashGuard::from_history(&guard.history());
        assert_eq!(guard.on_exit(&config, 1, false, t + 12_000), Verdict::GiveUp);
    }

    #[test]
    fn clean_exits_can_be_ignored() {
        let config = CrashGuardConfig {
            clean_exit_is_crash: false,
            ..Default::default()
        };
        let mut guard = CrashGuard::default();
        assert_eq!(guard.on_exit(&config, 0, false, 1), Verdict::Ignore);
        assert!(matches!(
            guard.on_exit(&config, 0, true, 2),
            Verdict::RestartAfter(_)
        ));
    }
}
