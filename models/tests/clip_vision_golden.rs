//! CLIP vision and unCLIP against ComfyUI's own code: `fixtures/clip_vision/goldens.json`
//! holds what ComfyUI 0.8.0's `ClipVisionModel` and `unclip_adm` (with SDXL's noise
//! augmentation) compute on sakuga's demo CLIP vision encoder
//! (`make_clip_vision_goldens.py`).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sakuga_models::demo::{DEMO_CLIP_VISION, write_demo_clip_vision};
use sakuga_models::diffusion::clip_vision::{
    ClipVisionModel, UnclipEntry, normalise, unclip_pooled,
};
use sakuga_models::error::ModelError;
use serde_json::Value;
use support::relative_error;

mod support;

fn goldens() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_vision/goldens.json");
    serde_json::from_slice(&std::fs::read(path).expect("goldens.json")).expect("json")
}

fn tensor(v: &Value) -> Tensor {
    support::golden_tensor(v)
}

/// The 8-bit image ComfyUI's preprocessing produced, as 0..1 pixels `[1, 3, h, w]`.
fn levels(case: &Value) -> Tensor {
    let hex = case["levels_hex"].as_str().unwrap();
    let values: Vec<f32> = (0..hex.len() / 2)
        .map(|i| f32::from(u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()) / 255.0)
        .collect();
    let shape: Vec<usize> = case["levels_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn demo() -> ClipVisionModel {
    let dir = tempfile::tempdir().unwrap();
    write_demo_clip_vision(dir.path()).unwrap();
    ClipVisionModel::load(
        &dir.path().join("clip_vision").join(DEMO_CLIP_VISION),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn the_encoder_matches_comfyui_on_its_preprocessed_pixels() {
    let g = goldens();
    let model = demo();
    for name in ["crop", "squash"] {
        let case = &g[name];
        let pixels = normalise(&levels(case)).unwrap();
        let corner = pixels.narrow(2, 0, 4).unwrap().narrow(3, 0, 4).unwrap();
        let error = relative_error(&corner, &tensor(&case["pixels"]));
        assert!(error < 1e-6, "{name} normalised pixels: {error:e}");
        let out = model.encode(&pixels).unwrap();
        let first = |t: &Tensor| t.narrow(1, 0, 8).unwrap();
        for (what, got, want) in [
            (
                "last hidden state",
                first(&out.last_hidden_state),
                &case["last_hidden_state"],
            ),
            (
                "penultimate",
                first(&out.penultimate_hidden_states),
                &case["penultimate"],
            ),
            (
                "image_embeds",
                out.image_embeds.clone(),
                &case["image_embeds"],
            ),
        ] {
            let error = relative_error(&got, &tensor(want));
            eprintln!("{name} {what}: relative error {error:e}");
            assert!(error < 1e-5, "{name} {what}: {error:e}");
        }
    }
}

#[test]
fn unclip_pooled_matches_comfyuis_unclip_adm() {
    let g = goldens();
    let u = &g["unclip"];
    let embeds = tensor(&g["crop"]["image_embeds"]);
    let (row, merge) = (tensor(&u["row_noise"]), tensor(&u["merge_noise"]));
    let entry = |strength: f64, noise_augmentation: f64| UnclipEntry {
        image_embeds: embeds.clone(),
        strength,
        noise_augmentation,
    };
    let width = embeds.dim(1).unwrap();
    for (name, entries) in [
        ("one", vec![entry(0.75, 0.3)]),
        ("two", vec![entry(0.75, 0.0), entry(0.5, 0.1)]),
    ] {
        let mut noise = |_: &[usize], merging: bool| {
            Ok::<_, ModelError>(if merging { merge.clone() } else { row.clone() })
        };
        let pooled = unclip_pooled(&entries, width, &mut noise).unwrap();
        let error = relative_error(&pooled, &tensor(&u[name]));
        eprintln!("unclip {name}: relative error {error:e}");
        assert!(error < 1e-5, "unclip {name}: {error:e}");
    }
    let err = unclip_pooled(&[], width, &mut |_: &[usize], _| {
        Ok(Tensor::zeros(1, DType::F32, &Device::Cpu)?)
    })
    .unwrap_err();
    assert!(err.to_string().contains("without images"), "{err}");
}

#[test]
fn a_prompt_with_unclip_images_samples_with_their_pooled_embedding() {
    use sakuga_models::diffusion::TextConditioning;
    use sakuga_models::diffusion::clip_vision::unclip_noise;
    let g = goldens();
    let embeds = tensor(&g["crop"]["image_embeds"]);
    let mut prompt =
        TextConditioning::context(Tensor::zeros((1, 77, 96), DType::F32, &Device::Cpu).unwrap());
    prompt.unclip.push(UnclipEntry {
        image_embeds: embeds.clone(),
        strength: 0.75,
        noise_augmentation: 0.0,
    });
    // The SDXL demo's y: 64 pooled values and six 256-wide sizes.
    let resolved = prompt
        .with_unclip_resolved(Some(64 + 6 * 256), false, 52)
        .unwrap();
    let want = unclip_pooled(&prompt.unclip, 64, &mut unclip_noise(52)).unwrap();
    assert_eq!(
        relative_error(resolved.pooled.as_ref().unwrap(), &want),
        0.0
    );
    // Level 0 barely noises: the pooled vector is the image's embedding at 3/4.
    let scaled = (embeds * 0.75).unwrap();
    assert!(relative_error(&want, &scaled) < 1e-2);
    let other_seed = prompt
        .with_unclip_resolved(Some(64 + 6 * 256), false, 53)
        .unwrap();
    assert!(relative_error(other_seed.pooled.as_ref().unwrap(), &want) > 0.0);
    let err = prompt.with_unclip_resolved(None, false, 52).unwrap_err();
    assert!(err.to_string().contains("SDXL"), "{err}");
}

#[test]
fn other_image_encoders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open_clip.safetensors");
    let tensors = std::collections::BTreeMap::from([(
        "visual.transformer.resblocks.0.attn.in_proj_weight".to_string(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    )]);
    sakuga_models::store::write_safetensors(&path, &tensors, &Default::default()).unwrap();
    let err = ClipVisionModel::load(&path, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("OpenCLIP"), "{err}");
    let truncated = dir.path().join("truncated.safetensors");
    write_demo_clip_vision(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("clip_vision").join(DEMO_CLIP_VISION)).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = ClipVisionModel::load(&truncated, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
}
