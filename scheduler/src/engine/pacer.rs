//! The frame pacer: one named thread that emits paced stream frames at their target FPS,
//! so a `StreamFrames` node hands over its whole stream at once and the device worker is
//! free for the next job while the frames play out (a paced 10 s preview used to hold the
//! only device worker for 10 s).
//!
//! Each job whose frames go through the pacer gets a lane: its frames in order, then its
//! end. A frame leaves at its due time (the stream's first frame plus index over FPS),
//! through the job's telemetry observer, so the `produced` frame metrics and
//! `frame_emitted` events carry the paced emission times. The end runs once every frame
//! before it left, and reports the job finished. A cancelled job's lane drops its frames.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use sakuga_nodes::{CancelToken, JobSink, NodeRoles, OutputFile, StreamFrame};

use crate::error::SchedulerError;
use crate::executor::{ExecutionObserver, NodeRun};

/// Items waiting for the pacer thread; the device worker waits when it is full.
const PACER_CAPACITY: usize = 1024;
/// How long before a frame's due time the pacer stops sleeping and yields instead.
const SPIN_MARGIN: Duration = Duration::from_millis(3);
/// Longest the pacer sleeps with frames pending, so a cancel is seen promptly.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// Runs once a job's lane is empty; the flag says the job was cancelled meanwhile.
pub(crate) type OnDrained = Box<dyn FnOnce(bool) + Send>;

enum Item {
    Frame {
        node_id: Arc<str>,
        frame: StreamFrame,
        due: Instant,
    },
    End(OnDrained),
}

struct Message {
    lane: Arc<Lane>,
    item: Item,
}

/// One job's link to the pacer: where its frames go and what can cut them short.
pub(crate) struct Lane {
    job_id: Arc<str>,
    sink: Arc<dyn ExecutionObserver>,
    cancel: CancelToken,
    used: AtomicBool,
    /// The first frame's arrival per stream node: frame `i` is due `i / fps` after it.
    origins: Mutex<Vec<(Arc<str>, Instant)>>,
}

impl Lane {
    /// The job the lane belongs to.
    pub fn job_id(&self) -> String {
        self.job_id.to_string()
    }

    /// Whether any frame went to the pacer, so the job's end must wait for it.
    pub fn used(&self) -> bool {
        self.used.load(Ordering::Acquire)
    }

    fn due(&self, node_id: &str, frame: &StreamFrame) -> (Arc<str>, Instant) {
        let now = Instant::now();
        let mut origins = self.origins.lock();
        let (node, origin) = match origins.iter().find(|(n, _)| &**n == node_id) {
            Some((n, at)) => (n.clone(), *at),
            None => {
                let node: Arc<str> = Arc::from(node_id);
                origins.push((node.clone(), now));
                (node, now)
            }
        };
        if !frame.paced || frame.target_fps <= 0.0 {
            return (node, now);
        }
        let offset = Duration::from_secs_f64(frame.index as f64 / frame.target_fps);
        (node, origin + offset)
    }
}

/// Sends to the pacer thread. Cheap to clone.
#[derive(Clone)]
pub(crate) struct PacerHandle {
    tx: Sender<Message>,
}

/// Starts the pacer thread.
pub(crate) fn spawn_pacer() -> Result<(PacerHandle, JoinHandle<()>), SchedulerError> {
    let (tx, rx) = crossbeam_channel::bounded(PACER_CAPACITY);
    let thread = std::thread::Builder::new()
        .name("sakuga-pacer".into())
        .spawn(move || pacer_worker(rx))
        .map_err(|e| SchedulerError::Journal {
            path: Default::default(),
            reason: format!("spawning the pacer thread: {e}"),
        })?;
    Ok((PacerHandle { tx }, thread))
}

impl PacerHandle {
    /// A lane for one job whose frames go to `sink` (its telemetry observer).
    pub fn lane(
        &self,
        job_id: Arc<str>,
        sink: Arc<dyn ExecutionObserver>,
        cancel: CancelToken,
    ) -> Arc<Lane> {
        Arc::new(Lane {
            job_id,
            sink,
            cancel,
            used: AtomicBool::new(false),
            origins: Mutex::new(Vec::new()),
        })
    }

    /// Runs `on_drained` once every frame of `lane` has left (or was dropped by a cancel).
    /// Runs it here and now when the pacer thread is gone.
    pub fn end(&self, lane: Arc<Lane>, on_drained: OnDrained) {
        let message = Message {
            lane,
            item: Item::End(on_drained),
        };
        if let Err(failed) = self.tx.send(message)
            && let Item::End(on_drained) = failed.0.item
        {
            on_drained(false);
        }
    }
}

/// The job observer the executor sees: frames go to the pacer, everything else straight
/// through to the telemetry observer.
pub(crate) struct PacedObserver {
    pacer: PacerHandle,
    lane: Arc<Lane>,
}

impl PacedObserver {
    pub fn new(pacer: PacerHandle, lane: Arc<Lane>) -> Self {
        Self { pacer, lane }
    }
}

impl JobSink for PacedObserver {
    fn progress(&self, node_id: &str, step: u64, steps: u64) {
        self.lane.sink.progress(node_id, step, steps);
    }

    fn frame(&self, node_id: &str, frame: StreamFrame) {
        let (node_id, due) = self.lane.due(node_id, &frame);
        self.lane.used.store(true, Ordering::Release);
        let message = Message {
            lane: self.lane.clone(),
            item: Item::Frame {
                node_id,
                frame,
                due,
            },
        };
        if let Err(failed) = self.pacer.tx.send(message)
            && let Item::Frame { node_id, frame, .. } = failed.0.item
        {
            // No pacer (shutting down): deliver now rather than lose the frame.
            self.lane.sink.frame(&node_id, frame);
        }
    }

    fn output(&self, node_id: &str, file: OutputFile) {
        self.lane.sink.output(node_id, file);
    }

    fn text(&self, node_id: &str, text: &str) {
        self.lane.sink.text(node_id, text);
    }

    fn paces_frames(&self) -> bool {
        true
    }
}

impl ExecutionObserver for PacedObserver {
    fn node_started(&self, node_id: &str, class_type: &str, roles: NodeRoles) {
        self.lane.sink.node_started(node_id, class_type, roles);
    }

    fn node_finished(&self, run: &NodeRun) {
        self.lane.sink.node_finished(run);
    }
}

struct Pending {
    lane: Arc<Lane>,
    items: VecDeque<Item>,
}

impl Pending {
    /// Emits what is due; returns when the next frame is due, or `None` once empty.
    fn emit_due(&mut self) -> Option<Instant> {
        loop {
            let cancelled = self.lane.cancel.is_cancelled();
            if cancelled {
                self.items.retain(|i| matches!(i, Item::End(_)));
            }
            match self.items.front()? {
                Item::Frame { due, .. } if *due > Instant::now() => return Some(*due),
                _ => {}
            }
            match self.items.pop_front()? {
                Item::Frame { node_id, frame, .. } => self.lane.sink.frame(&node_id, frame),
                Item::End(on_drained) => on_drained(cancelled),
            }
        }
    }
}

fn pacer_worker(rx: Receiver<Message>) {
    let mut lanes: Vec<Pending> = Vec::new();
    let mut open = true;
    while open || !lanes.is_empty() {
        let next = lanes.iter_mut().filter_map(Pending::emit_due).min();
        lanes.retain(|p| !p.items.is_empty());
        // A thread woken from sleep runs up to a few ms late on a busy machine, and a
        // frame more than 2% (0.8 ms at 24 FPS) late counts against the FPS SLO: sleep to
        // just before the due time, then yield until it.
        if let Some(due) = next
            && due.saturating_duration_since(Instant::now()) <= SPIN_MARGIN
        {
            while Instant::now() < due {
                std::thread::yield_now();
            }
            continue;
        }
        let wait = next.map(|due| {
            due.saturating_duration_since(Instant::now())
                .saturating_sub(SPIN_MARGIN)
                .min(CANCEL_POLL)
        });
        let first = match (open, wait) {
            (true, None) => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (true, Some(wait)) => rx.recv_timeout(wait),
            (false, wait) => {
                std::thread::sleep(wait.unwrap_or_default());
                Err(RecvTimeoutError::Disconnected)
            }
        };
        if matches!(first, Err(RecvTimeoutError::Disconnected)) {
            open = false;
        }
        // Take everything already sent, so a whole stream lands in one pass.
        let arrived = first
            .ok()
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()));
        for message in arrived {
            match lanes
                .iter_mut()
                .find(|p| Arc::ptr_eq(&p.lane, &message.lane))
            {
                Some(pending) => pending.items.push_back(message.item),
                None => lanes.push(Pending {
                    lane: message.lane,
                    items: VecDeque::from([message.item]),
                }),
            }
        }
    }
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}
