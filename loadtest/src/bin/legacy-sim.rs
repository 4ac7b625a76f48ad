//! `legacy-sim --listen 127.0.0.1:9001 --workers 8 --service 20ms`: one
//! simulated legacy backend. See `loadtest::sim`.

use std::net::SocketAddr;

use clap::Parser;
use loadtest::sim::{self, Dist, SimConfig};

#[derive(Parser)]
#[command(
    name = "legacy-sim",
    about = "A capacity-limited model of the legacy checkout backend"
)]
struct Args {
    /// Address to listen on, ip:port (port 0 picks a free one and prints it).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// A second listener serving only /_sim/stats and /_sim/fault, untouched
    /// by faults (so a `refuse` fault can be cleared).
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Requests served at once; the rest queue.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    workers: u32,
    /// Service time: `20ms`, `uniform(10ms, 30ms)` or `lognormal(20ms, 0.5)`.
    #[arg(long, alias = "service-time", default_value = "20ms")]
    service: Dist,
    /// Service time for a path prefix, `PREFIX=DIST`, e.g.
    /// `/reports/=lognormal(200ms, 0.8)`; repeatable, first match wins.
    #[arg(long = "class", value_parser = parse_class)]
    classes: Vec<(String, Dist)>,
    /// Requests allowed to wait for a worker (beyond: 503); 0 = unbounded.
    #[arg(long, default_value_t = 0)]
    queue: usize,
    /// Congestion collapse: each waiting request adds collapse/workers to
    /// the service-time factor (0 = an ideal queue).
    #[arg(long, default_value_t = 0.0)]
    collapse: f64,
    /// Name shown in responses (x-sim-name); defaults to the address.
    #[arg(long)]
    name: Option<String>,
}

fn parse_class(s: &str) -> Result<(String, Dist), String> {
    let (prefix, dist) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PREFIX=DIST, e.g. /reports/=200ms"))?;
    if !prefix.starts_with('/') {
        return Err(format!("{s:?}: the path prefix must start with /"));
    }
    Ok((prefix.to_string(), dist.parse()?))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if !(0.0..=100.0).contains(&args.collapse) {
        eprintln!(
            "legacy-sim: --collapse {}: expected 0 to 100",
            args.collapse
        );
        std::process::exit(2);
    }
    let config = SimConfig {
        name: args.name.unwrap_or_else(|| args.listen.to_string()),
        workers: args.workers as usize,
        service: args.service,
        classes: args.classes,
        queue: args.queue,
        collapse: args.collapse,
    };
    let name = config.name.clone();
    let capacity = config.capacity();
    let handle = match sim::start(config, args.listen).await {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("legacy-sim: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    println!(
        "legacy-sim {name} listening on http://{} (capacity {capacity:.0} req/s)",
        handle.addr
    );
    if let Some(control) = args.control {
        let listener = match tokio::net::TcpListener::bind(control).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("legacy-sim: cannot listen on --control {control}: {e}");
                std::process::exit(1);
            }
        };
        println!(
            "control on http://{}",
            listener.local_addr().unwrap_or(control)
        );
        tokio::spawn(handle.sim.clone().serve_control(listener));
    }
    let _ = tokio::signal::ctrl_c().await;
}
