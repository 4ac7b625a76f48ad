//! `legacy-sim --listen 127.0.0.1:9001 --workers 8 --service-time 20ms`:
//! one simulated legacy backend. See `loadtest::sim`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use loadtest::sim::{self, SimConfig};

#[derive(Parser)]
#[command(
    name = "legacy-sim",
    about = "A capacity-limited model of the legacy checkout backend"
)]
struct Args {
    /// Address to listen on, ip:port (port 0 picks a free one and prints it).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Requests served at once; the rest queue.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Time each request holds a worker, e.g. 20ms.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    service_time: Duration,
    /// Name shown in responses (x-sim-name); defaults to the address.
    #[arg(long)]
    name: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let config = SimConfig {
        name: args.name.unwrap_or_else(|| args.listen.to_string()),
        workers: args.workers,
        service_time: args.service_time,
    };
    let name = config.name.clone();
    match sim::start(config, args.listen).await {
        Ok(handle) => {
            println!("legacy-sim {name} listening on http://{}", handle.addr);
            let _ = tokio::signal::ctrl_c().await;
        }
        Err(e) => {
            eprintln!("legacy-sim: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    }
}
