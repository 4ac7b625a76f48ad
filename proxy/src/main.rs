//! `k2proxy`: run the proxy, or check its config files.
//!
//! `k2proxy run [--routes routes.toml] [--policy FILE]` starts the pingora
//! server; `k2proxy check` validates both files and exits 0 or 1. See
//! `docs/operations.md`.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use proxy::config::{self, Paths};
use proxy::server::{self, RunOptions};
use proxy::Shared;

/// mimalloc over glibc malloc: see docs/benchmarks.md for the side-by-side.
#[global_allocator]
static GLOBAL: proxy::allocator::MiMalloc = proxy::allocator::MiMalloc;

#[derive(Parser)]
#[command(
    name = "k2proxy",
    version,
    about = "Load-shedding reverse proxy for payment checkouts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Files {
    /// Routes file (listeners, clusters, sites, routes).
    #[arg(long, default_value = "routes.toml")]
    routes: PathBuf,
    /// Policy file; overrides `[server].policy` in the routes file.
    #[arg(long)]
    policy: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[command(flatten)]
        files: Files,
        /// Log format of the access log and every other event.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Take over the listeners of a running k2proxy (graceful upgrade).
        #[arg(long)]
        upgrade: bool,
        /// Write the log (the access log and every other event) to this file
        /// instead of stderr; reopened on SIGUSR1 (logrotate's convention).
        #[arg(long, value_name = "PATH")]
        log_file: Option<std::path::PathBuf>,
        /// For trying k2proxy out: one more HTTPS listener (h2 and HTTP/1.1)
        /// on a localhost certificate made on first run in `certs/dev/`
        /// next to the routes file (with `ca.pem` to give curl). Never in
        /// production.
        #[arg(long, value_name = "IP:PORT")]
        dev_tls: Option<std::net::SocketAddr>,
    },
    /// Validate the routes and policy files, then exit (0 valid, 1 invalid).
    Check {
        #[command(flatten)]
        files: Files,
    },
}

fn paths(files: Files) -> Paths {
    Paths {
        routes: files.routes,
        policy: files.policy,
        dev_tls: None,
    }
}

/// `--dev-tls`: the development certificate, made if missing.
fn dev_tls(paths: &mut Paths, listen: std::net::SocketAddr) -> Result<PathBuf, String> {
    let dir = paths
        .routes
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("certs/dev");
    let (cert, key, ca) = proxy::tls::dev::ensure_localhost(&dir)?;
    paths.dev_tls = Some(config::DevTls { listen, cert, key });
    Ok(ca)
}

/// Logs to stderr through a writer thread (`proxy::logbuf`): a request
/// never waits for I/O. The guard writes what is left before the process
/// exits.
fn init_logs(
    format: LogFormat,
    file: Option<std::path::PathBuf>,
) -> Result<proxy::logbuf::Guard, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = file.is_none() && std::io::stderr().is_terminal();
    let output = file.map_or(proxy::logbuf::Output::Stderr, proxy::logbuf::Output::File);
    let (writer, guard) = proxy::logbuf::writer(output)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match (format, ansi) {
        // The same text as tracing's default fields, for less work.
        (LogFormat::Text, false) => builder.fmt_fields(proxy::logfmt::PlainFields).init(),
        (LogFormat::Text, true) => builder.init(),
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
    }
    Ok(guard)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => match config::load(&paths(files)) {
            Ok(config) => {
                println!("ok: {}", config.summary());
                for (line, soon) in proxy::tls::certificate_report(&config, proxy::tls::now_unix())
                {
                    if soon {
                        println!("warning: {line}: renew it");
                    } else {
                        println!("  {line}");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            files,
            log_format,
            upgrade,
            log_file,
            dev_tls: dev_listen,
        } => {
            let mut paths = paths(files);
            let mut dev_ca = None;
            if let Some(listen) = dev_listen {
                match dev_tls(&mut paths, listen) {
                    Ok(ca) => dev_ca = Some((listen, ca)),
                    Err(e) => {
                        eprintln!("k2proxy: --dev-tls: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            let config = match config::load(&paths) {
                Ok(s) => s,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("k2proxy: refusing to start with an invalid config");
                    return ExitCode::FAILURE;
                }
            };
            let log_guard = match init_logs(log_format, log_file) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("k2proxy: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(
                listen = ?config.server.listen,
                admin = %config.server.admin,
                "{}",
                config.summary()
            );
            for (line, soon) in proxy::tls::certificate_report(&config, proxy::tls::now_unix()) {
                if soon {
                    tracing::warn!("{line}: renew it");
                } else {
                    tracing::info!("{line}");
                }
            }
            if let Some((listen, ca)) = dev_ca {
                tracing::info!(
                    "development HTTPS on {listen}: curl --cacert {} https://localhost:{}/checkout/x",
                    ca.display(),
                    listen.port()
                );
            }
            let sighup = match proxy::reload::sighup_flag() {
                Ok(flag) => flag,
                Err(e) => {
                    eprintln!("k2proxy: cannot handle SIGHUP: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let admin_token = std::env::var("K2PROXY_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty());
            if !config.server.admin.ip().is_loopback() && admin_token.is_none() {
                tracing::warn!(
                    admin = %config.server.admin,
                    "the admin listener is not on loopback and no K2PROXY_ADMIN_TOKEN is set: anyone who reaches it can reload the config"
                );
            }
            let shared = Arc::new(Shared::new(config, paths.clone(), admin_token));
            server::run(shared, &RunOptions { upgrade, sighup });
            drop(log_guard); // the last lines, written before exit
            ExitCode::SUCCESS
        }
    }
}
