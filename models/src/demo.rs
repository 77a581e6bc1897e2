//! Small deterministic demo models in the real file formats and key layouts.
//!
//! `sakuga models demo` and the tests need models that load through exactly the code real
//! ones use, run on a CPU in seconds and never download: a tiny SD 1.5-layout single-file
//! checkpoint (`checkpoints/sakuga-demo-sd15.safetensors`, LDM key names, the real tokenizer
//! vocabulary, [`SdConfig::demo`] widths) and a kohya-format LoRA for it
//! (`loras/sakuga-demo-lora.safetensors`). Weights come from the seeded [`NoiseRng`] using
//! each layer's usual initialisation, so every run writes identical bytes.
//!
//! Other model families add their demo writers to [`EXTRA_DEMO_WRITERS`] (the upscaler and
//! interpolator owners: append `crate::upscale::demo::write_demo_models` and friends there).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use parking_lot::Mutex;
use std::sync::Arc;

use crate::diffusion::clip::ClipTextModel;
use crate::diffusion::clip_vision::{CLIP_VISION_CONFIG_KEY, ClipVisionConfig, ClipVisionModel};
use crate::diffusion::config::ClipActivation;
use crate::diffusion::config::{CONFIG_METADATA_KEY, SdConfig};
use crate::diffusion::controlnet::{ControlNet, ControlNetConfig, control_to_ldm};
use crate::diffusion::keymap::{
    SDXL_CLIP_G_PREFIX, SDXL_CLIP_L_PREFIX, SDXL_REFINER_CLIP_PREFIX, clip_to_ldm,
    open_clip_to_ldm_at, split_slice, unet_to_ldm, vae_to_ldm,
};
use crate::diffusion::rng::NoiseRng;
use crate::diffusion::unet::Unet;
use crate::diffusion::vae::VaeModel;
use crate::error::{ModelError, Result};
use crate::store::{ModelFolder, write_safetensors};

/// File name of the demo checkpoint inside `checkpoints/`.
pub const DEMO_CHECKPOINT: &str = "sakuga-demo-sd15.safetensors";
/// File name of the SDXL demo checkpoint inside `checkpoints/`.
pub const DEMO_SDXL_CHECKPOINT: &str = "sakuga-demo-sdxl.safetensors";
/// File name of the demo textual-inversion embedding inside `embeddings/`.
pub const DEMO_EMBEDDING: &str = "sakuga-demo-embedding.safetensors";
/// File name of the standalone demo VAE inside `vae/`.
pub const DEMO_VAE: &str = "sakuga-demo-vae.safetensors";
/// File name of the SDXL refiner demo checkpoint inside `checkpoints/`.
pub const DEMO_SDXL_REFINER_CHECKPOINT: &str = "sakuga-demo-sdxl-refiner.safetensors";
/// File name of the SD 1.5 inpainting demo checkpoint (a 9-channel UNet) inside
/// `checkpoints/`.
pub const DEMO_INPAINTING_CHECKPOINT: &str = "sakuga-demo-sd15-inpainting.safetensors";
/// File name of the demo Lotus depth UNet inside `diffusion_models/`.
pub const DEMO_LOTUS_UNET: &str = "sakuga-demo-lotus-depth.safetensors";
/// File name of the SD 1.5 demo ControlNet (LDM layout) inside `controlnet/`.
pub const DEMO_CONTROLNET: &str = "sakuga-demo-controlnet-sd15.safetensors";
/// File name of the SDXL demo ControlNet (diffusers layout) inside `controlnet/`.
pub const DEMO_SDXL_CONTROLNET: &str = "sakuga-demo-controlnet-sdxl.safetensors";
/// File name of the SD 1.5 demo in the full four-level block layout inside `checkpoints/`.
pub const DEMO_SD15_FULL_CHECKPOINT: &str = "sakuga-demo-sd15-full.safetensors";
/// File name of the demo depth T2I adapter (for [`DEMO_SD15_FULL_CHECKPOINT`]) inside
/// `controlnet/`.
pub const DEMO_T2I_ADAPTER: &str = "sakuga-demo-t2i-adapter-depth-sd15.safetensors";
/// File name of the demo CLIP vision encoder (ViT-bigG's layout at toy widths, projecting to
/// the SDXL demo's pooled width) inside `clip_vision/`.
pub const DEMO_CLIP_VISION: &str = "sakuga-demo-clip-vision-g.safetensors";
/// File name of the demo LoRA inside `loras/`.
pub const DEMO_LORA: &str = "sakuga-demo-lora.safetensors";

/// Writes one family's demo models under a models root and returns the files written.
pub type DemoWriter = fn(&Path) -> Result<Vec<PathBuf>>;

/// Demo writers of other model families, run after the diffusion ones.
pub const EXTRA_DEMO_WRITERS: &[DemoWriter] = &[
    crate::upscale::demo::write_demo_upscaler,
    crate::interpolate::demo::write_demo_models,
];

/// Writes every demo model under `dir` (a models root in ComfyUI layout) and returns the
/// paths written. Rewriting gives byte-identical files.
///
/// # Errors
/// [`ModelError::Io`] when a file cannot be written.
pub fn write_demo_models(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = vec![
        write_demo_checkpoint(dir)?,
        write_demo_sdxl_checkpoint(dir)?,
        write_demo_sdxl_refiner_checkpoint(dir)?,
        write_demo_inpainting_checkpoint(dir)?,
        write_demo_lotus_unet(dir)?,
        write_demo_vae(dir)?,
        write_demo_embedding(dir)?,
        write_demo_lora(dir)?,
        write_checkpoint(
            dir,
            &SdConfig::demo_sd15_full(),
            DEMO_SD15_FULL_CHECKPOINT,
            "sakuga demo: SD 1.5's full block layout at toy widths, random weights",
        )?,
        write_demo_t2i_adapter(dir)?,
        write_demo_clip_vision(dir)?,
    ];
    written.extend(write_demo_controlnets(dir)?);
    for writer in EXTRA_DEMO_WRITERS {
        written.extend(writer(dir)?);
    }
    Ok(written)
}

/// A VarBuilder backend that invents each requested tensor from its init hint with a
/// seeded generator keyed by the tensor's name, and remembers it.
struct SeededInit {
    seed: u64,
    created: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

fn name_stream(name: &str) -> u64 {
    // FNV-1a: a stable per-name stream id (std's hasher is not stable across releases).
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SeededInit {
    fn make(&self, shape: &Shape, name: &str, init: Init) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let count = shape.elem_count();
        let rng = NoiseRng::new(self.seed, name_stream(name));
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; count],
            Init::Randn { mean, stdev } => rng
                .normals(count)
                .into_iter()
                .map(|v| (mean + stdev * f64::from(v)) as f32)
                .collect(),
            Init::Uniform { lo, up } => uniform(&rng, count, lo, up),
            Init::Kaiming { .. } => {
                let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
                let bound = (3.0 / fan_in as f64).sqrt();
                uniform(&rng, count, -bound, bound)
            }
        };
        let tensor = Tensor::from_vec(values, dims, &Device::Cpu)?;
        self.created.lock().insert(name.to_string(), tensor.clone());
        Ok(tensor)
    }
}

fn uniform(rng: &NoiseRng, count: usize, lo: f64, up: f64) -> Vec<f32> {
    (0..count as u64)
        .map(|i| (lo + (up - lo) * rng.uniform_at(i)) as f32)
        .collect()
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(existing) = self.created.lock().get(name) {
            return existing.to_dtype(dtype)?.to_device(dev);
        }
        self.make(&s, name, h)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_string(),
        })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Answer "diffusers names" questions the way a checkpoint would (the VAE attention
        // asks whether `to_q` exists to pick its naming).
        name.ends_with("to_q.weight")
    }
}

/// Runs `build` against a seeded backend and returns every tensor it asked for.
fn invent<T>(
    seed: u64,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> Result<BTreeMap<String, Tensor>> {
    let created = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = SeededInit {
        seed,
        created: created.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    build(vb)?;
    let map = std::mem::take(&mut *created.lock());
    Ok(map)
}

/// Seeded tensors for `config` under candle's (diffusers/transformers) names: UNet, VAE and
/// CLIP text encoder, as a diffusers folder stores them.
///
/// # Errors
/// Tensor errors.
pub fn demo_diffusers_tensors(config: &SdConfig, seed: u64) -> Result<DiffusersTensors> {
    let unet = invent(seed, |vb| Unet::new(vb, &config.unet))?;
    let vae = invent(seed.wrapping_add(1), |vb| VaeModel::new(vb, &config.vae))?;
    let clip = invent(seed.wrapping_add(2), |vb| {
        ClipTextModel::new(vb, &config.clip)
    })?;
    let clip_g = match &config.clip_g {
        Some(g) => invent(seed.wrapping_add(3), |vb| ClipTextModel::new(vb, g))?,
        None => BTreeMap::new(),
    };
    Ok(DiffusersTensors {
        unet,
        vae,
        clip,
        clip_g,
    })
}

/// Tensors of one checkpoint split by part, under diffusers names.
#[derive(Debug, Clone)]
pub struct DiffusersTensors {
    pub unet: BTreeMap<String, Tensor>,
    pub vae: BTreeMap<String, Tensor>,
    pub clip: BTreeMap<String, Tensor>,
    /// SDXL's OpenCLIP-G (empty otherwise).
    pub clip_g: BTreeMap<String, Tensor>,
}

/// The demo checkpoint's tensors under their LDM names.
///
/// # Errors
/// Tensor errors.
pub fn demo_checkpoint_tensors(config: &SdConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let DiffusersTensors {
        unet,
        vae,
        clip,
        clip_g,
    } = demo_diffusers_tensors(config, seed)?;
    let unmapped = |name: &str| ModelError::InvalidInput(format!("no LDM name for {name}"));
    let mut tensors = BTreeMap::new();
    for (name, tensor) in unet {
        let ldm = unet_to_ldm(&name, &config.unet).ok_or_else(|| unmapped(&name))?;
        tensors.insert(ldm, tensor);
    }
    for (name, tensor) in vae {
        let ldm = vae_to_ldm(&name, &config.vae).ok_or_else(|| unmapped(&name))?;
        // The original VAE stores its attention projections as 1x1 convolutions.
        let tensor = if ldm.contains(".attn_1.") && tensor.rank() == 2 {
            let (o, i) = tensor.dims2()?;
            tensor.reshape((o, i, 1, 1))?
        } else {
            tensor
        };
        tensors.insert(ldm, tensor);
    }
    let (open_clip, open_clip_prefix) = if config.is_sdxl_refiner() {
        (clip, SDXL_REFINER_CLIP_PREFIX)
    } else {
        let sdxl = config.clip_g.is_some();
        for (name, tensor) in clip {
            let ldm = if sdxl {
                format!("{SDXL_CLIP_L_PREFIX}{name}")
            } else {
                clip_to_ldm(&name).remove(0)
            };
            tensors.insert(ldm, tensor);
        }
        (clip_g, SDXL_CLIP_G_PREFIX)
    };
    // OpenCLIP keeps query, key and value in one `in_proj` tensor: gather the thirds.
    let mut fused: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, tensor) in open_clip {
        let ldm = open_clip_to_ldm_at(open_clip_prefix, &name).ok_or_else(|| unmapped(&name))?;
        match split_slice(&ldm) {
            (base, Some((third, 3))) => {
                fused.entry(base.to_string()).or_default()[third] = Some(tensor)
            }
            _ => {
                tensors.insert(ldm, tensor);
            }
        }
    }
    for (name, thirds) in fused {
        let parts: Vec<Tensor> = thirds
            .into_iter()
            .map(|t| t.ok_or_else(|| unmapped(&name)))
            .collect::<Result<_>>()?;
        tensors.insert(name, Tensor::cat(&parts, 0)?);
    }
    Ok(tensors)
}

/// Seed of the demo checkpoint's weights.
pub const DEMO_SEED: u64 = 0x5a6b_u64;

/// Writes `checkpoints/sakuga-demo-sd15.safetensors`.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_checkpoint(dir: &Path) -> Result<PathBuf> {
    write_checkpoint(
        dir,
        &SdConfig::demo(),
        DEMO_CHECKPOINT,
        "tiny seeded demo model in SD 1.5 LDM layout; not trained",
    )
}

/// Writes `checkpoints/sakuga-demo-sdxl.safetensors`: [`SdConfig::demo_sdxl`] in the SGM
/// single-file layout ComfyUI loads (`conditioner.embedders.0/1`).
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_sdxl_checkpoint(dir: &Path) -> Result<PathBuf> {
    write_checkpoint(
        dir,
        &SdConfig::demo_sdxl(),
        DEMO_SDXL_CHECKPOINT,
        "tiny seeded demo model in SDXL's SGM layout; not trained",
    )
}

/// Writes `checkpoints/sakuga-demo-sdxl-refiner.safetensors`
/// ([`SdConfig::demo_sdxl_refiner`]; OpenCLIP-G as `conditioner.embedders.0`).
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_sdxl_refiner_checkpoint(dir: &Path) -> Result<PathBuf> {
    write_checkpoint(
        dir,
        &SdConfig::demo_sdxl_refiner(),
        DEMO_SDXL_REFINER_CHECKPOINT,
        "tiny seeded demo model in the SDXL refiner's SGM layout; not trained",
    )
}

/// Writes `checkpoints/sakuga-demo-sd15-inpainting.safetensors`: the SD 1.5 demo with an
/// inpainting UNet, whose input convolution also reads the mask and the masked image
/// (9 channels), as SD 1.5 inpainting checkpoints are.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_inpainting_checkpoint(dir: &Path) -> Result<PathBuf> {
    let mut config = SdConfig::demo();
    config.unet.in_channels = 9;
    write_checkpoint(
        dir,
        &config,
        DEMO_INPAINTING_CHECKPOINT,
        "tiny seeded demo inpainting model (9-channel UNet) in SD 1.5 LDM layout; not trained",
    )
}

/// Lotus's UNet at toy widths: SD 2.x's layout (linear projections, a 1024-wide context)
/// with the 4-wide class input Lotus reads its task from; heads follow SD 2.x's 64-channel
/// rule, so the shapes alone describe it.
pub fn demo_lotus_unet_config() -> crate::diffusion::config::UnetConfig {
    use crate::diffusion::config::{LOTUS_TASK_CHANNELS, UnetConfig, UnetLevel};
    UnetConfig {
        in_channels: 4,
        out_channels: 4,
        levels: vec![
            UnetLevel {
                channels: 32,
                transformer_depth: Some(1),
                heads: 1,
            },
            UnetLevel {
                channels: 64,
                transformer_depth: None,
                heads: 1,
            },
        ],
        layers_per_block: 1,
        norm_num_groups: 32,
        cross_attention_dim: 1024,
        use_linear_projection: true,
        adm_in_channels: Some(LOTUS_TASK_CHANNELS),
        mid_transformer_depth: None,
    }
}

/// Writes `diffusion_models/sakuga-demo-lotus-depth.safetensors`: a Lotus depth UNet alone
/// in the LDM layout without prefix, as `UNETLoader` reads Lotus.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_lotus_unet(dir: &Path) -> Result<PathBuf> {
    let config = demo_lotus_unet_config();
    let mut tensors = BTreeMap::new();
    for (name, tensor) in invent(DEMO_SEED.wrapping_add(300), |vb| Unet::new(vb, &config))? {
        let ldm = unet_to_ldm(&name, &config)
            .ok_or_else(|| ModelError::InvalidInput(format!("no LDM name for {name}")))?;
        let bare = ldm
            .strip_prefix(crate::diffusion::keymap::LDM_UNET_PREFIX)
            .unwrap_or(&ldm)
            .to_string();
        tensors.insert(bare, tensor);
    }
    let path = dir
        .join(ModelFolder::DiffusionModels.dir_name())
        .join(DEMO_LOTUS_UNET);
    write_safetensors(&path, &tensors, &BTreeMap::new())?;
    Ok(path)
}

/// Writes `vae/sakuga-demo-vae.safetensors`: the SD 1.5 demo's VAE alone, in the LDM
/// layout standalone VAE files use (no `first_stage_model.` prefix), with the VAE seed
/// shifted so it decodes differently from the checkpoint's own.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_vae(dir: &Path) -> Result<PathBuf> {
    let config = SdConfig::demo();
    let vae = demo_diffusers_tensors(&config, DEMO_SEED.wrapping_add(100))?.vae;
    let mut tensors = BTreeMap::new();
    for (name, tensor) in vae {
        let ldm = vae_to_ldm(&name, &config.vae)
            .ok_or_else(|| ModelError::InvalidInput(format!("no LDM name for {name}")))?;
        let bare = ldm[crate::diffusion::keymap::LDM_VAE_PREFIX.len()..].to_string();
        let tensor = if bare.contains(".attn_1.") && tensor.rank() == 2 {
            let (o, i) = tensor.dims2()?;
            tensor.reshape((o, i, 1, 1))?
        } else {
            tensor
        };
        tensors.insert(bare, tensor);
    }
    let path = dir.join(ModelFolder::Vae.dir_name()).join(DEMO_VAE);
    write_safetensors(&path, &tensors, &BTreeMap::new())?;
    Ok(path)
}

/// Writes `embeddings/sakuga-demo-embedding.safetensors`: two seeded vectors for the SD 1.5
/// demo's text encoder (`emb_params`, as A1111 saves them in safetensors).
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_embedding(dir: &Path) -> Result<PathBuf> {
    let width = SdConfig::demo().clip.width;
    let values = NoiseRng::new(DEMO_SEED, name_stream("embedding")).normals(2 * width);
    let values: Vec<f32> = values.into_iter().map(|v| v * 0.02).collect();
    let vectors = Tensor::from_vec(values, (2, width), &Device::Cpu)?;
    let path = dir
        .join(ModelFolder::Embeddings.dir_name())
        .join(DEMO_EMBEDDING);
    write_safetensors(
        &path,
        &BTreeMap::from([("emb_params".to_string(), vectors)]),
        &BTreeMap::new(),
    )?;
    Ok(path)
}

/// Metadata naming the architecture a demo file belongs to: its head counts cannot be
/// read from tensor shapes at toy widths.
fn config_metadata(config: &SdConfig) -> Result<BTreeMap<String, String>> {
    let json =
        serde_json::to_string(config).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    Ok(BTreeMap::from([(CONFIG_METADATA_KEY.to_string(), json)]))
}

fn write_checkpoint(dir: &Path, config: &SdConfig, file: &str, note: &str) -> Result<PathBuf> {
    let tensors = demo_checkpoint_tensors(config, DEMO_SEED)?;
    let mut metadata = config_metadata(config)?;
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("sakuga.note".to_string(), note.to_string());
    let path = dir.join(ModelFolder::Checkpoints.dir_name()).join(file);
    write_safetensors(&path, &tensors, &metadata)?;
    Ok(path)
}

/// Seeded tensors of a ControlNet beside `config`'s UNet, under diffusers names.
///
/// # Errors
/// Tensor errors.
pub fn demo_controlnet_tensors(config: &SdConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let control = ControlNetConfig {
        unet: config.unet.clone(),
        hint_channels: 3,
        global_average_pooling: false,
    };
    invent(seed, |vb| ControlNet::new(vb, &control))
}

/// Writes the demo ControlNets: `controlnet/sakuga-demo-controlnet-sd15.safetensors` for
/// the SD 1.5 demo in the LDM layout (no prefix, as ComfyUI's repackaged v1.1 files) and
/// `controlnet/sakuga-demo-controlnet-sdxl.safetensors` for the SDXL demo in the diffusers
/// layout most SDXL ControlNets ship in.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_controlnets(dir: &Path) -> Result<Vec<PathBuf>> {
    let folder = dir.join(ModelFolder::ControlNet.dir_name());
    let sd15 = SdConfig::demo();
    let mut ldm = BTreeMap::new();
    for (name, tensor) in demo_controlnet_tensors(&sd15, DEMO_SEED.wrapping_add(200))? {
        let mapped = control_to_ldm(&name, &sd15.unet)
            .ok_or_else(|| ModelError::InvalidInput(format!("no LDM name for {name}")))?;
        ldm.insert(mapped, tensor);
    }
    let sd15_path = folder.join(DEMO_CONTROLNET);
    write_safetensors(&sd15_path, &ldm, &config_metadata(&sd15)?)?;
    let sdxl_config = SdConfig::demo_sdxl();
    let sdxl = demo_controlnet_tensors(&sdxl_config, DEMO_SEED.wrapping_add(201))?;
    let sdxl_path = folder.join(DEMO_SDXL_CONTROLNET);
    write_safetensors(&sdxl_path, &sdxl, &config_metadata(&sdxl_config)?)?;
    Ok(vec![sd15_path, sdxl_path])
}

/// Writes `controlnet/sakuga-demo-t2i-adapter-depth-sd15.safetensors`: a full T2I adapter
/// in the original key layout, shaped as TencentARC's SD 1.5 depth adapter (RGB hints,
/// 1x1 resnet kernels, pooled downsampling) at [`SdConfig::demo_sd15_full`]'s widths.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_t2i_adapter(dir: &Path) -> Result<PathBuf> {
    let widths: Vec<usize> = SdConfig::demo_sd15_full()
        .unet
        .levels
        .iter()
        .map(|l| l.channels)
        .collect();
    let cin = 3 * 64;
    let mut convs: Vec<(String, [usize; 4])> = vec![("conv_in".into(), [widths[0], cin, 3, 3])];
    for (i, &out) in widths.iter().enumerate() {
        for j in 0..2 {
            let index = i * 2 + j;
            let in_c = if j == 0 && i > 0 { widths[i - 1] } else { out };
            if in_c != out {
                convs.push((format!("body.{index}.in_conv"), [out, in_c, 1, 1]));
            }
            convs.push((format!("body.{index}.block1"), [out, out, 3, 3]));
            convs.push((format!("body.{index}.block2"), [out, out, 1, 1]));
        }
    }
    let mut tensors = BTreeMap::new();
    for (name, shape) in convs {
        let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
        let stream = name_stream(&name);
        let weight =
            (NoiseRng::new(DEMO_SEED, stream).tensor(&shape, DType::F32, &Device::Cpu)?
                * fan_in.sqrt().recip())?;
        let bias = (NoiseRng::new(DEMO_SEED, stream ^ 1).tensor(
            &[shape[0]],
            DType::F32,
            &Device::Cpu,
        )? * 0.05)?;
        tensors.insert(format!("{name}.weight"), weight);
        tensors.insert(format!("{name}.bias"), bias);
    }
    let path = dir
        .join(ModelFolder::ControlNet.dir_name())
        .join(DEMO_T2I_ADAPTER);
    write_safetensors(&path, &tensors, &BTreeMap::new())?;
    Ok(path)
}

/// The demo CLIP vision encoder's architecture.
pub fn demo_clip_vision_config() -> ClipVisionConfig {
    ClipVisionConfig {
        width: 64,
        layers: 3,
        heads: 2,
        intermediate_size: 128,
        image_size: 224,
        patch_size: 14,
        projection_dim: SdConfig::demo_sdxl()
            .clip_g
            .and_then(|g| g.projection_dim)
            .unwrap_or(64),
        activation: ClipActivation::Gelu,
    }
}

/// Writes `clip_vision/sakuga-demo-clip-vision-g.safetensors` in transformers' layout, its
/// config in the metadata.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_clip_vision(dir: &Path) -> Result<PathBuf> {
    let config = demo_clip_vision_config();
    let path = dir
        .join(ModelFolder::ClipVision.dir_name())
        .join(DEMO_CLIP_VISION);
    let tensors = invent(DEMO_SEED.wrapping_add(300), |vb| {
        ClipVisionModel::new(vb, config.clone(), &path)
    })?;
    let json =
        serde_json::to_string(&config).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    let metadata = BTreeMap::from([(CLIP_VISION_CONFIG_KEY.to_string(), json)]);
    write_safetensors(&path, &tensors, &metadata)?;
    Ok(path)
}

/// Writes `loras/sakuga-demo-lora.safetensors`: rank-4 kohya factors for the demo UNet's
/// attention projections and `proj_in` convolutions, and its CLIP attention projections.
///
/// # Errors
/// Tensor and I/O errors.
pub fn write_demo_lora(dir: &Path) -> Result<PathBuf> {
    let config = SdConfig::demo();
    let rank = 4usize;
    let width = config.unet.levels[0].channels;
    let context = config.unet.cross_attention_dim;
    let clip_width = config.clip.width;
    let mut modules: Vec<(String, Vec<usize>, Vec<usize>)> = Vec::new();
    for block in ["down_blocks_0_attentions_0", "up_blocks_1_attentions_0"] {
        let base = format!("lora_unet_{block}_transformer_blocks_0");
        modules.push((
            format!("{base}_attn1_to_q"),
            vec![rank, width],
            vec![width, rank],
        ));
        modules.push((
            format!("{base}_attn1_to_v"),
            vec![rank, width],
            vec![width, rank],
        ));
        modules.push((
            format!("{base}_attn2_to_k"),
            vec![rank, context],
            vec![width, rank],
        ));
        modules.push((
            format!("lora_unet_{block}_proj_in"),
            vec![rank, width, 1, 1],
            vec![width, rank, 1, 1],
        ));
    }
    for layer in 0..config.clip.layers {
        for proj in ["q_proj", "v_proj"] {
            modules.push((
                format!("lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"),
                vec![rank, clip_width],
                vec![clip_width, rank],
            ));
        }
    }
    let mut tensors = BTreeMap::new();
    for (base, down_shape, up_shape) in modules {
        let stream = name_stream(&base);
        let down =
            NoiseRng::new(DEMO_SEED, stream).tensor(&down_shape, DType::F32, &Device::Cpu)?;
        let up =
            (NoiseRng::new(DEMO_SEED, stream ^ 1).tensor(&up_shape, DType::F32, &Device::Cpu)?
                * 0.5)?;
        tensors.insert(format!("{base}.lora_down.weight"), down);
        tensors.insert(format!("{base}.lora_up.weight"), up);
        tensors.insert(
            format!("{base}.alpha"),
            Tensor::new(&[rank as f32], &Device::Cpu)?.reshape(())?,
        );
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("ss_network_module".to_string(), "networks.lora".to_string());
    metadata.insert("ss_network_dim".to_string(), rank.to_string());
    metadata.insert("ss_network_alpha".to_string(), rank.to_string());
    let path = dir.join(ModelFolder::Loras.dir_name()).join(DEMO_LORA);
    write_safetensors(&path, &tensors, &metadata)?;
    Ok(path)
}
