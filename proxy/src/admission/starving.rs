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
//! Where every instance starves (`N × min` over the workers, or a backend
//! that collapses under its queue), every instance claims, and the claim
//! feeds the queue: the backend's latency then runs away from the
//! ceiling. A window over [`COLLAPSE`] × the ceiling withdraws the claim
//! for [`COOL_DOWN`] (without it, a fleet in front of a collapsing backend
//! had purchase p99 over a second in two seeds of sixteen).

use std::time::{Duration, Instant};

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
/// A window mean over this multiple of the ceiling is a backend that the
/// claims collapse, not a share to win back.
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
}

/// The starvation state of one site's limit.
#[derive(Debug, Clone, Default)]
pub struct Starving {
    since: Option<Instant>,
    cool_until: Option<Instant>,
}

impl Starving {
    /// The claim at `now`, as a share of the baseline.
    pub fn claim(&mut self, now: Instant, seen: Seen) -> f64 {
        if seen.over_ceiling.is_some_and(|r| r > COLLAPSE) {
            self.cool_until = Some(now + COOL_DOWN);
        }
        let cooling = self.cool_until.is_some_and(|t| now < t);
        let starved = seen.waiting && f64::from(seen.limit) <= STARVED_AT * f64::from(seen.min);
        if cooling || !starved {
            self.since = None;
            return 0.0;
        }
        let since = *self.since.get_or_insert(now);
        (CLAIM_PER_SECOND * now.duration_since(since).as_secs_f64()).min(MAX_CLAIM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn seen(waiting: bool, limit: u32, latency_ms: u32) -> Seen {
        Seen {
            waiting,
            limit,
            min: 4,
            over_ceiling: Some(f64::from(latency_ms) / 22.0),
        }
    }

    #[test]
    fn a_starved_instance_claims_more_the_longer_it_starves_up_to_the_cap() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        assert_eq!(s.claim(t0, seen(true, 4, 24)), 0.0);
        let c = s.claim(t0 + 100 * MS, seen(true, 5, 24));
        assert!((c - 0.1).abs() < 1e-9, "{c}");
        assert_eq!(s.claim(t0 + 2000 * MS, seen(true, 6, 24)), MAX_CLAIM);
    }

    #[test]
    fn no_claim_without_waits_or_above_the_starved_limit_and_it_starts_over() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        s.claim(t0, seen(true, 4, 24));
        assert_eq!(s.claim(t0 + 500 * MS, seen(false, 4, 24)), 0.0);
        assert_eq!(s.claim(t0 + 600 * MS, seen(true, 7, 24)), 0.0);
        // Starving again: the claim grows from nothing.
        s.claim(t0 + 700 * MS, seen(true, 4, 24));
        let c = s.claim(t0 + 800 * MS, seen(true, 4, 24));
        assert!(c < 0.11, "{c}");
    }

    #[test]
    fn a_collapse_withdraws_the_claim_for_the_cool_down() {
        let t0 = Instant::now();
        let mut s = Starving::default();
        s.claim(t0, seen(true, 4, 24));
        assert!(s.claim(t0 + 500 * MS, seen(true, 4, 24)) > 0.0);
        // A window at over three times the ceiling.
        assert_eq!(s.claim(t0 + 600 * MS, seen(true, 4, 70)), 0.0);
        assert_eq!(s.claim(t0 + 4000 * MS, seen(true, 4, 24)), 0.0);
        s.claim(t0 + 600 * MS + COOL_DOWN, seen(true, 4, 24));
        assert!(s.claim(t0 + 900 * MS + COOL_DOWN, seen(true, 4, 24)) > 0.0);
    }
}
