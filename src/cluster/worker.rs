//! The worker's side of cluster mode: pull jobs it can admit, run them on the local
//! engine, relay their events, store their outputs and records, then ack.
//!
//! A worker pulls animation, then single_image, then batch, and only while it has room
//! (one job running and at most `prefetch` waiting locally), memory headroom, and, for
//! previews, no preview of its own playing and healthy FPS. While a job runs it sends
//! in-progress acks every third of `ack_wait`; a job it cannot take now goes back with a
//! delayed `nak`; one that can never run is `term`ed and recorded failed. Each worker
//! publishes a heartbeat to KV `sakuga_workers` (TTL) for the fleet view.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, AckKind, consumer};
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use sakuga_proto::v1;
use sakuga_scheduler::engine::{Assigned, JobEvent, JobInfo, SubmitRequest, TimedEvent, WatchItem};
use sakuga_scheduler::journal::RecordState;
use sakuga_scheduler::{EngineHandle, SchedulerError};
use sakuga_telemetry::{Decision, TraceContext, Window, Workload, events as stage};

use super::events::EventPublisher;
use super::record::{JobMessage, JobRecord, OutputRecord, at_unix_ms, unix_ms};
use super::{Cluster, ClusterError, PULL_ORDER, Result};
use crate::server::convert::{event_to_proto, frame_to_proto, skipped_to_proto};

/// A heartbeat older than this is gone from `sakuga_workers`: the worker is presumed dead.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Longest idle wait between pulls when no job was published meanwhile.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Completions counted for the worker's recent throughput.
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(60);
/// Below this FPS health (delivered over target), a worker takes no new previews.
const MIN_FPS_HEALTH: f64 = 0.9;

/// One worker's state in `sakuga_workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: String,
    pub device: String,
    pub hardware_class: String,
    pub memory_total_bytes: u64,
    pub memory_headroom_bytes: u64,
    pub utilization: f64,
    pub running_jobs: Vec<String>,
    pub jobs_finished: u64,
    pub jobs_per_second: f64,
    pub heartbeat_unix_ms: i64,
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    /// The local out dir, whose paths become object names under `<job_id>/`.
    pub out_dir: PathBuf,
    /// Jobs held locally besides the running one, so the device never waits on a pull.
    pub prefetch: usize,
}

struct WorkerState {
    cluster: Cluster,
    engine: EngineHandle,
    config: WorkerConfig,
    /// Jobs delivered to this worker and not yet acked, with their workloads.
    held: Mutex<Vec<(String, Workload)>>,
    finished: AtomicU64,
    recent: Mutex<VecDeque<Instant>>,
}

impl WorkerState {
    fn holds(&self, workload: Workload) -> bool {
        self.held.lock().iter().any(|(_, w)| *w == workload)
    }

    /// Whether this worker should take a job of `workload` now.
    fn can_take(&self, workload: Workload) -> bool {
        let signals = self.engine.signals();
        if !signals.headroom_ok() {
            return false;
        }
        if workload == Workload::Animation {
            let health = signals
                .golden(Workload::Animation, Window::TwoMinutes)
                .fps_health;
            return !self.holds(Workload::Animation) && health.is_none_or(|h| h >= MIN_FPS_HEALTH);
        }
        true
    }

    fn finished_one(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut recent = self.recent.lock();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > THROUGHPUT_WINDOW)
        {
            recent.pop_front();
        }
    }

    fn heartbeat(&self, started: Instant) -> Heartbeat {
        let device = self.engine.signals().latest_device();
        let window = started
            .elapsed()
            .min(THROUGHPUT_WINDOW)
            .as_secs_f64()
            .max(1.0);
        Heartbeat {
            worker_id: self.config.worker_id.clone(),
            device: device
                .as_ref()
                .map_or_else(|| "cpu".into(), |d| d.device.clone()),
            hardware_class: self.engine.hardware_class().to_owned(),
            memory_total_bytes: device.as_ref().map_or(0, |d| d.memory_total_bytes),
            memory_headroom_bytes: device.as_ref().map_or(0, |d| d.free_bytes()),
            utilization: device.as_ref().map_or(0.0, |d| d.utilization_ratio),
            running_jobs: self.held.lock().iter().map(|(id, _)| id.clone()).collect(),
            jobs_finished: self.finished.load(Ordering::Relaxed),
            jobs_per_second: self.recent.lock().len() as f64 / window,
            heartbeat_unix_ms: unix_ms(SystemTime::now()),
        }
    }
}

/// Pulls and runs jobs until `shutdown` turns true; jobs running then finish on their own
/// tasks (the engine's drain bounds them).
///
/// # Errors
/// NATS refused the subscriptions at start.
pub async fn run_worker(
    cluster: Cluster,
    engine: EngineHandle,
    config: WorkerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let state = Arc::new(WorkerState {
        cluster: cluster.clone(),
        engine,
        config,
        held: Mutex::new(Vec::new()),
        finished: AtomicU64::new(0),
        recent: Mutex::new(VecDeque::new()),
    });
    let mut consumers = Vec::new();
    for w in PULL_ORDER {
        consumers.push((w, cluster.consumer(w).await?));
    }
    // Every job published is also seen by plain subscribers: the wake-up for an idle worker.
    let mut published = cluster
        .client
        .subscribe("sakuga.jobs.>")
        .await
        .map_err(|e| ClusterError::nats("subscribing to new jobs", e))?;
    tokio::spawn(heartbeats(state.clone(), shutdown.clone()));
    tokio::spawn(cancels(state.clone()).await?);
    let slots = Arc::new(Semaphore::new(1 + state.config.prefetch));
    while !*shutdown.borrow() {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.wait_for(|s| *s) => break,
        };
        match pull_one(&state, &consumers).await {
            Some((message, job)) => {
                tokio::spawn(run_job(state.clone(), message, job, permit));
            }
            None => {
                drop(permit);
                tokio::select! {
                    _ = published.next() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
        }
    }
    let _ = state.cluster.workers.delete(&state.config.worker_id).await;
    Ok(())
}

/// The first job this worker can take, in pull order, counted as held before the next
/// pull looks at what is held.
async fn pull_one(
    state: &WorkerState,
    consumers: &[(Workload, consumer::PullConsumer)],
) -> Option<(jetstream::Message, JobMessage)> {
    for (workload, consumer) in consumers {
        if !state.can_take(*workload) {
            continue;
        }
        let batch = consumer.fetch().max_messages(1).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "pull failed");
                continue;
            }
        };
        if let Some(Ok(message)) = batch.next().await {
            match serde_json::from_slice::<JobMessage>(&message.payload) {
                Ok(job) => {
                    state.held.lock().push((job.job_id.clone(), job.workload));
                    return Some((message, job));
                }
                Err(e) => {
                    tracing::error!(error = %e, "a job message that is not a job; dropped");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
    }
    None
}

async fn heartbeats(state: Arc<WorkerState>, shutdown: watch::Receiver<bool>) {
    let started = Instant::now();
    while !*shutdown.borrow() {
        let beat = state.heartbeat(started);
        let bytes = serde_json::to_vec(&beat).unwrap_or_default();
        if let Err(e) = state
            .cluster
            .workers
            .put(&state.config.worker_id, bytes.into())
            .await
        {
            tracing::debug!(error = %e, "heartbeat not stored");
        }
        tokio::time::sleep(HEARTBEAT_EVERY).await;
    }
}

/// Subscribes to cancels; the returned task passes those for jobs held here to the engine.
async fn cancels(
    state: Arc<WorkerState>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut subscription = state
        .cluster
        .client
        .subscribe("sakuga.cancel.*")
        .await
        .map_err(|e| ClusterError::nats("subscribing to cancels", e))?;
    Ok(async move {
        while let Some(message) = subscription.next().await {
            let Some(job_id) = message.subject.as_str().strip_prefix("sakuga.cancel.") else {
                continue;
            };
            let held = state.held.lock().iter().any(|(id, _)| id == job_id);
            if held {
                let _ = state.engine.cancel(job_id).await;
            }
        }
    })
}

/// Runs one delivered job to its end; `_permit` holds its slot until then.
async fn run_job(
    state: Arc<WorkerState>,
    message: jetstream::Message,
    job: JobMessage,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let delivered = message.info().map_or(1, |i| i.delivered.max(1) as u32);
    let ack = match run_delivered(&state, &message, &job, delivered).await {
        Ok(ack) => ack,
        Err(e) => {
            // NATS went away mid-job: JetStream redelivers it after ack_wait.
            tracing::warn!(job_id = %job.job_id, error = %e, "job not settled");
            None
        }
    };
    if let Some(kind) = ack
        && let Err(e) = message.ack_with(kind).await
    {
        tracing::warn!(job_id = %job.job_id, error = %e, "ack not sent; the job may run again");
    }
    state.held.lock().retain(|(id, _)| id != &job.job_id);
}

/// Runs a delivered job; returns the ack to send (`None`: send none, let it redeliver).
async fn run_delivered(
    state: &WorkerState,
    message: &jetstream::Message,
    job: &JobMessage,
    delivered: u32,
) -> Result<Option<AckKind>> {
    let max_deliver = state.cluster.config.max_deliver;
    if delivered > max_deliver {
        lost_for_good(state, job, delivered - 1).await?;
        return Ok(Some(AckKind::Ack));
    }
    let record = match claim(state, job, delivered).await? {
        Claim::Run(record) => record,
        // Final already (cancelled while queued, or finished by an earlier delivery whose
        // worker may have died before announcing it).
        Claim::Final(record) => {
            EventPublisher::new(&state.cluster, &job.job_id)
                .publish_final(&record)
                .await?;
            return Ok(Some(AckKind::Ack));
        }
    };
    if delivered > 1 {
        sakuga_telemetry::record::cluster_redelivery(job.workload);
    }
    let progress = in_progress_acks(message, state.cluster.config.ack_wait);
    let result = run_locally(state, job, &record, delivered).await;
    progress.abort();
    result
}

/// Sends in-progress acks so JetStream knows the job is alive while it runs.
fn in_progress_acks(
    message: &jetstream::Message,
    ack_wait: Duration,
) -> tokio::task::JoinHandle<()> {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    let ack_subject = message.message.reply.clone();
    let client = message.context.client();
    tokio::spawn(async move {
        let Some(subject) = ack_subject else { return };
        loop {
            tokio::time::sleep(every).await;
            let _ = client.publish(subject.clone(), "+WPI".into()).await;
        }
    })
}

async fn run_locally(
    state: &WorkerState,
    job: &JobMessage,
    record: &JobRecord,
    delivered: u32,
) -> Result<Option<AckKind>> {
    let request = SubmitRequest {
        workflow: job.workflow.clone(),
        workload: Some(job.workload),
        priority: job.priority,
        deadline: job.deadline_unix_ms.map(at_unix_ms),
        labels: job.labels.clone(),
        trace: TraceContext::from_traceparent(&job.traceparent),
        assigned: Some(Assigned {
            job_id: job.job_id.clone(),
            earlier_attempts: delivered - 1,
            submitted_at: at_unix_ms(job.submitted_unix_ms),
        }),
        ..SubmitRequest::default()
    };
    match state.engine.submit(request).await {
        Ok(_) => {}
        Err(SchedulerError::Denied { retry_after, .. }) => {
            release(state, job).await?;
            return Ok(Some(AckKind::Nak(Some(retry_after))));
        }
        Err(SchedulerError::ShuttingDown) => {
            release(state, job).await?;
            return Ok(Some(AckKind::Nak(None)));
        }
        Err(e) => {
            // Fails the same way on every worker: never deliver it again.
            let mut failed = record.clone();
            failed.finish(
                RecordState::Failed,
                Some(e.to_string()),
                e.kind().map(|k| k.as_str()),
            );
            settle(state, &failed).await?;
            return Ok(Some(AckKind::Term));
        }
    }
    relay(state, job, &record.trace_id).await?;
    let info = match state.engine.get(&job.job_id).await {
        Ok(info) if info.state.is_final() => info,
        // This worker is stopping (drained, or interrupted past its drain timeout): the
        // job did not end here. Back to the queue for another worker, at once.
        _ => {
            release(state, job).await?;
            return Ok(Some(AckKind::Nak(None)));
        }
    };
    let outputs = store_outputs(state, &info).await?;
    let mut done = record.clone();
    done.outputs = outputs;
    done.finish(info.state, info.error.clone(), None);
    settle(state, &done).await?;
    state.finished_one();
    Ok(Some(AckKind::Ack))
}

/// Relays the local job's feed to `SAKUGA_EVENTS` until it ends (its final status is
/// published by [`settle`], once the record and outputs are stored).
async fn relay(state: &WorkerState, job: &JobMessage, trace_id: &str) -> Result<()> {
    let mut watch = state.engine.watch(&job.job_id).await?;
    let mut events = EventPublisher::new(&state.cluster, &job.job_id);
    while let Some(item) = watch.next().await {
        let event = match item {
            WatchItem::Event(e) => match &e.event {
                JobEvent::Finished { .. } => break,
                // The gateway published acceptance already.
                JobEvent::Stage { name, .. } if *name == stage::PROMPT_RECEIVED => continue,
                JobEvent::Admission { decision, .. } if *decision == Decision::Admit => continue,
                // Outputs are named by their path inside the out dir, as the object store
                // and GetOutput know them.
                JobEvent::Output {
                    node_id,
                    path,
                    kind,
                } => {
                    let named = TimedEvent {
                        event: JobEvent::Output {
                            node_id: node_id.clone(),
                            path: object_name(&state.config.out_dir, path).into(),
                            kind: kind.clone(),
                        },
                        ..(*e).clone()
                    };
                    event_to_proto(&named, trace_id)
                }
                _ => event_to_proto(&e, trace_id),
            },
            WatchItem::Frame(f) => {
                frame_to_proto(&f, v1::FrameEncoding::Rgb8, f.rgb8.as_ref().clone())
            }
            WatchItem::FramesDropped(n) => skipped_to_proto(n, 0),
            WatchItem::EventsSkipped(n) => skipped_to_proto(0, n),
        };
        events.publish(&event).await?;
    }
    events.flush().await
}

/// An output's name under its job: its path inside the out dir.
pub fn object_name(out_dir: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(out_dir).unwrap_or(path);
    let name = if relative.is_absolute() {
        Path::new(relative.file_name().unwrap_or_default())
    } else {
        relative
    };
    name.to_string_lossy().replace('\\', "/")
}

/// Copies the job's output files to the object store under `<job_id>/`.
async fn store_outputs(state: &WorkerState, info: &JobInfo) -> Result<Vec<OutputRecord>> {
    let mut stored = Vec::with_capacity(info.outputs.len());
    for output in &info.outputs {
        let name = object_name(&state.config.out_dir, &output.path);
        let io = |e: std::io::Error| ClusterError::Io {
            path: output.path.display().to_string(),
            reason: e.to_string(),
        };
        let mut file = tokio::fs::File::open(&output.path).await.map_err(io)?;
        let object = state
            .cluster
            .outputs
            .put(format!("{}/{name}", info.job_id).as_str(), &mut file)
            .await
            .map_err(|e| ClusterError::nats("storing an output", e))?;
        stored.push(OutputRecord {
            node_id: output.node_id.clone(),
            name,
            kind: output.kind.clone(),
            bytes: object.size as u64,
        });
    }
    Ok(stored)
}

enum Claim {
    Run(JobRecord),
    Final(JobRecord),
}

/// Marks the job running on this worker (compare-and-set on the record), unless the
/// record is final already.
async fn claim(state: &WorkerState, job: &JobMessage, delivered: u32) -> Result<Claim> {
    loop {
        let (mut record, revision) = read_record(state, job).await?;
        if record.state.is_final() {
            return Ok(Claim::Final(record));
        }
        record.state = RecordState::Running;
        record.attempts = delivered;
        record.worker = Some(state.config.worker_id.clone());
        record.started_unix_ms = Some(unix_ms(SystemTime::now()));
        if write_record(state, &record, revision).await? {
            return Ok(Claim::Run(record));
        }
    }
}

/// Puts a job this worker cannot take now back to queued.
async fn release(state: &WorkerState, job: &JobMessage) -> Result<()> {
    loop {
        let (mut record, revision) = read_record(state, job).await?;
        if record.state != RecordState::Running {
            return Ok(());
        }
        record.state = RecordState::Queued;
        record.worker = None;
        if write_record(state, &record, revision).await? {
            return Ok(());
        }
    }
}

/// Writes a final record (unless another delivery finished it first) and then the final
/// status event, so a watcher that sees the end finds the record and outputs in place.
async fn settle(state: &WorkerState, done: &JobRecord) -> Result<()> {
    let job_id = &done.job_id;
    loop {
        let entry = state
            .cluster
            .jobs
            .entry(job_id)
            .await
            .map_err(|e| ClusterError::nats("reading a job record", e))?;
        let revision = entry.as_ref().map_or(0, |e| e.revision);
        if let Some(e) = &entry
            && let Ok(current) = JobRecord::decode(job_id, &e.value)
            && current.state.is_final()
        {
            // Another delivery finished it first (this one outlived its ack_wait): drop
            // what this attempt stored under other names, so the job keeps one set.
            drop_orphans(state, done, &current).await;
            return Ok(());
        }
        if write_record(state, done, revision).await? {
            break;
        }
    }
    EventPublisher::new(&state.cluster, job_id)
        .publish_final(done)
        .await
}

async fn drop_orphans(state: &WorkerState, mine: &JobRecord, winner: &JobRecord) {
    for output in &mine.outputs {
        if !winner.outputs.iter().any(|o| o.name == output.name) {
            let name = format!("{}/{}", mine.job_id, output.name);
            if let Err(e) = state.cluster.outputs.delete(&name).await {
                tracing::warn!(object = %name, error = %e, "an orphaned output stays");
            }
        }
    }
}

/// The verdict delivery: every earlier attempt lost its worker.
async fn lost_for_good(state: &WorkerState, job: &JobMessage, attempts: u32) -> Result<()> {
    let (mut record, _) = read_record(state, job).await?;
    if record.state.is_final() {
        return EventPublisher::new(&state.cluster, &job.job_id)
            .publish_final(&record)
            .await;
    }
    record.attempts = attempts;
    record.finish(
        RecordState::Failed,
        Some(format!(
            "worker_lost: the job's worker was lost on each of its {attempts} attempts (max_deliver {attempts})"
        )),
        Some("worker_lost"),
    );
    sakuga_telemetry::record::cluster_worker_lost(job.workload);
    settle(state, &record).await
}

async fn read_record(state: &WorkerState, job: &JobMessage) -> Result<(JobRecord, u64)> {
    let entry = state
        .cluster
        .jobs
        .entry(&job.job_id)
        .await
        .map_err(|e| ClusterError::nats("reading a job record", e))?;
    match entry {
        Some(e) if e.operation == jetstream::kv::Operation::Put => {
            Ok((JobRecord::decode(&job.job_id, &e.value)?, e.revision))
        }
        // Expired from the bucket: rebuilt from the message.
        _ => Ok((JobRecord::from_message(job), 0)),
    }
}

/// Compare-and-set: `false` when someone else wrote the record since `revision`.
async fn write_record(state: &WorkerState, record: &JobRecord, revision: u64) -> Result<bool> {
    let jobs = &state.cluster.jobs;
    let written = if revision == 0 {
        jobs.create(&record.job_id, record.encode())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        jobs.update(&record.job_id, record.encode(), revision)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    match written {
        Ok(()) => Ok(true),
        Err(reason) if reason.contains("wrong last sequence") || reason.contains("exists") => {
            Ok(false)
        }
        Err(reason) => Err(ClusterError::Unavailable {
            what: "writing a job record",
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_paths_inside_the_out_dir() {
        let out = Path::new("/srv/out");
        assert_eq!(object_name(out, Path::new("/srv/out/a/b.png")), "a/b.png");
        assert_eq!(object_name(out, Path::new("/elsewhere/c.webp")), "c.webp");
        assert_eq!(object_name(out, Path::new("d.png")), "d.png");
    }
}
