//! `[server] proxy_protocol` (contract §12): behind an L4 balancer, the device's address
//! comes from the PROXY header, so logs and refusals name the device, not the balancer.

use tokio::io::AsyncWriteExt;

use crate::common::coretests::raw::RawConnect;
use crate::common::coretests::V;
use crate::common::ops::{config_with_limits, pinned_backend, Proc};
use crate::common::{read_packet, Client, Fixture, WAIT};

/// TCP to `addr`, `header` first, then TLS and a CONNECT as `client`; the first packet.
async fn connect_via(
    client: &Client,
    addr: std::net::SocketAddr,
    header: &[u8],
) -> Result<Vec<u8>, String> {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.write_all(header).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client.tls.clone());
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{e:?}"))?;
    tls.write_all(&RawConnect::new(V::V5, "via-proxy").bytes())
        .await
        .map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    tokio::time::timeout(WAIT, read_packet(&mut tls))
        .await
        .map_err(|_| "no packet in time".to_owned())?
}

#[tokio::test]
async fn the_device_address_comes_from_the_proxy_header() {
    let fx = Fixture::new();
    let (body, backend) = pinned_backend(&fx);
    let config = config_with_limits(&fx, "handshake_timeout = 5\nconnect_timeout = 5", &body);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[server]\n", "[server]\nproxy_protocol = true\n", 1),
    )
    .unwrap();
    let mut broker = Proc::start(&fx, &config).await;

    // v1, as HAProxy sends it.
    let ack = connect_via(
        &backend,
        broker.mqtt,
        b"PROXY TCP4 203.0.113.9 198.51.100.1 51234 8883\r\n",
    )
    .await
    .expect("connected through the v1 header");
    assert_eq!((ack[0], ack[3]), (0x20, 0), "CONNACK success: {ack:02x?}");
    let line = broker.wait_line("203.0.113.9:51234").await;
    assert!(line.contains("accepted"), "{line}");

    // v2, as cloud balancers send it.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend([
        0x21, 0x11, 0, 12, 192, 0, 2, 44, 198, 51, 100, 1, 0x10, 0x01, 0x22, 0xB3,
    ]);
    let ack = connect_via(&backend, broker.mqtt, &v2)
        .await
        .expect("v2 header");
    assert_eq!((ack[0], ack[3]), (0x20, 0), "{ack:02x?}");
    broker.wait_line("192.0.2.44:4097").await;

    // Straight TLS, without the balancer: refused before TLS, and said why.
    assert!(connect_via(&backend, broker.mqtt, b"").await.is_err());
    let line = broker.wait_line("connection closed before TLS").await;
    assert!(line.contains("PROXY"), "{line}");
}
