//! One connection after CONNACK: the MQTT session loop (contract §4, 6, 9).
//!
//! One task per connection reads packets, enforces keep alive, moves deliveries from the
//! session's queue into an out buffer within the in-flight window, and writes that buffer
//! to TLS, all from one `select!`: a delivery costs no hop to another task, and reading goes
//! on while a write waits (PUBACKs keep freeing the window; a broker that stops reading while
//! it writes deadlocks with a client that does the same). A client that does not read stops
//! our writes: deliveries pile up in its bounded session queue (its publishers are paced
//! until it stalls, contract §9), reading stops at `OUT_MAX`, and a write without progress for
//! `write_limit` ends the connection. A message of this client's that waits for room in a
//! subscriber's queue (`Conn::paced`) stops reading from it, nothing else.

use std::borrow::Cow;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

mod alias;
pub mod connect;
mod publish;
mod subscribe;
#[cfg(test)]
mod tests;

use crate::acl;
use crate::broker::session::{Outgoing, SessionRef};
use crate::broker::wire::{self, Inbound};
use crate::broker::{message::Message, Broker, Will, WriteError};
use crate::identity::DeviceName;
use crate::mqtt::codec::{self, v5, CodecError, Packet, PacketReader, Protocol, QoS};

/// Deliveries are encoded into the out buffer only while it holds less than this: the
/// session queue is where messages wait, the buffer only feeds the socket.
const OUT_HIGH: usize = 64 * 1024;
/// Buffered packets handled after one that came through `select!`, before selecting again
/// (bounded so that deliveries and signals are still looked at regularly).
const BURST: usize = 64;
/// Deliveries taken from the session queue per pump step.
const PUMP_BATCH: usize = 256;
/// Reading pauses while the out buffer holds more than this (acknowledgements of a client
/// that sends but does not read cannot grow it without bound).
const OUT_MAX: usize = 1024 * 1024;

/// What a connection negotiated at CONNECT.
#[derive(Debug, Clone)]
pub struct Params {
    pub protocol: Protocol,
    /// Effective keep alive, seconds (never 0: see `connect::effective_keep_alive`).
    pub keep_alive: u16,
    /// Outbound QoS 1/2 in flight: min(max_inflight, the client's Receive Maximum).
    pub window: usize,
    /// Inbound QoS 2 in flight we accept (our Receive Maximum, = max_inflight).
    pub receive_max: usize,
    /// Topic aliases the client may use (our Topic Alias Maximum).
    pub topic_alias_max: u16,
    /// Topic aliases we may use towards the client: its Topic Alias Maximum (0 in 3.1.1),
    /// capped at `max_server_topic_aliases`.
    pub client_topic_alias_max: u16,
    /// The client's Maximum Packet Size (MQTT 5).
    pub client_max_packet: Option<usize>,
    /// Bound on one write to the client.
    pub write_limit: Duration,
    /// MQTT 5: the session expiry was 0 at CONNECT (DISCONNECT may not raise it).
    pub expiry_was_zero: bool,
    /// `max_session_expiry`: a DISCONNECT may not raise the expiry above it either.
    pub max_session_expiry: u32,
    /// MQTT 5 Request Problem Information: when false, no reason strings on acknowledgements
    /// (MQTT 5 §3.1.2.11.7; CONNACK, DISCONNECT and PUBLISH may still carry them).
    pub problem_info: bool,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error("client sent DISCONNECT")]
    Disconnect { with_will: bool },
    #[error("keep alive expired: no packet for {0:?}")]
    KeepAlive(Duration),
    #[error("broker shutting down")]
    Shutdown,
    #[error("session taken over by a new connection")]
    TakenOver,
    /// The device is no longer admitted (reload, CRL, registry change).
    #[error("revoked: {0}")]
    Revoked(String),
    #[error("connection closed")]
    Closed(#[source] CodecError),
    #[error("protocol error: {text}")]
    Protocol {
        code: v5::DisconnectReasonCode,
        text: String,
    },
    #[error("write failed")]
    Write(#[source] WriteError),
}

impl End {
    /// The MQTT 5 DISCONNECT the broker sends before closing, if any.
    fn disconnect_packet(&self) -> Option<Packet> {
        use v5::DisconnectReasonCode as D;
        let (code, text) = match self {
            End::KeepAlive(_) => (D::KeepAliveTimeout, "keep alive timeout".to_owned()),
            End::Shutdown => (D::ServerShuttingDown, "server shutting down".to_owned()),
            End::TakenOver => (D::SessionTakenOver, "session taken over".to_owned()),
            End::Revoked(reason) => (D::NotAuthorized, reason.clone()),
            End::Protocol { code, text } => (*code, text.clone()),
            End::Closed(e)
                if !matches!(
                    e,
                    CodecError::Closed | CodecError::Io(_) | CodecError::TruncatedPacket
                ) =>
            {
                (disconnect_code(e.v5_reason_code()), e.reason_string())
            }
            _ => return None,
        };
        Some(disconnect_v5(code, &text))
    }

    /// Whether the will is published (contract §6: not on DISCONNECT; MQTT 5 0x04 asks for it;
    /// not when the broker itself shuts down).
    fn publishes_will(&self) -> bool {
        match self {
            End::Disconnect { with_will } => *with_will,
            // A device that is no longer trusted does not get to speak once more.
            End::Shutdown | End::Revoked(_) => false,
            _ => true,
        }
    }
}

/// Tells one connection to close because its device is no longer admitted.
#[derive(Debug, Default)]
pub struct Revoke {
    token: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl Revoke {
    /// Revokes with a reason (first reason wins).
    pub fn revoke(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.token.cancel();
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The reason, once revoked.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "revoked".to_owned())
    }
}

/// What can end a session from outside the connection.
pub struct Signals<'a> {
    /// The broker is shutting down.
    pub shutdown: &'a CancellationToken,
    /// Another connection took the session over.
    pub kick: &'a CancellationToken,
    /// The device is no longer admitted.
    pub revoke: &'a Revoke,
}

/// Runs a session on a connection until it ends, then publishes the will if due and
/// detaches (or ends) the session.
#[allow(clippy::too_many_arguments)]
pub async fn serve<R, W>(
    broker: &Arc<Broker>,
    session: &SessionRef,
    conn_id: u64,
    device: &DeviceName,
    reader: &mut PacketReader<R>,
    writer: W,
    params: Params,
    will: Option<Will>,
    generation: u64,
    signals: Signals<'_>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + Sync + 'static,
{
    let mut will = will;
    if let Some(w) = will.as_mut() {
        broker.hold_will(session, w);
    }
    let write_limit = params.write_limit;
    let params_alias_max = params.client_topic_alias_max;
    let mut conn = Conn {
        broker,
        session,
        conn_id,
        device,
        p: params,
        wr: Box::pin(writer),
        out: BytesMut::new(),
        unflushed: false,
        aliases: HashMap::new(),
        out_aliases: alias::OutAliases::new(params_alias_max),
        pending: std::collections::VecDeque::new(),
        paced: None,
        allowed: None,
        routes: Default::default(),
    };
    let end = conn.run(reader, &signals).await;
    if conn.p.protocol == Protocol::V5 {
        if let Some(bye) = end.disconnect_packet() {
            let _ = codec::encode_within(&bye, conn.p.client_max_packet, &mut conn.out);
        }
    }
    // What is still buffered (the final DISCONNECT included) goes out, then TLS closes;
    // all of it bounded, as every wait on a peer.
    if !matches!(end, End::Write(_)) {
        let Conn { mut wr, out, .. } = conn;
        let _ = tokio::time::timeout(write_limit, async {
            wr.write_all(&out).await?;
            wr.flush().await?;
            wr.shutdown().await
        })
        .await;
    }
    if let Some(w) = will {
        if end.publishes_will() {
            broker.publish_will(session, w, generation);
        } else {
            broker.drop_will(session, &w);
        }
    }
    broker.close_session(session, conn_id);
    end
}

/// What woke the loop. Short-lived, one at a time: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Event {
    Packet(Packet),
    Wake,
    /// A session the paced message waits for has room (or went offline, or stalled).
    Room,
    /// Bytes went to the TLS layer (count), or the write failed.
    Wrote(std::io::Result<usize>),
    /// The TLS layer flushed to the socket.
    Flushed(std::io::Result<()>),
    /// The commit the front acknowledgement waited for finished.
    Committed(crate::broker::journal::Commit),
    End(End),
}

/// One step of output: a write of what is buffered, or, once all is written, a flush.
/// Cancellation safe: a write either happened (and is reported) or did not.
async fn write_or_flush(mut wr: Pin<&mut (dyn AsyncWrite + Send + Sync)>, out: &[u8]) -> Event {
    if out.is_empty() {
        Event::Flushed(wr.flush().await)
    } else {
        Event::Wrote(wr.write(out).await)
    }
}

/// Completes when the front pending acknowledgement's commit is done; never when there is
/// none or it waits for nothing (those are sent as soon as they reach the front).
/// Cancellation safe: polling a borrowed receiver does not consume its value.
async fn front_ack(
    pending: &mut std::collections::VecDeque<publish::PendingAck>,
) -> crate::broker::journal::Commit {
    match pending.front_mut().and_then(|p| p.wait.as_mut()) {
        Some(rx) => rx
            .await
            .unwrap_or(Err(crate::broker::journal::CommitError::Stopped)),
        None => std::future::pending().await,
    }
}

/// The connection's state inside the loop.
struct Conn<'a> {
    broker: &'a Arc<Broker>,
    session: &'a SessionRef,
    conn_id: u64,
    device: &'a DeviceName,
    p: Params,
    /// The connection's write half. Written from this task itself, from the select! loop,
    /// so a delivery costs no hop to another task, and reading goes on while a write
    /// waits (PUBACKs keep freeing the window).
    wr: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    /// Encoded packets not yet handed to TLS. Bounded: deliveries stop at `OUT_HIGH`,
    /// reading stops at `OUT_MAX`, and a write that makes no progress for `write_limit`
    /// ends the connection (contract §9: a client that does not read).
    out: BytesMut,
    /// Handed to TLS but not yet flushed to the socket.
    unflushed: bool,
    /// MQTT 5 topic aliases set by the client on this connection.
    aliases: HashMap<u16, String>,
    /// MQTT 5 topic aliases certmq set towards the client on this connection.
    out_aliases: alias::OutAliases,
    /// Acknowledgements waiting for their messages' commit, in PUBLISH order.
    pending: std::collections::VecDeque<publish::PendingAck>,
    /// A message waiting for room in the queues it must reach (contract §9 flow control):
    /// while it waits nothing more is read from this client (TCP back-pressure; its
    /// acknowledgement waits too), everything else goes on.
    paced: Option<publish::Paced>,
    /// The last topic the session's ACL let this client publish to, with the
    /// [`Session::acl_epoch`](crate::broker::session::Session::acl_epoch) it was decided
    /// under: a device publishing on one topic is checked once, not per message (the check
    /// locks the session and matches every pattern), until its ACL changes.
    allowed: Option<(u64, crate::mqtt::topic::TopicName)>,
    /// This client's last routing decision (see [`crate::broker::RouteCache`]).
    routes: crate::broker::RouteCache,
}

/// The loop's two deadlines: keep alive (reset by every packet read) and write progress
/// (reset whenever a write or flush makes progress, and when writing starts).
struct Timers {
    idle_limit: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    write_limit: Duration,
    stall: Pin<Box<tokio::time::Sleep>>,
}

impl Timers {
    fn new(keep_alive: u16, write_limit: Duration) -> Timers {
        // MQTT: one and a half keep-alive periods without a packet end the connection.
        let idle_limit = Duration::from_millis(u64::from(keep_alive) * 1500);
        Timers {
            idle_limit,
            idle: Box::pin(tokio::time::sleep(idle_limit)),
            write_limit,
            stall: Box::pin(tokio::time::sleep(write_limit)),
        }
    }

    /// The client sent something (or may again): keep alive starts over.
    fn heard(&mut self) {
        let at = tokio::time::Instant::now() + self.idle_limit;
        self.idle.as_mut().reset(at);
    }

    /// A write made progress: the write deadline starts over.
    fn progressed(&mut self) {
        let at = tokio::time::Instant::now() + self.write_limit;
        self.stall.as_mut().reset(at);
    }
}

impl Conn<'_> {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PacketReader<R>,
        signals: &Signals<'_>,
    ) -> End {
        // A resumed session first gets what was in flight (DUP), then its queue.
        for o in self.session.resend_inflight(self.conn_id) {
            if let Err(end) = self.encode_outgoing(o) {
                return end;
            }
        }
        let mut timers = Timers::new(self.p.keep_alive, self.p.write_limit);
        let mut was_writing = false;
        loop {
            let backlogged = match self.pump().await {
                Ok(b) => b,
                Err(end) => return end,
            };
            let writing = !self.out.is_empty();
            if writing && !was_writing {
                timers.progressed();
            }
            was_writing = writing || self.unflushed;
            let event = self
                .next_event(reader, signals, &mut timers, backlogged)
                .await;
            // Boxed: handling an event (a PUBLISH through routing, commits and
            // acknowledgements) is the largest state of this loop, 4.9 KiB, and inline it
            // would be part of every idle connection's allocation (contract §11 idle
            // memory). One allocation per wake-up, not per packet: a wake-up handles a
            // burst of up to `BURST` pipelined packets.
            if let Err(end) = Box::pin(self.on_event(event, reader, &mut timers)).await {
                return end;
            }
        }
    }

    /// Waits for whatever happens first; in priority order (`biased`): the connection's
    /// end signals, output progress, input, a commit, room for a paced message, timers,
    /// new deliveries.
    async fn next_event<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PacketReader<R>,
        signals: &Signals<'_>,
        timers: &mut Timers,
        backlogged: bool,
    ) -> Event {
        let writing = !self.out.is_empty() || self.unflushed;
        let paced = self.paced.is_some();
        let room = self.room_wait();
        // Stop reading while as many acknowledgements wait as the client may have in
        // flight, or while the client does not read what we write: neither a client
        // ignoring our Receive Maximum nor one that never reads can grow memory without
        // bound; and while a message waits for room in its subscribers' queues.
        let read = !paced && self.pending.len() <= self.p.receive_max && self.out.len() < OUT_MAX;
        tokio::select! {
            biased;
            _ = signals.shutdown.cancelled() => Event::End(End::Shutdown),
            _ = signals.revoke.token().cancelled() => Event::End(End::Revoked(signals.revoke.reason())),
            _ = signals.kick.cancelled() => Event::End(End::TakenOver),
            e = write_or_flush(self.wr.as_mut(), &self.out), if writing => e,
            _ = timers.stall.as_mut(), if writing => {
                Event::End(End::Write(WriteError::Timeout(self.p.write_limit)))
            }
            r = reader.read_packet(), if read => match r {
                Ok(packet) => Event::Packet(packet),
                Err(e) => Event::End(End::Closed(e)),
            },
            r = front_ack(&mut self.pending) => Event::Committed(r),
            () = room, if paced => Event::Room,
            // Not while paced: the client's PINGREQ waits unread behind its message.
            _ = timers.idle.as_mut(), if !paced => Event::End(End::KeepAlive(timers.idle_limit)),
            _ = self.session.notified(), if !backlogged => Event::Wake,
        }
    }

    async fn on_event<R: AsyncRead + Unpin>(
        &mut self,
        event: Event,
        reader: &mut PacketReader<R>,
        timers: &mut Timers,
    ) -> Result<(), End> {
        match event {
            Event::End(end) => return Err(end),
            Event::Wake => {}
            Event::Room => {
                self.retry_paced().await?;
                if self.paced.is_none() {
                    timers.heard();
                }
            }
            Event::Wrote(Ok(0)) => {
                return Err(End::Write(WriteError::Io(
                    std::io::ErrorKind::WriteZero.into(),
                )));
            }
            Event::Wrote(Ok(n)) => {
                self.out.advance(n);
                self.unflushed = true;
                timers.progressed();
                if self.out.is_empty() && self.out.capacity() > 2 * OUT_HIGH {
                    self.out = BytesMut::new();
                }
            }
            Event::Flushed(Ok(())) => {
                self.unflushed = false;
                timers.progressed();
            }
            Event::Wrote(Err(e)) | Event::Flushed(Err(e)) => {
                return Err(End::Write(WriteError::Io(e)));
            }
            Event::Committed(outcome) => {
                if let Some(front) = self.pending.pop_front() {
                    self.finish_ack(front, outcome).await?;
                    self.send_ready_acks().await?;
                }
            }
            Event::Packet(packet) => {
                timers.heard();
                self.on_packets(packet, reader).await?;
            }
        }
        Ok(())
    }

    /// Handles a packet, then the packets the client pipelined behind it, without a round
    /// through `select!` (and its timer, waiter and token checks) each.
    async fn on_packets<R: AsyncRead + Unpin>(
        &mut self,
        packet: Packet,
        reader: &mut PacketReader<R>,
    ) -> Result<(), End> {
        if let Some(end) = self.dispatch(wire::inbound(packet)).await {
            return Err(end);
        }
        for _ in 0..BURST {
            if self.paced.is_some() || self.pending.len() > self.p.receive_max {
                break;
            }
            match reader.buffered_packet() {
                Ok(Some(packet)) => {
                    if let Some(end) = self.dispatch(wire::inbound(packet)).await {
                        return Err(end);
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(End::Closed(e)),
            }
        }
        Ok(())
    }

    /// Completes when the first session the paced message waits for may take it: it has
    /// room, went offline, or reached its stall deadline. Pending when nothing is paced.
    /// Owns what it needs, so the loop can poll it beside borrowing `self`.
    fn room_wait(&self) -> impl std::future::Future<Output = ()> + 'static {
        let first = self
            .paced
            .as_ref()
            .and_then(|p| p.waiting.first())
            .map(|(s, _)| s.clone());
        let stall = self.broker.stall_timeout();
        async move {
            let Some(session) = first else {
                return std::future::pending().await;
            };
            let room = session.room();
            tokio::pin!(room);
            room.as_mut().enable();
            if session.has_room() || !session.online() {
                return;
            }
            let deadline = session.stall_deadline(stall);
            tokio::select! {
                () = room => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Handles one packet: PUBLISH, the hot path, inline; every other packet through a boxed
    /// [`Conn::handle`], whose state (every handler's) then stays out of the connection's
    /// task allocation while it idles (contract §11 idle memory) at the price of one small
    /// allocation per non-PUBLISH packet.
    async fn dispatch(&mut self, inbound: Inbound) -> Option<End> {
        match inbound {
            Inbound::Publish(p) => self.on_publish(p).await.err(),
            // A subscriber's acknowledgements are its hot path (one per QoS 1 delivery):
            // handled inline, without the boxed future of the rarer packets.
            Inbound::PubAck(pkid) => {
                self.session.puback(pkid);
                None
            }
            Inbound::PubComp(pkid) => {
                self.session.pubcomp(pkid);
                None
            }
            other => Box::pin(self.handle(other)).await,
        }
    }

    /// Handles one inbound packet; Some(end) ends the session.
    async fn handle(&mut self, inbound: Inbound) -> Option<End> {
        let r = match inbound {
            Inbound::Publish(p) => self.on_publish(p).await,
            Inbound::PubAck(pkid) => {
                self.session.puback(pkid);
                Ok(())
            }
            Inbound::PubRec { pkid, accepted } => {
                let epoch = self.epoch();
                if self.session.pubrec(pkid, accepted) {
                    // The release is committed before PUBREL leaves: the client forgets the
                    // id on PUBREL, so after a restart the broker must resend PUBREL, never
                    // the PUBLISH (which the client would take for a new message). Not
                    // committed: no PUBREL, the connection ends; the client keeps the id,
                    // and the session (which holds the exchange as released) sends PUBREL
                    // when it is back.
                    if self.session.journal().is_some() && !self.commit(epoch).await {
                        return Some(unstored("the message store cannot record the release now"));
                    }
                    self.send(&wire::pubrel(self.p.protocol, pkid)).await
                } else {
                    Ok(())
                }
            }
            Inbound::PubRel(pkid) => {
                let epoch = self.epoch();
                let found = self.session.inbound_qos2_release(pkid);
                // The id is forgotten durably before PUBCOMP frees it for reuse: otherwise a
                // restart would take the client's next message with this id for a
                // duplicate, acknowledge it, and drop it. Not committed: no PUBCOMP, the
                // connection ends, and the client sends PUBREL again when it is back. That
                // retry finds the id gone from memory but maybe still on disk, so the
                // release is committed whether or not the session held the id.
                if self.session.journal().is_some() && !self.commit(epoch).await {
                    return Some(unstored("the message store cannot record the release now"));
                }
                self.send(&wire::pubcomp(self.p.protocol, pkid, found))
                    .await
            }
            Inbound::PubComp(pkid) => {
                self.session.pubcomp(pkid);
                Ok(())
            }
            Inbound::Subscribe {
                pkid,
                filters,
                subscription_id,
            } => self.on_subscribe(pkid, filters, subscription_id).await,
            Inbound::Unsubscribe { pkid, filters } => self.on_unsubscribe(pkid, filters).await,
            Inbound::PingReq => self.send(&wire::pingresp(self.p.protocol)).await,
            Inbound::Disconnect {
                with_will,
                session_expiry,
            } => {
                if let Some(secs) = session_expiry {
                    if self.p.expiry_was_zero && secs != 0 {
                        return Some(protocol_error(
                            v5::DisconnectReasonCode::ProtocolError,
                            "DISCONNECT may not set a session expiry when CONNECT had 0",
                        ));
                    }
                    let capped =
                        crate::broker::expiry::on_disconnect(secs, self.p.max_session_expiry);
                    self.session.set_expiry(capped);
                }
                return Some(End::Disconnect { with_will });
            }
            Inbound::Unexpected(what) => Err(protocol_error(
                v5::DisconnectReasonCode::ProtocolError,
                &format!("a client may not send {what}"),
            )),
        };
        r.err()
    }

    /// Moves sendable deliveries from the session queue into the out buffer while it holds
    /// less than `OUT_HIGH`. Returns true when deliveries wait for the buffer to drain.
    async fn pump(&mut self) -> Result<bool, End> {
        loop {
            if self.out.len() >= OUT_HIGH {
                return Ok(self.session.has_queued());
            }
            self.refill_retained();
            let epoch = self.epoch();
            let batch = self
                .session
                .next_batch(self.conn_id, self.p.window, PUMP_BATCH);
            if batch.is_empty() {
                return Ok(false);
            }
            // A QoS 2 packet id is committed before the PUBLISH leaves: after a restart the
            // message is resent with the same id and DUP, which the client deduplicates.
            let qos2_stored = batch.iter().any(|o| {
                matches!(o, Outgoing::Publish { delivery, .. }
                    if delivery.qos == QoS::ExactlyOnce && delivery.store_id.is_some())
            });
            // Not committed: nothing is sent and the connection ends; the deliveries stay in
            // flight in the session and are sent (with DUP) when the client is back.
            if qos2_stored && !self.commit(epoch).await {
                return Err(unstored("the message store cannot record a packet id now"));
            }
            let mut sent = 0u64;
            for o in batch {
                sent += u64::from(self.encode_outgoing(o)?);
            }
            self.broker.metrics.messages_sent.inc_by(sent);
        }
    }

    /// Encodes an outgoing item into the out buffer; false when it is not sent (expired, or
    /// too large for the client), in which case its exchange is abandoned.
    fn encode_outgoing(&mut self, o: Outgoing) -> Result<bool, End> {
        let (pkid, d, dup) = match o {
            Outgoing::PubRel { pkid } => {
                let rel = wire::pubrel(self.p.protocol, pkid);
                codec::encode_within(&rel, self.p.client_max_packet, &mut self.out)
                    .map_err(|e| End::Write(WriteError::Encode(e)))?;
                return Ok(true);
            }
            Outgoing::Publish {
                pkid,
                delivery,
                dup,
            } => (pkid, delivery, dup),
        };
        // The clock is read only for a message that can expire (most cannot): one
        // clock_gettime per delivery showed in fan-in profiles.
        let now = d.msg.expires_at.map(|_| Message::now());
        if now.is_some_and(|now| d.msg.expired(now)) {
            self.abandon(pkid, "expired");
            return Ok(false);
        }
        // Borrowed from the message unless the v1/devices/me alias rewrites it.
        let topic = self
            .session
            .delivers_aliased(&d.msg.topic)
            .then(|| acl::alias_outbound(d.msg.topic.as_str(), self.device.as_str()))
            .flatten()
            .map_or(Cow::Borrowed(d.msg.topic.as_str()), Cow::Owned);
        // Nothing but topic and payload on the wire (always for 3.1.1; for 5 without
        // forwarded properties, expiry, subscription ids or topic aliases): written straight
        // into the out buffer, without a packet holding a copy of the topic per delivery.
        let bare = self.p.protocol == Protocol::V311
            || (now.is_none()
                && d.sub_ids.is_empty()
                && self.p.client_topic_alias_max == 0
                && d.msg.props.is_empty());
        if bare {
            let p = codec::BarePublish {
                topic: &topic,
                payload: &d.msg.payload,
                qos: d.qos,
                retain: d.retain,
                dup,
                pkid,
            };
            return match codec::encode_bare_publish(
                self.p.protocol,
                &p,
                self.p.client_max_packet,
                &mut self.out,
            ) {
                Ok(_) => Ok(true),
                Err(CodecError::Unencodable(codec::Unencodable::ExceedsPeerMaximum { .. })) => {
                    // MQTT 5 §3.1.2.11.4: discard what exceeds the client's maximum.
                    self.abandon(pkid, "too_large_for_client");
                    Ok(false)
                }
                Err(e) => Err(End::Write(WriteError::Encode(e))),
            };
        }
        let choice = self.out_aliases.choose(&topic);
        let packet = wire::publish(
            self.p.protocol,
            &wire::OutPublish {
                topic: &topic,
                topic_ref: choice.topic_ref(),
                payload: d.msg.payload.clone(),
                qos: d.qos,
                retain: d.retain,
                dup,
                pkid,
                props: &d.msg.props,
                message_expiry: now.and_then(|now| d.msg.remaining_expiry(now)),
                sub_ids: &d.sub_ids,
            },
        );
        if self
            .p
            .client_max_packet
            .is_some_and(|max| codec::encoded_len(&packet) > max)
        {
            // MQTT 5 §3.1.2.11.4: discard what exceeds the client's maximum.
            self.abandon(pkid, "too_large_for_client");
            return Ok(false);
        }
        self.out_aliases.confirm(choice, &topic);
        codec::encode(&packet, &mut self.out).map_err(|e| End::Write(WriteError::Encode(e)))?;
        Ok(true)
    }

    fn abandon(&self, pkid: u16, reason: &'static str) {
        if pkid != 0 {
            self.session.abandon(pkid);
        }
        self.broker.metrics.dropped(reason, 1);
    }

    /// A reason string for an acknowledgement, if the client asked for problem information.
    fn reason<'t>(&self, text: Option<&'t str>) -> Option<&'t str> {
        text.filter(|_| self.p.problem_info)
    }

    /// Queues a packet for the socket (written by the loop's write branch), within the
    /// client's Maximum Packet Size (a reason string it has no room for is left out).
    async fn send(&mut self, packet: &Packet) -> Result<(), End> {
        codec::encode_within(packet, self.p.client_max_packet, &mut self.out)
            .map_err(|e| End::Write(WriteError::Encode(e)))?;
        Ok(())
    }
}

/// A protocol violation that ends the connection.
fn protocol_error(code: v5::DisconnectReasonCode, text: &str) -> End {
    End::Protocol {
        code,
        text: text.to_owned(),
    }
}

/// contract §7: an acknowledgement (PUBREL, PUBCOMP) or a QoS 2 PUBLISH whose state the store
/// could not commit is not sent; the connection ends with MQTT 5 DISCONNECT 0x97 (3.1.1:
/// closed), and the client repeats the step when it is back.
fn unstored(text: &str) -> End {
    protocol_error(v5::DisconnectReasonCode::QuotaExceeded, text)
}

/// An MQTT 5 DISCONNECT with a reason string.
pub fn disconnect_v5(code: v5::DisconnectReasonCode, reason: &str) -> Packet {
    Packet::V5(v5::Packet::Disconnect(v5::Disconnect {
        reason_code: code,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(reason.to_owned()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    }))
}

/// The DISCONNECT reason for a codec error's numeric code.
fn disconnect_code(code: u8) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match code {
        0x81 => D::MalformedPacket,
        0x82 => D::ProtocolError,
        0x95 => D::PacketTooLarge,
        0x83 => D::ImplementationSpecificError,
        _ => D::UnspecifiedError,
    }
}
