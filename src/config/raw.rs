//! The YAML file as written: serde structs that mirror SPEC §2 one to one.
//!
//! Every struct denies unknown keys (a typo must not silently disable a
//! limit). Leaves are [`Text`]: the scalar as written plus its position, so
//! that `${VAR}` expansion and unit parsing happen in `compile` and their
//! errors still point at `file:line:col`. Defaults live in `compile`, next to
//! the code that applies them, and so does the check of required keys: they
//! are `Option`s here, so that a missing one is reported with every other
//! error of the file rather than stopping serde at it.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_saphyr::Spanned;

/// A scalar leaf: strings, numbers and booleans are all kept as text so that
/// any of them may be written as `${VAR:-default}`. The text is exactly as
/// written: YAML's own typing would turn `off` into `false` and `1.10` into
/// `1.1`, changing header values and model names behind the user's back.
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_str(ScalarVisitor)
    }
}

/// A scalar and where it was written.
pub type Text = Spanned<Scalar>;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Proxy listener address. Default `0.0.0.0:8080`.
    pub listen: Option<Text>,
    /// Serve HTTPS on the proxy listener (h2 + http/1.1 by ALPN). `None`
    /// inside: `tls:` written with nothing under it (its files commented
    /// out), which must not quietly serve plain HTTP.
    #[serde(default, deserialize_with = "present")]
    pub tls: Option<Spanned<Option<RawTls>>>,
    pub admin: Option<RawAdmin>,
    pub limits: Option<RawLimits>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub pools: BTreeMap<String, Spanned<RawPool>>,
    pub auth: Option<RawAuth>,
    #[serde(default, deserialize_with = "entries_null_is_default")]
    pub tiers: BTreeMap<String, Spanned<RawTier>>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default, deserialize_with = "null_is_empty")]
    pub pricing: BTreeMap<String, Spanned<RawPrice>>,
    pub budget: Option<RawBudget>,
    pub cache: Option<RawCache>,
    pub state: Option<RawState>,
    pub logging: Option<RawLogging>,
}

/// A section that, written, is there even when null: `Some` whatever
/// its value.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A mapping section written with nothing under it (every entry
/// commented out) reads as empty, as the other sections' nulls do.
fn null_is_empty<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// A section that, written with nothing under it, is there with its
/// defaults (`cache:` on a route caches, as `cache: {}` does).
fn null_is_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d).map(|t| Some(t.unwrap_or_default()))
}

/// A map whose entries may be written with nothing under them (a tier
/// `free:` whose limits are all commented out: no limit, as `free: {}`).
fn entries_null_is_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<BTreeMap<String, Spanned<T>>, D::Error> {
    let entries = Option::<BTreeMap<String, Spanned<Option<T>>>>::deserialize(d)?;
    Ok(entries
        .unwrap_or_default()
        .into_iter()
        .map(|(name, e)| {
            let value = e.value.unwrap_or_default();
            (name, Spanned::new(value, e.referenced, e.defined))
        })
        .collect())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: Option<Text>,
    pub key_file: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`). Default `0.0.0.0:9090`.
    pub listen: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Default 4MiB; larger bodies get 413.
    pub max_request_body: Option<Text>,
    /// Default 256MiB: request bodies held whole in memory at once, all
    /// requests together; past it, 503.
    pub max_buffered_bytes: Option<Text>,
    /// Default 10s.
    pub header_read_timeout: Option<Text>,
    /// Default 300s, streaming included.
    pub request_timeout: Option<Text>,
    /// Default 10000.
    pub max_connections: Option<Text>,
    /// Default 30s.
    pub shutdown_grace: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `http://` or `https://` base URL. Exactly one of `url` and `mock`.
    pub url: Option<Text>,
    /// The built-in OpenAI-compatible mock, served in process.
    #[serde(default, deserialize_with = "null_is_default")]
    pub mock: Option<RawMock>,
    /// Headers replaced on the way to this upstream (its own credentials).
    #[serde(default)]
    pub set_headers: BTreeMap<String, Text>,
    pub timeouts: Option<RawTimeouts>,
    /// Rewrite of the JSON body's `model` for this upstream.
    #[serde(default)]
    pub models: BTreeMap<String, Text>,
    /// Extra PEM trust roots, on top of the public web roots.
    pub ca_file: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP (and TLS) connect. Default 5s.
    pub connect: Option<Text>,
    /// From sending the request to the response head. Default: `request_timeout`.
    pub first_byte: Option<Text>,
    /// Longest gap between two body chunks. Default 60s.
    pub idle: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMock {
    /// Delay before the response head. Default 0ms.
    pub latency: Option<Text>,
    /// Fraction of requests answered with `status`. Default 0.0.
    pub failure_rate: Option<Text>,
    /// Status of the injected failures. Default 500.
    pub status: Option<Text>,
    /// Content chunks of a streamed answer. Default: one per word.
    pub stream_chunks: Option<Text>,
    /// Pause between streamed chunks. Default 0ms.
    pub chunk_interval: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Upstream names in priority order (none is an error of `compile`).
    #[serde(default)]
    pub members: Vec<Text>,
    /// Default `[connect, timeout, 429, 500, 502, 503, 504]`.
    pub retry_on: Option<Vec<Text>>,
    /// Default: the number of members.
    pub max_attempts: Option<Text>,
    pub circuit_breaker: Option<RawBreaker>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// Consecutive failures that open the circuit. Default 5.
    pub failures: Option<Text>,
    /// How long it stays open. Default 30s.
    pub cooldown: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<Text>,
    /// Default 10s.
    pub interval: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(default, deserialize_with = "null_is_empty")]
    pub api_keys: Vec<Spanned<RawApiKey>>,
    pub jwt: Option<Spanned<RawJwt>>,
    /// Tier of identities without one. Default `free` when such a tier exists.
    pub default_tier: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub id: Option<Text>,
    /// The key itself (usually `${ENV}`). Exactly one of `key` and `hash`.
    pub key: Option<Text>,
    /// `sha256:<hex>` as printed by `sluice hash-key`.
    pub hash: Option<Text>,
    pub tier: Option<Text>,
    /// Route names this key may use; absent = all.
    pub routes: Option<Vec<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub issuer: Option<Text>,
    #[serde(default)]
    pub audiences: Vec<Text>,
    pub jwks_url: Option<Text>,
    pub keys_file: Option<Text>,
    pub hs256_secret: Option<Text>,
    pub algorithms: Option<Vec<Text>>,
    /// Default `sub`.
    pub identity_claim: Option<Text>,
    pub tier_claim: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub requests_per_minute: Option<Text>,
    pub tokens_per_minute: Option<Text>,
    pub concurrent_requests: Option<Text>,
    pub daily_budget_usd: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Text>,
    #[serde(rename = "match")]
    pub matcher: Option<RawMatch>,
    /// `required` (default) | `optional` | `none`.
    pub auth: Option<Text>,
    /// `none` (default) | `openai` | `{ schema_file: … }`.
    pub validate: Option<Spanned<RawValidate>>,
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub cache: Option<RawRouteCache>,
    pub cors: Option<Spanned<RawCors>>,
    /// An upstream or a pool name.
    pub upstream: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path_prefix: Option<Text>,
    pub path: Option<Text>,
    pub host: Option<Text>,
    pub methods: Option<Vec<Text>>,
}

impl RawMatch {
    /// A route with no `match` (an error of its own) compiles as if it
    /// matched everything, so that its other keys are still checked.
    pub const ANY: RawMatch = RawMatch {
        path_prefix: None,
        path: None,
        host: None,
        methods: None,
    };
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawValidate {
    Named(String),
    Schema(RawSchemaFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchemaFile {
    pub schema_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_minute: Option<Text>,
    pub tokens_per_minute: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    /// Default 5m.
    pub ttl: Option<Text>,
    /// `identity` (default) | `shared`.
    pub scope: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Required; optional here so that its absence is one error among
    /// the file's others, not the end of reading it.
    pub allow_origins: Option<Vec<Text>>,
    pub allow_methods: Option<Vec<Text>>,
    pub allow_headers: Option<Vec<Text>>,
    pub max_age: Option<Text>,
    pub allow_credentials: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// USD per million input tokens.
    pub input: Option<Text>,
    /// USD per million output tokens.
    pub output: Option<Text>,
    /// USD per million prompt tokens read from the provider's cache.
    pub cached_input: Option<Text>,
    /// USD per million prompt tokens written to it (Anthropic).
    pub cache_write: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub daily_usd: Option<Text>,
    pub alert_at: Option<Vec<Text>>,
    /// Default false.
    pub enforce: Option<Text>,
    pub webhook_url: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Default 256MiB.
    pub max_bytes: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// `memory` (default) | `redis`.
    pub backend: Option<Text>,
    pub redis_url: Option<Text>,
    /// `allow` (default) | `deny`.
    pub on_error: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    /// Default `info`.
    pub level: Option<Text>,
    /// `json` (default) | `text`.
    pub format: Option<Text>,
    /// Default false.
    pub log_bodies: Option<Text>,
}
