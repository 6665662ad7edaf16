//! `weft init --dry-run` against golden files: the default redirect,
//! excluded ports and CIDRs, and IPv6. Run through the real binary.
//! After an intended change: `UPDATE_GOLDEN=1 cargo test --test init_golden`.

use std::path::PathBuf;
use std::process::Command;

// IPv4 only in the first two, whatever addresses this machine has (`--ipv6`
// defaults to `auto`, which looks at the pod's addresses).
const CASES: [(&str, &[&str]); 3] = [
    ("default", &["--ipv6=off"]),
    (
        "excluded",
        &[
            "--ipv6=off",
            "--skip-inbound-ports",
            "9090,8443",
            "--skip-outbound-ports",
            "5432,6379",
            "--skip-outbound-cidrs",
            "10.96.0.0/12,169.254.169.254/32",
        ],
    ),
    (
        "ipv6",
        &[
            "--ipv6",
            "--skip-outbound-cidrs",
            "10.96.0.0/12,fd00:10:96::/112",
        ],
    ),
];

#[test]
fn dry_run_output_matches_the_golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/init");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (case, args) in CASES {
        let out = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["init", "--dry-run"])
            .args(args)
            .output()
            .expect("weft runs");
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf8");
        let path = dir.join(format!("{case}.rules"));
        if update {
            std::fs::write(&path, &text).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 to create)", path.display()));
        assert_eq!(text, expected, "{case}: differs from {}", path.display());
    }
}

#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["init", "--dry-run", "--skip-outbound-cidrs", "10.0.0.0"])
        .output()
        .expect("weft runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--skip-outbound-cidrs") && err.contains("10.0.0.0/8"),
        "{err}"
    );
}
