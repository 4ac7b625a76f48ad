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
use hyper_util::rt::{TokioExecutor, TokioIo};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::tls::upstream::SiteTls;
use crate::Shared;

/// How often the service looks at what is due.
const TICK: Duration = Duration::from_millis(20);

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// One probe: `GET http://addr{path}`, good when 2xx within `timeout`.
async fn probe(client: &HttpClient, addr: SocketAddr, path: &str) -> Result<(), String> {
    let uri = format!("http://{addr}{path}")
        .parse::<hyper::Uri>()
        .map_err(|e| format!("health path {path:?}: {e}"))?;
    let resp = client
        .request(request(uri)?)
        .await
        .map_err(|e| format!("request: {e}"))?;
    answer(resp).await
}

fn request(uri: hyper::Uri) -> Result<hyper::Request<Empty<Bytes>>, String> {
    hyper::Request::get(uri)
        .header("user-agent", "k2proxy-health")
        .body(Empty::new())
        .map_err(|e| e.to_string())
}

async fn answer(resp: hyper::Response<hyper::body::Incoming>) -> Result<(), String> {
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// One probe over TLS, with the site's trust (a fresh connection each
/// time: a probe checks the handshake as much as the answer).
async fn probe_tls(tls: &SiteTls, addr: SocketAddr, path: &str) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(tls.probe.clone());
    let stream = connector
        .connect(tls.server_name(addr), tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let host = if tls.sni.is_empty() {
        addr.to_string()
    } else {
        tls.sni.clone()
    };
    let uri = path
        .parse::<hyper::Uri>()
        .map_err(|e| format!("health path {path:?}: {e}"))?;
    let mut req = request(uri)?;
    if let Ok(h) = hyper::header::HeaderValue::from_str(&host) {
        req.headers_mut().insert(hyper::header::HOST, h);
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    answer(resp).await
}

impl Shared {
    /// Keeps the reason of a failed probe (until the next good one).
    fn note_probe(&self, cluster: &str, addr: SocketAddr, error: Option<&String>) {
        let mut errors = self.probe_errors.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(e) => {
                errors.insert((cluster.to_string(), addr), e.clone());
            }
            None => {
                errors.remove(&(cluster.to_string(), addr));
            }
        }
    }

    /// Why `addr`'s last probe failed, if it did.
    pub(crate) fn probe_error(&self, cluster: &str, addr: SocketAddr) -> Option<String> {
        let errors = self.probe_errors.lock().unwrap_or_else(|e| e.into_inner());
        errors.get(&(cluster.to_string(), addr)).cloned()
    }
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
                        let (shared, client, gen, path, timeout) = (
                            self.shared.clone(),
                            client.clone(),
                            gen.clone(),
                            c.health.path.clone(),
                            c.health.timeout,
                        );
                        running.spawn(async move {
                            let tls = gen.site_tls.get(ci).and_then(|s| s.get(si)).cloned().flatten();
                            let result = tokio::time::timeout(timeout, async {
                                match &tls {
                                    Some(tls) => probe_tls(tls, addr, &path).await,
                                    None => probe(&client, addr, &path).await,
                                }
                            })
                            .await
                            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
                            let cluster = &gen.config.clusters[ci];
                            let ok = result.is_ok();
                            shared.note_probe(&cluster.name, addr, result.as_ref().err());
                            if gen.clusters[ci].sites.probe(si, addr, ok) {
                                let reason = result.as_ref().err().map(String::as_str);
                                tracing::info!(cluster = %cluster.name, site = %cluster.sites[si].name, backend = %addr, ok, reason, "backend health changed");
                            }
                        });
                    }
                }
            }
            self.observe(now);
        }
    }
}
