//! Loading upscalers from broken or foreign files: every failure names the file and says
//! what is wrong, with the error variant the cache and metrics rely on.
//!
//! Run with `cargo test -p sakuga-models --test upscale_load`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sakuga_models::ModelError;
use sakuga_models::upscale::{StateDict, TileConfig, Upscaler};

fn animevideov3_param() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/models/upscale_models/realesr-animevideov3-x4.param")
}

/// Copies the shipped ncnn pair into `dir` under `name`, letting `edit_bin` alter the
/// weights and `edit_param` the graph text.
fn ncnn_copy(
    dir: &Path,
    name: &str,
    edit_param: impl FnOnce(String) -> String,
    edit_bin: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> PathBuf {
    let param = std::fs::read_to_string(animevideov3_param()).unwrap();
    let bin = std::fs::read(animevideov3_param().with_extension("bin")).unwrap();
    let param_path = dir.join(format!("{name}.param"));
    std::fs::write(&param_path, edit_param(param)).unwrap();
    std::fs::write(param_path.with_extension("bin"), edit_bin(bin)).unwrap();
    param_path
}

fn load_err(path: &Path) -> ModelError {
    Upscaler::load(path, &Device::Cpu).expect_err("load should fail")
}

fn assert_names(err: &ModelError, path: &Path, words: &str) {
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "{text:?} should name {}",
        path.display()
    );
    assert!(text.contains(words), "{text:?} should say {words:?}");
    assert_eq!(err.kind(), Some(sakuga_telemetry::ErrorKind::ModelLoad));
}

#[test]
fn missing_file_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.safetensors");
    let err = load_err(&path);
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert_names(&err, &path, "cannot read");
}

#[test]
fn ncnn_param_without_bin_names_the_bin() {
    let dir = tempfile::tempdir().unwrap();
    let param = ncnn_copy(dir.path(), "lonely", |p| p, |b| b);
    std::fs::remove_file(param.with_extension("bin")).unwrap();
    let err = load_err(&param);
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert_names(&err, &param.with_extension("bin"), "cannot read");
}

#[test]
fn truncated_ncnn_bin_is_corrupt_and_names_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let param = ncnn_copy(
        dir.path(),
        "short",
        |p| p,
        |mut b| {
            b.truncate(b.len() / 2);
            b
        },
    );
    let err = load_err(&param);
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &param.with_extension("bin"), "truncated");
    assert!(err.to_string().contains("of layer Conv_"), "{err}");
}

#[test]
fn oversized_ncnn_bin_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let param = ncnn_copy(
        dir.path(),
        "long",
        |p| p,
        |mut b| {
            b.extend_from_slice(&[0; 12]);
            b
        },
    );
    let err = load_err(&param);
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &param.with_extension("bin"), "12 trailing bytes");
}

#[test]
fn ncnn_param_with_bad_magic_or_counts_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let bad_magic = ncnn_copy(
        dir.path(),
        "magic",
        |p| p.replacen("7767517", "7767518", 1),
        |b| b,
    );
    let err = load_err(&bad_magic);
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &bad_magic, "bad magic");

    let bad_count = ncnn_copy(
        dir.path(),
        "count",
        |p| p.replacen("40 41", "41 41", 1),
        |b| b,
    );
    let err = load_err(&bad_count);
    assert_names(&err, &bad_count, "header says 41 layers, found 40");

    let bad_tag = ncnn_copy(
        dir.path(),
        "tag",
        |p| p,
        |mut b| {
            b[0..4].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
            b
        },
    );
    let err = load_err(&bad_tag);
    assert_names(
        &err,
        &bad_tag.with_extension("bin"),
        "unknown weight tag 0xdeadbeef",
    );
}

#[test]
fn foreign_ncnn_graph_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let param = ncnn_copy(
        dir.path(),
        "foreign",
        |p| p.replace("PixelShuffle ", "Softmax      "),
        |b| b,
    );
    let err = load_err(&param);
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    assert_names(&err, &param, "Softmax");
}

fn animevideov3_weights() -> StateDict {
    StateDict::load(&animevideov3_param(), &Device::Cpu).unwrap()
}

#[test]
fn truncated_or_garbage_safetensors_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    animevideov3_weights().save_safetensors(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let short = dir.path().join("short.safetensors");
    std::fs::write(&short, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_err(&short);
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &short, "not a valid safetensors file");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not a model").unwrap();
    assert_names(&load_err(&garbage), &garbage, "is corrupt");
}

#[test]
fn garbage_pth_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pth");
    std::fs::write(&path, vec![0x42; 4096]).unwrap();
    let err = load_err(&path);
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err:?}");
    assert_names(&err, &path, "not a readable PyTorch checkpoint");
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = animevideov3_weights().tensors().clone();
    tensors.remove("body.20.bias");
    let missing = dir.path().join("missing.safetensors");
    StateDict::from_tensors(&missing, tensors)
        .save_safetensors(&missing)
        .unwrap();
    let err = load_err(&missing);
    assert!(
        matches!(err, ModelError::MissingTensor { ref tensor, .. } if tensor == "body.20.bias"),
        "{err:?}"
    );
    assert_names(&err, &missing, "body.20.bias");

    let mut tensors = animevideov3_weights().tensors().clone();
    tensors.insert(
        "body.21.weight".into(),
        Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let misshapen = dir.path().join("misshapen.safetensors");
    StateDict::from_tensors(&misshapen, tensors)
        .save_safetensors(&misshapen)
        .unwrap();
    let err = load_err(&misshapen);
    assert!(matches!(err, ModelError::TensorMismatch { .. }), "{err:?}");
    assert_names(&err, &misshapen, "body.21.weight");
}

#[test]
fn unknown_architecture_and_extension_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.safetensors");
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert(
        "encoder.weight".to_string(),
        Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    StateDict::from_tensors(&other, tensors)
        .save_safetensors(&other)
        .unwrap();
    let err = load_err(&other);
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    assert_names(&err, &other, "no Real-ESRGAN keys");

    let onnx = dir.path().join("model.onnx");
    std::fs::write(&onnx, b"onnx").unwrap();
    assert_names(&load_err(&onnx), &onnx, "unknown weights extension");
}

#[test]
fn bad_image_shapes_are_invalid_input() {
    let upscaler = Upscaler::load(&animevideov3_param(), &Device::Cpu).unwrap();
    for dims in [vec![1, 8, 8, 4], vec![8, 8, 3], vec![0, 8, 8, 3]] {
        let image = Tensor::zeros(dims.clone(), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = upscaler.upscale(&image, TileConfig::default()).unwrap_err();
        assert_eq!(
            err.kind(),
            Some(sakuga_telemetry::ErrorKind::InvalidInput),
            "{dims:?}: {err}"
        );
    }
}

/// `fixtures/realesrgan/pth/srvgg-tiny-x2.pth` is a PyTorch zip checkpoint in BasicSR's
/// `{"params_ema": state_dict}` wrapper (written by `make_tiny_pth.py` beside it); the
/// `.f32` file holds the same tensors raw, in key order.
#[test]
fn pytorch_checkpoint_loads_through_the_params_ema_wrapper() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/realesrgan/pth");
    let pth = dir.join("srvgg-tiny-x2.pth");
    let upscaler = Upscaler::load(&pth, &Device::Cpu).unwrap();
    assert_eq!(upscaler.scale(), 2);
    match upscaler.arch() {
        sakuga_models::upscale::UpscaleArch::Srvgg(c) => {
            assert_eq!((c.num_feat, c.num_conv, c.in_channels), (4, 1, 3));
        }
        other => panic!("detected {other:?}"),
    }
    let weights = StateDict::load(&pth, &Device::Cpu).unwrap();
    let raw = std::fs::read(dir.join("srvgg-tiny-x2.f32")).unwrap();
    let expected: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let order = [
        "body.0.weight",
        "body.0.bias",
        "body.1.weight",
        "body.2.weight",
        "body.2.bias",
        "body.3.weight",
        "body.4.weight",
        "body.4.bias",
    ];
    let mut at = 0;
    for name in order {
        let values: Vec<f32> = weights
            .get(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(values, expected[at..at + values.len()], "{name}");
        at += values.len();
    }
    assert_eq!(at, expected.len());
    let image = Tensor::zeros((1, 6, 5, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        upscaler
            .upscale(&image, TileConfig::default())
            .unwrap()
            .dims(),
        &[1, 12, 10, 3]
    );
}
