//! Whole load-test drills at small scale, the way an SRE runs them: a
//! scenario file brings up legacy-sims and the real k2proxy, plays open-loop
//! load with its events, checks its thresholds and writes its reports.
//!
//! - 10 s of mixed load ramping to 3x the primary's capacity, a fault on
//!   the idle secondary marking the report: the report's fields.
//! - the failover drill, short: the serving site killed, blackholed and
//!   answering 500s; duplicates, lost purchases and time to failover.
//! - the reload storm, short: valid and broken edits by file, SIGHUP and
//!   POST /reload, every one checked, and one mislabelled edit that must
//!   fail the drill.
//! - the soak, two minutes: k2proxy sampled, trends fitted.
//! - a fleet: two k2proxy instances behind the harness's L4 balancer at 3x,
//!   a reload by each of file, SIGHUP and POST reaching both.

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

/// Runs `scenario` (with [`ROUTES`] and `policy`) in a fresh folder:
/// the folder, its output folder, and the outcome.
async fn run_in_temp(
    scenario: &str,
    policy: &str,
) -> (tempfile::TempDir, std::path::PathBuf, drill::Outcome) {
    run_with_routes(scenario, policy, ROUTES).await
}

/// [`run_in_temp`] with `routes` for routes.toml.
async fn run_with_routes(
    scenario: &str,
    policy: &str,
    routes: &str,
) -> (tempfile::TempDir, std::path::PathBuf, drill::Outcome) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), routes).unwrap();
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    let path = dir.path().join("drill.toml");
    std::fs::write(&path, scenario).unwrap();
    let scenario = Scenario::load(&path).unwrap();
    let out = dir.path().join("out");
    let opts = Options {
        target: None,
        out: out.clone(),
        k2proxy: k2proxy_bin(),
        quiet: true,
    };
    let outcome = drill::run(&scenario, &opts, None, "test").await.unwrap();
    (dir, out, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_at_3x_capacity_runs_through_k2proxy_and_reports() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (_dir, out, outcome) = run_in_temp(SCENARIO, POLICY).await;
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
    // Goodput, latency, shed share, and k2proxy's own admission state and
    // what its limit learned of the backend's latency.
    assert_eq!(html.matches("<svg").count(), 5);
    assert!(html.contains("k2proxy 0 baseline"));
    assert!(html.contains("secondary: slow x1.5"));
    assert!(html.contains("k2proxy 0 limit"));
    // That state, sampled every second from the instance's /status: the
    // limit and the backend in use throughout, lower tiers shed at 3x.
    let states = &json["k2proxy"];
    assert_eq!(states["instances"], 1, "{states}");
    let rows = states["per_second"].as_array().unwrap();
    assert!(rows.len() >= 8, "{states}");
    let site = |r: &serde_json::Value| r[0].clone();
    assert!(rows.iter().all(|r| site(r)["limit"].as_u64() >= Some(1)));
    assert!(rows.iter().any(|r| site(r)["inflight"].as_u64() > Some(0)));
    assert!(
        rows.iter()
            .any(|r| site(r)["shed_level"].as_f64() > Some(0.0)),
        "{states}"
    );
    // The baseline learnt in front of a median of 25 ms (log-normal, the
    // primary site), as `/status` shows it.
    let baselines: Vec<f64> = rows
        .iter()
        .filter_map(|r| site(r)["baseline_ms"].as_f64())
        .collect();
    assert!(baselines.len() >= rows.len() / 2, "{states}");
    assert!(
        baselines.iter().all(|b| (15.0..60.0).contains(b)),
        "{baselines:?}"
    );
    assert!(json["fleet"].is_null(), "one instance is no fleet");
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

/// A second valid policy for reload edits: the same tiers, other settings.
const POLICY_B: &str = r#"
tiers = ["purchase", "merchant", "customer_service"]

[tier.purchase]
max_queue_wait = "3s"

[tier.merchant]
max_queue_wait = "200ms"

[tier.customer_service]
max_queue_wait = "100ms"
max_share = 0.2

[shedding]
target_queue_delay = "30ms"
never_shed = ["purchase"]
"#;

/// One drill at a time: each brings up k2proxy, simulators and a load
/// generator, and on two cores two of them starve each other (a soak run
/// beside the others lost 3% of its purchases to it).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// [`POLICY`] as docs/admission.md ("What to set in a fleet") has a fleet
/// set it: `min` at most `workers / N`, 2 for two instances in front of 4
/// workers. With the default `min = 4` the two hold 8 in flight on 4
/// workers that collapse under a queue, a knife's edge: purchases alone
/// are about 0.9 of what the collapsed backend serves, and in 3 runs of 24
/// (real processes, this drill) the backend stayed collapsed, the
/// baselines learnt its 70-160 ms, and 9-11% of purchases were lost (two
/// runs) or their p99 went over 2 s (one). With
/// `min = 2`, 46 runs: every purchase served, p99 median 266 ms, worst
/// 1 800.
fn fleet_policy() -> String {
    format!("{POLICY}\n[admission.main]\nmode = \"adaptive\"\nmin = 2\n")
}

/// The drill above on two instances, each with its own controller, behind
/// the harness's balancer, with a reload by each of file, SIGHUP and POST.
fn fleet_scenario() -> String {
    let s = SCENARIO
        .replace("name = \"drill-3x\"", "name = \"fleet-3x\"")
        // Purchase p99 within 2 s, not 1: even with `min = 2` a run in
        // about fifteen climbs to 1-2 s (both builds of 2026-12-06; 46
        // runs, worst 1 800 ms).
        .replace("\"purchase.p99 <= 1s\"", "\"purchase.p99 <= 2s\"")
        .replace(
            "  \"all.timeout <= 0.01\",\n]",
            "  \"all.timeout <= 0.01\",\n  \"reloads_failed <= 0\",\n]",
        )
        .replace(
            "routes = \"routes.toml\"\n",
            "routes = \"routes.toml\"\nproxies = 2\n",
        );
    assert!(s.contains("proxies = 2") && s.contains("reloads_failed") && s.contains("p99 <= 2s"));
    s + r#"
[[events]]
at = "3s"
every = "1s"
until = "5.5s"
reload = ["policy.toml"]
via = ["file", "sighup", "post"]
"#
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_two_instances_shares_the_load_and_every_reload() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (_dir, out, outcome) = run_in_temp(&fleet_scenario(), &fleet_policy()).await;
    println!("{}\n{}", outcome.report.summary(), outcome.facts);
    let json = &outcome.json;
    assert_eq!(json["passed"], true, "{}", json["thresholds"]);
    // Every reload reached both instances (each waits for both).
    let edits = &json["reload_edits"];
    assert_eq!(edits["valid"], 3, "{edits}");
    assert_eq!(edits["applied"], 3, "{edits}");
    // Both instances served about half: the balancer spreads connections,
    // and the load comes from many clients, as shoppers do (one client's
    // keep-alive pool gathered its traffic on one instance: 75/25, or
    // everything on one for seconds). Lines count sheds too, and a shed
    // answers at once, so the instance that sheds more sees its clients
    // come back sooner: an even spread of connections has given 0.447 (one
    // fresh-clone run in about ten); the bound catches 75/25, not that.
    let served: Vec<usize> = ["k2proxy.log", "k2proxy-1.log"]
        .iter()
        .map(|log| {
            let text = std::fs::read_to_string(out.join(log)).unwrap();
            assert!(text.contains("/checkout/pay/"), "{log} served no purchase");
            text.lines()
                .filter(|l| l.contains("k2proxy::access"))
                .count()
        })
        .collect();
    let share = served[0] as f64 / (served[0] + served[1]) as f64;
    println!("requests served per instance: {served:?}");
    assert!(
        (0.40..=0.60).contains(&share),
        "the first instance served {share:.2} of {served:?}"
    );
    assert!(out.join("routes-1.toml").exists());
    // Each instance's limit was sampled every second.
    let fleet = &json["fleet"];
    assert_eq!(fleet["proxies"], 2, "{fleet}");
    let rows = fleet["limits_per_second"].as_array().unwrap();
    assert!(rows.len() >= 6, "{fleet}");
    assert!(rows
        .iter()
        .all(|r| r.as_array().unwrap().iter().all(|l| l.as_u64().is_some())));
    assert!(
        outcome.facts.contains("per-instance admission limit"),
        "{}",
        outcome.facts
    );
}

/// Two instances at 2x on a backend that does not collapse, the second
/// restarted as a deploy does (SIGTERM, a drain of 1 s) at 3 s.
fn restart_scenario() -> String {
    let s = SCENARIO
        .replace("name = \"drill-3x\"", "name = \"restart\"")
        .replace(
            "  { duration = \"3s\", from = \"1x\", to = \"3x\" },\n  { duration = \"7s\", rate = \"3x\" },",
            "  { duration = \"1s\", from = \"1x\", to = \"2x\" },\n  { duration = \"11s\", rate = \"2x\" },",
        )
        .replace("collapse = 0.5\n", "")
        .replace(
            "routes = \"routes.toml\"\n",
            "routes = \"routes.toml\"\nproxies = 2\n",
        )
        .replace(
            "site = \"secondary\"\nfault = \"slow\"\nfactor = 1.5\n",
            "restart = 1\n",
        )
        .replace("at = \"6s\"", "at = \"3s\"");
    assert!(s.contains("proxies = 2") && s.contains("restart = 1") && s.contains("rate = \"2x\""));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_restarted_mid_peak_drains_comes_back_cold_and_loses_no_purchase() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // Connections end at a second old, so clients come back to it.
    let routes = ROUTES.replace(
        "threads = 2\n",
        "threads = 2\ndrain_delay = \"1s\"\nkeepalive_time = \"1s\"\n",
    );
    let (_dir, out, outcome) = run_with_routes(&restart_scenario(), &fleet_policy(), &routes).await;
    println!("{}\n{}", outcome.report.summary(), outcome.facts);
    let json = &outcome.json;
    let events = json["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let what = events[0]["what"].as_str().unwrap();
    assert!(
        what.starts_with("restart instance 1: stopped in") && !what.contains("FAILED"),
        "{what}"
    );
    // The drain: the balancer's checks saw `/healthz` turn 503 and sent
    // the instance no new connection; its kept-alive clients were closed
    // after their answers and came back through the balancer. Not one
    // purchase failed or was sent twice.
    assert_eq!(json["passed"], true, "{}", json["thresholds"]);
    assert_eq!(json["backend"]["duplicate_non_idempotent"], 0);
    let purchase = json["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "purchase")
        .unwrap();
    let outcomes = &purchase["outcomes"];
    assert_eq!(outcomes["error"], 0, "{purchase}");
    assert_eq!(outcomes["timeout"], 0, "{purchase}");
    assert_eq!(outcomes["shed"], 0, "{purchase}");
    // Down, then back: the second instance's /status did not answer for
    // a second or more, and did again before the end.
    let rows = json["fleet"]["limits_per_second"].as_array().unwrap();
    let up: Vec<bool> = rows.iter().map(|r| r[1].as_u64().is_some()).collect();
    let first_down = up.iter().position(|u| !u).expect("never seen down");
    assert!(up[..first_down].iter().all(|u| *u), "{up:?}");
    assert!(up[first_down..].iter().any(|u| *u), "never back: {up:?}");
    // It served purchases before and after: its log has two starts, and
    // purchases after each (`keepalive_time` brought clients back).
    let log = std::fs::read_to_string(out.join("k2proxy-1.log")).unwrap();
    let runs: Vec<&str> = log.split(" are valid: ").skip(1).collect();
    assert_eq!(runs.len(), 2, "{log}");
    for (i, run) in runs.iter().enumerate() {
        let purchases = run.matches("/checkout/pay/").count();
        assert!(
            purchases > 20,
            "run {i} of instance 1 served {purchases} purchases"
        );
    }
}

/// Runs `scenario` (with ROUTES, POLICY and POLICY_B beside it, and the
/// broken policies `broken-*.toml`); returns its outcome and report.json.
async fn run_drill(
    scenario: &str,
    repeat_for: Option<Duration>,
) -> (drill::Outcome, serde_json::Value, tempfile::TempDir) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("routes.toml", ROUTES),
        ("policy.toml", POLICY),
        ("policy-b.toml", POLICY_B),
        ("broken-syntax.toml", "tiers = [\"purchase\"\n"),
        (
            "broken-tier.toml",
            "tiers = [\"purchase\", \"merchant\", \"customer_service\"]\n[shedding]\nnever_shed = [\"purchases\"]\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("drill.toml");
    std::fs::write(&path, scenario).unwrap();
    let mut scenario = Scenario::load(&path).unwrap();
    if let Some(total) = repeat_for {
        scenario = scenario.repeated(total);
    }
    let out = dir.path().join("out");
    let opts = Options {
        target: None,
        out: out.clone(),
        k2proxy: k2proxy_bin(),
        quiet: true,
    };
    let outcome = drill::run(&scenario, &opts, None, "test").await.unwrap();
    println!("{}{}", outcome.report.summary(), outcome.facts);
    for v in &outcome.verdicts {
        println!("{v}");
    }
    let json =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    (outcome, json, dir)
}

const MIX: &str = r#"
[mix]
purchase = 40
merchant = 30
customer_service = 30

[tiers.purchase]
path = "/checkout/pay/{seq}"
body = '{"amount": 100}'
idempotency_key = true

[tiers.merchant]
path = "/api/orders/{rand:100}"

[tiers.customer_service]
path = "/cs/tickets/{rand:100}"
"#;

const SITES: &str = r#"
[topology]
routes = "routes.toml"

[topology.sites.primary]
workers = 8
service = "lognormal(20ms, 0.3)"

[topology.sites.secondary]
workers = 8
service = "lognormal(20ms, 0.3)"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failover_drill_fails_the_serving_site_three_ways_and_counts_what_purchases_lost() {
    let scenario = format!(
        r#"
name = "failover-short"
seed = 7
timeout = "3s"
thresholds = [
  "duplicates <= 0",
  "time_to_failover <= 2s",
  "lost_purchases <= 150",
]

[load]
stages = [{{ duration = "14s", rate = "0.6x" }}]
{MIX}{SITES}
[[events]]
at = "2s"
site = "primary"
fault = "refuse"

[[events]]
at = "4s"
site = "primary"
fault = "normal"

[[events]]
at = "6s"
site = "primary"
fault = "blackhole"

[[events]]
at = "8s"
site = "primary"
fault = "normal"

[[events]]
at = "10s"
site = "primary"
fault = "errors"
rate = 1.0
health = true

[[events]]
at = "12s"
site = "primary"
fault = "normal"
"#
    );
    let (outcome, json, _dir) = run_drill(&scenario, None).await;
    let events = json["events"].as_array().unwrap();
    let faults: Vec<&str> = events
        .iter()
        .filter(|e| e["fault"] == true)
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    assert_eq!(
        faults,
        [
            "primary: refuse",
            "primary: blackhole",
            "primary: errors 100%"
        ]
    );
    let facts = &json["facts"];
    // Each fault really broke the serving site: purchases failed after
    // it (a drill whose faults miss the serving site measures nothing).
    let ttf = facts["time_to_failover_ms"].as_f64().unwrap();
    assert!(ttf > 0.0, "{facts}");
    assert_eq!(facts["duplicates"], 0, "{facts}");
    assert!(facts["lost_purchases"].as_u64().is_some(), "{facts}");
    assert!(
        outcome.facts.contains("time to failover"),
        "{}",
        outcome.facts
    );
    assert_eq!(json["passed"], true, "{}", json["thresholds"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_storm_checks_every_edit_and_fails_on_one_that_did_not_end_as_expected() {
    let scenario = format!(
        r#"
name = "storm-short"
seed = 8
timeout = "3s"
thresholds = [
  "purchase.success >= 0.99",
  "reloads_failed <= 0",
  "reloads_applied >= 10",
]

[load]
stages = [{{ duration = "8s", rate = "0.6x" }}]
{MIX}{SITES}
[[events]]
at = "1s"
every = "150ms"
until = "5800ms"
reload = ["policy-b.toml", "policy.toml"]
reject = ["broken-syntax.toml", "broken-tier.toml"]
via = ["file", "sighup", "post"]

# Mislabelled: a broken file listed as valid. k2proxy refuses it, as it
# must, so the drill counts one failed edit and fails.
[[events]]
at = "6500ms"
reload = ["broken-tier.toml"]
via = ["post"]
"#
    );
    let (outcome, json, _dir) = run_drill(&scenario, None).await;
    let edits = &json["reload_edits"];
    let n = |k: &str| edits[k].as_u64().unwrap();
    // 33 storm edits from 1 s to 5.8 s, every second one broken, plus one.
    assert_eq!(n("valid") + n("broken"), 34, "{edits}");
    assert_eq!(n("applied"), n("valid") - 1, "{edits}");
    assert_eq!(n("refused"), n("broken"), "{edits}");
    assert_eq!(n("failed"), 1, "{edits}");
    let failures = edits["failures"].as_array().unwrap();
    assert!(
        failures[0]
            .as_str()
            .unwrap()
            .contains("reload broken-tier.toml via post: FAILED"),
        "{failures:?}"
    );
    // Every way to ask met valid and broken edits.
    let whats: Vec<&str> = json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    for via in ["file", "sighup", "post"] {
        for kind in ["reload policy", "broken edit broken"] {
            assert!(
                whats
                    .iter()
                    .any(|w| w.starts_with(kind) && w.contains(&format!("via {via}"))),
                "{kind} via {via}: {whats:?}"
            );
        }
    }
    assert_eq!(json["passed"], false);
    let missed: Vec<String> = outcome
        .verdicts
        .iter()
        .filter(|v| !v.pass)
        .map(|v| v.threshold.text.clone())
        .collect();
    assert_eq!(missed, ["reloads_failed <= 0"]);
    // The running config kept serving: purchases went through.
    assert!(json["backend"]["config"]["generation"].as_u64().unwrap() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_soak_samples_k2proxy_and_fits_its_trends() {
    let scenario = format!(
        r#"
name = "soak-short"
seed = 9
timeout = "3s"
# Two minutes of a debug build cannot show a slow leak, but a gross one:
# a file descriptor or a thread kept per reload (60 of them, 30 in the
# fitted half, on about 57 fds) or per connection would fail these. Measured
# on this steady load: fds 51-60, rss and fds growth within 4%.
thresholds = [
  "purchase.success >= 0.97",
  "duplicates <= 0",
  "reloads_failed <= 0",
  "rss_growth <= 0.3",
  "fds_growth <= 0.3",
  "threads_growth <= 0.05",
]

[soak]
sample = "10s"

# Steady load: a burst's extra connections and allocator growth are not
# leaks, and with samples every 10 s of a 30 s cycle they made the fitted
# line rise whenever the last sample fell at a burst's end.
[load]
stages = [{{ duration = "30s", rate = "0.5x" }}]
{MIX}{SITES}
[[events]]
at = "1s"
every = "2s"
until = "29s"
reload = ["policy-b.toml", "policy.toml"]
via = ["file", "sighup", "post"]

[[events]]
at = "22s"
site = "primary"
fault = "refuse"

[[events]]
at = "26s"
site = "primary"
fault = "normal"
"#
    );
    let (outcome, json, _dir) = run_drill(&scenario, Some(Duration::from_secs(120))).await;
    let samples = json["soak"]["samples"].as_array().unwrap();
    for s in samples {
        eprintln!("sample {s}");
    }
    // One every 10 s over 2 minutes (the last may fall after the load ends).
    assert!((11..=12).contains(&samples.len()), "{}", samples.len());
    for s in samples {
        assert!(s["rss_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
        assert!(s["threads"].as_u64().unwrap() >= 2, "{s}");
        assert!(s["fds"].as_u64().unwrap() >= 4, "{s}");
        assert!(s["p99_ms"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The cycle repeated four times: four kills, 60 reloads.
    let events = json["events"].as_array().unwrap();
    assert_eq!(events.iter().filter(|e| e["fault"] == true).count(), 4);
    assert_eq!(
        json["reload_edits"]["valid"], 60,
        "{}",
        json["reload_edits"]
    );
    let growth = json["facts"]["growth"].as_object().unwrap();
    let mut names: Vec<&str> = growth.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["fds", "p99", "rss", "threads"]);
    assert!(
        outcome.facts.contains("soak: fitted growth"),
        "{}",
        outcome.facts
    );
    assert_eq!(json["passed"], true, "{}", json["thresholds"]);
}

#[test]
fn the_broken_policies_of_the_reload_storm_are_refused_by_k2proxy_check() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/scenarios/policies");
    let k2proxy = k2proxy_bin();
    let routes = std::fs::read_to_string(dir.join("../../../routes.toml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["broken-syntax", "broken-unknown-tier", "broken-range"] {
        let policy = dir.join(format!("{name}.toml"));
        let r = tmp.path().join("routes.toml");
        std::fs::write(
            &r,
            routes.replace(
                "policy = \"policies/default.toml\"",
                &format!("policy = {:?}", policy.display().to_string()),
            ),
        )
        .unwrap();
        let out = std::process::Command::new(&k2proxy)
            .args(["check", "--routes"])
            .arg(&r)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", k2proxy.display()));
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{name} was accepted: {said}");
        assert!(said.contains(&format!("{name}.toml:")), "{name}: {said}");
    }
}
