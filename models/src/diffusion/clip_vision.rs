//! CLIP vision encoders (ViT-L, ViT-H, ViT-bigG in transformers' `CLIPVisionModelWithProjection`
//! layout, as ComfyUI's `CLIPVisionLoader` reads them) and unCLIP conditioning: an image's
//! projected embedding, noise-augmented, standing in for SDXL's pooled text embedding
//! (SDXL "revision"), as ComfyUI's `unclip_adm` and `CLIPEmbeddingNoiseAugmentation` compute
//! it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Conv2d, LayerNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::clip::ClipLayer;
use super::config::{ClipActivation, ClipConfig};
use super::rng::NoiseRng;
use crate::error::{ModelError, Result};
use crate::upscale::StateDict;

/// Metadata key under which sakuga's demo files store their [`ClipVisionConfig`] (head
/// counts cannot be read from shapes).
pub const CLIP_VISION_CONFIG_KEY: &str = "sakuga.clip_vision_config";

/// CLIP's image normalisation (OpenAI's statistics, which every ComfyUI CLIP vision config
/// uses).
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// What a CLIP vision file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
    pub activation: ClipActivation,
}

impl ClipVisionConfig {
    /// Reads the architecture from tensor shapes; a stored config wins. Head counts and
    /// activations follow the released models (ViT-L 16 heads, quick GELU; ViT-H and
    /// ViT-bigG 16 heads, GELU), 64-wide heads otherwise.
    fn detect(weights: &StateDict, stored: Option<&str>) -> Result<Self> {
        if let Some(json) = stored {
            return serde_json::from_str(json).map_err(|e| ModelError::Corrupt {
                path: weights.path().to_path_buf(),
                reason: format!("metadata {CLIP_VISION_CONFIG_KEY} is not a valid config: {e}"),
            });
        }
        let dims = |name: &str| -> Result<Vec<usize>> {
            Ok(weights
                .get(&format!("vision_model.{name}"))?
                .dims()
                .to_vec())
        };
        let patch = dims("embeddings.patch_embedding.weight")?;
        let (width, patch_size) = (patch[0], patch[2]);
        let positions = dims("embeddings.position_embedding.weight")?[0];
        let grid = ((positions - 1) as f64).sqrt().round() as usize;
        let layers = (0..)
            .take_while(|i| {
                weights.contains(&format!(
                    "vision_model.encoder.layers.{i}.layer_norm1.weight"
                ))
            })
            .count();
        let (heads, activation) = match width {
            1024 => (16, ClipActivation::QuickGelu),
            1280 | 1664 => (16, ClipActivation::Gelu),
            w => ((w / 64).max(1), ClipActivation::Gelu),
        };
        Ok(Self {
            width,
            layers,
            heads,
            intermediate_size: dims("encoder.layers.0.mlp.fc1.weight")?[0],
            image_size: grid * patch_size,
            patch_size,
            projection_dim: weights.get("visual_projection.weight")?.dim(0)?,
            activation,
        })
    }

    fn as_text_config(&self) -> ClipConfig {
        ClipConfig {
            vocab_size: 0,
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            intermediate_size: self.intermediate_size,
            max_positions: 0,
            activation: self.activation,
            pad_token: 0,
            default_stop_at_layer: -1,
            final_norm_on_hidden: true,
            projection_dim: None,
        }
    }
}

/// What `CLIPVisionEncode` gives (ComfyUI's CLIP_VISION_OUTPUT).
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `[b, tokens, width]`, after the last layer (no final norm).
    pub last_hidden_state: Tensor,
    /// `[b, tokens, width]`, after the second-to-last layer.
    pub penultimate_hidden_states: Tensor,
    /// `[b, projection]`: the class token, normed and projected.
    pub image_embeds: Tensor,
}

/// A loaded CLIP vision encoder.
#[derive(Debug)]
pub struct ClipVisionModel {
    config: ClipVisionConfig,
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_norm: LayerNorm,
    projection: Linear,
    path: PathBuf,
}

impl ClipVisionModel {
    /// Loads a CLIP vision file (transformers' layout, with or without a `clip_vision.`
    /// wrapper as some single files have it).
    ///
    /// # Errors
    /// File errors; [`ModelError::Unsupported`] for OpenCLIP's layout or other image
    /// encoders (SigLIP, DINOv2), naming what was found; missing or misshapen tensors.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let stored = crate::store::SafetensorsFile::open(path)
            .ok()
            .and_then(|f| f.metadata().get(CLIP_VISION_CONFIG_KEY).cloned());
        let raw = StateDict::load(path, device)?;
        let weights = StateDict::from_tensors(
            path,
            raw.tensors()
                .iter()
                .map(|(k, v)| {
                    (
                        k.strip_prefix("clip_vision.").unwrap_or(k).to_string(),
                        v.clone(),
                    )
                })
                .collect(),
        );
        if !weights.contains("vision_model.embeddings.patch_embedding.weight") {
            let open_clip = weights
                .names()
                .any(|n| n.contains("transformer.resblocks."));
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                reason: if open_clip {
                    "a CLIP vision model in OpenCLIP's layout (visual.transformer.resblocks); \
                     only transformers' layout (vision_model.*) is supported"
                        .into()
                } else {
                    "not a CLIP vision model: no vision_model.embeddings.patch_embedding".into()
                },
            });
        }
        let config = ClipVisionConfig::detect(&weights, stored.as_deref())?;
        let tensors: HashMap<String, Tensor> = weights.tensors().clone().into_iter().collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(vb, config, path).map_err(|e| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("CLIP vision weights do not fit the detected layout: {e}"),
        })
    }

    /// Builds the model from `vb` (transformers' names).
    ///
    /// # Errors
    /// When a weight is missing or misshapen.
    pub fn new(
        vb: VarBuilder<'_>,
        config: ClipVisionConfig,
        path: &Path,
    ) -> candle_core::Result<Self> {
        let w = config.width;
        let grid = config.image_size / config.patch_size;
        let embeddings = vb.pp("vision_model.embeddings");
        let patch_embedding = candle_nn::conv2d_no_bias(
            3,
            w,
            config.patch_size,
            candle_nn::Conv2dConfig {
                stride: config.patch_size,
                ..Default::default()
            },
            embeddings.pp("patch_embedding"),
        )?;
        // The hints only shape the demo's invented weights; real files hold these.
        let scale = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: (w as f64).powf(-0.5),
        };
        let class_embedding = embeddings.get_with_hints(w, "class_embedding", scale)?;
        let position_embedding =
            embeddings.get_with_hints((grid * grid + 1, w), "position_embedding.weight", scale)?;
        let model = vb.pp("vision_model");
        let text = config.as_text_config();
        let layers = (0..config.layers)
            .map(|i| ClipLayer::new(model.pp(format!("encoder.layers.{i}")), &text))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_norm: candle_nn::layer_norm(w, 1e-5, model.pp("pre_layrnorm"))?,
            layers,
            post_norm: candle_nn::layer_norm(w, 1e-5, model.pp("post_layernorm"))?,
            projection: candle_nn::linear_no_bias(
                w,
                config.projection_dim,
                vb.pp("visual_projection"),
            )?,
            config,
            path: path.to_path_buf(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes `pixels` `[b, 3, size, size]`, already normalised by [`normalise`].
    ///
    /// # Errors
    /// Tensor errors; pixels of another size than the model's.
    pub fn encode(&self, pixels: &Tensor) -> Result<ClipVisionOutput> {
        let (b, _, h, w) = pixels.dims4()?;
        let size = self.config.image_size;
        if (h, w) != (size, size) {
            return Err(ModelError::InvalidInput(format!(
                "the CLIP vision model reads {size}x{size} images, got {w}x{h}"
            )));
        }
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self
            .class_embedding
            .reshape((1, 1, self.config.width))?
            .broadcast_as((b, 1, self.config.width))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut xs = self.pre_norm.forward(&xs)?;
        let no_mask = Tensor::zeros((1, 1, 1, 1), xs.dtype(), xs.device())?;
        let mut penultimate = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &no_mask)?;
            if i + 2 == self.layers.len() {
                penultimate = xs.clone();
            }
        }
        let pooled = self.post_norm.forward(&xs.i((.., 0, ..))?)?;
        Ok(ClipVisionOutput {
            image_embeds: self.projection.forward(&pooled)?,
            penultimate_hidden_states: penultimate,
            last_hidden_state: xs,
        })
    }
}

/// `(pixels - mean) / std` per channel for `[b, 3, h, w]` pixels in 0..1, after rounding
/// them to 8 bits as ComfyUI's `clip_preprocess` does.
///
/// # Errors
/// Tensor errors.
pub fn normalise(pixels: &Tensor) -> Result<Tensor> {
    let device = pixels.device();
    let rounded = ((pixels.clamp(0f32, 1f32)? * 255.0)?.round()? / 255.0)?;
    let mean = Tensor::new(&MEAN, device)?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&STD, device)?.reshape((1, 3, 1, 1))?;
    Ok(rounded.broadcast_sub(&mean)?.broadcast_div(&std)?)
}

/// One `unCLIPConditioning` on a prompt.
#[derive(Debug, Clone)]
pub struct UnclipEntry {
    /// `[n, projection]`: each row is one image.
    pub image_embeds: Tensor,
    pub strength: f64,
    /// 0..1: how far along the augmentation schedule the embedding is noised.
    pub noise_augmentation: f64,
}

/// Width of the noise level's timestep embedding (ComfyUI's `timestep_dim` for SDXL).
const NOISE_LEVEL_DIM: usize = 1280;
const NOISE_LEVELS: usize = 1000;

/// `sqrt(alphas_cumprod)` and `sqrt(1 - alphas_cumprod)` of the `squaredcos_cap_v2`
/// schedule the augmentation uses, at `level`.
fn augmentation_scales(level: usize) -> (f64, f64) {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    let mut cumprod = 1.0f64;
    for i in 0..=level {
        let t1 = i as f64 / NOISE_LEVELS as f64;
        let t2 = (i + 1) as f64 / NOISE_LEVELS as f64;
        let beta = (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999);
        cumprod *= 1.0 - beta;
    }
    // ComfyUI keeps the table in float32.
    let cumprod = f64::from(cumprod as f32);
    (
        f64::from(cumprod.sqrt() as f32),
        f64::from((1.0 - cumprod).sqrt() as f32),
    )
}

/// ComfyUI's `timestep_embedding(level, dim)`: cosines then sines.
fn level_embedding(level: usize, device: &Device) -> Result<Tensor> {
    let half = NOISE_LEVEL_DIM / 2;
    let args: Vec<f64> = (0..half)
        .map(|i| level as f64 * (-(10000f64.ln()) * i as f64 / half as f64).exp())
        .collect();
    let values: Vec<f32> = args
        .iter()
        .map(|a| a.cos() as f32)
        .chain(args.iter().map(|a| a.sin() as f32))
        .collect();
    Ok(Tensor::from_vec(values, (1, NOISE_LEVEL_DIM), device)?)
}

/// `x` noised to `level` with `noise`, and the level's embedding beside it.
fn augment(x: &Tensor, level: usize, noise: &Tensor) -> Result<Tensor> {
    let (keep, add) = augmentation_scales(level);
    let z = ((x * keep)? + (noise * add)?)?;
    Ok(Tensor::cat(&[&z, &level_embedding(level, x.device())?], 1)?)
}

/// The pooled vector `[1, width]` SDXL reads in place of the text's when a prompt carries
/// unCLIP images (ComfyUI's `sdxl_pooled` over `unclip_adm`): each image's embedding
/// noise-augmented at its level and weighted by its strength; several are summed and
/// augmented once more at level 0. `noise(shape, merging)` draws the augmentation noise:
/// ComfyUI reseeds it with the sampler's seed - 10 for every image (so each gets the same
/// draw) and continues that stream for the merge.
///
/// # Errors
/// No entries, embeddings narrower than `width`, tensor errors.
pub fn unclip_pooled(
    entries: &[UnclipEntry],
    width: usize,
    noise: &mut dyn FnMut(&[usize], bool) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut augmented = Vec::new();
    for entry in entries {
        let level =
            ((NOISE_LEVELS - 1) as f64 * entry.noise_augmentation).round_ties_even() as usize;
        for row in 0..entry.image_embeds.dim(0)? {
            let x = entry.image_embeds.narrow(0, row, 1)?.to_dtype(DType::F32)?;
            let drawn = noise(x.dims(), false)?.to_device(x.device())?;
            augmented.push((augment(&x, level, &drawn)? * entry.strength)?);
        }
    }
    let merged = match augmented.len() {
        0 => {
            return Err(ModelError::InvalidInput(
                "unCLIP conditioning without images".into(),
            ));
        }
        1 => augmented.remove(0),
        _ => {
            let sum = Tensor::stack(&augmented, 0)?.sum(0)?;
            let projection = entries[0].image_embeds.dim(1)?;
            let x = sum.narrow(1, 0, projection)?;
            let drawn = noise(x.dims(), true)?.to_device(x.device())?;
            augment(&x, 0, &drawn)?
        }
    };
    if merged.dim(1)? < width {
        return Err(ModelError::InvalidInput(format!(
            "unCLIP embeddings of width {} cannot stand for a {width}-wide pooled embedding",
            merged.dim(1)? - NOISE_LEVEL_DIM
        )));
    }
    Ok(merged.narrow(1, 0, width)?)
}

/// The augmentation noise sakuga draws, from its own generator: seeded by the sampler's
/// seed - 10 as ComfyUI seeds it, the same draw for every image, another for the merge.
pub fn unclip_noise(seed: u64) -> impl FnMut(&[usize], bool) -> Result<Tensor> {
    move |shape: &[usize], merging: bool| {
        NoiseRng::new(seed.wrapping_sub(10), 0x0c11_0000 + u64::from(merging)).tensor(
            shape,
            DType::F32,
            &Device::Cpu,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_augmentation_schedule_starts_almost_clean() {
        let (keep, add) = augmentation_scales(0);
        assert!((keep - 0.999_979).abs() < 1e-5, "{keep}");
        assert!(add > 0.006 && add < 0.0066, "{add}");
        let (keep, add) = augmentation_scales(999);
        assert!(keep < 0.01 && add > 0.999, "{keep} {add}");
    }
}
