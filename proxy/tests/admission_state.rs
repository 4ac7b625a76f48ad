//! `[server] admission_state`: a process writes its adaptive limits every
//! second and the next process on the same file starts from them, if the
//! file is fresh (`admission::memory`).

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;

fn routes(backend: std::net::SocketAddr, state: &Path) -> String {
    kred_routes(backend).replacen(
        "policy = \"policy.toml\"",
        &format!(
            "policy = \"policy.toml\"\nadmission_state = \"{}\"",
            state.display()
        ),
        1,
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn write_state(path: &Path, saved_at_ms: u64, limit: u32) {
    let text = serde_json::json!({
        "saved_at_ms": saved_at_ms,
        "sites": [{"cluster": "kred", "site": "skondal", "limit": limit}],
    });
    std::fs::write(path, text.to_string()).unwrap();
}

fn saved(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

async fn site_limit(p: &Proxy) -> u64 {
    p.status().await["clusters"][0]["sites"][0]["limit"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_process_resumes_the_limit_the_one_before_it_wrote() {
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("admission.json");
    let written_at = now_ms() - 2_000;
    write_state(&state, written_at, 37);

    let first = Proxy::start(&routes(backend.addr, &state), &default_policy()).await;
    assert_eq!(site_limit(&first).await, 37, "resumed, not `initial` (8)");
    first
        .log_line("adaptive limit resumed from the admission state")
        .await;
    let shown = &first.status().await["admission_state"];
    assert_eq!(shown["at_start"], "resumed", "{shown}");
    assert_eq!(shown["resumed"], serde_json::json!(["kred/skondal"]));
    assert_eq!(shown["file"], state.display().to_string());
    // It writes the file itself, every second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while saved(&state)["saved_at_ms"].as_u64() == Some(written_at) {
        assert!(std::time::Instant::now() < deadline, "never rewritten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = saved(&state);
    assert_eq!(s["sites"][0]["cluster"], "kred");
    assert_eq!(s["sites"][0]["limit"], 37);
    drop(first); // killed: the file stays as last written

    let second = Proxy::start(&routes(backend.addr, &state), &default_policy()).await;
    assert_eq!(site_limit(&second).await, 37);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_unreadable_state_is_said_and_left_unused() {
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("admission.json");
    write_state(&state, now_ms() - 3_600_000, 37);
    let p = Proxy::start(&routes(backend.addr, &state), &default_policy()).await;
    assert_eq!(site_limit(&p).await, 8, "an hour old: `initial`");
    p.log_line("admission state too old to use").await;
    let shown = &p.status().await["admission_state"];
    assert!(
        shown["at_start"].as_str().unwrap().starts_with("stale"),
        "{shown}"
    );
    drop(p);

    std::fs::write(&state, "not json").unwrap();
    let p = Proxy::start(&routes(backend.addr, &state), &default_policy()).await;
    assert_eq!(site_limit(&p).await, 8);
    let line = p.log_line("admission state not used").await;
    assert!(line.contains("admission.json"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_written_is_said_and_the_proxy_serves_on() {
    let backend = Backend::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("no-such-dir").join("admission.json");
    let p = Proxy::start(&routes(backend.addr, &state), &default_policy()).await;
    p.log_line("cannot write the admission state").await;
    let shown = &p.status().await["admission_state"];
    assert_eq!(shown["at_start"], "absent", "{shown}");
    assert!(shown["write_error"].is_string(), "{shown}");
    let failing = metric_sum(&p.metrics().await, "k2_admission_state_write_failing");
    assert_eq!(failing, 1.0);
    let r = client().get(p.url("/checkout/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
