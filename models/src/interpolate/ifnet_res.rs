//! The ResConv IFNet of Practical-RIFE's later releases: RIFE 4.6 and RIFE 4.25/4.26.
//!
//! Both generations build every IFBlock the same way: two stride-2 convs with LeakyReLU
//! 0.2 (`conv0`), a stack of residual convs `relu(conv(x) * beta + x)` (`convblock`), and a
//! 4x4 stride-2 ConvTranspose followed by `PixelShuffle(2)` (`lastconv`), so a block at
//! scale `s` works at `1 / (4 s)` resolution and answers at `1 / s`. Its outputs are 4 flow
//! channels, 1 mask channel and, from 4.25 on, a few feature channels handed to the next
//! block.
//!
//! They differ at the network level:
//! - **4.6**: four blocks at scales 8, 4, 2, 1; inputs are the (warped) frames and the
//!   timestep; the mask is accumulated over blocks.
//! - **4.25/4.26**: a feature encoder (`encode`: conv 3->h stride 2, two convs h->h, each
//!   with LeakyReLU, then a ConvTranspose back to full resolution with `head` channels)
//!   runs on both frames; its features (warped by the current flow after block 0) and the
//!   previous block's feature channels join every block's input; five blocks at scales 16,
//!   8, 4, 2, 1; each block's mask replaces the previous one.
//!
//! Keys (`module.` stripped): `block{i}.conv0.{0,1}.0.{weight,bias}`,
//! `block{i}.convblock.{j}.{conv.weight,conv.bias,beta}`, `block{i}.lastconv.0.{weight,bias}`,
//! `encode.cnn{0..3}.{weight,bias}`. All widths (encoder width and output channels, block
//! widths, convblock depth, lastconv outputs) are read from the weights, so the lite and
//! heavy variants and sakuga's demo weights load with the same code.

use candle_core::{Module, Tensor};

use super::warp::warp;
use crate::conv::{Activation, FusedConv2d};
use crate::upscale::StateDict;
use crate::{ModelError, Result};

/// LeakyReLU slope used throughout the ResConv IFNet.
const LEAKY_SLOPE: f32 = 0.2;
/// Block scales of RIFE 4.6 at RIFE's default `scale = 1.0`.
pub const SCALES_V46: [f64; 4] = [8.0, 4.0, 2.0, 1.0];
/// Block scales of RIFE 4.25/4.26 at RIFE's default `scale = 1.0`.
pub const SCALES_V425: [f64; 5] = [16.0, 8.0, 4.0, 2.0, 1.0];
/// Flow (4) and mask (1) channels at the front of every block's output.
const FLOW_AND_MASK: usize = 5;

/// Which generation's network-level wiring to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// RIFE 4.6: four blocks, no feature encoder, accumulated mask.
    V46,
    /// RIFE 4.25/4.26: feature encoder, five blocks, features passed between blocks.
    V425,
}

impl Generation {
    /// The coarse-to-fine block scales.
    pub fn scales(self) -> &'static [f64] {
        match self {
            Generation::V46 => &SCALES_V46,
            Generation::V425 => &SCALES_V425,
        }
    }
}

fn unsupported(weights: &StateDict, reason: String) -> ModelError {
    ModelError::Unsupported {
        path: weights.path().to_path_buf(),
        reason,
    }
}

fn conv(
    weights: &StateDict,
    prefix: &str,
    shape: [usize; 4],
    stride: usize,
    activation: Activation,
) -> Result<FusedConv2d> {
    let weight = weights.get_shaped(&format!("{prefix}.weight"), &shape)?;
    let bias = weights.get_shaped(&format!("{prefix}.bias"), &shape[..1])?;
    Ok(FusedConv2d::try_new(
        weight,
        Some(bias),
        1,
        stride,
        activation,
    )?)
}

/// A 4x4 stride-2 pad-1 ConvTranspose (weight `[c_in, c_out, 4, 4]`).
#[derive(Debug, Clone)]
struct UpConv {
    weight: Tensor,
    bias: Tensor,
}

impl UpConv {
    fn load(weights: &StateDict, prefix: &str, c_in: usize) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let dims = weights.dims_of_rank(&name, 4)?;
        let c_out = dims[1];
        let weight = weights.get_shaped(&name, &[c_in, c_out, 4, 4])?;
        let bias = weights
            .get_shaped(&format!("{prefix}.bias"), &[c_out])?
            .reshape((1, c_out, 1, 1))?;
        Ok(Self { weight, bias })
    }

    fn out_channels(&self) -> usize {
        self.weight.dims()[1]
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.conv_transpose2d(&self.weight, 1, 0, 2, 1)?
            .broadcast_add(&self.bias)
    }

    fn approx_bytes(&self) -> u64 {
        tensor_bytes(&self.weight) + tensor_bytes(&self.bias)
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn leaky(xs: &Tensor) -> candle_core::Result<Tensor> {
    xs.maximum(&xs.affine(f64::from(LEAKY_SLOPE), 0.0)?)
}

/// `F.interpolate(scale_factor=factor, mode="bilinear", align_corners=False)`.
fn resize(xs: &Tensor, factor: f64) -> candle_core::Result<Tensor> {
    if factor == 1.0 {
        Ok(xs.clone())
    } else {
        xs.upsample_bilinear2d_with_scale(factor, factor, false)
    }
}

/// `nn.PixelShuffle(2)`: `[n, 4c, h, w]` to `[n, c, 2h, 2w]`.
fn pixel_shuffle2(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c4, h, w) = xs.dims4()?;
    let c = c4 / 4;
    xs.reshape((n, c, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((n, c, h * 2, w * 2))
}

/// Widths of the feature encoder, as read from the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Width of its three convs (16 in 4.25/4.26).
    pub hidden: usize,
    /// Feature channels per frame (4 in 4.25/4.26, 16 in 4.26 heavy).
    pub out: usize,
}

/// The feature encoder `encode` of RIFE 4.25/4.26.
#[derive(Debug, Clone)]
pub struct Encoder {
    config: EncoderConfig,
    convs: [FusedConv2d; 3],
    up: UpConv,
}

impl Encoder {
    /// Reads `encode.*`, detecting its widths.
    ///
    /// # Errors
    /// Missing or misshapen tensors.
    pub fn load(weights: &StateDict) -> Result<Self> {
        let first = weights.dims_of_rank("encode.cnn0.weight", 4)?;
        let hidden = first[0];
        let act = || Activation::LeakyRelu(LEAKY_SLOPE);
        let convs = [
            conv(weights, "encode.cnn0", [hidden, 3, 3, 3], 2, act())?,
            conv(weights, "encode.cnn1", [hidden, hidden, 3, 3], 1, act())?,
            conv(weights, "encode.cnn2", [hidden, hidden, 3, 3], 1, act())?,
        ];
        let up = UpConv::load(weights, "encode.cnn3", hidden)?;
        let config = EncoderConfig {
            hidden,
            out: up.out_channels(),
        };
        Ok(Self { config, convs, up })
    }

    /// The detected widths.
    pub fn config(&self) -> EncoderConfig {
        self.config
    }

    fn forward(&self, frame: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = frame.clone();
        for conv in &self.convs {
            xs = conv.forward(&xs)?;
        }
        self.up.forward(&xs)
    }

    fn approx_bytes(&self) -> u64 {
        self.convs
            .iter()
            .map(FusedConv2d::approx_bytes)
            .sum::<u64>()
            + self.up.approx_bytes()
    }
}

/// Widths of one ResConv IFBlock, as read from the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResBlockConfig {
    /// Input channels of `conv0` (flow channels included).
    pub in_channels: usize,
    /// Width of the block.
    pub channels: usize,
    /// ResConvs in `convblock`.
    pub depth: usize,
    /// Channels after the PixelShuffle: flow 4 + mask 1 + features.
    pub outputs: usize,
}

/// One ResConv IFBlock.
#[derive(Debug, Clone)]
pub struct ResBlock {
    config: ResBlockConfig,
    conv0: [FusedConv2d; 2],
    /// The residual convs with `beta` folded into their weights and biases.
    convblock: Vec<FusedConv2d>,
    lastconv: UpConv,
}

/// `conv(x) * beta` as one convolution: beta scales each output channel.
fn resconv(weights: &StateDict, prefix: &str, c: usize) -> Result<FusedConv2d> {
    let beta = weights
        .get_shaped(&format!("{prefix}.beta"), &[1, c, 1, 1])?
        .reshape(c)?;
    let weight = weights.get_shaped(&format!("{prefix}.conv.weight"), &[c, c, 3, 3])?;
    let bias = weights.get_shaped(&format!("{prefix}.conv.bias"), &[c])?;
    let weight = weight.broadcast_mul(&beta.reshape((c, 1, 1, 1))?)?;
    let bias = (bias * &beta)?;
    Ok(FusedConv2d::try_new(
        weight,
        Some(bias),
        1,
        1,
        Activation::Identity,
    )?)
}

impl ResBlock {
    /// Reads block `prefix` (e.g. `block0`), detecting its widths.
    ///
    /// # Errors
    /// Missing or misshapen tensors, an input width other than `in_channels`, or a
    /// `lastconv` whose outputs are not flow + mask (+ features) after the PixelShuffle.
    pub fn load(weights: &StateDict, prefix: &str, in_channels: usize) -> Result<Self> {
        let first = weights.dims_of_rank(&format!("{prefix}.conv0.0.0.weight"), 4)?;
        if first[1] != in_channels {
            return Err(unsupported(
                weights,
                format!(
                    "{prefix}.conv0.0.0.weight takes {} input channels; this RIFE layout \
                     needs {in_channels} there",
                    first[1]
                ),
            ));
        }
        let half = first[0];
        let channels = weights.dims_of_rank(&format!("{prefix}.conv0.1.0.weight"), 4)?[0];
        let act = || Activation::LeakyRelu(LEAKY_SLOPE);
        let conv0 = [
            conv(
                weights,
                &format!("{prefix}.conv0.0.0"),
                [half, in_channels, 3, 3],
                2,
                act(),
            )?,
            conv(
                weights,
                &format!("{prefix}.conv0.1.0"),
                [channels, half, 3, 3],
                2,
                act(),
            )?,
        ];
        let depth = (0..)
            .take_while(|j| weights.contains(&format!("{prefix}.convblock.{j}.conv.weight")))
            .count()
            .max(1);
        let convblock = (0..depth)
            .map(|j| resconv(weights, &format!("{prefix}.convblock.{j}"), channels))
            .collect::<Result<Vec<_>>>()?;
        let lastconv = UpConv::load(weights, &format!("{prefix}.lastconv.0"), channels)?;
        let shuffled = lastconv.out_channels();
        if shuffled % 4 != 0 || shuffled / 4 < FLOW_AND_MASK {
            return Err(unsupported(
                weights,
                format!(
                    "{prefix}.lastconv.0 has {shuffled} outputs; RIFE's PixelShuffle(2) head \
                     needs a multiple of 4 covering flow 4 + mask 1 channels"
                ),
            ));
        }
        let config = ResBlockConfig {
            in_channels,
            channels,
            depth,
            outputs: shuffled / 4,
        };
        Ok(Self {
            config,
            conv0,
            convblock,
            lastconv,
        })
    }

    /// The detected widths.
    pub fn config(&self) -> ResBlockConfig {
        self.config
    }

    fn approx_bytes(&self) -> u64 {
        self.conv0
            .iter()
            .chain(&self.convblock)
            .map(FusedConv2d::approx_bytes)
            .sum::<u64>()
            + self.lastconv.approx_bytes()
    }

    /// Flow `[n, 4, h, w]`, mask `[n, 1, h, w]` and features `[n, outputs - 5, h, w]` at
    /// full resolution from `x` (and the previous flow), working at `1 / scale`.
    ///
    /// # Errors
    /// Shape or device errors.
    pub fn forward(
        &self,
        x: &Tensor,
        flow: Option<&Tensor>,
        scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut x = resize(x, 1.0 / scale)?;
        if let Some(flow) = flow {
            let flow = resize(flow, 1.0 / scale)?.affine(1.0 / scale, 0.0)?;
            x = Tensor::cat(&[&x, &flow], 1)?;
        }
        let mut feat = self.conv0[1].forward(&self.conv0[0].forward(&x)?)?;
        for conv in &self.convblock {
            feat = leaky(&(conv.forward(&feat)? + &feat)?)?;
        }
        let tmp = pixel_shuffle2(&self.lastconv.forward(&feat)?)?;
        let tmp = resize(&tmp, scale)?;
        let flow = tmp.narrow(1, 0, 4)?.affine(scale, 0.0)?;
        let mask = tmp.narrow(1, 4, 1)?;
        let features = tmp.narrow(1, FLOW_AND_MASK, self.config.outputs - FLOW_AND_MASK)?;
        Ok((flow, mask, features))
    }
}

/// The ResConv IFNet of RIFE 4.6 or 4.25/4.26.
#[derive(Debug, Clone)]
pub struct ResIfNet {
    generation: Generation,
    encoder: Option<Encoder>,
    blocks: Vec<ResBlock>,
}

impl ResIfNet {
    /// Builds `generation`'s network from a state dict whose layout was already detected
    /// (see [`super::RifeArch::detect`]).
    ///
    /// # Errors
    /// Missing or misshapen tensors, or block input widths that do not chain.
    pub fn load(weights: &StateDict, generation: Generation) -> Result<Self> {
        let encoder = match generation {
            Generation::V46 => None,
            Generation::V425 => Some(Encoder::load(weights)?),
        };
        let head = encoder.as_ref().map_or(0, |e| e.config().out);
        // Block 0 sees both frames, both frames' features and the timestep; later blocks
        // see both warped frames and features, timestep, mask, the previous block's
        // feature channels and (appended inside the block) the 4 flow channels.
        let mut blocks: Vec<ResBlock> = Vec::new();
        for i in 0..generation.scales().len() {
            let in_channels = match blocks.last() {
                None => 7 + 2 * head,
                Some(prev) => {
                    let passed = match generation {
                        Generation::V46 => 0,
                        Generation::V425 => prev.config().outputs - FLOW_AND_MASK,
                    };
                    6 + 2 * head + 2 + passed + 4
                }
            };
            blocks.push(ResBlock::load(weights, &format!("block{i}"), in_channels)?);
        }
        Ok(Self {
            generation,
            encoder,
            blocks,
        })
    }

    /// Which wiring this network runs.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The encoder's widths (4.25/4.26 only).
    pub fn encoder_config(&self) -> Option<EncoderConfig> {
        self.encoder.as_ref().map(Encoder::config)
    }

    /// The blocks' widths.
    pub fn block_configs(&self) -> Vec<ResBlockConfig> {
        self.blocks.iter().map(ResBlock::config).collect()
    }

    /// Bytes held by the weights.
    pub fn approx_bytes(&self) -> u64 {
        self.blocks.iter().map(ResBlock::approx_bytes).sum::<u64>()
            + self.encoder.as_ref().map_or(0, Encoder::approx_bytes)
    }

    /// The in-between frame at `timestep` for NCHW frames whose sides are multiples of
    /// 64 (4.25/4.26) or 32 (4.6).
    ///
    /// # Errors
    /// Shape or device errors.
    pub fn forward(&self, img0: &Tensor, img1: &Tensor, timestep: f32) -> Result<Tensor> {
        let (n, _, h, w) = img0.dims4()?;
        let timestep = Tensor::full(timestep, (n, 1, h, w), img0.device())?;
        let features = match &self.encoder {
            Some(encoder) => Some((encoder.forward(img0)?, encoder.forward(img1)?)),
            None => None,
        };
        let mut state: Option<(Tensor, Tensor, Tensor)> = None;
        let (mut warped0, mut warped1) = (img0.clone(), img1.clone());
        for (block, &scale) in self.blocks.iter().zip(self.generation.scales()) {
            let (flow, mask, feat) = match &state {
                None => {
                    let mut x = vec![img0.clone(), img1.clone()];
                    if let Some((f0, f1)) = &features {
                        x.extend([f0.clone(), f1.clone()]);
                    }
                    x.push(timestep.clone());
                    block.forward(&Tensor::cat(&x, 1)?, None, scale)?
                }
                Some((flow, mask, feat)) => {
                    let mut x = vec![warped0.clone(), warped1.clone()];
                    if let Some((f0, f1)) = &features {
                        x.push(warp(f0, &flow.narrow(1, 0, 2)?)?);
                        x.push(warp(f1, &flow.narrow(1, 2, 2)?)?);
                    }
                    x.extend([timestep.clone(), mask.clone()]);
                    if self.generation == Generation::V425 {
                        x.push(feat.clone());
                    }
                    let (delta, new_mask, new_feat) =
                        block.forward(&Tensor::cat(&x, 1)?, Some(flow), scale)?;
                    let mask = match self.generation {
                        Generation::V46 => (mask + new_mask)?,
                        Generation::V425 => new_mask,
                    };
                    ((flow + delta)?, mask, new_feat)
                }
            };
            warped0 = warp(img0, &flow.narrow(1, 0, 2)?)?;
            warped1 = warp(img1, &flow.narrow(1, 2, 2)?)?;
            state = Some((flow, mask, feat));
        }
        let (_, mask, _) = state.expect("every generation has blocks");
        let mask = candle_nn::ops::sigmoid(&mask)?;
        let blended =
            (warped0.broadcast_mul(&mask)? + warped1.broadcast_mul(&mask.affine(-1.0, 1.0)?)?)?;
        Ok(blended)
    }
}
