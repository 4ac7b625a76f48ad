//! A constant-rate open-loop generator: request `i` is due at
//! `start + i / rate` whatever happened to the earlier ones, and its latency
//! is counted from that intended time, so a slow target cannot hide behind
//! the generator slowing down (coordinated omission, as in wrk2). Each
//! arrival draws its target (a tier's request) from a weighted mix.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One kind of request in the mix (typically one tier's).
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub url: hyper::Uri,
    /// Relative share of arrivals.
    pub weight: f64,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// A body: sent as a POST (a GET without one).
    pub body: Option<Bytes>,
}

/// What to send and how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    pub targets: Vec<Target>,
    /// Requests per second, all targets together.
    pub rate: u32,
    pub duration: Duration,
    /// Per-request client timeout.
    pub timeout: Duration,
    /// Seed of the mix draw.
    pub seed: u64,
}

/// How requests ended.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcomes {
    pub ok: u64,
    /// 503 (or a tier's shed status) carrying `x-k2-shed`.
    pub shed: u64,
    pub rate_limited: u64,
    /// Any other status, or a connection error.
    pub error: u64,
    pub timeout: u64,
}

/// Results of one target.
#[derive(Debug)]
pub struct TargetReport {
    pub name: String,
    pub sent: u64,
    pub outcomes: Outcomes,
    /// Microseconds from intended send time to the end of a successful response.
    pub ok_latency: Histogram<u64>,
    /// The same for shed responses: how fast a refusal comes.
    pub shed_latency: Histogram<u64>,
}

impl TargetReport {
    pub fn success(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        self.outcomes.ok as f64 / self.sent as f64
    }
}

/// The result of a run.
#[derive(Debug)]
pub struct Report {
    pub targets: Vec<TargetReport>,
    /// Microseconds the generator sent late (its own lag).
    pub send_lag: Histogram<u64>,
    pub elapsed: Duration,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

impl Report {
    pub fn target(&self, name: &str) -> Option<&TargetReport> {
        self.targets.iter().find(|t| t.name == name)
    }

    pub fn sent(&self) -> u64 {
        self.targets.iter().map(|t| t.sent).sum()
    }

    pub fn ok(&self) -> u64 {
        self.targets.iter().map(|t| t.outcomes.ok).sum()
    }

    /// A text table, one line per target.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "sent {} in {:.1}s ({:.0}/s), generator send lag p99 {:.3} ms{}\n",
            self.sent(),
            self.elapsed.as_secs_f64(),
            self.sent() as f64 / self.elapsed.as_secs_f64(),
            ms(&self.send_lag, 0.99),
            if ms(&self.send_lag, 0.99) > 1.0 {
                " (over 1 ms: the generator itself is a bottleneck; latencies include it)"
            } else {
                ""
            }
        );
        out.push_str(&format!(
            "{:<18} {:>7} {:>8} {:>7} {:>6} {:>6} {:>7} {:>10} {:>10} {:>12}\n",
            "target",
            "sent",
            "success",
            "shed",
            "429",
            "error",
            "timeout",
            "ok p50 ms",
            "ok p99 ms",
            "shed p99 ms"
        ));
        for t in &self.targets {
            let o = &t.outcomes;
            out.push_str(&format!(
                "{:<18} {:>7} {:>7.1}% {:>7} {:>6} {:>6} {:>7} {:>10.1} {:>10.1} {:>12.1}\n",
                t.name,
                t.sent,
                t.success() * 100.0,
                o.shed,
                o.rate_limited,
                o.error,
                o.timeout,
                ms(&t.ok_latency, 0.5),
                ms(&t.ok_latency, 0.99),
                ms(&t.shed_latency, 0.99),
            ));
        }
        out
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let targets: Vec<_> = self
            .targets
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "sent": t.sent,
                    "success": t.success(),
                    "outcomes": t.outcomes,
                    "ok_ms": {"p50": ms(&t.ok_latency, 0.5), "p99": ms(&t.ok_latency, 0.99), "max": t.ok_latency.max() as f64 / 1000.0},
                    "shed_ms": {"p50": ms(&t.shed_latency, 0.5), "p99": ms(&t.shed_latency, 0.99)},
                })
            })
            .collect();
        serde_json::json!({
            "sent": self.sent(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "send_lag_p99_ms": ms(&self.send_lag, 0.99),
            "targets": targets,
        })
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

#[derive(Clone, Copy)]
enum Class {
    Ok,
    Shed,
    RateLimited,
    Error,
    Timeout,
}

/// Runs the plan to the end; every request is bounded by `timeout`.
pub async fn run(plan: Plan) -> Report {
    assert!(!plan.targets.is_empty(), "a plan needs at least one target");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let total = (plan.rate as u64 * plan.duration.as_millis() as u64) / 1000;
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(1) as f64);
    let weights: f64 = plan.targets.iter().map(|t| t.weight).sum();
    let reports: Arc<Mutex<Vec<TargetReport>>> = Arc::new(Mutex::new(
        plan.targets
            .iter()
            .map(|t| TargetReport {
                name: t.name.clone(),
                sent: 0,
                outcomes: Outcomes::default(),
                ok_latency: histogram(),
                shed_latency: histogram(),
            })
            .collect(),
    ));
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let mut send_lag = histogram();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        send_lag.saturating_record(due.elapsed().as_micros() as u64);
        let mut x = rng.f64() * weights;
        let idx = plan
            .targets
            .iter()
            .position(|t| {
                x -= t.weight;
                x < 0.0
            })
            .unwrap_or(plan.targets.len() - 1);
        let target = &plan.targets[idx];
        let method = if target.body.is_some() {
            hyper::Method::POST
        } else {
            hyper::Method::GET
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(target.url.clone());
        // Every request has its own id (the simulator counts duplicates by it).
        req = req.header("x-request-id", format!("lt-{}-{i}", plan.seed));
        for (k, v) in &target.headers {
            req = req.header(k, v);
        }
        let body = target.body.clone().unwrap_or_default();
        let req = req.body(Full::new(body)).expect("valid request parts");
        let (client, reports, timeout) = (client.clone(), reports.clone(), plan.timeout);
        tasks.push(tokio::spawn(async move {
            let result = tokio::time::timeout(timeout, async {
                let resp = client.request(req).await?;
                let status = resp.status();
                let shed = resp.headers().contains_key("x-k2-shed");
                resp.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, shed))
            })
            .await;
            let latency = due.elapsed().as_micros() as u64;
            let class = match result {
                Err(_) => Class::Timeout,
                Ok(Err(_)) => Class::Error,
                Ok(Ok((s, _))) if s.is_success() => Class::Ok,
                Ok(Ok((s, true))) if s.as_u16() == 429 => Class::RateLimited,
                Ok(Ok((_, true))) => Class::Shed,
                Ok(Ok(_)) => Class::Error,
            };
            let mut all = reports.lock().expect("report lock");
            let r = &mut all[idx];
            r.sent += 1;
            match class {
                Class::Ok => {
                    r.outcomes.ok += 1;
                    r.ok_latency.saturating_record(latency);
                }
                Class::Shed => {
                    r.outcomes.shed += 1;
                    r.shed_latency.saturating_record(latency);
                }
                Class::RateLimited => r.outcomes.rate_limited += 1,
                Class::Error => r.outcomes.error += 1,
                Class::Timeout => r.outcomes.timeout += 1,
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let targets = Arc::try_unwrap(reports)
        .expect("all tasks finished")
        .into_inner()
        .expect("report lock");
    Report {
        targets,
        send_lag,
        elapsed,
    }
}
