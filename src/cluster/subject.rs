//! MQTT topics and filters as NATS subjects, with the mapping nats-server's own MQTT
//! support uses, so that a NATS-native backend reading `<prefix>.m.>` / `<prefix>.q.>`
//! sees the subjects it would see from nats-server (docs/cluster.md, "Subjects").
//!
//! Topic -> subject, one character at a time:
//! - `/` between two levels becomes `.`;
//! - an empty level (a `/` at the start, at the end, or next to another `/`) becomes the
//!   token `/`, so no NATS token is empty (`/a` -> `/.a`, `a/` -> `a./`, `a//b` -> `a./.b`);
//! - `.` becomes `//` (a `.` separates tokens in NATS);
//! - whitespace cannot be carried (NATS subjects have none), nor a level that is exactly
//!   `*` or `>` (a NATS wildcard), nor a subject over [`MAX_SUBJECT`] bytes: such topics
//!   are [`Unmappable`].
//!
//! Filters map the same way with `+` -> `*` and `#` -> `>`; `a/#` also matches `a`
//! itself in MQTT, so it becomes two subjects, `a` and `a.>`.

/// A topic or filter that has no NATS subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmappable {
    #[error("topic {0:?} contains white space, which a NATS subject cannot carry")]
    WhiteSpace(String),
    #[error("topic {0:?} has a level '*' or '>', which would be a NATS wildcard")]
    WildcardLevel(String),
    #[error("topic of {0} bytes maps to a NATS subject longer than {MAX_SUBJECT} bytes")]
    TooLong(usize),
}

/// The longest subject a topic or filter may map to. nats-server closes the connection of
/// a client that sends a protocol line over `max_control_line` (4,096 bytes by default)
/// (`-ERR 'maximum control line exceeded'`), and the client sends its subscriptions again
/// after every reconnect: one subscription to a longer filter kept a node off NATS. The
/// longest line a subject goes into is a JetStream consumer creation (`$JS.API.CONSUMER.
/// CREATE.<stream>.<consumer>.<subject>` plus a reply inbox) or an `HPUB` with the prefix
/// and sizes: with the prefix at most 32 bytes (config), 3 KiB leaves room for all of it.
pub const MAX_SUBJECT: usize = 3072;

/// The subject for a topic name (no wildcards in `topic`; it was validated as a topic).
pub fn topic_to_subject(topic: &str) -> Result<String, Unmappable> {
    map(topic, false).map(|mut v| v.remove(0))
}

/// Whether [`topic_to_subject`] maps `topic`, without building the subject: asked for every
/// stored message on its way through the router.
pub fn mappable(topic: &str) -> bool {
    let mut len = 0usize;
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            len += 1;
        }
        match level {
            "" => len += 1,
            "*" | ">" => return false,
            _ => {
                for c in level.chars() {
                    if c.is_whitespace() {
                        return false;
                    }
                    len += if c == '.' { 2 } else { c.len_utf8() };
                }
            }
        }
    }
    len <= MAX_SUBJECT
}

/// The subjects a filter covers: one, or two for a trailing `#` after a level.
pub fn filter_to_subjects(filter: &str) -> Result<Vec<String>, Unmappable> {
    map(filter, true)
}

fn map(text: &str, filter: bool) -> Result<Vec<String>, Unmappable> {
    if text.chars().any(char::is_whitespace) {
        return Err(Unmappable::WhiteSpace(text.to_owned()));
    }
    let mut out = String::with_capacity(text.len() + 4);
    let mut levels = text.split('/').peekable();
    let mut parent = None;
    while let Some(level) = levels.next() {
        match level {
            // An empty level is the token `/`, so no NATS token is empty.
            "" => out.push('/'),
            "+" if filter => out.push('*'),
            "#" if filter => {
                // `a/#` matches `a` too: the subject without the trailing `.>`.
                if !out.is_empty() {
                    parent = Some(out[..out.len() - 1].to_owned());
                }
                out.push('>');
            }
            "*" | ">" => return Err(Unmappable::WildcardLevel(text.to_owned())),
            _ => {
                for c in level.chars() {
                    if c == '.' {
                        out.push_str("//");
                    } else {
                        out.push(c);
                    }
                }
            }
        }
        if levels.peek().is_some() {
            out.push('.');
        }
    }
    if out.len() > MAX_SUBJECT {
        return Err(Unmappable::TooLong(text.len()));
    }
    Ok(parent.into_iter().chain([out]).collect())
}

/// The topic a subject stands for (the inverse of [`topic_to_subject`]).
pub fn subject_to_topic(subject: &str) -> String {
    let mut out = String::with_capacity(subject.len());
    for (i, token) in subject.split('.').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if token != "/" {
            out.push_str(&token.replace("//", "."));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topic or filter whose subject would exceed [`MAX_SUBJECT`] is refused, and
    /// [`mappable`] agrees with [`topic_to_subject`] on every case.
    #[test]
    fn subjects_longer_than_the_limit_are_refused() {
        let fits = format!("a/{}", "x".repeat(MAX_SUBJECT - 2));
        let over = format!("a/{}", "x".repeat(MAX_SUBJECT - 1));
        let dots = format!("a/{}", ".".repeat(MAX_SUBJECT / 2));
        assert!(topic_to_subject(&fits).is_ok());
        assert_eq!(
            topic_to_subject(&over),
            Err(Unmappable::TooLong(over.len()))
        );
        assert!(topic_to_subject(&dots).is_err(), "each '.' takes two bytes");
        assert!(filter_to_subjects(&format!("{over}/#")).is_err());
        assert!(filter_to_subjects(&format!("long/{}", "x".repeat(5000))).is_err());
        for topic in [
            fits.as_str(),
            over.as_str(),
            dots.as_str(),
            "a/b",
            "/a//b/",
            "a b",
            "a/*/b",
            "a/>",
            "x.y/z",
            "ü/ñ",
            "",
        ] {
            assert_eq!(
                mappable(topic),
                topic_to_subject(topic).is_ok(),
                "{topic:?}"
            );
        }
    }

    /// The conversion table of nats-server's MQTT documentation, and the round trip.
    #[test]
    fn topics_map_as_nats_server_maps_them() {
        for (topic, subject) in [
            ("sensors/cold-1/temp", "sensors.cold-1.temp"),
            ("/sensors/temp", "/.sensors.temp"),
            ("sensors/temp/", "sensors.temp./"),
            ("sensors//temp", "sensors./.temp"),
            ("//sensors/temp", "/./.sensors.temp"),
            ("cold-1.temp", "cold-1//temp"),
            ("spBv1.0/plant1", "spBv1//0.plant1"),
            ("a", "a"),
            ("$SYS/x", "$SYS.x"),
            ("v1/devices/dev-1/telemetry", "v1.devices.dev-1.telemetry"),
            ("ü/ñ", "ü.ñ"),
        ] {
            assert_eq!(topic_to_subject(topic).as_deref(), Ok(subject), "{topic}");
            assert_eq!(subject_to_topic(subject), topic, "{subject}");
        }
    }

    #[test]
    fn filters_map_wildcards_and_the_parent_of_a_trailing_hash() {
        for (filter, subjects) in [
            ("a/+/c", vec!["a.*.c"]),
            ("#", vec![">"]),
            ("a/#", vec!["a", "a.>"]),
            ("+/#", vec!["*", "*.>"]),
            ("/+", vec!["/.*"]),
            ("a.b/#", vec!["a//b", "a//b.>"]),
        ] {
            assert_eq!(
                filter_to_subjects(filter),
                Ok(subjects.iter().map(|s| s.to_string()).collect()),
                "{filter}"
            );
        }
    }

    #[test]
    fn what_a_subject_cannot_carry_is_refused() {
        assert!(matches!(
            topic_to_subject("a b"),
            Err(Unmappable::WhiteSpace(_))
        ));
        assert!(matches!(
            topic_to_subject("a\tb"),
            Err(Unmappable::WhiteSpace(_))
        ));
        assert!(matches!(
            topic_to_subject("a/*/b"),
            Err(Unmappable::WildcardLevel(_))
        ));
        assert!(matches!(
            topic_to_subject("a/>"),
            Err(Unmappable::WildcardLevel(_))
        ));
        assert!(matches!(
            filter_to_subjects("a/>"),
            Err(Unmappable::WildcardLevel(_))
        ));
        // `+` and `#` are literal characters in a topic name level.
        assert_eq!(topic_to_subject("a+b").as_deref(), Ok("a+b"));
    }

    /// Round trip over generated topics of the awkward characters.
    #[test]
    fn every_mappable_topic_round_trips() {
        let alphabet = ['a', '/', '.', '$', '-'];
        let mut topics = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for t in &topics {
                for c in alphabet {
                    next.push(format!("{t}{c}"));
                }
            }
            topics.extend(next.clone());
            topics = next.into_iter().chain(topics).collect();
            topics.sort();
            topics.dedup();
        }
        for topic in topics.iter().filter(|t| !t.is_empty()) {
            let subject = topic_to_subject(topic).unwrap();
            assert!(
                !subject.split('.').any(str::is_empty),
                "{topic} -> {subject}"
            );
            assert_eq!(&subject_to_topic(&subject), topic, "{topic} -> {subject}");
        }
    }
}
