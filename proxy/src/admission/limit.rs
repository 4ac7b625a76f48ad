//! The concurrency limit of one (cluster, site): fixed, or adaptive.
//!
//! The adaptive limit is a gradient controller in the family of Netflix's
//! Gradient2: it compares the backend's recent latency (`short`, the mean of
//! one window of 16 responses or 50 ms) with its uncongested latency
//! (`baseline`). Each window moves the limit a quarter of the way towards
//! `limit × (baseline + tolerance) / short + allowance × √limit`, so it
//! settles where a request or two wait inside the backend: every worker
//! stays busy, but the backend's own first-come, first-served queue, which
//! no tier can jump, stays that short. The allowance is 1 while the backend
//! shows no queueing (a start far under a large backend's knee grows fast),
//! [`QUEUE_ALLOWANCE`] otherwise. The tolerance is [`SLACK`] plus two
//! standard errors of the mean that set the baseline. Timeouts and backend
//! 503s are congestion: the limit backs off multiplicatively. The limit
//! only grows while the site is using at least half of it.
//!
//! **Fleets.** Several k2proxy instances share one backend without talking
//! to each other, which takes two things beyond that:
//!
//! - *A baseline every instance agrees on.* It is measured by probes at
//!   wall-clock multiples of [`PROBE_EVERY`] (instances' clocks agree to
//!   NTP's milliseconds): every instance halves its limit at the same
//!   moment, so the backend's queue — everyone's, not one instance's —
//!   drains; after one latency it measures the requests it sends into the
//!   drained backend, and their mean is the baseline (BBR's ProbeRTT, which
//!   flows synchronise on in the same way). A probe by one instance alone
//!   drains only its own part of a shared queue: its baseline then confirms
//!   whatever queue the others keep (an instance that starts into a loaded
//!   backend never saw the real latency), and N instances each tolerating
//!   the queue the others make let it grow. A probe whose latency fell to
//!   under [`FLAT_RATIO`] of the latency before it halved a latency that was
//!   mostly queue, may still hold some, and counts only if lower than the
//!   baseline. Probes that agree are averaged ([`PROBE_WEIGHT`]), so every
//!   instance's sampling error shrinks and their baselines converge: a
//!   delay controller's share goes as `1/q²` in the queueing delay `q` it
//!   perceives, and baselines a few percent apart starved one instance.
//!   Until its first probe, an instance takes the lowest window mean.
//! - *Priority across instances.* While a `never_shed` request has waited
//!   longer than the target queue delay in this instance's queue, its
//!   allowance is [`URGENT_WEIGHT`] times larger. Behind an L4 balancer every
//!   instance gets the same demand, so the one whose purchases wait has the
//!   smallest share: it grows, the shared latency rises, and the others —
//!   spending their share on lower tiers — give way, until its purchases no
//!   longer wait.
//!
//! A backend that really became slower keeps its latency far above the
//! baseline however far the limit is cut: after [`SLOW_AFTER`] of it the
//! next probe runs at once (every instance sees the same latency, so they
//! probe together then too). docs/admission.md, "Fleets", has the
//! measurements behind each choice.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often every instance probes the backend's uncongested latency, on
/// wall-clock multiples.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// The share of the limit kept during a probe: the backend's queue drains
/// while it is under `1/PROBE_DEPTH − 1` times its workers.
const PROBE_DEPTH: f64 = 0.5;
/// How many times the queue allowance an instance claims while its
/// `never_shed` requests wait: with equal demand behind an L4 balancer, an
/// instance whose purchases wait has the smallest share, and claiming more
/// moves capacity to it from instances that spend theirs on lower tiers.
const URGENT_WEIGHT: f64 = 4.0;
/// A probe's latency at least this share of the latency before it: halving
/// the limits hardly changed it, so the backend was not queueing.
const FLAT_RATIO: f64 = 0.75;
/// Responses (sent after the drain) a probe needs to count in full…
const PROBE_SAMPLES: u32 = 16;
/// …and at all; on light traffic it measures on until it has them.
const PROBE_MIN_SAMPLES: u32 = 3;
/// How much longer a probe may run to get [`PROBE_MIN_SAMPLES`].
const PROBE_LONGEST: Duration = Duration::from_millis(500);
/// Weight of a probe that agrees with the baseline (within its error).
const PROBE_WEIGHT: f64 = 0.25;
/// A probe measures for at least this many baselines.
const PROBE_ROUND_TRIPS: f64 = 4.0;
/// Requests the limit lets wait at the backend, in units of √limit.
///
/// Every request queued there adds to every purchase's latency (the backend
/// serves first come, first served), but none at all leaves workers idle
/// between a completion and the next dispatch and makes the limit swing.
/// How 0.3 was chosen: docs/benchmarks.md, "Tuning the controllers".
const QUEUE_ALLOWANCE: f64 = 0.3;
/// Weight of each new target in the limit.
const SMOOTHING: f64 = 0.25;
/// Latency, in seconds, above the baseline that is not worth a smaller limit:
/// a backend that answers in 200 µs alone or in 700 µs with 30 others is not
/// overloaded (it shares CPUs with its clients), and a limit cut to `min`
/// there only moves the wait into our queue.
const SLACK: f64 = 0.001;
/// Standard errors of the baseline's mean that count as noise, not queueing.
const NOISE_ALLOWANCE: f64 = 2.0;
/// A latency above `(baseline + tolerance) × SLOW_RATIO`…
const SLOW_RATIO: f64 = 2.0;
/// …for this long: the backend may have become slower; probe now.
const SLOW_AFTER: Duration = Duration::from_millis(300);
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
    Adaptive(Box<Adaptive>),
}

/// The instant at which the wall clock last stood at a multiple of
/// [`PROBE_EVERY`]: probes fall on that grid in every instance.
pub fn probe_anchor(now: Instant) -> Instant {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let into = Duration::from_nanos((since_epoch.as_nanos() % PROBE_EVERY.as_nanos()) as u64);
    now.checked_sub(into).unwrap_or(now)
}

impl Limit {
    pub fn fixed(limit: u32) -> Limit {
        Limit::Fixed(limit.max(1))
    }

    /// An adaptive limit whose probes fall on the wall clock's grid.
    pub fn adaptive(bounds: Bounds, now: Instant) -> Limit {
        Limit::Adaptive(Box::new(Adaptive::new(bounds, now, probe_anchor(now))))
    }

    /// The same limit, starting at `now`, with probes on a grid through
    /// `anchor` (a simulation sets its own clock's).
    pub fn anchored(self, anchor: Instant, now: Instant) -> Limit {
        match self {
            Limit::Adaptive(mut a) => {
                a.anchor = anchor;
                a.window_start = now;
                a.probe_due = a.next_probe_after(now);
                Limit::Adaptive(a)
            }
            fixed => fixed,
        }
    }

    /// Whether the limit learns the backend's knee (and so moves past slots
    /// left free: see `Gate::headroom`).
    pub fn is_adaptive(&self) -> bool {
        matches!(self, Limit::Adaptive(_))
    }

    /// The uncongested latency learned, for an adaptive limit that has one.
    pub fn baseline(&self) -> Option<Duration> {
        match self {
            Limit::Adaptive(g) => g.baseline.map(Duration::from_secs_f64),
            Limit::Fixed(_) => None,
        }
    }

    /// The limit in force, in requests.
    pub fn current(&self) -> u32 {
        match self {
            Limit::Fixed(n) => *n,
            Limit::Adaptive(g) => (g.current().round() as u32).max(1),
        }
    }

    /// Whether a probe holds the limit down now.
    pub fn probing(&self) -> bool {
        matches!(self, Limit::Adaptive(a) if a.probe.is_some())
    }

    /// Whether `never_shed` requests wait (too long) in our queue now: the
    /// instance's share of the backend is too small for them, and the limit
    /// claims more (see [`URGENT_WEIGHT`]).
    pub fn set_urgent(&mut self, urgent: bool) {
        if let Limit::Adaptive(a) = self {
            a.urgent = urgent;
        }
    }

    /// Feeds one finished request; `inflight` is the site's in-flight count
    /// when it finished. Returns true when the limit moved.
    pub fn on_sample(&mut self, now: Instant, sample: Sample, inflight: u32) -> bool {
        match self {
            Limit::Fixed(_) => false,
            Limit::Adaptive(g) => {
                let before = g.current().round();
                g.on_sample(now, sample, inflight);
                g.current().round() != before
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

/// Running sums of latencies: a mean and its standard error.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    sum: f64,
    sq: f64,
    n: u32,
}

impl Sums {
    fn add(&mut self, secs: f64) {
        self.sum += secs;
        self.sq += secs * secs;
        self.n += 1;
    }

    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / f64::from(self.n))
    }

    /// The standard error of the mean.
    fn noise(&self) -> f64 {
        let Some(m) = self.mean() else { return 0.0 };
        let n = f64::from(self.n);
        (self.sq / n - m * m).max(0.0).sqrt() / n.sqrt()
    }
}

/// A probe of the uncongested latency in progress.
#[derive(Debug, Clone, Copy)]
struct Probe {
    /// The limit in force while probing.
    lowered: f64,
    /// Only requests sent from then on count: the backend's queue has
    /// drained by then.
    measure_from: Instant,
    /// The probe ends with what it has then.
    ends: Instant,
    /// The latency of the last window before the probe.
    before: f64,
    sums: Sums,
}

/// The adaptive limit (see the module comment).
#[derive(Debug, Clone)]
pub struct Adaptive {
    bounds: Bounds,
    limit: f64,
    /// Uncongested latency, seconds; `None` until the first window.
    baseline: Option<f64>,
    /// The standard error of the mean that set the baseline.
    baseline_noise: f64,
    /// A probe has measured the baseline (until then it is the lowest
    /// window mean).
    probed: bool,
    window_start: Instant,
    window: Sums,
    window_congested: u32,
    window_max_inflight: u32,
    /// Samples of this window taken while `never_shed` requests waited.
    window_urgent: u32,
    /// Whether `never_shed` requests wait now (set by the gate).
    urgent: bool,
    /// The last window's mean latency.
    last_short: f64,
    /// Since when latency has stayed far above the baseline.
    slow_since: Option<Instant>,
    /// Probes fall on `anchor + k × PROBE_EVERY`.
    anchor: Instant,
    probe_due: Instant,
    probe: Option<Probe>,
}

impl Adaptive {
    fn new(bounds: Bounds, now: Instant, anchor: Instant) -> Adaptive {
        let bounds = Bounds {
            min: bounds.min.max(1),
            max: bounds.max.max(bounds.min.max(1)),
            initial: bounds.initial,
        };
        let mut a = Adaptive {
            limit: f64::from(bounds.initial.clamp(bounds.min, bounds.max)),
            bounds,
            baseline: None,
            baseline_noise: 0.0,
            probed: false,
            window_start: now,
            window: Sums::default(),
            window_congested: 0,
            window_max_inflight: 0,
            window_urgent: 0,
            urgent: false,
            last_short: 0.0,
            slow_since: None,
            anchor,
            probe_due: now,
            probe: None,
        };
        a.probe_due = a.next_probe_after(now);
        a
    }

    /// The first point of the probe grid after `now`.
    fn next_probe_after(&self, now: Instant) -> Instant {
        let every = PROBE_EVERY.as_nanos();
        let since = now.saturating_duration_since(self.anchor).as_nanos();
        let k = since / every + 1;
        self.anchor + Duration::from_nanos((k * every) as u64)
    }

    /// Latency above the baseline that is noise, not queueing.
    fn tolerance(&self) -> f64 {
        SLACK + NOISE_ALLOWANCE * self.baseline_noise
    }

    /// The limit in force: lowered while a probe drains the backend's queue.
    fn current(&self) -> f64 {
        match &self.probe {
            Some(p) => p.lowered,
            None => self.limit,
        }
    }

    fn set_bounds(&mut self, bounds: Bounds) {
        self.bounds = bounds;
        self.limit = self
            .limit
            .clamp(f64::from(bounds.min), f64::from(bounds.max));
    }

    fn on_sample(&mut self, now: Instant, sample: Sample, inflight: u32) {
        if self.probe.is_some() {
            self.probe_sample(now, sample);
            return;
        }
        if now >= self.probe_due {
            self.start_probe(now);
            self.probe_sample(now, sample);
            return;
        }
        match sample {
            Sample::Latency(d) => self.window.add(d.as_secs_f64()),
            Sample::Congestion => self.window_congested += 1,
            Sample::Ignored => return,
        }
        self.window_max_inflight = self.window_max_inflight.max(inflight);
        self.window_urgent += u32::from(self.urgent);
        let samples = self.window.n + self.window_congested;
        if samples >= WINDOW_SAMPLES || now.duration_since(self.window_start) >= WINDOW_TIME {
            self.close_window(now);
        }
    }

    fn start_probe(&mut self, now: Instant) {
        // Everything in the backend's queue now is served within about the
        // latency requests see now.
        let drain = self.last_short.max(self.baseline.unwrap_or(0.0));
        let round_trip = self.baseline.unwrap_or(drain).max(0.001);
        let measure_from = now + Duration::from_secs_f64(drain);
        self.probe = Some(Probe {
            lowered: (self.limit * PROBE_DEPTH).max(1.0),
            measure_from,
            // The same span in every instance (their baselines agree): one
            // that measured on after the others restored their limits
            // would measure their queue.
            ends: measure_from + Duration::from_secs_f64(round_trip * PROBE_ROUND_TRIPS),
            before: self.last_short,
            sums: Sums::default(),
        });
    }

    fn probe_sample(&mut self, now: Instant, sample: Sample) {
        let Some(p) = self.probe.as_mut() else { return };
        if let Sample::Latency(d) = sample {
            // Sent after the drain: it met the backend's queue drained.
            if now
                .checked_sub(d)
                .is_some_and(|sent| sent >= p.measure_from)
            {
                p.sums.add(d.as_secs_f64());
            }
        }
        if now < p.ends {
            return;
        }
        // Light traffic: keep measuring (the lowered limit binds nobody).
        if p.sums.n < PROBE_MIN_SAMPLES && now < p.ends + PROBE_LONGEST {
            return;
        }
        let (sums, before) = (p.sums, p.before);
        self.probe = None;
        self.probe_due = self.next_probe_after(now);
        self.reset_window(now);
        self.slow_since = None;
        if sums.n < PROBE_MIN_SAMPLES {
            return; // Too quiet to tell: keep what was known.
        }
        let measured = sums.mean().unwrap_or(0.0);
        // Halving every limit halves a latency that is mostly queue: a
        // latency that fell that far may still hold queue, and only counts
        // if it is lower than what is known. One that barely fell is the
        // backend's own.
        let flat = measured >= FLAT_RATIO * before;
        if !flat
            && self
                .baseline
                .is_some_and(|b| measured > b + self.tolerance())
        {
            return;
        }
        let noise = sums.noise();
        match self.baseline {
            // The same backend: average out the probes' sampling error, so
            // that every instance's baseline converges on the same value.
            Some(b) if self.probed && (measured - b).abs() <= 3.0 * noise + SLACK => {
                // A probe of few responses counts for less.
                let weight = PROBE_WEIGHT * (f64::from(sums.n) / f64::from(PROBE_SAMPLES)).min(1.0);
                self.baseline = Some(b + weight * (measured - b));
                self.baseline_noise += PROBE_WEIGHT * (noise - self.baseline_noise);
            }
            _ => {
                self.baseline = Some(measured);
                self.baseline_noise = noise;
            }
        }
        self.probed = true;
    }

    fn reset_window(&mut self, now: Instant) {
        self.window_start = now;
        self.window = Sums::default();
        self.window_congested = 0;
        self.window_max_inflight = 0;
        self.window_urgent = 0;
    }

    fn close_window(&mut self, now: Instant) {
        let (min, max) = (f64::from(self.bounds.min), f64::from(self.bounds.max));
        let congested = self.window_congested > 0;
        let window = self.window;
        let urgent = 2 * self.window_urgent >= window.n + self.window_congested;
        let busy = f64::from(self.window_max_inflight) >= self.limit / 2.0;
        self.reset_window(now);
        if congested {
            self.limit = (self.limit * BACKOFF).clamp(min, max);
            return;
        }
        let Some(short) = window.mean() else { return };
        self.last_short = short;
        let baseline = match self.baseline {
            Some(b) if self.probed || b <= short => b,
            _ => {
                // Before the first probe: the lowest window mean.
                self.baseline_noise = window.noise();
                short
            }
        };
        self.baseline = Some(baseline);
        self.note_slow(now, short > (baseline + self.tolerance()) * SLOW_RATIO);
        let gradient = ((baseline + self.tolerance()) / short).clamp(0.5, 1.0);
        // No queueing at all: grow by √limit; otherwise allow a short queue.
        let allowance = if gradient >= 1.0 {
            self.slow_since = None;
            1.0
        } else {
            QUEUE_ALLOWANCE * if urgent { URGENT_WEIGHT } else { 1.0 }
        };
        let mut target = self.limit * gradient + allowance * self.limit.sqrt();
        if !busy {
            target = target.min(self.limit); // Only shrink without evidence.
        }
        self.limit = (self.limit * (1.0 - SMOOTHING) + target * SMOOTHING).clamp(min, max);
    }

    /// Latency far above the baseline for [`SLOW_AFTER`]: probe at once.
    fn note_slow(&mut self, now: Instant, far: bool) {
        if !far {
            self.slow_since = None;
            return;
        }
        let since = *self.slow_since.get_or_insert(now);
        if now.duration_since(since) >= SLOW_AFTER {
            self.probe_due = now;
        }
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
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
        feed(&mut l, &mut now, 30, 20 * MS, 1000);
        assert!(l.current() > 60, "limit {}", l.current());
    }

    #[test]
    fn does_not_grow_when_idle() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
        feed(&mut l, &mut now, 30, 20 * MS, 2);
        assert_eq!(l.current(), 20);
    }

    #[test]
    fn shrinks_when_latency_rises_and_stays_within_bounds() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
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
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
        feed(&mut l, &mut now, 20, 20 * MS, 1000);
        // Latency doubles for good: the limit first falls, then a probe
        // measures the new latency, the baseline follows and the limit
        // grows again (a response every millisecond for 10 s).
        feed(&mut l, &mut now, 20, 40 * MS, 1000);
        let low = l.current();
        feed(&mut l, &mut now, 10_000 / WINDOW_SAMPLES, 40 * MS, 1000);
        assert!(l.current() > low, "{low} -> {}", l.current());
        assert_eq!(l.baseline(), Some(40 * MS));
    }

    /// Starting under the knee, as a proxy that was up before the peak: a
    /// first window measured at 20 in flight would take 25 ms for the
    /// uncongested latency (see the module comment).
    fn under_the_knee() -> Bounds {
        Bounds {
            initial: 8,
            ..bounds()
        }
    }

    /// A backend of `workers` workers taking `service` each: what a window of
    /// requests at the current limit measures.
    /// ±10% of noise, as a real backend has.
    fn run_backend(l: &mut Limit, now: &mut Instant, secs: u64, workers: u32, service: Duration) {
        run_noisy_backend(l, now, secs, workers, service, 0.1);
    }

    /// As [`run_backend`], each latency off by up to ±`noise` (uniform).
    fn run_noisy_backend(
        l: &mut Limit,
        now: &mut Instant,
        secs: u64,
        workers: u32,
        service: Duration,
        noise: f64,
    ) {
        let end = *now + Duration::from_secs(secs);
        let mut seed = 1u64;
        while *now < end {
            let inflight = l.current();
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (seed >> 33) as f64 / (1u64 << 31) as f64;
            let queueing = (f64::from(inflight) / f64::from(workers)).max(1.0);
            let latency = service.mul_f64(queueing * (1.0 - noise + 2.0 * noise * unit));
            *now += latency / inflight.max(1);
            l.on_sample(*now, Sample::Latency(latency), inflight);
        }
    }

    /// The limit, not lowered by a probe in progress.
    fn settled(l: &Limit) -> u32 {
        match l {
            Limit::Adaptive(a) => a.limit.round() as u32,
            Limit::Fixed(n) => *n,
        }
    }

    #[test]
    fn settles_just_past_the_knee() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(under_the_knee(), now).anchored(now, now);
        run_backend(&mut l, &mut now, 10, 16, 20 * MS);
        // 16 workers: the limit keeps them busy with a queue of a few.
        assert!((16..=22).contains(&settled(&l)), "limit {}", settled(&l));
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
        run_backend(&mut l, &mut now, 10, 100, 20 * MS);
        assert!((100..=115).contains(&settled(&l)), "limit {}", settled(&l));
    }

    #[test]
    fn a_backend_that_became_slower_is_followed_within_a_second_or_two() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(under_the_knee(), now).anchored(now, now);
        run_backend(&mut l, &mut now, 10, 16, 20 * MS);
        // Every request now takes 60 ms: same workers, a third of the
        // throughput. Cutting the limit cannot bring the latency back to
        // 20 ms; after 0.5 s of trying the baseline follows and the limit
        // returns to the workers' count instead of sinking to `min`.
        run_backend(&mut l, &mut now, 3, 16, 60 * MS);
        assert!((14..=22).contains(&settled(&l)), "limit {}", settled(&l));
    }

    #[test]
    fn a_sub_millisecond_backend_is_not_cut_to_min() {
        // 100 µs alone, 1 ms with 20 in flight: CPU sharing, not a backlog
        // anyone would notice. Without the slack the limit sank to `min`
        // and the wait moved into our queue.
        let mut now = Instant::now();
        // Scheduling jitter makes such latencies vary widely (±80%).
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
        run_noisy_backend(&mut l, &mut now, 10, 2, Duration::from_micros(100), 0.8);
        // Without the slack the limit sinks to `min` (4), as it did in the
        // real overhead bench.
        assert!(settled(&l) >= 40, "limit {}", settled(&l));
    }

    #[test]
    fn a_backend_with_varied_service_times_is_kept_busy() {
        // 16 workers whose service time varies ±40%: the minimum of window
        // means sits below their true mean, and without the noise tolerance
        // the limit settled under the worker count, leaving workers idle.
        let mut now = Instant::now();
        let mut l = Limit::adaptive(under_the_knee(), now).anchored(now, now);
        let mut limits = Vec::new();
        for _ in 0..20 {
            run_noisy_backend(&mut l, &mut now, 1, 16, 20 * MS, 0.4);
            // (A probe halves it for a few round trips every 5 s.)
            if !l.probing() {
                limits.push(l.current());
            }
        }
        // Without it: 16, 14, 13, 12 …
        assert!(
            limits[5..].iter().all(|n| (16..=22).contains(n)),
            "limits {limits:?}"
        );
    }

    /// `limits` share one backend of `workers` taking `service` each (±10%),
    /// for `secs`: each response goes to an instance in proportion to its
    /// limit; `urgent[i]` says whether instance i's purchases wait.
    fn run_shared_backend(
        limits: &mut [Limit],
        now: &mut Instant,
        secs: u64,
        workers: u32,
        service: Duration,
        urgent: &[bool],
    ) {
        let end = *now + Duration::from_secs(secs);
        let mut rng = fastrand::Rng::with_seed(7);
        while *now < end {
            let total: u32 = limits.iter().map(Limit::current).sum();
            let queueing = (f64::from(total) / f64::from(workers)).max(1.0);
            let latency = service.mul_f64(queueing * (0.9 + 0.2 * rng.f64()));
            *now += latency / total.max(1);
            let mut pick = rng.u32(0..total.max(1));
            let i = (0..limits.len())
                .find(|&i| {
                    let n = limits[i].current();
                    pick < n || {
                        pick -= n;
                        false
                    }
                })
                .unwrap_or(0);
            let inflight = limits[i].current();
            limits[i].set_urgent(urgent[i]);
            limits[i].on_sample(*now, Sample::Latency(latency), inflight);
        }
    }

    fn fleet(n: usize, initial: u32, now: Instant) -> Vec<Limit> {
        let b = Bounds {
            initial,
            min: 1,
            max: 500,
        };
        (0..n)
            .map(|_| Limit::adaptive(b, now).anchored(now, now))
            .collect()
    }

    #[test]
    fn probes_fall_on_one_grid_whenever_an_instance_started() {
        let anchor = Instant::now();
        let due = |l: &Limit| match l {
            Limit::Adaptive(a) => a.probe_due,
            Limit::Fixed(_) => unreachable!(),
        };
        let b = bounds();
        let early = Limit::adaptive(b, anchor).anchored(anchor, anchor + 1300 * MS);
        let late = Limit::adaptive(b, anchor).anchored(anchor, anchor + 4900 * MS);
        assert_eq!(due(&early), anchor + PROBE_EVERY);
        assert_eq!(due(&late), anchor + PROBE_EVERY);
        let next = Limit::adaptive(b, anchor).anchored(anchor, anchor + PROBE_EVERY);
        assert_eq!(due(&next), anchor + 2 * PROBE_EVERY);
    }

    #[test]
    fn three_instances_starting_into_a_loaded_backend_learn_its_latency_and_share_it() {
        // 60 in flight for 8 workers at the start: every first window
        // measures 7.5x the service time. A probe by one instance alone
        // would drain only its third of that queue.
        let mut now = Instant::now();
        let mut limits = fleet(3, 20, now);
        run_shared_backend(&mut limits, &mut now, 30, 8, 10 * MS, &[false; 3]);
        for l in &limits {
            let b = l.baseline().unwrap().as_secs_f64() * 1000.0;
            assert!((9.0..=11.5).contains(&b), "baseline {b:.2} ms");
        }
        let each: Vec<u32> = limits.iter().map(Limit::current).collect();
        let sum: u32 = each.iter().sum();
        assert!(
            (8..=13).contains(&sum),
            "limits {each:?}: the backend's queue"
        );
        let (lo, hi) = (each.iter().min().unwrap(), each.iter().max().unwrap());
        assert!(*hi <= 2 * lo, "limits {each:?}: shares");
    }

    #[test]
    fn an_instance_whose_purchases_wait_claims_a_larger_share() {
        let mut now = Instant::now();
        let mut limits = fleet(2, 4, now);
        run_shared_backend(&mut limits, &mut now, 10, 8, 10 * MS, &[false, false]);
        run_shared_backend(&mut limits, &mut now, 10, 8, 10 * MS, &[true, false]);
        let (urgent, other) = (limits[0].current(), limits[1].current());
        assert!(urgent >= 2 * other, "urgent {urgent}, other {other}");
    }

    #[test]
    fn congestion_backs_off_multiplicatively() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
        for _ in 0..WINDOW_SAMPLES {
            now += MS;
            l.on_sample(now, Sample::Congestion, 20);
        }
        assert_eq!(l.current(), 18);
    }

    #[test]
    fn reconfigure_keeps_the_learned_limit_within_new_bounds() {
        let mut now = Instant::now();
        let mut l = Limit::adaptive(bounds(), now).anchored(now, now);
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
