//! Phase 4, limits: the identity's tier (`requests_per_minute`,
//! `concurrent_requests`) and the route's own `rate_limit`, as token
//! buckets and slots in the gateway's state (so reloads keep them). After
//! auth, because limits key on the identity; before the cache, because a
//! cache hit still counts as a request.

use std::sync::LazyLock;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use memchr::memmem::Finder;

use super::ctx::{Identity, RequestCtx};
use super::error::ProxyError;
use crate::llm::facts::{self, Loose};
use crate::snapshot::{Route, Snapshot, Target, Tier};
use crate::state::budget::{self, BudgetScope};
use crate::state::limiter::{Scope, WINDOW};
use crate::state::{BucketKey, Decision, State, Unavailable};
use crate::telemetry::metrics::Metrics;

/// How long a client refused for concurrency should wait: slots free up
/// when some response ends, which cannot be predicted.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// How long a shared concurrency lease outlives the request's deadline
/// (a replica that died holding it frees it this long after).
const LEASE_MARGIN: Duration = Duration::from_secs(10);

impl From<Unavailable> for ProxyError {
    fn from(_: Unavailable) -> Self {
        ProxyError::StateUnavailable
    }
}

pub async fn admit(
    snap: &Snapshot,
    state: &State,
    metrics: &Metrics,
    route: &Route,
    ctx: &mut RequestCtx,
) -> Result<(), ProxyError> {
    let Some(identity) = ctx.identity.as_ref() else {
        return Ok(());
    };
    let tier_name = identity.tier.clone();
    let tier = tier_name.as_ref().and_then(|t| snap.tiers.get(t));
    let refuse = |limit: &'static str, retry_after: Duration| {
        refused(metrics, route, tier_name.as_deref(), limit, retry_after)
    };
    // The request units taken so far (a tier's bucket, a route's): a
    // request refused after taking them gives them back, or a client
    // hammering one route-limited route would drain its tier's bucket
    // for every other route.
    let mut taken = Taken::new(state);
    let mut request_buckets = buckets(snap, route, identity, Kind::Requests).enumerate();
    while let Some((i, (key, per_minute))) = request_buckets.next() {
        let (decision, shared) = state.take(&key, per_minute, 1).await?;
        keep_tightest(&mut ctx.rate_limit, decision);
        if !decision.allowed {
            let rest = request_buckets.map(|(_, bucket)| bucket);
            let wait = wait_on(state, rest, 1, &mut ctx.rate_limit).await;
            return Err(refuse("requests", decision.retry_after.max(wait)));
        }
        if let Some(slot) = taken.units.0.get_mut(i) {
            *slot = Some((key, per_minute, shared));
        }
    }
    if snap.budget.enforce && matches!(route.target, Target::Pool(_)) {
        let (_, until_midnight) = budget::today();
        // Independent reads: with Redis, one round trip's wait, not two.
        let over = |scope: BudgetScope, limit: Option<f64>| async move {
            match limit {
                Some(limit) => Ok(state.spent(&scope).await? >= limit),
                None => Ok::<_, ProxyError>(false),
            }
        };
        let (global_spent, own_spent) = tokio::try_join!(
            over(BudgetScope::Global, snap.budget.daily_usd),
            over(
                BudgetScope::Identity(identity.id.clone()),
                tier.and_then(|t| t.daily_budget_usd)
            ),
        )?;
        if global_spent || own_spent {
            taken.units.give_back_shown(state, &mut ctx.rate_limit);
            count_refusal(metrics, route, tier_name.as_deref(), "budget");
            return Err(ProxyError::BudgetExceeded {
                retry_after: until_midnight,
            });
        }
    }
    if let (Some(max), Some(tier)) = (tier.and_then(|t| t.concurrent_requests), tier_name.clone()) {
        let key = BucketKey {
            scope: Scope::Tier(tier),
            identity: identity.id.clone(),
        };
        // A lease outlives no request: request_timeout bounds the exchange.
        let lease = snap.limits.request_timeout + LEASE_MARGIN;
        match state.acquire(&key, max, lease).await? {
            // Held by the ctx: freed when the tap finalizes (body ended or
            // client gone).
            Some(slot) => ctx.slot = Some(slot),
            None => {
                taken.units.give_back_shown(state, &mut ctx.rate_limit);
                return Err(refuse("concurrency", CONCURRENCY_RETRY));
            }
        }
    }
    ctx.request_units = taken.keep();
    Ok(())
}

/// Request units taken from at most two buckets (the tier's, the
/// route's), without an allocation; given back when dropped (a refusal,
/// a state error, the request's future dropped) unless kept.
struct Taken<'a> {
    state: &'a State,
    units: RequestUnits,
}

impl<'a> Taken<'a> {
    fn new(state: &'a State) -> Self {
        Taken {
            state,
            units: RequestUnits::default(),
        }
    }

    /// The request is admitted: the units stay taken, and the request
    /// holds them until a later phase either keeps or refunds them.
    fn keep(mut self) -> RequestUnits {
        std::mem::take(&mut self.units)
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let _ = self.units.give_back(self.state);
    }
}

/// The request units an admitted request took, so that a refusal by its
/// token limits, which comes later, gives them back too.
#[derive(Debug, Default)]
pub struct RequestUnits([Option<(BucketKey, u64, bool)>; 2]);

impl RequestUnits {
    /// Whether any unit was given back.
    fn give_back(&mut self, state: &State) -> bool {
        let mut any = false;
        for (key, per_minute, shared) in self.0.iter_mut().filter_map(Option::take) {
            state.adjust(&key, per_minute, -1, shared);
            any = true;
        }
        any
    }

    /// Gives the units back, and has `shown` (the decision the response
    /// headers are written from) say so: each bucket one unit fuller,
    /// its reset a unit's refill sooner.
    fn give_back_shown(&mut self, state: &State, shown: &mut Option<Decision>) {
        if !self.give_back(state) {
            return;
        }
        let Some(shown) = shown.as_mut() else {
            return;
        };
        shown.remaining = shown.remaining.saturating_add(1).min(shown.limit);
        let unit = WINDOW / u32::try_from(shown.limit.max(1)).unwrap_or(u32::MAX);
        shown.reset = if shown.remaining == shown.limit {
            Duration::ZERO
        } else {
            shown.reset.saturating_sub(unit)
        };
    }
}

/// Whether a token limit applies to this request (its body must then be
/// read to estimate the reservation).
pub fn token_limits_apply(snap: &Snapshot, route: &Route, ctx: &RequestCtx) -> bool {
    route.rate_limit.tokens_per_minute.is_some()
        || tier_of(snap, ctx).is_some_and(|t| t.tokens_per_minute.is_some())
}

/// Whether a limit applies to this request whose bucket it has no
/// decision from yet (its headers then need a [`peek`]).
pub fn limits_unread(snap: &Snapshot, route: &Route, ctx: &RequestCtx) -> bool {
    let requests = || {
        route.rate_limit.requests_per_minute.is_some()
            || tier_of(snap, ctx).is_some_and(|t| t.requests_per_minute.is_some())
    };
    (ctx.rate_limit.is_none() && requests())
        || (ctx.token_limit.is_none() && token_limits_apply(snap, route, ctx))
}

fn tier_of<'a>(snap: &'a Snapshot, ctx: &RequestCtx) -> Option<&'a Tier> {
    let tier = ctx.identity.as_ref()?.tier.as_ref()?;
    snap.tiers.get(tier)
}

/// A request's token estimate: the prompt from the body's size (about
/// four bytes a token), and the most it may generate when it says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenEstimate {
    pub prompt: u64,
    pub output: u64,
    /// The choices the request asks for (`n`, 1 by default): an answer
    /// is generated whole only once each has ended.
    pub choices: u64,
}

impl TokenEstimate {
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.output)
    }
}

pub fn estimate_tokens(body: &[u8]) -> TokenEstimate {
    let prompt = crate::llm::prompt_size::estimate(body);
    // As the prompt's size, the caps are read past a UTF-8 BOM.
    let body = crate::llm::prompt_size::without_bom(body);
    // Only the caps are read; the conversation is skipped, not built.
    let (cap, choices) = match facts::parse::<OutputCap>(body) {
        Some(cap) => (
            cap.max_completion_tokens
                .0
                .or(cap.max_tokens.0)
                .or(cap.max_output_tokens.0),
            cap.n.0,
        ),
        // Refused by the typed view (a member written twice, read by
        // upstreams as its last value): read as a `Value`, which agrees.
        None => serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .map(|v| {
                let cap = |name| {
                    let value = v.get(name)?;
                    value
                        .as_u64()
                        .or_else(|| value.as_f64().and_then(facts::whole))
                };
                (
                    cap("max_completion_tokens")
                        .or_else(|| cap("max_tokens"))
                        .or_else(|| cap("max_output_tokens")),
                    cap("n"),
                )
            })
            .unwrap_or_default(),
    };
    // A chat request asking for `n` choices may generate the cap for each.
    let choices = choices.unwrap_or(1).clamp(1, facts::MAX_CHOICES as u64);
    let output = cap.unwrap_or(0).saturating_mul(choices);
    TokenEstimate {
        prompt,
        output,
        choices,
    }
}

/// A cheap estimate for a budget alone, which needs one only if the
/// answer is cut short: the prompt by size, and the output cap found by a
/// byte search, not a parse of the whole body on every request. (A cap
/// named inside a message's text may be read instead: an estimate.)
pub fn estimate_tokens_roughly(body: &[u8]) -> TokenEstimate {
    let cap = |name: &[u8]| number_after(body, &Finder::new(name));
    TokenEstimate {
        prompt: crate::llm::prompt_size::estimate(body),
        output: cap(b"\"max_completion_tokens\"")
            .or_else(|| cap(b"\"max_tokens\""))
            .or_else(|| cap(b"\"max_output_tokens\""))
            .unwrap_or(0),
        choices: choices_asked(body),
    }
}

/// The choices (`n`) a request asks for, found by a byte search (1 when
/// it names none).
pub fn choices_asked(body: &[u8]) -> u64 {
    // Built once: every chat request is searched, and building a
    // searcher costs more than searching a small body.
    static N: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"n\""));
    number_after(body, &N)
        .unwrap_or(1)
        .clamp(1, facts::MAX_CHOICES as u64)
}

/// The whole number written after the first `"name":` in `body`.
fn number_after(body: &[u8], name: &Finder<'_>) -> Option<u64> {
    let digits = values_after(body, name).next()?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// What follows each `"name":` in `body` (`name` with its quotes), found
/// by a byte search rather than a parse: inside a JSON string the
/// quotes would be escaped, so text cannot match, though a nested
/// member of the same name can.
fn values_after<'b>(body: &'b [u8], name: &'b Finder<'_>) -> impl Iterator<Item = &'b [u8]> {
    name.find_iter(body).filter_map(move |at| {
        let rest = body.get(at + name.needle().len()..)?.trim_ascii_start();
        Some(rest.strip_prefix(b":")?.trim_ascii_start())
    })
}

/// The most a request may generate: `max_completion_tokens`, or the older
/// `max_tokens` (also Anthropic's) when that is absent or null, or the
/// responses API's `max_output_tokens`.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct OutputCap {
    max_completion_tokens: Loose<u64>,
    max_tokens: Loose<u64>,
    max_output_tokens: Loose<u64>,
    n: Loose<u64>,
}

/// Reserves the estimate in every token bucket that applies, or refuses
/// with 429; the reservations are settled to real usage when the response
/// ends (`settle`).
pub async fn reserve_tokens(
    snap: &Snapshot,
    state: &State,
    metrics: &Metrics,
    route: &Route,
    ctx: &mut RequestCtx,
    estimate: u64,
) -> Result<(), ProxyError> {
    let Some(identity) = ctx.identity.clone() else {
        return Ok(());
    };
    // The buckets reserved in so far, as they stand once a refusal gives
    // their tokens back: a 429's headers show the state it leaves.
    let mut given_back: Option<Decision> = None;
    let mut token_buckets = buckets(snap, route, &identity, Kind::Tokens);
    while let Some((key, per_minute)) = token_buckets.next() {
        if estimate > per_minute {
            // It would not fit in an empty bucket: no wait helps, and the
            // backends must not each guess one. A full window is the
            // soonest a retry (with a smaller request) means anything.
            refund(state, ctx);
            ctx.token_limit = given_back;
            if let Ok((decision, _)) = state.take(&key, per_minute, 0).await {
                keep_tightest(&mut ctx.token_limit, decision);
            }
            count_refusal(metrics, route, identity.tier.as_deref(), "tokens");
            return Err(ProxyError::RateLimited {
                retry_after: crate::state::limiter::WINDOW,
                limit: "tokens",
                over: Some((estimate, per_minute)),
            });
        }
        let (decision, shared) = match state.take(&key, per_minute, estimate).await {
            Ok(taken) => taken,
            Err(e) => {
                refund(state, ctx);
                ctx.token_limit = given_back;
                return Err(e.into());
            }
        };
        if !decision.allowed {
            refund(state, ctx);
            ctx.token_limit = given_back;
            keep_tightest(&mut ctx.token_limit, decision);
            let wait = wait_on(state, token_buckets, estimate, &mut ctx.token_limit).await;
            let tier = identity.tier.as_deref();
            return Err(refused(
                metrics,
                route,
                tier,
                "tokens",
                decision.retry_after.max(wait),
            ));
        }
        keep_tightest(&mut ctx.token_limit, decision);
        keep_tightest(
            &mut given_back,
            Decision {
                remaining: decision
                    .remaining
                    .saturating_add(estimate)
                    .min(decision.limit),
                ..decision
            },
        );
        ctx.reservations.push(Reservation {
            key,
            per_minute,
            tokens: estimate,
            shared,
        });
    }
    Ok(())
}

/// A request-limit refusal's `retry-after`, lengthened to cover the token
/// buckets short of `estimate` too (read by taking nothing): a client
/// told only the request bucket's wait would be refused again by the
/// token bucket. Their states join the token headers.
pub async fn covering_tokens(
    snap: &Snapshot,
    state: &State,
    route: &Route,
    ctx: &mut RequestCtx,
    refusal: ProxyError,
    estimate: u64,
) -> ProxyError {
    let (
        ProxyError::RateLimited {
            retry_after,
            limit,
            over: None,
        },
        Some(identity),
    ) = (&refusal, ctx.identity.clone())
    else {
        return refusal;
    };
    // A bucket the estimate never fits has no wait to give: its refusal
    // is the one that tells the client to stop, not to come back later
    // for the same answer.
    if let Some((key, per_minute)) =
        buckets(snap, route, &identity, Kind::Tokens).find(|(_, per_minute)| estimate > *per_minute)
    {
        if let Ok((decision, _)) = state.take(&key, per_minute, 0).await {
            keep_tightest(&mut ctx.token_limit, decision);
        }
        return ProxyError::RateLimited {
            retry_after: crate::state::limiter::WINDOW,
            limit: "tokens",
            over: Some((estimate, per_minute)),
        };
    }
    let short = buckets(snap, route, &identity, Kind::Tokens)
        .filter(|&(_, per_minute)| estimate <= per_minute);
    let wait = wait_on(state, short, estimate, &mut ctx.token_limit).await;
    ProxyError::RateLimited {
        retry_after: (*retry_after).max(wait),
        limit,
        over: None,
    }
}

/// The buckets' state for the `x-ratelimit-*` headers of a response
/// that took or reserved nothing from them (a cache hit, a refusal before
/// admission or before the reservation): each bucket that applies and
/// has no decision yet is read by taking nothing from it. Best effort: a
/// backend error leaves the headers out.
pub async fn peek(snap: &Snapshot, state: &State, route: &Route, ctx: &mut RequestCtx) {
    let Some(identity) = ctx.identity.clone() else {
        return;
    };
    for kind in [Kind::Requests, Kind::Tokens] {
        let kept = match kind {
            Kind::Requests => &mut ctx.rate_limit,
            Kind::Tokens => &mut ctx.token_limit,
        };
        if kept.is_some() {
            continue;
        }
        for (key, per_minute) in buckets(snap, route, &identity, kind) {
            if let Ok((decision, _)) = state.take(&key, per_minute, 0).await {
                keep_tightest(kept, decision);
            }
        }
    }
}

/// Tokens held in a bucket for a request in flight.
#[derive(Debug)]
pub struct Reservation {
    key: BucketKey,
    per_minute: u64,
    tokens: u64,
    /// Taken from the shared backend (settled there too).
    shared: bool,
}

/// Whether an answer that began (a 2xx) was cut short: its client left,
/// its stream broke or stalled, or time ran out. It may not have reported
/// all its usage, though the tokens were spent. So was one whose client
/// left before its answer began ([`left_mid_attempt`]).
pub fn cut_short(ctx: &RequestCtx) -> bool {
    left_mid_attempt(ctx)
        || ((200..300).contains(&ctx.status)
            && !ctx.read_after_client_left
            && matches!(
                ctx.error,
                Some(
                    "client_closed"
                        | "upstream_stream_error"
                        | "upstream_idle_timeout"
                        | "request_timeout"
                        | "server_shutdown"
                )
            ))
}

/// Whether the client left while its request was with an upstream, before
/// any answer: the upstream goes on with it (a non-streamed completion
/// is generated, and billed, whoever waits), so it counts as used.
pub fn left_mid_attempt(ctx: &RequestCtx) -> bool {
    ctx.status == 499 && ctx.error == Some("client_closed") && ctx.upstream_started.is_some()
}

/// The `model` a request body names: its first string `model` member,
/// found by a byte search, or an upload's `model` form field (the form
/// delimited by the `boundary` its content type names). What an answer
/// that names none (audio, images) or never came is priced at. Any other
/// body names none: what a file holds is no request's model.
pub fn requested_model(body: &[u8], content_type: Option<&[u8]>) -> Option<String> {
    if let Some(boundary) = content_type.and_then(crate::llm::form::boundary) {
        return crate::llm::form::field(body, boundary, "model").map(str::to_owned);
    }
    let body = crate::llm::prompt_size::without_bom(body);
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    // The request's own member, not a tool's or a message's of that
    // name, which may come before it.
    let value = crate::llm::top_level::from_start(body, b"model")?;
    let name = value.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', name)?;
    (name[end] == b'"')
        .then(|| std::str::from_utf8(&name[..end]).ok().map(str::to_owned))
        .flatten()
}

/// Settles the reservations to the tokens really used. An answer cut
/// short keeps at least its estimate (hanging up early is no way around
/// a limit: what it reported so far, an Anthropic stream's first count,
/// may be far below what was generated); one that reported no usage at
/// all keeps its estimate when the upstream did answer (an app that
/// counts nothing); a request that failed gives it all back, but for
/// one whose client left while an upstream had it, which keeps it.
pub fn settle(state: &State, ctx: &mut RequestCtx) {
    let reported = match (ctx.input_tokens, ctx.output_tokens) {
        (None, None) => None,
        // Counts come from the upstream: no overflow, whatever they say.
        (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
    };
    let at_least_estimate = cut_short(ctx);
    let used = match reported {
        Some(used) => used,
        None if (200..300).contains(&ctx.status) || left_mid_attempt(ctx) => {
            ctx.reservations.clear();
            return;
        }
        None => {
            release(state, ctx);
            return;
        }
    };
    for r in ctx.reservations.drain(..) {
        let used = if at_least_estimate {
            used.max(r.tokens)
        } else {
            used
        };
        let delta =
            i64::try_from(used).unwrap_or(i64::MAX) - i64::try_from(r.tokens).unwrap_or(i64::MAX);
        state.adjust(&r.key, r.per_minute, delta, r.shared);
    }
}

/// A refusal after admission: the reserved tokens and the request units
/// both go back, as for a request refused at once.
fn refund(state: &State, ctx: &mut RequestCtx) {
    release(state, ctx);
    ctx.request_units
        .give_back_shown(state, &mut ctx.rate_limit);
}

fn release(state: &State, ctx: &mut RequestCtx) {
    for r in ctx.reservations.drain(..) {
        let back = -i64::try_from(r.tokens).unwrap_or(i64::MAX);
        state.adjust(&r.key, r.per_minute, back, r.shared);
    }
}

/// Which per-minute figures a bucket enforces.
#[derive(Clone, Copy)]
enum Kind {
    Requests,
    Tokens,
}

/// The buckets of `kind` that apply to `identity` on `route` (its tier's,
/// then the route's), with their per-minute capacity.
fn buckets(
    snap: &Snapshot,
    route: &Route,
    identity: &Identity,
    kind: Kind,
) -> impl Iterator<Item = (BucketKey, u64)> {
    let tier = identity.tier.as_ref().and_then(|t| snap.tiers.get(t));
    let (tier_limit, route_limit) = match kind {
        Kind::Requests => (
            tier.and_then(|t| t.requests_per_minute),
            route.rate_limit.requests_per_minute,
        ),
        Kind::Tokens => (
            tier.and_then(|t| t.tokens_per_minute),
            route.rate_limit.tokens_per_minute,
        ),
    };
    let tier_bucket = identity.tier.clone().zip(tier_limit).map(|(name, pm)| {
        let scope = match kind {
            Kind::Requests => Scope::Tier(name),
            Kind::Tokens => Scope::TierTokens(name),
        };
        (scope, pm)
    });
    let route_bucket = route_limit.map(|pm| {
        let scope = match kind {
            Kind::Requests => Scope::Route(route.name.clone()),
            Kind::Tokens => Scope::RouteTokens(route.name.clone()),
        };
        (scope, pm)
    });
    let id = identity.id.clone();
    tier_bucket
        .into_iter()
        .chain(route_bucket)
        .map(move |(scope, pm)| {
            let key = BucketKey {
                scope,
                identity: id.clone(),
            };
            (key, pm)
        })
}

/// After a bucket refused: how long the buckets not yet asked need
/// before `cost` fits in each (read by taking nothing), so that a
/// `retry-after` covers every bucket short of it, not only the first.
/// Their states join the headers' `kept`. Best effort: a backend error
/// leaves a bucket out.
async fn wait_on(
    state: &State,
    rest: impl Iterator<Item = (BucketKey, u64)>,
    cost: u64,
    kept: &mut Option<Decision>,
) -> Duration {
    let mut wait = Duration::ZERO;
    for (key, per_minute) in rest {
        if let Ok((decision, _)) = state.take(&key, per_minute, 0).await {
            keep_tightest(kept, decision);
            wait = wait.max(decision.wait_for(cost));
        }
    }
    wait
}

/// The headers show the bucket with the least left.
fn keep_tightest(kept: &mut Option<Decision>, decision: Decision) {
    if kept.is_none_or(|d| decision.remaining < d.remaining) {
        *kept = Some(decision);
    }
}

/// `sluice_rate_limited_total{route,tier,limit}`.
fn count_refusal(metrics: &Metrics, route: &Route, tier: Option<&str>, limit: &'static str) {
    metrics
        .rate_limited
        .with_label_values(&[
            &route.name,
            tier.unwrap_or(crate::telemetry::metrics::UNNAMED),
            limit,
        ])
        .inc();
}

/// Counts a refusal and builds its 429.
fn refused(
    metrics: &Metrics,
    route: &Route,
    tier: Option<&str>,
    limit: &'static str,
    retry_after: Duration,
) -> ProxyError {
    count_refusal(metrics, route, tier, limit);
    ProxyError::RateLimited {
        retry_after,
        limit,
        over: None,
    }
}

/// The `x-ratelimit-{limit,remaining,reset}-*` names of one kind of bucket.
type HeaderNames = [HeaderName; 3];

pub(crate) const REQUEST_HEADERS: HeaderNames = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];

pub(crate) const TOKEN_HEADERS: HeaderNames = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// The OpenAI-style `x-ratelimit-*-requests` headers of a decision.
pub fn headers(decision: &Decision, headers: &mut HeaderMap) {
    write_headers(REQUEST_HEADERS, decision, headers);
}

/// The `x-ratelimit-*-tokens` headers of a decision.
pub fn token_headers(decision: &Decision, headers: &mut HeaderMap) {
    write_headers(TOKEN_HEADERS, decision, headers);
}

fn write_headers(names: HeaderNames, decision: &Decision, headers: &mut HeaderMap) {
    let [limit, remaining, reset] = names;
    headers.insert(limit, HeaderValue::from(decision.limit));
    headers.insert(remaining, HeaderValue::from(decision.remaining));
    if let Ok(v) = HeaderValue::from_str(&reset_text(decision.reset)) {
        headers.insert(reset, v);
    }
}

/// A duration as the OpenAI API writes resets (Go's durations, to the
/// millisecond): `20ms`, `1.5s`, `6m0s`, `1m26.4s`, `1h0m0s`.
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        // Go's (and so OpenAI's) zero duration.
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let mut text = String::new();
    if ms >= 3_600_000 {
        text.push_str(&format!("{}h", ms / 3_600_000));
    }
    if ms >= 60_000 {
        text.push_str(&format!("{}m", ms % 3_600_000 / 60_000));
    }
    let secs = format!("{}.{:03}", ms % 60_000 / 1000, ms % 1000);
    text.push_str(secs.trim_end_matches('0').trim_end_matches('.'));
    text.push('s');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(reset_text(Duration::ZERO), "0s");
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(12)), "12s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_millis(86_400)), "1m26.4s");
        assert_eq!(reset_text(Duration::from_millis(60_010)), "1m0.01s");
        assert_eq!(reset_text(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(reset_text(Duration::from_millis(3_725_500)), "1h2m5.5s");
        assert_eq!(reset_text(Duration::from_millis(59_999)), "59.999s");
    }

    #[test]
    fn the_requested_model_is_the_requests_own_member() {
        assert_eq!(
            requested_model(br#"{"messages":[], "model" : "gpt-4o"}"#, None).as_deref(),
            Some("gpt-4o")
        );
        // A tool schema's `model` object first, then the request's own.
        assert_eq!(
            requested_model(
                br#"{"tools":[{"properties":{"model":{}}}],"model":"m"}"#,
                None
            )
            .as_deref(),
            Some("m")
        );
        // Quoted in a message, the name is escaped: not a member.
        assert_eq!(
            requested_model(
                br#"{"messages":[{"content":"say \"model\": \"x\""}]}"#,
                None
            ),
            None
        );
        // Another object's `model` before the request's own.
        assert_eq!(
            requested_model(
                br#"{"extra":{"model":"gpt-4o"},"prompt":"cat","model":"gpt-image-1"}"#,
                None
            )
            .as_deref(),
            Some("gpt-image-1")
        );
        assert_eq!(requested_model(br#"{"model":"a\"b"}"#, None), None);
        assert_eq!(requested_model(br#"{"model":7}"#, None), None);
        assert_eq!(requested_model(b"not json", None), None);
    }

    #[test]
    fn estimates_count_the_body_and_the_output_cap() {
        let estimate = |body: &str| estimate_tokens(body.as_bytes()).total();
        // A body that is no JSON is no prompt (a multipart upload).
        let quarter = |body: &str| {
            if body.starts_with('{') {
                (body.len() as u64).div_ceil(4)
            } else {
                0
            }
        };
        for (body, cap) in [
            (r#"{"messages":[],"max_tokens":100}"#, 100),
            (r#"{"max_completion_tokens":50,"max_tokens":100}"#, 50),
            // null means unset: the older name counts.
            (r#"{"max_completion_tokens":null,"max_tokens":100}"#, 100),
            (r#"{"max_tokens":"100"}"#, 0),
            (r#"{"max_tokens":-1}"#, 0),
            // A whole number written as a float is that number.
            (r#"{"max_tokens":100.0}"#, 100),
            (r#"{"max_tokens":1e2,"n":2.0}"#, 200),
            (r#"{"max_tokens":1.5}"#, 0),
            (r#"{"max_tokens":5,"max_tokens":100.0}"#, 100),
            ("not json", 0),
            (r#"{"max_tokens":5,"max_tokens":100}"#, 100),
            // The responses API's name.
            (r#"{"input":"hi","max_output_tokens":5000}"#, 5000),
            (r#"{"max_output_tokens":1,"max_output_tokens":70}"#, 70),
            // `n` choices, each up to the cap.
            (r#"{"n":5,"max_tokens":1000}"#, 5000),
            (r#"{"n":0,"max_tokens":1000}"#, 1000),
        ] {
            assert_eq!(estimate(body), quarter(body) + cap, "{body}");
        }
        for (body, cap) in [
            (r#"{"messages":[],"max_tokens": 100}"#, 100),
            (r#"{"max_completion_tokens":50,"max_tokens":100}"#, 50),
            (r#"{"input":"hi","max_output_tokens" :7}"#, 7),
            (r#"{"max_tokens":"100"}"#, 0),
            ("not json", 0),
        ] {
            let rough = estimate_tokens_roughly(body.as_bytes());
            assert_eq!(rough.total(), quarter(body) + cap, "{body}");
        }
    }
}
