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
    #[arg(long)]
    pub from: PathBuf,
    /// Also print the golden signals the findings were drawn from.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(_common: &CommonArgs, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let snapshot = SignalsSnapshot::load(&args.from)
        .with_context(|| format!("signals snapshot {}", args.from.display()))?;
    if args.verbose {
        println!("{}", snapshot.render_text());
    }
    let findings = diagnose(&snapshot, &DiagnosisConfig::default());
    println!("{}", render_findings(&findings));
    Ok(ExitCode::SUCCESS)
}
