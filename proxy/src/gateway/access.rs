//! The end of a request: its metrics and one access-log event.

use std::time::Duration;

use pingora::prelude::*;
use pingora::proxy::Session;

use super::ctx::Ctx;
use super::headers::{client_ip, protocol, AddrText};
use super::reply::Outcome;
use crate::metrics::code_class;
use crate::Shared;

/// Counts the request (`k2_requests_total`, the tier's duration histogram,
/// `/status` rates) and writes its access-log line.
pub(super) fn record(shared: &Shared, session: &Session, e: Option<&Error>, ctx: &mut Ctx) {
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let elapsed = ctx.start.elapsed();
    if ctx.outcome == Outcome::Pending {
        ctx.outcome = if e.is_some() {
            Outcome::Error
        } else {
            Outcome::Proxied
        };
    }
    let tier = ctx.routed.map(|r| r.tier.0 as usize);
    ctx.gen
        .request_counters
        .get(
            ctx.routed.map(|r| r.route),
            tier,
            ctx.outcome,
            code_class(status),
        )
        .inc();
    if let Some(t) = tier {
        match ctx.outcome {
            Outcome::Shed(_) | Outcome::RateLimited => shared.tier_stats.shed(t),
            Outcome::Proxied | Outcome::Error if ctx.tries.backend.is_some() => {
                shared.tier_stats.admitted(t)
            }
            _ => {}
        }
        ctx.gen.tier_metrics[t]
            .request_duration
            .observe(elapsed.as_secs_f64());
    } else {
        shared
            .metrics
            .request_duration
            .with_label_values(&["none"])
            .observe(elapsed.as_secs_f64());
    }
    log(session, e, ctx, status, elapsed);
}

fn log(session: &Session, e: Option<&Error>, ctx: &Ctx, status: u16, elapsed: Duration) {
    // The fields below are looked up before the event's own check.
    if !tracing::enabled!(target: "k2proxy::access", tracing::Level::INFO) {
        return;
    }
    let req = session.req_header();
    let spilled_from = ctx
        .admitted
        .as_ref()
        .and_then(|a| a.spilled_from)
        .map(|s| ctx.site_name_of(Some(s)));
    let header = |name: http::header::HeaderName| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    };
    let host = req.uri.host().unwrap_or_else(|| header(http::header::HOST));
    let (proto, tls) = protocol(session);
    let upstream = ctx.tries.backend.map(AddrText::socket);
    let client = client_ip(session).map(AddrText::ip);
    tracing::info!(
        target: "k2proxy::access",
        method = %req.method,
        proto,
        tls,
        host,
        path = req.uri.path(),
        query = req.uri.query(),
        route = ctx.route_name(),
        tier = ctx.tier_name(),
        status,
        outcome = ctx.outcome.label(),
        shed = ctx.outcome.shed_reason(),
        upstream = %upstream.as_ref().map_or("-", AddrText::as_str),
        site = ctx.site_name(),
        tries = ctx.tries.tried.len(),
        spilled_from,
        xmlrpc = ctx.xmlrpc.as_deref(),
        bytes_in = session.as_downstream().body_bytes_read(),
        bytes_out = session.as_downstream().body_bytes_sent(),
        upstream_ms = ctx.tries.upstream_latency.map(duration_ms),
        duration_ms = duration_ms(elapsed),
        request_id = ctx.request_id().and_then(|v| v.to_str().ok()).unwrap_or("-"),
        trace_id = ctx.trace.as_ref().map_or("-", |t| t.trace_id()),
        client = %client.as_ref().map_or("-", AddrText::as_str),
        user_agent = header(http::header::USER_AGENT),
        error = e.map(|e| e.to_string()),
        "access"
    );
}

fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
