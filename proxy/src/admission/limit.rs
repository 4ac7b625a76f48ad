//! The concurrency limit of one (cluster, site): fixed, or adaptive.
//!
//! The adaptive limit is a gradient controller in the family of Netflix's
//! Gradient2: it compares the backend's recent latency (`short`, the mean of
//! one window of samples) with its uncongested latency (`baseline`). While
//! `short` stays under `baseline × TOLERANCE` the backend is not queueing and
//! the limit grows by about √limit per window; above it the limit shrinks in
//! proportion (`limit × TOLERANCE × baseline / short + √limit`). Timeouts
//! and backend 503s are congestion: the limit backs off multiplicatively.
//!
//! `baseline` is the lowest window mean seen, allowed to rise by
//! [`BASELINE_DRIFT`] per second. Gradient2's long moving average follows the
//! backend's own backlog up under sustained overload and lets the limit run
//! away; a slowly rising minimum does not, because every cut drains the
//! backlog and shows the uncongested latency again, while a backend that
//! really became slower is followed within seconds.
//!
//! There is no warm-up that measures a minimum RTT at low concurrency (as
//! Envoy's adaptive concurrency does): the limit starts at `initial` and moves
//! from the first window on. The limit only grows while the site is using at
//! least half of it, so an idle backend does not earn a huge limit.

use std::time::{Duration, Instant};

/// Latency above `baseline × TOLERANCE` counts as queueing at the backend.
const TOLERANCE: f64 = 1.5;
/// How fast `baseline` may rise, per second, when no lower window is seen.
pub const BASELINE_DRIFT: f64 = 0.05;
/// Weight of each new target in the limit.
const SMOOTHING: f64 = 0.25;
/// Multiplicative back-off on congestion (timeouts, backend 503s).
const BACKOFF: f64 = 0.9;
/// A window closes after this many samples…
const WINDOW_SAMPLES: u32 = 16;
/// …or this much time with at least one sample.
const WINDOW_TIME: Duration = Duration::from_millis(50);

/// How a request that held a permit ended at the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// The backend answered (any status but 503) after this long.
    Latency(Duration),
    /// Timeout or backend 503: the backend is past its knee.
    Congestion,
    /// Nothing useful was learned (client gone, connect refused, shed …).
    Ignored,
}

/// Settings of an adaptive limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub initial: u32,
    pub min: u32,
    pub max: u32,
}

/// A concurrency limit.
#[derive(Debug, Clone)]
pub enum Limit {
    Fixed(u32),
    Adaptive(Gradient),
}

impl Limit {
    pub fn fixed(limit: u32) -> Limit {
        Limit::Fixed(limit.max(1))
    }

    pub fn adaptive(bounds: Bounds, now: Instant) -> Limit {
        Limit::Adaptive(Gradient::new(bounds, now))
    }

    /// The limit in force, in requests.
    pub fn current(&self) -> u32 {
        match self {
            Limit::Fixed(n) => *n,
            Limit::Adaptive(g) => g.limit.round() as u32,
        }
    }

    /// Feeds one finished request; `inflight` is the site's in-flight count
    /// when it finished. Returns true when the limit moved.
    pub fn on_sample(&mut self, now: Instant, sample: Sample, inflight: u32) -> bool {
        match self {
            Limit::Fixed(_) => false,
            Limit::Adaptive(g) => {
                let before = g.limit.round();
                g.on_sample(now, sample, inflight);
                g.limit.round() != before
            }
        }
    }

    /// Applies new settings from a reload, keeping what was learned.
    pub fn reconfigure(&mut self, new: &Limit) {
        match (self as &mut Limit, new) {
            (Limit::Adaptive(g), Limit::Adaptive(n)) => g.set_bounds(n.bounds),
            (me, new) => *me = new.clone(),
        }
    }
}

/// The adaptive gradient limit (see the module comment).
#[derive(Debug, Clone)]
pub struct Gradient {
    bounds: Bounds,
    limit: f64,
    /// Uncongested latency, seconds; `None` until the first window.
    baseline: Option<f64>,
    window_start: Instant,
    window_sum: f64,
    window_count: u32,
    window_congested: u32,
    window_max_inflight: u32,
}

impl Gradient {
    pub fn new(bounds: Bounds, now: Instant) -> Gradient {
        let bounds = Bounds {
            min: bounds.min.max(1),
            max: bounds.max.max(bounds.min.max(1)),
            initial: bounds.initial,
        };
        Gradient {
            limit: f64::from(bounds.initial.clamp(bounds.min, bounds.max)),
            bounds,
            baseline: None,
            window_start: now,
            window_sum: 0.0,
            window_count: 0,
            window_congested: 0,
            window_max_inflight: 0,
        }
    }

    fn set_bounds(&mut self, bounds: Bounds) {
        self.bounds = bounds;
        self.limit = self
            .limit
            .clamp(f64::from(bounds.min), f64::from(bounds.max));
    }

    fn on_sample(&mut self, now: Instant, sample: Sample, inflight: u32) {
        match sample {
            Sample::Latency(d) => {
                self.window_sum += d.as_secs_f64();
                self.window_count += 1;
            }
            Sample::Congestion => self.window_congested += 1,
            Sample::Ignored => return,
        }
        self.window_max_inflight = self.window_max_inflight.max(inflight);
        let samples = self.window_count + self.window_congested;
        if samples >= WINDOW_SAMPLES || now.duration_since(self.window_start) >= WINDOW_TIME {
            self.close_window(now);
        }
    }

    fn close_window(&mut self, now: Instant) {
        let (min, max) = (f64::from(self.bounds.min), f64::from(self.bounds.max));
        let congested = self.window_congested > 0;
        let short = (self.window_count > 0).then(|| self.window_sum / f64::from(self.window_count));
        let busy = f64::from(self.window_max_inflight) >= self.limit / 2.0;
        let elapsed = now.duration_since(self.window_start).as_secs_f64();
        self.window_start = now;
        self.window_sum = 0.0;
        self.window_count = 0;
        self.window_congested = 0;
        self.window_max_inflight = 0;

        if congested {
            self.limit = (self.limit * BACKOFF).clamp(min, max);
            return;
        }
        let Some(short) = short else { return };
        let baseline = match self.baseline {
            None => short,
            Some(b) => (b * (1.0 + BASELINE_DRIFT * elapsed)).min(short),
        };
        self.baseline = Some(baseline);
        let gradient = (TOLERANCE * baseline / short).clamp(0.5, 1.0);
        if gradient >= 1.0 && !busy {
            return; // Not using the limit: no evidence that more would be fine.
        }
        let target = self.limit * gradient + self.limit.sqrt();
        self.limit = (self.limit * (1.0 - SMOOTHING) + target * SMOOTHING).clamp(min, max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bounds() -> Bounds {
        Bounds {
            initial: 20,
            min: 4,
            max: 500,
        }
    }

    /// Feeds `windows` windows of `WINDOW_SAMPLES` samples of `latency` at `inflight`.
    fn feed(l: &mut Limit, now: &mut Instant, windows: u32, latency: Duration, inflight: u32) {
        for _ in 0..windows * WINDOW_SAMPLES {
            *now += MS;
            l.on_sample(*now, Sample::Latency(latency), inflight);
        }
    }

    #[test]
    fn fixed_limit_never_moves() {
        let mut l = Limit::fixed(7);
        let mut now = Instant::now();
        feed(&mut l, &mut now, 10, 100 * MS, 7);
        l.on_sample(now, Sample::Congestion, 7);
        assert_eq!(l.current(), 7);
    }

    #[test]
    fn grows_while_latency_is_flat_and_the_limit_is_used() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now);
        feed(&mut l, &mut now, 30, 20 * MS, 1000);
        assert!(l.current() > 60, "limit {}", l.current());
    }

    #[test]
    fn does_not_grow_when_idle() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now);
        feed(&mut l, &mut now, 30, 20 * MS, 2);
        assert_eq!(l.current(), 20);
    }

    #[test]
    fn shrinks_when_latency_rises_and_stays_within_bounds() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now);
        feed(&mut l, &mut now, 20, 20 * MS, 1000);
        let high = l.current();
        feed(&mut l, &mut now, 10, 80 * MS, 1000);
        assert!(l.current() * 4 < high * 3, "{} -> {}", high, l.current());
        feed(&mut l, &mut now, 200, 400 * MS, 1000);
        assert!(l.current() >= 4);
    }

    #[test]
    fn follows_a_backend_that_really_became_slower() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now);
        feed(&mut l, &mut now, 20, 20 * MS, 1000);
        // Latency doubles for good: the limit first falls, then the baseline
        // rises (5%/s) and the limit grows again.
        feed(&mut l, &mut now, 20, 40 * MS, 1000);
        let low = l.current();
        for _ in 0..30 {
            now += Duration::from_secs(1);
            feed(&mut l, &mut now, 1, 40 * MS, 1000);
        }
        assert!(l.current() > low, "{low} -> {}", l.current());
    }

    #[test]
    fn congestion_backs_off_multiplicatively() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now);
        for _ in 0..WINDOW_SAMPLES {
            now += MS;
            l.on_sample(now, Sample::Congestion, 20);
        }
        assert_eq!(l.current(), 18);
    }

    #[test]
    fn reconfigure_keeps_the_learned_limit_within_new_bounds() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now);
        feed(&mut l, &mut now, 30, 20 * MS, 1000);
        let learned = l.current();
        l.reconfigure(&Limit::adaptive(
            Bounds {
                initial: 10,
                min: 4,
                max: 1000,
            },
            now,
        ));
        assert_eq!(l.current(), learned);
        l.reconfigure(&Limit::adaptive(
            Bounds {
                initial: 10,
                min: 4,
                max: 30,
            },
            now,
        ));
        assert_eq!(l.current(), 30);
    }
}
