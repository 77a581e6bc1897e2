//! T2I adapters against ComfyUI's own code: `fixtures/t2i_adapter/goldens.json` holds what
//! ComfyUI 0.8.0 computes through `load_t2i_adapter`, its T2IAdapter control object (hint
//! resize, strength) and `UNetModel` with that control, from sakuga's demo depth adapter
//! beside the full-layout SD 1.5 demo checkpoint (`make_t2i_goldens.py`).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use sakuga_models::demo::{DEMO_SD15_FULL_CHECKPOINT, DEMO_T2I_ADAPTER, write_demo_models};
use sakuga_models::diffusion::{AppliedControl, Checkpoint, ControlNetModel, ModelSampling};
use sakuga_models::error::ModelError;
use serde_json::Value;
use support::relative_error;

mod support;

fn goldens() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t2i_adapter/goldens.json");
    serde_json::from_slice(&std::fs::read(path).expect("goldens.json")).expect("json")
}

fn tensor(v: &Value) -> Tensor {
    support::golden_tensor(v)
}

/// The demo models in a temporary dir, and the demo adapter loaded from it.
fn demo_adapter() -> (tempfile::TempDir, ControlNetModel) {
    let dir = tempfile::tempdir().unwrap();
    write_demo_models(dir.path()).unwrap();
    let path = dir.path().join("controlnet").join(DEMO_T2I_ADAPTER);
    let net = ControlNetModel::load(&path, &Device::Cpu, DType::F32).unwrap();
    (dir, net)
}

#[test]
fn the_sd15_depth_adapter_steers_the_unet_as_comfyui_does() {
    let (dir, net) = demo_adapter();
    let g = &goldens()["sd15_depth"];
    let adapter = net
        .adapter_config()
        .expect("the file is taken for a T2I adapter");
    assert_eq!(
        (
            adapter.cin,
            adapter.channels,
            adapter.ksize,
            adapter.xl,
            adapter.light
        ),
        (192, [32, 64, 128, 128], 1, false, false)
    );
    let control = AppliedControl {
        net: Arc::new(net),
        hint: tensor(&g["hint"]),
        strength: g["strength"].as_f64().unwrap(),
        range: (0.0, 1.0),
        previous: None,
        apply_to_uncond: false,
    };
    let (x, context) = (tensor(&g["x"]), tensor(&g["context"]));
    let residuals = control
        .residuals(&ModelSampling::default(), &x, 3.0, &context, None)
        .unwrap()
        .expect("the adapter acts over the whole schedule");
    let blocks: Vec<usize> = residuals.after_blocks.iter().map(|(b, _)| *b).collect();
    assert_eq!(blocks, [2, 5, 8, 11]);
    assert!(residuals.skips.is_empty() && residuals.middle.is_none());
    for ((block, got), want) in residuals
        .after_blocks
        .iter()
        .zip(g["features"].as_array().unwrap())
    {
        let error = relative_error(got, &tensor(want));
        eprintln!("feature after block {block}: relative error {error:e}");
        assert!(error < 1e-5, "feature after block {block}: {error:e}");
    }
    // Later steps reuse the features computed for this hint.
    let again = control
        .residuals(&ModelSampling::default(), &x, 1.0, &context, None)
        .unwrap()
        .unwrap();
    assert_eq!(
        relative_error(&again.after_blocks[3].1, &residuals.after_blocks[3].1),
        0.0
    );

    let unet = Checkpoint::open(
        &dir.path()
            .join("checkpoints")
            .join(DEMO_SD15_FULL_CHECKPOINT),
    )
    .unwrap()
    .load_unet(&[], &Device::Cpu, DType::F32)
    .unwrap();
    let timestep = g["timestep"].as_f64().unwrap();
    let plain = unet.forward(&x, timestep, &context, None).unwrap();
    let plain_error = relative_error(&plain, &tensor(&g["eps"]));
    assert!(plain_error < 5e-4, "eps: {plain_error:e}");
    let controlled = unet
        .forward_controlled(&x, timestep, &context, None, Some(&residuals))
        .unwrap();
    let error = relative_error(&controlled, &tensor(&g["eps_controlled"]));
    eprintln!("eps {plain_error:e}, controlled eps {error:e}");
    assert!(error < 5e-4, "controlled eps: {error:e}");
    let moved = relative_error(&plain, &tensor(&g["eps_controlled"]));
    assert!(
        moved > 1e-2,
        "the demo adapter changes the output ({moved:e})"
    );
}

#[test]
fn an_adapter_for_a_deeper_unet_is_named_not_a_shape_error() {
    let (dir, net) = demo_adapter();
    let g = &goldens()["sd15_depth"];
    let features = net
        .residuals(
            &tensor(&g["x"]),
            500.0,
            &tensor(&g["context"]),
            None,
            &Tensor::zeros((1, 3, 64, 128), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    // The plain demo UNet has two levels of one resnet: four input blocks, not twelve.
    let shallow = Checkpoint::open(
        &dir.path()
            .join("checkpoints")
            .join(sakuga_models::demo::DEMO_CHECKPOINT),
    )
    .unwrap()
    .load_unet(&[], &Device::Cpu, DType::F32)
    .unwrap();
    let err = shallow
        .forward_controlled(
            &tensor(&g["x"]),
            500.0,
            &tensor(&g["context"]),
            None,
            Some(&features),
        )
        .unwrap_err();
    assert!(err.to_string().contains("input block 5"), "{err}");
    // A truncated adapter file is named as such.
    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(dir.path().join("controlnet").join(DEMO_T2I_ADAPTER)).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = ControlNetModel::load(&truncated, &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
}
