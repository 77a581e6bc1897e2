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
use super::config::{
    ClipActivation, Prediction, SdConfig, UnetConfig, VaeConfig, count_indices, dim_of,
    hf_clip_config, shapes_of,
};
use super::controlnet::{AppliedControl, Resample, fit_centre};
use super::embedding::EmbeddingSource;
use super::keymap::{
    LDM_UNET_PREFIX, LDM_VAE_PREFIX, Part, SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_PREFIX, clip_to_ldm, open_clip_to_ldm, open_clip_to_ldm_at, unet_to_ldm,
    vae_to_ldm,
};
use super::lora::{LoraFile, LoraStack};
use super::sampler::Denoiser;
use super::schedule::ModelSampling;
use super::tokenizer::ClipTokenizer;
use super::unet::{ControlResiduals, Unet};
use super::vae::VaeModel;
use super::weights::{MappedWeights, Renamer, TRANSPOSED, build_part};
use crate::error::{ModelError, Result};
use crate::store::WeightFile;

/// How a checkpoint stores its parts.
#[derive(Debug)]
enum Layout {
    /// One file in the original LDM key layout.
    Ldm(Arc<WeightFile>),
    /// Parts from files of their own (ComfyUI's split loaders), each with the key prefix
    /// found in it: a UNet in the LDM layout, text encoders in transformers' layout.
    Split {
        unet: Option<(Arc<WeightFile>, String)>,
        clip: Option<(Arc<WeightFile>, String)>,
        clip_g: Option<(Arc<WeightFile>, String)>,
    },
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

    /// A UNet alone (ComfyUI's `UNETLoader`), in the LDM layout with or without
    /// `model.diffusion_model.`. What a checkpoint would say about the rest is the family's
    /// (SDXL's latent scale when it has a class embedding, SD 1.x's otherwise).
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for other layouts; file and shape errors.
    pub fn open_unet(path: &Path) -> Result<Self> {
        let file = WeightFile::open(path)?;
        let shapes = shapes_of(&file);
        let prefix = if shapes.contains_key(&format!("{LDM_UNET_PREFIX}input_blocks.0.0.weight")) {
            LDM_UNET_PREFIX
        } else if shapes.contains_key("input_blocks.0.0.weight") {
            ""
        } else {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                reason: "not a UNet in the LDM layout (no input_blocks.0.0.weight)".into(),
            });
        };
        let unet = UnetConfig::infer_ldm(&dim_of(path, &shapes), &shapes, prefix)?;
        let mut config = SdConfig::v1_5();
        if unet.adm_in_channels.is_some() && !unet.is_lotus() {
            config.vae.scaling_factor = 0.13025;
        }
        config.prediction = if unet.is_lotus() {
            Prediction::ImgToImg
        } else if file.contains("v_pred") {
            Prediction::V
        } else {
            Prediction::Epsilon
        };
        config.unet = unet;
        config.zero_terminal_snr = file.contains("ztsnr");
        Ok(Self {
            path: path.to_path_buf(),
            layout: Layout::Split {
                unet: Some((Arc::new(file), prefix.to_string())),
                clip: None,
                clip_g: None,
            },
            config,
        })
    }

    /// Text encoders alone (ComfyUI's `CLIPLoader` with one file, `DualCLIPLoader` with
    /// SDXL's two) in transformers' layout: one file is SD 1.x's CLIP-L, or SD 2.x's
    /// OpenCLIP-H when 1024 wide; two are SDXL's CLIP-L and OpenCLIP-G (the one with a
    /// `text_projection`).
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for files that hold no text encoder, or a pair without
    /// exactly one projection; file and shape errors.
    pub fn open_text_encoders(paths: &[&Path]) -> Result<Self> {
        let mut encoders = Vec::with_capacity(paths.len());
        for path in paths {
            let file = WeightFile::open(path)?;
            let shapes = shapes_of(&file);
            let key = "text_model.embeddings.token_embedding.weight";
            let prefix = shapes
                .keys()
                .find_map(|k| k.strip_suffix(key))
                .ok_or_else(|| ModelError::Unsupported {
                    path: path.to_path_buf(),
                    reason: "not a text encoder in transformers' layout (no text_model.*)".into(),
                })?
                .to_string();
            let mut config = hf_clip_config(
                &dim_of(path, &shapes),
                &shapes,
                &format!("{prefix}text_model."),
            )?;
            let projection = shapes
                .get(&format!("{prefix}text_projection.weight"))
                .and_then(|s| s.first().copied());
            if config.width >= 1024 || projection.is_some() {
                // OpenCLIP towers: exact GELU, `!` padding, the penultimate layer.
                config.activation = ClipActivation::Gelu;
                config.pad_token = super::tokenizer::EXCLAMATION_TOKEN;
                config.default_stop_at_layer = -2;
            }
            encoders.push((Arc::new(file), prefix, config, projection));
        }
        let path = paths.first().map(|p| p.to_path_buf()).unwrap_or_default();
        let mut config = SdConfig::v1_5();
        let unsupported = |reason: &str| ModelError::Unsupported {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let (clip, clip_g) = match encoders.len() {
            1 => {
                let (file, prefix, clip, _) = encoders.remove(0);
                config.clip = clip;
                ((file, prefix), None)
            }
            2 => {
                encoders.sort_by_key(|e| e.3.is_some());
                let (g_file, g_prefix, mut g, projection) = encoders.pop().expect("two");
                let (l_file, l_prefix, mut l, none) = encoders.pop().expect("two");
                if projection.is_none() || none.is_some() {
                    return Err(unsupported(
                        "an SDXL pair is CLIP-L and OpenCLIP-G: one file with a text projection",
                    ));
                }
                for clip in [&mut l, &mut g] {
                    clip.default_stop_at_layer = -2;
                    clip.final_norm_on_hidden = false;
                }
                g.projection_dim = projection;
                config.clip = l;
                config.clip_g = Some(g);
                config.vae.scaling_factor = 0.13025;
                ((l_file, l_prefix), Some((g_file, g_prefix)))
            }
            _ => return Err(unsupported("one text encoder file, or SDXL's two")),
        };
        Ok(Self {
            path,
            layout: Layout::Split {
                unet: None,
                clip: Some(clip),
                clip_g,
            },
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
            (Layout::Ldm(file), Part::Clip | Part::ClipG) => {
                let sdxl = self.config.unet.adm_in_channels.is_some();
                (
                    file,
                    if sdxl {
                        "conditioner."
                    } else {
                        "cond_stage_model."
                    },
                )
            }
            (Layout::Diffusers { unet, .. }, Part::Unet) => (unet, ""),
            (Layout::Diffusers { vae, .. }, Part::Vae) => (vae, ""),
            (Layout::Diffusers { text_encoder, .. }, Part::Clip | Part::ClipG) => {
                (text_encoder, "")
            }
            (Layout::Split { .. }, part) => {
                let Some((file, prefix)) = self.split_part(part) else {
                    return 0;
                };
                (file, prefix.as_str())
            }
        };
        file.names()
            .iter()
            .filter(|n| n.starts_with(prefix))
            .filter_map(|n| file.info(n))
            .map(|info| (info.shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64)
            .sum()
    }

    /// A split checkpoint's file (and key prefix) for `part`, if it has one.
    fn split_part(&self, part: Part) -> Option<&(Arc<WeightFile>, String)> {
        let Layout::Split { unet, clip, clip_g } = &self.layout else {
            return None;
        };
        match part {
            Part::Unet => unet.as_ref(),
            Part::Clip => clip.as_ref(),
            Part::ClipG => clip_g.as_ref(),
            Part::Vae => None,
        }
    }

    fn backend(&self, part: Part, loras: Arc<LoraStack>) -> Result<MappedWeights> {
        Ok(match &self.layout {
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
                    Part::Clip if self.config.clip_g.is_some() => {
                        Box::new(|n| vec![format!("{SDXL_CLIP_L_PREFIX}{n}")])
                    }
                    Part::Clip if self.config.is_sdxl_refiner() => Box::new(|n| {
                        open_clip_to_ldm_at(SDXL_REFINER_CLIP_PREFIX, n)
                            .into_iter()
                            .collect()
                    }),
                    Part::Clip => Box::new(|n| {
                        let mut names = clip_to_ldm(n);
                        names.extend(open_clip_to_ldm(n));
                        names
                    }),
                    Part::ClipG => Box::new(|n| {
                        open_clip_to_ldm_at(SDXL_CLIP_G_PREFIX, n)
                            .into_iter()
                            .collect()
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
                    Part::Clip | Part::ClipG => text_encoder,
                };
                MappedWeights::new(file.clone(), part, Box::new(|n| vec![n.to_string()]), loras)
            }
            Layout::Split { .. } => {
                let Some((file, prefix)) = self.split_part(part) else {
                    return Err(ModelError::InvalidInput(format!(
                        "{} holds no {part:?} (a split loader's file)",
                        self.path.display()
                    )));
                };
                let prefix = prefix.clone();
                let rename: Renamer = match part {
                    Part::Unet => {
                        let config = self.config.unet.clone();
                        Box::new(move |n| {
                            unet_to_ldm(n, &config)
                                .map(|ldm| format!("{prefix}{}", &ldm[LDM_UNET_PREFIX.len()..]))
                                .into_iter()
                                .collect()
                        })
                    }
                    Part::ClipG => Box::new(move |n| {
                        if n == "text_projection" {
                            vec![format!("{prefix}text_projection.weight{TRANSPOSED}")]
                        } else {
                            vec![format!("{prefix}{n}")]
                        }
                    }),
                    _ => Box::new(move |n| vec![format!("{prefix}{n}")]),
                };
                MappedWeights::new(file.clone(), part, rename, loras)
            }
        })
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
            self.backend(Part::Unet, stack.clone())?,
            dtype,
            device,
            |vb| Unet::new(vb, &config),
        )?;
        warn_unused(&stack, "lora_unet_");
        Ok(UnetModel {
            unet: Arc::new(unet),
            config: self.config.clone(),
            sampling: if self.config.zero_terminal_snr {
                ModelSampling::default().zero_terminal_snr()
            } else {
                ModelSampling::default()
            },
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
            self.backend(Part::Clip, stack.clone())?,
            dtype,
            device,
            |vb| ClipTextModel::new(vb, &config),
        )?;
        let g = match &self.config.clip_g {
            Some(g_config) => Some(Arc::new(build_part(
                self.backend(Part::ClipG, stack.clone())?,
                dtype,
                device,
                |vb| ClipTextModel::new(vb, g_config),
            )?)),
            None => None,
        };
        warn_unused(&stack, "lora_te");
        Ok(ClipModel {
            stop_at_layer: config.default_stop_at_layer.min(-1),
            model: Arc::new(model),
            g,
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
            self.backend(Part::Vae, Arc::new(LoraStack::default()))?,
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

/// A standalone VAE file (ComfyUI's `models/vae/`): the LDM layout with or without
/// `first_stage_model.`, or diffusers' `AutoencoderKL` names. Its latents are in its own
/// scale; the model it decodes for applies its latent format inside sampling.
///
/// # Errors
/// [`ModelError::Unsupported`] for a file that holds no VAE; file and shape errors.
pub fn load_vae_file(path: &Path, device: &Device, dtype: DType) -> Result<VaeModel> {
    let file = Arc::new(WeightFile::open(path)?);
    let shapes = shapes_of(&file);
    let dim = dim_of(path, &shapes);
    let prefix = if shapes.contains_key("first_stage_model.decoder.conv_in.weight") {
        LDM_VAE_PREFIX
    } else {
        ""
    };
    let (config, rename): (VaeConfig, Renamer) =
        if shapes.contains_key(&format!("{prefix}encoder.down.0.block.0.conv1.weight")) {
            let config = VaeConfig::infer_ldm(&dim, &shapes, prefix)?;
            let layout = config.clone();
            let rename: Renamer = Box::new(move |n| {
                vae_to_ldm(n, &layout)
                    .map(|ldm| format!("{prefix}{}", &ldm[LDM_VAE_PREFIX.len()..]))
                    .into_iter()
                    .collect()
            });
            (config, rename)
        } else if shapes.contains_key("encoder.down_blocks.0.resnets.0.conv1.weight") {
            let levels = count_indices(&shapes, "encoder.down_blocks.");
            let config = VaeConfig {
                block_out_channels: (0..levels)
                    .map(|i| {
                        dim(
                            &format!("encoder.down_blocks.{i}.resnets.0.conv2.weight"),
                            0,
                        )
                    })
                    .collect::<Result<_>>()?,
                layers_per_block: count_indices(&shapes, "encoder.down_blocks.0.resnets."),
                latent_channels: dim("decoder.conv_in.weight", 1)?,
                norm_num_groups: 32,
                scaling_factor: 0.18215,
            };
            (config, Box::new(|n| vec![n.to_string()]))
        } else {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                reason: "not a VAE: no encoder.down.* (LDM) or encoder.down_blocks.* (diffusers)"
                    .to_string(),
            });
        };
    let backend = MappedWeights::new(file, Part::Vae, rename, Arc::new(LoraStack::default()));
    build_part(backend, dtype, device, |vb| VaeModel::new(vb, &config))
}

/// The denoising UNet of a checkpoint (ComfyUI's MODEL).
#[derive(Debug)]
pub struct UnetModel {
    unet: Arc<Unet>,
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
        self.forward_controlled(latents, t, context, y, None)
    }

    /// [`Self::forward`] with a ControlNet's residuals added.
    ///
    /// # Errors
    /// Tensor errors; a missing `y` on an SDXL model; residuals for another architecture.
    pub fn forward_controlled(
        &self,
        latents: &Tensor,
        t: f64,
        context: &Tensor,
        y: Option<&Tensor>,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let xs = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let context = context.to_device(&self.device)?.to_dtype(self.dtype)?;
        let y = y
            .map(|y| y.to_device(&self.device)?.to_dtype(self.dtype))
            .transpose()?;
        let control = control
            .map(|c| c.moved(&self.device, self.dtype))
            .transpose()?;
        Ok(self
            .unet
            .forward(&xs, t, &context, y.as_ref(), control.as_ref())?
            .to_dtype(DType::F32)?)
    }

    /// Whether the model takes a class vector `y` (SDXL).
    pub fn takes_y(&self) -> bool {
        self.unet.takes_y()
    }

    /// The same weights read as predicting `prediction`, on the noise table rescaled to
    /// zero terminal SNR or not (ComfyUI's `ModelSamplingDiscrete`).
    pub fn with_sampling(&self, prediction: Prediction, zero_terminal_snr: bool) -> Self {
        let mut config = self.config.clone();
        config.prediction = prediction;
        config.zero_terminal_snr = zero_terminal_snr;
        let base = ModelSampling::default();
        Self {
            unet: self.unet.clone(),
            config,
            sampling: if zero_terminal_snr {
                base.zero_terminal_snr()
            } else {
                base
            },
            device: self.device.clone(),
            dtype: self.dtype,
        }
    }

    /// What latents are multiplied by on their way in (its latent format: 0.18215 for SD
    /// 1.x/2.x, 0.13025 for SDXL) and divided by on their way out.
    pub fn latent_scale(&self) -> f64 {
        self.config.vae.scaling_factor
    }
}

/// The CLIP text encoder of a checkpoint (ComfyUI's CLIP), with its clip-skip setting.
#[derive(Debug, Clone)]
pub struct ClipModel {
    model: Arc<ClipTextModel>,
    /// SDXL's OpenCLIP-G, next to its CLIP-L in `model`.
    g: Option<Arc<ClipTextModel>>,
    stop_at_layer: i64,
    device: Device,
}

/// What a prompt encodes to: the UNet's context, and SDXL's pooled text embedding.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[1, tokens, width]` (f32).
    pub context: Tensor,
    /// `[1, projection]` (f32), from OpenCLIP-G's first window.
    pub pooled: Option<Tensor>,
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
    /// applied per token as ComfyUI does (`z_empty + (z - z_empty) * weight`). SDXL's two
    /// encoders both read `prompt`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn encode(&self, prompt: &str) -> Result<Tensor> {
        Ok(self.encode_pair(prompt, prompt)?.context)
    }

    /// `prompt` as conditioning for the sampler (context and, for SDXL, pooled output).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn condition(&self, prompt: &str) -> Result<TextConditioning> {
        self.condition_with(prompt, None)
    }

    /// [`Self::condition`] with the prompt's `embedding:name` words read from `embeddings`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn condition_with(
        &self,
        prompt: &str,
        embeddings: Option<&dyn EmbeddingSource>,
    ) -> Result<TextConditioning> {
        let Encoded { context, pooled } = self.encode_pair_with(prompt, prompt, embeddings)?;
        Ok(TextConditioning {
            pooled,
            ..TextConditioning::context(context)
        })
    }

    /// Whether this is SDXL's encoder pair.
    pub fn is_dual(&self) -> bool {
        self.g.is_some()
    }

    /// The context and pooled output: `prompt_l` through CLIP-L and `prompt_g` through
    /// OpenCLIP-G, concatenated along the width as ComfyUI's SDXL does (to the shorter
    /// token count). A single encoder reads `prompt_l` (and pools if it has a projection,
    /// as the refiner's OpenCLIP-G does).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn encode_pair(&self, prompt_l: &str, prompt_g: &str) -> Result<Encoded> {
        self.encode_pair_with(prompt_l, prompt_g, None)
    }

    /// [`Self::encode_pair`] with the prompts' `embedding:name` words read from
    /// `embeddings`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn encode_pair_with(
        &self,
        prompt_l: &str,
        prompt_g: &str,
        embeddings: Option<&dyn EmbeddingSource>,
    ) -> Result<Encoded> {
        let (l, l_pooled) = encode_prompt(
            &self.model,
            prompt_l,
            self.stop_at_layer,
            &self.device,
            (embeddings, if self.g.is_some() { "clip_l" } else { "clip" }),
        )?;
        let Some(g) = &self.g else {
            return Ok(Encoded {
                context: l,
                pooled: l_pooled,
            });
        };
        let (g, pooled) = encode_prompt(
            g,
            prompt_g,
            self.stop_at_layer,
            &self.device,
            (embeddings, "clip_g"),
        )?;
        let tokens = l.dim(1)?.min(g.dim(1)?);
        let context = Tensor::cat(&[l.narrow(1, 0, tokens)?, g.narrow(1, 0, tokens)?], 2)?;
        Ok(Encoded { context, pooled })
    }

    /// Hidden states for explicit token windows `[B, 77]` (u32), for tests and tools.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn encode_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        if self.g.is_some() {
            return Err(ModelError::InvalidInput(
                "encode_tokens reads one encoder; SDXL's pair needs encode_pair".into(),
            ));
        }
        Ok(self
            .model
            .forward(&tokens.to_device(&self.device)?, self.stop_at_layer)?
            .to_dtype(DType::F32)?)
    }
}

/// One encoder's hidden states for `prompt` (windows, emphasis) and, where it has a
/// projection, the pooled output of the first window.
/// Its `embedding:name` words come from `embeddings` (as text when it has none by that
/// name), read for `encoder` (`clip_l` or `clip_g`).
fn encode_prompt(
    model: &ClipTextModel,
    prompt: &str,
    stop_at_layer: i64,
    device: &Device,
    (embeddings, encoder): (Option<&dyn EmbeddingSource>, &str),
) -> Result<(Tensor, Option<Tensor>)> {
    let pad = model.config().pad_token;
    let tokenizer = ClipTokenizer::shared();
    let (vocab, width) = (model.config().vocab_size as u32, model.config().width);
    let mut rows: Vec<Tensor> = Vec::new();
    let mut embed = |name: &str| -> Option<Vec<u32>> {
        let vectors = embeddings?.embedding(name, width, encoder)?;
        let first = vocab + rows.iter().map(|r| r.dim(0).unwrap_or(0)).sum::<usize>() as u32;
        let count = vectors.dim(0).ok()? as u32;
        rows.push(vectors);
        Some((first..first + count).collect())
    };
    let windows = tokenizer.encode_weighted_windows_with(prompt, pad, &mut embed);
    let extra = if rows.is_empty() {
        None
    } else {
        Some(Tensor::cat(&rows, 0)?)
    };
    let run = |ids: &[u32], pooled: bool| -> Result<(Tensor, Option<Tensor>)> {
        let tokens = Tensor::new(ids, device)?.unsqueeze(0)?;
        let (hidden, pooled) =
            model.forward_pooled(&tokens, stop_at_layer, pooled, extra.as_ref())?;
        Ok((
            hidden.to_dtype(DType::F32)?,
            pooled.map(|p| p.to_dtype(DType::F32)).transpose()?,
        ))
    };
    let weighted = windows.iter().flatten().any(|&(_, w)| w != 1.0);
    let empty = if weighted {
        Some(run(&tokenizer.encode_windows("", pad)[0], false)?.0)
    } else {
        None
    };
    let mut encoded = Vec::with_capacity(windows.len());
    let mut first_pooled = None;
    for (i, window) in windows.iter().enumerate() {
        let ids: Vec<u32> = window.iter().map(|&(id, _)| id).collect();
        let (z, pooled) = run(&ids, i == 0)?;
        if i == 0 {
            first_pooled = pooled;
        }
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
    Ok((Tensor::cat(&encoded, 1)?, first_pooled))
}

/// SDXL's size conditioning, in pixels: the original size, the crop's top-left corner and
/// the target size (`CLIPTextEncodeSDXL`'s widgets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizeConditioning {
    pub width: f64,
    pub height: f64,
    pub crop_w: f64,
    pub crop_h: f64,
    pub target_width: f64,
    pub target_height: f64,
}

impl SizeConditioning {
    /// An uncropped image of `width` x `height`, the target its own size (what ComfyUI
    /// assumes for a plain `CLIPTextEncode`, from the latent's size).
    pub fn plain(width: f64, height: f64) -> Self {
        Self {
            width,
            height,
            crop_w: 0.0,
            crop_h: 0.0,
            target_width: width,
            target_height: height,
        }
    }
}

/// One prompt's conditioning (ComfyUI's CONDITIONING).
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// `[1, tokens, width]`: what the UNet attends to.
    pub context: Tensor,
    /// `[1, projection]`: SDXL's pooled text embedding.
    pub pooled: Option<Tensor>,
    /// SDXL's size conditioning; `None` takes it from the latent.
    pub size: Option<SizeConditioning>,
    /// The SDXL refiner's aesthetic score; `None` is ComfyUI's 6 (2.5 for a negative).
    pub aesthetic_score: Option<f64>,
    /// Where on the latent this prompt applies (`ConditioningSetArea`); everywhere if none.
    pub area: Option<Area>,
    /// Where and how much it applies by mask (`ConditioningSetMask`): `[1, h, w]` at any
    /// size (resized to the latent) and its strength.
    pub mask: Option<(Tensor, f64)>,
    /// Weight against the other prompts it is combined with (1 by default).
    pub strength: f64,
    /// The ControlNet (chain) that guides the UNet for this prompt.
    pub control: Option<Arc<AppliedControl>>,
    /// What an inpainting UNet reads beside the latent (`InpaintModelConditioning`).
    pub inpaint: Option<InpaintConcat>,
    /// Images whose CLIP embeddings stand in for the pooled text embedding at sampling
    /// time (`unCLIPConditioning`, SDXL revision).
    pub unclip: Vec<super::clip_vision::UnclipEntry>,
}

/// What an inpainting UNet (4 more input channels than output, plus the mask) reads beside
/// the noisy latent: the mask and the masked pixels encoded, as ComfyUI's `concat_cond`.
#[derive(Debug, Clone)]
pub struct InpaintConcat {
    /// The pixels with the repainted area greyed out, encoded, in the VAE's own scale.
    pub latent: Tensor,
    /// `[b, 1, H, W]` at any size; 1 is repainted.
    pub mask: Tensor,
}

/// Channels an inpainting UNet takes beside the latent: the mask and the masked image.
const INPAINT_EXTRA_CHANNELS: usize = 5;

/// ComfyUI's latent of a blank (grey) image in SD's latent format, per channel: what an
/// inpainting UNet is shown where nothing is masked.
const BLANK_INPAINT_LATENT: [f32; 4] = [0.8223, -0.6876, 0.6364, 0.1380];

/// A rectangle of the latent: in cells, or in fractions of its size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Area {
    /// `(height, width, top, left)` in latent cells.
    Cells(usize, usize, usize, usize),
    /// `(height, width, top, left)` as fractions of the latent's size.
    Fraction(f64, f64, f64, f64),
    /// The bounding box of the prompt's mask (resolved with the mask at the latent's size;
    /// the whole latent until then).
    MaskBounds,
}

impl Area {
    /// `(top, left, height, width)` in cells on a latent of `h x w`, clipped to it.
    fn on(self, h: usize, w: usize) -> (usize, usize, usize, usize) {
        let (ah, aw, top, left) = match self {
            Area::Cells(ah, aw, top, left) => (ah, aw, top, left),
            Area::Fraction(fh, fw, ft, fl) => (
                ((fh * h as f64).round() as usize).max(1),
                ((fw * w as f64).round() as usize).max(1),
                (ft * h as f64).round() as usize,
                (fl * w as f64).round() as usize,
            ),
            Area::MaskBounds => (h, w, 0, 0),
        };
        let (top, left) = (top.min(h.saturating_sub(1)), left.min(w.saturating_sub(1)));
        (top, left, ah.min(h - top).max(1), aw.min(w - left).max(1))
    }
}

impl TextConditioning {
    /// Conditioning that is only a context.
    pub fn context(context: Tensor) -> Self {
        Self {
            context,
            pooled: None,
            size: None,
            aesthetic_score: None,
            area: None,
            mask: None,
            strength: 1.0,
            control: None,
            inpaint: None,
            unclip: Vec::new(),
        }
    }

    /// The same prompt with its unCLIP images turned into SDXL's pooled embedding for a
    /// `y` of `adm` values (the refiner's when `refiner`), with the sampler's `seed`.
    ///
    /// # Errors
    /// As [`super::clip_vision::unclip_pooled`]; a model without `y`.
    pub fn with_unclip_resolved(
        &self,
        adm: Option<usize>,
        refiner: bool,
        seed: u64,
    ) -> Result<Self> {
        if self.unclip.is_empty() {
            return Ok(self.clone());
        }
        let Some(adm) = adm else {
            return Err(ModelError::InvalidInput(
                "unCLIP conditioning needs a model that reads image embeddings (SDXL); this \
                 one does not"
                    .into(),
            ));
        };
        let sizes = if refiner { 5 } else { 6 } * 256;
        let width = adm.checked_sub(sizes).ok_or_else(|| {
            ModelError::InvalidInput(format!("SDXL y of width {adm} has no room for sizes"))
        })?;
        let pooled = super::clip_vision::unclip_pooled(
            &self.unclip,
            width,
            &mut super::clip_vision::unclip_noise(seed),
        )?;
        Ok(Self {
            pooled: Some(pooled),
            ..self.clone()
        })
    }

    /// Whether it applies everywhere at full weight without a ControlNet (the fast,
    /// batched path).
    fn is_plain(&self) -> bool {
        self.area.is_none() && self.mask.is_none() && self.strength == 1.0 && self.control.is_none()
    }

    /// SDXL's class vector `y` `[1, adm]` for a latent of `latent_hw` cells: the pooled
    /// embedding (zeros without one), then 256-wide sinusoidal embeddings of height, width,
    /// crop top, crop left, and target height and width (the base model) or the aesthetic
    /// score (the refiner, whose `y` is one embedding shorter), as ComfyUI's `encode_adm`.
    /// `negative` picks the refiner's default score for a negative prompt.
    ///
    /// # Errors
    /// A pooled embedding of another width than `adm` leaves room for.
    pub fn sdxl_y(
        &self,
        adm: usize,
        refiner: bool,
        negative: bool,
        latent_hw: (usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        const FOURIER: usize = 256;
        let size = self.size.unwrap_or_else(|| {
            SizeConditioning::plain((latent_hw.1 * 8) as f64, (latent_hw.0 * 8) as f64)
        });
        let mut values = vec![size.height, size.width, size.crop_h, size.crop_w];
        if refiner {
            let default = if negative { 2.5 } else { 6.0 };
            values.push(self.aesthetic_score.unwrap_or(default));
        } else {
            values.extend([size.target_height, size.target_width]);
        }
        let embedded_width = values.len() * FOURIER;
        let pooled_width = adm.checked_sub(embedded_width).ok_or_else(|| {
            ModelError::InvalidInput(format!("SDXL y of width {adm} has no room for sizes"))
        })?;
        let pooled = match &self.pooled {
            Some(p) if p.dim(1)? == pooled_width => p.to_dtype(DType::F32)?.to_device(device)?,
            Some(p) => {
                return Err(ModelError::InvalidInput(format!(
                    "pooled text embedding of width {} where the model takes {pooled_width}",
                    p.dim(1)?
                )));
            }
            None => Tensor::zeros((1, pooled_width), DType::F32, device)?,
        };
        let half = FOURIER / 2;
        let mut embedded = Vec::with_capacity(embedded_width);
        for value in values {
            let args: Vec<f64> = (0..half)
                .map(|i| value * (-(10000f64.ln()) * i as f64 / half as f64).exp())
                .collect();
            embedded.extend(args.iter().map(|a| a.cos() as f32));
            embedded.extend(args.iter().map(|a| a.sin() as f32));
        }
        let embedded = Tensor::from_vec(embedded, (1, embedded_width), device)?;
        Ok(Tensor::cat(&[pooled, embedded], 1)?)
    }
}

/// One prompt as the sampler evaluates it.
#[derive(Debug)]
struct Prompt {
    context: Tensor,
    y: Option<Tensor>,
    area: Option<Area>,
    /// `[1 or batch, 1, h, w]` at the latent's size, times its strength.
    mask: Option<Tensor>,
    strength: f64,
    control: Option<Arc<AppliedControl>>,
    inpaint: Option<InpaintConcat>,
}

/// The positive and negative contexts, matched in length, and their SDXL class vectors.
type PromptPair = (Tensor, Tensor, Option<(Tensor, Tensor)>);

/// What an inpainting UNet is shown when a prompt brings nothing: the latent being sampled
/// (in the model's scale) and its noise mask at latent size.
type InpaintSource = (Tensor, Option<Tensor>);

/// Classifier-free guided denoiser over a [`UnetModel`].
#[derive(Debug)]
pub struct GuidedDenoiser<'a> {
    unet: &'a UnetModel,
    /// One plain prompt each side: both run as one batch, contexts matched in length, with
    /// SDXL's class vectors.
    pair: Option<PromptPair>,
    /// Otherwise every prompt runs on its area and the outputs are averaged by weight.
    positive: Vec<Prompt>,
    negative: Vec<Prompt>,
    cfg: f64,
    max_batch: Option<usize>,
    /// The plain pair's inpainting inputs, positive then negative.
    pair_inpaint: (Option<InpaintConcat>, Option<InpaintConcat>),
    source: Option<InpaintSource>,
}

impl<'a> GuidedDenoiser<'a> {
    /// Guidance `cfg` between the `negative` and `positive` prompts for latents of
    /// `latent_hw` cells (SDXL's default size conditioning). Prompts combined on one side
    /// (`ConditioningCombine`) run each on its area or mask (which must be at the latent's
    /// size already) and are averaged by weight, as ComfyUI does; a lone plain prompt per
    /// side runs batched with the other.
    ///
    /// # Errors
    /// No positive prompt, no negative one with guidance, or conditioning widths that
    /// differ.
    pub fn new(
        unet: &'a UnetModel,
        positive: &[TextConditioning],
        negative: &[TextConditioning],
        cfg: f64,
        latent_hw: (usize, usize),
    ) -> Result<Self> {
        let guided = (cfg - 1.0).abs() >= f64::EPSILON;
        let (Some(first), false) = (positive.first(), guided && negative.is_empty()) else {
            return Err(ModelError::InvalidInput(
                "sampling needs a positive prompt, and a negative one when cfg is not 1".into(),
            ));
        };
        let refiner = unet.config().is_sdxl_refiner();
        let y_of = |c: &TextConditioning, negative: bool| -> Result<Option<Tensor>> {
            if unet.config().unet.is_lotus() {
                return Ok(Some(lotus_task(unet.device())?));
            }
            match unet.config().unet.adm_in_channels {
                Some(adm) => Ok(Some(c.sdxl_y(
                    adm,
                    refiner,
                    negative,
                    latent_hw,
                    unet.device(),
                )?)),
                None => Ok(None),
            }
        };
        let negative = &negative_with_controls(positive, negative);
        let plain = positive.len() == 1
            && negative.len() <= 1
            && positive
                .iter()
                .chain(negative)
                .all(TextConditioning::is_plain);
        if plain {
            let other = negative.first().unwrap_or(first);
            let (pos, neg) = match_lengths(&first.context, &other.context)?;
            let y = match (y_of(first, false)?, y_of(other, true)?) {
                (Some(p), Some(n)) => Some((p, n)),
                _ => None,
            };
            return Ok(Self {
                unet,
                pair: Some((pos, neg, y)),
                positive: Vec::new(),
                negative: Vec::new(),
                cfg,
                max_batch: None,
                pair_inpaint: (first.inpaint.clone(), other.inpaint.clone()),
                source: None,
            });
        }
        let prompts = |side: &[TextConditioning], negative: bool| -> Result<Vec<Prompt>> {
            side.iter()
                .map(|c| {
                    Ok(Prompt {
                        context: c.context.clone(),
                        y: y_of(c, negative)?,
                        area: c.area,
                        mask: c.mask.as_ref().map(|(m, s)| m * *s).transpose()?,
                        strength: c.strength,
                        control: c.control.clone(),
                        inpaint: c.inpaint.clone(),
                    })
                })
                .collect()
        };
        Ok(Self {
            unet,
            pair: None,
            positive: prompts(positive, false)?,
            negative: prompts(negative, true)?,
            cfg,
            max_batch: None,
            pair_inpaint: (None, None),
            source: None,
        })
    }

    /// The latent being sampled (in the model's scale) and its noise mask at latent size:
    /// what an inpainting UNet reads where a prompt brings no inpainting inputs of its own.
    ///
    /// # Errors
    /// A UNet that takes extra input channels other than an inpainting one's.
    pub fn with_inpaint_source(mut self, latent: &Tensor, mask: Option<&Tensor>) -> Result<Self> {
        if self.extra_channels()? > 0 {
            self.source = Some((latent.clone(), mask.cloned()));
        }
        Ok(self)
    }

    /// Input channels beside the latent: 0, or an inpainting UNet's 5.
    fn extra_channels(&self) -> Result<usize> {
        let unet = &self.unet.config().unet;
        match unet.in_channels.saturating_sub(unet.out_channels) {
            0 => Ok(0),
            INPAINT_EXTRA_CHANNELS => Ok(INPAINT_EXTRA_CHANNELS),
            other => Err(ModelError::InvalidInput(format!(
                "the UNet takes {other} input channels beside the latent; only inpainting \
                 UNets ({INPAINT_EXTRA_CHANNELS}: mask and masked image) are supported"
            ))),
        }
    }

    /// `x_in` with the inpainting inputs appended for an inpainting UNet: the prompt's own,
    /// else the sampled latent and its noise mask, else no mask and a blank image, each
    /// fitted to `x_in`'s size and batch (ComfyUI's `concat_cond`).
    fn with_concat(&self, x_in: &Tensor, inpaint: Option<&InpaintConcat>) -> Result<Tensor> {
        if self.extra_channels()? == 0 {
            return Ok(x_in.clone());
        }
        let (batch, _, h, w) = x_in.dims4()?;
        let device = x_in.device();
        let (latent, mask) = match (inpaint, &self.source) {
            (Some(c), _) => (
                (&c.latent * self.unet.latent_scale())?,
                Some(c.mask.clone()),
            ),
            (None, Some((latent, mask))) => (latent.clone(), mask.clone()),
            (None, None) => {
                return Err(ModelError::InvalidInput(
                    "an inpainting UNet needs the latent being sampled".into(),
                ));
            }
        };
        let fit = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            let t = fit_centre(&t, h, w, Resample::Bilinear)?;
            let b = t.dim(0)?;
            Ok(if b == batch {
                t
            } else {
                t.narrow(0, 0, 1)?.repeat((batch, 1, 1, 1))?
            })
        };
        let parts = match mask {
            Some(mask) => {
                let mask = match mask.rank() {
                    4 => mask.narrow(1, 0, 1)?,
                    3 => mask.unsqueeze(1)?,
                    _ => mask.reshape((1, 1, mask.dim(0)?, mask.dim(1)?))?,
                };
                [round_half_even(&fit(&mask)?)?, fit(&latent)?]
            }
            None => {
                let blank = Tensor::from_vec(BLANK_INPAINT_LATENT.to_vec(), (1, 4, 1, 1), device)?
                    .broadcast_as((batch, 4, h, w))?
                    .contiguous()?;
                [Tensor::ones((batch, 1, h, w), DType::F32, device)?, blank]
            }
        };
        let concat = Tensor::cat(&parts, 1)?.to_dtype(x_in.dtype())?;
        Ok(Tensor::cat(&[x_in, &concat], 1)?)
    }

    /// Runs the UNet on at most `max_batch` latents at a time (`None`: the whole batch).
    /// Each latent is denoised on its own either way, so only peak memory changes: this is
    /// how a batch that ran out of device memory is split for its retry.
    pub fn with_max_batch(mut self, max_batch: Option<usize>) -> Self {
        self.max_batch = max_batch.filter(|&m| m > 0);
        self
    }

    /// The guided estimate and, with `want_uncond` (or where guidance needs it anyway),
    /// the negative prompt's own.
    fn denoise_all(
        &self,
        x: &Tensor,
        sigma: f64,
        want_uncond: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let batch = x.dim(0)?;
        let sampling = self.unet.sampling();
        let t = sampling.timestep(sigma);
        let prediction = self.unet.config().prediction;
        let c_in = if prediction == Prediction::ImgToImg {
            1.0
        } else {
            1.0 / (sigma * sigma + 1.0).sqrt()
        };
        let x_in = (x * c_in)?;
        let guided = (self.cfg - 1.0).abs() >= f64::EPSILON;
        let both = guided || want_uncond;
        let (cond, uncond) = match &self.pair {
            Some(pair) => self.pair_output(pair, &x_in, t, batch, both)?,
            None => {
                let cond = self.averaged(&self.positive, &x_in, sigma, batch)?;
                let uncond = if both && !self.negative.is_empty() {
                    Some(self.averaged(&self.negative, &x_in, sigma, batch)?)
                } else {
                    None
                };
                (cond, uncond)
            }
        };
        let output = match &uncond {
            Some(uncond) if guided => (uncond + ((cond - uncond)? * self.cfg)?)?,
            _ => cond,
        };
        let denoised = |output: Tensor| -> Result<Tensor> {
            let output = output.to_device(x.device())?;
            Ok(match prediction {
                Prediction::Epsilon => (x - (output * sigma)?)?,
                Prediction::X0 | Prediction::ImgToImg => output,
                Prediction::V => {
                    let c_skip = 1.0 / (sigma * sigma + 1.0);
                    let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
                    ((x * c_skip)? + (output * c_out)?)?
                }
            })
        };
        let uncond = match uncond {
            Some(u) if want_uncond => Some(denoised(u)?),
            _ => None,
        };
        Ok((denoised(output)?, uncond))
    }

    /// One plain prompt each side, run as one batch (the positive alone without `both`):
    /// the positive's output and the negative's.
    fn pair_output(
        &self,
        (positive, negative, y): &PromptPair,
        x_in: &Tensor,
        t: f64,
        batch: usize,
        both: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (positive_inpaint, negative_inpaint) = &self.pair_inpaint;
        if !both {
            let y = match y {
                Some((positive, _)) => Some(batched(positive, batch)?),
                None => None,
            };
            let x_in = self.with_concat(x_in, positive_inpaint.as_ref())?;
            let cond = self
                .unet
                .forward(&x_in, t, &batched(positive, batch)?, y.as_ref())?;
            return Ok((cond, None));
        }
        let both = Tensor::cat(
            &[
                self.with_concat(x_in, negative_inpaint.as_ref())?,
                self.with_concat(x_in, positive_inpaint.as_ref())?,
            ],
            0,
        )?;
        let context = Tensor::cat(&[batched(negative, batch)?, batched(positive, batch)?], 0)?;
        let y = match y {
            Some((positive, negative)) => Some(Tensor::cat(
                &[batched(negative, batch)?, batched(positive, batch)?],
                0,
            )?),
            None => None,
        };
        let out = self.unet.forward(&both, t, &context, y.as_ref())?;
        let uncond = out.narrow(0, 0, batch)?;
        let cond = out.narrow(0, batch, batch)?;
        Ok((cond, Some(uncond)))
    }

    /// Each prompt on its area, weighted by its mask or an 8-cell fade at area edges inside
    /// the latent, times its strength; the outputs averaged by those weights (0 where no
    /// prompt reaches), as ComfyUI's `calc_cond_batch`.
    fn averaged(
        &self,
        prompts: &[Prompt],
        x_in: &Tensor,
        sigma: f64,
        batch: usize,
    ) -> Result<Tensor> {
        let (_, _, h, w) = x_in.dims4()?;
        let device = self.unet.device();
        let sampling = self.unet.sampling();
        let t = sampling.timestep(sigma);
        let mut sum: Option<Tensor> = None;
        let mut weight: Option<Tensor> = None;
        for prompt in prompts {
            let (top, left, ah, aw) = prompt.area.map_or((0, 0, h, w), |a| a.on(h, w));
            let crop = x_in.narrow(2, top, ah)?.narrow(3, left, aw)?;
            let y = prompt.y.as_ref().map(|y| batched(y, batch)).transpose()?;
            let context = batched(&prompt.context, batch)?;
            let control = match &prompt.control {
                Some(control) => control.residuals(sampling, &crop, sigma, &context, y.as_ref())?,
                None => None,
            };
            // An inpainting UNet's inputs are fitted to the whole latent, then cropped with it.
            let input = if self.extra_channels()? == 0 {
                crop.clone()
            } else {
                self.with_concat(x_in, prompt.inpaint.as_ref())?
                    .narrow(2, top, ah)?
                    .narrow(3, left, aw)?
            };
            let out =
                self.unet
                    .forward_controlled(&input, t, &context, y.as_ref(), control.as_ref())?;
            let mult = match &prompt.mask {
                Some(mask) => (mask.narrow(2, top, ah)?.narrow(3, left, aw)? * prompt.strength)?,
                None => {
                    let fade = prompt.area.map(|_| (top, left, ah, aw, h, w));
                    (edge_fade(ah, aw, fade, device)? * prompt.strength)?
                }
            }
            .to_device(out.device())?
            .to_dtype(out.dtype())?;
            let place = |t: Tensor| -> Result<Tensor> {
                Ok(t.pad_with_zeros(2, top, h - top - ah)?.pad_with_zeros(
                    3,
                    left,
                    w - left - aw,
                )?)
            };
            let weighted = place(out.broadcast_mul(&mult)?)?;
            let mult = place(mult)?;
            sum = Some(match sum {
                Some(s) => (s + weighted)?,
                None => weighted,
            });
            weight = Some(match weight {
                Some(w) => w.broadcast_add(&mult)?,
                None => mult,
            });
        }
        let (Some(sum), Some(weight)) = (sum, weight) else {
            return Err(ModelError::InvalidInput("no prompt on this side".into()));
        };
        Ok(sum.broadcast_div(&weight.clamp(1e-37, f32::MAX)?)?)
    }
}

/// The negative prompts, with the positive prompts' ControlNets applied by `ControlNetApply`
/// given to them, as ComfyUI's `apply_empty_x_to_equal_area` does: only when no negative
/// prompt without an area has one, each such ControlNet to the next negative prompt without
/// an area, cycling, a copy added for each past the last.
fn negative_with_controls(
    positive: &[TextConditioning],
    negative: &[TextConditioning],
) -> Vec<TextConditioning> {
    let mut out = negative.to_vec();
    let controls: Vec<_> = positive
        .iter()
        .filter(|c| c.area.is_none())
        .filter_map(|c| c.control.clone().filter(|c| c.apply_to_uncond))
        .collect();
    let open: Vec<usize> = (0..negative.len())
        .filter(|&i| negative[i].area.is_none())
        .collect();
    if controls.is_empty() || open.is_empty() || open.iter().any(|&i| negative[i].control.is_some())
    {
        return out;
    }
    for (k, control) in controls.into_iter().enumerate() {
        let slot = open[k % open.len()];
        if k < open.len() {
            out[slot].control = Some(control);
        } else {
            let mut copy = negative[slot].clone();
            copy.control = Some(control);
            out.push(copy);
        }
    }
    out
}

/// Lotus's task embedding `[1, 4]`: sin and cos of (1, 0), as ComfyUI's `Lotus.extra_conds`.
fn lotus_task(device: &Device) -> Result<Tensor> {
    let task = [1f32, 0.0];
    let values: Vec<f32> = task
        .iter()
        .map(|t| t.sin())
        .chain(task.iter().map(|t| t.cos()))
        .collect();
    Ok(Tensor::from_vec(values, (1, 4), device)?)
}

/// `torch.round`: halves go to the even neighbour (a resized mask is often exactly 0.5).
fn round_half_even(t: &Tensor) -> Result<Tensor> {
    let values: Vec<f32> = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::round_ties_even)
        .collect();
    Ok(Tensor::from_vec(values, t.dims(), t.device())?)
}

/// A `[1, 1, ah, aw]` weight: ones, faded over 8 cells at each edge of an area that lies
/// inside the latent (`fade`: top, left, height, width of the area and of the latent).
fn edge_fade(
    ah: usize,
    aw: usize,
    fade: Option<(usize, usize, usize, usize, usize, usize)>,
    device: &Device,
) -> Result<Tensor> {
    const RAMP: usize = 8;
    let mut rows = vec![1f32; ah];
    let mut cols = vec![1f32; aw];
    if let Some((top, left, ah, aw, h, w)) = fade {
        for (line, start, len, full) in [(&mut rows, top, ah, h), (&mut cols, left, aw, w)] {
            for t in 0..RAMP.min(len) {
                let factor = (t + 1) as f32 / RAMP as f32;
                if start != 0 {
                    line[t] *= factor;
                }
                if start + len < full {
                    line[len - 1 - t] *= factor;
                }
            }
        }
    }
    let rows = Tensor::from_vec(rows, (1, 1, ah, 1), device)?;
    let cols = Tensor::from_vec(cols, (1, 1, 1, aw), device)?;
    Ok(rows.broadcast_mul(&cols)?)
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
        let mut repeats = vec![1; cond.rank()];
        repeats[0] = batch;
        Ok(cond.narrow(0, 0, 1)?.repeat(repeats)?)
    }
}

impl GuidedDenoiser<'_> {
    /// [`Self::denoise_all`] over chunks of at most `max_batch` latents.
    fn chunked(
        &self,
        x: &Tensor,
        sigma: f64,
        want_uncond: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let batch = x.dim(0)?;
        let max = match self.max_batch {
            Some(max) if batch > max => max,
            _ => return self.denoise_all(x, sigma, want_uncond),
        };
        let mut outs = Vec::with_capacity(batch.div_ceil(max));
        let mut unconds = Vec::new();
        for start in (0..batch).step_by(max) {
            let len = max.min(batch - start);
            let (out, uncond) = self.denoise_all(&x.narrow(0, start, len)?, sigma, want_uncond)?;
            outs.push(out);
            unconds.extend(uncond);
        }
        let uncond = if unconds.len() == outs.len() {
            Some(Tensor::cat(&unconds, 0)?)
        } else {
            None
        };
        Ok((Tensor::cat(&outs, 0)?, uncond))
    }
}

impl Denoiser for GuidedDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(self.chunked(x, sigma, false)?.0)
    }

    fn denoise_with_uncond(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)> {
        let (out, uncond) = self.chunked(x, sigma, true)?;
        let uncond = match uncond {
            Some(uncond) => uncond,
            None => out.clone(),
        };
        Ok((out, uncond))
    }
}
