//! RIFE frame interpolation: the backward warp against hand-computed cases, and the IFNet
//! architectures on the demo weights (loading, layout detection, padding, timestep
//! endpoints, sequences, goldens from numpy and PyTorch ports of the reference code).
//!
//! Run with `cargo test -p sakuga-models --test interpolate`.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sakuga_models::ModelError;
use sakuga_models::interpolate::demo::{demo_rife425_state_dict, write_demo_rife46};
use sakuga_models::interpolate::warp::{warp, warp_with_gather};
use sakuga_models::interpolate::{
    Interpolator, RifeArch, RifeNet, write_demo_rife, write_demo_rife425,
};
use sakuga_models::upscale::StateDict;
use support::max_abs_diff;

/// A 1x1x3x4 image with distinct values: `v(y, x) = 10 y + x`.
fn ramp() -> Tensor {
    let values: Vec<f32> = (0..3)
        .flat_map(|y| (0..4).map(move |x| (10 * y + x) as f32))
        .collect();
    Tensor::from_vec(values, (1, 1, 3, 4), &Device::Cpu).unwrap()
}

fn constant_flow(fx: f32, fy: f32, h: usize, w: usize) -> Tensor {
    let x = Tensor::full(fx, (1, 1, h, w), &Device::Cpu).unwrap();
    let y = Tensor::full(fy, (1, 1, h, w), &Device::Cpu).unwrap();
    Tensor::cat(&[x, y], 1).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn assert_close(got: &Tensor, want: &[Vec<f32>]) {
    let got = rows(got);
    for (gr, wr) in got.iter().zip(want) {
        for (g, w) in gr.iter().zip(wr) {
            assert!((g - w).abs() < 1e-5, "got {got:?}, want {want:?}");
        }
    }
}

/// Both implementations must give the hand-computed answer.
fn check_warp(flow: &Tensor, want: &[Vec<f32>]) {
    assert_close(&warp(&ramp(), flow).unwrap(), want);
    assert_close(&warp_with_gather(&ramp(), flow).unwrap(), want);
}

#[test]
fn zero_flow_is_identity() {
    check_warp(
        &constant_flow(0.0, 0.0, 3, 4),
        &[
            vec![0., 1., 2., 3.],
            vec![10., 11., 12., 13.],
            vec![20., 21., 22., 23.],
        ],
    );
}

#[test]
fn integer_shift_moves_content_and_clamps_at_the_border() {
    // Sample one to the right: each pixel takes its right neighbour, the last column repeats.
    check_warp(
        &constant_flow(1.0, 0.0, 3, 4),
        &[
            vec![1., 2., 3., 3.],
            vec![11., 12., 13., 13.],
            vec![21., 22., 23., 23.],
        ],
    );
    // Sample one up: the first row repeats.
    check_warp(
        &constant_flow(0.0, -1.0, 3, 4),
        &[
            vec![0., 1., 2., 3.],
            vec![0., 1., 2., 3.],
            vec![10., 11., 12., 13.],
        ],
    );
}

#[test]
fn far_out_of_range_flow_clamps_to_the_edge_pixel() {
    check_warp(
        &constant_flow(-100.0, 100.0, 3, 4),
        &[
            vec![20., 20., 20., 20.],
            vec![20., 20., 20., 20.],
            vec![20., 20., 20., 20.],
        ],
    );
}

#[test]
fn sub_pixel_flow_is_bilinear() {
    // (x + 0.25, y + 0.5): 10 (y + 0.5) + (x + 0.25) inside the image; the bottom row clamps
    // y to 2 and the last column clamps x to 3.
    check_warp(
        &constant_flow(0.25, 0.5, 3, 4),
        &[
            vec![5.25, 6.25, 7.25, 8.0],
            vec![15.25, 16.25, 17.25, 18.0],
            vec![20.25, 21.25, 22.25, 23.0],
        ],
    );
}

#[test]
fn per_pixel_flow_and_channels_are_independent() {
    // Two channels (second = negated), and a flow that differs per pixel.
    let image = Tensor::cat(&[ramp(), ramp().neg().unwrap()], 1).unwrap();
    let fx: Vec<f32> = (0..12)
        .map(|i| if i % 2 == 0 { 0.5 } else { -1.0 })
        .collect();
    let fx = Tensor::from_vec(fx, (1, 1, 3, 4), &Device::Cpu).unwrap();
    let flow = Tensor::cat(
        &[
            fx,
            Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let out = warp(&image, &flow).unwrap();
    let want = [
        vec![0.5, 0., 2.5, 2.],
        vec![10.5, 10., 12.5, 12.],
        vec![20.5, 20., 22.5, 22.],
    ];
    assert_close(&out.narrow(1, 0, 1).unwrap(), &want);
    let negated: Vec<Vec<f32>> = want
        .iter()
        .map(|r| r.iter().map(|v| -v).collect())
        .collect();
    assert_close(&out.narrow(1, 1, 1).unwrap(), &negated);
    let gathered = warp_with_gather(&image, &flow).unwrap();
    let diff: f32 = max_abs_diff(&out, &gathered);
    assert!(diff < 1e-6);
}

#[test]
fn mismatched_flow_is_an_error() {
    assert!(warp(&ramp(), &constant_flow(0.0, 0.0, 2, 4)).is_err());
}

fn demo_interpolator() -> (tempfile::TempDir, Interpolator) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rife-demo.safetensors");
    write_demo_rife(&path).unwrap();
    let interpolator = Interpolator::load(&path, &Device::Cpu).unwrap();
    (dir, interpolator)
}

/// Two smooth frames, the second shifted right by 2 px, BHWC.
fn frame_pair(h: usize, w: usize) -> (Tensor, Tensor) {
    let make = |shift: f32| {
        let values: Vec<f32> = (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    let u = (x as f32 - shift) / 7.0;
                    let v = y as f32 / 5.0;
                    [
                        0.5 + 0.4 * u.sin(),
                        0.5 + 0.4 * v.cos(),
                        0.5 + 0.3 * (u + v).sin(),
                    ]
                })
            })
            .collect();
        Tensor::from_vec(values, (1, h, w, 3), &Device::Cpu).unwrap()
    };
    (make(0.0), make(2.0))
}

#[test]
fn demo_rife_loads_with_the_real_key_layout() {
    let (dir, interpolator) = demo_interpolator();
    assert_eq!(interpolator.arch(), RifeArch::Prelu);
    let RifeNet::Prelu(net) = interpolator.net() else {
        panic!("the PReLU demo loaded as {:?}", interpolator.arch())
    };
    let configs = net.block_configs();
    assert_eq!(configs.map(|c| c.channels), [16, 16, 8, 8]);
    assert_eq!(configs.map(|c| c.in_channels), [7, 12, 12, 12]);
    assert!(interpolator.approx_bytes() > 10_000);
    // The file is deterministic: writing it twice gives identical bytes.
    let again = dir.path().join("again.safetensors");
    write_demo_rife(&again).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("rife-demo.safetensors")).unwrap(),
        std::fs::read(again).unwrap()
    );
}

#[test]
fn interpolation_pads_crops_and_stays_in_range() {
    let (_dir, interpolator) = demo_interpolator();
    // 40x52 is not a multiple of 32: padded to 64x64 inside, cropped back.
    let (a, b) = frame_pair(40, 52);
    let mid = interpolator.interpolate(&a, &b, 0.5).unwrap();
    assert_eq!(mid.dims(), &[1, 40, 52, 3]);
    let values: Vec<f32> = mid.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        values
            .iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
    );
    // The middle frame lies between the inputs on average (both are blends of the warped
    // frames), not far outside them.
    let mean = |t: &Tensor| -> f32 { t.mean_all().unwrap().to_scalar().unwrap() };
    let (lo, hi) = (mean(&a).min(mean(&b)), mean(&a).max(mean(&b)));
    assert!(mean(&mid) > lo - 0.1 && mean(&mid) < hi + 0.1);
    // Deterministic.
    let again = interpolator.interpolate(&a, &b, 0.5).unwrap();
    assert_eq!(
        values,
        again.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn sequence_inserts_multiplier_minus_one_frames_per_pair() {
    let (_dir, interpolator) = demo_interpolator();
    let (a, b) = frame_pair(32, 32);
    let (c, _) = frame_pair(32, 32);
    let frames = Tensor::cat(&[&a, &b, &c], 0).unwrap();
    let out = interpolator.interpolate_sequence(&frames, 3).unwrap();
    assert_eq!(out.dims(), &[7, 32, 32, 3]);
    // Originals stay at positions 0, 3, 6.
    for (index, original) in [(0, &a), (3, &b), (6, &c)] {
        let diff: f32 = (out.narrow(0, index, 1).unwrap() - original)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0, "frame {index} should be the original");
    }
    let same = interpolator.interpolate_sequence(&frames, 1).unwrap();
    assert_eq!(same.dims(), &[3, 32, 32, 3]);
    assert!(matches!(
        interpolator.interpolate_sequence(&frames, 0),
        Err(ModelError::InvalidInput(_))
    ));
}

#[test]
fn bad_frames_and_times_are_invalid_input() {
    let (_dir, interpolator) = demo_interpolator();
    let (a, _) = frame_pair(32, 32);
    let (b, _) = frame_pair(32, 64);
    assert_eq!(
        interpolator.interpolate(&a, &b, 0.5).unwrap_err().kind(),
        Some(sakuga_telemetry::ErrorKind::InvalidInput)
    );
    assert_eq!(
        interpolator.interpolate(&a, &a, 1.5).unwrap_err().kind(),
        Some(sakuga_telemetry::ErrorKind::InvalidInput)
    );
}

#[test]
fn foreign_weights_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-rife.safetensors");
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "encode.0.weight".to_string(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    sakuga_models::upscale::StateDict::from_tensors(&path, tensors)
        .save_safetensors(&path)
        .unwrap();
    let err = Interpolator::load(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("encode.0.weight"));
    assert!(err.to_string().contains("unknown RIFE layout"), "{err}");
}

fn read_f32(name: &str, dims: &[usize]) -> Tensor {
    read_fixture("rife", name, dims)
}

fn read_fixture(dir: &str, name: &str, dims: &[usize]) -> Tensor {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir)
        .join(name);
    let bytes = std::fs::read(&path).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// `fixtures/rife/*.f32` were made by `make_goldens.py` beside them: an independent numpy
/// port of the reference PyTorch IFNet (RIFE 4.6) run on the demo weights.
#[test]
fn ifnet_matches_the_numpy_reference_on_demo_weights() {
    let (_dir, interpolator) = demo_interpolator();
    let frames = read_f32("frames_32x32.f32", &[2, 3, 32, 32]);
    let (img0, img1) = (
        frames.narrow(0, 0, 1).unwrap(),
        frames.narrow(0, 1, 1).unwrap(),
    );
    for (t, golden) in [(0.5f32, "ifnet_t50.f32"), (0.25, "ifnet_t25.f32")] {
        let expected = read_f32(golden, &[1, 3, 32, 32]);
        let out = interpolator.net().forward(&img0, &img1, t).unwrap();
        let diff: f32 = max_abs_diff(&out, &expected);
        assert!(diff < 1e-4, "t={t}: max abs diff {diff}");
        // The BHWC entry point gives the same frame (values are inside [0, 1], so the
        // clamp changes nothing).
        let bhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap();
        let via_api = interpolator
            .interpolate(&bhwc(&img0), &bhwc(&img1), t)
            .unwrap();
        let diff: f32 = max_abs_diff(&via_api, &bhwc(&expected));
        assert!(diff < 1e-4, "t={t} via interpolate(): max abs diff {diff}");
    }
}

fn load_demo(write: fn(&std::path::Path) -> sakuga_models::Result<()>) -> Interpolator {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.safetensors");
    write(&path).unwrap();
    Interpolator::load(&path, &Device::Cpu).unwrap()
}

#[test]
fn rife425_demo_has_the_real_layout_and_widths() {
    let interpolator = load_demo(write_demo_rife425);
    assert_eq!(interpolator.arch(), RifeArch::V425);
    let RifeNet::Res(net) = interpolator.net() else {
        panic!("4.25 loaded as {:?}", interpolator.arch())
    };
    let encoder = net.encoder_config().unwrap();
    assert_eq!((encoder.hidden, encoder.out), (16, 4));
    let configs = net.block_configs();
    let widths: Vec<_> = configs.iter().map(|c| c.channels).collect();
    assert_eq!(widths, [192, 128, 96, 64, 32]);
    // Block 0: two frames, two 4-channel features, timestep. Later: two warped frames and
    // features, timestep, mask, 8 feature channels of the previous block, 4 flow channels.
    let inputs: Vec<_> = configs.iter().map(|c| c.in_channels).collect();
    assert_eq!(inputs, [15, 28, 28, 28, 28]);
    assert!(configs.iter().all(|c| c.depth == 8 && c.outputs == 13));
    // RIFE 4.25's real shapes: about 5.7 M parameters, 22.7 MB as f32.
    let bytes = interpolator.approx_bytes();
    assert!((20_000_000..23_000_000).contains(&bytes), "{bytes} bytes");
}

/// `fixtures/rife425/*.f32` were made by `make_rife425_goldens.py` beside them: a PyTorch
/// port of Practical-RIFE's 4.25 IFNet and of ComfyUI's padding around it (reflect to a
/// multiple of 64, crop, clamp), run in float64 on the demo weights. The 40x48 frames are
/// padded to 64x64 on both sides, so the mirrored padding is checked too.
#[test]
fn rife425_matches_the_pytorch_reference_through_interpolate() {
    let interpolator = load_demo(write_demo_rife425);
    let frames = read_fixture("rife425", "frames_40x48.f32", &[2, 3, 40, 48]);
    let bhwc = |t: Tensor| t.permute((0, 2, 3, 1)).unwrap();
    let img0 = bhwc(frames.narrow(0, 0, 1).unwrap());
    let img1 = bhwc(frames.narrow(0, 1, 1).unwrap());
    for (t, golden) in [(0.5f32, "rife425_t50.f32"), (0.25, "rife425_t25.f32")] {
        let expected = bhwc(read_fixture("rife425", golden, &[1, 3, 40, 48]));
        let got = interpolator.interpolate(&img0, &img1, t).unwrap();
        let diff: f32 = max_abs_diff(&got, &expected);
        eprintln!("RIFE 4.25 t={t}: max abs diff {diff:e}");
        // f32 against a float64 reference through ~50 convolutions: observed 1.8e-7. The
        // wiring mistakes this must catch move the frame by far more (in the reference:
        // accumulating the mask 4e-3, dropping the passed features 2.2e-4, zero padding
        // instead of mirrored 0.44).
        assert!(diff < 1e-5, "t={t}: max abs diff {diff}");
        // The frame is not one of the inputs: the network did something time-dependent.
        assert!(max_abs_diff(&got, &img0) > 1e-3);
    }
}

#[test]
fn rife46_resconv_layout_matches_the_pytorch_reference() {
    let interpolator = load_demo(write_demo_rife46);
    assert_eq!(interpolator.arch(), RifeArch::V46);
    let frames = read_f32("frames_32x32.f32", &[2, 3, 32, 32]);
    let (img0, img1) = (
        frames.narrow(0, 0, 1).unwrap(),
        frames.narrow(0, 1, 1).unwrap(),
    );
    for (t, golden) in [(0.5f32, "rife46_t50.f32"), (0.25, "rife46_t25.f32")] {
        let expected = read_fixture("rife425", golden, &[1, 3, 32, 32]);
        let out = interpolator.net().forward(&img0, &img1, t).unwrap();
        let diff: f32 = max_abs_diff(&out, &expected);
        eprintln!("RIFE 4.6 t={t}: max abs diff {diff:e}");
        assert!(diff < 1e-4, "t={t}: max abs diff {diff}");
    }
}

fn save(dir: &std::path::Path, name: &str, tensors: BTreeMap<String, Tensor>) -> PathBuf {
    let path = dir.join(name);
    StateDict::from_tensors(&path, tensors)
        .save_safetensors(&path)
        .unwrap();
    path
}

/// ComfyUI's `Comfy-Org/frame_interpolation` files name blocks `blocks.{i}.`; some
/// Practical-RIFE checkpoints carry training-only `teacher.`/`caltime.` modules.
#[test]
fn comfyui_key_layout_and_training_modules_load_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let demo = demo_rife425_state_dict().unwrap();
    let mut renamed: BTreeMap<String, Tensor> = demo
        .tensors()
        .iter()
        .map(|(name, t)| {
            let name = match name.strip_prefix("block") {
                Some(rest) => format!("blocks.{rest}"),
                None => name.clone(),
            };
            (name, t.clone())
        })
        .collect();
    renamed.insert(
        "teacher.conv0.0.0.weight".into(),
        Tensor::zeros((8, 8, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let comfy = Interpolator::load(
        &save(dir.path(), "comfy.safetensors", renamed),
        &Device::Cpu,
    )
    .unwrap();
    let plain = Interpolator::from_state_dict(&demo).unwrap();
    assert_eq!(comfy.arch(), RifeArch::V425);
    let (a, b) = frame_pair(64, 64);
    let diff: f32 = max_abs_diff(
        &comfy.interpolate(&a, &b, 0.5).unwrap(),
        &plain.interpolate(&a, &b, 0.5).unwrap(),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn truncated_and_garbage_files_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rife425.safetensors");
    write_demo_rife425(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Interpolator::load(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("rife425.safetensors"), "{err}");
    let pkl = dir.path().join("flownet.pkl");
    std::fs::write(&pkl, b"not a pickle at all").unwrap();
    let err = Interpolator::load(&pkl, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
}

fn without(prefix: &str) -> BTreeMap<String, Tensor> {
    let demo = demo_rife425_state_dict().unwrap();
    demo.tensors()
        .iter()
        .filter(|(name, _)| !name.starts_with(prefix))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect()
}

#[test]
fn unknown_rife_layouts_name_what_was_found() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, tensors| {
        let err = Interpolator::load(&save(dir.path(), name, tensors), &Device::Cpu).unwrap_err();
        assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
        err.to_string()
    };
    // Encoder + four blocks: the 4.7-4.24 generations.
    let msg = load("four.safetensors", without("block4."));
    assert!(msg.contains("RIFE 4.7-4.24"), "{msg}");
    // No encoder, five blocks: matches nothing; the message says what it saw.
    let msg = load("no-encoder.safetensors", without("encode."));
    assert!(msg.contains("found 5 flow blocks"), "{msg}");
    assert!(msg.contains("no feature encoder"), "{msg}");
    assert!(msg.contains("block0.conv0.0.0.bias [96]"), "{msg}");
    // A 16-channel encoder (4.26 heavy's) with 4.25's 15-input block 0: the widths do
    // not chain, and the error names the tensor.
    let mut wide = without("no such prefix");
    wide.insert(
        "encode.cnn3.weight".into(),
        Tensor::zeros((16, 16, 4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    wide.insert(
        "encode.cnn3.bias".into(),
        Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = load("wide.safetensors", wide);
    assert!(msg.contains("block0.conv0.0.0.weight takes 15"), "{msg}");
    assert!(msg.contains("needs 39"), "{msg}");
}

#[test]
fn rife425_pads_odd_frames_and_runs_sequences() {
    let interpolator = load_demo(write_demo_rife425);
    // 20x24 needs more padding than the side (44 and 40 rows to reach 64): the mirror
    // folds back and forth instead of failing.
    let (a, b) = frame_pair(20, 24);
    let frames = Tensor::cat(&[&a, &b], 0).unwrap();
    let out = interpolator.interpolate_sequence(&frames, 3).unwrap();
    assert_eq!(out.dims(), &[4, 20, 24, 3]);
    let values: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        values
            .iter()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v))
    );
}

/// `fixtures/rife425/flownet_tiny.pkl` is what Practical-RIFE's `torch.save` writes (zip
/// pickle, DataParallel `module.` keys; float16 here), wired as 4.25 at tiny widths with
/// 4.26 heavy's 16-channel encoder: the pickle reader, the prefix, the dtype and the width
/// detection against the PyTorch reference (`make_rife425_goldens.py`).
#[test]
fn practical_rife_pickle_with_module_prefix_matches_the_reference() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rife425/flownet_tiny.pkl");
    let interpolator = Interpolator::load(&path, &Device::Cpu).unwrap();
    assert_eq!(interpolator.arch(), RifeArch::V425);
    let RifeNet::Res(net) = interpolator.net() else {
        panic!("loaded as {:?}", interpolator.arch())
    };
    let encoder = net.encoder_config().unwrap();
    assert_eq!((encoder.hidden, encoder.out), (8, 16));
    let configs = net.block_configs();
    let widths: Vec<_> = configs.iter().map(|c| c.channels).collect();
    assert_eq!(widths, [16, 16, 8, 8, 8]);
    assert_eq!(configs[0].in_channels, 39);
    assert!(
        configs[1..]
            .iter()
            .all(|c| c.in_channels == 52 && c.depth == 1)
    );
    let frames = read_fixture("rife425", "frames_40x48.f32", &[2, 3, 40, 48]);
    let bhwc = |t: Tensor| t.permute((0, 2, 3, 1)).unwrap();
    let img0 = bhwc(frames.narrow(0, 0, 1).unwrap());
    let img1 = bhwc(frames.narrow(0, 1, 1).unwrap());
    let expected = bhwc(read_fixture(
        "rife425",
        "flownet_tiny_t50.f32",
        &[1, 3, 40, 48],
    ));
    let got = interpolator.interpolate(&img0, &img1, 0.5).unwrap();
    let diff: f32 = max_abs_diff(&got, &expected);
    eprintln!("flownet_tiny.pkl t=0.5: max abs diff {diff:e}");
    assert!(diff < 1e-5, "max abs diff {diff}");
}
