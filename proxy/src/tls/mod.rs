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

/// Sets `k2_tls_cert_expiry_seconds` for every certificate of the config in
/// force (server certificates and sites' client certificates); called when
/// `/metrics` is scraped, so a replaced file's series goes with it.
pub(crate) fn publish_expiry(shared: &crate::Shared) {
    let gen = shared.current.load();
    let gauge = &shared.metrics.tls_cert_expiry;
    gauge.reset();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
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
