//! Every response k2proxy writes itself, per the wire contract, and the
//! outcome label each request is counted under.
//!
//! A [`Reply`] is what a stage returns instead of going on; its status,
//! headers and JSON body are written here and nowhere else.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use serde_json::json;

use crate::admission::ShedReason;
use crate::classify::TierId;
use crate::config::Config;
use crate::xmlrpc::BadBody;

pub const X_K2_SHED: HeaderName = HeaderName::from_static("x-k2-shed");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What became of a request: the `outcome` label of `k2_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still in progress, or failed before an outcome was set (counted as
    /// `error`).
    Pending,
    Proxied,
    Shed(ShedReason),
    RateLimited,
    NoRoute,
    Error,
}

impl Outcome {
    pub const COUNT: usize = 5;
    /// The label values, in [`Outcome::index`] order.
    pub const LABELS: [&'static str; Outcome::COUNT] =
        ["proxied", "shed", "rate_limited", "no_route", "error"];

    /// Its index in [`Outcome::LABELS`].
    pub fn index(self) -> usize {
        match self {
            Outcome::Proxied => 0,
            Outcome::Shed(_) => 1,
            Outcome::RateLimited => 2,
            Outcome::NoRoute => 3,
            Outcome::Pending | Outcome::Error => 4,
        }
    }

    pub fn label(self) -> &'static str {
        Outcome::LABELS[self.index()]
    }

    /// `x-k2-shed` of a refused request, for the access log.
    pub fn shed_reason(self) -> Option<&'static str> {
        match self {
            Outcome::Shed(r) => Some(r.as_str()),
            Outcome::RateLimited => Some("rate_limited"),
            _ => None,
        }
    }
}

/// Why a request failed on its way to or from a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backend's own status, as pingora reports it.
    Status(u16),
    ConnectTimeout,
    /// The backend did not answer (or take the body) within the route's timeout.
    Timeout,
    Connect,
    Upstream,
    /// The client went away: nothing can be written.
    Downstream,
    Internal,
}

impl Failure {
    /// The `kind` field of the error body.
    pub fn kind(self) -> &'static str {
        match self {
            Failure::Status(_) => "status",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::Timeout => "timeout",
            Failure::Connect => "connect",
            Failure::Upstream => "upstream",
            Failure::Downstream => "downstream",
            Failure::Internal => "internal",
        }
    }

    /// The status answered to the client (0: none can be written).
    pub fn status(self) -> u16 {
        match self {
            Failure::Status(code) => code,
            Failure::ConnectTimeout | Failure::Timeout => 504,
            Failure::Connect | Failure::Upstream => 502,
            Failure::Downstream => 0,
            Failure::Internal => 500,
        }
    }

    /// A timeout: the backend is past its knee.
    pub fn is_congestion(self) -> bool {
        matches!(self, Failure::ConnectTimeout | Failure::Timeout)
    }
}

/// A response k2proxy gives itself instead of (or after failing at) proxying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// 404: no route matches.
    NoRoute,
    /// 400: the XML-RPC body could not be read (`on_bad_body = "reject"`).
    BadBody(BadBody),
    /// 413: more body was read for inspection than can be replayed.
    TooLargeToInspect,
    /// 431: the request head is larger than `[server].max_header_bytes`.
    HeadersTooLarge { limit: usize },
    /// 413: the body (declared or streamed) is larger than the route's `max_body`.
    BodyTooLarge { limit: u64 },
    /// 400: both `content-length` and `transfer-encoding` (the two could
    /// frame the body differently here and at the backend: smuggling).
    AmbiguousLength,
    /// 429: over a `[[rate_limit]]`.
    RateLimited { tier: TierId, retry_after_s: u64 },
    /// The tier's shed status (503 by default): never sent upstream.
    Shed { tier: TierId, reason: ShedReason },
    /// 502/504/500 after trying the backend.
    Failed {
        failure: Failure,
        route: Option<usize>,
    },
}

/// A reply made concrete: status, extra headers, JSON body.
#[derive(Debug)]
pub struct Rendered {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: String,
}

impl Reply {
    /// The outcome the request is counted under.
    pub fn outcome(self) -> Outcome {
        match self {
            Reply::NoRoute => Outcome::NoRoute,
            Reply::BadBody(_)
            | Reply::TooLargeToInspect
            | Reply::HeadersTooLarge { .. }
            | Reply::BodyTooLarge { .. }
            | Reply::AmbiguousLength
            | Reply::Failed { .. } => Outcome::Error,
            Reply::RateLimited { .. } => Outcome::RateLimited,
            Reply::Shed { reason, .. } => Outcome::Shed(reason),
        }
    }

    /// The status code the reply is written with.
    pub fn status(self, config: &Config) -> u16 {
        match self {
            Reply::NoRoute => 404,
            Reply::BadBody(_) | Reply::AmbiguousLength => 400,
            Reply::TooLargeToInspect | Reply::BodyTooLarge { .. } => 413,
            Reply::HeadersTooLarge { .. } => 431,
            Reply::RateLimited { .. } => 429,
            Reply::Shed { tier, .. } => config.tier(tier).shed_status,
            // A client that left gets nothing; if written at all, 502.
            Reply::Failed { failure, .. } => match failure.status() {
                0 => 502,
                s => s,
            },
        }
    }

    /// `k2_shed_total{tier,reason}`'s labels, for a refusal.
    pub fn shed_labels(self, config: &Config) -> Option<(&str, &'static str)> {
        match self {
            Reply::RateLimited { tier, .. } => Some((&config.tier(tier).name, "rate_limited")),
            Reply::Shed { tier, reason } => Some((&config.tier(tier).name, reason.as_str())),
            _ => None,
        }
    }

    /// Whether the client's connection is closed after this reply: after a
    /// body that may not have been read whole, or an upstream failure.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Reply::BadBody(_)
                | Reply::TooLargeToInspect
                | Reply::HeadersTooLarge { .. }
                | Reply::BodyTooLarge { .. }
                | Reply::AmbiguousLength
                | Reply::Failed { .. }
        )
    }

    /// Status, headers and body, with names from `config`.
    pub fn render(self, config: &Config, req: &RequestInfo<'_>) -> Rendered {
        let mut headers = Vec::with_capacity(3);
        let status = self.status(config);
        let body = match self {
            Reply::NoRoute => json!({
                "error": "no_route",
                "message": "no route matches this request",
                "method": req.method,
                "path": req.path,
            }),
            Reply::BadBody(bad) => bad_body(bad.as_str(), "bad_request"),
            Reply::TooLargeToInspect => bad_body("body_too_large_to_inspect", "payload_too_large"),
            Reply::HeadersTooLarge { limit } => json!({
                "error": "request_header_fields_too_large",
                "message": "the request line and headers are larger than this proxy accepts",
                "limit_bytes": limit,
            }),
            Reply::AmbiguousLength => json!({
                "error": "bad_request",
                "reason": "content_length_with_transfer_encoding",
                "message": "a request may declare content-length or transfer-encoding, not both",
            }),
            Reply::BodyTooLarge { limit } => json!({
                "error": "payload_too_large",
                "message": "the request body is larger than this route accepts",
                "limit_bytes": limit,
            }),
            Reply::RateLimited {
                tier,
                retry_after_s,
            } => {
                refusal_headers(&mut headers, "rate_limited", retry_after_s);
                refusal("rate_limited", config, tier, "rate_limited", retry_after_s)
            }
            Reply::Shed { tier, reason } => {
                let retry_after_s = config.shedding.retry_after_s;
                refusal_headers(&mut headers, reason.as_str(), retry_after_s);
                refusal("overloaded", config, tier, reason.as_str(), retry_after_s)
            }
            Reply::Failed { failure, route } => {
                let error = match status {
                    504 => "gateway_timeout",
                    502 => "bad_gateway",
                    400 => "bad_request",
                    _ => "internal_error",
                };
                let route = route.and_then(|r| config.routes.get(r));
                json!({
                    "error": error,
                    "kind": failure.kind(),
                    "route": route.map_or("none", |r| r.name.as_str()),
                    "request_id": req.request_id.and_then(|v| v.to_str().ok()),
                })
            }
        };
        if let Some(rid) = req.request_id {
            headers.push((X_REQUEST_ID, rid.clone()));
        }
        Rendered {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// Writes the reply as the whole response.
    pub async fn write(
        self,
        session: &mut Session,
        config: &Config,
        request_id: Option<&HeaderValue>,
    ) -> Result<()> {
        if self.closes_connection() {
            session.set_keepalive(None);
        }
        let req = session.req_header();
        let info = RequestInfo {
            method: req.method.as_str(),
            path: req.uri.path(),
            request_id,
        };
        let r = self.render(config, &info);
        let mut resp = ResponseHeader::build(r.status, Some(3 + r.headers.len()))?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, r.body.len())?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        for (k, v) in r.headers {
            resp.insert_header(k, v)?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(r.body)), true)
            .await
    }
}

/// What a reply quotes of the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub request_id: Option<&'a HeaderValue>,
}

fn bad_body(reason: &str, error: &str) -> serde_json::Value {
    json!({
        "error": error,
        "reason": reason,
        "message": "the XML-RPC methodName could not be read from the request body",
    })
}

/// The wire contract's body of a shed or rate-limited request.
fn refusal(
    error: &str,
    config: &Config,
    tier: TierId,
    reason: &str,
    retry_after_s: u64,
) -> serde_json::Value {
    json!({
        "error": error,
        "tier": config.tier(tier).name,
        "reason": reason,
        "retry_after_s": retry_after_s,
    })
}

fn refusal_headers(h: &mut Vec<(HeaderName, HeaderValue)>, reason: &'static str, retry_after: u64) {
    h.push((http::header::RETRY_AFTER, HeaderValue::from(retry_after)));
    h.push((X_K2_SHED, HeaderValue::from_static(reason)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_sources, SourceFile};

    fn config() -> Config {
        let routes = r#"[server]
listen = ["127.0.0.1:1"]
[clusters.kred]
[[clusters.kred.sites]]
name = "skondal"
role = "primary"
backends = ["127.0.0.1:2"]
[[routes]]
name = "checkout"
match = {}
tier = "purchase"
cluster = "kred"
"#;
        let policy = "tiers = [\"purchase\", \"cs\"]\n[tier.cs]\nshed_status = 529\n[shedding]\nretry_after = \"7s\"\n";
        let src = |path: &str, text: &str| SourceFile {
            path: path.into(),
            text: text.into(),
        };
        load_sources(&src("routes.toml", routes), &src("policy.toml", policy)).unwrap()
    }

    fn render(reply: Reply) -> (u16, Vec<(String, String)>, serde_json::Value) {
        let rid = HeaderValue::from_static("abc");
        let info = RequestInfo {
            method: "POST",
            path: "/pay",
            request_id: Some(&rid),
        };
        let r = reply.render(&config(), &info);
        let headers = r
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        (r.status, headers, serde_json::from_str(&r.body).unwrap())
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_shed_reply_uses_the_tiers_status_and_the_policys_retry_after() {
        let (status, h, body) = render(Reply::Shed {
            tier: TierId(1),
            reason: ShedReason::ShedLevel,
        });
        assert_eq!(status, 529);
        assert_eq!(header(&h, "retry-after"), Some("7"));
        assert_eq!(header(&h, "x-k2-shed"), Some("shed_level"));
        assert_eq!(header(&h, "x-request-id"), Some("abc"));
        assert_eq!(
            body,
            json!({"error": "overloaded", "tier": "cs", "reason": "shed_level", "retry_after_s": 7})
        );
    }

    #[test]
    fn a_rate_limited_reply_is_429_with_its_own_wait() {
        let (status, h, body) = render(Reply::RateLimited {
            tier: TierId(0),
            retry_after_s: 2,
        });
        assert_eq!(status, 429);
        assert_eq!(header(&h, "retry-after"), Some("2"));
        assert_eq!(header(&h, "x-k2-shed"), Some("rate_limited"));
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["tier"], "purchase");
    }

    #[test]
    fn no_route_bad_body_and_failures_say_what_happened() {
        let (status, h, body) = render(Reply::NoRoute);
        assert_eq!((status, body["error"].as_str()), (404, Some("no_route")));
        assert_eq!(
            (body["method"].as_str(), body["path"].as_str()),
            (Some("POST"), Some("/pay"))
        );
        assert_eq!(header(&h, "retry-after"), None);

        let (status, _, body) = render(Reply::BadBody(BadBody::Malformed));
        assert_eq!(
            (status, body["reason"].as_str()),
            (400, Some(BadBody::Malformed.as_str()))
        );
        let (status, _, body) = render(Reply::HeadersTooLarge { limit: 100 });
        assert_eq!((status, body["limit_bytes"].as_u64()), (431, Some(100)));
        assert!(Reply::HeadersTooLarge { limit: 100 }.closes_connection());
        let (status, _, body) = render(Reply::BodyTooLarge { limit: 7 });
        assert_eq!(
            (status, body["error"].as_str(), body["limit_bytes"].as_u64()),
            (413, Some("payload_too_large"), Some(7))
        );
        assert!(Reply::BodyTooLarge { limit: 7 }.closes_connection());
        let (status, _, body) = render(Reply::TooLargeToInspect);
        assert_eq!(
            (status, body["error"].as_str()),
            (413, Some("payload_too_large"))
        );

        for (failure, status, error) in [
            (Failure::Timeout, 504, "gateway_timeout"),
            (Failure::ConnectTimeout, 504, "gateway_timeout"),
            (Failure::Connect, 502, "bad_gateway"),
            (Failure::Upstream, 502, "bad_gateway"),
            (Failure::Downstream, 502, "bad_gateway"),
            (Failure::Internal, 500, "internal_error"),
            (Failure::Status(400), 400, "bad_request"),
        ] {
            let (s, _, body) = render(Reply::Failed {
                failure,
                route: Some(0),
            });
            assert_eq!(
                (s, body["error"].as_str()),
                (status, Some(error)),
                "{failure:?}"
            );
            assert_eq!(body["kind"], failure.kind());
            assert_eq!(body["route"], "checkout");
            assert_eq!(body["request_id"], "abc");
        }
    }

    #[test]
    fn outcomes_own_their_labels() {
        assert_eq!(Outcome::Proxied.label(), "proxied");
        assert_eq!(Outcome::Shed(ShedReason::Forced).label(), "shed");
        assert_eq!(Outcome::RateLimited.label(), "rate_limited");
        assert_eq!(Outcome::NoRoute.label(), "no_route");
        assert_eq!(Outcome::Error.label(), "error");
        assert_eq!(Outcome::Pending.label(), "error");
        assert_eq!(Reply::NoRoute.outcome(), Outcome::NoRoute);
        assert_eq!(
            Reply::Shed {
                tier: TierId(0),
                reason: ShedReason::QueueTimeout
            }
            .outcome(),
            Outcome::Shed(ShedReason::QueueTimeout)
        );
    }
}
