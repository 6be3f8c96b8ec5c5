//! TLS for the device listener: the rustls server config, built once per loaded config and
//! swapped whole on reload (never rebuilt per connection), and the device verifier.
//!
//! One crypto provider (ring) is used everywhere — rustls, webpki, fingerprints — and
//! every config is built with `builder_with_provider`, so nothing depends on a
//! process-wide default provider (NOTES.md: two providers compiled in make rustls panic).

pub mod path;
pub mod policy;
mod rules;
pub mod verifier;

use std::sync::Arc;

use rustls::ServerConfig;

use crate::config::Config;
use crate::metrics::Metrics;

pub use verifier::{DeviceVerifier, Handshake, KnownDevices, Verdict, HANDSHAKE};

/// Why a TLS server config could not be built (after the config validated, this means a
/// key or certificate rustls refuses).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot build the TLS server configuration")]
    Build(#[source] rustls::Error),
}

pub use crate::cert::provider;

/// Builds the server config for a loaded [`Config`]: TLS 1.3 and 1.2, a client
/// certificate required and checked by [`DeviceVerifier`].
///
/// TLS session resumption stays on: it saves devices a full handshake, and is safe because
/// the admission at CONNECT re-runs every check against the current config and registry
/// (contract §3 step 8; rustls does not call the verifier on resumption). Sessions are
/// stateless tickets (rustls' ring `Ticketer`: AEAD under a random key of this config,
/// rotated every 6 hours, 12-hour tickets; no 0-RTT) rather than rustls' default
/// 256-entry in-memory cache, which in a reconnect storm of thousands of devices evicted
/// every session before its device came back (docs/benchmarks.md). A reload builds a new
/// config, with a new key: earlier tickets no longer resume.
///
/// `known`, when given, names the device a refused certificate belongs to in the log.
pub fn server_config(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    known: Option<Arc<dyn KnownDevices>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = config.server.cert_chain.clone();
    let key = config.server.private_key.clone_key();
    let verifier = Arc::new(DeviceVerifier::new(config, metrics, known));
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Build)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Build)?;
    tls.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Build)?;
    Ok(Arc::new(tls))
}
