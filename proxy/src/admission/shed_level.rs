//! The shed level: how much of the lowest tiers is refused outright.
//!
//! DAGOR-style: time is cut into windows of [`WINDOW`]; in each, the
//! queueing delay is compared with the policy's `target_queue_delay`. The
//! delay of a window is the larger of the mean wait of requests leaving the
//! admission queue (0 for those admitted at once, the whole wait for those
//! that timed out) and the age of the oldest request still waiting when the
//! window closes (CoDel's standing queue): the mean alone is diluted by
//! high tiers that wait a few milliseconds while the lowest admitted tier's
//! backlog ages unseen.
//!
//! Only requests that arrived since the level last moved count: a wait that
//! began under the old level says nothing about the new one, and counting it
//! makes the level overshoot (it keeps rising while the old queue drains).
//!
//! Whole tiers are too coarse (at 3x capacity the right answer is often "shed
//! the two lowest tiers and a third of the next"), so, like DAGOR's user
//! sub-priorities, each tier is cut into [`STEPS`] steps: the level counts
//! steps, tiers below `steps / STEPS` are refused whole and the next one in
//! part (each request with probability `(steps % STEPS) / STEPS`).
//!
//! States and transitions, per window:
//! - delay > target → rise by one step, or by `delay / (2 × target)` steps
//!   when that is more (at most one whole tier), up to every sheddable tier;
//! - delay < target / 2 → one more calm window; from `calm_needed` calm
//!   windows in a row on, each calm window re-admits one step, and so
//!   does every second *spare* window in a row (calm, nobody queued, the
//!   limit never more than three quarters used: [`SPARE_WINDOWS`]);
//! - otherwise → level unchanged, calm count reset.
//!
//! Between windows, a standing queue older than [`URGENT`] × target raises
//! the level by half a tier at once (at most every [`URGENT_GAP`]), so a step
//! to 5x is answered in tens of milliseconds, not after a window or two.
//!
//! Anti-flapping: a rise within [`FLAP_WINDOW`] of a fall doubles
//! `calm_needed` (up to [`MAX_CALM`] windows); each calm window more than
//! [`FLAP_WINDOW`] after the last rise halves it again (down to [`MIN_CALM`]).

use std::time::{Duration, Instant};

/// Length of one measurement window.
pub const WINDOW: Duration = Duration::from_millis(50);
/// Steps per tier.
pub const STEPS: u32 = 8;
/// Calm windows needed before re-admitting starts, normally (0.3 s).
pub const MIN_CALM: u32 = 6;
/// A standing queue this many targets old raises the level at once.
pub const URGENT: u32 = 3;
/// Shortest time between two urgent rises.
pub const URGENT_GAP: Duration = Duration::from_millis(10);
/// How long after the level first rises from nothing an overload counts as
/// setting in ([`ShedLevel::in_onset`]): five windows, time for an onset's
/// backlog to be refused at three targets ([`super::demand`]). After it,
/// only the level refuses.
pub const ONSET: Duration = Duration::from_millis(250);
/// Spare windows in a row that re-admit a step at once, whatever
/// `calm_needed` says. A window is spare when it is calm, nobody queued
/// in it, and the limit was never more than three quarters in use
/// ([`ShedLevel::note_busy`]): every request the level let through got in
/// at once with room to spare, so the level refuses requests the limit
/// would take. The anti-flapping wait (up to [`MAX_CALM`] windows after a
/// flap) is for a level that re-admits into a full limit; held after an
/// overload that ended, it refused lower tiers into an idle backend for
/// seconds (forty-eighth round, docs/admission.md).
pub const SPARE_WINDOWS: u32 = 2;
/// Most calm windows ever needed (2 s).
pub const MAX_CALM: u32 = 40;
/// A rise this soon after a fall counts as a flap.
pub const FLAP_WINDOW: Duration = Duration::from_secs(2);

/// How much of one tier the level refuses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Coverage {
    None,
    /// This share of the tier's requests, in (0, 1).
    Part(f64),
    Whole,
}

#[derive(Debug, Clone)]
pub struct ShedLevel {
    target: Duration,
    max_steps: u32,
    steps: u32,
    window_start: Instant,
    /// `window_start + WINDOW`, kept so the common call, inside a window
    /// with nothing standing, is one comparison.
    window_end: Instant,
    /// `target × URGENT`: a standing queue this old raises the level at once.
    urgent_after: Duration,
    sum: Duration,
    count: u32,
    calm: u32,
    calm_needed: u32,
    last_fall: Option<Instant>,
    last_rise: Option<Instant>,
    /// When the level last moved; earlier arrivals are not counted.
    last_change: Instant,
    /// When the level last rose from nothing.
    left_zero: Option<Instant>,
    /// Whether the limit was close to full, or anyone queued, in this
    /// window ([`ShedLevel::note_busy`]).
    busy: bool,
    /// Spare calm windows in a row.
    spare_run: u32,
}

impl ShedLevel {
    /// `tiers`: how many tiers may be shed.
    pub fn new(target: Duration, tiers: u32, now: Instant) -> ShedLevel {
        ShedLevel {
            target,
            max_steps: tiers * STEPS,
            steps: 0,
            window_start: now,
            window_end: now + WINDOW,
            urgent_after: target * URGENT,
            sum: Duration::ZERO,
            count: 0,
            calm: 0,
            calm_needed: MIN_CALM,
            last_fall: None,
            last_rise: None,
            last_change: now,
            left_zero: None,
            busy: false,
            spare_run: 0,
        }
    }

    /// The limit was close to full, or a request had to queue, in this
    /// window. A calm window without it is *spare*, see [`SPARE_WINDOWS`].
    pub fn note_busy(&mut self) {
        self.busy = true;
    }

    /// The level in tiers (2.25 = two tiers and a quarter of the third).
    pub fn level(&self) -> f64 {
        f64::from(self.steps) / f64::from(STEPS)
    }

    /// Whether an overload is setting in: nothing is shed, or the level
    /// first rose from nothing less than [`ONSET`] ago.
    pub fn in_onset(&self, now: Instant) -> bool {
        self.steps == 0
            || self
                .left_zero
                .is_some_and(|z| now.duration_since(z) < ONSET)
    }

    /// How much of the tier with shed rank `rank` (0 = lowest) is refused.
    pub fn coverage(&self, rank: u32) -> Coverage {
        let from = rank.saturating_mul(STEPS);
        if self.steps <= from {
            Coverage::None
        } else if self.steps >= from + STEPS {
            Coverage::Whole
        } else {
            Coverage::Part(f64::from(self.steps - from) / f64::from(STEPS))
        }
    }

    pub fn reconfigure(&mut self, target: Duration, tiers: u32) {
        self.target = target;
        self.urgent_after = target * URGENT;
        self.max_steps = tiers * STEPS;
        self.steps = self.steps.min(self.max_steps);
    }

    /// Records the queueing delay of one request leaving the queue `waited`
    /// after it arrived (call [`ShedLevel::tick`] first).
    pub fn record(&mut self, now: Instant, waited: Duration) {
        if now
            .checked_sub(waited)
            .is_some_and(|arrived| arrived < self.last_change)
        {
            return;
        }
        self.sum += waited;
        self.count += 1;
    }

    /// Closes every window that ended by `now`; `standing` is the age of the
    /// oldest request waiting now. Returns true when the level rose.
    pub fn tick(&mut self, now: Instant, standing: Duration) -> bool {
        // Every request passes here twice: most of them within a window,
        // with nobody waiting.
        if now < self.window_end && standing <= self.urgent_after {
            return false;
        }
        let before = self.steps;
        if standing > self.urgent_after
            && self.steps < self.max_steps
            && self
                .last_rise
                .is_none_or(|r| now.duration_since(r) >= URGENT_GAP)
        {
            // In proportion to the queue's age, as a window's rise, up to
            // half a tier: when the admitted tiers are exactly the backend's
            // capacity, a short standing queue is only Poisson noise.
            let over = (standing.as_secs_f64() / (2.0 * self.target.as_secs_f64())) as u32;
            self.rise(now, over.clamp(1, STEPS / 2));
        }
        while now >= self.window_end {
            let end = self.window_end;
            self.close_window(end, standing);
            self.start_window(end);
            // A long quiet gap: nothing is queueing; start afresh.
            if self.count == 0 && now.duration_since(self.window_start) > WINDOW * MAX_CALM * 2 {
                self.start_window(now);
                self.calm = 0;
                self.steps = 0;
                break;
            }
        }
        self.steps > before
    }

    fn start_window(&mut self, at: Instant) {
        self.window_start = at;
        self.window_end = at + WINDOW;
        self.busy = false;
    }

    fn rise(&mut self, at: Instant, steps: u32) {
        if self.steps >= self.max_steps {
            return;
        }
        if self.steps == 0 {
            self.left_zero = Some(at);
        }
        self.steps = (self.steps + steps).min(self.max_steps);
        // One flap is a fall and the first rise after it: the urgent rises
        // that follow within milliseconds are the same flap.
        let flap = self.last_fall.is_some_and(|f| {
            at.duration_since(f) < FLAP_WINDOW && self.last_rise.is_none_or(|r| r < f)
        });
        if flap {
            self.calm_needed = (self.calm_needed * 2).min(MAX_CALM);
        }
        self.last_rise = Some(at);
        self.last_change = at;
    }

    fn close_window(&mut self, end: Instant, standing: Duration) {
        let mean = if self.count == 0 {
            Duration::ZERO
        } else {
            self.sum / self.count
        };
        let mean = mean.max(standing);
        self.sum = Duration::ZERO;
        self.count = 0;
        if mean > self.target {
            self.calm = 0;
            self.spare_run = 0;
            let over = (mean.as_secs_f64() / (2.0 * self.target.as_secs_f64())) as u32;
            self.rise(end, over.clamp(1, STEPS));
        } else if mean < self.target / 2 {
            self.calm += 1;
            let this_spare = !self.busy && standing.is_zero();
            self.spare_run = if this_spare { self.spare_run + 1 } else { 0 };
            let re_admit = self.calm >= self.calm_needed || self.spare_run >= SPARE_WINDOWS;
            if re_admit && self.steps > 0 {
                self.steps -= 1;
                self.last_fall = Some(end);
                self.last_change = end;
            }
            if self
                .last_rise
                .is_none_or(|r| end.duration_since(r) > FLAP_WINDOW)
            {
                self.calm_needed = (self.calm_needed / 2).max(MIN_CALM);
            }
        } else {
            self.calm = 0;
            self.spare_run = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A controller made 10 s ago (so long waits can be fresh), and "now".
    fn controller() -> (ShedLevel, Instant) {
        let made = Instant::now();
        let mut s = ShedLevel::new(20 * MS, 3, made);
        let now = made + Duration::from_secs(10);
        s.start_window(now); // no idle history to replay
        (s, now)
    }

    /// Feeds `ms` milliseconds of one request per millisecond that waited
    /// `wait`, or since the level last moved if that is shorter (as a real
    /// queue would: nobody arriving after a change has waited longer),
    /// with the limit in full use (no window is spare).
    fn run(s: &mut ShedLevel, now: &mut Instant, ms: u32, wait: Duration) {
        feed(s, now, ms, wait, true);
    }

    fn feed(s: &mut ShedLevel, now: &mut Instant, ms: u32, wait: Duration, busy: bool) {
        for _ in 0..ms {
            *now += MS;
            s.tick(*now, Duration::ZERO);
            if busy {
                s.note_busy();
            }
            let fresh = wait.min(now.duration_since(s.last_change));
            s.record(*now, fresh);
        }
    }

    #[test]
    fn rises_in_proportion_to_the_delay_up_to_a_tier_per_window() {
        let (mut s, mut now) = controller();
        run(&mut s, &mut now, 49, 50 * MS);
        assert_eq!(s.level(), 0.0, "no window closed yet");
        run(&mut s, &mut now, 2, 50 * MS);
        assert_eq!(s.level(), 1.0 / 8.0, "50 ms is 1.25 double targets: 1 step");
        run(&mut s, &mut now, 2000, 500 * MS);
        assert_eq!(s.level(), 3.0, "capped at the sheddable tiers");
    }

    #[test]
    fn an_onset_lasts_from_nothing_shed_to_five_windows_after_the_first_rise() {
        let (mut s, mut now) = controller();
        assert!(s.in_onset(now), "nothing shed");
        run(&mut s, &mut now, 50, 30 * MS);
        assert_eq!(s.level(), 1.0 / 8.0);
        let rose = now;
        run(&mut s, &mut now, 100, 30 * MS);
        assert!(s.level() > 1.0 / 8.0, "still rising");
        assert!(s.in_onset(now), "{:?} after the first rise", now - rose);
        run(&mut s, &mut now, 160, 30 * MS);
        assert!(!s.in_onset(now), "{:?} after the first rise", now - rose);
    }

    #[test]
    fn waits_that_began_before_a_change_do_not_count() {
        let (mut s, mut now) = controller();
        run(&mut s, &mut now, 50, 30 * MS); // one step, at the end of the window
        assert_eq!(s.level(), 1.0 / 8.0);
        // Waiters that arrived before the change leave now with long waits.
        for _ in 0..50 {
            now += MS;
            s.tick(now, Duration::ZERO);
            s.record(now, 200 * MS);
        }
        s.tick(now + MS, Duration::ZERO);
        assert_eq!(s.level(), 1.0 / 8.0, "stale waits ignored");
    }

    #[test]
    fn coverage_is_whole_below_the_level_and_partial_at_it() {
        let (mut s, _) = controller();
        s.steps = 11;
        assert_eq!(s.level(), 11.0 / 8.0);
        assert_eq!(s.coverage(0), Coverage::Whole);
        assert_eq!(s.coverage(1), Coverage::Part(3.0 / 8.0));
        assert_eq!(s.coverage(2), Coverage::None);
    }

    #[test]
    fn re_admits_a_step_per_calm_window_after_the_calm_period() {
        let (mut s, mut now) = controller();
        s.steps = 8;
        run(&mut s, &mut now, 250, 5 * MS);
        assert_eq!(s.level(), 1.0, "not calm for long enough (6 windows)");
        run(&mut s, &mut now, 100, 5 * MS);
        assert!(s.level() < 1.0 && s.level() > 0.5, "{}", s.level());
        run(&mut s, &mut now, 1000, 5 * MS);
        assert_eq!(s.level(), 0.0, "every tier re-admitted");
    }

    #[test]
    fn delay_between_half_and_full_target_holds_the_level() {
        let (mut s, mut now) = controller();
        s.steps = 5;
        run(&mut s, &mut now, 3000, 15 * MS);
        assert_eq!(s.level(), 5.0 / 8.0);
    }

    #[test]
    fn flapping_doubles_the_calm_needed() {
        let (mut s, mut now) = controller();
        run(&mut s, &mut now, 50, 30 * MS); // one step
        assert_eq!(s.level(), 1.0 / 8.0);
        run(&mut s, &mut now, 350, Duration::ZERO); // 6 calm windows: back to 0
        assert_eq!(s.level(), 0.0);
        run(&mut s, &mut now, 50, 30 * MS); // a rise soon after a fall: a flap
        assert_eq!(s.level(), 1.0 / 8.0);
        run(&mut s, &mut now, 500, Duration::ZERO);
        assert_eq!(
            s.level(),
            1.0 / 8.0,
            "a flap doubles the calm needed to 12 windows"
        );
        run(&mut s, &mut now, 200, Duration::ZERO);
        assert_eq!(s.level(), 0.0);
    }

    #[test]
    fn spare_windows_re_admit_a_step_every_second_window_even_after_a_flap() {
        let (mut s, mut now) = controller();
        run(&mut s, &mut now, 50, 30 * MS);
        run(&mut s, &mut now, 350, Duration::ZERO); // back to 0 (6 calm windows)
        run(&mut s, &mut now, 100, 60 * MS); // a flap: 12 calm windows needed
        let risen = s.steps;
        assert!(risen >= 2, "{}", s.level());
        // Calm, but the limit three quarters full: the doubled wait holds.
        run(&mut s, &mut now, 500, Duration::ZERO);
        assert_eq!(s.steps, risen, "10 busy calm windows of 12");
        // The same calm with the limit mostly idle: a step every second
        // window, the calm count aside.
        let (mut t, mut then) = controller();
        run(&mut t, &mut then, 50, 30 * MS);
        run(&mut t, &mut then, 350, Duration::ZERO);
        run(&mut t, &mut then, 100, 60 * MS);
        assert_eq!(t.steps, risen);
        feed(&mut t, &mut then, 200, Duration::ZERO, false);
        assert_eq!(t.steps, risen - 2, "4 spare windows: 2 steps");
        // One busy window breaks the run.
        feed(&mut t, &mut then, 50, Duration::ZERO, false);
        run(&mut t, &mut then, 50, Duration::ZERO);
        feed(&mut t, &mut then, 50, Duration::ZERO, false);
        assert_eq!(t.steps, risen - 2, "spare, busy, spare: no run of two");
    }

    #[test]
    fn a_window_with_a_standing_queue_is_not_spare() {
        let (mut s, mut now) = controller();
        s.steps = 8;
        // Calm waits (5 ms, under half the 20 ms target) but someone waits
        // now: not spare, so only the calm count re-admits.
        for _ in 0..250 {
            now += MS;
            s.tick(now, 5 * MS);
            s.record(now, 5 * MS);
        }
        assert_eq!(s.level(), 1.0, "5 calm windows of 6, none spare");
    }

    #[test]
    fn a_long_idle_gap_resets_the_level() {
        let (mut s, mut now) = controller();
        s.steps = 24;
        now += Duration::from_secs(60);
        s.tick(now, Duration::ZERO);
        assert_eq!(s.level(), 0.0);
    }

    #[test]
    fn a_standing_queue_raises_the_level_even_when_leavers_wait_little() {
        let (mut s, mut now) = controller();
        // Every leaver was admitted at once, but someone has waited 50 ms.
        for _ in 0..51 {
            now += MS;
            s.tick(now, 50 * MS);
            s.record(now, Duration::ZERO);
        }
        assert_eq!(
            s.level(),
            1.0 / 8.0,
            "2.5 targets: one step at the window's end"
        );
    }

    #[test]
    fn an_old_standing_queue_raises_the_level_at_once() {
        let (mut s, mut now) = controller();
        now += MS;
        // Over 3 targets: now, not at the window's end; 100 ms is 2.5
        // double targets: 2 steps.
        s.tick(now, 100 * MS);
        assert_eq!(s.level(), 2.0 / 8.0);
        now += 5 * MS;
        s.tick(now, 105 * MS);
        assert_eq!(s.level(), 2.0 / 8.0, "at most one urgent rise per 10 ms");
        now += 5 * MS;
        s.tick(now, 400 * MS);
        assert_eq!(s.level(), 6.0 / 8.0, "at most half a tier at once");
    }

    #[test]
    fn urgent_rises_after_a_fall_are_one_flap() {
        let (mut s, mut now) = controller();
        s.steps = 4;
        run(&mut s, &mut now, 300, Duration::ZERO); // 6 calm windows: one step down
        assert_eq!(s.level(), 3.0 / 8.0);
        // A standing queue forms: three urgent rises within 30 ms.
        for _ in 0..3 {
            now += 10 * MS;
            s.tick(now, 70 * MS);
        }
        assert_eq!(s.level(), 6.0 / 8.0);
        assert_eq!(s.calm_needed, 2 * MIN_CALM, "doubled once, not three times");
    }
}
