//! Charges a response's cost to today's budgets (global, and the
//! identity's tier budget) and raises the alerts it crosses: a
//! `budget_alert` warning, `sluice_budget_alerts_total`, and the webhook.

use std::sync::Arc;

use futures_util::FutureExt;

use crate::gateway::{Active, Gateway};
use crate::proxy::ctx::{Identity, IdentityId};
use crate::snapshot::Snapshot;
use crate::state::budget::{Alert, BudgetScope};
use crate::telemetry::alerts::Delivery;

/// Whether a budget counts this identity's spend (the global one, or its
/// tier's).
pub fn applies(snap: &Snapshot, identity: Option<&Identity>) -> bool {
    snap.budget.daily_usd.is_some()
        || identity
            .and_then(|i| i.tier.as_ref())
            .and_then(|t| snap.tiers.get(t))
            .is_some_and(|t| t.daily_budget_usd.is_some())
}

pub fn charge(gw: &Arc<Gateway>, active: &Arc<Active>, identity: Option<&Identity>, cost: f64) {
    let snap = &active.snapshot;
    // Spend is tracked only where a budget reads it: without one, the
    // request path touches no budget at all.
    let global = snap.budget.daily_usd;
    let own = identity.and_then(|identity| {
        let (tier_name, tier) = identity
            .tier
            .as_ref()
            .and_then(|t| snap.tiers.get_key_value(t))?;
        let budget = tier.daily_budget_usd?;
        Some((tier_name.clone(), identity.id.clone(), budget))
    });
    if global.is_none() && own.is_none() {
        return;
    }
    let work = charge_scopes(gw.clone(), active.clone(), global, own, cost);
    if gw.state.is_shared() {
        // A round trip to Redis: done after the response, off its path.
        tokio::spawn(work);
    } else {
        // In memory the work never waits: it completes right here.
        let _ = work.now_or_never();
    }
}

async fn charge_scopes(
    gw: Arc<Gateway>,
    active: Arc<Active>,
    global: Option<f64>,
    own: Option<(Arc<str>, IdentityId, f64)>,
    cost: f64,
) {
    let snap = &active.snapshot;
    let alert_at = &snap.budget.alert_at;
    if let Some(limit) = global {
        let (spent, alerts) = gw
            .state
            .add_spend(&BudgetScope::Global, cost, limit, alert_at)
            .await;
        raise(&gw, snap, "global", None, alerts);
        gw.metrics.set_global_budget(spent, limit);
    }
    if let Some((tier, id, budget)) = own {
        let (_, alerts) = gw
            .state
            .add_spend(&BudgetScope::Identity(id.clone()), cost, budget, alert_at)
            .await;
        if !alerts.is_empty() {
            // Per-identity spend is not a metric label (unbounded); its
            // alerts count under the tier, and the event names whose.
            let who = id.to_string();
            raise(&gw, snap, &format!("tier:{tier}"), Some(&who), alerts);
        }
    }
}

/// Logs, counts and posts `alerts` of `scope`; `identity` is whose spend
/// crossed them, for a tier's per-identity budget.
fn raise(gw: &Gateway, snap: &Snapshot, scope: &str, identity: Option<&str>, alerts: Vec<Alert>) {
    for alert in alerts {
        tracing::dispatcher::with_default(&gw.log.dispatch, || {
            tracing::warn!(
                target: "sluice::budget",
                event = "budget_alert",
                scope,
                identity,
                threshold = alert.threshold,
                spent_usd = alert.spent_usd,
                budget_usd = alert.budget_usd,
                "budget_alert"
            );
        });
        gw.metrics
            .budget_alerts
            .with_label_values(&[scope, &snap.budget.alert_label(alert.threshold)])
            .inc();
        if let (Some(url), Some(queue)) = (&snap.budget.webhook_url, &gw.webhook) {
            // Full queue: the alert is still logged and counted.
            let _ = queue.try_send(Delivery {
                url: url.clone(),
                scope: scope.to_owned(),
                identity: identity.map(str::to_owned),
                alert,
            });
        }
    }
}
