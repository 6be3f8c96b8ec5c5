//! The operator's side of the CLI (docs/operations.md): the read-only commands (`check`, `explain`,
//! `devices list|show`) never create or modify a database, also when run as root before
//! the first start; a file the broker's user may not write is named with its owner and
//! mode; `devices list|show` say which devices are connected to the running broker; the
//! help texts document every flag and argument.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::coretests::raw::Raw;
use crate::common::coretests::{raw::RawConnect, V};
use crate::common::run::{arg, certmq, Run};
use crate::common::{Broker, Fixture, Outcome};
use serde_json::Value;

/// The user id the unprivileged runs use when the tests run as root (`nobody`).
const NOBODY: u32 = 65534;

/// `certmq ARGS --config <fixture>/certmq.toml`.
fn run(fx: &Fixture, args: &[&str]) -> Run {
    let config = fx.path("certmq.toml");
    let mut all = args.to_vec();
    all.extend(["--config", arg(&config)]);
    certmq(fx.dir.path(), &all)
}

/// The effective user id of this process (`/proc/self/status`, line `Uid:`).
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .expect("Uid: line")
}

/// Every file under `dir` (one level: data_dir has no subfolders) with its owner.
fn owners(dir: &Path) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = std::fs::read_dir(dir)
        .expect("read data_dir")
        .map(|e| {
            let e = e.expect("entry");
            let uid = e.metadata().expect("metadata").uid();
            (e.file_name().to_string_lossy().into_owned(), uid)
        })
        .collect();
    out.sort();
    out
}

/// Provisions `names` through a broker in this process, then stops it (which checkpoints
/// and removes the WAL files, as a stopped service leaves its data_dir).
async fn provision(fx: &Fixture, names: &[&str]) {
    let broker = Broker::start(&fx.path("certmq.toml")).await;
    for name in names {
        let dev = fx.device(&format!("{name}.devices.example.com"));
        assert_eq!(
            fx.client(&dev).connect_v4(broker.addr, "c", true).await,
            Outcome::Accepted
        );
    }
    broker.stop().await;
    // Both databases are closed by the time the stop returns: no -wal or -shm file is left.
    let left: Vec<String> = owners(&fx.data_dir()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        left,
        ["certmq.db", "certmq.lock", "messages.db"],
        "{left:?}"
    );
}

#[test]
fn read_only_commands_create_nothing_before_the_first_start() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    let dev = fx.device("dev-001.devices.example.com");
    let cert = fx.write("dev.pem", &dev.chain_pem(&[&fx.fleet]));

    let list = run(&fx, &["devices", "list"]);
    assert_eq!(list.code, Some(0), "{list:#?}");
    assert_eq!(list.stdout.lines().count(), 1, "only the header: {list:#?}");
    let list = run(&fx, &["devices", "list", "--json"]);
    assert_eq!(
        (list.code, list.stdout.trim()),
        (Some(0), "[]"),
        "{list:#?}"
    );
    let explain = run(&fx, &["explain", "--cert", arg(&cert)]);
    assert_eq!(explain.code, Some(0), "{explain:#?}");
    let check = run(&fx, &["check"]);
    assert_eq!(check.code, Some(0), "{check:#?}");
    // A device cannot be shown, nor changed, in a registry that does not exist yet: the
    // error says so, and creating one to find that out is exactly what must not happen.
    for args in [
        &["devices", "show", "dev-001"][..],
        &["devices", "disable", "dev-001"][..],
        &["devices", "delete", "dev-001"][..],
    ] {
        let r = run(&fx, args);
        assert_eq!(r.code, Some(1), "{args:?}: {r:#?}");
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{r:#?}");
        assert!(r.stderr.contains("\"dev-001\""), "{r:#?}");
        assert!(r.stderr.contains("does not exist yet"), "{r:#?}");
    }
    assert!(
        !fx.data_dir().exists(),
        "a read-only command created {:?}",
        fx.data_dir()
    );
}

/// The registry of a stopped broker owned by its service user: `devices list|show`,
/// `explain` and `check` read it without changing a byte and, run as root, without leaving
/// a file owned by root (SQLite gives the WAL files it creates the database's owner).
#[tokio::test]
async fn read_only_commands_change_nothing_in_an_existing_registry() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    provision(&fx, &["dev-001", "dev-002"]).await;
    let data = fx.data_dir();
    let root = euid() == 0;
    if root {
        // As the package sets it up: data_dir and its files belong to the service user.
        std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).expect("chown");
        for (name, _) in owners(&data) {
            std::os::unix::fs::chown(data.join(name), Some(NOBODY), Some(NOBODY)).expect("chown");
        }
    }
    let db = data.join(certmq::registry::DB_FILE);
    let before = std::fs::read(&db).expect("certmq.db");
    let new = fx.device("dev-003.devices.example.com");
    let cert = fx.write("new.pem", &new.chain_pem(&[&fx.fleet]));

    let list = run(&fx, &["devices", "list", "--json"]);
    assert_eq!(list.code, Some(0), "{list:#?}");
    let rows: Value = serde_json::from_str(&list.stdout).expect("JSON");
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");
    let show = run(&fx, &["devices", "show", "dev-001"]);
    assert_eq!(show.code, Some(0), "{show:#?}");
    // Accepted, and would be provisioned: a dry run only.
    let explain = run(&fx, &["explain", "--cert", arg(&cert), "--json"]);
    assert_eq!(explain.code, Some(0), "{explain:#?}");
    let check = run(&fx, &["check"]);
    assert_eq!(check.code, Some(0), "{check:#?}");

    assert_eq!(
        std::fs::read(&db).expect("certmq.db"),
        before,
        "certmq.db changed"
    );
    let list = run(&fx, &["devices", "list", "--json"]);
    let again: Value = serde_json::from_str(&list.stdout).expect("JSON");
    assert_eq!(again, rows);
    if root {
        let by_root: Vec<_> = owners(&data).into_iter().filter(|(_, u)| *u == 0).collect();
        assert!(by_root.is_empty(), "files left owned by root: {by_root:?}");
    }
}

/// Runs the binary as a user who may not write data_dir: `nobody` when the tests run as
/// root (root may write anything), else this user, whose write bits the caller removed.
/// The binary is copied into the fixture folder, which that user can reach.
fn run_unprivileged(fx: &Fixture, args: &[&str]) -> Run {
    let config = fx.path("certmq.toml");
    let binary = fx.path("certmq-bin");
    if !binary.exists() {
        // Copied by a child process: a copy written from this (multi-threaded) process
        // would have its write descriptor inherited by any child another test forks at
        // that moment, and running it then fails with ETXTBSY (exit 126 from setpriv).
        let cp = Command::new("cp")
            .arg(env!("CARGO_BIN_EXE_certmq"))
            .arg(&binary)
            .status()
            .expect("run cp");
        assert!(cp.success(), "copy the binary: {cp}");
    }
    let mut cmd = if euid() == 0 {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
        ]);
        c.arg("--clear-groups").arg(&binary);
        c
    } else {
        Command::new(&binary)
    };
    let out = cmd
        .args(args)
        .args(["--config", arg(&config)])
        .current_dir(fx.dir.path())
        .env_remove("RUST_LOG")
        .env_remove("CERTMQ_CONFIG")
        .output()
        .expect("run certmq");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A registry this user may read but not write (the case of a database created by root
/// before the service's first start): every command names the file, its owner and mode,
/// and the user it runs as, instead of SQLite's "attempt to write a readonly database".
#[tokio::test]
async fn a_data_dir_the_user_may_not_write_is_named_with_owner_and_mode() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    provision(&fx, &["dev-001"]).await;
    let data = fx.data_dir();
    // Everything readable by the unprivileged user, nothing in data_dir writable.
    chmod(fx.dir.path(), 0o755);
    for f in ["certmq.toml", "server.pem", "server.key", "fleet.pem"] {
        chmod(&fx.path(f), 0o644);
    }
    let files: Vec<PathBuf> = owners(&data)
        .into_iter()
        .map(|(name, _)| data.join(name))
        .collect();
    for f in &files {
        chmod(f, 0o444);
    }
    chmod(&data, 0o555);

    let disable = run_unprivileged(&fx, &["devices", "disable", "dev-001"]);
    assert_eq!(disable.code, Some(1), "{disable:#?}");
    assert_eq!(disable.stderr.trim_end().lines().count(), 1, "{disable:#?}");
    for part in [
        "cannot write the registry",
        "certmq.db is owned by",
        "mode 0444",
        "this process runs as",
    ] {
        assert!(disable.stderr.contains(part), "{part}: {disable:#?}");
    }

    for command in ["serve", "check"] {
        let r = run_unprivileged(&fx, &[command]);
        assert_eq!(r.code, Some(1), "{command}: {r:#?}");
        for part in [
            "server.data_dir:",
            "certmq.db is not writable",
            "messages.db is not writable",
            "mode 0444",
            "mode 0555",
            "this process runs as",
        ] {
            assert!(r.stderr.contains(part), "{command}: {part}: {r:#?}");
        }
        assert!(!r.stderr.contains("readonly database"), "{command}: {r:#?}");
    }

    // Reading a WAL database needs its -shm file, which this user cannot create here
    // while no broker runs: the error says so, with the folder's owner and mode.
    let list = run_unprivileged(&fx, &["devices", "list"]);
    assert_eq!(list.code, Some(1), "{list:#?}");
    for part in [
        "cannot open the registry",
        "may not create files in its folder",
        "mode 0555",
        "this process runs as",
    ] {
        assert!(list.stderr.contains(part), "{part}: {list:#?}");
    }
    // The test's own files stay removable.
    chmod(&data, 0o755);
}

/// `devices list|show`: ONLINE (text) and `online` (JSON) say whether the device has a
/// live connection on the broker of this data_dir, asked through its control socket; `-`
/// and null when no broker runs there. The other fields are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_says_which_devices_are_online() {
    let fx = Fixture::new();
    fx.config(&Fixture::fleet_anchor(true));
    provision(&fx, &["dev-001", "dev-002"]).await;
    let broker = Broker::start(&fx.path("certmq.toml")).await;
    let dev = fx.device("dev-001.devices.example.com");
    let (_held, _) = Raw::connect_ok(
        &fx.client(&dev),
        broker.addr,
        &RawConnect::new(V::V4, "c").bytes(),
    )
    .await;
    let fx = std::sync::Arc::new(fx);
    let cli = fx.clone();
    let (json, text, show) = tokio::task::spawn_blocking(move || {
        (
            run(&cli, &["devices", "list", "--json"]),
            run(&cli, &["devices", "list"]),
            run(&cli, &["devices", "show", "dev-002", "--json"]),
        )
    })
    .await
    .expect("join");
    let rows: Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(rows[0]["name"], "dev-001", "{rows}");
    assert_eq!(rows[0]["online"], true, "{rows}");
    assert_eq!(rows[1]["online"], false, "{rows}");
    let show: Value = serde_json::from_str(&show.stdout).expect("JSON");
    assert_eq!(show, rows[1]);
    let lines: Vec<Vec<&str>> = text
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        &lines[0][..4],
        ["NAME", "SOURCE", "STATE", "ONLINE"],
        "{text:#?}"
    );
    assert_eq!(
        &lines[1][..4],
        ["dev-001", "fleet", "enabled", "yes"],
        "{text:#?}"
    );
    assert_eq!(
        &lines[2][..4],
        ["dev-002", "fleet", "enabled", "no"],
        "{text:#?}"
    );
    broker.stop().await;

    let json = run(&fx, &["devices", "list", "--json"]);
    let rows: Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(rows[0]["online"], Value::Null, "{rows}");
    let text = run(&fx, &["devices", "list"]);
    let row: Vec<&str> = text
        .stdout
        .lines()
        .nth(1)
        .expect("row")
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], ["dev-001", "fleet", "enabled", "-"], "{text:#?}");
}

/// Every flag and argument an operator types is explained by `--help`.
#[test]
fn help_documents_every_flag_and_argument() {
    let dir = tempfile::tempdir().expect("tempdir");
    let help = |args: &[&str]| {
        let r = certmq(dir.path(), args);
        assert_eq!(r.code, Some(0), "{args:?}: {r:#?}");
        r.stdout
    };
    let list = help(&["devices", "list", "--help"]);
    assert!(list.contains("--json") && list.contains("online"), "{list}");
    let show = help(&["devices", "show", "--help"]);
    assert!(show.contains("<NAME>  The device name"), "{show}");
    assert!(
        show.contains("--json") && show.contains("JSON object"),
        "{show}"
    );
    for sub in ["disable", "enable", "delete"] {
        let text = help(&["devices", sub, "--help"]);
        assert!(text.contains("<NAME>  The device name"), "{sub}: {text}");
    }
    let backup = help(&["backup", "--help"]);
    assert!(
        backup.contains("--out <DIR>") && backup.contains("certmq.db"),
        "{backup}"
    );
    let demo = help(&["demo-pki", "--help"]);
    assert!(
        demo.contains("--out <DIR>") && demo.contains("The directory to write into"),
        "{demo}"
    );
    let explain = help(&["explain", "--help"]);
    assert!(
        explain.contains("--json") && explain.contains("decision"),
        "{explain}"
    );
    let top = help(&["--help"]);
    assert!(top.contains("--config <PATH>"), "{top}");
}
