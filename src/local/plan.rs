//! What `weft local up` will start, decided without touching the machine:
//! the compiled configs and endpoints documents (each Service's pods from the
//! topology's pods), and per pod its address, ports, the app's command line
//! and the sidecar's. The runner only carries it out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use super::topology::{CallUrl, Topology, Workload};
use crate::compile::{ClusterFacts, PolicyVerdict, compile};
use crate::config::{OutboundService, ProxyConfig};
use crate::proxy::{ADMIN_PORT, PROBE_PORT};

/// Where the pods run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each pod a network namespace with real `weft init` rules (root).
    Netns,
    /// Every process on 127.0.0.1, the proxies on explicit ports from
    /// `base_port` up (no root needed).
    Loopback { base_port: u16 },
}

/// ClusterIPs handed to Services that have none (the pods' hosts files
/// and the proxies' configs agree on them).
const VIRTUAL_IPS: [u8; 3] = [10, 96, 255];
/// What a vendor's name resolves to in a pod's hosts file (network
/// namespaces): any address outside the pod, which the sidecar
/// intercepts and routes by the name the request carries, as a public
/// address of the vendor in a cluster.
const VENDOR_IPS: [u8; 3] = [10, 96, 254];
/// Where a stub vendor listens in its own network namespace (not 443: it
/// runs as an unprivileged user).
pub const VENDOR_PORT: u16 = 8443;
/// Pods and stub vendors together: the bridge's addresses from .10.
const MAX_ADDRESSES: usize = 240;
/// What a stub vendor tells caches about its answers, where the
/// ExternalService's TrafficPolicy caches: fresh for 5 s, so the
/// catalog's feed shows cache hits.
const VENDOR_CACHE_CONTROL: &str = "max-age=5";

/// Where every probe and health check goes: never retried, never a failure.
pub const HEALTH_PATH: &str = "/healthz";

#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub trust_domain: String,
    /// Per meshed namespace, the compiled config.
    pub configs: BTreeMap<String, ProxyConfig>,
    /// Per meshed namespace, the pods behind the Services its config
    /// names: the same contract the operator publishes in a cluster
    /// (`weft-endpoints`), written next to each pod's config.
    pub endpoints: BTreeMap<String, crate::config::EndpointsConfig>,
    pub pods: Vec<PodPlan>,
    /// The stub vendors: one per ExternalService a workload calls.
    pub vendors: Vec<VendorPlan>,
    /// Every policy's verdict, as `weft compile` prints them.
    pub verdicts: Vec<PolicyVerdict>,
    /// Things that will work, but maybe not as the author meant.
    pub warnings: Vec<String>,
}

/// One pod: a demo app and its sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    /// `<workload>-<i>`.
    pub name: String,
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's address (127.0.0.1 on loopback).
    pub ip: Ipv4Addr,
    /// The app's port.
    pub app_port: u16,
    /// The sidecar's admin server, as seen from inside the pod.
    pub admin: SocketAddr,
    /// `weft-demo` arguments.
    pub app_args: Vec<String>,
    /// The app drives load (`drive` in the topology): it starts last.
    pub drives: bool,
    /// The pod's labels (the workload's), for the sidecar's labels file.
    pub labels: BTreeMap<String, String>,
    /// `weft-proxy` arguments, but for `--config`, `--identity-dir` and
    /// `--pod-labels-file`.
    pub proxy_args: Vec<String>,
    /// The pod's `/etc/hosts` (network namespaces only): Service names to
    /// ClusterIPs, which the sidecar intercepts.
    pub hosts: Option<String>,
    /// Every port the pod listens on in the host's own network (loopback
    /// only), so the runner can check they are free.
    pub host_ports: Vec<u16>,
}

/// A vendor outside the cluster that an ExternalService names and a
/// workload calls: `weft local` runs a stub of it, a `weft-demo` answering
/// for the ExternalService's hosts (over TLS where the proxies originate
/// it, with a certificate of a CA made for the run, which the runner puts
/// in the ExternalService's `caCertificates`), and the plan points the
/// ExternalService at it (`endpoints`), as DNS would in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorPlan {
    /// `vendor-<ExternalService>`: its network namespace and log.
    pub name: String,
    pub namespace: String,
    pub external_service: String,
    /// The names its certificate carries: the ExternalService's hosts
    /// (wildcards as they are) and its ports' `serverName`s.
    pub names: Vec<String>,
    /// Where it listens: its own network namespace's address, or
    /// 127.0.0.1 on loopback.
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The proxies originate TLS to it.
    pub tls: bool,
    /// `weft-demo` arguments, but for the certificate files.
    pub app_args: Vec<String>,
}

/// A problem that stops the plan, with the topology field it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Plans the mesh: compiles `facts` (after giving ClusterIPs to Services
/// without one) and lays the topology's pods out for `mode`.
pub fn plan(facts: &ClusterFacts, topology: &Topology, mode: Mode) -> Result<Plan, Vec<PlanError>> {
    let mut facts = facts.clone();
    assign_cluster_ips(&mut facts.services);
    let mut compiled = compile(&facts);
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let err = |path: String, message: String| PlanError { path, message };

    let accounts: BTreeSet<(String, String)> = facts
        .service_accounts
        .iter()
        .map(|sa| (sa.namespace().unwrap_or_default(), sa.name_any()))
        .collect();
    for (i, w) in topology.workloads.iter().enumerate() {
        if !compiled.configs.contains_key(&w.namespace) {
            errors.push(err(
                format!("spec.workloads[{i}].namespace"),
                format!(
                    "namespace {:?} is not meshed or not defined: define it with the label weft.dev/inject=enabled (meshed: {})",
                    w.namespace,
                    compiled.configs.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let sa = w.service_account();
        if sa != "default" && !accounts.contains(&(w.namespace.clone(), sa.to_owned())) {
            errors.push(err(
                format!("spec.workloads[{i}].serviceAccount"),
                format!(
                    "no ServiceAccount {}/{sa} in the manifests: add it, or use `default`",
                    w.namespace
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // Pods, in topology order; addresses and ports follow from the order.
    let mut ports = PortAllocator::new(mode);
    let mut pods = Vec::new();
    let mut inbound_ports = Vec::new();
    // The ExternalServices called, by namespace and index, and the vendor
    // hosts called (a wildcard's hosts have no entry of their own).
    let mut called: BTreeSet<(String, usize)> = BTreeSet::new();
    let mut called_hosts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, w) in topology.workloads.iter().enumerate() {
        let config = &compiled.configs[&w.namespace];
        let mut targets: Vec<(String, CallUrl, String)> = Vec::new();
        for (field, urls) in [("calls", &w.calls), ("drive", &w.drive)] {
            for (j, url) in urls.iter().enumerate() {
                let path = format!("spec.workloads[{i}].{field}[{j}]");
                let Ok(call) = CallUrl::parse(url) else {
                    continue; // the topology check reported it
                };
                match resolve(config, &w.namespace, &call) {
                    Ok(Resolved::Service(svc)) => targets.push((field.to_owned(), call, svc)),
                    Ok(Resolved::Vendor(index)) => {
                        called.insert((w.namespace.clone(), index));
                        called_hosts
                            .entry(w.namespace.clone())
                            .or_default()
                            .insert(call.host.clone());
                        // The proxy routes a vendor's call by its name.
                        let host = call.host.clone();
                        targets.push((field.to_owned(), call, host));
                    }
                    Err(message) => errors.push(err(path, message)),
                }
            }
        }
        for r in 0..w.replicas {
            let ip = ports.pod_ip(pods.len());
            let app_port = ports.next_or(w.port);
            let inbound = ports.next_or(0);
            let admin = SocketAddr::from((ports.listen_ip(), ports.next_or(ADMIN_PORT)));
            let probe = SocketAddr::from((ports.listen_ip(), ports.next_or(PROBE_PORT)));
            let mut maps = Vec::new();
            let mut app_args = vec![
                "--listen".to_owned(),
                SocketAddr::from((ports.listen_ip(), app_port)).to_string(),
                "--name".to_owned(),
                w.name.clone(),
            ];
            for (field, call, svc) in &targets {
                let url = match mode {
                    Mode::Netns => format!("http://{}:{}{}", call.host, call.port, call.path),
                    Mode::Loopback { .. } => {
                        let target = format!("{svc}:{}", call.port);
                        let port = match maps.iter().find(|(_, t)| *t == target) {
                            Some((p, _)) => *p,
                            None => {
                                let p = ports.next_or(0);
                                maps.push((p, target));
                                p
                            }
                        };
                        format!("http://127.0.0.1:{port}{}", call.path)
                    }
                };
                let flag = if field == "calls" {
                    "--call"
                } else {
                    "--drive"
                };
                app_args.extend([flag.to_owned(), url]);
            }
            if !w.drive.is_empty() {
                app_args.extend(["--rps".to_owned(), w.rps.to_string()]);
            }
            if w.error_rate > 0.0 {
                app_args.extend(["--error-rate".to_owned(), w.error_rate.to_string()]);
            }
            if let Some(latency) = w.latency {
                app_args.extend(["--latency".to_owned(), latency.to_string()]);
            }
            let mut proxy_args: Vec<String> = [
                "--workload",
                &w.name,
                "--namespace",
                &w.namespace,
                "--service-account",
                w.service_account(),
                "--trust-domain",
                &compiled.configs[&w.namespace].trust_domain,
                "--health-path",
                HEALTH_PATH,
                "--no-api-watch",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            if let Mode::Loopback { .. } = mode {
                proxy_args.extend([
                    "--no-transparent".to_owned(),
                    "--admin".to_owned(),
                    admin.to_string(),
                    "--probe".to_owned(),
                    probe.to_string(),
                    "--inbound-map".to_owned(),
                    format!("127.0.0.1:{inbound}={app_port}"),
                ]);
                for (port, target) in &maps {
                    proxy_args.extend([
                        "--outbound-map".to_owned(),
                        format!("127.0.0.1:{port}={target}"),
                    ]);
                }
            }
            let host_ports = match mode {
                Mode::Netns => Vec::new(),
                Mode::Loopback { .. } => [app_port, inbound, admin.port(), probe.port()]
                    .into_iter()
                    .chain(maps.iter().map(|(p, _)| *p))
                    .collect(),
            };
            inbound_ports.push(inbound);
            pods.push(PodPlan {
                name: format!("{}-{r}", w.name),
                workload: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account().to_owned(),
                ip,
                app_port,
                admin,
                app_args,
                drives: !w.drive.is_empty(),
                labels: w.pod_labels(),
                proxy_args,
                hosts: None,
                host_ports,
            });
        }
    }
    // The stub vendors, after the pods (their addresses follow).
    let mut vendors = Vec::new();
    for (namespace, index) in &called {
        let Some(config) = compiled.configs.get_mut(namespace) else {
            continue;
        };
        let es = &mut config.outbound.external_services[*index];
        // One stub, one listener: the ExternalService's HTTP ports must
        // agree on TLS (every port's endpoint is the stub).
        let http_ports = es
            .ports
            .iter()
            .filter(|p| p.protocol == crate::config::ExternalPortProtocol::Http);
        let tls_modes: BTreeSet<bool> = http_ports.map(|p| p.tls.is_some()).collect();
        if tls_modes.len() > 1 {
            errors.push(err(
                String::new(),
                format!(
                    "ExternalService {namespace}/{} has HTTP ports with and without `tls`: weft local runs one stub vendor per ExternalService; split it in two",
                    es.name
                ),
            ));
            continue;
        }
        let ip = ports.pod_ip(pods.len() + vendors.len());
        let port = ports.next_or(VENDOR_PORT);
        let listen = SocketAddr::from((ports.listen_ip(), port));
        es.endpoints = vec![SocketAddr::from((ip, port)).to_string()];
        let mut names = es.hosts.clone();
        names.extend(
            es.ports
                .iter()
                .filter_map(|p| p.tls.as_ref()?.server_name.clone()),
        );
        names.sort();
        names.dedup();
        // Dots: no pod (`<workload>-<i>`) and no other namespace's vendor
        // can take the name.
        let cached = es.policy.as_ref().is_some_and(|p| p.cache.is_some());
        let mut app_args = vec![
            "--listen".to_owned(),
            listen.to_string(),
            "--name".to_owned(),
            es.name.clone(),
        ];
        if cached {
            app_args.extend([
                "--cache-control".to_owned(),
                VENDOR_CACHE_CONTROL.to_owned(),
            ]);
        }
        vendors.push(VendorPlan {
            name: format!("vendor.{}.{namespace}", es.name),
            namespace: namespace.clone(),
            external_service: es.name.clone(),
            names,
            ip,
            port,
            tls: tls_modes.contains(&true),
            app_args,
        });
    }
    if pods.len() + vendors.len() > MAX_ADDRESSES {
        errors.push(err(
            String::new(),
            format!(
                "{} pods and {} stub vendors: weft local has addresses for {MAX_ADDRESSES}",
                pods.len(),
                vendors.len()
            ),
        ));
    }
    if let Some(e) = ports.exhausted() {
        errors.push(err(String::new(), e));
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // Endpoints: the pods each Service selects.
    let workloads: Vec<(&Workload, BTreeMap<String, String>)> = topology
        .workloads
        .iter()
        .map(|w| (w, w.pod_labels()))
        .collect();
    let mut endpoints: BTreeMap<(String, String), Vec<crate::config::EndpointGroup>> =
        BTreeMap::new();
    for svc in &facts.services {
        let key = (svc.namespace().unwrap_or_default(), svc.name_any());
        let selector = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        let port_count = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map_or(0, Vec::len);
        let selected = |w: &Workload, labels: &BTreeMap<String, String>| {
            w.namespace == key.0
                && !selector.is_empty()
                && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        };
        // As EndpointSlices give them: every Service port name (weft
        // local sends them all to the app's one port) to where the pod
        // listens, the pod, and its ServiceAccount.
        let port_names: Vec<String> = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| p.name.clone().unwrap_or_default())
            .collect();
        let mut list = Vec::new();
        for (pod, inbound) in pods.iter().zip(&inbound_ports) {
            let Some((w, _)) = workloads
                .iter()
                .find(|(w, labels)| w.name == pod.workload && selected(w, labels))
            else {
                continue;
            };
            let addr = match mode {
                Mode::Netns => SocketAddr::from((pod.ip, w.port)),
                Mode::Loopback { .. } => SocketAddr::from(([127, 0, 0, 1], *inbound)),
            };
            list.push(crate::config::EndpointGroup {
                ports: port_names
                    .iter()
                    .map(|n| (n.clone(), addr.port()))
                    .collect(),
                endpoints: vec![crate::config::EndpointEntry {
                    addresses: vec![addr.ip().to_string()],
                    ready: true,
                    pod: Some(pod.name.clone()),
                    service_account: Some(pod.service_account.clone()),
                    ..Default::default()
                }],
            });
        }
        if list.is_empty() {
            if compiled.configs.contains_key(&key.0) {
                warnings.push(format!(
                    "Service {}/{} selects no workload of the topology: calls to it fail",
                    key.0, key.1
                ));
            }
            continue;
        }
        if port_count > 1 {
            warnings.push(format!(
                "Service {}/{} has {port_count} ports; weft local sends all of them to the app's one port",
                key.0, key.1
            ));
        }
        check_target_ports(svc, &key, &workloads, &selected, &mut warnings);
        endpoints.insert(key, list);
    }
    let configs = compiled.configs;
    let endpoints: BTreeMap<String, crate::config::EndpointsConfig> = configs
        .iter()
        .map(|(ns, config)| {
            let services = config
                .outbound
                .services
                .iter()
                .filter_map(|svc| {
                    let groups = endpoints.get(&(svc.namespace.clone(), svc.name.clone()))?;
                    Some((
                        crate::config::EndpointsConfig::key(&svc.namespace, &svc.name),
                        crate::config::ServiceEndpoints {
                            groups: groups.clone(),
                            ..Default::default()
                        },
                    ))
                })
                .collect();
            let doc = crate::config::EndpointsConfig {
                namespace: ns.clone(),
                services,
                ..Default::default()
            };
            (ns.clone(), doc.seal())
        })
        .collect();
    if mode == Mode::Netns {
        for pod in &mut pods {
            let called = called_hosts
                .get(&pod.namespace)
                .cloned()
                .unwrap_or_default();
            pod.hosts = Some(hosts_file(&configs[&pod.namespace], pod, &called));
        }
    }
    let trust_domain = configs
        .values()
        .next()
        .map(|c| c.trust_domain.clone())
        .unwrap_or_else(|| crate::compile::CLUSTER_DOMAIN.to_owned());
    Ok(Plan {
        mode,
        trust_domain,
        configs,
        endpoints,
        pods,
        vendors,
        verdicts: compiled.verdicts,
        warnings,
    })
}

/// Warns when a Service's numeric targetPort is not the port the selected
/// workloads listen on (weft local uses the workload's port).
fn check_target_ports(
    svc: &Service,
    key: &(String, String),
    workloads: &[(&Workload, BTreeMap<String, String>)],
    selected: &dyn Fn(&Workload, &BTreeMap<String, String>) -> bool,
    warnings: &mut Vec<String>,
) {
    let target = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| p.target_port.as_ref());
    let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(target)) = target
    else {
        return;
    };
    for (w, labels) in workloads {
        if selected(w, labels) && i32::from(w.port) != *target {
            warnings.push(format!(
                "Service {}/{} targets port {target} but workload {} listens on {}; weft local uses {}",
                key.0, key.1, w.name, w.port, w.port
            ));
        }
    }
}

/// What a call URL names.
enum Resolved {
    /// A Service, as the proxy's target `name.ns`.
    Service(String),
    /// The `index`-th ExternalService of the namespace's config.
    Vendor(usize),
}

/// Whether ExternalService host `pattern` (exact, or `*.` one label)
/// claims `host`, as the proxy matches them.
fn claims(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

/// The Service (or ExternalService) a call URL names from `namespace`;
/// the message says what is reachable when nothing matches.
fn resolve(config: &ProxyConfig, namespace: &str, call: &CallUrl) -> Result<Resolved, String> {
    let matches = |svc: &OutboundService| {
        svc.hostnames.contains(&call.host) || (svc.namespace == namespace && svc.name == call.host)
    };
    let Some(svc) = config.outbound.services.iter().find(|s| matches(s)) else {
        let vendor = config.outbound.external_services.iter().position(|es| {
            es.namespace == namespace && es.hosts.iter().any(|h| claims(h, &call.host))
        });
        if let Some(index) = vendor {
            let es = &config.outbound.external_services[index];
            let http = es.ports.iter().any(|p| {
                p.port == call.port && p.protocol == crate::config::ExternalPortProtocol::Http
            });
            if !http {
                let ports: Vec<String> = es.ports.iter().map(|p| p.port.to_string()).collect();
                return Err(format!(
                    "ExternalService {}/{} has no HTTP port {} (ports: {}): the demo calls vendors in plain HTTP, which the proxy turns into TLS where the port says `tls`",
                    es.namespace,
                    es.name,
                    call.port,
                    ports.join(", ")
                ));
            }
            return Ok(Resolved::Vendor(index));
        }
        let known: Vec<String> = config
            .outbound
            .services
            .iter()
            .map(|s| format!("{}.{}", s.name, s.namespace))
            .chain(
                config
                    .outbound
                    .external_services
                    .iter()
                    .filter(|es| es.namespace == namespace)
                    .flat_map(|es| es.hosts.iter().cloned()),
            )
            .collect();
        return Err(format!(
            "no Service or ExternalService {:?} is reachable from namespace {namespace} (reachable: {})",
            call.host,
            known.join(", ")
        ));
    };
    if !svc.ports.iter().any(|p| p.port == call.port) {
        let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
        return Err(format!(
            "Service {}.{} has no port {} (ports: {})",
            svc.name,
            svc.namespace,
            call.port,
            ports.join(", ")
        ));
    }
    Ok(Resolved::Service(format!("{}.{}", svc.name, svc.namespace)))
}

/// Gives every Service without a ClusterIP (or headless) one from
/// 10.96.255.0/24, in name order, so hosts files have an address to name.
fn assign_cluster_ips(services: &mut [Service]) {
    let mut sorted: Vec<&mut Service> = services.iter_mut().collect();
    sorted.sort_by_key(|s| (s.namespace(), s.name_any()));
    let mut next = 1u8;
    for svc in sorted {
        let spec = svc.spec.get_or_insert_with(Default::default);
        let has_ip = spec
            .cluster_ip
            .as_deref()
            .is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_ok());
        if !has_ip && next < 255 {
            let ip = Ipv4Addr::new(VIRTUAL_IPS[0], VIRTUAL_IPS[1], VIRTUAL_IPS[2], next);
            spec.cluster_ip = Some(ip.to_string());
            spec.cluster_ips = Some(vec![ip.to_string()]);
            next += 1;
        }
    }
}

/// `/etc/hosts` of a pod: every Service its namespace's config can reach,
/// by each of its names (the short one in its own namespace), and every
/// exact host of its namespace's ExternalServices and every vendor host
/// the namespace's workloads call (one a wildcard claims), at an address
/// of [`VENDOR_IPS`] the sidecar intercepts.
fn hosts_file(config: &ProxyConfig, pod: &PodPlan, called: &BTreeSet<String>) -> String {
    let mut out = format!(
        "127.0.0.1 localhost\n::1 localhost\n{} {}\n",
        pod.ip, pod.name
    );
    for svc in &config.outbound.services {
        let Some(ip) = svc.cluster_ips.first() else {
            continue;
        };
        let mut names = svc.hostnames.clone();
        if svc.namespace == pod.namespace {
            names.push(svc.name.clone());
        }
        out.push_str(&format!("{ip} {}\n", names.join(" ")));
    }
    let vendor_hosts: BTreeSet<&String> = config
        .outbound
        .external_services
        .iter()
        .filter(|es| es.namespace == pod.namespace)
        .flat_map(|es| es.hosts.iter())
        .filter(|h| !h.starts_with("*."))
        .chain(called)
        .collect();
    for (i, host) in vendor_hosts.into_iter().enumerate().take(250) {
        let ip = Ipv4Addr::new(VENDOR_IPS[0], VENDOR_IPS[1], VENDOR_IPS[2], 1 + i as u8);
        out.push_str(&format!("{ip} {host}\n"));
    }
    out
}

/// Addresses and ports in plan order.
struct PortAllocator {
    mode: Mode,
    next: u32,
}

impl PortAllocator {
    fn new(mode: Mode) -> Self {
        let next = match mode {
            Mode::Netns => 0,
            Mode::Loopback { base_port } => u32::from(base_port),
        };
        Self { mode, next }
    }

    fn pod_ip(&self, index: usize) -> Ipv4Addr {
        match self.mode {
            // The order `netns::Network::add_pod` hands addresses out in.
            Mode::Netns => {
                let s = crate::netns::SUBNET;
                Ipv4Addr::new(s[0], s[1], s[2], 10 + index as u8)
            }
            Mode::Loopback { .. } => Ipv4Addr::LOCALHOST,
        }
    }

    fn listen_ip(&self) -> Ipv4Addr {
        match self.mode {
            Mode::Netns => Ipv4Addr::UNSPECIFIED,
            Mode::Loopback { .. } => Ipv4Addr::LOCALHOST,
        }
    }

    /// In a pod of its own a process keeps its usual port; on loopback
    /// every port is the next free number.
    fn next_or(&mut self, in_pod: u16) -> u16 {
        match self.mode {
            Mode::Netns => in_pod,
            Mode::Loopback { .. } => {
                let p = self.next;
                self.next += 1;
                u16::try_from(p).unwrap_or(0)
            }
        }
    }

    fn exhausted(&self) -> Option<String> {
        (self.next > u32::from(u16::MAX))
            .then(|| "the loopback ports run past 65535: pass a lower --base-port".to_owned())
    }
}

#[cfg(test)]
mod tests;
