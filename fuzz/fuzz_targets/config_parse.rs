//! The configuration parser: `config::Config::parse` on arbitrary text (TOML, then every
//! section's validation). Configs come from operators, but `meshcast check-config` and
//! hot paths of deployment tooling feed it files from elsewhere, and it must never panic.
//!
//! Invariants: no panic; an accepted config parses again to the same problems (none).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshcast::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if Config::parse(text, "fuzz.toml", Path::new("/nonexistent")).is_ok() {
        assert!(Config::parse(text, "fuzz.toml", Path::new("/nonexistent")).is_ok());
    }
});
