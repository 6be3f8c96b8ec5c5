//! The PROXY protocol header (v1 text and v2 binary, as HAProxy and cloud load balancers
//! send it) in front of TLS, when `[server] proxy_protocol = true` (contract §12): the
//! device's own address then appears in logs and refusals, and the per-address refusal
//! rate limit applies to devices, not to the balancer.
//!
//! Only the header's own bytes are read, so the TLS ClientHello behind it stays in the
//! socket. A connection without a valid header is
//! closed: with the option on, every connection comes from the balancer. v2 `LOCAL`
//! (the balancer's own health check) keeps the socket's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the protocol's own limit).
const V1_MAX: usize = 107;
/// The largest v2 address block read (TLVs beyond the addresses are skipped, bounded).
const V2_MAX: usize = 16 + 512;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header (proxy_protocol is on: connections must come through the balancer)")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("reading the PROXY protocol header failed")]
    Io(#[from] std::io::Error),
}

/// Reads the PROXY header from `tcp` and returns the client address it names (the
/// socket's peer for v2 LOCAL and v1 UNKNOWN). Reads exactly the header's bytes (v1 a
/// byte at a time up to its CRLF, v2 its announced length), so nothing of the TLS
/// ClientHello behind it is consumed. The caller bounds the time it may take.
pub async fn read_header(
    tcp: &mut TcpStream,
    socket_peer: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    let mut header = vec![0u8; 6];
    read_exact(tcp, &mut header).await?;
    if header == b"PROXY " {
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX {
                return Err(ProxyError::Malformed("v1 line too long"));
            }
            let mut byte = [0u8; 1];
            read_exact(tcp, &mut byte).await?;
            header.push(byte[0]);
        }
    } else if header[..] == V2_SIGNATURE[..6] {
        header.resize(16, 0);
        read_exact(tcp, &mut header[6..]).await?;
        let Some(len) = header_len(&header)? else {
            return Err(ProxyError::Missing);
        };
        header.resize(len, 0);
        read_exact(tcp, &mut header[16..]).await?;
    } else {
        return Err(ProxyError::Missing);
    }
    parse(&header, socket_peer)
}

async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyError> {
    match tcp.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProxyError::Missing),
        Err(e) => Err(ProxyError::Io(e)),
    }
}

/// The header's total length once enough bytes are there to tell, None if not yet.
fn header_len(b: &[u8]) -> Result<Option<usize>, ProxyError> {
    if b.len() >= 16 && b[..12] == V2_SIGNATURE {
        let len = 16 + usize::from(u16::from_be_bytes([b[14], b[15]]));
        if len > V2_MAX {
            return Err(ProxyError::Malformed("v2 header too long"));
        }
        return Ok(Some(len));
    }
    if b.len() < 12 && V2_SIGNATURE.starts_with(b) {
        return Ok(None);
    }
    if b.starts_with(b"PROXY ") {
        return match b.windows(2).position(|w| w == b"\r\n") {
            Some(i) if i + 2 <= V1_MAX => Ok(Some(i + 2)),
            Some(_) => Err(ProxyError::Malformed("v1 line too long")),
            None if b.len() >= V1_MAX => Err(ProxyError::Malformed("v1 line too long")),
            None => Ok(None),
        };
    }
    if b.len() < 6 && b"PROXY ".starts_with(b) {
        return Ok(None);
    }
    Err(ProxyError::Missing)
}

/// Parses a complete header.
fn parse(h: &[u8], socket_peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    if h.starts_with(&V2_SIGNATURE) {
        return parse_v2(h, socket_peer);
    }
    let line = std::str::from_utf8(&h[..h.len() - 2])
        .map_err(|_| ProxyError::Malformed("v1 line is not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(socket_peer),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("v1 address family"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Ok(SocketAddr::new(ip, port))
        }
        _ => Err(ProxyError::Malformed("v1 fields")),
    }
}

fn parse_v2(h: &[u8], socket_peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let (version_command, family) = (h[12], h[13]);
    if version_command >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    match version_command & 0x0F {
        0 => return Ok(socket_peer), // LOCAL: the balancer's own connection
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command")),
    }
    let body = &h[16..];
    match family >> 4 {
        0 => Ok(socket_peer), // AF_UNSPEC
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        1 | 2 => Err(ProxyError::Malformed("v2 address block too short")),
        _ => Err(ProxyError::Malformed("v2 address family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> SocketAddr {
        "10.0.0.9:40000".parse().unwrap()
    }

    #[test]
    fn v1_names_the_client() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 8883\r\n";
        assert_eq!(header_len(h).unwrap(), Some(h.len()));
        assert_eq!(
            parse(h, socket()).unwrap(),
            "192.0.2.7:56324".parse().unwrap()
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 8883\r\n";
        assert_eq!(
            parse(h6, socket()).unwrap(),
            "[2001:db8::7]:4000".parse().unwrap()
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n", socket()).unwrap(), socket());
    }

    #[test]
    fn v2_names_the_client_and_local_keeps_the_socket() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([
            0x21, 0x11, 0, 12, 192, 0, 2, 7, 198, 51, 100, 1, 0xDB, 0xC4, 0x22, 0xB3,
        ]);
        assert_eq!(header_len(&h).unwrap(), Some(28));
        assert_eq!(
            parse(&h, socket()).unwrap(),
            "192.0.2.7:56260".parse().unwrap()
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local, socket()).unwrap(), socket());
    }

    #[test]
    fn anything_else_is_refused() {
        // A TLS ClientHello straight away.
        assert!(matches!(
            header_len(&[0x16, 3, 1, 0, 0xA5]),
            Err(ProxyError::Missing)
        ));
        assert!(
            header_len(b"PROX").unwrap().is_none(),
            "maybe a header: wait for more"
        );
        assert!(matches!(header_len(&[b'P'; 200]), Err(ProxyError::Missing)));
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(header_len(&long), Err(ProxyError::Malformed(_))));
        for bad in [
            &b"PROXY TCP4 999.0.0.1 1.1.1.1 1 2\r\n"[..],
            b"PROXY TCP4 2001:db8::1 1.1.1.1 1 2\r\n",
            b"PROXY TCP4 1.1.1.1 1.1.1.1 99999 2\r\n",
            b"PROXY UDP 1.1.1.1\r\n",
        ] {
            assert!(
                matches!(parse(bad, socket()), Err(ProxyError::Malformed(_))),
                "{bad:?}"
            );
        }
        let mut short = V2_SIGNATURE.to_vec();
        short.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(matches!(
            parse(&short, socket()),
            Err(ProxyError::Malformed(_))
        ));
    }
}
