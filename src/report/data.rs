//! What a report is drawn from, whichever the source: per-day (and per-hour, for the worst
//! hour) numbers over a period, plus deploy and config markers. The embedded history is
//! turned into it here; the Prometheus source fills it from range queries (`prom.rs`).

use std::collections::BTreeMap;

use serde::Serialize;

use sakuga_telemetry::history::{HistoryRead, JobSummary};
use sakuga_telemetry::{ErrorKind, Outcome, Stage, Workload};

pub const DAY_S: f64 = 86_400.0;
pub const HOUR_S: f64 = 3_600.0;
/// Single-image latency SLO threshold and batch queue-wait threshold (DESIGN.md section 6).
pub const LATENCY_TARGET_S: f64 = 5.0;
pub const QUEUE_WAIT_TARGET_S: f64 = 30.0;

/// A time range cut into whole days: day `i` is `[from + i * DAY_S, from + (i + 1) * DAY_S)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Period {
    pub from: f64,
    pub to: f64,
}

impl Period {
    pub fn days(&self) -> usize {
        ((self.to - self.from) / DAY_S).ceil().max(1.0) as usize
    }

    pub fn hours(&self) -> usize {
        ((self.to - self.from) / HOUR_S).ceil().max(1.0) as usize
    }

    /// The period of the same length just before this one.
    pub fn previous(&self) -> Period {
        let len = self.to - self.from;
        Period {
            from: self.from - len,
            to: self.from,
        }
    }

    pub fn day_of(&self, at: f64) -> Option<usize> {
        (at >= self.from && at < self.to).then(|| ((at - self.from) / DAY_S) as usize)
    }

    fn hour_of(&self, at: f64) -> Option<usize> {
        (at >= self.from && at < self.to).then(|| ((at - self.from) / HOUR_S) as usize)
    }
}

/// p50/p95/p99 of something in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (sorted here).
    pub fn of(mut values: Vec<f64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            Some(values[i - 1])
        };
        Percentiles {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
        }
    }
}

/// Bad events over all events of an SLO; `None` ratio when nothing happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Ratio {
    pub bad: f64,
    pub total: f64,
}

impl Ratio {
    pub fn value(&self) -> Option<f64> {
        (self.total > 0.0).then(|| self.bad / self.total)
    }

    fn add_counts(&mut self, bad: f64, total: f64) {
        self.bad += bad;
        self.total += total;
    }
}

/// One SLO over the period: its bad ratio per day and per hour, and over the whole period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SloSeries {
    pub name: String,
    pub alert: String,
    pub objective: f64,
    pub description: String,
    /// Bad ratio per day (`None`: no events that day).
    pub daily: Vec<Option<f64>>,
    pub hourly: Vec<Option<f64>>,
    pub period: Option<f64>,
}

/// One workload's day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct WorkloadDay {
    pub latency: Percentiles,
    pub queue_wait: Percentiles,
    /// Jobs that finished, by outcome index ([`Outcome::ALL`] order).
    pub finished: [f64; 5],
}

impl WorkloadDay {
    pub fn total(&self) -> f64 {
        self.finished.iter().sum()
    }

    pub fn outcome(&self, outcome: Outcome) -> f64 {
        self.finished[outcome.index()]
    }
}

/// The animation streams' day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AnimationDay {
    pub produced_fps: Option<f64>,
    pub delivered_fps: Option<f64>,
    pub produced: f64,
    pub delivered: f64,
    pub dropped: f64,
    pub duplicated: f64,
    pub late: f64,
}

impl AnimationDay {
    /// Delivered over produced FPS.
    pub fn fps_health(&self) -> Option<f64> {
        match (self.produced_fps, self.delivered_fps) {
            (Some(p), Some(d)) if p > 0.0 => Some(d / p),
            _ => None,
        }
    }
}

/// A deploy (the version changed) or a config change (the generation stepped).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarkerPoint {
    pub at: f64,
    pub kind: MarkerKind,
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkerKind {
    Deploy,
    Config,
}

/// Errors of one kind at one stage, per day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorSeries {
    pub kind: ErrorKind,
    pub stage: Stage,
    pub daily: Vec<f64>,
}

impl ErrorSeries {
    pub fn total(&self) -> f64 {
        self.daily.iter().sum()
    }
}

/// Failed jobs of one model and settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failing {
    pub model: String,
    pub settings: String,
    pub failed: u64,
    pub total: u64,
    pub kinds: BTreeMap<String, u64>,
}

/// Everything a report is drawn from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dataset {
    /// Where it came from, in words.
    pub source: String,
    pub period: Period,
    pub slos: Vec<SloSeries>,
    pub workloads: BTreeMap<Workload, Vec<WorkloadDay>>,
    pub animation: Vec<AnimationDay>,
    /// Errors per kind and stage, per day.
    pub errors: Vec<ErrorSeries>,
    /// Top failing models and settings; `None` where the source has no such detail
    /// (Prometheus labels stay low-cardinality).
    pub failing: Option<Vec<Failing>>,
    pub markers: Vec<MarkerPoint>,
    /// Finished jobs in the period (all workloads and outcomes).
    pub jobs: f64,
}

impl Dataset {
    /// Timeouts plus OOMs over all finished jobs, per day.
    pub fn timeouts_and_ooms(&self) -> Vec<Ratio> {
        let mut days = vec![Ratio::default(); self.period.days()];
        for workload_days in self.workloads.values() {
            for (day, w) in days.iter_mut().zip(workload_days) {
                let bad = w.outcome(Outcome::Timeout) + w.outcome(Outcome::Oom);
                day.add_counts(bad, w.total());
            }
        }
        days
    }

    /// OOMs per day over all workloads.
    pub fn ooms(&self) -> Vec<f64> {
        let mut days = vec![0.0; self.period.days()];
        for workload_days in self.workloads.values() {
            for (day, w) in days.iter_mut().zip(workload_days) {
                *day += w.outcome(Outcome::Oom);
            }
        }
        days
    }
}

/// The events a job adds to an SLO: (bad, total) counts, or nothing.
fn slo_events(name: &str, job: &JobSummary) -> Option<(f64, f64)> {
    let failed = matches!(
        job.outcome,
        Outcome::Failed | Outcome::Timeout | Outcome::Oom
    );
    let one = |bad: bool| Some((f64::from(u8::from(bad)), 1.0));
    match (name, job.workload) {
        ("animation_fps", Workload::Animation) => {
            let intervals = job.frames.delivered.saturating_sub(1) as f64;
            (intervals > 0.0).then_some((job.frames.late as f64, intervals))
        }
        ("animation_dropped_frames", Workload::Animation) => (job.frames.produced > 0)
            .then_some((job.frames.dropped as f64, job.frames.produced as f64)),
        ("single_image_latency", Workload::SingleImage) => one(job.latency_s > LATENCY_TARGET_S),
        ("batch_success", Workload::Batch) if job.outcome != Outcome::Cancelled => one(failed),
        ("batch_queue_wait", Workload::Batch) => job
            .queue_wait_s
            .map(|w| (f64::from(u8::from(w > QUEUE_WAIT_TARGET_S)), 1.0)),
        ("timeouts_and_ooms", _) => one(matches!(job.outcome, Outcome::Timeout | Outcome::Oom)),
        _ => None,
    }
}

/// The dataset of an embedded history read over `period`.
pub fn from_history(read: &HistoryRead, period: Period, source: String) -> Dataset {
    let days = period.days();
    let jobs: Vec<&JobSummary> = read
        .jobs
        .iter()
        .filter(|j| period.day_of(j.finished_at).is_some())
        .collect();
    Dataset {
        source,
        period,
        slos: history_slos(&jobs, period),
        workloads: history_workloads(&jobs, period),
        animation: history_animation(&jobs, period),
        errors: history_errors(&jobs, period, days),
        failing: Some(top_failing(&jobs)),
        markers: history_markers(read, period),
        jobs: jobs.len() as f64,
    }
}

fn history_slos(jobs: &[&JobSummary], period: Period) -> Vec<SloSeries> {
    super::queries::slo_defs()
        .iter()
        .map(|def| {
            let name = def.name.as_str();
            let mut daily = vec![Ratio::default(); period.days()];
            let mut hourly = vec![Ratio::default(); period.hours()];
            let mut whole = Ratio::default();
            for job in jobs {
                let Some((bad, total)) = slo_events(name, job) else {
                    continue;
                };
                if let Some(d) = period.day_of(job.finished_at) {
                    daily[d].add_counts(bad, total);
                }
                if let Some(h) = period.hour_of(job.finished_at) {
                    hourly[h].add_counts(bad, total);
                }
                whole.add_counts(bad, total);
            }
            SloSeries {
                name: def.name.clone(),
                alert: def.alert.clone(),
                objective: def.objective,
                description: def.description.clone(),
                daily: daily.iter().map(Ratio::value).collect(),
                hourly: hourly.iter().map(Ratio::value).collect(),
                period: whole.value(),
            }
        })
        .collect()
}

fn history_workloads(jobs: &[&JobSummary], period: Period) -> BTreeMap<Workload, Vec<WorkloadDay>> {
    let mut out = BTreeMap::new();
    for &workload in Workload::ALL {
        let mut days = vec![WorkloadDay::default(); period.days()];
        let mut latencies = vec![Vec::new(); period.days()];
        let mut waits = vec![Vec::new(); period.days()];
        for job in jobs.iter().filter(|j| j.workload == workload) {
            let Some(d) = period.day_of(job.finished_at) else {
                continue;
            };
            days[d].finished[job.outcome.index()] += 1.0;
            latencies[d].push(job.latency_s);
            if let Some(wait) = job.queue_wait_s {
                waits[d].push(wait);
            }
        }
        for ((day, latency), wait) in days.iter_mut().zip(latencies).zip(waits) {
            day.latency = Percentiles::of(latency);
            day.queue_wait = Percentiles::of(wait);
        }
        out.insert(workload, days);
    }
    out
}

fn history_animation(jobs: &[&JobSummary], period: Period) -> Vec<AnimationDay> {
    let mut days = vec![AnimationDay::default(); period.days()];
    // Mean FPS per day: frames over stream seconds, summed over the day's streams.
    let mut seconds = vec![(0.0, 0.0); period.days()];
    for job in jobs.iter().filter(|j| j.workload == Workload::Animation) {
        let Some(d) = period.day_of(job.finished_at) else {
            continue;
        };
        let f = &job.frames;
        let day = &mut days[d];
        day.produced += f.produced as f64;
        day.delivered += f.delivered as f64;
        day.dropped += f.dropped as f64;
        day.duplicated += f.duplicated as f64;
        day.late += f.late as f64;
        if let Some(fps) = f.produced_fps.filter(|v| *v > 0.0) {
            seconds[d].0 += f.produced.saturating_sub(1) as f64 / fps;
        }
        if let Some(fps) = f.delivered_fps.filter(|v| *v > 0.0) {
            seconds[d].1 += f.delivered.saturating_sub(1) as f64 / fps;
        }
    }
    for (day, (produced_s, delivered_s)) in days.iter_mut().zip(seconds) {
        let streams = |frames: f64, s: f64| (s > 0.0).then(|| frames / s);
        day.produced_fps = streams(day.produced, produced_s);
        day.delivered_fps = streams(day.delivered, delivered_s);
    }
    days
}

fn history_errors(jobs: &[&JobSummary], period: Period, days: usize) -> Vec<ErrorSeries> {
    let mut out: BTreeMap<(ErrorKind, Stage), Vec<f64>> = BTreeMap::new();
    for job in jobs {
        let (Some(kind), Some(d)) = (job.error_kind, period.day_of(job.finished_at)) else {
            continue;
        };
        let stage = job.error_stage.unwrap_or(Stage::Inference);
        out.entry((kind, stage)).or_insert_with(|| vec![0.0; days])[d] += 1.0;
    }
    out.into_iter()
        .map(|((kind, stage), daily)| ErrorSeries { kind, stage, daily })
        .collect()
}

/// Models and settings by failed jobs, most first (ten at most).
fn top_failing(jobs: &[&JobSummary]) -> Vec<Failing> {
    let mut by: BTreeMap<(String, String), Failing> = BTreeMap::new();
    for job in jobs {
        let model = job.model.clone().unwrap_or_else(|| "(no model)".into());
        let settings = job.settings.clone().unwrap_or_default();
        let entry = by
            .entry((model.clone(), settings.clone()))
            .or_insert_with(|| Failing {
                model,
                settings,
                failed: 0,
                total: 0,
                kinds: BTreeMap::new(),
            });
        entry.total += 1;
        if matches!(
            job.outcome,
            Outcome::Failed | Outcome::Timeout | Outcome::Oom
        ) {
            entry.failed += 1;
            let kind = job.error_kind.map_or("internal", ErrorKind::as_str);
            *entry.kinds.entry(kind.to_owned()).or_default() += 1;
        }
    }
    let mut list: Vec<Failing> = by.into_values().filter(|f| f.failed > 0).collect();
    list.sort_by(|a, b| b.failed.cmp(&a.failed).then(a.model.cmp(&b.model)));
    list.truncate(10);
    list
}

/// Markers in the period: a deploy when the version differs from the marker before it
/// (in or before the period), else a config change.
fn history_markers(read: &HistoryRead, period: Period) -> Vec<MarkerPoint> {
    let mut previous_version: Option<&str> = None;
    let mut out = Vec::new();
    for marker in &read.markers {
        let deploy = previous_version.is_some_and(|v| v != marker.version);
        previous_version = Some(&marker.version);
        if period.day_of(marker.at).is_none() {
            continue;
        }
        let (kind, label) = if deploy {
            (MarkerKind::Deploy, format!("deploy {}", marker.version))
        } else {
            (MarkerKind::Config, format!("config #{}", marker.generation))
        };
        out.push(MarkerPoint {
            at: marker.at,
            kind,
            label,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.p99), (Some(50.0), Some(95.0), Some(99.0)));
        assert_eq!(Percentiles::of(Vec::new()).p50, None);
    }

    #[test]
    fn periods_cut_into_days() {
        let p = Period {
            from: 0.0,
            to: 7.0 * DAY_S,
        };
        assert_eq!((p.days(), p.hours()), (7, 168));
        assert_eq!(p.day_of(DAY_S * 2.5), Some(2));
        assert_eq!(p.day_of(DAY_S * 7.0), None);
        assert_eq!(p.previous().from, -7.0 * DAY_S);
    }
}
