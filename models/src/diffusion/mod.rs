//! Stable Diffusion 1.x/2.x on candle: configs, checkpoint loading (single-file LDM and
//! diffusers folders), the CLIP tokenizer and text encoder, the VAE, LoRA merging, noise
//! schedules, samplers and the `KSampler`-style entry point [`sample_latent`].
//!
//! Module map:
//! - [`config`]: architecture descriptions and their inference from checkpoints.
//! - [`keymap`]: LDM <-> diffusers tensor names; [`weights`]: the renaming VarBuilder
//!   backend that loads through them.
//! - [`tokenizer`], [`prompt`], [`clip`]: prompt (with ComfyUI emphasis) to conditioning.
//! - [`vae`]: images <-> latents, tiled decode.
//! - [`lora`]: kohya-format LoRA files.
//! - [`model`]: [`Checkpoint`] and its parts, the guided denoiser.
//! - [`controlnet`]: ControlNets (LDM and diffusers layouts) and their application to a
//!   prompt.
//! - [`schedule`], [`sampler`], [`rng`]: sigmas, sampling loops, seeded noise.

pub mod clip;
pub mod clip_vision;
pub mod config;
pub mod controlnet;
pub mod embedding;
pub mod keymap;
pub mod lora;
pub mod model;
pub mod prompt;
pub mod rng;
pub mod sampler;
pub mod schedule;
pub mod t2i_adapter;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use candle_core::{DType, Device, Tensor};

pub use config::{Prediction, SdConfig};
pub use controlnet::{AppliedControl, ControlNetModel};
pub use lora::LoraFile;
pub use model::{
    AppliedLora, Area, Checkpoint, ClipModel, Encoded, GuidedDenoiser, InpaintConcat,
    SizeConditioning, TextConditioning, UnetModel, load_vae_file,
};
pub use rng::NoiseRng;
pub use sampler::{Denoiser, SamplerKind, StepHooks};
pub use schedule::{ModelSampling, Scheduler};
pub use vae::VaeModel;

use crate::error::{ModelError, Result};

/// Opens the device a spec names: `cpu`, `cuda` (device 0) or `cuda:N`.
///
/// # Errors
/// [`ModelError::InvalidInput`] for an unknown spec or a GPU this build or machine cannot
/// use (with the reason, from [`crate::device::cuda_unavailable`]), [`ModelError::Candle`]
/// when candle cannot open it.
pub fn device_from_spec(spec: &str) -> Result<Device> {
    let Some(ordinal) = crate::device::spec_ordinal(spec)? else {
        return Ok(Device::Cpu);
    };
    if let Some(reason) = crate::device::cuda_unavailable(ordinal) {
        return Err(ModelError::InvalidInput(format!(
            "device {spec:?} cannot be used: {reason}"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// What `KSampler`/`KSamplerAdvanced` ask of a sampling run.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleParams {
    pub seed: u64,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: SamplerKind,
    pub scheduler: Scheduler,
    /// Fraction of the schedule to run (img2img strength); 1 starts from pure noise.
    pub denoise: f64,
    /// Whether to add seeded noise to the input latent first.
    pub add_noise: bool,
    /// First step to run (KSamplerAdvanced).
    pub start_at_step: usize,
    /// Step to stop at (KSamplerAdvanced; `usize::MAX` for the end).
    pub end_at_step: usize,
    /// Stop with the remaining noise instead of forcing the last sigma to 0.
    pub return_with_leftover_noise: bool,
    /// Most latents the UNet sees at once (`None`: the whole batch); results are the same.
    pub max_batch: Option<usize>,
}

impl SampleParams {
    /// ComfyUI's `KSampler` defaults for `seed`: 20 euler steps, normal schedule, cfg 8.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            steps: 20,
            cfg: 8.0,
            sampler: SamplerKind::Euler,
            scheduler: Scheduler::Normal,
            denoise: 1.0,
            add_noise: true,
            start_at_step: 0,
            end_at_step: usize::MAX,
            return_with_leftover_noise: false,
            max_batch: None,
        }
    }

    /// The sigmas this run visits, ComfyUI's way: `denoise < 1` takes the tail of a longer
    /// schedule, start/end steps cut it, and unless leftover noise is wanted a cut end is
    /// forced to 0.
    pub fn sigmas(&self, sampling: &ModelSampling) -> Vec<f64> {
        if self.steps == 0 || self.denoise <= 0.0 {
            return Vec::new();
        }
        let mut sigmas = sampling.for_sampler(
            self.scheduler,
            self.steps,
            self.denoise,
            self.sampler.discards_penultimate_sigma(),
        );
        if self.end_at_step < self.steps {
            sigmas.truncate(self.end_at_step + 1);
            if !self.return_with_leftover_noise
                && let Some(last) = sigmas.last_mut()
            {
                *last = 0.0;
            }
        }
        if self.start_at_step > 0 {
            if self.start_at_step >= sigmas.len().saturating_sub(1) {
                return Vec::new();
            }
            sigmas.drain(..self.start_at_step);
        }
        sigmas
    }
}

/// Latents of zeros for a `width` x `height` image batch, as `EmptyLatentImage` makes them.
///
/// # Errors
/// Tensor errors.
pub fn empty_latent(
    width: usize,
    height: usize,
    batch: usize,
    downscale: usize,
    device: &Device,
) -> Result<Tensor> {
    Ok(Tensor::zeros(
        (batch, 4, height / downscale, width / downscale),
        DType::F32,
        device,
    )?)
}

/// Runs one `KSampler` pass: seeded noise on `latent`, then `params.sampler` along the
/// schedule with classifier-free guidance. Returns the new latent (f32, on the latent's
/// device). The seed's noise covers the whole batch, so a batch reproduces as a whole.
///
/// # Errors
/// [`ModelError::Cancelled`] when `hooks` cancel; network errors.
pub fn sample_latent(
    unet: &UnetModel,
    positive: &[TextConditioning],
    negative: &[TextConditioning],
    latent: &Tensor,
    params: &SampleParams,
    hooks: StepHooks<'_>,
) -> Result<Tensor> {
    let sigmas = params.sigmas(unet.sampling());
    let (samples, _) = sample_along(
        unet, positive, negative, latent, &sigmas, params, None, hooks,
    )?;
    Ok(samples)
}

/// A sampling pass along explicit `sigmas` (custom sampling): `params` gives the sampler,
/// seed, noise and guidance, its schedule fields are not read. With a `denoise_mask`
/// (`[batch or 1, 1, h, w]` at latent size, 1 = repaint) the rest of the latent is held to
/// `latent`, noised to each step's level, as ComfyUI's inpainting sampler does. Returns the
/// new latent and the model's clean estimate at the last step (ComfyUI's
/// `denoised_output`), if a step ran.
///
/// # Errors
/// As [`sample_latent`].
#[allow(clippy::too_many_arguments)]
pub fn sample_along(
    unet: &UnetModel,
    positive: &[TextConditioning],
    negative: &[TextConditioning],
    latent: &Tensor,
    sigmas: &[f64],
    params: &SampleParams,
    denoise_mask: Option<&Tensor>,
    hooks: StepHooks<'_>,
) -> Result<(Tensor, Option<Tensor>)> {
    let raw = latent.to_dtype(DType::F32)?;
    if sigmas.len() < 2 {
        return Ok((raw, None));
    }
    // Latents travel in the VAE's own scale; the model works in its latent format's.
    let latent_scale = unet.latent_scale();
    let latent = (&raw * latent_scale)?;
    let noise = if params.add_noise {
        NoiseRng::new(params.seed, 0).tensor(latent.dims(), DType::F32, latent.device())?
    } else {
        latent.zeros_like()?
    };
    // Starting from pure noise, ComfyUI scales it to the variance-preserving level
    // sqrt(1 + sigma²) rather than sigma, so the input matches training's x_T.
    let sigma_max = unet.sampling().sigma_max();
    let scale = if sigmas[0] >= sigma_max * (1.0 - 1e-5) {
        (1.0 + sigmas[0] * sigmas[0]).sqrt()
    } else {
        sigmas[0]
    };
    let x = (&latent + (&noise * scale)?)?;
    let (_, _, h, w) = x.dims4()?;
    let adm = unet.config().unet.adm_in_channels;
    let refiner = unet.config().is_sdxl_refiner();
    let resolve = |side: &[TextConditioning]| -> Result<Vec<TextConditioning>> {
        side.iter()
            .map(|c| c.with_unclip_resolved(adm, refiner, params.seed))
            .collect()
    };
    let (positive, negative) = (&resolve(positive)?, &resolve(negative)?);
    let guided = GuidedDenoiser::new(unet, positive, negative, params.cfg, (h, w))?
        .with_max_batch(params.max_batch)
        .with_inpaint_source(&latent, denoise_mask)?;
    let inpainting = match denoise_mask {
        Some(mask) => Some(Inpainting {
            inner: &guided,
            keep: mask
                .to_dtype(DType::F32)?
                .to_device(latent.device())?
                .affine(-1.0, 1.0)?,
            mask: mask.to_dtype(DType::F32)?.to_device(latent.device())?,
            latent: latent.clone(),
            noise,
        }),
        None => None,
    };
    let denoiser: &dyn Denoiser = match &inpainting {
        Some(inpainting) => inpainting,
        None => &guided,
    };
    let last_step = LastEstimate::new(denoiser, sigmas[sigmas.len() - 2]);
    let samples = sampler::sample(params.sampler, &last_step, x, sigmas, params.seed, hooks)?;
    let denoised = last_step.take().map(|d| d / latent_scale).transpose()?;
    Ok(((samples / latent_scale)?, denoised))
}

/// ComfyUI's inpainting wrapper: outside the mask the input is the original latent noised
/// to this step's level, and the estimate is the original latent.
struct Inpainting<'a> {
    inner: &'a dyn Denoiser,
    /// 1 where the latent is repainted.
    mask: Tensor,
    /// `1 - mask`.
    keep: Tensor,
    latent: Tensor,
    noise: Tensor,
}

impl Denoiser for Inpainting<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let held = (&self.latent + (&self.noise * sigma)?)?;
        let x = (x.broadcast_mul(&self.mask)? + held.broadcast_mul(&self.keep)?)?;
        let out = self.inner.denoise(&x, sigma)?;
        Ok((out.broadcast_mul(&self.mask)? + self.latent.broadcast_mul(&self.keep)?)?)
    }

    /// The negative prompt's estimate is taken inside the guider, before the blend, as
    /// ComfyUI's post-CFG hook sees it.
    fn denoise_with_uncond(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)> {
        let held = (&self.latent + (&self.noise * sigma)?)?;
        let x = (x.broadcast_mul(&self.mask)? + held.broadcast_mul(&self.keep)?)?;
        let (out, uncond) = self.inner.denoise_with_uncond(&x, sigma)?;
        let out = (out.broadcast_mul(&self.mask)? + self.latent.broadcast_mul(&self.keep)?)?;
        Ok((out, uncond))
    }
}

/// Passes through to a denoiser and keeps its first estimate at `sigma`, the last step's.
struct LastEstimate<'a> {
    inner: &'a dyn Denoiser,
    sigma: f64,
    estimate: std::sync::Mutex<Option<Tensor>>,
}

impl<'a> LastEstimate<'a> {
    fn new(inner: &'a dyn Denoiser, sigma: f64) -> Self {
        Self {
            inner,
            sigma,
            estimate: std::sync::Mutex::new(None),
        }
    }

    fn take(&self) -> Option<Tensor> {
        self.estimate
            .lock()
            .map(|mut e| e.take())
            .unwrap_or_default()
    }
}

impl LastEstimate<'_> {
    fn keep(&self, out: &Tensor, sigma: f64) {
        if sigma == self.sigma
            && let Ok(mut estimate) = self.estimate.lock()
            && estimate.is_none()
        {
            *estimate = Some(out.clone());
        }
    }
}

impl Denoiser for LastEstimate<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let out = self.inner.denoise(x, sigma)?;
        self.keep(&out, sigma);
        Ok(out)
    }

    fn denoise_with_uncond(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)> {
        let (out, uncond) = self.inner.denoise_with_uncond(x, sigma)?;
        self.keep(&out, sigma);
        Ok((out, uncond))
    }
}
