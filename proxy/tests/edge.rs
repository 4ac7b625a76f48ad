//! The edge against a real `k2proxy run`: header deadline (slowloris),
//! connection limits, body limits, a retry's permit at its new site, and
//! the drain on SIGTERM.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const ROUTES: &str = r#"
[[routes]]
name = "checkout"
match = { path_prefix = "/checkout/" }
tier = "purchase"
cluster = "main"

[[routes]]
name = "upload"
match = { path_prefix = "/upload/" }
tier = "merchant"
cluster = "main"
max_body = 1000
"#;

/// `routes_toml` with extra `[server]` lines.
fn with_server(backends: &[SocketAddr], server: &str) -> String {
    let routes =
        routes_toml(backends, ROUTES).replacen("threads = 1", &format!("threads = 1\n{server}"), 1);
    assert!(routes.contains(server));
    routes
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends one GET on `s` and reads the answer's first bytes; `None` when the
/// connection is closed (or reset) instead.
async fn get(s: &mut TcpStream, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: k2.test\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

/// Reads until EOF (or reset, or 10 s): what the proxy wrote, and when the
/// connection ended.
async fn read_to_close(s: &mut TcpStream) -> (String, Instant) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return (String::from_utf8_lossy(&out).into_owned(), Instant::now()),
        }
    }
}

/// Sends a request line, then one header line every 300 ms (for up to 6 s)
/// while reading: what the proxy answered, and how long after the first
/// byte the connection ended.
async fn trickle(s: &mut TcpStream, path: &str) -> (String, Duration) {
    let start = Instant::now();
    let line = format!("GET {path} HTTP/1.1\r\n");
    s.write_all(line.as_bytes()).await.unwrap();
    let mut got = String::new();
    let mut buf = vec![0u8; 4096];
    for i in 0..20 {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(n) if n > 0 => got.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(300)) => {
                let header = format!("x-line-{i}: y\r\n");
                if s.write_all(header.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    }
    (got, start.elapsed())
}

/// A client trickling one header line every 300 ms (which restarts a
/// per-read timeout forever) is answered 408 and closed once
/// `header_timeout` has passed since its first byte, on the first request
/// and on a later one of a kept-alive connection; a connection that sends
/// nothing is closed without an answer. Normal requests are untouched.
#[tokio::test]
async fn headers_trickled_past_header_timeout_get_408_and_the_connection_closes() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(&[backend.addr], "header_timeout = \"1s\""),
        &policy_toml(&[]),
    )
    .await;

    let mut fresh = TcpStream::connect(proxy.addr).await.unwrap();
    let (text, took) = trickle(&mut fresh, "/checkout/slow").await;
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "trickled headers answered {text:?}"
    );
    assert!(text.contains("\"error\":\"request_timeout\""), "{text}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");

    // A kept-alive connection: one normal request, then a trickled one.
    let mut kept = TcpStream::connect(proxy.addr).await.unwrap();
    let first = get(&mut kept, "/checkout/ok").await.unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let (text, took) = trickle(&mut kept, "/checkout/slow2").await;
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "second request answered {text:?}"
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");

    // Silent: closed after about header_timeout, nothing written.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let start = Instant::now();
    let (text, at) = read_to_close(&mut silent).await;
    let took = at - start;
    assert_eq!(text, "", "a silent connection got an answer");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "silent connection closed after {took:?}"
    );

    let r = client()
        .get(proxy.url("/checkout/normal"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = proxy.metrics().await;
    assert!(
        metric_sum(&m, "k2_header_timeouts_total") >= 3.0,
        "{}",
        m.lines()
            .filter(|l| l.contains("header_timeouts"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        backend.seen().iter().all(|s| !s.path.contains("slow")),
        "a trickled request reached the backend"
    );
}

/// 2 000 slowloris connections from four addresses, each trickling a
/// header line every 500 ms: 99% are closed within header_timeout + 1 s
/// of their first byte (every one within + 2 s), and purchases during the
/// attack are served in under 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_slowloris_connections_are_closed_in_time_and_purchases_flow() {
    const CONNS: usize = 2000;
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(&[backend.addr], "header_timeout = \"2s\""),
        &policy_toml(&[]),
    )
    .await;
    let addr = proxy.addr;
    let attack: Vec<_> = (0..CONNS)
        .map(|i| {
            tokio::spawn(async move {
                let from = format!("127.0.0.{}", 2 + i % 4);
                let mut s = connect_from(&from, addr).await;
                let start = Instant::now();
                s.write_all(b"GET /checkout/slowloris HTTP/1.1\r\n")
                    .await
                    .ok()?;
                let mut buf = [0u8; 1024];
                for k in 0..12 {
                    tokio::select! {
                        r = s.read(&mut buf) => match r {
                            Ok(n) if n > 0 => continue, // the 408; EOF follows
                            _ => return Some(start.elapsed()),
                        },
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {
                            let line = format!("x-{k}: y\r\n");
                            if s.write_all(line.as_bytes()).await.is_err() {
                                return Some(start.elapsed());
                            }
                        }
                    }
                }
                None // still open after 6 s
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client();
    let mut took = Vec::new();
    for i in 0..10 {
        let start = Instant::now();
        let r = c
            .post(proxy.url(&format!("/checkout/during-{i}")))
            .body("pay")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        took.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    took.sort();
    assert!(
        took[5] < Duration::from_millis(100),
        "purchases during the attack took {took:?}"
    );
    let mut lifetimes = Vec::new();
    for a in attack {
        lifetimes.push(a.await.unwrap());
    }
    let open = lifetimes.iter().filter(|l| l.is_none()).count();
    assert_eq!(
        open, 0,
        "{open} of {CONNS} slowloris connections still open after 6 s"
    );
    // Of 2 000 connections opened at once, the last ones wait in the
    // proxy's accept queue before their header_timeout starts: on a
    // loaded two-core machine (simulations running beside the test) one
    // lived 3.26 s. So 99% within header_timeout + 1 s and every one
    // within header_timeout + 2 s; a timeout not enforced leaves them
    // open at 6 s, and one started late shifts them all.
    let mut lived: Vec<Duration> = lifetimes.into_iter().flatten().collect();
    lived.sort();
    let p99 = lived[lived.len() * 99 / 100];
    let longest = lived[lived.len() - 1];
    assert!(
        p99 < Duration::from_secs(3) && longest < Duration::from_secs(4),
        "p99 lived {p99:?}, longest {longest:?} (header_timeout 2 s)"
    );
}

/// A flood of slow heads from many addresses fills `max_connections`: a
/// new connection then closes the one whose head has been arriving longest
/// (over a second) instead of being refused, so real clients get in.
#[tokio::test]
async fn past_max_connections_the_slowest_head_makes_room_for_a_new_client() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(&[backend.addr], "max_connections = 20"),
        &policy_toml(&[]),
    )
    .await;
    let mut slow = slow_heads_then_real_clients(proxy.addr, 20, false).await;
    let m = proxy.metrics().await;
    assert!(
        metric_sum(
            &m,
            "k2_connections_refused_total{reason=\"slow_head_evicted\""
        ) >= 2.0,
        "{}",
        m.lines()
            .filter(|l| l.contains("refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut closed = 0;
    for s in &mut slow {
        let mut buf = [0u8; 16];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 2, "{closed} slow heads were closed");
}

/// A kept-alive connection's later head is evictable too: connections
/// that were served once and then trickle their next head make room past
/// `max_connections` like a first slow head does.
#[tokio::test]
async fn a_slow_later_head_on_a_kept_alive_connection_makes_room_too() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(&[backend.addr], "max_connections = 10"),
        &policy_toml(&[]),
    )
    .await;
    slow_heads_then_real_clients(proxy.addr, 10, true).await;
}

/// Opens `n` connections from ten addresses that each begin a head and
/// stop (after one served request, when `served_first`), waits past the
/// age at which a head may be evicted, and asserts that three new clients
/// are served. Returns the slow connections.
async fn slow_heads_then_real_clients(
    to: SocketAddr,
    n: usize,
    served_first: bool,
) -> Vec<TcpStream> {
    let mut slow = Vec::new();
    for i in 0..n {
        let mut s = connect_from(&format!("127.0.0.{}", 2 + i % 10), to).await;
        if served_first {
            let r = get(&mut s, &format!("/checkout/first-{i}")).await;
            assert!(r.is_some_and(|r| r.starts_with("HTTP/1.1 200")));
        }
        s.write_all(b"GET /checkout/slow HTTP/1.1\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for i in 0..3 {
        let mut s = TcpStream::connect(to).await.unwrap();
        let r = get(&mut s, &format!("/checkout/real-{i}")).await;
        assert!(
            r.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
            "a real client was refused while slow heads held every slot \
             (served first: {served_first}): {r:?}"
        );
    }
    slow
}

/// Past `max_connections_per_client` from one address, or `max_connections`
/// in all, a new connection is closed at once; connections already open
/// keep working, other addresses connect, the admin port answers, and a
/// slot given back is usable again.
#[tokio::test]
async fn connection_limits_close_new_connections_and_keep_the_open_ones() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(
            &[backend.addr],
            "max_connections = 5\nmax_connections_per_client = 3",
        ),
        &policy_toml(&[]),
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", proxy.addr).await;
        let r = get(&mut s, "/checkout/a").await.expect("served");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        open.push(s);
    }
    let mut fourth = connect_from("127.0.0.1", proxy.addr).await;
    assert_eq!(
        get(&mut fourth, "/checkout/b").await,
        None,
        "a 4th connection from one address was served"
    );
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", proxy.addr).await;
        let r = get(&mut s, "/checkout/c").await.expect("another address");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        open.push(s);
    }
    let mut sixth = connect_from("127.0.0.3", proxy.addr).await;
    assert_eq!(
        get(&mut sixth, "/checkout/d").await,
        None,
        "a 6th connection was served past max_connections = 5"
    );
    for s in &mut open {
        let r = get(s, "/checkout/again")
            .await
            .expect("open ones keep working");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let st = proxy.status().await;
    assert_eq!(st["connections"]["open"], 5, "{}", st["connections"]);
    let m = proxy.metrics().await;
    for reason in ["max_connections", "max_connections_per_client"] {
        let line = format!("k2_connections_refused_total{{reason=\"{reason}\"}} 1");
        assert!(m.contains(&line), "missing {line}");
    }
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut s = connect_from("127.0.0.3", proxy.addr).await;
        match get(&mut s, "/checkout/e").await {
            Some(r) => {
                assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                break;
            }
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            None => panic!("a slot given back was not usable again"),
        }
    }
}

/// A body over the route's `max_body` gets 413 with the wire contract's
/// JSON: declared (nothing reaches the backend) or streamed without a
/// length (the backend sees at most an incomplete body). Under it passes.
#[tokio::test]
async fn bodies_over_max_body_get_413() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&routes_toml(&[backend.addr], ROUTES), &policy_toml(&[])).await;
    let c = client();

    let r = c
        .post(proxy.url("/upload/declared"))
        .body(vec![b'x'; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large");
    assert_eq!(body["limit_bytes"], 1000);
    assert!(backend.seen().iter().all(|s| s.path != "/upload/declared"));

    let stream = futures_stream(
        (0..5)
            .map(|_| bytes::Bytes::from(vec![b'y'; 1000]))
            .collect(),
    );
    let r = c
        .post(proxy.url("/upload/streamed"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(
        backend
            .seen()
            .iter()
            .filter(|s| s.path == "/upload/streamed")
            .all(|s| s.body_len <= 1000),
        "the backend got the whole oversized body"
    );

    let r = c
        .post(proxy.url("/upload/small"))
        .body(vec![b'z'; 800])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The default (10 MiB) lets an ordinary body through.
    let r = c
        .post(proxy.url("/checkout/pay"))
        .body(vec![b'z'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = backend.seen();
    let last = seen.iter().find(|s| s.path == "/checkout/pay").unwrap();
    assert_eq!(last.body_len, 64 * 1024);
}

/// Behind a balancer in `proxy_protocol_from`, the PROXY header's client
/// (v1 and v2) is the client: in x-forwarded-for and the access log. From
/// the balancer without a header, the connection is refused; a PROXY line
/// from anyone else never reaches the backend.
#[tokio::test]
async fn the_proxy_protocol_carries_the_client_from_trusted_balancers_only() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(&[backend.addr], "proxy_protocol_from = [\"127.0.0.2/32\"]"),
        &policy_toml(&[]),
    )
    .await;
    let send = |from: &'static str, preface: Vec<u8>, path: &'static str| {
        let addr = proxy.addr;
        async move {
            let mut s = connect_from(from, addr).await;
            s.write_all(&preface).await.unwrap();
            get(&mut s, path).await
        }
    };
    let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\n".to_vec();
    let r = send("127.0.0.2", v1.clone(), "/checkout/v1")
        .await
        .expect("served");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 4, 127, 0, 0, 1, 0x1f, 0x90, 0, 80]);
    let r = send("127.0.0.2", v2, "/checkout/v2").await.expect("served");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let seen = backend.seen();
    let xff = |path: &str| {
        let s = seen
            .iter()
            .find(|s| s.path == path)
            .expect("reached the backend");
        s.headers["x-forwarded-for"].to_str().unwrap().to_string()
    };
    assert_eq!(xff("/checkout/v1"), "203.0.113.9");
    assert_eq!(xff("/checkout/v2"), "198.51.100.4");
    assert!(proxy
        .log_line("/checkout/v1")
        .await
        .contains("client=203.0.113.9"));

    // The balancer without a header: refused.
    assert_eq!(send("127.0.0.2", Vec::new(), "/checkout/bare").await, None);
    // Anyone else's PROXY line: never a client address, never upstream.
    let r = send("127.0.0.1", v1, "/checkout/spoof").await;
    assert!(
        r.as_deref().is_none_or(|r| r.starts_with("HTTP/1.1 400")),
        "{r:?}"
    );
    assert!(backend
        .seen()
        .iter()
        .all(|s| s.path != "/checkout/bare" && s.path != "/checkout/spoof"));
    let m = proxy.metrics().await;
    assert!(m.contains("k2_connections_refused_total{reason=\"proxy_protocol\"} 1"));
}

/// A request with both `content-length` and `transfer-encoding` (request
/// smuggling's raw material) is refused with 400 and never reaches the
/// backend.
#[tokio::test]
async fn content_length_with_transfer_encoding_gets_400() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(&routes_toml(&[backend.addr], ROUTES), &policy_toml(&[])).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /checkout/smuggle HTTP/1.1\r\nhost: k2.test\r\ncontent-length: 4\r\n\
transfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /checkout/inner HTTP/1.1\r\nhost: k2.test\r\n\r\n",
    )
    .await
    .unwrap();
    let (text, _) = read_to_close(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 400"), "answered {text:?}");
    let seen = backend.seen();
    assert!(
        seen.iter()
            .all(|s| !s.path.starts_with("/checkout/smuggle") && s.path != "/checkout/inner"),
        "reached the backend: {:?}",
        seen.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
}

/// A client that stalls mid-upload is cut off after `header_timeout` of
/// silence, and that counts against the client, not the backend: no
/// upstream error, no ejection, no timeout sample for the limit.
#[tokio::test]
async fn a_stalled_upload_is_cut_off_and_not_held_against_the_backend() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(&[backend.addr], "header_timeout = \"1s\""),
        &policy_toml(&[]),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /checkout/stall HTTP/1.1\r\nhost: k2.test\r\ncontent-length: 10000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'x'; 100]).await.unwrap();
    let start = Instant::now();
    let (_, at) = read_to_close(&mut s).await;
    let took = at - start;
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "a stalled upload was held {took:?}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(&m, "k2_upstream_errors_total"),
        0.0,
        "the client's stall counted against the backend:\n{}",
        m.lines()
            .filter(|l| l.starts_with("k2_upstream_errors_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let st = proxy.status().await;
    assert_eq!(st["clusters"][0]["sites"][0]["backends"][0]["health"], "up");
}

/// Client faults are not counted against backends, but a backend's own
/// are: one that hangs is still ejected after consecutive timeouts.
#[tokio::test]
async fn a_hung_backend_is_still_ejected() {
    let good = Backend::start("good").await;
    let hung = health_checks_only(Otherwise::Hang).await;
    let routes = routes_toml(&[hung, good.addr], ROUTES)
        .replacen(
            "connect_timeout = \"300ms\"",
            "connect_timeout = \"300ms\"\noutlier = { consecutive_failures = 3, max_ejected_share = 0.5 }",
            1,
        )
        .replacen("max_body = 1000", "max_body = 1000\ntimeout = \"200ms\"", 1);
    let proxy = Proxy::start(&routes, &policy_toml(&[])).await;
    let c = client();
    for i in 0..10 {
        let _ = c.get(proxy.url(&format!("/upload/{i}"))).send().await;
    }
    let st = proxy.status().await;
    let backends = &st["clusters"][0]["sites"][0]["backends"];
    let health = |addr: SocketAddr| {
        backends
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["addr"] == addr.to_string())
            .map(|b| b["health"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(health(hung).as_deref(), Some("ejected"), "{backends}");
    assert_eq!(health(good.addr).as_deref(), Some("up"), "{backends}");
}

/// A request that outlives `idle_timeout` is not cut by it: the timeout is
/// for connections with no request in progress.
#[tokio::test]
async fn a_busy_keepalive_connection_outlives_idle_timeout() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(&[backend.addr], "idle_timeout = \"1s\""),
        &policy_toml(&[]),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let r = get(&mut s, "/checkout/slow/2500").await.expect("answered");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = get(&mut s, "/checkout/next").await.expect("still open");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// A client connection closes after its `keepalive_requests`-th answer
/// (which says `connection: close`), and after an answer once it is
/// `keepalive_time` old: behind an L4 balancer, which places connections,
/// clients come back through it, to a restarted instance too.
#[tokio::test]
async fn a_connection_closes_once_it_has_served_its_keepalive() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(
            &[backend.addr],
            "keepalive_requests = 3\nkeepalive_time = \"1s\"",
        ),
        &policy_toml(&[]),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for i in 1..=2 {
        let r = get(&mut s, &format!("/checkout/{i}"))
            .await
            .expect("answered");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(!r.to_ascii_lowercase().contains("connection: close"), "{r}");
    }
    let r = get(&mut s, "/checkout/3").await.expect("answered");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    let (rest, _) = read_to_close(&mut s).await;
    assert_eq!(rest, "", "closed after the third answer");
    // Age: the first answer keeps it, one after a second closes it.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let r = get(&mut s, "/checkout/young").await.expect("answered");
    assert!(!r.to_ascii_lowercase().contains("connection: close"), "{r}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(&mut s, "/checkout/old").await.expect("answered");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    let (rest, _) = read_to_close(&mut s).await;
    assert_eq!(rest, "");
}

/// The idle wait between requests and the head's deadline share one timer:
/// an idle time longer than `header_timeout` outlasts the deadline the
/// last head armed (the connection still serves), and the connection then
/// closes quietly, with no 408, once `idle_timeout` has passed.
#[tokio::test]
async fn an_idle_time_longer_than_header_timeout_outlasts_the_heads_deadline() {
    let backend = Backend::start("b1").await;
    let proxy = Proxy::start(
        &with_server(
            &[backend.addr],
            "header_timeout = \"500ms\"\nidle_timeout = \"2s\"",
        ),
        &policy_toml(&[]),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let r = get(&mut s, "/checkout/first").await.expect("answered");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Three head deadlines' worth of idling, inside idle_timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = get(&mut s, "/checkout/second").await.expect("still open");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let idle_from = Instant::now();
    let (written, closed) = read_to_close(&mut s).await;
    let after = closed - idle_from;
    assert_eq!(written, "", "an idle connection is closed without a 408");
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_millis(3500),
        "closed {after:?} after the response, idle_timeout 2s"
    );
}

/// SIGTERM under 200 purchases/s: `/healthz` turns 503 draining within
/// 100 ms while the listener keeps serving for `drain_delay` (the load
/// stops within it, as a balancer that saw the health check would), a
/// request in flight finishes, no purchase fails, then the listener stops
/// and the process exits within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_without_failing_a_purchase() {
    let backend = Backend::start("b1").await;
    let mut proxy = Proxy::start(
        &with_server(&[backend.addr], "drain_delay = \"3s\""),
        &policy_toml(&[]),
    )
    .await;
    let c = client();
    let h = c.get(proxy.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/checkout/slow/2500"));
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    // 200 purchases/s for 2 s: from 0.5 s before SIGTERM to 1.5 s after it,
    // inside the 3 s drain delay.
    let load = tokio::spawn({
        let (c, base) = (c.clone(), proxy.url("/checkout/pay-"));
        async move {
            let mut sent = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let stop = Instant::now() + Duration::from_secs(2);
            let mut i = 0;
            while Instant::now() < stop {
                tick.tick().await;
                let (c, url) = (c.clone(), format!("{base}{i}"));
                i += 1;
                sent.push(tokio::spawn(async move {
                    c.post(url)
                        .body("pay")
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                }));
            }
            let mut statuses = Vec::new();
            for s in sent {
                statuses.push(s.await.unwrap());
            }
            statuses
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let term = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let flipped = loop {
        let h = c.get(proxy.admin_url("/healthz")).send().await.unwrap();
        if h.status() == 503 {
            let body: serde_json::Value = h.json().await.unwrap();
            assert_eq!(body["status"], "draining");
            break term.elapsed();
        }
        assert!(
            term.elapsed() < Duration::from_secs(2),
            "/healthz never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        flipped < Duration::from_millis(100),
        "/healthz turned 503 after {flipped:?}"
    );
    assert_eq!(proxy.status().await["draining"], true);
    assert!(proxy.metrics().await.contains("k2_draining 1"));
    let r = client()
        .get(proxy.url("/checkout/during-drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "not serving during the drain delay");
    assert_eq!(
        r.headers().get("connection").and_then(|v| v.to_str().ok()),
        Some("close")
    );
    let statuses = load.await.unwrap();
    let failed: Vec<_> = statuses.iter().filter(|s| !matches!(s, Ok(200))).collect();
    assert!(
        failed.is_empty(),
        "{} of 400 purchases failed: {failed:?}",
        failed.len()
    );
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request was cut"
    );
    // After the delay the listener stops, then the process exits.
    let deadline = term + Duration::from_secs(8);
    loop {
        if TcpStream::connect(proxy.addr).await.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still accepting 8 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = term.elapsed();
    assert!(
        stopped >= Duration::from_millis(2800),
        "stopped accepting {stopped:?} after SIGTERM, before drain_delay"
    );
    // drain_delay (3 s) + grace period (5 s) + runtime shutdown.
    let exited = proxy.exited_within(Duration::from_secs(12)).await;
    assert!(
        exited.is_some(),
        "still running 12 s after the listener stopped"
    );
    eprintln!(
        "drain: {} purchases, none failed; /healthz 503 after {flipped:?}; listener closed after {stopped:?}; exited {:?} after SIGTERM",
        statuses.len(),
        term.elapsed()
    );
}
