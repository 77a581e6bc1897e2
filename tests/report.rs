//! `sakuga report` end to end: a synthetic fortnight with known truth (a deploy on day 3
//! that raises OOMs, an FPS regression on day 5, a latency tail on day 6) read back from
//! the embedded job history and from a real Prometheus (backfilled with promtool), the
//! errors a user meets, and a real browser rendering the HTML.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use sakuga::report::scenario::{self, Truth};
use sakuga_telemetry::history;
use support::promstack::{Process, free_port, http, tools_available, wait_for};

/// The fortnight ends at a whole hour, an hour ago (Prometheus keeps it: within retention).
fn scenario_end() -> f64 {
    ((history::unix_now() / 3600.0).floor() - 1.0) * 3600.0
}

fn sakuga(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .current_dir(dir)
        .args(args)
        .env_remove("SAKUGA_CONFIG")
        .env_remove("SAKUGA_DATA_DIR")
        .env_remove("SAKUGA_OUT")
        .output()
        .expect("the sakuga binary runs")
}

fn report_json(dir: &Path, args: &[&str]) -> Value {
    let out = sakuga(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sakuga report failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

fn regression<'a>(report: &'a Value, metric: &str) -> &'a Value {
    report["regressions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric} regression in {:#}", report["regressions"]))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// What both sources must find in the scenario; `exact` for the embedded history (its
/// percentiles are exact, Prometheus interpolates inside histogram buckets).
fn assert_truth(report: &Value, truth: &Truth, exact: bool) {
    // Markers: the deploy and the config change, where they happened.
    let markers = report["data"]["markers"].as_array().unwrap();
    let near = |at: f64, kind: &str| {
        markers
            .iter()
            .any(|m| m["kind"] == kind && (f(&m["at"]) - at).abs() <= 1200.0)
    };
    assert!(
        near(truth.deploy_at, "deploy"),
        "deploy marker: {markers:?}"
    );
    assert!(
        near(truth.config_change_at, "config"),
        "config marker: {markers:?}"
    );

    // OOMs: none before the deploy, one batch job in ten after (14.4 a day).
    let oom = regression(report, "ooms_per_day");
    assert_eq!(oom["day"], truth.oom_day, "{oom:#}");
    assert_eq!(oom["finding"]["rule"], "SakugaOomSpikeAfterConfigChange");
    assert!(
        oom["runbook_url"]
            .as_str()
            .unwrap()
            .ends_with("SakugaOomSpikeAfterConfigChange.md")
    );
    let tto = &report["timeouts_and_ooms"];
    let full_day = f(&tto[truth.oom_day + 1]);
    // 14.4 OOMs of 336 finished jobs a day.
    assert!(
        (full_day - 14.4 / 336.0).abs() < 0.006,
        "timeouts+ooms share {full_day}"
    );
    assert!(f(&tto[0]) < 0.001, "no OOMs before the deploy: {tto}");
    let budget = report["slos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "timeouts_and_ooms")
        .unwrap();
    assert!(
        f(&budget["budget_left"]) < 0.0,
        "the OOM budget is overspent: {budget:#}"
    );
    assert!(budget["worst_hour"]["start"].is_number(), "{budget:#}");

    assert_fps_and_latency(report, truth, exact);
}

fn assert_fps_and_latency(report: &Value, truth: &Truth, exact: bool) {
    // FPS: delivered 18 against 24 produced from day 5: the client/CDN rule.
    let fps = regression(report, "fps_health_ratio");
    assert_eq!(fps["day"], truth.fps_day, "{fps:#}");
    assert_eq!(fps["finding"]["rule"], "SakugaDeliveredFpsDeviation");
    assert!((f(&fps["value"]) - 0.75).abs() < 0.02, "{fps:#}");
    let day = &report["data"]["animation"][truth.fps_day];
    assert!((f(&day["produced_fps"]) - 24.0).abs() < 0.5, "{day:#}");
    assert!(
        (f(&day["dropped"]) - 48.0 * 60.0).abs() < 48.0 * 60.0 * 0.05,
        "{day:#}"
    );

    // Latency: one single-image job in ten takes 25 s from day 6, and queues grow.
    let tail = regression(report, "latency_p99_s");
    assert_eq!(tail["workload"], "single_image", "{tail:#}");
    assert_eq!(tail["day"], truth.latency_day, "{tail:#}");
    assert_eq!(tail["finding"]["rule"], "SakugaSchedulerSaturation");
    let p99 = f(&tail["value"]);
    if exact {
        assert_eq!(p99, 25.0);
    } else {
        assert!(
            (15.0..=30.0).contains(&p99),
            "p99 inside the 15-30 s bucket: {p99}"
        );
    }
    assert_eq!(
        report["regressions"].as_array().unwrap().len(),
        3,
        "{:#}",
        report["regressions"]
    );
    let todo = report["todo"].as_array().unwrap();
    assert!(
        todo.iter()
            .any(|t| t.as_str().unwrap().contains("docs/runbooks/")),
        "{todo:?}"
    );
}

fn write_history(data_dir: &Path, to: f64) {
    history::write_entries(&data_dir.join(history::HISTORY_DIR), &scenario::entries(to)).unwrap();
}

#[test]
fn the_embedded_history_finds_the_scenarios_regressions() {
    let dir = tempfile::tempdir().unwrap();
    let to = scenario_end();
    write_history(&dir.path().join("data"), to);
    let to_arg = format!("{to}");
    let report = report_json(
        dir.path(),
        &[
            "--data-dir",
            "data",
            "--out",
            "out",
            "report",
            "--to",
            &to_arg,
            "--since",
            "7d",
            "--compare-previous",
            "--json",
        ],
    );
    assert_truth(&report, &Truth::ending_at(to), true);
    assert!(report["previous"]["jobs"].as_f64().unwrap() > 0.0);
    let failing = &report["data"]["failing"][0];
    assert_eq!(failing["model"], "sdxl-lineart-lora-v2", "{failing:#}");
    // Without --compare-previous the baseline is the earlier days of the week: same truth.
    let report = report_json(
        dir.path(),
        &[
            "--data-dir",
            "data",
            "--out",
            "out",
            "report",
            "--to",
            &to_arg,
            "--json",
        ],
    );
    assert_truth(&report, &Truth::ending_at(to), true);

    let html = std::fs::read_to_string(dir.path().join("out/report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 8, "charts are inline SVG");
    assert!(
        !html.contains("<script") && !html.contains("src=\"http"),
        "self-contained"
    );
    let md = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
    assert!(md.contains("SakugaOomSpikeAfterConfigChange"), "{md}");
}

#[test]
fn a_missing_or_empty_history_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = sakuga(dir.path(), &["--data-dir", "nothing", "report"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no job history at") && stderr.contains("does not exist"),
        "{stderr}"
    );

    std::fs::create_dir_all(dir.path().join("empty/history")).unwrap();
    let out = sakuga(dir.path(), &["--data-dir", "empty", "report"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the folder is empty"), "{stderr}");

    // History, but none in the period asked for.
    write_history(&dir.path().join("old"), scenario_end());
    let out = sakuga(
        dir.path(),
        &[
            "--data-dir",
            "old",
            "report",
            "--from",
            "2020-01-01",
            "--to",
            "2020-01-08",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no job finished between 2020-01-01T00:00Z"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_prometheus_gets_a_specific_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = sakuga(dir.path(), &["report", "--prometheus", &url]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("prometheus {url} is unreachable")),
        "{stderr}"
    );
    let out = sakuga(
        dir.path(),
        &["report", "--prometheus", "https://prom.example"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("only http://"));
}

/// A real Prometheus over a promtool-backfilled TSDB of the scenario.
fn backfilled_prometheus(dir: &Path, to: f64) -> (Process, String) {
    let metrics = dir.join("scenario.om");
    std::fs::write(&metrics, scenario::openmetrics(to, 600.0)).unwrap();
    let tsdb = dir.join("tsdb");
    let out = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics", "--quiet"])
        .arg(&metrics)
        .arg(&tsdb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool backfill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 15s\n").unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg("--storage.tsdb.retention.time=90d")
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let process = Process(child);
    wait_for("prometheus ready", Duration::from_secs(60), || {
        std::net::TcpStream::connect(&addr)
            .ok()
            .and_then(|_| (http("GET", &addr, "/-/ready", None).0 == 200).then_some(()))
    });
    (process, format!("http://{addr}"))
}

#[test]
fn prometheus_backfilled_with_the_scenario_gives_the_same_findings() {
    if !tools_available(&["promtool", "prometheus"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let to = scenario_end();
    let (_prometheus, url) = backfilled_prometheus(dir.path(), to);
    let to_arg = format!("{to}");
    let report = report_json(
        dir.path(),
        &[
            "--out",
            "out",
            "report",
            "--prometheus",
            &url,
            "--to",
            &to_arg,
            "--compare-previous",
            "--json",
        ],
    );
    assert_truth(&report, &Truth::ending_at(to), false);
    assert!(
        report["data"]["failing"].is_null(),
        "Prometheus has no per-model detail"
    );

    // The same Prometheus over a period it holds nothing of.
    let out = sakuga(
        dir.path(),
        &[
            "report",
            "--prometheus",
            &url,
            "--from",
            "2020-01-01",
            "--to",
            "2020-01-08",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("has no sakuga metrics between 2020-01-01T00:00Z"),
        "{stderr}"
    );
}

/// The hook end to end: a real server with a data dir keeps a summary of each finished job
/// (and a marker of its start), and the report reads it back.
#[test]
fn a_server_keeps_the_history_the_report_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = support::spawn_server(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(support::wait_serving(&url));
    let workflow = serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "report/test"}},
    });
    std::fs::write(dir.path().join("wf.json"), workflow.to_string()).unwrap();
    let out = sakuga(
        dir.path(),
        &[
            "submit",
            "wf.json",
            "--server",
            &url,
            "--workload",
            "single_image",
            "--watch",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The writer thread appends when its queue runs dry: poll the report for the job.
    let report = wait_for("the job in the history", Duration::from_secs(30), || {
        let out = sakuga(
            dir.path(),
            &[
                "--data-dir",
                "data",
                "--out",
                "out",
                "report",
                "--since",
                "1h",
                "--json",
            ],
        );
        let json: Value = serde_json::from_slice(&out.stdout).ok()?;
        (json["data"]["jobs"].as_f64()? >= 1.0).then_some(json)
    });
    let day = &report["data"]["workloads"]["single_image"][0];
    assert_eq!(day["finished"][0], 1.0, "one success: {day:#}");
    assert!(
        day["queue_wait"]["p50"].is_number(),
        "queue wait kept: {day:#}"
    );
    assert_eq!(
        report["data"]["markers"][0]["kind"], "config",
        "the start is a config change"
    );
}

/// The report's queries are checked as the rules are: promtool parses every expression.
#[test]
fn the_report_queries_pass_promtool_check() {
    if !tools_available(&["promtool"]) {
        return;
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/report-queries.json");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Renders the example report in headless Chromium: a PNG comes out and the console
/// stays clean. `SAKUGA_UPDATE_DOCS=1` copies the PNG to `docs/report-example.png`.
#[test]
fn a_real_browser_renders_the_report_without_console_errors() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("SAKUGA_REQUIRE_CHROMIUM").map_or(true, |v| v != "1"),
            "chromium not installed but SAKUGA_REQUIRE_CHROMIUM=1: apt-get install -y chromium"
        );
        eprintln!("skipping: chromium not installed (apt-get install -y chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let to = scenario_end();
    write_history(&dir.path().join("data"), to);
    let to_arg = format!("{to}");
    let out = sakuga(
        dir.path(),
        &[
            "--data-dir",
            "data",
            "--out",
            "out",
            "report",
            "--to",
            &to_arg,
            "--compare-previous",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = dir.path().join("out/report.html");
    let png = dir.path().join("report.png");
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg("--window-size=1600,5200")
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("chromium runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {stderr}");
    let console: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "a real picture: {} bytes",
        bytes.len()
    );
    if std::env::var("SAKUGA_UPDATE_DOCS").is_ok_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/report-example.png");
        std::fs::copy(&png, docs).unwrap();
    }
}
