//! Per-tier request counts and the rates `/status` shows (sampled once a
//! second by the reload service).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Most tiers a policy may name (see `config::validate`).
const MAX_TIERS: usize = 64;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Rates {
    pub admitted_per_s: f64,
    pub shed_per_s: f64,
}

/// The last sample: when, the counts then, and the rates it computed.
struct Sample {
    at: Instant,
    counts: Vec<(u64, u64)>,
    rates: Vec<Rates>,
}

/// Counters by tier index, and the last sampled rates.
pub struct TierStats {
    admitted: Vec<AtomicU64>,
    shed: Vec<AtomicU64>,
    last: Mutex<Sample>,
}

impl Default for TierStats {
    fn default() -> Self {
        TierStats {
            admitted: (0..MAX_TIERS).map(|_| AtomicU64::new(0)).collect(),
            shed: (0..MAX_TIERS).map(|_| AtomicU64::new(0)).collect(),
            last: Mutex::new(Sample {
                at: Instant::now(),
                counts: vec![(0, 0); MAX_TIERS],
                rates: vec![Rates::default(); MAX_TIERS],
            }),
        }
    }
}

impl TierStats {
    /// A request of `tier` reached a backend.
    pub fn admitted(&self, tier: usize) {
        if let Some(c) = self.admitted.get(tier) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request of `tier` was refused (shed or rate limited).
    pub fn shed(&self, tier: usize) {
        if let Some(c) = self.shed.get(tier) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Computes the rates since the last sample.
    pub fn sample(&self) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let dt = last.at.elapsed().as_secs_f64().max(1e-3);
        for t in 0..MAX_TIERS {
            let now = (
                self.admitted[t].load(Ordering::Relaxed),
                self.shed[t].load(Ordering::Relaxed),
            );
            let prev = last.counts[t];
            last.rates[t] = Rates {
                admitted_per_s: (now.0 - prev.0) as f64 / dt,
                shed_per_s: (now.1 - prev.1) as f64 / dt,
            };
            last.counts[t] = now;
        }
        last.at = Instant::now();
    }

    /// The rates of the first `tiers` tiers, as last sampled.
    pub fn rates(&self, tiers: usize) -> Vec<Rates> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.rates.iter().take(tiers).copied().collect()
    }
}
