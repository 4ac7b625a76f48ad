//! k2proxy: the load-shedding front tier of a payment checkout, on pingora.
//!
//! A request meets the stages in the order of the modules below: [`config`]
//! gives the immutable [`config::Snapshot`] it runs with, [`classify`] finds
//! its route and tier, [`gateway`] (pingora's `ProxyHttp`) carries it to a
//! backend chosen by the `failover` crate, [`metrics`] and the access log
//! record it, and [`admin`] serves `/metrics` and `/healthz`. The binary
//! (`main.rs`) wires them into a pingora server. Start with
//! `docs/concepts.md`; the files ops edit are described in
//! `docs/routes.md` and `docs/policy.md`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod classify;
pub mod config;
pub mod gateway;
pub mod metrics;
pub mod server;

use arc_swap::ArcSwap;

/// State every request and the admin listener share.
pub struct Shared {
    /// The config in force; swapped whole, never edited in place.
    pub config: ArcSwap<config::Snapshot>,
    pub metrics: metrics::Metrics,
    /// Admission state by (cluster, site) name, kept across reloads.
    pub admission: admission::Registry,
}

impl Shared {
    pub fn new(mut snapshot: config::Snapshot) -> Shared {
        let metrics = metrics::Metrics::new();
        let admission = admission::Registry::default();
        snapshot.controllers = admission.sync(&snapshot, &metrics);
        metrics.config_generation.set(1);
        Shared {
            config: ArcSwap::from_pointee(snapshot),
            metrics,
            admission,
        }
    }

    /// Makes `snapshot` the config in force, with its admission controllers
    /// (existing ones keep their learned state). Requests in flight finish on
    /// the snapshot they started with.
    pub fn install(&self, mut snapshot: config::Snapshot) {
        snapshot.controllers = self.admission.sync(&snapshot, &self.metrics);
        self.config.store(std::sync::Arc::new(snapshot));
        self.metrics.config_generation.inc();
    }
}
