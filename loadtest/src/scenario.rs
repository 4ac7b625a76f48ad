//! Scenario files: one TOML file describes a whole drill — the load profile,
//! the tier mix and each tier's request, optionally the topology to bring up
//! (simulated sites and k2proxy), fault and reload events, and thresholds.
//! The format is documented in docs/loadtest.md; a bad file is refused with
//! `file:line:col` and what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::header::HeaderName;
use hyper::Method;
use serde::Deserialize;
use toml::Spanned;

use crate::openloop::{Load, Request};
use crate::schedule::{Schedule, Stage};
use crate::sim::{Dist, Fault, SimConfig};
use crate::template::Template;
use crate::thresholds::Threshold;

/// A duration written as in humantime: `500ms`, `2s`, `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Dur, String> {
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| format!("{s:?}: {e}; expected a duration such as 500ms, 10s or 2m"))
    }
}

/// A rate: requests per second (`400`) or a multiple of the capacity (`"2x"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawRate")]
pub enum Rate {
    PerSecond(f64),
    TimesCapacity(f64),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawRate {
    Number(f64),
    Text(String),
}

impl TryFrom<RawRate> for Rate {
    type Error = String;
    fn try_from(r: RawRate) -> Result<Rate, String> {
        let bad = |s: &str| {
            format!("{s:?}: expected requests per second (400) or a multiple of capacity (\"2x\")")
        };
        let rate = match r {
            RawRate::Number(n) => Rate::PerSecond(n),
            RawRate::Text(s) => match s.trim().strip_suffix('x') {
                Some(x) => Rate::TimesCapacity(x.trim().parse().map_err(|_| bad(&s))?),
                None => Rate::PerSecond(s.trim().parse().map_err(|_| bad(&s))?),
            },
        };
        let v = match rate {
            Rate::PerSecond(v) | Rate::TimesCapacity(v) => v,
        };
        if !(0.0..=1_000_000.0).contains(&v) {
            return Err(format!("rate {v}: expected 0 to 1000000"));
        }
        Ok(rate)
    }
}

impl Rate {
    fn per_second(self, capacity: Option<f64>) -> Result<f64, String> {
        match (self, capacity) {
            (Rate::PerSecond(r), _) => Ok(r),
            (Rate::TimesCapacity(x), Some(c)) => Ok(x * c),
            (Rate::TimesCapacity(_), None) => Err(
                "a rate in multiples of capacity (\"2x\") needs [load] capacity = N or simulated sites in [topology]"
                    .into(),
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<String>,
    description: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    timeout: Option<Dur>,
    #[serde(default)]
    thresholds: Vec<Spanned<String>>,
    load: RawLoad,
    mix: BTreeMap<String, Spanned<f64>>,
    #[serde(default)]
    tiers: BTreeMap<String, Spanned<RawTier>>,
    topology: Option<RawTopology>,
    #[serde(default)]
    events: Vec<Spanned<RawEvent>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    capacity: Option<f64>,
    stages: Vec<Spanned<RawStage>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    duration: Dur,
    rate: Option<Rate>,
    from: Option<Rate>,
    to: Option<Rate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    method: Option<String>,
    path: Template,
    #[serde(default)]
    headers: BTreeMap<String, Template>,
    body: Option<Template>,
    #[serde(default)]
    idempotency_key: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    routes: String,
    policy: Option<String>,
    #[serde(default = "yes")]
    admission: bool,
    #[serde(default)]
    sites: BTreeMap<String, Spanned<RawSite>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    #[serde(default = "one")]
    backends: usize,
    workers: usize,
    service: Dist,
    #[serde(default)]
    classes: BTreeMap<String, Dist>,
    #[serde(default)]
    queue: usize,
    #[serde(default)]
    collapse: f64,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at: Dur,
    every: Option<Dur>,
    until: Option<Dur>,
    site: Option<String>,
    fault: Option<String>,
    factor: Option<f64>,
    rate: Option<f64>,
    #[serde(default)]
    health: bool,
    reload: Option<Vec<String>>,
}

/// One tier's share of the mix and its request.
#[derive(Debug, Clone)]
pub struct TierSpec {
    pub name: String,
    pub weight: f64,
    pub method: Method,
    /// Path and query, appended to the target's base URL.
    pub path: Template,
    pub headers: Vec<(HeaderName, Template)>,
    pub body: Option<Template>,
    pub idempotency_key: bool,
}

/// A simulated site: `backends` legacy-sims, each like `sim`.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub name: String,
    pub backends: usize,
    pub sim: SimConfig,
}

/// What the scenario brings up.
#[derive(Debug, Clone)]
pub struct TopologySpec {
    pub routes: PathBuf,
    pub policy: Option<PathBuf>,
    /// False: every cluster's admission runs with `mode = "off"`.
    pub admission: bool,
    pub sites: Vec<SiteSpec>,
}

/// What an event does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Every simulator of the site plays the fault.
    Fault { site: String, fault: Fault },
    /// Rewrites routes.toml to use this policy (k2proxy's file watcher
    /// reloads it).
    Reload { policy: PathBuf },
}

/// An event at a time into the load.
#[derive(Debug, Clone, PartialEq)]
pub struct Occurrence {
    pub at: Duration,
    pub action: Action,
}

/// A loaded, checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub seed: u64,
    pub timeout: Duration,
    stages: Vec<(Duration, Rate, Rate)>,
    capacity: Option<f64>,
    pub tiers: Vec<TierSpec>,
    pub topology: Option<TopologySpec>,
    pub events: Vec<Occurrence>,
    pub thresholds: Vec<Threshold>,
}

/// `file:line:col` of a byte offset.
fn locate(path: &Path, text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{}:{line}:{col}", path.display())
}

impl Scenario {
    /// Reads and checks a scenario file; all problems at once, one per line.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the scenario: {e}", path.display()))?;
        Scenario::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Scenario, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or_else(
                || path.display().to_string(),
                |s| locate(path, text, s.start),
            );
            format!("{at}: error: {}", e.message().trim())
        })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut errors = Vec::new();
        let mut err = |offset: usize, msg: String| {
            errors.push(format!("{}: error: {msg}", locate(path, text, offset)));
        };

        let mut stages = Vec::new();
        for s in &raw.load.stages {
            let at = s.span().start;
            let st = s.get_ref();
            match (st.rate, st.from, st.to) {
                (Some(r), None, None) => stages.push((st.duration.0, r, r)),
                (None, Some(f), Some(t)) => stages.push((st.duration.0, f, t)),
                _ => err(
                    at,
                    "a stage has either `rate` (constant) or `from` and `to` (a ramp)".into(),
                ),
            }
            if st.duration.0.is_zero() || st.duration.0 > Duration::from_secs(6 * 3600) {
                err(at, "a stage lasts from 1ms to 6h".into());
            }
        }
        if raw.load.stages.is_empty() {
            err(0, "[load] stages is empty: give at least one stage".into());
        }

        let mut tiers = Vec::new();
        for (name, weight) in &raw.mix {
            if !(weight.get_ref().is_finite() && *weight.get_ref() >= 0.0) {
                err(
                    weight.span().start,
                    format!("mix weight of {name:?} must be a non-negative number"),
                );
            }
            let Some(t) = raw.tiers.get(name) else {
                err(
                    weight.span().start,
                    format!("tier {name:?} is in [mix] but has no [tiers.{name}] request"),
                );
                continue;
            };
            let at = t.span().start;
            let t = t.get_ref();
            let method =
                match t
                    .method
                    .as_deref()
                    .unwrap_or(if t.body.is_some() { "POST" } else { "GET" })
                {
                    m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD") => {
                        Method::from_bytes(m.as_bytes()).expect("static method")
                    }
                    other => {
                        err(
                            at,
                            format!(
                                "method {other:?}: expected GET, POST, PUT, DELETE, PATCH or HEAD"
                            ),
                        );
                        Method::GET
                    }
                };
            if !t
                .path
                .render(0, "x", &mut crate::schedule::Mix::new(&[1.0], 0))
                .starts_with('/')
            {
                err(at, format!("[tiers.{name}] path must start with /"));
            }
            let mut headers = Vec::new();
            for (k, v) in &t.headers {
                match k.parse::<HeaderName>() {
                    Ok(h) => headers.push((h, v.clone())),
                    Err(_) => err(
                        at,
                        format!("[tiers.{name}] header name {k:?} is not a valid HTTP header name"),
                    ),
                }
            }
            tiers.push(TierSpec {
                name: name.clone(),
                weight: *weight.get_ref(),
                method,
                path: t.path.clone(),
                headers,
                body: t.body.clone(),
                idempotency_key: t.idempotency_key,
            });
        }
        for (name, t) in &raw.tiers {
            if !raw.mix.contains_key(name) {
                err(
                    t.span().start,
                    format!("[tiers.{name}] is not in [mix]: give it a weight"),
                );
            }
        }
        if tiers.iter().map(|t| t.weight).sum::<f64>() <= 0.0 {
            err(
                0,
                "[mix] needs at least one tier with a positive weight".into(),
            );
        }

        let topology = raw.topology.as_ref().map(|t| {
            let sites = t
                .sites
                .iter()
                .map(|(name, s)| {
                    let at = s.span().start;
                    let s = s.get_ref();
                    if s.workers == 0 || s.backends == 0 || s.backends > 64 {
                        err(at, format!("site {name:?}: workers must be at least 1 and backends from 1 to 64"));
                    }
                    if !(0.0..=100.0).contains(&s.collapse) {
                        err(at, format!("site {name:?}: collapse must lie in 0..=100"));
                    }
                    SiteSpec {
                        name: name.clone(),
                        backends: s.backends,
                        sim: SimConfig {
                            name: name.clone(),
                            workers: s.workers,
                            service: s.service.clone(),
                            classes: s.classes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                            queue: s.queue,
                            collapse: s.collapse,
                        },
                    }
                })
                .collect();
            TopologySpec {
                routes: dir.join(&t.routes),
                policy: t.policy.as_ref().map(|p| dir.join(p)),
                admission: t.admission,
                sites,
            }
        });

        let mut events = Vec::new();
        let total: Duration = stages.iter().map(|s| s.0).sum();
        for e in &raw.events {
            let at = e.span().start;
            let ev = e.get_ref();
            let action = match (&ev.fault, &ev.reload) {
                (Some(f), None) => {
                    let fault = match f.as_str() {
                        "normal" | "recover" => Fault::None,
                        "refuse" => Fault::Refuse,
                        "hang" => Fault::Hang,
                        "slow" => Fault::Slow(ev.factor.unwrap_or(2.0)),
                        "errors" => Fault::Errors {
                            rate: ev.rate.unwrap_or(1.0),
                            health: ev.health,
                        },
                        other => {
                            err(at, format!("fault {other:?}: expected refuse, hang, slow, errors or normal"));
                            continue;
                        }
                    };
                    if let Fault::Slow(f) = fault {
                        if !(1.0..=1000.0).contains(&f) {
                            err(at, "factor must lie in 1..=1000".into());
                        }
                    }
                    if let Fault::Errors { rate, .. } = fault {
                        if !(0.0..=1.0).contains(&rate) {
                            err(at, "rate must lie in 0..=1".into());
                        }
                    }
                    let Some(site) = ev.site.clone() else {
                        err(
                            at,
                            "a fault event names the `site` whose simulators play it".into(),
                        );
                        continue;
                    };
                    match &topology {
                        Some(t) if t.sites.iter().any(|s| s.name == site) => {}
                        _ => {
                            err(
                                at,
                                format!(
                                    "site {site:?} is not a simulated site in [topology.sites]"
                                ),
                            );
                            continue;
                        }
                    }
                    vec![Action::Fault { site, fault }]
                }
                (None, Some(policies)) if !policies.is_empty() => {
                    if topology.is_none() {
                        err(at, "a reload event needs a [topology] with k2proxy".into());
                        continue;
                    }
                    policies
                        .iter()
                        .map(|p| Action::Reload {
                            policy: dir.join(p),
                        })
                        .collect()
                }
                _ => {
                    err(at, "an event has either `fault` (with `site`) or `reload` (a list of policy files)".into());
                    continue;
                }
            };
            let until = ev.until.map_or(ev.at.0, |u| u.0);
            match ev.every {
                Some(every) if every.0 < Duration::from_millis(100) => {
                    err(at, "`every` is at least 100ms".into());
                }
                Some(every) => {
                    let mut t = ev.at.0;
                    let mut k = 0;
                    while t <= until && t <= total {
                        events.push(Occurrence {
                            at: t,
                            action: action[k % action.len()].clone(),
                        });
                        t += every.0;
                        k += 1;
                    }
                }
                None => events.extend(action.into_iter().take(1).map(|a| Occurrence {
                    at: ev.at.0,
                    action: a,
                })),
            }
        }
        events.sort_by_key(|o| o.at);

        let mut thresholds = Vec::new();
        for t in &raw.thresholds {
            match Threshold::parse(t.get_ref()) {
                Ok(th) if th.tier == "all" || raw.mix.contains_key(&th.tier) => thresholds.push(th),
                Ok(th) => err(
                    t.span().start,
                    format!(
                        "threshold {:?} names tier {:?}, which is not in [mix]",
                        th.text, th.tier
                    ),
                ),
                Err(e) => err(t.span().start, e),
            }
        }

        let timeout = raw.timeout.map_or(Duration::from_secs(5), |d| d.0);
        if timeout.is_zero() || timeout > Duration::from_secs(300) {
            err(0, "timeout must lie between 1ms and 5m".into());
        }
        let scenario = Scenario {
            name: raw.name.clone().unwrap_or_else(|| {
                path.file_stem()
                    .map_or("scenario".into(), |s| s.to_string_lossy().into_owned())
            }),
            description: raw.description.clone().unwrap_or_default(),
            path: path.to_path_buf(),
            seed: raw.seed.unwrap_or(1),
            timeout,
            stages,
            capacity: raw.load.capacity,
            tiers,
            topology,
            events,
            thresholds,
        };
        if let Err(e) = scenario.schedule() {
            err(raw.load.stages.first().map_or(0, |s| s.span().start), e);
        }
        if errors.is_empty() {
            Ok(scenario)
        } else {
            Err(errors.join("\n"))
        }
    }

    /// The capacity "1x" means: `[load] capacity`, or else the simulated
    /// capacity of the first site in routes order that has simulators (the
    /// preferred site), summed over its backends.
    pub fn capacity(&self) -> Option<f64> {
        self.capacity.or_else(|| {
            let t = self.topology.as_ref()?;
            let s = t.sites.first()?;
            Some(self.site_capacity(&s.sim) * s.backends as f64)
        })
    }

    /// One simulator's capacity under this scenario's tier mix.
    pub fn site_capacity(&self, sim: &SimConfig) -> f64 {
        let mix: Vec<(&str, f64)> = self
            .tiers
            .iter()
            .map(|t| (t.path.source(), t.weight))
            .collect();
        sim.capacity_for(&mix)
    }

    /// Sets the capacity unless the file gives one (the topology knows the
    /// preferred site).
    pub fn with_capacity(mut self, capacity: Option<f64>) -> Scenario {
        if self.capacity.is_none() {
            self.capacity = capacity;
        }
        self
    }

    /// The arrival schedule in requests per second.
    pub fn schedule(&self) -> Result<Schedule, String> {
        let cap = self.capacity();
        let mut stages = Vec::new();
        for (duration, from, to) in &self.stages {
            let (from, to) = (from.per_second(cap)?, to.per_second(cap)?);
            stages.push(if from == to {
                Stage::Constant {
                    duration: *duration,
                    rate: from,
                }
            } else {
                Stage::Ramp {
                    duration: *duration,
                    from,
                    to,
                }
            });
        }
        let schedule = Schedule { stages };
        if schedule.peak() > 100_000.0 {
            return Err(format!(
                "peak rate {:.0}/s: at most 100000 requests/s",
                schedule.peak()
            ));
        }
        Ok(schedule)
    }

    /// The load against `base` (`http://host:port`).
    pub fn load_against(&self, base: &str) -> Result<Load, String> {
        let base = base.trim_end_matches('/');
        let requests = self
            .tiers
            .iter()
            .map(|t| {
                let url = Template::parse(&format!("{base}{}", t.path.source()))?;
                Ok(Request {
                    name: t.name.clone(),
                    weight: t.weight,
                    method: t.method.clone(),
                    url,
                    headers: t.headers.clone(),
                    body: t.body.clone(),
                    idempotency_header: t
                        .idempotency_key
                        .then(|| HeaderName::from_static("idempotency-key")),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // Every URL must be one hyper accepts.
        for r in &requests {
            let sample = r
                .url
                .render(0, "lt-0-0", &mut crate::schedule::Mix::new(&[1.0], 0));
            sample
                .parse::<hyper::Uri>()
                .map_err(|e| format!("tier {}: {sample:?} is not a valid URL: {e}", r.name))?;
        }
        Ok(Load {
            requests,
            schedule: self.schedule()?,
            timeout: self.timeout,
            seed: self.seed,
        })
    }
}
