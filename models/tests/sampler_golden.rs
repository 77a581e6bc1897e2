//! Samplers and schedulers against ComfyUI's own functions: `fixtures/samplers/goldens.json`
//! holds what ComfyUI 0.8.0's k-diffusion samplers and schedulers return (float64) for fixed
//! sigmas, a fixed noise table and a toy denoiser (`make_sampler_goldens.py` there).

use std::cell::Cell;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sakuga_models::diffusion::sampler::{
    Denoiser, NoiseSource, SamplerKind, StepHooks, sample_with_noise,
};
use sakuga_models::diffusion::{ModelSampling, Scheduler};
use serde_json::Value;

fn goldens() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/goldens.json");
    serde_json::from_slice(&std::fs::read(path).expect("goldens.json")).expect("json")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// `0.9 tanh(x / sqrt(1 + s²)) + 0.1 x cos(s) / (1 + s²)`, elementwise, counting its calls;
/// its "negative prompt" estimate (for CFG++) is `0.8 tanh(x / sqrt(1 + s²)) + 0.05 x /
/// (1 + s²)`, as the golden script's post-CFG hook sees it.
struct Toy {
    calls: Cell<usize>,
}

impl Denoiser for Toy {
    fn denoise(&self, x: &Tensor, sigma: f64) -> sakuga_models::Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        let squashed = (x / (1.0 + sigma * sigma).sqrt())?.tanh()?;
        let linear = (x * (0.1 * sigma.cos() / (1.0 + sigma * sigma)))?;
        Ok(((squashed * 0.9)? + linear)?)
    }

    fn denoise_with_uncond(
        &self,
        x: &Tensor,
        sigma: f64,
    ) -> sakuga_models::Result<(Tensor, Tensor)> {
        let denoised = self.denoise(x, sigma)?;
        let squashed = (x / (1.0 + sigma * sigma).sqrt())?.tanh()?;
        let uncond = ((squashed * 0.8)? + (x * (0.05 / (1.0 + sigma * sigma)))?)?;
        Ok((denoised, uncond))
    }
}

/// The table's draws in order.
struct Table {
    draws: Vec<Vec<f64>>,
    used: usize,
}

impl NoiseSource for Table {
    fn draw(&mut self, like: &Tensor) -> sakuga_models::Result<Tensor> {
        let draw = self.draws[self.used].clone();
        self.used += 1;
        Ok(Tensor::from_vec(draw, like.dims(), like.device())?)
    }
}

fn max_relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1e-3))
        .fold(0.0, f64::max)
}

#[test]
fn samplers_match_comfyuis_on_fixed_sigmas_and_noise() {
    let g = goldens();
    let shape: Vec<usize> = floats(&g["shape"]).iter().map(|&d| d as usize).collect();
    let x = Tensor::from_vec(floats(&g["x"]), shape.as_slice(), &Device::Cpu).unwrap();
    let draws: Vec<Vec<f64>> = g["noise"].as_array().unwrap().iter().map(floats).collect();
    let mut checked = 0;
    let mut unsupported = Vec::new();
    for case in g["cases"].as_array().unwrap() {
        let name = case["sampler"].as_str().unwrap();
        let Some(kind) = SamplerKind::from_name(name) else {
            unsupported.push(name);
            continue;
        };
        let sigmas = floats(&g["schedules"][case["schedule"].as_str().unwrap()]);
        let toy = Toy {
            calls: Cell::new(0),
        };
        let mut noise = Table {
            draws: draws.clone(),
            used: 0,
        };
        let out = sample_with_noise(
            kind,
            &toy,
            x.clone(),
            &sigmas,
            &mut noise,
            StepHooks::none(),
        )
        .unwrap();
        let out: Vec<f64> = out.flatten_all().unwrap().to_vec1().unwrap();
        let error = max_relative_error(&out, &floats(&case["out"]));
        let label = format!("{name} on schedule {}", case["schedule"]);
        // ER-SDE's stage integrals are 200-point sums ComfyUI takes over f32 points in f32
        // (the order of a vectorised f32 sum is torch's own); the rest is f64 throughout.
        let tolerance = if kind == SamplerKind::ErSde {
            1e-5
        } else {
            1e-9
        };
        assert!(error < tolerance, "{label}: relative error {error:e}");
        assert_eq!(
            toy.calls.get() as u64,
            case["evals"].as_u64().unwrap(),
            "{label}: model evaluations"
        );
        // ComfyUI's res_multistep draws (and multiplies by 0) noise it never uses.
        if !matches!(
            kind,
            SamplerKind::ResMultistep | SamplerKind::ResMultistepCfgPp
        ) {
            assert_eq!(
                noise.used as u64,
                case["draws"].as_u64().unwrap(),
                "{label}: noise draws"
            );
        }
        checked += 1;
    }
    assert_eq!(unsupported, ["deis", "deis"], "samplers not checked");
    assert!(checked >= 68, "{checked} cases checked");
}

#[test]
fn schedulers_match_comfyuis() {
    let g = goldens();
    let sampling = ModelSampling::default();
    let mut checked = 0;
    for entry in g["schedulers"].as_array().unwrap() {
        let name = entry["scheduler"].as_str().unwrap();
        let steps = entry["steps"].as_u64().unwrap() as usize;
        let denoise = entry["denoise"].as_f64().unwrap();
        let got = match name {
            "sd_turbo" => sampling.sd_turbo(steps, denoise),
            _ => {
                let scheduler = Scheduler::from_name(name).expect("a known scheduler");
                sampling.basic(scheduler, steps, denoise)
            }
        };
        let want = floats(&entry["sigmas"]);
        let label = format!("{name} {steps} steps denoise {denoise}");
        assert_eq!(got.len(), want.len(), "{label}: {got:?} vs {want:?}");
        // ComfyUI rounds most schedules through float32.
        let error = max_relative_error(&got, &want);
        assert!(
            error < 2e-6,
            "{label}: relative error {error:e}\n{got:?}\n{want:?}"
        );
        checked += 1;
    }
    assert!(checked >= 40, "{checked} schedules checked");
}
