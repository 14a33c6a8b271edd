//! ProxyError: every error sluice answers itself, one variant per row of
//! SPEC §3, mapped by one exhaustive match to status, `code` and headers,
//! and rendered in the OpenAI error shape so AI clients display it well.
//! Messages are fixed or built from safe facts (names, limits), never from
//! an underlying error's text, which may hold a secret or an address.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::body::{BoxBody, full};

/// A 429's wait in milliseconds, as OpenAI sends it beside `retry-after`.
pub const RETRY_AFTER_MS: http::HeaderName = http::HeaderName::from_static("retry-after-ms");
/// Read by the OpenAI and Anthropic SDKs (Stainless) before their own
/// rules: `false` stops retries no wait could help.
pub const X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

#[derive(Debug)]
pub enum ProxyError {
    RouteNotFound,
    MethodNotAllowed {
        allow: HeaderValue,
    },
    /// Missing or invalid credential; `reason` is a metric label.
    Unauthorized {
        reason: &'static str,
    },
    Forbidden,
    TooLarge {
        limit: u64,
    },
    /// The client did not send its body within `request_timeout`.
    RequestTimeout,
    /// The client went away before its body was sent whole (logged as
    /// nginx does, 499; nobody reads the answer).
    ClientClosed,
    /// A request framing sluice does not take (a transfer coding other
    /// than chunked): 501, as nginx answers it.
    NotImplemented {
        message: &'static str,
    },
    InvalidRequest {
        message: String,
        /// The JSON path of the offending field, when one is to blame.
        param: Option<String>,
    },
    /// A compressed request body on a route whose limits read the body
    /// (415, as RFC 9110 §15.5.16 has it, with `accept-encoding`).
    UnsupportedEncoding,
    RateLimited {
        retry_after: Duration,
        /// Which limit: `requests`, `tokens` or `concurrency` (the
        /// `sluice_rate_limited_total` label), which the message names.
        limit: &'static str,
        /// The tokens a request needs and the per-minute limit it is over
        /// on its own: no wait makes it fit, and the message says so.
        over: Option<(u64, u64)>,
    },
    BudgetExceeded {
        retry_after: Duration,
    },
    /// `shutdown_grace` ran out before the request was answered.
    ShuttingDown,
    /// Every attempt failed; `attempts` reads `openai: 503; backup: connect refused`.
    UpstreamFailed {
        attempts: String,
        /// Every attempt was a 429 naming its wait: the shortest of them.
        retry_after: Option<Duration>,
    },
    /// Every member was skipped; `members` reads `openai: circuit open;
    /// backup: cooling down after a 429`.
    UpstreamUnavailable {
        retry_after: Duration,
        members: String,
    },
    UpstreamTimeout {
        upstream: String,
        /// A pool's attempts, when more than this one was made: the
        /// members that failed before it are named too.
        attempts: Option<String>,
    },
    /// The shared state (Redis) failed and `state.on_error` is `deny`.
    StateUnavailable,
    /// Request bodies held whole passed `limits.max_buffered_bytes`.
    Overloaded,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::RouteNotFound => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientClosed => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ProxyError::NotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            ProxyError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::RateLimited { .. } | ProxyError::BudgetExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamUnavailable { .. }
            | ProxyError::StateUnavailable
            | ProxyError::Overloaded
            | ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `reason` label of `sluice_auth_failures_total`, for auth errors.
    pub fn auth_failure_reason(&self) -> Option<&'static str> {
        match self {
            ProxyError::Unauthorized { reason } => Some(reason),
            ProxyError::Forbidden => Some("forbidden"),
            ProxyError::RouteNotFound
            | ProxyError::MethodNotAllowed { .. }
            | ProxyError::TooLarge { .. }
            | ProxyError::RequestTimeout
            | ProxyError::ClientClosed
            | ProxyError::NotImplemented { .. }
            | ProxyError::InvalidRequest { .. }
            | ProxyError::UnsupportedEncoding
            | ProxyError::RateLimited { .. }
            | ProxyError::BudgetExceeded { .. }
            | ProxyError::UpstreamFailed { .. }
            | ProxyError::UpstreamUnavailable { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::StateUnavailable
            | ProxyError::Overloaded
            | ProxyError::ShuttingDown => None,
        }
    }

    /// The OpenAI-style `code`, also the access log's `error`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::RouteNotFound => "route_not_found",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::Unauthorized { .. } => "invalid_api_key",
            ProxyError::Forbidden => "forbidden",
            ProxyError::TooLarge { .. } => "request_too_large",
            ProxyError::RequestTimeout => "request_timeout",
            ProxyError::ClientClosed => "client_closed",
            ProxyError::NotImplemented { .. } => "not_implemented",
            ProxyError::InvalidRequest { .. } => "invalid_request",
            ProxyError::UnsupportedEncoding => "unsupported_content_encoding",
            ProxyError::RateLimited { .. } => "rate_limit_exceeded",
            ProxyError::BudgetExceeded { .. } => "budget_exceeded",
            ProxyError::UpstreamFailed { .. } => "upstream_error",
            ProxyError::UpstreamUnavailable { .. } => "upstream_unavailable",
            ProxyError::StateUnavailable => "state_unavailable",
            ProxyError::Overloaded => "server_overloaded",
            ProxyError::ShuttingDown => "server_shutdown",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProxyError::RouteNotFound
            | ProxyError::MethodNotAllowed { .. }
            | ProxyError::TooLarge { .. }
            | ProxyError::RequestTimeout
            | ProxyError::ClientClosed
            | ProxyError::NotImplemented { .. }
            | ProxyError::InvalidRequest { .. }
            | ProxyError::UnsupportedEncoding => "invalid_request_error",
            ProxyError::Unauthorized { .. } => "authentication_error",
            ProxyError::Forbidden => "permission_error",
            ProxyError::RateLimited { .. } => "rate_limit_error",
            ProxyError::BudgetExceeded { .. } => "insufficient_quota",
            ProxyError::UpstreamFailed { .. }
            | ProxyError::UpstreamUnavailable { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::StateUnavailable
            | ProxyError::Overloaded
            | ProxyError::ShuttingDown => "server_error",
        }
    }

    /// What went wrong with the upstreams, as the answer says it, for
    /// the access log: `error: upstream_error` alone leaves an operator
    /// to guess (an untrusted certificate, a refused port, a timeout).
    pub fn upstream_detail(&self) -> Option<String> {
        matches!(
            self,
            ProxyError::UpstreamFailed { .. }
                | ProxyError::UpstreamUnavailable { .. }
                | ProxyError::UpstreamTimeout { .. }
        )
        .then(|| self.message())
    }

    fn message(&self) -> String {
        match self {
            ProxyError::RouteNotFound => "no route matches this request".to_owned(),
            ProxyError::MethodNotAllowed { allow } => format!(
                "method not allowed on this route; allowed: {}",
                allow.to_str().unwrap_or("")
            ),
            ProxyError::Unauthorized { reason: "missing" } => {
                "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
                    .to_owned()
            }
            ProxyError::Unauthorized { .. } => "invalid API key or token".to_owned(),
            ProxyError::Forbidden => "this identity may not use this route".to_owned(),
            ProxyError::TooLarge { limit } => {
                format!("request body is larger than the limit of {limit} bytes")
            }
            ProxyError::RequestTimeout => {
                "the request body did not arrive in time (request_timeout, or the upstream's first_byte while it waited for it)".to_owned()
            }
            ProxyError::ClientClosed => {
                "the client closed the connection before its request body was sent".to_owned()
            }
            ProxyError::NotImplemented { message } => (*message).to_owned(),
            ProxyError::InvalidRequest { message, .. } => message.clone(),
            ProxyError::UnsupportedEncoding => {
                "this route reads request bodies (to validate them or count their tokens): send them uncompressed (no content-encoding)".to_owned()
            }
            ProxyError::RateLimited {
                over: Some((needed, limit)),
                ..
            } => format!(
                "this request needs about {needed} tokens, more than the limit of {limit} tokens per minute: reduce its input or max_tokens"
            ),
            ProxyError::RateLimited { limit, .. } => match *limit {
                "requests" => "rate limit exceeded: too many requests per minute; retry after the time in retry-after",
                "tokens" => "rate limit exceeded: too many tokens per minute; retry after the time in retry-after",
                "concurrency" => "rate limit exceeded: too many requests in flight at once; retry when one ends",
                _ => "rate limit exceeded; retry later",
            }
            .to_owned(),
            ProxyError::BudgetExceeded { .. } => {
                "the daily budget is spent; retry after 00:00 UTC".to_owned()
            }
            ProxyError::UpstreamFailed { attempts, .. } => {
                format!("every upstream attempt failed: {attempts}")
            }
            ProxyError::UpstreamUnavailable { members, .. } => {
                format!("every upstream is unavailable ({members}); retry later")
            }
            ProxyError::UpstreamTimeout {
                upstream,
                attempts: None,
            } => format!("upstream `{upstream}` did not answer in time"),
            ProxyError::UpstreamTimeout {
                upstream,
                attempts: Some(attempts),
            } => format!("upstream `{upstream}` did not answer in time (attempts: {attempts})"),
            ProxyError::StateUnavailable => {
                "the shared limit store is unavailable; retry later".to_owned()
            }
            ProxyError::Overloaded => {
                "the gateway is holding too many request bodies (limits.max_buffered_bytes); retry shortly".to_owned()
            }
            ProxyError::ShuttingDown => {
                "the gateway is shutting down and its grace ran out before this request was answered; retry".to_owned()
            }
        }
    }

    /// The response sluice sends for this error.
    pub fn into_response(self) -> Response<BoxBody> {
        // 499 is a log's word for a client gone (nginx never sends it):
        // one that only half-closed still reads the answer, and an HTTP
        // status (its body ended before its length: a bad request).
        let status = match self {
            ProxyError::ClientClosed => StatusCode::BAD_REQUEST,
            _ => self.status(),
        };
        let param = match &self {
            ProxyError::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        };
        let body = error_body(&self.message(), self.kind(), param, self.code());
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ProxyError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, allow);
            }
            ProxyError::UnsupportedEncoding => {
                headers.insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
            }
            ProxyError::Unauthorized { .. } => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ProxyError::RateLimited {
                retry_after, over, ..
            } => {
                headers.insert(header::RETRY_AFTER, secs_header(retry_after));
                headers.insert(RETRY_AFTER_MS, millis_header(retry_after));
                // A request over the limit on its own never fits: an SDK
                // that waited and sent it again would only be refused again.
                if over.is_some() {
                    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
                }
            }
            ProxyError::BudgetExceeded { retry_after } => {
                headers.insert(header::RETRY_AFTER, secs_header(retry_after));
                // Until midnight UTC: past what SDKs wait for a
                // `retry-after`, so they would retry at once, in vain.
                headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
            }
            ProxyError::UpstreamUnavailable { retry_after, .. }
            | ProxyError::UpstreamFailed {
                retry_after: Some(retry_after),
                ..
            } => {
                headers.insert(header::RETRY_AFTER, secs_header(retry_after));
            }
            ProxyError::RouteNotFound
            | ProxyError::Forbidden
            | ProxyError::TooLarge { .. }
            | ProxyError::RequestTimeout
            | ProxyError::ClientClosed
            | ProxyError::NotImplemented { .. }
            | ProxyError::InvalidRequest { .. }
            | ProxyError::UpstreamFailed { .. }
            | ProxyError::UpstreamTimeout { .. } => {}
            ProxyError::StateUnavailable | ProxyError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::ShuttingDown => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                // Closed after this answer: a retry goes to a new
                // connection, to a replica that is not stopping.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        resp
    }
}

/// An error's body in the SPEC's (OpenAI's) shape:
/// `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: &str) -> String {
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
        }
    })
    .to_string()
}

/// Whole seconds, rounded up so a client never retries too early.
/// Whole milliseconds, rounded up as [`secs_header`] rounds seconds, and
/// at least 1: a client retrying at once, or a millisecond short of the
/// wait, is refused again.
fn millis_header(d: Duration) -> HeaderValue {
    let millis = d.as_micros().div_ceil(1000).max(1);
    HeaderValue::from(u64::try_from(millis).unwrap_or(u64::MAX))
}

fn secs_header(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait is never told shorter than it is: a client that retries
    /// exactly when told must find the bucket ready.
    #[test]
    fn waits_are_rounded_up() {
        let ms = |micros| millis_header(Duration::from_micros(micros));
        assert_eq!(ms(999_001), "1000");
        assert_eq!(ms(10_000_500), "10001");
        assert_eq!(ms(2_000_000), "2000");
        assert_eq!(ms(1), "1");
        assert_eq!(ms(0), "1", "never 0 on a refusal");
        assert_eq!(secs_header(Duration::from_micros(10_000_500)), "11");
    }
}
