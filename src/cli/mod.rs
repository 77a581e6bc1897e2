//! The `sakuga` command line: flags as DESIGN.md section 10 fixes them, each also read from
//! `SAKUGA_*` environment variables and the TOML config (`--config`).
//!
//! Exit codes: 0 success, 1 failure, 2 invalid workflow.

mod client;
mod doctor;
mod inspect;
mod models;
mod report;
mod run;
mod selftest;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::SakugaConfig;

/// Exit code of an invalid workflow (as `sakuga validate` documents it).
pub const EXIT_INVALID: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "sakuga",
    version,
    about = "Render scheduler for AI anime, comic and style pipelines, with the ops signals built in"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML config file; flags and SAKUGA_* variables override it.
    #[arg(long, env = "SAKUGA_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Models dir in ComfyUI's layout (checkpoints/, loras/, upscale_models/, ...).
    #[arg(long, env = "SAKUGA_MODELS_DIR", global = true)]
    pub models_dir: Option<PathBuf>,
    /// Where LoadImage finds its files (ComfyUI's input/).
    #[arg(long, env = "SAKUGA_INPUT_DIR", global = true)]
    pub input_dir: Option<PathBuf>,
    /// Output dir for saved images.
    #[arg(long, env = "SAKUGA_OUT", global = true)]
    pub out: Option<PathBuf>,
    /// Journal and server state.
    #[arg(long, env = "SAKUGA_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Compute device: cpu or cuda:N.
    #[arg(long, env = "SAKUGA_DEVICE", global = true)]
    pub device: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "SAKUGA_LOG_FORMAT", global = true, default_value = "text")]
    pub log_format: String,
    /// Log filter, as RUST_LOG (e.g. `info,sakuga_scheduler=debug`).
    #[arg(long, env = "SAKUGA_LOG", global = true, default_value = "warn")]
    pub log_filter: String,
    /// Export spans over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "SAKUGA_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

impl CommonArgs {
    /// The config file overlaid with flags and environment.
    ///
    /// # Errors
    /// When the config file cannot be read or parsed.
    pub fn resolve(&self) -> anyhow::Result<SakugaConfig> {
        let mut config = SakugaConfig::load(self.config.as_deref())?;
        if let Some(v) = &self.models_dir {
            config.models_dir = v.clone();
        }
        if let Some(v) = &self.input_dir {
            config.input_dir = v.clone();
        }
        if let Some(v) = &self.out {
            config.out = v.clone();
        }
        if let Some(v) = &self.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &self.device {
            config.device = v.clone();
        }
        Ok(config)
    }

    /// Whether the models dir is the built-in default (then `run` may install the demo set).
    pub fn default_models_dir(&self, config: &SakugaConfig) -> bool {
        self.models_dir.is_none() && config.models_dir == SakugaConfig::default().models_dir
    }

    fn log_config(&self) -> anyhow::Result<sakuga_telemetry::LogConfig> {
        let format = match self.log_format.as_str() {
            "text" => sakuga_telemetry::LogFormat::Text,
            "json" => sakuga_telemetry::LogFormat::Json,
            other => anyhow::bail!("--log-format must be text or json, not {other:?}"),
        };
        Ok(sakuga_telemetry::LogConfig {
            format,
            filter: self.log_filter.clone(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            ..sakuga_telemetry::LogConfig::default()
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a workflow in-process, with a progress bar and a signal summary at the end.
    Run(run::RunArgs),
    /// Validate a workflow; exit 0 when valid, 2 when invalid.
    Validate(inspect::ValidateArgs),
    /// List the node types (like ComfyUI's /object_info).
    Nodes(inspect::NodesArgs),
    /// Manage models.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Diagnose signal patterns and print findings with runbooks.
    Doctor(doctor::DoctorArgs),
    /// Serve the gRPC API (render, signals, nodes, KEDA scaler, health, reflection).
    Serve(serve::ServeArgs),
    /// Cluster mode: pull and run jobs from NATS JetStream (--nats URL required), serving
    /// health, signals and /metrics of its own.
    Worker(serve::ServeArgs),
    /// Submit a workflow to a server (optionally following it).
    Submit(client::SubmitArgs),
    /// Follow a job on a server: events, frames, final status.
    Watch(client::JobArgs),
    /// Cancel a job on a server.
    Cancel(client::JobArgs),
    /// A server's golden signals, SLOs, demand and replica advice.
    Signals(client::SignalsArgs),
    /// Run the model golden checks on --device (a GPU host check; no CPU fallback).
    Selftest(selftest::SelftestArgs),
    /// The weekly review: SLO budgets, tail latency, FPS health and regressions, with
    /// deploys overlaid (HTML, Markdown and JSON).
    Report(report::ReportArgs),
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let guard = match cli
        .common
        .log_config()
        .and_then(|c| Ok(sakuga_telemetry::init_logging(&c)?))
    {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match &cli.command {
        Command::Run(args) => run::run(&cli.common, args),
        Command::Validate(args) => inspect::validate(&cli.common, args),
        Command::Nodes(args) => inspect::nodes(&cli.common, args),
        Command::Models(command) => models::run(&cli.common, command),
        Command::Doctor(args) => doctor::run(&cli.common, args),
        Command::Serve(args) => serve::serve(&cli.common, args),
        Command::Worker(args) => serve::worker(&cli.common, args),
        Command::Submit(args) => client::submit(args),
        Command::Watch(args) => client::watch(args),
        Command::Cancel(args) => client::cancel(args),
        Command::Signals(args) => client::signals(args),
        Command::Selftest(args) => selftest::run(&cli.common, args),
        Command::Report(args) => report::run(&cli.common, args),
    };
    drop(guard);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a workflow file's bytes, naming the file when it cannot.
///
/// # Errors
/// Missing or unreadable file.
pub fn read_workflow_bytes(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    std::fs::read(path).with_context(|| format!("cannot read workflow {}", path.display()))
}

/// The workflow JSON in a file's bytes: the text itself (API or UI format), or the
/// workflow embedded in a PNG or WebP saved by ComfyUI or sakuga.
///
/// # Errors
/// [`SchedulerError::Malformed`] for text that is not JSON, or
/// [`SchedulerError::NoEmbeddedWorkflow`] for an image without one.
pub fn workflow_json(bytes: &[u8]) -> Result<serde_json::Value, sakuga_scheduler::SchedulerError> {
    use sakuga_scheduler::embedded;
    if embedded::image_kind(bytes).is_some() {
        return embedded::embedded_workflow(bytes);
    }
    serde_json::from_slice(bytes).map_err(|e| sakuga_scheduler::SchedulerError::Malformed {
        reason: format!("not valid JSON: {e}"),
    })
}

/// Reads a workflow file (API or UI format, or an image with one embedded) and parses it
/// into API format, with messages that name the file.
///
/// # Errors
/// Missing file, unreadable file, or contents that are not a workflow.
pub fn read_workflow(
    path: &std::path::Path,
    registry: &sakuga_nodes::NodeRegistry,
) -> anyhow::Result<sakuga_scheduler::Workflow> {
    use anyhow::Context;
    let bytes = read_workflow_bytes(path)?;
    workflow_json(&bytes)
        .and_then(|json| sakuga_scheduler::ui_format::to_api_format(json, registry))
        .and_then(sakuga_scheduler::Workflow::from_json)
        .with_context(|| format!("workflow {}", path.display()))
}
