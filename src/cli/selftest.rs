//! `sakuga selftest`: the model golden checks (`sakuga_models::selftest`) on the device
//! `--device` names, from a shipped binary, so a GPU host without cargo can be checked
//! (`scripts/gpu-check`). Unlike `run` and `serve` it never falls back to the CPU: a check
//! asked to run on a GPU that cannot be used fails with the reason.
//!
//! `--ballast-leave-mib N` instead fills the GPU until N MiB are free and holds that until
//! killed, so that a render in another process meets a real CUDA out-of-memory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sakuga_models::selftest::{Check, run_checks};

use super::CommonArgs;

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// The reference files: `models/tests/fixtures` in the source tree or in a gpu-check
    /// bundle.
    #[arg(long, default_value = "models/tests/fixtures")]
    pub fixtures: PathBuf,
    /// Where the demo models are written (default: a temporary dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Instead of the checks: fill the GPU until this many MiB are free, then hold it.
    #[arg(long, value_name = "MIB")]
    pub ballast_leave_mib: Option<u64>,
}

pub fn run(common: &CommonArgs, args: &SelftestArgs) -> anyhow::Result<ExitCode> {
    let config = common.resolve()?;
    if let Some(leave_mib) = args.ballast_leave_mib {
        return hold_ballast(&config.device, leave_mib);
    }
    let device = sakuga_models::diffusion::device_from_spec(&config.device)
        .with_context(|| format!("selftest on {}", config.device))?;
    let work_dir = args.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("sakuga-selftest-{}", std::process::id()))
    });
    println!(
        "selftest on {} (fixtures {})",
        config.device,
        args.fixtures.display()
    );
    let checks = run_checks(&args.fixtures, &work_dir, &device, &mut print_check);
    if args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    let checks = checks?;
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} passed, {failed} failed", checks.len() - failed);
    if let Some(path) = &args.json {
        let report = serde_json::json!({"device": config.device, "checks": checks});
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_check(check: &Check) {
    let verdict = if check.passed() { "ok  " } else { "FAIL" };
    match &check.error {
        Some(error) => println!("{verdict} {:<28} error: {error}", check.name),
        None => println!(
            "{verdict} {:<28} max abs diff {:.2e} (tolerance {:.0e}) {:>8.3} s",
            check.name, check.max_abs_diff, check.tolerance, check.seconds
        ),
    }
}

/// Takes the GPU's memory down to `leave_mib` free, says so on stdout, and sleeps until
/// killed (the process exit frees it).
fn hold_ballast(spec: &str, leave_mib: u64) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let ballast = sakuga_models::selftest::Ballast::fill(spec, leave_mib)
        .with_context(|| format!("ballast on {spec}"))?;
    println!(
        "ballast: holding {} MiB on {spec}, {} MiB free ({:.1} s)",
        ballast.held_mib(),
        ballast.free_mib(),
        started.elapsed().as_secs_f64()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
