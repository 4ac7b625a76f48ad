//! The legacy backend simulator: a worker pool of `workers` that serves each
//! request in `service_time`; requests beyond the pool wait for a worker.
//!
//! Endpoints: `GET /health` (never queued), `GET /_sim/stats` (requests per
//! tier from `x-k2-tier`, duplicate `x-request-id`s), `POST
//! /_sim/fault?mode=normal|hang|errors[&rate=0.5][&health=1]` (fault
//! injection), anything else: a request with a body gets the body echoed, one
//! without gets a JSON description of what the simulator saw (`tier`,
//! `request_id`, …).
//!
//! Faults: `hang` accepts and never answers (until the fault is cleared);
//! `errors` answers 500 to a share of requests (and to `/health` too when
//! `health` is set); a [`SimHandle`] can also stop the simulator (listener
//! and open connections gone: connections are refused) and start it again.

use std::collections::HashMap;
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

/// A fault the simulator plays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Accept, never answer.
    Hang,
    /// Answer 500 to this share of requests; `health`: to `/health` too.
    Errors {
        rate: f64,
        health: bool,
    },
}

/// Counters behind `GET /_sim/stats`.
#[derive(Debug, Default)]
struct Stats {
    total: u64,
    per_tier: HashMap<String, u64>,
    id_counts: HashMap<String, u64>,
    duplicates: u64,
}

/// A running simulator.
pub struct Sim {
    config: SimConfig,
    workers: Semaphore,
    stats: Mutex<Stats>,
    fault: Mutex<Fault>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Sim> {
        Arc::new(Sim {
            workers: Semaphore::new(config.workers.max(1)),
            config,
            stats: Mutex::new(Stats::default()),
            fault: Mutex::new(Fault::None),
        })
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().expect("fault lock") = fault;
    }

    fn fault(&self) -> Fault {
        *self.fault.lock().expect("fault lock")
    }

    /// Every `x-request-id` seen, with how often.
    pub fn request_ids(&self) -> HashMap<String, u64> {
        self.stats.lock().expect("stats lock").id_counts.clone()
    }

    /// Requests seen (excluding `/health` and `/_sim/*`).
    pub fn total(&self) -> u64 {
        self.stats.lock().expect("stats lock").total
    }

    /// Plays the current fault; `Some(response)` when it answers instead.
    async fn play_fault(&self, health: bool) -> Option<Response<Full<Bytes>>> {
        loop {
            match self.fault() {
                Fault::None => return None,
                Fault::Hang => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                Fault::Errors { rate, health: h } => {
                    if (health && !h) || fastrand::f64() >= rate {
                        return None;
                    }
                    return Some(text(StatusCode::INTERNAL_SERVER_ERROR, "injected error\n"));
                }
            }
        }
    }

    /// Accepts connections until the future is dropped; dropping it also
    /// closes every open connection (a dead host, not just a closed port).
    pub async fn serve(self: Arc<Sim>, listener: TcpListener) -> std::io::Result<()> {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, _) = listener.accept().await?;
            while connections.try_join_next().is_some() {}
            let _ = stream.set_nodelay(true);
            let sim = self.clone();
            connections.spawn(async move {
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
            "/health" => {
                if let Some(r) = self.play_fault(true).await {
                    return r;
                }
                return text(StatusCode::OK, "ok\n");
            }
            "/_sim/stats" => return self.stats_response(),
            "/_sim/fault" => return self.fault_request(req.uri().query().unwrap_or("")),
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
        if let Some(r) = self.play_fault(false).await {
            return r;
        }

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
            let n = s.id_counts.entry(id.to_string()).or_default();
            *n += 1;
            if *n > 1 {
                s.duplicates += 1;
            }
        }
    }

    /// `POST /_sim/fault?mode=…`: sets a fault.
    fn fault_request(&self, query: &str) -> Response<Full<Bytes>> {
        let arg = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v)
        };
        let fault = match arg("mode") {
            Some("normal") => Fault::None,
            Some("hang") => Fault::Hang,
            Some("errors") => Fault::Errors {
                rate: arg("rate").and_then(|r| r.parse().ok()).unwrap_or(1.0),
                health: arg("health") == Some("1"),
            },
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "expected mode=normal|hang|errors[&rate=R][&health=1]\n",
                )
            }
        };
        self.set_fault(fault);
        text(StatusCode::OK, "ok\n")
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

/// A running simulator that can be stopped and started again on its address.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Arc<Sim>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimHandle {
    /// Stops listening and drops every open connection: connections to
    /// `addr` are refused until [`SimHandle::restart`].
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens on the same address again, with the same counters.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        let sim = self.sim.clone();
        self.task = Some(tokio::spawn(async move {
            let _ = sim.serve(listener).await;
        }));
        Ok(())
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Binds `addr` and serves a simulator on it.
pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let sim = Sim::new(config);
    let serving = sim.clone();
    let task = tokio::spawn(async move {
        let _ = serving.serve(listener).await;
    });
    Ok(SimHandle {
        addr: local,
        sim,
        task: Some(task),
    })
}
