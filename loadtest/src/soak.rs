//! A soak's evidence that nothing leaks: k2proxy's resident memory, open
//! file descriptors and threads sampled from `/proc` at the scenario's
//! `[soak] sample` interval, the purchase p99 of each sample's window from
//! the load's timeline, and a robust (Theil–Sen) trend of each.
//!
//! A trend is reported as *growth*: the fitted slope times the span of the
//! samples, as a share of the fitted value at the first sample (0.1: the line
//! through the samples rises by 10% over the run). Samples in the first
//! [`WARMUP_SHARE`] of the run are left out: a fresh process grows its
//! allocator arenas, connection pools and caches before it levels off, and
//! its resident memory climbs in steps with the first few bursts (the
//! allocator keeps its high-water mark): in the first 30-minute soak
//! (docs/loadtest.md) it rose from 38 to 56 MiB over 17 minutes and was
//! level after; fitted from 20% of the run that read as +19%, from half
//! as +2.7%.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::openloop::Second;
use crate::thresholds::Trend;

/// The share of the run (by time) whose samples are warm-up.
pub const WARMUP_SHARE: f64 = 0.5;

/// One sample of k2proxy.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Seconds from the start of the load.
    pub at_s: f64,
    pub rss_bytes: u64,
    pub fds: u64,
    pub threads: u64,
    /// Purchase p99 over the window that ends here (ms; 0 when none
    /// succeeded). Filled in after the run, from the timeline.
    pub p99_ms: f64,
}

/// Reads one sample of process `pid` from `/proc`; None once it is gone.
pub fn read(pid: u32, at_s: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample {
        at_s,
        rss_bytes: field("VmRSS:")? * 1024,
        fds,
        threads: field("Threads:")?,
        p99_ms: 0.0,
    })
}

/// Samples `pid` every `every` until `stop` fires (or the process is gone).
pub async fn sample(
    pid: u32,
    every: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<Sample> {
    let start = tokio::time::Instant::now();
    let mut out = Vec::new();
    let mut next = start + every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = &mut stop => return out,
        }
        match read(pid, start.elapsed().as_secs_f64()) {
            Some(s) => out.push(s),
            None => return out,
        }
        next += every;
    }
}

/// Fills each sample's `p99_ms` with the p99 of request kind `kind`'s
/// successful latencies in the seconds since the previous sample.
pub fn fill_p99(samples: &mut [Sample], timeline: &[Second], kind: usize) {
    let mut from = 0usize;
    for s in samples {
        let to = (s.at_s as usize).min(timeline.len());
        let mut h: Histogram<u64> = crate::openloop::histogram();
        for sec in &timeline[from.min(to)..to] {
            let _ = h.add(&sec.ok_latency[kind]);
        }
        s.p99_ms = if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(0.99) as f64 / 1000.0
        };
        from = to;
    }
}

/// The Theil–Sen line through `points`: the median of the slopes between
/// every pair of points, and the median intercept under it; returns (slope,
/// value at the first x). Robust to the odd sample taken in a burst or a
/// failover (a least-squares line through the second 30-minute soak read
/// +227% for the purchase p99 because of one 2 s sample; this reads +3.5%).
/// None with fewer than two distinct x.
pub fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let mut slopes: Vec<f64> = points
        .iter()
        .enumerate()
        .flat_map(|(i, a)| points[i + 1..].iter().map(move |b| (a, b)))
        .filter(|(a, b)| b.0 != a.0)
        .map(|(a, b)| (b.1 - a.1) / (b.0 - a.0))
        .collect();
    let slope = median(&mut slopes)?;
    let mut intercepts: Vec<f64> = points.iter().map(|p| p.1 - slope * p.0).collect();
    let intercept = median(&mut intercepts)?;
    Some((slope, intercept + slope * points[0].0))
}

fn median(xs: &mut [f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

/// Fitted growth over the samples after warm-up (see the module doc).
pub fn growth(points: &[(f64, f64)]) -> Option<f64> {
    let (slope, start) = fit(points)?;
    let span = points.last()?.0 - points.first()?.0;
    Some(if start.abs() < f64::EPSILON {
        // From nothing: any rise is unbounded growth, none is none.
        if slope > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    } else {
        slope * span / start
    })
}

/// Each trend's growth over the samples taken after the warm-up of a run
/// of `run_s` seconds.
pub fn trends(samples: &[Sample], run_s: f64) -> BTreeMap<Trend, f64> {
    let kept: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_s >= run_s * WARMUP_SHARE)
        .collect();
    let series = |f: fn(&Sample) -> f64| kept.iter().map(|s| (s.at_s, f(s))).collect::<Vec<_>>();
    let mut out = BTreeMap::new();
    for t in Trend::ALL {
        let points = series(match t {
            Trend::Rss => |s| s.rss_bytes as f64,
            Trend::Fds => |s| s.fds as f64,
            Trend::Threads => |s| s.threads as f64,
            Trend::P99 => |s| s.p99_ms,
        });
        if let Some(g) = growth(&points) {
            out.insert(t, g);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_fitted_and_its_growth_is_a_share_of_its_start() {
        let points: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, 100.0 + 2.0 * i as f64))
            .collect();
        let (slope, start) = fit(&points).unwrap();
        assert!((slope - 2.0).abs() < 1e-9 && (start - 100.0).abs() < 1e-9);
        // 2 a second over 9 s from 100: 18%.
        assert!((growth(&points).unwrap() - 0.18).abs() < 1e-9);
        // One spike (a sample in a burst) does not make a trend.
        let mut spiked = points.clone();
        spiked[8].1 = 1000.0;
        assert!((growth(&spiked).unwrap() - 0.18).abs() < 1e-9);
        // Noise around a level line: no growth to speak of.
        let flat: Vec<(f64, f64)> = (0..30)
            .map(|i| (i as f64, 100.0 + if i % 2 == 0 { 5.0 } else { -5.0 }))
            .collect();
        assert!(growth(&flat).unwrap().abs() < 0.01);
        assert_eq!(fit(&[(1.0, 5.0)]), None);
        assert_eq!(growth(&[(0.0, 0.0), (1.0, 0.0)]), Some(0.0));
    }

    #[test]
    fn warm_up_samples_are_left_out_of_the_trends() {
        // RSS climbs in the first half of the run and is level after: no
        // growth.
        let samples: Vec<Sample> = (1..=10)
            .map(|i| Sample {
                at_s: i as f64 * 10.0,
                rss_bytes: if i < 5 { 10 * i } else { 100 } << 20,
                fds: 40 + i,
                threads: 9,
                p99_ms: 20.0,
            })
            .collect();
        let t = trends(&samples, 100.0);
        assert!(t[&Trend::Rss].abs() < 1e-9, "{t:?}");
        assert!(t[&Trend::Threads].abs() < 1e-9);
        // fds rise by one a sample: 5 over 45 (at 50 s) to 50.
        assert!((t[&Trend::Fds] - 5.0 / 45.0).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn our_own_process_can_be_sampled() {
        let s = read(std::process::id(), 1.0).unwrap();
        assert!(
            s.rss_bytes > 1 << 20 && s.fds >= 3 && s.threads >= 1,
            "{s:?}"
        );
        assert_eq!(read(u32::MAX, 1.0), None);
    }
}
