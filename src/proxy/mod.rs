//! The request path: [`handle`] runs the phases of SPEC §3 in order, each
//! either filling in the [`RequestCtx`] and continuing, or answering with a
//! [`ProxyError`]. The order is the design:
//!
//! 1. `route::select`: everything after depends on the route (404/405);
//!    `cors` preflights are answered right after it, before auth, because
//!    browsers send them without credentials.
//! 2. `auth::identify`: before limits, so limits key on the identity (401/403).
//! 3. `validate`: size and shape before anything costs upstream money (413/400).
//! 4. `limit::admit`: a cache hit still counts as a request, so limits come
//!    before the cache (429).
//! 5. `cache::lookup`: a hit answers here, and identical requests in flight
//!    wait for the first; a miss is stored by the tap as it streams.
//! 6. `forward::send`: the upstream call (502/504).
//!
//! Whatever the outcome, the response body is wrapped in the tap, which
//! writes metrics and the access log once the body has ended; a request
//! whose client leaves before it is answered is accounted for when its
//! future is dropped (`tap::Finish`).

pub mod auth;
pub mod buffered;
pub mod cache;
pub mod cors;
pub mod ctx;
pub mod error;
pub mod forward;
pub mod headers;
pub mod jwks;
pub mod jwt;
pub mod limit;
pub mod route;
pub mod validate;

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::BoxBody;
use crate::gateway::{Active, Gateway};
use crate::llm::sse;
use crate::llm::tap::{Finish, Tap};
use crate::llm::usage::Meter;
use crate::telemetry::body_log::BodyLog;
use ctx::{ConnInfo, RequestCtx};
use error::ProxyError;

/// Serves one request from start to the response head; the body streams
/// through the returned tap.
pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> Response<Tap> {
    let active = gw.active();
    let clients_id = headers::clients_request_id(req.headers());
    let request_id_given = clients_id.is_some();
    let request_id = clients_id.unwrap_or_else(headers::new_request_id);
    // Boxed: the ctx travels from the phases into the tap and the response,
    // and a pointer moves where hundreds of bytes would be copied.
    let ctx = Box::new(RequestCtx::new(
        req.method().clone(),
        req.uri().clone(),
        request_id,
        &conn,
    ));
    // Accounts for the request if this future is dropped before the tap
    // takes it over (the client went away while it waited).
    let mut finish = Finish::new(gw, active, ctx);
    let Finish {
        gw, active, ctx, ..
    } = &mut finish;

    ctx.presented = ctx::Presented::of(req.headers());
    ctx.request_id_given = request_id_given;
    ctx.answering = Some(ctx::Answering::new(&conn));
    ctx.body_unread = declares_body_over_http1(&req);
    ctx.body_drainable = ctx.body_unread && is_small_and_sent(&req);
    let h2_drainable = req.version() == http::Version::HTTP_2
        && !http_body::Body::is_end_stream(req.body())
        && is_small_and_sent(&req);
    // The body, kept here until `process` takes it: a refusal can then
    // read what is left of a small one, and keep the connection.
    let mut unread = None;
    let req = req.map(|body| unread = Some(body));
    // Pinned where it is built: a select that took it by value would
    // copy the whole (large) future on every request.
    let result = {
        let mut processing = std::pin::pin!(process(gw, active, ctx, req, &mut unread));
        match &conn.unanswered {
            Some(unanswered) => {
                let told = unanswered.notified();
                let mut told = std::pin::pin!(told);
                // Registered before the flag is read: a cut that comes
                // between the two still wakes it, and one that came
                // before is seen.
                told.as_mut().enable();
                if gw.is_cutting() {
                    Err(ProxyError::ShuttingDown)
                } else {
                    tokio::select! {
                        biased;
                        result = &mut processing => result,
                        () = told => Err(ProxyError::ShuttingDown),
                    }
                }
            }
            None => processing.await,
        }
    };
    // What the log and metrics say: a client gone is 499 there, though
    // the answer (read only by a client that half-closed) says 400.
    let mut logged_status = None;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            ctx.error = Some(e.code());
            ctx.error_detail = e.upstream_detail();
            logged_status = Some(e.status().as_u16());
            let shutting_down = matches!(e, ProxyError::ShuttingDown);
            let mut resp = e.into_response();
            if ctx.body_unread
                && !(ctx.body_drainable && drain(unread.take(), &mut ctx.waiting).await)
            {
                // hyper closes a connection whose request body was left
                // unread once it has answered; saying so lets the client
                // open a new one rather than send its next request into a
                // closed socket (RFC 9112 §9.6), as nginx and Envoy do.
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            } else if h2_drainable && !shutting_down {
                // Over h2 an answer that ends before the request's body
                // resets the stream (RST_STREAM after it), and some
                // clients (curl 7.88) then drop the answer: a small body
                // is read first, as over HTTP/1.
                drain(unread.take(), &mut ctx.waiting).await;
            }
            resp
        }
    };
    ctx.status = logged_status.unwrap_or_else(|| resp.status().as_u16());
    // A HEAD answer has no content (its length is kept): hyper leaves the
    // body out over HTTP/1.1, but its HTTP/2 server would send it, and an
    // empty body is nothing to store.
    let head = ctx.method == http::Method::HEAD;
    let storable = match ctx.cache_fill.as_mut() {
        Some(fill) => {
            !head && ctx.error.is_none() && fill.accept_head(resp.status(), resp.headers())
        }
        None => true,
    };
    if !storable && let Some(fill) = ctx.cache_fill.take() {
        // Not stored. After a failure (sluice's error, an upstream 5xx or
        // 429) one waiting request takes its turn; after a final answer
        // they all go at once.
        let status = resp.status();
        let failed = ctx.error.is_some()
            || status.is_server_error()
            || status == http::StatusCode::TOO_MANY_REQUESTS;
        fill.abandon(!failed);
    }
    let route_metrics = active.route_metrics(ctx.route_index);
    cache::count_miss(ctx, route_metrics);
    if ctx.cache.is_none() && route_metrics.cached() {
        // Refused before the cache was consulted (auth, limits, body):
        // neither served from it nor stored, as SPEC §3 wants every
        // response of a cached route to say.
        cache::bypass(ctx, route_metrics);
    }
    if let Some(status) = ctx.cache {
        resp.headers_mut()
            .insert(headers::X_SLUICE_CACHE, status.header());
    }
    // Not when the shared state just failed: asking it again would only
    // delay the error.
    if ctx.identity.is_some()
        && ctx.error != Some("state_unavailable")
        && let Some(route) = ctx.route_index.and_then(|i| active.snapshot.routes.get(i))
        && limit::limits_unread(&active.snapshot, route, ctx)
    {
        // Answered without taking from the buckets (a cache hit, a
        // refusal before admission): the headers still say where they
        // stand, as on every response of a rate-limited route.
        limit::peek(&active.snapshot, &gw.state, route, ctx).await;
    }
    if let Some(decision) = ctx.rate_limit.as_ref() {
        limit::headers(decision, resp.headers_mut());
    }
    if let Some(decision) = ctx.token_limit.as_ref() {
        limit::token_headers(decision, resp.headers_mut());
    }
    // The upstream's own id is kept beside sluice's (no lookup more: the
    // insert hands back what it replaced).
    let response_headers = resp.headers_mut();
    if let Some(upstream_id) =
        response_headers.insert(headers::X_REQUEST_ID, ctx.request_id.clone())
        && upstream_id != ctx.request_id
    {
        response_headers.insert(headers::X_SLUICE_UPSTREAM_REQUEST_ID, upstream_id);
    }
    if let Some(allowed) = ctx.cors.take() {
        cors::decorate(allowed, resp.headers_mut());
    }

    let overhead = ctx.started.elapsed().saturating_sub(ctx.waiting);
    route_metrics.overhead.observe(overhead.as_secs_f64());

    let idle = ctx.upstream_idle;
    let deadline = ctx.deadline(&active.snapshot);
    // Only upstream answers are streams to guard and usage to meter.
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .filter(|_| ctx.upstream_index.is_some() && ctx.error.is_none());
    let sse = idle.is_some() && content_type.is_some_and(|v| sse::is_event_stream(v.as_bytes()));
    if idle.is_some()
        && (sse || may_outgrow_socket_buffers(resp.body()))
        && let Some(watch) = &conn.deadline
    {
        // A stream may outlive a client that stopped reading, which the
        // tap cannot see: the connection cuts it at the deadline.
        ctx.armed = Some(watch.arm(deadline));
    }
    let mut meter = content_type.and_then(|v| Meter::for_content_type(v.as_bytes()));
    if sse && let Some(meter) = meter.as_mut() {
        meter.whole_events();
        if ctx.usage_injected {
            meter.strip_usage_chunk();
        }
        // The client may get other bytes than the upstream sent (the
        // usage chunk cut out; half an event dropped and an error event
        // added when the stream breaks): a length the upstream gave would
        // cut the stream short, its end unread.
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    resp.map(move |body| {
        let body = if head { crate::body::empty() } else { body };
        Tap::new(body, finish, idle, deadline, sse, meter)
    })
}

/// Whether an HTTP/1 request comes with a body (a length above zero, or
/// chunks).
fn declares_body_over_http1(req: &Request<Incoming>) -> bool {
    req.version() <= http::Version::HTTP_11 && !http_body::Body::is_end_stream(req.body())
}

/// The most of a refused request's body read to keep its connection (a
/// chat request's size; larger ones close it, as before).
const DRAIN_BYTES: u64 = 64 * 1024;
/// How long a refusal waits for the rest of such a body. Most arrive
/// with their head; a slow one costs its connection, not the answer's
/// time.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether a refusal may read the request's body to keep the connection
/// open, as nginx discards a refused request's body: a declared length
/// of at most [`DRAIN_BYTES`], and no `expect: 100-continue` (reading
/// would ask the client for the body its refusal spares it).
fn is_small_and_sent(req: &Request<Incoming>) -> bool {
    let small = http_body::Body::size_hint(req.body())
        .exact()
        .is_some_and(|len| len <= DRAIN_BYTES);
    small && !req.headers().contains_key(http::header::EXPECT)
}

/// Reads a refused request's body to its end within [`DRAIN_WAIT`]:
/// whether it ended, so hyper can take the connection's next request.
/// The wait is the client's, not sluice's overhead.
async fn drain(body: Option<Incoming>, waiting: &mut std::time::Duration) -> bool {
    use http_body_util::BodyExt;
    let Some(mut body) = body else {
        return false;
    };
    let started = std::time::Instant::now();
    let read = async {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    let ended = tokio::time::timeout(DRAIN_WAIT, read)
        .await
        .unwrap_or(false);
    *waiting += started.elapsed();
    ended
}

/// Accounts for a request hyper refused before sluice saw it: a head
/// over the 64 KiB bound (431), a URI too long (414), a malformed request
/// line or header (400). hyper answers these itself, with an empty body;
/// this gives them the access-log line and the `sluice_requests_total`
/// count (route `none`, method `other`) every other answer has, so a
/// client failing this way shows up somewhere. Other connection errors
/// (a client gone, a timeout) are no answer and count nothing.
pub fn account_refused_head(
    gw: &Gateway,
    conn: &ConnInfo,
    error: &(dyn std::error::Error + 'static),
) {
    let Some(hyper_error) = error.downcast_ref::<hyper::Error>() else {
        return;
    };
    let Some((status, code)) = refused_head_status(hyper_error) else {
        return;
    };
    // The id the client was answered with (see `server::refusal`).
    let request_id = conn
        .refusal_id
        .get()
        .cloned()
        .unwrap_or_else(|| headers::request_id(&http::HeaderMap::new()));
    account_unread_head(gw, conn, status, code, request_id);
}

/// Logs and counts a request answered before its head was read (by
/// hyper, or a plain-HTTP request on the TLS listener), with `status`
/// and `code`.
pub fn account_unread_head(
    gw: &Gateway,
    conn: &ConnInfo,
    status: u16,
    code: &'static str,
    request_id: http::HeaderValue,
) {
    let active = gw.active();
    // Placeholders: the head was never read (logged as null).
    let Ok(method) = http::Method::from_bytes(b"UNREAD") else {
        return;
    };
    let mut ctx = RequestCtx::new(method, http::Uri::default(), request_id, conn);
    ctx.head_unread = true;
    ctx.status = status;
    ctx.error = Some(code);
    let unrouted = active.route_metrics(None);
    unrouted.count_request(&gw.metrics, &ctx.method, status);
    // Answered at once, by hyper: the histograms' counts still match the
    // requests counted.
    unrouted.duration.observe(0.0);
    unrouted.overhead.observe(0.0);
    crate::telemetry::access_log::emit(
        &gw.log,
        gw.log_format,
        &active.snapshot.logging.scrub,
        &ctx,
        std::time::Duration::ZERO,
    );
}

/// The status hyper's HTTP/1 server answered a refused head with (see
/// its `Server::on_error`), and the error code logged for it.
fn refused_head_status(e: &hyper::Error) -> Option<(u16, &'static str)> {
    if !e.is_parse() || e.is_parse_status() || e.is_parse_version_h2() {
        return None;
    }
    // hyper names apart the kinds its predicates share.
    let kind = e.to_string();
    if e.is_parse_too_large() {
        let status = if kind.contains("URI") { 414 } else { 431 };
        return Some((status, refused_head_code(status)));
    }
    // Internal parse failures get no answer from hyper.
    if kind.contains("internal") {
        return None;
    }
    Some((400, refused_head_code(400)))
}

/// The error code of a head refused with `status` (431 or 414: too
/// large; else malformed), in the log and in the answer alike.
pub fn refused_head_code(status: u16) -> &'static str {
    match status {
        431 | 414 => "request_too_large",
        _ => "invalid_request",
    }
}

/// An answer with no length, or one too long to sit whole in the
/// sockets' buffers: a client that stops reading it can stall it. A short
/// one is written out at once, whoever reads it.
/// (Read from the body's own size, which hyper took from its length:
/// no header lookup on every answer.)
fn may_outgrow_socket_buffers(body: &BoxBody) -> bool {
    use hyper::body::Body;
    const BUFFERED: u64 = 64 * 1024;
    body.size_hint().exact().is_none_or(|len| len > BUFFERED)
}

async fn process(
    gw: &Gateway,
    active: &Active,
    ctx: &mut RequestCtx,
    mut req: Request<()>,
    unread: &mut Option<Incoming>,
) -> Result<Response<BoxBody>, ProxyError> {
    let snap = &active.snapshot;
    // Routes match, and upstreams get, the path in normal form: one path
    // for both, whatever escapes or dot segments the client wrote.
    if let Some(path) = route::normalized(req.uri().path())
        && let Some(uri) = with_path(req.uri(), &path)
    {
        *req.uri_mut() = uri;
    }
    if req.method() == http::Method::CONNECT {
        // A tunnel request to a reverse proxy: no upstream can take it
        // (nginx answers it 400 too).
        return Err(ProxyError::InvalidRequest {
            message: "CONNECT is not supported: sluice is a reverse proxy".to_owned(),
            param: None,
        });
    }
    let host = route::request_host(req.version(), req.uri(), req.headers())?;
    // The route a reading of the path meets: an app may read the path
    // otherwise than as written, and every reading must meet the same
    // route, or one of them would pass another route's auth.
    let meets = |path: &str| {
        route::select(snap, req.method(), path, host, req.headers())
            .ok()
            .map(|(index, _)| index)
    };
    let slash_view = route::slashes_decoded(req.uri().path());
    if slash_view.is_some() {
        // An app may read `%2F` as `/`, and then `..` as a step up, or
        // not (Envoy's `path_with_escaped_slashes_action` refuses such
        // paths too).
        let written = meets(req.uri().path());
        // A reading that starts `//` is a host and a path to a URL
        // parser (`/\evil/v1/models` is host `evil`, path `/v1/models`),
        // whatever route the rest meets.
        let differs = route::slash_readings(req.uri().path()).iter().any(|view| {
            view.starts_with("//")
                || meets(view) != written
                || route::normalized(view).is_some_and(|p| meets(&p) != written)
        });
        if differs {
            return Err(ProxyError::InvalidRequest {
                message: "the path's escaped slashes (%2F, %5C) or backslashes would make it meet another route than as written; send them as `/`".to_owned(),
                param: None,
            });
        }
    }
    // The same for `;` parameters, which Java servers drop from each
    // segment: `..;` is a step up to them.
    if let Some(plain) = route::without_params(req.uri().path()) {
        let read = route::normalized(&plain).unwrap_or(plain);
        if meets(&read) != meets(req.uri().path()) {
            return Err(ProxyError::InvalidRequest {
                message: "the path's `;` parameters would make it meet another route than as written (a Java server reads `..;` as `..`)".to_owned(),
                param: None,
            });
        }
    }
    let (index, route) =
        match route::select(snap, req.method(), req.uri().path(), host, req.headers()) {
            Ok(found) => found,
            Err(refused) => {
                if let Some((index, route)) = refused.route {
                    // A 405 is the route's answer: logged and counted as
                    // its own, as any other refusal of the route is.
                    ctx.route = Some(route.name.clone());
                    ctx.route_index = Some(index);
                    active.route_metrics(ctx.route_index).in_flight.inc();
                    if let Some(rules) = &route.cors {
                        ctx.cors = Some(cors::allowed(rules, req.headers()));
                        if req.method() == http::Method::OPTIONS {
                            // A plain OPTIONS no route takes, on a CORS route
                            // whose `allow` names OPTIONS (its preflights):
                            // what it allows.
                            return Ok(cors::options(&route.allow));
                        }
                    }
                }
                return Err(refused.error);
            }
        };
    ctx.route = Some(route.name.clone());
    ctx.route_index = Some(index);
    // Decremented by the tap when the response ends, streams included.
    active.route_metrics(ctx.route_index).in_flight.inc();
    if let Some(rules) = &route.cors {
        let allowed = cors::allowed(rules, req.headers());
        let preflight = cors::is_preflight(req.method(), req.headers());
        let answer = preflight.then(|| cors::preflight(rules, allowed.is_allowed(), req.headers()));
        ctx.cors = Some(allowed);
        if let Some(answer) = answer {
            return Ok(answer);
        }
    }
    if headers::has_other_transfer_coding(req.headers()) {
        // hyper reads `gzip, chunked` as chunked, and the gzip would be
        // lost on the way: the upstream would get compressed bytes as the
        // body, with nothing saying so. Refused once routed, so that the
        // answer carries the route's headers (CORS, `x-sluice-cache`) as
        // its other refusals do.
        return Err(ProxyError::NotImplemented {
            message: "transfer codings other than chunked are not supported; send the body plain (or, where the route does not read it, with content-encoding)",
        });
    }
    if let Err(e) = auth::identify(snap, active.jwks.as_deref(), route, req.headers(), ctx).await {
        if let Some(reason) = e.auth_failure_reason() {
            gw.metrics
                .auth_failures
                .with_label_values(&[&route.name, reason])
                .inc();
        }
        return Err(e);
    }
    let max_body = snap.limits.max_request_body;
    validate::check_declared_size(req.headers(), max_body)?;
    let (parts, ()) = req.into_parts();
    // `handle` keeps the body until here, and nothing else takes it.
    let Some(body) = unread.take() else {
        return Err(ProxyError::ClientClosed);
    };
    let deadline = ctx.deadline(snap);
    let budget = gw.body_budget(snap);
    let route_path = slash_view.as_deref().unwrap_or(parts.uri.path());
    // A debug aid: the request body is read whole (bounded) to log it,
    // also one that validation then refuses.
    let log_body = |ctx: &mut RequestCtx, bytes: &[u8]| {
        if !snap.logging.log_bodies {
            return;
        }
        // The config's list, unless the request presented a credential.
        ctx.body_secrets = auth::credential(&parts.headers)
            .filter(|presented| !presented.is_empty())
            .map(|presented| snap.logging.known_secrets.with_presented(presented));
        let secrets = ctx
            .body_secrets
            .as_ref()
            .unwrap_or(&snap.logging.known_secrets);
        ctx.request_body = Some(BodyLog::of(bytes).render(&secrets.0));
    };
    let mut body = validate::check_body(
        &route.validate,
        &parts,
        route_path,
        ctx,
        body,
        max_body,
        deadline,
        budget,
        log_body,
    )
    .await?;
    if snap.logging.log_bodies && ctx.request_body.is_none() {
        let bytes = body
            .into_bytes(max_body, deadline, gw.body_budget(snap), &mut ctx.waiting)
            .await?;
        log_body(ctx, &bytes);
        body = forward::RequestBody::Read(bytes);
    }
    if let Err(refused) = limit::admit(snap, &gw.state, &gw.metrics, route, ctx).await {
        let token_limited = limit::token_limits_apply(snap, route, ctx);
        // The token buckets need the estimate, read from the body when
        // a refusal may read it at all (see `drain`); else they are left
        // out, and the body to `handle`.
        let bytes = match body {
            forward::RequestBody::Read(bytes) => bytes,
            forward::RequestBody::Streaming(body) if token_limited && ctx.body_drainable => {
                let by = deadline.min(std::time::Instant::now() + DRAIN_WAIT);
                let read = forward::RequestBody::Streaming(body)
                    .into_bytes(max_body, by, budget, &mut ctx.waiting)
                    .await;
                match read {
                    Ok(bytes) => {
                        ctx.body_unread = false;
                        bytes
                    }
                    Err(_) => return Err(refused),
                }
            }
            forward::RequestBody::Streaming(body) => {
                *unread = Some(body);
                return Err(refused);
            }
        };
        if !token_limited {
            return Err(refused);
        }
        let estimate = limit::estimate_tokens(&bytes).total();
        return Err(limit::covering_tokens(snap, &gw.state, route, ctx, refused, estimate).await);
    }
    // From here the body is read (for a cache key) or passed on.
    ctx.body_unread = false;
    match cache::lookup(gw, active, route, ctx, &parts, body).await? {
        cache::Step::Hit(resp) => Ok(resp),
        cache::Step::Forward(body) => forward::send(gw, active, route, ctx, parts, body).await,
    }
}

/// `uri` with its path replaced, its query kept.
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}
