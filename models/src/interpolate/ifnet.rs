//! RIFE's IFNet (the 4.x "HDv3" flow network in its conv + PReLU layout): four IFBlocks
//! estimate bidirectional optical flow and a blend mask coarse to fine at 1/8, 1/4, 1/2
//! and full resolution; each block refines the previous estimate from the frames warped by
//! it. The in-between frame is the mask-weighted blend of both warped frames.
//!
//! State dict layout (`module.` prefix already stripped): `block{i}.conv0.{0,1}.{0,1}`
//! (stride-2 conv + PReLU, twice), `block{i}.convblock.{j}.{0,1}` (3x3 conv + PReLU),
//! `block{i}.lastconv` (4x4 stride-2 ConvTranspose with 5 outputs: 4 flow + 1 mask).
//! Channel widths are read from the weights. Practical-RIFE's released 4.6 weights use
//! the ResConv layout instead (`convblock.{j}.{conv,beta}`, LeakyReLU, PixelShuffle head),
//! which [`super::ifnet_res`] runs.

use candle_core::{Module, Tensor};

use super::warp::warp;
use crate::conv::{Activation, FusedConv2d};
use crate::upscale::StateDict;
use crate::{ModelError, Result};

/// The coarse-to-fine scales of the four blocks at RIFE's default `scale = 1.0`.
pub const BLOCK_SCALES: [f64; 4] = [8.0, 4.0, 2.0, 1.0];
/// Input channels of block 0 (two frames + timestep) and of the later blocks (two warped
/// frames + timestep + mask + 4 flow channels).
const FIRST_BLOCK_IN: usize = 7;
const LATER_BLOCK_IN: usize = 12;

/// Widths of one IFBlock, as read from the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfBlockConfig {
    pub in_channels: usize,
    pub channels: usize,
    pub depth: usize,
}

/// One IFBlock.
#[derive(Debug, Clone)]
pub struct IfBlock {
    config: IfBlockConfig,
    conv0: [FusedConv2d; 2],
    convblock: Vec<FusedConv2d>,
    lastconv_weight: Tensor,
    lastconv_bias: Tensor,
}

fn conv_prelu(
    weights: &StateDict,
    prefix: &str,
    c_out: usize,
    c_in: usize,
    stride: usize,
) -> Result<FusedConv2d> {
    let weight = weights.get_shaped(&format!("{prefix}.0.weight"), &[c_out, c_in, 3, 3])?;
    let bias = weights.get_shaped(&format!("{prefix}.0.bias"), &[c_out])?;
    let slopes = weights.get_shaped(&format!("{prefix}.1.weight"), &[c_out])?;
    Ok(FusedConv2d::try_new(
        weight,
        Some(bias),
        1,
        stride,
        Activation::PRelu(slopes),
    )?)
}

impl IfBlock {
    /// Reads block `prefix` (e.g. `block0`), detecting its widths.
    ///
    /// # Errors
    /// Missing or misshapen tensors, or an input width other than `in_channels`.
    pub fn load(weights: &StateDict, prefix: &str, in_channels: usize) -> Result<Self> {
        let first = weights.dims_of_rank(&format!("{prefix}.conv0.0.0.weight"), 4)?;
        if first[1] != in_channels {
            return Err(ModelError::Unsupported {
                path: weights.path().to_path_buf(),
                reason: format!(
                    "{prefix} takes {} input channels, RIFE 4.x IFNet needs {in_channels}",
                    first[1]
                ),
            });
        }
        let half = first[0];
        let channels = weights.dims_of_rank(&format!("{prefix}.conv0.1.0.weight"), 4)?[0];
        let depth = (0..)
            .take_while(|j| weights.contains(&format!("{prefix}.convblock.{j}.0.weight")))
            .count();
        let conv0 = [
            conv_prelu(weights, &format!("{prefix}.conv0.0"), half, in_channels, 2)?,
            conv_prelu(weights, &format!("{prefix}.conv0.1"), channels, half, 2)?,
        ];
        let convblock = (0..depth)
            .map(|j| {
                conv_prelu(
                    weights,
                    &format!("{prefix}.convblock.{j}"),
                    channels,
                    channels,
                    1,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let lastconv_weight =
            weights.get_shaped(&format!("{prefix}.lastconv.weight"), &[channels, 5, 4, 4])?;
        let lastconv_bias = weights
            .get_shaped(&format!("{prefix}.lastconv.bias"), &[5])?
            .reshape((1, 5, 1, 1))?;
        Ok(Self {
            config: IfBlockConfig {
                in_channels,
                channels,
                depth,
            },
            conv0,
            convblock,
            lastconv_weight,
            lastconv_bias,
        })
    }

    /// The detected widths.
    pub fn config(&self) -> IfBlockConfig {
        self.config
    }

    fn approx_bytes(&self) -> u64 {
        let tensor = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.conv0
            .iter()
            .chain(&self.convblock)
            .map(FusedConv2d::approx_bytes)
            .sum::<u64>()
            + tensor(&self.lastconv_weight)
            + tensor(&self.lastconv_bias)
    }

    /// Flow `[n, 4, h, w]` and mask `[n, 1, h, w]` at full resolution from `x` (and the
    /// previous flow), working at `1 / scale` resolution.
    ///
    /// # Errors
    /// Shape or device errors.
    pub fn forward(
        &self,
        x: &Tensor,
        flow: Option<&Tensor>,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let resize = |t: &Tensor, factor: f64| -> candle_core::Result<Tensor> {
            if factor == 1.0 {
                Ok(t.clone())
            } else {
                t.upsample_bilinear2d_with_scale(factor, factor, false)
            }
        };
        let mut x = resize(x, 1.0 / scale)?;
        if let Some(flow) = flow {
            let flow = resize(flow, 1.0 / scale)?.affine(1.0 / scale, 0.0)?;
            x = Tensor::cat(&[&x, &flow], 1)?;
        }
        let mut feat = self.conv0[1].forward(&self.conv0[0].forward(&x)?)?;
        let skip = feat.clone();
        for conv in &self.convblock {
            feat = conv.forward(&feat)?;
        }
        let feat = (feat + skip)?;
        let tmp = feat
            .conv_transpose2d(&self.lastconv_weight, 1, 0, 2, 1)?
            .broadcast_add(&self.lastconv_bias)?;
        let tmp = resize(&tmp, scale * 2.0)?;
        let flow = tmp.narrow(1, 0, 4)?.affine(scale * 2.0, 0.0)?;
        let mask = tmp.narrow(1, 4, 1)?;
        Ok((flow, mask))
    }
}

/// The four-block IFNet.
#[derive(Debug, Clone)]
pub struct IfNet {
    blocks: [IfBlock; 4],
}

impl IfNet {
    /// Builds the network from a RIFE state dict.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for other RIFE generations (e.g. 4.7+ feature encoders),
    /// missing or misshapen tensors.
    pub fn load(weights: &StateDict) -> Result<Self> {
        if let Some(other) = weights.names().find(|n| !n.starts_with("block")) {
            return Err(ModelError::Unsupported {
                path: weights.path().to_path_buf(),
                reason: format!(
                    "tensor {other:?} is not part of the PReLU IFNet layout (block0..block3)"
                ),
            });
        }
        Ok(Self {
            blocks: [
                IfBlock::load(weights, "block0", FIRST_BLOCK_IN)?,
                IfBlock::load(weights, "block1", LATER_BLOCK_IN)?,
                IfBlock::load(weights, "block2", LATER_BLOCK_IN)?,
                IfBlock::load(weights, "block3", LATER_BLOCK_IN)?,
            ],
        })
    }

    /// The four blocks' widths.
    pub fn block_configs(&self) -> [IfBlockConfig; 4] {
        [0, 1, 2, 3].map(|i| self.blocks[i].config())
    }

    /// Bytes held by the weights.
    pub fn approx_bytes(&self) -> u64 {
        self.blocks.iter().map(IfBlock::approx_bytes).sum()
    }

    /// The in-between frame at `timestep` for NCHW frames whose sides are multiples of 32.
    ///
    /// # Errors
    /// Shape or device errors.
    pub fn forward(&self, img0: &Tensor, img1: &Tensor, timestep: f32) -> Result<Tensor> {
        let (n, _, h, w) = img0.dims4()?;
        let timestep = Tensor::full(timestep, (n, 1, h, w), img0.device())?;
        let mut flow: Option<Tensor> = None;
        let mut mask: Option<Tensor> = None;
        let (mut warped0, mut warped1) = (img0.clone(), img1.clone());
        for (block, scale) in self.blocks.iter().zip(BLOCK_SCALES) {
            match (&flow, &mask) {
                (Some(f), Some(m)) => {
                    let x = Tensor::cat(&[&warped0, &warped1, &timestep, m], 1)?;
                    let (df, dm) = block.forward(&x, Some(f), scale)?;
                    flow = Some((f + df)?);
                    mask = Some((m + dm)?);
                }
                _ => {
                    let x = Tensor::cat(&[img0, img1, &timestep], 1)?;
                    let (f, m) = block.forward(&x, None, scale)?;
                    flow = Some(f);
                    mask = Some(m);
                }
            }
            let f = flow.as_ref().expect("set above");
            warped0 = warp(img0, &f.narrow(1, 0, 2)?)?;
            warped1 = warp(img1, &f.narrow(1, 2, 2)?)?;
        }
        let mask = candle_nn::ops::sigmoid(mask.as_ref().expect("four blocks ran"))?;
        let blended =
            (warped0.broadcast_mul(&mask)? + warped1.broadcast_mul(&mask.affine(-1.0, 1.0)?)?)?;
        Ok(blended)
    }
}
