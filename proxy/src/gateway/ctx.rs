//! A request's context: the generation it runs with and the typed results of
//! the stages it passed. A later phase reads a stage's result only through
//! its `Option`, so it cannot use what an earlier stage did not set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use super::headers::{RequestId, TraceParent};
use super::reply::{Outcome, Reply};
use crate::admission::Permit;
use crate::classify::{ClusterId, TierId};
use crate::config;
use crate::runtime::{ClusterState, Generation};

/// The route stage's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub route: usize,
    /// The route's tier, or a trusted client's `x-k2-tier`.
    pub tier: TierId,
    pub cluster: ClusterId,
}

impl Routed {
    /// Route `index`, `route`, with its own tier.
    pub fn to(index: usize, route: &crate::classify::Route) -> Routed {
        Routed {
            route: index,
            tier: route.tier,
            cluster: route.cluster,
        }
    }
}

/// The admit stage's result.
#[derive(Debug)]
pub struct Admitted {
    /// The site whose capacity the request holds.
    pub site: usize,
    /// The preferred site, when the request spilled to `site`.
    pub spilled_from: Option<usize>,
    /// `None` when the cluster has admission off.
    pub permit: Option<Permit>,
}

/// The tries at backends.
#[derive(Debug, Default)]
pub struct Tries {
    /// The site of the current try (first the admitted one).
    pub site: Option<usize>,
    pub backend: Option<SocketAddr>,
    /// Backends this request was sent or tried to be sent to.
    pub tried: SmallVec<[SocketAddr; 4]>,
    /// Sites whose backends were all tried.
    pub tried_sites: SmallVec<[usize; 4]>,
    /// Counts the request at its backend (least-in-flight balancing).
    pub guard: Option<failover::InflightGuard>,
    /// When the request was sent upstream, for the latency sample.
    pub sent: Option<Instant>,
    /// The backend's response status, once it began.
    pub status: Option<u16>,
    /// Body bytes passed upstream in this try (against the route's `max_body`).
    pub body_bytes: u64,
    /// The last try's time from sending to the backend's response header.
    pub upstream_latency: Option<std::time::Duration>,
}

/// Per-request state shared across pingora's phases.
pub struct Ctx {
    pub start: Instant,
    /// The config and live state this request runs with from start to end,
    /// even across a reload.
    pub gen: Arc<Generation>,
    pub request_id: Option<RequestId>,
    /// W3C `traceparent`, the client's or started here.
    pub trace: Option<TraceParent>,
    pub routed: Option<Routed>,
    pub admitted: Option<Admitted>,
    pub tries: Tries,
    /// The XML-RPC method when it matched a configured name, else why not.
    pub xmlrpc: Option<String>,
    /// What k2proxy answered itself, when a stage refused the request.
    pub reply: Option<Reply>,
    pub outcome: Outcome,
}

impl Ctx {
    pub fn new(gen: Arc<Generation>) -> Ctx {
        Ctx {
            start: Instant::now(),
            gen,
            request_id: None,
            trace: None,
            routed: None,
            admitted: None,
            tries: Tries::default(),
            xmlrpc: None,
            reply: None,
            outcome: Outcome::Pending,
        }
    }

    /// The request's cluster, settings and live state.
    pub fn cluster(&self) -> Option<(&config::Cluster, &ClusterState)> {
        let r = self.routed?;
        Some((
            self.gen.config.cluster(r.cluster),
            self.gen.cluster(r.cluster),
        ))
    }

    /// Whether a retry has somewhere to go: an untried backend in this site
    /// or another site that can take it.
    pub fn alternative(&self, now: Instant) -> bool {
        let (Some((_, state)), Some(site)) = (self.cluster(), self.tries.site) else {
            return false;
        };
        let sites = &state.sites;
        if sites.backend_in(site, now, &self.tries.tried).is_some() {
            return true;
        }
        let mut exclude = self.tries.tried_sites.clone();
        exclude.push(site);
        sites
            .choose_site(now, &exclude)
            .is_some_and(|other| sites.backend_in(other, now, &self.tries.tried).is_some())
    }

    pub fn route_name(&self) -> &str {
        self.routed
            .and_then(|r| self.gen.config.routes.get(r.route))
            .map_or("none", |r| r.name.as_str())
    }

    pub fn tier_name(&self) -> &str {
        self.routed
            .map_or("none", |r| self.gen.config.tier(r.tier).name.as_str())
    }

    /// The name of site `i` of the request's cluster.
    pub fn site_name_of(&self, i: Option<usize>) -> &str {
        match (self.cluster(), i) {
            (Some((c, _)), Some(i)) => c.sites.get(i).map_or("none", |s| s.name.as_str()),
            _ => "none",
        }
    }

    /// The site of the current (or last) try.
    pub fn site_name(&self) -> &str {
        self.site_name_of(self.tries.site)
    }

    pub fn request_id(&self) -> Option<&http::HeaderValue> {
        self.request_id.as_ref().map(|r| &r.value)
    }
}
