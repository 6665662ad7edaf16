//! `ExternalService`: a destination outside the cluster (a payment
//! gateway, a carrier's API) that a namespace's workloads call, so that
//! their proxies apply policy to it and measure it like any Service
//! rather than passing its bytes through unseen.
//!
//! Namespaced, and seen only by the proxies of its own namespace: the team
//! that calls a vendor owns how it is called (its quota, its timeouts, its
//! CA), and Kubernetes RBAC on the namespace says who may change that. Two
//! teams calling one vendor each declare it (as Istio's `ServiceEntry`
//! with `exportTo: "."`).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::PolicyStatus;

/// A destination outside the cluster, by host name.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "ExternalService",
    namespaced,
    doc = "A destination outside the cluster that this namespace's workloads call by host name: its proxies apply TrafficPolicy to it, measure it, and can originate TLS to it.",
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "wext",
    category = "weft",
    printcolumn(name = "Hosts", type_ = "string", json_path = ".spec.hosts"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.ports.all(p, self.ports.exists_one(q, q.port == p.port))").message("each port may be listed once in ports"))]
pub struct ExternalServiceSpec {
    /// The names workloads call it by, as they put them in the URL (the
    /// HTTP `Host`): exact (`api.payments.example`), or a wildcard of one
    /// leftmost label (`*.carrier.example` matches `eu.carrier.example`,
    /// not `carrier.example` nor `a.b.carrier.example`). Lowercase. A name
    /// already claimed by an older ExternalService of the namespace stays
    /// its.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(inner(regex(
        pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)+$"
    ), length(max = 253)), extend("x-kubernetes-list-type" = "set"))]
    pub hosts: Vec<String>,
    /// The ports workloads dial.
    #[schemars(length(min = 1, max = 16))]
    pub ports: Vec<ExternalPort>,
}

/// A port of an external destination.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.tls) || self.protocol == 'HTTP'").message("ports[].tls (TLS origination) is for protocol HTTP: with HTTPS or TLS the app speaks TLS itself and the proxy passes it through"))]
pub struct ExternalPort {
    /// The port the workload dials (`80` for `http://api.payments.example`).
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// What the workload speaks on it: `HTTP`, plain HTTP/1.1 (the proxy
    /// routes by the `Host` header, applies TrafficPolicy and, with `tls`,
    /// speaks HTTPS to the vendor); `HTTPS` or `TLS`, its own TLS, which
    /// the proxy passes through untouched, routed and counted by the
    /// ClientHello's SNI (no request-level policy: the proxy cannot see
    /// the requests).
    pub protocol: ExternalProtocol,
    /// Where the vendor listens; default: `port`, or 443 with `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<u16>,
    /// TLS origination: the workload speaks plain HTTP to the proxy, which
    /// connects to the vendor with TLS and verifies its certificate, so
    /// the app needs no CA bundle of its own and the proxy sees (and
    /// applies policy to) every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OriginateTls>,
}

/// What a workload speaks to an external port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExternalProtocol {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
    #[serde(rename = "TLS")]
    Tls,
}

/// How the proxy connects to the vendor with TLS.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OriginateTls {
    /// PEM certificates of the CAs that may sign the vendor's certificate
    /// (a private CA, or a pinned public one). Unset: the Mozilla root
    /// store built into the proxy (the `webpki-roots` set, the public CAs
    /// browsers trust).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub ca_certificates: Option<String>,
    /// The name sent as SNI and that the vendor's certificate must carry.
    /// Unset: the host the workload called (the `Host` header's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(
            pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)+$"
        ),
        length(max = 253)
    )]
    pub server_name: Option<String>,
    /// A client certificate the proxy presents to the vendor (mutual TLS,
    /// as payment gateways and banks ask): a TLS Secret of this namespace
    /// (`tls.crt`, the chain, leaf first; `tls.key`; at most 32 KiB
    /// together, at most 8 such Secrets per namespace). The operator
    /// copies it into the namespace's identity Secrets, which only the
    /// proxies mount, so the app never holds the key; a renewed Secret
    /// reaches the proxies within the operator's resync (5 min), the
    /// kubelet's (about 1 min) and the proxy's recheck (10 s). While the
    /// Secret is missing or unusable the ExternalService gets a Warning
    /// Event (`ClientCertificateNotFound`, `ClientCertificateInvalid`: not
    /// a key pair, expired, too large, or one of weft's own Secrets) and
    /// the proxies send the vendor nothing
    /// (`weft_proxy_outbound_tls_origination_failures_total`, reason
    /// `client-certificate`); a deleted Secret is withdrawn from running
    /// proxies the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificateRef>,
}

/// A `kubernetes.io/tls` Secret in the ExternalService's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateRef {
    /// The Secret's name (at most 240 characters: the operator stores it
    /// under `egress.<name>.crt`, and a Secret's keys are at most 253).
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(min = 1, max = 240)
    )]
    pub secret_name: String,
}

impl ExternalPort {
    /// The vendor's port: `targetPort`, else 443 when originating TLS, else
    /// the port dialled.
    pub fn vendor_port(&self) -> u16 {
        self.target_port
            .unwrap_or(if self.tls.is_some() { 443 } else { self.port })
    }
}
