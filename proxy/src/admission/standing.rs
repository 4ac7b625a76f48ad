//! Standing-queue control for the tiers that are never shed.
//!
//! The shed level refuses lower tiers when waits grow, but a `never_shed`
//! tier (purchases) only waits. When its own demand exceeds what the backend
//! completes, its queue stands: every purchase waits until `max_queue_wait`
//! and the excess is refused only then, seconds late. The same number of
//! purchases can succeed in tens of milliseconds with the excess refused at
//! once: a newcomer whose expected wait (the waiters ahead of it over the
//! rate permits come back) exceeds a bound is refused on arrival
//! (`queue_full`). The bound is a few of the backend's own service times,
//! never under the policy's `target_queue_delay`: enough queue that the
//! backend never idles, short enough that a successful purchase costs about
//! two service times of waiting. As in adaptive LIFO and CoDel, a queue is
//! a shock absorber, not a place to live.

use std::time::{Duration, Instant};

/// Service times a never-shed request may expect to wait.
const SERVICE_TIMES: f64 = 3.0;
/// How long never-shed waiters must have been granted past the bound before
/// newcomers are refused: a burst is absorbed, a standing queue is not
/// (CoDel's interval).
const INTERVAL: Duration = Duration::from_millis(250);
/// A queue that stood this recently counts as standing again as soon as a
/// waiter is granted past the bound, without a new [`INTERVAL`] (CoDel
/// resumes dropping the same way): otherwise each interval lets the excess
/// build a queue of its own length.
const MEMORY: Duration = Duration::from_secs(1);
/// Weight of each new gap or latency in the moving averages.
const ALPHA: f64 = 1.0 / 32.0;

/// The drain rate and service time of one site, as permits come back.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    /// Mean time between two releases, seconds.
    gap: Option<f64>,
    last: Option<Instant>,
    /// Mean backend latency, seconds.
    service: Option<f64>,
    /// Since when every never-shed waiter granted had waited past the bound.
    above_since: Option<Instant>,
    /// The last time the queue was found standing.
    last_standing: Option<Instant>,
}

fn ewma(old: Option<f64>, x: f64) -> f64 {
    old.map_or(x, |o| o + ALPHA * (x - o))
}

impl Standing {
    /// A permit came back at `now`; `latency` is the backend's, if it answered.
    pub fn on_release(&mut self, now: Instant, latency: Option<Duration>) {
        if let Some(last) = self.last {
            self.gap = Some(ewma(
                self.gap,
                now.saturating_duration_since(last).as_secs_f64(),
            ));
        }
        self.last = Some(now);
        if let Some(l) = latency {
            self.service = Some(ewma(self.service, l.as_secs_f64()));
        }
    }

    /// A never-shed waiter got its permit after waiting `waited`.
    pub fn on_grant(&mut self, now: Instant, waited: Duration, bound: Duration) {
        if waited <= bound {
            self.above_since = None;
        } else if self.above_since.is_none() {
            self.above_since = Some(now);
        }
    }

    /// Whether a never-shed newcomer with `ahead` waiters of its tier or
    /// higher in front of it should be refused now rather than wait: the
    /// queue has stood past [`Standing::bound`] for [`INTERVAL`] and the
    /// newcomer's expected wait is past it too. Never before both rates are
    /// measured, and never with nobody ahead.
    pub fn refuse(
        &mut self,
        now: Instant,
        ahead: usize,
        target: Duration,
        max_wait: Duration,
    ) -> bool {
        let (Some(gap), Some(_)) = (self.gap, self.service) else {
            return false;
        };
        if ahead == 0 {
            // An empty queue is not standing.
            self.above_since = None;
            return false;
        }
        let recently = self
            .last_standing
            .is_some_and(|t| now.saturating_duration_since(t) < MEMORY);
        let standing = self
            .above_since
            .is_some_and(|t| recently || now.saturating_duration_since(t) >= INTERVAL);
        if !standing {
            return false;
        }
        self.last_standing = Some(now);
        let expected = gap * (ahead + 1) as f64;
        expected > self.bound(target, max_wait).as_secs_f64()
    }

    /// The longest expected wait a never-shed request is let in for:
    /// [`SERVICE_TIMES`] service times, at least `target`, at most `max_wait`.
    pub fn bound(&self, target: Duration, max_wait: Duration) -> Duration {
        let service = Duration::from_secs_f64(self.service.unwrap_or(0.0) * SERVICE_TIMES);
        service.max(target).min(max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Releases every `gap`, each after `latency` at the backend.
    fn fed(gap: Duration, latency: Duration) -> Standing {
        let mut s = Standing::default();
        let mut now = Instant::now();
        for _ in 0..200 {
            now += gap;
            s.on_release(now, Some(latency));
        }
        s
    }

    #[test]
    fn refuses_once_the_queue_stands_and_the_expected_wait_passes_the_bound() {
        // 1 ms between releases, 20 ms at the backend: the bound is 60 ms.
        let mut s = fed(MS, 20 * MS);
        let (target, max) = (20 * MS, 2000 * MS);
        let bound = s.bound(target, max);
        assert_eq!(bound, 60 * MS);
        let t0 = Instant::now();
        assert!(!s.refuse(t0, 65, target, max), "a burst, not yet standing");
        s.on_grant(t0, 70 * MS, bound);
        let later = t0 + INTERVAL;
        s.on_grant(later, 70 * MS, bound);
        assert!(!s.refuse(later, 50, target, max), "51 ms expected");
        assert!(s.refuse(later, 65, target, max), "66 ms expected");
        // A waiter granted within the bound: not standing any more.
        s.on_grant(later, 10 * MS, bound);
        assert!(!s.refuse(later, 65, target, max));
        s.on_grant(later, 70 * MS, bound);
        assert!(
            s.refuse(later + 50 * MS, 65, target, max),
            "standing again at once: it stood within the last second"
        );
        assert!(!s.refuse(later + 200 * MS, 0, target, max), "nobody ahead");
        assert!(
            !s.refuse(later + 300 * MS, 65, target, max),
            "the empty queue reset it"
        );
        let much_later = later + 5000 * MS;
        s.on_grant(much_later, 70 * MS, bound);
        assert!(
            !s.refuse(much_later + 50 * MS, 65, target, max),
            "long after: a burst again, until it stands for an interval"
        );
    }

    #[test]
    fn the_bound_is_at_least_the_target_and_at_most_the_max_wait() {
        let fast = fed(MS, MS);
        assert_eq!(fast.bound(20 * MS, 2000 * MS), 20 * MS);
        let slow = fed(MS, 2000 * MS);
        assert_eq!(slow.bound(20 * MS, 500 * MS), 500 * MS);
    }

    #[test]
    fn nothing_is_refused_before_it_is_measured() {
        let mut s = Standing::default();
        let now = Instant::now();
        s.on_grant(now, 1000 * MS, MS);
        assert!(!s.refuse(now + 1000 * MS, 1000, MS, MS));
    }
}
