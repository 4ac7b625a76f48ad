//! Graceful restart for changes a reload cannot apply (listeners, threads):
//! a new k2proxy started with `--upgrade` takes over the listening sockets
//! from the old one on SIGQUIT, and no request fails on the way.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loadtest::openloop::{self, Plan, Target};
use support::*;

const ROUTES: &str = r#"
[[routes]]
name = "checkout"
match = { path_prefix = "/checkout/" }
tier = "purchase"
cluster = "main"
"#;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_over_the_listeners_without_failing_a_request() {
    let backend = Backend::start("b").await;
    let old = Proxy::start(&routes_toml(&[backend.addr], ROUTES), &policy_toml(&[])).await;
    let old_pid = old.pid();
    assert_eq!(old.status().await["pid"].as_u64(), Some(u64::from(old_pid)));

    let load = tokio::spawn(openloop::run(Plan {
        targets: vec![Target {
            name: "purchase".into(),
            url: old.url("/checkout/pay").parse().unwrap(),
            weight: 1.0,
            headers: vec![],
            body: None,
        }],
        rate: 100,
        duration: Duration::from_secs(9),
        timeout: Duration::from_secs(5),
        seed: 5,
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The new process waits on the upgrade socket for the old one's listeners.
    let log = std::fs::File::create(old.dir().join("new.log")).unwrap();
    let new = Killed(
        Command::new(k2proxy_bin())
            .args(["run", "--upgrade", "--routes"])
            .arg(old.dir().join("routes.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let new_pid = new.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(old_pid, "-QUIT");

    // The new process serves (same addresses) while the old one drains and exits.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pid = client()
            .get(old.admin_url("/status"))
            .send()
            .await
            .ok()
            .map(|r| async { r.json_value().await["pid"].as_u64() });
        let pid = match pid {
            Some(f) => f.await,
            None => None,
        };
        let old_gone = !std::path::Path::new(&format!("/proc/{old_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "));
        if pid == Some(u64::from(new_pid)) && old_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no handover: /status pid {pid:?}, old gone {old_gone}\nnew log:\n{}",
            std::fs::read_to_string(old.dir().join("new.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let report = load.await.unwrap();
    let t = &report.targets[0];
    assert_eq!(
        t.outcomes.ok,
        t.sent,
        "no request failed during the upgrade:\n{}",
        report.summary()
    );
    let r = client()
        .get(old.url("/checkout/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the new process serves the old address");
}

trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_str(&self.text().await.unwrap_or_default()).unwrap_or_default()
    }
}
