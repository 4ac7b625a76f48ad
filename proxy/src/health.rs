//! Active health checks and the failover bookkeeping around them: every
//! `[clusters.<name>].health.interval`, a `GET <path>` to each backend
//! (2xx within `timeout` is good); results go to the `failover` crate, which
//! decides what is up. Every tick this service also notices a change of
//! serving site (`k2_failovers_total{cluster,from,to}`, logged);
//! `k2_backend_up` / `k2_site_up` are set by [`publish_gauges`] when
//! `/metrics` is scraped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::Shared;

/// How often the service looks at what is due.
const TICK: Duration = Duration::from_millis(20);

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// One probe: `GET http://addr{path}`, good when 2xx within `timeout`.
async fn probe(client: &HttpClient, addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let Ok(uri) = format!("http://{addr}{path}").parse::<hyper::Uri>() else {
        return false;
    };
    let req = match hyper::Request::get(uri)
        .header("user-agent", "k2proxy-health")
        .body(Empty::new())
    {
        Ok(r) => r,
        Err(_) => return false,
    };
    let answer = tokio::time::timeout(timeout, async {
        let resp = client.request(req).await.ok()?;
        let ok = resp.status().is_success();
        resp.into_body().collect().await.ok()?;
        Some(ok)
    })
    .await;
    matches!(answer, Ok(Some(true)))
}

/// The background service running the checks.
pub struct HealthService {
    shared: Arc<Shared>,
}

impl HealthService {
    pub fn new(shared: Arc<Shared>) -> Self {
        HealthService { shared }
    }

    /// Notices serving-site changes: every tick, so a failover is counted
    /// and logged within [`TICK`] of the health change that caused it.
    fn observe(&self, now: Instant) {
        let gen = self.shared.current.load();
        let m = &self.shared.metrics;
        for (c, state) in gen.config.clusters.iter().zip(&gen.clusters) {
            if let Some((from, to)) = state.sites.observe(now) {
                let name = |i: Option<usize>| i.map_or("none", |i| c.sites[i].name.as_str());
                // The first observation at start is not a failover.
                if from.is_some() {
                    m.failovers
                        .with_label_values(&[&c.name, name(from), name(to)])
                        .inc();
                    tracing::warn!(cluster = %c.name, from = name(from), to = name(to), "serving site changed");
                }
            }
        }
    }
}

/// Sets the backend and site gauges from the clusters' state. Called when
/// `/metrics` is scraped, the only time a gauge is read: formatting each
/// backend's address on every tick would be most of an idle proxy's work.
pub fn publish_gauges(shared: &Shared, now: Instant) {
    let gen = shared.current.load();
    let m = &shared.metrics;
    for (c, state) in gen.config.clusters.iter().zip(&gen.clusters) {
        let view = state.sites.view(now);
        for (si, site) in c.sites.iter().enumerate() {
            for b in &view[si] {
                m.backend_up
                    .with_label_values(&[&c.name, &site.name, &b.addr.to_string()])
                    .set(i64::from(b.usable));
            }
            m.site_up
                .with_label_values(&[&c.name, &site.name])
                .set(i64::from(state.sites.site_is_up(si, now)));
        }
    }
}

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        // When each cluster (by name) is next due.
        let mut due: HashMap<String, Instant> = HashMap::new();
        let mut running = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            while running.try_join_next().is_some() {}
            let now = Instant::now();
            let gen = self.shared.current.load_full();
            for (ci, c) in gen.config.clusters.iter().enumerate() {
                let next = due.entry(c.name.clone()).or_insert(now);
                if now < *next {
                    continue;
                }
                *next = now + c.health.interval;
                for (si, site) in c.sites.iter().enumerate() {
                    for &addr in &site.backends {
                        let (client, gen, path, timeout) = (
                            client.clone(),
                            gen.clone(),
                            c.health.path.clone(),
                            c.health.timeout,
                        );
                        running.spawn(async move {
                            let ok = probe(&client, addr, &path, timeout).await;
                            let cluster = &gen.config.clusters[ci];
                            if gen.clusters[ci].sites.probe(si, addr, ok) {
                                tracing::info!(cluster = %cluster.name, site = %cluster.sites[si].name, backend = %addr, ok, "backend health changed");
                            }
                        });
                    }
                }
            }
            self.observe(now);
        }
    }
}
