//! The review as Markdown (chat and tickets) and as one self-contained HTML page: styles
//! inline, charts as inline SVG, links only to the runbooks.

use std::fmt::Write as _;

use sakuga_telemetry::Outcome;

use super::ReportError;
use super::analyze::{Report, TIMEOUT_OOM_BUDGET};
use super::charts::{Chart, Line};
use super::{num, pct_opt};

/// The Markdown summary.
pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let p = &report.data.period;
    let _ = writeln!(
        md,
        "# sakuga weekly review: {} to {}\n",
        super::iso(p.from),
        super::iso(p.to)
    );
    let _ = writeln!(
        md,
        "Source: {}. Finished jobs: {}.\n",
        report.data.source,
        num(report.data.jobs)
    );
    let _ = writeln!(md, "## What to do\n");
    for item in &report.todo {
        let _ = writeln!(md, "- {item}");
    }
    md_slos(report, &mut md);
    md_regressions(report, &mut md);
    md_latency(report, &mut md);
    let _ = writeln!(
        md,
        "\nMarkers: {}",
        if report.data.markers.is_empty() {
            "none".to_owned()
        } else {
            report
                .data
                .markers
                .iter()
                .map(|m| format!("{} at {}", m.label, super::iso(m.at)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    md
}

fn md_slos(report: &Report, md: &mut String) {
    let _ = writeln!(
        md,
        "\n## SLOs\n\n| SLO | objective | budget left | worst day burn | worst hour |\n|---|---|---|---|---|"
    );
    for s in &report.slos {
        let worst_day = s
            .burn_per_day
            .iter()
            .flatten()
            .copied()
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let hour = s.worst_hour.as_ref().map_or("-".to_owned(), |h| {
            format!("{} ({}x)", h.start_iso, num(h.burn))
        });
        let _ = writeln!(
            md,
            "| [{}]({}) | {} | {} | {} | {hour} |",
            s.name,
            s.runbook_url,
            s.objective,
            pct_opt(s.budget_left),
            worst_day.map_or("-".into(), |b| format!("{}x", num(b)))
        );
    }
}

fn md_regressions(report: &Report, md: &mut String) {
    let _ = writeln!(md, "\n## Regressions\n");
    if report.regressions.is_empty() {
        let _ = writeln!(md, "None found.");
    }
    for r in &report.regressions {
        let scope = r.workload.map(|w| format!(" ({w})")).unwrap_or_default();
        let rule = r
            .finding
            .as_ref()
            .map_or("no matching diagnosis rule".to_owned(), |f| {
                format!("{}: {}", f.rule, f.probable_cause)
            });
        let _ = writeln!(
            md,
            "- {}: {}{scope} {} -> {} ({}x). {rule}. [runbook]({})",
            r.day_name,
            r.metric,
            num(r.baseline),
            num(r.value),
            num(r.factor),
            r.runbook_url
        );
    }
}

fn md_latency(report: &Report, md: &mut String) {
    let _ = writeln!(
        md,
        "\n## Latency per workload (p50 / p95 / p99 seconds, last day)\n"
    );
    for (w, days) in &report.data.workloads {
        if let Some(last) = days.iter().rev().find(|d| d.total() > 0.0) {
            let l = &last.latency;
            let _ = writeln!(
                md,
                "- {w}: {} / {} / {}; queue wait p95 {}",
                opt(l.p50),
                opt(l.p95),
                opt(l.p99),
                opt(last.queue_wait.p95)
            );
        }
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), num)
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1600px;margin:24px auto;padding:0 16px;color:#222}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:8px}\
.bad{color:#b00;font-weight:bold}.todo li{margin:4px 0}";

/// The HTML page.
///
/// # Errors
/// When a chart cannot be drawn.
pub fn html(report: &Report) -> Result<String, ReportError> {
    let p = &report.data.period;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>sakuga weekly review</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        h,
        "<h1>sakuga weekly review: {} to {}</h1><p>Source: {}. Finished jobs: {}. Generated {}.</p>",
        super::iso(p.from),
        super::iso(p.to),
        esc(&report.data.source),
        num(report.data.jobs),
        report.generated_at
    );
    let _ = write!(h, "<h2>What to do</h2><ul class=\"todo\">");
    for item in &report.todo {
        let _ = write!(h, "<li>{}</li>", esc(item));
    }
    h.push_str("</ul>");
    slo_section(report, &mut h)?;
    regressions_section(report, &mut h);
    workload_section(report, &mut h)?;
    animation_section(report, &mut h)?;
    errors_section(report, &mut h)?;
    h.push_str("</body></html>\n");
    Ok(h)
}

fn chart<'a>(report: &'a Report, title: &str, unit: &str, lines: Vec<Line>) -> Chart<'a> {
    Chart {
        title: title.to_owned(),
        unit: unit.to_owned(),
        lines,
        reference: None,
        period: report.data.period,
        day_names: &report.day_names,
        markers: &report.data.markers,
    }
}

fn slo_section(report: &Report, h: &mut String) -> Result<(), ReportError> {
    h.push_str("<h2>SLOs: budget left, burn per day, worst hour</h2><table><tr><th>SLO</th><th>objective</th><th>budget left</th>");
    for d in &report.day_names {
        let _ = write!(h, "<th>burn {}</th>", &d[5..]);
    }
    h.push_str("<th>worst hour</th></tr>");
    for s in &report.slos {
        let left_class = if s.budget_left.is_some_and(|l| l < 0.0) {
            " class=\"bad\""
        } else {
            ""
        };
        let _ = write!(
            h,
            "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td{left_class}>{}</td>",
            esc(&s.runbook_url),
            esc(&s.name),
            s.objective,
            pct_opt(s.budget_left)
        );
        for b in &s.burn_per_day {
            let class = if b.is_some_and(|b| b > 1.0) {
                " class=\"bad\""
            } else {
                ""
            };
            let _ = write!(
                h,
                "<td{class}>{}</td>",
                b.map_or("-".into(), |b| format!("{}x", num(b)))
            );
        }
        let hour = s.worst_hour.as_ref().map_or("-".to_owned(), |w| {
            format!("{} ({}x)", w.start_iso, num(w.burn))
        });
        let _ = write!(h, "<td>{hour}</td></tr>");
    }
    h.push_str("</table>");
    let lines = report
        .slos
        .iter()
        .map(|s| Line {
            name: s.name.clone(),
            daily: s.burn_per_day.clone(),
        })
        .collect();
    let mut c = chart(
        report,
        "Error budget burn per day (1 = spending exactly the budget)",
        "burn",
        lines,
    );
    c.reference = Some((1.0, "budget".into()));
    let _ = write!(h, "<div class=\"grid\">{}", c.svg()?);
    let mut c = chart(
        report,
        "Timeouts + OOMs per finished job, against the 0.5% budget",
        "share",
        vec![Line {
            name: "timeouts + OOMs".into(),
            daily: report.timeouts_and_ooms.clone(),
        }],
    );
    c.reference = Some((TIMEOUT_OOM_BUDGET, "0.5% budget".into()));
    let _ = write!(h, "{}</div>", c.svg()?);
    Ok(())
}

fn regressions_section(report: &Report, h: &mut String) {
    h.push_str("<h2>Regressions</h2>");
    if report.regressions.is_empty() {
        h.push_str("<p>None found.</p>");
        return;
    }
    h.push_str("<table><tr><th>day</th><th>metric</th><th>baseline</th><th>value</th><th>size</th><th>diagnosis</th><th>runbook</th></tr>");
    for r in &report.regressions {
        let scope = r.workload.map(|w| format!(" ({w})")).unwrap_or_default();
        let finding = r
            .finding
            .as_ref()
            .map_or("no matching rule".to_owned(), |f| {
                format!("{}: {} ({})", f.rule, f.probable_cause, f.action)
            });
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}{scope}</td><td>{}</td><td>{}</td><td>{}x</td><td style=\"text-align:left\">{}</td><td><a href=\"{}\">runbook</a></td></tr>",
            r.day_name,
            esc(&r.metric),
            num(r.baseline),
            num(r.value),
            num(r.factor),
            esc(&finding),
            esc(&r.runbook_url)
        );
    }
    h.push_str("</table>");
}

fn workload_section(report: &Report, h: &mut String) -> Result<(), ReportError> {
    h.push_str("<h2>Latency, queue wait and throughput per workload</h2><div class=\"grid\">");
    for (w, days) in &report.data.workloads {
        if days.iter().all(|d| d.total() == 0.0) {
            continue;
        }
        let percentiles = |of: fn(&super::data::WorkloadDay) -> &super::data::Percentiles| {
            let line = |name: &str, get: fn(&super::data::Percentiles) -> Option<f64>| Line {
                name: name.into(),
                daily: days.iter().map(|d| get(of(d))).collect(),
            };
            vec![
                line("p50", |q| q.p50),
                line("p95", |q| q.p95),
                line("p99", |q| q.p99),
            ]
        };
        type Of = fn(&super::data::WorkloadDay) -> &super::data::Percentiles;
        let charts: [(&str, Of); 2] = [
            ("render latency", |d| &d.latency),
            ("queue wait", |d| &d.queue_wait),
        ];
        for (title, of) in charts {
            let lines = percentiles(of);
            h.push_str(&chart(report, &format!("{w}: {title}"), "seconds", lines).svg()?);
        }
    }
    h.push_str("</div><table><tr><th>workload</th>");
    for d in &report.day_names {
        let _ = write!(h, "<th>{} jobs/h</th>", &d[5..]);
    }
    h.push_str("<th>success</th><th>oom</th><th>timeout</th></tr>");
    for (w, days) in &report.data.workloads {
        let _ = write!(h, "<tr><td>{w}</td>");
        for d in days {
            let _ = write!(h, "<td>{}</td>", num(d.total() / 24.0));
        }
        let share = |o: Outcome| pct_opt(Some(super::analyze::outcome_share(report, *w, o)));
        let _ = write!(
            h,
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            share(Outcome::Success),
            share(Outcome::Oom),
            share(Outcome::Timeout)
        );
    }
    h.push_str("</table>");
    Ok(())
}

fn animation_section(report: &Report, h: &mut String) -> Result<(), ReportError> {
    let a = &report.data.animation;
    if a.iter().all(|d| d.produced == 0.0) {
        h.push_str("<h2>Animation</h2><p>No animation frames in this period.</p>");
        return Ok(());
    }
    h.push_str(
        "<h2>Animation: delivered vs produced FPS, FPS health, frames</h2><div class=\"grid\">",
    );
    let lines = vec![
        Line {
            name: "produced FPS".into(),
            daily: a.iter().map(|d| d.produced_fps).collect(),
        },
        Line {
            name: "delivered FPS".into(),
            daily: a.iter().map(|d| d.delivered_fps).collect(),
        },
    ];
    let mut c = chart(report, "Delivered vs produced FPS", "FPS", lines);
    c.reference = Some((24.0, "24 FPS floor".into()));
    h.push_str(&c.svg()?);
    let lines = vec![Line {
        name: "FPS health".into(),
        daily: a.iter().map(|d| d.fps_health()).collect(),
    }];
    let mut c = chart(report, "FPS health (delivered / produced)", "ratio", lines);
    c.reference = Some((0.8, "deviation limit".into()));
    h.push_str(&c.svg()?);
    let lines = vec![
        Line {
            name: "dropped".into(),
            daily: a.iter().map(|d| Some(d.dropped)).collect(),
        },
        Line {
            name: "duplicated".into(),
            daily: a.iter().map(|d| Some(d.duplicated)).collect(),
        },
        Line {
            name: "late".into(),
            daily: a.iter().map(|d| Some(d.late)).collect(),
        },
    ];
    h.push_str(
        &chart(
            report,
            "Dropped, duplicated and late frames per day",
            "frames",
            lines,
        )
        .svg()?,
    );
    h.push_str("</div>");
    Ok(())
}

fn errors_section(report: &Report, h: &mut String) -> Result<(), ReportError> {
    h.push_str("<h2>Errors by kind and stage</h2>");
    let errors = &report.data.errors;
    if errors.is_empty() {
        h.push_str("<p>No errors.</p>");
    } else {
        h.push_str("<table><tr><th>kind</th><th>stage</th><th>total</th></tr>");
        let mut sorted: Vec<_> = errors.iter().collect();
        sorted.sort_by(|a, b| b.total().total_cmp(&a.total()));
        for e in &sorted {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.kind,
                e.stage,
                num(e.total())
            );
        }
        h.push_str("</table>");
        let lines = sorted
            .iter()
            .take(6)
            .map(|e| Line {
                name: format!("{} @ {}", e.kind, e.stage),
                daily: e.daily.iter().map(|v| Some(*v)).collect(),
            })
            .collect();
        h.push_str(&chart(report, "Errors per day", "errors", lines).svg()?);
    }
    h.push_str("<h2>Top failing models and settings</h2>");
    match &report.data.failing {
        None => h.push_str("<p>Not in Prometheus: its labels stay low-cardinality, so models and settings live in the embedded job history (run <code>sakuga report</code> without <code>--prometheus</code> on the server's data dir).</p>"),
        Some(list) if list.is_empty() => h.push_str("<p>No failed jobs.</p>"),
        Some(list) => {
            h.push_str("<table><tr><th>model</th><th>settings</th><th>failed</th><th>jobs</th><th>kinds</th></tr>");
            for f in list {
                let kinds: Vec<String> = f.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
                let _ = write!(h, "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", esc(&f.model), esc(&f.settings), f.failed, f.total, kinds.join(", "));
            }
            h.push_str("</table>");
        }
    }
    Ok(())
}
