//! Trying a pool's members in turn: which member is next, what each
//! attempt's outcome does to its circuit, and what is counted.

use super::*;

/// Tries the pool's members in order until one answers well. `plain`:
/// the body without the usage sluice asked for, for a member that
/// refuses the question.
#[allow(clippy::too_many_arguments)]
pub(super) async fn failover(
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
pub(super) struct Abandoned<'a>(pub(super) Option<(&'a Active, usize)>);

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some((active, index)) = self.0.take() {
            count(active, index, Outcome::ClientError);
        }
    }
}

/// Counts an attempt's outcome for its upstream.
pub(super) fn count(active: &Active, index: usize, outcome: Outcome) {
    if let Some(m) = active.upstreams.get(index) {
        m.outcome(outcome).inc();
    }
}

/// Counts a single upstream's answer, or its failure.
pub(super) fn count_answer(
    active: &Active,
    index: usize,
    answer: &Result<Response<BoxBody>, AttemptFailure>,
) {
    let outcome = match answer {
        Ok(resp) => Outcome::of_status(resp.status().as_u16()),
        Err(failure) => failure.outcome,
    };
    count(active, index, outcome);
}
