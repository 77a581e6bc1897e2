//! `sakuga run`: one workflow in-process, with a progress bar, a per-node timing summary
//! and the golden signals (plus any diagnosis finding) at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;

use sakuga_scheduler::engine::{
    EngineConfig, EngineHandle, JobEvent, JobInfo, JobState, SubmitRequest, WatchItem,
};
use sakuga_scheduler::{SchedulerError, validate};
use sakuga_telemetry::{DiagnosisConfig, Workload, diagnose, render_findings};

use super::{CommonArgs, EXIT_INVALID, read_workflow};
use crate::runtime;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Workflow in ComfyUI API or UI format (or a `POST /prompt` body), or a PNG/WebP
    /// with one embedded.
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
    let mut config = common.resolve()?;
    runtime::settle_device(&mut config)?;
    prepare_dirs(common, &config)?;

    let telemetry = runtime::start_signals(&config, &Default::default(), None, None)?;
    let (metrics, signals) = (&telemetry.metrics, telemetry.signals.clone());

    let env = Arc::new(runtime::node_env(&config)?);
    let registry = Arc::new(runtime::registry());
    let workflow = read_workflow(&args.workflow, &registry)?;
    // Validate here first so the user gets every problem as text with exit code 2; the
    // engine validates again on submit, as it does for every client.
    let nodes = match validate(&workflow, &registry, &env) {
        Ok(valid) => valid.nodes.len(),
        Err(SchedulerError::Invalid(report)) => {
            print_invalid(&args.workflow, &report);
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(other) => return Err(other.into()),
    };
    let workload = args
        .workload
        .as_deref()
        .map(str::parse::<Workload>)
        .transpose()?;

    // The same engine as `sakuga serve` (admission, queue, device worker, telemetry), with
    // the journal off: an interrupted `run` is simply run again.
    let engine_config = EngineConfig {
        executor: config.executor.clone(),
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(engine_config, registry, env, signals.clone())?;
    let console = Console::new(nodes, args.no_progress);
    let mut request = SubmitRequest::new((*workflow.source).clone());
    request.workload = workload;
    let result = engine.run_to_completion(request, |item| console.on_item(item));
    console.finish();
    engine.shutdown_blocking();
    let info = match result {
        Ok(info) => info,
        Err(SchedulerError::Invalid(report)) => {
            print_invalid(&args.workflow, &report);
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(other) => return Err(other.into()),
    };

    let code = match info.state {
        JobState::Succeeded => {
            console.print_summary(&info);
            ExitCode::SUCCESS
        }
        state => {
            eprintln!(
                "error: job {} {state:?}: {}",
                info.job_id,
                info.error.as_deref().unwrap_or("no reason given")
            );
            ExitCode::FAILURE
        }
    };
    report_signals(&signals, metrics, args)?;
    Ok(code)
}

/// The demo models on first use of the default models dir, the input dir, a writable out.
fn prepare_dirs(common: &CommonArgs, config: &crate::config::SakugaConfig) -> anyhow::Result<()> {
    if common.default_models_dir(config) && !config.models_dir.join("checkpoints").exists() {
        eprintln!(
            "models dir {} is empty: installing the demo models",
            config.models_dir.display()
        );
        sakuga_models::demo::write_demo_models(&config.models_dir)?;
    }
    std::fs::create_dir_all(&config.input_dir)
        .with_context(|| format!("cannot create input dir {}", config.input_dir.display()))?;
    ensure_writable(&config.out)?;
    Ok(())
}

/// The signal summary and findings after the job, and the files asked for.
fn report_signals(
    signals: &sakuga_telemetry::Signals,
    metrics: &sakuga_telemetry::MetricsHandle,
    args: &RunArgs,
) -> anyhow::Result<()> {
    signals.publish();
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
    Ok(())
}

fn print_invalid(path: &Path, report: &sakuga_scheduler::ValidationReport) {
    eprintln!("{}: {}", path.display(), report.summary());
    for line in report.lines() {
        eprintln!("  {line}");
    }
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

/// What one node did, from the job's feed.
struct NodeTiming {
    class_type: String,
    duration: Duration,
    cached: bool,
}

/// The terminal side of a run: the progress bar, and what the job's feed reported.
struct Console {
    bar: ProgressBar,
    nodes: Mutex<Vec<NodeTiming>>,
    frames: Mutex<(u64, u64)>,
    /// What `PreviewAny` nodes showed, by node.
    texts: Mutex<Vec<(String, String)>>,
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
            nodes: Mutex::new(Vec::new()),
            frames: Mutex::new((0, 0)),
            texts: Mutex::new(Vec::new()),
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn on_item(&self, item: &WatchItem) {
        match item {
            WatchItem::Event(event) => match &event.event {
                JobEvent::NodeStarted {
                    node_id,
                    class_type,
                } => {
                    self.bar
                        .set_message(format!("node {node_id} ({class_type})"));
                }
                JobEvent::Progress {
                    node_id,
                    step,
                    steps,
                } => {
                    self.bar
                        .set_message(format!("node {node_id}: {step}/{steps}"));
                }
                JobEvent::NodeFinished {
                    class_type,
                    duration,
                    cached,
                    ..
                } => {
                    self.bar.inc(1);
                    self.nodes.lock().push(NodeTiming {
                        class_type: class_type.clone(),
                        duration: *duration,
                        cached: *cached,
                    });
                }
                JobEvent::Text { node_id, text } => {
                    self.texts.lock().push((node_id.clone(), text.clone()));
                }
                JobEvent::Admission {
                    decision, reason, ..
                } => {
                    self.bar
                        .set_message(format!("admission: {decision} ({reason})"));
                }
                _ => {}
            },
            WatchItem::Frame(_) => self.frames.lock().0 += 1,
            WatchItem::FramesDropped(n) => self.frames.lock().1 += n,
            WatchItem::EventsSkipped(_) => {}
        }
    }

    /// Per-class timing (slowest first), the job's outputs and its frames.
    fn print_summary(&self, info: &JobInfo) {
        let nodes = self.nodes.lock();
        let mut by_class: BTreeMap<&str, (usize, usize, Duration)> = BTreeMap::new();
        for node in nodes.iter() {
            let entry = by_class.entry(&node.class_type).or_default();
            if node.cached {
                entry.1 += 1;
            } else {
                entry.0 += 1;
                entry.2 += node.duration;
            }
        }
        let mut rows: Vec<_> = by_class.into_iter().collect();
        rows.sort_by_key(|row| std::cmp::Reverse(row.1.2));
        let latency = match (info.finished_at, info.submitted_at) {
            (Some(end), start) => end.duration_since(start).unwrap_or_default(),
            _ => Duration::ZERO,
        };
        println!(
            "\nnode timing ({} nodes, {:.3}s end to end)",
            nodes.len(),
            latency.as_secs_f64()
        );
        println!(
            "  {:<30} {:>5} {:>7} {:>11} {:>11}",
            "class_type", "runs", "cached", "total", "mean"
        );
        for (class, (ran, cached, total)) in rows.iter().take(20) {
            let mean = if *ran > 0 {
                *total / *ran as u32
            } else {
                Duration::ZERO
            };
            println!(
                "  {class:<30} {ran:>5} {cached:>7} {:>9.3}ms {:>9.3}ms",
                total.as_secs_f64() * 1e3,
                mean.as_secs_f64() * 1e3
            );
        }
        if !info.outputs.is_empty() {
            println!("\noutputs");
            for output in &info.outputs {
                println!("  {} ({})", output.path.display(), output.kind);
            }
        }
        let texts = self.texts.lock();
        if !texts.is_empty() {
            println!("\npreviews");
            for (node_id, text) in texts.iter() {
                println!("  node {node_id}: {text}");
            }
        }
        let (frames, dropped) = *self.frames.lock();
        if frames + dropped > 0 {
            println!("\nstreamed {frames} frame(s), {dropped} dropped");
        }
    }
}
