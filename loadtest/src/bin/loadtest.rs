//! `loadtest run SCENARIO.toml [--target URL] [--compare]`: runs a scenario
//! (docs/loadtest.md) — brings up its topology, plays the open-loop load with
//! live progress, writes text, JSON and HTML reports, and exits 1 when a
//! threshold is missed. `loadtest run --target URL --rate N --duration D`
//! (or `--mix`) runs a quick constant-rate load without a scenario file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loadtest::drill::{self, Options};
use loadtest::openloop::{self, Load, Plan, Target};
use loadtest::scenario::Scenario;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Open-loop load generator and drill runner for k2proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file, or a quick constant-rate load (--rate/--mix).
    Run {
        /// A scenario file (see loadtest/scenarios/ and docs/loadtest.md).
        scenario: Option<PathBuf>,
        /// With a scenario: the base URL to load (http://host:port) instead of
        /// bringing up its topology. Without: the full URL to GET.
        #[arg(long)]
        target: Option<String>,
        /// Run the scenario twice, with admission as configured and with
        /// admission off, and print both side by side.
        #[arg(long, requires = "scenario")]
        compare: bool,
        /// Where reports go (default target/loadtest/<name>-<time>/).
        #[arg(long, requires = "scenario")]
        out: Option<PathBuf>,
        /// The k2proxy binary for topologies (default: next to loadtest, or $K2PROXY).
        #[arg(long, requires = "scenario")]
        k2proxy: Option<PathBuf>,
        /// No live progress.
        #[arg(long, short)]
        quiet: bool,
        /// With a scenario: play it over and over (load stages and events)
        /// until this long, e.g. 30m (a soak; at most 24h).
        #[arg(long, requires = "scenario", value_parser = parse_repeat)]
        repeat_for: Option<Duration>,
        /// Without a scenario: a weighted target, `name=weight=URL`; repeatable.
        #[arg(long, value_parser = parse_mix, conflicts_with = "scenario")]
        mix: Vec<(String, f64, hyper::Uri)>,
        /// Without a scenario: requests per second (1 to 100000).
        #[arg(long, default_value_t = 100, conflicts_with = "scenario", value_parser = clap::value_parser!(u32).range(1..=100_000))]
        rate: u32,
        /// Without a scenario: how long to send, e.g. 10s (at most 1h).
        #[arg(long, default_value = "10s", conflicts_with = "scenario", value_parser = parse_bounded)]
        duration: Duration,
        /// Without a scenario: per-request timeout.
        #[arg(long, default_value = "5s", conflicts_with = "scenario", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Without a scenario: extra header, `name: value`; repeatable.
        #[arg(long = "header", value_parser = parse_header, conflicts_with = "scenario")]
        headers: Vec<(String, String)>,
        /// Without a scenario: independent clients the requests take turns
        /// on, each with its own keep-alive connections (1 to 10000; a
        /// scenario says `[load] clients`).
        #[arg(long, default_value_t = openloop::DEFAULT_CLIENTS as u32, conflicts_with = "scenario", value_parser = clap::value_parser!(u32).range(1..=openloop::MAX_CLIENTS as i64))]
        clients: u32,
        /// Print the report as JSON on stdout.
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

fn parse_repeat(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e}: expected e.g. 30m or 2h"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(24 * 3600) {
        return Err("expected a duration from 1s to 24h".into());
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

fn fail(code: i32, msg: &str) -> ! {
    eprintln!("loadtest: {msg}");
    std::process::exit(code);
}

fn check_base(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("--target {url}: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!("--target {url}: expected http://host:port"));
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let Command::Run {
        scenario,
        target,
        compare,
        out,
        k2proxy,
        quiet,
        repeat_for,
        mix,
        rate,
        duration,
        timeout,
        headers,
        clients,
        json,
    } = Cli::parse().command;

    let Some(path) = scenario else {
        let q = Quick {
            rate,
            duration,
            timeout,
            clients,
        };
        quick(target, mix, headers, q, json).await;
        return;
    };
    let mut scenario = Scenario::load(&path).unwrap_or_else(|e| fail(2, &e.to_string()));
    if let Some(total) = repeat_for {
        scenario = scenario.repeated(total);
    }
    if let Some(t) = &target {
        check_base(t).unwrap_or_else(|e| fail(2, &e));
    }
    let opts = Options {
        out: out.unwrap_or_else(|| drill::default_out(&scenario)),
        target,
        k2proxy: k2proxy.unwrap_or_else(loadtest::topology::k2proxy_binary),
        quiet,
    };
    let primary = if compare {
        let (on, off) = drill::compare(&scenario, &opts)
            .await
            .unwrap_or_else(|e| fail(2, &e));
        let table = drill::side_by_side(&on, &off);
        let _ = std::fs::write(opts.out.join("compare.txt"), &table);
        if json {
            println!(
                "{}",
                serde_json::json!({"admission_on": on.json, "admission_off": off.json})
            );
        } else {
            println!("{}\n{}", scenario.name, table);
            println!(
                "reports: {}\n         {}",
                on.html_path().display(),
                off.html_path().display()
            );
        }
        on
    } else {
        let o = drill::run(&scenario, &opts, None, "run")
            .await
            .unwrap_or_else(|e| fail(2, &e));
        if json {
            println!("{}", o.json);
        } else {
            print!("{}\n{}{}", scenario.name, o.report.summary(), o.facts);
            println!("report: {}", o.html_path().display());
        }
        o
    };
    let missed: Vec<_> = primary.verdicts.iter().filter(|v| !v.pass).collect();
    if !missed.is_empty() {
        eprintln!("loadtest: {} threshold(s) missed:", missed.len());
        for v in missed {
            eprintln!("  {v}");
        }
        std::process::exit(1);
    }
    if !primary.verdicts.is_empty() && !json {
        println!("all {} thresholds met", primary.verdicts.len());
    }
}

/// How a quick load sends, besides what to.
struct Quick {
    rate: u32,
    duration: Duration,
    timeout: Duration,
    clients: u32,
}

/// A constant-rate load without a scenario file.
async fn quick(
    target: Option<String>,
    mix: Vec<(String, f64, hyper::Uri)>,
    headers: Vec<(String, String)>,
    q: Quick,
    json: bool,
) {
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
        let url: hyper::Uri = url
            .parse()
            .unwrap_or_else(|e| fail(2, &format!("--target {url}: {e}")));
        targets.push(Target {
            name: url.path().to_string(),
            url,
            weight: 1.0,
            headers,
            body: None,
        });
    }
    if targets.is_empty() {
        fail(
            2,
            "give a SCENARIO file, or --target URL or --mix name=weight=URL",
        );
    }
    for t in &targets {
        if t.url.scheme_str() != Some("http") || t.url.host().is_none() {
            fail(
                2,
                &format!("{}: expected an http:// URL with a host", t.url),
            );
        }
    }
    let mut load = Load::from(Plan {
        targets,
        rate: q.rate,
        duration: q.duration,
        timeout: q.timeout,
        seed: 1,
    });
    load.clients = q.clients as usize;
    let report = openloop::run_unwatched(load).await;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
}
