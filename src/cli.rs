//! What the `certmq` commands print (contract §1): `check`, `explain`, `devices`, `demo-pki`.
//! `main.rs` parses arguments and maps results to exit codes; the work and the wording
//! are here, in the library, so they are tested like everything else.

use std::io::Write;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::json;

use crate::auth::{self, Decision};
use crate::cert::rfc3339;
use crate::config::Config;
use crate::registry::{transfer, Access, Backend, Device, Imported, Mode, Registry, RegistryError};
use crate::tls::policy::{AnchorFailure, ChainRefusal, Rule};

/// Failures of the CLI commands, each one sentence naming the file or device.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read the certificate file {path}")]
    CertFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: std::path::PathBuf },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("no device named {0:?} in the registry")]
    UnknownDevice(String),
    #[error("no device named {name:?}: the registry {} does not exist yet (the broker creates it when it first starts)", path.display())]
    NoRegistry {
        name: String,
        path: std::path::PathBuf,
    },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("cannot write to standard output")]
    Output(#[from] std::io::Error),
    #[error("cannot write the export file {path}")]
    ExportFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the import file {path}")]
    ImportFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} cannot be imported")]
    Transfer {
        path: std::path::PathBuf,
        #[source]
        source: transfer::TransferError,
    },
}

/// `certmq devices export --out FILE`: every device of `registry` as JSON; returns how many.
pub fn export(registry: &dyn Backend, out: &Path) -> Result<usize, CliError> {
    let devices = registry.list()?;
    let text = transfer::export(&devices, crate::cert::now_secs());
    std::fs::write(out, text).map_err(|source| CliError::ExportFile {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(devices.len())
}

/// `certmq devices import FILE`: the devices of an export entered into `registry`.
pub fn import(registry: &dyn Backend, file: &Path) -> Result<Imported, CliError> {
    let text = std::fs::read_to_string(file).map_err(|source| CliError::ImportFile {
        path: file.to_path_buf(),
        source,
    })?;
    let devices = transfer::parse(&text).map_err(|source| CliError::Transfer {
        path: file.to_path_buf(),
        source,
    })?;
    Ok(registry.import(&devices)?)
}

/// What an import did, in words: a summary on `out`; each conflict on `err`, naming the
/// device and what the registry holds. False when there was a conflict.
pub fn import_report(
    file: &Path,
    registry: &dyn Backend,
    imported: &Imported,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<bool> {
    if !imported.conflicts.is_empty() {
        let what = if imported.added.is_empty() {
            "nothing was imported".to_owned()
        } else {
            format!("the {} others were imported", imported.added.len())
        };
        writeln!(
            err,
            "certmq: {} device(s) of {} conflict with {}; {what}:",
            imported.conflicts.len(),
            file.display(),
            registry.describe()
        )?;
        for (name, held) in &imported.conflicts {
            writeln!(err, "  device {name:?}: the registry holds it {held}")?;
        }
        return Ok(false);
    }
    writeln!(
        out,
        "imported {} devices into {} ({} already present)",
        imported.added.len(),
        registry.describe(),
        imported.present.len()
    )?;
    Ok(true)
}

/// What `serve` would meet after the config (for `check`, contract §1 "exactly as serve
/// would"): its listening addresses free, unless the broker of this data_dir runs (then
/// they are its own: `check` before `reload` must pass), and its data_dir writable. Changes
/// nothing: a probe file is created and removed, no database is opened.
pub fn serve_preflight(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let data_dir = &config.server.data_dir;
    if !crate::server::control::broker_running(data_dir) {
        let listeners = [
            ("server.bind", Some(config.server.bind)),
            ("server.admin_bind", config.server.admin_bind),
        ];
        for (field, addr) in listeners {
            let Some(addr) = addr else { continue };
            if let Err(e) = std::net::TcpListener::bind(addr) {
                problems.push(format!("{field}: cannot listen on {addr}: {e}"));
            }
        }
    }
    problems.extend(data_dir_problems(data_dir));
    problems
}

/// The files of `data_dir` that the broker writes (SQLite's `-wal` and `-shm` included).
const DATA_FILES: [&str; 6] = [
    "certmq.db",
    "certmq.db-wal",
    "certmq.db-shm",
    "messages.db",
    "messages.db-wal",
    "messages.db-shm",
];

/// Whether `serve` (as this user) can write `data_dir` and every file it holds; each
/// problem names the owner and mode (a database created by root, by a command run before
/// the first start, is the usual one). Changes nothing: a probe file is created and
/// removed, each existing file is opened for writing and closed.
pub fn data_dir_problems(data_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = writable(data_dir) {
        problems.push(format!(
            "server.data_dir: {} is not writable: {e}",
            data_dir.display()
        ));
    }
    for name in DATA_FILES {
        let file = data_dir.join(name);
        if let Err(e) = crate::sqlite::writable_file(&file) {
            problems.push(format!(
                "server.data_dir: {} is not writable ({}): {e}",
                file.display(),
                crate::sqlite::access_detail(&file)
            ));
        }
    }
    problems
}

/// Whether files can be created in `dir`, or (when it does not exist yet, as `serve`
/// creates it) in its nearest existing ancestor. The error names the owner and mode.
fn writable(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => break,
        }
    }
    let probe = at.join(format!(".certmq-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("{e} ({})", crate::sqlite::access_detail(at))),
    }
}

/// `certmq check`: the summary of a loaded config, warnings included.
pub fn check_summary(config: &Config, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "config {} is valid", config.path.display())?;
    let s = &config.server;
    writeln!(
        out,
        "listener: {} (TLS 1.3, 1.2; client certificate required)",
        s.bind
    )?;
    writeln!(
        out,
        "server certificate: {} (expires {})",
        s.cert_info.subject,
        rfc3339(s.cert_info.validity.not_after)
    )?;
    writeln!(out, "data_dir: {}", s.data_dir.display())?;
    if let Some(a) = s.admin_bind {
        writeln!(out, "admin: http://{a}/metrics")?;
    }
    writeln!(out, "anchors: {}", config.anchors.len())?;
    for a in &config.anchors {
        writeln!(out, "  {}: {}", a.name, a.info.subject)?;
        writeln!(out, "    expires {}", rfc3339(a.info.validity.not_after))?;
        writeln!(out, "    cn_regex {}", a.cn_regex.as_str())?;
        writeln!(
            out,
            "    create_devices {}, acl {}",
            a.create_devices, a.acl
        )?;
        if let Some(url) = &a.crl_url {
            writeln!(out, "    crl_url {url} (fetched every {} s)", a.crl_refresh)?;
        }
        match &a.crl {
            Some(crl) => writeln!(
                out,
                "    crl {} ({} revoked, this update {}{})",
                crl.path.display(),
                crl.revoked_count,
                rfc3339(crl.this_update),
                crl.next_update
                    .map(|n| format!(", next update {}", rfc3339(n)))
                    .unwrap_or_default()
            )?,
            None if a.crl_url.is_some() => writeln!(
                out,
                "    crl: none fetched yet; the anchor accepts no certificate until one is"
            )?,
            None => {}
        }
    }
    writeln!(out, "pinned devices: {}", config.devices.len())?;
    for d in &config.devices {
        writeln!(
            out,
            "  {}: {} (expires {}, acl {})",
            d.name,
            d.info.fingerprint,
            rfc3339(d.info.validity.not_after),
            d.acl
        )?;
    }
    writeln!(
        out,
        "acl profiles: {}",
        config.acl.keys().cloned().collect::<Vec<_>>().join(", ")
    )?;
    for w in &config.warnings {
        writeln!(out, "warning: {w}")?;
    }
    Ok(())
}

/// Opens the registry in `data_dir` read-only if it exists; else an empty in-memory one,
/// so that `explain` and `check` work before the first start and never create files.
pub fn registry_for_reading(config: &Config) -> Result<Registry, RegistryError> {
    match Registry::open_existing(&config.server.data_dir, Access::ReadOnly)? {
        Some(r) => Ok(r),
        None => Registry::in_memory(),
    }
}

/// Reads a PEM file of certificates (leaf first).
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CliError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|source| CliError::CertFile {
            path: path.to_path_buf(),
            source,
        })?
        .collect();
    let certs = certs.map_err(|source| CliError::CertFile {
        path: path.to_path_buf(),
        source,
    })?;
    if certs.is_empty() {
        return Err(CliError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// `certmq explain`: the decision for a chain, without changing anything.
pub fn explain(config: &Config, registry: &dyn Backend, chain: &[CertificateDer<'_>]) -> Decision {
    auth::decide(config, registry, chain, UnixTime::now(), Mode::DryRun)
}

/// The step-by-step lines of an explanation.
pub fn explain_steps(config: &Config, d: &Decision) -> Vec<String> {
    let mut steps = Vec::new();
    let Some(leaf) = &d.report.leaf else {
        match &d.report.outcome {
            Err(e @ ChainRefusal::TooLong { .. }) => {
                steps.push(format!("1. certificate chain: refused before parsing: {e}"))
            }
            Err(ChainRefusal::NoCertificate) => steps.push("1. certificate: none".to_owned()),
            _ => steps.push("1. certificate: cannot be parsed".to_owned()),
        }
        return steps;
    };
    steps.push(format!(
        "1. certificate: subject {}, issuer {}, fingerprint {}, valid {} .. {}",
        leaf.subject,
        leaf.issuer,
        leaf.fingerprint,
        rfc3339(leaf.validity.not_before),
        rfc3339(leaf.validity.not_after)
    ));
    match d.report.pinned {
        Some(i) => steps.push(format!(
            "2. pinned: matches [[device]] {:?}; validity {}",
            config.devices[i].name.as_str(),
            match &d.report.outcome {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.to_string(),
            }
        )),
        None => steps.push("2. pinned: no [[device]] has this fingerprint".to_owned()),
    }
    if d.report.pinned.is_none() {
        if config.anchors.is_empty() {
            steps.push("3. chain: no anchors configured".to_owned());
        }
        let crls = config.anchors.iter().any(|a| a.crl.is_some());
        for (a, r) in config.anchors.iter().zip(&d.report.anchors) {
            let line = match r {
                Ok(n) => format!(
                    "valid path with {n} intermediate(s): signatures, validity (anchor included), basic constraints, path length, name constraints (SANs, and the CN under DNS constraints), key usage (digitalSignature on the leaf, keyCertSign on every CA), clientAuth EKU{} ok",
                    if crls { ", CRLs of the anchors on the path" } else { "" }
                ),
                Err(AnchorFailure::NotInChain) => "skipped: not an issuer of any certificate in the chain (by name and key identifier)".to_owned(),
                Err(f) => format!("fails [{}]: {f}", f.class().0),
            };
            steps.push(format!("3. anchor {}: {line}", a.name));
        }

        if let Ok(Rule::Anchor(i)) = d.report.outcome {
            steps.push(format!(
                "   chosen: anchor {} (nearest to the leaf, then first in the file)",
                config.anchors[i].name
            ));
        }
        steps.extend(unknown_issuer_steps(config, d));
    }
    if let Some(cn) = &d.cn {
        steps.push(format!("5. common name: {cn:?}"));
    }
    if let Some(dev) = &d.device {
        steps.push(format!("6. device name: {:?}", dev.as_str()));
    }
    match &d.result {
        Ok(a) => steps.push(format!("7. registry: {}", admitted_text(&a.registry))),
        Err(auth::Refused::Registry { refusal, .. }) => {
            steps.push(format!("7. registry: {refusal}"))
        }
        Err(auth::Refused::Store(e)) => steps.push(format!("7. registry: unavailable: {e}")),
        Err(_) => {}
    }
    steps
}

/// contract §3 step 4 for a chain no anchor issued: who issued it, what is configured
/// instead, and which anchor would have to be added.
fn unknown_issuer_steps(config: &Config, d: &Decision) -> Vec<String> {
    let unknown = matches!(
        d.report.outcome,
        Err(ChainRefusal::UnknownIssuer | ChainRefusal::NoAnchors)
    );
    let Some(leaf) = d.report.leaf.as_ref().filter(|_| unknown) else {
        return Vec::new();
    };
    let mut steps = Vec::new();
    if leaf.self_issued {
        steps.push(format!(
            "4. no anchor issued this chain: the certificate is self-signed ({})",
            leaf.subject
        ));
        steps.push(format!(
            "   to accept it, pin it: a [[device]] entry whose certificate is this one (fingerprint {})",
            leaf.fingerprint
        ));
        return steps;
    }
    let missing = &d.report.missing_anchor;
    if let Some(issuer) = missing.first() {
        steps.push(format!(
            "4. no anchor issued this chain: the certificate was issued by {issuer}"
        ));
    }
    steps.push(format!(
        "   configured anchors: {}",
        configured_anchors(config)
    ));
    let mut add = missing.iter().map(ToString::to_string);
    if let Some(nearest) = add.next() {
        let above: Vec<String> = add.collect();
        steps.push(format!(
            "   to accept it, add an [[anchor]] whose certificate is {nearest}{}",
            if above.is_empty() {
                String::new()
            } else {
                format!(
                    ", or one above it that the chain names: {}",
                    above.join(", then ")
                )
            }
        ));
    }
    steps
}

/// The anchors as `explain` lists them: `fleet = CN=Fleet CA (key id ..); ...` or `none`.
fn configured_anchors(config: &Config) -> String {
    if config.anchors.is_empty() {
        return "none".to_owned();
    }
    config
        .anchors
        .iter()
        .map(|a| {
            let id = a
                .info
                .subject_key_id
                .as_deref()
                .map(|id| format!(" (key id {})", crate::cert::key_id(id)))
                .unwrap_or_default();
            format!("{} = {}{id}", a.name, a.info.subject)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `explain --json`.
pub fn explain_json(config: &Config, d: &Decision) -> serde_json::Value {
    let (decision, reason) = match &d.result {
        Ok(a) => (
            "accept",
            format!("accepted: {}", admitted_text(&a.registry)),
        ),
        Err(e) => ("reject", e.to_string()),
    };
    let w = &d.report.work;
    json!({
        "decision": decision,
        "device": d.device.as_ref().map(|n| n.as_str()),
        "rule": d.rule_label(config),
        "reason": reason,
        "reason_code": d.result.as_ref().err().map(|e| e.label()),
        "fingerprint": d.report.leaf.as_ref().map(|l| l.fingerprint.to_hex()),
        "issuer": d.report.leaf.as_ref().map(|l| l.issuer.as_str()),
        "anchors": config.anchors.iter().map(|a| json!({
            "name": a.name,
            "subject": a.info.subject,
            "key_id": a.info.subject_key_id.as_deref().map(crate::cert::key_id),
        })).collect::<Vec<_>>(),
        // For a chain no anchor issued: the CAs that as an anchor would accept it.
        "missing_anchor": d.report.missing_anchor.iter().map(|c| json!({
            "subject": c.subject,
            "key_id": c.key_id,
        })).collect::<Vec<_>>(),
        "common_name": d.cn,
        "steps": explain_steps(config, d),
        // What the pre-authentication bounds limit (contract §3 hardening).
        "work": {
            "certificates": w.certificates,
            "bytes": w.bytes,
            "candidate_paths": w.candidate_paths,
            "paths_tried": w.paths_tried,
            "signatures": w.signatures,
            "budget_exhausted": w.budget_exhausted,
        },
    })
}

/// Whether each device has a live connection on the broker of this `data_dir`, asked
/// through its control socket; unknown when no broker answers there.
#[derive(Debug, Clone, Default)]
pub struct Online(Option<std::collections::BTreeMap<String, u64>>);

impl Online {
    /// Nobody to ask (cluster mode: a device may be connected to any node).
    pub fn unknown() -> Online {
        Online(None)
    }

    /// Asks the broker running on `data_dir`, if any.
    pub fn ask(data_dir: &Path) -> Online {
        Online(crate::server::control::request_online(data_dir))
    }

    /// `Some(true)` when `device` has a live connection, `None` when unknown.
    pub fn of(&self, device: &str) -> Option<bool> {
        self.0.as_ref().map(|m| m.contains_key(device))
    }
}

/// One registry row in JSON (docs/operations.md "Commands"): the contract's fields, and
/// beyond them `dropped_messages` and `online` (true, false, or null when no broker
/// answered).
pub fn device_json(d: &Device, online: &Online) -> serde_json::Value {
    json!({
        "name": d.name,
        "source": d.source.as_str(),
        "fingerprint": d.fingerprint.to_hex(),
        "enabled": d.enabled,
        "online": online.of(&d.name),
        "not_after": rfc3339(d.validity.not_after),
        "created_at": rfc3339(d.created_at),
        "last_seen_at": d.last_seen_at.map(rfc3339),
        "dropped_messages": d.dropped_messages,
    })
}

/// One registry row as text; ONLINE is `yes`, `no`, or `-` when no broker answered.
pub fn device_line(d: &Device, online: &Online) -> String {
    format!(
        "{:<24} {:<12} {:<8} {:<6} {:<26} {:<26} {:<8} {}",
        d.name,
        d.source.as_str(),
        if d.enabled { "enabled" } else { "DISABLED" },
        match online.of(&d.name) {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        },
        rfc3339(d.validity.not_after),
        d.last_seen_at
            .map(rfc3339)
            .unwrap_or_else(|| "never".to_owned()),
        d.dropped_messages,
        d.fingerprint
    )
}

/// The header of [`device_line`].
pub fn device_header() -> String {
    format!(
        "{:<24} {:<12} {:<8} {:<6} {:<26} {:<26} {:<8} {}",
        "NAME", "SOURCE", "STATE", "ONLINE", "NOT_AFTER", "LAST_SEEN", "DROPPED", "FINGERPRINT"
    )
}

/// Step 7's outcome in words (text and JSON alike); `explain` is a dry run, hence "would".
fn admitted_text(a: &crate::registry::Admitted) -> String {
    match a {
        crate::registry::Admitted::Known => "known device, same rule, same certificate".to_owned(),
        crate::registry::Admitted::Provisioned => {
            "unknown device: would be created (provisioned) by this connection".to_owned()
        }
        crate::registry::Admitted::Rotated { previous } => {
            format!("rotation: would replace certificate {previous}")
        }
    }
}
