//! `sakuga doctor`: findings from a saved signals snapshot.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use sakuga_telemetry::{DiagnosisConfig, SignalsSnapshot, diagnose, render_findings};

use super::CommonArgs;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// A signals snapshot saved by `sakuga run --signals-out` (or the Signals API).
    #[arg(long, required_unless_present = "server", conflicts_with = "server")]
    pub from: Option<PathBuf>,
    /// Ask a running server for its diagnosis instead (e.g. http://127.0.0.1:50051).
    #[arg(long)]
    pub server: Option<String>,
    /// Bearer token file for `--server`.
    #[arg(long, env = "SAKUGA_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM CA for an `https://` `--server`.
    #[arg(long, env = "SAKUGA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Also print the golden signals the findings were drawn from.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(_common: &CommonArgs, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let from = match (&args.server, &args.from) {
        (Some(server), _) => {
            return super::client::doctor(&super::client::ServerArgs {
                server: server.clone(),
                auth_token_file: args.auth_token_file.clone(),
                tls_ca: args.tls_ca.clone(),
            });
        }
        (None, Some(from)) => from,
        (None, None) => anyhow::bail!("doctor needs --from FILE or --server URL"),
    };
    let snapshot = SignalsSnapshot::load(from)
        .with_context(|| format!("signals snapshot {}", from.display()))?;
    if args.verbose {
        println!("{}", snapshot.render_text());
    }
    let findings = diagnose(&snapshot, &DiagnosisConfig::default());
    println!("{}", render_findings(&findings));
    Ok(ExitCode::SUCCESS)
}
