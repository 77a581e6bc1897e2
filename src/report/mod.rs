//! `sakuga report`: the weekly review (DESIGN.md section 13).
//!
//! Module map:
//! - [`data`]: the per-day dataset every source fills, and the embedded history's reader.
//! - [`queries`]: the PromQL, generated next to the recording rules.
//! - [`prom`]: the Prometheus source (range queries).
//! - [`analyze`]: budgets, burn, worst hours, regressions matched to diagnosis rules.
//! - [`charts`], [`render`]: SVG charts (plotters), Markdown and HTML.
//! - [`scenario`]: a synthetic fortnight with known regressions (tests, the example).

pub mod analyze;
pub mod charts;
pub mod data;
pub mod prom;
pub mod queries;
pub mod render;
pub mod scenario;

use std::path::{Path, PathBuf};

use sakuga_telemetry::DiagnosisConfig;
use sakuga_telemetry::history::{self, HISTORY_DIR};

pub use analyze::Report;
pub use data::{Dataset, Period};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("prometheus {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("--prometheus {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("prometheus {url} answered HTTP {status} to {expr:?}: {reason}")]
    Query {
        url: String,
        status: u16,
        expr: String,
        reason: String,
    },
    #[error(
        "prometheus {url} has no sakuga metrics between {from} and {to} \
         (no sakuga_jobs_finished_total series): is it scraping sakuga's /metrics?"
    )]
    NoSakugaMetrics {
        url: String,
        from: String,
        to: String,
    },
    #[error("no job history at {dir}: {why}")]
    NoHistory { dir: PathBuf, why: String },
    #[error("job history: {0}")]
    History(#[from] sakuga_telemetry::TelemetryError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw a chart: {reason}")]
    Chart { reason: String },
    #[error("{0}")]
    Time(String),
}

/// Where the numbers come from.
#[derive(Debug, Clone)]
pub enum Source {
    Prometheus(String),
    /// A data dir of `sakuga serve` (its `history/` folder).
    History(PathBuf),
}

/// Reads one period from `source`.
///
/// # Errors
/// See [`ReportError`]; an empty or missing history is [`ReportError::NoHistory`].
pub fn dataset(source: &Source, period: Period) -> Result<Dataset, ReportError> {
    match source {
        Source::Prometheus(url) => prom::Prometheus::new(url)?.dataset(period),
        Source::History(data_dir) => {
            let dir = data_dir.join(HISTORY_DIR);
            let mut read = history::read_range(&dir, period.from, period.to)?;
            if let Some(before) = history::last_marker_before(&dir, period.from)? {
                read.markers.insert(0, before);
            }
            if read.days_on_disk == 0 {
                let why = if dir.exists() {
                    "the folder is empty: no job has finished since the server started keeping history"
                } else {
                    "the folder does not exist: run `sakuga serve` with this --data-dir, or pass --prometheus URL"
                };
                return Err(ReportError::NoHistory {
                    dir,
                    why: why.to_owned(),
                });
            }
            Ok(data::from_history(
                &read,
                period,
                format!("job history {}", dir.display()),
            ))
        }
    }
}

/// The review of `period`, compared with the period before when `compare_previous`.
///
/// # Errors
/// See [`dataset`]. A period with no jobs is [`ReportError::NoHistory`] for the embedded
/// source; the previous period may be empty.
pub fn build(
    source: &Source,
    period: Period,
    compare_previous: bool,
) -> Result<Report, ReportError> {
    let current = dataset(source, period)?;
    if let Source::History(data_dir) = source
        && current.jobs == 0.0
        && current.markers.is_empty()
    {
        return Err(ReportError::NoHistory {
            dir: data_dir.join(HISTORY_DIR),
            why: format!(
                "no job finished between {} and {}",
                iso(period.from),
                iso(period.to)
            ),
        });
    }
    let previous = if compare_previous {
        match dataset(source, period.previous()) {
            Ok(d) if d.jobs > 0.0 => Some(d),
            Ok(_) | Err(ReportError::NoHistory { .. } | ReportError::NoSakugaMetrics { .. }) => {
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    Ok(analyze::review(
        current,
        previous,
        &DiagnosisConfig::default(),
    ))
}

/// Writes `report.html`, `report.md` and `report.json` into `dir`; returns their paths.
///
/// # Errors
/// When the folder or a file cannot be written, or a chart cannot be drawn.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let files = [
        ("report.html", render::html(report)?),
        ("report.md", render::markdown(report)),
        ("report.json", to_json(report)),
    ];
    let mut paths = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The report as JSON (non-finite numbers become null).
pub fn to_json(report: &Report) -> String {
    // serde_json writes NaN and infinities as null already; plain structs cannot fail.
    serde_json::to_string_pretty(report).unwrap_or_default() + "\n"
}

/// `2026-11-30T14:00Z` of a unix time (UTC, minutes).
pub fn iso(at: f64) -> String {
    let secs = at.floor() as i64;
    let day = secs.div_euclid(86_400);
    let (y, m, d) = history::civil_from_days(day);
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// `2026-11-30` of the UTC day holding `at`.
pub fn day_label(at: f64) -> String {
    history::day_name(at)
}

/// Numbers for people: up to 3 significant decimals, no trailing zeros.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "inf".into();
    }
    let text = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    };
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

fn pct_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// Parses `7d`, `36h`, `90m` into seconds.
///
/// # Errors
/// Anything else.
pub fn parse_duration(text: &str) -> Result<f64, ReportError> {
    let bad = || ReportError::Time(format!("{text:?} is not a duration like 7d, 36h or 90m"));
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: f64 = number.parse().map_err(|_| bad())?;
    let unit = match unit {
        "d" => 86_400.0,
        "h" => 3_600.0,
        "m" => 60.0,
        _ => return Err(bad()),
    };
    if n > 0.0 { Ok(n * unit) } else { Err(bad()) }
}

/// Parses `2026-11-23`, `2026-11-23T06:00Z` / `...:00Z`, or unix seconds.
///
/// # Errors
/// Anything else.
pub fn parse_time(text: &str) -> Result<f64, ReportError> {
    let bad = || {
        ReportError::Time(format!(
            "{text:?} is not a time like 2026-11-23, 2026-11-23T06:00Z or unix seconds"
        ))
    };
    if let Ok(secs) = text.parse::<f64>() {
        return Ok(secs);
    }
    let (date, time) = text.split_once('T').unwrap_or((text, ""));
    let mut parts = date.splitn(3, '-');
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse::<i64>().ok())
            .ok_or_else(bad)
    };
    let (y, m, d) = (next()?, next()?, next()?);
    let day = history::days_from_civil(y, m as u32, d as u32) as f64 * 86_400.0;
    let time = time.trim_end_matches('Z');
    if time.is_empty() {
        return Ok(day);
    }
    let mut hms = time.split(':').map(|p| p.parse::<f64>().map_err(|_| bad()));
    let h = hms.next().ok_or_else(bad)??;
    let min = hms.next().transpose()?.unwrap_or(0.0);
    let s = hms.next().transpose()?.unwrap_or(0.0);
    Ok(day + h * 3600.0 + min * 60.0 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations_parse() {
        assert_eq!(parse_duration("7d").unwrap(), 604_800.0);
        assert_eq!(parse_duration("36h").unwrap(), 129_600.0);
        assert!(parse_duration("7w").is_err());
        assert_eq!(parse_time("2026-11-30").unwrap(), 1_795_996_800.0);
        assert_eq!(
            parse_time("2026-11-30T06:30Z").unwrap(),
            1_795_996_800.0 + 23_400.0
        );
        assert_eq!(iso(1_795_996_800.0 + 23_400.0), "2026-11-30T06:30Z");
        assert!(parse_time("last tuesday").is_err());
    }
}
