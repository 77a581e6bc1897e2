//! The production source: range queries against a Prometheus that scrapes sakuga, with
//! the queries of [`super::queries`]. Daily numbers are the one-day queries evaluated at
//! the end of each day; the worst hour uses the same query over `[1h]` every hour, and the
//! budget left the same query over the whole period at its end.
//!
//! The HTTP client is deliberately tiny (HTTP/1.0, one request per connection, plain
//! `http://`): Prometheus answers it with the whole body and closes, and the report needs
//! nothing more. For an `https://` Prometheus, point `--prometheus` at a local proxy.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

use sakuga_telemetry::{ErrorKind, Outcome, Stage, Workload};

use super::ReportError;
use super::data::{
    AnimationDay, DAY_S, Dataset, ErrorSeries, HOUR_S, MarkerKind, MarkerPoint, Percentiles,
    Period, SloSeries, WorkloadDay,
};
use super::queries::{self, Query};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Marker resolution: config changes and deploys are located within this step.
const MARKER_STEP_S: f64 = 300.0;

/// One labelled series of a range query.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A Prometheus HTTP API endpoint.
#[derive(Debug, Clone)]
pub struct Prometheus {
    url: String,
    host: String,
    prefix: String,
}

impl Prometheus {
    /// # Errors
    /// A URL that is not `http://host[:port][/prefix]`.
    pub fn new(url: &str) -> Result<Prometheus, ReportError> {
        let bad = |reason: &str| ReportError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// is supported (use a local proxy for https)"))?;
        let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let host = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        Ok(Prometheus {
            url: url.trim_end_matches('/').to_owned(),
            host,
            prefix: format!("/{}", prefix.trim_matches('/'))
                .trim_end_matches('/')
                .to_owned(),
        })
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> ReportError {
        ReportError::Unreachable {
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }

    fn get(&self, target: &str) -> Result<(u16, String), ReportError> {
        let addr = self
            .host
            .to_socket_addrs()
            .map_err(|e| self.unreachable(e))?
            .next()
            .ok_or_else(|| self.unreachable("the host name resolves to no address"))?;
        let mut stream =
            TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| self.unreachable(e))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| self.unreachable(e))?;
        let request = format!("GET {target} HTTP/1.0\r\nHost: {}\r\n\r\n", self.host);
        stream
            .write_all(request.as_bytes())
            .map_err(|e| self.unreachable(e))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .map_err(|e| self.unreachable(e))?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| self.unreachable("the answer is not HTTP"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.unreachable("the answer has no HTTP status"))?;
        Ok((status, body.to_owned()))
    }

    /// `expr` evaluated every `step` seconds from `start` to `end` (unix seconds).
    ///
    /// # Errors
    /// Prometheus unreachable, or an answer other than a successful matrix.
    pub fn range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Series>, ReportError> {
        let target = format!(
            "{}/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            self.prefix,
            encode(expr)
        );
        let (status, body) = self.get(&target)?;
        let failed = |reason: String| ReportError::Query {
            url: self.url.clone(),
            status,
            expr: expr.to_owned(),
            reason,
        };
        let json: Value = serde_json::from_str(&body).map_err(|_| {
            failed(format!(
                "not the Prometheus API: {}",
                body.chars().take(120).collect::<String>()
            ))
        })?;
        if json["status"] != "success" {
            return Err(failed(
                json["error"].as_str().unwrap_or("no error text").to_owned(),
            ));
        }
        let result = json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(result.iter().map(series).collect())
    }

    /// The dataset of `period`.
    ///
    /// # Errors
    /// Unreachable, a failed query, or no sakuga series at all in the period.
    pub fn dataset(&self, period: Period) -> Result<Dataset, ReportError> {
        let presence = self.range(
            &queries::query("presence").expr,
            period.from,
            period.to,
            HOUR_S,
        )?;
        if presence.iter().all(|s| s.points.is_empty()) {
            return Err(ReportError::NoSakugaMetrics {
                url: self.url.clone(),
                from: super::iso(period.from),
                to: super::iso(period.to),
            });
        }
        let workloads = self.workloads(period)?;
        let jobs = workloads.values().flatten().map(WorkloadDay::total).sum();
        Ok(Dataset {
            source: format!("Prometheus {}", self.url),
            period,
            slos: self.slos(period)?,
            workloads,
            animation: self.animation(period)?,
            errors: self.errors(period)?,
            failing: None,
            markers: self.markers(period)?,
            jobs,
        })
    }

    /// One value per day (or per hour) per series, keyed by the series' labels.
    fn per_step(
        &self,
        query: &Query,
        period: Period,
        step: f64,
    ) -> Result<Vec<Series2>, ReportError> {
        let window = if step == DAY_S { "1d" } else { "1h" };
        let slots = ((period.to - period.from) / step).ceil() as usize;
        let series = self.range(&query.over(window), period.from + step, period.to, step)?;
        Ok(series
            .into_iter()
            .map(|s| {
                let mut values = vec![None; slots];
                for (t, v) in s.points {
                    let slot = ((t - period.from) / step).round() as usize;
                    if (1..=slots).contains(&slot) && v.is_finite() {
                        values[slot - 1] = Some(v);
                    }
                }
                (s.labels, values)
            })
            .collect())
    }

    fn daily(&self, id: &str, period: Period) -> Result<Vec<Series2>, ReportError> {
        self.per_step(queries::query(id), period, DAY_S)
    }

    fn whole(&self, query: &Query, period: Period) -> Result<Option<f64>, ReportError> {
        let window = format!("{}s", (period.to - period.from).round() as u64);
        let series = self.range(&query.over(&window), period.to, period.to, DAY_S)?;
        Ok(series
            .first()
            .and_then(|s| s.points.last())
            .map(|p| p.1)
            .filter(|v| v.is_finite()))
    }

    fn slos(&self, period: Period) -> Result<Vec<SloSeries>, ReportError> {
        let mut out = Vec::new();
        for def in queries::slo_defs() {
            // Timeouts and OOMs is one SLO over all workloads, but its rule keeps one
            // ratio per workload (ratios do not add up); count it from the outcomes.
            let (daily, hourly, whole) = if def.name == "timeouts_and_ooms" {
                (
                    self.timeout_oom_ratio(period, DAY_S)?,
                    self.timeout_oom_ratio(period, HOUR_S)?,
                    self.timeout_oom_whole(period)?,
                )
            } else {
                let first = |rows: Vec<Series2>, slots: usize| {
                    rows.into_iter()
                        .next()
                        .map_or(vec![None; slots], |(_, v)| v)
                };
                (
                    first(self.per_step(&def.query, period, DAY_S)?, period.days()),
                    first(self.per_step(&def.query, period, HOUR_S)?, period.hours()),
                    self.whole(&def.query, period)?,
                )
            };
            out.push(SloSeries {
                name: def.name.clone(),
                alert: def.alert.clone(),
                objective: def.objective,
                description: def.description.clone(),
                daily,
                hourly,
                period: whole,
            });
        }
        Ok(out)
    }

    fn timeout_oom_ratio(
        &self,
        period: Period,
        step: f64,
    ) -> Result<Vec<Option<f64>>, ReportError> {
        let rows = self.per_step(queries::query("jobs_finished"), period, step)?;
        let slots = ((period.to - period.from) / step).ceil() as usize;
        let mut bad = vec![0.0; slots];
        let mut total = vec![0.0; slots];
        for (labels, values) in rows {
            let is_bad = matches!(
                labels.get("outcome").map(String::as_str),
                Some("timeout" | "oom")
            );
            for (i, v) in values.iter().enumerate() {
                let v = v.unwrap_or(0.0);
                total[i] += v;
                if is_bad {
                    bad[i] += v;
                }
            }
        }
        Ok(bad
            .iter()
            .zip(total)
            .map(|(b, t)| (t > 0.0).then(|| b / t))
            .collect())
    }

    fn timeout_oom_whole(&self, period: Period) -> Result<Option<f64>, ReportError> {
        let window = format!("{}s", (period.to - period.from).round() as u64);
        let expr = queries::query("jobs_finished").over(&window);
        let series = self.range(&expr, period.to, period.to, DAY_S)?;
        let (mut bad, mut total) = (0.0, 0.0);
        for s in &series {
            let v = s.points.last().map_or(0.0, |p| p.1);
            total += v;
            if matches!(s.label("outcome"), "timeout" | "oom") {
                bad += v;
            }
        }
        Ok((total > 0.0).then(|| bad / total))
    }

    fn workloads(
        &self,
        period: Period,
    ) -> Result<BTreeMap<Workload, Vec<WorkloadDay>>, ReportError> {
        let days = period.days();
        let mut out: BTreeMap<Workload, Vec<WorkloadDay>> = Workload::ALL
            .iter()
            .map(|&w| (w, vec![WorkloadDay::default(); days]))
            .collect();
        for (labels, values) in self.daily("jobs_finished", period)? {
            let (Some(w), Some(o)) = (
                labels
                    .get("workload")
                    .and_then(|w| w.parse::<Workload>().ok()),
                labels
                    .get("outcome")
                    .and_then(|o| o.parse::<Outcome>().ok()),
            ) else {
                continue;
            };
            for (day, v) in out.get_mut(&w).into_iter().flatten().zip(&values) {
                day.finished[o.index()] += v.unwrap_or(0.0).round();
            }
        }
        for (metric, q) in [
            ("latency", "0.5"),
            ("latency", "0.95"),
            ("latency", "0.99"),
            ("queue_wait", "0.5"),
            ("queue_wait", "0.95"),
            ("queue_wait", "0.99"),
        ] {
            for (labels, values) in self.daily(&format!("{metric}_quantile:{q}"), period)? {
                let Some(w) = labels
                    .get("workload")
                    .and_then(|w| w.parse::<Workload>().ok())
                else {
                    continue;
                };
                for (day, v) in out.get_mut(&w).into_iter().flatten().zip(values) {
                    let p: &mut Percentiles = if metric == "latency" {
                        &mut day.latency
                    } else {
                        &mut day.queue_wait
                    };
                    *match q {
                        "0.5" => &mut p.p50,
                        "0.95" => &mut p.p95,
                        _ => &mut p.p99,
                    } = v;
                }
            }
        }
        Ok(out)
    }

    fn animation(&self, period: Period) -> Result<Vec<AnimationDay>, ReportError> {
        let mut days = vec![AnimationDay::default(); period.days()];
        for (labels, values) in self.daily("frames", period)? {
            for (day, v) in days.iter_mut().zip(values) {
                let v = v.unwrap_or(0.0).round();
                match labels.get("kind").map(String::as_str) {
                    Some("produced") => day.produced = v,
                    Some("delivered") => day.delivered = v,
                    Some("dropped") => day.dropped = v,
                    Some("duplicated") => day.duplicated = v,
                    _ => {}
                }
            }
        }
        let single =
            |rows: Vec<Series2>| rows.into_iter().next().map(|(_, v)| v).unwrap_or_default();
        let late = single(self.daily("late_frames", period)?);
        let produced = single(self.daily("produced_fps", period)?);
        let delivered = single(self.daily("delivered_fps", period)?);
        for (i, day) in days.iter_mut().enumerate() {
            day.late = late.get(i).copied().flatten().unwrap_or(0.0).round();
            day.produced_fps = produced.get(i).copied().flatten();
            day.delivered_fps = delivered.get(i).copied().flatten();
        }
        Ok(days)
    }

    fn errors(&self, period: Period) -> Result<Vec<ErrorSeries>, ReportError> {
        let mut out = Vec::new();
        for (labels, values) in self.daily("errors", period)? {
            let (Some(kind), Some(stage)) = (
                labels.get("kind").and_then(|k| k.parse::<ErrorKind>().ok()),
                labels.get("stage").and_then(|s| s.parse::<Stage>().ok()),
            ) else {
                continue;
            };
            let daily: Vec<f64> = values.iter().map(|v| v.unwrap_or(0.0).round()).collect();
            if daily.iter().any(|v| *v > 0.0) {
                out.push(ErrorSeries { kind, stage, daily });
            }
        }
        Ok(out)
    }

    /// Config changes where the generation steps up; deploys where a build version first
    /// appears after the period started (a deploy also steps the generation: one marker).
    fn markers(&self, period: Period) -> Result<Vec<MarkerPoint>, ReportError> {
        let range = |id: &str| {
            self.range(
                &queries::query(id).expr,
                period.from,
                period.to,
                MARKER_STEP_S,
            )
        };
        let mut deploys = Vec::new();
        for s in range("build_versions")? {
            if let Some(&(t, _)) = s.points.first()
                && t > period.from + MARKER_STEP_S / 2.0
            {
                deploys.push(MarkerPoint {
                    at: t,
                    kind: MarkerKind::Deploy,
                    label: format!("deploy {}", s.label("version")),
                });
            }
        }
        let mut out = deploys.clone();
        for s in range("config_generation")? {
            for pair in s.points.windows(2) {
                let ((_, before), (t, after)) = (pair[0], pair[1]);
                let near_deploy = deploys.iter().any(|d| (d.at - t).abs() <= MARKER_STEP_S);
                if after > before && !near_deploy {
                    out.push(MarkerPoint {
                        at: t,
                        kind: MarkerKind::Config,
                        label: format!("config #{after}"),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.at.total_cmp(&b.at));
        Ok(out)
    }
}

/// A series' labels and its value per day (or hour).
type Series2 = (BTreeMap<String, String>, Vec<Option<f64>>);

fn series(value: &Value) -> Series {
    let labels = value["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let points = value["values"]
        .as_array()
        .map(|values| {
            values
                .iter()
                .filter_map(|p| {
                    let t = p.get(0)?.as_f64()?;
                    let v = p.get(1)?.as_str()?.parse::<f64>().ok()?;
                    Some((t, v))
                })
                .collect()
        })
        .unwrap_or_default();
    Series { labels, points }
}

/// Percent-encodes a query parameter value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 2);
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_with_an_optional_prefix() {
        let p = Prometheus::new("http://127.0.0.1:9090/prom/").unwrap();
        assert_eq!(
            (p.host.as_str(), p.prefix.as_str()),
            ("127.0.0.1:9090", "/prom")
        );
        let p = Prometheus::new("http://prometheus").unwrap();
        assert_eq!((p.host.as_str(), p.prefix.as_str()), ("prometheus:80", ""));
        let err = Prometheus::new("https://x").unwrap_err().to_string();
        assert!(err.contains("only http://"), "{err}");
    }
}
