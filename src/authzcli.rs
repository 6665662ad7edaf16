//! `weft authz suggest NAMESPACE[/SERVICE]`: the least-privilege
//! AccessPolicy that admits exactly the callers an audited policy saw
//! (its `status.observedCallers`), printed as YAML to review and apply.
//! Reads the policy through the API server with the kubeconfig's
//! credentials (`get`/`list` on `accesspolicies.weft.dev`), or from a file
//! (`kubectl get accesspolicy NAME -o yaml > policy.yaml`).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use crate::api::{AccessPolicy, AccessTargetKind};
use crate::operator::audit::suggest;

#[derive(clap::Args, Debug, Clone)]
pub struct AuthzArgs {
    #[command(subcommand)]
    pub command: AuthzCommand,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum AuthzCommand {
    /// Print the AccessPolicy (mode Enforce) that admits exactly the
    /// callers the audited policy guarding NAMESPACE/SERVICE (or the
    /// namespace, without /SERVICE) saw.
    Suggest(SuggestArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct SuggestArgs {
    /// `namespace/service`, or `namespace` for the namespace-wide policy.
    pub target: String,
    /// Read the audited AccessPolicy from this YAML or JSON file instead
    /// of the cluster.
    #[arg(long)]
    pub from_file: Option<PathBuf>,
}

/// The policy guarding `target` (`ns` or `ns/service`) among `policies`:
/// the oldest, which is the one in force when several claim it.
pub fn pick<'a>(policies: &'a [AccessPolicy], target: &str) -> anyhow::Result<&'a AccessPolicy> {
    let (ns, service) = match target.split_once('/') {
        Some((ns, svc)) => (ns, Some(svc)),
        None => (target, None),
    };
    if ns.is_empty() || service.is_some_and(str::is_empty) {
        bail!(
            "the target is NAMESPACE or NAMESPACE/SERVICE, such as shop/payments (got {target:?})"
        );
    }
    let mut found: Vec<&AccessPolicy> = policies
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns))
        .filter(|p| match service {
            Some(svc) => {
                p.spec.target_ref.kind == AccessTargetKind::Service
                    && p.spec.target_ref.name.as_deref() == Some(svc)
            }
            None => p.spec.target_ref.kind == AccessTargetKind::Namespace,
        })
        .collect();
    found.sort_by(|a, b| crate::compile::age_order(*a, *b));
    found.first().copied().with_context(|| {
        let what = service.map_or_else(|| format!("namespace {ns}"), |s| format!("Service {ns}/{s}"));
        format!("no AccessPolicy guards {what}: create one with spec.mode: Audit (and no rules), let traffic flow, then ask again")
    })
}

/// The suggestion for `policy` as YAML, its notes as comments first.
pub fn render(policy: &AccessPolicy) -> anyhow::Result<String> {
    let (suggested, notes) = suggest(policy).map_err(anyhow::Error::msg)?;
    let mut out = format!(
        "# The least-privilege AccessPolicy for what {}/{} saw while auditing.\n# Review it, then `kubectl apply -f`: from Audit the move to Enforce is staged (status.enforcement);\n# a policy already enforced takes new rules at once.\n",
        policy.namespace().unwrap_or_default(),
        policy.name_any()
    );
    for n in notes {
        out.push_str(&format!("# Note: {n}\n"));
    }
    let mut value = serde_json::to_value(&suggested)?;
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.retain(|k, _| k == "name" || k == "namespace");
    }
    if let Some(obj) = value.as_object_mut() {
        obj.remove("status");
    }
    out.push_str(&serde_norway::to_string(&value)?);
    Ok(out)
}

/// Runs `weft authz`.
pub fn main(args: &AuthzArgs) -> anyhow::Result<std::process::ExitCode> {
    let AuthzCommand::Suggest(args) = &args.command;
    let policies = match &args.from_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let policy: AccessPolicy = serde_norway::from_str(&text)
                .with_context(|| format!("{} is not an AccessPolicy", path.display()))?;
            vec![policy]
        }
        None => {
            let ns = args.target.split('/').next().unwrap_or_default().to_owned();
            crate::statcli::with_cluster(|client| async move {
                let api: Api<AccessPolicy> = Api::namespaced(client, &ns);
                let list = api
                    .list(&ListParams::default())
                    .await
                    .with_context(|| format!("listing the AccessPolicies of namespace {ns}"))?;
                Ok(list.items)
            })?
        }
    };
    print!("{}", render(pick(&policies, &args.target)?)?);
    Ok(std::process::ExitCode::SUCCESS)
}
