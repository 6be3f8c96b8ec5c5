//! The demo PKI is what contract §1 describes, its chains verify as the demo config expects,
//! and nothing existing is ever overwritten.

use std::fs;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use webpki::KeyUsage;

use super::super::tests::{common_names, parse, verify};
use super::*;

fn certs(path: &Path) -> Vec<Vec<u8>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap().as_ref().to_vec())
        .collect()
}

#[test]
fn writes_every_file_with_the_config_last() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let files = write_demo(&out, 30).unwrap();
    assert_eq!(files.dir, out);
    assert_eq!(files.config, out.join("certmq.toml"));
    let expected: Vec<_> = FILE_NAMES.iter().map(|n| out.join(n)).collect();
    assert_eq!(files.files, expected);
    for path in &files.files {
        assert!(fs::metadata(path).unwrap().len() > 0, "{}", path.display());
    }
    assert_eq!(fs::read_dir(&out).unwrap().count(), FILE_NAMES.len());
}

#[cfg(unix)]
#[test]
fn private_keys_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let files = write_demo(dir.path(), 30).unwrap();
    for path in &files.files {
        let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let is_key = path.extension().is_some_and(|e| e == "key");
        if is_key {
            assert_eq!(mode, 0o600, "{}", path.display());
        } else {
            assert_ne!(mode & 0o044, 0, "{} should be readable", path.display());
        }
    }
}

#[test]
fn refuses_to_overwrite_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("dev-002.key");
    fs::write(&existing, "precious").unwrap();
    let err = write_demo(dir.path(), 30).unwrap_err();
    match &err {
        PkiError::AlreadyExists { path } => assert_eq!(path, &existing),
        other => panic!("unexpected error: {other}"),
    }
    assert!(err.to_string().contains("dev-002.key"), "{err}");
    assert_eq!(fs::read_to_string(&existing).unwrap(), "precious");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn second_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_demo(dir.path(), 30).unwrap();
    let root_before = fs::read(dir.path().join("root.key")).unwrap();
    let err = write_demo(dir.path(), 30).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
    assert_eq!(fs::read(dir.path().join("root.key")).unwrap(), root_before);
}

#[test]
fn validity_below_one_day_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_demo(dir.path(), 0).unwrap_err();
    assert!(
        matches!(err, PkiError::ValidityTooShort { days: 0 }),
        "{err}"
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn chains_verify_as_the_config_expects() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    write_demo(out, 30).unwrap();
    let root = certs(&out.join("root.pem"));
    let intermediate = certs(&out.join("intermediate.pem"));
    assert_eq!((root.len(), intermediate.len()), (1, 1));
    assert_eq!(common_names(&parse(&root[0])), [ROOT_CN]);
    assert_eq!(common_names(&parse(&intermediate[0])), [INTERMEDIATE_CN]);
    let crl = fs::read_to_string(out.join("intermediate.crl")).unwrap();

    for (chain_file, _, cn) in DEVICES {
        let chain = certs(&out.join(chain_file));
        assert_eq!(chain.len(), 2, "{chain_file}: leaf then intermediate");
        assert_eq!(chain[1], intermediate[0]);
        assert_eq!(common_names(&parse(&chain[0])), [cn]);
        verify(
            &chain[0],
            &intermediate[0],
            &[],
            KeyUsage::client_auth(),
            &[&crl],
        )
        .unwrap();
        verify(
            &chain[0],
            &root[0],
            &[&chain[1]],
            KeyUsage::client_auth(),
            &[],
        )
        .unwrap();
    }

    let server = certs(&out.join("server.pem"));
    assert_eq!(
        server.len(),
        1,
        "server.pem holds the server certificate only"
    );
    verify(&server[0], &root[0], &[], KeyUsage::server_auth(), &[]).unwrap();

    let backend = certs(&out.join("backend.pem"));
    assert_eq!(common_names(&parse(&backend[0])), ["backend"]);
    verify(&backend[0], &root[0], &[], KeyUsage::client_auth(), &[]).unwrap();
    assert_eq!(
        verify(
            &backend[0],
            &intermediate[0],
            &[],
            KeyUsage::client_auth(),
            &[]
        ),
        Err(webpki::Error::UnknownIssuer),
        "the fleet anchor must not admit the backend"
    );

    let meter = certs(&out.join("meter-7.pem"));
    let meter_cert = parse(&meter[0]);
    assert_eq!(common_names(&meter_cert), ["meter-7"]);
    assert_eq!(meter_cert.subject(), meter_cert.issuer());
}

#[test]
fn validity_days_sets_the_certificates_and_crl_windows() {
    let dir = tempfile::tempdir().unwrap();
    write_demo(dir.path(), 100).unwrap();
    let leaf = certs(&dir.path().join("dev-001.pem")).remove(0);
    let validity = parse(&leaf).validity().clone();
    let span = validity.not_after.to_datetime() - validity.not_before.to_datetime();
    assert_eq!(span, time::Duration::days(101));
    let crl_pem = fs::read(dir.path().join("intermediate.crl")).unwrap();
    let crl_der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&crl_pem).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&crl_der).unwrap();
    let crl_span = crl.next_update().unwrap().to_datetime() - crl.last_update().to_datetime();
    assert_eq!(crl_span, time::Duration::days(101));
    assert_eq!(crl.iter_revoked_certificates().count(), 0);
}

#[test]
fn config_parses_and_points_at_written_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_demo(dir.path(), 30).unwrap();
    let text = fs::read_to_string(&files.config).unwrap();
    let config: toml::Table = toml::from_str(&text).unwrap();
    let server = config["server"].as_table().unwrap();
    assert_eq!(server["bind"].as_str(), Some("0.0.0.0:8883"));
    assert_eq!(server["data_dir"].as_str(), Some("data"));
    let mut referenced = vec![
        server["cert_chain"].as_str().unwrap(),
        server["private_key"].as_str().unwrap(),
    ];
    let anchors = config["anchor"].as_array().unwrap();
    assert_eq!(anchors.len(), 1);
    let fleet = anchors[0].as_table().unwrap();
    assert_eq!(
        fleet["cn_regex"].as_str(),
        Some(r"^(.+)\.devices\.example\.com$")
    );
    assert_eq!(fleet["create_devices"].as_bool(), Some(true));
    referenced.push(fleet["certificate"].as_str().unwrap());
    referenced.push(fleet["crl"].as_str().unwrap());
    let devices = config["device"].as_array().unwrap();
    let names: Vec<&str> = devices
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["meter-7", "backend"]);
    referenced.extend(devices.iter().map(|d| d["certificate"].as_str().unwrap()));
    for file in referenced {
        assert!(dir.path().join(file).is_file(), "{file} is not written");
    }
    let backend_acl = config["acl"]["backend"].as_table().unwrap();
    assert_eq!(backend_acl["publish"].as_array().unwrap().len(), 1);
}
