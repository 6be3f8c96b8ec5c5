//! A client that puts an IP address in the TLS server_name extension (OpenSSL-based
//! clients do when connecting by address: `mosquitto_pub -h 127.0.0.1`) makes rustls log a
//! WARN from its ClientHello parser on every connection. RFC 6066 forbids IP addresses
//! there and rustls ignores it: the broker's operator can do nothing about it and any
//! client can cause it at will, so it is not a warning for operators. That module's
//! peer-triggered remarks are held to errors (docs/contract.md "Logs"), unless the level
//! names rustls; other rustls warnings are untouched.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::ops::{config, Proc};
use crate::common::Fixture;

/// A TLS 1.2 ClientHello offering ECDHE-ECDSA-AES128-GCM-SHA256 over X25519, with
/// `server_name` set to `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    // server_name: a list with one host_name entry.
    let n = name.as_bytes();
    let entry_len = 3 + n.len();
    ext.extend_from_slice(&[0x00, 0x00]);
    ext.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(entry_len as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
    ext.extend_from_slice(n);
    // supported_groups: x25519, secp256r1.
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed.
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // signature_algorithms: ecdsa_secp256r1_sha256.
    ext.extend_from_slice(&[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2b]);
    body.extend_from_slice(&[0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Sends a ClientHello naming `sni`, asserts the broker answered with a ServerHello (so
/// the hello was parsed), hangs up, and waits for the broker's line about that handshake.
async fn hello_with_sni(broker: &mut Proc, sni: &str) {
    let mut tcp = tokio::net::TcpStream::connect(broker.mqtt)
        .await
        .expect("connect");
    let port = tcp.local_addr().expect("local addr").port();
    tcp.write_all(&client_hello(sni)).await.expect("hello");
    let mut head = [0u8; 6];
    tokio::time::timeout(crate::common::WAIT, tcp.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(
        (head[0], head[5]),
        (0x16, 0x02),
        "a ServerHello expected: {head:02x?}"
    );
    drop(tcp);
    // The handshake's end is logged by the broker (info), after anything rustls logged.
    broker
        .wait_line(&format!("TLS handshake failed peer=127.0.0.1:{port}"))
        .await;
}

#[tokio::test]
async fn an_ip_address_as_sni_logs_no_warning() {
    let fx = Fixture::new();
    let mut broker = Proc::start(&fx, &config(&fx, &Fixture::fleet_anchor(true))).await;
    hello_with_sni(&mut broker, "127.0.0.1").await;
    let log = broker.stderr();
    assert!(!log.contains("Illegal SNI"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
}

/// The control: naming rustls in the level brings the line back, so the test above sees
/// the event it looks for when it is logged.
#[tokio::test]
async fn the_sni_remark_is_there_when_the_level_names_rustls() {
    let fx = Fixture::new();
    let body = format!(
        "[log]\nlevel = \"info,rustls=warn\"\n\n{}",
        Fixture::fleet_anchor(true)
    );
    let mut broker = Proc::start(&fx, &config(&fx, &body)).await;
    hello_with_sni(&mut broker, "127.0.0.1").await;
    let log = broker.stderr();
    assert!(
        log.contains("Illegal SNI extension: ignoring IP address presented as hostname"),
        "{log}"
    );
}
