//! Frame interpolation with RIFE on candle: in-between frames for animation previews.
//!
//! - [`warp`]: bilinear backward warp (RIFE's `grid_sample`), a CPU custom op plus a
//!   `gather` version for other devices;
//! - [`ifnet`]: the 4-block IFNet with PReLU convs (sakuga's first RIFE layout);
//! - [`ifnet_res`]: the ResConv IFNet of Practical-RIFE 4.6 and 4.25/4.26 (the latter with
//!   a feature encoder and five blocks, the models ComfyUI's `FrameInterpolate` loads);
//! - [`demo`]: tiny deterministic RIFEs with the real key layouts, for demo model sets and
//!   tests (no RIFE weights can be downloaded here).
//!
//! [`Interpolator`] loads `flownet.pkl` (PyTorch pickle, `module.` prefixes stripped) or a
//! `.safetensors` state dict (Practical-RIFE's `block{i}.` keys or ComfyUI's `blocks.{i}.`),
//! detects the layout from the keys and shapes ([`RifeArch::detect`]) and turns two
//! ComfyUI-style frames into the frame at time `t`.

pub mod demo;
pub mod ifnet;
pub mod ifnet_res;
pub mod warp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use self::demo::{write_demo_rife, write_demo_rife425};
pub use self::ifnet::IfNet;
pub use self::ifnet_res::{Generation, ResIfNet};
use crate::upscale::StateDict;
use crate::{ModelError, Result};

/// Frame sides must be multiples of this for the 4-block networks: their coarsest block
/// works at 1/8 resolution and downsamples by 4 more inside.
pub const SIDE_MULTIPLE: usize = 32;
/// The same for RIFE 4.25/4.26, whose coarsest block works at 1/16 resolution.
pub const SIDE_MULTIPLE_V425: usize = 64;

/// The RIFE layouts sakuga runs, told apart by the weights' keys and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RifeArch {
    /// Four blocks of conv + PReLU with a 5-output ConvTranspose head (sakuga's first
    /// layout, the one its `sakuga-demo-rife.safetensors` uses).
    Prelu,
    /// RIFE 4.6: four ResConv blocks, no feature encoder.
    V46,
    /// RIFE 4.25/4.26 (and their lite/heavy variants): feature encoder + five ResConv
    /// blocks.
    V425,
}

impl RifeArch {
    /// A short human name, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            RifeArch::Prelu => "RIFE 4.x (PReLU layout)",
            RifeArch::V46 => "RIFE 4.6",
            RifeArch::V425 => "RIFE 4.25/4.26",
        }
    }

    /// Detects the layout of a normalised state dict (see [`normalize_keys`]).
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] naming what was found when the keys match no layout
    /// sakuga runs (another RIFE generation, or not RIFE at all).
    pub fn detect(weights: &StateDict) -> Result<Self> {
        let blocks = (0..)
            .take_while(|i| weights.contains(&format!("block{i}.conv0.0.0.weight")))
            .count();
        let encoder = weights.names().any(|n| n.starts_with("encode."));
        let resconv = weights.contains("block0.convblock.0.beta");
        let prelu = weights.contains("block0.conv0.0.1.weight");
        match (blocks, encoder, resconv, prelu) {
            (4, false, false, true) => Ok(RifeArch::Prelu),
            (4, false, true, false) => Ok(RifeArch::V46),
            (5, true, true, false) => Ok(RifeArch::V425),
            (4, true, true, false) => Err(unknown_layout(
                weights,
                "a feature encoder with four ResConv blocks is RIFE 4.7-4.24, which sakuga \
                 does not run",
            )),
            _ => Err(unknown_layout(
                weights,
                &format!(
                    "found {blocks} flow blocks (block0..), {}, convblock {}",
                    if encoder {
                        "a feature encoder (encode.*)"
                    } else {
                        "no feature encoder"
                    },
                    match (resconv, prelu) {
                        (true, _) => "of ResConvs (beta)",
                        (false, true) => "of conv + PReLU",
                        (false, false) => "missing",
                    }
                ),
            )),
        }
    }
}

fn unknown_layout(weights: &StateDict, what: &str) -> ModelError {
    let sample: Vec<String> = weights
        .tensors()
        .iter()
        .take(4)
        .map(|(name, t)| format!("{name} {:?}", t.dims()))
        .collect();
    ModelError::Unsupported {
        path: weights.path().to_path_buf(),
        reason: format!(
            "unknown RIFE layout: {what}; {} tensors, first: {}. sakuga runs RIFE 4.6 \
             (block0..block3) and RIFE 4.25/4.26 (encode + block0..block4)",
            weights.tensors().len(),
            sample.join(", ")
        ),
    }
}

/// Puts a RIFE state dict in Practical-RIFE's key layout: ComfyUI's `blocks.{i}.` becomes
/// `block{i}.`, a `flownet.` prefix is dropped, and the training-only `teacher.`/`caltime.`
/// modules some checkpoints carry are left out (as ComfyUI's loader does).
pub fn normalize_keys(weights: &StateDict) -> StateDict {
    let mut tensors = BTreeMap::new();
    for (name, tensor) in weights.tensors() {
        let name = name.strip_prefix("flownet.").unwrap_or(name);
        if name.starts_with("teacher.") || name.starts_with("caltime.") {
            continue;
        }
        let name = match name
            .strip_prefix("blocks.")
            .and_then(|rest| rest.split_once('.'))
        {
            Some((index, rest)) if index.parse::<usize>().is_ok() => {
                format!("block{index}.{rest}")
            }
            _ => name.to_string(),
        };
        tensors.insert(name, tensor.clone());
    }
    StateDict::from_tensors(weights.path(), tensors)
}

/// A loaded network of one of the [`RifeArch`] layouts.
#[derive(Debug, Clone)]
pub enum RifeNet {
    /// [`RifeArch::Prelu`].
    Prelu(Box<IfNet>),
    /// [`RifeArch::V46`] or [`RifeArch::V425`].
    Res(Box<ResIfNet>),
}

impl RifeNet {
    /// The layout.
    pub fn arch(&self) -> RifeArch {
        match self {
            RifeNet::Prelu(_) => RifeArch::Prelu,
            RifeNet::Res(net) => match net.generation() {
                Generation::V46 => RifeArch::V46,
                Generation::V425 => RifeArch::V425,
            },
        }
    }

    /// Bytes held by the weights.
    pub fn approx_bytes(&self) -> u64 {
        match self {
            RifeNet::Prelu(net) => net.approx_bytes(),
            RifeNet::Res(net) => net.approx_bytes(),
        }
    }

    /// The in-between NCHW frame at `t`; sides must be multiples of [`Self::side_multiple`].
    ///
    /// # Errors
    /// Shape or device errors.
    pub fn forward(&self, img0: &Tensor, img1: &Tensor, t: f32) -> Result<Tensor> {
        match self {
            RifeNet::Prelu(net) => net.forward(img0, img1, t),
            RifeNet::Res(net) => net.forward(img0, img1, t),
        }
    }

    /// What frame sides must be multiples of.
    pub fn side_multiple(&self) -> usize {
        match self.arch() {
            RifeArch::V425 => SIDE_MULTIPLE_V425,
            RifeArch::Prelu | RifeArch::V46 => SIDE_MULTIPLE,
        }
    }
}

/// Pads NCHW `xs` at the end of `dim` by `pad` rows mirrored about the last one
/// (`F.pad(mode="reflect")`, as ComfyUI pads frames for RIFE 4.25/4.26), folding back and
/// forth when the pad is longer than the side, where PyTorch would refuse.
fn reflect_pad_end(xs: &Tensor, dim: usize, pad: usize) -> candle_core::Result<Tensor> {
    let size = xs.dim(dim)?;
    if pad == 0 {
        return Ok(xs.clone());
    }
    let period = 2 * size.saturating_sub(1);
    let index: Vec<u32> = (0..size + pad)
        .map(|i| {
            if period == 0 {
                return 0;
            }
            let m = i % period;
            (if m < size { m } else { period - m }) as u32
        })
        .collect();
    let index = Tensor::new(index.as_slice(), xs.device())?;
    xs.contiguous()?.index_select(&index, dim)
}

/// A loaded RIFE frame interpolator.
#[derive(Debug, Clone)]
pub struct Interpolator {
    path: PathBuf,
    net: RifeNet,
}

impl Interpolator {
    /// Loads RIFE weights (`flownet.pkl`, `.pth` or `.safetensors`) onto `device`, the
    /// layout detected from the keys and shapes.
    ///
    /// # Errors
    /// [`ModelError::Io`], [`ModelError::Corrupt`], [`ModelError::Unsupported`] (another
    /// RIFE generation), [`ModelError::MissingTensor`], [`ModelError::TensorMismatch`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let weights = StateDict::load(path, device)?;
        Self::from_state_dict(&weights)
    }

    /// Builds the interpolator from loaded tensors.
    ///
    /// # Errors
    /// As [`Interpolator::load`] after reading the file.
    pub fn from_state_dict(weights: &StateDict) -> Result<Self> {
        let weights = normalize_keys(weights);
        let net = match RifeArch::detect(&weights)? {
            RifeArch::Prelu => RifeNet::Prelu(Box::new(IfNet::load(&weights)?)),
            RifeArch::V46 => RifeNet::Res(Box::new(ResIfNet::load(&weights, Generation::V46)?)),
            RifeArch::V425 => RifeNet::Res(Box::new(ResIfNet::load(&weights, Generation::V425)?)),
        };
        Ok(Self {
            path: weights.path().to_path_buf(),
            net,
        })
    }

    /// The network.
    pub fn net(&self) -> &RifeNet {
        &self.net
    }

    /// The detected layout.
    pub fn arch(&self) -> RifeArch {
        self.net.arch()
    }

    /// The file the weights came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the weights occupy, for the model cache.
    pub fn approx_bytes(&self) -> u64 {
        self.net.approx_bytes()
    }

    /// The frame at time `t` (0 = `frame0`, 1 = `frame1`) between two ComfyUI-style
    /// frames, f32 `[batch, height, width, 3]` in `[0, 1]`; pairs are taken batch element
    /// by batch element. Sides are padded for the network and cropped back: with zeros to
    /// a multiple of 32 for the 4-block layouts, mirrored to a multiple of 64 for RIFE
    /// 4.25/4.26 (as ComfyUI does). The result is clamped to `[0, 1]`.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for mismatched or non-BHWC-RGB frames or `t` outside
    /// `[0, 1]`; candle errors.
    pub fn interpolate(&self, frame0: &Tensor, frame1: &Tensor, t: f32) -> Result<Tensor> {
        if frame0.dims() != frame1.dims() {
            return Err(ModelError::InvalidInput(format!(
                "frames to interpolate differ in shape: {:?} vs {:?}",
                frame0.dims(),
                frame1.dims()
            )));
        }
        let dims = frame0.dims();
        let [_, height, width, 3] = dims[..] else {
            return Err(ModelError::InvalidInput(format!(
                "interpolate expects [batch, height, width, 3] frames, got {dims:?}"
            )));
        };
        if height == 0 || width == 0 {
            return Err(ModelError::InvalidInput(format!("empty frames {dims:?}")));
        }
        if !(0.0..=1.0).contains(&t) {
            return Err(ModelError::InvalidInput(format!(
                "interpolation time {t} is outside [0, 1]"
            )));
        }
        let multiple = self.net.side_multiple();
        let pad_h = height.div_ceil(multiple) * multiple - height;
        let pad_w = width.div_ceil(multiple) * multiple - width;
        let reflect = self.arch() == RifeArch::V425;
        let to_net = |frame: &Tensor| -> candle_core::Result<Tensor> {
            let frame = frame.to_dtype(DType::F32)?.permute((0, 3, 1, 2))?;
            let frame = if reflect {
                reflect_pad_end(&reflect_pad_end(&frame, 2, pad_h)?, 3, pad_w)?
            } else {
                frame
                    .pad_with_zeros(2, 0, pad_h)?
                    .pad_with_zeros(3, 0, pad_w)?
            };
            frame.contiguous()
        };
        let out = self.net.forward(&to_net(frame0)?, &to_net(frame1)?, t)?;
        let out = out
            .narrow(2, 0, height)?
            .narrow(3, 0, width)?
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        Ok(out)
    }

    /// `frames` `[n, h, w, 3]` with `multiplier - 1` in-between frames inserted between
    /// each consecutive pair (at `t = k / multiplier`): `(n - 1) * multiplier + 1` frames.
    /// A multiplier of 1, or a single frame, returns the input unchanged.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a zero multiplier or bad shapes; candle errors.
    pub fn interpolate_sequence(&self, frames: &Tensor, multiplier: usize) -> Result<Tensor> {
        self.interpolate_sequence_with(frames, multiplier, |_, _| Ok::<(), ModelError>(()))
    }

    /// [`Self::interpolate_sequence`], calling `step(done, total)` before each new frame
    /// and once at the end; an error from `step` (a cancel) stops the sequence.
    ///
    /// # Errors
    /// As [`Self::interpolate_sequence`], and whatever `step` returns.
    pub fn interpolate_sequence_with<E>(
        &self,
        frames: &Tensor,
        multiplier: usize,
        mut step: impl FnMut(u64, u64) -> std::result::Result<(), E>,
    ) -> std::result::Result<Tensor, E>
    where
        E: From<ModelError>,
    {
        if multiplier == 0 {
            return Err(ModelError::InvalidInput(
                "frame interpolation multiplier must be at least 1".to_string(),
            )
            .into());
        }
        let count = frames.dims().first().copied().unwrap_or(0);
        if multiplier == 1 || count < 2 {
            return Ok(frames.clone());
        }
        let total = ((count - 1) * (multiplier - 1)) as u64;
        let mut done = 0;
        let mut out = Vec::with_capacity((count - 1) * multiplier + 1);
        let narrow = |index| frames.narrow(0, index, 1).map_err(ModelError::from);
        for index in 0..count - 1 {
            let a = narrow(index)?;
            let b = narrow(index + 1)?;
            out.push(a.clone());
            for k in 1..multiplier {
                step(done, total)?;
                done += 1;
                out.push(self.interpolate(&a, &b, k as f32 / multiplier as f32)?);
            }
        }
        out.push(narrow(count - 1)?);
        step(total, total)?;
        Ok(Tensor::cat(&out, 0).map_err(ModelError::from)?)
    }
}
