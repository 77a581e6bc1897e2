//! Cluster mode on NATS JetStream (DESIGN.md section 11): gateways (`serve --nats`) accept
//! jobs and answer for every job; workers (`worker --nats`) pull jobs they can admit and
//! run them on their own engine. All shared state lives in JetStream, nothing home-made:
//!
//! - `SAKUGA_JOBS` (work queue, `sakuga.jobs.<workload>`), one durable pull consumer per
//!   workload shared by all workers ([`gateway`] publishes, [`worker`] pulls);
//! - KV `sakuga_jobs` (job records, [`record`]) and `sakuga_workers` (heartbeats, TTL);
//! - `SAKUGA_EVENTS` (`sakuga.events.<job_id>`: each job's Watch feed, [`events`]);
//! - object store `sakuga_outputs` (`<job_id>/<file>`).
//!
//! Execution is at least once: a lost worker's job is redelivered after `ack_wait`. Its
//! effects are keyed by job id (records, events subject, output objects), so a rerun
//! overwrites and never duplicates. The consumers deliver each job `max_deliver + 1`
//! times at most: the extra delivery is the verdict, where the worker that receives it
//! fails the job with reason `worker_lost` instead of running it a fourth time, so no job
//! is ever left behind silently.

pub mod events;
pub mod gateway;
pub mod record;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use tokio::sync::watch;

use sakuga_telemetry::Workload;

pub use gateway::Gateway;
pub use worker::{WorkerConfig, run_worker};

pub const JOBS_STREAM: &str = "SAKUGA_JOBS";
pub const EVENTS_STREAM: &str = "SAKUGA_EVENTS";
pub const JOBS_BUCKET: &str = "sakuga_jobs";
pub const WORKERS_BUCKET: &str = "sakuga_workers";
pub const OUTPUTS_BUCKET: &str = "sakuga_outputs";

/// The order workers pull in: previews first, batches last.
pub const PULL_ORDER: [Workload; 3] = [Workload::Animation, Workload::SingleImage, Workload::Batch];

pub fn jobs_subject(workload: Workload) -> String {
    format!("sakuga.jobs.{}", workload.as_str())
}

pub fn consumer_name(workload: Workload) -> String {
    format!("sakuga-workers-{}", workload.as_str())
}

pub fn events_subject(job_id: &str) -> String {
    format!("sakuga.events.{job_id}")
}

pub fn cancel_subject(job_id: &str) -> String {
    format!("sakuga.cancel.{job_id}")
}

/// How to reach NATS and how the cluster's streams are shaped.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `nats://host:4222` (several separated by commas).
    pub url: String,
    /// A NATS credentials file (JWT + nkey seed).
    pub creds: Option<PathBuf>,
    /// A CA certificate to verify the server's TLS certificate (turns TLS on).
    pub tls_ca: Option<PathBuf>,
    /// Stream and bucket replicas (1 for a single nats-server, 3 for a cluster).
    pub replicas: usize,
    /// How long a delivered job may go without an ack or in-progress ack before JetStream
    /// hands it to another worker.
    pub ack_wait: Duration,
    /// Deliveries of one job before it fails with `worker_lost`.
    pub max_deliver: u32,
    /// Hard stop behind the gateways' queue caps: the work queue's size, per workload
    /// (past it, publishing is refused: discard-new).
    pub queue_caps: [usize; 3],
    /// How long job records, events and outputs are kept.
    pub retention: Duration,
}

impl ClusterConfig {
    /// Defaults for `url`: 30 s ack wait, 3 deliveries, one replica.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            creds: None,
            tls_ca: None,
            replicas: 1,
            ack_wait: Duration::from_secs(30),
            max_deliver: 3,
            queue_caps: [64, 1024, 4096],
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// What cluster mode can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("connecting to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("NATS is unreachable ({what}): {reason}")]
    Unavailable { what: &'static str, reason: String },
    #[error("{0}")]
    Scheduler(#[from] sakuga_scheduler::SchedulerError),
    #[error("no output {name:?} of job {job_id}")]
    NoOutput { job_id: String, name: String },
    #[error("job record {job_id}: {reason}")]
    Record { job_id: String, reason: String },
    #[error("reading {path}: {reason}")]
    Io { path: String, reason: String },
}

impl ClusterError {
    /// A NATS request that failed, most often because the server is unreachable.
    pub fn nats(what: &'static str, e: impl std::fmt::Display) -> Self {
        ClusterError::Unavailable {
            what,
            reason: e.to_string(),
        }
    }
}

/// `map_err` for a NATS call that failed while doing `what`.
pub fn failed<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ClusterError {
    move |e| ClusterError::nats(what, e)
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// A connection to the cluster's NATS with its streams and buckets in place.
#[derive(Clone)]
pub struct Cluster {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub jobs: kv::Store,
    pub workers: kv::Store,
    pub outputs: object_store::ObjectStore,
    pub config: ClusterConfig,
    /// Whether the connection is up now (it reconnects by itself, with backoff).
    pub connected: watch::Receiver<bool>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.config.url)
            .field("connected", &*self.connected.borrow())
            .finish_non_exhaustive()
    }
}

/// Backoff between reconnect attempts: 100 ms doubling to 5 s.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.min(6) as u32;
    Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(5))
}

impl Cluster {
    /// Connects (retrying in the background until NATS answers) and creates or updates
    /// the streams, consumers and buckets.
    ///
    /// # Errors
    /// Bad credentials or TLS files, or NATS refusing the streams' configuration.
    pub async fn connect(config: ClusterConfig) -> Result<Self> {
        let (tx, connected) = watch::channel(false);
        let mut options = async_nats::ConnectOptions::new()
            .name("sakuga")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            let _ = tx.send(true);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("lost the NATS connection; reconnecting");
                            let _ = tx.send(false);
                        }
                        other => tracing::info!(event = %other, "NATS"),
                    }
                }
            });
        let connect_error = |reason: String| ClusterError::Connect {
            url: config.url.clone(),
            reason,
        };
        if let Some(creds) = &config.creds {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| connect_error(format!("credentials {}: {e}", creds.display())))?;
        }
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options
            .connect(config.url.as_str())
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let (jobs, workers, outputs) = ensure_layout(&js, &config).await?;
        Ok(Self {
            client,
            js,
            jobs,
            workers,
            outputs,
            config,
            connected,
        })
    }

    /// Connects, retrying the stream set-up until NATS answers (processes of a fleet start
    /// in any order).
    ///
    /// # Errors
    /// Only for errors retrying cannot fix (bad files).
    pub async fn connect_patiently(config: ClusterConfig) -> Result<Self> {
        let mut attempt = 0;
        loop {
            match Self::connect(config.clone()).await {
                Err(e @ ClusterError::Unavailable { .. }) => {
                    attempt += 1;
                    let delay = reconnect_delay(attempt);
                    tracing::warn!(error = %e, ?delay, "NATS not ready; trying again");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// The durable consumer of `workload`'s jobs.
    ///
    /// # Errors
    /// NATS unreachable.
    pub async fn consumer(&self, workload: Workload) -> Result<consumer::PullConsumer> {
        self.js
            .get_consumer_from_stream(consumer_name(workload), JOBS_STREAM)
            .await
            .map_err(|e| ClusterError::nats("looking up a jobs consumer", e))
    }
}

/// Creates or updates everything the cluster uses; idempotent, so every process runs it.
async fn ensure_layout(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<(kv::Store, kv::Store, object_store::ObjectStore)> {
    ensure_work_queue(js, config).await?;
    let events = stream::Config {
        name: EVENTS_STREAM.into(),
        subjects: vec!["sakuga.events.>".into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        discard: stream::DiscardPolicy::Old,
        max_age: config.retention,
        max_bytes: 1 << 30,
        ..Default::default()
    };
    upsert_stream(js, events).await?;
    ensure_buckets(js, config).await
}

/// `SAKUGA_JOBS` and its consumers, one per workload.
async fn ensure_work_queue(js: &jetstream::Context, config: &ClusterConfig) -> Result<()> {
    let jobs_stream = stream::Config {
        name: JOBS_STREAM.into(),
        subjects: vec!["sakuga.jobs.*".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        discard: stream::DiscardPolicy::New,
        max_messages: config.queue_caps.iter().sum::<usize>() as i64,
        max_messages_per_subject: *config.queue_caps.iter().max().unwrap_or(&4096) as i64,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let stream = upsert_stream(js, jobs_stream).await?;
    for workload in PULL_ORDER {
        let name = consumer_name(workload);
        let consumer = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: jobs_subject(workload),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            // The extra delivery is the verdict (module docs): `worker_lost`, not a rerun.
            max_deliver: i64::from(config.max_deliver) + 1,
            max_ack_pending: 100_000,
            ..Default::default()
        };
        match stream.get_consumer::<consumer::pull::Config>(&name).await {
            Ok(_) => {
                stream
                    .update_consumer(consumer)
                    .await
                    .map_err(failed("updating a jobs consumer"))?;
            }
            Err(_) => {
                stream
                    .create_consumer(consumer)
                    .await
                    .map_err(failed("creating a jobs consumer"))?;
            }
        }
    }
    Ok(())
}

/// The job records, heartbeats and outputs buckets.
async fn ensure_buckets(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<(kv::Store, kv::Store, object_store::ObjectStore)> {
    let jobs = js
        .create_key_value(kv::Config {
            bucket: JOBS_BUCKET.into(),
            history: 1,
            max_age: config.retention,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(failed("creating the job records bucket"))?;
    let workers = js
        .create_key_value(kv::Config {
            bucket: WORKERS_BUCKET.into(),
            history: 1,
            max_age: worker::HEARTBEAT_TTL,
            storage: stream::StorageType::Memory,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(failed("creating the worker heartbeat bucket"))?;
    let outputs = js
        .create_object_store(object_store::Config {
            bucket: OUTPUTS_BUCKET.into(),
            max_age: config.retention,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(failed("creating the outputs object store"))?;
    Ok((jobs, workers, outputs))
}

async fn upsert_stream(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream> {
    match js.get_stream(&config.name).await {
        Ok(_) => {
            js.update_stream(&config)
                .await
                .map_err(|e| ClusterError::nats("updating a stream", e))?;
            js.get_stream(&config.name)
                .await
                .map_err(|e| ClusterError::nats("reading a stream", e))
        }
        Err(_) => js
            .create_stream(config)
            .await
            .map_err(|e| ClusterError::nats("creating a stream", e)),
    }
}
