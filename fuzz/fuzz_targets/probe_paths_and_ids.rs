//! Fuzzes the parsers of untrusted names the proxy compares for access:
//! the probe port's canonical path form (anyone who can reach the pod
//! sends it paths), probe targets as the injector writes them, and SPIFFE
//! ids as read from peer certificates. None may panic; the canonical form
//! must be stable and only hold what may stand in a URI path; a target
//! and an id must read back as what was written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::identity::SpiffeId;
use weft::proxy::admin::{ProbeTarget, canonical_probe_path, parse_probe_target};

fn may_stand(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };

    let canonical = canonical_probe_path(text);
    assert_eq!(canonical_probe_path(&canonical), canonical, "stable for {text:?}");
    let bytes = canonical.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escape = bytes.get(i + 1..i + 3).unwrap_or_default();
            assert!(
                escape.len() == 2 && escape.iter().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b)),
                "a broken escape in {canonical:?}"
            );
            i += 3;
        } else {
            assert!(may_stand(bytes[i]), "{:?} may not stand in {canonical:?}", bytes[i] as char);
            i += 1;
        }
    }

    // A probe target the injector writes reads back as itself.
    if text.starts_with('/') && !text.contains(',') {
        let target = ProbeTarget::http(8080, text);
        assert_eq!(parse_probe_target(&target.to_string()), Ok(target.clone()), "{text:?}");
    }
    // Whatever a target entry holds, parsing it does not panic.
    let _ = parse_probe_target(text);

    // A SPIFFE id that parses prints as the same id.
    if let Ok(id) = text.parse::<SpiffeId>() {
        assert_eq!(id.to_string().parse::<SpiffeId>().ok(), Some(id));
    }
});
