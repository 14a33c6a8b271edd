//! `pricing` and `budget`, and the check that a budget set can act.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_saphyr::Spanned;

use crate::config::raw::*;
use crate::snapshot::*;

use super::Compiler;

impl Compiler<'_> {
    pub(super) fn pricing(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawPrice>>,
    ) -> HashMap<String, Price> {
        raw.iter()
            .filter_map(|(model, p)| {
                // Each read before any is given up on: `check` reports
                // every bad price of an entry at once.
                let input = self.required(&p.value.input, &p.referenced, "input");
                let output = self.required(&p.value.output, &p.referenced, "output");
                let input = input.and_then(|t| self.opt_usd(&Some(t.clone())));
                let output = output.and_then(|t| self.opt_usd(&Some(t.clone())));
                let cached_input = self.opt_usd(&p.value.cached_input);
                let cache_write = self.opt_usd(&p.value.cache_write);
                let (input, output) = (input?, output?);
                Some((
                    model.clone(),
                    Price {
                        input,
                        output,
                        cached_input,
                        cache_write,
                    },
                ))
            })
            .collect()
    }

    pub(super) fn budget(&mut self, raw: Option<&RawBudget>) -> Budget {
        let Some(raw) = raw else {
            return Budget::default();
        };
        let mut alerts: Vec<(f64, String)> = Vec::new();
        for t in raw.alert_at.iter().flatten() {
            match self.number::<f64>(t, "a fraction like 0.8") {
                // Listed twice, a threshold would be one alert with two
                // `threshold` labels (`0.8` and `0.80`).
                Some(f)
                    if alerts
                        .iter()
                        .any(|(seen, _)| (seen * 1000.0).round() == (f * 1000.0).round()) =>
                {
                    self.out_of_range(t, |f| format!("alert_at lists {f} twice"));
                }
                Some(f) if f > 0.0 && f.is_finite() => {
                    // The metric's `threshold` label is the fraction as the
                    // config writes it (`1.0` stays `1.0`).
                    let written = self.text(t).unwrap_or_default().trim().to_owned();
                    alerts.push((f, written));
                }
                Some(f) if !f.is_finite() => {
                    self.out_of_range(t, |f| format!("alert_at {f} is no finite fraction"));
                }
                Some(_) => self.out_of_range(t, |f| format!("alert_at {f} must be above 0")),
                None => {}
            }
        }
        alerts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (alert_at, alert_labels) = alerts.into_iter().unzip();
        let webhook_url = raw.webhook_url.as_ref().and_then(|t| {
            let url = self.text(t).filter(|s| !s.is_empty())?;
            let parsed = url.parse::<http::Uri>().ok().filter(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority()
                        .is_some_and(|a| !a.host().is_empty() && crate::upstream::port_is_valid(a))
            });
            if parsed.is_none() {
                // Found at the first alert, maybe days later, otherwise.
                self.error(
                    &t.referenced,
                    "webhook_url must be an http:// or https:// URL with a host",
                );
            }
            self.secrets_written.push(url.clone());
            // Its token alone, as a client might paste it anywhere.
            self.secrets_written
                .extend(super::upstreams::url_secrets(&url, vec![url.clone()]));
            Some(url)
        });
        Budget {
            daily_usd: self.budget_usd(&raw.daily_usd, "daily_usd"),
            alert_at,
            alert_labels,
            enforce: self.bool(&raw.enforce, false),
            webhook_url,
        }
    }

    /// Budgets that are there but cannot act: typos must not silently
    /// disable a limit, and neither must a missing section.
    pub(super) fn check_budget_use(
        &mut self,
        raw: &RawConfig,
        budget: &Budget,
        tiers: &HashMap<Arc<str>, Tier>,
    ) {
        if budget.alert_at.is_empty() && !budget.enforce {
            for (name, tier) in &raw.tiers {
                if let Some(t) = &tier.value.daily_budget_usd {
                    self.warning(
                        &t.referenced,
                        format!("tier `{name}`: daily_budget_usd does nothing without budget.alert_at or budget.enforce: true"),
                    );
                }
            }
        }
        if budget.enforce
            && budget.daily_usd.is_none()
            && tiers.values().all(|t| t.daily_budget_usd.is_none())
            && let Some(t) = raw.budget.as_ref().and_then(|b| b.enforce.as_ref())
        {
            self.warning(
                &t.referenced,
                "budget.enforce has nothing to enforce: set budget.daily_usd or a tier's daily_budget_usd",
            );
        }
    }
}
