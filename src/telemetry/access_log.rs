//! The access log: one event per request, written when its response body
//! ends (or the client goes away), from what the request context gathered.
//! Identities are logged by their `id`, never by their credential.

use std::time::Duration;

use crate::proxy::cache::CacheStatus;
use crate::proxy::ctx::{IdentityId, RequestCtx};

/// The `target` of access-log events.
pub const ACCESS_TARGET: &str = "sluice::access";

/// Every field of an access-log line (SPEC §5); those a request did not
/// fill are written as `null`.
pub const ACCESS_FIELDS: [&str; 17] = [
    "request_id",
    "route",
    "method",
    "path",
    "status",
    "latency_ms",
    "identity",
    "tier",
    "upstream",
    "attempts",
    "cache",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "error",
    "client_ip",
];

/// Writes the access-log event of a finished request.
pub fn emit(dispatch: &tracing::Dispatch, ctx: &RequestCtx, latency: Duration) {
    tracing::dispatcher::with_default(dispatch, || {
        let ip;
        let identity = match ctx.identity.as_ref().map(|i| &i.id) {
            Some(IdentityId::Key(id)) => Some(&**id),
            Some(IdentityId::Ip(addr)) => {
                ip = addr.to_string();
                Some(ip.as_str())
            }
            None => None,
        };
        tracing::info!(
            target: ACCESS_TARGET,
            request_id = ctx.request_id.to_str().unwrap_or("-"),
            route = ctx.route.as_deref(),
            method = ctx.method.as_str(),
            path = ctx.uri.path(),
            status = ctx.status,
            latency_ms = latency.as_micros() as f64 / 1000.0,
            identity,
            tier = ctx.identity.as_ref().and_then(|i| i.tier.as_deref()),
            upstream = ctx.upstream.as_deref(),
            attempts = ctx.attempts,
            cache = ctx.cache.map(CacheStatus::label),
            model = ctx.model.as_deref(),
            input_tokens = ctx.input_tokens,
            output_tokens = ctx.output_tokens,
            cost_usd = ctx.cost_usd,
            error = ctx.error,
            client_ip = %ctx.client_addr.ip(),
            request_body = ctx.request_body.as_deref(),
            response_body = ctx.response_body.as_deref(),
            "request"
        );
    });
}
