//! XML-RPC classification through the real proxy: the method in the body
//! picks the route, the body reaches the backend byte for byte, and every
//! bad body gets a clear answer without reaching the backend altered.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &str = r#"
[[routes]]
name = "xmlrpc-purchase"
match = { path = "/xmlrpc", xmlrpc_method = ["add_invoice", "reserve_amount"] }
tier = "purchase"
cluster = "main"

[[routes]]
name = "xmlrpc-admin"
match = { path = "/xmlrpc", xmlrpc_method = ["list_*", "update_invoice"] }
tier = "admin"
cluster = "main"

[[routes]]
name = "xmlrpc-other"
match = { path = "/xmlrpc" }
tier = "merchant"
cluster = "main"

[[routes]]
name = "strict"
match = { path = "/strict", xmlrpc_method = ["add_invoice"] }
tier = "purchase"
cluster = "main"
on_bad_body = "reject"
inspect_limit = 1024
inspect_timeout = "300ms"

[[routes]]
name = "lenient"
match = { path = "/lenient", xmlrpc_method = ["add_invoice"] }
tier = "purchase"
cluster = "main"
on_bad_body = "next"
inspect_limit = 1024
inspect_timeout = "300ms"

[[routes]]
name = "lenient-other"
match = { path = "/lenient" }
tier = "merchant"
cluster = "main"

[[routes]]
name = "plain"
match = { path = "/plain" }
tier = "purchase"
cluster = "main"

[[routes]]
name = "stream-probe"
match = { path = "/stream-probe" }
tier = "background"
cluster = "main"

[[routes]]
name = "upload"
match = { path = "/upload" }
tier = "background"
cluster = "main"
max_body = 134217728
"#;

fn call(method: &str) -> String {
    format!("<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params><param><value><string>inv-1</string></value></param></params></methodCall>")
}

async fn setup() -> (Backend, Proxy) {
    let backend = Backend::start("b").await;
    let proxy = Proxy::start(&routes_toml(&[backend.addr], ROUTES), &policy_toml(&[])).await;
    (backend, proxy)
}

async fn post(
    proxy: &Proxy,
    path: &str,
    ctype: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    client()
        .post(proxy.url(path))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap()
}

fn tier_of(s: &Seen) -> &str {
    s.headers.get("x-k2-tier").unwrap().to_str().unwrap()
}

#[tokio::test]
async fn the_method_picks_the_route_and_the_body_arrives_intact() {
    let (backend, proxy) = setup().await;
    for (method, tier) in [
        ("add_invoice", "purchase"),
        ("reserve_amount", "purchase"),
        ("list_invoices", "admin"),
        ("update_invoice", "admin"),
        ("get_status", "merchant"),
    ] {
        let body = call(method);
        let r = post(&proxy, "/xmlrpc", "text/xml", body.clone()).await;
        assert_eq!(r.status(), 200, "{method}");
        assert_eq!(
            r.text().await.unwrap(),
            body,
            "{method}: echoed byte for byte"
        );
        assert_eq!(tier_of(backend.seen().last().unwrap()), tier, "{method}");
    }
    let line = proxy.log_line("xmlrpc=\"add_invoice\"").await;
    assert!(line.contains("route=\"xmlrpc-purchase\""), "{line}");
    let m = proxy
        .metrics_when(r#"k2_xmlrpc_requests_total{method="unmatched",route="xmlrpc-purchase"} 1"#)
        .await;
    assert!(
        m.contains(r#"k2_xmlrpc_requests_total{method="list_*",route="xmlrpc-purchase"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"k2_xmlrpc_requests_total{method="add_invoice",route="xmlrpc-purchase"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_body_in_many_small_chunks_and_a_name_after_a_large_comment() {
    let (backend, proxy) = setup().await;
    let body = call("add_invoice");
    let chunks: Vec<bytes::Bytes> = body
        .as_bytes()
        .chunks(7)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let stream = futures_stream(chunks);
    let r = post(
        &proxy,
        "/xmlrpc",
        "text/xml",
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_eq!(r.text().await.unwrap(), body);
    assert_eq!(tier_of(backend.seen().last().unwrap()), "purchase");

    let body = format!(
        "<methodCall><!-- {} --><methodName>reserve_amount</methodName></methodCall>",
        "z".repeat(40_000)
    );
    let r = post(&proxy, "/xmlrpc", "text/xml", body.clone()).await;
    assert_eq!(r.text().await.unwrap(), body);
    assert_eq!(tier_of(backend.seen().last().unwrap()), "purchase");

    // The method early in a body larger than the inspection buffer: the rest streams on.
    let body = format!("<methodCall><methodName>add_invoice</methodName><params><param><value><string>{}</string></value></param></params></methodCall>", "p".repeat(300_000));
    let r = post(&proxy, "/xmlrpc", "text/xml", body.clone()).await;
    assert_eq!(r.text().await.unwrap().len(), body.len());
    assert_eq!(tier_of(backend.seen().last().unwrap()), "purchase");
}

/// Each bad input: refused with 400 on a strict route (the backend never
/// sees it), forwarded unaltered to the next route on a lenient one (same
/// 1 KiB limit and 300 ms timeout).
async fn bad(proxy: &Proxy, backend: &Backend, ctype: &str, body: String, reason: &str) {
    let before = backend.seen().len();
    let r = post(proxy, "/strict", ctype, body.clone()).await;
    assert_eq!(r.status(), 400, "{reason}");
    let j: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(j["reason"], reason);
    assert_eq!(
        backend.seen().len(),
        before,
        "{reason}: never reached the backend"
    );
    let r = post(proxy, "/lenient", ctype, body.clone()).await;
    assert_eq!(r.status(), 200, "{reason}: falls back");
    assert_eq!(r.text().await.unwrap(), body, "{reason}: unaltered");
    assert_eq!(
        tier_of(backend.seen().last().unwrap()),
        "merchant",
        "{reason}: the fallback route"
    );
}

#[tokio::test]
async fn malformed_xml_is_refused_or_falls_back() {
    let (backend, proxy) = setup().await;
    bad(
        &proxy,
        &backend,
        "text/xml",
        "<methodCall><methodName>add_invoice</oops>".into(),
        "malformed",
    )
    .await;
}

#[tokio::test]
async fn no_method_name_is_refused_or_falls_back() {
    let (backend, proxy) = setup().await;
    bad(
        &proxy,
        &backend,
        "text/xml",
        "<methodCall><params/></methodCall>".into(),
        "no_method_name",
    )
    .await;
}

#[tokio::test]
async fn a_body_past_the_limit_without_a_name_is_refused_or_falls_back() {
    let (backend, proxy) = setup().await;
    let body = format!(
        "<methodCall><!-- {} --><methodName>add_invoice</methodName></methodCall>",
        "q".repeat(2000)
    );
    bad(&proxy, &backend, "text/xml", body, "too_large").await;
}

#[tokio::test]
async fn entity_tricks_are_refused_or_fall_back() {
    let (backend, proxy) = setup().await;
    let body = "<!DOCTYPE m [<!ENTITY a \"add_invoice\">]><methodCall><methodName>&a;</methodName></methodCall>".to_string();
    bad(&proxy, &backend, "text/xml", body, "malformed").await;
}

#[tokio::test]
async fn a_wrong_content_type_is_refused_or_falls_back() {
    let (backend, proxy) = setup().await;
    bad(
        &proxy,
        &backend,
        "application/json",
        call("add_invoice"),
        "content_type",
    )
    .await;
}

#[tokio::test]
async fn a_body_that_never_finishes_gets_400_at_the_inspection_timeout() {
    let (backend, proxy) = setup().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let partial = "<methodCall><methodNa";
    let head = format!("POST /strict HTTP/1.1\r\nhost: x\r\ncontent-type: text/xml\r\ncontent-length: 1000\r\n\r\n{partial}");
    s.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"reason\":\"timeout\""), "{answer}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(backend.seen().is_empty());
}

#[tokio::test]
async fn ten_mebibytes_on_an_uninspected_route_stream_with_flat_memory() {
    let (backend, proxy) = setup().await;
    // The client sends 1 MiB, pauses 600 ms, then sends 9 MiB more. A proxy
    // that streams hands the first bytes to the backend during the pause;
    // one that buffered the body could not.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let mib = bytes::Bytes::from(vec![b'u'; 1024 * 1024]);
    let sender = tokio::spawn(async move {
        tx.send(mib.clone()).await.unwrap();
        let paused = Instant::now();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let resumed = Instant::now();
        for _ in 0..9 {
            tx.send(mib.clone()).await.unwrap();
        }
        (paused, resumed)
    });
    let resp = client()
        .post(proxy.url("/stream-probe"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(Rx(rx)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.text().await.unwrap(),
        (10 * 1024 * 1024).to_string(),
        "every byte arrived"
    );
    let (paused, resumed) = sender.await.unwrap();
    let first = backend.first_bytes()[0];
    assert!(
        first > paused && first < resumed,
        "the backend got the first bytes during the client's pause"
    );
    memory_stays_flat(&proxy, &backend).await;
}

/// The proxy's peak resident memory (VmHWM) while it carries a 64 MiB
/// upload and its echo, after one 10 MiB upload warmed the allocator: it
/// rises by less than a third of the body. A proxy that held the body would
/// rise by all of it. (The peak, not the resident size after the fact: a
/// buffer freed after the request leaves no trace in the latter. The margin
/// is wide because each proxy thread's first large request grows its own
/// malloc arena by a few MiB, more of them on a loaded machine.)
async fn memory_stays_flat(proxy: &Proxy, backend: &Backend) {
    let peak = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .expect("VmHWM in /proc/PID/status")
            * 1024.0
    };
    let upload = |size: usize| async move {
        let r = post(
            proxy,
            "/upload",
            "application/octet-stream",
            vec![b'u'; size],
        )
        .await;
        assert_eq!(r.bytes().await.unwrap().len(), size);
        assert_eq!(backend.seen().last().unwrap().body_len, size);
    };
    upload(10 * 1024 * 1024).await;
    let before = peak();
    upload(64 * 1024 * 1024).await;
    let grew = peak() - before;
    assert!(
        grew < 64.0 * 1024.0 * 1024.0 / 3.0,
        "peak resident memory grew {:.1} MiB carrying a 64 MiB body",
        grew / 1048576.0
    );
}

/// A body fed from a channel.
struct Rx(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl futures_core::Stream for Rx {
    type Item = Result<bytes::Bytes, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_three_times_capacity_purchase_methods_flow_and_listing_calls_are_shed() {
    use loadtest::openloop::{self, Plan, Target};
    use loadtest::sim::{self, SimConfig};
    // 4 workers × 50 ms: 80 calls/s. Offer 240/s for 8 s, all to /xmlrpc:
    // 20% purchases (add_invoice, reserve_amount: 0.6 of capacity, as in
    // the holiday mix), 80% listing calls. (At 30%, purchases alone were 0.9
    // of capacity: a CPU-starved debug build then has less than that, and
    // purchases waited out their queue time with either controller. At
    // 25 ms and 480/s the debug build parsing every body was itself the
    // bottleneck in one fresh-clone run: purchases 79% served.)
    let config = SimConfig::fixed("legacy", 4, Duration::from_millis(50));
    let sim = sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let policy = "tiers = [\"purchase\", \"merchant\", \"admin\", \"background\"]\n\n[tier.purchase]\nmax_queue_wait = \"2s\"\n\n[shedding]\nnever_shed = [\"purchase\"]\n";
    let proxy = Proxy::start(&routes_toml(&[sim.addr], ROUTES), policy).await;
    let target = |name: &str, method: &str, weight: f64| Target {
        name: name.into(),
        url: proxy.url("/xmlrpc").parse().unwrap(),
        weight,
        headers: vec![("content-type".into(), "text/xml".into())],
        body: Some(call(method).into()),
    };
    let report = openloop::run(Plan {
        targets: vec![
            target("add_invoice", "add_invoice", 10.0),
            target("reserve_amount", "reserve_amount", 10.0),
            target("list_invoices", "list_invoices", 80.0),
        ],
        rate: 240,
        duration: Duration::from_secs(8),
        timeout: Duration::from_secs(5),
        seed: 21,
    })
    .await;
    println!("{}", report.summary());
    for name in ["add_invoice", "reserve_amount"] {
        let t = report.target(name).unwrap();
        assert!(
            t.success() >= 0.99,
            "{name}: {:.4}\n{}",
            t.success(),
            report.summary()
        );
    }
    let list = report.target("list_invoices").unwrap();
    assert!(
        list.success() < 0.5,
        "listing calls are shed: {:.2}",
        list.success()
    );
    assert_eq!(
        list.outcomes.timeout + list.outcomes.error,
        0,
        "{}",
        report.summary()
    );
    let dups: Vec<_> = sim
        .sim
        .request_ids()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(dups.is_empty(), "no call processed twice: {dups:?}");
}

/// The added latency of inspection: the same 2 KiB call to an inspected
/// route and to a path-only route, interleaved in one open-loop run.
/// Figures: `cargo test --release -p proxy --test xmlrpc inspection -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_latency_side_by_side_with_a_path_only_route() {
    use loadtest::openloop::{self, Plan, Target};
    // Admission off: this measures inspection, and with a debug build
    // starved of CPU by the tests beside it, latency rose to 30 ms for this
    // in-process backend, the adaptive limit took that for a saturated
    // backend, and purchases were shed (seen once in CI, and in 3 of 4 runs
    // with two other test binaries loading the machine).
    let backend = Backend::start("b").await;
    let policy = format!("{}\n[admission.main]\nmode = \"off\"\n", policy_toml(&[]));
    let proxy = Proxy::start(&routes_toml(&[backend.addr], ROUTES), &policy).await;
    let mut body = call("add_invoice");
    let pad = 2048 - body.len();
    body = body.replace("inv-1", &format!("inv-1{}", "x".repeat(pad)));
    assert_eq!(body.len(), 2048);
    let target = |name: &str, path: &str| Target {
        name: name.into(),
        url: proxy.url(path).parse().unwrap(),
        weight: 1.0,
        headers: vec![("content-type".into(), "text/xml".into())],
        body: Some(body.clone().into()),
    };
    let report = openloop::run(Plan {
        targets: vec![
            target("inspected", "/xmlrpc"),
            target("path_only", "/plain"),
        ],
        rate: 400,
        duration: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        seed: 5,
    })
    .await;
    println!("{}", report.summary());
    for t in &report.targets {
        assert_eq!(t.outcomes.ok, t.sent, "{}", report.summary());
    }
}
