//! The gateway: the current config snapshot behind one atomic pointer, and
//! everything that outlives a reload (metrics, the log dispatcher, the
//! readiness flag). Built once, shared by reference with every connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::snapshot::Snapshot;
use crate::telemetry::log::{self, LogGuard, LogSink};
use crate::telemetry::metrics::Metrics;

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
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
        Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: Metrics::new(),
            log,
            ready: AtomicBool::new(false),
            _log_guard: log_guard,
        })
    }

    /// The config a request uses from start to end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Replaces the config for requests that start from now on.
    pub fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}
