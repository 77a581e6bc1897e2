//! A tiny deterministic RIFE for demo model sets and tests.
//!
//! No RIFE weights can be fetched in sakuga's test and demo environments, so this writes
//! an IFNet with the real 4.6 key layout and tensor ranks but small widths (16/16/8/8
//! channels, 2 convs per block). Values come from a fixed-seed generator scaled by
//! `1/sqrt(fan_in)`, so the flows it predicts are small and the output is a plausible
//! blend of the two frames: enough to exercise loading, padding, warping and the nodes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::Result;
use crate::upscale::StateDict;

/// Block widths of the demo network.
pub const DEMO_CHANNELS: [usize; 4] = [16, 16, 8, 8];
/// 3x3 convs in each demo block's `convblock`.
pub const DEMO_DEPTH: usize = 2;

/// A fixed-seed generator (64-bit LCG, top bits) for reproducible demo weights.
struct DemoRng(u64);

impl DemoRng {
    fn next_unit(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn tensor(&mut self, dims: &[usize], scale: f32) -> Result<Tensor> {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = (0..count).map(|_| self.next_unit() * scale).collect();
        Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
    }
}

/// The demo RIFE's tensors, by PyTorch key.
///
/// # Errors
/// Only candle allocation errors.
pub fn demo_rife_state_dict() -> Result<StateDict> {
    let mut rng = DemoRng(0x5a6b_7c8d);
    let mut tensors = BTreeMap::new();
    for (block, &c) in DEMO_CHANNELS.iter().enumerate() {
        let in_channels = if block == 0 { 7 } else { 12 };
        let mut conv = |name: String, c_out: usize, c_in: usize| -> Result<()> {
            let scale = 1.0 / ((c_in * 9) as f32).sqrt();
            tensors.insert(
                format!("{name}.0.weight"),
                rng.tensor(&[c_out, c_in, 3, 3], scale)?,
            );
            tensors.insert(format!("{name}.0.bias"), rng.tensor(&[c_out], 0.05)?);
            // PReLU slopes start at PyTorch's default 0.25, jittered.
            let slopes = (rng.tensor(&[c_out], 0.05)? + 0.25)?;
            tensors.insert(format!("{name}.1.weight"), slopes);
            Ok(())
        };
        conv(format!("block{block}.conv0.0"), c / 2, in_channels)?;
        conv(format!("block{block}.conv0.1"), c, c / 2)?;
        for j in 0..DEMO_DEPTH {
            conv(format!("block{block}.convblock.{j}"), c, c)?;
        }
        let scale = 0.5 / ((c * 16) as f32).sqrt();
        tensors.insert(
            format!("block{block}.lastconv.weight"),
            rng.tensor(&[c, 5, 4, 4], scale)?,
        );
        tensors.insert(
            format!("block{block}.lastconv.bias"),
            rng.tensor(&[5], 0.05)?,
        );
    }
    Ok(StateDict::from_tensors("demo-rife", tensors))
}

/// Writes the demo RIFE as `.safetensors` at `path` (conventionally
/// `frame_interpolation/rife-demo.safetensors`).
///
/// # Errors
/// [`crate::ModelError::Io`] when the file cannot be written.
pub fn write_demo_rife(path: &Path) -> Result<()> {
    demo_rife_state_dict()?.save_safetensors(path)
}

/// File name of the demo RIFE inside `frame_interpolation/`.
pub const DEMO_RIFE: &str = "sakuga-demo-rife.safetensors";

/// Writes the demo RIFE into `frame_interpolation/` under the models root `dir`.
///
/// # Errors
/// [`crate::ModelError::Io`] when the file cannot be written.
pub fn write_demo_models(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let folder = dir.join(crate::store::ModelFolder::InterpolationModels.dir_name());
    std::fs::create_dir_all(&folder).map_err(|source| crate::ModelError::Io {
        path: folder.clone(),
        source,
    })?;
    let path = folder.join(DEMO_RIFE);
    write_demo_rife(&path)?;
    Ok(vec![path])
}
