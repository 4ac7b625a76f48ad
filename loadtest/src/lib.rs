//! Load-test harness and legacy backend simulator for k2proxy.
//!
//! - [`sim`]: `legacy-sim`, a model of the legacy checkout backend at one
//!   site (worker pool, service-time distributions, congestion collapse,
//!   fault injection, duplicate counting).
//! - [`schedule`], [`template`], [`openloop`]: the open-loop generator
//!   (arrivals from a rate profile, a weighted tier mix, latency from the
//!   intended send time).
//! - [`scenario`]: scenario files (load, tiers, topology, fault events,
//!   thresholds); [`topology`] brings up simulators and k2proxy for one;
//!   [`report`] writes the text, JSON and HTML reports; [`progress`] shows
//!   the run live; [`soak`] samples k2proxy over a long run and fits its
//!   trends.
//!
//! See `docs/loadtest.md`.

#![forbid(unsafe_code)]

pub mod balancer;
pub mod drill;
pub mod openloop;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod sim;
pub mod soak;
pub mod template;
pub mod thresholds;
pub mod timer;
pub mod topology;
pub mod workers;
