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

    /// The table rescaled to zero terminal SNR (Lin et al. 2023, as ComfyUI's `zsnr`): the
    /// square roots of alpha-bar shifted and scaled so the last step is pure noise, its
    /// alpha-bar then set to a tiny positive value so its sigma stays finite.
    pub fn zero_terminal_snr(&self) -> Self {
        let roots: Vec<f64> = self
            .sigmas
            .iter()
            .map(|s| (1.0 / (s * s + 1.0)).sqrt())
            .collect();
        let (first, last) = (roots[0], roots[roots.len() - 1]);
        let mut sigmas: Vec<f64> = roots
            .iter()
            .map(|r| {
                let bar = ((r - last) * first / (first - last)).powi(2);
                ((1.0 - bar) / bar).sqrt()
            })
            .collect();
        let end = sigmas.len() - 1;
        let bar: f64 = 4.897_345_189_085_343_5e-8;
        sigmas[end] = ((1.0 - bar) / bar).sqrt();
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

    /// The timestep the model is shown for `sigma`: the trained timestep nearest in
    /// log-sigma, as ComfyUI's `ModelSamplingDiscrete.timestep` (an argmin, so a sigma
    /// between two trained ones is rounded, never interpolated; ties go to the lower).
    pub fn timestep(&self, sigma: f64) -> f64 {
        // f32 as ComfyUI's buffers, so near-ties fall the same way.
        let log_sigma = (sigma as f32).ln();
        let mut best = (0usize, f32::INFINITY);
        for (i, &l) in self.log_sigmas.iter().enumerate() {
            let distance = (log_sigma - l as f32).abs();
            if distance < best.1 {
                best = (i, distance);
            }
        }
        best.0 as f64
    }

    /// The sigma at (continuous) timestep `t`, interpolating in log-sigma.
    pub fn sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, (self.sigmas.len() - 1) as f64);
        let low = t.floor() as usize;
        let high = (low + 1).min(self.sigmas.len() - 1);
        let w = t - low as f64;
        ((1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()
    }

    /// The sigma a fraction of the schedule has reached (ComfyUI's `percent_to_sigma`):
    /// above every sigma at 0, 0 at 1.
    pub fn percent_to_sigma(&self, percent: f64) -> f64 {
        if percent <= 0.0 {
            return 999_999_999.9;
        }
        if percent >= 1.0 {
            return 0.0;
        }
        self.sigma((1.0 - percent) * (self.sigmas.len() - 1) as f64)
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
            Scheduler::Beta => self.beta(steps),
            Scheduler::LinearQuadratic => return linear_quadratic(steps, self.sigma_max()),
            Scheduler::KlOptimal => {
                let (min, max) = (self.sigma_min().atan(), self.sigma_max().atan());
                linspace(0.0, 1.0, steps)
                    .into_iter()
                    .map(|w| (w * min + (1.0 - w) * max).tan())
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

impl ModelSampling {
    /// `BasicScheduler`'s sigmas: for `denoise < 1` the last `steps + 1` of a schedule of
    /// `steps / denoise` steps; none for `denoise <= 0`.
    pub fn basic(&self, scheduler: Scheduler, steps: usize, denoise: f64) -> Vec<f64> {
        self.tail(steps, denoise, |total| self.sigmas(scheduler, total))
    }

    /// `KSampler`'s sigmas: [`Self::basic`], except that samplers whose last step would be
    /// a tiny one get one step more with the second-to-last sigma dropped, as ComfyUI does.
    pub fn for_sampler(
        &self,
        scheduler: Scheduler,
        steps: usize,
        denoise: f64,
        discard_penultimate: bool,
    ) -> Vec<f64> {
        self.tail(steps, denoise, |total| {
            if !discard_penultimate || total == 0 {
                return self.sigmas(scheduler, total);
            }
            let mut sigmas = self.sigmas(scheduler, total + 1);
            let last = sigmas.len() - 1;
            sigmas.remove(last - 1);
            sigmas
        })
    }

    fn tail(&self, steps: usize, denoise: f64, schedule: impl Fn(usize) -> Vec<f64>) -> Vec<f64> {
        if denoise <= 0.0 || steps == 0 {
            return Vec::new();
        }
        if denoise > 0.9999 {
            return schedule(steps);
        }
        let full = schedule((steps as f64 / denoise) as usize);
        full[full.len().saturating_sub(steps + 1)..].to_vec()
    }

    /// `SDTurboScheduler`'s sigmas: `steps` of the timesteps 999, 899, ... 99, starting
    /// `10 - 10 denoise` of them in, then 0.
    pub fn sd_turbo(&self, steps: usize, denoise: f64) -> Vec<f64> {
        let start = 10 - (10.0 * denoise) as usize;
        let mut sigmas: Vec<f64> = (start..10)
            .take(steps)
            .map(|i| self.sigma((999 - 100 * i) as f64))
            .collect();
        sigmas.push(0.0);
        sigmas
    }

    /// The beta scheduler (arXiv 2407.12173, alpha = beta = 0.6): timesteps at the Beta
    /// distribution's quantiles of an even grid, rounded, repeats dropped.
    fn beta(&self, steps: usize) -> Vec<f64> {
        const SHAPE: f64 = 0.6;
        let last = (self.sigmas.len() - 1) as f64;
        let mut picked = Vec::with_capacity(steps);
        let mut previous = None;
        for i in 0..steps {
            let q = 1.0 - i as f64 / steps as f64;
            // Round half to even, as numpy's rint.
            let t = (beta_quantile(q, SHAPE, SHAPE) * last).round_ties_even();
            if previous != Some(t) {
                picked.push(self.sigmas[t as usize]);
            }
            previous = Some(t);
        }
        picked
    }
}

/// Mochi's linear-quadratic schedule over `sigma_max` (half the steps linear to a small
/// threshold, then quadratic to 1); it ends in 0 itself.
fn linear_quadratic(steps: usize, sigma_max: f64) -> Vec<f64> {
    const THRESHOLD: f64 = 0.025;
    if steps == 1 {
        return vec![sigma_max, 0.0];
    }
    let linear_steps = steps / 2;
    let (linear, total) = (linear_steps as f64, steps as f64);
    let quadratic = total - linear;
    let step_diff = linear - THRESHOLD * total;
    let quadratic_coef = step_diff / (linear * quadratic * quadratic);
    let linear_coef = THRESHOLD / linear - 2.0 * step_diff / (quadratic * quadratic);
    let constant = quadratic_coef * linear * linear;
    let rising = (0..linear_steps)
        .map(|i| i as f64 * THRESHOLD / linear)
        .chain((linear_steps..steps).map(|i| {
            let i = i as f64;
            quadratic_coef * i * i + linear_coef * i + constant
        }))
        .chain(std::iter::once(1.0));
    rising.map(|x| (1.0 - x) * sigma_max).collect()
}

/// The `q` quantile of Beta(a, b): bisection on the regularized incomplete beta function.
fn beta_quantile(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut low, mut high) = (0.0f64, 1.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (low + high);
        if regularized_beta(mid, a, b) < q {
            low = mid;
        } else {
            high = mid;
        }
    }
    0.5 * (low + high)
}

/// `I_x(a, b)` by its continued fraction (Lentz's method), on whichever side converges.
fn regularized_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = a * x.ln() + b * (1.0 - x).ln() - ln_beta(a, b);
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_fraction(1.0 - x, b, a) / b
    }
}

fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    d = 1.0 / if d.abs() < TINY { TINY } else { d };
    let mut result = d;
    for m in 1..300 {
        let m = m as f64;
        for numerator in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            d = 1.0 / if d.abs() < TINY { TINY } else { d };
            c = 1.0 + numerator / c;
            if c.abs() < TINY {
                c = TINY;
            }
            result *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-15 {
            break;
        }
    }
    result
}

/// `ln B(a, b)` through a Lanczos `ln Γ`.
fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (i, c) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
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
    Simple,
    SgmUniform,
    Karras,
    Exponential,
    DdimUniform,
    Beta,
    Normal,
    LinearQuadratic,
    KlOptimal,
}

impl Scheduler {
    /// Every scheduler, in ComfyUI's combo order.
    pub const ALL: [Scheduler; 9] = [
        Scheduler::Simple,
        Scheduler::SgmUniform,
        Scheduler::Karras,
        Scheduler::Exponential,
        Scheduler::DdimUniform,
        Scheduler::Beta,
        Scheduler::Normal,
        Scheduler::LinearQuadratic,
        Scheduler::KlOptimal,
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
            Scheduler::Beta => "beta",
            Scheduler::LinearQuadratic => "linear_quadratic",
            Scheduler::KlOptimal => "kl_optimal",
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
    fn zero_terminal_snr_matches_comfyuis_table() {
        // ComfyUI 0.8.0's ModelSamplingDiscrete(zsnr=True).sigmas (float32) at 0, 1, 500,
        // 998 and 999.
        let zsnr = ModelSampling::default().zero_terminal_snr();
        for (t, want) in [
            (0, 0.029_167_158_529_162_407),
            (1, 0.042_067_565_023_899_08),
            (500, 1.774_557_471_275_329_6),
            (998, 2_254.238_037_109_375),
            (999, 4_518.763_671_875),
        ] {
            let got = zsnr.sigmas[t];
            assert!(
                (got - want).abs() / want < 2e-6,
                "sigma {t}: {got} vs {want}"
            );
        }
    }

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
        for t in [0.0, 1.0, 500.0, 998.0, 999.0] {
            assert_eq!(ms.timestep(ms.sigma(t)), t);
        }
        // Between two trained sigmas the nearest one's timestep is taken.
        assert_eq!(ms.timestep(ms.sigma(500.4)), 500.0);
        assert_eq!(ms.timestep(ms.sigma(500.6)), 501.0);
        assert_eq!(ms.timestep(1e-6), 0.0);
        assert_eq!(ms.timestep(1e6), 999.0);
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
