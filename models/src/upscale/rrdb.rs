//! RRDBNet, the ESRGAN generator used by RealESRGAN_x4plus, x4plus_anime_6B and x2plus:
//! residual-in-residual dense blocks at input resolution, then two nearest x2 upsamples
//! each followed by a conv. The x2 and x1 variants pixel-unshuffle the input first, which
//! shows in the weights as 12 or 48 input channels on `conv_first`.
//!
//! State dict layout (BasicSR names): `conv_first`, `body.{b}.rdb{1,2,3}.conv{1..5}`,
//! `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`.

use candle_core::{Module, Tensor};

use super::weights::StateDict;
use crate::conv::{Activation, FusedConv2d};
use crate::{ModelError, Result};

/// LeakyReLU slope used throughout ESRGAN.
const SLOPE: f32 = 0.2;
/// Residual scaling of every dense block and every RRDB.
const RESIDUAL_SCALE: f64 = 0.2;

/// The hyper-parameters of one RRDBNet, as detected from its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RrdbConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_feat: usize,
    pub num_grow: usize,
    pub num_block: usize,
    pub scale: usize,
}

impl RrdbConfig {
    /// Reads the configuration off the weights.
    ///
    /// # Errors
    /// Missing tensors, or a `conv_first` input count that matches no supported scale.
    pub fn detect(weights: &StateDict) -> Result<Self> {
        let first = weights.dims_of_rank("conv_first.weight", 4)?;
        let (num_feat, first_in) = (first[0], first[1]);
        let num_grow = weights.dims_of_rank("body.0.rdb1.conv1.weight", 4)?[0];
        let out_channels = weights.dims_of_rank("conv_last.weight", 4)?[0];
        let num_block = (0..)
            .take_while(|b| weights.contains(&format!("body.{b}.rdb1.conv1.weight")))
            .count();
        // x2 and x1 models pixel-unshuffle the 3-channel input by 2 or 4 first.
        let (in_channels, scale) = match first_in {
            c if c == out_channels => (c, 4),
            c if c == out_channels * 4 => (out_channels, 2),
            c if c == out_channels * 16 => (out_channels, 1),
            c => {
                return Err(ModelError::Unsupported {
                    path: weights.path().to_path_buf(),
                    reason: format!(
                        "conv_first takes {c} channels for {out_channels} outputs: no known RRDBNet scale"
                    ),
                });
            }
        };
        Ok(Self {
            in_channels,
            out_channels,
            num_feat,
            num_grow,
            num_block,
            scale,
        })
    }
}

#[derive(Debug, Clone)]
struct DenseBlock {
    convs: [FusedConv2d; 5],
}

impl DenseBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut features = vec![x.clone()];
        for conv in &self.convs[..4] {
            let input = Tensor::cat(&features, 1)?;
            features.push(conv.forward(&input)?);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&features, 1)?)?;
        Ok((x5.affine(RESIDUAL_SCALE, 0.0)? + x)?)
    }
}

/// An RRDBNet ready to run.
#[derive(Debug, Clone)]
pub struct Rrdb {
    config: RrdbConfig,
    conv_first: FusedConv2d,
    blocks: Vec<[DenseBlock; 3]>,
    conv_body: FusedConv2d,
    conv_up1: FusedConv2d,
    conv_up2: FusedConv2d,
    conv_hr: FusedConv2d,
    conv_last: FusedConv2d,
}

fn conv(
    weights: &StateDict,
    prefix: &str,
    c_out: usize,
    c_in: usize,
    activation: Activation,
) -> Result<FusedConv2d> {
    let weight = weights.get_shaped(&format!("{prefix}.weight"), &[c_out, c_in, 3, 3])?;
    let bias = weights.get_shaped(&format!("{prefix}.bias"), &[c_out])?;
    Ok(FusedConv2d::try_new(weight, Some(bias), 1, 1, activation)?)
}

impl Rrdb {
    /// Builds the network from a state dict, checking every tensor's shape.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] / [`ModelError::TensorMismatch`] naming the tensor.
    pub fn load(weights: &StateDict, config: RrdbConfig) -> Result<Self> {
        let RrdbConfig {
            in_channels,
            out_channels,
            num_feat: nf,
            num_grow: gc,
            num_block,
            scale,
        } = config;
        let unshuffle = match scale {
            2 => 4,
            1 => 16,
            _ => 1,
        };
        let leaky = || Activation::LeakyRelu(SLOPE);
        let conv_first = conv(
            weights,
            "conv_first",
            nf,
            in_channels * unshuffle,
            Activation::Identity,
        )?;
        let mut blocks = Vec::with_capacity(num_block);
        for b in 0..num_block {
            let dense = |r: usize| -> Result<DenseBlock> {
                let p = |c: usize| format!("body.{b}.rdb{r}.conv{c}");
                Ok(DenseBlock {
                    convs: [
                        conv(weights, &p(1), gc, nf, leaky())?,
                        conv(weights, &p(2), gc, nf + gc, leaky())?,
                        conv(weights, &p(3), gc, nf + 2 * gc, leaky())?,
                        conv(weights, &p(4), gc, nf + 3 * gc, leaky())?,
                        conv(weights, &p(5), nf, nf + 4 * gc, Activation::Identity)?,
                    ],
                })
            };
            blocks.push([dense(1)?, dense(2)?, dense(3)?]);
        }
        Ok(Self {
            config,
            conv_first,
            blocks,
            conv_body: conv(weights, "conv_body", nf, nf, Activation::Identity)?,
            conv_up1: conv(weights, "conv_up1", nf, nf, leaky())?,
            conv_up2: conv(weights, "conv_up2", nf, nf, leaky())?,
            conv_hr: conv(weights, "conv_hr", nf, nf, leaky())?,
            conv_last: conv(weights, "conv_last", out_channels, nf, Activation::Identity)?,
        })
    }

    /// The detected configuration.
    pub fn config(&self) -> RrdbConfig {
        self.config
    }

    /// Bytes held by the weights.
    pub fn approx_bytes(&self) -> u64 {
        let mut convs = vec![
            &self.conv_first,
            &self.conv_body,
            &self.conv_up1,
            &self.conv_up2,
            &self.conv_hr,
            &self.conv_last,
        ];
        for block in &self.blocks {
            for dense in block {
                convs.extend(dense.convs.iter());
            }
        }
        convs.into_iter().map(FusedConv2d::approx_bytes).sum()
    }

    /// Raw network output for an NCHW image batch (not clamped). The x2 and x1 variants
    /// need height and width divisible by 2 and 4; [`super::Upscaler`] pads for them.
    ///
    /// # Errors
    /// Shape or device errors from candle.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let feat = match self.config.scale {
            2 => candle_nn::ops::pixel_unshuffle(xs, 2)?,
            1 => candle_nn::ops::pixel_unshuffle(xs, 4)?,
            _ => xs.clone(),
        };
        let feat = self.conv_first.forward(&feat)?;
        let mut body = feat.clone();
        for rrdb in &self.blocks {
            let block_in = body.clone();
            for dense in rrdb {
                body = dense.forward(&body)?;
            }
            body = (body.affine(RESIDUAL_SCALE, 0.0)? + block_in)?;
        }
        let feat = (feat + self.conv_body.forward(&body)?)?;
        let (_, _, h, w) = feat.dims4()?;
        let feat = self
            .conv_up1
            .forward(&feat.upsample_nearest2d(h * 2, w * 2)?)?;
        let feat = self
            .conv_up2
            .forward(&feat.upsample_nearest2d(h * 4, w * 4)?)?;
        let feat = self.conv_hr.forward(&feat)?;
        Ok(self.conv_last.forward(&feat)?)
    }
}
