//! Telemetry around execution: reads each node's stage off its schema roles, emits the stage
//! events of DESIGN.md section 2 at the real boundaries, records node and stage durations,
//! and meters frames of `StreamFrames` streams. Wraps any other observer (a progress bar,
//! a `Watch` publisher) and forwards everything to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sakuga_nodes::{JobSink, NodeRoles, OutputFile, StreamFrame, Value};
use sakuga_telemetry::{
    EventFields, FrameStream, ModelKind, Signals, Stage, TraceContext, Workload, events,
};

use crate::executor::{ExecutionObserver, NodeRun};
use crate::plan::ExecutionPlan;

/// The workload a plan most likely is: an animation if a node says it makes one
/// (streams, interpolation), a batch if it renders more than one image per output, else a
/// single image.
pub fn workload_of(plan: &ExecutionPlan) -> Workload {
    let mut batch = false;
    for step in &plan.steps {
        if step.node.schema().roles.animation {
            return Workload::Animation;
        }
        batch |= literal_int(&step.literals, "batch_size").is_some_and(|b| b > 1);
    }
    if batch {
        Workload::Batch
    } else {
        Workload::SingleImage
    }
}

/// The plan's frame stream: its target FPS and whether it is paced (`pace` on); `None`
/// when it has no stream node.
pub fn frame_stream(plan: &ExecutionPlan) -> Option<(f64, bool)> {
    let stream = plan.steps.iter().find(|s| s.node.schema().roles.streams)?;
    let paced = !stream
        .literals
        .iter()
        .any(|(n, v)| &**n == "pace" && matches!(v, Value::Boolean(false)));
    let fps = stream
        .literals
        .iter()
        .find(|(n, _)| &**n == "fps")
        .and_then(|(_, v)| match v {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        })
        .unwrap_or(24.0);
    Some((fps, paced))
}

fn literal_int(literals: &[(Arc<str>, Value)], name: &str) -> Option<i64> {
    literals
        .iter()
        .find(|(n, _)| &**n == name)
        .and_then(|(_, v)| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        })
}

fn literal_str<'a>(literals: &'a [(Arc<str>, Value)], name: &str) -> Option<&'a str> {
    literals
        .iter()
        .find(|(n, _)| &**n == name)
        .and_then(|(_, v)| match v {
            Value::String(s) => Some(&**s),
            _ => None,
        })
}

/// Event fields for a job: model, sampler, steps and resolution read off the plan.
pub fn event_fields(
    job_id: &str,
    workload: Workload,
    trace: &TraceContext,
    plan: &ExecutionPlan,
) -> EventFields {
    let mut fields = EventFields::new(job_id, workload, trace);
    for step in &plan.steps {
        let l = &step.literals;
        let checkpoint = step
            .node
            .schema()
            .roles
            .loads
            .filter(|slot| slot.kind == ModelKind::Checkpoint);
        if let Some(name) = checkpoint.and_then(|slot| literal_str(l, slot.input)) {
            fields = fields.with_model(name);
        }
        if let (Some(sampler), Some(steps)) =
            (literal_str(l, "sampler_name"), literal_int(l, "steps"))
        {
            fields = fields.with_sampler(sampler, steps as u32);
        }
        if let (Some(w), Some(h)) = (literal_int(l, "width"), literal_int(l, "height"))
            && fields.width.is_none()
        {
            let batch = literal_int(l, "batch_size").unwrap_or(1);
            fields = fields.with_resolution(w as u32, h as u32, batch as u32);
        }
    }
    fields
}

/// Records telemetry for one job and forwards to `inner`.
pub struct TelemetryObserver {
    signals: Signals,
    fields: EventFields,
    workload: Workload,
    stream: FrameStream,
    inner: Arc<dyn ExecutionObserver>,
    inference_started: AtomicBool,
    /// Frames count as delivered when produced (in-process runs have no transport).
    local_delivery: bool,
}

impl TelemetryObserver {
    /// Telemetry for a job whose frames go to a transport that reports delivery itself.
    pub fn new(
        signals: Signals,
        fields: EventFields,
        inner: Arc<dyn ExecutionObserver>,
        target_fps: f64,
    ) -> Self {
        let workload = fields.workload;
        Self {
            stream: signals.stream(workload, target_fps),
            signals,
            fields,
            workload,
            inner,
            inference_started: AtomicBool::new(false),
            local_delivery: false,
        }
    }

    /// Frames are consumed in-process (`sakuga run`): produced frames are delivered.
    pub fn with_local_delivery(mut self) -> Self {
        self.local_delivery = true;
        self
    }

    /// The job's event fields.
    pub fn fields(&self) -> &EventFields {
        &self.fields
    }

    /// The job's frame stream, for a transport to report delivery and drops.
    pub fn stream(&self) -> &FrameStream {
        &self.stream
    }
}

impl JobSink for TelemetryObserver {
    fn progress(&self, node_id: &str, step: u64, steps: u64) {
        self.inner.progress(node_id, step, steps);
    }

    fn frame(&self, node_id: &str, frame: StreamFrame) {
        let produced = self.stream.frame_produced();
        if self.stream.should_log(&produced, false) {
            events::frame_emitted(&self.fields, produced.index, produced.interval);
        }
        if self.local_delivery {
            self.stream.frame_delivered();
        }
        self.inner.frame(node_id, frame);
    }

    fn output(&self, node_id: &str, file: OutputFile) {
        self.inner.output(node_id, file);
    }

    fn text(&self, node_id: &str, text: &str) {
        self.inner.text(node_id, text);
    }
}

impl ExecutionObserver for TelemetryObserver {
    fn node_started(&self, node_id: &str, class_type: &str, roles: NodeRoles) {
        if roles.stage == Some(Stage::Inference)
            && !self.inference_started.swap(true, Ordering::Relaxed)
        {
            events::inference_started(&self.fields);
        }
        self.inner.node_started(node_id, class_type, roles);
    }

    fn node_finished(&self, run: &NodeRun) {
        if !run.cached {
            self.signals.node_finished(run.class_type, run.duration);
        }
        if let Some(stage) = run.roles.stage {
            self.signals
                .stage_finished(self.workload, stage, run.duration);
            match stage {
                Stage::ModelLoad => {
                    events::model_loaded(&self.fields, &run.node_id, run.cached, run.duration)
                }
                Stage::Inference if run.roles.ends_inference => {
                    events::inference_finished(&self.fields, run.duration)
                }
                Stage::Postprocess => events::postprocess_done(&self.fields, run.duration),
                _ => {}
            }
        }
        self.inner.node_finished(run);
    }
}

impl std::fmt::Debug for TelemetryObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryObserver")
            .field("fields", &self.fields)
            .finish_non_exhaustive()
    }
}
