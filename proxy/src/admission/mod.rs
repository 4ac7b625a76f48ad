//! Admission control and load shedding, per (cluster, site).
//!
//! [`gate::Gate`] decides (limit, priority queue, tier shares, shed level)
//! and is plain synchronous code; its limit learns from the latency of the
//! tiers that cost what purchases cost ([`cost`]). [`Controller`] wraps it
//! for the proxy: a mutex, a oneshot channel per waiter, the clock,
//! metrics, and [`Permit`]s that give their slot back on `Drop`, whatever
//! path a request ends on.
//! [`Controllers`] holds one controller per (cluster, site) of a generation;
//! `runtime::carry` hands them on by name, so a reload keeps learned limits,
//! in-flight counts and waiters. See docs/admission.md.

pub mod cost;
pub mod demand;
pub mod first_burst;
pub mod gate;
pub mod limit;
pub mod memory;
pub mod overdraft;
pub mod queue;
pub mod shed_level;
pub mod standing;
pub mod starving;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{Gauge, IntGauge};
use tokio::sync::oneshot;

use crate::config::{AdmissionMode, Config};
use crate::metrics::Metrics;
pub use gate::ShedReason;
use gate::{Decision, Gate, Rules, TierRule};
pub use limit::Sample;
use limit::{Bounds, Limit};

/// The one clock of admission: tokio's, so tests can pause it.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

type Reply = oneshot::Sender<Result<Permit, ShedReason>>;

/// Gauges of one site, resolved once.
struct SiteGauges {
    limit: IntGauge,
    baseline: Gauge,
    claim: Gauge,
    shed_level: Gauge,
    queue_depth: IntGauge,
    inflight: Vec<IntGauge>,
    tier_cost: Vec<Gauge>,
}

/// Admission for one (cluster, site).
pub struct Controller {
    cluster: String,
    site: String,
    gate: Mutex<Gate<Reply>>,
    gauges: Mutex<SiteGauges>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Controller({}/{})", self.cluster, self.site)
    }
}

/// One site's admission state ([`Controller::state`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteState {
    /// The concurrency limit in force.
    pub limit: u32,
    /// Requests at the backend.
    pub inflight: u32,
    /// Requests waiting in the queue.
    pub queued: usize,
    pub shed_level: f64,
    /// The `never_shed` tiers' queue stands (`refuse_standing_queue`).
    pub standing: bool,
    /// What an adaptive limit learned; `None` for a fixed one.
    pub learnt: Option<limit::Learnt>,
}

impl Controller {
    pub(crate) fn new(
        cluster: &str,
        site: &str,
        rules: Rules,
        limit: Limit,
        tiers: &[String],
        metrics: &Metrics,
    ) -> Controller {
        let c = Controller {
            cluster: cluster.to_string(),
            site: site.to_string(),
            gate: Mutex::new(Gate::new(rules, limit, now())),
            gauges: Mutex::new(SiteGauges::new(cluster, site, tiers, metrics)),
        };
        c.publish(&c.lock());
        c
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// A poisoned lock only means a panic elsewhere; the gate's counters are
    /// still consistent (every method leaves them so), so keep going.
    fn lock(&self) -> MutexGuard<'_, Gate<Reply>> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the waiters refused while they waited.
    fn settle(&self, g: &mut Gate<Reply>) {
        if !g.has_shed() {
            return;
        }
        for (w, reason) in g.take_shed() {
            let _ = w.send(Err(reason));
        }
    }

    /// Sets the site's gauges from the gate. Called when `/metrics` is
    /// scraped (a gauge is read only then), not on every request: that kept
    /// a second lock and a handful of shared atomics on the per-request path.
    pub fn publish_gauges(&self) {
        self.publish(&self.lock());
    }

    fn publish(&self, g: &Gate<Reply>) {
        let gauges = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        gauges.limit.set(i64::from(g.limit()));
        gauges
            .baseline
            .set(g.baseline().map_or(0.0, |b| b.as_secs_f64()));
        let claim = g.learnt().and_then(|l| l.claim);
        gauges
            .claim
            .set(claim.map_or(0.0, |c| c.latency.as_secs_f64()));
        gauges.shed_level.set(g.shed_level());
        gauges.queue_depth.set(g.queued() as i64);
        for (t, gauge) in gauges.inflight.iter().enumerate() {
            gauge.set(i64::from(g.tier_inflight(t)));
        }
        let costs = g.tier_costs();
        for (t, gauge) in gauges.tier_cost.iter().enumerate() {
            let known = costs.iter().find(|c| c.tier == t);
            gauge.set(known.map_or(0.0, |c| c.ratio));
        }
    }

    /// The adaptive limit in force, `None` for a fixed one: what
    /// [`memory`] keeps across a restart.
    pub fn adaptive_limit(&self) -> Option<u32> {
        let g = self.lock();
        g.is_adaptive().then(|| g.limit())
    }

    /// Starts an adaptive limit at `limit`, as a process before this one
    /// left it ([`memory`]); a fixed one is left alone.
    pub fn resume(&self, limit: u32) {
        let mut g = self.lock();
        g.resume(limit);
        self.publish(&g);
    }

    /// What the adaptive limit knows of the backend, for [`memory`].
    pub fn kept(&self) -> Option<limit::Kept> {
        self.lock().kept()
    }

    /// Takes over what a process before this one learnt of the backend
    /// ([`memory`]).
    pub fn resume_learnt(&self, kept: limit::Kept) {
        let mut g = self.lock();
        g.resume_learnt(kept);
        self.publish(&g);
    }

    /// The site's admission state now, for `/status` and tests.
    pub fn state(&self) -> SiteState {
        let g = self.lock();
        SiteState {
            limit: g.limit(),
            inflight: g.inflight(),
            queued: g.queued(),
            shed_level: g.shed_level(),
            standing: g.standing(now()),
            learnt: g.learnt(),
        }
    }

    /// What each tier costs the backend against the purchases, where known:
    /// the tiers the limit leaves out are those not `counted`.
    pub fn tier_costs(&self) -> Vec<cost::KnownCost> {
        self.lock().tier_costs()
    }

    /// A permit for `tier` only if one is free right now (spill): never
    /// queues, never sheds.
    pub fn try_acquire(self: &Arc<Self>, tier: usize) -> Option<Permit> {
        let mut g = self.lock();
        let admitted = g.try_admit(tier, now()) == Decision::Admit;
        self.settle(&mut g);
        admitted.then(|| Permit::new(self.clone(), tier, Duration::ZERO))
    }

    /// Waits for a permit for `tier`, or says why the request is shed. Ends
    /// by the tier's `max_queue_wait` at the latest.
    pub async fn acquire(self: &Arc<Self>, tier: usize) -> Result<Permit, ShedReason> {
        let start = now();
        let (mut rx, deadline) = {
            let mut g = self.lock();
            match g.try_admit(tier, start) {
                Decision::Admit => {
                    self.settle(&mut g);
                    return Ok(Permit::new(self.clone(), tier, Duration::ZERO));
                }
                Decision::Shed(reason) => {
                    self.settle(&mut g);
                    return Err(reason);
                }
                Decision::Queue => {}
            }
            let (tx, rx) = oneshot::channel();
            let deadline = match g.enqueue(tier, start, tx) {
                Err(reason) => return Err(reason),
                Ok((deadline, evicted)) => {
                    if let Some(evicted) = evicted {
                        let _ = evicted.send(Err(ShedReason::QueueFull));
                    }
                    deadline
                }
            };
            self.dispatch(&mut g, start);
            self.settle(&mut g);
            (rx, deadline)
        };
        match tokio::time::timeout_at(deadline.into(), &mut rx).await {
            Ok(Ok(Ok(mut permit))) => {
                permit.waited = now().duration_since(start);
                Ok(permit)
            }
            Ok(Ok(Err(reason))) => Err(reason),
            // The gate dropped the waiter (a reload removed its tier).
            Ok(Err(_)) => Err(ShedReason::QueueTimeout),
            Err(_) => {
                rx.close();
                // A permit that arrived at the deadline is still a permit.
                if let Ok(Ok(mut permit)) = rx.try_recv() {
                    permit.waited = now().duration_since(start);
                    return Ok(permit);
                }
                let at = now();
                let mut g = self.lock();
                g.note_timeout(tier, at, at.duration_since(start));
                self.settle(&mut g);
                Err(ShedReason::QueueTimeout)
            }
        }
    }

    /// Hands free permits to waiters, highest first.
    fn dispatch(self: &Arc<Self>, g: &mut Gate<Reply>, at: Instant) {
        while let Some((tier, reply)) = g.grant_next(at) {
            // The waiter sets `waited` from its own start time.
            let permit = Permit::new(self.clone(), tier, Duration::ZERO);
            if let Err(Ok(mut back)) = reply.send(Ok(permit)) {
                // The waiter is gone: take the slot back without re-locking.
                back.controller = None;
                g.ungrant(tier);
            }
        }
    }

    fn release(self: &Arc<Self>, tier: usize, sample: Sample) {
        let at = now();
        let mut g = self.lock();
        g.release(tier, at, sample);
        self.dispatch(&mut g, at);
        self.settle(&mut g);
    }

    pub(crate) fn reconfigure(
        &self,
        rules: Rules,
        limit: &Limit,
        tiers: &[String],
        metrics: &Metrics,
    ) {
        let mut g = self.lock();
        g.reconfigure(rules, limit);
        *self.gauges.lock().unwrap_or_else(|e| e.into_inner()) =
            SiteGauges::new(&self.cluster, &self.site, tiers, metrics);
        self.settle(&mut g);
        self.publish(&g);
    }
}

impl SiteGauges {
    fn new(cluster: &str, site: &str, tiers: &[String], m: &Metrics) -> SiteGauges {
        SiteGauges {
            limit: m.admission_limit.with_label_values(&[cluster, site]),
            baseline: m.admission_baseline.with_label_values(&[cluster, site]),
            claim: m.admission_claim.with_label_values(&[cluster, site]),
            shed_level: m.shed_level.with_label_values(&[cluster, site]),
            queue_depth: m.queue_depth.with_label_values(&[cluster, site]),
            inflight: tiers
                .iter()
                .map(|t| m.inflight.with_label_values(&[cluster, site, t]))
                .collect(),
            tier_cost: tiers
                .iter()
                .map(|t| m.admission_tier_cost.with_label_values(&[cluster, site, t]))
                .collect(),
        }
    }
}

/// A slot at a site's backend; dropping it gives the slot back (and admits
/// the next waiter), on every path: response, error, timeout, disconnect,
/// panic.
#[derive(Debug)]
pub struct Permit {
    controller: Option<Arc<Controller>>,
    tier: usize,
    sample: Sample,
    waited: Duration,
}

impl Permit {
    fn new(controller: Arc<Controller>, tier: usize, waited: Duration) -> Permit {
        Permit {
            controller: Some(controller),
            tier,
            sample: Sample::Ignored,
            waited,
        }
    }

    /// What the backend showed; fed to the limit when the permit is dropped.
    pub fn record(&mut self, sample: Sample) {
        self.sample = sample;
    }

    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.release(self.tier, self.sample);
        }
    }
}

/// The controllers of one generation: `[cluster][site]`.
#[derive(Debug, Default, Clone)]
pub struct Controllers(Vec<Vec<Arc<Controller>>>);

impl Controllers {
    pub(crate) fn new(by_site: Vec<Vec<Arc<Controller>>>) -> Controllers {
        Controllers(by_site)
    }

    pub fn get(&self, cluster: usize, site: usize) -> Option<&Arc<Controller>> {
        self.0.get(cluster)?.get(site)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Controller>> {
        self.0.iter().flatten()
    }

    /// Brings every site's admission gauges up to date (before a scrape).
    pub fn publish_gauges(&self) {
        self.iter().for_each(|c| c.publish_gauges());
    }
}

/// The admission rules of `cluster` in `snap`.
pub fn rules_for(snap: &Config, cluster: usize) -> (Rules, Limit) {
    let a = &snap.admission[cluster];
    let tiers = snap
        .tiers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = crate::classify::TierId(i as u8);
            TierRule {
                max_wait: t.max_queue_wait,
                max_share: t.max_share,
                never_shed: snap.shedding.never_shed.contains(&id),
                force_shed: snap.shedding.force_shed.contains(&id),
            }
        })
        .collect();
    let rules = Rules {
        tiers,
        target_queue_delay: snap.shedding.target_queue_delay,
        max_queue: a.max_queue as usize,
        refuse_standing_queue: snap.shedding.refuse_standing_queue,
        standing_after: snap.shedding.standing_after,
    };
    let limit = match a.mode {
        AdmissionMode::Fixed { limit } => Limit::fixed(limit),
        AdmissionMode::Adaptive { initial, min, max } => {
            Limit::adaptive(Bounds { initial, min, max }, now())
        }
        // Not consulted: the gateway skips admission for such a cluster.
        AdmissionMode::Off => Limit::fixed(u32::MAX),
    };
    (rules, limit)
}

#[cfg(test)]
mod tests;
