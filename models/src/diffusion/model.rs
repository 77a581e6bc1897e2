//! Checkpoints: opening one, building its UNet, CLIP and VAE, and the guided denoiser.
//!
//! ComfyUI's `CheckpointLoaderSimple` yields three things (MODEL, CLIP, VAE) and
//! `LoraLoader` patches the first two; the types here mirror that. A [`Checkpoint`] is an
//! opened file (a single-file LDM `.safetensors`/`.ckpt`, or a diffusers folder) with its
//! [`SdConfig`]; [`Checkpoint::load_unet`], [`Checkpoint::load_clip`] and
//! [`Checkpoint::load_vae`] build the parts, the first two with LoRAs merged in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::clip::ClipTextModel;
use super::config::{Prediction, SdConfig};
use super::keymap::{Part, clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm};
use super::lora::{LoraFile, LoraStack};
use super::sampler::Denoiser;
use super::schedule::ModelSampling;
use super::tokenizer::ClipTokenizer;
use super::unet::Unet;
use super::vae::VaeModel;
use super::weights::{MappedWeights, Renamer, build_part};
use crate::error::{ModelError, Result};
use crate::store::WeightFile;

/// How a checkpoint stores its parts.
#[derive(Debug)]
enum Layout {
    /// One file in the original LDM key layout.
    Ldm(Arc<WeightFile>),
    /// A diffusers folder: `unet/`, `vae/`, `text_encoder/` each with their own file.
    Diffusers {
        unet: Arc<WeightFile>,
        vae: Arc<WeightFile>,
        text_encoder: Arc<WeightFile>,
    },
}

/// A LoRA applied with separate model and CLIP strengths, as `LoraLoader` takes them.
#[derive(Debug, Clone)]
pub struct AppliedLora {
    pub lora: Arc<LoraFile>,
    pub strength_model: f64,
    pub strength_clip: f64,
}

/// An opened Stable Diffusion checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    layout: Layout,
    config: SdConfig,
}

impl Checkpoint {
    /// Opens a single-file checkpoint or a diffusers folder and reads its architecture.
    ///
    /// # Errors
    /// [`ModelError::Corrupt`], [`ModelError::Unsupported`] or [`ModelError::MissingTensor`]
    /// naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let open = |sub: &str, candidates: &[&str]| -> Result<Arc<WeightFile>> {
                for name in candidates {
                    let file = path.join(sub).join(name);
                    if file.exists() {
                        return WeightFile::open(&file).map(Arc::new);
                    }
                }
                Err(ModelError::NotFound {
                    name: candidates[0].to_string(),
                    folder: path.join(sub),
                })
            };
            let weights = [
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin",
            ];
            let layout = Layout::Diffusers {
                unet: open("unet", &weights)?,
                vae: open("vae", &weights)?,
                text_encoder: open("text_encoder", &["model.safetensors", "pytorch_model.bin"])?,
            };
            let config = SdConfig::from_diffusers_dir(path)?;
            return Ok(Self {
                path: path.to_path_buf(),
                layout,
                config,
            });
        }
        let file = WeightFile::open(path)?;
        let config = SdConfig::infer_ldm(&file)?;
        Ok(Self {
            path: path.to_path_buf(),
            layout: Layout::Ldm(Arc::new(file)),
            config,
        })
    }

    /// The file or folder this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The architecture.
    pub fn config(&self) -> &SdConfig {
        &self.config
    }

    /// Bytes `part` occupies once loaded in `dtype` (what a cache entry should be charged).
    pub fn part_bytes(&self, part: Part, dtype: DType) -> u64 {
        let (file, prefix) = match (&self.layout, part) {
            (Layout::Ldm(file), Part::Unet) => (file, super::keymap::LDM_UNET_PREFIX),
            (Layout::Ldm(file), Part::Vae) => (file, super::keymap::LDM_VAE_PREFIX),
            (Layout::Ldm(file), Part::Clip) => (file, "cond_stage_model."),
            (Layout::Diffusers { unet, .. }, Part::Unet) => (unet, ""),
            (Layout::Diffusers { vae, .. }, Part::Vae) => (vae, ""),
            (Layout::Diffusers { text_encoder, .. }, Part::Clip) => (text_encoder, ""),
        };
        file.names()
            .iter()
            .filter(|n| n.starts_with(prefix))
            .filter_map(|n| file.info(n))
            .map(|info| (info.shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64)
            .sum()
    }

    fn backend(&self, part: Part, loras: Arc<LoraStack>) -> MappedWeights {
        match &self.layout {
            Layout::Ldm(file) => {
                let rename: Renamer = match part {
                    Part::Unet => {
                        let config = self.config.unet.clone();
                        Box::new(move |n| unet_to_ldm(n, &config).into_iter().collect())
                    }
                    Part::Vae => {
                        let config = self.config.vae.clone();
                        Box::new(move |n| vae_to_ldm(n, &config).into_iter().collect())
                    }
                    Part::Clip => Box::new(|n| {
                        let mut names = clip_to_ldm(n);
                        names.extend(open_clip_to_ldm(n));
                        names
                    }),
                };
                MappedWeights::new(file.clone(), part, rename, loras)
            }
            Layout::Diffusers {
                unet,
                vae,
                text_encoder,
            } => {
                let file = match part {
                    Part::Unet => unet,
                    Part::Vae => vae,
                    Part::Clip => text_encoder,
                };
                MappedWeights::new(file.clone(), part, Box::new(|n| vec![n.to_string()]), loras)
            }
        }
    }

    /// Builds the UNet with `loras` merged at their model strengths.
    ///
    /// # Errors
    /// File errors naming the checkpoint (or LoRA) and tensor.
    pub fn load_unet(
        &self,
        loras: &[AppliedLora],
        device: &Device,
        dtype: DType,
    ) -> Result<UnetModel> {
        let stack = Arc::new(LoraStack::new(
            loras
                .iter()
                .map(|l| (l.lora.clone(), l.strength_model))
                .collect(),
        ));
        let config = self.config.unet.clone();
        let unet = build_part(
            self.backend(Part::Unet, stack.clone()),
            dtype,
            device,
            |vb| Unet::new(vb, &config),
        )?;
        warn_unused(&stack, "lora_unet_");
        Ok(UnetModel {
            unet,
            config: self.config.clone(),
            sampling: ModelSampling::default(),
            device: device.clone(),
            dtype,
        })
    }

    /// Builds the CLIP text encoder with `loras` merged at their CLIP strengths.
    ///
    /// # Errors
    /// File errors naming the checkpoint (or LoRA) and tensor.
    pub fn load_clip(
        &self,
        loras: &[AppliedLora],
        device: &Device,
        dtype: DType,
    ) -> Result<ClipModel> {
        let stack = Arc::new(LoraStack::new(
            loras
                .iter()
                .map(|l| (l.lora.clone(), l.strength_clip))
                .collect(),
        ));
        let config = self.config.clip.clone();
        let model = build_part(
            self.backend(Part::Clip, stack.clone()),
            dtype,
            device,
            |vb| ClipTextModel::new(vb, &config),
        )?;
        warn_unused(&stack, "lora_te");
        Ok(ClipModel {
            stop_at_layer: config.default_stop_at_layer.min(-1),
            model: Arc::new(model),
            device: device.clone(),
        })
    }

    /// Builds the VAE.
    ///
    /// # Errors
    /// File errors naming the checkpoint and tensor.
    pub fn load_vae(&self, device: &Device, dtype: DType) -> Result<VaeModel> {
        let config = self.config.vae.clone();
        build_part(
            self.backend(Part::Vae, Arc::new(LoraStack::default())),
            dtype,
            device,
            |vb| VaeModel::new(vb, &config),
        )
    }
}

fn warn_unused(stack: &LoraStack, prefix: &str) {
    for (path, key) in stack.unused_keys(prefix) {
        tracing::warn!(lora = %path.display(), key, "lora key not loaded");
    }
}

/// The denoising UNet of a checkpoint (ComfyUI's MODEL).
#[derive(Debug)]
pub struct UnetModel {
    unet: Unet,
    config: SdConfig,
    sampling: ModelSampling,
    device: Device,
    dtype: DType,
}

impl UnetModel {
    /// The checkpoint's architecture.
    pub fn config(&self) -> &SdConfig {
        &self.config
    }

    /// The noise table.
    pub fn sampling(&self) -> &ModelSampling {
        &self.sampling
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Raw network output (noise or velocity) for `latents` at timestep `t` given
    /// `context` `[B, tokens, width]` and, for SDXL, the class vector `y` `[B, adm]`.
    ///
    /// # Errors
    /// Tensor errors; a missing `y` on an SDXL model.
    pub fn forward(
        &self,
        latents: &Tensor,
        t: f64,
        context: &Tensor,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let xs = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let context = context.to_device(&self.device)?.to_dtype(self.dtype)?;
        let y = y
            .map(|y| y.to_device(&self.device)?.to_dtype(self.dtype))
            .transpose()?;
        Ok(self
            .unet
            .forward(&xs, t, &context, y.as_ref())?
            .to_dtype(DType::F32)?)
    }

    /// Whether the model takes a class vector `y` (SDXL).
    pub fn takes_y(&self) -> bool {
        self.unet.takes_y()
    }
}

/// The CLIP text encoder of a checkpoint (ComfyUI's CLIP), with its clip-skip setting.
#[derive(Debug, Clone)]
pub struct ClipModel {
    model: Arc<ClipTextModel>,
    stop_at_layer: i64,
    device: Device,
}

impl ClipModel {
    /// The same encoder stopping at `layer` (-1 = last), as `CLIPSetLastLayer` makes it.
    pub fn with_stop_at_layer(&self, layer: i64) -> Self {
        Self {
            stop_at_layer: layer.min(-1),
            ..self.clone()
        }
    }

    /// The current clip-skip layer.
    pub fn stop_at_layer(&self) -> i64 {
        self.stop_at_layer
    }

    /// Conditioning `[1, 77 * windows, width]` (f32) for `prompt`: long prompts are split into
    /// 75-token windows encoded separately and concatenated, and `(text:1.2)` emphasis is
    /// applied per token as ComfyUI does (`z_empty + (z - z_empty) * weight`).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn encode(&self, prompt: &str) -> Result<Tensor> {
        let pad = self.model.config().pad_token;
        let tokenizer = ClipTokenizer::shared();
        let windows = tokenizer.encode_weighted_windows(prompt, pad);
        let weighted = windows.iter().flatten().any(|&(_, w)| w != 1.0);
        let empty = if weighted {
            Some(self.encode_window(&tokenizer.encode_windows("", pad)[0])?)
        } else {
            None
        };
        let mut encoded = Vec::with_capacity(windows.len());
        for window in windows {
            let ids: Vec<u32> = window.iter().map(|&(id, _)| id).collect();
            let z = self.encode_window(&ids)?;
            let z = match &empty {
                Some(empty) => {
                    let weights: Vec<f32> = window.iter().map(|&(_, w)| w).collect();
                    let weights = Tensor::from_vec(weights, (1, ids.len(), 1), z.device())?;
                    (empty + (&z - empty)?.broadcast_mul(&weights)?)?
                }
                None => z,
            };
            encoded.push(z);
        }
        Ok(Tensor::cat(&encoded, 1)?)
    }

    fn encode_window(&self, ids: &[u32]) -> Result<Tensor> {
        let tokens = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self
            .model
            .forward(&tokens, self.stop_at_layer)?
            .to_dtype(DType::F32)?)
    }

    /// Hidden states for explicit token windows `[B, 77]` (u32), for tests and tools.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn encode_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(self
            .model
            .forward(&tokens.to_device(&self.device)?, self.stop_at_layer)?
            .to_dtype(DType::F32)?)
    }
}

/// Classifier-free guided denoiser over a [`UnetModel`].
#[derive(Debug)]
pub struct GuidedDenoiser<'a> {
    unet: &'a UnetModel,
    positive: Tensor,
    negative: Tensor,
    cfg: f64,
    max_batch: Option<usize>,
}

impl<'a> GuidedDenoiser<'a> {
    /// Guidance `cfg` between `negative` and `positive` conditioning (`[1, tokens, width]`
    /// each; token counts may differ and are repeated to a common length).
    ///
    /// # Errors
    /// When the conditionings' widths differ.
    pub fn new(
        unet: &'a UnetModel,
        positive: &Tensor,
        negative: &Tensor,
        cfg: f64,
    ) -> Result<Self> {
        let (positive, negative) = match_lengths(positive, negative)?;
        Ok(Self {
            unet,
            positive,
            negative,
            cfg,
            max_batch: None,
        })
    }

    /// Runs the UNet on at most `max_batch` latents at a time (`None`: the whole batch).
    /// Each latent is denoised on its own either way, so only peak memory changes: this is
    /// how a batch that ran out of device memory is split for its retry.
    pub fn with_max_batch(mut self, max_batch: Option<usize>) -> Self {
        self.max_batch = max_batch.filter(|&m| m > 0);
        self
    }

    fn denoise_all(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let sampling = self.unet.sampling();
        let t = sampling.timestep(sigma);
        let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
        let x_in = (x * c_in)?;
        let output = if (self.cfg - 1.0).abs() < f64::EPSILON {
            self.unet
                .forward(&x_in, t, &batched(&self.positive, batch)?, None)?
        } else {
            let both = Tensor::cat(&[&x_in, &x_in], 0)?;
            let context = Tensor::cat(
                &[
                    batched(&self.negative, batch)?,
                    batched(&self.positive, batch)?,
                ],
                0,
            )?;
            let out = self.unet.forward(&both, t, &context, None)?;
            let uncond = out.narrow(0, 0, batch)?;
            let cond = out.narrow(0, batch, batch)?;
            (&uncond + ((cond - &uncond)? * self.cfg)?)?
        };
        let output = output.to_device(x.device())?;
        Ok(match self.unet.config().prediction {
            Prediction::Epsilon => (x - (output * sigma)?)?,
            Prediction::V => {
                let c_skip = 1.0 / (sigma * sigma + 1.0);
                let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                ((x * c_skip)? + (output * c_out)?)?
            }
        })
    }
}

fn match_lengths(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (la, lb) = (a.dim(1)?, b.dim(1)?);
    if a.dim(2)? != b.dim(2)? {
        return Err(ModelError::InvalidInput(format!(
            "positive and negative conditioning widths differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        )));
    }
    if la == lb {
        return Ok((a.clone(), b.clone()));
    }
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    let lcm = la / gcd(la, lb) * lb;
    Ok((a.repeat((1, lcm / la, 1))?, b.repeat((1, lcm / lb, 1))?))
}

fn batched(cond: &Tensor, batch: usize) -> Result<Tensor> {
    let have = cond.dim(0)?;
    if have == batch {
        Ok(cond.clone())
    } else {
        Ok(cond.narrow(0, 0, 1)?.repeat((batch, 1, 1))?)
    }
}

impl Denoiser for GuidedDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let batch = x.dim(0)?;
        match self.max_batch {
            Some(max) if batch > max => {
                let mut chunks = Vec::with_capacity(batch.div_ceil(max));
                for start in (0..batch).step_by(max) {
                    let len = max.min(batch - start);
                    chunks.push(self.denoise_all(&x.narrow(0, start, len)?, sigma)?);
                }
                Ok(Tensor::cat(&chunks, 0)?)
            }
            _ => self.denoise_all(x, sigma),
        }
    }
}
