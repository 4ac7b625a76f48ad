//! Request → (route, tier): the first route whose match fits wins.
//!
//! Matching runs on every request, so it only compares borrowed bytes against
//! a table built once per config: no allocation, no regex, no lowercase copy.
//! `proxy/benches/classify.rs` measures it and `tests/classify_alloc.rs`
//! proves it does not allocate.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::{Method, Uri};

use crate::xmlrpc::MethodPattern;

/// Index of a tier in the policy's `tiers`, 0 being the highest priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TierId(pub u8);

/// Index of a cluster in [`crate::config::Config::clusters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterId(pub u16);

/// One `[[routes]]` entry, checked.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    pub tier: TierId,
    pub cluster: ClusterId,
    /// Time allowed for the backend's response once the request was sent.
    pub timeout: Duration,
    /// A request with the idempotency header may be retried after sending.
    pub retry_with_idempotency_key: bool,
    /// How the body is read when the match needs an XML-RPC method.
    pub inspect: Option<Inspect>,
    /// Largest request body, bytes: a larger one (declared or streamed) is
    /// answered 413.
    pub max_body: u64,
}

/// Reading the body for an XML-RPC method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspect {
    /// Most bytes read (≤ 64 KiB: what can be forwarded byte for byte).
    pub limit: usize,
    pub timeout: Duration,
    /// A body with no usable method is refused (400) instead of trying the next route.
    pub reject_bad: bool,
}

impl Default for Inspect {
    /// The defaults of `inspect_limit`, `inspect_timeout` and `on_bad_body`.
    fn default() -> Inspect {
        Inspect {
            limit: 65_536,
            timeout: Duration::from_secs(1),
            reject_bad: false,
        }
    }
}

/// What is known of the body when classifying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyView<'a> {
    /// Not read: a route that needs it stops classification.
    Unread,
    Method(&'a str),
    /// Read, with no usable method: routes that need one do not match.
    Unusable,
}

/// The answer of [`RouteTable::classify_body`].
#[derive(Debug, Clone, Copy)]
pub enum Classification<'t> {
    Route(usize, &'t Route),
    /// Route `.0` fits but for its XML-RPC method: read the body, classify again.
    NeedsBody(usize),
    NoRoute,
}

/// Host pattern: exact, or `*.suffix` for any subdomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// Stored with its leading dot: `*.shop.example` keeps `.shop.example`.
    Suffix(String),
}

/// How a route's path is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// A header that must be present, optionally with an exact value.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: Option<HeaderValue>,
}

/// Every given condition must hold; none given matches everything.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    /// Empty means any method.
    pub methods: Vec<Method>,
    pub header: Option<HeaderMatch>,
    /// XML-RPC methods (from the body); empty: not looked at.
    pub xmlrpc: Vec<MethodPattern>,
}

/// The parts of a request that classification looks at, all borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// Host without port: the `Host` header, else the URI's authority.
    fn host(&self) -> Option<&'a str> {
        let raw = match self.headers.get(HOST) {
            Some(v) => v.to_str().ok()?,
            None => self.uri.host()?,
        };
        Some(strip_port(raw))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop a port after them.
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

impl Matcher {
    /// Whether a request fits every condition of this matcher.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches_with(req, &mut None)
    }

    /// As [`Matcher::matches`], with the request's host resolved at most once
    /// across a whole table walk (`req_host` caches it).
    fn matches_with<'r>(
        &self,
        req: &RequestView<'r>,
        req_host: &mut Option<Option<&'r str>>,
    ) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return false;
        }
        if let Some(path) = &self.path {
            let p = req.uri.path();
            let ok = match path {
                PathMatch::Exact(want) => p == want,
                PathMatch::Prefix(want) => p.starts_with(want.as_str()),
            };
            if !ok {
                return false;
            }
        }
        if let Some(host) = &self.host {
            let Some(h) = *req_host.get_or_insert_with(|| req.host()) else {
                return false;
            };
            let ok = match host {
                HostMatch::Exact(want) => h.eq_ignore_ascii_case(want),
                HostMatch::Suffix(suffix) => {
                    h.len() > suffix.len()
                        && h.is_char_boundary(h.len() - suffix.len())
                        && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                }
            };
            if !ok {
                return false;
            }
        }
        if let Some(header) = &self.header {
            let ok = match (req.headers.get(&header.name), &header.value) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(got), Some(want)) => got.as_bytes() == want.as_bytes(),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// The ordered route table of one config.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        RouteTable { routes }
    }

    /// The first route that fits, knowing `body`; a route that fits but for
    /// an XML-RPC method not yet read answers `NeedsBody`.
    pub fn classify_body(&self, req: &RequestView<'_>, body: BodyView<'_>) -> Classification<'_> {
        let mut host = None;
        for (i, r) in self.routes.iter().enumerate() {
            if !r.matcher.matches_with(req, &mut host) {
                continue;
            }
            if r.matcher.xmlrpc.is_empty() {
                return Classification::Route(i, r);
            }
            match body {
                BodyView::Unread => return Classification::NeedsBody(i),
                BodyView::Method(m) if r.matcher.xmlrpc.iter().any(|p| p.matches(m)) => {
                    return Classification::Route(i, r)
                }
                _ => {}
            }
        }
        Classification::NoRoute
    }

    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, matcher: Matcher) -> Route {
        Route {
            name: name.into(),
            matcher,
            tier: TierId(0),
            cluster: ClusterId(0),
            timeout: Duration::from_secs(1),
            retry_with_idempotency_key: false,
            inspect: None,
            max_body: 10 << 20,
        }
    }

    fn classify<'t>(
        table: &'t RouteTable,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<&'t str> {
        let method: Method = method.parse().unwrap();
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let view = RequestView {
            method: &method,
            uri: &uri,
            headers: &map,
        };
        match table.classify_body(&view, BodyView::Unread) {
            Classification::Route(_, r) => Some(r.name.as_str()),
            _ => None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route(
                "admin-host",
                Matcher {
                    host: Some(HostMatch::Exact("admin.k2.test".into())),
                    ..Default::default()
                },
            ),
            route(
                "shop-subdomains",
                Matcher {
                    host: Some(HostMatch::Suffix(".shops.test".into())),
                    path: Some(PathMatch::Prefix("/pay/".into())),
                    ..Default::default()
                },
            ),
            route(
                "status-exact",
                Matcher {
                    path: Some(PathMatch::Exact("/status".into())),
                    ..Default::default()
                },
            ),
            route(
                "checkout-post",
                Matcher {
                    path: Some(PathMatch::Prefix("/checkout/".into())),
                    methods: vec![Method::POST, Method::PUT],
                    ..Default::default()
                },
            ),
            route(
                "checkout-any",
                Matcher {
                    path: Some(PathMatch::Prefix("/checkout/".into())),
                    ..Default::default()
                },
            ),
            route(
                "merchant-header-value",
                Matcher {
                    header: Some(HeaderMatch {
                        name: HeaderName::from_static("x-client"),
                        value: Some(HeaderValue::from_static("merchant")),
                    }),
                    ..Default::default()
                },
            ),
            route(
                "api-key-present",
                Matcher {
                    header: Some(HeaderMatch {
                        name: HeaderName::from_static("x-api-key"),
                        value: None,
                    }),
                    ..Default::default()
                },
            ),
        ])
    }

    #[test]
    fn host_match_is_exact_case_insensitive_and_ignores_port() {
        let t = table();
        assert_eq!(
            classify(&t, "GET", "/x", &[("host", "ADMIN.k2.test:8080")]),
            Some("admin-host")
        );
        assert_eq!(
            classify(&t, "GET", "/x", &[("host", "xadmin.k2.test")]),
            None
        );
        assert_eq!(
            classify(&t, "GET", "http://admin.k2.test/x", &[]),
            Some("admin-host"),
            "absolute-form URI supplies the host"
        );
    }

    #[test]
    fn wildcard_host_matches_subdomains_only() {
        let t = table();
        let h = [("host", "acme.shops.test")];
        assert_eq!(classify(&t, "GET", "/pay/1", &h), Some("shop-subdomains"));
        assert_eq!(
            classify(&t, "GET", "/pay/1", &[("host", "shops.test")]),
            None
        );
        assert_eq!(
            classify(&t, "GET", "/other", &h),
            None,
            "path must also hold"
        );
    }

    #[test]
    fn exact_path_does_not_match_longer_paths() {
        let t = table();
        assert_eq!(classify(&t, "GET", "/status", &[]), Some("status-exact"));
        assert_eq!(classify(&t, "GET", "/status/x", &[]), None);
        assert_eq!(
            classify(&t, "GET", "/status?full=1", &[]),
            Some("status-exact")
        );
    }

    #[test]
    fn methods_restrict_and_first_match_wins() {
        let t = table();
        assert_eq!(
            classify(&t, "POST", "/checkout/1", &[]),
            Some("checkout-post")
        );
        assert_eq!(
            classify(&t, "PUT", "/checkout/1", &[]),
            Some("checkout-post")
        );
        assert_eq!(
            classify(&t, "GET", "/checkout/1", &[]),
            Some("checkout-any")
        );
        // Both the status route and the header route fit: the earlier wins.
        assert_eq!(
            classify(&t, "GET", "/status", &[("x-client", "merchant")]),
            Some("status-exact")
        );
    }

    #[test]
    fn header_presence_and_value() {
        let t = table();
        assert_eq!(
            classify(&t, "GET", "/api", &[("x-client", "merchant")]),
            Some("merchant-header-value")
        );
        assert_eq!(classify(&t, "GET", "/api", &[("x-client", "admin")]), None);
        assert_eq!(
            classify(&t, "GET", "/api", &[("X-Api-Key", "")]),
            Some("api-key-present")
        );
        assert_eq!(classify(&t, "GET", "/api", &[]), None);
    }

    #[test]
    fn strip_port_handles_ipv6_and_plain_hosts() {
        assert_eq!(strip_port("a.test:80"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
