//! `sakuga report`: the weekly review as HTML, Markdown and JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::report::{self, Period, Source};

use super::CommonArgs;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Read from this Prometheus (http://host:port) instead of the embedded job history
    /// in --data-dir.
    #[arg(long, env = "SAKUGA_REPORT_PROMETHEUS")]
    pub prometheus: Option<String>,
    /// Length of the period, ending now (or at --to): 7d, 36h, 90m.
    #[arg(long, default_value = "7d", conflicts_with = "from")]
    pub since: String,
    /// Start of the period: 2026-11-23, 2026-11-23T06:00Z or unix seconds.
    #[arg(long)]
    pub from: Option<String>,
    /// End of the period (default now).
    #[arg(long)]
    pub to: Option<String>,
    /// Compare with the period of the same length just before.
    #[arg(long)]
    pub compare_previous: bool,
    /// Print the JSON on stdout instead of the Markdown summary.
    #[arg(long)]
    pub json: bool,
}

/// Default folder of the report files when `--out` is not given.
const DEFAULT_OUT: &str = "sakuga-report";

pub fn run(common: &CommonArgs, args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let config = common.resolve()?;
    let to = match &args.to {
        Some(t) => report::parse_time(t)?,
        None => sakuga_telemetry::history::unix_now(),
    };
    let from = match &args.from {
        Some(f) => report::parse_time(f)?,
        None => to - report::parse_duration(&args.since)?,
    };
    anyhow::ensure!(from < to, "the period is empty: --from must be before --to");
    let source = match &args.prometheus {
        Some(url) => Source::Prometheus(url.clone()),
        None => Source::History(config.data_dir.clone()),
    };
    let review = report::build(&source, Period { from, to }, args.compare_previous)?;
    let out = common
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
    let paths = report::write(&review, &out)?;
    if args.json {
        print!("{}", report::to_json(&review));
    } else {
        print!("{}", report::render::markdown(&review));
        for path in paths {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
