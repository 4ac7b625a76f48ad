//! Certificates for trying k2proxy out and for its tests: a private CA and
//! leaf certificates it signs (ECDSA P-256), written as PEM files. `make
//! run` (`k2proxy run --dev-tls ADDR`) makes one for `localhost` on first
//! run; never use them in production.

use std::path::{Path, PathBuf};

use super::now_unix;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};

/// A CA that signs leaf certificates.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// Hex, as in `/status` and `openssl x509 -serial`.
    pub serial: String,
}

fn at(unix: i64) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| format!("time {unix}: {e}"))
}

impl DevCa {
    /// A new CA named `name`, valid from an hour ago for ten years.
    pub fn new(name: &str) -> Result<DevCa, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = at(now_unix() - 3600)?;
        params.not_after = at(now_unix() + 10 * 365 * 86400)?;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(DevCa { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `names` (DNS names or IP addresses) valid from
    /// `not_before` to `not_after` (Unix seconds), with serial `serial`
    /// (give it a non-zero top byte below 0x80: DER integers are minimal
    /// and positive).
    pub fn issue_at(
        &self,
        names: &[&str],
        not_before: i64,
        not_after: i64,
        serial: u64,
    ) -> Result<Issued, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        for n in names {
            params.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().map_err(|e| format!("{n}: {e}"))?),
            });
        }
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.not_before = at(not_before)?;
        params.not_after = at(not_after)?;
        params.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| e.to_string())?;
        let serial = crate::tls::pem::facts(cert.der())?.serial;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A leaf for `names`, valid from an hour ago for a year.
    pub fn issue(&self, names: &[&str], serial: u64) -> Result<Issued, String> {
        let now = now_unix();
        self.issue_at(names, now - 3600, now + 365 * 86400, serial)
    }
}

/// The files `--dev-tls` serves: `localhost.pem`, `localhost.key` and the
/// CA that signed them (`ca.pem`, to give curl), in `dir`; made once and
/// kept, so a browser or curl told to trust `ca.pem` keeps trusting it.
pub fn ensure_localhost(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let (cert, key, ca) = (
        dir.join("localhost.pem"),
        dir.join("localhost.key"),
        dir.join("ca.pem"),
    );
    if cert.exists() && key.exists() && ca.exists() {
        return Ok((cert, key, ca));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dev_ca = DevCa::new("k2proxy development CA")?;
    // A positive serial with no leading zero byte (DER wants it minimal).
    let serial = 0x4b32_0000_0000_0000 | (now_unix() as u64 & 0xffff_ffff);
    let leaf = dev_ca.issue(&["localhost", "127.0.0.1", "::1"], serial)?;
    let write = |p: &Path, s: &str| {
        std::fs::write(p, s).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    write(&ca, &dev_ca.cert_pem())?;
    write(&key, &leaf.key_pem)?;
    write(&cert, &leaf.cert_pem)?;
    Ok((cert, key, ca))
}
