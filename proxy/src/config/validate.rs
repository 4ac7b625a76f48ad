//! Raw TOML structs → checked [`Config`]: every value parsed, every name
//! resolved, every problem collected with its location.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use toml::Spanned;

use super::raw;
use super::*;
use crate::classify::{HeaderMatch, HostMatch, Matcher, PathMatch, Route};

/// Most tiers a policy may name ([`TierId`] is a byte, and shedding walks them).
const MAX_TIERS: usize = 64;

/// Collects the problems of one file.
pub(super) struct Check<'a> {
    pub(super) src: &'a SourceFile,
    errors: &'a mut Vec<ConfigError>,
}

impl Check<'_> {
    pub(super) fn err<T>(&mut self, spanned: &Spanned<T>, message: impl Into<String>) {
        self.errors
            .push(self.src.error(Some(spanned.span()), message));
    }

    fn duration(
        &mut self,
        v: Option<&Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(v, format!("`{field}` must be greater than zero"));
                default
            }
            Err(_) => {
                self.err(
                    v,
                    format!(
                        "invalid duration {:?} for `{field}`: expected a number with a unit, like \"500ms\", \"2s\" or \"1m\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn addr(&mut self, v: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match SocketAddr::from_str(v.get_ref().trim()) {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v,
                    format!(
                        "invalid {what} address {:?}: expected ip:port, like \"127.0.0.1:9001\" or \"[::1]:9001\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A duration within `range` (inclusive; zero allowed when the range
    /// starts at zero).
    fn duration_in(
        &mut self,
        v: Option<&Spanned<String>>,
        field: &str,
        default: Duration,
        range: (Duration, Duration),
    ) -> Duration {
        let Some(v) = v else { return default };
        let d = match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) => d,
            Err(_) => return self.duration(Some(v), field, default),
        };
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if d < range.0 || d > range.1 {
            let message = if d.is_zero() {
                format!("`{field}` must be greater than zero")
            } else if d > range.1 {
                format!(
                    "`{field}` is longer than {}: expected at most {:?}",
                    show(range.1),
                    show(range.1)
                )
            } else {
                format!(
                    "`{field}` is shorter than {}: expected at least {:?}",
                    show(range.0),
                    show(range.0)
                )
            };
            self.err(v, message);
            return default;
        }
        d
    }

    fn int(
        &mut self,
        v: Option<&Spanned<i64>>,
        field: &str,
        range: (i64, i64),
        default: u32,
    ) -> u32 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < range.0 || n > range.1 {
            self.err(
                v,
                format!(
                    "`{field}` is {n}: expected a whole number from {} to {}",
                    range.0, range.1
                ),
            );
            return default;
        }
        n as u32
    }

    fn share(
        &mut self,
        v: Option<&Spanned<f64>>,
        field: &str,
        low_inclusive: bool,
        default: f64,
    ) -> f64 {
        let Some(v) = v else { return default };
        let x = *v.get_ref();
        let ok = if low_inclusive {
            (0.0..=1.0).contains(&x)
        } else {
            x > 0.0 && x <= 1.0
        };
        if !ok {
            let range = if low_inclusive { "[0, 1]" } else { "(0, 1]" };
            self.err(v, format!("`{field}` is {x}: expected a share in {range}"));
            return default;
        }
        x
    }

    fn header_name(&mut self, v: &Spanned<String>, field: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(v.get_ref().trim().as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(
                    v,
                    format!(
                        "`{field}` {:?} is not a valid HTTP header name",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }
}

/// The tier names of a policy, for resolving references from either file.
struct TierNames(HashMap<String, TierId>);

impl TierNames {
    fn resolve(&self, c: &mut Check<'_>, name: &Spanned<String>, field: &str) -> Option<TierId> {
        let id = self.0.get(name.get_ref()).copied();
        if id.is_none() {
            let mut known: Vec<_> = self.0.iter().collect();
            known.sort_by_key(|(_, id)| **id);
            let known: Vec<&str> = known.iter().map(|(n, _)| n.as_str()).collect();
            c.err(
                name,
                format!(
                    "unknown tier {:?} in `{field}`: expected one of the policy's tiers: {}",
                    name.get_ref(),
                    known.join(", ")
                ),
            );
        }
        id
    }
}

pub(super) fn config(
    routes_src: &SourceFile,
    routes: raw::RoutesFile,
    policy_src: &SourceFile,
    policy: raw::PolicyFile,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();

    // The policy first: routes refer to its tiers.
    let mut pc = Check {
        src: policy_src,
        errors: &mut errors,
    };
    let tier_names = tier_names(&mut pc, &policy.tiers);
    let tiers = tiers(&mut pc, &policy, &tier_names);
    let shedding = shedding(&mut pc, policy.shedding.as_ref(), &tier_names);
    let retries = retries(&mut pc, policy.retries.as_ref());
    let trust = trust(&mut pc, policy.trust.as_ref());

    let mut rc = Check {
        src: routes_src,
        errors: &mut errors,
    };
    let server = server(&mut rc, &routes.server);
    let clusters = clusters(&mut rc, &routes.clusters);
    let cluster_ids: HashMap<&str, ClusterId> = routes
        .clusters
        .keys()
        .enumerate()
        .map(|(i, k)| (k.get_ref().as_str(), ClusterId(i as u16)))
        .collect();
    let route_list = route_list(&mut rc, &routes.routes, &tier_names, &cluster_ids);
    if route_list.is_empty() && routes.routes.is_empty() {
        rc.errors.push(routes_src.error(
            None,
            "no [[routes]]: every request would get 404; expected at least one route",
        ));
    }

    let mut pc = Check {
        src: policy_src,
        errors: &mut errors,
    };
    let admission = admission(&mut pc, &policy.admission, &routes.clusters);
    let route_ids: HashMap<&str, usize> = routes
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.get_ref().as_str(), i))
        .collect();
    let rate_limit_store = rate_limit_store(&mut pc, policy.rate_limit_store.as_ref());
    let rate_limits = rate_limits(
        &mut pc,
        &policy.rate_limit,
        &route_ids,
        &tier_names,
        rate_limit_store.is_some(),
    );

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        routes_path: routes_src.path.clone(),
        policy_path: policy_src.path.clone(),
        server,
        tiers,
        clusters,
        routes: RouteTable::new(route_list),
        shedding,
        admission,
        rate_limits,
        rate_limit_store,
        retries,
        trust,
    })
}

fn tier_names(c: &mut Check<'_>, list: &Spanned<Vec<Spanned<String>>>) -> TierNames {
    let mut names = HashMap::new();
    if list.get_ref().is_empty() {
        c.err(
            list,
            "`tiers` is empty: expected the tier names, highest priority first",
        );
    }
    if list.get_ref().len() > MAX_TIERS {
        c.err(
            list,
            format!(
                "{} tiers: expected at most {MAX_TIERS}",
                list.get_ref().len()
            ),
        );
    }
    for name in list.get_ref().iter().take(MAX_TIERS) {
        let n = name.get_ref();
        if n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            c.err(
                name,
                format!("tier name {n:?}: expected letters, digits, '_' or '-'"),
            );
        } else if names.contains_key(n) {
            c.err(
                name,
                format!("duplicate tier {n:?}: tier names must be unique"),
            );
        } else {
            let id = TierId(names.len() as u8);
            names.insert(n.clone(), id);
        }
    }
    TierNames(names)
}

fn tiers(c: &mut Check<'_>, policy: &raw::PolicyFile, names: &TierNames) -> Vec<Tier> {
    let mut tiers: Vec<Tier> = {
        let mut sorted: Vec<(&String, &TierId)> = names.0.iter().collect();
        sorted.sort_by_key(|(_, id)| **id);
        sorted
            .into_iter()
            .map(|(name, _)| Tier {
                name: name.clone(),
                // Tier names are letters, digits, '_' and '-' (checked above).
                header: http::HeaderValue::from_str(name).expect("a tier name is a header value"),
                max_queue_wait: Duration::from_millis(500),
                max_share: 1.0,
                shed_status: 503,
                spill: false,
            })
            .collect()
    };
    for (name, t) in &policy.tier {
        let Some(id) = names.resolve(c, name, "[tier.<name>]") else {
            continue;
        };
        let tier = &mut tiers[id.0 as usize];
        tier.max_queue_wait = c.duration(
            t.max_queue_wait.as_ref(),
            "max_queue_wait",
            tier.max_queue_wait,
        );
        tier.max_share = c.share(t.max_share.as_ref(), "max_share", false, 1.0);
        tier.shed_status = c.int(t.shed_status.as_ref(), "shed_status", (400, 599), 503) as u16;
        tier.spill = t.spill.unwrap_or(false);
    }
    tiers
}

fn shedding(c: &mut Check<'_>, raw: Option<&raw::SheddingRaw>, names: &TierNames) -> Shedding {
    let mut s = Shedding {
        target_queue_delay: Duration::from_millis(20),
        never_shed: Vec::new(),
        force_shed: Vec::new(),
        retry_after_s: 30,
        refuse_standing_queue: false,
        standing_after: Duration::from_secs(1),
    };
    let Some(raw) = raw else { return s };
    s.refuse_standing_queue = raw.refuse_standing_queue.unwrap_or(false);
    s.standing_after = c.duration_in(
        raw.standing_after.as_ref(),
        "standing_after",
        s.standing_after,
        (Duration::from_millis(100), Duration::from_secs(30)),
    );
    s.target_queue_delay = c.duration(
        raw.target_queue_delay.as_ref(),
        "target_queue_delay",
        s.target_queue_delay,
    );
    s.never_shed = raw
        .never_shed
        .iter()
        .filter_map(|n| names.resolve(c, n, "never_shed"))
        .collect();
    s.force_shed = raw
        .force_shed
        .iter()
        .filter_map(|n| names.resolve(c, n, "force_shed"))
        .collect();
    for (n, id) in raw.force_shed.iter().zip(&s.force_shed) {
        if s.never_shed.contains(id) {
            c.err(
                n,
                format!(
                    "tier {:?} is in both `never_shed` and `force_shed`: expected one or the other",
                    n.get_ref()
                ),
            );
        }
    }
    let retry_after = c.duration(
        raw.retry_after.as_ref(),
        "retry_after",
        Duration::from_secs(30),
    );
    // retry-after carries whole seconds; round up so a client never comes back early.
    s.retry_after_s = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    s
}

fn retries(c: &mut Check<'_>, raw: Option<&raw::RetriesRaw>) -> Retries {
    let mut r = Retries {
        budget: 0.1,
        idempotency_header: HeaderName::from_static("idempotency-key"),
    };
    let Some(raw) = raw else { return r };
    r.budget = c.share(raw.budget.as_ref(), "budget", true, r.budget);
    if let Some(h) = &raw.idempotency_header {
        if let Some(h) = c.header_name(h, "idempotency_header") {
            r.idempotency_header = h;
        }
    }
    r
}

fn trust(c: &mut Check<'_>, raw: Option<&raw::TrustRaw>) -> Trust {
    let mut t = Trust::default();
    let Some(raw) = raw else { return t };
    t.tier_header_from = cidrs(c, &raw.tier_header_from, "tier_header_from");
    t.forwarded_for_from = cidrs(c, &raw.forwarded_for_from, "forwarded_for_from");
    t
}

/// `[rate_limit_store]`: a Redis URL the client library accepts (nothing is
/// connected here), the fleet's size, a timeout and a lease batch.
fn rate_limit_store(
    c: &mut Check<'_>,
    raw: Option<&Spanned<raw::RateLimitStoreRaw>>,
) -> Option<RateLimitStore> {
    let spanned = raw?;
    let raw = spanned.get_ref();
    let url = raw.redis.get_ref().trim().to_string();
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
        c.err(
            &raw.redis,
            format!("`redis` {url:?} is not a Redis URL ({e}): expected redis://host:port/db"),
        );
    }
    if raw.fleet_size.is_none() {
        c.err(
            spanned,
            "[rate_limit_store] has no `fleet_size`: expected the number of k2proxy instances sharing the store (each allows per_second / fleet_size while the store is down)",
        );
    }
    Some(RateLimitStore {
        redis: url,
        fleet_size: c.int(raw.fleet_size.as_ref(), "fleet_size", (1, 1000), 1),
        timeout: c.duration_in(
            raw.timeout.as_ref(),
            "timeout",
            Duration::from_millis(50),
            (Duration::from_millis(1), Duration::from_secs(1)),
        ),
        batch: raw
            .batch
            .as_ref()
            .map(|b| c.int(Some(b), "batch", (1, 10_000), 1)),
    })
}

/// A list of networks; a bare address is a /32 or /128.
fn cidrs(c: &mut Check<'_>, list: &[Spanned<String>], field: &str) -> Vec<IpNet> {
    let mut out = Vec::new();
    for cidr in list {
        let s = cidr.get_ref().trim();
        let parsed = IpNet::from_str(s).or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => out.push(net),
            Err(_) => c.err(
                cidr,
                format!("invalid CIDR {s:?} in `{field}`: expected an address or network, like \"10.0.0.0/8\" or \"127.0.0.1\""),
            ),
        }
    }
    out
}

/// `[server] admission_state`: a path relative to the routes file's
/// directory; an empty one is refused.
fn admission_state(c: &mut Check<'_>, raw: Option<&Spanned<String>>) -> Option<PathBuf> {
    let p = raw?;
    if p.get_ref().trim().is_empty() {
        c.err(
            p,
            "`admission_state` is empty: expected a file path (leave the key out to keep no state)",
        );
        return None;
    }
    let base = c.src.path.parent().unwrap_or(std::path::Path::new("."));
    Some(base.join(p.get_ref()))
}

/// `listen` and `admin`: the proxy's listeners (at least one, none twice)
/// and the admin address, which must be none of them.
fn listeners(c: &mut Check<'_>, raw: &raw::ServerRaw) -> (Vec<SocketAddr>, SocketAddr) {
    let mut listen = Vec::new();
    if raw.listen.get_ref().is_empty() {
        c.err(
            &raw.listen,
            "`listen` is empty: expected at least one ip:port",
        );
    }
    for l in raw.listen.get_ref() {
        if let Some(a) = c.addr(l, "listen") {
            if listen.contains(&a) {
                c.err(l, format!("duplicate listener {a}"));
            }
            listen.push(a);
        }
    }
    let admin = match &raw.admin {
        Some(a) => c.addr(a, "admin").inspect(|addr| {
            if listen.contains(addr) {
                c.err(
                    a,
                    format!(
                        "admin address {addr} is also a proxy listener: expected a port of its own"
                    ),
                );
            }
        }),
        None => None,
    }
    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9901)));
    (listen, admin)
}

fn server(c: &mut Check<'_>, raw: &raw::ServerRaw) -> Server {
    let (listen, admin) = listeners(c, raw);
    let threads = c.int(raw.threads.as_ref(), "threads", (1, 1024), 2) as usize;
    let upgrade_sock = match &raw.upgrade_sock {
        Some(p) if p.get_ref().trim().is_empty() => {
            c.err(
                p,
                "`upgrade_sock` is empty: expected a path for a unix socket",
            );
            PathBuf::new()
        }
        Some(p) => PathBuf::from(p.get_ref()),
        // One per instance: two k2proxy on one machine must not share it.
        None => PathBuf::from(format!(
            "/tmp/k2proxy-{}.upgrade.sock",
            listen.first().map_or(0, |a| a.port())
        )),
    };
    let admission_state = admission_state(c, raw.admission_state.as_ref());
    let max_header_bytes = c.int(
        raw.max_header_bytes.as_ref(),
        "max_header_bytes",
        (1024, 1_048_576),
        32 * 1024,
    ) as usize;
    let idle_timeout = c.duration_in(
        raw.idle_timeout.as_ref(),
        "idle_timeout",
        Duration::from_secs(60),
        (Duration::from_secs(1), Duration::from_secs(3600)),
    );
    let header_timeout = c.duration_in(
        raw.header_timeout.as_ref(),
        "header_timeout",
        Duration::from_secs(10),
        (Duration::from_millis(100), Duration::from_secs(600)),
    );
    let keepalive_requests = c.int(
        raw.keepalive_requests.as_ref(),
        "keepalive_requests",
        (1, 1_000_000_000),
        1000,
    ) as u64;
    let keepalive_time = c.duration_in(
        raw.keepalive_time.as_ref(),
        "keepalive_time",
        Duration::from_secs(60),
        (Duration::from_secs(1), Duration::from_secs(24 * 3600)),
    );
    let drain_delay = c.duration_in(
        raw.drain_delay.as_ref(),
        "drain_delay",
        Duration::from_secs(5),
        (Duration::ZERO, Duration::from_secs(300)),
    );
    let max_connections = raw
        .max_connections
        .as_ref()
        .map(|v| c.int(Some(v), "max_connections", (1, 10_000_000), 1));
    let max_connections_per_client = c.int(
        raw.max_connections_per_client.as_ref(),
        "max_connections_per_client",
        (1, 10_000_000),
        1000,
    );
    let tls = super::tls::listeners(c, &raw.tls, &listen, admin);
    Server {
        listen,
        admin,
        threads,
        upgrade_sock,
        admission_state,
        max_header_bytes,
        idle_timeout,
        header_timeout,
        keepalive_requests,
        keepalive_time,
        max_connections,
        max_connections_per_client,
        drain_delay,
        proxy_protocol_from: cidrs(c, &raw.proxy_protocol_from, "proxy_protocol_from"),
        tls,
    }
}

fn clusters(
    c: &mut Check<'_>,
    raw: &std::collections::BTreeMap<Spanned<String>, raw::ClusterRaw>,
) -> Vec<Cluster> {
    let mut out = Vec::new();
    for (name, cl) in raw {
        let failover = match cl.failover.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "active-passive")) => failover::Mode::ActivePassive,
            Some((_, "active-active")) => failover::Mode::ActiveActive,
            Some((f, other)) => {
                c.err(f, format!("unknown failover mode {other:?}: expected \"active-passive\" or \"active-active\""));
                failover::Mode::ActivePassive
            }
        };
        let balance = match cl.balance.as_ref().map(|b| (b, b.get_ref().as_str())) {
            None | Some((_, "round-robin")) => failover::Balance::RoundRobin,
            Some((_, "least-inflight")) => failover::Balance::LeastInflight,
            Some((b, other)) => {
                c.err(
                    b,
                    format!(
                        "unknown balance {other:?}: expected \"round-robin\" or \"least-inflight\""
                    ),
                );
                failover::Balance::RoundRobin
            }
        };
        let connect_timeout = c.duration(
            cl.connect_timeout.as_ref(),
            "connect_timeout",
            Duration::from_millis(500),
        );
        let health = health(c, cl.health.as_ref());
        let outlier = outlier(c, cl.outlier.as_ref());
        let sites = sites(c, name, cl, failover);
        let settings = failover::Settings {
            mode: failover,
            balance,
            thresholds: failover::Thresholds {
                rise: health.rise,
                fall: health.fall,
            },
            outlier,
        };
        let site_tls = cl
            .sites
            .get_ref()
            .iter()
            .map(|s| s.tls.as_ref().and_then(|t| super::tls::upstream(c, t)))
            .collect();
        out.push(Cluster {
            name: name.get_ref().clone(),
            connect_timeout,
            health,
            sites,
            settings,
            site_tls,
        });
    }
    out
}

fn outlier(c: &mut Check<'_>, raw: Option<&raw::OutlierRaw>) -> failover::Outlier {
    let mut o = failover::Outlier::default();
    let Some(raw) = raw else { return o };
    o.consecutive = c.int(
        raw.consecutive_failures.as_ref(),
        "consecutive_failures",
        (1, 1000),
        o.consecutive,
    );
    o.base = c.duration(raw.base_ejection.as_ref(), "base_ejection", o.base);
    o.max = c.duration(raw.max_ejection.as_ref(), "max_ejection", o.max);
    o.max_share = c.share(
        raw.max_ejected_share.as_ref(),
        "max_ejected_share",
        false,
        o.max_share,
    );
    if o.max < o.base {
        if let Some(m) = &raw.max_ejection {
            c.err(m, "`max_ejection` is shorter than `base_ejection`");
        }
    }
    o
}

fn health(c: &mut Check<'_>, raw: Option<&raw::HealthRaw>) -> HealthCheck {
    let mut h = HealthCheck {
        path: "/health".into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(300),
        rise: 2,
        fall: 2,
    };
    let Some(raw) = raw else { return h };
    if let Some(p) = &raw.path {
        if p.get_ref().starts_with('/') {
            h.path = p.get_ref().clone();
        } else {
            c.err(
                p,
                format!("health `path` {:?} must start with '/'", p.get_ref()),
            );
        }
    }
    h.interval = c.duration(raw.interval.as_ref(), "interval", h.interval);
    h.timeout = c.duration(raw.timeout.as_ref(), "timeout", h.timeout);
    h.rise = c.int(raw.rise.as_ref(), "rise", (1, 100), h.rise);
    h.fall = c.int(raw.fall.as_ref(), "fall", (1, 100), h.fall);
    h
}

fn sites(
    c: &mut Check<'_>,
    cluster: &Spanned<String>,
    raw: &raw::ClusterRaw,
    mode: failover::Mode,
) -> Vec<failover::Site> {
    let mut out: Vec<failover::Site> = Vec::new();
    if raw.sites.get_ref().is_empty() {
        c.err(
            &raw.sites,
            format!(
                "cluster {:?} has no sites: expected at least one [[clusters.{}.sites]]",
                cluster.get_ref(),
                cluster.get_ref()
            ),
        );
    }
    let mut seen_backends = HashSet::new();
    for s in raw.sites.get_ref() {
        if out.iter().any(|o| &o.name == s.name.get_ref()) {
            c.err(
                &s.name,
                format!(
                    "duplicate site {:?} in cluster {:?}: site names must be unique",
                    s.name.get_ref(),
                    cluster.get_ref()
                ),
            );
        }
        let role = match s.role.as_ref().map(|r| (r, r.get_ref().as_str())) {
            Some((_, "primary")) => failover::Role::Primary,
            Some((_, "secondary")) => failover::Role::Secondary,
            Some((r, other)) => {
                c.err(
                    r,
                    format!("unknown role {other:?}: expected \"primary\" or \"secondary\""),
                );
                failover::Role::Secondary
            }
            None if mode == failover::Mode::ActivePassive => {
                c.err(&s.name, format!("site {:?} has no `role`: an active-passive cluster needs role = \"primary\" or \"secondary\"", s.name.get_ref()));
                failover::Role::Secondary
            }
            None => failover::Role::Primary,
        };
        let weight = c.int(s.weight.as_ref(), "weight", (0, 10_000), 1);
        if s.backends.get_ref().is_empty() {
            c.err(
                &s.backends,
                format!(
                    "site {:?} has no backends: expected at least one ip:port",
                    s.name.get_ref()
                ),
            );
        }
        let mut backends = Vec::new();
        let mut drained = Vec::new();
        for b in s.backends.get_ref() {
            let spanned = Spanned::new(b.span(), b.get_ref().addr.clone());
            let (spanned, enabled) = (&spanned, b.get_ref().enabled);
            if let Some(a) = c.addr(spanned, "backend") {
                if !seen_backends.insert(a) {
                    c.err(
                        spanned,
                        format!("duplicate backend {a} in cluster {:?}", cluster.get_ref()),
                    );
                }
                backends.push(a);
                if !enabled {
                    drained.push(a);
                }
            }
        }
        out.push(failover::Site {
            name: s.name.get_ref().clone(),
            role,
            weight,
            enabled: s.enabled.unwrap_or(true),
            backends,
            drained,
        });
    }
    if mode == failover::Mode::ActivePassive
        && !out.is_empty()
        && !out.iter().any(|s| s.role == failover::Role::Primary)
    {
        c.err(
            &raw.sites,
            format!(
                "cluster {:?} has no primary site: expected one site with role = \"primary\"",
                cluster.get_ref()
            ),
        );
    }
    out
}

fn route_list(
    c: &mut Check<'_>,
    raw: &[raw::RouteRaw],
    tiers: &TierNames,
    clusters: &HashMap<&str, ClusterId>,
) -> Vec<Route> {
    let mut out = Vec::new();
    let mut names: HashMap<&str, ()> = HashMap::new();
    for r in raw {
        if names.insert(r.name.get_ref().as_str(), ()).is_some() {
            c.err(
                &r.name,
                format!(
                    "duplicate route name {:?}: route names must be unique",
                    r.name.get_ref()
                ),
            );
        }
        let tier = tiers.resolve(c, &r.tier, "tier");
        let cluster = clusters.get(r.cluster.get_ref().as_str()).copied();
        if cluster.is_none() {
            let mut known: Vec<&str> = clusters.keys().copied().collect();
            known.sort();
            let known = if known.is_empty() {
                "(none defined)".to_string()
            } else {
                known.join(", ")
            };
            c.err(&r.cluster, format!("unknown cluster {:?}: expected one of the [clusters.<name>] in this file: {known}", r.cluster.get_ref()));
        }
        let timeout = c.duration(r.timeout.as_ref(), "timeout", Duration::from_secs(10));
        let matcher = matcher(c, &r.matcher);
        let inspect = inspect(c, r);
        let max_body = u64::from(c.int(r.max_body.as_ref(), "max_body", (0, 1 << 30), 10 << 20));
        if let (Some(tier), Some(cluster), Some(matcher)) = (tier, cluster, matcher) {
            out.push(Route {
                name: r.name.get_ref().clone(),
                matcher,
                tier,
                cluster,
                timeout,
                retry_with_idempotency_key: r.retry_with_idempotency_key.unwrap_or(false),
                inspect: inspect.clone(),
                max_body,
            });
        }
    }
    out
}

/// How a route reads the body for an XML-RPC method; `None` when its match
/// does not need one (and then the inspection settings are refused).
fn inspect(c: &mut Check<'_>, r: &raw::RouteRaw) -> Option<crate::classify::Inspect> {
    let needs = r
        .matcher
        .xmlrpc_method
        .as_ref()
        .is_some_and(|m| !m.is_empty());
    if !needs {
        let stray = [
            r.inspect_limit.as_ref().map(|s| s.span()),
            r.inspect_timeout.as_ref().map(|s| s.span()),
            r.on_bad_body.as_ref().map(|s| s.span()),
        ];
        if let Some(span) = stray.into_iter().flatten().next() {
            c.errors.push(c.src.error(
                Some(span),
                "body inspection settings on a route whose match has no `xmlrpc_method`: expected them only with `match = { xmlrpc_method = [...] }`",
            ));
        }
        return None;
    }
    let limit = c.int(
        r.inspect_limit.as_ref(),
        "inspect_limit",
        (1, 65_536),
        65_536,
    ) as usize;
    let timeout = c.duration(
        r.inspect_timeout.as_ref(),
        "inspect_timeout",
        Duration::from_secs(1),
    );
    let reject_bad = match r.on_bad_body.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None | Some((_, "next")) => false,
        Some((_, "reject")) => true,
        Some((s, other)) => {
            c.err(s, format!("on_bad_body {other:?}: expected \"next\" (try the next route) or \"reject\" (400)"));
            false
        }
    };
    Some(crate::classify::Inspect {
        limit,
        timeout,
        reject_bad,
    })
}

fn matcher(c: &mut Check<'_>, raw: &raw::MatchRaw) -> Option<Matcher> {
    let before = c.errors.len();
    let mut m = Matcher::default();
    if let Some(h) = &raw.host {
        let host = h.get_ref().trim().to_ascii_lowercase();
        m.host = if let Some(suffix) = host.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 {
                c.err(
                    h,
                    format!(
                        "host pattern {:?}: a wildcard must look like \"*.example.com\"",
                        h.get_ref()
                    ),
                );
            }
            Some(HostMatch::Suffix(suffix.to_string()))
        } else {
            if host.is_empty() || host.contains(['/', ' ', '*']) {
                c.err(
                    h,
                    format!(
                        "host {:?}: expected a host name like \"shop.example.com\"",
                        h.get_ref()
                    ),
                );
            }
            Some(HostMatch::Exact(host))
        };
    }
    match (&raw.path, &raw.path_prefix) {
        (Some(p), Some(_)) => c.err(
            p,
            "`path` and `path_prefix` both given: expected one of them",
        ),
        (Some(p), None) | (None, Some(p)) => {
            if !p.get_ref().starts_with('/') {
                c.err(p, format!("path {:?} must start with '/'", p.get_ref()));
            }
            m.path = Some(if raw.path.is_some() {
                PathMatch::Exact(p.get_ref().clone())
            } else {
                PathMatch::Prefix(p.get_ref().clone())
            });
        }
        (None, None) => {}
    }
    for method in raw.methods.iter().flatten() {
        let s = method.get_ref().trim();
        match Method::from_bytes(s.as_bytes()) {
            Ok(parsed) if s.bytes().all(|b| b.is_ascii_uppercase()) => m.methods.push(parsed),
            _ => c.err(
                method,
                format!(
                    "method {s:?}: expected an upper-case HTTP method like \"GET\" or \"POST\""
                ),
            ),
        }
    }
    if let Some(h) = &raw.header {
        if let Some(name) = c.header_name(&h.name, "header.name") {
            let value = match &h.value {
                None => None,
                Some(v) => match HeaderValue::from_str(v.get_ref()) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        c.err(v, "header `value` is not a valid HTTP header value");
                        None
                    }
                },
            };
            m.header = Some(HeaderMatch { name, value });
        }
    }
    for name in raw.xmlrpc_method.iter().flatten() {
        let n = name.get_ref().trim();
        let body = n.strip_suffix('*').unwrap_or(n);
        if body.is_empty()
            || !body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b))
            || body.contains('*')
        {
            c.err(name, format!("xmlrpc_method {n:?}: expected a method name like \"add_invoice\" or a prefix like \"list_*\""));
        } else {
            m.xmlrpc.push(crate::xmlrpc::MethodPattern::parse(n));
        }
    }
    (c.errors.len() == before).then_some(m)
}

/// The adaptive limit's settings where a policy leaves them out
/// (docs/policy.md): `initial`, `min`, `max`, and the queue's `max_queue`.
const DEFAULT_INITIAL: u32 = 8;
const DEFAULT_MIN: u32 = 4;
const DEFAULT_MAX: u32 = 1024;
const DEFAULT_MAX_QUEUE: u32 = 1024;

fn admission(
    c: &mut Check<'_>,
    raw: &std::collections::BTreeMap<Spanned<String>, raw::AdmissionRaw>,
    clusters: &std::collections::BTreeMap<Spanned<String>, raw::ClusterRaw>,
) -> Vec<Admission> {
    let default = Admission {
        mode: AdmissionMode::Adaptive {
            initial: DEFAULT_INITIAL,
            min: DEFAULT_MIN,
            max: DEFAULT_MAX,
        },
        max_queue: DEFAULT_MAX_QUEUE,
    };
    let mut out = vec![default.clone(); clusters.len()];
    for (name, a) in raw {
        let Some(idx) = clusters.keys().position(|k| k.get_ref() == name.get_ref()) else {
            let known: Vec<&str> = clusters.keys().map(|k| k.get_ref().as_str()).collect();
            c.err(name, format!("[admission.{}] names an unknown cluster: expected one of the clusters in routes.toml: {}", name.get_ref(), known.join(", ")));
            continue;
        };
        let max_queue = c.int(
            a.max_queue.as_ref(),
            "max_queue",
            (0, 1_000_000),
            DEFAULT_MAX_QUEUE,
        );
        let mode = match a.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "adaptive")) => {
                if let Some(l) = &a.limit {
                    c.err(l, "`limit` applies to mode = \"fixed\": an adaptive limit uses `initial`, `min` and `max`");
                }
                let min = c.int(a.min.as_ref(), "min", (1, 1_000_000), DEFAULT_MIN);
                let max = c.int(a.max.as_ref(), "max", (1, 1_000_000), DEFAULT_MAX);
                let initial = c.int(
                    a.initial.as_ref(),
                    "initial",
                    (1, 1_000_000),
                    DEFAULT_INITIAL.clamp(min, max.max(min)),
                );
                let problem = if min > max {
                    Some(format!("`min` ({min}) is above `max` ({max})"))
                } else if initial < min || initial > max {
                    Some(format!(
                        "`initial` ({initial}) must lie between `min` ({min}) and `max` ({max})"
                    ))
                } else {
                    None
                };
                if let Some(msg) = problem {
                    match (&a.initial, &a.min) {
                        (Some(at), _) | (None, Some(at)) => c.err(at, msg),
                        (None, None) => c.err(name, msg),
                    }
                }
                AdmissionMode::Adaptive { initial, min, max }
            }
            Some((m, "fixed")) => match &a.limit {
                Some(_) => AdmissionMode::Fixed {
                    limit: c.int(a.limit.as_ref(), "limit", (1, 1_000_000), 1),
                },
                None => {
                    c.err(m, "mode = \"fixed\" needs `limit = N`");
                    AdmissionMode::Fixed { limit: 1 }
                }
            },
            Some((_, "off")) => AdmissionMode::Off,
            Some((m, other)) => {
                c.err(
                    m,
                    format!("unknown admission mode {other:?}: expected \"adaptive\", \"fixed\" or \"off\""),
                );
                default.mode.clone()
            }
        };
        out[idx] = Admission { mode, max_queue };
    }
    out
}

/// A rule's `scope`: true for `"fleet"` (which needs the store).
fn fleet_scope(c: &mut Check<'_>, r: &raw::RateLimitRaw, have_store: bool) -> bool {
    match r.scope.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None | Some((_, "instance")) => false,
        Some((_, "fleet")) if have_store => true,
        Some((s, "fleet")) => {
            c.err(s, "`scope = \"fleet\"` needs a [rate_limit_store] in the policy (redis = \"redis://host:port/0\", fleet_size = N)");
            false
        }
        Some((s, other)) => {
            c.err(
                s,
                format!("rate limit scope {other:?}: expected \"instance\" or \"fleet\""),
            );
            false
        }
    }
}

/// A rule's `missing`: what a request without the key gets.
fn missing_key(c: &mut Check<'_>, r: &raw::RateLimitRaw) -> MissingKey {
    match r.missing.as_ref().map(|m| (m, m.get_ref().as_str())) {
        None | Some((_, "bucket")) => MissingKey::Bucket,
        Some((_, "allow")) => MissingKey::Allow,
        Some((_, "deny")) => MissingKey::Deny,
        Some((m, other)) => {
            c.err(m, format!("rate limit `missing` {other:?}: expected \"bucket\" (one shared bucket), \"allow\" or \"deny\""));
            MissingKey::Bucket
        }
    }
}

fn rate_limits(
    c: &mut Check<'_>,
    raw: &[raw::RateLimitRaw],
    routes: &HashMap<&str, usize>,
    tiers: &TierNames,
    have_store: bool,
) -> Vec<RateLimit> {
    let mut out: Vec<RateLimit> = Vec::new();
    for r in raw {
        let applies_to = match (&r.route, &r.tier) {
            (Some(route), None) => format!("route:{}", route.get_ref()),
            (None, Some(tier)) => format!("tier:{}", tier.get_ref()),
            _ => String::new(),
        };
        let name = match &r.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                c.err(n, "rate limit `name` is empty: expected a name unique among the [[rate_limit]] rules");
                continue;
            }
            Some(n) => n.get_ref().trim().to_string(),
            None => format!("{applies_to}/{}", r.key.get_ref()),
        };
        if out.iter().any(|o| o.name == name) {
            let msg = format!("duplicate rate limit {name:?}: expected each [[rate_limit]] to have its own `name` (or its own route/tier and key)");
            match &r.name {
                Some(n) => c.err(n, msg),
                None => c.err(&r.key, msg),
            }
        }
        let scope = match (&r.route, &r.tier) {
            (Some(route), None) => match routes.get(route.get_ref().as_str()) {
                Some(i) => Some(RateScope::Route(*i)),
                None => {
                    c.err(route, format!("rate limit names unknown route {:?}: expected the name of a [[routes]] entry", route.get_ref()));
                    None
                }
            },
            (None, Some(tier)) => tiers
                .resolve(c, tier, "rate_limit.tier")
                .map(RateScope::Tier),
            (Some(route), Some(_)) => {
                c.err(
                    route,
                    "rate limit has both `route` and `tier`: expected one of them",
                );
                None
            }
            (None, None) => {
                c.err(
                    &r.key,
                    "rate limit has neither `route` nor `tier`: expected one of them",
                );
                None
            }
        };
        let key = match r.key.get_ref().as_str() {
            "client_ip" => Some(RateKey::ClientIp),
            k => match k.strip_prefix("header:") {
                Some(h) => c
                    .header_name(&Spanned::new(r.key.span(), h.to_string()), "key")
                    .map(RateKey::Header),
                None => {
                    c.err(
                        &r.key,
                        format!(
                            "rate limit key {k:?}: expected \"client_ip\" or \"header:<name>\""
                        ),
                    );
                    None
                }
            },
        };
        let per_second = c.int(Some(&r.per_second), "per_second", (1, 10_000_000), 1);
        let burst = c.int(r.burst.as_ref(), "burst", (1, 10_000_000), per_second);
        let fleet = fleet_scope(c, r, have_store);
        let missing = missing_key(c, r);
        if let (Some(scope), Some(key)) = (scope, key) {
            out.push(RateLimit {
                name,
                applies_to,
                scope,
                key,
                per_second,
                burst,
                fleet,
                missing,
            });
        }
    }
    out
}
