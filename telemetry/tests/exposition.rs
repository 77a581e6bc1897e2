//! The Prometheus exposition: after recording each metric once, every catalogue name is in
//! it, with the catalogue's type, and (when promtool is installed) it passes
//! `promtool check metrics`.

use std::io::Write;
use std::process::{Command, Stdio};

use sakuga_telemetry::catalogue::{self, METRICS, MetricKind};
use sakuga_telemetry::prometheus::{self, PrometheusConfig};
use sakuga_telemetry::record;

fn exposition() -> String {
    let handle = prometheus::install(&PrometheusConfig::in_process()).expect("recorder installs");
    record::record_each_once();
    handle.render()
}

#[test]
fn exposition_contains_every_catalogue_name_with_its_type() {
    let text = exposition();
    for def in METRICS {
        let type_line = format!("# TYPE {} {}", def.name, def.kind.as_str());
        assert!(
            text.contains(&type_line),
            "missing {type_line:?} in:\n{text}"
        );
        if def.kind == MetricKind::Histogram {
            let bucket = format!("{}_bucket{{", def.name);
            assert!(text.contains(&bucket), "{} has no buckets", def.name);
        }
    }
    // Buckets at the SLO thresholds are real `le` edges.
    assert!(text.contains("sakuga_render_latency_seconds_bucket{workload=\"animation\",le=\"5\"}"));
    assert!(text.contains("sakuga_queue_wait_seconds_bucket{workload=\"animation\",le=\"30\"}"));
}

#[test]
fn install_twice_returns_the_same_recorder() {
    let first = prometheus::install(&PrometheusConfig::in_process()).unwrap();
    let second = prometheus::install(&PrometheusConfig::default()).unwrap();
    assert_eq!(first.listen_addr(), second.listen_addr());
    catalogue::describe_all();
}

#[test]
fn exposition_writes_to_a_file() {
    let handle = prometheus::install(&PrometheusConfig::in_process()).unwrap();
    record::record_each_once();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.prom");
    handle.write_to(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("sakuga_jobs_submitted_total"));
}

#[test]
fn promtool_accepts_the_exposition() {
    let text = exposition();
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            let required = std::env::var("SAKUGA_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "SAKUGA_REQUIRE_PROMTOOL=1 but promtool cannot run ({error}); install it with `apt-get install -y prometheus`"
            );
            eprintln!("skipping: promtool not installed ({error})");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool rejected the exposition:\n{report}\n{text}"
    );
    // promtool's lint warnings (e.g. counters without _total) come back with success too.
    assert!(
        report.trim().is_empty(),
        "promtool lint findings:\n{report}"
    );
}
