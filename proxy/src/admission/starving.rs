//! The claim of an instance whose purchases starve at `min`.
//!
//! In a fleet, each instance's limit settles where the backend's latency
//! meets its own ceiling, and the instances' ceilings differ by what each
//! one's probes happened to measure. On a noisy backend two instances'
//! probes of the same service time differ by a standard error or two, and
//! the instance with the lower ceiling sinks to `min`: its purchases queue
//! for seconds while another instance, its limit three times larger,
//! admits merchants and admin (simulation, two instances in front of 16
//! workers with log-normal service times at 3x: one instance's queue grew
//! to 400 purchases, purchase p99 0.7 s in the mean of sixteen seeds).
//!
//! An instance whose `never_shed` tiers wait over the target while it
//! holds no more than [`STARVED_AT`] × `min` claims latency above its
//! ceiling, growing with the time it starves ([`CLAIM_PER_SECOND`] of
//! its baseline, at most [`MAX_CLAIM`]). The others see the latency rise
//! and shed their lower tiers first; a larger instance is never starved,
//! so it never claims. A single instance at 5x sits at the knee, not at
//! `min`, and never claims either.
//!
//! Above that, an instance can be short of its share too: two instances'
//! first probes of a large backend whose service time varies (64 workers ×
//! 50 ms, σ 0.25) read ceilings 5-15% apart, and the lower one settles at
//! `1.2 / (1 − ceiling / latency)`, 7-13, with everything but purchases
//! shed and hundreds of purchases queued, while the other holds the
//! workers (real fleets: purchase p99 over a second in two rounds of
//! fourteen; docs/admission.md, "Thirty-second round"). Such an instance
//! (over [`SHARE_FROM`], its last window over its ceiling, purchases
//! waiting over the target) claims [`SHARE_CLAIM`] at most: enough to
//! close that gap. Not for long: a run of such waits longer than
//! [`SHARE_WHILE`] is purchases over the backend's capacity, which a
//! claim only queues deeper (at 5x every instance's purchases wait;
//! without this rule a single instance's simulated drill plateau had a
//! purchase p99 of 1 500 ms against 1 146). Limits of [`SHARE_FROM`] or
//! less are a small backend's, whose shares the queue allowance's floor
//! already evens (`FAIR_FROM` in `limit.rs`); claiming there, three
//! instances on 8 workers at 5x had 1 161 ms against 771 in the median
//! seed. A single instance has nobody to claim from, and in
//! front of a collapsing backend those 2 s at a time deepen its queue
//! (the simulated drill's ramp: purchase p99 113 → 133 ms in the median
//! seed; the real `make peak` met its thresholds).
//!
//! Where every instance starves (`N × min` over the workers, or a backend
//! that collapses under its queue), every instance claims, and the claim
//! feeds the queue: the backend's latency then runs away from the
//! ceiling. A window over [`COLLAPSE`] × the ceiling (without its slowest
//! answer: one slow answer is the service time's tail) withdraws the claim
//! for [`COOL_DOWN`] (without it, a fleet in front of a collapsing backend
//! had purchase p99 over a second in two seeds of sixteen).

use std::time::{Duration, Instant};

use super::limit::Urgency;

/// The limit, as a multiple of `min`, at or under which waiting purchases
/// count as starving.
pub const STARVED_AT: f64 = 1.5;
/// How fast the claim grows while the purchases starve: a share of the
/// baseline per second.
pub const CLAIM_PER_SECOND: f64 = 1.0;
/// The largest claim, as a share of the baseline. At 0.3, an instance
/// whose probe came out two standard errors low (16.8 ms for 20.6) still
/// sat under the other's ceiling with the whole claim, and starved on
/// (simulation, two instances cold into 3x on log-normal: purchase p99
/// 206 → 157 ms in the mean of sixteen seeds with 0.6).
pub const MAX_CLAIM: f64 = 0.6;
/// Over this limit an instance whose purchases wait claims a share
/// ([`SHARE_CLAIM`]); at or under it, only at `min` ([`STARVED_AT`]).
pub const SHARE_FROM: u32 = 8;
/// The largest claim of an instance short of its share, as a share of the
/// baseline: a gap between two ceilings of up to 10%.
pub const SHARE_CLAIM: f64 = 0.1;
/// An instance short of its share claims while its purchases' waits over
/// the target have run for less than this.
pub const SHARE_WHILE: Duration = Duration::from_secs(2);
/// A window mean (without its slowest answer) over this multiple of the
/// ceiling is a backend that the claims collapse, not a share to win back.
pub const COLLAPSE: f64 = 3.0;
/// How long a collapse withdraws the claim.
pub const COOL_DOWN: Duration = Duration::from_secs(5);

/// What the limit shows when asked whether its purchases starve.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The `never_shed` tiers waited over the target within the last
    /// second while every other tier was shed.
    pub waiting: bool,
    /// The limit in force and its `min`.
    pub limit: u32,
    pub min: u32,
    /// The last window's mean latency over the limit's ceiling.
    pub over_ceiling: Option<f64>,
    /// The same without the window's slowest answer
    /// ([`super::limit::Limit::collapse_ratio`]): what [`COLLAPSE`] reads.
    pub collapse: Option<f64>,
    /// How long every grant of these tiers has waited over the target,
    /// without a break, while every other tier was shed.
    pub waited_over_target: Duration,
}

/// The starvation state of one site's limit.
#[derive(Debug, Clone, Default)]
pub struct Starving {
    since: Option<Instant>,
    cool_until: Option<Instant>,
}

impl Starving {
    /// The claim at `now`: [`Urgency::Starving`] at `min`,
    /// [`Urgency::Short`] over it, with the share of the baseline claimed.
    pub fn claim(&mut self, now: Instant, seen: Seen) -> Urgency {
        if seen.collapse.is_some_and(|r| r > COLLAPSE) {
            self.cool_until = Some(now + COOL_DOWN);
        }
        let cooling = self.cool_until.is_some_and(|t| now < t);
        let at_min = f64::from(seen.limit) <= STARVED_AT * f64::from(seen.min);
        let short = seen.limit > SHARE_FROM
            && seen.over_ceiling.is_some_and(|r| r > 1.0)
            && seen.waited_over_target < SHARE_WHILE;
        if cooling || !seen.waiting || !(at_min || short) {
            self.since = None;
            return Urgency::Calm;
        }
        let since = *self.since.get_or_insert(now);
        let grown = CLAIM_PER_SECOND * now.duration_since(since).as_secs_f64();
        if at_min {
            Urgency::Starving(grown.min(MAX_CLAIM))
        } else {
            Urgency::Short(grown.min(SHARE_CLAIM))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    impl Starving {
        fn share(&mut self, now: Instant, seen: Seen) -> f64 {
            self.claim(now, seen).share()
        }
    }

    fn seen(waiting: bool, limit: u32, latency_ms: u32) -> Seen {
        Seen {
            waiting,
            limit,
            min: 4,
            over_ceiling: Some(f64::from(latency_ms) / 22.0),
            collapse: Some(f64::from(latency_ms) / 22.0),
            waited_over_target: Duration::from_millis(500),
        }
    }

    #[test]
    fn a_starved_instance_claims_more_the_longer_it_starves_up_to_the_cap() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        assert_eq!(s.share(t0, seen(true, 4, 24)), 0.0);
        let c = s.share(t0 + 100 * MS, seen(true, 5, 24));
        assert!((c - 0.1).abs() < 1e-9, "{c}");
        assert_eq!(s.share(t0 + 2000 * MS, seen(true, 6, 24)), MAX_CLAIM);
    }

    #[test]
    fn no_claim_without_waits_or_above_the_starved_limit_and_it_starts_over() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        s.share(t0, seen(true, 4, 24));
        assert_eq!(s.share(t0 + 500 * MS, seen(false, 4, 24)), 0.0);
        assert_eq!(s.share(t0 + 600 * MS, seen(true, 7, 24)), 0.0);
        // Starving again: the claim grows from nothing.
        s.share(t0 + 700 * MS, seen(true, 4, 24));
        let c = s.share(t0 + 800 * MS, seen(true, 4, 24));
        assert!(c < 0.11, "{c}");
    }

    #[test]
    fn an_instance_short_of_its_share_claims_a_little_and_not_for_long() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        // A limit of 12 (over SHARE_FROM), purchases waiting, the latency
        // over its ceiling: a claim that grows to SHARE_CLAIM, not more.
        assert_eq!(s.share(t0, seen(true, 12, 24)), 0.0);
        let c = s.share(t0 + 50 * MS, seen(true, 12, 24));
        assert!((c - 0.05).abs() < 1e-9, "{c}");
        assert_eq!(s.share(t0 + 1000 * MS, seen(true, 12, 24)), SHARE_CLAIM);
        // Purchases that have waited over the target for SHARE_WHILE
        // without a break are over capacity: no claim.
        let standing = Seen {
            waited_over_target: SHARE_WHILE,
            ..seen(true, 12, 24)
        };
        assert_eq!(s.share(t0 + 1100 * MS, standing), 0.0);
        // Nor with the latency under the ceiling, nor at a small limit.
        assert_eq!(s.share(t0 + 1200 * MS, seen(true, 12, 21)), 0.0);
        assert_eq!(s.share(t0 + 1300 * MS, seen(true, 8, 24)), 0.0);
        assert_eq!(s.share(t0 + 2300 * MS, seen(true, 8, 24)), 0.0);
    }

    #[test]
    fn a_collapse_withdraws_the_claim_for_the_cool_down() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        s.share(t0, seen(true, 4, 24));
        assert!(s.share(t0 + 500 * MS, seen(true, 4, 24)) > 0.0);
        // A window at over three times the ceiling.
        assert_eq!(s.share(t0 + 600 * MS, seen(true, 4, 70)), 0.0);
        assert_eq!(s.share(t0 + 4000 * MS, seen(true, 4, 24)), 0.0);
        s.share(t0 + 600 * MS + COOL_DOWN, seen(true, 4, 24));
        assert!(s.share(t0 + 900 * MS + COOL_DOWN, seen(true, 4, 24)) > 0.0);
    }

    #[test]
    fn a_window_slow_by_one_answer_is_not_a_collapse() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        s.share(t0, seen(true, 4, 24));
        // Over three ceilings with its slowest answer, at one without it.
        let tail = Seen {
            collapse: Some(24.0 / 22.0),
            ..seen(true, 4, 300)
        };
        assert!(s.share(t0 + 500 * MS, tail) > 0.4);
        assert!(s.share(t0 + 600 * MS, seen(true, 4, 24)) > 0.5);
    }

    #[test]
    fn the_claim_says_whether_the_instance_starves_at_min_or_is_short_of_its_share() {
        let t0 = Instant::now();
        let (mut at_min, mut short) = (Starving::default(), Starving::default());
        at_min.claim(t0, seen(true, 4, 24));
        short.claim(t0, seen(true, 12, 24));
        let (a, b) = (
            at_min.claim(t0 + 50 * MS, seen(true, 4, 24)),
            short.claim(t0 + 50 * MS, seen(true, 12, 24)),
        );
        assert!(matches!(a, Urgency::Starving(c) if c > 0.0), "{a:?}");
        assert!(matches!(b, Urgency::Short(c) if c > 0.0), "{b:?}");
        assert_eq!(a.reason(), Some("starving_at_min"));
        assert_eq!(b.reason(), Some("short_of_share"));
        assert_eq!(
            short.claim(t0 + 60 * MS, seen(false, 12, 24)),
            Urgency::Calm
        );
        assert_eq!(Urgency::Calm.reason(), None);
    }
}
