//! Graceful drain of the proxy's connections: on shutdown each open
//! connection is told to finish its in-flight requests and close, and
//! the listener waits until every one has.
//!
//! hyper-util's `GracefulShutdown` does this with a `watch` channel whose
//! wait takes a mutex on every poll of every connection (~500
//! instructions per request). Here each connection holds its own oneshot,
//! polled with a few atomic operations; the shared map is only touched
//! when a connection opens or closes, and once at shutdown.

use std::collections::HashMap;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, oneshot};

use super::deadline::Deadline;
use super::idle::Watch;

/// What else ends a connection than its client or a drain.
pub enum Guard {
    /// An h2 connection: closed when it has had no request for a while,
    /// dropped when one of its streams is past its deadline.
    Multiplexed(Watch, std::sync::Arc<Deadline>),
    /// An HTTP/1 connection's stream past its deadline.
    Deadline(std::sync::Arc<Deadline>),
}

/// The open connections of one listener.
#[derive(Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    open: Mutex<Open>,
    /// Told when the last connection closes during a drain.
    emptied: Notify,
}

#[derive(Default)]
struct Open {
    next: u64,
    /// Every open connection by its number, with its signal until the
    /// drain sends it (by dropping it).
    members: HashMap<u64, Option<oneshot::Sender<()>>>,
    draining: bool,
}

impl Shared {
    /// The map, also after a panic elsewhere left it poisoned: it holds
    /// only senders, which stay valid.
    fn open(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's part in the drain; it leaves the map when dropped.
pub struct Member {
    shared: Arc<Shared>,
    id: u64,
    signal: oneshot::Receiver<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut open = self.shared.open();
        open.members.remove(&self.id);
        if open.draining && open.members.is_empty() {
            // A permit is stored if `drained` is not waiting yet.
            self.shared.emptied.notify_one();
        }
    }
}

impl Drain {
    /// Registers a connection about to be served.
    pub fn join(&self) -> Member {
        let (tx, rx) = oneshot::channel();
        let mut open = self.shared.open();
        let id = open.next;
        open.next += 1;
        // Accepted as the drain began: told at once (tx dropped).
        let signal = (!open.draining).then_some(tx);
        open.members.insert(id, signal);
        Member {
            shared: self.shared.clone(),
            id,
            signal: rx,
        }
    }

    /// Tells every open connection to finish, then waits until all have
    /// closed.
    pub async fn drained(&self) {
        {
            let mut open = self.shared.open();
            open.draining = true;
            // Dropping a sender wakes its connection.
            open.members
                .values_mut()
                .for_each(|signal| drop(signal.take()));
            if open.members.is_empty() {
                return;
            }
        }
        // The last member to leave stores a permit if it left before this
        // waits, so no wake-up is lost.
        self.shared.emptied.notified().await;
    }
}

impl Member {
    /// Runs `step` (a connection's first bytes or TLS handshake, before
    /// any request) unless the drain begins first: then `None`, and the
    /// connection closes. It holds no request to finish, and would
    /// otherwise hold the exit back until its timeout.
    pub async fn unless_draining<F: Future>(&mut self, step: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = &mut self.signal => None,
            done = step => Some(done),
        }
    }

    /// Serves `conn` to its end. When the drain begins, `graceful` asks
    /// hyper to close it after the requests in flight (an idle connection
    /// closes at once).
    /// `guard` watches the connection too: an h2 one quiet for its period
    /// is closed the same way; one whose stream outlived its deadline is
    /// dropped at once (its client is not reading).
    /// Returns how the connection ended, unless it was dropped.
    pub async fn serve<C: Future>(
        mut self,
        conn: C,
        graceful: impl FnOnce(Pin<&mut C>),
        guard: Option<Guard>,
    ) -> Option<C::Output> {
        let mut conn = pin!(conn);
        let watched = async {
            match &guard {
                Some(Guard::Multiplexed(watch, deadline)) => {
                    tokio::select! {
                        _ = watch.quiet() => true,
                        _ = deadline.passed() => false,
                    }
                }
                Some(Guard::Deadline(deadline)) => {
                    deadline.passed().await;
                    false
                }
                None => std::future::pending().await,
            }
        };
        // The signal first, as hyper-util's watcher did: a connection
        // still waiting for its first bytes closes without a request.
        tokio::select! {
            biased;
            _ = &mut self.signal => graceful(conn.as_mut()),
            ended = conn.as_mut() => return Some(ended),
            gracefully = watched => {
                if !gracefully {
                    return None;
                }
                graceful(conn.as_mut());
            }
        }
        Some(conn.await)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A connection that runs until its graceful shutdown is asked for,
    /// and then for `linger` more (the requests in flight).
    async fn connection(member: Member, linger: Duration, stopped: Arc<Notify>) {
        let asked = Arc::new(Notify::new());
        let conn = {
            let asked = asked.clone();
            async move {
                asked.notified().await;
                tokio::time::sleep(linger).await;
            }
        };
        member.serve(conn, |_| asked.notify_one(), None).await;
        stopped.notify_one();
    }

    #[tokio::test(start_paused = true)]
    async fn drained_waits_for_every_connection_to_finish() {
        let drain = Drain::default();
        let stopped = Arc::new(Notify::new());
        let fast = tokio::spawn(connection(
            drain.join(),
            Duration::from_secs(1),
            stopped.clone(),
        ));
        let slow = tokio::spawn(connection(
            drain.join(),
            Duration::from_secs(5),
            stopped.clone(),
        ));
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), drain.drained())
            .await
            .expect("drained once both closed");
        assert!(fast.is_finished() && slow.is_finished());
        assert_eq!(started.elapsed().as_secs(), 5, "waited for the slower one");
    }

    #[tokio::test(start_paused = true)]
    async fn drained_returns_at_once_with_no_connection() {
        let drain = Drain::default();
        drop(drain.join());
        tokio::time::timeout(Duration::from_millis(1), drain.drained())
            .await
            .expect("nothing to wait for");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_joining_during_the_drain_is_told_at_once() {
        let drain = Arc::new(Drain::default());
        let first = drain.join();
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drained().await }
        });
        tokio::task::yield_now().await;
        let stopped = Arc::new(Notify::new());
        let late = tokio::spawn(connection(drain.join(), Duration::ZERO, stopped.clone()));
        tokio::time::timeout(Duration::from_secs(1), late)
            .await
            .expect("told to close at once")
            .expect("task");
        assert!(!waiting.is_finished(), "the first is still open");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("drained once the first left")
            .expect("task");
    }
}
