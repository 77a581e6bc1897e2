//! Samplers: the loops that walk a latent from noise to image along a sigma schedule.
//!
//! Every sampler talks to the model through [`Denoiser`] (sigma-space, k-diffusion style:
//! given a noisy `x` at `sigma`, return the model's estimate of the clean latent), so
//! classifier-free guidance and the prediction type live in one place. Before each step the
//! loop asks [`StepHooks::cancelled`] and stops with [`ModelError::Cancelled`]; after each
//! step it calls [`StepHooks::progress`]. Ancestral noise comes from the seeded
//! [`NoiseRng`], stream `step + 1`, so a seed reproduces a run exactly.

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

/// ComfyUI's sampler names supported by sakuga (the `sampler_name` combo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Euler,
    EulerAncestral,
    Heun,
    DpmPp2m,
    Lcm,
    Ddim,
}

impl SamplerKind {
    /// Every sampler, in ComfyUI's combo order.
    pub const ALL: [SamplerKind; 6] = [
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Heun,
        SamplerKind::DpmPp2m,
        SamplerKind::Lcm,
        SamplerKind::Ddim,
    ];

    /// The ComfyUI name.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_ancestral",
            SamplerKind::Heun => "heun",
            SamplerKind::DpmPp2m => "dpmpp_2m",
            SamplerKind::Lcm => "lcm",
            SamplerKind::Ddim => "ddim",
        }
    }

    /// Parses a ComfyUI name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Network evaluations per step (for cost estimates).
    pub fn evaluations_per_step(self) -> usize {
        match self {
            SamplerKind::Heun => 2,
            _ => 1,
        }
    }
}

/// Runs `kind` from `x` (already noised to `sigmas[0]`) through `sigmas`.
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
    let steps = sigmas.len().saturating_sub(1);
    let mut x = x;
    let mut previous_denoised: Option<Tensor> = None;
    for step in 0..steps {
        if (hooks.cancelled)() {
            return Err(ModelError::Cancelled {
                step: step + 1,
                steps,
            });
        }
        let (sigma, sigma_next) = (sigmas[step], sigmas[step + 1]);
        let denoised = denoiser.denoise(&x, sigma)?;
        x = match kind {
            // DDIM with eta = 0 is exactly Euler in sigma space:
            // x_next = denoised + sigma_next * eps, eps = (x - denoised) / sigma.
            SamplerKind::Euler | SamplerKind::Ddim => euler_step(&x, &denoised, sigma, sigma_next)?,
            SamplerKind::Heun => {
                let d = ((&x - &denoised)? / sigma)?;
                let x_euler = (&x + (&d * (sigma_next - sigma))?)?;
                if sigma_next == 0.0 {
                    x_euler
                } else {
                    let denoised_next = denoiser.denoise(&x_euler, sigma_next)?;
                    let d_next = ((&x_euler - &denoised_next)? / sigma_next)?;
                    let d_mean = ((d + d_next)? * 0.5)?;
                    (&x + (d_mean * (sigma_next - sigma))?)?
                }
            }
            SamplerKind::EulerAncestral => {
                let (sigma_down, sigma_up) = ancestral_split(sigma, sigma_next);
                let x_down = euler_step(&x, &denoised, sigma, sigma_down)?;
                with_step_noise(x_down, seed, step, sigma_next, sigma_up)?
            }
            SamplerKind::DpmPp2m => {
                let t = -sigma.ln();
                let scale = sigma_next / sigma;
                let next = if sigma_next == 0.0 {
                    denoised.clone()
                } else {
                    let t_next = -sigma_next.ln();
                    let h = t_next - t;
                    let blend = match (&previous_denoised, step) {
                        (Some(old), s) if s > 0 => {
                            let h_last = t + sigmas[step - 1].ln();
                            let r = h_last / h;
                            ((&denoised * (1.0 + 1.0 / (2.0 * r)))? - (old * (1.0 / (2.0 * r)))?)?
                        }
                        _ => denoised.clone(),
                    };
                    ((&x * scale)? - (blend * (-h).exp_m1())?)?
                };
                previous_denoised = Some(denoised);
                next
            }
            SamplerKind::Lcm => with_step_noise(denoised, seed, step, sigma_next, sigma_next)?,
        };
        (hooks.progress)(step + 1, steps);
    }
    Ok(x)
}

/// `x` plus this step's seeded noise scaled by `scale`, unless the step ends at sigma 0
/// (the last step adds none).
fn with_step_noise(
    x: Tensor,
    seed: u64,
    step: usize,
    sigma_next: f64,
    scale: f64,
) -> Result<Tensor> {
    if sigma_next > 0.0 {
        let noise = NoiseRng::new(seed, step as u64 + 1).tensor(x.dims(), x.dtype(), x.device())?;
        Ok((x + (noise * scale)?)?)
    } else {
        Ok(x)
    }
}

fn euler_step(x: &Tensor, denoised: &Tensor, sigma: f64, sigma_next: f64) -> Result<Tensor> {
    let d = ((x - denoised)? / sigma)?;
    Ok((x + (d * (sigma_next - sigma))?)?)
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
        for kind in SamplerKind::ALL {
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
            assert!(diff < 1e-5, "{kind:?} ended {diff} away");
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
        for kind in SamplerKind::ALL {
            assert_eq!(SamplerKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(SamplerKind::from_name("nope"), None);
    }
}
