//! Memory admission from shapes propagated through the plan: upscales and latent/image
//! conversions are priced before the job starts, what cannot fit the budget is refused at
//! submit naming the node, size caps apply to converted values, a node past its budget at
//! run time fails the job with `oom`, and estimates grow with steps, resolution and scale.

mod common;

use std::sync::Arc;

use serde_json::{Value as Json, json};

use sakuga_nodes::{NodeEnv, NodeRegistry};
use sakuga_scheduler::engine::JobState;
use sakuga_scheduler::{EngineConfig, EngineHandle, SchedulerError, SubmitRequest};
use sakuga_telemetry::{AdmissionReason, Signals, SignalsConfig};

use common::{Recorder, fixture, job};

const GIB: u64 = 1 << 30;

fn engine(dir: &std::path::Path) -> EngineHandle {
    let models = dir.join("models");
    sakuga_models::demo::write_demo_models(&models).unwrap();
    let env = NodeEnv::new(dir.join("input"), dir.join("output"), models);
    std::fs::create_dir_all(&env.input_dir).unwrap();
    EngineHandle::start(
        EngineConfig::default(),
        Arc::new(NodeRegistry::with_builtins()),
        Arc::new(env),
        Signals::new(SignalsConfig::default()),
    )
    .unwrap()
}

fn upscaled_image(side: u32, scale: f64) -> Json {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "scale_by": scale}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "big"}},
    })
}

/// txt2img with the demo checkpoint: `side` pixels, `steps` steps, the latent upscaled by
/// each of `scales` before the decode.
fn txt2img(side: u32, steps: u32, scales: &[f64]) -> Json {
    let mut wf = json!({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sakuga_models::demo::DEMO_CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
    });
    let mut last = "sample".to_owned();
    for (i, scale) in scales.iter().enumerate() {
        let id = format!("up{i}");
        wf[&id] = json!({"class_type": "LatentUpscaleBy", "inputs": {"samples": [last, 0], "upscale_method": "nearest-exact", "scale_by": scale}});
        last = id;
    }
    wf["decode"] =
        json!({"class_type": "VAEDecode", "inputs": {"samples": [last, 0], "vae": ["ckpt", 2]}});
    wf["save"] = json!({"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "t"}});
    wf
}

#[test]
fn an_upscale_past_the_budget_is_refused_at_submit_naming_the_node_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let (_, estimate) = engine.check(&upscaled_image(8192, 8.0), None).unwrap();
    // The x8 output alone: 65536^2 RGB f32.
    assert!(
        estimate.peak_memory_bytes >= 48 * GIB,
        "{}",
        estimate.peak_memory_bytes
    );
    assert_eq!(estimate.peak_node.as_deref(), Some("node 2 (ImageScaleBy)"));
    assert_eq!((estimate.width, estimate.height), (65536, 65536));
    match engine.submit_blocking(SubmitRequest::new(upscaled_image(8192, 8.0))) {
        Err(SchedulerError::Denied {
            reason: AdmissionReason::MemoryHeadroom,
            detail,
            ..
        }) => {
            assert!(detail.contains("node 2 (ImageScaleBy)"), "{detail}");
            assert!(detail.contains("bytes"), "{detail}");
        }
        other => panic!("expected a memory refusal, got {other:?}"),
    }
    // Nothing was queued, and the engine still runs what fits.
    assert_eq!(engine.demand_blocking().unwrap().queued_jobs, 0);
    let info = engine
        .run_to_completion(SubmitRequest::new(upscaled_image(16, 2.0)), |_| {})
        .unwrap();
    assert_eq!(info.state, JobState::Succeeded, "{:?}", info.error);
    engine.shutdown_blocking();
}

#[test]
fn latent_upscales_before_a_decode_are_priced_at_the_decoded_size() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let (_, small) = engine.check(&txt2img(512, 20, &[]), None).unwrap();
    let (_, big) = engine.check(&txt2img(512, 20, &[8.0, 8.0]), None).unwrap();
    // 512 px -> 64 latent cells -> 4096 cells -> a 32768^2 RGB f32 image.
    assert!(big.peak_memory_bytes >= 32768 * 32768 * 3 * 4, "{big:?}");
    // The decoded image is still alive while SaveImage converts it to 8-bit pixels.
    assert_eq!(big.peak_node.as_deref(), Some("node save (SaveImage)"));
    assert!(small.peak_memory_bytes < GIB, "{small:?}");
    assert!(
        big.expected_duration > small.expected_duration * 100,
        "{:?} vs {:?}",
        big.expected_duration,
        small.expected_duration
    );
    let denied = engine
        .submit_blocking(SubmitRequest::new(txt2img(512, 20, &[8.0, 8.0])))
        .unwrap_err();
    assert!(
        matches!(&denied, SchedulerError::Denied { reason: AdmissionReason::MemoryHeadroom, detail, .. }
            if detail.contains("node save (SaveImage)")),
        "{denied:?}"
    );
    engine.shutdown_blocking();
}

#[test]
fn expected_durations_scale_with_steps_resolution_and_upscales() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let seconds = |wf: Json| {
        let (_, estimate) = engine.check(&wf, None).unwrap();
        assert!(!estimate.learned);
        estimate.expected_duration.as_secs_f64()
    };
    let base = seconds(txt2img(512, 10, &[]));
    let more_steps = seconds(txt2img(512, 40, &[]));
    let larger = seconds(txt2img(1024, 10, &[]));
    let upscaled = seconds(txt2img(512, 10, &[2.0]));
    assert!(more_steps > base * 3.0, "{more_steps} vs {base}");
    assert!(larger > base * 3.0, "{larger} vs {base}");
    assert!(upscaled > base * 1.2, "{upscaled} vs {base}");
    engine.shutdown_blocking();
}

#[test]
fn size_caps_apply_to_converted_values() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    for width in [json!("16384"), json!(16384.0), json!(" 9000 ")] {
        let wf = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": width.clone(), "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        });
        let refused = engine.check(&wf, None).unwrap_err();
        assert!(
            matches!(
                refused,
                SchedulerError::TooLarge {
                    what: "resolution",
                    ..
                }
            ),
            "width {width} passed: {refused:?}"
        );
    }
    engine.shutdown_blocking();
}

#[test]
fn a_node_past_the_budget_at_run_time_fails_with_oom_and_allocates_nothing() {
    let f = fixture(1);
    let plan = f.plan(&upscaled_image(1024, 2.0)).unwrap();
    // 1024^2 RGB f32 is 12 MiB: EmptyImage fits, the x2 resize (48 MiB out) does not.
    f.executor.env().set_memory_budget(32 << 20);
    let rec = Arc::new(Recorder::default());
    let err = f.executor.run(&plan, &job("oom", &rec)).unwrap_err();
    assert_eq!(err.kind(), Some(sakuga_telemetry::ErrorKind::Oom), "{err}");
    assert!(err.to_string().contains("ImageScaleBy"), "{err}");
    assert!(rec.outputs.lock().is_empty());
    // Within budget the same plan runs.
    f.executor.env().set_memory_budget(1 << 30);
    let report = f.executor.run(&plan, &job("fits", &rec));
    assert!(report.is_ok(), "{report:?}");
}
