//! The immutable runtime view of one config: what `compile` produces and
//! what a request reads, through one `Arc` loaded at its start. Nothing in
//! here is locked or mutated; state that must outlive a reload (limits,
//! budgets, cache, circuits) lives elsewhere, keyed by the names below.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::proxy::jwt::JwtVerifier;
use crate::upstream::Upstream;

/// One loaded config.
#[derive(Debug)]
pub struct Snapshot {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub admin_listen: SocketAddr,
    pub limits: Limits,
    /// Every upstream, in name order; routes refer to them by index.
    pub upstreams: Vec<Arc<Upstream>>,
    pub pools: Vec<Pool>,
    pub routes: Vec<Route>,
    pub auth: Auth,
    pub tiers: HashMap<Arc<str>, Tier>,
    pub pricing: HashMap<String, Price>,
    pub budget: Budget,
    pub cache: CacheSettings,
    pub state: StateSettings,
    pub logging: Logging,
    /// What works but should be fixed (`file:line:col: warning: …`).
    pub warnings: Vec<crate::config::ConfigError>,
    /// The files the config read besides itself and its TLS pair
    /// (`schema_file`, `keys_file`, `ca_file`): a change to one is a
    /// change to the config, for hot reload.
    pub sources: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_body: u64,
    /// The bytes of request bodies held whole at once, all requests
    /// together (see `proxy::buffered`).
    pub max_buffered_bytes: u64,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Where a route sends its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Index into [`Snapshot::upstreams`].
    Upstream(usize),
    /// Index into [`Snapshot::pools`].
    Pool(usize),
}

/// What a pool member failure may be retried on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    Connect,
    Timeout,
    Status(u16),
}

#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    /// Indexes into [`Snapshot::upstreams`], in priority order.
    pub members: Vec<usize>,
    pub retry_on: Vec<RetryOn>,
    pub max_attempts: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub health_check: Option<HealthCheck>,
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
}

/// How a route establishes who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid credential or 401.
    Required,
    /// Anonymous when absent, 401 when present but invalid.
    Optional,
    /// No credential looked at; the identity is the client IP.
    None,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub path: PathMatch,
    /// Lower-cased host without port.
    pub host: Option<String>,
    /// Empty = every method.
    pub methods: Vec<Method>,
    /// The `allow` header of a 405, precomputed.
    pub allow: HeaderValue,
    pub auth: AuthMode,
    pub validate: Validate,
    pub rate_limit: RouteRateLimit,
    pub cache: Option<RouteCache>,
    pub cors: Option<Cors>,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Any,
}

#[derive(Debug, Clone)]
pub enum Validate {
    None,
    OpenAi,
    /// A JSON Schema from `schema_file`, compiled at load.
    Schema(Arc<jsonschema::Validator>),
}

#[derive(Debug, Clone, Default)]
pub struct RouteRateLimit {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Identity,
    Shared,
}

#[derive(Debug, Clone)]
pub struct RouteCache {
    pub ttl: Duration,
    pub scope: CacheScope,
    /// The answer-changing request headers (`proxy::cache::ANSWER_HEADERS`,
    /// bit by index) that every upstream the route sends to replaces with
    /// its `set_headers`: what the client sent of them changes nothing.
    pub replaced_headers: u8,
}

#[derive(Debug, Clone)]
pub struct Cors {
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    /// `None`: whatever the preflight asks for (its
    /// `access-control-request-headers`), as the origin is allowed anyway.
    pub allow_headers: Option<Vec<String>>,
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
}

/// Identities known to the gateway.
#[derive(Debug, Default)]
pub struct Auth {
    /// API keys by the SHA-256 digest of the key: the key itself is never kept.
    pub api_keys: HashMap<[u8; 32], Arc<ApiKey>>,
    pub jwt: Option<Jwt>,
    pub default_tier: Option<Arc<str>>,
    /// The tier of anonymous callers (`anonymous`), shared, not rebuilt per request.
    pub anonymous_tier: Arc<str>,
}

#[derive(Debug)]
pub struct ApiKey {
    pub id: Arc<str>,
    pub tier: Option<Arc<str>>,
    /// Route names this key may use; `None` = all.
    pub routes: Option<Vec<Arc<str>>>,
}

/// JWT bearer tokens accepted as identities.
#[derive(Debug)]
pub struct Jwt {
    /// Checks tokens against the keys loaded at config time (`keys_file`,
    /// `hs256_secret`).
    pub verifier: JwtVerifier,
    /// Where the issuer publishes its keys, and the client to fetch them
    /// with; the keys themselves live in the gateway, across reloads.
    pub jwks: Option<JwksSource>,
}

#[derive(Clone)]
pub struct JwksSource {
    pub url: http::Uri,
    pub client: crate::upstream::HttpClient,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("url", &crate::proxy::jwks::shown(&self.url))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Tier {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub concurrent_requests: Option<u64>,
    pub daily_budget_usd: Option<f64>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Prompt tokens read from the provider's prompt cache (`input` when
    /// unset).
    pub cached_input: Option<f64>,
    /// Prompt tokens written to it (Anthropic; `input` when unset).
    pub cache_write: Option<f64>,
}

#[derive(Clone, Default)]
pub struct Budget {
    pub daily_usd: Option<f64>,
    /// Ascending.
    pub alert_at: Vec<f64>,
    /// Each of `alert_at` as the config wrote it: the metric's label.
    pub alert_labels: Vec<String>,
    pub enforce: bool,
    /// May carry a token (`?key=…`): never shown.
    pub webhook_url: Option<String>,
}

impl Budget {
    /// The `threshold` label of an alert at `fraction`, as written. The
    /// Redis backend hands fractions back in thousandths, so they are
    /// matched at that precision.
    pub fn alert_label(&self, fraction: f64) -> String {
        let thousandths = |f: f64| (f * 1000.0).round();
        self.alert_at
            .iter()
            .position(|&f| thousandths(f) == thousandths(fraction))
            .and_then(|i| self.alert_labels.get(i).cloned())
            .unwrap_or_else(|| fraction.to_string())
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("daily_usd", &self.daily_usd)
            .field("alert_at", &self.alert_labels)
            .field("enforce", &self.enforce)
            .field("webhook_url", &self.webhook_url.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// What a secret shows in `Debug` output.
const REDACTED: &str = "<redacted>";

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateBackend {
    Memory,
    Redis,
}

#[derive(Clone)]
pub struct StateSettings {
    pub backend: StateBackend,
    /// May carry a password (`redis://:pw@host`): never shown.
    pub redis_url: Option<String>,
    pub deny_on_error: bool,
}

impl std::fmt::Debug for StateSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSettings")
            .field("backend", &self.backend)
            .field("redis_url", &self.redis_url.as_ref().map(|_| REDACTED))
            .field("deny_on_error", &self.deny_on_error)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct Logging {
    pub level: String,
    pub format: LogFormat,
    pub log_bodies: bool,
    /// With `log_bodies`: the config's `set_headers` values, masked in
    /// logged bodies wherever they show (an upstream that echoes its
    /// request back).
    pub known_secrets: KnownSecrets,
    /// The config's secrets as the access log masks them in what a
    /// client chose (its path, request id, model), whatever `log_bodies`.
    pub scrub: crate::telemetry::scrub::Scrub,
}

/// A header an upstream replaces, parsed once at load.
#[derive(Debug, Clone)]
pub struct SetHeader {
    pub name: HeaderName,
    pub value: HeaderValue,
}

/// Secret values a logged body must not show; `Debug` counts them only.
#[derive(Clone, Default)]
pub struct KnownSecrets(pub Vec<String>);

impl KnownSecrets {
    /// Adds `secret` as a body may show it: as it is, escaped inside a
    /// JSON string once and twice, with `/` escaped as some encoders do
    /// (and that escaped again, as an upstream echoing it writes it), and
    /// percent-encoded as a form or a query string carries it. A value
    /// too short to be a key is left out: masked, it would mask the same
    /// word wherever it shows.
    pub fn add(&mut self, secret: &str) {
        if secret.len() < 8 {
            return;
        }
        let escaped = json_escaped(secret);
        let twice = json_escaped(&escaped);
        let slashes = escaped.replace('/', "\\/");
        let slashes_twice = json_escaped(&slashes);
        // As browsers and `curl --data-urlencode` write a form value, and
        // with `/` kept as Python's `quote` keeps it (the body log matches
        // these in any case of hex).
        let percent = percent_encoded(secret, b"");
        let path_kept = percent_encoded(secret, b"/");
        let forms = [
            secret.to_owned(),
            escaped,
            twice,
            slashes,
            slashes_twice,
            percent,
            path_kept,
        ];
        for form in forms {
            if !self.0.contains(&form) {
                self.0.push(form);
            }
        }
    }

    /// Longest first, so that a whole value is masked before a part of it.
    pub fn sort(&mut self) {
        self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// These and the credential a request presented: a key known only by
    /// its `hash`, or a token, that a client pastes into its own body.
    pub fn with_presented(&self, presented: &[u8]) -> KnownSecrets {
        let mut all = self.clone();
        if let Ok(presented) = std::str::from_utf8(presented) {
            all.add(presented);
            all.sort();
        }
        all
    }
}

/// `text` as it reads inside a JSON string.
fn json_escaped(text: &str) -> String {
    let quoted = serde_json::to_string(text).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(text)
        .to_owned()
}

/// `text` with every byte but RFC 3986's unreserved ones and `kept`
/// written `%XX`.
fn percent_encoded(text: &str, kept: &[u8]) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || kept.contains(&b)
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl std::fmt::Debug for KnownSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} redacted>", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    /// Secrets a config holds never show in `Debug` output, so that no
    /// future log or error that prints a snapshot part can leak them.
    #[test]
    fn debug_output_hides_secrets() {
        let budget = super::Budget {
            webhook_url: Some("https://hooks.example.com/x?token=hook-secret".into()),
            ..Default::default()
        };
        let state = super::StateSettings {
            backend: super::StateBackend::Redis,
            redis_url: Some("redis://:redis-secret@redis:6379".into()),
            deny_on_error: false,
        };
        let shown = format!("{budget:?} {state:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
