//! The gateway: the current config behind one atomic pointer, and
//! everything that outlives a reload (metrics, the log dispatcher, the
//! readiness flag). Built once, shared by reference with every connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::snapshot::Snapshot;
use crate::telemetry::log::{self, LogGuard, LogSink};
use crate::telemetry::metrics::{Metrics, RouteMetrics, UpstreamMetrics};

/// A config in service: the snapshot and its metric children, resolved
/// together when it is installed so requests index instead of hashing.
pub struct Active {
    pub snapshot: Snapshot,
    /// Parallel to `snapshot.routes`.
    pub routes: Vec<RouteMetrics>,
    /// Parallel to `snapshot.upstreams`.
    pub upstreams: Vec<UpstreamMetrics>,
    /// For requests that match no route (`route="none"`).
    pub unrouted: RouteMetrics,
}

impl Active {
    fn new(snapshot: Snapshot, metrics: &Metrics) -> Self {
        Active {
            routes: snapshot
                .routes
                .iter()
                .map(|r| metrics.route(&r.name))
                .collect(),
            upstreams: snapshot
                .upstreams
                .iter()
                .map(|u| metrics.upstream(&u.name))
                .collect(),
            unrouted: metrics.route("none"),
            snapshot,
        }
    }

    /// The metrics of route `index`, or of unrouted requests.
    pub fn route_metrics(&self, index: Option<usize>) -> &RouteMetrics {
        index
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.unrouted)
    }
}

pub struct Gateway {
    active: ArcSwap<Active>,
    pub metrics: Metrics,
    /// Where request-path events (the access log) are written.
    pub log: tracing::Dispatch,
    /// False while starting and while draining: `/readyz` answers 503.
    ready: AtomicBool,
    /// Flushes buffered log lines when the gateway is dropped.
    _log_guard: LogGuard,
}

impl Gateway {
    pub fn new(snapshot: Snapshot, sink: LogSink) -> Arc<Self> {
        let (log, log_guard) = log::dispatch(&snapshot.logging, sink);
        let metrics = Metrics::new();
        Arc::new(Gateway {
            active: ArcSwap::from_pointee(Active::new(snapshot, &metrics)),
            metrics,
            log,
            ready: AtomicBool::new(false),
            _log_guard: log_guard,
        })
    }

    /// The config a request uses from start to end.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Replaces the config for requests that start from now on.
    pub fn swap(&self, snapshot: Snapshot) {
        self.active
            .store(Arc::new(Active::new(snapshot, &self.metrics)));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}
