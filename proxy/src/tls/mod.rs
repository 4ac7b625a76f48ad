//! TLS: shoppers' HTTPS terminated at the edge, and TLS to a remote site.
//!
//! - [`pem`] reads and checks certificate/key files (used by the config, so
//!   `k2proxy check` and a reload refuse a broken pair with file:line).
//! - [`accept`] builds each generation's HTTPS listeners (SNI, ALPN h2) and
//!   runs handshakes; [`conn`] is the connection pingora then serves.
//! - [`upstream`] turns a site's `tls = { ... }` into pingora peer options
//!   and a health-probe client config.
//! - [`dev`] makes a private CA and certificates for `make run` and tests.
//!
//! The stack is rustls (pingora's `rustls` feature, ring provider): pure
//! Rust, no system OpenSSL to install or match, TLS 1.2/1.3 only with AEAD
//! suites by default, and a ClientHello we can look at before choosing a
//! certificate. docs/routes.md "HTTPS" has the measurements behind it.

pub(crate) mod accept;
pub(crate) mod conn;
pub mod dev;
pub(crate) mod pem;
pub(crate) mod upstream;

/// Seconds since the Unix epoch: what certificates' validity is compared with.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Sets `k2_tls_cert_expiry_seconds` for every certificate of the config in
/// force (server certificates and sites' client certificates); called when
/// `/metrics` is scraped, so a replaced file's series goes with it.
pub(crate) fn publish_expiry(shared: &crate::Shared) {
    let gen = shared.current.load();
    let gauge = &shared.metrics.tls_cert_expiry;
    gauge.reset();
    let now = now_unix();
    let set = |pair: &pem::CertPair, use_: &str| {
        let file = pair.cert_path.display().to_string();
        gauge
            .with_label_values(&[file.as_str(), use_])
            .set((pair.facts.not_after_unix - now) as f64);
    };
    for l in &gen.config.server.tls {
        for c in &l.certs {
            set(&c.pair, "server");
        }
    }
    for c in &gen.config.clusters {
        for t in c.site_tls.iter().flatten() {
            if let Some(pair) = &t.client {
                set(pair, "client");
            }
        }
    }
}

/// Days before expiry from which `k2proxy check` and the start warn (the
/// alert `K2TlsCertExpiringSoon` uses the same).
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// One line per certificate the config uses, for `k2proxy check` and the
/// start's log: which file, for what, serial, and when it expires; `true`
/// when it expires within [`EXPIRY_WARNING_DAYS`] of `now_unix`.
pub fn certificate_report(config: &crate::config::Config, now_unix: i64) -> Vec<(String, bool)> {
    let line = |pair: &pem::CertPair, what: String| {
        let left = pair.facts.not_after_unix - now_unix;
        let days = left as f64 / 86400.0;
        (
            format!(
                "{what}: {} (serial {}) expires {} (in {days:.1} days)",
                pair.cert_path.display(),
                pair.facts.serial,
                pem::unix_to_rfc3339(pair.facts.not_after_unix)
            ),
            left < EXPIRY_WARNING_DAYS * 86400,
        )
    };
    let mut out = Vec::new();
    for l in &config.server.tls {
        for c in &l.certs {
            let names = if c.server_names.is_empty() {
                c.pair.facts.dns_names.join(", ")
            } else {
                c.server_names.join(", ")
            };
            out.push(line(&c.pair, format!("https {} [{names}]", l.listen)));
        }
    }
    for c in &config.clusters {
        for (site, t) in c.sites.iter().zip(&c.site_tls) {
            if let Some(pair) = t.as_ref().and_then(|t| t.client.as_ref()) {
                out.push(line(
                    pair,
                    format!("client certificate of site {}/{}", c.name, site.name),
                ));
            }
        }
    }
    out
}
