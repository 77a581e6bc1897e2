//! The denoising UNet of SD 1.x, 2.x and SDXL, assembled from candle's building blocks.
//!
//! candle's own `UNet2DConditionModel` has no class embedding, which SDXL needs: its time
//! embedding is summed with an embedding of `y`, the pooled text embedding and the
//! size/crop conditioning (LDM's `label_emb`, diffusers' `add_embedding`). This module
//! wires the same down, middle and up blocks (diffusers names, so the key map and LoRAs
//! apply unchanged) with that embedding added.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, DownBlock2DConfig, UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig,
    UpBlock2D, UpBlock2DConfig,
};

use super::config::UnetConfig;

const NORM_EPS: f64 = 1e-5;

#[derive(Debug)]
enum DownBlocks {
    Plain(DownBlock2D),
    Attention(CrossAttnDownBlock2D),
}

/// One level of the encoder: its resnets (with attention or not), then its downsampler,
/// kept apart so a T2I adapter's features can be added between the two, as ComfyUI adds
/// them after each of its input blocks.
#[derive(Debug)]
struct DownLevel {
    blocks: DownBlocks,
    downsampler: Option<Conv2d>,
}

#[derive(Debug)]
enum UpLevel {
    Plain(UpBlock2D),
    Attention(CrossAttnUpBlock2D),
}

impl UpLevel {
    fn resnets(&self) -> usize {
        match self {
            UpLevel::Plain(b) => b.resnets.len(),
            UpLevel::Attention(b) => b.upblock.resnets.len(),
        }
    }
}

/// What ControlNets and T2I adapters add to the UNet they guide: a ControlNet one
/// residual per skip connection, in the order the encoder makes them (empty for an
/// adapter); an adapter features added to the running activations after some input blocks
/// (ComfyUI's block numbering: 0 the input convolution, then each resnet and each
/// downsampler in order); both may add to the middle block's output.
#[derive(Debug, Clone, Default)]
pub struct ControlResiduals {
    pub skips: Vec<Tensor>,
    pub after_blocks: Vec<(usize, Tensor)>,
    pub middle: Option<Tensor>,
}

impl ControlResiduals {
    /// These residuals plus `other`'s (controls chained on one prompt add up).
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn plus(self, other: &ControlResiduals) -> candle_core::Result<Self> {
        let skips = match (self.skips.is_empty(), other.skips.is_empty()) {
            (_, true) => self.skips,
            (true, false) => other.skips.clone(),
            (false, false) => self
                .skips
                .into_iter()
                .zip(&other.skips)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
        };
        let mut after_blocks = self.after_blocks;
        for (block, feature) in &other.after_blocks {
            match after_blocks.iter_mut().find(|(b, _)| b == block) {
                Some((_, mine)) => *mine = (&*mine + feature)?,
                None => after_blocks.push((*block, feature.clone())),
            }
        }
        let middle = match (self.middle, &other.middle) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or_else(|| b.clone()),
        };
        Ok(Self {
            skips,
            after_blocks,
            middle,
        })
    }

    /// The same residuals on `device` in `dtype`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn moved(
        &self,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> candle_core::Result<Self> {
        let moved = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        Ok(Self {
            skips: self
                .skips
                .iter()
                .map(moved)
                .collect::<candle_core::Result<_>>()?,
            after_blocks: self
                .after_blocks
                .iter()
                .map(|(b, t)| Ok((*b, moved(t)?)))
                .collect::<candle_core::Result<_>>()?,
            middle: self.middle.as_ref().map(moved).transpose()?,
        })
    }

    /// `xs` plus the feature for `block`. A feature of another size (a latent whose size
    /// the adapter's levels do not divide) is left out with a warning, as ComfyUI does.
    fn add_after(&self, block: usize, xs: Tensor) -> candle_core::Result<Tensor> {
        match self.after_blocks.iter().find(|(b, _)| *b == block) {
            Some((_, feature)) if feature.dims()[1..] == xs.dims()[1..] => {
                xs.broadcast_add(feature)
            }
            Some((_, feature)) => {
                tracing::warn!(
                    block,
                    feature = ?feature.dims(),
                    activations = ?xs.dims(),
                    "T2I adapter feature does not fit this input block; left out"
                );
                Ok(xs)
            }
            None => Ok(xs),
        }
    }
}

const DOWNSAMPLE: candle_nn::Conv2dConfig = candle_nn::Conv2dConfig {
    padding: 1,
    stride: 2,
    dilation: 1,
    groups: 1,
    cudnn_fwd_algo: None,
};

/// The UNet's first half, shared with the ControlNet, which is a trainable copy of it: the
/// time (and class) embedding, the input convolution, the down levels and the middle block.
#[derive(Debug)]
pub(crate) struct UnetEncoder {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    /// SDXL's embedding of `y`, added to the time embedding.
    class_embedding: Option<TimestepEmbedding>,
    down: Vec<DownLevel>,
    mid: UNetMidBlock2DCrossAttn,
}

/// The UNet: `eps` (or `v`) for a noisy latent at a timestep, given the text context and,
/// for SDXL, the class vector `y`.
#[derive(Debug)]
pub struct Unet {
    encoder: UnetEncoder,
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

pub(crate) const PADDED: candle_nn::Conv2dConfig = candle_nn::Conv2dConfig {
    padding: 1,
    stride: 1,
    dilation: 1,
    groups: 1,
    cudnn_fwd_algo: None,
};

impl UnetEncoder {
    pub(crate) fn new(vb: &VarBuilder<'_>, config: &UnetConfig) -> candle_core::Result<Self> {
        let levels = &config.levels;
        let n = levels.len();
        let base = levels[0].channels;
        let time_dim = base * 4;
        let padded = PADDED;
        let conv_in = candle_nn::conv2d(config.in_channels, base, 3, padded, vb.pp("conv_in"))?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), base, time_dim)?;
        let class_embedding = config
            .adm_in_channels
            .map(|adm| TimestepEmbedding::new(vb.pp("add_embedding"), adm, time_dim))
            .transpose()?;
        let mut down = Vec::with_capacity(n);
        for (i, level) in levels.iter().enumerate() {
            let in_channels = if i == 0 { base } else { levels[i - 1].channels };
            let plain = DownBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: NORM_EPS,
                resnet_groups: config.norm_num_groups,
                add_downsample: false,
                downsample_padding: 1,
                ..Default::default()
            };
            let vb = vb.pp(format!("down_blocks.{i}"));
            let downsampler = (i + 1 < n)
                .then(|| {
                    candle_nn::conv2d(
                        level.channels,
                        level.channels,
                        3,
                        DOWNSAMPLE,
                        vb.pp("downsamplers.0.conv"),
                    )
                })
                .transpose()?;
            let blocks = match level.transformer_depth {
                Some(depth) => DownBlocks::Attention(CrossAttnDownBlock2D::new(
                    vb,
                    in_channels,
                    level.channels,
                    Some(time_dim),
                    false,
                    CrossAttnDownBlock2DConfig {
                        downblock: plain,
                        attn_num_head_channels: level.heads,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block: depth,
                    },
                )?),
                None => DownBlocks::Plain(DownBlock2D::new(
                    vb,
                    in_channels,
                    level.channels,
                    Some(time_dim),
                    plain,
                )?),
            };
            down.push(DownLevel {
                blocks,
                downsampler,
            });
        }
        let last = levels[n - 1];
        let mid = UNetMidBlock2DCrossAttn::new(
            vb.pp("mid_block"),
            last.channels,
            Some(time_dim),
            false,
            UNetMidBlock2DCrossAttnConfig {
                resnet_eps: NORM_EPS,
                resnet_groups: Some(config.norm_num_groups),
                attn_num_head_channels: last.heads,
                cross_attn_dim: config.cross_attention_dim,
                use_linear_projection: config.use_linear_projection,
                transformer_layers_per_block: config
                    .mid_transformer_depth
                    .or(last.transformer_depth)
                    .unwrap_or(1),
                ..Default::default()
            },
        )?;
        Ok(Self {
            conv_in,
            time_proj: Timesteps::new(base, true, 0.0),
            time_embedding,
            class_embedding,
            down,
            mid,
        })
    }

    /// The time embedding, plus the class embedding of `y` where the model has one.
    pub(crate) fn embed(
        &self,
        batch: usize,
        timestep: f64,
        y: Option<&Tensor>,
        like: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let t = Tensor::full(timestep as f32, batch, like.device())?.to_dtype(like.dtype())?;
        let emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        match (&self.class_embedding, y) {
            (Some(embed), Some(y)) => {
                let class = embed.forward(&y.to_dtype(emb.dtype())?)?;
                emb + class
            }
            (Some(_), None) => candle_core::bail!("this UNet needs its class vector y (SDXL)"),
            (None, _) => Ok(emb),
        }
    }

    /// The middle block's output and every skip connection, in order; `hint` is added to
    /// the input convolution's output (a ControlNet's guided hint), `control`'s features
    /// after the input blocks they name (a T2I adapter's).
    pub(crate) fn forward(
        &self,
        latents: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        hint: Option<&Tensor>,
        control: Option<&ControlResiduals>,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let none = ControlResiduals::default();
        let control = control.unwrap_or(&none);
        let mut xs = self.conv_in.forward(latents)?;
        if let Some(hint) = hint {
            xs = xs.broadcast_add(hint)?;
        }
        xs = control.add_after(0, xs)?;
        let mut skips = vec![xs.clone()];
        for level in &self.down {
            let (out, residuals) = match &level.blocks {
                DownBlocks::Plain(b) => b.forward(&xs, Some(emb))?,
                DownBlocks::Attention(b) => b.forward(&xs, Some(emb), Some(context))?,
            };
            // Without a downsampler the blocks' last residual is their output.
            let last = skips.len() + residuals.len() - 1;
            skips.extend(residuals);
            xs = control.add_after(last, out)?;
            skips[last] = xs.clone();
            if let Some(down) = &level.downsampler {
                xs = control.add_after(skips.len(), down.forward(&xs)?)?;
                skips.push(xs.clone());
            }
        }
        let mid = self.mid.forward(&xs, Some(emb), Some(context))?;
        Ok((mid, skips))
    }

    /// The number of input blocks in ComfyUI's numbering (input convolution, resnets,
    /// downsamplers).
    pub(crate) fn input_blocks(&self) -> usize {
        1 + self
            .down
            .iter()
            .map(|level| {
                let resnets = match &level.blocks {
                    DownBlocks::Plain(b) => b.config.num_layers,
                    DownBlocks::Attention(b) => b.config.downblock.num_layers,
                };
                resnets + usize::from(level.downsampler.is_some())
            })
            .sum::<usize>()
    }

    pub(crate) fn takes_y(&self) -> bool {
        self.class_embedding.is_some()
    }
}

impl Unet {
    /// Builds the UNet of `config` from `vb` (diffusers names).
    ///
    /// # Errors
    /// When a weight is missing or misshapen.
    pub fn new(vb: VarBuilder<'_>, config: &UnetConfig) -> candle_core::Result<Self> {
        let encoder = UnetEncoder::new(&vb, config)?;
        let levels = &config.levels;
        let n = levels.len();
        let base = levels[0].channels;
        let time_dim = base * 4;
        let last = levels[n - 1];
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = levels[n - 1 - i];
            let previous = if i == 0 {
                last.channels
            } else {
                levels[n - i].channels
            };
            // The skip connection of this level's last resnet comes from the level below.
            let skip = levels[(n - 1 - i).saturating_sub(1)].channels;
            let plain = UpBlock2DConfig {
                num_layers: config.layers_per_block + 1,
                resnet_eps: NORM_EPS,
                resnet_groups: config.norm_num_groups,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            let vb = vb.pp(format!("up_blocks.{i}"));
            up.push(match level.transformer_depth {
                Some(depth) => UpLevel::Attention(CrossAttnUpBlock2D::new(
                    vb,
                    skip,
                    previous,
                    level.channels,
                    Some(time_dim),
                    false,
                    CrossAttnUpBlock2DConfig {
                        upblock: plain,
                        attn_num_head_channels: level.heads,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size: None,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block: depth,
                    },
                )?),
                None => UpLevel::Plain(UpBlock2D::new(
                    vb,
                    skip,
                    previous,
                    level.channels,
                    Some(time_dim),
                    plain,
                )?),
            });
        }
        Ok(Self {
            encoder,
            up,
            norm_out: candle_nn::group_norm(
                config.norm_num_groups,
                base,
                NORM_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: candle_nn::conv2d(base, config.out_channels, 3, PADDED, vb.pp("conv_out"))?,
        })
    }

    /// Whether the model takes a class vector `y` (SDXL).
    pub fn takes_y(&self) -> bool {
        self.encoder.takes_y()
    }

    /// The model output for `latents` `[b, c, h, w]` at `timestep`, with `context`
    /// `[b, tokens, width]`, for SDXL the class vector `y` `[b, adm]`, and a ControlNet's
    /// residuals added to the skip connections and the middle block's output.
    ///
    /// # Errors
    /// Shape mismatches, or a missing `y` on a model that needs one.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        y: Option<&Tensor>,
        control: Option<&ControlResiduals>,
    ) -> candle_core::Result<Tensor> {
        let (batch, _, height, width) = latents.dims4()?;
        let emb = self.encoder.embed(batch, timestep, y, latents)?;
        let (mut xs, mut skips) = self
            .encoder
            .forward(latents, &emb, context, None, control)?;
        if let Some(control) = control {
            let blocks = self.encoder.input_blocks();
            if let Some((block, _)) = control.after_blocks.iter().find(|(b, _)| *b >= blocks) {
                candle_core::bail!(
                    "the T2I adapter adds features after input block {block}; this UNet has \
                     {blocks} input blocks (an adapter for another model layout)"
                );
            }
            if !control.skips.is_empty() && control.skips.len() != skips.len() {
                candle_core::bail!(
                    "the ControlNet makes {} skip residuals where this UNet has {}",
                    control.skips.len(),
                    skips.len()
                );
            }
            for (skip, residual) in skips.iter_mut().zip(&control.skips) {
                *skip = (&*skip + residual)?;
            }
            if let Some(middle) = &control.middle {
                xs = (xs + middle)?;
            }
        }
        // Sizes that do not halve evenly upsample to the skip connection's size.
        let factor = 1usize << (self.encoder.down.len() - 1);
        let uneven = height % factor != 0 || width % factor != 0;
        for (i, level) in self.up.iter().enumerate() {
            let residuals = skips.split_off(skips.len() - level.resnets());
            let upsample_size = if uneven && i + 1 < self.up.len() {
                let (_, _, h, w) = skips.last().expect("a skip per level").dims4()?;
                Some((h, w))
            } else {
                None
            };
            xs = match level {
                UpLevel::Plain(b) => b.forward(&xs, &residuals, Some(&emb), upsample_size)?,
                UpLevel::Attention(b) => {
                    b.forward(&xs, &residuals, Some(&emb), upsample_size, Some(context))?
                }
            };
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}
