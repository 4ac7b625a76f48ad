//! The admission wait queue: one FIFO per tier, served highest tier first.
//!
//! Within a tier waiters mostly share one `max_queue_wait`, so expired waiters
//! gather at the front and purging costs only what is purged; a waiter whose
//! deadline was shorter (see `Gate::deadline`) is skipped when popped.
//! Pushing, popping and evicting are O(1) per tier.

use std::collections::VecDeque;
use std::time::Instant;

/// One request waiting for a permit; `handle` is how it is told.
#[derive(Debug)]
pub struct Waiter<W> {
    pub handle: W,
    pub enqueued: Instant,
    pub deadline: Instant,
}

/// Waiters by tier; index 0 is the highest tier.
#[derive(Debug)]
pub struct TierQueue<W> {
    tiers: Vec<VecDeque<Waiter<W>>>,
    len: usize,
}

impl<W> TierQueue<W> {
    pub fn new(tiers: usize) -> TierQueue<W> {
        TierQueue {
            tiers: (0..tiers).map(|_| VecDeque::new()).collect(),
            len: 0,
        }
    }

    /// Waiters, including any whose deadline passed but were not purged yet.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn tier_len(&self, tier: usize) -> usize {
        self.tiers.get(tier).map_or(0, VecDeque::len)
    }

    /// Whether any tier other than `tier` has a waiter.
    pub fn others_waiting(&self, tier: usize) -> bool {
        self.len > self.tier_len(tier)
    }

    /// Grows or shrinks the tier count (a reload); waiters of removed tiers
    /// are dropped, which tells them they were shed.
    pub fn resize(&mut self, tiers: usize) {
        while self.tiers.len() > tiers {
            let q = self.tiers.pop().expect("non-empty");
            self.len -= q.len();
        }
        while self.tiers.len() < tiers {
            self.tiers.push(VecDeque::new());
        }
    }

    pub fn push(&mut self, tier: usize, waiter: Waiter<W>) {
        self.tiers[tier].push_back(waiter);
        self.len += 1;
    }

    /// Drops waiters whose deadline is at or before `now`.
    pub fn purge_expired(&mut self, now: Instant) {
        for q in &mut self.tiers {
            while q.front().is_some_and(|w| w.deadline <= now) {
                q.pop_front();
                self.len -= 1;
            }
        }
    }

    /// When the oldest waiter of any tier arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.tiers
            .iter()
            .filter_map(|q| q.front().map(|w| w.enqueued))
            .min()
    }

    /// Removes the waiters of `tier` that arrived before `cutoff` (oldest first).
    pub fn evict_older_than(&mut self, tier: usize, cutoff: Instant, out: &mut Vec<W>) {
        let q = &mut self.tiers[tier];
        while q.front().is_some_and(|w| w.enqueued < cutoff) {
            out.push(q.pop_front().expect("front exists").handle);
            self.len -= 1;
        }
    }

    /// The lowest tier with a waiter.
    pub fn lowest_waiting(&self) -> Option<usize> {
        self.tiers.iter().rposition(|q| !q.is_empty())
    }

    /// Removes the newest waiter of `tier` (the one a full queue gives up).
    pub fn evict_newest(&mut self, tier: usize) -> Option<Waiter<W>> {
        let w = self.tiers[tier].pop_back()?;
        self.len -= 1;
        Some(w)
    }

    /// Removes the oldest live waiter (deadline after `now`) of the highest
    /// tier for which `eligible` holds; expired ones met on the way are dropped.
    pub fn pop_highest(
        &mut self,
        now: Instant,
        mut eligible: impl FnMut(usize) -> bool,
    ) -> Option<(usize, Waiter<W>)> {
        for tier in 0..self.tiers.len() {
            if self.tiers[tier].is_empty() || !eligible(tier) {
                continue;
            }
            while let Some(w) = self.tiers[tier].pop_front() {
                self.len -= 1;
                if w.deadline > now {
                    return Some((tier, w));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn waiter(id: u32, at: Instant, wait_ms: u64) -> Waiter<u32> {
        Waiter {
            handle: id,
            enqueued: at,
            deadline: at + Duration::from_millis(wait_ms),
        }
    }

    #[test]
    fn serves_highest_tier_first_then_arrival_order() {
        let now = Instant::now();
        let mut q = TierQueue::new(3);
        q.push(2, waiter(1, now, 100));
        q.push(1, waiter(2, now, 100));
        q.push(1, waiter(3, now, 100));
        q.push(0, waiter(4, now, 100));
        let order: Vec<u32> =
            std::iter::from_fn(|| q.pop_highest(now, |_| true).map(|(_, w)| w.handle)).collect();
        assert_eq!(order, [4, 2, 3, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn ineligible_tiers_are_skipped() {
        let now = Instant::now();
        let mut q = TierQueue::new(3);
        q.push(0, waiter(1, now, 100));
        q.push(2, waiter(2, now, 100));
        assert_eq!(
            q.pop_highest(now, |t| t != 0).map(|(t, w)| (t, w.handle)),
            Some((2, 2))
        );
        assert!(q.others_waiting(2));
        assert!(!q.others_waiting(0));
    }

    #[test]
    fn expired_waiters_are_purged_from_the_front() {
        let now = Instant::now();
        let mut q = TierQueue::new(2);
        q.push(1, waiter(1, now, 10));
        q.push(1, waiter(2, now + Duration::from_millis(5), 10));
        q.purge_expired(now + Duration::from_millis(12));
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_highest(now, |_| true).unwrap().1.handle, 2);
    }

    #[test]
    fn an_expired_waiter_behind_a_live_one_is_never_popped() {
        let now = Instant::now();
        let mut q = TierQueue::new(1);
        q.push(0, waiter(1, now, 100));
        q.push(0, waiter(2, now, 10));
        q.push(0, waiter(3, now, 100));
        let later = now + Duration::from_millis(20);
        let got: Vec<u32> =
            std::iter::from_fn(|| q.pop_highest(later, |_| true).map(|(_, w)| w.handle)).collect();
        assert_eq!(got, [1, 3]);
        assert!(q.is_empty());
    }

    #[test]
    fn eviction_takes_the_newest_of_the_lowest_tier() {
        let now = Instant::now();
        let mut q = TierQueue::new(3);
        q.push(1, waiter(1, now, 100));
        q.push(1, waiter(2, now, 100));
        q.push(0, waiter(3, now, 100));
        let lowest = q.lowest_waiting().unwrap();
        assert_eq!(lowest, 1);
        assert_eq!(q.evict_newest(lowest).unwrap().handle, 2);
        assert_eq!(q.len(), 2);
    }
}
