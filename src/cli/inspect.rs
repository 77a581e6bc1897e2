//! `sakuga validate` and `sakuga nodes`: pipeline authoring without running anything.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use sakuga_scheduler::admission::check_limits;
use sakuga_scheduler::ui_format::to_api_format;
use sakuga_scheduler::{SchedulerError, Workflow, validate as validate_workflow};

use super::{CommonArgs, EXIT_INVALID};
use crate::runtime;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Workflow in ComfyUI API or UI format (or a `POST /prompt` body), or a PNG/WebP
    /// with one embedded.
    pub workflow: PathBuf,
    /// Print ComfyUI's `{error, node_errors}` JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The server's tunables TOML, whose size caps (`[admission.limits]`) apply here too;
    /// the default caps when omitted.
    #[arg(long, env = "SAKUGA_TUNABLES")]
    pub tunables: Option<PathBuf>,
}

pub fn validate(common: &CommonArgs, args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let config = common.resolve()?;
    let env = runtime::node_env(&config)?;
    let registry = runtime::registry();
    let limits = super::serve::load_tunables(args.tunables.as_ref())?
        .admission
        .limits;
    let path = &args.workflow;
    let bytes = super::read_workflow_bytes(path)?;
    // What the server refuses before validating (not JSON, not convertible from the UI
    // format, over a size cap, not an object of nodes) is an invalid workflow too, so it
    // exits 2 like a failed validation.
    let workflow = super::workflow_json(&bytes)
        .and_then(|json| to_api_format(json, &registry))
        .and_then(|json| {
            check_limits(&json, bytes.len() as u64, &limits)?;
            Workflow::from_json(json)
        });
    let workflow = match workflow {
        Ok(workflow) => workflow,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"valid": false, "error": e.to_string()})
                );
            } else {
                eprintln!("{}: {e}", path.display());
            }
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    match validate_workflow(&workflow, &registry, &env) {
        Ok(valid) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"valid": true, "nodes": valid.nodes.len(), "outputs": valid.outputs.len()})
                );
            } else {
                println!(
                    "{}: valid ({} nodes run, {} outputs)",
                    path.display(),
                    valid.nodes.len(),
                    valid.outputs.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(SchedulerError::Invalid(report)) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report.to_json())?);
            } else {
                eprintln!("{}: {}", path.display(), report.summary());
                for line in report.lines() {
                    eprintln!("  {line}");
                }
            }
            Ok(ExitCode::from(EXIT_INVALID))
        }
        Err(other) => Err(other.into()),
    }
}

#[derive(Debug, Args)]
pub struct NodesArgs {
    /// Print the full catalogue as JSON (ComfyUI's /object_info shape).
    #[arg(long)]
    pub json: bool,
}

pub fn nodes(common: &CommonArgs, args: &NodesArgs) -> anyhow::Result<ExitCode> {
    let config = common.resolve()?;
    let env = runtime::node_env(&config)?;
    let registry = runtime::registry();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&registry.object_info(&env))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let width = registry
        .iter()
        .map(|n| n.schema().class_type.len())
        .max()
        .unwrap_or(0);
    // A reader that stops early (`| head`) closes the pipe: stop quietly, not panic.
    let mut out = std::io::stdout().lock();
    for node in registry.iter() {
        let s = node.schema();
        let inputs: Vec<String> = s
            .inputs
            .iter()
            .map(|i| {
                format!(
                    "{}{}:{}",
                    i.name,
                    if i.required { "" } else { "?" },
                    i.kind.port_type()
                )
            })
            .collect();
        let outputs: Vec<&str> = s.outputs.iter().map(|o| o.port.as_str()).collect();
        let marker = if s.output_node { " [output]" } else { "" };
        let written = writeln!(
            out,
            "{:width$}  {} -> {}{marker}   ({})",
            s.class_type,
            inputs.join(", "),
            if outputs.is_empty() {
                "-".to_string()
            } else {
                outputs.join(", ")
            },
            s.category,
        );
        match written {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            other => other?,
        }
    }
    Ok(ExitCode::SUCCESS)
}
