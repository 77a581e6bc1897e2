//! Recovery at start-up: the journal's records become jobs again. Final ones come back for
//! lookups, listings and idempotency; unfinished ones are queued again (`job_recovered`),
//! or end with the reason they cannot run: their deadline passed while the server was
//! down, they took the server down before (`poison`), or they no longer validate.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value as Json;

use sakuga_nodes::CancelToken;
use sakuga_telemetry::{ErrorKind, EventFields, Stage, TraceContext, Workload};

use crate::admission::Estimate;
use crate::engine::PreparedSubmission;
use crate::engine::feed::{JobEvent, JobFeed};
use crate::engine::jobs::{Job, PreparedJob, QueueState};
use crate::engine::transition::Transition;
use crate::engine::{EngineHandle, JobInfo, JobOutput};
use crate::journal::{JobRecord, RecordState};

/// How a job that took the server down is reported: its error starts with this word.
pub(crate) const POISON: &str = "poison";

fn at_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

impl QueueState {
    /// Brings back every journaled job (see the module docs).
    pub fn recover(&mut self, records: Vec<JobRecord>, handle: &EngineHandle) {
        self.self_tx = Some(handle.tx.clone());
        for record in records {
            let workload: Workload = record.workload.parse().unwrap_or(Workload::SingleImage);
            let trace = TraceContext::root_of(record.trace_id.clone());
            if record.state.is_final() {
                self.restore_final(record, workload, &trace);
            } else {
                self.recover_unfinished(record, workload, trace, handle);
            }
        }
        if let Some(journal) = &self.journal {
            journal.flush();
        }
    }

    /// Why an unfinished job must not run again, as the transition that ends it.
    fn rejection(&self, record: &JobRecord) -> Option<Transition> {
        let deadline = record.deadline_unix_ms.map(at_unix_ms);
        if deadline.is_some_and(|d| d <= self.shared.clock.now()) {
            return Some(Transition::TimedOut {
                stage: Stage::Queue,
                reason: "the deadline passed while the server was down".to_owned(),
            });
        }
        (record.state == RecordState::Running && record.attempts >= self.config.max_attempts)
            .then(|| Transition::Failed {
                kind: ErrorKind::Internal,
                stage: Stage::Inference,
                error: format!(
                    "{POISON}: the server went down while running it ({} of {} attempt(s)); not run again",
                    record.attempts, self.config.max_attempts
                ),
            })
    }

    fn recover_unfinished(
        &mut self,
        record: JobRecord,
        workload: Workload,
        trace: TraceContext,
        handle: &EngineHandle,
    ) {
        let rejection = self.rejection(&record);
        let workflow = record.workflow.clone().unwrap_or(Json::Null);
        let (plan, estimate) = match handle.check(&workflow, None) {
            Ok(checked) => checked,
            Err(e) => {
                let error = format!("not runnable after the restart: {e}");
                let job_id = record.job_id.clone();
                self.restore(record, workload, &trace);
                let failed = Transition::Failed {
                    kind: ErrorKind::InvalidInput,
                    stage: Stage::Parse,
                    error,
                };
                self.apply(&job_id, failed);
                return;
            }
        };
        let prepared = PreparedJob {
            span: sakuga_telemetry::open_job_span(&record.job_id, workload, &trace),
            submission: PreparedSubmission {
                job_id: record.job_id.clone(),
                workflow,
                estimate,
                workload,
                priority: record.priority,
                deadline: record.deadline_unix_ms.map(at_unix_ms),
                idempotency_key: record.idempotency_key.clone(),
                labels: record.labels.clone(),
                trace,
                submitted_at: at_unix_ms(record.submitted_unix_ms),
                degraded: None,
            },
            plan,
            earlier_attempts: record.attempts,
        };
        let job = self.new_job(prepared, true, record.attempts);
        let job_id = job.info.job_id.clone();
        self.enqueue(job);
        self.apply(&job_id, rejection.unwrap_or(Transition::Recovered));
    }

    /// A final job, back for lookups: its feed holds its end.
    fn restore_final(&mut self, record: JobRecord, workload: Workload, trace: &TraceContext) {
        let job_id = record.job_id.clone();
        let (state, error) = (record.state, record.error.clone());
        self.restore(record, workload, trace);
        self.jobs[&job_id]
            .feed
            .push(JobEvent::Finished { state, error });
        self.retire(job_id);
    }

    /// The job of a journal record, in the table but in no queue.
    fn restore(&mut self, record: JobRecord, workload: Workload, trace: &TraceContext) {
        let fields = EventFields::new(record.job_id.clone(), workload, trace);
        let feed = Arc::new(JobFeed::for_job(self.config.feed, record.trace_id.clone()));
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
                submitted_at: at_unix_ms(record.submitted_unix_ms),
                started_at: None,
                finished_at: record.finished_unix_ms.map(at_unix_ms),
                deadline: record.deadline_unix_ms.map(at_unix_ms),
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
                worker: None,
            },
            seq,
            plan: None,
            estimate: Estimate::none(),
            fields,
            span: tracing::Span::none(),
            feed,
            cancel: CancelToken::new(),
            enqueued_at: Instant::now(),
            deferrals_reported: Vec::new(),
            started: None,
            paced: false,
            target_fps: 24.0,
            timeout: None,
        };
        if let Some(key) = &record.idempotency_key {
            self.by_key.insert(key.clone(), record.job_id.clone());
        }
        self.order.insert(seq, record.job_id.clone());
        self.jobs.insert(record.job_id, job);
    }
}
