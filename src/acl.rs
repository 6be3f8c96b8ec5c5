//! Authorization (contract §5): ACL profiles from the config, `{device}` substitution, filter
//! coverage, and the ThingsBoard `v1/devices/me/` alias.
//!
//! A [`Profile`] is compiled once when the config is loaded, so a bad pattern is a config
//! error reported by `check`, never a surprise at CONNECT. At CONNECT the session turns its
//! profile into a [`DeviceAcl`] by substituting the device name; every PUBLISH and
//! SUBSCRIBE is then checked against that, with no allocation.
//!
//! Subscriptions are checked by *coverage*, not by matching: a filter is granted only when
//! every topic it could ever match is matched by one allowed pattern, so `devices/#` is
//! refused to a device allowed `devices/{device}/#` even though the two overlap. Deny lists
//! are checked first; a filter that only overlaps a denied pattern is granted, and the
//! router asks [`DeviceAcl::can_receive`] for each message so that denied topics are still
//! never delivered.
//!
//! The module is pure: no I/O, no locks.

use crate::mqtt::topic::{filter_matches, TopicError, TopicFilter, TopicName};

/// The placeholder replaced by the device name; it must fill one whole topic level so a
/// name can never be glued to other text (`dev-{device}`) in a way the operator did not
/// expect.
const DEVICE_PLACEHOLDER: &str = "{device}";

/// Patterns of the built-in `device` profile (contract §2): each device owns its own subtree
/// and its ThingsBoard subtree, nothing else.
const BUILTIN_DEVICE_PATTERNS: [&str; 2] = ["devices/{device}/#", "v1/devices/{device}/#"];

/// The topic prefix ThingsBoard firmware uses for "this device" (contract §5).
const ALIAS_ME_PREFIX: &str = "v1/devices/me/";

/// The topic prefix under which each device's own ThingsBoard topics live.
const ALIAS_DEVICES_PREFIX: &str = "v1/devices/";

/// The first level of the broker's own topics, which clients may never publish to.
const SYS_LEVEL: &str = "$SYS";

/// Why a profile from the config cannot be compiled. `list` names the config key
/// (`publish`, `subscribe`, `deny_publish` or `deny_subscribe`) so the message points at
/// the line to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// The pattern is not a valid MQTT topic filter once `{device}` is taken as text.
    #[error("ACL {list} pattern {pattern:?} is not a valid topic filter")]
    InvalidPattern {
        /// The config key holding the pattern.
        list: &'static str,
        /// The pattern as written in the config.
        pattern: String,
        /// What is wrong with it as a filter.
        #[source]
        source: TopicError,
    },
    /// `{device}` appears inside a level instead of being the whole level.
    #[error("ACL {list} pattern {pattern:?} uses {{device}} inside a topic level; it must be a whole level, as in \"devices/{{device}}/#\"")]
    DevicePlaceholderNotWholeLevel {
        /// The config key holding the pattern.
        list: &'static str,
        /// The pattern as written in the config.
        pattern: String,
    },
}

/// One validated pattern from the config, still holding `{device}`.
///
/// A newtype so that [`Profile`] can only hold patterns that passed both checks in
/// [`Pattern::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(String);

impl Pattern {
    /// Checks the placeholder rule, then the filter rules (on the text with `{device}` as
    /// a literal level, which is valid exactly when the substituted filter is valid, since
    /// device names hold no `/`, `+`, `#` or NUL).
    fn parse(list: &'static str, pattern: &str) -> Result<Self, AclError> {
        let glued = pattern
            .split('/')
            .any(|level| level != DEVICE_PLACEHOLDER && level.contains(DEVICE_PLACEHOLDER));
        if glued {
            return Err(AclError::DevicePlaceholderNotWholeLevel {
                list,
                pattern: pattern.to_owned(),
            });
        }
        TopicFilter::parse(pattern).map_err(|source| AclError::InvalidPattern {
            list,
            pattern: pattern.to_owned(),
            source,
        })?;
        Ok(Self(pattern.to_owned()))
    }

    /// The pattern with every `{device}` level replaced by `device`.
    fn substitute(&self, device: &str) -> String {
        self.0
            .split('/')
            .map(|level| {
                if level == DEVICE_PLACEHOLDER {
                    device
                } else {
                    level
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// Parses one config list, stopping at the first bad pattern.
fn parse_list(list: &'static str, patterns: &[String]) -> Result<Vec<Pattern>, AclError> {
    patterns
        .iter()
        .map(|pattern| Pattern::parse(list, pattern))
        .collect()
}

/// A compiled, validated ACL profile from the config (`[acl.NAME]`). Built once at config
/// load and shared by every device that uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Topics a device may publish to.
    publish: Vec<Pattern>,
    /// Patterns that must cover a filter for the subscription to be granted.
    subscribe: Vec<Pattern>,
    /// Checked before `publish`: a matching topic is refused.
    deny_publish: Vec<Pattern>,
    /// Checked before `subscribe`, and again per delivered message.
    deny_subscribe: Vec<Pattern>,
}

impl Profile {
    /// Compiles a profile; the first invalid pattern is returned as the error.
    pub fn new(
        publish: &[String],
        subscribe: &[String],
        deny_publish: &[String],
        deny_subscribe: &[String],
    ) -> Result<Profile, AclError> {
        Ok(Profile {
            publish: parse_list("publish", publish)?,
            subscribe: parse_list("subscribe", subscribe)?,
            deny_publish: parse_list("deny_publish", deny_publish)?,
            deny_subscribe: parse_list("deny_subscribe", deny_subscribe)?,
        })
    }

    /// The built-in `device` profile: publish and subscribe =
    /// `["devices/{device}/#", "v1/devices/{device}/#"]`, no deny lists.
    pub fn builtin_device() -> Profile {
        let patterns = || {
            BUILTIN_DEVICE_PATTERNS
                .iter()
                .map(|p| Pattern((*p).to_owned()))
                .collect::<Vec<_>>()
        };
        Profile {
            publish: patterns(),
            subscribe: patterns(),
            deny_publish: Vec::new(),
            deny_subscribe: Vec::new(),
        }
    }

    /// The `publish` patterns as written, for `certmq check`.
    pub fn publish(&self) -> impl Iterator<Item = &str> {
        self.publish.iter().map(|p| p.0.as_str())
    }

    /// The `subscribe` patterns as written, for `certmq check`.
    pub fn subscribe(&self) -> impl Iterator<Item = &str> {
        self.subscribe.iter().map(|p| p.0.as_str())
    }

    /// The `deny_publish` patterns as written, for `certmq check`.
    pub fn deny_publish(&self) -> impl Iterator<Item = &str> {
        self.deny_publish.iter().map(|p| p.0.as_str())
    }

    /// The `deny_subscribe` patterns as written, for `certmq check`.
    pub fn deny_subscribe(&self) -> impl Iterator<Item = &str> {
        self.deny_subscribe.iter().map(|p| p.0.as_str())
    }

    /// Substitutes the device name: the per-session ACL, built once per CONNECT.
    ///
    /// `device` must already satisfy the name rules of contract §3 step 6. As a second line of
    /// defence, a name that could change the shape of a pattern (empty, or holding `/`,
    /// `+`, `#`, NUL, or starting with `$`) yields an ACL that allows nothing, so a bug
    /// upstream can never turn `devices/{device}/#` into `devices/+/#`.
    pub fn for_device(&self, device: &str) -> DeviceAcl {
        if !is_single_literal_level(device) {
            return DeviceAcl::default();
        }
        let substitute = |list: &[Pattern]| -> Vec<String> {
            list.iter().map(|p| p.substitute(device)).collect()
        };
        DeviceAcl {
            publish: substitute(&self.publish),
            subscribe: substitute(&self.subscribe),
            deny_publish: substitute(&self.deny_publish),
            deny_subscribe: substitute(&self.deny_subscribe),
        }
    }
}

/// True when `device` can stand for exactly one literal topic level and leaves leading
/// wildcard rules untouched.
fn is_single_literal_level(device: &str) -> bool {
    !device.is_empty() && !device.starts_with('$') && !device.contains(['/', '+', '#', '\0'])
}

/// One session's ACL: the profile's patterns with the device name substituted.
///
/// The lists hold plain strings rather than [`TopicFilter`]s: each came from a validated
/// pattern and a validated name, so it is a valid filter (at worst longer than a topic
/// can be, and then it simply matches nothing). The default value allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceAcl {
    /// Filters a published topic may match.
    publish: Vec<String>,
    /// Filters that may cover a subscription.
    subscribe: Vec<String>,
    /// Filters whose matching topics may not be published to.
    deny_publish: Vec<String>,
    /// Filters whose covered subscriptions are refused and whose topics are never
    /// delivered.
    deny_subscribe: Vec<String>,
}

impl DeviceAcl {
    /// contract §5: denied if the topic matches a `deny_publish` pattern; allowed if it matches
    /// a `publish` pattern. The broker's own `$SYS` topics (`$SYS` and `$SYS/...`) are
    /// always denied, whatever the profile says.
    pub fn can_publish(&self, topic: &TopicName) -> bool {
        let topic = topic.as_str();
        if topic.split('/').next() == Some(SYS_LEVEL) {
            return false;
        }
        let matches = |p: &String| filter_matches(p, topic);
        !self.deny_publish.iter().any(matches) && self.publish.iter().any(matches)
    }

    /// contract §5: a filter is granted when every topic it can match is covered by one
    /// `subscribe` pattern, and it is not covered by a `deny_subscribe` pattern (a broader
    /// filter that only overlaps a deny pattern is granted; see [`Self::can_receive`]).
    pub fn can_subscribe(&self, filter: &TopicFilter) -> bool {
        let filter = filter.as_str();
        let covering = |p: &String| covers(p, filter);
        !self.deny_subscribe.iter().any(covering) && self.subscribe.iter().any(covering)
    }

    /// Per-message check for delivery to this session: false when the topic matches a
    /// `deny_subscribe` pattern.
    ///
    /// It is also false when no `subscribe` pattern matches the topic. For a filter granted
    /// by [`Self::can_subscribe`] that never happens (coverage implies it), but after a
    /// reload gives a live session a narrower profile (contract §8) its old subscriptions stop
    /// delivering what the new profile no longer allows.
    /// Whether [`Self::can_receive`] can refuse a topic of a granted subscription: only
    /// through `deny_subscribe`, since a reload removes the subscriptions a narrower profile
    /// no longer covers. Lets fan-out skip the per-message check for most profiles.
    pub fn filters_deliveries(&self) -> bool {
        !self.deny_subscribe.is_empty()
    }

    pub fn can_receive(&self, topic: &TopicName) -> bool {
        let topic = topic.as_str();
        let matches = |p: &String| filter_matches(p, topic);
        !self.deny_subscribe.iter().any(matches) && self.subscribe.iter().any(matches)
    }
}

/// True for `+` and `#`.
fn is_wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Filter coverage: true when every topic matched by `filter` is matched by `pattern`.
///
/// Both are expected to be valid topic filters. Level by level: a `#` in the pattern
/// covers whatever is left; a `+` covers one level of the filter, wildcard or not; a
/// literal covers only the same literal; a `#` in the filter (which can match any number of
/// levels) is covered only by a `#`. Two rules come from how topics match:
///
/// - a pattern starting with a wildcard matches no `$` topic, so it cannot cover a filter
///   whose first level is a literal starting with `$` (`#` does not cover `$SYS/#`);
/// - topic names are never empty, so the filters `#` and `/#` match at least one level
///   where their `#` stands: `+/#` covers `#`, and `/+/#` covers `/#`.
pub fn covers(pattern: &str, filter: &str) -> bool {
    let pattern_first = pattern.split('/').next().unwrap_or_default();
    let filter_first = filter.split('/').next().unwrap_or_default();
    if is_wildcard(pattern_first) && filter_first.starts_with('$') {
        return false;
    }
    // `#` also matches its parent level, except where that parent would be the empty
    // topic, which is not a valid topic name: there, it stands for one level or more.
    let hash_needs_a_level = filter == "#" || filter == "/#";
    let mut pattern_levels = pattern.split('/');
    let mut filter_levels = filter.split('/');
    loop {
        match (pattern_levels.next(), filter_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some("#")) if hash_needs_a_level => {
                return pattern_levels.next() == Some("#");
            }
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(p), Some(f)) if p == f => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// ThingsBoard alias, inbound (contract §5): `v1/devices/me/REST` becomes
/// `v1/devices/DEVICE/REST`. Apply it to PUBLISH topics and SUBSCRIBE filters (the filter
/// part of a shared subscription) before the ACL check.
///
/// Only the prefix `v1/devices/me/` is aliased, as contract §5 says: `v1/devices/me` itself,
/// `v1/devices/+/...` and every other topic give `None` and are used as they are. `None`
/// also for a device name that is not a single literal level (see
/// [`Profile::for_device`]).
pub fn alias_inbound(topic: &str, device: &str) -> Option<String> {
    // The prefix first: it fails for almost every PUBLISH, and costs less than the scan of
    // the device name.
    let rest = topic.strip_prefix(ALIAS_ME_PREFIX)?;
    if !is_single_literal_level(device) {
        return None;
    }
    Some(format!("{ALIAS_DEVICES_PREFIX}{device}/{rest}"))
}

/// ThingsBoard alias, outbound (contract §5): `v1/devices/DEVICE/REST` becomes
/// `v1/devices/me/REST`, for delivering to a session that subscribed through the `me`
/// alias. Other topics (another device's, or `v1/devices/DEVICE` itself) give `None`.
pub fn alias_outbound(topic: &str, device: &str) -> Option<String> {
    if !is_single_literal_level(device) {
        return None;
    }
    let rest = topic
        .strip_prefix(ALIAS_DEVICES_PREFIX)?
        .strip_prefix(device)?
        .strip_prefix('/')?;
    Some(format!("{ALIAS_ME_PREFIX}{rest}"))
}

#[cfg(test)]
mod tests;
