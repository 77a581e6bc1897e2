//! Cancel and run-time limits reach inside long nodes: a tiled VAE decode and a tiled
//! upscale stop at their next tile, so the job ends inside the node rather than after
//! it, and a job past its workload's run-time limit fails as timed out while the device
//! moves on to the next job.

use std::sync::Arc;

use serde_json::{Value as Json, json};

use sakuga_models::demo::DEMO_CHECKPOINT;
use sakuga_models::upscale::demo::DEMO_UPSCALER;
use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::engine::{JobEvent, JobState, WatchItem};
use sakuga_scheduler::{EngineConfig, EngineHandle, SubmitRequest};
use sakuga_telemetry::{Signals, SignalsConfig, Workload};

fn engine(dir: &std::path::Path) -> EngineHandle {
    let env = NodeEnv::new(dir.join("input"), dir.join("output"), dir.join("models"));
    std::fs::create_dir_all(&env.input_dir).unwrap();
    sakuga_models::demo::write_demo_models(&env.models_dir).unwrap();
    EngineHandle::start(
        EngineConfig::default(),
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap()
}

/// A 2048 px decode: 49 latent tiles of the demo VAE.
fn decode_workflow() -> Json {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEMO_CHECKPOINT}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 2048, "height": 2048, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    })
}

/// One 1024 px frame upscaled x4 in 512 px tiles: four tiles.
fn upscale_workflow() -> Json {
    json!({
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": DEMO_UPSCALER}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 0}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    })
}

fn request(workflow: Json) -> SubmitRequest {
    SubmitRequest {
        workload: Some(Workload::SingleImage),
        ..SubmitRequest::new(workflow)
    }
}

/// Follows the job until `node` reports its first progress or starts (`on_progress`),
/// calls `act` once, then follows it to the end; returns the highest progress step the
/// node reported and its step count.
fn act_inside_node(
    engine: &EngineHandle,
    job_id: &str,
    node: &str,
    wait_for_progress: bool,
    act: impl FnOnce(),
) -> (u64, u64) {
    let mut watch = engine.watch_blocking(job_id).unwrap();
    let mut act = Some(act);
    let (mut highest, mut steps) = (0, 0);
    while let Some(item) = watch.next_blocking() {
        let WatchItem::Event(e) = item else { continue };
        let reached = match &e.event {
            JobEvent::Progress {
                node_id,
                step,
                steps: n,
            } if node_id == node => {
                highest = highest.max(*step);
                steps = *n;
                true
            }
            JobEvent::NodeStarted { node_id, .. } => !wait_for_progress && node_id == node,
            _ => false,
        };
        if reached && let Some(act) = act.take() {
            act();
        }
    }
    assert!(act.is_none(), "node {node} never got going");
    (highest, steps)
}

fn cancel(engine: &EngineHandle, job_id: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(engine.cancel(job_id)).unwrap();
}

#[test]
fn a_cancel_stops_a_tiled_vae_decode_at_its_next_tile() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let job = engine.submit_blocking(request(decode_workflow())).unwrap();
    let (highest, tiles) = act_inside_node(&engine, &job.job_id, "3", true, || {
        cancel(&engine, &job.job_id)
    });
    let info = engine.get_blocking(&job.job_id).unwrap();
    assert_eq!(info.state, JobState::Cancelled, "{:?}", info.error);
    let error = info.error.unwrap_or_default();
    assert!(
        error.contains("at node 3"),
        "stopped inside the decode: {error}"
    );
    assert!(
        highest + 1 < tiles,
        "stopped at tile {highest} of {tiles}, before the last"
    );
    engine.shutdown_blocking();
}

#[test]
fn a_cancel_stops_a_tiled_upscale_inside_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let job = engine.submit_blocking(request(upscale_workflow())).unwrap();
    act_inside_node(&engine, &job.job_id, "3", false, || {
        cancel(&engine, &job.job_id)
    });
    let info = engine.get_blocking(&job.job_id).unwrap();
    assert_eq!(info.state, JobState::Cancelled, "{:?}", info.error);
    let error = info.error.unwrap_or_default();
    assert!(
        error.contains("at node 3"),
        "stopped inside the upscale: {error}"
    );
    engine.shutdown_blocking();
}

#[test]
fn a_job_past_its_run_time_limit_times_out_and_the_device_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let job = engine.submit_blocking(request(decode_workflow())).unwrap();
    // The limit drops to nothing once the decode is under way: the next check stops it.
    let (highest, tiles) = act_inside_node(&engine, &job.job_id, "3", true, || {
        let mut tunables = engine.tunables();
        tunables.limits.run_time_s.single_image = 0.001;
        engine.reload(tunables, "test");
    });
    let info = engine.get_blocking(&job.job_id).unwrap();
    assert_eq!(info.state, JobState::TimedOut, "{:?}", info.error);
    let error = info.error.unwrap_or_default();
    assert!(error.contains("run-time limit"), "{error}");
    assert!(highest + 1 < tiles, "stopped at tile {highest} of {tiles}");

    let mut tunables = engine.tunables();
    tunables.limits.run_time_s.single_image = 0.0;
    engine.reload(tunables, "test");
    let quick = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    });
    let next = engine.run_to_completion(request(quick), |_| {}).unwrap();
    assert_eq!(next.state, JobState::Succeeded);
    engine.shutdown_blocking();
}
