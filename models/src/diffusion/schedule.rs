//! Noise levels: the model's discrete sigma table and the step schedulers built on it.
//!
//! SD 1.x/2.x were trained with 1000 "scaled linear" betas (0.00085 to 0.012). Sampling works
//! in k-diffusion's sigma parameterisation, `sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`,
//! as ComfyUI does, so every sampler shares one denoiser. Schedulers pick the sigmas a run
//! visits; each returns `steps + 1` values ending in 0.

use serde::{Deserialize, Serialize};

/// Number of training timesteps.
pub const TRAINING_STEPS: usize = 1000;

/// The model's discrete noise levels.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSampling {
    /// `sigmas[t]` for `t` in `0..1000`, increasing.
    sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
}

impl Default for ModelSampling {
    fn default() -> Self {
        Self::scaled_linear(0.00085, 0.012)
    }
}

impl ModelSampling {
    /// The SD 1.x/2.x table: betas linear in sqrt space between `beta_start` and `beta_end`.
    pub fn scaled_linear(beta_start: f64, beta_end: f64) -> Self {
        let n = TRAINING_STEPS;
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let mut alpha_bar = 1.0;
        let mut sigmas = Vec::with_capacity(n);
        for i in 0..n {
            let beta = (a + (b - a) * i as f64 / (n - 1) as f64).powi(2);
            alpha_bar *= 1.0 - beta;
            sigmas.push(((1.0 - alpha_bar) / alpha_bar).sqrt());
        }
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self { sigmas, log_sigmas }
    }

    /// Smallest trained sigma.
    pub fn sigma_min(&self) -> f64 {
        self.sigmas[0]
    }

    /// Largest trained sigma.
    pub fn sigma_max(&self) -> f64 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// The (continuous) timestep of `sigma`, interpolating in log-sigma.
    pub fn timestep(&self, sigma: f64) -> f64 {
        let log_sigma = sigma.max(1e-10).ln();
        let n = self.log_sigmas.len();
        if log_sigma <= self.log_sigmas[0] {
            return 0.0;
        }
        if log_sigma >= self.log_sigmas[n - 1] {
            return (n - 1) as f64;
        }
        let high = self.log_sigmas.partition_point(|&l| l < log_sigma);
        let low = high - 1;
        let (l0, l1) = (self.log_sigmas[low], self.log_sigmas[high]);
        let w = (l0 - log_sigma) / (l0 - l1);
        low as f64 + w
    }

    /// The sigma at (continuous) timestep `t`, interpolating in log-sigma.
    pub fn sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, (self.sigmas.len() - 1) as f64);
        let low = t.floor() as usize;
        let high = (low + 1).min(self.sigmas.len() - 1);
        let w = t - low as f64;
        ((1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
    }

    /// The sigmas `scheduler` visits in `steps` steps (`steps + 1` values ending in 0).
    pub fn sigmas(&self, scheduler: Scheduler, steps: usize) -> Vec<f64> {
        if steps == 0 {
            return Vec::new();
        }
        let mut sigmas: Vec<f64> = match scheduler {
            Scheduler::Normal => {
                let start = self.timestep(self.sigma_max());
                let end = self.timestep(self.sigma_min());
                linspace(start, end, steps)
                    .into_iter()
                    .map(|t| self.sigma(t))
                    .collect()
            }
            Scheduler::SgmUniform => {
                let start = self.timestep(self.sigma_max());
                let end = self.timestep(self.sigma_min());
                let mut ts = linspace(start, end, steps + 1);
                ts.pop();
                ts.into_iter().map(|t| self.sigma(t)).collect()
            }
            Scheduler::Karras => {
                let rho = 7.0;
                let min_inv = self.sigma_min().powf(1.0 / rho);
                let max_inv = self.sigma_max().powf(1.0 / rho);
                linspace(0.0, 1.0, steps)
                    .into_iter()
                    .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                    .collect()
            }
            Scheduler::Exponential => linspace(self.sigma_max().ln(), self.sigma_min().ln(), steps)
                .into_iter()
                .map(f64::exp)
                .collect(),
            Scheduler::Simple => {
                let stride = self.sigmas.len() as f64 / steps as f64;
                (0..steps)
                    .map(|x| self.sigmas[self.sigmas.len() - 1 - (x as f64 * stride) as usize])
                    .collect()
            }
            Scheduler::DdimUniform => {
                let stride = (self.sigmas.len() / steps).max(1);
                let mut picked: Vec<f64> = (1..self.sigmas.len())
                    .step_by(stride)
                    .map(|t| self.sigmas[t])
                    .collect();
                picked.reverse();
                picked
            }
        };
        sigmas.push(0.0);
        sigmas
    }
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    (0..n)
        .map(|i| start + (end - start) * i as f64 / (n - 1) as f64)
        .collect()
}

/// ComfyUI's scheduler names (the `scheduler` combo of `KSampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Normal,
    Karras,
    Exponential,
    SgmUniform,
    Simple,
    DdimUniform,
}

impl Scheduler {
    /// Every scheduler, in ComfyUI's combo order.
    pub const ALL: [Scheduler; 6] = [
        Scheduler::Normal,
        Scheduler::Karras,
        Scheduler::Exponential,
        Scheduler::SgmUniform,
        Scheduler::Simple,
        Scheduler::DdimUniform,
    ];

    /// The ComfyUI name.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Normal => "normal",
            Scheduler::Karras => "karras",
            Scheduler::Exponential => "exponential",
            Scheduler::SgmUniform => "sgm_uniform",
            Scheduler::Simple => "simple",
            Scheduler::DdimUniform => "ddim_uniform",
        }
    }

    /// Parses a ComfyUI name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_sd_constants() {
        let ms = ModelSampling::default();
        // Well-known SD 1.x values: sigma_min ~0.0292, sigma_max ~14.6146.
        assert!(
            (ms.sigma_min() - 0.029_167_5).abs() < 1e-5,
            "{}",
            ms.sigma_min()
        );
        assert!(
            (ms.sigma_max() - 14.614_642).abs() < 1e-4,
            "{}",
            ms.sigma_max()
        );
        for t in [0.0, 1.5, 500.0, 998.25, 999.0] {
            assert!((ms.timestep(ms.sigma(t)) - t).abs() < 1e-6);
        }
    }

    #[test]
    fn schedulers_descend_to_zero() {
        let ms = ModelSampling::default();
        for scheduler in Scheduler::ALL {
            let sigmas = ms.sigmas(scheduler, 10);
            assert_eq!(sigmas.len(), 11, "{scheduler:?}");
            assert_eq!(*sigmas.last().unwrap(), 0.0);
            assert!(
                sigmas.windows(2).all(|w| w[0] > w[1]),
                "{scheduler:?} {sigmas:?}"
            );
            assert!(
                (sigmas[0] - ms.sigma_max()).abs() < 1e-3 || scheduler == Scheduler::DdimUniform
            );
        }
    }

    #[test]
    fn karras_ends_at_sigma_min() {
        let ms = ModelSampling::default();
        let sigmas = ms.sigmas(Scheduler::Karras, 5);
        assert!((sigmas[4] - ms.sigma_min()).abs() < 1e-9);
    }
}
