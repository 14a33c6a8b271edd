//! Phase 6, forwarding: sends the request to the route's upstream, or to
//! its pool's members in priority order, and returns the response head as
//! soon as one is good; the body streams on. For a pool, the request body
//! (bounded by `max_request_body`) is kept so it can be replayed to the
//! next member; a connect error, a timeout or a `retry_on` status moves
//! on, within `max_attempts`, skipping members whose circuit is open or
//! who asked for a pause (429 + `retry-after`).

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

/// Tries the pool's members in order until one answers well. `plain`:
/// the body without the usage sluice asked for, for a member that
/// refuses the question.
#[allow(clippy::too_many_arguments)]
async fn failover(
    active: &Active,
    p: usize,
    pool: &Pool,
    ctx: &mut RequestCtx,
    parts: &Parts,
    body: Bytes,
    plain: Option<Bytes>,
    budget: Budget<'_>,
) -> Result<Response<BoxBody>, ProxyError> {
    let snap = &active.snapshot;
    let mut tried: Vec<String> = Vec::new();
    let mut reopens: Option<Instant> = None;
    let mut last_timed_out: Option<&str> = None;
    let mut attempts = 0u32;
    let (mut paused_attempts, mut shortest_pause) = (0u32, None::<Duration>);
    for (position, &member) in pool.members.iter().enumerate() {
        if attempts >= pool.max_attempts {
            break;
        }
        let (Some(upstream), Some(breaker)) =
            (snap.upstreams.get(member), active.breakers.get(member))
        else {
            continue;
        };
        let now = Instant::now();
        let deadline = ctx.deadline(snap);
        if attempts > 0 && now >= deadline {
            // request_timeout is spent: a next member would time out
            // before it could answer, and be blamed for it. (Checked
            // before `admit`, which may hand out a half-open probe.)
            break;
        }
        let admit = breaker.admit(now);
        if let Admit::No(until) = admit {
            reopens = Some(reopens.map_or(until, |r| r.min(until)));
            // Named in a 502's list of attempts, so that "b: 503" alone
            // does not read as if `a` had never been configured.
            tried.push(format!(
                "{}: skipped ({})",
                upstream.name,
                // Admitted again since: a race, said plainly.
                breaker.skip_reason(now).unwrap_or("unavailable")
            ));
            continue;
        }
        // Earlier members spent the request's time, and what is left of
        // request_timeout, not first_byte, bounds this attempt: its
        // timeout is theirs, not this member's fault. (A first attempt
        // is always judged: with the default first_byte, request_timeout
        // bounds every attempt, and a hung member must still trip.)
        let request_bound = attempts > 0 && deadline < now + upstream.timeouts.first_byte;
        let verdict = Verdict::new(breaker, admit);
        if attempts > 0
            && let Some(counter) = active.failovers.get(p)
        {
            counter.inc();
        }
        attempts += 1;
        let mut member_parts = copy_parts(parts);
        headers::for_upstream(&mut member_parts.headers, upstream);
        // A member's renamed copy is held through its attempt: counted too.
        let (bytes, member_plain) = match renamed_for(upstream, &body, &mut member_parts.headers) {
            Some(renamed) => (
                budget.adopt(renamed),
                plain
                    .as_ref()
                    .map(|p| pool::rewrite_model(p, &upstream.models).unwrap_or_else(|| p.clone())),
            ),
            None => (body.clone(), plain.clone()),
        };
        match attempt_asking_usage(active, member, ctx, member_parts, bytes, member_plain).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let pause = match status {
                    429 => pool::retry_after(resp.headers()),
                    _ => None,
                };
                if !pool.retry_on.contains(&RetryOn::Status(status)) {
                    let held = Instant::now();
                    // first_byte bounds the wait for the first content
                    // from the attempt's start, not again from the head.
                    let sent = ctx.upstream_started.unwrap_or(held);
                    let request_deadline = ctx.deadline(snap);
                    let deadline = (sent + upstream.timeouts.first_byte).min(request_deadline);
                    // The hold is there for a failover: when no other
                    // member could take over from a stall, a stream that
                    // is slow to its first content (a model that thinks
                    // before it writes) goes on to the client once
                    // first_byte is spent, as on a route to one upstream,
                    // rather than being cut off with a 504.
                    // Asked when first_byte is spent: a later member whose
                    // circuit is open (or that health checks marked down)
                    // would be skipped, and cannot take over either.
                    let can_take_over = || {
                        pool.retry_on.contains(&RetryOn::Timeout)
                            && attempts < pool.max_attempts
                            && pool.members[position + 1..].iter().any(|later| {
                                active
                                    .breakers
                                    .get(*later)
                                    .is_some_and(|b| b.would_admit(Instant::now()))
                            })
                    };
                    let release = || deadline < request_deadline && !can_take_over();
                    // A client that leaves during the hold drops this
                    // future: the answer is counted as its head said.
                    let mut unjudged = Unjudged(Some((active, member, Outcome::of_status(status))));
                    // A HEAD answer has no stream to wait for: its head is it.
                    let preamble = if parts.method == http::Method::HEAD {
                        Ok(resp)
                    } else {
                        hold_preamble(
                            resp,
                            deadline,
                            release,
                            can_take_over,
                            upstream.timeouts.idle,
                        )
                        .await
                    };
                    unjudged.0 = None;
                    // Waiting for the stream's first content is upstream time.
                    ctx.waiting += held.elapsed();
                    let outcome = match &preamble {
                        Ok(_) => Outcome::of_status(status),
                        Err(Preamble::TimedOut | Preamble::Quiet) => Outcome::Timeout,
                        Err(Preamble::Broke(_) | Preamble::ReportedError) => Outcome::StreamError,
                    };
                    count(active, member, outcome);
                    match preamble {
                        Ok(resp) => {
                            match pause {
                                // A 429 with `retry-after` cools the member
                                // down (SPEC §3) even when it goes to the
                                // client; a pause is no verdict.
                                Some(pause) => breaker.cool_down(Instant::now() + pause),
                                None if is_event_stream(&resp) => {
                                    ctx.stream_verdict = Some(verdict.at_stream_end(
                                        Arc::clone(breaker),
                                        pool.breaker_failures,
                                        pool.breaker_cooldown,
                                    ));
                                }
                                None => verdict.success(),
                            }
                            return Ok(resp);
                        }
                        Err(failed) => {
                            // Only the deadline spends the request's time: a
                            // member gone quiet is its own fault.
                            let out_of_time = matches!(failed, Preamble::TimedOut) && request_bound;
                            judge(verdict, out_of_time, pool);
                            // (No stream error: SPEC §4 counts those that
                            // broke after content reached the client; this
                            // one is outcome stream_error or timeout.)
                            end_attempt(active, member, ctx);
                            tried.push(format!("{}: {}", upstream.name, failed.text()));
                            last_timed_out = matches!(failed, Preamble::TimedOut | Preamble::Quiet)
                                .then_some(&upstream.name);
                            if out_of_time {
                                break;
                            }
                            // Nothing has reached the client: the next member
                            // can still answer instead, invisibly, if
                            // `retry_on` says so for a stall (`timeout`) or
                            // a stream that broke or ended (`connect`, as a
                            // connection that failed).
                            // An error event before content always moves on
                            // (SPEC §3: an upstream that fails before any
                            // text still fails over).
                            let retry = match failed {
                                Preamble::TimedOut | Preamble::Quiet => {
                                    pool.retry_on.contains(&RetryOn::Timeout)
                                }
                                Preamble::Broke(_) => pool.retry_on.contains(&RetryOn::Connect),
                                Preamble::ReportedError => true,
                            };
                            if !retry {
                                break;
                            }
                            continue;
                        }
                    }
                }
                count(active, member, Outcome::of_status(status));
                match pause {
                    // A pause is no verdict: a probe's slot is freed.
                    Some(pause) => {
                        breaker.cool_down(Instant::now() + pause);
                        paused_attempts += 1;
                        shortest_pause = Some(shortest_pause.map_or(pause, |p| p.min(pause)));
                    }
                    None => verdict.failure(
                        Instant::now(),
                        pool.breaker_failures,
                        pool.breaker_cooldown,
                    ),
                }
                end_attempt(active, member, ctx);
                tried.push(format!("{}: {status}", upstream.name));
                last_timed_out = None;
            }
            Err(failure) => {
                count(active, member, failure.outcome);
                let timed_out = failure.outcome == Outcome::Timeout;
                let out_of_time = timed_out && request_bound;
                judge(verdict, out_of_time || failure.excuses_member(), pool);
                let local = failure.outcome == Outcome::LocalError;
                tried.push(format!("{}: {}", upstream.name, failure.text));
                if out_of_time {
                    // No other member has any time left either.
                    last_timed_out = Some(&upstream.name);
                    break;
                }
                if local {
                    // The next member would meet the same shortage: no
                    // failover to count against a member not at fault.
                    last_timed_out = None;
                    break;
                }
                let retryable = if timed_out {
                    last_timed_out = Some(&upstream.name);
                    pool.retry_on.contains(&RetryOn::Timeout)
                } else {
                    last_timed_out = failure.late().then_some(&*upstream.name);
                    pool.retry_on.contains(&RetryOn::Connect)
                };
                if !retryable {
                    break;
                }
            }
        }
    }
    if attempts == 0 {
        let wait = reopens.map_or(Duration::from_secs(1), |r| {
            r.saturating_duration_since(Instant::now())
        });
        return Err(ProxyError::UpstreamUnavailable {
            retry_after: wait.max(Duration::from_secs(1)),
            members: tried.join("; "),
        });
    }
    match last_timed_out {
        Some(name) => Err(ProxyError::UpstreamTimeout {
            upstream: name.to_owned(),
            attempts: (tried.len() > 1).then(|| tried.join("; ")),
        }),
        None => Err(ProxyError::UpstreamFailed {
            attempts: tried.join("; "),
            // Every member asked to be left alone for a while: a client
            // (the OpenAI SDKs read it) waits that long, not less.
            // (A member skipped for its circuit may be back sooner.)
            retry_after: (paused_attempts == attempts)
                .then_some(shortest_pause)
                .flatten()
                .map(|pause| match reopens {
                    Some(r) => pause.min(r.saturating_duration_since(Instant::now())),
                    None => pause,
                })
                .map(|wait| wait.max(Duration::from_secs(1))),
        }),
    }
}

/// Events of a stream preamble held back at most, and their bytes.
const PREAMBLE_EVENTS: usize = 16;
const PREAMBLE_BYTES: usize = 16 * 1024;

fn is_event_stream<B>(resp: &Response<B>) -> bool {
    resp.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| sse::is_event_stream(v.as_bytes()))
}

/// For an SSE response, reads until its first content event (bounded in
/// events, bytes, by `deadline` and by `idle` between frames, as the
/// stream is once it flows) and returns the response with what was read
/// put back in front; an error if the stream fails, stalls or ends first,
/// so that the caller can fail over. At `deadline`, if `release` says
/// so then, the stream goes on as it is instead. Other answers are held
/// for their first bytes ([`first_frame_held`]), while another member
/// `can_take_over`.
async fn hold_preamble(
    resp: Response<BoxBody>,
    deadline: Instant,
    release: impl Fn() -> bool,
    can_take_over: impl Fn() -> bool,
    idle: Duration,
) -> Result<Response<BoxBody>, Preamble> {
    if !is_event_stream(&resp) {
        return first_frame_held(resp, deadline, release, can_take_over, idle).await;
    }
    // A compressed stream (sent though sluice asked for `identity`) has
    // no events to read: it passes as it came, as on a single upstream.
    if headers::is_compressed(resp.headers()) {
        return Ok(resp);
    }
    let (parts, mut body) = resp.into_parts();
    let mut held = Vec::new();
    let mut splitter = sse::EventSplitter::default();
    let (mut events, mut bytes) = (0usize, 0usize);
    loop {
        let quiet_at = Instant::now() + idle;
        let frame = match tokio::time::timeout_at(deadline.min(quiet_at).into(), body.frame()).await
        {
            Err(_) if quiet_at < deadline => return Err(Preamble::Quiet),
            Err(_) if release() => break,
            Err(_) => return Err(Preamble::TimedOut),
            Ok(None) => return Err(Preamble::Broke("stream ended before content")),
            Ok(Some(Err(_))) => return Err(Preamble::Broke("stream broke before content")),
            Ok(Some(Ok(frame))) => frame,
        };
        let Some(data) = frame.data_ref() else {
            held.push(frame);
            break; // trailers: nothing more to wait for
        };
        bytes += data.len();
        splitter.push(data);
        held.push(frame);
        let mut content = false;
        while let Some(event) = splitter.next_event() {
            events += 1;
            if !content && sse::is_error_event(&event) {
                // It failed before producing anything: the next member
                // can still answer instead (SPEC §3).
                return Err(Preamble::ReportedError);
            }
            content |= !sse::is_preamble(&event);
        }
        if content || events >= PREAMBLE_EVENTS || bytes >= PREAMBLE_BYTES {
            break;
        }
    }
    Ok(Response::from_parts(
        parts,
        body::Replay::new(held, body).boxed_unsync(),
    ))
}

/// A pool member's answer other than a stream, held until its body's
/// first bytes: one that breaks before them (an upstream that closed or
/// garbled its body right after the head), or stalls before them, has
/// sent the client nothing, so the next member may still answer (SPEC
/// §3) rather than the client getting an empty reply or a cut one.
/// Bounded by `deadline` (first_byte) and `idle`, as a stream's preamble
/// is; past `idle`, when no member `can_take_over`, and at `deadline`,
/// when `release` says so then, it goes on as it is, as it would on a
/// route to its upstream alone.
async fn first_frame_held(
    resp: Response<BoxBody>,
    deadline: Instant,
    release: impl Fn() -> bool,
    can_take_over: impl Fn() -> bool,
    idle: Duration,
) -> Result<Response<BoxBody>, Preamble> {
    if http_body::Body::is_end_stream(resp.body()) {
        return Ok(resp);
    }
    let (parts, mut body) = resp.into_parts();
    let quiet_at = Instant::now() + idle;
    match tokio::time::timeout_at(deadline.min(quiet_at).into(), body.frame()).await {
        Err(_) if quiet_at < deadline && can_take_over() => Err(Preamble::Quiet),
        Err(_) if quiet_at < deadline || release() => Ok(Response::from_parts(parts, body)),
        Err(_) => Err(Preamble::TimedOut),
        Ok(Some(Err(_))) => Err(Preamble::Broke("answer broke before its body")),
        Ok(Some(Ok(first))) => Ok(Response::from_parts(
            parts,
            body::Replay::new(vec![first], body).boxed_unsync(),
        )),
        Ok(None) => Ok(Response::from_parts(parts, body)),
    }
}

/// Why a held stream preamble never reached content.
enum Preamble {
    /// No content within `first_byte` (or the request's deadline).
    TimedOut,
    /// Nothing at all for the upstream's `idle`.
    Quiet,
    /// The stream broke or ended.
    Broke(&'static str),
    /// The stream's first event past the preamble was an error.
    ReportedError,
}

impl Preamble {
    fn text(&self) -> &'static str {
        match self {
            Preamble::TimedOut => "timed out before content",
            Preamble::Quiet => "went quiet before content",
            Preamble::Broke(text) => text,
            Preamble::ReportedError => "stream reported an error before content",
        }
    }
}

/// A failed attempt's verdict: none when the request's own time ran out
/// (a half-open probe's slot is freed), else a failure toward the
/// member's circuit.
fn judge(verdict: Verdict<'_>, excused: bool, pool: &Pool) {
    if !excused {
        verdict.failure(Instant::now(), pool.breaker_failures, pool.breaker_cooldown);
    }
}

/// Ends an attempt whose answer is dropped (a failover): its time goes
/// into `sluice_upstream_duration_seconds`, as a finished answer's does.
fn end_attempt(active: &Active, index: usize, ctx: &mut RequestCtx) {
    if let (Some(started), Some(m)) = (ctx.upstream_started.take(), active.upstreams.get(index)) {
        m.duration.observe(started.elapsed().as_secs_f64());
    }
}

/// An attempt whose outcome waits on its stream's first content; dropped
/// before that (the client left), it counts the outcome it holds.
struct Unjudged<'a>(Option<(&'a Active, usize, Outcome)>);

impl Drop for Unjudged<'_> {
    fn drop(&mut self) {
        if let Some((active, member, outcome)) = self.0.take() {
            count(active, member, outcome);
        }
    }
}

/// An attempt in flight; dropped before its answer came (the client
/// left), it counts as `client_error`.
struct Abandoned<'a>(Option<(&'a Active, usize)>);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some((active, index)) = self.0.take() {
            count(active, index, Outcome::ClientError);
        }
    }
}

/// Counts an attempt's outcome for its upstream.
fn count(active: &Active, index: usize, outcome: Outcome) {
    if let Some(m) = active.upstreams.get(index) {
        m.outcome(outcome).inc();
    }
}

/// Counts a single upstream's answer, or its failure.
fn count_answer(active: &Active, index: usize, answer: &Result<Response<BoxBody>, AttemptFailure>) {
    let outcome = match answer {
        Ok(resp) => Outcome::of_status(resp.status().as_u16()),
        Err(failure) => failure.outcome,
    };
    count(active, index, outcome);
}

/// The largest error answer read to see whether it names
/// `stream_options`.
const REFUSAL_SNIFF: u64 = 64 * 1024;

/// An attempt with `body`, which asks for stream usage when `plain` (the
/// body as the client sent it) is there. An upstream that refuses the
/// question (a 400 naming `stream_options`, as older Azure OpenAI API
/// versions answer) is asked again with `plain`, and not asked for usage
/// again: metering must never break a request that works without sluice.
async fn attempt_asking_usage(
    active: &Active,
    index: usize,
    ctx: &mut RequestCtx,
    mut parts: Parts,
    body: Bytes,
    plain: Option<Bytes>,
) -> Result<Response<BoxBody>, AttemptFailure> {
    let http = active
        .snapshot
        .upstreams
        .get(index)
        .and_then(|u| match &u.kind {
            UpstreamKind::Http(http) => Some(http),
            UpstreamKind::Mock(_) => None,
        });
    let Some(plain) = plain else {
        return attempt(active, index, ctx, parts, body::full(body), None).await;
    };
    if let Some(http) = http
        && let Some(version) = crate::upstream::api_version(&parts.uri)
        && http
            .stream_options_refusals
            .refuses(version, Instant::now())
    {
        ctx.usage_injected = false;
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, plain.len().into());
        return attempt(active, index, ctx, parts, body::full(plain), None).await;
    }
    ctx.usage_injected = true;
    let again = copy_parts(&parts);
    let resp = attempt(active, index, ctx, parts, body::full(body), None).await?;
    let small = http_body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n <= REFUSAL_SNIFF);
    if resp.status() != http::StatusCode::BAD_REQUEST || !small {
        return Ok(resp);
    }
    let (head, answer) = resp.into_parts();
    let idle = ctx.upstream_idle.unwrap_or(Duration::from_secs(30));
    let read = tokio::time::timeout(idle, answer.collect()).await;
    let Ok(Ok(collected)) = read else {
        // The error answer broke or stalled: a failed attempt, as it is.
        return Err(AttemptFailure {
            outcome: Outcome::ConnectionError,
            text: "its error answer broke off",
        });
    };
    let text = collected.to_bytes();
    if memchr::memmem::find(&text, b"stream_options").is_none() {
        return Ok(Response::from_parts(head, body::full(text)));
    }
    // The refusal counts as the attempt it was; this one is the request's.
    count(active, index, Outcome::Http4xx);
    ctx.usage_injected = false;
    let mut again = again;
    let asked = again.uri.clone();
    again
        .headers
        .insert(http::header::CONTENT_LENGTH, plain.len().into());
    let resp = attempt(active, index, ctx, again, body::full(plain), None).await?;
    // Only when the body as the client sent it is taken was the question
    // at fault. A client's own bad `stream_options` (a key the API does
    // not know) is refused both ways: it must not stop the metering of
    // every other client's streams.
    if resp.status().is_success()
        && let Some(http) = http
        && let Some(version) = crate::upstream::api_version(&asked)
        && http.stream_options_refusals.record(version, Instant::now())
        && let Some(upstream) = active.snapshot.upstreams.get(index)
    {
        tracing::dispatcher::with_default(&active.log, || {
            tracing::warn!(
                event = "stream_usage_refused",
                upstream = &*upstream.name,
                api_version = version,
                "the upstream refuses stream_options.include_usage: its streams under this api-version go unmetered unless it reports usage itself, for the next 10 minutes"
            );
        });
    }
    Ok(resp)
}

/// A copy of a request head for one attempt (`Parts` itself is not `Clone`).
fn copy_parts(parts: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// One attempt at upstream `index`: records it in the ctx and its timing
/// metrics and returns the response head, whatever its status. The caller
/// counts its outcome: on a pool route a stream's outcome is known only
/// once its first content came (or did not). `upload` is the progress of
/// a body the client is still sending as it streams through.
async fn attempt(
    active: &Active,
    index: usize,
    ctx: &mut RequestCtx,
    mut parts: Parts,
    body: BoxBody,
    upload: Option<&BodyProgress>,
) -> Result<Response<BoxBody>, AttemptFailure> {
    let snap = &active.snapshot;
    let (Some(upstream), Some(metrics)) = (snap.upstreams.get(index), active.upstreams.get(index))
    else {
        return Err(AttemptFailure {
            outcome: Outcome::ConnectError,
            text: "no such upstream",
        });
    };
    let started = Instant::now();
    ctx.upstream = Some(upstream.name.clone());
    ctx.upstream_index = Some(index);
    ctx.attempts += 1;
    ctx.upstream_started = Some(started);
    let wait = AnswerWait {
        started,
        first_byte: upstream.timeouts.first_byte,
        request_deadline: ctx.deadline(snap),
        upload,
    };

    // Dropped before the answer (its client left), the attempt still
    // counts under an outcome: the outcomes add up to the attempts.
    let mut abandoned = Abandoned(Some((active, index)));
    let result: Result<Response<BoxBody>, AttemptFailure> = match &upstream.kind {
        UpstreamKind::Http(http) => match http.uri_for(parts.uri.path_and_query()) {
            Err(_) => Err(AttemptFailure {
                outcome: Outcome::ClientError,
                text: "the request path cannot be forwarded",
            }),
            Ok(uri) => {
                parts.uri = uri;
                if let Some(host) = &http.host {
                    parts.headers.insert(http::header::HOST, host.clone());
                }
                // The pooled client picks HTTP/1.1 or HTTP/2 per connection
                // (ALPN), whatever the client spoke to us.
                parts.version = Version::HTTP_11;
                match wait
                    .answer(http.client.request(Request::from_parts(parts, body)))
                    .await
                {
                    None => Err(TIMED_OUT),
                    Some(Err(e)) => Err(classify(&e)),
                    // hyper reads any three digits; HTTP's statuses end at
                    // 599 (RFC 9110 §15), and a client (the OpenAI SDKs
                    // among them) cannot tell what a 7xx would mean.
                    Some(Ok(resp)) if resp.status().as_u16() > 599 => Err(AttemptFailure {
                        outcome: Outcome::ConnectionError,
                        text: "answered with a status beyond 599, which is not HTTP",
                    }),
                    // hyper hands over a 101 (other 1xx it reads past);
                    // sluice sends no `upgrade`, so it switches to nothing.
                    Some(Ok(resp)) if resp.status().is_informational() => Err(AttemptFailure {
                        outcome: Outcome::ConnectionError,
                        text: "answered 101 Switching Protocols, but no upgrade was asked for",
                    }),
                    // hyper undoes `chunked` only: a `gzip, chunked` body
                    // would reach the client still compressed, with
                    // nothing saying so (as a client's is refused, 501).
                    Some(Ok(resp)) if headers::has_other_transfer_coding(resp.headers()) => {
                        Err(AttemptFailure {
                            outcome: Outcome::ConnectionError,
                            text: "answered with a transfer coding other than chunked, which would be lost on the way",
                        })
                    }
                    Some(Ok(mut resp)) => {
                        // A proxy answers in its own version (RFC 9110
                        // §6.2): an HTTP/1.0 upstream's would close the
                        // client's keep-alive connection.
                        *resp.version_mut() = http::Version::HTTP_11;
                        if let Some(location) = resp
                            .headers()
                            .get(http::header::LOCATION)
                            .and_then(|l| http.local_location(l))
                        {
                            resp.headers_mut().insert(http::header::LOCATION, location);
                        }
                        Ok(resp.map(|b| b.map_err(BodyError::new).boxed_unsync()))
                    }
                }
            }
        },
        UpstreamKind::Mock(settings) => {
            match wait
                .answer(mock::respond(settings, Request::from_parts(parts, body)))
                .await
            {
                None => Err(TIMED_OUT),
                Some(resp) => Ok(resp),
            }
        }
    };
    abandoned.0 = None;
    let elapsed = started.elapsed();
    ctx.waiting += elapsed;
    match result {
        Ok(mut resp) => {
            metrics.first_byte.observe(elapsed.as_secs_f64());
            let status = resp.status();
            headers::to_client(resp.headers_mut(), status);
            if ctx.cors.is_some() {
                super::cors::drop_upstreams(resp.headers_mut());
            }
            ctx.upstream_idle = Some(upstream.timeouts.idle);
            Ok(resp)
        }
        Err(failure) => {
            metrics.duration.observe(elapsed.as_secs_f64());
            ctx.upstream_started = None;
            Err(failure)
        }
    }
}

/// How long an attempt waits for the upstream's answer head: `first_byte`
/// from the attempt's start, within what is left of `request_timeout`.
struct AnswerWait<'a> {
    started: Instant,
    first_byte: Duration,
    request_deadline: Instant,
    upload: Option<&'a BodyProgress>,
}

impl AnswerWait<'_> {
    /// `answer`, or `None` when the wait ran out. An upstream cannot answer
    /// before it has the request: while a streaming body is still coming
    /// from its client, `first_byte` counts from the last bytes that came
    /// (as nginx's `proxy_read_timeout` starts once the request is sent),
    /// and only `request_timeout` bounds the upload (then a 408). An
    /// upstream that stopped reading takes no more bytes, and times out.
    async fn answer<F: Future>(&self, answer: F) -> Option<F::Output> {
        let mut answer = std::pin::pin!(answer);
        let mut deadline = (self.started + self.first_byte).min(self.request_deadline);
        loop {
            if let Ok(out) = tokio::time::timeout_at(deadline.into(), answer.as_mut()).await {
                return Some(out);
            }
            let now = Instant::now();
            let from = match self.upload {
                Some(upload) if upload.waiting_on_client() => Some(now),
                Some(upload) => upload.last_read(),
                None => None,
            };
            let next = from.map(|from| (from + self.first_byte).min(self.request_deadline));
            match next {
                Some(next) if next > now => deadline = next,
                _ => return None,
            }
        }
    }
}

/// Names a client error without its text (which may carry an address).
fn classify(e: &ClientError) -> AttemptFailure {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    let mut tls = None;
    let mut io_kind = None;
    let mut local = false;
    while let Some(err) = source {
        if let Some(rustls) = err.downcast_ref::<rustls::Error>() {
            tls.get_or_insert(rustls);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
            if let Some(rustls) = wrapped_rustls_error(io) {
                tls.get_or_insert(rustls);
            }
            local |= is_local_shortage(io);
        }
        source = err.source();
    }
    if local {
        return AttemptFailure {
            outcome: Outcome::LocalError,
            text: "sluice could not open a connection (out of file descriptors or memory)",
        };
    }
    if let Some(error) = tls {
        return AttemptFailure {
            outcome: Outcome::TlsError,
            text: tls_failure(error),
        };
    }
    if e.is_connect() {
        let text = match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => "connect refused",
            Some(std::io::ErrorKind::TimedOut) => CONNECT_TIMED_OUT,
            _ => "connect failed",
        };
        return AttemptFailure {
            outcome: Outcome::ConnectError,
            text,
        };
    }
    if let ClientError::Http(h) = e {
        // A plain-HTTP upstream connection reads about 64 KiB of head, in
        // at most 100 lines (as Envoy's default).
        if h.is_parse_too_large() {
            return AttemptFailure {
                outcome: Outcome::ConnectionError,
                text: "the response head is too large (about 64 KiB or 100 header lines at most)",
            };
        }
        if h.is_parse() || h.is_parse_status() {
            return AttemptFailure {
                outcome: Outcome::ConnectionError,
                text: "answered with a response head that is not valid HTTP",
            };
        }
    }
    if let ClientError::ReusedClosed(_) = e {
        return AttemptFailure {
            outcome: Outcome::ConnectionError,
            text: KEEP_ALIVE_RACE,
        };
    }
    AttemptFailure {
        outcome: Outcome::ConnectionError,
        text: "connection closed before the response",
    }
}

/// A reused connection the upstream closed as sluice sent on it (its
/// keep-alive timeout shorter than sluice's).
const KEEP_ALIVE_RACE: &str = "a reused connection closed before the response (the upstream's keep-alive ended as it was reused)";

/// Whether a socket could not be opened for want of something local:
/// descriptors (the process's or the system's) or buffer memory.
fn is_local_shortage(io: &std::io::Error) -> bool {
    // Not EADDRNOTAVAIL: an IPv6 upstream in a pod without IPv6 fails
    // with it too, and that member must still trip its breaker.
    #[cfg(unix)]
    {
        use rustix::io::Errno;
        matches!(
            Errno::from_io_error(io),
            Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        let _ = io;
        false
    }
}

/// Whether an I/O error carries a rustls error, however deeply wrapped.
/// `io::Error::source` skips the error it wraps, so the chain is walked
/// through `get_ref` instead.
fn wrapped_rustls_error(io: &std::io::Error) -> Option<&rustls::Error> {
    let mut inner = io.get_ref();
    while let Some(err) = inner {
        if let Some(rustls) = err.downcast_ref::<rustls::Error>() {
            return Some(rustls);
        }
        inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
    }
    None
}

/// Why a handshake with an upstream failed, in the words an operator
/// acts on: a missing `ca_file`, a certificate for another name or out
/// of date, or no TLS on that port.
fn tls_failure(error: &rustls::Error) -> &'static str {
    use rustls::CertificateError as Cert;
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer => {
                "TLS handshake failed: the certificate is not signed by a trusted CA (a private CA goes in ca_file)"
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                "TLS handshake failed: the certificate is not valid for the upstream's host name"
            }
            Cert::Expired | Cert::ExpiredContext { .. } => {
                "TLS handshake failed: the certificate has expired"
            }
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                "TLS handshake failed: the certificate is not valid yet"
            }
            Cert::Revoked => "TLS handshake failed: the certificate is revoked",
            _ => "TLS handshake failed: the certificate is invalid",
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "TLS handshake failed: the upstream does not speak TLS on that port"
        }
        rustls::Error::AlertReceived(_) => "TLS handshake failed: the upstream refused it (alert)",
        _ => "TLS handshake failed",
    }
}
