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
pub mod authzcli;
pub mod compile;
pub mod config;
pub mod controlplane;
pub mod dashboard;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod image;
pub mod init;
pub mod inject;
pub mod local;
pub mod manifest;
pub mod meshstats;
pub mod netns;
pub mod operator;
pub mod promtext;
pub mod proxy;
pub mod schemacheck;
pub mod statcli;

/// What every weft process does first: one TLS provider for the whole
/// process (kube's client and mesh TLS) — aws-lc-rs, which offers the
/// post-quantum hybrid key exchange — and logs on stderr, filtered by
/// `WEFT_LOG` (see [`log_filter`]).
pub fn init_process() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (filter, rejected) = log_filter(std::env::var("WEFT_LOG").ok().as_deref());
    tracing_subscriber::fmt()
        // The builder's own ceiling is INFO; `filter` decides, so this one
        // must not cut debug and trace events before it sees them.
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(filter)
        .init();
    if let Some(why) = rejected {
        tracing::warn!(error = %why, "WEFT_LOG not understood; logging at info");
    }
}

/// The log filter `WEFT_LOG` asks for: a level (`debug`), or targets with
/// levels (`info,weft::proxy=debug,h2=warn`); `info` when unset. A value it
/// cannot parse gives `info` and the reason. (A plain target filter needs
/// no regular expressions, so a sidecar's start-up compiles none.)
pub fn log_filter(value: Option<&str>) -> (tracing_subscriber::filter::Targets, Option<String>) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let default = || Targets::new().with_default(LevelFilter::INFO);
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => (default(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (default(), Some(format!("{v:?}: {e}"))),
        },
    }
}

#[cfg(test)]
mod log_filter_tests {
    use tracing_subscriber::filter::LevelFilter;

    use super::log_filter;

    #[test]
    fn levels_and_targets() {
        let (f, bad) = log_filter(None);
        assert!(bad.is_none());
        assert!(f.would_enable("weft::proxy", &tracing::Level::INFO));
        assert!(!f.would_enable("weft::proxy", &tracing::Level::DEBUG));

        let (f, bad) = log_filter(Some("warn,weft::proxy=debug"));
        assert!(bad.is_none());
        assert!(f.would_enable("weft::proxy::pool", &tracing::Level::DEBUG));
        assert!(!f.would_enable("h2::codec", &tracing::Level::INFO));
        assert_eq!(f.default_level(), Some(LevelFilter::WARN));
    }

    #[test]
    fn nonsense_falls_back_to_info_and_says_why() {
        let (f, bad) = log_filter(Some("weft=loud"));
        assert!(bad.is_some_and(|why| why.contains("weft=loud")));
        assert!(f.would_enable("weft", &tracing::Level::INFO));
        assert!(!f.would_enable("weft", &tracing::Level::DEBUG));
    }
}
