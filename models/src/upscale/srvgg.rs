//! SRVGGNetCompact, Real-ESRGAN's small VGG-style upscaler (realesr-animevideov3,
//! realesr-general-x4v3): a chain of 3x3 convolutions with PReLU at input resolution, a
//! pixel shuffle to the output size, plus a nearest-neighbour upsample of the input as a
//! residual. Everything but the shuffle is convolution, which is why the fast CPU conv
//! matters most here.
//!
//! State dict layout: `body.0` first conv, `body.1` PReLU, then `body.{2i+2}` conv and
//! `body.{2i+3}` PReLU for each of `num_conv` body convs, and `body.{2 num_conv + 2}` the
//! last conv with `3 * scale^2` outputs.

use candle_core::Tensor;

use super::weights::StateDict;
use crate::conv::{Activation, FusedConv2d};
use crate::{ModelError, Result};

/// The hyper-parameters of one SRVGGNetCompact, as detected from its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SrvggConfig {
    pub in_channels: usize,
    pub num_feat: usize,
    pub num_conv: usize,
    pub scale: usize,
}

impl SrvggConfig {
    /// realesr-animevideov3: 64 features, 16 body convs, x4.
    pub fn animevideov3() -> Self {
        Self {
            in_channels: 3,
            num_feat: 64,
            num_conv: 16,
            scale: 4,
        }
    }

    /// Reads the configuration off the weights.
    ///
    /// # Errors
    /// Missing or misshapen `body.*` tensors, or a last conv whose outputs are not
    /// `3 * scale^2`.
    pub fn detect(weights: &StateDict) -> Result<Self> {
        let first = weights.dims_of_rank("body.0.weight", 4)?;
        let (num_feat, in_channels) = (first[0], first[1]);
        // Count the 4-D `body.N.weight` tensors: first conv + body convs + last conv.
        let convs = weights
            .names()
            .filter_map(|n| {
                n.strip_prefix("body.")?
                    .strip_suffix(".weight")?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|index| index % 2 == 0)
            .count();
        if convs < 2 {
            return Err(ModelError::Unsupported {
                path: weights.path().to_path_buf(),
                reason: "SRVGGNetCompact needs at least a first and a last convolution".to_string(),
            });
        }
        let num_conv = convs - 2;
        let last = weights.dims_of_rank(&format!("body.{}.weight", 2 * num_conv + 2), 4)?;
        let scale = (1..=8)
            .find(|s| s * s * in_channels == last[0])
            .ok_or_else(|| ModelError::Unsupported {
                path: weights.path().to_path_buf(),
                reason: format!(
                    "last convolution has {} outputs, not {in_channels} x scale^2",
                    last[0]
                ),
            })?;
        Ok(Self {
            in_channels,
            num_feat,
            num_conv,
            scale,
        })
    }
}

/// An SRVGGNetCompact ready to run.
#[derive(Debug, Clone)]
pub struct Srvgg {
    config: SrvggConfig,
    convs: Vec<FusedConv2d>,
}

impl Srvgg {
    /// Builds the network from a state dict, checking every tensor's shape.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] / [`ModelError::TensorMismatch`] naming the tensor.
    pub fn load(weights: &StateDict, config: SrvggConfig) -> Result<Self> {
        let SrvggConfig {
            in_channels,
            num_feat,
            num_conv,
            scale,
        } = config;
        let mut convs = Vec::with_capacity(num_conv + 2);
        for layer in 0..num_conv + 2 {
            let index = 2 * layer;
            let c_in = if layer == 0 { in_channels } else { num_feat };
            let is_last = layer == num_conv + 1;
            let c_out = if is_last {
                in_channels * scale * scale
            } else {
                num_feat
            };
            let weight =
                weights.get_shaped(&format!("body.{index}.weight"), &[c_out, c_in, 3, 3])?;
            let bias = weights.get_shaped(&format!("body.{index}.bias"), &[c_out])?;
            let activation = if is_last {
                Activation::Identity
            } else {
                let slopes =
                    weights.get_shaped(&format!("body.{}.weight", index + 1), &[num_feat])?;
                Activation::PRelu(slopes)
            };
            convs.push(FusedConv2d::try_new(weight, Some(bias), 1, 1, activation)?);
        }
        Ok(Self { config, convs })
    }

    /// The detected configuration.
    pub fn config(&self) -> SrvggConfig {
        self.config
    }

    /// Bytes held by the weights.
    pub fn approx_bytes(&self) -> u64 {
        self.convs.iter().map(FusedConv2d::approx_bytes).sum()
    }

    /// Raw network output for an NCHW image batch (not clamped).
    ///
    /// # Errors
    /// Shape or device errors from candle.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let scale = self.config.scale;
        // Channels-last through the conv chain: the Winograd kernel reads and writes it
        // directly, so only the entry and the exit transpose.
        let mut feat = xs.permute((0, 2, 3, 1))?.contiguous()?;
        for conv in &self.convs {
            feat = conv.forward_nhwc(&feat)?;
        }
        let feat = feat.permute((0, 3, 1, 2))?.contiguous()?;
        let out = candle_nn::ops::pixel_shuffle(&feat, scale)?;
        let base = xs.upsample_nearest2d(h * scale, w * scale)?;
        Ok((out + base)?)
    }
}
