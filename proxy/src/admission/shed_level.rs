//! The shed level: how many of the lowest tiers are refused outright.
//!
//! DAGOR-style: time is cut into windows of [`WINDOW`]; in each, the mean
//! queueing delay of requests leaving the admission queue (0 for those
//! admitted at once, the whole wait for those that timed out) is compared
//! with the policy's `target_queue_delay`.
//!
//! States and transitions, per window:
//! - delay > target → level + 1 (one more tier, the lowest still admitted,
//!   is shed), at most up to the number of sheddable tiers;
//! - delay < target / 2 for `calm_needed` windows in a row → level − 1 (one
//!   tier re-admitted);
//! - otherwise → level unchanged, calm count reset.
//!
//! Anti-flapping: a rise within [`FLAP_WINDOW`] of a fall doubles
//! `calm_needed` (up to [`MAX_CALM`] windows); [`FLAP_WINDOW`] × 4 without a
//! rise resets it to [`MIN_CALM`].

use std::time::{Duration, Instant};

/// Length of one measurement window.
pub const WINDOW: Duration = Duration::from_millis(50);
/// Calm windows needed to re-admit a tier, normally (0.5 s).
pub const MIN_CALM: u32 = 10;
/// Most calm windows ever needed (4 s).
pub const MAX_CALM: u32 = 80;
/// A rise this soon after a fall counts as a flap.
pub const FLAP_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ShedLevel {
    target: Duration,
    max_level: u32,
    level: u32,
    window_start: Instant,
    sum: Duration,
    count: u32,
    calm: u32,
    calm_needed: u32,
    last_fall: Option<Instant>,
    last_rise: Option<Instant>,
}

impl ShedLevel {
    pub fn new(target: Duration, max_level: u32, now: Instant) -> ShedLevel {
        ShedLevel {
            target,
            max_level,
            level: 0,
            window_start: now,
            sum: Duration::ZERO,
            count: 0,
            calm: 0,
            calm_needed: MIN_CALM,
            last_fall: None,
            last_rise: None,
        }
    }

    pub fn level(&self) -> u32 {
        self.level
    }

    pub fn reconfigure(&mut self, target: Duration, max_level: u32) {
        self.target = target;
        self.max_level = max_level;
        self.level = self.level.min(max_level);
    }

    /// Records the queueing delay of one request leaving the queue.
    pub fn record(&mut self, now: Instant, waited: Duration) {
        self.tick(now);
        self.sum += waited;
        self.count += 1;
    }

    /// Closes every window that ended by `now`. Returns true when the level moved.
    pub fn tick(&mut self, now: Instant) -> bool {
        let before = self.level;
        while now.duration_since(self.window_start) >= WINDOW {
            let end = self.window_start + WINDOW;
            self.close_window(end);
            self.window_start = end;
            // A long quiet gap: the remaining empty windows are all calm.
            if self.count == 0 && now.duration_since(self.window_start) > WINDOW * MAX_CALM {
                self.window_start = now;
                self.calm = 0;
                self.level = 0;
                break;
            }
        }
        self.level != before
    }

    fn close_window(&mut self, end: Instant) {
        let mean = if self.count == 0 {
            Duration::ZERO
        } else {
            self.sum / self.count
        };
        self.sum = Duration::ZERO;
        self.count = 0;
        if mean > self.target {
            self.calm = 0;
            if self.level < self.max_level {
                self.level += 1;
                if self
                    .last_fall
                    .is_some_and(|f| end.duration_since(f) < FLAP_WINDOW)
                {
                    self.calm_needed = (self.calm_needed * 2).min(MAX_CALM);
                }
                self.last_rise = Some(end);
            }
        } else if mean < self.target / 2 {
            self.calm += 1;
            if self.calm >= self.calm_needed && self.level > 0 {
                self.level -= 1;
                self.calm = 0;
                self.last_fall = Some(end);
            }
            if self
                .last_rise
                .is_none_or(|r| end.duration_since(r) > FLAP_WINDOW * 4)
            {
                self.calm_needed = MIN_CALM;
            }
        } else {
            self.calm = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `ms` milliseconds of one request per millisecond waiting `wait`.
    fn run(s: &mut ShedLevel, now: &mut Instant, ms: u32, wait: Duration) {
        for _ in 0..ms {
            *now += MS;
            s.record(*now, wait);
        }
    }

    #[test]
    fn rises_one_tier_per_window_while_delay_is_over_target() {
        let mut now = Instant::now();
        let mut s = ShedLevel::new(20 * MS, 3, now);
        run(&mut s, &mut now, 49, 50 * MS);
        assert_eq!(s.level(), 0, "no window closed yet");
        run(&mut s, &mut now, 2, 50 * MS);
        assert_eq!(s.level(), 1);
        run(&mut s, &mut now, 500, 50 * MS);
        assert_eq!(s.level(), 3, "capped at the sheddable tiers");
    }

    #[test]
    fn falls_one_tier_after_half_a_second_of_calm() {
        let mut now = Instant::now();
        let mut s = ShedLevel::new(20 * MS, 3, now);
        run(&mut s, &mut now, 160, 50 * MS);
        assert_eq!(s.level(), 3);
        run(&mut s, &mut now, 450, 5 * MS);
        assert_eq!(s.level(), 3, "not calm for long enough");
        run(&mut s, &mut now, 100, 5 * MS);
        assert_eq!(s.level(), 2);
        run(&mut s, &mut now, 1000, 5 * MS);
        assert_eq!(s.level(), 0, "every tier re-admitted");
    }

    #[test]
    fn delay_between_half_and_full_target_holds_the_level() {
        let mut now = Instant::now();
        let mut s = ShedLevel::new(20 * MS, 3, now);
        run(&mut s, &mut now, 50, 50 * MS);
        assert_eq!(s.level(), 1);
        run(&mut s, &mut now, 3000, 15 * MS);
        assert_eq!(s.level(), 1);
    }

    #[test]
    fn flapping_doubles_the_calm_needed() {
        let mut now = Instant::now();
        let mut s = ShedLevel::new(20 * MS, 3, now);
        run(&mut s, &mut now, 50, 50 * MS); // window 1 over target: rise to 1
        assert_eq!(s.level(), 1);
        run(&mut s, &mut now, 550, Duration::ZERO); // 10 calm windows: fall to 0
        assert_eq!(s.level(), 0);
        run(&mut s, &mut now, 50, 50 * MS); // a rise soon after a fall: a flap
        assert_eq!(s.level(), 1);
        run(&mut s, &mut now, 600, Duration::ZERO);
        assert_eq!(s.level(), 1, "a flap doubles the calm needed to 20 windows");
        run(&mut s, &mut now, 450, Duration::ZERO);
        assert_eq!(s.level(), 0);
    }

    #[test]
    fn a_long_idle_gap_resets_the_level() {
        let mut now = Instant::now();
        let mut s = ShedLevel::new(20 * MS, 3, now);
        run(&mut s, &mut now, 200, 50 * MS);
        assert_eq!(s.level(), 3);
        now += Duration::from_secs(60);
        assert!(s.tick(now));
        assert_eq!(s.level(), 0);
    }
}
