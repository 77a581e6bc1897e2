//! `sakuga run`: one workflow in-process, with a progress bar, a per-node timing summary
//! and the golden signals (plus any diagnosis finding) at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;

use sakuga_nodes::{JobSink, OutputFile, StreamFrame};
use sakuga_scheduler::observe::{TelemetryObserver, event_fields, workload_of};
use sakuga_scheduler::{
    ExecutionObserver, ExecutionPlan, Executor, JobRun, NodeRun, SchedulerError, validate,
};
use sakuga_telemetry::{
    DiagnosisConfig, ErrorKind, JobReport, Outcome, PrometheusConfig, Signals, Stage, TraceContext,
    Workload, diagnose, events, render_findings,
};

use super::{CommonArgs, EXIT_INVALID, read_workflow};
use crate::runtime;

/// How often the device sampler reads memory and utilization during a run.
const DEVICE_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Workflow in ComfyUI API format (or a `POST /prompt` body).
    pub workflow: PathBuf,
    /// Workload class for signals and SLOs (default: inferred from the graph).
    #[arg(long, value_parser = ["animation", "single_image", "batch"])]
    pub workload: Option<String>,
    /// Write the final Prometheus exposition to this file.
    #[arg(long)]
    pub metrics_out: Option<PathBuf>,
    /// Save the signals snapshot (for `sakuga doctor --from`) to this file.
    #[arg(long)]
    pub signals_out: Option<PathBuf>,
    /// Do not draw the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(common: &CommonArgs, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let config = common.resolve()?;
    if common.default_models_dir(&config) && !config.models_dir.join("checkpoints").exists() {
        eprintln!(
            "models dir {} is empty: installing the demo models",
            config.models_dir.display()
        );
        sakuga_models::demo::write_demo_models(&config.models_dir)?;
    }
    std::fs::create_dir_all(&config.input_dir)
        .with_context(|| format!("cannot create input dir {}", config.input_dir.display()))?;
    ensure_writable(&config.out)?;

    let metrics = sakuga_telemetry::prometheus::install(&PrometheusConfig::in_process())?;
    sakuga_telemetry::record::prime_series(&config.device);
    let signals = Signals::new(config.signals.clone());
    let config_hash = config.hash();
    sakuga_telemetry::record::build_info(env!("CARGO_PKG_VERSION"), &config_hash);
    signals.config_changed(env!("CARGO_PKG_VERSION"), &config_hash);
    let probe = sakuga_models::device::probe_for(&config.device)?;
    let _sampler = signals.spawn_device_sampler(probe, DEVICE_SAMPLE_INTERVAL)?;

    let received = Instant::now();
    let env = runtime::node_env(&config)?;
    let registry = runtime::registry();
    let workflow = read_workflow(&args.workflow)?;
    let plan = match validate(&workflow, &registry, &env) {
        Ok(valid) => ExecutionPlan::compile(valid),
        Err(SchedulerError::Invalid(report)) => {
            eprintln!("{}: {}", args.workflow.display(), report.summary());
            for line in report.lines() {
                eprintln!("  {line}");
            }
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(other) => return Err(other.into()),
    };
    let workload = match args.workload.as_deref() {
        Some(w) => w.parse::<Workload>()?,
        None => workload_of(&plan),
    };

    let job_id = format!("run-{}", std::process::id());
    let trace = TraceContext::new_root();
    let fields = event_fields(&job_id, workload, &trace, &plan);
    let span = sakuga_telemetry::job_span(&fields);
    let _entered = span.enter();
    events::prompt_received(&fields);
    signals.job_submitted(workload);
    signals.stage_finished(workload, Stage::Parse, received.elapsed());

    let console = Arc::new(Console::new(plan.len(), args.no_progress));
    let observer = Arc::new(
        TelemetryObserver::new(
            signals.clone(),
            fields.clone(),
            console.clone(),
            target_fps(&plan),
        )
        .with_local_delivery(),
    );
    let executor = Executor::new(Arc::new(env), config.executor.clone());
    signals.job_started(workload, fields.model_id.as_deref(), received.elapsed());
    let job = JobRun {
        job_id: Arc::from(job_id.as_str()),
        observer: observer.clone(),
        cancel: sakuga_nodes::CancelToken::new(),
    };
    let result = executor.run(&plan, &job);
    console.finish();
    let latency = received.elapsed();

    let (outcome, code) = match &result {
        Ok(_) => {
            events::deliver_complete(&fields, latency);
            (Outcome::Success, ExitCode::SUCCESS)
        }
        Err(e) => {
            let kind = error_kind(e);
            signals.error(kind, Stage::Inference);
            events::job_failed(&fields, kind, e);
            (outcome_of(e), ExitCode::FAILURE)
        }
    };
    let images = console.outputs.lock().len() as u64;
    let mut report = JobReport::new(workload, outcome, latency).with_images(images);
    if let (Some(w), Some(h)) = (fields.width, fields.height) {
        report = report.with_resolution(w, h);
    }
    if let Some(model) = fields.model_id.as_deref() {
        report = report.with_model(model);
    }
    signals.job_finished(&report);
    signals.publish();

    match &result {
        Ok(job_report) => print_summary(&job_report.runs, latency, &console),
        Err(e) => eprintln!("error: {e}"),
    }
    let snapshot = signals.snapshot();
    println!("\n{}", snapshot.render_text());
    let findings = diagnose(&snapshot, &DiagnosisConfig::default());
    if !findings.is_empty() {
        println!("{}", render_findings(&findings));
    }
    if let Some(path) = &args.metrics_out {
        metrics
            .write_to(path)
            .with_context(|| format!("cannot write metrics to {}", path.display()))?;
    }
    if let Some(path) = &args.signals_out {
        snapshot
            .save(path)
            .with_context(|| format!("cannot write signals to {}", path.display()))?;
    }
    Ok(code)
}

/// Creates the output dir and proves it takes files, so a bad `--out` fails before any work.
fn ensure_writable(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output dir {}", dir.display()))?;
    let probe = dir.join(".sakuga-write-probe");
    std::fs::write(&probe, b"")
        .with_context(|| format!("output dir {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn target_fps(plan: &ExecutionPlan) -> f64 {
    plan.steps
        .iter()
        .filter(|s| s.class_type == "StreamFrames")
        .find_map(|s| {
            s.literals
                .iter()
                .find(|(n, _)| &**n == "fps")
                .and_then(|(_, v)| match v {
                    sakuga_nodes::Value::Float(f) => Some(*f),
                    sakuga_nodes::Value::Int(i) => Some(*i as f64),
                    _ => None,
                })
        })
        .unwrap_or(24.0)
}

fn error_kind(e: &SchedulerError) -> ErrorKind {
    e.kind().parse().unwrap_or(ErrorKind::Internal)
}

fn outcome_of(e: &SchedulerError) -> Outcome {
    match e.kind() {
        "cancelled" => Outcome::Cancelled,
        "oom" => Outcome::Oom,
        "timeout" => Outcome::Timeout,
        _ => Outcome::Failed,
    }
}

fn print_summary(runs: &[NodeRun], latency: Duration, console: &Console) {
    let mut by_class: BTreeMap<&str, (usize, usize, Duration)> = BTreeMap::new();
    for run in runs {
        let entry = by_class.entry(run.class_type).or_default();
        if run.cached {
            entry.1 += 1;
        } else {
            entry.0 += 1;
            entry.2 += run.duration;
        }
    }
    let mut rows: Vec<_> = by_class.into_iter().collect();
    rows.sort_by_key(|row| std::cmp::Reverse(row.1.2));
    println!(
        "\nnode timing ({} nodes, {:.3}s end to end)",
        runs.len(),
        latency.as_secs_f64()
    );
    println!(
        "  {:<28} {:>6} {:>7} {:>11} {:>11}",
        "class_type", "runs", "cached", "total", "mean"
    );
    for (class, (ran, cached, total)) in rows.iter().take(20) {
        let mean = if *ran > 0 {
            *total / *ran as u32
        } else {
            Duration::ZERO
        };
        println!(
            "  {class:<28} {ran:>6} {cached:>7} {:>10.3}ms {:>10.3}ms",
            total.as_secs_f64() * 1e3,
            mean.as_secs_f64() * 1e3
        );
    }
    let outputs = console.outputs.lock();
    if !outputs.is_empty() {
        println!("\noutputs");
        for file in outputs.iter() {
            println!("  {} ({})", file.path.display(), file.kind);
        }
    }
    let frames = *console.frames.lock();
    if frames > 0 {
        println!("\nstreamed {frames} frame(s)");
    }
}

/// The terminal side of a run: progress bar, outputs and frame count.
struct Console {
    bar: ProgressBar,
    outputs: Mutex<Vec<OutputFile>>,
    frames: Mutex<u64>,
}

impl Console {
    fn new(total: usize, hidden: bool) -> Self {
        let bar = if hidden {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total as u64)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} nodes {msg}",
            )
            .expect("static template"),
        );
        Self {
            bar,
            outputs: Mutex::new(Vec::new()),
            frames: Mutex::new(0),
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl JobSink for Console {
    fn progress(&self, node_id: &str, step: u64, steps: u64) {
        self.bar
            .set_message(format!("node {node_id}: {step}/{steps}"));
    }

    fn frame(&self, _: &str, _: StreamFrame) {
        *self.frames.lock() += 1;
    }

    fn output(&self, _: &str, file: OutputFile) {
        self.outputs.lock().push(file);
    }
}

impl ExecutionObserver for Console {
    fn node_started(&self, node_id: &str, class_type: &str) {
        self.bar
            .set_message(format!("node {node_id} ({class_type})"));
    }

    fn node_finished(&self, _: &NodeRun) {
        self.bar.inc(1);
    }
}
