//! Weft: a lightweight service mesh for Kubernetes.
//!
//! One crate. The library holds every component so that the pure cores (the
//! policy compiler, the proxy config contract, the injector) are tested
//! without a cluster; the binaries only parse their command lines and call in
//! here: `weft` (every subcommand) and `weft-proxy` (the sidecar alone, so a
//! pod maps only the data plane's code: a proxy's resident memory is mostly
//! code pages).
#![forbid(unsafe_code)]

pub mod api;
pub mod compile;
pub mod config;
pub mod controlplane;
pub mod identity;
pub mod init;
pub mod inject;
pub mod local;
pub mod manifest;
pub mod netns;
pub mod operator;
pub mod promtext;
pub mod proxy;
pub mod schemacheck;

/// What every weft process does first: one TLS provider for the whole
/// process (kube's client and mesh TLS) — aws-lc-rs, which offers the
/// post-quantum hybrid key exchange — and logs on stderr, filtered by
/// `WEFT_LOG` (default `info`).
pub fn init_process() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
