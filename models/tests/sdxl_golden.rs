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

#[test]
fn the_demo_is_read_as_sdxl_from_its_tensors() {
    let (_dir, checkpoint) = demo();
    let config = checkpoint.config();
    assert_eq!(config.unet.adm_in_channels, Some(1600));
    assert_eq!(config.unet.cross_attention_dim, 96);
    assert_eq!(
        config.clip_g.as_ref().and_then(|g| g.projection_dim),
        Some(64)
    );
    assert_eq!(config.vae.scaling_factor, 0.13025);
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
    };
    let y = conditioning.sdxl_y(1600, (6, 8), &Device::Cpu).unwrap();
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
