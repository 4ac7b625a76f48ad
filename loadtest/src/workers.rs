//! The simulator's pool of workers, on a schedule of their own.
//!
//! A worker that serves back to back finishes one request every service
//! time, however late the runtime wakes the task that holds it. A timer
//! rounds a sleep up to its next millisecond tick, and a woken task waits
//! for a core: a pool that simply slept for the service time after taking a
//! worker lost that time on every request, and a backend of 8 workers ×
//! 10 ms served about 710 requests a second instead of 800 (11% short of
//! what its configuration says; `loadtest`'s "1x" is the configured
//! capacity, so its "5x" held purchases alone at 1.1 times what the
//! backend really served). Here each worker keeps the time its current
//! request is *due* to finish; the next request it takes starts at that
//! time (or at its own arrival, if later), so the lateness of one wake-up
//! delays that response but never the worker's schedule.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};
use tokio::time::Instant;

/// `workers` workers, each with the time it is next free.
pub struct Workers {
    permits: Semaphore,
    /// When each worker that is not serving is due free: the earliest is
    /// the one that finished first, the one the next request takes.
    free_at: Mutex<BinaryHeap<Reverse<Instant>>>,
    size: usize,
    /// Served on the precise timer ([`crate::timer`]), or on tokio's (a
    /// paused clock in tests).
    precise: bool,
}

/// One worker, held: it is due free at `due`, and goes back to the pool
/// when dropped (a request cancelled mid-service frees it at once, with
/// the schedule it had).
pub struct Worker<'a> {
    pool: &'a Workers,
    due: Instant,
    _permit: SemaphorePermit<'a>,
}

impl Workers {
    /// Workers that answer when due, on the precise timer.
    pub fn new(size: usize) -> Workers {
        Workers {
            precise: true,
            ..Workers::on_tokio_time(size)
        }
    }

    /// Workers on tokio's timer (which rounds up to its next millisecond),
    /// for tests on a paused clock.
    pub fn on_tokio_time(size: usize) -> Workers {
        let size = size.max(1);
        Workers {
            permits: Semaphore::new(size),
            free_at: Mutex::new(BinaryHeap::new()),
            size,
            precise: false,
        }
    }

    /// How many workers are serving now.
    pub fn busy(&self) -> usize {
        self.size - self.permits.available_permits()
    }

    /// A worker if one is free now, for a request that arrived at `arrived`.
    pub fn try_take(&self, arrived: Instant) -> Result<Worker<'_>, TryAcquireError> {
        let permit = self.permits.try_acquire()?;
        Ok(self.start(permit, arrived))
    }

    /// The next worker free, for a request that arrived at `arrived`.
    pub async fn take(&self, arrived: Instant) -> Worker<'_> {
        let permit = self.permits.acquire().await.expect("never closed");
        self.start(permit, arrived)
    }

    fn start<'a>(&'a self, permit: SemaphorePermit<'a>, arrived: Instant) -> Worker<'a> {
        let free = self.free_at.lock().expect("workers lock").pop();
        let due = free.map_or(arrived, |Reverse(at)| at.max(arrived));
        Worker {
            pool: self,
            due,
            _permit: permit,
        }
    }
}

impl Worker<'_> {
    /// Serves for `service` from the time this worker started the request
    /// (its last request's due time, or the arrival): returns when due.
    pub async fn serve(&mut self, service: Duration) {
        self.due += service;
        if self.pool.precise {
            crate::timer::sleep_until(self.due.into_std()).await;
        } else {
            tokio::time::sleep_until(self.due).await;
        }
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        // Back on the schedule before the permit goes: whoever takes the
        // permit finds this worker's time (now, if its request was
        // cancelled before it was due).
        let due = self.due.min(Instant::now());
        self.pool
            .free_at
            .lock()
            .expect("workers lock")
            .push(Reverse(due));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_busy_worker_keeps_its_schedule_when_woken_late() {
        let pool = Workers::on_tokio_time(1);
        let t0 = Instant::now();
        let mut w = pool.try_take(t0).expect("free");
        w.serve(Duration::from_millis(10)).await;
        // The task that held it is woken 3 ms late: the next request,
        // waiting since t0, still starts at 10 ms, not 13.
        tokio::time::advance(Duration::from_millis(3)).await;
        drop(w);
        let mut next = pool.take(t0).await;
        next.serve(Duration::from_millis(10)).await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_finds_a_worker_idle_starts_when_it_arrived() {
        let pool = Workers::on_tokio_time(1);
        let t0 = Instant::now();
        drop(pool.try_take(t0).expect("free"));
        tokio::time::advance(Duration::from_millis(50)).await;
        let arrived = Instant::now();
        let mut w = pool.try_take(arrived).expect("free");
        w.serve(Duration::from_millis(10)).await;
        assert_eq!(Instant::now() - arrived, Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn workers_beyond_the_pool_wait() {
        let pool = Workers::on_tokio_time(2);
        let now = Instant::now();
        let (_a, _b) = (pool.try_take(now).unwrap(), pool.try_take(now).unwrap());
        assert_eq!(pool.busy(), 2);
        assert!(pool.try_take(now).is_err());
    }
}
