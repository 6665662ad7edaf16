//! What the operator knows of the cluster: one reflector store per kind it
//! reads, filled by watches on every replica (so a new leader starts warm
//! and `/readyz` means "caches synced"), and turned into the compiler's
//! [`ClusterFacts`] on demand.
//!
//! Watches report two kinds of change: to the compiler's inputs (any weft
//! policy, Namespace, Service or ServiceAccount: recompile, then reconcile
//! the namespaces whose result changed) and to a namespace's own children
//! (a drifted or deleted ConfigMap, Secret, Role or RoleBinding: reconcile
//! that namespace). Changes are passed on only while this replica leads:
//! a standby keeps its caches warm but queues nothing (nobody would drain
//! the queue), and a new leader starts from a full compile and resync of
//! what the caches hold by then.

use std::fmt::Debug;
use std::hash::Hash;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use super::desired::MANAGED_SELECTOR;
use crate::api::{AccessPolicy, ExternalService, MTLSPolicy, Mesh, ServiceRoute, TrafficPolicy};
use crate::compile::ClusterFacts;

/// Reflector stores of everything the operator reads.
#[derive(Clone)]
pub struct World {
    pub namespaces: Store<Namespace>,
    pub services: Store<Service>,
    pub service_accounts: Store<ServiceAccount>,
    pub meshes: Store<Mesh>,
    pub mtls_policies: Store<MTLSPolicy>,
    pub traffic_policies: Store<TrafficPolicy>,
    pub service_routes: Store<ServiceRoute>,
    pub access_policies: Store<AccessPolicy>,
    pub external_services: Store<ExternalService>,
    pub pods: Store<Pod>,
    /// Every Service's pods, published per namespace ([`super::endpoints`]).
    pub endpoint_slices: Store<EndpointSlice>,
    /// Only what the operator manages (`app.kubernetes.io/managed-by=weft`).
    pub config_maps: Store<ConfigMap>,
    pub secrets: Store<Secret>,
    pub roles: Store<Role>,
    pub role_bindings: Store<RoleBinding>,
}

/// The writing side of each store: the watches in a cluster, the test's
/// hand in tier-2 tests.
#[derive(Default)]
pub struct Writers {
    pub namespaces: Writer<Namespace>,
    pub services: Writer<Service>,
    pub service_accounts: Writer<ServiceAccount>,
    pub meshes: Writer<Mesh>,
    pub mtls_policies: Writer<MTLSPolicy>,
    pub traffic_policies: Writer<TrafficPolicy>,
    pub service_routes: Writer<ServiceRoute>,
    pub access_policies: Writer<AccessPolicy>,
    pub external_services: Writer<ExternalService>,
    pub pods: Writer<Pod>,
    pub endpoint_slices: Writer<EndpointSlice>,
    pub config_maps: Writer<ConfigMap>,
    pub secrets: Writer<Secret>,
    pub roles: Writer<Role>,
    pub role_bindings: Writer<RoleBinding>,
}

impl Writers {
    pub fn world(&self) -> World {
        World {
            namespaces: self.namespaces.as_reader(),
            services: self.services.as_reader(),
            service_accounts: self.service_accounts.as_reader(),
            meshes: self.meshes.as_reader(),
            mtls_policies: self.mtls_policies.as_reader(),
            traffic_policies: self.traffic_policies.as_reader(),
            service_routes: self.service_routes.as_reader(),
            access_policies: self.access_policies.as_reader(),
            external_services: self.external_services.as_reader(),
            pods: self.pods.as_reader(),
            endpoint_slices: self.endpoint_slices.as_reader(),
            config_maps: self.config_maps.as_reader(),
            secrets: self.secrets.as_reader(),
            roles: self.roles.as_reader(),
            role_bindings: self.role_bindings.as_reader(),
        }
    }
}

fn all<K: Clone + Resource + 'static>(store: &Store<K>) -> Vec<K>
where
    <K as Resource>::DynamicType: Eq + Hash + Clone,
{
    store.state().iter().map(|k| K::clone(k)).collect()
}

impl World {
    /// The compiler's input, as the caches hold it now.
    pub fn facts(&self) -> ClusterFacts {
        ClusterFacts {
            namespaces: all(&self.namespaces),
            services: all(&self.services),
            service_accounts: all(&self.service_accounts),
            meshes: all(&self.meshes),
            mtls_policies: all(&self.mtls_policies),
            traffic_policies: all(&self.traffic_policies),
            service_routes: all(&self.service_routes),
            access_policies: all(&self.access_policies),
            external_services: all(&self.external_services),
        }
    }

    /// Waits until every watch has listed once.
    pub async fn synced(&self) {
        // A dropped writer means its watch task ended; the caller's
        // readiness then never turns true, which is what it should report.
        let _ = futures_util::join!(
            self.namespaces.wait_until_ready(),
            self.services.wait_until_ready(),
            self.service_accounts.wait_until_ready(),
            self.meshes.wait_until_ready(),
            self.mtls_policies.wait_until_ready(),
            self.traffic_policies.wait_until_ready(),
            self.service_routes.wait_until_ready(),
            self.access_policies.wait_until_ready(),
            self.external_services.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.endpoint_slices.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.secrets.wait_until_ready(),
            self.roles.wait_until_ready(),
            self.role_bindings.wait_until_ready(),
        );
    }

    /// The namespace's object of a managed kind, if the cache holds it.
    pub fn child<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<std::sync::Arc<K>>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        store.get(&ObjectRef::new(name).within(namespace))
    }
}

/// What a watch saw change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A compiler input changed: recompile.
    Inputs,
    /// A managed child of this namespace changed or went away.
    Child(String),
    /// A watch of managed children relisted: any child may have changed
    /// while it was down, so every namespace is looked at again.
    AllChildren,
    /// The EndpointSlices of this Service (`namespace`, `name`) changed:
    /// republish the endpoints of the namespaces that call it.
    Endpoints(String, String),
    /// A meshed pod of this namespace changed: where the namespace's
    /// config divides a rate limit among its pods, republish its
    /// endpoints document (which counts them) if the count moved.
    Pods(String),
    /// The pod watch relisted: every namespace that divides a limit is
    /// counted again.
    AllPods,
}

/// Changes go to this channel while `leading` holds true, and are dropped
/// otherwise.
#[derive(Clone)]
pub struct ChangeSink {
    pub changes: mpsc::UnboundedSender<Change>,
    pub leading: watch::Receiver<bool>,
}

impl ChangeSink {
    /// Passes `change` on if this replica leads; false once the receiving
    /// side is gone.
    fn send(&self, change: Change) -> bool {
        if !*self.leading.borrow() {
            // The caches hold the change; a replica that starts leading
            // compiles and resyncs from them.
            return true;
        }
        self.changes.send(change).is_ok()
    }
}

/// Starts a watch per kind feeding `writers`; changes go to `sink`. The
/// tasks end when the sink's receiver is dropped.
pub fn watch_all(client: &Client, writers: Writers, sink: ChangeSink) {
    let managed = watcher::Config::default().labels(MANAGED_SELECTOR);
    let plain = watcher::Config::default;
    let c = client;
    let ch = &sink;
    spawn_watch(Api::all(c.clone()), plain(), writers.namespaces, ch, INPUT);
    spawn_watch(Api::all(c.clone()), plain(), writers.services, ch, INPUT);
    spawn_watch(
        Api::all(c.clone()),
        plain(),
        writers.service_accounts,
        ch,
        INPUT,
    );
    spawn_watch(Api::all(c.clone()), plain(), writers.meshes, ch, INPUT);
    spawn_watch(
        Api::all(c.clone()),
        plain(),
        writers.mtls_policies,
        ch,
        INPUT,
    );
    spawn_watch(
        Api::all(c.clone()),
        plain(),
        writers.traffic_policies,
        ch,
        INPUT,
    );
    spawn_watch(
        Api::all(c.clone()),
        plain(),
        writers.service_routes,
        ch,
        INPUT,
    );
    spawn_watch(
        Api::all(c.clone()),
        plain(),
        writers.access_policies,
        ch,
        INPUT,
    );
    spawn_watch(
        Api::all(c.clone()),
        plain(),
        writers.external_services,
        ch,
        INPUT,
    );
    // Pods feed the rollout's evidence, read when a namespace reconciles
    // (the rollout polls), and the client counts of namespace-wide rate
    // limits, republished when a pod event moves one. The cache
    // holds only what the rollout reads (`prune_pod`), not every pod's
    // spec: in a large cluster the pods are most of the operator's memory.
    spawn_watch_pruned(
        Api::all(c.clone()),
        plain(),
        writers.pods,
        ch,
        Classify::Pods,
        prune_pod,
    );
    // Slices feed the published endpoints: a change republishes the
    // namespaces that call its Service (batched by the compile loop).
    spawn_watch_pruned(
        Api::all(c.clone()),
        plain(),
        writers.endpoint_slices,
        ch,
        Classify::Endpoints,
        prune_slice,
    );
    spawn_watch(
        Api::all(c.clone()),
        managed.clone(),
        writers.config_maps,
        ch,
        CHILD,
    );
    // Secrets without their field-manager history: one per meshed
    // ServiceAccount, it would be most of what the cache holds of them.
    spawn_watch_pruned(
        Api::all(c.clone()),
        managed.clone(),
        writers.secrets,
        ch,
        CHILD,
        |s: &mut Secret| s.metadata.managed_fields = None,
    );
    spawn_watch(
        Api::all(c.clone()),
        managed.clone(),
        writers.roles,
        ch,
        CHILD,
    );
    spawn_watch(
        Api::all(c.clone()),
        managed,
        writers.role_bindings,
        ch,
        CHILD,
    );
}

/// What a kind's events mean.
#[derive(Clone, Copy)]
enum Classify {
    Input,
    Child,
    Endpoints,
    Pods,
}
const INPUT: Classify = Classify::Input;
const CHILD: Classify = Classify::Child;

impl Classify {
    fn event<K: Resource + 'static>(self, obj: &K) -> Option<Change> {
        match self {
            Self::Input => Some(Change::Inputs),
            Self::Child => obj.namespace().map(Change::Child),
            Self::Endpoints => Some(Change::Endpoints(
                obj.namespace()?,
                obj.labels().get(SERVICE_NAME_LABEL)?.clone(),
            )),
            // Only pods with the sidecar are counted (a pod's containers
            // never change): the others' events are most of a cluster's.
            Self::Pods => {
                let pod = (obj as &dyn std::any::Any).downcast_ref::<Pod>()?;
                super::reconcile::injected(pod)
                    .then(|| pod.metadata.namespace.clone())
                    .flatten()
                    .map(Change::Pods)
            }
        }
    }

    /// A (re)list finished: the set may have changed in ways no single
    /// event shows (objects deleted while the watch was down).
    fn relisted(self) -> Option<Change> {
        match self {
            Self::Input => Some(Change::Inputs),
            Self::Child | Self::Endpoints => Some(Change::AllChildren),
            Self::Pods => Some(Change::AllPods),
        }
    }
}

fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    changes: &ChangeSink,
    classify: Classify,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    spawn_watch_pruned(api, config, writer, changes, classify, |_| {});
}

/// [`spawn_watch`], with `prune` dropping from each object what nobody
/// reads before the cache stores it.
fn spawn_watch_pruned<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    changes: &ChangeSink,
    classify: Classify,
    prune: fn(&mut K),
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let changes = changes.clone();
    let kind = K::kind(&());
    let stream = watcher(api, config)
        .default_backoff()
        .modify(move |k| {
            // Nobody reads managedFields here; dropping them roughly
            // halves the cache.
            k.managed_fields_mut().clear();
            prune(k);
        })
        .reflect(writer);
    tokio::spawn(forward(kind.into_owned(), stream, changes, classify));
}

/// What the operator reads of a pod, and nothing else: its name and
/// namespace, whether it is being deleted, its containers' names (the
/// sidecar's among them: `injected`), the injector's `weft.dev/`
/// annotations, whether it uses the host's network, its ServiceAccount
/// (the identity its endpoints present), the names of its weft identity
/// Secret volumes, and its phase and addresses. Gone: labels, other
/// annotations, owner references, every container's image, command, env
/// and mounts, other volumes, conditions, container statuses.
pub fn prune_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus, SecretVolumeSource, Volume};
    // The name its proxy's metrics go by: the `WEFT_WORKLOAD` the
    // injector gave the sidecar when the pod was admitted (labels changed
    // since do not rename it); for a sidecar without one, what the
    // injector would compute from the labels about to go. A canary's
    // evidence is its pods' own.
    let workload = proxy_workload(pod).unwrap_or_else(|| {
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        crate::inject::workload_name(pod, &account)
    });
    let meta = &mut pod.metadata;
    meta.labels = None;
    // The injector's own annotations say the webhook injected the pod.
    let mut kept: std::collections::BTreeMap<String, String> = meta
        .annotations
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("weft.dev/"))
        .collect();
    kept.insert(WORKLOAD_ANNOTATION.to_owned(), workload);
    meta.annotations = Some(kept);
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.managed_fields = None;
    // weft-init keeps its arguments: they say which ports it left out of
    // the redirect, which the status names as not covered by Strict.
    let names = |cs: &[Container]| -> Vec<Container> {
        cs.iter()
            .map(|c| Container {
                name: c.name.clone(),
                args: (c.name == crate::inject::INIT_CONTAINER)
                    .then(|| c.args.clone())
                    .flatten(),
                ..Container::default()
            })
            .collect()
    };
    // Volumes of weft's identity Secrets, by Secret name only: the one
    // Secret of earlier versions that held every account's keys is deleted
    // once no pod mounts it.
    let identity_volumes = |vs: Option<Vec<Volume>>| -> Option<Vec<Volume>> {
        let kept: Vec<Volume> = vs
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let secret = v.secret?.secret_name?;
                secret
                    .starts_with(crate::identity::LEGACY_IDENTITY_SECRET)
                    .then(|| Volume {
                        name: v.name,
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(secret),
                            ..SecretVolumeSource::default()
                        }),
                        ..Volume::default()
                    })
            })
            .collect();
        (!kept.is_empty()).then_some(kept)
    };
    pod.spec = pod.spec.take().map(|s| PodSpec {
        containers: names(&s.containers),
        init_containers: s.init_containers.as_deref().map(names),
        host_network: s.host_network,
        volumes: identity_volumes(s.volumes),
        // The identity its endpoints must present.
        service_account_name: s.service_account_name,
        // Where it runs: an EndpointSlice's `nodeName` is checked against it.
        node_name: s.node_name,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..PodStatus::default()
    });
}

/// The `WEFT_WORKLOAD` of the pod's weft-proxy container (a regular or a
/// native sidecar), when it has one.
fn proxy_workload(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == crate::inject::PROXY_CONTAINER)?
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WEFT_WORKLOAD")?
        .value
        .clone()
        .filter(|v| !v.is_empty())
}

/// Where the operator's pod cache keeps a pod's workload name (the name
/// its proxy's metrics go by), in place of the labels it drops. Only in
/// the cache: never written to the cluster.
pub const WORKLOAD_ANNOTATION: &str = "weft.dev/workload";

/// The label that names an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the endpoints publisher reads of an EndpointSlice: its Service
/// label, ports and endpoints (hints, managed fields and the rest go).
pub fn prune_slice(slice: &mut EndpointSlice) {
    let meta = &mut slice.metadata;
    meta.labels = meta.labels.take().map(|l| {
        l.into_iter()
            .filter(|(k, _)| {
                k == SERVICE_NAME_LABEL || k == "endpointslice.kubernetes.io/managed-by"
            })
            .collect()
    });
    meta.annotations = None;
    meta.owner_references = None;
    meta.managed_fields = None;
    meta.generate_name = None;
    for e in slice.endpoints.iter_mut().flatten() {
        e.hints = None;
        e.hostname = None;
        e.deprecated_topology = None;
    }
}

async fn forward<K: Resource + 'static>(
    kind: String,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    changes: ChangeSink,
    classify: Classify,
) {
    futures_util::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        let change = match &ev {
            Ok(watcher::Event::Apply(k) | watcher::Event::Delete(k)) => classify.event(k),
            Ok(watcher::Event::InitDone) => classify.relisted(),
            Ok(_) => None,
            Err(e) => {
                let text = e.to_string();
                // A weft kind this version reads but the cluster lacks: the
                // caches never sync, so nothing is compiled; say the fix.
                if text.contains("404") || text.to_ascii_lowercase().contains("not found") {
                    tracing::error!(
                        kind,
                        error = %e,
                        "cannot list {kind}: is its CustomResourceDefinition installed? Apply this version's crds/ (manifests/05-crds.yaml); `helm upgrade` does not update a chart's crds/. Nothing is compiled until every watch lists"
                    );
                } else {
                    tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
                }
                None
            }
        };
        if let Some(change) = change
            && !changes.send(change)
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_map(ns: &str) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some("weft-proxy-config".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn events(n: usize) -> impl Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> {
        futures_util::stream::iter(
            (0..n).map(|i| Ok(watcher::Event::Apply(config_map(&format!("ns-{i}"))))),
        )
    }

    /// A standby sees every event (its caches stay warm) but queues none
    /// of them: nothing drains the queue until it leads, and then it
    /// resyncs from the caches anyway.
    #[tokio::test]
    async fn a_standby_queues_no_changes_and_a_leader_gets_them() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (leading_tx, leading) = watch::channel(false);
        let sink = ChangeSink {
            changes: tx,
            leading,
        };
        forward("ConfigMap".into(), events(10_000), sink.clone(), CHILD).await;
        assert_eq!(rx.len(), 0, "a standby queued changes");

        leading_tx.send_replace(true);
        forward("ConfigMap".into(), events(3), sink, CHILD).await;
        let mut got = Vec::new();
        while let Ok(c) = rx.try_recv() {
            got.push(c);
        }
        assert_eq!(
            got,
            (0..3)
                .map(|i| Change::Child(format!("ns-{i}")))
                .collect::<Vec<_>>()
        );
    }

    /// The pod cache holds what the rollout reads and nothing else: a pod's
    /// env (secrets by name, tokens), volumes, images and labels stay out.
    #[test]
    fn the_pod_cache_holds_only_what_the_rollout_reads() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "namespace": "shop", "name": "checkout-0", "uid": "u1",
                "labels": {"app": "checkout"},
                "annotations": {"note": "x".repeat(4096), "weft.dev/injection-hash": "h1"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "hostNetwork": false,
                "initContainers": [
                    {"name": "weft-init", "image": "weft", "args": ["init"]},
                    {"name": "weft-proxy", "image": "weft", "restartPolicy": "Always",
                     "env": [{"name": "WEFT_POD_IP", "value": "10.1.0.7"},
                             {"name": "WEFT_WORKLOAD", "value": "checkout-v1"}]},
                ],
                "containers": [{
                    "name": "checkout", "image": "shop/checkout:1",
                    "env": [{"name": "DB_PASSWORD", "valueFrom":
                        {"secretKeyRef": {"name": "db", "key": "password"}}}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
            "status": {
                "phase": "Running", "podIP": "10.1.0.7",
                "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }))
        .expect("a pod");
        let before = serde_json::to_string(&pod).expect("json").len();
        prune_pod(&mut pod);
        let kept = serde_json::to_value(&pod).expect("json");
        assert_eq!(
            kept,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": "shop", "name": "checkout-0", "uid": "u1",
                             "annotations": {"weft.dev/injection-hash": "h1",
                                             "weft.dev/workload": "checkout-v1"}},
                "spec": {
                    "hostNetwork": false,
                    "initContainers": [{"name": "weft-init", "args": ["init"]}, {"name": "weft-proxy"}],
                    "containers": [{"name": "checkout"}],
                },
                "status": {
                    "phase": "Running", "podIP": "10.1.0.7",
                    "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}],
                },
            })
        );
        assert!(
            kept.to_string().len() * 10 < before,
            "{before} bytes before"
        );
    }
}
