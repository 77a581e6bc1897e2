//! Stable Diffusion nodes with ComfyUI's class types, input names, defaults, ranges and
//! choice lists: CheckpointLoaderSimple, CLIPTextEncode, CLIPSetLastLayer, LoraLoader,
//! EmptyLatentImage, KSampler, KSamplerAdvanced, VAEDecode, VAEEncode, LatentUpscale,
//! LatentUpscaleBy, RepeatLatentBatch.
//!
//! The values flowing between them are the typed objects below ([`DiffusionModel`],
//! [`ClipEncoder`], [`VaeDecoder`], [`Conditioning`], [`Latent`]). Loaded weights go through
//! the environment's [`ModelCache`] when one is registered in its resources, keyed by file
//! and LoRA stack, so two jobs on the same checkpoint share one copy and a LoRA merge
//! happens once per (checkpoint, lora, strength).

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use candle_core::{DType, Device, Tensor};
use sakuga_models::ModelError;
use sakuga_models::cache::{ModelCache, ModelKind};
use sakuga_models::diffusion::config::Prediction;
use sakuga_models::diffusion::embedding::{EmbeddingSource, load_embedding};
use sakuga_models::diffusion::keymap::Part;
use sakuga_models::diffusion::{
    AppliedLora, Area, Checkpoint, ClipModel, LoraFile, SampleParams, SamplerKind, Scheduler,
    SizeConditioning, StepHooks, TextConditioning, UnetModel, VaeModel, empty_latent,
    load_vae_file, sample_along,
};
use sakuga_models::store::{ModelFolder, ModelStore};

use super::MAX_RESOLUTION;
use crate::error::NodeError;
use crate::node::{ExecContext, Inputs, Node, NodeEnv};
use crate::port::PortType;
use crate::registry::NodeRegistry;
use crate::schema::{ComboOptions, DegradeKnob, InputSpec, NodeSchema};
use crate::shape::{LATENT_FACTOR, NodeCost, Shape, ShapeInputs, megapasses, scaled};
use crate::value::Value;
use sakuga_telemetry::{ErrorKind, Stage};

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(CheckpointLoaderSimple);
    registry.register(ClipTextEncode);
    registry.register(ClipSetLastLayer);
    registry.register(ClipTextEncodeSdxl);
    registry.register(ClipTextEncodeSdxlRefiner);
    registry.register(LoraLoader);
    registry.register(LoraLoaderModelOnly);
    registry.register(VaeLoader);
    registry.register(UnetLoader);
    registry.register(ClipLoader);
    registry.register(DualClipLoader);
    registry.register(EmptyLatentImage);
    registry.register(KSampler);
    registry.register(KSamplerAdvanced);
    registry.register(VaeDecode);
    registry.register(VaeDecodeTiled);
    registry.register(ModelSamplingDiscrete);
    registry.register(VaeEncode);
    registry.register(LatentUpscale);
    registry.register(LatentUpscaleBy);
    registry.register(RepeatLatentBatch);
}

/// ComfyUI's sampler names that sakuga runs, in ComfyUI's order.
pub static SAMPLER_NAMES: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| SamplerKind::names().collect());
/// ComfyUI's scheduler names, in ComfyUI's order.
pub static SCHEDULER_NAMES: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| Scheduler::ALL.iter().map(|s| s.name()).collect());
/// ComfyUI's latent upscale methods.
pub const LATENT_UPSCALE_METHODS: &[&str] =
    &["nearest-exact", "bilinear", "area", "bicubic", "bislerp"];
/// Latents above this many cells per side are decoded in tiles.
const VAE_TILE_LATENT: usize = 96;
/// Latent cells shared between neighbouring VAE tiles.
const VAE_TILE_OVERLAP: usize = 8;
/// Feature maps a UNet holds per latent element at its widest (320 channels over 4, a few
/// alive at once), for admission's estimate of a sampler's scratch memory.
const UNET_ACTIVATION_FACTOR: u64 = 240;
/// Feature maps a VAE holds per pixel at full resolution (128 channels, three alive).
const VAE_ACTIVATION_FACTOR: u64 = 384;

/// A VAE pass over a latent of `(height, width)` cells: activations at full resolution,
/// for one tile when the decode is tiled.
fn vae_working(batch: u64, height: u64, width: u64) -> u64 {
    let tile = (VAE_TILE_LATENT / 2 + 2 * VAE_TILE_OVERLAP) as u64;
    let (h, w) = if height.max(width) > VAE_TILE_LATENT as u64 {
        (height.min(tile), width.min(tile))
    } else {
        (height, width)
    };
    let pixels = (h * LATENT_FACTOR).saturating_mul(w * LATENT_FACTOR);
    pixels
        .saturating_mul(batch.max(1))
        .saturating_mul(VAE_ACTIVATION_FACTOR)
}

pub(super) fn sampler_cost(i: &ShapeInputs<'_>) -> NodeCost {
    let latent = i.shape("latent_image");
    let steps = i.size("steps", 20);
    let steps = match (i.int("start_at_step"), i.int("end_at_step")) {
        (Some(start), Some(end)) => (end.min(steps as i64) - start).max(0) as u64,
        _ => steps,
    };
    // Classifier-free guidance runs the batch twice per step.
    NodeCost::outputs(vec![latent])
        .working(
            latent
                .bytes()
                .saturating_mul(2)
                .saturating_mul(UNET_ACTIVATION_FACTOR),
        )
        .work(steps as f64 * 2.0 * megapasses(&latent))
}

fn latent_resize_cost(source: Shape, height: u64, width: u64) -> NodeCost {
    NodeCost::outputs(vec![source.resized(height, width)])
}

/// The checkpoint a model came from and the LoRAs merged into it.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub checkpoint: Arc<Checkpoint>,
    pub loras: Vec<(String, AppliedLora)>,
    /// What `ModelSamplingDiscrete` set: the prediction and zero-terminal-SNR table, kept
    /// when a later node (a LoRA) reloads the UNet from this source.
    pub sampling: Option<(Prediction, bool)>,
}

impl ModelSource {
    fn key(&self, part: &str) -> String {
        let mut key = format!("{}#{part}", self.checkpoint.path().display());
        for (name, lora) in &self.loras {
            let strength = match part {
                "clip" => lora.strength_clip,
                _ => lora.strength_model,
            };
            key.push_str(&format!("+{name}@{strength}"));
        }
        key
    }

    fn applied(&self) -> Vec<AppliedLora> {
        self.loras.iter().map(|(_, l)| l.clone()).collect()
    }
}

/// MODEL: a denoising UNet and where it came from.
#[derive(Debug, Clone)]
pub struct DiffusionModel {
    pub unet: Arc<UnetModel>,
    pub source: ModelSource,
}

/// CLIP: a text encoder (with its clip-skip setting) and where it came from.
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    pub clip: ClipModel,
    pub source: ModelSource,
}

/// VAE.
#[derive(Debug, Clone)]
pub struct VaeDecoder {
    pub vae: Arc<VaeModel>,
}

/// CONDITIONING: CLIP hidden states `[1, tokens, width]`, and SDXL's pooled embedding and
/// size conditioning.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Every prompt of it: one from a text encoder, more once combined.
    pub entries: Vec<TextConditioning>,
}

impl Conditioning {
    /// One prompt's conditioning.
    pub fn one(text: TextConditioning) -> Self {
        Self {
            entries: vec![text],
        }
    }
}

/// LATENT: scaled latents `[batch, 4, h, w]` (f32).
#[derive(Debug, Clone)]
pub struct Latent {
    pub samples: Tensor,
    /// Where sampling may change the latent: `[batch or 1, 1, h, w]` in 0..1 at any
    /// resolution (ComfyUI's `noise_mask`); 1 is repainted, 0 kept.
    pub noise_mask: Option<Tensor>,
}

impl Latent {
    /// Latents without a noise mask.
    pub fn new(samples: Tensor) -> Self {
        Self {
            samples,
            noise_mask: None,
        }
    }

    /// New samples that keep this latent's noise mask, as ComfyUI's nodes copy the dict.
    pub fn with_samples(&self, samples: Tensor) -> Self {
        Self {
            samples,
            noise_mask: self.noise_mask.clone(),
        }
    }
}

fn dtype_for(device: &Device) -> DType {
    if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

fn cache(env: &NodeEnv) -> Option<Arc<ModelCache>> {
    env.resources.get::<ModelCache>()
}

/// Loads through the environment's model cache when there is one.
fn cached<T, F>(env: &NodeEnv, key: &str, kind: ModelKind, load: F) -> Result<Arc<T>, NodeError>
where
    T: std::any::Any + Send + Sync,
    F: FnOnce() -> Result<(T, u64), ModelError>,
{
    match cache(env) {
        Some(cache) => Ok(cache.get_or_load(key, kind, load)?),
        None => Ok(Arc::new(load()?.0)),
    }
}

fn model_path(env: &NodeEnv, folder: ModelFolder, name: &str) -> Result<PathBuf, NodeError> {
    let store = env
        .resources
        .get::<ModelStore>()
        .unwrap_or_else(|| Arc::new(ModelStore::new(env.models_dir.clone())));
    Ok(store.resolve(folder, name)?)
}

fn open_checkpoint(env: &NodeEnv, name: &str) -> Result<Arc<Checkpoint>, NodeError> {
    let path = model_path(env, ModelFolder::Checkpoints, name)?;
    // An opened checkpoint is its memory map and header: cheap to keep, charged nothing.
    cached(
        env,
        &format!("{}#file", path.display()),
        ModelKind::Checkpoint,
        || Checkpoint::open(&path).map(|c| (c, 0)),
    )
}

fn load_unet(env: &NodeEnv, source: &ModelSource) -> Result<Arc<UnetModel>, NodeError> {
    let device = env.device.clone();
    let dtype = dtype_for(&device);
    let unet = cached(env, &source.key("unet"), ModelKind::Checkpoint, || {
        let bytes = source.checkpoint.part_bytes(Part::Unet, dtype);
        source
            .checkpoint
            .load_unet(&source.applied(), &device, dtype)
            .map(|m| (m, bytes))
    })?;
    // The override shares the cached weights; only the noise table and prediction change.
    Ok(match source.sampling {
        Some((prediction, zsnr)) => Arc::new(unet.with_sampling(prediction, zsnr)),
        None => unet,
    })
}

fn load_clip(env: &NodeEnv, source: &ModelSource) -> Result<ClipModel, NodeError> {
    let device = env.device.clone();
    let dtype = dtype_for(&device);
    let clip = cached(env, &source.key("clip"), ModelKind::Clip, || {
        let bytes = source.checkpoint.part_bytes(Part::Clip, dtype);
        source
            .checkpoint
            .load_clip(&source.applied(), &device, dtype)
            .map(|m| (m, bytes))
    })?;
    Ok((*clip).clone())
}

fn model_combo(name: &'static str, folder: &'static str) -> InputSpec {
    InputSpec::files(name, ComboOptions::ModelFolder(folder))
}

fn usize_input(inputs: &Inputs, name: &str) -> Result<usize, NodeError> {
    let v = inputs.int(name)?;
    usize::try_from(v).map_err(|_| NodeError::InvalidInput(format!("{name} must be >= 0, got {v}")))
}

pub(super) fn node_error(e: ModelError) -> NodeError {
    match e {
        ModelError::Cancelled { .. } => NodeError::Cancelled,
        other => NodeError::Model(other),
    }
}

/// CheckpointLoaderSimple: MODEL, CLIP and VAE of a checkpoint in `checkpoints/`.
struct CheckpointLoaderSimple;

static CHECKPOINT_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("CheckpointLoaderSimple", "Load Checkpoint", "loaders")
        .loads("checkpoints", "ckpt_name", ModelKind::Checkpoint)
        .description("Loads a diffusion model checkpoint (UNet, CLIP text encoder and VAE).")
        .input(model_combo("ckpt_name", "checkpoints").tooltip("The checkpoint to load."))
        .output(PortType::Model)
        .output(PortType::Clip)
        .output(PortType::Vae)
});

impl Node for CheckpointLoaderSimple {
    fn schema(&self) -> &NodeSchema {
        &CHECKPOINT_LOADER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let env = ctx.env;
        let checkpoint = open_checkpoint(env, inputs.str("ckpt_name")?)?;
        let source = ModelSource {
            checkpoint: checkpoint.clone(),
            loras: Vec::new(),
            sampling: None,
        };
        let unet = load_unet(env, &source)?;
        let clip = load_clip(env, &source)?;
        let device = env.device.clone();
        let vae = cached(env, &source.key("vae"), ModelKind::Vae, || {
            let bytes = checkpoint.part_bytes(Part::Vae, DType::F32);
            checkpoint.load_vae(&device, DType::F32).map(|v| (v, bytes))
        })?;
        Ok(vec![
            Value::object(DiffusionModel {
                unet,
                source: source.clone(),
            }),
            Value::object(ClipEncoder { clip, source }),
            Value::object(VaeDecoder { vae }),
        ])
    }
}

/// UNETLoader: a diffusion model alone, from `diffusion_models/`.
struct UnetLoader;

static UNET_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("UNETLoader", "Load Diffusion Model", "advanced/loaders")
        .loads("diffusion_models", "unet_name", ModelKind::Checkpoint)
        .input(model_combo("unet_name", "diffusion_models"))
        .input(InputSpec::combo(
            "weight_dtype",
            &["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],
        ))
        .output(PortType::Model)
});

impl Node for UnetLoader {
    fn schema(&self) -> &NodeSchema {
        &UNET_LOADER
    }

    /// `weight_dtype` is ComfyUI's memory saving; here weights load in the device's
    /// dtype (f32 on the CPU, f16 on CUDA) whatever it says.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let env = ctx.env;
        let path = model_path(env, ModelFolder::DiffusionModels, inputs.str("unet_name")?)?;
        let checkpoint = cached(
            env,
            &format!("{}#unet-file", path.display()),
            ModelKind::Checkpoint,
            || Checkpoint::open_unet(&path).map(|c| (c, 0)),
        )?;
        let source = ModelSource {
            checkpoint,
            loras: Vec::new(),
            sampling: None,
        };
        let unet = load_unet(env, &source)?;
        Ok(vec![Value::object(DiffusionModel { unet, source })])
    }
}

/// The text encoders in `names` (of `text_encoders/`) as one CLIP.
fn text_encoders(env: &NodeEnv, names: &[&str]) -> Result<Vec<Value>, NodeError> {
    let paths = names
        .iter()
        .map(|name| model_path(env, ModelFolder::TextEncoders, name))
        .collect::<Result<Vec<_>, _>>()?;
    let key = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join("+");
    let checkpoint = cached(
        env,
        &format!("{key}#text-encoders"),
        ModelKind::Clip,
        || {
            let refs: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
            Checkpoint::open_text_encoders(&refs).map(|c| (c, 0))
        },
    )?;
    let source = ModelSource {
        checkpoint,
        loras: Vec::new(),
        sampling: None,
    };
    let clip = load_clip(env, &source)?;
    Ok(vec![Value::object(ClipEncoder { clip, source })])
}

/// CLIPLoader: one text encoder from `text_encoders/`.
struct ClipLoader;

static CLIP_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("CLIPLoader", "Load CLIP", "advanced/loaders")
        .loads("text_encoders", "clip_name", ModelKind::Clip)
        .input(model_combo("clip_name", "text_encoders"))
        .input(InputSpec::combo("type", &["stable_diffusion"]))
        .input(InputSpec::combo("device", &["default", "cpu"]).optional())
        .output(PortType::Clip)
});

impl Node for ClipLoader {
    fn schema(&self) -> &NodeSchema {
        &CLIP_LOADER
    }

    /// `stable_diffusion`: SD 1.x's CLIP-L or SD 2.x's OpenCLIP-H, told apart by width.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        text_encoders(ctx.env, &[inputs.str("clip_name")?])
    }
}

/// DualCLIPLoader: SDXL's two text encoders from `text_encoders/`.
struct DualClipLoader;

static DUAL_CLIP_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("DualCLIPLoader", "DualCLIPLoader", "advanced/loaders")
        .loads("text_encoders", "clip_name1", ModelKind::Clip)
        .input(model_combo("clip_name1", "text_encoders"))
        .input(model_combo("clip_name2", "text_encoders"))
        .input(InputSpec::combo("type", &["sdxl"]))
        .input(InputSpec::combo("device", &["default", "cpu"]).optional())
        .output(PortType::Clip)
});

impl Node for DualClipLoader {
    fn schema(&self) -> &NodeSchema {
        &DUAL_CLIP_LOADER
    }

    /// `sdxl`: CLIP-L and OpenCLIP-G in either order (the one with a projection is G).
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        text_encoders(
            ctx.env,
            &[inputs.str("clip_name1")?, inputs.str("clip_name2")?],
        )
    }
}

/// VAELoader: a standalone VAE from `vae/`.
struct VaeLoader;

static VAE_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("VAELoader", "Load VAE", "loaders")
        .loads("vae", "vae_name", ModelKind::Vae)
        .input(model_combo("vae_name", "vae"))
        .output(PortType::Vae)
});

impl Node for VaeLoader {
    fn schema(&self) -> &NodeSchema {
        &VAE_LOADER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let env = ctx.env;
        let path = model_path(env, ModelFolder::Vae, inputs.str("vae_name")?)?;
        let device = env.device.clone();
        let vae = cached(
            env,
            &format!("{}#vae", path.display()),
            ModelKind::Vae,
            || {
                let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                load_vae_file(&path, &device, DType::F32).map(|v| (v, bytes))
            },
        )?;
        Ok(vec![Value::object(VaeDecoder { vae })])
    }
}

/// LoraLoaderModelOnly: a LoRA on the diffusion model alone.
struct LoraLoaderModelOnly;

static LORA_LOADER_MODEL_ONLY: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("LoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders")
        .loads("loras", "lora_name", ModelKind::Lora)
        .input(InputSpec::link("model", PortType::Model))
        .input(model_combo("lora_name", "loras"))
        .input(InputSpec::float("strength_model", 1.0, -100.0, 100.0, 0.01))
        .output(PortType::Model)
});

impl Node for LoraLoaderModelOnly {
    fn schema(&self) -> &NodeSchema {
        &LORA_LOADER_MODEL_ONLY
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let env = ctx.env;
        let model = inputs.object::<DiffusionModel>("model")?;
        let name = inputs.str("lora_name")?;
        let strength_model = inputs.float("strength_model")?;
        if strength_model == 0.0 {
            return Ok(vec![Value::Object(model)]);
        }
        let applied = AppliedLora {
            lora: open_lora(env, name)?,
            strength_model,
            strength_clip: 0.0,
        };
        let mut source = model.source.clone();
        source.loras.push((name.to_string(), applied));
        let unet = load_unet(env, &source)?;
        Ok(vec![Value::object(DiffusionModel { unet, source })])
    }
}

/// A LoRA file from `loras/`, parsed once and cached.
fn open_lora(env: &NodeEnv, name: &str) -> Result<Arc<LoraFile>, NodeError> {
    let path = model_path(env, ModelFolder::Loras, name)?;
    cached(
        env,
        &format!("{}#lora", path.display()),
        ModelKind::Lora,
        || {
            LoraFile::open(&path).map(|l| {
                let bytes = l.bytes();
                (l, bytes)
            })
        },
    )
}

/// Textual-inversion embeddings from the models dir's `embeddings/`, found by name with or
/// without their extension; one that cannot be read is logged and its word stays text.
struct FolderEmbeddings {
    store: ModelStore,
}

impl FolderEmbeddings {
    fn of(env: &NodeEnv) -> Self {
        Self {
            store: ModelStore::new(&env.models_dir),
        }
    }
}

impl EmbeddingSource for FolderEmbeddings {
    fn embedding(&self, name: &str, width: usize, encoder: &str) -> Option<Tensor> {
        let path = ["", ".safetensors", ".pt", ".bin"].iter().find_map(|ext| {
            self.store
                .resolve(ModelFolder::Embeddings, &format!("{name}{ext}"))
                .ok()
        })?;
        match load_embedding(&path, width, encoder) {
            Ok(vectors) => Some(vectors),
            Err(e) => {
                tracing::warn!(embedding = name, error = %e, "embedding not used");
                None
            }
        }
    }
}

/// CLIPTextEncode: a prompt to conditioning.
struct ClipTextEncode;

static CLIP_TEXT_ENCODE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "CLIPTextEncode",
        "CLIP Text Encode (Prompt)",
        "conditioning",
    )
    .stage(Stage::Inference)
    .description("Encodes a text prompt with a CLIP model into conditioning for sampling.")
    .input(InputSpec::string("text", "", true).tooltip("The text to be encoded."))
    .input(InputSpec::link("clip", PortType::Clip))
    .output(PortType::Conditioning)
});

impl Node for ClipTextEncode {
    fn schema(&self) -> &NodeSchema {
        &CLIP_TEXT_ENCODE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let clip = inputs.object::<ClipEncoder>("clip")?;
        let embeddings = FolderEmbeddings::of(ctx.env);
        let text = clip
            .clip
            .condition_with(inputs.str("text")?, Some(&embeddings))?;
        Ok(vec![Value::object(Conditioning::one(text))])
    }
}

/// CLIPTextEncodeSDXL: SDXL's two prompts and its size conditioning.
struct ClipTextEncodeSdxl;

static CLIP_TEXT_ENCODE_SDXL: LazyLock<NodeSchema> = LazyLock::new(|| {
    let size = |name, default| InputSpec::int(name, default, 0, MAX_RESOLUTION);
    NodeSchema::new(
        "CLIPTextEncodeSDXL",
        "CLIPTextEncodeSDXL",
        "advanced/conditioning",
    )
    .stage(Stage::Inference)
    .input(InputSpec::link("clip", PortType::Clip))
    .input(size("width", 1024))
    .input(size("height", 1024))
    .input(size("crop_w", 0))
    .input(size("crop_h", 0))
    .input(size("target_width", 1024))
    .input(size("target_height", 1024))
    .input(InputSpec::string("text_g", "", true))
    .input(InputSpec::string("text_l", "", true))
    .output(PortType::Conditioning)
});

impl Node for ClipTextEncodeSdxl {
    fn schema(&self) -> &NodeSchema {
        &CLIP_TEXT_ENCODE_SDXL
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let clip = inputs.object::<ClipEncoder>("clip")?;
        let embeddings = FolderEmbeddings::of(ctx.env);
        let encoded = clip.clip.encode_pair_with(
            inputs.str("text_l")?,
            inputs.str("text_g")?,
            Some(&embeddings),
        )?;
        let px = |name: &str| -> Result<f64, NodeError> { Ok(inputs.int(name)? as f64) };
        let text = TextConditioning {
            pooled: encoded.pooled,
            size: Some(SizeConditioning {
                width: px("width")?,
                height: px("height")?,
                crop_w: px("crop_w")?,
                crop_h: px("crop_h")?,
                target_width: px("target_width")?,
                target_height: px("target_height")?,
            }),
            ..TextConditioning::context(encoded.context)
        };
        Ok(vec![Value::object(Conditioning::one(text))])
    }
}

/// CLIPTextEncodeSDXLRefiner: the refiner's prompt, aesthetic score and size.
struct ClipTextEncodeSdxlRefiner;

static CLIP_TEXT_ENCODE_SDXL_REFINER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "CLIPTextEncodeSDXLRefiner",
        "CLIPTextEncodeSDXLRefiner",
        "advanced/conditioning",
    )
    .stage(Stage::Inference)
    .input(InputSpec::float("ascore", 6.0, 0.0, 1000.0, 0.01))
    .input(InputSpec::int("width", 1024, 0, MAX_RESOLUTION))
    .input(InputSpec::int("height", 1024, 0, MAX_RESOLUTION))
    .input(InputSpec::string("text", "", true))
    .input(InputSpec::link("clip", PortType::Clip))
    .output(PortType::Conditioning)
});

impl Node for ClipTextEncodeSdxlRefiner {
    fn schema(&self) -> &NodeSchema {
        &CLIP_TEXT_ENCODE_SDXL_REFINER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let clip = inputs.object::<ClipEncoder>("clip")?;
        let embeddings = FolderEmbeddings::of(ctx.env);
        let mut text = clip
            .clip
            .condition_with(inputs.str("text")?, Some(&embeddings))?;
        let (width, height) = (inputs.int("width")? as f64, inputs.int("height")? as f64);
        text.size = Some(SizeConditioning::plain(width, height));
        text.aesthetic_score = Some(inputs.float("ascore")?);
        Ok(vec![Value::object(Conditioning::one(text))])
    }
}

/// CLIPSetLastLayer: clip skip.
struct ClipSetLastLayer;

static CLIP_SET_LAST_LAYER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("CLIPSetLastLayer", "CLIP Set Last Layer", "conditioning")
        .input(InputSpec::link("clip", PortType::Clip))
        .input(InputSpec::int("stop_at_clip_layer", -1, -24, -1))
        .output(PortType::Clip)
});

impl Node for ClipSetLastLayer {
    fn schema(&self) -> &NodeSchema {
        &CLIP_SET_LAST_LAYER
    }

    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let clip = inputs.object::<ClipEncoder>("clip")?;
        let layer = inputs.int("stop_at_clip_layer")?;
        Ok(vec![Value::object(ClipEncoder {
            clip: clip.clip.with_stop_at_layer(layer),
            source: clip.source.clone(),
        })])
    }
}

/// LoraLoader: a LoRA merged into MODEL and CLIP.
struct LoraLoader;

static LORA_LOADER: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("LoraLoader", "Load LoRA", "loaders")
        .loads("loras", "lora_name", ModelKind::Lora)
        .description("Applies a LoRA to the diffusion and CLIP models.")
        .input(InputSpec::link("model", PortType::Model))
        .input(InputSpec::link("clip", PortType::Clip))
        .input(model_combo("lora_name", "loras").tooltip("The name of the LoRA."))
        .input(InputSpec::float("strength_model", 1.0, -100.0, 100.0, 0.01))
        .input(InputSpec::float("strength_clip", 1.0, -100.0, 100.0, 0.01))
        .output(PortType::Model)
        .output(PortType::Clip)
});

impl Node for LoraLoader {
    fn schema(&self) -> &NodeSchema {
        &LORA_LOADER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let env = ctx.env;
        let model = inputs.object::<DiffusionModel>("model")?;
        let clip = inputs.object::<ClipEncoder>("clip")?;
        let name = inputs.str("lora_name")?;
        let strength_model = inputs.float("strength_model")?;
        let strength_clip = inputs.float("strength_clip")?;
        if strength_model == 0.0 && strength_clip == 0.0 {
            return Ok(vec![Value::Object(model), Value::Object(clip)]);
        }
        let applied = AppliedLora {
            lora: open_lora(env, name)?,
            strength_model,
            strength_clip,
        };
        let mut model_source = model.source.clone();
        model_source.loras.push((name.to_string(), applied.clone()));
        let mut clip_source = clip.source.clone();
        clip_source.loras.push((name.to_string(), applied));
        let unet = load_unet(env, &model_source)?;
        let encoder = load_clip(env, &clip_source)?.with_stop_at_layer(clip.clip.stop_at_layer());
        Ok(vec![
            Value::object(DiffusionModel {
                unet,
                source: model_source,
            }),
            Value::object(ClipEncoder {
                clip: encoder,
                source: clip_source,
            }),
        ])
    }
}

/// EmptyLatentImage: zero latents for a batch of images.
struct EmptyLatentImage;

static EMPTY_LATENT_IMAGE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("EmptyLatentImage", "Empty Latent Image", "latent")
        .degrade(DegradeKnob::KeyFrames)
        .description("Creates a new batch of empty latent images to be denoised via sampling.")
        .input(InputSpec::int_step("width", 512, 16, MAX_RESOLUTION, 8))
        .input(InputSpec::int_step("height", 512, 16, MAX_RESOLUTION, 8))
        .input(InputSpec::int("batch_size", 1, 1, 4096))
        .output(PortType::Latent)
        .shapes(|i| {
            NodeCost::outputs(vec![Shape::latent_for_pixels(
                i.size("batch_size", 1),
                i.size("height", 512),
                i.size("width", 512),
            )])
        })
});

impl Node for EmptyLatentImage {
    fn schema(&self) -> &NodeSchema {
        &EMPTY_LATENT_IMAGE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let samples = empty_latent(
            usize_input(inputs, "width")?,
            usize_input(inputs, "height")?,
            usize_input(inputs, "batch_size")?,
            8,
            &ctx.env.device,
        )?;
        Ok(vec![Value::object(Latent::new(samples))])
    }
}

fn sampler_inputs(schema: NodeSchema, seed_name: &'static str) -> NodeSchema {
    schema
        .input(InputSpec::seed(seed_name))
        .input(InputSpec::int("steps", 20, 1, 10000))
        .input(InputSpec::float("cfg", 8.0, 0.0, 100.0, 0.1))
        .input(InputSpec::combo("sampler_name", SAMPLER_NAMES.as_slice()))
        .input(InputSpec::combo("scheduler", SCHEDULER_NAMES.as_slice()))
        .input(InputSpec::link("positive", PortType::Conditioning))
        .input(InputSpec::link("negative", PortType::Conditioning))
        .input(InputSpec::link("latent_image", PortType::Latent))
}

fn run_sampler(
    ctx: &ExecContext<'_>,
    inputs: &Inputs,
    params: SampleParams,
    schema: &NodeSchema,
) -> Result<Vec<Value>, NodeError> {
    ctx.reserve_for(schema, inputs)?;
    let model = inputs.object::<DiffusionModel>("model")?;
    let positive = inputs.object::<Conditioning>("positive")?;
    let negative = inputs.object::<Conditioning>("negative")?;
    let latent = inputs.object::<Latent>("latent_image")?;
    let params = SampleParams {
        max_batch: ctx.batch_limit,
        ..params
    };
    let sigmas = params.sigmas(model.unet.sampling());
    let (samples, _) = sample_with_mask(
        ctx,
        &model,
        (&positive.entries, &negative.entries),
        &latent,
        &sigmas,
        &params,
    )?;
    Ok(vec![Value::object(latent.with_samples(samples))])
}

/// A sampling pass of `latent` along `sigmas`, its noise mask (if any) at latent size, with
/// the node's progress and cancel hooks; the result and the last clean estimate.
pub(super) fn sample_with_mask(
    ctx: &ExecContext<'_>,
    model: &DiffusionModel,
    (positive, negative): (&[TextConditioning], &[TextConditioning]),
    latent: &Latent,
    sigmas: &[f64],
    params: &SampleParams,
) -> Result<(Tensor, Option<Tensor>), NodeError> {
    let progress = |step: usize, steps: usize| {
        ctx.sink.progress(ctx.node_id, step as u64, steps as u64);
    };
    let cancelled = || ctx.cancel.is_cancelled();
    let hooks = StepHooks {
        progress: &progress,
        cancelled: &cancelled,
    };
    let (_, _, h, w) = latent.samples.dims4()?;
    let mask = match &latent.noise_mask {
        Some(mask) => Some(super::mask::latent_mask(mask, h, w)?),
        None => None,
    };
    // Prompt masks meet the latent at its size.
    let at_latent_size = |side: &[TextConditioning]| -> Result<Vec<TextConditioning>, NodeError> {
        side.iter()
            .map(|c| {
                let mut c = c.clone();
                if let Some((m, strength)) = c.mask.take() {
                    let m = super::mask::latent_mask(&m, h, w)?;
                    if c.area == Some(Area::MaskBounds) {
                        c.area = Some(mask_bounds(&m)?);
                    }
                    c.mask = Some((m, strength));
                }
                Ok(c)
            })
            .collect()
    };
    let (positive, negative) = (at_latent_size(positive)?, at_latent_size(negative)?);
    sample_along(
        &model.unet,
        &positive,
        &negative,
        &latent.samples,
        sigmas,
        params,
        mask.as_ref(),
        hooks,
    )
    .map_err(node_error)
}

/// The cells where a `[b, 1, h, w]` mask is above zero, as an area (all of it when none is).
fn mask_bounds(mask: &Tensor) -> Result<Area, NodeError> {
    let (_, _, h, w) = mask.dims4()?;
    let plane = mask.max(0)?.squeeze(0)?.to_vec2::<f32>()?;
    let (mut top, mut left, mut bottom, mut right) = (h, w, 0, 0);
    for (y, row) in plane.iter().enumerate() {
        for (x, &v) in row.iter().enumerate() {
            if v > 0.0 {
                (top, left) = (top.min(y), left.min(x));
                (bottom, right) = (bottom.max(y + 1), right.max(x + 1));
            }
        }
    }
    if bottom == 0 {
        return Ok(Area::Cells(h, w, 0, 0));
    }
    Ok(Area::Cells(bottom - top, right - left, top, left))
}

/// What both samplers read alike: steps, CFG, sampler, scheduler and the seed (ComfyUI's
/// u64 seed, carried in the INT's 64 bits).
fn common_sample_params(inputs: &Inputs, seed_input: &str) -> Result<SampleParams, NodeError> {
    let (sampler, scheduler) = sampler_and_scheduler(inputs)?;
    Ok(SampleParams {
        steps: usize_input(inputs, "steps")?,
        cfg: inputs.float("cfg")?,
        sampler,
        scheduler,
        ..SampleParams::new(inputs.int(seed_input)? as u64)
    })
}

fn sampler_and_scheduler(inputs: &Inputs) -> Result<(SamplerKind, Scheduler), NodeError> {
    let sampler_name = inputs.str("sampler_name")?;
    let scheduler_name = inputs.str("scheduler")?;
    let sampler = SamplerKind::from_name(sampler_name)
        .ok_or_else(|| NodeError::InvalidInput(format!("unknown sampler {sampler_name:?}")))?;
    let scheduler = Scheduler::from_name(scheduler_name)
        .ok_or_else(|| NodeError::InvalidInput(format!("unknown scheduler {scheduler_name:?}")))?;
    Ok((sampler, scheduler))
}

/// KSampler.
struct KSampler;

static KSAMPLER: LazyLock<NodeSchema> = LazyLock::new(|| {
    sampler_inputs(
        NodeSchema::new("KSampler", "KSampler", "sampling")
            .stage(Stage::Inference)
            .ends_inference()
            .degrade(DegradeKnob::Steps)
            .description("Denoises the latent image with the model, guided by the prompts.")
            .input(InputSpec::link("model", PortType::Model)),
        "seed",
    )
    .input(InputSpec::float("denoise", 1.0, 0.0, 1.0, 0.01))
    .output(PortType::Latent)
    .shapes(sampler_cost)
});

impl Node for KSampler {
    fn schema(&self) -> &NodeSchema {
        &KSAMPLER
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let params = SampleParams {
            denoise: inputs.float("denoise")?,
            ..common_sample_params(inputs, "seed")?
        };
        run_sampler(ctx, inputs, params, self.schema())
    }
}

/// KSamplerAdvanced: start/end steps, optional noise, leftover noise.
struct KSamplerAdvanced;

static KSAMPLER_ADVANCED: LazyLock<NodeSchema> = LazyLock::new(|| {
    let schema = NodeSchema::new("KSamplerAdvanced", "KSampler (Advanced)", "sampling")
        .stage(Stage::Inference)
        .ends_inference()
        .degrade(DegradeKnob::Steps)
        .input(InputSpec::link("model", PortType::Model))
        .input(InputSpec::combo("add_noise", &["enable", "disable"]));
    sampler_inputs(schema, "noise_seed")
        .input(InputSpec::int("start_at_step", 0, 0, 10000))
        .input(InputSpec::int("end_at_step", 10000, 0, 10000))
        .input(InputSpec::combo(
            "return_with_leftover_noise",
            &["disable", "enable"],
        ))
        .output(PortType::Latent)
        .shapes(sampler_cost)
});

impl Node for KSamplerAdvanced {
    fn schema(&self) -> &NodeSchema {
        &KSAMPLER_ADVANCED
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let params = SampleParams {
            denoise: 1.0,
            add_noise: inputs.str("add_noise")? == "enable",
            start_at_step: usize_input(inputs, "start_at_step")?,
            end_at_step: usize_input(inputs, "end_at_step")?,
            return_with_leftover_noise: inputs.str("return_with_leftover_noise")? == "enable",
            ..common_sample_params(inputs, "noise_seed")?
        };
        run_sampler(ctx, inputs, params, self.schema())
    }
}

/// VAEDecode: latents to images, tiled for large latents or when a full decode runs out of
/// memory.
struct VaeDecode;

static VAE_DECODE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("VAEDecode", "VAE Decode", "latent")
        .stage(Stage::Inference)
        .ends_inference()
        .description("Decodes latent images back into pixel space images.")
        .input(InputSpec::link("samples", PortType::Latent))
        .input(InputSpec::link("vae", PortType::Vae))
        .output(PortType::Image)
        .shapes(|i| {
            let latent = i.shape("samples");
            let Some((b, h, w)) = latent.pixels() else {
                return NodeCost::outputs(vec![Shape::Fixed]);
            };
            let (lh, lw) = latent.spatial().unwrap_or_default();
            NodeCost::outputs(vec![Shape::image(b, h, w)])
                .working(vae_working(b, lh, lw))
                .work(megapasses(&latent) * 4.0)
        })
});

impl Node for VaeDecode {
    fn schema(&self) -> &NodeSchema {
        &VAE_DECODE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let latent = inputs.object::<Latent>("samples")?;
        let vae = inputs.object::<VaeDecoder>("vae")?;
        let (batch, _, h, w) = latent.samples.dims4()?;
        // Each tile (or decoder block) reports progress and checks the job's cancel.
        let proceed = |step: usize, steps: usize| ctx.step(step as u64, steps as u64).is_ok();
        let decode = |samples: &Tensor| -> Result<Tensor, NodeError> {
            if h.max(w) > VAE_TILE_LATENT {
                return Ok(vae.vae.decode_tiled_with(
                    samples,
                    VAE_TILE_LATENT / 2,
                    VAE_TILE_OVERLAP,
                    &proceed,
                )?);
            }
            match vae.vae.decode_with(samples, &proceed) {
                Ok(images) => Ok(images),
                Err(e) if e.kind() == Some(ErrorKind::Oom) => {
                    tracing::warn!(error = %e, "vae decode out of memory, retrying tiled");
                    Ok(vae.vae.decode_tiled_with(
                        samples,
                        VAE_TILE_LATENT / 4,
                        VAE_TILE_OVERLAP,
                        &proceed,
                    )?)
                }
                Err(e) => Err(e.into()),
            }
        };
        let images = match ctx.batch_limit {
            Some(max) if batch > max => {
                let mut chunks = Vec::with_capacity(batch.div_ceil(max));
                for start in (0..batch).step_by(max) {
                    let len = max.min(batch - start);
                    chunks.push(decode(&latent.samples.narrow(0, start, len)?)?);
                }
                Tensor::cat(&chunks, 0)?
            }
            _ => decode(&latent.samples)?,
        };
        Ok(vec![Value::Image(channels_last(ctx, &images)?)])
    }
}

/// Decoded `[b, c, h, w]` images as the IMAGE layout, `[b, h, w, c]` on the job's device.
fn channels_last(ctx: &ExecContext<'_>, images: &Tensor) -> Result<Tensor, NodeError> {
    Ok(images
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .to_device(&ctx.env.device)?)
}

/// VAEDecodeTiled: decoding in tiles of a chosen size (pixels), for large images.
struct VaeDecodeTiled;

static VAE_DECODE_TILED: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("VAEDecodeTiled", "VAE Decode (Tiled)", "_for_testing")
        .stage(Stage::Inference)
        .ends_inference()
        .input(InputSpec::link("samples", PortType::Latent))
        .input(InputSpec::link("vae", PortType::Vae))
        .input(InputSpec::int_step("tile_size", 512, 64, 4096, 32))
        .input(InputSpec::int_step("overlap", 64, 0, 4096, 32))
        .input(InputSpec::int_step("temporal_size", 64, 8, 4096, 4))
        .input(InputSpec::int_step("temporal_overlap", 8, 4, 4096, 4))
        .output(PortType::Image)
        .shapes(|i| {
            let latent = i.shape("samples");
            let Some((b, h, w)) = latent.pixels() else {
                return NodeCost::outputs(vec![Shape::Fixed]);
            };
            let tile = i.size("tile_size", 512) / LATENT_FACTOR;
            NodeCost::outputs(vec![Shape::image(b, h, w)])
                .working(vae_working(b, tile, tile))
                .work(megapasses(&latent) * 4.0)
        })
});

impl Node for VaeDecodeTiled {
    fn schema(&self) -> &NodeSchema {
        &VAE_DECODE_TILED
    }

    /// Tiles of `tile_size` pixels overlapping by `overlap` (cut to a quarter of the tile
    /// when larger, as ComfyUI does); the temporal inputs are for video VAEs.
    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let latent = inputs.object::<Latent>("samples")?;
        let vae = inputs.object::<VaeDecoder>("vae")?;
        let factor = vae.vae.downscale_factor();
        let tile = usize::try_from(inputs.int("tile_size")?).unwrap_or(512);
        let mut overlap = usize::try_from(inputs.int("overlap")?).unwrap_or(64);
        if tile < overlap * 4 {
            overlap = tile / 4;
        }
        let proceed = |step: usize, steps: usize| ctx.step(step as u64, steps as u64).is_ok();
        let images = vae.vae.decode_tiled_with(
            &latent.samples,
            (tile / factor).max(2),
            overlap / factor,
            &proceed,
        )?;
        Ok(vec![Value::Image(channels_last(ctx, &images)?)])
    }
}

/// ModelSamplingDiscrete: how the model's output is read and on which noise table.
struct ModelSamplingDiscrete;

static MODEL_SAMPLING_DISCRETE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new(
        "ModelSamplingDiscrete",
        "ModelSamplingDiscrete",
        "advanced/model",
    )
    .input(InputSpec::link("model", PortType::Model))
    .input(InputSpec::combo(
        "sampling",
        &["eps", "v_prediction", "lcm", "x0", "img_to_img"],
    ))
    .input(InputSpec::boolean("zsnr", false))
    .output(PortType::Model)
});

impl Node for ModelSamplingDiscrete {
    fn schema(&self) -> &NodeSchema {
        &MODEL_SAMPLING_DISCRETE
    }

    /// The same weights predicting noise, velocity or the clean latent, on the noise table
    /// rescaled to zero terminal SNR when `zsnr` (v-prediction anime finetunes want both).
    fn execute(&self, _: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        let model = inputs.object::<DiffusionModel>("model")?;
        let prediction = match inputs.str("sampling")? {
            "eps" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            "x0" => Prediction::X0,
            "img_to_img" => Prediction::ImgToImg,
            other => {
                return Err(NodeError::InvalidInput(format!(
                    "sampling {other:?} is not supported; eps, v_prediction, x0 and img_to_img are"
                )));
            }
        };
        let unet = Arc::new(
            model
                .unet
                .with_sampling(prediction, inputs.boolean("zsnr")?),
        );
        let mut source = model.source.clone();
        source.sampling = Some((prediction, inputs.boolean("zsnr")?));
        Ok(vec![Value::object(DiffusionModel { unet, source })])
    }
}

/// VAEEncode: images to latents (cropped to a multiple of 8, as ComfyUI does).
struct VaeEncode;

static VAE_ENCODE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("VAEEncode", "VAE Encode", "latent")
        .stage(Stage::Inference)
        .input(InputSpec::link("pixels", PortType::Image))
        .input(InputSpec::link("vae", PortType::Vae))
        .output(PortType::Latent)
        .shapes(|i| {
            let pixels = i.shape("pixels");
            let Some((b, h, w)) = pixels.pixels() else {
                return NodeCost::outputs(vec![Shape::Fixed]);
            };
            let latent = Shape::latent_for_pixels(b, h, w);
            NodeCost::outputs(vec![latent])
                .working(vae_working(b, h / LATENT_FACTOR, w / LATENT_FACTOR))
                .work(megapasses(&pixels) * 4.0)
        })
});

impl Node for VaeEncode {
    fn schema(&self) -> &NodeSchema {
        &VAE_ENCODE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let pixels = inputs.image("pixels")?;
        let vae = inputs.object::<VaeDecoder>("vae")?;
        let samples = encode_pixels(ctx, &vae.vae, pixels)?;
        Ok(vec![Value::object(Latent::new(samples))])
    }
}

/// The centre of `pixels` (`[b, h, w, c]`) that whole latent cells cover: its offsets and size.
pub(super) fn latent_aligned(
    vae: &VaeModel,
    pixels: &Tensor,
) -> Result<(usize, usize, usize, usize), NodeError> {
    let (_, h, w, c) = pixels.dims4()?;
    let factor = vae.downscale_factor();
    let (ch, cw) = (h / factor * factor, w / factor * factor);
    if ch == 0 || cw == 0 || c < 3 {
        return Err(NodeError::InvalidInput(format!(
            "VAE encoding needs an RGB image of at least {factor}x{factor}, got {:?}",
            pixels.dims()
        )));
    }
    Ok(((h - ch) / 2, (w - cw) / 2, ch, cw))
}

/// Encodes the latent-aligned centre of `pixels` (`[b, h, w, c]`, 0..1) into latents.
pub(super) fn encode_pixels(
    ctx: &ExecContext<'_>,
    vae: &VaeModel,
    pixels: &Tensor,
) -> Result<Tensor, NodeError> {
    let (top, left, ch, cw) = latent_aligned(vae, pixels)?;
    let cropped = pixels
        .narrow(1, top, ch)?
        .narrow(2, left, cw)?
        .narrow(3, 0, 3)?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    let proceed = |step: usize, steps: usize| ctx.step(step as u64, steps as u64).is_ok();
    Ok(vae.encode_with(&cropped, &proceed)?)
}

/// Resizes latents with one of ComfyUI's methods: nearest-exact and bilinear exactly,
/// area as an average pool when shrinking by a whole factor; bicubic and bislerp fall back
/// to bilinear.
fn resize_latent(
    samples: &Tensor,
    width: usize,
    height: usize,
    method: &str,
) -> Result<Tensor, NodeError> {
    let (_, _, h, w) = samples.dims4()?;
    if (h, w) == (height, width) {
        return Ok(samples.clone());
    }
    let resized = match method {
        "nearest-exact" => samples.upsample_nearest2d(height, width)?,
        "area" if h % height == 0 && w % width == 0 && h / height == w / width => {
            samples.avg_pool2d(h / height)?
        }
        _ => samples.upsample_bilinear2d(height, width, false)?,
    };
    Ok(resized)
}

fn center_crop(samples: &Tensor, width: usize, height: usize) -> Result<Tensor, NodeError> {
    let (_, _, h, w) = samples.dims4()?;
    let old_aspect = w as f64 / h as f64;
    let new_aspect = width as f64 / height as f64;
    if (old_aspect - new_aspect).abs() < 1e-9 {
        return Ok(samples.clone());
    }
    let cropped = if old_aspect > new_aspect {
        let keep = ((h as f64) * new_aspect).round().max(1.0) as usize;
        samples.narrow(3, (w - keep) / 2, keep)?
    } else {
        let keep = ((w as f64) / new_aspect).round().max(1.0) as usize;
        samples.narrow(2, (h - keep) / 2, keep)?
    };
    Ok(cropped)
}

/// LatentUpscale: to a pixel size (0 keeps the aspect from the other side).
struct LatentUpscale;

static LATENT_UPSCALE: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("LatentUpscale", "Upscale Latent", "latent")
        .input(InputSpec::link("samples", PortType::Latent))
        .input(InputSpec::combo("upscale_method", LATENT_UPSCALE_METHODS))
        .input(InputSpec::int_step("width", 512, 0, MAX_RESOLUTION, 8))
        .input(InputSpec::int_step("height", 512, 0, MAX_RESOLUTION, 8))
        .input(InputSpec::combo("crop", &["disabled", "center"]))
        .output(PortType::Latent)
        .shapes(|i| {
            let source = i.shape("samples");
            let Some((h, w)) = source.spatial() else {
                return NodeCost::outputs(vec![source]);
            };
            let (width, height) = crate::shape::target_size(
                w,
                h,
                i.size("width", 512) / LATENT_FACTOR,
                i.size("height", 512) / LATENT_FACTOR,
            );
            latent_resize_cost(source, height, width)
        })
});

impl Node for LatentUpscale {
    fn schema(&self) -> &NodeSchema {
        &LATENT_UPSCALE
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let latent = inputs.object::<Latent>("samples")?;
        let (_, _, h, w) = latent.samples.dims4()?;
        let (mut width, mut height) = (
            usize_input(inputs, "width")? / 8,
            usize_input(inputs, "height")? / 8,
        );
        if width == 0 && height == 0 {
            return Ok(vec![Value::Object(latent)]);
        }
        if width == 0 {
            width = ((w as f64) * height as f64 / h as f64).round().max(1.0) as usize;
        }
        if height == 0 {
            height = ((h as f64) * width as f64 / w as f64).round().max(1.0) as usize;
        }
        let source = if inputs.str("crop")? == "center" {
            center_crop(&latent.samples, width, height)?
        } else {
            latent.samples.clone()
        };
        let samples = resize_latent(&source, width, height, inputs.str("upscale_method")?)?;
        Ok(vec![Value::object(latent.with_samples(samples))])
    }
}

/// LatentUpscaleBy: by a factor.
struct LatentUpscaleBy;

static LATENT_UPSCALE_BY: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("LatentUpscaleBy", "Upscale Latent By", "latent")
        .input(InputSpec::link("samples", PortType::Latent))
        .input(InputSpec::combo("upscale_method", LATENT_UPSCALE_METHODS))
        .input(InputSpec::float("scale_by", 1.5, 0.01, 8.0, 0.01))
        .output(PortType::Latent)
        .shapes(|i| {
            let source = i.shape("samples");
            let factor = i.float("scale_by").unwrap_or(1.5);
            match source.spatial() {
                Some((h, w)) => latent_resize_cost(source, scaled(h, factor), scaled(w, factor)),
                None => NodeCost::outputs(vec![source]),
            }
        })
});

impl Node for LatentUpscaleBy {
    fn schema(&self) -> &NodeSchema {
        &LATENT_UPSCALE_BY
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let latent = inputs.object::<Latent>("samples")?;
        let (_, _, h, w) = latent.samples.dims4()?;
        let scale = inputs.float("scale_by")?;
        let width = ((w as f64 * scale).round() as usize).max(1);
        let height = ((h as f64 * scale).round() as usize).max(1);
        let samples = resize_latent(
            &latent.samples,
            width,
            height,
            inputs.str("upscale_method")?,
        )?;
        Ok(vec![Value::object(latent.with_samples(samples))])
    }
}

/// RepeatLatentBatch: the batch repeated `amount` times.
struct RepeatLatentBatch;

static REPEAT_LATENT_BATCH: LazyLock<NodeSchema> = LazyLock::new(|| {
    NodeSchema::new("RepeatLatentBatch", "Repeat Latent Batch", "latent/batch")
        .input(InputSpec::link("samples", PortType::Latent))
        .input(InputSpec::int("amount", 1, 1, 64))
        .output(PortType::Latent)
        .shapes(|i| {
            let source = i.shape("samples");
            let amount = i.size("amount", 1).max(1);
            NodeCost::outputs(vec![
                source.with_batch(source.batch().saturating_mul(amount)),
            ])
        })
});

impl Node for RepeatLatentBatch {
    fn schema(&self) -> &NodeSchema {
        &REPEAT_LATENT_BATCH
    }

    fn execute(&self, ctx: &ExecContext<'_>, inputs: &Inputs) -> Result<Vec<Value>, NodeError> {
        ctx.reserve_for(self.schema(), inputs)?;
        let latent = inputs.object::<Latent>("samples")?;
        let amount = usize_input(inputs, "amount")?.max(1);
        let samples = latent.samples.repeat((amount, 1, 1, 1))?;
        Ok(vec![Value::object(latent.with_samples(samples))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rig;

    fn rig() -> Rig {
        Rig::new(|models| {
            sakuga_models::demo::write_demo_models(models).unwrap();
        })
    }

    fn run(rig: &Rig, node: &dyn Node, inputs: &[(&str, Value)]) -> Result<Vec<Value>, NodeError> {
        rig.run(node, inputs)
    }

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    fn txt2img(rig: &Rig, seed: i64) -> Tensor {
        let loaded = run(
            rig,
            &CheckpointLoaderSimple,
            &[("ckpt_name", s(sakuga_models::demo::DEMO_CHECKPOINT))],
        )
        .unwrap();
        let pos = run(
            rig,
            &ClipTextEncode,
            &[
                ("text", s("1girl, cherry blossoms")),
                ("clip", loaded[1].clone()),
            ],
        )
        .unwrap();
        let neg = run(
            rig,
            &ClipTextEncode,
            &[("text", s("lowres")), ("clip", loaded[1].clone())],
        )
        .unwrap();
        let latent = run(
            rig,
            &EmptyLatentImage,
            &[
                ("width", Value::Int(64)),
                ("height", Value::Int(64)),
                ("batch_size", Value::Int(1)),
            ],
        )
        .unwrap();
        let sampled = run(
            rig,
            &KSampler,
            &[
                ("model", loaded[0].clone()),
                ("seed", Value::Int(seed)),
                ("steps", Value::Int(3)),
                ("cfg", Value::Float(7.0)),
                ("sampler_name", s("euler_ancestral")),
                ("scheduler", s("karras")),
                ("positive", pos[0].clone()),
                ("negative", neg[0].clone()),
                ("latent_image", latent[0].clone()),
                ("denoise", Value::Float(1.0)),
            ],
        )
        .unwrap();
        let images = run(
            rig,
            &VaeDecode,
            &[("samples", sampled[0].clone()), ("vae", loaded[2].clone())],
        )
        .unwrap();
        match &images[0] {
            Value::Image(t) => t.clone(),
            other => panic!("expected image, got {other:?}"),
        }
    }

    #[test]
    fn demo_txt2img_through_the_nodes_is_reproducible() {
        let rig = rig();
        let a = txt2img(&rig, 7);
        assert_eq!(a.dims(), &[1, 64, 64, 3]);
        let b = txt2img(&rig, 7);
        let c = txt2img(&rig, 8);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&a), flat(&b));
        assert_ne!(flat(&a), flat(&c));
        let cache = rig.env.resources.get::<ModelCache>().unwrap();
        assert!(cache.stats().hits >= 3, "{:?}", cache.stats());
    }

    #[test]
    fn lora_loader_and_latent_nodes() {
        let rig = rig();
        let loaded = run(
            &rig,
            &CheckpointLoaderSimple,
            &[("ckpt_name", s(sakuga_models::demo::DEMO_CHECKPOINT))],
        )
        .unwrap();
        let patched = run(
            &rig,
            &LoraLoader,
            &[
                ("model", loaded[0].clone()),
                ("clip", loaded[1].clone()),
                ("lora_name", s(sakuga_models::demo::DEMO_LORA)),
                ("strength_model", Value::Float(0.8)),
                ("strength_clip", Value::Float(1.0)),
            ],
        )
        .unwrap();
        assert_eq!(patched.len(), 2);
        let err = run(
            &rig,
            &LoraLoader,
            &[
                ("model", loaded[0].clone()),
                ("clip", loaded[1].clone()),
                ("lora_name", s("../escape.safetensors")),
                ("strength_model", Value::Float(1.0)),
                ("strength_clip", Value::Float(1.0)),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("escape"), "{err}");

        let latent = run(
            &rig,
            &EmptyLatentImage,
            &[
                ("width", Value::Int(64)),
                ("height", Value::Int(48)),
                ("batch_size", Value::Int(2)),
            ],
        )
        .unwrap();
        let up = run(
            &rig,
            &LatentUpscaleBy,
            &[
                ("samples", latent[0].clone()),
                ("upscale_method", s("nearest-exact")),
                ("scale_by", Value::Float(2.0)),
            ],
        )
        .unwrap();
        let dims = |v: &Value| match v {
            Value::Object(o) => o
                .clone()
                .downcast::<Latent>()
                .unwrap()
                .samples
                .dims()
                .to_vec(),
            _ => panic!("not a latent"),
        };
        assert_eq!(dims(&up[0]), vec![2, 4, 12, 16]);
        let sized = run(
            &rig,
            &LatentUpscale,
            &[
                ("samples", latent[0].clone()),
                ("upscale_method", s("bilinear")),
                ("width", Value::Int(128)),
                ("height", Value::Int(0)),
                ("crop", s("disabled")),
            ],
        )
        .unwrap();
        assert_eq!(dims(&sized[0]), vec![2, 4, 12, 16]);
        let repeated = run(
            &rig,
            &RepeatLatentBatch,
            &[("samples", latent[0].clone()), ("amount", Value::Int(3))],
        )
        .unwrap();
        assert_eq!(dims(&repeated[0]), vec![6, 4, 6, 8]);
    }

    #[test]
    fn split_loaders_sample_as_the_checkpoint_does() {
        use std::collections::BTreeMap;

        use sakuga_models::demo::{DEMO_SEED, demo_checkpoint_tensors, demo_diffusers_tensors};
        use sakuga_models::diffusion::SdConfig;
        use sakuga_models::store::write_safetensors;

        let rig = rig();
        let models = &rig.env.models_dir;
        let config = SdConfig::demo_sdxl();
        let unet: BTreeMap<String, Tensor> = demo_checkpoint_tensors(&config, DEMO_SEED)
            .unwrap()
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("model.diffusion_model.")
                    .map(|k| (k.into(), v))
            })
            .collect();
        write_safetensors(
            &models.join("diffusion_models/xl.safetensors"),
            &unet,
            &BTreeMap::new(),
        )
        .unwrap();
        let parts = demo_diffusers_tensors(&config, DEMO_SEED).unwrap();
        let encoders = models.join("text_encoders");
        write_safetensors(
            &encoders.join("l.safetensors"),
            &parts.clip,
            &BTreeMap::new(),
        )
        .unwrap();
        let g: BTreeMap<String, Tensor> = parts
            .clip_g
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "text_projection" => ("text_projection.weight".into(), v.t().unwrap()),
                _ => (k, v),
            })
            .collect();
        write_safetensors(&encoders.join("g.safetensors"), &g, &BTreeMap::new()).unwrap();

        let sample = |model: Value, clip: Value| {
            let encode = |text: &str| {
                run(
                    &rig,
                    &ClipTextEncode,
                    &[("text", s(text)), ("clip", clip.clone())],
                )
                .unwrap()
            };
            let latent = run(
                &rig,
                &EmptyLatentImage,
                &[
                    ("width", Value::Int(64)),
                    ("height", Value::Int(64)),
                    ("batch_size", Value::Int(1)),
                ],
            )
            .unwrap();
            let out = run(
                &rig,
                &KSampler,
                &[
                    ("model", model),
                    ("seed", Value::Int(3)),
                    ("steps", Value::Int(2)),
                    ("cfg", Value::Float(5.0)),
                    ("sampler_name", s("euler")),
                    ("scheduler", s("normal")),
                    ("positive", encode("a fox")[0].clone()),
                    ("negative", encode("")[0].clone()),
                    ("latent_image", latent[0].clone()),
                    ("denoise", Value::Float(1.0)),
                ],
            )
            .unwrap();
            let Value::Object(o) = &out[0] else { panic!() };
            let latent = o.clone().downcast::<Latent>().unwrap();
            latent
                .samples
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let whole = run(
            &rig,
            &CheckpointLoaderSimple,
            &[("ckpt_name", s(sakuga_models::demo::DEMO_SDXL_CHECKPOINT))],
        )
        .unwrap();
        let unet = run(
            &rig,
            &UnetLoader,
            &[
                ("unet_name", s("xl.safetensors")),
                ("weight_dtype", s("default")),
            ],
        )
        .unwrap();
        let clip = run(
            &rig,
            &DualClipLoader,
            &[
                ("clip_name1", s("g.safetensors")),
                ("clip_name2", s("l.safetensors")),
                ("type", s("sdxl")),
            ],
        )
        .unwrap();
        assert_eq!(
            sample(unet[0].clone(), clip[0].clone()),
            sample(whole[0].clone(), whole[1].clone())
        );
        let one = run(
            &rig,
            &ClipLoader,
            &[
                ("clip_name", s("g.safetensors")),
                ("type", s("stable_diffusion")),
            ],
        );
        assert!(one.is_ok(), "one OpenCLIP file loads as a single encoder");
    }

    #[test]
    fn model_sampling_discrete_and_tiled_decode() {
        let rig = rig();
        let loaded = run(
            &rig,
            &CheckpointLoaderSimple,
            &[("ckpt_name", s(sakuga_models::demo::DEMO_CHECKPOINT))],
        )
        .unwrap();
        let reread = |sampling: &str, zsnr: bool| {
            let out = run(
                &rig,
                &ModelSamplingDiscrete,
                &[
                    ("model", loaded[0].clone()),
                    ("sampling", s(sampling)),
                    ("zsnr", Value::Boolean(zsnr)),
                ],
            )
            .unwrap();
            let Value::Object(o) = &out[0] else { panic!() };
            o.clone().downcast::<DiffusionModel>().unwrap()
        };
        let v = reread("v_prediction", true);
        assert_eq!(v.unet.config().prediction, Prediction::V);
        assert!(
            v.unet.sampling().sigma_max() > 4000.0,
            "zsnr's last sigma is huge"
        );
        // A LoRA after the override reloads the UNet from its source; the override stays.
        let patched = run(
            &rig,
            &LoraLoaderModelOnly,
            &[
                ("model", Value::object((*v).clone())),
                ("lora_name", s(sakuga_models::demo::DEMO_LORA)),
                ("strength_model", Value::Float(0.5)),
            ],
        )
        .unwrap();
        let Value::Object(o) = &patched[0] else {
            panic!()
        };
        let patched = o.clone().downcast::<DiffusionModel>().unwrap();
        assert_eq!(patched.unet.config().prediction, Prediction::V);
        assert!(patched.unet.sampling().sigma_max() > 4000.0);
        let eps = reread("eps", false);
        assert!((eps.unet.sampling().sigma_max() - 14.6146).abs() < 1e-3);
        assert!(matches!(
            run(
                &rig,
                &ModelSamplingDiscrete,
                &[
                    ("model", loaded[0].clone()),
                    ("sampling", s("lcm")),
                    ("zsnr", Value::Boolean(false)),
                ],
            ),
            Err(NodeError::InvalidInput(_))
        ));
        // A tile as large as the image decodes exactly as one pass; 64 px tiles really
        // tile (the demo VAE is untrained, so its seams show).
        let latent = Value::object(Latent::new(
            Tensor::rand(-1f32, 1.0, (1, 4, 16, 16), &Device::Cpu).unwrap(),
        ));
        let pixels = |v: &Value| match v {
            Value::Image(t) => t.clone(),
            other => panic!("not an image: {other:?}"),
        };
        let whole = pixels(
            &run(
                &rig,
                &VaeDecode,
                &[("samples", latent.clone()), ("vae", loaded[2].clone())],
            )
            .unwrap()[0],
        );
        let tiled = |tile: i64| {
            pixels(
                &run(
                    &rig,
                    &VaeDecodeTiled,
                    &[
                        ("samples", latent.clone()),
                        ("vae", loaded[2].clone()),
                        ("tile_size", Value::Int(tile)),
                        ("overlap", Value::Int(32)),
                        ("temporal_size", Value::Int(64)),
                        ("temporal_overlap", Value::Int(8)),
                    ],
                )
                .unwrap()[0],
            )
        };
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&whole, &tiled(512)) < 1e-5);
        let small = tiled(64);
        assert_eq!(small.dims(), whole.dims());
        assert!(diff(&whole, &small) > 1e-3, "64 px tiles were used");
    }

    #[test]
    fn cancelled_sampling_reports_cancelled() {
        let rig = rig();
        let loaded = run(
            &rig,
            &CheckpointLoaderSimple,
            &[("ckpt_name", s(sakuga_models::demo::DEMO_CHECKPOINT))],
        )
        .unwrap();
        let cond = run(
            &rig,
            &ClipTextEncode,
            &[("text", s("x")), ("clip", loaded[1].clone())],
        )
        .unwrap();
        let latent = run(
            &rig,
            &EmptyLatentImage,
            &[
                ("width", Value::Int(64)),
                ("height", Value::Int(64)),
                ("batch_size", Value::Int(1)),
            ],
        )
        .unwrap();
        rig.cancel.cancel();
        let err = run(
            &rig,
            &KSampler,
            &[
                ("model", loaded[0].clone()),
                ("seed", Value::Int(1)),
                ("steps", Value::Int(3)),
                ("cfg", Value::Float(7.0)),
                ("sampler_name", s("euler")),
                ("scheduler", s("normal")),
                ("positive", cond[0].clone()),
                ("negative", cond[0].clone()),
                ("latent_image", latent[0].clone()),
                ("denoise", Value::Float(1.0)),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, NodeError::Cancelled), "{err}");
    }

    #[test]
    fn schemas_match_comfyui() {
        let ks = KSampler.schema();
        let names: Vec<_> = ks.inputs.iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            [
                "model",
                "seed",
                "steps",
                "cfg",
                "sampler_name",
                "scheduler",
                "positive",
                "negative",
                "latent_image",
                "denoise"
            ]
        );
        let adv: Vec<_> = KSamplerAdvanced
            .schema()
            .inputs
            .iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(
            adv,
            [
                "model",
                "add_noise",
                "noise_seed",
                "steps",
                "cfg",
                "sampler_name",
                "scheduler",
                "positive",
                "negative",
                "latent_image",
                "start_at_step",
                "end_at_step",
                "return_with_leftover_noise"
            ]
        );
        for name in SAMPLER_NAMES.iter() {
            assert!(SamplerKind::from_name(name).is_some());
        }
        for name in SCHEDULER_NAMES.iter() {
            assert!(Scheduler::from_name(name).is_some());
        }
    }
}
