//! ControlNets for SD 1.x/2.x and SDXL: a trainable copy of the UNet's encoder that reads a
//! hint image (edges, line art, depth, pose) and adds one residual per skip connection and
//! one to the middle block of the UNet it guides, as ComfyUI's `comfy/cldm` and
//! `comfy/controlnet.py` run them.
//!
//! T2I adapters load here too, as ComfyUI's ControlNet loader takes them
//! ([`super::t2i_adapter`]).
//!
//! Files come in two layouts: the original LDM one (`input_hint_block.*`, `zero_convs.*`,
//! `middle_block_out.*`, the encoder as `input_blocks.*`, with or without
//! `control_model.`), and diffusers' (`controlnet_cond_embedding.*`,
//! `controlnet_down_blocks.*`, `controlnet_mid_block.*`), which is what the modules here
//! ask for, so the LDM layout is read through the UNet key map.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Device, Module, Tensor, TensorId};
use candle_nn::{Conv2d, VarBuilder};

use super::SdConfig;
use super::config::{
    CONFIG_METADATA_KEY, Shapes, UnetConfig, UnetLevel, count_indices, dim_of, shapes_of,
};
use super::keymap::{LDM_UNET_PREFIX, Part, unet_to_ldm};
use super::lora::LoraStack;
use super::schedule::ModelSampling;
use super::t2i_adapter::{AdapterConfig, T2iAdapter, is_adapter};
use super::unet::{ControlResiduals, PADDED, UnetEncoder};
use super::weights::{MappedWeights, build_part};
use crate::error::{ModelError, Result};
use crate::store::WeightFile;

/// Channels of the hint encoder's convolutions, the last one the model's base width.
const HINT_CHANNELS: [usize; 7] = [16, 16, 32, 32, 96, 96, 256];
/// Which of them halve the image (three halvings: the hint is read at 8x the latent).
const HINT_STRIDES: [usize; 7] = [1, 1, 2, 1, 2, 1, 2];

/// What a ControlNet file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetConfig {
    /// The encoder, shaped as the UNet it was trained beside.
    pub unet: UnetConfig,
    /// Channels of the hint image (3 for RGB hints).
    pub hint_channels: usize,
    /// Shuffle ControlNets average their residuals over the image (ComfyUI enables it by
    /// file name, `*_shuffle`).
    pub global_average_pooling: bool,
}

/// The ControlNet network.
#[derive(Debug)]
pub struct ControlNet {
    encoder: UnetEncoder,
    hint: Vec<Conv2d>,
    hint_out: Conv2d,
    zero_convs: Vec<Conv2d>,
    middle_out: Conv2d,
}

impl ControlNet {
    /// Builds the ControlNet of `config` from `vb` (diffusers names).
    ///
    /// # Errors
    /// When a weight is missing or misshapen.
    pub fn new(vb: VarBuilder<'_>, config: &ControlNetConfig) -> candle_core::Result<Self> {
        let unet = &config.unet;
        let encoder = UnetEncoder::new(&vb, unet)?;
        let embedding = vb.pp("controlnet_cond_embedding");
        let mut hint = Vec::with_capacity(HINT_CHANNELS.len());
        let mut previous = config.hint_channels;
        for (i, (&channels, &stride)) in HINT_CHANNELS.iter().zip(&HINT_STRIDES).enumerate() {
            let name = if i == 0 {
                "conv_in".to_string()
            } else {
                format!("blocks.{}", i - 1)
            };
            let conv = candle_nn::Conv2dConfig { stride, ..PADDED };
            hint.push(candle_nn::conv2d(
                previous,
                channels,
                3,
                conv,
                embedding.pp(name),
            )?);
            previous = channels;
        }
        let base = unet.levels[0].channels;
        let hint_out = candle_nn::conv2d(previous, base, 3, PADDED, embedding.pp("conv_out"))?;
        let mut zero_convs = Vec::new();
        let one = candle_nn::Conv2dConfig::default();
        for (i, channels) in skip_channels(unet).into_iter().enumerate() {
            zero_convs.push(candle_nn::conv2d(
                channels,
                channels,
                1,
                one,
                vb.pp(format!("controlnet_down_blocks.{i}")),
            )?);
        }
        let last = unet.levels[unet.levels.len() - 1].channels;
        let middle_out = candle_nn::conv2d(last, last, 1, one, vb.pp("controlnet_mid_block"))?;
        Ok(Self {
            encoder,
            hint,
            hint_out,
            zero_convs,
            middle_out,
        })
    }

    /// The residuals for `latents` (already scaled to the model's input) at `timestep`,
    /// with `context`, SDXL's `y`, and `hint` `[b or 1, hint_channels, 8h, 8w]`.
    ///
    /// # Errors
    /// Shape mismatches; a missing `y` for an SDXL ControlNet.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        y: Option<&Tensor>,
        hint: &Tensor,
    ) -> candle_core::Result<ControlResiduals> {
        let batch = latents.dim(0)?;
        let emb = self.encoder.embed(batch, timestep, y, latents)?;
        let mut guided = hint.clone();
        for conv in &self.hint {
            guided = candle_nn::ops::silu(&conv.forward(&guided)?)?;
        }
        let guided = self.hint_out.forward(&guided)?;
        let (middle, skips) = self
            .encoder
            .forward(latents, &emb, context, Some(&guided), None)?;
        let skips = skips
            .iter()
            .zip(&self.zero_convs)
            .map(|(skip, conv)| conv.forward(skip))
            .collect::<candle_core::Result<_>>()?;
        Ok(ControlResiduals {
            skips,
            after_blocks: Vec::new(),
            middle: Some(self.middle_out.forward(&middle)?),
        })
    }
}

/// Channels of each skip connection the encoder makes: the input convolution's, each
/// block's, and each downsampler's.
fn skip_channels(config: &UnetConfig) -> Vec<usize> {
    let mut channels = vec![config.levels[0].channels];
    for (i, level) in config.levels.iter().enumerate() {
        channels.extend(std::iter::repeat_n(level.channels, config.layers_per_block));
        if i + 1 < config.levels.len() {
            channels.push(level.channels);
        }
    }
    channels
}

/// What a file given to the ControlNet loader holds.
enum ControlFile {
    Net(ControlLayout),
    T2iAdapter,
}

/// How a ControlNet file names its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ControlLayout {
    /// LDM names under this prefix (`control_model.` or nothing).
    Ldm(String),
    Diffusers,
}

/// A loaded ControlNet or T2I adapter (ComfyUI's CONTROL_NET: its loader takes both).
#[derive(Debug)]
pub struct ControlNetModel {
    kind: ControlKind,
    path: PathBuf,
    device: Device,
    dtype: DType,
}

/// Adapter features for one hint at one size: `(hint, [batch, h, w], features)`.
type AdapterCache = Vec<(TensorId, [usize; 3], ControlResiduals)>;

#[derive(Debug)]
enum ControlKind {
    Net {
        net: Box<ControlNet>,
        config: ControlNetConfig,
    },
    /// An adapter's features depend on the hint alone, so they are kept between steps.
    Adapter {
        adapter: T2iAdapter,
        cache: Mutex<AdapterCache>,
    },
}

/// Hints whose adapter features are kept at once (one per chained adapter, typically).
const ADAPTER_CACHE_ENTRIES: usize = 4;

impl ControlNetModel {
    /// Loads a ControlNet file in the LDM or diffusers layout, or a T2I adapter.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for control-LoRAs, union ControlNets, adapters of unknown
    /// layouts and other families, naming what the file is; file and shape errors.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let file = WeightFile::open(path)?;
        let shapes = shapes_of(&file);
        let layout = match detect_layout(path, &shapes)? {
            ControlFile::Net(layout) => layout,
            ControlFile::T2iAdapter => {
                drop(file);
                return Self::load_adapter(path, device, dtype);
            }
        };
        let dim = dim_of(path, &shapes);
        let (inferred, hint_name) = match &layout {
            ControlLayout::Ldm(prefix) => (
                UnetConfig::infer_ldm(&dim, &shapes, prefix)?,
                format!("{prefix}input_hint_block.0.weight"),
            ),
            ControlLayout::Diffusers => (
                infer_diffusers(&dim, &shapes)?,
                "controlnet_cond_embedding.conv_in.weight".to_string(),
            ),
        };
        // A stored config (sakuga's demo files) wins, as for checkpoints: head counts
        // cannot be read from shapes.
        let unet = match file.metadata().get(CONFIG_METADATA_KEY) {
            Some(json) => {
                let stored: SdConfig =
                    serde_json::from_str(json).map_err(|e| ModelError::Corrupt {
                        path: path.to_path_buf(),
                        reason: format!(
                            "metadata {CONFIG_METADATA_KEY} is not a valid config: {e}"
                        ),
                    })?;
                stored.unet
            }
            None => inferred,
        };
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let config = ControlNetConfig {
            hint_channels: dim(&hint_name, 1)?,
            global_average_pooling: stem.ends_with("_shuffle") || stem.ends_with("_shuffle_fp16"),
            unet,
        };
        let rename = renamer(layout, config.unet.clone());
        let backend = MappedWeights::new(
            Arc::new(file),
            Part::Unet,
            rename,
            Arc::new(LoraStack::default()),
        );
        let net = build_part(backend, dtype, device, |vb| ControlNet::new(vb, &config))?;
        Ok(Self {
            kind: ControlKind::Net {
                net: Box::new(net),
                config,
            },
            path: path.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    fn load_adapter(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let adapter = T2iAdapter::load(path, device, dtype).map_err(|e| match e {
            ModelError::MissingTensor { path, tensor } => ModelError::Unsupported {
                path,
                reason: format!("a T2I adapter in a layout sakuga does not know (no {tensor})"),
            },
            other => other,
        })?;
        Ok(Self {
            kind: ControlKind::Adapter {
                adapter,
                cache: Mutex::new(Vec::new()),
            },
            path: path.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    /// What a ControlNet file holds; `None` for a T2I adapter.
    pub fn config(&self) -> Option<&ControlNetConfig> {
        match &self.kind {
            ControlKind::Net { config, .. } => Some(config),
            ControlKind::Adapter { .. } => None,
        }
    }

    /// What a T2I adapter file holds; `None` for a ControlNet.
    pub fn adapter_config(&self) -> Option<&AdapterConfig> {
        match &self.kind {
            ControlKind::Net { .. } => None,
            ControlKind::Adapter { adapter, .. } => Some(adapter.config()),
        }
    }

    /// Whether a hint image of `channels` channels fits (a one-channel adapter averages
    /// any image down to one channel).
    pub fn takes_hint_channels(&self, channels: usize) -> bool {
        match &self.kind {
            ControlKind::Net { config, .. } => config.hint_channels == channels,
            ControlKind::Adapter { adapter, .. } => {
                let wanted = adapter.config().hint_channels();
                wanted == channels || wanted == 1
            }
        }
    }

    /// Channels of the hint images it reads.
    pub fn hint_channels(&self) -> usize {
        match &self.kind {
            ControlKind::Net { config, .. } => config.hint_channels,
            ControlKind::Adapter { adapter, .. } => adapter.config().hint_channels(),
        }
    }

    /// The hint size for a latent of `h` x `w` (8x; an adapter rounds up to its unshuffle).
    pub fn hint_size(&self, h: usize, w: usize) -> (usize, usize) {
        match &self.kind {
            ControlKind::Net { .. } => (h * 8, w * 8),
            ControlKind::Adapter { adapter, .. } => adapter.hint_size(h, w),
        }
    }

    fn pooled(&self) -> bool {
        self.config().is_some_and(|c| c.global_average_pooling)
    }

    /// A T2I adapter's features for `hint` (sized by [`Self::hint_size`]); `key` names the
    /// source hint, so each step after the first reuses them.
    fn adapter_features(
        &self,
        adapter: &T2iAdapter,
        cache: &Mutex<AdapterCache>,
        key: TensorId,
        hint: &Tensor,
    ) -> Result<ControlResiduals> {
        let (b, _, h, w) = hint.dims4()?;
        let size = [b, h, w];
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, features)) = cache.iter().find(|(k, s, _)| *k == key && *s == size) {
            return Ok(features.clone());
        }
        let moved = hint.to_device(&self.device)?.to_dtype(self.dtype)?;
        let features = adapter.forward(&moved)?;
        if cache.len() == ADAPTER_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((key, size, features.clone()));
        Ok(features)
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The residuals for model input `x_in` (the latent scaled by `1/sqrt(sigma^2+1)`) at
    /// `timestep`, with `context`, SDXL's `y` and `hint` at 8x the latent, before
    /// strength.
    ///
    /// # Errors
    /// Tensor errors; an SDXL ControlNet without `y`.
    pub fn residuals(
        &self,
        x_in: &Tensor,
        timestep: f64,
        context: &Tensor,
        y: Option<&Tensor>,
        hint: &Tensor,
    ) -> Result<ControlResiduals> {
        let (net, config) = match &self.kind {
            ControlKind::Net { net, config } => (net, config),
            ControlKind::Adapter { adapter, .. } => return adapter.forward(hint),
        };
        if config.unet.adm_in_channels.is_some() && y.is_none() {
            return Err(ModelError::InvalidInput(format!(
                "{} is an SDXL ControlNet; it cannot guide an SD 1.x/2.x model",
                self.path.display()
            )));
        }
        let (wanted, given) = (config.unet.cross_attention_dim, context.dim(2)?);
        if wanted != given {
            return Err(ModelError::InvalidInput(format!(
                "{} reads {wanted}-wide prompts; this model's are {given} wide (a ControlNet \
                 for another model family)",
                self.path.display()
            )));
        }
        let moved =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        let y = y.map(moved).transpose()?;
        let residuals = net.forward(
            &moved(x_in)?,
            timestep,
            &moved(context)?,
            y.as_ref(),
            &moved(hint)?,
        )?;
        Ok(residuals)
    }
}

fn detect_layout(path: &Path, shapes: &Shapes) -> Result<ControlFile> {
    let has = |name: &str| shapes.contains_key(name);
    let unsupported = |reason: &str| ModelError::Unsupported {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if has("difference") {
        return Err(unsupported(
            "a difference ControlNet, stored relative to its base model; only full ControlNets \
             are supported",
        ));
    }
    if has("lora_controlnet") {
        return Err(unsupported(
            "a control-LoRA; only full ControlNets are supported",
        ));
    }
    if shapes
        .keys()
        .any(|k| k.contains("task_embedding") || k.contains("control_add_embedding"))
    {
        return Err(unsupported(
            "a union ControlNet; only single-type ControlNets are supported",
        ));
    }
    if has("controlnet_cond_embedding.conv_in.weight") {
        return Ok(ControlFile::Net(ControlLayout::Diffusers));
    }
    for prefix in ["control_model.", ""] {
        if has(&format!("{prefix}zero_convs.0.0.weight")) {
            return Ok(ControlFile::Net(ControlLayout::Ldm(prefix.to_string())));
        }
    }
    if is_adapter(shapes.keys().map(String::as_str)) {
        return Ok(ControlFile::T2iAdapter);
    }
    if shapes
        .keys()
        .any(|k| k.starts_with("adapter.") || k.starts_with("body.") || k.starts_with("conv_in."))
    {
        return Err(unsupported(
            "a T2I adapter in a layout sakuga does not know",
        ));
    }
    Err(unsupported(
        "not a ControlNet: no zero_convs.0.0.weight (LDM) or controlnet_cond_embedding.* \
         (diffusers)",
    ))
}

/// The LDM name of a requested diffusers name: the ControlNet's own parts here, the encoder
/// through the UNet key map.
pub(crate) fn control_to_ldm(name: &str, config: &UnetConfig) -> Option<String> {
    let (module, param) = name.rsplit_once('.')?;
    let mapped = match module {
        "controlnet_cond_embedding.conv_in" => "input_hint_block.0".to_string(),
        "controlnet_cond_embedding.conv_out" => "input_hint_block.14".to_string(),
        "controlnet_mid_block" => "middle_block_out.0".to_string(),
        _ => {
            if let Some(block) = module.strip_prefix("controlnet_cond_embedding.blocks.") {
                let index: usize = block.parse().ok()?;
                format!("input_hint_block.{}", 2 * (index + 1))
            } else if let Some(block) = module.strip_prefix("controlnet_down_blocks.") {
                let index: usize = block.parse().ok()?;
                format!("zero_convs.{index}.0")
            } else {
                let ldm = unet_to_ldm(name, config)?;
                return Some(
                    ldm.strip_prefix(LDM_UNET_PREFIX)
                        .unwrap_or(&ldm)
                        .to_string(),
                );
            }
        }
    };
    Some(format!("{mapped}.{param}"))
}

fn renamer(layout: ControlLayout, config: UnetConfig) -> super::weights::Renamer {
    match layout {
        ControlLayout::Diffusers => Box::new(|name: &str| vec![name.to_string()]),
        ControlLayout::Ldm(prefix) => Box::new(move |name: &str| {
            control_to_ldm(name, &config)
                .map(|ldm| vec![format!("{prefix}{ldm}")])
                .unwrap_or_default()
        }),
    }
}

/// A diffusers-layout encoder's shape, from its tensors.
fn infer_diffusers(dim: &super::config::Dim<'_>, shapes: &Shapes) -> Result<UnetConfig> {
    let n_levels = count_indices(shapes, "down_blocks.");
    let layers_per_block = count_indices(shapes, "down_blocks.0.resnets.");
    let mut levels = Vec::with_capacity(n_levels);
    let mut context_dim = 0;
    let mut linear = false;
    for i in 0..n_levels {
        let channels = dim(&format!("down_blocks.{i}.resnets.0.conv2.weight"), 0)?;
        let depth = count_indices(
            shapes,
            &format!("down_blocks.{i}.attentions.0.transformer_blocks."),
        );
        if depth > 0 {
            let attention = format!("down_blocks.{i}.attentions.0.");
            context_dim = dim(
                &format!("{attention}transformer_blocks.0.attn2.to_k.weight"),
                1,
            )?;
            linear = shapes
                .get(&format!("{attention}proj_in.weight"))
                .is_some_and(|s| s.len() == 2);
        }
        levels.push((channels, (depth > 0).then_some(depth)));
    }
    if levels.is_empty() || layers_per_block == 0 {
        return Err(ModelError::InvalidInput(
            "ControlNet has no down_blocks.*.resnets".into(),
        ));
    }
    if context_dim == 0 {
        context_dim = dim(
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            1,
        )?;
    }
    let heads = |channels: usize| {
        if context_dim == 768 {
            8
        } else {
            (channels / 64).max(1)
        }
    };
    let implied = levels.last().and_then(|l| l.1).unwrap_or(1);
    let mid = count_indices(shapes, "mid_block.attentions.0.transformer_blocks.");
    let in_channels = dim("conv_in.weight", 1)?;
    Ok(UnetConfig {
        in_channels,
        out_channels: in_channels,
        levels: levels
            .into_iter()
            .map(|(channels, transformer_depth)| UnetLevel {
                channels,
                transformer_depth,
                heads: heads(channels),
            })
            .collect(),
        layers_per_block,
        norm_num_groups: 32,
        cross_attention_dim: context_dim,
        use_linear_projection: linear,
        adm_in_channels: shapes
            .get("add_embedding.linear_1.weight")
            .and_then(|s| s.get(1).copied()),
        mid_transformer_depth: (mid > 0 && mid != implied).then_some(mid),
    })
}

/// A ControlNet applied to a prompt (`ControlNetApply`, `ControlNetApplyAdvanced`): its
/// hint image, strength and the part of the schedule it acts on, chained to the one that
/// was on the prompt before.
#[derive(Debug, Clone)]
pub struct AppliedControl {
    pub net: Arc<ControlNetModel>,
    /// `[b, channels, h, w]` in 0..1, resized to the latent at sampling time.
    pub hint: Tensor,
    pub strength: f64,
    /// `(start, end)` fractions of the schedule.
    pub range: (f64, f64),
    /// The ControlNet already on the prompt; its residuals are added to these.
    pub previous: Option<Arc<AppliedControl>>,
    /// Whether the negative prompt takes it too when it has none (`ControlNetApply`).
    pub apply_to_uncond: bool,
}

impl AppliedControl {
    /// The chain's residuals for model input `x_in` `[b, c, h, w]` at `sigma`; `None` when
    /// no ControlNet of the chain acts at that sigma.
    ///
    /// # Errors
    /// Tensor errors; an SDXL ControlNet on an SD 1.x model.
    pub fn residuals(
        &self,
        sampling: &ModelSampling,
        x_in: &Tensor,
        sigma: f64,
        context: &Tensor,
        y: Option<&Tensor>,
    ) -> Result<Option<ControlResiduals>> {
        let previous = match &self.previous {
            Some(p) => p.residuals(sampling, x_in, sigma, context, y)?,
            None => None,
        };
        let (high, low) = (
            sampling.percent_to_sigma(self.range.0),
            sampling.percent_to_sigma(self.range.1),
        );
        if sigma > high || sigma < low {
            return Ok(previous);
        }
        let (batch, _, h, w) = x_in.dims4()?;
        let (hint_h, hint_w) = self.net.hint_size(h, w);
        let hint = hint_for(&self.hint, batch, hint_h, hint_w)?;
        let raw = match &self.net.kind {
            ControlKind::Adapter { adapter, cache } => {
                self.net
                    .adapter_features(adapter, cache, self.hint.id(), &hint)?
            }
            ControlKind::Net { .. } => {
                self.net
                    .residuals(x_in, sampling.timestep(sigma), context, y, &hint)?
            }
        };
        let pooled = self.net.pooled();
        let scale = |t: Tensor| -> Result<Tensor> {
            let t = if pooled {
                t.mean_keepdim(D::Minus1)?
                    .mean_keepdim(D::Minus2)?
                    .broadcast_as(t.shape())?
                    .contiguous()?
            } else {
                t
            };
            Ok((t * self.strength)?)
        };
        let own = ControlResiduals {
            skips: raw.skips.into_iter().map(scale).collect::<Result<_>>()?,
            after_blocks: raw
                .after_blocks
                .into_iter()
                .map(|(b, t)| Ok((b, scale(t)?)))
                .collect::<Result<_>>()?,
            middle: raw.middle.map(scale).transpose()?,
        };
        Ok(Some(match previous {
            Some(previous) => own.plus(&previous)?,
            None => own,
        }))
    }
}

/// How [`fit_centre`] resamples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resample {
    /// PyTorch's `nearest-exact`.
    NearestExact,
    /// PyTorch's `bilinear` without corner alignment.
    Bilinear,
}

/// `t` `[b, c, h, w]` at `height` x `width`: cropped to that aspect around its centre, then
/// resampled (ComfyUI's `common_upscale(..., "center")`).
pub(crate) fn fit_centre(
    t: &Tensor,
    height: usize,
    width: usize,
    resample: Resample,
) -> Result<Tensor> {
    let (_, _, old_h, old_w) = t.dims4()?;
    if (old_h, old_w) == (height, width) {
        return Ok(t.clone());
    }
    let old_aspect = old_w as f64 / old_h as f64;
    let new_aspect = width as f64 / height as f64;
    let (mut x, mut y) = (0usize, 0usize);
    if old_aspect > new_aspect {
        x = ((old_w as f64 - old_w as f64 * (new_aspect / old_aspect)) / 2.0).round() as usize;
    } else if old_aspect < new_aspect {
        y = ((old_h as f64 - old_h as f64 * (old_aspect / new_aspect)) / 2.0).round() as usize;
    }
    let (crop_h, crop_w) = (old_h - 2 * y, old_w - 2 * x);
    let cropped = t.narrow(2, y, crop_h)?.narrow(3, x, crop_w)?.contiguous()?;
    if resample == Resample::Bilinear {
        return Ok(cropped.upsample_bilinear2d(height, width, false)?);
    }
    let index = |from: usize, to: usize| -> Result<Tensor> {
        let scale = from as f64 / to as f64;
        let picks: Vec<u32> = (0..to)
            .map(|i| (((i as f64 + 0.5) * scale).floor() as usize).min(from - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(picks, to, t.device())?)
    };
    Ok(cropped
        .index_select(&index(crop_h, height)?, 2)?
        .index_select(&index(crop_w, width)?, 3)?)
}

/// The hint at `height` x `width` for a batch of `batch`, its batch cut or cycled to
/// `batch` (a single hint serves every latent).
fn hint_for(hint: &Tensor, batch: usize, height: usize, width: usize) -> Result<Tensor> {
    let resized = fit_centre(hint, height, width, Resample::NearestExact)?;
    let b = resized.dim(0)?;
    if b == 1 || b == batch {
        return Ok(resized);
    }
    let picks: Vec<u32> = (0..batch).map(|i| (i % b) as u32).collect();
    Ok(resized.index_select(&Tensor::from_vec(picks, batch, hint.device())?, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_channels_follow_the_encoder() {
        let config = crate::diffusion::SdConfig::v1_5().unet;
        let channels = skip_channels(&config);
        assert_eq!(channels.len(), 12);
        assert_eq!(
            channels,
            vec![
                320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280
            ]
        );
    }

    #[test]
    fn ldm_names_of_the_control_parts() {
        let config = crate::diffusion::SdConfig::v1_5().unet;
        let cases = [
            (
                "controlnet_cond_embedding.conv_in.weight",
                "input_hint_block.0.weight",
            ),
            (
                "controlnet_cond_embedding.blocks.0.bias",
                "input_hint_block.2.bias",
            ),
            (
                "controlnet_cond_embedding.blocks.5.weight",
                "input_hint_block.12.weight",
            ),
            (
                "controlnet_cond_embedding.conv_out.weight",
                "input_hint_block.14.weight",
            ),
            ("controlnet_down_blocks.11.weight", "zero_convs.11.0.weight"),
            ("controlnet_mid_block.bias", "middle_block_out.0.bias"),
            ("conv_in.weight", "input_blocks.0.0.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(
                control_to_ldm(diffusers, &config).as_deref(),
                Some(ldm),
                "{diffusers}"
            );
        }
    }

    #[test]
    fn hint_is_centre_cropped_and_resized_nearest_exact() {
        // 1x1x2x4 -> 2x2: crop the middle 2 columns, then keep them.
        let hint = Tensor::from_vec(
            (0..8).map(|v| v as f32).collect::<Vec<_>>(),
            (1, 1, 2, 4),
            &Device::Cpu,
        )
        .unwrap();
        let out = hint_for(&hint, 2, 2, 2).unwrap();
        assert_eq!(out.dims(), &[1, 1, 2, 2]);
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 5., 6.]
        );
        // Upscale 2 -> 3 picks floor((i + 0.5) * 2 / 3): 0, 1, 1.
        let up = hint_for(&hint.narrow(3, 0, 2).unwrap(), 1, 3, 3).unwrap();
        assert_eq!(
            up.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 1., 1., 4., 5., 5., 4., 5., 5.]
        );
    }
}
