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

use crate::openloop::{Load, Request, DEFAULT_CLIENTS, MAX_CLIENTS};
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
    soak: Option<Spanned<RawSoak>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSoak {
    sample: Dur,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    capacity: Option<f64>,
    clients: Option<Spanned<usize>>,
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
    /// k2proxy instances in front of the same simulators, behind an L4
    /// balancer (default 1).
    proxies: Option<Spanned<usize>>,
    /// `[server]` settings for the run, over routes.toml's.
    #[serde(default)]
    server: Option<Spanned<toml::Table>>,
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
    reject: Option<Vec<String>>,
    via: Option<Vec<Spanned<String>>>,
    restart: Option<Spanned<i64>>,
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
    /// k2proxy instances, each with its own controller, behind an L4
    /// balancer that spreads connections round-robin.
    pub proxies: usize,
    /// `[topology.server]`: routes.toml's `[server]` settings overridden
    /// for the run (k2proxy checks them when it starts).
    pub server: toml::Table,
    pub sites: Vec<SiteSpec>,
}

/// What an event does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Every simulator of the site plays the fault.
    Fault { site: String, fault: Fault },
    /// Rewrites routes.toml to use this policy and asks k2proxy to reload
    /// (`via`); the drill checks that a `valid` edit is applied and a broken
    /// one refused while the running config keeps serving.
    Reload {
        policy: PathBuf,
        valid: bool,
        via: Via,
    },
    /// Stops k2proxy instance `proxy` as a deploy does (SIGTERM: it
    /// drains, then stops) and starts it again on the same ports, cold;
    /// the balancer sends it nothing while its `/healthz` is not 200.
    Restart { proxy: usize },
}

/// How a reload event asks k2proxy to reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// k2proxy's file watcher sees the edit.
    File,
    /// SIGHUP after the edit.
    Sighup,
    /// `POST /reload` on the admin port after the edit.
    Post,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::File => "file",
            Via::Sighup => "sighup",
            Via::Post => "post",
        }
    }
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
    /// `[load] clients`: independent clients the load comes from.
    clients: usize,
    pub tiers: Vec<TierSpec>,
    pub topology: Option<TopologySpec>,
    pub events: Vec<Occurrence>,
    pub thresholds: Vec<Threshold>,
    /// `[soak] sample`: sample k2proxy's RSS, open files, threads and the
    /// purchase p99 this often, and fit their trends.
    pub soak_sample: Option<Duration>,
}

/// A scenario file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{}: cannot read the scenario: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every problem of the file, one per line.
    #[error("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<Problem> },
}

/// One problem, where it is and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: error: {message}", at(file, *position))]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based (line, column in characters); `None` for the file as a whole.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

fn at(file: &Path, position: Option<(usize, usize)>) -> String {
    match position {
        Some((line, col)) => format!("{}:{line}:{col}", file.display()),
        None => file.display().to_string(),
    }
}

/// 1-based line and column (in characters, as an editor counts them) of a
/// byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Collects the problems of one file.
struct Check<'a> {
    path: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Check<'_> {
    /// A problem at byte `offset` (0: the file's start).
    fn err(&mut self, offset: usize, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.path.to_path_buf(),
            position: Some(line_col(self.text, offset)),
            message: message.into(),
        });
    }
}

impl Scenario {
    /// Reads and checks a scenario file; all problems at once, one per line.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Scenario::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ScenarioError::Invalid {
            problems: vec![Problem {
                file: path.to_path_buf(),
                position: e.span().map(|s| line_col(text, s.start)),
                message: e.message().trim().to_string(),
            }],
        })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut c = Check {
            path,
            text,
            problems: Vec::new(),
        };
        let stages = stages(&mut c, &raw.load);
        let tiers = tiers(&mut c, &raw);
        let topology = raw.topology.as_ref().map(|t| topology(&mut c, t, &dir));
        let total: Duration = stages.iter().map(|s| s.0).sum();
        let events = events(&mut c, &raw.events, topology.as_ref(), total, &dir);
        let thresholds = thresholds(&mut c, &raw);
        let soak_sample = raw.soak.as_ref().map(|s| {
            let sample = s.get_ref().sample.0;
            if sample < Duration::from_secs(1) || topology.is_none() {
                c.err(
                    s.span().start,
                    "[soak] samples k2proxy (needs a [topology]) at most once a second: sample = \"60s\"",
                );
            }
            sample
        });
        let clients = clients(&mut c, &raw.load);
        let timeout = raw.timeout.map_or(Duration::from_secs(5), |d| d.0);
        if timeout.is_zero() || timeout > Duration::from_secs(300) {
            c.err(0, "timeout must lie between 1ms and 5m");
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
            clients,
            tiers,
            topology,
            events,
            thresholds,
            soak_sample,
        };
        if let Err(e) = scenario.schedule() {
            c.err(raw.load.stages.first().map_or(0, |s| s.span().start), e);
        }
        if c.problems.is_empty() {
            Ok(scenario)
        } else {
            Err(ScenarioError::Invalid {
                problems: c.problems,
            })
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

    /// The scenario's length: its stages' durations summed.
    pub fn duration(&self) -> Duration {
        self.stages.iter().map(|s| s.0).sum()
    }

    /// The scenario played over and over until `total` (a soak of any
    /// length from a file that describes one cycle): its stages and its
    /// events repeat with the cycle's length, the last cycle cut at `total`.
    pub fn repeated(mut self, total: Duration) -> Scenario {
        let cycle = self.duration();
        if cycle.is_zero() {
            return self;
        }
        let (stages, events) = (self.stages.clone(), self.events.clone());
        self.stages.clear();
        self.events.clear();
        let mut start = Duration::ZERO;
        while start < total {
            let cycle_start = start;
            for &(d, from, to) in &stages {
                let left = total.saturating_sub(start);
                if left.is_zero() {
                    break;
                }
                self.stages.push((d.min(left), from, to));
                start += d.min(left);
            }
            self.events.extend(
                events
                    .iter()
                    .filter(|e| cycle_start + e.at < total)
                    .map(|e| Occurrence {
                        at: cycle_start + e.at,
                        action: e.action.clone(),
                    }),
            );
        }
        self
    }

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
            clients: self.clients,
        })
    }
}

/// `[load] clients`: 1 to [`MAX_CLIENTS`], [`DEFAULT_CLIENTS`] unless given.
fn clients(c: &mut Check<'_>, load: &RawLoad) -> usize {
    load.clients.as_ref().map_or(DEFAULT_CLIENTS, |n| {
        if !(1..=MAX_CLIENTS).contains(n.get_ref()) {
            c.err(
                n.span().start,
                format!(
                    "clients must lie in 1..={MAX_CLIENTS} (independent clients, each with its own connections)"
                ),
            );
        }
        *n.get_ref()
    })
}

/// `[load] stages`: each a constant rate or a ramp, 1ms to 6h long.
fn stages(c: &mut Check<'_>, load: &RawLoad) -> Vec<(Duration, Rate, Rate)> {
    let mut out = Vec::new();
    for s in &load.stages {
        let at = s.span().start;
        let st = s.get_ref();
        match (st.rate, st.from, st.to) {
            (Some(r), None, None) => out.push((st.duration.0, r, r)),
            (None, Some(f), Some(t)) => out.push((st.duration.0, f, t)),
            _ => c.err(
                at,
                "a stage has either `rate` (constant) or `from` and `to` (a ramp)",
            ),
        }
        if st.duration.0.is_zero() || st.duration.0 > Duration::from_secs(6 * 3600) {
            c.err(at, "a stage lasts from 1ms to 6h");
        }
    }
    if load.stages.is_empty() {
        c.err(0, "[load] stages is empty: give at least one stage");
    }
    out
}

/// `[mix]` and `[tiers.<name>]`: every tier in the mix has a request and
/// every request a weight.
fn tiers(c: &mut Check<'_>, raw: &Raw) -> Vec<TierSpec> {
    let mut out = Vec::new();
    for (name, weight) in &raw.mix {
        if !(weight.get_ref().is_finite() && *weight.get_ref() >= 0.0) {
            c.err(
                weight.span().start,
                format!("mix weight of {name:?} must be a non-negative number"),
            );
        }
        let Some(t) = raw.tiers.get(name) else {
            c.err(
                weight.span().start,
                format!("tier {name:?} is in [mix] but has no [tiers.{name}] request"),
            );
            continue;
        };
        out.push(tier(c, name, *weight.get_ref(), t));
    }
    for (name, t) in &raw.tiers {
        if !raw.mix.contains_key(name) {
            c.err(
                t.span().start,
                format!("[tiers.{name}] is not in [mix]: give it a weight"),
            );
        }
    }
    if out.iter().map(|t| t.weight).sum::<f64>() <= 0.0 {
        c.err(0, "[mix] needs at least one tier with a positive weight");
    }
    out
}

/// One `[tiers.<name>]` request.
fn tier(c: &mut Check<'_>, name: &str, weight: f64, t: &Spanned<RawTier>) -> TierSpec {
    let at = t.span().start;
    let t = t.get_ref();
    let default = if t.body.is_some() { "POST" } else { "GET" };
    let method = match t.method.as_deref().unwrap_or(default) {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD") => {
            Method::from_bytes(m.as_bytes()).expect("static method")
        }
        other => {
            c.err(
                at,
                format!("method {other:?}: expected GET, POST, PUT, DELETE, PATCH or HEAD"),
            );
            Method::GET
        }
    };
    let sample = t
        .path
        .render(0, "x", &mut crate::schedule::Mix::new(&[1.0], 0));
    if !sample.starts_with('/') {
        c.err(at, format!("[tiers.{name}] path must start with /"));
    }
    let mut headers = Vec::new();
    for (k, v) in &t.headers {
        match k.parse::<HeaderName>() {
            Ok(h) => headers.push((h, v.clone())),
            Err(_) => c.err(
                at,
                format!("[tiers.{name}] header name {k:?} is not a valid HTTP header name"),
            ),
        }
    }
    TierSpec {
        name: name.to_string(),
        weight,
        method,
        path: t.path.clone(),
        headers,
        body: t.body.clone(),
        idempotency_key: t.idempotency_key,
    }
}

/// The most k2proxy instances a topology starts (each is a process with its
/// own threads on this machine).
const MAX_PROXIES: usize = 16;

/// `[topology]`: files relative to the scenario, simulated sites.
fn topology(c: &mut Check<'_>, t: &RawTopology, dir: &Path) -> TopologySpec {
    let sites = t
        .sites
        .iter()
        .map(|(name, s)| {
            let at = s.span().start;
            let s = s.get_ref();
            if s.workers == 0 || s.backends == 0 || s.backends > 64 {
                c.err(
                    at,
                    format!("site {name:?}: workers must be at least 1 and backends from 1 to 64"),
                );
            }
            if !(0.0..=100.0).contains(&s.collapse) {
                c.err(at, format!("site {name:?}: collapse must lie in 0..=100"));
            }
            SiteSpec {
                name: name.clone(),
                backends: s.backends,
                sim: SimConfig {
                    name: name.clone(),
                    workers: s.workers,
                    service: s.service.clone(),
                    classes: s
                        .classes
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    queue: s.queue,
                    collapse: s.collapse,
                },
            }
        })
        .collect();
    let proxies = t.proxies.as_ref().map_or(1, |p| {
        if !(1..=MAX_PROXIES).contains(p.get_ref()) {
            c.err(
                p.span().start,
                format!(
                    "proxies must lie in 1..={MAX_PROXIES} (k2proxy instances behind one balancer)"
                ),
            );
        }
        *p.get_ref()
    });
    let server = t.server.as_ref().map_or_else(toml::Table::new, |table| {
        for key in table.get_ref().keys() {
            if HARNESS_SERVER_KEYS.contains(&key.as_str()) {
                c.err(
                    table.span().start,
                    format!("[topology.server] {key}: the harness sets it (free ports, the scenario's policy)"),
                );
            }
        }
        table.get_ref().clone()
    });
    TopologySpec {
        routes: dir.join(&t.routes),
        policy: t.policy.as_ref().map(|p| dir.join(p)),
        admission: t.admission,
        proxies,
        server,
        sites,
    }
}

/// `[server]` keys the harness writes itself, which `[topology.server]`
/// may not set.
const HARNESS_SERVER_KEYS: [&str; 4] = ["listen", "admin", "policy", "tls"];

/// `[[events]]`, expanded into occurrences in time order (`every` repeats
/// an event, cycling through its list of reloads).
fn events(
    c: &mut Check<'_>,
    raw: &[Spanned<RawEvent>],
    topology: Option<&TopologySpec>,
    total: Duration,
    dir: &Path,
) -> Vec<Occurrence> {
    let mut out = Vec::new();
    for e in raw {
        let at = e.span().start;
        let ev = e.get_ref();
        let edits = ev.reload.is_some() || ev.reject.is_some();
        let action = match (&ev.fault, edits, &ev.restart) {
            (Some(f), false, None) => fault(c, at, ev, f, topology).map(|a| vec![a]),
            (None, true, None) => reloads(c, at, ev, topology, dir),
            (None, false, Some(i)) => restart(c, i, topology).map(|a| vec![a]),
            _ => {
                c.err(at, "an event has one of `fault` (with `site`), `reload` (a list of policy files) or `restart` (an instance's number)");
                None
            }
        };
        let Some(action) = action else { continue };
        let until = ev.until.map_or(ev.at.0, |u| u.0);
        match ev.every {
            Some(every) if every.0 < Duration::from_millis(100) => {
                c.err(at, "`every` is at least 100ms");
            }
            Some(every) => {
                let (mut t, mut k) = (ev.at.0, 0);
                while t <= until && t <= total {
                    out.push(Occurrence {
                        at: t,
                        action: action[k % action.len()].clone(),
                    });
                    t += every.0;
                    k += 1;
                }
            }
            None => out.extend(action.into_iter().take(1).map(|a| Occurrence {
                at: ev.at.0,
                action: a,
            })),
        }
    }
    out.sort_by_key(|o| o.at);
    out
}

/// A reload event's edits: its `reload` files (valid) and `reject` files
/// (broken: k2proxy must refuse them), interleaved, each asked for by the
/// next of `via` in turn.
fn reloads(
    c: &mut Check<'_>,
    at: usize,
    ev: &RawEvent,
    topology: Option<&TopologySpec>,
    dir: &Path,
) -> Option<Vec<Action>> {
    if topology.is_none() {
        c.err(at, "a reload event needs a [topology] with k2proxy");
    }
    let mut vias = Vec::new();
    for v in ev.via.iter().flatten() {
        vias.push(match v.get_ref().as_str() {
            "file" => Via::File,
            "sighup" => Via::Sighup,
            "post" => Via::Post,
            other => {
                c.err(
                    v.span().start,
                    format!("via {other:?}: expected file, sighup or post"),
                );
                Via::File
            }
        });
    }
    if vias.is_empty() {
        vias.push(Via::File);
    }
    let (valid, broken) = (
        ev.reload.as_deref().unwrap_or_default(),
        ev.reject.as_deref().unwrap_or_default(),
    );
    if valid.is_empty() && broken.is_empty() {
        c.err(
            at,
            "a reload event lists policy files in `reload` (or broken ones in `reject`)",
        );
        return None;
    }
    let mut edits = Vec::new();
    for i in 0..valid.len().max(broken.len()) {
        edits.extend(valid.get(i).map(|p| (p, true)));
        edits.extend(broken.get(i).map(|p| (p, false)));
    }
    // Every edit meets every way to reload: round r shifts the ways by r
    // (a plain zip pairs 2 files with 2 ways the same way forever).
    let actions = (0..edits.len() * vias.len()).map(|k| {
        let (policy, valid) = edits[k % edits.len()];
        Action::Reload {
            policy: dir.join(policy),
            valid,
            via: vias[(k % edits.len() + k / edits.len()) % vias.len()],
        }
    });
    topology.map(|_| actions.collect())
}

/// A restart event: the instance's number, 0 to `proxies` - 1.
fn restart(
    c: &mut Check<'_>,
    proxy: &Spanned<i64>,
    topology: Option<&TopologySpec>,
) -> Option<Action> {
    let at = proxy.span().start;
    let Some(t) = topology else {
        c.err(at, "a restart event needs a [topology] with k2proxy");
        return None;
    };
    let n = t.proxies.max(1);
    match usize::try_from(*proxy.get_ref()) {
        Ok(i) if i < n => Some(Action::Restart { proxy: i }),
        _ => {
            c.err(
                at,
                format!(
                    "restart = {}: the topology has {n} instance(s), numbered 0 to {}",
                    proxy.get_ref(),
                    n - 1
                ),
            );
            None
        }
    }
}

/// A fault event: what the simulators of a simulated site play.
fn fault(
    c: &mut Check<'_>,
    at: usize,
    ev: &RawEvent,
    name: &str,
    topology: Option<&TopologySpec>,
) -> Option<Action> {
    let fault = match name {
        "normal" | "recover" => Fault::None,
        "refuse" => Fault::Refuse,
        "hang" => Fault::Hang,
        "blackhole" => Fault::Blackhole,
        "slow" => Fault::Slow(ev.factor.unwrap_or(2.0)),
        "errors" => Fault::Errors {
            rate: ev.rate.unwrap_or(1.0),
            health: ev.health,
        },
        other => {
            c.err(
                at,
                format!(
                    "fault {other:?}: expected refuse, blackhole, hang, slow, errors or normal"
                ),
            );
            return None;
        }
    };
    match fault {
        Fault::Slow(f) if !(1.0..=1000.0).contains(&f) => c.err(at, "factor must lie in 1..=1000"),
        Fault::Errors { rate, .. } if !(0.0..=1.0).contains(&rate) => {
            c.err(at, "rate must lie in 0..=1")
        }
        _ => {}
    }
    let Some(site) = ev.site.clone() else {
        c.err(
            at,
            "a fault event names the `site` whose simulators play it",
        );
        return None;
    };
    if !topology.is_some_and(|t| t.sites.iter().any(|s| s.name == site)) {
        c.err(
            at,
            format!("site {site:?} is not a simulated site in [topology.sites]"),
        );
        return None;
    }
    Some(Action::Fault { site, fault })
}

/// `thresholds`: each parsed, each naming `all` or a tier of the mix, or a
/// drill's fact (which needs the topology; a growth needs `[soak]`).
fn thresholds(c: &mut Check<'_>, raw: &Raw) -> Vec<Threshold> {
    let mut out = Vec::new();
    for t in &raw.thresholds {
        match Threshold::parse(t.get_ref()) {
            Ok(th) if th.tier.is_empty() => {
                if raw.topology.is_none() {
                    c.err(
                        t.span().start,
                        format!(
                            "threshold {:?} is a drill's fact: it needs a [topology]",
                            th.text
                        ),
                    );
                } else if th.text.contains("_growth") && raw.soak.is_none() {
                    c.err(
                        t.span().start,
                        format!(
                            "threshold {:?} is a soak's trend: it needs [soak] sample = \"60s\"",
                            th.text
                        ),
                    );
                }
                out.push(th);
            }
            Ok(th) if th.tier == "all" || raw.mix.contains_key(&th.tier) => out.push(th),
            Ok(th) => c.err(
                t.span().start,
                format!(
                    "threshold {:?} names tier {:?}, which is not in [mix]",
                    th.text, th.tier
                ),
            ),
            Err(e) => c.err(t.span().start, e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_from_one() {
        let text = "a = 1\nné = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // After "né = ": 5 characters, 6 bytes.
        let offset = text.find('"').unwrap();
        assert_eq!(line_col(text, offset), (2, 6));
        assert_eq!(line_col(text, 10_000), (3, 1), "past the end: the end");
        assert_eq!(line_col(text, 8), (2, 2), "inside a character: its start");
    }

    #[test]
    fn problems_read_as_file_line_col() {
        let p = Problem {
            file: PathBuf::from("s.toml"),
            position: Some((3, 7)),
            message: "bad".into(),
        };
        assert_eq!(p.to_string(), "s.toml:3:7: error: bad");
        let whole = Problem {
            position: None,
            ..p
        };
        assert_eq!(whole.to_string(), "s.toml: error: bad");
    }

    const STORM: &str = r#"
thresholds = ["reloads_failed <= 0", "duplicates <= 0"]
[load]
capacity = 100
stages = [{ duration = "10s", rate = "1x" }, { duration = "5s", rate = "2x" }]
[mix]
a = 1
[tiers.a]
path = "/a"
[topology]
routes = "routes.toml"
[topology.sites.s]
workers = 1
service = "10ms"
[[events]]
at = "1s"
every = "1s"
until = "12s"
reload = ["good-1.toml", "good-2.toml"]
reject = ["bad.toml"]
via = ["file", "post"]
[[events]]
at = "3s"
site = "s"
fault = "blackhole"
"#;

    fn storm() -> Scenario {
        Scenario::parse(Path::new("/x/storm.toml"), STORM).unwrap()
    }

    #[test]
    fn reload_edits_interleave_valid_and_broken_and_meet_every_way_to_ask() {
        let s = storm();
        let edits: Vec<(String, bool, Via)> = s
            .events
            .iter()
            .filter_map(|o| match &o.action {
                Action::Reload { policy, valid, via } => Some((
                    policy.file_name().unwrap().to_string_lossy().into_owned(),
                    *valid,
                    *via,
                )),
                _ => None,
            })
            .collect();
        assert_eq!(edits.len(), 12, "1 s to 12 s");
        let names: Vec<&str> = edits.iter().take(3).map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["good-1.toml", "bad.toml", "good-2.toml"]);
        assert!(!edits[1].1 && edits[0].1 && edits[2].1);
        // Six pairs of (file, way) in the first six edits: every file meets
        // both ways, though 3 files and 2 ways would pair alike if zipped.
        let mut pairs: Vec<(String, Via)> = edits[..6].iter().map(|e| (e.0.clone(), e.2)).collect();
        pairs.sort_by_key(|p| (p.0.clone(), p.1.name()));
        pairs.dedup();
        assert_eq!(pairs.len(), 6, "{pairs:?}");
    }

    #[test]
    fn a_repeated_scenario_cycles_its_stages_and_events_and_cuts_the_last() {
        let s = storm().repeated(Duration::from_secs(40));
        assert_eq!(s.duration(), Duration::from_secs(40));
        let faults: Vec<u64> = s
            .events
            .iter()
            .filter(|o| matches!(o.action, Action::Fault { .. }))
            .map(|o| o.at.as_secs())
            .collect();
        assert_eq!(faults, [3, 18, 33], "one per 15 s cycle");
        let peak = s.schedule().unwrap();
        assert_eq!(peak.rate_at(Duration::from_secs(12)), 200.0);
        assert_eq!(peak.rate_at(Duration::from_secs(31)), 100.0);
        assert_eq!(
            peak.rate_at(Duration::from_secs(39)),
            100.0,
            "cut in its first stage"
        );
        assert!(s.events.iter().all(|o| o.at < Duration::from_secs(40)));
        assert!(s.events.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn a_restart_names_an_instance_of_the_topology() {
        let fleet = STORM.replace(
            "routes = \"routes.toml\"\n",
            "routes = \"routes.toml\"\nproxies = 2\n",
        );
        let restart =
            |at: &str, n: &str| format!("{fleet}[[events]]\nat = \"{at}\"\nrestart = {n}\n");
        let s = Scenario::parse(Path::new("s.toml"), &restart("4s", "1")).unwrap();
        let restarts: Vec<(u64, &Action)> = s
            .events
            .iter()
            .filter(|o| matches!(o.action, Action::Restart { .. }))
            .map(|o| (o.at.as_secs(), &o.action))
            .collect();
        assert_eq!(restarts, [(4, &Action::Restart { proxy: 1 })]);
        // Instances count from 0: the line and column of the number.
        let e = Scenario::parse(Path::new("s.toml"), &restart("4s", "2")).unwrap_err();
        let line = restart("4s", "2").lines().count();
        assert!(
            e.to_string()
                .contains(&format!("s.toml:{line}:11: error: restart = 2: the topology has 2 instance(s), numbered 0 to 1")),
            "{e}"
        );
        let e = Scenario::parse(Path::new("s.toml"), &restart("4s", "-1")).unwrap_err();
        assert!(e.to_string().contains("restart = -1"), "{e}");
        // One thing per event.
        let both = format!(
            "{fleet}[[events]]\nat = \"4s\"\nrestart = 0\nsite = \"s\"\nfault = \"refuse\"\n"
        );
        let e = Scenario::parse(Path::new("s.toml"), &both).unwrap_err();
        assert!(e.to_string().contains("one of `fault`"), "{e}");
    }

    #[test]
    fn topology_server_settings_override_the_routes_but_not_the_harness_own() {
        let with = |lines: &str| {
            STORM.replace(
                "[topology.sites.s]",
                &format!("[topology.server]\n{lines}\n[topology.sites.s]"),
            )
        };
        let s = Scenario::parse(Path::new("s.toml"), &with("keepalive_time = \"5s\"")).unwrap();
        let server = &s.topology.unwrap().server;
        assert_eq!(server["keepalive_time"].as_str(), Some("5s"));
        let e =
            Scenario::parse(Path::new("s.toml"), &with("listen = [\"127.0.0.1:1\"]")).unwrap_err();
        assert!(
            e.to_string()
                .contains("[topology.server] listen: the harness sets it"),
            "{e}"
        );
    }

    #[test]
    fn a_drills_facts_need_its_topology_and_a_growth_needs_soak() {
        let no_soak = STORM.replace("reloads_failed <= 0", "rss_growth <= 0.1");
        let e = Scenario::parse(Path::new("s.toml"), &no_soak).unwrap_err();
        assert!(e.to_string().contains("needs [soak]"), "{e}");
        let with_soak = format!("{no_soak}[soak]\nsample = \"10s\"\n");
        let s = Scenario::parse(Path::new("s.toml"), &with_soak).unwrap();
        assert_eq!(s.soak_sample, Some(Duration::from_secs(10)));
    }
}
