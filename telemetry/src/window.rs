//! In-process rolling windows (2, 5 and 15 minutes) of the golden signals.
//!
//! Prometheus answers "what happened" for dashboards; the scheduler needs the same answers
//! in-process, now, to admit or defer work and to diagnose. So every record also lands in a
//! ring of 5-second slots holding per-workload counters and bucket counts with the same
//! edges as the exported histograms. A window read sums the slots it spans and derives
//! FPS, percentiles and ratios from them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalogue::{
    FRAME_INTERVAL_BUCKETS, QUEUE_WAIT_BUCKETS, RENDER_LATENCY_BUCKETS, STAGE_DURATION_BUCKETS,
};
use crate::labels::{CacheResult, FrameKind, FrameSide, Outcome, Workload};
use crate::ring::{SlotData, SlotRing};

/// Length of one window slot.
pub const WINDOW_SLOT: Duration = Duration::from_secs(5);
/// Slots kept: enough for the longest window.
const WINDOW_SLOTS: usize = 180;
/// Room for the longest bucket layout plus the `+Inf` bucket.
const MAX_BUCKETS: usize = 17;

/// The rolling windows sakuga keeps in-process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Window {
    #[serde(rename = "2m")]
    TwoMinutes,
    #[serde(rename = "5m")]
    FiveMinutes,
    #[serde(rename = "15m")]
    FifteenMinutes,
}

impl Window {
    pub const ALL: &'static [Window] = &[
        Window::TwoMinutes,
        Window::FiveMinutes,
        Window::FifteenMinutes,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Window::TwoMinutes => "2m",
            Window::FiveMinutes => "5m",
            Window::FifteenMinutes => "15m",
        }
    }

    pub const fn duration(self) -> Duration {
        match self {
            Window::TwoMinutes => Duration::from_secs(120),
            Window::FiveMinutes => Duration::from_secs(300),
            Window::FifteenMinutes => Duration::from_secs(900),
        }
    }

    fn slots(self) -> usize {
        (self.duration().as_secs() / WINDOW_SLOT.as_secs()) as usize
    }
}

/// Bucket counts over fixed edges (seconds); bucket `i` counts values `<= edges[i]`, the
/// last one the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Buckets {
    counts: [u64; MAX_BUCKETS],
    count: u64,
    sum_s: f64,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            counts: [0; MAX_BUCKETS],
            count: 0,
            sum_s: 0.0,
        }
    }
}

impl Buckets {
    #[inline]
    pub fn record(&mut self, edges: &[f64], value_s: f64) {
        let index = edges.partition_point(|&edge| edge < value_s);
        self.counts[index] += 1;
        self.count += 1;
        self.sum_s += value_s;
    }

    pub fn merge(&mut self, other: &Buckets) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_s += other.sum_s;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_s / self.count as f64)
    }

    /// Values at or under `threshold`, which must be one of `edges` to be exact.
    pub fn count_at_most(&self, edges: &[f64], threshold: f64) -> u64 {
        let last = edges.partition_point(|&edge| edge <= threshold + 1e-12);
        self.counts[..last].iter().sum()
    }

    /// The `q` quantile, interpolated linearly inside its bucket the way Prometheus'
    /// `histogram_quantile` does; values past the last edge report the last edge.
    pub fn quantile(&self, edges: &[f64], q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut seen = 0u64;
        for (index, &in_bucket) in self.counts[..=edges.len()].iter().enumerate() {
            if in_bucket == 0 {
                continue;
            }
            if (seen + in_bucket) as f64 >= rank {
                if index == edges.len() {
                    return edges.last().copied();
                }
                let lower = if index == 0 { 0.0 } else { edges[index - 1] };
                let upper = edges[index];
                let into = (rank - seen as f64) / in_bucket as f64;
                return Some(lower + (upper - lower) * into.clamp(0.0, 1.0));
            }
            seen += in_bucket;
        }
        edges.last().copied()
    }

    fn percentiles(&self, edges: &[f64]) -> Percentiles {
        Percentiles {
            count: self.count,
            mean: self.mean(),
            p50: self.quantile(edges, 0.50),
            p95: self.quantile(edges, 0.95),
            p99: self.quantile(edges, 0.99),
        }
    }
}

/// One workload's share of a slot.
#[derive(Debug, Clone, Copy, Default)]
struct WorkloadSlot {
    frames: [u64; 4],
    intervals: [Buckets; 2],
    render_latency: Buckets,
    queue_wait: Buckets,
    inference: Buckets,
    postprocess: Buckets,
    outcomes: [u64; 5],
    images: u64,
    /// Queue depth samples in this slot: first, last, max (first is `None` until sampled).
    depth_first: Option<u64>,
    depth_last: Option<u64>,
    depth_max: u64,
}

impl WorkloadSlot {
    fn merge(&mut self, other: &WorkloadSlot) {
        for (mine, theirs) in self.frames.iter_mut().zip(other.frames) {
            *mine = mine.saturating_add(theirs);
        }
        for (mine, theirs) in self.intervals.iter_mut().zip(other.intervals.iter()) {
            mine.merge(theirs);
        }
        self.render_latency.merge(&other.render_latency);
        self.queue_wait.merge(&other.queue_wait);
        self.inference.merge(&other.inference);
        self.postprocess.merge(&other.postprocess);
        for (mine, theirs) in self.outcomes.iter_mut().zip(other.outcomes) {
            *mine += theirs;
        }
        self.images = self.images.saturating_add(other.images);
        // Slots merge oldest first: keep the earliest first and the latest last.
        if self.depth_first.is_none() {
            self.depth_first = other.depth_first;
        }
        if other.depth_last.is_some() {
            self.depth_last = other.depth_last;
        }
        self.depth_max = self.depth_max.max(other.depth_max);
    }
}

/// Device and cache signals of a slot.
#[derive(Debug, Clone, Copy, Default)]
struct SystemSlot {
    cache: [u64; 2],
    utilization_sum: f64,
    utilization_max: f64,
    device_samples: u64,
    headroom_min: Option<f64>,
    ooms: u64,
    timeouts: u64,
}

impl SystemSlot {
    fn merge(&mut self, other: &SystemSlot) {
        self.cache[0] += other.cache[0];
        self.cache[1] += other.cache[1];
        self.utilization_sum += other.utilization_sum;
        self.utilization_max = self.utilization_max.max(other.utilization_max);
        self.device_samples += other.device_samples;
        self.headroom_min = match (self.headroom_min, other.headroom_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.ooms += other.ooms;
        self.timeouts += other.timeouts;
    }
}

/// Everything one 5-second slot holds.
#[derive(Debug, Clone, Default)]
pub struct WindowSlot {
    workloads: [WorkloadSlot; 3],
    system: SystemSlot,
}

impl SlotData for WindowSlot {
    fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.workloads.iter_mut().zip(other.workloads.iter()) {
            mine.merge(theirs);
        }
        self.system.merge(&other.system);
    }
}

/// p50/p95/p99 and mean of a distribution over a window, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// The golden signals of one workload over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenSignals {
    pub workload: Workload,
    pub window: Window,
    /// Seconds of the window that had elapsed (less than the window just after start).
    pub covered_s: f64,
    pub produced_fps: f64,
    pub delivered_fps: f64,
    /// Delivered over produced FPS; `None` without produced frames.
    pub fps_health: Option<f64>,
    pub frame_interval_produced: Percentiles,
    pub frame_interval_delivered: Percentiles,
    /// Share of delivered frame intervals that are not late at the 24 FPS floor (at or
    /// under 1.02 / 24 s).
    pub smooth_interval_ratio: Option<f64>,
    pub frames_produced: u64,
    pub frames_delivered: u64,
    pub dropped_ratio: Option<f64>,
    pub duplicated_ratio: Option<f64>,
    pub render_latency: Percentiles,
    pub jobs_finished: u64,
    /// Successes over finished jobs, cancelled ones left out.
    pub success_ratio: Option<f64>,
    pub jobs_per_minute: f64,
    pub images_per_second: f64,
    pub queue_wait: Percentiles,
    pub inference: Percentiles,
    pub postprocess: Percentiles,
    /// Queue depth at the start and end of the window, and its peak.
    pub queue_depth_start: Option<u64>,
    pub queue_depth_end: Option<u64>,
    pub queue_depth_max: u64,
    pub timeouts_and_ooms: u64,
}

/// Device, cache and error signals over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemSignals {
    pub window: Window,
    pub covered_s: f64,
    pub cache_hit_rate: Option<f64>,
    pub cache_requests: u64,
    pub utilization_mean: Option<f64>,
    pub utilization_max: Option<f64>,
    pub headroom_min: Option<f64>,
    pub ooms: u64,
    pub timeouts: u64,
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// The rolling windows: record with a timestamp from the signals clock, read a window.
#[derive(Debug)]
pub struct Windows {
    ring: SlotRing<WindowSlot>,
    /// When recording began; windows never claim to cover time before it.
    origin: Duration,
}

impl Windows {
    /// Windows whose history starts at `origin` (the clock's time at creation).
    pub fn new(origin: Duration) -> Self {
        Windows {
            ring: SlotRing::new(WINDOW_SLOT, WINDOW_SLOTS),
            origin,
        }
    }

    #[inline]
    fn workload(&self, at: Duration, workload: Workload, write: impl FnOnce(&mut WorkloadSlot)) {
        self.ring
            .record(at, |slot| write(&mut slot.workloads[workload.index()]));
    }

    /// Count `n` frames of one kind.
    #[inline]
    pub fn frames(&self, at: Duration, workload: Workload, kind: FrameKind, n: u64) {
        self.workload(at, workload, |w| {
            let count = &mut w.frames[kind.index()];
            *count = count.saturating_add(n);
        });
    }

    /// A frame counted and its interval since the stream's previous frame, in one lock.
    #[inline]
    pub fn frame(
        &self,
        at: Duration,
        workload: Workload,
        side: FrameSide,
        interval: Option<Duration>,
    ) {
        let kind = match side {
            FrameSide::Produced => FrameKind::Produced,
            FrameSide::Delivered => FrameKind::Delivered,
        };
        self.workload(at, workload, |w| {
            w.frames[kind.index()] += 1;
            if let Some(interval) = interval {
                w.intervals[side.index()].record(FRAME_INTERVAL_BUCKETS, interval.as_secs_f64());
            }
        });
    }

    /// A job's end: outcome, and for successes its latency and images.
    pub fn job_finished(
        &self,
        at: Duration,
        workload: Workload,
        outcome: Outcome,
        latency: Duration,
        images: u64,
    ) {
        self.workload(at, workload, |w| {
            w.outcomes[outcome.index()] += 1;
            if outcome == Outcome::Success {
                w.render_latency
                    .record(RENDER_LATENCY_BUCKETS, latency.as_secs_f64());
                w.images = w.images.saturating_add(images);
            }
        });
    }

    /// A job left the queue after `wait`.
    pub fn queue_wait(&self, at: Duration, workload: Workload, wait: Duration) {
        self.workload(at, workload, |w| {
            w.queue_wait.record(QUEUE_WAIT_BUCKETS, wait.as_secs_f64())
        });
    }

    /// A queue depth sample.
    pub fn queue_depth(&self, at: Duration, workload: Workload, depth: u64) {
        self.workload(at, workload, |w| {
            w.depth_first.get_or_insert(depth);
            w.depth_last = Some(depth);
            w.depth_max = w.depth_max.max(depth);
        });
    }

    /// Inference time of one job or batch.
    pub fn inference(&self, at: Duration, workload: Workload, duration: Duration) {
        self.workload(at, workload, |w| {
            w.inference
                .record(STAGE_DURATION_BUCKETS, duration.as_secs_f64())
        });
    }

    /// Post-process time (decode, upscale, interpolate) of one job or frame.
    pub fn postprocess(&self, at: Duration, workload: Workload, duration: Duration) {
        self.workload(at, workload, |w| {
            w.postprocess
                .record(STAGE_DURATION_BUCKETS, duration.as_secs_f64())
        });
    }

    /// A model cache lookup.
    pub fn cache(&self, at: Duration, result: CacheResult) {
        self.ring
            .record(at, |slot| slot.system.cache[result.index()] += 1);
    }

    /// An out-of-memory error, whether or not it ended a job.
    pub fn oom(&self, at: Duration) {
        self.ring.record(at, |slot| slot.system.ooms += 1);
    }

    /// A timeout error.
    pub fn timeout(&self, at: Duration) {
        self.ring.record(at, |slot| slot.system.timeouts += 1);
    }

    /// A device sample.
    pub fn device(&self, at: Duration, utilization: f64, headroom: f64) {
        self.ring.record(at, |slot| {
            let s = &mut slot.system;
            s.utilization_sum += utilization;
            s.utilization_max = s.utilization_max.max(utilization);
            s.device_samples += 1;
            s.headroom_min = Some(s.headroom_min.map_or(headroom, |h| h.min(headroom)));
        });
    }

    fn read(&self, now: Duration, window: Window) -> (WindowSlot, f64) {
        let slot_number = self.ring.slot_number(now);
        let first_slot = (slot_number + 1).saturating_sub(window.slots() as u64);
        let start = self.ring.slot_start(first_slot).max(self.origin);
        let covered = now.saturating_sub(start).as_secs_f64();
        (self.ring.sum_recent(now, window.slots()), covered)
    }

    /// Golden signals of one workload over `long` minus its last `recent` part: what
    /// "normal" looked like just before now, for comparing against the `recent` window.
    pub fn golden_before(
        &self,
        now: Duration,
        workload: Workload,
        recent: Window,
        long: Window,
    ) -> GoldenSignals {
        let newest_recent = self.ring.slot_number(now);
        let first_recent = (newest_recent + 1).saturating_sub(recent.slots() as u64);
        let count = long.slots().saturating_sub(recent.slots());
        let first = first_recent.saturating_sub(count as u64);
        let start = self.ring.slot_start(first).max(self.origin);
        let end = self.ring.slot_start(first_recent).max(start);
        let covered_s = end.saturating_sub(start).as_secs_f64();
        let slot = match first_recent.checked_sub(1) {
            Some(newest) if count > 0 => self.ring.sum_ending_at(newest, count),
            _ => WindowSlot::default(),
        };
        golden_from(&slot.workloads[workload.index()], workload, long, covered_s)
    }

    /// Golden signals of one workload over one window ending at `now`.
    pub fn golden(&self, now: Duration, workload: Workload, window: Window) -> GoldenSignals {
        let (slot, covered_s) = self.read(now, window);
        golden_from(
            &slot.workloads[workload.index()],
            workload,
            window,
            covered_s,
        )
    }

    /// System signals over one window ending at `now`.
    pub fn system(&self, now: Duration, window: Window) -> SystemSignals {
        let (slot, covered_s) = self.read(now, window);
        system_from(&slot.system, window, covered_s)
    }

    /// Every workload and the system over one window, from one pass over the slots.
    pub fn all(&self, now: Duration, window: Window) -> (Vec<GoldenSignals>, SystemSignals) {
        let (slot, covered_s) = self.read(now, window);
        let golden = Workload::ALL
            .iter()
            .map(|&w| golden_from(&slot.workloads[w.index()], w, window, covered_s))
            .collect();
        (golden, system_from(&slot.system, window, covered_s))
    }
}

fn system_from(s: &SystemSlot, window: Window, covered_s: f64) -> SystemSignals {
    let requests = s.cache[0] + s.cache[1];
    SystemSignals {
        window,
        covered_s,
        cache_hit_rate: ratio(s.cache[CacheResult::Hit.index()], requests),
        cache_requests: requests,
        utilization_mean: (s.device_samples > 0)
            .then(|| s.utilization_sum / s.device_samples as f64),
        utilization_max: (s.device_samples > 0).then_some(s.utilization_max),
        headroom_min: s.headroom_min,
        ooms: s.ooms,
        timeouts: s.timeouts,
    }
}

fn golden_from(
    w: &WorkloadSlot,
    workload: Workload,
    window: Window,
    covered_s: f64,
) -> GoldenSignals {
    let per_second = |n: u64| {
        if covered_s > 0.0 {
            n as f64 / covered_s
        } else {
            0.0
        }
    };
    let produced = w.frames[FrameKind::Produced.index()];
    let delivered = w.frames[FrameKind::Delivered.index()];
    let dropped = w.frames[FrameKind::Dropped.index()];
    let duplicated = w.frames[FrameKind::Duplicated.index()];
    let produced_fps = per_second(produced);
    let delivered_fps = per_second(delivered);
    let delivered_intervals = &w.intervals[FrameSide::Delivered.index()];
    let finished: u64 = w.outcomes.iter().sum();
    let cancelled = w.outcomes[Outcome::Cancelled.index()];
    GoldenSignals {
        workload,
        window,
        covered_s,
        produced_fps,
        delivered_fps,
        fps_health: (produced > 0).then(|| delivered_fps / produced_fps),
        frame_interval_produced: w.intervals[FrameSide::Produced.index()]
            .percentiles(FRAME_INTERVAL_BUCKETS),
        frame_interval_delivered: delivered_intervals.percentiles(FRAME_INTERVAL_BUCKETS),
        smooth_interval_ratio: ratio(
            delivered_intervals.count_at_most(
                FRAME_INTERVAL_BUCKETS,
                crate::catalogue::LATE_FRAME_INTERVAL_24FPS_S,
            ),
            delivered_intervals.count(),
        ),
        frames_produced: produced,
        frames_delivered: delivered,
        dropped_ratio: ratio(dropped, produced),
        duplicated_ratio: ratio(duplicated, delivered),
        render_latency: w.render_latency.percentiles(RENDER_LATENCY_BUCKETS),
        jobs_finished: finished,
        success_ratio: ratio(w.outcomes[Outcome::Success.index()], finished - cancelled),
        jobs_per_minute: per_second(finished) * 60.0,
        images_per_second: per_second(w.images),
        queue_wait: w.queue_wait.percentiles(QUEUE_WAIT_BUCKETS),
        inference: w.inference.percentiles(STAGE_DURATION_BUCKETS),
        postprocess: w.postprocess.percentiles(STAGE_DURATION_BUCKETS),
        queue_depth_start: w.depth_first,
        queue_depth_end: w.depth_last,
        queue_depth_max: w.depth_max,
        timeouts_and_ooms: w.outcomes[Outcome::Timeout.index()] + w.outcomes[Outcome::Oom.index()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let edges = &[1.0, 2.0, 4.0];
        let mut b = Buckets::default();
        for v in [0.5, 1.5, 1.5, 3.0] {
            b.record(edges, v);
        }
        // rank 2 of 4 falls halfway through the (1, 2] bucket holding 2 values.
        assert_eq!(b.quantile(edges, 0.5), Some(1.5));
        assert_eq!(b.quantile(edges, 1.0), Some(4.0));
        assert_eq!(b.count_at_most(edges, 2.0), 3);
        b.record(edges, 100.0);
        assert_eq!(b.quantile(edges, 1.0), Some(4.0));
        assert_eq!(Buckets::default().quantile(edges, 0.5), None);
    }

    #[test]
    fn value_on_an_edge_counts_in_that_bucket() {
        let mut b = Buckets::default();
        b.record(RENDER_LATENCY_BUCKETS, 5.0);
        assert_eq!(b.count_at_most(RENDER_LATENCY_BUCKETS, 5.0), 1);
        assert_eq!(b.count_at_most(RENDER_LATENCY_BUCKETS, 4.0), 0);
    }

    #[test]
    fn fps_and_health_come_from_frame_counts() {
        let windows = Windows::new(Duration::ZERO);
        // 120 s of frames: produced at 30 FPS, delivered at 18 FPS.
        for i in 0..(120 * 30) {
            windows.frame(
                secs(i as f64 / 30.0),
                Workload::Animation,
                FrameSide::Produced,
                Some(secs(1.0 / 30.0)),
            );
        }
        for i in 0..(120 * 18) {
            windows.frame(
                secs(i as f64 / 18.0),
                Workload::Animation,
                FrameSide::Delivered,
                Some(secs(1.0 / 18.0)),
            );
        }
        let g = windows.golden(secs(120.0), Workload::Animation, Window::TwoMinutes);
        assert!((g.produced_fps - 30.0).abs() < 0.5, "{}", g.produced_fps);
        assert!((g.delivered_fps - 18.0).abs() < 0.5, "{}", g.delivered_fps);
        assert!((g.fps_health.unwrap() - 0.6).abs() < 0.01);
        assert_eq!(g.smooth_interval_ratio, Some(0.0));
        let other = windows.golden(secs(120.0), Workload::Batch, Window::TwoMinutes);
        assert_eq!(other.fps_health, None);
    }

    #[test]
    fn short_window_forgets_what_the_long_one_keeps() {
        let windows = Windows::new(Duration::ZERO);
        windows.job_finished(secs(10.0), Workload::Batch, Outcome::Failed, secs(1.0), 0);
        for s in 0..10 {
            windows.job_finished(
                secs(400.0 + s as f64),
                Workload::Batch,
                Outcome::Success,
                secs(2.0),
                4,
            );
        }
        let now = secs(420.0);
        let short = windows.golden(now, Workload::Batch, Window::TwoMinutes);
        let long = windows.golden(now, Workload::Batch, Window::FifteenMinutes);
        assert_eq!(short.success_ratio, Some(1.0));
        assert_eq!(long.jobs_finished, 11);
        assert!((long.success_ratio.unwrap() - 10.0 / 11.0).abs() < 1e-9);
        assert_eq!(short.render_latency.count, 10);
    }

    #[test]
    fn queue_depth_trend_spans_the_window() {
        let windows = Windows::new(Duration::ZERO);
        for (t, depth) in [(0.0, 1), (100.0, 5), (200.0, 9), (201.0, 12), (202.0, 11)] {
            windows.queue_depth(secs(t), Workload::SingleImage, depth);
        }
        let g = windows.golden(secs(202.0), Workload::SingleImage, Window::FifteenMinutes);
        assert_eq!(g.queue_depth_start, Some(1));
        assert_eq!(g.queue_depth_end, Some(11));
        assert_eq!(g.queue_depth_max, 12);
    }

    #[test]
    fn system_window_averages_device_samples() {
        let windows = Windows::new(Duration::ZERO);
        windows.device(secs(1.0), 0.8, 0.3);
        windows.device(secs(6.0), 1.0, 0.1);
        windows.cache(secs(2.0), CacheResult::Hit);
        windows.cache(secs(3.0), CacheResult::Miss);
        windows.cache(secs(4.0), CacheResult::Hit);
        let s = windows.system(secs(10.0), Window::TwoMinutes);
        assert!((s.utilization_mean.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(s.utilization_max, Some(1.0));
        assert_eq!(s.headroom_min, Some(0.1));
        assert!((s.cache_hit_rate.unwrap() - 2.0 / 3.0).abs() < 1e-9);
    }
}
