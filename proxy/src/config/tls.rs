//! `[[server.tls]]` and a site's `tls = { ... }`: files are read and
//! checked here (a missing file, a key that is not the certificate's, an
//! expired certificate are errors at the line that names them), so a
//! reload with a broken pair is refused and the old pair keeps serving.

use std::net::SocketAddr;
use std::path::PathBuf;

use toml::Spanned;

use super::raw::{ServerTlsRaw, SiteTlsRaw};
use super::validate::Check;
use super::{ServerCert, TlsListener, UpstreamTls};
use crate::tls::pem;

/// A path relative to the directory of routes.toml.
fn path(c: &Check<'_>, p: &Spanned<String>) -> PathBuf {
    let base = c.src.path.parent().unwrap_or(std::path::Path::new("."));
    base.join(p.get_ref().trim())
}

/// A lower-case SNI name, `*.` allowed as the first label only.
fn server_name(c: &mut Check<'_>, n: &Spanned<String>) -> Option<String> {
    let name = n.get_ref().trim().to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    let valid = !bare.is_empty()
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        c.err(
            n,
            format!(
                "invalid server name {:?}: expected a DNS name like \"pay.example.com\" or \"*.example.com\"",
                n.get_ref()
            ),
        );
        return None;
    }
    Some(name)
}

/// Every `[[server.tls]]` entry, grouped by listen address.
pub(super) fn listeners(
    c: &mut Check<'_>,
    raw: &[ServerTlsRaw],
    plain: &[SocketAddr],
    admin: SocketAddr,
) -> Vec<TlsListener> {
    let mut out: Vec<TlsListener> = Vec::new();
    // The `h2` a listener's entries set explicitly, same index as `out`.
    let mut explicit_h2: Vec<Option<bool>> = Vec::new();
    for entry in raw {
        let Some(listen) = c.addr(&entry.listen, "[[server.tls]] listen") else {
            continue;
        };
        if plain.contains(&listen) || listen == admin {
            c.err(
                &entry.listen,
                format!("{listen} is also a plain HTTP or admin listener: an HTTPS listener needs a port of its own"),
            );
            continue;
        }
        let pair = match pem::read_pair(&path(c, &entry.cert), &path(c, &entry.key)) {
            Ok(p) => p,
            Err(e) => {
                let at = if e.contains(&path(c, &entry.key).display().to_string()) {
                    &entry.key
                } else {
                    &entry.cert
                };
                c.err(at, e);
                continue;
            }
        };
        let server_names = entry
            .server_names
            .iter()
            .filter_map(|n| server_name(c, n))
            .collect();
        let h2 = entry.h2.as_ref().map(|h| *h.get_ref());
        let default = entry.default.as_ref().is_some_and(|d| *d.get_ref());
        let cert = ServerCert {
            pair,
            server_names,
            default,
        };
        match out.iter_mut().position(|l| l.listen == listen) {
            None => {
                explicit_h2.push(h2);
                out.push(TlsListener {
                    listen,
                    h2: h2.unwrap_or(true),
                    certs: vec![cert],
                });
            }
            Some(i) => {
                if h2.is_some() && explicit_h2[i].is_some() && h2 != explicit_h2[i] {
                    let at = entry.h2.as_ref().expect("h2 is set");
                    c.err(at, format!("`h2` differs between the [[server.tls]] entries of {listen}: ALPN is chosen per listener, set it the same on each"));
                }
                if default && out[i].certs.iter().any(|c| c.default) {
                    let at = entry.default.as_ref().expect("default is set");
                    c.err(
                        at,
                        format!("{listen} already has a default certificate: only one entry per listener may say default = true"),
                    );
                }
                if let (Some(set), None) = (h2, explicit_h2[i]) {
                    explicit_h2[i] = Some(set);
                    out[i].h2 = set;
                }
                out[i].certs.push(cert);
            }
        }
    }
    for l in &mut out {
        if !l.certs.iter().any(|c| c.default) {
            l.certs[0].default = true;
        }
    }
    out
}

/// A site's `tls = { sni, ca, verify, client_cert, client_key }`.
pub(super) fn upstream(c: &mut Check<'_>, raw: &Spanned<SiteTlsRaw>) -> Option<UpstreamTls> {
    let t = raw.get_ref();
    let verify = t.verify.as_ref().is_none_or(|v| *v.get_ref());
    let sni = t
        .sni
        .as_ref()
        .map(|s| s.get_ref().trim().to_string())
        .unwrap_or_default();
    if verify && sni.is_empty() {
        c.err(
            raw,
            "`tls` needs `sni` (the name on the backend's certificate) to verify it: add sni = \"backend.example.com\", or verify = false",
        );
        return None;
    }
    let ca_path = t.ca.as_ref().map(|p| path(c, p));
    let ca = match &t.ca {
        Some(p) => match pem::read_ca(&path(c, p)) {
            Ok(ca) => Some(ca),
            Err(e) => {
                c.err(p, e);
                return None;
            }
        },
        None => None,
    };
    let client = match (&t.client_cert, &t.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => match pem::read_pair(&path(c, cert), &path(c, key)) {
            Ok(p) => Some(p),
            Err(e) => {
                c.err(cert, e);
                return None;
            }
        },
        (Some(at), None) | (None, Some(at)) => {
            c.err(
                at,
                "mTLS needs both `client_cert` and `client_key`: one of them is missing",
            );
            return None;
        }
    };
    Some(UpstreamTls {
        sni,
        verify,
        ca,
        ca_path,
        client,
    })
}
