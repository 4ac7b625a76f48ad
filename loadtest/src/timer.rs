//! A timer that wakes a task within tens of microseconds of its deadline.
//!
//! tokio's timer rounds every deadline up to its next millisecond tick: a
//! simulated worker that slept 10 ms answered 10-11 ms after it started,
//! half a millisecond late on average, and a proxy that holds exactly as
//! many requests as there are workers (HAProxy's `maxconn`) left each
//! worker idle for that lateness on every request: 0.83 of the capacity
//! of 8 workers × 10 ms, 0.71 of 4 × 5 ms. A real backend answers when it
//! has done the work. One thread here keeps the deadlines in a heap and
//! sleeps until the earliest with the OS timer (`park_timeout`: a futex
//! wait, precise to the kernel's timer slack, 50 µs by default).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::Instant;

use tokio::sync::oneshot;

/// A deadline and whom to wake at it; ordered by the deadline alone.
struct Entry {
    at: Instant,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

struct Timer {
    /// Deadlines, earliest first.
    heap: Mutex<BinaryHeap<Reverse<Entry>>>,
    thread: Thread,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        // The thread's first `timer()` waits for this initialisation.
        let handle = std::thread::Builder::new()
            .name("precise-timer".into())
            .spawn(|| run(timer()))
            .expect("spawn the timer thread");
        Timer {
            heap: Mutex::new(BinaryHeap::new()),
            thread: handle.thread().clone(),
        }
    })
}

/// Wakes every deadline that has come, then sleeps until the next one (or
/// until a new, earlier one unparks it).
fn run(timer: &Timer) -> ! {
    loop {
        let next = {
            let mut heap = timer.heap.lock().expect("timer lock");
            let now = Instant::now();
            while heap.peek().is_some_and(|Reverse(e)| e.at <= now) {
                let Reverse(e) = heap.pop().expect("peeked");
                // The sleeper may have gone (its request was cancelled).
                let _ = e.wake.send(());
            }
            heap.peek().map(|Reverse(e)| e.at - now)
        };
        match next {
            Some(wait) => std::thread::park_timeout(wait),
            None => std::thread::park(),
        }
    }
}

/// Returns at `at`, within the OS timer's slack of it (at once if past).
pub async fn sleep_until(at: Instant) {
    if at <= Instant::now() {
        return;
    }
    let t = timer();
    let (wake, woken) = oneshot::channel();
    let earliest = {
        let mut heap = t.heap.lock().expect("timer lock");
        let earliest = heap.peek().is_none_or(|Reverse(e)| at < e.at);
        heap.push(Reverse(Entry { at, wake }));
        earliest
    };
    if earliest {
        t.thread.unpark();
    }
    let _ = woken.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_within_a_fraction_of_a_millisecond() {
        // tokio's own sleep of 10 ms averages about 10.5 (its tick). Three
        // tries: a test machine running the suite on two cores may hold
        // the timer thread off one round.
        let mut medians = Vec::new();
        for _ in 0..3 {
            let mut late = Vec::new();
            for i in 0..20 {
                let at = Instant::now() + Duration::from_micros(10_000 + 37 * i);
                sleep_until(at).await;
                late.push(Instant::now() - at);
            }
            late.sort();
            medians.push(late[late.len() / 2]);
            if medians[medians.len() - 1] < Duration::from_micros(400) {
                return;
            }
        }
        panic!("median lateness of each round: {medians:?}");
    }

    #[tokio::test]
    async fn deadlines_out_of_order_each_wake_at_their_own() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let (a, b, c) = tokio::join!(
            async {
                sleep_until(at(30)).await;
                Instant::now()
            },
            async {
                sleep_until(at(10)).await;
                Instant::now()
            },
            async {
                sleep_until(at(20)).await;
                Instant::now()
            },
        );
        assert!(b >= at(10) && c >= at(20) && a >= at(30));
        assert!(b < c && c < a, "woken in deadline order");
    }
}
