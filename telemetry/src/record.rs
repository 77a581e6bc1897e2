//! Typed recorders: one function per catalogued metric, so no metric name or label string
//! is spelled outside this crate.
//!
//! They write to whatever `metrics` recorder is current (the global Prometheus one in
//! production, a local one in tests). Most callers go through [`crate::Signals`], which
//! calls these *and* feeds the in-process windows; these exist on their own for code that
//! only needs the exported series (model cache, I/O, errors).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::catalogue::*;
use crate::labels::*;

/// A job was accepted by `Submit`.
pub fn job_submitted(workload: Workload) {
    counter!(JOBS_SUBMITTED_TOTAL, "workload" => workload.as_str()).increment(1);
}

/// A job reached a final state; `latency` is prompt received to final state.
pub fn job_finished(workload: Workload, outcome: Outcome, latency: Duration) {
    counter!(JOBS_FINISHED_TOTAL, "workload" => workload.as_str(), "outcome" => outcome.as_str())
        .increment(1);
    if outcome == Outcome::Success {
        render_latency(workload, latency);
    }
}

/// End-to-end render latency of a successful job.
pub fn render_latency(workload: Workload, latency: Duration) {
    histogram!(RENDER_LATENCY_SECONDS, "workload" => workload.as_str()).record(latency);
}

/// Admission control decided on a job.
pub fn admission_decision(workload: Workload, decision: Decision, reason: AdmissionReason) {
    counter!(
        ADMISSION_DECISIONS_TOTAL,
        "workload" => workload.as_str(),
        "decision" => decision.as_str(),
        "reason" => reason.as_str()
    )
    .increment(1);
}

/// Jobs currently queued for a workload.
pub fn queue_depth(workload: Workload, depth: usize) {
    gauge!(QUEUE_DEPTH, "workload" => workload.as_str()).set(depth as f64);
}

/// Cluster mode: a job delivered again after its worker was lost.
pub fn cluster_redelivery(workload: Workload) {
    counter!(CLUSTER_REDELIVERIES_TOTAL, "workload" => workload.as_str()).increment(1);
}

/// Cluster mode: a job failed as `worker_lost`.
pub fn cluster_worker_lost(workload: Workload) {
    counter!(CLUSTER_WORKER_LOST_TOTAL, "workload" => workload.as_str()).increment(1);
}

/// Cluster mode: a workload consumer's waiting and delivered-unacked jobs.
pub fn cluster_consumer(workload: Workload, pending: u64, ack_pending: u64) {
    gauge!(CLUSTER_CONSUMER_PENDING, "workload" => workload.as_str()).set(pending as f64);
    gauge!(CLUSTER_CONSUMER_ACK_PENDING, "workload" => workload.as_str()).set(ack_pending as f64);
}

/// Cluster mode: workers with a live heartbeat.
pub fn cluster_workers(count: usize) {
    gauge!(CLUSTER_WORKERS).set(count as f64);
}

/// How long a job waited in the queue before it started.
pub fn queue_wait(workload: Workload, wait: Duration) {
    histogram!(QUEUE_WAIT_SECONDS, "workload" => workload.as_str()).record(wait);
}

/// Time a job spent in one pipeline stage.
pub fn stage_finished(workload: Workload, stage: Stage, duration: Duration) {
    histogram!(STAGE_DURATION_SECONDS, "workload" => workload.as_str(), "stage" => stage.as_str())
        .record(duration);
}

/// Execution time of one node; `class_type` is the ComfyUI class (bounded by the registry).
pub fn node_finished(class_type: &str, duration: Duration) {
    histogram!(NODE_DURATION_SECONDS, "class_type" => class_type.to_owned()).record(duration);
}

/// Registers the node duration histogram of every node class there is, empty, so a
/// dashboard or `rate()` sees each class from the first scrape.
pub fn prime_node_durations<'a>(class_types: impl IntoIterator<Item = &'a str>) {
    for class_type in class_types {
        let _ = histogram!(NODE_DURATION_SECONDS, "class_type" => class_type.to_owned());
    }
}

/// Count `n` frames of one kind.
pub fn frames(workload: Workload, kind: FrameKind, n: u64) {
    counter!(FRAMES_TOTAL, "workload" => workload.as_str(), "kind" => kind.as_str()).increment(n);
}

/// Count one frame of one kind.
pub fn frame(workload: Workload, kind: FrameKind) {
    frames(workload, kind, 1);
}

/// Time between two consecutive frames of one stream, at one end.
pub fn frame_interval(workload: Workload, side: FrameSide, interval: Duration) {
    histogram!(FRAME_INTERVAL_SECONDS, "workload" => workload.as_str(), "side" => side.as_str())
        .record(interval);
}

/// Delivered over produced FPS.
pub fn fps_health(workload: Workload, ratio: f64) {
    gauge!(FPS_HEALTH_RATIO, "workload" => workload.as_str()).set(ratio);
}

/// Count `n` rendered images.
pub fn images(workload: Workload, n: u64) {
    counter!(IMAGES_TOTAL, "workload" => workload.as_str()).increment(n);
}

/// Device gauges from one probe sample; headroom is derived here so it always agrees.
pub fn device_sample(device: &str, used_bytes: u64, total_bytes: u64, utilization: f64) {
    let device = device.to_owned();
    gauge!(DEVICE_UTILIZATION_RATIO, "device" => device.clone()).set(utilization);
    gauge!(DEVICE_MEMORY_USED_BYTES, "device" => device.clone()).set(used_bytes as f64);
    gauge!(DEVICE_MEMORY_TOTAL_BYTES, "device" => device.clone()).set(total_bytes as f64);
    gauge!(DEVICE_MEMORY_HEADROOM_RATIO, "device" => device)
        .set(headroom_ratio(used_bytes, total_bytes));
}

/// Free over total memory; 0 when the total is unknown.
pub fn headroom_ratio(used_bytes: u64, total_bytes: u64) -> f64 {
    if total_bytes == 0 {
        return 0.0;
    }
    total_bytes.saturating_sub(used_bytes) as f64 / total_bytes as f64
}

/// Time to load a model of one kind.
pub fn model_loaded(kind: ModelKind, duration: Duration) {
    histogram!(MODEL_LOAD_SECONDS, "kind" => kind.as_str()).record(duration);
}

/// One model cache lookup.
pub fn model_cache_request(kind: ModelKind, result: CacheResult) {
    counter!(MODEL_CACHE_REQUESTS_TOTAL, "kind" => kind.as_str(), "result" => result.as_str())
        .increment(1);
}

/// Bytes resident in a device's model cache.
pub fn model_cache_bytes(device: &str, bytes: u64) {
    gauge!(MODEL_CACHE_BYTES, "device" => device.to_owned()).set(bytes as f64);
}

/// Bytes moved for one operation.
pub fn io_bytes(op: IoOp, bytes: u64) {
    counter!(IO_BYTES_TOTAL, "op" => op.as_str()).increment(bytes);
}

/// One error of a kind in a stage.
pub fn error(kind: ErrorKind, stage: Stage) {
    counter!(ERRORS_TOTAL, "kind" => kind.as_str(), "stage" => stage.as_str()).increment(1);
}

/// One retry.
pub fn retry(reason: RetryReason) {
    counter!(RETRIES_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// One frame rejected by a QC check.
pub fn qc_rejection(check: QcCheck) {
    counter!(QC_REJECTIONS_TOTAL, "check" => check.as_str()).increment(1);
}

/// The target ratio of an SLO.
pub fn slo_objective(slo: &'static str, objective: f64) {
    gauge!(SLO_OBJECTIVE_RATIO, "slo" => slo).set(objective);
}

/// The error budget left of an SLO over its period.
pub fn slo_error_budget_remaining(slo: &'static str, remaining: f64) {
    gauge!(SLO_ERROR_BUDGET_REMAINING_RATIO, "slo" => slo).set(remaining);
}

/// The burn rate of an SLO over one window (`"5m"`, `"1h"`, ...).
pub fn slo_burn_rate(slo: &'static str, window: &'static str, rate: f64) {
    gauge!(SLO_BURN_RATE, "slo" => slo, "window" => window).set(rate);
}

/// Marks planned heavy load on or off (alerts are inhibited while it is on).
pub fn planned_heavy_load(reason: PlannedLoad, active: bool) {
    gauge!(PLANNED_HEAVY_LOAD, "reason" => reason.as_str()).set(if active { 1.0 } else { 0.0 });
}

/// The build and configuration in force: `sakuga_build_info` (always 1) and
/// `sakuga_config_generation`, each exactly one series labelled with this version and
/// config hash; a new call replaces both.
pub fn identity(version: &str, config_hash: &str, generation: u64) {
    crate::prometheus::set_identity(version, config_hash, generation);
}

/// Registers the series a fresh process exports before anything happened, at their true
/// zero values: counters at 0 for every label set that can occur, queue depths at 0,
/// planned heavy load off, FPS health at 1 (nothing produced, nothing lost), and every
/// histogram with empty buckets. Dashboards and `rate()` then see a series from the first
/// scrape instead of a gap, and the exposition always names every catalogued metric.
/// Device gauges come from the device sampler, SLO gauges from [`crate::Signals::publish`].
pub fn prime_series(device: &str) {
    for &w in Workload::ALL {
        counter!(JOBS_SUBMITTED_TOTAL, "workload" => w.as_str()).absolute(0);
        for &o in Outcome::ALL {
            counter!(JOBS_FINISHED_TOTAL, "workload" => w.as_str(), "outcome" => o.as_str())
                .absolute(0);
        }
        for (d, r) in [
            (Decision::Admit, AdmissionReason::Capacity),
            (Decision::Defer, AdmissionReason::MemoryHeadroom),
            (Decision::Defer, AdmissionReason::FpsDegraded),
            (Decision::Deny, AdmissionReason::QueueFull),
            (Decision::Deny, AdmissionReason::Deadline),
        ] {
            counter!(
                ADMISSION_DECISIONS_TOTAL,
                "workload" => w.as_str(),
                "decision" => d.as_str(),
                "reason" => r.as_str()
            )
            .absolute(0);
        }
        gauge!(QUEUE_DEPTH, "workload" => w.as_str()).set(0.0);
        counter!(CLUSTER_REDELIVERIES_TOTAL, "workload" => w.as_str()).absolute(0);
        counter!(CLUSTER_WORKER_LOST_TOTAL, "workload" => w.as_str()).absolute(0);
        gauge!(CLUSTER_CONSUMER_PENDING, "workload" => w.as_str()).set(0.0);
        gauge!(CLUSTER_CONSUMER_ACK_PENDING, "workload" => w.as_str()).set(0.0);
        counter!(IMAGES_TOTAL, "workload" => w.as_str()).absolute(0);
        for &k in FrameKind::ALL {
            counter!(FRAMES_TOTAL, "workload" => w.as_str(), "kind" => k.as_str()).absolute(0);
        }
        for &side in FrameSide::ALL {
            let _ = histogram!(FRAME_INTERVAL_SECONDS, "workload" => w.as_str(), "side" => side.as_str());
        }
        let _ = histogram!(RENDER_LATENCY_SECONDS, "workload" => w.as_str());
        let _ = histogram!(QUEUE_WAIT_SECONDS, "workload" => w.as_str());
        for &stage in Stage::ALL {
            let _ = histogram!(STAGE_DURATION_SECONDS, "workload" => w.as_str(), "stage" => stage.as_str());
        }
    }
    gauge!(FPS_HEALTH_RATIO, "workload" => Workload::Animation.as_str()).set(1.0);
    gauge!(CLUSTER_WORKERS).set(0.0);
    for &k in ModelKind::ALL {
        for &r in CacheResult::ALL {
            counter!(MODEL_CACHE_REQUESTS_TOTAL, "kind" => k.as_str(), "result" => r.as_str())
                .absolute(0);
        }
        let _ = histogram!(MODEL_LOAD_SECONDS, "kind" => k.as_str());
    }
    gauge!(MODEL_CACHE_BYTES, "device" => device.to_owned()).set(0.0);
    for &op in IoOp::ALL {
        counter!(IO_BYTES_TOTAL, "op" => op.as_str()).absolute(0);
    }
    for &kind in ErrorKind::ALL {
        for &stage in Stage::ALL {
            counter!(ERRORS_TOTAL, "kind" => kind.as_str(), "stage" => stage.as_str()).absolute(0);
        }
    }
    for &reason in RetryReason::ALL {
        counter!(RETRIES_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    for &check in QcCheck::ALL {
        counter!(QC_REJECTIONS_TOTAL, "check" => check.as_str()).absolute(0);
    }
    for &reason in PlannedLoad::ALL {
        gauge!(PLANNED_HEAVY_LOAD, "reason" => reason.as_str()).set(0.0);
    }
}

/// Records every catalogued metric once with plausible values.
///
/// Used by the exposition tests and by `sakuga doctor --self-test` style checks, so that a
/// rendered exposition is known to contain every name.
pub fn record_each_once() {
    let w = Workload::Animation;
    job_submitted(w);
    job_finished(w, Outcome::Success, Duration::from_millis(1500));
    admission_decision(w, Decision::Admit, AdmissionReason::Capacity);
    queue_depth(w, 2);
    queue_wait(w, Duration::from_millis(40));
    stage_finished(w, Stage::Inference, Duration::from_millis(900));
    node_finished("ExampleSampler", Duration::from_millis(800));
    frame(w, FrameKind::Produced);
    frame_interval(w, FrameSide::Produced, Duration::from_millis(33));
    fps_health(w, 1.0);
    images(Workload::SingleImage, 1);
    device_sample("cpu", 1 << 30, 4 << 30, 0.5);
    model_loaded(ModelKind::Checkpoint, Duration::from_millis(250));
    model_cache_request(ModelKind::Checkpoint, CacheResult::Miss);
    model_cache_bytes("cpu", 1 << 28);
    io_bytes(IoOp::ModelRead, 1 << 28);
    error(ErrorKind::Timeout, Stage::Inference);
    retry(RetryReason::OomSplit);
    qc_rejection(QcCheck::Blank);
    slo_objective("batch_success", 0.995);
    slo_error_budget_remaining("batch_success", 1.0);
    slo_burn_rate("batch_success", "1h", 0.0);
    planned_heavy_load(PlannedLoad::Warmup, false);
    identity(env!("CARGO_PKG_VERSION"), "0000000000000000", 1);
    cluster_redelivery(w);
    cluster_worker_lost(w);
    cluster_consumer(w, 3, 1);
    cluster_workers(2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_is_free_over_total() {
        assert_eq!(headroom_ratio(75, 100), 0.25);
        assert_eq!(headroom_ratio(150, 100), 0.0);
        assert_eq!(headroom_ratio(0, 0), 0.0);
    }
}

/// Pre-registered handles for the per-frame series, so a frame costs atomic adds instead
/// of a registry lookup. Handles bind to the recorder current when this is built: build it
/// after `prometheus::install` (`Signals::new` does, so create `Signals` after installing).
#[derive(Debug, Clone)]
pub struct FrameMetrics {
    frames: [[metrics::Counter; 4]; 3],
    intervals: [[metrics::Histogram; 2]; 3],
}

impl FrameMetrics {
    pub fn new() -> Self {
        FrameMetrics {
            frames: Workload::ALL.map_array(|w| {
                [
                    FrameKind::Produced,
                    FrameKind::Delivered,
                    FrameKind::Dropped,
                    FrameKind::Duplicated,
                ]
                .map(|k| counter!(FRAMES_TOTAL, "workload" => w.as_str(), "kind" => k.as_str()))
            }),
            intervals: Workload::ALL.map_array(|w| {
                [FrameSide::Produced, FrameSide::Delivered].map(|s| {
                    histogram!(FRAME_INTERVAL_SECONDS, "workload" => w.as_str(), "side" => s.as_str())
                })
            }),
        }
    }

    /// Count `n` frames of one kind.
    #[inline]
    pub fn frames(&self, workload: Workload, kind: FrameKind, n: u64) {
        self.frames[workload.index()][kind.index()].increment(n);
    }

    /// One frame interval.
    #[inline]
    pub fn interval(&self, workload: Workload, side: FrameSide, interval: Duration) {
        self.intervals[workload.index()][side.index()].record(interval.as_secs_f64());
    }
}

impl Default for FrameMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `[Workload; 3]`-shaped arrays from the `ALL` slice.
trait MapArray {
    fn map_array<T>(&self, f: impl FnMut(Workload) -> T) -> [T; 3];
}

impl MapArray for &[Workload] {
    fn map_array<T>(&self, mut f: impl FnMut(Workload) -> T) -> [T; 3] {
        [f(self[0]), f(self[1]), f(self[2])]
    }
}
