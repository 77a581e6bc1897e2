//! Diagnosis: the signal-pattern rules of DESIGN.md section 6 turned into findings.
//!
//! Each rule is data: an alert name (its runbook is `docs/runbooks/<alert>.md`), a
//! severity, the probable cause and action in words, and a check over a
//! [`SignalsSnapshot`] that returns the named numbers it found, or nothing. Thresholds live
//! in [`DiagnosisConfig`] (serde, so they sit in the same TOML as the SLOs). Rules read
//! only the snapshot, so `sakuga doctor --from FILE` diagnoses a saved one just the same.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::labels::Workload;
use crate::signals::SignalsSnapshot;
use crate::window::Window;

/// Thresholds of the diagnosis rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiagnosisConfig {
    /// FPS floor: produced FPS at or over it is "normal", under it "low".
    pub min_fps: f64,
    /// Delivered FPS more than this share under produced FPS is "low delivered".
    pub max_fps_deviation: f64,
    /// Window the FPS rules read (the source text says 2-5 minutes).
    pub fps_window: Window,
    /// Mean utilization at or over this is "high".
    pub high_utilization: f64,
    /// Last-2-minute p99 latency at least this times the baseline p99 (the 13 minutes
    /// before) is a growing tail.
    pub tail_growth_factor: f64,
    /// Queue depth must have grown by at least this many jobs over 15 minutes.
    pub min_queue_growth: u64,
    /// OOMs after a config change needed to call it a spike...
    pub min_ooms_after_change: u64,
    /// ...within this many seconds of the change.
    pub config_change_lookback_s: f64,
    /// Last-2-minute post-process mean at least this times the baseline mean is high...
    pub postprocess_growth_factor: f64,
    /// ...or post-process taking at least this share of inference + post-process time...
    pub max_postprocess_share: f64,
    /// ...while inference stayed under this times its baseline mean ("on its own").
    pub inference_stable_factor: f64,
    /// Percentiles from fewer samples than this are not trusted.
    pub min_samples: u64,
    /// Base of runbook URLs; a finding's URL is `<base>/<alert>.md`.
    pub runbook_base: String,
}

impl Default for DiagnosisConfig {
    fn default() -> Self {
        DiagnosisConfig {
            min_fps: 24.0,
            max_fps_deviation: 0.20,
            fps_window: Window::FiveMinutes,
            high_utilization: 0.90,
            tail_growth_factor: 1.5,
            min_queue_growth: 5,
            min_ooms_after_change: 3,
            config_change_lookback_s: 1800.0,
            postprocess_growth_factor: 1.5,
            max_postprocess_share: 0.5,
            inference_stable_factor: 1.2,
            min_samples: 5,
            runbook_base: "docs/runbooks".to_owned(),
        }
    }
}

/// Who gets told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Page,
    Ticket,
    Email,
}

impl Severity {
    pub const fn as_str(self) -> &'static str {
        match self {
            Severity::Page => "page",
            Severity::Ticket => "ticket",
            Severity::Email => "email",
        }
    }
}

/// One named number behind a finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub name: String,
    pub value: f64,
}

/// A diagnosis: what pattern matched, the numbers, the probable cause, what to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The alert name, e.g. `SakugaDeliveredFpsDeviation`.
    pub rule: String,
    pub severity: Severity,
    pub workload: Option<Workload>,
    pub evidence: Vec<Evidence>,
    pub probable_cause: String,
    pub action: String,
    pub runbook_url: String,
}

/// What a rule's check returns: one evidence list per match, with the workload it concerns.
pub type RuleMatches = Vec<(Option<Workload>, Vec<Evidence>)>;

/// A rule as data: identity and words, plus the check that finds its evidence.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub alert: &'static str,
    pub severity: Severity,
    pub probable_cause: &'static str,
    pub action: &'static str,
    /// Returns one evidence list per match (per workload for workload rules).
    pub check: fn(&SignalsSnapshot, &DiagnosisConfig) -> RuleMatches,
}

impl Rule {
    /// This rule's finding for `evidence`, its runbook under `runbook_base`.
    fn finding(
        &self,
        workload: Option<Workload>,
        evidence: Vec<Evidence>,
        runbook_base: &str,
    ) -> Finding {
        Finding {
            rule: self.alert.to_owned(),
            severity: self.severity,
            workload,
            evidence,
            probable_cause: self.probable_cause.to_owned(),
            action: self.action.to_owned(),
            runbook_url: format!("{runbook_base}/{}.md", self.alert),
        }
    }
}

pub const DELIVERED_FPS_DEVIATION: &str = "SakugaDeliveredFpsDeviation";
pub const PRODUCED_FPS_LOW_HIGH_UTILIZATION: &str = "SakugaProducedFpsLowHighUtilization";
pub const SCHEDULER_SATURATION: &str = "SakugaSchedulerSaturation";
pub const OOM_SPIKE_AFTER_CONFIG_CHANGE: &str = "SakugaOomSpikeAfterConfigChange";
pub const POSTPROCESS_SLOW: &str = "SakugaPostprocessSlow";

/// The five rules of DESIGN.md section 6, in its order.
pub const RULES: &[Rule] = &[
    Rule {
        alert: DELIVERED_FPS_DEVIATION,
        severity: Severity::Page,
        probable_cause: "client/CDN/network bottleneck: frames are produced on time but do not reach the viewer",
        action: "check client playback reports, CDN and network path; the generator is healthy",
        check: delivered_fps_deviation,
    },
    Rule {
        alert: PRODUCED_FPS_LOW_HIGH_UTILIZATION,
        severity: Severity::Page,
        probable_cause: "model too heavy or VRAM thrash: the device is saturated and cannot keep frame rate",
        action: "lower preview resolution or steps, or scale out to more devices",
        check: produced_fps_low_high_utilization,
    },
    Rule {
        alert: SCHEDULER_SATURATION,
        severity: Severity::Ticket,
        probable_cause: "scheduler saturation: work arrives faster than workers finish it",
        action: "add workers or replicas, and prioritize small jobs",
        check: scheduler_saturation,
    },
    Rule {
        alert: OOM_SPIKE_AFTER_CONFIG_CHANGE,
        severity: Severity::Page,
        probable_cause: "new model/LoRA size or batch config from the last deploy or config change",
        action: "roll back the change, or split batches",
        check: oom_spike_after_config_change,
    },
    Rule {
        alert: POSTPROCESS_SLOW,
        severity: Severity::Ticket,
        probable_cause: "upscaler/interpolator regression: post-processing slowed on its own",
        action: "isolate the post-process node and toggle the feature (upscale, interpolation) off",
        check: postprocess_slow,
    },
];

fn ev(name: &str, value: f64) -> Evidence {
    Evidence {
        name: name.to_owned(),
        value,
    }
}

fn delivered_fps_deviation(snap: &SignalsSnapshot, cfg: &DiagnosisConfig) -> RuleMatches {
    let Some(g) = snap.golden(Workload::Animation, cfg.fps_window) else {
        return Vec::new();
    };
    let Some(health) = g.fps_health else {
        return Vec::new();
    };
    let produced_normal = g.produced_fps >= cfg.min_fps;
    let delivered_low = health < 1.0 - cfg.max_fps_deviation;
    if !(produced_normal && delivered_low) {
        return Vec::new();
    }
    vec![(
        Some(Workload::Animation),
        vec![
            ev("produced_fps", g.produced_fps),
            ev("delivered_fps", g.delivered_fps),
            ev("fps_health_ratio", health),
            ev("deviation_ratio", 1.0 - health),
            ev("window_s", g.window.duration().as_secs_f64()),
        ],
    )]
}

fn produced_fps_low_high_utilization(snap: &SignalsSnapshot, cfg: &DiagnosisConfig) -> RuleMatches {
    let (Some(g), Some(sys)) = (
        snap.golden(Workload::Animation, cfg.fps_window),
        snap.system(cfg.fps_window),
    ) else {
        return Vec::new();
    };
    let Some(utilization) = sys.utilization_mean else {
        return Vec::new();
    };
    let produced_low = g.frames_produced > 0 && g.produced_fps < cfg.min_fps;
    if !(produced_low && utilization >= cfg.high_utilization) {
        return Vec::new();
    }
    let mut evidence = vec![
        ev("produced_fps", g.produced_fps),
        ev("min_fps", cfg.min_fps),
        ev("utilization_mean", utilization),
    ];
    if let Some(headroom) = sys.headroom_min {
        evidence.push(ev("memory_headroom_min", headroom));
    }
    vec![(Some(Workload::Animation), evidence)]
}

fn scheduler_saturation(snap: &SignalsSnapshot, cfg: &DiagnosisConfig) -> RuleMatches {
    let mut found = Vec::new();
    for &workload in Workload::ALL {
        let (Some(short), Some(long), Some(before)) = (
            snap.golden(workload, Window::TwoMinutes),
            snap.golden(workload, Window::FifteenMinutes),
            snap.baseline(workload),
        ) else {
            continue;
        };
        if short.render_latency.count < cfg.min_samples
            || before.render_latency.count < cfg.min_samples
        {
            continue;
        }
        let (Some(p99_short), Some(p99_long)) =
            (short.render_latency.p99, before.render_latency.p99)
        else {
            continue;
        };
        let (Some(depth_start), Some(depth_end)) = (long.queue_depth_start, long.queue_depth_end)
        else {
            continue;
        };
        let tail_growing = p99_short >= cfg.tail_growth_factor * p99_long;
        let queue_rising = depth_end >= depth_start + cfg.min_queue_growth;
        if tail_growing && queue_rising {
            found.push((
                Some(workload),
                vec![
                    ev("latency_p99_short_s", p99_short),
                    ev("latency_p99_baseline_s", p99_long),
                    ev("queue_depth_start", depth_start as f64),
                    ev("queue_depth_end", depth_end as f64),
                ],
            ));
        }
    }
    found
}

fn oom_spike_after_config_change(snap: &SignalsSnapshot, cfg: &DiagnosisConfig) -> RuleMatches {
    let changes = &snap.config;
    let Some(since) = changes.seconds_since_change else {
        return Vec::new();
    };
    let recent = since <= cfg.config_change_lookback_s;
    let spike = changes.ooms_since_change >= cfg.min_ooms_after_change
        && changes.ooms_since_change > changes.ooms_before_change;
    if !(recent && spike) {
        return Vec::new();
    }
    vec![(
        None,
        vec![
            ev("ooms_since_change", changes.ooms_since_change as f64),
            ev("ooms_before_change", changes.ooms_before_change as f64),
            ev("seconds_since_change", since),
            ev("config_generation", changes.generation as f64),
        ],
    )]
}

fn postprocess_slow(snap: &SignalsSnapshot, cfg: &DiagnosisConfig) -> RuleMatches {
    let mut found = Vec::new();
    for &workload in Workload::ALL {
        let (Some(short), Some(long)) = (
            snap.golden(workload, Window::TwoMinutes),
            snap.baseline(workload),
        ) else {
            continue;
        };
        if short.postprocess.count < cfg.min_samples || long.postprocess.count < cfg.min_samples {
            continue;
        }
        let (Some(post_short), Some(post_long)) = (short.postprocess.mean, long.postprocess.mean)
        else {
            continue;
        };
        let infer_short = short.inference.mean.unwrap_or(0.0);
        let infer_long = long.inference.mean.unwrap_or(0.0);
        let share = if post_short + infer_short > 0.0 {
            post_short / (post_short + infer_short)
        } else {
            0.0
        };
        let post_grew = post_short >= cfg.postprocess_growth_factor * post_long;
        let post_dominates = share >= cfg.max_postprocess_share;
        let inference_stable =
            infer_long <= 0.0 || infer_short <= cfg.inference_stable_factor * infer_long;
        if (post_grew || post_dominates) && inference_stable {
            found.push((
                Some(workload),
                vec![
                    ev("postprocess_mean_short_s", post_short),
                    ev("postprocess_mean_baseline_s", post_long),
                    ev(
                        "postprocess_p95_short_s",
                        short.postprocess.p95.unwrap_or(0.0),
                    ),
                    ev("inference_mean_short_s", infer_short),
                    ev("inference_mean_baseline_s", infer_long),
                    ev("postprocess_share", share),
                ],
            ));
        }
    }
    found
}

/// Runs every rule over a snapshot; findings in rule order.
pub fn diagnose(snapshot: &SignalsSnapshot, config: &DiagnosisConfig) -> Vec<Finding> {
    let base = config.runbook_base.trim_end_matches('/');
    RULES
        .iter()
        .flat_map(|rule| {
            (rule.check)(snapshot, config)
                .into_iter()
                .map(move |(workload, evidence)| rule.finding(workload, evidence, base))
        })
        .collect()
}

/// The finding of the rule named `alert` for evidence gathered elsewhere (the weekly
/// report judges daily history, not a live snapshot), in the rule's own words.
pub fn finding(
    alert: &str,
    workload: Option<Workload>,
    evidence: Vec<Evidence>,
    config: &DiagnosisConfig,
) -> Option<Finding> {
    let rule = RULES.iter().find(|r| r.alert == alert)?;
    let base = config.runbook_base.trim_end_matches('/');
    Some(rule.finding(workload, evidence, base))
}

/// Findings as text for the CLI (`sakuga doctor`).
pub fn render_findings(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "no findings: no known bad signal pattern matched\n".to_owned();
    }
    let mut out = String::new();
    for f in findings {
        let scope = f.workload.map(|w| format!(" [{w}]")).unwrap_or_default();
        let _ = writeln!(out, "{} ({}){scope}", f.rule, f.severity.as_str());
        let _ = writeln!(out, "  probable cause: {}", f.probable_cause);
        let numbers: Vec<String> = f
            .evidence
            .iter()
            .map(|e| format!("{}={}", e.name, fmt_num(e.value)))
            .collect();
        let _ = writeln!(out, "  evidence: {}", numbers.join(", "));
        let _ = writeln!(out, "  action: {}", f.action);
        let _ = writeln!(out, "  runbook: {}", f.runbook_url);
    }
    out
}

/// Numbers for humans: at most 3 decimals, no trailing zeros.
pub(crate) fn fmt_num(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}
