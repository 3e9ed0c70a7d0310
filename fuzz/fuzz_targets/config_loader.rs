//! The config loader on arbitrary TOML: figment extraction of every section, the plugin
//! registry building each service's options, duplicate-address and bound checks. It must
//! never panic, and every error must name where it comes from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::plan;
use wharf::Registry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let registry = Registry::with_builtins();
    match plan::load_str(text, "fuzz.toml", &registry) {
        Ok(plan) => assert!(!plan.services.is_empty(), "a valid plan without services"),
        Err(errors) => {
            assert!(!errors.is_empty(), "failed without saying why");
            for e in errors {
                assert!(e.to_string().starts_with("fuzz.toml"), "error without origin: {e}");
            }
        }
    }
});
