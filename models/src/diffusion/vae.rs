//! The KL autoencoder: images to latents and back, tiled when memory is short.
//!
//! Assembled from candle-transformers' public UNet blocks rather than its `AutoEncoderKL`,
//! whose encoder only returns a distribution sampled with candle's unseeded RNG; img2img
//! needs the distribution's mean so a seed reproduces. Weight names are diffusers'
//! (`encoder.down_blocks.0.resnets.0.conv1.weight`); LDM files go through the renaming
//! backend.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
    UpDecoderBlock2D, UpDecoderBlock2DConfig,
};

use super::config::VaeConfig;
use crate::error::{ModelError, Result};

fn mid_config(config: &VaeConfig) -> UNetMidBlock2DConfig {
    UNetMidBlock2DConfig {
        resnet_eps: 1e-6,
        output_scale_factor: 1.0,
        attn_num_head_channels: None,
        resnet_groups: Some(config.norm_num_groups),
        ..Default::default()
    }
}

fn conv3(
    in_channels: usize,
    out_channels: usize,
    vb: VarBuilder<'_>,
) -> candle_core::Result<candle_nn::Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(in_channels, out_channels, 3, cfg, vb)
}

#[derive(Debug)]
struct Encoder {
    conv_in: candle_nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
}

#[derive(Debug)]
struct Decoder {
    conv_in: candle_nn::Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
}

/// The SD autoencoder with its latent scaling.
#[derive(Debug)]
pub struct VaeModel {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: candle_nn::Conv2d,
    post_quant_conv: candle_nn::Conv2d,
    config: VaeConfig,
    device: Device,
    dtype: DType,
}

impl VaeModel {
    /// Builds the autoencoder from `vb` (diffusers names).
    ///
    /// # Errors
    /// When a weight is missing or misshapen.
    pub fn new(vb: VarBuilder<'_>, config: &VaeConfig) -> candle_core::Result<Self> {
        let channels = &config.block_out_channels;
        let levels = channels.len();
        let latent = config.latent_channels;
        let last = channels[levels - 1];

        let vb_enc = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(levels);
        for (index, &out) in channels.iter().enumerate() {
            let input = if index > 0 {
                channels[index - 1]
            } else {
                channels[0]
            };
            let cfg = DownEncoderBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: config.norm_num_groups,
                add_downsample: index + 1 < levels,
                downsample_padding: 0,
                ..Default::default()
            };
            down_blocks.push(DownEncoderBlock2D::new(
                vb_enc.pp(format!("down_blocks.{index}")),
                input,
                out,
                cfg,
            )?);
        }
        let encoder = Encoder {
            conv_in: conv3(3, channels[0], vb_enc.pp("conv_in"))?,
            down_blocks,
            mid_block: UNetMidBlock2D::new(vb_enc.pp("mid_block"), last, None, mid_config(config))?,
            conv_norm_out: candle_nn::group_norm(
                config.norm_num_groups,
                last,
                1e-6,
                vb_enc.pp("conv_norm_out"),
            )?,
            conv_out: conv3(last, 2 * latent, vb_enc.pp("conv_out"))?,
        };

        let vb_dec = vb.pp("decoder");
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        for (index, &out) in reversed.iter().enumerate() {
            let input = if index > 0 {
                reversed[index - 1]
            } else {
                reversed[0]
            };
            let cfg = UpDecoderBlock2DConfig {
                num_layers: config.layers_per_block + 1,
                resnet_eps: 1e-6,
                resnet_groups: config.norm_num_groups,
                add_upsample: index + 1 < levels,
                ..Default::default()
            };
            up_blocks.push(UpDecoderBlock2D::new(
                vb_dec.pp(format!("up_blocks.{index}")),
                input,
                out,
                cfg,
            )?);
        }
        let decoder = Decoder {
            conv_in: conv3(latent, last, vb_dec.pp("conv_in"))?,
            mid_block: UNetMidBlock2D::new(vb_dec.pp("mid_block"), last, None, mid_config(config))?,
            up_blocks,
            conv_norm_out: candle_nn::group_norm(
                config.norm_num_groups,
                channels[0],
                1e-6,
                vb_dec.pp("conv_norm_out"),
            )?,
            conv_out: conv3(channels[0], 3, vb_dec.pp("conv_out"))?,
        };
        let one = candle_nn::Conv2dConfig::default();
        Ok(Self {
            encoder,
            decoder,
            quant_conv: candle_nn::conv2d(2 * latent, 2 * latent, 1, one, vb.pp("quant_conv"))?,
            post_quant_conv: candle_nn::conv2d(latent, latent, 1, one, vb.pp("post_quant_conv"))?,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Pixels per latent cell along one side.
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor()
    }

    /// Latents (the VAE's own scale, f32, `[B, 4, H/8, W/8]`) of images in `[0, 1]` (`[B, 3, H, W]`),
    /// using the mean of the posterior so the result is deterministic.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] when the size is not a multiple of the downscale
    /// factor; tensor errors.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        self.encode_with(images, &crate::never_stop)
    }

    /// [`VaeModel::encode`], asking `proceed` before each encoder block.
    ///
    /// # Errors
    /// As [`VaeModel::encode`], and [`ModelError::Cancelled`] when `proceed` says stop.
    pub fn encode_with(&self, images: &Tensor, proceed: crate::Proceed<'_>) -> Result<Tensor> {
        let (_, channels, height, width) = images.dims4()?;
        let factor = self.downscale_factor();
        if channels != 3 || height % factor != 0 || width % factor != 0 {
            return Err(ModelError::InvalidInput(format!(
                "vae encode needs [B, 3, H, W] with H and W multiples of {factor}, got \
                 {:?}",
                images.dims()
            )));
        }
        let xs = ((images.to_device(&self.device)?.to_dtype(self.dtype)? * 2.0)? - 1.0)?;
        let blocks = self.encoder.down_blocks.len() + 1;
        let mut xs = self.encoder.conv_in.forward(&xs)?;
        for (index, block) in self.encoder.down_blocks.iter().enumerate() {
            crate::check_proceed(proceed, index, blocks)?;
            xs = block.forward(&xs)?;
        }
        crate::check_proceed(proceed, blocks - 1, blocks)?;
        let xs = self.encoder.mid_block.forward(&xs, None)?;
        let xs = candle_nn::ops::silu(&self.encoder.conv_norm_out.forward(&xs)?)?;
        let moments = self
            .quant_conv
            .forward(&self.encoder.conv_out.forward(&xs)?)?;
        let mean = moments.narrow(1, 0, self.config.latent_channels)?;
        Ok(mean.to_dtype(DType::F32)?)
    }

    /// Images in `[0, 1]` (f32, `[B, 3, 8h, 8w]`) of latents `[B, 4, h, w]` (the VAE's own
    /// scale, as ComfyUI's LATENT; the model's latent scale applies inside sampling).
    ///
    /// # Errors
    /// Tensor errors (out of memory: use [`VaeModel::decode_tiled`]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_with(latents, &crate::never_stop)
    }

    /// [`VaeModel::decode`], asking `proceed` before the middle block and each up block.
    ///
    /// # Errors
    /// As [`VaeModel::decode`], and [`ModelError::Cancelled`] when `proceed` says stop.
    pub fn decode_with(&self, latents: &Tensor, proceed: crate::Proceed<'_>) -> Result<Tensor> {
        let blocks = self.decoder.up_blocks.len() + 1;
        crate::check_proceed(proceed, 0, blocks)?;
        let z = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let z = self.post_quant_conv.forward(&z)?;
        let mut xs = self
            .decoder
            .mid_block
            .forward(&self.decoder.conv_in.forward(&z)?, None)?;
        for (index, block) in self.decoder.up_blocks.iter().enumerate() {
            crate::check_proceed(proceed, index + 1, blocks)?;
            xs = block.forward(&xs)?;
        }
        let xs = candle_nn::ops::silu(&self.decoder.conv_norm_out.forward(&xs)?)?;
        let xs = self.decoder.conv_out.forward(&xs)?;
        Ok(((xs.to_dtype(DType::F32)? + 1.0)? * 0.5)?.clamp(0f32, 1f32)?)
    }

    /// [`VaeModel::decode`] in overlapping latent tiles of `tile` cells with `overlap`
    /// cells shared between neighbours, blended linearly, so peak memory follows the tile
    /// and not the image. Inputs no larger than one tile decode in one piece.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] when `overlap >= tile`; tensor errors.
    pub fn decode_tiled(&self, latents: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        self.decode_tiled_with(latents, tile, overlap, &crate::never_stop)
    }

    /// [`VaeModel::decode_tiled`], asking `proceed` before each tile (or, for a latent of
    /// one tile, before each decoder block).
    ///
    /// # Errors
    /// As [`VaeModel::decode_tiled`], and [`ModelError::Cancelled`] when `proceed` says
    /// stop.
    pub fn decode_tiled_with(
        &self,
        latents: &Tensor,
        tile: usize,
        overlap: usize,
        proceed: crate::Proceed<'_>,
    ) -> Result<Tensor> {
        if tile == 0 || overlap >= tile {
            return Err(ModelError::InvalidInput(format!(
                "vae tile {tile} must be larger than its overlap {overlap}"
            )));
        }
        let (batch, _, height, width) = latents.dims4()?;
        if height <= tile && width <= tile {
            return self.decode_with(latents, proceed);
        }
        let factor = self.downscale_factor();
        let starts = |size: usize| -> Vec<usize> {
            if size <= tile {
                return vec![0];
            }
            let stride = tile - overlap;
            let mut starts: Vec<usize> = (0..)
                .map(|i| i * stride)
                .take_while(|&s| s + tile < size)
                .collect();
            starts.push(size - tile);
            starts
        };
        let (out_h, out_w) = (height * factor, width * factor);
        let mut sum = vec![0f32; batch * 3 * out_h * out_w];
        let mut weight_sum = vec![0f32; out_h * out_w];
        let (rows, columns) = (starts(height), starts(width));
        let tiles = rows.len() * columns.len();
        for (row, &y0) in rows.iter().enumerate() {
            for (column, &x0) in columns.iter().enumerate() {
                crate::check_proceed(proceed, row * columns.len() + column, tiles)?;
                let th = tile.min(height);
                let tw = tile.min(width);
                let piece = latents.narrow(2, y0, th)?.narrow(3, x0, tw)?;
                let decoded = self.decode(&piece)?.to_device(&Device::Cpu)?;
                let (ph, pw) = (th * factor, tw * factor);
                let values = decoded.flatten_all()?.to_vec1::<f32>()?;
                let ramp = (overlap * factor).max(1) as f32;
                let feather = |i: usize, len: usize, at_start: bool, at_end: bool| -> f32 {
                    let from_start = if at_start {
                        f32::INFINITY
                    } else {
                        (i as f32 + 0.5) / ramp
                    };
                    let from_end = if at_end {
                        f32::INFINITY
                    } else {
                        ((len - i) as f32 - 0.5) / ramp
                    };
                    from_start.min(from_end).min(1.0)
                };
                for py in 0..ph {
                    let wy = feather(py, ph, y0 == 0, y0 + th == height);
                    for px in 0..pw {
                        let w = wy * feather(px, pw, x0 == 0, x0 + tw == width);
                        let (oy, ox) = (y0 * factor + py, x0 * factor + px);
                        weight_sum[oy * out_w + ox] += w;
                        for b in 0..batch {
                            for c in 0..3 {
                                let src = ((b * 3 + c) * ph + py) * pw + px;
                                let dst = ((b * 3 + c) * out_h + oy) * out_w + ox;
                                sum[dst] += w * values[src];
                            }
                        }
                    }
                }
            }
        }
        for b in 0..batch {
            for c in 0..3 {
                let plane = &mut sum[(b * 3 + c) * out_h * out_w..(b * 3 + c + 1) * out_h * out_w];
                for (value, w) in plane.iter_mut().zip(&weight_sum) {
                    *value /= w.max(f32::EPSILON);
                }
            }
        }
        Ok(Tensor::from_vec(
            sum,
            (batch, 3, out_h, out_w),
            &Device::Cpu,
        )?)
    }
}
