//! One command, one drill: bring up the scenario's topology (or use an
//! external target), play the load with live progress and the scenario's
//! events, check the thresholds, write the reports, tear everything down.
//! `compare` runs the same load twice, with admission as configured and with
//! admission off, and puts the two side by side.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::openloop::{run_load, Event, Live, Report};
use crate::report::ms;
use crate::scenario::{Action, Scenario};
use crate::sim::Fault;
use crate::soak::Sample;
use crate::thresholds::{Facts, Verdict};
use crate::topology::{States, Topology};

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// An external target (`http://host:port`) instead of the topology.
    pub target: Option<String>,
    /// Where the reports go.
    pub out: PathBuf,
    pub k2proxy: PathBuf,
    /// No live progress.
    pub quiet: bool,
}

/// A finished run.
pub struct Outcome {
    pub label: String,
    pub report: Report,
    pub verdicts: Vec<Verdict>,
    /// Everything written, as JSON (report.json).
    pub json: serde_json::Value,
    /// The drill's facts and the reload edits that failed, said in lines.
    pub facts: String,
    pub out: PathBuf,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.pass)
    }

    pub fn html_path(&self) -> PathBuf {
        self.out.join("report.html")
    }
}

/// Where the load goes: `--target`, or the scenario's topology brought up
/// (then the scenario's capacity is its preferred site's).
async fn target(
    scenario: &mut Scenario,
    opts: &Options,
    admission: Option<bool>,
) -> Result<(String, Option<Topology>), String> {
    match (&opts.target, &mut scenario.topology) {
        (Some(t), _) => Ok((t.clone(), None)),
        (None, Some(spec)) => {
            if let Some(a) = admission {
                spec.admission = a;
            }
            let t = Topology::up(spec, &opts.out, &opts.k2proxy).await?;
            let capacity = t
                .preferred()
                .iter()
                .map(|h| scenario.site_capacity(h.sim.config()))
                .sum();
            *scenario = scenario.clone().with_capacity(Some(capacity));
            Ok((t.base_url.clone(), Some(t)))
        }
        (None, None) => Err(format!(
            "{}: no [topology] in the scenario: give --target URL",
            scenario.path.display()
        )),
    }
}

/// The tier whose requests a drill's purchase facts count.
pub const PURCHASE: &str = "purchase";

/// Plays the load, with the scenario's events beside it on the same clock
/// (and a soak's sampler); gives the topology back for its post-mortem.
async fn play(
    scenario: &Scenario,
    base: &str,
    topology: Option<Topology>,
    opts: &Options,
    label: &str,
) -> Result<(Report, Option<Topology>, Vec<Sample>, States), String> {
    let load = scenario.load_against(base)?;
    let total = load.schedule.duration();
    let live = Live::new(&load);
    let progress = crate::progress::show(live.clone(), total, label.to_string(), opts.quiet);
    let (stop_sampler, sampler) = match (
        scenario.soak_sample,
        topology.as_ref().and_then(Topology::pid),
    ) {
        (Some(every), Some(pid)) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (
                Some(tx),
                Some(tokio::spawn(crate::soak::sample(pid, every, rx))),
            )
        }
        _ => (None, None),
    };
    let admins = topology.as_ref().map(Topology::admins).unwrap_or_default();
    let (stop_states, states_rx) = tokio::sync::oneshot::channel::<()>();
    let states = (!admins.is_empty()).then(|| tokio::spawn(sample_states(admins, states_rx)));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let events = tokio::spawn(play_events(scenario.events.clone(), topology, stop_rx));
    let mut report = run_load(load, live.clone()).await;
    let _ = stop_tx.send(());
    let _ = stop_states.send(());
    if let Some(tx) = stop_sampler {
        let _ = tx.send(());
    }
    let (topology, log) = events.await.map_err(|e| format!("events task: {e}"))?;
    let samples = match sampler {
        Some(s) => s.await.map_err(|e| format!("soak sampler: {e}"))?,
        None => Vec::new(),
    };
    let states = match states {
        Some(s) => s.await.map_err(|e| format!("admission sampler: {e}"))?,
        None => Vec::new(),
    };
    report.events = log;
    let _ = progress.await;
    Ok((report, topology, samples, states))
}

/// Every second until `stop`: each instance's admission state (limit, in
/// flight, queued, shed level) at the first cluster's first site. The
/// report charts it beside the load: a limit that holds the backend past
/// its knee shows there, not only in the latencies it causes.
async fn sample_states(
    admins: Vec<std::net::SocketAddr>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> States {
    let mut rows = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = &mut stop => return rows,
        }
        let mut row = Vec::new();
        for a in &admins {
            row.push(crate::topology::site_state(*a).await);
        }
        rows.push(row);
    }
}

/// "instance 0: 3-5, instance 1: 4-6": each instance's limits in the
/// second half of the run.
pub fn limits_text(rows: &States) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let half = &rows[rows.len() / 2..];
    (0..n)
        .map(|i| {
            let seen: Vec<u64> = half
                .iter()
                .filter_map(|r| r.get(i).copied().flatten().map(|s| s.limit))
                .collect();
            match (seen.iter().min(), seen.iter().max()) {
                (Some(lo), Some(hi)) => format!("instance {i}: {lo}-{hi}"),
                _ => format!("instance {i}: -"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Applies each event at its time until `stop`; returns the topology and
/// what happened when.
async fn play_events(
    occurrences: Vec<crate::scenario::Occurrence>,
    mut topology: Option<Topology>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> (Option<Topology>, Vec<Event>) {
    let start = tokio::time::Instant::now();
    let mut log = Vec::new();
    for o in occurrences {
        tokio::select! {
            _ = tokio::time::sleep_until(start + o.at) => {}
            _ = &mut stop => return (topology, log),
        }
        if let Some(t) = topology.as_mut() {
            let at_s = start.elapsed().as_secs_f64();
            let what = t.apply(&o.action).await;
            let fault = matches!(&o.action, Action::Fault { fault, .. } if *fault != Fault::None);
            log.push(Event { at_s, what, fault });
        }
    }
    let _ = stop.await;
    (topology, log)
}

/// After each fault, how long purchases kept failing: the intended send
/// time of the last purchase shed, failed or timed out before the next
/// event, less the fault's time; the longest over the run (ms). None when
/// the run had no fault.
pub fn time_to_failover(report: &Report) -> Option<f64> {
    let kind = report.targets.iter().position(|t| t.name == PURCHASE)?;
    let mut longest = None;
    for (i, e) in report.events.iter().enumerate().filter(|(_, e)| e.fault) {
        let end = report.events.get(i + 1).map_or(f64::INFINITY, |n| n.at_s);
        let last = report
            .failures
            .iter()
            .filter(|f| f.kind == kind && f.at_s >= e.at_s && f.at_s < end)
            .map(|f| f.at_s - e.at_s)
            .fold(0.0, f64::max);
        longest = Some(longest.map_or(last, |l: f64| l.max(last)));
    }
    longest.map(|s| s * 1000.0)
}

/// The facts in a few lines for the terminal and summary.txt.
fn facts_text(f: &Facts, edits: Option<&crate::topology::Edits>) -> String {
    let mut out = String::new();
    let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let _ = writeln!(
        out,
        "drill: duplicate purchases {}, lost purchases {}, time to failover {}",
        n(f.duplicates),
        n(f.lost_purchases),
        f.time_to_failover_ms
            .map_or("- (no fault)".to_string(), |ms| format!("{ms:.0} ms")),
    );
    if let Some(e) = edits.filter(|e| e.valid + e.broken > 0) {
        let _ = writeln!(
            out,
            "reload edits: {}/{} valid applied, {}/{} broken refused, {} failed",
            e.applied, e.valid, e.refused, e.broken, e.failed
        );
        for why in &e.failures {
            let _ = writeln!(out, "  {why}");
        }
    }
    if !f.growth.is_empty() {
        let trends: Vec<String> = f
            .growth
            .iter()
            .map(|(t, g)| format!("{} {:+.1}%", t.name(), g * 100.0))
            .collect();
        let _ = writeln!(
            out,
            "soak: fitted growth over the run after warm-up: {}",
            trends.join(", ")
        );
    }
    out
}

/// Everything the drill measured beyond the load's counts; `duplicates`
/// is the topology's count of non-idempotent request ids seen twice.
fn facts(
    report: &Report,
    topology: Option<&Topology>,
    duplicates: Option<u64>,
    soak: &[Sample],
    run_s: f64,
) -> Facts {
    let mut facts = Facts {
        lost_purchases: report
            .target(PURCHASE)
            .map(|t| t.outcomes.error + t.outcomes.timeout),
        time_to_failover_ms: time_to_failover(report),
        duplicates,
        ..Facts::default()
    };
    if let Some(t) = topology {
        facts.reloads_failed = Some(t.edits.failed);
        facts.reloads_applied = Some(t.edits.applied);
    }
    if !soak.is_empty() {
        facts.growth = crate::soak::trends(soak, run_s);
    }
    facts
}

/// report.json, summary.txt and report.html in `out`.
fn write_reports(
    out: &Path,
    json: &serde_json::Value,
    report: &Report,
    title: &str,
    verdicts: &[Verdict],
    facts: &str,
    states: &States,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let files = [
        (
            "report.json",
            serde_json::to_string_pretty(json).unwrap_or_default(),
        ),
        ("summary.txt", format!("{}{facts}", report.summary())),
        ("report.html", report.html(title, verdicts, states)),
    ];
    for (name, content) in files {
        let p = out.join(name);
        std::fs::write(&p, content).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// Runs the scenario once; `admission` overrides the topology's setting.
pub async fn run(
    scenario: &Scenario,
    opts: &Options,
    admission: Option<bool>,
    label: &str,
) -> Result<Outcome, String> {
    let mut scenario = scenario.clone();
    let (base, topology) = target(&mut scenario, opts, admission).await?;
    if topology.is_none() && !scenario.events.is_empty() {
        return Err("the scenario's events need its topology; run it without --target".into());
    }
    let (report, topology, mut samples, states) =
        play(&scenario, &base, topology, opts, label).await?;
    if let Some(kind) = report.targets.iter().position(|t| t.name == PURCHASE) {
        crate::soak::fill_p99(&mut samples, &report.timeline, kind);
    }
    // Once: it merges every simulator's request ids (millions in a soak).
    let duplicates = topology.as_ref().map(Topology::duplicates);
    let facts = facts(
        &report,
        topology.as_ref(),
        duplicates.map(|(_, unsafe_)| unsafe_),
        &samples,
        report.elapsed.as_secs_f64(),
    );
    let verdicts: Vec<Verdict> = scenario
        .thresholds
        .iter()
        .map(|t| t.check(&report, &facts))
        .collect();
    let mut json = report.to_json();
    json["scenario"] = serde_json::json!({
        "name": scenario.name, "description": scenario.description,
        "file": scenario.path.display().to_string(), "seed": scenario.seed,
        "capacity_rps": scenario.capacity(), "peak_rps": scenario.schedule().map(|s| s.peak()).unwrap_or(0.0),
        "admission": scenario.topology.as_ref().map(|t| t.admission),
        "target": base,
    });
    json["thresholds"] = serde_json::to_value(&verdicts).unwrap_or_default();
    json["passed"] = verdicts.iter().all(|v| v.pass).into();
    json["facts"] = serde_json::to_value(&facts).unwrap_or_default();
    if let (Some(t), Some((all, unsafe_))) = (&topology, duplicates) {
        json["backend"] = serde_json::json!({
            "duplicate_request_ids": all,
            "duplicate_non_idempotent": unsafe_,
            "config": t.reload_state().await,
        });
        json["reload_edits"] = serde_json::to_value(&t.edits).unwrap_or_default();
    }
    if !samples.is_empty() {
        json["soak"] = serde_json::json!({
            "samples": samples,
            "warmup_share": crate::soak::WARMUP_SHARE,
        });
    }
    let mut said = facts_text(&facts, topology.as_ref().map(|t| &t.edits));
    let instances = states.first().map_or(0, Vec::len);
    if instances > 0 {
        json["k2proxy"] = serde_json::json!({"instances": instances, "per_second": states});
    }
    if instances > 1 {
        let limits: Vec<Vec<Option<u64>>> = states
            .iter()
            .map(|r| r.iter().map(|s| s.map(|s| s.limit)).collect())
            .collect();
        json["fleet"] = serde_json::json!({"proxies": instances, "limits_per_second": limits});
        said.push_str(&format!(
            "per-instance admission limit, second half: {}\n",
            limits_text(&states)
        ));
    }
    drop(topology);
    let title = format!("{} — {label}", scenario.name);
    write_reports(&opts.out, &json, &report, &title, &verdicts, &said, &states)?;
    Ok(Outcome {
        label: label.to_string(),
        report,
        verdicts,
        json,
        facts: said,
        out: opts.out.clone(),
    })
}

/// The same load with admission as configured and with admission off.
pub async fn compare(scenario: &Scenario, opts: &Options) -> Result<(Outcome, Outcome), String> {
    let on = run(
        scenario,
        &Options {
            out: opts.out.join("admission-on"),
            ..opts.clone()
        },
        Some(true),
        "admission on",
    )
    .await?;
    // Let sockets of the first run close before the second binds new ports.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let off = run(
        scenario,
        &Options {
            out: opts.out.join("admission-off"),
            ..opts.clone()
        },
        Some(false),
        "admission off",
    )
    .await?;
    Ok((on, off))
}

/// Two runs side by side, one line per tier.
pub fn side_by_side(a: &Outcome, b: &Outcome) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<18} | {:^36} | {:^36}", "", a.label, b.label);
    let _ = writeln!(
        out,
        "{:<18} | {:>8} {:>9} {:>8} {:>8} | {:>8} {:>9} {:>8} {:>8}",
        "tier", "success", "p99 ms", "shed", "timeout", "success", "p99 ms", "shed", "timeout"
    );
    let (all_a, all_b) = (a.report.all(), b.report.all());
    let rows = a.report.targets.iter().chain(std::iter::once(&all_a));
    for ta in rows {
        let tb = if ta.name == "all" {
            Some(&all_b)
        } else {
            b.report.target(&ta.name)
        };
        let Some(tb) = tb else { continue };
        let _ = writeln!(
            out,
            "{:<18} | {:>7.2}% {:>9.1} {:>8} {:>8} | {:>7.2}% {:>9.1} {:>8} {:>8}",
            ta.name,
            ta.success() * 100.0,
            ms(&ta.ok_latency, 0.99),
            ta.outcomes.shed,
            ta.outcomes.timeout,
            tb.success() * 100.0,
            ms(&tb.ok_latency, 0.99),
            tb.outcomes.shed,
            tb.outcomes.timeout,
        );
    }
    let _ = writeln!(
        out,
        "generator send lag p99: {:.3} ms | {:.3} ms",
        a.report.lag_p99_ms(),
        b.report.lag_p99_ms()
    );
    out
}

/// `target/loadtest/<name>-<UTC timestamp>`.
pub fn default_out(scenario: &Scenario) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    Path::new("target/loadtest").join(format!("{}-{stamp}", scenario.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openloop::{Failure, TargetReport};

    fn report(events: &[(f64, bool)], failures: &[(f64, usize)]) -> Report {
        Report {
            targets: vec![TargetReport::new("merchant"), TargetReport::new(PURCHASE)],
            send_lag: crate::openloop::histogram(),
            elapsed: Duration::from_secs(60),
            timeline: Vec::new(),
            offered_rate: Vec::new(),
            events: events
                .iter()
                .map(|&(at_s, fault)| Event {
                    at_s,
                    what: String::new(),
                    fault,
                })
                .collect(),
            failures: failures
                .iter()
                .map(|&(at_s, kind)| Failure {
                    at_s,
                    kind,
                    shed: false,
                })
                .collect(),
        }
    }

    #[test]
    fn time_to_failover_is_the_longest_run_of_purchase_failures_after_a_fault() {
        // Faults at 10 s and 30 s, each recovered 10 s later.
        let events = [(10.0, true), (20.0, false), (30.0, true), (40.0, false)];
        let failures = [
            (9.9, 1),  // before the fault: in flight when it struck
            (10.2, 1), // the first fault: purchases fail for 0.5 s
            (10.5, 1),
            (12.0, 0), // a merchant request: not a purchase
            (30.1, 1), // the second: for 1.3 s
            (31.3, 1),
            (45.0, 1), // after the recovery: not the fault's
        ];
        let ttf = time_to_failover(&report(&events, &failures)).unwrap();
        assert!((ttf - 1300.0).abs() < 1e-6, "{ttf}");
        // A fault that cost nothing: 0; no fault at all: not measured.
        assert_eq!(time_to_failover(&report(&events, &[])), Some(0.0));
        assert_eq!(time_to_failover(&report(&[(5.0, false)], &failures)), None);
    }
}
