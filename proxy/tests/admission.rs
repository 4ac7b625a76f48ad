//! Admission through the real proxy: shed answers per the wire contract,
//! and permits that come back on every path.

mod support;

use std::time::{Duration, Instant};

use support::*;

const ROUTES: &str = r#"
[[routes]]
name = "checkout"
match = { path_prefix = "/checkout/" }
tier = "purchase"
cluster = "main"

[[routes]]
name = "admin"
match = { path_prefix = "/admin/" }
tier = "admin"
cluster = "main"

[[routes]]
name = "cs"
match = { path_prefix = "/cs/" }
tier = "customer_service"
cluster = "main"
timeout = "150ms"
"#;

fn policy(extra: &str) -> String {
    format!(
        r#"tiers = ["purchase", "merchant", "admin", "customer_service", "background"]

[tier.customer_service]
max_queue_wait = "100ms"

[tier.admin]
shed_status = 529

{extra}
"#
    )
}

const FIXED_ONE: &str = "[admission.main]\nmode = \"fixed\"\nlimit = 1\n";

async fn setup(policy_extra: &str) -> (Backend, Proxy) {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&routes_toml(&[backend.addr], ROUTES), &policy(policy_extra)).await;
    (backend, proxy)
}

#[tokio::test]
async fn forced_tier_is_shed_per_the_wire_contract_and_never_reaches_the_backend() {
    let (backend, proxy) =
        setup("[shedding]\nforce_shed = [\"customer_service\", \"admin\"]\nretry_after = \"7s\"\n")
            .await;
    let c = client();
    let start = Instant::now();
    let resp = c.get(proxy.url("/cs/ticket")).send().await.unwrap();
    let fast = start.elapsed();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(resp.headers()["x-k2-shed"], "forced");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "overloaded", "tier": "customer_service", "reason": "forced", "retry_after_s": 7})
    );
    assert!(
        fast < Duration::from_millis(500),
        "a shed is answered at once ({fast:?})"
    );

    // The per-tier status override.
    let resp = c.get(proxy.url("/admin/x")).send().await.unwrap();
    assert_eq!(resp.status(), 529);
    // Purchases pass.
    assert_eq!(
        c.get(proxy.url("/checkout/1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let seen: Vec<String> = backend.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(seen, ["/checkout/1"]);
    let metrics = proxy
        .metrics_when(r#"k2_shed_total{reason="forced",tier="admin"} 1"#)
        .await;
    assert!(
        metrics.contains(r#"k2_shed_total{reason="forced",tier="customer_service"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"k2_requests_total{code_class="5xx",outcome="shed",route="cs",tier="customer_service"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_waiter_past_its_tiers_deadline_is_shed_with_queue_timeout() {
    let (backend, proxy) = setup(FIXED_ONE).await;
    let c = client();
    // A slow purchase holds the only permit for 2 s (600 ms was over
    // before a scrape of a busy fresh-clone run saw it in flight).
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/checkout/slow/2000"));
        async move { c.get(url).send().await.unwrap().status() }
    });
    wait_for_inflight(&proxy, 1).await;
    let start = Instant::now();
    let resp = c.get(proxy.url("/cs/x")).send().await.unwrap();
    let waited = start.elapsed();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-k2-shed"], "queue_timeout");
    assert!(
        waited >= Duration::from_millis(95) && waited < Duration::from_millis(450),
        "{waited:?}"
    );
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(
        backend.seen().len(),
        1,
        "the shed request never reached the backend"
    );
}

#[tokio::test]
async fn permits_come_back_after_upstream_errors() {
    let dead = refused_addr();
    let proxy = Proxy::start(&routes_toml(&[dead], ROUTES), &policy(FIXED_ONE)).await;
    let c = client();
    for _ in 0..3 {
        // With a leaked permit the second request would wait and be shed.
        let resp = c.get(proxy.url("/cs/x")).send().await.unwrap();
        assert_eq!(resp.status(), 502);
    }
    wait_for_inflight(&proxy, 0).await;
}

#[tokio::test]
async fn permits_come_back_after_upstream_timeouts() {
    let (_backend, proxy) = setup(FIXED_ONE).await;
    let c = client();
    for _ in 0..2 {
        let resp = c.get(proxy.url("/cs/slow/400")).send().await.unwrap();
        assert_eq!(resp.status(), 504, "the cs route's timeout is 150 ms");
    }
    wait_for_inflight(&proxy, 0).await;
    assert_eq!(
        c.get(proxy.url("/checkout/1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn permits_come_back_when_the_client_disconnects() {
    let (_backend, proxy) = setup(FIXED_ONE).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    // The backend answers ten times later than the client waits: a test
    // task stalled past the answer (seen once in a full `make test`, with
    // 300 ms) must not find it already there.
    match impatient.get(proxy.url("/checkout/slow/1000")).send().await {
        Err(e) => assert!(e.is_timeout(), "{e}"),
        Ok(r) => panic!("the client was to give up, got {}", r.status()),
    }
    // Queued and gone, too.
    let _ = impatient.get(proxy.url("/checkout/slow/1000")).send().await;
    wait_for_inflight(&proxy, 0).await;
    let resp = client().get(proxy.url("/checkout/1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn admission_gauges_are_exported() {
    let (_backend, proxy) = setup(FIXED_ONE).await;
    client().get(proxy.url("/checkout/1")).send().await.unwrap();
    // The permit is dropped just after the response: wait for it.
    let m = proxy
        .metrics_when(r#"k2_inflight{cluster="main",site="primary-site",tier="purchase"} 0"#)
        .await;
    for want in [
        r#"k2_admission_limit{cluster="main",site="primary-site"} 1"#,
        r#"k2_shed_level{cluster="main",site="primary-site"} 0"#,
        r#"k2_queue_depth{cluster="main",site="primary-site"} 0"#,
        r#"k2_inflight{cluster="main",site="primary-site",tier="purchase"} 0"#,
        r#"k2_queue_wait_seconds_count{tier="purchase"} 1"#,
    ] {
        assert!(m.contains(want), "missing {want}:\n{m}");
    }
}

#[tokio::test]
async fn admission_off_is_plain_proxying() {
    // With a fixed limit of 1 the second concurrent cs request would wait
    // and be shed; with admission off both reach the backend.
    let (backend, proxy) = setup("[admission.main]\nmode = \"off\"\n").await;
    let c = client();
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/cs/slow/120"));
        async move { c.get(url).send().await.unwrap().status() }
    });
    let second = c
        .get(proxy.url("/cs/slow/120"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!((slow.await.unwrap().as_u16(), second.as_u16()), (200, 200));
    assert_eq!(backend.seen().len(), 2);
}

/// Waits until the site's total in-flight gauge is `n` (up to 5 s).
async fn wait_for_inflight(proxy: &Proxy, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = proxy.metrics().await;
        let total = metric_sum(&text, "k2_inflight{") as i64;
        if total == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in flight stayed {total}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request that fails at the primary site and is retried at the
/// secondary holds the secondary's permit while it is served there (and
/// gives the primary's back), so each site's limit counts what its backends
/// carry.
#[tokio::test]
async fn a_retry_onto_another_site_holds_that_sites_permit() {
    let secondary = Backend::start("s1").await;
    let primary = health_checks_only(Otherwise::Drop).await;
    let secondary_site = format!(
        "[[clusters.main.sites]]\nname = \"secondary-site\"\nrole = \"secondary\"\nbackends = [\"{}\"]\n{ROUTES}",
        secondary.addr
    );
    // Checks rare enough that the primary is still up when the request comes.
    let routes = routes_toml(&[primary], &secondary_site).replacen(
        "connect_timeout = \"300ms\"",
        "connect_timeout = \"300ms\"\nhealth = { interval = \"1m\", fall = 5 }",
        1,
    );
    let proxy = Proxy::start(
        &routes,
        &policy("[admission.main]\nmode = \"fixed\"\nlimit = 4\n"),
    )
    .await;
    // Both sites checked up first: with the primary still unknown, the
    // request would go straight to the secondary (not a retry), as it did
    // once in a fresh-clone run.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = proxy.status().await;
        let up = |i: usize| st["clusters"][0]["sites"][i]["backends"][0]["health"] == "up";
        if up(0) && up(1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not both up: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slow = tokio::spawn({
        let url = proxy.url("/checkout/slow/1500");
        async move { client().get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let st = proxy.status().await;
    let sites = &st["clusters"][0]["sites"];
    let inflight = |i: usize| sites[i]["inflight"].as_u64().unwrap_or(99);
    assert_eq!(
        (inflight(0), inflight(1)),
        (0, 1),
        "permits while served at the secondary: {sites}"
    );
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    let m = proxy.metrics().await;
    assert!(
        m.contains(
            r#"k2_cross_site_retries_total{cluster="main",from="primary-site",to="secondary-site"} 1"#
        ),
        "the request did not move site: {}",
        m.lines()
            .filter(|l| l.contains("cross_site"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A backend whose admin requests are far costlier than purchases: the
/// limit leaves the admin latency out of what it learns (admission::cost),
/// and `/status` says so, with the ratio it measured.
#[tokio::test]
async fn status_shows_a_costly_tier_left_out_of_the_limit() {
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(&kred_routes(backend.addr), &default_policy()).await;
    let c = client();
    for i in 0..24 {
        let purchase = c.get(proxy.url(&format!("/checkout/{i}"))).send();
        assert_eq!(purchase.await.unwrap().status(), 200);
        let admin = c.get(proxy.url(&format!("/admin/{i}/slow/30"))).send();
        assert_eq!(admin.await.unwrap().status(), 200);
    }
    let status = proxy.status().await;
    let site = &status["clusters"][0]["sites"][0];
    let costs = site["tier_costs"]
        .as_array()
        .unwrap_or_else(|| panic!("no tier_costs: {site}"));
    // Purchases are the scale, so only admin is listed.
    assert_eq!(costs.len(), 1, "{site}");
    assert_eq!(costs[0]["tier"], "admin", "{site}");
    assert_eq!(costs[0]["counted"], false, "{site}");
    assert!(costs[0]["ratio"].as_f64() > Some(5.0), "{site}");
    // The same ratio on /metrics, for an alert on a tier left out for long.
    let m = proxy.metrics().await;
    let admin = m
        .lines()
        .find(|l| l.starts_with("k2_admission_tier_cost_ratio{") && l.contains(r#"tier="admin""#))
        .unwrap_or_else(|| panic!("no admin cost ratio: {m}"));
    let ratio: f64 = admin.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(ratio > 5.0, "{admin}");
}
