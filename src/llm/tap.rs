//! The response tap: every response body sluice sends passes through it,
//! frame by frame as frames arrive (nothing is buffered). It enforces the
//! idle gap between upstream chunks and the whole-request deadline, and
//! finalizes exactly once, at end of stream, on error, or when dropped
//! (client gone): metrics and the access-log line come from there.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant as TokioInstant, Sleep};

use crate::body::{BodyError, BoxBody};
use crate::gateway::{Active, Gateway};
use crate::llm::usage::{Meter, Usage};
use crate::llm::{pricing, spend};
use crate::proxy::cache::Fill;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::limit;
use crate::telemetry::access_log;
use crate::telemetry::body_log::BodyLog;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
    #[error("request exceeded its time limit")]
    Deadline,
    #[error("the upstream ended the stream before it was complete")]
    Truncated,
    #[error("sluice is shutting down (shutdown_grace ran out)")]
    Shutdown,
}

pub struct Tap {
    inner: BoxBody,
    /// `Some` until finalized.
    finish: Option<Finish>,
    /// Longest wait for the next chunk; `None` for bodies sluice wrote.
    idle: Option<Duration>,
    /// On tokio's clock, as the timer is, so that a timer that fired is
    /// never judged early by another clock.
    deadline: TokioInstant,
    /// Where the idle gap runs from: the last frame once the body has
    /// waited for one (the timer is armed), else the first wait. Frames
    /// of a body that never waits, as a JSON answer usually arrives whole,
    /// then cost no clock read.
    waiting_since: Option<TokioInstant>,
    /// Armed at the first wait. A frame does not move it: when it fires
    /// early it is set again for the current due time, so a stream pays
    /// for a timer update once per idle period, not once per chunk.
    timer: Option<Pin<Box<Sleep>>>,
    /// Registered with the timer: ready when the drain cuts the
    /// connection, so that a stream, waiting on its upstream, can end
    /// with an error event a client reads rather than a bare close.
    cut_told: Option<Pin<Box<OwnedNotified>>>,
    /// An upstream SSE stream: a break is reported to the client as a final
    /// error event, never as a clean-looking end.
    sse: bool,
    /// The error event was sent: the body is over.
    ended: bool,
    /// Reads usage from an upstream's JSON or SSE body as it passes, and
    /// removes the usage chunk of a stream when sluice asked for it.
    meter: Option<Meter>,
    /// A cache miss: what the client is sent is copied, to be stored.
    fill: Option<Fill>,
    /// `log_bodies`: the head of what the client is sent, for the log.
    body_log: Option<BodyLog>,
}

/// The last event of an SSE stream whose upstream broke or went quiet
/// (SPEC §3).
const STREAM_ERROR_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the upstream stream broke before it was complete\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_stream_error\"}}\n\n";

/// The last event of an SSE stream cut by `request_timeout`: sluice's own
/// limit, which a client should tell from a provider's failure.
const DEADLINE_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the request exceeded its time limit (request_timeout)\",\"type\":\"server_error\",\"param\":null,\"code\":\"request_timeout\"}}\n\n";

/// The last event of an SSE stream still open when a drain's
/// `shutdown_grace` ran out: the client can tell it from a provider's
/// failure, and retry elsewhere.
const SHUTDOWN_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"sluice is shutting down, and the stream was cut before its end\",\"type\":\"server_error\",\"param\":null,\"code\":\"server_shutdown\"}}\n\n";

/// What accounting for a request needs: metrics, limits, spend and the
/// access-log line. It accounts exactly once: when the tap that took it
/// over ends, or, dropped before that, as a request whose client went
/// away before the response head (hyper drops the request's future).
pub struct Finish {
    pub gw: Arc<Gateway>,
    /// The config the request started with, and its metric children.
    pub active: Arc<Active>,
    pub ctx: Box<RequestCtx>,
    accounted: bool,
}

/// The status logged and counted for a request whose client went away
/// before it was answered: nginx's, which dashboards know.
const CLIENT_CLOSED_STATUS: u16 = 499;

/// How long the end of a stream is awaited once its last event
/// (`[DONE]`, a final event) has passed: an upstream that then keeps the
/// stream open, or closes its connection without ending the body, has
/// said all it had to say, and the client's stream ends cleanly.
const AFTER_LAST_EVENT: Duration = Duration::from_secs(1);
/// The `error` of a request still open when `shutdown_grace` ran out:
/// sluice closed it, its client did not leave.
const SERVER_SHUTDOWN: &str = "server_shutdown";

impl Finish {
    pub fn new(gw: Arc<Gateway>, active: Arc<Active>, ctx: Box<RequestCtx>) -> Self {
        Finish {
            gw,
            active,
            ctx,
            accounted: false,
        }
    }

    /// Accounts for the request, once: `meter`, `fill` and `body_log` are
    /// what the tap gathered of the response body.
    fn account(
        &mut self,
        error: Option<&'static str>,
        meter: Option<Meter>,
        fill: Option<Fill>,
        body_log: Option<BodyLog>,
    ) {
        if std::mem::replace(&mut self.accounted, true) {
            return;
        }
        let Finish {
            gw, active, ctx, ..
        } = self;
        if ctx.error.is_none() {
            ctx.error = error;
        }
        if let Some(log) = body_log {
            let secrets = ctx
                .body_secrets
                .as_ref()
                .unwrap_or(&active.snapshot.logging.known_secrets);
            ctx.response_body = Some(log.render(&secrets.0));
        }
        let mut stream_error = false;
        let mut unfit = false;
        if let Some(meter) = meter {
            let usage = meter.finish();
            stream_error = usage.stream_error;
            unfit = usage.malformed || usage.failed;
            if stream_error && ctx.error.is_none() {
                // The upstream ended its stream with an error event of its
                // own (the client saw it): the log and
                // `sluice_stream_errors_total` say so too.
                ctx.error = Some("upstream_stream_error");
            }
            record_usage(gw, active, ctx, usage);
        } else if limit::left_mid_attempt(ctx) {
            // No answer to read: its estimate is what the upstream spent,
            // at the price of the model the request named.
            let model = ctx.requested_model.clone();
            let model = model.as_deref().unwrap_or("unknown");
            if let Some(cost) = estimated_cost(active, ctx, model) {
                charge(gw, active, ctx, model, cost);
            }
        }
        if !ctx.reservations.is_empty() {
            limit::settle(&gw.state, ctx);
        }
        // Stored only when complete; dropped unstored, it releases waiters.
        if let Some(fill) = fill
            && ctx.error.is_none()
            && !stream_error
            && !unfit
        {
            fill.store(&gw.state, ctx.model.clone(), ctx.cost_usd);
        }
        let now = Instant::now();
        let broke_off = matches!(
            ctx.error,
            Some("upstream_stream_error" | "upstream_idle_timeout")
        );
        if let Some(verdict) = ctx.stream_verdict.take() {
            match ctx.error {
                // The member broke the stream, or sent an error event
                // (also when its client left on reading it).
                _ if broke_off || stream_error => verdict.failure(now),
                // The request's own time or sluice's shutdown cut it.
                Some("request_timeout" | SERVER_SHUTDOWN) => drop(verdict),
                _ => verdict.success(),
            }
        }
        let latency = now.saturating_duration_since(ctx.started);
        let route = active.route_metrics(ctx.route_index);
        route.count_request(&gw.metrics, &ctx.method, ctx.status);
        route.duration.observe(latency.as_secs_f64());
        if ctx.route_index.is_some() {
            route.in_flight.dec();
        }
        if let (Some(index), Some(sent)) = (ctx.upstream_index, ctx.upstream_started)
            && let Some(upstream) = active.upstreams.get(index)
        {
            // An error event the client saw counts even when the client
            // then hung up on it, as the OpenAI SDKs do (its log line says
            // `client_closed`).
            if broke_off || stream_error {
                upstream.stream_errors.inc();
            }
            upstream
                .duration
                .observe(now.saturating_duration_since(sent).as_secs_f64());
        }
        access_log::emit(
            &gw.log,
            gw.log_format,
            &active.snapshot.logging.scrub,
            ctx,
            latency,
        );
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.accounted {
            // No response head was made: the client left while the
            // request waited (on limits, the cache, an upstream), or a bug
            // panicked. What it held (a reservation, the in-flight count)
            // is given back either way.
            let (status, error) = if std::thread::panicking() {
                (500, "internal_error")
            } else if self.gw.is_cutting() {
                (503, SERVER_SHUTDOWN)
            } else {
                (CLIENT_CLOSED_STATUS, "client_closed")
            };
            if self.ctx.status == 0 {
                self.ctx.status = status;
            }
            let route = self.active.route_metrics(self.ctx.route_index);
            crate::proxy::cache::count_miss(&mut self.ctx, route);
            self.account(Some(error), None, None, None);
        }
    }
}

impl Tap {
    pub fn new(
        inner: BoxBody,
        finish: Finish,
        idle: Option<Duration>,
        deadline: Instant,
        sse: bool,
        meter: Option<Meter>,
    ) -> Self {
        let mut finish = finish;
        let fill = finish.ctx.cache_fill.take();
        let body_log = finish
            .active
            .snapshot
            .logging
            .log_bodies
            .then(BodyLog::default);
        Tap {
            fill,
            body_log,
            meter,
            inner,
            finish: Some(finish),
            idle,
            deadline: TokioInstant::from_std(deadline),
            waiting_since: None,
            timer: None,
            cut_told: None,
            sse,
            ended: false,
        }
    }

    /// Ends the body after a failure: an SSE client gets the error event
    /// and a closed stream, anything else an aborted body.
    fn fail(
        &mut self,
        label: &'static str,
        err: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // Read before `finalize` takes the meter.
        let named = self.meter.as_ref().is_some_and(Meter::names_events);
        let mid_event = self.meter.as_ref().is_some_and(Meter::cut_mid_event);
        self.finalize(Some(label));
        if self.sse {
            self.ended = true;
            let event = match label {
                "request_timeout" => DEADLINE_EVENT,
                SERVER_SHUTDOWN => SHUTDOWN_EVENT,
                _ => STREAM_ERROR_EVENT,
            };
            // A stream of named events (Anthropic's, the responses API's)
            // gets a named one: Anthropic's SDK raises on `event: error`
            // only, and OpenAI's raises on it too.
            // After part of an event too long to hold back, a blank
            // line ends it first (its data cut short): else the error
            // would be read as more of its data.
            let start: &[u8] = if mid_event { b"\n\n" } else { b"" };
            let name: &[u8] = if named { b"event: error\n" } else { b"" };
            let frame = if start.is_empty() && name.is_empty() {
                Bytes::from_static(event)
            } else {
                Bytes::from([start, name, event].concat())
            };
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        Poll::Ready(Some(Err(err)))
    }

    /// Hands what the client is sent to the cache fill and the body log.
    fn copy(&mut self, data: &Bytes) {
        if let Some(fill) = self.fill.as_mut() {
            fill.observe(data);
        }
        if let Some(log) = self.body_log.as_mut() {
            log.push(data);
        }
    }

    /// When the body fails (or, once the stream has said all, ends) if
    /// no frame comes first; the idle gap starts now if the body was not
    /// waiting yet.
    fn due(&mut self) -> TokioInstant {
        match self.idle {
            Some(idle) => {
                let idle = if self.said_all() {
                    idle.min(AFTER_LAST_EVENT)
                } else {
                    idle
                };
                let since = *self.waiting_since.get_or_insert_with(TokioInstant::now);
                (since + idle).min(self.deadline)
            }
            None => self.deadline,
        }
    }

    /// Whether the stream's last event (`[DONE]`, a final event) passed.
    fn said_all(&self) -> bool {
        self.meter.as_ref().is_some_and(Meter::finished)
    }

    /// The start of an event held back (whole events only).
    fn held(&mut self) -> Option<Bytes> {
        self.meter.as_mut().and_then(Meter::take_held)
    }

    /// When the body breaks off or stalls: if the stream had said all
    /// (its last event passed, perhaps in the event held back), that
    /// held rest, to end it whole with. The rest is given up otherwise:
    /// half an event is not passed on.
    fn whole_so_far(&mut self) -> Option<Option<Bytes>> {
        let rest = self.held();
        let meter = self.meter.as_mut()?;
        meter.finished_with(rest.as_ref()).then_some(rest)
    }

    /// Ends the body whole, with `rest`, the unterminated last event of a
    /// complete stream, passed on as it came.
    fn end(&mut self, rest: Option<Bytes>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let rest = rest.filter(|_| !self.meter.as_ref().is_some_and(Meter::drops_rest));
        if let Some(rest) = rest.as_ref() {
            self.copy(rest);
        }
        self.finalize(None);
        self.ended = true;
        match rest {
            Some(rest) => Poll::Ready(Some(Ok(Frame::data(rest)))),
            None => Poll::Ready(None),
        }
    }

    /// Whether the drain cut the connection (`shutdown_grace` ran out);
    /// registers to be woken when it does, at the first wait.
    fn cut_by_drain(&mut self, cx: &mut Context<'_>) -> bool {
        if self.cut_told.is_none() {
            let Some(finish) = self.finish.as_ref() else {
                return false;
            };
            let Some(told) = finish.ctx.cut_told.clone() else {
                return false;
            };
            let mut told = Box::pin(told.notified_owned());
            // Registered before the flag is read: a cut in between still
            // wakes it, and one before is seen.
            told.as_mut().enable();
            let cutting = finish.gw.is_cutting();
            self.cut_told = Some(told);
            if cutting {
                return true;
            }
        }
        self.cut_told
            .as_mut()
            .is_some_and(|told| told.as_mut().poll(cx).is_ready())
    }

    fn finalize(&mut self, error: Option<&'static str>) {
        if let Some(mut finish) = self.finish.take() {
            finish.account(
                error,
                self.meter.take(),
                self.fill.take(),
                self.body_log.take(),
            );
        }
    }
}

/// Puts a response's usage into the ctx (for the access log) and metrics.
fn record_usage(gw: &Arc<Gateway>, active: &Arc<Active>, ctx: &mut RequestCtx, mut usage: Usage) {
    // An answer that names no model (images, speech, transcriptions) is
    // priced and labelled as the model its request named, where sluice
    // read the request (token limits, budgets).
    if usage.model.is_none() {
        usage.model.clone_from(&ctx.requested_model);
    }
    // An answer cut short (its client left) generated at least a token
    // an event it streamed: its estimate (what it is charged, what its
    // token reservation keeps) counts them, or a request with no
    // `max_tokens` would pay for its prompt alone.
    if limit::cut_short(ctx)
        && let Some(estimate) = ctx.estimate.as_mut()
    {
        estimate.output = estimate.output.max(usage.events);
    }
    if usage.input_tokens.is_none() && usage.output_tokens.is_none() && usage.finishes.is_empty() {
        // Nothing to count (a stream broken before its end), but the log
        // still says which model was answering. A whole answer sluice
        // could not read was generated all the same: its estimate, as
        // one that reported no usage is charged, or it would be free.
        let unread_answer = usage.unread && !usage.failed && (200..300).contains(&ctx.status);
        let cost = |model| {
            if unread_answer {
                estimate_at_price(active, ctx, model)
            } else {
                estimated_cost(active, ctx, model)
            }
        };
        if let Some(model) = usage.model.as_deref()
            && let Some(cost) = cost(model)
        {
            charge(gw, active, ctx, model, cost);
        }
        ctx.model = usage.model;
        return;
    }
    let model = usage.model.as_deref().unwrap_or("unknown");
    let (input, output) = (
        usage.input_tokens.unwrap_or(0),
        usage.output_tokens.unwrap_or(0),
    );
    let children = active
        .route_metrics(ctx.route_index)
        .model(&gw.metrics, model);
    children.input_tokens.inc_by(input);
    children.output_tokens.inc_by(output);
    // One completion per choice (`n` of them when a chat request asks
    // for `n`), `none` for a choice that ended without a reason and for
    // an answer that says nothing of how it ended. Embeddings complete
    // nothing: counted there, they would drown the quality signal.
    let embeddings = crate::llm::shape::Endpoint::of(ctx.uri.path())
        == Some(crate::llm::shape::Endpoint::Embeddings);
    if usage.finishes.is_empty() && !embeddings {
        children.completion(&gw.metrics, "none").inc();
    }
    for reason in usage.finishes.reasons() {
        children
            .completion(&gw.metrics, reason.unwrap_or("none"))
            .inc();
    }
    // No token count, no cost: the log says null, not a made-up 0.
    let counted = usage.input_tokens.is_some() || usage.output_tokens.is_some();
    let reported = counted
        .then(|| {
            pricing::cost(
                &active.snapshot.pricing,
                usage.model.as_deref(),
                pricing::Tokens {
                    input,
                    output,
                    cache_read: usage.cache_read_tokens.unwrap_or(0),
                    cache_write: usage.cache_write_tokens.unwrap_or(0),
                },
            )
        })
        .flatten();
    // What a stream cut short reported (Anthropic's `message_start`
    // counts one output token) may be far below what it generated.
    let cost = match (reported, estimated_cost(active, ctx, model)) {
        (Some(reported), Some(estimated)) => Some(reported.max(estimated)),
        // An answer that said how it ended but not what it used (an
        // upstream that ignores `stream_options`): its estimate, as
        // its token reservation keeps it, or its spend would be free.
        (None, None) if !counted && !usage.finishes.is_empty() => {
            estimate_at_price(active, ctx, model)
        }
        (reported, estimated) => reported.or(estimated),
    };
    ctx.input_tokens = usage.input_tokens;
    ctx.output_tokens = usage.output_tokens;
    if let Some(cost) = cost {
        charge(gw, active, ctx, model, cost);
    }
    ctx.model = usage.model;
}

/// Counts `cost` for the request: the metric, the budgets, the log.
fn charge(gw: &Arc<Gateway>, active: &Arc<Active>, ctx: &mut RequestCtx, model: &str, cost: f64) {
    active
        .route_metrics(ctx.route_index)
        .model(&gw.metrics, model)
        .cost_usd
        .inc_by(cost);
    spend::charge(gw, active, ctx.identity.as_ref(), cost);
    // Logged to the nano-dollar, as spend is kept: not 3.5850000000000004e-05.
    ctx.cost_usd = Some(crate::state::budget::rounded(cost));
}

/// What an LLM's answer cut short (its client left, the stream broke or
/// ran out of time) is charged at least: it was generated, and billed,
/// all the same, though it may not have reported its usage yet. The
/// request's estimate at the model's price, as its token reservation is
/// kept in the buckets (`limit::settle`). `None` for an answer that
/// ended whole, or where no estimate was made.
fn estimated_cost(active: &Active, ctx: &RequestCtx, model: &str) -> Option<f64> {
    if !limit::cut_short(ctx) {
        return None;
    }
    estimate_at_price(active, ctx, model)
}

/// The request's estimate (made where sluice read the request: token
/// limits, budgets) at `model`'s price.
fn estimate_at_price(active: &Active, ctx: &RequestCtx, model: &str) -> Option<f64> {
    let estimate = ctx.estimate?;
    pricing::cost(
        &active.snapshot.pricing,
        Some(model),
        pricing::Tokens {
            input: estimate.prompt,
            output: estimate.output,
            ..pricing::Tokens::default()
        },
    )
}

impl Body for Tap {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        // Loops only when a whole frame was the removed usage chunk.
        loop {
            let polled = match Pin::new(&mut this.inner).poll_frame(cx) {
                // Trailers end a body: what follows is the end's work (a
                // server that got them would poll no further, and the
                // answer would read as one its client left). They are
                // not passed on, as hyper would not send them to an
                // HTTP/1.1 client either.
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => Poll::Ready(None),
                polled => polled,
            };
            return match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let replaced = match (this.meter.as_mut(), frame.data_ref()) {
                        (Some(meter), Some(data)) => meter.observe(data),
                        _ => None,
                    };
                    // A body that waited before may wait again, perhaps
                    // unpolled while the client is slow: the gap runs from
                    // this frame.
                    this.waiting_since = match (this.idle, &this.timer) {
                        (Some(_), Some(_)) => Some(TokioInstant::now()),
                        _ => None,
                    };
                    match replaced {
                        Some(out) if out.is_empty() => continue,
                        Some(out) => {
                            this.copy(&out);
                            Poll::Ready(Some(Ok(Frame::data(out))))
                        }
                        None => {
                            if let Some(data) = frame.data_ref() {
                                this.copy(data);
                            }
                            Poll::Ready(Some(Ok(frame)))
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => match this.whole_so_far() {
                    Some(rest) => this.end(rest),
                    None => this.fail("upstream_stream_error", e),
                },
                Poll::Ready(None) => {
                    let rest = this.held();
                    if let Some(meter) = this.meter.as_mut()
                        && meter.broke_off(rest.as_ref())
                    {
                        // An LLM stream that ended without saying how (no
                        // `[DONE]`, finish reason or final event) was cut:
                        // a close-delimited answer ends so when its
                        // upstream dies. Half an event is not passed on.
                        return this.fail(
                            "upstream_stream_error",
                            BodyError(TapError::Truncated.into()),
                        );
                    }
                    this.end(rest)
                }
                Poll::Pending => {
                    if this.cut_by_drain(cx) {
                        return match this.whole_so_far() {
                            Some(rest) => this.end(rest),
                            None => {
                                this.fail(SERVER_SHUTDOWN, BodyError(TapError::Shutdown.into()))
                            }
                        };
                    }
                    // The timer is armed only for bodies that make us wait, so a
                    // body that is ready at once costs no timer at all.
                    let due = this.due();
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                    if due < timer.deadline() {
                        // The stream's last event passed since it was set.
                        timer.as_mut().reset(due);
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Set before the last frames came: not due yet.
                    if TokioInstant::now() < due {
                        timer.as_mut().reset(due);
                        if timer.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    if let Some(rest) = this.whole_so_far() {
                        // Whole, though the request's time ran out while
                        // its end was awaited.
                        this.end(rest)
                    } else if TokioInstant::now() >= this.deadline {
                        this.fail("request_timeout", BodyError(TapError::Deadline.into()))
                    } else {
                        let idle = this.idle.unwrap_or_default();
                        this.fail(
                            "upstream_idle_timeout",
                            BodyError(TapError::Idle(idle).into()),
                        )
                    }
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        // A stream read event by event ends only when the tap has seen
        // its end (an upstream's length may end it before its last
        // event: a stream broken off, to be said so); an event held back
        // still has to go out.
        self.ended
            || (!self.sse
                && self.inner.is_end_stream()
                && !self.meter.as_ref().is_some_and(Meter::holds))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.meter {
            // Not the upstream's length for a stream read event by event
            // (a chunk may be cut out, half an event dropped, an error
            // event added), nor while the start of an event is held back.
            Some(meter) if self.sse || meter.strips() || meter.holds() => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Still pending at drop: the body was not read to its end, by a
        // client that left, or that was cut at the deadline.
        let done = self.ended
            || self.inner.is_end_stream()
            || self.meter.as_ref().is_some_and(Meter::finished);
        let error = if done {
            None
        } else if TokioInstant::now() >= self.deadline {
            Some("request_timeout")
        } else if self.finish.as_ref().is_some_and(|f| f.gw.is_cutting()) {
            Some(SERVER_SHUTDOWN)
        } else {
            Some("client_closed")
        };
        if error == Some("client_closed") && self.read_rest_for_usage() {
            return;
        }
        self.finalize(error);
    }
}

/// The most of an answer read for its usage after its client left.
const REST_READ_MAX: usize = 16 << 20;

impl Tap {
    /// The client left before the body's end, but the upstream had
    /// generated the whole answer (a JSON answer; a stream whose choices
    /// all ended, its usage chunk still to come): the rest is read in the
    /// background for its usage, which costs the provider nothing more,
    /// so that the request is charged what the upstream bills rather than
    /// an estimate (a client breaking off at `finish_reason` would
    /// otherwise get its answer for the price of its prompt). Mid-answer,
    /// the upstream is left at once: reading on would let it generate
    /// the rest, which it would bill. `false` when nothing is read.
    fn read_rest_for_usage(&mut self) -> bool {
        // Only where the request was read: how many choices it asked
        // for is known there.
        let Some(choices) = self.finish.as_ref().and_then(|f| {
            f.ctx
                .estimate
                .map(|estimate| estimate.choices)
                .or(f.ctx.choices_asked)
        }) else {
            return false;
        };
        if !self
            .meter
            .as_ref()
            .is_some_and(|meter| meter.answer_generated(choices))
        {
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let (Some(mut finish), Some(meter)) = (self.finish.take(), self.meter.take()) else {
            return false;
        };
        // The client has gone: its concurrency slot is free now, whatever
        // the upstream still has to send for the meter.
        finish.ctx.slot = None;
        let inner = std::mem::replace(&mut self.inner, crate::body::empty());
        let body_log = self.body_log.take();
        let idle = self.idle.unwrap_or(Duration::from_secs(30));
        let deadline = self.deadline;
        runtime.spawn(read_usage(inner, meter, finish, body_log, idle, deadline));
        true
    }
}

/// Reads the rest of `inner` into `meter` (within `idle` a frame, the
/// request's deadline and [`REST_READ_MAX`]), then accounts for the
/// request its client left.
async fn read_usage(
    mut inner: BoxBody,
    mut meter: Meter,
    mut finish: Finish,
    body_log: Option<BodyLog>,
    idle: Duration,
    deadline: TokioInstant,
) {
    let mut read = 0;
    let whole = loop {
        let due = (TokioInstant::now() + idle).min(deadline);
        let frame = match tokio::time::timeout_at(due, inner.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break true,
            Ok(Some(Err(_))) | Err(_) => break false,
        };
        if let Some(data) = frame.data_ref() {
            read += data.len();
            meter.observe(data);
            if meter.finished() {
                break true;
            }
            if read > REST_READ_MAX {
                break false;
            }
        }
    };
    // Without counts, it keeps its estimate, as an answer cut short.
    finish.ctx.read_after_client_left = whole && meter.counted();
    finish.account(Some("client_closed"), Some(meter), None, body_log);
}
