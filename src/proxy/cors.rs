//! CORS (SPEC §3), for browser clients of the AI app behind the sidecar:
//! on a route with `cors`, sluice answers preflight `OPTIONS` itself,
//! before auth (browsers send no credentials there), and adds the
//! `access-control-*` headers to every response for an allowed origin. A
//! disallowed origin gets none, so the browser blocks the call.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::{self, BoxBody};
use crate::snapshot::Cors;

/// What a browser may read of sluice's own headers besides the safelisted ones.
const EXPOSE: &str = "x-request-id, x-sluice-upstream-request-id, x-sluice-cache, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, retry-after, retry-after-ms, x-should-retry";

/// What a request on a `cors` route gets: the allowed origin to echo in
/// `access-control-allow-origin`, or `None` (no origin, or not allowed).
/// Either way responses vary by origin.
#[derive(Debug, Clone)]
pub struct Allowed {
    origin: Option<HeaderValue>,
    credentials: bool,
}

impl Allowed {
    pub fn is_allowed(&self) -> bool {
        self.origin.is_some()
    }
}

/// The request's origin, as `cors` judges it.
pub fn allowed(cors: &Cors, headers: &HeaderMap) -> Allowed {
    let refused = Allowed {
        origin: None,
        credentials: false,
    };
    let Some(origin) = headers.get(header::ORIGIN) else {
        return refused;
    };
    let Ok(text) = origin.to_str() else {
        return refused;
    };
    let any = cors.allow_origins.iter().any(|o| o == "*");
    let listed = cors.allow_origins.iter().any(|o| matches_origin(o, text));
    if !(any || listed) {
        return refused;
    }
    // The config refuses `*` with credentials, so `*` is sent as it is.
    let origin = if listed {
        origin.clone()
    } else {
        HeaderValue::from_static("*")
    };
    Allowed {
        origin: Some(origin),
        credentials: cors.allow_credentials,
    }
}

/// Whether `origin` is the one `allowed` names, in any case, or one
/// under the domain of an allowed `scheme://*.domain[:port]`, with the
/// same scheme and port (`https://a.b.example.com` for
/// `https://*.example.com`; not `https://example.com` itself, which is
/// listed apart when it is meant).
fn matches_origin(allowed: &str, origin: &str) -> bool {
    let Some((scheme, domain_and_port)) = allowed.split_once("://*.") else {
        return allowed.eq_ignore_ascii_case(origin);
    };
    let Some((origin_scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let Some(cut) = authority.len().checked_sub(domain_and_port.len() + 1) else {
        return false;
    };
    origin_scheme.eq_ignore_ascii_case(scheme)
        && cut > 0
        && authority.as_bytes()[cut] == b'.'
        && authority
            .get(cut + 1..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(domain_and_port))
        && authority[..cut]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Whether a request is a CORS preflight rather than an API call.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a plain `OPTIONS` (not a preflight) on a CORS route that
/// does not forward it: the methods the route allows.
pub fn options(allow: &HeaderValue) -> Response<BoxBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp.headers_mut().insert(header::ALLOW, allow.clone());
    resp
}

/// The answer to a preflight (`request` its headers): what may be sent,
/// and for how long the browser may remember it. For a disallowed origin,
/// nothing.
pub fn preflight(cors: &Cors, allowed: bool, request: &HeaderMap) -> Response<BoxBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let headers = resp.headers_mut();
    headers.insert(
        header::VARY,
        HeaderValue::from_static(
            "origin, access-control-request-method, access-control-request-headers",
        ),
    );
    if !allowed {
        return resp;
    }
    if let Ok(methods) = HeaderValue::from_str(&cors.allow_methods.join(", ")) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
    }
    match &cors.allow_headers {
        Some(names) => {
            if let Ok(names) = HeaderValue::from_str(&names.join(", ")) {
                headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, names);
            }
        }
        None => {
            if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
            }
        }
    }
    if let Some(max_age) = cors.max_age {
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(max_age.as_secs()),
        );
    }
    resp
}

/// On a route with `cors`, the route's is the one policy: an upstream's
/// own `access-control-*` headers (an app's `allow-origin: *`, its
/// `allow-credentials: true`) are removed, or they would open the
/// response to origins the route does not allow.
pub fn drop_upstreams(headers: &mut HeaderMap) {
    while let Some(name) = headers
        .keys()
        .find(|name| name.as_str().starts_with("access-control-"))
        .cloned()
    {
        headers.remove(&name);
    }
}

/// Adds the headers that let the browser hand the response to the page.
pub fn decorate(allowed: Allowed, headers: &mut HeaderMap) {
    // A preflight answer names `origin` among its own `vary` already.
    let varies = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|name| name == "*" || name.eq_ignore_ascii_case("origin"))
        })
    });
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    let Some(origin) = allowed.origin else {
        return;
    };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if allowed.credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE),
    );
}

#[cfg(test)]
mod tests {
    use super::EXPOSE;
    use crate::proxy::error::{RETRY_AFTER_MS, X_SHOULD_RETRY};
    use crate::proxy::headers::{X_REQUEST_ID, X_SLUICE_CACHE, X_SLUICE_UPSTREAM_REQUEST_ID};
    use crate::proxy::limit::{REQUEST_HEADERS, TOKEN_HEADERS};

    #[test]
    fn every_header_sluice_sets_is_exposed() {
        let exposed: Vec<&str> = EXPOSE.split(", ").collect();
        let ours = [
            X_REQUEST_ID,
            X_SLUICE_UPSTREAM_REQUEST_ID,
            X_SLUICE_CACHE,
            http::header::RETRY_AFTER,
            RETRY_AFTER_MS,
            X_SHOULD_RETRY,
        ]
        .into_iter()
        .chain(REQUEST_HEADERS)
        .chain(TOKEN_HEADERS);
        for name in ours {
            assert!(exposed.contains(&name.as_str()), "{name} is not exposed");
        }
    }
}
