//! A run's report as a text table, JSON, and a self-contained HTML page with
//! SVG charts (plotters; no external assets): offered load vs goodput per
//! tier, latency p50/p99 per tier, shed share per tier, each over time with
//! the run's events (faults, reloads) marked on the time axis.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

use crate::openloop::{Report, TargetReport};
use crate::thresholds::Verdict;
use crate::topology::{SiteState, States};

/// The generator's own p99 send lag must stay under this to be trusted.
pub const LAG_BUDGET_MS: f64 = 1.0;

pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The highest value recorded, in ms (0 when none).
pub(crate) fn max_ms(h: &Histogram<u64>) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.max() as f64 / 1000.0
}

impl Report {
    pub fn lag_p99_ms(&self) -> f64 {
        ms(&self.send_lag, 0.99)
    }

    /// One line about the generator: its rate and its own lag.
    pub fn generator_line(&self) -> String {
        let lag = self.lag_p99_ms();
        format!(
            "sent {} in {:.1}s ({:.0}/s), generator send lag p99 {:.3} ms, max {:.3} ms{}",
            self.sent(),
            self.elapsed.as_secs_f64(),
            self.sent() as f64 / self.elapsed.as_secs_f64().max(1e-9),
            lag,
            self.send_lag.max() as f64 / 1000.0,
            if lag > LAG_BUDGET_MS {
                " (over 1 ms: the generator itself fell behind; latencies from the intended time include it)"
            } else {
                ""
            }
        )
    }

    /// A text table, one line per tier and one for all together.
    pub fn summary(&self) -> String {
        let mut out = self.generator_line();
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<18} {:>7} {:>8} {:>7} {:>6} {:>6} {:>7} {:>9} {:>9} {:>12} {:>10}",
            "tier",
            "sent",
            "success",
            "shed",
            "429",
            "error",
            "timeout",
            "p50 ms",
            "p99 ms",
            "p99 sent ms",
            "shed p99"
        );
        let all = self.all();
        for t in self.targets.iter().chain(std::iter::once(&all)) {
            let o = &t.outcomes;
            let _ = writeln!(
                out,
                "{:<18} {:>7} {:>7.2}% {:>7} {:>6} {:>6} {:>7} {:>9.1} {:>9.1} {:>12.1} {:>10.1}",
                t.name,
                t.sent,
                t.success() * 100.0,
                o.shed,
                o.rate_limited,
                o.error,
                o.timeout,
                ms(&t.ok_latency, 0.5),
                ms(&t.ok_latency, 0.99),
                ms(&t.ok_latency_sent, 0.99),
                ms(&t.shed_latency, 0.99),
            );
        }
        if all.outcomes.retried > 0 {
            let _ = writeln!(
                out,
                "retried {}: sent again once after the server closed a kept-alive connection before answering (idempotent requests, as browsers, curl and Go do)",
                all.outcomes.retried
            );
        }
        out
    }

    /// Latency of target `i`'s successful responses sent (by intended send
    /// time) after the run's first second: without a cold start's climb,
    /// which a proxy that starts into the load spends there (one instance
    /// on 64 workers of 50 ms: purchase p99 238 ms in the first second
    /// against 97 after it, the median of 220 real runs).
    pub fn ok_latency_after_first_second(&self, i: usize) -> Histogram<u64> {
        let mut h = crate::openloop::coarse_histogram();
        for sec in self.timeline.iter().skip(1) {
            // Both are coarse histograms of the same bounds.
            let _ = h.add(&sec.ok_latency[i]);
        }
        h
    }

    /// The report as JSON (see docs/loadtest.md for the fields).
    pub fn to_json(&self) -> serde_json::Value {
        let lat = |h: &Histogram<u64>| {
            serde_json::json!({
                "p50": ms(h, 0.5), "p90": ms(h, 0.9), "p99": ms(h, 0.99),
                "p999": ms(h, 0.999), "max": h.max() as f64 / 1000.0,
            })
        };
        let tier = |t: &TargetReport| {
            serde_json::json!({
                "name": t.name,
                "sent": t.sent,
                "success": t.success(),
                "shed_share": t.share(t.outcomes.shed),
                "outcomes": t.outcomes,
                "ok_ms": lat(&t.ok_latency),
                "ok_from_send_ms": lat(&t.ok_latency_sent),
                "shed_ms": lat(&t.shed_latency),
            })
        };
        let timeline: Vec<_> = self
            .timeline
            .iter()
            .enumerate()
            .map(|(s, sec)| {
                let tiers: serde_json::Map<_, _> = self
                    .targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let o = &sec.outcomes[i];
                        (
                            t.name.clone(),
                            serde_json::json!({
                                "offered": o.total(), "ok": o.ok, "shed": o.shed,
                                "rate_limited": o.rate_limited, "error": o.error,
                                "timeout": o.timeout,
                                "p50_ms": ms(&sec.ok_latency[i], 0.5),
                                "p99_ms": ms(&sec.ok_latency[i], 0.99),
                                "shed_p99_ms": ms(&sec.shed_latency[i], 0.99),
                                "shed_max_ms": max_ms(&sec.shed_latency[i]),
                            }),
                        )
                    })
                    .collect();
                serde_json::json!({"second": s, "offered_rate": self.offered_rate[s], "tiers": tiers})
            })
            .collect();
        serde_json::json!({
            "sent": self.sent(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "generator": {
                "send_lag_p99_ms": self.lag_p99_ms(),
                "send_lag_max_ms": self.send_lag.max() as f64 / 1000.0,
                "within_budget": self.lag_p99_ms() <= LAG_BUDGET_MS,
            },
            "targets": self
                .targets
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let mut json = tier(t);
                    json["ok_after_first_second_ms"] = lat(&self.ok_latency_after_first_second(i));
                    json
                })
                .collect::<Vec<_>>(),
            "all": tier(&self.all()),
            "timeline": timeline,
            "events": self.events,
        })
    }

    /// A self-contained HTML page: title, summary table, threshold verdicts,
    /// and the charts; with `states` (each k2proxy instance's admission
    /// state, sampled every second), a chart of them too.
    pub fn html(&self, title: &str, verdicts: &[Verdict], states: &States) -> String {
        let mut page = String::new();
        let _ = write!(
            page,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
             body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}}\
             pre{{background:#f4f4f4;padding:12px;overflow-x:auto}}\
             .pass{{color:#1a7f37}} .fail{{color:#c62828;font-weight:bold}}\
             h2{{margin-top:32px}}</style></head><body><h1>{t}</h1>",
            t = escape(title)
        );
        let _ = write!(page, "<pre>{}</pre>", escape(&self.summary()));
        if !verdicts.is_empty() {
            page.push_str("<h2>Thresholds</h2><ul>");
            for v in verdicts {
                let _ = write!(
                    page,
                    "<li class=\"{}\">{} {}</li>",
                    if v.pass { "pass" } else { "fail" },
                    if v.pass { "pass" } else { "MISSED" },
                    escape(&v.to_string())
                );
            }
            page.push_str("</ul>");
        }
        if !self.events.is_empty() {
            page.push_str("<h2>Events</h2><ul>");
            for e in &self.events {
                let _ = write!(page, "<li>{:.1}s: {}</li>", e.at_s, escape(&e.what));
            }
            page.push_str("</ul>");
        }
        for (heading, svg) in [
            (
                "Offered load and goodput per tier (requests/s)",
                self.chart_goodput(),
            ),
            (
                "Latency per tier, p50 and p99 (ms, from the intended send time)",
                self.chart_latency(),
            ),
            (
                "Shed share per tier (share of that tier's requests)",
                self.chart_shed(),
            ),
        ] {
            let _ = write!(page, "<h2>{heading}</h2>{svg}");
        }
        if !states.is_empty() {
            let _ = write!(
                page,
                "<h2>k2proxy admission at the first site, per instance: limit, in flight at \
                 the backend, waiting in k2proxy's queue (requests, sampled each second)</h2>{}",
                self.chart_states(states)
            );
            let _ = write!(
                page,
                "<h2>The backend's latency as each k2proxy instance sees it (ms, the last \
                 window's mean), the uncongested latency its limit learned (lighter: \
                 a fleet's instances should agree on it), and the latency over which its \
                 limit shrinks, its ceiling plus what it claims while its purchases wait \
                 (thin: the instance whose line runs lowest holds the smallest share)</h2>{}",
                self.chart_learnt(states)
            );
        }
        page.push_str("</body></html>\n");
        page
    }

    fn seconds(&self) -> usize {
        self.timeline.len()
    }

    /// Per-second series of tier `i` with `f` over that second's outcomes.
    fn series(&self, i: usize, f: impl Fn(usize) -> Option<f64>) -> Vec<(f64, f64)> {
        (0..self.seconds())
            .filter(|_| i < self.targets.len())
            .filter_map(|s| f(s).map(|v| (s as f64 + 0.5, v)))
            .collect()
    }

    fn chart_goodput(&self) -> String {
        let peak = self.offered_rate.iter().copied().fold(1.0, f64::max).max(
            (0..self.seconds())
                .flat_map(|s| self.timeline[s].outcomes.iter().map(|o| o.total() as f64))
                .fold(0.0, f64::max),
        );
        let mut lines = vec![Line {
            label: "offered, all tiers".into(),
            color: RGBColor(120, 120, 120),
            width: 3,
            points: (0..self.seconds())
                .map(|s| (s as f64 + 0.5, self.offered_rate[s]))
                .collect(),
        }];
        for (i, t) in self.targets.iter().enumerate() {
            let c = palette(i);
            lines.push(Line {
                label: format!("{} offered", t.name),
                color: lighter(c),
                width: 1,
                points: self.series(i, |s| Some(self.timeline[s].outcomes[i].total() as f64)),
            });
            lines.push(Line {
                label: format!("{} goodput", t.name),
                color: c,
                width: 2,
                points: self.series(i, |s| Some(self.timeline[s].outcomes[i].ok as f64)),
            });
        }
        self.chart(&lines, 0.0..peak * 1.1, false, "req/s")
    }

    fn chart_latency(&self) -> String {
        let mut lines = Vec::new();
        let mut top: f64 = 10.0;
        for (i, t) in self.targets.iter().enumerate() {
            for (q, width, label) in [(0.5, 1, "p50"), (0.99, 2, "p99")] {
                let points = self.series(i, |s| {
                    let h = &self.timeline[s].ok_latency[i];
                    (!h.is_empty()).then(|| ms(h, q).max(1.0))
                });
                top = points.iter().map(|p| p.1).fold(top, f64::max);
                lines.push(Line {
                    label: format!("{} {label}", t.name),
                    color: if q < 0.9 {
                        lighter(palette(i))
                    } else {
                        palette(i)
                    },
                    width,
                    points,
                });
            }
        }
        self.chart(&lines, 1.0..top * 1.5, true, "ms")
    }

    fn chart_shed(&self) -> String {
        let lines: Vec<_> = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| Line {
                label: t.name.clone(),
                color: palette(i),
                width: 2,
                points: self.series(i, |s| {
                    let o = &self.timeline[s].outcomes[i];
                    (o.total() > 0).then(|| o.shed as f64 / o.total() as f64)
                }),
            })
            .collect();
        self.chart(&lines, 0.0..1.05, false, "shed share")
    }

    /// Each instance's limit, in-flight and queued requests over the run,
    /// on a log scale (a queue of a thousand beside a limit of twenty).
    fn chart_states(&self, states: &States) -> String {
        let kinds: [Kind; 3] = [
            ("limit", |s| Some(s.limit as f64), 2, false),
            ("in flight", |s| Some(s.inflight as f64), 1, true),
            ("queued", |s| Some(s.queued as f64), 1, false),
        ];
        // A log scale has no 0: an idle second shows as 1.
        let (lines, top) = instance_lines(states, &kinds, 1.0);
        self.chart(&lines, 1.0..top.max(10.0) * 1.5, true, "requests")
    }

    /// Each instance's latency, learnt baseline and the latency over which
    /// its limit shrinks (ceiling plus claim) over the run, in ms: in a
    /// fleet, the instance whose line runs lowest is the one short of its
    /// share.
    fn chart_learnt(&self, states: &States) -> String {
        let kinds: [Kind; 3] = [
            ("latency", |s| s.latency_ms, 2, false),
            ("baseline", |s| s.baseline_ms, 1, true),
            ("shrinks over", |s| s.shrinks_over_ms, 1, false),
        ];
        let (lines, top) = instance_lines(states, &kinds, 0.0);
        self.chart(&lines, 0.0..top.max(1.0) * 1.2, false, "ms")
    }

    /// One chart: lines over the run's seconds, events as vertical rules.
    fn chart(&self, lines: &[Line], y: std::ops::Range<f64>, log: bool, y_desc: &str) -> String {
        let mut svg = String::new();
        let x_end = self.seconds().max(1) as f64;
        {
            let root = SVGBackend::with_string(&mut svg, (1000, 380)).into_drawing_area();
            let _ = root.fill(&WHITE);
            let result = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
                let mut builder = ChartBuilder::on(&root);
                builder
                    .margin(12)
                    .x_label_area_size(36)
                    .y_label_area_size(64);
                if log {
                    let chart = builder.build_cartesian_2d(0f64..x_end, y.clone().log_scale())?;
                    draw_chart(chart, lines, &self.events, y.clone(), y_desc)?;
                } else {
                    let chart = builder.build_cartesian_2d(0f64..x_end, y.clone())?;
                    draw_chart(chart, lines, &self.events, y.clone(), y_desc)?;
                }
                root.present()?;
                Ok(())
            })();
            if let Err(e) = result {
                return format!("<p>chart failed: {}</p>", escape(&e.to_string()));
            }
        }
        svg
    }
}

/// A series of each instance's state: name, value, line width, lighter.
type Kind = (&'static str, fn(&SiteState) -> Option<f64>, u32, bool);

/// One line per instance and kind, in the instance's colour, and the
/// highest value; values under `floor` are drawn at it.
fn instance_lines(states: &States, kinds: &[Kind], floor: f64) -> (Vec<Line>, f64) {
    let instances = states.iter().map(Vec::len).max().unwrap_or(0);
    let mut lines = Vec::new();
    let mut top: f64 = 0.0;
    for i in 0..instances {
        for &(what, pick, width, light) in kinds {
            // Sample n was taken at the end of second n.
            let points: Vec<(f64, f64)> = states
                .iter()
                .enumerate()
                .filter_map(|(n, row)| {
                    let v = pick(&row.get(i).copied().flatten()?)?;
                    Some((n as f64 + 1.0, v.max(floor)))
                })
                .collect();
            top = points.iter().map(|p| p.1).fold(top, f64::max);
            let c = palette(i);
            lines.push(Line {
                label: format!("k2proxy {i} {what}"),
                color: if light { lighter(c) } else { c },
                width,
                points,
            });
        }
    }
    (lines, top)
}

struct Line {
    label: String,
    color: RGBColor,
    width: u32,
    points: Vec<(f64, f64)>,
}

/// Mesh, event rules, lines and legend on a chart of either y scale.
fn draw_chart<'a, DB, X, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: &[Line],
    events: &[crate::openloop::Event],
    y: std::ops::Range<f64>,
    y_desc: &str,
) -> Result<(), Box<dyn std::error::Error + 'a>>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .draw()?;
    for e in events {
        let red = RGBColor(200, 40, 40);
        chart.draw_series(LineSeries::new(
            [(e.at_s, y.start), (e.at_s, y.end)],
            red.stroke_width(1),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            e.what.clone(),
            (e.at_s, y.end),
            ("sans-serif", 12).into_font().color(&red),
        )))?;
    }
    for l in lines {
        let style = l.color.stroke_width(l.width);
        let color = l.color;
        // A second without data (no successful request) breaks the line
        // instead of bridging it.
        let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
        for p in &l.points {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|q| p.0 - q.0 <= 1.01) => run.push(*p),
                _ => runs.push(vec![*p]),
            }
        }
        for (i, run) in runs.into_iter().enumerate() {
            let series = chart.draw_series(LineSeries::new(run, style))?;
            if i == 0 {
                series.label(l.label.clone()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            }
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

fn palette(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
    ];
    COLORS[i % COLORS.len()]
}

fn lighter(c: RGBColor) -> RGBColor {
    let l = |v: u8| v + (255 - v) / 2;
    RGBColor(l(c.0), l(c.1), l(c.2))
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::openloop::{coarse_histogram, histogram, Outcomes, Second};

    #[test]
    fn the_latency_after_the_first_second_leaves_a_cold_start_out() {
        // A proxy climbing to the knee in the first second (400 ms), then
        // settled (50 and 60 ms).
        let mut purchase = TargetReport::new("purchase");
        let mut timeline = Vec::new();
        for ms in [400u64, 50, 60] {
            let mut second = coarse_histogram();
            for _ in 0..100 {
                second.record(ms * 1000).unwrap();
                purchase.ok_latency.record(ms * 1000).unwrap();
            }
            timeline.push(Second {
                outcomes: vec![Outcomes::default()],
                ok_latency: vec![second],
                shed_latency: vec![coarse_histogram()],
            });
        }
        let json = report(purchase, timeline).to_json();
        let p99 = |field: &str| json["targets"][0][field]["p99"].as_f64().unwrap();
        assert!(p99("ok_ms") >= 399.0, "the whole run: {}", p99("ok_ms"));
        let after = p99("ok_after_first_second_ms");
        assert!(
            (59.0..=61.0).contains(&after),
            "after the first second: {after}"
        );
    }

    fn report(target: TargetReport, timeline: Vec<Second>) -> Report {
        Report {
            targets: vec![target],
            send_lag: histogram(),
            elapsed: Duration::from_secs(timeline.len() as u64),
            offered_rate: vec![0.0; timeline.len()],
            timeline,
            events: Vec::new(),
            failures: Vec::new(),
        }
    }

    #[test]
    fn the_timeline_shows_when_refusals_were_slow() {
        // A peak's onset refused after 300 ms, then at once (3 ms).
        let mut timeline = Vec::new();
        for ms in [300u64, 3] {
            let mut shed = coarse_histogram();
            for i in 0..100 {
                shed.record(ms * 1000 * (i + 1) / 100).unwrap();
            }
            timeline.push(Second {
                outcomes: vec![Outcomes::default()],
                ok_latency: vec![coarse_histogram()],
                shed_latency: vec![shed],
            });
        }
        let json = report(TargetReport::new("merchant"), timeline).to_json();
        let at = |s: usize, field: &str| {
            json["timeline"][s]["tiers"]["merchant"][field]
                .as_f64()
                .unwrap()
        };
        assert!(
            (295.0..=305.0).contains(&at(0, "shed_max_ms")),
            "{}",
            at(0, "shed_max_ms")
        );
        assert!(at(0, "shed_p99_ms") >= 290.0, "{}", at(0, "shed_p99_ms"));
        assert!(at(1, "shed_max_ms") <= 3.05, "{}", at(1, "shed_max_ms"));
    }
}
