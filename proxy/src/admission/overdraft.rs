//! Purchases past the limit: how many slots a `never_shed` tier may take
//! beyond an adaptive limit while it waits.
//!
//! In a fleet, each instance's limit settles where the backend's latency
//! meets its own ceiling, and the ceilings differ by what each instance's
//! probes happened to read (a few percent on a backend whose service time
//! varies). The instance with the lower ceiling holds the smaller share.
//! Simulated on 16 workers with log-normal service times (σ 0.5), two
//! instances held 7-8 and 14-16, and the smaller one's purchases waited in
//! our queue for 30-100 ms at a time while the larger one admitted
//! merchants (real fleets of two at 3x, the build before: purchase p99
//! 75-133 ms, median 80, against HAProxy's 73 with `maxconn = workers /
//! N`). The starving claim ([`super::starving`]) acts only at
//! `1.5 × min`; above it nothing told the others that this instance's
//! purchases wait.
//!
//! A purchase that finds the limit full may go past it by `√limit` (4 of
//! 16): it reaches the backend at once, the backend's latency rises a
//! little, and every instance's gradient backs off. Those who admit lower
//! tiers shed them first, the share moves to the purchases, and the tier
//! order holds across the fleet as it does in one instance. The limit
//! itself does not move; lower tiers still stop short of it
//! (`Gate::headroom`). Measured (docs/admission.md, "Thirty-first
//! round"): on that backend, two and three instances at 3x held purchase
//! p99 at a median 77 and 83 ms over seven interleaved rounds, against 80
//! and 89 without it and HAProxy's 73 and 79 (`maxconn = workers / N`).
//!
//! When more in the backend is only more queue, there is no overdraft:
//! - at `min` (or within `√limit` of it): a fleet whose `min`s fill the
//!   workers, or a backend that collapses, is what held the limit there;
//! - while the last window's latency is over [`FLOOD`] × the ceiling: a
//!   collapsing backend serves less the more it holds;
//! - once purchases have waited over the target for [`STANDING_FOR`]
//!   without a break while every other tier was shed: their own demand is
//!   over capacity (5x with 20% purchases), and the backend's queue would
//!   grow by the overdraft of every instance. `make peak`'s backend
//!   collapses under its queue; with the overdraft for the whole plateau
//!   its purchase p99 was 1.1 s, over the drill's 1 s threshold.

use std::time::Duration;

/// Over this multiple of the ceiling the backend is flooded: no overdraft.
pub const FLOOD: f64 = 1.5;
/// After this long of purchases waiting over the target without a break
/// (all else shed), their demand is over capacity: no overdraft.
pub const STANDING_FOR: Duration = Duration::from_secs(3);

/// What the gate knows when a `never_shed` request finds the limit full.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The adaptive limit in force and its floor.
    pub limit: u32,
    pub min: u32,
    /// The last window's mean latency over the limit's ceiling.
    pub over_ceiling: Option<f64>,
    /// How long every grant of these tiers has waited over the target
    /// while every other tier was shed.
    pub waited_over_target: Duration,
}

/// The slots a `never_shed` tier may take past the limit.
pub fn slots(seen: Seen) -> u32 {
    if seen.over_ceiling.is_some_and(|r| r > FLOOD) || seen.waited_over_target > STANDING_FOR {
        return 0;
    }
    let overdraft = f64::from(seen.limit).sqrt().round() as u32;
    overdraft.min(seen.limit.saturating_sub(seen.min))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(limit: u32) -> Seen {
        Seen {
            limit,
            min: 4,
            over_ceiling: Some(1.1),
            waited_over_target: Duration::from_millis(500),
        }
    }

    #[test]
    fn the_square_root_of_the_limit_but_never_below_min() {
        assert_eq!(slots(seen(16)), 4);
        assert_eq!(slots(seen(64)), 8);
        assert_eq!(slots(seen(10)), 3);
        // Within √limit of `min`: only what lies above it.
        assert_eq!(slots(seen(6)), 2);
        assert_eq!(slots(seen(4)), 0);
        // Before the first window.
        let fresh = Seen {
            over_ceiling: None,
            ..seen(16)
        };
        assert_eq!(slots(fresh), 4);
    }

    #[test]
    fn none_for_a_flooded_backend_or_a_demand_over_capacity() {
        let flooded = Seen {
            over_ceiling: Some(1.6),
            ..seen(16)
        };
        assert_eq!(slots(flooded), 0);
        let standing = Seen {
            waited_over_target: Duration::from_millis(3100),
            ..seen(16)
        };
        assert_eq!(slots(standing), 0);
        let briefly = Seen {
            waited_over_target: Duration::from_millis(2900),
            ..seen(16)
        };
        assert_eq!(slots(briefly), 4);
    }
}
