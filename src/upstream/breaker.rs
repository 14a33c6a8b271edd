//! Circuit breaker and cool-down of one upstream: `failures` consecutive
//! failures open the circuit for `cooldown`; then exactly one probe is let
//! through and its outcome closes or re-opens it. A 429 with `retry-after`
//! cools the upstream down for that long. Active health checks keep their
//! own verdict beside the circuit, as Envoy keeps health checking apart
//! from outlier detection: a passing check does not close a circuit that
//! traffic opened, nor forgive traffic's failures. Kept in the gateway by upstream
//! name, so a reload keeps what it learned. The lock is per upstream and
//! never held across an await.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

/// Whether an attempt may go to this upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The circuit is half-open: this attempt is its one probe (by its
    /// number, so that only this probe can give its slot back).
    Probe(u64),
    /// Skip it until then.
    No(Instant),
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
    /// The number of the last probe let through.
    probe: u64,
    /// The probe whose first streamed content closed the circuit, while
    /// no attempt has succeeded since: if its stream then breaks, the
    /// probe failed after all, and the circuit opens again at once.
    closed_by_stream: Option<u64>,
    cooled_until: Option<Instant>,
    /// Consecutive failed health checks.
    health_failures: u32,
    /// Marked down by health checks: skipped until a check passes, or
    /// until this time if none comes (the checks stopped with a reload).
    health_down_until: Option<Instant>,
}

impl State {
    /// `sluice_upstream_up`: the circuit closed and the health checks
    /// passing.
    fn up(&self) -> i64 {
        i64::from(self.open_until.is_none() && self.health_down_until.is_none())
    }
}

pub struct Breaker {
    state: Mutex<State>,
    /// The upstream's name, for the log events of its circuit opening
    /// and closing (`sluice_upstream_up` alone leaves nothing to search
    /// for in the logs).
    upstream: Arc<str>,
    log: tracing::Dispatch,
    /// `sluice_upstream_up`: 1 closed and not marked down by health
    /// checks, else 0.
    up: IntGauge,
    /// Replaced by a reload (its upstream repointed or gone): requests and
    /// health checks still running on the old config no longer move the
    /// gauge that the new circuit now reports on.
    retired: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("upstream", &self.upstream)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    pub fn new(up: IntGauge, upstream: Arc<str>, log: tracing::Dispatch) -> Self {
        up.set(1);
        Breaker {
            state: Mutex::new(State::default()),
            upstream,
            log,
            up,
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// See [`Breaker::retired`].
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn show(&self, up: i64) {
        if !self.retired.load(std::sync::atomic::Ordering::Relaxed) {
            self.up.set(up);
        }
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let Ok(mut s) = self.state.lock() else {
            return Admit::Yes;
        };
        if let Some(until) = s.cooled_until {
            if now < until {
                return Admit::No(until);
            }
            s.cooled_until = None;
        }
        if let Some(until) = s.health_down_until {
            if now < until {
                return Admit::No(until);
            }
            s.health_down_until = None;
            s.health_failures = 0;
            self.show(s.up());
        }
        match s.open_until {
            None => Admit::Yes,
            Some(until) if now < until => Admit::No(until),
            // Cooldown over: one probe decides, the others keep skipping.
            Some(_) if s.probing => Admit::No(now + Duration::from_secs(1)),
            Some(_) => {
                s.probing = true;
                s.probe = s.probe.wrapping_add(1);
                Admit::Probe(s.probe)
            }
        }
    }

    /// Why [`Breaker::admit`] would skip the member at `now`, in a few
    /// words for an error's list of members; `None` when it would let an
    /// attempt through. (Asked, not taken: a circuit whose cooldown is
    /// over says half-open, as its one probe goes to one caller.)
    pub fn skip_reason(&self, now: Instant) -> Option<&'static str> {
        let s = self.state.lock().ok()?;
        let ahead = |until: Option<Instant>| until.is_some_and(|until| now < until);
        if ahead(s.cooled_until) {
            Some("cooling down after a 429")
        } else if ahead(s.health_down_until) {
            Some("failing its health check")
        } else if ahead(s.open_until) {
            Some("circuit open")
        } else if s.open_until.is_some() {
            Some("circuit half-open, its probe under way")
        } else {
            None
        }
    }

    /// Whether [`Breaker::admit`] would let any attempt through at `now`
    /// (for asking whether a member could still take over, not for
    /// sending to it). A circuit open, even with its cooldown over, says
    /// no: each of many slow streams cut at once for its one probe would
    /// count against their own member.
    pub fn would_admit(&self, now: Instant) -> bool {
        self.skip_reason(now).is_none()
    }

    /// A success closes the circuit only as its probe: an attempt let
    /// through before the circuit opened (a stream judged when it ends)
    /// says nothing of the failures that opened it since.
    pub fn success(&self, probe: bool) {
        if let Ok(mut s) = self.state.lock() {
            if s.open_until.is_some() && !probe {
                return;
            }
            self.close(&mut s);
        }
    }

    /// Probe `probe`'s stream gave its first content: it closes the
    /// circuit now (a circuit must not stay half-open, every other request
    /// skipping the member, for as long as one answer streams), but its
    /// end still decides ([`Breaker::stream_failed`]).
    fn probe_streaming(&self, probe: u64) {
        if let Ok(mut s) = self.state.lock() {
            self.close(&mut s);
            s.closed_by_stream = Some(probe);
        }
    }

    fn close(&self, s: &mut State) {
        if s.open_until.is_some() && !self.retired.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::dispatcher::with_default(&self.log, || {
                tracing::info!(
                    event = "circuit_closed",
                    upstream = &*self.upstream,
                    "a probe answered: the upstream's circuit is closed again"
                );
            });
        }
        s.consecutive_failures = 0;
        s.open_until = None;
        s.probing = false;
        s.closed_by_stream = None;
        self.show(s.up());
    }

    /// Counts a failure; opens the circuit at `threshold` consecutive ones,
    /// or at once when the failing attempt was the probe. While a probe
    /// is out, another attempt's failure (one let through before, judged
    /// late) only counts: the probe decides.
    pub fn failure(&self, now: Instant, threshold: u32, cooldown: Duration, probe: bool) {
        let Ok(mut s) = self.state.lock() else { return };
        self.count_failure(&mut s, now, threshold, cooldown, probe);
    }

    /// A stream broke after its first content. A probe's stream that
    /// closed the circuit fails as its probe did, unless another attempt
    /// has succeeded since (the member answers; this was one bad stream).
    fn stream_failed(&self, now: Instant, threshold: u32, cooldown: Duration, probe: Option<u64>) {
        let Ok(mut s) = self.state.lock() else { return };
        let decides = probe.is_some() && s.closed_by_stream == probe;
        if decides {
            s.closed_by_stream = None;
        }
        self.count_failure(&mut s, now, threshold, cooldown, decides);
    }

    fn count_failure(
        &self,
        s: &mut State,
        now: Instant,
        threshold: u32,
        cooldown: Duration,
        probe: bool,
    ) {
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        if probe || (!s.probing && s.consecutive_failures >= threshold) {
            // A failure judged late, while it is open already, extends
            // the cooldown but is no new opening to log.
            let opens = probe || s.open_until.is_none();
            s.open_until = Some(now + cooldown);
            s.probing = false;
            self.show(0);
            if opens && !self.retired.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::dispatcher::with_default(&self.log, || {
                    tracing::warn!(
                        event = "circuit_opened",
                        upstream = &*self.upstream,
                        failures = s.consecutive_failures,
                        probe_failed = probe,
                        cooldown_s = cooldown.as_secs_f64(),
                        "the upstream's circuit opened: it is skipped until a probe after the cooldown answers"
                    );
                });
            }
        }
    }

    /// A health check passed: the upstream is healthy again (a circuit
    /// opened by traffic still waits for its cooldown and probe). True
    /// when the checks had marked it down.
    pub fn health_passed(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let was_down = s.health_down_until.is_some();
        s.health_failures = 0;
        s.health_down_until = None;
        self.show(s.up());
        was_down
    }

    /// A health check failed; at `threshold` consecutive ones the upstream
    /// is marked down until a check passes. `recheck_by` is when the next
    /// check is due at the latest: past it with no check, the mark lapses.
    /// True when this check marked it down (it was not already).
    pub fn health_failed(&self, threshold: u32, recheck_by: Instant) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        s.health_failures = s.health_failures.saturating_add(1);
        if s.health_failures < threshold {
            return false;
        }
        let was_down = s.health_down_until.is_some();
        s.health_down_until = Some(recheck_by);
        self.show(0);
        !was_down
    }

    /// Probe `probe` ended without a verdict (client gone): its slot is
    /// free, unless a verdict already freed it and another probe took it.
    pub fn probe_abandoned(&self, probe: u64) {
        if let Ok(mut s) = self.state.lock()
            && s.probe == probe
        {
            s.probing = false;
        }
    }

    /// The upstream asked for a pause (429 + retry-after).
    pub fn cool_down(&self, until: Instant) {
        if let Ok(mut s) = self.state.lock() {
            s.cooled_until = Some(s.cooled_until.map_or(until, |u| u.max(until)));
        }
    }
}

/// One attempt's hold on its breaker, through which it gives its verdict.
/// When the attempt is the half-open circuit's probe and ends without a
/// verdict, dropping this frees the probe slot: the client went away (its
/// request's future is dropped mid-attempt) or the upstream only asked for
/// a pause (429 with `retry-after`). Otherwise the slot would stay taken
/// and the upstream be skipped for good.
pub struct Verdict<'a> {
    breaker: &'a Breaker,
    /// The probe this attempt is, until a verdict is given.
    probe: Option<u64>,
}

impl<'a> Verdict<'a> {
    pub fn new(breaker: &'a Breaker, admit: Admit) -> Self {
        let probe = match admit {
            Admit::Probe(probe) => Some(probe),
            Admit::Yes | Admit::No(_) => None,
        };
        Verdict { breaker, probe }
    }

    pub fn success(mut self) {
        let probe = self.probe.take().is_some();
        self.breaker.success(probe);
    }

    pub fn failure(mut self, now: Instant, threshold: u32, cooldown: Duration) {
        let probe = self.probe.take().is_some();
        self.breaker.failure(now, threshold, cooldown, probe);
    }

    /// For a stream whose first content came: the verdict waits for its
    /// end, where one that breaks fails too, or an upstream that breaks
    /// every stream midway would never trip. A probe closes the circuit
    /// now all the same ([`Breaker::probe_streaming`]); if its stream
    /// breaks before another attempt succeeds, it reopens it.
    pub fn at_stream_end(
        mut self,
        breaker: Arc<Breaker>,
        threshold: u32,
        cooldown: Duration,
    ) -> StreamVerdict {
        let probe = self.probe.take();
        if let Some(probe) = probe {
            self.breaker.probe_streaming(probe);
        }
        StreamVerdict {
            breaker,
            threshold,
            cooldown,
            probe,
        }
    }
}

/// A stream's verdict, given when it ends ([`Verdict::at_stream_end`]).
/// Dropped, it gives none.
#[derive(Debug)]
pub struct StreamVerdict {
    breaker: Arc<Breaker>,
    threshold: u32,
    cooldown: Duration,
    /// The probe this stream was, if it was one.
    probe: Option<u64>,
}

impl StreamVerdict {
    pub fn success(self) {
        self.breaker.success(false);
    }

    pub fn failure(self, now: Instant) {
        self.breaker
            .stream_failed(now, self.threshold, self.cooldown, self.probe);
    }
}

impl Drop for Verdict<'_> {
    fn drop(&mut self) {
        if let Some(probe) = self.probe {
            self.breaker.probe_abandoned(probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            IntGauge::new("up", "up").unwrap(),
            Arc::from("test"),
            tracing::Dispatch::none(),
        )
    }

    #[test]
    fn opens_after_threshold_then_one_probe_decides() {
        let b = breaker();
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        for _ in 0..2 {
            b.failure(t0, 3, cooldown, false);
            assert_eq!(b.admit(t0), Admit::Yes);
        }
        b.failure(t0, 3, cooldown, false);
        assert_eq!(b.admit(t0), Admit::No(t0 + cooldown));
        assert_eq!(b.up.get(), 0);
        let later = t0 + cooldown;
        assert!(matches!(b.admit(later), Admit::Probe(_)));
        assert!(matches!(b.admit(later), Admit::No(_)), "only one probe");
        // A failed probe re-opens at once.
        b.failure(later, 3, cooldown, true);
        assert_eq!(b.admit(later), Admit::No(later + cooldown));
        let again = later + cooldown;
        assert!(matches!(b.admit(again), Admit::Probe(_)));
        b.success(true);
        assert_eq!(b.admit(again), Admit::Yes);
        assert_eq!(b.up.get(), 1);
    }

    #[test]
    fn would_admit_says_what_admit_would_without_taking_the_probe() {
        let b = breaker();
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        assert!(b.would_admit(t0));
        b.failure(t0, 1, cooldown, false);
        assert!(!b.would_admit(t0), "open");
        let later = t0 + cooldown;
        assert!(
            !b.would_admit(later),
            "half-open: one probe, for one caller"
        );
        assert!(
            matches!(b.admit(later), Admit::Probe(_)),
            "asking took no probe"
        );
        assert!(!b.would_admit(later), "the probe is out");
        b.success(true);
        assert!(b.would_admit(later));
        b.cool_down(later + cooldown);
        assert!(!b.would_admit(later), "cooling down");
        assert!(b.would_admit(later + cooldown));
    }

    #[test]
    fn a_stream_let_through_before_the_circuit_opened_does_not_close_it() {
        let b = breaker();
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        let long_stream = Verdict::new(&b, b.admit(t0));
        b.failure(t0, 1, cooldown, false);
        long_stream.success();
        assert_eq!(b.admit(t0), Admit::No(t0 + cooldown));
        assert_eq!(b.up.get(), 0);
    }

    #[test]
    fn a_probes_stream_closes_at_its_first_content_and_its_break_reopens() {
        let b = Arc::new(breaker());
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        b.failure(t0, 2, cooldown, false);
        b.failure(t0, 2, cooldown, false);
        let later = t0 + cooldown;
        let stream = Verdict::new(&b, b.admit(later)).at_stream_end(b.clone(), 2, cooldown);
        assert_eq!(b.admit(later), Admit::Yes, "closed while the probe streams");
        assert_eq!(b.up.get(), 1);
        stream.failure(later);
        assert_eq!(
            b.admit(later),
            Admit::No(later + cooldown),
            "the probe failed"
        );
        assert_eq!(b.up.get(), 0);
        // A success after the probe's first content: its break is then
        // one failure like any other.
        let again = later + cooldown;
        let stream = Verdict::new(&b, b.admit(again)).at_stream_end(b.clone(), 2, cooldown);
        Verdict::new(&b, b.admit(again)).success();
        stream.failure(again);
        assert_eq!(b.admit(again), Admit::Yes, "one failure of two");
        let next = Verdict::new(&b, b.admit(again)).at_stream_end(b.clone(), 2, cooldown);
        next.failure(again);
        assert_eq!(b.admit(again), Admit::No(again + cooldown));
    }

    #[test]
    fn a_late_failure_while_a_probe_is_out_leaves_the_decision_to_it() {
        let b = breaker();
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        let early = Verdict::new(&b, b.admit(t0));
        b.failure(t0, 1, cooldown, false);
        let later = t0 + cooldown;
        let probe = Verdict::new(&b, b.admit(later));
        early.failure(later, 1, cooldown);
        assert!(matches!(b.admit(later), Admit::No(_)), "still one probe");
        probe.success();
        assert_eq!(b.admit(later), Admit::Yes);
    }

    #[test]
    fn health_checks_neither_close_nor_forgive_the_circuit() {
        let b = breaker();
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        // Traffic failures add up between passing checks.
        b.failure(t0, 2, cooldown, false);
        b.health_passed();
        b.failure(t0, 2, cooldown, false);
        assert_eq!(b.admit(t0), Admit::No(t0 + cooldown));
        // A passing check does not end the cooldown.
        b.health_passed();
        assert_eq!(b.admit(t0), Admit::No(t0 + cooldown));
        assert_eq!(b.up.get(), 0);
        assert!(matches!(b.admit(t0 + cooldown), Admit::Probe(_)));
        b.success(true);
        assert_eq!(b.up.get(), 1);
        // Failing checks mark it down at the threshold, until one passes.
        let recheck = t0 + Duration::from_secs(15);
        b.health_failed(2, recheck);
        assert_eq!(b.admit(t0), Admit::Yes);
        b.health_failed(2, recheck);
        assert_eq!(b.admit(t0), Admit::No(recheck));
        assert_eq!(b.up.get(), 0);
        b.health_passed();
        assert_eq!(b.admit(t0), Admit::Yes);
        assert_eq!(b.up.get(), 1);
        // With no check after it, the mark lapses.
        b.health_failed(1, recheck);
        assert_eq!(b.admit(recheck), Admit::Yes);
        assert_eq!(b.up.get(), 1);
    }

    #[test]
    fn a_skip_says_why() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        let b = breaker();
        b.cool_down(t0 + Duration::from_secs(2));
        assert_eq!(b.skip_reason(t0), Some("cooling down after a 429"));
        let b = breaker();
        b.health_failed(1, t0 + Duration::from_secs(15));
        assert_eq!(b.skip_reason(t0), Some("failing its health check"));
        let b = breaker();
        b.failure(t0, 1, cooldown, false);
        assert_eq!(b.skip_reason(t0), Some("circuit open"));
        assert!(matches!(b.admit(t0 + cooldown), Admit::Probe(_)));
        assert_eq!(
            b.skip_reason(t0 + cooldown),
            Some("circuit half-open, its probe under way")
        );
    }

    #[test]
    fn cool_down_skips_until_its_end() {
        let b = breaker();
        let t0 = Instant::now();
        b.cool_down(t0 + Duration::from_secs(2));
        assert_eq!(b.admit(t0), Admit::No(t0 + Duration::from_secs(2)));
        assert_eq!(b.admit(t0 + Duration::from_secs(2)), Admit::Yes);
    }

    #[test]
    fn a_probe_without_verdict_frees_its_slot() {
        let b = breaker();
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        b.failure(t0, 1, cooldown, false);
        let later = t0 + cooldown;
        // Dropped unsettled (client gone, or a 429 pause): another probe.
        let first = b.admit(later);
        assert!(matches!(first, Admit::Probe(_)));
        drop(Verdict::new(&b, first));
        let second = b.admit(later);
        assert!(matches!(second, Admit::Probe(_)));
        let verdict = Verdict::new(&b, second);
        // A stale guard of the first probe cannot free the second's slot.
        if let Admit::Probe(n) = first {
            b.probe_abandoned(n);
        }
        assert!(
            matches!(b.admit(later), Admit::No(_)),
            "one probe at a time"
        );
        // Settled by a failure: open again, no probe until the cooldown ends.
        verdict.failure(later, 1, cooldown);
        assert_eq!(b.admit(later), Admit::No(later + cooldown));
        // Not a probe: dropping it changes nothing.
        let b = breaker();
        drop(Verdict::new(&b, b.admit(t0)));
        assert_eq!(b.admit(t0), Admit::Yes);
    }
}
