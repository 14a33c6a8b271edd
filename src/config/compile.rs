//! Raw YAML structs → [`Snapshot`]: expand `${VAR}`, parse units, apply
//! defaults, resolve names (routes → upstreams/pools, pools → upstreams,
//! keys → tiers) and build route matchers and upstream clients.
//!
//! Every problem is collected with its position instead of stopping at the
//! first, so `sluice check` shows them all at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde_saphyr::{Location, Spanned};

use super::error::ConfigError;
use super::expand::{expand, variable_values};
use super::raw::*;
use super::units::{parse_duration, parse_size};
use crate::proxy::jwt;
use crate::snapshot::*;
use crate::upstream::{self, MockSettings, Timeouts, Upstream};

/// The most connections a listener may hold: far above what one process
/// serves, and within what tokio's semaphore can count.
const MAX_CONNECTIONS_CAP: u64 = 10_000_000;

/// Compiles one parsed file. `base_dir` resolves relative file paths;
/// `env` looks up `${VAR}`s; `bound` are listeners already held (by the
/// running config a reload would replace).
pub fn compile(
    raw: RawConfig,
    file: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    bound: &[std::net::SocketAddr],
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut c = Compiler {
        file,
        base_dir,
        env,
        bound,
        errors: Vec::new(),
        warnings: Vec::new(),
        expansions: Vec::new(),
        secrets_written: Vec::new(),
        sources: Vec::new(),
    };
    let mut snapshot = c.config(raw);
    if c.errors.is_empty() {
        snapshot.warnings = c.warnings;
        snapshot.sources = c.sources;
        Ok(snapshot)
    } else {
        c.errors.sort_by_key(|e| (e.line, e.col));
        Err(c.errors)
    }
}

/// The tier of identities without one when `auth.default_tier` is not
/// set, if the config defines it.
const DEFAULT_TIER: &str = "free";

struct Compiler<'a> {
    file: &'a str,
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Listeners held already: a reload keeps them until a restart,
    /// whatever the new `listen` says.
    bound: &'a [std::net::SocketAddr],
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    /// What `${VAR}`s expanded to, and the text as written: messages
    /// quote the latter (see [`Compiler::as_written`]).
    expansions: Vec<(String, String)>,
    /// The secrets the file holds besides `set_headers`, for the body log
    /// to mask: API keys written as `key:`, the JWT `hs256_secret`, a
    /// Redis URL's password, the budget webhook URL (Slack's and most
    /// others carry their token in the path).
    secrets_written: Vec<String>,
    /// The files read besides the config (see [`Snapshot::sources`]).
    sources: Vec<PathBuf>,
}

const DEFAULT_RETRY_ON: [RetryOn; 7] = [
    RetryOn::Connect,
    RetryOn::Timeout,
    RetryOn::Status(429),
    RetryOn::Status(500),
    RetryOn::Status(502),
    RetryOn::Status(503),
    RetryOn::Status(504),
];

impl Compiler<'_> {
    fn error(&mut self, at: &Location, message: impl Into<String>) {
        let message = self.as_written(message.into());
        self.record(at, message);
    }

    /// Refuses a name that would label nothing: empty, blank, or holding
    /// a control character (a newline in a metric label or a log field).
    fn check_name(&mut self, what: &str, name: &str, at: &Location) {
        if name.trim().is_empty() {
            self.error(at, format!("{what} is empty"));
        } else if name.chars().any(char::is_control) {
            self.error(at, format!("{what} `{name}` holds a control character"));
        }
    }

    /// Records `message` as it is: [`Compiler::error`] without hiding
    /// what variables made.
    fn record(&mut self, at: &Location, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: at.line(),
            col: at.column(),
            message,
        });
    }

    /// `message` quoting values as written where a `${VAR}` made them: a
    /// variable may hold a secret, and config errors reach `check`'s
    /// output and the reload log. A quoted value (`` `…` ``) is put back
    /// whole; a long one (a key, a token) wherever it appears.
    fn as_written(&self, message: String) -> String {
        if self.expansions.is_empty() {
            return message;
        }
        // Values are read trimmed too: a file's value often ends in `\n`.
        let mut swaps: Vec<(String, String)> = Vec::new();
        for (value, written) in &self.expansions {
            for value in [value.as_str(), value.trim()] {
                swaps.push((format!("`{value}`"), format!("`{written}`")));
                if value.is_empty() {
                    continue;
                }
                if value.len() >= 8 {
                    swaps.push((value.to_owned(), written.clone()));
                }
            }
        }
        // Longest first, so a value inside another does not leave the rest
        // of the longer one showing; one pass, so what was put back (which
        // may hold its own default) is never replaced again.
        swaps.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        let mut out = String::with_capacity(message.len());
        let mut rest = message.as_str();
        'scan: while let Some(ch) = rest.chars().next() {
            for (value, written) in &swaps {
                if let Some(after) = rest.strip_prefix(value.as_str()) {
                    out.push_str(written);
                    rest = after;
                    continue 'scan;
                }
            }
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
        out
    }

    /// Something that works but that the operator should fix; `check`
    /// prints it and `run` logs it.
    fn warning(&mut self, at: &Location, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            file: self.file.to_owned(),
            line: at.line(),
            col: at.column(),
            message: format!("warning: {}", self.as_written(message.into())),
        });
    }

    /// A key the schema requires, or `None` after reporting it missing
    /// at `mapping` (where serde would have stopped at it).
    fn required<'t, T>(
        &mut self,
        value: &'t Option<T>,
        mapping: &Location,
        key: &str,
    ) -> Option<&'t T> {
        if value.is_none() {
            self.error(mapping, format!("missing field `{key}`"));
        }
        value.as_ref()
    }

    /// The expanded string, or `None` after recording why not.
    fn text(&mut self, t: &Text) -> Option<String> {
        self.expanded(&t.value.0, &t.referenced)
    }

    /// `raw` with its `${VAR}`s expanded; an error points at `at`.
    fn expanded(&mut self, raw: &str, at: &Location) -> Option<String> {
        match expand(raw, self.env) {
            Ok(s)
                if s.contains(char::REPLACEMENT_CHARACTER)
                    && !raw.contains(char::REPLACEMENT_CHARACTER) =>
            {
                // Named, as an unset one is (its value never shows).
                let named = std::cell::RefCell::new(None);
                let _ = expand(raw, |name| {
                    let value = (self.env)(name)?;
                    if value.contains(char::REPLACEMENT_CHARACTER) {
                        named.borrow_mut().get_or_insert_with(|| name.to_owned());
                    }
                    Some(value)
                });
                let message = match named.into_inner() {
                    Some(name) => {
                        format!("environment variable `{name}` holds bytes that are not UTF-8")
                    }
                    None => "an environment variable of this value holds bytes that are not UTF-8"
                        .to_owned(),
                };
                self.error(at, message);
                None
            }
            Ok(s) => {
                if s != raw {
                    self.expansions.push((s.clone(), raw.to_owned()));
                }
                Some(s)
            }
            Err(e) => {
                self.error(at, e);
                None
            }
        }
    }

    /// Expands then parses with `parse`; the error message names `what`.
    /// A value that variables made is quoted as written (`${PORT:-8080}`),
    /// never as made: a variable may hold a secret. The message says so,
    /// or a valid-looking default would read as the fault.
    fn parsed<T>(&mut self, t: &Text, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let s = self.text(t)?;
        match parse(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                let message = self.as_written(e);
                self.record_quoting(t, &s, message);
                None
            }
        }
    }

    /// Refuses a value that parsed but is out of range: `message` gets
    /// it as written in the file (`${RATE}`, never what the variable
    /// holds), with the same note as [`Compiler::parsed`]'s.
    fn out_of_range(&mut self, t: &Text, message: impl FnOnce(&str) -> String) {
        let message = message(&format!("`{}`", t.value.0.trim()));
        let made = expand(&t.value.0, self.env).unwrap_or_default();
        self.record_quoting(t, &made, message);
    }

    /// Records `message` about `t`, whose value `made` is, saying when
    /// variables made it: defaults are written in the file, so a value
    /// they alone made is shown whole; a variable's own value never is.
    fn record_quoting(&mut self, t: &Text, made: &str, mut message: String) {
        if expand(&t.value.0, |_| None).ok().as_deref() != Some(made) {
            message.push_str(" (as its variables made it; their values are not shown)");
        }
        self.record(&t.referenced, message);
    }

    fn duration(&mut self, t: &Option<Text>, default: Duration) -> Duration {
        t.as_ref()
            .and_then(|t| self.parsed(t, parse_duration))
            .unwrap_or(default)
    }

    fn opt_duration(&mut self, t: &Option<Text>) -> Option<Duration> {
        t.as_ref().and_then(|t| self.parsed(t, parse_duration))
    }

    fn size(&mut self, t: &Option<Text>, default: u64) -> u64 {
        t.as_ref()
            .and_then(|t| self.parsed(t, parse_size))
            .unwrap_or(default)
    }

    fn number<T: FromStr>(&mut self, t: &Text, what: &str) -> Option<T> {
        self.parsed(t, |s| {
            // `500_000` reads as YAML wrote it.
            let digits = s.trim().replace('_', "");
            digits.parse::<T>().map_err(|_| {
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    format!("`{s}` is too large here")
                } else {
                    format!("`{s}` is not {what}")
                }
            })
        })
    }

    fn opt_u64(&mut self, t: &Option<Text>) -> Option<u64> {
        t.as_ref()
            .and_then(|t| self.number(t, "a non-negative whole number"))
    }

    /// A limit: a whole number of at least 1. Zero is refused rather than
    /// guessed at: some read it as "no limit", others as "refuse all".
    fn opt_limit(&mut self, t: &Option<Text>) -> Option<u64> {
        let n = self.opt_u64(t)?;
        if n == 0 {
            if let Some(t) = t {
                self.error(
                    &t.referenced,
                    "a limit must be at least 1 (leave it out for no limit)",
                );
            }
            return None;
        }
        if n > MAX_PER_MINUTE {
            if let Some(t) = t {
                self.error(
                    &t.referenced,
                    format!("a limit must be at most {MAX_PER_MINUTE} (leave it out for no limit)"),
                );
            }
            return None;
        }
        Some(n)
    }

    /// A duration that must be above zero: zero would fail (or spin)
    /// every time it is used.
    fn positive_duration(&mut self, t: &Option<Text>, default: Duration, name: &str) -> Duration {
        let d = self.duration(t, default);
        if let (true, Some(t)) = (d.is_zero(), t) {
            self.error(&t.referenced, format!("{name} must be above 0"));
        }
        d
    }

    /// A daily budget: above zero (left out, there is none; zero reads
    /// both ways, as a limit of 0 does).
    fn budget_usd(&mut self, t: &Option<Text>, name: &str) -> Option<f64> {
        let v = self.opt_usd(t)?;
        if v == 0.0
            && let Some(t) = t
        {
            self.error(
                &t.referenced,
                format!("{name} must be above 0 (leave it out for no budget)"),
            );
        }
        Some(v)
    }

    fn opt_usd(&mut self, t: &Option<Text>) -> Option<f64> {
        let t = t.as_ref()?;
        let v: f64 = self.number(t, "a number")?;
        if v.is_finite() && (0.0..=MAX_USD).contains(&v) {
            Some(v)
        } else {
            self.out_of_range(t, |written| {
                format!("{written} must be a non-negative amount of at most {MAX_USD} USD")
            });
            None
        }
    }

    fn bool(&mut self, t: &Option<Text>, default: bool) -> bool {
        t.as_ref()
            .and_then(|t| {
                self.parsed(t, |s| match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "yes" | "on" => Ok(true),
                    "false" | "no" | "off" => Ok(false),
                    _ => Err(format!("`{s}` is not true or false (or yes/no, on/off)")),
                })
            })
            .unwrap_or(default)
    }

    /// One of a fixed set of words.
    fn choice<T: Copy>(&mut self, t: &Option<Text>, options: &[(&str, T)], default: T) -> T {
        let Some(t) = t else { return default };
        self.parsed(t, |s| match options.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Ok(*v),
            None => {
                let names: Vec<_> = options.iter().map(|(n, _)| *n).collect();
                Err(format!("`{s}` is not one of: {}", names.join(", ")))
            }
        })
        .unwrap_or(default)
    }

    fn addr(&mut self, t: &Option<Text>, default: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([0, 0, 0, 0], 0));
        match t {
            None => default.parse().unwrap_or(fallback),
            Some(t) => self
                .parsed(t, |s| {
                    s.parse::<SocketAddr>().map_err(|_| {
                        format!("`{s}` is not a listen address like 0.0.0.0:8080 or [::]:8080")
                    })
                })
                .unwrap_or(fallback),
        }
    }

    fn path(&mut self, t: &Text) -> Option<PathBuf> {
        let s = self.text(t)?;
        if s.trim().is_empty() {
            // Joined to the config's directory, it would name that
            // directory, and the error would say so instead.
            self.error(&t.referenced, "the file path is empty");
            return None;
        }
        Some(self.base_dir.join(s))
    }

    /// The path of a file the config reads its contents from.
    fn source(&mut self, t: &Text) -> Option<PathBuf> {
        let path = self.path(t)?;
        Some(self.add_source(path))
    }

    fn add_source(&mut self, path: PathBuf) -> PathBuf {
        self.sources.push(path.clone());
        path
    }

    fn config(&mut self, raw: RawConfig) -> Snapshot {
        let listen = self.addr(&raw.listen, "0.0.0.0:8080");
        let admin_listen = match &raw.admin {
            Some(a) => self.addr(&a.listen, "0.0.0.0:9090"),
            None => self.addr(&None, "0.0.0.0:9090"),
        };
        // An unspecified address takes the port on every address of its
        // family, and `[::]` (dual-stack on Linux) on IPv4's too; an
        // IPv4-mapped address (`[::ffff:127.0.0.1]`) is that IPv4 one.
        let covers = |a: std::net::IpAddr, b: std::net::IpAddr| {
            let (a, b) = (a.to_canonical(), b.to_canonical());
            a == b || (a.is_unspecified() && (a.is_ipv6() || b.is_ipv4()))
        };
        let clash = listen.port() == admin_listen.port()
            && listen.port() != 0
            && (covers(listen.ip(), admin_listen.ip()) || covers(admin_listen.ip(), listen.ip()));
        if clash {
            // `run` would fail to bind the second; say so in `check`.
            let at = raw
                .admin
                .as_ref()
                .and_then(|a| a.listen.as_ref())
                .or(raw.listen.as_ref())
                .map_or(Location::UNKNOWN, |t| t.referenced);
            // Each as written (a `${VAR}` stays one), not by the values
            // `error` would put back wherever they show.
            let written = |t: Option<&Text>, made: std::net::SocketAddr| {
                t.map_or_else(|| made.to_string(), |t| t.value.0.trim().to_owned())
            };
            let admin_written = written(
                raw.admin.as_ref().and_then(|a| a.listen.as_ref()),
                admin_listen,
            );
            let listen_written = written(raw.listen.as_ref(), listen);
            self.record(
                &at,
                format!("admin.listen {admin_written} and listen {listen_written} share a port; give each its own"),
            );
        }
        let tls = raw.tls.as_ref().and_then(|spanned| {
            let Some(tls) = spanned.value.as_ref() else {
                self.error(
                    &spanned.referenced,
                    "tls is empty: give it cert_file and key_file, or remove it to serve plain HTTP",
                );
                return None;
            };
            let cert = self.required(&tls.cert_file, &spanned.referenced, "cert_file");
            let key = self.required(&tls.key_file, &spanned.referenced, "key_file");
            let (cert, key) = (cert?, key?);
            let files = TlsFiles {
                cert_file: self.path(cert)?,
                key_file: self.path(key)?,
            };
            // Read now, so that `check` refuses what `run` would.
            if let Err((e, key_at_fault)) = crate::server::tls::check_pair(&files) {
                let at = if key_at_fault { key } else { cert };
                self.error(&at.referenced, e);
            } else if let Some(not_after) = crate::server::tls::files_not_after(&files)
                && let Some(warning) = crate::server::tls::expiry_warning(
                    crate::server::tls::at_unix(not_after),
                    std::time::SystemTime::now(),
                )
            {
                self.warning(&cert.referenced, warning);
            }
            Some(files)
        });
        let limits = self.limits(raw.limits.as_ref());
        let upstreams = self.upstreams(&raw.upstreams, &limits);
        for upstream in &upstreams {
            if let crate::upstream::UpstreamKind::Http(http) = &upstream.kind
                && [listen, admin_listen]
                    .iter()
                    .chain(self.bound)
                    .any(|&at| http.is_at(at))
                && let Some(url) = raw
                    .upstreams
                    .get(&*upstream.name)
                    .and_then(|u| u.value.url.as_ref())
            {
                self.error(
                    &url.referenced,
                    format!(
                        "upstream `{}` is sluice itself (it listens there): its requests would loop",
                        upstream.name
                    ),
                );
            }
        }
        let upstream_index: HashMap<&str, usize> = raw
            .upstreams
            .keys()
            .enumerate()
            .map(|(i, name)| (name.as_str(), i))
            .collect();
        let pools = self.pools(&raw.pools, &upstream_index);
        let pool_index: HashMap<&str, usize> = raw
            .pools
            .keys()
            .enumerate()
            .map(|(i, name)| (name.as_str(), i))
            .collect();
        for (name, pool) in &raw.pools {
            if upstream_index.contains_key(name.as_str()) {
                self.error(
                    &pool.referenced,
                    format!("pool `{name}` has the name of an upstream; names must be unique"),
                );
            }
        }
        let tiers = self.tiers(&raw.tiers);
        if raw.routes.is_empty() {
            // An empty or truncated file (a ConfigMap gone wrong) must not
            // start a gateway that answers 404 to everything.
            self.errors.push(ConfigError {
                file: self.file.to_owned(),
                line: 1,
                col: 1,
                message: "no routes: add at least one under `routes:`".to_owned(),
            });
        }
        let routes = self.routes(&raw.routes, &upstream_index, &pool_index);
        let route_names: HashSet<&str> = routes.iter().map(|r| &*r.name).collect();
        let auth = self.auth(raw.auth.as_ref(), &tiers, &route_names);
        self.check_tiers_given(&raw, &auth);
        let pricing = self.pricing(&raw.pricing);
        let budget = self.budget(raw.budget.as_ref());
        self.check_budget_use(&raw, &budget, &tiers);
        let cache_max_bytes = raw.cache.as_ref().and_then(|c| c.max_bytes.clone());
        let cache = CacheSettings {
            max_bytes: self.size(&cache_max_bytes, 256 << 20),
        };
        if cache.max_bytes == 0
            && let Some(t) = &cache_max_bytes
        {
            // It would turn every route's cache off without a word.
            self.error(
                &t.referenced,
                "cache.max_bytes must be above 0 (to cache nothing, leave `cache` out of the routes)",
            );
        }
        let state = self.state(raw.state.as_ref());
        let mut logging = self.logging(raw.logging.as_ref());
        if logging.log_bodies {
            logging.known_secrets = self.known_secrets(&upstreams);
        }
        Snapshot {
            warnings: Vec::new(),
            sources: Vec::new(),
            listen,
            tls,
            admin_listen,
            limits,
            upstreams,
            pools,
            routes,
            auth,
            tiers,
            pricing,
            budget,
            cache,
            state,
            logging,
        }
    }

    fn limits(&mut self, raw: Option<&RawLimits>) -> Limits {
        let none = RawLimits {
            max_request_body: None,
            max_buffered_bytes: None,
            header_read_timeout: None,
            request_timeout: None,
            max_connections: None,
            shutdown_grace: None,
        };
        let raw = raw.unwrap_or(&none);
        let max_connections = self.opt_u64(&raw.max_connections).unwrap_or(10_000);
        if let Some(t) = &raw.max_connections
            && !(1..=MAX_CONNECTIONS_CAP).contains(&max_connections)
        {
            self.error(
                &t.referenced,
                format!("max_connections must be from 1 to {MAX_CONNECTIONS_CAP}"),
            );
        }
        // Zero would refuse every client (or, for header_read_timeout,
        // leave the keep-alive and quiet-h2 timers spinning).
        let above_zero = |me: &mut Self, t: &Option<Text>, default: Duration, name: &str| {
            me.positive_duration(t, default, name)
        };
        let max_request_body = self.size(&raw.max_request_body, 4 << 20);
        if max_request_body == 0
            && let Some(t) = &raw.max_request_body
        {
            // Every request with a body would be a 413.
            self.error(&t.referenced, "max_request_body must be above 0");
        }
        // Never below one body at the limit, whatever the default.
        let max_buffered_bytes =
            self.size(&raw.max_buffered_bytes, max_request_body.max(256 << 20));
        if let Some(t) = &raw.max_buffered_bytes
            && max_buffered_bytes < max_request_body
        {
            self.error(
                &t.referenced,
                format!(
                    "max_buffered_bytes ({max_buffered_bytes} bytes) is below max_request_body ({max_request_body} bytes): one body at the limit would be refused"
                ),
            );
        }
        Limits {
            max_request_body,
            max_buffered_bytes,
            header_read_timeout: above_zero(
                self,
                &raw.header_read_timeout,
                Duration::from_secs(10),
                "header_read_timeout",
            ),
            request_timeout: above_zero(
                self,
                &raw.request_timeout,
                Duration::from_secs(300),
                "request_timeout",
            ),
            max_connections: usize::try_from(max_connections.clamp(1, MAX_CONNECTIONS_CAP))
                .unwrap_or(10_000),
            shutdown_grace: self.duration(&raw.shutdown_grace, Duration::from_secs(30)),
        }
    }

    fn upstreams(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawUpstream>>,
        limits: &Limits,
    ) -> Vec<Arc<Upstream>> {
        let mut out = Vec::with_capacity(raw.len());
        for (name, spanned) in raw {
            let u = &spanned.value;
            let at = &spanned.referenced;
            self.check_name("upstream name", name, at);
            let timeouts = match &u.timeouts {
                // Zero would time out every request.
                Some(t) => Timeouts {
                    connect: self.positive_duration(
                        &t.connect,
                        Duration::from_secs(5),
                        "timeouts.connect",
                    ),
                    first_byte: self.positive_duration(
                        &t.first_byte,
                        limits.request_timeout,
                        "timeouts.first_byte",
                    ),
                    idle: self.positive_duration(&t.idle, Duration::from_secs(60), "timeouts.idle"),
                },
                None => Timeouts {
                    connect: Duration::from_secs(5),
                    first_byte: limits.request_timeout,
                    idle: Duration::from_secs(60),
                },
            };
            let set_headers = self.set_headers(name, &u.set_headers);
            let models = u
                .models
                .iter()
                .filter_map(|(from, to)| Some((from.clone(), self.text(to)?)))
                .collect();
            let kind = match (&u.url, &u.mock) {
                (Some(url), None) => {
                    let ca_pem = match &u.ca_file {
                        Some(ca) => self.source(ca).and_then(|p| match super::read_file(&p) {
                            Ok(pem) => Some((pem, ca.referenced)),
                            Err(e) => {
                                self.error(
                                    &ca.referenced,
                                    format!("cannot read ca_file {}: {e}", p.display()),
                                );
                                None
                            }
                        }),
                        None => None,
                    };
                    let Some(url_text) = self.text(url) else {
                        continue;
                    };
                    self.secrets_written.extend(url_secrets(
                        &url_text,
                        variable_values(&url.value.0, self.env),
                    ));
                    match upstream::HttpUpstream::new(
                        &url_text,
                        ca_pem.as_ref().map(|(pem, _)| pem.as_slice()),
                        timeouts.connect,
                    ) {
                        Ok(mut http) => {
                            // `set_headers` may name the host (a virtual
                            // host at an address): then it is the one sent.
                            if set_headers.iter().any(|set| set.name == http::header::HOST) {
                                http.host = None;
                            }
                            upstream::UpstreamKind::Http(Box::new(http))
                        }
                        Err(upstream::BuildError::Url(e)) => {
                            // The message quotes the URL, and a `${VAR}` in it
                            // may carry a credential (`?key=…`, `user:pass@`):
                            // quote it as written, never as expanded.
                            let written = upstream::without_secrets(&url.value.0);
                            let shown = upstream::without_secrets(&url_text);
                            let e = e.replace(&format!("`{shown}`"), &format!("`{written}`"));
                            self.error(&url.referenced, e);
                            continue;
                        }
                        Err(upstream::BuildError::Ca(e)) => {
                            let loc = ca_pem.map(|(_, l)| l).unwrap_or(url.referenced);
                            self.error(&loc, e);
                            continue;
                        }
                    }
                }
                (None, Some(mock)) => {
                    if let Some(ca) = &u.ca_file {
                        self.error(&ca.referenced, "ca_file has no meaning on a mock upstream");
                    }
                    upstream::UpstreamKind::Mock(self.mock(mock))
                }
                (Some(_), Some(_)) => {
                    self.error(
                        at,
                        format!("upstream `{name}` has both `url` and `mock`; choose one"),
                    );
                    continue;
                }
                (None, None) => {
                    self.error(at, format!("upstream `{name}` needs a `url` or a `mock`"));
                    continue;
                }
            };
            out.push(Arc::new(Upstream {
                name: Arc::from(name.as_str()),
                kind,
                set_headers,
                timeouts,
                models,
            }));
        }
        out
    }

    fn set_headers(&mut self, upstream: &str, raw: &BTreeMap<String, Text>) -> Vec<SetHeader> {
        let mut out: Vec<SetHeader> = Vec::with_capacity(raw.len());
        for (name, value) in raw {
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                self.error(
                    &value.referenced,
                    format!("upstream `{upstream}`: `{name}` is not a valid header name"),
                );
                continue;
            };
            if let Some(why) = not_settable(&header) {
                self.error(
                    &value.referenced,
                    format!("upstream `{upstream}`: set_headers cannot set `{header}`: {why}"),
                );
                continue;
            }
            if out.iter().any(|set| set.name == header) {
                self.error(
                    &value.referenced,
                    format!(
                        "upstream `{upstream}`: set_headers names `{header}` twice (names are case-insensitive)"
                    ),
                );
                continue;
            }
            let Some(text) = self.text(value) else {
                continue;
            };
            self.secrets_written
                .extend(variable_values(&value.value.0, self.env));
            // The value is usually a secret: the message never repeats it.
            match HeaderValue::from_str(&text) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    out.push(SetHeader {
                        name: header,
                        value: v,
                    });
                }
                Err(_) => self.error(
                    &value.referenced,
                    format!(
                        "upstream `{upstream}`: the value of set_headers.{name} is not a valid header value"
                    ),
                ),
            }
        }
        out
    }

    fn mock(&mut self, raw: &RawMock) -> MockSettings {
        let failure_rate = match &raw.failure_rate {
            Some(t) => match self.number::<f64>(t, "a number between 0.0 and 1.0") {
                Some(r) if (0.0..=1.0).contains(&r) => r,
                Some(_) => {
                    self.out_of_range(t, |r| {
                        format!("failure_rate {r} is not between 0.0 and 1.0")
                    });
                    0.0
                }
                None => 0.0,
            },
            None => 0.0,
        };
        let status = match &raw.status {
            Some(t) => match self.number::<u16>(t, "an HTTP status") {
                Some(s) if (400..=599).contains(&s) => s,
                Some(_) => {
                    self.out_of_range(t, |s| {
                        format!("{s} is not an HTTP error status (400-599), as an injected failure answers")
                    });
                    500
                }
                None => 500,
            },
            None => 500,
        };
        MockSettings {
            latency: self.duration(&raw.latency, Duration::ZERO),
            failure_rate,
            failure_status: status,
            stream_chunks: raw.stream_chunks.as_ref().and_then(|t| {
                let n = self.number::<u32>(t, "a whole number")?;
                if n == 0 {
                    self.error(&t.referenced, "stream_chunks must be at least 1");
                }
                Some(n).filter(|n| *n > 0)
            }),
            chunk_interval: self.duration(&raw.chunk_interval, Duration::ZERO),
        }
    }

    fn pools(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawPool>>,
        upstream_index: &HashMap<&str, usize>,
    ) -> Vec<Pool> {
        let mut out = Vec::with_capacity(raw.len());
        for (name, spanned) in raw {
            self.check_name("pool name", name, &spanned.referenced);
            let p = &spanned.value;
            let mut members = Vec::with_capacity(p.members.len());
            for m in &p.members {
                let Some(member) = self.text(m) else { continue };
                match upstream_index.get(member.as_str()) {
                    Some(i) if members.contains(i) => self.error(
                        &m.referenced,
                        format!("pool `{name}` lists `{member}` twice"),
                    ),
                    Some(i) => members.push(*i),
                    None => self.error(
                        &m.referenced,
                        format!("pool `{name}`: no upstream named `{member}`"),
                    ),
                }
            }
            if p.members.is_empty() {
                self.error(&spanned.referenced, format!("pool `{name}` has no members"));
            }
            let retry_on = match &p.retry_on {
                None => DEFAULT_RETRY_ON.to_vec(),
                Some(list) => {
                    let mut retry_on = Vec::with_capacity(list.len());
                    for t in list {
                        let Some(condition) = self.parsed(t, |s| match s {
                            "connect" => Ok(RetryOn::Connect),
                            "timeout" => Ok(RetryOn::Timeout),
                            other => match other.parse::<u16>() {
                                Ok(code) if (400..=599).contains(&code) => Ok(RetryOn::Status(code)),
                                _ => Err(format!(
                                    "`{other}` is not connect, timeout or an HTTP error status (400-599)"
                                )),
                            },
                        }) else {
                            continue;
                        };
                        if retry_on.contains(&condition) {
                            self.out_of_range(t, |f| format!("retry_on lists {f} twice"));
                        }
                        retry_on.push(condition);
                    }
                    retry_on
                }
            };
            let max_attempts = match &p.max_attempts {
                Some(t) => match self.number::<u32>(t, "a whole number") {
                    Some(0) => {
                        self.error(&t.referenced, "max_attempts must be at least 1");
                        1
                    }
                    Some(n) => n,
                    None => 1,
                },
                None => u32::try_from(p.members.len().max(1)).unwrap_or(u32::MAX),
            };
            let (breaker_failures, breaker_cooldown) = match &p.circuit_breaker {
                Some(b) => (
                    match &b.failures {
                        Some(t) => match self.number::<u32>(t, "a whole number") {
                            Some(0) => {
                                self.error(
                                    &t.referenced,
                                    "circuit_breaker.failures must be at least 1",
                                );
                                1
                            }
                            Some(n) => n,
                            None => 5,
                        },
                        None => 5,
                    },
                    self.duration(&b.cooldown, Duration::from_secs(30)),
                ),
                None => (5, Duration::from_secs(30)),
            };
            let health_check = p.health_check.as_ref().and_then(|h| {
                // The interval first: its error is reported whatever the path's.
                let interval = self.duration(&h.value.interval, Duration::from_secs(10));
                if interval < Duration::from_millis(50)
                    && let Some(t) = &h.value.interval
                {
                    // Below it (`1ms` for `1s`?), probes hammer the members.
                    self.error(&t.referenced, "health_check.interval must be at least 50ms");
                }
                let written = self.required(&h.value.path, &h.referenced, "path")?;
                let path = self.text(written)?;
                if !path.starts_with('/') {
                    self.error(&written.referenced, "health_check.path must start with /");
                }
                Some(HealthCheck { path, interval })
            });
            out.push(Pool {
                name: Arc::from(name.as_str()),
                members,
                retry_on,
                max_attempts,
                breaker_failures,
                breaker_cooldown,
                health_check,
            });
        }
        out
    }

    fn tiers(&mut self, raw: &BTreeMap<String, Spanned<RawTier>>) -> HashMap<Arc<str>, Tier> {
        raw.iter()
            .map(|(name, spanned)| {
                self.check_name("tier name", name, &spanned.referenced);
                if name == crate::telemetry::metrics::UNNAMED {
                    self.error(
                        &spanned.referenced,
                        "tier name `none` is reserved: the metrics label identities without a tier `tier=\"none\"`",
                    );
                }
                let t = &spanned.value;
                let tier = Tier {
                    requests_per_minute: self.opt_limit(&t.requests_per_minute),
                    tokens_per_minute: self.opt_limit(&t.tokens_per_minute),
                    concurrent_requests: self.opt_limit(&t.concurrent_requests),
                    daily_budget_usd: self.budget_usd(&t.daily_budget_usd, "daily_budget_usd"),
                };
                (Arc::from(name.as_str()), tier)
            })
            .collect()
    }

    fn routes(
        &mut self,
        raw: &[Spanned<RawRoute>],
        upstream_index: &HashMap<&str, usize>,
        pool_index: &HashMap<&str, usize>,
    ) -> Vec<Route> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for spanned in raw {
            let r = &spanned.value;
            let at = &spanned.referenced;
            // A missing key is reported and the route still compiled from
            // the rest, so that its other keys are checked too and its
            // name stays known to the api keys that list it.
            let written_name = self.required(&r.name, at, "name");
            let matcher = self.required(&r.matcher, at, "match");
            let matcher = matcher.unwrap_or(&RawMatch::ANY);
            let upstream = self.required(&r.upstream, at, "upstream");
            let errors_before = self.errors.len();
            let name = written_name.and_then(|n| self.text(n)).unwrap_or_default();
            // A name whose variables failed is reported already.
            if let Some(written) = written_name
                && self.errors.len() == errors_before
            {
                self.check_name("route name", &name, &written.referenced);
            }
            if let Some(written) = written_name
                && !seen.insert(name.clone())
            {
                self.error(
                    &written.referenced,
                    format!("route name `{name}` is used twice"),
                );
            }
            if let Some(written) = written_name
                && name == crate::telemetry::metrics::UNNAMED
            {
                self.error(
                    &written.referenced,
                    "route name `none` is reserved: the metrics label requests that match no route `route=\"none\"`",
                );
            }
            let unmatchable = |s: &str| {
                s.chars().find(|c| {
                    matches!(c, '?' | '#') || c.is_whitespace() || c.is_control() || !c.is_ascii()
                })
            };
            for (key, written) in [
                ("path_prefix", &matcher.path_prefix),
                ("path", &matcher.path),
            ] {
                if let Some(t) = written
                    && let Some(c) = self.text(t).as_deref().and_then(unmatchable)
                {
                    // Quoted only as the file writes it: a variable's
                    // value is never shown.
                    let what = if t.value.0.contains(c) {
                        format!("{c:?}")
                    } else {
                        "a character (from a variable)".to_owned()
                    };
                    self.error(
                        &t.referenced,
                        format!(
                            "{key} holds {what}, which no request path does (a query is not part of it; spaces and letters beyond ASCII come percent-encoded, as `%20`, `%C3%BC`): the route would never match"
                        ),
                    );
                }
            }
            let path = match (&matcher.path_prefix, &matcher.path) {
                (Some(_), Some(p)) => {
                    self.error(
                        &p.referenced,
                        "a route matches `path` or `path_prefix`, not both",
                    );
                    PathMatch::Any
                }
                (Some(p), None) => match self.text(p) {
                    // In the normal form request paths are matched in.
                    Some(s) if s.starts_with('/') => {
                        PathMatch::Prefix(crate::proxy::route::normalized(&s).unwrap_or(s))
                    }
                    Some(_) => {
                        self.error(&p.referenced, "path_prefix must start with /");
                        PathMatch::Any
                    }
                    None => PathMatch::Any,
                },
                (None, Some(p)) => match self.text(p) {
                    Some(s) if s.starts_with('/') => {
                        PathMatch::Exact(crate::proxy::route::normalized(&s).unwrap_or(s))
                    }
                    Some(_) => {
                        self.error(&p.referenced, "path must start with /");
                        PathMatch::Any
                    }
                    None => PathMatch::Any,
                },
                (None, None) => PathMatch::Any,
            };
            let host = matcher.host.as_ref().and_then(|h| {
                let text = self.text(h)?;
                match route_host(&text) {
                    Ok(host) => Some(host),
                    Err(e) => {
                        self.error(&h.referenced, e);
                        None
                    }
                }
            });
            if matcher.methods.as_ref().is_some_and(Vec::is_empty) {
                self.error(
                    at,
                    "match: methods is empty, so no request could match this route; list the methods, or leave methods out to match every method",
                );
            }
            let mut methods = Vec::new();
            for m in matcher.methods.iter().flatten() {
                if let Some(method) = self.parsed(m, |s| {
                    let upper = s.to_ascii_uppercase();
                    Method::from_bytes(upper.as_bytes())
                        .map_err(|_| format!("`{s}` is not an HTTP method"))
                }) {
                    if methods.contains(&method) {
                        self.out_of_range(m, |f| format!("methods lists {f} twice"));
                    }
                    methods.push(method);
                }
            }
            let allow = allow_header(&methods, r.cors.is_some());
            let auth = self.choice(
                &r.auth,
                &[
                    ("required", AuthMode::Required),
                    ("optional", AuthMode::Optional),
                    ("none", AuthMode::None),
                ],
                AuthMode::Required,
            );
            let validate = match &r.validate {
                None => Validate::None,
                Some(v) => match &v.value {
                    RawValidate::Named(written) => {
                        match self.expanded(written, &v.referenced).as_deref() {
                            Some("none") | None => Validate::None,
                            Some("openai") => Validate::OpenAi,
                            Some(name) => {
                                let message = format!(
                                    "`{name}` is not one of: none, openai, {{ schema_file: … }}"
                                );
                                self.error(&v.referenced, message);
                                Validate::None
                            }
                        }
                    }
                    RawValidate::Schema(s) => match self.expanded(&s.schema_file, &v.referenced) {
                        Some(file) => match load_schema(&self.add_source(self.base_dir.join(file)))
                        {
                            Ok(validator) => Validate::Schema(Arc::new(validator)),
                            Err(message) => {
                                self.error(&v.referenced, message);
                                Validate::None
                            }
                        },
                        None => Validate::None,
                    },
                },
            };
            let rate_limit = r
                .rate_limit
                .as_ref()
                .map(|rl| RouteRateLimit {
                    requests_per_minute: self.opt_limit(&rl.requests_per_minute),
                    tokens_per_minute: self.opt_limit(&rl.tokens_per_minute),
                })
                .unwrap_or_default();
            let cache = r.cache.as_ref().map(|c| RouteCache {
                // Zero stores nothing, and identical requests would wait
                // on each other for nothing.
                ttl: self.positive_duration(&c.ttl, Duration::from_secs(300), "cache.ttl"),
                scope: self.choice(
                    &c.scope,
                    &[
                        ("identity", CacheScope::Identity),
                        ("shared", CacheScope::Shared),
                    ],
                    CacheScope::Identity,
                ),
            });
            let cors = r.cors.as_ref().map(|c| self.cors(c, &methods));
            // `None` when its variables failed (already reported): no
            // second error about an upstream named ``.
            let expanded = upstream.and_then(|u| self.text(u));
            let target_name = expanded.clone().unwrap_or_default();
            let target = match (
                upstream_index.get(target_name.as_str()),
                pool_index.get(target_name.as_str()),
            ) {
                (Some(i), _) => Target::Upstream(*i),
                (None, Some(i)) => Target::Pool(*i),
                (None, None) => {
                    if let Some(upstream) = upstream
                        && expanded.is_some()
                    {
                        self.error(
                            &upstream.referenced,
                            format!("route `{name}`: no upstream or pool named `{target_name}`"),
                        );
                    }
                    Target::Upstream(0)
                }
            };
            out.push(Route {
                name: Arc::from(name),
                path,
                host,
                methods,
                allow,
                auth,
                validate,
                rate_limit,
                cache,
                cors,
                target,
            });
            let this = out.len() - 1;
            if let Some(earlier) = out[..this].iter().find(|e| covers(e, &out[this])) {
                let message = format!(
                    "route `{}` is never reached: route `{}` before it takes every request it would (the first route that matches wins); move it above `{}`",
                    out[this].name, earlier.name, earlier.name
                );
                self.warning(at, message);
            }
        }
        out
    }

    /// `methods`: the route's own, which a preflight is told by default.
    fn cors(&mut self, spanned: &Spanned<RawCors>, methods: &[Method]) -> Cors {
        let c = &spanned.value;
        let at = &spanned.referenced;
        let written_origins = self.required(&c.allow_origins, at, "allow_origins");
        let written_origins: &[Text] = written_origins.map_or(&[], Vec::as_slice);
        if c.allow_origins.as_ref().is_some_and(Vec::is_empty) {
            self.error(
                at,
                "cors: allow_origins is empty, so no browser could call this route; list the origins, or leave cors out",
            );
        }
        // Each is a token (RFC 9110 §5.6.2), as methods and header names
        // are: anything else would never match a preflight, silently.
        let list = |me: &mut Self,
                    l: &Option<Vec<Text>>,
                    default: &[&str],
                    (what, valid): (&str, fn(&[u8]) -> bool)|
         -> Vec<String> {
            match l {
                Some(l) => l
                    .iter()
                    .filter_map(|t| {
                        let item = me.text(t)?;
                        if !valid(item.trim().as_bytes()) {
                            me.error(&t.referenced, format!("cors: `{item}` is not {what}"));
                            return None;
                        }
                        Some(item.trim().to_owned())
                    })
                    .collect(),
                None => default.iter().map(|s| (*s).to_owned()).collect(),
            }
        };
        let allow_credentials = self.bool(&c.allow_credentials, false);
        let mut allow_origins = Vec::with_capacity(written_origins.len());
        for written in written_origins {
            let Some(origin) = self.text(written) else {
                continue;
            };
            let mut origin = origin.trim().to_owned();
            if origin.is_empty() {
                // `${DEV_ORIGIN:-}` unset: no origin, as the list reads.
                continue;
            }
            // Browsers leave the scheme's default port out of `origin`:
            // written in, it would never match.
            for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
                let has_scheme = origin
                    .get(..scheme.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(scheme));
                if has_scheme && origin.ends_with(port) {
                    origin.truncate(origin.len() - port.len());
                }
            }
            if origin == "*" {
                if allow_credentials {
                    self.error(
                        &written.referenced,
                        "cors: allow_origins \"*\" cannot be combined with allow_credentials: true (any site could call with the user's credentials); list the origins",
                    );
                }
            } else if !is_origin_pattern(&origin) {
                // A browser's `origin` is exactly scheme://host[:port]:
                // anything else would never match, and silently so.
                self.error(
                    &written.referenced,
                    "cors: each of allow_origins is \"*\", an origin as browsers send it, scheme://host[:port] (like https://app.example.com), with no path or final slash, or one whose host starts with `*.` for the names under a domain (https://*.example.com)",
                );
            }
            allow_origins.push(origin);
        }
        Cors {
            allow_origins,
            allow_methods: match (&c.allow_methods, methods) {
                // A route limited to some methods offers those.
                (None, [_, ..]) => {
                    let mut offered: Vec<String> = Vec::with_capacity(methods.len() + 1);
                    for method in methods.iter().chain([&Method::OPTIONS]) {
                        if !offered.iter().any(|m| m == method.as_str()) {
                            offered.push(method.as_str().to_owned());
                        }
                    }
                    offered
                }
                (written, _) => list(
                    self,
                    written,
                    &["GET", "POST", "OPTIONS"],
                    ("an HTTP method", |b| Method::from_bytes(b).is_ok()),
                ),
            },
            // Unset, a preflight's own list is echoed: browser SDKs send
            // headers of their own (the OpenAI SDK's `x-stainless-*`,
            // `openai-beta`…) that no fixed default would keep up with.
            allow_headers: c.allow_headers.is_some().then(|| {
                list(
                    self,
                    &c.allow_headers,
                    &[],
                    ("a header name", |b| HeaderName::from_bytes(b).is_ok()),
                )
            }),
            max_age: self.opt_duration(&c.max_age),
            allow_credentials,
        }
    }

    fn auth(
        &mut self,
        raw: Option<&RawAuth>,
        tiers: &HashMap<Arc<str>, Tier>,
        route_names: &HashSet<&str>,
    ) -> Auth {
        let Some(raw) = raw else {
            return Auth {
                default_tier: tiers.get_key_value(DEFAULT_TIER).map(|(k, _)| k.clone()),
                anonymous_tier: Arc::from("anonymous"),
                ..Auth::default()
            };
        };
        let tier_ref = |me: &mut Self, t: &Text| -> Option<Arc<str>> {
            let name = me.text(t)?;
            match tiers.get_key_value(name.as_str()) {
                Some((k, _)) => Some(k.clone()),
                None => {
                    me.error(
                        &t.referenced,
                        format!("no tier named `{name}` under `tiers`"),
                    );
                    None
                }
            }
        };
        let default_tier = match &raw.default_tier {
            Some(t) => tier_ref(self, t),
            None => tiers.get_key_value(DEFAULT_TIER).map(|(k, _)| k.clone()),
        };
        let mut api_keys = HashMap::with_capacity(raw.api_keys.len());
        let mut ids = HashSet::new();
        for spanned in &raw.api_keys {
            let k = &spanned.value;
            let Some(written_id) = self.required(&k.id, &spanned.referenced, "id") else {
                continue;
            };
            let Some(id) = self.text(written_id) else {
                continue;
            };
            self.check_name("api key id", &id, &written_id.referenced);
            if !ids.insert(id.clone()) {
                self.error(
                    &written_id.referenced,
                    format!("api key id `{id}` is used twice"),
                );
            }
            let digest = match (&k.key, &k.hash) {
                // Trimmed as a presented key is: a key read from a file
                // (a Kubernetes Secret made from one) often ends in a
                // newline no client sends.
                (Some(key), None) => match self.text(key).map(|k| k.trim_ascii().to_owned()) {
                    Some(key) if key.is_empty() => {
                        self.error(&key_loc(&k.key), format!("api key `{id}` is empty"));
                        None
                    }
                    // A client sends its key in a header, which cannot
                    // carry these: such a key would match no request.
                    Some(key) if key.chars().any(char::is_control) => {
                        self.error(
                            &key_loc(&k.key),
                            format!("api key `{id}` holds a control character (a newline?), which no header can carry"),
                        );
                        None
                    }
                    Some(key) => {
                        let digest = crate::proxy::auth::digest(key.as_bytes());
                        self.secrets_written.push(key.clone());
                        Some(digest)
                    }
                    None => None,
                },
                (None, Some(hash)) => self.parsed(hash, |s| {
                    crate::proxy::auth::parse_hash(s).ok_or_else(|| {
                        format!("api key `{id}`: hash must be `sha256:` and 64 hex digits (see `sluice hash-key`)")
                    })
                }),
                (Some(_), Some(_)) => {
                    self.error(&spanned.referenced, format!("api key `{id}` has both `key` and `hash`"));
                    None
                }
                (None, None) => {
                    self.error(&spanned.referenced, format!("api key `{id}` needs a `key` or a `hash`"));
                    None
                }
            };
            let tier = k.tier.as_ref().and_then(|t| tier_ref(self, t));
            let routes = k.routes.as_ref().map(|list| {
                list.iter()
                    .filter_map(|t| {
                        let r = self.text(t)?;
                        if !route_names.contains(r.as_str()) {
                            self.error(
                                &t.referenced,
                                format!("api key `{id}`: no route named `{r}`"),
                            );
                        }
                        Some(Arc::from(r))
                    })
                    .collect()
            });
            if let Some(digest) = digest {
                let entry = Arc::new(ApiKey {
                    id: Arc::from(id.as_str()),
                    tier,
                    routes,
                });
                if api_keys.insert(digest, entry).is_some() {
                    self.error(
                        &spanned.referenced,
                        format!("api key `{id}` repeats another key"),
                    );
                }
            }
        }
        let jwt = raw.jwt.as_ref().and_then(|j| self.jwt(j));
        Auth {
            api_keys,
            jwt,
            default_tier,
            anonymous_tier: Arc::from("anonymous"),
        }
    }

    /// Warns of a tier nothing gives whose name is a near miss of one
    /// that callers get (`anonymus`, or `fre` for the implicit default
    /// `free`): misspelt, it would leave the callers it was meant for
    /// unlimited without a word (SPEC §2: typos must not silently disable
    /// a limit). A tier merely unused (kept ready for keys to come) is
    /// fine; and when JWTs name tiers (`tier_claim`), any may be given.
    fn check_tiers_given(&mut self, raw: &RawConfig, auth: &Auth) {
        let from_tokens = raw
            .auth
            .as_ref()
            .and_then(|a| a.jwt.as_ref())
            .is_some_and(|j| j.value.tier_claim.is_some());
        if from_tokens {
            return;
        }
        let given: HashSet<&str> = auth
            .api_keys
            .values()
            .filter_map(|k| k.tier.as_deref())
            .chain(auth.default_tier.as_deref())
            .chain([&*auth.anonymous_tier])
            .collect();
        for (name, tier) in &raw.tiers {
            if given.contains(name.as_str()) {
                continue;
            }
            let Some(meant) = given
                .iter()
                .copied()
                .chain([DEFAULT_TIER])
                .find(|g| super::recover::is_near_miss(name, g) && !raw.tiers.contains_key(*g))
            else {
                continue;
            };
            self.warning(
                &tier.referenced,
                format!(
                    "tier `{name}` is given to no one (no api key names it, and it is not default_tier or `anonymous`): did you mean `{meant}`?"
                ),
            );
        }
    }

    fn jwt(&mut self, spanned: &Spanned<RawJwt>) -> Option<Jwt> {
        const ALGORITHMS: [&str; 12] = [
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
            "ES256", "ES384", "EdDSA",
        ];
        let j = &spanned.value;
        let sources = [&j.jwks_url, &j.keys_file, &j.hs256_secret]
            .iter()
            .filter(|s| s.is_some())
            .count();
        if sources != 1 {
            self.error(
                &spanned.referenced,
                "jwt needs exactly one of jwks_url, keys_file, hs256_secret",
            );
            return None;
        }
        let mut jwks = None;
        let mut hmac = false;
        let keys = if let Some(u) = &j.jwks_url {
            let url = self.text(u)?;
            let parsed = url
                .parse::<http::Uri>()
                .ok()
                .filter(|uri| uri.host().is_some());
            let client = match parsed.as_ref().and_then(http::Uri::scheme_str) {
                Some("https") => upstream::client::build_tls(None, Duration::from_secs(5)).ok(),
                Some("http") => Some(upstream::client::build_plain(Duration::from_secs(5))),
                _ => None,
            };
            match (parsed, client) {
                (Some(url), Some(client)) => jwks = Some(JwksSource { url, client }),
                _ => self.error(&u.referenced, "jwks_url must be an http:// or https:// URL"),
            }
            Vec::new()
        } else if let Some(f) = &j.keys_file {
            let path = self.source(f)?;
            let loaded = super::read_text(&path)
                .map_err(|e| format!("cannot read keys_file {}: {e}", path.display()))
                .and_then(|text| jwt::load_keys_file(&text));
            match loaded {
                Ok(keys) => keys,
                Err(e) => {
                    self.error(&f.referenced, e);
                    return None;
                }
            }
        } else {
            let secret = j.hs256_secret.as_ref()?;
            let text = self.text(secret)?;
            if text.is_empty() {
                // An empty key would let anyone sign tokens.
                self.error(&secret.referenced, "hs256_secret must not be empty");
            } else if text.len() < 32 {
                // RFC 7518 §3.2 wants 256 bits; Envoy and the JWT
                // libraries accept shorter, and so does sluice, loudly.
                // The value is a secret: the message never repeats it.
                self.warning(
                    &secret.referenced,
                    "hs256_secret is shorter than 32 bytes (RFC 7518 asks for 256 bits): tokens signed with it are easier to forge",
                );
            }
            hmac = true;
            let key =
                jwt::JwtKey::any_algorithm(jsonwebtoken::DecodingKey::from_secret(text.as_bytes()));
            self.secrets_written.push(text);
            vec![key]
        };
        if j.algorithms.as_ref().is_some_and(Vec::is_empty) {
            self.error(
                &spanned.referenced,
                "jwt: algorithms is empty, so no token could be accepted; list them, or leave algorithms out for the default",
            );
        }
        let mut algorithms = Vec::new();
        for a in j.algorithms.iter().flatten() {
            let Some(alg) = self.parsed(a, |s| {
                s.parse::<jsonwebtoken::Algorithm>()
                    .ok()
                    .filter(|alg| ALGORITHMS.contains(&s) && format!("{alg:?}") == s)
                    .ok_or_else(|| format!("`{s}` is not one of: {}", ALGORITHMS.join(", ")))
            }) else {
                continue;
            };
            let is_hmac = alg.family() == jsonwebtoken::AlgorithmFamily::Hmac;
            if is_hmac != hmac {
                self.error(
                    &a.referenced,
                    if hmac {
                        format!("{alg:?} needs a public key (keys_file or jwks_url), not hs256_secret")
                    } else {
                        format!("{alg:?} needs hs256_secret; a public key is never used as an HMAC secret")
                    },
                );
                continue;
            }
            algorithms.push(alg);
        }
        if j.algorithms.is_none() {
            algorithms.push(if hmac {
                jsonwebtoken::Algorithm::HS256
            } else {
                jsonwebtoken::Algorithm::RS256
            });
        }
        // Keys that no allowed algorithm uses (an EC key under the default
        // RS256) would refuse every token, with `check` saying it was ok.
        if let Some(f) = &j.keys_file
            && !keys.is_empty()
            && !algorithms.is_empty()
            && !keys.iter().any(|k| {
                algorithms.iter().any(|alg| {
                    alg.family() == k.key.family() && k.alg.is_none_or(|tied| tied == *alg)
                })
            })
        {
            let mut families: Vec<&str> = keys
                .iter()
                .map(|k| match k.key.family() {
                    jsonwebtoken::AlgorithmFamily::Rsa => "RSA",
                    jsonwebtoken::AlgorithmFamily::Ec => "EC",
                    jsonwebtoken::AlgorithmFamily::Ed => "Ed25519",
                    jsonwebtoken::AlgorithmFamily::Hmac => "HMAC",
                })
                .collect();
            families.sort_unstable();
            families.dedup();
            let allowed: Vec<String> = algorithms.iter().map(|a| format!("{a:?}")).collect();
            self.error(
                &f.referenced,
                format!(
                    "keys_file holds no key for the allowed algorithms ({}): its keys are {}; list their algorithms in jwt.algorithms (e.g. ES256 for EC P-256, EdDSA for Ed25519)",
                    allowed.join(", "),
                    families.join(", ")
                ),
            );
        }
        let issuer = j.issuer.as_ref().and_then(|t| self.text(t));
        let audiences: Vec<String> = j.audiences.iter().filter_map(|t| self.text(t)).collect();
        let mut claim = |written: &Option<Text>, key: &str| {
            let written = written.as_ref()?;
            let name = self.text(written)?;
            if name.trim().is_empty() {
                self.error(
                    &written.referenced,
                    format!("{key} is empty: name the token claim to read"),
                );
                return None;
            }
            Some(name)
        };
        let identity_claim =
            claim(&j.identity_claim, "identity_claim").unwrap_or_else(|| "sub".to_owned());
        let tier_claim = claim(&j.tier_claim, "tier_claim");
        Some(Jwt {
            verifier: jwt::JwtVerifier::new(
                keys,
                &algorithms,
                issuer.as_deref(),
                &audiences,
                identity_claim,
                tier_claim,
            ),
            jwks,
        })
    }

    fn pricing(&mut self, raw: &BTreeMap<String, Spanned<RawPrice>>) -> HashMap<String, Price> {
        raw.iter()
            .filter_map(|(model, p)| {
                // Each read before any is given up on: `check` reports
                // every bad price of an entry at once.
                let input = self.required(&p.value.input, &p.referenced, "input");
                let output = self.required(&p.value.output, &p.referenced, "output");
                let input = input.and_then(|t| self.opt_usd(&Some(t.clone())));
                let output = output.and_then(|t| self.opt_usd(&Some(t.clone())));
                let cached_input = self.opt_usd(&p.value.cached_input);
                let cache_write = self.opt_usd(&p.value.cache_write);
                let (input, output) = (input?, output?);
                Some((
                    model.clone(),
                    Price {
                        input,
                        output,
                        cached_input,
                        cache_write,
                    },
                ))
            })
            .collect()
    }

    fn budget(&mut self, raw: Option<&RawBudget>) -> Budget {
        let Some(raw) = raw else {
            return Budget::default();
        };
        let mut alerts: Vec<(f64, String)> = Vec::new();
        for t in raw.alert_at.iter().flatten() {
            match self.number::<f64>(t, "a fraction like 0.8") {
                // Listed twice, a threshold would be one alert with two
                // `threshold` labels (`0.8` and `0.80`).
                Some(f)
                    if alerts
                        .iter()
                        .any(|(seen, _)| (seen * 1000.0).round() == (f * 1000.0).round()) =>
                {
                    self.out_of_range(t, |f| format!("alert_at lists {f} twice"));
                }
                Some(f) if f > 0.0 && f.is_finite() => {
                    // The metric's `threshold` label is the fraction as the
                    // config writes it (`1.0` stays `1.0`).
                    let written = self.text(t).unwrap_or_default().trim().to_owned();
                    alerts.push((f, written));
                }
                Some(f) if !f.is_finite() => {
                    self.out_of_range(t, |f| format!("alert_at {f} is no finite fraction"));
                }
                Some(_) => self.out_of_range(t, |f| format!("alert_at {f} must be above 0")),
                None => {}
            }
        }
        alerts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (alert_at, alert_labels) = alerts.into_iter().unzip();
        let webhook_url = raw.webhook_url.as_ref().and_then(|t| {
            let url = self.text(t).filter(|s| !s.is_empty())?;
            let parsed = url.parse::<http::Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority()
                        .is_some_and(|a| !a.host().is_empty() && crate::upstream::port_is_valid(a))
            });
            if parsed.is_none() {
                // Found at the first alert, maybe days later, otherwise.
                self.error(
                    &t.referenced,
                    "webhook_url must be an http:// or https:// URL with a host",
                );
            }
            self.secrets_written.push(url.clone());
            Some(url)
        });
        Budget {
            daily_usd: self.budget_usd(&raw.daily_usd, "daily_usd"),
            alert_at,
            alert_labels,
            enforce: self.bool(&raw.enforce, false),
            webhook_url,
        }
    }

    /// Budgets that are there but cannot act: typos must not silently
    /// disable a limit, and neither must a missing section.
    fn check_budget_use(
        &mut self,
        raw: &RawConfig,
        budget: &Budget,
        tiers: &HashMap<Arc<str>, Tier>,
    ) {
        if budget.alert_at.is_empty() && !budget.enforce {
            for (name, tier) in &raw.tiers {
                if let Some(t) = &tier.value.daily_budget_usd {
                    self.warning(
                        &t.referenced,
                        format!("tier `{name}`: daily_budget_usd does nothing without budget.alert_at or budget.enforce: true"),
                    );
                }
            }
        }
        if budget.enforce
            && budget.daily_usd.is_none()
            && tiers.values().all(|t| t.daily_budget_usd.is_none())
            && let Some(t) = raw.budget.as_ref().and_then(|b| b.enforce.as_ref())
        {
            self.warning(
                &t.referenced,
                "budget.enforce has nothing to enforce: set budget.daily_usd or a tier's daily_budget_usd",
            );
        }
    }

    fn state(&mut self, raw: Option<&RawState>) -> StateSettings {
        let Some(raw) = raw else {
            return StateSettings {
                backend: StateBackend::Memory,
                redis_url: None,
                deny_on_error: false,
            };
        };
        let backend = self.choice(
            &raw.backend,
            &[
                ("memory", StateBackend::Memory),
                ("redis", StateBackend::Redis),
            ],
            StateBackend::Memory,
        );
        let redis_url = raw.redis_url.as_ref().and_then(|t| {
            let url = self.text(t)?;
            let scheme = url.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
            if scheme.as_deref() != Some("redis") {
                self.error(
                    &t.referenced,
                    "redis_url must be redis://host[:port][/db], with user:password@ before the host if Redis needs them (rediss:// TLS and unix sockets are not supported)",
                );
            } else {
                match redis::Client::open(url.as_str()) {
                    Ok(client) => {
                        let settings = client.get_connection_info().redis_settings();
                        if let Some(password) = settings.password() {
                            self.secrets_written.push(password.to_owned());
                        }
                    }
                    // Not the URL itself: it may carry a password.
                    Err(_) => self.error(&t.referenced, "redis_url is not a valid Redis URL"),
                }
            }
            Some(url)
        });
        // A redis_url that is there but did not expand (a missing
        // variable) was reported as such.
        if backend == StateBackend::Redis
            && raw.redis_url.is_none()
            && let Some(b) = &raw.backend
        {
            self.error(&b.referenced, "backend: redis needs a redis_url");
        }
        StateSettings {
            backend,
            redis_url,
            deny_on_error: self.choice(&raw.on_error, &[("allow", false), ("deny", true)], false),
        }
    }

    fn logging(&mut self, raw: Option<&RawLogging>) -> Logging {
        let Some(raw) = raw else {
            return Logging {
                level: "info".to_owned(),
                format: LogFormat::Json,
                log_bodies: false,
                known_secrets: KnownSecrets::default(),
            };
        };
        let level = self.choice(
            &raw.level,
            &[
                ("error", "error"),
                ("warn", "warn"),
                ("info", "info"),
                ("debug", "debug"),
                ("trace", "trace"),
            ],
            "info",
        );
        Logging {
            level: level.to_owned(),
            format: self.choice(
                &raw.format,
                &[("json", LogFormat::Json), ("text", LogFormat::Text)],
                LogFormat::Json,
            ),
            log_bodies: self.bool(&raw.log_bodies, false),
            known_secrets: KnownSecrets::default(),
        }
    }
}

impl Compiler<'_> {
    /// The `set_headers` values of `upstreams`, whole and, for `<scheme>
    /// <credential>`, the credential alone, and the other secrets written
    /// in the file: what a logged body must not show (SPEC §5). Known
    /// settings written in the file (`anthropic-version: 2023-06-01`) are
    /// left out.
    fn known_secrets(&self, upstreams: &[Arc<Upstream>]) -> KnownSecrets {
        let mut secrets = KnownSecrets::default();
        for header in upstreams.iter().flat_map(|u| &u.set_headers) {
            let Ok(value) = header.value.to_str() else {
                continue;
            };
            let from_variable = self.expansions.iter().any(|(v, _)| v.trim() == value);
            if !from_variable && PLAIN_HEADERS.contains(&header.name.as_str()) {
                continue;
            }
            secrets.add(value);
            secrets.add(value.rsplit(' ').next().unwrap_or(value));
        }
        for secret in &self.secrets_written {
            secrets.add(secret);
        }
        secrets.sort();
        secrets
    }
}

/// Of `values`, the variables that made `url`, those in its user info,
/// path or query, where a token rides (`/hooks/${TOKEN}`); of a variable
/// that is a whole URL (`${BACKUP_URL}`), the long segments and values
/// there (a token is long; `v1`, `deployments` are not). A scheme or an
/// address is no secret, and masked it would hide the upstream's name
/// wherever a logged body shows it.
fn url_secrets(url: &str, values: Vec<String>) -> Vec<String> {
    let (userinfo, path) = url_secret_parts(url);
    let mut secrets = Vec::new();
    for value in values {
        if value.contains("://") {
            let (userinfo, path) = url_secret_parts(&value);
            secrets.extend(
                path.split(['/', '?', '&', '=', '#'])
                    .chain([userinfo])
                    .filter(|part| part.len() >= 16)
                    .map(str::to_owned),
            );
        } else if path.contains(value.as_str()) || userinfo.contains(value.as_str()) {
            secrets.push(value);
        }
    }
    secrets
}

/// A URL's user info and its path with the query.
fn url_secret_parts(url: &str) -> (&str, &str) {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, path) = after_scheme
        .find('/')
        .map_or((after_scheme, ""), |at| after_scheme.split_at(at));
    let userinfo = authority.rsplit_once('@').map_or("", |(info, _)| info);
    (userinfo, path)
}

/// A route's `host` as requests are compared with it: lower case,
/// without a final dot; `*.example.com` matches the names under it.
fn route_host(text: &str) -> Result<String, &'static str> {
    let host = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_prefix("*.").unwrap_or(&host);
    let ipv6 = name.starts_with('[') && name.ends_with(']') && name.len() > 2;
    let valid = ipv6
        || (!name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }));
    if valid {
        Ok(host)
    } else {
        Err(
            "host must be a host name like api.example.com, or *.example.com for the names under it, without scheme, port or path (requests match by host without their port)",
        )
    }
}

/// Whether `text` is an origin as browsers send it, or one whose host
/// is `*.` and a domain of two labels or more (`*.com` would let in any
/// site of a top-level domain): a `*` anywhere else would never match.
fn is_origin_pattern(text: &str) -> bool {
    match text.split_once("://*.") {
        Some((scheme, rest)) => {
            let domain = rest.split(':').next().unwrap_or(rest);
            domain.contains('.')
                && !rest.contains('*')
                && is_origin(&format!("{scheme}://x.{rest}"))
        }
        None => !text.contains('*') && is_origin(text),
    }
}

/// Whether `text` is an origin as browsers send it: scheme://host[:port].
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && !rest.is_empty()
        && !rest.contains('@')
        && rest
            .parse::<http::uri::Authority>()
            .is_ok_and(|a| a.as_str() == rest && crate::upstream::port_is_valid(&a))
}

fn key_loc(t: &Option<Text>) -> Location {
    t.as_ref()
        .map(|t| t.referenced)
        .unwrap_or(Location::UNKNOWN)
}

/// Headers whose values are API settings, not credentials.
const PLAIN_HEADERS: [&str; 9] = [
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "api-version",
    "x-ms-version",
    "content-type",
    "accept",
    "user-agent",
    "openai-organization",
];

/// Reads and compiles a JSON Schema once per config load.
fn load_schema(path: &Path) -> Result<jsonschema::Validator, String> {
    let shown = path.display();
    let text =
        super::read_text(path).map_err(|e| format!("schema_file {shown} cannot be read: {e}"))?;
    let schema: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("schema_file {shown} is not JSON: {e}"))?;
    jsonschema::validator_for(&schema).map_err(|e| {
        format!(
            "schema_file {shown} is not a valid JSON Schema: {}",
            e.masked()
        )
    })
}

/// Whether route `earlier` takes every request route `later` would
/// (same host or any, the same methods or more, a path that holds
/// `later`'s), so that `later`, listed after it, is never reached.
fn covers(earlier: &Route, later: &Route) -> bool {
    // The methods a route takes: a GET route takes HEAD too, a CORS
    // route the OPTIONS of preflights; none listed, every one.
    let takes = |route: &Route, m: &Method| {
        route.methods.is_empty()
            || route.methods.contains(m)
            || (*m == Method::HEAD && route.methods.contains(&Method::GET))
            || (*m == Method::OPTIONS && route.cors.is_some())
    };
    let mut later_methods = later.methods.clone();
    if later.cors.is_some() && !later_methods.is_empty() {
        later_methods.push(Method::OPTIONS);
    }
    let any = |p: &PathMatch| {
        matches!(p, PathMatch::Any) || matches!(p, PathMatch::Prefix(p) if p == "/")
    };
    let path = match (&earlier.path, &later.path) {
        (e, _) if any(e) => true,
        (_, l) if any(l) => false,
        (PathMatch::Prefix(e), PathMatch::Prefix(l) | PathMatch::Exact(l)) => {
            l.starts_with(e.as_str())
        }
        (PathMatch::Exact(e), PathMatch::Exact(l)) => e == l,
        _ => false,
    };
    // A later host under an earlier wildcard (`api.example.com` after
    // `*.example.com`) is one of its hosts.
    let host = earlier.host.is_none()
        || (later.host.is_some()
            && crate::proxy::route::host_matches(earlier.host.as_deref(), later.host.as_deref()));
    let methods = earlier.methods.is_empty()
        || (!later_methods.is_empty() && later_methods.iter().all(|m| takes(earlier, m)));
    path && host && methods
}

/// The `allow` header value for a 405 on a route limited to `methods`:
/// HEAD follows GET, which serves it (RFC 9110 §9.3.2), as Go's and
/// Apache's servers list it.
fn allow_header(methods: &[Method], cors: bool) -> HeaderValue {
    if methods.is_empty() {
        // Every method but TRACE, which such a route refuses.
        return HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");
    }
    let mut names: Vec<&str> = Vec::with_capacity(methods.len() + 2);
    for method in methods {
        if !names.contains(&method.as_str()) {
            names.push(method.as_str());
        }
        if *method == Method::GET && !methods.contains(&Method::HEAD) && !names.contains(&"HEAD") {
            names.push("HEAD");
        }
    }
    if cors && !names.contains(&"OPTIONS") {
        names.push("OPTIONS");
    }
    HeaderValue::from_str(&names.join(", ")).unwrap_or(HeaderValue::from_static(""))
}

/// The largest per-minute limit: far past any real traffic, and small
/// enough that the buckets' arithmetic in `f64` stays exact (and the
/// `x-ratelimit-*` headers agree with each other).
/// A bucket counts its units in nanoseconds of a minute: past this, a
/// unit would take less than one and the limit would not be the one set.
const MAX_PER_MINUTE: u64 = 60_000_000_000;

/// The largest amount of money a price or a budget may name: a price of
/// 1e308 made every cost `inf`.
const MAX_USD: f64 = 1e9;

/// Why an upstream's `set_headers` may not name `header`: these frame the
/// message or belong to one connection (RFC 9110 §7.6.1), so sluice sets
/// them itself for each hop.
fn not_settable(header: &HeaderName) -> Option<&'static str> {
    if *header == http::header::CONTENT_LENGTH || *header == http::header::TRANSFER_ENCODING {
        return Some("it frames the body, which sluice does for each hop");
    }
    crate::proxy::headers::is_hop_by_hop(header)
        .then_some("it is a hop-by-hop header, about one connection only")
}
