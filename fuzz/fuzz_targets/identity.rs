//! Arbitrary bytes as a certificate: extracting the Common Name and deriving the device name
//! from it must never panic, whatever the DER holds (contract §3, steps 5 and 6).

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use regex::Regex;

/// The `cn_regex` of the example configuration (contract §2).
static CN_REGEX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(.+)\.devices\.example\.com$").expect("the example pattern compiles")
});

fuzz_target!(|data: &[u8]| {
    if let Ok(cn) = certmq::identity::common_name(data) {
        let _ = certmq::identity::device_name(&cn, &CN_REGEX);
    }
});
