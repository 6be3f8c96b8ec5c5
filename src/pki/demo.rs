//! `certmq demo-pki`: a complete example PKI and a config that uses it (contract §1).
//!
//! Why everything is generated in memory before the first byte is written: the command
//! must never replace an existing key, nor start writing a PKI it cannot finish because a
//! file is in the way. So it first checks that no target file exists, then builds every
//! certificate, then creates each file with `create_new` (which also refuses a file that
//! appeared in the meantime). Only an I/O failure mid-way (a full disk) leaves a partial
//! folder, and the error names the file.

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use super::{self_signed, Ca, LeafSpec, PkiError, Validity};

/// Subject of the demo root CA.
const ROOT_CN: &str = "certmq Example Root CA";
/// Subject of the demo intermediate CA, the `fleet` anchor of the demo config.
const INTERMEDIATE_CN: &str = "certmq Example Devices CA";
/// The demo devices issued under the intermediate: chain file, key file, CN.
const DEVICES: [(&str, &str, &str); 3] = [
    ("dev-001.pem", "dev-001.key", "dev-001.devices.example.com"),
    ("dev-002.pem", "dev-002.key", "dev-002.devices.example.com"),
    ("dev-003.pem", "dev-003.key", "dev-003.devices.example.com"),
];

/// Every file `write_demo` writes, in writing order. Listed once so that the overwrite
/// check and the writer cannot disagree.
const FILE_NAMES: [&str; 18] = [
    "root.pem",
    "root.key",
    "intermediate.pem",
    "intermediate.key",
    "intermediate.crl",
    "server.pem",
    "server.key",
    "dev-001.pem",
    "dev-001.key",
    "dev-002.pem",
    "dev-002.key",
    "dev-003.pem",
    "dev-003.key",
    "meter-7.pem",
    "meter-7.key",
    "backend.pem",
    "backend.key",
    "certmq.toml",
];

/// The demo config. Paths are relative to the file's own folder (contract §1), so the folder
/// can be moved or copied as a whole.
const CONFIG: &str = r##"# certmq example configuration, written by `certmq demo-pki`.
# Relative paths resolve against this file's folder. Start the broker with:
#   certmq serve --config certmq.toml
#
# [server]   the MQTT-over-TLS listener: its certificate chain and key (issued by the
#            example root CA for localhost / 127.0.0.1) and where the database lives.
# [[anchor]] certificate-chain strategy: every client certificate issued under the
#            example intermediate CA is trusted; the device name is capture group 1 of
#            cn_regex applied to the certificate's CN (dev-001.devices.example.com ->
#            dev-001); unknown devices are created on first connection; certificates
#            listed in the CRL are refused.
# [[device]] pinned strategy: exactly this certificate (by SHA-256 fingerprint) is the
#            named device. meter-7 is self-signed; backend is issued by the root CA,
#            which no anchor trusts, so only its pin lets it in.
# [acl.*]    what a device may publish and subscribe to; {device} is its name. The
#            "device" profile is built in (devices/{device}/# and v1/devices/{device}/#);
#            "backend" may use every topic.

[server]
bind = "0.0.0.0:8883"
cert_chain = "server.pem"
private_key = "server.key"
data_dir = "data"

[[anchor]]
name = "fleet"
certificate = "intermediate.pem"
cn_regex = '^(.+)\.devices\.example\.com$'
create_devices = true
acl = "device"
crl = "intermediate.crl"

[[device]]
name = "meter-7"
certificate = "meter-7.pem"
acl = "device"

[[device]]
name = "backend"
certificate = "backend.pem"
acl = "backend"

[acl.backend]
publish = ["#"]
subscribe = ["#"]
"##;

/// What `write_demo` wrote, so that the command can list it and tests can open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoFiles {
    /// The output folder.
    pub dir: PathBuf,
    /// The config that uses the other files.
    pub config: PathBuf,
    /// Every file written, config included, in writing order.
    pub files: Vec<PathBuf>,
}

/// One file to write. `secret` files are private keys: mode 0600 on unix.
struct Output {
    name: &'static str,
    contents: String,
    secret: bool,
}

/// Writes the demo PKI to `out` (created if missing), every certificate and the CRL valid
/// from yesterday for `validity_days` days. Fails, before writing anything, when any of
/// the files already exists.
pub fn write_demo(out: &Path, validity_days: i64) -> Result<DemoFiles, PkiError> {
    if validity_days < 1 {
        return Err(PkiError::ValidityTooShort {
            days: validity_days,
        });
    }
    refuse_existing(out)?;
    let outputs = generate(Validity::days(-1, validity_days))?;
    fs::create_dir_all(out).map_err(|source| PkiError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let mut files = Vec::with_capacity(outputs.len());
    for output in &outputs {
        let path = out.join(output.name);
        write_new(&path, &output.contents, output.secret)?;
        files.push(path);
    }
    Ok(DemoFiles {
        dir: out.to_path_buf(),
        config: out.join("certmq.toml"),
        files,
    })
}

fn refuse_existing(out: &Path) -> Result<(), PkiError> {
    for name in FILE_NAMES {
        let path = out.join(name);
        // symlink_metadata: a dangling symlink is an existing entry too.
        match fs::symlink_metadata(&path) {
            Ok(_) => return Err(PkiError::AlreadyExists { path }),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => return Err(PkiError::Inspect { path, source }),
        }
    }
    Ok(())
}

fn generate(validity: Validity) -> Result<Vec<Output>, PkiError> {
    let root = Ca::root(ROOT_CN, validity)?;
    let intermediate = root.intermediate(INTERMEDIATE_CN, validity, Some(0))?;
    let crl = intermediate.crl(&[], validity)?;
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let server = root.issue(&LeafSpec {
        validity,
        ..LeafSpec::server(&["localhost"], &[localhost])
    })?;

    let mut outputs = vec![
        public("root.pem", root.cert_pem()),
        secret("root.key", root.key_pem()),
        public("intermediate.pem", intermediate.cert_pem()),
        secret("intermediate.key", intermediate.key_pem()),
        public("intermediate.crl", crl),
        public("server.pem", server.cert_pem),
        secret("server.key", server.key_pem),
    ];
    for (chain_file, key_file, cn) in DEVICES {
        let device = intermediate.issue(&LeafSpec {
            validity,
            ..LeafSpec::device(cn)
        })?;
        outputs.push(public(chain_file, device.chain_pem(&[&intermediate])));
        outputs.push(secret(key_file, device.key_pem));
    }
    let meter = self_signed(&LeafSpec {
        validity,
        ..LeafSpec::device("meter-7")
    })?;
    outputs.push(public("meter-7.pem", meter.cert_pem));
    outputs.push(secret("meter-7.key", meter.key_pem));
    let backend = root.issue(&LeafSpec {
        validity,
        ..LeafSpec::device("backend")
    })?;
    outputs.push(public("backend.pem", backend.cert_pem));
    outputs.push(secret("backend.key", backend.key_pem));
    outputs.push(public("certmq.toml", CONFIG.to_owned()));
    Ok(outputs)
}

fn public(name: &'static str, contents: String) -> Output {
    Output {
        name,
        contents,
        secret: false,
    }
}

fn secret(name: &'static str, contents: String) -> Output {
    Output {
        name,
        contents,
        secret: true,
    }
}

/// Creates `path` (never replacing an existing file) and writes `contents`. A secret file
/// is created with mode 0600, so there is no moment at which the key is readable by others.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let write_error = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(write_error)?;
    file.write_all(contents.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

#[cfg(test)]
mod tests;
