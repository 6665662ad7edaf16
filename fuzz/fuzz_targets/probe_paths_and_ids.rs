//! Fuzzes the parsers of untrusted names the proxy compares for access:
//! canonical probe paths, probe targets and SPIFFE ids. The body and its
//! properties: `weft::fuzzing::probe_paths_and_ids`.
//! (`tests/fuzz_seeds.rs` runs the same body over `fuzz/seeds/` in `make test`.)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| weft::fuzzing::probe_paths_and_ids(data));
