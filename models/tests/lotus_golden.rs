//! Lotus (depth) against ComfyUI's own code: `fixtures/lotus/goldens.json` holds what
//! ComfyUI 0.8.0's LotusD config, `Lotus.extra_conds` task embedding, `IMG_TO_IMG` sampling
//! and `UNetModel` compute on sakuga's demo Lotus UNet (`make_lotus_goldens.py`).

use std::path::PathBuf;

use candle_core::{DType, Device};
use sakuga_models::demo::write_demo_lotus_unet;
use sakuga_models::diffusion::{
    Checkpoint, Denoiser, GuidedDenoiser, Prediction, TextConditioning,
};
use serde_json::Value;
use support::relative_error;

mod support;

#[test]
fn lotus_matches_comfyui() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lotus/goldens.json");
    let g: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unet_path = write_demo_lotus_unet(dir.path()).unwrap();
    let checkpoint = Checkpoint::open_unet(&unet_path).unwrap();
    assert!(
        checkpoint.config().unet.is_lotus(),
        "told from its 4-wide class input"
    );
    assert_eq!(checkpoint.config().prediction, Prediction::ImgToImg);
    assert_eq!(checkpoint.config().unet.levels[0].heads, 1);
    let unet = checkpoint.load_unet(&[], &Device::Cpu, DType::F32).unwrap();
    let context = TextConditioning::context(support::golden_tensor(&g["context"]));
    let denoiser = GuidedDenoiser::new(&unet, &[context], &[], 1.0, (6, 8)).unwrap();
    let x = support::golden_tensor(&g["x"]);
    let denoised = denoiser.denoise(&x, g["sigma"].as_f64().unwrap()).unwrap();
    let error = relative_error(&denoised, &support::golden_tensor(&g["denoised"]));
    // As for every UNet golden: the time embedding's sin/cos of a raw timestep.
    assert!(error < 5e-4, "denoised: {error:e}");
}
