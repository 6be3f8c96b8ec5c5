//! ACL behaviour from contract §5: substitution, coverage (with an exhaustive cross-check
//! against plain matching), deny lists, `$SYS`, and the `v1/devices/me/` alias.

use super::*;

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn profile(publish: &[&str], subscribe: &[&str], deny_pub: &[&str], deny_sub: &[&str]) -> Profile {
    Profile::new(
        &strings(publish),
        &strings(subscribe),
        &strings(deny_pub),
        &strings(deny_sub),
    )
    .unwrap()
}

fn name(s: &str) -> TopicName {
    TopicName::parse(s).unwrap()
}

fn filter(s: &str) -> TopicFilter {
    TopicFilter::parse(s).unwrap()
}

#[test]
fn builtin_device_profile_is_the_spec_profile() {
    let spec = ["devices/{device}/#", "v1/devices/{device}/#"];
    assert_eq!(Profile::builtin_device(), profile(&spec, &spec, &[], &[]));
    assert_eq!(
        Profile::builtin_device().publish().collect::<Vec<_>>(),
        spec
    );
    assert_eq!(
        Profile::builtin_device().subscribe().collect::<Vec<_>>(),
        spec
    );
    assert_eq!(Profile::builtin_device().deny_publish().count(), 0);
    assert_eq!(Profile::builtin_device().deny_subscribe().count(), 0);
}

#[test]
fn placeholder_must_be_a_whole_level() {
    for (pattern, list) in [
        ("devices/dev-{device}/#", "publish"),
        ("devices/{device}x", "subscribe"),
        ("{device}{device}", "deny_publish"),
        ("a/{device}#", "deny_subscribe"),
    ] {
        let mut lists = [vec![], vec![], vec![], vec![]];
        let index = ["publish", "subscribe", "deny_publish", "deny_subscribe"]
            .iter()
            .position(|l| *l == list)
            .unwrap();
        lists[index].push(pattern.to_owned());
        assert_eq!(
            Profile::new(&lists[0], &lists[1], &lists[2], &lists[3]),
            Err(AclError::DevicePlaceholderNotWholeLevel {
                list,
                pattern: pattern.to_owned()
            })
        );
    }
    assert!(Profile::new(&strings(&["{device}/#", "a/{device}"]), &[], &[], &[]).is_ok());
    // Other braces are plain text.
    assert!(Profile::new(&strings(&["a/{dev}/{Device}"]), &[], &[], &[]).is_ok());
}

#[test]
fn invalid_filters_are_config_errors_with_cause() {
    let err = Profile::new(&[], &strings(&["ok/#", "a/#/b"]), &[], &[]).unwrap_err();
    assert_eq!(
        err,
        AclError::InvalidPattern {
            list: "subscribe",
            pattern: "a/#/b".to_owned(),
            source: TopicError::MisplacedWildcard { level: 1 },
        }
    );
    assert!(std::error::Error::source(&err).is_some());
    let err = Profile::new(&[], &[], &strings(&[""]), &[]).unwrap_err();
    assert!(matches!(
        err,
        AclError::InvalidPattern {
            list: "deny_publish",
            source: TopicError::Empty,
            ..
        }
    ));
}

#[test]
fn spec_coverage_examples_for_dev_1() {
    let pattern = "devices/dev-1/#";
    for covered in ["devices/dev-1/#", "devices/dev-1/+/x", "devices/dev-1"] {
        assert!(covers(pattern, covered), "{covered}");
    }
    for not_covered in [
        "devices/#",
        "devices/+/x",
        "#",
        "+/dev-1/x",
        "devices/dev-2/#",
    ] {
        assert!(!covers(pattern, not_covered), "{not_covered}");
    }
    let acl = Profile::builtin_device().for_device("dev-1");
    assert!(acl.can_subscribe(&filter("devices/dev-1/#")));
    assert!(acl.can_subscribe(&filter("devices/dev-1/+/x")));
    assert!(acl.can_subscribe(&filter("devices/dev-1")));
    assert!(acl.can_subscribe(&filter("v1/devices/dev-1/rpc/request/+")));
    assert!(!acl.can_subscribe(&filter("devices/#")));
    assert!(!acl.can_subscribe(&filter("devices/+/x")));
    assert!(!acl.can_subscribe(&filter("#")));
    assert!(!acl.can_subscribe(&filter("+/dev-1/x")));
    assert!(!acl.can_subscribe(&filter("devices/dev-10/#")));
}

#[test]
fn spec_coverage_examples_for_wildcard_patterns() {
    assert!(covers("#", "#"));
    assert!(covers("#", "+/x"));
    assert!(!covers("#", "$SYS/#"));
    assert!(!covers("#", "$SYS"));
    assert!(covers("$SYS/#", "$SYS/#"));
    assert!(covers("+", "+"));
    assert!(covers("+", "a"));
    assert!(!covers("+", "a/b"));
    assert!(!covers("+", "#"));
    assert!(!covers("+", "$x"));
    assert!(covers("a/+", "a/b"));
    assert!(covers("a/+", "a/+"));
    assert!(!covers("a/+", "a/#"));
    assert!(covers("a/#", "a"));
    assert!(covers("a/#", "a/#"));
    assert!(!covers("a", "+"));
    assert!(!covers("a/b", "a/b/c"));
    assert!(!covers("a/b/c", "a/b"));
    // A topic is never empty, so `+/#` is as broad as `#` and `/+/#` as `/#`.
    assert!(covers("+/#", "#"));
    assert!(covers("/+/#", "/#"));
    assert!(covers("+/+/#", "/#"));
    assert!(!covers("+/+/#", "#"));
    assert!(!covers("+/+/#", "+/#"));
    assert!(!covers("a/+/#", "a/#"));
    assert!(covers("a/+/#", "a/b"));
}

/// Every filter up to three levels over a small alphabet, including empty levels, a `$`
/// level and both wildcards.
fn all_filters() -> Vec<String> {
    let levels = ["a", "b", "", "$x", "+", "#"];
    let mut out: Vec<Vec<&str>> = vec![vec![]];
    let mut all = Vec::new();
    for _ in 0..3 {
        let mut next = Vec::new();
        for prefix in &out {
            for level in levels {
                let mut f = prefix.clone();
                f.push(level);
                let text = f.join("/");
                if TopicFilter::parse(&text).is_ok() {
                    all.push(text);
                }
                if level != "#" {
                    next.push(f);
                }
            }
        }
        out = next;
    }
    all
}

/// Every topic up to four levels (one more than the filters, so that a `#` can always be
/// told apart from a bounded pattern), with a level `z` no filter names.
fn all_topics() -> Vec<String> {
    let levels = ["a", "b", "", "$x", "z"];
    let mut out: Vec<String> = vec![];
    let mut frontier: Vec<String> = levels.iter().map(|l| (*l).to_owned()).collect();
    for _ in 0..4 {
        out.extend(frontier.iter().filter(|t| !t.is_empty()).cloned());
        frontier = frontier
            .iter()
            .flat_map(|t| levels.iter().map(move |l| format!("{t}/{l}")))
            .collect();
    }
    out
}

#[test]
fn covers_agrees_with_exhaustive_matching() {
    let filters = all_filters();
    let topics = all_topics();
    assert!(filters.len() > 150 && topics.len() > 700);
    let matched: Vec<Vec<bool>> = filters
        .iter()
        .map(|f| topics.iter().map(|t| filter_matches(f, t)).collect())
        .collect();
    let (mut covered, mut not_covered) = (0, 0);
    for (p, p_matches) in filters.iter().zip(&matched) {
        for (f, f_matches) in filters.iter().zip(&matched) {
            let expected = f_matches.iter().zip(p_matches).all(|(&fm, &pm)| !fm || pm);
            assert_eq!(covers(p, f), expected, "covers({p:?}, {f:?})");
            if expected {
                covered += 1;
            } else {
                not_covered += 1;
            }
        }
    }
    // Both outcomes must be exercised for the comparison to mean anything.
    assert!(
        covered > 1_000 && not_covered > 10_000,
        "{covered} {not_covered}"
    );
}

#[test]
fn granted_filters_only_deliver_allowed_topics() {
    let acl = profile(&[], &["a/#", "+/b"], &[], &["a/b/#"]).for_device("dev");
    let topics = all_topics();
    for f in all_filters() {
        if !acl.can_subscribe(&filter(&f)) {
            continue;
        }
        for t in topics.iter().filter(|t| filter_matches(&f, t)) {
            let denied = filter_matches("a/b/#", t);
            assert_eq!(acl.can_receive(&name(t)), !denied, "{f} {t}");
        }
    }
}

#[test]
fn deny_subscribe_refuses_covered_filters_and_filters_delivery() {
    let acl = profile(&[], &["#"], &[], &["admin/#"]).for_device("dev-1");
    assert!(acl.can_subscribe(&filter("#")));
    assert!(acl.can_subscribe(&filter("+/x")));
    assert!(acl.can_subscribe(&filter("adm/x")));
    assert!(!acl.can_subscribe(&filter("admin/#")));
    assert!(!acl.can_subscribe(&filter("admin/x")));
    assert!(!acl.can_subscribe(&filter("admin")));
    assert!(!acl.can_receive(&name("admin/x")));
    assert!(!acl.can_receive(&name("admin")));
    assert!(acl.can_receive(&name("adm/x")));
    assert!(acl.can_receive(&name("x/admin")));
}

#[test]
fn deny_publish_is_checked_first() {
    let acl = profile(&["#"], &[], &["devices/{device}/secret/#"], &[]).for_device("d");
    assert!(acl.can_publish(&name("devices/d/x")));
    assert!(!acl.can_publish(&name("devices/d/secret")));
    assert!(!acl.can_publish(&name("devices/d/secret/x")));
    assert!(acl.can_publish(&name("devices/e/secret/x")));
}

#[test]
fn publish_follows_substituted_patterns() {
    let acl = Profile::builtin_device().for_device("dev-1");
    assert!(acl.can_publish(&name("devices/dev-1/telemetry")));
    assert!(acl.can_publish(&name("devices/dev-1")));
    assert!(acl.can_publish(&name("v1/devices/dev-1/attributes")));
    assert!(!acl.can_publish(&name("devices/dev-2/telemetry")));
    assert!(!acl.can_publish(&name("devices/dev-10")));
    assert!(!acl.can_publish(&name("devices")));
    assert!(!acl.can_publish(&name("v1/devices/me/telemetry")));
}

#[test]
fn sys_topics_are_never_publishable() {
    let everything = profile(&["#", "$SYS/#", "$SYS"], &[], &[], &[]).for_device("d");
    assert!(!everything.can_publish(&name("$SYS/x")));
    assert!(!everything.can_publish(&name("$SYS")));
    assert!(everything.can_publish(&name("a")));
    let sys_only = profile(&["$SYS/#"], &[], &[], &[]).for_device("d");
    assert!(!sys_only.can_publish(&name("$SYS/broker/uptime")));
    let other_dollar = profile(&["$other/#"], &[], &[], &[]).for_device("d");
    assert!(other_dollar.can_publish(&name("$other/x")));
    assert!(!profile(&["#"], &[], &[], &[])
        .for_device("d")
        .can_publish(&name("$other/x")));
}

#[test]
fn subscribing_to_sys_needs_an_explicit_pattern() {
    let backend = profile(&[], &["#"], &[], &[]).for_device("backend");
    assert!(!backend.can_subscribe(&filter("$SYS/#")));
    let ops = profile(&[], &["#", "$SYS/#"], &[], &[]).for_device("ops");
    assert!(ops.can_subscribe(&filter("$SYS/#")));
    assert!(ops.can_receive(&name("$SYS/x")));
}

#[test]
fn name_that_would_widen_patterns_gets_an_empty_acl() {
    let p = Profile::builtin_device();
    for bad in ["", "+", "#", "a/b", "$SYS", "a\0"] {
        let acl = p.for_device(bad);
        assert_eq!(acl, DeviceAcl::default(), "{bad:?}");
        assert!(!acl.can_publish(&name("devices/x/y")));
        assert!(!acl.can_subscribe(&filter("devices/+/#")));
        assert!(!acl.can_receive(&name("devices/x/y")));
    }
}

#[test]
fn can_receive_follows_the_profile_after_reload() {
    let old = profile(&[], &["#"], &[], &[]).for_device("d");
    let new = Profile::builtin_device().for_device("d");
    assert!(old.can_subscribe(&filter("other/#")));
    assert!(!new.can_receive(&name("other/x")));
    assert!(new.can_receive(&name("devices/d/x")));
}

#[test]
fn alias_inbound_rewrites_only_the_me_prefix() {
    assert_eq!(
        alias_inbound("v1/devices/me/telemetry", "dev-1").as_deref(),
        Some("v1/devices/dev-1/telemetry")
    );
    assert_eq!(
        alias_inbound("v1/devices/me/rpc/request/+", "dev-1").as_deref(),
        Some("v1/devices/dev-1/rpc/request/+")
    );
    assert_eq!(
        alias_inbound("v1/devices/me/#", "dev-1").as_deref(),
        Some("v1/devices/dev-1/#")
    );
    assert_eq!(
        alias_inbound("v1/devices/me/", "dev-1").as_deref(),
        Some("v1/devices/dev-1/")
    );
    for untouched in [
        "v1/devices/me",
        "v1/devices/mee/x",
        "v1/devices/+/x",
        "v1/devices/dev-1/x",
        "x/v1/devices/me/x",
        "devices/me/x",
    ] {
        assert_eq!(alias_inbound(untouched, "dev-1"), None, "{untouched}");
    }
    assert_eq!(alias_inbound("v1/devices/me/x", "+"), None);
}

#[test]
fn alias_outbound_rewrites_only_this_devices_prefix() {
    assert_eq!(
        alias_outbound("v1/devices/dev-1/rpc/request/1", "dev-1").as_deref(),
        Some("v1/devices/me/rpc/request/1")
    );
    for untouched in [
        "v1/devices/dev-1",
        "v1/devices/dev-10/x",
        "v1/devices/dev-2/x",
        "v1/devices/dev/x",
        "devices/dev-1/x",
        "v1/devices/me/x",
    ] {
        assert_eq!(alias_outbound(untouched, "dev-1"), None, "{untouched}");
    }
    assert_eq!(alias_outbound("v1/devices/#/x", "#"), None);
}

#[test]
fn alias_then_acl_lets_thingsboard_firmware_work() {
    let acl = Profile::builtin_device().for_device("dev-1");
    let inbound = alias_inbound("v1/devices/me/telemetry", "dev-1").unwrap();
    assert!(acl.can_publish(&name(&inbound)));
    let sub = alias_inbound("v1/devices/me/rpc/request/+", "dev-1").unwrap();
    assert!(acl.can_subscribe(&filter(&sub)));
    let other = Profile::builtin_device().for_device("dev-2");
    assert!(!other.can_publish(&name(&inbound)));
}
