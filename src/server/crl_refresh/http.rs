//! One bounded HTTP/1.1 GET, for CRL distribution points: plain HTTP (RFC 5280
//! distribution points are), a deadline over the whole exchange, a size limit on the body,
//! and at most [`MAX_REDIRECTS`] redirects, each to another `http://` URL.
//!
//! hyper's client connection does the HTTP (status line, headers, Content-Length and
//! chunked bodies): it is already the admin endpoint's server, and parsing HTTP by hand is
//! where such clients usually go wrong. No connection pool, no TLS, no proxy: one
//! connection per fetch, closed after it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{ACCEPT, CONTENT_LENGTH, HOST, LOCATION, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::CrlUrl;

/// The longest a fetch may take, redirects included.
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// The largest CRL accepted (a CRL of a device fleet's CA is usually kilobytes; those of
/// public CAs that revoke millions of certificates reach a few megabytes).
pub const MAX_BYTES: usize = 16 * 1024 * 1024;
/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 3;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    #[error("no answer within {} s", TIMEOUT.as_secs())]
    Timeout,
    #[error("HTTP status {0}")]
    Status(StatusCode),
    #[error("the CRL is larger than {MAX_BYTES} bytes")]
    TooLarge,
    #[error("reading the body failed: {0}")]
    Body(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    Redirects,
    #[error("redirect to {location:?}: {reason}")]
    Redirect {
        location: String,
        reason: &'static str,
    },
    #[error("cannot build the request")]
    Request(#[source] hyper::http::Error),
}

/// GETs `url`, following redirects, within [`TIMEOUT`].
pub async fn get(url: &CrlUrl) -> Result<Vec<u8>, FetchError> {
    tokio::time::timeout(TIMEOUT, follow(url.clone()))
        .await
        .map_err(|_| FetchError::Timeout)?
}

async fn follow(mut url: CrlUrl) -> Result<Vec<u8>, FetchError> {
    for _ in 0..=MAX_REDIRECTS {
        match once(&url).await? {
            Answer::Body(b) => return Ok(b),
            Answer::Redirect(location) => url = redirect_target(&url, &location)?,
        }
    }
    Err(FetchError::Redirects)
}

enum Answer {
    Body(Vec<u8>),
    Redirect(String),
}

/// One request on one connection.
async fn once(url: &CrlUrl) -> Result<Answer, FetchError> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|source| FetchError::Connect {
            host: url.host.clone(),
            port: url.port,
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(FetchError::Http)?;
    // The connection is driven by its own task, aborted when this fetch ends however it
    // ends (the deadline drops this future).
    let driver = AbortOnDrop(tokio::spawn(conn));
    let request = Request::get(url.path.as_str())
        .header(HOST, url.host_header())
        .header(USER_AGENT, concat!("certmq/", env!("CARGO_PKG_VERSION")))
        .header(ACCEPT, "application/pkix-crl, application/x-pkcs7-crl, */*")
        .body(Empty::<Bytes>::new())
        .map_err(FetchError::Request)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(FetchError::Http)?;
    let status = response.status();
    if status.is_redirection() {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return match location {
            Some(l) => Ok(Answer::Redirect(l)),
            None => Err(FetchError::Status(status)),
        };
    }
    if status != StatusCode::OK {
        return Err(FetchError::Status(status));
    }
    let announced = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BYTES as u64) {
        return Err(FetchError::TooLarge);
    }
    let body = Limited::new(response.into_body(), MAX_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge
            } else {
                FetchError::Body(e.to_string())
            }
        })?;
    drop(driver);
    Ok(Answer::Body(body.to_bytes().to_vec()))
}

/// Where a redirect points: an absolute `http://` URL, or a path on the same server.
fn redirect_target(from: &CrlUrl, location: &str) -> Result<CrlUrl, FetchError> {
    let absolute = if location.starts_with('/') && !location.starts_with("//") {
        format!("http://{}{location}", from.host_header())
    } else {
        location.to_owned()
    };
    CrlUrl::parse(&absolute).map_err(|reason| FetchError::Redirect {
        location: location.to_owned(),
        reason,
    })
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
