//! The legacy backend simulator: a worker pool of `workers` that serves each
//! request in `service_time`; requests beyond the pool wait for a worker.
//!
//! Endpoints: `GET /health` (never queued), `GET /_sim/stats` (requests per
//! tier from `x-k2-tier`, duplicate `x-request-id`s), anything else: a
//! request with a body gets the body echoed, one without gets a JSON
//! description of what the simulator saw (`tier`, `request_id`, …).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How one simulated site behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Name reported in responses (`x-sim-name`), e.g. `skondal-1`.
    pub name: String,
    /// Requests served at once; the rest wait.
    pub workers: usize,
    /// Time one request holds a worker.
    pub service_time: Duration,
}

/// Counters behind `GET /_sim/stats`.
#[derive(Debug, Default)]
struct Stats {
    total: u64,
    per_tier: HashMap<String, u64>,
    request_ids: HashSet<String>,
    duplicates: u64,
}

/// A running simulator.
pub struct Sim {
    config: SimConfig,
    workers: Semaphore,
    stats: Mutex<Stats>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Sim> {
        Arc::new(Sim {
            workers: Semaphore::new(config.workers.max(1)),
            config,
            stats: Mutex::new(Stats::default()),
        })
    }

    /// Accepts connections until the task is dropped.
    pub async fn serve(self: Arc<Sim>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let sim = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let sim = sim.clone();
                    async move { Ok::<_, Infallible>(sim.handle(req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/health" => return text(StatusCode::OK, "ok\n"),
            "/_sim/stats" => return self.stats_response(),
            _ => {}
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let tier = header("x-k2-tier");
        let request_id = header("x-request-id");
        let forwarded_for = header("x-forwarded-for");
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        self.record(tier.as_deref(), request_id.as_deref());

        // Holding a worker for the service time is the capacity limit.
        let _worker = self
            .workers
            .acquire()
            .await
            .expect("semaphore never closed");
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::BAD_REQUEST, "body read failed\n"),
        };
        if !self.config.service_time.is_zero() {
            tokio::time::sleep(self.config.service_time).await;
        }

        let mut resp = if body.is_empty() {
            let json = serde_json::json!({
                "sim": self.config.name,
                "method": method,
                "path": path,
                "tier": tier,
                "request_id": request_id,
                "forwarded_for": forwarded_for,
            });
            let mut r = Response::new(Full::new(Bytes::from(json.to_string())));
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("static"));
            r
        } else {
            Response::new(Full::new(body))
        };
        let h = resp.headers_mut();
        if let Ok(v) = self.config.name.parse() {
            h.insert("x-sim-name", v);
        }
        if let Some(Ok(v)) = tier.map(|t| t.parse()) {
            h.insert("x-sim-saw-tier", v);
        }
        resp
    }

    fn record(&self, tier: Option<&str>, request_id: Option<&str>) {
        let mut s = self.stats.lock().expect("stats lock");
        s.total += 1;
        *s.per_tier
            .entry(tier.unwrap_or("none").to_string())
            .or_default() += 1;
        if let Some(id) = request_id {
            if !s.request_ids.insert(id.to_string()) {
                s.duplicates += 1;
            }
        }
    }

    fn stats_response(&self) -> Response<Full<Bytes>> {
        let s = self.stats.lock().expect("stats lock");
        let json = serde_json::json!({
            "sim": self.config.name,
            "total": s.total,
            "per_tier": s.per_tier,
            "duplicate_request_ids": s.duplicates,
        });
        let mut r = Response::new(Full::new(Bytes::from(json.to_string())));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("static"));
        r
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Binds `addr` and serves the simulator on it; returns the bound address.
pub async fn start(
    config: SimConfig,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let sim = Sim::new(config);
    let task = tokio::spawn(async move {
        let _ = sim.serve(listener).await;
    });
    Ok((local, task))
}
