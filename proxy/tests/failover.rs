//! Sites and failover end to end: real k2proxy, legacy-sims for a primary
//! (2 backends) and a secondary site (1 backend), open-loop purchase load
//! (POST, unique x-request-id). Each fault is a named test; every test also
//! checks that no purchase reached the backends twice.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use loadtest::sim::{self, Fault, SimConfig, SimHandle};
use support::*;

struct Sites {
    p1: SimHandle,
    p2: SimHandle,
    s1: SimHandle,
    proxy: Proxy,
}

async fn start_sim(name: &str, service: Duration) -> SimHandle {
    let config = SimConfig::fixed(name, 64, service);
    sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn routes(p1: &SimHandle, p2: &SimHandle, s1: &SimHandle) -> String {
    format!(
        r#"[server]
listen = ["{{LISTEN}}"]
admin = "{{ADMIN}}"
threads = 2
policy = "policy.toml"

[clusters.main]
connect_timeout = "200ms"
health = {{ path = "/health", interval = "200ms", timeout = "100ms", rise = 2, fall = 2 }}
outlier = {{ consecutive_failures = 3, base_ejection = "2s", max_ejected_share = 1.0 }}

[[clusters.main.sites]]
name = "primary"
role = "primary"
backends = ["{}", "{}"]

[[clusters.main.sites]]
name = "secondary"
role = "secondary"
backends = ["{}"]

[[routes]]
name = "checkout"
match = {{ path_prefix = "/checkout/" }}
tier = "purchase"
cluster = "main"
timeout = "1s"
"#,
        p1.addr, p2.addr, s1.addr
    )
}

fn policy(spill: bool, fixed_limit: Option<u32>) -> String {
    let mut p = format!(
        "tiers = [\"purchase\", \"merchant\"]\n\n[tier.purchase]\nmax_queue_wait = \"300ms\"\nspill = {spill}\n"
    );
    if let Some(limit) = fixed_limit {
        p.push_str(&format!(
            "\n[admission.main]\nmode = \"fixed\"\nlimit = {limit}\n"
        ));
    }
    p
}

/// Starts the sites and k2proxy; returns once every backend is checked up.
async fn sites(service: Duration, policy: &str) -> Sites {
    let (p1, p2, s1) = (
        start_sim("p1", service).await,
        start_sim("p2", service).await,
        start_sim("s1", service).await,
    );
    let proxy = Proxy::start(&routes(&p1, &p2, &s1), policy).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = proxy.status().await;
        let all_up = s["clusters"][0]["sites"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|site| site["backends"].as_array().unwrap().clone())
            .all(|b| b["health"] == "up");
        if all_up {
            break;
        }
        assert!(Instant::now() < deadline, "backends never came up: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Sites { p1, p2, s1, proxy }
}

/// One purchase: when it was due, when it was sent and answered (the
/// test's clock, late on a loaded machine), how it ended, which simulator
/// answered.
#[derive(Debug, Clone)]
struct Purchase {
    due: Duration,
    sent: Instant,
    answered: Instant,
    status: u16,
    sim: Option<String>,
}

/// Open-loop POST purchases at `rate` for `duration`, each with its own id.
fn purchases(
    url: String,
    rate: u32,
    duration: Duration,
    prefix: &'static str,
) -> tokio::task::JoinHandle<Vec<Purchase>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let start = tokio::time::Instant::now();
        let total = (rate as u64 * duration.as_millis() as u64) / 1000;
        let mut tasks = Vec::new();
        for i in 0..total {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(start + due).await;
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let r = client
                    .post(url)
                    .header("x-request-id", format!("{prefix}-{i}"))
                    .body(r#"{"amount": 1999}"#)
                    .send()
                    .await;
                match r {
                    Ok(r) => Purchase {
                        due,
                        sent,
                        answered: Instant::now(),
                        status: r.status().as_u16(),
                        sim: r
                            .headers()
                            .get("x-sim-name")
                            .map(|v| v.to_str().unwrap().to_string()),
                    },
                    Err(_) => Purchase {
                        due,
                        sent,
                        answered: Instant::now(),
                        status: 0,
                        sim: None,
                    },
                }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

/// No purchase id reached the backends more than once, across all sites.
fn assert_no_duplicates(sites: &Sites) {
    let mut all: HashMap<String, u64> = HashMap::new();
    for h in [&sites.p1, &sites.p2, &sites.s1] {
        for (id, n) in h.sim.request_ids() {
            *all.entry(id).or_default() += n;
        }
    }
    let dups: Vec<_> = all.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "purchases processed twice: {dups:?}");
}

/// When purchases (due after `from`) were first all answered by the secondary.
fn moved_after(ps: &[Purchase], from: Duration) -> Option<Duration> {
    let after: Vec<&Purchase> = ps.iter().filter(|p| p.due >= from).collect();
    match after.iter().rposition(|p| p.sim.as_deref() != Some("s1")) {
        // Every purchase since the fault was answered by the secondary.
        None => after.first().map(|p| p.due - from),
        Some(last_elsewhere) => after.get(last_elsewhere + 1).map(|p| p.due - from),
    }
}

fn report(name: &str, ps: &[Purchase], fault_at: Duration) {
    let failed = ps.iter().filter(|p| p.status != 200).count();
    let moved = moved_after(ps, fault_at).map_or(0, |d| d.as_millis());
    println!(
        "{name}: {} purchases, {failed} failed, all on the secondary {moved} ms after the fault",
        ps.len()
    );
}

async fn retries(proxy: &Proxy) -> (u64, u64) {
    let m = proxy.metrics_when("k2_requests_total").await;
    let sum = |prefix: &str| metric_sum(&m, prefix) as u64;
    (sum("k2_retries_total{"), sum("k2_requests_total{"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_costs_no_purchase_and_moves_within_a_health_interval() {
    let mut s = sites(Duration::ZERO, &policy(false, None)).await;
    let load = purchases(
        s.proxy.url("/checkout/pay"),
        100,
        Duration::from_secs(4),
        "a",
    );
    // Arrivals are 10 ms apart and served at once: killing half-way between
    // two arrivals normally finds nothing in flight.
    let killed_at = Duration::from_millis(1005);
    tokio::time::sleep(killed_at).await;
    // The kill as it really happened: on a loaded machine this task wakes
    // late, and a purchase due after `killed_at` may already be in flight.
    let kill_began = Instant::now();
    s.p1.stop().await;
    s.p2.stop().await;
    let kill_ended = Instant::now();
    let ps = load.await.unwrap();
    report("a. primary killed", &ps, killed_at);
    // A purchase whose bytes had reached the primary when it died cannot be
    // retried (it may have been processed). Only purchases sent before the
    // kill ended and unanswered when it began may fail (arrivals are 10 ms
    // apart: one, two if the machine stalled); any other failure
    // means a refused connection was not moved to another backend or site.
    let failed: Vec<_> = ps.iter().filter(|p| p.status != 200).collect();
    let in_flight = |p: &&Purchase| p.sent <= kill_ended && p.answered >= kill_began;
    assert!(
        failed.iter().all(in_flight) && failed.len() <= 2,
        "lost purchases (kill took {:?}): {failed:?}",
        kill_ended - kill_began
    );
    let moved = moved_after(&ps, killed_at).expect("traffic moved to the secondary");
    assert!(
        moved <= Duration::from_millis(200 + 50),
        "moved after {moved:?}"
    );
    let (retries, requests) = retries(&s.proxy).await;
    println!("a. retries {retries} of {requests} requests");
    assert_no_duplicates(&s);
    // The health gauges, set when /metrics is scraped.
    let m = s
        .proxy
        .metrics_when(r#"k2_site_up{cluster="main",site="primary"} 0"#)
        .await;
    for want in [
        r#"k2_site_up{cluster="main",site="secondary"} 1"#.to_string(),
        format!(
            r#"k2_backend_up{{backend="{}",cluster="main",site="primary"}} 0"#,
            s.p1.addr
        ),
        format!(
            r#"k2_backend_up{{backend="{}",cluster="main",site="secondary"}} 1"#,
            s.s1.addr
        ),
    ] {
        assert!(m.contains(&want), "{want} in {m}");
    }

    // d. The primary comes back: failback after `rise` good checks, once.
    s.p1.restart().await.unwrap();
    s.p2.restart().await.unwrap();
    let back = Instant::now();
    let load = purchases(
        s.proxy.url("/checkout/pay"),
        50,
        Duration::from_secs(3),
        "d",
    );
    let ps = load.await.unwrap();
    assert!(
        ps.iter().all(|p| p.status == 200),
        "no purchase lost on failback"
    );
    let first_primary = ps
        .iter()
        .position(|p| matches!(p.sim.as_deref(), Some("p1" | "p2")))
        .expect("failback");
    let after: Vec<_> = ps[first_primary..]
        .iter()
        .map(|p| p.sim.clone().unwrap())
        .collect();
    assert!(
        after.iter().all(|s| s != "s1"),
        "no flapping back to the secondary: {after:?}"
    );
    println!(
        "d. failback: first purchase on the primary {} ms after it came back",
        ps[first_primary].due.as_millis()
    );
    assert!(
        back.elapsed() > Duration::from_millis(400),
        "rise = 2 checks at 200 ms"
    );
    let m = s
        .proxy
        .metrics_when(r#"k2_failovers_total{cluster="main",from="secondary",to="primary"} 1"#)
        .await;
    assert!(
        m.contains(r#"k2_failovers_total{cluster="main",from="primary",to="secondary"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"k2_failovers_total{cluster="main",from="secondary",to="primary"} 1"#),
        "{m}"
    );
    assert_no_duplicates(&s);
}

/// A whole site dying must not run into the retry budget: every request
/// needs a retry or two (refused connects) until health checks catch up,
/// far above any budget share. Slow checks and no ejection here, so only
/// the refused-connect retries can save the purchases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2_refused_connects_are_retried_beyond_the_retry_budget() {
    let (mut p1, mut p2, s1) = (
        start_sim("p1", Duration::ZERO).await,
        start_sim("p2", Duration::ZERO).await,
        start_sim("s1", Duration::ZERO).await,
    );
    let routes = routes(&p1, &p2, &s1)
        .replace(r#"interval = "200ms""#, r#"interval = "30s""#)
        .replace(
            "outlier = { consecutive_failures = 3, base_ejection = \"2s\", max_ejected_share = 1.0 }",
            "outlier = { consecutive_failures = 1000 }",
        );
    assert!(routes.contains("consecutive_failures = 1000"));
    let policy = format!("{}\n[retries]\nbudget = 0.01\n", policy(false, None));
    let proxy = Proxy::start(&routes, &policy).await;
    let client = client();
    // Both primaries up (first checks) before the kill.
    for i in 0..20 {
        let r = client
            .post(proxy.url("/checkout/pay"))
            .header("x-request-id", format!("warm-{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    p1.stop().await;
    p2.stop().await;
    let load = purchases(
        proxy.url("/checkout/pay"),
        100,
        Duration::from_secs(2),
        "a2",
    );
    let ps = load.await.unwrap();
    let failed: Vec<_> = ps.iter().filter(|p| p.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} purchases lost: {:?}",
        failed.len(),
        ps.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ps.iter().all(|p| p.sim.as_deref() == Some("s1")));
    let (retries, requests) = retries(&proxy).await;
    println!("a2. retries {retries} of {requests} requests, budget 1%");
    // Each purchase tried both primaries, then moved to the secondary once.
    let m = proxy.metrics().await;
    let moved = metric_sum(
        &m,
        r#"k2_cross_site_retries_total{cluster="main",from="primary",to="secondary"}"#,
    );
    assert_eq!(
        moved as usize,
        ps.len(),
        "one cross-site retry per purchase"
    );
    let line = proxy.log_line("tries=3").await;
    assert!(line.contains(r#"site="secondary""#), "{line}");
    assert!(
        retries >= 200,
        "two refused connects per purchase: {retries}"
    );
    let sites = Sites { p1, p2, s1, proxy };
    assert_no_duplicates(&sites);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_blackholed_primary_loses_only_what_was_in_flight_until_the_checks_fall() {
    let s = sites(Duration::ZERO, &policy(false, None)).await;
    let load = purchases(
        s.proxy.url("/checkout/pay"),
        100,
        Duration::from_secs(4),
        "b",
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Duration::from_secs(1);
    s.p1.sim.set_fault(Fault::Hang);
    s.p2.sim.set_fault(Fault::Hang);
    let ps = load.await.unwrap();
    report("b. primary blackholed", &ps, fault_at);
    let failed: Vec<_> = ps.iter().filter(|p| p.status != 200).collect();
    // In flight at the hung backend: 504 at the route timeout. Arriving while
    // those fill the primary's admission limit, before the checks fall: 503
    // queue_timeout, fast. Nothing waits longer, nothing else fails.
    let timeouts = failed.iter().filter(|p| p.status == 504).count();
    let shed = failed.iter().filter(|p| p.status == 503).count();
    println!(
        "b. failed: {timeouts} timed out at the backend (504), {shed} shed while queued (503)"
    );
    assert_eq!(
        timeouts + shed,
        failed.len(),
        "only 504s and 503s: {failed:?}"
    );
    // fall = 2 checks, 200 ms apart, 100 ms timeout: under ~500 ms of purchases.
    assert!(failed.len() <= 60, "{} failed", failed.len());
    let moved = moved_after(&ps, fault_at).expect("traffic moved");
    assert!(moved <= Duration::from_millis(700), "moved after {moved:?}");
    s.p1.sim.set_fault(Fault::None);
    s.p2.sim.set_fault(Fault::None);
    assert_no_duplicates(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_primary_answering_500s_is_ejected_passively() {
    let s = sites(Duration::ZERO, &policy(false, None)).await;
    let load = purchases(
        s.proxy.url("/checkout/pay"),
        100,
        Duration::from_secs(3),
        "c",
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = Duration::from_secs(1);
    // /health stays good: only the requests' 500s can tell.
    let errors = Fault::Errors {
        rate: 1.0,
        health: false,
    };
    s.p1.sim.set_fault(errors);
    s.p2.sim.set_fault(errors);
    let ps = load.await.unwrap();
    report("c. primary 500s", &ps, fault_at);
    let five_hundreds = ps.iter().filter(|p| p.status == 500).count();
    assert!(
        five_hundreds <= 2 * 3 + 2,
        "3 failures in a row eject each backend: {five_hundreds} 500s"
    );
    assert!(
        moved_after(&ps, fault_at).is_some(),
        "traffic moved to the secondary"
    );
    let st = s.proxy.status().await;
    let health: Vec<_> = st["clusters"][0]["sites"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["health"].clone())
        .collect();
    assert_eq!(health, ["ejected", "ejected"]);
    assert_no_duplicates(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_spill_uses_the_idle_secondary_when_the_primary_is_saturated() {
    // Each site admits 2 at a time; the backend takes 50 ms: 40 purchases/s
    // per site. Offer 60/s for 3 s: more than one site, 75% of two (at 70/s,
    // 88% of two, a busy CI machine once served 0.90 with spill).
    let mut success = Vec::new();
    for spill in [false, true] {
        let s = sites(Duration::from_millis(50), &policy(spill, Some(2))).await;
        let ps = purchases(
            s.proxy.url("/checkout/pay"),
            60,
            Duration::from_secs(3),
            if spill { "f-on" } else { "f-off" },
        )
        .await
        .unwrap();
        let ok = ps.iter().filter(|p| p.status == 200).count() as f64 / ps.len() as f64;
        let on_secondary = ps.iter().filter(|p| p.sim.as_deref() == Some("s1")).count();
        println!(
            "f. spill {spill}: purchase success {:.1}%, {on_secondary} served by the secondary",
            ok * 100.0
        );
        success.push(ok);
        // Every request served by the secondary got there by spilling, and
        // is counted so (the series exists at 0 either way).
        let m = s.proxy.metrics_when("k2_spills_total").await;
        let spills = metric_sum(
            &m,
            r#"k2_spills_total{cluster="main",from="primary",to="secondary"}"#,
        );
        println!("f. spill {spill}: k2_spills_total {spills}");
        if spill {
            assert!(
                spills >= on_secondary as f64 && on_secondary > 0,
                "{spills} spills counted, {on_secondary} served by the secondary"
            );
        } else {
            assert_eq!(spills, 0.0, "no spill without `spill = true`");
        }
        assert_no_duplicates(&s);
    }
    assert!(
        success[1] > success[0] + 0.2,
        "spill on {:.2} vs off {:.2}",
        success[1],
        success[0]
    );
    assert!(
        success[1] >= 0.95,
        "with spill the two sites carry the load: {:.2}",
        success[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_drained_on_reload_gets_no_new_requests_and_in_flight_ones_finish() {
    let s = sites(Duration::from_millis(300), &policy(false, None)).await;
    // A slow purchase in flight at p1 or p2 while we drain p1.
    let in_flight = purchases(
        s.proxy.url("/checkout/pay"),
        10,
        Duration::from_millis(200),
        "drain-a",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let routes = std::fs::read_to_string(s.proxy.dir().join("routes.toml")).unwrap();
    let drained = routes.replace(
        &format!("backends = [\"{}\", \"{}\"]", s.p1.addr, s.p2.addr),
        &format!(
            "backends = [{{ addr = \"{}\", enabled = false }}, \"{}\"]",
            s.p1.addr, s.p2.addr
        ),
    );
    assert_ne!(drained, routes);
    s.proxy.write_file("routes.toml", &drained);
    let st = s.proxy.wait_reload(Duration::from_secs(1)).await;
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    assert_eq!(
        st["clusters"][0]["sites"][0]["backends"][0]["health"],
        "drained"
    );
    assert!(
        in_flight.await.unwrap().iter().all(|p| p.status == 200),
        "in-flight purchases finish"
    );
    let before = s.p1.sim.total();
    let ps = purchases(
        s.proxy.url("/checkout/pay"),
        20,
        Duration::from_secs(1),
        "drain-b",
    )
    .await
    .unwrap();
    assert!(
        ps.iter()
            .all(|p| p.status == 200 && p.sim.as_deref() == Some("p2")),
        "{ps:?}"
    );
    assert_eq!(
        s.p1.sim.total(),
        before,
        "no new request reached the drained backend"
    );
    assert_no_duplicates(&s);
}
