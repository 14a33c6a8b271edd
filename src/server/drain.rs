//! Graceful drain of the proxy's connections: on shutdown each open
//! connection is told to finish its in-flight requests and close, and
//! the listener waits until every one has; when the grace runs out, the
//! ones still open are cut, and the listener waits for those to be gone.
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
    /// Every open connection by its number, with its signals until the
    /// drain sends them (by dropping them).
    members: HashMap<u64, Signals>,
    draining: bool,
    cutting: bool,
}

/// A connection's signals: finish and close; answer what is not
/// answered yet; close now.
struct Signals {
    drain: Option<oneshot::Sender<()>>,
    unanswered: Arc<Notify>,
    cut: Option<oneshot::Sender<()>>,
}

/// How long a cut waits for the requests told to answer (503) before it
/// closes their connections.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

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
    cut: oneshot::Receiver<()>,
    unanswered: Arc<Notify>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut open = self.shared.open();
        open.members.remove(&self.id);
        if open.draining && open.members.is_empty() {
            // Every waiter (a drain and a cut may both wait) registered
            // before it read the map: none misses this.
            self.shared.emptied.notify_waiters();
        }
    }
}

impl Drain {
    /// Registers a connection about to be served.
    pub fn join(&self) -> Member {
        let (tx, rx) = oneshot::channel();
        let (cut_tx, cut_rx) = oneshot::channel();
        let mut open = self.shared.open();
        let id = open.next;
        open.next += 1;
        // Accepted as the drain began (or the cut): told at once (the
        // sender dropped).
        let unanswered = Arc::new(Notify::new());
        let signals = Signals {
            drain: (!open.draining).then_some(tx),
            unanswered: unanswered.clone(),
            cut: (!open.cutting).then_some(cut_tx),
        };
        open.members.insert(id, signals);
        Member {
            shared: self.shared.clone(),
            id,
            signal: rx,
            cut: cut_rx,
            unanswered,
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
                .for_each(|signals| drop(signals.drain.take()));
        }
        self.emptied().await;
    }

    /// Ends the connections still open: their requests not answered yet
    /// are told to answer now (a 503, see [`Member::unanswered`]); after
    /// [`ANSWER_WAIT`] the connections left (streams under way) are
    /// closed. Returns once all are gone: the requests cut are accounted
    /// for (logged, counted) by then.
    pub async fn cut(&self) {
        {
            let mut open = self.shared.open();
            open.draining = true;
            open.members.values_mut().for_each(|signals| {
                drop(signals.drain.take());
                signals.unanswered.notify_waiters();
            });
        }
        if tokio::time::timeout(ANSWER_WAIT, self.emptied())
            .await
            .is_ok()
        {
            return;
        }
        {
            let mut open = self.shared.open();
            open.cutting = true;
            open.members
                .values_mut()
                .for_each(|signals| drop(signals.cut.take()));
        }
        self.emptied().await;
    }

    /// Returns once no connection is open (during a drain).
    async fn emptied(&self) {
        loop {
            let told = self.shared.emptied.notified();
            let mut told = pin!(told);
            // Registered before the map is read: a member leaving in
            // between still wakes it.
            told.as_mut().enable();
            if self.shared.open().members.is_empty() {
                return;
            }
            told.await;
        }
    }
}

impl Member {
    /// Told when the drain gives up on this connection: a request still
    /// waiting for its answer then answers 503 instead.
    pub fn unanswered(&self) -> Arc<Notify> {
        self.unanswered.clone()
    }

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
    /// [`Drain::cut`] drops it, its requests with it.
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
        tokio::select! {
            biased;
            _ = &mut self.cut => None,
            ended = conn => Some(ended),
        }
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
    async fn a_cut_closes_what_the_drain_left_open_and_waits_for_it() {
        let drain = Arc::new(Drain::default());
        let stopped = Arc::new(Notify::new());
        let slow = tokio::spawn(connection(
            drain.join(),
            Duration::from_secs(3600),
            stopped.clone(),
        ));
        let draining = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drained().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!slow.is_finished(), "the drain does not cut");
        let cutting = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(1), drain.cut())
            .await
            .expect("cut");
        // A connection with no request to answer 503 (a stream under
        // way) is closed once its requests had their time to answer.
        assert_eq!(cutting.elapsed(), ANSWER_WAIT);
        assert!(slow.is_finished(), "gone when the cut returns");
        draining.await.expect("task");
        // A connection that comes after the cut is cut at once.
        tokio::time::timeout(
            Duration::from_millis(1),
            connection(drain.join(), Duration::from_secs(3600), stopped),
        )
        .await
        .expect("cut at once");
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
