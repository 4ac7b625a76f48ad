//! k2proxy: the load-shedding front tier of a payment checkout, on pingora.
//!
//! A request meets the stages in the order of the modules below: [`config`]
//! gives the immutable [`config::Snapshot`] it runs with ([`reload`] swaps
//! it), [`classify`] finds its route and tier, [`admission`] admits, queues
//! or sheds it, [`gateway`] (pingora's `ProxyHttp`) carries it to a backend
//! chosen by the `failover` crate, [`metrics`] and the access log record it,
//! and [`admin`] serves `/metrics`, `/status`, the status page and `/reload`.
//! The binary (`main.rs`) wires them into a pingora server. Start with
//! `docs/concepts.md`; the files ops edit are described in `docs/routes.md`
//! and `docs/policy.md`.

#![deny(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod allocator;
pub mod classify;
pub mod config;
pub mod gateway;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod process;
pub mod reload;
pub mod server;
pub mod stats;
pub mod xmlrpc;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use arc_swap::ArcSwap;

/// State every request, the admin listener and the reload service share.
pub struct Shared {
    /// The config in force; swapped whole, never edited in place.
    pub config: ArcSwap<config::Snapshot>,
    pub metrics: metrics::Metrics,
    /// Admission state by (cluster, site) name, kept across reloads.
    pub admission: admission::Registry,
    /// Rate-limit buckets by rule, kept across reloads.
    pub limits: limits::Registry,
    /// Where the config comes from, for reloads.
    pub paths: config::Paths,
    /// `[server]` as read at start: what the running listeners are.
    pub started: config::Server,
    /// Bearer token required by the admin POST endpoints, if set.
    pub admin_token: Option<String>,
    /// Outcome of the last reload.
    pub last_reload: Mutex<Option<reload::LastReload>>,
    /// Whether the config files are watched for changes.
    pub watching: AtomicBool,
    /// Requests per tier, for `/status`.
    pub tier_stats: stats::TierStats,
    reload_lock: Mutex<()>,
    generation: AtomicU64,
}

/// Creates at 0 the failover series of every pair of sites, so the first
/// failover shows in `increase()`/`changes()` (a counter first seen at 1
/// would hide it).
fn precreate_failovers(snapshot: &config::Snapshot, metrics: &metrics::Metrics) {
    for c in &snapshot.clusters {
        for from in c.sites.sites() {
            for to in c.sites.sites().iter().filter(|to| to.name != from.name) {
                metrics
                    .failovers
                    .with_label_values(&[&c.name, &from.name, &to.name]);
            }
        }
    }
}

/// Gives a snapshot its state: admission controllers and rate-limit buckets
/// (existing ones, by name, keep what they learned) and its failover series.
fn attach(
    snapshot: &mut config::Snapshot,
    admission: &admission::Registry,
    limits: &limits::Registry,
    metrics: &metrics::Metrics,
) {
    snapshot.controllers = admission.sync(snapshot, metrics);
    snapshot.limiters = limits.sync(&snapshot.rate_limits);
    snapshot.tier_metrics = snapshot
        .tiers
        .iter()
        .map(|t| metrics.tier(&t.name))
        .collect();
    let routes: Vec<&str> = snapshot.routes.iter().map(|r| r.name.as_str()).collect();
    let tiers: Vec<&str> = snapshot.tiers.iter().map(|t| t.name.as_str()).collect();
    snapshot.request_counters = metrics::RequestCounters::new(&metrics.requests, &routes, &tiers);
    precreate_failovers(snapshot, metrics);
}

impl Shared {
    pub fn new(
        mut snapshot: config::Snapshot,
        paths: config::Paths,
        admin_token: Option<String>,
    ) -> Shared {
        let metrics = metrics::Metrics::new();
        let admission = admission::Registry::default();
        let limits = limits::Registry::default();
        attach(&mut snapshot, &admission, &limits, &metrics);
        metrics.config_generation.set(1);
        Shared {
            started: snapshot.server.clone(),
            config: ArcSwap::from_pointee(snapshot),
            metrics,
            admission,
            limits,
            paths,
            admin_token,
            last_reload: Mutex::new(None),
            watching: AtomicBool::new(false),
            tier_stats: stats::TierStats::default(),
            reload_lock: Mutex::new(()),
            generation: AtomicU64::new(1),
        }
    }

    /// Makes `snapshot` the config in force, with its admission controllers
    /// (existing ones keep their learned state); returns its generation.
    /// Requests in flight finish on the snapshot they started with.
    pub fn install(&self, mut snapshot: config::Snapshot) -> u64 {
        let old = self.config.load();
        for cluster in &snapshot.clusters {
            if let Some(prev) = old.clusters.iter().find(|c| c.name == cluster.name) {
                cluster.sites.adopt(&prev.sites);
            }
        }
        attach(&mut snapshot, &self.admission, &self.limits, &self.metrics);
        self.config.store(std::sync::Arc::new(snapshot));
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.metrics.config_generation.set(generation as i64);
        generation
    }

    /// Generation of the config in force: 1 at start, +1 per reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Once a second: per-tier rates for `/status`, idle rate-limit keys out.
    pub fn upkeep(&self) {
        self.tier_stats.sample();
        self.config.load().limiters.evict_idle();
    }
}
