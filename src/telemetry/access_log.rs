//! The access log: one event per request, written when its response body
//! ends (or the client goes away), from what the request context gathered.
//! Identities are logged by their `id`, never by their credential.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::Duration;

use crate::proxy::cache::CacheStatus;
use crate::proxy::ctx::{IdentityId, RequestCtx};
use crate::snapshot::LogFormat;
use crate::telemetry::log::{JsonEscape, Log, write_line_head};
use crate::telemetry::scrub::Scrub;

/// The `target` of access-log events.
pub const ACCESS_TARGET: &str = "sluice::access";

/// Every field of an access-log line (SPEC §5); those a request did not
/// fill are written as `null`.
pub const ACCESS_FIELDS: [&str; 18] = [
    "request_id",
    "route",
    "method",
    "path",
    "status",
    "latency_ms",
    "identity",
    "identity_kind",
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

/// Writes the access-log line of a finished request.
///
/// In JSON, the whole line is rendered straight into one reused buffer
/// (numbers by `itoa`/`ryu`, strings escaped in runs, member names
/// spelled at compile time) and handed to the log's writer, which the
/// other events share: the same stream, the same `SLUICE_LOG` switch, at
/// a fraction of the cost of a `tracing` event visiting twenty fields.
/// This runs once per request.
pub fn emit(log: &Log, format: LogFormat, scrub: &Scrub, ctx: &RequestCtx, latency: Duration) {
    if !log.access {
        return;
    }
    match format {
        LogFormat::Json => LINE.with(|line| {
            // A line being written on this thread already (not expected:
            // nothing below logs) gets a buffer of its own.
            let mut own = String::new();
            let mut held = line.try_borrow_mut();
            let out = match held.as_deref_mut() {
                Ok(buf) => buf,
                Err(_) => &mut own,
            };
            out.clear();
            // Only a clock past year 9999 fails (as every line then does).
            if render_line(out, scrub, ctx, latency).is_ok() {
                log.lines.write_line(out.as_bytes());
            }
            // A rare huge line (logged bodies) does not stay allocated.
            if out.capacity() > LINE_KEEP {
                *out = String::with_capacity(LINE_CAPACITY);
            }
        }),
        LogFormat::Text => tracing::dispatcher::with_default(&log.dispatch, || {
            emit_fields(scrub, ctx, latency);
        }),
    }
}

/// The buffer a thread renders its access-log lines in.
const LINE_CAPACITY: usize = 1024;
/// Above this, a line's buffer is given back rather than kept.
const LINE_KEEP: usize = 16 * 1024;

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(LINE_CAPACITY));
}

/// One whole JSON line: the members every line starts with, `message`,
/// then [`render`]'s.
fn render_line(
    out: &mut String,
    scrub: &Scrub,
    ctx: &RequestCtx,
    latency: Duration,
) -> std::fmt::Result {
    write_line_head(out, &tracing::Level::INFO, ACCESS_TARGET)?;
    out.push_str(",\"message\":\"request\"");
    render(out, scrub, ctx, latency);
    out.push_str("}\n");
    Ok(())
}

/// The identity as logged: a key's `id`, or an anonymous caller's address.
fn identity(ctx: &RequestCtx) -> Option<IdentityLabel<'_>> {
    match ctx.identity.as_ref().map(|i| &i.id) {
        Some(IdentityId::Key(id) | IdentityId::Subject(id)) => Some(IdentityLabel::Id(id)),
        // Anonymous callers are known by the connection's address, which
        // the listener rendered once per connection.
        Some(IdentityId::Ip(addr)) if *addr == ctx.client_addr.ip() => {
            Some(IdentityLabel::Id(ctx.client_ip.to_str().unwrap_or("-")))
        }
        Some(IdentityId::Ip(addr)) => Some(IdentityLabel::Ip(*addr)),
        None => None,
    }
}

/// What the identity is known by: an API key's `id`, a JWT's subject
/// and an anonymous caller's address may be spelled alike (a token's
/// `sub: team-a`, a key `id: team-a`), and are not the same caller.
fn identity_kind(ctx: &RequestCtx) -> Option<&'static str> {
    ctx.identity.as_ref().map(|i| match i.id {
        IdentityId::Key(_) => "api_key",
        IdentityId::Subject(_) => "jwt",
        IdentityId::Ip(_) => "anonymous",
    })
}

/// The model the answer named, else the one the request named (read
/// where limits or budgets read the body): a refusal is logged with the
/// model it refused.
fn logged_model(ctx: &RequestCtx) -> Option<&str> {
    ctx.model.as_deref().or(ctx.requested_model.as_deref())
}

/// A text the client chose (its path, its request id, the model it
/// asked for), as logged: with any secret it holds masked.
fn scrubbed<'a>(scrub: &Scrub, ctx: &RequestCtx, text: &'a str) -> std::borrow::Cow<'a, str> {
    scrub.scrub(text, &ctx.presented)
}

/// The request id as logged: the client's masked as its other texts
/// are; one sluice made holds nothing to mask.
fn logged_request_id<'a>(scrub: &Scrub, ctx: &'a RequestCtx) -> std::borrow::Cow<'a, str> {
    let id = ctx.request_id.to_str().unwrap_or("-");
    if ctx.request_id_given {
        scrubbed(scrub, ctx, id)
    } else {
        std::borrow::Cow::Borrowed(id)
    }
}

enum IdentityLabel<'a> {
    Id(&'a str),
    Ip(std::net::IpAddr),
}

/// A member's start, `,"name":`, spelled at compile time.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// `,"name":value` for every field of [`ACCESS_FIELDS`], in that order,
/// then the body-log fields when `log_bodies` filled them.
fn render(out: &mut String, scrub: &Scrub, ctx: &RequestCtx, latency: Duration) {
    let mut out = Line(out);
    out.str_field(key!("request_id"), Some(&logged_request_id(scrub, ctx)));
    out.str_field(key!("route"), ctx.route.as_deref());
    let head = (!ctx.head_unread).then_some(ctx);
    out.str_field(key!("method"), head.map(|c| c.method.as_str()));
    out.str_field(
        key!("path"),
        head.map(|c| scrubbed(scrub, c, c.uri.path())).as_deref(),
    );
    out.uint_field(key!("status"), Some(u64::from(ctx.status)));
    out.0.push_str(key!("latency_ms"));
    out.millis(latency);
    match identity(ctx) {
        Some(IdentityLabel::Id(id)) => out.str_field(key!("identity"), Some(id)),
        Some(IdentityLabel::Ip(ip)) => out.str_field(key!("identity"), Some(&ip.to_string())),
        None => out.str_field(key!("identity"), None),
    }
    out.str_field(key!("identity_kind"), identity_kind(ctx));
    out.str_field(
        key!("tier"),
        ctx.identity.as_ref().and_then(|i| i.tier.as_deref()),
    );
    out.str_field(key!("upstream"), ctx.upstream.as_deref());
    out.uint_field(key!("attempts"), Some(u64::from(ctx.attempts)));
    out.str_field(key!("cache"), ctx.cache.map(CacheStatus::label));
    out.str_field(
        key!("model"),
        logged_model(ctx)
            .map(|m| scrubbed(scrub, ctx, m))
            .as_deref(),
    );
    out.uint_field(key!("input_tokens"), ctx.input_tokens);
    out.uint_field(key!("output_tokens"), ctx.output_tokens);
    out.0.push_str(key!("cost_usd"));
    match ctx.cost_usd.filter(|c| c.is_finite()) {
        Some(cost) => out.0.push_str(ryu::Buffer::new().format_finite(cost)),
        None => out.0.push_str("null"),
    }
    out.str_field(key!("error"), ctx.error);
    out.str_field(
        key!("client_ip"),
        Some(ctx.client_ip.to_str().unwrap_or("-")),
    );
    if let Some(detail) = ctx.error_detail.as_deref() {
        out.str_field(key!("error_detail"), Some(detail));
    }
    if let Some(body) = ctx.request_body.as_deref() {
        out.str_field(key!("request_body"), Some(body));
    }
    if let Some(body) = ctx.response_body.as_deref() {
        out.str_field(key!("response_body"), Some(body));
    }
}

/// A JSON object's members being written.
struct Line<'a>(&'a mut String);

impl Line<'_> {
    /// `key` is a member's start, as [`key!`] spells it.
    fn str_field(&mut self, key: &str, value: Option<&str>) {
        self.0.push_str(key);
        match value {
            Some(v) => {
                self.0.push('"');
                // Writing to a `String` cannot fail.
                let _ = JsonEscape(&mut *self.0).write_str(v);
                self.0.push('"');
            }
            None => self.0.push_str("null"),
        }
    }

    fn uint_field(&mut self, key: &str, value: Option<u64>) {
        self.0.push_str(key);
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
fn emit_fields(scrub: &Scrub, ctx: &RequestCtx, latency: Duration) {
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
        request_id = &*logged_request_id(scrub, ctx),
        route = ctx.route.as_deref(),
        method = (!ctx.head_unread).then(|| ctx.method.as_str()),
        path = (!ctx.head_unread).then(|| scrubbed(scrub, ctx, ctx.uri.path())).as_deref(),
        status = ctx.status,
        latency_ms = latency.as_micros() as f64 / 1000.0,
        identity,
        identity_kind = identity_kind(ctx),
        tier = ctx.identity.as_ref().and_then(|i| i.tier.as_deref()),
        upstream = ctx.upstream.as_deref(),
        attempts = ctx.attempts,
        cache = ctx.cache.map(CacheStatus::label),
        model = logged_model(ctx).map(|m| scrubbed(scrub, ctx, m)).as_deref(),
        input_tokens = ctx.input_tokens,
        output_tokens = ctx.output_tokens,
        cost_usd = ctx.cost_usd,
        error = ctx.error,
        error_detail = ctx.error_detail.as_deref(),
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
        let mut members = String::new();
        render(
            &mut members,
            &Scrub::default(),
            &ctx,
            Duration::from_micros(1_500),
        );
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
        assert_eq!(line["identity_kind"], "anonymous");
        assert_eq!(line["client_ip"], "10.1.2.3");
        assert_eq!(line["input_tokens"], 12);
        assert_eq!(line["output_tokens"], serde_json::Value::Null);
        assert_eq!(line["cost_usd"], 0.000_015);
        assert_eq!(line["route"], serde_json::Value::Null);
    }

    #[test]
    fn millis_keep_microseconds() {
        let mut text = String::new();
        let mut line = Line(&mut text);
        line.millis(Duration::from_micros(12_045));
        line.0.push(' ');
        line.millis(Duration::from_micros(7));
        assert_eq!(text, "12.045 0.007");
    }
}
