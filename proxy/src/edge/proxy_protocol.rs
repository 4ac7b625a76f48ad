//! The PROXY protocol (HAProxy's; v1 text and v2 binary): how an L4
//! balancer in front of k2proxy passes the client's address, which the TCP
//! peer (the balancer) hides.
//!
//! Only connections from `[server].proxy_protocol_from` are read for it, and
//! from them it is required: a header is read exactly (byte by byte for v1,
//! by its declared length for v2), so the request that follows is untouched.
//! Anyone else's PROXY line reaches the HTTP parser as a bad request line
//! and is refused there, so no client can claim another's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest v2 address block and TLVs accepted.
const V2_MAX: usize = 1024;

/// What the balancer said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Header {
    /// A client's connection: its address.
    Client(SocketAddr),
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN, a non-IP
    /// family): the TCP peer stands.
    Local,
}

/// Reads one PROXY header from the start of `r`, and nothing after it.
pub(crate) async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, String> {
    let io = |e: std::io::Error| format!("reading the PROXY header: {e}");
    let mut head = vec![0u8; 6];
    r.read_exact(&mut head).await.map_err(io)?;
    if head == b"PROXY " {
        while !head.ends_with(b"\r\n") {
            if head.len() >= V1_MAX {
                return Err(format!("PROXY v1 line longer than {V1_MAX} bytes"));
            }
            head.push(r.read_u8().await.map_err(io)?);
        }
        return parse_v1(&head);
    }
    if head != V2_SIG[..6] {
        return Err("expected a PROXY header (v1 or v2) from this balancer".into());
    }
    head.resize(16, 0);
    r.read_exact(&mut head[6..]).await.map_err(io)?;
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX {
        return Err(format!(
            "PROXY v2 header declares {len} bytes (at most {V2_MAX})"
        ));
    }
    let mut rest = vec![0u8; len];
    r.read_exact(&mut rest).await.map_err(io)?;
    parse_v2(&head, &rest)
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, or `PROXY UNKNOWN…`.
fn parse_v1(line: &[u8]) -> Result<Header, String> {
    let text = std::str::from_utf8(line)
        .map_err(|_| "PROXY v1 line is not ASCII".to_string())?
        .trim_end_matches("\r\n");
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Header::Local),
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| format!("PROXY v1 source {src:?} is not an address"))?;
            if ip.is_ipv4() != (*proto == "TCP4") {
                return Err(format!("PROXY v1 source {src} is not {proto}"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| format!("PROXY v1 source port {sport:?} is not a port"))?;
            Ok(Header::Client(SocketAddr::new(ip, port)))
        }
        _ => Err(format!("malformed PROXY v1 line {text:?}")),
    }
}

/// The 16-byte v2 header and the address block that follows it.
fn parse_v2(head: &[u8], rest: &[u8]) -> Result<Header, String> {
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 {
        return Err(format!("PROXY v2 header with version {version}"));
    }
    match command {
        0 => return Ok(Header::Local),
        1 => {}
        c => return Err(format!("PROXY v2 header with command {c}")),
    }
    let short = || {
        format!(
            "PROXY v2 address block of {} bytes is too short",
            rest.len()
        )
    };
    let port = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
    match head[13] >> 4 {
        1 => {
            let a: [u8; 4] = rest
                .get(..4)
                .ok_or_else(short)?
                .try_into()
                .expect("4 bytes");
            rest.get(..12).ok_or_else(short)?;
            Ok(Header::Client(SocketAddr::new(
                Ipv4Addr::from(a).into(),
                port(8),
            )))
        }
        2 => {
            let a: [u8; 16] = rest
                .get(..16)
                .ok_or_else(short)?
                .try_into()
                .expect("16 bytes");
            rest.get(..36).ok_or_else(short)?;
            Ok(Header::Client(SocketAddr::new(
                Ipv6Addr::from(a).into(),
                port(32),
            )))
        }
        _ => Ok(Header::Local), // AF_UNSPEC or AF_UNIX: no IP to carry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Header, String>, Vec<u8>) {
        let mut r = bytes;
        let h = read(&mut r).await;
        (h, r.to_vec())
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut b = V2_SIG.to_vec();
        b.push(0x20 | command);
        b.push(family);
        b.extend_from_slice(&(block.len() as u16).to_be_bytes());
        b.extend_from_slice(block);
        b
    }

    #[tokio::test]
    async fn v1_gives_the_client_and_leaves_the_request() {
        let (h, rest) =
            parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(h, Ok(Header::Client("203.0.113.7:51234".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (h, rest) = parse(b"PROXY TCP6 2001:db8::1 ::1 4000 443\r\nX").await;
        assert_eq!(h, Ok(Header::Client("[2001:db8::1]:4000".parse().unwrap())));
        assert_eq!(rest, b"X");
        let (h, rest) = parse(b"PROXY UNKNOWN\r\nGET").await;
        assert_eq!((h, rest.as_slice()), (Ok(Header::Local), &b"GET"[..]));
    }

    #[tokio::test]
    async fn v2_gives_the_client_and_leaves_the_request() {
        let mut block = vec![198, 51, 100, 9, 10, 0, 0, 1];
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&80u16.to_be_bytes());
        block.extend_from_slice(&[0x04, 0, 1, 0]); // a TLV, ignored
        let mut bytes = v2(1, 0x11, &block);
        bytes.extend_from_slice(b"GET /");
        let (h, rest) = parse(&bytes).await;
        assert_eq!(h, Ok(Header::Client("198.51.100.9:40000".parse().unwrap())));
        assert_eq!(rest, b"GET /");

        let mut block = vec![0u8; 36];
        block[15] = 1; // ::1
        block[32..34].copy_from_slice(&7000u16.to_be_bytes());
        let (h, _) = parse(&v2(1, 0x21, &block)).await;
        assert_eq!(h, Ok(Header::Client("[::1]:7000".parse().unwrap())));

        let (h, rest) = parse(&[v2(0, 0x00, &[]), b"GET".to_vec()].concat()).await;
        assert_eq!((h, rest.as_slice()), (Ok(Header::Local), &b"GET"[..]));
    }

    #[tokio::test]
    async fn anything_else_is_refused_with_the_reason() {
        for (bytes, expected) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "expected a PROXY header"),
            (b"PROXY TCP4 nope 10.0.0.1 1 2\r\n", "is not an address"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "is not TCP4"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n", "is not a port"),
            (b"PROXY TCP4 1.2.3.4\r\n", "malformed PROXY v1 line"),
            (b"PROXY ", "reading the PROXY header"),
        ] {
            let (h, _) = parse(bytes).await;
            let e = h.unwrap_err();
            assert!(e.contains(expected), "{bytes:?}: {e}");
        }
        let long = [b"PROXY ".to_vec(), vec![b'1'; 200]].concat();
        assert!(parse(&long)
            .await
            .0
            .unwrap_err()
            .contains("longer than 107"));
        assert!(parse(&v2(1, 0x11, &[1, 2, 3]))
            .await
            .0
            .unwrap_err()
            .contains("too short"));
        let mut bad = v2(1, 0x11, &[0; 12]);
        bad[12] = 0x11; // version 1 in a v2 header
        assert!(parse(&bad).await.0.unwrap_err().contains("version 1"));
    }
}
