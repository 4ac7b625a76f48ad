//! Load-test harness and legacy backend simulator for k2proxy.
//!
//! `legacy-sim` ([`sim`]) stands in for the legacy checkout backend at one
//! site: a pool of workers with a service time, so that a proxy in front of
//! it meets a real capacity limit. `loadtest` drives traffic at k2proxy.
//! See `docs/loadtest.md`.

#![forbid(unsafe_code)]

pub mod openloop;
pub mod sim;
