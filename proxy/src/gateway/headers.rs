//! The headers k2proxy adds: `x-request-id` (kept or made), `x-forwarded-for`
//! and `x-k2-tier`, made without per-request parsing or formatting machinery.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::proxy::Session;

/// The headers k2proxy adds to every request or response, parsed once:
/// pingora's case-keeping headers would parse (and, for a name it does not
/// know, copy) a `&str` or `HeaderName` on every insert.
pub(crate) mod name {
    use pingora::http::StaticHeaderName;
    pub const X_K2_TIER: StaticHeaderName = StaticHeaderName::from_static("x-k2-tier");
    pub const X_REQUEST_ID: StaticHeaderName = StaticHeaderName::from_static("x-request-id");
    pub const X_FORWARDED_FOR: StaticHeaderName = StaticHeaderName::from_static("x-forwarded-for");
    pub const TRACEPARENT: StaticHeaderName = StaticHeaderName::from_static("traceparent");
    pub const X_FORWARDED_PROTO: StaticHeaderName =
        StaticHeaderName::from_static("x-forwarded-proto");
}
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_K2_TIER: HeaderName = HeaderName::from_static("x-k2-tier");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
use super::reply::X_REQUEST_ID;

/// `x-forwarded-proto`: how the client reached k2proxy (a client's own
/// value is replaced, never passed on).
pub fn forwarded_proto(session: &Session) -> HeaderValue {
    if session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
        HeaderValue::from_static("https")
    } else {
        HeaderValue::from_static("http")
    }
}

/// `h1` or `h2`, and the TLS version (`-` in clear text), for the access log.
pub fn protocol(session: &Session) -> (&'static str, &str) {
    let proto = if session.is_http2() { "h2" } else { "h1" };
    let tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_deref())
        .map_or("-", |t| &t.version);
    (proto, tls)
}

/// Longest inbound `x-request-id` kept as is; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A request's id and whether the client sent it (then it is already in
/// the upstream request).
#[derive(Debug, Clone)]
pub struct RequestId {
    pub value: HeaderValue,
    pub kept: bool,
}

impl RequestId {
    /// The client's one usable `x-request-id`, or a new one.
    pub fn of(headers: &HeaderMap) -> RequestId {
        let mut inbound = headers.get_all(X_REQUEST_ID).iter();
        match (inbound.next(), inbound.next()) {
            (Some(v), None) if !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN => RequestId {
                value: v.clone(),
                kept: true,
            },
            _ => RequestId {
                value: new_request_id(),
                kept: false,
            },
        }
    }
}

/// The W3C trace context of a request (`traceparent`): the client's when it
/// sent one valid value (it is then already in the upstream request), or a
/// new one started here (random trace and span ids, sampled), so a purchase
/// can be followed from the shopper through k2proxy to the backend.
#[derive(Debug, Clone)]
pub struct TraceParent {
    pub value: HeaderValue,
    pub kept: bool,
}

impl TraceParent {
    pub fn of(headers: &HeaderMap) -> TraceParent {
        let mut inbound = headers.get_all(TRACEPARENT).iter();
        match (inbound.next(), inbound.next()) {
            (Some(v), None) if valid_traceparent(v.as_bytes()) => TraceParent {
                value: v.clone(),
                kept: true,
            },
            _ => {
                let mut buf = [0u8; 55];
                buf[..3].copy_from_slice(b"00-");
                // Neither id may be all zeros: a draw of 0 (one in 2^64 or
                // 2^128) becomes 1, cheaper than drawing from a range.
                hex_into(&mut buf[3..35], &fastrand::u128(..).max(1).to_be_bytes());
                buf[35] = b'-';
                hex_into(&mut buf[36..52], &fastrand::u64(..).max(1).to_be_bytes());
                buf[52..].copy_from_slice(b"-01");
                TraceParent {
                    value: HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
                        .expect("hex digits are a valid header value"),
                    kept: false,
                }
            }
        }
    }

    /// The trace id (32 hex digits), for the access log.
    pub fn trace_id(&self) -> &str {
        self.value.to_str().map_or("-", |v| &v[3..35])
    }
}

/// `version-traceid-parentid-flags` as the W3C specifies it: lower-case hex,
/// neither id all zeros, version `ff` invalid; a later version may append
/// `-…` fields.
fn valid_traceparent(v: &[u8]) -> bool {
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    v.len() >= 55
        && hex(&v[..2])
        && &v[..2] != b"ff"
        && (v.len() == 55 || (&v[..2] != b"00" && v[55] == b'-'))
        && v[2] == b'-'
        && hex(&v[3..35])
        && nonzero(&v[3..35])
        && v[35] == b'-'
        && hex(&v[36..52])
        && nonzero(&v[36..52])
        && v[52] == b'-'
        && hex(&v[53..55])
}

/// `bytes` as lower-case hex, two digits each, into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// A fresh 128-bit request id, as 32 lower-case hex digits.
fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    hex_into(&mut buf, &fastrand::u128(..).to_be_bytes());
    // One allocation that clones share (a copied slice would allocate again
    // on its first clone, and the id is cloned for upstream and response).
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
        .expect("hex digits are a valid header value")
}

/// `x-forwarded-for` with `ip` appended to what came in (`None` if what came
/// in is not a valid value).
pub fn forwarded_for(prev: Option<&HeaderValue>, ip: IpAddr) -> Option<HeaderValue> {
    let mut buf = [0u8; 48];
    let len = format_ip(&mut buf, ip);
    let ip = &buf[..len];
    match prev {
        Some(prev) if !prev.is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
        }
        _ => HeaderValue::from_bytes(ip).ok(),
    }
}

/// Writes `value`'s `Display` into `buf`; returns the length.
fn display_into(buf: &mut [u8], value: impl std::fmt::Display) -> usize {
    use std::io::Write;
    let mut at = &mut buf[..];
    write!(at, "{value}").expect("an address fits its buffer");
    let left = at.len();
    buf.len() - left
}

/// Writes `ip` as `Display` does, into `buf` (48 bytes or more); returns
/// the length. IPv4 by hand (the formatting machinery cost ~1 000
/// instructions per request).
fn format_ip(buf: &mut [u8], ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        // "ffff:…" with an embedded IPv4 is the longest: 45 bytes.
        IpAddr::V6(_) => display_into(buf, ip),
    }
}

/// An address as `Display` writes it, on the stack: for the access log,
/// where `to_string` on two addresses cost about 8 000 instructions a line.
pub struct AddrText {
    buf: [u8; 64],
    len: usize,
}

impl AddrText {
    pub fn ip(ip: IpAddr) -> AddrText {
        let mut buf = [0u8; 64];
        let len = format_ip(&mut buf, ip);
        AddrText { buf, len }
    }

    /// `ip:port` (`[ip]:port` for IPv6, by `Display` itself).
    pub fn socket(addr: SocketAddr) -> AddrText {
        let SocketAddr::V4(v4) = addr else {
            let mut buf = [0u8; 64];
            let len = display_into(&mut buf, addr);
            return AddrText { buf, len };
        };
        let mut text = AddrText::ip(IpAddr::V4(*v4.ip()));
        text.buf[text.len] = b':';
        text.len += 1;
        let port = v4.port();
        let digits = if port == 0 {
            1
        } else {
            port.ilog10() as usize + 1
        };
        let mut n = port;
        for i in (0..digits).rev() {
            text.buf[text.len + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        text.len += digits;
        text
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("an address is ASCII")
    }
}

pub fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_written_as_display_writes_them() {
        let mut buf = [0u8; 48];
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.99.100",
            "255.255.255.255",
            "192.168.1.10",
            "::1",
            "::ffff:1.2.3.4",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let n = format_ip(&mut buf, ip);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), ip.to_string());
        }
        for a in 0..=255u8 {
            let ip = IpAddr::from([a, 255 - a, a / 2, 7]);
            let n = format_ip(&mut buf, ip);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        let v6: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap();
        assert_eq!(forwarded_for(None, v4).unwrap(), "203.0.113.7");
        let empty = HeaderValue::from_static("");
        assert_eq!(forwarded_for(Some(&empty), v4).unwrap(), "203.0.113.7");
        let prev = HeaderValue::from_static("198.51.100.1");
        assert_eq!(
            forwarded_for(Some(&prev), v6).unwrap(),
            format!("198.51.100.1, {v6}").as_str()
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.1:80",
            "127.0.0.1:8080",
            "192.168.100.9:10000",
            "[::1]:443",
            "[2001:db8::1%3]:9",
            "[::ffff:192.0.2.1]:65535",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(AddrText::socket(addr).as_str(), addr.to_string());
            assert_eq!(AddrText::ip(addr.ip()).as_str(), addr.ip().to_string());
        }
    }

    #[test]
    fn hex_is_two_lower_case_digits_a_byte_high_nibble_first() {
        let mut out = [0u8; 8];
        hex_into(&mut out, &[0x00, 0x0f, 0xa5, 0xff]);
        assert_eq!(&out, b"000fa5ff");
        let mut id = [0u8; 32];
        hex_into(&mut id, &0x0123_4567_89ab_cdef_u128.to_be_bytes());
        assert_eq!(&id, b"00000000000000000123456789abcdef");
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn traceparent_is_kept_when_valid_and_started_otherwise() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_str(v).unwrap());
            TraceParent::of(&h)
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = with(good);
        assert!(t.kept);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(with("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").kept);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 with more
            "garbage",
        ] {
            let t = with(bad);
            assert!(!t.kept, "{bad} kept");
            assert!(valid_traceparent(t.value.as_bytes()), "{:?}", t.value);
        }
        let a = TraceParent::of(&HeaderMap::new());
        let b = TraceParent::of(&HeaderMap::new());
        assert!(valid_traceparent(a.value.as_bytes()) && a.value.as_bytes().ends_with(b"-01"));
        assert_ne!(a.trace_id(), b.trace_id());
    }
}
