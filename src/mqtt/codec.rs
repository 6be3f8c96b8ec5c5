//! MQTT 3.1.1 and 5.0 packets over one connection's byte stream (contract §6 and 9).
//!
//! Why this module exists: `mqttbytes-ng` decodes and encodes packet bodies well, but it has
//! a single maintainer, counts its size limit without the fixed header, skips several
//! "malformed packet" rules and mis-encodes some MQTT 5 packets (see `encode.rs`). Everything
//! in certmq reaches it through this module, which:
//!
//! - frames packets itself (`frame.rs`) and refuses one larger than `max_packet_size` (the
//!   whole packet) from its fixed header alone, before buffering its body;
//! - decides MQTT 3.1.1 or 5.0 from the CONNECT's protocol name and level, then decodes every
//!   later packet of the connection with that version;
//! - adds the checks the crate skips (reserved flag bits, fixed lengths, subscription
//!   options, empty UNSUBSCRIBE, UTF-8 of MQTT 5 topics);
//! - is cancellation safe: all state lives in [`PacketReader`], so `read_packet` can sit in a
//!   `tokio::select!` next to the outgoing queue and the keep-alive timer.

mod encode;
mod frame;
mod rules;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_reader;
#[cfg(test)]
mod tests_rules;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use encode::{encode, encode_bare_publish, encode_within, encoded_len, fit, BarePublish};
pub use mqttbytes_ng::{v4, v5, QoS};

/// How much the reader asks the stream for at a time. The buffer grows by at most this much
/// ahead of what arrived, whatever length a peer announces; 8 KiB holds a typical PUBLISH
/// and matches the buffers rustls reads TLS records into.
const READ_CHUNK: usize = 8 * 1024;

/// An emptied read buffer larger than this is released, so that one large PUBLISH does not
/// pin its memory on an otherwise idle connection.
const KEEP_CAPACITY: usize = 2 * READ_CHUNK;

/// What an idle connection reads with: enough for a PINGREQ or a small PUBLISH.
const IDLE_READ: usize = 256;

/// CONNACK properties with nothing set (mqttbytes-ng has no `Default` for them).
pub fn empty_connack_properties() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// The first packet of a connection, decoded by the protocol level it announces.
// Once per connection and consumed at once: moving 400 bytes costs less than a Box would.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    V311(v4::Connect),
    /// MQTT 5 carries the will and the credentials beside the CONNECT in mqttbytes-ng.
    V5 {
        connect: v5::Connect,
        will: Option<v5::LastWill>,
        login: Option<v5::Login>,
    },
}

/// Any packet after CONNECT, in the connection's protocol. Also what [`encode`] writes.
// Unboxed so that the session matches `Packet::V5(v5::Packet::Publish(p))` directly; a packet
// lives from one read (or one encode) to the next, so its size does not accumulate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    V311(v4::Packet),
    V5(v5::Packet),
}

/// Why a connection's packets could not be read or written. One enum for the whole codec so
/// that the session maps each case to its protocol outcome in one place
/// ([`CodecError::v5_reason_code`]).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("reading from the connection failed")]
    Io(#[source] std::io::Error),
    /// The stream ended between two packets: a normal end, nothing to answer.
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a packet")]
    TruncatedPacket,
    /// Decided from the fixed header alone; `size` is the whole packet the peer announced.
    #[error("a packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    #[error("malformed packet")]
    Malformed(#[source] Malformed),
    /// What MQTT 5 calls a Protocol Error (0x82): the packet decodes, but breaks a rule.
    #[error("protocol error")]
    Protocol(#[source] Violation),
    /// The first packet of a connection must be CONNECT (MQTT-3.1.0-1); decided from its
    /// first byte, so an HTTP request or a TLS record is refused at once.
    #[error("the first packet is not CONNECT")]
    NotConnect,
    /// A second CONNECT is a protocol violation (MQTT-3.1.0-2).
    #[error("a second CONNECT arrived on the same connection")]
    UnexpectedConnect,
    /// MQTT 3.1 (`MQIsdp`) or an unknown level of `MQTT`. `form` is the CONNACK layout the
    /// client can parse, judged from the layout of its CONNECT: the caller answers in that
    /// form (3.1.1 return code 1, or MQTT 5 0x84), then closes.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        name: String,
        level: u8,
        form: Protocol,
    },
    /// The caller used the reader out of order: `read_connect` must succeed exactly once,
    /// before any `read_packet`.
    #[error("read_connect must succeed exactly once, before read_packet")]
    OutOfOrder,
    #[error("the packet cannot be encoded")]
    Unencodable(#[source] Unencodable),
}

impl CodecError {
    /// The MQTT 5 reason code for a DISCONNECT or CONNACK about this error. `Io` and
    /// `Closed` get 0x80 (Unspecified error), though there is nobody left to tell.
    pub fn v5_reason_code(&self) -> u8 {
        match self {
            CodecError::Io(_) | CodecError::Closed => 0x80,
            CodecError::TruncatedPacket | CodecError::Malformed(_) => 0x81,
            CodecError::NotConnect | CodecError::UnexpectedConnect | CodecError::Protocol(_) => {
                0x82
            }
            CodecError::OutOfOrder | CodecError::Unencodable(_) => 0x83,
            CodecError::UnsupportedProtocol { .. } => 0x84,
            CodecError::PacketTooLarge { .. } => 0x95,
        }
    }
}

impl CodecError {
    /// The reason string of the MQTT 5 DISCONNECT (or log line) about this error: the
    /// error and, for a malformed packet or a protocol error, the rule it broke.
    pub fn reason_string(&self) -> String {
        match (self, std::error::Error::source(self)) {
            (CodecError::Malformed(_) | CodecError::Protocol(_), Some(cause)) => {
                format!("{self}: {cause}")
            }
            _ => self.to_string(),
        }
    }
}

/// What made a packet malformed: either mqttbytes-ng's own finding, or one of the rules this
/// module checks because the crate does not.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("the packet body does not decode")]
    Decode(#[source] mqttbytes_ng::Error),
    #[error("the remaining length has more than four bytes")]
    RemainingLength,
    #[error("packet type {0} is reserved")]
    ReservedPacketType(u8),
    #[error("packet type {packet_type} has reserved flag bits {flags:#06b}")]
    ReservedFlags { packet_type: u8, flags: u8 },
    #[error("packet type {packet_type} must have a remaining length of {expected}, not {actual}")]
    RemainingLengthFixed {
        packet_type: u8,
        expected: usize,
        actual: usize,
    },
    #[error("subscription options {0:#010b} have reserved bits set")]
    SubscriptionOptions(u8),
    #[error("UNSUBSCRIBE without any topic filter")]
    EmptyUnsubscribe,
    #[error("topic name is not UTF-8")]
    TopicNotUtf8(#[source] std::str::Utf8Error),
    #[error("CONNECT ends inside its protocol name, level or flags")]
    ConnectHeader,
    #[error("CONNECT names protocol {0:?}, which is not MQTT")]
    ProtocolName(String),
    #[error("CONNECT sets the reserved flag bit")]
    ReservedConnectFlag,
    #[error("MQTT 3.1.1 CONNECT has a password without a user name")]
    PasswordWithoutUserName,
    /// MQTT-1.5.3-2 (3.1.1) and MQTT-1.5.4-2 (5.0): no UTF-8 string may hold U+0000.
    #[error("{0} contains U+0000")]
    Nul(&'static str),
    /// MQTT-3.3.1-2: a QoS 0 message is never a redelivery.
    #[error("QoS 0 PUBLISH with DUP set")]
    DupOnQos0,
    /// MQTT-3.3.2-14: a Response Topic is a topic name, so it has no wildcard.
    #[error("response topic contains a wildcard")]
    ResponseTopicWildcard,
}

/// A rule broken by a packet that decodes: MQTT 5 answers it with 0x82 Protocol Error,
/// MQTT 3.1.1 by closing the connection.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// MQTT 5 §2.2.2.2: only User Property (and, server to client, Subscription
    /// Identifier) may appear more than once.
    #[error("{0} appears more than once")]
    DuplicateProperty(&'static str),
    /// MQTT-2.2.1-3: SUBSCRIBE, UNSUBSCRIBE and PUBLISH with QoS > 0 carry a non-zero id.
    #[error("{0} with packet identifier 0")]
    PacketIdZero(&'static str),
    /// MQTT 5 §3.1.2.11.3-4: Receive Maximum and Maximum Packet Size are never 0.
    #[error("{0} of 0")]
    Zero(&'static str),
    /// MQTT 5 §3.1.2.11.6-7: the two Request properties are 0 or 1.
    #[error("{name} of {value}, which must be 0 or 1")]
    NotABoolean { name: &'static str, value: u8 },
    /// MQTT-4.7.3-1: topic names and filters are at least one character long.
    #[error("empty topic filter")]
    EmptyTopicFilter,
}

/// Why a packet could not be encoded: a broker bug (what we send is built by us, never
/// copied blindly from a peer), or a peer whose Maximum Packet Size leaves no room for it.
#[derive(Debug, thiserror::Error)]
pub enum Unencodable {
    #[error("mqttbytes-ng refused the packet")]
    Library(#[source] mqttbytes_ng::Error),
    #[error("a string of {len} bytes does not fit the two-byte MQTT length")]
    StringTooLong {
        len: usize,
        #[source]
        source: std::num::TryFromIntError,
    },
    #[error("a length of {len} does not fit a Variable Byte Integer")]
    TooLong { len: usize },
    /// Even without what MQTT 5 lets a sender leave out, the packet is larger than the
    /// peer's Maximum Packet Size.
    #[error("a packet of {size} bytes exceeds the peer's maximum packet size of {max} bytes")]
    ExceedsPeerMaximum { size: usize, max: usize },
}

/// Reads packets from one connection. It owns the read buffer, so a read cancelled by
/// `select!` loses nothing: the bytes already read stay in `buf` for the next call.
#[derive(Debug)]
pub struct PacketReader<R> {
    inner: R,
    /// Bytes read but not yet decoded: at most the current packet (bounded by
    /// `max_packet_size`) plus one `READ_CHUNK`.
    buf: BytesMut,
    /// Limit on a whole packet (fixed header included), as contract §9 and MQTT 5 define it.
    max_packet_size: usize,
    /// `None` until `read_connect` succeeds; then every packet is decoded with it.
    protocol: Option<Protocol>,
    /// The protocol the CONNECT named, once its name and level were read: the form of the
    /// CONNACK that refuses a CONNECT which then fails to decode.
    announced: Option<Protocol>,
}

impl<R: AsyncRead + Unpin> PacketReader<R> {
    pub fn new(inner: R, max_packet_size: usize) -> Self {
        PacketReader {
            inner,
            buf: BytesMut::new(),
            max_packet_size,
            protocol: None,
            announced: None,
        }
    }

    /// Reads the CONNECT, decides the protocol from its protocol name and level, and fixes
    /// it for the rest of the connection.
    pub async fn read_connect(&mut self) -> Result<Connect, CodecError> {
        if self.protocol.is_some() {
            return Err(CodecError::OutOfOrder);
        }
        let (header, frame) = self.next_frame().await?;
        let protocol = frame::connect_protocol(&frame[header.header_len..])?;
        self.announced = Some(protocol);
        let connect = decode_connect(protocol, &header, frame)?;
        self.protocol = Some(protocol);
        // Most connections idle after CONNECT: give the read chunk back now rather than hold
        // 8 KiB per idle device (contract §11 idle memory); the next read allocates again.
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        Ok(connect)
    }

    /// Next packet in the negotiated protocol (after `read_connect`). A second CONNECT is a
    /// protocol error. Cancellation safe.
    pub async fn read_packet(&mut self) -> Result<Packet, CodecError> {
        let protocol = self.protocol.ok_or(CodecError::OutOfOrder)?;
        let (header, frame) = self.next_frame().await?;
        decode_packet(protocol, &header, frame)
    }

    /// The next packet if it is already whole in the buffer, without reading: lets the
    /// session handle a burst of pipelined packets in one go.
    pub fn buffered_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        let protocol = self.protocol.ok_or(CodecError::OutOfOrder)?;
        match self.buffered_frame()? {
            Some((header, frame)) => decode_packet(protocol, &header, frame).map(Some),
            None => Ok(None),
        }
    }

    /// The protocol fixed by `read_connect`, if it succeeded.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// The protocol the CONNECT announced by its name and level, also when it then failed
    /// to decode: whether an MQTT 5 CONNACK may tell the client why it is refused.
    pub fn announced(&self) -> Option<Protocol> {
        self.announced
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Waits for one whole packet and takes it out of the buffer. Every check that needs
    /// only the first byte or the fixed header runs as soon as those bytes are in, so a peer
    /// cannot make us wait for (or buffer) a body we are going to refuse.
    async fn next_frame(&mut self) -> Result<(frame::FixedHeader, BytesMut), CodecError> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// A whole packet already in the buffer, if any, with every check `next_frame` makes.
    fn buffered_frame(&mut self) -> Result<Option<(frame::FixedHeader, BytesMut)>, CodecError> {
        if let Some(&byte1) = self.buf.first() {
            self.check_first_byte(byte1)?;
        }
        if let Some(header) = frame::parse_fixed_header(&self.buf).map_err(CodecError::Malformed)? {
            if header.frame_len() > self.max_packet_size {
                return Err(CodecError::PacketTooLarge {
                    size: header.frame_len(),
                    max: self.max_packet_size,
                });
            }
            if let Some(protocol) = self.protocol {
                frame::check_remaining_len(&header, protocol).map_err(CodecError::Malformed)?;
            }
            if self.buf.len() >= header.frame_len() {
                return Ok(Some((header, self.take_frame(header.frame_len()))));
            }
        }
        Ok(None)
    }

    fn check_first_byte(&self, byte1: u8) -> Result<(), CodecError> {
        let is_connect = byte1 >> 4 == frame::CONNECT;
        match self.protocol {
            None if !is_connect => Err(CodecError::NotConnect),
            Some(_) if is_connect => Err(CodecError::UnexpectedConnect),
            // CONNECT's flags are 0000 in both versions.
            protocol => frame::check_first_byte(byte1, protocol.unwrap_or(Protocol::V311))
                .map_err(CodecError::Malformed),
        }
    }

    /// Copies the packet out instead of splitting the buffer: the decoded payload then owns
    /// an allocation of its own size, so a small message queued for an offline session does
    /// not pin a whole read chunk, and the read buffer is reused in place.
    fn take_frame(&mut self, len: usize) -> BytesMut {
        let frame = BytesMut::from(&self.buf[..len]);
        self.buf.advance(len);
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = BytesMut::new();
        }
        frame
    }

    /// Reads what the stream has, up to `READ_CHUNK` more than the buffer holds. A TLS peer
    /// that closes without close_notify surfaces as `UnexpectedEof`: treated as an end of
    /// stream like a plain one.
    async fn fill(&mut self) -> Result<(), CodecError> {
        let result = if self.buf.capacity() == 0 {
            // An idle connection (buffer released after CONNECT) waits with a small array in
            // its own future instead of an 8 KiB heap chunk (contract §11 idle memory); the
            // copy happens in the same poll that completed the read, so a cancelled read
            // loses nothing.
            let mut small = [0u8; IDLE_READ];
            match self.inner.read(&mut small).await {
                Ok(n) => {
                    self.buf.extend_from_slice(&small[..n]);
                    Ok(n)
                }
                Err(e) => Err(e),
            }
        } else {
            self.buf.reserve(READ_CHUNK);
            self.inner.read_buf(&mut self.buf).await
        };
        let read = match result {
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(error) => return Err(CodecError::Io(error)),
        };
        match read {
            0 if self.buf.is_empty() => Err(CodecError::Closed),
            0 => Err(CodecError::TruncatedPacket),
            _ => Ok(()),
        }
    }
}

/// Decodes a CONNECT (`frame`, fixed header included) in the protocol it announced, with
/// the rules mqttbytes-ng skips (`rules.rs`).
fn decode_connect(
    protocol: Protocol,
    header: &frame::FixedHeader,
    mut frame: BytesMut,
) -> Result<Connect, CodecError> {
    match protocol {
        Protocol::V311 => match v4::Packet::read(&mut frame, usize::MAX).map_err(decode)? {
            v4::Packet::Connect(connect) => {
                rules::connect_v311(&connect)?;
                Ok(Connect::V311(connect))
            }
            _ => Err(CodecError::NotConnect),
        },
        Protocol::V5 => {
            rules::before_decode_connect_v5(&frame[header.header_len..])?;
            match v5::Packet::read(&mut frame, None).map_err(decode)? {
                v5::Packet::Connect(connect, will, login) => {
                    if let Some(will) = &will {
                        check_topic(&will.topic)?;
                    }
                    rules::connect_v5(&connect, will.as_ref(), login.as_ref())?;
                    Ok(Connect::V5 {
                        connect,
                        will,
                        login,
                    })
                }
                _ => Err(CodecError::NotConnect),
            }
        }
    }
}

/// Decodes one whole packet (`frame`, fixed header included) of an established connection.
fn decode_packet(
    protocol: Protocol,
    header: &frame::FixedHeader,
    mut frame: BytesMut,
) -> Result<Packet, CodecError> {
    let body = &frame[header.header_len..];
    if header.packet_type() == frame::SUBSCRIBE {
        frame::check_subscription_options(body, protocol).map_err(CodecError::Malformed)?;
    }
    match protocol {
        Protocol::V311 => {
            rules::before_decode_v311(header.byte1, body)?;
            let packet = v4::Packet::read(&mut frame, usize::MAX).map_err(decode)?;
            if matches!(&packet, v4::Packet::Unsubscribe(unsubscribe) if unsubscribe.topics.is_empty())
            {
                return Err(CodecError::Malformed(Malformed::EmptyUnsubscribe));
            }
            rules::packet_v311(&packet)?;
            Ok(Packet::V311(packet))
        }
        Protocol::V5 => {
            // mqttbytes-ng requires a property length after the reason code; MQTT 5
            // (3.14.2.2.1) lets a DISCONNECT end right after it.
            if let (frame::DISCONNECT, [reason]) = (header.packet_type(), body) {
                let reason_code = v5::DisconnectReasonCode::try_from(*reason).map_err(decode)?;
                return Ok(Packet::V5(v5::Packet::Disconnect(v5::Disconnect::new(
                    reason_code,
                ))));
            }
            rules::before_decode_v5(header.byte1, body)?;
            let packet = v5::Packet::read(&mut frame, None).map_err(decode)?;
            match &packet {
                v5::Packet::Publish(publish) => check_topic(&publish.topic)?,
                v5::Packet::Unsubscribe(unsubscribe) if unsubscribe.filters.is_empty() => {
                    return Err(CodecError::Malformed(Malformed::EmptyUnsubscribe))
                }
                _ => {}
            }
            rules::packet_v5(&packet)?;
            Ok(Packet::V5(packet))
        }
    }
}

/// mqttbytes-ng keeps MQTT 5 topic names as raw bytes; MQTT 5 (1.5.4) makes a topic that is
/// not UTF-8 a malformed packet, so downstream code may rely on it.
fn check_topic(topic: &[u8]) -> Result<(), CodecError> {
    std::str::from_utf8(topic)
        .map(|_| ())
        .map_err(|source| CodecError::Malformed(Malformed::TopicNotUtf8(source)))
}

fn decode(source: mqttbytes_ng::Error) -> CodecError {
    CodecError::Malformed(Malformed::Decode(source))
}
