//! Admission control (DESIGN.md section 7): what a job will cost before it starts, the
//! size caps a workflow must fit, whether a submission is admitted or denied, and whether a
//! queued job may start now or must wait.
//!
//! The decisions are pure functions of plain data ([`AdmissionConfig`], an [`Estimate`],
//! queue totals, a few signals) so they are tested here without threads; the engine's
//! queue worker calls them and counts every decision.

use sakuga_models::store::{ModelFolder, ModelStore};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use sakuga_nodes::{NodeCost, NodeEnv, Shape, ShapeInputs, Value};
use sakuga_telemetry::{AdmissionReason, Workload};

use crate::error::SchedulerError;
use crate::validate::{ValidNode, ValidWorkflow};

/// Caps on what one submission may contain, checked before validation does real work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkflowLimits {
    /// Bytes of workflow JSON.
    pub max_workflow_bytes: u64,
    /// Nodes in one workflow.
    pub max_nodes: u64,
    /// Largest width or height of any image the workflow asks for.
    pub max_resolution: u64,
    /// Largest batch size.
    pub max_batch: u64,
}

impl Default for WorkflowLimits {
    fn default() -> Self {
        Self {
            max_workflow_bytes: 4 << 20,
            max_nodes: 10_000,
            max_resolution: 8192,
            max_batch: 1024,
        }
    }
}

/// Admission settings; reloadable at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdmissionConfig {
    /// Queued jobs per workload; a submission past the cap is denied.
    pub queue_caps: WorkloadValues<usize>,
    /// Head start of each class in the queue, in seconds of waiting: a batch job must wait
    /// this much longer than a fresh animation job to overtake it through aging.
    pub class_offset_s: WorkloadValues<f64>,
    /// Score gained per second waited (aging), so nothing starves.
    pub aging_per_s: f64,
    /// Device memory a job may plan to use on the CPU (on CUDA the device total is used).
    pub memory_budget_bytes: u64,
    /// Duration assumed for a workflow never seen before, per node.
    pub default_node_duration_ms: f64,
    /// The job a demand unit stands for: KEDA demand counts jobs weighted by
    /// `expected duration / reference`, clamped to `[0.1, 100]`.
    pub reference_job_s: f64,
    /// Degrade an animation preview in steps (interpolation x2, fewer steps, lower
    /// resolution) when recent runs show it cannot keep its target FPS.
    pub degrade_animation: bool,
    pub limits: WorkflowLimits,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            queue_caps: WorkloadValues {
                animation: 64,
                single_image: 1024,
                batch: 4096,
            },
            class_offset_s: WorkloadValues {
                animation: 0.0,
                single_image: 30.0,
                batch: 120.0,
            },
            aging_per_s: 1.0,
            memory_budget_bytes: 8 << 30,
            default_node_duration_ms: 5.0,
            reference_job_s: 1.0,
            degrade_animation: true,
            limits: WorkflowLimits::default(),
        }
    }
}

/// One value per workload class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WorkloadValues<T> {
    pub animation: T,
    pub single_image: T,
    pub batch: T,
}

impl<T: Copy> WorkloadValues<T> {
    /// The value for `workload`.
    pub fn get(&self, workload: Workload) -> T {
        match workload {
            Workload::Animation => self.animation,
            Workload::SingleImage => self.single_image,
            Workload::Batch => self.batch,
        }
    }
}

impl<T: Default> Default for WorkloadValues<T> {
    fn default() -> Self {
        Self {
            animation: T::default(),
            single_image: T::default(),
            batch: T::default(),
        }
    }
}

/// What one node is expected to cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeEstimate {
    pub node_id: String,
    pub class_type: String,
    pub memory_bytes: u64,
    pub duration: Duration,
}

/// What a job is expected to cost before it starts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Peak device memory: model files not yet resident plus activations.
    pub peak_memory_bytes: u64,
    /// The node running at the peak, as `node <id> (<class>)`.
    pub peak_node: Option<String>,
    /// Expected run time, learned from recent runs of the same signature when there are any.
    pub expected_duration: Duration,
    /// Whether `expected_duration` comes from history (else from the per-node prior).
    pub learned: bool,
    pub width: u32,
    pub height: u32,
    pub batch: u32,
    /// Hash of the graph's shape and sizes; runs with the same signature teach the estimator.
    pub signature: u64,
    pub nodes: Vec<NodeEstimate>,
}

impl Estimate {
    /// Nothing expected: the estimate of a job restored only for lookups.
    pub fn none() -> Self {
        Estimate {
            peak_memory_bytes: 0,
            peak_node: None,
            expected_duration: Duration::ZERO,
            learned: false,
            width: 0,
            height: 0,
            batch: 0,
            signature: 0,
            nodes: Vec::new(),
        }
    }

    /// The job's weight in KEDA demand: duration over the reference job, in `[0.1, 100]`.
    pub fn demand_weight(&self, reference_job_s: f64) -> f64 {
        let reference = if reference_job_s > 0.0 {
            reference_job_s
        } else {
            1.0
        };
        (self.expected_duration.as_secs_f64() / reference).clamp(0.1, 100.0)
    }
}

/// Checks the raw size caps: bytes of JSON, node count, resolution and batch literals.
///
/// # Errors
/// [`SchedulerError::TooLarge`] naming the first cap exceeded.
pub fn check_limits(
    workflow: &Json,
    json_bytes: u64,
    limits: &WorkflowLimits,
) -> Result<(), SchedulerError> {
    let too_large = |what, actual: u64, limit: u64| {
        if actual > limit {
            Err(SchedulerError::TooLarge {
                what,
                actual,
                limit,
            })
        } else {
            Ok(())
        }
    };
    too_large("workflow bytes", json_bytes, limits.max_workflow_bytes)?;
    let nodes = match workflow.get("prompt").and_then(Json::as_object) {
        Some(prompt) if !prompt.contains_key("class_type") => prompt,
        _ => match workflow.as_object() {
            Some(nodes) => nodes,
            None => return Ok(()),
        },
    };
    too_large("node count", nodes.len() as u64, limits.max_nodes)?;
    for node in nodes.values() {
        let Some(inputs) = node.get("inputs").and_then(Json::as_object) else {
            continue;
        };
        for (name, value) in inputs {
            let Some(v) = as_size(value) else { continue };
            match name.as_str() {
                "width" | "height" => too_large("resolution", v, limits.max_resolution)?,
                "batch_size" | "amount" => too_large("batch size", v, limits.max_batch)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// A size literal as the validator converts it (Python's `int()`: integers, floats
/// truncated, numeric strings), so `"16384"` and `16384.0` meet the same caps as `16384`.
fn as_size(value: &Json) -> Option<u64> {
    let v = match value {
        Json::Number(n) => n.as_f64()?,
        Json::String(s) => {
            let s = s.trim();
            s.parse::<i64>()
                .map(|i| i as f64)
                .or_else(|_| s.parse::<f64>())
                .ok()?
        }
        _ => return None,
    };
    (v.is_finite() && v >= 0.0).then(|| v.trunc().min(u64::MAX as f64) as u64)
}

/// Learns expected durations per workflow signature (an exponentially weighted mean of
/// recent runs) and builds [`Estimate`]s.
#[derive(Debug, Default)]
pub struct Estimator {
    learned: Mutex<HashMap<u64, f64>>,
}

/// Weight of the newest run in the learned mean.
const LEARN_RATE: f64 = 0.3;
/// Signatures remembered; the map is cleared when it grows past this (rare, and cheap to relearn).
const MAX_SIGNATURES: usize = 4096;

impl Estimator {
    /// An estimator with nothing learned.
    pub fn new() -> Self {
        Self::default()
    }

    /// Estimates `workflow` by walking its plan with each node's shape function: the peak
    /// memory over the run (model files not yet resident, values alive between their
    /// producer and last consumer, each node's outputs and scratch), and the expected work.
    /// `env` sizes model files and input images.
    pub fn estimate(
        &self,
        workflow: &ValidWorkflow,
        env: &NodeEnv,
        config: &AdmissionConfig,
    ) -> Estimate {
        let walk = walk_shapes(workflow, env);
        let mut hasher = std::hash::DefaultHasher::new();
        let (mut width, mut height, mut batch) = (0u32, 0u32, 1u32);
        let mut nodes = Vec::with_capacity(workflow.nodes.len());
        let mut weights = 0u64;
        let mut prior = Duration::ZERO;
        for (node, cost) in workflow.nodes.iter().zip(&walk.costs) {
            node.class_type.hash(&mut hasher);
            node.links.len().hash(&mut hasher);
            format!("{:?}", cost.outputs).hash(&mut hasher);
            literal_int(node, "steps").hash(&mut hasher);
            for (b, h, w) in cost.outputs.iter().filter_map(Shape::pixels) {
                width = width.max(clamp_u32(w));
                height = height.max(clamp_u32(h));
                batch = batch.max(clamp_u32(b));
            }
            let mut memory = cost.output_bytes().saturating_add(cost.working_bytes);
            for (name, value) in &node.literals {
                if let Value::String(file) = value
                    && name.ends_with("_name")
                    && let Some(bytes) = model_file_bytes(&env.models_dir, file)
                {
                    memory = memory.saturating_add(bytes);
                    weights = weights.saturating_add(bytes);
                }
            }
            let seconds = config.default_node_duration_ms / 1000.0 * cost.work.max(0.01);
            // A misconfigured prior (negative, NaN) must not panic the estimate.
            let duration = if seconds.is_finite() {
                Duration::from_secs_f64(seconds.clamp(0.0, 1e9))
            } else {
                Duration::ZERO
            };
            prior += duration;
            nodes.push(NodeEstimate {
                node_id: node.id.to_string(),
                class_type: node.class_type.to_string(),
                memory_bytes: memory,
                duration,
            });
        }
        let signature = hasher.finish();
        let learned = self.learned.lock().get(&signature).copied();
        let peak_node = walk
            .peak_at
            .map(|i| &workflow.nodes[i])
            .map(|n| format!("node {} ({})", n.id, n.class_type));
        Estimate {
            peak_memory_bytes: weights.saturating_add(walk.peak_bytes),
            peak_node,
            expected_duration: learned.map_or(prior, Duration::from_secs_f64),
            learned: learned.is_some(),
            width,
            height,
            batch,
            signature,
            nodes,
        }
    }

    /// Teaches the estimator that a run of `signature` took `duration`.
    pub fn learn(&self, signature: u64, duration: Duration) {
        let mut learned = self.learned.lock();
        if learned.len() >= MAX_SIGNATURES && !learned.contains_key(&signature) {
            learned.clear();
        }
        let seconds = duration.as_secs_f64();
        learned
            .entry(signature)
            .and_modify(|mean| *mean += LEARN_RATE * (seconds - *mean))
            .or_insert(seconds);
    }
}

/// Each node's cost in plan order, and the peak of live values plus one node's outputs and
/// scratch over the run.
struct ShapeWalk {
    costs: Vec<NodeCost>,
    peak_bytes: u64,
    /// The node running at the peak.
    peak_at: Option<usize>,
}

fn walk_shapes(workflow: &ValidWorkflow, env: &NodeEnv) -> ShapeWalk {
    let n = workflow.nodes.len();
    // A value is released after its last consumer ran; an unconsumed one right away.
    let mut last_use: Vec<usize> = (0..n).collect();
    for (i, node) in workflow.nodes.iter().enumerate() {
        for &(_, source, _) in &node.links {
            last_use[source] = last_use[source].max(i);
        }
    }
    let mut costs: Vec<NodeCost> = Vec::with_capacity(n);
    let mut released = vec![0u64; n];
    let (mut live, mut peak_bytes, mut peak_at) = (0u64, 0u64, None);
    for (i, node) in workflow.nodes.iter().enumerate() {
        let links = node
            .links
            .iter()
            .map(|(name, source, output)| {
                let shape = costs[*source]
                    .outputs
                    .get(*output)
                    .copied()
                    .unwrap_or(Shape::Fixed);
                (&**name, shape)
            })
            .collect();
        let inputs = ShapeInputs {
            literals: &node.literals,
            links,
            env: Some(env),
        };
        let cost = node.node.schema().cost(&inputs);
        let out = cost.output_bytes();
        let during = live.saturating_add(out).saturating_add(cost.working_bytes);
        if during > peak_bytes || peak_at.is_none() {
            peak_bytes = during;
            peak_at = Some(i);
        }
        live = live.saturating_add(out);
        released[last_use[i]] = released[last_use[i]].saturating_add(out);
        live = live.saturating_sub(released[i]);
        costs.push(cost);
    }
    ShapeWalk {
        costs,
        peak_bytes,
        peak_at,
    }
}

fn literal_int(node: &ValidNode, name: &str) -> Option<i64> {
    node.literals
        .iter()
        .find(|(n, _)| &**n == name)
        .and_then(|(_, v)| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        })
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn model_file_bytes(models_dir: &Path, name: &str) -> Option<u64> {
    let store = ModelStore::new(models_dir);
    ModelFolder::ALL
        .into_iter()
        .find_map(|folder| store.resolve(folder, name).ok())
        .and_then(|path| std::fs::metadata(path).ok())
        .map(|m| m.len())
}

/// What the queue looks like to a submission of one workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueView {
    /// Jobs of the same workload queued now.
    pub queued_same_workload: usize,
    /// Expected seconds of work that would run before this job (queued ahead + running).
    pub work_ahead_s: f64,
    /// Jobs of this workload that really finished per second lately (`None` until known).
    pub drain_per_s: Option<f64>,
}

/// Admission's answer to a submission.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitVerdict {
    Admit,
    Deny {
        reason: AdmissionReason,
        detail: String,
        retry_after: Duration,
    },
}

/// When to retry: once the jobs of this workload queued now have drained at the rate they
/// really drained lately, or by the estimated work ahead while no rate is known; at least
/// 1 s, at most two minutes.
pub fn retry_after(queue: QueueView) -> Duration {
    let seconds = match queue.drain_per_s {
        Some(rate) if rate > 0.0 => (queue.queued_same_workload + 1) as f64 / rate,
        _ => queue.work_ahead_s,
    };
    Duration::from_secs_f64(seconds.clamp(1.0, 120.0))
}

/// Decides on a submission: deny when the workload's queue is full, when the job could
/// never fit the memory budget, or when it cannot start before its deadline.
pub fn decide_submit(
    workload: Workload,
    estimate: &Estimate,
    deadline_in: Option<Duration>,
    queue: QueueView,
    config: &AdmissionConfig,
) -> SubmitVerdict {
    let cap = config.queue_caps.get(workload);
    let drain = retry_after(queue);
    if queue.queued_same_workload >= cap {
        return SubmitVerdict::Deny {
            reason: AdmissionReason::QueueFull,
            detail: format!("the {workload} queue holds {cap} jobs, its cap"),
            retry_after: drain,
        };
    }
    if estimate.peak_memory_bytes > config.memory_budget_bytes {
        return SubmitVerdict::Deny {
            reason: AdmissionReason::MemoryHeadroom,
            detail: format!(
                "the job needs about {} MiB ({} bytes) at its peak, in {}; the device budget is {} MiB ({} bytes)",
                estimate.peak_memory_bytes >> 20,
                estimate.peak_memory_bytes,
                estimate.peak_node.as_deref().unwrap_or("its largest node"),
                config.memory_budget_bytes >> 20,
                config.memory_budget_bytes
            ),
            retry_after: Duration::from_secs(60),
        };
    }
    if let Some(left) = deadline_in {
        let start_in = Duration::from_secs_f64(queue.work_ahead_s.max(0.0));
        if start_in > left {
            return SubmitVerdict::Deny {
                reason: AdmissionReason::Deadline,
                detail: format!(
                    "about {:.1}s of work is ahead of it, the deadline is in {:.1}s",
                    start_in.as_secs_f64(),
                    left.as_secs_f64()
                ),
                retry_after: drain,
            };
        }
    }
    SubmitVerdict::Admit
}

/// What the device looks like to a queued job that could start now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceView {
    /// Device memory headroom stays over the floor with the job's peak added.
    pub fits_in_headroom: bool,
    /// Animation FPS health is degraded right now.
    pub animation_fps_degraded: bool,
}

/// Whether a queued job starts now or waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartVerdict {
    Start,
    Defer(AdmissionReason),
}

/// Decides whether a queued job of `workload` may start on a device that looks like `device`.
pub fn decide_start(workload: Workload, device: DeviceView) -> StartVerdict {
    if !device.fits_in_headroom {
        return StartVerdict::Defer(AdmissionReason::MemoryHeadroom);
    }
    if workload == Workload::Batch && device.animation_fps_degraded {
        return StartVerdict::Defer(AdmissionReason::FpsDegraded);
    }
    StartVerdict::Start
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn estimate(memory: u64, seconds: f64) -> Estimate {
        Estimate {
            peak_memory_bytes: memory,
            peak_node: None,
            expected_duration: Duration::from_secs_f64(seconds),
            learned: false,
            width: 64,
            height: 64,
            batch: 1,
            signature: 1,
            nodes: Vec::new(),
        }
    }

    #[test]
    fn retry_after_follows_the_real_drain_rate_once_known() {
        let mut view = QueueView {
            queued_same_workload: 9,
            work_ahead_s: 1.0,
            drain_per_s: None,
        };
        assert_eq!(retry_after(view), Duration::from_secs(1));
        // One job every 3 s really: ten jobs (nine ahead and this one) take 30 s.
        view.drain_per_s = Some(1.0 / 3.0);
        let retry = retry_after(view).as_secs_f64();
        assert!((retry - 30.0).abs() < 1e-6, "{retry}");
        view.drain_per_s = Some(1e-6);
        assert_eq!(retry_after(view), Duration::from_secs(120));
    }

    #[test]
    fn a_full_queue_denies_with_a_retry_hint() {
        let config = AdmissionConfig::default();
        let view = QueueView {
            queued_same_workload: config.queue_caps.animation,
            work_ahead_s: 5.0,
            drain_per_s: None,
        };
        match decide_submit(Workload::Animation, &estimate(1, 0.1), None, view, &config) {
            SubmitVerdict::Deny {
                reason,
                retry_after,
                ..
            } => {
                assert_eq!(reason, AdmissionReason::QueueFull);
                assert_eq!(retry_after, Duration::from_secs(5));
            }
            other => panic!("expected a deny, got {other:?}"),
        }
    }

    #[test]
    fn a_job_that_cannot_start_before_its_deadline_is_denied() {
        let config = AdmissionConfig::default();
        let view = QueueView {
            queued_same_workload: 3,
            work_ahead_s: 10.0,
            drain_per_s: None,
        };
        let verdict = decide_submit(
            Workload::Batch,
            &estimate(1, 1.0),
            Some(Duration::from_secs(2)),
            view,
            &config,
        );
        assert!(matches!(
            verdict,
            SubmitVerdict::Deny {
                reason: AdmissionReason::Deadline,
                ..
            }
        ));
        let verdict = decide_submit(
            Workload::Batch,
            &estimate(1, 1.0),
            Some(Duration::from_secs(20)),
            view,
            &config,
        );
        assert_eq!(verdict, SubmitVerdict::Admit);
    }

    #[test]
    fn a_job_bigger_than_the_memory_budget_is_denied() {
        let config = AdmissionConfig {
            memory_budget_bytes: 1 << 20,
            ..AdmissionConfig::default()
        };
        let view = QueueView {
            queued_same_workload: 0,
            work_ahead_s: 0.0,
            drain_per_s: None,
        };
        let verdict = decide_submit(
            Workload::SingleImage,
            &estimate(2 << 20, 1.0),
            None,
            view,
            &config,
        );
        assert!(matches!(
            verdict,
            SubmitVerdict::Deny {
                reason: AdmissionReason::MemoryHeadroom,
                ..
            }
        ));
    }

    #[test]
    fn batch_waits_while_animation_is_degraded_and_everyone_waits_for_memory() {
        let degraded = DeviceView {
            fits_in_headroom: true,
            animation_fps_degraded: true,
        };
        assert_eq!(
            decide_start(Workload::Batch, degraded),
            StartVerdict::Defer(AdmissionReason::FpsDegraded)
        );
        assert_eq!(
            decide_start(Workload::Animation, degraded),
            StartVerdict::Start
        );
        let full = DeviceView {
            fits_in_headroom: false,
            animation_fps_degraded: false,
        };
        assert_eq!(
            decide_start(Workload::SingleImage, full),
            StartVerdict::Defer(AdmissionReason::MemoryHeadroom)
        );
    }

    #[test]
    fn limits_catch_node_count_resolution_and_batch() {
        let limits = WorkflowLimits {
            max_workflow_bytes: 1000,
            max_nodes: 2,
            max_resolution: 1024,
            max_batch: 8,
        };
        let ok = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}});
        assert!(check_limits(&ok, 100, &limits).is_ok());
        assert!(matches!(
            check_limits(&ok, 2000, &limits),
            Err(SchedulerError::TooLarge {
                what: "workflow bytes",
                ..
            })
        ));
        let big =
            json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 4096, "height": 64}}});
        assert!(matches!(
            check_limits(&big, 100, &limits),
            Err(SchedulerError::TooLarge {
                what: "resolution",
                ..
            })
        ));
        let batch = json!({"1": {"class_type": "EmptyImage", "inputs": {"batch_size": 9}}});
        assert!(matches!(
            check_limits(&batch, 100, &limits),
            Err(SchedulerError::TooLarge {
                what: "batch size",
                ..
            })
        ));
        let many = json!({"1": {}, "2": {}, "3": {}});
        assert!(matches!(
            check_limits(&many, 100, &limits),
            Err(SchedulerError::TooLarge {
                what: "node count",
                ..
            })
        ));
    }

    #[test]
    fn size_caps_read_sizes_as_the_validator_converts_them() {
        let limits = WorkflowLimits::default();
        for width in [
            json!("16384"),
            json!(16384.0),
            json!(" 8193"),
            json!(8192.9e3),
        ] {
            let wf = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": width.clone(), "height": 8}}});
            assert!(
                matches!(
                    check_limits(&wf, 100, &limits),
                    Err(SchedulerError::TooLarge {
                        what: "resolution",
                        ..
                    })
                ),
                "{width} passed"
            );
        }
        let batch = json!({"1": {"class_type": "EmptyImage", "inputs": {"batch_size": "5000"}}});
        assert!(check_limits(&batch, 100, &limits).is_err());
        let fine = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": "8192", "height": 8192.0}}});
        assert!(check_limits(&fine, 100, &limits).is_ok());
    }

    #[test]
    fn demand_weight_is_clamped() {
        assert_eq!(estimate(0, 0.0001).demand_weight(1.0), 0.1);
        assert_eq!(estimate(0, 2.0).demand_weight(1.0), 2.0);
        assert_eq!(estimate(0, 1e6).demand_weight(1.0), 100.0);
    }
}
