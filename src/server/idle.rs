//! Closing quiet h2 connections. HTTP/1's `header_read_timeout` closes a
//! keep-alive connection that sends no next request; an h2 client can
//! answer pings and ask nothing, holding a `max_connections` slot for
//! ever. Such a connection is told to close (GOAWAY) once a whole
//! `header_read_timeout` passed with no request open or started.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// The requests of one h2 connection.
#[derive(Debug, Default)]
pub struct Activity {
    open: AtomicUsize,
    /// Requests started or ended so far: a change means the connection
    /// was not quiet.
    events: AtomicU64,
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
        let events = self.events.load(Ordering::Relaxed);
        let quiet = self.open.load(Ordering::Relaxed) == 0 && events == *seen;
        *seen = events;
        quiet
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.events.fetch_add(1, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's watch: its activity, looked at every `after`.
pub struct Watch {
    pub activity: Arc<Activity>,
    pub after: Duration,
}

impl Watch {
    /// Resolves once a whole period passed quiet.
    pub async fn quiet(&self) {
        let mut seen = self.activity.events.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(self.after).await;
            if self.activity.quiet_since(&mut seen) {
                return;
            }
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
}
