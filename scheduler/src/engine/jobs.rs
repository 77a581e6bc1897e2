//! The queue worker: the one thread that owns every job's state. It answers commands,
//! admits or denies submissions, journals every state change, hands the best-ranked job
//! to the device worker when it is idle, expires deadlines, and recovers unfinished jobs
//! from the journal at start-up. Every admission decision is counted and put on the
//! job's feed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::Value as Json;
use tokio::sync::oneshot;

use sakuga_nodes::{CancelToken, Value};
use sakuga_telemetry::{
    AdmissionReason, Decision, ErrorKind, EventFields, JobReport as SignalsJobReport, Outcome,
    RetryReason, Stage, TraceContext, Workload, events,
};

use crate::admission::{
    DeviceView, Estimate, QueueView, StartVerdict, SubmitVerdict, decide_start, decide_submit,
};
use crate::engine::feed::{JobEvent, JobFeed, JobWatch};
use crate::engine::pacer::{PacedObserver, PacerHandle};
use crate::engine::worker::{DeviceJob, FeedObserver, Finished};
use crate::engine::{
    Command, Demand, EngineConfig, EngineHandle, FeatureFlags, JobInfo, JobOutput, JobPage,
    ListFilter, RunLimits, Shared, Submitted,
};
use crate::error::SchedulerError;
use crate::executor::{ExecutionObserver, JobRun};
use crate::journal::{JobRecord, Journal, RecordState, unix_ms};
use crate::observe::{TelemetryObserver, event_fields};
use crate::plan::ExecutionPlan;
use crate::queue::JobQueue;

/// A submission after the caller-side work (parse, caps, validation, estimate).
pub(crate) struct PreparedJob {
    pub job_id: String,
    pub workflow: Json,
    pub plan: ExecutionPlan,
    pub estimate: Estimate,
    pub workload: Workload,
    pub priority: i32,
    pub deadline: Option<SystemTime>,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub trace: TraceContext,
    /// The job span, open from acceptance to the final state.
    pub span: tracing::Span,
    pub submitted_at: SystemTime,
    /// Why and how the workflow was degraded to keep its target FPS.
    pub degraded: Option<String>,
}

/// A fresh job id: 16 hex digits that sort by submission time, unique per process and
/// across restarts: the Unix time in milliseconds shifted left by 20 bits, bumped past the
/// last id handed out. Ordered ids keep the journal's B-tree appending at its right edge,
/// so a group commit dirties a few pages instead of one per job (random ids did).
pub(crate) fn new_job_id() -> String {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = unix_ms(SystemTime::now()) << 20;
    let previous = LAST
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |last| Some(now.max(last + 1)),
        )
        .unwrap_or_default();
    format!("{:016x}", now.max(previous + 1))
}

/// Hash of the tunables and signals config in force, for `sakuga_config_generation{config_hash}`.
pub fn config_hash(
    tunables: &crate::engine::EngineTunables,
    signals: &sakuga_telemetry::SignalsConfig,
) -> String {
    let text = serde_json::to_string(&(tunables, signals)).unwrap_or_default();
    // FNV-1a: stable across processes, unlike the std hasher's random seed.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Rewrites a workflow so nodes switched off by `features` for `workload` pass their
/// image input through: every link to the bypassed node's output 0 is redirected to the
/// node's own `image`/`images` input, and the node is removed.
pub(crate) fn apply_features(workflow: Json, features: FeatureFlags, workload: Workload) -> Json {
    let mut bypass: Vec<&str> = Vec::new();
    if features.upscaler_off.get(workload) {
        bypass.push("ImageUpscaleWithModel");
    }
    if features.interpolator_off.get(workload) {
        bypass.push("FrameInterpolate");
    }
    if bypass.is_empty() {
        return workflow;
    }
    let Json::Object(mut nodes) = workflow else {
        return workflow;
    };
    let mut redirects: HashMap<String, Json> = HashMap::new();
    nodes.retain(|id, node| {
        let class = node
            .get("class_type")
            .and_then(Json::as_str)
            .unwrap_or_default();
        if !bypass.contains(&class) {
            return true;
        }
        let source = node
            .get("inputs")
            .and_then(|i| i.get("image").or_else(|| i.get("images")))
            .cloned();
        match source {
            Some(link @ Json::Array(_)) => {
                redirects.insert(id.clone(), link);
                false
            }
            _ => true,
        }
    });
    // Follow chains of bypassed nodes to the first kept source.
    let resolve = |link: &Json| {
        let mut link = link.clone();
        for _ in 0..redirects.len() {
            let target = link
                .get(0)
                .and_then(Json::as_str)
                .and_then(|id| redirects.get(id));
            match target {
                Some(next) => link = next.clone(),
                None => break,
            }
        }
        link
    };
    for node in nodes.values_mut() {
        if let Some(Json::Object(inputs)) = node.get_mut("inputs") {
            for value in inputs.values_mut() {
                if value
                    .get(0)
                    .and_then(Json::as_str)
                    .is_some_and(|id| redirects.contains_key(id))
                {
                    *value = resolve(value);
                }
            }
        }
    }
    Json::Object(nodes)
}

struct Job {
    info: JobInfo,
    seq: u64,
    plan: Option<ExecutionPlan>,
    estimate: Estimate,
    fields: EventFields,
    /// Open until the job's final state (dropping the last clone ends and exports it).
    span: tracing::Span,
    feed: Arc<JobFeed>,
    cancel: CancelToken,
    enqueued_at: Instant,
    deferrals_reported: Vec<AdmissionReason>,
    /// It streams paced frames (a `StreamFrames` node with `pace` on).
    paced: bool,
    /// When it started running, for its run-time limit.
    started: Option<Instant>,
    /// Why it was stopped for time (its deadline or its run-time limit), once it was.
    timeout: Option<String>,
}

impl Job {
    fn record(&self) -> JobRecord {
        let info = &self.info;
        JobRecord {
            job_id: info.job_id.clone(),
            workflow: None,
            workload: info.workload.as_str().to_owned(),
            priority: info.priority,
            deadline_unix_ms: info.deadline.map(unix_ms),
            idempotency_key: info.idempotency_key.clone(),
            labels: info.labels.clone(),
            trace_id: info.trace_id.clone(),
            submitted_unix_ms: unix_ms(info.submitted_at),
            state: info.state,
            attempts: info.attempts,
            finished_unix_ms: info.finished_at.map(unix_ms),
            error: info.error.clone(),
            outputs: info.outputs.iter().map(|o| o.path.clone()).collect(),
        }
    }
}

pub(crate) struct QueueState {
    config: EngineConfig,
    shared: Arc<Shared>,
    journal: Option<Journal>,
    device: Sender<DeviceJob>,
    pacer: PacerHandle,
    jobs: HashMap<String, Job>,
    /// Listing order: submission sequence to job id.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    queue: JobQueue,
    running: Option<String>,
    /// Jobs off the device whose frames the pacer still plays out.
    delivering: HashSet<String>,
    by_key: HashMap<String, String>,
    finished: VecDeque<String>,
    started: Instant,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// Scratch for [`Self::expire_deadlines`], kept to avoid an allocation per tick.
    timeouts: Vec<(String, String)>,
    self_tx: Option<Sender<Command>>,
    /// Recent completions per workload, for `RetryInfo`.
    throughput: super::throughput::Throughput,
}

fn streams_paced(step: &crate::plan::PlanStep) -> bool {
    step.class_type == "StreamFrames"
        && !step
            .literals
            .iter()
            .any(|(n, v)| &**n == "pace" && matches!(v, Value::Boolean(false)))
}

/// Why a running job must stop now: its deadline passed, or it ran past its workload's
/// run-time limit.
fn time_up(job: &Job, now: SystemTime, limits: &RunLimits) -> Option<String> {
    if job.info.deadline.is_some_and(|d| d <= now) {
        return Some("the deadline passed while it ran".to_owned());
    }
    let limit = limits.run_time_s.get(job.info.workload);
    let ran = job.started?.elapsed().as_secs_f64();
    (limit > 0.0 && ran >= limit).then(|| {
        format!(
            "it ran {ran:.1}s, past the {} run-time limit of {limit}s",
            job.info.workload
        )
    })
}

fn outcome_of(state: RecordState) -> Outcome {
    match state {
        RecordState::Succeeded => Outcome::Success,
        RecordState::Cancelled => Outcome::Cancelled,
        RecordState::TimedOut => Outcome::Timeout,
        _ => Outcome::Failed,
    }
}

impl QueueState {
    pub fn new(
        config: EngineConfig,
        shared: Arc<Shared>,
        journal: Option<Journal>,
        device: Sender<DeviceJob>,
        pacer: PacerHandle,
    ) -> Self {
        // Retained finished jobs plus a queue's worth, so the map rarely grows under load.
        let jobs = HashMap::with_capacity(config.finished_kept + 1024);
        Self {
            config,
            shared,
            journal,
            device,
            pacer,
            jobs,
            order: BTreeMap::new(),
            next_seq: 0,
            queue: JobQueue::new(),
            running: None,
            delivering: HashSet::new(),
            by_key: HashMap::new(),
            finished: VecDeque::new(),
            started: Instant::now(),
            drain_waiters: Vec::new(),
            timeouts: Vec::new(),
            self_tx: None,
            throughput: Default::default(),
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn journal(&self, job: &Job, ack: Option<crate::journal::JournalAck>) {
        self.journal_record(job.record(), ack);
    }

    fn journal_record(&self, record: JobRecord, ack: Option<crate::journal::JournalAck>) {
        match &self.journal {
            Some(journal) => journal.put(record, ack),
            None => {
                if let Some(ack) = ack {
                    ack(Ok(()));
                }
            }
        }
    }

    fn queue_depth(&self, workload: Workload) {
        self.shared
            .signals
            .queue_depth(workload, self.queue.len_of(workload));
    }

    fn new_job(&mut self, p: PreparedJob, recovered: bool, attempts: u32) -> Job {
        let fields = event_fields(&p.job_id, p.workload, &p.trace, &p.plan)
            .with_hardware_class(self.shared.hardware_class.as_str());
        sakuga_telemetry::record_job_attributes(&p.span, &fields);
        let paced = p.plan.steps.iter().any(streams_paced);
        let seq = self.next_seq;
        self.next_seq += 1;
        let trace_id = p.trace.trace_id.clone();
        Job {
            info: JobInfo {
                job_id: p.job_id,
                workload: p.workload,
                state: RecordState::Queued,
                priority: p.priority,
                labels: p.labels,
                trace_id: p.trace.trace_id,
                idempotency_key: p.idempotency_key,
                submitted_at: p.submitted_at,
                started_at: None,
                finished_at: None,
                deadline: p.deadline,
                queue_position: None,
                estimate: Some(p.estimate.clone()),
                error: None,
                outputs: Vec::new(),
                attempts,
                recovered,
            },
            seq,
            plan: Some(p.plan),
            estimate: p.estimate,
            fields,
            span: p.span,
            feed: Arc::new(JobFeed::for_job(self.config.feed, trace_id)),
            cancel: CancelToken::new(),
            enqueued_at: Instant::now(),
            deferrals_reported: Vec::new(),
            paced,
            started: None,
            timeout: None,
        }
    }

    fn enqueue(&mut self, job: Job) {
        let cost = job.estimate.expected_duration.as_secs_f64();
        let now = self.now();
        self.queue.push(
            job.info.job_id.clone(),
            job.info.workload,
            cost,
            job.info.priority,
            now,
        );
        if let Some(key) = &job.info.idempotency_key {
            self.by_key.insert(key.clone(), job.info.job_id.clone());
        }
        self.order.insert(job.seq, job.info.job_id.clone());
        let workload = job.info.workload;
        self.jobs.insert(job.info.job_id.clone(), job);
        self.queue_depth(workload);
    }

    fn info(&self, job: &Job) -> JobInfo {
        let mut info = job.info.clone();
        if info.state == RecordState::Queued {
            let tunables = self.shared.tunables.read();
            info.queue_position =
                self.queue
                    .position(&info.job_id, self.now(), &tunables.admission);
        }
        info
    }

    fn work_ahead_s(&self, workload: Workload, cost_s: f64, priority: i32) -> f64 {
        let tunables = self.shared.tunables.read();
        let running = self
            .running
            .as_ref()
            .and_then(|id| self.jobs.get(id))
            .map_or(0.0, |j| j.estimate.expected_duration.as_secs_f64());
        self.queue
            .work_ahead_s(workload, cost_s, priority, self.now(), &tunables.admission)
            + running
    }

    fn submit(
        &mut self,
        mut p: PreparedJob,
        reply: oneshot::Sender<Result<Submitted, SchedulerError>>,
    ) {
        if self
            .shared
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
        {
            let _ = reply.send(Err(SchedulerError::ShuttingDown));
            return;
        }
        if let Some(existing) = p.idempotency_key.as_ref().and_then(|k| self.by_key.get(k))
            && let Some(job) = self.jobs.get(existing)
        {
            let info = self.info(job);
            let _ = reply.send(Ok(Submitted {
                job_id: info.job_id,
                queue_position: info.queue_position.unwrap_or(0),
                estimate: job.estimate.clone(),
                workload: info.workload,
                trace_id: info.trace_id,
                deduplicated: true,
            }));
            return;
        }
        let signals = self.shared.signals.clone();
        let workload = p.workload;
        let cost = p.estimate.expected_duration.as_secs_f64();
        let now = self.now();
        let view = QueueView {
            queued_same_workload: self.queue.len_of(workload),
            work_ahead_s: self.work_ahead_s(workload, cost, p.priority),
            drain_per_s: self.throughput.per_second(workload, now),
        };
        let deadline_in = p.deadline.map(|d| {
            d.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        let verdict = {
            let tunables = self.shared.tunables.read();
            // On the CPU the configured `memory_budget_bytes` stands in for device memory.
            match signals.gpu_memory_total() {
                // On a GPU the budget is the device's real memory, as its sampler reads it.
                Some(total) => {
                    let admission = crate::admission::AdmissionConfig {
                        memory_budget_bytes: total,
                        ..tunables.admission.clone()
                    };
                    decide_submit(workload, &p.estimate, deadline_in, view, &admission)
                }
                None => decide_submit(
                    workload,
                    &p.estimate,
                    deadline_in,
                    view,
                    &tunables.admission,
                ),
            }
        };
        let fields = event_fields(&p.job_id, workload, &p.trace, &p.plan);
        if let SubmitVerdict::Deny {
            reason,
            detail,
            retry_after,
        } = verdict
        {
            signals.admission(workload, Decision::Deny, reason);
            events::admission_decision(&fields, Decision::Deny, reason);
            let _ = reply.send(Err(SchedulerError::Denied {
                workload,
                reason,
                detail,
                retry_after,
            }));
            return;
        }
        signals.job_submitted(workload);
        signals.admission(workload, Decision::Admit, AdmissionReason::Capacity);
        events::prompt_received(&fields);
        events::admission_decision(&fields, Decision::Admit, AdmissionReason::Capacity);
        // Journaled once, with the record that accepts the job; nothing else needs it.
        let workflow = std::mem::take(&mut p.workflow);
        let degraded = p.degraded.take();
        let job = self.new_job(p, false, 0);
        job.feed.push(JobEvent::Stage {
            name: events::PROMPT_RECEIVED,
            detail: format!(
                "{} nodes, workload {workload}",
                job.plan.as_ref().map_or(0, ExecutionPlan::len)
            ),
        });
        job.feed.push(JobEvent::Admission {
            decision: Decision::Admit,
            reason: AdmissionReason::Capacity,
            detail: format!(
                "expected {:.3}s, peak {} MiB",
                job.estimate.expected_duration.as_secs_f64(),
                job.estimate.peak_memory_bytes >> 20
            ),
        });
        if let Some(note) = degraded {
            signals.admission(workload, Decision::Admit, AdmissionReason::DegradedForFps);
            events::admission_decision(
                &job.fields,
                Decision::Admit,
                AdmissionReason::DegradedForFps,
            );
            job.feed.push(JobEvent::Admission {
                decision: Decision::Admit,
                reason: AdmissionReason::DegradedForFps,
                detail: note,
            });
        }
        let job_id = job.info.job_id.clone();
        self.enqueue(job);
        let job = &self.jobs[&job_id];
        let info = self.info(job);
        let submitted = Submitted {
            job_id: job_id.clone(),
            queue_position: info.queue_position.unwrap_or(0),
            estimate: job.estimate.clone(),
            workload,
            trace_id: info.trace_id,
            deduplicated: false,
        };
        let undo = self.self_tx.clone();
        let mut record = job.record();
        record.workflow = Some(workflow);
        self.journal_record(
            record,
            Some(Box::new(
                move |result: Result<(), SchedulerError>| match result {
                    Ok(()) => {
                        let _ = reply.send(Ok(submitted));
                    }
                    Err(e) => {
                        // Not durable, so not accepted: take it back out of the queue.
                        if let Some(tx) = undo {
                            let (dummy, _) = oneshot::channel();
                            let _ = tx.try_send(Command::Cancel(job_id, dummy));
                        }
                        let _ = reply.send(Err(e));
                    }
                },
            )),
        );
    }

    /// Ends a job that is not running: cancelled while queued, deadline passed, or
    /// rejected on recovery.
    fn finish_unstarted(&mut self, job_id: &str, state: RecordState, error: Option<String>) {
        self.queue.remove(job_id);
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.info.state = state;
        // The job span ends (and is exported) with the job.
        job.span = tracing::Span::none();
        job.info.finished_at = Some(SystemTime::now());
        job.info.error = error.clone();
        job.plan = None;
        let workload = job.info.workload;
        let latency = job.info.submitted_at.elapsed().unwrap_or_default();
        let signals = &self.shared.signals;
        signals.job_finished(
            &SignalsJobReport::new(workload, outcome_of(state), latency).with_images(0),
        );
        match state {
            RecordState::Cancelled => events::job_cancelled(&job.fields),
            RecordState::TimedOut => {
                signals.error(ErrorKind::Timeout, Stage::Queue);
                events::job_failed(
                    &job.fields,
                    ErrorKind::Timeout,
                    &error.clone().unwrap_or_default(),
                );
            }
            _ => {
                signals.error(ErrorKind::Internal, Stage::Queue);
                events::job_failed(
                    &job.fields,
                    ErrorKind::Internal,
                    &error.clone().unwrap_or_default(),
                );
            }
        }
        if state == RecordState::Cancelled {
            job.feed.push(JobEvent::Stage {
                name: events::JOB_CANCELLED,
                detail: "cancelled while queued".into(),
            });
        } else {
            job.feed.push(JobEvent::Stage {
                name: events::JOB_FAILED,
                detail: error.clone().unwrap_or_default(),
            });
        }
        job.feed.push(JobEvent::Finished { state, error });
        let job = &self.jobs[job_id];
        self.journal(job, None);
        self.queue_depth(workload);
        self.retire(job_id.to_owned());
    }

    /// Remembers a finished job, evicting the oldest past the retention counts.
    fn retire(&mut self, job_id: String) {
        self.finished.push_back(job_id);
        let frames_kept = self.config.finished_frames_kept;
        if self.finished.len() > frames_kept
            && let Some(job) = self
                .finished
                .get(self.finished.len() - 1 - frames_kept)
                .and_then(|id| self.jobs.get(id))
        {
            job.feed.release_frames();
        }
        while self.finished.len() > self.config.finished_kept {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            if let Some(job) = self.jobs.remove(&old) {
                self.order.remove(&job.seq);
                if let Some(key) = &job.info.idempotency_key {
                    self.by_key.remove(key);
                }
            }
        }
    }

    fn cancel(&mut self, job_id: &str) -> Result<JobInfo, SchedulerError> {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return Err(SchedulerError::JobNotFound {
                job_id: job_id.to_owned(),
            });
        };
        match job.info.state {
            RecordState::Queued => self.finish_unstarted(
                job_id,
                RecordState::Cancelled,
                Some("cancelled by the client".into()),
            ),
            RecordState::Running => job.cancel.cancel(),
            _ => {}
        }
        Ok(self.info(&self.jobs[job_id]))
    }

    fn dispatch(&mut self) {
        if self.running.is_some()
            || self.queue.is_empty()
            || self
                .shared
                .draining
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let signals = self.shared.signals.clone();
        let degraded = signals.is_fps_degraded(Workload::Animation);
        // One paced stream plays out per device at a time: previews keep their order and
        // only one stream's frames wait in the pacer. Other work starts meanwhile.
        let stream_playing = !self.delivering.is_empty();
        let picked = {
            let tunables = self.shared.tunables.read();
            let jobs = &self.jobs;
            self.queue
                .pick(self.started.elapsed(), &tunables.admission, |entry| {
                    let job = jobs.get(&entry.job_id);
                    if stream_playing && job.is_some_and(|j| j.paced) {
                        return StartVerdict::Defer(AdmissionReason::Capacity);
                    }
                    let peak = job.map_or(0, |j| j.estimate.peak_memory_bytes);
                    decide_start(
                        entry.workload,
                        DeviceView {
                            fits_in_headroom: signals.fits_in_headroom(peak),
                            animation_fps_degraded: degraded,
                        },
                    )
                })
        };
        for (job_id, reason) in picked.deferred {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            if job.deferrals_reported.contains(&reason) {
                continue;
            }
            job.deferrals_reported.push(reason);
            signals.admission(job.info.workload, Decision::Defer, reason);
            events::admission_decision(&job.fields, Decision::Defer, reason);
            job.feed.push(JobEvent::Admission {
                decision: Decision::Defer,
                reason,
                detail: match reason {
                    AdmissionReason::MemoryHeadroom => "waiting for device memory headroom".into(),
                    AdmissionReason::FpsDegraded => {
                        "waiting while animation FPS is degraded".into()
                    }
                    AdmissionReason::Capacity => {
                        "waiting for the paced stream playing out to end".into()
                    }
                    other => format!("waiting ({other})"),
                },
            });
        }
        let Some(entry) = picked.started else { return };
        self.start(&entry.job_id);
    }

    fn start(&mut self, job_id: &str) {
        let signals = self.shared.signals.clone();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let Some(plan) = job.plan.take() else { return };
        // Nodes check each large allocation against this (`ExecContext::reserve`), so a job
        // past its budget fails with `oom` instead of aborting the process.
        let budget = signals
            .gpu_memory_total()
            .unwrap_or_else(|| self.shared.tunables.read().admission.memory_budget_bytes);
        self.shared.env.set_memory_budget(budget);
        job.info.state = RecordState::Running;
        job.info.started_at = Some(SystemTime::now());
        job.started = Some(Instant::now());
        job.info.attempts += 1;
        let workload = job.info.workload;
        signals.job_started(
            workload,
            job.fields.model_id.as_deref(),
            job.enqueued_at.elapsed(),
        );
        signals.stage_finished(workload, Stage::Queue, job.enqueued_at.elapsed());
        let target_fps = plan
            .steps
            .iter()
            .find(|s| s.class_type == "StreamFrames")
            .and_then(|s| s.literals.iter().find(|(n, _)| &**n == "fps"))
            .and_then(|(_, v)| match v {
                Value::Float(f) => Some(*f),
                Value::Int(i) => Some(*i as f64),
                _ => None,
            })
            .unwrap_or(24.0);
        let feed_observer = Arc::new(FeedObserver::new(job.feed.clone()));
        let telemetry = TelemetryObserver::new(
            signals.clone(),
            job.fields.clone(),
            feed_observer.clone(),
            target_fps,
        );
        job.feed.set_stream(telemetry.stream().clone());
        let telemetry: Arc<dyn ExecutionObserver> = Arc::new(telemetry);
        let lane = self
            .pacer
            .lane(Arc::from(job_id), telemetry, job.cancel.clone());
        let run = JobRun {
            job_id: Arc::from(job_id),
            observer: Arc::new(PacedObserver::new(self.pacer.clone(), lane.clone())),
            cancel: job.cancel.clone(),
            batch_limit: None,
            span: job.span.clone(),
        };
        let device_job = DeviceJob {
            job_id: job_id.to_owned(),
            batch: job.estimate.batch as usize,
            plan,
            run,
            span: job.span.clone(),
            observer: feed_observer,
            lane,
        };
        let job = &self.jobs[job_id];
        // The attempt is durable before the job runs: if the job takes the process down,
        // recovery finds it `Running` with this attempt counted and fails it as poison
        // instead of running it into the same crash again.
        let device = self.device.clone();
        let id = job_id.to_owned();
        self.journal(
            job,
            Some(Box::new(move |written| {
                if let Err(e) = written {
                    tracing::error!(job_id = %id, error = %e, "journaling the start failed; running it anyway");
                }
                if device.send(device_job).is_err() {
                    tracing::error!(job_id = %id, "the device worker is gone");
                }
            })),
        );
        self.queue_depth(workload);
        self.running = Some(job_id.to_owned());
    }

    /// Journals every running or delivering job back as queued, its attempt not counted
    /// (the server chose to stop it; the job did nothing wrong), and cancels it.
    fn interrupt(&mut self) -> Vec<String> {
        let ids: Vec<String> = self
            .running
            .iter()
            .chain(self.delivering.iter())
            .cloned()
            .collect();
        for id in &ids {
            let Some(job) = self.jobs.get_mut(id) else {
                continue;
            };
            job.cancel.cancel();
            job.info.state = RecordState::Queued;
            job.info.attempts = job.info.attempts.saturating_sub(1);
            tracing::warn!(job_id = %id, "interrupted by shutdown; it runs again after the next start");
            self.journal(&self.jobs[id], None);
        }
        if let Some(journal) = &self.journal {
            journal.flush();
        }
        ids
    }

    fn device_free(&mut self, job_id: String) {
        if self.running.as_deref() == Some(job_id.as_str()) {
            self.running = None;
        }
        self.delivering.insert(job_id);
    }

    /// Nothing runs on the device or plays out in the pacer.
    fn idle(&self) -> bool {
        self.running.is_none() && self.delivering.is_empty()
    }

    fn finished(&mut self, done: Finished) {
        if self.running.as_deref() == Some(done.job_id.as_str()) {
            self.running = None;
        }
        self.delivering.remove(&done.job_id);
        let signals = self.shared.signals.clone();
        let Some(job) = self.jobs.get_mut(&done.job_id) else {
            return;
        };
        let (state, error) = match &done.result {
            Ok(_) => (RecordState::Succeeded, None),
            Err(SchedulerError::Cancelled { .. }) if job.timeout.is_some() => {
                (RecordState::TimedOut, job.timeout.clone())
            }
            Err(e @ SchedulerError::Cancelled { .. }) => {
                (RecordState::Cancelled, Some(e.to_string()))
            }
            Err(e) => (RecordState::Failed, Some(e.to_string())),
        };
        job.info.state = state;
        // The job span ends (and is exported) with the job.
        job.span = tracing::Span::none();
        job.info.finished_at = Some(SystemTime::now());
        job.info.error = error.clone();
        job.info.outputs = done.outputs;
        let workload = job.info.workload;
        self.throughput.record(workload, self.started.elapsed());
        let latency = job.info.submitted_at.elapsed().unwrap_or_default();
        let mut outcome = outcome_of(state);
        if let Err(e) = &done.result
            && e.kind() == "oom"
        {
            outcome = Outcome::Oom;
        }
        let images = if state == RecordState::Succeeded {
            (job.info.outputs.len() as u64 + done.frames).max(1)
        } else {
            0
        };
        if let Some(limit) = done.oom_split {
            // The first run's OOM is an error of its own whatever the retry does.
            signals.error(ErrorKind::Oom, Stage::Inference);
            signals.retry(RetryReason::OomSplit);
            signals.admission(workload, Decision::Admit, AdmissionReason::OomSplit);
            events::admission_decision(&job.fields, Decision::Admit, AdmissionReason::OomSplit);
            tracing::warn!(job_id = %done.job_id, batch_limit = limit, "out of device memory; retried once with the batch split");
        }
        let report = SignalsJobReport::new(workload, outcome, latency)
            .with_resolution(job.estimate.width.max(1), job.estimate.height.max(1))
            .with_images(images);
        let report = match job.fields.model_id.as_deref() {
            Some(model) => report.with_model(model),
            None => report,
        };
        let report = report.with_detail(crate::history::detail(
            &job.info,
            &job.fields,
            job.feed.stream(),
            &done.result,
        ));
        signals.job_finished(&report);
        match (&done.result, state) {
            (Ok(_), _) => {
                self.shared
                    .estimator
                    .learn(job.estimate.signature, done.elapsed);
                events::deliver_complete(&job.fields, latency);
                job.feed.push(JobEvent::Stage {
                    name: events::DELIVER_COMPLETE,
                    detail: format!(
                        "{} outputs, {} frames in {:.3}s",
                        job.info.outputs.len(),
                        done.frames,
                        done.elapsed.as_secs_f64()
                    ),
                });
            }
            (Err(_), RecordState::Cancelled) => {
                events::job_cancelled(&job.fields);
                job.feed.push(JobEvent::Stage {
                    name: events::JOB_CANCELLED,
                    detail: error.clone().unwrap_or_default(),
                });
            }
            (Err(e), _) => {
                let kind = if state == RecordState::TimedOut {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::from_label(e.kind())
                };
                signals.error(kind, Stage::Inference);
                events::job_failed(&job.fields, kind, e);
                job.feed.push(JobEvent::Stage {
                    name: events::JOB_FAILED,
                    detail: error.clone().unwrap_or_default(),
                });
            }
        }
        job.feed.push(JobEvent::Finished { state, error });
        job.feed.end_stream();
        let job = &self.jobs[&done.job_id];
        self.journal(job, None);
        self.retire(done.job_id);
        if self.idle() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    fn expire_deadlines(&mut self) {
        let now = SystemTime::now();
        let expired: Vec<String> = self
            .queue
            .entries()
            .iter()
            .filter(|e| {
                self.jobs
                    .get(&e.job_id)
                    .and_then(|j| j.info.deadline)
                    .is_some_and(|d| d <= now)
            })
            .map(|e| e.job_id.clone())
            .collect();
        for job_id in expired {
            let reason = SchedulerError::DeadlineExceeded {
                job_id: job_id.clone(),
            }
            .to_string();
            self.shared.signals.admission(
                self.jobs[&job_id].info.workload,
                Decision::Deny,
                AdmissionReason::Deadline,
            );
            self.finish_unstarted(&job_id, RecordState::TimedOut, Some(reason));
        }
        let limits = self.shared.tunables.read().limits;
        let active = self.running.iter().chain(self.delivering.iter());
        for id in active {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            if job.timeout.is_some() {
                continue;
            }
            let Some(reason) = time_up(job, now, &limits) else {
                continue;
            };
            tracing::warn!(job_id = %id, %reason, "stopping the job");
            job.cancel.cancel();
            // Collected after the loop: the borrow of `running`/`delivering` ends first.
            self.timeouts.push((id.clone(), reason));
        }
        for (id, reason) in std::mem::take(&mut self.timeouts) {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.timeout = Some(reason);
            }
        }
    }

    fn list(&self, filter: &ListFilter, page_size: usize, before: Option<u64>) -> JobPage {
        let page_size = page_size.clamp(1, 1000);
        let before = before.unwrap_or(u64::MAX);
        let mut jobs = Vec::new();
        let mut resume_tokens = Vec::new();
        let mut last_seq = None;
        for (seq, id) in self.order.range(..before).rev() {
            let Some(job) = self.jobs.get(id) else {
                continue;
            };
            let i = &job.info;
            let matches = filter.workload.is_none_or(|w| w == i.workload)
                && filter.state.is_none_or(|s| s == i.state)
                && filter
                    .labels
                    .iter()
                    .all(|(k, v)| i.labels.get(k) == Some(v));
            if !matches {
                continue;
            }
            if jobs.len() == page_size {
                return JobPage {
                    jobs,
                    next_page_token: last_seq.map(|s: u64| s.to_string()),
                    resume_tokens,
                };
            }
            jobs.push(self.info(job));
            resume_tokens.push(seq.to_string());
            last_seq = Some(*seq);
        }
        JobPage {
            jobs,
            next_page_token: None,
            resume_tokens,
        }
    }

    fn demand(&self) -> Demand {
        let reference = self.shared.tunables.read().admission.reference_job_s;
        let mut demand = Demand {
            queued_jobs: self.queue.len(),
            running_jobs: usize::from(self.running.is_some()),
            ..Demand::default()
        };
        let running = self.running.iter();
        let queued = self.queue.entries().iter().map(|e| &e.job_id);
        for id in queued.chain(running) {
            if let Some(job) = self.jobs.get(id) {
                demand.weighted += job.estimate.demand_weight(reference);
                demand.work_s += job.estimate.expected_duration.as_secs_f64();
            }
        }
        for &w in Workload::ALL {
            demand.queued_by_workload[w.index()] = self.queue.len_of(w);
        }
        demand
    }

    /// Brings back jobs from the journal: final ones for lookups and dedupe, unfinished
    /// ones queued again (`job_recovered`) or failed with the reason.
    pub fn recover(&mut self, records: Vec<JobRecord>, handle: &EngineHandle) {
        self.self_tx = Some(handle.tx.clone());
        for record in records {
            let workload: Workload = record.workload.parse().unwrap_or(Workload::SingleImage);
            let trace = TraceContext::root_of(record.trace_id.clone());
            if record.state.is_final() {
                self.restore_final(record, workload, trace);
                continue;
            }
            let deadline = record
                .deadline_unix_ms
                .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
            let rejection = if deadline.is_some_and(|d| d <= SystemTime::now()) {
                Some((
                    RecordState::TimedOut,
                    "the deadline passed while the server was down".to_owned(),
                ))
            } else if record.state == RecordState::Running
                && record.attempts >= self.config.max_attempts
            {
                Some((
                    RecordState::Failed,
                    format!(
                        "{POISON}: the server went down while running it ({} of {} attempt(s)); not run again",
                        record.attempts, self.config.max_attempts
                    ),
                ))
            } else {
                None
            };
            let workflow = record.workflow.clone().unwrap_or(Json::Null);
            let checked = handle.check(&workflow, None);
            let (plan, estimate) = match checked {
                Ok(ok) => ok,
                Err(e) => {
                    let reason = format!("not runnable after the restart: {e}");
                    self.restore_rejected(record, workload, trace, RecordState::Failed, reason);
                    continue;
                }
            };
            let prepared = PreparedJob {
                job_id: record.job_id.clone(),
                workflow,
                plan,
                estimate,
                workload,
                priority: record.priority,
                deadline,
                idempotency_key: record.idempotency_key.clone(),
                labels: record.labels.clone(),
                span: sakuga_telemetry::open_job_span(&record.job_id, workload, &trace),
                trace,
                submitted_at: SystemTime::UNIX_EPOCH
                    + Duration::from_millis(record.submitted_unix_ms),
                degraded: None,
            };
            let job = self.new_job(prepared, true, record.attempts);
            let job_id = job.info.job_id.clone();
            self.enqueue(job);
            if let Some((state, reason)) = rejection {
                self.finish_unstarted(&job_id, state, Some(reason));
                continue;
            }
            let job = &self.jobs[&job_id];
            events::job_recovered(&job.fields);
            job.feed.push(JobEvent::Stage {
                name: events::JOB_RECOVERED,
                detail: format!(
                    "found unfinished after a restart (attempts so far: {})",
                    record.attempts
                ),
            });
            self.journal(job, None);
        }
        if let Some(journal) = &self.journal {
            journal.flush();
        }
    }

    fn restore_final(&mut self, record: JobRecord, workload: Workload, trace: TraceContext) {
        let fields = EventFields::new(record.job_id.clone(), workload, &trace);
        let feed = Arc::new(JobFeed::for_job(self.config.feed, record.trace_id.clone()));
        feed.push(JobEvent::Finished {
            state: record.state,
            error: record.error.clone(),
        });
        let seq = self.next_seq;
        self.next_seq += 1;
        let job = Job {
            info: JobInfo {
                job_id: record.job_id.clone(),
                workload,
                state: record.state,
                priority: record.priority,
                labels: record.labels,
                trace_id: record.trace_id,
                idempotency_key: record.idempotency_key.clone(),
                submitted_at: SystemTime::UNIX_EPOCH
                    + Duration::from_millis(record.submitted_unix_ms),
                started_at: None,
                finished_at: record
                    .finished_unix_ms
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
                deadline: record
                    .deadline_unix_ms
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
                queue_position: None,
                estimate: None,
                error: record.error,
                outputs: record
                    .outputs
                    .into_iter()
                    .map(|path| JobOutput {
                        node_id: String::new(),
                        path,
                        kind: "output".into(),
                    })
                    .collect(),
                attempts: record.attempts,
                recovered: false,
            },
            seq,
            plan: None,
            estimate: Estimate {
                peak_memory_bytes: 0,
                peak_node: None,
                expected_duration: Duration::ZERO,
                learned: false,
                width: 0,
                height: 0,
                batch: 0,
                signature: 0,
                nodes: Vec::new(),
            },
            fields,
            span: tracing::Span::none(),
            feed,
            cancel: CancelToken::new(),
            enqueued_at: Instant::now(),
            deferrals_reported: Vec::new(),
            started: None,
            paced: false,
            timeout: None,
        };
        if let Some(key) = &record.idempotency_key {
            self.by_key.insert(key.clone(), record.job_id.clone());
        }
        self.order.insert(seq, record.job_id.clone());
        self.jobs.insert(record.job_id.clone(), job);
        self.retire(record.job_id);
    }

    fn restore_rejected(
        &mut self,
        mut record: JobRecord,
        workload: Workload,
        trace: TraceContext,
        state: RecordState,
        reason: String,
    ) {
        let fields = EventFields::new(record.job_id.clone(), workload, &trace);
        self.shared
            .signals
            .error(ErrorKind::InvalidInput, Stage::Parse);
        events::job_failed(&fields, ErrorKind::InvalidInput, &reason);
        record.state = state;
        record.error = Some(reason);
        record.finished_unix_ms = Some(unix_ms(SystemTime::now()));
        record.workflow = None;
        if let Some(journal) = &self.journal {
            journal.put(record.clone(), None);
        }
        self.restore_final(record, workload, trace);
    }

    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Submit(p, reply) => self.submit(*p, reply),
            Command::Cancel(id, reply) => {
                let _ = reply.send(self.cancel(&id));
            }
            Command::Get(id, reply) => {
                let result = self
                    .jobs
                    .get(&id)
                    .map(|j| self.info(j))
                    .ok_or(SchedulerError::JobNotFound { job_id: id });
                let _ = reply.send(result);
            }
            Command::Watch(id, reply) => {
                let result: Result<JobWatch, SchedulerError> = self
                    .jobs
                    .get(&id)
                    .map(|j| j.feed.watch())
                    .ok_or(SchedulerError::JobNotFound { job_id: id });
                let _ = reply.send(result);
            }
            Command::Playback(id, (displayed, dropped), reply) => {
                let claim = match self.jobs.get(&id) {
                    Some(job) => {
                        let (displayed, dropped) = job.feed.claim_playback(displayed, dropped);
                        Ok(super::PlaybackClaim {
                            workload: job.info.workload,
                            displayed,
                            dropped,
                        })
                    }
                    None => Err(SchedulerError::JobNotFound { job_id: id }),
                };
                let _ = reply.send(claim);
            }
            Command::List(filter, size, token, reply) => {
                let _ = reply.send(self.list(&filter, size, token));
            }
            Command::Demand(reply) => {
                let _ = reply.send(self.demand());
            }
            Command::Drain(reply) => {
                if self.idle() {
                    let _ = reply.send(());
                } else {
                    self.drain_waiters.push(reply);
                }
            }
            Command::DeviceFree(job_id) => self.device_free(job_id),
            Command::Finished(done) => self.finished(*done),
            Command::Shutdown => return false,
            Command::Interrupt(reply) => {
                let _ = reply.send(self.interrupt());
                return false;
            }
        }
        true
    }
}

/// How a job that took the server down is reported: its error starts with this word.
const POISON: &str = "poison";
/// Tick while jobs wait on deadlines or deferrals; idle otherwise.
const BUSY_TICK: Duration = Duration::from_millis(50);
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Commands handled between two dispatch passes, so a burst of submissions is batched.
const COMMANDS_PER_PASS: usize = 256;

pub(crate) fn queue_worker(mut state: QueueState, commands: Receiver<Command>) {
    loop {
        let tick = if state.queue.is_empty() && state.idle() {
            IDLE_TICK
        } else {
            BUSY_TICK
        };
        match commands.recv_timeout(tick) {
            Ok(command) => {
                if !state.handle(command) {
                    break;
                }
                let mut alive = true;
                for _ in 0..COMMANDS_PER_PASS {
                    match commands.try_recv() {
                        Ok(command) => {
                            if !state.handle(command) {
                                alive = false;
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                if !alive {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        state.expire_deadlines();
        state.dispatch();
    }
    if let Some(journal) = &state.journal {
        journal.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_sixteen_hex_digits_that_sort_in_submission_order() {
        let ids: Vec<String> = (0..10_000).map(|_| new_job_id()).collect();
        assert!(
            ids.iter()
                .all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing, so unique"
        );
        let first_ms = u64::from_str_radix(&ids[0], 16).unwrap() >> 20;
        let now_ms = unix_ms(SystemTime::now());
        assert!(now_ms.abs_diff(first_ms) < 60_000, "carries the wall clock");
    }
}
