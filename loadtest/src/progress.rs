//! Live progress while a load runs: on a terminal an indicatif bar with the
//! elapsed time, offered and achieved rate, and each tier's success so far;
//! elsewhere (CI logs) one plain line every ten seconds.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::openloop::Live;

/// Shows progress until the returned handle is aborted or the run ends.
pub fn show(
    live: Arc<Live>,
    total: Duration,
    label: String,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let terminal = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(
            Some(total.as_millis() as u64),
            if terminal {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {percent:>3}%\n  {msg}",
            )
            .expect("static template"),
        );
        bar.set_prefix(label.clone());
        let start = Instant::now();
        let mut last = (start, 0u64, 0u64);
        let mut last_line = start;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = Instant::now();
            let (sent, done) = (Live::total(&live.sent), Live::total(&live.done));
            let dt = (now - last.0).as_secs_f64().max(1e-3);
            let offered = (sent - last.1) as f64 / dt;
            let achieved = (done - last.2) as f64 / dt;
            last = (now, sent, done);
            let tiers: Vec<String> = live
                .names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let d = live.done[i].load(Ordering::Relaxed);
                    let ok = live.ok[i].load(Ordering::Relaxed);
                    if d == 0 {
                        format!("{n} -")
                    } else {
                        format!("{n} {:.1}%", ok as f64 * 100.0 / d as f64)
                    }
                })
                .collect();
            let msg = format!(
                "offered {offered:.0}/s  answered {achieved:.0}/s  sent {sent}  |  success {}",
                tiers.join("  ")
            );
            bar.set_position((now - start).as_millis().min(total.as_millis()) as u64);
            bar.set_message(msg.clone());
            if !terminal && now - last_line >= Duration::from_secs(10) {
                eprintln!("{label} {:>5.0}s  {msg}", (now - start).as_secs_f64());
                last_line = now;
            }
            if live.finished.load(Ordering::Relaxed)
                || now - start > total + Duration::from_secs(600)
            {
                break;
            }
        }
        bar.finish_and_clear();
    })
}
