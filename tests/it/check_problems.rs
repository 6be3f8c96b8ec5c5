//! `check` = `serve` for a broken config file (contract §1, 2): every problem at once, each on
//! one line naming the file and the field, with line and column for what the TOML layer
//! finds (syntax errors, unknown keys, values of the wrong type); an unknown key or a
//! syntax error no longer hides the other problems, and `serve` refuses with the same list.

use crate::common::run::{arg, certmq, Run};
use crate::common::Fixture;

/// The problem lines of a refused run: after the header, one per problem, each naming
/// the file.
fn problem_lines(run: &Run, file: &str) -> Vec<String> {
    assert_eq!(run.code, Some(1), "{run:#?}");
    let mut lines = run.stderr.lines();
    let header = lines.next().expect("header");
    assert!(header.contains("problem(s) in"), "{header}");
    lines
        .map(|l| {
            assert!(
                l.starts_with(&format!("  {file}: ")),
                "not one problem per line naming the file: {l:?}\n{}",
                run.stderr
            );
            l.to_owned()
        })
        .collect()
}

#[test]
fn every_problem_is_reported_at_once_by_check_and_serve() {
    let fx = Fixture::new();
    let path = fx.write(
        "certmq.toml",
        r#"[server]
bind = "127.0.0.1:0"
cert_chain = "server.pem"
private_key = "server.key"
data_dir = "data"
admin = "127.0.0.1:9883"

[limits]
max_connections = "many"

[[anchor]]
name = "fleet"
certificate = "missing.pem"
cn_regex = '^(.+'
create_device = true
acl = "sensors"
"#,
    );
    let file = arg(&path);
    let expected = [
        "server.admin (line 6, column 1): unknown key",
        "limits (line 9, column 19): invalid type: string \"many\", expected usize",
        "anchor[0].create_device (line 15, column 1): unknown key (did you mean `create_devices`?)",
        "anchor[0] \"fleet\".acl: ACL profile \"sensors\" is not defined",
        "anchor[0] \"fleet\".cn_regex: invalid regular expression",
        "anchor[0] \"fleet\".certificate: cannot read",
    ];
    for command in ["check", "serve"] {
        let run = certmq(fx.dir.path(), &[command, "--config", file]);
        let lines = problem_lines(&run, file);
        assert_eq!(lines.len(), expected.len(), "{command}: {lines:#?}");
        for e in expected {
            assert!(
                lines.iter().any(|l| l.contains(e)),
                "{command}: {e:?} missing in {lines:#?}"
            );
        }
    }
}

#[test]
fn syntax_errors_are_reported_with_line_and_column() {
    let fx = Fixture::new();
    let path = fx.write(
        "certmq.toml",
        "[server]\nbind = \"127.0.0.1:0\ncert_chain = \"server.pem\"\nprivate_key =\ndata_dir = \"data\"\n",
    );
    let file = arg(&path);
    let run = certmq(fx.dir.path(), &["check", "--config", file]);
    let lines = problem_lines(&run, file);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].contains("line 2, column 20: invalid TOML:"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains("line 4, column 14: invalid TOML:"),
        "{lines:#?}"
    );
}

#[test]
fn an_unknown_key_before_a_syntax_error_is_reported_with_it() {
    let fx = Fixture::new();
    let path = fx.write(
        "certmq.toml",
        "[server]\nbnd = \"127.0.0.1:0\"\ncert_chain = \"server.pem\"\n\n[limits\n",
    );
    let file = arg(&path);
    let run = certmq(fx.dir.path(), &["check", "--config", file]);
    let lines = problem_lines(&run, file);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].contains("server.bnd (line 2, column 1): unknown key (did you mean `bind`?)"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains("line 5, column 8: invalid TOML"),
        "{lines:#?}"
    );
}
