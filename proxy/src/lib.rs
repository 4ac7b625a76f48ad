//! k2proxy: the load-shedding front tier of a payment checkout, on pingora.
//!
//! A request meets the stages in the order of the modules below: [`config`]
//! is the checked configuration (pure data) and `runtime` the live state
//! built for it, together one `runtime::Generation` that [`reload`] swaps;
//! `gateway` (pingora's `ProxyHttp`) runs the request through its stages
//! (route with [`classify`], rate limit with `limits`, choose a site with
//! the `failover` crate, admit with [`admission`]) and answers every request
//! it refuses with one `gateway::Reply`; `metrics` and the access log
//! record it, and `admin` serves `/metrics`, `/status`, the status page
//! and `/reload`. The binary (`main.rs`) wires them into a pingora server.
//! Start with `docs/concepts.md`; the files ops edit are described in
//! `docs/routes.md` and `docs/policy.md`.

#![deny(unsafe_code)]

// What other crates use: the binary (config, server, reload, allocator,
// Shared), the tests and benchmarks (admission, classify, config).
mod admin;
pub mod admission;
pub mod allocator;
pub mod classify;
pub mod config;
mod edge;
mod gateway;
mod health;
mod limits;
pub mod logbuf;
pub mod logfmt;
mod metrics;
mod process;
pub mod reload;
mod remember;
mod runtime;
pub mod server;
mod stats;
pub mod tls;
mod xmlrpc;

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use arc_swap::ArcSwap;

use runtime::Generation;

/// State every request, the admin listener and the reload service share.
pub struct Shared {
    /// The config in force and its live state; swapped whole, never edited
    /// in place.
    pub(crate) current: ArcSwap<Generation>,
    pub(crate) metrics: metrics::Metrics,
    /// Where the config comes from, for reloads.
    pub(crate) paths: config::Paths,
    /// `[server]` as read at start: what the running listeners are.
    pub(crate) started: config::Server,
    /// Bearer token required by the admin POST endpoints, if set.
    pub(crate) admin_token: Option<String>,
    /// Outcome of the last reload.
    pub(crate) last_reload: Mutex<Option<reload::LastReload>>,
    /// Whether the config files are watched for changes.
    pub(crate) watching: AtomicBool,
    /// Requests per tier, for `/status`.
    pub(crate) tier_stats: stats::TierStats,
    /// Client connections open now (`[server].max_connections`).
    pub(crate) connections: std::sync::Arc<edge::Connections>,
    /// Set by SIGTERM: `/healthz` answers 503 while the node drains.
    pub(crate) draining: edge::drain::Draining,
    /// Set by SIGQUIT: the listeners go to a new process shortly, so
    /// connections are not kept alive any more (`edge::drain`).
    pub(crate) upgrading: edge::drain::Draining,
    /// Why each failing backend's last health probe failed, by cluster and
    /// address, for `/status`.
    pub(crate) probe_errors:
        Mutex<std::collections::HashMap<(String, std::net::SocketAddr), String>>,
    reload_lock: Mutex<()>,
    /// `[server] admission_state`: what the start found, and the writes
    /// since, for `/status`.
    pub(crate) admission_state: Mutex<Option<remember::Report>>,
}

impl Shared {
    pub fn new(
        config: config::Config,
        paths: config::Paths,
        admin_token: Option<String>,
    ) -> Shared {
        let metrics = metrics::Metrics::new();
        let started = config.server.clone();
        let first = Generation::next(config, None, &metrics);
        metrics.config_generation.set(first.number as i64);
        Shared {
            started,
            current: ArcSwap::from_pointee(first),
            metrics,
            paths,
            admin_token,
            last_reload: Mutex::new(None),
            watching: AtomicBool::new(false),
            tier_stats: stats::TierStats::default(),
            connections: Default::default(),
            draining: Default::default(),
            upgrading: Default::default(),
            probe_errors: Default::default(),
            reload_lock: Mutex::new(()),
            admission_state: Mutex::new(None),
        }
    }

    /// Makes `config` the config in force, with the live state the
    /// carry-over rules keep (`runtime`); returns its generation number.
    /// Requests in flight finish on the generation they started with.
    pub(crate) fn install(&self, config: config::Config) -> u64 {
        let next = Generation::next(config, Some(&self.current.load()), &self.metrics);
        let number = next.number;
        self.current.store(std::sync::Arc::new(next));
        self.metrics.config_generation.set(number as i64);
        number
    }

    /// Generation of the config in force: 1 at start, +1 per reload.
    pub(crate) fn generation(&self) -> u64 {
        self.current.load().number
    }

    /// Once a second: per-tier rates for `/status`, idle rate-limit keys out.
    pub(crate) fn upkeep(&self) {
        self.tier_stats.sample();
        self.current.load().limiters.evict_idle();
    }
}
