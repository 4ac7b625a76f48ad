//! Every k2proxy metric, registered once in one registry (names from DESIGN).

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::Config;
use crate::gateway::Outcome;

/// Latency buckets, seconds: from a fast shed (~1 ms) to a slow legacy call.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One tier's histograms, looked up once per config instead of by label on
/// every request.
#[derive(Clone)]
pub struct TierMetrics {
    pub queue_wait: Histogram,
    pub request_duration: Histogram,
}

impl std::fmt::Debug for TierMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierMetrics").finish_non_exhaustive()
    }
}

/// `outcome` label values of `k2_requests_total`, owned by [`Outcome`].
const OUTCOMES: [&str; Outcome::COUNT] = Outcome::LABELS;

/// `code_class` label values of `k2_requests_total`, see [`code_class`].
/// The `kind` label of `k2_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 3] = ["connect", "timeout", "other"];

pub const CODE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The `k2_requests_total` series of one config, by index: (route or none,
/// tier or none, outcome, code class). A series is looked up by label the
/// first time it is counted, then kept, so the per-request cost is an index
/// and an atomic add instead of hashing four labels under a lock.
pub struct RequestCounters {
    vec: IntCounterVec,
    /// Route names, then "none".
    routes: Vec<String>,
    /// Tier names, then "none".
    tiers: Vec<String>,
    cells: Vec<std::sync::OnceLock<IntCounter>>,
}

impl std::fmt::Debug for RequestCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCounters").finish_non_exhaustive()
    }
}

impl RequestCounters {
    pub fn new(vec: &IntCounterVec, routes: &[&str], tiers: &[&str]) -> RequestCounters {
        let with_none = |names: &[&str]| {
            let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            v.push("none".to_string());
            v
        };
        let (routes, tiers) = (with_none(routes), with_none(tiers));
        let n = routes.len() * tiers.len() * OUTCOMES.len() * CODE_CLASSES.len();
        RequestCounters {
            vec: vec.clone(),
            routes,
            tiers,
            cells: (0..n).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// Creates at 0 the series a route's requests usually end in (answered
    /// 2xx/4xx/5xx, shed, rate limited, failed) for each (route, tier), and
    /// unrouted requests', so dashboards show 0 before the first of each.
    pub fn precreate(&self, routes: impl IntoIterator<Item = (usize, usize)>) {
        let class = |c: &str| CODE_CLASSES.iter().position(|x| *x == c).unwrap_or(5);
        for (route, tier) in routes {
            for (outcome, c) in [
                (Outcome::Proxied, "2xx"),
                (Outcome::Proxied, "4xx"),
                (Outcome::Proxied, "5xx"),
                (
                    Outcome::Shed(crate::admission::gate::ShedReason::Forced),
                    "5xx",
                ),
                (Outcome::RateLimited, "4xx"),
                (Outcome::Error, "5xx"),
            ] {
                self.get(Some(route), Some(tier), outcome, class(c));
            }
        }
        self.get(None, None, Outcome::NoRoute, class("4xx"));
    }

    /// The counter of (`route`, `tier`, `outcome`, `CODE_CLASSES[class]`);
    /// `None` (or an index out of range) is "none".
    pub fn get(
        &self,
        route: Option<usize>,
        tier: Option<usize>,
        outcome: Outcome,
        class: usize,
    ) -> &IntCounter {
        let outcome = outcome.index();
        // The last name of each list is "none" (and "error" for outcomes).
        let last = |i: Option<usize>, len: usize| i.unwrap_or(len).min(len - 1);
        let r = last(route, self.routes.len());
        let t = last(tier, self.tiers.len());
        let (o, c) = (
            last(Some(outcome), OUTCOMES.len()),
            last(Some(class), CODE_CLASSES.len()),
        );
        let i = ((r * self.tiers.len() + t) * OUTCOMES.len() + o) * CODE_CLASSES.len() + c;
        self.cells[i].get_or_init(|| {
            self.vec.with_label_values(&[
                self.routes[r].as_str(),
                self.tiers[t].as_str(),
                OUTCOMES[o],
                CODE_CLASSES[c],
            ])
        })
    }
}

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    /// `k2_requests_total{route,tier,outcome,code_class}`.
    pub requests: IntCounterVec,
    /// `k2_request_duration_seconds{tier}`.
    pub request_duration: HistogramVec,
    /// `k2_upstream_duration_seconds{cluster,site}`: request sent to
    /// response header, per try.
    pub upstream_duration: HistogramVec,
    /// `k2_config_generation`: bumps on every config that takes effect.
    pub config_generation: IntGauge,
    /// `k2_config_reloads_total{result}`.
    pub config_reloads: IntCounterVec,
    /// `k2_upstream_errors_total{cluster,site,kind}`.
    pub upstream_errors: IntCounterVec,
    /// `k2_inflight{cluster,site,tier}`: permits held.
    pub inflight: IntGaugeVec,
    /// `k2_admission_limit{cluster,site}`.
    pub admission_limit: IntGaugeVec,
    /// `k2_admission_baseline_seconds{cluster,site}`: the uncongested
    /// latency an adaptive limit learned (0 before it has one).
    pub admission_baseline: GaugeVec,
    /// `k2_admission_claim_seconds{cluster,site}`: the latency an adaptive
    /// limit tolerates above its ceiling because its purchases wait (0 when
    /// it claims nothing).
    pub admission_claim: GaugeVec,
    /// `k2_admission_tier_cost_ratio{cluster,site,tier}`: a tier's backend
    /// latency over the purchases' at the same time (0 until it is known).
    pub admission_tier_cost: GaugeVec,
    /// `k2_shed_level{cluster,site}`: lowest tiers refused outright
    /// (fractional: 2.25 is two tiers and a quarter of the next).
    pub shed_level: GaugeVec,
    /// `k2_queue_depth{cluster,site}`: requests waiting for admission.
    pub queue_depth: IntGaugeVec,
    /// `k2_queue_wait_seconds{tier}`: time from arrival to admission or shed.
    pub queue_wait: HistogramVec,
    /// `k2_shed_total{tier,reason}`.
    pub shed: IntCounterVec,
    /// `k2_backend_up{cluster,site,backend}`: 1 when the backend takes requests.
    pub backend_up: IntGaugeVec,
    /// `k2_site_up{cluster,site}`: 1 when a backend of the site takes requests.
    pub site_up: IntGaugeVec,
    /// `k2_failovers_total{cluster,from,to}`: changes of the serving site.
    pub failovers: IntCounterVec,
    /// `k2_retries_total{cluster,reason}`: connect, idempotent, idempotency_key.
    pub retries: IntCounterVec,
    /// `k2_spills_total{cluster,from,to}`: admitted on another site's spare capacity.
    pub spills: IntCounterVec,
    /// `k2_cross_site_retries_total{cluster,from,to}`: a retry that changed site.
    pub cross_site_retries: IntCounterVec,
    /// `k2_xmlrpc_requests_total{route,method}`: method is a configured
    /// name, `unmatched`, or why none was read (bounded).
    pub xmlrpc: IntCounterVec,
    /// `k2_connections_open`: client connections open (set when scraped).
    pub connections_open: IntGauge,
    /// `k2_connections_refused_total{reason}`: closed at once by a connection limit.
    pub connections_refused: IntCounterVec,
    /// `k2_tls_handshake_failures_total{reason}`: `error` or `timeout`.
    pub tls_handshake_failures: IntCounterVec,
    /// `k2_tls_cert_expiry_seconds{cert,use}`: time left, set when scraped.
    pub tls_cert_expiry: GaugeVec,
    /// `k2_header_timeouts_total`: connections closed by `[server].header_timeout`.
    pub header_timeouts: IntCounter,
    /// `k2_draining`: 1 from SIGTERM until the process exits.
    pub draining: IntGauge,
    /// `k2_rate_limit_store_up`: 1 while the fleet's rate-limit store answers
    /// (also 1 when the policy names none), 0 while fleet limits fall back.
    pub rate_limit_store_up: IntGauge,
    /// `k2_rate_limit_fallbacks_total`: fleet rate-limit checks decided
    /// locally because the store was down or slow.
    pub rate_limit_fallbacks: IntCounter,
    /// `k2_log_lines_dropped_total`: log lines the writer could not keep up
    /// with (`logbuf::DROPPED`, brought up to date when scraped).
    log_dropped: IntCounter,
    /// `k2_admission_state_write_failing`: 1 while the last write of
    /// `[server] admission_state` failed.
    pub admission_state_write_failing: IntGauge,
    process: crate::process::ProcessMetrics,
}

fn counters(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

fn gauges(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

fn gauges_f64(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let m = GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(name, help).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let m = IntCounter::new(name, help).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

fn histograms(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    let m = HistogramVec::new(opts, labels).expect("static metric definition");
    r.register(Box::new(m.clone()))
        .expect("each metric is registered once");
    m
}

impl Metrics {
    /// The histograms of the tier called `tier`.
    pub fn tier(&self, tier: &str) -> TierMetrics {
        TierMetrics {
            queue_wait: self.queue_wait.with_label_values(&[tier]),
            request_duration: self.request_duration.with_label_values(&[tier]),
        }
    }

    pub fn new() -> Metrics {
        let r = Registry::new();
        let site = &["cluster", "site"];
        let pair = &["cluster", "from", "to"];
        let config_generation = gauge(
            &r,
            "k2_config_generation",
            "Generation of the config in force; 1 at start, +1 per successful reload.",
        );
        let shed_level = GaugeVec::new(
            Opts::new(
                "k2_shed_level",
                "How many of the lowest sheddable tiers are refused outright (2.25: two tiers and a quarter of the next).",
            ),
            site,
        )
        .expect("static metric definition");
        r.register(Box::new(shed_level.clone()))
            .expect("each metric is registered once");
        let m = Metrics {
            requests: counters(&r, "k2_requests_total", "Requests by route, tier, outcome and status class.", &["route", "tier", "outcome", "code_class"]),
            request_duration: histograms(&r, "k2_request_duration_seconds", "Time from request arrival to the end of the response, by tier.", &["tier"]),
            upstream_duration: histograms(&r, "k2_upstream_duration_seconds", "Time from sending a request to a backend to its response header (the backend's latency, without k2proxy's queue), by cluster and site.", site),
            config_generation,
            config_reloads: counters(&r, "k2_config_reloads_total", "Config reload attempts by result (ok, error).", &["result"]),
            upstream_errors: counters(&r, "k2_upstream_errors_total", "Requests that failed at the backend, by cluster, site and kind (connect, timeout, other).", &["cluster", "site", "kind"]),
            inflight: gauges(&r, "k2_inflight", "Requests holding an admission permit.", &["cluster", "site", "tier"]),
            admission_limit: gauges(&r, "k2_admission_limit", "Concurrency limit in force.", site),
            admission_baseline: gauges_f64(&r, "k2_admission_baseline_seconds", "The backend's uncongested latency the adaptive limit learned (0 before it has one, or for a fixed limit): a fleet's instances should agree on it.", site),
            admission_claim: gauges_f64(&r, "k2_admission_claim_seconds", "The latency the adaptive limit tolerates above its ceiling because its purchases wait (0 when it claims nothing): in a fleet, the instance that claims takes a larger share of the backend.", site),
            admission_tier_cost: gauges_f64(&r, "k2_admission_tier_cost_ratio", "A tier's backend latency over the purchases' at the same time (0 until 16 of its requests have come back): beyond 1.25 either way its latency is left out of what the adaptive limit learns.", &["cluster", "site", "tier"]),
            shed_level,
            queue_depth: gauges(&r, "k2_queue_depth", "Requests waiting for admission.", site),
            queue_wait: histograms(&r, "k2_queue_wait_seconds", "Time from arrival to admission (0 when admitted at once) or to a queue timeout.", &["tier"]),
            shed: counters(&r, "k2_shed_total", "Requests answered without reaching a backend, by tier and reason.", &["tier", "reason"]),
            backend_up: gauges(&r, "k2_backend_up", "1 when the backend takes new requests (checks up or not yet checked, not ejected, not drained).", &["cluster", "site", "backend"]),
            site_up: gauges(&r, "k2_site_up", "1 when a backend of the site takes new requests.", site),
            failovers: counters(&r, "k2_failovers_total", "Changes of a cluster's serving site.", pair),
            retries: counters(&r, "k2_retries_total", "Requests sent again, by cluster and reason (connect, idempotent, idempotency_key).", &["cluster", "reason"]),
            spills: counters(&r, "k2_spills_total", "Requests admitted on another site's spare capacity (tiers with spill = true), by cluster and sites.", pair),
            cross_site_retries: counters(&r, "k2_cross_site_retries_total", "Retries that went to another site than the request's previous try, by cluster and sites.", pair),
            xmlrpc: counters(&r, "k2_xmlrpc_requests_total", "Requests classified by XML-RPC method: a configured name, unmatched, or why none was read.", &["route", "method"]),
            connections_open: gauge(&r, "k2_connections_open", "Client connections open (the admin port's not counted)."),
            connections_refused: counters(&r, "k2_connections_refused_total", "Client connections closed at once by [server].max_connections or max_connections_per_client, by reason.", &["reason"]),
            tls_handshake_failures: counters(&r, "k2_tls_handshake_failures_total", "Client TLS handshakes that failed (error) or did not finish within header_timeout (timeout).", &["reason"]),
            tls_cert_expiry: gauges_f64(&r, "k2_tls_cert_expiry_seconds", "Seconds until a certificate in use expires (negative: expired), by file and use (server, client).", &["cert", "use"]),
            header_timeouts: counter(&r, "k2_header_timeouts_total", "Client connections closed because a request's headers did not arrive within [server].header_timeout."),
            draining: gauge(&r, "k2_draining", "1 while the process drains after SIGTERM (/healthz answers 503)."),
            rate_limit_store_up: gauge(&r, "k2_rate_limit_store_up", "1 while the fleet's rate-limit store (Redis) answers, or when the policy names none; 0 while scope = fleet limits fall back to per_second / fleet_size per instance."),
            rate_limit_fallbacks: counter(&r, "k2_rate_limit_fallbacks_total", "Fleet rate-limit checks decided on this instance because the store was down or slower than its timeout."),
            admission_state_write_failing: gauge(&r, "k2_admission_state_write_failing", "1 while the last write of [server] admission_state failed (it is written every second): a restart would start its limits at initial, or from an older file."),
            log_dropped: counter(&r, "k2_log_lines_dropped_total", "Log lines (the access log's mostly) dropped because the log output could not keep up; requests never wait for it."),
            process: crate::process::ProcessMetrics::register(&r),
            registry: r,
        };
        // Series that alerts take increase() of must exist before their first
        // event, or the first event is invisible (a series first seen at 1).
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        for refusal in crate::edge::Refusal::ALL {
            m.connections_refused.with_label_values(&[refusal.as_str()]);
        }
        for reason in ["error", "timeout"] {
            m.tls_handshake_failures.with_label_values(&[reason]);
        }
        m.rate_limit_store_up.set(1);
        m
    }

    /// Creates at 0 the series of every known label value of `config`
    /// (tiers, sites and their pairs, clusters, reasons, kinds), at start and
    /// after each reload: a counter first seen at 1 hides its first event
    /// from `increase()`/`changes()`, and a dashboard shows "No data" for a
    /// series that was never created.
    pub fn precreate(&self, config: &Config) {
        for t in &config.tiers {
            for reason in crate::admission::gate::ShedReason::ALL {
                self.shed
                    .with_label_values(&[t.name.as_str(), reason.as_str()]);
            }
            self.shed
                .with_label_values(&[t.name.as_str(), "rate_limited"]);
        }
        for c in &config.clusters {
            for reason in crate::gateway::RetryReason::ALL {
                self.retries
                    .with_label_values(&[c.name.as_str(), reason.as_str()]);
            }
            for from in &c.sites {
                for kind in UPSTREAM_ERROR_KINDS {
                    self.upstream_errors.with_label_values(&[
                        c.name.as_str(),
                        from.name.as_str(),
                        kind,
                    ]);
                }
                for to in c.sites.iter().filter(|to| to.name != from.name) {
                    let labels = [c.name.as_str(), from.name.as_str(), to.name.as_str()];
                    self.failovers.with_label_values(&labels);
                    self.spills.with_label_values(&labels);
                    self.cross_site_retries.with_label_values(&labels);
                }
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        self.process.refresh();
        let dropped = crate::logbuf::DROPPED.load(std::sync::atomic::Ordering::Relaxed);
        self.log_dropped
            .inc_by(dropped.saturating_sub(self.log_dropped.get()));
        let mut buf = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The index in [`CODE_CLASSES`] of `status`'s class (`2xx`, `4xx`, …);
/// "none" when no response was sent (`status` 0).
pub fn code_class(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => CODE_CLASSES.len() - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_classes_cover_every_status() {
        let class = |s| CODE_CLASSES[code_class(s)];
        assert_eq!(class(101), "1xx");
        assert_eq!(class(200), "2xx");
        assert_eq!(class(304), "3xx");
        assert_eq!(class(429), "4xx");
        assert_eq!(class(599), "5xx");
        assert_eq!(class(0), "none");
        assert_eq!(class(600), "none");
        assert_eq!(class(99), "none");
    }

    #[test]
    fn request_counters_count_under_their_labels() {
        let m = Metrics::new();
        let c = RequestCounters::new(&m.requests, &["pay", "api"], &["purchase", "admin"]);
        c.get(Some(1), Some(0), Outcome::Proxied, code_class(200))
            .inc();
        c.get(Some(1), Some(0), Outcome::Proxied, code_class(204))
            .inc();
        c.get(None, None, Outcome::NoRoute, code_class(404)).inc();
        // Out of range is "none", never another series.
        c.get(Some(7), Some(9), Outcome::Error, code_class(0)).inc();
        let text = String::from_utf8(m.encode()).unwrap();
        for series in [
            r#"k2_requests_total{code_class="2xx",outcome="proxied",route="api",tier="purchase"} 2"#,
            r#"k2_requests_total{code_class="4xx",outcome="no_route",route="none",tier="none"} 1"#,
            r#"k2_requests_total{code_class="none",outcome="error",route="none",tier="none"} 1"#,
        ] {
            assert!(text.contains(series), "missing {series}:\n{text}");
        }
        assert_eq!(text.matches("k2_requests_total{").count(), 3, "{text}");
    }

    #[test]
    fn request_counters_of_two_configs_share_a_series() {
        let m = Metrics::new();
        let old = RequestCounters::new(&m.requests, &["pay"], &["purchase"]);
        let new = RequestCounters::new(&m.requests, &["api", "pay"], &["admin", "purchase"]);
        old.get(Some(0), Some(0), Outcome::Proxied, 1).inc();
        new.get(Some(1), Some(1), Outcome::Proxied, 1).inc();
        let text = String::from_utf8(m.encode()).unwrap();
        let series = r#"k2_requests_total{code_class="2xx",outcome="proxied",route="pay",tier="purchase"} 2"#;
        assert!(text.contains(series), "{text}");
    }

    #[test]
    fn process_metrics_are_exported() {
        let text = String::from_utf8(super::Metrics::new().encode()).unwrap();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("\n{name} ")),
                "missing {name}:\n{text}"
            );
        }
    }
}
