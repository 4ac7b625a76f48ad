//! A [`Generation`]: one checked [`Config`] and the live state built for it
//! (failover state, retry budgets, admission controllers, rate-limit buckets,
//! metric handles). One `ArcSwap` load gives a request one consistent view
//! of both.
//!
//! [`Generation::next`] builds a generation from a new config and the one
//! before it; every carry-over rule of a reload lives in [`carry`], and every
//! one matches by name, never by position:
//!
//! | state | kept when | otherwise |
//! |---|---|---|
//! | backend health, serving site | same cluster, site name and address | unknown, checked anew |
//! | retry budget (recent requests and retries) | same cluster name | empty |
//! | admission controller (limit, in flight, waiters) | same cluster and site name; takes the new settings | fresh at `initial` (at start, the saved limit with `[server] admission_state`: `admission::memory`) |
//! | rate-limit buckets | same rule name, scope, key, rate and burst | fresh (full) buckets |

mod carry;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use crate::admission::Controllers;
use crate::classify::ClusterId;
use crate::config::Config;
use crate::limits::Limiters;
use crate::metrics::{Metrics, RequestCounters, TierMetrics};
use crate::tls::upstream::SiteTls;

/// The live state of one cluster.
#[derive(Debug)]
pub struct ClusterState {
    /// Sites, backend health and the choice of backend.
    pub sites: Arc<failover::Cluster>,
    /// `[retries].budget` of the policy, for this cluster.
    pub budget: Arc<failover::RetryBudget>,
}

/// A config and its live state; swapped whole on reload.
pub struct Generation {
    pub config: Arc<Config>,
    /// 1 at start, +1 per config that takes effect.
    pub number: u64,
    /// Same index as `config.clusters`.
    pub clusters: Vec<ClusterState>,
    /// `[cluster][site]`, same indices as the config.
    pub controllers: Controllers,
    /// Same order as `config.rate_limits`.
    pub limiters: Limiters,
    /// Same index as `config.tiers`.
    pub tier_metrics: Vec<TierMetrics>,
    /// `k2_requests_total` by route, tier, outcome and code class.
    pub request_counters: RequestCounters,
    /// `k2_upstream_duration_seconds`, `[cluster][site]`.
    pub upstream_duration: Vec<Vec<prometheus::Histogram>>,
    /// `[server].max_connections`, or the default derived from the
    /// open-file limit (read once per generation, not per connection).
    pub max_connections: u32,
    /// HTTPS listeners with this config's certificates.
    pub(crate) tls: crate::tls::accept::Listeners,
    /// TLS to each site's backends, `[cluster][site]`.
    pub(crate) site_tls: Vec<Vec<Option<Arc<SiteTls>>>>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl Generation {
    /// The generation for `config`, taking over from `prev` (none at start)
    /// everything the carry-over rules keep.
    pub fn next(config: Config, prev: Option<&Generation>, metrics: &Metrics) -> Generation {
        let now = Instant::now();
        let clusters = config
            .clusters
            .iter()
            .map(|c| carry::cluster(c, config.retries.budget, prev, now))
            .collect();
        let controllers = carry::controllers(&config, prev, metrics);
        let limiters = carry::limiters(&config, prev, metrics);
        let tier_metrics = config.tiers.iter().map(|t| metrics.tier(&t.name)).collect();
        let routes: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        let tiers: Vec<&str> = config.tiers.iter().map(|t| t.name.as_str()).collect();
        let request_counters = RequestCounters::new(&metrics.requests, &routes, &tiers);
        metrics.precreate(&config);
        request_counters.precreate(
            config
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.tier.0 as usize)),
        );
        let upstream_duration = config
            .clusters
            .iter()
            .map(|c| {
                c.sites
                    .iter()
                    .map(|s| {
                        metrics
                            .upstream_duration
                            .with_label_values(&[c.name.as_str(), s.name.as_str()])
                    })
                    .collect()
            })
            .collect();
        let max_connections = config.server.max_connections.unwrap_or_else(|| {
            crate::edge::default_max_connections(crate::process::open_file_limit())
        });
        Generation {
            tls: crate::tls::accept::Listeners::build(&config.server.tls),
            site_tls: site_tls(&config),
            upstream_duration,
            max_connections,
            number: prev.map_or(1, |p| p.number + 1),
            config: Arc::new(config),
            clusters,
            controllers,
            limiters,
            tier_metrics,
            request_counters,
        }
    }

    /// TLS of a site's backends, if it has any.
    pub(crate) fn site_tls(&self, cluster: ClusterId, site: usize) -> Option<&Arc<SiteTls>> {
        self.site_tls.get(cluster.0 as usize)?.get(site)?.as_ref()
    }

    pub fn cluster(&self, id: ClusterId) -> &ClusterState {
        &self.clusters[id.0 as usize]
    }
}

/// Every site's TLS, built once per generation. The files were checked with
/// the config; a failure here (the system's roots unreadable) is logged and
/// the site's connections fail rather than go out in clear text.
fn site_tls(config: &Config) -> Vec<Vec<Option<Arc<SiteTls>>>> {
    config
        .clusters
        .iter()
        .map(|c| {
            c.site_tls
                .iter()
                .zip(&c.sites)
                .map(|(t, site)| {
                    let t = t.as_ref()?;
                    match SiteTls::build(t) {
                        Ok(s) => Some(Arc::new(s)),
                        Err(e) => {
                            tracing::error!(cluster = %c.name, site = %site.name, "TLS to the site's backends: {e}");
                            Some(Arc::new(SiteTls::unusable(t)))
                        }
                    }
                })
                .collect()
        })
        .collect()
}
