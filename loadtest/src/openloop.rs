//! A constant-rate open-loop generator: request `i` is due at
//! `start + i / rate` whatever happened to the earlier ones, and its latency
//! is counted from that intended time, so a slow target cannot hide behind
//! the generator slowing down (coordinated omission, as in wrk2).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What to send and how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    pub url: hyper::Uri,
    /// Requests per second.
    pub rate: u32,
    pub duration: Duration,
    /// Per-request client timeout.
    pub timeout: Duration,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
}

/// How requests ended.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcomes {
    pub ok: u64,
    /// 503 carrying `x-k2-shed`.
    pub shed: u64,
    pub rate_limited: u64,
    /// Any other status, or a connection error.
    pub error: u64,
    pub timeout: u64,
}

/// The result of a run.
#[derive(Debug)]
pub struct Report {
    pub sent: u64,
    pub outcomes: Outcomes,
    /// Microseconds from intended send time to the end of the response.
    pub latency: Histogram<u64>,
    /// Microseconds the generator sent late (its own lag).
    pub send_lag: Histogram<u64>,
    pub elapsed: Duration,
}

impl Report {
    /// A short human summary.
    pub fn summary(&self) -> String {
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        let o = &self.outcomes;
        format!(
            "sent {} in {:.1}s ({:.0}/s): ok {} shed {} rate_limited {} error {} timeout {}\n\
             latency from intended send (ms): p50 {:.3} p90 {:.3} p99 {:.3} max {:.3}\n\
             generator send lag (ms): p50 {:.3} p99 {:.3}{}",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.sent as f64 / self.elapsed.as_secs_f64(),
            o.ok,
            o.shed,
            o.rate_limited,
            o.error,
            o.timeout,
            q(&self.latency, 0.5),
            q(&self.latency, 0.9),
            q(&self.latency, 0.99),
            self.latency.max() as f64 / 1000.0,
            q(&self.send_lag, 0.5),
            q(&self.send_lag, 0.99),
            if q(&self.send_lag, 0.99) > 1.0 {
                "  (over 1 ms: the generator itself is a bottleneck; latency figures include it)"
            } else {
                ""
            }
        )
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

/// Runs the plan to the end; every request is bounded by `timeout`.
pub async fn run(plan: Plan) -> Report {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let total = (plan.rate as u64 * plan.duration.as_millis() as u64) / 1000;
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(1) as f64);
    let shared = Arc::new(Mutex::new((Outcomes::default(), histogram())));
    let mut send_lag = histogram();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        send_lag.saturating_record(due.elapsed().as_micros() as u64);
        let mut req = hyper::Request::get(plan.url.clone());
        for (k, v) in &plan.headers {
            req = req.header(k, v);
        }
        let req = req.body(Empty::new()).expect("valid request parts");
        let (client, shared, timeout) = (client.clone(), shared.clone(), plan.timeout);
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
            let mut g = shared.lock().expect("outcome lock");
            let o = &mut g.0;
            match result {
                Err(_) => o.timeout += 1,
                Ok(Err(_)) => o.error += 1,
                Ok(Ok((s, _))) if s.is_success() => o.ok += 1,
                Ok(Ok((s, true))) if s.as_u16() == 429 => o.rate_limited += 1,
                Ok(Ok((_, true))) => o.shed += 1,
                Ok(Ok(_)) => o.error += 1,
            }
            g.1.saturating_record(latency);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let (outcomes, latency) = Arc::try_unwrap(shared)
        .expect("all tasks finished")
        .into_inner()
        .expect("outcome lock");
    Report {
        sent: total,
        outcomes,
        latency,
        send_lag,
        elapsed,
    }
}
