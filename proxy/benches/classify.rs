//! Classification cost on a 50-route table: ns per request for an early
//! match, a late match, a host match and a miss (the worst case: all 50
//! routes tried). `cargo bench -p proxy --bench classify`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::{Method, Uri};
use proxy::classify::*;

/// 50 routes of mixed kinds, the kind a large merchant estate would have.
pub fn table_50() -> RouteTable {
    let mut routes = Vec::new();
    for i in 0..50 {
        let matcher = match i % 5 {
            0 => Matcher {
                path: Some(PathMatch::Prefix(format!("/svc{i}/"))),
                ..Default::default()
            },
            1 => Matcher {
                path: Some(PathMatch::Exact(format!("/svc{i}/status"))),
                methods: vec![Method::GET, Method::HEAD],
                ..Default::default()
            },
            2 => Matcher {
                host: Some(HostMatch::Exact(format!("shop{i}.k2.test"))),
                ..Default::default()
            },
            3 => Matcher {
                host: Some(HostMatch::Suffix(format!(".tenant{i}.k2.test"))),
                path: Some(PathMatch::Prefix("/api/".into())),
                ..Default::default()
            },
            _ => Matcher {
                path: Some(PathMatch::Prefix(format!("/svc{i}/"))),
                header: Some(HeaderMatch {
                    name: HeaderName::from_static("x-merchant-id"),
                    value: Some(HeaderValue::from_static("m-42")),
                }),
                ..Default::default()
            },
        };
        routes.push(Route {
            name: format!("route-{i}"),
            matcher,
            tier: TierId((i % 5) as u8),
            cluster: ClusterId(0),
            timeout: Duration::from_secs(10),
            retry_with_idempotency_key: false,
            inspect: None,
            max_body: 10 << 20,
        });
    }
    RouteTable::new(routes)
}

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

fn req(method: Method, uri: &str, host: &str) -> Req {
    let mut headers = HeaderMap::new();
    headers.insert(HOST, HeaderValue::from_str(host).unwrap());
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert("x-merchant-id", HeaderValue::from_static("m-42"));
    Req {
        method,
        uri: uri.parse().unwrap(),
        headers,
    }
}

fn bench(c: &mut Criterion) {
    let table = table_50();
    let cases = [
        ("first_route", req(Method::POST, "/svc0/pay", "api.k2.test")),
        (
            "route_25_host",
            req(Method::GET, "/", "shop22.k2.test:8080"),
        ),
        (
            "route_49_header",
            req(Method::POST, "/svc49/x", "api.k2.test"),
        ),
        (
            "no_match_all_50",
            req(Method::GET, "/nothing/here", "api.k2.test"),
        ),
    ];
    let mut group = c.benchmark_group("classify_50_routes");
    for (name, r) in &cases {
        let view = RequestView {
            method: &r.method,
            uri: &r.uri,
            headers: &r.headers,
        };
        group.bench_function(*name, |b| {
            b.iter(|| {
                black_box(
                    match table.classify_body(black_box(&view), BodyView::Unread) {
                        Classification::Route(i, _) => Some(i),
                        _ => None,
                    },
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
