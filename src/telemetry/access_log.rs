//! The access log: one event per request, written when its response body
//! ends (or the client goes away), from what the request context gathered.
//! Identities are logged by their `id`, never by their credential.

use std::fmt::Write as _;
use std::time::Duration;

use crate::proxy::cache::CacheStatus;
use crate::proxy::ctx::{IdentityId, RequestCtx};
use crate::snapshot::LogFormat;
use crate::telemetry::log::JsonEscape;

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

/// The one field of a JSON access-log event: its members, rendered
/// already (`,"request_id":"…",…`), which the JSON line format writes as
/// they are.
pub const RENDERED_FIELD: &str = "access_fields";

/// Writes the access-log event of a finished request.
///
/// In JSON, the line's members are rendered straight into one buffer
/// (numbers by `itoa`/`ryu`, strings escaped in runs) and handed to
/// `tracing` as one field: the same filter and writer as every other
/// event, at a fraction of the cost of visiting twenty fields through
/// `fmt`. This runs once per request.
pub fn emit(dispatch: &tracing::Dispatch, format: LogFormat, ctx: &RequestCtx, latency: Duration) {
    tracing::dispatcher::with_default(dispatch, || {
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        match format {
            LogFormat::Json => {
                let fields = render(ctx, latency);
                tracing::info!(target: ACCESS_TARGET, access_fields = fields.as_str(), "request");
            }
            LogFormat::Text => emit_fields(ctx, latency),
        }
    });
}

/// The identity as logged: a key's `id`, or an anonymous caller's address.
fn identity(ctx: &RequestCtx) -> Option<IdentityLabel<'_>> {
    match ctx.identity.as_ref().map(|i| &i.id) {
        Some(IdentityId::Key(id)) => Some(IdentityLabel::Id(id)),
        // Anonymous callers are known by the connection's address, which
        // the listener rendered once per connection.
        Some(IdentityId::Ip(addr)) if *addr == ctx.client_addr.ip() => {
            Some(IdentityLabel::Id(ctx.client_ip.to_str().unwrap_or("-")))
        }
        Some(IdentityId::Ip(addr)) => Some(IdentityLabel::Ip(*addr)),
        None => None,
    }
}

enum IdentityLabel<'a> {
    Id(&'a str),
    Ip(std::net::IpAddr),
}

/// `,"name":value` for every field of [`ACCESS_FIELDS`], in that order,
/// then the body-log fields when `log_bodies` filled them.
fn render(ctx: &RequestCtx, latency: Duration) -> String {
    let mut out = Line(String::with_capacity(512));
    out.str_field("request_id", ctx.request_id.to_str().ok().or(Some("-")));
    out.str_field("route", ctx.route.as_deref());
    out.str_field("method", Some(ctx.method.as_str()));
    out.str_field("path", Some(ctx.uri.path()));
    out.uint_field("status", Some(u64::from(ctx.status)));
    out.key("latency_ms");
    out.millis(latency);
    match identity(ctx) {
        Some(IdentityLabel::Id(id)) => out.str_field("identity", Some(id)),
        Some(IdentityLabel::Ip(ip)) => out.str_field("identity", Some(&ip.to_string())),
        None => out.str_field("identity", None),
    }
    out.str_field(
        "tier",
        ctx.identity.as_ref().and_then(|i| i.tier.as_deref()),
    );
    out.str_field("upstream", ctx.upstream.as_deref());
    out.uint_field("attempts", Some(u64::from(ctx.attempts)));
    out.str_field("cache", ctx.cache.map(CacheStatus::label));
    out.str_field("model", ctx.model.as_deref());
    out.uint_field("input_tokens", ctx.input_tokens);
    out.uint_field("output_tokens", ctx.output_tokens);
    out.key("cost_usd");
    match ctx.cost_usd.filter(|c| c.is_finite()) {
        Some(cost) => out.0.push_str(ryu::Buffer::new().format_finite(cost)),
        None => out.0.push_str("null"),
    }
    out.str_field("error", ctx.error);
    out.str_field("client_ip", Some(ctx.client_ip.to_str().unwrap_or("-")));
    if let Some(body) = ctx.request_body.as_deref() {
        out.str_field("request_body", Some(body));
    }
    if let Some(body) = ctx.response_body.as_deref() {
        out.str_field("response_body", Some(body));
    }
    out.0
}

/// A JSON object's members being written.
struct Line(String);

impl Line {
    fn key(&mut self, name: &str) {
        self.0.push_str(",\"");
        self.0.push_str(name);
        self.0.push_str("\":");
    }

    fn str_field(&mut self, name: &str, value: Option<&str>) {
        self.key(name);
        match value {
            Some(v) => {
                self.0.push('"');
                // Writing to a `String` cannot fail.
                let _ = JsonEscape(&mut self.0).write_str(v);
                self.0.push('"');
            }
            None => self.0.push_str("null"),
        }
    }

    fn uint_field(&mut self, name: &str, value: Option<u64>) {
        self.key(name);
        match value {
            Some(v) => self.0.push_str(itoa::Buffer::new().format(v)),
            None => self.0.push_str("null"),
        }
    }

    /// A duration as milliseconds with three decimals (microseconds).
    fn millis(&mut self, d: Duration) {
        let micros = d.as_micros();
        self.0.push_str(itoa::Buffer::new().format(micros / 1000));
        let frac = (micros % 1000) as u16;
        self.0.push('.');
        self.0.push(char::from(b'0' + (frac / 100) as u8));
        self.0.push(char::from(b'0' + (frac / 10 % 10) as u8));
        self.0.push(char::from(b'0' + (frac % 10) as u8));
    }
}

/// The access-log event as separate fields, for the human text format.
fn emit_fields(ctx: &RequestCtx, latency: Duration) {
    let ip;
    let identity = match identity(ctx) {
        Some(IdentityLabel::Id(id)) => Some(id),
        Some(IdentityLabel::Ip(addr)) => {
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
        client_ip = ctx.client_ip.to_str().unwrap_or("-"),
        request_body = ctx.request_body.as_deref(),
        response_body = ctx.response_body.as_deref(),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_every_field_in_order() {
        use crate::proxy::ctx::{ConnInfo, Identity};
        let conn = ConnInfo::new("10.1.2.3:5555".parse().unwrap(), false);
        let mut ctx = RequestCtx::new(
            http::Method::POST,
            "/v1/chat/completions?x=1".parse().unwrap(),
            http::HeaderValue::from_static("req-\"1"),
            &conn,
        );
        ctx.status = 200;
        ctx.identity = Some(Identity {
            id: IdentityId::Ip(conn.remote.ip()),
            tier: None,
        });
        ctx.input_tokens = Some(12);
        ctx.cost_usd = Some(0.000_015);
        let members = render(&ctx, Duration::from_micros(1_500));
        let line: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{{}}}", &members[1..])).unwrap();
        assert_eq!(line.len(), ACCESS_FIELDS.len());
        let positions: Vec<usize> = ACCESS_FIELDS
            .iter()
            .map(|name| {
                let key = format!(",\"{name}\":");
                assert_eq!(members.matches(&key).count(), 1, "{name} once");
                members.find(&key).expect(name)
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{members}");
        assert_eq!(line["request_id"], "req-\"1");
        assert_eq!(line["path"], "/v1/chat/completions");
        assert_eq!(line["status"], 200);
        assert_eq!(line["latency_ms"], 1.5);
        assert_eq!(line["identity"], "10.1.2.3");
        assert_eq!(line["client_ip"], "10.1.2.3");
        assert_eq!(line["input_tokens"], 12);
        assert_eq!(line["output_tokens"], serde_json::Value::Null);
        assert_eq!(line["cost_usd"], 0.000_015);
        assert_eq!(line["route"], serde_json::Value::Null);
    }

    #[test]
    fn millis_keep_microseconds() {
        let mut line = Line(String::new());
        line.millis(Duration::from_micros(12_045));
        line.0.push(' ');
        line.millis(Duration::from_micros(7));
        assert_eq!(line.0, "12.045 0.007");
    }
}
