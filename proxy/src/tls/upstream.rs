//! TLS to a site's backends: what a site's `tls = { ... }` becomes at run
//! time, once per generation. The proxy's connections get it through
//! pingora's peer options (pooled and reused as plain ones are); health
//! probes get a rustls client config with exactly the same trust, so a
//! backend whose certificate would fail requests fails its checks too.

use std::sync::Arc;

use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::UpstreamTls;

/// A site's TLS, ready for connections and probes.
pub(crate) struct SiteTls {
    pub(crate) sni: String,
    verify: bool,
    ca: Option<Arc<CaType>>,
    client: Option<Arc<CertKey>>,
    /// For health probes.
    pub(crate) probe: Arc<ClientConfig>,
}

impl std::fmt::Debug for SiteTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteTls")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .finish_non_exhaustive()
    }
}

impl SiteTls {
    pub(crate) fn build(tls: &UpstreamTls) -> Result<SiteTls, String> {
        let ca = tls.ca.as_ref().map(|certs| {
            let wrapped: Vec<WrappedX509> = certs
                .iter()
                .map(|der| WrappedX509::new(der.clone(), pingora::utils::tls::parse_x509))
                .collect();
            Arc::<[WrappedX509]>::from(wrapped)
        });
        let client = tls
            .client
            .as_ref()
            .map(|p| Arc::new(CertKey::new(p.chain.clone(), p.key.clone())));
        Ok(SiteTls {
            sni: tls.sni.clone(),
            verify: tls.verify,
            ca,
            client,
            probe: probe_config(tls)?,
        })
    }

    /// A site whose TLS could not be set up: every connection and probe
    /// fails (nothing trusted), rather than going out in clear text.
    pub(crate) fn unusable(tls: &UpstreamTls) -> SiteTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let probe = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        SiteTls {
            sni: tls.sni.clone(),
            verify: true,
            ca: Some(Arc::<[WrappedX509]>::from(Vec::new())),
            client: None,
            probe: Arc::new(probe),
        }
    }

    /// A peer for `backend` speaking TLS as the site says.
    pub(crate) fn peer(&self, backend: std::net::SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(backend, true, self.sni.clone());
        peer.options.verify_cert = self.verify;
        peer.options.verify_hostname = self.verify;
        peer.options.ca = self.ca.clone();
        peer.client_cert_key = self.client.clone();
        peer
    }

    /// The name a probe's handshake presents and verifies.
    pub(crate) fn server_name(&self, backend: std::net::SocketAddr) -> ServerName<'static> {
        ServerName::try_from(self.sni.clone())
            .unwrap_or_else(|_| ServerName::IpAddress(backend.ip().into()))
    }
}

/// The roots a site trusts: its `ca` file, or the system's.
fn roots(tls: &UpstreamTls) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(certs) => {
            for der in certs.iter() {
                roots
                    .add(CertificateDer::from(der.clone()))
                    .map_err(|e| format!("CA certificate: {e}"))?;
            }
        }
        None => {
            for der in rustls_native_certs::load_native_certs()
                .map_err(|e| format!("system CA certificates: {e}"))?
            {
                let _ = roots.add(der); // a broken system root is skipped
            }
        }
    }
    Ok(roots)
}

fn probe_config(tls: &UpstreamTls) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = if tls.verify {
        builder.with_root_certificates(roots(tls)?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    };
    let mut config = match &tls.client {
        Some(pair) => builder
            .with_client_auth_cert(pair.chain_der(), pair.key_der())
            .map_err(|e| format!("{}: {e}", pair.cert_path.display()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `verify = false`: any certificate is accepted (signatures are still
/// checked, so the handshake itself is sound).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
