//! Every Prometheus family of SPEC §4 that sluice exports, in one place,
//! registered into one [`Registry`] owned by the gateway (never the global
//! default registry, so many gateways can live in one test process).

use std::cell::RefCell;
use std::collections::HashMap;

/// The children maps are read on every request and hold at most a few
/// dozen keys (models are capped per route): a fast seeded hash rather
/// than SipHash, whose flooding resistance a bounded map does not need.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::io::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::proxy::cache::CacheStatus;

/// From 1 ms to 120 s: LLM calls range from a cached hit to a long
/// reasoning answer.
/// The `route` label of requests no route matched, and the `tier` label
/// of identities without a tier: no route or tier may be named so.
pub const UNNAMED: &str = "none";

pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// sluice's own overhead is counted in microseconds, so its histogram adds
/// sub-millisecond buckets below the common ones.
pub const OVERHEAD_BUCKETS: [f64; 21] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Calls to Redis take tens of microseconds, up to a timeout of 100 ms.
pub const STATE_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// Registers a family built from static definitions: neither step can
/// fail unless the code itself is wrong. The family is also kept in
/// `families`, so that `render` can name it before it has a series.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    families: &RefCell<Vec<Box<dyn Collector>>>,
    built: prometheus::Result<C>,
) -> C {
    let metric = built.expect("static metric definition is valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each family is registered once");
    families.borrow_mut().push(Box::new(metric.clone()));
    metric
}

/// The metric families. Label sets are bounded: route, upstream and pool
/// names come from the config, statuses and outcomes from small sets.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub overhead: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_first_byte: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub auth_failures: IntCounterVec,
    pub failovers: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub tokens: IntCounterVec,
    pub completions: IntCounterVec,
    pub cost_usd: CounterVec,
    pub cache_requests: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    /// 1 while the config last read is the one serving (0 after a refusal).
    pub config_last_reload_ok: IntGauge,
    /// 1 while the certificate pair last read is the one serving.
    pub tls_last_reload_ok: IntGauge,
    /// Set once the listener serves TLS: no series without it.
    pub tls_cert_expiry: IntGaugeVec,
    pub state_errors: IntCounterVec,
    pub state_duration: HistogramVec,
    pub cache_saved_usd: CounterVec,
    pub cache_size_bytes: IntGauge,
    pub cache_entries: IntGauge,
    pub connections_open: IntGauge,
    pub buffered_request_bytes: IntGauge,
    pub log_lines_dropped: IntCounter,
    pub budget_spent: prometheus::GaugeVec,
    pub budget_limit: prometheus::GaugeVec,
    pub budget_alerts: IntCounterVec,
    pub stream_errors: IntCounterVec,
    pub upstream_up: IntGaugeVec,
    pub build_info: IntGaugeVec,
    /// Every family registered, with or without series.
    families: Arc<[Box<dyn Collector>]>,
    /// Each route name's models, kept across config loads: the series
    /// outlive a reload, so the cap on them must too.
    route_models: Arc<Mutex<FastMap<Arc<str>, Models>>>,
}

/// A route's per-model children (see [`RouteMetrics::model`]).
type Models = Arc<ArcSwap<FastMap<String, Arc<ModelMetrics>>>>;

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let families = RefCell::new(Vec::new());
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                &families,
                IntCounterVec::new(Opts::new(name, help), labels),
            )
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            register(&registry, &families, HistogramVec::new(opts, labels))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                &families,
                IntGaugeVec::new(Opts::new(name, help), labels),
            )
        };
        let usd_counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                &families,
                CounterVec::new(Opts::new(name, help), labels),
            )
        };
        let plain_gauge =
            |name: &str, help: &str| register(&registry, &families, IntGauge::new(name, help));
        let float_gauge = |name: &str, help: &str| {
            register(
                &registry,
                &families,
                prometheus::GaugeVec::new(Opts::new(name, help), &["scope"]),
            )
        };
        let cost_usd = usd_counter(
            "sluice_cost_usd_total",
            "Spend in USD: tokens times the pricing of the model.",
            &["route", "model"],
        );
        let cache_saved_usd = usd_counter(
            "sluice_cache_saved_usd_total",
            "What cache hits saved in USD: the cost of the upstream call each hit replaced.",
            &["route"],
        );
        let metrics = Metrics {
            cost_usd,
            cache_saved_usd,
            state_errors: counter(
                "sluice_state_errors_total",
                "Calls to the shared state backend (Redis) that failed, timed out, or were skipped in the second after it was found unreachable, by operation.",
                &["operation"],
            ),
            state_duration: histogram(
                "sluice_state_duration_seconds",
                "Latency of calls to the shared state backend (Redis), by operation.",
                &["operation"],
                &STATE_BUCKETS,
            ),
            config_reloads: counter(
                "sluice_config_reloads_total",
                "Config reloads (SIGHUP or a changed file) by result (ok, error).",
                &["result"],
            ),
            tls_reloads: counter(
                "sluice_tls_reloads_total",
                "Re-reads of the listener's changed certificate and key by result (ok, error: the old pair keeps serving).",
                &["result"],
            ),
            cache_requests: counter(
                "sluice_cache_requests_total",
                "Requests on cached routes by result (hit, miss, bypass).",
                &["route", "result"],
            ),
            cache_size_bytes: plain_gauge(
                "sluice_cache_size_bytes",
                "Bytes held by the response cache (bounded by cache.max_bytes).",
            ),
            log_lines_dropped: register(
                &registry,
                &families,
                IntCounter::new(
                    "sluice_log_lines_dropped_total",
                    "Log lines (access log included) dropped because stdout could not take them in time.",
                ),
            ),
            buffered_request_bytes: plain_gauge(
                "sluice_buffered_request_bytes",
                "Bytes of request bodies held whole right now, all requests together (bounded by limits.max_buffered_bytes).",
            ),
            config_last_reload_ok: plain_gauge(
                "sluice_config_last_reload_successful",
                "1 when the last config reload (or the start) succeeded, 0 when the last one was refused and the previous config keeps serving.",
            ),
            tls_last_reload_ok: plain_gauge(
                "sluice_tls_last_reload_successful",
                "1 when the last re-read of the listener's certificate pair (or the start) succeeded, 0 when the last one was refused.",
            ),
            tls_cert_expiry: gauge(
                "sluice_tls_cert_expiry_timestamp_seconds",
                "When the certificate the listener serves expires, as a Unix time (only with tls).",
                &[],
            ),
            connections_open: plain_gauge(
                "sluice_connections_open",
                "Client connections open on the proxy listener (at most limits.max_connections).",
            ),
            cache_entries: plain_gauge(
                "sluice_cache_entries",
                "Responses held by the response cache.",
            ),
            budget_spent: float_gauge("sluice_budget_spent_usd", "Spend today (UTC), in USD."),
            budget_limit: float_gauge("sluice_budget_limit_usd", "The daily budget, in USD."),
            budget_alerts: counter(
                "sluice_budget_alerts_total",
                "Budget thresholds crossed, by scope and threshold.",
                &["scope", "threshold"],
            ),
            tokens: counter(
                "sluice_tokens_total",
                "Tokens reported by upstreams, by route, model and kind (input, output).",
                &["route", "model", "kind"],
            ),
            completions: counter(
                "sluice_completions_total",
                "Completed LLM answers by finish reason: a jump in length or content_filter is a quality signal.",
                &["route", "model", "finish_reason"],
            ),
            requests: counter(
                "sluice_requests_total",
                "Requests answered, by route, method and status.",
                &["route", "method", "status"],
            ),
            request_duration: histogram(
                "sluice_request_duration_seconds",
                "Whole request time, until the last body byte (streams included).",
                &["route"],
                &LATENCY_BUCKETS,
            ),
            overhead: histogram(
                "sluice_overhead_seconds",
                "Time spent in sluice itself: request time to the response head minus time waiting on upstreams.",
                &["route"],
                &OVERHEAD_BUCKETS,
            ),
            upstream_requests: counter(
                "sluice_upstream_requests_total",
                "Upstream attempts, by outcome.",
                &["upstream", "outcome"],
            ),
            upstream_duration: histogram(
                "sluice_upstream_duration_seconds",
                "Upstream attempt time, until the last body byte.",
                &["upstream"],
                &LATENCY_BUCKETS,
            ),
            upstream_first_byte: histogram(
                "sluice_upstream_first_byte_seconds",
                "Time from sending a request upstream to its response head.",
                &["upstream"],
                &LATENCY_BUCKETS,
            ),
            in_flight: gauge(
                "sluice_in_flight_requests",
                "Requests being served now, streams included.",
                &["route"],
            ),
            failovers: counter(
                "sluice_failovers_total",
                "Attempts moved to the next pool member after a failure.",
                &["pool"],
            ),
            rate_limited: counter(
                "sluice_rate_limited_total",
                "Requests refused by a limit, by route, tier and limit.",
                &["route", "tier", "limit"],
            ),
            stream_errors: counter(
                "sluice_stream_errors_total",
                "Upstream streams that broke after the response began.",
                &["upstream"],
            ),
            upstream_up: gauge(
                "sluice_upstream_up",
                "1 while the upstream's circuit is closed, 0 while it is open.",
                &["upstream"],
            ),
            auth_failures: counter(
                "sluice_auth_failures_total",
                "Requests refused by authentication (401) or authorization (403), by reason.",
                &["route", "reason"],
            ),
            build_info: gauge(
                "sluice_build_info",
                "Always 1; the version label tells.",
                &["version"],
            ),
            registry,
            families: Arc::from(families.take()),
            route_models: Arc::default(),
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Both series exist from start, so an alert on errors sees the first.
        for result in ["ok", "error"] {
            metrics.config_reloads.with_label_values(&[result]);
            metrics.tls_reloads.with_label_values(&[result]);
        }
        metrics.config_last_reload_ok.set(1);
        metrics.tls_last_reload_ok.set(1);
        metrics
    }

    /// The children of one route, resolved once per config load so that a
    /// request never hashes label values.
    /// `cached`: the route has a `cache`, so its cache series exist (at 0
    /// from the start); other routes have none.
    pub fn route(&self, route: &str, cached: bool) -> RouteMetrics {
        let models = match self.route_models.lock() {
            Ok(mut kept) => kept.entry(Arc::from(route)).or_default().clone(),
            // A panic elsewhere while it was held: a fresh map still works.
            Err(_) => Models::default(),
        };
        RouteMetrics {
            duration: self.request_duration.with_label_values(&[route]),
            overhead: self.overhead.with_label_values(&[route]),
            in_flight: self.in_flight.with_label_values(&[route]),
            cache: cached.then(|| RouteCacheMetrics {
                results: [CacheStatus::Hit, CacheStatus::Miss, CacheStatus::Bypass]
                    .map(|r| self.cache_requests.with_label_values(&[route, r.label()])),
                saved_usd: self.cache_saved_usd.with_label_values(&[route]),
            }),
            models,
            requests: Arc::new(ArcSwap::from_pointee(FastMap::default())),
            route: Arc::from(route),
        }
    }

    /// The children of one upstream, every outcome included (a series that
    /// exists at 0 lets `rate()` see its first increment).
    pub fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            first_byte: self.upstream_first_byte.with_label_values(&[upstream]),
            duration: self.upstream_duration.with_label_values(&[upstream]),
            stream_errors: self.stream_errors.with_label_values(&[upstream]),
            outcomes: Outcome::ALL.map(|o| {
                self.upstream_requests
                    .with_label_values(&[upstream, o.label()])
            }),
        }
    }

    /// The global budget's gauges.
    /// Drops the `sluice_upstream_up` series of upstreams no longer in
    /// the config: left at their last value, a removed upstream's 0 would
    /// page as down forever. (Counters of the old names stay, as counters
    /// of stopped series do.)
    pub fn keep_upstreams_up(&self, names: &[&str]) {
        let gone: Vec<String> = self
            .upstream_up
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .flat_map(|m| m.get_label())
            .filter(|l| l.name() == "upstream" && !names.contains(&l.value()))
            .map(|l| l.value().to_owned())
            .collect();
        for name in gone {
            let _ = self.upstream_up.remove_label_values(&[&name]);
        }
    }

    /// Drops the series of routes no longer in the config that hold
    /// nothing: an in-flight gauge at 0, and the histograms and cache
    /// counters of a route that served no request. A config generator
    /// that versions route names would otherwise grow them without
    /// bound. What a removed route did count stays, as counters of
    /// stopped series do.
    pub fn keep_routes(&self, names: &[&str]) {
        type Empty = dyn Fn(&prometheus::proto::Metric) -> bool;
        // Each series to drop by its labels (by name: a family's labels
        // come sorted, not in the vector's order).
        let gone = |family: &dyn Collector, empty: &Empty| -> Vec<Vec<(String, String)>> {
            family
                .collect()
                .iter()
                .flat_map(|f| f.get_metric())
                .filter(|m| empty(m))
                .filter(|m| {
                    m.get_label().iter().any(|l| {
                        l.name() == "route" && l.value() != UNNAMED && !names.contains(&l.value())
                    })
                })
                .map(|m| {
                    m.get_label()
                        .iter()
                        .map(|l| (l.name().to_owned(), l.value().to_owned()))
                        .collect()
                })
                .collect()
        };
        let unobserved = |m: &prometheus::proto::Metric| m.get_histogram().get_sample_count() == 0;
        let zero_gauge = |m: &prometheus::proto::Metric| m.get_gauge().get_value() == 0.0;
        let zero_counter = |m: &prometheus::proto::Metric| m.get_counter().get_value() == 0.0;
        fn drop_each<T: prometheus::core::MetricVecBuilder>(
            vec: &prometheus::core::MetricVec<T>,
            series: Vec<Vec<(String, String)>>,
        ) {
            for labels in series {
                let labels: HashMap<&str, &str> = labels
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                let _ = vec.remove(&labels);
            }
        }
        drop_each(&self.in_flight, gone(&self.in_flight, &zero_gauge));
        drop_each(
            &self.request_duration,
            gone(&self.request_duration, &unobserved),
        );
        drop_each(&self.overhead, gone(&self.overhead, &unobserved));
        drop_each(
            &self.cache_requests,
            gone(&self.cache_requests, &zero_counter),
        );
        drop_each(
            &self.cache_saved_usd,
            gone(&self.cache_saved_usd, &zero_counter),
        );
    }

    /// Drops the global budget's gauges when the config no longer has
    /// one: its last figures would keep its alerts firing.
    pub fn clear_global_budget(&self) {
        let _ = self.budget_spent.remove_label_values(&["global"]);
        let _ = self.budget_limit.remove_label_values(&["global"]);
    }

    pub fn set_global_budget(&self, spent: f64, limit: f64) {
        self.budget_spent.with_label_values(&["global"]).set(spent);
        self.budget_limit.with_label_values(&["global"]).set(limit);
    }

    /// The Prometheus text exposition of every family.
    ///
    /// A family with no series yet (no request refused, no budget set) is
    /// still named by its `# HELP` and `# TYPE` lines: the registry alone
    /// would leave it out, and a dashboard or alert cannot tell a family
    /// that is empty from one that does not exist.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on invalid families, which
        // `Metrics::new` cannot register.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        // What `gather` left out: the families with no series.
        for family in self.families.iter().flat_map(|c| c.collect()) {
            if family.get_metric().is_empty() {
                let help = family.help().replace('\\', "\\\\").replace('\n', "\\n");
                let kind = match family.get_field_type() {
                    MetricType::COUNTER => "counter",
                    MetricType::GAUGE => "gauge",
                    MetricType::HISTOGRAM => "histogram",
                    MetricType::SUMMARY => "summary",
                    MetricType::UNTYPED => "untyped",
                };
                let name = family.name();
                let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            }
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One route's metric children.
#[derive(Clone)]
pub struct RouteMetrics {
    pub duration: Histogram,
    pub overhead: Histogram,
    pub in_flight: IntGauge,
    /// The cache's children, on routes with a `cache`.
    cache: Option<RouteCacheMetrics>,
    /// Per-model children, resolved on a model's first answer and then
    /// read without locking or label hashing.
    models: Models,
    /// `sluice_requests_total` children by (method, status), resolved on
    /// a pair's first request and then read without the family's lock.
    requests: Arc<ArcSwap<FastMap<(&'static str, u16), IntCounter>>>,
    route: Arc<str>,
}

/// One (route, model)'s usage children.
pub struct ModelMetrics {
    pub input_tokens: IntCounter,
    pub output_tokens: IntCounter,
    pub cost_usd: prometheus::Counter,
    /// `sluice_completions_total` for the common finish reasons.
    completions: [OnceLock<IntCounter>; FINISH_REASONS.len()],
    route: Arc<str>,
    model: String,
}

/// The label of values outside a bounded set (methods, models, finish
/// reasons), so that no client or upstream can grow a family at will.
const OTHER: &str = "other";

/// Distinct `model` labels a route keeps before counting more as `other`.
pub const MAX_MODELS_PER_ROUTE: usize = 64;
/// The longest `model` label; a longer name counts as `other`. Real
/// names (`anthropic.claude-3-5-sonnet-20240620-v1:0`, Hugging Face
/// ids, Azure deployments) are well under it.
const MAX_MODEL_LABEL: usize = 128;

/// The `method` label: the methods of RFC 9110 and PATCH, else `other`
/// (hyper accepts any token as a method).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => OTHER,
    }
}

/// The `finish_reason` labels: OpenAI's (other APIs' reasons are read
/// as OpenAI's, see [`openai_finish_reason`]), then the few with no
/// OpenAI name, then `other` for any else. The first
/// [`EAGER_FINISH_REASONS`] are resolved up front (their series show from
/// a model's first answer); the rest on first use, then kept.
const FINISH_REASONS: [&str; 10] = [
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "none",
    "function_call",
    "pause_turn",
    "error",
    "cancelled",
    OTHER,
];
const EAGER_FINISH_REASONS: usize = 5;

/// A finish reason in OpenAI's words, so that one dashboard reads every
/// provider: a jump in `length` is a jump in truncations, whether
/// Anthropic says `max_tokens` or Gemini `MAX_TOKENS`.
fn openai_finish_reason(reason: &str) -> &str {
    match reason {
        "end_turn" | "stop_sequence" | "STOP" => "stop",
        "max_tokens" | "MAX_TOKENS" => "length",
        "tool_use" => "tool_calls",
        "refusal" | "SAFETY" | "RECITATION" | "PROHIBITED_CONTENT" | "BLOCKLIST" | "SPII" => {
            "content_filter"
        }
        other => other,
    }
}

impl ModelMetrics {
    pub fn completion(&self, metrics: &Metrics, reason: &str) -> &IntCounter {
        let reason = openai_finish_reason(reason);
        let last = FINISH_REASONS.len() - 1;
        let i = FINISH_REASONS[..last]
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(last);
        self.completions[i].get_or_init(|| {
            metrics.completions.with_label_values(&[
                &*self.route,
                self.model.as_str(),
                FINISH_REASONS[i],
            ])
        })
    }
}

#[derive(Clone)]
struct RouteCacheMetrics {
    /// `sluice_cache_requests_total` by result: hit, miss, bypass.
    results: [IntCounter; 3],
    saved_usd: prometheus::Counter,
}

impl RouteMetrics {
    /// Counts a request of this route's cache.
    pub fn cache_result(&self, result: CacheStatus) {
        if let Some(cache) = &self.cache {
            cache.results[result as usize].inc();
        }
    }

    /// Whether this route has a cache.
    pub fn cached(&self) -> bool {
        self.cache.is_some()
    }

    /// Adds what a hit saved to `sluice_cache_saved_usd_total`.
    pub fn cache_saved(&self, usd: f64) {
        if let Some(cache) = &self.cache {
            cache.saved_usd.inc_by(usd);
        }
    }

    /// Counts a finished request in `sluice_requests_total`.
    pub fn count_request(&self, metrics: &Metrics, method: &Method, status: u16) {
        let key = (method_label(method), status);
        if let Some(counter) = self.requests.load().get(&key) {
            counter.inc();
            return;
        }
        let code = StatusCode::from_u16(status).ok();
        let label = code.as_ref().map_or("000", StatusCode::as_str);
        let counter = metrics
            .requests
            .with_label_values(&[&self.route, key.0, label]);
        counter.inc();
        self.requests.rcu(|map| {
            let mut map = FastMap::clone(map);
            map.entry(key).or_insert_with(|| counter.clone());
            map
        });
    }

    /// The usage children of `model` on this route. Past
    /// [`MAX_MODELS_PER_ROUTE`] models, others count as `other`, as do
    /// names longer than [`MAX_MODEL_LABEL`] or holding a control
    /// character: an upstream that echoes
    /// whatever model a client names must not grow the series, or their
    /// size, without bound.
    pub fn model(&self, metrics: &Metrics, model: &str) -> Arc<ModelMetrics> {
        let models = self.models.load();
        if let Some(found) = models.get(model) {
            return found.clone();
        }
        // A name with a control character is no model anyone would chart,
        // and a NUL or a line break in a label breaks some scrapers.
        let model = if models.len() >= MAX_MODELS_PER_ROUTE
            || model.len() > MAX_MODEL_LABEL
            || model.chars().any(char::is_control)
        {
            if let Some(other) = models.get(OTHER) {
                return other.clone();
            }
            OTHER
        } else {
            model
        };
        drop(models);
        let made = Arc::new(ModelMetrics {
            input_tokens: metrics
                .tokens
                .with_label_values(&[&self.route, model, "input"]),
            output_tokens: metrics
                .tokens
                .with_label_values(&[&self.route, model, "output"]),
            cost_usd: metrics.cost_usd.with_label_values(&[&self.route, model]),
            completions: std::array::from_fn(|i| {
                let counter = OnceLock::new();
                if i < EAGER_FINISH_REASONS {
                    let _ = counter.set(metrics.completions.with_label_values(&[
                        &self.route,
                        model,
                        FINISH_REASONS[i],
                    ]));
                }
                counter
            }),
            route: self.route.clone(),
            model: model.to_owned(),
        });
        self.models.rcu(|map| {
            let mut map = FastMap::clone(map);
            map.entry(model.to_owned()).or_insert_with(|| made.clone());
            map
        });
        made
    }
}

/// One upstream's metric children.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub first_byte: Histogram,
    pub duration: Histogram,
    pub stream_errors: IntCounter,
    outcomes: [IntCounter; Outcome::ALL.len()],
}

impl UpstreamMetrics {
    pub fn outcome(&self, outcome: Outcome) -> &IntCounter {
        &self.outcomes[outcome as usize]
    }
}

/// How an upstream attempt ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with a 1xx-3xx status.
    Ok,
    Http4xx,
    Http429,
    Http5xx,
    ConnectError,
    TlsError,
    Timeout,
    /// The connection broke before a response head.
    ConnectionError,
    /// The client's request failed (its body was too large), not the upstream.
    ClientError,
    /// A streamed answer broke or ended before its first content, while
    /// a pool route held its preamble back (and failed over).
    StreamError,
    /// sluice itself could not open a connection (out of descriptors,
    /// memory or local ports): not the upstream's failure.
    LocalError,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Ok,
        Outcome::Http4xx,
        Outcome::Http429,
        Outcome::Http5xx,
        Outcome::ConnectError,
        Outcome::TlsError,
        Outcome::Timeout,
        Outcome::ConnectionError,
        Outcome::ClientError,
        Outcome::StreamError,
        Outcome::LocalError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Http4xx => "http_4xx",
            Outcome::Http429 => "http_429",
            Outcome::Http5xx => "http_5xx",
            Outcome::ConnectError => "connect_error",
            Outcome::TlsError => "tls_error",
            Outcome::Timeout => "timeout",
            Outcome::ConnectionError => "connection_error",
            Outcome::ClientError => "client_error",
            Outcome::StreamError => "stream_error",
            Outcome::LocalError => "local_error",
        }
    }

    pub fn of_status(status: u16) -> Self {
        match status {
            429 => Outcome::Http429,
            400..=499 => Outcome::Http4xx,
            500..=599 => Outcome::Http5xx,
            _ => Outcome::Ok,
        }
    }
}
