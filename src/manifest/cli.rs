//! `weft compile`: policy YAML in, proxy configs and policy verdicts out.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::api::conditions;
use crate::compile::{Compiled, compile};

/// Arguments of `weft compile`.
#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    /// Files or directories of YAML (directories are read recursively).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// `text`: verdicts, then each namespace's config as indented JSON.
    /// `json`: one document `{configs, verdicts}` for scripts.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Print only this namespace's config.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Exit non-zero when any policy is not Accepted, not ResolvedRefs, or
    /// not Programmed (for CI pipelines).
    #[arg(long)]
    pub strict: bool,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Runs `weft compile`. Invalid input prints every problem and fails.
pub fn run(args: &CompileArgs) -> anyhow::Result<ExitCode> {
    let loaded = match super::load(&args.paths) {
        Ok(loaded) => loaded,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} problem(s); nothing compiled", errors.len());
            return Ok(ExitCode::from(2));
        }
    };
    let mut compiled = compile(&loaded.facts);
    if let Some(ns) = &args.namespace {
        if !compiled.configs.contains_key(ns) {
            let known: Vec<&str> = compiled.configs.keys().map(String::as_str).collect();
            anyhow::bail!(
                "namespace {ns} has no config: it is not meshed or not defined (meshed: {})",
                known.join(", ")
            );
        }
        compiled.configs.retain(|k, _| k == ns);
    }
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            let doc = serde_json::json!({
                "configs": compiled.configs,
                "verdicts": compiled.verdicts,
            });
            serde_json::to_writer_pretty(&mut out, &doc)?;
            writeln!(out)?;
        }
        Output::Text => print_text(&mut out, &compiled, &loaded.skipped)?,
    }
    let unhealthy = compiled
        .verdicts
        .iter()
        .any(|v| v.conditions.iter().any(|c| !c.status));
    Ok(if args.strict && unhealthy {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(out: &mut impl Write, compiled: &Compiled, skipped: &[String]) -> anyhow::Result<()> {
    writeln!(out, "# Policies")?;
    for v in &compiled.verdicts {
        let summary: Vec<String> = [
            conditions::ACCEPTED,
            conditions::RESOLVED_REFS,
            conditions::PROGRAMMED,
        ]
        .iter()
        .filter_map(|t| v.condition(t))
        .map(|c| format!("{}={}", c.type_, if c.status { "True" } else { "False" }))
        .collect();
        writeln!(out, "{:<48} {}", v.object(), summary.join(" "))?;
        for c in v
            .conditions
            .iter()
            .filter(|c| !c.status || c.type_ == conditions::PROGRAMMED)
        {
            writeln!(out, "    {} ({}): {}", c.type_, c.reason, c.message)?;
        }
    }
    if !skipped.is_empty() {
        writeln!(out, "# Not read by the compiler: {}", skipped.join(", "))?;
    }
    for (ns, config) in &compiled.configs {
        let json = serde_json::to_string_pretty(config)?;
        writeln!(
            out,
            "\n# ProxyConfig for namespace {ns}: generation {}, {} services, {} external services, egress {:?}, {} bytes compact",
            config.generation,
            config.outbound.services.len(),
            config.outbound.external_services.len(),
            config.outbound.egress,
            config.to_json().len()
        )?;
        if config.outbound.egress == crate::config::EgressMode::RegistryOnly {
            let hosts: Vec<&str> = config
                .outbound
                .external_services
                .iter()
                .flat_map(|e| e.hosts.iter().map(String::as_str))
                .collect();
            writeln!(
                out,
                "# RegistryOnly: its pods reach only the Services below{}; anything else is refused (see weft_proxy_outbound_egress_unregistered_total under AllowAll for what that would be)",
                if hosts.is_empty() {
                    String::new()
                } else {
                    format!(" and {}", hosts.join(", "))
                }
            )?;
        }
        writeln!(out, "{json}")?;
    }
    Ok(())
}
