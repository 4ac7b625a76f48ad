//! Fleet-wide rate limits on a real redis-server (Debian's package; `make
//! test-deps` installs it) with three real k2proxy instances: one merchant's
//! quota holds across all of them; with `scope = "instance"` it is three
//! times the quota; losing Redis loses nothing (no 5xx, each instance falls
//! back to its share within 100 ms, fleet mode resumes when Redis returns);
//! a Redis that flaps (slow for a moment, then fine, again and again) does
//! not let the fleet overshoot; a slow Redis costs a request no more than
//! the store's timeout.
//!
//! The tests take turns ([`SERIAL`]): each runs three proxies, a Redis and a
//! load generator on real time, and two at once on two cores made Redis
//! slower than the store's timeout (a CI run saw the quota overshoot by 17%
//! and a fallback noticed after 108 ms).

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loadtest::openloop::{self, Plan, Target, TargetReport};
use support::*;

const ROUTES: &str = r#"
[[routes]]
name = "merchant-api"
match = { path_prefix = "/api/" }
tier = "merchant"
cluster = "main"
"#;

/// The merchant's quota: 50/s with a burst of 10, per fleet or instance.
fn policy(redis: SocketAddr, scope: &str, timeout: &str) -> String {
    // Admission off: these tests count 200s and 429s, and three fleets of
    // k2proxy, Redis and the load generator share two cores; an adaptive
    // limit then saw stalls as queueing and shed a few requests (1 run in 6
    // before issue 17's second round, more after), which is not what these
    // tests are about.
    format!(
        r#"tiers = ["purchase", "merchant"]

[admission.main]
mode = "off"

[rate_limit_store]
redis = "redis://{redis}/0"
fleet_size = 3
timeout = "{timeout}"

[[rate_limit]]
name = "merchant-quota"
route = "merchant-api"
key = "header:x-merchant-id"
per_second = 50
burst = 10
scope = "{scope}"
"#
    )
}

/// A redis-server on a free loopback port, killed (by its PID) on drop.
struct Redis {
    addr: SocketAddr,
    child: Option<Child>,
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run `make test-deps` (apt-get install redis-server)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis {
            addr,
            child: Some(child),
        }
    }

    fn start() -> Redis {
        Redis::start_on(free_port())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn fleet(redis: SocketAddr, backend: SocketAddr, scope: &str, timeout: &str) -> Vec<Proxy> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(
            Proxy::start(
                &routes_toml(&[backend], ROUTES),
                &policy(redis, scope, timeout),
            )
            .await,
        );
    }
    out
}

/// One merchant at `rate` a second for `secs`, spread evenly over `proxies`
/// (as an L4 balancer would).
fn plan(proxies: &[Proxy], rate: u32, secs: u64) -> Plan {
    Plan {
        targets: proxies
            .iter()
            .enumerate()
            .map(|(i, p)| Target {
                name: format!("k2proxy-{i}"),
                url: p.url("/api/orders").parse().unwrap(),
                weight: 1.0,
                headers: vec![("x-merchant-id".into(), "m-1".into())],
                body: None,
            })
            .collect(),
        rate,
        duration: Duration::from_secs(secs),
        timeout: Duration::from_secs(3),
        seed: 3,
    }
}

fn total(targets: &[TargetReport], f: fn(&TargetReport) -> u64) -> u64 {
    targets.iter().map(f).sum()
}

/// One test at a time in this file.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `plan` and returns the 200s a second; panics on anything but 200s
/// and 429s.
async fn accepted_per_second(plan: Plan, what: &str) -> f64 {
    let secs = plan.duration.as_secs_f64();
    let report = openloop::run(plan).await;
    let ok = total(&report.targets, |t| t.outcomes.ok);
    let limited = total(&report.targets, |t| t.outcomes.rate_limited);
    let sent = total(&report.targets, |t| t.sent);
    let other = |f: fn(&TargetReport) -> u64| total(&report.targets, f);
    assert_eq!(
        ok + limited,
        sent,
        "{what}: only 200s and 429s (shed {}, errors {}, timeouts {})",
        other(|t| t.outcomes.shed),
        other(|t| t.outcomes.error),
        other(|t| t.outcomes.timeout),
    );
    ok as f64 / secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_limit_holds_across_three_instances_and_an_instance_limit_does_not() {
    let _turn = SERIAL.lock().await;
    let redis = Redis::start();
    let backend = Backend::start("b").await;
    let mut accepted = Vec::new();
    for scope in ["fleet", "instance"] {
        let proxies = fleet(redis.addr, backend.addr, scope, "50ms").await;
        accepted.push(accepted_per_second(plan(&proxies, 300, 10), scope).await);
    }
    let (fleet, instance) = (accepted[0], accepted[1]);
    println!("accepted: fleet {fleet}/s, instance {instance}/s");
    // 50/s and a burst of 10 over 10 s: 51/s for the fleet; three times
    // that with a bucket per instance.
    assert!((45.0..=57.0).contains(&fleet), "fleet accepted {fleet}/s");
    assert!(
        (135.0..=170.0).contains(&instance),
        "instance scope accepted {instance}/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_loses_nothing_and_fleet_mode_resumes_when_it_returns() {
    let _turn = SERIAL.lock().await;
    let mut redis = Redis::start();
    let port = redis.addr.port();
    let backend = Backend::start("b").await;
    let proxies = fleet(redis.addr, backend.addr, "fleet", "50ms").await;
    let load = tokio::spawn(openloop::run(plan(&proxies, 300, 8)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.kill();
    let killed = Instant::now();
    // Every instance sees it within 100 ms (each gets 100 requests a
    // second, so the next lease finds Redis gone at once).
    let mut noticed = Vec::new();
    for p in &proxies {
        let m = p.metrics_when("k2_rate_limit_store_up 0").await;
        assert!(m.contains("k2_rate_limit_store_up 0"), "not noticed");
        noticed.push(killed.elapsed());
    }
    assert!(
        noticed[0] <= Duration::from_millis(100),
        "fallback after {noticed:?}"
    );
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(killed.elapsed())).await;
    let mut redis = Redis::start_on(port);
    let back = Instant::now();
    for p in &proxies {
        let m = p.metrics_when("k2_rate_limit_store_up 1").await;
        assert!(m.contains("k2_rate_limit_store_up 1"), "not resumed");
    }
    let resumed = back.elapsed();
    println!("fallback noticed after {noticed:?}; fleet mode resumed after {resumed:?}");
    assert!(
        resumed <= Duration::from_secs(2),
        "resumed after {resumed:?}"
    );
    let report = load.await.unwrap();
    let sent = total(&report.targets, |t| t.sent);
    let ok = total(&report.targets, |t| t.outcomes.ok);
    let limited = total(&report.targets, |t| t.outcomes.rate_limited);
    assert_eq!(ok + limited, sent, "no 5xx, no error: only 200s and 429s");
    // 8 s at about 50/s whoever counts (the fleet, or each instance a third).
    let rate = ok as f64 / 8.0;
    println!("accepted {rate}/s over the run, {sent} sent");
    assert!((40.0..=65.0).contains(&rate), "accepted {rate}/s");
    for p in &proxies {
        let m = p.metrics().await;
        assert!(metric_sum(&m, "k2_rate_limit_fallbacks_total") > 0.0, "{m}");
    }
    redis.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_a_request_no_more_than_the_stores_timeout() {
    let _turn = SERIAL.lock().await;
    let redis = Redis::start();
    // Always slow: 200 ms for every answer.
    let slow = flapping_proxy(
        redis.addr,
        Duration::from_secs(1),
        Duration::from_secs(1),
        Duration::from_millis(200),
    )
    .await;
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(
        &routes_toml(&[backend.addr], ROUTES),
        &policy(slow, "fleet", "50ms"),
    )
    .await;
    let c = client();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let t = Instant::now();
        let r = c
            .get(proxy.url("/api/orders"))
            .header("x-merchant-id", "m-1")
            .send()
            .await
            .unwrap();
        assert!(r.status() == 200 || r.status() == 429, "{}", r.status());
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("slowest request with a 200 ms Redis: {slowest:?}");
    // The timeout (50 ms) plus the proxy's own time, far from Redis's 200.
    assert!(slowest < Duration::from_millis(150), "slowest {slowest:?}");
    let m = proxy.metrics().await;
    assert!(m.contains("k2_rate_limit_store_up 0"), "{m}");
}

/// A TCP proxy in front of Redis that is slow for `bad` out of every
/// `period` (each answer held `delay` then) and fine otherwise: a Redis
/// that flaps (or, with `bad` = `period`, one that is always slow).
async fn flapping_proxy(
    to: SocketAddr,
    period: Duration,
    bad: Duration,
    delay: Duration,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    let phase = start.elapsed().as_micros() % period.as_micros();
                    if phase < bad.as_micros() {
                        tokio::time::sleep(delay).await;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_redis_does_not_let_the_fleet_overshoot() {
    let _turn = SERIAL.lock().await;
    let redis = Redis::start();
    // Slow (80 ms, over the 50 ms timeout) for 150 ms of every 500: the
    // store goes down and comes back (its probe) about twice a second.
    let flapping = flapping_proxy(
        redis.addr,
        Duration::from_millis(500),
        Duration::from_millis(150),
        Duration::from_millis(80),
    )
    .await;
    let backend = Backend::start("b").await;
    let proxies = fleet(flapping, backend.addr, "fleet", "50ms").await;
    let rate = accepted_per_second(plan(&proxies, 300, 10), "flapping").await;
    let mut fallbacks = Vec::new();
    for p in &proxies {
        fallbacks.push(metric_sum(
            &p.metrics().await,
            "k2_rate_limit_fallbacks_total",
        ));
    }
    println!("accepted {rate}/s with a flapping Redis; fallbacks per instance {fallbacks:?}");
    assert!(
        fallbacks.iter().all(|&f| f > 0.0),
        "the store never went down: {fallbacks:?}"
    );
    // 50/s and a burst of 10 over 10 s is 51/s. Before the fallback's
    // admissions were owed to the store, each flap handed out a fresh
    // burst from the store and from each instance: 77/s in this test. Now
    // 56-58/s: the store spends a debt down to an empty bucket and no
    // further, so the debt of an instance that comes back after another
    // one has leased from the refilled bucket is partly forgiven (charging
    // it all gave 47/s: the leases that time out are taken as spent).
    assert!((45.0..=62.0).contains(&rate), "accepted {rate}/s");
}
