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
