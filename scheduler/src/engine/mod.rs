//! The job runtime: submission, admission, the queue, the device worker and the journal,
//! wired together behind one cheap-to-clone [`EngineHandle`].
//!
//! Shape (as TGI's router queue): the handle holds a sender; a `queue_worker` thread owns
//! every job's state and the [`JobQueue`], answering each [`Command`] through a oneshot; a
//! `device_worker` thread owns the [`Executor`] and runs one plan at a time; the journal
//! has its own group-commit thread. Compute never runs on tokio: callers on tokio await
//! replies, blocking callers (`sakuga run`) use the `*_blocking` twins.
//!
//! Parsing, size caps, validation and estimation happen on the caller's side of the
//! channel so the queue worker stays a fast bookkeeper.

pub mod clock;
pub mod feed;
mod ids;
mod jobs;
mod pacer;
mod recovery;
mod rewrite;
mod throughput;
mod transition;
mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::oneshot;

use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_telemetry::{Signals, SignalsConfig, TraceContext, Workload};

use crate::admission::{AdmissionConfig, Estimate, Estimator, WorkloadValues, check_limits};
use crate::error::SchedulerError;
use crate::executor::ExecutorConfig;
use crate::journal::{Journal, RecordState};
use crate::observe::workload_of;
use crate::plan::ExecutionPlan;
use crate::workflow::Workflow;

pub use feed::{FeedConfig, Frame, JobEvent, JobFeed, JobWatch, TimedEvent, WatchItem};
pub use ids::config_hash;

/// A job's state; the journal's record states are the public ones.
pub type JobState = RecordState;

/// Feature flags per workload: the "isolate and toggle" remedy for post-process regressions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FeatureFlags {
    /// Bypass `ImageUpscaleWithModel` nodes (their input image passes through).
    pub upscaler_off: WorkloadValues<bool>,
    /// Bypass `FrameInterpolate` nodes (the frames pass through uninterpolated).
    pub interpolator_off: WorkloadValues<bool>,
}

/// The part of the configuration a reload may change without dropping work.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineTunables {
    pub admission: AdmissionConfig,
    pub features: FeatureFlags,
    pub limits: RunLimits,
}

/// How long a job may run, per workload (`[limits.run_time_s]` in the tunables file). A
/// job still running past its limit is stopped at its next step or tile and fails with
/// outcome `timeout`, and the device moves on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunLimits {
    /// Seconds from start to end, frame delivery included; 0 means no limit.
    pub run_time_s: WorkloadValues<f64>,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            // Ten times what a slow CPU needs for the largest demo workflows, and a paced
            // preview of several minutes; batch jobs carry many images.
            run_time_s: WorkloadValues {
                animation: 900.0,
                single_image: 900.0,
                batch: 3600.0,
            },
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    pub tunables: EngineTunables,
    pub executor: ExecutorConfig,
    /// Where the journal lives; `None` keeps jobs in memory only (`sakuga run`).
    pub data_dir: Option<PathBuf>,
    /// Final journal records older than this are pruned at start-up.
    pub journal_retention: Duration,
    pub feed: FeedConfig,
    /// Finished jobs kept in memory for `GetJob`, `ListJobs` and late `Watch`.
    pub finished_kept: usize,
    /// Finished jobs whose frames are kept for replay.
    pub finished_frames_kept: usize,
    /// A job found running after this many ungraceful stops (crash, abort, SIGKILL) is
    /// failed as `poison` on recovery instead of run again. 1: one crash is enough, so a
    /// job that takes the process down cannot crash it in a loop.
    pub max_attempts: u32,
    /// The time of day deadlines are judged by (tests inject a [`clock::ManualClock`]).
    #[serde(skip, default = "clock::system")]
    pub clock: Arc<dyn clock::Clock>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            tunables: EngineTunables::default(),
            executor: ExecutorConfig::default(),
            data_dir: None,
            journal_retention: Duration::from_secs(7 * 24 * 3600),
            feed: FeedConfig::default(),
            finished_kept: 4096,
            finished_frames_kept: 16,
            max_attempts: 1,
            clock: clock::system(),
        }
    }
}

/// A job as a client submits it.
#[derive(Debug, Clone, Default)]
pub struct SubmitRequest {
    /// API-format workflow (or a `POST /prompt` body).
    pub workflow: Json,
    /// Size of the workflow text as received, for the size cap; measured when `None`.
    pub workflow_bytes: Option<u64>,
    /// `None` infers it: animation if it streams frames, batch if batch size > 1.
    pub workload: Option<Workload>,
    /// Higher starts earlier within its class (clamped to ±100).
    pub priority: i32,
    /// The job must start before this, or it is denied (at submit) or times out (queued).
    pub deadline: Option<SystemTime>,
    /// Submissions with a key already seen return the first job instead of a new one.
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The client's trace (from `traceparent`); a new root trace when `None`.
    pub trace: Option<TraceContext>,
    /// Which nodes run: those the output nodes need, or (warmup) every node.
    pub roots: crate::validate::Roots,
    /// Set when a cluster gateway already accepted the job (cluster mode's workers): its
    /// id and attempt are kept, and the gateway's rewrites (feature bypass, degrade) are
    /// not applied twice.
    pub assigned: Option<Assigned>,
}

/// A job a cluster gateway accepted, as a worker runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    pub job_id: String,
    /// Attempts made before this one (earlier deliveries to workers that were lost).
    pub earlier_attempts: u32,
    pub submitted_at: SystemTime,
}

/// A submission checked and rewritten the way [`EngineHandle::submit`] would, without
/// queueing it: what a cluster gateway publishes for a worker to run.
#[derive(Debug, Clone)]
pub struct PreparedSubmission {
    pub job_id: String,
    /// API format, after feature bypass and degrading.
    pub workflow: Json,
    pub estimate: Estimate,
    pub workload: Workload,
    pub priority: i32,
    pub deadline: Option<SystemTime>,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub trace: TraceContext,
    pub submitted_at: SystemTime,
    /// How it was degraded to keep its target FPS, if it was.
    pub degraded: Option<String>,
}

impl SubmitRequest {
    /// A request for `workflow` with every other field at its default.
    pub fn new(workflow: Json) -> Self {
        Self {
            workflow,
            ..Self::default()
        }
    }
}

/// What `Submit` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub job_id: String,
    /// 1-based position in the queue (0 once running or finished).
    pub queue_position: usize,
    pub estimate: Estimate,
    pub workload: Workload,
    pub trace_id: String,
    /// The idempotency key matched an earlier job; this is that job.
    pub deduplicated: bool,
}

/// A file a job produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobOutput {
    pub node_id: String,
    pub path: PathBuf,
    pub kind: String,
}

/// A job as `GetJob` and `ListJobs` show it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    pub job_id: String,
    pub workload: Workload,
    pub state: JobState,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub trace_id: String,
    pub idempotency_key: Option<String>,
    pub submitted_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub deadline: Option<SystemTime>,
    /// 1-based, while queued.
    pub queue_position: Option<usize>,
    pub estimate: Option<Estimate>,
    pub error: Option<String>,
    pub outputs: Vec<JobOutput>,
    /// Times it started running (more than 1 after a crash recovery).
    pub attempts: u32,
    /// It was found unfinished in the journal after a restart, or (cluster mode)
    /// redelivered after its worker was lost.
    pub recovered: bool,
    /// Cluster mode: the worker that ran (or runs) it.
    pub worker: Option<String>,
}

/// What of a playback report counts: frames the job's stream really produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaybackClaim {
    pub workload: Workload,
    pub displayed: u64,
    pub dropped: u64,
}

/// `ListJobs` filter; `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListFilter {
    pub workload: Option<Workload>,
    pub state: Option<JobState>,
    /// Every pair must be present among the job's labels.
    pub labels: BTreeMap<String, String>,
}

/// One page of `ListJobs`, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    pub jobs: Vec<JobInfo>,
    /// Pass back to get the next page; `None` on the last page.
    pub next_page_token: Option<String>,
    /// The token that continues right after each job of `jobs` (same length), so a
    /// caller that must cut the page short (to fit a message) can still page on.
    pub resume_tokens: Vec<String>,
}

/// Demand for autoscaling: work queued and running, weighted by estimated cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Demand {
    pub queued_jobs: usize,
    pub running_jobs: usize,
    /// Sum of per-job weights (expected duration over the reference job, clamped).
    pub weighted: f64,
    /// Expected seconds of queued plus running work.
    pub work_s: f64,
    pub queued_by_workload: [usize; 3],
}

/// A configuration change applied by [`EngineHandle::reload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    pub config_hash: String,
}

/// A workflow checked for submission, with what checking it found.
struct Checked {
    workflow: Json,
    plan: ExecutionPlan,
    estimate: Estimate,
    workload: Workload,
    /// How it was degraded to keep its target FPS, if it was.
    degraded: Option<String>,
}

/// Requests the queue worker answers.
pub(crate) enum Command {
    Submit(
        Box<jobs::PreparedJob>,
        oneshot::Sender<Result<Submitted, SchedulerError>>,
    ),
    Cancel(String, oneshot::Sender<Result<JobInfo, SchedulerError>>),
    Get(String, oneshot::Sender<Result<JobInfo, SchedulerError>>),
    Watch(String, oneshot::Sender<Result<JobWatch, SchedulerError>>),
    Playback(
        String,
        (u64, u64),
        oneshot::Sender<Result<PlaybackClaim, SchedulerError>>,
    ),
    List(ListFilter, usize, Option<u64>, oneshot::Sender<JobPage>),
    Demand(oneshot::Sender<Demand>),
    /// Stop admitting; answer once nothing is running.
    Drain(oneshot::Sender<()>),
    /// From the device worker: the running job left the device, its frames still playing
    /// out in the pacer; the next job may start.
    DeviceFree(String),
    /// From the device worker or the pacer: the running job ended.
    Finished(Box<worker::Finished>),
    /// From the device worker: the running job ran out of memory and runs once more with
    /// its batch split.
    Retried {
        job_id: String,
        batch_limit: usize,
        error: String,
    },
    /// From the journal: a submission's record could not be written, so it was refused.
    Unjournaled(String, String),
    /// Stop the queue worker (the device worker follows once its job ends).
    Shutdown,
    /// Give up on running work: journal it back as queued, its attempt not counted, cancel
    /// it, answer once the journal has committed, and stop the queue worker.
    Interrupt(oneshot::Sender<Vec<String>>),
}

/// State shared by every handle clone, read without going through the queue worker.
pub(crate) struct Shared {
    pub registry: Arc<NodeRegistry>,
    pub env: Arc<NodeEnv>,
    pub signals: Signals,
    pub estimator: Estimator,
    pub tunables: RwLock<EngineTunables>,
    /// The `hardware_class` of this engine's stage events and spans.
    pub hardware_class: String,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// Queued plus running jobs, as [`Demand`] counts them, published by the queue worker
    /// whenever either changes and before that change's events go out, so that a reader
    /// woken by those events reads the new count without asking the queue worker.
    pub active: AtomicUsize,
    pub clock: Arc<dyn clock::Clock>,
    pub threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The engine's front door. Cheap to clone; every clone talks to the same workers.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("ready", &self.is_ready())
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

/// `cpu` or `cuda`: what the device is, when the operator did not name a finer class
/// (`[signals] hardware_class`, e.g. the GPU model) for the SLOs' "standard hardware".
fn default_hardware_class(device: &candle_core::Device) -> String {
    if device.is_cuda() { "cuda" } else { "cpu" }.to_owned()
}

/// Graphs with more nodes than this are validated on a blocking thread, not on tokio.
const LARGE_GRAPH_NODES: usize = 64;

/// Commands waiting for the queue worker; senders wait when it is full.
const COMMAND_CAPACITY: usize = 8192;

impl EngineHandle {
    /// Starts the journal (when `config.data_dir` is set), the device worker and the queue
    /// worker, recovers unfinished jobs from the journal, and returns once the device
    /// worker is ready.
    ///
    /// # Errors
    /// [`SchedulerError::Journal`] when the journal cannot be opened.
    pub fn start(
        config: EngineConfig,
        registry: Arc<NodeRegistry>,
        env: Arc<NodeEnv>,
        signals: Signals,
    ) -> Result<EngineHandle, SchedulerError> {
        let (journal, records) = match &config.data_dir {
            Some(dir) => {
                let (journal, records) = Journal::open(dir, config.journal_retention)?;
                // A server starts with an empty temp dir, as ComfyUI does: previews are
                // for viewing, and the numbering of new ones relies on it.
                if let Err(e) = sakuga_nodes::files::clear_dir(&env.temp_dir) {
                    tracing::warn!(error = %e, "could not clear the temp dir");
                }
                (Some(journal), records)
            }
            None => (None, Vec::new()),
        };
        if let Some(cache) = env.resources.get::<sakuga_models::cache::ModelCache>() {
            cache.record_to(signals.clone());
        }
        let shared = Arc::new(Shared {
            registry,
            env: env.clone(),
            signals: signals.clone(),
            estimator: Estimator::new(),
            tunables: RwLock::new(config.tunables.clone()),
            hardware_class: signals
                .config()
                .hardware_class
                .clone()
                .unwrap_or_else(|| default_hardware_class(&env.device)),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            clock: config.clock.clone(),
            threads: Mutex::new(Vec::new()),
        });
        let (tx, rx) = crossbeam_channel::bounded(COMMAND_CAPACITY);
        let (pacer, pacer_thread) = pacer::spawn_pacer()?;
        let device =
            worker::spawn_device_worker(env, config.executor.clone(), tx.clone(), pacer.clone())?;
        let handle = EngineHandle { tx, shared };
        let mut state =
            jobs::QueueState::new(config, handle.shared.clone(), journal, device.jobs, pacer);
        state.recover(records, &handle);
        let queue = std::thread::Builder::new()
            .name("sakuga-queue".into())
            .spawn(move || jobs::queue_worker(state, rx))
            .map_err(|e| SchedulerError::Journal {
                path: PathBuf::new(),
                reason: format!("spawning the queue thread: {e}"),
            })?;
        handle
            .shared
            .threads
            .lock()
            .extend([device.thread, queue, pacer_thread]);
        handle.shared.ready.store(true, Ordering::Release);
        Ok(handle)
    }

    /// Queued plus running jobs (`Demand`'s `queued_jobs + running_jobs`) without a round
    /// trip to the queue worker: what ComfyUI's `queue_remaining` shows after every change.
    pub fn active_jobs(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Whether the device worker is up and the engine takes work.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire) && !self.is_draining()
    }

    /// Whether the engine stopped admitting (shutdown in progress).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// The signals handle the engine records to.
    pub fn signals(&self) -> &Signals {
        &self.shared.signals
    }

    /// The node registry workflows are validated against.
    pub fn registry(&self) -> &Arc<NodeRegistry> {
        &self.shared.registry
    }

    /// The node environment (folders, device).
    pub fn env(&self) -> &Arc<NodeEnv> {
        &self.shared.env
    }

    /// The current tunables.
    /// The `hardware_class` of this engine's stage events (the device's model).
    pub fn hardware_class(&self) -> &str {
        &self.shared.hardware_class
    }

    pub fn tunables(&self) -> EngineTunables {
        self.shared.tunables.read().clone()
    }

    /// Configuration generation (bumped by each reload that changed something).
    pub fn config_generation(&self) -> u64 {
        self.shared.signals.config_generation()
    }

    /// Parses, caps, validates and estimates a workflow without submitting it.
    ///
    /// # Errors
    /// [`SchedulerError::Malformed`], [`SchedulerError::TooLarge`] or
    /// [`SchedulerError::Invalid`] with every problem.
    pub fn check(
        &self,
        workflow: &Json,
        workflow_bytes: Option<u64>,
    ) -> Result<(ExecutionPlan, Estimate), SchedulerError> {
        self.check_with(
            workflow,
            workflow_bytes,
            crate::validate::Roots::OutputNodes,
        )
    }

    fn check_with(
        &self,
        workflow: &Json,
        workflow_bytes: Option<u64>,
        roots: crate::validate::Roots,
    ) -> Result<(ExecutionPlan, Estimate), SchedulerError> {
        let tunables = self.shared.tunables.read().clone();
        let bytes = workflow_bytes
            .unwrap_or_else(|| serde_json::to_vec(workflow).map_or(0, |v| v.len() as u64));
        check_limits(workflow, bytes, &tunables.admission.limits)?;
        let parsed = Workflow::from_json(workflow.clone())?;
        let valid = crate::validate::validate_with(
            &parsed,
            &self.shared.registry,
            &self.shared.env,
            roots,
        )?;
        let estimate =
            self.shared
                .estimator
                .estimate(&valid, &self.shared.env, &tunables.admission);
        Ok((ExecutionPlan::compile(valid), estimate))
    }

    fn prepare(&self, request: SubmitRequest) -> Result<jobs::PreparedJob, SchedulerError> {
        self.prepare_with(request, ids::new_job_id)
    }

    fn prepare_with(
        &self,
        mut request: SubmitRequest,
        mint: fn() -> String,
    ) -> Result<jobs::PreparedJob, SchedulerError> {
        if self.is_draining() {
            return Err(SchedulerError::ShuttingDown);
        }
        crate::bounds::check_submit(&request, self.shared.clock.now())?;
        let assigned = request.assigned.take();
        let checked = match &assigned {
            // Accepted by a cluster gateway: checked again (this worker's registry and
            // models decide), not rewritten twice.
            Some(_) => {
                let workflow = std::mem::take(&mut request.workflow);
                let (plan, estimate) =
                    self.check_with(&workflow, request.workflow_bytes, request.roots)?;
                Checked {
                    workload: request.workload.unwrap_or_else(|| workload_of(&plan)),
                    workflow,
                    plan,
                    estimate,
                    degraded: None,
                }
            }
            None => self.rewritten(&mut request)?,
        };
        let (job_id, submitted_at, earlier_attempts) = match assigned {
            Some(a) => (a.job_id, a.submitted_at, a.earlier_attempts),
            None => (mint(), SystemTime::now(), 0),
        };
        let trace = request.trace.unwrap_or_else(TraceContext::new_root);
        let span = sakuga_telemetry::open_job_span(&job_id, checked.workload, &trace);
        Ok(jobs::PreparedJob {
            submission: PreparedSubmission {
                job_id,
                workflow: checked.workflow,
                estimate: checked.estimate,
                workload: checked.workload,
                priority: request.priority,
                deadline: request.deadline,
                idempotency_key: request.idempotency_key,
                labels: request.labels,
                trace,
                submitted_at,
                degraded: checked.degraded,
            },
            plan: checked.plan,
            span,
            earlier_attempts,
        })
    }

    /// A new submission checked and rewritten: UI format, feature bypass, validation,
    /// estimate, degrade-for-FPS.
    fn rewritten(&self, request: &mut SubmitRequest) -> Result<Checked, SchedulerError> {
        let features = self.shared.tunables.read().features;
        let workload_hint = request.workload;
        let workflow = std::mem::take(&mut request.workflow);
        let mut workflow = crate::ui_format::to_api_format(workflow, self.registry())?;
        if let Some(w) = workload_hint {
            workflow = rewrite::apply_features(workflow, features, w, &self.shared.registry);
        }
        let (plan, estimate) = self.check_with(&workflow, request.workflow_bytes, request.roots)?;
        let workload = workload_hint.unwrap_or_else(|| workload_of(&plan));
        let (plan, estimate, workflow) =
            if workload_hint.is_none() && features != FeatureFlags::default() {
                let toggled = rewrite::apply_features(
                    workflow.clone(),
                    features,
                    workload,
                    &self.shared.registry,
                );
                if toggled == workflow {
                    (plan, estimate, workflow)
                } else {
                    let (plan, estimate) = self.check(&toggled, None)?;
                    (plan, estimate, toggled)
                }
            } else {
                (plan, estimate, workflow)
            };
        Ok(
            match self.degraded_for_fps(workload, &workflow, &estimate)? {
                Some((degraded, plan, estimate, note)) => Checked {
                    workflow: degraded,
                    plan,
                    estimate,
                    workload,
                    degraded: Some(note),
                },
                None => Checked {
                    workflow,
                    plan,
                    estimate,
                    workload,
                    degraded: None,
                },
            },
        )
    }

    /// Checks and rewrites a submission as [`Self::submit`] does (caps, UI format, feature
    /// bypass, validation, estimate, degrade-for-FPS, a new job id) without queueing it:
    /// cluster mode's gateways publish the result for a worker. Its id is unique across
    /// every gateway of a fleet.
    ///
    /// # Errors
    /// As [`Self::submit`], before admission.
    pub fn prepare_submission(
        &self,
        request: SubmitRequest,
    ) -> Result<PreparedSubmission, SchedulerError> {
        Ok(self
            .prepare_with(request, ids::new_fleet_job_id)?
            .submission)
    }

    /// An animation workflow that recent runs show cannot keep its target FPS, degraded in
    /// steps (see [`crate::degrade`]) and checked again; `None` when it needs nothing.
    #[allow(clippy::type_complexity)]
    fn degraded_for_fps(
        &self,
        workload: Workload,
        workflow: &Json,
        estimate: &Estimate,
    ) -> Result<Option<(Json, ExecutionPlan, Estimate, String)>, SchedulerError> {
        if workload != Workload::Animation
            || !estimate.learned
            || !self.shared.tunables.read().admission.degrade_animation
        {
            return Ok(None);
        }
        let Some(shape) = crate::degrade::stream_shape(workflow, &self.shared.registry) else {
            return Ok(None);
        };
        let render_s = estimate.expected_duration.as_secs_f64();
        let needed = render_s / shape.playback_s().max(1e-6);
        let Some(degraded) = crate::degrade::degrade(workflow, needed, &self.shared.registry)
        else {
            return Ok(None);
        };
        let (plan, estimate) = self.check(&degraded.workflow, None)?;
        let note = format!(
            "recent runs render {} frames in {render_s:.2}s, {:.1} FPS against a {} FPS target; degraded x{:.1}: {}",
            shape.frames,
            shape.frames as f64 / render_s.max(1e-9),
            shape.target_fps,
            degraded.speedup,
            degraded.steps.join("; ")
        );
        Ok(Some((degraded.workflow, plan, estimate, note)))
    }

    fn send(&self, command: Command) -> Result<(), SchedulerError> {
        self.tx
            .send(command)
            .map_err(|_| SchedulerError::ShuttingDown)
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<oneshot::Receiver<T>, SchedulerError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        Ok(rx)
    }

    /// Submits a job: validates, estimates, admits or denies, journals, enqueues. Returns
    /// once the job is durable.
    ///
    /// # Errors
    /// Invalid or too large workflows, [`SchedulerError::Denied`] with a retry hint,
    /// [`SchedulerError::ShuttingDown`], or a journal failure.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, SchedulerError> {
        let nodes = request.workflow.as_object().map_or(0, |n| n.len());
        // Validating a large graph takes milliseconds: off the async runtime's threads.
        let prepared = if nodes > LARGE_GRAPH_NODES {
            let engine = self.clone();
            tokio::task::spawn_blocking(move || engine.prepare(request))
                .await
                .map_err(|_| SchedulerError::ShuttingDown)??
        } else {
            self.prepare(request)?
        };
        let rx = self.ask(|reply| Command::Submit(Box::new(prepared), reply))?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// [`Self::submit`] for threads outside tokio.
    ///
    /// # Errors
    /// As [`Self::submit`].
    pub fn submit_blocking(&self, request: SubmitRequest) -> Result<Submitted, SchedulerError> {
        let prepared = self.prepare(request)?;
        let rx = self.ask(|reply| Command::Submit(Box::new(prepared), reply))?;
        rx.blocking_recv()
            .map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// Requests cancellation: a queued job ends now, a running one at its next node or step.
    ///
    /// # Errors
    /// [`SchedulerError::JobNotFound`].
    pub async fn cancel(&self, job_id: &str) -> Result<JobInfo, SchedulerError> {
        let rx = self.ask(|reply| Command::Cancel(job_id.to_owned(), reply))?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// A job's current state.
    ///
    /// # Errors
    /// [`SchedulerError::JobNotFound`].
    pub async fn get(&self, job_id: &str) -> Result<JobInfo, SchedulerError> {
        let rx = self.ask(|reply| Command::Get(job_id.to_owned(), reply))?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// Takes a client's playback report for `job_id` (frames displayed, dropped), bounded
    /// by what the job's stream produced and not yet reported.
    ///
    /// # Errors
    /// [`SchedulerError::JobNotFound`].
    pub async fn claim_playback(
        &self,
        job_id: &str,
        displayed: u64,
        dropped: u64,
    ) -> Result<PlaybackClaim, SchedulerError> {
        let rx =
            self.ask(|reply| Command::Playback(job_id.to_owned(), (displayed, dropped), reply))?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// [`Self::get`] for threads outside tokio.
    ///
    /// # Errors
    /// [`SchedulerError::JobNotFound`].
    pub fn get_blocking(&self, job_id: &str) -> Result<JobInfo, SchedulerError> {
        let rx = self.ask(|reply| Command::Get(job_id.to_owned(), reply))?;
        rx.blocking_recv()
            .map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// A watcher over the job's feed: replay of what it holds, then live items.
    ///
    /// # Errors
    /// [`SchedulerError::JobNotFound`].
    pub async fn watch(&self, job_id: &str) -> Result<JobWatch, SchedulerError> {
        let rx = self.ask(|reply| Command::Watch(job_id.to_owned(), reply))?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// [`Self::watch`] for threads outside tokio.
    ///
    /// # Errors
    /// [`SchedulerError::JobNotFound`].
    pub fn watch_blocking(&self, job_id: &str) -> Result<JobWatch, SchedulerError> {
        let rx = self.ask(|reply| Command::Watch(job_id.to_owned(), reply))?;
        rx.blocking_recv()
            .map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// Jobs matching `filter`, newest first, `page_size` at a time (capped at 1000).
    ///
    /// # Errors
    /// [`SchedulerError::InvalidArgument`] for a page token this engine did not issue or a
    /// label filter over the caps, [`SchedulerError::ShuttingDown`].
    pub async fn list(
        &self,
        filter: ListFilter,
        page_size: usize,
        page_token: Option<String>,
    ) -> Result<JobPage, SchedulerError> {
        crate::bounds::check_labels("labels", filter.labels.iter())?;
        let before = page_token
            .as_deref()
            .map(crate::bounds::parse_page_token)
            .transpose()?;
        let rx = self.ask(|reply| Command::List(filter, page_size, before, reply))?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)
    }

    /// Queued and running work weighted by estimated cost (the KEDA metric).
    ///
    /// # Errors
    /// [`SchedulerError::ShuttingDown`] when the queue worker is gone (callers must not
    /// report zero demand then).
    pub async fn demand(&self) -> Result<Demand, SchedulerError> {
        let rx = self.ask(Command::Demand)?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)
    }

    /// [`Self::demand`] for threads outside tokio.
    ///
    /// # Errors
    /// As [`Self::demand`].
    pub fn demand_blocking(&self) -> Result<Demand, SchedulerError> {
        let rx = self.ask(Command::Demand)?;
        rx.blocking_recv().map_err(|_| SchedulerError::ShuttingDown)
    }

    /// Applies new tunables (queue caps, priorities, limits, feature flags) to jobs
    /// submitted and started from now on; queued and running work is kept. Bumps the
    /// configuration generation and emits `config_changed` when anything changed.
    pub fn reload(&self, tunables: EngineTunables, version: &str) -> Reloaded {
        self.reload_config(tunables, None, version)
    }

    /// [`Self::reload`], and when `signals` is given, new SLO targets, thresholds and
    /// quality checks too: they judge everything recorded from now on, while the rolling
    /// windows keep their history. One generation bump covers both.
    pub fn reload_config(
        &self,
        tunables: EngineTunables,
        signals: Option<SignalsConfig>,
        version: &str,
    ) -> Reloaded {
        let signals_changed = signals.is_some_and(|c| self.shared.signals.set_config(c));
        let hash = ids::config_hash(&tunables, &self.shared.signals.config());
        let mut current = self.shared.tunables.write();
        let tunables_changed = *current != tunables;
        if tunables_changed {
            *current = tunables;
        }
        drop(current);
        if tunables_changed || signals_changed {
            self.shared.signals.config_changed(version, &hash);
        }
        Reloaded {
            generation: self.config_generation(),
            config_hash: hash,
        }
    }

    /// Stops admitting and waits until no job is running; queued jobs stay journaled and
    /// run after the next start.
    pub async fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        if let Ok(rx) = self.ask(Command::Drain) {
            let _ = rx.await;
        }
    }

    /// [`Self::drain`] for threads outside tokio.
    pub fn drain_blocking(&self) {
        self.shared.draining.store(true, Ordering::Release);
        if let Ok(rx) = self.ask(Command::Drain) {
            let _ = rx.blocking_recv();
        }
    }

    /// Gives up on running work when a drain ran out of time: every running job is
    /// journaled back as queued with its attempt not counted, so it runs again after the
    /// next start, and is cancelled; the queue worker stops. Returns the interrupted job
    /// ids once the journal has committed them. The device worker is not waited for (a
    /// node may still be busy): the process is expected to exit next.
    pub async fn interrupt(&self) -> Vec<String> {
        self.shared.draining.store(true, Ordering::Release);
        match self.ask(Command::Interrupt) {
            Ok(rx) => rx.await.unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Drains, then stops the workers and commits the journal; queued jobs stay journaled.
    /// Other handle clones get [`SchedulerError::ShuttingDown`] afterwards.
    pub fn shutdown_blocking(&self) {
        self.drain_blocking();
        let _ = self.send(Command::Shutdown);
        let threads: Vec<JoinHandle<()>> = self.shared.threads.lock().drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }

    /// Submits, follows the job to its end calling `on_item` for everything it produces,
    /// and returns its final state: what `sakuga run` does in-process.
    ///
    /// # Errors
    /// As [`Self::submit`].
    pub fn run_to_completion(
        &self,
        request: SubmitRequest,
        mut on_item: impl FnMut(&WatchItem),
    ) -> Result<JobInfo, SchedulerError> {
        let submitted = self.submit_blocking(request)?;
        let mut watch = self.watch_blocking(&submitted.job_id)?;
        while let Some(item) = watch.next_blocking() {
            on_item(&item);
        }
        self.get_blocking(&submitted.job_id)
    }
}
