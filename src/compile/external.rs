//! ExternalService: from specs to the entries of their own namespace's
//! config, with a verdict each.
//!
//! A host belongs to one ExternalService per namespace: the oldest that
//! names it (creationTimestamp, then name, as for every conflict). A
//! newer one naming a taken host is refused whole, `Accepted=False
//! Conflicted`, naming the host and its owner: a request to that host
//! cannot follow two policies.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::ResourceExt;

use super::verdict::{PolicyKind, Verdicts};
use super::{CLUSTER_DOMAIN, ServiceKey, age_order};
use crate::api::conditions::reason;
use crate::api::{ExternalProtocol, ExternalService};
use crate::config::{
    ExternalPortConfig, ExternalPortProtocol, ExternalServiceConfig, OriginateTlsConfig,
};

/// The accepted ExternalServices by (namespace, name), policy not yet
/// attached.
pub(crate) fn resolve(
    all: &[ExternalService],
    meshed: &BTreeSet<String>,
    verdicts: &mut Verdicts,
) -> BTreeMap<ServiceKey, ExternalServiceConfig> {
    let mut sorted: Vec<&ExternalService> = all.iter().collect();
    sorted.sort_by(|a, b| age_order(*a, *b));
    // (namespace, host) -> the ExternalService that holds it.
    let mut owners: HashMap<(String, String), String> = HashMap::new();
    let mut out = BTreeMap::new();
    for es in sorted {
        let (ns, name) = (es.namespace().unwrap_or_default(), es.name_any());
        let mut v = verdicts.start(PolicyKind::ExternalService, es);
        if let Err(why) = check(es) {
            v.reject(reason::INVALID, why);
            verdicts.push(v);
            continue;
        }
        let taken: Vec<String> = es
            .spec
            .hosts
            .iter()
            .filter_map(|h| {
                owners
                    .get(&(ns.clone(), h.clone()))
                    .map(|owner| format!("{h} (ExternalService {ns}/{owner})"))
            })
            .collect();
        if !taken.is_empty() {
            v.conflict(format!(
                "hosts already claimed by older ExternalServices of the namespace: {}; a host can follow one policy, so move it to one object or delete this one",
                taken.join(", ")
            ));
            verdicts.push(v);
            continue;
        }
        for h in &es.spec.hosts {
            owners.insert((ns.clone(), h.clone()), name.clone());
        }
        v.accept();
        v.resolved();
        if meshed.contains(&ns) {
            v.programmed(format!("in the proxy config of namespace {ns}"));
        } else {
            v.not_programmed(
                reason::NAMESPACE_NOT_MESHED,
                format!(
                    "namespace {ns} is not meshed (label it weft.dev/inject=enabled): no proxy calls this destination"
                ),
            );
        }
        verdicts.push(v);
        out.insert((ns.clone(), name.clone()), entry(es, ns, name));
    }
    out
}

/// What the schema cannot say: hosts inside the cluster, and CA
/// certificates that are not PEM certificates.
fn check(es: &ExternalService) -> Result<(), String> {
    let cluster = format!(".{CLUSTER_DOMAIN}");
    for (i, h) in es.spec.hosts.iter().enumerate() {
        let bare = h.trim_start_matches("*.");
        if bare.ends_with(&cluster) || bare == CLUSTER_DOMAIN || bare.ends_with(".svc") {
            return Err(format!(
                "hosts[{i}] {h:?} is a name inside the cluster; ExternalService is for destinations outside it (a Service is reached by its own name)"
            ));
        }
        // Resolvers read `10.1` or `0xa.1` as addresses too (a name whose
        // last label is a number, as WHATWG URL parsing says).
        let last = bare.rsplit('.').next().unwrap_or(bare);
        let numeric = last.bytes().all(|b| b.is_ascii_digit())
            || (last.starts_with("0x") && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        if bare.parse::<std::net::IpAddr>().is_ok() || numeric {
            return Err(format!(
                "hosts[{i}] {h:?} is an address; ExternalService hosts are DNS names (requests and ClientHellos are matched by the name they carry)"
            ));
        }
    }
    for (i, p) in es.spec.ports.iter().enumerate() {
        if let Some(pem) = p.tls.as_ref().and_then(|t| t.ca_certificates.as_deref()) {
            let certs = crate::proxy::origin::parse_ca_pem(pem).map_err(|e| {
                format!("ports[{i}].tls.caCertificates: {e}; paste the CA certificates in PEM (-----BEGIN CERTIFICATE-----)")
            })?;
            if certs == 0 {
                return Err(format!(
                    "ports[{i}].tls.caCertificates holds no PEM certificate; paste the CA certificates in PEM (-----BEGIN CERTIFICATE-----)"
                ));
            }
        }
    }
    Ok(())
}

fn entry(es: &ExternalService, namespace: String, name: String) -> ExternalServiceConfig {
    let mut hosts = es.spec.hosts.clone();
    hosts.sort();
    hosts.dedup();
    let mut ports: Vec<ExternalPortConfig> = es
        .spec
        .ports
        .iter()
        .map(|p| ExternalPortConfig {
            port: p.port,
            protocol: match p.protocol {
                ExternalProtocol::Http => ExternalPortProtocol::Http,
                ExternalProtocol::Https | ExternalProtocol::Tls => ExternalPortProtocol::Tls,
            },
            target_port: p.vendor_port(),
            tls: p.tls.as_ref().map(|t| OriginateTlsConfig {
                ca_certificates: t.ca_certificates.clone(),
                server_name: t.server_name.clone(),
                client_certificate: t.client_certificate.as_ref().map(|c| c.secret_name.clone()),
            }),
        })
        .collect();
    ports.sort_by_key(|p| p.port);
    ExternalServiceConfig {
        name,
        namespace,
        hosts,
        ports,
        policy: None,
        endpoints: Vec::new(),
    }
}
