//! Pass/fail thresholds of a scenario, written as in the scenario file:
//! `"purchase.success >= 0.999"`, `"purchase.p99 <= 500ms"`,
//! `"all.timeout <= 0.01"`. The left side is a tier name (or `all`) and a
//! metric; latency metrics take a duration, the others a share in 0..=1.
//!
//! A drill's own facts stand alone on the left: `"duplicates <= 0"`,
//! `"lost_purchases <= 0"`, `"reloads_failed <= 0"`,
//! `"reloads_applied >= 100"` (counts), `"time_to_failover <= 2s"` (a
//! duration), and a soak's `"rss_growth <= 0.1"` (a fitted growth over the
//! run, as a share of the starting value; also `fds_growth`,
//! `threads_growth`, `p99_growth`). They need the scenario's topology.

use std::fmt;

use serde::Serialize;

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
    /// A fact of the drill rather than of a tier ([`Facts`]).
    Fact(Fact),
}

/// What a drill measures beyond the load generator's counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fact {
    /// Request ids a backend saw more than once for a non-idempotent
    /// request: a purchase processed twice.
    Duplicates,
    /// Purchases that ended in an error or a timeout: the shopper cannot
    /// know whether they were charged (a shed purchase was refused cleanly
    /// and counts in `purchase.shed`).
    LostPurchases,
    /// Reload edits that did not end as expected: a valid edit that was not
    /// applied, or a broken one that was.
    ReloadsFailed,
    /// Valid reload edits that k2proxy applied.
    ReloadsApplied,
    /// After a fault, how long purchases kept failing (ms; the longest over
    /// the run's faults).
    TimeToFailover,
    /// Fitted growth over a soak, as a share of the starting value.
    Growth(Trend),
}

/// What a soak samples from k2proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    Rss,
    Fds,
    Threads,
    /// The purchase p99 of each sample's window.
    P99,
}

impl Trend {
    pub const ALL: [Trend; 4] = [Trend::Rss, Trend::Fds, Trend::Threads, Trend::P99];

    pub fn name(self) -> &'static str {
        match self {
            Trend::Rss => "rss",
            Trend::Fds => "fds",
            Trend::Threads => "threads",
            Trend::P99 => "p99",
        }
    }
}

impl Fact {
    fn parse(s: &str) -> Option<Fact> {
        Some(match s {
            "duplicates" => Fact::Duplicates,
            "lost_purchases" => Fact::LostPurchases,
            "reloads_failed" => Fact::ReloadsFailed,
            "reloads_applied" => Fact::ReloadsApplied,
            "time_to_failover" => Fact::TimeToFailover,
            _ => {
                let trend = s.strip_suffix("_growth")?;
                Fact::Growth(*Trend::ALL.iter().find(|t| t.name() == trend)?)
            }
        })
    }
}

/// The drill's facts, as far as it could measure them (None: not measured,
/// e.g. no topology, or no soak sampling).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Facts {
    pub duplicates: Option<u64>,
    pub lost_purchases: Option<u64>,
    pub reloads_failed: Option<u64>,
    pub reloads_applied: Option<u64>,
    pub time_to_failover_ms: Option<f64>,
    pub growth: std::collections::BTreeMap<Trend, f64>,
}

impl Facts {
    fn get(&self, fact: Fact) -> Option<f64> {
        match fact {
            Fact::Duplicates => self.duplicates.map(|n| n as f64),
            Fact::LostPurchases => self.lost_purchases.map(|n| n as f64),
            Fact::ReloadsFailed => self.reloads_failed.map(|n| n as f64),
            Fact::ReloadsApplied => self.reloads_applied.map(|n| n as f64),
            Fact::TimeToFailover => self.time_to_failover_ms,
            Fact::Growth(t) => self.growth.get(&t).copied(),
        }
    }
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
        matches!(
            self,
            Metric::Latency(_) | Metric::ShedP99 | Metric::Fact(Fact::TimeToFailover)
        )
    }

    /// A count or a growth: any number from 0 up, not a share.
    fn is_unbounded(self) -> bool {
        matches!(self, Metric::Fact(f) if f != Fact::TimeToFailover)
    }
}

/// One threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub text: String,
    /// Empty for a drill's fact.
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
        let lhs = lhs.trim();
        let (tier, metric) = match (Fact::parse(lhs), lhs.rsplit_once('.')) {
            (Some(f), _) => ("", Metric::Fact(f)),
            (None, Some((tier, metric))) => {
                let metric = Metric::parse(metric).ok_or_else(|| {
                    format!(
                        "{s:?}: unknown metric {metric:?}; expected success, shed, rate_limited, error, timeout, p50, p90, p99, p999, max or shed_p99"
                    )
                })?;
                (tier, metric)
            }
            (None, None) => return Err(format!(
                "{s:?}: {expected}, or a drill's duplicates, lost_purchases, reloads_failed, reloads_applied, time_to_failover, rss_growth, fds_growth, threads_growth or p99_growth"
            )),
        };
        let rhs = rhs.trim().trim_matches('"');
        let value = if metric.is_unbounded() {
            rhs.parse::<f64>()
                .ok()
                .filter(|v| *v >= 0.0)
                .ok_or_else(|| format!("{s:?}: {rhs:?} must be a number from 0 up"))?
        } else if metric.is_latency() {
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
            Metric::Fact(_) => f64::NAN,
        }
    }

    /// Checks the threshold against a report and the drill's facts.
    pub fn check(&self, report: &Report, facts: &Facts) -> Verdict {
        if let Metric::Fact(f) = self.metric {
            let actual = facts.get(f);
            let pass = actual.is_some_and(|v| self.holds(v));
            return Verdict {
                threshold: self.clone(),
                actual,
                pass,
            };
        }
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
        let pass = !empty && self.holds(actual);
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

impl Threshold {
    fn holds(&self, actual: f64) -> bool {
        if self.at_least {
            actual >= self.value
        } else {
            actual <= self.value
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.threshold;
        match self.actual {
            None if t.tier.is_empty() => write!(
                f,
                "{}: not measured (a drill's facts need its [topology]; growth needs [soak])",
                t.text
            ),
            None => write!(f, "{}: no tier {:?} in the run", t.text, t.tier),
            Some(v) if t.metric.is_latency() => write!(f, "{}: measured {v:.1}ms", t.text),
            Some(v) if t.metric.is_unbounded() => write!(f, "{}: measured {v}", t.text),
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
            ("duplicates <= -1", "from 0 up"),
            ("leaks <= 0", "a drill's duplicates"),
            ("time_to_failover <= 2", "not a duration"),
        ] {
            let e = Threshold::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn empty_report() -> Report {
        Report {
            targets: Vec::new(),
            send_lag: crate::openloop::histogram(),
            elapsed: std::time::Duration::ZERO,
            timeline: Vec::new(),
            offered_rate: Vec::new(),
            events: Vec::new(),
            failures: Vec::new(),
        }
    }

    #[test]
    fn a_drills_facts_pass_or_fail_its_thresholds_and_unmeasured_ones_fail() {
        let report = empty_report();
        let facts = Facts {
            duplicates: Some(1),
            lost_purchases: Some(0),
            reloads_failed: Some(0),
            reloads_applied: Some(150),
            time_to_failover_ms: Some(2500.0),
            growth: [(Trend::Rss, 0.02)].into(),
        };
        let verdict = |t: &str| Threshold::parse(t).unwrap().check(&report, &facts);
        assert!(!verdict("duplicates <= 0").pass, "a duplicate fails");
        assert!(verdict("lost_purchases <= 0").pass);
        assert!(verdict("reloads_failed <= 0").pass);
        assert!(verdict("reloads_applied >= 150").pass);
        assert!(!verdict("reloads_applied >= 151").pass);
        assert!(!verdict("time_to_failover <= 2s").pass);
        assert!(verdict("time_to_failover <= 3s").pass);
        assert!(verdict("rss_growth <= 0.05").pass);
        let unmeasured = verdict("fds_growth <= 0.05");
        assert!(!unmeasured.pass);
        assert!(
            unmeasured.to_string().contains("not measured"),
            "{unmeasured}"
        );
        let none = Facts::default();
        assert!(
            !Threshold::parse("duplicates <= 0")
                .unwrap()
                .check(&report, &none)
                .pass
        );
    }
}
