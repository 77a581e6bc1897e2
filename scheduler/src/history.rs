//! What the engine tells the job history about a finished job beyond its metrics: the
//! settings that tell jobs of one model apart, the queue wait, why it failed, and its
//! stream's frames. Kept out of the engine so its finish path stays one call.

use std::time::Duration;

use sakuga_telemetry::{ErrorKind, EventFields, FrameStream, JobDetail, Stage};

use crate::engine::JobInfo;

/// The history detail of a finished job; `error` is its failure's kind and stage.
pub fn detail(
    info: &JobInfo,
    fields: &EventFields,
    stream: Option<&FrameStream>,
    error: Option<(ErrorKind, Stage)>,
) -> JobDetail {
    let queue_wait = info
        .started_at
        .and_then(|started| started.duration_since(info.submitted_at).ok());
    JobDetail {
        settings: settings(fields),
        queue_wait: queue_wait.or(Some(Duration::ZERO).filter(|_| info.started_at.is_some())),
        error,
        frames: stream.map(FrameStream::totals),
    }
}

/// `768x768 euler 20 steps batch 4`: what is known of the job's shape, in that order.
fn settings(fields: &EventFields) -> Option<String> {
    let mut parts = Vec::new();
    if let (Some(w), Some(h)) = (fields.width, fields.height) {
        parts.push(format!("{w}x{h}"));
    }
    if let Some(sampler) = &fields.sampler {
        parts.push(sampler.clone());
    }
    if let Some(steps) = fields.steps {
        parts.push(format!("{steps} steps"));
    }
    if let Some(batch) = fields.batch_size.filter(|b| *b > 1) {
        parts.push(format!("batch {batch}"));
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}
