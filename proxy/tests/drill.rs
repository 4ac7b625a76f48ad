//! A whole load-test drill at small scale, the way an SRE runs one: a
//! scenario file brings up legacy-sims and the real k2proxy, plays 10 s of
//! open-loop mixed load ramping to 3x the primary site's capacity with a
//! fault event (on the idle secondary, so it marks the report without
//! changing the outcome),
//! and writes its reports. The JSON report's fields and the scenario's
//! thresholds are checked.

mod support;

use std::time::Duration;

use loadtest::drill::{self, Options};
use loadtest::scenario::Scenario;
use support::k2proxy_bin;

const ROUTES: &str = r#"
[server]
listen = ["127.0.0.1:1"]
admin = "127.0.0.1:2"
threads = 2
policy = "policy.toml"

[clusters.main]
connect_timeout = "200ms"
health = { path = "/health", interval = "200ms", timeout = "100ms", rise = 1, fall = 2 }

[[clusters.main.sites]]
name = "primary"
role = "primary"
backends = ["127.0.0.1:1"]

[[clusters.main.sites]]
name = "secondary"
role = "secondary"
backends = ["127.0.0.1:1"]

[[routes]]
name = "checkout"
match = { path_prefix = "/checkout/" }
tier = "purchase"
cluster = "main"

[[routes]]
name = "merchant"
match = { path_prefix = "/api/" }
tier = "merchant"
cluster = "main"

[[routes]]
name = "cs"
match = { path_prefix = "/cs/" }
tier = "customer_service"
cluster = "main"
"#;

const POLICY: &str = r#"
tiers = ["purchase", "merchant", "customer_service"]

[tier.purchase]
max_queue_wait = "2s"

[tier.merchant]
max_queue_wait = "300ms"

[tier.customer_service]
max_queue_wait = "100ms"
max_share = 0.3

[shedding]
target_queue_delay = "20ms"
never_shed = ["purchase"]
"#;

const SCENARIO: &str = r#"
name = "drill-3x"
seed = 5
timeout = "3s"
thresholds = [
  "purchase.success >= 0.99",
  "purchase.p99 <= 1s",
  "customer_service.shed >= 0.2",
  "all.timeout <= 0.01",
]

[load]
stages = [
  { duration = "3s", from = "1x", to = "3x" },
  { duration = "7s", rate = "3x" },
]

[mix]
purchase = 20
merchant = 40
customer_service = 40

[tiers.purchase]
path = "/checkout/pay/{seq}"
body = '{"amount": 100}'
idempotency_key = true

[tiers.merchant]
path = "/api/orders/{rand:100}"

[tiers.customer_service]
path = "/cs/tickets/{rand:100}"

[topology]
routes = "routes.toml"

[topology.sites.primary]
workers = 4
service = "lognormal(25ms, 0.3)"
collapse = 0.5

[topology.sites.secondary]
workers = 4
service = "25ms"

[[events]]
at = "6s"
site = "secondary"
fault = "slow"
factor = 1.5
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_at_3x_capacity_runs_through_k2proxy_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
    std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
    let path = dir.path().join("drill.toml");
    std::fs::write(&path, SCENARIO).unwrap();
    let scenario = Scenario::load(&path).unwrap();
    let out = dir.path().join("out");
    let opts = Options {
        target: None,
        out: out.clone(),
        k2proxy: k2proxy_bin(),
        quiet: true,
    };
    let outcome = drill::run(&scenario, &opts, None, "test").await.unwrap();
    println!("{}", outcome.report.summary());
    for v in &outcome.verdicts {
        println!("{v}");
    }

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    // 4 workers at a mean of ~26 ms: ~150 req/s; a 3 s ramp from 1x to 3x
    // (6x capacity-seconds) and 7 s at 3x (21).
    let capacity = json["scenario"]["capacity_rps"].as_f64().unwrap();
    assert!((140.0..160.0).contains(&capacity), "{capacity}");
    let sent = json["sent"].as_u64().unwrap();
    let expected = (capacity * 27.0) as u64;
    assert!(
        sent.abs_diff(expected) <= 2,
        "sent {sent}, expected {expected}"
    );
    let tiers: Vec<&str> = json["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["customer_service", "merchant", "purchase"]);
    for t in json["targets"].as_array().unwrap() {
        let o = &t["outcomes"];
        let total: u64 = ["ok", "shed", "rate_limited", "error", "timeout"]
            .iter()
            .map(|k| o[k].as_u64().unwrap())
            .sum();
        assert_eq!(total, t["sent"].as_u64().unwrap(), "{t}");
        assert!(t["ok_ms"]["p99"].as_f64().is_some());
        assert!(t["ok_from_send_ms"]["p99"].as_f64().is_some());
    }
    assert!(json["generator"]["send_lag_p99_ms"].as_f64().is_some());
    assert!(json["timeline"].as_array().unwrap().len() >= 10);
    let events = json["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["what"], "secondary: slow x1.5");
    let at = events[0]["at_s"].as_f64().unwrap();
    assert!((5.9..6.5).contains(&at), "{at}");
    assert_eq!(json["backend"]["duplicate_non_idempotent"], 0);
    // Lower tiers were shed fast, and purchases kept flowing.
    assert_eq!(json["passed"], true, "{}", json["thresholds"]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3);
    assert!(html.contains("secondary: slow x1.5"));
    assert!(out.join("k2proxy.log").exists());
    // The one load generator stands for many shoppers: its connections are
    // not held to the per-address cap.
    let routes = std::fs::read_to_string(out.join("routes.toml")).unwrap();
    assert!(
        routes.contains("max_connections_per_client = 1000000"),
        "{routes}"
    );
    // The topology is gone: k2proxy's listener no longer accepts.
    let target = json["scenario"]["target"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(target).await.is_err(),
        "k2proxy still running"
    );
}
