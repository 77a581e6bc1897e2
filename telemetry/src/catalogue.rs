//! The metric catalogue: every metric name, type, label set and bucket layout sakuga exports.
//!
//! Metric names are a contract with dashboards, alert rules and KEDA (DESIGN.md section 5),
//! so they live here once, as constants, and nowhere else. [`METRICS`] lists them for
//! [`describe_all`] and for tests that check the exposition and the deploy rules.
//! Histogram bucket edges sit exactly on the SLO thresholds (3 s, 5 s, 30 s, and the late
//! frame intervals at 30 and 24 FPS) so an SLO is a ratio of two bucket counters, with no
//! interpolation error.

use serde::Serialize;

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    /// The `# TYPE` spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One catalogued metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

impl MetricDef {
    /// Bucket edges (seconds) for histograms; `None` for counters and gauges.
    pub fn buckets(&self) -> Option<&'static [f64]> {
        match self.name {
            RENDER_LATENCY_SECONDS => Some(RENDER_LATENCY_BUCKETS),
            QUEUE_WAIT_SECONDS => Some(QUEUE_WAIT_BUCKETS),
            STAGE_DURATION_SECONDS | NODE_DURATION_SECONDS => Some(STAGE_DURATION_BUCKETS),
            FRAME_INTERVAL_SECONDS => Some(FRAME_INTERVAL_BUCKETS),
            MODEL_LOAD_SECONDS => Some(MODEL_LOAD_BUCKETS),
            _ => None,
        }
    }
}

// --- SLO thresholds the bucket edges must contain -------------------------------------

/// Single-image p95 render latency target at the standard hardware class (upper end).
pub const SINGLE_IMAGE_LATENCY_TARGET_S: f64 = 5.0;
/// Single-image render latency at the ambitious end of the 3-5 s range.
pub const SINGLE_IMAGE_LATENCY_STRETCH_S: f64 = 3.0;
/// Batch queue wait p95 target.
pub const BATCH_QUEUE_WAIT_TARGET_S: f64 = 30.0;
/// Frame interval at the preferred 30 FPS.
pub const FRAME_INTERVAL_30FPS_S: f64 = 1.0 / 30.0;
/// Frame interval at the 24 FPS smoothness floor.
pub const FRAME_INTERVAL_24FPS_S: f64 = 1.0 / 24.0;
/// A frame is late when its interval exceeds the FPS floor's interval by more than this
/// factor. A stream paced at exactly 24 FPS measures 23.97-23.99 FPS through timer jitter;
/// without the 2% tolerance half its intervals would count as late. The one definition:
/// the in-process SLO, the bucket edges below and the Prometheus rules all use it.
pub const LATE_FRAME_TOLERANCE: f64 = 1.02;
/// The late-frame interval at the 24 FPS floor: 1.02 / 24 s. Written as the literal so the
/// `le` label reads `0.0425` in the exposition and in the rules.
pub const LATE_FRAME_INTERVAL_24FPS_S: f64 = 0.0425;
/// The late-frame interval at 30 FPS: 1.02 / 30 s.
pub const LATE_FRAME_INTERVAL_30FPS_S: f64 = 0.034;

/// Low-traffic guard of the frame SLOs' burn alerts: a page or ticket also needs this many
/// bad frames (late or dropped) in its short window, one second of playback at the floor.
/// One late frame among the first ten of a fresh preview is a 10% error ratio, not a page.
/// `deploy/generate.py` uses the same number.
pub const MIN_BAD_FRAMES_TO_ALERT: u64 = 24;

/// The late-frame threshold for a stream whose FPS floor is `min_fps`.
pub fn late_frame_interval_s(min_fps: f64) -> f64 {
    LATE_FRAME_TOLERANCE / min_fps
}

// --- bucket edges (seconds, strictly increasing) --------------------------------------

/// Render latency, prompt to output. Edges at 3 s and 5 s.
pub const RENDER_LATENCY_BUCKETS: &[f64] = &[
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    SINGLE_IMAGE_LATENCY_STRETCH_S,
    4.0,
    SINGLE_IMAGE_LATENCY_TARGET_S,
    7.5,
    10.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
];

/// Queue wait. Edge at 30 s.
pub const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    BATCH_QUEUE_WAIT_TARGET_S,
    60.0,
    120.0,
    300.0,
    600.0,
];

/// Stage and node durations: from sub-millisecond nodes to minute-long samplers.
pub const STAGE_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Frame intervals. Edges at 1/30 s and 1/24 s, and at the late-frame intervals for both.
pub const FRAME_INTERVAL_BUCKETS: &[f64] = &[
    1.0 / 120.0,
    1.0 / 60.0,
    1.0 / 48.0,
    FRAME_INTERVAL_30FPS_S,
    LATE_FRAME_INTERVAL_30FPS_S,
    FRAME_INTERVAL_24FPS_S,
    LATE_FRAME_INTERVAL_24FPS_S,
    1.0 / 20.0,
    1.0 / 15.0,
    1.0 / 12.0,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
];

/// Model load time, from a warm page cache to a cold multi-GB checkpoint.
pub const MODEL_LOAD_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

// --- names ----------------------------------------------------------------------------

pub const JOBS_SUBMITTED_TOTAL: &str = "sakuga_jobs_submitted_total";
pub const JOBS_FINISHED_TOTAL: &str = "sakuga_jobs_finished_total";
pub const ADMISSION_DECISIONS_TOTAL: &str = "sakuga_admission_decisions_total";
pub const RENDER_LATENCY_SECONDS: &str = "sakuga_render_latency_seconds";
pub const QUEUE_DEPTH: &str = "sakuga_queue_depth";
pub const QUEUE_WAIT_SECONDS: &str = "sakuga_queue_wait_seconds";
pub const STAGE_DURATION_SECONDS: &str = "sakuga_stage_duration_seconds";
pub const NODE_DURATION_SECONDS: &str = "sakuga_node_duration_seconds";
pub const FRAMES_TOTAL: &str = "sakuga_frames_total";
pub const FRAME_INTERVAL_SECONDS: &str = "sakuga_frame_interval_seconds";
pub const FPS_HEALTH_RATIO: &str = "sakuga_fps_health_ratio";
pub const IMAGES_TOTAL: &str = "sakuga_images_total";
pub const DEVICE_UTILIZATION_RATIO: &str = "sakuga_device_utilization_ratio";
pub const DEVICE_MEMORY_USED_BYTES: &str = "sakuga_device_memory_used_bytes";
pub const DEVICE_MEMORY_TOTAL_BYTES: &str = "sakuga_device_memory_total_bytes";
pub const DEVICE_MEMORY_HEADROOM_RATIO: &str = "sakuga_device_memory_headroom_ratio";
pub const MODEL_LOAD_SECONDS: &str = "sakuga_model_load_seconds";
pub const MODEL_CACHE_REQUESTS_TOTAL: &str = "sakuga_model_cache_requests_total";
pub const MODEL_CACHE_BYTES: &str = "sakuga_model_cache_bytes";
pub const IO_BYTES_TOTAL: &str = "sakuga_io_bytes_total";
pub const ERRORS_TOTAL: &str = "sakuga_errors_total";
pub const RETRIES_TOTAL: &str = "sakuga_retries_total";
pub const QC_REJECTIONS_TOTAL: &str = "sakuga_qc_rejections_total";
pub const SLO_OBJECTIVE_RATIO: &str = "sakuga_slo_objective_ratio";
pub const SLO_ERROR_BUDGET_REMAINING_RATIO: &str = "sakuga_slo_error_budget_remaining_ratio";
pub const SLO_BURN_RATE: &str = "sakuga_slo_burn_rate";
pub const PLANNED_HEAVY_LOAD: &str = "sakuga_planned_heavy_load";
pub const BUILD_INFO: &str = "sakuga_build_info";
pub const CONFIG_GENERATION: &str = "sakuga_config_generation";
pub const CLUSTER_REDELIVERIES_TOTAL: &str = "sakuga_cluster_redeliveries_total";
pub const CLUSTER_WORKER_LOST_TOTAL: &str = "sakuga_cluster_worker_lost_total";
pub const CLUSTER_CONSUMER_PENDING: &str = "sakuga_cluster_consumer_pending";
pub const CLUSTER_CONSUMER_ACK_PENDING: &str = "sakuga_cluster_consumer_ack_pending";
pub const CLUSTER_WORKERS: &str = "sakuga_cluster_workers";

const fn def(
    name: &'static str,
    kind: MetricKind,
    help: &'static str,
    labels: &'static [&'static str],
) -> MetricDef {
    MetricDef {
        name,
        kind,
        help,
        labels,
    }
}

use MetricKind::{Counter, Gauge, Histogram};

/// Every metric sakuga exports, in DESIGN.md order.
pub const METRICS: &[MetricDef] = &[
    def(
        JOBS_SUBMITTED_TOTAL,
        Counter,
        "Jobs accepted by Submit.",
        &["workload"],
    ),
    def(
        JOBS_FINISHED_TOTAL,
        Counter,
        "Jobs that reached a final state, by outcome.",
        &["workload", "outcome"],
    ),
    def(
        ADMISSION_DECISIONS_TOTAL,
        Counter,
        "Admission control decisions.",
        &["workload", "decision", "reason"],
    ),
    def(
        RENDER_LATENCY_SECONDS,
        Histogram,
        "End-to-end render latency, prompt received to output delivered.",
        &["workload"],
    ),
    def(
        QUEUE_DEPTH,
        Gauge,
        "Jobs waiting in the queue.",
        &["workload"],
    ),
    def(
        QUEUE_WAIT_SECONDS,
        Histogram,
        "Time a job waited in the queue before it started.",
        &["workload"],
    ),
    def(
        STAGE_DURATION_SECONDS,
        Histogram,
        "Time spent in each pipeline stage.",
        &["workload", "stage"],
    ),
    def(
        NODE_DURATION_SECONDS,
        Histogram,
        "Execution time of one workflow node.",
        &["class_type"],
    ),
    def(
        FRAMES_TOTAL,
        Counter,
        "Animation frames produced, delivered, dropped and duplicated.",
        &["workload", "kind"],
    ),
    def(
        FRAME_INTERVAL_SECONDS,
        Histogram,
        "Time between consecutive frames of one stream.",
        &["workload", "side"],
    ),
    def(
        FPS_HEALTH_RATIO,
        Gauge,
        "Delivered FPS over produced FPS (1 is healthy).",
        &["workload"],
    ),
    def(IMAGES_TOTAL, Counter, "Images rendered.", &["workload"]),
    def(
        DEVICE_UTILIZATION_RATIO,
        Gauge,
        "Compute utilization of the device, 0 to 1.",
        &["device"],
    ),
    def(
        DEVICE_MEMORY_USED_BYTES,
        Gauge,
        "Device memory in use.",
        &["device"],
    ),
    def(
        DEVICE_MEMORY_TOTAL_BYTES,
        Gauge,
        "Device memory capacity.",
        &["device"],
    ),
    def(
        DEVICE_MEMORY_HEADROOM_RATIO,
        Gauge,
        "Free device memory over capacity.",
        &["device"],
    ),
    def(
        MODEL_LOAD_SECONDS,
        Histogram,
        "Time to load a model into the cache.",
        &["kind"],
    ),
    def(
        MODEL_CACHE_REQUESTS_TOTAL,
        Counter,
        "Model cache lookups, by hit or miss.",
        &["kind", "result"],
    ),
    def(
        MODEL_CACHE_BYTES,
        Gauge,
        "Bytes of model weights resident in the cache.",
        &["device"],
    ),
    def(
        IO_BYTES_TOTAL,
        Counter,
        "Bytes read or written, by operation.",
        &["op"],
    ),
    def(
        ERRORS_TOTAL,
        Counter,
        "Errors by kind and stage.",
        &["kind", "stage"],
    ),
    def(RETRIES_TOTAL, Counter, "Retries by reason.", &["reason"]),
    def(
        QC_REJECTIONS_TOTAL,
        Counter,
        "Frames rejected by automatic quality checks.",
        &["check"],
    ),
    def(
        SLO_OBJECTIVE_RATIO,
        Gauge,
        "Target good/total ratio of each SLO.",
        &["slo"],
    ),
    def(
        SLO_ERROR_BUDGET_REMAINING_RATIO,
        Gauge,
        "Share of the SLO error budget left over its period (negative when overspent).",
        &["slo"],
    ),
    def(
        SLO_BURN_RATE,
        Gauge,
        "Error budget burn rate over a window (1 spends the budget exactly over the period).",
        &["slo", "window"],
    ),
    def(
        PLANNED_HEAVY_LOAD,
        Gauge,
        "1 while planned heavy load runs (alerts are inhibited).",
        &["reason"],
    ),
    def(
        BUILD_INFO,
        Gauge,
        "Always 1; labels carry the build version and config hash.",
        &["version", "config_hash"],
    ),
    def(
        CONFIG_GENERATION,
        Gauge,
        "Configuration changes applied: each reload that changed something and each restart adds one (kept across restarts in the data dir).",
        &["version", "config_hash"],
    ),
    def(
        CLUSTER_REDELIVERIES_TOTAL,
        Counter,
        "Cluster mode (workers): jobs delivered again after their worker was lost.",
        &["workload"],
    ),
    def(
        CLUSTER_WORKER_LOST_TOTAL,
        Counter,
        "Cluster mode (workers): jobs failed as worker_lost after max_deliver lost attempts.",
        &["workload"],
    ),
    def(
        CLUSTER_CONSUMER_PENDING,
        Gauge,
        "Cluster mode (gateways): jobs waiting in the work queue's consumer, not yet delivered (consumer lag).",
        &["workload"],
    ),
    def(
        CLUSTER_CONSUMER_ACK_PENDING,
        Gauge,
        "Cluster mode (gateways): jobs delivered to workers and not yet acked.",
        &["workload"],
    ),
    def(
        CLUSTER_WORKERS,
        Gauge,
        "Cluster mode (gateways): workers with a live heartbeat.",
        &[],
    ),
];

/// Looks a metric up by name.
pub fn metric(name: &str) -> Option<&'static MetricDef> {
    METRICS.iter().find(|def| def.name == name)
}

/// Registers the type and help text of every catalogued metric with the current recorder.
///
/// Call once at start-up, after installing the recorder (see `prometheus::install`).
pub fn describe_all() {
    // The identity series are rendered by the exporter itself (see `prometheus`).
    for def in METRICS
        .iter()
        .filter(|d| ![BUILD_INFO, CONFIG_GENERATION].contains(&d.name))
    {
        match def.kind {
            MetricKind::Counter => metrics::describe_counter!(def.name, def.help),
            MetricKind::Gauge => metrics::describe_gauge!(def.name, def.help),
            MetricKind::Histogram => {
                metrics::describe_histogram!(def.name, metrics::Unit::Seconds, def.help)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains_edge(edges: &[f64], edge: f64) -> bool {
        edges.iter().any(|e| (e - edge).abs() < 1e-12)
    }

    #[test]
    fn bucket_edges_sit_on_slo_thresholds() {
        assert!(contains_edge(RENDER_LATENCY_BUCKETS, 3.0));
        assert!(contains_edge(RENDER_LATENCY_BUCKETS, 5.0));
        assert!(contains_edge(QUEUE_WAIT_BUCKETS, 30.0));
        assert!(contains_edge(FRAME_INTERVAL_BUCKETS, 1.0 / 30.0));
        assert!(contains_edge(FRAME_INTERVAL_BUCKETS, 1.0 / 24.0));
        // The late-frame edges are the tolerance over the floor, written as literals.
        assert!(contains_edge(
            FRAME_INTERVAL_BUCKETS,
            late_frame_interval_s(24.0)
        ));
        assert!(contains_edge(
            FRAME_INTERVAL_BUCKETS,
            late_frame_interval_s(30.0)
        ));
    }

    #[test]
    fn bucket_edges_strictly_increase() {
        for def in METRICS {
            if let Some(edges) = def.buckets() {
                assert!(edges.windows(2).all(|w| w[0] < w[1]), "{}", def.name);
            }
        }
    }

    #[test]
    fn names_follow_the_house_pattern_and_are_unique() {
        let mut names: Vec<_> = METRICS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        for def in METRICS {
            assert!(def.name.starts_with("sakuga_"), "{}", def.name);
            assert_eq!(def.kind == MetricKind::Histogram, def.buckets().is_some());
            if def.kind == MetricKind::Counter {
                assert!(def.name.ends_with("_total"), "{}", def.name);
            }
        }
        // DESIGN.md section 5 (29) and the cluster mode's five (section 11).
        assert_eq!(METRICS.len(), 34);
    }
}
