//! Admission control and load shedding, per (cluster, site).

pub mod gate;
pub mod limit;
pub mod queue;
pub mod shed_level;
