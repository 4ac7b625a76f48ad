//! Sites, backends, health, and the choice of where a request goes.
//!
//! A cluster has sites (a primary and secondaries, or weighted active-active
//! sites), each with backends. This crate knows nothing of pingora: the proxy
//! feeds it health events (active probes, request outcomes) and asks it
//! which site and backend to use; every decision takes the time as an
//! argument, so the state machines are tested on a virtual clock.
//!
//! - [`health`]: one backend — active rise/fall, passive ejection with back-off.
//! - [`cluster`]: sites — failover and failback, balancing, max ejected share.
//! - [`budget`]: the retry budget.

#![forbid(unsafe_code)]

pub mod budget;
pub mod cluster;
pub mod health;

pub use budget::RetryBudget;
pub use cluster::{BackendView, Balance, Cluster, InflightGuard, Mode, Role, Settings, Site};
pub use health::{Active, Outlier, Thresholds};
