//! Standing-queue control for the tiers that are never shed (purchases).
//!
//! The shed level never refuses a `never_shed` request: when their own
//! demand exceeds what the backend serves, they wait. A burst is what that
//! wait is for, and it drains. A demand that stays above capacity does not:
//! without control every purchase waits until its `max_queue_wait` (2 s),
//! most of them are then served seconds late and the excess is refused only
//! after waiting all of it.
//!
//! This is CoDel's test, applied to admission: the queue is *standing* once
//! every request of these tiers handed a permit for a whole [`INTERVAL`]
//! had waited longer than the target (the minimum wait, not the mean: a
//! burst that drains lets at least one through quickly). While it stands, a
//! newcomer of these tiers may wait only the target, so the excess is
//! refused (`queue_timeout`) within tens of milliseconds, the purchases
//! that are served wait at most that, and the queue still holds a target's
//! worth of work for the backend (no goodput is lost). Each such refusal,
//! and each grant that waited over half the target, keeps the state for
//! another interval; an interval without either (the demand fell under
//! capacity) ends it.
//!
//! The interval is long against a burst or a scheduling stall (a second),
//! so a purchase is refused only when demand exceeded capacity for at
//! least that long. Nor does a backlog that drains stand: when the queue of
//! these tiers is under half of what it was when the interval began, a new
//! interval starts. A limit that climbed to the knee late (a cold start on
//! 64 workers × 50 ms, whose first window held it under the knee for a
//! second) leaves a backlog of hundreds of purchases that takes over a
//! second to work off at purchase demand of 0.6x capacity; every one of
//! them waited over the target, and the whole backlog was refused at once.
//! At a demand over capacity the queue does not halve in an interval. (The
//! gate counts only the waits the shed level counts,
//! [`super::limit::Limit::waits_count`], not while the limit slow-starts
//! or a probe holds it.)

use std::time::{Duration, Instant};

/// How long the state outlives its last refusal, and by default
/// (`[shedding] standing_after`) how long every grant must have waited
/// over the target before the queue counts as standing.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The standing-queue state of one site's `never_shed` tiers.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    /// Since when every grant of these tiers waited over the target.
    above_since: Option<Instant>,
    /// The queue counts as standing until then.
    until: Option<Instant>,
    /// The last grant of these tiers that waited over the target.
    last_over: Option<Instant>,
    /// How many of these tiers waited when `above_since` began.
    queued_then: usize,
}

impl Standing {
    /// A request of these tiers got a permit after waiting `waited`; the
    /// queue stands after `onset` of waits over the target
    /// (`[shedding] standing_after`, [`INTERVAL`] by default). In a fleet,
    /// an instance whose probes read the backend low holds a share under
    /// its purchases' demand for a few seconds until its claim wins one
    /// back (`Urgency::Pressing`); a longer onset waits that out instead
    /// of refusing purchases the backend could serve.
    pub fn on_grant(
        &mut self,
        now: Instant,
        waited: Duration,
        target: Duration,
        queued: usize,
        onset: Duration,
    ) {
        // While it stands, waits are cut at the target: one over half of it
        // still says the demand is at capacity.
        if self.active(now) && waited > target / 2 {
            self.until = Some(now + INTERVAL);
        }
        if waited <= target {
            self.above_since = None;
            return;
        }
        self.last_over = Some(now);
        let since = match self.above_since {
            Some(since) => since,
            None => {
                self.above_since = Some(now);
                self.queued_then = queued;
                now
            }
        };
        if now.duration_since(since) < onset {
            return;
        }
        if !self.active(now) && queued * 2 < self.queued_then {
            // A backlog that drains: it is not the demand over capacity,
            // and a new interval starts from here.
            self.above_since = Some(now);
            self.queued_then = queued;
            return;
        }
        self.until = Some(now + INTERVAL);
    }

    /// A request of these tiers got a permit without waiting: what
    /// [`Standing::on_grant`] does with no wait (a run of waits over the
    /// target ends; nothing else moves), without the gate's work of
    /// weighing a wait. Most grants are these.
    pub fn on_prompt_grant(&mut self) {
        self.above_since = None;
    }

    /// A request of these tiers was refused at its deadline: while the
    /// queue stands, that is the excess, and the overload goes on.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.active(now) {
            self.until = Some(now + INTERVAL);
        }
    }

    /// Whether these tiers wait without their queue standing yet: a grant
    /// waited over the target within the last [`INTERVAL`]. An instance so
    /// pressed claims a larger share of the backend (`Limit::set_urgency`):
    /// in a fleet its share may be what is short, not the backend. Once the
    /// queue stands, the excess is refused, and the claim is halved (the
    /// same claim on top held every instance's purchases longer: simulated
    /// 5x p50 24 → 43 ms).
    pub fn pressing(&self, now: Instant) -> bool {
        !self.active(now) && self.waiting(now)
    }

    /// Whether a grant of these tiers waited over the target within the
    /// last [`INTERVAL`], standing or not.
    pub fn waiting(&self, now: Instant) -> bool {
        self.last_over.is_some_and(|t| now < t + INTERVAL)
    }

    /// How long every grant of these tiers has waited over the target,
    /// without a break (nothing while they are admitted at once).
    pub fn over_target_for(&self, now: Instant) -> Duration {
        self.above_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Whether newcomers of these tiers wait only the target.
    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const TARGET: Duration = Duration::from_millis(20);

    #[test]
    fn a_burst_that_drains_is_not_standing() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        // 900 ms of long waits, then one quick grant: the burst drained.
        for i in 0..9 {
            s.on_grant(t0 + i * 100 * MS, 300 * MS, TARGET, 30, INTERVAL);
        }
        s.on_grant(t0 + 950 * MS, 5 * MS, TARGET, 30, INTERVAL);
        for i in 0..9 {
            s.on_grant(
                t0 + 1000 * MS + i * 100 * MS,
                300 * MS,
                TARGET,
                30,
                INTERVAL,
            );
        }
        assert!(!s.active(t0 + 1900 * MS));
    }

    #[test]
    fn waits_over_target_for_an_interval_make_it_stand_and_refusals_keep_it() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        for i in 0..12 {
            s.on_grant(t0 + i * 100 * MS, 300 * MS, TARGET, 30, INTERVAL);
        }
        let now = t0 + 1100 * MS;
        assert!(s.active(now));
        // Grants now wait at most the target; refusals keep it standing.
        for i in 1..30 {
            let t = now + i * 100 * MS;
            s.on_grant(t, 15 * MS, TARGET, 30, INTERVAL);
            s.on_timeout(t);
        }
        assert!(s.active(now + 3000 * MS));
        // No refusal for an interval: the demand fell under capacity.
        assert!(!s.active(now + 3000 * MS + INTERVAL + MS));
    }

    #[test]
    fn a_grant_over_the_target_presses_for_an_interval_until_the_queue_stands() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        s.on_grant(t0, 5 * MS, TARGET, 30, INTERVAL);
        assert!(!s.pressing(t0), "a quick grant does not press");
        s.on_grant(t0, 30 * MS, TARGET, 30, INTERVAL);
        assert!(s.pressing(t0 + 900 * MS));
        assert!(!s.pressing(t0 + INTERVAL), "no wait over the target since");
        // Standing: the excess is refused instead; no claim on top.
        for i in 0..12 {
            s.on_grant(t0 + i * 100 * MS, 300 * MS, TARGET, 30, INTERVAL);
        }
        assert!(s.active(t0 + 1100 * MS));
        assert!(!s.pressing(t0 + 1100 * MS));
    }

    #[test]
    fn a_longer_onset_waits_out_seconds_of_waits_before_the_queue_stands() {
        let t0 = Instant::now();
        let onset = 3 * INTERVAL;
        let mut s = Standing::default();
        // 2.9 s of waits over the target (an instance whose share a fleet
        // took for a while): not standing, and it presses meanwhile.
        for i in 0..30u32 {
            s.on_grant(t0 + i * 100 * MS, 300 * MS, TARGET, 30, onset);
        }
        assert!(!s.active(t0 + 2900 * MS));
        assert!(s.pressing(t0 + 2900 * MS));
        // Its share back, a quick grant: the onset starts over.
        s.on_grant(t0 + 3000 * MS, 5 * MS, TARGET, 30, onset);
        for i in 31..60u32 {
            s.on_grant(t0 + i * 100 * MS, 300 * MS, TARGET, 30, onset);
        }
        assert!(!s.active(t0 + 5900 * MS));
        // Three whole seconds over the target: the queue stands.
        s.on_grant(t0 + 6200 * MS, 300 * MS, TARGET, 30, onset);
        assert!(s.active(t0 + 6200 * MS));
    }

    #[test]
    fn a_backlog_that_drains_does_not_stand_and_one_that_holds_does() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        // 600 waiting, worked off by 400 a second: every grant waited over
        // the target for 1.4 s, and the backlog is gone.
        for i in 0..15u32 {
            let queued = 600 - 40 * i as usize;
            s.on_grant(t0 + i * 100 * MS, 500 * MS, TARGET, queued, INTERVAL);
            assert!(!s.active(t0 + i * 100 * MS), "draining at {i}");
        }
        // A queue that holds its length for an interval stands.
        let mut s = Standing::default();
        for i in 0..12u32 {
            s.on_grant(
                t0 + i * 100 * MS,
                500 * MS,
                TARGET,
                600 - 20 * i as usize,
                INTERVAL,
            );
        }
        assert!(s.active(t0 + 1100 * MS));
    }

    #[test]
    fn a_prompt_grant_ends_a_run_of_waits_as_a_grant_without_wait_does() {
        let t0 = Instant::now();
        let run = |prompt: fn(&mut Standing, Instant)| {
            let mut s = Standing::default();
            for i in 0..8 {
                s.on_grant(t0 + i * 100 * MS, 300 * MS, TARGET, 30, INTERVAL);
            }
            prompt(&mut s, t0 + 850 * MS);
            for i in 9..14 {
                s.on_grant(t0 + i * 100 * MS, 300 * MS, TARGET, 30, INTERVAL);
            }
            (s.active(t0 + 1300 * MS), s.pressing(t0 + 1300 * MS))
        };
        let waited_nothing = run(|s, t| s.on_grant(t, Duration::ZERO, TARGET, 30, INTERVAL));
        let prompt = run(|s, _| s.on_prompt_grant());
        assert_eq!(waited_nothing, (false, true), "the run started over");
        assert_eq!(prompt, waited_nothing);
        // Without the quick grant, 1.3 s of waits over the target stand.
        assert!(run(|_, _| {}).0);
    }

    #[test]
    fn a_timeout_while_not_standing_changes_nothing() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        s.on_timeout(t0);
        assert!(!s.active(t0));
    }
}
