//! The request path as named stages, in order: route (classify, reading the
//! body when a route needs its XML-RPC method; a trusted `x-k2-tier`), rate
//! limit, choose site, admit. Each returns `Result<_, Reply>`: the value the
//! next stage needs, or the answer k2proxy gives instead.

use std::net::IpAddr;
use std::time::Instant;

use http::HeaderMap;
use pingora::proxy::Session;

use super::ctx::{Admitted, Ctx, Routed};
use super::headers::X_K2_TIER;
use super::reply::Reply;
use super::Gateway;
use crate::admission::ShedReason;
use crate::classify::{BodyView, Classification, Inspect, RequestView};
use crate::config::AdmissionMode;
use crate::runtime::Generation;
use crate::xmlrpc::{method_name, xml_content_type, BadBody, Extract};

/// The choose-site stage's result.
#[derive(Debug, Clone, Copy)]
pub struct SitePick {
    pub site: usize,
    /// The next site with spare capacity, for a tier that may spill.
    pub spill_to: Option<usize>,
}

/// The size of a request head as sent: request line and header lines.
fn head_size(req: &pingora::http::RequestHeader) -> usize {
    let path = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method.as_str().len() + path + 12;
    let headers: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    line + headers
}

/// A body whose declared length is over the route's `max_body` is refused
/// before anything is read or sent (a streamed one is counted as it passes:
/// `Gateway::request_body_filter`).
fn declared_body(gen: &Generation, routed: Routed, headers: &HeaderMap) -> Result<(), Reply> {
    let Some(route) = gen.config.routes.get(routed.route) else {
        return Ok(());
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > route.max_body => Err(Reply::BodyTooLarge {
            limit: route.max_body,
        }),
        _ => Ok(()),
    }
}

/// Whether the request declared both `transfer-encoding` and
/// `content-length`. pingora keeps the first and drops the second (RFC 9112
/// §6.3, and closes the connection after); k2proxy refuses such a request
/// outright, as a smuggling attempt, so the raw head is read for it.
fn length_and_encoding(session: &Session) -> bool {
    if !session
        .req_header()
        .headers
        .contains_key(http::header::TRANSFER_ENCODING)
    {
        return false;
    }
    match session.as_downstream().as_http1() {
        Some(h1) => has_header(&h1.get_headers_raw_bytes(), b"content-length"),
        None => session
            .req_header()
            .headers
            .contains_key(http::header::CONTENT_LENGTH),
    }
}

/// Whether the raw request head has a header called `name`.
fn has_header(head: &[u8], name: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        line.iter()
            .position(|&b| b == b':')
            .is_some_and(|colon| line[..colon].trim_ascii().eq_ignore_ascii_case(name))
    })
}

fn view(session: &Session) -> RequestView<'_> {
    let req = session.req_header();
    RequestView {
        method: &req.method,
        uri: &req.uri,
        headers: &req.headers,
    }
}

impl Gateway {
    /// Route → rate limit → choose site → admit. Each stage's result is in
    /// `ctx` as soon as it is known.
    pub(super) async fn stages(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), Reply> {
        let gen = ctx.gen.clone();
        let max = gen.config.server.max_header_bytes;
        if head_size(session.req_header()) > max {
            return Err(Reply::HeadersTooLarge { limit: max });
        }
        if length_and_encoding(session) {
            return Err(Reply::AmbiguousLength);
        }
        let client = super::headers::client_ip(session);
        let routed = self.route(session, ctx, &gen).await?;
        let routed = trusted_tier(&gen, routed, client, &session.req_header().headers);
        ctx.routed = Some(routed);
        declared_body(&gen, routed, &session.req_header().headers)?;
        rate_limit(&gen, routed, client, &session.req_header().headers).await?;
        let pick = choose_site(&gen, routed, Instant::now())?;
        ctx.tries.site = Some(pick.site);
        let admitted = self.admit(&gen, routed, pick).await?;
        ctx.tries.site = Some(admitted.site);
        ctx.admitted = Some(admitted);
        Ok(())
    }

    /// The first route that fits; when one needs the body's XML-RPC method,
    /// the body is read (up to the route's limit) and the request classified
    /// again.
    async fn route(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        gen: &Generation,
    ) -> Result<Routed, Reply> {
        let found = match gen
            .config
            .routes
            .classify_body(&view(session), BodyView::Unread)
        {
            Classification::Route(i, r) => Some(Routed::to(i, r)),
            Classification::NoRoute => None,
            Classification::NeedsBody(i) => self.route_by_body(session, ctx, gen, i).await?,
        };
        found.ok_or(Reply::NoRoute)
    }

    /// Reads the body for route `i`'s XML-RPC method and classifies again;
    /// counts the method (a configured name, `unmatched`, or why none was
    /// read) in `k2_xmlrpc_requests_total`.
    async fn route_by_body(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        gen: &Generation,
        i: usize,
    ) -> Result<Option<Routed>, Reply> {
        let routes = &gen.config.routes;
        let Some(first) = routes.get(i) else {
            return Ok(None);
        };
        let inspect = first.inspect.clone().unwrap_or_default();
        let extract = inspect_body(session, &inspect).await;
        if session.as_ref().retry_buffer_truncated() {
            // More was read than can be replayed: forwarding would alter the body.
            return Err(Reply::TooLargeToInspect);
        }
        let counter = |label: &str| {
            self.shared
                .metrics
                .xmlrpc
                .with_label_values(&[first.name.as_str(), label])
                .inc()
        };
        if let (Extract::Bad(bad), true) = (&extract, inspect.reject_bad) {
            counter(bad.as_str());
            return Err(Reply::BadBody(*bad));
        }
        let body = match &extract {
            Extract::Method(m) => BodyView::Method(m),
            _ => BodyView::Unusable,
        };
        let found = match routes.classify_body(&view(session), body) {
            Classification::Route(j, r) => Some((j, r)),
            _ => None,
        };
        // Only a configured name is logged or used as a label.
        let label = match (&extract, found) {
            (Extract::Method(m), Some((_, route))) => route
                .matcher
                .xmlrpc
                .iter()
                .find(|p| p.matches(m))
                .map_or_else(|| "unmatched".to_string(), |p| p.to_string()),
            (Extract::Method(_), None) => "unmatched".to_string(),
            (Extract::Bad(b), _) => b.as_str().to_string(),
            (Extract::NeedMore, _) => "too_large".to_string(),
        };
        counter(&label);
        ctx.xmlrpc = Some(label);
        Ok(found.map(|(j, r)| Routed::to(j, r)))
    }
}

/// An inbound tier is only believed from a trusted peer (an internal
/// gateway); anyone else's is replaced by the route's tier upstream. No
/// lookup at all when nobody is trusted, the default.
fn trusted_tier(
    gen: &Generation,
    mut routed: Routed,
    client: Option<IpAddr>,
    headers: &HeaderMap,
) -> Routed {
    let trust = &gen.config.trust;
    if trust.tier_header_from.is_empty() {
        return routed;
    }
    let claimed = headers.get(X_K2_TIER);
    if let (Some(claimed), Some(ip)) = (claimed, client) {
        if trust.may_set_tier(ip) {
            if let Some(t) = gen.config.tier_by_name(claimed.as_bytes()) {
                routed.tier = t;
            }
        }
    }
    routed
}

/// Rate limits: per route or tier, per client IP (behind trusted proxies,
/// from `x-forwarded-for`) or header value; fleet-wide ones in the store.
async fn rate_limit(
    gen: &Generation,
    routed: Routed,
    client: Option<IpAddr>,
    headers: &HeaderMap,
) -> Result<(), Reply> {
    let client = gen.config.trust.client_for_limits(client, headers);
    match gen
        .limiters
        .check(routed.route, routed.tier, client, headers)
        .await
    {
        None => Ok(()),
        Some(wait) => {
            // Whole seconds, rounded up: a client never comes back too early.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Err(Reply::RateLimited {
                tier: routed.tier,
                retry_after_s: secs.max(1),
            })
        }
    }
}

/// A site that can take the request (health, failover); for a tier that may
/// spill, also the next one.
fn choose_site(gen: &Generation, routed: Routed, now: Instant) -> Result<SitePick, Reply> {
    let cluster = gen.cluster(routed.cluster);
    cluster.budget.request(now);
    let Some(site) = cluster.sites.choose_site(now, &[]) else {
        return Err(Reply::Shed {
            tier: routed.tier,
            reason: ShedReason::NoHealthySite,
        });
    };
    let spill_to = if gen.config.tier(routed.tier).spill {
        cluster.sites.choose_site(now, &[site])
    } else {
        None
    };
    Ok(SitePick { site, spill_to })
}

impl Gateway {
    /// A permit at the chosen site: at once, on the spill site's spare
    /// capacity, or after waiting in the priority queue; or shed.
    async fn admit(
        &self,
        gen: &Generation,
        routed: Routed,
        pick: SitePick,
    ) -> Result<Admitted, Reply> {
        let ci = routed.cluster.0 as usize;
        let tier = routed.tier.0 as usize;
        let here = |permit| Admitted {
            site: pick.site,
            spilled_from: None,
            permit,
        };
        let controller = match gen.controllers.get(ci, pick.site) {
            Some(c) if gen.config.admission[ci].mode != AdmissionMode::Off => c,
            _ => return Ok(here(None)),
        };
        let queue_wait = &gen.tier_metrics[tier].queue_wait;
        if let Some(other) = pick.spill_to {
            if let Some(p) = controller.try_acquire(tier) {
                queue_wait.observe(0.0);
                return Ok(here(Some(p)));
            }
            if let Some(p) = gen
                .controllers
                .get(ci, other)
                .and_then(|c| c.try_acquire(tier))
            {
                queue_wait.observe(0.0);
                let c = gen.config.cluster(routed.cluster);
                let (from, to) = (&c.sites[pick.site].name, &c.sites[other].name);
                self.shared
                    .metrics
                    .spills
                    .with_label_values(&[c.name.as_str(), from, to])
                    .inc();
                return Ok(Admitted {
                    site: other,
                    spilled_from: Some(pick.site),
                    permit: Some(p),
                });
            }
        }
        match controller.acquire(tier).await {
            Ok(permit) => {
                queue_wait.observe(permit.waited().as_secs_f64());
                Ok(here(Some(permit)))
            }
            Err(reason) => {
                if reason == ShedReason::QueueTimeout {
                    let wait = gen.config.tier(routed.tier).max_queue_wait;
                    queue_wait.observe(wait.as_secs_f64());
                }
                Err(Reply::Shed {
                    tier: routed.tier,
                    reason,
                })
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::has_header;

    #[test]
    fn has_header_reads_names_case_insensitively_and_skips_the_request_line() {
        let head = b"POST /content-length: HTTP/1.1\r\nHost: a\r\nContent-Length : 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(has_header(head, b"content-length"));
        assert!(has_header(head, b"transfer-encoding"));
        let head = b"POST /content-length:x HTTP/1.1\r\nhost: a\r\nx-content-length: 4\r\n\r\n";
        assert!(!has_header(head, b"content-length"));
    }
}
