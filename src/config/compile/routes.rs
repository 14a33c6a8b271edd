//! `routes`: matchers, methods, CORS, validation schemas, and the checks
//! that no route hides a later one.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde_saphyr::Spanned;

use crate::config::raw::*;
use crate::snapshot::*;
use crate::upstream::Upstream;

use super::Compiler;

impl Compiler<'_> {
    pub(super) fn routes(
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
                // Known once the routes' upstreams are (`replaced_headers`).
                replaced_headers: 0,
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
    pub(super) fn cors(&mut self, spanned: &Spanned<RawCors>, methods: &[Method]) -> Cors {
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

/// Reads and compiles a JSON Schema once per config load.
fn load_schema(path: &Path) -> Result<jsonschema::Validator, String> {
    let shown = path.display();
    let text = crate::config::read_text(path)
        .map_err(|e| format!("schema_file {shown} cannot be read: {e}"))?;
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

/// For each cached route, which answer-changing headers all its
/// upstreams set themselves (see [`RouteCache::replaced_headers`]).
pub(super) fn note_replaced_headers(
    routes: &mut [Route],
    upstreams: &[Arc<Upstream>],
    pools: &[Pool],
) {
    for route in routes {
        let members: &[usize] = match &route.target {
            Target::Upstream(index) => std::slice::from_ref(index),
            Target::Pool(index) => pools.get(*index).map_or(&[], |p| &p.members[..]),
        };
        let Some(cache) = route.cache.as_mut() else {
            continue;
        };
        cache.replaced_headers = crate::proxy::cache::ANSWER_HEADERS
            .iter()
            .enumerate()
            .filter(|(_, name)| {
                !members.is_empty()
                    && members.iter().all(|&m| {
                        upstreams
                            .get(m)
                            .is_some_and(|u| u.set_headers.iter().any(|h| h.name == **name))
                    })
            })
            .fold(0, |bits, (i, _)| bits | 1 << i);
    }
}
