//! What a meshed namespace should hold, built without I/O: the ConfigMap
//! with its compiled `ProxyConfig`, the Secret with its workload identities,
//! and the Role and RoleBinding that let the namespace's proxies read that
//! one ConfigMap. The reconciler applies these with server-side apply.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;

use crate::config::{CONFIG_GZ_KEY, CONFIG_KEY, CONFIG_MAP_NAME, ProxyConfig, StoredConfig};
use crate::identity::{
    CA_CERT_KEY, IDENTITY_SECRET, IdentityError, MeshCa, SpiffeId, bundle_hash, inspect_pem,
};

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "weft-operator";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "weft";
/// `MANAGED_BY_LABEL=MANAGED_BY`, for watches and pruning.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=weft";
/// The Role (and RoleBinding) that lets a namespace's proxies watch their
/// ConfigMap.
pub const CONFIG_READER: &str = "weft-proxy-config-reader";
/// Annotation on the Secret: the trust bundle's hash, for humans and the
/// rollout's "every proxy trusts the current CA" gate.
pub const BUNDLE_HASH_ANNOTATION: &str = "weft.dev/trust-bundle-hash";
/// Annotation on the ConfigMap: the config's generation.
pub const GENERATION_ANNOTATION: &str = "weft.dev/config-generation";

fn meta(ns: &Namespace, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(ns.name_any()),
        labels: Some(BTreeMap::from([(
            MANAGED_BY_LABEL.to_owned(),
            MANAGED_BY.to_owned(),
        )])),
        owner_references: Some(vec![owner(ns)]),
        ..ObjectMeta::default()
    }
}

/// The Namespace owns its children: they go when it goes, and a watch on
/// them maps back to it.
fn owner(ns: &Namespace) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        name: ns.name_any(),
        uid: ns.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// ConfigMap `weft-proxy-config`: `config.json`, or `config.json.gz` in
/// `binaryData` when large.
pub fn config_map(ns: &Namespace, config: &ProxyConfig) -> ConfigMap {
    let mut meta = meta(ns, CONFIG_MAP_NAME);
    meta.annotations = Some(BTreeMap::from([(
        GENERATION_ANNOTATION.to_owned(),
        config.generation.clone(),
    )]));
    let (data, binary_data) = match config.to_stored() {
        StoredConfig::Json(json) => (Some(BTreeMap::from([(CONFIG_KEY.to_owned(), json)])), None),
        StoredConfig::Gzip(gz) => (
            None,
            Some(BTreeMap::from([(CONFIG_GZ_KEY.to_owned(), ByteString(gz))])),
        ),
    };
    ConfigMap {
        metadata: meta,
        data,
        binary_data,
        ..ConfigMap::default()
    }
}

/// Read access to `weft-proxy-config` and nothing else.
pub fn role(ns: &Namespace) -> Role {
    Role {
        metadata: meta(ns, CONFIG_READER),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![CONFIG_MAP_NAME.into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

/// Every ServiceAccount of the namespace gets the Role.
pub fn role_binding(ns: &Namespace) -> RoleBinding {
    RoleBinding {
        metadata: meta(ns, CONFIG_READER),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: CONFIG_READER.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: format!("system:serviceaccounts:{}", ns.name_any()),
            ..Subject::default()
        }]),
    }
}

/// The identity Secret's contents and when it next needs work.
#[derive(Debug, Clone, PartialEq)]
pub struct Identities {
    /// `ca.crt`, and `<sa>.crt` / `<sa>.key` per ServiceAccount.
    pub data: BTreeMap<String, String>,
    /// The earliest renewal point of the certificates kept or issued.
    pub next_renewal: Option<SystemTime>,
    /// ServiceAccounts that got a new certificate this time.
    pub issued: Vec<String>,
    /// ServiceAccounts that get no certificate: a key of theirs would be
    /// the trust bundle's ([`identity_key_collides`]).
    pub refused: Vec<String>,
    /// The earliest expiry, for the certificate-expiry metric.
    pub earliest_expiry: Option<SystemTime>,
}

/// Event reason on the Namespace for ServiceAccounts that get no identity.
pub const IDENTITY_KEY_COLLISION: &str = "IdentityKeyCollision";

/// The Secret keys a ServiceAccount's identity is stored under.
fn identity_keys(sa: &str) -> (String, String) {
    (format!("{sa}.crt"), format!("{sa}.key"))
}

/// Whether a key of `sa`'s identity would be the trust bundle's
/// ([`CA_CERT_KEY`]): ServiceAccount `ca`. The Secret's key layout is a
/// contract (the injector projects these paths), so such an account gets
/// no identity rather than another layout; its leaf would replace the
/// bundle every proxy of the namespace trusts.
pub fn identity_key_collides(sa: &str) -> bool {
    let (crt, key) = identity_keys(sa);
    crt == CA_CERT_KEY || key == CA_CERT_KEY
}

/// What to tell the user about ServiceAccounts that get no identity.
pub fn collision_message(refused: &[String]) -> String {
    refused
        .iter()
        .map(|sa| {
            let (crt, _) = identity_keys(sa);
            format!(
                "ServiceAccount {sa} cannot get a mesh identity: its certificate key would be \
                 {crt}, the trust bundle's; rename it"
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Workload identities for `accounts` of namespace `ns`: an existing key
/// pair is kept while it is from this CA, names the right SPIFFE id and is
/// not yet two thirds through its life; otherwise a new one is issued. An
/// account whose keys would collide with the trust bundle's gets none
/// (listed in `refused`): the bundle is never overwritten.
pub fn identities(
    ns: &str,
    trust_domain: &str,
    accounts: &[String],
    existing: &BTreeMap<String, String>,
    ca: &MeshCa,
    ttl: Duration,
    now: SystemTime,
) -> Result<Identities, IdentityError> {
    let bundle = ca.trust_bundle();
    let same_ca = existing.get(CA_CERT_KEY).map(|s| s.trim()) == Some(bundle.trim());
    let mut out = Identities {
        data: BTreeMap::from([(CA_CERT_KEY.to_owned(), bundle)]),
        next_renewal: None,
        issued: Vec::new(),
        refused: Vec::new(),
        earliest_expiry: None,
    };
    for sa in accounts {
        if identity_key_collides(sa) {
            out.refused.push(sa.clone());
            continue;
        }
        let id = SpiffeId::new(trust_domain, ns, sa);
        let (crt, key) = identity_keys(sa);
        let kept = match (same_ca, existing.get(&crt), existing.get(&key)) {
            (true, Some(cert), Some(k)) => inspect_pem(cert)
                .ok()
                .filter(|info| info.spiffe_id().as_ref() == Some(&id) && now < info.renew_at())
                .map(|info| (cert.clone(), k.clone(), info.renew_at(), info.not_after)),
            _ => None,
        };
        let (cert, k, renew, expiry) = match kept {
            Some(k) => k,
            None => {
                let leaf = ca.issue(&id, now, ttl)?;
                out.issued.push(sa.clone());
                let renew = leaf.renew_at();
                (leaf.cert_pem, leaf.key_pem, renew, leaf.not_after)
            }
        };
        out.data.insert(crt, cert);
        out.data.insert(key, k);
        out.next_renewal = Some(out.next_renewal.map_or(renew, |r: SystemTime| r.min(renew)));
        out.earliest_expiry = Some(
            out.earliest_expiry
                .map_or(expiry, |r: SystemTime| r.min(expiry)),
        );
    }
    Ok(out)
}

/// Secret `weft-identity` holding `identities`.
pub fn identity_secret(ns: &Namespace, identities: &Identities) -> Secret {
    let mut meta = meta(ns, IDENTITY_SECRET);
    if let Some(bundle) = identities.data.get(CA_CERT_KEY) {
        meta.annotations = Some(BTreeMap::from([(
            BUNDLE_HASH_ANNOTATION.to_owned(),
            bundle_hash(bundle),
        )]));
    }
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(
            identities
                .data
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// A Secret's data as text (what [`identities`] reads back).
pub fn secret_text(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CA_LIFETIME;

    fn ns() -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                uid: Some("uid-shop".into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// [`identities`] of namespace `shop`, a day long.
    fn shop_identities(
        accounts: &[String],
        existing: &BTreeMap<String, String>,
        ca: &MeshCa,
        now: SystemTime,
    ) -> Result<Identities, IdentityError> {
        identities("shop", "cluster.local", accounts, existing, ca, DAY, now)
    }

    #[test]
    fn children_carry_the_owner_label_and_the_config() {
        let mut meshed = ns();
        meshed.metadata.labels = Some(BTreeMap::from([(
            "weft.dev/inject".to_owned(),
            "enabled".to_owned(),
        )]));
        let facts = crate::compile::ClusterFacts {
            namespaces: vec![meshed],
            ..Default::default()
        };
        let cfg = crate::compile::compile(&facts).configs["shop"].clone();
        let cm = config_map(&ns(), &cfg);
        let owner = &cm.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Namespace", "shop", "uid-shop")
        );
        assert_eq!(cm.labels()[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(cm.annotations()[GENERATION_ANNOTATION], cfg.generation);
        let back = ProxyConfig::from_json(cm.data.as_ref().expect("data")[CONFIG_KEY].as_bytes())
            .expect("the stored config reads back");
        assert_eq!(back, cfg);

        let role = role(&ns());
        let rule = &role.rules.as_ref().expect("rules")[0];
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&[CONFIG_MAP_NAME.to_owned()][..])
        );
        assert!(!rule.verbs.iter().any(|v| v == "update" || v == "patch"));
        let rb = role_binding(&ns());
        assert_eq!(
            rb.subjects.as_ref().expect("subjects")[0].name,
            "system:serviceaccounts:shop"
        );
    }

    #[test]
    fn a_service_account_named_ca_never_replaces_the_trust_bundle() {
        let t0 = SystemTime::now();
        let ca = MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca");
        let accounts = vec!["ca".to_owned(), "web".to_owned()];
        let ids = shop_identities(&accounts, &BTreeMap::new(), &ca, t0).expect("issue");
        assert_eq!(ids.issued, ["web"]);
        assert_eq!(ids.refused, ["ca"]);
        assert_eq!(
            ids.data[CA_CERT_KEY],
            ca.trust_bundle(),
            "ca.crt is the bundle"
        );
        assert!(ids.data.contains_key("web.crt") && ids.data.contains_key("web.key"));
        assert!(!ids.data.contains_key("ca.key"));
        assert_eq!(ids.data.len(), 3);
        assert_eq!(
            collision_message(&ids.refused),
            "ServiceAccount ca cannot get a mesh identity: its certificate key would be \
             ca.crt, the trust bundle's; rename it"
        );
        let secret = identity_secret(&ns(), &ids);
        assert_eq!(
            secret.annotations()[BUNDLE_HASH_ANNOTATION],
            bundle_hash(&ca.trust_bundle())
        );

        // The next reconcile reads that Secret back: nothing is issued and
        // nothing needs applying.
        let again = shop_identities(
            &accounts,
            &secret_text(&secret),
            &ca,
            t0 + Duration::from_secs(60),
        )
        .expect("keep");
        assert!(again.issued.is_empty(), "re-issued: {:?}", again.issued);
        assert_eq!(again.refused, ["ca"]);
        assert_eq!(again.data, ids.data);
        let (want, have) = (
            serde_json::to_value(identity_secret(&ns(), &again)).expect("json"),
            serde_json::to_value(&secret).expect("json"),
        );
        assert!(!super::super::reconcile::needs_apply(&want, &have));

        // A Secret the old code wrote (the `ca` leaf over the bundle, and
        // its key) is put right once, and only once.
        let mut broken = secret_text(&secret);
        let leaf = ca
            .issue(&SpiffeId::new("cluster.local", "shop", "ca"), t0, DAY)
            .expect("leaf");
        broken.insert(CA_CERT_KEY.to_owned(), leaf.cert_pem);
        broken.insert("ca.key".to_owned(), leaf.key_pem);
        let healed = shop_identities(&accounts, &broken, &ca, t0).expect("heal");
        assert_eq!(healed.data[CA_CERT_KEY], ca.trust_bundle());
        assert!(!healed.data.contains_key("ca.key"));
        let settled = shop_identities(&accounts, &healed.data, &ca, t0).expect("settle");
        assert!(settled.issued.is_empty());
        assert_eq!(settled.data, healed.data);
    }

    #[test]
    fn identities_are_kept_until_two_thirds_of_their_life_then_reissued() {
        let t0 = SystemTime::now();
        let ca = MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca");
        let accounts = vec!["cart".to_owned(), "default".to_owned()];
        let first = shop_identities(&accounts, &BTreeMap::new(), &ca, t0).expect("issue");
        assert_eq!(first.issued, accounts);
        assert_eq!(first.data.len(), 5, "ca.crt and a pair per account");
        let renew = first.next_renewal.expect("renewal");
        let life = renew.duration_since(t0).expect("after");
        assert!(life > DAY * 2 / 3 - Duration::from_secs(5) && life <= DAY * 2 / 3);

        let later = t0 + DAY / 2;
        let kept = shop_identities(&accounts, &first.data, &ca, later).expect("keep");
        assert!(kept.issued.is_empty());
        assert_eq!(kept.data, first.data);

        let due = t0 + DAY * 2 / 3 + Duration::from_secs(1);
        let renewed = shop_identities(&accounts, &first.data, &ca, due).expect("renew");
        assert_eq!(renewed.issued, accounts);
        assert_ne!(renewed.data["cart.crt"], first.data["cart.crt"]);

        // Another CA's certificates are replaced at once.
        let other = MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca");
        let moved = shop_identities(&accounts, &first.data, &other, later).expect("re-issue");
        assert_eq!(moved.issued, accounts);

        let secret = identity_secret(&ns(), &kept);
        assert_eq!(secret_text(&secret), kept.data);
        assert_eq!(
            secret.annotations()[BUNDLE_HASH_ANNOTATION],
            bundle_hash(&ca.trust_bundle())
        );
    }
}
