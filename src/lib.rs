//! Weft: a lightweight service mesh for Kubernetes.
//!
//! One crate, one binary. The library holds every component so that the pure
//! cores (the policy compiler, the proxy config contract) are tested without a
//! cluster; `src/main.rs` only parses the command line and calls in here.
#![forbid(unsafe_code)]

pub mod api;
pub mod compile;
pub mod config;
pub mod controlplane;
pub mod identity;
pub mod inject;
pub mod manifest;
pub mod proxy;
pub mod schemacheck;
