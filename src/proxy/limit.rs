//! Phase 4, limits: the identity's tier (`requests_per_minute`,
//! `concurrent_requests`) and the route's own `rate_limit`, as token
//! buckets and slots in the gateway's state (so reloads keep them). After
//! auth, because limits key on the identity; before the cache, because a
//! cache hit still counts as a request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::ctx::RequestCtx;
use super::error::ProxyError;
use crate::snapshot::{Route, Snapshot, Target};
use crate::state::budget::{self, BudgetScope, Budgets};
use crate::state::limiter::Scope;
use crate::state::{BucketKey, Decision, MemoryLimiter};
use crate::telemetry::metrics::Metrics;

/// How long a client refused for concurrency should wait: slots free up
/// when some response ends, which cannot be predicted.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

pub fn admit(
    snap: &Snapshot,
    limiter: &Arc<MemoryLimiter>,
    budgets: &Budgets,
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
        metrics
            .rate_limited
            .with_label_values(&[&route.name, tier_name.as_deref().unwrap_or("none"), limit])
            .inc();
        ProxyError::RateLimited { retry_after }
    };
    let now = Instant::now();
    let buckets = [
        (
            tier.and_then(|t| t.requests_per_minute),
            tier_name.clone().map(Scope::Tier),
        ),
        (
            route.rate_limit.requests_per_minute,
            Some(Scope::Route(route.name.clone())),
        ),
    ];
    for (per_minute, scope) in buckets {
        let (Some(per_minute), Some(scope)) = (per_minute, scope) else {
            continue;
        };
        let key = BucketKey {
            scope,
            identity: identity.id.clone(),
        };
        let decision = limiter.take(&key, per_minute, 1, now);
        // The headers show the tightest bucket.
        if ctx
            .rate_limit
            .is_none_or(|d| decision.remaining < d.remaining)
        {
            ctx.rate_limit = Some(decision);
        }
        if !decision.allowed {
            return Err(refuse("requests", decision.retry_after));
        }
    }
    if snap.budget.enforce && matches!(route.target, Target::Pool(_)) {
        let (_, until_midnight) = budget::today();
        let global_spent = snap
            .budget
            .daily_usd
            .is_some_and(|limit| budgets.spent(&BudgetScope::Global) >= limit);
        let own_spent = tier.and_then(|t| t.daily_budget_usd).is_some_and(|limit| {
            budgets.spent(&BudgetScope::Identity(identity.id.clone())) >= limit
        });
        if global_spent || own_spent {
            metrics
                .rate_limited
                .with_label_values(&[
                    &route.name,
                    tier_name.as_deref().unwrap_or("none"),
                    "budget",
                ])
                .inc();
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
        match limiter.acquire(&key, max) {
            // Held by the ctx: freed when the tap finalizes (body ended or
            // client gone).
            Some(slot) => ctx.slot = Some(slot),
            None => return Err(refuse("concurrency", CONCURRENCY_RETRY)),
        }
    }
    Ok(())
}

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

/// The OpenAI-style `x-ratelimit-*-requests` headers of a decision.
pub fn headers(decision: &Decision, headers: &mut HeaderMap) {
    headers.insert(LIMIT, HeaderValue::from(decision.limit));
    headers.insert(REMAINING, HeaderValue::from(decision.remaining));
    if let Ok(v) = HeaderValue::from_str(&reset_text(decision.reset)) {
        headers.insert(RESET, v);
    }
}

/// A duration as the OpenAI API writes resets: `20ms`, `1.5s`, `6m0s`.
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let secs = format!("{:.3}", d.as_secs_f64());
        format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(12)), "12s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }
}
