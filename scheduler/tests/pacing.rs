//! Paced frame delivery runs off the device worker, and FPS health is judged per running
//! stream: a paced preview neither holds the device while it plays out nor, once it has
//! finished, defers batch work on an idle server.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value as Json, json};

use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::engine::{JobEvent, JobState, WatchItem};
use sakuga_scheduler::{EngineConfig, EngineHandle, SubmitRequest};
use sakuga_telemetry::{Decision, Signals, SignalsConfig, Workload};

fn engine(dir: &std::path::Path) -> EngineHandle {
    let env = NodeEnv::new(dir.join("input"), dir.join("output"), dir.join("models"));
    std::fs::create_dir_all(&env.input_dir).unwrap();
    EngineHandle::start(
        EngineConfig::default(),
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap()
}

fn paced_workflow(frames: u32, fps: f64) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": frames, "color": 0}},
        "2": {"class_type": "StreamFrames", "inputs": {"images": ["1", 0], "fps": fps, "pace": true}},
    })
}

fn still_workflow(batch: u32) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": batch, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    })
}

fn request(workflow: Json, workload: Workload) -> SubmitRequest {
    SubmitRequest {
        workload: Some(workload),
        ..SubmitRequest::new(workflow)
    }
}

#[test]
fn a_short_job_finishes_while_a_paced_preview_is_still_playing_out() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    // 40 frames at 10 FPS: four seconds of playback for a few milliseconds of compute.
    let preview = engine
        .submit_blocking(request(paced_workflow(40, 10.0), Workload::Animation))
        .unwrap();
    let mut watch = engine.watch_blocking(&preview.job_id).unwrap();
    let mut frames = Vec::new();
    while frames.is_empty() {
        match watch.next_blocking().expect("the preview streams") {
            WatchItem::Frame(f) => frames.push(f),
            _ => continue,
        }
    }

    let short = engine
        .run_to_completion(request(still_workflow(1), Workload::SingleImage), |_| {})
        .unwrap();
    assert_eq!(short.state, JobState::Succeeded);
    assert_eq!(
        engine.get_blocking(&preview.job_id).unwrap().state,
        JobState::Running,
        "the short job ran while the preview's frames were still playing out"
    );

    while let Some(item) = watch.next_blocking() {
        if let WatchItem::Frame(f) = item {
            frames.push(f);
        }
    }
    let indexes: Vec<u64> = frames.iter().map(|f| f.index).collect();
    assert_eq!(indexes, (0..40).collect::<Vec<_>>());
    let span = frames[39]
        .produced_at
        .duration_since(frames[0].produced_at)
        .unwrap();
    assert!(
        span >= Duration::from_millis(3800),
        "frames still leave at 10 FPS: {span:?} for 39 intervals"
    );
    assert_eq!(
        engine.get_blocking(&preview.job_id).unwrap().state,
        JobState::Succeeded
    );
    engine.shutdown_blocking();
}

#[test]
fn a_cancel_cuts_a_preview_that_is_playing_out() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    // 100 s of playback: only a cancel ends it within the test's time.
    let preview = engine
        .submit_blocking(request(paced_workflow(200, 2.0), Workload::Animation))
        .unwrap();
    let mut watch = engine.watch_blocking(&preview.job_id).unwrap();
    while !matches!(watch.next_blocking(), Some(WatchItem::Frame(_))) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(engine.cancel(&preview.job_id)).unwrap();
    while watch.next_blocking().is_some() {}
    let info = engine.get_blocking(&preview.job_id).unwrap();
    assert_eq!(info.state, JobState::Cancelled);
    engine.shutdown_blocking();
}

#[test]
fn a_lone_batch_job_after_a_finished_healthy_preview_starts_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let preview = engine
        .run_to_completion(
            request(paced_workflow(24, 24.0), Workload::Animation),
            |_| {},
        )
        .unwrap();
    assert_eq!(preview.state, JobState::Succeeded);
    assert!(
        !engine.signals().is_fps_degraded(Workload::Animation),
        "no stream is running"
    );

    let mut deferred = Vec::new();
    let batch = engine
        .run_to_completion(request(still_workflow(2), Workload::Batch), |item| {
            if let WatchItem::Event(e) = item
                && let JobEvent::Admission {
                    decision: Decision::Defer,
                    reason,
                    ..
                } = &e.event
            {
                deferred.push(*reason);
            }
        })
        .unwrap();
    assert_eq!(batch.state, JobState::Succeeded);
    assert!(deferred.is_empty(), "deferred as {deferred:?}");
    engine.shutdown_blocking();
}
