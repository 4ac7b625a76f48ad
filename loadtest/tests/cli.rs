//! The `loadtest` binary as an SRE runs it: scenario files, exit codes,
//! reports on disk, and errors that point at the line.

use std::process::Command;
use std::time::Duration;

use loadtest::sim::{self, SimConfig};

fn loadtest() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadtest"))
}

const SCENARIO: &str = r#"
name = "cli-smoke"
timeout = "2s"
thresholds = ["get.success >= 0.99", "THRESHOLD"]

[load]
stages = [{ duration = "1s", rate = 100 }]

[mix]
get = 3
post = 1

[tiers.get]
path = "/x/{seq}"

[tiers.post]
path = "/pay"
body = '{"n": {seq}}'
idempotency_key = true
"#;

async fn sim_addr() -> std::net::SocketAddr {
    let h = sim::start(
        SimConfig::fixed("cli", 16, Duration::from_millis(20)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let addr = h.addr;
    std::mem::forget(h);
    addr
}

fn run(dir: &std::path::Path, scenario: &str, target: &str) -> std::process::Output {
    let path = dir.join("s.toml");
    std::fs::write(&path, scenario).unwrap();
    loadtest()
        .args([
            "run",
            path.to_str().unwrap(),
            "--target",
            target,
            "--quiet",
            "--out",
        ])
        .arg(dir.join("out"))
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_against_a_target_writes_reports_and_exits_by_its_thresholds() {
    let addr = sim_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let target = format!("http://{addr}");

    let pass = SCENARIO.replace("THRESHOLD", "all.p50 <= 2s");
    let out = tokio::task::spawn_blocking({
        let (d, t) = (dir.path().to_path_buf(), target.clone());
        move || run(&d, &pass, &t)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all 2 thresholds met"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/report.json")).unwrap())
            .unwrap();
    assert_eq!(json["sent"], 100);
    assert_eq!(json["passed"], true);
    let names: Vec<&str> = json["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["get", "post"]);
    // The simulator echoes bodies: templated POSTs reached it.
    assert!(json["targets"][1]["outcomes"]["ok"].as_u64().unwrap() > 10);
    assert!(dir.path().join("out/report.html").exists());
    assert!(dir.path().join("out/summary.txt").exists());

    let fail = SCENARIO.replace("THRESHOLD", "get.p50 <= 1ms");
    let out = tokio::task::spawn_blocking({
        let (d, t) = (dir.path().to_path_buf(), target.clone());
        move || run(&d, &fail, &t)
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 threshold(s) missed"), "{stderr}");
    assert!(stderr.contains("get.p50 <= 1ms: measured"), "{stderr}");
}

#[test]
fn a_bad_scenario_is_refused_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, want) in [
        (
            SCENARIO.replace("rate = 100", "rate = \"fast\""),
            "s.toml:7:",
        ),
        (
            SCENARIO.replace("THRESHOLD", "nobody.success >= 1"),
            "not in [mix]",
        ),
        (
            SCENARIO.replace("[tiers.post]", "[tiers.post]\nverb = \"GET\""),
            "unknown field `verb`",
        ),
        (
            SCENARIO.replace("get = 3", "get = 3\nput = 1"),
            "has no [tiers.put] request",
        ),
        (
            SCENARIO.replace("THRESHOLD", "get.p99 <= 5"),
            "is not a duration",
        ),
        (
            format!("{SCENARIO}\n[topology]\nroutes = \"r.toml\"\nproxies = 0\n"),
            "s.toml:23:11: error: proxies must lie in 1..=16",
        ),
        (
            SCENARIO.replace("[load]\n", "[load]\nclients = 0\n"),
            "s.toml:7:11: error: clients must lie in 1..=10000",
        ),
    ] {
        let out = run(dir.path(), &bad, "http://127.0.0.1:1");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {stderr}");
        assert!(stderr.contains(want), "want {want:?} in {stderr}");
        assert!(stderr.contains("s.toml:"), "{stderr}");
    }
    let out = loadtest()
        .args(["run", "/nonexistent/s.toml", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the scenario"));
}

#[test]
fn a_quick_load_refuses_a_client_count_out_of_range() {
    for bad in ["0", "10001", "many"] {
        let out = loadtest()
            .args(["run", "--target", "http://127.0.0.1:1/x", "--clients", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--clients"), "{bad}: {stderr}");
    }
}

#[test]
fn the_shipped_scenarios_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    for name in [
        "steady",
        "black-friday",
        "failover-drill",
        "reload-storm",
        "soak",
    ] {
        let s = loadtest::scenario::Scenario::load(&dir.join(format!("{name}.toml")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(s.topology.is_some(), "{name}");
        assert!(!s.thresholds.is_empty(), "{name}");
        assert!(s.schedule().unwrap().peak() > 0.0);
    }
    // The drills judge their own facts, and the soak samples.
    let texts = |name: &str| {
        loadtest::scenario::Scenario::load(&dir.join(format!("{name}.toml")))
            .unwrap()
            .thresholds
            .iter()
            .map(|t| t.text.clone())
            .collect::<Vec<_>>()
    };
    for (name, fact) in [
        ("failover-drill", "duplicates <= 0"),
        ("failover-drill", "time_to_failover <= 1s"),
        ("reload-storm", "reloads_failed <= 0"),
        ("soak", "rss_growth <= 0.1"),
    ] {
        assert!(texts(name).iter().any(|t| t == fact), "{name}: {fact}");
    }
    let soak = loadtest::scenario::Scenario::load(&dir.join("soak.toml")).unwrap();
    assert_eq!(soak.soak_sample, Some(std::time::Duration::from_secs(60)));
    assert_eq!(soak.duration(), std::time::Duration::from_secs(300));
}
