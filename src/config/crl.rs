//! The CRL of an anchor (docs/crl.md), from any of three places: a file (`crl`), its
//! distribution point (`crl_url`, fetched by the broker), or the last good copy of the
//! latter that the broker keeps in `data_dir/crl/`. One check for all three: parsed,
//! issued by this anchor (name), signed by its key, and the anchor may sign CRLs.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::FromDer;

use crate::cert::CertInfo;

/// Default seconds between two fetches of a `crl_url`.
pub const DEFAULT_REFRESH: u64 = 3600;
/// Bounds of `crl_refresh`: at least once a second (a CRL server on the same network,
/// tests), at most once a week (CRLs are rarely valid longer).
pub const MIN_REFRESH: u64 = 1;
pub const MAX_REFRESH: u64 = 7 * 24 * 3600;

/// The folder of `data_dir` holding the last good copy of each fetched CRL.
pub const STORED_DIR: &str = "crl";

/// A CRL attached to an anchor, checked against it, so that a wrong file is a config
/// error (or a refused fetch), never a lock-out of every device at handshake time.
#[derive(Debug)]
pub struct Crl {
    /// Where it was read from: the `crl` file, or the stored copy of a fetched CRL.
    pub path: PathBuf,
    /// The URL it was fetched from, when it was.
    pub url: Option<String>,
    pub list: webpki::CertRevocationList<'static>,
    /// thisUpdate, seconds since the epoch: a fetched CRL must be newer than the one in
    /// force (an older one, replayed over plain HTTP, could unrevoke a certificate).
    pub this_update: i64,
    /// nextUpdate, seconds since the epoch, when present.
    pub next_update: Option<i64>,
    pub revoked_count: usize,
    /// The DER, to tell an unchanged CRL from a new one.
    pub der: Vec<u8>,
}

/// Why bytes are not a usable CRL for an anchor.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("is not valid PEM")]
    Pem(#[source] rustls_pki_types::pem::Error),
    #[error("cannot be parsed as a CRL")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("was not issued by this anchor (CRL issuer {issuer})")]
    Issuer { issuer: String },
    #[error("the anchor certificate cannot be parsed")]
    Anchor(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("CRL signature does not verify with the anchor's key")]
    Signature(#[source] x509_parser::error::X509Error),
    #[error("the anchor's keyUsage lacks cRLSign, so its CRL cannot be used")]
    NoCrlSign,
    #[error("is not a valid CRL")]
    Webpki(#[source] webpki::Error),
}

/// Parses a CRL (PEM or DER) and checks that the anchor issued and signed it.
pub fn verify(
    bytes: &[u8],
    anchor_der: &CertificateDer<'_>,
    anchor: &CertInfo,
) -> Result<Verified, CrlError> {
    let der = if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::from_pem_slice(bytes)
            .map_err(CrlError::Pem)?
            .as_ref()
            .to_vec()
    } else {
        bytes.to_vec()
    };
    let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        .map_err(CrlError::Parse)?;
    if parsed.issuer().as_raw() != anchor.subject_der.as_slice() {
        return Err(CrlError::Issuer {
            issuer: parsed.issuer().to_string(),
        });
    }
    let (_, anchor_cert) =
        x509_parser::parse_x509_certificate(anchor_der).map_err(CrlError::Anchor)?;
    parsed
        .verify_signature(anchor_cert.public_key())
        .map_err(CrlError::Signature)?;
    if matches!(anchor.key_usage, Some((_, false))) {
        return Err(CrlError::NoCrlSign);
    }
    let this_update = parsed.last_update().timestamp();
    let next_update = parsed.next_update().map(|t| t.timestamp());
    let revoked_count = parsed.iter_revoked_certificates().count();
    let list = webpki::OwnedCertRevocationList::from_der(&der)
        .map(webpki::CertRevocationList::Owned)
        .map_err(CrlError::Webpki)?;
    Ok(Verified {
        list,
        this_update,
        next_update,
        revoked_count,
        der,
    })
}

/// A CRL that [`verify`] accepted, not yet tied to where it came from.
#[derive(Debug)]
pub struct Verified {
    pub list: webpki::CertRevocationList<'static>,
    pub this_update: i64,
    pub next_update: Option<i64>,
    pub revoked_count: usize,
    pub der: Vec<u8>,
}

impl Verified {
    /// The CRL read from `path` (fetched from `url`, when it was).
    pub fn at(self, path: PathBuf, url: Option<String>) -> Crl {
        Crl {
            path,
            url,
            list: self.list,
            this_update: self.this_update,
            next_update: self.next_update,
            revoked_count: self.revoked_count,
            der: self.der,
        }
    }

    /// Whether nextUpdate has passed at `now` (seconds since the epoch).
    pub fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|n| n < now)
    }
}

/// Where the broker keeps the last good copy of `anchor`'s fetched CRL.
pub fn stored_path(data_dir: &Path, anchor: &str) -> PathBuf {
    data_dir.join(STORED_DIR).join(format!("{anchor}.crl"))
}

/// A CRL distribution point: an `http://` URL (RFC 5280 distribution points are plain
/// HTTP by convention; the CRL's signature, not the transport, makes it trustworthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlUrl {
    /// As written in the config.
    pub url: String,
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl CrlUrl {
    /// Parses an absolute `http://host[:port]/path` URL; the error says what is wrong.
    pub fn parse(url: &str) -> Result<CrlUrl, &'static str> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| "not a URL such as http://ca.example.com/fleet.crl")?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err("only http:// is supported: CRL distribution points are plain HTTP by convention (RFC 5280), and the CRL's signature protects it")
            }
            _ => return Err("not an http:// URL"),
        }
        let authority = uri.authority().ok_or("the URL names no host")?;
        if authority.as_str().contains('@') {
            return Err("user names and passwords in the URL are not supported");
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err("the URL names no host");
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Ok(CrlUrl {
            url: url.to_owned(),
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
            path: if path.is_empty() { "/" } else { path }.to_owned(),
        })
    }

    /// The Host header value.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl std::fmt::Display for CrlUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = CrlUrl::parse("http://ca.example.com/fleet.crl").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("ca.example.com", 80, "/fleet.crl")
        );
        assert_eq!(u.host_header(), "ca.example.com");
        let u = CrlUrl::parse("http://[::1]:8080/a?b=c").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 8080, "/a?b=c")
        );
        assert_eq!(u.host_header(), "[::1]:8080");
        assert_eq!(CrlUrl::parse("http://h").unwrap().path, "/");
        assert!(CrlUrl::parse("https://h/x")
            .unwrap_err()
            .contains("only http://"));
        assert!(CrlUrl::parse("ftp://h/x").is_err());
        assert!(CrlUrl::parse("/x").is_err());
        assert!(CrlUrl::parse("http://u:p@h/x").is_err());
    }
}
