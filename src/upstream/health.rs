//! Active health checks (`pools.*.health_check`): a background probe of
//! each member every `interval` (`GET path`, with the member's
//! `set_headers`, so a provider's authenticated path can be the check),
//! each member on its own, given the interval (1 s to 5 s) to answer.
//! `failures` failed checks in a row mark a member down, so it is
//! skipped before users find out, and one passing check lets it back in. The verdict is kept beside the
//! member's circuit breaker, not in it: traffic's failures and cooldowns
//! stand whatever the checks say. The task holds only a weak
//! reference to its config: it stops when a reload retires that config.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::Request;

use crate::body;
use crate::gateway::Active;
use crate::upstream::{Upstream, UpstreamKind, mock};

/// A probe slower than this, or than the interval, counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time a probe is given, whatever the interval.
const PROBE_FLOOR: Duration = Duration::from_secs(1);

/// Starts the probes of every pool of `active` that has a health check:
/// one task per member, so that a member whose check hangs holds back
/// no other member's checks. Their verdicts are logged to `log`.
pub fn spawn(active: &Arc<Active>, log: &tracing::Dispatch) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for (p, pool) in active.snapshot.pools.iter().enumerate() {
        let Some(check) = &pool.health_check else {
            continue;
        };
        for slot in 0..pool.members.len() {
            let weak: Weak<Active> = Arc::downgrade(active);
            let interval = check.interval;
            let log = log.clone();
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let Some(active) = weak.upgrade() else { return };
                    probe_member(&active, p, slot, &log).await;
                }
            });
        }
    }
}

/// Checks the `slot`th member of pool `p` once and records the verdict.
async fn probe_member(active: &Active, p: usize, slot: usize, log: &tracing::Dispatch) {
    let snap = &active.snapshot;
    let Some(pool) = snap.pools.get(p) else {
        return;
    };
    let (Some(check), Some(&member)) = (&pool.health_check, pool.members.get(slot)) else {
        return;
    };
    let (Some(upstream), Some(breaker)) = (snap.upstreams.get(member), active.breakers.get(member))
    else {
        return;
    };
    // At least a second: a TLS handshake and an answer take time.
    let timeout = PROBE_TIMEOUT.min(check.interval).max(PROBE_FLOOR);
    // The path without its query, which may carry a token.
    let path = check.path.split('?').next().unwrap_or_default();
    // Logged when the verdict changes, not at every check: a member down
    // for an hour would otherwise write a warning every interval.
    if probe(upstream, &check.path, timeout).await {
        if breaker.health_passed() {
            tracing::dispatcher::with_default(log, || {
                tracing::info!(
                    event = "upstream_marked_up",
                    upstream = %upstream.name,
                    path,
                    "a health check passed; the member takes requests again"
                );
            });
        }
    } else {
        // Down until a later check says otherwise; the mark lapses
        // only if no check comes for two rounds (each the interval plus
        // the time a check may take), so that checks that keep failing
        // keep it with room to spare.
        let round = check.interval.saturating_add(timeout);
        let threshold = pool.breaker_failures;
        if breaker.health_failed(threshold, Instant::now() + round * 2) {
            tracing::dispatcher::with_default(log, || {
                tracing::warn!(
                    event = "upstream_marked_down",
                    upstream = %upstream.name,
                    path,
                    failures = threshold,
                    "health checks failed; the member is skipped until one passes"
                );
            });
        }
    }
}

/// Whether `GET path` answers 2xx within `timeout`.
async fn probe(upstream: &Upstream, path: &str, timeout: Duration) -> bool {
    let pq = path.parse::<http::uri::PathAndQuery>().ok();
    match &upstream.kind {
        UpstreamKind::Http(http) => {
            let Ok(uri) = http.uri_for(pq.as_ref()) else {
                return false;
            };
            let Ok(mut req) = Request::get(uri).body(body::empty()) else {
                return false;
            };
            // (The client sets `host`, as for every request.)
            crate::proxy::headers::for_upstream(req.headers_mut(), upstream);
            matches!(
                tokio::time::timeout(timeout, http.client.request(req)).await,
                Ok(Ok(resp)) if resp.status().is_success()
            )
        }
        UpstreamKind::Mock(settings) => {
            let Ok(req) = Request::get(path).body(body::empty()) else {
                return false;
            };
            matches!(
                tokio::time::timeout(timeout, mock::respond(settings, req)).await,
                Ok(resp) if resp.status().is_success()
            )
        }
    }
}
