//! Fuzzes what the proxy reads off the wire before any policy applies: the
//! TLS ClientHello reader, protocol detection, and the proxy's HTTP server.
//! The body and its properties: `weft::fuzzing::proxy_detect_http`.
//! (`tests/fuzz_seeds.rs` runs the same body over `fuzz/seeds/` in `make test`.)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| weft::fuzzing::proxy_detect_http(data));
