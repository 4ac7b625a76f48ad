//! The mean latency of a cold start's first burst, from its first answers.
//!
//! A cold start sends `n` requests at once (the limit) and its first
//! window of [`super::limit`] closes 50 ms after the first answer: in
//! front of a backend slower than that it holds only the `k` quickest of
//! the `n`, and their mean is far under the backend's (75.8 ms for a mean
//! of 113 on 32 workers of log-normal 100 ms, σ 0.5). That mean became the
//! baseline, every window after it read as queueing, and a cold start at
//! 0.8x shed its lower tiers until a probe measured the truth.
//!
//! The `k` answers are the `k` smallest of `n` draws, a sample censored
//! after its `k`-th (type II): each sits near the quantile its rank gives
//! (Blom's plotting position), and a log-normal fitted through those
//! points by least squares gives the mean of all `n`. In a backend the
//! fleet already saturates, some of the `n` wait for a worker, the
//! quickest answers are fewer than their rank says, and the estimate is
//! low — as low as the window's own mean at worst, which is what the
//! limit used before and what keeps such a fleet under the knee until its
//! first probe.

/// The fewest answers the fit is made from: two points leave the spread
/// to chance.
pub const MIN_ANSWERS: usize = 3;

/// The smallest share of the burst the answers may be: the fit
/// extrapolates from the quickest, and from a sixteenth of them a spread
/// off by a little is a mean off by much.
const MIN_SHARE: f64 = 0.25;

/// The spread a fit may give, as a log-normal σ: past these, a few
/// answers' noise, not a backend.
const SIGMA_RANGE: (f64, f64) = (0.05, 1.0);

/// The most a fit may add to the answers' own mean, as a ratio: answers
/// that waited for a worker (a backend the fleet saturates) fan out as
/// a wide spread would, and the fit took them for one.
const MAX_RAISE: f64 = 1.5;

/// The estimated mean of `sent` latencies of which `answered` (any order)
/// are the quickest; `None` when there is nothing to correct (every
/// request answered) or too little to fit (under [`MIN_ANSWERS`], or
/// under [`MIN_SHARE`] of those sent).
pub fn censored_mean(answered: &[f64], sent: u32) -> Option<f64> {
    let k = answered.len();
    let n = sent as usize;
    let share = k as f64 / n.max(1) as f64;
    if k < MIN_ANSWERS || k >= n || share < MIN_SHARE || answered.iter().any(|x| *x <= 0.0) {
        return None;
    }
    let mut logs: Vec<f64> = answered.iter().map(|x| x.ln()).collect();
    logs.sort_by(f64::total_cmp);
    let z: Vec<f64> = (1..=k)
        .map(|i| inverse_normal((i as f64 - 0.375) / (n as f64 + 0.25)))
        .collect();
    let (zm, lm) = (mean(&z), mean(&logs));
    let cov: f64 = z.iter().zip(&logs).map(|(a, b)| (a - zm) * (b - lm)).sum();
    let var: f64 = z.iter().map(|a| (a - zm) * (a - zm)).sum();
    let sigma = (cov / var).clamp(SIGMA_RANGE.0, SIGMA_RANGE.1);
    let mu = lm - sigma * zm;
    let fitted = (mu + sigma * sigma / 2.0).exp();
    let own = answered.iter().sum::<f64>() / k as f64;
    Some(fitted.clamp(own, MAX_RAISE * own))
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The standard normal quantile of `p` in (0, 1), within 4.5e-4
/// (Abramowitz and Stegun, 26.2.23).
fn inverse_normal(p: f64) -> f64 {
    let upper = |q: f64| {
        let t = (-2.0 * q.ln()).sqrt();
        t - (2.515517 + 0.802853 * t + 0.010328 * t * t)
            / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
    };
    if p < 0.5 {
        -upper(p)
    } else {
        upper(1.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quantile_is_right_at_known_points() {
        for (p, z) in [(0.5, 0.0), (0.8413, 1.0), (0.0228, -2.0), (0.975, 1.96)] {
            assert!(
                (inverse_normal(p) - z).abs() < 2e-3,
                "{p}: {}",
                inverse_normal(p)
            );
        }
    }

    /// Log-normal draws of median 100 ms and σ 0.5 (a mean of 113), from
    /// a small linear congruential generator.
    fn draws(seed: &mut u64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let mut u = || {
                    *seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((*seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
                };
                let z = (-2.0 * u().ln()).sqrt() * (std::f64::consts::TAU * u()).cos();
                0.1 * (0.5 * z).exp()
            })
            .collect()
    }

    /// The burst's quickest `k` of 8, over many bursts: the window's own
    /// mean and the fit's, each averaged.
    fn over_bursts(k: usize) -> (f64, f64) {
        let mut seed = 7;
        let (mut raw, mut fit, mut runs) = (0.0, 0.0, 0.0);
        for _ in 0..2000 {
            let mut burst = draws(&mut seed, 8);
            burst.sort_by(f64::total_cmp);
            let quickest = &burst[..k];
            raw += quickest.iter().sum::<f64>() / k as f64;
            fit += censored_mean(quickest, 8).unwrap();
            runs += 1.0;
        }
        (raw / runs, fit / runs)
    }

    #[test]
    fn the_quickest_answers_of_a_burst_give_the_backends_mean() {
        let truth = 0.1 * (0.125f64).exp();
        for k in [3, 4, 5] {
            let (raw, fit) = over_bursts(k);
            assert!(raw < 0.8 * truth, "the window's own mean is low: {raw}");
            // Capped at [`MAX_RAISE`], the fit is a little low on average
            // (0.82-0.98 of the mean over these bursts), never above it.
            assert!(
                (0.8..1.0).contains(&(fit / truth)),
                "{k} of 8: {fit} for {truth}"
            );
        }
    }

    #[test]
    fn nothing_to_correct_when_every_request_answered_or_too_few_did() {
        assert_eq!(censored_mean(&[0.01, 0.02, 0.03], 3), None);
        assert_eq!(censored_mean(&[0.05, 0.06], 8), None);
        assert_eq!(censored_mean(&[0.05, 0.06, 0.07], 16), None);
    }

    #[test]
    fn a_fit_is_never_under_the_answers_own_mean() {
        // Equal answers fit no spread: the mean is theirs.
        let m = censored_mean(&[0.05, 0.05, 0.05], 8).unwrap();
        assert!(m >= 0.05 - 1e-12, "{m}");
    }
}
