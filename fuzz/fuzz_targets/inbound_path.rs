//! Fuzzes the inbound path's decisions on a client's first bytes:
//! detection, the HTTP head as parsers read it, and authorization. The body
//! and its properties: `weft::fuzzing::inbound_path`.
//! (`tests/fuzz_seeds.rs` runs the same body over `fuzz/seeds/` in `make test`.)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| weft::fuzzing::inbound_path(data));
