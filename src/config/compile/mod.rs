//! Raw YAML structs → [`Snapshot`]: expand `${VAR}`, parse units, apply
//! defaults, resolve names (routes → upstreams/pools, pools → upstreams,
//! keys → tiers) and build route matchers and upstream clients.
//!
//! Every problem is collected with its position instead of stopping at the
//! first, so `sluice check` shows them all at once.

mod auth;
mod routes;
mod settings;
mod spend;
mod upstreams;
mod values;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

use super::error::ConfigError;
use super::raw::*;
use crate::snapshot::*;

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
        url_secrets_written: Vec::new(),
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
    /// Those an upstream URL holds (its variables, its long segments),
    /// masked in logged bodies only.
    url_secrets_written: Vec<String>,
    /// The files read besides the config (see [`Snapshot::sources`]).
    sources: Vec<PathBuf>,
}

impl Compiler<'_> {
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
        let mut routes = self.routes(&raw.routes, &upstream_index, &pool_index);
        routes::note_replaced_headers(&mut routes, &upstreams, &pools);
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
        // An upstream URL's variables (a deployment name in its path) are
        // masked in logged bodies, where its echo could show them, but not
        // in what the client chose: its path and model would read `***`.
        logging.scrub = crate::telemetry::scrub::Scrub::new(&self.known_secrets(&upstreams, false));
        if logging.log_bodies {
            logging.known_secrets = self.known_secrets(&upstreams, true);
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
}
