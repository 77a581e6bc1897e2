//! The device worker: one named thread that owns the [`Executor`] (and through it the
//! device's caches) and runs one plan at a time, reporting each job's end back to the
//! queue worker. It starts with a readiness handshake so the engine only reports ready
//! once the executor exists. Also the observer that turns execution into feed items.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use sakuga_nodes::{JobSink, NodeEnv, NodeRoles, OutputFile, StreamFrame};
use sakuga_telemetry::{Stage, events};

use crate::engine::feed::{JobEvent, JobFeed};
use crate::engine::pacer::{Lane, PacerHandle};
use crate::engine::{Command, JobOutput};
use crate::error::SchedulerError;
use crate::executor::{ExecutionObserver, Executor, ExecutorConfig, JobReport, JobRun, NodeRun};
use crate::plan::ExecutionPlan;

/// A job handed to the device worker.
pub(crate) struct DeviceJob {
    pub job_id: String,
    /// Images in the job's largest batch (from its estimate).
    pub batch: usize,
    pub plan: ExecutionPlan,
    pub run: JobRun,
    pub span: tracing::Span,
    pub observer: Arc<FeedObserver>,
    /// The job's lane in the pacer: when frames went there, the job ends after them.
    pub lane: Arc<Lane>,
}

/// A job's end, reported to the queue worker.
pub(crate) struct Finished {
    pub job_id: String,
    pub result: Result<JobReport, SchedulerError>,
    pub elapsed: Duration,
    pub outputs: Vec<JobOutput>,
    pub frames: u64,
}

pub(crate) struct DeviceWorker {
    pub jobs: Sender<DeviceJob>,
    pub thread: JoinHandle<()>,
}

/// Spawns the device worker and waits until its executor is built.
pub(crate) fn spawn_device_worker(
    env: Arc<NodeEnv>,
    config: ExecutorConfig,
    done: Sender<Command>,
    pacer: PacerHandle,
) -> Result<DeviceWorker, SchedulerError> {
    // Capacity 1: the queue worker hands over a job only when the device is idle.
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<DeviceJob>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("sakuga-device-cpu".into())
        .spawn(move || {
            let executor = Executor::new(env, config);
            let _ = ready_tx.send(());
            device_worker(executor, jobs_rx, done, pacer);
        })
        .map_err(|e| SchedulerError::Journal {
            path: Default::default(),
            reason: format!("spawning the device thread: {e}"),
        })?;
    ready_rx.recv().map_err(|_| SchedulerError::ShuttingDown)?;
    Ok(DeviceWorker {
        jobs: jobs_tx,
        thread,
    })
}

fn device_worker(
    executor: Executor,
    jobs: Receiver<DeviceJob>,
    done: Sender<Command>,
    pacer: PacerHandle,
) {
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let result = run_job(&executor, &job, &done);
        let elapsed = started.elapsed();
        let DeviceJob {
            job_id,
            observer,
            lane,
            ..
        } = job;
        let finish = move |result| {
            Command::Finished(Box::new(Finished {
                job_id,
                result,
                elapsed,
                outputs: std::mem::take(&mut *observer.outputs.lock()),
                frames: observer.frames.load(Ordering::Relaxed),
            }))
        };
        if !lane.used() {
            if done.send(finish(result)).is_err() {
                break;
            }
            continue;
        }
        // The device is free now; the job ends once its frames have played out.
        if done.send(Command::DeviceFree(lane.job_id())).is_err() {
            break;
        }
        let done = done.clone();
        pacer.end(
            lane,
            Box::new(move |cancelled| {
                let result = match result {
                    Ok(_) if cancelled => Err(SchedulerError::Cancelled {
                        node_id: None,
                        elapsed,
                    }),
                    other => other,
                };
                let _ = done.send(finish(result));
            }),
        );
    }
}

/// Runs the job's plan; an out-of-memory error with a batch splits it and retries once
/// (DESIGN.md section 7), telling the queue worker first so the retry is on record.
fn run_job(
    executor: &Executor,
    job: &DeviceJob,
    queue: &Sender<Command>,
) -> Result<JobReport, SchedulerError> {
    let _entered = job.span.enter();
    match executor.run(&job.plan, &job.run) {
        Err(e) if e.is_oom() && job.batch > 1 => {
            // Nodes that finished before the OOM come from the output cache; the
            // rest run again at most half the batch at a time.
            let limit = job.batch.div_ceil(2);
            let _ = queue.send(Command::Retried {
                job_id: job.job_id.clone(),
                batch_limit: limit,
                error: e.to_string(),
            });
            let retry = JobRun {
                batch_limit: Some(limit),
                ..job.run.clone()
            };
            executor.run(&job.plan, &retry)
        }
        other => other,
    }
}

/// Publishes a running job into its feed: node and stage events, progress, frames (as
/// RGB8), outputs. Wrapped by the telemetry observer, which records the metrics.
pub(crate) struct FeedObserver {
    pub feed: Arc<JobFeed>,
    pub outputs: Mutex<Vec<JobOutput>>,
    pub frames: std::sync::atomic::AtomicU64,
    inference_started: AtomicBool,
}

impl FeedObserver {
    pub fn new(feed: Arc<JobFeed>) -> Self {
        Self {
            feed,
            outputs: Mutex::new(Vec::new()),
            frames: std::sync::atomic::AtomicU64::new(0),
            inference_started: AtomicBool::new(false),
        }
    }

    fn stage(&self, name: &'static str, detail: String) {
        self.feed.push(JobEvent::Stage { name, detail });
    }
}

impl JobSink for FeedObserver {
    fn progress(&self, node_id: &str, step: u64, steps: u64) {
        self.feed.push(JobEvent::Progress {
            node_id: node_id.to_owned(),
            step,
            steps,
        });
    }

    fn frame(&self, node_id: &str, frame: StreamFrame) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        match frame_rgb8(&frame) {
            Ok((width, height, rgb8)) => {
                self.feed
                    .push_frame(node_id, frame.index, width, height, rgb8, frame.target_fps);
            }
            Err(e) => tracing::warn!(node_id, error = %e, "a frame could not be converted to RGB8"),
        }
    }

    fn output(&self, node_id: &str, file: OutputFile) {
        let output = JobOutput {
            node_id: node_id.to_owned(),
            path: file.path.clone(),
            kind: file.kind.to_owned(),
        };
        self.outputs.lock().push(output);
        self.feed.push(JobEvent::Output {
            node_id: node_id.to_owned(),
            path: file.path,
            kind: file.kind.to_owned(),
        });
    }

    fn text(&self, node_id: &str, text: &str) {
        self.feed.push(JobEvent::Text {
            node_id: node_id.to_owned(),
            text: text.to_owned(),
        });
    }
}

impl ExecutionObserver for FeedObserver {
    fn node_started(&self, node_id: &str, class_type: &str, roles: NodeRoles) {
        if roles.stage == Some(Stage::Inference)
            && !self.inference_started.swap(true, Ordering::Relaxed)
        {
            self.stage(
                events::INFERENCE_STARTED,
                format!("node {node_id} ({class_type})"),
            );
        }
        self.feed.push(JobEvent::NodeStarted {
            node_id: node_id.to_owned(),
            class_type: class_type.to_owned(),
        });
    }

    fn node_finished(&self, run: &NodeRun) {
        self.feed.push(JobEvent::NodeFinished {
            node_id: run.node_id.to_string(),
            class_type: run.class_type.to_owned(),
            duration: run.duration,
            cached: run.cached,
        });
        let detail = format!(
            "node {} ({}) in {:.3}s",
            run.node_id,
            run.class_type,
            run.duration.as_secs_f64()
        );
        match run.roles.stage {
            Some(Stage::ModelLoad) => self.stage(events::MODEL_LOADED, detail),
            Some(Stage::Inference) if run.roles.ends_inference => {
                self.stage(events::INFERENCE_FINISHED, detail)
            }
            Some(Stage::Postprocess) => self.stage(events::POSTPROCESS_DONE, detail),
            _ => {}
        }
    }
}

/// `(height, width, channels)` f32 in `[0, 1]` to 8-bit RGB.
fn frame_rgb8(frame: &StreamFrame) -> Result<(u32, u32, Vec<u8>), sakuga_nodes::NodeError> {
    let batch = frame.image.unsqueeze(0)?;
    let pixels = sakuga_nodes::image::to_pixels(&batch)?
        .pop()
        .ok_or_else(|| sakuga_nodes::NodeError::InvalidInput("an empty frame".into()))?;
    let rgb8 = match pixels.channels {
        3 => pixels.data,
        1 => pixels.data.iter().flat_map(|&v| [v, v, v]).collect(),
        _ => pixels
            .data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
    };
    Ok((pixels.width, pixels.height, rgb8))
}
