//! Cutting a connection whose streamed answer outlives `request_timeout`
//! while its client reads nothing. The tap enforces the deadline whenever
//! hyper polls it, but hyper stops polling a body while the client's
//! socket (or, on h2, the stream's flow-control window) is full: a client
//! that stops reading would hold its connection, and the upstream's, for
//! as long as it likes. The connection's task watches the deadlines of
//! the streams it serves and drops the connection when one passes.
//! hyper cannot reset one h2 stream from outside, so a stream stalled past
//! its deadline ends the connection's other streams too, as nginx's
//! `send_timeout` ends an HTTP/1 connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::time::Sleep;

/// How long after its deadline a stream nobody reads is cut.
const MARGIN: Duration = Duration::from_millis(500);

/// The deadline of the streams a connection is serving, if any.
#[derive(Debug)]
pub struct Deadline {
    /// The earliest armed: milliseconds after `base`, plus one; 0 = none.
    at: AtomicU64,
    /// An h2 connection's armed streams, each as `at` writes it. (An
    /// HTTP/1 connection serves one stream at a time: `at` is all.)
    streams: Option<Mutex<Vec<u64>>>,
    /// The connection's task, told when a stream arms a deadline. (Not a
    /// `Notify`: its every poll takes a lock, and the connection's task
    /// polls this on each of its wake-ups, for every request.)
    waker: AtomicWaker,
    base: Instant,
}

/// A stream's deadline, cleared when the stream's accounting is done.
#[derive(Debug)]
pub struct Armed {
    deadline: Arc<Deadline>,
    at: u64,
}

impl Default for Deadline {
    fn default() -> Self {
        Deadline {
            at: AtomicU64::new(0),
            streams: None,
            waker: AtomicWaker::new(),
            base: Instant::now(),
        }
    }
}

impl Deadline {
    /// The watch of a connection serving several streams at once (h2).
    pub fn multiplexed() -> Self {
        Deadline {
            streams: Some(Mutex::new(Vec::new())),
            ..Deadline::default()
        }
    }

    /// Arms the watch for a stream due to end by `when`. It fires a
    /// `MARGIN` later: a stream its client reads is ended at `when` by the
    /// tap, cleanly, with its error event; the watch only cuts one that
    /// nobody polls.
    pub fn arm(self: &Arc<Self>, when: Instant) -> Armed {
        let from_base = (when + MARGIN).saturating_duration_since(self.base);
        // Whole milliseconds, rounded up: never before its time.
        let ms = u64::try_from(from_base.as_micros().div_ceil(1000)).unwrap_or(u64::MAX - 1);
        let at = ms.saturating_add(1);
        match &self.streams {
            None => self.at.store(at, Ordering::Release),
            Some(streams) => {
                let mut streams = streams.lock().unwrap_or_else(PoisonError::into_inner);
                streams.push(at);
                let earliest = streams.iter().copied().min().unwrap_or(at);
                self.at.store(earliest, Ordering::Release);
            }
        }
        self.waker.wake();
        Armed {
            deadline: self.clone(),
            at,
        }
    }

    /// Resolves once an armed deadline passes while still armed.
    pub fn passed(&self) -> Passed<'_> {
        Passed {
            deadline: self,
            sleep: None,
            timing: 0,
        }
    }
}

/// See [`Deadline::passed`].
pub struct Passed<'a> {
    deadline: &'a Deadline,
    /// Made at the first deadline, then reset for each.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline the sleep is set for.
    timing: u64,
}

impl Future for Passed<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Registered before reading, so that an arm() after the read
        // wakes this task.
        this.deadline.waker.register(cx.waker());
        let at = this.deadline.at.load(Ordering::Acquire);
        if at == 0 {
            return Poll::Pending;
        }
        let when =
            tokio::time::Instant::from_std(this.deadline.base + Duration::from_millis(at - 1));
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(when)));
        if this.timing != at {
            sleep.as_mut().reset(when);
            this.timing = at;
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) if this.deadline.at.load(Ordering::Acquire) == at => Poll::Ready(()),
            // Disarmed (or re-armed, which woke this task) meanwhile.
            _ => Poll::Pending,
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let deadline = &self.deadline;
        match &deadline.streams {
            // Only its own: a later stream may have armed it since.
            None => {
                let _ =
                    deadline
                        .at
                        .compare_exchange(self.at, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
            Some(streams) => {
                let mut streams = streams.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(i) = streams.iter().position(|&at| at == self.at) {
                    streams.swap_remove(i);
                }
                let earliest = streams.iter().copied().min().unwrap_or(0);
                // The watch sleeps until the old earliest and finds it
                // disarmed then; a later one is never missed.
                deadline.at.store(earliest, Ordering::Release);
                if earliest != 0 {
                    deadline.waker.wake();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_only_while_armed_and_not_before_its_margin() {
        let deadline = Arc::new(Deadline::default());
        drop(deadline.arm(Instant::now()));
        // Disarmed: not passed.
        let waited = tokio::time::timeout(MARGIN * 2, deadline.passed()).await;
        assert!(waited.is_err());
        let started = Instant::now();
        let _armed = deadline.arm(started + Duration::from_millis(100));
        let waited = tokio::time::timeout(Duration::from_secs(5), deadline.passed()).await;
        assert!(waited.is_ok());
        assert!(started.elapsed() >= Duration::from_millis(100) + MARGIN);
    }

    #[tokio::test]
    async fn a_multiplexed_watch_passes_at_the_earliest_stream_still_armed() {
        let deadline = Arc::new(Deadline::multiplexed());
        let started = Instant::now();
        let early = deadline.arm(started + Duration::from_millis(50));
        let _late = deadline.arm(started + Duration::from_millis(400));
        let _later = deadline.arm(started + Duration::from_millis(2000));
        // The early stream ends in time: the next one is watched.
        drop(early);
        let waited = tokio::time::timeout(Duration::from_secs(5), deadline.passed()).await;
        assert!(waited.is_ok());
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(400) + MARGIN,
            "{elapsed:?}"
        );
        assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
    }
}
