//! SLOs: targets (DESIGN.md section 6) loaded from TOML, good/bad event rings, error budgets
//! and multi-window burn rates.
//!
//! Every SLO is a ratio of good events to all events. Each event lands in a ring of
//! 1-minute slots spanning 3 days, which is enough to answer every window of the SRE
//! workbook's multi-window alerts (5m, 30m, 1h, 2h, 6h, 1d, 3d). Burn rate over a window is
//! the window's bad ratio over the allowed bad ratio (`1 - objective`): 1 spends the budget
//! exactly over the budget period, 14.4 spends a 30-day budget in about 2 days.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TelemetryError};
use crate::labels::Workload;
use crate::ring::{SlotData, SlotRing};

/// The SLOs sakuga evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SloId {
    /// Animation: delivered frame intervals at or under 1/min_fps.
    AnimationFps,
    /// Animation: produced frames that were not dropped.
    AnimationDroppedFrames,
    /// Single image: renders within the latency target for their resolution class.
    SingleImageLatency,
    /// Batch: jobs that succeeded.
    BatchSuccess,
    /// Batch: jobs that waited at most the queue wait target.
    BatchQueueWait,
    /// System: device samples with enough memory headroom.
    MemoryHeadroom,
    /// All workloads: requests that did not end in a timeout or OOM.
    TimeoutsAndOoms,
}

impl SloId {
    pub const ALL: &'static [SloId] = &[
        SloId::AnimationFps,
        SloId::AnimationDroppedFrames,
        SloId::SingleImageLatency,
        SloId::BatchSuccess,
        SloId::BatchQueueWait,
        SloId::MemoryHeadroom,
        SloId::TimeoutsAndOoms,
    ];

    /// Bad events a burn needs in its short window before it pages or files a ticket.
    pub const fn min_bad_events_to_alert(self) -> u64 {
        match self {
            SloId::AnimationFps | SloId::AnimationDroppedFrames => {
                crate::catalogue::MIN_BAD_FRAMES_TO_ALERT
            }
            _ => 0,
        }
    }

    /// The `slo` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            SloId::AnimationFps => "animation_fps",
            SloId::AnimationDroppedFrames => "animation_dropped_frames",
            SloId::SingleImageLatency => "single_image_latency",
            SloId::BatchSuccess => "batch_success",
            SloId::BatchQueueWait => "batch_queue_wait",
            SloId::MemoryHeadroom => "memory_headroom",
            SloId::TimeoutsAndOoms => "timeouts_and_ooms",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Burn-rate windows, shortest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BurnWindow {
    #[serde(rename = "5m")]
    M5,
    #[serde(rename = "30m")]
    M30,
    #[serde(rename = "1h")]
    H1,
    #[serde(rename = "2h")]
    H2,
    #[serde(rename = "6h")]
    H6,
    #[serde(rename = "1d")]
    D1,
    #[serde(rename = "3d")]
    D3,
}

impl BurnWindow {
    pub const ALL: &'static [BurnWindow] = &[
        BurnWindow::M5,
        BurnWindow::M30,
        BurnWindow::H1,
        BurnWindow::H2,
        BurnWindow::H6,
        BurnWindow::D1,
        BurnWindow::D3,
    ];

    /// The `window` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            BurnWindow::M5 => "5m",
            BurnWindow::M30 => "30m",
            BurnWindow::H1 => "1h",
            BurnWindow::H2 => "2h",
            BurnWindow::H6 => "6h",
            BurnWindow::D1 => "1d",
            BurnWindow::D3 => "3d",
        }
    }

    pub const fn minutes(self) -> usize {
        match self {
            BurnWindow::M5 => 5,
            BurnWindow::M30 => 30,
            BurnWindow::H1 => 60,
            BurnWindow::H2 => 120,
            BurnWindow::H6 => 360,
            BurnWindow::D1 => 1440,
            BurnWindow::D3 => 4320,
        }
    }
}

/// Animation targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnimationSlo {
    /// Delivered FPS floor for smooth previews.
    pub min_fps: f64,
    /// Share of delivered frame intervals that must meet `min_fps`.
    pub fps_objective: f64,
    /// Dropped frames allowed, as a share of produced frames.
    pub max_dropped_ratio: f64,
    /// Delivered FPS may deviate this much from produced FPS before it counts as degraded.
    pub max_fps_deviation: f64,
}

impl Default for AnimationSlo {
    fn default() -> Self {
        AnimationSlo {
            min_fps: 24.0,
            fps_objective: 0.99,
            max_dropped_ratio: 0.02,
            max_fps_deviation: 0.20,
        }
    }
}

/// Single-image targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SingleImageSlo {
    /// Latency target (seconds) at the reference resolution.
    pub latency_target_s: f64,
    /// Share of renders that must meet it (0.95 = a p95 target).
    pub objective: f64,
    /// Reference resolution; larger images get a target scaled by their pixel count.
    pub reference_width: u32,
    pub reference_height: u32,
}

impl Default for SingleImageSlo {
    fn default() -> Self {
        SingleImageSlo {
            latency_target_s: 5.0,
            objective: 0.95,
            reference_width: 768,
            reference_height: 768,
        }
    }
}

/// Batch targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchSlo {
    pub success_objective: f64,
    pub queue_wait_target_s: f64,
    /// Share of jobs that must wait at most the target (0.95 = a p95 target).
    pub queue_wait_objective: f64,
}

impl Default for BatchSlo {
    fn default() -> Self {
        BatchSlo {
            success_objective: 0.995,
            queue_wait_target_s: 30.0,
            queue_wait_objective: 0.95,
        }
    }
}

/// System targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemSlo {
    /// Free device memory floor, as a share of capacity.
    pub min_headroom_ratio: f64,
    pub headroom_objective: f64,
    /// Utilization band wanted under load.
    pub utilization_low: f64,
    pub utilization_high: f64,
}

impl Default for SystemSlo {
    fn default() -> Self {
        SystemSlo {
            min_headroom_ratio: 0.12,
            headroom_objective: 0.99,
            utilization_low: 0.70,
            utilization_high: 0.90,
        }
    }
}

/// Overrides thresholds for jobs matching every key that is set.
///
/// The most specific matching override wins (most keys set); among equals, the later one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SloOverride {
    pub workload: Option<Workload>,
    pub model: Option<String>,
    pub resolution_class: Option<ResolutionClass>,
    pub min_fps: Option<f64>,
    pub latency_target_s: Option<f64>,
    pub queue_wait_target_s: Option<f64>,
}

impl SloOverride {
    fn matches(&self, workload: Workload, model: Option<&str>, class: ResolutionClass) -> bool {
        self.workload.is_none_or(|w| w == workload)
            && self.model.as_deref().is_none_or(|m| Some(m) == model)
            && self.resolution_class.is_none_or(|c| c == class)
    }

    fn specificity(&self) -> usize {
        usize::from(self.workload.is_some())
            + usize::from(self.model.is_some())
            + usize::from(self.resolution_class.is_some())
    }
}

/// Coarse resolution classes for SLO overrides (by pixel count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionClass {
    /// Up to 512x512.
    Small,
    /// Up to 768x768.
    Standard,
    /// Up to 1024x1024.
    Large,
    /// Anything bigger.
    Huge,
}

impl ResolutionClass {
    pub fn of(width: u32, height: u32) -> ResolutionClass {
        let pixels = u64::from(width) * u64::from(height);
        match pixels {
            0..=262_144 => ResolutionClass::Small,
            262_145..=589_824 => ResolutionClass::Standard,
            589_825..=1_048_576 => ResolutionClass::Large,
            _ => ResolutionClass::Huge,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            ResolutionClass::Small => "small",
            ResolutionClass::Standard => "standard",
            ResolutionClass::Large => "large",
            ResolutionClass::Huge => "huge",
        }
    }
}

/// All SLO targets; `Default` gives DESIGN.md's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SloConfig {
    pub animation: AnimationSlo,
    pub single_image: SingleImageSlo,
    pub batch: BatchSlo,
    pub system: SystemSlo,
    /// Timeouts plus OOMs allowed, as a share of requests.
    pub max_timeout_oom_ratio: f64,
    /// Period the error budget is counted over, in minutes (at most 3 days).
    pub budget_period_minutes: u32,
    pub overrides: Vec<SloOverride>,
}

impl Default for SloConfig {
    fn default() -> Self {
        SloConfig {
            animation: AnimationSlo::default(),
            single_image: SingleImageSlo::default(),
            batch: BatchSlo::default(),
            system: SystemSlo::default(),
            max_timeout_oom_ratio: 0.005,
            budget_period_minutes: 1440,
            overrides: Vec::new(),
        }
    }
}

impl SloConfig {
    /// Parses TOML; absent keys keep their defaults.
    ///
    /// # Errors
    /// [`TelemetryError::Config`] naming `origin` when the text does not parse.
    pub fn from_toml(text: &str, origin: &Path) -> Result<SloConfig> {
        toml::from_str(text).map_err(|source| TelemetryError::Config {
            path: origin.to_path_buf(),
            source,
        })
    }

    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// [`TelemetryError::Io`] or [`TelemetryError::Config`] naming `path`.
    pub fn load(path: &Path) -> Result<SloConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| TelemetryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// The target ratio of an SLO.
    pub fn objective(&self, slo: SloId) -> f64 {
        match slo {
            SloId::AnimationFps => self.animation.fps_objective,
            SloId::AnimationDroppedFrames => 1.0 - self.animation.max_dropped_ratio,
            SloId::SingleImageLatency => self.single_image.objective,
            SloId::BatchSuccess => self.batch.success_objective,
            SloId::BatchQueueWait => self.batch.queue_wait_objective,
            SloId::MemoryHeadroom => self.system.headroom_objective,
            SloId::TimeoutsAndOoms => 1.0 - self.max_timeout_oom_ratio,
        }
    }

    fn best_override(
        &self,
        workload: Workload,
        model: Option<&str>,
        class: ResolutionClass,
        field: impl Fn(&SloOverride) -> Option<f64>,
    ) -> Option<f64> {
        self.overrides
            .iter()
            .filter(|o| o.matches(workload, model, class) && field(o).is_some())
            .max_by_key(|o| o.specificity())
            .and_then(field)
    }

    /// Render latency target for a job; without an override, the reference target scaled
    /// up by pixel count for images larger than the reference resolution.
    pub fn latency_target(
        &self,
        workload: Workload,
        model: Option<&str>,
        width: u32,
        height: u32,
    ) -> Duration {
        let class = ResolutionClass::of(width, height);
        let target = self
            .best_override(workload, model, class, |o| o.latency_target_s)
            .unwrap_or_else(|| {
                let reference = f64::from(self.single_image.reference_width)
                    * f64::from(self.single_image.reference_height);
                let pixels = f64::from(width) * f64::from(height);
                let scale = if reference > 0.0 {
                    (pixels / reference).max(1.0)
                } else {
                    1.0
                };
                self.single_image.latency_target_s * scale
            });
        Duration::from_secs_f64(target.max(0.0))
    }

    /// Delivered FPS floor for a stream.
    pub fn min_fps(&self, model: Option<&str>, width: u32, height: u32) -> f64 {
        let class = ResolutionClass::of(width, height);
        self.best_override(Workload::Animation, model, class, |o| o.min_fps)
            .unwrap_or(self.animation.min_fps)
    }

    /// Queue wait target for a job.
    pub fn queue_wait_target(&self, workload: Workload, model: Option<&str>) -> Duration {
        let target = self
            .best_override(workload, model, ResolutionClass::Standard, |o| {
                o.queue_wait_target_s
            })
            .unwrap_or(self.batch.queue_wait_target_s);
        Duration::from_secs_f64(target.max(0.0))
    }
}

/// Number of SLOs, for per-SLO arrays.
const SLO_COUNT: usize = SloId::ALL.len();

/// Good and bad counts of every SLO in one minute.
#[derive(Debug, Clone, Copy, Default)]
pub struct SloSlot {
    good: [u64; SLO_COUNT],
    bad: [u64; SLO_COUNT],
}

impl SlotData for SloSlot {
    fn merge(&mut self, other: &Self) {
        for i in 0..SLO_COUNT {
            // Saturating: counts come partly from clients and must never wrap to small.
            self.good[i] = self.good[i].saturating_add(other.good[i]);
            self.bad[i] = self.bad[i].saturating_add(other.bad[i]);
        }
    }
}

/// Where an SLO stands now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SloStatus {
    pub slo: SloId,
    pub objective: f64,
    /// Events over the budget period.
    pub total: u64,
    pub bad: u64,
    /// Good over total over the budget period (`None` without events).
    pub good_ratio: Option<f64>,
    /// 1 untouched, 0 spent, negative overspent.
    pub error_budget_remaining: f64,
    /// Burn rate per window, shortest first.
    pub burn_rates: Vec<(BurnWindow, f64)>,
    /// Fast burn (1h and 5m over 14.4, or 6h and 30m over 6): page.
    pub page: bool,
    /// Slow burn (1d and 2h over 3, or 3d and 6h over 1): ticket.
    pub ticket: bool,
}

impl SloStatus {
    pub fn burn_rate(&self, window: BurnWindow) -> f64 {
        self.burn_rates
            .iter()
            .find(|(w, _)| *w == window)
            .map_or(0.0, |(_, rate)| *rate)
    }
}

/// Length of one SLO slot.
const SLO_SLOT: Duration = Duration::from_secs(60);

/// The good/bad rings of every SLO.
#[derive(Debug)]
pub struct SloTracker {
    ring: SlotRing<SloSlot>,
}

impl Default for SloTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl SloTracker {
    pub fn new() -> Self {
        SloTracker {
            ring: SlotRing::new(SLO_SLOT, BurnWindow::D3.minutes()),
        }
    }

    /// Counts `good` and `bad` events of one SLO at `at`.
    #[inline]
    pub fn record(&self, at: Duration, slo: SloId, good: u64, bad: u64) {
        self.ring.record(at, |slot| {
            let i = slo.index();
            slot.good[i] = slot.good[i].saturating_add(good);
            slot.bad[i] = slot.bad[i].saturating_add(bad);
        });
    }

    /// One event, good or bad.
    #[inline]
    pub fn event(&self, at: Duration, slo: SloId, is_good: bool) {
        if is_good {
            self.record(at, slo, 1, 0);
        } else {
            self.record(at, slo, 0, 1);
        }
    }

    /// Bad over total of one SLO over the last `minutes` (`None` without events).
    pub fn bad_ratio(&self, now: Duration, slo: SloId, minutes: usize) -> Option<f64> {
        let sum = self.ring.sum_recent(now, minutes);
        let (good, bad) = (sum.good[slo.index()], sum.bad[slo.index()]);
        let total = good as f64 + bad as f64;
        (total > 0.0).then(|| bad as f64 / total)
    }

    /// Burn rate of one SLO over one window; 0 without events.
    pub fn burn_rate(&self, now: Duration, slo: SloId, objective: f64, window: BurnWindow) -> f64 {
        let allowed = (1.0 - objective).max(f64::EPSILON);
        self.bad_ratio(now, slo, window.minutes())
            .map_or(0.0, |bad| bad / allowed)
    }

    /// Status of one SLO at `now`.
    pub fn status(&self, now: Duration, slo: SloId, config: &SloConfig) -> SloStatus {
        let objective = config.objective(slo);
        let allowed = (1.0 - objective).max(f64::EPSILON);
        let period = (config.budget_period_minutes as usize).clamp(1, BurnWindow::D3.minutes());
        let sum = self.ring.sum_recent(now, period);
        let (good, bad) = (sum.good[slo.index()], sum.bad[slo.index()]);
        let total = good + bad;
        let bad_ratio = if total > 0 {
            bad as f64 / total as f64
        } else {
            0.0
        };
        let burn_rates: Vec<(BurnWindow, f64)> = BurnWindow::ALL
            .iter()
            .map(|&w| (w, self.burn_rate(now, slo, objective, w)))
            .collect();
        let rate = |w: BurnWindow| {
            burn_rates
                .iter()
                .find(|(x, _)| *x == w)
                .map_or(0.0, |r| r.1)
        };
        let burning = |long: BurnWindow, short: BurnWindow, factor: f64| {
            rate(long) > factor
                && rate(short) > factor
                && self.ring.sum_recent(now, short.minutes()).bad[slo.index()]
                    >= slo.min_bad_events_to_alert()
        };
        let page = burning(BurnWindow::H1, BurnWindow::M5, 14.4)
            || burning(BurnWindow::H6, BurnWindow::M30, 6.0);
        let ticket = burning(BurnWindow::D1, BurnWindow::H2, 3.0)
            || burning(BurnWindow::D3, BurnWindow::H6, 1.0);
        SloStatus {
            slo,
            objective,
            total,
            bad,
            good_ratio: (total > 0).then(|| good as f64 / total as f64),
            error_budget_remaining: 1.0 - bad_ratio / allowed,
            burn_rates,
            page,
            ticket,
        }
    }

    /// Status of every SLO.
    pub fn all(&self, now: Duration, config: &SloConfig) -> Vec<SloStatus> {
        SloId::ALL
            .iter()
            .map(|&slo| self.status(now, slo, config))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn burn_rates_match_hand_computed_values_for_a_99_5_percent_slo() {
        // Batch success, objective 99.5%: the allowed bad ratio is 0.005.
        let config = SloConfig::default();
        let tracker = SloTracker::new();
        let start = Duration::from_secs(10 * 3600);
        // Hours 0-5 of the last 6: 1000 jobs/hour, 5 bad (exactly on budget).
        for hour in 0..5u32 {
            let at = start + hour * 60 * MINUTE;
            tracker.record(at, SloId::BatchSuccess, 995, 5);
        }
        // The last hour: 1000 jobs, 72 bad, all in its last 5 minutes (60 good, 72 bad).
        let last_hour = start + 5 * 60 * MINUTE;
        tracker.record(last_hour, SloId::BatchSuccess, 868, 0);
        let now = last_hour + 59 * MINUTE;
        tracker.record(now - 2 * MINUTE, SloId::BatchSuccess, 60, 72);
        let status = tracker.status(now, SloId::BatchSuccess, &config);

        // 5m: 72 bad of 132 -> 0.54545 / 0.005 = 109.09.
        assert!(close(
            status.burn_rate(BurnWindow::M5),
            (72.0 / 132.0) / 0.005
        ));
        // 1h: 72 bad of 1000 -> 0.072 / 0.005 = 14.4 (not above 14.4: no fast page).
        assert!(close(status.burn_rate(BurnWindow::H1), 14.4));
        // 6h: 25 + 72 = 97 bad of 6000 -> 0.0161667 / 0.005 = 3.2333.
        assert!(close(
            status.burn_rate(BurnWindow::H6),
            97.0 / 6000.0 / 0.005
        ));
        // 1d and 3d see the same 6000 events.
        assert!(close(
            status.burn_rate(BurnWindow::D1),
            97.0 / 6000.0 / 0.005
        ));
        assert!(close(
            status.burn_rate(BurnWindow::D3),
            97.0 / 6000.0 / 0.005
        ));
        // Budget over 1 day: 1 - 3.2333 = -2.2333 (overspent).
        assert!(close(
            status.error_budget_remaining,
            1.0 - 97.0 / 6000.0 / 0.005
        ));
        assert_eq!(status.total, 6000);
        assert_eq!(status.bad, 97);
        assert!(!status.page, "1h burn is exactly 14.4, not over it");
        // 2h: 72 + 5 = 77 of 2000 = 7.7 > 3 and 1d > 3: ticket.
        assert!(close(
            status.burn_rate(BurnWindow::H2),
            77.0 / 2000.0 / 0.005
        ));
        assert!(status.ticket);
        assert!(close(status.objective, 0.995));
    }

    #[test]
    fn fast_burn_pages_only_when_both_windows_burn() {
        let config = SloConfig::default();
        let tracker = SloTracker::new();
        let now = Duration::from_secs(3600 * 5);
        // 10% bad in the last 5 minutes only: 5m burns at 20, 1h at 20 too (same events).
        tracker.record(now, SloId::BatchSuccess, 90, 10);
        assert!(tracker.status(now, SloId::BatchSuccess, &config).page);
        // Dilute the hour with good events from 30 minutes ago: 1h drops under 14.4.
        tracker.record(now - 30 * MINUTE, SloId::BatchSuccess, 900, 0);
        let status = tracker.status(now, SloId::BatchSuccess, &config);
        assert!(close(
            status.burn_rate(BurnWindow::H1),
            10.0 / 1000.0 / 0.005
        ));
        assert!(!status.page);
    }

    #[test]
    fn a_few_late_frames_on_a_fresh_stream_do_not_page_until_a_second_of_them() {
        let config = SloConfig::default();
        let tracker = SloTracker::new();
        let now = Duration::from_secs(3600 * 5);
        // A fresh 10-frame preview with one late interval: 10% bad, 10x the 1% budget.
        tracker.record(now, SloId::AnimationFps, 9, 1);
        let status = tracker.status(now, SloId::AnimationFps, &config);
        assert!(status.burn_rate(BurnWindow::M5) > 6.0);
        assert!(!status.page && !status.ticket, "one late frame paged");
        // A second's worth of late frames at the same ratio is a real burn.
        tracker.record(now, SloId::AnimationFps, 207, 23);
        let status = tracker.status(now, SloId::AnimationFps, &config);
        assert_eq!(status.bad, crate::catalogue::MIN_BAD_FRAMES_TO_ALERT);
        assert!(status.page);
    }

    #[test]
    fn untouched_slo_has_full_budget() {
        let status =
            SloTracker::new().status(Duration::ZERO, SloId::AnimationFps, &SloConfig::default());
        assert_eq!(status.error_budget_remaining, 1.0);
        assert_eq!(status.good_ratio, None);
        assert!(status.burn_rates.iter().all(|(_, r)| *r == 0.0));
    }

    #[test]
    fn config_loads_from_toml_with_defaults_and_overrides() {
        let text = r#"
            max_timeout_oom_ratio = 0.01
            [animation]
            min_fps = 30.0
            [[overrides]]
            workload = "single_image"
            resolution_class = "large"
            latency_target_s = 8.0
            [[overrides]]
            workload = "single_image"
            model = "sdxl.safetensors"
            resolution_class = "large"
            latency_target_s = 12.0
        "#;
        let config = SloConfig::from_toml(text, Path::new("slo.toml")).unwrap();
        assert_eq!(config.animation.min_fps, 30.0);
        assert_eq!(config.animation.fps_objective, 0.99);
        assert!(close(config.objective(SloId::TimeoutsAndOoms), 0.99));
        let w = Workload::SingleImage;
        assert_eq!(
            config.latency_target(w, None, 1024, 1024),
            Duration::from_secs(8)
        );
        assert_eq!(
            config.latency_target(w, Some("sdxl.safetensors"), 1024, 1024),
            Duration::from_secs(12)
        );
        // No override for the standard class: the reference 5 s.
        assert_eq!(
            config.latency_target(w, None, 768, 768),
            Duration::from_secs(5)
        );
        let err = SloConfig::from_toml("animation = 3", Path::new("bad.toml")).unwrap_err();
        assert!(err.to_string().contains("bad.toml"));
    }

    #[test]
    fn latency_target_scales_with_pixels_without_overrides() {
        let config = SloConfig::default();
        let big = config.latency_target(Workload::SingleImage, None, 1536, 768);
        assert_eq!(big, Duration::from_secs(10));
        let small = config.latency_target(Workload::SingleImage, None, 512, 512);
        assert_eq!(small, Duration::from_secs(5));
    }
}
