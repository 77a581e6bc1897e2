//! Deterministic RIFEs for demo model sets and tests.
//!
//! No RIFE weights can be fetched in sakuga's test and demo environments, so this writes
//! IFNets with real key layouts and tensor ranks:
//! - `sakuga-demo-rife.safetensors`: the 4-block PReLU layout at small widths (16/16/8/8
//!   channels, 2 convs per block);
//! - `sakuga-demo-rife46.safetensors`: RIFE 4.6's ResConv layout at small widths;
//! - `sakuga-demo-rife425.safetensors`: RIFE 4.25's layout at its real widths (encoder
//!   3->16->4, blocks 192/128/96/64/32 wide with 8 ResConvs each, 52-channel `lastconv`),
//!   22 MB, so that timings on it are those of the real model.
//!
//! Values come from a fixed-seed generator scaled by `1/sqrt(fan_in)` (ResConv `beta`s
//! well under 1), so the flows predicted are a few pixels and the output is a plausible
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

/// Widths of a ResConv IFNet to write.
struct ResSpec {
    /// Encoder `(hidden, out)` channels, for 4.25/4.26.
    encoder: Option<(usize, usize)>,
    channels: &'static [usize],
    depth: usize,
    /// `lastconv` outputs before the PixelShuffle.
    lastconv: usize,
    seed: u64,
}

/// RIFE 4.25 at its real widths.
const RIFE425: ResSpec = ResSpec {
    encoder: Some((16, 4)),
    channels: &[192, 128, 96, 64, 32],
    depth: 8,
    lastconv: 4 * 13,
    seed: 0x0425_0425,
};

/// RIFE 4.6's layout at small widths (the real one is 192/128/96/64 with 8 ResConvs).
const RIFE46: ResSpec = ResSpec {
    encoder: None,
    channels: &[16, 16, 8, 8],
    depth: 2,
    lastconv: 4 * 6,
    seed: 0x0046_0046,
};

/// Inserts `{name}.weight` and `{name}.bias` of a conv (`[c_out, c_in, k, k]`) or, when
/// `transposed`, of a ConvTranspose (`[c_in, c_out, k, k]`, values halved).
fn insert_conv(
    rng: &mut DemoRng,
    tensors: &mut BTreeMap<String, Tensor>,
    name: &str,
    dims: [usize; 4],
    transposed: bool,
) -> Result<()> {
    let (c_in, c_out) = if transposed {
        (dims[0], dims[1])
    } else {
        (dims[1], dims[0])
    };
    let fan_in = (c_in * dims[2] * dims[3]) as f32;
    let scale = if transposed { 0.5 } else { 1.0 } / fan_in.sqrt();
    tensors.insert(format!("{name}.weight"), rng.tensor(&dims, scale)?);
    tensors.insert(format!("{name}.bias"), rng.tensor(&[c_out], 0.05)?);
    Ok(())
}

/// `encode.cnn{0..3}`: three convs `hidden` wide, then a ConvTranspose to `out`.
fn insert_encoder(
    rng: &mut DemoRng,
    tensors: &mut BTreeMap<String, Tensor>,
    hidden: usize,
    out: usize,
) -> Result<()> {
    insert_conv(rng, tensors, "encode.cnn0", [hidden, 3, 3, 3], false)?;
    insert_conv(rng, tensors, "encode.cnn1", [hidden, hidden, 3, 3], false)?;
    insert_conv(rng, tensors, "encode.cnn2", [hidden, hidden, 3, 3], false)?;
    insert_conv(rng, tensors, "encode.cnn3", [hidden, out, 4, 4], true)
}

fn res_state_dict(spec: &ResSpec, name: &str) -> Result<StateDict> {
    let mut rng = DemoRng(spec.seed);
    let mut beta_rng = DemoRng(spec.seed ^ 0xbe7a);
    let mut tensors = BTreeMap::new();
    let head = match spec.encoder {
        Some((hidden, out)) => {
            insert_encoder(&mut rng, &mut tensors, hidden, out)?;
            out
        }
        None => 0,
    };
    let passed = if spec.encoder.is_some() {
        spec.lastconv / 4 - 5
    } else {
        0
    };
    for (block, &c) in spec.channels.iter().enumerate() {
        let in_channels = if block == 0 {
            7 + 2 * head
        } else {
            12 + 2 * head + passed
        };
        let p = format!("block{block}");
        insert_conv(
            &mut rng,
            &mut tensors,
            &format!("{p}.conv0.0.0"),
            [c / 2, in_channels, 3, 3],
            false,
        )?;
        insert_conv(
            &mut rng,
            &mut tensors,
            &format!("{p}.conv0.1.0"),
            [c, c / 2, 3, 3],
            false,
        )?;
        for j in 0..spec.depth {
            insert_conv(
                &mut rng,
                &mut tensors,
                &format!("{p}.convblock.{j}.conv"),
                [c, c, 3, 3],
                false,
            )?;
            // PyTorch starts `beta` at ones; well under 1 keeps 8 random residual convs
            // from growing the activations.
            let beta = (beta_rng.tensor(&[1, c, 1, 1], 0.05)? + 0.2)?;
            tensors.insert(format!("{p}.convblock.{j}.beta"), beta);
        }
        insert_conv(
            &mut rng,
            &mut tensors,
            &format!("{p}.lastconv.0"),
            [c, spec.lastconv, 4, 4],
            true,
        )?;
    }
    Ok(StateDict::from_tensors(name, tensors))
}

/// RIFE 4.6 at its real widths (192/128/96/64, 8 ResConvs), random like the demos: not
/// written as a demo file (the small one suffices for tests), for benchmarks against 4.25.
///
/// # Errors
/// Only candle allocation errors.
pub fn rife46_real_widths_state_dict() -> Result<StateDict> {
    let spec = ResSpec {
        channels: &[192, 128, 96, 64],
        depth: 8,
        ..RIFE46
    };
    res_state_dict(&spec, "rife46-real-widths")
}

/// The demo RIFE 4.25's tensors, by Practical-RIFE key (`module.` stripped).
///
/// # Errors
/// Only candle allocation errors.
pub fn demo_rife425_state_dict() -> Result<StateDict> {
    res_state_dict(&RIFE425, "demo-rife425")
}

/// The demo RIFE 4.6 (ResConv layout, small widths), by Practical-RIFE key.
///
/// # Errors
/// Only candle allocation errors.
pub fn demo_rife46_state_dict() -> Result<StateDict> {
    res_state_dict(&RIFE46, "demo-rife46")
}

/// Writes the demo RIFE 4.25 as `.safetensors` at `path`.
///
/// # Errors
/// [`crate::ModelError::Io`] when the file cannot be written.
pub fn write_demo_rife425(path: &Path) -> Result<()> {
    demo_rife425_state_dict()?.save_safetensors(path)
}

/// Writes the demo RIFE 4.6 (ResConv layout) as `.safetensors` at `path`.
///
/// # Errors
/// [`crate::ModelError::Io`] when the file cannot be written.
pub fn write_demo_rife46(path: &Path) -> Result<()> {
    demo_rife46_state_dict()?.save_safetensors(path)
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
/// File name of the demo RIFE 4.6 (ResConv layout) inside `frame_interpolation/`.
pub const DEMO_RIFE46: &str = "sakuga-demo-rife46.safetensors";
/// File name of the demo RIFE 4.25 inside `frame_interpolation/`.
pub const DEMO_RIFE425: &str = "sakuga-demo-rife425.safetensors";

/// Writes the demo RIFEs into `frame_interpolation/` under the models root `dir`.
///
/// # Errors
/// [`crate::ModelError::Io`] when the file cannot be written.
pub fn write_demo_models(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let folder = dir.join(crate::store::ModelFolder::InterpolationModels.dir_name());
    std::fs::create_dir_all(&folder).map_err(|source| crate::ModelError::Io {
        path: folder.clone(),
        source,
    })?;
    let files = [
        (DEMO_RIFE, write_demo_rife as fn(&Path) -> Result<()>),
        (DEMO_RIFE46, write_demo_rife46),
        (DEMO_RIFE425, write_demo_rife425),
    ];
    let mut written = Vec::new();
    for (name, write) in files {
        let path = folder.join(name);
        write(&path)?;
        written.push(path);
    }
    Ok(written)
}
