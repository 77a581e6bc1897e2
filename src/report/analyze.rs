//! From a [`Dataset`] to the review itself: budget left, burn per day and the worst hour
//! per SLO, regressions (against the earlier days of the period, or the previous period)
//! each matched to its diagnosis rule, and a short list of what to do.

use serde::Serialize;

use sakuga_telemetry::catalogue::LATE_FRAME_TOLERANCE;
use sakuga_telemetry::diagnosis::{
    self, DELIVERED_FPS_DEVIATION, DiagnosisConfig, Evidence, Finding,
    OOM_SPIKE_AFTER_CONFIG_CHANGE, PRODUCED_FPS_LOW_HIGH_UTILIZATION, SCHEDULER_SATURATION,
};
use sakuga_telemetry::{Outcome, Workload};

use super::data::{DAY_S, Dataset, HOUR_S, MarkerKind, Ratio};

/// The 0.5% daily budget of timeouts plus OOMs (DESIGN.md section 6).
pub const TIMEOUT_OOM_BUDGET: f64 = 0.005;

/// One SLO's review.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SloReview {
    pub name: String,
    pub objective: f64,
    pub description: String,
    /// 1 - spent; negative when overspent; `None` with no events.
    pub budget_left: Option<f64>,
    /// Bad ratio over budget, per day (1 spends exactly the budget).
    pub burn_per_day: Vec<Option<f64>>,
    pub worst_hour: Option<WorstHour>,
    pub runbook_url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorstHour {
    pub start: f64,
    pub start_iso: String,
    pub bad_ratio: f64,
    pub burn: f64,
}

/// Something that got worse, how much, and what the diagnosis rules make of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Regression {
    pub metric: String,
    pub workload: Option<Workload>,
    /// 0-based day of the period it started on; `None` for the whole period.
    pub day: Option<usize>,
    pub day_name: String,
    pub baseline: f64,
    pub value: f64,
    /// `value / baseline` (infinite from a zero baseline).
    pub factor: f64,
    pub finding: Option<Finding>,
    pub runbook_url: String,
}

/// The review.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub day_names: Vec<String>,
    pub data: Dataset,
    pub slos: Vec<SloReview>,
    /// Timeouts plus OOMs over finished jobs per day, against [`TIMEOUT_OOM_BUDGET`].
    pub timeouts_and_ooms: Vec<Option<f64>>,
    pub regressions: Vec<Regression>,
    /// The previous period, when asked to compare.
    pub previous: Option<Dataset>,
    pub todo: Vec<String>,
}

fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// A per-day metric and how to judge it.
struct Metric<'a> {
    name: String,
    workload: Option<Workload>,
    current: Vec<Option<f64>>,
    previous: Option<Vec<Option<f64>>>,
    /// Whether `value` is a regression from `baseline`.
    worse: &'a dyn Fn(f64, f64) -> bool,
}

/// The first day the metric is worse than its baseline: the previous period's median, or
/// the median of the days before it.
fn first_regression(m: &Metric<'_>) -> Option<(usize, f64, f64)> {
    for (day, value) in m.current.iter().enumerate() {
        let Some(value) = *value else {
            continue;
        };
        let baseline = match &m.previous {
            Some(previous) => median(previous.iter().flatten().copied()),
            None => median(m.current[..day].iter().flatten().copied()),
        };
        if let Some(baseline) = baseline
            && (m.worse)(value, baseline)
        {
            return Some((day, baseline, value));
        }
    }
    None
}

fn ev(name: &str, value: f64) -> Evidence {
    Evidence {
        name: name.to_owned(),
        value,
    }
}

/// Builds the review of `data` (and `previous`, the period before, when comparing).
pub fn review(data: Dataset, previous: Option<Dataset>, config: &DiagnosisConfig) -> Report {
    let day_names = (0..data.period.days())
        .map(|d| super::day_label(data.period.from + d as f64 * DAY_S))
        .collect();
    let base = config.runbook_base.trim_end_matches('/').to_owned();
    let slos = data
        .slos
        .iter()
        .map(|s| {
            let budget = 1.0 - s.objective;
            let worst = s
                .hourly
                .iter()
                .enumerate()
                .filter_map(|(h, r)| r.map(|r| (h, r)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .filter(|(_, r)| *r > 0.0);
            SloReview {
                name: s.name.clone(),
                objective: s.objective,
                description: s.description.clone(),
                budget_left: s.period.map(|r| 1.0 - r / budget),
                burn_per_day: s.daily.iter().map(|r| r.map(|r| r / budget)).collect(),
                worst_hour: worst.map(|(h, r)| {
                    let start = data.period.from + h as f64 * HOUR_S;
                    WorstHour {
                        start,
                        start_iso: super::iso(start),
                        bad_ratio: r,
                        burn: r / budget,
                    }
                }),
                runbook_url: format!("{base}/{}.md", s.alert),
            }
        })
        .collect();
    let timeouts_and_ooms = data.timeouts_and_ooms().iter().map(Ratio::value).collect();
    let regressions = regressions(&data, previous.as_ref(), config);
    let mut report = Report {
        generated_at: super::iso(sakuga_telemetry::history::unix_now()),
        day_names,
        data,
        slos,
        timeouts_and_ooms,
        regressions,
        previous,
        todo: Vec::new(),
    };
    report.todo = todo(&report);
    report
}

fn regressions(
    data: &Dataset,
    previous: Option<&Dataset>,
    cfg: &DiagnosisConfig,
) -> Vec<Regression> {
    let mut out = Vec::new();
    out.extend(oom_regression(data, previous, cfg));
    out.extend(fps_regression(data, previous, cfg));
    for &workload in Workload::ALL {
        out.extend(latency_regression(data, previous, cfg, workload));
    }
    out
}

fn regression(
    data: &Dataset,
    m: &Metric<'_>,
    (day, baseline, value): (usize, f64, f64),
    finding: Option<Finding>,
    fallback_alert: &str,
    cfg: &DiagnosisConfig,
) -> Regression {
    let base = cfg.runbook_base.trim_end_matches('/');
    Regression {
        metric: m.name.clone(),
        workload: m.workload,
        day: Some(day),
        day_name: super::day_label(data.period.from + day as f64 * DAY_S),
        baseline,
        value,
        factor: if baseline > 0.0 {
            value / baseline
        } else {
            f64::INFINITY
        },
        runbook_url: finding.as_ref().map_or_else(
            || format!("{base}/{fallback_alert}.md"),
            |f| f.runbook_url.clone(),
        ),
        finding,
    }
}

/// OOMs per day up at least `min_ooms_after_change` and over twice the baseline; the
/// finding needs a deploy or config change that day or the day before.
fn oom_regression(
    data: &Dataset,
    previous: Option<&Dataset>,
    cfg: &DiagnosisConfig,
) -> Option<Regression> {
    let as_opt = |d: &Dataset| d.ooms().into_iter().map(Some).collect::<Vec<_>>();
    let min = cfg.min_ooms_after_change as f64;
    let worse = move |v: f64, b: f64| v >= min && v > 2.0 * b.max(0.5);
    let m = Metric {
        name: "ooms_per_day".into(),
        workload: None,
        current: as_opt(data),
        previous: previous.map(as_opt),
        worse: &worse,
    };
    let found = first_regression(&m)?;
    let (day, baseline, value) = found;
    let day_start = data.period.from + day as f64 * DAY_S;
    let change = data
        .markers
        .iter()
        .rfind(|mk| mk.at < day_start + DAY_S && mk.at >= day_start - DAY_S);
    let finding = change.and_then(|mk| {
        let evidence = vec![
            ev("ooms_per_day", value),
            ev("ooms_per_day_before", baseline),
            ev(
                "hours_from_change_to_day_end",
                (day_start + DAY_S - mk.at) / HOUR_S,
            ),
            ev("deploy", f64::from(u8::from(mk.kind == MarkerKind::Deploy))),
        ];
        diagnosis::finding(OOM_SPIKE_AFTER_CONFIG_CHANGE, None, evidence, cfg)
    });
    Some(regression(
        data,
        &m,
        found,
        finding,
        "SakugaTimeoutOomBudgetBurn",
        cfg,
    ))
}

/// FPS health under `1 - max_fps_deviation` where it was not before: delivered low with
/// produced normal is the client/CDN rule, produced low the heavy-model rule.
fn fps_regression(
    data: &Dataset,
    previous: Option<&Dataset>,
    cfg: &DiagnosisConfig,
) -> Option<Regression> {
    let health = |d: &Dataset| {
        d.animation
            .iter()
            .map(|a| a.fps_health())
            .collect::<Vec<_>>()
    };
    let floor = 1.0 - cfg.max_fps_deviation;
    let worse = move |v: f64, b: f64| v < floor && b >= floor;
    let m = Metric {
        name: "fps_health_ratio".into(),
        workload: Some(Workload::Animation),
        current: health(data),
        previous: previous.map(health),
        worse: &worse,
    };
    let found = first_regression(&m)?;
    let day = &data.animation[found.0];
    let produced = day.produced_fps.unwrap_or(0.0);
    let delivered = day.delivered_fps.unwrap_or(0.0);
    let produced_normal = produced >= cfg.min_fps / LATE_FRAME_TOLERANCE;
    let evidence = vec![
        ev("produced_fps", produced),
        ev("delivered_fps", delivered),
        ev("fps_health_ratio", found.2),
        ev("fps_health_ratio_before", found.1),
    ];
    let rule = if produced_normal {
        DELIVERED_FPS_DEVIATION
    } else {
        PRODUCED_FPS_LOW_HIGH_UTILIZATION
    };
    let finding = diagnosis::finding(rule, Some(Workload::Animation), evidence, cfg);
    Some(regression(
        data,
        &m,
        found,
        finding,
        "SakugaAnimationFpsBudgetBurn",
        cfg,
    ))
}

/// p99 latency up `tail_growth_factor` times; with queue wait p95 up too it is the
/// scheduler-saturation rule.
fn latency_regression(
    data: &Dataset,
    previous: Option<&Dataset>,
    cfg: &DiagnosisConfig,
    workload: Workload,
) -> Option<Regression> {
    let p99 = |d: &Dataset| {
        d.workloads
            .get(&workload)
            .map(|days| days.iter().map(|w| w.latency.p99).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let wait = |d: &Dataset| -> Vec<Option<f64>> {
        d.workloads
            .get(&workload)
            .map(|days| days.iter().map(|w| w.queue_wait.p95).collect())
            .unwrap_or_default()
    };
    let factor = cfg.tail_growth_factor;
    let worse = move |v: f64, b: f64| b > 0.0 && v >= factor * b;
    let m = Metric {
        name: "latency_p99_s".into(),
        workload: Some(workload),
        current: p99(data),
        previous: previous.map(p99),
        worse: &worse,
    };
    let found = first_regression(&m)?;
    let waits = wait(data);
    let wait_now = waits.get(found.0).copied().flatten().unwrap_or(0.0);
    let wait_before = match previous {
        Some(p) => median(wait(p).into_iter().flatten()),
        None => median(waits[..found.0].iter().flatten().copied()),
    }
    .unwrap_or(0.0);
    let queue_rising = wait_now >= factor * wait_before && wait_now > wait_before + 1.0;
    let finding = queue_rising
        .then(|| {
            let evidence = vec![
                ev("latency_p99_s", found.2),
                ev("latency_p99_baseline_s", found.1),
                ev("queue_wait_p95_s", wait_now),
                ev("queue_wait_p95_baseline_s", wait_before),
            ];
            diagnosis::finding(SCHEDULER_SATURATION, Some(workload), evidence, cfg)
        })
        .flatten();
    Some(regression(
        data,
        &m,
        found,
        finding,
        "SakugaSchedulerSaturation",
        cfg,
    ))
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn todo(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for r in &report.regressions {
        let scope = r.workload.map(|w| format!(" ({w})")).unwrap_or_default();
        let size = if r.factor.is_finite() {
            format!("{:.1}x", r.factor)
        } else {
            "from zero".to_owned()
        };
        match &r.finding {
            Some(f) => out.push(format!(
                "{}: {}{scope} went from {} to {} ({size}). {}: {}. Runbook: {}",
                r.day_name,
                r.metric,
                super::num(r.baseline),
                super::num(r.value),
                f.rule,
                f.action,
                f.runbook_url
            )),
            None => out.push(format!(
                "{}: {}{scope} went from {} to {} ({size}); no diagnosis rule matched. Runbook: {}",
                r.day_name,
                r.metric,
                super::num(r.baseline),
                super::num(r.value),
                r.runbook_url
            )),
        }
    }
    for s in &report.slos {
        if let Some(left) = s.budget_left.filter(|l| *l < 0.0) {
            out.push(format!(
                "SLO {} overspent its error budget (left {}). Runbook: {}",
                s.name,
                pct(left),
                s.runbook_url
            ));
        }
    }
    let over: Vec<&String> = report
        .timeouts_and_ooms
        .iter()
        .zip(&report.day_names)
        .filter(|(r, _)| r.is_some_and(|r| r > TIMEOUT_OOM_BUDGET))
        .map(|(_, d)| d)
        .collect();
    if !over.is_empty() {
        let days: Vec<&str> = over.iter().map(|d| d.as_str()).collect();
        out.push(format!(
            "Timeouts plus OOMs were over the 0.5% daily budget on {}.",
            days.join(", ")
        ));
    }
    if let Some(top) = report.data.failing.as_ref().and_then(|f| f.first()) {
        out.push(format!(
            "Most failures: model {} at {} ({} of {} jobs failed).",
            top.model,
            if top.settings.is_empty() {
                "unknown settings"
            } else {
                &top.settings
            },
            top.failed,
            top.total
        ));
    }
    if out.is_empty() {
        out.push("Nothing to do: every SLO kept its budget and nothing regressed.".into());
    }
    out
}

/// Outcome share helper for the renderers.
pub fn outcome_share(report: &Report, workload: Workload, outcome: Outcome) -> f64 {
    let days = report.data.workloads.get(&workload);
    let (part, total) = days.into_iter().flatten().fold((0.0, 0.0), |(p, t), d| {
        (p + d.outcome(outcome), t + d.total())
    });
    if total > 0.0 { part / total } else { 0.0 }
}
