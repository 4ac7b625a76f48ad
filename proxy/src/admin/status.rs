//! The data behind `GET /status` and the status page: config generation and
//! the last reload, per-tier rates and settings, and per cluster and site
//! the admission limit, in-flight, queue depth, shed level, what an adaptive
//! limit learned of the backend's latency, and the backends.

use serde_json::{json, Value};

use crate::config::AdmissionMode;
use crate::Shared;

/// `/status` as JSON.
pub fn status(shared: &Shared) -> Value {
    // The last reload before the config: a reload swaps the config first and
    // records itself after, so in this order a reload that lands between the
    // two reads shows its new config with the previous record, never the
    // reverse (a record whose config is not shown yet).
    let last = shared
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let gen = shared.current.load();
    let snap = &gen.config;
    let rates = shared.tier_stats.rates(snap.tiers.len());
    let tiers: Vec<Value> = snap
        .tiers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let id = crate::classify::TierId(i as u8);
            json!({
                "name": t.name,
                "admitted_per_s": round(rates[i].admitted_per_s),
                "shed_per_s": round(rates[i].shed_per_s),
                "max_queue_wait_ms": t.max_queue_wait.as_millis() as u64,
                "max_share": t.max_share,
                "never_shed": snap.shedding.never_shed.contains(&id),
                "force_shed": snap.shedding.force_shed.contains(&id),
            })
        })
        .collect();
    let clusters = clusters(shared, &gen);
    json!({
        "pid": std::process::id(),
        "generation": gen.number,
        "routes_file": snap.routes_path.display().to_string(),
        "policy_file": snap.policy_path.display().to_string(),
        "watching_files": shared.watching.load(std::sync::atomic::Ordering::Acquire),
        "last_reload": last,
        "draining": shared.draining.is_set(),
        "admission_state": shared
            .admission_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| json!({
                "file": r.file.display().to_string(),
                "at_start": r.at_start,
                "resumed": r.resumed,
                "write_error": r.write_error,
            })),
        "rate_limit_store": gen.limiters.store().map(|s| json!({
            "redis": s.url(),
            "up": s.is_up(),
        })),
        "connections": {
            "open": shared.connections.count(),
            "max": gen.max_connections,
            "max_per_client": snap.server.max_connections_per_client,
        },
        "tls": snap.server.tls.iter().map(listener).collect::<Vec<_>>(),
        "tiers": tiers,
        "clusters": clusters,
    })
}

/// Per cluster and site: admission, serving state, backends and TLS.
fn clusters(shared: &Shared, gen: &crate::runtime::Generation) -> Vec<Value> {
    let snap = &gen.config;
    snap
        .clusters
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let now = std::time::Instant::now();
            let state = &gen.clusters[ci].sites;
            let serving = state.serving(now);
            let view = state.view(now);
            let sites: Vec<Value> = c
                .sites
                .iter()
                .enumerate()
                .map(|(si, s)| {
                    let ctl = gen.controllers.get(ci, si);
                    let st = ctl.map(|ctl| ctl.state());
                    let learnt = st.and_then(|s| s.learnt);
                    json!({
                        "name": s.name,
                        "role": s.role.as_str(),
                        "enabled": s.enabled,
                        "serving": serving == Some(si),
                        "up": state.site_is_up(si, now),
                        "limit": st.map_or(0, |s| s.limit),
                        "inflight": st.map_or(0, |s| s.inflight),
                        "queued": st.map_or(0, |s| s.queued),
                        "shed_level": st.map_or(0.0, |s| s.shed_level),
                        "standing_queue": st.is_some_and(|s| s.standing),
                        "tier_costs": ctl.map_or_else(Vec::new, |c| tier_costs(snap, c)),
                        "learnt": learnt.map(|l| json!({
                            "baseline_ms": l.baseline.map(ms),
                            "ceiling_ms": l.ceiling.map(ms),
                            "latency_ms": l.latency.map(ms),
                            "probing": l.probing,
                            "claim": l.claim.map(|c| json!({
                                "reason": c.reason,
                                "ms": ms(c.latency),
                            })),
                        })),
                        "backends": view[si].iter().map(|b| json!({
                            "addr": b.addr.to_string(),
                            "health": if b.drained { "drained" } else if b.ejected { "ejected" } else { b.active.as_str() },
                            "usable": b.usable,
                            "inflight": b.inflight,
                            "last_probe_error": shared.probe_error(&c.name, b.addr),
                        })).collect::<Vec<_>>(),
                        "tls": c.site_tls[si].as_ref().map(|t| json!({
                            "sni": t.sni,
                            "verify": t.verify,
                            "ca": if t.ca.is_some() { "file" } else { "system" },
                            "client_cert": t.client.as_ref().map(cert),
                        })),
                    })
                })
                .collect();
            json!({
                "name": c.name,
                "admission": match snap.admission[ci].mode {
                    AdmissionMode::Adaptive { min, max, .. } => format!("adaptive {min}..{max}"),
                    AdmissionMode::Fixed { limit } => format!("fixed {limit}"),
                    AdmissionMode::Off => "off".to_string(),
                },
                "sites": sites,
            })
        })
        .collect()
}

/// What each tier costs the site's backend against the purchases; the limit
/// leaves out the tiers not `counted` (`admission::cost`).
fn tier_costs(snap: &crate::config::Config, ctl: &crate::admission::Controller) -> Vec<Value> {
    ctl.tier_costs()
        .iter()
        .map(|k| {
            json!({
                "tier": snap.tiers.get(k.tier).map(|t| t.name.as_str()),
                "ratio": (k.ratio * 100.0).round() / 100.0,
                "counted": k.counted,
            })
        })
        .collect()
}

/// A latency in `/status`: milliseconds, to the microsecond.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// An HTTPS listener in `/status`.
fn listener(l: &crate::config::TlsListener) -> Value {
    json!({
        "listen": l.listen.to_string(),
        "h2": l.h2,
        "certs": l.certs.iter().map(|c| {
            let mut v = cert(&c.pair);
            v["server_names"] = json!(c.server_names);
            v["default"] = json!(c.default);
            v
        }).collect::<Vec<_>>(),
    })
}

/// A certificate in `/status`: where it is, what it is, when it expires.
fn cert(pair: &crate::config::CertPair) -> Value {
    let f = &pair.facts;
    let now = crate::tls::now_unix();
    json!({
        "file": pair.cert_path.display().to_string(),
        "subject": f.subject,
        "serial": f.serial,
        "dns_names": f.dns_names,
        "not_after": crate::tls::pem::unix_to_rfc3339(f.not_after_unix),
        "expires_in_days": ((f.not_after_unix - now) as f64 / 86400.0 * 10.0).round() / 10.0,
    })
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
