//! Client credentials: one identity for every connection (`--cert/--key`), or one device
//! certificate per connection issued here under a CA given as PEM (`--issuer-cert/
//! --issuer-key`), so that a connect benchmark measures what a fleet of distinct devices
//! costs the broker (chain validation, registry lookup or provisioning), not one device
//! reconnecting.
//!
//! Every `ClientConfig` has TLS resumption disabled: the connect workload measures full
//! handshakes, and certmq re-authorises resumed sessions anyway (contract §3 step 8). Issued
//! certificates can be kept in a folder (`--devices-dir`) so that a second run presents the
//! same devices again: that separates first contact (certmq provisions the device) from a
//! known device reconnecting.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use time::{Duration, OffsetDateTime};

/// Why credentials could not be built. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("could not read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no usable PEM in {}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the CA certificate {} is not accepted as a trust root", path.display())]
    Root {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("rustls refused the client certificate and key from {}", path.display())]
    ClientAuth {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("rustls refused the protocol versions")]
    Versions(#[source] rustls::Error),
    #[error("could not use the issuing CA {}", path.display())]
    Issuer {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("could not issue the certificate for {cn}")]
    Issue {
        cn: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("could not parse the certificate in {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    #[error("the certificate in {} has no common name to name its device", path.display())]
    NoCommonName { path: PathBuf },
}

/// Where the client identities come from (parsed from the command line).
#[derive(Debug, Clone)]
pub enum Source {
    /// One chain (leaf first) and key for every connection.
    Single { cert: PathBuf, key: PathBuf },
    /// A CA certificate and key that issue `bench-<i>.devices.example.com` leaves.
    Issuer {
        cert: PathBuf,
        key: PathBuf,
        /// Optional cache of issued leaves, reused across runs.
        devices_dir: Option<PathBuf>,
        /// Connection i presents device `bench-<offset + i>`.
        offset: usize,
    },
}

/// One TLS identity and the device name it stands for (what `{device}` in a topic becomes).
#[derive(Clone)]
pub struct Identity {
    pub tls: Arc<ClientConfig>,
    pub device: String,
}

/// The identities of a run: connection `i` uses `identities[i % len]`.
#[derive(Clone)]
pub struct Credentials {
    identities: Vec<Identity>,
}

impl Credentials {
    /// Builds `count` identities (one when the source is a single certificate). Issuing
    /// is CPU work: call it before any timed section, off the async workers. `resume`:
    /// each identity's client config keeps the TLS sessions the server gives it.
    pub fn load(
        source: &Source,
        ca: &Path,
        count: usize,
        resume: bool,
    ) -> Result<Credentials, CredsError> {
        let roots = roots(ca)?;
        let identities = match source {
            Source::Single { cert, key } => {
                let chain = certs(cert)?;
                let device = device_name(cert, &chain[0])?;
                let key = private_key(key)?;
                vec![Identity {
                    tls: client_config(&roots, chain, key, cert, resume)?,
                    device,
                }]
            }
            Source::Issuer {
                cert,
                key,
                devices_dir,
                offset,
            } => {
                let issuer = BenchIssuer::load(cert, key)?;
                let mut out = Vec::with_capacity(count);
                for i in (0..count.max(1)).map(|i| i + offset) {
                    let (chain, key, path) = issuer.device(i, devices_dir.as_deref())?;
                    out.push(Identity {
                        tls: client_config(&roots, chain, key, &path, resume)?,
                        device: format!("bench-{i}"),
                    });
                }
                out
            }
        };
        Ok(Credentials { identities })
    }

    /// The identity for connection `i`.
    pub fn get(&self, i: usize) -> &Identity {
        &self.identities[i % self.identities.len()]
    }
}

/// A loaded issuing CA: rcgen's issuer (subject and key identifier read from the CA
/// certificate, so leaves chain to it) and the CA's PEM, appended to each leaf's chain.
struct BenchIssuer {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_path: PathBuf,
}

impl BenchIssuer {
    fn load(cert: &Path, key: &Path) -> Result<BenchIssuer, CredsError> {
        let ca_pem = read_string(cert)?;
        let key_pem = read_string(key)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| CredsError::Issuer {
            path: key.to_owned(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|source| CredsError::Issuer {
                path: cert.to_owned(),
                source,
            })?;
        Ok(BenchIssuer {
            issuer,
            ca_pem,
            ca_path: cert.to_owned(),
        })
    }

    /// Device `i`: loaded from `dir` when both files are there, otherwise issued (and
    /// written to `dir` when given). Returns the chain (leaf, then the CA) and key.
    fn device(
        &self,
        i: usize,
        dir: Option<&Path>,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            PathBuf,
        ),
        CredsError,
    > {
        let cn = format!("bench-{i}.devices.example.com");
        let (chain_pem, key_pem, path) = match dir {
            Some(dir) => {
                let chain_path = dir.join(format!("bench-{i}.pem"));
                let key_path = dir.join(format!("bench-{i}.key"));
                if chain_path.exists() && key_path.exists() {
                    (
                        read_string(&chain_path)?,
                        read_string(&key_path)?,
                        chain_path,
                    )
                } else {
                    let (chain, key) = self.issue(&cn)?;
                    write(dir, &chain_path, &chain)?;
                    write(dir, &key_path, &key)?;
                    (chain, key, chain_path)
                }
            }
            None => {
                let (chain, key) = self.issue(&cn)?;
                (chain, key, self.ca_path.clone())
            }
        };
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CredsError::Pem {
                path: path.clone(),
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| {
            CredsError::Pem {
                path: path.clone(),
                source,
            }
        })?;
        Ok((chain, key, path))
    }

    /// A device leaf as real fleets have them: ECDSA P-256, CA:false, digitalSignature,
    /// EKU clientAuth, valid from yesterday for a year. Returns (chain PEM, key PEM).
    fn issue(&self, cn: &str) -> Result<(String, String), CredsError> {
        let err = |source| CredsError::Issue {
            cn: cn.to_owned(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok((
            format!("{}{}", cert.pem(), self.ca_pem),
            key.serialize_pem(),
        ))
    }
}

fn read_string(path: &Path) -> Result<String, CredsError> {
    std::fs::read_to_string(path).map_err(|source| CredsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write(dir: &Path, path: &Path, contents: &str) -> Result<(), CredsError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(path, contents))
        .map_err(|source| CredsError::Write {
            path: path.to_owned(),
            source,
        })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredsError> {
    let pem = read_string(path)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CredsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CredsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CredsError> {
    let pem = read_string(path)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| CredsError::Pem {
        path: path.to_owned(),
        source,
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, CredsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).map_err(|source| CredsError::Root {
            path: ca.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn client_config(
    roots: &RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    path: &Path,
    resume: bool,
) -> Result<Arc<ClientConfig>, CredsError> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(CredsError::Versions)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(|source| CredsError::ClientAuth {
                path: path.to_owned(),
                source,
            })?;
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// The device a single certificate stands for: the first DNS label of its CN
/// (`dev-001.devices.example.com` -> `dev-001`), which is what the demo anchor's
/// `cn_regex` captures; a CN without a dot is used whole.
fn device_name(path: &Path, leaf: &CertificateDer<'_>) -> Result<String, CredsError> {
    let no_cn = || CredsError::NoCommonName {
        path: path.to_owned(),
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|source| CredsError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(no_cn)?;
    Ok(cn.split('.').next().unwrap_or(cn).to_owned())
}
