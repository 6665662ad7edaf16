//! The fast path for config changes: the kubelet refreshes a mounted
//! ConfigMap only about once a minute, so a proxy that has a service-account
//! token also watches its namespace's `weft-proxy-config` through the API
//! server (the operator grants read access to exactly that object). Changes
//! arrive within a second or two; the mounted file stays the bootstrap and
//! the fallback while the API server is away.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::config::{
    CONFIG_GZ_KEY, CONFIG_KEY, CONFIG_MAP_NAME, ENDPOINTS_CONFIG_MAP_NAME, ENDPOINTS_GZ_KEY,
    ENDPOINTS_KEY, EndpointsConfig, ProxyConfig,
};

use super::state::ConfigStore;

/// Where the kubelet mounts the pod's service-account token.
pub const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The pod's namespace, next to the token.
pub const NAMESPACE_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// An in-cluster client when this pod has a token, else `None`.
pub async fn in_cluster_client() -> Option<Client> {
    if !Path::new(TOKEN_PATH).exists() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return None;
    }
    match kube::Config::incluster() {
        Ok(cfg) => Client::try_from(cfg)
            .map_err(
                |e| tracing::warn!(error = %e, "no API client; watching the mounted file only"),
            )
            .ok(),
        Err(e) => {
            tracing::warn!(error = %e, "no in-cluster config; watching the mounted file only");
            None
        }
    }
}

/// The namespace of this pod: the flag, else the service-account file.
pub fn pod_namespace(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| {
            std::fs::read_to_string(NAMESPACE_PATH)
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
}

/// The config carried by a ConfigMap, from whichever key holds it.
pub fn config_of(cm: &ConfigMap) -> Result<ProxyConfig, String> {
    if let Some(json) = cm.data.as_ref().and_then(|d| d.get(CONFIG_KEY)) {
        return ProxyConfig::from_bytes(json.as_bytes()).map_err(|e| e.to_string());
    }
    if let Some(gz) = cm.binary_data.as_ref().and_then(|d| d.get(CONFIG_GZ_KEY)) {
        return ProxyConfig::from_bytes(&gz.0).map_err(|e| e.to_string());
    }
    Err(format!(
        "ConfigMap {CONFIG_MAP_NAME} has neither {CONFIG_KEY} nor {CONFIG_GZ_KEY}"
    ))
}

/// The endpoints document a ConfigMap carries, from whichever key holds it.
pub fn endpoints_of(cm: &ConfigMap) -> Result<EndpointsConfig, String> {
    if let Some(json) = cm.data.as_ref().and_then(|d| d.get(ENDPOINTS_KEY)) {
        return EndpointsConfig::from_bytes(json.as_bytes()).map_err(|e| e.to_string());
    }
    if let Some(gz) = cm
        .binary_data
        .as_ref()
        .and_then(|d| d.get(ENDPOINTS_GZ_KEY))
    {
        return EndpointsConfig::from_bytes(&gz.0).map_err(|e| e.to_string());
    }
    Err(format!(
        "ConfigMap {ENDPOINTS_CONFIG_MAP_NAME} has neither {ENDPOINTS_KEY} nor {ENDPOINTS_GZ_KEY}"
    ))
}

/// Watches `namespace/weft-endpoints` until the process ends, applying
/// each version (pods come and go within a second or two, not at the
/// kubelet's next refresh of the mounted file).
pub async fn watch_endpoints(client: Client, namespace: String, store: Arc<ConfigStore>) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cfg =
        watcher::Config::default().fields(&format!("metadata.name={ENDPOINTS_CONFIG_MAP_NAME}"));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    // Whether the (re)list in progress found the ConfigMap.
    let mut listed = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(cm) | Event::InitApply(cm)) => {
                listed = true;
                store.watching_endpoints();
                match endpoints_of(&cm) {
                    Ok(endpoints) => {
                        store.apply_endpoints(endpoints);
                    }
                    Err(why) => store.record_failure(&why),
                }
            }
            // Gone (the namespace was unmeshed): ClusterIPs again, not a
            // frozen list of pod addresses.
            Ok(Event::Delete(_)) => {
                store.watching_endpoints();
                store.clear_endpoints();
            }
            Ok(Event::Init) => listed = false,
            Ok(Event::InitDone) => {
                store.watching_endpoints();
                if !listed {
                    store.clear_endpoints();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "endpoints watch interrupted; retrying (the mounted file still applies)")
            }
        }
    }
}

/// Watches `namespace/weft-proxy-config` until the process ends, applying
/// each version. Watch errors are retried with backoff; a bad document is
/// counted and the last good config stays.
pub async fn watch_configmap(client: Client, namespace: String, store: Arc<ConfigStore>) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP_NAME}"));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    tracing::info!(%namespace, "watching {CONFIG_MAP_NAME} through the API server");
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(cm) | Event::InitApply(cm)) => match config_of(&cm) {
                Ok(config) => {
                    store.apply(config);
                }
                Err(why) => store.record_failure(&why),
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "config watch interrupted; retrying (the mounted file still applies)")
            }
        }
    }
}
