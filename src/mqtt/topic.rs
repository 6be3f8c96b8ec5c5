//! Topic names, topic filters and wildcard matching (MQTT 3.1.1 and 5.0, section 4.7).
//!
//! Everything that reaches the router or the ACL as a topic is parsed here first, so code
//! further in never sees a wildcard in a published topic, a `#` in the middle of a filter,
//! or a NUL. The module is pure: no I/O, no allocation beyond the parsed strings.
//!
//! One rule is easy to miss and matters for security: a topic whose first character is `$`
//! (for example `$SYS/...`) is not matched by a filter whose first level is `+` or `#`, so a
//! client subscribed to `#` never sees the broker's own topics.

use std::fmt;

/// Longest topic or filter MQTT can carry: its UTF-8 strings have a 16-bit length prefix.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Prefix that marks an MQTT 5 shared subscription (`$share/GROUP/filter`); certmq honours
/// it for MQTT 3.1.1 clients too (contract §6).
const SHARE_PREFIX: &str = "$share/";

/// Why a string is not a valid topic name, topic filter or subscription.
///
/// Each variant maps to one protocol outcome chosen by the session (v5: 0x90 "Topic Name
/// invalid" for a PUBLISH, 0x8F "Topic Filter invalid" for a SUBSCRIBE).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// MQTT forbids empty topic names and filters (3.1.1 §4.7.3).
    #[error("topic is empty")]
    Empty,
    /// The string cannot be encoded with MQTT's 16-bit length prefix.
    #[error("topic is {len} bytes long, the limit is {MAX_TOPIC_LEN}")]
    TooLong {
        /// The length that was refused, in bytes.
        len: usize,
    },
    /// MQTT strings must not contain U+0000 (3.1.1 §1.5.3).
    #[error("topic contains a NUL character")]
    Nul,
    /// A published topic name may not contain `+` or `#` (3.1.1 §4.7.1).
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// `+` must fill a whole level and `#` must be the whole last level.
    #[error("misplaced wildcard in topic filter level {level} (counting from 0)")]
    MisplacedWildcard {
        /// Index of the offending level, counting from 0.
        level: usize,
    },
    /// The share name of `$share/GROUP/filter` is empty or holds a wildcard.
    #[error("shared subscription group name is empty or contains a wildcard")]
    SharedGroupInvalid,
    /// `$share/GROUP` with nothing after the group: there is no filter to subscribe to.
    #[error("shared subscription has no topic filter after the group name")]
    SharedFilterMissing,
    /// The filter part of `$share/GROUP/filter` is itself invalid.
    #[error("shared subscription filter is invalid")]
    SharedFilterInvalid {
        /// What is wrong with the filter part (boxed: the enum refers to itself).
        #[source]
        source: Box<TopicError>,
    },
}

/// Checks shared by names and filters: not empty, fits the length prefix, no NUL.
fn check_string(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: s.len() });
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// A topic name as published: no wildcards, no NUL, 1 to 65,535 bytes of UTF-8.
///
/// A newtype so that a PUBLISH topic can only reach the ACL and the router after parsing;
/// the inner string is private for the same reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    /// Parses a published topic name.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        Self::check(s)?;
        Ok(Self(s.to_owned()))
    }

    /// [`TopicName::parse`] of a string the caller owns, kept without a copy (the PUBLISH
    /// hot path: the topic the codec decoded becomes the message's). An error hands the
    /// string back, for the message that names it.
    pub fn parse_owned(s: String) -> Result<Self, (TopicError, String)> {
        match Self::check(&s) {
            Ok(()) => Ok(Self(s)),
            Err(e) => Err((e, s)),
        }
    }

    fn check(s: &str) -> Result<(), TopicError> {
        // Every PUBLISH comes through here: one pass over the bytes for a valid name (three
        // `contains` searches were 5% of a fan-in's instructions); the checks below, which
        // say what is wrong, only for a name that fails it.
        if !s.is_empty()
            && s.len() <= MAX_TOPIC_LEN
            && !s.bytes().any(|b| matches!(b, 0 | b'+' | b'#'))
        {
            return Ok(());
        }
        check_string(s)?;
        if s.contains(['+', '#']) {
            return Err(TopicError::WildcardInName);
        }
        Ok(())
    }

    /// The topic as it travels on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for topics starting with `$` (broker-owned, e.g. `$SYS/...`), which leading
    /// wildcards do not match.
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A subscription filter: `+` only as a whole level, `#` only as the whole last level.
///
/// A newtype so that matching and ACL coverage can rely on the wildcard placement rules
/// without re-checking them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Parses a topic filter. `$share/...` is not treated specially here: use
    /// [`Subscription::parse`] for what a SUBSCRIBE packet carries.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        check_string(s)?;
        let mut levels = s.split('/').enumerate().peekable();
        while let Some((index, level)) = levels.next() {
            let is_last = levels.peek().is_none();
            let misplaced = match level {
                "+" => false,
                "#" => !is_last,
                _ => level.contains(['+', '#']),
            };
            if misplaced {
                return Err(TopicError::MisplacedWildcard { level: index });
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// The filter as it travels on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when a message published on `topic` must be delivered to this filter.
    pub fn matches(&self, topic: &TopicName) -> bool {
        filter_matches(&self.0, &topic.0)
    }

    /// True when the filter contains `+` or `#`, i.e. it can match more than one topic.
    /// The router uses this to look exact filters up directly.
    pub fn has_wildcards(&self) -> bool {
        self.0.split('/').any(|level| level == "+" || level == "#")
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TopicFilter {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// What a SUBSCRIBE entry asks for: a plain filter, or a shared subscription whose
/// messages are spread over the members of `group`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subscription {
    /// An ordinary subscription: every matching message goes to this session.
    Plain(TopicFilter),
    /// `$share/GROUP/filter`: each matching message goes to one member of the group.
    Shared {
        /// The share name: non-empty, without `/`, `+` or `#` (MQTT 5 §4.8.2).
        group: String,
        /// The filter after the group; ACLs and matching apply to it, not to the prefix.
        filter: TopicFilter,
    },
}

impl Subscription {
    /// Parses a SUBSCRIBE entry. Only the exact prefix `$share/` marks a shared
    /// subscription (as in Mosquitto); `$share` alone or `$shared/x` are plain filters.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        check_string(s)?;
        let Some(rest) = s.strip_prefix(SHARE_PREFIX) else {
            return TopicFilter::parse(s).map(Self::Plain);
        };
        let Some((group, filter)) = rest.split_once('/') else {
            return Err(TopicError::SharedFilterMissing);
        };
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(TopicError::SharedGroupInvalid);
        }
        let filter =
            TopicFilter::parse(filter).map_err(|source| TopicError::SharedFilterInvalid {
                source: Box::new(source),
            })?;
        Ok(Self::Shared {
            group: group.to_owned(),
            filter,
        })
    }

    /// The filter to match topics against and to check against the ACL.
    pub fn filter(&self) -> &TopicFilter {
        match self {
            Self::Plain(filter) | Self::Shared { filter, .. } => filter,
        }
    }
}

/// True for the two wildcard levels; as a filter's first level, either one keeps the
/// filter away from `$` topics.
fn is_wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Level-wise MQTT matching of `topic` against `filter`, shared by
/// [`TopicFilter::matches`] and the ACL (whose patterns are filters built from config).
///
/// Both strings are expected to be valid (a filter and a topic name); on other input the
/// answer is still deterministic but meaningless. Rules: `+` matches exactly one level,
/// possibly empty; `#` matches the rest, including nothing (`a/#` matches `a`); empty
/// levels are significant (`a//b` is three levels); a topic starting with `$` is not
/// matched when the filter's first level is a wildcard.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    if topic.starts_with('$') && filter.split('/').next().is_some_and(is_wildcard) {
        return false;
    }
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests;
