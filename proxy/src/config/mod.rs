//! `routes.toml` + a policy file → one immutable, already-checked [`Config`].
//!
//! Two layers, as in river: [`raw`] mirrors the TOML (unknown fields are
//! errors, values keep their spans), [`validate`] checks every value and
//! cross-reference and builds the `Config` that the rest of the proxy uses
//! without re-checking. All problems of a load are reported together, each
//! with file, line and column ([`error`]).
//!
//! A `Config` is data only: no live state, no clock, nothing of admission,
//! rate limits or metrics. [`crate::runtime`] builds the live state for it.

mod error;
pub mod raw;
#[cfg(test)]
mod tests;
mod tls;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use crate::tls::pem::CertPair;
pub use error::{ConfigError, ConfigErrors, SourceFile};

use crate::classify::{ClusterId, RouteTable, TierId};

/// Where the files are: `routes.toml`, and optionally a policy file that
/// overrides `[server].policy`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub routes: PathBuf,
    pub policy: Option<PathBuf>,
    /// `k2proxy run --dev-tls ADDR`: one more HTTPS listener, on the
    /// development certificate in `dir` (`crate::tls::dev`).
    pub dev_tls: Option<DevTls>,
}

/// A development HTTPS listener added to whatever the files say.
#[derive(Debug, Clone)]
pub struct DevTls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Reads, parses and checks both files.
pub fn load(paths: &Paths) -> Result<Config, ConfigErrors> {
    let routes_src = SourceFile::read(&paths.routes)?;
    let routes: raw::RoutesFile = routes_src.parse()?;
    let policy_path = match &paths.policy {
        Some(p) => p.clone(),
        None => {
            let rel = routes
                .server
                .policy
                .as_ref()
                .map_or("policies/default.toml", |p| p.get_ref().as_str());
            let base = paths.routes.parent().unwrap_or(Path::new("."));
            base.join(rel)
        }
    };
    let policy_src = SourceFile::read(&policy_path).map_err(|mut e| {
        if paths.policy.is_none() {
            e.message.push_str(" (named by [server].policy in ");
            e.message.push_str(&paths.routes.display().to_string());
            e.message.push(')');
        }
        e
    })?;
    let policy: raw::PolicyFile = policy_src.parse()?;
    let mut config = validate::config(&routes_src, routes, &policy_src, policy)?;
    if let Some(dev) = &paths.dev_tls {
        let taken = config.server.listen.contains(&dev.listen)
            || config.server.tls.iter().any(|t| t.listen == dev.listen);
        let pair = crate::tls::pem::read_pair(&dev.cert, &dev.key);
        let problem = match (&pair, taken) {
            (_, true) => Some(format!(
                "--dev-tls {}: the routes file already listens there",
                dev.listen
            )),
            (Err(e), _) => Some(format!("--dev-tls: {e}")),
            _ => None,
        };
        if let Some(message) = problem {
            return Err(ConfigErrors(vec![routes_src.error(None, message)]));
        }
        config.server.tls.push(TlsListener {
            listen: dev.listen,
            h2: true,
            certs: vec![ServerCert {
                pair: pair.expect("checked above"),
                server_names: Vec::new(),
                default: true,
            }],
        });
    }
    Ok(config)
}

/// Parses and checks files already read (tests, and `load`'s second half).
pub fn load_sources(routes: &SourceFile, policy: &SourceFile) -> Result<Config, ConfigErrors> {
    let raw_routes: raw::RoutesFile = routes.parse()?;
    let raw_policy: raw::PolicyFile = policy.parse()?;
    validate::config(routes, raw_routes, policy, raw_policy)
}

/// The whole checked configuration one request runs with.
#[derive(Debug)]
pub struct Config {
    pub routes_path: PathBuf,
    pub policy_path: PathBuf,
    pub server: Server,
    /// Highest priority first; [`TierId`] indexes this.
    pub tiers: Vec<Tier>,
    /// [`ClusterId`] indexes this.
    pub clusters: Vec<Cluster>,
    pub routes: RouteTable,
    pub shedding: Shedding,
    /// Admission settings per cluster, same index as `clusters`.
    pub admission: Vec<Admission>,
    pub rate_limits: Vec<RateLimit>,
    /// `[rate_limit_store]`: where `scope = "fleet"` rules keep their buckets.
    pub rate_limit_store: Option<RateLimitStore>,
    pub retries: Retries,
    pub trust: Trust,
}

impl Config {
    pub fn tier(&self, id: TierId) -> &Tier {
        &self.tiers[id.0 as usize]
    }

    /// Every certificate, key and CA file the config read.
    pub fn tls_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let servers = self.server.tls.iter().flat_map(|l| &l.certs);
        let sites: Vec<&UpstreamTls> = self
            .clusters
            .iter()
            .flat_map(|c| c.site_tls.iter().flatten())
            .collect();
        let pairs = servers
            .map(|c| &c.pair)
            .chain(sites.iter().filter_map(|t| t.client.as_ref()));
        for p in pairs {
            out.push(p.cert_path.clone());
            out.push(p.key_path.clone());
        }
        out.extend(sites.iter().filter_map(|t| t.ca_path.clone()));
        out
    }

    pub fn cluster(&self, id: ClusterId) -> &Cluster {
        &self.clusters[id.0 as usize]
    }

    /// A tier by name, for an `x-k2-tier` sent by a trusted client.
    pub fn tier_by_name(&self, name: &[u8]) -> Option<TierId> {
        self.tiers
            .iter()
            .position(|t| t.name.as_bytes() == name)
            .map(|i| TierId(i as u8))
    }

    /// One line for `k2proxy check` and the start-up log.
    pub fn summary(&self) -> String {
        let sites: usize = self.clusters.iter().map(|c| c.sites.len()).sum();
        let backends: usize = self
            .clusters
            .iter()
            .flat_map(|c| &c.sites)
            .map(|s| s.backends.len())
            .sum();
        format!(
            "{} and {} are valid: {} routes, {} tiers, {} clusters, {} sites, {} backends",
            self.routes_path.display(),
            self.policy_path.display(),
            self.routes.len(),
            self.tiers.len(),
            self.clusters.len(),
            sites,
            backends
        )
    }
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub threads: usize,
    /// Where a graceful upgrade hands the listeners over.
    pub upgrade_sock: PathBuf,
    /// Where the adaptive limits are written every second and read at
    /// start (`admission::memory`); `None`: a start begins at `initial`.
    /// Read at start only.
    pub admission_state: Option<PathBuf>,
    /// Largest request head, bytes (request line and headers); larger is
    /// answered 431 and never reaches a backend. Applies on reload.
    pub max_header_bytes: usize,
    /// A keep-alive connection waiting for its next request is closed after
    /// this long (whole seconds, at least 1). Applies on reload to the
    /// requests that follow.
    pub idle_timeout: Duration,
    /// The whole time to receive a request's headers, from the connection's
    /// start or the first byte of a later request; then the connection is
    /// closed (with 408 when a request had begun).
    pub header_timeout: Duration,
    /// An HTTP/1 client connection's response to its request number this
    /// many closes it (`connection: close`), as nginx's
    /// `keepalive_requests`. Applies on reload to the requests that follow.
    pub keepalive_requests: u64,
    /// A response on an HTTP/1 client connection this old or older closes
    /// it, as nginx's `keepalive_time`: behind an L4 balancer, which places
    /// connections, an instance that restarts (a deploy) gets its share
    /// back as the others' connections end. Applies on reload.
    pub keepalive_time: Duration,
    /// Client connections open at once; `None`: derived from the process's
    /// open-file limit (`edge::default_max_connections`, once per
    /// `runtime::Generation`).
    pub max_connections: Option<u32>,
    /// Client connections open at once from one IP address.
    pub max_connections_per_client: u32,
    /// After SIGTERM: `/healthz` answers 503 draining and the listeners keep
    /// accepting for this long (so a balancer notices), then stop.
    pub drain_delay: Duration,
    /// Balancers whose connections must start with a PROXY protocol header
    /// (v1 or v2); the client address it carries is the client's.
    pub proxy_protocol_from: Vec<IpNet>,
    /// HTTPS listeners (`[[server.tls]]`), one per address.
    pub tls: Vec<TlsListener>,
}

/// An HTTPS listener: its certificates (SNI) and protocols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    pub listen: SocketAddr,
    /// HTTP/2 offered by ALPN.
    pub h2: bool,
    /// In file order; exactly one is the default.
    pub certs: Vec<ServerCert>,
}

/// One `[[server.tls]]` certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCert {
    pub pair: CertPair,
    /// Lower-case SNI names, `*.` prefix for a wildcard.
    pub server_names: Vec<String>,
    pub default: bool,
}

/// A site's TLS to its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub sni: String,
    pub verify: bool,
    /// DER certificates to trust; `None`: the system's roots.
    pub ca: Option<std::sync::Arc<[Vec<u8>]>>,
    pub ca_path: Option<PathBuf>,
    /// Client certificate for mTLS.
    pub client: Option<CertPair>,
}

/// One tier of the policy.
#[derive(Debug, Clone)]
pub struct Tier {
    pub name: String,
    /// `name` as the `x-k2-tier` value sent upstream, made once.
    pub header: http::HeaderValue,
    pub max_queue_wait: Duration,
    /// In (0, 1].
    pub max_share: f64,
    pub shed_status: u16,
    /// May use another site's spare capacity.
    pub spill: bool,
}

/// `health = { … }`.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// A backend cluster with its sites.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub connect_timeout: Duration,
    pub health: HealthCheck,
    /// The sites, in file order; `failover::Cluster` indexes them the same.
    pub sites: Vec<failover::Site>,
    /// Failover mode, balancing, rise/fall and outlier detection.
    pub settings: failover::Settings,
    /// TLS to each site's backends, same index as `sites`.
    pub site_tls: Vec<Option<UpstreamTls>>,
}

/// `[shedding]`.
#[derive(Debug, Clone)]
pub struct Shedding {
    pub target_queue_delay: Duration,
    pub never_shed: Vec<TierId>,
    pub force_shed: Vec<TierId>,
    /// Whole seconds, for the `retry-after` header.
    pub retry_after_s: u64,
    /// `never_shed` tiers wait only a short target while their own queue
    /// stands (docs/admission.md, "Standing queues of purchases").
    pub refuse_standing_queue: bool,
    /// How long every purchase must have waited over the target before
    /// their queue counts as standing: CoDel's interval (1 s; 3 s in a
    /// fleet).
    pub standing_after: Duration,
}

/// `[admission.<cluster>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionMode {
    Adaptive {
        initial: u32,
        min: u32,
        max: u32,
    },
    Fixed {
        limit: u32,
    },
    /// No admission control: plain proxying (no limit, queue or shedding).
    Off,
}

/// Admission control of one cluster (applies to each of its sites).
#[derive(Debug, Clone)]
pub struct Admission {
    pub mode: AdmissionMode,
    pub max_queue: u32,
}

/// What a rate limit counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    Header(http::HeaderName),
}

/// What a rate limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// Index into the route table.
    Route(usize),
    Tier(TierId),
}

/// `[[rate_limit]]`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// `name`, or `<route|tier>:<name>/<key>` when not given; unique. A
    /// reload keeps the buckets of a rule with the same name and settings.
    pub name: String,
    /// What `scope` names, for comparing rules across reloads (an index
    /// moves when routes are reordered, a name does not).
    pub applies_to: String,
    pub scope: RateScope,
    pub key: RateKey,
    pub per_second: u32,
    pub burst: u32,
    /// `scope = "fleet"`: one bucket per key for the whole fleet, in the
    /// store; `"instance"` (false): per instance.
    pub fleet: bool,
    /// What a request without the key gets.
    pub missing: MissingKey,
}

/// `missing` of a `[[rate_limit]]`: a request without the rule's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Refused (429), as if over the limit.
    Deny,
    /// Not counted by this rule.
    Allow,
    /// Counted in one bucket shared by every request without the key.
    Bucket,
}

/// `[rate_limit_store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitStore {
    /// `redis://host:port/db`.
    pub redis: String,
    /// Instances sharing the store: while it is down, a fleet rule allows
    /// `per_second / fleet_size` on each.
    pub fleet_size: u32,
    /// Longest a request waits for the store before it falls back.
    pub timeout: Duration,
    /// Tokens leased per round trip; None: per rule, a tenth of a second of
    /// one instance's share (`per_second / fleet_size / 10`, 1 to 100).
    pub batch: Option<u32>,
}

impl RateLimitStore {
    /// Tokens a lease asks for under `rule`.
    pub fn batch_for(&self, rule: &RateLimit) -> u32 {
        self.batch
            .unwrap_or_else(|| (rule.per_second / self.fleet_size.max(1) / 10).clamp(1, 100))
    }
}

/// `[retries]`.
#[derive(Debug, Clone)]
pub struct Retries {
    pub budget: f64,
    pub idempotency_header: http::HeaderName,
}

/// `[trust]`.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub tier_header_from: Vec<IpNet>,
    /// Proxies in front of k2proxy whose `x-forwarded-for` is believed (for
    /// `client_ip` rate-limit keys).
    pub forwarded_for_from: Vec<IpNet>,
}

impl Trust {
    /// Whether a client may set `x-k2-tier` itself.
    pub fn may_set_tier(&self, ip: std::net::IpAddr) -> bool {
        self.tier_header_from.iter().any(|net| net.contains(&ip))
    }

    fn forwards(&self, ip: &std::net::IpAddr) -> bool {
        self.forwarded_for_from.iter().any(|net| net.contains(ip))
    }

    /// The client a `client_ip` rate limit counts: the TCP peer, unless the
    /// peer is a trusted proxy; then the first address from the right of
    /// `x-forwarded-for` that is not a trusted proxy (a client cannot put
    /// an address in front of the one our proxies appended). A peer that
    /// forwards without a usable header counts as itself.
    pub fn client_for_limits(
        &self,
        peer: Option<std::net::IpAddr>,
        headers: &http::HeaderMap,
    ) -> Option<std::net::IpAddr> {
        let peer = peer?;
        if !self.forwards(&peer) {
            return Some(peer);
        }
        let mut chain = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>()
            .into_iter()
            .rev();
        let mut last_trusted = peer;
        for hop in chain.by_ref() {
            match hop.parse::<std::net::IpAddr>() {
                Ok(ip) if self.forwards(&ip) => last_trusted = ip,
                Ok(ip) => return Some(ip),
                Err(_) => break, // garbage: do not look further left
            }
        }
        Some(last_trusted)
    }
}
