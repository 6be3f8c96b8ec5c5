//! Parsing and matching rules of MQTT 3.1.1 / 5.0 §4.7, including the hostile and edge
//! cases (empty levels, `$` topics, wildcards glued to text).

use super::*;

fn name(s: &str) -> TopicName {
    TopicName::parse(s).unwrap()
}

fn filter(s: &str) -> TopicFilter {
    TopicFilter::parse(s).unwrap()
}

#[test]
fn topic_name_accepts_plain_topics() {
    for s in ["a", "/", "a/b", "a//b", "/a", "a/", "$SYS/x", "é/ü", " "] {
        assert_eq!(TopicName::parse(s).unwrap().as_str(), s);
    }
}

#[test]
fn topic_name_refuses_wildcards_nul_and_empty() {
    assert_eq!(TopicName::parse(""), Err(TopicError::Empty));
    assert_eq!(TopicName::parse("a/+"), Err(TopicError::WildcardInName));
    assert_eq!(TopicName::parse("#"), Err(TopicError::WildcardInName));
    assert_eq!(TopicName::parse("a#b"), Err(TopicError::WildcardInName));
    assert_eq!(TopicName::parse("a\0b"), Err(TopicError::Nul));
}

#[test]
fn length_limit_is_in_bytes() {
    let at_limit = "a".repeat(MAX_TOPIC_LEN);
    assert!(TopicName::parse(&at_limit).is_ok());
    assert!(TopicFilter::parse(&at_limit).is_ok());
    let over = "a".repeat(MAX_TOPIC_LEN + 1);
    let expected = Err(TopicError::TooLong {
        len: MAX_TOPIC_LEN + 1,
    });
    assert_eq!(TopicName::parse(&over), expected);
    assert_eq!(TopicFilter::parse(&over).map(|_| ()), expected.map(|_| ()));
    // 'é' is two bytes: 32,768 of them exceed the limit although the char count does not.
    let wide = "é".repeat(32_768);
    assert_eq!(
        TopicName::parse(&wide),
        Err(TopicError::TooLong { len: 65_536 })
    );
}

#[test]
fn is_system_means_leading_dollar() {
    assert!(name("$SYS/broker").is_system());
    assert!(name("$x").is_system());
    assert!(!name("a/$SYS").is_system());
    assert!(!name("/$SYS").is_system());
}

#[test]
fn filter_accepts_well_placed_wildcards() {
    for s in [
        "#", "+", "+/+", "a/#", "a/+/b", "+/#", "/#", "a//+", "$SYS/#", "a/b", "//",
    ] {
        assert_eq!(filter(s).as_str(), s);
    }
}

#[test]
fn filter_refuses_misplaced_wildcards_with_level() {
    let cases = [
        ("a/#/b", 1),
        ("#/a", 0),
        ("a+", 0),
        ("a/b+", 1),
        ("a/+b/c", 1),
        ("a/b#", 1),
        ("##", 0),
        ("++", 0),
        ("a/b/c/#x", 3),
        ("#/#", 0),
    ];
    for (s, level) in cases {
        assert_eq!(
            TopicFilter::parse(s),
            Err(TopicError::MisplacedWildcard { level }),
            "{s}"
        );
    }
    assert_eq!(TopicFilter::parse(""), Err(TopicError::Empty));
    assert_eq!(TopicFilter::parse("a/\0"), Err(TopicError::Nul));
}

#[test]
fn has_wildcards_only_for_wildcard_levels() {
    assert!(filter("#").has_wildcards());
    assert!(filter("a/+/b").has_wildcards());
    assert!(!filter("a/b").has_wildcards());
    assert!(!filter("$share").has_wildcards());
}

#[test]
fn multi_level_wildcard_matches_parent_and_descendants() {
    let f = filter("sport/#");
    assert!(f.matches(&name("sport")));
    assert!(f.matches(&name("sport/")));
    assert!(f.matches(&name("sport/x")));
    assert!(f.matches(&name("sport/x/y")));
    assert!(!f.matches(&name("sports")));
    assert!(!f.matches(&name("spor")));
    assert!(!f.matches(&name("/sport")));
    assert!(filter("#").matches(&name("a/b/c")));
    assert!(filter("#").matches(&name("/")));
}

#[test]
fn single_level_wildcard_matches_exactly_one_level() {
    assert!(filter("+/+").matches(&name("/x")));
    assert!(filter("+/+").matches(&name("a/")));
    assert!(filter("+/+").matches(&name("/")));
    assert!(!filter("+/+").matches(&name("a")));
    assert!(!filter("+/+").matches(&name("a/b/c")));
    assert!(filter("+").matches(&name("a")));
    assert!(!filter("+").matches(&name("/a")));
    assert!(filter("a/+/c").matches(&name("a//c")));
    assert!(!filter("a/+/c").matches(&name("a/c")));
    assert!(filter("+/#").matches(&name("a")));
    assert!(!filter("a/+/#").matches(&name("a")));
    assert!(filter("a/+/#").matches(&name("a/b")));
}

#[test]
fn empty_levels_are_significant() {
    assert!(filter("a//b").matches(&name("a//b")));
    assert!(!filter("a/b").matches(&name("a//b")));
    assert!(!filter("a//b").matches(&name("a/b")));
    assert!(!filter("a").matches(&name("a/")));
    assert!(!filter("a/").matches(&name("a")));
    assert!(filter("/+").matches(&name("/x")));
}

#[test]
fn exact_filters_compare_whole_levels() {
    assert!(filter("a/b").matches(&name("a/b")));
    assert!(!filter("a/b").matches(&name("a/bc")));
    assert!(!filter("a/b").matches(&name("a/b/c")));
    assert!(!filter("a/b/c").matches(&name("a/b")));
    assert!(!filter("A/b").matches(&name("a/b")));
}

#[test]
fn leading_wildcards_do_not_match_dollar_topics() {
    assert!(!filter("#").matches(&name("$SYS/x")));
    assert!(!filter("+/x").matches(&name("$SYS/x")));
    assert!(!filter("+").matches(&name("$x")));
    assert!(!filter("+/#").matches(&name("$SYS")));
    assert!(filter("$SYS/#").matches(&name("$SYS/x")));
    assert!(filter("$SYS/#").matches(&name("$SYS")));
    assert!(filter("$SYS/+").matches(&name("$SYS/x")));
    // Only the first level is special: a `$` deeper in the topic is ordinary text.
    assert!(filter("a/+").matches(&name("a/$x")));
    assert!(filter("a/#").matches(&name("a/$SYS/x")));
}

#[test]
fn plain_subscription_keeps_filter() {
    let sub = Subscription::parse("a/+").unwrap();
    assert_eq!(sub, Subscription::Plain(filter("a/+")));
    assert_eq!(sub.filter().as_str(), "a/+");
}

#[test]
fn shared_subscription_splits_group_and_filter() {
    let sub = Subscription::parse("$share/workers/jobs/#").unwrap();
    assert_eq!(
        sub,
        Subscription::Shared {
            group: "workers".to_owned(),
            filter: filter("jobs/#"),
        }
    );
    assert_eq!(sub.filter().as_str(), "jobs/#");
    let sub = Subscription::parse("$share/g//").unwrap();
    assert_eq!(sub.filter().as_str(), "/");
}

#[test]
fn shared_subscription_refuses_bad_group_or_filter() {
    assert_eq!(
        Subscription::parse("$share/"),
        Err(TopicError::SharedFilterMissing)
    );
    assert_eq!(
        Subscription::parse("$share/g"),
        Err(TopicError::SharedFilterMissing)
    );
    assert_eq!(
        Subscription::parse("$share//a"),
        Err(TopicError::SharedGroupInvalid)
    );
    assert_eq!(
        Subscription::parse("$share/+/a"),
        Err(TopicError::SharedGroupInvalid)
    );
    assert_eq!(
        Subscription::parse("$share/g#/a"),
        Err(TopicError::SharedGroupInvalid)
    );
    assert_eq!(
        Subscription::parse("$share/g/"),
        Err(TopicError::SharedFilterInvalid {
            source: Box::new(TopicError::Empty)
        })
    );
    assert_eq!(
        Subscription::parse("$share/g/a/#/b"),
        Err(TopicError::SharedFilterInvalid {
            source: Box::new(TopicError::MisplacedWildcard { level: 1 })
        })
    );
    assert_eq!(Subscription::parse("$share/g/\0"), Err(TopicError::Nul));
}

#[test]
fn shared_filter_error_keeps_its_cause() {
    let err = Subscription::parse("$share/g/a#").unwrap_err();
    let cause = std::error::Error::source(&err).unwrap();
    assert_eq!(
        cause.to_string(),
        TopicError::MisplacedWildcard { level: 0 }.to_string()
    );
}

#[test]
fn only_the_exact_share_prefix_is_shared() {
    assert!(matches!(
        Subscription::parse("$share").unwrap(),
        Subscription::Plain(_)
    ));
    assert!(matches!(
        Subscription::parse("$shared/g/a").unwrap(),
        Subscription::Plain(_)
    ));
    assert!(matches!(
        Subscription::parse("$SHARE/g/a").unwrap(),
        Subscription::Plain(_)
    ));
}

#[test]
fn filter_matches_works_on_raw_strings() {
    assert!(filter_matches("devices/dev-1/#", "devices/dev-1/x"));
    assert!(!filter_matches("devices/dev-1/#", "devices/dev-2/x"));
    assert!(!filter_matches("#", "$SYS"));
}
