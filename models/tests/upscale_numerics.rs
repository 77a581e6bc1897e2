//! Real-ESRGAN numerics: the real released weights, loaded from ncnn files and from an
//! equivalent PyTorch-named `.safetensors`, must reproduce the official ncnn outputs
//! (`fixtures/realesrgan/reference/*.npy`, see `/work/shared/models/README.md`).
//!
//! Run with `cargo test -p sakuga-models --test upscale_numerics`.

mod support;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sakuga_models::upscale::{StateDict, TileConfig, UpscaleArch, Upscaler};
use support::max_abs_diff;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/realesrgan")
}

fn animevideov3_param() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/models/upscale_models/realesr-animevideov3-x4.param")
}

/// A minimal `.npy` reader: version 1/2 headers, little-endian f32, C order.
fn read_npy_f32(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        &bytes[..6],
        b"\x93NUMPY",
        "{} is not an npy file",
        path.display()
    );
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f4'"),
        "only little-endian f32 npy: {header}"
    );
    assert!(
        header.contains("'fortran_order': False"),
        "only C-order npy: {header}"
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data = &bytes[header_start + header_len..];
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn reference_input() -> Tensor {
    read_npy_f32(&fixtures().join("reference/input_64x64.npy"))
        .unsqueeze(0)
        .unwrap()
}

fn check_against_reference(upscaler: &Upscaler, reference: &str) {
    let expected = read_npy_f32(&fixtures().join("reference").join(reference))
        .unsqueeze(0)
        .unwrap();
    let output = upscaler.forward_nchw(&reference_input()).unwrap();
    let diff = max_abs_diff(&output, &expected);
    assert!(
        diff < 1e-4,
        "{}: max abs diff {diff} vs {reference}",
        upscaler.path().display()
    );
}

/// Writes the ncnn-loaded tensors as a PyTorch-named safetensors file and loads that.
fn via_safetensors(param: &Path, dir: &Path) -> Upscaler {
    let weights = StateDict::load(param, &Device::Cpu).unwrap();
    let file = dir.join("model.safetensors");
    weights.save_safetensors(&file).unwrap();
    Upscaler::load(&file, &Device::Cpu).unwrap()
}

#[test]
fn animevideov3_from_ncnn_matches_reference() {
    let upscaler = Upscaler::load(&animevideov3_param(), &Device::Cpu).unwrap();
    assert_eq!(upscaler.scale(), 4);
    match upscaler.arch() {
        UpscaleArch::Srvgg(c) => assert_eq!((c.num_feat, c.num_conv), (64, 16)),
        other => panic!("detected {other:?}"),
    }
    check_against_reference(&upscaler, "realesr-animevideov3-x4_output.npy");
}

#[test]
fn animevideov3_from_safetensors_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let upscaler = via_safetensors(&animevideov3_param(), dir.path());
    assert_eq!(upscaler.scale(), 4);
    check_against_reference(&upscaler, "realesr-animevideov3-x4_output.npy");
}

#[test]
fn x4plus_anime_6b_from_ncnn_matches_reference() {
    let upscaler = Upscaler::load(
        &fixtures().join("realesrgan-x4plus-anime.param"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(upscaler.scale(), 4);
    match upscaler.arch() {
        UpscaleArch::Rrdb(c) => assert_eq!((c.num_feat, c.num_grow, c.num_block), (64, 32, 6)),
        other => panic!("detected {other:?}"),
    }
    check_against_reference(&upscaler, "realesrgan-x4plus-anime_output.npy");
}

#[test]
fn x4plus_anime_6b_from_safetensors_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let upscaler = via_safetensors(
        &fixtures().join("realesrgan-x4plus-anime.param"),
        dir.path(),
    );
    check_against_reference(&upscaler, "realesrgan-x4plus-anime_output.npy");
}

#[test]
fn upscale_takes_bhwc_and_clamps() {
    let upscaler = Upscaler::load(&animevideov3_param(), &Device::Cpu).unwrap();
    let bhwc = reference_input().permute((0, 2, 3, 1)).unwrap();
    let out = upscaler.upscale(&bhwc, TileConfig::untiled()).unwrap();
    assert_eq!(out.dims(), &[1, 256, 256, 3]);
    let raw = upscaler.forward_nchw(&reference_input()).unwrap();
    let expected = raw
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert_eq!(max_abs_diff(&out, &expected), 0.0);
    let min: f32 = out
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let max: f32 = out
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max));
}

#[test]
fn tiled_upscale_matches_untiled_without_seams() {
    let upscaler = Upscaler::load(&animevideov3_param(), &Device::Cpu).unwrap();
    // A 2-frame 80x72 batch with 32 px tiles: a 3x3 grid with ragged last tiles.
    let frame = reference_input().narrow(2, 0, 64).unwrap();
    let wide = Tensor::cat(&[&frame, &frame.narrow(3, 0, 8).unwrap()], 3).unwrap();
    let tall = Tensor::cat(&[&wide, &wide.narrow(2, 0, 16).unwrap()], 2).unwrap();
    let flipped = tall.affine(-1.0, 1.0).unwrap();
    let batch = Tensor::cat(&[&tall, &flipped], 0)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert_eq!(batch.dims(), &[2, 80, 72, 3]);
    let untiled = upscaler.upscale(&batch, TileConfig::untiled()).unwrap();
    let tile = TileConfig {
        tile: 32,
        overlap: 20,
    };
    let tiled = upscaler.upscale(&batch, tile).unwrap();
    assert_eq!(tiled.dims(), &[2, 320, 288, 3]);
    let diff = max_abs_diff(&tiled, &untiled);
    assert!(diff < 1e-3, "tiled vs untiled max diff {diff}");
}

#[test]
fn budget_tiles_are_seam_free_and_fit() {
    let upscaler = Upscaler::load(&animevideov3_param(), &Device::Cpu).unwrap();
    let arch = upscaler.arch();
    let tile = upscaler.tile_for_budget(64 << 20);
    assert!(tile.overlap >= arch.receptive_radius());
    let side = (tile.tile + 2 * tile.overlap) as u64;
    assert!(side * side * arch.activation_bytes_per_pixel() <= 64 << 20);
    let bigger = upscaler.tile_for_budget(1 << 30);
    assert!(bigger.tile > tile.tile);
    assert!(
        upscaler.approx_bytes() > 2_000_000,
        "{} bytes",
        upscaler.approx_bytes()
    );
}
