//! The operator's commands around a running broker (contract §1): `certmq reload` reaches the
//! broker of one `data_dir` and no other, two brokers never share a `data_dir`, and the
//! config file is found without `--config` the documented way.

use std::process::Command;

use crate::common::ops::{config, serve_expecting_exit, Proc};
use crate::common::run::{arg, certmq};
use crate::common::Fixture;

#[tokio::test]
async fn reload_reaches_the_broker_of_its_data_dir_only() {
    let a = Fixture::new();
    let b = Fixture::new();
    let path_a = config(&a, &Fixture::fleet_anchor(true));
    let path_b = config(&b, &Fixture::fleet_anchor(true));
    let mut broker_a = Proc::start(&a, &path_a).await;
    let mut broker_b = Proc::start(&b, &path_b).await;

    let run = certmq(a.dir.path(), &["reload", "--config", arg(&path_a)]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("reloaded"), "{}", run.stdout);
    broker_a
        .wait_line("reload command: configuration reloaded")
        .await;

    // A broken file: exit 1, every problem printed, the running config kept.
    config(
        &a,
        "[[anchor]]\nname = \"x\"\ncertificate = \"missing.pem\"\ncn_regex = '('\n",
    );
    let run = certmq(a.dir.path(), &["reload", "--config", arg(&path_a)]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(run.stderr.starts_with("refused"), "{}", run.stderr);
    assert!(run.stderr.contains("missing.pem"), "{}", run.stderr);
    assert!(run.stderr.contains("cn_regex"), "{}", run.stderr);
    broker_a.wait_line("reload refused").await;

    // The other broker heard nothing.
    broker_b.signal("TERM");
    broker_b.wait_exit(crate::common::WAIT).await;
    assert!(
        !broker_b.stderr().contains("reload"),
        "{}",
        broker_b.stderr()
    );
}

#[tokio::test]
async fn reload_without_a_broker_says_so() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let run = certmq(fx.dir.path(), &["reload", "--config", arg(&path)]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("no broker runs on data_dir"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_second_broker_on_one_data_dir_exits_naming_the_first() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let first = Proc::start(&fx, &path).await;
    let (code, stderr) = serve_expecting_exit(&path).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "in use by another broker (process {}",
            first.pid()
        )),
        "{stderr}"
    );
}

/// `certmq` with neither `--config` nor `$CERTMQ_CONFIG`, in a folder without
/// `config/certmq.toml`, exits 1 naming every place it looked.
#[test]
fn the_config_is_found_the_documented_way() {
    let fx = Fixture::new();
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let empty = tempfile::tempdir().expect("tempdir");
    let run = |dir: &std::path::Path, env: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_certmq"));
        cmd.arg("check").current_dir(dir).env_remove("RUST_LOG");
        match env {
            Some(p) => cmd.env("CERTMQ_CONFIG", p),
            None => cmd.env_remove("CERTMQ_CONFIG"),
        };
        cmd.output().expect("run certmq")
    };
    if !std::path::Path::new(certmq::config::SYSTEM_PATH).exists() {
        let out = run(empty.path(), None);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("$CERTMQ_CONFIG"), "{err}");
        assert!(err.contains("config/certmq.toml"), "{err}");
        assert!(err.contains(certmq::config::SYSTEM_PATH), "{err}");
        assert!(err.contains("--config"), "{err}");
    }
    let out = run(empty.path(), Some(&path));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // config/certmq.toml under the working directory, with no variable set.
    std::fs::create_dir_all(fx.dir.path().join("config")).expect("config dir");
    let text = std::fs::read_to_string(&path).expect("config text");
    let moved = text
        .replace("\"server.", "\"../server.")
        .replace("= \"data\"", "= \"../data\"");
    std::fs::write(
        fx.dir.path().join("config/certmq.toml"),
        moved.replace("\"fleet.pem\"", "\"../fleet.pem\""),
    )
    .expect("write");
    let out = run(fx.dir.path(), None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `certmq backup` while the broker runs, restored into a second broker: the provisioned
/// device, a persistent session with its queued message, and a retained message are there.
#[tokio::test]
async fn a_backup_of_a_running_broker_restores_into_another() {
    use crate::common::coretests::{Opts, Peer, V};
    use crate::common::ops::pinned_backend;

    let fx = Fixture::new();
    let (section, backend) = pinned_backend(&fx);
    let body = format!("{}\n{section}", Fixture::fleet_anchor(true));
    let path = config(&fx, &body);
    let broker = Proc::start(&fx, &path).await;
    let dev = fx.client(&fx.device("d1.devices.example.com"));
    let persistent = Opts {
        clean: false,
        will: None,
    };
    let mut d = Peer::connect(&dev, broker.mqtt, V::V5, "d1", &persistent).await;
    assert_eq!(d.subscribe("devices/d1/#", 1).await, 1);
    d.disconnect().await;
    let mut b = Peer::connect(&backend, broker.mqtt, V::V5, "b", &Opts::default()).await;
    assert_eq!(b.publish("devices/d1/cmd", 1, false, b"queued").await, 0);
    assert_eq!(b.publish("devices/d1/state", 1, true, b"retained").await, 0);

    let out = fx.path("backup");
    let run = certmq(
        fx.dir.path(),
        &["backup", "--out", arg(&out), "--config", arg(&path)],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Over an existing, non-empty directory: refused.
    let again = certmq(
        fx.dir.path(),
        &["backup", "--out", arg(&out), "--config", arg(&path)],
    );
    assert_eq!(again.code, Some(1));
    assert!(
        again.stderr.contains("not an empty directory"),
        "{}",
        again.stderr
    );

    // A second broker on the copy.
    let text = std::fs::read_to_string(&path).expect("config");
    let restored = fx.write(
        "restored.toml",
        &text.replace("data_dir = \"data\"", "data_dir = \"backup\""),
    );
    let second = Proc::start(&fx, &restored).await;
    let shown = certmq(
        fx.dir.path(),
        &["devices", "show", "d1", "--config", arg(&restored)],
    );
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    let mut d = Peer::connect(&dev, second.mqtt, V::V5, "d1", &persistent).await;
    assert!(d.session_present);
    assert_eq!(d.recv().await.payload, b"queued");
    let mut r = Peer::connect(&backend, second.mqtt, V::V5, "r", &Opts::default()).await;
    assert_eq!(r.subscribe("devices/d1/state", 1).await, 1);
    assert_eq!(r.recv().await.payload, b"retained");
}

/// `check` meets what `serve` would (contract §1): a listening address in use, a data_dir that
/// cannot be written; yet it passes while this data_dir's own broker holds the ports.
#[tokio::test]
async fn check_finds_a_port_in_use_and_an_unwritable_data_dir() {
    let fx = Fixture::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let text = std::fs::read_to_string(config(&fx, &Fixture::fleet_anchor(true))).expect("read");
    let path = fx.write(
        "busy.toml",
        &text.replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{addr}\"")),
    );
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(
        run.stderr.contains("server.bind: cannot listen on"),
        "{}",
        run.stderr
    );
    drop(taken);

    // data_dir below a regular file: nothing can be created there.
    fx.write("not-a-dir", "");
    let path = fx.write(
        "nodir.toml",
        &text.replace("data_dir = \"data\"", "data_dir = \"not-a-dir/data\""),
    );
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(run.stderr.contains("server.data_dir:"), "{}", run.stderr);
    assert!(run.stderr.contains("not writable"), "{}", run.stderr);

    // With the broker of this data_dir running on fixed ports, its ports are its own.
    let path = config(&fx, &Fixture::fleet_anchor(true));
    let mut broker = Proc::start(&fx, &path).await;
    let text = std::fs::read_to_string(&path).expect("read");
    let fixed = text
        .replace(
            "bind = \"127.0.0.1:0\"\n",
            &format!("bind = \"{}\"\n", broker.mqtt),
        )
        .replace(
            "admin_bind = \"127.0.0.1:0\"",
            &format!("admin_bind = \"{}\"", broker.admin),
        );
    std::fs::write(&path, fixed).expect("write");
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&path)]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    broker.signal("TERM");
    assert!(broker.wait_exit(crate::common::WAIT).await.success());
    assert!(
        !broker.stderr().contains("control request failed"),
        "{}",
        broker.stderr()
    );
}
