//! Phase 1, route selection: the first route whose path and host match and
//! whose methods allow the request's. When some route matches path and
//! host but none allows the method, the answer is 405 with that route's
//! `allow`; when none matches at all, 404.

use std::borrow::Cow;

use http::{HeaderMap, Method, Uri, header};

use super::error::ProxyError;
use crate::snapshot::{PathMatch, Route, Snapshot};

pub fn select<'s>(
    snap: &'s Snapshot,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(usize, &'s Route), Refused<'s>> {
    let path = normalized(uri.path());
    let path = path.as_ref();
    let host = request_host(uri, headers);
    let mut wrong_method: Option<&Route> = None;
    for (index, route) in snap.routes.iter().enumerate() {
        if !path_matches(&route.path, path) || !host_matches(route.host.as_deref(), host) {
            continue;
        }
        // A CORS route takes its preflights whatever its methods.
        let preflight = route.cors.is_some() && super::cors::is_preflight(method, headers);
        if route.methods.is_empty() || allows(&route.methods, method) || preflight {
            return Ok((index, route));
        }
        wrong_method.get_or_insert(route);
    }
    Err(match wrong_method {
        Some(route) => Refused {
            error: ProxyError::MethodNotAllowed {
                allow: route.allow.clone(),
            },
            route: Some(route),
        },
        None => Refused {
            error: ProxyError::RouteNotFound,
            route: None,
        },
    })
}

/// Why no route takes a request; for a 405, the route whose methods
/// refused it (a browser reads the error only with its CORS headers).
pub struct Refused<'s> {
    pub error: ProxyError,
    pub route: Option<&'s Route>,
}

/// Whether `methods` allow `method`. HEAD is GET without the body (RFC
/// 9110 §9.3.2): a route that serves GET serves HEAD. (Its `allow` lists
/// the methods as configured.)
fn allows(methods: &[Method], method: &Method) -> bool {
    methods.contains(method) || (*method == Method::HEAD && methods.contains(&Method::GET))
}

/// The path as an upstream resolves it, for matching (it is forwarded as
/// it came): percent-escapes decoded, `.` and `..` segments resolved and
/// repeated slashes merged, as nginx and Envoy's `normalize_path` do.
/// Otherwise `/%61dmin` or `/public/../admin` would miss an `/admin` route
/// and its auth, and fall through to a looser one.
fn normalized(path: &str) -> Cow<'_, str> {
    let plain = !path.contains('%') && !path.contains("/.") && !path.contains("//");
    if plain {
        return Cow::Borrowed(path);
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    // A trailing slash (or `.`/`..` segment) names a directory.
    if out.is_empty()
        || decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
    {
        out.push('/');
    }
    Cow::Owned(out)
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Any => true,
        PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
        PathMatch::Exact(exact) => path == exact,
    }
}

fn host_matches(want: Option<&str>, host: Option<&str>) -> bool {
    match (want, host) {
        (None, _) => true,
        (Some(want), Some(host)) => want.eq_ignore_ascii_case(host),
        (Some(_), None) => false,
    }
}

/// The request's host without port: the URI authority (HTTP/2) or `host`.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match uri.host() {
        Some(h) => h,
        None => headers.get(header::HOST)?.to_str().ok()?,
    };
    // `[::1]:8080` keeps its brackets; `example.com:8080` loses the port.
    if raw.starts_with('[') {
        return raw.find(']').map(|end| &raw[..=end]);
    }
    Some(raw.split_once(':').map_or(raw, |(host, _port)| host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn paths_are_matched_as_upstreams_resolve_them() {
        for (raw, seen) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/%61dmin/x", "/admin/x"),
            ("/public/../admin", "/admin"),
            ("/public/./../admin/", "/admin/"),
            ("//admin//x", "/admin/x"),
            ("/..", "/"),
            ("/a/b/..", "/a/"),
            ("/%2e%2e/admin", "/admin"),
        ] {
            assert_eq!(normalized(raw), seen, "{raw}");
        }
    }

    #[test]
    fn host_drops_port() {
        let uri: Uri = "/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("Example.com:8080"));
        assert_eq!(request_host(&uri, &h), Some("Example.com"));
        h.insert(header::HOST, HeaderValue::from_static("[::1]:8080"));
        assert_eq!(request_host(&uri, &h), Some("[::1]"));
        let abs: Uri = "http://api.local:9/x".parse().unwrap();
        assert_eq!(request_host(&abs, &h), Some("api.local"));
    }

    #[test]
    fn paths() {
        assert!(path_matches(&PathMatch::Prefix("/v1/".into()), "/v1/chat"));
        assert!(!path_matches(&PathMatch::Prefix("/v1/".into()), "/v2/chat"));
        assert!(path_matches(&PathMatch::Exact("/a".into()), "/a"));
        assert!(!path_matches(&PathMatch::Exact("/a".into()), "/a/b"));
    }
}
