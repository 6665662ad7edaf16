//! The operator: weft policies and the cluster reconciled into each meshed
//! namespace's `weft-proxy-config` ConfigMap and `weft-identity` Secret,
//! policy status, the mesh CA, and the staged PERMISSIVE → STRICT rollout.

pub mod desired;
pub mod observe;
pub mod rollout;
pub mod status;
