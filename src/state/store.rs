//! [`State`]: the one interface the request path uses for limits, slots,
//! budgets and the cache, whichever backend holds them. With Redis, a
//! call that fails or is slow follows `state.on_error`: `allow` decides
//! with this replica's memory instead (counted, and warned about at most
//! every few seconds), `deny` refuses the request with 503. Calls after a
//! failure try Redis again, so recovery needs no restart.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::{HistogramVec, IntCounterVec};

use super::budget::{self, Alert, BudgetScope, Budgets};
use super::cache::{CachedResponse, Flight, Join, Key, ResponseCache};
use super::limiter::{BucketKey, Decision, MemoryLimiter, MemorySlot};
use super::redis::{RedisState, StateError};
use crate::snapshot::{StateBackend, StateSettings};
use crate::telemetry::metrics::Metrics;

/// The request must be refused: Redis failed and `on_error` is `deny`.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable;

/// How often a failing backend is warned about, at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// After a failed call, how long requests skip the backend (following
/// `on_error` at once) before calls try it again: during an outage each
/// request would otherwise wait out a timeout on every call it makes.
const OUTAGE_PAUSE: Duration = Duration::from_secs(1);

/// How many cache calls in a row, with no call answered between them,
/// must time out before the cache's calls pause too. One slow call may be
/// a large entry; a Redis that cannot be reached (its connection being
/// retried after a refusal, or a host that dropped off the network)
/// times out every call.
const CACHE_TIMEOUTS_TO_PAUSE: u32 = 2;

/// How long stopping waits to send Redis the spend owed from an outage.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// The `operation` label values of the backend's metrics.
const OPERATIONS: [&str; 8] = [
    "take",
    "adjust",
    "acquire",
    "release",
    "spent",
    "spend",
    "cache_get",
    "cache_put",
];

pub struct State {
    memory: Arc<MemoryLimiter>,
    budgets: Arc<Budgets>,
    cache: Arc<ResponseCache>,
    redis: Option<Arc<RedisState>>,
    deny_on_error: bool,
    health: Arc<Health>,
}

/// Metrics and warnings about the shared backend.
struct Health {
    errors: IntCounterVec,
    duration: HistogramVec,
    log: tracing::Dispatch,
    started: Instant,
    /// When the last warning was logged, in ms since `started` (+1, so 0
    /// means never).
    last_warning: AtomicU64,
    /// Until when calls skip the backend, in ms since `started` (0: they
    /// do not).
    paused_until: AtomicU64,
    /// When the latest call that succeeded had started, in ms since
    /// `started`: a failure of a call begun before it pauses nothing.
    last_ok_start: AtomicU64,
    /// When the latest call that paused had started: a success of a call
    /// begun no earlier ends the pause, even if it failed first.
    failed_start: AtomicU64,
    /// Redis was found unreachable and has not answered since: its next
    /// answer is logged, so an outage's end shows beside its start.
    outage: AtomicBool,
    /// Cache calls timed out since a call was last answered.
    cache_timeouts: AtomicU32,
    /// Probed, on a connection of its own, when calls fail as if Redis
    /// were unreachable, so the warning says why.
    redis: Option<Arc<RedisState>>,
}

/// Which failures of a call pause the calls on the request path.
#[derive(Clone, Copy)]
enum Pause {
    /// Any failure saying Redis cannot be reached, a timeout included.
    WhenUnreachable,
    /// A connection refused or lost, or a timeout that follows another
    /// with no answer between them ([`CACHE_TIMEOUTS_TO_PAUSE`]).
    UnlessTimeout,
}

/// How a call on the request path went.
enum Called<T> {
    Ok(T),
    /// Made, and failed: it may have taken effect before it timed out.
    Failed,
    /// Not made: the backend is paused after a recent failure.
    Skipped,
}

impl<T> Called<T> {
    fn ok(self) -> Option<T> {
        match self {
            Called::Ok(value) => Some(value),
            Called::Failed | Called::Skipped => None,
        }
    }
}

impl Health {
    fn new(metrics: &Metrics, log: tracing::Dispatch, redis: Option<Arc<RedisState>>) -> Self {
        Health {
            errors: metrics.state_errors.clone(),
            duration: metrics.state_duration.clone(),
            log,
            started: Instant::now(),
            last_warning: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
            last_ok_start: AtomicU64::new(0),
            failed_start: AtomicU64::new(0),
            outage: AtomicBool::new(false),
            cache_timeouts: AtomicU32::new(0),
            redis,
        }
    }

    /// Runs one backend call on the request path: its latency is
    /// observed, or its failure counted and warned about; `None` on
    /// failure. Within [`OUTAGE_PAUSE`] of a failure that says Redis is
    /// unreachable the call is not made and counts as failed.
    async fn timed<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, StateError>>,
    ) -> Option<T> {
        self.call(operation, call).await.ok()
    }

    /// [`Health::timed`], telling a call made and failed from one skipped.
    async fn call<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, StateError>>,
    ) -> Called<T> {
        if self.skips(operation) {
            return Called::Skipped;
        }
        match self.run(operation, call, Pause::WhenUnreachable).await {
            Some(value) => Called::Ok(value),
            None => Called::Failed,
        }
    }

    /// [`Health::timed`] for the cache, whose calls may be slow for the
    /// size of an entry rather than for Redis being gone: one timeout
    /// pauses nothing, but a connection refused or lost does, and so do
    /// timeouts in a row (a route with only a cache would otherwise pay
    /// for each request an attempt to reach a Redis that is down).
    async fn cached<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, StateError>>,
    ) -> Option<T> {
        if self.skips(operation) {
            return None;
        }
        self.run(operation, call, Pause::UnlessTimeout).await
    }

    /// [`Health::timed`] for calls off the request path (settling tokens,
    /// giving a lease back), which are always made: skipping one would
    /// leave its work undone after the outage.
    async fn always<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, StateError>>,
    ) -> Option<T> {
        self.run(operation, call, Pause::WhenUnreachable).await
    }

    /// Whether calls are paused now; a skipped call counts as failed.
    fn skips(&self, operation: &str) -> bool {
        let until = self.paused_until.load(Ordering::Relaxed);
        let paused = until != 0 && self.now_ms() < until;
        if paused {
            self.errors.with_label_values(&[operation]).inc();
        }
        paused
    }

    /// Makes the call; when it fails with Redis unreachable (as `pause`
    /// reads it), calls on the request path pause.
    async fn run<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, StateError>>,
        pause: Pause,
    ) -> Option<T> {
        let started = Instant::now();
        let started_ms = self.ms_at(started);
        match call.await {
            Ok(value) => {
                self.duration
                    .with_label_values(&[operation])
                    .observe(started.elapsed().as_secs_f64());
                self.last_ok_start.fetch_max(started_ms, Ordering::Relaxed);
                self.cache_timeouts.store(0, Ordering::Relaxed);
                // Ends a pause set by a call begun no later than this one;
                // that of a call begun after it stands.
                // A call begun before the failure says nothing of now.
                if self.failed_start.load(Ordering::Relaxed) <= started_ms {
                    self.paused_until.store(0, Ordering::Relaxed);
                }
                if self.failed_start.load(Ordering::Relaxed) <= started_ms
                    && self.outage.swap(false, Ordering::Relaxed)
                {
                    tracing::dispatcher::with_default(&self.log, || {
                        tracing::info!(
                            event = "state_recovered",
                            operation,
                            "the shared state backend answers again"
                        );
                    });
                }
                Some(value)
            }
            Err(e) => {
                // A failure says Redis is unreachable only when no call
                // begun after this one has succeeded since.
                let unreachable = match pause {
                    Pause::WhenUnreachable => e.unreachable(),
                    Pause::UnlessTimeout => match e {
                        StateError::Timeout(_) => {
                            let in_a_row = self.cache_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                            in_a_row >= CACHE_TIMEOUTS_TO_PAUSE
                        }
                        _ => e.unreachable(),
                    },
                };
                if unreachable && self.last_ok_start.load(Ordering::Relaxed) <= started_ms {
                    let until = self
                        .now_ms()
                        .saturating_add(OUTAGE_PAUSE.as_millis() as u64);
                    self.failed_start.fetch_max(started_ms, Ordering::Relaxed);
                    self.paused_until.fetch_max(until, Ordering::Relaxed);
                    self.outage.store(true, Ordering::Relaxed);
                }
                self.failed(operation, &e);
                None
            }
        }
    }

    /// Milliseconds since `started`, plus one (so that 0 means never).
    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` in ms since this store started, from 1 (0 means never).
    fn ms_at(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.started);
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX) + 1
    }

    fn failed(&self, operation: &str, error: &StateError) {
        self.errors.with_label_values(&[operation]).inc();
        let now = self.now_ms();
        let last = self.last_warning.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let text = error.to_string();
            tracing::dispatcher::with_default(&self.log, || {
                tracing::warn!(
                    event = "state_error",
                    operation,
                    error = text.as_str(),
                    "the shared state backend failed; following state.on_error (warned at most every 10s)"
                );
            });
            if error.unreachable() {
                self.probe();
            }
        }
    }

    /// Finds out, off the request path, why Redis does not answer (a
    /// refused login, a refused connection, no answer), and warns with
    /// that: a call on the shared connection only ever sees a timeout.
    fn probe(&self) {
        let (Some(redis), Ok(runtime)) =
            (self.redis.clone(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let log = self.log.clone();
        runtime.spawn(async move {
            if let Err(reason) = redis.probe().await {
                tracing::dispatcher::with_default(&log, || {
                    tracing::warn!(
                        event = "state_error",
                        operation = "connect",
                        error = reason.as_str(),
                        "why the shared state backend fails"
                    );
                });
            }
        });
    }
}

/// A held concurrency slot, freed when dropped (the response ended or the
/// client left).
#[derive(Debug)]
pub enum Slot {
    Memory(MemorySlot),
    Shared(SharedSlot),
}

/// A lease in Redis: released when dropped, else it expires by itself.
/// It is made before Redis is asked for the lease, so that a request
/// dropped while Redis takes it (its client left) gives it back too: the
/// release goes out on the same connection after the taking.
pub struct SharedSlot {
    redis: Arc<RedisState>,
    health: Arc<Health>,
    key: BucketKey,
    /// Empty once there is nothing to give back (Redis refused the lease,
    /// or was not asked).
    holder: String,
    /// When Redis lets the lease go by itself: a release that fails (Redis
    /// down, or restarting) is tried again until then, since a Redis
    /// restarted from its append-only file has the lease back and would
    /// hold the slot for no one.
    expires: Instant,
}

impl SharedSlot {
    /// Nothing was taken: nothing to give back.
    fn forget(mut self) {
        self.holder.clear();
    }
}

/// The first wait before a failed lease release is tried again; it
/// doubles up to [`RELEASE_RETRY_MAX`].
const RELEASE_RETRY: Duration = Duration::from_millis(500);
const RELEASE_RETRY_MAX: Duration = Duration::from_secs(8);

impl std::fmt::Debug for SharedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSlot")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        if self.holder.is_empty() {
            return;
        }
        let (redis, health) = (self.redis.clone(), self.health.clone());
        let (key, holder) = (self.key.clone(), std::mem::take(&mut self.holder));
        let expires = self.expires;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut wait = RELEASE_RETRY;
                while health
                    .always("release", redis.release(&key, &holder))
                    .await
                    .is_none()
                    && Instant::now() + wait < expires
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RELEASE_RETRY_MAX);
                }
            });
        }
    }
}

/// A take's decision on its way from Redis to the request that asked for
/// it. A request dropped meanwhile (its client left) never claims it:
/// the units it took are then given back, here.
struct Unclaimed {
    decision: Option<Decision>,
    redis: Arc<RedisState>,
    health: Arc<Health>,
    key: BucketKey,
    per_minute: u64,
    cost: u64,
}

impl Unclaimed {
    fn claim(mut self) -> Option<Decision> {
        self.decision.take()
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        let Some(decision) = self.decision.take() else {
            return;
        };
        if !decision.allowed {
            return;
        }
        let (redis, health, key) = (self.redis.clone(), self.health.clone(), self.key.clone());
        let (per_minute, back) = (
            self.per_minute,
            -i64::try_from(self.cost).unwrap_or(i64::MAX),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                health
                    .always("adjust", redis.adjust(&key, per_minute, back))
                    .await;
            });
        }
    }
}

impl State {
    pub fn new(
        settings: &StateSettings,
        max_cache_bytes: u64,
        metrics: &Metrics,
        log: tracing::Dispatch,
    ) -> Self {
        let redis = match (settings.backend, settings.redis_url.as_deref()) {
            (StateBackend::Redis, Some(url)) => match RedisState::new(url) {
                Ok(redis) => Some(Arc::new(redis)),
                Err(error) => {
                    // The config check parses the URL first, so this is
                    // not expected; serving from memory beats not serving.
                    tracing::dispatcher::with_default(&log, || {
                        tracing::error!(
                            event = "state_error",
                            error = error.as_str(),
                            "state kept in memory"
                        );
                    });
                    None
                }
            },
            _ => None,
        };
        if redis.is_some() {
            // Every operation's error series exists from start, so that
            // an alert on their rate sees the first failure.
            for operation in OPERATIONS {
                metrics.state_errors.with_label_values(&[operation]);
            }
        }
        let state = State {
            memory: Arc::new(MemoryLimiter::default()),
            budgets: Arc::default(),
            cache: ResponseCache::new(max_cache_bytes),
            redis: redis.clone(),
            deny_on_error: settings.deny_on_error,
            health: Arc::new(Health::new(metrics, log, redis)),
        };
        // A Redis that refuses the login or cannot be reached is named at
        // start, not at the first request that needs it.
        state.health.probe();
        state
    }

    /// Whether the state is shared (Redis): its calls are round trips.
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// After a failed call: `Ok` to go on with memory, `Err` to refuse.
    fn fallback(&self) -> Result<(), Unavailable> {
        if self.deny_on_error {
            Err(Unavailable)
        } else {
            Ok(())
        }
    }

    /// Takes `cost` units from a bucket; the flag tells whether the shared
    /// backend decided (so its settlement goes there too).
    pub async fn take(
        &self,
        key: &BucketKey,
        per_minute: u64,
        cost: u64,
    ) -> Result<(Decision, bool), Unavailable> {
        if let Some(redis) = &self.redis {
            let decided = if cost == 0 {
                // Takes nothing: nothing to give back if dropped.
                self.health
                    .timed("take", redis.take(key, per_minute, 0))
                    .await
            } else {
                self.shared_take(redis, key, per_minute, cost).await
            };
            match decided {
                Some(decision) => return Ok((decision, true)),
                None => self.fallback()?,
            }
        }
        Ok((
            self.memory.take(key, per_minute, cost, Instant::now()),
            false,
        ))
    }

    /// A take from Redis that runs to its end even when the request asking
    /// for it is dropped while Redis decides (its client left): what it
    /// took for no one is given back (see [`Unclaimed`]), rather than held
    /// from the identity until the bucket refills.
    async fn shared_take(
        &self,
        redis: &Arc<RedisState>,
        key: &BucketKey,
        per_minute: u64,
        cost: u64,
    ) -> Option<Decision> {
        let (redis, health, key) = (redis.clone(), self.health.clone(), key.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let decided = health
                .call("take", redis.take(&key, per_minute, cost))
                .await;
            let Called::Failed = decided else {
                // Not received (the request is gone): dropped, so given back.
                let _ = tx.send(decided.ok().map(|decision| Unclaimed {
                    decision: Some(decision),
                    redis,
                    health,
                    key,
                    per_minute,
                    cost,
                }));
                return;
            };
            let _ = tx.send(None);
            // A take that failed (timed out) may still have been made after
            // the wait ended, holding the units for no one for a minute:
            // they are given back (behind the take on the same connection).
            // Had Redis refused it, this frees at most `cost` units early.
            // Best effort, and no verdict on Redis: its failure, while
            // Redis is gone, says no more than the take's already did.
            let back = -i64::try_from(cost).unwrap_or(i64::MAX);
            let _ = redis.adjust(&key, per_minute, back).await;
        });
        rx.await.ok().flatten().and_then(Unclaimed::claim)
    }

    /// Moves a bucket by `delta` units, where the units were taken.
    pub fn adjust(&self, key: &BucketKey, per_minute: u64, delta: i64, shared: bool) {
        match (&self.redis, shared) {
            (Some(redis), true) => {
                let (redis, health, key) = (redis.clone(), self.health.clone(), key.clone());
                // Also called from drops (a request's accounting), which
                // may run outside the runtime as it shuts down.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        health
                            .always("adjust", redis.adjust(&key, per_minute, delta))
                            .await;
                    });
                }
            }
            _ => self.memory.adjust(key, per_minute, delta, Instant::now()),
        }
    }

    /// One of `max` concurrent slots; `lease` bounds how long a shared one
    /// outlives a replica that died holding it.
    pub async fn acquire(
        &self,
        key: &BucketKey,
        max: u64,
        lease: Duration,
    ) -> Result<Option<Slot>, Unavailable> {
        if let Some(redis) = &self.redis {
            let slot = SharedSlot {
                redis: redis.clone(),
                health: self.health.clone(),
                key: key.clone(),
                holder: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
                expires: Instant::now() + lease,
            };
            let got = self
                .health
                .call("acquire", redis.acquire(key, max, &slot.holder, lease))
                .await;
            match got {
                Called::Ok(true) => return Ok(Some(Slot::Shared(slot))),
                Called::Ok(false) => {
                    slot.forget();
                    return Ok(None);
                }
                Called::Skipped => slot.forget(),
                // The call may have timed out after Redis took the lease:
                // dropped, the slot gives it back rather than let it block
                // the identity until it expires.
                Called::Failed => drop(slot),
            }
            self.fallback()?;
        }
        Ok(self.memory.acquire(key, max).map(Slot::Memory))
    }

    /// Today's spend of a scope.
    pub async fn spent(&self, scope: &BudgetScope) -> Result<f64, Unavailable> {
        if let Some(redis) = &self.redis {
            let today = budget::today().0;
            match self.health.timed("spent", redis.spent(scope, today)).await {
                Some(spent) => return Ok(spent),
                None => self.fallback()?,
            }
        }
        Ok(self.budgets.spent(scope))
    }

    /// Adds to today's spend; returns the new spend and the alerts this
    /// call crossed first (across replicas, with Redis).
    pub async fn add_spend(
        &self,
        scope: &BudgetScope,
        usd: f64,
        budget_usd: f64,
        alert_at: &[f64],
    ) -> (f64, Vec<Alert>) {
        if let Some(redis) = &self.redis {
            let today = budget::today().0;
            // What this replica spent while Redis failed joins the first
            // call that reaches it, or an outage would lower the shared
            // spend for good. (A call that timed out after Redis applied
            // it is then counted twice: a budget errs on the side of
            // spend.)
            let sent = usd + self.budgets.take_owed(scope);
            let call = redis.add_spend(scope, today, sent, budget_usd, alert_at);
            // After the fact there is nothing to refuse: on failure the
            // spend is kept in memory instead, and owed to Redis.
            if let Some((spent, crossed)) = self.health.timed("spend", call).await {
                self.send_owed(redis, today);
                // A threshold this replica alerted from memory during an
                // outage is not alerted again when Redis first claims it.
                let alerts = crossed
                    .into_iter()
                    .filter(|&threshold| !self.budgets.alerted(scope, threshold, budget_usd))
                    .collect::<Vec<_>>();
                self.budgets.seen(scope, today, spent, budget_usd, alert_at);
                let alerts = alerts
                    .into_iter()
                    .map(|threshold| Alert {
                        threshold,
                        spent_usd: spent,
                        budget_usd,
                    })
                    .collect();
                return (spent, alerts);
            }
            self.budgets.owe(scope, sent);
        }
        let alerts = self.budgets.add(scope, usd, budget_usd, alert_at);
        (self.budgets.spent(scope), alerts)
    }

    /// Sends, once Redis answers again, what other scopes still owe from
    /// an outage: a scope not charged again that day (an identity gone
    /// quiet) would otherwise keep it in this replica's memory. Sent
    /// without alert thresholds: those crossed during the outage were
    /// alerted from memory, and a threshold this crosses in Redis is
    /// claimed by the scope's next charge.
    fn send_owed(&self, redis: &Arc<RedisState>, day: u64) {
        let owed = self.budgets.take_all_owed();
        if owed.is_empty() {
            return;
        }
        let (redis, health, budgets) = (redis.clone(), self.health.clone(), self.budgets.clone());
        tokio::spawn(async move {
            for (scope, usd) in owed {
                let call = redis.add_spend(&scope, day, usd, 0.0, &[]);
                if health.timed("spend", call).await.is_none() {
                    budgets.owe(&scope, usd);
                }
            }
        });
    }

    /// At shutdown: sends Redis what this replica still owes it from an
    /// outage (its next charge would have; there is none now), within
    /// a bound. What cannot be sent leaves with the process, and is said.
    pub async fn settle_owed(&self) {
        let Some(redis) = &self.redis else { return };
        let owed = self.budgets.take_all_owed();
        if owed.is_empty() {
            return;
        }
        let day = budget::today().0;
        let total: f64 = owed.iter().map(|(_, usd)| usd).sum();
        // Counted as each call is answered: a timeout keeps what was sent.
        let mut sent = 0.0;
        let sending = async {
            for (scope, usd) in &owed {
                let call = redis.add_spend(scope, day, *usd, 0.0, &[]);
                if self.health.always("spend", call).await.is_some() {
                    sent += usd;
                }
            }
        };
        let _ = tokio::time::timeout(SETTLE_WAIT, sending).await;
        let lost = total - sent;
        if lost > 0.0 {
            tracing::dispatcher::with_default(&self.health.log, || {
                tracing::warn!(
                    event = "state_error",
                    operation = "spend",
                    lost_usd = budget::rounded(lost),
                    "spend owed to the shared state from an outage could not be sent before stopping"
                );
            });
        }
    }

    /// Today's spend in this replica's memory (the gauge of the memory
    /// backend).
    pub fn local_spent(&self, scope: &BudgetScope) -> f64 {
        self.budgets.spent(scope)
    }

    /// Today's spend of a scope for a metrics scrape: the shared figure
    /// with Redis, or `None` when it cannot be read. Unlike [`State::spent`]
    /// a failure neither falls back to this replica's own figure (the
    /// gauge would drop) nor counts toward pausing Redis for requests.
    pub async fn spent_for_scrape(&self, scope: &BudgetScope) -> Option<f64> {
        match &self.redis {
            Some(redis) => redis.spent(scope, budget::today().0).await.ok(),
            None => Some(self.budgets.spent(scope)),
        }
    }

    /// A fresh stored response. A failing backend is a miss, whatever
    /// `on_error` says: the cache only ever saves work.
    pub async fn cache_get(&self, key: &Key) -> Option<Arc<CachedResponse>> {
        let Some(redis) = &self.redis else {
            return self.cache.get(key);
        };
        self.health
            .cached("cache_get", redis.cache_get(key))
            .await
            .flatten()
            .map(Arc::new)
    }

    /// Stores a finished response (in the background with Redis). The
    /// fetch's `flight` is released once the entry can be read, so the
    /// requests waiting on it find it rather than calling the upstream.
    pub fn cache_put(&self, key: Key, entry: CachedResponse, flight: Option<Flight>) {
        if entry.body.len() > self.cache.entry_cap() {
            if let Some(flight) = flight {
                flight.unstorable();
            }
            return;
        }
        let Some(redis) = &self.redis else {
            self.cache.insert(key, entry);
            drop(flight);
            return;
        };
        let (redis, health) = (redis.clone(), self.health.clone());
        tokio::spawn(async move {
            let stored = health
                .cached("cache_put", redis.cache_put(&key, &entry))
                .await;
            // Not stored (Redis gone): the answer was final, so the
            // requests waiting on it call the upstream now, all at once,
            // not one after another as if it had failed.
            match (stored, flight) {
                (None, Some(flight)) => flight.unstorable(),
                (_, flight) => drop(flight),
            }
        });
    }

    /// Leads or joins the fetch of `key` (coalescing is per replica).
    pub fn cache_join(&self, key: Key) -> Join {
        self.cache.join(key)
    }

    pub fn cache_entry_cap(&self) -> usize {
        self.cache.entry_cap()
    }

    /// Bytes and entries held by this replica's cache.
    pub fn cache_usage(&self) -> (u64, u64) {
        self.cache.usage()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn health() -> Health {
        Health::new(&Metrics::new(), tracing::Dispatch::none(), None)
    }

    /// During an outage a request does not wait out a timeout on every
    /// call: after a failure, calls are skipped for a while; calls off
    /// the request path are still made; a success ends the pause.
    #[tokio::test]
    async fn a_failure_pauses_calls_on_the_request_path() {
        let h = health();
        let failing = async { Err::<(), _>(StateError::Timeout(Duration::from_millis(100))) };
        assert_eq!(h.timed("take", failing).await, None);
        let made = AtomicBool::new(false);
        let call = async {
            made.store(true, Ordering::Relaxed);
            Ok::<_, StateError>(1)
        };
        assert_eq!(h.timed("take", call).await, None);
        assert!(!made.load(Ordering::Relaxed), "skipped while paused");
        assert_eq!(h.errors.with_label_values(&["take"]).get(), 2);
        // Off the request path: made anyway, and its success ends the pause.
        assert_eq!(
            h.always("release", async { Ok::<_, StateError>(2) }).await,
            Some(2)
        );
        assert_eq!(h.paused_until.load(Ordering::Relaxed), 0);
        assert_eq!(
            h.timed("take", async { Ok::<_, StateError>(3) }).await,
            Some(3)
        );
    }

    /// A command that went wrong, or one slow cache call, says nothing
    /// about Redis being reachable: no pause; two in a row do. A failure
    /// of a call begun before a later success does not pause either.
    #[tokio::test]
    async fn only_fresh_unreachability_pauses() {
        let h = health();
        let wrong = async { Err::<(), _>(StateError::Redis("ResponseError".into())) };
        assert_eq!(h.timed("take", wrong).await, None);
        let slow_cache = async { Err::<(), _>(StateError::Timeout(Duration::from_millis(100))) };
        assert_eq!(h.cached("cache_put", slow_cache).await, None);
        assert_eq!(h.paused_until.load(Ordering::Relaxed), 0);
        // A second cache timeout with no answer between them does.
        let slow_again = async { Err::<(), _>(StateError::Timeout(Duration::from_millis(100))) };
        assert_eq!(h.cached("cache_get", slow_again).await, None);
        assert_ne!(h.paused_until.load(Ordering::Relaxed), 0);
        h.paused_until.store(0, Ordering::Relaxed);
        // An answer between two timeouts starts the count again.
        assert_eq!(h.timed("take", async { Ok(()) }).await, Some(()));
        let slow_once = async { Err::<(), _>(StateError::Timeout(Duration::from_millis(100))) };
        assert_eq!(h.cached("cache_put", slow_once).await, None);
        assert_eq!(h.paused_until.load(Ordering::Relaxed), 0);
        // A cache call that found Redis gone, though, pauses.
        let refused = async { Err::<(), _>(StateError::Unreachable("Io".into())) };
        assert_eq!(h.cached("cache_get", refused).await, None);
        assert_ne!(h.paused_until.load(Ordering::Relaxed), 0);
        h.paused_until.store(0, Ordering::Relaxed);
        // A success of a call begun later than a failing one.
        h.last_ok_start.store(h.now_ms() + 1_000, Ordering::Relaxed);
        let stale = async { Err::<(), _>(StateError::Timeout(Duration::from_millis(100))) };
        assert_eq!(h.timed("take", stale).await, None);
        assert_eq!(h.paused_until.load(Ordering::Relaxed), 0);
    }

    /// A call begun before a failure that paused, and succeeding after
    /// it, shows Redis answers: the pause ends. One begun earlier still
    /// does not end the pause of a call begun after it.
    #[tokio::test]
    async fn a_success_ends_the_pause_of_a_call_begun_no_later() {
        let h = health();
        // The paused call began now; `early` begins no earlier, waits
        // past the failure, then succeeds.
        h.failed_start.store(h.now_ms(), Ordering::Relaxed);
        h.paused_until.store(h.now_ms() + 1_000, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let early = h.always("take", async {
            let _ = rx.await;
            Ok::<_, StateError>(())
        });
        let (done, ()) = tokio::join!(early, async { drop(tx) });
        assert_eq!(done, Some(()));
        assert_eq!(h.paused_until.load(Ordering::Relaxed), 0);
        // A pause by a call begun later than a success's start stands.
        h.failed_start.store(h.now_ms() + 500, Ordering::Relaxed);
        h.paused_until.store(h.now_ms() + 1_000, Ordering::Relaxed);
        assert_eq!(
            h.always("take", async { Ok::<_, StateError>(()) }).await,
            Some(())
        );
        assert_ne!(h.paused_until.load(Ordering::Relaxed), 0);
    }
}
