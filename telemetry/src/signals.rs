//! The [`Signals`] handle: one call per happening records the Prometheus series *and* the
//! in-process windows and SLO rings, so the exported view and the one admission control and
//! diagnosis read can never disagree.
//!
//! `Signals` is a cheap `Clone` (an `Arc` inside); hand one to the executor, the queue, the
//! model cache and the gRPC service. Animation frames go through a [`FrameStream`] per
//! stream, because frame intervals only mean something within one stream.
//! [`Signals::snapshot`] freezes everything into a serde [`SignalsSnapshot`] for `GetSignals`,
//! `sakuga run`'s summary and `sakuga doctor --from FILE`.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, MonotonicClock};
use crate::device::{self, DeviceProbe, DeviceSample, DeviceSampler};
use crate::error::{Result, TelemetryError};
use crate::events::{self, FrameEventSampler};
use crate::history::{self, FrameTotals, History, JobSummary, Marker};
use crate::labels::*;
use crate::quality::{QcReport, QualityConfig};
use crate::record;
use crate::slo::{SloConfig, SloId, SloStatus, SloTracker};
use crate::window::{GoldenSignals, SystemSignals, Window, Windows};

/// Configuration of the signals handle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SignalsConfig {
    pub slo: SloConfig,
    /// `frame_emitted` events: keep one in this many (failing and slow frames always).
    pub frame_events_every: Option<u64>,
    pub quality: QualityConfig,
    /// Planned heavy load stays marked on at least this many seconds (default
    /// [`DEFAULT_PLANNED_LOAD_HOLD`]): two scrape intervals, so a warmup shorter than one
    /// scrape is still seen by Prometheus and inhibits what it causes.
    pub planned_load_hold_s: Option<f64>,
    /// The hardware class stage events and job spans carry (e.g. `h200`, `a10g`); the
    /// device kind (`cpu`, `cuda`) when unset.
    pub hardware_class: Option<String>,
}

/// How long planned heavy load stays visible at least: two 15 s scrape intervals.
pub const DEFAULT_PLANNED_LOAD_HOLD: Duration = Duration::from_secs(30);

/// How often the derived gauges (FPS health, SLO objectives, budgets, burn rates) are
/// re-evaluated by the signals ticker, whether or not anyone asks.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);

impl SignalsConfig {
    /// The minimum time planned heavy load stays marked on.
    pub fn planned_load_hold(&self) -> Duration {
        self.planned_load_hold_s
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(DEFAULT_PLANNED_LOAD_HOLD, Duration::from_secs_f64)
    }
}

/// How a job ended, for [`Signals::job_finished`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport<'a> {
    pub workload: Workload,
    pub outcome: Outcome,
    /// Prompt received to final state.
    pub latency: Duration,
    pub model_id: Option<&'a str>,
    pub width: u32,
    pub height: u32,
    /// Images the job produced (0 for a failed job).
    pub images: u64,
    /// What the job history keeps beyond the metrics (see [`JobReport::with_detail`]).
    pub detail: JobDetail,
}

/// What the job history records about a job beyond its metrics; all optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobDetail {
    /// Settings that tell jobs of one model apart (resolution, sampler, steps).
    pub settings: Option<String>,
    pub queue_wait: Option<Duration>,
    /// Why it failed, when it did (timeouts and OOMs are known from the outcome).
    pub error: Option<(ErrorKind, Stage)>,
    pub frames: Option<FrameTotals>,
}

impl<'a> JobReport<'a> {
    /// A report at the reference resolution with one image on success.
    pub fn new(workload: Workload, outcome: Outcome, latency: Duration) -> Self {
        JobReport {
            workload,
            outcome,
            latency,
            model_id: None,
            width: 768,
            height: 768,
            images: u64::from(outcome == Outcome::Success),
            detail: JobDetail::default(),
        }
    }

    pub fn with_detail(mut self, detail: JobDetail) -> Self {
        self.detail = detail;
        self
    }

    pub fn with_model(mut self, model_id: &'a str) -> Self {
        self.model_id = Some(model_id);
        self
    }

    pub fn with_resolution(mut self, width: u32, height: u32) -> Self {
        self.width = width;
        self.height = height;
        self
    }

    pub fn with_images(mut self, images: u64) -> Self {
        self.images = images;
        self
    }
}

/// What a client said about playback (`ReportPlayback`) since its previous report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaybackReport {
    /// Frames the client displayed.
    pub delivered_frames: u64,
    /// Frames it never got or skipped.
    pub dropped_frames: u64,
    /// Frames identical to the one before.
    pub duplicated_frames: u64,
    /// Displayed frames that came later than the FPS floor allows after the previous one.
    pub late_frames: u64,
}

/// Configuration changes as diagnosis sees them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigChanges {
    pub generation: u64,
    pub config_hash: String,
    /// Seconds between the last change and the snapshot; `None` when nothing changed.
    pub seconds_since_change: Option<f64>,
    /// OOMs counted since the last change.
    pub ooms_since_change: u64,
    /// OOMs in the same length of time before the change (the baseline).
    pub ooms_before_change: u64,
}

#[derive(Debug, Default)]
struct ConfigState {
    generation: u64,
    config_hash: String,
    changed_at: Option<Duration>,
    ooms_since_change: u64,
    ooms_before_change: u64,
}

#[derive(Debug)]
struct Inner {
    /// Swapped whole on reload; readers take a cheap snapshot.
    config: parking_lot::RwLock<Arc<SignalsConfig>>,
    clock: Arc<dyn Clock>,
    windows: Windows,
    slo: SloTracker,
    device: Mutex<Option<DeviceSample>>,
    changes: Mutex<ConfigState>,
    /// Bit per `PlannedLoad` value that is on.
    planned: AtomicU64,
    /// Per `PlannedLoad`: when it went on, and when it may go off (ended but held).
    planned_times: Mutex<Vec<PlannedTimes>>,
    /// Signals clock time of the last [`Signals::publish`].
    last_publish: Mutex<Option<Duration>>,
    frame_metrics: record::FrameMetrics,
    /// Streams that produced a frame and have not ended, for [`Signals::is_fps_degraded`].
    live_streams: Mutex<Vec<LiveStream>>,
    /// The job history of the data dir, once attached.
    history: std::sync::OnceLock<History>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PlannedTimes {
    on_at: Option<Duration>,
    release_at: Option<Duration>,
}

/// The shared signals handle. See the module docs.
#[derive(Debug, Clone)]
pub struct Signals {
    inner: Arc<Inner>,
}

impl Signals {
    /// Signals on the real clock. Install the Prometheus recorder first: per-frame metric
    /// handles are registered here.
    pub fn new(config: SignalsConfig) -> Self {
        Self::with_clock(config, Arc::new(MonotonicClock::new()))
    }

    /// Signals on a given clock (tests use `ManualClock`).
    pub fn with_clock(config: SignalsConfig, clock: Arc<dyn Clock>) -> Self {
        let origin = clock.now();
        Signals {
            inner: Arc::new(Inner {
                config: parking_lot::RwLock::new(Arc::new(config)),
                clock,
                windows: Windows::new(origin),
                slo: SloTracker::new(),
                device: Mutex::new(None),
                changes: Mutex::new(ConfigState::default()),
                planned: AtomicU64::new(0),
                planned_times: Mutex::new(vec![PlannedTimes::default(); PlannedLoad::ALL.len()]),
                last_publish: Mutex::new(None),
                frame_metrics: record::FrameMetrics::new(),
                live_streams: Mutex::new(Vec::new()),
                history: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<SignalsConfig> {
        self.inner.config.read().clone()
    }

    /// Puts `config` in force for everything recorded and evaluated from now on (SLO
    /// targets, thresholds, quality checks); the windows and their history are kept.
    /// Returns whether anything changed.
    pub fn set_config(&self, config: SignalsConfig) -> bool {
        let mut current = self.inner.config.write();
        if **current == config {
            return false;
        }
        *current = Arc::new(config);
        true
    }

    /// Now, on the signals clock.
    pub fn now(&self) -> Duration {
        self.inner.clock.now()
    }

    /// A job was accepted by `Submit`.
    pub fn job_submitted(&self, workload: Workload) {
        record::job_submitted(workload);
    }

    /// Admission control decided on a job.
    pub fn admission(&self, workload: Workload, decision: Decision, reason: AdmissionReason) {
        record::admission_decision(workload, decision, reason);
    }

    /// The workload's queue now holds `depth` jobs.
    pub fn queue_depth(&self, workload: Workload, depth: usize) {
        record::queue_depth(workload, depth);
        self.inner
            .windows
            .queue_depth(self.now(), workload, depth as u64);
    }

    /// A job left the queue and started after waiting `wait`.
    pub fn job_started(&self, workload: Workload, model_id: Option<&str>, wait: Duration) {
        let at = self.now();
        record::queue_wait(workload, wait);
        self.inner.windows.queue_wait(at, workload, wait);
        if workload == Workload::Batch {
            let target = self.config().slo.queue_wait_target(workload, model_id);
            self.inner
                .slo
                .event(at, SloId::BatchQueueWait, wait <= target);
        }
    }

    /// A job spent `duration` in a stage. Inference and post-process also feed the windows.
    pub fn stage_finished(&self, workload: Workload, stage: Stage, duration: Duration) {
        record::stage_finished(workload, stage, duration);
        let at = self.now();
        match stage {
            Stage::Inference => self.inner.windows.inference(at, workload, duration),
            Stage::Postprocess => self.inner.windows.postprocess(at, workload, duration),
            _ => {}
        }
    }

    /// One workflow node ran for `duration`.
    pub fn node_finished(&self, class_type: &str, duration: Duration) {
        record::node_finished(class_type, duration);
    }

    /// A job reached its final state.
    pub fn job_finished(&self, report: &JobReport<'_>) {
        let at = self.now();
        let inner = &self.inner;
        record::job_finished(report.workload, report.outcome, report.latency);
        if let Some(history) = inner.history.get() {
            history.record(self.summary(report));
        }
        if report.images > 0 {
            record::images(report.workload, report.images);
        }
        inner.windows.job_finished(
            at,
            report.workload,
            report.outcome,
            report.latency,
            report.images,
        );
        if report.outcome == Outcome::Cancelled {
            return;
        }
        let timeout_or_oom = matches!(report.outcome, Outcome::Timeout | Outcome::Oom);
        inner.slo.event(at, SloId::TimeoutsAndOoms, !timeout_or_oom);
        match report.workload {
            Workload::Batch => {
                inner
                    .slo
                    .event(at, SloId::BatchSuccess, report.outcome == Outcome::Success);
            }
            Workload::SingleImage if report.outcome == Outcome::Success => {
                let target = inner.config.read().slo.latency_target(
                    report.workload,
                    report.model_id,
                    report.width,
                    report.height,
                );
                inner
                    .slo
                    .event(at, SloId::SingleImageLatency, report.latency <= target);
            }
            _ => {}
        }
    }

    fn count_oom(&self) {
        let mut changes = self.inner.changes.lock();
        if changes.changed_at.is_some() {
            changes.ooms_since_change += 1;
        }
    }

    /// An error of a kind in a stage. Report every error here, including the one that
    /// ends a job (then also call [`Self::job_finished`]): OOM and timeout spikes are
    /// counted from these, once each.
    pub fn error(&self, kind: ErrorKind, stage: Stage) {
        record::error(kind, stage);
        match kind {
            ErrorKind::Oom => {
                self.inner.windows.oom(self.now());
                self.count_oom();
            }
            ErrorKind::Timeout => self.inner.windows.timeout(self.now()),
            _ => {}
        }
    }

    /// A retry.
    pub fn retry(&self, reason: RetryReason) {
        record::retry(reason);
    }

    /// A model cache lookup.
    pub fn model_cache(&self, kind: ModelKind, result: CacheResult) {
        record::model_cache_request(kind, result);
        self.inner.windows.cache(self.now(), result);
    }

    /// A model finished loading.
    pub fn model_loaded(&self, kind: ModelKind, duration: Duration) {
        record::model_loaded(kind, duration);
    }

    /// A device sample (the device sampler calls this; probes outside it may too).
    pub fn device_sample(&self, sample: &DeviceSample) {
        let at = self.now();
        let headroom = sample.headroom_ratio();
        self.inner
            .windows
            .device(at, sample.utilization_ratio, headroom);
        let floor = self.config().slo.system.min_headroom_ratio;
        if sample.memory_total_bytes > 0 {
            self.inner
                .slo
                .event(at, SloId::MemoryHeadroom, headroom >= floor);
        }
        *self.inner.device.lock() = Some(sample.clone());
    }

    /// Polls `probe` every `interval` on its own thread, feeding the device gauges, the
    /// windows and the headroom SLO, and refreshing the derived gauges ([`Self::publish`]).
    /// Keep the returned handle; dropping it stops the thread.
    ///
    /// # Errors
    /// [`TelemetryError::SamplerThread`] when the thread cannot be spawned.
    pub fn spawn_device_sampler(
        &self,
        probe: impl DeviceProbe,
        interval: Duration,
    ) -> Result<DeviceSampler> {
        let signals = self.clone();
        device::spawn_device_sampler_with(probe, interval, move |sample| {
            signals.device_sample(sample);
            signals.tick();
        })
    }

    /// Timer work, called by the sampler thread every sample: ends planned heavy load whose
    /// hold ran out, and re-evaluates the derived gauges every [`PUBLISH_INTERVAL`].
    pub fn tick(&self) {
        let now = self.now();
        self.release_held_planned_load(now);
        let due = {
            let mut last = self.inner.last_publish.lock();
            let due = last.is_none_or(|at| now.saturating_sub(at) >= PUBLISH_INTERVAL);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            self.publish();
        }
    }

    /// Total memory of the GPU the sampler last read; `None` on the CPU or before a sample.
    /// Read under the lock without copying the sample: admission asks on every submit.
    pub fn gpu_memory_total(&self) -> Option<u64> {
        self.inner
            .device
            .lock()
            .as_ref()
            .filter(|s| s.device != "cpu" && s.memory_total_bytes > 0)
            .map(|s| s.memory_total_bytes)
    }

    /// The latest device sample, if any.
    pub fn latest_device(&self) -> Option<DeviceSample> {
        self.inner.device.lock().clone()
    }

    /// Whether device memory headroom is at or over the floor (true before any sample).
    pub fn headroom_ok(&self) -> bool {
        self.fits_in_headroom(0)
    }

    /// Whether `extra_bytes` more device memory would keep headroom at or over the floor
    /// (true before any sample: admission must not stall on a missing probe).
    pub fn fits_in_headroom(&self, extra_bytes: u64) -> bool {
        let floor = self.config().slo.system.min_headroom_ratio;
        match &*self.inner.device.lock() {
            Some(s) if s.memory_total_bytes > 0 => {
                record::headroom_ratio(
                    s.memory_used_bytes.saturating_add(extra_bytes),
                    s.memory_total_bytes,
                ) >= floor
            }
            _ => true,
        }
    }

    /// Whether a stream of `workload` is running now and degraded, each stream judged
    /// over its own recent frames: produced FPS under the stream's target, or delivered
    /// FPS more than the allowed deviation under produced. Admission defers batch starts
    /// only then; a window average would count idle time after a finished preview as
    /// missing frames and defer batch work on an idle server.
    pub fn is_fps_degraded(&self, workload: Workload) -> bool {
        let now = self.now();
        let deviation = self.config().slo.animation.max_fps_deviation;
        let mut live = self.inner.live_streams.lock();
        live.retain(|s| s.is_running(now));
        live.iter()
            .any(|s| s.workload == workload && s.is_degraded(deviation))
    }

    /// Golden signals of one workload over one window, now.
    pub fn golden(&self, workload: Workload, window: Window) -> GoldenSignals {
        self.inner.windows.golden(self.now(), workload, window)
    }

    /// Status of one SLO, now.
    pub fn slo_status(&self, slo: SloId) -> SloStatus {
        self.inner.slo.status(self.now(), slo, &self.config().slo)
    }

    /// Continues the config generation count of an earlier run of this deployment (read
    /// from the data dir), so a restart adds one instead of starting over. Call before the
    /// first [`Self::config_changed`].
    pub fn resume_config_generation(&self, previous: u64) {
        let mut changes = self.inner.changes.lock();
        changes.generation = changes.generation.max(previous);
    }

    /// How many config changes were applied (restarts included, see
    /// [`Self::resume_config_generation`]).
    pub fn config_generation(&self) -> u64 {
        self.inner.changes.lock().generation
    }

    /// The running configuration changed (a reload that changed something, or a start);
    /// OOMs after it are attributed to it. Exports the new identity and returns the new
    /// generation.
    pub fn config_changed(&self, version: &str, config_hash: &str) -> u64 {
        let at = self.now();
        let mut changes = self.inner.changes.lock();
        // Baseline: OOMs in the 15 minutes before the change.
        changes.ooms_before_change = self.inner.windows.system(at, Window::FifteenMinutes).ooms;
        changes.generation += 1;
        changes.config_hash = config_hash.to_owned();
        changes.changed_at = Some(at);
        changes.ooms_since_change = 0;
        let generation = changes.generation;
        drop(changes);
        record::identity(version, config_hash, generation);
        events::config_changed(config_hash, generation);
        if let Some(history) = self.inner.history.get() {
            history.marker(Marker {
                at: history::unix_now(),
                generation,
                version: version.to_owned(),
                config_hash: config_hash.to_owned(),
            });
        }
        generation
    }

    /// Keeps a summary of every job finished from now on, and a marker of every config
    /// change, in `history` (the first one attached stays).
    pub fn attach_history(&self, history: History) {
        let _ = self.inner.history.set(history);
    }

    /// The attached job history, if any.
    pub fn history(&self) -> Option<&History> {
        self.inner.history.get()
    }

    fn summary(&self, report: &JobReport<'_>) -> JobSummary {
        let detail = &report.detail;
        let error = detail.error.or(match report.outcome {
            Outcome::Timeout => Some((ErrorKind::Timeout, Stage::Inference)),
            Outcome::Oom => Some((ErrorKind::Oom, Stage::Inference)),
            Outcome::Failed => Some((ErrorKind::Internal, Stage::Inference)),
            Outcome::Success | Outcome::Cancelled => None,
        });
        JobSummary {
            finished_at: history::unix_now(),
            workload: report.workload,
            outcome: report.outcome,
            model: report.model_id.map(str::to_owned),
            settings: detail.settings.clone(),
            error_kind: error.map(|(kind, _)| kind),
            error_stage: error.map(|(_, stage)| stage),
            latency_s: report.latency.as_secs_f64(),
            queue_wait_s: detail.queue_wait.map(|w| w.as_secs_f64()),
            frames: detail.frames.unwrap_or_default(),
            config_generation: self.config_generation(),
        }
    }

    /// Marks planned heavy load on or off. Off takes effect once the load has been on for
    /// the configured hold ([`SignalsConfig::planned_load_hold`]); until then [`Self::tick`]
    /// keeps it on, so a warmup shorter than a scrape interval is still scraped.
    pub fn planned_heavy_load(&self, reason: PlannedLoad, active: bool) {
        let now = self.now();
        let mut times = self.inner.planned_times.lock();
        let slot = &mut times[reason.index()];
        if active {
            if slot.release_at.take().is_none() || slot.on_at.is_none() {
                slot.on_at = Some(now);
            }
        } else {
            let held_until = slot.on_at.map(|on| on + self.config().planned_load_hold());
            if held_until.is_some_and(|until| until > now) {
                slot.release_at = held_until;
                return;
            }
            slot.on_at = None;
        }
        drop(times);
        self.set_planned_bit(reason, active);
    }

    fn set_planned_bit(&self, reason: PlannedLoad, active: bool) {
        let bit = 1u64 << reason.index();
        if active {
            self.inner.planned.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.inner.planned.fetch_and(!bit, Ordering::Relaxed);
        }
        record::planned_heavy_load(reason, active);
    }

    fn release_held_planned_load(&self, now: Duration) {
        let mut released = Vec::new();
        {
            let mut times = self.inner.planned_times.lock();
            for (&reason, slot) in PlannedLoad::ALL.iter().zip(times.iter_mut()) {
                if slot.release_at.is_some_and(|at| at <= now) {
                    *slot = PlannedTimes::default();
                    released.push(reason);
                }
            }
        }
        for reason in released {
            self.set_planned_bit(reason, false);
        }
    }

    /// Client-side playback counts for a stream whose delivery the server cannot see.
    /// Do not also call [`FrameStream::frame_delivered`] for the same frames.
    pub fn playback_report(&self, workload: Workload, report: &PlaybackReport) {
        let at = self.now();
        let inner = &self.inner;
        let counts = [
            (FrameKind::Delivered, report.delivered_frames),
            (FrameKind::Dropped, report.dropped_frames),
            (FrameKind::Duplicated, report.duplicated_frames),
        ];
        for (kind, n) in counts {
            if n > 0 {
                inner.frame_metrics.frames(workload, kind, n);
                inner.windows.frames(at, workload, kind, n);
            }
        }
        if workload == Workload::Animation {
            inner.slo.record(
                at,
                SloId::AnimationDroppedFrames,
                report.delivered_frames,
                report.dropped_frames,
            );
            let late = report.late_frames.min(report.delivered_frames);
            inner.slo.record(
                at,
                SloId::AnimationFps,
                report.delivered_frames - late,
                late,
            );
        }
    }

    /// Whether any planned heavy load is marked on (alerts are inhibited meanwhile).
    pub fn is_planned_heavy_load(&self) -> bool {
        self.inner.planned.load(Ordering::Relaxed) != 0
    }

    /// Counts a frame's QC results: rejections by check, and a duplicate as a frame kind.
    pub fn frame_checked(&self, workload: Workload, report: &QcReport) {
        for check in report.failed_checks() {
            record::qc_rejection(check);
        }
        if report.duplicate {
            record::frame(workload, FrameKind::Duplicated);
            self.inner
                .windows
                .frames(self.now(), workload, FrameKind::Duplicated, 1);
        }
    }

    /// Opens a frame stream of `workload` whose delivered FPS floor is `min_fps`.
    pub fn stream(&self, workload: Workload, min_fps: f64) -> FrameStream {
        let sampler = self
            .config()
            .frame_events_every
            .map(FrameEventSampler::new)
            .unwrap_or_default();
        FrameStream {
            signals: self.clone(),
            workload,
            min_fps,
            sampler,
            state: Arc::new(StreamState::default()),
        }
    }

    /// Refreshes the derived gauges: FPS health per workload (2 minutes) and every SLO's
    /// objective, error budget and burn rates. The device sampler calls it each tick;
    /// without one, call it periodically (every few seconds).
    pub fn publish(&self) {
        let now = self.now();
        for &workload in Workload::ALL {
            let g = self.inner.windows.golden(now, workload, Window::TwoMinutes);
            if let Some(health) = g.fps_health {
                record::fps_health(workload, health);
            }
        }
        for status in self.inner.slo.all(now, &self.config().slo) {
            let name = status.slo.as_str();
            record::slo_objective(name, status.objective);
            record::slo_error_budget_remaining(name, status.error_budget_remaining);
            for (window, rate) in &status.burn_rates {
                record::slo_burn_rate(name, window.as_str(), *rate);
            }
        }
    }

    /// Everything, frozen now; also refreshes the derived gauges.
    pub fn snapshot(&self) -> SignalsSnapshot {
        self.publish();
        let now = self.now();
        let inner = &self.inner;
        let mut golden = Vec::new();
        let mut system = Vec::new();
        for &window in Window::ALL {
            let (g, s) = inner.windows.all(now, window);
            golden.extend(g);
            system.push(s);
        }
        let baseline = Workload::ALL
            .iter()
            .map(|&w| {
                inner
                    .windows
                    .golden_before(now, w, Window::TwoMinutes, Window::FifteenMinutes)
            })
            .collect();
        let device = inner.device.lock().clone();
        let changes = inner.changes.lock();
        let config = ConfigChanges {
            generation: changes.generation,
            config_hash: changes.config_hash.clone(),
            seconds_since_change: changes
                .changed_at
                .map(|at| now.saturating_sub(at).as_secs_f64()),
            ooms_since_change: changes.ooms_since_change,
            ooms_before_change: changes.ooms_before_change,
        };
        drop(changes);
        SignalsSnapshot {
            taken_at_s: now.as_secs_f64(),
            golden,
            baseline,
            system,
            slos: inner.slo.all(now, &inner.config.read().slo),
            device_headroom_ratio: device.as_ref().map(DeviceSample::headroom_ratio),
            device,
            config,
            planned_heavy_load: inner.planned.load(Ordering::Relaxed) != 0,
        }
    }
}

#[derive(Debug, Default)]
struct StreamState {
    /// Clock nanos + 1 of the last frame at each end; 0 before the first.
    last_produced: AtomicU64,
    last_delivered: AtomicU64,
    produced: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    late: AtomicU64,
    /// Clock nanos + 1 of the first frame at each end; 0 before it.
    first_produced: AtomicU64,
    first_delivered: AtomicU64,
    ended: AtomicBool,
    recent: Mutex<RecentFrames>,
}

/// Frames a running stream's FPS is judged over: two seconds at 24 FPS.
const RECENT_FRAMES: usize = 48;
/// Frames a stream needs before its FPS is judged at all.
const FRAMES_TO_JUDGE: usize = 4;
/// A stream that produced nothing for this long counts as no longer running, so one that
/// is never ended cannot hold batch work back for ever.
const STREAM_IDLE_AFTER: Duration = Duration::from_secs(10);

/// Signals clock times of a stream's latest frames at each end.
#[derive(Debug, Default)]
struct RecentFrames {
    produced: VecDeque<Duration>,
    delivered: VecDeque<Duration>,
}

fn push_recent(ring: &mut VecDeque<Duration>, at: Duration) {
    if ring.len() == RECENT_FRAMES {
        ring.pop_front();
    }
    ring.push_back(at);
}

/// Frames per second over the ring, once it holds enough frames to say.
fn recent_fps(ring: &VecDeque<Duration>) -> Option<f64> {
    if ring.len() < FRAMES_TO_JUDGE {
        return None;
    }
    let span = ring.back()?.saturating_sub(*ring.front()?).as_secs_f64();
    (span > 0.0).then(|| (ring.len() - 1) as f64 / span)
}

/// A stream as [`Signals::is_fps_degraded`] sees it.
#[derive(Debug)]
struct LiveStream {
    workload: Workload,
    min_fps: f64,
    state: Arc<StreamState>,
}

impl LiveStream {
    fn is_running(&self, now: Duration) -> bool {
        let last = self.state.recent.lock().produced.back().copied();
        !self.state.ended.load(Ordering::Relaxed)
            && last.is_some_and(|at| now.saturating_sub(at) < STREAM_IDLE_AFTER)
    }

    fn is_degraded(&self, max_deviation: f64) -> bool {
        let recent = self.state.recent.lock();
        let Some(produced) = recent_fps(&recent.produced) else {
            return false;
        };
        if self.min_fps > 0.0 && produced < self.min_fps / crate::catalogue::LATE_FRAME_TOLERANCE {
            return true;
        }
        recent_fps(&recent.delivered).is_some_and(|d| d < produced * (1.0 - max_deviation))
    }
}

/// What [`FrameStream::frame_produced`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducedFrame {
    /// 0-based frame number in the stream.
    pub index: u64,
    /// Time since the previous produced frame.
    pub interval: Option<Duration>,
    /// The interval is longer than the stream's FPS floor allows.
    pub slow: bool,
}

/// One animation stream's frames: counts, intervals, FPS SLOs and `frame_emitted` sampling.
///
/// Cheap to clone; the producing side (the StreamFrames node) and the delivering side
/// (the `Watch` stream) may hold clones on different threads.
#[derive(Debug, Clone)]
pub struct FrameStream {
    signals: Signals,
    workload: Workload,
    min_fps: f64,
    sampler: FrameEventSampler,
    state: Arc<StreamState>,
}

/// Stores `at` as the first timestamp unless one is stored already.
fn mark_first(first: &AtomicU64, at: Duration) {
    let stamp = at.as_nanos() as u64 + 1;
    let _ = first.compare_exchange(0, stamp, Ordering::Relaxed, Ordering::Relaxed);
}

/// Swaps in `at` as the last timestamp and returns the interval since the previous one.
fn interval_since(last: &AtomicU64, at: Duration) -> Option<Duration> {
    let stamp = at.as_nanos() as u64 + 1;
    let previous = last.swap(stamp, Ordering::Relaxed);
    (previous != 0).then(|| Duration::from_nanos(stamp.saturating_sub(previous)))
}

impl FrameStream {
    /// The generator emitted a frame now.
    pub fn frame_produced(&self) -> ProducedFrame {
        self.frame_produced_at(self.signals.now())
    }

    /// The generator emitted a frame at `at` (signals clock time).
    pub fn frame_produced_at(&self, at: Duration) -> ProducedFrame {
        let index = self.state.produced.fetch_add(1, Ordering::Relaxed);
        let interval = interval_since(&self.state.last_produced, at);
        mark_first(&self.state.first_produced, at);
        push_recent(&mut self.state.recent.lock().produced, at);
        if index == 0 {
            self.go_live(at);
        }
        let metrics = &self.signals.inner.frame_metrics;
        metrics.frames(self.workload, FrameKind::Produced, 1);
        if let Some(interval) = interval {
            metrics.interval(self.workload, FrameSide::Produced, interval);
        }
        self.signals
            .inner
            .windows
            .frame(at, self.workload, FrameSide::Produced, interval);
        ProducedFrame {
            index,
            interval,
            slow: interval.is_some_and(|i| !self.meets_floor(i)),
        }
    }

    /// A frame reached the client now.
    pub fn frame_delivered(&self) -> Option<Duration> {
        self.frame_delivered_at(self.signals.now())
    }

    /// A frame reached the client at `at`; returns the delivered interval.
    pub fn frame_delivered_at(&self, at: Duration) -> Option<Duration> {
        let interval = interval_since(&self.state.last_delivered, at);
        mark_first(&self.state.first_delivered, at);
        self.state.delivered.fetch_add(1, Ordering::Relaxed);
        if interval.is_some_and(|i| !self.meets_floor(i)) {
            self.state.late.fetch_add(1, Ordering::Relaxed);
        }
        push_recent(&mut self.state.recent.lock().delivered, at);
        let metrics = &self.signals.inner.frame_metrics;
        metrics.frames(self.workload, FrameKind::Delivered, 1);
        if let Some(interval) = interval {
            metrics.interval(self.workload, FrameSide::Delivered, interval);
        }
        let inner = &self.signals.inner;
        inner
            .windows
            .frame(at, self.workload, FrameSide::Delivered, interval);
        if self.workload == Workload::Animation {
            inner.slo.event(at, SloId::AnimationDroppedFrames, true);
            if let Some(interval) = interval {
                inner
                    .slo
                    .event(at, SloId::AnimationFps, self.meets_floor(interval));
            }
        }
        interval
    }

    /// `n` produced frames will never be delivered.
    pub fn frames_dropped(&self, n: u64) {
        let at = self.signals.now();
        self.state.dropped.fetch_add(n, Ordering::Relaxed);
        self.signals
            .inner
            .frame_metrics
            .frames(self.workload, FrameKind::Dropped, n);
        let inner = &self.signals.inner;
        inner
            .windows
            .frames(at, self.workload, FrameKind::Dropped, n);
        if self.workload == Workload::Animation {
            inner.slo.record(at, SloId::AnimationDroppedFrames, 0, n);
        }
    }

    /// The stream's frame counts and mean FPS at each end so far.
    pub fn totals(&self) -> FrameTotals {
        let state = &self.state;
        let fps = |count: u64, first: &AtomicU64, last: &AtomicU64| {
            let span = last
                .load(Ordering::Relaxed)
                .saturating_sub(first.load(Ordering::Relaxed));
            (count > 1 && span > 0).then(|| (count - 1) as f64 / (span as f64 / 1e9))
        };
        let produced = state.produced.load(Ordering::Relaxed);
        let delivered = state.delivered.load(Ordering::Relaxed);
        FrameTotals {
            produced,
            delivered,
            dropped: state.dropped.load(Ordering::Relaxed),
            duplicated: 0,
            late: state.late.load(Ordering::Relaxed),
            produced_fps: fps(produced, &state.first_produced, &state.last_produced),
            delivered_fps: fps(delivered, &state.first_delivered, &state.last_delivered),
        }
    }

    /// The stream is over (its job ended): it no longer counts as running.
    pub fn end(&self) {
        self.state.ended.store(true, Ordering::Relaxed);
    }

    /// Registers the stream as running at its first frame, pruning streams that are not.
    fn go_live(&self, at: Duration) {
        let mut live = self.signals.inner.live_streams.lock();
        live.retain(|s| s.is_running(at));
        live.push(LiveStream {
            workload: self.workload,
            min_fps: self.min_fps,
            state: self.state.clone(),
        });
    }

    /// Whether to log `frame_emitted` for this frame (see [`FrameEventSampler`]).
    pub fn should_log(&self, frame: &ProducedFrame, job_failing: bool) -> bool {
        self.sampler
            .should_emit(frame.index, job_failing, frame.slow)
    }

    fn meets_floor(&self, interval: Duration) -> bool {
        // A stream paced at exactly min_fps jitters around the interval by the OS timer's
        // slack; 2% late (under a millisecond at 24 FPS) is invisible, a dropped frame is
        // 100% late, so judge with that tolerance rather than to the microsecond.
        self.min_fps <= 0.0
            || interval.as_secs_f64() <= crate::catalogue::late_frame_interval_s(self.min_fps)
    }
}

/// Everything [`Signals`] knows, frozen at one moment; serde JSON for APIs and files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalsSnapshot {
    /// Signals clock time of the snapshot (seconds since start).
    pub taken_at_s: f64,
    /// Golden signals for every workload and window.
    pub golden: Vec<GoldenSignals>,
    /// Each workload over the 13 minutes before the last 2 (the 15-minute window minus
    /// the 2-minute one): the baseline "growing" signals are judged against.
    pub baseline: Vec<GoldenSignals>,
    /// System signals for every window.
    pub system: Vec<SystemSignals>,
    pub slos: Vec<SloStatus>,
    pub device: Option<DeviceSample>,
    pub device_headroom_ratio: Option<f64>,
    pub config: ConfigChanges,
    pub planned_heavy_load: bool,
}

impl SignalsSnapshot {
    /// The golden signals of one workload over one window.
    pub fn golden(&self, workload: Workload, window: Window) -> Option<&GoldenSignals> {
        self.golden
            .iter()
            .find(|g| g.workload == workload && g.window == window)
    }

    /// The baseline (13 minutes before the last 2) of one workload.
    pub fn baseline(&self, workload: Workload) -> Option<&GoldenSignals> {
        self.baseline.iter().find(|g| g.workload == workload)
    }

    /// The system signals over one window.
    pub fn system(&self, window: Window) -> Option<&SystemSignals> {
        self.system.iter().find(|s| s.window == window)
    }

    /// The status of one SLO.
    pub fn slo(&self, slo: SloId) -> Option<&SloStatus> {
        self.slos.iter().find(|s| s.slo == slo)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a snapshot always serializes")
    }

    /// Writes the snapshot as JSON.
    ///
    /// # Errors
    /// [`TelemetryError::Io`] naming `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()).map_err(|source| TelemetryError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Loads a snapshot saved with [`Self::save`] (`sakuga doctor --from FILE`).
    ///
    /// # Errors
    /// [`TelemetryError::Io`] or [`TelemetryError::Snapshot`] naming `path`.
    pub fn load(path: &Path) -> Result<SignalsSnapshot> {
        let text = std::fs::read_to_string(path).map_err(|source| TelemetryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| TelemetryError::Snapshot {
            path: path.to_path_buf(),
            source,
        })
    }
}
