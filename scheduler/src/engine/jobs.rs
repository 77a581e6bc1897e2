//! The queue worker: the one thread that owns every job's state. It answers commands,
//! admits or denies submissions, hands the best-ranked job to the device worker when it
//! is idle, and expires deadlines and run-time limits. Each state change it decides on is
//! a [`Transition`] applied in `transition.rs`; recovery at start-up is `recovery.rs`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use sakuga_nodes::CancelToken;
use sakuga_telemetry::{
    AdmissionReason, Decision, ErrorKind, EventFields, Stage, Workload, events,
};

use crate::admission::{
    DeviceView, Estimate, QueueView, StartVerdict, SubmitVerdict, decide_start, decide_submit,
};
use crate::engine::feed::{JobFeed, JobWatch};
use crate::engine::pacer::{PacedObserver, PacerHandle};
use crate::engine::transition::Transition;
use crate::engine::worker::{DeviceJob, FeedObserver, Finished};
use crate::engine::{
    Command, Demand, EngineConfig, JobInfo, JobPage, ListFilter, PreparedSubmission, RunLimits,
    Shared, Submitted,
};
use crate::error::SchedulerError;
use crate::executor::{ExecutionObserver, JobRun};
use crate::journal::{JobRecord, Journal, JournalAck, RecordState, unix_ms};
use crate::observe::{TelemetryObserver, event_fields};
use crate::ordering::JobQueue;
use crate::plan::ExecutionPlan;

/// A submission after the caller-side work (parse, caps, validation, estimate).
pub(crate) struct PreparedJob {
    /// What a cluster gateway would publish: the checked, rewritten submission.
    pub submission: PreparedSubmission,
    pub plan: ExecutionPlan,
    /// The job span, open from acceptance to the final state.
    pub span: tracing::Span,
    /// Attempts made elsewhere before this one (cluster mode: earlier deliveries of the
    /// job to workers that were lost); more than 0 makes it a recovered job.
    pub earlier_attempts: u32,
}

pub(super) struct Job {
    pub(super) info: JobInfo,
    pub(super) seq: u64,
    pub(super) plan: Option<ExecutionPlan>,
    pub(super) estimate: Estimate,
    pub(super) fields: EventFields,
    /// Open until the job's final state (dropping the last clone ends and exports it).
    pub(super) span: tracing::Span,
    pub(super) feed: Arc<JobFeed>,
    pub(super) cancel: CancelToken,
    pub(super) enqueued_at: Instant,
    pub(super) deferrals_reported: Vec<AdmissionReason>,
    /// It streams paced frames (a `StreamFrames` node with `pace` on).
    pub(super) paced: bool,
    /// Its stream's target FPS (24 without a stream).
    pub(super) target_fps: f64,
    /// When it started running, for its run-time limit.
    pub(super) started: Option<Instant>,
    /// Why it was stopped for time (its deadline or its run-time limit), once it was.
    pub(super) timeout: Option<String>,
}

impl Job {
    pub(super) fn record(&self) -> JobRecord {
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
    pub(super) config: EngineConfig,
    pub(super) shared: Arc<Shared>,
    pub(super) journal: Option<Journal>,
    pub(super) device: Sender<DeviceJob>,
    pub(super) pacer: PacerHandle,
    pub(super) jobs: HashMap<String, Job>,
    /// Listing order: submission sequence to job id.
    pub(super) order: BTreeMap<u64, String>,
    pub(super) next_seq: u64,
    pub(super) queue: JobQueue,
    pub(super) running: Option<String>,
    /// Jobs off the device whose frames the pacer still plays out.
    pub(super) delivering: HashSet<String>,
    pub(super) by_key: HashMap<String, String>,
    pub(super) finished: VecDeque<String>,
    pub(super) started: Instant,
    pub(super) drain_waiters: Vec<oneshot::Sender<()>>,
    /// Scratch for [`Self::expire_deadlines`], kept to avoid an allocation per tick.
    pub(super) timeouts: Vec<(String, String)>,
    pub(super) self_tx: Option<Sender<Command>>,
    /// Recent completions per workload, for `RetryInfo`.
    pub(super) throughput: super::throughput::Throughput,
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

    pub(super) fn journal(&self, job: &Job, ack: Option<crate::journal::JournalAck>) {
        self.journal_record(job.record(), ack);
    }

    pub(super) fn journal_record(
        &self,
        record: JobRecord,
        ack: Option<crate::journal::JournalAck>,
    ) {
        match &self.journal {
            Some(journal) => journal.put(record, ack),
            None => {
                if let Some(ack) = ack {
                    ack(Ok(()));
                }
            }
        }
    }

    pub(super) fn queue_depth(&self, workload: Workload) {
        self.shared
            .signals
            .queue_depth(workload, self.queue.len_of(workload));
        self.publish_active();
    }

    /// See [`super::Shared::active`].
    pub(super) fn publish_active(&self) {
        let active = self.queue.len() + usize::from(self.running.is_some());
        self.shared.active.store(active, Ordering::Release);
    }

    pub(super) fn new_job(&mut self, p: PreparedJob, recovered: bool, attempts: u32) -> Job {
        let fields = event_fields(
            &p.submission.job_id,
            p.submission.workload,
            &p.submission.trace,
            &p.plan,
        )
        .with_hardware_class(self.shared.hardware_class.as_str());
        sakuga_telemetry::record_job_attributes(&p.span, &fields);
        let stream = crate::observe::frame_stream(&p.plan);
        let (target_fps, paced) = stream.unwrap_or((24.0, false));
        let seq = self.next_seq;
        self.next_seq += 1;
        let trace_id = p.submission.trace.trace_id.clone();
        Job {
            info: JobInfo {
                job_id: p.submission.job_id,
                workload: p.submission.workload,
                state: RecordState::Queued,
                priority: p.submission.priority,
                labels: p.submission.labels,
                trace_id: p.submission.trace.trace_id,
                idempotency_key: p.submission.idempotency_key,
                submitted_at: p.submission.submitted_at,
                started_at: None,
                finished_at: None,
                deadline: p.submission.deadline,
                queue_position: None,
                estimate: Some(p.submission.estimate.clone()),
                error: None,
                outputs: Vec::new(),
                attempts,
                recovered,
                worker: None,
            },
            seq,
            plan: Some(p.plan),
            estimate: p.submission.estimate,
            fields,
            span: p.span,
            feed: Arc::new(JobFeed::for_job(self.config.feed, trace_id)),
            cancel: CancelToken::new(),
            enqueued_at: Instant::now(),
            deferrals_reported: Vec::new(),
            paced,
            target_fps,
            started: None,
            timeout: None,
        }
    }

    pub(super) fn enqueue(&mut self, job: Job) {
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

    /// The earlier job with the same idempotency key, answered again.
    fn deduplicated(&self, p: &PreparedJob) -> Option<Submitted> {
        let existing = p
            .submission
            .idempotency_key
            .as_ref()
            .and_then(|k| self.by_key.get(k))?;
        let job = self.jobs.get(existing)?;
        let info = self.info(job);
        Some(Submitted {
            job_id: info.job_id,
            queue_position: info.queue_position.unwrap_or(0),
            estimate: job.estimate.clone(),
            workload: info.workload,
            trace_id: info.trace_id,
            deduplicated: true,
        })
    }

    /// Admission's verdict on a submission, against the queue as it stands.
    fn submit_verdict(&mut self, p: &PreparedJob) -> SubmitVerdict {
        let workload = p.submission.workload;
        let cost = p.submission.estimate.expected_duration.as_secs_f64();
        let now = self.now();
        let view = QueueView {
            queued_same_workload: self.queue.len_of(workload),
            work_ahead_s: self.work_ahead_s(workload, cost, p.submission.priority),
            drain_per_s: self.throughput.per_second(workload, now),
        };
        let deadline_in = p.submission.deadline.map(|d| {
            d.duration_since(self.shared.clock.now())
                .unwrap_or(Duration::ZERO)
        });
        let tunables = self.shared.tunables.read();
        // On a GPU the budget is the device's real memory, as its sampler reads it; on the
        // CPU the configured `memory_budget_bytes` stands in for device memory.
        let admission = match self.shared.signals.gpu_memory_total() {
            Some(total) => crate::admission::AdmissionConfig {
                memory_budget_bytes: total,
                ..tunables.admission.clone()
            },
            None => tunables.admission.clone(),
        };
        decide_submit(
            workload,
            &p.submission.estimate,
            deadline_in,
            view,
            &admission,
        )
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
        if let Some(existing) = self.deduplicated(&p) {
            let _ = reply.send(Ok(existing));
            return;
        }
        let signals = self.shared.signals.clone();
        let workload = p.submission.workload;
        let verdict = self.submit_verdict(&p);
        let fields = event_fields(&p.submission.job_id, workload, &p.submission.trace, &p.plan);
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
        let workflow = std::mem::take(&mut p.submission.workflow);
        let degraded = p.submission.degraded.take();
        let earlier_attempts = p.earlier_attempts;
        let job = self.new_job(p, earlier_attempts > 0, earlier_attempts);
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
        let rejected = job_id.clone();
        let ack: JournalAck = Box::new(move |result: Result<(), SchedulerError>| match result {
            Ok(()) => {
                let _ = reply.send(Ok(submitted));
            }
            Err(e) => {
                // Not durable, so not accepted: the submitter hears so, and the job ends.
                if let Some(tx) = undo {
                    let _ = tx.try_send(Command::Unjournaled(rejected, e.to_string()));
                }
                let _ = reply.send(Err(e));
            }
        });
        self.apply(
            &job_id,
            Transition::Queued {
                workflow,
                degraded,
                ack,
            },
        );
        if earlier_attempts > 0 {
            self.apply(&job_id, Transition::Recovered);
        }
    }

    /// Remembers a finished job, evicting the oldest past the retention counts.
    pub(super) fn retire(&mut self, job_id: String) {
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
            RecordState::Queued => self.apply(
                job_id,
                Transition::Cancelled {
                    detail: "cancelled by the client".into(),
                },
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
            self.apply(&job_id, Transition::Deferred(reason));
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
        let target_fps = job.target_fps;
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
        let device = self.device.clone();
        let id = job_id.to_owned();
        let ack: JournalAck = Box::new(move |written| {
            if let Err(e) = written {
                tracing::error!(job_id = %id, error = %e, "journaling the start failed; running it anyway");
            }
            if device.send(device_job).is_err() {
                tracing::error!(job_id = %id, "the device worker is gone");
            }
        });
        self.apply(job_id, Transition::Started { ack });
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
            self.apply(id, Transition::Interrupted);
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
        self.publish_active();
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
        self.publish_active();
        self.delivering.remove(&done.job_id);
        let Some(job) = self.jobs.get(&done.job_id) else {
            return;
        };
        let transition = match done.result {
            Ok(_) => Transition::Succeeded {
                outputs: done.outputs,
                frames: done.frames,
                elapsed: done.elapsed,
            },
            Err(SchedulerError::Cancelled { .. }) if job.timeout.is_some() => {
                Transition::TimedOut {
                    stage: Stage::Inference,
                    reason: job.timeout.clone().unwrap_or_default(),
                }
            }
            Err(e @ SchedulerError::Cancelled { .. }) => Transition::Cancelled {
                detail: e.to_string(),
            },
            Err(e) => Transition::Failed {
                kind: e.kind().unwrap_or(ErrorKind::Internal),
                stage: self.stage_of_failure(&e),
                error: e.to_string(),
            },
        };
        self.apply(&done.job_id, transition);
        if self.idle() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// The stage of the node that failed, by its schema's roles (inference otherwise).
    fn stage_of_failure(&self, error: &SchedulerError) -> Stage {
        let class = match error {
            SchedulerError::NodeFailed { class_type, .. }
            | SchedulerError::NodePanicked { class_type, .. } => class_type.as_str(),
            _ => return Stage::Inference,
        };
        self.shared
            .registry
            .get(class)
            .and_then(|node| node.schema().roles.stage)
            .unwrap_or(Stage::Inference)
    }

    fn expire_deadlines(&mut self) {
        let now = self.shared.clock.now();
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
            self.apply(
                &job_id,
                Transition::TimedOut {
                    stage: Stage::Queue,
                    reason,
                },
            );
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

    pub(super) fn handle(&mut self, command: Command) -> bool {
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
            Command::Retried {
                job_id,
                batch_limit,
                error,
            } => self.apply(&job_id, Transition::Retried { batch_limit, error }),
            Command::Unjournaled(job_id, error) => {
                if self.jobs.get(&job_id).map(|j| j.info.state) == Some(RecordState::Queued) {
                    let error = format!("not accepted: the journal could not record it ({error})");
                    self.apply(
                        &job_id,
                        Transition::Failed {
                            kind: ErrorKind::Internal,
                            stage: Stage::Queue,
                            error,
                        },
                    );
                }
            }
            Command::Shutdown => return false,
            Command::Interrupt(reply) => {
                let _ = reply.send(self.interrupt());
                return false;
            }
        }
        true
    }
}

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
