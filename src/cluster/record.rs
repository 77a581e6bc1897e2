//! What cluster mode keeps in JetStream: the job message a gateway publishes to
//! `SAKUGA_JOBS`, and the job record in KV `sakuga_jobs` that every gateway answers
//! `GetJob`, `ListJobs` and `Cancel` from. Both are JSON, so operators can read them with
//! the `nats` CLI.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use sakuga_scheduler::admission::Estimate;
use sakuga_scheduler::engine::{JobInfo, JobOutput, PreparedSubmission};
use sakuga_scheduler::journal::RecordState;
use sakuga_telemetry::{TraceContext, Workload};

/// The server's conversion ([`crate::server::convert::unix_ms`]) for a known time.
pub fn unix_ms(t: SystemTime) -> i64 {
    crate::server::convert::unix_ms(Some(t))
}

/// The server's conversion back, with 0 (never set) as the epoch.
pub fn at_unix_ms(ms: i64) -> SystemTime {
    crate::server::convert::from_unix_ms(ms).unwrap_or(UNIX_EPOCH)
}

/// A job as published to `SAKUGA_JOBS`: everything a worker needs to run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobMessage {
    pub job_id: String,
    /// API format, already rewritten by the gateway (feature bypass, degrade).
    pub workflow: serde_json::Value,
    pub workload: Workload,
    pub priority: i32,
    pub deadline_unix_ms: Option<i64>,
    pub labels: BTreeMap<String, String>,
    pub traceparent: String,
    pub submitted_unix_ms: i64,
}

impl JobMessage {
    pub fn new(p: &PreparedSubmission) -> Self {
        Self {
            workflow: p.workflow.clone(),
            ..Self::identity(p)
        }
    }

    /// Everything but the workflow (left null).
    fn identity(p: &PreparedSubmission) -> Self {
        Self {
            job_id: p.job_id.clone(),
            workflow: serde_json::Value::Null,
            workload: p.workload,
            priority: p.priority,
            deadline_unix_ms: p.deadline.map(unix_ms),
            labels: p.labels.clone(),
            traceparent: p.trace.traceparent(),
            submitted_unix_ms: unix_ms(p.submitted_at),
        }
    }
}

/// The parts of an estimate a record keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EstimateRecord {
    pub peak_memory_bytes: u64,
    pub expected_s: f64,
    pub learned: bool,
    pub width: u32,
    pub height: u32,
    pub batch: u32,
}

impl From<&Estimate> for EstimateRecord {
    fn from(e: &Estimate) -> Self {
        Self {
            peak_memory_bytes: e.peak_memory_bytes,
            expected_s: e.expected_duration.as_secs_f64(),
            learned: e.learned,
            width: e.width,
            height: e.height,
            batch: e.batch,
        }
    }
}

impl EstimateRecord {
    pub fn to_estimate(self) -> Estimate {
        let mut e = Estimate::none();
        e.peak_memory_bytes = self.peak_memory_bytes;
        e.expected_duration = Duration::from_secs_f64(self.expected_s.max(0.0));
        e.learned = self.learned;
        e.width = self.width;
        e.height = self.height;
        e.batch = self.batch;
        e
    }
}

/// A file a job wrote, by its name in the object store under `<job_id>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub node_id: String,
    pub name: String,
    pub kind: String,
    pub bytes: u64,
}

/// A job's record in KV `sakuga_jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub workload: Workload,
    pub state: RecordState,
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    pub trace_id: String,
    pub idempotency_key: Option<String>,
    pub submitted_unix_ms: i64,
    pub started_unix_ms: Option<i64>,
    pub finished_unix_ms: Option<i64>,
    pub deadline_unix_ms: Option<i64>,
    pub estimate: EstimateRecord,
    pub error: Option<String>,
    /// `telemetry::ErrorKind` of a failure, or `worker_lost`.
    pub error_kind: Option<String>,
    pub outputs: Vec<OutputRecord>,
    /// Deliveries to workers so far.
    pub attempts: u32,
    pub worker: Option<String>,
    /// The job message's sequence in `SAKUGA_JOBS`, so a cancel while queued removes it
    /// (and it stops counting against the queue cap).
    #[serde(default)]
    pub queue_seq: Option<u64>,
}

impl JobRecord {
    /// A queued record with nothing known yet but its id and workload.
    fn blank(job_id: String, workload: Workload) -> Self {
        Self {
            job_id,
            workload,
            state: RecordState::Queued,
            priority: 0,
            labels: BTreeMap::new(),
            trace_id: String::new(),
            idempotency_key: None,
            submitted_unix_ms: 0,
            started_unix_ms: None,
            finished_unix_ms: None,
            deadline_unix_ms: None,
            estimate: EstimateRecord::default(),
            error: None,
            error_kind: None,
            outputs: Vec::new(),
            attempts: 0,
            worker: None,
            queue_seq: None,
        }
    }

    /// The record of a job just accepted by a gateway.
    pub fn queued(p: &PreparedSubmission) -> Self {
        Self {
            idempotency_key: p.idempotency_key.clone(),
            estimate: EstimateRecord::from(&p.estimate),
            ..Self::from_message(&JobMessage::identity(p))
        }
    }

    /// A record rebuilt from the job's message (its record expired or was never stored).
    pub fn from_message(m: &JobMessage) -> Self {
        let trace =
            TraceContext::from_traceparent(&m.traceparent).unwrap_or_else(TraceContext::new_root);
        Self {
            priority: m.priority,
            labels: m.labels.clone(),
            trace_id: trace.trace_id,
            submitted_unix_ms: m.submitted_unix_ms,
            deadline_unix_ms: m.deadline_unix_ms,
            ..Self::blank(m.job_id.clone(), m.workload)
        }
    }

    /// A final state, with its error if any.
    pub fn finish(&mut self, state: RecordState, error: Option<String>, kind: Option<&str>) {
        self.state = state;
        self.error = error;
        self.error_kind = kind.map(str::to_owned);
        self.finished_unix_ms = Some(unix_ms(SystemTime::now()));
    }

    pub fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("a job record always serialises")
            .into()
    }

    /// # Errors
    /// Bytes that are not a record (written by something else).
    pub fn decode(job_id: &str, bytes: &[u8]) -> Result<Self, super::ClusterError> {
        serde_json::from_slice(bytes).map_err(|e| super::ClusterError::Record {
            job_id: job_id.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The record as the engine's `JobInfo`, which every API front end speaks.
    pub fn to_info(&self) -> JobInfo {
        JobInfo {
            job_id: self.job_id.clone(),
            workload: self.workload,
            state: self.state,
            priority: self.priority,
            labels: self.labels.clone(),
            trace_id: self.trace_id.clone(),
            idempotency_key: self.idempotency_key.clone(),
            submitted_at: at_unix_ms(self.submitted_unix_ms),
            started_at: self.started_unix_ms.map(at_unix_ms),
            finished_at: self.finished_unix_ms.map(at_unix_ms),
            deadline: self.deadline_unix_ms.map(at_unix_ms),
            queue_position: None,
            estimate: Some(self.estimate.to_estimate()),
            error: self.error.clone(),
            outputs: self
                .outputs
                .iter()
                .map(|o| JobOutput {
                    node_id: o.node_id.clone(),
                    path: PathBuf::from(&o.name),
                    kind: o.kind.clone(),
                })
                .collect(),
            attempts: self.attempts,
            recovered: self.attempts > 1,
            worker: self.worker.clone(),
        }
    }
}

/// KV key of an idempotency key: its bytes in hex, so any key is a valid KV key and two
/// keys never share one.
pub fn idempotency_entry(key: &str) -> String {
    let mut out = String::with_capacity(5 + key.len() * 2);
    out.push_str("idem.");
    for b in key.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_entries_are_valid_kv_keys_and_distinct() {
        let a = idempotency_entry("order 17/frame:*");
        let b = idempotency_entry("order 17/frame:+");
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        );
        assert_eq!(idempotency_entry("A"), "idem.41");
    }

    #[test]
    fn records_round_trip_through_json_and_into_job_info() {
        let mut record = JobRecord {
            job_id: "j1".into(),
            workload: Workload::Batch,
            state: RecordState::Running,
            priority: 3,
            labels: BTreeMap::from([("team".into(), "layout".into())]),
            trace_id: "t".into(),
            idempotency_key: Some("k".into()),
            submitted_unix_ms: 1_700_000_000_000,
            started_unix_ms: Some(1_700_000_000_500),
            finished_unix_ms: None,
            deadline_unix_ms: None,
            estimate: EstimateRecord {
                expected_s: 1.5,
                ..EstimateRecord::default()
            },
            error: None,
            error_kind: None,
            outputs: vec![OutputRecord {
                node_id: "9".into(),
                name: "ComfyUI_00001_.png".into(),
                kind: "output".into(),
                bytes: 10,
            }],
            attempts: 2,
            worker: Some("w1".into()),
            queue_seq: Some(9),
        };
        record.finish(RecordState::Succeeded, None, None);
        let back = JobRecord::decode("j1", &record.encode()).unwrap();
        assert_eq!(back, record);
        let info = back.to_info();
        assert_eq!(info.state, RecordState::Succeeded);
        assert!(info.recovered, "a second delivery is a recovered job");
        assert_eq!(info.outputs[0].path, PathBuf::from("ComfyUI_00001_.png"));
        assert_eq!(info.worker.as_deref(), Some("w1"));
        assert_eq!(
            info.estimate.unwrap().expected_duration,
            Duration::from_millis(1500)
        );
        assert!(JobRecord::decode("j1", b"{}").is_err());
    }
}
