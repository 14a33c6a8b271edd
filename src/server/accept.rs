//! What a listener does when `accept` fails (out of descriptors, mostly):
//! back off instead of spinning, and say so without flooding the log.

use std::io;
use std::time::{Duration, Instant};

/// The pause after a failed `accept`, which frees the core for the
/// connections already open (and the kubelet's probes).
const BACK_OFF: Duration = Duration::from_millis(50);
/// At most one log line per listener this often while failures go on.
const QUIET: Duration = Duration::from_secs(10);

/// A listener's record of failed accepts.
pub struct AcceptErrors {
    listener: &'static str,
    quiet_until: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    pub fn new(listener: &'static str) -> Self {
        AcceptErrors {
            listener,
            quiet_until: None,
            unlogged: 0,
        }
    }

    /// Logs `error` unless a line was written in the last 10 s (the line
    /// then says how many failures went unlogged), then backs off.
    pub async fn back_off(&mut self, error: &io::Error) {
        if let Some(unlogged) = self.note(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                error = %error,
                unlogged,
                "accept failed; backing off"
            );
        }
        tokio::time::sleep(BACK_OFF).await;
    }

    /// Whether a failure at `now` is logged, and with how many failures
    /// since the last line that were not.
    fn note(&mut self, now: Instant) -> Option<u64> {
        if self.quiet_until.is_some_and(|until| now < until) {
            self.unlogged += 1;
            return None;
        }
        self.quiet_until = Some(now + QUIET);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_quiet_period_counts_the_failures_it_left_out() {
        let mut errors = AcceptErrors::new("proxy");
        let start = Instant::now();
        assert_eq!(errors.note(start), Some(0));
        // 20 failures a second (the back-off) for the rest of the period.
        let mut logged = Vec::new();
        for i in 1..=400u32 {
            if let Some(n) = errors.note(start + BACK_OFF * i) {
                logged.push((i, n));
            }
        }
        // 10 s / 50 ms: the 200th failure opens the next period.
        assert_eq!(logged, [(200, 199), (400, 199)]);
    }
}
