//! Classification must not allocate: a counting global allocator proves it
//! across matches, misses, host, header and method routes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::Method;
use proxy::classify::*;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Only this test's own thread counts: the test harness's main thread
    /// may still be allocating as the test starts (4 allocations, once in
    /// CI).
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; this
// wrapper only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // `try_with`: the thread-local may be gone while a thread exits.
        if COUNTING.try_with(|c| c.get()).unwrap_or(false) {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn classify_does_not_allocate() {
    let route = |name: &str, matcher: Matcher| Route {
        name: name.into(),
        matcher,
        tier: TierId(0),
        cluster: ClusterId(0),
        timeout: Duration::from_secs(1),
        retry_with_idempotency_key: false,
        inspect: None,
        max_body: 10 << 20,
    };
    let table = RouteTable::new(vec![
        route(
            "host",
            Matcher {
                host: Some(HostMatch::Suffix(".shops.test".into())),
                ..Default::default()
            },
        ),
        route(
            "header",
            Matcher {
                path: Some(PathMatch::Prefix("/api/".into())),
                methods: vec![Method::POST],
                header: Some(HeaderMatch {
                    name: HeaderName::from_static("x-merchant-id"),
                    value: Some(HeaderValue::from_static("m-1")),
                }),
                ..Default::default()
            },
        ),
        route(
            "exact",
            Matcher {
                path: Some(PathMatch::Exact("/status".into())),
                ..Default::default()
            },
        ),
    ]);
    let mut headers = HeaderMap::new();
    headers.insert(HOST, HeaderValue::from_static("API.example.test:8443"));
    headers.insert("x-merchant-id", HeaderValue::from_static("m-1"));
    let uris: Vec<http::Uri> = ["/api/pay", "/status", "/nothing", "http://a.shops.test/x"]
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
    let methods = [Method::POST, Method::GET];

    COUNTING.with(|c| c.set(true));
    let before = ALLOCS.load(Ordering::SeqCst);
    let mut hits = 0;
    for _ in 0..1000 {
        for uri in &uris {
            for method in &methods {
                let view = RequestView {
                    method,
                    uri,
                    headers: &headers,
                };
                let found = table.classify_body(&view, BodyView::Unread);
                hits += matches!(found, Classification::Route(..)) as usize;
            }
        }
    }
    let allocs = ALLOCS.load(Ordering::SeqCst) - before;
    COUNTING.with(|c| c.set(false));
    assert_eq!(allocs, 0, "classification allocated {allocs} times");
    // /api/pay POST, /status x2 per round; the Host header wins over the URI's.
    assert_eq!(hits, 3000);
}
