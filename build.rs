//! Link options for weft's binaries on x86_64 Linux (GNU), where rust-lld is
//! the default linker: a sidecar runs in every pod, so what its binary
//! costs in resident memory is paid many times.
//!
//! - `-z pack-relative-relocs` stores the position-independent binary's
//!   relative relocations as DT_RELR bitmaps, a few KiB instead of ~500 KiB
//!   of `.rela.dyn` that the dynamic loader reads (and keeps resident) at
//!   every start. Needs glibc 2.36 or newer at run time (Debian 12, the
//!   image's base); an older glibc refuses to start the binary, naming
//!   `GLIBC_ABI_DT_RELR`, rather than misbehaving.
//! - `--icf=all` folds functions whose machine code is identical (many
//!   generic instantiations are), so fewer code pages are mapped. Rust gives
//!   no guarantee about function address equality, and rustc folds
//!   identical code by default on MSVC for the same reason.
//! - `weft-proxy` is linked with `--symbol-ordering-file
//!   src/bin/weft-proxy.order`: the functions the sidecar runs, packed at
//!   the front of `.text`. The kernel maps code in 64 KiB fault-around
//!   windows, so hot code spread among cold code keeps most of the binary
//!   resident; packed, it keeps about what it runs. `make proxy-order`
//!   regenerates the list (names missing from it are only placed later).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = |key: &str| std::env::var(key).unwrap_or_default();
    // rust-lld links x86_64-unknown-linux-gnu by default (Rust 1.90+); the
    // ordering and folding options are lld's, so other targets, whose
    // default linker may be GNU ld, link plainly.
    let lld_by_default = target("CARGO_CFG_TARGET_OS") == "linux"
        && target("CARGO_CFG_TARGET_ENV") == "gnu"
        && target("CARGO_CFG_TARGET_ARCH") == "x86_64";
    if lld_by_default && std::env::var_os("WEFT_PLAIN_LINK").is_none() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
        let order =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/weft-proxy.order");
        if order.exists() {
            println!(
                "cargo:rustc-link-arg-bin=weft-proxy=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
                order.display()
            );
        }
    }
    println!("cargo:rerun-if-changed=src/bin/weft-proxy.order");
    println!("cargo:rerun-if-env-changed=WEFT_PLAIN_LINK");
}
