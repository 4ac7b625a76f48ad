//! The TOML files as ops write them: serde structs that mirror `routes.toml`
//! and `policies/*.toml` field for field. Unknown fields are errors; values
//! that need checking keep their byte span so an error can point at them.
//! `validate.rs` turns these into the checked [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// `routes.toml`: where traffic goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// Listeners, admin address, worker threads and the policy file to use.
    pub server: ServerRaw,
    /// Backend clusters by name; each has one or more sites.
    #[serde(default)]
    pub clusters: BTreeMap<Spanned<String>, ClusterRaw>,
    /// Ordered route table: the first route whose `match` fits wins.
    #[serde(default)]
    pub routes: Vec<RouteRaw>,
}

/// `[server]`: read at start; listener changes need a restart.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerRaw {
    /// Proxy listeners, `ip:port`.
    pub listen: Spanned<Vec<Spanned<String>>>,
    /// Admin listener (`/metrics`, `/healthz`), `ip:port`; loopback by default.
    pub admin: Option<Spanned<String>>,
    /// Worker threads of the proxy service.
    pub threads: Option<Spanned<i64>>,
    /// Policy file, relative to the directory of `routes.toml`.
    pub policy: Option<Spanned<String>>,
    /// Unix socket through which a new process (`k2proxy run --upgrade`)
    /// takes over the listeners; one per instance on a machine.
    pub upgrade_sock: Option<Spanned<String>>,
    /// File where the adaptive limits are kept across a restart; relative
    /// to the directory of `routes.toml`. None by default.
    pub admission_state: Option<Spanned<String>>,
    /// Largest request head (request line and headers), bytes; larger gets 431.
    pub max_header_bytes: Option<Spanned<i64>>,
    /// A keep-alive connection with no request in progress is closed after this long.
    pub idle_timeout: Option<Spanned<String>>,
    /// The whole time allowed to receive a request's headers.
    pub header_timeout: Option<Spanned<String>>,
    /// Requests a client connection carries before it is closed.
    pub keepalive_requests: Option<Spanned<i64>>,
    /// How long a client connection is kept alive, from its start.
    pub keepalive_time: Option<Spanned<String>>,
    /// Client connections open at once; default from the open-file limit.
    pub max_connections: Option<Spanned<i64>>,
    /// Client connections open at once from one IP address.
    pub max_connections_per_client: Option<Spanned<i64>>,
    /// After SIGTERM, how long listeners keep accepting while `/healthz` says draining.
    pub drain_delay: Option<Spanned<String>>,
    /// Balancers (CIDRs) whose connections start with a PROXY protocol header.
    #[serde(default)]
    pub proxy_protocol_from: Vec<Spanned<String>>,
    /// `[[server.tls]]`: HTTPS listeners and their certificates.
    #[serde(default)]
    pub tls: Vec<ServerTlsRaw>,
}

/// `[[server.tls]]`: one certificate on an HTTPS listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsRaw {
    /// `ip:port`; several entries may share one (SNI picks the certificate).
    pub listen: Spanned<String>,
    /// PEM certificate chain, leaf first; relative to routes.toml.
    pub cert: Spanned<String>,
    /// PEM private key; relative to routes.toml.
    pub key: Spanned<String>,
    /// SNI names this certificate answers (`*.example.com` allowed).
    #[serde(default)]
    pub server_names: Vec<Spanned<String>>,
    /// The certificate for a name no entry lists (default: the first).
    pub default: Option<Spanned<bool>>,
    /// Offer HTTP/2 by ALPN (default true); the same for every entry of a listener.
    pub h2: Option<Spanned<bool>>,
}

/// A site's `tls = { ... }`: TLS to its backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTlsRaw {
    /// Name sent by SNI and verified against the certificate.
    pub sni: Option<Spanned<String>>,
    /// PEM CA bundle to verify with (default: the system's roots).
    pub ca: Option<Spanned<String>>,
    /// Verify the backend's certificate (default true).
    pub verify: Option<Spanned<bool>>,
    /// Client certificate and key for mTLS.
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
}

/// `[clusters.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRaw {
    /// `active-passive` (primary, then secondary) or `active-active` (weights).
    pub failover: Option<Spanned<String>>,
    /// Time allowed to open a TCP connection to a backend.
    pub connect_timeout: Option<Spanned<String>>,
    /// Active health check of every backend.
    pub health: Option<HealthRaw>,
    /// Passive outlier detection.
    pub outlier: Option<OutlierRaw>,
    /// How a backend is picked inside a site: `round-robin` or `least-inflight`.
    pub balance: Option<Spanned<String>>,
    /// The sites of the cluster, at least one.
    pub sites: Spanned<Vec<SiteRaw>>,
}

/// `health = { … }` inside a cluster.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthRaw {
    /// HTTP path probed with GET.
    pub path: Option<Spanned<String>>,
    /// Time between probes.
    pub interval: Option<Spanned<String>>,
    /// Probe timeout.
    pub timeout: Option<Spanned<String>>,
    /// Consecutive good probes before a backend is up.
    pub rise: Option<Spanned<i64>>,
    /// Consecutive bad probes before a backend is down.
    pub fall: Option<Spanned<i64>>,
}

/// `[[clusters.<name>.sites]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRaw {
    /// Site name, unique within the cluster.
    pub name: Spanned<String>,
    /// `primary` or `secondary` (active-passive).
    pub role: Option<Spanned<String>>,
    /// Share of traffic (active-active).
    pub weight: Option<Spanned<i64>>,
    /// `false` drains the site: no new requests go there.
    pub enabled: Option<bool>,
    /// Backends, `ip:port` or `{ addr = "ip:port", enabled = false }`; at least one.
    pub backends: Spanned<Vec<Spanned<BackendRaw>>>,
    /// TLS to the backends.
    pub tls: Option<Spanned<SiteTlsRaw>>,
}

/// One backend: `"ip:port"`, or `{ addr = "ip:port", enabled = false }` to
/// drain it (no new requests, in-flight ones finish).
#[derive(Debug)]
pub struct BackendRaw {
    pub addr: String,
    pub enabled: bool,
}

impl<'de> Deserialize<'de> for BackendRaw {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = BackendRaw;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"ip:port\" or { addr = \"ip:port\", enabled = false }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BackendRaw, E> {
                Ok(BackendRaw {
                    addr: v.to_string(),
                    enabled: true,
                })
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<BackendRaw, M::Error> {
                let (mut addr, mut enabled) = (None, true);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "addr" => addr = Some(map.next_value::<String>()?),
                        "enabled" => enabled = map.next_value::<bool>()?,
                        other => {
                            return Err(serde::de::Error::unknown_field(
                                other,
                                &["addr", "enabled"],
                            ))
                        }
                    }
                }
                let addr = addr.ok_or_else(|| serde::de::Error::missing_field("addr"))?;
                Ok(BackendRaw { addr, enabled })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// `outlier = { … }` inside a cluster: passive outlier detection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierRaw {
    /// Failed requests in a row (connect failure, timeout, 5xx) that eject a backend.
    pub consecutive_failures: Option<Spanned<i64>>,
    /// First ejection time; doubles on each repeat.
    pub base_ejection: Option<Spanned<String>>,
    /// Longest ejection.
    pub max_ejection: Option<Spanned<String>>,
    /// Largest share of a site's backends ejected at once, in (0, 1].
    pub max_ejected_share: Option<Spanned<f64>>,
}

/// `[[routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRaw {
    /// Route name, unique; used in metrics and logs.
    pub name: Spanned<String>,
    /// What a request must look like; every given condition must hold.
    #[serde(rename = "match")]
    pub matcher: MatchRaw,
    /// Tier the route's traffic belongs to (a name from the policy's `tiers`).
    pub tier: Spanned<String>,
    /// Cluster that serves the route.
    pub cluster: Spanned<String>,
    /// Time allowed for the backend's response once the request was sent.
    pub timeout: Option<Spanned<String>>,
    /// Whether a non-idempotent request carrying the policy's idempotency
    /// header may be retried after it reached a backend.
    pub retry_with_idempotency_key: Option<bool>,
    /// Most body bytes read to find an XML-RPC `methodName` (≤ 65536).
    pub inspect_limit: Option<Spanned<i64>>,
    /// Longest wait for those bytes.
    pub inspect_timeout: Option<Spanned<String>>,
    /// A body without a usable `methodName`: `"next"` route, or `"reject"` (400).
    pub on_bad_body: Option<Spanned<String>>,
    /// Largest request body, bytes; larger (declared or streamed) gets 413.
    pub max_body: Option<Spanned<i64>>,
}

/// `match = { … }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchRaw {
    /// Host (without port), case-insensitive; `*.example.com` matches subdomains.
    pub host: Option<Spanned<String>>,
    /// Exact path.
    pub path: Option<Spanned<String>>,
    /// Path prefix.
    pub path_prefix: Option<Spanned<String>>,
    /// Allowed methods.
    pub methods: Option<Vec<Spanned<String>>>,
    /// A header that must be present, optionally with an exact value.
    pub header: Option<HeaderMatchRaw>,
    /// XML-RPC `methodName`s (exact, or `prefix*`) read from the request body.
    pub xmlrpc_method: Option<Vec<Spanned<String>>>,
}

/// `header = { name = "…", value = "…" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchRaw {
    /// Header name, case-insensitive.
    pub name: Spanned<String>,
    /// Exact value; when absent the header only has to be present.
    pub value: Option<Spanned<String>>,
}

/// `policies/*.toml`: how traffic is treated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Tier names, highest priority first.
    pub tiers: Spanned<Vec<Spanned<String>>>,
    /// Per-tier settings, `[tier.<name>]`.
    #[serde(default)]
    pub tier: BTreeMap<Spanned<String>, TierRaw>,
    /// Shed-level controller and shed responses.
    pub shedding: Option<SheddingRaw>,
    /// Admission control per cluster, `[admission.<cluster>]`.
    #[serde(default)]
    pub admission: BTreeMap<Spanned<String>, AdmissionRaw>,
    /// Rate limits, `[[rate_limit]]`.
    #[serde(default)]
    pub rate_limit: Vec<RateLimitRaw>,
    /// The fleet's shared store for `scope = "fleet"` rate limits.
    pub rate_limit_store: Option<Spanned<RateLimitStoreRaw>>,
    /// Retry budget and idempotency header.
    pub retries: Option<RetriesRaw>,
    /// Which clients may set `x-k2-tier` themselves.
    pub trust: Option<TrustRaw>,
}

/// `[tier.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierRaw {
    /// Longest time a request of this tier waits for admission before it is shed.
    pub max_queue_wait: Option<Spanned<String>>,
    /// Share of the admission limit this tier may hold in flight when busy, in (0, 1].
    pub max_share: Option<Spanned<f64>>,
    /// Status code of this tier's shed responses (default 503).
    pub shed_status: Option<Spanned<i64>>,
    /// May use another site's spare capacity before queueing at its own.
    pub spill: Option<bool>,
}

/// `[shedding]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SheddingRaw {
    /// Queueing delay above which the lowest admitted tier is shed.
    pub target_queue_delay: Option<Spanned<String>>,
    /// Tiers that are never shed by the controller (they only wait).
    #[serde(default)]
    pub never_shed: Vec<Spanned<String>>,
    /// Tiers shed outright by ops.
    #[serde(default)]
    pub force_shed: Vec<Spanned<String>>,
    /// `retry-after` sent with shed responses.
    pub retry_after: Option<Spanned<String>>,
    /// While the `never_shed` tiers' own queue stands, they wait only a
    /// short target and the excess is refused.
    pub refuse_standing_queue: Option<bool>,
    /// How long their waits must stay over the target before the queue
    /// counts as standing.
    pub standing_after: Option<Spanned<String>>,
}

/// `[admission.<cluster>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionRaw {
    /// `adaptive`, `fixed` or `off`.
    pub mode: Option<Spanned<String>>,
    /// Fixed limit (mode = "fixed").
    pub limit: Option<Spanned<i64>>,
    /// Starting limit (adaptive).
    pub initial: Option<Spanned<i64>>,
    /// Lowest limit (adaptive).
    pub min: Option<Spanned<i64>>,
    /// Highest limit (adaptive).
    pub max: Option<Spanned<i64>>,
    /// Most requests waiting for admission at once.
    pub max_queue: Option<Spanned<i64>>,
}

/// `[[rate_limit]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRaw {
    /// Unique name; a reload keeps the buckets of a rule with the same name
    /// and settings. Default: `route:<route>/<key>` or `tier:<tier>/<key>`.
    pub name: Option<Spanned<String>>,
    /// Route the limit applies to.
    pub route: Option<Spanned<String>>,
    /// Tier the limit applies to.
    pub tier: Option<Spanned<String>>,
    /// `client_ip` or `header:<name>`.
    pub key: Spanned<String>,
    /// Sustained requests per second per key.
    pub per_second: Spanned<i64>,
    /// Burst above the sustained rate.
    pub burst: Option<Spanned<i64>>,
    /// `instance` (default) or `fleet` (needs `[rate_limit_store]`).
    pub scope: Option<Spanned<String>>,
    /// `bucket` (default), `allow` or `deny`: a request without the key.
    pub missing: Option<Spanned<String>>,
}

/// `[rate_limit_store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitStoreRaw {
    /// `redis://host:port/db`.
    pub redis: Spanned<String>,
    /// Instances sharing the store.
    pub fleet_size: Option<Spanned<i64>>,
    /// Longest wait for the store per request.
    pub timeout: Option<Spanned<String>>,
    /// Tokens leased per round trip.
    pub batch: Option<Spanned<i64>>,
}

/// `[retries]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesRaw {
    /// Retries allowed as a share of recent requests, in [0, 1].
    pub budget: Option<Spanned<f64>>,
    /// Header that makes a non-idempotent request safe to retry.
    pub idempotency_header: Option<Spanned<String>>,
}

/// `[trust]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustRaw {
    /// CIDRs whose clients may set `x-k2-tier`.
    #[serde(default)]
    pub tier_header_from: Vec<Spanned<String>>,
    /// CIDRs of proxies whose `x-forwarded-for` is believed.
    #[serde(default)]
    pub forwarded_for_from: Vec<Spanned<String>>,
}
