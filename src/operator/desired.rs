//! What a meshed namespace should hold, built without I/O: the ConfigMap
//! with its compiled `ProxyConfig`, a Secret per ServiceAccount with its
//! workload identity, and the Role and RoleBinding that let the namespace's
//! proxies read that one ConfigMap. The reconciler applies these with
//! server-side apply.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;

use super::ca::TrustPlan;
use crate::config::{
    CONFIG_GZ_KEY, CONFIG_KEY, CONFIG_MAP_NAME, ENDPOINTS_CONFIG_MAP_NAME, ENDPOINTS_GZ_KEY,
    ENDPOINTS_KEY, EndpointsConfig, ProxyConfig, StoredConfig,
};
use crate::identity::{
    CA_CERT_KEY, IDENTITY_SECRET_PREFIX, IdentityError, LEGACY_IDENTITY_SECRET, SpiffeId,
    TLS_CERT_KEY, TLS_KEY_KEY, bundle_hash, chains_to, identity_secret_name, inspect_pem,
    pem_blocks,
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
    stored_document(
        ns,
        CONFIG_MAP_NAME,
        &config.generation,
        config.to_stored(),
        (CONFIG_KEY, CONFIG_GZ_KEY),
    )
}

/// ConfigMap `weft-endpoints`: `endpoints.json`, or `endpoints.json.gz` in
/// `binaryData` when large.
pub fn endpoints_config_map(ns: &Namespace, endpoints: &EndpointsConfig) -> ConfigMap {
    stored_document(
        ns,
        ENDPOINTS_CONFIG_MAP_NAME,
        &endpoints.generation,
        endpoints.to_stored(),
        (ENDPOINTS_KEY, ENDPOINTS_GZ_KEY),
    )
}

/// A ConfigMap holding one document under its plain or its gzip key, with
/// the document's generation as an annotation.
fn stored_document(
    ns: &Namespace,
    name: &str,
    generation: &str,
    stored: StoredConfig,
    (key, gz_key): (&str, &str),
) -> ConfigMap {
    let mut meta = meta(ns, name);
    meta.annotations = Some(BTreeMap::from([(
        GENERATION_ANNOTATION.to_owned(),
        generation.to_owned(),
    )]));
    let (data, binary_data) = match stored {
        StoredConfig::Json(json) => (Some(BTreeMap::from([(key.to_owned(), json)])), None),
        StoredConfig::Gzip(gz) => (
            None,
            Some(BTreeMap::from([(gz_key.to_owned(), ByteString(gz))])),
        ),
    };
    ConfigMap {
        metadata: meta,
        data,
        binary_data,
        ..ConfigMap::default()
    }
}

/// Read access to `weft-proxy-config` and `weft-endpoints`, nothing else.
pub fn role(ns: &Namespace) -> Role {
    Role {
        metadata: meta(ns, CONFIG_READER),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![
                CONFIG_MAP_NAME.into(),
                ENDPOINTS_CONFIG_MAP_NAME.into(),
            ]),
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

/// One ServiceAccount's identity: its Secret's data and when it next needs
/// work. `Debug` leaves the data out: it holds a private key.
#[derive(Clone, PartialEq)]
pub struct Identity {
    pub service_account: String,
    /// `ca.crt`, `tls.crt` and `tls.key`.
    pub data: BTreeMap<String, String>,
    /// When the certificate is due for renewal (two thirds of its life).
    pub renew_at: SystemTime,
    /// When it expires, for the certificate-expiry metric.
    pub not_after: SystemTime,
    /// Whether a new certificate was issued this time.
    pub issued: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("service_account", &self.service_account)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("renew_at", &self.renew_at)
            .field("not_after", &self.not_after)
            .field("issued", &self.issued)
            .finish()
    }
}

/// Event reason on the Namespace for ServiceAccounts that get no identity.
pub const IDENTITY_NAME_COLLISION: &str = "IdentitySecretNameCollision";
/// Annotation on an identity Secret: the ServiceAccount it is for (a label
/// value cannot hold every ServiceAccount name).
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "weft.dev/service-account";

/// Each ServiceAccount's identity Secret name ([`identity_secret_name`]),
/// and the accounts that get none because another account's Secret has
/// that name: only a name over 239 characters, cut and hashed, can meet
/// another. The account whose name is the Secret's own keeps it; two cut
/// and hashed names that meet are both refused (neither is the rightful
/// owner). `accounts` is sorted; both lists keep its order.
pub fn secret_names(accounts: &[String]) -> (Vec<(String, String)>, Vec<String>) {
    let mut owner: BTreeMap<String, Option<&String>> = BTreeMap::new();
    for sa in accounts {
        let name = identity_secret_name(sa);
        let direct = name == format!("{IDENTITY_SECRET_PREFIX}{sa}");
        match owner.get(&name) {
            None => {
                owner.insert(name, Some(sa));
            }
            Some(_) if direct => {
                owner.insert(name, Some(sa));
            }
            Some(Some(first))
                if identity_secret_name(first) != format!("{IDENTITY_SECRET_PREFIX}{first}") =>
            {
                owner.insert(name, None);
            }
            Some(_) => {}
        }
    }
    let mut named = Vec::new();
    let mut refused = Vec::new();
    for sa in accounts {
        let name = identity_secret_name(sa);
        if owner.get(&name) == Some(&Some(sa)) {
            named.push((sa.clone(), name));
        } else {
            refused.push(sa.clone());
        }
    }
    (named, refused)
}

/// What to tell the user about ServiceAccounts that get no identity.
pub fn collision_message(refused: &[String]) -> String {
    refused
        .iter()
        .map(|sa| {
            format!(
                "ServiceAccount {sa} cannot get a mesh identity: its Secret would be {}, \
                 which another ServiceAccount of the namespace has; give it a shorter name",
                identity_secret_name(sa)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// ServiceAccount `sa`'s identity in namespace `ns`: the key pair in
/// `existing` (its Secret's data) is kept while its certificate chains
/// to the root of the CA that issues now, names the right SPIFFE id and
/// is not yet two thirds through its life; otherwise a new one is
/// issued. The Secret carries the plan's trust bundle, which a CA
/// rotation changes without re-issuing anything.
pub fn identity(
    ns: &str,
    trust_domain: &str,
    sa: &str,
    existing: &BTreeMap<String, String>,
    plan: &TrustPlan,
    ttl: Duration,
    now: SystemTime,
) -> Result<Identity, IdentityError> {
    let ca = &plan.issuer;
    let bundle = plan.bundle.clone();
    let id = SpiffeId::new(trust_domain, ns, sa);
    let kept = match (existing.get(TLS_CERT_KEY), existing.get(TLS_KEY_KEY)) {
        (Some(cert), Some(key)) => inspect_pem(cert)
            .ok()
            .filter(|info| info.spiffe_id().as_ref() == Some(&id) && now < info.renew_at())
            .filter(|_| chains_to(cert, ca.anchor_pem(), now))
            // Carries the chain the CA issues under now: a leaf from an
            // intermediate since replaced under the same root is
            // re-issued at once.
            .filter(|_| pem_blocks(cert).get(1..) == Some(ca.chain().as_slice()))
            .map(|info| (cert.clone(), key.clone(), info.renew_at(), info.not_after)),
        _ => None,
    };
    let (issued, (cert, key, renew_at, not_after)) = match kept {
        Some(kept) => (false, kept),
        None => {
            let leaf = ca.issue(&id, now, ttl)?;
            let renew = leaf.renew_at();
            (true, (leaf.cert_pem, leaf.key_pem, renew, leaf.not_after))
        }
    };
    Ok(Identity {
        service_account: sa.to_owned(),
        data: BTreeMap::from([
            (CA_CERT_KEY.to_owned(), bundle),
            (TLS_CERT_KEY.to_owned(), cert),
            (TLS_KEY_KEY.to_owned(), key),
        ]),
        renew_at,
        not_after,
        issued,
    })
}

/// The `kubernetes.io/tls` Secret holding `identity`, named by
/// [`identity_secret_name`].
pub fn identity_secret(ns: &Namespace, identity: &Identity) -> Secret {
    let mut meta = meta(ns, &identity_secret_name(&identity.service_account));
    let mut annotations = BTreeMap::from([(
        SERVICE_ACCOUNT_ANNOTATION.to_owned(),
        identity.service_account.clone(),
    )]);
    if let Some(bundle) = identity.data.get(CA_CERT_KEY) {
        annotations.insert(BUNDLE_HASH_ANNOTATION.to_owned(), bundle_hash(bundle));
    }
    meta.annotations = Some(annotations);
    Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            identity
                .data
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// Whether a Secret of this name is one of weft's workload identity
/// Secrets (or the one-per-namespace Secret that came before them).
pub fn is_identity_secret(name: &str) -> bool {
    name.starts_with(IDENTITY_SECRET_PREFIX) || name == LEGACY_IDENTITY_SECRET
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

/// Event reasons on an ExternalService whose client certificate Secret
/// cannot be used: it is not there, or not a usable key pair. (Distinct
/// reasons: kube's event recorder folds a repeat of one reason into the
/// first Event's series, note and all.)
pub const CLIENT_CERTIFICATE_NOT_FOUND: &str = "ClientCertificateNotFound";
pub const CLIENT_CERTIFICATE_INVALID: &str = "ClientCertificateInvalid";

/// The most a client certificate pair (chain and key, as PEM) may
/// weigh: every identity Secret of the namespace carries a copy, and a
/// Secret is at most 1 MiB (a chain of three 4096-bit RSA certificates
/// and its key is about 8 KiB).
pub const MAX_CLIENT_CERTIFICATE_BYTES: usize = 32 * 1024;
/// The most client certificate Secrets one namespace may use: with
/// [`MAX_CLIENT_CERTIFICATE_BYTES`], under a third of an identity
/// Secret's 1 MiB.
pub const MAX_CLIENT_CERTIFICATES: usize = 8;

/// The chain and key of client certificate Secret `secret` as the proxy
/// will use them (`tls.crt`, leaf first, and `tls.key`, belonging
/// together and not expired), written afresh from what was parsed (text
/// around the PEM blocks is not carried into every identity Secret), or
/// what is wrong and how to fix it. No message quotes the Secret's data.
pub fn client_certificate(secret: &Secret, now: SystemTime) -> Result<(String, String), String> {
    let name = secret.name_any();
    // Copied into every identity Secret of the namespace, a workload's
    // own mesh key would give every ServiceAccount that workload's
    // identity; the control plane's (the webhook's) are refused alike.
    let managed = secret
        .labels()
        .get(MANAGED_BY_LABEL)
        .is_some_and(|by| by.starts_with(MANAGED_BY));
    if is_identity_secret(&name) || managed {
        return Err(format!(
            "Secret {name} is one of weft's own (a workload identity); name a Secret holding the certificate the vendor issued you"
        ));
    }
    let data = secret_text(secret);
    let (Some(crt), Some(key)) = (data.get(TLS_CERT_KEY), data.get(TLS_KEY_KEY)) else {
        return Err(format!(
            "Secret {name} has no tls.crt and tls.key; make it a TLS Secret (kubectl create secret tls {name} --cert=... --key=...)"
        ));
    };
    crate::proxy::origin::certified_key(crt, key).map_err(|e| format!("Secret {name}: {e}"))?;
    let (chain, key) =
        crate::proxy::origin::parse_pair(crt, key).map_err(|e| format!("Secret {name}: {e}"))?;
    let info = crate::identity::inspect_der(&chain[0])
        .map_err(|_| format!("Secret {name}: tls.crt's first certificate does not parse"))?;
    if info.not_after <= now {
        return Err(format!(
            "Secret {name}: the certificate in tls.crt has expired; renew it"
        ));
    }
    let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let key_label = match &key {
        rustls::pki_types::PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        rustls::pki_types::PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let key_pem = pem(key_label, key.secret_der());
    if chain_pem.len() + key_pem.len() > MAX_CLIENT_CERTIFICATE_BYTES {
        return Err(format!(
            "Secret {name}: the chain and key take {} bytes, more than the {MAX_CLIENT_CERTIFICATE_BYTES} a client certificate may (each identity Secret of the namespace carries a copy); keep the leaf and its intermediates, not the root",
            chain_pem.len() + key_pem.len()
        ));
    }
    Ok((chain_pem, key_pem))
}

/// One PEM block.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::identity::{CA_LIFETIME, MeshCa};

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

    /// [`identity`] of `sa` in namespace `shop`, a day long.
    fn shop_identity(
        sa: &str,
        existing: &BTreeMap<String, String>,
        ca: &Arc<MeshCa>,
        now: SystemTime,
    ) -> Result<Identity, IdentityError> {
        let plan = TrustPlan::single(ca.clone());
        identity("shop", "cluster.local", sa, existing, &plan, DAY, now)
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
            Some(
                &[
                    CONFIG_MAP_NAME.to_owned(),
                    ENDPOINTS_CONFIG_MAP_NAME.to_owned()
                ][..]
            )
        );
        assert!(!rule.verbs.iter().any(|v| v == "update" || v == "patch"));
        let rb = role_binding(&ns());
        assert_eq!(
            rb.subjects.as_ref().expect("subjects")[0].name,
            "system:serviceaccounts:shop"
        );
    }

    #[test]
    fn no_secret_holds_the_keys_of_two_service_accounts() {
        let t0 = SystemTime::now();
        let ca = Arc::new(MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca"));
        // `ca` once collided with the trust bundle's key; with a Secret per
        // account it is an account like any other.
        let accounts = ["ca", "cart", "checkout"].map(String::from).to_vec();
        let (named, refused) = secret_names(&accounts);
        assert!(refused.is_empty());
        let mut keys_seen = Vec::new();
        for (sa, name) in &named {
            let id = shop_identity(sa, &BTreeMap::new(), &ca, t0).expect("issue");
            let secret = identity_secret(&ns(), &id);
            assert_eq!(secret.name_any(), *name);
            assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
            assert_eq!(secret.annotations()[SERVICE_ACCOUNT_ANNOTATION], *sa);
            let data = secret_text(&secret);
            assert_eq!(
                data.keys().map(String::as_str).collect::<Vec<_>>(),
                [CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY]
            );
            assert_eq!(data[CA_CERT_KEY], ca.trust_bundle());
            let info = inspect_pem(&data[TLS_CERT_KEY]).expect("leaf");
            assert_eq!(
                info.spiffe_id(),
                Some(SpiffeId::new("cluster.local", "shop", sa)),
                "{name} holds {sa}'s certificate and no other"
            );
            keys_seen.push(data[TLS_KEY_KEY].clone());
            // Debug output names the keys, never their contents.
            assert!(!format!("{id:?}").contains("PRIVATE KEY"));
        }
        keys_seen.dedup();
        assert_eq!(keys_seen.len(), 3, "a key pair per account");
    }

    #[test]
    fn a_long_service_account_name_meeting_another_secret_gets_no_identity() {
        let long = format!("{}.b{}", "a".repeat(221), "c".repeat(20));
        let taken = identity_secret_name(&long)
            .strip_prefix(IDENTITY_SECRET_PREFIX)
            .expect("prefix")
            .to_owned();
        let mut accounts = vec![long.clone(), taken.clone(), "web".to_owned()];
        accounts.sort();
        let (named, refused) = secret_names(&accounts);
        assert_eq!(
            refused,
            std::slice::from_ref(&long),
            "the account whose name it is keeps it"
        );
        assert!(named.contains(&(taken.clone(), format!("weft-identity-{taken}"))));
        assert!(collision_message(&refused).contains("give it a shorter name"));
        let (named, refused) = secret_names(std::slice::from_ref(&long));
        assert!(refused.is_empty());
        assert_eq!(named[0].1, identity_secret_name(&long));
    }

    #[test]
    fn identities_are_kept_until_two_thirds_of_their_life_then_reissued() {
        let t0 = SystemTime::now();
        let ca = Arc::new(MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca"));
        let first = shop_identity("cart", &BTreeMap::new(), &ca, t0).expect("issue");
        assert!(first.issued);
        let life = first.renew_at.duration_since(t0).expect("after");
        assert!(life > DAY * 2 / 3 - Duration::from_secs(5) && life <= DAY * 2 / 3);

        // The next reconcile reads the Secret back: nothing is issued and
        // nothing needs applying.
        let secret = identity_secret(&ns(), &first);
        let later = t0 + DAY / 2;
        let kept = shop_identity("cart", &secret_text(&secret), &ca, later).expect("keep");
        assert!(!kept.issued);
        assert_eq!(kept.data, first.data);
        let (want, have) = (
            serde_json::to_value(identity_secret(&ns(), &kept)).expect("json"),
            serde_json::to_value(&secret).expect("json"),
        );
        assert!(!super::super::reconcile::needs_apply(&want, &have));
        assert_eq!(
            secret.annotations()[BUNDLE_HASH_ANNOTATION],
            bundle_hash(&ca.trust_bundle())
        );

        let due = t0 + DAY * 2 / 3 + Duration::from_secs(1);
        let renewed = shop_identity("cart", &first.data, &ca, due).expect("renew");
        assert!(renewed.issued);
        assert_ne!(renewed.data[TLS_CERT_KEY], first.data[TLS_CERT_KEY]);

        // Another CA's certificates are replaced at once, and so is a pair
        // that names another account (a Secret edited by hand).
        let other = Arc::new(MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca"));
        let moved = shop_identity("cart", &first.data, &other, later).expect("re-issue");
        assert!(moved.issued);
        assert_eq!(moved.data[CA_CERT_KEY], other.trust_bundle());
        let swapped = shop_identity("checkout", &first.data, &ca, later).expect("re-issue");
        assert!(swapped.issued, "cart's pair is not checkout's");
    }

    #[test]
    fn a_rotation_changes_the_bundle_without_reissuing_until_the_new_root_issues() {
        let t0 = SystemTime::now();
        let old = Arc::new(MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca"));
        let new = Arc::new(MeshCa::generate("cluster.local", t0, CA_LIFETIME).expect("ca"));
        let first = shop_identity("cart", &BTreeMap::new(), &old, t0).expect("issue");
        let status = |phase| crate::api::CaRotationStatus {
            id: "r1".into(),
            phase,
            since: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            blocked_in: None,
            retry: 0,
            message: String::new(),
            waiting_on: Vec::new(),
            old_root: String::new(),
            new_root: String::new(),
            new_root_certificate: String::new(),
            new_root_expires: None,
            paused: false,
            secrets_back_since: None,
            source: None,
        };
        let at = |phase| {
            TrustPlan::rotating(
                old.clone(),
                Some(new.clone()),
                new.anchor_pem(),
                &status(phase),
            )
            .expect("plan")
        };
        let id = |plan: &TrustPlan, existing: &BTreeMap<String, String>| {
            identity("shop", "cluster.local", "cart", existing, plan, DAY, t0).expect("identity")
        };
        use crate::api::CaRotationPhase::*;
        // Adding the root: the same key pair, a bundle of both roots.
        let adding = id(&at(AddingRoot), &first.data);
        assert!(!adding.issued);
        assert_eq!(adding.data[TLS_CERT_KEY], first.data[TLS_CERT_KEY]);
        assert_eq!(
            adding.data[CA_CERT_KEY],
            crate::identity::bundle_of(&[old.anchor_pem(), new.anchor_pem()])
        );
        // Re-issuing: a certificate from the new root, both still trusted.
        let reissued = id(&at(Reissuing), &adding.data);
        assert!(reissued.issued);
        assert!(chains_to(
            &reissued.data[TLS_CERT_KEY],
            new.anchor_pem(),
            t0
        ));
        assert_eq!(reissued.data[CA_CERT_KEY], adding.data[CA_CERT_KEY]);
        // Presenting keeps it; removing the old root changes the bundle only.
        assert!(!id(&at(Presenting), &reissued.data).issued);
        let removing = id(&at(RemovingOld), &reissued.data);
        assert!(!removing.issued);
        assert_eq!(removing.data[CA_CERT_KEY], new.trust_bundle());
        // The bundle text is the same once the new root is weft-ca: no
        // Secret changes at the end.
        let after = shop_identity("cart", &removing.data, &new, t0).expect("identity");
        assert_eq!(after.data, removing.data);
        // Reverting issues from the old root again.
        let reverted = id(&at(Reverting), &reissued.data);
        assert!(reverted.issued);
        assert!(chains_to(
            &reverted.data[TLS_CERT_KEY],
            old.anchor_pem(),
            t0
        ));
    }

    #[test]
    fn a_client_certificate_secret_is_a_matching_unexpired_pair_not_weft_s_own() {
        let ca = MeshCa::generate("vendor.example", SystemTime::now(), CA_LIFETIME).expect("ca");
        let id = SpiffeId::new("vendor.example", "merchants", "shop-42");
        let secret = |name: &str, crt: &str, key: &str| Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                (TLS_CERT_KEY.to_owned(), ByteString(crt.as_bytes().to_vec())),
                (TLS_KEY_KEY.to_owned(), ByteString(key.as_bytes().to_vec())),
            ])),
            ..Secret::default()
        };
        let now = SystemTime::now();
        let good = ca.issue(&id, now, DAY).expect("cert");
        // Written afresh: what surrounds the PEM blocks is not carried.
        let padded = format!("{}\n{}", "x".repeat(100_000), good.cert_pem);
        let (crt, key) =
            client_certificate(&secret("bank", &padded, &good.key_pem), now).expect("usable");
        assert_eq!(crt.trim(), good.cert_pem.trim());
        crate::proxy::origin::certified_key(&crt, &key).expect("still the pair");
        assert!(crt.len() + key.len() < 4096);
        let managed = Secret {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    "weft-control-plane".to_owned(),
                )])),
                ..secret("webhook-tls", &good.cert_pem, &good.key_pem).metadata
            },
            ..secret("webhook-tls", &good.cert_pem, &good.key_pem)
        };
        let err = client_certificate(&managed, now).expect_err("the control plane's");
        assert!(err.contains("weft's own"), "{err}");
        // A key on one line (a pipeline that lost the line breaks) is
        // refused without quoting it.
        let one_line = good.key_pem.replace('\n', " ");
        let err = client_certificate(&secret("bank", &good.cert_pem, &one_line), now)
            .expect_err("one line");
        let body: String = good
            .key_pem
            .lines()
            .nth(1)
            .unwrap_or_default()
            .chars()
            .take(20)
            .collect();
        assert!(!err.contains(&body) && err.contains("tls.key"), "{err}");
        let later = now + 2 * DAY;
        let err = client_certificate(&secret("bank", &good.cert_pem, &good.key_pem), later)
            .expect_err("expired");
        assert!(err.contains("expired"), "{err}");
        let err = client_certificate(&secret("bank", "junk", &good.key_pem), now)
            .expect_err("no certificate");
        assert!(err.contains("tls.crt"), "{err}");
        let err = client_certificate(
            &secret("weft-identity-cart", &good.cert_pem, &good.key_pem),
            now,
        )
        .expect_err("weft's own");
        assert!(err.contains("weft's own"), "{err}");
        let mut empty = secret("bank", "", "");
        empty.data = None;
        let err = client_certificate(&empty, now).expect_err("empty");
        assert!(err.contains("create secret tls bank"), "{err}");
    }
}
