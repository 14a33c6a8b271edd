//! Daily spend: the global `budget.daily_usd` and each identity's tier
//! `daily_budget_usd`, reset at 00:00 UTC. Crossing an `alert_at`
//! fraction raises one alert per threshold per day per scope. Kept in the
//! gateway, across reloads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proxy::ctx::IdentityId;

const DAY_SECS: u64 = 86_400;

/// Spend read to the nano-dollar: sums of binary fractions drift (ten
/// requests at $0.005 add up to $0.049999999999999996), and a budget of
/// $0.05 must be reached by them, and shown as $0.05.
pub fn rounded(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

/// Whose spend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BudgetScope {
    Global,
    Identity(IdentityId),
}

#[derive(Debug, Default)]
struct Day {
    index: u64,
    spent: HashMap<BudgetScope, f64>,
    /// Thresholds this replica alerted from memory, as fractions × 1000,
    /// with the budget (in micro-dollars) they were of: a budget raised
    /// by a reload alerts again at its own thresholds.
    alerted: HashMap<BudgetScope, Vec<(u64, u64)>>,
    /// Thresholds the shared backend's spend has crossed, alerted by
    /// whichever replica claimed them: not alerted from memory again.
    /// Apart from `alerted`, so that a charge answered later, whose
    /// claim crossed one, still alerts it after a later charge was seen.
    crossed_shared: HashMap<BudgetScope, Vec<(u64, u64)>>,
    /// Spend the shared backend did not take (its call failed), owed to
    /// it by the next call for the scope that reaches it.
    owed: HashMap<BudgetScope, f64>,
}

/// A threshold crossed by a spend.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub threshold: f64,
    pub spent_usd: f64,
    pub budget_usd: f64,
}

#[derive(Debug, Default)]
pub struct Budgets {
    day: Mutex<Day>,
    /// Some spend may be owed to the shared backend: without any, a call
    /// for it takes no lock.
    owing: AtomicBool,
}

/// Today's number (days since the epoch, UTC) and the time to midnight.
pub fn today() -> (u64, Duration) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (
        secs / DAY_SECS,
        Duration::from_secs(DAY_SECS - secs % DAY_SECS),
    )
}

impl Budgets {
    fn with_day<T>(&self, f: impl FnOnce(&mut Day) -> T) -> Option<T> {
        let mut day = self.day.lock().ok()?;
        let (index, _) = today();
        if day.index != index {
            *day = Day {
                index,
                ..Day::default()
            };
        }
        Some(f(&mut day))
    }

    /// Today's spend of a scope.
    pub fn spent(&self, scope: &BudgetScope) -> f64 {
        self.with_day(|d| d.spent.get(scope).copied().map_or(0.0, rounded))
            .unwrap_or(0.0)
    }

    /// Keeps `usd` that the shared backend could not take, for
    /// [`Budgets::take_owed`]. A new day forgets it, as it does the spend.
    pub fn owe(&self, scope: &BudgetScope, usd: f64) {
        self.with_day(|d| {
            *d.owed.entry(scope.clone()).or_insert(0.0) += usd;
            self.owing.store(true, Ordering::Relaxed);
        });
    }

    /// What is owed to the shared backend for `scope` today, now handed
    /// over (owed again if its call fails too).
    pub fn take_owed(&self, scope: &BudgetScope) -> f64 {
        if !self.owing.load(Ordering::Relaxed) {
            return 0.0;
        }
        self.with_day(|d| {
            let owed = d.owed.remove(scope).unwrap_or(0.0);
            if d.owed.is_empty() {
                self.owing.store(false, Ordering::Relaxed);
            }
            owed
        })
        .unwrap_or(0.0)
    }

    /// Everything still owed to the shared backend today, every scope's,
    /// now handed over (owed again where its call fails).
    pub fn take_all_owed(&self) -> Vec<(BudgetScope, f64)> {
        if !self.owing.load(Ordering::Relaxed) {
            return Vec::new();
        }
        self.with_day(|d| {
            self.owing.store(false, Ordering::Relaxed);
            d.owed.drain().collect()
        })
        .unwrap_or_default()
    }

    /// Adds `usd` to a scope and returns the alerts it crosses for the
    /// first time today.
    pub fn add(&self, scope: &BudgetScope, usd: f64, budget: f64, alert_at: &[f64]) -> Vec<Alert> {
        self.with_day(|d| {
            let spent = d.spent.entry(scope.clone()).or_insert(0.0);
            *spent += usd;
            let spent = rounded(*spent);
            let shared = d.crossed_shared.get(scope);
            let alerted = d.alerted.entry(scope.clone()).or_default();
            let mut alerts = Vec::new();
            for &threshold in alert_at {
                let key = alert_key(threshold, budget);
                if budget > 0.0
                    && spent >= rounded(threshold * budget)
                    && !alerted.contains(&key)
                    && !shared.is_some_and(|s| s.contains(&key))
                {
                    alerted.push(key);
                    alerts.push(Alert {
                        threshold,
                        spent_usd: spent,
                        budget_usd: budget,
                    });
                }
            }
            alerts
        })
        .unwrap_or_default()
    }

    /// Takes in a scope's spend on `day` as the shared backend last told
    /// it (answering this replica's charge): during an outage this
    /// replica decides from memory, which must start from that figure,
    /// not from what it spent alone (a spent budget would open again).
    /// The thresholds `shared` has crossed were alerted by whichever
    /// replica crossed them. A figure of a day that has ended since is
    /// no part of today's.
    pub fn seen(&self, scope: &BudgetScope, day: u64, shared: f64, budget: f64, alert_at: &[f64]) {
        self.with_day(|d| {
            if d.index != day {
                return;
            }
            let spent = d.spent.entry(scope.clone()).or_insert(0.0);
            *spent = spent.max(shared);
            if budget > 0.0 {
                let crossed = d.crossed_shared.entry(scope.clone()).or_default();
                for &threshold in alert_at {
                    let key = alert_key(threshold, budget);
                    if rounded(shared) >= rounded(threshold * budget) && !crossed.contains(&key) {
                        crossed.push(key);
                    }
                }
            }
        });
    }

    /// Whether this replica alerted `threshold` of `budget` today (from
    /// memory, during an outage).
    pub fn alerted(&self, scope: &BudgetScope, threshold: f64, budget: f64) -> bool {
        self.with_day(|d| {
            d.alerted
                .get(scope)
                .is_some_and(|a| a.contains(&alert_key(threshold, budget)))
        })
        .unwrap_or(false)
    }
}

/// A threshold of a budget as [`Day::alerted`] keeps it.
fn alert_key(threshold: f64, budget: f64) -> (u64, u64) {
    (
        (threshold * 1000.0).round() as u64,
        (budget * 1e6).round() as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_alert_per_threshold_per_day() {
        let b = Budgets::default();
        let g = BudgetScope::Global;
        assert!(b.add(&g, 5.0, 10.0, &[0.8, 1.0]).is_empty());
        let a = b.add(&g, 3.5, 10.0, &[0.8, 1.0]);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].threshold, 0.8);
        assert!(b.add(&g, 0.1, 10.0, &[0.8, 1.0]).is_empty());
        let a = b.add(&g, 2.0, 10.0, &[0.8, 1.0]);
        assert_eq!(a.iter().map(|a| a.threshold).collect::<Vec<_>>(), [1.0]);
        assert!((b.spent(&g) - 10.6).abs() < 1e-9);
    }

    /// What the shared backend last said is where an outage's memory
    /// starts: its spend, and the thresholds it had crossed (alerted by
    /// whichever replica crossed them) are not alerted again.
    #[test]
    fn the_shared_spend_seen_is_where_memory_goes_on() {
        let b = Budgets::default();
        let g = BudgetScope::Global;
        let day = today().0;
        b.seen(&g, day, 6.0, 10.0, &[0.5, 0.8]);
        assert!((b.spent(&g) - 6.0).abs() < 1e-9);
        // Seen crossed is not alerted here: the charge whose claim crossed
        // it, answered after this one, still alerts it.
        assert!(!b.alerted(&g, 0.5, 10.0) && !b.alerted(&g, 0.8, 10.0));
        let a = b.add(&g, 2.5, 10.0, &[0.5, 0.8]);
        assert_eq!(a.iter().map(|a| a.threshold).collect::<Vec<_>>(), [0.8]);
        // A lower figure (read before this replica's own spend) lowers nothing.
        b.seen(&g, day, 1.0, 0.0, &[]);
        assert!((b.spent(&g) - 8.5).abs() < 1e-9);
        // Yesterday's figure, answered after midnight, is not today's.
        b.seen(&g, day - 1, 100.0, 10.0, &[0.5, 0.8]);
        assert!((b.spent(&g) - 8.5).abs() < 1e-9);
    }

    #[test]
    fn sums_of_small_costs_reach_the_budget_they_add_up_to() {
        let b = Budgets::default();
        let g = BudgetScope::Global;
        let mut alerts = Vec::new();
        for _ in 0..10 {
            alerts.extend(b.add(&g, 0.005, 0.05, &[1.0]));
        }
        assert_eq!(b.spent(&g), 0.05);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].spent_usd, 0.05);
    }

    /// 0.8 × $0.05 is 0.04000000000000001 in binary: eight requests at
    /// $0.005 reach it all the same.
    #[test]
    fn a_fraction_of_the_budget_is_reached_to_the_nano_dollar() {
        let b = Budgets::default();
        let g = BudgetScope::Global;
        let mut alerts = Vec::new();
        for _ in 0..8 {
            alerts.extend(b.add(&g, 0.005, 0.05, &[0.8]));
        }
        assert_eq!(alerts.len(), 1);
    }

    #[test]
    fn owed_spend_is_handed_over_once_per_scope() {
        let b = Budgets::default();
        let g = BudgetScope::Global;
        let other = BudgetScope::Identity(IdentityId::Key("alice".into()));
        assert_eq!(b.take_owed(&g), 0.0);
        b.owe(&g, 0.25);
        b.owe(&g, 0.5);
        b.owe(&other, 1.0);
        assert_eq!(b.take_owed(&g), 0.75);
        assert_eq!(b.take_owed(&g), 0.0, "handed over once");
        assert_eq!(b.take_owed(&other), 1.0);
        assert!(!b.owing.load(Ordering::Relaxed));
        b.owe(&g, 0.5);
        b.owe(&other, 2.0);
        let mut all = b.take_all_owed();
        all.sort_by(|x, y| x.1.total_cmp(&y.1));
        assert_eq!(all, [(g.clone(), 0.5), (other.clone(), 2.0)]);
        assert!(b.take_all_owed().is_empty(), "handed over once");
        assert_eq!(b.take_owed(&g), 0.0);
    }

    #[test]
    fn a_raised_budget_alerts_again_at_its_own_thresholds() {
        let b = Budgets::default();
        let g = BudgetScope::Global;
        assert_eq!(b.add(&g, 0.05, 0.05, &[0.8]).len(), 1);
        assert!(b.add(&g, 0.01, 0.05, &[0.8]).is_empty());
        // Raised to $0.10: 80% of it is $0.08.
        assert!(b.add(&g, 0.01, 0.1, &[0.8]).is_empty());
        assert_eq!(b.add(&g, 0.02, 0.1, &[0.8]).len(), 1);
    }
}
