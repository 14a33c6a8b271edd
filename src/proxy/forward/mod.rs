//! Phase 6, forwarding: sends the request to the route's upstream, or to
//! its pool's members in priority order, and returns the response head as
//! soon as one is good; the body streams on. For a pool, the request body
//! (bounded by `max_request_body`) is kept so it can be replayed to the
//! next member; a connect error, a timeout or a `retry_on` status moves
//! on, within `max_attempts`, skipping members whose circuit is open or
//! who asked for a pause (429 + `retry-after`).

mod attempt;
mod failover;
mod preamble;

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::buffered::Budget;
use super::ctx::RequestCtx;
use super::error::ProxyError;
use super::headers;
use super::limit;
use super::validate::{BodyProgress, CappedBody};
use crate::body::{self, BodyError, BoxBody, Joined};
use crate::gateway::{Active, Gateway};
use crate::llm::sse;
use crate::snapshot::{Pool, RetryOn, Route, Target};
use crate::telemetry::metrics::Outcome;
use crate::upstream::breaker::{Admit, Verdict};
use crate::upstream::client::ClientError;
use crate::upstream::{Upstream, UpstreamKind, mock, pool};

use attempt::{KEEP_ALIVE_RACE, attempt, attempt_asking_usage, copy_parts};
use failover::{Abandoned, count, count_answer, failover};
use preamble::{Preamble, hold_preamble, is_event_stream};

/// Why an attempt failed, as a metric label and a safe human phrase.
struct AttemptFailure {
    outcome: Outcome,
    text: &'static str,
}

impl AttemptFailure {
    /// The upstream did not answer in time (SPEC §3: 504), a connect that
    /// timed out included, as nginx answers it; such a connect still
    /// fails over as a connect error (`retry_on: connect`).
    fn late(&self) -> bool {
        self.outcome == Outcome::Timeout || self.text == CONNECT_TIMED_OUT
    }

    /// Says nothing of the member's health, so its circuit does not
    /// count it: sluice's own shortage (descriptors, ports), or a
    /// keep-alive race (the member answers on a new connection).
    fn excuses_member(&self) -> bool {
        self.outcome == Outcome::LocalError || self.text == KEEP_ALIVE_RACE
    }
}

/// What a connect that timed out is called in a 502's list and a 504.
const CONNECT_TIMED_OUT: &str = "connect timed out";

const TIMED_OUT: AttemptFailure = AttemptFailure {
    outcome: Outcome::Timeout,
    text: "timed out",
};

/// A request body as the phases before forwarding left it.
pub enum RequestBody {
    /// Not read yet: it may stream straight through.
    Streaming(Incoming),
    /// Read whole already (validation, the body log or the cache key
    /// needed it).
    Read(Bytes),
}

impl RequestBody {
    /// The whole body, read now (bounded by `limit`, and by `deadline`
    /// in time) unless it was already. The read is time spent waiting on
    /// the client, added to `waiting`: not sluice's overhead.
    pub async fn into_bytes(
        self,
        limit: u64,
        deadline: Instant,
        budget: Budget<'_>,
        waiting: &mut Duration,
    ) -> Result<Bytes, ProxyError> {
        match self {
            RequestBody::Read(bytes) => Ok(bytes),
            RequestBody::Streaming(body) => {
                let since = Instant::now();
                let read = read_body(body, limit, deadline, budget).await;
                *waiting += since.elapsed();
                read
            }
        }
    }
}

pub async fn send(
    gw: &Gateway,
    active: &Active,
    route: &Route,
    ctx: &mut RequestCtx,
    mut parts: Parts,
    body: RequestBody,
) -> Result<Response<BoxBody>, ProxyError> {
    let snap = &active.snapshot;
    headers::from_client(&mut parts.headers, ctx);
    let max_body = snap.limits.max_request_body;
    // The body is read whole (bounded) when it must be replayed (pools),
    // estimated (token limits) or edited (streamed chat or text
    // completions that did not ask for usage: both APIs take
    // `stream_options.include_usage`); otherwise it streams through.
    // Only these two APIs' paths: an app's own `/…/completions` behind the
    // sidecar, or another provider's (FIM), may refuse the extra member.
    // As routes and validation read it (`%2F` as `/`), so that a path an
    // app reads as chat completions is metered as one.
    let slash_view = super::route::slashes_decoded(parts.uri.path());
    let path = crate::llm::shape::routed_path(slash_view.as_deref().unwrap_or(parts.uri.path()));
    let completions = parts.method == http::Method::POST
        && (["/chat/completions", "/v1/completions"]
            .iter()
            .any(|api| crate::llm::shape::ends_with_ignore_case(&path, api))
            // Azure OpenAI's text completions of a deployment.
            || (crate::llm::shape::model_in_path(&path)
                && crate::llm::shape::ends_with_ignore_case(&path, "/completions")));
    let token_limited = limit::token_limits_apply(snap, route, ctx);
    // A compressed body would be estimated at its compressed size, and
    // a stream's usage could not be asked for in it: a way around the
    // limit wherever the upstream takes compressed bodies.
    if token_limited && headers::is_compressed(&parts.headers) {
        return Err(ProxyError::UnsupportedEncoding);
    }
    let renames = |index: usize| {
        snap.upstreams
            .get(index)
            .is_some_and(|u| !u.models.is_empty())
    };
    let mut body = match (route.target, completions, token_limited, body) {
        (Target::Upstream(index), false, false, RequestBody::Streaming(body))
            if !renames(index) =>
        {
            return stream_through(active, index, ctx, parts, body, max_body).await;
        }
        (.., body) => {
            let deadline = ctx.deadline(snap);
            body.into_bytes(max_body, deadline, gw.body_budget(snap), &mut ctx.waiting)
                .await?
        }
    };
    // The body as the client sent it, while the one sent upstream asks
    // for usage: an upstream that refuses the question gets this instead.
    let mut plain: Option<Bytes> = None;
    if completions && let Some(asked) = sse::ask_for_usage(&body) {
        plain = Some(body.clone());
        // Usage is asked for upstream and its chunk removed before the
        // client sees it: the client's stream stays as it would have been.
        // The edited copy takes over the original's place in the budget.
        body = gw.body_budget(snap).adopt(asked);
        ctx.usage_injected = true;
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, body.len().into());
    }
    if token_limited || crate::llm::spend::applies(snap, ctx.identity.as_ref()) {
        // Kept for an answer cut short before it reported usage: it is
        // charged this instead (see `limit::settle`, `tap::record_usage`).
        // Read from the body as the client sent it: the question for
        // usage is sluice's, and no prompt.
        let sent = plain.as_ref().unwrap_or(&body);
        let estimate = if token_limited {
            limit::estimate_tokens(sent)
        } else {
            limit::estimate_tokens_roughly(sent)
        };
        ctx.estimate = Some(estimate);
        ctx.requested_model = limit::requested_model(
            sent,
            parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(http::HeaderValue::as_bytes),
        );
        if token_limited {
            limit::reserve_tokens(snap, &gw.state, &gw.metrics, route, ctx, estimate.total())
                .await?;
        }
    } else if completions {
        ctx.choices_asked = Some(limit::choices_asked(plain.as_ref().unwrap_or(&body)));
    }
    match route.target {
        Target::Upstream(index) => {
            let name = snap.upstreams.get(index).map(|upstream| {
                headers::for_upstream(&mut parts.headers, upstream);
                if let Some(renamed) = renamed_for(upstream, &body, &mut parts.headers) {
                    // Held through the token reservation and the upload.
                    body = gw.body_budget(snap).adopt(renamed);
                    plain = plain
                        .take()
                        .map(|p| pool::rewrite_model(&p, &upstream.models).unwrap_or(p));
                }
                upstream.name.clone()
            });
            let answer = attempt_asking_usage(active, index, ctx, parts, body, plain).await;
            count_answer(active, index, &answer);
            answer.map_err(|f| single_failure(name.as_deref().unwrap_or("upstream"), f))
        }
        Target::Pool(p) => match snap.pools.get(p) {
            Some(pool) => {
                let budget = gw.body_budget(snap);
                failover(active, p, pool, ctx, &parts, body, plain, budget).await
            }
            None => Err(ProxyError::UpstreamFailed {
                attempts: "no pool configured".to_owned(),
                retry_after: None,
            }),
        },
    }
}

/// The body with `upstream`'s `models` rename applied, when it renames
/// the body's model, and the `content-length` that goes with it.
fn renamed_for(upstream: &Upstream, body: &Bytes, headers: &mut http::HeaderMap) -> Option<Bytes> {
    let rewritten = pool::rewrite_model(body, &upstream.models)?;
    headers.insert(http::header::CONTENT_LENGTH, rewritten.len().into());
    Some(rewritten)
}

/// Forwards to a single upstream with the body streaming through,
/// counted on its way against `max_request_body`.
async fn stream_through(
    active: &Active,
    index: usize,
    ctx: &mut RequestCtx,
    mut parts: Parts,
    body: Incoming,
    max_body: u64,
) -> Result<Response<BoxBody>, ProxyError> {
    let upstream =
        active
            .snapshot
            .upstreams
            .get(index)
            .ok_or_else(|| ProxyError::UpstreamFailed {
                attempts: "no upstream configured".to_owned(),
                retry_after: None,
            })?;
    headers::for_upstream(&mut parts.headers, upstream);
    if body_of_unknown_length(&parts.method, &body) {
        // hyper sends a GET or HEAD of unknown length with no body at
        // all unless told to chunk it: the body would be lost.
        parts.headers.insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        );
    }
    // An upload's answer names no model (audio, images): its `model`
    // form field, read as the body goes by, prices it and labels it.
    let watch = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|content_type| crate::llm::form::boundary(content_type.as_bytes()))
        .map(|boundary| crate::llm::form::FieldWatch::new(boundary, "model"));
    let (body, progress) = CappedBody::new(body, max_body);
    let (body, model) = match watch {
        Some(watch) => {
            let (watched, model) = crate::llm::form::Watched::new(body, watch);
            (watched.boxed_unsync(), Some(model))
        }
        None => (body.boxed_unsync(), None),
    };
    let result = attempt(active, index, ctx, parts, body, Some(&progress)).await;
    if result.is_err() && !progress.ended() {
        // What the upstream did not take of the body is still on its
        // way: the refusal says the connection closes after it (see
        // `handle`), or the client's next request meets a closed socket.
        ctx.body_unread = true;
        ctx.body_drainable = false;
    }
    if let Some(model) = model.and_then(|slot| slot.get().cloned()) {
        ctx.requested_model.get_or_insert(model);
    }
    if matches!(&result, Err(f) if f.outcome == Outcome::Timeout) && progress.waiting_on_client() {
        // sluice was waiting for more of the client's body when time ran
        // out: its trickle, not the upstream, held the answer back. (An
        // upstream that stopped reading leaves sluice waiting on it.)
        count(active, index, Outcome::ClientError);
        return Err(ProxyError::RequestTimeout);
    }
    if progress.over_limit() {
        // The client's fault, whatever the upstream made of the cut body.
        count(active, index, Outcome::ClientError);
        return Err(ProxyError::TooLarge { limit: max_body });
    }
    if result.is_err() && progress.client_gone() {
        count(active, index, Outcome::ClientError);
        return Err(ProxyError::ClientClosed);
    }
    if result.is_err() && progress.client_failed() {
        // A broken chunk or a client gone mid-upload cut the request
        // short: the upstream did nothing wrong, and counts no failure.
        count(active, index, Outcome::ClientError);
        return Err(unreadable_body());
    }
    count_answer(active, index, &result);
    result.map_err(|f| single_failure(&upstream.name, f))
}

/// A body on a method that rarely has one, with no length said (chunked
/// on HTTP/1.1, DATA frames on h2).
fn body_of_unknown_length(method: &http::Method, body: &Incoming) -> bool {
    use http::Method;
    use hyper::body::Body;
    matches!(*method, Method::GET | Method::HEAD)
        && !body.is_end_stream()
        && body.size_hint().exact().is_none()
}

/// The error of a route's single upstream failing.
fn single_failure(name: &str, f: AttemptFailure) -> ProxyError {
    if f.late() {
        ProxyError::UpstreamTimeout {
            upstream: name.to_owned(),
            attempts: None,
        }
    } else {
        ProxyError::UpstreamFailed {
            attempts: format!("{name}: {}", f.text),
            retry_after: None,
        }
    }
}

/// The whole request body (for replay to another member, an estimate,
/// an edit or the cache key), bounded by `limit`. A client that has not
/// sent it all by `deadline` (the request's timeout) gets a 408: a body
/// trickled byte by byte must not hold the request open for ever.
pub async fn read_body(
    mut body: Incoming,
    limit: u64,
    deadline: Instant,
    budget: Budget<'_>,
) -> Result<Bytes, ProxyError> {
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    // The announced length, bounded: a lying one costs no more than the limit.
    let announced = hyper::body::Body::size_hint(&body)
        .exact()
        .filter(|&n| n <= limit);
    let mut joined = Joined::expecting(announced);
    let mut share = budget.share();
    // One timer for the whole body, not one per frame.
    let expiry = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
    tokio::pin!(expiry);
    loop {
        let next = tokio::select! {
            biased;
            next = body.frame() => next,
            () = &mut expiry => return Err(ProxyError::RequestTimeout),
        };
        let Some(frame) = next else { break };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) if super::validate::went_away(&e) => return Err(ProxyError::ClientClosed),
            Err(_) => return Err(unreadable_body()),
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not part of the body
        };
        if joined.len().saturating_add(data.len()) > cap {
            return Err(ProxyError::TooLarge { limit });
        }
        // Charged the bytes received, which is what the join costs: its
        // buffer, made at the announced size or doubling, is mapped
        // lazily and takes memory only as it is written. Charging the
        // announced length would let a client that announces 4 MiB and
        // sends two bytes hold 4 MiB of the budget for request_timeout.
        if !share.grow(data.len() as u64) {
            return Err(ProxyError::Overloaded);
        }
        joined.push(&data);
    }
    Ok(share.attach(joined.into_bytes()))
}

/// A request body that broke its framing (a bad chunk) or ended early
/// (the client went away): the same 400 whether it was read whole first
/// or streamed through.
fn unreadable_body() -> ProxyError {
    ProxyError::InvalidRequest {
        param: None,
        message: "the request body could not be read".to_owned(),
    }
}
