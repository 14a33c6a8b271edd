//! The gateway: the current config behind one atomic pointer, and
//! everything that outlives a reload (metrics, the log dispatcher, the
//! readiness flag). Built once, shared by reference with every connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use prometheus::IntCounter;

use crate::proxy::buffered::{Budget, Buffered};
use crate::proxy::jwks::JwksKeys;
use crate::snapshot::{LogFormat, Snapshot};
use crate::state::State;
use crate::state::budget::BudgetScope;
use crate::telemetry::alerts;
use crate::telemetry::log::{self, Log, LogSink};
use crate::telemetry::metrics::{Metrics, RouteMetrics, UpstreamMetrics};
use crate::upstream::breaker::Breaker;
use crate::upstream::health;
use crate::upstream::{HttpClient, UpstreamKind};

/// A config in service: the snapshot and its metric children, resolved
/// together when it is installed so requests index instead of hashing.
pub struct Active {
    pub snapshot: Snapshot,
    /// The gateway's log, for events of the request path that name
    /// what the config made (an upstream).
    pub log: tracing::Dispatch,
    /// Parallel to `snapshot.routes`.
    pub routes: Vec<RouteMetrics>,
    /// Parallel to `snapshot.upstreams`.
    pub upstreams: Vec<UpstreamMetrics>,
    /// For requests that match no route (`route="none"`).
    pub unrouted: RouteMetrics,
    /// The keys of the config's `jwks_url`, if it has one.
    pub jwks: Option<Arc<JwksKeys>>,
    /// Parallel to `snapshot.upstreams`: circuit state, kept across reloads.
    pub breakers: Vec<Arc<Breaker>>,
    /// Parallel to `snapshot.pools`: `sluice_failovers_total{pool}`.
    pub failovers: Vec<IntCounter>,
}

impl Active {
    fn new(
        snapshot: Snapshot,
        metrics: &Metrics,
        jwks: &Registry<JwksKeys>,
        breakers: &Registry<Breaker>,
        log: &tracing::Dispatch,
    ) -> Self {
        // A circuit belongs to an upstream's name and where it points: a
        // reload that fixes an upstream's URL gives it a closed circuit
        // (the old address's failures say nothing of the new one), and
        // circuits of upstreams gone from the config are let go.
        let circuits: Vec<String> = snapshot
            .upstreams
            .iter()
            .map(|u| format!("{}\0{}", u.name, u.target()))
            .collect();
        breakers.keep_only(&circuits, |circuit| circuit.retire());
        let names: Vec<&str> = snapshot.upstreams.iter().map(|u| &*u.name).collect();
        metrics.keep_upstreams_up(&names);
        let routes: Vec<&str> = snapshot.routes.iter().map(|r| &*r.name).collect();
        metrics.keep_routes(&routes);
        // A JWKS URL a reload retired is let go: its refresher, holding it
        // weakly, stops once the requests of the old config have ended,
        // rather than fetch it every few minutes for the process's life.
        let jwks_url = snapshot
            .auth
            .jwt
            .as_ref()
            .and_then(|j| j.jwks.as_ref())
            .map(|source| source.url.to_string());
        jwks.keep_only(jwks_url.as_slice(), |_| {});
        if snapshot.budget.daily_usd.is_none() {
            metrics.clear_global_budget();
        }
        let active = Active {
            log: log.clone(),
            breakers: snapshot
                .upstreams
                .iter()
                .zip(&circuits)
                .map(|(u, circuit)| {
                    breakers.get_or(circuit, || {
                        Arc::new(Breaker::new(
                            metrics.upstream_up.with_label_values(&[&u.name]),
                            u.name.clone(),
                            log.clone(),
                        ))
                    })
                })
                .collect(),
            failovers: snapshot
                .pools
                .iter()
                .map(|p| metrics.failovers.with_label_values(&[&p.name]))
                .collect(),
            jwks: snapshot
                .auth
                .jwt
                .as_ref()
                .and_then(|j| j.jwks.as_ref())
                .zip(jwks_url.as_deref())
                .map(|(source, url)| {
                    jwks.get_or(url, || {
                        let keys = JwksKeys::new(source.url.clone(), source.client.clone());
                        keys.spawn_refresher();
                        keys
                    })
                }),
            routes: snapshot
                .routes
                .iter()
                .map(|r| metrics.route(&r.name, r.cache.is_some()))
                .collect(),
            upstreams: snapshot
                .upstreams
                .iter()
                .map(|u| metrics.upstream(&u.name))
                .collect(),
            unrouted: metrics.route(crate::telemetry::metrics::UNNAMED, false),
            snapshot,
        };
        active.forget_dropped_health_checks();
        active
    }

    /// Upstreams that no pool health-checks any more lose what the checks
    /// said of them: nothing would check them again to let them back in.
    fn forget_dropped_health_checks(&self) {
        let pools = &self.snapshot.pools;
        for (index, (upstream, breaker)) in self
            .snapshot
            .upstreams
            .iter()
            .zip(&self.breakers)
            .enumerate()
        {
            let checked = pools
                .iter()
                .any(|p| p.health_check.is_some() && p.members.contains(&index));
            // Cleared as a passing check clears it: it would otherwise be
            // skipped and reported down until traffic next asked for it.
            if !checked && breaker.health_passed() {
                tracing::dispatcher::with_default(&self.log, || {
                    tracing::info!(
                        event = "upstream_marked_up",
                        upstream = %upstream.name,
                        "no health check covers the member any more: their verdict is cleared"
                    );
                });
            }
        }
    }

    /// The metrics of route `index`, or of unrouted requests.
    pub fn route_metrics(&self, index: Option<usize>) -> &RouteMetrics {
        index
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.unrouted)
    }
}

/// Long-lived state by name (JWKS keys by URL, breakers by upstream), so
/// that a reload keeps what the old config learned. Touched only when a
/// config is installed, never per request.
struct Registry<T>(Mutex<HashMap<String, Arc<T>>>);

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry(Mutex::new(HashMap::new()))
    }
}

impl<T> Registry<T> {
    fn get_or(&self, name: &str, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        match self.0.lock() {
            Ok(mut map) => map.entry(name.to_owned()).or_insert_with(make).clone(),
            // Poisoned only by a panic elsewhere: start afresh rather than fail.
            Err(_) => make(),
        }
    }

    /// Forgets the entries not named in `names`, `retire`-ing each.
    fn keep_only(&self, names: &[String], retire: impl Fn(&T)) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|name, entry| {
                let keep = names.contains(name);
                if !keep {
                    retire(entry);
                }
                keep
            });
        }
    }
}

/// [`Gateway::readiness`] states.
const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

pub struct Gateway {
    active: ArcSwap<Active>,
    /// Buckets, slots, budgets and the cache, across reloads (in memory
    /// or in Redis).
    pub state: Arc<State>,
    /// Queue of the budget webhook sender.
    pub webhook: Option<tokio::sync::mpsc::Sender<alerts::Delivery>>,
    jwks: Registry<JwksKeys>,
    breakers: Registry<Breaker>,
    pub metrics: Metrics,
    /// Where request-path events (the access log) are written.
    pub log: Log,
    /// The format `log` writes (a restart-only setting).
    pub log_format: LogFormat,
    /// Starting, ready or draining: `/readyz` answers 200 only when ready.
    readiness: AtomicU8,
    /// Set when `shutdown_grace` ran out: requests still open from then
    /// on are being cut by sluice, not left by their clients.
    cutting: AtomicBool,
    /// Request bodies held whole right now (`limits.max_buffered_bytes`).
    pub buffered: Arc<Buffered>,
    /// The upstream clients in service by what they were built from, so
    /// a reload keeps their pooled connections (see [`Gateway::swap`]).
    clients: Mutex<HashMap<String, HttpClient>>,
}

impl Gateway {
    pub fn new(snapshot: Snapshot, sink: LogSink) -> Arc<Self> {
        let log = log::build(&snapshot.logging, sink);
        let log_format = snapshot.logging.format;
        let metrics = Metrics::new();
        let jwks = Registry::default();
        let breakers = Registry::default();
        let state = Arc::new(State::new(
            &snapshot.state,
            snapshot.cache.max_bytes,
            &metrics,
            log.dispatch.clone(),
        ));
        let clients = Mutex::new(HashMap::new());
        let snapshot = keep_clients(&clients, snapshot);
        let active = Arc::new(Active::new(
            snapshot,
            &metrics,
            &jwks,
            &breakers,
            &log.dispatch,
        ));
        health::spawn(&active, &log.dispatch);
        Arc::new(Gateway {
            active: ArcSwap::new(active),
            jwks,
            breakers,
            state,
            webhook: alerts::spawn_webhook_sender(),
            metrics,
            log,
            log_format,
            readiness: AtomicU8::new(STARTING),
            cutting: AtomicBool::new(false),
            buffered: Arc::default(),
            clients,
        })
    }

    /// What a request reading its body whole may take, under `snapshot`'s cap.
    pub fn body_budget<'a>(&'a self, snapshot: &Snapshot) -> Budget<'a> {
        Budget {
            pool: &self.buffered,
            cap: snapshot.limits.max_buffered_bytes,
        }
    }

    /// The config a request uses from start to end.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Replaces the config for requests that start from now on.
    pub fn swap(&self, snapshot: Snapshot) {
        let snapshot = keep_clients(&self.clients, snapshot);
        let active = Arc::new(Active::new(
            snapshot,
            &self.metrics,
            &self.jwks,
            &self.breakers,
            &self.log.dispatch,
        ));
        health::spawn(&active, &self.log.dispatch);
        self.active.store(active);
    }

    /// The Prometheus text of every family, gauges sampled now.
    pub async fn render_metrics(&self) -> Vec<u8> {
        if let Some(dropped) = &self.log.dropped {
            dropped.tell(&self.metrics.log_lines_dropped);
        }
        self.metrics
            .buffered_request_bytes
            .set(i64::try_from(self.buffered.held()).unwrap_or(i64::MAX));
        let (bytes, entries) = self.state.cache_usage();
        self.metrics
            .cache_size_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metrics
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        // Sampled now rather than when spend was last charged, so that
        // the gauges follow a reload and reset at midnight without traffic,
        // and, with Redis, every replica reports the spend all share (one
        // bounded read per scrape; unreadable, the gauges keep their value).
        if let Some(limit) = self.active().snapshot.budget.daily_usd
            && let Some(spent) = self.state.spent_for_scrape(&BudgetScope::Global).await
        {
            self.metrics.set_global_budget(spent, limit);
        }
        self.metrics.render()
    }

    pub fn is_ready(&self) -> bool {
        self.readiness.load(Ordering::Acquire) == READY
    }

    /// Started: ready unless the drain began meanwhile (a start that
    /// waited for its JWKS keys must not undo a shutdown).
    pub fn set_started(&self) {
        let _ =
            self.readiness
                .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Draining: not ready again.
    pub fn set_draining(&self) {
        self.readiness.store(DRAINING, Ordering::Release);
    }

    /// The keys of the active config's `jwks_url`, if it has one.
    pub fn jwks(&self) -> Option<Arc<JwksKeys>> {
        self.active().jwks.clone()
    }

    /// `shutdown_grace` ran out: the requests still open are cut.
    pub fn cut_remaining(&self) {
        self.cutting.store(true, Ordering::Release);
    }

    /// Whether a request ending now was cut by the shutdown.
    pub fn is_cutting(&self) -> bool {
        self.cutting.load(Ordering::Acquire)
    }
}

/// Gives each HTTP upstream of `snapshot` the client already in service
/// for the same scheme, host, connect timeout and CA, if there is one: a
/// reload (a ConfigMap edit that changed a limit) must not drop every
/// pooled connection and TLS session. Clients no upstream uses any more
/// leave the registry; requests still running on the old config hold
/// their own copy until they end.
fn keep_clients(clients: &Mutex<HashMap<String, HttpClient>>, mut snapshot: Snapshot) -> Snapshot {
    let mut kept = clients.lock().unwrap_or_else(PoisonError::into_inner);
    let mut in_use = HashMap::with_capacity(snapshot.upstreams.len());
    for upstream in &mut snapshot.upstreams {
        // Freshly compiled, the snapshot owns its upstreams alone.
        let Some(upstream) = Arc::get_mut(upstream) else {
            continue;
        };
        let UpstreamKind::Http(http) = &mut upstream.kind else {
            continue;
        };
        // Two upstreams with one URL share one client, from the first load.
        if let Some(client) = in_use.get(&http.client_key).or(kept.get(&http.client_key)) {
            http.client = client.clone();
        }
        in_use.insert(http.client_key.clone(), http.client.clone());
    }
    *kept = in_use;
    snapshot
}
