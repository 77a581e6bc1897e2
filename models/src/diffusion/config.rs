//! Stable Diffusion architecture descriptions.
//!
//! candle's stock `StableDiffusionConfig` only knows the released sizes, and its CLIP config
//! has private fields, so sakuga keeps its own plain-data configs: [`SdConfig`] for a whole
//! checkpoint, made of [`UnetConfig`], [`VaeConfig`] and [`ClipConfig`]. They come from
//! named presets ([`SdConfig::v1_5`], [`SdConfig::v2_1`], [`SdConfig::demo`]), from the shapes
//! of a single-file LDM checkpoint ([`SdConfig::infer_ldm`], as ComfyUI detects models), or
//! from a diffusers folder's `config.json` files.

use std::collections::BTreeMap;
use std::path::Path;

use candle_transformers::models::stable_diffusion::{unet_2d, vae};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::store::WeightFile;

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// Noise (SD 1.x, SD 2.x base 512).
    #[default]
    Epsilon,
    /// Velocity (SD 2.x 768-v).
    V,
    /// The clean latent itself.
    X0,
    /// The clean latent, from an unscaled input: image-to-image models such as Lotus
    /// (ComfyUI's `IMG_TO_IMG`).
    ImgToImg,
}

/// The CLIP text transformer's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP (SD 1.x).
    #[default]
    QuickGelu,
    /// Exact (erf) GELU, OpenCLIP (SD 2.x).
    Gelu,
}

/// One resolution level of the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnetLevel {
    pub channels: usize,
    /// Transformer blocks per attention layer at this level; `None` for no cross-attention.
    pub transformer_depth: Option<usize>,
    /// Attention heads at this level.
    pub heads: usize,
}

/// The denoising UNet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub levels: Vec<UnetLevel>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    /// Width of the class vector `y` (SDXL's pooled text and size conditioning).
    #[serde(default)]
    pub adm_in_channels: Option<usize>,
    /// Transformer blocks in the middle block, where it differs from the last level's
    /// (SDXL's refiner has attention in the middle but not on its last level).
    #[serde(default)]
    pub mid_transformer_depth: Option<usize>,
}

impl UnetConfig {
    /// candle's config for this UNet.
    pub fn to_candle(&self) -> unet_2d::UNet2DConditionModelConfig {
        unet_2d::UNet2DConditionModelConfig {
            blocks: self
                .levels
                .iter()
                .map(|level| unet_2d::BlockConfig {
                    out_channels: level.channels,
                    use_cross_attn: level.transformer_depth,
                    attention_head_dim: level.heads,
                })
                .collect(),
            layers_per_block: self.layers_per_block,
            norm_num_groups: self.norm_num_groups,
            cross_attention_dim: self.cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            ..Default::default()
        }
    }
}

/// The KL autoencoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (0.18215 for SD 1.x/2.x).
    pub scaling_factor: f64,
}

/// Width of Lotus's class input: its task embedding (sin and cos of the depth/normal switch).
pub const LOTUS_TASK_CHANNELS: usize = 4;

impl UnetConfig {
    /// Whether this is Lotus's UNet: SD 2.x's with a 4-wide class input for its task.
    pub fn is_lotus(&self) -> bool {
        self.adm_in_channels == Some(LOTUS_TASK_CHANNELS)
    }
}

impl UnetConfig {
    /// The UNet stored in the LDM layout under `prefix` (`model.diffusion_model.` in a
    /// checkpoint, nothing in a standalone UNet file), from its tensor shapes: levels split
    /// at the downsamplers, transformer depths, context width, SDXL's class embedding.
    ///
    /// # Errors
    /// A missing tensor the sizes are read from; levels of uneven block counts.
    pub fn infer_ldm(dim: &Dim<'_>, shapes: &Shapes, prefix: &str) -> Result<Self> {
        // UNet: walk input_blocks, splitting levels at downsamplers.
        let n_input = count_indices(shapes, &format!("{prefix}input_blocks."));
        let mut levels = Vec::new();
        let mut per_level = Vec::new();
        let mut current: Option<(usize, Option<usize>)> = None;
        let mut count = 0;
        let mut linear_projection = false;
        let mut context_dim = 0;
        for index in 1..n_input {
            let block = format!("{prefix}input_blocks.{index}.");
            if shapes.contains_key(&format!("{block}0.op.weight")) {
                if let Some(level) = current.take() {
                    levels.push(level);
                    per_level.push(count);
                }
                count = 0;
                continue;
            }
            let channels = dim(&format!("{block}0.out_layers.3.weight"), 0)?;
            let depth = {
                let n = count_indices(shapes, &format!("{block}1.transformer_blocks."));
                (n > 0).then_some(n)
            };
            if depth.is_some() {
                linear_projection = shapes
                    .get(&format!("{block}1.proj_in.weight"))
                    .is_some_and(|s| s.len() == 2);
                context_dim = dim(
                    &format!("{block}1.transformer_blocks.0.attn2.to_k.weight"),
                    1,
                )?;
            }
            current = Some((channels, depth));
            count += 1;
        }
        if let Some(level) = current.take() {
            levels.push(level);
            per_level.push(count);
        }
        let layers_per_block = per_level.first().copied().unwrap_or(0);
        if levels.is_empty() || per_level.iter().any(|&c| c != layers_per_block) {
            return Err(ModelError::InvalidInput(
                "UNet levels have uneven block counts".into(),
            ));
        }
        if context_dim == 0 {
            context_dim = dim(
                &format!("{prefix}middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
                1,
            )?;
        }
        let heads_for = |channels: usize| {
            if context_dim == 768 {
                8
            } else {
                (channels / 64).max(1)
            }
        };
        let in_channels = dim(&format!("{prefix}input_blocks.0.0.weight"), 1)?;
        // A ControlNet, a copy of the encoder half, has no output convolution; a UNet
        // without one fails when its `conv_out` is read.
        let out_name = format!("{prefix}out.2.weight");
        let out_channels = if shapes.contains_key(&out_name) {
            dim(&out_name, 0)?
        } else {
            in_channels
        };
        Ok(UnetConfig {
            in_channels,
            out_channels,
            levels: levels
                .iter()
                .map(|&(channels, depth)| UnetLevel {
                    channels,
                    transformer_depth: depth,
                    heads: heads_for(channels),
                })
                .collect(),
            layers_per_block,
            norm_num_groups: 32,
            cross_attention_dim: context_dim,
            use_linear_projection: linear_projection,
            adm_in_channels: shapes
                .get(&format!("{prefix}label_emb.0.0.weight"))
                .and_then(|s| s.get(1).copied()),
            // Stated only where it differs from what the last level implies.
            mid_transformer_depth: {
                let n = count_indices(
                    shapes,
                    &format!("{prefix}middle_block.1.transformer_blocks."),
                );
                let implied = levels.last().and_then(|l| l.1).unwrap_or(1);
                (n > 0 && n != implied).then_some(n)
            },
        })
    }
}

impl VaeConfig {
    /// The autoencoder stored in the LDM layout under `prefix` (`first_stage_model.` in a
    /// checkpoint, nothing in a standalone VAE file), from its tensor shapes. The latent
    /// scale is SD 1.x's; it belongs to the model, which sets its own.
    ///
    /// # Errors
    /// A missing tensor the sizes are read from.
    pub fn infer_ldm(dim: &Dim<'_>, shapes: &Shapes, prefix: &str) -> Result<Self> {
        let n_down = count_indices(shapes, &format!("{prefix}encoder.down."));
        let block_out_channels = (0..n_down)
            .map(|i| dim(&format!("{prefix}encoder.down.{i}.block.0.conv2.weight"), 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            block_out_channels,
            layers_per_block: count_indices(shapes, &format!("{prefix}encoder.down.0.block.")),
            latent_channels: dim(&format!("{prefix}decoder.conv_in.weight"), 1)?,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
        })
    }

    /// candle's config for this autoencoder.
    pub fn to_candle(&self) -> vae::AutoEncoderKLConfig {
        vae::AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }

    /// Pixels per latent cell along one side.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

/// The CLIP text transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub activation: ClipActivation,
    /// Token id that pads windows to 77 (EOS for SD 1.x, `!` for SD 2.x).
    pub pad_token: u32,
    /// Layer the encoder stops at unless `CLIPSetLastLayer` says otherwise: -1 (last) for
    /// SD 1.x, -2 (penultimate) for SD 2.x, as both were trained.
    #[serde(default = "last_layer")]
    pub default_stop_at_layer: i64,
    /// Whether the final layer norm applies to an earlier layer's output when clip skip
    /// stops there (SD 1.x/2.x, as ComfyUI does) or only to the last layer's (SDXL).
    #[serde(default = "yes")]
    pub final_norm_on_hidden: bool,
    /// Width of the pooled output's projection (SDXL's OpenCLIP-G `text_projection`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn last_layer() -> i64 {
    -1
}

fn yes() -> bool {
    true
}

/// A whole Stable Diffusion checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SdConfig {
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub clip: ClipConfig,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG), whose pooled output feeds `y`.
    #[serde(default)]
    pub clip_g: Option<ClipConfig>,
    pub prediction: Prediction,
    /// The noise table rescaled to zero terminal SNR (checkpoints with a `ztsnr` key).
    #[serde(default)]
    pub zero_terminal_snr: bool,
}

/// Safetensors metadata key under which sakuga stores an [`SdConfig`] as JSON.
pub const CONFIG_METADATA_KEY: &str = "sakuga.sd_config";

impl SdConfig {
    /// Stable Diffusion 1.5.
    pub fn v1_5() -> Self {
        Self {
            unet: sd_unet(|_| 8, 768, false),
            vae: sd_vae(),
            clip: ClipConfig {
                vocab_size: 49408,
                width: 768,
                layers: 12,
                heads: 12,
                intermediate_size: 3072,
                max_positions: 77,
                activation: ClipActivation::QuickGelu,
                pad_token: super::tokenizer::EOS_TOKEN,
                default_stop_at_layer: -1,
                final_norm_on_hidden: true,
                projection_dim: None,
            },
            clip_g: None,
            prediction: Prediction::Epsilon,
            zero_terminal_snr: false,
        }
    }

    /// Stable Diffusion 2.1 (768-v).
    pub fn v2_1() -> Self {
        Self {
            unet: sd_unet(|channels| channels / 64, 1024, true),
            vae: sd_vae(),
            clip: ClipConfig {
                vocab_size: 49408,
                width: 1024,
                layers: 23,
                heads: 16,
                intermediate_size: 4096,
                max_positions: 77,
                activation: ClipActivation::Gelu,
                pad_token: super::tokenizer::EXCLAMATION_TOKEN,
                default_stop_at_layer: -2,
                final_norm_on_hidden: true,
                projection_dim: None,
            },
            clip_g: None,
            prediction: Prediction::V,
            zero_terminal_snr: false,
        }
    }

    /// The tiny demo model `sakuga models demo` writes: SD 1.5's layout (four VAE levels, so
    /// latents are 1/8 of the image; the real tokenizer vocabulary) at toy widths, so a
    /// 256x256 render takes seconds on a CPU.
    pub fn demo() -> Self {
        Self {
            unet: UnetConfig {
                in_channels: 4,
                out_channels: 4,
                levels: vec![
                    UnetLevel {
                        channels: 32,
                        transformer_depth: Some(1),
                        heads: 2,
                    },
                    UnetLevel {
                        channels: 64,
                        transformer_depth: None,
                        heads: 2,
                    },
                ],
                layers_per_block: 1,
                norm_num_groups: 32,
                cross_attention_dim: 64,
                use_linear_projection: false,
                adm_in_channels: None,
                mid_transformer_depth: None,
            },
            vae: VaeConfig {
                block_out_channels: vec![32, 32, 64, 64],
                layers_per_block: 1,
                latent_channels: 4,
                norm_num_groups: 32,
                scaling_factor: 0.18215,
            },
            clip: ClipConfig {
                vocab_size: 49408,
                width: 64,
                layers: 2,
                heads: 2,
                intermediate_size: 128,
                max_positions: 77,
                activation: ClipActivation::QuickGelu,
                pad_token: super::tokenizer::EOS_TOKEN,
                default_stop_at_layer: -1,
                final_norm_on_hidden: true,
                projection_dim: None,
            },
            clip_g: None,
            prediction: Prediction::Epsilon,
            zero_terminal_snr: false,
        }
    }

    /// [`Self::demo`]'s text encoder and VAE with a UNet in SD 1.5's full block layout (four
    /// levels of two resnets, attention on the first three) at toy widths: what T2I
    /// adapters, whose features land after input blocks 2, 5, 8 and 11, need.
    pub fn demo_sd15_full() -> Self {
        let mut config = Self::demo();
        let level = |channels, transformer_depth| UnetLevel {
            channels,
            transformer_depth,
            heads: 2,
        };
        config.unet.levels = vec![
            level(32, Some(1)),
            level(64, Some(1)),
            level(128, Some(1)),
            level(128, None),
        ];
        config.unet.layers_per_block = 2;
        config
    }

    /// The tiny SDXL demo: SDXL's layout (no attention on the first level, a two-deep
    /// transformer with linear projections below it, CLIP-L and OpenCLIP-G with a pooled
    /// projection, the size conditioning in `y`) at toy widths.
    pub fn demo_sdxl() -> Self {
        let clip = |width: usize, activation, pad_token, projection_dim| ClipConfig {
            vocab_size: 49408,
            width,
            layers: 3,
            heads: (width / 64).max(1),
            intermediate_size: width * 2,
            max_positions: 77,
            activation,
            pad_token,
            default_stop_at_layer: -2,
            final_norm_on_hidden: false,
            projection_dim,
        };
        let l = clip(
            32,
            ClipActivation::QuickGelu,
            super::tokenizer::EOS_TOKEN,
            None,
        );
        let g = clip(
            64,
            ClipActivation::Gelu,
            super::tokenizer::EXCLAMATION_TOKEN,
            Some(64),
        );
        let mut vae = Self::demo().vae;
        vae.scaling_factor = 0.13025;
        Self {
            unet: UnetConfig {
                in_channels: 4,
                out_channels: 4,
                levels: vec![
                    UnetLevel {
                        channels: 32,
                        transformer_depth: None,
                        heads: 1,
                    },
                    UnetLevel {
                        channels: 64,
                        transformer_depth: Some(2),
                        heads: 1,
                    },
                ],
                layers_per_block: 1,
                norm_num_groups: 32,
                cross_attention_dim: l.width + g.width,
                use_linear_projection: true,
                adm_in_channels: Some(64 + 6 * 256),
                mid_transformer_depth: None,
            },
            vae,
            clip: l,
            clip_g: Some(g),
            prediction: Prediction::Epsilon,
            zero_terminal_snr: false,
        }
    }

    /// SDXL's refiner: OpenCLIP-G alone, and `y` carries an aesthetic score instead of the
    /// target size. Told from the UNet alone: its `y` is the pooled embedding plus five
    /// 256-wide sizes, and that pooled embedding is as wide as its context (one encoder),
    /// where the base model's context is two encoders wide.
    pub fn is_sdxl_refiner(&self) -> bool {
        self.unet
            .adm_in_channels
            .is_some_and(|adm| adm.checked_sub(5 * 256) == Some(self.unet.cross_attention_dim))
    }

    /// The tiny SDXL refiner demo: [`Self::demo_sdxl`]'s UNet conditioned by OpenCLIP-G
    /// alone (a 64-wide context, `y` of 64 + 5 x 256).
    pub fn demo_sdxl_refiner() -> Self {
        let mut config = Self::demo_sdxl();
        let g = config.clip_g.take().expect("the SDXL demo has OpenCLIP-G");
        config.unet.cross_attention_dim = g.width;
        config.unet.adm_in_channels = Some(64 + 5 * 256);
        config.clip = g;
        config
    }

    /// Reads the architecture of a single-file LDM checkpoint.
    ///
    /// A config stored under [`CONFIG_METADATA_KEY`] wins; otherwise channel counts, depths
    /// and widths come from tensor shapes, and what shapes cannot tell (head counts, group
    /// counts, prediction type) follows the SD 1.x/2.x conventions: 8 heads with a 768-wide
    /// context, 64-channel heads otherwise.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] when the file is not an SD 1.x/2.x-style checkpoint,
    /// [`ModelError::Corrupt`] when the stored config is not valid JSON.
    pub fn infer_ldm(file: &WeightFile) -> Result<Self> {
        let path = file.path();
        if let Some(json) = file.metadata().get(CONFIG_METADATA_KEY) {
            return serde_json::from_str(json).map_err(|e| ModelError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("metadata {CONFIG_METADATA_KEY} is not a valid config: {e}"),
            });
        }
        let shapes = shapes_of(file);
        let unsupported = |reason: &str| ModelError::Unsupported {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let dim = dim_of(path, &shapes);
        const UNET: &str = "model.diffusion_model.";
        if !shapes.contains_key(&format!("{UNET}input_blocks.0.0.weight")) {
            return Err(unsupported(
                "not a single-file Stable Diffusion checkpoint (no model.diffusion_model.*)",
            ));
        }
        // CLIP text encoders: OpenAI CLIP in transformers layout (SD 1.x), OpenCLIP (SD
        // 2.x), or both under `conditioner.embedders` (SDXL).
        let adm_in_channels = shapes
            .get(&format!("{UNET}label_emb.0.0.weight"))
            .and_then(|s| s.get(1).copied());
        let (clip, clip_g) = if adm_in_channels.is_some() {
            const L: &str = "conditioner.embedders.0.transformer.text_model.";
            let sdxl = |mut clip: ClipConfig| {
                // SDXL conditions on the penultimate layer, without the final norm.
                clip.default_stop_at_layer = -2;
                clip.final_norm_on_hidden = false;
                clip
            };
            let open_clip_g = |prefix: &str| -> Result<ClipConfig> {
                let mut g = sdxl(open_clip_config(&dim, &shapes, prefix)?);
                g.projection_dim = Some(dim(&format!("{prefix}text_projection"), 1)?);
                Ok(g)
            };
            if shapes.contains_key(&format!("{L}embeddings.token_embedding.weight")) {
                let g = open_clip_g(super::keymap::SDXL_CLIP_G_PREFIX)?;
                (sdxl(hf_clip_config(&dim, &shapes, L)?), Some(g))
            } else {
                // The refiner: OpenCLIP-G alone, as the first embedder.
                (open_clip_g(super::keymap::SDXL_REFINER_CLIP_PREFIX)?, None)
            }
        } else if shapes.contains_key("cond_stage_model.model.token_embedding.weight") {
            (
                open_clip_config(&dim, &shapes, "cond_stage_model.model.")?,
                None,
            )
        } else {
            const P: &str = "cond_stage_model.transformer.text_model.";
            if !shapes.contains_key(&format!("{P}embeddings.token_embedding.weight")) {
                return Err(unsupported("no CLIP text encoder (cond_stage_model.*)"));
            }
            (hf_clip_config(&dim, &shapes, P)?, None)
        };

        let unet = UnetConfig::infer_ldm(&dim, &shapes, UNET)?;

        const VAE: &str = "first_stage_model.";
        if count_indices(&shapes, &format!("{VAE}encoder.down.")) == 0 {
            return Err(unsupported("no VAE (first_stage_model.*)"));
        }
        let mut vae = VaeConfig::infer_ldm(&dim, &shapes, VAE)?;
        if adm_in_channels.is_some() {
            // SDXL's VAE was trained with a smaller latent scale.
            vae.scaling_factor = 0.13025;
        }
        let prediction = detect_prediction(file)?;
        Ok(Self {
            unet,
            vae,
            clip,
            clip_g,
            prediction,
            zero_terminal_snr: file.contains("ztsnr"),
        })
    }

    /// Reads a diffusers folder's `unet/`, `vae/` and `text_encoder/` `config.json` files.
    ///
    /// # Errors
    /// [`ModelError::Io`] / [`ModelError::Corrupt`] naming the config file.
    pub fn from_diffusers_dir(dir: &Path) -> Result<Self> {
        let unet = read_json(&dir.join("unet/config.json"))?;
        let vae_json = read_json(&dir.join("vae/config.json"))?;
        let text = read_json(&dir.join("text_encoder/config.json"))?;
        let scheduler = read_json(&dir.join("scheduler/scheduler_config.json")).ok();
        let usize_of = |v: &serde_json::Value, key: &str, default: usize| {
            v.get(key)
                .and_then(|x| x.as_u64())
                .map_or(default, |x| x as usize)
        };
        let list_of = |v: &serde_json::Value, key: &str| -> Vec<usize> {
            v.get(key)
                .and_then(|x| x.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64())
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default()
        };
        let channels = list_of(&unet, "block_out_channels");
        let down_types: Vec<String> = unet
            .get("down_block_types")
            .and_then(|x| x.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let head_dims: Vec<usize> = match unet.get("attention_head_dim") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as usize)
                .collect(),
            Some(v) => vec![v.as_u64().unwrap_or(8) as usize; channels.len()],
            None => vec![8; channels.len()],
        };
        let levels = channels
            .iter()
            .enumerate()
            .map(|(i, &c)| UnetLevel {
                channels: c,
                transformer_depth: down_types
                    .get(i)
                    .is_some_and(|t| t.starts_with("CrossAttn"))
                    .then_some(1),
                heads: head_dims.get(i).copied().unwrap_or(8),
            })
            .collect();
        // SD 2.x pads with `!`; its tokenizer folder says so in special_tokens_map.json.
        let pad_token = read_json(&dir.join("tokenizer/special_tokens_map.json"))
            .ok()
            .and_then(|m| {
                let pad = m.get("pad_token")?;
                pad.as_str()
                    .or_else(|| pad.get("content").and_then(|c| c.as_str()))
                    .map(|p| p == "!")
            })
            .map_or(super::tokenizer::EOS_TOKEN, |exclamation| {
                if exclamation {
                    super::tokenizer::EXCLAMATION_TOKEN
                } else {
                    super::tokenizer::EOS_TOKEN
                }
            });
        let hidden_act = text
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("quick_gelu");
        let width = usize_of(&text, "hidden_size", 768);
        let v_prediction = scheduler
            .as_ref()
            .and_then(|s| s.get("prediction_type"))
            .and_then(|p| p.as_str())
            == Some("v_prediction");
        Ok(Self {
            unet: UnetConfig {
                in_channels: usize_of(&unet, "in_channels", 4),
                out_channels: usize_of(&unet, "out_channels", 4),
                levels,
                layers_per_block: usize_of(&unet, "layers_per_block", 2),
                norm_num_groups: usize_of(&unet, "norm_num_groups", 32),
                cross_attention_dim: usize_of(&unet, "cross_attention_dim", width),
                use_linear_projection: unet
                    .get("use_linear_projection")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false),
                adm_in_channels: None,
                mid_transformer_depth: None,
            },
            vae: VaeConfig {
                block_out_channels: list_of(&vae_json, "block_out_channels"),
                layers_per_block: usize_of(&vae_json, "layers_per_block", 2),
                latent_channels: usize_of(&vae_json, "latent_channels", 4),
                norm_num_groups: usize_of(&vae_json, "norm_num_groups", 32),
                scaling_factor: vae_json
                    .get("scaling_factor")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(0.18215),
            },
            clip: ClipConfig {
                vocab_size: usize_of(&text, "vocab_size", 49408),
                width,
                layers: usize_of(&text, "num_hidden_layers", 12),
                heads: usize_of(&text, "num_attention_heads", 12),
                intermediate_size: usize_of(&text, "intermediate_size", 3072),
                max_positions: usize_of(&text, "max_position_embeddings", 77),
                activation: if hidden_act == "quick_gelu" {
                    ClipActivation::QuickGelu
                } else {
                    ClipActivation::Gelu
                },
                pad_token,
                // diffusers ships SD 2.x's text encoder already cut to its penultimate layer.
                default_stop_at_layer: -1,
                final_norm_on_hidden: true,
                projection_dim: None,
            },
            clip_g: None,
            prediction: if v_prediction {
                Prediction::V
            } else {
                Prediction::Epsilon
            },
            zero_terminal_snr: false,
        })
    }
}

/// A `v_pred` marker key (SDXL v-prediction finetunes), or ComfyUI's test for SD 2.x 768-v
/// checkpoints: v-prediction training leaves the last output transformer's first norm bias
/// with a spread above 0.09.
fn detect_prediction(file: &WeightFile) -> Result<Prediction> {
    // v-prediction SDXL finetunes (NoobAI-XL V-Pred and the like) say so with a marker key.
    if file.contains("v_pred") {
        return Ok(Prediction::V);
    }
    const PROBE: &str = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";
    if !file.contains("cond_stage_model.model.token_embedding.weight") || !file.contains(PROBE) {
        return Ok(Prediction::Epsilon);
    }
    let bias = file
        .load(PROBE, &candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let n = bias.len().max(1) as f64;
    let mean = bias.iter().sum::<f64>() / n;
    let std = (bias.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    Ok(if std > 0.09 {
        Prediction::V
    } else {
        Prediction::Epsilon
    })
}

/// The SD 1.x/2.x UNet: four levels (320, 640, 1280, 1280; attention on the first three),
/// differing in heads per level, the text encoder's width and the projection kind.
fn sd_unet(heads: fn(usize) -> usize, cross_attention_dim: usize, linear: bool) -> UnetConfig {
    let level = |channels, attn: bool| UnetLevel {
        channels,
        transformer_depth: attn.then_some(1),
        heads: heads(channels),
    };
    UnetConfig {
        in_channels: 4,
        out_channels: 4,
        levels: vec![
            level(320, true),
            level(640, true),
            level(1280, true),
            level(1280, false),
        ],
        layers_per_block: 2,
        norm_num_groups: 32,
        cross_attention_dim,
        use_linear_projection: linear,
        adm_in_channels: None,
        mid_transformer_depth: None,
    }
}

fn sd_vae() -> VaeConfig {
    VaeConfig {
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        latent_channels: 4,
        norm_num_groups: 32,
        scaling_factor: 0.18215,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// A shape lookup: `dim(name, axis)`, or a missing-tensor error naming the file.
pub type Dim<'a> = dyn Fn(&str, usize) -> Result<usize> + 'a;
/// Every tensor's shape, by name.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// The shapes of every tensor in `file`.
pub(crate) fn shapes_of(file: &WeightFile) -> Shapes {
    file.names()
        .into_iter()
        .filter_map(|n| file.info(&n).map(|i| (n, i.shape)))
        .collect()
}

/// A shape lookup over `shapes` whose misses name `path`.
pub(crate) fn dim_of<'a>(
    path: &'a Path,
    shapes: &'a Shapes,
) -> impl Fn(&str, usize) -> Result<usize> + 'a {
    move |name, axis| {
        shapes
            .get(name)
            .and_then(|s| s.get(axis).copied())
            .ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
            })
    }
}

/// An OpenAI CLIP text encoder in transformers' layout under `prefix` (`...text_model.`).
pub(crate) fn hf_clip_config(
    dim: &Dim<'_>,
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
) -> Result<ClipConfig> {
    let token_embedding = format!("{prefix}embeddings.token_embedding.weight");
    let width = dim(&token_embedding, 1)?;
    Ok(ClipConfig {
        vocab_size: dim(&token_embedding, 0)?,
        width,
        layers: count_indices(shapes, &format!("{prefix}encoder.layers.")),
        heads: (width / 64).max(1),
        intermediate_size: dim(&format!("{prefix}encoder.layers.0.mlp.fc1.weight"), 0)?,
        max_positions: dim(&format!("{prefix}embeddings.position_embedding.weight"), 0)?,
        activation: ClipActivation::QuickGelu,
        pad_token: super::tokenizer::EOS_TOKEN,
        default_stop_at_layer: -1,
        final_norm_on_hidden: true,
        projection_dim: None,
    })
}

/// An OpenCLIP text tower under `prefix` (`token_embedding`, `transformer.resblocks`).
pub(crate) fn open_clip_config(
    dim: &Dim<'_>,
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
) -> Result<ClipConfig> {
    let width = dim(&format!("{prefix}token_embedding.weight"), 1)?;
    Ok(ClipConfig {
        vocab_size: dim(&format!("{prefix}token_embedding.weight"), 0)?,
        width,
        layers: count_indices(shapes, &format!("{prefix}transformer.resblocks.")),
        heads: (width / 64).max(1),
        intermediate_size: dim(
            &format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"),
            0,
        )?,
        max_positions: dim(&format!("{prefix}positional_embedding"), 0)?,
        activation: ClipActivation::Gelu,
        pad_token: super::tokenizer::EXCLAMATION_TOKEN,
        default_stop_at_layer: -2,
        final_norm_on_hidden: true,
        projection_dim: None,
    })
}

/// How many consecutive numeric indices `prefix{0,1,..}.` appear among the names.
pub(crate) fn count_indices(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> usize {
    let mut count = 0;
    while shapes
        .range(format!("{prefix}{count}.")..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(&format!("{prefix}{count}.")))
    {
        count += 1;
    }
    count
}
