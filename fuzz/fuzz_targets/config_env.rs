//! The config loader with environment overrides: arbitrary TOML plus arbitrary `WHARF_`
//! variables (names and values), through parsing, the nesting bound, merging, every section's
//! checks and each plugin's options. It must never panic or overflow the stack, every error
//! must be one line naming its source.
//!
//! Input: the TOML text, then `\0`-separated `NAME=VALUE` variables (`WHARF_` is prepended to
//! each name).
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;
use wharf::plan;
use wharf::Registry;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let Ok(text) = std::str::from_utf8(parts.next().unwrap_or_default()) else {
        return;
    };
    let env: Vec<(OsString, OsString)> = parts
        .map(|var| {
            let (name, value) = match var.iter().position(|&b| b == b'=') {
                Some(i) => (&var[..i], &var[i + 1..]),
                None => (var, &[][..]),
            };
            let mut full = b"WHARF_".to_vec();
            full.extend_from_slice(name);
            (OsString::from_vec(full), OsString::from_vec(value.to_vec()))
        })
        .collect();
    let registry = Registry::with_builtins();
    match plan::load_parts(text, "fuzz.toml", env, &registry) {
        Ok(plan) => assert!(!plan.services.is_empty(), "a valid plan without services"),
        Err(errors) => {
            assert!(!errors.is_empty(), "failed without saying why");
            for e in errors {
                let line = e.to_string();
                assert!(
                    line.starts_with("fuzz.toml") || line.starts_with("environment variable WHARF_"),
                    "error without origin: {line}"
                );
                assert!(!line.contains('\n'), "a multi-line error: {line}");
            }
        }
    }
});
