use std::path::PathBuf;

use super::*;
use crate::local::topology;

fn shop() -> (ClusterFacts, Topology) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/shop");
    let loaded = crate::manifest::load(std::slice::from_ref(&dir)).expect("the example loads");
    let topo = topology::load(&dir.join(topology::DEFAULT_PATH)).expect("the topology loads");
    (loaded.facts, topo)
}

fn topo(workloads: &str) -> Topology {
    topology::parse(&format!(
        "apiVersion: local.weft.dev/v1alpha1\nkind: LocalTopology\nspec:\n  workloads:\n{workloads}"
    ))
    .expect("valid topology")
}

#[test]
fn netns_pods_get_addresses_in_order_and_services_their_endpoints() {
    let (facts, topo) = shop();
    let plan = plan(&facts, &topo, Mode::Netns).expect("plans");
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    let names: Vec<&str> = plan.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "shopper-0",
            "catalog-0",
            "cart-0",
            "checkout-0",
            "checkout-1",
            "checkout-canary-0",
            "inventory-0",
            "inventory-1",
            "notifications-0",
            "payments-0"
        ]
    );
    assert_eq!(plan.pods[0].ip, Ipv4Addr::new(10, 77, 0, 10));
    let shop = &plan.configs["shop"];
    let endpoints = |name: &str| addresses(&plan, "shop", name);
    assert_eq!(
        endpoints("checkout"),
        ["10.77.0.13:8080", "10.77.0.14:8080"]
    );
    assert_eq!(endpoints("checkout-canary"), ["10.77.0.15:8080"]);
    assert_eq!(endpoints("payments"), ["10.77.0.19:8080"]);
    // Published as discovery publishes them, not in the config.
    assert!(
        shop.outbound
            .services
            .iter()
            .all(|s| s.endpoints.is_empty())
    );
    let doc = &plan.endpoints["shop"];
    assert_eq!(doc.generation, doc.clone().seal().generation);
    let payments = &doc.services["payments.payments"].groups[0].endpoints[0];
    assert_eq!(payments.service_account.as_deref(), Some("payments"));
    assert_eq!(payments.pod.as_deref(), Some("payments-0"));

    let checkout = &plan.pods[3];
    assert_eq!(
        checkout.app_args,
        [
            "--listen",
            "0.0.0.0:8080",
            "--name",
            "checkout",
            "--call",
            "http://inventory.shop:80/reserve",
            "--call",
            "http://payments.payments:80/charge",
            "--call",
            "http://notifications.shop:80/send"
        ]
    );
    // The example Services carry no ClusterIP (a real API server allocates
    // them): the hosts file names the addresses weft local allocated.
    let ip_of = |name: &str| {
        shop.outbound
            .services
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.cluster_ips.first().cloned())
            .expect(name)
    };
    let (checkout_ip, payments_ip) = (ip_of("checkout"), ip_of("payments"));
    assert!(checkout_ip.starts_with("10.96.255."), "{checkout_ip}");
    assert_ne!(checkout_ip, payments_ip);
    let hosts = checkout.hosts.as_deref().expect("hosts");
    assert!(
        hosts.contains(&format!(
            "{checkout_ip} checkout.shop.svc.cluster.local checkout.shop.svc checkout.shop checkout\n"
        )),
        "{hosts}"
    );
    assert!(hosts.contains(&format!("{payments_ip} payments.payments.svc.cluster.local payments.payments.svc payments.payments\n")), "{hosts}");
    assert!(checkout.host_ports.is_empty());
    assert!(!checkout.proxy_args.contains(&"--no-transparent".to_owned()));
    let shopper = &plan.pods[0];
    assert!(
        shopper.app_args.windows(2).any(|w| w == ["--rps", "10"]),
        "{:?}",
        shopper.app_args
    );
    let inventory = &plan.pods[6];
    assert!(
        inventory
            .app_args
            .windows(2)
            .any(|w| w == ["--error-rate", "0.2"])
    );
}

#[test]
fn loopback_pods_get_distinct_ports_and_call_through_their_sidecar() {
    let (facts, topo) = shop();
    let plan = plan(&facts, &topo, Mode::Loopback { base_port: 20000 }).expect("plans");
    let mut all: Vec<u16> = plan
        .pods
        .iter()
        .flat_map(|p| p.host_ports.clone())
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "no port is used twice");
    assert_eq!(all[0], 20000);
    let catalog = &plan.pods[1];
    // catalog: app, inbound, admin, probe, then an outbound map for
    // inventory and one for the supplier's feed.
    assert_eq!(catalog.host_ports.len(), 6);
    let feed = catalog.host_ports[5];
    assert!(
        catalog
            .app_args
            .contains(&format!("http://127.0.0.1:{feed}/v2/products/42"))
    );
    assert!(
        catalog
            .proxy_args
            .contains(&format!("127.0.0.1:{feed}=feed.supplier.example:443"))
    );
    // The stub vendors listen on ports of their own.
    for v in &plan.vendors {
        assert_eq!(v.ip, std::net::Ipv4Addr::LOCALHOST);
        assert!(!all.contains(&v.port), "{} shares a pod's port", v.name);
    }
    let out = catalog.host_ports[4];
    assert!(
        catalog
            .app_args
            .contains(&format!("http://127.0.0.1:{out}/stock"))
    );
    assert!(
        catalog
            .proxy_args
            .contains(&format!("127.0.0.1:{out}=inventory.shop:80"))
    );
    let inbound = catalog.host_ports[1];
    assert!(
        catalog
            .proxy_args
            .contains(&format!("127.0.0.1:{inbound}={}", catalog.app_port))
    );
    assert_eq!(
        addresses(&plan, "shop", "catalog"),
        [format!("127.0.0.1:{inbound}")]
    );
    assert!(catalog.hosts.is_none());
}

#[test]
fn bad_references_name_the_topology_field() {
    let (facts, _) = shop();
    let errors = plan(
        &facts,
        &topo(
            "  - name: a\n    namespace: shop\n    serviceAccount: default\n    calls: [http://nowhere.shop/x, http://cart.shop:81/]\n  - name: b\n    namespace: unmeshed\n",
        ),
        Mode::Netns,
    )
    .expect_err("bad references");
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        text[0].starts_with("spec.workloads[1].namespace: namespace \"unmeshed\" is not meshed"),
        "{text:?}"
    );
    assert!(
        text[1].starts_with("spec.workloads[1].serviceAccount: no ServiceAccount unmeshed/b"),
        "{text:?}"
    );

    let errors = plan(
        &facts,
        &topo("  - name: a\n    namespace: shop\n    serviceAccount: default\n    calls: [http://nowhere.shop/x, http://cart.shop:81/]\n"),
        Mode::Netns,
    )
    .expect_err("bad calls");
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(text[0].starts_with("spec.workloads[0].calls[0]: no Service or ExternalService \"nowhere.shop\" is reachable from namespace shop"), "{text:?}");
    assert_eq!(
        text[1],
        "spec.workloads[0].calls[1]: Service cart.shop has no port 81 (ports: 80)"
    );
}

#[test]
fn services_without_a_cluster_ip_get_one_and_unselected_services_warn() {
    let (mut facts, _) = shop();
    for svc in &mut facts.services {
        if let Some(spec) = svc.spec.as_mut() {
            spec.cluster_ip = None;
        }
    }
    let plan = plan(
        &facts,
        &topo("  - name: cart\n    namespace: shop\n"),
        Mode::Netns,
    )
    .expect("plans");
    let ips: Vec<&str> = plan.configs["shop"]
        .outbound
        .services
        .iter()
        .map(|s| s.cluster_ips[0].as_str())
        .collect();
    assert!(ips.iter().all(|ip| ip.starts_with("10.96.255.")), "{ips:?}");
    assert!(
        plan.warnings
            .iter()
            .any(|w| w
                == "Service shop/inventory selects no workload of the topology: calls to it fail"),
        "{:?}",
        plan.warnings
    );
}

/// A Service that has an address (manifests exported from a cluster) keeps
/// it; only the others get one from 10.96.255.0/24.
#[test]
fn a_service_keeps_the_cluster_ip_it_has() {
    let (mut facts, topo) = shop();
    let catalog = facts
        .services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("catalog"))
        .expect("catalog");
    catalog.spec.get_or_insert_with(Default::default).cluster_ip = Some("10.0.0.17".into());
    let plan = plan(&facts, &topo, Mode::Netns).expect("plans");
    let ips: BTreeMap<&str, &str> = plan.configs["shop"]
        .outbound
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.cluster_ips[0].as_str()))
        .collect();
    assert_eq!(ips["catalog"], "10.0.0.17");
    assert!(
        ips.iter()
            .filter(|(name, _)| **name != "catalog")
            .all(|(_, ip)| ip.starts_with("10.96.255.")),
        "{ips:?}"
    );
}

/// `ip:port` of each pod the plan publishes for Service `name` (in any
/// namespace) in `ns`'s endpoints document (one port per group: weft local's apps listen on one).
fn addresses(plan: &Plan, ns: &str, name: &str) -> Vec<String> {
    let doc = &plan.endpoints[ns];
    let (_, svc) = doc
        .services
        .iter()
        .find(|(key, _)| key.split('.').next() == Some(name))
        .expect(name);
    svc.groups
        .iter()
        .flat_map(|g| {
            let port = *g.ports.values().next().expect("a port");
            g.endpoints
                .iter()
                .flat_map(move |e| e.addresses.iter().map(move |a| format!("{a}:{port}")))
        })
        .collect()
}

/// Each ExternalService a workload calls gets a stub vendor after the
/// pods (its own address in network namespaces), the ExternalService's
/// endpoints point at it, and the callers' hosts files name the vendor's
/// hosts at an address their sidecar intercepts. A call to a port the
/// ExternalService does not list is refused by its topology field.
#[test]
fn the_vendors_called_get_a_stub_each_and_the_external_services_point_at_it() {
    let (facts, shop_topology) = shop();
    let planned = plan(&facts, &shop_topology, Mode::Netns).expect("plans");
    let plan_of_shop = &planned;
    let names: Vec<(&str, &str)> = plan_of_shop
        .vendors
        .iter()
        .map(|v| (v.namespace.as_str(), v.external_service.as_str()))
        .collect();
    assert_eq!(
        names,
        [("payments", "payment-gateway"), ("shop", "product-feed")]
    );
    let feed = &plan_of_shop.vendors[1];
    let s = crate::netns::SUBNET;
    assert_eq!(
        feed.ip,
        std::net::Ipv4Addr::new(s[0], s[1], s[2], 10 + plan_of_shop.pods.len() as u8 + 1)
    );
    assert_eq!((feed.port, feed.tls), (VENDOR_PORT, true));
    assert_eq!(feed.names, ["feed.supplier.example"]);
    assert_eq!(feed.name, "vendor.product-feed.shop");
    assert!(feed.app_args.contains(&"--cache-control".to_owned()));
    // The gateway's policy does not cache: its stub says nothing.
    assert!(
        !plan_of_shop.vendors[0]
            .app_args
            .contains(&"--cache-control".to_owned())
    );
    let es = plan_of_shop.configs["shop"]
        .outbound
        .external_services
        .iter()
        .find(|es| es.name == "product-feed")
        .expect("product-feed");
    assert_eq!(es.endpoints, [format!("{}:{VENDOR_PORT}", feed.ip)]);
    let catalog = plan_of_shop
        .pods
        .iter()
        .find(|p| p.workload == "catalog")
        .expect("catalog");
    assert!(
        catalog
            .app_args
            .contains(&"http://feed.supplier.example:443/v2/products/42".to_owned())
    );
    let hosts = catalog.hosts.as_deref().expect("hosts file");
    assert!(
        hosts.contains("10.96.254.1 feed.supplier.example\n"),
        "{hosts}"
    );

    let (facts, _) = shop();
    let bad = topo(
        "  - name: catalog\n    namespace: shop\n    calls: [http://feed.supplier.example:80/x]\n",
    );
    let errors = plan(&facts, &bad, Mode::Netns).expect_err("port 80 is not listed");
    assert_eq!(errors[0].path, "spec.workloads[0].calls[0]");
    assert!(
        errors[0].message.contains("no HTTP port 80"),
        "{}",
        errors[0]
    );
}
