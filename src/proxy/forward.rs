//! Phase 6, forwarding: sends the request to the route's upstream (a real
//! server through its pooled client, or the in-process mock) and returns
//! the response head as soon as it arrives; the body streams on. Pools
//! currently send to their first member; the failover loop lands here.

use std::error::Error as StdError;
use std::time::Instant;

use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::ctx::RequestCtx;
use super::error::ProxyError;
use super::headers;
use super::validate::CappedBody;
use crate::body::{BodyError, BoxBody};
use crate::gateway::Active;
use crate::snapshot::{AuthMode, Route, Target};
use crate::telemetry::metrics::{Outcome, UpstreamMetrics};
use crate::upstream::{Upstream, UpstreamKind, mock};

/// Why an attempt failed, as a metric label and a safe human phrase.
struct AttemptFailure {
    outcome: Outcome,
    text: &'static str,
}

const TIMED_OUT: AttemptFailure = AttemptFailure {
    outcome: Outcome::Timeout,
    text: "timed out",
};

pub async fn send(
    active: &Active,
    route: &Route,
    ctx: &mut RequestCtx,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ProxyError> {
    let snap = &active.snapshot;
    let (index, upstream, metrics) =
        pick(active, route).ok_or_else(|| ProxyError::UpstreamFailed {
            attempts: "no upstream configured".to_owned(),
        })?;
    let (mut parts, body) = req.into_parts();
    headers::to_upstream(
        &mut parts.headers,
        ctx,
        upstream,
        route.auth != AuthMode::None,
    );
    let limit = snap.limits.max_request_body;
    let (body, over_limit) = CappedBody::new(body, limit);
    let body = body.boxed_unsync();

    let started = Instant::now();
    ctx.upstream = Some(upstream.name.clone());
    ctx.upstream_index = Some(index);
    ctx.attempts += 1;
    ctx.upstream_started = Some(started);
    // One clock read serves the attempt's start and its deadline: the
    // sooner of first_byte and what is left of request_timeout.
    let deadline = (started + upstream.timeouts.first_byte)
        .min(ctx.started + snap.limits.request_timeout)
        .into();

    let result: Result<Response<BoxBody>, AttemptFailure> = match &upstream.kind {
        UpstreamKind::Http(http) => {
            parts.uri = http.uri_for(parts.uri.path_and_query()).map_err(|_| {
                ProxyError::InvalidRequest {
                    message: "the request path cannot be forwarded".to_owned(),
                }
            })?;
            // The pooled client picks HTTP/1.1 or HTTP/2 per connection (ALPN),
            // whatever the client spoke to us.
            parts.version = Version::HTTP_11;
            match tokio::time::timeout_at(
                deadline,
                http.client.request(Request::from_parts(parts, body)),
            )
            .await
            {
                Err(_) => Err(TIMED_OUT),
                Ok(Err(e)) => Err(classify(&e)),
                Ok(Ok(resp)) => Ok(resp.map(|b| b.map_err(BodyError::new).boxed_unsync())),
            }
        }
        UpstreamKind::Mock(settings) => {
            match tokio::time::timeout_at(
                deadline,
                mock::respond(settings, Request::from_parts(parts, body)),
            )
            .await
            {
                Err(_) => Err(TIMED_OUT),
                Ok(resp) => Ok(resp),
            }
        }
    };
    let elapsed = started.elapsed();
    ctx.upstream_wait += elapsed;
    let name = &*upstream.name;
    if over_limit.is_set() {
        metrics.outcome(Outcome::ClientError).inc();
        return Err(ProxyError::TooLarge { limit });
    }
    match result {
        Ok(mut resp) => {
            metrics.first_byte.observe(elapsed.as_secs_f64());
            metrics
                .outcome(Outcome::of_status(resp.status().as_u16()))
                .inc();
            headers::to_client(resp.headers_mut());
            ctx.upstream_idle = Some(upstream.timeouts.idle);
            Ok(resp)
        }
        Err(failure) => {
            ctx.upstream_started = None;
            metrics.outcome(failure.outcome).inc();
            if failure.outcome == Outcome::Timeout {
                Err(ProxyError::UpstreamTimeout {
                    upstream: name.to_owned(),
                })
            } else {
                Err(ProxyError::UpstreamFailed {
                    attempts: format!("{name}: {}", failure.text),
                })
            }
        }
    }
}

/// The upstream a route sends to: its index, config and metrics.
fn pick<'a>(
    active: &'a Active,
    route: &Route,
) -> Option<(usize, &'a Upstream, &'a UpstreamMetrics)> {
    let snap = &active.snapshot;
    let index = match route.target {
        Target::Upstream(i) => i,
        Target::Pool(p) => *snap.pools.get(p)?.members.first()?,
    };
    Some((
        index,
        snap.upstreams.get(index)?,
        active.upstreams.get(index)?,
    ))
}

/// Names a client error without its text (which may carry an address).
fn classify(e: &hyper_util::client::legacy::Error) -> AttemptFailure {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    let mut tls = false;
    let mut io_kind = None;
    while let Some(err) = source {
        if err.downcast_ref::<rustls::Error>().is_some() {
            tls = true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
            tls |= wraps_rustls_error(io);
        }
        source = err.source();
    }
    if tls {
        return AttemptFailure {
            outcome: Outcome::TlsError,
            text: "TLS handshake failed",
        };
    }
    if e.is_connect() {
        let text = match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => "connect refused",
            Some(std::io::ErrorKind::TimedOut) => "connect timed out",
            _ => "connect failed",
        };
        return AttemptFailure {
            outcome: Outcome::ConnectError,
            text,
        };
    }
    AttemptFailure {
        outcome: Outcome::ConnectionError,
        text: "connection closed before the response",
    }
}

/// Whether an I/O error carries a rustls error, however deeply wrapped.
/// `io::Error::source` skips the error it wraps, so the chain is walked
/// through `get_ref` instead.
fn wraps_rustls_error(io: &std::io::Error) -> bool {
    let mut inner = io.get_ref();
    while let Some(err) = inner {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
    }
    false
}
