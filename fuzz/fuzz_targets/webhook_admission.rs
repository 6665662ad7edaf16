//! Fuzzes the admission webhook end to end in process: AdmissionReview
//! decoding and the sidecar patch builder. The body and its properties:
//! `weft::fuzzing::webhook_admission`. Seeds: `fuzz/seeds/webhook_admission`
//! (reviews and pods from the golden files).
//! (`tests/fuzz_seeds.rs` runs the same body over `fuzz/seeds/` in `make test`.)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| weft::fuzzing::webhook_admission(data));
