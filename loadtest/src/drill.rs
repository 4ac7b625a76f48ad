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
use crate::scenario::Scenario;
use crate::thresholds::Verdict;
use crate::topology::Topology;

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

/// Plays the load, with the scenario's events beside it on the same clock;
/// gives the topology back for its post-mortem.
async fn play(
    scenario: &Scenario,
    base: &str,
    mut topology: Option<Topology>,
    opts: &Options,
    label: &str,
) -> Result<(Report, Option<Topology>), String> {
    let load = scenario.load_against(base)?;
    let total = load.schedule.duration();
    let live = Live::new(&load);
    let progress = crate::progress::show(live.clone(), total, label.to_string(), opts.quiet);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let occurrences = scenario.events.clone();
    let events = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut log = Vec::new();
        for o in occurrences {
            tokio::select! {
                _ = tokio::time::sleep_until(start + o.at) => {}
                _ = &mut stop_rx => break,
            }
            if let Some(t) = topology.as_mut() {
                let what = t.apply(&o.action).await;
                log.push(Event {
                    at_s: start.elapsed().as_secs_f64(),
                    what,
                });
            }
        }
        let _ = stop_rx.await;
        (topology, log)
    });
    let mut report = run_load(load, live.clone()).await;
    let _ = stop_tx.send(());
    let (topology, log) = events.await.map_err(|e| format!("events task: {e}"))?;
    report.events = log;
    let _ = progress.await;
    Ok((report, topology))
}

/// report.json, summary.txt and report.html in `out`.
fn write_reports(
    out: &Path,
    json: &serde_json::Value,
    report: &Report,
    title: &str,
    verdicts: &[Verdict],
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let files = [
        (
            "report.json",
            serde_json::to_string_pretty(json).unwrap_or_default(),
        ),
        ("summary.txt", report.summary()),
        ("report.html", report.html(title, verdicts)),
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
    let (report, topology) = play(&scenario, &base, topology, opts, label).await?;
    let verdicts: Vec<Verdict> = scenario
        .thresholds
        .iter()
        .map(|t| t.check(&report))
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
    if let Some(t) = &topology {
        let (all, unsafe_) = t.duplicates();
        json["backend"] = serde_json::json!({
            "duplicate_request_ids": all,
            "duplicate_non_idempotent": unsafe_,
            "config": t.reload_state().await,
        });
    }
    drop(topology);
    let title = format!("{} — {label}", scenario.name);
    write_reports(&opts.out, &json, &report, &title, &verdicts)?;
    Ok(Outcome {
        label: label.to_string(),
        report,
        verdicts,
        json,
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
