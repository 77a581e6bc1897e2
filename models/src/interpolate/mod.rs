//! Frame interpolation with RIFE on candle: in-between frames for animation previews.
//!
//! - [`warp`]: bilinear backward warp (RIFE's `grid_sample`), a CPU custom op plus a
//!   `gather` version for other devices;
//! - [`ifnet`]: the RIFE 4.x IFNet flow network;
//! - [`demo`]: a tiny deterministic RIFE with the real key layout, for demo model sets and
//!   tests (no RIFE weights can be downloaded here).
//!
//! [`Interpolator`] loads `flownet.pkl` (PyTorch pickle, `module.` prefixes stripped) or a
//! `.safetensors` state dict and turns two ComfyUI-style frames into the frame at time `t`.

pub mod demo;
pub mod ifnet;
pub mod warp;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use self::demo::write_demo_rife;
pub use self::ifnet::IfNet;
use crate::upscale::StateDict;
use crate::{ModelError, Result};

/// Frame sides must be multiples of this: IFNet's coarsest block works at 1/8 resolution
/// and downsamples by 4 more inside.
pub const SIDE_MULTIPLE: usize = 32;

/// A loaded RIFE frame interpolator.
#[derive(Debug, Clone)]
pub struct Interpolator {
    path: PathBuf,
    net: IfNet,
}

impl Interpolator {
    /// Loads RIFE weights (`flownet.pkl`, `.pth` or `.safetensors`) onto `device`.
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
        Ok(Self {
            path: weights.path().to_path_buf(),
            net: IfNet::load(weights)?,
        })
    }

    /// The network.
    pub fn net(&self) -> &IfNet {
        &self.net
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
    /// by batch element. Sides are zero-padded to a multiple of 32 for the network and
    /// cropped back; the result is clamped to `[0, 1]`.
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
        let pad_h = height.div_ceil(SIDE_MULTIPLE) * SIDE_MULTIPLE - height;
        let pad_w = width.div_ceil(SIDE_MULTIPLE) * SIDE_MULTIPLE - width;
        let to_net = |frame: &Tensor| -> candle_core::Result<Tensor> {
            frame
                .to_dtype(DType::F32)?
                .permute((0, 3, 1, 2))?
                .pad_with_zeros(2, 0, pad_h)?
                .pad_with_zeros(3, 0, pad_w)?
                .contiguous()
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
