//! The legacy backend simulator: a model of the legacy checkout backend at
//! one site. A pool of `workers` serves requests; the rest wait in a queue
//! (bounded by `queue`, 0 = unbounded). Each request holds a worker for a
//! service time drawn from a distribution chosen by path prefix ([`Dist`]:
//! fixed, uniform, log-normal). Past the knee the backend collapses the way
//! the seed system did: every request waiting stretches the service time of
//! the next one by `collapse / workers` (context switches, lock contention,
//! a database gone cold), so an unprotected backend gets slower exactly when
//! it is most needed.
//!
//! Endpoints: `GET /health` (never queued), `GET /_sim/stats` (requests per
//! tier from `x-k2-tier`, duplicate `x-request-id`s, busy workers, queue),
//! `POST /_sim/fault?mode=…[&for=5s]` (fault injection; `for` recovers by
//! itself), anything else: a request with a body gets the body echoed, one
//! without gets a JSON description of what the simulator saw (`tier`,
//! `request_id`, …).
//!
//! Faults ([`Fault`]): `refuse` closes the listener and every open
//! connection (connections are refused, a dead host), `hang` accepts and
//! never answers, `slow&factor=F` multiplies service times, `errors&rate=R`
//! answers 500 to a share of requests (`&health=1`: health checks too),
//! `normal` recovers. While refusing, the control endpoint is reachable only
//! on a separate control listener (`legacy-sim --control`), or use `for=`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use tokio::sync::watch;
use tokio::time::Instant;

use crate::workers::Workers;

/// One standard normal draw from two uniforms (Box–Muller).
pub fn standard_normal(rng: &mut fastrand::Rng) -> f64 {
    let (u1, u2) = (rng.f64().max(1e-12), rng.f64());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A log-normal draw as a multiple of its median: `exp(sigma * z)`, capped
/// at 1000 (a sample, not an outage).
pub fn lognormal_factor(rng: &mut fastrand::Rng, sigma: f64) -> f64 {
    (sigma * standard_normal(rng)).exp().min(1000.0)
}

/// A service-time distribution, written `20ms`, `uniform(10ms, 30ms)` or
/// `lognormal(20ms, 0.5)` (median and sigma of the underlying normal).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Dist {
    Fixed(Duration),
    Uniform(Duration, Duration),
    LogNormal { median: Duration, sigma: f64 },
}

impl Dist {
    pub fn sample(&self, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            Dist::Fixed(d) => d,
            Dist::Uniform(lo, hi) => lo + (hi - lo).mul_f64(rng.f64()),
            Dist::LogNormal { median, sigma } => median.mul_f64(lognormal_factor(rng, sigma)),
        }
    }

    /// The mean service time (capacity = workers / mean).
    pub fn mean(&self) -> Duration {
        match *self {
            Dist::Fixed(d) => d,
            Dist::Uniform(lo, hi) => (lo + hi) / 2,
            Dist::LogNormal { median, sigma } => median.mul_f64((sigma * sigma / 2.0).exp()),
        }
    }
}

impl FromStr for Dist {
    type Err = String;

    fn from_str(s: &str) -> Result<Dist, String> {
        let expected = "expected a duration (20ms), uniform(10ms, 30ms) or lognormal(20ms, 0.5)";
        let dur = |v: &str| {
            humantime::parse_duration(v.trim()).map_err(|e| format!("{v:?}: {e}; {expected}"))
        };
        let s = s.trim();
        let Some((kind, args)) = s.split_once('(') else {
            return dur(s).map(Dist::Fixed);
        };
        let args = args
            .strip_suffix(')')
            .ok_or_else(|| format!("{s:?}: missing `)`; {expected}"))?;
        let (a, b) = args
            .split_once(',')
            .ok_or_else(|| format!("{s:?}: two arguments; {expected}"))?;
        match kind.trim() {
            "uniform" => {
                let (lo, hi) = (dur(a)?, dur(b)?);
                if lo > hi {
                    return Err(format!("{s:?}: the low bound is above the high one"));
                }
                Ok(Dist::Uniform(lo, hi))
            }
            "lognormal" => {
                let sigma: f64 = b
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v: &f64| (0.0..=3.0).contains(v))
                    .ok_or_else(|| format!("{s:?}: sigma must be a number from 0 to 3"))?;
                Ok(Dist::LogNormal {
                    median: dur(a)?,
                    sigma,
                })
            }
            other => Err(format!("{s:?}: unknown distribution {other:?}; {expected}")),
        }
    }
}

impl TryFrom<String> for Dist {
    type Error = String;
    fn try_from(s: String) -> Result<Dist, String> {
        s.parse()
    }
}

/// How one simulated site behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Name reported in responses (`x-sim-name`), e.g. `skondal-1`.
    pub name: String,
    /// Requests served at once; the rest wait.
    pub workers: usize,
    /// Service time of requests no class matches.
    pub service: Dist,
    /// Service time by path prefix, first match wins.
    pub classes: Vec<(String, Dist)>,
    /// Requests allowed to wait for a worker; beyond it they get 503 at once
    /// (no `x-k2-shed`: the backend's own refusal). 0 = unbounded.
    pub queue: usize,
    /// Congestion collapse: each waiting request adds `collapse / workers`
    /// to the service-time factor. 0 = an ideal queue.
    pub collapse: f64,
}

impl SimConfig {
    /// `workers` serving every request in exactly `service`; no collapse.
    pub fn fixed(name: &str, workers: usize, service: Duration) -> SimConfig {
        SimConfig {
            name: name.into(),
            workers,
            service: Dist::Fixed(service),
            classes: Vec::new(),
            queue: 0,
            collapse: 0.0,
        }
    }

    /// Requests per second the pool sustains without queueing (mean service).
    pub fn capacity(&self) -> f64 {
        self.capacity_for(&[("/", 1.0)])
    }

    /// The same for a mix of paths with weights: the mean service time is
    /// weighted by how often each path's class is hit.
    pub fn capacity_for(&self, mix: &[(&str, f64)]) -> f64 {
        let total: f64 = mix.iter().map(|(_, w)| w).sum();
        let mean: f64 = mix
            .iter()
            .map(|(path, w)| self.dist_for(path).mean().as_secs_f64() * w)
            .sum::<f64>()
            / total.max(f64::MIN_POSITIVE);
        if mean <= 0.0 {
            return f64::INFINITY;
        }
        self.workers as f64 / mean
    }

    fn dist_for(&self, path: &str) -> &Dist {
        self.classes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map_or(&self.service, |(_, d)| d)
    }
}

/// A fault the simulator plays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Listener and open connections closed: connections are refused.
    Refuse,
    /// Accept, never answer.
    Hang,
    /// A host that stopped answering at all (packets dropped): open
    /// connections get no answer, and new ones are not accepted (a backlog
    /// of one, never accepted from: the next connects time out).
    Blackhole,
    /// Service times multiplied by this factor.
    Slow(f64),
    /// Answer 500 to this share of requests; `health`: to `/health` too.
    Errors {
        rate: f64,
        health: bool,
    },
}

impl Fault {
    /// The fault as written in scenario files and the control endpoint.
    pub fn name(&self) -> String {
        match self {
            Fault::None => "normal".into(),
            Fault::Refuse => "refuse".into(),
            Fault::Hang => "hang".into(),
            Fault::Blackhole => "blackhole".into(),
            Fault::Slow(f) => format!("slow x{f}"),
            Fault::Errors { rate, .. } => format!("errors {:.0}%", rate * 100.0),
        }
    }
}

/// Counters behind `GET /_sim/stats`.
#[derive(Debug, Default)]
struct Stats {
    total: u64,
    per_tier: HashMap<String, u64>,
    id_counts: HashMap<String, u64>,
    duplicates: u64,
    /// Ids of non-idempotent requests (POST, PATCH) seen more than once:
    /// a purchase processed twice.
    unsafe_ids: HashMap<String, u64>,
    unsafe_duplicates: u64,
    queue_full: u64,
}

/// A running simulator.
pub struct Sim {
    config: SimConfig,
    workers: Workers,
    waiting: AtomicUsize,
    stats: Mutex<Stats>,
    fault: watch::Sender<Fault>,
    /// Bumped on every fault change, so a timed recovery only undoes its own.
    fault_generation: AtomicUsize,
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Sim> {
        Arc::new(Sim {
            workers: Workers::new(config.workers),
            waiting: AtomicUsize::new(0),
            config,
            stats: Mutex::new(Stats::default()),
            fault: watch::Sender::new(Fault::None),
            fault_generation: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    pub fn set_fault(&self, fault: Fault) {
        self.fault_generation.fetch_add(1, Ordering::SeqCst);
        self.fault.send_replace(fault);
    }

    /// Plays `fault` for `duration`, then recovers unless it was changed since.
    pub fn set_fault_for(self: &Arc<Self>, fault: Fault, duration: Duration) {
        self.set_fault(fault);
        let generation = self.fault_generation.load(Ordering::SeqCst);
        let sim = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            if sim.fault_generation.load(Ordering::SeqCst) == generation {
                sim.set_fault(Fault::None);
            }
        });
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Every `x-request-id` seen, with how often.
    pub fn request_ids(&self) -> HashMap<String, u64> {
        self.stats.lock().expect("stats lock").id_counts.clone()
    }

    /// Ids of non-idempotent requests (POST, PATCH) with how often each was seen.
    pub fn unsafe_request_ids(&self) -> HashMap<String, u64> {
        self.stats.lock().expect("stats lock").unsafe_ids.clone()
    }

    /// Requests seen (excluding `/health` and `/_sim/*`).
    pub fn total(&self) -> u64 {
        self.stats.lock().expect("stats lock").total
    }

    /// Plays the current fault; `Some(response)` when it answers instead.
    async fn play_fault(&self, health: bool) -> Option<Response<Full<Bytes>>> {
        let mut changes = self.fault.subscribe();
        loop {
            match *changes.borrow_and_update() {
                Fault::None | Fault::Slow(_) | Fault::Refuse => return None,
                Fault::Hang | Fault::Blackhole => {}
                Fault::Errors { rate, health: h } => {
                    if (health && !h) || fastrand::f64() >= rate {
                        return None;
                    }
                    return Some(text(StatusCode::INTERNAL_SERVER_ERROR, "injected error\n"));
                }
            }
            // Hanging: wait for the fault to change.
            if changes.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Accepts connections until the future is dropped; dropping it also
    /// closes every open connection (a dead host, not just a closed port).
    /// While the fault is [`Fault::Refuse`] the listener is closed and opened
    /// again on the same address when the fault clears.
    pub async fn serve(self: Arc<Sim>, listener: TcpListener) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        let mut listener = Some(listener);
        // While blackholed: a listener that is never accepted from.
        let mut deaf: Option<TcpListener> = None;
        let mut changes = self.fault.subscribe();
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let fault = *changes.borrow_and_update();
            match fault {
                Fault::Refuse if listener.is_some() || deaf.is_some() => {
                    (listener, deaf) = (None, None);
                    connections.abort_all();
                }
                Fault::Blackhole if deaf.is_none() => {
                    listener = None;
                    deaf = Some(rebind(addr, 1).await?);
                }
                Fault::Refuse | Fault::Blackhole => {}
                _ if listener.is_none() => {
                    deaf = None;
                    listener = Some(rebind(addr, 1024).await?);
                }
                _ => {}
            }
            let Some(l) = &listener else {
                if changes.changed().await.is_err() {
                    return Ok(());
                }
                continue;
            };
            let stream = tokio::select! {
                accepted = l.accept() => accepted?.0,
                _ = changes.changed() => continue,
            };
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

    /// Serves only `/_sim/*` (stats and faults) on a listener that faults do
    /// not touch, so a refusing simulator can still be told to recover.
    pub async fn serve_control(self: Arc<Sim>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let sim = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let sim = sim.clone();
                    async move {
                        let r = if req.uri().path().starts_with("/_sim/") {
                            sim.handle(req).await
                        } else {
                            text(
                                StatusCode::NOT_FOUND,
                                "control listener: /_sim/stats, /_sim/fault\n",
                            )
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        self.record(&method, tier.as_deref(), request_id.as_deref());
        if let Some(r) = self.play_fault(false).await {
            return r;
        }

        // Holding a worker for the service time is the capacity limit. A
        // request that finds a worker free never counts as waiting (counted
        // first, it made a concurrent arrival see one waiter too many and
        // refused it with the queue not yet full). Workers keep their own
        // schedule (`workers`): capacity is exactly workers / service.
        let arrived = Instant::now();
        let mut worker = match self.workers.try_take(arrived) {
            Ok(worker) => worker,
            Err(_) => {
                let waiting = Waiting::enter(&self.waiting);
                if self.config.queue > 0 && waiting.ahead >= self.config.queue {
                    self.stats.lock().expect("stats lock").queue_full += 1;
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "legacy backend queue full\n",
                    );
                }
                let worker = self.workers.take(arrived).await;
                drop(waiting);
                worker
            }
        };
        // The queue behind this request at the moment it starts: the longer
        // it is, the slower the backend works (congestion collapse).
        let queued = self.waiting.load(Ordering::Relaxed);
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::BAD_REQUEST, "body read failed\n"),
        };
        let service = self.service_time(&path, queued);
        if !service.is_zero() {
            worker.serve(service).await;
        }
        drop(worker);

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

    /// The service time of one request to `path` with `queued` waiting.
    pub fn service_time(&self, path: &str, queued: usize) -> Duration {
        let dist = self.config.dist_for(path);
        let base = dist.sample(&mut fastrand::Rng::new());
        let slow = match self.fault() {
            Fault::Slow(f) => f,
            _ => 1.0,
        };
        let collapse =
            1.0 + self.config.collapse * queued as f64 / self.config.workers.max(1) as f64;
        // Capped: a collapsed backend is very slow, not stopped.
        base.mul_f64((slow * collapse).min(1000.0))
    }

    fn record(&self, method: &str, tier: Option<&str>, request_id: Option<&str>) {
        let mut s = self.stats.lock().expect("stats lock");
        if let (Some(id), "POST" | "PATCH") = (request_id, method) {
            let n = s.unsafe_ids.entry(id.to_string()).or_default();
            *n += 1;
            if *n > 1 {
                s.unsafe_duplicates += 1;
            }
        }
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
    fn fault_request(self: &Arc<Self>, query: &str) -> Response<Full<Bytes>> {
        match parse_fault_query(query) {
            Ok((fault, None)) => self.set_fault(fault),
            Ok((fault, Some(d))) => self.set_fault_for(fault, d),
            Err(e) => {
                let mut r = text(StatusCode::BAD_REQUEST, "");
                *r.body_mut() = Full::new(Bytes::from(format!("{e}\n")));
                return r;
            }
        }
        text(StatusCode::OK, "ok\n")
    }

    fn stats_response(&self) -> Response<Full<Bytes>> {
        let s = self.stats.lock().expect("stats lock");
        let json = serde_json::json!({
            "sim": self.config.name,
            "total": s.total,
            "per_tier": s.per_tier,
            "duplicate_request_ids": s.duplicates,
            "duplicate_non_idempotent": s.unsafe_duplicates,
            "queue_full": s.queue_full,
            "busy_workers": self.workers.busy(),
            "waiting": self.waiting.load(Ordering::Relaxed),
            "fault": self.fault().name(),
        });
        let mut r = Response::new(Full::new(Bytes::from(json.to_string())));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("static"));
        r
    }
}

/// Counts a request as waiting for a worker while it lives.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    /// Requests that were already waiting when this one arrived.
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Waiting<'a> {
        let ahead = count.fetch_add(1, Ordering::Relaxed);
        Waiting { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds `addr` again after a refuse or blackhole fault, listening with
/// this `backlog`; the old socket may linger briefly.
async fn rebind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    let mut tries = 0;
    loop {
        match bind() {
            Ok(l) => return Ok(l),
            Err(e) if tries >= 50 => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// `mode=normal|refuse|blackhole|hang|slow|errors[&factor=F][&rate=R][&health=1][&for=D]`.
pub fn parse_fault_query(query: &str) -> Result<(Fault, Option<Duration>), String> {
    let arg = |k: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v)
    };
    let number = |k: &str, default: f64, ok: fn(f64) -> bool| match arg(k) {
        None => Ok(default),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|x| ok(*x))
            .ok_or_else(|| format!("{k}={v}: out of range")),
    };
    let fault = match arg("mode") {
        Some("normal") => Fault::None,
        Some("refuse") => Fault::Refuse,
        Some("hang") => Fault::Hang,
        Some("blackhole") => Fault::Blackhole,
        Some("slow") => Fault::Slow(number("factor", 2.0, |f| (1.0..=1000.0).contains(&f))?),
        Some("errors") => Fault::Errors {
            rate: number("rate", 1.0, |r| (0.0..=1.0).contains(&r))?,
            health: arg("health") == Some("1"),
        },
        _ => return Err(
            "expected mode=normal|refuse|blackhole|hang|slow|errors[&factor=F][&rate=R][&health=1][&for=5s]"
                .into(),
        ),
    };
    let duration = match arg("for") {
        None => None,
        Some(v) => Some(humantime::parse_duration(v).map_err(|e| format!("for={v}: {e}"))?),
    };
    Ok((fault, duration))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse_and_sample_in_shape() {
        let mut rng = fastrand::Rng::with_seed(9);
        assert_eq!(
            "20ms".parse::<Dist>().unwrap(),
            Dist::Fixed(Duration::from_millis(20))
        );
        let u: Dist = "uniform(10ms, 30ms)".parse().unwrap();
        for _ in 0..1000 {
            let d = u.sample(&mut rng);
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(30));
        }
        let l: Dist = "lognormal(20ms, 0.5)".parse().unwrap();
        let mut v: Vec<Duration> = (0..10_001).map(|_| l.sample(&mut rng)).collect();
        v.sort();
        let median = v[5000].as_secs_f64() * 1000.0;
        assert!((18.0..22.0).contains(&median), "median {median} ms");
        // Right-skewed: the p99 is far above the median (e^(2.33·0.5) ≈ 3.2x).
        let p99 = v[9900].as_secs_f64() * 1000.0;
        assert!((50.0..80.0).contains(&p99), "p99 {p99} ms");
        for bad in [
            "fast",
            "uniform(30ms, 10ms)",
            "lognormal(20ms)",
            "gamma(1ms, 2)",
            "lognormal(20ms, 9)",
        ] {
            assert!(bad.parse::<Dist>().is_err(), "{bad}");
        }
    }

    #[test]
    fn service_time_follows_the_path_class_the_slow_fault_and_the_queue() {
        let sim = Sim::new(SimConfig {
            classes: vec![("/reports/".into(), Dist::Fixed(Duration::from_millis(200)))],
            collapse: 0.5,
            ..SimConfig::fixed("t", 4, Duration::from_millis(10))
        });
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(sim.service_time("/checkout/x", 0)), 10);
        assert_eq!(ms(sim.service_time("/reports/daily", 0)), 200);
        // 8 waiting on 4 workers at collapse 0.5: factor 1 + 0.5·8/4 = 2.
        assert_eq!(ms(sim.service_time("/checkout/x", 8)), 20);
        assert_eq!(ms(sim.service_time("/checkout/x", 40)), 60);
        sim.set_fault(Fault::Slow(3.0));
        assert_eq!(ms(sim.service_time("/checkout/x", 0)), 30);
        // Capacity under a mix: 3/4 at 10 ms, 1/4 at 200 ms → mean 57.5 ms.
        let cap = sim
            .config()
            .capacity_for(&[("/checkout/", 3.0), ("/reports/", 1.0)]);
        assert!((cap - 4.0 / 0.0575).abs() < 0.01, "{cap}");
    }

    #[test]
    fn fault_queries_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            parse_fault_query("mode=refuse&for=2s").unwrap(),
            (Fault::Refuse, Some(Duration::from_secs(2)))
        );
        assert_eq!(
            parse_fault_query("mode=slow&factor=4").unwrap().0,
            Fault::Slow(4.0)
        );
        assert_eq!(
            parse_fault_query("mode=errors&rate=0.25&health=1")
                .unwrap()
                .0,
            Fault::Errors {
                rate: 0.25,
                health: true
            }
        );
        assert!(parse_fault_query("mode=explode")
            .unwrap_err()
            .contains("expected mode="));
        assert!(parse_fault_query("mode=errors&rate=3")
            .unwrap_err()
            .contains("rate=3"));
        assert!(parse_fault_query("mode=hang&for=soon")
            .unwrap_err()
            .contains("for=soon"));
    }
}
