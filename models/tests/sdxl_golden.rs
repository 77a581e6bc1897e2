//! SDXL against ComfyUI's own model code: `fixtures/sdxl/goldens.json` holds what ComfyUI
//! 0.8.0's SDXL text encoders, `encode_adm` and UNet compute from sakuga's demo SDXL
//! checkpoint (`make_sdxl_goldens.py` there; ComfyUI loads the file with strict key
//! checking, so the SGM layout is pinned too).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sakuga_models::demo::write_demo_sdxl_checkpoint;
use sakuga_models::diffusion::tokenizer::ClipTokenizer;
use sakuga_models::diffusion::{Checkpoint, SizeConditioning, TextConditioning};
use serde_json::Value;

fn goldens() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl/goldens.json");
    serde_json::from_slice(&std::fs::read(path).expect("goldens.json")).expect("json")
}

fn tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let values: Vec<f32> = v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap()
}

/// The largest difference relative to the reference's largest magnitude.
fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    let diff: f32 = (got.to_dtype(DType::F32).unwrap() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    diff / scale.max(1e-6)
}

fn demo() -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_demo_sdxl_checkpoint(dir.path()).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    (dir, checkpoint)
}

/// The architecture read from tensor shapes alone, as for a checkpoint from elsewhere.
fn inferred(config: &sakuga_models::diffusion::SdConfig) -> sakuga_models::diffusion::SdConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.safetensors");
    let tensors = sakuga_models::demo::demo_checkpoint_tensors(config, 1).unwrap();
    sakuga_models::store::write_safetensors(&path, &tensors, &Default::default()).unwrap();
    Checkpoint::open(&path).unwrap().config().clone()
}

#[test]
fn sdxl_and_its_refiner_are_read_from_their_tensors() {
    use sakuga_models::diffusion::SdConfig;
    for preset in [SdConfig::demo_sdxl(), SdConfig::demo_sdxl_refiner()] {
        let read = inferred(&preset);
        assert_eq!(read.unet.levels, preset.unet.levels);
        assert_eq!(read.unet.adm_in_channels, preset.unet.adm_in_channels);
        assert_eq!(
            read.unet.cross_attention_dim,
            preset.unet.cross_attention_dim
        );
        assert_eq!(read.unet.mid_transformer_depth, Some(2));
        assert!(read.unet.use_linear_projection);
        assert_eq!(read.clip, preset.clip);
        assert_eq!(read.clip_g, preset.clip_g);
        assert_eq!(read.vae.scaling_factor, 0.13025);
        assert_eq!(read.is_sdxl_refiner(), preset.is_sdxl_refiner());
    }
}

#[test]
fn text_encoders_and_y_match_comfyui() {
    let g = goldens();
    let (_dir, checkpoint) = demo();
    let tokens: Vec<u32> = ClipTokenizer::shared().encode_windows("a photo of", 49407)[0].clone();
    let want_tokens: Vec<u32> = g["tokens_l"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tokens, want_tokens, "the prompt tokenizes as ComfyUI's");
    let clip = checkpoint.load_clip(&[], &Device::Cpu, DType::F32).unwrap();
    assert!(clip.is_dual());
    let encoded = clip.encode_pair("a photo of", "a photo of").unwrap();
    let context_error = relative_error(&encoded.context, &tensor(&g["context"]));
    assert!(context_error < 1e-5, "context: {context_error:e}");
    let pooled = encoded.pooled.expect("OpenCLIP-G pools");
    let pooled_error = relative_error(&pooled, &tensor(&g["pooled_g"]));
    assert!(pooled_error < 1e-5, "pooled: {pooled_error:e}");

    let adm = &g["adm"];
    let size = |key: &str| adm[key].as_f64().unwrap();
    let conditioning = TextConditioning {
        context: encoded.context,
        pooled: Some(pooled),
        size: Some(SizeConditioning {
            width: size("width"),
            height: size("height"),
            crop_w: size("crop_w"),
            crop_h: size("crop_h"),
            target_width: size("target_width"),
            target_height: size("target_height"),
        }),
        aesthetic_score: None,
    };
    let y = conditioning
        .sdxl_y(1600, false, false, (6, 8), &Device::Cpu)
        .unwrap();
    // ComfyUI embeds the sizes in f32; sakuga in f64, then rounds.
    let y_error = relative_error(&y, &tensor(&adm["y"]));
    assert!(y_error < 1e-5, "y: {y_error:e}");
}

#[test]
fn the_unet_matches_comfyui_with_context_and_y() {
    let g = goldens();
    let (_dir, checkpoint) = demo();
    let unet = checkpoint.load_unet(&[], &Device::Cpu, DType::F32).unwrap();
    assert!(unet.takes_y());
    let context = tensor(&g["context"]);
    let y = tensor(&g["adm"]["y"]);
    for case in ["unet", "unet_batch2"] {
        let case = &g[case];
        let x = tensor(&case["x"]);
        let batch = x.dim(0).unwrap();
        let t = case["timesteps"][0].as_f64().unwrap();
        let eps = unet
            .forward(
                &x,
                t,
                &context.repeat((batch, 1, 1)).unwrap(),
                Some(&y.repeat((batch, 1)).unwrap()),
            )
            .unwrap();
        let error = relative_error(&eps, &tensor(&case["eps"]));
        // Both run in f32; sin and cos of the raw timestep (hundreds of radians) already
        // differ in the last bits between libm and PyTorch, and the network amplifies that.
        assert!(error < 5e-4, "eps (batch {batch}): {error:e}");
    }
    let without_y = unet.forward(&tensor(&g["unet"]["x"]), 500.0, &context, None);
    assert!(without_y.is_err(), "an SDXL UNet refuses to run without y");
}

#[test]
fn the_refiner_demo_is_read_and_samples_with_its_aesthetic_score() {
    use sakuga_models::diffusion::{SampleParams, StepHooks, sample_latent};
    let dir = tempfile::tempdir().unwrap();
    let path = sakuga_models::demo::write_demo_sdxl_refiner_checkpoint(dir.path()).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert!(checkpoint.config().is_sdxl_refiner());
    assert_eq!(checkpoint.config().unet.adm_in_channels, Some(64 + 5 * 256));
    let clip = checkpoint.load_clip(&[], &Device::Cpu, DType::F32).unwrap();
    let positive = clip.condition("a photo of").unwrap();
    assert_eq!(positive.context.dims(), &[1, 77, 64]);
    assert!(positive.pooled.is_some(), "the refiner's OpenCLIP-G pools");
    let unet = checkpoint.load_unet(&[], &Device::Cpu, DType::F32).unwrap();
    let latent = Tensor::zeros((1, 4, 6, 8), DType::F32, &Device::Cpu).unwrap();
    let run = |score: f64| {
        let mut scored = positive.clone();
        scored.aesthetic_score = Some(score);
        let params = SampleParams {
            steps: 2,
            cfg: 1.0,
            ..SampleParams::new(3)
        };
        sample_latent(&unet, &scored, &scored, &latent, &params, StepHooks::none())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert!(run(6.0).iter().all(|v| v.is_finite()));
    assert_ne!(run(6.0), run(2.0), "the aesthetic score reaches the UNet");
}
