//! certmq: an MQTT-over-TLS broker with mutual X.509 device authentication.
//!
//! # Architecture
//!
//! ```text
//! accept (server)            one task per connection, bounded by max_connections
//!   -> TLS handshake         tls::DeviceVerifier: pinned fingerprint | webpki path to an
//!                            anchor (tls::policy); a refusal is a TLS alert + one log line
//!   -> CONNECT               mqtt::codec reads it under connect_timeout
//!   -> admission             auth::decide: steps 2-7 again against the *current* config
//!                            (resumed sessions too), identity (CN -> DeviceName), registry
//!   -> CONNACK               broker::conn::connect maps the decision to return/reason codes
//!   -> session               broker::conn: one task reads, handles (keep alive, QoS
//!                            flows, SUBSCRIBE...) and writes, from one select!
//!
//! PUBLISH -> ACL (acl) -> Broker::publish -> router (subscription trie) -> each target
//! session's bounded queue (broker::session; when a connected subscriber's queue is full the
//! publisher's connection stops reading until it has room, or the subscriber stalls)
//! -> that session's task wakes, takes what its in-flight window allows, writes.
//! QoS 1/2 for persistent sessions and retained messages -> storage (SQLite, one writer
//! thread, group commit); the PUBACK/PUBREC waits for the commit (acknowledged = durable).
//! SIGHUP / registry changes -> server::live re-checks every live session.
//! ```
//!
//! - [`config`]: TOML -> typed, validated [`config::Config`] (PEMs, regexes, CRLs, ACLs).
//! - [`cert`]: fingerprints and validity of one certificate.
//! - [`tls`]: the rustls server config (built once per config) and the verifier.
//! - [`identity`]: pure CN -> device name with hostile-case tests.
//! - [`registry`]: the device registry (contract §3 step 7) in SQLite.
//! - [`auth`]: the whole decision, shared by CONNECT and `certmq explain`.
//! - [`acl`], [`mqtt::topic`]: authorization profiles and topic matching.
//! - [`mqtt::codec`]: MQTT 3.1.1 / 5.0 framing behind our own API.
//! - [`broker`]: CONNECT/CONNACK, sessions, routing, retained messages, wills.
//! - [`storage`]: the durable message store (group commit, recovery after `kill -9`).
//! - [`server`]: the accept loop, connection limit, reload and revocation, shutdown.
//! - [`pki`]: certificate generation for `certmq demo-pki` and test fixtures.
//! - [`sqlite`]: the integrity check both SQLite files share.
//! - [`logline`]: refusal log lines rate-limited per peer address.
//! - [`backup`]: `certmq backup`, a consistent copy of both databases of a running broker.
//! - [`metrics`]: counters for `/metrics`, served with `/healthz` by `server::admin`.
//!
//! Shared state is immutable and swapped whole: a [`server::Shared`] holds the current
//! `Arc<Config>` and `Arc<rustls::ServerConfig>`; a connection takes a snapshot.

pub mod acl;
pub mod auth;
pub mod backup;
pub mod broker;
pub mod cert;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod identity;
pub mod logline;
pub mod metrics;
pub mod mqtt;
pub mod pki;
pub mod registry;
pub mod server;
pub mod sqlite;
pub mod storage;
pub mod tls;
