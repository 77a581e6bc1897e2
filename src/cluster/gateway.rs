//! The gateway's side of cluster mode: it keeps no job state of its own. Submit checks and
//! rewrites the workflow with the local engine (validation, estimate, feature bypass,
//! degrade), judges the queue caps against the consumers' pending counts, writes the job
//! record and publishes the job; every other call reads or updates the shared record, the
//! events stream or the object store, so any gateway answers for any job.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::io::AsyncRead;

use sakuga_scheduler::engine::{
    Demand, JobInfo, JobPage, ListFilter, PreparedSubmission, SubmitRequest, Submitted,
};
use sakuga_scheduler::journal::RecordState;
use sakuga_scheduler::{EngineHandle, SchedulerError};
use sakuga_telemetry::{AdmissionReason, Decision, Workload, events as stage};

use super::events::{ClusterWatch, EventPublisher, stage_event};
use super::record::{JobMessage, JobRecord, idempotency_entry};
use super::worker::Heartbeat;
use super::{Cluster, ClusterError, PULL_ORDER, Result, cancel_subject, jobs_subject};

/// How often the fleet view (consumer counts, heartbeats) is refreshed.
const FLEET_REFRESH: Duration = Duration::from_secs(1);

/// What the gateway knows about the fleet, refreshed in the background.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    /// Jobs waiting in each workload's consumer (not yet delivered).
    pub pending: [u64; 3],
    /// Jobs delivered to a worker and not yet acked (running).
    pub ack_pending: [u64; 3],
    /// Submissions this gateway accepted since the counts were read.
    pub accepted_since: [u64; 3],
    pub workers: Vec<Heartbeat>,
    /// Mean demand weight and expected seconds of recent jobs per workload.
    pub weight: [f64; 3],
    pub expected_s: [f64; 3],
}

impl FleetView {
    fn queued(&self, w: Workload) -> u64 {
        self.pending[w.index()] + self.accepted_since[w.index()]
    }

    /// Jobs the fleet finishes per second, from the workers' heartbeats.
    pub fn throughput(&self) -> f64 {
        self.workers.iter().map(|h| h.jobs_per_second).sum()
    }
}

/// A gateway: the front door of a cluster.
#[derive(Clone)]
pub struct Gateway {
    cluster: Cluster,
    engine: EngineHandle,
    fleet: Arc<Mutex<FleetView>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over `cluster`, checking workflows with `engine`; starts the fleet view's
    /// refresh task.
    pub fn new(cluster: Cluster, engine: EngineHandle) -> Self {
        let gateway = Self {
            cluster,
            engine,
            fleet: Arc::new(Mutex::new(FleetView {
                weight: [1.0; 3],
                ..FleetView::default()
            })),
        };
        let refresher = gateway.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = refresher.refresh_fleet().await {
                    tracing::debug!(error = %e, "fleet view not refreshed");
                }
                tokio::time::sleep(FLEET_REFRESH).await;
            }
        });
        gateway
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn fleet(&self) -> FleetView {
        self.fleet.lock().clone()
    }

    fn require_connection(&self) -> Result<()> {
        if self.cluster.is_connected() {
            Ok(())
        } else {
            Err(ClusterError::Unavailable {
                what: "the gateway's connection",
                reason: "reconnecting to NATS".into(),
            })
        }
    }

    /// Reads the consumers' counts and the heartbeats, and publishes the cluster gauges.
    async fn refresh_fleet(&self) -> Result<()> {
        // Accepted before the counts are read, so in them; those accepted while reading
        // may be counted twice until the next refresh, never missed.
        let counted = self.fleet.lock().accepted_since;
        let mut pending = [0u64; 3];
        let mut ack_pending = [0u64; 3];
        for w in PULL_ORDER {
            let mut consumer = self.cluster.consumer(w).await?;
            let info = consumer
                .info()
                .await
                .map_err(|e| ClusterError::nats("reading a consumer", e))?;
            pending[w.index()] = info.num_pending;
            ack_pending[w.index()] = info.num_ack_pending as u64;
            sakuga_telemetry::record::cluster_consumer(
                w,
                info.num_pending,
                info.num_ack_pending as u64,
            );
        }
        let workers = read_heartbeats(&self.cluster).await?;
        sakuga_telemetry::record::cluster_workers(workers.len());
        let mut fleet = self.fleet.lock();
        fleet.pending = pending;
        fleet.ack_pending = ack_pending;
        for (since, seen) in fleet.accepted_since.iter_mut().zip(counted) {
            *since = since.saturating_sub(seen);
        }
        fleet.workers = workers;
        Ok(())
    }

    /// Checks, admits, records and publishes a job.
    ///
    /// # Errors
    /// Invalid workflows and denials as the engine reports them; NATS unreachable.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted> {
        self.require_connection()?;
        let nodes = request.workflow.as_object().map_or(0, |n| n.len());
        let mut prepared = if nodes > 64 {
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || engine.prepare_submission(request))
                .await
                .map_err(|_| SchedulerError::ShuttingDown)??
        } else {
            self.engine.prepare_submission(request)?
        };
        if let Some(key) = prepared.idempotency_key.clone()
            && let Some(existing) = self.claim_key(&key, &mut prepared).await?
        {
            return Ok(existing);
        }
        let queued = self.admit(&prepared)?;
        let mut record = JobRecord::queued(&prepared);
        let revision = self
            .cluster
            .jobs
            .put(&prepared.job_id, record.encode())
            .await
            .map_err(|e| ClusterError::nats("writing a job record", e))?;
        let mut events = EventPublisher::new(&self.cluster, &prepared.job_id);
        events
            .publish(&stage_event(
                stage::PROMPT_RECEIVED,
                format!("accepted by a gateway, {} in its queue ahead", queued),
                &prepared.trace.trace_id,
            ))
            .await?;
        // One connection keeps its publishes in order: the event is stored before the job
        // a worker could relay events for, so its ack is awaited only afterwards.
        record.queue_seq = Some(self.publish_job(&prepared).await?);
        events.flush().await?;
        // A worker that took it already has written a newer record: nothing to add then.
        let _ = self
            .cluster
            .jobs
            .update(&prepared.job_id, record.encode(), revision)
            .await;
        self.engine.signals().admission(
            prepared.workload,
            Decision::Admit,
            AdmissionReason::Capacity,
        );
        Ok(Submitted {
            job_id: prepared.job_id.clone(),
            queue_position: queued as usize + 1,
            estimate: prepared.estimate.clone(),
            workload: prepared.workload,
            trace_id: prepared.trace.trace_id.clone(),
            deduplicated: false,
        })
    }

    /// Claims an idempotency key for this job across every gateway (KV create is atomic);
    /// returns the first job when the key was claimed before.
    async fn claim_key(
        &self,
        key: &str,
        prepared: &mut PreparedSubmission,
    ) -> Result<Option<Submitted>> {
        let entry = idempotency_entry(key);
        let id = bytes::Bytes::from(prepared.job_id.clone());
        match self.cluster.jobs.create(&entry, id).await {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let first = self
                    .cluster
                    .jobs
                    .get(&entry)
                    .await
                    .map_err(|e| ClusterError::nats("reading an idempotency key", e))?
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                match self.record(&first).await {
                    Ok((record, _)) => Ok(Some(Submitted {
                        job_id: record.job_id.clone(),
                        queue_position: 0,
                        estimate: record.estimate.to_estimate(),
                        workload: record.workload,
                        trace_id: record.trace_id.clone(),
                        deduplicated: true,
                    })),
                    // Claimed by a gateway that stopped before recording the job: publish
                    // it under the first id (JetStream drops a duplicate publish).
                    Err(_) => {
                        prepared.job_id = first;
                        Ok(None)
                    }
                }
            }
            Err(e) => Err(ClusterError::nats("claiming an idempotency key", e)),
        }
    }

    /// The queue cap and deadline, judged with the fleet's counts and throughput; returns
    /// the jobs queued ahead.
    fn admit(&self, p: &PreparedSubmission) -> Result<u64> {
        let tunables = self.engine.tunables();
        let cap = tunables.admission.queue_caps.get(p.workload) as u64;
        let mut fleet = self.fleet.lock();
        let queued = fleet.queued(p.workload);
        let throughput = fleet.throughput();
        let drain = if throughput > 0.0 {
            Duration::from_secs_f64((queued as f64 / throughput).clamp(1.0, 300.0))
        } else {
            Duration::from_secs(5)
        };
        let deny = |reason, detail: String| {
            self.engine
                .signals()
                .admission(p.workload, Decision::Deny, reason);
            Err(ClusterError::Scheduler(SchedulerError::Denied {
                workload: p.workload,
                reason,
                detail,
                retry_after: drain,
            }))
        };
        if queued >= cap {
            return deny(
                AdmissionReason::QueueFull,
                format!(
                    "{queued} {} jobs wait in the cluster's queue, its cap is {cap}",
                    p.workload
                ),
            );
        }
        if let Some(deadline) = p.deadline {
            let ahead_s = if throughput > 0.0 {
                queued as f64 / throughput
            } else {
                0.0
            };
            let start = SystemTime::now() + Duration::from_secs_f64(ahead_s);
            if start > deadline {
                return deny(
                    AdmissionReason::Deadline,
                    format!(
                        "{queued} jobs ahead at the fleet's {throughput:.1} jobs/s start after the deadline"
                    ),
                );
            }
        }
        let i = p.workload.index();
        fleet.accepted_since[i] += 1;
        let reference = tunables.admission.reference_job_s;
        fleet.weight[i] = 0.9 * fleet.weight[i] + 0.1 * p.estimate.demand_weight(reference);
        fleet.expected_s[i] =
            0.9 * fleet.expected_s[i] + 0.1 * p.estimate.expected_duration.as_secs_f64();
        Ok(queued)
    }

    /// Publishes the job; returns its sequence in the work queue.
    async fn publish_job(&self, p: &PreparedSubmission) -> Result<u64> {
        let message = JobMessage::new(p);
        let payload = serde_json::to_vec(&message).map_err(|e| ClusterError::Record {
            job_id: p.job_id.clone(),
            reason: e.to_string(),
        })?;
        let mut headers = async_nats::HeaderMap::new();
        let msg_id = p.idempotency_key.as_deref().unwrap_or(&p.job_id);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let published = self
            .cluster
            .js
            .publish_with_headers(jobs_subject(p.workload), headers, payload.into())
            .await
            .map_err(|e| ClusterError::nats("publishing a job", e))?
            .await;
        match published {
            Ok(ack) => Ok(ack.sequence),
            Err(e) => {
                // The work queue's own limit (discard-new) is the hard stop behind the cap.
                let _ = self.cluster.jobs.delete(&p.job_id).await;
                if e.to_string().contains("maximum messages") {
                    return Err(ClusterError::Scheduler(SchedulerError::Denied {
                        workload: p.workload,
                        reason: AdmissionReason::QueueFull,
                        detail: "the cluster's work queue is at its limit".into(),
                        retry_after: Duration::from_secs(5),
                    }));
                }
                Err(ClusterError::nats("storing a job", e))
            }
        }
    }

    async fn record(&self, job_id: &str) -> Result<(JobRecord, u64)> {
        let entry = self
            .cluster
            .jobs
            .entry(job_id)
            .await
            .map_err(|e| ClusterError::nats("reading a job record", e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok((JobRecord::decode(job_id, &e.value)?, e.revision))
            }
            _ => Err(ClusterError::Scheduler(SchedulerError::JobNotFound {
                job_id: job_id.to_owned(),
            })),
        }
    }

    /// # Errors
    /// Unknown job; NATS unreachable.
    pub async fn get(&self, job_id: &str) -> Result<JobInfo> {
        self.require_connection()?;
        Ok(self.record(job_id).await?.0.to_info())
    }

    /// Cancels: a queued job ends now (its record says so and its watchers hear it), a
    /// running one is told through `sakuga.cancel.<job_id>` and ends on its worker.
    ///
    /// # Errors
    /// Unknown job; NATS unreachable.
    pub async fn cancel(&self, job_id: &str) -> Result<JobInfo> {
        self.require_connection()?;
        loop {
            let (mut record, revision) = self.record(job_id).await?;
            if record.state.is_final() {
                return Ok(record.to_info());
            }
            if record.state == RecordState::Running {
                self.cluster
                    .client
                    .publish(cancel_subject(job_id), bytes::Bytes::new())
                    .await
                    .map_err(|e| ClusterError::nats("sending a cancel", e))?;
                return Ok(record.to_info());
            }
            record.finish(
                RecordState::Cancelled,
                Some("cancelled by the client before it started".into()),
                None,
            );
            match self
                .cluster
                .jobs
                .update(job_id, record.encode(), revision)
                .await
            {
                Ok(_) => {
                    if let Some(seq) = record.queue_seq {
                        self.unqueue(seq, record.workload).await;
                    }
                    EventPublisher::new(&self.cluster, job_id)
                        .publish_final(&record)
                        .await?;
                    return Ok(record.to_info());
                }
                // A worker took it meanwhile: read again.
                Err(_) => continue,
            }
        }
    }

    /// Removes a cancelled job's message from the work queue; a worker that pulled it
    /// meanwhile finds the record cancelled and acks it.
    async fn unqueue(&self, seq: u64, workload: Workload) {
        if let Ok(stream) = self.cluster.js.get_stream(super::JOBS_STREAM).await
            && stream.delete_message(seq).await.is_ok()
        {
            // Until the next refresh reads the consumer again.
            let mut fleet = self.fleet.lock();
            let i = workload.index();
            if fleet.accepted_since[i] > 0 {
                fleet.accepted_since[i] -= 1;
            } else {
                fleet.pending[i] = fleet.pending[i].saturating_sub(1);
            }
        }
    }

    /// Lists job records, newest first.
    ///
    /// # Errors
    /// A bad page token; NATS unreachable.
    pub async fn list(
        &self,
        filter: ListFilter,
        page_size: usize,
        token: Option<String>,
    ) -> Result<JobPage> {
        self.require_connection()?;
        let mut keys: Vec<String> = self
            .cluster
            .jobs
            .keys()
            .await
            .map_err(|e| ClusterError::nats("listing job records", e))?
            .filter_map(|k| async move { k.ok() })
            .filter(|k| std::future::ready(!k.starts_with("idem.")))
            .collect()
            .await;
        // Job ids sort by time, so descending order is newest first.
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let start = token.map_or(0, |t| keys.partition_point(|k| k.as_str() >= t.as_str()));
        let mut jobs = Vec::new();
        let mut resume_tokens = Vec::new();
        let mut next = None;
        for key in &keys[start..] {
            if jobs.len() == page_size.max(1) {
                next = resume_tokens.last().cloned();
                break;
            }
            let Ok((record, _)) = self.record(key).await else {
                continue;
            };
            let info = record.to_info();
            if matches_filter(&info, &filter) {
                jobs.push(info);
                resume_tokens.push(key.clone());
            }
        }
        Ok(JobPage {
            jobs,
            next_page_token: next,
            resume_tokens,
        })
    }

    /// The job's events from the first, then live, to its final status.
    ///
    /// # Errors
    /// Unknown job; NATS unreachable.
    pub async fn watch(&self, job_id: &str) -> Result<ClusterWatch> {
        self.require_connection()?;
        let (record, _) = self.record(job_id).await?;
        ClusterWatch::open(&self.cluster, &record).await
    }

    /// An output's size and bytes from the object store; `name` is the Output event's
    /// path (the name under the job).
    ///
    /// # Errors
    /// No such output; NATS unreachable.
    pub async fn output(
        &self,
        job_id: &str,
        name: &str,
    ) -> Result<(u64, impl AsyncRead + Unpin + use<>)> {
        self.require_connection()?;
        let (record, _) = self.record(job_id).await?;
        let missing = || ClusterError::NoOutput {
            job_id: job_id.to_owned(),
            name: name.to_owned(),
        };
        let output = record
            .outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(missing)?;
        let object = self
            .cluster
            .outputs
            .get(format!("{job_id}/{}", output.name))
            .await
            .map_err(|_| missing())?;
        Ok((output.bytes, object))
    }

    /// Demand for autoscaling from the consumers' counts, weighted by recent estimates.
    pub fn demand(&self) -> Demand {
        let fleet = self.fleet.lock();
        let mut demand = Demand::default();
        for w in PULL_ORDER {
            let i = w.index();
            let queued = fleet.queued(w);
            let running = fleet.ack_pending[i];
            demand.queued_jobs += queued as usize;
            demand.running_jobs += running as usize;
            demand.queued_by_workload[i] = queued as usize;
            demand.weighted += (queued + running) as f64 * fleet.weight[i];
            demand.work_s += (queued + running) as f64 * fleet.expected_s[i];
        }
        demand
    }
}

fn matches_filter(info: &JobInfo, filter: &ListFilter) -> bool {
    filter.workload.is_none_or(|w| w == info.workload)
        && filter.state.is_none_or(|s| s == info.state)
        && filter
            .labels
            .iter()
            .all(|(k, v)| info.labels.get(k) == Some(v))
}

/// Every live worker's last heartbeat (expired ones are gone from the bucket).
///
/// # Errors
/// NATS unreachable.
pub async fn read_heartbeats(cluster: &Cluster) -> Result<Vec<Heartbeat>> {
    let keys: Vec<String> = cluster
        .workers
        .keys()
        .await
        .map_err(|e| ClusterError::nats("listing workers", e))?
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    let mut beats = Vec::with_capacity(keys.len());
    for key in keys {
        if let Ok(Some(bytes)) = cluster.workers.get(&key).await
            && let Ok(beat) = serde_json::from_slice::<Heartbeat>(&bytes)
        {
            beats.push(beat);
        }
    }
    beats.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    Ok(beats)
}
