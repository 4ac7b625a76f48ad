//! Sites, backends and the choice of where a request goes.
//!
//! A cluster has sites (a primary and a secondary, or weighted active-active
//! sites), each with backends. This crate knows nothing of pingora: it is
//! given sites and answers "which backend?", so it can be tested on its own.
//! Today it picks the preferred site's backends round-robin; health checks,
//! failover and failback grow here (see `docs/concepts.md`).

#![forbid(unsafe_code)]

mod cluster;

pub use cluster::{Choice, Cluster, Role, Site};
