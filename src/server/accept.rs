//! What a listener says about accepting: when `accept` fails (out of
//! descriptors, mostly) it backs off instead of spinning, and when it
//! waits for a `max_connections` slot it says so, both without flooding
//! the log.

use std::io;
use std::time::{Duration, Instant};

/// The pause after a failed `accept`, which frees the core for the
/// connections already open (and the kubelet's probes).
const BACK_OFF: Duration = Duration::from_millis(50);
/// At most one log line per listener this often while failures go on.
const QUIET: Duration = Duration::from_secs(10);

/// A log line that would repeat: written at most once per `period`, the
/// next one saying how many were left out meanwhile.
pub struct Throttle {
    period: Duration,
    quiet_until: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    pub fn new(period: Duration) -> Self {
        Throttle {
            period,
            quiet_until: None,
            unlogged: 0,
        }
    }

    /// Whether the line is written at `now`, and with how many left out
    /// since the last one.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        if self.quiet_until.is_some_and(|until| now < until) {
            self.unlogged += 1;
            return None;
        }
        self.quiet_until = Some(now + self.period);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// A listener's record of failed accepts.
pub struct AcceptErrors {
    listener: &'static str,
    lines: Throttle,
}

impl AcceptErrors {
    pub fn new(listener: &'static str) -> Self {
        AcceptErrors {
            listener,
            lines: Throttle::new(QUIET),
        }
    }

    /// Logs `error` unless a line was written in the last 10 s (the line
    /// then says how many failures went unlogged), then backs off.
    pub async fn back_off(&mut self, error: &io::Error) {
        if let Some(unlogged) = self.lines.note(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                error = %error,
                unlogged,
                "accept failed; backing off"
            );
        }
        tokio::time::sleep(BACK_OFF).await;
    }
}

/// Says when the listener has `max_connections` open and new ones wait in
/// the kernel's listen queue: at most once a minute, or the log would
/// follow every connection that comes and goes at the limit.
pub struct Full(Throttle);

impl Default for Full {
    fn default() -> Self {
        Full(Throttle::new(Duration::from_secs(60)))
    }
}

impl Full {
    pub fn note(&mut self, max_connections: usize) {
        if self.0.note(Instant::now()).is_some() {
            tracing::warn!(
                max_connections,
                "max_connections reached: new connections wait in the kernel backlog until one closes"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_quiet_period_counts_the_failures_it_left_out() {
        let mut errors = Throttle::new(QUIET);
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
