//! `sakuga-telemetry`: the operational signals of sakuga, built in.
//!
//! Module map:
//! - [`catalogue`]: every metric name, type, label set and bucket edge; `describe_all()`.
//! - [`labels`]: the closed label value sets (`Workload`, `Outcome`, `FrameKind`, ...).
//! - [`record`]: one typed recorder function per metric.
//! - [`prometheus`]: the process-wide Prometheus recorder, `/metrics`, rendering to a file.
//! - [`events`]: stage event names, `EventFields`, the `job`/`node` spans, frame sampling.
//! - [`logging`]: text or JSON logs and optional OTLP span export.
//! - [`clock`], [`ring`], [`window`]: rolling 2/5/15-minute windows of the golden signals.
//! - [`slo`]: SLO config, good/bad rings, error budgets and multi-window burn rates.
//! - [`device`]: the `DeviceProbe` trait and the sampler thread.
//! - [`quality`]: duplicate-frame detection and blank/NaN frame checks.
//! - [`signals`]: the shared [`Signals`] handle tying the above together, and snapshots.
//! - [`history`]: the embedded job history (`sakuga report`): summaries and markers by day.
//! - [`diagnosis`]: signal-pattern rules turning a snapshot into findings with runbooks.
//! - [`error`]: the crate's one error enum, [`TelemetryError`].
//!
//! Wiring, once at start-up and then per job:
//!
//! ```no_run
//! use std::time::Duration;
//! use sakuga_telemetry::{prometheus, logging, events, diagnosis};
//! use sakuga_telemetry::{
//!     EventFields, JobReport, LogConfig, Outcome, PrometheusConfig, Signals, SignalsConfig,
//!     Stage, TraceContext, Workload,
//! };
//!
//! # fn main() -> sakuga_telemetry::Result<()> {
//! let _logs = logging::init_logging(&LogConfig::default())?;
//! // `serve`: PrometheusConfig::default() serves 127.0.0.1:9464; `run`: in_process().
//! let metrics = prometheus::install(&PrometheusConfig::in_process())?;
//! let signals = Signals::new(SignalsConfig::default()); // after install
//!
//! let trace = TraceContext::new_root(); // or TraceContext::from_traceparent(header)
//! let fields = EventFields::new("job-1", Workload::Animation, &trace).with_sampler("euler", 8);
//! let _job = events::open_job_span("job-1", Workload::Animation, &trace).entered();
//! events::prompt_received(&fields);
//! signals.job_submitted(Workload::Animation);
//! let stream = signals.stream(Workload::Animation, 24.0);
//! let frame = stream.frame_produced();
//! if stream.should_log(&frame, false) {
//!     events::frame_emitted(&fields, frame.index, frame.interval);
//! }
//! stream.frame_delivered();
//! signals.stage_finished(Workload::Animation, Stage::Inference, Duration::from_millis(900));
//! signals.job_finished(&JobReport::new(Workload::Animation, Outcome::Success, Duration::from_secs(2)));
//!
//! let snapshot = signals.snapshot();
//! print!("{}", snapshot.render_text());
//! print!("{}", diagnosis::render_findings(&diagnosis::diagnose(&snapshot, &Default::default())));
//! metrics.write_to(std::path::Path::new("metrics.prom"))?;
//! # Ok(())
//! # }
//! ```

pub mod catalogue;
pub mod clock;
pub mod device;
pub mod diagnosis;
pub mod error;
pub mod events;
pub mod history;
pub mod labels;
pub mod logging;
pub mod prometheus;
pub mod quality;
pub mod record;
pub mod render;
pub mod ring;
pub mod signals;
pub mod slo;
pub mod window;

pub use catalogue::{METRICS, MetricDef, MetricKind, describe_all};
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use device::{DeviceProbe, DeviceSample, DeviceSampler, spawn_device_sampler};
pub use diagnosis::{DiagnosisConfig, Finding, diagnose, render_findings};
pub use error::{Result, TelemetryError};
pub use events::{
    EventFields, FrameEventSampler, TraceContext, node_span, open_job_span, record_job_attributes,
};
pub use history::{FrameTotals, History, HistoryConfig, JobSummary, Marker};
pub use labels::*;
pub use logging::{LogConfig, LogFormat, LoggingGuard, init_logging};
pub use prometheus::{MetricsHandle, PrometheusConfig};
pub use quality::{FrameChecker, QcReport, QualityConfig};
pub use signals::{
    FrameStream, JobDetail, JobReport, PlaybackReport, ProducedFrame, Signals, SignalsConfig,
    SignalsSnapshot,
};
pub use slo::{SloConfig, SloId, SloStatus};
pub use window::{GoldenSignals, Window};
