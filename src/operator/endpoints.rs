//! Endpoint discovery: the pods behind every Service a meshed namespace's
//! config names, from the cluster's EndpointSlices, published as that
//! namespace's `weft-endpoints` ConfigMap ([`crate::config::EndpointsConfig`]).
//!
//! Built without I/O from the caches. Slice changes reach here through the
//! compile loop, which batches them: a burst of pod changes costs one
//! apply per affected namespace per batch, and an apply only when the
//! document differs from what the namespace holds.
//!
//! What is read of a slice is what `kube-proxy` reads
//! (<https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#conditions>):
//! an unset `ready` is ready, an unset `serving` is `ready`, an unset
//! `terminating` is not terminating. Endpoints neither ready nor serving
//! are left out (no proxy may send to them), only counted by zone.
//!
//! A slice is anyone's to write who may write EndpointSlices in its
//! namespace, so what it says of a pod is checked against the pod: an
//! endpoint names a pod and its ServiceAccount only when the slice's
//! `targetRef` is a pod of the slice's namespace that holds every one of
//! its addresses (`status.podIPs`). Proxies hold a verified endpoint to
//! that account, and call it by address with its Service's policy.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::world::{SERVICE_NAME_LABEL, World};
use crate::config::{EndpointEntry, EndpointGroup, EndpointsConfig, ProxyConfig, ServiceEndpoints};

/// The slices the caches hold, by Service (`namespace`, `name`): built
/// once per batch of slice changes and shared by every namespace's
/// document.
pub type SliceIndex = HashMap<(String, String), Vec<Arc<EndpointSlice>>>;

pub fn index(world: &World) -> SliceIndex {
    let mut by_service = SliceIndex::new();
    for slice in world.endpoint_slices.state() {
        let (Some(ns), Some(svc)) = (slice.namespace(), slice.labels().get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        by_service.entry((ns, svc.clone())).or_default().push(slice);
    }
    // Slices in a stable order, so the document (and its hash) does not
    // move with the cache's iteration order.
    for slices in by_service.values_mut() {
        slices.sort_by_key(|s| s.name_any());
    }
    by_service
}

/// The endpoints of the meshed Services `config` names (its namespace's
/// outbound Services), from the slices the caches hold. Unmeshed Services
/// are left out: a pod address can pass to another pod before a document
/// catches up, and only mTLS, each pod held to its own identity, makes a
/// stale address fail instead of reaching a stranger in plaintext. So are
/// Services whose routing kube-proxy does and the proxy does not yet:
/// `internalTrafficPolicy: Local`, `sessionAffinity: ClientIP`, and those
/// another service proxy handles (`service.kubernetes.io/service-proxy-name`).
/// All of those are reached through their ClusterIP.
pub fn desired(config: &ProxyConfig, world: &World, slices: &SliceIndex) -> EndpointsConfig {
    let services = config
        .outbound
        .services
        .iter()
        .filter(|s| s.mesh.is_some())
        .filter(|s| kube_proxy_routes_it_alone(world, &s.namespace, &s.name))
        .filter_map(|s| {
            let found = slices.get(&(s.namespace.clone(), s.name.clone()))?;
            let endpoints = groups(found, &world.pods);
            (!endpoints.groups.is_empty())
                .then(|| (EndpointsConfig::key(&s.namespace, &s.name), endpoints))
        })
        .collect();
    EndpointsConfig {
        namespace: config.namespace.clone(),
        services,
        client_proxies: if config.shares_limits() {
            client_proxies(world, &config.namespace)
        } else {
            BTreeMap::new()
        },
        ..EndpointsConfig::default()
    }
    .seal()
}

/// The meshed pods of `ns` that may call out, by ServiceAccount: every pod
/// with the proxy, scheduled to a node and not finished (a starting pod
/// counts: its share is held for it rather than overshooting the limit
/// while it starts; a terminating one too, as it may still be sending).
/// An unscheduled pod (waiting for a node, or gated) does not: it sends
/// nothing, and pods nobody can run must not thin everyone's share. A
/// host-network pod has no sidecar of weft's.
pub fn client_proxies(world: &World, ns: &str) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for pod in world.pods.state() {
        if pod.metadata.namespace.as_deref() != Some(ns) || !super::reconcile::injected(&pod) {
            continue;
        }
        let spec = pod.spec.as_ref();
        let scheduled = spec
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| !n.is_empty());
        if !scheduled || spec.and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let n: &mut u32 = out.entry(sa).or_insert(0);
        *n = n.saturating_add(1);
    }
    out
}

/// False for a Service whose routing needs what only kube-proxy does.
fn kube_proxy_routes_it_alone(world: &World, ns: &str, name: &str) -> bool {
    let Some(svc) = world.services.get(&ObjectRef::new(name).within(ns)) else {
        return true;
    };
    if svc
        .labels()
        .contains_key("service.kubernetes.io/service-proxy-name")
    {
        return false;
    }
    let spec = svc.spec.as_ref();
    let local = spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local");
    let sticky = spec.and_then(|s| s.session_affinity.as_deref()) == Some("ClientIP");
    !local && !sticky
}

/// A Service's slices as endpoint groups: slices with the same ports are
/// one group; endpoints in address order.
fn groups(
    slices: &[std::sync::Arc<EndpointSlice>],
    pods: &Store<k8s_openapi::api::core::v1::Pod>,
) -> ServiceEndpoints {
    let mut by_ports: BTreeMap<BTreeMap<String, u16>, Vec<EndpointEntry>> = BTreeMap::new();
    let mut unready_by_zone: BTreeMap<String, u32> = BTreeMap::new();
    for slice in slices {
        // FQDN slices name hosts, not addresses: the proxy cannot dial
        // them as endpoints.
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok()?;
                Some((p.name.clone().unwrap_or_default(), port))
            })
            .collect();
        if ports.is_empty() {
            continue;
        }
        let entries = by_ports.entry(ports).or_default();
        for e in slice.endpoints.iter().flatten() {
            let conditions = e.conditions.clone().unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            let serving = conditions.serving.unwrap_or(ready);
            let terminating = conditions.terminating.unwrap_or(false);
            if !ready && !serving {
                if !terminating && let Some(zone) = &e.zone {
                    *unready_by_zone.entry(zone.clone()).or_default() += 1;
                }
                continue;
            }
            let verified = slice.namespace().and_then(|ns| verified_pod(&ns, e, pods));
            let spec = verified.as_ref().and_then(|p| p.spec.as_ref());
            // A pod on the host's network holds the node's address, which
            // every such pod on the node shares: it speaks plaintext, and
            // names no identity a caller dialling that address could be
            // held to.
            let host_network = spec.and_then(|s| s.host_network) == Some(true);
            let named = verified.as_ref().filter(|_| !host_network);
            let mut addresses = e.addresses.clone();
            addresses.sort();
            entries.push(EndpointEntry {
                addresses,
                ready,
                terminating,
                serving: terminating && serving,
                zone: e.zone.clone(),
                // The node as the pod says it (proxies learn their zone
                // from an endpoint on their node): a slice's own word
                // is not taken for it.
                node: spec
                    .and_then(|s| s.node_name.clone())
                    .filter(|n| e.node_name.as_ref() == Some(n)),
                pod: named.map(|p| p.name_any()),
                service_account: named.and_then(|p| p.spec.as_ref()?.service_account_name.clone()),
                unmeshed: verified
                    .as_ref()
                    .is_some_and(|p| host_network || !super::reconcile::injected(p)),
            });
        }
    }
    let groups = by_ports
        .into_iter()
        .filter(|(_, endpoints)| !endpoints.is_empty())
        .map(|(ports, mut endpoints)| {
            endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
            // One address can be in two slices while the controller moves
            // it: keep one entry.
            endpoints.dedup_by(|a, b| a.addresses == b.addresses);
            EndpointGroup { ports, endpoints }
        })
        .collect();
    ServiceEndpoints {
        groups,
        unready_by_zone,
    }
}

/// The pod an endpoint's `targetRef` names, when the claim holds: a pod
/// of the slice's namespace `ns`, in the cache, not finished, holding
/// every address of the endpoint. Anything else (another namespace's pod,
/// a pod not seen yet, an address the pod does not have or no longer
/// owns) is not trusted to name an identity.
fn verified_pod(
    ns: &str,
    e: &k8s_openapi::api::discovery::v1::Endpoint,
    pods: &Store<k8s_openapi::api::core::v1::Pod>,
) -> Option<Arc<k8s_openapi::api::core::v1::Pod>> {
    let target = e.target_ref.as_ref()?;
    if target.kind.as_deref() != Some("Pod") || target.namespace.as_deref().is_some_and(|t| t != ns)
    {
        return None;
    }
    let pod = pods.get(&ObjectRef::new(target.name.as_deref()?).within(ns))?;
    let status = pod.status.as_ref()?;
    // A finished pod keeps its `podIP` after the network hands the
    // address to another pod: it vouches for nothing.
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let held: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .collect();
    let holds = !e.addresses.is_empty() && e.addresses.iter().all(|a| held.contains(&a.as_str()));
    holds.then_some(pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::world::Writers;
    use kube::runtime::watcher;
    use serde_json::json;

    fn slice(ns: &str, svc: &str, name: &str, v: serde_json::Value) -> EndpointSlice {
        let mut base = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
        });
        for (k, val) in v.as_object().expect("object") {
            base[k] = val.clone();
        }
        serde_json::from_value(base).expect("slice")
    }

    /// Namespace `shop`'s compiled config, in a mesh whose Services are
    /// `services` (all in `shop`).
    fn config(services: &[&str]) -> ProxyConfig {
        let facts = crate::compile::ClusterFacts {
            namespaces: vec![
                serde_json::from_value(json!({"metadata": {"name": "shop",
                    "labels": {"weft.dev/inject": "enabled"}}}))
                .expect("namespace"),
            ],
            services: services
                .iter()
                .map(|name| {
                    serde_json::from_value(json!({
                        "metadata": {"name": name, "namespace": "shop"},
                        "spec": {"clusterIP": "10.96.0.10",
                                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                    }))
                    .expect("service")
                })
                .collect(),
            ..Default::default()
        };
        crate::compile::compile(&facts).configs["shop"].clone()
    }

    #[test]
    fn slices_become_groups_with_conditions_identity_and_zone() {
        let mut w = Writers::default();
        let pod =
            |name: &str, ns: &str, ip: &str, sidecar: bool| -> k8s_openapi::api::core::v1::Pod {
                let containers = if sidecar {
                    json!([{"name": "app"}, {"name": crate::inject::PROXY_CONTAINER}])
                } else {
                    json!([{"name": "app"}])
                };
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"serviceAccountName": "inventory", "containers": containers},
                    "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
                }))
                .expect("pod")
            };
        let mut finished = pod("job-0", "shop", "10.0.1.7", true);
        finished.status.as_mut().expect("status").phase = Some("Succeeded".into());
        let mut on_node = pod("inventory-0", "shop", "10.0.1.1", true);
        on_node.spec.as_mut().expect("spec").node_name = Some("n1".into());
        for p in [
            on_node,
            pod("inventory-1", "shop", "10.0.1.4", false),
            pod("payments-0", "payments", "10.0.1.5", true),
            finished,
        ] {
            w.pods.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let target = |name: &str, ns: &str| json!({"kind": "Pod", "name": name, "namespace": ns});
        let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
        for s in [
            slice(
                "shop",
                "inventory",
                "inventory-b",
                json!({"ports": ports, "endpoints": [
                    {"addresses": ["10.0.1.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "zone": "b"},
                    {"addresses": ["10.0.1.3"], "conditions": {"ready": false, "serving": false}, "zone": "b"},
                    // A pod without the sidecar.
                    {"addresses": ["10.0.1.4"], "targetRef": target("inventory-1", "shop")},
                    // Claims another namespace's pod: not trusted.
                    {"addresses": ["10.0.1.5"], "targetRef": target("payments-0", "payments")},
                    // Claims a pod of its own namespace at an address the
                    // pod does not hold: not trusted either.
                    {"addresses": ["10.0.1.6"], "targetRef": target("inventory-0", "shop")},
                    // Claims a finished pod, whose address the network
                    // may have handed to another: not trusted.
                    {"addresses": ["10.0.1.7"], "targetRef": target("job-0", "shop"), "nodeName": "n1"},
                ]}),
            ),
            slice(
                "shop",
                "inventory",
                "inventory-a",
                json!({"ports": ports, "endpoints": [
                    {"addresses": ["10.0.1.1"], "zone": "a", "nodeName": "n1",
                     "targetRef": target("inventory-0", "shop")},
                ]}),
            ),
            // A Service this namespace does not call.
            slice(
                "shop",
                "other",
                "other-a",
                json!({"ports": ports, "endpoints": [
                    {"addresses": ["10.0.9.9"]},
                ]}),
            ),
        ] {
            w.endpoint_slices
                .apply_watcher_event(&watcher::Event::Apply(s));
        }
        let world = w.world();
        let published = desired(&config(&["inventory"]), &world, &index(&world));
        assert_eq!(published.namespace, "shop");
        assert_eq!(published.generation.len(), 16);
        let inventory = &published.services["inventory.shop"];
        assert_eq!(
            inventory.unready_by_zone,
            BTreeMap::from([("b".to_owned(), 1)]),
            "counted in its zone, never listed"
        );
        let groups = &inventory.groups;
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert_eq!(groups[0].ports, BTreeMap::from([("http".to_owned(), 8080)]));
        let e = &groups[0].endpoints;
        assert_eq!(
            e.iter()
                .map(|e| e.addresses[0].as_str())
                .collect::<Vec<_>>(),
            [
                "10.0.1.1", "10.0.1.2", "10.0.1.4", "10.0.1.5", "10.0.1.6", "10.0.1.7"
            ],
            "neither ready nor serving: left out"
        );
        assert!(e[0].ready && !e[0].terminating);
        assert_eq!(e[0].zone.as_deref(), Some("a"));
        assert_eq!(e[0].node.as_deref(), Some("n1"));
        assert_eq!(e[0].service_account.as_deref(), Some("inventory"));
        assert_eq!(e[0].pod.as_deref(), Some("inventory-0"));
        assert!(!e[0].unmeshed);
        assert!(!e[1].ready && e[1].terminating && e[1].serving);
        assert!(e[2].unmeshed, "no sidecar: plaintext");
        for claim in &e[3..] {
            assert_eq!(
                (
                    claim.pod.as_deref(),
                    claim.service_account.as_deref(),
                    claim.unmeshed,
                    claim.node.as_deref()
                ),
                (None, None, false, None),
                "{:?}: a claim that does not hold names no identity",
                claim.addresses
            );
        }
        assert!(!published.services.contains_key("other.shop"));

        // The same caches give the same document.
        assert_eq!(
            desired(&config(&["inventory"]), &world, &index(&world)),
            published
        );
        let back = EndpointsConfig::from_bytes(published.to_json().as_bytes()).expect("reads");
        assert_eq!(back, published);
    }
}
