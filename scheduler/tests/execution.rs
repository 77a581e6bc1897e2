//! Execution: results, caching across jobs, failures that name the node, cancellation,
//! parallel branches, and deep chains.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sakuga_scheduler::SchedulerError;
use serde_json::json;

use common::{COUNTER_RUNS, Recorder, counter_chain, fixture, job};

// COUNTER_RUNS is process-wide; tests that count executions hold this lock.
static SERIAL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

#[test]
fn a_chain_computes_its_result() {
    let f = fixture(2);
    let plan = f.plan(&counter_chain(10, 5)).unwrap();
    let rec = Arc::new(Recorder::default());
    let report = f.executor.run(&plan, &job("j1", &rec)).unwrap();
    assert_eq!(report.runs.len(), 11);
    assert_eq!(rec.outputs.lock()[0].1.path.to_str(), Some("int:15"));
}

#[test]
fn the_same_1000_node_workflow_twice_reuses_the_cache() {
    let _serial = SERIAL.lock();
    let f = fixture(2);
    let wf = counter_chain(1000, 0);
    let before = COUNTER_RUNS.load(Ordering::Relaxed);
    let rec = Arc::new(Recorder::default());
    let first = f
        .executor
        .run(&f.plan(&wf).unwrap(), &job("a", &rec))
        .unwrap();
    assert_eq!(COUNTER_RUNS.load(Ordering::Relaxed) - before, 1000);
    assert_eq!(first.executed(), 1001);

    let mid = COUNTER_RUNS.load(Ordering::Relaxed);
    let rec2 = Arc::new(Recorder::default());
    let second = f
        .executor
        .run(&f.plan(&wf).unwrap(), &job("b", &rec2))
        .unwrap();
    assert_eq!(
        COUNTER_RUNS.load(Ordering::Relaxed) - mid,
        0,
        "no counter ran again"
    );
    assert_eq!(second.cached(), 1000);
    assert_eq!(second.executed(), 1, "only the output node runs");
    assert_eq!(rec2.outputs.lock()[0].1.path.to_str(), Some("int:1000"));

    // A changed literal at the head invalidates everything downstream.
    let third = f
        .executor
        .run(&f.plan(&counter_chain(1000, 1)).unwrap(), &job("c", &rec2))
        .unwrap();
    assert_eq!(third.cached(), 0);
}

#[test]
fn a_panicking_node_fails_its_job_and_the_next_job_succeeds() {
    let f = fixture(2);
    let wf = json!({
        "1": {"class_type": "TestCounter", "inputs": {"value": 1}},
        "2": {"class_type": "TestPanic", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "TestIntSink", "inputs": {"value": ["2", 0]}},
    });
    let rec = Arc::new(Recorder::default());
    let err = f
        .executor
        .run(&f.plan(&wf).unwrap(), &job("p", &rec))
        .unwrap_err();
    match &err {
        SchedulerError::NodePanicked {
            node_id,
            class_type,
            message,
        } => {
            assert_eq!((node_id.as_str(), class_type.as_str()), ("2", "TestPanic"));
            assert!(message.contains("deliberate test panic"));
        }
        other => panic!("expected a panic error, got {other}"),
    }
    assert!(err.to_string().contains("node 2 (TestPanic)"));
    assert!(rec.outputs.lock().is_empty());

    // Parallel branches: the panic happens on a pool thread; the pool must survive too.
    for _ in 0..3 {
        let wf = json!({
            "1": {"class_type": "TestPanic", "inputs": {"value": 1}},
            "2": {"class_type": "TestCounter", "inputs": {"value": 1}},
            "3": {"class_type": "TestIntSink", "inputs": {"value": ["1", 0]}},
            "4": {"class_type": "TestIntSink", "inputs": {"value": ["2", 0]}},
        });
        assert!(
            f.executor
                .run(&f.plan(&wf).unwrap(), &job("q", &rec))
                .is_err()
        );
    }
    let ok = f
        .executor
        .run(&f.plan(&counter_chain(5, 0)).unwrap(), &job("next", &rec))
        .unwrap();
    assert_eq!(ok.runs.len(), 6);
}

#[test]
fn a_node_error_names_the_node_and_class() {
    let f = fixture(1);
    let wf = json!({
        "img": {"class_type": "LoadImage", "inputs": {"image": "gone.png"}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["img", 0]}},
    });
    // The file exists at validation time, then disappears before the run.
    std::fs::write(f.executor.env().input_dir.join("gone.png"), b"not a png").unwrap();
    let plan = f.plan(&wf).unwrap();
    let rec = Arc::new(Recorder::default());
    let err = f.executor.run(&plan, &job("e", &rec)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("node img (LoadImage)"), "{text}");
    assert!(text.contains("gone.png"), "{text}");
    assert_eq!(err.kind(), Some(sakuga_telemetry::ErrorKind::InvalidInput));
}

#[test]
fn cancellation_stops_before_the_next_node() {
    let _serial = SERIAL.lock();
    let f = fixture(1);
    let wf = json!({
        "1": {"class_type": "TestSelfCancel", "inputs": {"value": 1}},
        "2": {"class_type": "TestCounter", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "TestIntSink", "inputs": {"value": ["2", 0]}},
    });
    let before = COUNTER_RUNS.load(Ordering::Relaxed);
    let rec = Arc::new(Recorder::default());
    let err = f
        .executor
        .run(&f.plan(&wf).unwrap(), &job("x", &rec))
        .unwrap_err();
    assert!(matches!(err, SchedulerError::Cancelled { .. }), "{err}");
    assert_eq!(
        COUNTER_RUNS.load(Ordering::Relaxed),
        before,
        "the counter after the cancel never ran"
    );
}

#[test]
fn independent_branches_all_run() {
    let f = fixture(2);
    let mut wf = serde_json::Map::new();
    for b in 0..8 {
        wf.insert(
            format!("c{b}"),
            json!({"class_type": "TestCounter", "inputs": {"value": b * 100}}),
        );
        wf.insert(format!("s{b}"), json!({"class_type": "TestIntSink", "inputs": {"value": [format!("c{b}"), 0], "tag": "t"}}));
    }
    let rec = Arc::new(Recorder::default());
    let plan = f.plan(&serde_json::Value::Object(wf)).unwrap();
    f.executor.run(&plan, &job("par", &rec)).unwrap();
    let mut got: Vec<String> = rec
        .outputs
        .lock()
        .iter()
        .map(|(_, o)| o.path.display().to_string())
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..8).map(|b| format!("int:{}", b * 100 + 1)).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn a_100000_node_chain_runs() {
    let f = fixture(2);
    let plan = f.plan(&counter_chain(100_000, 0)).unwrap();
    let rec = Arc::new(Recorder::default());
    let report = f.executor.run(&plan, &job("deep", &rec)).unwrap();
    assert_eq!(report.runs.len(), 100_001);
    assert_eq!(rec.outputs.lock()[0].1.path.to_str(), Some("int:100000"));
}

#[test]
fn image_nodes_save_pngs_with_the_workflow_embedded() {
    let f = fixture(2);
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 16, "batch_size": 2, "color": 0xFF8000}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear", "width": 0, "height": 32, "crop": "disabled"}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "shots/test"}},
    });
    let rec = Arc::new(Recorder::default());
    f.executor
        .run(&f.plan(&wf).unwrap(), &job("img", &rec))
        .unwrap();
    let outputs = rec.outputs.lock();
    assert_eq!(outputs.len(), 4);
    let first = &outputs[0].1.path;
    assert!(
        first.ends_with("shots/test_00001_.png"),
        "{}",
        first.display()
    );
    let text = sakuga_nodes::image::read_png_text(first).unwrap();
    let prompt: serde_json::Value = serde_json::from_str(&text[0].1).unwrap();
    assert_eq!(prompt["3"]["class_type"], "ImageScale");
    let (image, _) = sakuga_nodes::image::load_image(first, &candle_core::Device::Cpu).unwrap();
    assert_eq!(image.dims(), &[1, 32, 64, 3]);
    // Inverted 0xFF8000 is (0, 127, 255); 8-bit truncation may land one step lower.
    let px = sakuga_nodes::image::to_pixels(&image).unwrap()[0].data[..3].to_vec();
    assert_eq!((px[0], px[2]), (0, 255));
    assert!((126..=127).contains(&px[1]), "{px:?}");
}

#[test]
fn save_image_refuses_prefixes_outside_the_output_dir() {
    let f = fixture(1);
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../escape"}},
    });
    let rec = Arc::new(Recorder::default());
    let err = f
        .executor
        .run(&f.plan(&wf).unwrap(), &job("esc", &rec))
        .unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(!f.dir.path().join("escape_00001_.png").exists());
}

/// `ComfySwitchNode` choosing between a counter chain and a node that panics.
fn switch_workflow(switch: serde_json::Value) -> serde_json::Value {
    json!({
        "start": {"class_type": "TestCounter", "inputs": {"value": 1}},
        "taken": {"class_type": "TestCounter", "inputs": {"value": ["start", 0]}},
        "boom": {"class_type": "TestPanic", "inputs": {"value": ["start", 0]}},
        "flag": {"class_type": "PrimitiveBoolean", "inputs": {"value": true}},
        "switch": {"class_type": "ComfySwitchNode", "inputs": {
            "switch": switch, "on_true": ["taken", 0], "on_false": ["boom", 0]}},
        "sink": {"class_type": "TestIntSink", "inputs": {"value": ["switch", 0]}},
    })
}

#[test]
fn a_switch_runs_only_the_branch_it_takes() {
    let _serial = SERIAL.lock();
    let f = fixture(2);
    for switch in [json!(true), json!(["flag", 0])] {
        let rec = Arc::new(Recorder::default());
        let plan = f.plan(&switch_workflow(switch.clone())).unwrap();
        let report = f.executor.run(&plan, &job("sw", &rec)).unwrap();
        assert_eq!(
            rec.outputs.lock()[0].1.path.to_str(),
            Some("int:3"),
            "{switch}"
        );
        let ran: Vec<&str> = report.runs.iter().map(|r| &*r.node_id).collect();
        assert!(
            !ran.contains(&"boom"),
            "{switch}: the branch not taken ran: {ran:?}"
        );
        assert!(ran.contains(&"taken"), "{switch}: {ran:?}");
    }
    // The other way, the panicking branch is evaluated and fails the job by name.
    let rec = Arc::new(Recorder::default());
    let plan = f.plan(&switch_workflow(json!(false))).unwrap();
    let err = f.executor.run(&plan, &job("sw2", &rec)).unwrap_err();
    assert!(
        matches!(&err, SchedulerError::NodePanicked { node_id, .. } if node_id == "boom"),
        "{err}"
    );
}

#[test]
fn a_lazy_source_shared_with_an_eager_consumer_runs_once() {
    let _serial = SERIAL.lock();
    let f = fixture(2);
    let mut wf = switch_workflow(json!(true));
    // "taken" also feeds a second sink directly, so it runs eagerly; the switch still
    // waits for it and then reads its output.
    wf["side"] =
        json!({"class_type": "TestIntSink", "inputs": {"value": ["taken", 0], "tag": "side"}});
    let before = COUNTER_RUNS.load(Ordering::Relaxed);
    let rec = Arc::new(Recorder::default());
    let report = f
        .executor
        .run(&f.plan(&wf).unwrap(), &job("shared", &rec))
        .unwrap();
    let mut ran: Vec<&str> = report.runs.iter().map(|r| &*r.node_id).collect();
    ran.sort_unstable();
    assert_eq!(ran, ["side", "sink", "start", "switch", "taken"]);
    let outputs: Vec<String> = rec
        .outputs
        .lock()
        .iter()
        .map(|(_, o)| o.path.display().to_string())
        .collect();
    assert_eq!(outputs, ["int:3", "int:3"]);
    let counted = COUNTER_RUNS.load(Ordering::Relaxed) - before;
    assert_eq!(counted, 2, "start and taken ran once each");
}
