//! `loadtest run --target URL --rate N --duration D`: a constant-rate,
//! open-loop load at a k2proxy (or any HTTP target), reporting outcomes and
//! latency from the intended send time. See `loadtest::openloop`.

use std::time::Duration;

use clap::{Parser, Subcommand};
use loadtest::openloop::{self, Plan, Target};

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
        /// Full URL, e.g. http://127.0.0.1:8080/checkout/x (when no --mix is given).
        #[arg(long, required_unless_present = "mix")]
        target: Option<hyper::Uri>,
        /// A weighted target, `name=weight=URL`, e.g.
        /// `purchase=20=http://127.0.0.1:8080/checkout/x`; repeatable.
        #[arg(long, value_parser = parse_mix)]
        mix: Vec<(String, f64, hyper::Uri)>,
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

fn parse_mix(s: &str) -> Result<(String, f64, hyper::Uri), String> {
    let mut parts = s.splitn(3, '=');
    let (Some(name), Some(weight), Some(url)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{s:?}: expected name=weight=URL"));
    };
    let weight: f64 = weight
        .parse()
        .ok()
        .filter(|w: &f64| *w > 0.0)
        .ok_or_else(|| format!("{s:?}: weight {weight:?} must be a positive number"))?;
    let url: hyper::Uri = url.parse().map_err(|e| format!("{s:?}: bad URL: {e}"))?;
    Ok((name.to_string(), weight, url))
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
        mix,
        rate,
        duration,
        timeout,
        headers,
        json,
    } = Cli::parse().command;
    let mut targets: Vec<Target> = mix
        .into_iter()
        .map(|(name, weight, url)| Target {
            name,
            url,
            weight,
            headers: headers.clone(),
            body: None,
        })
        .collect();
    if let Some(url) = target {
        targets.push(Target {
            name: url.path().to_string(),
            url,
            weight: 1.0,
            headers,
            body: None,
        });
    }
    for t in &targets {
        if t.url.scheme_str() != Some("http") || t.url.host().is_none() {
            eprintln!("loadtest: {}: expected an http:// URL with a host", t.url);
            std::process::exit(2);
        }
    }
    let report = openloop::run(Plan {
        targets,
        rate,
        duration,
        timeout,
        seed: 1,
    })
    .await;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
}
