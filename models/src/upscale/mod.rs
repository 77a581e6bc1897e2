//! Real-ESRGAN upscaling on candle: load a model file, detect its network, run it on
//! ComfyUI-style images in overlapped tiles.
//!
//! - [`weights`]: any weights file (safetensors, PyTorch pickle, ncnn) as a PyTorch-named
//!   [`weights::StateDict`];
//! - [`ncnn`]: the ncnn `.param`/`.bin` reader;
//! - [`srvgg`], [`rrdb`]: the two Real-ESRGAN architectures;
//! - [`tile`]: overlapped tiling so a large frame runs in bounded memory.
//!
//! [`Upscaler`] ties them together: `Upscaler::load(path, device)` then
//! `upscaler.upscale(&image_bhwc, TileConfig::default())`.

pub mod demo;
pub mod ncnn;
pub mod rrdb;
pub mod srvgg;
pub mod tile;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub use self::rrdb::{Rrdb, RrdbConfig};
pub use self::srvgg::{Srvgg, SrvggConfig};
pub use self::tile::TileConfig;
pub use self::weights::StateDict;
use crate::{ModelError, Result};

/// Which network a weights file holds, with its detected hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpscaleArch {
    Srvgg(SrvggConfig),
    Rrdb(RrdbConfig),
}

impl UpscaleArch {
    /// Detects the architecture from tensor names and shapes.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] when the keys match no supported network.
    pub fn detect(weights: &StateDict) -> Result<Self> {
        if weights.contains("conv_first.weight") && weights.contains("body.0.rdb1.conv1.weight") {
            return Ok(UpscaleArch::Rrdb(RrdbConfig::detect(weights)?));
        }
        if weights.contains("body.0.weight") && !weights.contains("conv_first.weight") {
            return Ok(UpscaleArch::Srvgg(SrvggConfig::detect(weights)?));
        }
        let reason = if weights.contains("model.0.weight") {
            "old ESRGAN key layout (model.N.*) is not supported; convert it to BasicSR names"
                .to_string()
        } else {
            let sample: Vec<&str> = weights.names().take(3).collect();
            format!("no Real-ESRGAN keys (body.0.weight or conv_first.weight); found {sample:?}")
        };
        Err(ModelError::Unsupported {
            path: weights.path().to_path_buf(),
            reason,
        })
    }

    /// The upscale factor.
    pub fn scale(&self) -> usize {
        match self {
            UpscaleArch::Srvgg(c) => c.scale,
            UpscaleArch::Rrdb(c) => c.scale,
        }
    }

    /// Rough peak activation bytes per input pixel (f32), for tile sizing and admission.
    pub fn activation_bytes_per_pixel(&self) -> u64 {
        let bytes = match self {
            // Two feature maps alive at once plus the shuffled output and the base.
            UpscaleArch::Srvgg(c) => 2 * c.num_feat + 2 * c.in_channels * c.scale * c.scale,
            // The dense block's concatenations at input resolution, then full-width
            // feature maps at scale^2 the pixels in the upsampling tail.
            UpscaleArch::Rrdb(c) => {
                3 * (c.num_feat + 4 * c.num_grow) + 3 * c.num_feat * c.scale * c.scale
            }
        };
        4 * bytes as u64
    }

    /// Input pixels whose value can reach an output pixel along one axis: the receptive
    /// radius. Tiles with at least this much overlap reproduce the untiled output.
    pub fn receptive_radius(&self) -> usize {
        match self {
            UpscaleArch::Srvgg(c) => c.num_conv + 2,
            // 3x3 convs at input resolution: first, 15 per block, body; the tail's convs run
            // at 2x/4x and add at most 2 input pixels.
            UpscaleArch::Rrdb(c) => 2 + 15 * c.num_block + 2,
        }
    }
}

#[derive(Debug, Clone)]
enum Network {
    Srvgg(Srvgg),
    // Boxed: RRDBNet's fixed arrays of blocks make it ten times SRVGG's size inline.
    Rrdb(Box<Rrdb>),
}

/// A loaded Real-ESRGAN upscaler.
#[derive(Debug, Clone)]
pub struct Upscaler {
    path: PathBuf,
    arch: UpscaleArch,
    network: Network,
}

impl Upscaler {
    /// Loads a model file (`.safetensors`, `.pth`, or an ncnn `.param` with its `.bin`
    /// beside it) onto `device`, detecting the architecture and scale from the weights.
    ///
    /// # Errors
    /// [`ModelError::Io`], [`ModelError::Corrupt`], [`ModelError::Unsupported`],
    /// [`ModelError::MissingTensor`] and [`ModelError::TensorMismatch`], each naming the file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let weights = StateDict::load(path, device)?;
        Self::from_state_dict(&weights)
    }

    /// Builds the upscaler from already loaded tensors.
    ///
    /// # Errors
    /// As [`Upscaler::load`], for everything after reading the file.
    pub fn from_state_dict(weights: &StateDict) -> Result<Self> {
        let arch = UpscaleArch::detect(weights)?;
        let network = match arch {
            UpscaleArch::Srvgg(config) => Network::Srvgg(Srvgg::load(weights, config)?),
            UpscaleArch::Rrdb(config) => Network::Rrdb(Box::new(Rrdb::load(weights, config)?)),
        };
        tracing::debug!(path = %weights.path().display(), ?arch, "upscaler loaded");
        Ok(Self {
            path: weights.path().to_path_buf(),
            arch,
            network,
        })
    }

    /// The upscale factor (1, 2 or 4 for the released models).
    pub fn scale(&self) -> usize {
        self.arch.scale()
    }

    /// The detected architecture.
    pub fn arch(&self) -> UpscaleArch {
        self.arch
    }

    /// The file the weights came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the weights occupy, for the model cache.
    pub fn approx_bytes(&self) -> u64 {
        match &self.network {
            Network::Srvgg(n) => n.approx_bytes(),
            Network::Rrdb(n) => n.approx_bytes(),
        }
    }

    /// The largest tile whose activations stay under `budget_bytes`, with an overlap that
    /// keeps tiled output equal to untiled output.
    pub fn tile_for_budget(&self, budget_bytes: u64) -> TileConfig {
        TileConfig::for_budget(self.arch, budget_bytes)
    }

    /// Raw network output for one NCHW batch, unclamped and untiled; sizes the x2/x1
    /// RRDBNets cannot take are edge-padded and cropped back.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a shape that is not `[b, 3, h, w]`; candle errors.
    pub fn forward_nchw(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = xs.dims4()?;
        let expected = match self.arch {
            UpscaleArch::Srvgg(cfg) => cfg.in_channels,
            UpscaleArch::Rrdb(cfg) => cfg.in_channels,
        };
        if c != expected {
            return Err(ModelError::InvalidInput(format!(
                "upscaler {} takes {expected} channels, got {c}",
                self.path.display()
            )));
        }
        match &self.network {
            Network::Srvgg(n) => n.forward(xs),
            Network::Rrdb(n) => {
                let multiple = match self.arch.scale() {
                    2 => 2,
                    1 => 4,
                    _ => 1,
                };
                let (pad_h, pad_w) = (
                    (multiple - h % multiple) % multiple,
                    (multiple - w % multiple) % multiple,
                );
                if pad_h == 0 && pad_w == 0 {
                    return n.forward(xs);
                }
                let padded = xs.pad_with_same(2, 0, pad_h)?.pad_with_same(3, 0, pad_w)?;
                let out = n.forward(&padded)?;
                let s = self.arch.scale();
                Ok(out.narrow(2, 0, h * s)?.narrow(3, 0, w * s)?)
            }
        }
    }

    /// Upscales ComfyUI-style images: f32 `[batch, height, width, 3]` in `[0, 1]` to
    /// `[batch, height * scale, width * scale, 3]`, clamped to `[0, 1]`. Frames run one
    /// at a time, each in overlapped tiles per `tile`.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a shape that is not BHWC with 3 channels; candle
    /// errors (out of memory shows as kind `oom`).
    pub fn upscale(&self, image_bhwc: &Tensor, tile: TileConfig) -> Result<Tensor> {
        self.upscale_with(image_bhwc, tile, &crate::never_stop)
    }

    /// [`Upscaler::upscale`], asking `proceed` before each tile of each frame (numbered
    /// across the whole batch).
    ///
    /// # Errors
    /// As [`Upscaler::upscale`], and [`ModelError::Cancelled`] when `proceed` says stop.
    pub fn upscale_with(
        &self,
        image_bhwc: &Tensor,
        tile: TileConfig,
        proceed: crate::Proceed<'_>,
    ) -> Result<Tensor> {
        let dims = image_bhwc.dims();
        let [batch, height, width, channels] = dims[..] else {
            return Err(ModelError::InvalidInput(format!(
                "upscale expects a [batch, height, width, 3] image, got {dims:?}"
            )));
        };
        if channels != 3 || batch == 0 || height == 0 || width == 0 {
            return Err(ModelError::InvalidInput(format!(
                "upscale expects a non-empty [batch, height, width, 3] image, got {dims:?}"
            )));
        }
        let image = image_bhwc.to_dtype(candle_core::DType::F32)?;
        let per_frame = if tile.tile == 0 || (height <= tile.tile && width <= tile.tile) {
            1
        } else {
            height.div_ceil(tile.tile) * width.div_ceil(tile.tile)
        };
        let tiles = per_frame * batch;
        let done = std::cell::Cell::new(0usize);
        let mut frames = Vec::with_capacity(batch);
        for index in 0..batch {
            let frame = image
                .narrow(0, index, 1)?
                .permute((0, 3, 1, 2))?
                .contiguous()?;
            let out = tile::run_tiled(&frame, self.scale(), tile, |xs| {
                crate::check_proceed(proceed, done.get(), tiles)?;
                done.set(done.get() + 1);
                self.forward_nchw(xs)
            })?;
            frames.push(out.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?);
        }
        Ok(Tensor::cat(&frames, 0)?.contiguous()?)
    }
}
