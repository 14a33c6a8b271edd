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
const EXPOSE: &str = "x-request-id, x-sluice-cache, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, retry-after, retry-after-ms";

/// The allowed origin of a request, to echo in `access-control-allow-origin`.
#[derive(Debug, Clone)]
pub struct Allowed {
    origin: HeaderValue,
    credentials: bool,
}

/// The request's origin, when `cors` allows it.
pub fn allowed(cors: &Cors, headers: &HeaderMap) -> Option<Allowed> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    let any = cors.allow_origins.iter().any(|o| o == "*");
    let listed = cors
        .allow_origins
        .iter()
        .any(|o| o.eq_ignore_ascii_case(text));
    if !(any || listed) {
        return None;
    }
    // `*` cannot be sent with credentials: the origin itself is echoed.
    let origin = if any && !listed && !cors.allow_credentials {
        HeaderValue::from_static("*")
    } else {
        origin.clone()
    };
    Some(Allowed {
        origin,
        credentials: cors.allow_credentials,
    })
}

/// Whether a request is a CORS preflight rather than an API call.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight: what may be sent, and for how long the
/// browser may remember it. For a disallowed origin, nothing.
pub fn preflight(cors: &Cors, allowed: bool) -> Response<BoxBody> {
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
    if let Ok(names) = HeaderValue::from_str(&cors.allow_headers.join(", ")) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, names);
    }
    if let Some(max_age) = cors.max_age {
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(max_age.as_secs()),
        );
    }
    resp
}

/// Adds the headers that let the browser hand the response to the page.
pub fn decorate(allowed: Allowed, headers: &mut HeaderMap) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed.origin);
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
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}
