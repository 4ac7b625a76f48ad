//! legacy-sim and the open-loop generator, on real sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use loadtest::openloop::{self, Plan, Target};
use loadtest::sim::{self, SimConfig};

/// Starts a simulator that serves until the test's runtime ends.
async fn start_sim(workers: usize, service_time: Duration) -> SocketAddr {
    let config = SimConfig::fixed("test-sim", workers, service_time);
    let handle = sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = handle.addr;
    // Dropping the handle would stop it; the runtime's end stops it instead.
    std::mem::forget(handle);
    addr
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Time for `n` concurrent GETs to all finish.
async fn concurrent(addr: SocketAddr, n: usize) -> Duration {
    let c = client();
    let start = Instant::now();
    let reqs: Vec<_> = (0..n)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                c.get(format!("http://{addr}/checkout/{i}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
    start.elapsed()
}

#[tokio::test]
async fn workers_bound_concurrency_and_the_rest_queue() {
    let service = Duration::from_millis(300);
    let one_worker = start_sim(1, service).await;
    let two_workers = start_sim(2, service).await;
    let (queued, parallel) = tokio::join!(concurrent(one_worker, 2), concurrent(two_workers, 2));
    assert!(
        queued >= 2 * service,
        "1 worker served 2 requests in {queued:?}"
    );
    assert!(
        parallel < 2 * service,
        "2 workers took {parallel:?} for 2 requests"
    );
    assert!(parallel >= service);
}

#[tokio::test]
async fn health_is_answered_while_every_worker_is_busy() {
    let addr = start_sim(1, Duration::from_millis(800)).await;
    let c = client();
    let busy = tokio::spawn({
        let c = c.clone();
        async move { c.get(format!("http://{addr}/slow")).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let health = c.get(format!("http://{addr}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "health waited for a worker"
    );
    busy.await.unwrap();
}

#[tokio::test]
async fn stats_count_tiers_and_duplicate_request_ids_and_echo_bodies() {
    let addr = start_sim(4, Duration::ZERO).await;
    let c = client();
    for (tier, id) in [
        ("purchase", "a"),
        ("purchase", "b"),
        ("admin", "c"),
        ("purchase", "a"),
    ] {
        let r = c
            .get(format!("http://{addr}/checkout/x"))
            .header("x-k2-tier", tier)
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-sim-saw-tier"], tier);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["tier"], tier);
        assert_eq!(body["request_id"], id);
    }
    let echoed = c
        .post(format!("http://{addr}/pay"))
        .body("payload-1")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.text().await.unwrap(), "payload-1");
    let stats: serde_json::Value = c
        .get(format!("http://{addr}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["total"], 5);
    assert_eq!(stats["per_tier"]["purchase"], 3);
    assert_eq!(stats["per_tier"]["admin"], 1);
    assert_eq!(stats["per_tier"]["none"], 1);
    assert_eq!(stats["duplicate_request_ids"], 1);
}

fn target(name: &str, url: String, weight: f64) -> Target {
    Target {
        name: name.into(),
        url: url.parse().unwrap(),
        weight,
        headers: vec![("x-k2-tier".into(), "purchase".into())],
        body: None,
    }
}

#[tokio::test]
async fn open_loop_sends_the_planned_count_and_classifies_outcomes() {
    let addr = start_sim(8, Duration::from_millis(1)).await;
    let plan = |base: String| Plan {
        targets: vec![
            target("a", format!("{base}/a"), 3.0),
            target("b", format!("{base}/b"), 1.0),
        ],
        rate: 400,
        duration: Duration::from_millis(500),
        timeout: Duration::from_secs(2),
        seed: 7,
    };
    let ok = openloop::run(plan(format!("http://{addr}"))).await;
    assert_eq!(ok.sent(), 200);
    assert_eq!(ok.ok(), 200, "{}", ok.summary());
    let a = ok.target("a").unwrap();
    assert!(
        (130..=170).contains(&a.sent),
        "weights 3:1 give about 150 of 200, got {}",
        a.sent
    );
    assert_eq!(a.ok_latency.len(), a.sent);
    assert!(
        ok.elapsed >= Duration::from_millis(495),
        "open loop keeps its schedule"
    );

    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = openloop::run(plan(format!("http://{dead}"))).await;
    let errors: u64 = refused.targets.iter().map(|t| t.outcomes.error).sum();
    assert_eq!(errors, 200, "{}", refused.summary());
}

#[tokio::test]
async fn open_loop_counts_latency_from_the_intended_send_time() {
    // One worker, 50 ms each, 40 requests/s for 1 s: the sim serves at most
    // 20/s, so a queue builds and late requests wait far longer than 50 ms.
    let addr = start_sim(1, Duration::from_millis(50)).await;
    let report = openloop::run(Plan {
        targets: vec![target("x", format!("http://{addr}/x"), 1.0)],
        rate: 40,
        duration: Duration::from_secs(1),
        timeout: Duration::from_secs(10),
        seed: 1,
    })
    .await;
    let x = report.target("x").unwrap();
    assert_eq!(x.outcomes.ok, 40);
    // The last request is due at ~975 ms but the 40th service ends at ~2000 ms.
    assert!(
        x.ok_latency.max() >= 800_000,
        "max {} us",
        x.ok_latency.max()
    );
}

async fn start_with(config: SimConfig) -> (SocketAddr, std::sync::Arc<sim::Sim>) {
    let handle = sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let out = (handle.addr, handle.sim.clone());
    std::mem::forget(handle);
    out
}

async fn fault(addr: SocketAddr, query: &str) {
    let r = client()
        .post(format!("http://{addr}/_sim/fault?{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{query}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn congestion_collapse_slows_the_backend_down_past_the_knee() {
    // 40 requests at once on 4 workers of 10 ms: an ideal queue drains in
    // 10 rounds (~100 ms); a collapsing one takes several times longer.
    let ideal = start_sim(4, Duration::from_millis(10)).await;
    let (collapsing, _) = start_with(SimConfig {
        collapse: 1.0,
        ..SimConfig::fixed("c", 4, Duration::from_millis(10))
    })
    .await;
    let a = concurrent(ideal, 40).await;
    let b = concurrent(collapsing, 40).await;
    assert!(a < Duration::from_millis(400), "ideal {a:?}");
    // Against the ideal's 10 rounds (100 ms) three times over, and twice
    // the ideal as measured: CPU contention slows the ideal run too (164
    // ms once, with 479 ms for the collapse), which made "three times
    // the measured ideal" fail on a loaded machine.
    assert!(
        b > Duration::from_millis(300) && b > a * 2,
        "collapse {b:?} vs ideal {a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_mode_plays_and_recovers() {
    let (addr, sim) = start_with(SimConfig::fixed("f", 4, Duration::from_millis(20))).await;
    let c = client();
    let get = |path: &'static str| {
        let c = c.clone();
        async move {
            tokio::time::timeout(
                Duration::from_millis(600),
                c.get(format!("http://{addr}{path}")).send(),
            )
            .await
        }
    };

    // errors: every request 500, health still fine unless asked.
    fault(addr, "mode=errors&rate=1").await;
    assert_eq!(get("/x").await.unwrap().unwrap().status(), 500);
    assert_eq!(get("/health").await.unwrap().unwrap().status(), 200);
    fault(addr, "mode=errors&rate=1&health=1").await;
    assert_eq!(get("/health").await.unwrap().unwrap().status(), 500);

    // slow: service time x5.
    fault(addr, "mode=slow&factor=5").await;
    let t = Instant::now();
    assert_eq!(get("/x").await.unwrap().unwrap().status(), 200);
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );

    // hang: accepted, never answered, until the fault clears (here by `for`).
    fault(addr, "mode=hang&for=800ms").await;
    assert!(get("/x").await.is_err(), "a hanging backend answered");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get("/x").await.unwrap().unwrap().status(), 200);

    // refuse: the listener is gone (connect refused), then back.
    fault(addr, "mode=refuse&for=500ms").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "connect should be refused");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get("/x").await.unwrap().unwrap().status(), 200);
    assert_eq!(sim.fault(), sim::Fault::None);

    // blackhole: an open connection gets no answer, and once the one-place
    // backlog is full a new connect gets no handshake (it times out, it is
    // not refused); then back.
    let open = tokio::net::TcpStream::connect(addr).await.unwrap();
    fault(addr, "mode=blackhole&for=1500ms").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(open);
    assert!(get("/x").await.is_err(), "a blackholed backend answered");
    let mut outcomes = Vec::new();
    let mut held = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_millis(150),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => {
                held.push(s);
                outcomes.push("connected")
            }
            Ok(Err(_)) => outcomes.push("refused"),
            Err(_) => outcomes.push("timed out"),
        }
    }
    assert!(!outcomes.contains(&"refused"), "{outcomes:?}");
    assert_eq!(outcomes.last(), Some(&"timed out"), "{outcomes:?}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get("/x").await.unwrap().unwrap().status(), 200);

    let bad = c
        .post(format!("http://{addr}/_sim/fault?mode=melt"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("expected mode="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_the_control_listener_survives_refuse() {
    let (addr, sim) = start_with(SimConfig {
        queue: 2,
        ..SimConfig::fixed("q", 1, Duration::from_millis(300))
    })
    .await;
    let statuses: Vec<u16> = {
        let c = client();
        let reqs: Vec<_> = (0..5)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.get(format!("http://{addr}/q/{i}"))
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        let mut out = Vec::new();
        for r in reqs {
            out.push(r.await.unwrap());
        }
        out
    };
    // One served, two waiting, the rest refused by the backend itself.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        2,
        "{statuses:?}"
    );

    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = control.local_addr().unwrap();
    tokio::spawn(sim.clone().serve_control(control));
    fault(control_addr, "mode=refuse").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    fault(control_addr, "mode=normal").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats: serde_json::Value = client()
        .get(format!("http://{addr}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["queue_full"], 2);
    assert_eq!(stats["fault"], "normal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stalls_shows_in_the_p99_from_the_intended_time() {
    // 200/s for 2 s at a fast backend that stops answering for 500 ms at
    // 1 s: requests due during the stall wait it out, and the generator
    // keeps sending on schedule, so the stall is in the p99.
    let (addr, sim) = start_with(SimConfig::fixed("s", 64, Duration::from_millis(1))).await;
    let load = tokio::spawn(openloop::run(Plan {
        targets: vec![target("x", format!("http://{addr}/x"), 1.0)],
        rate: 200,
        duration: Duration::from_secs(2),
        timeout: Duration::from_secs(5),
        seed: 3,
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    sim.set_fault_for(sim::Fault::Hang, Duration::from_millis(500));
    let report = load.await.unwrap();
    let x = report.target("x").unwrap();
    assert_eq!(x.outcomes.ok, 400, "{}", report.summary());
    let p99 = x.ok_latency.value_at_quantile(0.99);
    let p50 = x.ok_latency.value_at_quantile(0.5);
    assert!(p99 >= 400_000, "p99 {p99} us");
    assert!(p50 < 50_000, "p50 {p50} us");
    // The generator kept its schedule well enough that the 400 ms come from
    // the stall, not from it: its own lag stays far below. (Not 5 ms: a
    // debug build starved by the test binaries beside it lagged 35 ms once
    // in CI.)
    assert!(
        report.lag_p99_ms() < 100.0,
        "the generator kept its schedule: {}",
        report.generator_line()
    );
}
