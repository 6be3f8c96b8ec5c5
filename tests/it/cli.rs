//! contract §1 and 2 black-box: the real `certmq` binary, run as an operator runs it, checked by
//! exit code (0 success, 1 refused or failed, 2 usage error), stdout and stderr. `check`
//! gets one test per config problem, because each message is what an operator reads to fix
//! that one mistake. The `explain` and `devices` commands are in `tests/cli_registry.rs`.

use crate::common::run::{arg, certmq, Run};
use crate::common::{self_signed, Fixture};
use certmq::pki::Validity;

/// `certmq check --config <fixture>/certmq.toml`.
fn check(fx: &Fixture) -> Run {
    let config = fx.path("certmq.toml");
    certmq(fx.dir.path(), &["check", "--config", arg(&config)])
}

/// Asserts exit 1 and a stderr line that names the config file, `field` and `message`.
#[track_caller]
fn assert_problem(run: &Run, fx: &Fixture, field: &str, message: &str) {
    assert_eq!(run.code, Some(1), "{run:#?}");
    let file = fx.path("certmq.toml");
    let line = run.stderr.lines().find(|l| l.contains(field));
    let line = line.unwrap_or_else(|| panic!("no line names {field:?}: {run:#?}"));
    assert!(line.contains(arg(&file)), "file not named: {line}");
    assert!(line.contains(message), "{message:?} not in: {line}");
    assert!(
        run.stdout.is_empty(),
        "a refused config prints no summary: {run:#?}"
    );
}

fn fleet(create: bool) -> String {
    Fixture::fleet_anchor(create)
}

fn anchor(name: &str, certificate: &str) -> String {
    format!("[[anchor]]\nname = \"{name}\"\ncertificate = \"{certificate}\"\ncn_regex = '^(.+)$'\n")
}

fn pinned(name: &str, certificate: &str) -> String {
    format!("[[device]]\nname = \"{name}\"\ncertificate = \"{certificate}\"\n")
}

// ---------------------------------------------------------------- check: a good config

#[test]
fn check_summarises_a_good_config() {
    let fx = Fixture::new();
    let meter = self_signed("meter-7");
    fx.write("meter-7.pem", &meter.cert_pem);
    fx.config(&format!(
        "{}acl = \"sensors\"\n\n{}acl = \"backend\"\n\n[acl.sensors]\npublish = [\"sensors/{{device}}/#\"]\n\n[acl.backend]\npublish = [\"#\"]\nsubscribe = [\"#\"]\n",
        fleet(true),
        pinned("meter-7", "meter-7.pem"),
    ));
    let run = check(&fx);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let out = &run.stdout;
    assert!(out.contains("is valid"), "{out}");
    assert!(out.contains("listener: 127.0.0.1:0"), "{out}");
    assert!(out.contains("anchors: 1"), "{out}");
    assert!(out.contains("fleet: CN=Test Fleet CA"), "{out}");
    assert!(
        out.contains(r"cn_regex ^(.+)\.devices\.example\.com$"),
        "{out}"
    );
    assert!(out.contains("create_devices true, acl sensors"), "{out}");
    let expires = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("expires "))
        .expect("anchor expiry line");
    time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
        .expect("anchor expiry is RFC 3339");
    assert!(out.contains("pinned devices: 1"), "{out}");
    let fingerprint = certmq::cert::Fingerprint::of(&meter.cert_der).to_hex();
    assert!(out.contains(&format!("meter-7: {fingerprint}")), "{out}");
    assert!(out.contains("acl backend"), "{out}");
    assert!(
        out.contains("acl profiles: backend, device, sensors"),
        "{out}"
    );
    assert!(!out.contains("warning:"), "{out}");
    assert!(run.stderr.is_empty(), "{run:#?}");
    assert!(
        !fx.data_dir().exists(),
        "check must not create the data_dir"
    );
}

#[test]
fn check_takes_config_before_or_after_the_subcommand() {
    let fx = Fixture::new();
    let config = fx.config(&fleet(false));
    let config = arg(&config);
    let after = certmq(fx.dir.path(), &["check", "--config", config]);
    let before = certmq(fx.dir.path(), &["--config", config, "check"]);
    assert_eq!(after.code, Some(0), "{after:#?}");
    assert_eq!(before.code, Some(0), "{before:#?}");
    assert_eq!(after.stdout, before.stdout);
    assert!(before.stdout.contains(config), "{before:#?}");
}

#[test]
fn check_defaults_to_config_certmq_toml() {
    let fx = Fixture::new();
    // Without --config, the path is config/certmq.toml relative to the working directory,
    // else /etc/certmq/certmq.toml: where the package is installed, that file is found
    // instead (the order is `operator::the_config_is_found_the_documented_way`'s subject).
    if std::path::Path::new(certmq::config::SYSTEM_PATH).exists() {
        return;
    }
    let run = certmq(fx.dir.path(), &["check"]);
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.contains("config/certmq.toml"), "{run:#?}");
}

// ---------------------------------------------------------------- check: one problem each

#[test]
fn check_refuses_an_unknown_key() {
    let fx = Fixture::new();
    fx.config("[[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = '^(.+)$'\ncreate_device = true\n");
    let run = check(&fx);
    // One line: the file, the key with its line and column, the key it resembles.
    assert_problem(
        &run,
        &fx,
        "anchor[0].create_device (line 15, column 1)",
        "unknown key (did you mean `create_devices`?)",
    );
}

/// One test per config problem: `name: |fx| CONFIG => FIELD, MESSAGE;` runs the closure
/// (which writes what the config needs into the fixture and returns the config, a `String`
/// or `&str`), writes the config file, runs `certmq check`, and asserts exit 1 and a line
/// that names the file, FIELD and MESSAGE.
macro_rules! config_problem {
    ($($name:ident: |$fx:ident| $config:expr => $field:expr, $message:expr;)+) => {
        $(
            #[test]
            fn $name() {
                let $fx = Fixture::new();
                let config = $config;
                $fx.config(config.as_ref());
                let run = check(&$fx);
                assert_problem(&run, &$fx, $field, $message.as_ref());
            }
        )+
    };
}

config_problem! {
    check_refuses_a_missing_certificate_file: |fx| anchor("fleet", "missing.pem")
        => "anchor[0] \"fleet\".certificate",
        format!("cannot read {}", arg(&fx.path("missing.pem")));

    check_refuses_a_server_key_that_does_not_match_the_certificate: |fx| {
        fx.write("server.key", &fx.device("someone-else").key_pem);
        fleet(false)
    } => "server.private_key", "does not match the server certificate";

    check_refuses_an_anchor_that_is_not_a_ca: |fx| {
        fx.write("leaf.pem", &fx.device("leaf.devices.example.com").cert_pem);
        anchor("fleet", "leaf.pem")
    } => "anchor[0] \"fleet\".certificate", "is not a CA certificate";

    check_refuses_duplicate_anchor_names: |fx| {
        format!("{}\n{}", anchor("fleet", "fleet.pem"), anchor("fleet", "root.pem"))
    } => "anchor[1] \"fleet\".name", "\"fleet\" is used more than once";

    check_refuses_duplicate_pinned_names: |fx| {
        fx.write("a.pem", &self_signed("meter-7").cert_pem);
        fx.write("b.pem", &self_signed("meter-7").cert_pem);
        format!("{}\n{}", pinned("meter-7", "a.pem"), pinned("meter-7", "b.pem"))
    } => "device[1] \"meter-7\".name", "\"meter-7\" is used more than once";

    check_refuses_two_anchors_with_the_same_certificate: |fx| {
        format!("{}\n{}", anchor("fleet", "fleet.pem"), anchor("fleet2", "fleet.pem"))
    } => "anchor[1] \"fleet2\".certificate", "same certificate as anchor \"fleet\"";

    check_refuses_two_pinned_devices_with_the_same_certificate: |fx| {
        fx.write("meter.pem", &self_signed("meter").cert_pem);
        // A copy under another file name is still the same certificate.
        fx.write("copy.pem", &std::fs::read_to_string(fx.path("meter.pem")).unwrap());
        format!("{}\n{}", pinned("meter-7", "meter.pem"), pinned("meter-8", "copy.pem"))
    } => "device[1] \"meter-8\".certificate", "same certificate as device \"meter-7\"";

    check_refuses_a_regex_that_does_not_compile: |fx| {
        "[[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = '^(.+\\.example$'\n"
    } => "anchor[0] \"fleet\".cn_regex", "invalid regular expression";

    check_refuses_an_undefined_acl_profile: |fx| format!("{}acl = \"sensors\"\n", fleet(true))
        => "anchor[0] \"fleet\".acl", "ACL profile \"sensors\" is not defined";

    check_refuses_device_placeholder_inside_a_topic_level: |fx| {
        format!(
            "{}acl = \"custom\"\n\n[acl.custom]\npublish = [\"devices/dev-{{device}}/#\"]\n",
            fleet(true)
        )
    } => "acl.custom", "\"devices/dev-{device}/#\" uses {device} inside a topic level";

    check_refuses_a_crl_issued_by_another_ca: |fx| {
        fx.write("root.crl", &fx.root.crl(&[], Validity::days(-1, 30)).unwrap());
        format!("{}crl = \"root.crl\"\n", fleet(true))
    } => "anchor[0] \"fleet\".crl", "was not issued by this anchor (CRL issuer CN=Test Root CA)";

    check_refuses_an_anchor_named_pinned: |fx| anchor("pinned", "fleet.pem")
        => "anchor[0] \"pinned\".name", "not \"pinned\": \"pinned\"";
}

#[test]
fn check_refuses_when_every_rule_is_expired() {
    let fx = Fixture::new();
    let old = fx
        .root
        .intermediate("Old Fleet CA", Validity::days(-30, -1), None)
        .unwrap();
    fx.write("old.pem", &old.cert_pem());
    let meter = certmq::pki::self_signed(&certmq::pki::LeafSpec {
        validity: Validity::days(-30, -1),
        ..certmq::pki::LeafSpec::device("meter-7")
    })
    .unwrap();
    fx.write("meter.pem", &meter.cert_pem);
    fx.config(&format!(
        "{}\n{}",
        anchor("old", "old.pem"),
        pinned("meter-7", "meter.pem")
    ));
    let run = check(&fx);
    assert_problem(&run, &fx, "anchor/device", "no trust rule is usable");
    // The operator is told which rules are unusable, not only that none is.
    assert_problem(
        &run,
        &fx,
        "anchor[0] \"old\".certificate",
        "certificate expired on",
    );
    assert_problem(
        &run,
        &fx,
        "device[0] \"meter-7\".certificate",
        "certificate expired on",
    );
}

#[test]
fn check_warns_about_an_expired_anchor_next_to_a_valid_one() {
    let fx = Fixture::new();
    let old = fx
        .root
        .intermediate("Old Fleet CA", Validity::days(-30, -1), None)
        .unwrap();
    fx.write("old.pem", &old.cert_pem());
    fx.config(&format!("{}\n{}", fleet(true), anchor("old", "old.pem")));
    let run = check(&fx);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let warning = run
        .stdout
        .lines()
        .find(|l| l.starts_with("warning:"))
        .unwrap_or_else(|| panic!("no warning: {run:#?}"));
    assert!(
        warning.contains("anchor[1] \"old\".certificate"),
        "{warning}"
    );
    assert!(warning.contains("certificate expired on"), "{warning}");
    assert_eq!(run.stdout.matches("warning:").count(), 1, "{run:#?}");
}

#[test]
fn check_reports_every_problem_at_once() {
    let fx = Fixture::new();
    fx.config(&format!(
        "[[anchor]]\nname = \"fleet\"\ncertificate = \"fleet.pem\"\ncn_regex = '(unclosed'\nacl = \"nope\"\n\n{}",
        pinned("meter-7", "missing.pem")
    ));
    let run = check(&fx);
    assert_problem(
        &run,
        &fx,
        "anchor[0] \"fleet\".cn_regex",
        "invalid regular expression",
    );
    assert_problem(
        &run,
        &fx,
        "anchor[0] \"fleet\".acl",
        "ACL profile \"nope\" is not defined",
    );
    assert_problem(
        &run,
        &fx,
        "device[0] \"meter-7\".certificate",
        "cannot read",
    );
    assert!(run.stderr.contains("3 problem(s)"), "{run:#?}");
}

// ---------------------------------------------------------------- demo-pki

#[test]
fn demo_pki_writes_a_config_that_checks_and_never_overwrites() {
    let fx = Fixture::new();
    let out = fx.path("demo");
    let run = certmq(fx.dir.path(), &["demo-pki", "--out", arg(&out)]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("wrote 18 files"), "{run:#?}");
    for name in [
        "root.pem",
        "intermediate.pem",
        "intermediate.crl",
        "server.pem",
        "server.key",
        "dev-001.pem",
        "dev-003.key",
        "meter-7.pem",
        "backend.pem",
        "certmq.toml",
    ] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let config = out.join("certmq.toml");
    let run = certmq(fx.dir.path(), &["check", "--config", arg(&config)]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout.contains("fleet: CN=certmq Example Devices CA"),
        "{run:#?}"
    );
    assert!(run.stdout.contains("pinned devices: 2"), "{run:#?}");

    let key_before = std::fs::read(out.join("root.key")).unwrap();
    let again = certmq(fx.dir.path(), &["demo-pki", "--out", arg(&out)]);
    assert_eq!(again.code, Some(1), "{again:#?}");
    let root_pem = out.join("root.pem");
    assert!(
        again.stderr.contains(&format!(
            "{} already exists; refusing to overwrite it",
            arg(&root_pem)
        )),
        "{again:#?}"
    );
    assert_eq!(std::fs::read(out.join("root.key")).unwrap(), key_before);
}

// ---------------------------------------------------------------- usage errors

#[test]
fn usage_errors_exit_2() {
    let fx = Fixture::new();
    fx.config(&fleet(false));
    for args in [
        &[][..],
        &["devices"][..],
        &["explain"][..],
        &["explain", "--json"][..],
        &["check", "--bogus"][..],
        &["devices", "show"][..],
        &["frobnicate"][..],
    ] {
        let run = certmq(fx.dir.path(), args);
        assert_eq!(run.code, Some(2), "certmq {args:?}: {run:#?}");
        assert!(!run.stderr.is_empty(), "certmq {args:?}: {run:#?}");
        assert!(run.stdout.is_empty(), "certmq {args:?}: {run:#?}");
    }
}
