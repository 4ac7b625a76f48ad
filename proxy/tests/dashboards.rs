//! The dashboard and the alerts against a real Prometheus: k2proxy with two
//! simulated sites is driven through overload, a failover, a rejected
//! reload and a whole-cluster outage while Prometheus scrapes its admin
//! /metrics (with two more, adaptive instances whose backends differ in
//! speed, one with costly admin requests, and a dead target) and evaluates dashboards/alerts.yml.
//! Then every PromQL expression in the dashboard JSON and in alerts.yml is
//! evaluated through Prometheus's HTTP API: each must be valid and return a
//! series. The dashboard's structure is checked too.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loadtest::openloop::{self, Plan, Target};
use loadtest::sim::{self, SimConfig};
use support::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo().join("dashboards/k2proxy.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard: panel targets and annotations.
fn dashboard_exprs(d: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        out.push(a["expr"].as_str().unwrap().to_string());
    }
    out
}

/// Every `expr:` of alerts.yml (single-line or `|` blocks).
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(rest) = l.trim_start().strip_prefix("expr:") {
            let indent = l.len() - l.trim_start().len();
            if rest.trim() == "|" {
                let mut block = Vec::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty()
                        || lines[i].len() - lines[i].trim_start().len() > indent)
                {
                    block.push(lines[i].trim());
                    i += 1;
                }
                out.push(block.join(" "));
                continue;
            }
            out.push(rest.trim().to_string());
        }
        i += 1;
    }
    out
}

/// Grafana variables → values Prometheus understands.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$instance", ".*")
        .replace("$cluster", ".*")
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 30),
        "explicit schemaVersion"
    );
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "cluster"]);
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} has the datasource variable",
            p["title"]
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has a target", p["title"]);
        for t in targets {
            assert!(!t["expr"].as_str().unwrap().is_empty());
        }
    }
    let first = &d["panels"][1];
    assert_eq!(
        first["title"], "Purchase success ratio (5m)",
        "purchase health comes first"
    );
}

/// A `[[server.tls]]` entry on a fresh port, with a certificate (written to
/// `dir`) that expires in `days`.
fn https_listener(dir: &Path, days: i64) -> String {
    let ca = proxy::tls::dev::DevCa::new("test CA").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let leaf = ca
        .issue_at(&["localhost"], now - 3600, now + days * 86400, 0x1900)
        .unwrap();
    let (cert, key) = (dir.join("site.pem"), dir.join("site.key"));
    std::fs::write(&cert, leaf.cert_pem).unwrap();
    std::fs::write(&key, leaf.key_pem).unwrap();
    format!(
        "\n[[server.tls]]\nlisten = \"127.0.0.1:{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        free_port(),
        cert.display(),
        key.display()
    )
}

async fn query(prom: &str, expr: &str) -> Result<usize, String> {
    let r = client()
        .get(format!("http://{prom}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body: serde_json::Value =
        serde_json::from_str(&r.text().await.unwrap()).map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("invalid: {}", body["error"]));
    }
    Ok(body["data"]["result"].as_array().map_or(0, |a| a.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_expression_returns_series_from_a_real_prometheus() {
    let prometheus = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("Prometheus is needed: apt-get install prometheus (make test installs it)");
    let slow = |name: &str| SimConfig::fixed(name, 64, Duration::from_millis(30));
    let mut primary = sim::start(slow("p1"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut secondary = sim::start(slow("s1"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // An HTTPS listener on a certificate with 7 days left: the expiry alert
    // has its series (and fires).
    let certs = tempfile::tempdir().unwrap();
    let tls = https_listener(certs.path(), 7);
    // An admission state in a directory that does not exist: its writes
    // fail, so the alert on them has its series (and fires).
    let state = certs.path().join("no-such-dir").join("admission.json");
    let routes = format!(
        r#"[server]
listen = ["{{LISTEN}}"]
admin = "{{ADMIN}}"
threads = 2
policy = "policy.toml"
admission_state = "{}"
{tls}
[clusters.kred]
health = {{ path = "/health", interval = "200ms", timeout = "100ms", rise = 2, fall = 2 }}
[[clusters.kred.sites]]
name = "skondal"
role = "primary"
backends = ["{}"]
[[clusters.kred.sites]]
name = "verizon"
role = "secondary"
backends = ["{}"]

[[routes]]
name = "checkout"
match = {{ path_prefix = "/checkout/" }}
tier = "purchase"
cluster = "kred"

[[routes]]
name = "cs"
match = {{ path_prefix = "/cs/" }}
tier = "customer_service"
cluster = "kred"
"#,
        state.display(),
        primary.addr,
        secondary.addr
    );
    // A fleet rate limit whose store refuses connections: it falls back (and
    // never limits: 100 000/s), so the store-down alert has its series.
    let policy = format!(
        "tiers = [\"purchase\", \"merchant\", \"admin\", \"customer_service\", \"background\"]\n\
         [tier.purchase]\nmax_queue_wait = \"30ms\"\n[tier.customer_service]\nmax_queue_wait = \"10ms\"\n\
         [admission.kred]\nmode = \"fixed\"\nlimit = 2\n\
         [rate_limit_store]\nredis = \"redis://{}/0\"\nfleet_size = 1\n\
         [[rate_limit]]\ntier = \"customer_service\"\nkey = \"client_ip\"\nper_second = 100000\nscope = \"fleet\"\n",
        refused_addr()
    );
    let policy = policy.as_str();
    let proxy = Proxy::start(&routes, policy).await;
    // Two more instances of the fleet, adaptive, one in front of a backend
    // three times as fast: they learn baselines far apart (what
    // K2FleetBaselinesSplit looks for).
    // Its admin requests cost eight purchases: the tier-cost alert and
    // panel have their series.
    let mut fast = SimConfig::fixed("f1", 64, Duration::from_millis(10));
    fast.classes = vec![(
        "/admin/".into(),
        sim::Dist::Fixed(Duration::from_millis(80)),
    )];
    let fast = sim::start(fast, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut fleet = Vec::new();
    for addr in [primary.addr, fast.addr] {
        let routes = format!(
            "[server]\nlisten = [\"{{LISTEN}}\"]\nadmin = \"{{ADMIN}}\"\nthreads = 1\npolicy = \"policy.toml\"\n\
             [clusters.kred]\n[[clusters.kred.sites]]\nname = \"skondal\"\nrole = \"primary\"\nbackends = [\"{addr}\"]\n\
             [[routes]]\nname = \"checkout\"\nmatch = {{ path_prefix = \"/checkout/\" }}\ntier = \"purchase\"\ncluster = \"kred\"\n\
             [[routes]]\nname = \"admin\"\nmatch = {{ path_prefix = \"/admin/\" }}\ntier = \"admin\"\ncluster = \"kred\"\n"
        );
        let p = Proxy::start(&routes, "tiers = [\"purchase\", \"admin\"]\n").await;
        for _ in 0..20 {
            let r = client().get(p.url("/checkout/pay")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let r = client().get(p.url("/admin/report")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
        fleet.push(p);
    }

    // A real Prometheus scraping k2proxy every second, plus a dead target.
    let dir = tempfile::tempdir().unwrap();
    let prom = format!("127.0.0.1:{}", free_port());
    // Dead on an address nothing in the suite listens on: a free port of
    // 127.0.0.1 could be taken by another test's k2proxy admin meanwhile
    // (tests run in parallel), and its `up` was then 1.
    let dead = format!("127.0.0.2:{}", free_port());
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: k2proxy\n    static_configs:\n      - targets: ['{}', '{}', '{}', '{dead}']\n",
        repo().join("dashboards/alerts.yml").display(),
        proxy.admin,
        fleet[0].admin,
        fleet[1].admin
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prom = Killed(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client()
        .get(format!("http://{prom}/-/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "Prometheus did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Ready is not scraping: wait for the first scrapes of k2proxy, so what
    // follows is in Prometheus's history.
    let up = format!("up{{job=\"k2proxy\", instance=\"{}\"}} == 1", proxy.admin);
    while query(&prom, &up).await != Ok(1) {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped k2proxy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Overload (purchases and customer service shed), then a failover.
    let target = |name: &str, path: &str, weight: f64| Target {
        name: name.into(),
        url: proxy.url(path).parse().unwrap(),
        weight,
        headers: vec![],
        body: None,
    };
    let load = tokio::spawn(openloop::run(Plan {
        targets: vec![
            target("purchase", "/checkout/pay", 3.0),
            target("cs", "/cs/ticket", 1.0),
        ],
        rate: 160,
        duration: Duration::from_secs(8),
        timeout: Duration::from_secs(5),
        seed: 11,
    }));
    tokio::time::sleep(Duration::from_secs(3)).await;
    primary.stop().await;
    // A reload that works, and one that is rejected.
    assert_eq!(
        client()
            .post(proxy.admin_url("/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    proxy.write_file("policy.toml", "tiers = [");
    assert_eq!(
        client()
            .post(proxy.admin_url("/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        422
    );
    proxy.write_file("policy.toml", policy);
    load.await.unwrap();
    // Finally every site down (the whole-cluster alert).
    secondary.stop().await;

    let mut exprs: Vec<(String, String)> = dashboard_exprs(&dashboard())
        .into_iter()
        .map(|e| ("dashboard".to_string(), e))
        .collect();
    exprs.extend(
        alert_exprs()
            .into_iter()
            .map(|e| ("alerts.yml".to_string(), e)),
    );
    assert!(exprs.len() > 30, "found {} expressions", exprs.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<(String, String)> = exprs.clone();
    let mut last = Vec::new();
    while !pending.is_empty() {
        last.clear();
        let mut still = Vec::new();
        for (from, e) in pending {
            match query(&prom, &concrete(&e)).await {
                Ok(n) if n > 0 => {}
                Ok(_) => {
                    last.push(format!("{from}: no series: {e}"));
                    still.push((from, e));
                }
                Err(err) => panic!("{from}: {err}: {e}"),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if !pending.is_empty() {
        for raw in ["k2_config_generation[1m]", "k2_config_reloads_total[1m]"] {
            let r = client()
                .get(format!("http://{prom}/api/v1/query"))
                .query(&[("query", raw)])
                .send()
                .await
                .unwrap();
            println!("{raw}: {}", r.text().await.unwrap());
        }
    }
    assert!(
        pending.is_empty(),
        "{} expressions returned nothing:\n{}",
        pending.len(),
        last.join("\n")
    );
    println!(
        "evaluated {} expressions against Prometheus: all valid, all with series",
        exprs.len()
    );

    // Every metric the dashboard names is one k2proxy exports.
    let metrics = proxy.metrics().await;
    let mut exported: BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .flat_map(|n| {
            [
                n.to_string(),
                format!("{n}_bucket"),
                format!("{n}_sum"),
                format!("{n}_count"),
            ]
        })
        .collect();
    exported.extend([
        "k2:purchase_success:ratio_rate5m".to_string(),
        "up".to_string(),
    ]);
    for e in dashboard_exprs(&dashboard()) {
        for name in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if name.starts_with("k2_") || name.starts_with("k2:") || name.starts_with("process_") {
                assert!(
                    exported.contains(name),
                    "the dashboard names {name}, which k2proxy does not export"
                );
            }
        }
    }
}

/// The metric names an expression reads (`k2_…` and `process_…`; recording
/// rules, `k2:…`, are made from these).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = expr[i..].starts_with("k2_") || expr[i..].starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            out.insert(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Every metric the dashboard and the alerts read is exported by a freshly
/// started, idle k2proxy (labelled counters at 0 for every known label
/// value), so a calm day shows 0, not "No data", and `increase()` has a
/// first point to compare with.
#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_read_exists_on_an_idle_proxy() {
    let (b1, b2) = (Backend::start("b1").await, Backend::start("b2").await);
    // Two sites, as every deployment has (failover series are per pair).
    let routes = routes_toml(
        &[b1.addr],
        &format!(
            "[[clusters.main.sites]]\nname = \"secondary-site\"\nrole = \"secondary\"\nbackends = [\"{}\"]\n\n\
             [[routes]]\nname = \"checkout\"\nmatch = {{ path_prefix = \"/checkout/\" }}\ntier = \"purchase\"\ncluster = \"main\"\n",
            b2.addr
        ),
    );
    let certs = tempfile::tempdir().unwrap();
    let routes = routes.replace(
        "\n[clusters.main]",
        &format!("{}\n[clusters.main]", https_listener(certs.path(), 90)),
    );
    let proxy = Proxy::start(&routes, &policy_toml(&[])).await;
    let text = proxy.metrics().await;
    let mut names = BTreeSet::new();
    for e in dashboard_exprs(&dashboard())
        .iter()
        .chain(alert_exprs().iter())
    {
        names.extend(metric_names(e));
    }
    assert!(names.len() > 10, "found only {names:?}");
    let missing: Vec<_> = names
        .iter()
        .filter(|n| {
            !text.lines().any(|l| {
                !l.starts_with('#')
                    && (l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} ")))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by an idle k2proxy: {missing:?}"
    );
    for series in [
        r#"k2_shed_total{reason="queue_timeout",tier="purchase"} 0"#,
        r#"k2_retries_total{cluster="main",reason="connect"} 0"#,
        r#"k2_upstream_errors_total{cluster="main",kind="timeout",site="primary-site"} 0"#,
        r#"k2_requests_total{code_class="2xx",outcome="proxied",route="checkout",tier="purchase"} 0"#,
        r#"k2_requests_total{code_class="5xx",outcome="shed",route="checkout",tier="purchase"} 0"#,
    ] {
        assert!(text.contains(series), "missing at 0: {series}");
    }
}

/// A markdown heading's anchor, as GitHub makes it: lower case, spaces to
/// hyphens, punctuation other than `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every alert's `runbook_url` names a file of the repo and a heading in it.
#[test]
fn every_runbook_url_points_at_a_heading_that_exists() {
    let text = std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap();
    let urls: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url:"))
        .map(str::trim)
        .collect();
    assert!(urls.len() >= 5, "found {urls:?}");
    for url in urls {
        let (file, want) = url.split_once('#').unwrap_or((url, ""));
        let doc = std::fs::read_to_string(repo().join(file))
            .unwrap_or_else(|e| panic!("{url}: {file}: {e}"));
        let anchors: Vec<String> = doc
            .lines()
            .filter(|l| l.starts_with('#'))
            .map(|l| anchor(l.trim_start_matches('#')))
            .collect();
        assert!(
            want.is_empty() || anchors.iter().any(|a| a == want),
            "{url}: no heading #{want} in {file} (headings: {anchors:?})"
        );
    }
}
