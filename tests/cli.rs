//! End-to-end tests of the `sakuga` binary: run, validate, nodes, doctor, and the errors a
//! user meets (missing file, bad JSON, invalid workflow, unwritable output dir).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value as Json, json};

fn sakuga(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sakuga"))
        .current_dir(dir)
        .args(args)
        .env_remove("SAKUGA_CONFIG")
        .output()
        .expect("the sakuga binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, workflow: &Json) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(workflow).unwrap()).unwrap();
    path
}

fn image_workflow() -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 2, "color": 0x336699}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageScaleBy", "inputs": {"image": ["2", 0], "upscale_method": "bicubic", "scale_by": 2.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "cli/test"}},
    })
}

#[test]
fn run_saves_images_and_writes_metrics_and_signals() {
    let dir = tempfile::tempdir().unwrap();
    let wf = write(dir.path(), "wf.json", &image_workflow());
    let out = sakuga(
        dir.path(),
        &[
            "--models-dir",
            "models",
            "run",
            wf.to_str().unwrap(),
            "--out",
            "rendered",
            "--metrics-out",
            "metrics.prom",
            "--signals-out",
            "signals.json",
            "--no-progress",
        ],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("node timing"), "{stdout}");
    assert!(stdout.contains("ImageScaleBy"), "{stdout}");
    for i in 1..=2 {
        let png = dir.path().join(format!("rendered/cli/test_0000{i}_.png"));
        assert!(png.exists(), "{} missing", png.display());
    }
    let metrics = std::fs::read_to_string(dir.path().join("metrics.prom")).unwrap();
    let missing: Vec<&str> = sakuga_telemetry::METRICS
        .iter()
        .map(|m| m.name)
        .filter(|name| !metrics.lines().any(|l| l.starts_with(name)))
        .collect();
    assert!(missing.is_empty(), "exposition lacks {missing:?}");
    assert!(
        metrics.contains("sakuga_node_duration_seconds_bucket{class_type=\"ImageScaleBy\""),
        "{metrics}"
    );
    promtool_accepts(&dir.path().join("metrics.prom"));

    let doctor = sakuga(dir.path(), &["doctor", "--from", "signals.json"]);
    assert!(doctor.status.success(), "stderr: {}", text(&doctor.stderr));
}

/// `promtool check metrics` on an exposition; required in CI (`SAKUGA_REQUIRE_PROMTOOL=1`).
fn promtool_accepts(path: &Path) {
    let Ok(output) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(path).unwrap())
        .output()
    else {
        assert!(
            std::env::var_os("SAKUGA_REQUIRE_PROMTOOL").is_none(),
            "promtool is required but missing"
        );
        eprintln!("promtool not installed: skipping `promtool check metrics`");
        return;
    };
    assert!(
        output.status.success(),
        "promtool: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[test]
fn validate_exits_2_and_reports_every_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let wf = write(
        dir.path(),
        "bad.json",
        &json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "magic", "width": 64, "height": 64, "crop": "disabled"}},
            "3": {"class_type": "ImageInvert", "inputs": {}},
            "4": {"class_type": "Nope", "inputs": {}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
            "6": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
            "7": {"class_type": "PreviewImage", "inputs": {"images": ["1", 5]}},
        }),
    );
    let out = sakuga(dir.path(), &["validate", wf.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", text(&out.stderr));
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    let kinds = |id: &str| -> Vec<String> {
        report["node_errors"][id]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kinds("1"), ["value_smaller_than_min"]);
    assert_eq!(kinds("2"), ["value_not_in_list"]);
    assert_eq!(kinds("3"), ["required_input_missing"]);
    assert_eq!(kinds("4"), ["missing_node_type"]);
    assert_eq!(kinds("7"), ["bad_linked_input"]);

    let text_out = sakuga(dir.path(), &["validate", wf.to_str().unwrap()]);
    assert_eq!(text_out.status.code(), Some(2));
    let stderr = text(&text_out.stderr);
    for needle in [
        "node 1 (EmptyImage): value_smaller_than_min",
        "node 4 (Nope): missing_node_type",
    ] {
        assert!(stderr.contains(needle), "{stderr}");
    }

    let good = write(dir.path(), "good.json", &image_workflow());
    assert!(
        sakuga(dir.path(), &["validate", good.to_str().unwrap()])
            .status
            .success()
    );
}

#[test]
fn clear_errors_for_missing_files_bad_json_and_unwritable_output() {
    let dir = tempfile::tempdir().unwrap();
    let missing = sakuga(dir.path(), &["validate", "nope.json"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("cannot read workflow nope.json"),
        "{}",
        text(&missing.stderr)
    );

    std::fs::write(dir.path().join("broken.json"), "{\"1\": {").unwrap();
    let broken = sakuga(
        dir.path(),
        &["run", "broken.json", "--models-dir", "m", "--no-progress"],
    );
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        text(&broken.stderr).contains("not valid JSON"),
        "{}",
        text(&broken.stderr)
    );

    // A file where the output dir should be: nothing can be created under it.
    std::fs::write(dir.path().join("blocker"), "").unwrap();
    let wf = write(dir.path(), "wf.json", &image_workflow());
    let blocked = sakuga(
        dir.path(),
        &[
            "run",
            wf.to_str().unwrap(),
            "--models-dir",
            "m",
            "--out",
            "blocker/out",
            "--no-progress",
        ],
    );
    assert_eq!(blocked.status.code(), Some(1));
    assert!(
        text(&blocked.stderr).contains("output dir blocker/out"),
        "{}",
        text(&blocked.stderr)
    );

    let invalid = write(
        dir.path(),
        "invalid.json",
        &json!({"1": {"class_type": "Nope", "inputs": {}}}),
    );
    let out = sakuga(
        dir.path(),
        &[
            "run",
            invalid.to_str().unwrap(),
            "--models-dir",
            "m",
            "--no-progress",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn nodes_lists_the_catalogue_as_object_info() {
    let dir = tempfile::tempdir().unwrap();
    let out = sakuga(dir.path(), &["--models-dir", "m", "nodes", "--json"]);
    assert!(out.status.success());
    let info: Json = serde_json::from_slice(&out.stdout).unwrap();
    let scale = &info["ImageScale"];
    assert_eq!(scale["output"], json!(["IMAGE"]));
    assert_eq!(
        scale["input"]["required"]["width"],
        json!(["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}])
    );
    assert_eq!(
        scale["input"]["required"]["upscale_method"][0],
        json!(["nearest-exact", "bilinear", "area", "bicubic", "lanczos"])
    );
    assert_eq!(info["SaveImage"]["output_node"], json!(true));
    let plain = sakuga(dir.path(), &["--models-dir", "m", "nodes"]);
    assert!(text(&plain.stdout).contains("EmptyImage"));
}

#[test]
fn json_logs_carry_the_stage_events_in_order_with_one_trace_id() {
    let dir = tempfile::tempdir().unwrap();
    let wf = write(dir.path(), "wf.json", &image_workflow());
    let out = sakuga(
        dir.path(),
        &[
            "--log-format",
            "json",
            "--log-filter",
            "info",
            "--models-dir",
            "m",
            "run",
            wf.to_str().unwrap(),
            "--no-progress",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let events: Vec<Json> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|j| j.get("job_id").is_some())
        .collect();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let first = names
        .iter()
        .position(|n| *n == "prompt_received")
        .expect("prompt_received logged");
    let post = names
        .iter()
        .position(|n| *n == "postprocess_done")
        .expect("postprocess_done logged");
    let last = names
        .iter()
        .position(|n| *n == "deliver_complete")
        .expect("deliver_complete logged");
    assert!(first < post && post < last, "{names:?}");
    let traces: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["trace_id"].as_str())
        .collect();
    assert_eq!(traces.len(), 1, "{traces:?}");
}

#[test]
fn validate_exits_2_on_bad_json_and_on_the_servers_size_caps() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.json"), "{\"1\": {").unwrap();
    let broken = sakuga(dir.path(), &["validate", "broken.json"]);
    assert_eq!(broken.status.code(), Some(2), "{}", text(&broken.stderr));
    assert!(text(&broken.stderr).contains("not valid JSON"));

    // Valid by itself, but over the node cap the server is configured with.
    let wf = write(dir.path(), "wf.json", &image_workflow());
    std::fs::write(
        dir.path().join("tunables.toml"),
        "[admission.limits]\nmax_nodes = 3\n",
    )
    .unwrap();
    let plain = sakuga(dir.path(), &["validate", "wf.json"]);
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain.stderr));
    let capped = sakuga(
        dir.path(),
        &[
            "validate",
            wf.to_str().unwrap(),
            "--tunables",
            "tunables.toml",
        ],
    );
    assert_eq!(capped.status.code(), Some(2), "{}", text(&capped.stderr));
    assert!(
        text(&capped.stderr).contains("node count is 4, the limit is 3"),
        "{}",
        text(&capped.stderr)
    );
}

#[test]
fn serve_refuses_an_empty_auth_token_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), " \n").unwrap();
    let out = sakuga(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--auth-token-file",
            "token",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("auth token file token is empty"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_gpu_this_machine_cannot_use_falls_back_to_the_cpu_and_says_why() {
    let Some(reason) = sakuga_models::device::cuda_unavailable(0) else {
        eprintln!("skipped: GPU 0 is usable here, so there is nothing to fall back from");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wf = write(dir.path(), "wf.json", &image_workflow());
    let out = sakuga(
        dir.path(),
        &[
            "--models-dir",
            "models",
            "--device",
            "cuda:0",
            "run",
            wf.to_str().unwrap(),
            "--out",
            "rendered",
            "--metrics-out",
            "metrics.prom",
            "--no-progress",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(
        stderr.contains("GPU unavailable, rendering on the CPU") && stderr.contains(&reason),
        "{stderr}"
    );
    // Every series names the device that really rendered.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.prom")).unwrap();
    assert!(metrics.contains("device=\"cpu\""), "{metrics}");
    assert!(!metrics.contains("device=\"cuda:0\""), "{metrics}");
}

#[test]
fn selftest_runs_the_golden_checks_and_never_falls_back() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let out = sakuga(
        dir.path(),
        &[
            "selftest",
            "--fixtures",
            fixtures.to_str().unwrap(),
            "--json",
            "selftest.json",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("10 passed, 0 failed"), "{stdout}");
    let report: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("selftest.json")).unwrap())
            .unwrap();
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["checks"].as_array().unwrap().len(), 10);

    // Missing references fail the checks that need them, by name.
    let out = sakuga(dir.path(), &["selftest", "--fixtures", "nowhere"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("goldens.json"),
        "{}",
        text(&out.stderr)
    );

    if let Some(reason) = sakuga_models::device::cuda_unavailable(0) {
        let out = sakuga(dir.path(), &["--device", "cuda:0", "selftest"]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("cannot be used") && stderr.contains(&reason),
            "{stderr}"
        );
    }
}

/// A video saved by one run is listed for, validated in and loaded by the next, as a user
/// moving a render into `input/` would.
#[test]
fn a_saved_video_loads_back_through_the_input_dir() {
    let dir = tempfile::tempdir().unwrap();
    let make = write(
        dir.path(),
        "make.json",
        &json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 5, "color": 0xff0000}},
            "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 12.0}},
            "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "video/clip", "format": "auto", "codec": "auto"}},
        }),
    );
    let flags = ["--models-dir", "models", "--input-dir", "input"];
    let run = |wf: &Path, out: &str| {
        sakuga(
            dir.path(),
            &[
                &flags[..],
                &["run", wf.to_str().unwrap(), "--out", out, "--no-progress"],
            ]
            .concat(),
        )
    };
    let made = run(&make, "out");
    assert!(made.status.success(), "{}", text(&made.stderr));
    let saved = dir.path().join("out/video/clip_00001_.mp4");
    assert!(saved.is_file(), "SaveVideo writes ComfyUI's counter name");
    std::fs::create_dir_all(dir.path().join("input")).unwrap();
    std::fs::copy(&saved, dir.path().join("input/clip.mp4")).unwrap();

    let load = write(
        dir.path(),
        "load.json",
        &json!({
            "1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
            "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "frames"}},
        }),
    );
    let loaded = run(&load, "frames");
    assert!(loaded.status.success(), "{}", text(&loaded.stderr));
    let frames = std::fs::read_dir(dir.path().join("frames"))
        .unwrap()
        .count();
    assert_eq!(frames, 5, "every frame comes back");

    // A name that is not in the input dir is a validation error naming the choices.
    let missing = write(
        dir.path(),
        "missing.json",
        &json!({"1": {"class_type": "LoadVideo", "inputs": {"file": "nope.mp4"}},
                "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}),
    );
    let refused = sakuga(
        dir.path(),
        &[&flags[..], &["validate", missing.to_str().unwrap()]].concat(),
    );
    assert_eq!(refused.status.code(), Some(2));
    let said = format!("{}{}", text(&refused.stdout), text(&refused.stderr));
    assert!(
        said.contains("nope.mp4") && said.contains("clip.mp4"),
        "{said}"
    );
}
