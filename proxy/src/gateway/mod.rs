//! `impl ProxyHttp`: the life of one request, as pingora's phases calling
//! small named stages.
//!
//! - `request_filter`: [`stages`] route → rate limit → choose site → admit;
//!   a stage that refuses returns a [`Reply`], written here.
//! - `upstream_peer`: a backend not tried yet, in the admitted site, then in
//!   the next site that can take it.
//! - `upstream_request_filter`: `x-k2-tier`, `x-request-id`, `x-forwarded-for`.
//! - `upstream_response_filter`: the latency sample and passive health.
//! - `fail_to_connect` / `error_while_proxy`: [`retry::decide`].
//! - `fail_to_proxy`: a [`Reply::Failed`]; `logging`: [`access`].

mod access;
mod ctx;
mod headers;
mod reply;
mod retry;
mod stages;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use crate::admission::Sample;
use crate::edge::stream::EdgeStream;
use crate::Shared;
pub(crate) use ctx::Ctx;
use headers::{
    client_ip, forwarded_for, forwarded_proto, name, RequestId, TraceParent, X_FORWARDED_FOR,
};
pub(crate) use reply::Outcome;
use reply::{Failure, Reply};
pub(crate) use retry::RetryReason;
use retry::{Attempt, Stage};

/// The proxy logic; one per process, shared by every request.
pub(crate) struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Gateway { shared }
    }

    /// Answers a request a stage refused; nothing reaches a backend.
    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, reply: Reply) -> Result<()> {
        ctx.outcome = reply.outcome();
        ctx.reply = Some(reply);
        let config = &ctx.gen.config;
        self.count_shed(config, reply);
        let rid = ctx.request_id.as_ref().map(|r| &r.value);
        reply.write(session, config, rid).await
    }

    /// `k2_shed_total` for a refusal that is a shed or a rate limit.
    fn count_shed(&self, config: &crate::config::Config, reply: Reply) {
        if let Some((tier, reason)) = reply.shed_labels(config) {
            self.shared
                .metrics
                .shed
                .with_label_values(&[tier, reason])
                .inc();
        }
    }

    /// Tells the cluster how the request fared at its backend (passive
    /// health); an ejection is logged.
    fn passive(&self, ctx: &Ctx, ok: bool, now: Instant) {
        let (Some((cluster, state)), Some(site), Some(backend)) =
            (ctx.cluster(), ctx.tries.site, ctx.tries.backend)
        else {
            return;
        };
        if state.sites.report(site, backend, ok, now) {
            tracing::warn!(cluster = %cluster.name, site = ctx.site_name(), %backend, "backend ejected after consecutive failures");
        }
    }

    /// A retry that changes site takes a permit there (waiting in that
    /// site's queue like any request of its tier) and gives the first
    /// site's back, so each site's limit counts, and learns from, what its
    /// backends really carry. Refused there, the request is shed.
    async fn move_permit(&self, ctx: &mut Ctx, site: usize) -> Result<()> {
        let (Some(routed), Some(admitted)) = (ctx.routed, ctx.admitted.as_mut()) else {
            return Ok(());
        };
        if admitted.permit.is_none() || admitted.site == site {
            return Ok(());
        }
        admitted.permit = None; // the first site's slot, back at once
        let Some(controller) = ctx.gen.controllers.get(routed.cluster.0 as usize, site) else {
            return Ok(());
        };
        match controller.clone().acquire(routed.tier.0 as usize).await {
            Ok(permit) => {
                admitted.permit = Some(permit);
                admitted.site = site;
                Ok(())
            }
            Err(reason) => {
                let reply = Reply::Shed {
                    tier: routed.tier,
                    reason,
                };
                self.count_shed(&ctx.gen.config, reply);
                ctx.reply = Some(reply);
                Error::e_explain(
                    ErrorType::Custom("shed at the retry's site"),
                    "no capacity at the site a retry moved to",
                )
            }
        }
    }

    /// Counts a retry the policy allowed.
    fn count_retry(&self, ctx: &Ctx, reason: RetryReason) {
        if let Some((cluster, _)) = ctx.cluster() {
            self.shared
                .metrics
                .retries
                .with_label_values(&[cluster.name.as_str(), reason.as_str()])
                .inc();
        }
    }

    /// The failure of a request that could not be proxied, counted against
    /// the backend (`k2_upstream_errors_total`) when it was the backend's.
    fn classify_failure(&self, e: &Error, ctx: &mut Ctx) -> Failure {
        let failure = match e.etype() {
            ErrorType::HTTPStatus(code) => Failure::Status(*code),
            ErrorType::ConnectTimedout => Failure::ConnectTimeout,
            // A client that stalls its upload times out too: not the backend's.
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Downstream =>
            {
                Failure::Downstream
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
            ErrorType::ConnectRefused | ErrorType::ConnectError | ErrorType::ConnectNoRoute => {
                Failure::Connect
            }
            _ => match e.esource() {
                ErrorSource::Upstream => Failure::Upstream,
                ErrorSource::Downstream => Failure::Downstream,
                ErrorSource::Internal | ErrorSource::Unset => Failure::Internal,
            },
        };
        if failure.is_congestion() {
            if let Some(p) = ctx.admitted.as_mut().and_then(|a| a.permit.as_mut()) {
                p.record(Sample::Congestion);
            }
        }
        // Connect failures were counted per attempt in fail_to_connect.
        let kind = match failure {
            Failure::Timeout => Some("timeout"),
            _ if e.esource() == &ErrorSource::Upstream => Some("other"),
            _ => None,
        };
        if let (Some(kind), Some((cluster, _)), false) = (
            kind,
            ctx.cluster(),
            matches!(failure, Failure::Connect | Failure::ConnectTimeout),
        ) {
            self.shared
                .metrics
                .upstream_errors
                .with_label_values(&[cluster.name.as_str(), ctx.site_name(), kind])
                .inc();
        }
        failure
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: pingora keeps the context in its per-request future, which it
    /// moves onto the heap whole for every request, and the compiler lays
    /// the context out there more than once (584 bytes each; callgrind:
    /// about 1 700 instructions of `memcpy` a request, against one
    /// allocation for the box).
    type CTX = Box<Ctx>;

    fn new_ctx(&self) -> Box<Ctx> {
        Box::new(Ctx::new(self.shared.current.load_full()))
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Box<Ctx>) -> Result<bool> {
        // Every HTTP/1 connection is an EdgeStream: it times the head, and
        // the idle wait before the next one (`request_finished`). HTTP/2
        // idles by pingora's h2 idle timeout.
        let server = &ctx.gen.config.server;
        // The head is in: header_timeout is met. A connection that has
        // served its keep-alive closes after this answer, so clients behind
        // an L4 balancer come back through it (to a restarted instance too).
        let served = session
            .as_downstream()
            .stream()
            .and_then(EdgeStream::of)
            .is_some_and(|edge| {
                edge.request_started(server.keepalive_requests, server.keepalive_time)
            });
        if served {
            session.set_keepalive(None);
        }
        ctx.request_id = Some(RequestId::of(&session.req_header().headers));
        ctx.trace = Some(TraceParent::of(&session.req_header().headers));
        // A body that stops arriving is cut off as soon as a head would be
        // (pingora waits 60 s), so a stalled upload cannot hold a permit.
        session.set_read_timeout(Some(server.header_timeout));
        if self.shared.draining.is_set() || self.shared.upgrading.is_set() {
            // Clients reconnect through the balancer, to a node that stays
            // (or, in an upgrade, to the new process on the same sockets).
            session.set_keepalive(None);
        }
        match self.stages(session, ctx).await {
            Ok(()) => Ok(false),
            Err(reply) => {
                self.refuse(session, ctx, reply).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Box<Ctx>,
    ) -> Result<Box<HttpPeer>> {
        let (Some(routed), Some(mut site)) = (ctx.routed, ctx.tries.site) else {
            return Error::e_explain(ErrorType::InternalError, "upstream_peer before admission");
        };
        let gen = ctx.gen.clone();
        let (route, cluster) = (
            gen.config.routes.get(routed.route),
            gen.config.cluster(routed.cluster),
        );
        let Some(route) = route else {
            return Error::e_explain(ErrorType::InternalError, "route of another config");
        };
        let sites = &gen.cluster(routed.cluster).sites;
        let now = Instant::now();
        // A retry goes to a backend not tried yet: in this site, then in the
        // next site that can take it (failover within the request).
        let mut backend = sites.backend_in(site, now, &ctx.tries.tried);
        while backend.is_none() {
            ctx.tries.tried_sites.push(site);
            let Some(next) = sites.choose_site(now, &ctx.tries.tried_sites) else {
                break;
            };
            site = next;
            backend = sites.backend_in(site, now, &ctx.tries.tried);
        }
        let Some(backend) = backend else {
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                format!("cluster {}: no backend left to try", cluster.name),
            );
        };
        if ctx.tries.site != Some(site) && !ctx.tries.tried.is_empty() {
            let labels = [
                cluster.name.as_str(),
                ctx.site_name(),
                cluster.sites[site].name.as_str(),
            ];
            self.shared
                .metrics
                .cross_site_retries
                .with_label_values(&labels)
                .inc();
        }
        self.move_permit(ctx, site).await?;
        ctx.tries.site = Some(site);
        ctx.tries.backend = Some(backend);
        ctx.tries.tried.push(backend);
        ctx.tries.guard = sites.begin(site, backend);
        ctx.tries.body_bytes = 0; // a try replays the body from its start
        let mut peer = match gen.site_tls(routed.cluster, site) {
            Some(tls) => tls.peer(backend),
            None => HttpPeer::new(backend, false, String::new()),
        };
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
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let Some(routed) = ctx.routed else {
            return Error::e_explain(ErrorType::InternalError, "upstream request before routing");
        };
        let tier = ctx.gen.config.tier(routed.tier);
        ctx.tries.sent = Some(Instant::now());
        // Room for the four below in one step: each would otherwise grow
        // (and re-hash) both of pingora's header maps, sized to the client's.
        upstream.reserve(5);
        upstream.insert_header(&name::X_K2_TIER, tier.header.clone())?;
        upstream.insert_header(&name::X_FORWARDED_PROTO, forwarded_proto(session))?;
        if session.is_http2() {
            h2_to_h1(upstream)?;
        }
        match &ctx.request_id {
            Some(rid) if !rid.kept => {
                upstream.insert_header(&name::X_REQUEST_ID, rid.value.clone())?
            }
            _ => {}
        }
        match &ctx.trace {
            Some(t) if !t.kept => upstream.insert_header(&name::TRACEPARENT, t.value.clone())?,
            _ => {}
        }
        if let Some(ip) = client_ip(session) {
            let xff = forwarded_for(upstream.headers.get(X_FORWARDED_FOR), ip)
                .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "x-forwarded-for"))?;
            upstream.insert_header(&name::X_FORWARDED_FOR, xff)?;
        }
        Ok(())
    }

    /// Counts the body as it streams upstream: past the route's `max_body`
    /// the request is cut off (the backend sees an incomplete body) and the
    /// client gets 413. A client fault: it never counts against the backend.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        let Some(chunk) = body else { return Ok(()) };
        ctx.tries.body_bytes += chunk.len() as u64;
        let limit = ctx
            .routed
            .and_then(|r| ctx.gen.config.routes.get(r.route))
            .map_or(u64::MAX, |r| r.max_body);
        if ctx.tries.body_bytes > limit {
            ctx.reply = Some(Reply::BodyTooLarge { limit });
            return Err(Error::create(
                ErrorType::Custom("request body too large"),
                ErrorSource::Downstream,
                Some(format!("body over the route's max_body ({limit} bytes)").into()),
                None,
            ));
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        if !upstream_response.status.is_informational() {
            let status = upstream_response.status.as_u16();
            ctx.tries.status = Some(status);
            ctx.outcome = Outcome::Proxied;
            // Time to the response header: the backend's own latency, without
            // our queueing. A backend 503 means it is past its knee.
            let latency = ctx.tries.sent.map(|sent| sent.elapsed());
            ctx.tries.upstream_latency = latency;
            if let (Some(l), Some(r), Some(site)) = (latency, ctx.routed, ctx.tries.site) {
                if let Some(h) = ctx
                    .gen
                    .upstream_duration
                    .get(r.cluster.0 as usize)
                    .and_then(|c| c.get(site))
                {
                    h.observe(l.as_secs_f64());
                }
            }
            let sample = match (status, latency) {
                (503, _) => Sample::Congestion,
                (_, Some(l)) => Sample::Latency(l),
                (_, None) => Sample::Ignored,
            };
            if let Some(p) = ctx.admitted.as_mut().and_then(|a| a.permit.as_mut()) {
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
        ctx: &mut Box<Ctx>,
    ) -> Result<()> {
        // The merchant can quote the id to support; it ties our log to theirs.
        if let Some(rid) = &ctx.request_id {
            // Room for the id and for the `Date` and `Connection` pingora
            // sets next: one growth of both maps here instead of one inside
            // an insert (callgrind: about 770 instructions a request less).
            response.reserve(3);
            response.insert_header(&name::X_REQUEST_ID, rid.value.clone())?;
        }
        Ok(())
    }

    /// A failed connect sent nothing: any method may go to another backend
    /// (then another site), within the retry policy ([`retry`]).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Box<Ctx>,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let now = Instant::now();
        let Some((cluster, state)) = ctx.cluster() else {
            return e;
        };
        self.passive(ctx, false, now);
        self.shared
            .metrics
            .upstream_errors
            .with_label_values(&[cluster.name.as_str(), ctx.site_name(), "connect"])
            .inc();
        let attempt = Attempt {
            stage: Stage::Connect {
                refused: matches!(e.etype(), ErrorType::ConnectRefused),
            },
            alternative: ctx.alternative(now),
        };
        let decision = retry::decide(attempt, || state.budget.try_retry(now));
        if let Some(reason) = decision {
            self.count_retry(ctx, reason);
        }
        e.set_retry(decision.is_some());
        e
    }

    /// An error once a connection was made: bytes may have reached the
    /// backend, so the retry policy ([`retry`]) decides. (This replaces
    /// pingora's default, which also retries idempotent requests on reused
    /// connections.)
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<Ctx>,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let now = Instant::now();
        // Only the backend's own failures count against it: a client that
        // resets mid-upload says nothing about the backend, and counting it
        // would let any client eject healthy backends. Nor is there anyone
        // to retry for.
        if e.esource() != &ErrorSource::Upstream {
            e.set_retry(false);
            return e;
        }
        self.passive(ctx, false, now);
        let (Some(routed), Some((_, state))) = (ctx.routed, ctx.cluster()) else {
            e.set_retry(false);
            return e;
        };
        let config = &ctx.gen.config;
        let req = session.req_header();
        let route_allows = config
            .routes
            .get(routed.route)
            .is_some_and(|r| r.retry_with_idempotency_key);
        let stage = Stage::Sent {
            idempotent_method: req.method.is_idempotent(),
            idempotency_key: route_allows
                && req.headers.contains_key(&config.retries.idempotency_header),
            response_began: ctx.tries.status.is_some() || session.response_written().is_some(),
            timed_out: matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            ),
            body_truncated: session.as_ref().retry_buffer_truncated(),
        };
        let attempt = Attempt {
            stage,
            alternative: ctx.alternative(now),
        };
        let decision = retry::decide(attempt, || state.budget.try_retry(now));
        if let Some(reason) = decision {
            self.count_retry(ctx, reason);
        }
        e.set_retry(decision.is_some());
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<Ctx>,
    ) -> FailToProxy {
        let failure = self.classify_failure(e, ctx);
        if matches!(ctx.outcome, Outcome::Pending | Outcome::Proxied) {
            ctx.outcome = ctx.reply.map_or(Outcome::Error, |r| r.outcome());
        }
        // A refusal decided mid-request (a body over max_body) is answered as itself.
        let code = ctx
            .reply
            .map_or(failure.status(), |r| r.status(&ctx.gen.config));
        // Nothing can be written once the response has started or the client is gone.
        if code == 0 || session.response_written().is_some() {
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        // A refusal whose answer could not be written is answered as itself.
        let reply = ctx.reply.unwrap_or(Reply::Failed {
            failure,
            route: ctx.routed.map(|r| r.route),
        });
        // The downstream connection is not reused after an error: say so
        // (pingora writes `connection: close` from this), rather than let the
        // client find a reset on its next request.
        session.set_keepalive(None);
        let rid = ctx.request_id.as_ref().map(|r| &r.value);
        if let Err(write_err) = reply.write(session, &ctx.gen.config, rid).await {
            tracing::debug!(error = %write_err, "could not write the error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Box<Ctx>) {
        if let Some(edge) = session.as_downstream().stream().and_then(EdgeStream::of) {
            // The next byte starts a new head; until then the connection idles.
            edge.request_finished(ctx.gen.config.server.idle_timeout);
        }
        access::record(&self.shared, session, e, ctx);
    }
}

/// An HTTP/2 request goes to the backend as HTTP/1.1: the `:authority`
/// becomes `Host` (when the client sent none) and the target its path.
fn h2_to_h1(upstream: &mut RequestHeader) -> Result<()> {
    if upstream.headers.get(http::header::HOST).is_none() {
        if let Some(authority) = upstream.uri.authority().map(|a| a.as_str().to_string()) {
            upstream.insert_header(http::header::HOST, authority)?;
        }
    }
    if upstream.uri.scheme().is_some() {
        let path = upstream
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = http::Uri::try_from(path)
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "request target"))?;
        upstream.set_uri(uri);
    }
    Ok(())
}
