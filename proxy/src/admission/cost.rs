//! Requests that cost the backend differently: the limit reads the latency
//! of the tiers that cost what purchases cost, and leaves the others out.
//!
//! The limit learns from the latency of the requests it lets through. When
//! every request costs the backend about the same, a window's mean latency
//! rises only with the backend's queue. When they do not (an admin report
//! costs eight purchases, a merchant search two), the mean moves with the
//! mix a window happens to hold: a window of reports reads as queueing, the
//! limit shrinks, the shed level sheds the reports, and the cheap mix that
//! is left reads as a backend that recovered. Real fleets in front of such
//! a backend (legacy-sim with `--class`) refused 1.7-37% of all requests at
//! 0.8x, where HAProxy refused none (docs/admission.md, "Backends whose
//! requests cost differently").
//!
//! So each tier keeps the ratio of its latency to that of a reference
//! tier at the same time: the highest `never_shed` one (purchases),
//! admitted whenever anything is. The mean of `latency / level`, where
//! `level` is the reference tier's latency over its last few samples,
//! taken at the same time so that a queue in the backend, which every
//! request waits in alike, cancels out. A tier within [`SAME_COST`] of the
//! reference, either way, costs the same and its samples count as they are;
//! a costlier or cheaper one's samples are left out of the limit's windows.
//! On a backend whose requests cost alike a lower tier's ratio still
//! strays past 1.25 now and then at 3x (its requests get in when the limit
//! opens, into a busier backend), and is left out for a while: simulated,
//! that changed 39 of 70 phases of the CI scenarios over six seeds, none
//! for the worse that counts (bounds missed 35 against 39 over twelve),
//! and real fleets on 16 × 20 ms σ 0.5 at 3x were as before. A band of 3
//! changed 3 phases of 70 but let the merchants' 2× back in, and one
//! instance at 3x in front of the costly backend (scenario 37) went 34 →
//! 67 ms.
//! The reference tier's own samples carry the backend's queue undiluted.
//!
//! Why left out, not scaled: read as its slowdown (the latency divided by
//! the tier's ratio), a report no longer showed what it costs, and a limit
//! that counts requests then filled the backend with work: at 3x two
//! instances' purchase p99 went 36 → 142 ms in real processes. Read raw, it
//! is what sheds under capacity. Left out, the purchases' own latency
//! bounds the queue they wait in (docs/admission.md, thirty-fourth round).
//!
//! A tier's ratio is the plain mean of its first [`HORIZON`] samples, then
//! a moving average over that many; until it has [`KNOWN_AFTER`], its
//! samples count as they are.

use super::limit::Sample;

/// The samples a tier's ratio is taken over (then it moves).
pub const HORIZON: u32 = 1024;

/// A tier's ratio is known once it has had this many samples.
pub const KNOWN_AFTER: u32 = 16;

/// Tiers within this ratio of the reference tier, either way, cost the
/// same.
pub const SAME_COST: f64 = 1.25;

/// The reference tier's level follows its last this many samples or so.
const LEVEL_SAMPLES: f64 = 16.0;

/// A tier whose cost is known ([`TierCosts::known`]), for `/status`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnownCost {
    pub tier: usize,
    /// Its latency over the reference tier's at the same time.
    pub ratio: f64,
    /// Within [`SAME_COST`]: its samples count; beyond, they are left out.
    pub counted: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct TierCost {
    /// Mean of its latency over the reference tier's level at the time.
    ratio: f64,
    samples: u32,
}

/// Each tier's cost at one site's backend ([`TierCosts::read`]).
#[derive(Debug, Clone)]
pub struct TierCosts {
    tiers: Vec<TierCost>,
    /// The tier whose latency is the scale.
    reference: usize,
    /// Its recent latency, seconds (0 until it has a sample).
    level: f64,
}

impl TierCosts {
    pub fn new(tiers: usize, reference: usize) -> TierCosts {
        TierCosts {
            tiers: vec![TierCost::default(); tiers],
            reference,
            level: 0.0,
        }
    }

    /// A reload changed the tiers: the kept ones keep what they learnt; a
    /// new reference starts over.
    pub fn reconfigure(&mut self, tiers: usize, reference: usize) {
        if reference == self.reference {
            self.tiers.resize(tiers, TierCost::default());
        } else {
            *self = TierCosts::new(tiers, reference);
        }
    }

    /// `sample` of a request of `tier`, as the limit should read it: as it
    /// is, or left out ([`Sample::Ignored`]) when the tier is known to cost
    /// more than [`SAME_COST`] away from the reference tier.
    pub fn read(&mut self, tier: usize, sample: Sample) -> Sample {
        let Sample::Latency(latency) = sample else {
            return sample;
        };
        let x = latency.as_secs_f64();
        if tier == self.reference {
            self.level = if self.level > 0.0 {
                self.level + (x - self.level) / LEVEL_SAMPLES
            } else {
                x
            };
            return sample;
        }
        // No reference yet (or a site without purchases): as it is.
        let (Some(t), true) = (self.tiers.get_mut(tier), self.level > 0.0) else {
            return sample;
        };
        t.samples = (t.samples + 1).min(HORIZON);
        t.ratio += (x / self.level - t.ratio) / f64::from(t.samples);
        if self.costs_differently(tier) {
            Sample::Ignored
        } else {
            sample
        }
    }

    /// Whether `tier` is known to cost more than [`SAME_COST`] away from
    /// the reference tier, either way.
    pub fn costs_differently(&self, tier: usize) -> bool {
        self.ratio(tier)
            .is_some_and(|r| !(1.0 / SAME_COST..=SAME_COST).contains(&r))
    }

    /// Every tier whose cost is known (the reference tier's is not: it is
    /// the scale).
    pub fn known(&self) -> Vec<KnownCost> {
        (0..self.tiers.len())
            .filter_map(|tier| {
                self.ratio(tier).map(|ratio| KnownCost {
                    tier,
                    ratio,
                    counted: !self.costs_differently(tier),
                })
            })
            .collect()
    }

    /// How many times the reference tier's latency `tier` costs, once
    /// known.
    pub fn ratio(&self, tier: usize) -> Option<f64> {
        let t = self.tiers.get(tier)?;
        (tier != self.reference && t.samples >= KNOWN_AFTER).then_some(t.ratio)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ms(x: f64) -> Sample {
        Sample::Latency(Duration::from_secs_f64(x / 1000.0))
    }

    /// Purchases (tier 0, the reference) at 10 ms, reports (tier 1) at 80,
    /// merchants (tier 2) at 11: a hundred of each, interleaved.
    fn three_tiers() -> TierCosts {
        let mut c = TierCosts::new(3, 0);
        for _ in 0..100 {
            c.read(0, ms(10.0));
            c.read(1, ms(80.0));
            c.read(2, ms(11.0));
        }
        c
    }

    #[test]
    fn a_costly_tier_is_left_out_and_the_reference_counts() {
        let mut c = three_tiers();
        assert!((c.ratio(1).unwrap() - 8.0).abs() < 1e-9);
        assert_eq!(c.read(0, ms(10.0)), ms(10.0));
        assert_eq!(c.read(1, ms(80.0)), Sample::Ignored);
        // A report queued behind others is left out too: the purchases
        // carry the queue.
        assert_eq!(c.read(1, ms(300.0)), Sample::Ignored);
    }

    #[test]
    fn what_is_known_is_every_other_tier_with_its_ratio() {
        let c = three_tiers();
        let known = c.known();
        assert_eq!(known.len(), 2, "{known:?}");
        assert_eq!((known[0].tier, known[0].counted), (1, false));
        assert!((known[0].ratio - 8.0).abs() < 1e-9);
        assert_eq!((known[1].tier, known[1].counted), (2, true));
        assert!(TierCosts::new(3, 0).known().is_empty());
    }

    #[test]
    fn a_tier_that_costs_about_the_same_counts_as_it_is() {
        let mut c = three_tiers();
        assert!(!c.costs_differently(2));
        assert_eq!(c.read(2, ms(11.0)), ms(11.0));
        assert_eq!(c.read(2, ms(30.0)), ms(30.0));
    }

    #[test]
    fn a_cheaper_tier_is_left_out_too() {
        let mut c = TierCosts::new(2, 0);
        for _ in 0..50 {
            c.read(0, ms(40.0));
            c.read(1, ms(2.0));
        }
        assert!(c.costs_differently(1));
        assert_eq!(c.read(1, ms(2.0)), Sample::Ignored);
    }

    #[test]
    fn a_queue_everyone_waits_in_does_not_make_a_tier_costly() {
        let mut c = TierCosts::new(2, 0);
        // Tiers of one cost (20 ms); a queue of 60 ms comes and goes; the
        // ratio is taken at the same time, so it stays near 1.
        for i in 0..600 {
            let q = if (i / 100) % 2 == 1 { 60.0 } else { 0.0 };
            c.read(0, ms(20.0 + q));
            c.read(1, ms(20.0 + q));
        }
        let r = c.ratio(1).unwrap();
        assert!((0.9..1.1).contains(&r), "{r}");
        assert_eq!(c.read(1, ms(80.0)), ms(80.0));
    }

    #[test]
    fn a_tier_ratio_follows_its_recent_samples() {
        let mut c = three_tiers();
        // The reports became as cheap as purchases for good (a cache).
        for _ in 0..8 * HORIZON {
            c.read(0, ms(10.0));
            c.read(1, ms(10.0));
        }
        assert!(!c.costs_differently(1));
        assert_eq!(c.read(1, ms(10.0)), ms(10.0));
    }

    #[test]
    fn the_first_samples_of_a_tier_and_a_site_without_purchases_count() {
        let mut c = TierCosts::new(3, 0);
        // No purchase back yet.
        assert_eq!(c.read(1, ms(80.0)), ms(80.0));
        c.read(0, ms(10.0));
        for _ in 1..KNOWN_AFTER {
            assert_eq!(c.read(1, ms(80.0)), ms(80.0));
        }
        assert_eq!(c.ratio(1), None);
        assert_eq!(c.read(1, ms(80.0)), Sample::Ignored);
    }

    #[test]
    fn other_samples_unknown_tiers_and_a_new_reference() {
        let mut c = three_tiers();
        assert_eq!(c.read(1, Sample::Congestion), Sample::Congestion);
        assert_eq!(c.read(1, Sample::Ignored), Sample::Ignored);
        // A tier the costs do not know (a reload took it away).
        assert_eq!(c.read(7, ms(5.0)), ms(5.0));
        // A reload that keeps the reference keeps the ratios.
        c.reconfigure(2, 0);
        assert!(c.costs_differently(1));
        // One that moves it starts over.
        c.reconfigure(2, 1);
        assert_eq!(c.ratio(0), None);
        assert_eq!(c.read(0, ms(10.0)), ms(10.0));
    }
}
