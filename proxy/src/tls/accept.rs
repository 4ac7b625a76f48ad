//! The server side: which certificate a handshake gets, and the handshake.
//!
//! k2proxy terminates TLS itself, inside the edge (`crate::edge`), rather
//! than in pingora's TLS listener, so that the cheap refusals come first:
//! a connection past `max_connections`, or a balancer's PROXY header, is
//! dealt with before any handshake work, and `[server].header_timeout`
//! bounds the handshake too (pingora's is a fixed 60 s).
//!
//! A [`Listeners`] is built for every generation from the checked config,
//! so a rotated certificate is a reload like any other: handshakes that
//! start after the swap use the new pair, connections already open keep
//! theirs, and a broken pair is refused with the old one still serving.
//! The certificate is chosen from the ClientHello's SNI before the
//! handshake starts (rustls's lazy acceptor): an exact name, then a
//! `*.example.com` wildcard, then the listener's default.

use std::net::SocketAddr;
use std::sync::Arc;

use pingora::protocols::Stream;
use rustls::ServerConfig;

use super::conn::TlsConn;
use crate::config::TlsListener;

/// One HTTPS listener's certificates, ready for handshakes.
pub(crate) struct Listener {
    pub(crate) addr: SocketAddr,
    default: Arc<ServerConfig>,
    /// Lower-case names (`*.` prefix for wildcards) and their config.
    names: Vec<(String, Arc<ServerConfig>)>,
}

/// Every HTTPS listener of a generation.
#[derive(Default)]
pub(crate) struct Listeners(Vec<Arc<Listener>>);

/// The protocols a listener offers by ALPN.
fn alpn(h2: bool) -> Vec<Vec<u8>> {
    if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    }
}

/// A rustls server config for one certificate: TLS 1.2 and 1.3 with
/// rustls's cipher suites (AEAD only: AES-GCM and ChaCha20-Poly1305, with
/// forward secrecy), the listener's ALPN.
fn server_config(pair: &super::pem::CertPair, h2: bool) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(pair.chain_der(), pair.key_der())
        .map_err(|e| format!("{}: {e}", pair.cert_path.display()))?;
    config.alpn_protocols = alpn(h2);
    Ok(Arc::new(config))
}

impl Listeners {
    /// Builds every listener's configs. The pairs were checked with the
    /// config, so an error here is unexpected; it is logged and the
    /// certificate left out.
    pub(crate) fn build(listeners: &[TlsListener]) -> Listeners {
        let mut out = Vec::new();
        for l in listeners {
            let mut names = Vec::new();
            let mut default = None;
            for cert in &l.certs {
                let config = match server_config(&cert.pair, l.h2) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(listen = %l.listen, "TLS certificate left out: {e}");
                        continue;
                    }
                };
                if cert.default || default.is_none() {
                    default = Some(config.clone());
                }
                for n in &cert.server_names {
                    names.push((n.clone(), config.clone()));
                }
            }
            if let Some(default) = default {
                out.push(Arc::new(Listener {
                    addr: l.listen,
                    default,
                    names,
                }));
            }
        }
        Listeners(out)
    }

    /// The listener a connection accepted on `local` belongs to, if it is
    /// an HTTPS one (a listener on `0.0.0.0:p` matches any address, port p).
    pub(crate) fn for_local(&self, local: SocketAddr) -> Option<Arc<Listener>> {
        self.0
            .iter()
            .find(|l| {
                l.addr == local || (l.addr.ip().is_unspecified() && l.addr.port() == local.port())
            })
            .cloned()
    }
}

impl Listener {
    /// The config for a ClientHello's server name.
    pub(crate) fn config_for(&self, sni: Option<&str>) -> Arc<ServerConfig> {
        let Some(sni) = sni.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some((_, c)) = self.names.iter().find(|(n, _)| *n == sni) {
            return c.clone();
        }
        let parent = sni.split_once('.').map(|(_, p)| p);
        self.names
            .iter()
            .find(|(n, _)| n.strip_prefix("*.").is_some_and(|w| Some(w) == parent))
            .map_or_else(|| self.default.clone(), |(_, c)| c.clone())
    }

    /// The handshake; the caller bounds its time.
    pub(crate) async fn accept(&self, stream: Stream) -> Result<TlsConn, String> {
        let acceptor = rustls::server::Acceptor::default();
        let start = tokio_rustls::LazyConfigAcceptor::new(acceptor, stream)
            .await
            .map_err(|e| format!("reading the ClientHello: {e}"))?;
        let config = self.config_for(start.client_hello().server_name());
        let tls = start
            .into_stream(config)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Ok(TlsConn::new(tls))
    }
}
