//! `impl ProxyHttp`: the life of one request, calling the stages in order.
//!
//! request_filter: snapshot → classify (404 JSON when nothing fits) → tier
//! (trusted `x-k2-tier` only) → request id. upstream_peer: the cluster's
//! choice of backend (503 `no_healthy_site` when none). upstream_request_filter:
//! `x-k2-tier`, `x-request-id`, `x-forwarded-for`. fail_to_proxy: JSON errors.
//! logging: metrics and one access-log event.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use crate::admission::{Permit, Sample, ShedReason};
use crate::classify::{BodyView, Classification, Inspect, RequestView, TierId};
use crate::config::{AdmissionMode, Snapshot};
use crate::metrics::{code_class, OUTCOMES};
use crate::xmlrpc::{method_name, xml_content_type, BadBody, Extract};
use crate::Shared;

/// The headers k2proxy adds to every request or response, parsed once:
/// pingora's case-keeping headers would parse (and, for a name it does not
/// know, copy) a `&str` or `HeaderName` on every insert.
mod name {
    use pingora::http::StaticHeaderName;
    pub const X_K2_TIER: StaticHeaderName = StaticHeaderName::from_static("x-k2-tier");
    pub const X_REQUEST_ID: StaticHeaderName = StaticHeaderName::from_static("x-request-id");
    pub const X_FORWARDED_FOR: StaticHeaderName = StaticHeaderName::from_static("x-forwarded-for");
}
pub const X_K2_TIER: HeaderName = HeaderName::from_static("x-k2-tier");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_K2_SHED: HeaderName = HeaderName::from_static("x-k2-shed");

/// Longest inbound `x-request-id` kept as is; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The proxy logic; one per process, shared by every request.
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    pub fn new(shared: Arc<Shared>) -> Self {
        Gateway { shared }
    }
}

/// What the request was, for the metrics and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Still in progress, or failed before an outcome was set.
    Pending,
    NoRoute,
    Proxied,
    Shed(&'static str),
    RateLimited,
    Error,
}

impl Outcome {
    /// Its index in [`OUTCOMES`], the `outcome` label.
    fn index(self) -> usize {
        match self {
            Outcome::Proxied => 0,
            Outcome::Shed(_) => 1,
            Outcome::RateLimited => 2,
            Outcome::NoRoute => 3,
            Outcome::Pending | Outcome::Error => 4,
        }
    }

    fn label(self) -> &'static str {
        OUTCOMES[self.index()]
    }
}

/// Per-request state shared across the filters.
pub struct Ctx {
    start: Instant,
    /// The config this request runs with from start to end, even across a reload.
    snapshot: Option<Arc<Snapshot>>,
    route: Option<usize>,
    tier: Option<TierId>,
    request_id: Option<HeaderValue>,
    /// The client's own `x-request-id` (already in the upstream request).
    request_id_kept: bool,
    upstream: Option<SocketAddr>,
    site: Option<usize>,
    upstream_status: Option<u16>,
    /// Connects that failed for this request (nothing was sent on them).
    connect_failures: usize,
    /// The admission permit; dropped with the context, whatever the path.
    permit: Option<Permit>,
    /// When the request was sent upstream, for the latency sample.
    upstream_sent: Option<Instant>,
    /// Backends this request was sent or tried to be sent to.
    tried: smallvec::SmallVec<[SocketAddr; 4]>,
    /// Sites whose backends were all tried.
    tried_sites: smallvec::SmallVec<[usize; 4]>,
    /// Counts the request at its backend (least-in-flight balancing).
    backend_guard: Option<failover::InflightGuard>,
    /// Admitted on another site's spare capacity.
    spilled: bool,
    /// The XML-RPC method when it matched a configured name, else why not.
    xmlrpc: Option<String>,
    outcome: Outcome,
}

impl Ctx {
    /// Whether a retry has somewhere to go: an untried backend in this site
    /// or another site that can take it.
    fn alternative(&self, now: Instant) -> bool {
        let (Some(cluster), Some(site)) = (self.cluster(), self.site) else {
            return false;
        };
        if cluster.sites.backend_in(site, now, &self.tried).is_some() {
            return true;
        }
        let mut exclude = self.tried_sites.clone();
        exclude.push(site);
        cluster
            .sites
            .choose_site(now, &exclude)
            .is_some_and(|other| cluster.sites.backend_in(other, now, &self.tried).is_some())
    }

    /// The cluster of the request's route.
    fn cluster(&self) -> Option<&crate::config::Cluster> {
        let snap = self.snapshot.as_ref()?;
        Some(snap.cluster(snap.routes.get(self.route?)?.cluster))
    }

    fn route_name(&self) -> &str {
        match (&self.snapshot, self.route) {
            (Some(s), Some(i)) => s.routes.get(i).map_or("none", |r| r.name.as_str()),
            _ => "none",
        }
    }

    fn tier_name(&self) -> &str {
        match (&self.snapshot, self.tier) {
            (Some(s), Some(t)) => s.tier(t).name.as_str(),
            _ => "none",
        }
    }

    fn site_name(&self) -> &str {
        match (&self.snapshot, self.route, self.site) {
            (Some(s), Some(r), Some(site)) => s
                .routes
                .get(r)
                .map(|r| s.cluster(r.cluster))
                .and_then(|c| c.sites.sites().get(site))
                .map_or("none", |s| s.name.as_str()),
            _ => "none",
        }
    }
}

/// A fresh 128-bit request id, as 32 lower-case hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for b in buf.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // One allocation that clones share (a copied slice would allocate again
    // on its first clone, and the id is cloned for upstream and response).
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
        .expect("hex digits are a valid header value")
}

/// `x-forwarded-for` with `ip` appended to what came in (`None` if what came
/// in is not a valid value).
fn forwarded_for(prev: Option<&HeaderValue>, ip: IpAddr) -> Option<HeaderValue> {
    let mut buf = [0u8; 48];
    let len = format_ip(&mut buf, ip);
    let ip = &buf[..len];
    match prev {
        Some(prev) if !prev.is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
        }
        _ => HeaderValue::from_bytes(ip).ok(),
    }
}

/// Writes `ip` as `Display` does, into `buf`; returns the length. IPv4 by
/// hand (the formatting machinery cost ~1 000 instructions per request).
fn format_ip(buf: &mut [u8; 48], ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            // "ffff:…" with an embedded IPv4 is the longest: 45 bytes.
            let mut at = &mut buf[..];
            write!(at, "{ip}").expect("an IP fits in 48 bytes");
            48 - at.len()
        }
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Reads up to `inspect.limit` body bytes within `inspect.timeout`, stopping
/// as soon as the XML-RPC method is known. The bytes stay in pingora's retry
/// buffer, which sends them upstream first, byte for byte, then the rest.
async fn inspect_body(session: &mut Session, inspect: &Inspect) -> Extract {
    let ct = session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes());
    if !xml_content_type(ct) {
        return Extract::Bad(BadBody::ContentType);
    }
    session.as_mut().enable_retry_buffering();
    let deadline = tokio::time::Instant::now() + inspect.timeout;
    let mut body = bytes::BytesMut::new();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Err(_) => return Extract::Bad(BadBody::Timeout),
            Ok(Err(_)) => return Extract::Bad(BadBody::Malformed),
            Ok(Ok(chunk)) => chunk,
        };
        let complete = chunk.is_none();
        if let Some(c) = chunk {
            body.extend_from_slice(&c);
        }
        if body.len() >= inspect.limit {
            return match method_name(&body[..inspect.limit], false) {
                Extract::NeedMore => Extract::Bad(BadBody::TooLarge),
                found => found,
            };
        }
        match method_name(&body, complete) {
            Extract::NeedMore if !complete => continue,
            Extract::NeedMore => return Extract::Bad(BadBody::NoMethodName),
            found => return found,
        }
    }
}

/// Writes a complete JSON response; used for every answer k2proxy gives itself.
async fn respond_json(
    session: &mut Session,
    status: u16,
    extra: &[(HeaderName, HeaderValue)],
    body: String,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    for (k, v) in extra {
        resp.insert_header(k.clone(), v.clone())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// Why k2proxy answers a request itself instead of sending it upstream.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Shed(ShedReason),
    RateLimited { retry_after_s: u64 },
}

impl Gateway {
    /// Refuses a request whose body cannot be classified or forwarded intact.
    async fn bad_request(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        status: u16,
        reason: &str,
    ) -> Result<bool> {
        session.set_keepalive(None);
        let body = serde_json::json!({
            "error": if status == 413 { "payload_too_large" } else { "bad_request" },
            "reason": reason,
            "message": "the XML-RPC methodName could not be read from the request body",
        })
        .to_string();
        let rid = ctx.request_id.clone().expect("set first");
        respond_json(session, status, &[(X_REQUEST_ID, rid)], body).await?;
        Ok(true)
    }

    /// Tells the cluster how the request fared at its backend (passive
    /// health); an ejection is logged.
    fn passive(&self, ctx: &Ctx, ok: bool, now: Instant) {
        let (Some(cluster), Some(site), Some(backend)) = (ctx.cluster(), ctx.site, ctx.upstream)
        else {
            return;
        };
        if cluster.sites.report(site, backend, ok, now) {
            tracing::warn!(cluster = %cluster.name, site = ctx.site_name(), %backend, "backend ejected after consecutive failures");
        }
    }

    /// Answers a shed request per the wire contract: the tier's status (503
    /// by default), `retry-after`, `x-k2-shed: <reason>` and a JSON body.
    /// Nothing reaches the backend.
    async fn shed(&self, session: &mut Session, ctx: &mut Ctx, reason: ShedReason) -> Result<()> {
        self.refuse(session, ctx, Refusal::Shed(reason)).await
    }

    /// Answers a refused request: shed (the tier's status, 503 by default)
    /// or rate limited (429), with `retry-after`, `x-k2-shed: <reason>` and
    /// the wire contract's JSON body.
    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, refusal: Refusal) -> Result<()> {
        let snap = ctx.snapshot.as_ref().expect("set before refusing");
        let (status, reason, retry_after) = match refusal {
            Refusal::Shed(r) => {
                ctx.outcome = Outcome::Shed(r.as_str());
                let status = ctx.tier.map_or(503, |t| snap.tier(t).shed_status);
                (status, r.as_str(), snap.shedding.retry_after_s)
            }
            Refusal::RateLimited { retry_after_s } => {
                ctx.outcome = Outcome::RateLimited;
                (429, "rate_limited", retry_after_s)
            }
        };
        self.shared
            .metrics
            .shed
            .with_label_values(&[ctx.tier_name(), reason])
            .inc();
        let error = match refusal {
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Shed(_) => "overloaded",
        };
        let body = serde_json::json!({
            "error": error,
            "tier": ctx.tier_name(),
            "reason": reason,
            "retry_after_s": retry_after,
        })
        .to_string();
        let mut extra = vec![
            (http::header::RETRY_AFTER, HeaderValue::from(retry_after)),
            (X_K2_SHED, HeaderValue::from_static(reason)),
        ];
        if let Some(rid) = &ctx.request_id {
            extra.push((X_REQUEST_ID, rid.clone()));
        }
        respond_json(session, status, &extra, body).await
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            snapshot: None,
            route: None,
            tier: None,
            request_id: None,
            request_id_kept: false,
            upstream: None,
            site: None,
            upstream_status: None,
            connect_failures: 0,
            permit: None,
            upstream_sent: None,
            tried: Default::default(),
            tried_sites: Default::default(),
            backend_guard: None,
            spilled: false,
            xmlrpc: None,
            outcome: Outcome::Pending,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snap = self.shared.config.load_full();
        let req = session.req_header();
        let view = RequestView {
            method: &req.method,
            uri: &req.uri,
            headers: &req.headers,
        };
        let first = match snap.routes.classify_body(&view, BodyView::Unread) {
            Classification::Route(i, r) => Ok(Some((i, r.tier))),
            Classification::NeedsBody(i) => Err(i),
            Classification::NoRoute => Ok(None),
        };
        let mut inbound = req.headers.get_all(X_REQUEST_ID).iter();
        ctx.request_id = match (inbound.next(), inbound.next()) {
            // One usable id: kept, and it goes upstream as it came.
            (Some(v), None) if !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN => {
                ctx.request_id_kept = true;
                Some(v.clone())
            }
            _ => Some(new_request_id()),
        };
        let classified = match first {
            Ok(c) => c,
            // A route needs the XML-RPC method: read the body, classify again.
            Err(i) => {
                let inspect = snap
                    .routes
                    .get(i)
                    .and_then(|r| r.inspect.clone())
                    .expect("needs body");
                let outcome = inspect_body(session, &inspect).await;
                if session.as_ref().retry_buffer_truncated() {
                    // More was read than can be replayed: forwarding would alter the body.
                    ctx.snapshot = Some(snap);
                    ctx.outcome = Outcome::Error;
                    return self
                        .bad_request(session, ctx, 413, "body_too_large_to_inspect")
                        .await;
                }
                let route_name = snap
                    .routes
                    .get(i)
                    .map_or("", |r| r.name.as_str())
                    .to_string();
                match &outcome {
                    Extract::Bad(bad) if inspect.reject_bad => {
                        self.shared
                            .metrics
                            .xmlrpc
                            .with_label_values(&[route_name.as_str(), bad.as_str()])
                            .inc();
                        ctx.snapshot = Some(snap);
                        ctx.outcome = Outcome::Error;
                        return self.bad_request(session, ctx, 400, bad.as_str()).await;
                    }
                    _ => {}
                }
                let body = match &outcome {
                    Extract::Method(m) => BodyView::Method(m),
                    _ => BodyView::Unusable,
                };
                let req = session.req_header();
                let view = RequestView {
                    method: &req.method,
                    uri: &req.uri,
                    headers: &req.headers,
                };
                let c = match snap.routes.classify_body(&view, body) {
                    Classification::Route(j, r) => Some((j, r.tier)),
                    _ => None,
                };
                // Only a configured name is logged or used as a label.
                let label = match (&outcome, c) {
                    (Extract::Method(m), Some((j, _))) => snap
                        .routes
                        .get(j)
                        .and_then(|route| route.matcher.xmlrpc.iter().find(|p| p.matches(m)))
                        .map_or_else(|| "unmatched".to_string(), |p| p.to_string()),
                    (Extract::Method(_), None) => "unmatched".to_string(),
                    (Extract::Bad(b), _) => b.as_str().to_string(),
                    (Extract::NeedMore, _) => "too_large".to_string(),
                };
                self.shared
                    .metrics
                    .xmlrpc
                    .with_label_values(&[route_name.as_str(), label.as_str()])
                    .inc();
                ctx.xmlrpc = Some(label);
                c
            }
        };
        let Some((route, tier)) = classified else {
            ctx.snapshot = Some(snap);
            ctx.outcome = Outcome::NoRoute;
            let body = serde_json::json!({
                "error": "no_route",
                "message": "no route matches this request",
                "method": session.req_header().method.as_str(),
                "path": session.req_header().uri.path(),
            })
            .to_string();
            let rid = ctx.request_id.clone().expect("set above");
            respond_json(session, 404, &[(X_REQUEST_ID, rid)], body).await?;
            return Ok(true);
        };
        ctx.route = Some(route);
        ctx.tier = Some(tier);

        // An inbound tier is only believed from a trusted peer (an internal
        // gateway); anyone else's is replaced by the route's tier upstream.
        // (No lookup at all when nobody is trusted, the default.)
        let client = client_ip(session);
        if !snap.trust.tier_header_from.is_empty() {
            if let Some(claimed) = session.req_header().headers.get(X_K2_TIER) {
                match client {
                    Some(ip) if snap.trust.may_set_tier(ip) => {
                        if let Some(t) = snap.tier_by_name(claimed.as_bytes()) {
                            ctx.tier = Some(t);
                        }
                    }
                    _ => {}
                }
            }
        }
        // Rate limits: per route or tier, per client IP or header value.
        let wait = snap.limiters.check(
            route,
            ctx.tier.expect("set above"),
            client,
            &session.req_header().headers,
        );
        if let Some(wait) = wait {
            ctx.snapshot = Some(snap);
            // Whole seconds, rounded up: a client never comes back too early.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            self.refuse(
                session,
                ctx,
                Refusal::RateLimited {
                    retry_after_s: secs.max(1),
                },
            )
            .await?;
            return Ok(true);
        }

        // A site that can take the request (health, failover), then a
        // permit there; a tier that may spill tries the next site's spare
        // capacity before it queues.
        let cluster_id = snap.routes.get(route).expect("classified").cluster;
        let ci = cluster_id.0 as usize;
        let cluster = snap.cluster(cluster_id);
        let tier = ctx.tier.expect("set above");
        let now = Instant::now();
        cluster.budget.request(now);
        let admission_off = snap.admission[ci].mode == AdmissionMode::Off;
        let preferred = cluster.sites.choose_site(now, &[]);
        let controller_at = |site: usize| Some((site, snap.controllers.get(ci, site)?.clone()));
        let pick = preferred.and_then(controller_at);
        let spill_to = match preferred {
            Some(p) if snap.tier(tier).spill => {
                cluster.sites.choose_site(now, &[p]).and_then(controller_at)
            }
            _ => None,
        };
        ctx.snapshot = Some(snap);
        let Some((site, controller)) = pick else {
            self.shed(session, ctx, ShedReason::NoHealthySite).await?;
            return Ok(true);
        };
        ctx.site = Some(site);
        if admission_off {
            return Ok(false);
        }
        let queue_wait = queue_wait_histogram(ctx, tier);
        if let Some((other, other_controller)) = spill_to {
            let here = controller.try_acquire(tier.0 as usize);
            let permit = match here {
                Some(p) => Some(p),
                None => other_controller.try_acquire(tier.0 as usize).inspect(|_| {
                    ctx.site = Some(other);
                    ctx.spilled = true;
                }),
            };
            if let Some(permit) = permit {
                queue_wait.observe(0.0);
                ctx.permit = Some(permit);
                return Ok(false);
            }
        }
        match controller.acquire(tier.0 as usize).await {
            Ok(permit) => {
                queue_wait.observe(permit.waited().as_secs_f64());
                ctx.permit = Some(permit);
                Ok(false)
            }
            Err(reason) => {
                if reason == ShedReason::QueueTimeout {
                    let wait = ctx
                        .snapshot
                        .as_ref()
                        .expect("set")
                        .tier(tier)
                        .max_queue_wait;
                    queue_wait.observe(wait.as_secs_f64());
                }
                self.shed(session, ctx, reason).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(snap), Some(route), Some(mut site)) = (ctx.snapshot.clone(), ctx.route, ctx.site)
        else {
            return Error::e_explain(
                ErrorType::InternalError,
                "upstream_peer before classification",
            );
        };
        let route = snap
            .routes
            .get(route)
            .expect("route index from this snapshot");
        let cluster = snap.cluster(route.cluster);
        let now = Instant::now();
        // A retry goes to a backend not tried yet: in this site, then in the
        // next site that can take it (failover within the request).
        let mut backend = cluster.sites.backend_in(site, now, &ctx.tried);
        while backend.is_none() {
            ctx.tried_sites.push(site);
            let Some(next) = cluster.sites.choose_site(now, &ctx.tried_sites) else {
                break;
            };
            site = next;
            backend = cluster.sites.backend_in(site, now, &ctx.tried);
        }
        let Some(backend) = backend else {
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                format!("cluster {}: no backend left to try", cluster.name),
            );
        };
        ctx.site = Some(site);
        ctx.upstream = Some(backend);
        ctx.tried.push(backend);
        ctx.backend_guard = cluster.sites.begin(site, backend);
        let mut peer = HttpPeer::new(backend, false, String::new());
        if !session.req_header().method.is_idempotent() {
            // Never on a pooled connection: a backend that died (or closed
            // the idle connection) as a purchase was written cannot tell us
            // whether it read it, so it could not be retried. On a fresh
            // connection a dead backend is a refused connect: nothing sent,
            // safe to retry elsewhere. Closed 1 ms after use, not pooled.
            peer.group_key = fastrand::u64(..);
            peer.options.idle_timeout = Some(Duration::from_millis(1));
        }
        peer.options.connection_timeout = Some(cluster.connect_timeout);
        peer.options.read_timeout = Some(route.timeout);
        peer.options.write_timeout = Some(route.timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let snap = ctx.snapshot.as_ref().expect("set in request_filter");
        let tier = snap.tier(ctx.tier.expect("set in request_filter"));
        ctx.upstream_sent = Some(Instant::now());
        // Room for the three below in one step: each would otherwise grow
        // (and re-hash) both of pingora's header maps, sized to the client's.
        upstream.reserve(3);
        upstream.insert_header(&name::X_K2_TIER, tier.header.clone())?;
        match &ctx.request_id {
            Some(rid) if !ctx.request_id_kept => {
                upstream.insert_header(&name::X_REQUEST_ID, rid.clone())?
            }
            _ => {}
        }
        if let Some(ip) = client_ip(session) {
            let xff = forwarded_for(upstream.headers.get(X_FORWARDED_FOR), ip)
                .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "x-forwarded-for"))?;
            upstream.insert_header(&name::X_FORWARDED_FOR, xff)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if !upstream_response.status.is_informational() {
            let status = upstream_response.status.as_u16();
            ctx.upstream_status = Some(status);
            ctx.outcome = Outcome::Proxied;
            // Time to the response header: the backend's own latency, without
            // our queueing. A backend 503 means it is past its knee.
            let sample = match (status, ctx.upstream_sent) {
                (503, _) => Sample::Congestion,
                (_, Some(sent)) => Sample::Latency(sent.elapsed()),
                (_, None) => Sample::Ignored,
            };
            if let Some(p) = ctx.permit.as_mut() {
                p.record(sample);
            }
            // Passive health: a 5xx counts against the backend.
            self.passive(ctx, status < 500, Instant::now());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The merchant can quote the id to support; it ties our log to theirs.
        if let Some(rid) = &ctx.request_id {
            response.reserve(1);
            response.insert_header(&name::X_REQUEST_ID, rid.clone())?;
        }
        Ok(())
    }

    /// A failed connect sent nothing: any method may go to another backend
    /// (then another site), within the retry budget.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failures += 1;
        let now = Instant::now();
        if let Some(cluster) = ctx.cluster() {
            self.passive(ctx, false, now);
            self.shared
                .metrics
                .upstream_errors
                .with_label_values(&[cluster.name.as_str(), ctx.site_name(), "connect"])
                .inc();
            // A refused connect cost the backend nothing and sent nothing:
            // moving on to another backend or site is not the work
            // amplification the budget guards against, and budgeting it
            // loses purchases when a whole site dies (the retries of every
            // request exceed any share until health checks catch up). The
            // tried list bounds it to one try per backend. Other connect
            // failures (timeouts: a backend too busy to accept) stay
            // within the budget.
            let refused = matches!(e.etype(), ErrorType::ConnectRefused);
            let retry = ctx.alternative(now) && (refused || cluster.budget.try_retry(now));
            if retry {
                self.shared
                    .metrics
                    .retries
                    .with_label_values(&[cluster.name.as_str(), "connect"])
                    .inc();
            }
            e.set_retry(retry);
        }
        e
    }

    /// An error once a connection was made: bytes may have reached the
    /// backend, so only an idempotent method, or a request carrying the
    /// idempotency header on a route that allows it, is retried — never once
    /// the response began, never past the budget. A purchase (POST) without
    /// a key is never sent twice. (This replaces pingora's default, which
    /// also retries idempotent requests on reused connections.)
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let now = Instant::now();
        self.passive(ctx, false, now);
        let Some(cluster) = ctx.cluster() else {
            e.set_retry(false);
            return e;
        };
        let snap = ctx.snapshot.as_ref().expect("cluster implies snapshot");
        let route = ctx.route.and_then(|r| snap.routes.get(r));
        let req = session.req_header();
        let reason = if req.method.is_idempotent() {
            Some("idempotent")
        } else if route.is_some_and(|r| r.retry_with_idempotency_key)
            && req.headers.contains_key(&snap.retries.idempotency_header)
        {
            Some("idempotency_key")
        } else {
            None
        };
        let response_began = ctx.upstream_status.is_some() || session.response_written().is_some();
        // A slow backend is not helped by a second request: no retry on timeouts.
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        let safe = reason.is_some()
            && !response_began
            && !timed_out
            && !session.as_ref().retry_buffer_truncated()
            && ctx.alternative(now);
        let retry = safe && cluster.budget.try_retry(now);
        if let (true, Some(reason)) = (retry, reason) {
            self.shared
                .metrics
                .retries
                .with_label_values(&[cluster.name.as_str(), reason])
                .inc();
        }
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, kind) = match e.etype() {
            ErrorType::HTTPStatus(code) => (*code, "status"),
            ErrorType::ConnectTimedout => (504, "connect_timeout"),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => (504, "timeout"),
            ErrorType::ConnectRefused | ErrorType::ConnectError | ErrorType::ConnectNoRoute => {
                (502, "connect")
            }
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "upstream"),
                ErrorSource::Downstream => (0, "downstream"),
                ErrorSource::Internal | ErrorSource::Unset => (500, "internal"),
            },
        };
        if matches!(ctx.outcome, Outcome::Pending | Outcome::Proxied) {
            ctx.outcome = Outcome::Error;
        }
        if kind == "timeout" || kind == "connect_timeout" {
            if let Some(p) = ctx.permit.as_mut() {
                p.record(Sample::Congestion);
            }
        }
        // Connect failures were counted per attempt in fail_to_connect.
        let connect = matches!(kind, "connect" | "connect_timeout");
        if !connect && (e.esource() == &ErrorSource::Upstream || kind == "timeout") {
            if let (Some(snap), Some(r)) = (&ctx.snapshot, ctx.route) {
                let cluster = &snap
                    .cluster(snap.routes.get(r).expect("route").cluster)
                    .name;
                let k = if kind == "timeout" {
                    "timeout"
                } else {
                    "other"
                };
                self.shared
                    .metrics
                    .upstream_errors
                    .with_label_values(&[cluster.as_str(), ctx.site_name(), k])
                    .inc();
            }
        }
        // Nothing can be written once the response has started or the client is gone.
        if code == 0 || session.response_written().is_some() {
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        // The downstream connection is not reused after an error: say so
        // (pingora writes `connection: close` from this), rather than let the
        // client find a reset on its next request.
        session.set_keepalive(None);
        let mut extra = Vec::with_capacity(1);
        if let Some(rid) = &ctx.request_id {
            extra.push((X_REQUEST_ID, rid.clone()));
        }
        let body = match ctx.outcome {
            Outcome::Shed(reason) => {
                let retry_after = ctx
                    .snapshot
                    .as_ref()
                    .map_or(30, |s| s.shedding.retry_after_s);
                extra.push((http::header::RETRY_AFTER, HeaderValue::from(retry_after)));
                extra.push((X_K2_SHED, HeaderValue::from_static(reason)));
                serde_json::json!({
                    "error": "overloaded",
                    "tier": ctx.tier_name(),
                    "reason": reason,
                    "retry_after_s": retry_after,
                })
            }
            _ => serde_json::json!({
                "error": match code { 504 => "gateway_timeout", 502 => "bad_gateway", 400 => "bad_request", _ => "internal_error" },
                "kind": kind,
                "route": ctx.route_name(),
                "request_id": ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
            }),
        };
        let code = if code == 0 { 502 } else { code };
        if let Err(write_err) = respond_json(session, code, &extra, body.to_string()).await {
            tracing::debug!(error = %write_err, "could not write the error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.start.elapsed();
        if ctx.outcome == Outcome::Pending {
            ctx.outcome = if e.is_some() {
                Outcome::Error
            } else {
                Outcome::Proxied
            };
        }
        let m = &self.shared.metrics;
        let tier = ctx.tier_name();
        let route = ctx.route_name();
        match &ctx.snapshot {
            Some(s) => s
                .request_counters
                .get(
                    ctx.route,
                    ctx.tier.map(|t| t.0 as usize),
                    ctx.outcome.index(),
                    code_class(status),
                )
                .inc(),
            // Failed before its config was taken: not the hot path.
            None => m
                .requests
                .with_label_values(&[
                    route,
                    tier,
                    ctx.outcome.label(),
                    crate::metrics::CODE_CLASSES[code_class(status)],
                ])
                .inc(),
        }
        if let Some(t) = ctx.tier {
            match ctx.outcome {
                Outcome::Shed(_) | Outcome::RateLimited => {
                    self.shared.tier_stats.shed(t.0 as usize)
                }
                Outcome::Proxied | Outcome::Error if ctx.upstream.is_some() => {
                    self.shared.tier_stats.admitted(t.0 as usize)
                }
                _ => {}
            }
        }
        match (&ctx.snapshot, ctx.tier) {
            (Some(s), Some(t)) => s.tier_metrics[t.0 as usize]
                .request_duration
                .observe(elapsed.as_secs_f64()),
            _ => m
                .request_duration
                .with_label_values(&[tier])
                .observe(elapsed.as_secs_f64()),
        }
        let req = session.req_header();
        let shed = match ctx.outcome {
            Outcome::Shed(r) => Some(r),
            Outcome::RateLimited => Some("rate_limited"),
            _ => None,
        };
        tracing::info!(
            target: "k2proxy::access",
            method = %req.method,
            path = req.uri.path(),
            route,
            tier,
            status,
            outcome = ctx.outcome.label(),
            shed,
            upstream = %ctx.upstream.map_or_else(|| "-".to_string(), |a| a.to_string()),
            site = ctx.site_name(),
            xmlrpc = ctx.xmlrpc.as_deref(),
            duration_ms = duration_ms(elapsed),
            request_id = ctx.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
            client = %client_ip(session).map_or_else(|| "-".to_string(), |a| a.to_string()),
            error = e.map(|e| e.to_string()),
            "access"
        );
    }
}

/// `k2_queue_wait_seconds` of `tier`, from the request's config snapshot.
fn queue_wait_histogram(ctx: &Ctx, tier: TierId) -> prometheus::Histogram {
    let snap = ctx.snapshot.as_ref().expect("set before admission");
    snap.tier_metrics[tier.0 as usize].queue_wait.clone()
}

fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_written_as_display_writes_them() {
        let mut buf = [0u8; 48];
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "255.255.255.255",
            "192.168.1.10",
            "::1",
            "::ffff:1.2.3.4",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let n = format_ip(&mut buf, ip);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), ip.to_string());
        }
        for a in 0..=255u8 {
            let ip = IpAddr::from([a, 255 - a, a / 2, 7]);
            let n = format_ip(&mut buf, ip);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        let v6: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap();
        assert_eq!(forwarded_for(None, v4).unwrap(), "203.0.113.7");
        let empty = HeaderValue::from_static("");
        assert_eq!(forwarded_for(Some(&empty), v4).unwrap(), "203.0.113.7");
        let prev = HeaderValue::from_static("198.51.100.1");
        assert_eq!(
            forwarded_for(Some(&prev), v6).unwrap(),
            format!("198.51.100.1, {v6}").as_str()
        );
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
