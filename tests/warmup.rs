//! Warmup preloads models through their loader nodes, so the first job that names them
//! finds them resident in the model cache; names it cannot load are reported one by one.

use std::sync::Arc;

use serde_json::json;

use sakuga::server::ops::{WARMUP_LABEL, warmup};
use sakuga_models::cache::ModelCache;
use sakuga_models::store::ModelStore;
use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::engine::{JobState, ListFilter};
use sakuga_scheduler::{EngineConfig, EngineHandle, SubmitRequest};
use sakuga_telemetry::{Signals, SignalsConfig};

#[test]
fn warmed_models_are_cache_hits_for_the_first_job() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    sakuga_models::demo::write_demo_models(&models).unwrap();
    let mut env = NodeEnv::new(
        dir.path().join("input"),
        dir.path().join("out"),
        models.clone(),
    );
    env.resources
        .insert(Arc::new(ModelStore::new(models.clone())));
    env.resources
        .insert(Arc::new(ModelCache::new(1 << 30, "cpu".to_owned())));
    let cache = env.resources.get::<ModelCache>().unwrap();
    let engine = EngineHandle::start(
        EngineConfig::default(),
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        // No minimum hold: the planned-load flag follows the warmup exactly here (the hold
        // has its own test in the telemetry crate).
        Signals::new(SignalsConfig {
            planned_load_hold_s: Some(0.0),
            ..SignalsConfig::default()
        }),
    )
    .unwrap();

    let names: Vec<String> = [
        "sakuga-demo-sd15.safetensors",
        "upscale_models/realesr-animevideov3-x4.param",
        "sakuga-demo-rife.safetensors",
        "sakuga-demo-lora.safetensors",
        "missing.safetensors",
        "../outside.safetensors",
    ]
    .map(String::from)
    .to_vec();
    let report = warmup(&engine, &names);
    assert_eq!(report.loaded, names[..4], "failed: {:?}", report.failed);
    assert_eq!(report.failed.len(), 2);
    assert!(report.failed[0].starts_with("missing.safetensors: not found"));
    assert!(report.failed[1].contains("inside the models dir"));

    let warmed = cache.stats();
    // Checkpoint file, UNet, CLIP and VAE; the upscaler; the interpolator.
    assert_eq!(warmed.loads, 6, "{warmed:?}");
    assert!(cache.resident_bytes() > 0);
    assert!(
        !engine.signals().snapshot().planned_heavy_load,
        "planned load is off again once warmup is done"
    );
    // Each load was a job of its own through admission, the queue and the device worker.
    let warmup_jobs = block_on(engine.list(
        ListFilter {
            labels: [(WARMUP_LABEL.to_owned(), "true".to_owned())].into(),
            ..ListFilter::default()
        },
        100,
        None,
    ))
    .unwrap()
    .jobs;
    assert_eq!(warmup_jobs.len(), 3, "checkpoint, upscaler, interpolator");
    assert!(warmup_jobs.iter().all(|j| j.state == JobState::Succeeded
        && j.workload == sakuga_telemetry::Workload::SingleImage
        && j.started_at.is_some()));

    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x3366cc}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "realesr-animevideov3-x4.param"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    });
    let info = engine
        .run_to_completion(SubmitRequest::new(workflow), |_| {})
        .unwrap();
    assert_eq!(info.state, JobState::Succeeded, "{:?}", info.error);
    let after = cache.stats();
    assert_eq!(after.loads, warmed.loads, "nothing loaded again");
    // Warming what is resident runs the loader again (a warmup's nodes always run) and
    // finds it in the model cache.
    let again = warmup(&engine, &names[..1]);
    assert_eq!(again.loaded, names[..1], "{:?}", again.failed);
    let rewarmed = cache.stats();
    assert_eq!(rewarmed.loads, warmed.loads, "nothing loaded again");
    assert!(rewarmed.hits > after.hits, "{rewarmed:?}");
    // Lookups go through the signals, so the rolling windows show the hit rate.
    let snapshot = engine.signals().snapshot();
    let system = snapshot
        .system(sakuga_telemetry::window::Window::FiveMinutes)
        .unwrap();
    let hit_rate = system.cache_hit_rate.expect("a cache hit rate");
    assert!(hit_rate > 0.0 && hit_rate < 1.0, "{hit_rate}");
    engine.shutdown_blocking();
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

#[test]
fn warmup_is_admitted_like_any_job() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    sakuga_models::demo::write_demo_models(&models).unwrap();
    let mut env = NodeEnv::new(
        dir.path().join("input"),
        dir.path().join("out"),
        models.clone(),
    );
    env.resources.insert(Arc::new(ModelStore::new(models)));
    env.resources
        .insert(Arc::new(ModelCache::new(1 << 30, "cpu".to_owned())));
    let mut config = EngineConfig::default();
    // Smaller than the demo checkpoint: admission refuses to load it.
    config.tunables.admission.memory_budget_bytes = 1024;
    let engine = EngineHandle::start(
        config,
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap();
    let report = warmup(&engine, &["sakuga-demo-sd15.safetensors".to_owned()]);
    assert!(report.loaded.is_empty());
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].contains("denied"), "{}", report.failed[0]);
    engine.shutdown_blocking();
}
