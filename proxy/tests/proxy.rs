//! The real k2proxy between a real client and real backends.

mod support;

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
name = "echo"
match = { path = "/echo", methods = ["POST", "PUT"] }
tier = "merchant"
cluster = "main"

[[routes]]
name = "stream"
match = { path = "/chunked" }
tier = "background"
cluster = "main"

[[routes]]
name = "by-host"
match = { host = "cs.k2.test" }
tier = "customer_service"
cluster = "main"

[[routes]]
name = "merchant-header"
match = { header = { name = "x-merchant-id" } }
tier = "merchant"
cluster = "main"
"#;

async fn setup(trusted: &[&str]) -> (Backend, Proxy) {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&routes_toml(&[backend.addr], ROUTES), &policy_toml(trusted)).await;
    (backend, proxy)
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn routes_set_the_tier_the_backend_sees() {
    let (backend, proxy) = setup(&[]).await;
    let c = client();
    let cases = [
        (c.get(proxy.url("/checkout/1")), "purchase"),
        (c.get(proxy.url("/admin/users")), "admin"),
        (c.post(proxy.url("/echo")).body("x"), "merchant"),
        (
            c.get(proxy.url("/other")).header("host", "CS.k2.test:8080"),
            "customer_service",
        ),
        (
            c.get(proxy.url("/other")).header("x-merchant-id", "m-1"),
            "merchant",
        ),
    ];
    for (i, (req, _)) in cases.into_iter().enumerate() {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "case {i}");
    }
    let tiers: Vec<String> = backend
        .seen()
        .iter()
        .map(|s| header(s, "x-k2-tier").unwrap_or("-").to_string())
        .collect();
    assert_eq!(
        tiers,
        [
            "purchase",
            "admin",
            "merchant",
            "customer_service",
            "merchant"
        ]
    );
}

#[tokio::test]
async fn untrusted_client_cannot_choose_its_tier() {
    // Only 10/8 may set the tier; the test client is 127.0.0.1.
    let (backend, proxy) = setup(&["10.0.0.0/8"]).await;
    let resp = client()
        .get(proxy.url("/admin/x"))
        .header("x-k2-tier", "purchase")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = backend.seen();
    assert_eq!(header(&seen[0], "x-k2-tier"), Some("admin"));
    assert_eq!(seen[0].headers.get_all("x-k2-tier").iter().count(), 1);
}

#[tokio::test]
async fn trusted_client_keeps_its_tier_but_not_an_unknown_one() {
    let (backend, proxy) = setup(&["127.0.0.0/8"]).await;
    let c = client();
    c.get(proxy.url("/admin/x"))
        .header("x-k2-tier", "purchase")
        .send()
        .await
        .unwrap();
    c.get(proxy.url("/admin/x"))
        .header("x-k2-tier", "vip")
        .send()
        .await
        .unwrap();
    let seen = backend.seen();
    assert_eq!(header(&seen[0], "x-k2-tier"), Some("purchase"));
    assert_eq!(
        header(&seen[1], "x-k2-tier"),
        Some("admin"),
        "unknown tier falls back to the route's"
    );
}

#[tokio::test]
async fn request_id_is_generated_when_absent_and_kept_when_present() {
    let (backend, proxy) = setup(&[]).await;
    let c = client();
    let generated = c.get(proxy.url("/checkout/1")).send().await.unwrap();
    let kept = c
        .get(proxy.url("/checkout/2"))
        .header("x-request-id", "merchant-abc-123")
        .send()
        .await
        .unwrap();
    let seen = backend.seen();
    let gen_id = header(&seen[0], "x-request-id").expect("generated id sent upstream");
    assert_eq!(gen_id.len(), 32);
    assert!(gen_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        generated.headers()["x-request-id"],
        gen_id,
        "client gets the same id"
    );
    assert_eq!(header(&seen[1], "x-request-id"), Some("merchant-abc-123"));
    assert_eq!(kept.headers()["x-request-id"], "merchant-abc-123");
}

#[tokio::test]
async fn x_forwarded_for_is_set_and_appended() {
    let (backend, proxy) = setup(&[]).await;
    let c = client();
    c.get(proxy.url("/checkout/1")).send().await.unwrap();
    c.get(proxy.url("/checkout/1"))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    let seen = backend.seen();
    assert_eq!(header(&seen[0], "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        header(&seen[1], "x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
}

#[tokio::test]
async fn no_route_gives_404_json_and_nothing_reaches_the_backend() {
    let (backend, proxy) = setup(&[]).await;
    let resp = client().get(proxy.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = resp.json_body().await;
    assert_eq!(body["error"], "no_route");
    assert_eq!(body["path"], "/nowhere");
    // A GET to /echo is not a route either: methods restrict.
    let resp = client().get(proxy.url("/echo")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(backend.seen().is_empty());
}

#[tokio::test]
async fn refused_backend_gives_502_json() {
    let dead = refused_addr();
    let proxy = Proxy::start(&routes_toml(&[dead], ROUTES), &policy_toml(&[])).await;
    let resp = client().get(proxy.url("/checkout/1")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(
        resp.headers()["connection"],
        "close",
        "the connection is not reused"
    );
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: serde_json::Value = resp.json_body().await;
    assert_eq!(body["error"], "bad_gateway");
    assert_eq!(body["kind"], "connect");
    assert_eq!(body["route"], "checkout");
    assert_eq!(body["request_id"], rid.as_str());
}

#[tokio::test]
async fn refused_connect_goes_to_the_next_backend_even_for_a_post() {
    let dead = refused_addr();
    let backend = Backend::start("alive").await;
    let proxy = Proxy::start(
        &routes_toml(&[dead, backend.addr], ROUTES),
        &policy_toml(&[]),
    )
    .await;
    let c = client();
    for i in 0..6 {
        let resp = c
            .post(proxy.url("/echo"))
            .body(format!("purchase-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), format!("purchase-{i}"));
    }
    // Each purchase reached the live backend exactly once. The dead backend
    // is avoided by health checks (once probed) or by a retry after its
    // refused connect (nothing was sent, so safe for a POST): every connect
    // failure that happened was retried.
    assert_eq!(backend.seen().len(), 6);
    let metrics = proxy.metrics_when("k2_requests_total").await;
    let count = |prefix: &str| metric_sum(&metrics, prefix);
    assert_eq!(
        count(r#"k2_upstream_errors_total{cluster="main",kind="connect""#),
        count(r#"k2_retries_total{cluster="main",reason="connect"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn one_mebibyte_post_is_echoed_intact() {
    let (backend, proxy) = setup(&[]).await;
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let resp = client()
        .post(proxy.url("/echo"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.bytes().await.unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got[..] == body[..], "echoed bytes differ");
    assert_eq!(backend.seen()[0].body_len, body.len());
}

#[tokio::test]
async fn chunked_request_and_response_pass_through() {
    let (backend, proxy) = setup(&[]).await;
    let resp = client().get(proxy.url("/chunked")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked")
    );
    let got = resp.bytes().await.unwrap();
    let want: Vec<u8> = (0..64).flat_map(|i| chunk(i).to_vec()).collect();
    assert!(
        got[..] == want[..],
        "chunked body differs: {} vs {} bytes",
        got.len(),
        want.len()
    );

    // A request body of unknown length goes out chunked and arrives whole.
    let stream = futures_stream((0..32).map(chunk).collect());
    let resp = client()
        .post(proxy.url("/echo"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let got = resp.bytes().await.unwrap();
    let want: Vec<u8> = (0..32).flat_map(|i| chunk(i).to_vec()).collect();
    assert!(got[..] == want[..]);
    assert_eq!(backend.seen()[1].body_len, want.len());
}

#[tokio::test]
async fn keep_alive_connection_serves_many_requests() {
    let (backend, proxy) = setup(&[]).await;
    let c = client();
    for i in 0..20 {
        let r = c
            .get(proxy.url(&format!("/checkout/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(backend.seen().len(), 20);
}

#[tokio::test]
async fn metrics_count_requests_by_route_tier_and_outcome() {
    let (_backend, proxy) = setup(&[]).await;
    let c = client();
    for _ in 0..3 {
        c.get(proxy.url("/checkout/1"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    c.get(proxy.url("/nowhere"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // The metrics are recorded when each request's logging phase has run,
    // which may be after the client has read the answer: poll until each
    // shows up rather than sleeping (a CI run read the 404's count at 0).
    let want = r#"k2_requests_total{code_class="2xx",outcome="proxied",route="checkout",tier="purchase"} 3"#;
    let text = proxy.metrics_when(want).await;
    assert!(text.contains(want), "{text}");
    let want =
        r#"k2_requests_total{code_class="4xx",outcome="no_route",route="none",tier="none"} 1"#;
    let text = proxy.metrics_when(want).await;
    assert!(text.contains(want), "{text}");
    let want = r#"k2_request_duration_seconds_count{tier="purchase"} 3"#;
    let text = proxy.metrics_when(want).await;
    assert!(text.contains(want), "{text}");
    assert!(text.contains("k2_config_generation 1"), "{text}");
    let health = c.get(proxy.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn access_log_has_one_event_per_request_with_its_fields() {
    let (backend, proxy) = setup(&[]).await;
    client()
        .post(proxy.url("/checkout/9?cart=7"))
        .header("x-request-id", "log-me-1")
        .header("user-agent", "shop-app/2.1")
        .body("0123456789")
        .send()
        .await
        .unwrap();
    let line = proxy.log_line("log-me-1").await;
    for field in [
        "route=\"checkout\"",
        "tier=\"purchase\"",
        "status=200",
        "duration_ms=",
        "host=\"127.0.0.1:",
        "query=\"cart=7\"",
        "user_agent=\"shop-app/2.1\"",
        "bytes_in=10",
        "bytes_out=10", // the test backend echoes a POST's body
        "upstream_ms=",
        "tries=1",
    ] {
        assert!(line.contains(field), "missing {field} in {line}");
    }
    assert!(
        line.contains(&format!("upstream={}", backend.addr)),
        "{line}"
    );
    assert_eq!(proxy.log_text().matches("log-me-1").count(), 1);
}

#[tokio::test]
async fn json_log_format_writes_one_json_object_per_access_event() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start_with_args(
        &routes_toml(&[backend.addr], ROUTES),
        &policy_toml(&[]),
        &["--log-format", "json"],
    )
    .await;
    client()
        .get(proxy.url("/admin/x"))
        .header("x-request-id", "json-1")
        .send()
        .await
        .unwrap();
    let line = proxy.log_line("json-1").await;
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["route"], "admin");
    assert_eq!(event["tier"], "admin");
    assert_eq!(event["status"], 200);
    assert_eq!(event["upstream"], backend.addr.to_string());
    assert!(event["duration_ms"].as_f64().is_some());
}

trait JsonBody {
    async fn json_body(self) -> serde_json::Value;
}

impl JsonBody for reqwest::Response {
    async fn json_body(self) -> serde_json::Value {
        let text = self.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }
}

/// A client that resets its connection in the middle of an upload is the
/// client's failure, not the backend's: twenty of them must not eject a
/// healthy backend (they did, and any client could halve a site that way).
#[tokio::test]
async fn clients_aborting_uploads_do_not_eject_a_healthy_backend() {
    use tokio::io::AsyncWriteExt;
    let (b1, b2) = (Backend::start("b1").await, Backend::start("b2").await);
    let proxy = Proxy::start(&routes_toml(&[b1.addr, b2.addr], ROUTES), &policy_toml(&[])).await;
    for i in 0..20 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "POST /echo HTTP/1.1\r\nhost: k2.test\r\ncontent-length: 100000\r\nx-request-id: abort-{i}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[b'x'; 4096]).await.unwrap();
        // Let the proxy connect upstream and start streaming the body.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        // SO_LINGER 0: the close is a TCP reset, as from a client that died.
        // (Deprecated because a non-zero linger blocks on drop; zero does not.)
        #[allow(deprecated)]
        s.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(s);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let st = proxy.status().await;
    let health: Vec<_> = st["clusters"][0]["sites"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["health"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        health.iter().all(|h| h != "ejected"),
        "a client's abort ejected a backend: {health:?}"
    );
    let r = client()
        .get(proxy.url("/checkout/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A request head past `[server].max_header_bytes` (32 KiB by default) is
/// answered 431 with the wire contract's JSON and never reaches the backend;
/// one under it passes.
#[tokio::test]
async fn an_oversized_request_head_gets_431_and_never_reaches_the_backend() {
    let (backend, proxy) = setup(&[]).await;
    let c = client();
    let big = "a".repeat(40 * 1024);
    let r = c
        .get(proxy.url("/checkout/big"))
        .header("x-padding", big.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "request_header_fields_too_large");
    assert_eq!(body["limit_bytes"], 32 * 1024);
    assert!(backend.seen().is_empty(), "nothing reached the backend");

    let fits = "a".repeat(20 * 1024);
    let r = c
        .get(proxy.url("/checkout/fits"))
        .header("x-padding", fits.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(backend.seen().len(), 1);
}

/// A keep-alive connection that sends nothing after its request is closed
/// after `[server].idle_timeout`; before it, it still serves the next one.
#[tokio::test]
async fn an_idle_keepalive_connection_is_closed_after_idle_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("b1").await;
    let routes = routes_toml(&[backend.addr], ROUTES).replacen(
        "threads = 1",
        "threads = 1\nidle_timeout = \"1s\"",
        1,
    );
    assert!(routes.contains("idle_timeout"));
    let proxy = Proxy::start(&routes, &policy_toml(&[])).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = b"GET /checkout/idle HTTP/1.1\r\nhost: k2.test\r\n\r\n";
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle_from = Instant::now();
    for i in 0..2 {
        if i > 0 {
            // Idle for less than the timeout: the next request is served.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        s.write_all(request).await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        // The idle time runs from the response (a CI run measured it from
        // a 300 ms sleep after it, and saw 698 ms against a bound of 700).
        idle_from = Instant::now();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "kept alive and served"
        );
    }
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    let closed_after = idle_from.elapsed();
    println!("an idle connection closed after {closed_after:?} (idle_timeout 1s)");
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection was kept open past 5 s: {read:?}"
    );
    assert!(
        closed_after >= Duration::from_millis(800) && closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}, expected about 1 s"
    );
}

/// Each try's backend latency (sent to response header) is recorded per
/// cluster and site.
#[tokio::test]
async fn backend_latency_is_recorded_per_site() {
    let (_backend, proxy) = setup(&[]).await;
    let r = client()
        .get(proxy.url("/checkout/slow/120"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = proxy.metrics().await;
    let labels = r#"{cluster="main",site="primary-site"}"#;
    assert_eq!(
        metric_sum(&m, &format!("k2_upstream_duration_seconds_count{labels}")),
        1.0
    );
    let sum = metric_sum(&m, &format!("k2_upstream_duration_seconds_sum{labels}"));
    assert!((0.12..1.0).contains(&sum), "latency sum {sum}");
}

/// W3C trace context: a client's valid `traceparent` reaches the backend
/// unchanged; without one (or with an invalid one) k2proxy starts a trace
/// and sends it upstream; the access log carries the trace id.
#[tokio::test]
async fn traceparent_is_kept_or_started_and_logged() {
    let (backend, proxy) = setup(&[]).await;
    let c = client();
    let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (path, sent) in [
        ("/checkout/traced", Some(theirs)),
        ("/checkout/untraced", None),
        ("/checkout/bad-trace", Some("00-xyz")),
    ] {
        let mut req = c.get(proxy.url(path)).header("x-request-id", path);
        if let Some(t) = sent {
            req = req.header("traceparent", t);
        }
        assert_eq!(req.send().await.unwrap().status(), 200);
    }
    let seen = backend.seen();
    let upstream = |path: &str| -> Vec<String> {
        let s = seen.iter().find(|s| s.path == path).unwrap();
        s.headers
            .get_all("traceparent")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(upstream("/checkout/traced"), vec![theirs.to_string()]);
    for path in ["/checkout/untraced", "/checkout/bad-trace"] {
        let t = upstream(path);
        assert_eq!(t.len(), 1, "{path}: {t:?}");
        assert!(
            t[0].starts_with("00-") && t[0].ends_with("-01") && t[0].len() == 55,
            "{t:?}"
        );
    }
    let line = proxy.log_line("/checkout/traced").await;
    assert!(
        line.contains("trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\""),
        "{line}"
    );
    let started = &upstream("/checkout/untraced")[0][3..35];
    assert!(proxy.log_line("/checkout/untraced").await.contains(started));
}

/// `--log-file`: the log goes to the file; after logrotate moves it, SIGUSR1
/// makes k2proxy write to a new file at the same path. A file that cannot
/// be opened stops the start with its name.
#[tokio::test]
async fn the_log_file_is_reopened_on_sigusr1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k2proxy.log");
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start_with_args(
        &routes_toml(&[backend.addr], ROUTES),
        &policy_toml(&[]),
        &["--log-file", path.to_str().unwrap()],
    )
    .await;
    let wait_for = |file: std::path::PathBuf, needle: &'static str| async move {
        for _ in 0..200 {
            if std::fs::read_to_string(&file)
                .unwrap_or_default()
                .contains(needle)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{needle} never reached {}", file.display());
    };
    let get = |id: &'static str| {
        let url = proxy.url("/checkout/rotate");
        async move {
            let r = client()
                .get(url)
                .header("x-request-id", id)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    get("before-rotation").await;
    wait_for(path.clone(), "before-rotation").await;
    let rotated = dir.path().join("k2proxy.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    let usr1 = std::process::Command::new("kill")
        .args(["-USR1", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(usr1.success());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    get("after-rotation").await;
    wait_for(path.clone(), "after-rotation").await;
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("before-rotation") && !old.contains("after-rotation"));

    let out = std::process::Command::new(k2proxy_bin())
        .args([
            "run",
            "--routes",
            proxy.dir().join("routes.toml").to_str().unwrap(),
        ])
        .args(["--log-file", "/nonexistent-dir/k2proxy.log"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open the log file /nonexistent-dir/k2proxy.log"),
        "{err}"
    );
}
