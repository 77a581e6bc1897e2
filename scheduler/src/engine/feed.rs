//! A job's feed: what `Watch` streams. Stage events, admission decisions, node progress,
//! outputs and the final status go into a bounded ring of events; frames go into a short
//! ring of their own. Watchers pull with a cursor, so one feed serves any number of them,
//! a late watcher replays what the rings still hold, and a slow watcher skips frames that
//! fell out of the ring instead of growing server memory. Skips are counted as dropped
//! frames on the job's [`FrameStream`]; frames handed to the watcher count as delivered.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use sakuga_telemetry::{AdmissionReason, Decision, FrameStream};

use crate::journal::RecordState;

/// Sizes of a feed's rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FeedConfig {
    /// Events kept per job (a late watcher replays at most this many).
    pub max_events: usize,
    /// Frames kept per job; a watcher further behind than this skips (drops) frames.
    pub frame_ring: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            max_events: 1024,
            frame_ring: 8,
        }
    }
}

/// Something that happened to a job, as `Watch` shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A stage event of DESIGN.md section 2 (`prompt_received`, `inference_started`...).
    Stage {
        name: &'static str,
        detail: String,
    },
    /// Admission control decided; deferrals appear once per reason.
    Admission {
        decision: Decision,
        reason: AdmissionReason,
        detail: String,
    },
    NodeStarted {
        node_id: String,
        class_type: String,
    },
    NodeFinished {
        node_id: String,
        class_type: String,
        duration: Duration,
        cached: bool,
    },
    /// Step `step` of `steps` inside a node.
    Progress {
        node_id: String,
        step: u64,
        steps: u64,
    },
    /// A file the job wrote (`kind` is `output` or `temp`).
    Output {
        node_id: String,
        path: PathBuf,
        kind: String,
    },
    /// Text a node shows (`PreviewAny`).
    Text {
        node_id: String,
        text: String,
    },
    /// The job reached its final state; always the last event.
    Finished {
        state: RecordState,
        error: Option<String>,
    },
}

/// An event with its wall-clock time and its position in the job's feed.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedEvent {
    pub seq: u64,
    pub at: SystemTime,
    pub event: JobEvent,
}

/// One frame of a `StreamFrames` node, as 8-bit RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub seq: u64,
    pub node_id: String,
    /// Position in the node's stream.
    pub index: u64,
    pub width: u32,
    pub height: u32,
    /// `width * height * 3` bytes, row-major.
    pub rgb8: Arc<Vec<u8>>,
    pub target_fps: f64,
    pub produced_at: SystemTime,
}

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    Event(Arc<TimedEvent>),
    Frame(Arc<Frame>),
    /// This many frames fell out of the ring before this watcher took them.
    FramesDropped(u64),
    /// This many events fell out of the event ring before this watcher took them.
    EventsSkipped(u64),
}

#[derive(Debug, Default)]
struct FeedState {
    events: VecDeque<Arc<TimedEvent>>,
    /// Events ever pushed (the seq of the next is `next_seq`; events and frames share it).
    events_pushed: u64,
    frames: VecDeque<Arc<Frame>>,
    frames_pushed: u64,
    next_seq: u64,
    finished: bool,
    /// A watcher is metering delivery for the stream.
    metered: bool,
    /// Frames clients reported as displayed or dropped so far (never over `frames_pushed`).
    frames_reported: u64,
}

/// The feed of one job. See the module docs.
#[derive(Debug)]
pub struct JobFeed {
    config: FeedConfig,
    trace_id: String,
    state: Mutex<FeedState>,
    wake_async: tokio::sync::Notify,
    wake_blocking: Condvar,
    stream: OnceLock<FrameStream>,
}

impl JobFeed {
    /// An empty feed.
    pub fn new(config: FeedConfig) -> Self {
        Self::for_job(config, String::new())
    }

    /// An empty feed for a job in trace `trace_id`, so watchers need not look the job up.
    pub fn for_job(config: FeedConfig, trace_id: String) -> Self {
        Self {
            config,
            trace_id,
            state: Mutex::new(FeedState::default()),
            wake_async: tokio::sync::Notify::new(),
            wake_blocking: Condvar::new(),
            stream: OnceLock::new(),
        }
    }

    /// Attaches the job's frame stream (once, when the job starts) for delivery metering.
    pub fn set_stream(&self, stream: FrameStream) {
        let _ = self.stream.set(stream);
    }

    /// The job's frame stream, once it started one.
    pub fn stream(&self) -> Option<&FrameStream> {
        self.stream.get()
    }

    /// The job ended: its frame stream no longer counts as running.
    pub fn end_stream(&self) {
        if let Some(stream) = self.stream.get() {
            stream.end();
        }
    }

    fn wake(&self) {
        self.wake_async.notify_waiters();
        self.wake_blocking.notify_all();
    }

    /// Appends an event; `Finished` closes the feed.
    pub fn push(&self, event: JobEvent) {
        let mut state = self.state.lock();
        if state.finished {
            return;
        }
        state.finished = matches!(event, JobEvent::Finished { .. });
        let seq = state.next_seq;
        state.next_seq += 1;
        state.events_pushed += 1;
        state.events.push_back(Arc::new(TimedEvent {
            seq,
            at: SystemTime::now(),
            event,
        }));
        if state.events.len() > self.config.max_events {
            state.events.pop_front();
        }
        drop(state);
        self.wake();
    }

    /// Appends a frame; the oldest falls out when the ring is full.
    pub fn push_frame(
        &self,
        node_id: &str,
        index: u64,
        width: u32,
        height: u32,
        rgb8: Vec<u8>,
        target_fps: f64,
    ) {
        let mut state = self.state.lock();
        if state.finished {
            return;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.frames_pushed += 1;
        state.frames.push_back(Arc::new(Frame {
            seq,
            node_id: node_id.to_owned(),
            index,
            width,
            height,
            rgb8: Arc::new(rgb8),
            target_fps,
            produced_at: SystemTime::now(),
        }));
        if state.frames.len() > self.config.frame_ring.max(1) {
            state.frames.pop_front();
        }
        drop(state);
        self.wake();
    }

    /// Bounds a client's playback report (`displayed`, `dropped`) by the frames this job
    /// produced and not yet reported: a client cannot claim more frames than the stream
    /// made, nor count one twice over repeated reports. Returns what may be counted.
    pub fn claim_playback(&self, displayed: u64, dropped: u64) -> (u64, u64) {
        let mut state = self.state.lock();
        let left = state.frames_pushed.saturating_sub(state.frames_reported);
        let displayed = displayed.min(left);
        let dropped = dropped.min(left - displayed);
        state.frames_reported += displayed + dropped;
        (displayed, dropped)
    }

    /// Drops the frames kept for replay (finished jobs past the retention count).
    pub fn release_frames(&self) {
        self.state.lock().frames.clear();
    }

    /// Whether the final event was pushed.
    pub fn is_finished(&self) -> bool {
        self.state.lock().finished
    }

    /// Events the ring still holds, oldest first.
    pub fn events(&self) -> Vec<Arc<TimedEvent>> {
        self.state.lock().events.iter().cloned().collect()
    }

    /// A watcher from the start of what the rings still hold. The first watcher of a job
    /// meters frame delivery.
    pub fn watch(self: &Arc<Self>) -> JobWatch {
        let mut state = self.state.lock();
        let meter = !state.metered;
        state.metered = true;
        JobWatch {
            feed: self.clone(),
            next_event: 0,
            next_frame: 0,
            meter,
            done: false,
        }
    }
}

/// A cursor over a job's feed. See the module docs.
#[derive(Debug)]
pub struct JobWatch {
    feed: Arc<JobFeed>,
    /// Count of events taken (or skipped) so far.
    next_event: u64,
    /// Count of frames taken (or skipped) so far.
    next_frame: u64,
    meter: bool,
    done: bool,
}

impl JobWatch {
    /// The trace the watched job belongs to.
    pub fn trace_id(&self) -> &str {
        &self.feed.trace_id
    }

    /// Whether this watcher meters frame delivery for the job's stream.
    pub fn is_metering(&self) -> bool {
        self.meter
    }

    pub(crate) fn try_next(&mut self) -> Option<WatchItem> {
        let state = self.feed.state.lock();
        // Skips first, so the watcher learns about gaps before what follows them.
        let first_event = state.events_pushed - state.events.len() as u64;
        if self.next_event < first_event {
            let skipped = first_event - self.next_event;
            self.next_event = first_event;
            return Some(WatchItem::EventsSkipped(skipped));
        }
        let first_frame = state.frames_pushed - state.frames.len() as u64;
        if self.next_frame < first_frame {
            let dropped = first_frame - self.next_frame;
            self.next_frame = first_frame;
            drop(state);
            if self.meter
                && let Some(stream) = self.feed.stream.get()
            {
                stream.frames_dropped(dropped);
            }
            return Some(WatchItem::FramesDropped(dropped));
        }
        let event = state
            .events
            .get((self.next_event - first_event) as usize)
            .cloned();
        let frame = state
            .frames
            .get((self.next_frame - first_frame) as usize)
            .cloned();
        drop(state);
        match (event, frame) {
            (Some(e), Some(f)) if f.seq < e.seq => self.take_frame(f),
            (Some(e), _) => {
                self.next_event += 1;
                if matches!(e.event, JobEvent::Finished { .. }) {
                    self.done = true;
                }
                Some(WatchItem::Event(e))
            }
            (None, Some(f)) => self.take_frame(f),
            (None, None) => None,
        }
    }

    fn take_frame(&mut self, frame: Arc<Frame>) -> Option<WatchItem> {
        self.next_frame += 1;
        if self.meter
            && let Some(stream) = self.feed.stream.get()
        {
            stream.frame_delivered();
        }
        Some(WatchItem::Frame(frame))
    }

    /// The next item, waiting for it; `None` after the final event was taken.
    pub async fn next(&mut self) -> Option<WatchItem> {
        loop {
            if self.done {
                return None;
            }
            let feed = self.feed.clone();
            let notified = feed.wake_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(item) = self.try_next() {
                return Some(item);
            }
            notified.await;
        }
    }

    /// The next item, blocking the thread; `None` after the final event was taken.
    pub fn next_blocking(&mut self) -> Option<WatchItem> {
        loop {
            if self.done {
                return None;
            }
            if let Some(item) = self.try_next() {
                return Some(item);
            }
            let mut state = self.feed.state.lock();
            let pending =
                state.events_pushed > self.next_event || state.frames_pushed > self.next_frame;
            if !pending {
                self.feed
                    .wake_blocking
                    .wait_for(&mut state, Duration::from_millis(250));
            }
        }
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        if !self.meter {
            return;
        }
        let mut state = self.feed.state.lock();
        state.metered = false;
        // Frames this watcher never took are frames its client never got.
        let missed = state.frames_pushed.saturating_sub(self.next_frame);
        drop(state);
        if missed > 0
            && let Some(stream) = self.feed.stream.get()
        {
            stream.frames_dropped(missed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished() -> JobEvent {
        JobEvent::Finished {
            state: RecordState::Succeeded,
            error: None,
        }
    }

    #[test]
    fn a_late_watcher_replays_events_and_frames_in_order() {
        let feed = Arc::new(JobFeed::new(FeedConfig::default()));
        feed.push(JobEvent::Stage {
            name: "prompt_received",
            detail: String::new(),
        });
        feed.push_frame("5", 0, 1, 1, vec![0, 0, 0], 24.0);
        feed.push(finished());
        let mut watch = feed.watch();
        let items: Vec<WatchItem> = std::iter::from_fn(|| watch.next_blocking()).collect();
        assert_eq!(items.len(), 3);
        assert!(
            matches!(&items[0], WatchItem::Event(e) if matches!(e.event, JobEvent::Stage { name: "prompt_received", .. }))
        );
        assert!(matches!(&items[1], WatchItem::Frame(f) if f.index == 0));
        assert!(
            matches!(&items[2], WatchItem::Event(e) if matches!(e.event, JobEvent::Finished { .. }))
        );
    }

    #[test]
    fn a_slow_watcher_skips_frames_past_the_ring_and_memory_stays_bounded() {
        let feed = Arc::new(JobFeed::new(FeedConfig {
            max_events: 4,
            frame_ring: 3,
        }));
        let mut watch = feed.watch();
        for i in 0..100 {
            feed.push_frame("5", i, 1, 1, vec![1, 2, 3], 24.0);
        }
        assert_eq!(feed.state.lock().frames.len(), 3);
        assert_eq!(watch.next_blocking(), Some(WatchItem::FramesDropped(97)));
        for i in 97..100 {
            assert!(matches!(watch.next_blocking(), Some(WatchItem::Frame(f)) if f.index == i));
        }
        for _ in 0..10 {
            feed.push(JobEvent::Progress {
                node_id: "5".into(),
                step: 1,
                steps: 2,
            });
        }
        feed.push(finished());
        assert_eq!(watch.next_blocking(), Some(WatchItem::EventsSkipped(7)));
        let rest: Vec<WatchItem> = std::iter::from_fn(|| watch.next_blocking()).collect();
        assert_eq!(rest.len(), 4);
    }

    #[test]
    fn nothing_is_pushed_after_the_final_event() {
        let feed = Arc::new(JobFeed::new(FeedConfig::default()));
        feed.push(finished());
        feed.push(finished());
        feed.push_frame("1", 0, 1, 1, vec![0; 3], 1.0);
        assert_eq!(feed.events().len(), 1);
        assert!(feed.is_finished());
    }
}
