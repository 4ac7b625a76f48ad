//! Admission scenarios: a discrete-event simulation of k2proxy's admission
//! gate (the real `Gate`, with the repo's real policy files) in front of a
//! model of the legacy backend, on a virtual clock. Each file in
//! `tests/data/admission/*.toml` gives the load per phase and the expected
//! `[min, max]` of what was measured; every miss of every file is reported
//! before the test fails. Seeded: a run is repeatable. Each scenario runs at
//! [`SEEDS`] seeds (or its file's `runs`) and each range is checked against the median of their
//! measurements; a point range (`[1.0, 1.0]`: every purchase served) must
//! hold in every run but one.
//!
//! `ADMISSION_SCENARIOS=<dir>` runs another folder (from the repository's
//! root: `proxy/tests/data/admission-open` holds the problems still open,
//! which fail); `SIM_DEBUG=1` prints
//! the limit sum and backend queue over time; `SIM_PRINT=key,key` prints
//! those measurements of every phase (to compare two controllers);
//! `SIM_SEEDS=k` runs each scenario at `k` seeds instead (1 to trace one);
//! `SIM_SEED=n` takes the `n`-th block of them (seeds `n × k` on from the
//! file's: to see the spread); `SIM_CSV=<dir>`
//! writes each scenario's backend queue and per-instance limits every
//! 10 ms, of its first run, to `<dir>/<seed>.csv` (scripts/fleet_chart.py draws them);
//! `SIM_PRINT=window_noise` gives how much more the limit's windows vary
//! than independent latencies would (scripts/window_noise.py measures the
//! same in access logs). `SIM_TRACE=1` prints every instance's limit, in flight, queue, shed
//! level, learnt baseline, ceiling (over it the limit shrinks) and last
//! window's latency every 10 ms (how the ninth round found a night's
//! baseline of 8.9 ms for 23 holding the morning's limit at `min` for three
//! seconds, and the tenth the probe due since the night that did the same).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use loadtest::sim::lognormal_factor;
use proxy::admission::gate::{Decision, Gate, ShedReason};
use proxy::admission::{rules_for, Sample};
use proxy::config::{self, Paths};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    /// What the scenario shows.
    description: String,
    /// Policy file, relative to the repo root.
    policy: String,
    seed: u64,
    backend: Backend,
    /// Share of arrivals per tier name.
    mix: BTreeMap<String, f64>,
    /// k2proxy instances sharing the backend (default: one).
    #[serde(default)]
    fleet: Fleet,
    /// Seeds run in CI, when not [`SEEDS`]: a chaotic scenario whose
    /// median of nine is a coin toss near its bounds takes more.
    runs: Option<u64>,
    phase: Vec<Phase>,
}

/// Several k2proxy instances in front of one backend, each with its own
/// gate, arrivals spread round-robin as an L4 balancer spreads connections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fleet {
    proxies: usize,
    /// When each instance starts, seconds (missing: 0); until then it gets
    /// no traffic.
    #[serde(default)]
    start_s: Vec<f64>,
    /// (instance, second): the instance restarts: its waiters are lost (as
    /// their connections are), requests at the backend finish, and a fresh
    /// gate takes the traffic.
    #[serde(default)]
    restart: Vec<(usize, f64)>,
    /// A restarted instance resumes the limit its process before it had,
    /// as `[server] admission_state` makes it (`admission::memory`).
    #[serde(default)]
    restart_resumes: bool,
}

impl Default for Fleet {
    fn default() -> Fleet {
        Fleet {
            proxies: 1,
            start_s: Vec::new(),
            restart: Vec::new(),
            restart_resumes: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Backend {
    workers: u32,
    /// Median service time.
    service_ms: f64,
    /// Spread of the log-normal service time.
    #[serde(default = "default_sigma")]
    sigma: f64,
    /// Congestion collapse, as legacy-sim's: each request waiting in the
    /// backend's own queue makes the next service `collapse / workers`
    /// slower (default 0: a backend that only queues).
    #[serde(default)]
    collapse: f64,
    /// Each tier's service time as a multiple of `service_ms` (missing: 1),
    /// as legacy-sim's `--class` gives a path its own: a backend whose
    /// admin reports cost eight purchases. `load` is then a multiple of
    /// the capacity for the scenario's `mix`.
    #[serde(default)]
    tier_cost: BTreeMap<String, f64>,
}

fn default_sigma() -> f64 {
    0.25
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Phase {
    name: String,
    seconds: f64,
    /// Offered load as a multiple of the backend's capacity (at the start).
    load: f64,
    /// Load at the end of the phase (a linear ramp); defaults to `load`.
    load_to: Option<f64>,
    /// Overrides the backend's median service time from this phase on.
    service_ms: Option<f64>,
    /// Overrides the tier mix for this phase.
    mix: Option<BTreeMap<String, f64>>,
    /// Expected ranges of this phase's measurements.
    #[serde(default)]
    expect: BTreeMap<String, [f64; 2]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrival,
    BackendDone(usize),
    Deadline(usize),
    Sample,
    /// Instance `.0` starts, or restarts.
    Start(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Queued,
    Running,
    Done,
    Shed,
}

struct Request {
    tier: usize,
    phase: usize,
    arrived: u64,
    started: u64,
    state: State,
    /// The instance and its incarnation (a restart makes a new one).
    instance: usize,
    incarnation: u32,
}

#[derive(Default)]
struct PhaseStats {
    arrivals: HashMap<usize, u64>,
    ok: HashMap<usize, u64>,
    shed: HashMap<(usize, ShedReason), u64>,
    /// Requests lost with an instance that restarted.
    lost: HashMap<usize, u64>,
    latencies: HashMap<usize, Vec<u64>>,
    /// Time served requests waited in k2proxy's queue (not the backend's).
    waits: HashMap<usize, Vec<u64>>,
    /// Time served requests spent at the backend (its queue and service).
    at_backend: HashMap<usize, Vec<u64>>,
    /// Time from arrival to a refusal, per tier.
    refusal_waits: HashMap<usize, Vec<u64>>,
    /// Per instance: the backend latency of each request it released, in
    /// the order they finished (the samples its limit's windows take).
    released: BTreeMap<usize, Vec<u64>>,
    completions: u64,
    /// Each running instance's limit, every sample.
    limits: Vec<u32>,
    /// Per instance: the sum and count of its limit samples.
    instance_limits: BTreeMap<usize, (f64, u32)>,
    /// The sum of the running instances' limits, every sample.
    limit_sums: Vec<u32>,
    /// Each running instance's learned baseline, ms, every sample.
    baselines: Vec<f64>,
    /// Requests waiting inside the backend (its own FIFO), every sample.
    backend_queue: Vec<usize>,
    levels: Vec<f64>,
}

/// One k2proxy instance: its gate while it runs.
struct Instance {
    gate: Option<Gate<usize>>,
    incarnation: u32,
}

const US: u64 = 1_000_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn pick<'a>(rng: &mut fastrand::Rng, mix: &'a BTreeMap<String, f64>) -> &'a str {
    let total: f64 = mix.values().sum();
    let mut x = rng.f64() * total;
    for (name, w) in mix {
        if x < *w {
            return name;
        }
        x -= w;
    }
    mix.keys().last().unwrap()
}

/// One `SIM_TRACE` line: instance `i`'s gate at `now` (µs).
fn trace_line<W>(now: u64, i: usize, g: &Gate<W>) -> String {
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let learnt = g.learnt();
    format!(
        "trace {:.2} s instance {i}: limit {} in flight {} queued {} shed level {:.2} baseline {:.1} ms ceiling {:.1} ms latency {:.1} ms",
        now as f64 / 1e6,
        g.limit(),
        g.inflight(),
        g.queued(),
        g.shed_level(),
        ms(learnt.and_then(|l| l.baseline)),
        ms(learnt.and_then(|l| l.ceiling)),
        ms(learnt.and_then(|l| l.latency)),
    )
}

/// How many seeds each scenario runs at, and which: [`SEEDS`] by default.
#[derive(Debug, Clone, Copy)]
struct Seeds {
    /// Runs per scenario (`SIM_SEEDS`).
    runs: u64,
    /// Which block of `runs` seeds (`SIM_SEED`): block `n` is the
    /// scenario's seed plus `n × runs` up to the next block.
    block: u64,
    /// Whether `SIM_SEEDS` chose `runs` (over a scenario's own `runs`).
    chosen: bool,
}

/// Runs per scenario in CI. A scenario whose backend collapses or whose
/// fleet splits its shares is chaotic: two builds that differ by a rule
/// touching a few requests a minute draw different trajectories, and one
/// seed's measurement is one draw. Over sixteen seeds the bounds, set from
/// one seed, were missed five times a seed on average (docs/admission.md,
/// "Thirty-ninth round"), so any change re-rolled them and a harmless one
/// failed CI as often as a harmful one. The median of nine is checked
/// (medians of five still spread over a fifth of the drill's plateau).
/// A scenario whose medians of nine still straddle a bound says `runs`:
/// 65's purchase p99 passed its bound in 51 of 88 blocks of nine seeds
/// (docs/admission.md, "Fifty-fourth round").
const SEEDS: u64 = 9;

fn seeds() -> Seeds {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v:?}: not a whole number"))
        })
    };
    let chosen = var("SIM_SEEDS");
    Seeds {
        runs: chosen.unwrap_or(SEEDS).max(1),
        block: var("SIM_SEED").unwrap_or(0),
        chosen: chosen.is_some(),
    }
}

impl Seeds {
    /// The seeds scenario `s` runs at: its own `runs` unless `SIM_SEEDS`
    /// says otherwise.
    fn of(self, s: &Scenario) -> Seeds {
        match s.runs {
            Some(runs) if !self.chosen => Seeds {
                runs: runs.max(1),
                ..self
            },
            _ => self,
        }
    }

    /// The seed of the `run`-th run of a scenario whose file says `seed`.
    fn seed(self, seed: u64, run: u64) -> u64 {
        seed + self.block * self.runs + run
    }
}

/// Every run of `s`, side by side on the machine's cores (in turn when
/// `SIM_TRACE` or `SIM_DEBUG` print as they go).
fn run_all(s: &Scenario, seeds: Seeds) -> Vec<Vec<BTreeMap<String, f64>>> {
    if std::env::var_os("SIM_TRACE").is_some() || std::env::var_os("SIM_DEBUG").is_some() {
        return (0..seeds.runs).map(|run| simulate(s, run)).collect();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..seeds.runs)
            .map(|run| scope.spawn(move || simulate(s, run)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The median of each phase's measurements over several runs, with their
/// lowest and highest.
fn medians(runs: &[Vec<BTreeMap<String, f64>>]) -> Vec<BTreeMap<String, [f64; 3]>> {
    let phases = runs.first().map_or(0, Vec::len);
    (0..phases)
        .map(|p| {
            runs[0][p]
                .keys()
                .map(|key| {
                    let mut v: Vec<f64> =
                        runs.iter().filter_map(|r| r[p].get(key)).copied().collect();
                    v.sort_by(f64::total_cmp);
                    let n = v.len();
                    let median = if n % 2 == 1 {
                        v[n / 2]
                    } else {
                        (v[n / 2 - 1] + v[n / 2]) / 2.0
                    };
                    (key.clone(), [median, v[0], v[n - 1]])
                })
                .collect()
        })
        .collect()
}

fn percentile(mut v: Vec<u64>, q: f64) -> u64 {
    v.sort_unstable();
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

/// Runs one scenario; returns the measurements per phase.
/// How much more the means of a limit's windows (16 consecutive
/// samples) vary than 16 independent samples would: the standard deviation
/// of the window means over that of the samples divided by 4, pooled over
/// the instances. 1 when consecutive latencies are independent; a queue
/// that comes and goes, or a stalled CPU that delays a window's requests
/// together, makes it larger, and the limit's tolerance (which assumes 1)
/// too small. `scripts/window_noise.py` measures the same in access logs.
fn window_noise(released: &BTreeMap<usize, Vec<u64>>) -> f64 {
    const N: usize = 16;
    let (mut between, mut within, mut windows) = (0.0, 0.0, 0usize);
    for lat in released.values() {
        let x: Vec<f64> = lat.iter().map(|&v| v as f64).collect();
        let means: Vec<f64> = x
            .chunks_exact(N)
            .map(|c| c.iter().sum::<f64>() / N as f64)
            .collect();
        if means.len() < 2 {
            continue;
        }
        let var = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / (v.len() - 1) as f64
        };
        between += var(&means) * means.len() as f64;
        within += var(&x[..means.len() * N]) / N as f64 * means.len() as f64;
        windows += means.len();
    }
    if windows == 0 || within <= 0.0 {
        return 1.0;
    }
    (between / within).sqrt()
}

/// Runs scenario `s` at its `run`-th seed of this test's ([`seeds`]).
fn simulate(s: &Scenario, run: u64) -> Vec<BTreeMap<String, f64>> {
    let snap = config::load(&Paths {
        routes: repo().join("routes.toml"),
        policy: Some(repo().join(&s.policy)),
        dev_tls: None,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (rules, limit) = rules_for(&snap, 0);
    let tier_names: Vec<String> = snap.tiers.iter().map(|t| t.name.clone()).collect();
    let tier_id = |name: &str| {
        tier_names
            .iter()
            .position(|t| t == name)
            .unwrap_or_else(|| panic!("unknown tier {name}"))
    };

    let base = Instant::now();
    // Every instance probes on one grid, as processes on the wall clock's,
    // through the scenario's start: an instance that starts then probes
    // first 5 s after.
    let limit = limit.on_grid(base);
    let at = |t: u64| base + Duration::from_micros(t);
    let us = |secs: f64| (secs * US as f64) as u64;
    let mut fleet: Vec<Instance> = (0..s.fleet.proxies.max(1))
        .map(|_| Instance {
            gate: None,
            incarnation: 0,
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(seeds().of(s).seed(s.seed, run));
    let mut events: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |events: &mut BinaryHeap<_>, t: u64, e: Event| {
        seq += 1;
        events.push(Reverse((t, seq, e)));
    };

    // Phase boundaries, in µs.
    let mut bounds = vec![0u64];
    for p in &s.phase {
        bounds.push(bounds.last().unwrap() + us(p.seconds));
    }
    let end = *bounds.last().unwrap();
    let phase_at = |t: u64| {
        bounds
            .windows(2)
            .position(|w| t >= w[0] && t < w[1])
            .unwrap_or(s.phase.len() - 1)
    };

    let mut service_ms = s.backend.service_ms;
    let cost: Vec<f64> = tier_names
        .iter()
        .map(|t| s.backend.tier_cost.get(t).copied().unwrap_or(1.0))
        .collect();
    for name in s.backend.tier_cost.keys() {
        tier_id(name);
    }
    // A request of the scenario's mix costs this many service times.
    let mix_cost =
        s.mix.iter().map(|(t, w)| w * cost[tier_id(t)]).sum::<f64>() / s.mix.values().sum::<f64>();
    let mean_service = |median_ms: f64| median_ms * (s.backend.sigma * s.backend.sigma / 2.0).exp();
    let capacity = |median_ms: f64| {
        f64::from(s.backend.workers) * 1000.0 / (mean_service(median_ms) * mix_cost)
    };

    let mut reqs: Vec<Request> = Vec::new();
    let mut stats: Vec<PhaseStats> = (0..s.phase.len()).map(|_| PhaseStats::default()).collect();
    let mut busy = 0u32;
    let mut backlog: VecDeque<usize> = VecDeque::new();
    let mut current_phase = usize::MAX;
    let mut next_instance = 0usize;

    // SIM_CSV=<dir>: every 10 ms sample, per scenario: the time, the
    // backend's queue and each instance's limit (scripts/fleet_chart.py).
    let trace = std::env::var_os("SIM_TRACE").is_some();
    let mut csv = std::env::var_os("SIM_CSV").filter(|_| run == 0).map(|dir| {
        let path = Path::new(&dir).join(format!("{}.csv", s.seed));
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    });
    push(&mut events, 0, Event::Arrival);
    push(&mut events, 0, Event::Sample);
    for i in 0..fleet.len() {
        let start = s.fleet.start_s.get(i).copied().unwrap_or(0.0);
        push(&mut events, us(start), Event::Start(i));
    }
    for &(i, t) in &s.fleet.restart {
        assert!(
            i < fleet.len(),
            "restart of instance {i}: only {}",
            fleet.len()
        );
        push(&mut events, us(t), Event::Start(i));
    }

    // The collapse factor with `queued` waiting in the backend, capped as
    // legacy-sim caps it.
    let slowdown = |queued: usize| {
        (1.0 + s.backend.collapse * queued as f64 / f64::from(s.backend.workers)).min(1000.0)
    };
    // Starts a request at the backend (or queues it there).
    macro_rules! to_backend {
        ($id:expr, $now:expr) => {{
            let id = $id;
            reqs[id].state = State::Running;
            reqs[id].started = $now;
            if busy < s.backend.workers {
                busy += 1;
                let svc = (service_ms
                    * cost[reqs[id].tier]
                    * lognormal_factor(&mut rng, s.backend.sigma)
                    * slowdown(backlog.len())
                    * 1000.0) as u64;
                push(&mut events, $now + svc.max(1), Event::BackendDone(id));
            } else {
                backlog.push_back(id);
            }
        }};
    }
    // A refusal: counted under its reason, with how long it took.
    macro_rules! refuse {
        ($id:expr, $reason:expr, $now:expr) => {{
            let r = &mut reqs[$id];
            r.state = State::Shed;
            let st = &mut stats[r.phase];
            *st.shed.entry((r.tier, $reason)).or_default() += 1;
            st.refusal_waits
                .entry(r.tier)
                .or_default()
                .push($now - r.arrived);
        }};
    }
    // Waiters refused while they waited.
    macro_rules! shed_by_level {
        ($i:expr, $now:expr) => {{
            if let Some(g) = fleet[$i].gate.as_mut() {
                for (id, reason) in g.take_shed() {
                    refuse!(id, reason, $now);
                }
            }
        }};
    }

    while let Some(Reverse((now, _, event))) = events.pop() {
        if now >= end && !matches!(event, Event::BackendDone(_)) {
            continue;
        }
        let ph = phase_at(now);
        if ph != current_phase {
            current_phase = ph;
            if let Some(ms) = s.phase[ph].service_ms {
                service_ms = ms;
            }
        }
        match event {
            Event::Start(i) => {
                // A restart loses what waited in the old process.
                for r in reqs.iter_mut().filter(|r| {
                    r.instance == i
                        && r.incarnation == fleet[i].incarnation
                        && r.state == State::Queued
                }) {
                    r.state = State::Shed;
                    *stats[r.phase].lost.entry(r.tier).or_default() += 1;
                }
                let inst = &mut fleet[i];
                if inst.gate.is_some() {
                    inst.incarnation += 1;
                }
                let kept = inst
                    .gate
                    .as_ref()
                    .filter(|g| s.fleet.restart_resumes && g.is_adaptive())
                    .map(|g| (g.limit(), g.kept()));
                // Its limit is made now, as the process makes it when it
                // starts: a late-comer's first probe is a probe interval
                // after its own start, not due at once (a clone of the one
                // made at set-up was, and so probed on its first window).
                let mut gate = Gate::new(rules.clone(), limit.fresh(at(now)), at(now));
                if let Some((l, learnt)) = kept {
                    gate.resume(l);
                    if let Some(learnt) = learnt {
                        gate.resume_learnt(learnt);
                    }
                }
                inst.gate = Some(gate);
            }
            Event::Arrival => {
                let p = &s.phase[ph];
                let frac = (now - bounds[ph]) as f64 / (bounds[ph + 1] - bounds[ph]) as f64;
                let load = p.load + (p.load_to.unwrap_or(p.load) - p.load) * frac;
                let rate = load * capacity(s.backend.service_ms);
                // Poisson arrivals.
                let gap = (-rng.f64().max(1e-12).ln() / rate * US as f64) as u64;
                push(&mut events, now + gap.max(1), Event::Arrival);
                // Round-robin over the running instances.
                let running: Vec<usize> = (0..fleet.len())
                    .filter(|&i| fleet[i].gate.is_some())
                    .collect();
                if running.is_empty() {
                    continue;
                }
                let i = running[next_instance % running.len()];
                next_instance += 1;
                let mix = p.mix.as_ref().unwrap_or(&s.mix);
                let tier = tier_id(pick(&mut rng, mix));
                let id = reqs.len();
                reqs.push(Request {
                    tier,
                    phase: ph,
                    arrived: now,
                    started: 0,
                    state: State::Queued,
                    instance: i,
                    incarnation: fleet[i].incarnation,
                });
                *stats[ph].arrivals.entry(tier).or_default() += 1;
                let gate = fleet[i].gate.as_mut().expect("running");
                match gate.try_admit(tier, at(now)) {
                    Decision::Admit => to_backend!(id, now),
                    Decision::Shed(r) => refuse!(id, r, now),
                    Decision::Queue => match gate.enqueue(tier, at(now), id) {
                        Err(r) => refuse!(id, r, now),
                        Ok((deadline, evicted)) => {
                            if let Some(e) = evicted {
                                refuse!(e, ShedReason::QueueFull, now);
                            }
                            let deadline = deadline.duration_since(base).as_micros() as u64;
                            push(&mut events, deadline, Event::Deadline(id));
                        }
                    },
                }
                shed_by_level!(i, now);
            }
            Event::BackendDone(id) => {
                busy -= 1;
                let r = &mut reqs[id];
                r.state = State::Done;
                let backend_latency = Duration::from_micros(now - r.started);
                let p = &mut stats[r.phase];
                *p.ok.entry(r.tier).or_default() += 1;
                p.latencies.entry(r.tier).or_default().push(now - r.arrived);
                p.waits
                    .entry(r.tier)
                    .or_default()
                    .push(r.started - r.arrived);
                p.at_backend
                    .entry(r.tier)
                    .or_default()
                    .push(now - r.started);
                p.released
                    .entry(r.instance)
                    .or_default()
                    .push(now - r.started);
                if now < end {
                    stats[phase_at(now)].completions += 1;
                }
                if let Some(next) = backlog.pop_front() {
                    busy += 1;
                    let svc = (service_ms
                        * cost[reqs[next].tier]
                        * lognormal_factor(&mut rng, s.backend.sigma)
                        * slowdown(backlog.len())
                        * 1000.0) as u64;
                    push(&mut events, now + svc.max(1), Event::BackendDone(next));
                }
                let (i, tier) = (reqs[id].instance, reqs[id].tier);
                // A permit of a process that restarted died with it.
                if reqs[id].incarnation != fleet[i].incarnation {
                    continue;
                }
                let Some(gate) = fleet[i].gate.as_mut() else {
                    continue;
                };
                gate.release(tier, at(now), Sample::Latency(backend_latency));
                while let Some((_, id)) = gate.grant_next(at(now)) {
                    to_backend!(id, now);
                }
                shed_by_level!(i, now);
            }
            Event::Deadline(id) => {
                let (i, inc) = (reqs[id].instance, reqs[id].incarnation);
                if reqs[id].state == State::Queued && fleet[i].incarnation == inc {
                    let waited = Duration::from_micros(now - reqs[id].arrived);
                    if let Some(g) = fleet[i].gate.as_mut() {
                        g.note_timeout(reqs[id].tier, at(now), waited);
                    }
                    refuse!(id, ShedReason::QueueTimeout, now);
                    shed_by_level!(i, now);
                }
            }
            Event::Sample => {
                let mut sum = 0;
                for (i, inst) in fleet.iter_mut().enumerate() {
                    let Some(g) = inst.gate.as_mut() else {
                        continue;
                    };
                    stats[ph].limits.push(g.limit());
                    let e = stats[ph].instance_limits.entry(i).or_default();
                    e.0 += f64::from(g.limit());
                    e.1 += 1;
                    if let Some(b) = g.baseline() {
                        stats[ph].baselines.push(b.as_secs_f64() * 1000.0);
                    }
                    sum += g.limit();
                    g.refused(0, at(now)); // advances the shed-level windows
                    stats[ph].levels.push(g.shed_level());
                    for (id, reason) in g.take_shed() {
                        refuse!(id, reason, now);
                    }
                }
                stats[ph].limit_sums.push(sum);
                if let Some(csv) = csv.as_mut() {
                    use std::io::Write;
                    let ls: Vec<String> = fleet
                        .iter()
                        .map(|i| {
                            i.gate
                                .as_ref()
                                .map_or(String::new(), |g| g.limit().to_string())
                        })
                        .collect();
                    let _ = writeln!(
                        csv,
                        "{:.2},{},{}",
                        now as f64 / 1e6,
                        backlog.len(),
                        ls.join(",")
                    );
                }
                if trace {
                    for (i, g) in fleet.iter().enumerate() {
                        if let Some(g) = g.gate.as_ref() {
                            eprintln!("{}", trace_line(now, i, g));
                        }
                    }
                }
                stats[ph].backend_queue.push(backlog.len());
                push(&mut events, now + 10_000, Event::Sample);
            }
        }
    }

    // Measurements per phase.
    s.phase
        .iter()
        .zip(&stats)
        .map(|(p, st)| {
            let mut m = BTreeMap::new();
            for (t, name) in tier_names.iter().enumerate() {
                let arrivals = st.arrivals.get(&t).copied().unwrap_or(0);
                let ok = st.ok.get(&t).copied().unwrap_or(0);
                // A share of the tier's arrivals; `none` when nothing arrived.
                let share = |n: u64, none: f64| {
                    if arrivals == 0 {
                        none
                    } else {
                        n as f64 / arrivals as f64
                    }
                };
                m.insert(format!("{name}_success"), share(ok, 1.0));
                let lat = st.latencies.get(&t).cloned().unwrap_or_default();
                m.insert(
                    format!("{name}_p99_ms"),
                    percentile(lat.clone(), 0.99) as f64 / 1000.0,
                );
                m.insert(
                    format!("{name}_p50_ms"),
                    percentile(lat, 0.5) as f64 / 1000.0,
                );
                let waits = st.waits.get(&t).cloned().unwrap_or_default();
                m.insert(
                    format!("{name}_wait_p99_ms"),
                    percentile(waits, 0.99) as f64 / 1000.0,
                );
                let at_backend = st.at_backend.get(&t).cloned().unwrap_or_default();
                m.insert(
                    format!("{name}_backend_p99_ms"),
                    percentile(at_backend, 0.99) as f64 / 1000.0,
                );
                let refusals = st.refusal_waits.get(&t).cloned().unwrap_or_default();
                m.insert(
                    format!("{name}_refusal_p99_ms"),
                    percentile(refusals, 0.99) as f64 / 1000.0,
                );
                let lost = st.lost.get(&t).copied().unwrap_or(0);
                m.insert(format!("{name}_lost"), share(lost, 0.0));
                for reason in [
                    ShedReason::ShedLevel,
                    ShedReason::QueueTimeout,
                    ShedReason::QueueFull,
                    ShedReason::Forced,
                ] {
                    let n = st.shed.get(&(t, reason)).copied().unwrap_or(0);
                    m.insert(format!("{name}_{}", reason.as_str()), share(n, 0.0));
                }
            }
            let cap = capacity(p.service_ms.unwrap_or(service_ms)) * p.seconds;
            if std::env::var("SIM_DEBUG").is_ok() {
                let every = |n: usize| n.max(40) / 40;
                eprintln!(
                    "{} limit sums: {:?}\n  backend queue: {:?}",
                    p.name,
                    st.limit_sums
                        .iter()
                        .step_by(every(st.limit_sums.len()))
                        .collect::<Vec<_>>(),
                    st.backend_queue
                        .iter()
                        .step_by(every(st.backend_queue.len()))
                        .collect::<Vec<_>>()
                );
                eprintln!(
                    "{}: completions {} cap {cap:.0} limit {:?}..{:?} end {:?} levels max {:?}",
                    p.name,
                    st.completions,
                    st.limits.iter().min(),
                    st.limits.iter().max(),
                    st.limits.last(),
                    st.levels.iter().copied().fold(0.0, f64::max)
                );
            }
            m.insert("goodput".into(), st.completions as f64 / cap);
            let l = &st.limits;
            m.insert(
                "limit_min".into(),
                l.iter().copied().min().unwrap_or(0) as f64,
            );
            m.insert(
                "limit_max".into(),
                l.iter().copied().max().unwrap_or(0) as f64,
            );
            m.insert(
                "limit_mean".into(),
                l.iter().map(|&x| f64::from(x)).sum::<f64>() / l.len().max(1) as f64,
            );
            m.insert("limit_end".into(), l.last().copied().unwrap_or(0) as f64);
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let sums: Vec<f64> = st.limit_sums.iter().map(|&x| f64::from(x)).collect();
            m.insert("limit_sum_mean".into(), mean(&sums));
            // Fairness: the largest instance's mean limit over the smallest's.
            let per: Vec<f64> = st
                .instance_limits
                .values()
                .map(|(s, n)| s / f64::from(*n))
                .collect();
            let (lo, hi) = per
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            m.insert(
                "limit_spread".into(),
                if per.is_empty() {
                    1.0
                } else {
                    hi / lo.max(1e-9)
                },
            );
            m.insert("baseline_mean_ms".into(), mean(&st.baselines));
            m.insert("window_noise".into(), window_noise(&st.released));
            m.insert(
                "limit_sum_max".into(),
                sums.iter().copied().fold(0.0, f64::max),
            );
            let queue: Vec<u64> = st.backend_queue.iter().map(|&q| q as u64).collect();
            let queue_f: Vec<f64> = queue.iter().map(|&q| q as f64).collect();
            m.insert("backend_queue_mean".into(), mean(&queue_f));
            m.insert("backend_queue_p99".into(), percentile(queue, 0.99) as f64);
            m.insert(
                "shed_level_max".into(),
                st.levels.iter().copied().fold(0.0, f64::max),
            );
            m.insert(
                "shed_level_end".into(),
                st.levels.last().copied().unwrap_or(0.0),
            );
            m
        })
        .collect()
}

#[test]
fn admission_scenarios_meet_their_expected_ranges() {
    // ADMISSION_SCENARIOS=<dir> runs the files of another folder (exploring;
    // a relative path is from the repository's root).
    let dir = std::env::var_os("ADMISSION_SCENARIOS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/admission"),
        |d| repo().join(d),
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    let mut misses = Vec::new();
    let seeds = seeds();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let s: Scenario =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        let seeds = seeds.of(&s);
        let runs = run_all(&s, seeds);
        let measured = medians(&runs);
        println!("\n{name}: {}", s.description);
        // SIM_PRINT=key,key: these measurements of every phase too, to
        // compare two controllers on the same scenarios.
        let extra = std::env::var("SIM_PRINT").unwrap_or_default();
        let shown = |[median, lo, hi]: [f64; 3]| {
            if seeds.runs > 1 {
                format!("{median:>10.3}  ({lo:.3}-{hi:.3})")
            } else {
                format!("{median:>10.3}")
            }
        };
        for (i, (p, m)) in s.phase.iter().zip(&measured).enumerate() {
            for key in extra.split(',').filter(|k| !k.is_empty()) {
                if let Some(v) = m.get(key) {
                    println!("  {:<10} {key:<32} {}  (SIM_PRINT)", p.name, shown(*v));
                }
            }
            for (key, [lo, hi]) in &p.expect {
                let Some(v) = m.get(key) else {
                    misses.push(format!("{name}/{}: unknown measurement {key:?}", p.name));
                    continue;
                };
                let within = |x: f64| x >= *lo && x <= *hi;
                let inside = runs
                    .iter()
                    .filter(|r| r[i].get(key).is_some_and(|x| within(*x)))
                    .count();
                // A point range ("every purchase served") is a property of
                // every run, not of the median's: all runs but one of
                // several (a rare event, such as one seed of ninety
                // shedding at 0.8x, is then caught once it is no longer
                // rare); a lone run must hold it.
                let spared = usize::from(runs.len() > 1);
                let ok = if lo == hi {
                    runs.len() - inside <= spared
                } else {
                    within(v[0])
                };
                println!(
                    "  {:<10} {key:<32} {}  in [{lo}, {hi}] {} (in {inside} of {})",
                    p.name,
                    shown(*v),
                    if ok { "ok" } else { "MISS" },
                    runs.len()
                );
                if !ok {
                    misses.push(format!(
                        "{name}/{}: {key} = {:.3} (median of {} seeds; held in {inside}), expected [{lo}, {hi}]",
                        p.name, v[0], seeds.runs
                    ));
                }
            }
        }
    }
    assert!(
        misses.is_empty(),
        "{} misses:\n{}",
        misses.len(),
        misses.join("\n")
    );
}

#[test]
fn window_noise_is_one_for_independent_latencies_and_more_for_a_queue_that_comes_and_goes() {
    let mut rng = fastrand::Rng::with_seed(5);
    let independent: Vec<u64> = (0..16 * 400)
        .map(|_| (20_000.0 * lognormal_factor(&mut rng, 0.5)) as u64)
        .collect();
    let one = window_noise(&BTreeMap::from([(0, independent.clone())]));
    assert!((0.9..1.1).contains(&one), "{one}");
    // The same service times behind a queue that adds 0 or 10 ms for 32
    // requests at a time: consecutive latencies move together.
    let queued: Vec<u64> = independent
        .iter()
        .enumerate()
        .map(|(i, &l)| l + if (i / 32) % 2 == 0 { 0 } else { 10_000 })
        .collect();
    let more = window_noise(&BTreeMap::from([(0, independent), (1, queued)]));
    assert!(more > 1.3, "{more}");
}
