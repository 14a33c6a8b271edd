//! Charges a response's cost to today's budgets (global, and the
//! identity's tier budget) and raises the alerts it crosses: a
//! `budget_alert` warning, `sluice_budget_alerts_total`, and the webhook.

use crate::gateway::Gateway;
use crate::proxy::ctx::Identity;
use crate::snapshot::Snapshot;
use crate::state::budget::{Alert, BudgetScope};
use crate::telemetry::alerts::Delivery;

pub fn charge(gw: &Gateway, snap: &Snapshot, identity: Option<&Identity>, cost: f64) {
    let budget = &snap.budget;
    // Spend is tracked only where a budget reads it: without one, the
    // request path takes no budget lock at all.
    if let Some(limit) = budget.daily_usd {
        charge_global(gw, snap, cost, limit);
    }
    charge_identity(gw, snap, identity, cost);
}

fn charge_global(gw: &Gateway, snap: &Snapshot, cost: f64, limit: f64) {
    let budget = &snap.budget;
    let spent = {
        let alerts = gw
            .budgets
            .add(&BudgetScope::Global, cost, limit, &budget.alert_at);
        raise(gw, snap, "global", alerts);
        gw.budgets.spent(&BudgetScope::Global)
    };
    gw.metrics
        .budget_spent
        .with_label_values(&["global"])
        .set(spent);
    gw.metrics
        .budget_limit
        .with_label_values(&["global"])
        .set(limit);
}

fn charge_identity(gw: &Gateway, snap: &Snapshot, identity: Option<&Identity>, cost: f64) {
    let budget = &snap.budget;
    let Some(identity) = identity else { return };
    let Some((tier_name, tier)) = identity
        .tier
        .as_ref()
        .and_then(|t| snap.tiers.get_key_value(t))
    else {
        return;
    };
    let Some(tier_budget) = tier.daily_budget_usd else {
        return;
    };
    let alerts = gw.budgets.add(
        &BudgetScope::Identity(identity.id.clone()),
        cost,
        tier_budget,
        &budget.alert_at,
    );
    // Per-identity spend is not a metric label (unbounded); its alerts
    // count under the tier.
    raise(gw, snap, &format!("tier:{tier_name}"), alerts);
}

fn raise(gw: &Gateway, snap: &Snapshot, scope: &str, alerts: Vec<Alert>) {
    for alert in alerts {
        tracing::dispatcher::with_default(&gw.log, || {
            tracing::warn!(
                target: "sluice::budget",
                scope,
                threshold = alert.threshold,
                spent_usd = alert.spent_usd,
                budget_usd = alert.budget_usd,
                "budget_alert"
            );
        });
        gw.metrics
            .budget_alerts
            .with_label_values(&[scope, &alert.threshold.to_string()])
            .inc();
        if let (Some(url), Some(queue)) = (&snap.budget.webhook_url, &gw.webhook) {
            // Full queue: the alert is still logged and counted.
            let _ = queue.try_send(Delivery {
                url: url.clone(),
                scope: scope.to_owned(),
                alert,
            });
        }
    }
}
