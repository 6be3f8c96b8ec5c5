//! Where a certificate becomes a device name (contract §3, steps 5 and 6).
//!
//! This module is pure: DER bytes and a compiled regex in, a [`DeviceName`] or a reason out.
//! No I/O and no async, so every hostile case (no CN, two CNs, non-UTF-8 text, NUL, MQTT
//! wildcards in the name, a regex that matches only part of the CN) is a plain unit test and
//! a fuzz target can call it directly.
//!
//! The device name ends up inside topic filters (`{device}` substitution in ACL profiles), so
//! the name rules are a security boundary: a CN such as `x/#` must be refused here, never
//! escaped or trimmed later. Nothing in this module converts text lossily: bytes that are not
//! the text they claim to be are refused, because a replacement character would let two
//! different certificates map to the same device.

use regex::Regex;
use x509_parser::asn1_rs::{Any, Class, Tag};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

/// Longest device name accepted, counted in Unicode scalar values (contract §3 step 6). Counted in
/// characters rather than bytes so that a non-ASCII name is not penalised for its encoding.
pub const MAX_NAME_CHARS: usize = 128;

/// A device name that obeys contract §3 step 6.
///
/// A newtype rather than a `String` so that the registry, the ACL `{device}` substitution and
/// the logs can only ever receive a name that went through [`DeviceName::parse`]: one that
/// cannot contain a topic separator, an MQTT wildcard, a NUL or a control character, and
/// cannot start with the `$` reserved for broker topics.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(String);

impl DeviceName {
    /// Checks `s` against the name rules and keeps it if it passes.
    ///
    /// The rules are checked in this order, so the error names the first problem an operator
    /// has to fix: empty, too long, forbidden character (first one found), leading `$`.
    pub fn parse(s: &str) -> Result<DeviceName, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let chars = s.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(NameError::TooLong { chars });
        }
        if let Some((position, ch)) = s.chars().enumerate().find(|&(_, ch)| is_forbidden(ch)) {
            return Err(NameError::ForbiddenChar { ch, position });
        }
        if s.starts_with('$') {
            return Err(NameError::LeadingDollar);
        }
        if s.trim() != s {
            return Err(NameError::SurroundingSpace);
        }
        Ok(DeviceName(s.to_owned()))
    }

    /// The name as text, for registry keys, ACL substitution and log fields.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Characters a device name must never contain: `/` would let `{device}` span topic levels,
/// `+` and `#` would turn a substituted ACL filter into a wildcard, and NUL and the other
/// control characters are forbidden in MQTT strings and would corrupt log lines. Unicode
/// format characters (Cf: zero-width spaces and joiners, bidi marks and overrides, the BOM)
/// and the line and paragraph separators are refused too (contract §3, "Names people can read"):
/// they make two different names look the same in `devices list` and in logs.
fn is_forbidden(ch: char) -> bool {
    if matches!(ch, '/' | '+' | '#') || ch.is_control() {
        return true;
    }
    if ch.is_ascii() {
        return false;
    }
    static INVISIBLE: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    // The pattern is a constant that compiles; were it ever not to, every non-ASCII
    // character is refused rather than an invisible one let through.
    INVISIBLE
        .get_or_init(|| Regex::new(r"^[\p{Cf}\p{Zl}\p{Zp}]$").ok())
        .as_ref()
        .is_none_or(|re| re.is_match(ch.encode_utf8(&mut [0; 4])))
}

/// Quoted and escaped, so that a name in a log field can never forge another field or line.
impl std::fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DeviceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Why a string is not a valid device name (contract §3 step 6).
///
/// Separate from [`IdentityError`] because the same rules also apply to names that do not
/// come from a certificate (pinned `[[device]]` entries in the configuration).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Zero characters, including a regex group that did not take part in the match.
    #[error("is empty")]
    Empty,
    /// More than [`MAX_NAME_CHARS`] characters.
    #[error("is {chars} characters long, the limit is {MAX_NAME_CHARS}")]
    TooLong {
        /// Length of the refused name in Unicode scalar values.
        chars: usize,
    },
    /// Contains `/`, `+`, `#`, NUL or another control character. `ch` is printed escaped
    /// (`'\0'`, `'\u{1b}'`) so the message itself cannot inject control bytes into a log.
    #[error("contains {ch:?} at position {position}")]
    ForbiddenChar {
        /// The first forbidden character found.
        ch: char,
        /// Its index in characters (not bytes), counted from 0.
        position: usize,
    },
    /// Starts with `$`, which MQTT reserves for broker topics such as `$SYS`.
    #[error("starts with '$', which is reserved for broker topics")]
    LeadingDollar,
    /// Starts or ends with white space: `pump-1` and `pump-1 ` would look the same.
    #[error("starts or ends with white space")]
    SurroundingSpace,
}

/// Why no device name could be derived from a leaf certificate (contract §3 steps 5 and 6).
///
/// Every variant is a refusal at CONNECT ("not authorized"); the variants exist so that the
/// decision log line can say which rule failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    /// The leaf's DER does not parse as an X.509 certificate.
    #[error("leaf certificate does not parse as X.509")]
    Certificate(#[source] X509Error),
    /// The leaf's DER parses but more bytes follow the certificate. Refused rather than
    /// ignored so that exactly one reading of the bytes exists.
    #[error("leaf certificate is followed by {len} unexpected bytes")]
    TrailingData {
        /// Number of bytes after the end of the certificate.
        len: usize,
    },
    /// The subject holds no commonName (OID 2.5.4.3) attribute.
    #[error("certificate subject has no common name (CN)")]
    NoCommonName,
    /// The subject holds more than one commonName attribute, in separate or multi-valued
    /// RDNs. Refused because picking one would make the name depend on the parser.
    #[error("certificate subject has {count} common names (CN), exactly one is required")]
    MultipleCommonNames {
        /// How many commonName attributes the subject holds.
        count: usize,
    },
    /// The commonName value is not text that decodes strictly to Unicode (invalid UTF-8,
    /// an unpaired surrogate, non-ASCII bytes in a legacy string type, or not a string).
    /// It carries no decoder error as its cause: the decoders' errors only give a byte
    /// offset or a code unit, nothing an operator can act on beyond "this CN is not text".
    #[error("certificate common name is not valid UTF-8 text")]
    CommonNameNotUtf8,
    /// `cn_regex` found no match in the CN.
    #[error("cn_regex does not match common name {cn:?}")]
    RegexMiss {
        /// The CN as decoded (printed escaped in the message).
        cn: String,
    },
    /// The text selected by `cn_regex` breaks the name rules.
    #[error("device name {name:?} taken from the common name is not allowed")]
    InvalidName {
        /// The text the regex selected (group 1 or the whole match).
        name: String,
        /// Which rule it breaks.
        #[source]
        source: NameError,
    },
}

/// The leaf certificate's single subject CN, as UTF-8 (contract §3 step 5).
///
/// Every commonName attribute of the subject is counted, across all RDNs including
/// multi-valued ones; exactly one is required. The issuer's CN never counts.
pub fn common_name(leaf_der: &[u8]) -> Result<String, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(leaf_der)
        .map_err(|e| IdentityError::Certificate(X509Error::from(e)))?;
    if !rest.is_empty() {
        return Err(IdentityError::TrailingData { len: rest.len() });
    }
    single_common_name(cert.subject())
}

/// The one commonName of `name`, decoded. Split from [`common_name`] so that tests can feed
/// it hand-built names (multi-valued RDNs) that certificate generators cannot produce.
fn single_common_name(name: &X509Name<'_>) -> Result<String, IdentityError> {
    let mut cns = name.iter_common_name();
    let first = cns.next().ok_or(IdentityError::NoCommonName)?;
    let others = cns.count();
    if others > 0 {
        return Err(IdentityError::MultipleCommonNames { count: others + 1 });
    }
    decode_directory_string(first.attr_value())
}

/// Decodes an attribute value to text without any lossy step.
///
/// UTF8String, PrintableString and IA5String must be valid UTF-8 (x509-parser does not check
/// the PrintableString and IA5String character sets, and neither do we: ASCII is a subset of
/// UTF-8, and anything else is refused). BMPString is UTF-16BE and UniversalString UTF-32BE,
/// both decoded strictly. The remaining legacy string types (TeletexString and friends) have
/// encodings we do not implement, so only their ASCII subset is accepted. A value that is not
/// a universal-class primitive string is refused.
fn decode_directory_string(value: &Any<'_>) -> Result<String, IdentityError> {
    if value.class() != Class::Universal || value.header.is_constructed() {
        return Err(IdentityError::CommonNameNotUtf8);
    }
    let data = value.as_bytes();
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => std::str::from_utf8(data)
            .map(str::to_owned)
            .map_err(|_invalid_utf8| IdentityError::CommonNameNotUtf8),
        Tag::BmpString => decode_utf16be(data),
        Tag::UniversalString => decode_utf32be(data),
        Tag::TeletexString
        | Tag::VideotexString
        | Tag::GraphicString
        | Tag::VisibleString
        | Tag::GeneralString
        | Tag::NumericString => {
            if data.is_ascii() {
                Ok(data.iter().copied().map(char::from).collect())
            } else {
                Err(IdentityError::CommonNameNotUtf8)
            }
        }
        _ => Err(IdentityError::CommonNameNotUtf8),
    }
}

/// Strict UTF-16BE: an odd length or an unpaired surrogate is refused.
fn decode_utf16be(data: &[u8]) -> Result<String, IdentityError> {
    if !data.len().is_multiple_of(2) {
        return Err(IdentityError::CommonNameNotUtf8);
    }
    let units = data
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .map_err(|_unpaired_surrogate| IdentityError::CommonNameNotUtf8)
}

/// Strict UTF-32BE: a length that is not a multiple of 4, a surrogate code point or a value
/// above U+10FFFF is refused.
fn decode_utf32be(data: &[u8]) -> Result<String, IdentityError> {
    if !data.len().is_multiple_of(4) {
        return Err(IdentityError::CommonNameNotUtf8);
    }
    data.chunks_exact(4)
        .map(|quad| char::from_u32(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]])))
        .collect::<Option<String>>()
        .ok_or(IdentityError::CommonNameNotUtf8)
}

/// Applies `cn_regex` to a CN and checks the result against the name rules (contract §3 steps 5
/// and 6).
///
/// The regex is SEARCHED, not matched whole (ThingsBoard semantics): `devices\.example\.com`
/// finds a match inside `evil.devices.example.com.attacker.net`. Operators anchor with
/// `^...$`. When the regex has at least one capture group the name is group 1, else the
/// whole match. A group 1 that did not take part in the match yields an empty name, which is
/// refused.
pub fn device_name(cn: &str, cn_regex: &Regex) -> Result<DeviceName, IdentityError> {
    let miss = || IdentityError::RegexMiss { cn: cn.to_owned() };
    let selected = if cn_regex.captures_len() > 1 {
        let captures = cn_regex.captures(cn).ok_or_else(miss)?;
        captures.get(1).map_or("", |group| group.as_str())
    } else {
        cn_regex.find(cn).ok_or_else(miss)?.as_str()
    };
    DeviceName::parse(selected).map_err(|source| IdentityError::InvalidName {
        name: selected.to_owned(),
        source,
    })
}

/// Both steps: the leaf's CN (returned too, for the decision log line) and the device name
/// derived from it.
pub fn device_name_from_leaf(
    leaf_der: &[u8],
    cn_regex: &Regex,
) -> Result<(String, DeviceName), IdentityError> {
    let cn = common_name(leaf_der)?;
    let name = device_name(&cn, cn_regex)?;
    Ok((cn, name))
}

#[cfg(test)]
mod tests;
