//! The carry-over rules of a reload, one function per kind of state, all by
//! name (see the table in [`super`]).

use std::sync::Arc;
use std::time::Instant;

use super::{ClusterState, Generation};
use crate::admission::{rules_for, Controller, Controllers};
use crate::config::{Cluster, Config, RateLimit};
use crate::limits::{Limiter, Limiters, Store};
use crate::metrics::Metrics;

/// Failover state and retry budget of `c`: backend health by site name and
/// address, the serving site by name, the budget's recent counts by cluster
/// name (the share comes from the new policy).
pub(super) fn cluster(
    c: &Cluster,
    budget_share: f64,
    prev: Option<&Generation>,
    now: Instant,
) -> ClusterState {
    let sites = Arc::new(failover::Cluster::with_settings(
        c.name.clone(),
        c.sites.clone(),
        c.settings.clone(),
    ));
    let budget = failover::RetryBudget::new(budget_share, now);
    if let Some(old) = prev.and_then(|p| by_cluster_name(p, &c.name)) {
        sites.adopt(&old.sites);
        budget.adopt(&old.budget);
    }
    ClusterState {
        sites,
        budget: Arc::new(budget),
    }
}

fn by_cluster_name<'g>(g: &'g Generation, name: &str) -> Option<&'g ClusterState> {
    let i = g.config.clusters.iter().position(|c| c.name == name)?;
    g.clusters.get(i)
}

/// One admission controller per (cluster, site): an existing one of the same
/// names takes the new settings and keeps its learned limit, in-flight
/// permits and waiters; a new site starts fresh. A removed site's controller
/// lives on only in the permits still held.
pub(super) fn controllers(
    config: &Config,
    prev: Option<&Generation>,
    metrics: &Metrics,
) -> Controllers {
    let tiers: Vec<String> = config.tiers.iter().map(|t| t.name.clone()).collect();
    let out = config
        .clusters
        .iter()
        .enumerate()
        .map(|(ci, cluster)| {
            cluster
                .sites
                .iter()
                .map(|site| {
                    let (rules, limit) = rules_for(config, ci);
                    let existing = prev.and_then(|p| {
                        p.controllers
                            .iter()
                            .find(|c| c.cluster() == cluster.name && c.site() == site.name)
                    });
                    match existing {
                        Some(ctl) => {
                            ctl.reconfigure(rules, &limit, &tiers, metrics);
                            ctl.clone()
                        }
                        None => Arc::new(Controller::new(
                            &cluster.name,
                            &site.name,
                            rules,
                            limit,
                            &tiers,
                            metrics,
                        )),
                    }
                })
                .collect()
        })
        .collect();
    Controllers::new(out)
}

/// Rate-limit buckets: a rule keeps them (and its leases) when a rule of
/// the same name had the same scope, key, rate, burst, reach and missing-key
/// rule under the same store; a changed rule starts with full buckets
/// (governor cannot change a quota in place). The store itself (its
/// connection and up/down state) is kept while its URL is the same.
pub(super) fn limiters(config: &Config, prev: Option<&Generation>, metrics: &Metrics) -> Limiters {
    let store_config = config.rate_limit_store.as_ref();
    let same_store = prev.map(|p| p.config.rate_limit_store.as_ref()) == Some(store_config);
    let same = |a: &RateLimit, b: &RateLimit| {
        a.name == b.name
            && a.applies_to == b.applies_to
            && a.key == b.key
            && a.per_second == b.per_second
            && a.burst == b.burst
            && a.fleet == b.fleet
            && a.missing == b.missing
            && (!a.fleet || same_store)
    };
    let out = config
        .rate_limits
        .iter()
        .map(|rule| {
            let kept = prev.and_then(|p| p.limiters.iter().find(|l| same(l.rule(), rule)));
            match kept {
                // The scope's index may have moved (routes reordered).
                Some(l) => Arc::new(l.with_rule(rule.clone())),
                None => Arc::new(Limiter::new(rule.clone(), store_config)),
            }
        })
        .collect();
    let store = store_config.and_then(|s| {
        let kept = prev
            .and_then(|p| p.limiters.store())
            .filter(|st| st.url() == s.redis)
            .cloned();
        let store = kept.or_else(|| {
            Store::new(
                &s.redis,
                metrics.rate_limit_store_up.clone(),
                metrics.rate_limit_fallbacks.clone(),
            )
            .map_err(|e| tracing::error!(store = %s.redis, error = %e, "rate-limit store unusable: fleet limits fall back"))
            .ok()
        })?;
        Some((store, s.timeout))
    });
    if store.is_none() {
        metrics.rate_limit_store_up.set(1);
    }
    Limiters::new(out, store)
}
