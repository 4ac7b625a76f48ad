//! The health of one backend: active checks (rise/fall) and passive outlier
//! detection (ejection with back-off), with time passed in.
//!
//! Active states and transitions:
//! - `Unknown` (start): first probe ok → `Up`; first probe failed → `Down`.
//! - `Up`: `fall` failed probes in a row → `Down`.
//! - `Down`: `rise` good probes in a row → `Up`.
//!
//! Passive, independent of the above: `consecutive` request failures in a
//! row (connect failure, timeout or 5xx) eject the backend for `base ×
//! 2^(ejections so far)`, at most `max`; a success resets the count; an
//! ejection that ended without a new one for `max` forgets the back-off.
//! Whether an ejection may happen at all is the site's call (max share).

use std::time::{Duration, Instant};

/// Active health thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
}

/// Passive outlier detection settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    /// Failures in a row that eject a backend.
    pub consecutive: u32,
    /// First ejection time; doubles per repeat.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
    /// Largest share of a site's backends that may be ejected at once.
    pub max_share: f64,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive: 5,
            base: Duration::from_secs(5),
            max: Duration::from_secs(60),
            max_share: 0.5,
        }
    }
}

/// What active checks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Active {
    Unknown,
    Up,
    Down,
}

impl Active {
    pub fn as_str(self) -> &'static str {
        match self {
            Active::Unknown => "unknown",
            Active::Up => "up",
            Active::Down => "down",
        }
    }
}

/// The health of one backend.
#[derive(Debug, Clone)]
pub struct Health {
    pub active: Active,
    /// Probes in a row agreeing with a possible change of `active`.
    streak: u32,
    failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            active: Active::Unknown,
            streak: 0,
            failures: 0,
            ejected_until: None,
            ejections: 0,
        }
    }
}

impl Health {
    /// Feeds one active probe result. Returns true when `active` changed.
    pub fn probe(&mut self, ok: bool, t: Thresholds) -> bool {
        let before = self.active;
        match (self.active, ok) {
            (Active::Unknown, true) => self.active = Active::Up,
            (Active::Unknown, false) => self.active = Active::Down,
            (Active::Up, true) | (Active::Down, false) => self.streak = 0,
            (Active::Up, false) => {
                self.streak += 1;
                if self.streak >= t.fall {
                    self.active = Active::Down;
                }
            }
            (Active::Down, true) => {
                self.streak += 1;
                if self.streak >= t.rise {
                    self.active = Active::Up;
                    // A backend the checks bring back gets a clean slate.
                    self.ejected_until = None;
                    self.failures = 0;
                }
            }
        }
        if self.active != before {
            self.streak = 0;
        }
        self.active != before
    }

    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// A request to this backend succeeded.
    pub fn passive_ok(&mut self) {
        self.failures = 0;
    }

    /// A request failed; returns true when this failure reaches the
    /// threshold (the caller decides whether the site can spare it).
    pub fn passive_failure(&mut self, o: &Outlier, now: Instant) -> bool {
        if self.ejected(now) {
            return false;
        }
        self.failures += 1;
        self.failures >= o.consecutive
    }

    /// Ejects the backend; returns for how long.
    pub fn eject(&mut self, o: &Outlier, now: Instant) -> Duration {
        if let Some(until) = self.ejected_until {
            // Quiet for longer than the longest ejection: start over.
            if now.duration_since(until) > o.max {
                self.ejections = 0;
            }
        }
        let time = o
            .base
            .saturating_mul(1 << self.ejections.min(16))
            .min(o.max);
        self.ejected_until = Some(now + time);
        self.ejections += 1;
        self.failures = 0;
        time
    }

    /// Usable for new requests: not down, not ejected.
    pub fn usable(&self, now: Instant) -> bool {
        self.active != Active::Down && !self.ejected(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 3 };

    #[test]
    fn first_probe_decides_then_rise_and_fall_need_streaks() {
        let mut h = Health::default();
        assert!(h.probe(true, T));
        assert_eq!(h.active, Active::Up);
        assert!(!h.probe(false, T));
        assert!(!h.probe(false, T));
        assert!(!h.probe(true, T), "a good probe breaks the streak");
        assert!(!h.probe(false, T));
        assert!(!h.probe(false, T));
        assert!(h.probe(false, T), "3 failures in a row");
        assert_eq!(h.active, Active::Down);
        assert!(!h.probe(true, T));
        assert!(h.probe(true, T), "2 good in a row");
        assert_eq!(h.active, Active::Up);
        let mut h = Health::default();
        h.probe(false, T);
        assert_eq!(
            h.active,
            Active::Down,
            "unknown → down on the first failure"
        );
    }

    #[test]
    fn ejection_backs_off_exponentially_and_is_capped() {
        let o = Outlier {
            consecutive: 2,
            base: Duration::from_secs(1),
            max: Duration::from_secs(5),
            max_share: 1.0,
        };
        let mut h = Health::default();
        let mut now = Instant::now();
        let mut times = Vec::new();
        for _ in 0..5 {
            assert!(!h.passive_failure(&o, now));
            assert!(h.passive_failure(&o, now));
            times.push(h.eject(&o, now).as_secs());
            assert!(!h.usable(now));
            assert!(
                !h.passive_failure(&o, now),
                "failures while ejected do not count"
            );
            now += Duration::from_secs(times.last().copied().unwrap());
            assert!(h.usable(now), "back when the ejection ends");
        }
        assert_eq!(times, [1, 2, 4, 5, 5]);
        // Quiet for longer than the max: the back-off starts over.
        now += Duration::from_secs(6);
        h.passive_failure(&o, now);
        h.passive_failure(&o, now);
        assert_eq!(h.eject(&o, now), Duration::from_secs(1));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let o = Outlier {
            consecutive: 2,
            ..Outlier::default()
        };
        let mut h = Health::default();
        let now = Instant::now();
        assert!(!h.passive_failure(&o, now));
        h.passive_ok();
        assert!(!h.passive_failure(&o, now));
    }
}
