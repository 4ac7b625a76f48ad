//! When requests are due and which tier each one is: arrivals computed
//! arithmetically from a rate profile (so the schedule never depends on how
//! fast the target answers), and a seeded weighted draw of the tier.
//!
//! A profile is a list of stages, each constant or a linear ramp; a spike is
//! a short high stage between two low ones. Arrival `k` (counting from 0 over
//! the whole profile) is due at the time `t` where the integral of the rate
//! from 0 to `t` reaches `k`: within a ramp stage that is the root of a
//! quadratic, so arrivals thicken smoothly instead of jumping per second.

use std::time::Duration;

/// One stage of the rate profile, in requests per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    Constant {
        duration: Duration,
        rate: f64,
    },
    Ramp {
        duration: Duration,
        from: f64,
        to: f64,
    },
}

impl Stage {
    pub fn duration(&self) -> Duration {
        match *self {
            Stage::Constant { duration, .. } | Stage::Ramp { duration, .. } => duration,
        }
    }

    fn rates(&self) -> (f64, f64) {
        match *self {
            Stage::Constant { rate, .. } => (rate, rate),
            Stage::Ramp { from, to, .. } => (from, to),
        }
    }

    /// Arrivals expected over the stage (the integral of its rate).
    pub fn expected(&self) -> f64 {
        let (from, to) = self.rates();
        (from + to) / 2.0 * self.duration().as_secs_f64()
    }

    /// Rate at `t` into the stage.
    pub fn rate_at(&self, t: Duration) -> f64 {
        let (from, to) = self.rates();
        let d = self.duration().as_secs_f64();
        if d == 0.0 {
            return to;
        }
        from + (to - from) * (t.as_secs_f64() / d).clamp(0.0, 1.0)
    }

    /// The time into the stage when `x` arrivals have accumulated, if
    /// within it.
    fn time_of(&self, x: f64) -> Option<f64> {
        let (from, to) = self.rates();
        let d = self.duration().as_secs_f64();
        // N(t) = from·t + (to − from)·t² / 2d
        let a = (to - from) / (2.0 * d);
        let t = if a.abs() < 1e-12 {
            if from <= 0.0 {
                return None;
            }
            x / from
        } else {
            let disc = from * from + 4.0 * a * x;
            if disc < 0.0 {
                return None;
            }
            (-from + disc.sqrt()) / (2.0 * a)
        };
        (t >= 0.0 && t < d).then_some(t)
    }
}

/// A rate profile: stages played one after the other.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub stages: Vec<Stage>,
}

impl Schedule {
    pub fn constant(rate: f64, duration: Duration) -> Schedule {
        Schedule {
            stages: vec![Stage::Constant { duration, rate }],
        }
    }

    pub fn duration(&self) -> Duration {
        self.stages.iter().map(Stage::duration).sum()
    }

    /// Arrivals over the whole profile (rounded down).
    pub fn expected(&self) -> f64 {
        self.stages.iter().map(Stage::expected).sum()
    }

    /// The offered rate `t` after the start (0 after the end).
    pub fn rate_at(&self, t: Duration) -> f64 {
        let mut start = Duration::ZERO;
        for s in &self.stages {
            if t < start + s.duration() {
                return s.rate_at(t - start);
            }
            start += s.duration();
        }
        0.0
    }

    /// The highest rate anywhere in the profile.
    pub fn peak(&self) -> f64 {
        self.stages
            .iter()
            .map(|s| {
                let (a, b) = s.rates();
                a.max(b)
            })
            .fold(0.0, f64::max)
    }

    /// Due times of every arrival, as offsets from the start, in order.
    pub fn arrivals(&self) -> impl Iterator<Item = Duration> + Send + '_ {
        let mut stage = 0;
        let mut stage_start = 0.0_f64;
        // Arrivals accumulated before the current stage began.
        let mut before = 0.0_f64;
        let mut k: u64 = 0;
        std::iter::from_fn(move || loop {
            let s = self.stages.get(stage)?;
            if let Some(t) = s.time_of(k as f64 - before) {
                k += 1;
                return Some(Duration::from_secs_f64(stage_start + t));
            }
            before += s.expected();
            stage_start += s.duration().as_secs_f64();
            stage += 1;
        })
    }
}

/// A seeded weighted draw over a fixed set of choices.
#[derive(Debug, Clone)]
pub struct Mix {
    cumulative: Vec<f64>,
    rng: fastrand::Rng,
}

impl Mix {
    /// `weights` must be non-negative with a positive sum.
    pub fn new(weights: &[f64], seed: u64) -> Mix {
        let mut sum = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                sum += w.max(0.0);
                sum
            })
            .collect();
        Mix {
            cumulative,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The index of the next choice.
    pub fn draw(&mut self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = self.rng.f64() * total;
        self.cumulative
            .iter()
            .position(|c| x < *c)
            .unwrap_or(self.cumulative.len().saturating_sub(1))
    }

    /// A random number in `0..n` from the same seeded stream.
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.u64(0..n.max(1))
    }
}

/// Waits for each due time in turn and calls `emit(index, due offset, lag)`.
///
/// With `fine` set, the last stretch before each arrival is slept with the
/// OS's timer (tens of microseconds) instead of tokio's (a millisecond
/// wheel); that blocks the thread, so a fine pacer runs on its own thread.
/// Without it everything goes through tokio's clock, which a test can pause.
pub async fn pace(
    arrivals: impl Iterator<Item = Duration>,
    fine: bool,
    mut emit: impl FnMut(u64, Duration, Duration),
) {
    let start = tokio::time::Instant::now();
    let coarse = Duration::from_millis(2);
    for (i, offset) in arrivals.enumerate() {
        let due = start + offset;
        if fine {
            if due > tokio::time::Instant::now() + coarse {
                tokio::time::sleep_until(due - coarse).await;
            }
            loop {
                let now = tokio::time::Instant::now();
                if now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(Duration::from_micros(200)));
            }
        } else {
            tokio::time::sleep_until(due).await;
        }
        emit(i as u64, offset, tokio::time::Instant::now() - due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_constant_stage_spaces_arrivals_evenly() {
        let s = Schedule::constant(100.0, secs(2.0));
        let a: Vec<_> = s.arrivals().collect();
        assert_eq!(a.len(), 200);
        assert_eq!(a[0], Duration::ZERO);
        for w in a.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64();
            assert!((gap - 0.01).abs() < 1e-9, "gap {gap}");
        }
    }

    #[test]
    fn a_ramp_accelerates_and_counts_its_integral() {
        // 0 → 200/s over 10 s: 1000 arrivals, a quarter of them in the first half.
        let s = Schedule {
            stages: vec![Stage::Ramp {
                duration: secs(10.0),
                from: 0.0,
                to: 200.0,
            }],
        };
        let a: Vec<_> = s.arrivals().collect();
        assert!((999..=1000).contains(&a.len()), "{}", a.len());
        let first_half = a.iter().filter(|t| **t < secs(5.0)).count();
        assert!((249..=251).contains(&first_half), "{first_half}");
        // Gaps shrink: the local rate at 9 s is 180/s.
        let near = a.iter().position(|t| *t >= secs(9.0)).unwrap();
        let gap = (a[near + 1] - a[near]).as_secs_f64();
        assert!((gap - 1.0 / 180.0).abs() < 0.0002, "gap {gap}");
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn stages_follow_each_other_spike_included() {
        // 1 s at 100/s, a 0.5 s spike at 1000/s, 1 s at 100/s.
        let s = Schedule {
            stages: vec![
                Stage::Constant {
                    duration: secs(1.0),
                    rate: 100.0,
                },
                Stage::Constant {
                    duration: secs(0.5),
                    rate: 1000.0,
                },
                Stage::Constant {
                    duration: secs(1.0),
                    rate: 100.0,
                },
            ],
        };
        let a: Vec<_> = s.arrivals().collect();
        assert_eq!(a.len(), 700);
        let in_spike = a
            .iter()
            .filter(|t| **t >= secs(1.0) && **t < secs(1.5))
            .count();
        assert_eq!(in_spike, 500);
        assert!(*a.last().unwrap() < secs(2.5));
        assert_eq!(s.peak(), 1000.0);
        assert_eq!(s.rate_at(secs(1.2)), 1000.0);
        assert_eq!(s.rate_at(secs(3.0)), 0.0);
    }

    #[test]
    fn a_falling_ramp_ends_within_its_stage() {
        let s = Schedule {
            stages: vec![Stage::Ramp {
                duration: secs(4.0),
                from: 300.0,
                to: 100.0,
            }],
        };
        let a: Vec<_> = s.arrivals().collect();
        assert!((799..=800).contains(&a.len()), "{}", a.len());
        assert!(*a.last().unwrap() < secs(4.0));
    }

    #[test]
    fn the_mix_holds_its_proportions_within_two_percent() {
        let weights = [20.0, 30.0, 30.0, 20.0];
        let mut mix = Mix::new(&weights, 42);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[mix.draw()] += 1;
        }
        for (c, w) in counts.iter().zip(weights) {
            let share = *c as f64 / 10_000.0;
            assert!((share - w / 100.0).abs() < 0.02, "{counts:?}");
        }
        // Seeded: the same seed draws the same sequence.
        let (mut a, mut b) = (Mix::new(&weights, 7), Mix::new(&weights, 7));
        assert!((0..100).all(|_| a.draw() == b.draw()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_emits_each_arrival_at_its_due_time() {
        let s = Schedule {
            stages: vec![
                Stage::Constant {
                    duration: secs(1.0),
                    rate: 50.0,
                },
                Stage::Ramp {
                    duration: secs(1.0),
                    from: 50.0,
                    to: 150.0,
                },
            ],
        };
        let start = tokio::time::Instant::now();
        let mut seen = Vec::new();
        pace(s.arrivals(), false, |i, due, lag| {
            seen.push((i, due, start.elapsed(), lag))
        })
        .await;
        assert_eq!(seen.len(), 150);
        for (i, due, at, lag) in &seen {
            // The paused clock lands on the millisecond tick at or after due.
            assert!(*at >= *due && *at - *due < Duration::from_millis(1), "{i}");
            assert_eq!(*lag, *at - *due, "arrival {i}");
        }
        let first_second = seen.iter().filter(|s| s.2 < secs(1.0)).count();
        assert_eq!(first_second, 50);
    }
}
