//! Closing quiet h2 connections. HTTP/1's `header_read_timeout` closes a
//! keep-alive connection that sends no next request; an h2 client can
//! answer pings and ask nothing, holding a `max_connections` slot for
//! ever. Such a connection is told to close (GOAWAY) once a whole
//! `header_read_timeout` passed with no request open or started.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The requests of one h2 connection.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    /// Requests started or ended so far: a change means the connection
    /// was not quiet.
    events: AtomicU64,
    /// When the last request open ended, in milliseconds after `born`:
    /// the quiet period runs from then, not from the watch's last look.
    quiet_from_ms: AtomicU64,
    born: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            open: AtomicUsize::new(0),
            events: AtomicU64::new(0),
            quiet_from_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }
}

/// A request's hold on its connection's activity, from its start until
/// its accounting is done (its response body ended or was dropped).
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Activity {
    pub fn enter(self: &Arc<Self>) -> Busy {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Whether no request was open or came and went since `seen` (the
    /// count of the last look), which is brought up to date.
    fn quiet_since(&self, seen: &mut u64) -> bool {
        let events = self.events.load(Ordering::Acquire);
        let quiet = self.open.load(Ordering::Relaxed) == 0 && events == *seen;
        *seen = events;
        quiet
    }

    /// When the last request ended (the connection's start if none has).
    fn quiet_from(&self) -> Instant {
        self.born + Duration::from_millis(self.quiet_from_ms.load(Ordering::Acquire))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        // Stored by every request that ends, before it counts as ended:
        // a watch that sees the connection quiet reads the latest end.
        let ms = activity.born.elapsed().as_millis();
        activity
            .quiet_from_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Release);
        activity.events.fetch_add(1, Ordering::Release);
        activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's watch: its activity, and how long it may stay quiet.
pub struct Watch {
    pub activity: Arc<Activity>,
    pub after: Duration,
}

impl Watch {
    /// Resolves once `after` passed with no request open or started:
    /// looked at when the period since the last request ended is over,
    /// so a connection goes within one period of its last request, not
    /// up to two.
    pub async fn quiet(&self) {
        let mut seen = self.activity.events.load(Ordering::Relaxed);
        let mut due = Instant::now() + self.after;
        loop {
            tokio::time::sleep_until(due).await;
            if self.activity.quiet_since(&mut seen) {
                return;
            }
            due = if self.activity.open.load(Ordering::Relaxed) > 0 {
                Instant::now() + self.after
            } else {
                (self.activity.quiet_from() + self.after).max(Instant::now())
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_open_or_come_and_gone_is_activity() {
        let activity = Arc::new(Activity::default());
        let mut seen = 0;
        assert!(activity.quiet_since(&mut seen));
        let busy = activity.enter();
        assert!(!activity.quiet_since(&mut seen));
        assert!(!activity.quiet_since(&mut seen), "still open");
        drop(busy);
        assert!(!activity.quiet_since(&mut seen), "it ended since");
        assert!(activity.quiet_since(&mut seen));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_goes_one_period_after_its_last_request() {
        let activity = Arc::new(Activity::default());
        let watch = Watch {
            activity: activity.clone(),
            after: Duration::from_secs(5),
        };
        let start = Instant::now();
        let quiet = tokio::spawn(async move { watch.quiet().await });
        // A request from 1 s to 3 s: quiet from 3 s, closed at 8 s.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy = activity.enter();
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(busy);
        quiet.await.expect("watch");
        assert_eq!(start.elapsed(), Duration::from_secs(8));
    }
}
