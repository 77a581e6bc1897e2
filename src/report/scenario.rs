//! A synthetic fortnight with known truth, for the report's tests and its example page:
//! a healthy first week, then in the second week a deploy on day 3 (10:00) after which one
//! batch job in ten runs out of memory, an FPS regression from day 5 (delivered 18 FPS
//! against 24 produced, while production stays on time), and a latency tail from day 6
//! (one single-image job in ten takes 25 s and queue waits grow).
//!
//! [`entries`] is the job history; [`openmetrics`] the same fortnight as the Prometheus
//! series sakuga exports, for `promtool tsdb create-blocks-from openmetrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sakuga_telemetry::catalogue::{
    FRAME_INTERVAL_BUCKETS, QUEUE_WAIT_BUCKETS, RENDER_LATENCY_BUCKETS,
};
use sakuga_telemetry::history::{FrameTotals, HistoryEntry, JobSummary, Marker};
use sakuga_telemetry::{ErrorKind, Outcome, Stage, Workload};

use super::data::{DAY_S, HOUR_S};

/// What the scenario puts where, relative to the start of the second week (`week`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Truth {
    /// Start of the week under review (day 1 starts here).
    pub week: f64,
    pub deploy_at: f64,
    pub config_change_at: f64,
    /// 0-based day indexes within the week.
    pub oom_day: usize,
    pub fps_day: usize,
    pub latency_day: usize,
}

impl Truth {
    /// The truth of a fortnight ending at `to` (best a whole hour).
    pub fn ending_at(to: f64) -> Truth {
        let week = to - 7.0 * DAY_S;
        Truth {
            week,
            deploy_at: week + 2.0 * DAY_S + 10.0 * HOUR_S,
            config_change_at: week + 3.0 * DAY_S + 15.0 * HOUR_S,
            oom_day: 2,
            fps_day: 4,
            latency_day: 5,
        }
    }

    fn day(&self, at: f64) -> Option<usize> {
        (at >= self.week).then(|| ((at - self.week) / DAY_S) as usize)
    }
}

const SINGLE_PER_HOUR: usize = 6;
const BATCH_PER_HOUR: usize = 6;
const ANIMATION_PER_HOUR: usize = 2;
const STREAM_FRAMES: u64 = 240;

fn job(at: f64, workload: Workload, model: &str, settings: &str) -> JobSummary {
    JobSummary {
        finished_at: at,
        workload,
        outcome: Outcome::Success,
        model: Some(model.to_owned()),
        settings: Some(settings.to_owned()),
        error_kind: None,
        error_stage: None,
        latency_s: 1.0,
        queue_wait_s: Some(0.1),
        frames: FrameTotals::default(),
        config_generation: 1,
    }
}

fn single_image(truth: &Truth, at: f64, i: usize) -> JobSummary {
    let mut j = job(
        at,
        Workload::SingleImage,
        "sd15-anime",
        "768x768 euler 20 steps",
    );
    j.latency_s = 1.0 + (i % 5) as f64 * 0.4;
    j.queue_wait_s = Some(0.1 + (i % 4) as f64 * 0.1);
    if truth.day(at).is_some_and(|d| d >= truth.latency_day) {
        if i.is_multiple_of(10) {
            j.latency_s = 25.0;
        }
        if i.is_multiple_of(5) {
            j.queue_wait_s = Some(12.0);
        }
    }
    j
}

fn batch(truth: &Truth, at: f64, i: usize) -> JobSummary {
    let mut j = job(
        at,
        Workload::Batch,
        "sdxl-lineart",
        "1024x1024 dpmpp_2m 30 steps batch 4",
    );
    j.latency_s = 8.0 + (i % 5) as f64;
    j.queue_wait_s = Some(2.0 + (i % 4) as f64);
    if at >= truth.deploy_at && i.is_multiple_of(10) {
        j.outcome = Outcome::Oom;
        j.error_kind = Some(ErrorKind::Oom);
        j.error_stage = Some(Stage::Inference);
        j.model = Some("sdxl-lineart-lora-v2".into());
    } else if i % 150 == 7 {
        j.outcome = Outcome::Failed;
        j.error_kind = Some(ErrorKind::ModelLoad);
        j.error_stage = Some(Stage::ModelLoad);
    }
    j
}

fn animation(truth: &Truth, at: f64) -> JobSummary {
    let mut j = job(
        at,
        Workload::Animation,
        "animatediff-preview",
        "512x512 lcm 4 steps",
    );
    j.latency_s = 12.0;
    let slow = truth.day(at).is_some_and(|d| d >= truth.fps_day);
    let delivered = if slow { 180 } else { STREAM_FRAMES };
    j.frames = FrameTotals {
        produced: STREAM_FRAMES,
        delivered,
        dropped: STREAM_FRAMES - delivered,
        duplicated: 0,
        late: if slow { delivered - 1 } else { 0 },
        produced_fps: Some(24.0),
        delivered_fps: Some(if slow { 18.0 } else { 24.0 }),
    };
    j
}

/// The fortnight ending at `to` as history entries, oldest first.
pub fn entries(to: f64) -> Vec<HistoryEntry> {
    let truth = Truth::ending_at(to);
    let start = to - 14.0 * DAY_S;
    let mut out = vec![HistoryEntry::Marker(Marker {
        at: start + 60.0,
        generation: 1,
        version: "0.9.0".into(),
        config_hash: "a1".into(),
    })];
    let mut generation = 1;
    let mut counters = [0usize; 3];
    let hours = (14.0 * DAY_S / HOUR_S) as usize;
    for h in 0..hours {
        let hour = start + h as f64 * HOUR_S;
        for (at, version, hash) in [
            (truth.deploy_at, "0.10.0", "b2"),
            (truth.config_change_at, "0.10.0", "c3"),
        ] {
            if (hour..hour + HOUR_S).contains(&at) {
                generation += 1;
                out.push(HistoryEntry::Marker(Marker {
                    at,
                    generation,
                    version: version.into(),
                    config_hash: hash.into(),
                }));
            }
        }
        let mut push = |mut j: JobSummary| {
            j.config_generation = generation;
            out.push(HistoryEntry::Job(j));
        };
        // Each workload's jobs spread evenly over the hour, offset so they interleave.
        type MakeJob = fn(&Truth, f64, usize) -> JobSummary;
        let kinds: [(usize, f64, MakeJob); 3] = [
            (SINGLE_PER_HOUR, 0.5, single_image),
            (BATCH_PER_HOUR, 0.3, batch),
            (ANIMATION_PER_HOUR, 0.7, |truth, at, _| animation(truth, at)),
        ];
        for (kind, (per_hour, offset, make)) in kinds.into_iter().enumerate() {
            for k in 0..per_hour {
                counters[kind] += 1;
                let at = hour + (k as f64 + offset) * HOUR_S / per_hour as f64;
                push(make(&truth, at, counters[kind]));
            }
        }
    }
    out.sort_by(|a, b| a.at().total_cmp(&b.at()));
    out
}

/// Metric families of one scrape: family -> (type, series -> value).
type Families = BTreeMap<String, (&'static str, BTreeMap<String, f64>)>;
/// The same, regrouped per series over all scrapes.
type FamilyPoints<'a> = BTreeMap<&'a str, (&'a str, BTreeMap<&'a str, Vec<(f64, f64)>>)>;

/// Cumulative series, as an exporter would show them at each scrape.
#[derive(Default)]
struct Exposition {
    families: Families,
}

impl Exposition {
    fn add(&mut self, family: &str, kind: &'static str, series: String, by: f64) {
        *self
            .families
            .entry(family.to_owned())
            .or_insert((kind, BTreeMap::new()))
            .1
            .entry(series)
            .or_default() += by;
    }

    fn set(&mut self, family: &str, series: String, value: f64) {
        let entry = self
            .families
            .entry(family.to_owned())
            .or_insert(("gauge", BTreeMap::new()));
        entry.1.clear();
        entry.1.insert(series, value);
    }

    fn observe(&mut self, family: &str, labels: &str, buckets: &[f64], value: f64, count: f64) {
        for le in buckets
            .iter()
            .map(|b| format_le(*b))
            .chain(["+Inf".to_owned()])
        {
            let edge = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(0.0)
            };
            let hit = if value <= edge { count } else { 0.0 };
            self.add(
                family,
                "histogram",
                format!("{family}_bucket{{{labels},le=\"{le}\"}}"),
                hit,
            );
        }
        self.add(
            family,
            "histogram",
            format!("{family}_sum{{{labels}}}"),
            value * count,
        );
        self.add(
            family,
            "histogram",
            format!("{family}_count{{{labels}}}"),
            count,
        );
    }

    fn job(&mut self, j: &JobSummary) {
        let w = j.workload.as_str();
        self.add(
            "sakuga_jobs_finished",
            "counter",
            format!(
                "sakuga_jobs_finished_total{{workload=\"{w}\",outcome=\"{}\"}}",
                j.outcome
            ),
            1.0,
        );
        let labels = format!("workload=\"{w}\"");
        self.observe(
            "sakuga_render_latency_seconds",
            &labels,
            RENDER_LATENCY_BUCKETS,
            j.latency_s,
            1.0,
        );
        if let Some(wait) = j.queue_wait_s {
            self.observe(
                "sakuga_queue_wait_seconds",
                &labels,
                QUEUE_WAIT_BUCKETS,
                wait,
                1.0,
            );
        }
        if let (Some(kind), Some(stage)) = (j.error_kind, j.error_stage) {
            self.add(
                "sakuga_errors",
                "counter",
                format!("sakuga_errors_total{{kind=\"{kind}\",stage=\"{stage}\"}}"),
                1.0,
            );
        }
        let f = &j.frames;
        if f.produced > 0 {
            for (kind, n) in [
                ("produced", f.produced),
                ("delivered", f.delivered),
                ("dropped", f.dropped),
                ("duplicated", f.duplicated),
            ] {
                self.add(
                    "sakuga_frames",
                    "counter",
                    format!("sakuga_frames_total{{workload=\"{w}\",kind=\"{kind}\"}}"),
                    n as f64,
                );
            }
            for (side, n, fps) in [
                ("produced", f.produced, f.produced_fps),
                ("delivered", f.delivered, f.delivered_fps),
            ] {
                if let Some(fps) = fps {
                    let labels = format!("workload=\"{w}\",side=\"{side}\"");
                    self.observe(
                        "sakuga_frame_interval_seconds",
                        &labels,
                        FRAME_INTERVAL_BUCKETS,
                        1.0 / fps,
                        n.saturating_sub(1) as f64,
                    );
                }
            }
        }
    }
}

/// The exporter's spelling of an edge (`5`, `0.0425`): the shortest that round-trips.
fn format_le(edge: f64) -> String {
    format!("{edge}")
}

/// The fortnight ending at `to` as OpenMetrics text, one scrape every `step_s` seconds.
pub fn openmetrics(to: f64, step_s: f64) -> String {
    let entries = entries(to);
    let start = to - 14.0 * DAY_S;
    let mut expo = Exposition::default();
    // The exporter primes every series at its true zero from the first scrape.
    for &w in Workload::ALL {
        for &o in Outcome::ALL {
            expo.add(
                "sakuga_jobs_finished",
                "counter",
                format!("sakuga_jobs_finished_total{{workload=\"{w}\",outcome=\"{o}\"}}"),
                0.0,
            );
        }
    }
    for kind in ["produced", "delivered", "dropped", "duplicated"] {
        expo.add(
            "sakuga_frames",
            "counter",
            format!("sakuga_frames_total{{workload=\"animation\",kind=\"{kind}\"}}"),
            0.0,
        );
    }
    for (kind, stage) in [
        (ErrorKind::Oom, Stage::Inference),
        (ErrorKind::ModelLoad, Stage::ModelLoad),
    ] {
        expo.add(
            "sakuga_errors",
            "counter",
            format!("sakuga_errors_total{{kind=\"{kind}\",stage=\"{stage}\"}}"),
            0.0,
        );
    }
    let mut scrapes: Vec<(f64, Families)> = Vec::new();
    let mut next = 0;
    let mut version = String::new();
    let mut at = start + step_s;
    while at <= to {
        while next < entries.len() && entries[next].at() < at {
            match &entries[next] {
                HistoryEntry::Job(j) => expo.job(j),
                HistoryEntry::Marker(m) => {
                    version.clone_from(&m.version);
                    expo.set(
                        "sakuga_config_generation",
                        format!(
                            "sakuga_config_generation{{config_hash=\"{}\"}}",
                            m.config_hash
                        ),
                        m.generation as f64,
                    );
                    expo.set(
                        "sakuga_build_info",
                        format!("sakuga_build_info{{version=\"{}\"}}", m.version),
                        1.0,
                    );
                }
            }
            next += 1;
        }
        scrapes.push((at, expo.families.clone()));
        at += step_s;
    }
    write_openmetrics(&scrapes)
}

/// OpenMetrics wants each family's samples together and each series' samples in time
/// order, so the scrapes are written family by family, series by series.
fn write_openmetrics(scrapes: &[(f64, Families)]) -> String {
    let mut families: FamilyPoints<'_> = BTreeMap::new();
    for (at, scrape) in scrapes {
        for (family, (kind, series)) in scrape {
            let entry = families
                .entry(family.as_str())
                .or_insert((kind, BTreeMap::new()));
            for (name, value) in series {
                entry
                    .1
                    .entry(name.as_str())
                    .or_default()
                    .push((*at, *value));
            }
        }
    }
    let mut out = String::new();
    for (family, (kind, series)) in families {
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for (name, points) in series {
            for (at, value) in points {
                let _ = writeln!(out, "{name} {value} {at:.0}");
            }
        }
    }
    out.push_str("# EOF\n");
    out
}
