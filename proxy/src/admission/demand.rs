//! Demand against delivery: how many requests of each tier arrived in the
//! last window, and how many the backend gave back.
//!
//! The shed level ([`super::shed_level`]) learns from waits: it rises in
//! proportion to how old the queue is. A backlog that grew while nothing
//! counted its waits (the limit slow-starting at a cold start) or while the
//! level climbed step by step from nothing (a step to 5x) was refused only
//! as the climb reached each tier, each waiter as old as the climb made it:
//! a cold start into 5x refused admin and merchant requests after
//! 120-170 ms, in real fleets and in the simulation alike. The issue wants
//! every refusal under 100 ms.
//!
//! When arrivals outrun completions by [`CLEAR_EXCESS`] or more, their
//! ratio says at once how much of the demand is excess: [`Demand::floor`]
//! is the level that would refuse that share of the arrivals from the
//! lowest tiers up (DAGOR's admission level read from the load). At an
//! overload's onset ([`super::shed_level::ShedLevel::in_onset`]), and
//! while the backend queues (under its knee, completions are the limit's
//! pace, not the backend's capacity), the gate refuses the waiters of
//! those tiers once they are three targets old; the level still climbs by
//! the waits, as before. (Raising the level to the floor itself refused as
//! fast, but real single instances at 5x then served purchases slower:
//! p50 71-93 ms against 53-73 in four A/B batches; docs/admission.md,
//! fortieth round.)

use std::time::{Duration, Instant};

/// Length of one counting window.
const WINDOW: Duration = Duration::from_millis(50);
/// Arrivals must be this many times the completions before any of them is
/// called excess. At 1.5, a noisy backend at 0.7x (scenario 20) and costly
/// tiers at 0.8x (36) refused lower tiers under capacity, in windows where
/// a collapse or a halved limit cut the completions.
pub const CLEAR_EXCESS: f64 = 2.0;
/// Fewer completions than this in a window say too little.
const MIN_DONE: u32 = 4;

/// Counts of one window.
#[derive(Debug, Clone, PartialEq)]
struct Counts {
    arrived: Vec<u32>,
    done: u32,
}

impl Counts {
    fn new(tiers: usize) -> Counts {
        Counts {
            arrived: vec![0; tiers],
            done: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Demand {
    window_end: Instant,
    current: Counts,
    /// The window before the current one, when it ended less than a window
    /// ago (after a gap it says nothing of now).
    last: Option<Counts>,
}

impl Demand {
    pub fn new(tiers: usize, now: Instant) -> Demand {
        Demand {
            window_end: now + WINDOW,
            current: Counts::new(tiers),
            last: None,
        }
    }

    pub fn resize(&mut self, tiers: usize) {
        self.current.arrived.resize(tiers, 0);
        self.last = None;
    }

    fn roll(&mut self, now: Instant) {
        if now < self.window_end {
            return;
        }
        let fresh = Counts::new(self.current.arrived.len());
        let ended = std::mem::replace(&mut self.current, fresh);
        self.last = (now < self.window_end + WINDOW).then_some(ended);
        self.window_end = now + WINDOW;
    }

    /// A request of `tier` arrived (refused ones too: they are demand).
    pub fn arrived(&mut self, tier: usize, now: Instant) {
        self.roll(now);
        if let Some(n) = self.current.arrived.get_mut(tier) {
            *n += 1;
        }
    }

    /// A request came back from the backend.
    pub fn done(&mut self, now: Instant) {
        self.roll(now);
        self.current.done += 1;
    }

    /// The level, in steps of `steps` a tier, that refuses the excess of
    /// the last window's arrivals: the tiers of `order` (lowest first) in
    /// whole while the excess outnumbers them, then the next in part,
    /// rounded down (the waits' climb does the rest). `None` when the
    /// arrivals were under [`CLEAR_EXCESS`] times the completions.
    pub fn floor(&mut self, now: Instant, order: &[usize], steps: u32) -> Option<u32> {
        self.roll(now);
        let last = self.last.as_ref()?;
        let total: u32 = last.arrived.iter().sum();
        if last.done < MIN_DONE || f64::from(total) < CLEAR_EXCESS * f64::from(last.done) {
            return None;
        }
        let mut excess = f64::from(total - last.done);
        for (rank, &t) in order.iter().enumerate() {
            let arrived = f64::from(last.arrived.get(t).copied().unwrap_or(0));
            if arrived > excess {
                let part = (excess / arrived * f64::from(steps)).floor() as u32;
                return Some(rank as u32 * steps + part);
            }
            excess -= arrived;
        }
        Some(order.len() as u32 * steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    // Tiers: 0 purchase (never shed), 1 merchant, 2 admin, 3 customer
    // service; shed order from the lowest: 3, 2, 1.
    const ORDER: [usize; 3] = [3, 2, 1];

    /// One window: `arrivals` (tier, how many, at most 50) spread over its
    /// milliseconds, and `done` completions (at most 50).
    fn window(d: &mut Demand, now: &mut Instant, arrivals: &[(usize, u32)], done: u32) {
        for ms in 0..50 {
            for &(t, n) in arrivals {
                if ms < n {
                    d.arrived(t, *now);
                }
            }
            if ms < done {
                d.done(*now);
            }
            *now += MS;
        }
    }

    fn demand() -> (Demand, Instant) {
        let now = Instant::now();
        (Demand::new(4, now), now)
    }

    #[test]
    fn at_5x_every_lower_tier_is_excess() {
        let (mut d, mut now) = demand();
        // 5x a capacity of 20 a window, in the mix.
        let mix = [(0, 20), (1, 30), (2, 30), (3, 20)];
        assert_eq!(d.floor(now, &ORDER, 8), None, "no window yet");
        window(&mut d, &mut now, &mix, 20);
        // Excess 80 of 100: customer service, admin and merchants (80).
        assert_eq!(d.floor(now, &ORDER, 8), Some(3 * 8));
    }

    #[test]
    fn at_3x_the_lowest_tiers_whole_and_part_of_merchants() {
        let (mut d, mut now) = demand();
        let mix = [(0, 12), (1, 18), (2, 18), (3, 12)];
        window(&mut d, &mut now, &mix, 20);
        // Excess 40: customer service 12 and admin 18 whole, 10 of the 18
        // merchants: 10 / 18 × 8 = 4.4 steps, rounded down.
        assert_eq!(d.floor(now, &ORDER, 8), Some(2 * 8 + 4));
    }

    #[test]
    fn under_twice_the_completions_nothing_is_called_excess() {
        let (mut d, mut now) = demand();
        window(&mut d, &mut now, &[(1, 50)], 26);
        assert_eq!(d.floor(now, &ORDER, 8), None, "50 against 26");
        window(&mut d, &mut now, &[(1, 50)], 24);
        // 50 against 24: merchants are all there is; 26 of them excess.
        assert_eq!(d.floor(now, &ORDER, 8), Some(2 * 8 + 4));
    }

    #[test]
    fn a_window_before_a_gap_says_nothing() {
        let (mut d, mut now) = demand();
        window(&mut d, &mut now, &[(3, 40)], 10);
        // 30 of customer service's 40: 6 steps.
        assert_eq!(d.floor(now, &ORDER, 8), Some(6));
        now += 3 * WINDOW;
        assert_eq!(d.floor(now, &ORDER, 8), None);
    }
}
