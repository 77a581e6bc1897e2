//! Inpainting UNets against ComfyUI's own code: `fixtures/inpaint/goldens.json` holds what
//! ComfyUI 0.8.0's `concat_cond` (mask and masked image beside the latent), its discrete
//! model sampling and `UNetModel` compute on sakuga's 9-channel demo checkpoint
//! (`make_inpaint_goldens.py`), for the three places the extra inputs come from.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sakuga_models::demo::{DEMO_INPAINTING_CHECKPOINT, write_demo_inpainting_checkpoint};
use sakuga_models::diffusion::{
    Checkpoint, Denoiser, GuidedDenoiser, InpaintConcat, TextConditioning,
};
use serde_json::Value;
use support::relative_error;

mod support;

fn goldens() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inpaint/goldens.json");
    serde_json::from_slice(&std::fs::read(path).expect("goldens.json")).expect("json")
}

fn tensor(v: &Value) -> Tensor {
    support::golden_tensor(v)
}

#[test]
fn inpainting_inputs_and_unet_match_comfyui() {
    let g = goldens();
    let dir = tempfile::tempdir().unwrap();
    let path = write_demo_inpainting_checkpoint(dir.path()).unwrap();
    assert!(path.ends_with(DEMO_INPAINTING_CHECKPOINT));
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert_eq!(checkpoint.config().unet.in_channels, 9);
    let unet = checkpoint.load_unet(&[], &Device::Cpu, DType::F32).unwrap();
    let x = tensor(&g["x"]);
    let sigma = g["sigma"].as_f64().unwrap();
    let plain = TextConditioning::context(tensor(&g["context"]));
    let with_inputs = TextConditioning {
        inpaint: Some(InpaintConcat {
            latent: tensor(&g["raw_latent"]),
            mask: tensor(&g["pixel_mask"]),
        }),
        ..plain.clone()
    };
    let sampled = tensor(&g["sampled"]);
    let denoise_mask = tensor(&g["denoise_mask"]);
    let cases: [(&str, &TextConditioning, Option<&Tensor>); 3] = [
        ("prompt", &with_inputs, Some(&denoise_mask)),
        ("source", &plain, Some(&denoise_mask)),
        ("blank", &plain, None),
    ];
    for (name, prompt, mask) in cases {
        let denoiser = GuidedDenoiser::new(&unet, std::slice::from_ref(prompt), &[], 1.0, (6, 8))
            .unwrap()
            .with_inpaint_source(&sampled, mask)
            .unwrap();
        let denoised = denoiser.denoise(&x, sigma).unwrap();
        let error = relative_error(&denoised, &tensor(&g[name]["denoised"]));
        // The time embedding's sin and cos of a raw timestep differ in the last bits
        // between libm and PyTorch, and the network amplifies that (as in the SDXL goldens).
        assert!(error < 5e-4, "{name}: {error:e}");
    }
}

#[test]
fn a_plain_unet_ignores_inpainting_inputs_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plain_path = sakuga_models::demo::write_demo_checkpoint(dir.path()).unwrap();
    let unet = Checkpoint::open(&plain_path)
        .unwrap()
        .load_unet(&[], &Device::Cpu, DType::F32)
        .unwrap();
    let context = Tensor::zeros((1, 7, 64), DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::ones((1, 4, 6, 8), DType::F32, &Device::Cpu).unwrap();
    let plain = TextConditioning::context(context.clone());
    let with_inputs = TextConditioning {
        inpaint: Some(InpaintConcat {
            latent: x.clone(),
            mask: Tensor::ones((1, 1, 48, 64), DType::F32, &Device::Cpu).unwrap(),
        }),
        ..plain.clone()
    };
    let run = |c: &TextConditioning| {
        GuidedDenoiser::new(&unet, std::slice::from_ref(c), &[], 1.0, (6, 8))
            .unwrap()
            .with_inpaint_source(&x, None)
            .unwrap()
            .denoise(&x, 1.0)
            .unwrap()
    };
    assert_eq!(relative_error(&run(&with_inputs), &run(&plain)), 0.0);

    // An 8-channel UNet (instruct-pix2pix) is named, not run on a guess.
    let mut config = sakuga_models::diffusion::SdConfig::demo();
    config.unet.in_channels = 8;
    let tensors = sakuga_models::demo::demo_checkpoint_tensors(&config, 3).unwrap();
    let odd = dir.path().join("pix2pix.safetensors");
    sakuga_models::store::write_safetensors(&odd, &tensors, &Default::default()).unwrap();
    let unet = Checkpoint::open(&odd)
        .unwrap()
        .load_unet(&[], &Device::Cpu, DType::F32)
        .unwrap();
    let error = GuidedDenoiser::new(&unet, &[plain], &[], 1.0, (6, 8))
        .unwrap()
        .with_inpaint_source(&x, None)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("4 input channels beside the latent"),
        "{error}"
    );
}
