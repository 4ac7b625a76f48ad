//! Certificates and keys read from PEM files and checked the way an
//! operator needs before a pair is used: the file exists and holds what it
//! should, the key belongs to the certificate, and the certificate is valid
//! now. Pure data comes out (DER bytes and a few facts), so `k2proxy check`
//! and a reload can refuse a broken pair without building anything live.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What `/status`, the expiry metric and the logs say about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// DNS names of the subject alternative name extension.
    pub dns_names: Vec<String>,
}

/// A certificate chain (leaf first) with its private key, both DER.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
    pub facts: CertFacts,
}

impl std::fmt::Debug for CertPair {
    // Never print a private key, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

impl CertPair {
    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        self.chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        // Checked when read: `read_key` only keeps a key rustls parsed.
        PrivateKeyDer::try_from(self.key.clone()).expect("a key checked by read_key")
    }
}

/// Every certificate of a PEM file, in file order (a chain: leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for item in rustls_pemfile::certs(&mut bytes.as_slice()) {
        let der = item.map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?;
        certs.push(der.to_vec());
    }
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1), DER.
pub fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match rustls_pemfile::private_key(&mut bytes.as_slice()) {
        Ok(Some(key)) => Ok(key.secret_der().to_vec()),
        Ok(None) => Err(format!(
            "{}: no private key in it (expected a PEM \"PRIVATE KEY\" block)",
            path.display()
        )),
        Err(e) => Err(format!("{}: not valid PEM: {e}", path.display())),
    }
}

/// The facts of one DER certificate.
pub fn facts(der: &[u8]) -> Result<CertFacts, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                dns_names.push(n.to_ascii_lowercase());
            }
        }
    }
    Ok(CertFacts {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string().replace(':', "").to_uppercase(),
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
        dns_names,
    })
}

/// Reads a certificate chain and its key, and checks that the key is the
/// certificate's and that the certificate is valid now.
pub fn read_pair(cert_path: &Path, key_path: &Path) -> Result<CertPair, String> {
    let chain = read_certs(cert_path)?;
    let key = read_key(key_path)?;
    let facts = facts(&chain[0]).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let now = super::now_unix();
    if facts.not_after_unix < now {
        return Err(format!(
            "{}: the certificate expired at {} (serial {})",
            cert_path.display(),
            unix_to_rfc3339(facts.not_after_unix),
            facts.serial
        ));
    }
    if facts.not_before_unix > now {
        return Err(format!(
            "{}: the certificate is not valid before {}",
            cert_path.display(),
            unix_to_rfc3339(facts.not_before_unix)
        ));
    }
    let key_der =
        PrivateKeyDer::try_from(key.clone()).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
        format!(
            "{}: unsupported private key ({e}): expected ECDSA P-256/P-384, Ed25519 or RSA",
            key_path.display()
        )
    })?;
    let chain_der = chain.iter().map(|c| CertificateDer::from(c.clone()));
    let certified = rustls::sign::CertifiedKey::new(chain_der.collect(), signer);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(format!(
            "{} does not match the certificate in {} (serial {}): the pair must be the key the certificate was issued for",
            key_path.display(),
            cert_path.display(),
            facts.serial
        ));
    }
    Ok(CertPair {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        chain,
        key,
        facts,
    })
}

/// A CA bundle: every certificate of a PEM file, each parseable.
pub fn read_ca(path: &Path) -> Result<Arc<[Vec<u8>]>, String> {
    let certs = read_certs(path)?;
    for c in &certs {
        facts(c).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(certs.into())
}

/// `2026-12-01T10:00:00Z` for a Unix time.
pub fn unix_to_rfc3339(t: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(t)
        .map(|a| {
            let d = a.to_datetime();
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        })
        .unwrap_or_else(|_| t.to_string())
}
