//! Stage events and spans: the named milestones of a job (DESIGN.md section 2) as `tracing`
//! events, plus the `job` span and its `node{id, class_type}` children.
//!
//! Event names are a contract (clients see them on `Watch`, log queries match on them), so
//! they are constants here and every event carries them in its `event` field. The fields a
//! job carries everywhere (ids, workload, model, sampler, resolution...) live in one
//! [`EventFields`] value built once per job, so call sites stay one line.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::Span;

use crate::labels::{AdmissionReason, Decision, ErrorKind, Workload};

pub const PROMPT_RECEIVED: &str = "prompt_received";
pub const MODEL_LOADED: &str = "model_loaded";
pub const INFERENCE_STARTED: &str = "inference_started";
pub const INFERENCE_FINISHED: &str = "inference_finished";
pub const POSTPROCESS_DONE: &str = "postprocess_done";
pub const FRAME_EMITTED: &str = "frame_emitted";
pub const DELIVER_COMPLETE: &str = "deliver_complete";
pub const JOB_FAILED: &str = "job_failed";
pub const JOB_CANCELLED: &str = "job_cancelled";
pub const JOB_RECOVERED: &str = "job_recovered";
pub const ADMISSION_DECISION: &str = "admission_decision";
pub const CONFIG_CHANGED: &str = "config_changed";

/// Every stage event name, in pipeline order.
pub const STAGE_EVENTS: &[&str] = &[
    PROMPT_RECEIVED,
    ADMISSION_DECISION,
    MODEL_LOADED,
    INFERENCE_STARTED,
    INFERENCE_FINISHED,
    POSTPROCESS_DONE,
    FRAME_EMITTED,
    DELIVER_COMPLETE,
    JOB_FAILED,
    JOB_CANCELLED,
    JOB_RECOVERED,
    CONFIG_CHANGED,
];

/// W3C trace context of a job: joins the client's trace when it sent `traceparent`.
///
/// These ids are the exported ones: [`open_job_span`] makes the OTLP exporter use them, so
/// the `trace_id`/`span_id` of log lines, `Watch` events and the trace backend agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: the job's own span in the trace.
    pub span_id: String,
    /// The client's span the job span is a child of (from `traceparent`); `None` for a
    /// job that starts its own trace.
    #[serde(default)]
    pub parent_span_id: Option<String>,
}

impl TraceContext {
    /// Parses a `traceparent` header (`00-<trace id>-<parent span id>-<flags>`) and gives
    /// the job a fresh span id under the client's trace. `None` when it is malformed.
    pub fn from_traceparent(header: &str) -> Option<TraceContext> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let parent_id = parts.next()?;
        let flags = parts.next()?;
        let is_hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
        if !is_hex(version, 2) || version == "ff" || !is_hex(flags, 2) {
            return None;
        }
        if !is_hex(trace_id, 32) || all_zero(trace_id) || !is_hex(parent_id, 16) {
            return None;
        }
        Some(TraceContext {
            trace_id: trace_id.to_owned(),
            span_id: format!("{:016x}", random_u64()),
            parent_span_id: Some(parent_id.to_owned()),
        })
    }

    /// A new root trace for a job submitted without `traceparent`.
    pub fn new_root() -> TraceContext {
        Self::root_of(format!("{:016x}{:016x}", random_u64(), random_u64()))
    }

    /// A fresh job span at the root of an existing trace (a job recovered after a restart
    /// keeps the trace id clients already have).
    pub fn root_of(trace_id: String) -> TraceContext {
        TraceContext {
            trace_id,
            span_id: format!("{:016x}", random_u64()),
            parent_span_id: None,
        }
    }

    /// The `traceparent` value that continues this trace from the job's span.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

/// Non-zero ids without a random-number dependency: a per-process random hasher seed mixed
/// with a counter and the clock. Ids only need to be unique, not unpredictable.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    hasher.write_u64(nanos);
    hasher.finish().max(1)
}

/// The fields every stage event of one job carries; build once per job, pass by reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFields {
    pub job_id: String,
    pub trace_id: String,
    pub span_id: String,
    pub workload: Workload,
    pub model_id: Option<String>,
    pub sampler: Option<String>,
    pub steps: Option<u32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub batch_size: Option<u32>,
    pub hardware_class: Option<String>,
}

impl EventFields {
    /// Fields for a job with its trace context; the rest start empty.
    pub fn new(job_id: impl Into<String>, workload: Workload, trace: &TraceContext) -> Self {
        EventFields {
            job_id: job_id.into(),
            trace_id: trace.trace_id.clone(),
            span_id: trace.span_id.clone(),
            workload,
            model_id: None,
            sampler: None,
            steps: None,
            width: None,
            height: None,
            batch_size: None,
            hardware_class: None,
        }
    }

    pub fn with_model(mut self, model_id: impl Into<String>) -> Self {
        self.model_id = Some(model_id.into());
        self
    }

    pub fn with_sampler(mut self, sampler: impl Into<String>, steps: u32) -> Self {
        self.sampler = Some(sampler.into());
        self.steps = Some(steps);
        self
    }

    pub fn with_resolution(mut self, width: u32, height: u32, batch_size: u32) -> Self {
        self.width = Some(width);
        self.height = Some(height);
        self.batch_size = Some(batch_size);
        self
    }

    pub fn with_hardware_class(mut self, hardware_class: impl Into<String>) -> Self {
        self.hardware_class = Some(hardware_class.into());
        self
    }
}

/// Emits one stage event with all of a job's fields; `$level` is a `tracing::Level`.
macro_rules! stage_event {
    ($level:expr, $name:expr, $f:expr, $duration:expr $(, $key:ident = $value:expr)*) => {{
        let f: &EventFields = $f;
        let duration: Option<Duration> = $duration;
        tracing::event!(
            $level,
            event = $name,
            job_id = f.job_id.as_str(),
            trace_id = f.trace_id.as_str(),
            span_id = f.span_id.as_str(),
            workload = f.workload.as_str(),
            model_id = f.model_id.as_deref(),
            sampler = f.sampler.as_deref(),
            steps = f.steps,
            width = f.width,
            height = f.height,
            batch_size = f.batch_size,
            hardware_class = f.hardware_class.as_deref(),
            duration = duration.map(|d| d.as_secs_f64()),
            $($key = $value,)*
            "{}",
            $name
        )
    }};
}

/// A job was parsed and accepted by `Submit`.
pub fn prompt_received(fields: &EventFields) {
    stage_event!(tracing::Level::INFO, PROMPT_RECEIVED, fields, None);
}

/// Admission control decided (admit, defer or deny) and why.
pub fn admission_decision(fields: &EventFields, decision: Decision, reason: AdmissionReason) {
    stage_event!(
        tracing::Level::INFO,
        ADMISSION_DECISION,
        fields,
        None,
        decision = decision.as_str(),
        reason = reason.as_str()
    );
}

/// A model became resident (`cached` when it already was); `duration` is the load time.
pub fn model_loaded(fields: &EventFields, model_id: &str, cached: bool, duration: Duration) {
    stage_event!(
        tracing::Level::INFO,
        MODEL_LOADED,
        fields,
        Some(duration),
        loaded_model = model_id,
        cached = cached
    );
}

/// Sampling began.
pub fn inference_started(fields: &EventFields) {
    stage_event!(tracing::Level::INFO, INFERENCE_STARTED, fields, None);
}

/// Sampling ended; `duration` is the inference time.
pub fn inference_finished(fields: &EventFields, duration: Duration) {
    stage_event!(
        tracing::Level::INFO,
        INFERENCE_FINISHED,
        fields,
        Some(duration)
    );
}

/// Decode, upscale and interpolation ended; `duration` is the post-process time.
pub fn postprocess_done(fields: &EventFields, duration: Duration) {
    stage_event!(
        tracing::Level::INFO,
        POSTPROCESS_DONE,
        fields,
        Some(duration)
    );
}

/// A frame went to the job's stream. Call only when [`FrameEventSampler`] says so.
pub fn frame_emitted(fields: &EventFields, frame_index: u64, interval: Option<Duration>) {
    stage_event!(
        tracing::Level::INFO,
        FRAME_EMITTED,
        fields,
        interval,
        frame_index = frame_index
    );
}

/// Outputs reached the client or the output dir; `duration` is the delivery time.
pub fn deliver_complete(fields: &EventFields, duration: Duration) {
    stage_event!(
        tracing::Level::INFO,
        DELIVER_COMPLETE,
        fields,
        Some(duration)
    );
}

/// The job failed; `error` is rendered with `Display`.
pub fn job_failed(fields: &EventFields, kind: ErrorKind, error: &dyn fmt::Display) {
    stage_event!(
        tracing::Level::WARN,
        JOB_FAILED,
        fields,
        None,
        error_kind = kind.as_str(),
        error = tracing::field::display(error)
    );
}

/// The job was cancelled by its client.
pub fn job_cancelled(fields: &EventFields) {
    stage_event!(tracing::Level::INFO, JOB_CANCELLED, fields, None);
}

/// The job was found unfinished in the journal after a restart and runs again.
pub fn job_recovered(fields: &EventFields) {
    stage_event!(tracing::Level::INFO, JOB_RECOVERED, fields, None);
}

/// The running configuration changed (reload or deploy); diagnosis correlates OOMs with it.
pub fn config_changed(config_hash: &str, generation: u64) {
    tracing::info!(
        event = CONFIG_CHANGED,
        config_hash,
        generation,
        "{}",
        CONFIG_CHANGED
    );
}

/// Opens the `job` span of a job when it is accepted; it ends when the last clone is
/// dropped, so drop it when the job reaches its final state.
///
/// With OTLP export on, the exported span has exactly `trace`'s ids: its trace id, its
/// span id, and the client's span as its parent (a root span without one), so log lines,
/// `Watch` events and the trace backend name the same spans. The job's attributes
/// (model, sampler, steps, resolution, batch size, hardware class) are declared here and
/// filled by [`record_job_attributes`] once the plan is known.
pub fn open_job_span(job_id: &str, workload: Workload, trace: &TraceContext) -> Span {
    let span = tracing::info_span!(
        "job",
        job_id,
        trace_id = trace.trace_id.as_str(),
        span_id = trace.span_id.as_str(),
        workload = workload.as_str(),
        model_id = tracing::field::Empty,
        sampler = tracing::field::Empty,
        steps = tracing::field::Empty,
        width = tracing::field::Empty,
        height = tracing::field::Empty,
        batch_size = tracing::field::Empty,
        hardware_class = tracing::field::Empty,
    );
    crate::logging::start_with_ids(&span, trace);
    span
}

/// Sets the job span's attributes from `fields` (those that are known).
pub fn record_job_attributes(span: &Span, fields: &EventFields) {
    if let Some(model) = &fields.model_id {
        span.record("model_id", model.as_str());
    }
    if let Some(sampler) = &fields.sampler {
        span.record("sampler", sampler.as_str());
    }
    if let Some(steps) = fields.steps {
        span.record("steps", steps);
    }
    if let (Some(w), Some(h)) = (fields.width, fields.height) {
        span.record("width", w);
        span.record("height", h);
    }
    if let Some(batch) = fields.batch_size {
        span.record("batch_size", batch);
    }
    if let Some(class) = &fields.hardware_class {
        span.record("hardware_class", class.as_str());
    }
}

/// Opens a `node` span for one workflow node as a child of `job` (nodes run on pool
/// threads where the job span is not entered, so the parent is explicit).
pub fn node_span(job: &Span, node_id: &str, class_type: &str) -> Span {
    tracing::info_span!(parent: job, "node", id = node_id, class_type)
}

/// Decides which `frame_emitted` events to log: one in `every_n`, plus every frame of a
/// failing job and every frame slower than the stream's SLO interval (tail fidelity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameEventSampler {
    every_n: u64,
}

impl Default for FrameEventSampler {
    /// One frame in 30: one event per second of a 30 FPS stream.
    fn default() -> Self {
        FrameEventSampler { every_n: 30 }
    }
}

impl FrameEventSampler {
    /// Keep one frame in `every_n` (0 and 1 keep every frame).
    pub fn new(every_n: u64) -> Self {
        FrameEventSampler {
            every_n: every_n.max(1),
        }
    }

    /// The sampling period.
    pub fn every_n(&self) -> u64 {
        self.every_n
    }

    /// Whether frame `frame_index` (0-based) should be logged.
    pub fn should_emit(&self, frame_index: u64, job_failing: bool, slower_than_slo: bool) -> bool {
        job_failing || slower_than_slo || frame_index.is_multiple_of(self.every_n)
    }

    /// [`Self::should_emit`] with slowness judged from the frame interval and the stream's
    /// target FPS (an interval longer than `1 / target_fps` is slow).
    pub fn should_emit_interval(
        &self,
        frame_index: u64,
        job_failing: bool,
        interval: Option<Duration>,
        target_fps: f64,
    ) -> bool {
        let slow = match interval {
            Some(interval) if target_fps > 0.0 => interval.as_secs_f64() > 1.0 / target_fps,
            _ => false,
        };
        self.should_emit(frame_index, job_failing, slow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_the_trace_id() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::from_traceparent(header).unwrap();
        assert_eq!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id.len(), 16);
        assert_ne!(ctx.span_id, "00f067aa0ba902b7");
        assert!(
            ctx.traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn malformed_traceparent_is_rejected() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::from_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn root_traces_are_distinct() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_eq!(a.trace_id.len(), 32);
        assert_ne!(a.trace_id, b.trace_id);
    }

    #[test]
    fn sampler_keeps_one_in_n_plus_failing_and_slow_frames() {
        let sampler = FrameEventSampler::new(10);
        let kept: Vec<u64> = (0..30)
            .filter(|&i| sampler.should_emit(i, false, false))
            .collect();
        assert_eq!(kept, vec![0, 10, 20]);
        assert!(sampler.should_emit(7, true, false));
        assert!(sampler.should_emit(7, false, true));
        let slow = Some(Duration::from_millis(60));
        let fast = Some(Duration::from_millis(30));
        assert!(sampler.should_emit_interval(7, false, slow, 24.0));
        assert!(!sampler.should_emit_interval(7, false, fast, 24.0));
        assert!(FrameEventSampler::new(0).should_emit(7, false, false));
    }
}
