//! End to end at 3x capacity: the real k2proxy with the repo's default policy
//! in front of a legacy-sim of fixed capacity, open-loop load with the
//! holiday mix (20% purchase, 30% merchant, 30% admin, 20% customer service)
//! for 10 s, after a second at half capacity (the proxy has served before the
//! peak comes). Purchases keep succeeding, refusals are fast, nobody times
//! out, and the backend stays busy.
//!
//! Without the warm-up the first window of the limit sees the queue that
//! its `initial` (8) builds on 4 workers and takes 39 ms for the baseline of a
//! 25 ms backend, until the shed level lowers the in-flight a second later;
//! the customer service requests queued meanwhile wait their whole 100 ms.
//! Measured with the warm-up removed: refusal p99 77-102 ms (before the
//! first window ran from its first response, 62-65 ms, but that build took
//! one quick response for a log-normal backend's baseline and sat at `min`).
//! A cold start into overload is the fleet simulation's scenario 14.

mod support;

use std::time::Duration;

use hdrhistogram::Histogram;
use loadtest::openloop::{self, Plan, Target};
use loadtest::sim::{self, SimConfig};
use support::*;

const WORKERS: usize = 4;
const SERVICE: Duration = Duration::from_millis(25);
/// Requests per second the simulator can serve.
const CAPACITY: f64 = WORKERS as f64 / 0.025;
const SECONDS: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_keep_flowing_at_three_times_capacity() {
    let config = SimConfig::fixed("legacy", WORKERS, SERVICE);
    let sim = sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let backend = sim.addr;
    let proxy = Proxy::start(&kred_routes(backend), &default_policy()).await;

    let target = |name: &str, path: &str, weight: f64| Target {
        name: name.into(),
        url: proxy.url(path).parse().unwrap(),
        weight,
        // No x-merchant-id: the default policy's per-merchant rate limit
        // would otherwise throttle one merchant's share; this is about admission.
        headers: vec![],
        body: None,
    };
    let mix = || {
        vec![
            target("purchase", "/checkout/pay", 20.0),
            target("merchant", "/api/invoices", 30.0),
            target("admin", "/admin/users", 30.0),
            target("customer_service", "/cs/tickets", 20.0),
        ]
    };
    let warm_up = openloop::run(Plan {
        targets: mix(),
        rate: (0.5 * CAPACITY) as u32,
        duration: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        seed: 7,
    })
    .await;
    assert_eq!(warm_up.ok(), warm_up.sent(), "{}", warm_up.summary());
    let report = openloop::run(Plan {
        targets: mix(),
        rate: (3.0 * CAPACITY) as u32,
        duration: Duration::from_secs(SECONDS),
        timeout: Duration::from_secs(5),
        seed: 42,
    })
    .await;
    println!("{}", report.summary());
    let metrics = proxy.metrics().await;
    for t in &report.targets {
        let h = &t.shed_latency;
        println!(
            "{} shed ms: p50 {:.1} p90 {:.1} p95 {:.1} p99 {:.1} max {:.1} n {}",
            t.name,
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.9) as f64 / 1e3,
            h.value_at_quantile(0.95) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.max() as f64 / 1e3,
            h.len()
        );
    }
    for l in metrics.lines().filter(|l| {
        l.starts_with("k2_shed")
            || l.starts_with("k2_admission_limit")
            || l.starts_with("k2_queue_depth")
    }) {
        println!("{l}");
    }

    let purchase = report.target("purchase").unwrap();
    assert!(
        purchase.success() >= 0.99,
        "purchase success {:.4}\n{}",
        purchase.success(),
        report.summary()
    );
    let p99 = Duration::from_micros(purchase.ok_latency.value_at_quantile(0.99));
    assert!(
        p99 < Duration::from_secs(2),
        "purchase p99 {p99:?} is not below max_queue_wait"
    );

    let mut shed = Histogram::<u64>::new(3).unwrap();
    for name in ["merchant", "admin", "customer_service"] {
        shed.add(&report.target(name).unwrap().shed_latency)
            .unwrap();
    }
    assert!(!shed.is_empty(), "lower tiers were shed");
    let shed_p95 = Duration::from_micros(shed.value_at_quantile(0.95));
    let shed_p99 = Duration::from_micros(shed.value_at_quantile(0.99));
    // Refusals in milliseconds, not after a queue wait or a timeout: the
    // fleet target is under 100 ms for every refusal. (Measured here, debug
    // build on 2 cores: p99 42-46 ms, with outliers to 57 ms under load.)
    // A timed test on a shared 2-core machine cannot hold the target's
    // every refusal: a CPU stall of 100 ms times out what queued meanwhile
    // in one burst (seen once in three full runs: admin and customer
    // service at their 200 and 100 ms waits, p99 over 100 ms). So the bulk
    // must be quick and the tail no slower than the longest lower-tier
    // wait (admin's 200 ms); the target itself is measured by
    // `make bench-peers` and the simulator (docs/admission.md).
    assert!(
        shed_p95 < Duration::from_millis(100) && shed_p99 < Duration::from_millis(250),
        "shed p95 {shed_p95:?} p99 {shed_p99:?}\n{}\nrefusals over 100 ms, from the access log:\n{}",
        report.summary(),
        slow_refusals(&proxy.log_text(), 100.0)
    );

    let timeouts: u64 = report.targets.iter().map(|t| t.outcomes.timeout).sum();
    let errors: u64 = report.targets.iter().map(|t| t.outcomes.error).sum();
    assert_eq!((timeouts, errors), (0, 0), "{}", report.summary());

    // What the limit learned, as an operator reads it: a latency of the
    // backend's (25 ms at least), not a queue a limit of `max` would hold.
    // Alone this build learns 26 ms; under the full suite's CPU contention
    // it learned 38 ms once (a debug proxy starved of CPU is slower).
    let status = proxy.status().await;
    let site = &status["clusters"][0]["sites"][0];
    let learnt = &site["learnt"];
    println!("learnt: {learnt}");
    let baseline = learnt["baseline_ms"].as_f64().expect("a baseline");
    assert!(
        (24.0..60.0).contains(&baseline),
        "baseline {baseline} ms for a 25 ms backend: {site}"
    );
    assert!(learnt["ceiling_ms"].as_f64() >= Some(baseline), "{site}");
    assert!(learnt["latency_ms"].as_f64() >= Some(24.0), "{site}");
    assert_eq!(site["standing_queue"], false, "off in the default policy");
    // Whether it claims a share above its ceiling: null or a reason and ms.
    let claim = learnt
        .get("claim")
        .unwrap_or_else(|| panic!("no claim: {site}"));
    assert!(
        claim.is_null() || (claim["reason"].is_string() && claim["ms"].as_f64() > Some(0.0)),
        "{claim}"
    );
    // The same baseline on /metrics (nothing finished since: the load is over).
    let metrics = proxy.metrics().await;
    let site_gauge = |name: &str| {
        let prefix = format!(r#"{name}{{cluster="kred",site="skondal"}} "#);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let exported = site_gauge("k2_admission_baseline_seconds");
    assert!(
        (exported * 1e3 - baseline).abs() < 0.01,
        "{exported} s on /metrics, {baseline} ms on /status"
    );
    let claimed = site_gauge("k2_admission_claim_seconds");
    let on_status = claim["ms"].as_f64().unwrap_or(0.0);
    assert!(
        (claimed * 1e3 - on_status).abs() < 0.01,
        "{claimed} s on /metrics, {claim} on /status"
    );

    let goodput = report.ok() as f64 / (CAPACITY * SECONDS as f64);
    assert!(
        goodput >= 0.8,
        "goodput {goodput:.3} of capacity\n{}",
        report.summary()
    );
}

/// The access log's 503s that took over `ms`, one line each (time, tier,
/// shed reason, duration), at most 40: what a failed refusal bound looked like.
fn slow_refusals(log: &str, ms: f64) -> String {
    let field = |line: &str, key: &str| -> String {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .unwrap_or("-")
            .trim_matches('"')
            .to_string()
    };
    let slow: Vec<String> = log
        .lines()
        .filter(|l| l.contains("k2proxy::access") && l.contains(" status=503 "))
        .filter(|l| {
            field(l, "duration_ms=")
                .parse::<f64>()
                .is_ok_and(|d| d > ms)
        })
        .map(|l| {
            let at = l.split_whitespace().next().unwrap_or("-");
            let keys = ["tier=", "shed=", "duration_ms="];
            let fields: Vec<String> = keys.iter().map(|k| field(l, k)).collect();
            format!("{at} {}", fields.join(" "))
        })
        .collect();
    let shown = slow[..slow.len().min(40)].join("\n");
    format!("{} in all\n{shown}", slow.len())
}
