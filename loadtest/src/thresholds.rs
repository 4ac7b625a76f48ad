//! Pass/fail thresholds of a scenario, written as in the scenario file:
//! `"purchase.success >= 0.999"`, `"purchase.p99 <= 500ms"`,
//! `"all.timeout <= 0.01"`. The left side is a tier name (or `all`) and a
//! metric; latency metrics take a duration, the others a share in 0..=1.

use std::fmt;

use crate::openloop::{Report, TargetReport};
use crate::report::ms;

/// What a threshold measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// Shares of the tier's requests.
    Success,
    Shed,
    RateLimited,
    Error,
    Timeout,
    /// Latency of successful requests from the intended send time.
    Latency(f64),
    /// Latency of shed responses (p99).
    ShedP99,
}

impl Metric {
    fn parse(s: &str) -> Option<Metric> {
        Some(match s {
            "success" => Metric::Success,
            "shed" => Metric::Shed,
            "rate_limited" => Metric::RateLimited,
            "error" => Metric::Error,
            "timeout" => Metric::Timeout,
            "p50" => Metric::Latency(0.5),
            "p90" => Metric::Latency(0.9),
            "p99" => Metric::Latency(0.99),
            "p999" => Metric::Latency(0.999),
            "max" => Metric::Latency(1.0),
            "shed_p99" => Metric::ShedP99,
            _ => return None,
        })
    }

    fn is_latency(self) -> bool {
        matches!(self, Metric::Latency(_) | Metric::ShedP99)
    }
}

/// One threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub text: String,
    pub tier: String,
    pub metric: Metric,
    /// True for `>=`, false for `<=`.
    pub at_least: bool,
    /// A share, or milliseconds for latency metrics.
    pub value: f64,
}

impl Threshold {
    pub fn parse(s: &str) -> Result<Threshold, String> {
        let expected = "expected `TIER.METRIC >= VALUE` or `<=`, e.g. \"purchase.success >= 0.999\" or \"purchase.p99 <= 500ms\"";
        let (lhs, at_least, rhs) = if let Some((l, r)) = s.split_once(">=") {
            (l, true, r)
        } else if let Some((l, r)) = s.split_once("<=") {
            (l, false, r)
        } else {
            return Err(format!("{s:?}: {expected}"));
        };
        let (tier, metric) = lhs
            .trim()
            .rsplit_once('.')
            .ok_or_else(|| format!("{s:?}: {expected}"))?;
        let metric = Metric::parse(metric).ok_or_else(|| {
            format!(
                "{s:?}: unknown metric {metric:?}; expected success, shed, rate_limited, error, timeout, p50, p90, p99, p999, max or shed_p99"
            )
        })?;
        let rhs = rhs.trim().trim_matches('"');
        let value = if metric.is_latency() {
            humantime::parse_duration(rhs)
                .map_err(|e| format!("{s:?}: {rhs:?} is not a duration ({e}), e.g. 500ms"))?
                .as_secs_f64()
                * 1000.0
        } else {
            rhs.parse::<f64>()
                .ok()
                .filter(|v| (0.0..=1.0).contains(v))
                .ok_or_else(|| format!("{s:?}: {rhs:?} must be a share from 0 to 1"))?
        };
        Ok(Threshold {
            text: s.trim().to_string(),
            tier: tier.to_string(),
            metric,
            at_least,
            value,
        })
    }

    fn measure(&self, t: &TargetReport) -> f64 {
        let o = &t.outcomes;
        match self.metric {
            Metric::Success => t.success(),
            Metric::Shed => t.share(o.shed),
            Metric::RateLimited => t.share(o.rate_limited),
            Metric::Error => t.share(o.error),
            Metric::Timeout => t.share(o.timeout),
            Metric::Latency(q) if q >= 1.0 => t.ok_latency.max() as f64 / 1000.0,
            Metric::Latency(q) => ms(&t.ok_latency, q),
            Metric::ShedP99 => ms(&t.shed_latency, 0.99),
        }
    }

    /// Checks the threshold against a report.
    pub fn check(&self, report: &Report) -> Verdict {
        let all;
        let target = if self.tier == "all" {
            all = report.all();
            Some(&all)
        } else {
            report.target(&self.tier)
        };
        let Some(t) = target else {
            return Verdict {
                threshold: self.clone(),
                actual: None,
                pass: false,
            };
        };
        let actual = self.measure(t);
        // A latency threshold on a tier with no successful request fails:
        // nothing was fast.
        let empty = self.metric.is_latency()
            && match self.metric {
                Metric::ShedP99 => t.shed_latency.is_empty(),
                _ => t.ok_latency.is_empty(),
            };
        let pass = !empty
            && if self.at_least {
                actual >= self.value
            } else {
                actual <= self.value
            };
        Verdict {
            threshold: self.clone(),
            actual: Some(actual),
            pass,
        }
    }
}

/// A threshold checked against a run.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub threshold: Threshold,
    /// None when the tier was not in the run.
    pub actual: Option<f64>,
    pub pass: bool,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.threshold;
        match self.actual {
            None => write!(f, "{}: no tier {:?} in the run", t.text, t.tier),
            Some(v) if t.metric.is_latency() => write!(f, "{}: measured {v:.1}ms", t.text),
            Some(v) => write!(f, "{}: measured {v:.4}", t.text),
        }
    }
}

impl serde::Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({
            "threshold": self.threshold.text,
            "actual": self.actual,
            "pass": self.pass,
        })
        .serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_bad_ones_say_what_is_expected() {
        let t = Threshold::parse("purchase.success >= 0.999").unwrap();
        assert_eq!(
            (t.tier.as_str(), t.metric, t.at_least, t.value),
            ("purchase", Metric::Success, true, 0.999)
        );
        let t = Threshold::parse("purchase.p99 <= \"500ms\"").unwrap();
        assert_eq!(
            (t.metric, t.at_least, t.value),
            (Metric::Latency(0.99), false, 500.0)
        );
        for (bad, says) in [
            ("purchase.success = 1", "expected"),
            ("purchase.speed >= 1", "unknown metric"),
            ("purchase.p99 <= 500", "not a duration"),
            ("purchase.success >= 2", "share"),
        ] {
            let e = Threshold::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
