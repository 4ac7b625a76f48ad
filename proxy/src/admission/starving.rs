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
//! A claim begun at `min` lifts the limit off it, and at 1.5 × `min` it
//! used to end: the limit fell back, and the claim grew again from
//! nothing. Three instances in front of 32 workers of log-normal 100 ms
//! at 3x: the one whose probes read the backend lowest cycled between 4
//! and 10 with its shed level at its top and 60-120 purchases queued,
//! while the others, at 17-33, shed nothing (a purchase p99 over a second
//! in one simulated run of six). So the claim holds above `min` while
//! the backend serves under [`SERVED_SHORT`] of the `never_shed` tiers'
//! arrivals over the last second ([`Served`]): an instance whose fair
//! share would serve them does not hold, a starved one does. At 5x, where
//! purchases are the backend's capacity, every instance serves about all
//! of its purchases once the shares are even, and none holds for long.
//! (Simulated, 800 seeds: runs over a second 141 → 96; holding whenever
//! the claim began at `min` did as well there but raised two instances'
//! purchase p50 at 5x from 90 to 142 ms; docs/admission.md, "Fifty-fifth
//! round".)
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
/// A claim begun at `min` holds above it while the backend serves under
/// this share of the `never_shed` tiers' arrivals.
pub const SERVED_SHORT: f64 = 0.9;
/// [`Served`] counts over two halves of this: the one filling and the
/// one before.
const SERVED_HALF: Duration = Duration::from_millis(500);
/// Fewer arrivals than this over both halves say too little.
const SERVED_MIN: u32 = 10;

/// How many of the `never_shed` tiers' arrivals the backend served over
/// the last second or so: their completions over their arrivals, counted
/// in two halves (the one filling and the one before). A request refused
/// or still waiting counts as not served.
#[derive(Debug, Clone, Default)]
pub struct Served {
    half_start: Option<Instant>,
    /// (arrived, done) in the half that fills.
    now: (u32, u32),
    /// The same in the half before, if it ended less than a half ago.
    before: (u32, u32),
}

impl Served {
    pub fn arrived(&mut self, now: Instant) {
        self.roll(now);
        self.now.0 += 1;
    }

    pub fn done(&mut self, now: Instant) {
        self.roll(now);
        self.now.1 += 1;
    }

    /// Completions over arrivals, once [`SERVED_MIN`] have arrived.
    pub fn share(&mut self, now: Instant) -> Option<f64> {
        self.roll(now);
        let arrived = self.now.0 + self.before.0;
        let done = self.now.1 + self.before.1;
        (arrived >= SERVED_MIN).then(|| f64::from(done) / f64::from(arrived))
    }

    fn roll(&mut self, now: Instant) {
        let start = *self.half_start.get_or_insert(now);
        let age = now.saturating_duration_since(start);
        if age >= SERVED_HALF {
            self.before = if age < 2 * SERVED_HALF {
                self.now
            } else {
                (0, 0)
            };
            self.now = (0, 0);
            self.half_start = Some(now);
        }
    }
}

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
    /// The share of the `never_shed` tiers' arrivals the backend served
    /// ([`Served`]); `None` while too few arrived.
    pub served: Option<f64>,
}

/// The starvation state of one site's limit.
#[derive(Debug, Clone, Default)]
pub struct Starving {
    since: Option<Instant>,
    /// The claim began at `min` (see the overview: it holds above it).
    from_min: bool,
    cool_until: Option<Instant>,
}

impl Starving {
    /// The claim at `now`: [`Urgency::Starving`] at `min` (and above it
    /// while a claim begun there holds, see the overview),
    /// [`Urgency::Short`] over it, with the share of the baseline claimed.
    pub fn claim(&mut self, now: Instant, seen: Seen) -> Urgency {
        if seen.collapse.is_some_and(|r| r > COLLAPSE) {
            self.cool_until = Some(now + COOL_DOWN);
        }
        let cooling = self.cool_until.is_some_and(|t| now < t);
        let held = self.from_min && seen.served.is_some_and(|s| s < SERVED_SHORT);
        let at_min = held || f64::from(seen.limit) <= STARVED_AT * f64::from(seen.min);
        let short = seen.limit > SHARE_FROM
            && seen.over_ceiling.is_some_and(|r| r > 1.0)
            && seen.waited_over_target < SHARE_WHILE;
        if cooling || !seen.waiting || !(at_min || short) {
            self.since = None;
            self.from_min = false;
            return Urgency::Calm;
        }
        self.from_min = at_min;
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
            served: Some(1.0),
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

    fn served(share: f64, limit: u32) -> Seen {
        Seen {
            served: Some(share),
            ..seen(true, limit, 24)
        }
    }

    #[test]
    fn a_claim_begun_at_min_holds_above_it_while_the_backend_serves_few_purchases() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        assert_eq!(s.share(t0, served(0.7, 4)), 0.0);
        // Lifted to 10 by the claim (over 1.5 x min, at most SHARE_FROM
        // for a short claim): it holds and goes on growing.
        let c = s.share(t0 + 300 * MS, served(0.7, 10));
        assert!((c - 0.3).abs() < 1e-9, "{c}");
        let c = s.share(t0 + 600 * MS, served(0.7, 20));
        assert!((c - 0.6).abs() < 1e-9, "{c}");
        // Served again: the hold ends (its waits have run too long for a
        // short claim). Purchases unserved again later do not resume the
        // hold at 10: whatever claim follows starts over from nothing.
        let enough = Seen {
            waited_over_target: SHARE_WHILE,
            ..served(SERVED_SHORT, 10)
        };
        assert_eq!(s.claim(t0 + 700 * MS, enough), Urgency::Calm);
        assert_eq!(s.share(t0 + 800 * MS, served(0.7, 10)), 0.0);
    }

    #[test]
    fn without_a_claim_begun_at_min_a_limit_above_it_does_not_hold() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        let lifted = Seen {
            waited_over_target: SHARE_WHILE,
            ..served(0.5, 7)
        };
        assert_eq!(s.claim(t0, lifted), Urgency::Calm);
        assert_eq!(s.claim(t0 + 500 * MS, lifted), Urgency::Calm);
        // Nor without a count of what was served.
        s.claim(t0 + 600 * MS, seen(true, 4, 24));
        let unknown = Seen {
            served: None,
            waited_over_target: SHARE_WHILE,
            ..seen(true, 7, 24)
        };
        assert_eq!(s.claim(t0 + 700 * MS, unknown), Urgency::Calm);
    }

    #[test]
    fn served_counts_completions_over_arrivals_over_the_last_second() {
        let t0 = Instant::now();
        let mut v = Served::default();
        for i in 0..(SERVED_MIN - 1) {
            v.arrived(t0 + i * MS);
        }
        assert_eq!(v.share(t0 + 10 * MS), None, "too few arrivals");
        v.arrived(t0 + 10 * MS);
        for i in 0..5 {
            v.done(t0 + (20 + i) * MS);
        }
        assert_eq!(v.share(t0 + 30 * MS), Some(0.5));
        // The next half keeps the one before: 10 + 10 arrived, 5 + 10 done.
        let t1 = t0 + SERVED_HALF;
        for i in 0..10 {
            v.arrived(t1 + i * MS);
            v.done(t1 + i * MS);
        }
        assert_eq!(v.share(t1 + 20 * MS), Some(0.75));
        // A half later the first is gone; after a gap of two, all is.
        assert_eq!(v.share(t1 + SERVED_HALF), Some(1.0));
        assert_eq!(v.share(t1 + 4 * SERVED_HALF), None);
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
