//! The PROXY protocol header parser (`wharf_core::proxy::parse`) on arbitrary bytes, as every
//! prefix the network could deliver: it must never panic, never ask for more than the bounds
//! allow, and agree with itself as bytes arrive (a header found in the whole input is "need
//! more" on each shorter prefix, and an error on a prefix stays an error).
//!
//! Input: the first byte picks the versions the service takes (v1, v2, any), the rest is what
//! a trusted proxy sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf_core::config::ProxyProtocol;
use wharf_core::proxy::{parse, Parsed, MAX_V1_HEADER, MAX_V2_HEADER};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let versions = [ProxyProtocol::V1, ProxyProtocol::V2, ProxyProtocol::Any][usize::from(pick % 3)];
    let whole = parse(input, versions);
    if let Ok(Parsed::Header { len, .. }) = &whole {
        assert!(*len <= input.len(), "a header longer than the input");
        assert!(*len <= MAX_V1_HEADER.max(MAX_V2_HEADER), "a header over the bounds");
    }
    let mut failed = false;
    for end in 0..input.len() {
        match parse(&input[..end], versions) {
            Ok(Parsed::NeedMore { total }) => {
                assert!(!failed, "an error became \"need more\" with more bytes");
                assert!(total > end, "asked for no more bytes");
                assert!(total <= MAX_V2_HEADER, "asked for more than the bounds");
            }
            Ok(Parsed::Header { len, .. }) => {
                // Found early: the whole input must say the same.
                assert!(!failed, "an error became a header with more bytes");
                match &whole {
                    Ok(Parsed::Header { len: whole_len, .. }) => assert_eq!(len, *whole_len),
                    other => panic!("header in a prefix, {other:?} in the whole"),
                }
                return;
            }
            Err(_) => failed = true,
        }
    }
    if failed {
        assert!(whole.is_err(), "an error became {whole:?} with more bytes");
    }
});
