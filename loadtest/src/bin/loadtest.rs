//! `loadtest run --target URL --rate N --duration D`: a constant-rate,
//! open-loop load at a k2proxy (or any HTTP target), reporting outcomes and
//! latency from the intended send time. See `loadtest::openloop`.

use std::time::Duration;

use clap::{Parser, Subcommand};
use loadtest::openloop::{self, Plan};

#[derive(Parser)]
#[command(name = "loadtest", about = "Open-loop load generator for k2proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send a constant rate of GET requests for a fixed time.
    Run {
        /// Full URL, e.g. http://127.0.0.1:8080/checkout/x
        #[arg(long)]
        target: hyper::Uri,
        /// Requests per second (1 to 100000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        rate: u32,
        /// How long to send, e.g. 10s (at most 1h).
        #[arg(long, default_value = "10s", value_parser = parse_bounded)]
        duration: Duration,
        /// Per-request timeout.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Extra header, `name: value`; repeatable.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_bounded(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e}: expected e.g. 10s or 2m"))?;
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err("expected a duration from 1ms to 1h".into());
    }
    Ok(d)
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("header {s:?}: expected `name: value`"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

#[tokio::main]
async fn main() {
    let Command::Run {
        target,
        rate,
        duration,
        timeout,
        headers,
        json,
    } = Cli::parse().command;
    if target.scheme_str() != Some("http") || target.host().is_none() {
        eprintln!("loadtest: --target {target}: expected an http:// URL with a host");
        std::process::exit(2);
    }
    let report = openloop::run(Plan {
        url: target,
        rate,
        duration,
        timeout,
        headers,
    })
    .await;
    if json {
        let q = |p| report.latency.value_at_quantile(p) as f64 / 1000.0;
        let out = serde_json::json!({
            "sent": report.sent,
            "outcomes": report.outcomes,
            "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": report.latency.max() as f64 / 1000.0},
            "send_lag_p99_ms": report.send_lag.value_at_quantile(0.99) as f64 / 1000.0,
            "elapsed_s": report.elapsed.as_secs_f64(),
        });
        println!("{out}");
    } else {
        println!("{}", report.summary());
    }
}
