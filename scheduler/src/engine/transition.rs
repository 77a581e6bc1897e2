//! The one way a job's state changes. Every state change is a [`Transition`], and
//! [`QueueState::apply`] writes it to all four sinks together: the job's record (and the
//! journal), the signals (metrics and SLO windows), the stage event (`tracing`, so logs
//! and OTLP spans) and the job's `Watch` feed. Nothing else in the engine changes a job's
//! state, so a new state, a new sink (cluster mode's JetStream KV), or a fix to what one
//! of them records lands here once.
//!
//! Progress inside a running job (node started and finished, frames) is no state change:
//! it flows from the executor through the observer chain (`observe::TelemetryObserver`
//! into `worker::FeedObserver`), which records signals, events and the feed the same way.

use std::time::{Duration, Instant, SystemTime};

use serde_json::Value as Json;

use sakuga_telemetry::{
    AdmissionReason, Decision, ErrorKind, JobReport as SignalsJobReport, Outcome, RetryReason,
    Stage, events,
};

use crate::engine::JobOutput;
use crate::engine::feed::JobEvent;
use crate::engine::jobs::QueueState;
use crate::journal::{JournalAck, RecordState};

/// A change of one job's state.
pub(crate) enum Transition {
    /// Accepted and queued: journaled with its workflow; `ack` answers the submitter once
    /// the record is durable.
    Queued {
        workflow: Json,
        /// How it was degraded to keep its target FPS, if it was.
        degraded: Option<String>,
        ack: JournalAck,
    },
    /// Passed over at dispatch, for a reason the job had not been told yet.
    Deferred(AdmissionReason),
    /// Handed to the device; `ack` hands it over once the attempt is durable.
    Started {
        ack: JournalAck,
    },
    /// Ran out of device memory with a batch; it runs once more, the batch split.
    Retried {
        batch_limit: usize,
        error: String,
    },
    Succeeded {
        outputs: Vec<JobOutput>,
        frames: u64,
        elapsed: Duration,
    },
    Failed {
        kind: ErrorKind,
        stage: Stage,
        error: String,
    },
    Cancelled {
        detail: String,
    },
    /// Stopped for time: its deadline passed (while queued or running) or it ran past its
    /// workload's run-time limit.
    TimedOut {
        stage: Stage,
        reason: String,
    },
    /// Found unfinished in the journal at start-up and queued again.
    Recovered,
    /// Given up by a shutdown: back to queued, its attempt not counted (the server chose to
    /// stop it; the job did nothing wrong).
    Interrupted,
}

/// The final states, with what each records.
enum End {
    Succeeded { frames: u64, elapsed: Duration },
    Failed { kind: ErrorKind, stage: Stage },
    Cancelled,
    TimedOut { stage: Stage },
}

impl QueueState {
    /// Applies `transition` to the job: its record, the journal, the signals, the stage
    /// event and its feed.
    pub(crate) fn apply(&mut self, job_id: &str, transition: Transition) {
        if !self.jobs.contains_key(job_id) {
            return;
        }
        match transition {
            Transition::Queued {
                workflow,
                degraded,
                ack,
            } => self.queued(job_id, workflow, degraded, ack),
            Transition::Deferred(reason) => self.deferred(job_id, reason),
            Transition::Started { ack } => self.started(job_id, ack),
            Transition::Retried { batch_limit, error } => self.retried(job_id, batch_limit, &error),
            Transition::Recovered => self.recovered(job_id),
            Transition::Interrupted => self.interrupted(job_id),
            Transition::Succeeded {
                outputs,
                frames,
                elapsed,
            } => self.end(
                job_id,
                RecordState::Succeeded,
                None,
                outputs,
                End::Succeeded { frames, elapsed },
            ),
            Transition::Failed { kind, stage, error } => self.end(
                job_id,
                RecordState::Failed,
                Some(error),
                Vec::new(),
                End::Failed { kind, stage },
            ),
            Transition::Cancelled { detail } => self.end(
                job_id,
                RecordState::Cancelled,
                Some(detail),
                Vec::new(),
                End::Cancelled,
            ),
            Transition::TimedOut { stage, reason } => self.end(
                job_id,
                RecordState::TimedOut,
                Some(reason),
                Vec::new(),
                End::TimedOut { stage },
            ),
        }
    }

    fn queued(&mut self, job_id: &str, workflow: Json, degraded: Option<String>, ack: JournalAck) {
        let job = &self.jobs[job_id];
        let signals = &self.shared.signals;
        let workload = job.info.workload;
        signals.job_submitted(workload);
        events::prompt_received(&job.fields);
        job.feed.push(JobEvent::Stage {
            name: events::PROMPT_RECEIVED,
            detail: format!(
                "{} nodes, workload {workload}",
                job.plan.as_ref().map_or(0, |p| p.len())
            ),
        });
        let admitted = format!(
            "expected {:.3}s, peak {} MiB",
            job.estimate.expected_duration.as_secs_f64(),
            job.estimate.peak_memory_bytes >> 20
        );
        self.admission(job_id, Decision::Admit, AdmissionReason::Capacity, admitted);
        if let Some(note) = degraded {
            self.admission(
                job_id,
                Decision::Admit,
                AdmissionReason::DegradedForFps,
                note,
            );
        }
        let mut record = self.jobs[job_id].record();
        record.workflow = Some(workflow);
        self.journal_record(record, Some(ack));
        self.queue_depth(workload);
    }

    /// One admission decision about an accepted job: counted, logged, on its feed.
    fn admission(&self, job_id: &str, decision: Decision, reason: AdmissionReason, detail: String) {
        let job = &self.jobs[job_id];
        self.shared
            .signals
            .admission(job.info.workload, decision, reason);
        events::admission_decision(&job.fields, decision, reason);
        job.feed.push(JobEvent::Admission {
            decision,
            reason,
            detail,
        });
    }

    fn deferred(&mut self, job_id: &str, reason: AdmissionReason) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.deferrals_reported.contains(&reason) {
            return;
        }
        job.deferrals_reported.push(reason);
        let detail = match reason {
            AdmissionReason::MemoryHeadroom => "waiting for device memory headroom".into(),
            AdmissionReason::FpsDegraded => "waiting while animation FPS is degraded".into(),
            AdmissionReason::Capacity => "waiting for the paced stream playing out to end".into(),
            other => format!("waiting ({other})"),
        };
        self.admission(job_id, Decision::Defer, reason, detail);
    }

    fn started(&mut self, job_id: &str, ack: JournalAck) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.info.state = RecordState::Running;
        job.info.started_at = Some(SystemTime::now());
        job.started = Some(Instant::now());
        job.info.attempts += 1;
        let workload = job.info.workload;
        let waited = job.enqueued_at.elapsed();
        let signals = &self.shared.signals;
        signals.job_started(workload, job.fields.model_id.as_deref(), waited);
        signals.stage_finished(workload, Stage::Queue, waited);
        // The attempt is durable before the job runs: if the job takes the process down,
        // recovery finds it `Running` with this attempt counted and fails it as poison
        // instead of running it into the same crash again.
        self.journal(&self.jobs[job_id], Some(ack));
        self.running = Some(job_id.to_owned());
        self.queue_depth(workload);
    }

    fn retried(&mut self, job_id: &str, batch_limit: usize, error: &str) {
        let job = &self.jobs[job_id];
        let signals = &self.shared.signals;
        // The first run's OOM is an error of its own whatever the retry does.
        signals.error(ErrorKind::Oom, Stage::Inference);
        signals.retry(RetryReason::OomSplit);
        tracing::warn!(
            job_id,
            batch_limit,
            error,
            "out of device memory; retrying once with the batch split"
        );
        let detail = format!(
            "out of device memory with a batch of {}: retrying once, at most {batch_limit} at a time ({error})",
            job.estimate.batch
        );
        self.admission(job_id, Decision::Admit, AdmissionReason::OomSplit, detail);
    }

    fn recovered(&mut self, job_id: &str) {
        let job = &self.jobs[job_id];
        events::job_recovered(&job.fields);
        job.feed.push(JobEvent::Stage {
            name: events::JOB_RECOVERED,
            detail: format!(
                "unfinished after {} earlier attempt(s), by a restart or a lost worker; this is attempt {}",
                job.info.attempts,
                job.info.attempts + 1
            ),
        });
        self.journal(job, None);
    }

    fn interrupted(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.cancel.cancel();
        job.info.state = RecordState::Queued;
        job.info.attempts = job.info.attempts.saturating_sub(1);
        tracing::warn!(
            job_id,
            "interrupted by shutdown; it runs again after the next start"
        );
        self.journal(&self.jobs[job_id], None);
    }

    /// A final state: the record, the outcome and its error, the closing stage event, the
    /// end of the feed, the journal, and retirement.
    fn end(
        &mut self,
        job_id: &str,
        state: RecordState,
        error: Option<String>,
        outputs: Vec<JobOutput>,
        end: End,
    ) {
        let was_queued = self.queue.remove(job_id).is_some();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.info.state = state;
        // The job span ends (and is exported) with the job.
        job.span = tracing::Span::none();
        job.plan = None;
        job.info.finished_at = Some(SystemTime::now());
        job.info.error = error.clone();
        job.info.outputs = outputs;
        let workload = job.info.workload;
        if job.started.is_some() {
            self.throughput.record(workload, self.started.elapsed());
        }
        let job = &self.jobs[job_id];
        self.record_outcome(job_id, state, &end);
        let detail = error.clone().unwrap_or_default();
        let (name, detail) = match end {
            End::Succeeded { frames, elapsed } => {
                self.shared.estimator.learn(job.estimate.signature, elapsed);
                let latency = job.info.submitted_at.elapsed().unwrap_or_default();
                events::deliver_complete(&job.fields, latency);
                let detail = format!(
                    "{} outputs, {frames} frames in {:.3}s",
                    job.info.outputs.len(),
                    elapsed.as_secs_f64()
                );
                (events::DELIVER_COMPLETE, detail)
            }
            End::Cancelled => {
                events::job_cancelled(&job.fields);
                let detail = if was_queued {
                    format!("{detail} (while queued)")
                } else {
                    detail
                };
                (events::JOB_CANCELLED, detail)
            }
            End::Failed { kind, stage } => self.failure(job_id, kind, stage, detail),
            End::TimedOut { stage } => {
                if stage == Stage::Queue {
                    self.shared.signals.admission(
                        workload,
                        Decision::Deny,
                        AdmissionReason::Deadline,
                    );
                }
                self.failure(job_id, ErrorKind::Timeout, stage, detail)
            }
        };
        self.publish_active();
        let job = &self.jobs[job_id];
        job.feed.push(JobEvent::Stage { name, detail });
        job.feed.push(JobEvent::Finished { state, error });
        job.feed.end_stream();
        self.journal(job, None);
        self.queue_depth(workload);
        self.retire(job_id.to_owned());
    }

    fn failure(
        &self,
        job_id: &str,
        kind: ErrorKind,
        stage: Stage,
        detail: String,
    ) -> (&'static str, String) {
        let job = &self.jobs[job_id];
        self.shared.signals.error(kind, stage);
        events::job_failed(&job.fields, kind, &detail);
        (events::JOB_FAILED, detail)
    }

    /// `sakuga_jobs_finished_total` and the latency SLOs, with the job's labels.
    fn record_outcome(&self, job_id: &str, state: RecordState, end: &End) {
        let job = &self.jobs[job_id];
        let outcome = match (state, end) {
            (
                _,
                End::Failed {
                    kind: ErrorKind::Oom,
                    ..
                },
            ) => Outcome::Oom,
            (RecordState::Succeeded, _) => Outcome::Success,
            (RecordState::Cancelled, _) => Outcome::Cancelled,
            (RecordState::TimedOut, _) => Outcome::Timeout,
            _ => Outcome::Failed,
        };
        let images = match end {
            End::Succeeded { frames, .. } => (job.info.outputs.len() as u64 + frames).max(1),
            _ => 0,
        };
        let latency = job.info.submitted_at.elapsed().unwrap_or_default();
        let report = SignalsJobReport::new(job.info.workload, outcome, latency)
            .with_resolution(job.estimate.width.max(1), job.estimate.height.max(1))
            .with_images(images);
        let report = match job.fields.model_id.as_deref() {
            Some(model) => report.with_model(model),
            None => report,
        };
        let error = match end {
            End::Failed { kind, stage } => Some((*kind, *stage)),
            End::TimedOut { stage } => Some((ErrorKind::Timeout, *stage)),
            End::Succeeded { .. } | End::Cancelled => None,
        };
        let report = report.with_detail(crate::history::detail(
            &job.info,
            &job.fields,
            job.feed.stream(),
            error,
        ));
        self.shared.signals.job_finished(&report);
    }
}

#[cfg(test)]
mod tests {
    //! Each sink of `apply`, tested once: the journal, the signals, the feed (whose stage
    //! entries carry the same names as the `tracing` stage events, written side by side).

    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use parking_lot::{Mutex, RwLock};
    use serde_json::json;

    use sakuga_nodes::{NodeEnv, NodeRegistry};
    use sakuga_telemetry::window::Window;
    use sakuga_telemetry::{Signals, SignalsConfig, TraceContext, Workload};

    use super::*;
    use crate::admission::Estimator;
    use crate::engine::feed::WatchItem;
    use crate::engine::jobs::PreparedJob;
    use crate::engine::{Command, EngineConfig, Shared, pacer};
    use crate::journal::{JobRecord, Journal};
    use crate::plan::ExecutionPlan;
    use crate::workflow::Workflow;

    struct Fixture {
        dir: tempfile::TempDir,
        state: QueueState,
        signals: Signals,
        _device: crossbeam_channel::Receiver<crate::engine::worker::DeviceJob>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let env = Arc::new(NodeEnv::new(
            dir.path().join("input"),
            dir.path().join("output"),
            dir.path().join("models"),
        ));
        let signals = Signals::new(SignalsConfig::default());
        let config = EngineConfig::default();
        let shared = Arc::new(Shared {
            registry: Arc::new(NodeRegistry::with_builtins()),
            env,
            signals: signals.clone(),
            estimator: Estimator::new(),
            tunables: RwLock::new(config.tunables.clone()),
            hardware_class: "cpu".into(),
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            active: std::sync::atomic::AtomicUsize::new(0),
            clock: crate::engine::clock::system(),
            threads: Mutex::new(Vec::new()),
        });
        let (journal, _) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let (device, device_rx) = crossbeam_channel::bounded(1);
        let (pacer, _) = pacer::spawn_pacer().unwrap();
        let state = QueueState::new(config, shared, Some(journal), device, pacer);
        Fixture {
            dir,
            state,
            signals,
            _device: device_rx,
        }
    }

    /// Accepts a tiny single-image job, as a submit does; returns its id.
    fn accept(state: &mut QueueState) -> String {
        let workflow = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        });
        let shared = state.shared.clone();
        let parsed = Workflow::from_json(workflow.clone()).unwrap();
        let valid = crate::validate(&parsed, &shared.registry, &shared.env).unwrap();
        let estimate =
            shared
                .estimator
                .estimate(&valid, &shared.env, &shared.tunables.read().admission);
        let job_id = crate::engine::ids::new_job_id();
        let trace = TraceContext::new_root();
        let prepared = PreparedJob {
            submission: crate::engine::PreparedSubmission {
                job_id: job_id.clone(),
                workflow: workflow.clone(),
                estimate,
                workload: Workload::SingleImage,
                priority: 0,
                deadline: None,
                idempotency_key: None,
                labels: Default::default(),
                trace,
                submitted_at: SystemTime::now(),
                degraded: None,
            },
            plan: ExecutionPlan::compile(valid),
            span: tracing::Span::none(),
            earlier_attempts: 0,
        };
        let job = state.new_job(prepared, false, 0);
        state.enqueue(job);
        let acked = Arc::new(AtomicBool::new(false));
        let flag = acked.clone();
        let ack: JournalAck = Box::new(move |r| flag.store(r.is_ok(), Ordering::SeqCst));
        state.apply(
            &job_id,
            Transition::Queued {
                workflow,
                degraded: None,
                ack,
            },
        );
        state.journal.as_ref().unwrap().flush();
        assert!(
            acked.load(Ordering::SeqCst),
            "the submitter hears once it is durable"
        );
        job_id
    }

    use std::sync::atomic::Ordering;

    fn journaled(fixture: Fixture, job_id: &str) -> JobRecord {
        let Fixture { dir, state, .. } = fixture;
        drop(state);
        let (_journal, records) = Journal::open(dir.path(), Duration::from_secs(3600)).unwrap();
        records.into_iter().find(|r| r.job_id == job_id).unwrap()
    }

    fn feed(state: &QueueState, job_id: &str) -> Vec<JobEvent> {
        let mut watch = state.jobs[job_id].feed.watch();
        let mut events = Vec::new();
        while let Some(item) = watch.try_next() {
            if let WatchItem::Event(e) = item {
                events.push(e.event.clone());
            }
        }
        events
    }

    fn stages(events: &[JobEvent]) -> Vec<&'static str> {
        events
            .iter()
            .filter_map(|e| match e {
                JobEvent::Stage { name, .. } => Some(*name),
                _ => None,
            })
            .collect()
    }

    fn finished(events: &[JobEvent]) -> Option<(RecordState, Option<String>)> {
        events.iter().find_map(|e| match e {
            JobEvent::Finished { state, error } => Some((*state, error.clone())),
            _ => None,
        })
    }

    fn start(state: &mut QueueState, job_id: &str) {
        state.queue.remove(job_id);
        state.apply(
            job_id,
            Transition::Started {
                ack: Box::new(|_| {}),
            },
        );
    }

    #[test]
    fn a_job_that_succeeds_reaches_the_journal_the_signals_and_the_feed() {
        let mut f = fixture();
        let id = accept(&mut f.state);
        start(&mut f.state, &id);
        assert_eq!(f.state.running.as_deref(), Some(id.as_str()));
        f.state.apply(
            &id,
            Transition::Succeeded {
                outputs: Vec::new(),
                frames: 0,
                elapsed: Duration::from_millis(5),
            },
        );
        let events = feed(&f.state, &id);
        assert_eq!(
            stages(&events),
            [events::PROMPT_RECEIVED, events::DELIVER_COMPLETE]
        );
        assert!(events.iter().any(|e| matches!(
            e,
            JobEvent::Admission {
                decision: Decision::Admit,
                reason: AdmissionReason::Capacity,
                ..
            }
        )));
        assert_eq!(finished(&events), Some((RecordState::Succeeded, None)));
        let golden = f.signals.snapshot();
        let golden = golden
            .golden(Workload::SingleImage, Window::FiveMinutes)
            .unwrap();
        assert_eq!(golden.jobs_finished, 1);
        assert_eq!(golden.success_ratio, Some(1.0));
        let record = journaled(f, &id);
        assert_eq!(record.state, RecordState::Succeeded);
        assert_eq!(record.attempts, 1);
    }

    #[test]
    fn a_deadline_that_passes_in_the_queue_is_a_timeout_on_every_sink() {
        let mut f = fixture();
        let id = accept(&mut f.state);
        f.state.apply(
            &id,
            Transition::TimedOut {
                stage: Stage::Queue,
                reason: "missed its deadline".into(),
            },
        );
        assert!(f.state.queue.is_empty(), "it left the queue");
        let events = feed(&f.state, &id);
        assert_eq!(stages(&events).last(), Some(&events::JOB_FAILED));
        assert_eq!(
            finished(&events),
            Some((RecordState::TimedOut, Some("missed its deadline".into())))
        );
        let snapshot = f.signals.snapshot();
        let golden = snapshot
            .golden(Workload::SingleImage, Window::FiveMinutes)
            .unwrap();
        assert_eq!((golden.jobs_finished, golden.success_ratio), (1, Some(0.0)));
        let record = journaled(f, &id);
        assert_eq!(record.state, RecordState::TimedOut);
        assert_eq!(record.attempts, 0, "it never started");
    }

    #[test]
    fn a_submission_the_journal_refused_ends_failed_not_cancelled() {
        let mut f = fixture();
        let id = accept(&mut f.state);
        f.state
            .handle(Command::Unjournaled(id.clone(), "disk full".into()));
        let events = feed(&f.state, &id);
        let (state, error) = finished(&events).unwrap();
        assert_eq!(state, RecordState::Failed);
        assert!(
            error
                .unwrap()
                .contains("journal could not record it (disk full)")
        );
        assert!(!stages(&events).contains(&events::JOB_CANCELLED));
    }

    #[test]
    fn an_oom_retry_is_on_the_feed_once_and_the_attempt_is_not_recounted() {
        let mut f = fixture();
        let id = accept(&mut f.state);
        start(&mut f.state, &id);
        f.state.apply(
            &id,
            Transition::Retried {
                batch_limit: 2,
                error: "out of memory".into(),
            },
        );
        let splits = feed(&f.state, &id)
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    JobEvent::Admission {
                        reason: AdmissionReason::OomSplit,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(splits, 1);
        assert_eq!(f.state.jobs[&id].info.attempts, 1);
    }

    #[test]
    fn an_interrupted_job_goes_back_to_queued_without_its_attempt() {
        let mut f = fixture();
        let id = accept(&mut f.state);
        start(&mut f.state, &id);
        f.state.apply(&id, Transition::Interrupted);
        assert!(f.state.jobs[&id].cancel.is_cancelled());
        let record = journaled(f, &id);
        assert_eq!(record.state, RecordState::Queued);
        assert_eq!(record.attempts, 0);
    }
}
