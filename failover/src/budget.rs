//! The retry budget: retries may be at most a share of recent requests
//! (plus a small floor, so a quiet cluster can still retry), as in Envoy and
//! Finagle. Counts decay exponentially over [`WINDOW`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back "recent" reaches.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Retries always allowed per window, whatever the share.
pub const FLOOR: f64 = 3.0;

#[derive(Debug)]
struct Counts {
    requests: f64,
    retries: f64,
    at: Instant,
}

/// A cluster's retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    share: f64,
    counts: Mutex<Counts>,
}

impl RetryBudget {
    pub fn new(share: f64, now: Instant) -> Self {
        RetryBudget {
            share,
            counts: Mutex::new(Counts {
                requests: 0.0,
                retries: 0.0,
                at: now,
            }),
        }
    }

    fn decayed(&self, now: Instant) -> std::sync::MutexGuard<'_, Counts> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let dt = now.saturating_duration_since(c.at).as_secs_f64();
        let keep = (-dt / WINDOW.as_secs_f64()).exp();
        c.requests *= keep;
        c.retries *= keep;
        c.at = now;
        c
    }

    /// Takes over `old`'s recent requests and retries (a reload keeps the
    /// budget's window; the share is this budget's own).
    pub fn adopt(&self, old: &RetryBudget) {
        let (requests, retries, at) = {
            let o = old.counts.lock().unwrap_or_else(|e| e.into_inner());
            (o.requests, o.retries, o.at)
        };
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.requests = requests;
        c.retries = retries;
        c.at = at;
    }

    /// Counts one new request.
    pub fn request(&self, now: Instant) {
        self.decayed(now).requests += 1.0;
    }

    /// Takes a retry from the budget, if there is one left.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut c = self.decayed(now);
        if c.retries + 1.0 > (self.share * c.requests).max(FLOOR) {
            return false;
        }
        c.retries += 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_the_share_of_recent_requests() {
        let now = Instant::now();
        let b = RetryBudget::new(0.1, now);
        for _ in 0..100 {
            b.request(now);
        }
        let allowed = (0..50).filter(|_| b.try_retry(now)).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn a_quiet_cluster_still_has_the_floor() {
        let now = Instant::now();
        let b = RetryBudget::new(0.1, now);
        b.request(now);
        assert_eq!((0..10).filter(|_| b.try_retry(now)).count(), 3);
    }

    #[test]
    fn the_budget_refills_as_old_retries_decay() {
        let mut now = Instant::now();
        let b = RetryBudget::new(0.0, now);
        assert_eq!((0..10).filter(|_| b.try_retry(now)).count(), 3);
        now += WINDOW * 3;
        assert!(b.try_retry(now));
    }
}
