//! Samplers: the loops that walk a latent from noise to image along a sigma schedule.
//!
//! Every sampler talks to the model through [`Denoiser`] (sigma-space, k-diffusion style:
//! given a noisy `x` at `sigma`, return the model's estimate of the clean latent), so
//! classifier-free guidance and the prediction type live in one place. The update rules are
//! k-diffusion's (as ComfyUI ships them) for an epsilon-prediction model, where
//! `alpha = 1` and `lambda = -ln sigma`; `tests/fixtures/samplers/goldens.json` pins them to
//! ComfyUI's own functions on fixed sigmas, noise and a toy denoiser.
//!
//! Before each step a loop asks [`StepHooks::cancelled`] and stops with
//! [`ModelError::Cancelled`]; after each step it calls [`StepHooks::progress`]. Fresh noise
//! comes from a [`NoiseSource`], one draw per call in the order k-diffusion's samplers call
//! their noise sampler; [`SeededNoise`] makes draw `n` from stream `n` of the seed, so a
//! seed reproduces a run exactly.

mod cfg_pp;
mod multistep;
mod seeds;
mod unipc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::rng::NoiseRng;
use crate::error::{ModelError, Result};

/// The model as samplers see it.
pub trait Denoiser {
    /// The denoised estimate of `x`, a latent at noise level `sigma`.
    ///
    /// # Errors
    /// When the network fails.
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor>;

    /// The guided estimate and the negative prompt's own (ComfyUI's `uncond_denoised`,
    /// which the CFG++ samplers step along), the latter computed even at guidance 1. A
    /// denoiser without a negative prompt gives its estimate for both.
    ///
    /// # Errors
    /// When the network fails.
    fn denoise_with_uncond(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)> {
        let denoised = self.denoise(x, sigma)?;
        Ok((denoised.clone(), denoised))
    }
}

/// Progress and cancellation hooks the executor plugs into a sampling loop.
#[derive(Clone, Copy)]
pub struct StepHooks<'a> {
    /// Called after step `step` (1-based) of `steps` finished.
    pub progress: &'a (dyn Fn(usize, usize) + Sync),
    /// Asked before every step; `true` stops the loop.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl std::fmt::Debug for StepHooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepHooks")
    }
}

impl StepHooks<'static> {
    /// Hooks that report nothing and never cancel.
    pub fn none() -> Self {
        StepHooks {
            progress: &|_, _| {},
            cancelled: &|| false,
        }
    }
}

/// Where stochastic samplers get their fresh noise.
pub trait NoiseSource {
    /// The next draw of standard normal noise, shaped like `like`.
    ///
    /// # Errors
    /// Tensor errors.
    fn draw(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// Draw `n` (from 1) is stream `n` of the seed: stream 0 is the initial latent noise.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    seed: u64,
    draws: u64,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { seed, draws: 0 }
    }
}

impl NoiseSource for SeededNoise {
    fn draw(&mut self, like: &Tensor) -> Result<Tensor> {
        self.draws += 1;
        NoiseRng::new(self.seed, self.draws).tensor(like.dims(), like.dtype(), like.device())
    }
}

/// ComfyUI's sampler names supported by sakuga (the `sampler_name` combo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Euler,
    EulerAncestral,
    Heun,
    Dpm2,
    Dpm2Ancestral,
    Lms,
    Dpmpp2sAncestral,
    DpmppSde,
    DpmPp2m,
    Dpmpp2mSde,
    Dpmpp2mSdeHeun,
    Dpmpp3mSde,
    Ddpm,
    Lcm,
    Ipndm,
    ResMultistep,
    ResMultistepAncestral,
    GradientEstimation,
    ErSde,
    Ddim,
    UniPc,
    UniPcBh2,
    Heunpp2,
    ExpHeun2X0,
    ExpHeun2X0Sde,
    Seeds2,
    Seeds3,
    EulerCfgPp,
    EulerAncestralCfgPp,
    DpmPp2mCfgPp,
    Dpmpp2sAncestralCfgPp,
    GradientEstimationCfgPp,
    ResMultistepCfgPp,
    ResMultistepAncestralCfgPp,
    IpndmV,
}

/// Every name in ComfyUI's combo order. The `_gpu` variants differ in ComfyUI only in
/// where their Brownian-tree noise is drawn, which sakuga's seeded noise makes moot.
const NAMES: &[(&str, SamplerKind)] = &[
    ("euler", SamplerKind::Euler),
    ("euler_cfg_pp", SamplerKind::EulerCfgPp),
    ("euler_ancestral", SamplerKind::EulerAncestral),
    ("euler_ancestral_cfg_pp", SamplerKind::EulerAncestralCfgPp),
    ("heun", SamplerKind::Heun),
    ("heunpp2", SamplerKind::Heunpp2),
    ("exp_heun_2_x0", SamplerKind::ExpHeun2X0),
    ("exp_heun_2_x0_sde", SamplerKind::ExpHeun2X0Sde),
    ("dpm_2", SamplerKind::Dpm2),
    ("dpm_2_ancestral", SamplerKind::Dpm2Ancestral),
    ("lms", SamplerKind::Lms),
    ("dpmpp_2s_ancestral", SamplerKind::Dpmpp2sAncestral),
    (
        "dpmpp_2s_ancestral_cfg_pp",
        SamplerKind::Dpmpp2sAncestralCfgPp,
    ),
    ("dpmpp_sde", SamplerKind::DpmppSde),
    ("dpmpp_sde_gpu", SamplerKind::DpmppSde),
    ("dpmpp_2m", SamplerKind::DpmPp2m),
    ("dpmpp_2m_cfg_pp", SamplerKind::DpmPp2mCfgPp),
    ("dpmpp_2m_sde", SamplerKind::Dpmpp2mSde),
    ("dpmpp_2m_sde_gpu", SamplerKind::Dpmpp2mSde),
    ("dpmpp_2m_sde_heun", SamplerKind::Dpmpp2mSdeHeun),
    ("dpmpp_2m_sde_heun_gpu", SamplerKind::Dpmpp2mSdeHeun),
    ("dpmpp_3m_sde", SamplerKind::Dpmpp3mSde),
    ("dpmpp_3m_sde_gpu", SamplerKind::Dpmpp3mSde),
    ("ddpm", SamplerKind::Ddpm),
    ("lcm", SamplerKind::Lcm),
    ("ipndm", SamplerKind::Ipndm),
    ("ipndm_v", SamplerKind::IpndmV),
    ("res_multistep", SamplerKind::ResMultistep),
    ("res_multistep_cfg_pp", SamplerKind::ResMultistepCfgPp),
    (
        "res_multistep_ancestral",
        SamplerKind::ResMultistepAncestral,
    ),
    (
        "res_multistep_ancestral_cfg_pp",
        SamplerKind::ResMultistepAncestralCfgPp,
    ),
    ("gradient_estimation", SamplerKind::GradientEstimation),
    (
        "gradient_estimation_cfg_pp",
        SamplerKind::GradientEstimationCfgPp,
    ),
    ("er_sde", SamplerKind::ErSde),
    ("seeds_2", SamplerKind::Seeds2),
    ("seeds_3", SamplerKind::Seeds3),
    ("ddim", SamplerKind::Ddim),
    ("uni_pc", SamplerKind::UniPc),
    ("uni_pc_bh2", SamplerKind::UniPcBh2),
];

impl SamplerKind {
    /// Every sampler, in ComfyUI's combo order.
    pub fn all() -> impl Iterator<Item = SamplerKind> {
        NAMES
            .iter()
            .filter(|(name, _)| !name.ends_with("_gpu"))
            .map(|(_, kind)| *kind)
    }

    /// Every name the `sampler_name` combo offers, aliases included, in ComfyUI's order.
    pub fn names() -> impl Iterator<Item = &'static str> {
        NAMES.iter().map(|(name, _)| *name)
    }

    /// The ComfyUI name.
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, kind)| *kind == self)
            .map(|(name, _)| *name)
            .expect("every sampler has a name")
    }

    /// Parses a ComfyUI name (a `_gpu` alias gives its sampler).
    pub fn from_name(name: &str) -> Option<Self> {
        NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, kind)| *kind)
    }

    /// Network evaluations per step (for cost estimates).
    pub fn evaluations_per_step(self) -> usize {
        match self {
            SamplerKind::Heun
            | SamplerKind::Dpm2
            | SamplerKind::Dpm2Ancestral
            | SamplerKind::Dpmpp2sAncestral
            | SamplerKind::DpmppSde
            | SamplerKind::ExpHeun2X0
            | SamplerKind::ExpHeun2X0Sde
            | SamplerKind::Seeds2
            | SamplerKind::Dpmpp2sAncestralCfgPp => 2,
            SamplerKind::Heunpp2 | SamplerKind::Seeds3 => 3,
            _ => 1,
        }
    }

    /// Whether `KSampler` schedules one step more and drops the second-to-last sigma, as
    /// ComfyUI does for these (their last step would otherwise be a tiny one).
    pub fn discards_penultimate_sigma(self) -> bool {
        matches!(
            self,
            SamplerKind::Dpm2
                | SamplerKind::Dpm2Ancestral
                | SamplerKind::UniPc
                | SamplerKind::UniPcBh2
        )
    }
}

/// One sampling run: the model, the schedule, the noise and the hooks.
pub(crate) struct Walk<'a> {
    denoiser: &'a dyn Denoiser,
    sigmas: &'a [f64],
    noise: &'a mut dyn NoiseSource,
    hooks: StepHooks<'a>,
}

impl Walk<'_> {
    fn steps(&self) -> usize {
        self.sigmas.len().saturating_sub(1)
    }

    /// Runs `step(walk, i, x, sigma_i, sigma_i+1)` for every step, with the cancel check
    /// before and the progress report after each.
    fn each_step(
        &mut self,
        mut x: Tensor,
        mut step: impl FnMut(&mut Self, usize, Tensor, f64, f64) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let steps = self.steps();
        for i in 0..steps {
            self.check(i)?;
            x = step(self, i, x, self.sigmas[i], self.sigmas[i + 1])?;
            (self.hooks.progress)(i + 1, steps);
        }
        Ok(x)
    }

    /// [`ModelError::Cancelled`] when the hooks say so before step `i` (0-based).
    fn check(&self, i: usize) -> Result<()> {
        if (self.hooks.cancelled)() {
            return Err(ModelError::Cancelled {
                step: i + 1,
                steps: self.steps(),
            });
        }
        Ok(())
    }

    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        self.denoiser.denoise(x, sigma)
    }

    /// `x` plus a fresh draw of noise scaled by `scale`.
    fn add_noise(&mut self, x: Tensor, scale: f64) -> Result<Tensor> {
        let noise = self.noise.draw(&x)?;
        Ok((x + (noise * scale)?)?)
    }

    /// Ancestral samplers add `sigma_up` of noise unless the step ends at sigma 0.
    fn renoise(&mut self, x: Tensor, sigma_next: f64, sigma_up: f64) -> Result<Tensor> {
        if sigma_next > 0.0 {
            self.add_noise(x, sigma_up)
        } else {
            Ok(x)
        }
    }
}

/// Runs `kind` from `x` (already noised to `sigmas[0]`) through `sigmas`, its fresh noise
/// seeded by `seed`.
///
/// # Errors
/// [`ModelError::Cancelled`] when `hooks.cancelled` says so before a step; the denoiser's
/// errors.
pub fn sample(
    kind: SamplerKind,
    denoiser: &dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    seed: u64,
    hooks: StepHooks<'_>,
) -> Result<Tensor> {
    sample_with_noise(
        kind,
        denoiser,
        x,
        sigmas,
        &mut SeededNoise::new(seed),
        hooks,
    )
}

/// [`sample`] with fresh noise from `noise`.
///
/// # Errors
/// As [`sample`].
pub fn sample_with_noise(
    kind: SamplerKind,
    denoiser: &dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    noise: &mut dyn NoiseSource,
    hooks: StepHooks<'_>,
) -> Result<Tensor> {
    let mut walk = Walk {
        denoiser,
        sigmas,
        noise,
        hooks,
    };
    if walk.steps() == 0 {
        return Ok(x);
    }
    match kind {
        // DDIM with eta = 0 is exactly Euler in sigma space (ComfyUI runs it as Euler).
        SamplerKind::Euler | SamplerKind::Ddim => walk.each_step(x, |w, _, x, s, sn| {
            let denoised = w.denoise(&x, s)?;
            toward(&x, &denoised, s, sn)
        }),
        SamplerKind::EulerAncestral => walk.each_step(x, |w, _, x, s, sn| {
            let denoised = w.denoise(&x, s)?;
            let (down, up) = ancestral_split(s, sn);
            let x = toward(&x, &denoised, s, down)?;
            w.renoise(x, sn, up)
        }),
        SamplerKind::Heun => walk.each_step(x, heun_step),
        SamplerKind::Dpm2 => walk.each_step(x, |w, _, x, s, sn| {
            let denoised = w.denoise(&x, s)?;
            dpm2_step(w, &x, &denoised, s, sn)
        }),
        SamplerKind::Dpm2Ancestral => walk.each_step(x, |w, _, x, s, sn| {
            let denoised = w.denoise(&x, s)?;
            let (down, up) = ancestral_split(s, sn);
            if down == 0.0 {
                return toward(&x, &denoised, s, down);
            }
            let x = dpm2_step(w, &x, &denoised, s, down)?;
            w.add_noise(x, up)
        }),
        SamplerKind::Dpmpp2sAncestral => walk.each_step(x, dpmpp_2s_ancestral_step),
        SamplerKind::DpmppSde => walk.each_step(x, dpmpp_sde_step),
        SamplerKind::Lcm => walk.each_step(x, |w, _, x, s, sn| {
            let denoised = w.denoise(&x, s)?;
            w.renoise(denoised, sn, sn)
        }),
        SamplerKind::Ddpm => walk.each_step(x, ddpm_step),
        SamplerKind::Lms => multistep::lms(&mut walk, x),
        SamplerKind::Ipndm => multistep::ipndm(&mut walk, x),
        SamplerKind::IpndmV => multistep::ipndm_v(&mut walk, x),
        SamplerKind::DpmPp2m => multistep::dpmpp_2m(&mut walk, x),
        SamplerKind::Dpmpp2mSde => multistep::dpmpp_2m_sde(&mut walk, x, false),
        SamplerKind::Dpmpp2mSdeHeun => multistep::dpmpp_2m_sde(&mut walk, x, true),
        SamplerKind::Dpmpp3mSde => multistep::dpmpp_3m_sde(&mut walk, x),
        SamplerKind::ResMultistep => multistep::res_multistep(&mut walk, x, false, false),
        SamplerKind::ResMultistepAncestral => multistep::res_multistep(&mut walk, x, true, false),
        SamplerKind::ResMultistepCfgPp => multistep::res_multistep(&mut walk, x, false, true),
        SamplerKind::ResMultistepAncestralCfgPp => {
            multistep::res_multistep(&mut walk, x, true, true)
        }
        SamplerKind::GradientEstimation => multistep::gradient_estimation(&mut walk, x, false),
        SamplerKind::GradientEstimationCfgPp => multistep::gradient_estimation(&mut walk, x, true),
        SamplerKind::ErSde => multistep::er_sde(&mut walk, x),
        SamplerKind::UniPc => unipc::sample(&mut walk, x, unipc::Variant::Bh1),
        SamplerKind::UniPcBh2 => unipc::sample(&mut walk, x, unipc::Variant::Bh2),
        SamplerKind::Heunpp2 => seeds::heunpp2(&mut walk, x),
        SamplerKind::ExpHeun2X0 => seeds::seeds_2(&mut walk, x, 0.0, 1.0, seeds::Phi::Two),
        SamplerKind::ExpHeun2X0Sde => seeds::seeds_2(&mut walk, x, 1.0, 1.0, seeds::Phi::Two),
        SamplerKind::Seeds2 => seeds::seeds_2(&mut walk, x, 1.0, 0.5, seeds::Phi::One),
        SamplerKind::Seeds3 => seeds::seeds_3(&mut walk, x, 1.0),
        SamplerKind::EulerCfgPp => cfg_pp::euler(&mut walk, x, 0.0),
        SamplerKind::EulerAncestralCfgPp => cfg_pp::euler(&mut walk, x, 1.0),
        SamplerKind::DpmPp2mCfgPp => cfg_pp::dpmpp_2m(&mut walk, x),
        SamplerKind::Dpmpp2sAncestralCfgPp => cfg_pp::dpmpp_2s_ancestral(&mut walk, x),
    }
}

/// `a * ca + b * cb`.
fn lin(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
    Ok((a.affine(ca, 0.0)? + b.affine(cb, 0.0)?)?)
}

/// An Euler step of the probability-flow ODE from `sigma` to `to`: along the derivative
/// `(x - denoised) / sigma`, which lands on `denoised` at 0.
fn toward(x: &Tensor, denoised: &Tensor, sigma: f64, to: f64) -> Result<Tensor> {
    let ratio = to / sigma;
    lin(x, ratio, denoised, 1.0 - ratio)
}

fn heun_step(w: &mut Walk<'_>, _: usize, x: Tensor, s: f64, sn: f64) -> Result<Tensor> {
    let denoised = w.denoise(&x, s)?;
    let x_euler = toward(&x, &denoised, s, sn)?;
    if sn == 0.0 {
        return Ok(x_euler);
    }
    let denoised_next = w.denoise(&x_euler, sn)?;
    // The trapezoid of the two slopes, written through the two Euler targets.
    let d = ((&x - &denoised)? / s)?;
    let d_next = ((&x_euler - &denoised_next)? / sn)?;
    let d_mean = ((d + d_next)? * 0.5)?;
    Ok((&x + (d_mean * (sn - s))?)?)
}

/// DPM-Solver-2: the slope at the geometric midpoint of `s` and `to`, from `x`.
fn dpm2_step(w: &mut Walk<'_>, x: &Tensor, denoised: &Tensor, s: f64, to: f64) -> Result<Tensor> {
    if to == 0.0 {
        return toward(x, denoised, s, to);
    }
    let mid = (s.ln() + 0.5 * (to.ln() - s.ln())).exp();
    let x_mid = toward(x, denoised, s, mid)?;
    let denoised_mid = w.denoise(&x_mid, mid)?;
    let d_mid = ((&x_mid - &denoised_mid)? / mid)?;
    Ok((x + (d_mid * (to - s))?)?)
}

fn dpmpp_2s_ancestral_step(
    w: &mut Walk<'_>,
    _: usize,
    x: Tensor,
    s: f64,
    sn: f64,
) -> Result<Tensor> {
    let denoised = w.denoise(&x, s)?;
    let (down, up) = ancestral_split(s, sn);
    let x = if down == 0.0 {
        toward(&x, &denoised, s, down)?
    } else {
        let h = s.ln() - down.ln();
        let mid = (s.ln() - 0.5 * h).exp();
        let x_mid = lin(&x, mid / s, &denoised, -(-0.5 * h).exp_m1())?;
        let denoised_mid = w.denoise(&x_mid, mid)?;
        lin(&x, down / s, &denoised_mid, -(-h).exp_m1())?
    };
    w.renoise(x, sn, up)
}

/// DPM-Solver++ (stochastic), r = 1/2, eta = 1: an ancestral step to the log-midpoint, the
/// model there, then an ancestral step with the midpoint's estimate.
fn dpmpp_sde_step(w: &mut Walk<'_>, _: usize, x: Tensor, s: f64, sn: f64) -> Result<Tensor> {
    let denoised = w.denoise(&x, s)?;
    if sn == 0.0 {
        return Ok(denoised);
    }
    let mid = (s * sn).sqrt();
    let (down, up) = ancestral_split(s, mid);
    let x_mid = exponential_step(&x, &denoised, s, down)?;
    let x_mid = w.add_noise(x_mid, up)?;
    let denoised_mid = w.denoise(&x_mid, mid)?;
    let (down, up) = ancestral_split(s, sn);
    let x = exponential_step(&x, &denoised_mid, s, down)?;
    w.add_noise(x, up)
}

/// The first-order exponential-integrator step from `s` to `to` with estimate `denoised`:
/// `(to / s) x - expm1(-h) denoised`, `h = ln(s / to)`.
fn exponential_step(x: &Tensor, denoised: &Tensor, s: f64, to: f64) -> Result<Tensor> {
    let h = s.ln() - to.ln();
    lin(x, to / s, denoised, -(-h).exp_m1())
}

/// DDPM's ancestral step, in the variance-preserving space the formula is written in.
fn ddpm_step(w: &mut Walk<'_>, _: usize, x: Tensor, s: f64, sn: f64) -> Result<Tensor> {
    let denoised = w.denoise(&x, s)?;
    let eps = ((&x - &denoised)? / s)?;
    let x_vp = (&x / (1.0 + s * s).sqrt())?;
    let alpha_bar = 1.0 / (s * s + 1.0);
    let alpha_bar_next = 1.0 / (sn * sn + 1.0);
    let alpha = alpha_bar / alpha_bar_next;
    let mu = lin(
        &x_vp,
        (1.0 / alpha).sqrt(),
        &eps,
        -(1.0 / alpha).sqrt() * (1.0 - alpha) / (1.0 - alpha_bar).sqrt(),
    )?;
    if sn == 0.0 {
        return Ok(mu);
    }
    let variance = (1.0 - alpha) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar);
    let mu = w.add_noise(mu, variance.sqrt())?;
    Ok((mu * (1.0 + sn * sn).sqrt())?)
}

/// k-diffusion's `get_ancestral_step` with eta = 1: the deterministic part goes down to
/// `sigma_down`, fresh noise of `sigma_up` is added back.
pub fn ancestral_split(sigma: f64, sigma_next: f64) -> (f64, f64) {
    if sigma_next == 0.0 {
        return (0.0, 0.0);
    }
    let up = (sigma_next.powi(2) * (sigma.powi(2) - sigma_next.powi(2)) / sigma.powi(2))
        .sqrt()
        .min(sigma_next);
    let down = (sigma_next.powi(2) - up.powi(2)).sqrt();
    (down, up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A denoiser whose clean estimate is always a fixed tensor: every sampler must land on
    /// it at sigma 0.
    struct Constant(Tensor);

    impl Denoiser for Constant {
        fn denoise(&self, _x: &Tensor, _sigma: f64) -> Result<Tensor> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn every_sampler_converges_on_a_fixed_target() {
        let target = Tensor::new(&[0.25f32, -0.5, 1.0], &Device::Cpu).unwrap();
        let x = Tensor::new(&[3.0f32, -2.0, 7.0], &Device::Cpu).unwrap();
        let sigmas = [14.6, 5.0, 1.0, 0.1, 0.0];
        for kind in SamplerKind::all() {
            let out = sample(
                kind,
                &Constant(target.clone()),
                x.clone(),
                &sigmas,
                1,
                StepHooks::none(),
            )
            .unwrap();
            let diff: f32 = (out - &target)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            // UniPC stops at sigma 0.001, as ComfyUI's does, a hair short of the target.
            let tolerance = if matches!(kind, SamplerKind::UniPc | SamplerKind::UniPcBh2) {
                1e-3
            } else {
                1e-5
            };
            assert!(diff < tolerance, "{kind:?} ended {diff} away");
        }
    }

    #[test]
    fn cancellation_stops_before_the_next_step() {
        let target = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let progress = |_: usize, _: usize| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        };
        let cancelled = || calls.load(std::sync::atomic::Ordering::SeqCst) >= 2;
        let hooks = StepHooks {
            progress: &progress,
            cancelled: &cancelled,
        };
        let err = sample(
            SamplerKind::Euler,
            &Constant(target.clone()),
            target.clone(),
            &[10.0, 5.0, 2.0, 1.0, 0.0],
            0,
            hooks,
        )
        .unwrap_err();
        assert!(
            matches!(err, ModelError::Cancelled { step: 3, steps: 4 }),
            "{err}"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn names_round_trip() {
        for kind in SamplerKind::all() {
            assert_eq!(SamplerKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(SamplerKind::from_name("nope"), None);
    }
}
